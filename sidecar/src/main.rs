use std::process::ExitCode;

use clap::Parser;
use snapcache_sidecar::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "snapcache-sidecar {}: not built yet; see the open issues in the project tracker",
        cli.command.name()
    );
    ExitCode::FAILURE
}
