//! Faults keep data whole (issue 14 §5): S3 cut mid-stream of a 1 GiB snapshot, the
//! sidecar killed mid-fill, a 1 GiB snapshot on a full disk. Each fault is placed by construction (the proxy stalls after a chosen
//! byte count), never by timing.

use futures::StreamExt;
use reqwest::StatusCode;
use snapcache_tests::large::{Download, TiledSnapshot};
use snapcache_tests::proxy::CutProxy;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, eventually, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/faults";
const PATH: &str = "/git/example.com/org/faults/snapshot.tar.zst";
const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";
const MIB: usize = 1024 * 1024;
const GIB: u64 = 1 << 30;

async fn bucket_with(server: &S3Server, repo: &str, body: &[u8]) -> String {
    let bucket = unique_name("faults");
    create_bucket(&server.client(), &bucket).await;
    put_snapshot(&server.client(), &bucket, repo, body, COMMIT).await;
    bucket
}

/// Parts of 8 MiB: a 1 GiB read in 128 GETs rather than the default options' 4096.
fn large_parts() -> SidecarOptions {
    SidecarOptions {
        chunk_size: "8MiB".into(),
        ..SidecarOptions::default()
    }
}

/// Names in the disk tier directory (the fill's `*.tmp` among them while it runs).
fn disk_files(sidecar: &Sidecar) -> Vec<String> {
    std::fs::read_dir(sidecar.disk_dir())
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A GET whose body is read until it ends or breaks: the bytes, and whether it broke.
async fn get_until_end(url: String) -> (StatusCode, Vec<u8>, bool) {
    let response = reqwest::get(url).await.expect("GET");
    let status = response.status();
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => return (status, body, true),
        }
    }
    (status, body, false)
}

/// Holds S3's answers once `after` more bytes have passed, starts `download`, and
/// returns once the fill it started has stalled there.
async fn stalled_cold<T: Send + 'static>(
    sidecar: &Sidecar,
    proxy: &CutProxy,
    after: u64,
    download: impl Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    // The revision's HeadObject passes; only body bytes count toward the stall.
    proxy.stall_after(after);
    let download = tokio::spawn(download);
    eventually("the fill to stall at the proxy", async || {
        let tmp = disk_files(sidecar)
            .iter()
            .any(|name| name.ends_with(".tmp"));
        (tmp && proxy.sent_downstream() >= after).then_some(())
    })
    .await;
    download
}

/// A cold GET of `snapshot`, stalled after `after` bytes of S3's answers.
async fn stalled_cold_download(
    sidecar: &Sidecar,
    proxy: &CutProxy,
    snapshot: &TiledSnapshot,
    after: u64,
) -> tokio::task::JoinHandle<Download> {
    let (snapshot, url) = (snapshot.clone(), sidecar.url(PATH));
    stalled_cold(sidecar, proxy, after, async move {
        snapshot.download(&url).await
    })
    .await
}

#[tokio::test]
async fn s3_cut_mid_stream_gives_a_short_body_keeps_nothing_and_recovers() {
    let server = TestEnv::get().s3_server("garage");
    let snapshot = TiledSnapshot::new(GIB, 21);
    let bucket = unique_name("faults");
    create_bucket(&server.client(), &bucket).await;
    snapshot.put(&server.client(), &bucket, REPO).await;
    let proxy = CutProxy::in_front_of(&server).await;
    let sidecar = Sidecar::start_at(&proxy.url(), &server, &bucket, &large_parts());

    let download = stalled_cold_download(&sidecar, &proxy, &snapshot, 64 * MIB as u64).await;
    proxy.cut().await;
    let cut = download.await.expect("download task");
    assert_eq!(cut.status, StatusCode::OK);
    assert!(
        cut.broke,
        "the client sees the body break, never a complete-looking 200"
    );
    assert!(cut.received < snapshot.len, "short: {cut:?}");
    assert!(cut.intact, "what came is the object's prefix");
    eventually("the failed fill to leave nothing", async || {
        disk_files(&sidecar).is_empty().then_some(())
    })
    .await;

    proxy.restore().await;
    proxy.release();
    let again = snapshot.download(&sidecar.url(PATH)).await;
    assert!(
        again.is_whole(&snapshot),
        "byte-identical after S3 came back, without a restart: {again:?}"
    );
}

#[tokio::test]
async fn sigkill_mid_fill_leaves_no_partial_file_after_restart() {
    let server = TestEnv::get().s3_server("garage");
    let body = snapshot_bytes(24 * MIB, 22);
    let bucket = bucket_with(&server, REPO, &body).await;
    let proxy = CutProxy::in_front_of(&server).await;
    let disk = tempfile::tempdir().expect("disk dir");
    let options = SidecarOptions {
        disk_dir: Some(disk.path().to_owned()),
        ..SidecarOptions::default()
    };
    let mut first = Sidecar::start_at(&proxy.url(), &server, &bucket, &options);
    let download = stalled_cold(
        &first,
        &proxy,
        4 * MIB as u64,
        get_until_end(first.url(PATH)),
    )
    .await;
    first.kill();
    let (_, _, broke) = download.await.expect("download task");
    assert!(broke, "the client of a killed sidecar sees a broken body");
    proxy.cut().await;
    proxy.restore().await;
    proxy.release();

    let second = Sidecar::start_at(&proxy.url(), &server, &bucket, &options);
    assert!(
        !disk_files(&second)
            .iter()
            .any(|name| name.ends_with(".tmp")),
        "no partial file survives a restart: {:?}",
        disk_files(&second)
    );
    let (status, got, broke) = get_until_end(second.url(PATH)).await;
    assert_eq!((status, broke), (StatusCode::OK, false));
    assert!(got == body, "the entry served is whole");
    second
        .until_metric("snapcache_disk_tier_entries", 1.0)
        .await;
    let (_, again, _) = get_until_end(second.url(PATH)).await;
    assert!(again == body, "and so is its disk copy");
    let metrics = second.metrics().await;
    assert_eq!(
        Sidecar::metric(
            &metrics,
            "snapcache_disk_tier_lookups_total{result=\"hit\"}"
        ),
        1.0
    );
}

/// A tmpfs of `mib` MiB mounted for one test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: usize) -> SmallDisk {
        let dir = tempfile::tempdir().expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "snapcache-test",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            mounted.success(),
            "mounting a tmpfs needs root (make test runs as root in CI)"
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_snapshot_larger_than_the_free_disk_is_served_whole_from_s3_once_per_request() {
    let server = TestEnv::get().s3_server("garage");
    let big = TiledSnapshot::new(GIB, 23);
    let small = snapshot_bytes(MIB, 24);
    let bucket = unique_name("faults");
    create_bucket(&server.client(), &bucket).await;
    big.put(&server.client(), &bucket, REPO).await;
    put_snapshot(
        &server.client(),
        &bucket,
        "example.com/org/small",
        &small,
        COMMIT,
    )
    .await;
    let disk = SmallDisk::mount(64);
    let options = SidecarOptions {
        disk_dir: Some(disk.dir.path().to_owned()),
        // The index would take it: only the filesystem's free space says no.
        disk_max_bytes: "2GiB".into(),
        ..large_parts()
    };
    let sidecar = Sidecar::start(&server, &bucket, &options);
    for round in 1..=2u32 {
        let got = big.download(&sidecar.url(PATH)).await;
        assert!(
            got.is_whole(&big),
            "round {round}: the whole object, uncorrupted: {got:?}"
        );
        let metrics = sidecar.metrics().await;
        assert_eq!(
            Sidecar::metric(&metrics, "snapcache_s3_read_bytes_total"),
            f64::from(round) * big.len as f64,
            "round {round}: S3 read once per request"
        );
        assert_eq!(
            Sidecar::metric(&metrics, "snapcache_disk_tier_fills_skipped_total"),
            1.0,
            "the first request found it does not fit; later ones remember"
        );
    }
    let small_path = "/git/example.com/org/small/snapshot.tar.zst";
    for _ in 0..2 {
        let (status, got, broke) = get_until_end(sidecar.url(small_path)).await;
        assert_eq!((status, broke), (StatusCode::OK, false));
        assert!(got == small, "others are still cached and served");
    }
    let metrics = sidecar.metrics().await;
    assert_eq!(
        Sidecar::metric(
            &metrics,
            "snapcache_disk_tier_lookups_total{result=\"hit\"}"
        ),
        1.0
    );
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_disk_tier_unfit_snapshots"),
        1.0
    );
    assert_eq!(
        reqwest::get(sidecar.admin_url("/readyz"))
            .await
            .expect("readyz")
            .status(),
        StatusCode::OK
    );
    drop(sidecar);
}
