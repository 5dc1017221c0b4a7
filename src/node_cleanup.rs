//! The etcd-mode node deleter's decisions (SPEC §1.4), pure: which Calico Nodes stand for a
//! Kubernetes node that is gone, and what goes with each of them.
//!
//! In an etcd-mode cluster calico-node writes a Calico Node (with a `k8s` orchRef naming its
//! Kubernetes node) and the CNI plugin writes workload endpoints; when the Kubernetes node is
//! deleted nothing removes them but this controller. Upstream deletes the Node through
//! libcalico, which also releases the node's addresses and affinities; here the addresses,
//! handles and affinities stay the IPAM GC's (one writer for IPAM): once the Kubernetes node is
//! gone, the GC releases them under its own rules, and the deleter removes the rest.
//!
//! Owns: the orphan rule (a Calico Node with a `k8s` orchRef whose Kubernetes node is absent
//! from a complete list; a node without one is never touched), and the order of a cascade.
//! Must not: do I/O or read the clock; confirm a node gone by itself (the shell re-reads the
//! Kubernetes node and puts the set through the mass-change guard before acting).

use std::collections::BTreeMap;

use crate::datastore::{CalicoNodeView, Kind, Stored};

/// A Calico Node whose Kubernetes node is missing from the list it was judged against.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Orphan {
    pub calico_node: String,
    pub kubernetes_node: String,
}

/// The Calico Nodes of `calico_nodes` whose `k8s` orchRef names a node `k8s_nodes` (a
/// complete list of the Kubernetes Nodes) does not hold, in name order. Nodes without a Kubernetes
/// orchestrator reference are not Kubernetes' to judge, and are left out.
pub fn orphans(calico_nodes: &[Stored], k8s_nodes: impl Fn(&str) -> bool) -> Vec<Orphan> {
    let mut out: Vec<Orphan> = calico_nodes
        .iter()
        .filter_map(|n| match CalicoNodeView::of_node(&n.value) {
            CalicoNodeView::Present { k8s_node: Some(k) } if !k8s_nodes(&k) => Some(Orphan { calico_node: n.name.clone(), kubernetes_node: k }),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// What belongs to one Calico Node, from lists of the kinds that name their node in `spec.node`.
#[derive(Debug, Default, Clone)]
pub struct NodeObjects<'a> {
    pub workload_endpoints: &'a [Stored],
    pub bgp_peers: &'a [Stored],
    pub host_endpoints: &'a [Stored],
}

/// The deletes that remove Calico Node `node` and what is its, in the order upstream's cascade
/// uses: its workload endpoints, BGP peers with `spec.node`, the `node.<name>` Felix and BGP
/// configurations, host endpoints with `spec.node`, and last the Node itself (so a cascade cut
/// short is found again by the next sweep: the Node is still there).
pub fn cascade(node: &str, objects: &NodeObjects<'_>) -> Vec<(Kind, String)> {
    let of_node = |list: &[Stored]| -> Vec<String> {
        let mut names: Vec<String> = list.iter().filter(|o| o.value["spec"]["node"].as_str() == Some(node)).map(|o| o.name.clone()).collect();
        names.sort();
        names
    };
    let mut out = Vec::new();
    out.extend(of_node(objects.workload_endpoints).into_iter().map(|n| (Kind::WorkloadEndpoint, n)));
    out.extend(of_node(objects.bgp_peers).into_iter().map(|n| (Kind::BgpPeer, n)));
    out.push((Kind::FelixConfiguration, format!("node.{node}")));
    out.push((Kind::BgpConfiguration, format!("node.{node}")));
    out.extend(of_node(objects.host_endpoints).into_iter().map(|n| (Kind::HostEndpoint, n)));
    out.push((Kind::CalicoNode, node.to_string()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::collections::BTreeSet;

    fn stored(name: &str, value: Value) -> Stored {
        Stored { name: name.into(), revision: "1".into(), uid: "u".into(), value }
    }

    fn calico_node(name: &str, refs: Value) -> Stored {
        stored(name, json!({"metadata": {"name": name}, "spec": {"orchRefs": refs}}))
    }

    #[test]
    fn only_nodes_whose_kubernetes_node_is_missing_are_orphans_and_nodes_without_a_k8s_ref_never() {
        let nodes = [
            calico_node("c-gone", json!([{"orchestrator": "k8s", "nodeName": "k-gone"}])),
            calico_node("c-live", json!([{"orchestrator": "k8s", "nodeName": "k-live"}])),
            calico_node("bare-metal", json!([])),
            calico_node("openstack", json!([{"orchestrator": "openstack", "nodeName": "x"}])),
            stored("no-spec", json!({"metadata": {"name": "no-spec"}})),
        ];
        let k8s: BTreeSet<String> = ["k-live".to_string()].into();
        assert_eq!(orphans(&nodes, |n| k8s.contains(n)), [Orphan { calico_node: "c-gone".into(), kubernetes_node: "k-gone".into() }]);
        // Named like its Calico Node or not, what counts is the orchRef.
        let k8s: BTreeSet<String> = ["c-gone".to_string(), "k-live".to_string()].into();
        assert_eq!(orphans(&nodes, |n| k8s.contains(n)).len(), 1);
        assert!(orphans(&nodes, |n| ["k-gone", "k-live"].contains(&n)).is_empty());
    }

    #[test]
    fn a_cascade_takes_the_nodes_own_objects_in_order_and_the_node_last() {
        let on = |name: &str, node: &str| stored(name, json!({"spec": {"node": node}}));
        let weps = [on("ns/n1-k8s-b-eth0", "n1"), on("ns/n1-k8s-a-eth0", "n1"), on("ns/n2-k8s-a-eth0", "n2")];
        let peers = [on("peer-n1", "n1"), on("global", ""), stored("no-node", json!({"spec": {}}))];
        let heps = [on("n1-eth0", "n1"), on("n2-eth0", "n2")];
        let objects = NodeObjects { workload_endpoints: &weps, bgp_peers: &peers, host_endpoints: &heps };
        let plan = cascade("n1", &objects);
        let expected: Vec<(Kind, String)> = [
            (Kind::WorkloadEndpoint, "ns/n1-k8s-a-eth0"),
            (Kind::WorkloadEndpoint, "ns/n1-k8s-b-eth0"),
            (Kind::BgpPeer, "peer-n1"),
            (Kind::FelixConfiguration, "node.n1"),
            (Kind::BgpConfiguration, "node.n1"),
            (Kind::HostEndpoint, "n1-eth0"),
            (Kind::CalicoNode, "n1"),
        ]
        .into_iter()
        .map(|(k, n)| (k, n.to_string()))
        .collect();
        assert_eq!(plan, expected);
        assert_eq!(cascade("n3", &NodeObjects::default()).len(), 3, "configurations and the node, nothing else");
    }
}

/// The annotation where label sync keeps the Kubernetes labels it last copied (SPEC §1.5).
pub const KUBE_LABELS_ANNOTATION: &str = "projectcalico.org/kube-labels";

/// Labels as both APIs hold them.
pub type Labels = BTreeMap<String, String>;

/// The labels and bookkeeping annotation a Calico Node should carry after copying its
/// Kubernetes node's `k8s_labels` (SPEC §1.5), or `None` when it already does. Labels copied
/// before (named in the annotation) that Kubernetes no longer has are removed; every Kubernetes
/// label is set; a label never copied from Kubernetes (set by a user on the Calico Node) stays,
/// unless Kubernetes now has a label of that key. An unreadable annotation counts as nothing
/// copied before, so no label is removed on its word.
pub fn synced_labels(calico_labels: &Labels, annotation: Option<&str>, k8s_labels: &Labels) -> Option<(Labels, String)> {
    let previous: Labels = annotation.and_then(|a| serde_json::from_str(a).ok()).unwrap_or_default();
    let mut labels = calico_labels.clone();
    for key in previous.keys() {
        if !k8s_labels.contains_key(key) {
            labels.remove(key);
        }
    }
    labels.extend(k8s_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    let wanted = serde_json::to_string(k8s_labels).unwrap_or_default();
    // The annotation is compared as a map, so a re-ordered JSON object is not a change.
    (labels != *calico_labels || previous != *k8s_labels || annotation.is_none()).then_some((labels, wanted))
}

#[cfg(test)]
mod label_tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn kubernetes_labels_are_copied_removed_ones_go_and_user_labels_stay() {
        // First sync: everything from Kubernetes, the user's label kept, the bookkeeping written.
        let (l, a) = synced_labels(&labels(&[("user", "x")]), None, &labels(&[("zone", "a"), ("role", "w")])).unwrap();
        assert_eq!(l, labels(&[("user", "x"), ("zone", "a"), ("role", "w")]));
        assert_eq!(serde_json::from_str::<Labels>(&a).unwrap(), labels(&[("zone", "a"), ("role", "w")]));
        // Nothing changed: no write.
        assert_eq!(synced_labels(&l, Some(&a), &labels(&[("role", "w"), ("zone", "a")])), None);
        // Kubernetes drops `role` and changes `zone`: `role` goes, the user's label stays.
        let (l2, a2) = synced_labels(&l, Some(&a), &labels(&[("zone", "b")])).unwrap();
        assert_eq!(l2, labels(&[("user", "x"), ("zone", "b")]));
        assert_eq!(a2, r#"{"zone":"b"}"#);
        // A user label Kubernetes never had is not removed when Kubernetes has none at all.
        let (l3, _) = synced_labels(&l2, Some(&a2), &Labels::new()).unwrap();
        assert_eq!(l3, labels(&[("user", "x")]));
        // An unreadable annotation removes nothing.
        let (l4, a4) = synced_labels(&labels(&[("old", "1")]), Some("not json"), &labels(&[("zone", "a")])).unwrap();
        assert_eq!(l4, labels(&[("old", "1"), ("zone", "a")]));
        assert_eq!(a4, r#"{"zone":"a"}"#);
        // Nothing from Kubernetes and nothing before: the empty bookkeeping is still written once.
        assert_eq!(synced_labels(&Labels::new(), None, &Labels::new()), Some((Labels::new(), "{}".to_string())));
        assert_eq!(synced_labels(&Labels::new(), Some("{}"), &Labels::new()), None);
    }
}
