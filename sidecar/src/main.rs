use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use snapcache_sidecar::cli::{Cli, Command, FetchArgs};
use snapcache_sidecar::fetch::{self, FetchOptions, Progress, Quiet, TerminalProgress};

// jemalloc: steady memory under many large buffers, and the heap figures /metrics exports.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(config) => match runtime.block_on(snapcache_sidecar::server::run(*config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Fetch(args) => runtime.block_on(run_fetch(args)),
        other => {
            eprintln!(
                "snapcache-sidecar {}: not built yet; see the open issues in the project tracker",
                other.name()
            );
            ExitCode::FAILURE
        }
    }
}

async fn run_fetch(args: FetchArgs) -> ExitCode {
    let options = FetchOptions {
        url: args.url,
        output: args.output,
        workers: usize::from(args.workers),
        chunk_size: args.chunk_size,
        max_restarts: args.max_restarts,
        chunk_attempts: args.chunk_attempts,
        chunk_timeout: args.chunk_timeout,
        extract: args.extract,
    };
    let bar = TerminalProgress::on_terminal();
    let progress: &dyn Progress = match &bar {
        Some(bar) => bar,
        None => &Quiet,
    };
    let result = fetch::fetch(&options, progress).await;
    drop(bar);
    match result {
        Ok(summary) => {
            if args.json {
                match serde_json::to_string(&summary) {
                    Ok(json) => println!("{json}"),
                    Err(err) => eprintln!("error: printing the summary: {err}"),
                }
            } else {
                eprintln!(
                    "fetched {} bytes in {:.1}s ({} restarts, {} retries) to {}",
                    summary.bytes,
                    summary.seconds,
                    summary.restarts,
                    summary.retries,
                    options.output.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
