//! `snapcache-operator release-workloads`, the chart's post-upgrade hook: versions before
//! the admission webhook patched the sidecar into Deployments and StatefulSets by
//! server-side apply, and held SnapshotCaches with a finalizer. This gives both up.
//!
//! An empty apply under the old field manager drops exactly the fields it owned (the
//! sidecar container and its volume), so each workload rolls once to pods that the
//! webhook injects again if a SnapshotCache still selects them.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::FIELD_MANAGER;
use crate::api::SnapshotCache;

/// The finalizer versions before the webhook put on every SnapshotCache.
pub const LEGACY_FINALIZER: &str = "snapcache.io/cleanup";

/// Whether the old operator's server-side apply owns part of the object's pod template.
pub fn patched_by_old_operator(managed_fields: &[ManagedFieldsEntry]) -> bool {
    managed_fields.iter().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.operation.as_deref() == Some("Apply")
            && entry
                .fields_v1
                .as_ref()
                .is_some_and(|fields| fields.0.pointer("/f:spec/f:template").is_some())
    })
}

/// Gives up what the old operator held; prints each object it changes, returns how many.
pub async fn release_workloads(client: &Client) -> Result<usize, kube::Error> {
    let mut released = release::<Deployment>(client).await?;
    released += release::<StatefulSet>(client).await?;
    let caches: Api<SnapshotCache> = Api::all(client.clone());
    for cache in caches.list(&ListParams::default()).await? {
        let finalizers = cache.finalizers();
        if !finalizers.iter().any(|f| f == LEGACY_FINALIZER) {
            continue;
        }
        let kept: Vec<&String> = finalizers
            .iter()
            .filter(|f| *f != LEGACY_FINALIZER)
            .collect();
        // The resourceVersion makes this a compare-and-swap: a concurrent change fails it.
        let patch = json!({"metadata": {
            "finalizers": kept, "resourceVersion": cache.resource_version(),
        }});
        let namespace = cache.namespace().unwrap_or_default();
        Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
            .patch(
                &cache.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        println!(
            "SnapshotCache {namespace}/{}: removed finalizer {LEGACY_FINALIZER}",
            cache.name_any()
        );
        released += 1;
    }
    Ok(released)
}

/// Releases the old operator's fields from every object of kind `K` it patched.
async fn release<K>(client: &Client) -> Result<usize, kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&());
    let mut released = 0;
    for object in Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        if !patched_by_old_operator(object.managed_fields()) {
            continue;
        }
        let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let intent = json!({
            "apiVersion": K::api_version(&()), "kind": kind, "metadata": {"name": name},
        });
        Api::<K>::namespaced(client.clone(), &namespace)
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&intent),
            )
            .await?;
        println!("{kind} {namespace}/{name}: removed the sidecar the previous operator patched in");
        released += 1;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;

    use super::*;

    fn entry(manager: &str, operation: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.to_owned()),
            operation: Some(operation.to_owned()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_old_operators_apply_of_a_pod_template_counts() {
        let template = json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {}}}}});
        assert!(patched_by_old_operator(&[
            entry("kubectl", "Update", template.clone()),
            entry(FIELD_MANAGER, "Apply", template.clone()),
        ]));
        assert!(!patched_by_old_operator(&[entry(
            "kubectl",
            "Apply",
            template.clone()
        )]));
        assert!(!patched_by_old_operator(&[entry(
            FIELD_MANAGER,
            "Update",
            template
        )]));
        // Released already: the manager may linger with nothing of the template.
        assert!(!patched_by_old_operator(&[entry(
            FIELD_MANAGER,
            "Apply",
            json!({})
        )]));
        assert!(!patched_by_old_operator(&[]));
    }
}
