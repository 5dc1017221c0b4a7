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

/// What one pod wants on its endpoints: the few fields the controller writes, compact (one is
/// kept per pod): Calico's own labels are derived when compared, not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointWant {
    /// The datastore name of its primary endpoint, `<namespace>/<node>-k8s-<pod>-eth0`.
    pub endpoint: Box<str>,
    /// The pod's own labels, sorted by key.
    own_labels: Box<[(Box<str>, Box<str>)]>,
    /// Empty when the pod names none.
    pub service_account: Box<str>,
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
        let namespace = meta["namespace"].as_str().unwrap_or_default();
        let endpoint = format!("{namespace}/{}", meta["name"].as_str().unwrap_or_default()).into_boxed_str();
        let service_account: Box<str> = wep["spec"]["serviceAccountName"].as_str().unwrap_or_default().into();
        let mut want = EndpointWant { endpoint, own_labels: Box::new([]), service_account };
        let derived = want.calico_labels();
        want.own_labels = string_map(&meta["labels"])
            .into_iter()
            .filter(|(k, v)| derived.iter().all(|(dk, dv)| dk != k || dv != v))
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        Ok(Some(want))
    }

    /// The labels Calico adds to every Kubernetes endpoint (SPEC §6.5); they win over a pod
    /// label of the same key.
    fn calico_labels(&self) -> Vec<(String, String)> {
        let namespace = self.endpoint.split_once('/').map_or("", |(ns, _)| ns);
        let mut out = vec![("projectcalico.org/namespace".to_string(), namespace.to_string()), ("projectcalico.org/orchestrator".to_string(), "k8s".to_string())];
        if !self.service_account.is_empty() && self.service_account.len() < policy::MAX_SERVICE_ACCOUNT_LABEL {
            out.push(("projectcalico.org/serviceaccount".to_string(), self.service_account.to_string()));
        }
        out
    }

    /// Every label the endpoint should carry.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self.own_labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        out.extend(self.calico_labels());
        out
    }

    /// Whether the datastore endpoint `name` is one of this pod's on its current node:
    /// `<namespace>/<node>-k8s-<pod>-<endpoint>` (the primary one ends in `eth0`, others in their
    /// interface's name).
    pub fn names_endpoint(&self, name: &str) -> bool {
        let prefix = self.endpoint.strip_suffix("eth0").unwrap_or(&self.endpoint);
        name.len() > prefix.len() && name.starts_with(prefix)
    }

    /// The same want with other own labels (tests).
    #[cfg(test)]
    pub fn with_own_labels(&self, labels: &[(&str, &str)]) -> EndpointWant {
        EndpointWant { own_labels: labels.iter().map(|(k, v)| (Box::from(*k), Box::from(*v))).collect(), ..self.clone() }
    }

    /// Heap bytes this record holds (the controller's memory per pod).
    pub fn heap_bytes(&self) -> usize {
        self.endpoint.len() + self.service_account.len() + self.own_labels.iter().map(|(k, v)| k.len() + v.len() + size_of::<(Box<str>, Box<str>)>()).sum::<usize>()
    }

    /// The endpoint as it should be stored, `None` when `current` already has it. Only
    /// `metadata.labels` and `spec.serviceAccountName` change.
    pub fn patched(&self, current: &Value) -> Option<Value> {
        let labels_now = string_map(&current["metadata"]["labels"]);
        let sa_now = current["spec"]["serviceAccountName"].as_str().unwrap_or_default();
        let labels = self.labels();
        if labels_now == labels && sa_now == &*self.service_account {
            return None;
        }
        let mut out = current.clone();
        let root = out.as_object_mut()?;
        let meta = root.entry("metadata").or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
        meta.insert("labels".into(), Value::Object(labels.into_iter().map(|(k, v)| (k, Value::String(v))).collect()));
        let spec = root.entry("spec").or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
        if self.service_account.is_empty() {
            spec.remove("serviceAccountName");
        } else {
            spec.insert("serviceAccountName".into(), Value::String(self.service_account.to_string()));
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
        assert_eq!(&*w.endpoint, "shop/node--a-k8s-web--1-eth0");
        assert!(w.names_endpoint("shop/node--a-k8s-web--1-eth0") && w.names_endpoint("shop/node--a-k8s-web--1-net1"));
        assert!(!w.names_endpoint("shop/node--b-k8s-web--1-eth0"), "the endpoint left on a node the pod ran on before");
        assert_eq!(
            w.labels(),
            [("app", "web"), ("projectcalico.org/namespace", "shop"), ("projectcalico.org/orchestrator", "k8s"), ("projectcalico.org/serviceaccount", "frontend")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into()
        );
        assert_eq!(&*w.service_account, "frontend");
        assert_eq!(w.labels(), string_map(&policy::workload_endpoint(&pod(json!({"app": "web"}), "frontend")).unwrap()["metadata"]["labels"]), "as `convert` prints it");
        let mut spoof = pod(json!({"projectcalico.org/namespace": "other"}), "frontend");
        spoof["metadata"]["name"] = json!("web-1");
        assert_eq!(EndpointWant::of_pod(&spoof).unwrap().unwrap().labels()["projectcalico.org/namespace"], "shop", "Calico's label wins over a pod's");
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
        assert_eq!(string_map(&out["metadata"]["labels"]), w.labels());
        assert_eq!(out["spec"]["serviceAccountName"], "frontend");
        let mut rest = out.clone();
        rest["metadata"]["labels"] = current["metadata"]["labels"].clone();
        rest["spec"]["serviceAccountName"] = current["spec"]["serviceAccountName"].clone();
        assert_eq!(rest, current, "every other field is the CNI plugin's and stays");
        assert_eq!(w.patched(&out), None, "in step: nothing to write");
        let none = EndpointWant { service_account: "".into(), ..w.clone() };
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

    #[test]
    fn a_typical_pods_record_stays_small() {
        // A Deployment's pod: app, pod-template-hash and version labels, plus Calico's three.
        let p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "checkout-7d9f8b6c4-x2x9k", "namespace": "shop",
            "labels": {"app": "checkout", "pod-template-hash": "7d9f8b6c4", "version": "v1.42.0"}},
            "spec": {"nodeName": "ip-10-0-12-34.eu-west-1.compute.internal", "serviceAccountName": "checkout"}});
        let w = EndpointWant::of_pod(&p).unwrap().unwrap();
        let bytes = w.heap_bytes() + size_of::<EndpointWant>();
        eprintln!("endpoint want of a typical pod: {bytes} bytes");
        assert!(bytes < 400, "{bytes} bytes per pod");
    }
}
