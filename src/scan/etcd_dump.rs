//! `etcdctl get --prefix /calico/ -w json` output as a dump part: the keys of Calico's etcd
//! datastore turned into the KDD-shaped objects the rest of the dump reader takes, through the
//! etcd backend's own key layout and value conversion ([`crate::datastore::etcd_layout`]).
//!
//! Owns: recognising etcdctl's JSON (`header` + `kvs`, keys and values base64), which keys hold
//! which kind, and what a Calico Node says about the Kubernetes node it stands for.
//! Must not: read files, talk to etcd, or decide anything: an undecodable key or value is
//! reported as invalid, a key of no kind the scan reads is skipped.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::Value;

use crate::datastore::etcd_layout::{from_etcd_value, parse_key};
use crate::datastore::{CalicoNodeView, Kind};
use crate::model::InvalidObject;

/// The kinds an etcd dump contributes, tried in this order for each key.
const KINDS: [Kind; 9] = [
    Kind::IpamBlock,
    Kind::BlockAffinity,
    Kind::IpamHandle,
    Kind::IpamConfig,
    Kind::IpPool,
    Kind::IpReservation,
    Kind::ClusterInformation,
    Kind::KubeControllersConfiguration,
    Kind::CalicoNode,
];

/// One key of the dump, as the reader takes it.
#[derive(Debug)]
pub enum EtcdItem {
    /// A KDD-shaped object (JSON), to be read like any dump object.
    Object(Vec<u8>),
    /// A Calico Node: its name and the Kubernetes node its `k8s` orchRef names.
    CalicoNode { name: String, k8s_node: Option<String> },
    Invalid(InvalidObject),
}

#[derive(Deserialize)]
struct EtcdctlOutput {
    header: Value,
    kvs: Vec<Value>,
}

fn num(v: &Value) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn decoded(kv: &Value, field: &str) -> Result<Vec<u8>, String> {
    match kv.get(field).and_then(Value::as_str) {
        Some(s) => B64.decode(s).map_err(|e| format!("{field} is not base64: {e}")),
        None => Ok(Vec::new()),
    }
}

/// The items of `bytes` if it is etcdctl's JSON output (an object with `header` and `kvs`),
/// else `None`. Its revision is not a Kubernetes resourceVersion, so it orders nothing.
pub fn read(bytes: &[u8]) -> Option<Vec<EtcdItem>> {
    let out: EtcdctlOutput = serde_json::from_slice(bytes).ok()?;
    if !out.header.is_object() {
        return None;
    }
    Some(out.kvs.iter().enumerate().filter_map(|(i, kv)| item(i, kv)).collect())
}

fn item(position: usize, kv: &Value) -> Option<EtcdItem> {
    let invalid = |problem: String| Some(EtcdItem::Invalid(InvalidObject::new("<etcd key>", &format!("kvs[{position}]"), problem)));
    let key = match decoded(kv, "key").and_then(|k| String::from_utf8(k).map_err(|_| "key is not UTF-8".to_string())) {
        Ok(k) => k,
        Err(problem) => return invalid(problem),
    };
    let value = match decoded(kv, "value") {
        Ok(v) => v,
        Err(problem) => return invalid(format!("{key}: {problem}")),
    };
    let kind = KINDS.into_iter().find(|k| parse_key(*k, &key).is_some())?;
    match from_etcd_value(kind, &key, &value, num(&kv["mod_revision"]), num(&kv["create_revision"])) {
        Err(e) => Some(EtcdItem::Invalid(InvalidObject::new(kind.kind_name(), &key, e.message))),
        Ok(stored) if kind == Kind::CalicoNode => {
            let k8s_node = match CalicoNodeView::of_node(&stored.value) {
                CalicoNodeView::Present { k8s_node } => k8s_node,
                _ => None,
            };
            Some(EtcdItem::CalicoNode { name: stored.name, k8s_node })
        }
        Ok(stored) => serde_json::to_vec(&stored.value).ok().map(EtcdItem::Object),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(key: &str, value: &str, rev: i64) -> Value {
        json!({"key": B64.encode(key), "value": B64.encode(value), "create_revision": rev, "mod_revision": rev, "version": 1})
    }

    #[test]
    fn etcdctl_output_becomes_kdd_shaped_objects_and_calico_node_names() {
        let out = json!({"header": {"revision": 9}, "count": 5, "kvs": [
            kv("/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-30", r#"{"cidr":"10.0.0.0/30","affinity":"host:cn","allocations":[0,null,null,null],"unallocated":[1,2,3],"attributes":[{"handle_id":"H","secondary":{"node":"cn"}}],"deleted":false}"#, 5),
            kv("/calico/ipam/v2/handle/k8s-pod-network.AbC", r#"{"block":{"10.0.0.0/30":1},"deleted":false}"#, 6),
            kv("/calico/resources/v3/projectcalico.org/nodes/cn", r#"{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"cn"},"spec":{"orchRefs":[{"orchestrator":"k8s","nodeName":"kn"}]}}"#, 7),
            kv("/calico/resources/v3/projectcalico.org/workloadendpoints/ns/x", "{}", 8),
            kv("/calico/ipam/v2/handle/broken", "not json", 9),
        ]});
        let items = read(out.to_string().as_bytes()).expect("etcdctl output");
        assert_eq!(items.len(), 4, "the workload endpoint is no kind the scan reads: {items:?}");
        let EtcdItem::Object(block) = &items[0] else { panic!("{:?}", items[0]) };
        let block: Value = serde_json::from_slice(block).unwrap();
        assert_eq!((block["kind"].as_str(), block["metadata"]["name"].as_str(), block["metadata"]["resourceVersion"].as_str()), (Some("IPAMBlock"), Some("10-0-0-0-30"), Some("5")));
        let EtcdItem::Object(handle) = &items[1] else { panic!() };
        let handle: Value = serde_json::from_slice(handle).unwrap();
        assert_eq!(handle["spec"]["handleID"], "k8s-pod-network.AbC", "the ID as etcd keeps it");
        assert!(matches!(&items[2], EtcdItem::CalicoNode { name, k8s_node: Some(k) } if name == "cn" && k == "kn"));
        assert!(matches!(&items[3], EtcdItem::Invalid(e) if e.name.contains("broken")));
        // Anything else is not etcdctl output.
        assert!(read(br#"{"kind":"List","items":[]}"#).is_none());
        assert!(read(b"[1,2]").is_none());
        let bad_key = json!({"header": {}, "kvs": [{"key": "%%%"}]});
        assert!(matches!(read(bad_key.to_string().as_bytes()).unwrap().as_slice(), [EtcdItem::Invalid(_)]));
    }

    #[test]
    fn an_etcd_dump_beside_kubernetes_nodes_names_each_node_as_its_calico_nodes_do() {
        let etcd = json!({"header": {"revision": 3}, "kvs": [
            kv("/calico/resources/v3/projectcalico.org/nodes/cn", r#"{"metadata":{"name":"cn"},"spec":{"orchRefs":[{"orchestrator":"k8s","nodeName":"kn"}]}}"#, 1),
            kv("/calico/resources/v3/projectcalico.org/nodes/bare", r#"{"metadata":{"name":"bare"},"spec":{}}"#, 2),
            kv("/calico/resources/v3/projectcalico.org/nodes/orphan", r#"{"metadata":{"name":"orphan"},"spec":{"orchRefs":[{"orchestrator":"k8s","nodeName":"gone"}]}}"#, 3),
        ]});
        let nodes = json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
            "items": [{"kind": "Node", "metadata": {"name": "kn", "labels": {"projectcalico.org/node-network-during-migration": "flannel"}}}]});
        let text = format!("{etcd}\n{nodes}");
        let c = crate::scan::dump::read_bytes("dump.json", text.as_bytes()).unwrap();
        assert_eq!(c.kind_counts.get("CalicoNode"), Some(&3), "{:?} {:?}", c.kind_counts, c.invalid);
        let mut names: Vec<&str> = c.nodes.iter().map(|n| n.metadata.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["bare", "cn", "kn"], "{:?} {:?}: orphan's Kubernetes node is gone: no node of that name", c.kind_counts, c.invalid);
        let cn = c.nodes.iter().find(|n| n.metadata.name == "cn").unwrap();
        assert!(cn.migration_in_progress(), "the Kubernetes node's labels come along");
        // Calico's etcd revisions do not order against the Kubernetes Lists'.
        assert!(c.etcd_dump);
        let order = crate::scan::order::dump_order(&c);
        assert_eq!(order.state, crate::scan::order::OrderState::Unknown, "{}", order.detail);
        assert!(order.detail.contains("etcdctl"), "{}", order.detail);
    }
}
