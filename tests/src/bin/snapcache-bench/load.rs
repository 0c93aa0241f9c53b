//! Many small requests and many slow clients against a cached snapshot: wrk against the
//! sidecar's disk tier and nginx serving the same file, the latency of a GET beside
//! 1000 slow connections, and peak RSS under 200 slow readers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snapcache_tests::S3Server;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};

use super::{PATH, curl, proc_status_kib};

/// The load generator: wrk, or ApacheBench for HEADs (wrk waits for a body after a HEAD
/// answer that carries a Content-Length, so it stalls on every one).
#[derive(Clone, Copy)]
enum Tool {
    Wrk,
    Ab,
}

/// One kind of request, sent the same way to both servers.
struct Kind {
    label: &'static str,
    tool: Tool,
    method: &'static str,
    /// Headers for the sidecar and for nginx.
    ours: &'static [(&'static str, &'static str)],
    peer: &'static [(&'static str, &'static str)],
    /// Least ratio of requests per second against nginx, where there is a target.
    target: Option<f64>,
}

const KINDS: [Kind; 3] = [
    Kind {
        label: "GET 64 KiB range (disk tier vs nginx), wrk",
        tool: Tool::Wrk,
        method: "GET",
        ours: &[("Range", "bytes=0-65535")],
        peer: &[("Range", "bytes=0-65535")],
        target: Some(0.5),
    },
    Kind {
        label: "HEAD (disk tier vs nginx), ab",
        tool: Tool::Ab,
        method: "HEAD",
        ours: &[],
        peer: &[],
        target: None,
    },
    Kind {
        label: "pin probe (asks S3 each time) vs nginx HEAD, ab",
        tool: Tool::Ab,
        method: "HEAD",
        ours: &[("X-Cachew-Snapshot-Pin", "probe")],
        peer: &[],
        target: None,
    },
];

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
struct Run {
    requests_per_second: f64,
    p99_ms: f64,
    non_2xx: u64,
}

/// The medians of one kind's interleaved runs.
#[derive(Debug)]
pub struct LoadRow {
    pub label: &'static str,
    ours: Run,
    peer: Run,
    target: Option<f64>,
}

/// Slow clients' figures.
#[derive(Debug)]
pub struct SlowClients {
    get_alone_ms: f64,
    get_beside_slow_ms: f64,
    readers: usize,
    rss_growth: u64,
    budget: u64,
    disk_read_high_water: u64,
    heap_peak: u64,
}

pub struct LoadReport {
    rows: Vec<LoadRow>,
    rss_before: u64,
    rss_after: u64,
}

const CONNECTIONS: &str = "64";
const ROUNDS: usize = 3;
const SLOW_READERS: usize = 200;
const SLOW_CONNECTIONS: usize = 1000;
const DISK_READ_BUDGET: u64 = 64 << 20;

pub async fn load(server: &S3Server, bucket: &str, nginx_url: &str) -> Result<LoadReport> {
    let seconds: u64 = std::env::var("BENCH_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let options = SidecarOptions {
        disk_max_bytes: "2GiB".into(),
        workers: 8,
        chunk_size: "16MiB".into(),
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(server, bucket, &options);
    println!("load: filling the disk tier with the 1 GiB snapshot");
    curl(&sidecar.url(PATH), &[])?;
    wait_for_entry(&sidecar).await?;
    let scripts = tempfile::tempdir()?;
    let rss_before = proc_status_kib(sidecar.pid(), "VmRSS:")? * 1024;
    let mut rows = Vec::new();
    for kind in &KINDS {
        let ours_script = wrk_script(scripts.path(), "ours", kind.method, kind.ours)?;
        let peer_script = wrk_script(scripts.path(), "peer", kind.method, kind.peer)?;
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            println!(
                "load: {} round {} ({seconds} s each)",
                kind.label,
                round + 1
            );
            // Alternate who goes first: neither always meets a warmer machine.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_ours in order {
                let (url, script, headers, runs) = if is_ours {
                    (sidecar.url(PATH), &ours_script, kind.ours, &mut ours)
                } else {
                    (nginx_url.to_owned(), &peer_script, kind.peer, &mut peer)
                };
                runs.push(match kind.tool {
                    Tool::Wrk => wrk(&url, script, seconds)?,
                    Tool::Ab => ab_head(&url, headers, seconds)?,
                });
            }
        }
        rows.push(LoadRow {
            label: kind.label,
            ours: median_run(&ours),
            peer: median_run(&peer),
            target: kind.target,
        });
    }
    let rss_after = proc_status_kib(sidecar.pid(), "VmRSS:")? * 1024;
    Ok(LoadReport {
        rows,
        rss_before,
        rss_after,
    })
}

/// Prints the report; `true` when a target was missed.
pub fn print(report: &LoadReport) -> bool {
    let mut missed = false;
    println!();
    println!(
        "{:<46} {:>11} {:>11} {:>6} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "wrk, 64 connections (medians)",
        "req/s ours",
        "req/s peer",
        "ratio",
        "p99 ours",
        "p99 peer",
        "non-2xx",
        "peer",
        "target"
    );
    for row in &report.rows {
        let ratio = row.ours.requests_per_second / row.peer.requests_per_second;
        let verdict = match row.target {
            Some(target) if ratio >= target && row.ours.non_2xx == 0 => format!(">={target} ok"),
            Some(target) => {
                missed = true;
                format!(">={target} MISSED")
            }
            None if row.ours.non_2xx > 0 => {
                missed = true;
                "non-2xx!".to_owned()
            }
            None => "-".to_owned(),
        };
        println!(
            "{:<46} {:>11.0} {:>11.0} {:>6.2} {:>7.2}ms {:>7.2}ms {:>8} {:>8} {:>10}",
            row.label,
            row.ours.requests_per_second,
            row.peer.requests_per_second,
            ratio,
            row.ours.p99_ms,
            row.peer.p99_ms,
            row.ours.non_2xx,
            row.peer.non_2xx,
            verdict
        );
    }
    println!(
        "sidecar RSS before the wrk runs {:.1} MiB, after {:.1} MiB",
        report.rss_before as f64 / f64::from(1 << 20),
        report.rss_after as f64 / f64::from(1 << 20)
    );
    missed
}

/// Prints the slow clients' figures; `true` when a target was missed.
pub fn print_slow(slow: &SlowClients) -> bool {
    let mut missed = false;
    println!(
        "GET of 64 KiB: median {:.2} ms alone, {:.2} ms beside {SLOW_CONNECTIONS} slow connections (delay {:+.2} ms, target <100 ms)",
        slow.get_alone_ms,
        slow.get_beside_slow_ms,
        slow.get_beside_slow_ms - slow.get_alone_ms
    );
    if slow.get_beside_slow_ms - slow.get_alone_ms >= 100.0 {
        missed = true;
    }
    let bound = slow.budget + (32 << 20);
    let ok = slow.rss_growth <= bound;
    missed |= !ok;
    println!(
        "{} slow readers of the cached 1 GiB snapshot at 1 KiB/s: peak RSS growth {:.1} MiB (bound: disk read budget {} MiB + 32 MiB) {}",
        slow.readers,
        slow.rss_growth as f64 / f64::from(1 << 20),
        slow.budget >> 20,
        if ok { "ok" } else { "MISSED" }
    );
    println!(
        "  disk read blocks high-water {:.1} MiB, jemalloc allocated peak seen {:.1} MiB",
        slow.disk_read_high_water as f64 / f64::from(1 << 20),
        slow.heap_peak as f64 / f64::from(1 << 20)
    );
    missed
}

async fn wait_for_entry(sidecar: &Sidecar) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let metrics = sidecar.metrics().await;
        if Sidecar::metric(&metrics, "snapcache_disk_tier_entries") >= 1.0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the disk tier did not keep the snapshot within 120 s")
}

/// A wrk Lua script sending `method` with `headers`.
fn wrk_script(
    dir: &Path,
    name: &str,
    method: &str,
    headers: &[(&str, &str)],
) -> Result<std::path::PathBuf> {
    let mut script = format!("wrk.method = \"{method}\"\n");
    for (name, value) in headers {
        script.push_str(&format!("wrk.headers[\"{name}\"] = \"{value}\"\n"));
    }
    let path = dir.join(format!("{name}-{}.lua", method.to_lowercase()));
    std::fs::write(&path, script)?;
    Ok(path)
}

fn wrk(url: &str, script: &Path, seconds: u64) -> Result<Run> {
    let out = Command::new("wrk")
        .args(["-t", "2", "-c", CONNECTIONS, "--latency"])
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk (Debian package wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's report:\n{text}"))
}

fn ab_head(url: &str, headers: &[(&str, &str)], seconds: u64) -> Result<Run> {
    let mut command = Command::new("ab");
    command
        .args(["-i", "-k", "-q", "-c", CONNECTIONS, "-n", "100000000"])
        .arg("-t")
        .arg(seconds.to_string());
    for (name, value) in headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    let out = command
        .arg(url)
        .output()
        .context("running ab (Debian package apache2-utils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("ab failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_ab(&text).with_context(|| format!("reading ab's report:\n{text}"))
}

fn parse_ab(text: &str) -> Option<Run> {
    let field = |prefix: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_second = field("Requests per second:")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let p99_ms = field("99%")?.parse().ok()?;
    let non_2xx = field("Non-2xx responses:").map_or(Some(0), |n| n.parse().ok())?;
    Some(Run {
        requests_per_second,
        p99_ms,
        non_2xx,
    })
}

fn parse_wrk(text: &str) -> Option<Run> {
    let field = |prefix: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_second = field("Requests/sec:")?.parse().ok()?;
    let p99 = field("99%")?;
    let p99_ms = if let Some(us) = p99.strip_suffix("us") {
        us.parse::<f64>().ok()? / 1000.0
    } else if let Some(ms) = p99.strip_suffix("ms") {
        ms.parse().ok()?
    } else {
        p99.strip_suffix('s')?.parse::<f64>().ok()? * 1000.0
    };
    let non_2xx = field("Non-2xx or 3xx responses:").map_or(Some(0), |n| n.parse().ok())?;
    Some(Run {
        requests_per_second,
        p99_ms,
        non_2xx,
    })
}

fn median_run(runs: &[Run]) -> Run {
    let median = |pick: fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Run {
        requests_per_second: median(|r| r.requests_per_second),
        p99_ms: median(|r| r.p99_ms),
        non_2xx: runs.iter().map(|r| r.non_2xx).sum(),
    }
}

/// The median time of 21 GETs of a 64 KiB range.
fn median_get_ms(api: SocketAddr) -> Result<f64> {
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: localhost\r\nRange: bytes=0-65535\r\nConnection: close\r\n\r\n"
    );
    let mut times = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        let mut stream = TcpStream::connect(api)?;
        stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if !answer.starts_with(b"HTTP/1.1 206") || answer.len() < 65536 {
            bail!("the timed GET did not get its 206");
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

pub async fn slow_clients(server: &S3Server, bucket: &str) -> Result<SlowClients> {
    let options = SidecarOptions {
        disk_max_bytes: "2GiB".into(),
        extra_args: vec![
            "--disk-read-budget".into(),
            format!("{DISK_READ_BUDGET}"),
            "--header-read-timeout".into(),
            "60s".into(),
        ],
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(server, bucket, &options);
    curl(&sidecar.url(PATH), &[])?;
    wait_for_entry(&sidecar).await?;

    println!(
        "slow clients: a GET beside {SLOW_CONNECTIONS} connections that never finish their request"
    );
    let get_alone_ms = median_get_ms(sidecar.api)?;
    let slowloris: Vec<TcpStream> = (0..SLOW_CONNECTIONS)
        .map(|_| {
            let mut stream = TcpStream::connect(sidecar.api)?;
            stream.write_all(b"GET / HTTP/1.1\r\nHo")?;
            Ok(stream)
        })
        .collect::<Result<_>>()?;
    let get_beside_slow_ms = median_get_ms(sidecar.api)?;
    drop(slowloris);

    println!("slow clients: {SLOW_READERS} readers of the 1 GiB snapshot at 1 KiB/s for 20 s");
    let before = proc_status_kib(sidecar.pid(), "VmHWM:")?;
    let request = format!("GET {PATH} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut readers: Vec<TcpStream> = (0..SLOW_READERS)
        .map(|_| {
            let mut stream = TcpStream::connect(sidecar.api)?;
            stream.write_all(request.as_bytes())?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            Ok(stream)
        })
        .collect::<Result<_>>()?;
    let mut buffer = [0u8; 1024];
    let mut heap_peak = 0f64;
    for _ in 0..20 {
        let second = Instant::now();
        for reader in &mut readers {
            reader.read_exact(&mut buffer)?;
        }
        let metrics = sidecar.metrics().await;
        heap_peak = heap_peak.max(Sidecar::metric(&metrics, "snapcache_heap_allocated_bytes"));
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(second.elapsed())).await;
    }
    let peak = proc_status_kib(sidecar.pid(), "VmHWM:")?;
    let metrics = sidecar.metrics().await;
    drop(readers);
    Ok(SlowClients {
        get_alone_ms,
        get_beside_slow_ms,
        readers: SLOW_READERS,
        rss_growth: peak.saturating_sub(before) * 1024,
        budget: DISK_READ_BUDGET,
        disk_read_high_water: Sidecar::metric(
            &metrics,
            "snapcache_disk_read_buffered_bytes_high_water",
        ) as u64,
        heap_peak: heap_peak as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ab_reports_are_read() {
        let text = "Complete requests:      5000\nNon-2xx responses:      3\nRequests per second:    12345.67 [#/sec] (mean)\n  98%      4\n  99%      7\n 100%     20 (longest request)\n";
        let run = parse_ab(text).expect("parsed");
        assert_eq!(run.requests_per_second, 12345.67);
        assert_eq!(run.p99_ms, 7.0);
        assert_eq!(run.non_2xx, 3);
    }

    #[test]
    fn wrk_reports_are_read() {
        let text = "Running 20s test @ http://127.0.0.1:1/x\n  Latency Distribution\n     50%  1.00ms\n     99%  812.00us\n  123 requests in 20.00s\nRequests/sec:  32912.51\nTransfer/sec:  1.00GB\n";
        let run = parse_wrk(text).expect("parsed");
        assert_eq!(run.requests_per_second, 32912.51);
        assert!((run.p99_ms - 0.812).abs() < 1e-9);
        assert_eq!(run.non_2xx, 0);
        let failing = format!("{text}  Non-2xx or 3xx responses: 7\n     99%  1.5s\n");
        assert_eq!(parse_wrk(&failing).map(|r| r.non_2xx), Some(7));
    }
}
