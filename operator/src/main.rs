use std::process::ExitCode;

use clap::Parser;
use kube::CustomResourceExt;
use snapcache_operator::api::SnapshotCache;
use snapcache_operator::cli::{Cli, Command, RunArgs};
use snapcache_operator::controller::{self, Context};
use snapcache_operator::inject::supports_native_sidecars;
use snapcache_operator::lease::{Leadership, LeaseElector};
use snapcache_operator::metrics::Metrics;

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
        Command::Run(args) => match tokio::runtime::Runtime::new() {
            Ok(runtime) => match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            },
            Err(err) => {
                eprintln!("error: cannot start the async runtime: {err}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("connecting to the cluster (KUBECONFIG or in-cluster): {e}"))?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| format!("asking the API server for its version: {e}"))?;
    let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
    snapcache_operator::metrics::serve(args.admin_listen, metrics.clone())
        .await
        .map_err(|e| {
            format!(
                "binding the admin port {} (--admin-listen): {e}",
                args.admin_listen
            )
        })?;
    let native_sidecars = supports_native_sidecars(&version.major, &version.minor);
    tracing::info!(version = %version.git_version, native_sidecars, "snapcache operator starting");
    let leadership = if args.leader_election {
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let elector = LeaseElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            args.lease_duration,
        );
        let leadership = elector.leadership();
        let gauge = metrics.clone();
        tokio::spawn(elector.run(move |leading| gauge.set_leader(leading)));
        leadership
    } else {
        metrics.set_leader(true);
        Leadership::always()
    };
    let ctx = std::sync::Arc::new(Context {
        leadership,
        recorder: kube::runtime::events::Recorder::new(client.clone(), controller::reporter()),
        client,
        metrics,
        failures: Default::default(),
        http: reqwest::Client::new(),
        default_image: args.sidecar_image,
        native_sidecars,
    });
    controller::run(ctx).await;
    Ok(())
}
