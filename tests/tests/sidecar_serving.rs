//! The sidecar's behaviour around the ranges: path rules, revalidation, single flight
//! (a disk tier fill or a shared S3 read), revisions never mixed, disconnects, S3
//! outages, SIGTERM and the metrics format.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use snapcache_tests::proxy::CutProxy;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, put_snapshot, snapshot_bytes, unique_name,
};
use tokio::net::TcpStream;

const REPO: &str = "example.com/org/repo";
const PATH: &str = "/git/example.com/org/repo/snapshot.tar.zst";
const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

async fn bucket_with(server: &S3Server, body: &[u8]) -> String {
    let s3 = server.client();
    let bucket = unique_name("serving");
    create_bucket(&s3, &bucket).await;
    put_snapshot(&s3, &bucket, REPO, body, COMMIT).await;
    bucket
}

async fn get_all(sidecar: &Sidecar) -> (StatusCode, Vec<u8>) {
    let response = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    let status = response.status();
    (status, response.bytes().await.expect("body").to_vec())
}

/// Sends a raw request line so that no client library normalises the path first.
fn raw_status(sidecar: &Sidecar, path: &[u8]) -> u16 {
    let mut stream = std::net::TcpStream::connect(sidecar.api).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = b"GET ".to_vec();
    request.extend_from_slice(path);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(&request).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn bad_paths_get_400_and_never_reach_s3() {
    let server = &TestEnv::get().s3_servers()[0];
    let bucket = bucket_with(server, b"tiny").await;
    let sidecar = Sidecar::start(server, &bucket, &SidecarOptions::default());
    let long = format!("/git/example.com/{}/snapshot.tar.zst", "a".repeat(1100));
    let bad: Vec<&[u8]> = vec![
        b"/git/example.com//repo/snapshot.tar.zst",
        b"/git/example.com/./repo/snapshot.tar.zst",
        b"/git/example.com/../repo/snapshot.tar.zst",
        b"/git/example.com/%2e%2e/repo/snapshot.tar.zst",
        b"/git/example.com/org%2Frepo/snapshot.tar.zst",
        b"/git/example.com/org%2frepo/snapshot.tar.zst",
        b"/git/example.com/org%00/snapshot.tar.zst",
        b"/git/example.com/org%0a/snapshot.tar.zst",
        b"/git/example.com/org%7f/snapshot.tar.zst",
        b"/git/example.com/org/repo/other.tar.zst",
        b"/elsewhere/example.com/org/repo/snapshot.tar.zst",
        b"/git/snapshot.tar.zst",
        b"/git/example.com/snapshot.tar.zst",
        b"/git/example.com/org/%zz/snapshot.tar.zst",
        long.as_bytes(),
    ];
    for path in bad {
        assert_eq!(
            raw_status(&sidecar, path),
            400,
            "{}",
            String::from_utf8_lossy(path)
        );
    }
    sidecar.assert_no_s3_requests().await;
    assert_eq!(
        raw_status(&sidecar, PATH.as_bytes()),
        200,
        "the good path still works"
    );
}

#[tokio::test]
async fn replaced_object_is_served_after_revalidation() {
    for server in TestEnv::get().s3_servers() {
        let first = snapshot_bytes(300_000, 1);
        let second = snapshot_bytes(300_000, 2);
        let bucket = bucket_with(&server, &first).await;
        let with_interval = |interval: &str| SidecarOptions {
            revalidate_after: interval.into(),
            ..SidecarOptions::default()
        };
        // Two sidecars over the same object: one whose interval cannot run out during the
        // test, one whose interval the test waits out. Neither outcome depends on how fast
        // the steps in between happen to run.
        let within = Sidecar::start(&server, &bucket, &with_interval("1h"));
        let after = Sidecar::start(&server, &bucket, &with_interval("1s"));
        for sidecar in [&within, &after] {
            assert_eq!(get_all(sidecar).await.1, first, "{}", server.name);
            wait_until_committed(sidecar, first.len()).await;
        }
        // Both disk entries were validated (at their commit) before this instant.
        let committed = Instant::now();
        put_snapshot(&server.client(), &bucket, REPO, &second, COMMIT).await;

        // Within the revalidation interval the disk copy is served as it is, S3 unasked.
        let heads = head_requests(&within).await;
        assert_eq!(get_all(&within).await.1, first, "{}", server.name);
        assert_eq!(
            head_requests(&within).await,
            heads,
            "{}: no HeadObject within the interval",
            server.name
        );

        // Once the interval has run out, the next read revalidates and gets the new revision.
        tokio::time::sleep_until((committed + Duration::from_millis(1500)).into()).await;
        let (status, body) = get_all(&after).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body, second,
            "{}: new revision after revalidation",
            server.name
        );
        assert_eq!(
            get_all(&after).await.1,
            second,
            "{}: and from disk after",
            server.name
        );
    }
}

async fn head_requests(sidecar: &Sidecar) -> f64 {
    Sidecar::metric(
        &sidecar.metrics().await,
        "snapcache_s3_request_duration_seconds_count{operation=\"head\"}",
    )
}

/// Waits until the disk tier holds `len` committed bytes: a fill commits (fsync,
/// rename) just after the last byte reached the client.
async fn wait_until_committed(sidecar: &Sidecar, len: usize) {
    wait_until("the fill is committed", async || {
        let tier = Sidecar::metric(&sidecar.metrics().await, "snapcache_disk_tier_bytes");
        (tier == len as f64)
            .then_some(())
            .ok_or(format!("{tier} bytes on disk"))
    })
    .await;
}

/// Reads a whole body; `Ok` only when every byte of Content-Length arrived.
async fn read_all(url: String) -> Result<Vec<u8>, String> {
    let download = Download::start(url);
    download.finish().await.map_err(|(err, _)| err)
}

/// A whole body, or why it ended early with the bytes received before that.
type Body = Result<Vec<u8>, (String, Vec<u8>)>;

/// A GET of the whole snapshot read in the background, counting the bytes received.
struct Download {
    received: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Body>,
}

impl Download {
    fn start(url: String) -> Download {
        Download::spawn(url, None)
    }

    /// A download that stops reading once `hold_after` bytes arrived, until the sender
    /// it returns is used (or dropped).
    fn holding(url: String, hold_after: usize) -> (Download, tokio::sync::oneshot::Sender<()>) {
        let (release, released) = tokio::sync::oneshot::channel();
        (Download::spawn(url, Some((hold_after, released))), release)
    }

    fn spawn(url: String, hold: Option<(usize, tokio::sync::oneshot::Receiver<()>)>) -> Download {
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let mut hold = hold;
        let task = tokio::spawn(async move {
            let response = reqwest::get(url)
                .await
                .map_err(|e| (e.to_string(), Vec::new()))?;
            if response.status() != StatusCode::OK {
                return Err((format!("status {}", response.status()), Vec::new()));
            }
            let mut stream = response.bytes_stream();
            let mut body = Vec::new();
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => body.extend_from_slice(&chunk),
                    Err(err) => return Err((err.to_string(), body)),
                }
                counter.store(body.len(), Ordering::SeqCst);
                if hold.as_ref().is_some_and(|(after, _)| body.len() >= *after)
                    && let Some((_, released)) = hold.take()
                {
                    let _ = released.await;
                }
            }
            Ok(body)
        });
        Download { received, task }
    }

    /// Waits until at least `len` body bytes have arrived.
    async fn wait_for_bytes(&self, len: usize) {
        wait_until("the download's first bytes", async || {
            let received = self.received.load(Ordering::SeqCst);
            (received >= len)
                .then_some(())
                .ok_or(format!("{received} bytes received"))
        })
        .await;
    }

    /// The whole body, or the error with the bytes received before it.
    async fn finish(self) -> Body {
        self.task.await.expect("download task")
    }
}

/// The S3 errors a sidecar counted for one reason.
async fn s3_errors(sidecar: &Sidecar, reason: &str) -> f64 {
    Sidecar::metric(
        &sidecar.metrics().await,
        &format!("snapcache_s3_errors_total{{reason=\"{reason}\"}}"),
    )
}

/// A read of `old` through a sidecar whose S3 answers are held after `budget` bytes; the
/// object is replaced by `new` once `first_bytes` of `old` reached the client, and only
/// then are S3's answers released. Everything the parallel GET asks for after that
/// meets If-Match, so the read must be cut short, with only bytes of `old` before the cut.
/// The sidecar goes on reading S3 through the proxy, released.
async fn replace_mid_read(
    server: &S3Server,
    options: &SidecarOptions,
    old: &[u8],
    new: &[u8],
    budget: u64,
    first_bytes: usize,
) -> (Sidecar, CutProxy) {
    let bucket = bucket_with(server, old).await;
    let proxy = CutProxy::in_front_of(server).await;
    proxy.stall_after(budget);
    let sidecar = Sidecar::start_at(&proxy.url(), server, &bucket, options);
    let label = format!("{} disk={}", server.name, options.disk_tier);
    let download = Download::start(sidecar.url(PATH));
    download.wait_for_bytes(first_bytes).await;
    put_snapshot(&server.client(), &bucket, REPO, new, COMMIT).await;
    proxy.release();
    match download.finish().await {
        Ok(_) => panic!("{label}: a read cut by a replacement completed"),
        Err((_, received)) => assert!(
            received.len() >= first_bytes && received[..] == old[..received.len()],
            "{label}: the {} bytes before the cut are not the old revision's",
            received.len()
        ),
    }
    assert!(
        s3_errors(&sidecar, "precondition_failed").await >= 1.0,
        "{label}: the parts after the replacement must meet If-Match"
    );
    (sidecar, proxy)
}

#[tokio::test]
async fn replacement_during_a_cold_parallel_get_never_mixes_revisions() {
    for server in TestEnv::get().s3_servers() {
        let old = snapshot_bytes(8 << 20, 3);
        let new = snapshot_bytes(8 << 20, 4);
        for disk_tier in [false, true] {
            let options = SidecarOptions {
                disk_tier,
                workers: 2,
                chunk_size: "256KiB".into(),
                // Parts wait at the proxy while the object is replaced; only a hang may fail them.
                part_timeout: "60s".into(),
                ..SidecarOptions::default()
            };
            let label = format!("{} disk={disk_tier}", server.name);
            // At most about 2 MiB and the two parts in flight are read before the
            // replacement; the other 5.5 MiB or more are asked for after it.
            let (sidecar, _proxy) =
                replace_mid_read(&server, &options, &old, &new, 2 << 20, 1 << 20).await;
            if disk_tier {
                wait_until("the failed fill is cleaned up", async || {
                    let files = disk_files(&sidecar);
                    files.is_empty().then_some(()).ok_or(format!("{files:?}"))
                })
                .await;
            }
            // The next read is one whole revision: the new one.
            let (status, body) = get_all(&sidecar).await;
            assert_eq!(status, StatusCode::OK, "{label}");
            assert!(
                body == new,
                "{label}: not the new revision after the replacement"
            );
        }
    }
}

#[tokio::test]
async fn fill_cut_by_a_replacement_keeps_nothing_on_disk() {
    let server = &TestEnv::get().s3_servers()[0];
    let old = snapshot_bytes(8 << 20, 5);
    let new = snapshot_bytes(1 << 20, 6);
    // One 64 KiB part at a time, held after 512 KiB: the fill is mid-way when the object
    // is replaced.
    let options = SidecarOptions {
        workers: 1,
        chunk_size: "64KiB".into(),
        part_timeout: "60s".into(),
        ..SidecarOptions::default()
    };
    let (sidecar, _proxy) =
        replace_mid_read(server, &options, &old, &new, 512 << 10, 256 << 10).await;
    wait_until("the failed fill is cleaned up", async || {
        let files = disk_files(&sidecar);
        files.is_empty().then_some(()).ok_or(format!("{files:?}"))
    })
    .await;
    let (status, body) = get_all(&sidecar).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, new);
}

/// Each client got the whole object, and S3 sent its bytes exactly once.
async fn every_client_whole_from_one_s3_read(
    clients: Vec<tokio::task::JoinHandle<Result<Vec<u8>, String>>>,
    body: &[u8],
    sidecar: &Sidecar,
    server: &S3Server,
) {
    for client in clients {
        assert_eq!(
            client.await.expect("client task").as_deref(),
            Ok(body),
            "{}",
            server.name
        );
    }
    let metrics = sidecar.metrics().await;
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_s3_read_bytes_total"),
        body.len() as f64,
        "{}: exactly one object's worth of bytes from S3",
        server.name
    );
}

#[tokio::test]
async fn eight_cold_clients_share_one_s3_download() {
    for server in TestEnv::get().s3_servers() {
        let body = snapshot_bytes(6 << 20, 8);
        let bucket = bucket_with(&server, &body).await;
        let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
        let clients: Vec<_> = (0..8)
            .map(|_| tokio::spawn(read_all(sidecar.url(PATH))))
            .collect();
        every_client_whole_from_one_s3_read(clients, &body, &sidecar, &server).await;
    }
}

#[tokio::test]
async fn eight_cold_clients_without_a_disk_tier_share_one_s3_read() {
    for server in TestEnv::get().s3_servers() {
        let body = snapshot_bytes(6 << 20, 10);
        let bucket = bucket_with(&server, &body).await;
        let proxy = CutProxy::in_front_of(&server).await;
        let options = SidecarOptions {
            disk_tier: false,
            ..SidecarOptions::default()
        };
        let sidecar = Sidecar::start_at(&proxy.url(), &server, &bucket, &options);
        // Every client learns the revision; no read gets a byte before all eight asked.
        proxy.hold_gets();
        let clients: Vec<_> = (0..8)
            .map(|_| tokio::spawn(read_all(sidecar.url(PATH))))
            .collect();
        wait_until("seven clients to join the first one's read", async || {
            let metrics = sidecar.metrics().await;
            let shared = Sidecar::metric(&metrics, "snapcache_s3_reads_shared_total");
            (shared == 7.0)
                .then_some(())
                .ok_or(format!("{shared} reads shared"))
        })
        .await;
        proxy.release();
        every_client_whole_from_one_s3_read(clients, &body, &sidecar, &server).await;
        let through_proxy = proxy.sent_downstream();
        assert!(
            through_proxy < body.len() as u64 + (1 << 20),
            "{}: S3 sent {through_proxy} bytes for one {}-byte object",
            server.name,
            body.len()
        );
    }
}

#[tokio::test]
async fn client_disconnect_leaves_no_partial_entry_and_releases_buffers() {
    let server = &TestEnv::get().s3_servers()[0];
    let body = snapshot_bytes(16 << 20, 9);
    for disk_tier in [false, true] {
        let bucket = bucket_with(server, &body).await;
        let options = SidecarOptions {
            disk_tier,
            workers: 2,
            chunk_size: "256KiB".into(),
            ..SidecarOptions::default()
        };
        let sidecar = Sidecar::start(server, &bucket, &options);
        {
            let response = reqwest::get(sidecar.url(PATH)).await.expect("GET");
            let mut stream = response.bytes_stream();
            let mut received = 0;
            while received < 512 * 1024 {
                received += stream
                    .next()
                    .await
                    .expect("some bytes")
                    .expect("chunk")
                    .len();
            }
        } // dropped: the client hangs up mid-body
        wait_until("buffers released", async || {
            let metrics = sidecar.metrics().await;
            let buffered = Sidecar::metric(&metrics, "snapcache_parallel_get_buffered_bytes");
            (buffered == 0.0)
                .then_some(())
                .ok_or(format!("{buffered} bytes still buffered"))
        })
        .await;
        if disk_tier {
            // The fill is the sidecar's own download, not the client's: it runs on to the
            // end and is committed, one whole data file and no temporary one.
            wait_until_committed(&sidecar, body.len()).await;
            let files = disk_files(&sidecar);
            assert!(!files.iter().any(|f| f.ends_with(".tmp")), "{files:?}");
            let data: Vec<&String> = files.iter().filter(|f| f.ends_with(".data")).collect();
            assert_eq!(data.len(), 1, "{files:?}");
            let len = std::fs::metadata(sidecar.disk_dir().join(data[0]))
                .expect("data file")
                .len();
            assert_eq!(
                len,
                body.len() as u64,
                "the data file holds the whole revision"
            );
        }
        assert_eq!(get_all(&sidecar).await.1, body);
        if disk_tier {
            let hits = Sidecar::metric(
                &sidecar.metrics().await,
                "snapcache_disk_tier_lookups_total{result=\"hit\"}",
            );
            assert_eq!(
                hits, 1.0,
                "the next client reads the finished fill from disk"
            );
        }
    }
}

#[tokio::test]
async fn s3_outage_serves_disk_hits_and_503s_misses_then_recovers() {
    let server = &TestEnv::get().s3_servers()[0];
    let cached = snapshot_bytes(200_000, 10);
    let bucket = bucket_with(server, &cached).await;
    let other = snapshot_bytes(100_000, 11);
    put_snapshot(
        &server.client(),
        &bucket,
        "example.com/org/other",
        &other,
        COMMIT,
    )
    .await;
    let proxy = CutProxy::in_front_of(server).await;
    let options = SidecarOptions {
        revalidate_after: "0s".into(),
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start_at(&proxy.url(), server, &bucket, &options);
    assert_eq!(get_all(&sidecar).await.1, cached);
    let ready = reqwest::get(sidecar.admin_url("/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::OK);

    proxy.cut().await;
    let (status, body) = get_all(&sidecar).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a disk hit is served while S3 is gone"
    );
    assert_eq!(body, cached);
    let miss = reqwest::get(sidecar.url("/git/example.com/org/other/snapshot.tar.zst"))
        .await
        .expect("GET");
    assert_eq!(miss.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(miss.headers().get("retry-after").is_some());
    let ready = reqwest::get(sidecar.admin_url("/readyz"))
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "an S3 outage leaves the sidecar ready (sidecar_availability.rs has the metrics)"
    );

    proxy.restore().await;
    let back = reqwest::get(sidecar.url("/git/example.com/org/other/snapshot.tar.zst"))
        .await
        .expect("GET");
    assert_eq!(
        back.status(),
        StatusCode::OK,
        "service comes back without a restart"
    );
    assert_eq!(back.bytes().await.expect("body").to_vec(), other);
}

#[tokio::test]
async fn sigterm_finishes_the_response_in_flight_and_exits_zero() {
    let server = &TestEnv::get().s3_servers()[0];
    let body = snapshot_bytes(4 << 20, 12);
    let bucket = bucket_with(server, &body).await;
    // A grace that only bounds a hang: the response below is held until the test lets it go.
    let options = SidecarOptions {
        shutdown_grace: "60s".into(),
        ..SidecarOptions::default()
    };
    let mut sidecar = Sidecar::start(server, &bucket, &options);
    assert_eq!(get_all(&sidecar).await.1, body, "warm the disk tier");
    // A response surely in flight: its first bytes arrived, the rest waits for the client.
    let (reader, release) = Download::holding(sidecar.url(PATH), 256 * 1024);
    reader.wait_for_bytes(256 * 1024).await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &sidecar.pid().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // The listener closes while that response is still in flight.
    wait_until(
        "the listener closed after SIGTERM",
        async || match TcpStream::connect(sidecar.api).await {
            Ok(_) => Err("a connection was accepted".to_owned()),
            Err(_) => Ok(()),
        },
    )
    .await;
    assert!(
        reqwest::get(sidecar.url(PATH)).await.is_err(),
        "no new connection is accepted after SIGTERM"
    );
    let _ = release.send(());
    assert_eq!(
        reader.finish().await.map_err(|(err, _)| err).as_deref(),
        Ok(body.as_slice()),
        "in-flight response completes"
    );
    assert_eq!(
        sidecar.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        sidecar.log()
    );
}

#[tokio::test]
async fn promtool_accepts_the_metrics() {
    let env = TestEnv::get();
    let server = &env.s3_servers()[0];
    let body = snapshot_bytes(500_000, 13);
    let bucket = bucket_with(server, &body).await;
    let sidecar = Sidecar::start(server, &bucket, &SidecarOptions::default());
    assert_eq!(get_all(&sidecar).await.1, body);
    let metrics = sidecar.metrics().await;
    for name in [
        "snapcache_pin_precondition_failed_total",
        "snapcache_heap_allocated_bytes",
        "snapcache_heap_resident_bytes",
        "snapcache_parallel_get_buffered_bytes",
        "snapcache_parallel_get_buffered_bytes_high_water",
        "snapcache_http_requests_total",
        "snapcache_response_bytes_total",
        "snapcache_disk_tier_lookups_total",
        "snapcache_s3_request_duration_seconds",
        "snapcache_disk_tier_bytes",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{metrics}"
        );
    }
    assert!(Sidecar::metric(&metrics, "snapcache_heap_allocated_bytes") > 0.0);
    wait_until_committed(&sidecar, body.len()).await;
    let mut promtool = std::process::Command::new(env.require("PROMTOOL"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn disk_files(sidecar: &Sidecar) -> Vec<String> {
    std::fs::read_dir(sidecar.disk_dir())
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` until it succeeds; the 60 s deadline only bounds a hang.
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match check().await {
            Ok(()) => return,
            Err(err) if Instant::now() > deadline => panic!("{what}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
