//! A real Prometheus (the server `tests/env/prometheus.sh` builds, with Kubernetes service
//! discovery) started on loopback with a test's scrape config, and queried over its HTTP API.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::sidecar::free_addr;
use crate::{TestEnv, eventually};

/// A running Prometheus, killed when dropped; its config, data and log live in a temp dir.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs`, scraping and evaluating every second, and
    /// waits until it answers ready.
    pub async fn start(scrape_configs: Value) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs,
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, serde_yaml::to_string(&config).expect("yaml"))
            .expect("write the Prometheus config");
        let listen = free_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(TestEnv::get().require("PROMETHEUS"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            child,
            url: format!("http://{listen}"),
            http: reqwest::Client::new(),
            dir,
        };
        let ready = format!("{}/-/ready", prometheus.url);
        let http = prometheus.http.clone();
        eventually("Prometheus ready", async || {
            let response = http.get(&ready).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
        prometheus
    }

    /// The series an instant query answers; an error says what Prometheus said instead.
    pub async fn query(&self, query: &str) -> Result<Vec<Value>, String> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            [("query", query)],
        )
        .map_err(|err| err.to_string())?;
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        let text = response.text().await.map_err(|e| e.to_string())?;
        let answer: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if answer["status"] != "success" {
            return Err(format!("{query}: {answer}"));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of each series `query` answers, keyed by its `label`; nothing on error.
    pub async fn values_by(&self, query: &str, label: &str) -> HashMap<String, f64> {
        self.query(query)
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|series| {
                let key = series["metric"][label].as_str()?.to_owned();
                let value = series["value"][1].as_str()?.parse().ok()?;
                Some((key, value))
            })
            .collect()
    }

    /// The dashboard's queries that answer no series (a failed query panics: the dashboard
    /// must not hold an invalid expression).
    pub async fn dashboard_queries_without_data(&self) -> Vec<String> {
        let mut empty = Vec::new();
        for query in dashboard_queries() {
            let series = self
                .query(&query)
                .await
                .unwrap_or_else(|err| panic!("{err}"));
            if series.is_empty() {
                empty.push(query);
            }
        }
        empty
    }

    /// Prometheus's own log, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `expr` in the chart's dashboard.
pub fn dashboard_queries() -> Vec<String> {
    fn collect(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    out.push(expr.clone());
                }
                map.values().for_each(|v| collect(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let path = chart_dir().join("dashboards/snapcache.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard json");
    let mut queries = Vec::new();
    collect(&dashboard, &mut queries);
    assert!(queries.len() >= 8, "{queries:?}");
    queries
}

/// The scrape configs the chart's README documents for a Prometheus without the Prometheus
/// Operator: the first `yaml` block there that uses `kubernetes_sd_configs`.
pub fn documented_scrape_configs() -> Value {
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("chart README");
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains("kubernetes_sd_configs"))
        .expect("the chart README documents a kubernetes_sd_configs scrape config");
    let document: Value = serde_yaml::from_str(block).expect("the documented YAML parses");
    document["scrape_configs"].clone()
}

fn chart_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/snapcache"))
}
