//! Command-line interface: one binary carries the server, the client and the producer.

use clap::{Parser, Subcommand};

use crate::config::{S3Args, ServeConfig, parse_size};

#[derive(Debug, Parser)]
#[command(name = "snapcache-sidecar", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve snapshots on localhost from the disk tier and S3; with --checkout, as a
    /// native sidecar, also check repositories out before /startupz passes.
    #[command(after_help = SERVE_EXIT_CODES)]
    Serve(Box<ServeArgs>),
    /// Download a snapshot through a sidecar with parallel pinned ranges.
    #[command(after_help = FETCH_EXIT_CODES)]
    Fetch(FetchArgs),
    /// Publish a git repository as a snapshot tarball in S3.
    Publish(Box<PublishArgs>),
    /// Check repositories out from their snapshots before the app starts (the init
    /// container the operator injects): each appears complete at its directory, or the
    /// command fails with the reason in the container's termination message.
    #[command(after_help = CHECKOUT_EXIT_CODES)]
    Checkout(Box<CheckoutArgs>),
}

const CHECKOUT_EXIT_CODES: &str = "Exit codes: 0 every checkout is in place (or failed with \
--optional), 2 bad usage; a checkout that failed after retrying until --give-up-after exits \
with its last error's fetch code: 3 snapshot not found, 4 it kept changing, 5 corrupt \
(digest mismatch or does not unpack), 6 S3 unreachable, 1 anything else.";

const SERVE_EXIT_CODES: &str = "Exit codes: 0 stopped (SIGTERM), 1 could not start \
(ports, disk tier); with --checkout, a checkout that failed after retrying until \
--give-up-after (and not --optional) exits with its fetch code: 3 snapshot not found, \
4 it kept changing, 5 corrupt, 6 S3 unreachable.";

/// `serve`: the server, and what must be checked out before it counts as started.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ServeConfig,

    /// REPO=DIR: check the snapshot of REPO ({host}/{path}) out at DIR, which must not
    /// exist yet (its parent directory must), before /startupz answers 200 (a native
    /// sidecar's startup probe, which holds back the app containers); the snapshot API
    /// serves meanwhile. Repeat for several.
    #[arg(long = "checkout", value_parser = crate::checkout::parse_checkout)]
    pub checkouts: Vec<crate::checkout::Checkout>,

    #[command(flatten)]
    pub policy: CheckoutPolicy,
}

/// `checkout --checkout REPO=DIR...`: S3 and disk tier flags as `serve` takes them.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckoutArgs {
    /// REPO=DIR: the snapshot of REPO ({host}/{path}) checked out at DIR, which must not
    /// exist yet (its parent directory must); repeat for several.
    #[arg(long = "checkout", required = true, value_parser = crate::checkout::parse_checkout)]
    pub checkouts: Vec<crate::checkout::Checkout>,

    #[command(flatten)]
    pub policy: CheckoutPolicy,

    /// Print a JSON line per checkout (repository, directory, bytes, seconds, commit).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub serve: ServeConfig,
}

/// What a checkout that keeps failing comes to, in `checkout` and `serve --checkout`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckoutPolicy {
    /// Keep retrying a failed checkout (snapshot missing, S3 unreachable, digest
    /// mismatch) for this long, backing off from 1s to 30s; then fail with the reason.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub give_up_after: std::time::Duration,

    /// When a checkout fails, let the app start without it: `checkout` exits 0 and
    /// `serve` starts.
    #[arg(long)]
    pub optional: bool,

    /// Where a failure's one-line reason goes (`kubectl describe pod` shows it).
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_message: std::path::PathBuf,
}

impl CheckoutPolicy {
    pub fn patience(&self) -> crate::checkout::Patience {
        crate::checkout::Patience {
            give_up_after: self.give_up_after,
            first_backoff: std::time::Duration::from_secs(1),
            max_backoff: std::time::Duration::from_secs(30),
        }
    }
}

const FETCH_EXIT_CODES: &str = "Exit codes: 0 success, 1 other failure, 2 bad usage, \
3 snapshot not found, 4 gave up after restarts (the snapshot kept changing), \
5 verification failed (digest or size mismatch, or a snapshot that does not unpack), \
6 the server cannot reach its storage (S3) right now.";

/// `fetch URL -o FILE`: probe, parallel pinned ranges, restart on 412, verify.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// Snapshot URL on the sidecar, e.g. http://127.0.0.1:8765/git/github.com/org/repo/snapshot.tar.zst
    pub url: String,

    /// Where to write the snapshot; it appears only once complete and verified.
    /// Optional with --extract.
    #[arg(short, long, required_unless_present = "extract")]
    pub output: Option<std::path::PathBuf>,

    /// Concurrent ranged requests.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,

    /// Size of each ranged request, e.g. 4MiB. At most workers x chunk size of the
    /// download is in memory at once (32 MiB by default).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub chunk_size: u64,

    /// Restarts allowed when the snapshot changes during the download (412).
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,

    /// Tries per chunk on transient errors (connection reset, 5xx, timeout).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_attempts: u32,

    /// A chunk slower than this is retried.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub chunk_timeout: std::time::Duration,

    /// Unpack the snapshot (tar.zst) into this directory while it downloads, then
    /// apply the delta bundle the snapshot names so the checkout is at the newest commit.
    #[arg(long)]
    pub extract: Option<std::path::PathBuf>,

    /// Print a JSON summary (bytes, seconds, restarts, retries, commit) on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `publish --repo R --name host/path`: git repository → snapshot.tar.zst in S3.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// The repository: a URL or a path `git clone` understands.
    #[arg(long, env = "SNAPCACHE_PUBLISH_REPO")]
    pub repo: String,

    /// `{host}/{path}` of the snapshot, e.g. github.com/org/repo: served at
    /// /git/{name}/snapshot.tar.zst.
    #[arg(long, env = "SNAPCACHE_PUBLISH_NAME")]
    pub name: String,

    /// Branch, tag or commit to publish [default: the repository's default branch].
    #[arg(long = "ref", env = "SNAPCACHE_PUBLISH_REF")]
    pub git_ref: Option<String>,

    /// Where the bare mirror and scratch files live
    /// [default: $XDG_CACHE_HOME/snapcache-publish or ~/.cache/snapcache-publish].
    #[arg(long, env = "SNAPCACHE_PUBLISH_WORK_DIR")]
    pub work_dir: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub s3: S3Args,

    /// zstd compression level (1-19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,

    /// zstd compression threads [default: the number of CPUs].
    #[arg(long)]
    pub threads: Option<u32>,

    /// Size of each multipart upload part (5MiB or more).
    #[arg(long, default_value = "16MiB", value_parser = parse_part_size)]
    pub part_size: u64,

    /// Upload even when the published snapshot is already at the head.
    #[arg(long)]
    pub force: bool,

    /// When a snapshot exists at an older commit, upload only a git bundle from that
    /// commit to the head beside it and record it in the snapshot's bundle-url.
    #[arg(long)]
    pub bundle: bool,

    /// Keep publishing at this interval (with up to 10% jitter), e.g. 10m; a failed
    /// run is logged and retried at the next one.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<std::time::Duration>,

    /// With --interval: the admin port for /metrics and /healthz.
    #[arg(long, env = "SNAPCACHE_ADMIN_LISTEN", default_value = "0.0.0.0:9766",
          value_parser = crate::config::parse_socket_addr)]
    pub admin_listen: std::net::SocketAddr,

    /// Print a JSON summary of each run (action, commit, bytes, seconds) on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_part_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size >= 5 << 20 {
        Ok(size)
    } else {
        Err(format!("S3 parts must be 5MiB or more, not {text}"))
    }
}
