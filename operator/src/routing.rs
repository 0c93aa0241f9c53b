//! Which pod creations the API server sends to the webhook, pure: one entry of the
//! MutatingWebhookConfiguration per SnapshotCache, each a copy of the chart's entry
//! narrowed to the SnapshotCache's pod selector (`objectSelector`) and, where namespaces
//! carry their name as a label (Kubernetes 1.21+), to its namespace. Pods and namespaces
//! no SnapshotCache could select then never reach the webhook.
//!
//! The chart's entry is kept in an annotation of the configuration, so the operator can
//! rebuild the list from it whenever SnapshotCaches change; a configuration without the
//! annotation (one a person wrote) keeps its entries as they are.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::ResourceExt;

use crate::api::SnapshotCache;

/// The annotation holding the chart's entry as JSON.
pub const TEMPLATE_ANNOTATION: &str = "snapcache.io/webhook-template";
/// The label Kubernetes 1.21+ puts on every namespace, its name as the value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The suffix of every entry's name.
const ENTRY_SUFFIX: &str = "pods.snapcache.io";

/// Namespaces carry `kubernetes.io/metadata.name` from Kubernetes 1.21.
pub fn namespaces_carry_their_name(major: &str, minor: &str) -> bool {
    let number = |text: &str| text.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    (number(major), number(minor)) >= (1, 21)
}

/// The entries the configuration should have, or `None` when it has no template. They
/// carry `ca_bundle`, or while there is none yet the one its entries carry now.
pub fn desired(
    configuration: &MutatingWebhookConfiguration,
    caches: &[SnapshotCache],
    ca_bundle: Option<ByteString>,
    by_namespace_name: bool,
) -> Option<Vec<MutatingWebhook>> {
    let template = configuration.annotations().get(TEMPLATE_ANNOTATION)?;
    let mut template: MutatingWebhook = match serde_json::from_str(template) {
        Ok(template) => template,
        Err(err) => {
            tracing::warn!(%err, "the webhook configuration's {TEMPLATE_ANNOTATION} annotation is not an entry; leaving its entries alone");
            return None;
        }
    };
    template.client_config.ca_bundle = ca_bundle.or_else(|| {
        configuration
            .webhooks
            .iter()
            .flatten()
            .find_map(|webhook| webhook.client_config.ca_bundle.clone())
    });
    Some(entries(&template, caches, by_namespace_name))
}

/// One copy of `template` per valid, live SnapshotCache, sorted by namespace and name.
pub fn entries(
    template: &MutatingWebhook,
    caches: &[SnapshotCache],
    by_namespace_name: bool,
) -> Vec<MutatingWebhook> {
    let mut live: Vec<&SnapshotCache> = caches
        .iter()
        .filter(|cache| cache.metadata.deletion_timestamp.is_none())
        // An invalid selector selects nothing (the controller reports it).
        .filter(|cache| kube::core::Selector::try_from(cache.spec.selector.clone()).is_ok())
        .collect();
    live.sort_by_key(|cache| (cache.namespace(), cache.name_any()));
    live.into_iter()
        .map(|cache| {
            let namespace = cache.namespace().unwrap_or_default();
            let mut entry = with_defaults(template.clone());
            entry.name = entry_name(&namespace, &cache.name_any());
            entry.object_selector = Some(both(
                entry.object_selector.take(),
                cache.spec.selector.clone(),
            ));
            if by_namespace_name {
                let only_this = LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: NAMESPACE_NAME_LABEL.to_owned(),
                        operator: "In".to_owned(),
                        values: Some(vec![namespace]),
                    }]),
                    ..Default::default()
                };
                entry.namespace_selector = Some(both(entry.namespace_selector.take(), only_this));
            }
            entry
        })
        .collect()
}

/// `<cache>.<namespace>.pods.snapcache.io`: unique, since a namespace has no dots. One too
/// long for a name takes a hash of both instead.
pub fn entry_name(namespace: &str, cache: &str) -> String {
    let name = format!("{cache}.{namespace}.{ENTRY_SUFFIX}");
    if name.len() <= 253 {
        return name;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (namespace, cache).hash(&mut hasher);
    format!("{:016x}.{ENTRY_SUFFIX}", hasher.finish())
}

/// A selector that matches what both match.
fn both(first: Option<LabelSelector>, second: LabelSelector) -> LabelSelector {
    let first = first.unwrap_or_default();
    let mut labels: BTreeMap<String, String> = first.match_labels.unwrap_or_default();
    labels.extend(second.match_labels.unwrap_or_default());
    let mut expressions = first.match_expressions.unwrap_or_default();
    expressions.extend(second.match_expressions.unwrap_or_default());
    LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!expressions.is_empty()).then_some(expressions),
    }
}

/// The fields the API server defaults, filled in the same way, so that an entry read back
/// equals the one written and an unchanged list is not written again.
fn with_defaults(mut entry: MutatingWebhook) -> MutatingWebhook {
    entry
        .match_policy
        .get_or_insert_with(|| "Equivalent".to_owned());
    entry
        .failure_policy
        .get_or_insert_with(|| "Fail".to_owned());
    entry
        .reinvocation_policy
        .get_or_insert_with(|| "Never".to_owned());
    entry.timeout_seconds.get_or_insert(10);
    entry
        .namespace_selector
        .get_or_insert_with(Default::default);
    if let Some(service) = entry.client_config.service.as_mut() {
        service.port.get_or_insert(443);
    }
    for rule in entry.rules.iter_mut().flatten() {
        rule.scope.get_or_insert_with(|| "*".to_owned());
    }
    entry
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template() -> MutatingWebhook {
        serde_json::from_value(json!({
            "name": "pods.snapcache.io",
            "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Ignore", "timeoutSeconds": 5, "reinvocationPolicy": "IfNeeded",
            "clientConfig": {"service": {"name": "snapcache-webhook", "namespace": "snapcache-system", "path": "/mutate"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchExpressions": [{"key": "snapcache.io/inject", "operator": "NotIn", "values": ["false"]}]},
            "objectSelector": {"matchExpressions": [{"key": "snapcache.io/inject", "operator": "NotIn", "values": ["false"]}]},
        }))
        .expect("template")
    }

    fn cache(namespace: &str, name: &str, selector: serde_json::Value) -> SnapshotCache {
        serde_json::from_value(json!({
            "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": selector, "s3": {"bucket": "snapshots"}}
        }))
        .expect("cache")
    }

    fn configuration(annotation: Option<String>, ca: Option<&str>) -> MutatingWebhookConfiguration {
        let mut entry = template();
        entry.client_config.ca_bundle = ca.map(|ca| ByteString(ca.as_bytes().to_vec()));
        let mut configuration = MutatingWebhookConfiguration {
            webhooks: Some(vec![entry]),
            ..Default::default()
        };
        if let Some(annotation) = annotation {
            configuration
                .annotations_mut()
                .insert(TEMPLATE_ANNOTATION.to_owned(), annotation);
        }
        configuration
    }

    #[test]
    fn each_cache_gets_an_entry_narrowed_to_its_pods_keeping_the_opt_out() {
        let caches = [
            cache("ci", "builds", json!({"matchLabels": {"app": "build"}})),
            cache(
                "ci",
                "tests",
                json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
            ),
        ];
        let entries = entries(&template(), &caches, false);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "builds.ci.pods.snapcache.io");
        let objects = serde_json::to_value(&entries[0].object_selector).expect("json");
        assert_eq!(
            objects,
            json!({"matchLabels": {"app": "build"},
                   "matchExpressions": [{"key": "snapcache.io/inject", "operator": "NotIn", "values": ["false"]}]})
        );
        let tests = serde_json::to_value(&entries[1].object_selector).expect("json");
        assert_eq!(tests["matchExpressions"].as_array().map(Vec::len), Some(2));
        // Without namespace names (1.20), the namespace selector stays the chart's.
        assert_eq!(entries[0].namespace_selector, template().namespace_selector);
        assert_eq!(entries[0].failure_policy.as_deref(), Some("Ignore"));
    }

    #[test]
    fn with_namespace_names_an_entry_reaches_its_own_namespace_only() {
        let caches = [cache(
            "ci",
            "builds",
            json!({"matchLabels": {"app": "build"}}),
        )];
        let entries = entries(&template(), &caches, true);
        let namespaces = serde_json::to_value(&entries[0].namespace_selector).expect("json");
        assert_eq!(
            namespaces["matchExpressions"][1],
            json!({"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": ["ci"]})
        );
    }

    #[test]
    fn deleted_and_invalid_caches_get_no_entry_and_no_cache_means_no_call() {
        let mut deleted = cache("ci", "gone", json!({"matchLabels": {"app": "x"}}));
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let invalid = cache(
            "ci",
            "bad",
            json!({"matchExpressions": [{"key": "a", "operator": "Sometimes"}]}),
        );
        assert!(entries(&template(), &[deleted, invalid], true).is_empty());
    }

    #[test]
    fn desired_entries_come_from_the_annotation_and_keep_the_ca_bundle() {
        let annotation = serde_json::to_string(&template()).expect("json");
        let caches = [cache(
            "ci",
            "builds",
            json!({"matchLabels": {"app": "build"}}),
        )];
        let live = configuration(Some(annotation), Some("CA"));
        let wanted = desired(&live, &caches, None, false).expect("a template");
        assert_eq!(
            wanted[0].client_config.ca_bundle,
            Some(ByteString(b"CA".to_vec()))
        );
        let renewed = Some(ByteString(b"NEW".to_vec()));
        let wanted = desired(&live, &caches, renewed.clone(), false).expect("a template");
        assert_eq!(wanted[0].client_config.ca_bundle, renewed);
        assert!(desired(&configuration(None, Some("CA")), &caches, None, false).is_none());
        let broken = configuration(Some("not json".to_owned()), None);
        assert!(desired(&broken, &caches, None, false).is_none());
    }

    #[test]
    fn entries_carry_the_api_servers_defaults_so_a_read_back_list_compares_equal() {
        let entry = &entries(&template(), &[cache("ci", "b", json!({}))], false)[0];
        assert_eq!(entry.match_policy.as_deref(), Some("Equivalent"));
        assert_eq!(
            entry.client_config.service.as_ref().and_then(|s| s.port),
            Some(443)
        );
        assert_eq!(
            entry.rules.as_ref().expect("rules")[0].scope.as_deref(),
            Some("*")
        );
    }

    #[test]
    fn names_are_unique_and_never_too_long() {
        assert_ne!(entry_name("a", "b.c"), entry_name("a.b", "c"));
        let long = entry_name("ci", &"x".repeat(253));
        assert!(long.len() <= 253 && long.ends_with(ENTRY_SUFFIX), "{long}");
    }

    #[test]
    fn namespace_names_arrive_in_1_21() {
        assert!(namespaces_carry_their_name("1", "21"));
        assert!(namespaces_carry_their_name("1", "30+"));
        assert!(!namespaces_carry_their_name("1", "20"));
    }
}
