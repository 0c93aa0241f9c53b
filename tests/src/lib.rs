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
        ["moto", "garage"]
            .into_iter()
            .map(|name| self.s3_server(name))
            .collect()
    }

    /// One S3 server by name: `moto` or `garage`.
    pub fn s3_server(&self, name: &str) -> S3Server {
        let var = |field: &str| {
            self.require(&format!("{}_{field}", name.to_ascii_uppercase()))
                .to_owned()
        };
        S3Server {
            name: name.to_owned(),
            endpoint: var("ENDPOINT"),
            access_key_id: var("ACCESS_KEY_ID"),
            secret_access_key: var("SECRET_ACCESS_KEY"),
        }
    }

    /// A kube client for the test API server, from the kubeconfig `tests/env/kube.sh` wrote.
    pub async fn kube_client(&self) -> Result<kube::Client> {
        client_from(self.require("KUBECONFIG")).await
    }

    /// A kube client for the one-node cluster `tests/env/cluster.sh` started.
    pub async fn cluster_client(&self) -> Result<kube::Client> {
        client_from(self.require("CLUSTER_KUBECONFIG")).await
    }

    /// A kubeconfig that acts as `user` in `groups` (the admin impersonating them), so a
    /// test can run the operator with exactly the permissions it bound to that user.
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> Result<tempfile::NamedTempFile> {
        let mut kubeconfig = kube::config::Kubeconfig::read_from(self.require("KUBECONFIG"))?;
        for named in &mut kubeconfig.auth_infos {
            if let Some(auth) = named.auth_info.as_mut() {
                auth.impersonate = Some(user.to_owned());
                auth.impersonate_groups =
                    Some(groups.iter().map(|group| (*group).to_owned()).collect());
            }
        }
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), serde_yaml::to_string(&kubeconfig)?)?;
        Ok(file)
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
    /// The `host:port` its endpoint names.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        self.endpoint
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("S3 endpoint {}: {e}", self.endpoint))
    }

    /// The size of the snapshot of `repo` in `bucket`, which must be there.
    pub async fn snapshot_size(&self, bucket: &str, repo: &str) -> u64 {
        let head = self
            .client()
            .head_object()
            .bucket(bucket)
            .key(snapshot_key(repo))
            .send()
            .await
            .unwrap_or_else(|e| panic!("the snapshot of {repo} in {bucket}: {e}"));
        head.content_length()
            .and_then(|n| u64::try_from(n).ok())
            .expect("the snapshot's size")
    }

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
            // As the sidecar does: not every S3 server takes the SDK's CRC trailers.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .credentials_provider(credentials)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }
}

async fn client_from(kubeconfig: &str) -> Result<kube::Client> {
    install_crypto_provider();
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
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

pub mod cluster;
pub mod generated_repo;
pub mod git;
pub mod large;
pub mod prometheus;
pub mod proxy;
pub mod sidecar;

/// The object key of repository `repo`'s snapshot, as the sidecar asks S3 for it.
pub fn snapshot_key(repo: &str) -> String {
    format!("git/{repo}/snapshot.tar.zst")
}

/// Deterministic pseudo-random bytes: distinct revisions differ everywhere.
pub fn snapshot_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Creates `bucket` on `s3`.
pub async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str) {
    s3.create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
}

/// Puts a snapshot with its metadata (commit and sha256) and returns its ETag.
pub async fn put_snapshot(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    repo: &str,
    body: &[u8],
    commit: &str,
) -> String {
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(body));
    let out = s3
        .put_object()
        .bucket(bucket)
        .key(snapshot_key(repo))
        .metadata("snapshot-commit", commit)
        .metadata("sha256", sha256)
        .body(aws_sdk_s3::primitives::ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("put snapshot {repo}: {e:?}"));
    out.e_tag().unwrap_or_default().trim_matches('"').to_owned()
}

/// Creates the SnapshotCache CRD (kept when a run already made it) and waits until the
/// API server serves it.
pub async fn install_snapshot_cache_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let crd = snapcache_operator::api::SnapshotCache::crd();
    match crds.create(&kube::api::PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => panic!("the API server refused the CRD: {err:?}"),
    }
    let established = kube::runtime::wait::await_condition(
        crds,
        "snapshotcaches.snapcache.io",
        kube::runtime::wait::conditions::is_crd_established(),
    );
    tokio::time::timeout(std::time::Duration::from_secs(30), established)
        .await
        .expect("CRD established within 30s")
        .expect("watch CRD");
}

/// Creates a namespace with a unique name starting with `prefix`, and returns the name.
pub async fn create_namespace(client: &kube::Client, prefix: &str) -> String {
    let name = unique_name(prefix);
    let namespace: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &namespace)
        .await
        .expect("create namespace");
    name
}

/// Polls `check` every 200 ms for up to 30 s; panics naming `what` when it never succeeds.
pub async fn eventually<T>(what: &str, check: impl AsyncFnMut() -> Option<T>) -> T {
    within(std::time::Duration::from_secs(30), what, check).await
}

/// Polls `check` every 200 ms until it gives a value, for waits that may legitimately take
/// longer than `eventually` allows; `limit` only bounds a hang.
pub async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
