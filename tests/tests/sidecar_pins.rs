//! PROTOCOL.md "Pin probe and pinned ranges": etag pins on moto and Garage, version
//! pins on moto's versioned buckets.

use std::collections::HashMap;

use futures::future::join_all;
use reqwest::StatusCode;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/pinned";
const PATH: &str = "/git/example.com/org/pinned/snapshot.tar.zst";
const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const PIN: &str = "x-cachew-snapshot-pin";

async fn bucket(server: &S3Server, versioned: bool) -> String {
    let s3 = server.client();
    let bucket = unique_name("pins");
    create_bucket(&s3, &bucket).await;
    if versioned {
        s3.put_bucket_versioning()
            .bucket(&bucket)
            .versioning_configuration(
                aws_sdk_s3::types::VersioningConfiguration::builder()
                    .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send()
            .await
            .expect("enable versioning");
    }
    bucket
}

/// The pin token and size a probe hands out.
async fn probe(sidecar: &Sidecar) -> (String, u64) {
    let response = reqwest::Client::new()
        .head(sidecar.url(PATH))
        .header(PIN, "probe")
        .send()
        .await
        .expect("probe");
    assert_eq!(response.status(), StatusCode::OK);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("probe answer lacks {name}"))
            .to_owned()
    };
    assert_eq!(header("x-cachew-snapshot-commit"), COMMIT);
    header("etag");
    (
        header(PIN),
        header("x-cachew-snapshot-size").parse().expect("size"),
    )
}

/// One pinned ranged GET: its status and body.
async fn pinned_range(
    sidecar: &Sidecar,
    token: &str,
    start: u64,
    end: u64,
) -> (StatusCode, Vec<u8>) {
    let response = reqwest::Client::new()
        .get(sidecar.url(PATH))
        .header(PIN, token)
        .header("range", format!("bytes={start}-{end}"))
        .send()
        .await
        .expect("pinned GET");
    let status = response.status();
    assert_eq!(
        response.headers().get(PIN).and_then(|v| v.to_str().ok()),
        Some(token),
        "the token is echoed"
    );
    (status, response.bytes().await.expect("body").to_vec())
}

/// `parts` pinned ranges of one revision of `size` bytes, in parallel: for each range,
/// its byte positions, the status and the body.
async fn pinned_ranges(
    sidecar: &Sidecar,
    token: &str,
    size: u64,
    parts: u64,
) -> Vec<(std::ops::Range<usize>, StatusCode, Vec<u8>)> {
    let part = size.div_ceil(parts);
    let ranges = (0..parts).map(|i| (i * part, ((i + 1) * part).min(size) - 1));
    join_all(ranges.map(|(start, end)| async move {
        let (status, body) = pinned_range(sidecar, token, start, end).await;
        (start as usize..end as usize + 1, status, body)
    }))
    .await
}

/// Probe, then `parts` ranges in parallel; `Err(n)` when n ranges met 412.
async fn pinned_download(sidecar: &Sidecar, parts: u64) -> Result<Vec<u8>, usize> {
    let (token, size) = probe(sidecar).await;
    let answers = pinned_ranges(sidecar, &token, size, parts).await;
    let stale = answers
        .iter()
        .filter(|(_, status, _)| *status == StatusCode::PRECONDITION_FAILED)
        .count();
    if stale > 0 {
        return Err(stale);
    }
    Ok(answers
        .into_iter()
        .flat_map(|(_, status, body)| {
            assert_eq!(status, StatusCode::PARTIAL_CONTENT);
            body
        })
        .collect())
}

async fn precondition_failures(sidecar: &Sidecar) -> f64 {
    Sidecar::metric(
        &sidecar.metrics().await,
        "snapcache_pin_precondition_failed_total",
    )
}

#[tokio::test]
async fn probe_then_eight_parallel_pinned_ranges_stitch_the_object() {
    let env = TestEnv::get();
    for (server, versioned) in [
        (env.s3_server("moto"), true),
        (env.s3_server("moto"), false),
        (env.s3_server("garage"), false),
    ] {
        let bucket = bucket(&server, versioned).await;
        let body = snapshot_bytes(1_000_003, 21);
        put_snapshot(&server.client(), &bucket, REPO, &body, COMMIT).await;
        let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
        let (token, _) = probe(&sidecar).await;
        let expected_kind = if versioned { "version:" } else { "etag:" };
        assert!(
            token.starts_with(expected_kind),
            "{} versioned={versioned}: {token}",
            server.name
        );
        assert_eq!(
            pinned_download(&sidecar, 8).await,
            Ok(body),
            "{}",
            server.name
        );
        let metrics = sidecar.metrics().await;
        assert_eq!(
            Sidecar::metric(&metrics, "snapcache_disk_tier_bytes"),
            0.0,
            "pinned reads never fill the disk tier"
        );
    }
}

#[tokio::test]
async fn etag_pins_fail_closed_after_an_overwrite() {
    for server in TestEnv::get().s3_servers() {
        let bucket = bucket(&server, false).await;
        let s3 = server.client();
        put_snapshot(&s3, &bucket, REPO, &snapshot_bytes(400_000, 22), COMMIT).await;
        let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
        let (token, size) = probe(&sidecar).await;
        put_snapshot(&s3, &bucket, REPO, &snapshot_bytes(400_000, 23), COMMIT).await;
        let before = precondition_failures(&sidecar).await;
        let part = size / 8;
        let answers =
            join_all((0..8).map(|i| pinned_range(&sidecar, &token, i * part, (i + 1) * part - 1)))
                .await;
        for (status, _) in &answers {
            assert_eq!(*status, StatusCode::PRECONDITION_FAILED, "{}", server.name);
        }
        assert_eq!(
            precondition_failures(&sidecar).await - before,
            8.0,
            "{}: one count per 412",
            server.name
        );
    }
}

#[tokio::test]
async fn version_pins_keep_reading_the_old_revision_after_an_overwrite() {
    let server = TestEnv::get().s3_server("moto");
    let bucket = bucket(&server, true).await;
    let s3 = server.client();
    let old = snapshot_bytes(400_000, 24);
    put_snapshot(&s3, &bucket, REPO, &old, COMMIT).await;
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let (token, size) = probe(&sidecar).await;
    assert!(token.starts_with("version:"), "{token}");
    put_snapshot(&s3, &bucket, REPO, &snapshot_bytes(400_000, 25), COMMIT).await;
    let part = size / 8;
    let answers =
        join_all((0..8).map(|i| pinned_range(&sidecar, &token, i * part, (i + 1) * part - 1)))
            .await;
    let stitched: Vec<u8> = answers
        .into_iter()
        .flat_map(|(status, body)| {
            assert_eq!(status, StatusCode::PARTIAL_CONTENT);
            body
        })
        .collect();
    assert_eq!(stitched, old);
    assert_eq!(precondition_failures(&sidecar).await, 0.0);
}

#[tokio::test]
async fn a_stale_disk_tier_never_leaks_into_pinned_reads() {
    for server in TestEnv::get().s3_servers() {
        let bucket = bucket(&server, false).await;
        let s3 = server.client();
        let old = snapshot_bytes(300_000, 26);
        let new = snapshot_bytes(300_000, 27);
        put_snapshot(&s3, &bucket, REPO, &old, COMMIT).await;
        let options = SidecarOptions {
            revalidate_after: "1h".into(),
            ..SidecarOptions::default()
        };
        let sidecar = Sidecar::start(&server, &bucket, &options);
        let plain = reqwest::get(sidecar.url(PATH))
            .await
            .expect("GET")
            .bytes()
            .await
            .expect("body");
        assert_eq!(
            plain.to_vec(),
            old,
            "the disk tier now holds the old revision"
        );
        // The response can end before its fill is committed to disk.
        sidecar
            .until_metric("snapcache_disk_tier_entries", 1.0)
            .await;
        put_snapshot(&s3, &bucket, REPO, &new, COMMIT).await;
        let plain = reqwest::get(sidecar.url(PATH))
            .await
            .expect("GET")
            .bytes()
            .await
            .expect("body");
        assert_eq!(
            plain.to_vec(),
            old,
            "{}: plain reads still see the disk copy",
            server.name
        );
        assert_eq!(
            pinned_download(&sidecar, 4).await,
            Ok(new.clone()),
            "{}",
            server.name
        );
        let disk_hits = Sidecar::metric(
            &sidecar.metrics().await,
            "snapcache_disk_tier_lookups_total{result=\"hit\"}",
        );
        assert_eq!(
            disk_hits, 1.0,
            "{}: pinned reads did not consult the disk tier",
            server.name
        );
    }
}

#[tokio::test]
async fn pinned_reads_of_the_revision_on_disk_come_from_the_disk_tier() {
    const S3_GETS: &str = "snapcache_s3_request_duration_seconds_count{operation=\"get\"}";
    const DISK_BYTES: &str = "snapcache_response_bytes_total{source=\"disk\"}";
    for server in TestEnv::get().s3_servers() {
        let name = &server.name;
        let bucket = bucket(&server, false).await;
        let s3 = server.client();
        let old = snapshot_bytes(300_000, 28);
        let new = snapshot_bytes(300_000, 29);
        put_snapshot(&s3, &bucket, REPO, &old, COMMIT).await;
        let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
        let plain = reqwest::get(sidecar.url(PATH)).await.expect("GET");
        assert_eq!(plain.bytes().await.expect("body").to_vec(), old);
        // The response can end before its fill is committed to disk.
        sidecar
            .until_metric("snapcache_disk_tier_entries", 1.0)
            .await;
        let metric = |text: &str, name: &str| Sidecar::metric(text, name);
        let before = sidecar.metrics().await;
        let (token, size) = probe(&sidecar).await;
        let answers = pinned_ranges(&sidecar, &token, size, 4).await;
        let body: Vec<u8> = answers
            .iter()
            .flat_map(|(_, _, body)| body.clone())
            .collect();
        assert!(
            body == old,
            "{name}: the pinned download is the revision on disk"
        );
        let after = sidecar.metrics().await;
        assert_eq!(
            metric(&after, S3_GETS),
            metric(&before, S3_GETS),
            "{name}: no GetObject for a revision the disk tier holds"
        );
        assert_eq!(
            metric(&after, DISK_BYTES) - metric(&before, DISK_BYTES),
            old.len() as f64,
            "{name}: every pinned byte came from the disk tier"
        );

        // A regeneration: the old pin still names the bytes on disk, a new probe pins the
        // new revision, which only S3 has.
        put_snapshot(&s3, &bucket, REPO, &new, COMMIT).await;
        let (status, first) = pinned_range(&sidecar, &token, 0, 999).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{name}");
        assert_eq!(
            first,
            old[..1000],
            "{name}: the old pin reads the old revision"
        );
        let before = sidecar.metrics().await;
        assert_eq!(
            pinned_download(&sidecar, 4).await,
            Ok(new.clone()),
            "{name}"
        );
        let after = sidecar.metrics().await;
        assert_eq!(
            metric(&after, S3_GETS) - metric(&before, S3_GETS),
            4.0,
            "{name}: the new revision's ranges came from S3"
        );
    }
}

#[tokio::test]
async fn pinned_ranges_past_the_end_give_416_and_whole_reads_200() {
    let server = TestEnv::get().s3_server("garage");
    let bucket = bucket(&server, false).await;
    let body = snapshot_bytes(10_000, 28);
    put_snapshot(&server.client(), &bucket, REPO, &body, COMMIT).await;
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let (token, size) = probe(&sidecar).await;
    let response = reqwest::Client::new()
        .get(sidecar.url(PATH))
        .header(PIN, &token)
        .header("range", format!("bytes={size}-"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        response
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes */{size}").as_str())
    );
    assert_eq!(
        response.headers().get(PIN).and_then(|v| v.to_str().ok()),
        Some(token.as_str())
    );
    let whole = reqwest::Client::new()
        .get(sidecar.url(PATH))
        .header(PIN, &token)
        .send()
        .await
        .expect("GET");
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.bytes().await.expect("body").to_vec(), body);
}

#[tokio::test]
async fn malformed_tokens_get_400_without_an_s3_request() {
    let server = TestEnv::get().s3_server("moto");
    let bucket = bucket(&server, false).await;
    put_snapshot(&server.client(), &bucket, REPO, b"tiny", COMMIT).await;
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let long = format!("etag:{}", "a".repeat(1100));
    let tokens: Vec<&[u8]> = vec![
        b"",
        b"etag:",
        b"version:",
        b"etag",
        b"sha256:abc",
        b"ETAG:abc",
        b":abc",
        b"etag:a b",
        b"etag:\xc3\xa9t\xc3\xa9",
        b"version:\tabc",
        b"probe=1",
        b"PROBE",
        long.as_bytes(),
    ];
    let client = reqwest::Client::new();
    for token in tokens {
        let value = reqwest::header::HeaderValue::from_bytes(token).expect("header value");
        let response = client
            .get(sidecar.url(PATH))
            .header(PIN, value)
            .send()
            .await
            .expect("GET");
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(token)
        );
    }
    sidecar.assert_no_s3_requests().await;
}

/// 100 pinned downloads of 4 parallel ranges each, in 10 rounds of 10 concurrent
/// downloads, on moto and on Garage. The interleaving is fixed by the test, not by timing:
/// in each round the downloads chosen to go stale probe first, the test then regenerates
/// the object (an awaited PutObject), the other downloads probe the new revision, and only
/// then do all ten read their ranges at once. So exactly 50 downloads must meet 412 on
/// every range and exactly 50 must get, byte for byte, the revision they probed.
#[tokio::test]
async fn a_hundred_pinned_downloads_during_regenerations_never_mix_revisions() {
    const SIZE: usize = 64 * 1024;
    const ROUNDS: u64 = 10;
    const PER_ROUND: u64 = 10;
    const PARTS: u64 = 4;
    let revision = |n: u64| snapshot_bytes(SIZE, 1000 + n);
    for server in TestEnv::get().s3_servers() {
        let name = &server.name;
        let bucket = bucket(&server, false).await;
        let s3 = server.client();
        let mut current = 0;
        let mut etag = put_snapshot(&s3, &bucket, REPO, &revision(current), COMMIT).await;
        let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
        let failures_before = precondition_failures(&sidecar).await;
        let (mut whole, mut stale) = (0u64, 0u64);
        for round in 0..ROUNDS {
            // Which downloads of this round go stale: half of them, at changing positions.
            let goes_stale = |download: u64| (download + round).is_multiple_of(2);
            let (doomed, kept): (Vec<u64>, Vec<u64>) = (0..PER_ROUND).partition(|&d| goes_stale(d));
            let probe_all = |count: usize| join_all((0..count).map(|_| probe(&sidecar)));
            let doomed_pins = probe_all(doomed.len()).await;
            for (token, size) in &doomed_pins {
                assert_eq!(
                    *token,
                    format!("etag:{etag}"),
                    "{name} round {round}: probe"
                );
                assert_eq!(*size, SIZE as u64);
            }
            let replaced = revision(current);
            current += 1;
            etag = put_snapshot(&s3, &bucket, REPO, &revision(current), COMMIT).await;
            let kept_pins = probe_all(kept.len()).await;
            for (token, _) in &kept_pins {
                assert_eq!(
                    *token,
                    format!("etag:{etag}"),
                    "{name} round {round}: probe"
                );
            }
            let fresh = revision(current);

            // Every download's ranges, all ten downloads at once.
            let mut pins = HashMap::new();
            pins.extend(doomed.iter().copied().zip(doomed_pins));
            pins.extend(kept.iter().copied().zip(kept_pins));
            let downloads = join_all((0..PER_ROUND).map(|download| {
                let (token, size) = pins[&download].clone();
                let sidecar = &sidecar;
                async move { (download, pinned_ranges(sidecar, &token, size, PARTS).await) }
            }))
            .await;
            for (download, answers) in downloads {
                let label = format!("{name} round {round} download {download}");
                if goes_stale(download) {
                    for (i, (range, status, body)) in answers.iter().enumerate() {
                        assert_eq!(
                            *status,
                            StatusCode::PRECONDITION_FAILED,
                            "{label} range {i}: its revision was replaced before its ranges"
                        );
                        let range = range.clone();
                        assert!(
                            *body != replaced[range.clone()] && *body != fresh[range],
                            "{label} range {i}: a 412 carries no snapshot bytes"
                        );
                    }
                    stale += 1;
                } else {
                    let mut stitched = Vec::new();
                    for (i, (_, status, body)) in answers.into_iter().enumerate() {
                        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{label} range {i}");
                        stitched.extend(body);
                    }
                    assert!(
                        stitched == fresh,
                        "{label}: not byte-identical to the revision it probed ({})",
                        if stitched == replaced {
                            "the replaced revision"
                        } else {
                            "mixed or corrupt bytes"
                        }
                    );
                    whole += 1;
                }
            }
        }
        assert_eq!((whole, stale), (50, 50), "{name}");
        assert_eq!(
            precondition_failures(&sidecar).await - failures_before,
            (stale * PARTS) as f64,
            "{name}: one count per 412, and a 412 on every range of every stale download"
        );
        println!(
            "{name}: 100 pinned downloads around {current} regenerations: \
             {whole} whole, {stale} met 412, 0 mixed"
        );
    }
}

#[tokio::test]
async fn pin_mode_flag_chooses_the_token_kind() {
    let server = TestEnv::get().s3_server("moto");
    let versioned = bucket(&server, true).await;
    let plain = bucket(&server, false).await;
    for bucket in [&versioned, &plain] {
        put_snapshot(&server.client(), bucket, REPO, b"body", COMMIT).await;
    }
    let with_mode = |bucket: &str, mode: &str| {
        let options = SidecarOptions {
            extra_args: vec!["--pin-mode".into(), mode.into()],
            ..SidecarOptions::default()
        };
        Sidecar::start(&server, bucket, &options)
    };
    let etag_on_versioned = with_mode(&versioned, "etag");
    assert!(probe(&etag_on_versioned).await.0.starts_with("etag:"));
    let version_on_versioned = with_mode(&versioned, "version");
    assert!(probe(&version_on_versioned).await.0.starts_with("version:"));
    let version_on_plain = with_mode(&plain, "version");
    let refused = reqwest::Client::new()
        .head(version_on_plain.url(PATH))
        .header(PIN, "probe")
        .send()
        .await
        .expect("probe");
    assert_eq!(
        refused.status(),
        StatusCode::BAD_GATEWAY,
        "an unversioned bucket has no version pins"
    );
}
