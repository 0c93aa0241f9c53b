//! Command-line interface of `snapcache-operator`.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "snapcache-operator", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller against the cluster in the current kubeconfig.
    Run,
    /// Print the SnapshotCache CustomResourceDefinition as YAML.
    Crd,
}
