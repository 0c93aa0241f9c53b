//! S3 never takes a workload down (issue 14): probes and scrapes never ask S3, S3's
//! health is a metric, a missing bucket or refused credentials are said loudly while
//! the pod stays Ready, a pin the server ignores is refused, and slow or excess
//! connections are bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use snapcache_tests::proxy::CutProxy;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, eventually, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/available";
const PATH: &str = "/git/example.com/org/available/snapshot.tar.zst";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const PIN: &str = "x-cachew-snapshot-pin";

async fn bucket_with(server: &S3Server, body: &[u8]) -> String {
    let bucket = unique_name("available");
    create_bucket(&server.client(), &bucket).await;
    put_snapshot(&server.client(), &bucket, REPO, body, COMMIT).await;
    bucket
}

async fn metric(sidecar: &Sidecar, sample: &str) -> f64 {
    Sidecar::metric(&sidecar.metrics().await, sample)
}

async fn status(url: String) -> StatusCode {
    reqwest::get(url).await.expect("request").status()
}

/// Waits for the one HeadBucket the sidecar sends at start-up to be answered.
async fn wait_for_bucket_check(sidecar: &Sidecar) {
    let sample = "snapcache_s3_request_duration_seconds_count{operation=\"head_bucket\"}";
    eventually("the start-up bucket check", async || {
        (metric(sidecar, sample).await == 1.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn probes_and_scrapes_never_send_a_byte_to_s3() {
    let server = TestEnv::get().s3_server("moto");
    let body = snapshot_bytes(300_000, 1);
    let bucket = bucket_with(&server, &body).await;
    let proxy = CutProxy::in_front_of(&server).await;
    let sidecar = Sidecar::start_at(&proxy.url(), &server, &bucket, &SidecarOptions::default());
    wait_for_bucket_check(&sidecar).await;
    let got = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(got.bytes().await.expect("body").to_vec(), body);
    let before = proxy.sent_upstream();
    assert!(before > 0, "the proxy counts what reaches S3");

    for _ in 0..25 {
        assert_eq!(status(sidecar.admin_url("/readyz")).await, StatusCode::OK);
        assert_eq!(status(sidecar.admin_url("/healthz")).await, StatusCode::OK);
        assert!(sidecar.metrics().await.contains("snapcache_s3_up 1"));
    }
    assert_eq!(
        proxy.sent_upstream(),
        before,
        "75 probes and scrapes sent S3 nothing"
    );
}

#[tokio::test]
async fn an_s3_outage_leaves_the_injected_probes_passing_and_shows_in_metrics() {
    let server = TestEnv::get().s3_server("moto");
    let body = snapshot_bytes(100_000, 2);
    let bucket = bucket_with(&server, &body).await;
    let proxy = CutProxy::in_front_of(&server).await;
    let sidecar = Sidecar::start_at(&proxy.url(), &server, &bucket, &SidecarOptions::default());
    wait_for_bucket_check(&sidecar).await;
    // The probes exactly as the operator injects them into a workload's pods.
    let spec = serde_json::from_value(serde_json::json!({
        "selector": {"matchLabels": {"app": "web"}},
        "s3": {"bucket": bucket},
    }))
    .expect("SnapshotCache spec");
    let env = snapcache_operator::inject::Environment {
        default_image: "snapcache/sidecar:test",
        native_sidecars: true,
    };
    let container = snapcache_operator::inject::sidecar_container(&spec, &env);
    let probe_paths: Vec<String> = [&container.readiness_probe, &container.startup_probe]
        .into_iter()
        .map(|probe| {
            probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|get| get.path.clone())
                .expect("an HTTP probe")
        })
        .collect();

    proxy.cut().await;
    let miss = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(miss.status(), StatusCode::SERVICE_UNAVAILABLE);
    for path in &probe_paths {
        assert_eq!(
            status(sidecar.admin_url(path)).await,
            StatusCode::OK,
            "{path} passes while S3 is down: the pod stays in its Services"
        );
    }
    let metrics = sidecar.metrics().await;
    assert_eq!(Sidecar::metric(&metrics, "snapcache_s3_up"), 0.0);
    assert_eq!(Sidecar::metric(&metrics, "snapcache_ready"), 1.0);
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_s3_failing{reason=\"unreachable\"}"),
        1.0
    );
    assert!(Sidecar::metric(&metrics, "snapcache_s3_consecutive_failures") >= 1.0);
    assert!(Sidecar::metric(&metrics, "snapcache_s3_last_success_timestamp_seconds") > 0.0);

    proxy.restore().await;
    let back = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(back.status(), StatusCode::OK);
    assert_eq!(back.bytes().await.expect("body").to_vec(), body);
    let metrics = sidecar.metrics().await;
    assert_eq!(Sidecar::metric(&metrics, "snapcache_s3_up"), 1.0);
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_s3_consecutive_failures"),
        0.0
    );
}

#[tokio::test]
async fn a_missing_bucket_is_said_loudly_while_the_pod_stays_ready() {
    let server = TestEnv::get().s3_server("moto");
    let missing = unique_name("never-created");
    let sidecar = Sidecar::start(&server, &missing, &SidecarOptions::default());
    wait_for_bucket_check(&sidecar).await;
    assert!(
        sidecar.log().contains("S3 bucket does not exist"),
        "{}",
        sidecar.log()
    );
    assert_eq!(status(sidecar.admin_url("/readyz")).await, StatusCode::OK);
    let metrics = sidecar.metrics().await;
    assert_eq!(Sidecar::metric(&metrics, "snapcache_s3_up"), 0.0);
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_s3_failing{reason=\"bucket_missing\"}"),
        1.0
    );
}

#[tokio::test]
async fn refused_credentials_are_said_loudly_while_the_pod_stays_ready() {
    let server = TestEnv::get().s3_server("garage");
    let bucket = bucket_with(&server, b"snapshot").await;
    let wrong = S3Server {
        secret_access_key: "not-the-secret".into(),
        ..server.clone()
    };
    let sidecar = Sidecar::start(&wrong, &bucket, &SidecarOptions::default());
    wait_for_bucket_check(&sidecar).await;
    assert!(
        sidecar.log().contains("S3 refused HeadBucket"),
        "{}",
        sidecar.log()
    );
    let refused = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    let text = refused.text().await.expect("body");
    assert!(text.contains("credentials"), "{text}");
    assert_eq!(status(sidecar.admin_url("/readyz")).await, StatusCode::OK);
    let metrics = sidecar.metrics().await;
    assert_eq!(Sidecar::metric(&metrics, "snapcache_s3_up"), 0.0);
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_s3_failing{reason=\"access_denied\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_pin_the_server_does_not_honour_gets_412_never_other_bytes() {
    // Garage ignores VersionId: without the sidecar's own check it would answer 206
    // with the current bytes under any version pin.
    let server = TestEnv::get().s3_server("garage");
    let body = snapshot_bytes(50_000, 3);
    let bucket = bucket_with(&server, &body).await;
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let client = reqwest::Client::new();
    for token in [
        "version:not-a-version-of-this-object",
        "etag:0123456789abcdef",
    ] {
        let ranged = client
            .get(sidecar.url(PATH))
            .header(PIN, token)
            .header("range", "bytes=0-99")
            .send()
            .await
            .expect("pinned GET");
        assert_eq!(ranged.status(), StatusCode::PRECONDITION_FAILED, "{token}");
        let head = client
            .head(sidecar.url(PATH))
            .header(PIN, token)
            .send()
            .await
            .expect("pinned HEAD");
        assert_eq!(head.status(), StatusCode::PRECONDITION_FAILED, "{token}");
    }
    assert_eq!(
        metric(&sidecar, "snapcache_pin_precondition_failed_total").await,
        4.0
    );
}

/// A raw connection that has sent `bytes` and nothing more.
fn connect_and_send(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(bytes).expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    stream
}

/// Everything the server sends until it closes the connection.
fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(err) => panic!("the server did not close the connection: {err}"),
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn incomplete_and_idle_requests_are_closed_after_the_header_read_timeout() {
    let server = TestEnv::get().s3_server("moto");
    let bucket = bucket_with(&server, b"snapshot").await;
    let options = SidecarOptions {
        extra_args: vec!["--header-read-timeout".into(), "1s".into()],
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&server, &bucket, &options);
    let partial = format!("GET {PATH} HTTP/1.1\r\nHost: localhost\r\n");
    for addr in [sidecar.api, sidecar.admin] {
        let mut slow = connect_and_send(addr, partial.as_bytes());
        let mut idle = connect_and_send(addr, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(
            read_until_closed(&mut slow),
            "",
            "no answer to half a request"
        );
        let answered = read_until_closed(&mut idle);
        assert!(
            answered.starts_with("HTTP/1.1 "),
            "the idle connection was answered, then closed: {answered}"
        );
    }
}

#[tokio::test]
async fn a_connection_over_the_cap_gets_503_at_once_and_the_admin_port_keeps_answering() {
    let server = TestEnv::get().s3_server("moto");
    let body = snapshot_bytes(10_000, 4);
    let bucket = bucket_with(&server, &body).await;
    let options = SidecarOptions {
        extra_args: vec!["--max-connections".into(), "4".into()],
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&server, &bucket, &options);
    // Accepted in arrival order: these four hold every slot.
    let holders: Vec<TcpStream> = (0..4).map(|_| connect_and_send(sidecar.api, b"")).collect();
    let mut over = connect_and_send(sidecar.api, b"");
    let refused = read_until_closed(&mut over);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("Retry-After: 1"), "{refused}");
    assert_eq!(status(sidecar.admin_url("/healthz")).await, StatusCode::OK);
    let metrics = sidecar.metrics().await;
    assert_eq!(
        Sidecar::metric(
            &metrics,
            "snapcache_connections_refused_total{port=\"api\"}"
        ),
        1.0
    );
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_connections_open{port=\"api\"}"),
        4.0
    );

    drop(holders);
    eventually("the slots to free", async || {
        let open = metric(&sidecar, "snapcache_connections_open{port=\"api\"}").await;
        (open == 0.0).then_some(())
    })
    .await;
    let got = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.expect("body").to_vec(), body);
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .expect("the sidecar's descriptors")
}

#[tokio::test]
async fn a_thousand_slow_connections_neither_stop_a_get_nor_leak_descriptors() {
    let server = TestEnv::get().s3_server("moto");
    let body = snapshot_bytes(200_000, 5);
    let bucket = bucket_with(&server, &body).await;
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let got = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(got.bytes().await.expect("body").to_vec(), body);
    let baseline = open_descriptors(sidecar.pid());

    let slow: Vec<TcpStream> = (0..1000)
        .map(|_| connect_and_send(sidecar.api, b"GET / HTTP/1.1\r\nHo"))
        .collect();
    eventually("1000 slow connections accepted", async || {
        let open = metric(&sidecar, "snapcache_connections_open{port=\"api\"}").await;
        (open == 1000.0).then_some(())
    })
    .await;
    let started = Instant::now();
    let got = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.expect("body").to_vec(), body);
    println!(
        "a GET beside 1000 slow connections took {:?}",
        started.elapsed()
    );

    drop(slow);
    eventually("descriptors back to the baseline", async || {
        (open_descriptors(sidecar.pid()) <= baseline).then_some(())
    })
    .await;
}
