//! `make bench`: the sidecar measured against a peer in the same run, printed as ratios.
//!
//! 1. Disk tier vs nginx (sendfile) serving the same 1 GiB file from the page cache.
//! 2. Parallel-GET memory with a consumer throttled to 50 MB/s.
//! 3. A cold S3-backed GET through the sidecar vs one direct single-stream GetObject.
//! 4. `snapcache-sidecar fetch` vs curl (one stream) vs aria2c (8 connections).
//! 5. Load (`load.rs`): wrk on small ranges, HEADs and pin probes vs nginx.
//! 6. Slow clients (`load.rs`): a GET beside 1000 slow connections; peak RSS under 200
//!    slow readers.
//! 7. The admission webhook (`webhook.rs`): pod creates with and without it on the node.
//! 8. Checkouts (`checkout.rs`): a pod with its repository ready vs `git clone` pods.

mod checkout;
mod load;
mod node;
mod webhook;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{TestEnv, create_bucket, snapshot_bytes, snapshot_key, unique_name};

const REPO: &str = "bench.example.com/org/big";
const PATH: &str = "/git/bench.example.com/org/big/snapshot.tar.zst";
const SIZE: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const HEAP_ALLOCATED: &str = "snapcache_heap_allocated_bytes";

#[tokio::main]
async fn main() -> Result<()> {
    // BENCH=throughput, memory, fetch, load, slow, webhook, checkout or node (comma-separated) runs those
    // parts; unset runs them all.
    let only = std::env::var("BENCH").unwrap_or_default();
    let selected = |name: &str| only.is_empty() || only.split(',').any(|n| n == name);
    let mut report = Vec::new();
    let needs_s3 = ["throughput", "fetch", "memory", "load", "slow"]
        .iter()
        .any(|part| selected(part));
    let webhook_report = if selected("webhook") {
        Some(webhook::webhook().await?)
    } else {
        None
    };
    let checkout_report = if selected("checkout") {
        Some(checkout::checkout().await?)
    } else {
        None
    };
    let node_report = if selected("node") {
        Some(node::node().await?)
    } else {
        None
    };
    if !needs_s3 {
        let mut missed = webhook_report.as_ref().is_some_and(webhook::print);
        missed |= checkout_report.as_ref().is_some_and(checkout::print);
        missed |= node_report.as_ref().is_some_and(node::print);
        if missed {
            bail!("a benchmark missed its target");
        }
        return Ok(());
    }

    let env = TestEnv::get();
    let server = env.s3_server("garage");
    let nginx_root = Path::new(env.require("NGINX_ROOT"));
    let nginx_url = format!("{}/snapshot.tar.zst", env.require("NGINX_URL"));

    println!("preparing a 1 GiB snapshot in Garage and in nginx's root");
    let file = nginx_root.join("snapshot.tar.zst");
    write_object_file(&file)?;
    let s3 = server.client();
    let bucket = unique_name("bench");
    create_bucket(&s3, &bucket).await;
    s3.put_object()
        .bucket(&bucket)
        .key(snapshot_key(REPO))
        .body(aws_sdk_s3::primitives::ByteStream::from_path(&file).await?)
        .send()
        .await
        .context("uploading the bench object")?;

    if selected("throughput") {
        report = throughput(&server, &s3, &bucket, &nginx_url).await?;
    }
    if selected("fetch") {
        report.extend(clients(&server, &bucket)?);
    }

    // 2. Parallel-GET memory: no disk tier, so the throttled client is the consumer.
    let mut memory = Vec::new();
    for (workers, chunk_mib) in [(4u16, 8u64), (8, 16)]
        .into_iter()
        .filter(|_| selected("memory"))
    {
        memory.push(throttled_memory(&server, &bucket, workers, chunk_mib).await?);
    }

    let load_report = if selected("load") {
        Some(load::load(&server, &bucket, &nginx_url).await?)
    } else {
        None
    };
    let slow_clients = if selected("slow") {
        Some(load::slow_clients(&server, &bucket).await?)
    } else {
        None
    };

    println!();
    println!(
        "{:<68} {:>10} {:>10} {:>7} {:>8}",
        "throughput (MB/s)", "snapcache", "peer", "ratio", "target"
    );
    let mut failed = false;
    for row in &report {
        let ratio = row.ours / row.peer;
        let verdict = match row.target {
            Some(target) if ratio >= target => format!(">={target} ok"),
            Some(target) => {
                failed = true;
                format!(">={target} MISSED")
            }
            None => "-".to_owned(),
        };
        println!(
            "{:<68} {:>10.0} {:>10.0} {:>7.2} {:>8}",
            row.label, row.ours, row.peer, ratio, verdict
        );
    }
    println!();
    println!(
        "{:<34} {:>14} {:>14} {:>10} {:>16} {:>10}",
        "parallel GET at 50 MB/s", "bound N x C", "high-water", "ratio", "peak RSS growth", "ratio"
    );
    for m in &memory {
        let bound = m.workers as f64 * m.chunk as f64;
        let hw_ratio = m.high_water as f64 / bound;
        let rss_ratio = m.rss_growth as f64 / bound;
        let ok = hw_ratio <= 1.0 && rss_ratio <= 1.1;
        failed |= !ok;
        println!(
            "{:<34} {:>11} MiB {:>10.1} MiB {:>10.2} {:>12.1} MiB {:>10.2} {}",
            format!("{} workers x {} MiB", m.workers, m.chunk / MIB),
            bound as u64 / MIB,
            m.high_water as f64 / MIB as f64,
            hw_ratio,
            m.rss_growth as f64 / MIB as f64,
            rss_ratio,
            if ok {
                "ok (targets <=1.00, <=1.10)"
            } else {
                "MISSED (targets <=1.00, <=1.10)"
            }
        );
    }
    if let Some(report) = &load_report {
        failed |= load::print(report);
    }
    if let Some(slow) = &slow_clients {
        failed |= load::print_slow(slow);
    }
    if let Some(report) = &webhook_report {
        failed |= webhook::print(report);
    }
    if let Some(report) = &checkout_report {
        failed |= checkout::print(report);
    }
    if let Some(report) = &node_report {
        failed |= node::print(report);
    }
    if failed {
        bail!("a benchmark missed its target");
    }
    Ok(())
}

/// Cold S3-backed GETs and disk-tier serving, each against its peer.
async fn throughput(
    server: &snapcache_tests::S3Server,
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    nginx_url: &str,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    // 3. Cold GET: direct GetObject before and after, so Garage's cache is equally warm.
    let direct_before = direct_get(s3, bucket).await?;
    let options = SidecarOptions {
        disk_max_bytes: "2GiB".into(),
        workers: 8,
        chunk_size: "16MiB".into(),
        ..SidecarOptions::default()
    };
    let passthrough = SidecarOptions {
        disk_tier: false,
        ..options.clone()
    };
    let passthrough = Sidecar::start(server, bucket, &passthrough);
    let cold_passthrough = curl(&passthrough.url(PATH), &[])?;
    drop(passthrough);
    let sidecar = Sidecar::start(server, bucket, &options);
    let cold = curl(&sidecar.url(PATH), &[])?;
    let direct_after = direct_get(s3, bucket).await?;
    let direct = (direct_before + direct_after) / 2.0;
    rows.push(Row::new(
        "cold GET, no disk tier: sidecar (parallel GET) vs direct GetObject",
        cold_passthrough,
        direct,
        None,
    ));
    rows.push(Row::new(
        "cold GET: sidecar (parallel GET + disk fill) vs direct GetObject",
        cold,
        direct,
        None,
    ));
    let disk_write = sequential_write(sidecar.disk_dir())?;
    rows.push(Row::new(
        "cold GET: sidecar (parallel GET + disk fill) vs this disk's write speed",
        cold,
        disk_write,
        None,
    ));

    // 1. Disk tier vs nginx, page cache warm for both (the same bytes, read once above).
    let sidecar_one = || curl(&sidecar.url(PATH), &[]);
    let nginx_one = || curl(nginx_url, &[]);
    let [sidecar_one, nginx_one] = median_of_interleaved(5, [&sidecar_one, &nginx_one])?;
    rows.push(Row::new(
        "disk tier, one stream: sidecar vs nginx",
        sidecar_one,
        nginx_one,
        Some(0.9),
    ));
    let sidecar_four = || parallel_ranges(&sidecar.url(PATH), 4);
    let nginx_four = || parallel_ranges(nginx_url, 4);
    let [sidecar_four, nginx_four] = median_of_interleaved(5, [&sidecar_four, &nginx_four])?;
    rows.push(Row::new(
        "disk tier, 4 parallel ranges: sidecar vs nginx",
        sidecar_four,
        nginx_four,
        None,
    ));
    Ok(rows)
}

/// `fetch` against curl and aria2c, downloading through one sidecar with no disk tier,
/// so every client reads the same path (S3) and writes to tmpfs (not the disk).
fn clients(server: &snapcache_tests::S3Server, bucket: &str) -> Result<Vec<Row>> {
    let options = SidecarOptions {
        disk_tier: false,
        workers: 8,
        chunk_size: "16MiB".into(),
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(server, bucket, &options);
    let url = sidecar.url(PATH);
    let out_dir = tempfile::tempdir_in("/dev/shm").context("a tmpfs directory in /dev/shm")?;
    let output = out_dir.path().join("snapshot.tar.zst");
    let fetch = || {
        let started = Instant::now();
        let status = Command::new(snapcache_tests::sidecar::sidecar_binary())
            .args(["fetch", &url, "-o"])
            .arg(&output)
            .status()?;
        anyhow::ensure!(status.success(), "fetch failed: {status}");
        anyhow::ensure!(
            std::fs::metadata(&output)?.len() == SIZE,
            "fetch wrote a short file"
        );
        Ok(mb_per_s(SIZE, started.elapsed()))
    };
    let curl_one = || curl_to(&url, &output, &[]);
    let aria2c = || {
        let _ = std::fs::remove_file(&output);
        let started = Instant::now();
        let status = Command::new("aria2c")
            .args([
                "-q",
                "-x8",
                "-s8",
                "-k1M",
                "--allow-overwrite=true",
                "--file-allocation=none",
            ])
            .arg("-d")
            .arg(out_dir.path())
            .args(["-o", "snapshot.tar.zst", &url])
            .status()
            .context("running aria2c")?;
        anyhow::ensure!(status.success(), "aria2c failed: {status}");
        anyhow::ensure!(
            std::fs::metadata(&output)?.len() == SIZE,
            "aria2c wrote a short file"
        );
        Ok(mb_per_s(SIZE, started.elapsed()))
    };
    // Round by round, so a slow spell of the S3 server hits every client alike.
    let [fetch, curl_one, aria2c] = median_of_interleaved(5, [&fetch, &curl_one, &aria2c])?;
    Ok(vec![
        Row::new(
            "fetch (8 pinned ranges) vs aria2c -x8 -s8, from S3 through the sidecar",
            fetch,
            aria2c,
            Some(1.0),
        ),
        Row::new(
            "fetch (8 pinned ranges) vs curl (one stream), from S3 through the sidecar",
            fetch,
            curl_one,
            Some(1.0),
        ),
    ])
}

struct Row {
    label: &'static str,
    ours: f64,
    peer: f64,
    target: Option<f64>,
}

impl Row {
    fn new(label: &'static str, ours: f64, peer: f64, target: Option<f64>) -> Row {
        Row {
            label,
            ours,
            peer,
            target,
        }
    }
}

struct Memory {
    workers: u16,
    chunk: u64,
    high_water: u64,
    rss_growth: u64,
}

/// The bench object, written once in 16 MiB blocks that differ from each other.
fn write_object_file(path: &Path) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == SIZE) {
        return Ok(());
    }
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for block in 0..SIZE / (16 * MIB) {
        out.write_all(&snapshot_bytes((16 * MIB) as usize, block))?;
    }
    Ok(out.flush()?)
}

/// MB/s of one GetObject read to the end through aws-sdk-s3 (one stream).
async fn direct_get(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<f64> {
    let started = Instant::now();
    let out = s3
        .get_object()
        .bucket(bucket)
        .key(snapshot_key(REPO))
        .send()
        .await?;
    let mut body = out.body;
    let mut total = 0u64;
    while let Some(bytes) = body.try_next().await? {
        total += bytes.len() as u64;
    }
    anyhow::ensure!(total == SIZE, "direct GetObject returned {total} bytes");
    Ok(mb_per_s(total, started.elapsed()))
}

/// MB/s of one curl download to /dev/null, checked for its size.
fn curl(url: &str, extra: &[&str]) -> Result<f64> {
    curl_to(url, Path::new("/dev/null"), extra)
}

/// A small text resource (a metrics scrape) fetched from a thread outside the runtime.
fn curl_text(url: &str) -> Result<String> {
    let out = Command::new("curl").args(["-sf", url]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// MB/s of one curl download to `output`, checked for its size.
fn curl_to(url: &str, output: &Path, extra: &[&str]) -> Result<f64> {
    let out = Command::new("curl")
        .args(["-sS", "-f", "-w", "%{size_download} %{time_total}", "-o"])
        .arg(output)
        .args(extra)
        .arg(url)
        .output()
        .context("running curl")?;
    anyhow::ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let size: u64 = fields.next().unwrap_or("0").parse()?;
    let seconds: f64 = fields.next().unwrap_or("0").parse()?;
    let expected = extra
        .iter()
        .any(|a| a.starts_with("bytes=") || *a == "--range");
    anyhow::ensure!(expected || size == SIZE, "curl {url} got {size} bytes");
    Ok(size as f64 / seconds / 1e6)
}

/// MB/s of the whole object fetched as `parts` concurrent ranges by separate curls.
fn parallel_ranges(url: &str, parts: u64) -> Result<f64> {
    let started = Instant::now();
    let part = SIZE / parts;
    let children = (0..parts)
        .map(|i| {
            let range = format!("{}-{}", i * part, (i + 1) * part - 1);
            Command::new("curl")
                .args(["-sS", "-f", "-o", "/dev/null", "--range", &range, url])
                .spawn()
                .context("running curl")
        })
        .collect::<Result<Vec<_>>>()?;
    for mut child in children {
        anyhow::ensure!(child.wait()?.success(), "a range download failed");
    }
    Ok(mb_per_s(SIZE, started.elapsed()))
}

/// MB/s of writing and syncing 1 GiB sequentially in `dir`: what bounds a disk fill.
fn sequential_write(dir: &Path) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("write-speed.tmp");
    let block = snapshot_bytes((16 * MIB) as usize, 99);
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..SIZE / (16 * MIB) {
        file.write_all(&block)?;
    }
    file.sync_data()?;
    let speed = mb_per_s(SIZE, started.elapsed());
    std::fs::remove_file(&path)?;
    Ok(speed)
}

/// The median of `rounds` runs of each measurement, taking turns, so a slow spell of
/// the machine hits every contender alike.
fn median_of_interleaved<const N: usize>(
    rounds: usize,
    measures: [&dyn Fn() -> Result<f64>; N],
) -> Result<[f64; N]> {
    let mut samples: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..rounds {
        for (samples, measure) in samples.iter_mut().zip(measures) {
            samples.push(measure()?);
        }
    }
    Ok(samples.map(|samples| median(&samples)))
}

/// The middle sample (the mean of the two middle ones for an even count).
fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// High-water of the buffered-bytes gauge and peak RSS growth for one full S3 read
/// consumed at 50 MB/s by curl, with a fresh sidecar and no disk tier.
async fn throttled_memory(
    server: &snapcache_tests::S3Server,
    bucket: &str,
    workers: u16,
    chunk_mib: u64,
) -> Result<Memory> {
    let options = SidecarOptions {
        disk_tier: false,
        workers,
        chunk_size: format!("{chunk_mib}MiB"),
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(server, bucket, &options);
    // Small ranged reads first, one per worker: the S3 client's lazy set-up and its
    // connections are not the parallel GET's buffering.
    let url = sidecar.url(PATH);
    std::thread::scope(|scope| {
        let warm_ups: Vec<_> = (0..workers)
            .map(|_| scope.spawn(|| curl(&url, &["--range", "0-1023"])))
            .collect();
        warm_ups.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("warm-up panicked")))
                .map(drop)
        })
    })?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heap_before = Sidecar::metric(&sidecar.metrics().await, HEAP_ALLOCATED);
    let pid = sidecar.pid();
    let before = proc_status_kib(pid, "VmHWM:")?;
    let anon_before = proc_status_kib(pid, "RssAnon:")?;
    let file_before = proc_status_kib(pid, "RssFile:")?;
    println!("parallel GET {workers} x {chunk_mib} MiB: 1 GiB at 50 MB/s (about 21 s)");
    let done = std::sync::atomic::AtomicBool::new(false);
    let (anon_peak, file_peak, heap_peak) = std::thread::scope(|scope| {
        let metrics_url = sidecar.admin_url("/metrics");
        let done = &done;
        let sampler = scope.spawn(move || {
            let (mut anon, mut file, mut heap) = (0, 0, 0f64);
            for round in 0.. {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                anon = anon.max(proc_status_kib(pid, "RssAnon:").unwrap_or(0));
                file = file.max(proc_status_kib(pid, "RssFile:").unwrap_or(0));
                // The heap figure costs a scrape: every tenth round is enough.
                if round % 10 == 0 {
                    let text = curl_text(&metrics_url).unwrap_or_default();
                    heap = heap.max(Sidecar::metric(&text, HEAP_ALLOCATED));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (anon, file, heap)
        });
        let result = curl(&sidecar.url(PATH), &["--limit-rate", "50000000"]);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        result.map(|_| sampler.join().unwrap_or((0, 0, 0.0)))
    })?;
    println!(
        "  sampled peaks above the start: anonymous {:.1} MiB, file-backed {:.1} MiB, jemalloc allocated {:.1} MiB",
        anon_peak.saturating_sub(anon_before) as f64 / 1024.0,
        file_peak.saturating_sub(file_before) as f64 / 1024.0,
        (heap_peak - heap_before) / MIB as f64
    );
    let peak = proc_status_kib(pid, "VmHWM:")?;
    let metrics = sidecar.metrics().await;
    let high_water =
        Sidecar::metric(&metrics, "snapcache_parallel_get_buffered_bytes_high_water") as u64;
    Ok(Memory {
        workers,
        chunk: chunk_mib * MIB,
        high_water,
        rss_growth: peak.saturating_sub(before) * 1024,
    })
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}
