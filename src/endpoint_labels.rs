//! The workload-endpoint controller's rule, pure (SPEC §6.5): which labels and service account a
//! pod wants on its WorkloadEndpoints, and what an update writes.
//!
//! Owns: the trimmed per-pod record the controller keeps ([`EndpointWant`]: never the pod), which
//! pod a stored endpoint belongs to, and the patch (labels and `spec.serviceAccountName` only;
//! every other field, the CNI plugin's, is kept as stored).
//! Must not: create or delete an endpoint (the CNI plugin owns their lifetime), or do I/O.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::policy::{self, ConvertError};

/// What one pod wants on its endpoints: the few fields the controller writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointWant {
    /// The datastore name of its primary endpoint, `<namespace>/<node>-k8s-<pod>-eth0`.
    pub endpoint: String,
    pub labels: BTreeMap<String, String>,
    /// Empty when the pod names none.
    pub service_account: String,
}

impl EndpointWant {
    /// The pod's wanted fields; `Ok(None)` for a pod with no endpoint (host network, not
    /// scheduled). Built from the same conversion `convert` prints.
    pub fn of_pod(pod: &Value) -> Result<Option<EndpointWant>, ConvertError> {
        let wep = match policy::workload_endpoint(pod) {
            Ok(w) => w,
            Err(ConvertError::NotApplicable(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = &wep["metadata"];
        let endpoint = format!("{}/{}", meta["namespace"].as_str().unwrap_or_default(), meta["name"].as_str().unwrap_or_default());
        let labels = string_map(&meta["labels"]);
        let service_account = wep["spec"]["serviceAccountName"].as_str().unwrap_or_default().to_string();
        Ok(Some(EndpointWant { endpoint, labels, service_account }))
    }

    /// Heap bytes this record holds (the controller's memory per pod, for the metrics and docs).
    pub fn heap_bytes(&self) -> usize {
        self.endpoint.capacity() + self.service_account.capacity() + self.labels.iter().map(|(k, v)| k.capacity() + v.capacity() + 3 * size_of::<String>()).sum::<usize>()
    }

    /// The endpoint as it should be stored, `None` when `current` already has it. Only
    /// `metadata.labels` and `spec.serviceAccountName` change.
    pub fn patched(&self, current: &Value) -> Option<Value> {
        let labels_now = string_map(&current["metadata"]["labels"]);
        let sa_now = current["spec"]["serviceAccountName"].as_str().unwrap_or_default();
        if labels_now == self.labels && sa_now == self.service_account {
            return None;
        }
        let mut out = current.clone();
        let root = out.as_object_mut()?;
        let meta = root.entry("metadata").or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
        meta.insert("labels".into(), Value::Object(self.labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()));
        let spec = root.entry("spec").or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
        if self.service_account.is_empty() {
            spec.remove("serviceAccountName");
        } else {
            spec.insert("serviceAccountName".into(), Value::String(self.service_account.clone()));
        }
        Some(out)
    }
}

/// The `<namespace>/<pod>` a stored endpoint belongs to: a Kubernetes endpoint (`spec.orchestrator`
/// `k8s`) names its pod in `spec.pod`; other orchestrators' endpoints belong to no pod.
pub fn pod_of(namespace: &str, endpoint: &Value) -> Option<String> {
    let spec = &endpoint["spec"];
    if spec["orchestrator"].as_str() != Some("k8s") {
        return None;
    }
    let pod = spec["pod"].as_str().filter(|p| !p.is_empty())?;
    Some(format!("{namespace}/{pod}"))
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object().map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, sa: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop", "labels": labels},
            "spec": {"nodeName": "node-a", "serviceAccountName": sa}, "status": {"podIP": "10.0.0.1"}})
    }

    fn endpoint(labels: Value) -> Value {
        json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": "node--a-k8s-web--1-eth0", "namespace": "shop", "labels": labels, "resourceVersion": "7"},
            "spec": {"orchestrator": "k8s", "node": "node-a", "pod": "web-1", "endpoint": "eth0", "containerID": "abc",
                "ipNetworks": ["10.0.0.1/32"], "profiles": ["kns.shop"], "serviceAccountName": "old"}})
    }

    #[test]
    fn a_pod_wants_its_labels_with_calicos_three_and_its_service_account() {
        let w = EndpointWant::of_pod(&pod(json!({"app": "web"}), "frontend")).unwrap().unwrap();
        assert_eq!(w.endpoint, "shop/node--a-k8s-web--1-eth0");
        assert_eq!(
            w.labels,
            [("app", "web"), ("projectcalico.org/namespace", "shop"), ("projectcalico.org/orchestrator", "k8s"), ("projectcalico.org/serviceaccount", "frontend")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into()
        );
        assert_eq!(w.service_account, "frontend");
        assert!(w.heap_bytes() > 100);
        let mut host = pod(json!({}), "x");
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(EndpointWant::of_pod(&host).unwrap(), None, "host network: no endpoint");
        let mut pending = pod(json!({}), "x");
        pending["spec"]["nodeName"] = json!("");
        assert_eq!(EndpointWant::of_pod(&pending).unwrap(), None, "not scheduled: no endpoint");
        let mut bad = pod(json!({}), "x");
        bad["metadata"]["labels"] = json!("not a map");
        assert!(EndpointWant::of_pod(&bad).is_err(), "a malformed pod is an error, not an empty want");
    }

    #[test]
    fn the_patch_changes_labels_and_service_account_only_and_nothing_when_in_step() {
        let w = EndpointWant::of_pod(&pod(json!({"app": "web"}), "frontend")).unwrap().unwrap();
        let current = endpoint(json!({"app": "old", "stale": "x"}));
        let out = w.patched(&current).expect("labels differ");
        assert_eq!(string_map(&out["metadata"]["labels"]), w.labels);
        assert_eq!(out["spec"]["serviceAccountName"], "frontend");
        let mut rest = out.clone();
        rest["metadata"]["labels"] = current["metadata"]["labels"].clone();
        rest["spec"]["serviceAccountName"] = current["spec"]["serviceAccountName"].clone();
        assert_eq!(rest, current, "every other field is the CNI plugin's and stays");
        assert_eq!(w.patched(&out), None, "in step: nothing to write");
        let none = EndpointWant { service_account: String::new(), ..w.clone() };
        let cleared = none.patched(&out).unwrap();
        assert!(cleared["spec"].get("serviceAccountName").is_none());
        assert_eq!(none.patched(&cleared), None);
    }

    #[test]
    fn an_endpoint_belongs_to_the_pod_its_spec_names_only_when_kubernetes_made_it() {
        assert_eq!(pod_of("shop", &endpoint(json!({}))).as_deref(), Some("shop/web-1"));
        let mut other = endpoint(json!({}));
        other["spec"]["orchestrator"] = json!("openstack");
        assert_eq!(pod_of("shop", &other), None);
        assert_eq!(pod_of("shop", &json!({"spec": {"orchestrator": "k8s"}})), None);
    }
}
