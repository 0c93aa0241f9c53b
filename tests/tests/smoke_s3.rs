//! Each S3 server from tests/env accepts a bucket, an object and a ranged read through aws-sdk-s3.

use aws_sdk_s3::primitives::ByteStream;
use snapcache_tests::{TestEnv, unique_name};

#[tokio::test]
async fn bucket_object_and_range_on_every_s3_server() {
    for server in TestEnv::get().s3_servers() {
        let s3 = server.client();
        let bucket = unique_name("smoke");
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: create bucket: {e:?}", server.name));
        let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        s3.put_object()
            .bucket(&bucket)
            .key("git/example.com/org/repo/snapshot.tar.zst")
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: put object: {e:?}", server.name));

        for (range, expected) in [
            ("bytes=1000-1999", &body[1000..2000]),
            ("bytes=-10", &body[body.len() - 10..]),
        ] {
            let got = s3
                .get_object()
                .bucket(&bucket)
                .key("git/example.com/org/repo/snapshot.tar.zst")
                .range(range)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{}: get {range}: {e:?}", server.name));
            let bytes = got
                .body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{}: read {range}: {e:?}", server.name))
                .into_bytes();
            assert_eq!(&bytes[..], expected, "{}: {range}", server.name);
        }
    }
}
