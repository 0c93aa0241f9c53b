//! Prometheus metrics of the sidecar. Every label has a small fixed set of values:
//! never a repository name or a raw path.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Where the bytes of a response came from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Disk,
    S3,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Disk => "disk",
            Source::S3 => "s3",
        }
    }
}

/// All metrics of one sidecar process, registered in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route (`snapshot`, `other`) and status class (`2xx`...).
    pub requests: IntCounterVec,
    /// Body bytes sent to clients, by source.
    response_bytes: IntCounterVec,
    /// Disk tier lookups by result (`hit`, `miss`, `stale`).
    tier_lookups: IntCounterVec,
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
    /// The container's memory limit, 0 when unlimited.
    pub memory_limit: IntGauge,
    /// 1 while /readyz answers 200, as of the last probe or scrape.
    pub ready: IntGauge,
    /// Bytes held in parallel-GET chunk buffers now.
    pub parallel_get_buffered: IntGauge,
    parallel_get_buffered_high_water: IntGauge,
    // Exact running figures; gauges alone cannot take a race-free maximum.
    buffered_now: Arc<AtomicI64>,
    buffered_high_water: Arc<AtomicI64>,
    /// Parallel-GET parts retried after a timeout or a transient error.
    pub parallel_get_part_retries: IntCounter,
    /// 412s served on pinned reads.
    pub pin_precondition_failed: IntCounter,
    heap_allocated: IntGauge,
    heap_resident: IntGauge,
    fill_duration: Histogram,
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

        Metrics {
            requests: counter_vec(
                "snapcache_http_requests_total",
                "Snapshot API requests by route and status class.",
                &["route", "status_class"],
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
            memory_limit: gauge(
                "snapcache_memory_limit_bytes",
                "The container's cgroup memory limit; 0 when it has none.",
            ),
            ready: gauge(
                "snapcache_ready",
                "1 when S3 answers and the disk tier takes files (what /readyz says), else 0.",
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
            registry,
        }
    }

    pub fn count_response_bytes(&self, source: Source, bytes: u64) {
        self.response_bytes
            .with_label_values(&[source.label()])
            .inc_by(bytes);
    }

    pub fn count_lookup(&self, result: &'static str) {
        self.tier_lookups.with_label_values(&[result]).inc();
    }

    pub fn observe_fill(&self, seconds: f64) {
        self.fill_duration.observe(seconds);
    }

    /// Adds `delta` (negative to release) to the buffered-bytes gauge and its high-water mark.
    pub fn add_buffered(&self, delta: i64) {
        let now = self.buffered_now.fetch_add(delta, Ordering::SeqCst) + delta;
        self.buffered_high_water.fetch_max(now, Ordering::SeqCst);
        self.parallel_get_buffered.add(delta);
    }

    /// The most bytes held in parallel-GET chunk buffers at once since start.
    pub fn buffered_high_water(&self) -> i64 {
        self.buffered_high_water.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition of every metric, with fresh heap figures.
    pub fn render(&self) -> String {
        self.refresh_heap();
        self.parallel_get_buffered_high_water
            .set(self.buffered_high_water());
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
