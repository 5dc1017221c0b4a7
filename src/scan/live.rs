//! `leak-scan` against a live cluster: one paged, read-only LIST per kind, each object fed
//! through the same reader as a dump file (Pods trimmed to their facts and IPAM objects applied
//! to the index as they arrive), then the same two-observation report. No watch, no write, no
//! datastore lock.
//!
//! Owns: which kinds are listed and in what order, progress reporting, and the refusal of
//! clusters this version cannot read.
//! Must not: write anything, or keep a page longer than it takes to absorb it; it reads Calico's
//! objects through the [`Datastore`] seam and Kubernetes' through [`ClusterReader`], never a
//! client of its own.

use std::collections::BTreeMap;

use super::dump::DumpContents;
use crate::datastore::{CalicoNodeView, ClusterKind, ClusterReader, Datastore, DatastoreError, Kind, Stored};

/// Objects between two progress reports while pods or nodes stream in: one LIST page's worth.
const PROGRESS_EVERY: u64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum LiveScanError {
    #[error("listing {resource}: {source}")]
    List { resource: String, source: DatastoreError },
    #[error(
        "this cluster serves no ipamblocks under crd.projectcalico.org/v1: Calico's CRDs are not installed, \
         or the cluster uses the projectcalico.org/v3 CRDs, which this version does not read yet"
    )]
    NoCalicoCrds,
}

#[derive(Debug, Clone, Copy)]
enum Listed {
    Calico(Kind),
    Cluster(ClusterKind),
}

impl Listed {
    fn plural(self) -> &'static str {
        match self {
            Listed::Calico(k) => k.plural(),
            Listed::Cluster(k) => k.plural(),
        }
    }

    /// The `kind` the dump reader counts objects under.
    fn kind_name(self) -> &'static str {
        match self {
            Listed::Calico(k) => k.kind_name(),
            Listed::Cluster(k) => k.kind_name(),
        }
    }
}

/// What is listed, in this order: blocks first (a cluster without Calico's CRDs stops at once),
/// then the facts (Services after the blocks too: a Service created in between then holds no
/// address in what was read, rather than one that looks unwanted). `true`: a missing resource
/// (NotFound) is an error rather than an empty list.
fn listed() -> [(Listed, bool); 11] {
    let calico = |kind: Kind, required| (Listed::Calico(kind), required);
    [
        calico(Kind::IpamBlock, true),
        (Listed::Cluster(ClusterKind::Node), true),
        (Listed::Cluster(ClusterKind::Pod), true),
        (Listed::Cluster(ClusterKind::Service), false),
        calico(Kind::BlockAffinity, false),
        calico(Kind::IpamHandle, false),
        calico(Kind::IpPool, false),
        calico(Kind::IpReservation, false),
        calico(Kind::IpamConfig, false),
        calico(Kind::ClusterInformation, false),
        calico(Kind::KubeControllersConfiguration, false),
    ]
}

fn absorb(contents: &mut DumpContents, what: Listed, position: u64, object: &Stored) {
    match serde_json::to_vec(&object.value) {
        Ok(bytes) => contents.absorb_object_json(&bytes, &format!("{}[{position}]", what.plural())),
        Err(e) => tracing::warn!(resource = what.plural(), error = %e, "object could not be re-encoded; skipped"),
    }
}

fn seen(contents: &DumpContents, what: Listed) -> u64 {
    contents.kind_counts.get(what.kind_name()).copied().unwrap_or(0)
}

/// etcd: Calico Node name -> the Kubernetes node its `k8s` orchRef names.
type CalicoNames = BTreeMap<String, Option<String>>;

/// The Calico Nodes, where the datastore keeps them apart from Kubernetes' (etcd). Read with
/// the Nodes, after the blocks: a node whose allocations the blocks show was created before
/// them, so it is in this list (the dump order rule).
async fn calico_names<D: Datastore>(ds: &D) -> Result<Option<CalicoNames>, LiveScanError> {
    if !ds.keeps_calico_nodes() {
        return Ok(None);
    }
    let nodes = match ds.list(Kind::CalicoNode).await {
        Ok(n) => n,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(source) => return Err(LiveScanError::List { resource: "calico nodes".into(), source }),
    };
    let k8s_of = |v: &serde_json::Value| match CalicoNodeView::of_node(v) {
        CalicoNodeView::Present { k8s_node } => k8s_node,
        _ => None,
    };
    Ok(Some(nodes.iter().map(|n| (n.name.clone(), k8s_of(&n.value))).collect()))
}

/// Lists every kind the GC reads into an indexed [`DumpContents`], ready for `scan_dump`.
/// `progress(kind, objects_so_far)` is called as objects arrive and after each kind.
pub async fn read_cluster<D: Datastore, C: ClusterReader>(
    ds: &D,
    cluster: &C,
    progress: &mut (dyn FnMut(&str, u64) + Send),
) -> Result<DumpContents, LiveScanError> {
    let mut contents =
        DumpContents { index: Some(Box::new(crate::ipam::index::IpamIndex::new())), complete_pod_view: true, read_live: true, ..DumpContents::default() };
    for (what, required) in listed() {
        if matches!(what, Listed::Cluster(ClusterKind::Node)) {
            contents.calico_nodes = calico_names(ds).await?.unwrap_or_default();
        }
        let result = match what {
            Listed::Calico(kind) => ds.list(kind).await.map(|objects| {
                for (i, object) in objects.iter().enumerate() {
                    absorb(&mut contents, what, i as u64, object);
                }
            }),
            Listed::Cluster(kind) => {
                let mut position = 0u64;
                let mut sink = |object: Stored| {
                    absorb(&mut contents, what, position, &object);
                    position += 1;
                    if position.is_multiple_of(PROGRESS_EVERY) {
                        progress(what.plural(), seen(&contents, what));
                    }
                };
                cluster.list_each(kind, &mut sink).await.map(|_| ())
            }
        };
        let services = matches!(what, Listed::Cluster(ClusterKind::Service));
        match result {
            Ok(()) if services => contents.lb.services_listed = true,
            Ok(()) => {}
            // Services feed only the LoadBalancer judgment: without them (an account that may
            // not list them) those addresses are reported as not judged, the rest as usual.
            Err(e) if services => {
                tracing::warn!(error = %e, "listing services failed: LoadBalancer addresses are not judged");
                contents.lb.services_unlisted = Some(e.to_string());
                continue;
            }
            Err(e) if e.is_not_found() && matches!(what, Listed::Calico(Kind::IpamBlock)) => return Err(LiveScanError::NoCalicoCrds),
            Err(e) if e.is_not_found() && !required => continue,
            Err(source) => return Err(LiveScanError::List { resource: what.plural().to_string(), source }),
        }
        progress(what.plural(), seen(&contents, what));
    }
    // etcd: the Calico Nodes' names for the Kubernetes Nodes, as an etcd dump gets them.
    contents.map_calico_nodes();
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{ErrorKind, MemoryCluster, MemoryDatastore, Op, block_on};
    use serde_json::json;

    #[test]
    fn a_cluster_is_read_from_both_seams_in_order_with_progress() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let block = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-30"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:n1", "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                     "attributes": [{"handle_id": "h", "secondary": {"node": "n1", "namespace": "ns", "pod": "p"}}], "strictAffinity": false}});
        ds.create_now(Kind::IpamBlock, "10-0-0-0-30", block).unwrap();
        cluster.apply(ClusterKind::Node, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
        cluster.apply(ClusterKind::Pod, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "ns", "name": "p"},
            "spec": {"nodeName": "n1"}, "status": {"podIP": "10.0.0.0", "podIPs": [{"ip": "10.0.0.0"}]}}));
        let mut calls = Vec::new();
        let mut progress = |kind: &str, n: u64| calls.push((kind.to_string(), n));
        let contents = block_on(read_cluster(&ds, &cluster, &mut progress)).unwrap();
        assert_eq!(contents.kind_counts.get("IPAMBlock"), Some(&1));
        assert_eq!(contents.kind_counts.get("Pod"), Some(&1));
        assert_eq!(contents.kind_counts.get("Node"), Some(&1));
        let order: Vec<&str> = calls.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&order[..5], ["ipamblocks", "nodes", "pods", "services", "blockaffinities"]);
        assert_eq!(calls[2], ("pods".to_string(), 1));
    }

    #[test]
    fn a_live_scan_judges_lb_addresses_by_the_services_it_lists_and_only_notes_a_failed_list() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        cluster.apply(ClusterKind::Node, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
        let web = cluster.apply(ClusterKind::Service, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}}));
        let attr = |name: &str, uid: &str| json!({"handle_id": crate::loadbalancer::handle_id(name, "shop", uid), "secondary": {"namespace": "shop", "service": name, "type": "LoadBalancer"}});
        ds.create_now(Kind::IpPool, "lb", json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "lb"}, "spec": {"cidr": "192.0.2.0/30", "allowedUses": ["LoadBalancer"]}})).unwrap();
        ds.create_now(Kind::IpamBlock, "192-0-2-0-30", json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "192-0-2-0-30"},
            "spec": {"cidr": "192.0.2.0/30", "affinity": "virtual:load-balancer", "allocations": [0, 1, null, null], "unallocated": [2, 3],
                     "attributes": [attr("web", &web.uid), attr("deleted", "u-deleted")]}})).unwrap();
        let mut progress = |_: &str, _: u64| {};
        let mut contents = block_on(read_cluster(&ds, &cluster, &mut progress)).unwrap();
        let r = crate::scan::report::scan_dump(&mut contents, 1_800_000_000_000, &Default::default()).unwrap();
        let unwanted: Vec<(&str, &str)> = r.leaks.iter().map(|l| (l.ip.as_str(), l.reason)).collect();
        assert_eq!(unwanted, [("192.0.2.1", "lb-unwanted")], "web keeps its address, the deleted Service's is unwanted");
        assert_eq!(r.releasable_leaks(), 0);
        // An account that may not list Services: the scan still runs, those addresses unjudged.
        cluster.set_serves(ClusterKind::Service, false);
        let mut contents = block_on(read_cluster(&ds, &cluster, &mut progress)).unwrap();
        let r = crate::scan::report::scan_dump(&mut contents, 1_800_000_000_000, &Default::default()).unwrap();
        assert!(r.leaks.is_empty(), "{:?}", r.leaks);
        let lb = r.load_balancer.unwrap();
        assert_eq!(lb.not_judged, 2);
        assert!(lb.notes[0].contains("could not be listed") && lb.notes[0].contains("list services"), "{:?}", lb.notes);
    }

    #[test]
    fn a_datastore_without_ipam_blocks_is_refused_and_other_failures_name_the_resource() {
        let cluster = MemoryCluster::new();
        let ds = MemoryDatastore::new();
        ds.inject(Some(Kind::IpamBlock), None, Op::List, ErrorKind::NotFound, 1);
        let mut progress = |_: &str, _: u64| {};
        assert!(matches!(block_on(read_cluster(&ds, &cluster, &mut progress)), Err(LiveScanError::NoCalicoCrds)));
        ds.inject(Some(Kind::IpPool), None, Op::List, ErrorKind::NotFound, 1);
        block_on(read_cluster(&ds, &cluster, &mut progress)).expect("an optional kind may be missing");
        ds.inject(Some(Kind::IpamHandle), None, Op::List, ErrorKind::Transient, 1);
        let err = block_on(read_cluster(&ds, &cluster, &mut progress)).unwrap_err();
        assert!(err.to_string().starts_with("listing ipamhandles: transient: injected"), "{err}");
    }
}
