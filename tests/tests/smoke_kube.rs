//! The kube-apiserver from tests/env accepts a CustomResourceDefinition, a custom
//! resource of it, and a Deployment through kube-rs.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, GroupVersionKind, PostParams};
use kube::discovery::ApiResource;
use serde_json::json;
use snapcache_tests::{TestEnv, unique_name};

#[tokio::test]
async fn crd_custom_resource_and_deployment() {
    let client = TestEnv::get().kube_client().await.expect("kube client");

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "smokes.smoke.snapcache.io"},
        "spec": {
            "group": "smoke.snapcache.io",
            "names": {"kind": "Smoke", "plural": "smokes", "singular": "smoke"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                }}}
            }]
        }
    }))
    .expect("crd json");
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        // A rerun against the same server finds it already there.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => panic!("create CRD: {err:?}"),
    }
    let established = kube::runtime::wait::await_condition(
        crds.clone(),
        "smokes.smoke.snapcache.io",
        kube::runtime::wait::conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .expect("CRD established within 30s")
        .expect("watch CRD");

    // The custom-resource POST is what crashes a kube-apiserver built without
    // Debian's reflect2 and json-iterator; it must succeed here.
    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("smoke.snapcache.io", "v1", "Smoke"));
    let smokes: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let name = unique_name("smoke");
    let smoke: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "smoke.snapcache.io/v1", "kind": "Smoke",
        "metadata": {"name": name}, "spec": {"size": 3}
    }))
    .expect("custom resource json");
    smokes
        .create(&PostParams::default(), &smoke)
        .await
        .expect("create custom resource");
    let fetched = smokes.get(&name).await.expect("get custom resource");
    assert_eq!(fetched.data["spec"]["size"], 3);

    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]}
            }
        }
    }))
    .expect("deployment json");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let fetched = deployments.get(&name).await.expect("get deployment");
    let containers = fetched
        .spec
        .and_then(|spec| spec.template.spec)
        .map(|pod| pod.containers)
        .unwrap_or_default();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].name, "main");
}
