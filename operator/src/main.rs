use std::process::ExitCode;

use clap::Parser;
use kube::CustomResourceExt;
use snapcache_operator::api::SnapshotCache;
use snapcache_operator::cli::{Cli, Command};

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => match serde_yaml::to_string(&SnapshotCache::crd()) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: rendering the CRD: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Run => {
            eprintln!(
                "snapcache-operator run: the controller is not built yet; \
                 `snapcache-operator crd` prints the CustomResourceDefinition"
            );
            ExitCode::FAILURE
        }
    }
}
