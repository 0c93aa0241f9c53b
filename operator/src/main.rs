use std::process::ExitCode;

use clap::Parser;
use kube::CustomResourceExt;
use snapcache_operator::api::SnapshotCache;
use snapcache_operator::certificates;
use snapcache_operator::cli::{Cli, Command, RunArgs};
use snapcache_operator::controller;
use snapcache_operator::inject::supports_native_sidecars;
use snapcache_operator::lease::{Election, Leadership};
use snapcache_operator::metrics::Metrics;
use snapcache_operator::routing::namespaces_carry_their_name;
use snapcache_operator::webhook;

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
        Command::Run(args) => block_on(run(*args)),
        Command::ReleaseWorkloads => block_on(release_workloads()),
    }
}

fn block_on(work: impl Future<Output = Result<(), String>>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => match runtime.block_on(work) {
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
    }
}

async fn release_workloads() -> Result<(), String> {
    let client = connect().await?;
    let released = snapcache_operator::upgrade::release_workloads(&client)
        .await
        .map_err(|e| {
            format!("releasing what the previous version patched (it is safe to run again): {e}")
        })?;
    println!("released {released} objects");
    Ok(())
}

async fn connect() -> Result<kube::Client, String> {
    kube::Client::try_default()
        .await
        .map_err(|e| format!("connecting to the cluster (KUBECONFIG or in-cluster): {e}"))
}

async fn run(args: RunArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let client = connect().await?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| format!("asking the API server for its version: {e}"))?;
    let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
    if args.webhook {
        metrics.await_webhook();
    }
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
    if args.webhook {
        let by_namespace_name = namespaces_carry_their_name(&version.major, &version.minor);
        start_webhook(
            &client,
            &args,
            metrics.clone(),
            native_sidecars,
            by_namespace_name,
        )
        .await?;
    }
    let election = args.leader_election.then(|| {
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        Election::start(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            args.lease_duration,
        )
    });
    let leadership = election
        .as_ref()
        .map_or_else(Leadership::always, Election::leadership);
    let gauge = metrics.clone();
    tokio::spawn(
        leadership
            .clone()
            .follow(move |leading| gauge.set_leader(leading)),
    );
    tokio::spawn(controller::count_checkouts(
        client.clone(),
        metrics.clone(),
        leadership.clone(),
    ));
    controller::run(
        client,
        metrics,
        leadership,
        args.sidecar_image,
        native_sidecars,
    )
    .await;
    // Nothing writes any more: a follower may take over now.
    if let Some(election) = election {
        election.resign().await;
    }
    Ok(())
}

/// The admission webhook: certificates first (so its first handshake succeeds), then the
/// TLS port, then the renewal loop. Every replica serves it; none needs the lease.
async fn start_webhook(
    client: &kube::Client,
    args: &RunArgs,
    metrics: Metrics,
    native_sidecars: bool,
    by_namespace_name: bool,
) -> Result<(), String> {
    let settings = certificates::Settings {
        namespace: args.lease_namespace.clone(),
        secret: args.webhook_secret.clone(),
        service: args.webhook_service.clone(),
        webhook_configuration: args.webhook_configuration.clone(),
        extra_hosts: args.webhook_hosts.clone(),
        source: args.webhook_certificates,
        lifetime: args.webhook_certificate_lifetime,
    };
    let resolver = std::sync::Arc::new(certificates::Resolver::default());
    webhook::refresh(client, &settings, &resolver, &metrics)
        .await
        .map_err(|e| {
            format!(
                "webhook certificates (Secret {}/{}): {e}",
                settings.namespace, settings.secret
            )
        })?;
    let webhook = webhook::Webhook::start(
        client,
        metrics.clone(),
        args.sidecar_image.clone(),
        native_sidecars,
    );
    tokio::spawn(webhook::keep_entries(
        client.clone(),
        args.webhook_configuration.clone(),
        webhook.clone(),
        resolver.clone(),
        by_namespace_name,
    ));
    let router = webhook.router();
    webhook::serve(args.webhook_listen, router, resolver.clone())
        .await
        .map_err(|e| {
            format!(
                "binding the webhook port {} (--webhook-listen): {e}",
                args.webhook_listen
            )
        })?;
    tokio::spawn(webhook::keep_certificates(
        client.clone(),
        settings,
        resolver,
        metrics,
        // A short lifetime (a test forcing renewals) is checked often enough to renew in time.
        args.webhook_certificate_check
            .min(args.webhook_certificate_lifetime / 10),
    ));
    Ok(())
}
