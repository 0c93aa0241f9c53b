//! Prometheus metrics of the sidecar. Every label has a small fixed set of values:
//! never a repository name or a raw path.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Where the bytes of a response came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Disk,
    /// The node cache on this pod's node.
    Node,
    S3,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Disk => "disk",
            Source::Node => "node",
            Source::S3 => "s3",
        }
    }
}

/// The kinds of transfer buffers held under a process-wide budget.
#[derive(Debug, Clone, Copy)]
pub enum Buffers {
    /// Chunks of parallel GETs from S3.
    ParallelGet = 0,
    /// Blocks read from the disk tier on their way to clients.
    DiskRead = 1,
}

/// Which listening port a connection came in on.
#[derive(Debug, Clone, Copy)]
pub enum Port {
    Api,
    Admin,
}

impl Port {
    pub fn label(self) -> &'static str {
        match self {
            Port::Api => "api",
            Port::Admin => "admin",
        }
    }
}

/// Counts one open connection until dropped.
#[derive(Debug)]
pub struct OpenConnection(IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why an S3 request failed, as S3 health counts it (bounded: these are the label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Failure {
    /// No answer: connection refused or cut, a timeout, or a 5xx.
    Unreachable,
    /// 401/403: the credentials are wrong or the policy denies the request.
    AccessDenied,
    /// The start-up HeadBucket found no such bucket.
    BucketMissing,
    Other,
}

impl S3Failure {
    const ALL: [S3Failure; 4] = [
        S3Failure::Unreachable,
        S3Failure::AccessDenied,
        S3Failure::BucketMissing,
        S3Failure::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            S3Failure::Unreachable => "unreachable",
            S3Failure::AccessDenied => "access_denied",
            S3Failure::BucketMissing => "bucket_missing",
            S3Failure::Other => "other",
        }
    }
}

/// What one S3 request says of S3's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Answered,
    /// Says nothing either way (a HEAD's 404: a missing key or a missing bucket).
    Inconclusive,
    Failed(S3Failure),
}

/// S3's health as the sidecar's own requests show it; probes and scrapes never ask S3.
#[derive(Debug, Clone)]
pub struct S3Health {
    up: IntGauge,
    failing: IntGaugeVec,
    consecutive_failures: IntGauge,
    last_success: Gauge,
    last_failure: Gauge,
}

impl S3Health {
    fn new(registry: &Registry) -> S3Health {
        let health = S3Health {
            up: register(
                registry,
                IntGauge::new(
                    "snapcache_s3_up",
                    "0 when the sidecar's latest S3 request failed (no answer, refused \
                     credentials, missing bucket), else 1. Probes and scrapes never ask S3.",
                ),
            ),
            failing: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "snapcache_s3_failing",
                        "1 for the reason of the current run of S3 failures, else 0.",
                    ),
                    &["reason"],
                ),
            ),
            consecutive_failures: register(
                registry,
                IntGauge::new(
                    "snapcache_s3_consecutive_failures",
                    "S3 requests failed in a row since the last one that got an answer.",
                ),
            ),
            last_success: register(
                registry,
                Gauge::new(
                    "snapcache_s3_last_success_timestamp_seconds",
                    "Unix time of the latest S3 request that got an answer; 0 before any.",
                ),
            ),
            last_failure: register(
                registry,
                Gauge::new(
                    "snapcache_s3_last_failure_timestamp_seconds",
                    "Unix time of the latest failed S3 request; 0 before any.",
                ),
            ),
        };
        health.up.set(1);
        for failure in S3Failure::ALL {
            health.failing.with_label_values(&[failure.label()]).set(0);
        }
        health
    }

    pub fn record(&self, health: Health) {
        let failure = match health {
            Health::Inconclusive => return,
            Health::Answered => {
                self.up.set(1);
                self.consecutive_failures.set(0);
                self.last_success.set(unix_now());
                None
            }
            Health::Failed(failure) => {
                self.up.set(0);
                self.consecutive_failures.inc();
                self.last_failure.set(unix_now());
                Some(failure)
            }
        };
        for reason in S3Failure::ALL {
            let failing = i64::from(failure == Some(reason));
            self.failing
                .with_label_values(&[reason.label()])
                .set(failing);
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// All metrics of one sidecar process, registered in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Snapshot API requests by status class (`2xx`...).
    pub requests: IntCounterVec,
    /// Body bytes sent to clients, by source.
    response_bytes: IntCounterVec,
    /// Disk tier lookups by result (`hit`, `miss`, `stale`).
    tier_lookups: IntCounterVec,
    /// Reads the node tier could not serve, by why, that went to S3 instead.
    node_tier_fallbacks: IntCounterVec,
    /// Snapshots this node cache is told to keep warm (`--prewarm`).
    pub prewarm_listed: IntGauge,
    /// Of those, how many it held at their current revision after the last round.
    pub prewarm_current: IntGauge,
    /// Bytes read in by pre-warming.
    pub prewarm_bytes: IntCounter,
    /// From a revision's Last-Modified in S3 to its being warm, for the last one warmed.
    pub prewarm_lag: Gauge,
    /// Checkout volumes the CSI plugin published, by result (`shared`, `fallback`).
    shared_tree_publishes: IntCounterVec,
    /// Shared trees extracted on this node (one per repository, revision and owner).
    pub shared_tree_builds: IntCounter,
    /// S3 request latency by operation (`head`, `get`).
    pub s3_latency: HistogramVec,
    /// Body bytes read from S3.
    pub s3_bytes_read: IntCounter,
    /// S3 requests that failed, by a bounded reason.
    pub s3_errors: IntCounterVec,
    /// Bytes the disk tier holds.
    pub disk_bytes: IntGauge,
    /// Snapshots the disk tier holds.
    pub disk_entries: IntGauge,
    /// --disk-max-bytes, 0 without a disk tier.
    pub disk_capacity: IntGauge,
    /// Fills not started because the filesystem had no room; those reads stream from S3.
    pub disk_fills_skipped: IntCounter,
    /// Reads from S3 that joined an identical read in flight rather than asking S3 again.
    pub s3_reads_shared: IntCounter,
    /// Revisions remembered as not fitting the filesystem, served uncached for now.
    pub disk_unfit: IntGauge,
    /// The container's memory limit, 0 when unlimited.
    pub memory_limit: IntGauge,
    /// 1 while /readyz answers 200, as of the last probe or scrape.
    pub ready: IntGauge,
    /// S3 health from the requests the sidecar makes anyway.
    pub s3_health: S3Health,
    connections_open: IntGaugeVec,
    connections_refused: IntCounterVec,
    /// Bytes held in parallel-GET chunk buffers now.
    pub parallel_get_buffered: IntGauge,
    parallel_get_buffered_high_water: IntGauge,
    /// Bytes held in disk tier read blocks now.
    pub disk_read_buffered: IntGauge,
    disk_read_buffered_high_water: IntGauge,
    // Exact running figures per kind; gauges alone cannot take a race-free maximum.
    buffered_now: Arc<[AtomicI64; 2]>,
    buffered_high_water: Arc<[AtomicI64; 2]>,
    /// Parallel-GET parts retried after a timeout or a transient error.
    pub parallel_get_part_retries: IntCounter,
    /// 412s served on pinned reads.
    pub pin_precondition_failed: IntCounter,
    heap_allocated: IntGauge,
    heap_resident: IntGauge,
    fill_duration: Histogram,
    /// 1 once /startupz answers 200: `serve --checkout`'s checkouts are in place.
    pub started: IntGauge,
    checkouts: IntCounterVec,
    checkout_duration: Histogram,
    checkout_bytes: IntCounter,
    checkout_restarts: IntCounter,
    checkout_bundles_applied: IntCounter,
}

/// How one checkout of `serve --checkout` ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CheckoutResult {
    Succeeded {
        bytes: u64,
        restarts: u32,
        bundle_applied: bool,
    },
    /// Failed for `reason` (a `FetchError::reason`); the app starts without it if `optional`.
    Failed {
        reason: &'static str,
        optional: bool,
    },
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help));
        let s3_latency = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "snapcache_s3_request_duration_seconds",
                    "S3 request latency until the response headers arrived, by operation.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["operation"],
            ),
        );
        let fill_duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "snapcache_disk_fill_duration_seconds",
                    "Time to copy one snapshot from S3 into the disk tier.",
                )
                .buckets(vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
            ),
        );

        let checkout_duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "snapcache_checkout_duration_seconds",
                    "serve --checkout: from the first attempt at a checkout to its end.",
                )
                .buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
            ),
        );

        let metrics = Metrics {
            requests: counter_vec(
                "snapcache_http_requests_total",
                "Snapshot API requests by status class.",
                &["status_class"],
            ),
            response_bytes: counter_vec(
                "snapcache_response_bytes_total",
                "Body bytes sent to clients, by where they came from.",
                &["source"],
            ),
            tier_lookups: counter_vec(
                "snapcache_disk_tier_lookups_total",
                "Disk tier lookups: hit, miss, or stale (served while S3 was unreachable).",
                &["result"],
            ),
            node_tier_fallbacks: counter_vec(
                "snapcache_node_tier_fallbacks_total",
                "Reads the node cache could not serve, so S3 did: unreachable (absent, slow or \
                 down), other_revision, not_found or error.",
                &["reason"],
            ),
            prewarm_listed: gauge(
                "snapcache_prewarm_snapshots",
                "Snapshots this node cache keeps warm (--prewarm).",
            ),
            prewarm_current: gauge(
                "snapcache_prewarm_snapshots_current",
                "Snapshots of --prewarm held at their current revision after the last round.",
            ),
            prewarm_bytes: counter(
                "snapcache_prewarm_read_bytes_total",
                "Bytes read in by pre-warming.",
            ),
            prewarm_lag: register(
                &registry,
                Gauge::new(
                    "snapcache_prewarm_lag_seconds",
                    "From the last pre-warmed revision's Last-Modified in S3 to its being warm.",
                ),
            ),
            shared_tree_publishes: counter_vec(
                "snapcache_shared_tree_publishes_total",
                "Checkout volumes the CSI plugin published: shared (an overlay of the \
                 node's tree) or fallback (an empty directory the checkout init container \
                 fills from S3).",
                &["result"],
            ),
            shared_tree_builds: counter(
                "snapcache_shared_tree_builds_total",
                "Shared trees extracted on this node: one per repository, revision and owner.",
            ),
            s3_latency,
            s3_bytes_read: counter("snapcache_s3_read_bytes_total", "Body bytes read from S3."),
            s3_errors: counter_vec(
                "snapcache_s3_errors_total",
                "Failed S3 requests by reason.",
                &["reason"],
            ),
            disk_bytes: gauge("snapcache_disk_tier_bytes", "Bytes held by the disk tier."),
            disk_entries: gauge(
                "snapcache_disk_tier_entries",
                "Snapshots held by the disk tier.",
            ),
            disk_capacity: gauge(
                "snapcache_disk_tier_capacity_bytes",
                "The disk tier's size limit (--disk-max-bytes); 0 without a disk tier.",
            ),
            disk_fills_skipped: counter(
                "snapcache_disk_tier_fills_skipped_total",
                "Disk tier fills not started because the filesystem had no room for the \
                 snapshot; those reads stream from S3 uncached.",
            ),
            s3_reads_shared: counter(
                "snapcache_s3_reads_shared_total",
                "Reads that joined an identical S3 read already in flight instead of \
                 reading the same bytes from S3 again.",
            ),
            disk_unfit: gauge(
                "snapcache_disk_tier_unfit_snapshots",
                "Snapshot revisions the filesystem had no room for, served from S3 uncached \
                 (a fill is tried again after 10 minutes).",
            ),
            memory_limit: gauge(
                "snapcache_memory_limit_bytes",
                "The container's cgroup memory limit; 0 when it has none.",
            ),
            ready: gauge(
                "snapcache_ready",
                "1 when the sidecar can serve (what /readyz says: the disk tier, if any, \
                 takes files), else 0. S3 health is snapcache_s3_up.",
            ),
            s3_health: S3Health::new(&registry),
            connections_open: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "snapcache_connections_open",
                        "Open client connections, by port (api, admin).",
                    ),
                    &["port"],
                ),
            ),
            connections_refused: counter_vec(
                "snapcache_connections_refused_total",
                "Connections answered 503 and closed because the port held its maximum.",
                &["port"],
            ),
            parallel_get_buffered: gauge(
                "snapcache_parallel_get_buffered_bytes",
                "Bytes held in parallel-GET chunk buffers now.",
            ),
            parallel_get_buffered_high_water: gauge(
                "snapcache_parallel_get_buffered_bytes_high_water",
                "The most bytes held in parallel-GET chunk buffers at once since start.",
            ),
            parallel_get_part_retries: counter(
                "snapcache_parallel_get_part_retries_total",
                "Parallel-GET parts retried after a timeout or a transient error.",
            ),
            disk_read_buffered: gauge(
                "snapcache_disk_read_buffered_bytes",
                "Bytes held in disk tier read blocks now (bounded by --disk-read-budget).",
            ),
            disk_read_buffered_high_water: gauge(
                "snapcache_disk_read_buffered_bytes_high_water",
                "The most bytes held in disk tier read blocks at once since start.",
            ),
            buffered_now: Arc::default(),
            buffered_high_water: Arc::default(),
            pin_precondition_failed: counter(
                "snapcache_pin_precondition_failed_total",
                "412s served on pinned reads: the pinned revision is gone.",
            ),
            heap_allocated: gauge(
                "snapcache_heap_allocated_bytes",
                "Bytes allocated by the application (jemalloc stats.allocated).",
            ),
            heap_resident: gauge(
                "snapcache_heap_resident_bytes",
                "Bytes in physically resident allocator pages (jemalloc stats.resident).",
            ),
            fill_duration,
            started: gauge(
                "snapcache_started",
                "1 once /startupz answers 200: the checkouts of serve --checkout are in \
                 place (or failed, when optional) and the sidecar is ready.",
            ),
            checkouts: counter_vec(
                "snapcache_checkouts_total",
                "serve --checkout: finished checkouts by result (succeeded, failed, \
                 optional_failed) and reason (why failed: not_found, kept_changing, corrupt, \
                 s3_unreachable, usage, other).",
                &["result", "reason"],
            ),
            checkout_duration,
            checkout_bytes: counter(
                "snapcache_checkout_bytes_total",
                "serve --checkout: snapshot bytes the finished checkouts downloaded.",
            ),
            checkout_restarts: counter(
                "snapcache_checkout_restarts_total",
                "serve --checkout: downloads restarted because the snapshot changed \
                 meanwhile (412).",
            ),
            checkout_bundles_applied: counter(
                "snapcache_checkout_bundles_applied_total",
                "serve --checkout: checkouts brought to the newest commit with a delta bundle.",
            ),
            registry,
        };
        for result in ["shared", "fallback"] {
            metrics.shared_tree_publishes.with_label_values(&[result]);
        }
        // Both ports' series exist from the start, so rate() and alerts see zeros.
        for port in [Port::Api, Port::Admin] {
            metrics.connections_open.with_label_values(&[port.label()]);
            metrics
                .connections_refused
                .with_label_values(&[port.label()]);
        }
        metrics
    }

    pub fn connection_opened(&self, port: Port) -> OpenConnection {
        let gauge = self.connections_open.with_label_values(&[port.label()]);
        gauge.inc();
        OpenConnection(gauge)
    }

    pub fn connection_refused(&self, port: Port) {
        self.connections_refused
            .with_label_values(&[port.label()])
            .inc();
    }

    pub fn count_response_bytes(&self, source: Source, bytes: u64) {
        self.response_bytes
            .with_label_values(&[source.label()])
            .inc_by(bytes);
    }

    pub fn count_node_tier_fallback(&self, reason: &'static str) {
        self.node_tier_fallbacks.with_label_values(&[reason]).inc();
    }

    /// A checkout volume published: `shared` tree or `fallback` directory.
    pub fn count_shared_tree_publish(&self, shared: bool) {
        let result = if shared { "shared" } else { "fallback" };
        self.shared_tree_publishes
            .with_label_values(&[result])
            .inc();
    }

    /// The value of one sample, e.g. `snapcache_x_total{reason="y"}`; 0 before it has one.
    #[cfg(test)]
    pub fn sample(&self, sample: &str) -> f64 {
        let prefix = format!("{sample} ");
        self.render()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Makes every series of `snapcache_checkouts_total` exist at 0 before the first
    /// checkout ends, so rate() and alerts see them: one per failure `reasons`.
    pub fn expect_checkouts(&self, reasons: &[&str]) {
        self.checkouts.with_label_values(&["succeeded", ""]);
        for reason in reasons {
            self.checkouts.with_label_values(&["failed", reason]);
            self.checkouts
                .with_label_values(&["optional_failed", reason]);
        }
    }

    /// One checkout of `serve --checkout` has ended after `seconds`.
    pub fn count_checkout(&self, result: CheckoutResult, seconds: f64) {
        self.checkout_duration.observe(seconds);
        match result {
            CheckoutResult::Succeeded {
                bytes,
                restarts,
                bundle_applied,
            } => {
                self.checkouts.with_label_values(&["succeeded", ""]).inc();
                self.checkout_bytes.inc_by(bytes);
                self.checkout_restarts.inc_by(u64::from(restarts));
                self.checkout_bundles_applied
                    .inc_by(u64::from(bundle_applied));
            }
            CheckoutResult::Failed { reason, optional } => {
                let result = if optional {
                    "optional_failed"
                } else {
                    "failed"
                };
                self.checkouts.with_label_values(&[result, reason]).inc();
            }
        }
    }

    pub fn count_lookup(&self, result: &'static str) {
        self.tier_lookups.with_label_values(&[result]).inc();
    }

    pub fn observe_fill(&self, seconds: f64) {
        self.fill_duration.observe(seconds);
    }

    /// Adds `delta` (negative to release) to a buffered-bytes gauge and its high-water mark.
    pub fn add_buffered(&self, buffers: Buffers, delta: i64) {
        let index = buffers as usize;
        let now = self.buffered_now[index].fetch_add(delta, Ordering::SeqCst) + delta;
        self.buffered_high_water[index].fetch_max(now, Ordering::SeqCst);
        match buffers {
            Buffers::ParallelGet => self.parallel_get_buffered.add(delta),
            Buffers::DiskRead => self.disk_read_buffered.add(delta),
        }
    }

    /// The most bytes held in buffers of this kind at once since start.
    pub fn buffered_high_water(&self, buffers: Buffers) -> i64 {
        self.buffered_high_water[buffers as usize].load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition of every metric, with fresh heap figures.
    pub fn render(&self) -> String {
        self.refresh_heap();
        self.parallel_get_buffered_high_water
            .set(self.buffered_high_water(Buffers::ParallelGet));
        self.disk_read_buffered_high_water
            .set(self.buffered_high_water(Buffers::DiskRead));
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn refresh_heap(&self) {
        use tikv_jemalloc_ctl::{epoch, stats};
        // jemalloc caches its statistics until the epoch advances.
        if epoch::advance().is_ok() {
            if let Ok(allocated) = stats::allocated::read() {
                self.heap_allocated.set(allocated as i64);
            }
            if let Ok(resident) = stats::resident::read() {
                self.heap_resident.set(resident as i64);
            }
        }
    }
}

/// Registers a metric built from constant, valid definitions: a failure is a bug here.
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("metric definitions are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(metrics: &Metrics, name: &str) -> f64 {
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} is not exported"))
    }

    #[test]
    fn s3_is_up_until_a_request_fails() {
        let metrics = Metrics::new();
        assert_eq!(
            sample(&metrics, "snapcache_s3_up"),
            1.0,
            "no evidence of a failure yet"
        );
        assert_eq!(
            sample(&metrics, "snapcache_s3_last_success_timestamp_seconds"),
            0.0
        );
    }

    #[test]
    fn failures_count_in_a_row_with_their_reason_until_an_answer() {
        let metrics = Metrics::new();
        metrics
            .s3_health
            .record(Health::Failed(S3Failure::Unreachable));
        metrics
            .s3_health
            .record(Health::Failed(S3Failure::AccessDenied));
        assert_eq!(sample(&metrics, "snapcache_s3_up"), 0.0);
        assert_eq!(sample(&metrics, "snapcache_s3_consecutive_failures"), 2.0);
        assert_eq!(
            sample(&metrics, "snapcache_s3_failing{reason=\"access_denied\"}"),
            1.0
        );
        assert_eq!(
            sample(&metrics, "snapcache_s3_failing{reason=\"unreachable\"}"),
            0.0,
            "only the latest reason is failing"
        );
        assert!(sample(&metrics, "snapcache_s3_last_failure_timestamp_seconds") > 0.0);

        metrics.s3_health.record(Health::Inconclusive);
        assert_eq!(
            sample(&metrics, "snapcache_s3_up"),
            0.0,
            "a 404 clears no failure"
        );
        metrics.s3_health.record(Health::Answered);
        assert_eq!(sample(&metrics, "snapcache_s3_up"), 1.0);
        assert_eq!(sample(&metrics, "snapcache_s3_consecutive_failures"), 0.0);
        assert_eq!(
            sample(&metrics, "snapcache_s3_failing{reason=\"access_denied\"}"),
            0.0
        );
        assert!(sample(&metrics, "snapcache_s3_last_success_timestamp_seconds") > 0.0);
    }
}
