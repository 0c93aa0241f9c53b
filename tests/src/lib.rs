//! Shared fixtures for the end-to-end tests: the real components that
//! `tests/env/run.sh` started, read from the env file it wrote.
//!
//! Every accessor fails loudly when a component is missing: a test that needs a
//! server must never pass by skipping.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};

/// The variable naming the env file that `tests/env/run.sh` writes.
pub const ENV_FILE_VAR: &str = "SNAPCACHE_TEST_ENV";

/// Endpoints and credentials of the running components.
#[derive(Debug)]
pub struct TestEnv {
    values: HashMap<String, String>,
}

impl TestEnv {
    /// The environment of this test run, loaded once per process.
    pub fn get() -> &'static TestEnv {
        static ENV: OnceLock<TestEnv> = OnceLock::new();
        ENV.get_or_init(|| match TestEnv::load() {
            Ok(env) => env,
            Err(err) => panic!(
                "{err:#}\nThese tests need the real components: run them with `make test` \
                 (or `tests/env/run.sh all -- cargo nextest run`)."
            ),
        })
    }

    fn load() -> Result<TestEnv> {
        let path = std::env::var_os(ENV_FILE_VAR)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("{ENV_FILE_VAR} is not set"))?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the test env file {}", path.display()))?;
        Ok(TestEnv {
            values: parse_env_file(&text),
        })
    }

    /// The value of `key`, or a panic that names the component that did not start.
    pub fn require(&self, key: &str) -> &str {
        match self.values.get(key) {
            Some(value) => value,
            None => panic!(
                "{key} is missing from the test env file: the component that provides it \
                 was not started (see tests/env/run.sh)"
            ),
        }
    }

    /// Both S3 implementations the tests run against.
    pub fn s3_servers(&self) -> Vec<S3Server> {
        ["MOTO", "GARAGE"]
            .into_iter()
            .map(|name| S3Server {
                name: name.to_ascii_lowercase(),
                endpoint: self.require(&format!("{name}_ENDPOINT")).to_owned(),
                access_key_id: self.require(&format!("{name}_ACCESS_KEY_ID")).to_owned(),
                secret_access_key: self
                    .require(&format!("{name}_SECRET_ACCESS_KEY"))
                    .to_owned(),
            })
            .collect()
    }

    /// A kube client for the test API server, from the kubeconfig `tests/env/kube.sh` wrote.
    pub async fn kube_client(&self) -> Result<kube::Client> {
        install_crypto_provider();
        let kubeconfig = kube::config::Kubeconfig::read_from(self.require("KUBECONFIG"))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// One S3-compatible server started for the tests.
#[derive(Debug, Clone)]
pub struct S3Server {
    pub name: String,
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl S3Server {
    /// An aws-sdk-s3 client for this server (path-style, region us-east-1).
    pub fn client(&self) -> aws_sdk_s3::Client {
        install_crypto_provider();
        let credentials = aws_sdk_s3::config::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "snapcache-tests",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(credentials)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }
}

/// kube and aws-sdk-s3 share this process; rustls needs one provider chosen up front.
pub fn install_crypto_provider() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Err only means another caller installed one first, which is just as good.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// A name no other test in this run uses (S3 bucket names allow lowercase, digits and '-').
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines_become_keys_and_values() {
        let parsed = parse_env_file("# comment\nA=1\n\nB = two=2\nnot a pair\n");
        assert_eq!(parsed.get("A").map(String::as_str), Some("1"));
        assert_eq!(parsed.get("B").map(String::as_str), Some("two=2"));
        assert_eq!(parsed.len(), 2);
    }
}
