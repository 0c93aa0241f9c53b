use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use snapcache_sidecar::checkout;
use snapcache_sidecar::cli::{CheckoutArgs, Cli, Command, FetchArgs, PublishArgs, ServeArgs};
use snapcache_sidecar::fetch::{self, FetchOptions, Progress, Quiet, TerminalProgress};
use snapcache_sidecar::publish::{self, PublishError, PublishOptions, PublishSummary};

// jemalloc: steady memory under many large buffers, and the heap figures /metrics exports.
// .cargo/config.toml builds it to return freed pages to the OS at once.
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
        Command::Serve(args) => runtime.block_on(run_serve(*args)),
        Command::Fetch(args) => runtime.block_on(run_fetch(args)),
        Command::Publish(args) => runtime.block_on(run_publish(*args)),
        Command::Checkout(args) => runtime.block_on(run_checkout(*args)),
    }
}

async fn run_serve(args: ServeArgs) -> ExitCode {
    if args.checkouts.is_empty() {
        return match snapcache_sidecar::server::run(args.config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let policy = checkout::Policy {
        patience: args.policy.patience(),
        optional: args.policy.optional,
    };
    let termination_message = &args.policy.termination_message;
    match checkout::serve(args.config, &args.checkouts, &policy).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failed)) => {
            let message = failed.to_string();
            eprintln!("error: {message}");
            checkout::write_termination_message(termination_message, &message);
            ExitCode::from(failed.exit_code)
        }
        Err(err) => {
            let message = format!("the sidecar could not start: {err:#}");
            eprintln!("error: {message}");
            checkout::write_termination_message(termination_message, &message);
            ExitCode::FAILURE
        }
    }
}

async fn run_checkout(args: CheckoutArgs) -> ExitCode {
    let policy = &args.policy;
    let outcome = checkout::run(args.serve, &args.checkouts, &policy.patience()).await;
    match outcome.map(checkout::Outcome::into_result) {
        Ok(Ok(done)) => {
            let summary = checkout::success_message(&done);
            checkout::write_termination_message(&policy.termination_message, &summary);
            for finished in done {
                if args.json {
                    match serde_json::to_string(&finished) {
                        Ok(json) => println!("{json}"),
                        Err(err) => eprintln!("error: printing the summary: {err}"),
                    }
                } else {
                    eprintln!(
                        "{} checked out at {}",
                        finished.repo,
                        finished.target.display()
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Ok(Err(failed)) => {
            let message = failed.to_string();
            eprintln!("error: {message}");
            checkout::write_termination_message(&policy.termination_message, &message);
            if policy.optional {
                eprintln!("the checkout is optional (--optional): the app starts without it");
                ExitCode::SUCCESS
            } else {
                ExitCode::from(failed.exit_code)
            }
        }
        Err(err) => {
            let message = format!("checkout could not start: {err:#}");
            eprintln!("error: {message}");
            checkout::write_termination_message(&policy.termination_message, &message);
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
                    options
                        .output
                        .as_ref()
                        .or(options.extract.as_ref())
                        .map(|path| path.display().to_string())
                        .unwrap_or_default()
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

async fn run_publish(args: PublishArgs) -> ExitCode {
    let work_dir = args.work_dir.clone().unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".cache"))
            })
            .unwrap_or_else(std::env::temp_dir);
        cache.join("snapcache-publish")
    });
    if let Err(err) = std::fs::create_dir_all(&work_dir) {
        eprintln!(
            "error: creating the work directory {}: {err}",
            work_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let options = PublishOptions {
        repo: args.repo,
        name: args.name,
        git_ref: args.git_ref,
        work_dir,
        bucket: args.s3.bucket.clone(),
        prefix: args.s3.prefix.clone(),
        level: args.level,
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
        }),
        part_size: args.part_size,
        force: args.force,
        bundle: args.bundle,
    };
    let s3 = snapcache_sidecar::store::s3::S3Store::client(args.s3.endpoint.as_deref()).await;
    let json = args.json;
    let report = |result: &Result<PublishSummary, PublishError>| match result {
        Ok(summary) if json => match serde_json::to_string(summary) {
            Ok(line) => println!("{line}"),
            Err(err) => eprintln!("error: printing the summary: {err}"),
        },
        Ok(summary) => eprintln!(
            "{} {} ({} bytes in {:.1}s)",
            summary.action, summary.commit, summary.bytes, summary.seconds
        ),
        Err(err) => eprintln!("error: {err}"),
    };
    let result = match args.interval {
        Some(interval) => {
            publish::service::run_every(&s3, &options, interval, args.admin_listen, report)
                .await
                .inspect_err(|err| eprintln!("error: {err}"))
        }
        None => {
            let result = publish::publish(&s3, &options).await;
            report(&result);
            result.map(drop)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(PublishError::Usage(_)) => ExitCode::from(2),
        Err(_) => ExitCode::FAILURE,
    }
}
