//! The generated SnapshotCache CRD on the real API server: accepted, and its schema
//! refuses bad resources with the schema's own message.

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::{TestEnv, install_snapshot_cache_crd, unique_name};

async fn snapshot_caches() -> Api<SnapshotCache> {
    let client = TestEnv::get().kube_client().await.expect("kube client");
    install_snapshot_cache_crd(&client).await;
    Api::namespaced(client, "default")
}

fn resource(name: &str, spec: serde_json::Value) -> SnapshotCache {
    serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1",
        "kind": "SnapshotCache",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("SnapshotCache json")
}

#[tokio::test]
async fn a_valid_snapshot_cache_is_stored_with_its_defaults() {
    let caches = snapshot_caches().await;
    let name = unique_name("valid");
    let cache = resource(
        &name,
        json!({"selector": {"matchLabels": {"app": "builder"}}, "s3": {"bucket": "snapshots"},
               "sidecar": {"parallelGetWorkers": 8, "diskSize": "20Gi"}}),
    );
    caches
        .create(&PostParams::default(), &cache)
        .await
        .expect("create");
    let stored = caches.get(&name).await.expect("get");
    assert_eq!(stored.spec.s3.bucket, "snapshots");
    assert_eq!(stored.spec.sidecar.parallel_get_workers, Some(8));
    assert_eq!(
        stored.spec.injection,
        snapcache_operator::api::InjectionMode::Auto
    );
}

#[tokio::test]
async fn the_schema_refuses_bad_resources_with_its_message() {
    let caches = snapshot_caches().await;
    let cases = [
        (json!({"s3": {"bucket": "snapshots"}}), "selector"),
        (
            json!({"selector": {}, "s3": {"bucket": "ab"}}),
            "spec.s3.bucket",
        ),
        (
            json!({"selector": {}, "s3": {"bucket": "snapshots"}, "sidecar": {"parallelGetWorkers": 0}}),
            "parallelGetWorkers",
        ),
        (
            json!({"selector": {}, "s3": {"bucket": "snapshots"}, "injection": "sideways"}),
            "injection",
        ),
        (
            json!({"selector": {}, "s3": {"bucket": "snapshots"}, "sidecar": {"port": 70000}}),
            "port",
        ),
        (
            json!({"selector": {}, "s3": {"bucket": "snapshots"},
                   "nodeTier": {"enabled": true, "hostPath": "/var/../etc"}}),
            "spec.nodeTier.hostPath",
        ),
        (
            json!({"selector": {}, "s3": {"bucket": "snapshots"},
                   "nodeTier": {"enabled": true, "adminPort": 0}}),
            "spec.nodeTier.adminPort",
        ),
    ];
    // Raw JSON: the typed struct could not even express some of these.
    let raw: Api<DynamicObject> = Api::namespaced_with(
        caches.into_client(),
        "default",
        &ApiResource::erase::<SnapshotCache>(&()),
    );
    for (spec, field) in cases {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
            "metadata": {"name": unique_name("invalid")}, "spec": spec,
        }))
        .expect("dynamic object");
        match raw.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{field}: {status:?}");
                assert!(
                    status.message.contains(field),
                    "{field} not named in: {}",
                    status.message
                );
            }
            other => panic!("{field}: the API server took a bad resource: {other:?}"),
        }
    }
}
