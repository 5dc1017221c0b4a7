//! In which order a dump's parts were read, told from their Lists' `metadata.resourceVersion`.
//!
//! Why it matters: a pod created between two reads has an allocation in the IPAM part only if
//! IPAM was read after it. Read IPAM first, then Nodes, then Pods, and such a pod has no
//! allocation in the dump (nothing to misjudge); read Pods first and its address looks leaked.
//! Kubernetes list versions are etcd revisions of one store, so for lists of one cluster they
//! order the reads. A plain `kubectl get -o json` List carries an empty version: order unknown.
//!
//! Owns: the verdict (`safe`, `unsafe`, `unknown`) and its explanation.
//! Must not: guess. A part that is not wholly inside versioned Lists makes the order unknown.

use serde::Serialize;

use super::dump::DumpContents;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderState {
    Safe,
    Unsafe,
    Unknown,
}

/// One versioned part of the dump, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPart {
    pub file: String,
    pub kind: String,
    pub resource_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpOrder {
    pub state: OrderState,
    pub detail: String,
    pub parts: Vec<OrderPart>,
    /// The Namespace list was read after IPAM, so a namespace missing from it was deleted
    /// before any allocation in the dump could be made for a new pod of it.
    #[serde(skip)]
    pub namespaces_after_ipam: bool,
}

/// The kinds whose order matters, in the order they must be read.
const SEQUENCE: [(&str, &str); 3] = [("IPAMBlock", "IPAMBlocks"), ("Node", "Nodes"), ("Pod", "Pods")];

/// The resourceVersion range of the Lists holding `kind`, or why there is none.
fn range_of(dump: &DumpContents, kind: &str, label: &str) -> Result<Option<(u64, u64)>, String> {
    let total = dump.kind_counts.get(kind).copied().unwrap_or(0);
    if total == 0 {
        return Ok(None);
    }
    let mut versioned = 0;
    let mut range: Option<(u64, u64)> = None;
    for list in &dump.lists {
        let Some(&n) = list.items.get(kind) else { continue };
        let Ok(rv) = list.head.resource_version.parse::<u64>() else { continue };
        versioned += n;
        range = Some(range.map_or((rv, rv), |(lo, hi)| (lo.min(rv), hi.max(rv))));
    }
    if versioned < total {
        return Err(format!(
            "{} of {total} {label} came without a List resourceVersion (plain `kubectl get -o json` writes none; \
             use the `kubectl get --raw` commands of the README)",
            total - versioned
        ));
    }
    Ok(range)
}

pub fn dump_order(dump: &DumpContents) -> DumpOrder {
    let parts = dump
        .lists
        .iter()
        .filter(|l| !l.items.is_empty())
        .map(|l| OrderPart { file: l.file.clone(), kind: l.head.kind.clone(), resource_version: l.head.resource_version.clone() })
        .collect();
    if dump.read_live {
        return DumpOrder {
            state: OrderState::Safe,
            detail: "read live by leak-scan: IPAM, then Nodes, then Pods".into(),
            parts,
            namespaces_after_ipam: true,
        };
    }
    if dump.etcd_dump {
        let detail = "IPAM came from an etcdctl dump of Calico's etcd, whose revisions do not order against the Kubernetes Lists' \
                      (read it first, as the README says)"
            .to_string();
        return DumpOrder { state: OrderState::Unknown, detail, parts, namespaces_after_ipam: false };
    }
    let mut ranges = Vec::new();
    for (kind, label) in SEQUENCE {
        match range_of(dump, kind, label) {
            Ok(Some(r)) => ranges.push((label, r)),
            Ok(None) => {}
            Err(detail) => return DumpOrder { state: OrderState::Unknown, detail, parts, namespaces_after_ipam: false },
        }
    }
    for pair in ranges.windows(2) {
        let ((before, (_, before_hi)), (after, (after_lo, _))) = (pair[0], pair[1]);
        if before_hi > after_lo {
            return DumpOrder {
                state: OrderState::Unsafe,
                detail: format!(
                    "{after} (resourceVersion {after_lo}) were read before {before} (resourceVersion {before_hi}): \
                     an address allocated in between looks leaked, so every leak is held"
                ),
                parts,
                namespaces_after_ipam: false,
            };
        }
    }
    let ipam_hi = ranges.iter().find(|(l, _)| *l == "IPAMBlocks").map(|(_, (_, hi))| *hi);
    let namespaces_after_ipam = match (range_of(dump, "Namespace", "Namespaces"), ipam_hi) {
        (Ok(Some((ns_lo, _))), Some(hi)) => ns_lo >= hi,
        _ => false,
    };
    DumpOrder { state: OrderState::Safe, detail: "IPAM, then Nodes, then Pods".into(), parts, namespaces_after_ipam }
}

/// Why the Services were read too early, if their Lists' versions show them read before the
/// IPAM blocks: a Service created in between holds an address its read does not show, which
/// would look unwanted. `None` when they were not, or the order cannot be told.
pub fn services_before_ipam(dump: &DumpContents) -> Option<String> {
    if dump.read_live || dump.etcd_dump {
        return None;
    }
    let (Ok(Some((_, ipam_hi))), Ok(Some((services_lo, _)))) = (range_of(dump, "IPAMBlock", "IPAMBlocks"), range_of(dump, "Service", "Services")) else {
        return None;
    };
    (services_lo < ipam_hi).then(|| {
        format!("Services (resourceVersion {services_lo}) were read before IPAMBlocks (resourceVersion {ipam_hi}): a Service created in between would look gone")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::dump::read_bytes;
    use proptest::prelude::*;

    fn raw_list(kind: &str, rv: &str, items: &str) -> String {
        format!(r#"{{"kind":"{kind}List","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}"}},"items":[{items}]}}"#)
    }

    fn dump(ipam: u64, nodes: u64, pods: u64) -> DumpContents {
        let text = format!(
            "{}\n{}\n{}",
            raw_list("IPAMBlock", &ipam.to_string(), r#"{"apiVersion":"crd.projectcalico.org/v1","kind":"IPAMBlock","metadata":{"name":"10-0-0-0-30"},"spec":{"cidr":"10.0.0.0/30","allocations":[null,null,null,null],"unallocated":[0,1,2,3],"attributes":[]}}"#),
            raw_list("Node", &nodes.to_string(), r#"{"metadata":{"name":"n1"}}"#),
            raw_list("Pod", &pods.to_string(), r#"{"metadata":{"name":"p","namespace":"ns"},"spec":{"nodeName":"n1"}}"#),
        );
        read_bytes("dump.json", text.as_bytes()).unwrap()
    }

    proptest! {
        /// The order is safe exactly when IPAM was read no later than Nodes, and Nodes no later
        /// than Pods; whatever the versions, it is never unknown for versioned lists.
        #[test]
        fn order_is_safe_exactly_when_ipam_nodes_pods_versions_do_not_decrease(a in 1u64..50, b in 1u64..50, c in 1u64..50) {
            let order = dump_order(&dump(a, b, c));
            let expected = if a <= b && b <= c { OrderState::Safe } else { OrderState::Unsafe };
            prop_assert_eq!(order.state, expected, "{}", order.detail);
        }
    }

    #[test]
    fn typed_list_items_without_kind_are_read_as_the_lists_kind() {
        let d = dump(1, 2, 3);
        assert_eq!(d.kind_counts.get("Pod"), Some(&1));
        assert_eq!(d.kind_counts.get("Node"), Some(&1));
        assert_eq!(d.lists.len(), 3);
        assert_eq!(d.lists[2].head.resource_version, "3");
    }

    #[test]
    fn plain_kubectl_lists_make_the_order_unknown() {
        let text = r#"{"apiVersion":"v1","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns"}}],"kind":"List","metadata":{"resourceVersion":""}}"#;
        let order = dump_order(&read_bytes("pods.json", text.as_bytes()).unwrap());
        assert_eq!(order.state, OrderState::Unknown);
        assert!(order.detail.contains("without a List resourceVersion"), "{}", order.detail);
    }

    #[test]
    fn yaml_lists_carry_their_version_too() {
        let text = "apiVersion: v1\nitems:\n- metadata:\n    name: p\n    namespace: ns\nkind: PodList\nmetadata:\n  resourceVersion: \"42\"\n";
        let d = read_bytes("pods.yaml", text.as_bytes()).unwrap();
        assert_eq!(d.lists.len(), 1);
        assert_eq!(d.lists[0].head.resource_version, "42");
        // kubectl sorts keys: `kind` follows `items`, so these items carry their own kind or none.
        let text = "kind: PodList\napiVersion: v1\nmetadata:\n  resourceVersion: \"42\"\nitems:\n- metadata:\n    name: p\n    namespace: ns\n";
        let d = read_bytes("pods.yaml", text.as_bytes()).unwrap();
        assert_eq!(d.kind_counts.get("Pod"), Some(&1), "{:?}", d.kind_counts);
        assert_eq!(d.lists[0].items.get("Pod"), Some(&1));
    }
}
