//! Pod templates rendered by the operator's injection, and a node tier's DaemonSet and
//! NetworkPolicy, validated by kubernetes-validate against the Kubernetes 1.30 schemas:
//! the native-sidecar path cannot run on the 1.20 API server of the tests, so its
//! manifests are checked here.

use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::json;
use snapcache_operator::api::{InjectionMode, S3Spec, SnapshotCache, SnapshotCacheSpec};
use snapcache_operator::inject::{Environment, inject};
use snapcache_operator::node_tier;
use snapcache_tests::TestEnv;

fn deployment() -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "builder", "namespace": "ci"},
        "spec": {
            "selector": {"matchLabels": {"app": "builder"}},
            "template": {
                "metadata": {"labels": {"app": "builder"}},
                "spec": {"containers": [{"name": "build", "image": "builder:1"}]}
            }
        }
    }))
    .expect("deployment json")
}

fn json<T: k8s_openapi::serde::Serialize>(manifest: &T) -> serde_json::Value {
    serde_json::to_value(manifest).expect("json")
}

fn validate(manifest: &serde_json::Value, version: &str) -> Result<(), String> {
    let file = tempfile::Builder::new()
        .suffix(".json")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), serde_json::to_vec(manifest).expect("json")).expect("write");
    let validator = format!(
        "{}/kubernetes-validate",
        TestEnv::get().require("PYTHON_BIN")
    );
    let out = Command::new(validator)
        .args(["--strict", "-k", version])
        .arg(file.path())
        .output()
        .expect("run kubernetes-validate");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }
}

#[test]
fn injected_templates_validate_against_kubernetes_1_30() {
    for (mode, native) in [
        (InjectionMode::Native, true),
        (InjectionMode::Container, false),
    ] {
        let spec = SnapshotCacheSpec {
            selector: LabelSelector::default(),
            s3: S3Spec {
                bucket: "snapshots".into(),
                credentials_secret: Some("s3-creds".into()),
                ..Default::default()
            },
            sidecar: Default::default(),
            injection: mode,
            checkout: Default::default(),
            node_tier: serde_json::from_value(json!({"enabled": true})).expect("node tier"),
        };
        let env = Environment {
            default_image: "snapcache/sidecar:0.1.0",
            native_sidecars: native,
        };
        let mut manifest = deployment();
        if let Some(deployment_spec) = manifest.spec.as_mut() {
            deployment_spec.template = inject(&deployment_spec.template, &spec, &env);
        }
        validate(&json(&manifest), "1.30.0").unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        if native {
            // Containers had no restartPolicy before native sidecars: the validator notices.
            assert!(
                validate(&json(&manifest), "1.25.0").is_err(),
                "1.25 has no native sidecars"
            );
        }
    }
}

#[test]
fn a_node_tiers_daemon_set_and_network_policy_validate_against_kubernetes_1_30() {
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "monorepo", "namespace": "ci",
                     "uid": "5e0c7f4e-0000-4000-8000-000000000001"},
        "spec": {"selector": {}, "s3": {"bucket": "snapshots", "credentialsSecret": "s3-creds"},
                 "nodeTier": {"enabled": true, "resources": {"limits": {"memory": "1Gi"}}}},
    }))
    .expect("snapshot cache");
    let owner = node_tier::Owner::of(&cache).expect("owner");
    let env = Environment {
        default_image: "snapcache/sidecar:0.1.0",
        native_sidecars: true,
    };
    validate(
        &json(&node_tier::daemon_set(&owner, &cache.spec, &env)),
        "1.30.0",
    )
    .unwrap_or_else(|e| panic!("DaemonSet: {e}"));
    validate(
        &json(&node_tier::network_policy(&owner, &cache.spec)),
        "1.30.0",
    )
    .unwrap_or_else(|e| panic!("NetworkPolicy: {e}"));
}
