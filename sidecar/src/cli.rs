//! Command-line interface: one binary carries the server, the client and the producer.

use clap::{Parser, Subcommand};

use crate::config::ServeConfig;

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
    Fetch,
    /// Publish a git repository as a snapshot tarball in S3.
    Publish,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Serve(_) => "serve",
            Command::Fetch => "fetch",
            Command::Publish => "publish",
        }
    }
}
