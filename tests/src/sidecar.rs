//! A real `snapcache-sidecar serve` process against one of the test S3 servers.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::S3Server;

/// Options of one sidecar; `Default` gives a disk tier and small parallel-GET parts.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    pub disk_tier: bool,
    pub disk_max_bytes: String,
    pub revalidate_after: String,
    pub workers: u16,
    pub chunk_size: String,
    pub part_timeout: String,
    pub shutdown_grace: String,
    /// The disk tier's directory; a fresh temporary one when `None`.
    pub disk_dir: Option<PathBuf>,
    pub extra_args: Vec<String>,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            disk_tier: true,
            disk_max_bytes: "1GiB".into(),
            revalidate_after: "30s".into(),
            workers: 4,
            chunk_size: "256KiB".into(),
            part_timeout: "20s".into(),
            shutdown_grace: "10s".into(),
            disk_dir: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running sidecar; killed when dropped.
#[derive(Debug)]
pub struct Sidecar {
    child: Child,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    disk_dir: PathBuf,
    /// Holds the default disk tier directory and the log.
    _scratch: tempfile::TempDir,
    log_path: PathBuf,
}

impl Sidecar {
    /// Starts a sidecar reading `bucket` on `server` and waits until it answers.
    pub fn start(server: &S3Server, bucket: &str, options: &SidecarOptions) -> Sidecar {
        Sidecar::start_at(&server.endpoint, server, bucket, options)
    }

    /// Like `start`, but reaching S3 through `endpoint` (a proxy in front of `server`).
    pub fn start_at(
        endpoint: &str,
        server: &S3Server,
        bucket: &str,
        options: &SidecarOptions,
    ) -> Sidecar {
        let scratch = tempfile::tempdir().expect("temp dir for the disk tier");
        let disk_dir = options
            .disk_dir
            .clone()
            .unwrap_or_else(|| scratch.path().join("disk"));
        let log_path = scratch.path().join("sidecar.log");
        let log = std::fs::File::create(&log_path).expect("sidecar log file");
        let mut command = Command::new(sidecar_binary());
        command
            .arg("serve")
            // Port 0: the kernel picks free ports, read back from the start-up log line.
            .args(["--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--s3-endpoint", endpoint])
            .args(["--s3-bucket", bucket])
            .args(["--disk-max-bytes", &options.disk_max_bytes])
            .args(["--revalidate-after", &options.revalidate_after])
            .args(["--parallel-get-workers", &options.workers.to_string()])
            .args(["--parallel-get-chunk-size", &options.chunk_size])
            .args(["--part-timeout", &options.part_timeout])
            .args(["--shutdown-grace", &options.shutdown_grace])
            .args(&options.extra_args)
            .env("AWS_ACCESS_KEY_ID", &server.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &server.secret_access_key)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "snapcache_sidecar=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        if options.disk_tier {
            command.args(["--disk-dir", &disk_dir.display().to_string()]);
        }
        let mut child = command.spawn().expect("start snapcache-sidecar");
        let (api, admin) = wait_until_listening(&mut child, &log_path);
        Sidecar {
            child,
            api,
            admin,
            disk_dir,
            _scratch: scratch,
            log_path,
        }
    }

    /// `http://127.0.0.1:port` of the snapshot API.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn disk_dir(&self) -> &Path {
        &self.disk_dir
    }

    /// SIGKILL, as the kernel's OOM killer or a node failure would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit on its own and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// What the sidecar logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The current /metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Waits (as `eventually` does) until `sample` of the metrics reads `value`.
    pub async fn until_metric(&self, sample: &str, value: f64) {
        crate::eventually(&format!("{sample} to read {value}"), async || {
            (Sidecar::metric(&self.metrics().await, sample) == value).then_some(())
        })
        .await;
    }

    /// Panics when this sidecar has sent any HeadObject or GetObject to S3. `metric` reads
    /// a sample that is not exported as 0, so the start-up HeadBucket must first show under
    /// the same metric: a zero below is then a count of none, not a name that went wrong.
    pub async fn assert_no_s3_requests(&self) {
        let count = |metrics: &str, operation: &str| {
            let sample =
                format!("snapcache_s3_request_duration_seconds_count{{operation=\"{operation}\"}}");
            Sidecar::metric(metrics, &sample)
        };
        crate::eventually("the start-up HeadBucket counted", async || {
            (count(&self.metrics().await, "head_bucket") >= 1.0).then_some(())
        })
        .await;
        let metrics = self.metrics().await;
        for operation in ["head", "get"] {
            assert_eq!(count(&metrics, operation), 0.0, "{operation} reached S3");
        }
    }

    /// The value of one sample, e.g. `metric(&text, "snapcache_s3_read_bytes_total")`
    /// or with labels `snapcache_disk_tier_lookups_total{result="hit"}`.
    pub fn metric(text: &str, sample: &str) -> f64 {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The addresses from the sidecar's `serving listen=… admin=…` log line.
fn wait_until_listening(child: &mut Child, log_path: &Path) -> (SocketAddr, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let field = |log: &str, name: &str| -> Option<SocketAddr> {
        let start = log.find(&format!(" {name}="))? + name.len() + 2;
        log[start..].split_whitespace().next()?.parse().ok()
    };
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!("sidecar exited with {status}:\n{log}");
        }
        if let (Some(api), Some(admin)) = (field(&log, "listen"), field(&log, "admin")) {
            return (api, admin);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!(
        "sidecar did not report listening within 60s:\n{}",
        std::fs::read_to_string(log_path).unwrap_or_default()
    );
}

/// The `snapcache-sidecar` binary of the same build profile as this executable.
pub fn sidecar_binary() -> PathBuf {
    binary("snapcache-sidecar")
}

/// A workspace binary of the same build profile as this executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps/, binaries such as the bench in target/<profile>/.
    let mut dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("profile directory");
    }
    let binary = dir.join(name);
    assert!(
        binary.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`; `make test` does)",
        binary.display()
    );
    binary
}

/// An address on 127.0.0.1 with a port nothing listens on right now.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
}

/// `snapcache-sidecar fetch ARGS…`, run to completion.
pub fn run_fetch(args: &[&str]) -> std::process::Output {
    Command::new(sidecar_binary())
        .arg("fetch")
        .args(args)
        .output()
        .expect("run snapcache-sidecar fetch")
}

/// The `--json` summary of a command that must have succeeded.
pub fn json_summary(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "--json prints one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
