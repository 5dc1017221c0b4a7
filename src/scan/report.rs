//! The leak report: one GC observation rendered as calicoctl-compatible JSON plus our own
//! sections, or as a table for people.
//!
//! Owns: `scan_dump` (dump -> index -> two passes -> report), `build_report` (shared with the
//! controller's `/leak-report`), the JSON shape and the table. Must not: read the clock (callers
//! pass `now`) or touch a cluster.
//!
//! "Releasable" means: the GC would release it once its grace period ran out with the state
//! unchanged. It is computed by a second pass at `now + grace`, so every rule (all-or-none per
//! handle, node blocking, two observations of empty blocks) applies exactly as in the controller.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};

use serde::Serialize;

use crate::ipam::gc::{GcConfig, GcState};
use crate::ipam::plan::{HeldBy, LeakState, Plan, Scope};
use crate::ipam::index::{gid_ordinal, gid_slot, AllocKind, IpamIndex, PodCoverage, Snapshot};
use crate::model::names::{ip_sort_key, ordinal_to_ip, workload_endpoint_name};
use crate::model::time::Millis;
use crate::model::{ClusterInformation, InvalidObject};

use super::dump::DumpContents;

/// Why a scan refused to run: the input could make live addresses look leaked.
#[derive(Debug, thiserror::Error)]
#[error("the dump is incomplete: {missing:?} missing. {hint}")]
pub struct IncompleteDump {
    pub missing: Vec<&'static str>,
    pub hint: &'static str,
}

pub const DUMP_HINT: &str = "A complete dump is: kubectl get pods --all-namespaces -o json > pods.json; \
kubectl get nodes -o json > nodes.json; kubectl get ipamblocks.crd.projectcalico.org,blockaffinities.crd.projectcalico.org,\
ipamhandles.crd.projectcalico.org,ippools.crd.projectcalico.org,ipamconfigs.crd.projectcalico.org,\
clusterinformations.crd.projectcalico.org,kubecontrollersconfigurations.crd.projectcalico.org -o json > ipam.json";

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckAllocation {
    pub ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    pub sequence_number: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(rename = "type", skip_serializing_if = "String::is_empty")]
    pub alloc_type: String,
    pub in_use: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub borrowed: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cooling_down: bool,
    pub owners: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeakEntry {
    pub ip: String,
    pub block: String,
    pub handle: String,
    pub namespace: String,
    pub pod: String,
    pub node: String,
    pub reason: &'static str,
    pub releasable: bool,
    pub held_by: Option<&'static str>,
    /// `candidate` or `confirmed` in this observation.
    pub state: &'static str,
    /// Milliseconds since the epoch when first seen leaked (controller only; the scan's `now`).
    pub first_seen: Millis,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EmptyBlockEntry {
    pub cidr: String,
    pub node: String,
    pub releasable: bool,
    pub held_by: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrphanHandleEntry {
    pub handle_id: String,
    pub name: String,
    pub revision: String,
    pub releasable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InvalidEntry {
    pub kind: String,
    pub name: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub blocks: u64,
    pub allocations: u64,
    pub pods: u64,
    pub nodes: u64,
    pub leaks: u64,
    pub releasable_leaks: u64,
    pub held_leaks: u64,
    pub leaks_by_reason: BTreeMap<&'static str, u64>,
    pub held_by: BTreeMap<&'static str, u64>,
    pub nodes_to_release: u64,
    pub empty_blocks: u64,
    pub releasable_empty_blocks: u64,
    pub orphan_handles: u64,
    pub invalid_objects: u64,
    pub leak_grace_period_seconds: i64,
}

/// The whole report. The first five fields and `allocations` are calicoctl's `ipam check`
/// report, so `calicoctl ipam release --from-report` accepts the file (with `--force`, since our
/// `version` is not calicoctl's). Only releasable leaks are `inUse: false`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeakReport {
    pub version: String,
    #[serde(rename = "clusterGUID")]
    pub cluster_guid: String,
    pub datastore_locked: bool,
    pub cluster_information_revision: String,
    pub cluster_type: String,
    pub allocations: BTreeMap<String, Vec<CheckAllocation>>,
    pub leaks: Vec<LeakEntry>,
    pub nodes_to_release: Vec<String>,
    pub empty_blocks: Vec<EmptyBlockEntry>,
    pub orphan_handles: Vec<OrphanHandleEntry>,
    pub invalid: Vec<InvalidEntry>,
    pub summary: Summary,
}

impl LeakReport {
    pub fn releasable_leaks(&self) -> u64 {
        self.summary.releasable_leaks
    }
}

/// Cluster identity for the calicoctl-compatible header.
#[derive(Debug, Clone, Default)]
pub struct ReportMeta {
    pub cluster_guid: String,
    pub datastore_locked: bool,
    pub cluster_information_revision: String,
    pub cluster_type: String,
}

impl ReportMeta {
    pub fn from_cluster_info(ci: Option<&ClusterInformation>) -> Self {
        let Some(ci) = ci else { return ReportMeta::default() };
        ReportMeta {
            cluster_guid: ci.spec.cluster_guid.clone().unwrap_or_default(),
            datastore_locked: ci.spec.datastore_ready == Some(false),
            cluster_information_revision: ci.resource_version().to_string(),
            cluster_type: ci.spec.cluster_type.clone().unwrap_or_default(),
        }
    }
}

const REQUIRED_KINDS: [(&str, &str); 3] = [("Pod", "Pods (all namespaces)"), ("Node", "Nodes"), ("IPAMBlock", "IPAMBlocks")];

/// Runs one observation over a dump. Refuses (without guessing) when Pods, Nodes or IPAMBlocks
/// are missing: with no pods every IP would look leaked.
pub fn scan_dump(dump: &mut DumpContents, now: Millis) -> Result<LeakReport, IncompleteDump> {
    let mut missing = Vec::new();
    // A live scan listed every kind: an empty list is the cluster's answer, not a gap in a dump.
    let checked: &[(&str, &str)] = if dump.complete_pod_view { &[] } else { &REQUIRED_KINDS };
    for (kind, label) in checked {
        if dump.kind_counts.get(*kind).copied().unwrap_or(0) == 0 {
            missing.push(*label);
        }
    }
    if !missing.is_empty() {
        return Err(IncompleteDump { missing, hint: DUMP_HINT });
    }
    let mut invalid = dump.invalid.clone();
    let mut index = match dump.index.take() {
        Some(ix) => *ix,
        None => {
            let mut built = IpamIndex::new();
            invalid.extend(built.reset(Snapshot {
                blocks: &dump.blocks,
                affinities: &dump.affinities,
                handles: &dump.handles,
                pods: &dump.pods,
                nodes: &dump.nodes,
            }));
            built
        }
    };
    // A dump proves nothing about namespaces it holds no pod of: the user may have listed
    // pods of some namespaces only. Allocations elsewhere are reported but never releasable.
    index.coverage =
        if dump.complete_pod_view { PodCoverage::All } else { PodCoverage::Namespaces(dump.pod_namespaces.clone()) };
    let cfg = GcConfig {
        leak_grace: dump.kube_controllers_config.as_ref().map_or(crate::model::config::DEFAULT_LEAK_GRACE, |k| k.spec.leak_grace_period()),
        max_releases_per_pass: usize::MAX,
        ip_cooldown: dump.ipam_config.as_ref().and_then(|c| c.spec.ip_cooldown_seconds).map_or(0, |s| i64::from(s) * 1000),
        // The dump is the only source of truth a scan has.
        revalidate_live: false,
        // The dump's nodes are the whole cluster's: a node it lacks is deleted.
        node_proof: crate::ipam::gc::NodeProof::AbsenceIsProof,
        // One read-only observation: the release procedure's two scans are its second look.
        ..GcConfig::default()
    };
    let meta = ReportMeta::from_cluster_info(dump.cluster_info.as_ref());
    Ok(observe(&mut index, &cfg, now, meta, invalid))
}

/// One observation of `index` at `now` with fresh GC state, and the look-ahead pass that decides
/// what is releasable. Used by `leak-scan` in both its dump and live forms.
pub fn observe(index: &mut IpamIndex, cfg: &GcConfig, now: Millis, meta: ReportMeta, invalid: Vec<InvalidObject>) -> LeakReport {
    let mut gc = GcState::new();
    let no_fresh = BTreeMap::new();
    let first = gc.pass(index, now, cfg, &Scope::Full, None, &no_fresh);
    let later = now + cfg.leak_grace.max(crate::ipam::gc::VM_MIN_GRACE) + 1;
    let second = gc.pass(index, later, cfg, &Scope::Full, None, &no_fresh);
    build_report(index, &first, &second, cfg, meta, invalid)
}

/// Renders a report from a pass (`current`) and the pass that decides releasability
/// (`outlook`; the controller passes the same plan twice).
pub fn build_report(index: &IpamIndex, current: &Plan, outlook: &Plan, cfg: &GcConfig, meta: ReportMeta, invalid: Vec<InvalidObject>) -> LeakReport {
    let releasable: BTreeSet<(String, u32)> = outlook
        .releases
        .iter()
        .flat_map(|b| b.items.iter().map(move |i| (b.cidr.to_string(), i.ordinal)))
        .collect();
    let outlook_held: HashMap<u32, HeldBy> = outlook.leaks.iter().filter_map(|l| Some((l.gid, l.held_by?))).collect();
    let mut summary = Summary {
        blocks: index.block_count() as u64,
        allocations: index.allocation_count(),
        pods: index.present_pods().count() as u64,
        nodes: index.node_count() as u64,
        leak_grace_period_seconds: cfg.leak_grace / 1000,
        ..Summary::default()
    };
    let mut leaks = Vec::with_capacity(current.leaks.len());
    let mut releasable_gids = BTreeSet::new();
    for l in &current.leaks {
        let Some(b) = index.block(gid_slot(l.gid)) else { continue };
        let Some(a) = b.alloc(gid_ordinal(l.gid)) else { continue };
        let is_releasable = releasable.contains(&(b.cidr.to_string(), gid_ordinal(l.gid)));
        let held = if is_releasable {
            None
        } else {
            Some(outlook_held.get(&l.gid).or(l.held_by.as_ref()).map_or("not-confirmed", |h| h.as_str()))
        };
        if is_releasable {
            releasable_gids.insert(l.gid);
        }
        let (state, since) = match l.state {
            LeakState::Candidate { since } => ("candidate", since),
            LeakState::Confirmed { since } => ("confirmed", since),
        };
        leaks.push(LeakEntry {
            ip: ordinal_to_ip(&b.cidr, gid_ordinal(l.gid)).to_string(),
            block: b.cidr.to_string(),
            handle: index.resolve(a.handle).to_string(),
            namespace: index.resolve(a.namespace).to_string(),
            pod: index.resolve(a.pod).to_string(),
            node: index.resolve(a.node).to_string(),
            reason: l.reason.as_str(),
            releasable: is_releasable,
            held_by: held,
            state,
            first_seen: current.time.wall_of(since),
        });
        *summary.leaks_by_reason.entry(l.reason.as_str()).or_default() += 1;
        if let Some(h) = held {
            *summary.held_by.entry(h).or_default() += 1;
        }
    }
    leaks.sort_by_key(|l| l.ip.parse().map(|ip| ip_sort_key(&ip)).unwrap_or((0, 0)));
    summary.leaks = leaks.len() as u64;
    summary.releasable_leaks = leaks.iter().filter(|l| l.releasable).count() as u64;
    summary.held_leaks = summary.leaks - summary.releasable_leaks;

    let mut allocations: BTreeMap<String, Vec<CheckAllocation>> = BTreeMap::new();
    for slot in index.blocks_sorted() {
        let b = index.block(slot).expect("sorted slot exists");
        let host = index.resolve(b.host());
        for a in &b.allocs {
            let g = crate::ipam::index::gid(slot, u32::from(a.ordinal));
            let ip = ordinal_to_ip(&b.cidr, u32::from(a.ordinal)).to_string();
            let node = if a.node.is_none() { host.to_string() } else { index.resolve(a.node).to_string() };
            let owners = match a.kind {
                AllocKind::Pod if !releasable_gids.contains(&g) => {
                    Some(vec![format!("Workload({}/{})", index.resolve(a.namespace), workload_endpoint_name(&node, index.resolve(a.pod), "eth0"))])
                }
                AllocKind::Tunnel if !releasable_gids.contains(&g) => Some(vec![format!("Node({node})")]),
                _ => None,
            };
            let cooling = b.cooling.contains(&a.ordinal);
            allocations.entry(ip.clone()).or_default().push(CheckAllocation {
                ip,
                handle: (a.kind != AllocKind::WindowsReserved).then(|| index.resolve(a.handle).to_string()),
                sequence_number: a.seq,
                pod: index.resolve(a.pod).to_string(),
                namespace: index.resolve(a.namespace).to_string(),
                borrowed: !host.is_empty() && node != host || host.is_empty(),
                node,
                alloc_type: index.resolve(a.alloc_type).to_string(),
                // Held leaks, unknown owners and Windows-reserved addresses stay in use, so that
                // `calicoctl ipam release --from-report` frees exactly what we would.
                in_use: !releasable_gids.contains(&g),
                cooling_down: cooling,
                owners,
            });
        }
    }

    let empty_blocks: Vec<EmptyBlockEntry> = {
        let outlook_ok: BTreeSet<String> = outlook.empty_blocks.iter().filter(|e| e.releasable).map(|e| e.cidr.to_string()).collect();
        outlook
            .empty_blocks
            .iter()
            .map(|e| {
                let ok = outlook_ok.contains(&e.cidr.to_string());
                EmptyBlockEntry { cidr: e.cidr.to_string(), node: e.node.clone(), releasable: ok, held_by: if ok { None } else { e.held_by } }
            })
            .collect()
    };
    summary.empty_blocks = empty_blocks.len() as u64;
    summary.releasable_empty_blocks = empty_blocks.iter().filter(|e| e.releasable).count() as u64;
    let nodes_to_release: Vec<String> = outlook.nodes_to_release.iter().map(|n| n.node.clone()).collect();
    summary.nodes_to_release = nodes_to_release.len() as u64;
    let orphan_handles: Vec<OrphanHandleEntry> = outlook
        .orphan_handles
        .iter()
        .map(|o| OrphanHandleEntry { handle_id: o.handle_id.clone(), name: o.object_name.clone(), revision: o.revision.clone(), releasable: o.releasable })
        .collect();
    summary.orphan_handles = orphan_handles.len() as u64;
    let invalid: Vec<InvalidEntry> = invalid.into_iter().map(|e| InvalidEntry { kind: e.kind, name: e.name, error: e.problem }).collect();
    summary.invalid_objects = invalid.len() as u64;

    LeakReport {
        version: format!("calico-kube-controllers-{}", env!("CARGO_PKG_VERSION")),
        cluster_guid: meta.cluster_guid,
        datastore_locked: meta.datastore_locked,
        cluster_information_revision: meta.cluster_information_revision,
        cluster_type: meta.cluster_type,
        allocations,
        leaks,
        nodes_to_release,
        empty_blocks,
        orphan_handles,
        invalid,
        summary,
    }
}

/// The report for people: a summary, then leaks grouped by node.
pub fn write_table(r: &LeakReport, out: &mut dyn Write) -> io::Result<()> {
    let s = &r.summary;
    writeln!(out, "Leak scan: {} blocks, {} allocations, {} pods, {} nodes (grace period {}s)", s.blocks, s.allocations, s.pods, s.nodes, s.leak_grace_period_seconds)?;
    writeln!(out, "  leaks:              {} ({} releasable, {} held)", s.leaks, s.releasable_leaks, s.held_leaks)?;
    for (reason, n) in &s.leaks_by_reason {
        writeln!(out, "    {reason:<22} {n}")?;
    }
    for (held, n) in &s.held_by {
        writeln!(out, "    held: {held:<16} {n}")?;
    }
    writeln!(out, "  nodes to release:   {}", s.nodes_to_release)?;
    writeln!(out, "  empty blocks:       {} ({} releasable)", s.empty_blocks, s.releasable_empty_blocks)?;
    writeln!(out, "  orphan handles:     {}", s.orphan_handles)?;
    writeln!(out, "  invalid objects:    {}", s.invalid_objects)?;
    let mut by_node: BTreeMap<&str, Vec<&LeakEntry>> = BTreeMap::new();
    for l in &r.leaks {
        by_node.entry(if l.node.is_empty() { "<no node>" } else { &l.node }).or_default().push(l);
    }
    for (node, leaks) in by_node {
        writeln!(out, "\nnode {node} ({} leaks)", leaks.len())?;
        writeln!(out, "  {:<40} {:<20} {:<12} POD / HELD BY", "IP", "REASON", "RELEASABLE")?;
        for l in leaks {
            let who = if l.pod.is_empty() { l.handle.clone() } else { format!("{}/{}", l.namespace, l.pod) };
            let tail = match l.held_by {
                Some(h) => format!("{who} (held: {h})"),
                None => who,
            };
            writeln!(out, "  {:<40} {:<20} {:<12} {}", l.ip, l.reason, if l.releasable { "yes" } else { "no" }, tail)?;
        }
    }
    if !r.nodes_to_release.is_empty() {
        writeln!(out, "\nnodes whose IPAM state would be released: {}", r.nodes_to_release.join(", "))?;
    }
    for e in &r.invalid {
        writeln!(out, "invalid {} {}: {}", e.kind, e.name, e.error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::dump::read_bytes;

    const NOW: Millis = 1_800_000_000_000;

    fn dump() -> String {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "live", "namespace": "ns", "uid": "u1"},
             "spec": {"nodeName": "n1"}, "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}},
            {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-30", "resourceVersion": "5"},
             "spec": {"cidr": "10.0.0.0/30", "affinity": "host:n1", "strictAffinity": false,
                      "allocations": [null, 0, 1, 2], "unallocated": [0],
                      "attributes": [
                        {"handle_id": "k8s-pod-network.live", "secondary": {"namespace": "ns", "pod": "live", "node": "n1"}},
                        {"handle_id": "k8s-pod-network.dead", "secondary": {"namespace": "ns", "pod": "dead", "node": "n1"}},
                        {"handle_id": "k8s-pod-network.other", "secondary": {"namespace": "elsewhere", "pod": "x", "node": "n1"}}],
                      "sequenceNumber": 9, "sequenceNumberForAllocation": {"1": 1, "2": 2, "3": 3}}},
            {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "bad"},
             "spec": {"cidr": "10.9.0.0/30", "strictAffinity": false, "allocations": [0], "unallocated": [], "attributes": []}}
        ]})
        .to_string()
    }

    #[test]
    fn a_dump_scan_reports_leaks_releasability_and_calicoctl_fields() {
        let mut d = read_bytes("dump.json", dump().as_bytes()).unwrap();
        let r = scan_dump(&mut d, NOW).unwrap();
        assert_eq!(r.leaks.len(), 2);
        let dead = r.leaks.iter().find(|l| l.pod == "dead").unwrap();
        assert!(dead.releasable && dead.held_by.is_none());
        assert_eq!(dead.reason, "pod-not-found");
        let other = r.leaks.iter().find(|l| l.pod == "x").unwrap();
        assert!(!other.releasable);
        assert_eq!(other.held_by, Some("namespace-not-in-dump"));
        assert!(!r.allocations["10.0.0.2"][0].in_use);
        assert!(r.allocations["10.0.0.3"][0].in_use, "held leaks stay in use");
        assert!(r.allocations["10.0.0.1"][0].in_use);
        assert_eq!(r.allocations["10.0.0.2"][0].sequence_number, 2);
        assert_eq!(r.invalid.len(), 1);
        assert_eq!(r.invalid[0].name, "bad");
        let v = serde_json::to_value(&r).unwrap();
        for key in ["version", "clusterGUID", "datastoreLocked", "clusterInformationRevision", "clusterType", "allocations", "leaks", "nodesToRelease", "emptyBlocks", "orphanHandles", "invalid", "summary"] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["leaks"][0]["heldBy"], serde_json::Value::Null);
        let mut table = Vec::new();
        write_table(&r, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.contains("node n1 (2 leaks)"), "{table}");
    }

    #[test]
    fn a_dump_scan_lists_misnamed_blocks_as_invalid_and_reports_no_leak_from_them() {
        let mut v: serde_json::Value = serde_json::from_str(&dump()).unwrap();
        let attrs = serde_json::json!([{"handle_id": "k8s-pod-network.ghost", "secondary": {"namespace": "ns", "pod": "ghost", "node": "n1"}}]);
        // After the real 10.0.0.0/30: the same CIDR under another block's name, then a CIDR of its own.
        for (name, cidr) in [("10-0-1-0-30", "10.0.0.0/30"), ("10-0-5-0-30", "10.0.4.0/30")] {
            v["items"].as_array_mut().unwrap().push(serde_json::json!({
                "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": name},
                "spec": {"cidr": cidr, "affinity": "host:n1", "strictAffinity": false, "allocations": [0, null, null, null],
                         "unallocated": [1, 2, 3], "attributes": attrs, "sequenceNumber": 1, "sequenceNumberForAllocation": {"0": 1}}}));
        }
        let mut d = read_bytes("dump.json", v.to_string().as_bytes()).unwrap();
        let r = scan_dump(&mut d, NOW).unwrap();
        let mut leaks: Vec<_> = r.leaks.iter().map(|l| l.pod.as_str()).collect();
        leaks.sort_unstable();
        assert_eq!(leaks, ["dead", "x"], "the real block's leaks only");
        assert!(r.allocations["10.0.0.1"][0].in_use, "the real block still holds the live pod");
        assert!(!r.allocations.contains_key("10.0.0.0") && !r.allocations.contains_key("10.0.4.0"));
        let mut invalid: Vec<_> = r.invalid.iter().map(|e| (e.kind.as_str(), e.name.as_str())).collect();
        invalid.sort_unstable();
        assert_eq!(invalid, [("IPAMBlock", "10-0-1-0-30"), ("IPAMBlock", "10-0-5-0-30"), ("IPAMBlock", "bad")]);
        let impostor = r.invalid.iter().find(|e| e.name == "10-0-1-0-30").unwrap();
        assert!(impostor.error.contains("does not match cidr 10.0.0.0/30"), "{}", impostor.error);
    }

    #[test]
    fn a_dump_without_pods_is_refused() {
        let mut d = read_bytes("dump.json", br#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}}]}"#).unwrap();
        let err = scan_dump(&mut d, NOW).unwrap_err();
        assert!(err.missing.contains(&"Pods (all namespaces)"));
        assert!(err.missing.contains(&"IPAMBlocks"));
    }
}
