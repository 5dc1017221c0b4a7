//! Namespace and ServiceAccount -> Profile (SPEC §6.2, §6.3) and Pod -> the WorkloadEndpoint fields
//! the pod controller owns (§6.5): name, namespace, labels and `serviceAccountName`.
//!
//! Must not: do I/O or panic on any JSON. Everything else on a WorkloadEndpoint (IPs, container
//! ID, profiles) belongs to the CNI plugin and is left out.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::json::{boolean, envelope, object, string, string_map};
use super::{API_VERSION, ConvertError};

/// Profiles for namespaces are `kns.<namespace>`.
pub const NAMESPACE_PROFILE_PREFIX: &str = "kns.";
/// Profiles for service accounts are `ksa.<namespace>.<name>`.
pub const SERVICE_ACCOUNT_PROFILE_PREFIX: &str = "ksa.";
/// Label prefix a namespace's labels get on its profile.
const NAMESPACE_LABEL_PREFIX: &str = "pcns.";
/// Label prefix a service account's labels get on its profile.
const SERVICE_ACCOUNT_LABEL_PREFIX: &str = "pcsa.";
/// The label (after the prefix) holding the object's own name.
const NAME_LABEL: &str = "projectcalico.org/name";
/// Upstream adds the service-account label only below this length (a label value holds 63).
pub const MAX_SERVICE_ACCOUNT_LABEL: usize = 63;

/// The Profile `kns.<namespace>` for a Namespace: allow-all rules and the namespace's labels.
pub fn namespace_profile(ns: &Value) -> Result<Value, ConvertError> {
    let ns = envelope(ns, "Namespace").map_err(ConvertError::Malformed)?;
    let name = ns.name;
    let labels = prefixed_labels(ns.meta, NAMESPACE_LABEL_PREFIX, name)?;
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": "Profile",
        "metadata": {"name": format!("{NAMESPACE_PROFILE_PREFIX}{name}")},
        "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}], "labelsToApply": labels},
    }))
}

/// The Profile `ksa.<namespace>.<name>` for a ServiceAccount: only its labels, no rules.
pub fn service_account_profile(sa: &Value) -> Result<Value, ConvertError> {
    let sa = envelope(sa, "ServiceAccount").map_err(ConvertError::Malformed)?;
    let (name, namespace) = (sa.name, sa.namespace);
    let labels = prefixed_labels(sa.meta, SERVICE_ACCOUNT_LABEL_PREFIX, name)?;
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": "Profile",
        "metadata": {"name": format!("{SERVICE_ACCOUNT_PROFILE_PREFIX}{namespace}.{name}")},
        "spec": {"labelsToApply": labels},
    }))
}

/// `prefix + k` for every label, plus `prefix + projectcalico.org/name` holding `name`.
fn prefixed_labels(meta: &Map<String, Value>, prefix: &str, name: &str) -> Result<BTreeMap<String, String>, ConvertError> {
    let mut out: BTreeMap<String, String> =
        string_map(meta, "labels", "metadata").map_err(ConvertError::Malformed)?.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v.to_string())).collect();
    out.insert(format!("{prefix}{NAME_LABEL}"), name.to_string());
    Ok(out)
}

/// The part of a pod's WorkloadEndpoint that the pod controller keeps in sync.
///
/// A pod that is not scheduled yet, or uses the host's network, has no WorkloadEndpoint:
/// [`ConvertError::NotApplicable`].
pub fn workload_endpoint(pod: &Value) -> Result<Value, ConvertError> {
    let pod = envelope(pod, "Pod").map_err(ConvertError::Malformed)?;
    let (name, namespace, meta) = (pod.name, pod.namespace, pod.meta);
    let empty = Map::new();
    let spec = object(pod.top, "spec", "Pod").map_err(ConvertError::Malformed)?.unwrap_or(&empty);
    let node = string(spec, "nodeName", "spec").map_err(ConvertError::Malformed)?.unwrap_or("");
    let host_network = boolean(spec, "hostNetwork", "spec").map_err(ConvertError::Malformed)?;
    let service_account = string(spec, "serviceAccountName", "spec").map_err(ConvertError::Malformed)?.unwrap_or("");
    if host_network {
        return Err(ConvertError::NotApplicable(format!("pod {namespace}/{name} uses the host's network")));
    }
    if node.is_empty() {
        return Err(ConvertError::NotApplicable(format!("pod {namespace}/{name} is not scheduled to a node")));
    }
    // Doubled dashes only decode unambiguously between non-dash ends; upstream refuses the rest
    // (Kubernetes names never start or end with one).
    for (what, part) in [("node", node), ("pod", name)] {
        if part.starts_with('-') || part.ends_with('-') {
            return Err(ConvertError::Malformed(format!("pod {namespace}/{name}: {what} name {part:?} starts or ends with '-'")));
        }
    }
    let mut labels: BTreeMap<String, String> =
        string_map(meta, "labels", "metadata").map_err(ConvertError::Malformed)?.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    labels.insert("projectcalico.org/namespace".into(), namespace.to_string());
    labels.insert("projectcalico.org/orchestrator".into(), "k8s".into());
    if !service_account.is_empty() && service_account.len() < MAX_SERVICE_ACCOUNT_LABEL {
        labels.insert("projectcalico.org/serviceaccount".into(), service_account.to_string());
    }
    let mut spec_out = Map::new();
    if !service_account.is_empty() {
        spec_out.insert("serviceAccountName".into(), json!(service_account));
    }
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": "WorkloadEndpoint",
        "metadata": {"name": workload_endpoint_name(node, name), "namespace": namespace, "labels": labels},
        "spec": spec_out,
    }))
}

/// Calico's WorkloadEndpoint name for a pod: node, "k8s", pod, "eth0", each with '-' doubled, joined by '-'.
///
/// The name only decodes back when node and pod neither start nor end with '-', which
/// [`workload_endpoint`] checks (this function does not).
pub fn workload_endpoint_name(node: &str, pod: &str) -> String {
    [node, "k8s", pod, "eth0"].iter().map(|part| part.replace('-', "--")).collect::<Vec<_>>().join("-")
}
