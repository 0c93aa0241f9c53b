//! Faults keep data whole (issue 14 §5): S3 cut mid-stream, the sidecar killed mid-fill,
//! a full disk. Each fault is placed by construction (the proxy stalls after a chosen
//! byte count), never by timing.

use futures::StreamExt;
use reqwest::StatusCode;
use snapcache_tests::proxy::CutProxy;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, eventually, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/faults";
const PATH: &str = "/git/example.com/org/faults/snapshot.tar.zst";
const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";
const MIB: usize = 1024 * 1024;

async fn bucket_with(server: &S3Server, repo: &str, body: &[u8]) -> String {
    let bucket = unique_name("faults");
    create_bucket(&server.client(), &bucket).await;
    put_snapshot(&server.client(), &bucket, repo, body, COMMIT).await;
    bucket
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

/// Starts a cold GET and returns once the fill has stalled at the proxy's limit.
async fn stalled_cold_get(
    sidecar: &Sidecar,
    proxy: &CutProxy,
    after: u64,
) -> tokio::task::JoinHandle<(StatusCode, Vec<u8>, bool)> {
    // The revision's HeadObject passes; only body bytes count toward the stall.
    proxy.stall_after(after);
    let download = tokio::spawn(get_until_end(sidecar.url(PATH)));
    eventually("the fill to stall at the proxy", async || {
        let tmp = disk_files(sidecar)
            .iter()
            .any(|name| name.ends_with(".tmp"));
        (tmp && proxy.sent_downstream() >= after).then_some(())
    })
    .await;
    download
}

#[tokio::test]
async fn s3_cut_mid_stream_gives_a_short_body_keeps_nothing_and_recovers() {
    let server = TestEnv::get().s3_server("garage");
    let body = snapshot_bytes(48 * MIB, 21);
    let bucket = bucket_with(&server, REPO, &body).await;
    let proxy = CutProxy::in_front_of(&server).await;
    let sidecar = Sidecar::start_at(&proxy.url(), &server, &bucket, &SidecarOptions::default());

    let download = stalled_cold_get(&sidecar, &proxy, 8 * MIB as u64).await;
    proxy.cut().await;
    let (status, got, broke) = download.await.expect("download task");
    assert_eq!(status, StatusCode::OK);
    assert!(
        broke,
        "the client sees the body break, never a complete-looking 200"
    );
    assert!(got.len() < body.len(), "short: {} bytes", got.len());
    assert_eq!(
        got[..],
        body[..got.len()],
        "what came is the object's prefix"
    );
    eventually("the failed fill to leave nothing", async || {
        disk_files(&sidecar).is_empty().then_some(())
    })
    .await;

    proxy.restore().await;
    proxy.stall_after(u64::MAX / 2);
    let (status, again, broke) = get_until_end(sidecar.url(PATH)).await;
    assert_eq!((status, broke), (StatusCode::OK, false));
    assert!(
        again == body,
        "byte-identical after S3 came back, without a restart"
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
    let download = stalled_cold_get(&first, &proxy, 4 * MIB as u64).await;
    first.kill();
    let (_, _, broke) = download.await.expect("download task");
    assert!(broke, "the client of a killed sidecar sees a broken body");
    proxy.cut().await;
    proxy.restore().await;
    proxy.stall_after(u64::MAX / 2);

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
    eventually("the refill to be committed", async || {
        let metrics = second.metrics().await;
        (Sidecar::metric(&metrics, "snapcache_disk_tier_entries") == 1.0).then_some(())
    })
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
    let big = snapshot_bytes(32 * MIB, 23);
    let small = snapshot_bytes(MIB, 24);
    let bucket = bucket_with(&server, REPO, &big).await;
    put_snapshot(
        &server.client(),
        &bucket,
        "example.com/org/small",
        &small,
        COMMIT,
    )
    .await;
    let disk = SmallDisk::mount(16);
    let options = SidecarOptions {
        disk_dir: Some(disk.dir.path().to_owned()),
        // The index would take it: only the filesystem's free space says no.
        disk_max_bytes: "1GiB".into(),
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&server, &bucket, &options);
    for round in 1..=3u32 {
        let (status, got, broke) = get_until_end(sidecar.url(PATH)).await;
        assert_eq!((status, broke), (StatusCode::OK, false), "round {round}");
        assert!(got == big, "round {round}: the whole object, uncorrupted");
        let metrics = sidecar.metrics().await;
        assert_eq!(
            Sidecar::metric(&metrics, "snapcache_s3_read_bytes_total"),
            f64::from(round) * big.len() as f64,
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
