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
    /// Run the controller against the cluster in the current kubeconfig (or in-cluster).
    Run(Box<RunArgs>),
    /// Print the SnapshotCache CustomResourceDefinition as YAML.
    Crd,
    /// Upgrade step (the chart's post-upgrade hook): remove the sidecar that versions
    /// before the admission webhook patched into Deployments and StatefulSets, and their
    /// finalizer from SnapshotCaches. Safe to run again.
    ReleaseWorkloads,
}

/// `run`: reconcile SnapshotCaches into injected sidecars.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Sidecar image for SnapshotCaches that name none.
    #[arg(long, env = "SNAPCACHE_SIDECAR_IMAGE", default_value = concat!("ghcr.io/snapcache/snapcache-sidecar:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,

    /// Address of the admin port: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "SNAPCACHE_OPERATOR_ADMIN_LISTEN",
        default_value = "0.0.0.0:9767"
    )]
    pub admin_listen: std::net::SocketAddr,

    /// Run several replicas: only the holder of a coordination.k8s.io Lease writes.
    #[arg(long, env = "SNAPCACHE_LEADER_ELECTION")]
    pub leader_election: bool,

    /// Namespace of the Lease (usually the operator's own; POD_NAMESPACE in a pod).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Name of the Lease.
    #[arg(long, default_value = "snapcache-operator")]
    pub lease_name: String,

    /// How long a Lease holds without renewal (at least 2s): a follower takes over after
    /// it when the leader vanished; at once when the leader shut down and released it.
    #[arg(long, default_value = "15s", value_parser = crate::lease::Timing::parse)]
    pub lease_duration: crate::lease::Timing,

    /// This replica's identity in the Lease [default: POD_NAME, else host name and pid].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Serve the Pod admission webhook (POST /mutate over TLS), with a CA and serving
    /// certificate the operator keeps in a Secret of --lease-namespace.
    #[arg(long, env = "SNAPCACHE_WEBHOOK")]
    pub webhook: bool,

    /// Address of the webhook's TLS port.
    #[arg(long, env = "SNAPCACHE_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub webhook_listen: std::net::SocketAddr,

    /// The Service in front of the webhook: its certificate names `<service>.<namespace>.svc`.
    #[arg(
        long,
        env = "SNAPCACHE_WEBHOOK_SERVICE",
        default_value = "snapcache-webhook"
    )]
    pub webhook_service: String,

    /// More names or IP addresses for the serving certificate, comma-separated: for an
    /// API server that calls the webhook by URL, e.g. `127.0.0.1` for an operator run
    /// on the API server's host during development.
    #[arg(long = "webhook-host", value_delimiter = ',')]
    pub webhook_hosts: Vec<String>,

    /// Who makes the webhook's certificates: `operator` (a CA and serving certificate it
    /// renews itself) or `secret` (cert-manager or another issuer keeps `tls.crt`, `tls.key`
    /// and `ca.crt` in --webhook-secret; the operator reads it every
    /// --webhook-certificate-check).
    #[arg(
        long,
        env = "SNAPCACHE_WEBHOOK_CERTIFICATES",
        value_enum,
        default_value = "operator"
    )]
    pub webhook_certificates: crate::certificates::Source,

    /// The Secret holding the webhook's CA and serving certificate (made when missing).
    #[arg(
        long,
        env = "SNAPCACHE_WEBHOOK_SECRET",
        default_value = "snapcache-webhook-tls"
    )]
    pub webhook_secret: String,

    /// The MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(
        long,
        env = "SNAPCACHE_WEBHOOK_CONFIGURATION",
        default_value = "snapcache"
    )]
    pub webhook_configuration: String,

    /// Lifetime of a serving certificate; it is renewed with a third of it left.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub webhook_certificate_lifetime: std::time::Duration,

    /// How often the certificates are checked for renewal (at least ten times per lifetime).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub webhook_certificate_check: std::time::Duration,
}
