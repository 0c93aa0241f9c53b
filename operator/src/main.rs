use std::process::ExitCode;

use clap::Parser;
use snapcache_operator::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "snapcache-operator {}: not built yet; see the open issues in the project tracker",
        cli.command.name()
    );
    ExitCode::FAILURE
}
