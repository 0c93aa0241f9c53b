//! Command-line interface: one binary carries the server, the client and the producer.

use clap::{Parser, Subcommand};

use crate::config::{ServeConfig, parse_size};

#[derive(Debug, Parser)]
#[command(name = "snapcache-sidecar", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve snapshots on localhost from the disk tier and S3.
    Serve(Box<ServeConfig>),
    /// Download a snapshot through a sidecar with parallel pinned ranges.
    #[command(after_help = FETCH_EXIT_CODES)]
    Fetch(FetchArgs),
    /// Publish a git repository as a snapshot tarball in S3.
    Publish,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Serve(_) => "serve",
            Command::Fetch(_) => "fetch",
            Command::Publish => "publish",
        }
    }
}

const FETCH_EXIT_CODES: &str = "Exit codes: 0 success, 1 other failure, 2 bad usage, \
3 snapshot not found, 4 gave up after restarts (the snapshot kept changing), \
5 verification failed (digest or size mismatch).";

/// `fetch URL -o FILE`: probe, parallel pinned ranges, restart on 412, verify.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// Snapshot URL on the sidecar, e.g. http://127.0.0.1:8765/git/github.com/org/repo/snapshot.tar.zst
    pub url: String,

    /// Where to write the snapshot; it appears only once complete and verified.
    #[arg(short, long)]
    pub output: std::path::PathBuf,

    /// Concurrent ranged requests.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,

    /// Size of each ranged request, e.g. 16MiB.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
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
