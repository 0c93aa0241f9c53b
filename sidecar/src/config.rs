//! `serve` configuration: every flag is also an environment variable `SNAPCACHE_*`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::pin::PinMode;
use crate::snapshot_path::SnapshotPath;

/// How `snapcache-sidecar serve` reaches S3 and keeps its disk tier.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address of the snapshot API; only the pod itself should reach it.
    #[arg(long, env = "SNAPCACHE_LISTEN", default_value = "127.0.0.1:8765", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,

    /// Address of the admin port (/metrics, /healthz, /readyz, /startupz) that Prometheus
    /// scrapes and the kubelet probes.
    #[arg(long, env = "SNAPCACHE_ADMIN_LISTEN", default_value = "0.0.0.0:9765", value_parser = parse_socket_addr)]
    pub admin_listen: SocketAddr,

    #[command(flatten)]
    pub s3: S3Args,

    /// Directory of the disk tier; without it every read goes to S3.
    #[arg(long, env = "SNAPCACHE_DISK_DIR")]
    pub disk_dir: Option<PathBuf>,

    /// Most bytes the disk tier keeps; least recently used snapshots are evicted beyond it.
    #[arg(long, env = "SNAPCACHE_DISK_MAX_BYTES", default_value = "10GiB", value_parser = parse_size)]
    pub disk_max_bytes: u64,

    /// Age after which a disk entry is checked against S3 before it is served again.
    #[arg(long, env = "SNAPCACHE_REVALIDATE_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub revalidate_after: Duration,

    /// Concurrent ranged GETs of one full-object S3 read.
    #[arg(long, env = "SNAPCACHE_PARALLEL_GET_WORKERS", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel_get_workers: u16,

    /// Size of each ranged GET; workers x chunk size bounds the buffered bytes.
    #[arg(long, env = "SNAPCACHE_PARALLEL_GET_CHUNK_SIZE", default_value = "16MiB", value_parser = parse_chunk_size)]
    pub parallel_get_chunk_size: u64,

    /// Bytes all parallel GETs together may hold in chunk buffers; a part waits for its
    /// share before it is sent. Default: workers x chunk size, for the whole process.
    #[arg(long, env = "SNAPCACHE_PARALLEL_GET_BUDGET", value_parser = parse_size)]
    pub parallel_get_budget: Option<u64>,

    /// Bytes all disk tier readers together may hold in read blocks; slow clients then
    /// share it instead of each holding its own read-ahead.
    #[arg(long, env = "SNAPCACHE_DISK_READ_BUDGET", default_value = "64MiB", value_parser = parse_size)]
    pub disk_read_budget: u64,

    /// A part of a parallel GET that takes longer than this is retried.
    #[arg(long, env = "SNAPCACHE_PART_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub part_timeout: Duration,

    /// Which pin a probe hands out: `auto` (a version pin when the bucket is versioned,
    /// else an etag pin), `etag`, or `version`.
    #[arg(long, env = "SNAPCACHE_PIN_MODE", value_enum, default_value_t = PinMode::Auto)]
    pub pin_mode: PinMode,

    /// Open connections the snapshot API holds at once; one more is answered 503 and
    /// closed. Lowered at start when the open-files limit (ulimit -n) cannot hold it.
    #[arg(long, env = "SNAPCACHE_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Open connections the admin port holds at once (probes and scrapes need few).
    #[arg(long, env = "SNAPCACHE_ADMIN_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub admin_max_connections: u32,

    /// A connection that has not sent a whole request head within this time, including
    /// an idle keep-alive connection between requests, is closed (both ports).
    #[arg(long, env = "SNAPCACHE_HEADER_READ_TIMEOUT", default_value = "15s", value_parser = parse_timeout)]
    pub header_read_timeout: Duration,

    /// The snapshot API of the node cache on this pod's node, e.g. `http://10.0.0.5:8766`
    /// (the operator sets it from the node's address): reads of a known revision try it
    /// first and fall back to S3.
    #[arg(long, env = "SNAPCACHE_NODE_TIER", value_parser = parse_node_tier)]
    pub node_tier: Option<String>,

    /// How long the node cache may take to answer (connect and response head) before a
    /// read goes to S3 instead.
    #[arg(long, env = "SNAPCACHE_NODE_TIER_TIMEOUT", default_value = "2s", value_parser = parse_timeout)]
    pub node_tier_timeout: Duration,

    /// Serve as a node cache: a range of a revision being filled waits for the fill
    /// instead of reading S3 beside it, so the pods of a node read each revision once.
    #[arg(long, env = "SNAPCACHE_NODE_CACHE")]
    pub node_cache: bool,

    /// Repositories (`{host}/{path}`) whose snapshot this node cache keeps at its current
    /// revision before any pod asks; comma-separated in the variable. Needs --disk-dir.
    #[arg(long, env = "SNAPCACHE_PREWARM", value_delimiter = ',', value_parser = SnapshotPath::parse_repository)]
    pub prewarm: Vec<SnapshotPath>,

    /// How often the --prewarm snapshots are checked for a new revision (a HeadObject
    /// each once their disk entry is older than --revalidate-after).
    #[arg(long, env = "SNAPCACHE_PREWARM_INTERVAL", default_value = "30s", value_parser = parse_timeout)]
    pub prewarm_interval: Duration,

    /// Serve shared checkout trees as the CSI node plugin of this driver name (a node
    /// cache's; the operator sets it): each pod's checkout volume becomes an overlay of one
    /// extracted tree per revision on this node. Needs --disk-dir and --csi-namespace.
    #[arg(long, env = "SNAPCACHE_CSI_DRIVER", value_parser = parse_driver_name,
          requires_all = ["csi_namespace", "disk_dir"])]
    pub csi_driver: Option<String>,

    /// With --csi-driver: the only namespace whose pods get shared trees (the
    /// SnapshotCache's); other pods' volumes stay empty for their init containers.
    #[arg(long, env = "SNAPCACHE_CSI_NAMESPACE")]
    pub csi_namespace: Option<String>,

    /// With --csi-driver: the kubelet's root directory on the node (its --root-dir), where
    /// the plugin's sockets go and the pods' volumes are.
    #[arg(
        long,
        env = "SNAPCACHE_KUBELET_DIR",
        default_value = "/var/lib/kubelet"
    )]
    pub kubelet_dir: PathBuf,

    /// With --csi-driver: the node's name, as the kubelet knows it [default: the host name].
    #[arg(long, env = "SNAPCACHE_NODE_NAME")]
    pub node_name: Option<String>,

    /// How long in-flight responses may run after SIGTERM before the process exits.
    #[arg(long, env = "SNAPCACHE_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// Where the snapshots live in S3; shared by `serve` and `publish`.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 bucket holding the snapshots.
    #[arg(long = "s3-bucket", env = "SNAPCACHE_S3_BUCKET")]
    pub bucket: String,

    /// Prefix of every object key, e.g. `snapshots/`.
    #[arg(long = "s3-prefix", env = "SNAPCACHE_S3_PREFIX", default_value = "")]
    pub prefix: String,

    /// S3 endpoint URL for S3-compatible servers; implies path-style addressing.
    /// Region and credentials come from the standard AWS chain (AWS_REGION, AWS_ACCESS_KEY_ID, ...).
    #[arg(long = "s3-endpoint", env = "SNAPCACHE_S3_ENDPOINT")]
    pub endpoint: Option<String>,
}

/// Parses sizes such as `16MiB`, `10GB` or `1048576`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("`{text}` is not a size; use bytes or a unit, e.g. 16MiB or 10GB"))
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|err| format!("`{text}`: {err}"))?;
    if timeout.is_zero() {
        Err("a timeout must be longer than 0s, e.g. 15s".to_owned())
    } else {
        Ok(timeout)
    }
}

/// The snapshot of a repository, `{host}/{path}`.
/// A CSI driver name: at most 63 characters of letters, digits, `-` and `.`, starting and
/// ending with a letter or digit.
fn parse_driver_name(text: &str) -> Result<String, String> {
    let edges_plain = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let plain = text.len() <= 63
        && edges_plain(text.chars().next())
        && edges_plain(text.chars().last())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    plain.then(|| text.to_owned()).ok_or_else(|| {
        format!(
            "`{text}` is not a CSI driver name like checkouts.snapcache.io (63 characters at most)"
        )
    })
}

/// `http://host:port` and nothing more: the node cache's snapshot API.
/// `HOST:PORT`, where the host may also be an IPv6 address without brackets: what the
/// kubelet makes of `$(HOST_IP):PORT` on an IPv6 node (`fd00::5:8766`).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .ok()
        .or_else(|| {
            let (host, port) = text.rsplit_once(':')?;
            let host: std::net::Ipv6Addr = host.parse().ok()?;
            Some(SocketAddr::new(host.into(), port.parse().ok()?))
        })
        .ok_or_else(|| {
            format!("`{text}` is not an address and port, e.g. 10.0.0.5:8766 or [fd00::5]:8766")
        })
}

/// The node cache's URL. An IPv6 node's `http://$(HOST_IP):PORT` arrives unbracketed
/// (`http://fd00::5:8766`) and is bracketed here.
fn parse_node_tier(text: &str) -> Result<String, String> {
    let bracketed = text
        .strip_prefix("http://")
        .and_then(|address| parse_socket_addr(address.trim_end_matches('/')).ok())
        .filter(SocketAddr::is_ipv6)
        .map(|address| format!("http://{address}"));
    let text = bracketed.as_deref().unwrap_or(text);
    let url = reqwest::Url::parse(text).map_err(|err| format!("`{text}` is not a URL: {err}"))?;
    let plain = url.scheme() == "http"
        && url.host_str().is_some()
        && url.port().is_some()
        && url.path() == "/"
        && url.query().is_none()
        && url.username().is_empty();
    if plain {
        Ok(text.trim_end_matches('/').to_owned())
    } else {
        Err(format!(
            "`{text}`: the node tier is http://HOST:PORT, e.g. http://10.0.0.5:8766"
        ))
    }
}

fn parse_chunk_size(text: &str) -> Result<u64, String> {
    const MIN: u64 = 64 * 1024;
    const MAX: u64 = 1 << 30;
    let size = parse_size(text)?;
    if (MIN..=MAX).contains(&size) {
        Ok(size)
    } else {
        Err(format!(
            "chunk size must be between 64KiB and 1GiB, not {text}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 1 KiB "), Ok(1024));
    }

    #[test]
    fn bad_sizes_say_what_is_expected() {
        let err = parse_size("lots").expect_err("not a size");
        assert!(err.contains("16MiB"), "{err}");
        assert!(parse_size("-1MiB").is_err());
    }

    #[test]
    fn timeouts_are_positive_durations() {
        assert_eq!(parse_timeout("15s"), Ok(Duration::from_secs(15)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn the_node_tier_is_a_plain_http_host_and_port() {
        assert_eq!(
            parse_node_tier("http://10.0.0.5:8766/"),
            Ok("http://10.0.0.5:8766".to_owned())
        );
        let not_a_url = parse_node_tier("10.0.0.5:8766").expect_err("no scheme");
        assert!(not_a_url.contains("is not a URL"), "{not_a_url}");
        for refused in [
            "https://10.0.0.5:8766",
            "http://10.0.0.5",
            "http://10.0.0.5:8766/git",
            "http://user@10.0.0.5:8766",
        ] {
            let err = parse_node_tier(refused).expect_err(refused);
            assert!(err.contains("the node tier is http://HOST:PORT"), "{err}");
        }
    }

    #[test]
    fn an_ipv6_node_address_works_unbracketed_as_the_kubelet_expands_it() {
        assert_eq!(
            parse_node_tier("http://fd00::5:8766"),
            Ok("http://[fd00::5]:8766".to_owned())
        );
        assert_eq!(
            parse_node_tier("http://[fd00::5]:8766/"),
            Ok("http://[fd00::5]:8766".to_owned())
        );
        let v6: SocketAddr = "[fd00::5]:8766".parse().expect("address");
        assert_eq!(parse_socket_addr("fd00::5:8766"), Ok(v6));
        assert_eq!(parse_socket_addr("[fd00::5]:8766"), Ok(v6));
        assert_eq!(
            parse_socket_addr("10.0.0.5:8766"),
            Ok("10.0.0.5:8766".parse().expect("address"))
        );
        for refused in ["10.0.0.5", "fd00::5", "fd00::5:99999", "node:8766", ""] {
            let err = parse_socket_addr(refused).expect_err(refused);
            assert!(err.contains("is not an address and port"), "{err}");
        }
        let err = parse_node_tier("http://fd00::5").expect_err("no port");
        assert!(err.contains("is not a URL"), "{err}");
    }

    #[test]
    fn prewarm_takes_repositories_as_snapshot_paths_do() {
        let key =
            |text| SnapshotPath::parse_repository(text).map(|snapshot| snapshot.object_key("p/"));
        let expected = Ok("p/git/github.com/org/repo/snapshot.tar.zst".to_owned());
        assert_eq!(key("github.com/org/repo"), expected);
        assert_eq!(key("/github.com/org/repo/"), expected);
        for refused in ["github.com", "github.com/../etc", "github.com//repo", ""] {
            let err = SnapshotPath::parse_repository(refused).expect_err(refused);
            assert!(err.contains("is not a repository like"), "{err}");
        }
    }

    #[test]
    fn csi_driver_names_are_dns_like() {
        assert_eq!(
            parse_driver_name("ci.monorepo.checkouts.snapcache.io"),
            Ok("ci.monorepo.checkouts.snapcache.io".to_owned())
        );
        for refused in ["", "-a", "a.", "a/b", "a_b", &"a".repeat(64)] {
            assert!(parse_driver_name(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn chunk_sizes_are_bounded() {
        assert!(parse_chunk_size("1KiB").is_err());
        assert!(parse_chunk_size("2GiB").is_err());
        assert_eq!(parse_chunk_size("8MiB"), Ok(8 << 20));
    }
}
