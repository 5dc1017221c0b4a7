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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::io::{self, Write};

use serde::Serialize;

use crate::ipam::gc::{GcConfig, GcState};
use crate::ipam::plan::{HeldBy, LeakState, Plan, Scope};
use crate::ipam::index::{gid_ordinal, gid_slot, AllocKind, IpamIndex, PodCoverage, Snapshot};
use crate::model::names::{ip_sort_key, ordinal_to_ip, workload_endpoint_name};
use crate::model::time::Millis;
use crate::model::{ClusterInformation, InvalidObject};

use super::dump::DumpContents;
use super::loadbalancer::LoadBalancerSection;
use super::merge::Duplicate;
use super::order::{dump_order, DumpOrder, OrderState};

/// Why a scan refused to run: the input could make live addresses look leaked.
#[derive(Debug, thiserror::Error)]
#[error("the dump is incomplete: {missing:?} missing. {hint}")]
pub struct IncompleteDump {
    pub missing: Vec<&'static str>,
    pub hint: &'static str,
}

pub const DUMP_HINT: &str = "Make a complete dump with `calico-kube-controllers leak-scan --save-dump DIR`, \
or with the README's `kubectl get --raw` commands (IPAM first, then Nodes, Namespaces, Pods)";

/// Why a scan refused to run (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ScanRefused {
    #[error(transparent)]
    Incomplete(#[from] IncompleteDump),
    #[error(
        "the dump looks partial: live pods run on {missing} of the {named} nodes they name that are missing from \
         its Nodes (more than {threshold}%; e.g. {examples:?}). Dump Nodes again (after IPAM, before Pods), or pass \
         --allow-partial-nodes to judge those nodes as live"
    )]
    PartialNodes { missing: usize, named: usize, threshold: f64, examples: Vec<String> },
}

/// What a scan may be told beyond its input.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Judge nodes that live pods name but the dump lacks as live, however many there are.
    pub allow_partial_nodes: bool,
    /// Refuse when more than this share (percent) of the nodes named by live pods are missing.
    pub missing_nodes_percent: f64,
    /// The report's `version`: calicoctl refuses a report of another version without `--force`.
    /// Unset: the cluster's `calicoVersion` from ClusterInformation.
    pub calicoctl_version: Option<String>,
}

/// A twentieth: a few nodes created between the Nodes and Pods reads (or being drained) are
/// normal churn; more means the Nodes part is not the whole cluster's.
pub const DEFAULT_MISSING_NODES_PERCENT: f64 = 5.0;

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions { allow_partial_nodes: false, missing_nodes_percent: DEFAULT_MISSING_NODES_PERCENT, calicoctl_version: None }
    }
}

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
    /// An `lb-unwanted` leak's Service (in `namespace`), as its allocation names it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service: String,
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
    pub duplicates: u64,
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
    /// leak-scan only: objects found twice with different content, and which copy was kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<Duplicate>,
    /// leak-scan only: nodes that live pods run on but the dump's Nodes lack (judged as live).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes_missing_from_dump: Vec<String>,
    /// leak-scan only: whether the dump's parts were read in the safe order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_order: Option<DumpOrder>,
    /// leak-scan only: the LoadBalancer addresses, judged as the LoadBalancer controller would.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSection>,
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
/// are missing (with no pods every IP would look leaked), or when live pods name too many nodes
/// the dump lacks (its Nodes are not the whole cluster's).
pub fn scan_dump(dump: &mut DumpContents, now: Millis, opts: &ScanOptions) -> Result<LeakReport, ScanRefused> {
    let mut missing = Vec::new();
    // A live scan listed every kind: an empty list is the cluster's answer, not a gap in a dump.
    let checked: &[(&str, &str)] = if dump.complete_pod_view { &[] } else { &REQUIRED_KINDS };
    for (kind, label) in checked {
        if dump.kind_counts.get(*kind).copied().unwrap_or(0) == 0 {
            missing.push(*label);
        }
    }
    if !missing.is_empty() {
        return Err(IncompleteDump { missing, hint: DUMP_HINT }.into());
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
            for (calico, k8s) in &dump.calico_nodes {
                built.set_node_alias(calico, k8s.as_deref());
            }
            built
        }
    };
    let nodes_missing = live_nodes_missing(&index);
    // A live scan listed the Nodes itself, completely: pods on a node that is gone (the pod GC
    // not done yet) are a real state there, not a sign of a partial dump. Their nodes are still
    // judged live below.
    if !nodes_missing.is_empty() && !opts.allow_partial_nodes && !dump.read_live {
        let named = nodes_named_by_live_pods(&index).len();
        if nodes_missing.len() as f64 * 100.0 > opts.missing_nodes_percent * named as f64 {
            return Err(ScanRefused::PartialNodes {
                missing: nodes_missing.len(),
                named,
                threshold: opts.missing_nodes_percent,
                examples: nodes_missing.iter().take(5).cloned().collect(),
            });
        }
    }
    // A node that a live pod runs on is not gone, whatever the Nodes part says.
    for name in &nodes_missing {
        index.apply_node(&crate::model::NodeLite { metadata: crate::model::node::NodeMeta { name: name.clone(), ..Default::default() } });
    }
    let order = dump_order(dump);
    // A dump proves nothing about namespaces it holds no pod of: the user may have listed
    // pods of some namespaces only. Allocations elsewhere are reported but never releasable,
    // unless a Namespace list read after IPAM shows the namespace deleted.
    index.coverage = if dump.complete_pod_view {
        PodCoverage::All
    } else {
        let mut covered = dump.pod_namespaces.clone();
        if dump.namespaces_listed && order.namespaces_after_ipam {
            covered.extend(allocation_namespaces(&index).into_iter().filter(|ns| !dump.namespaces.contains(ns)));
        }
        PodCoverage::Namespaces(covered)
    };
    let cfg = GcConfig {
        leak_grace: dump.kube_controllers_config.as_ref().map_or(crate::model::config::DEFAULT_LEAK_GRACE, |k| k.spec.leak_grace_period()),
        max_releases_per_pass: usize::MAX,
        ip_cooldown: dump.ipam_config.as_ref().and_then(|c| c.spec.ip_cooldown_seconds).map_or(0, |s| i64::from(s) * 1000),
        // The dump is the only source of truth a scan has.
        revalidate_live: false,
        // The dump's nodes are the whole cluster's: a node it lacks (and no live pod names) is deleted.
        node_proof: crate::ipam::gc::NodeProof::AbsenceIsProof,
        // One read-only observation: the release procedure's two scans are its second look.
        ..GcConfig::default()
    };
    let holds = Holds {
        pods: dump.unreadable_pods.iter().filter(|(_, n)| !n.is_empty()).cloned().collect(),
        any_pod: dump.unreadable_pods.iter().any(|(_, n)| n.is_empty()).then_some(HeldBy::PodUnreadable)
            .or((dump.unreadable_items > 0).then_some(HeldBy::ObjectUnreadable)),
        blocks: dump.held_blocks.clone(),
        handles: dump.held_handles.clone(),
        everything: if order.state == OrderState::Unsafe {
            Some(HeldBy::DumpOrderUnsafe)
        } else {
            dump.conflicting_settings.then_some(HeldBy::ConflictingCopies)
        },
    };
    let meta = ReportMeta::from_cluster_info(dump.cluster_info.as_ref());
    let mut report = observe_holding(&mut index, &cfg, now, meta, invalid, &holds);
    report.version = opts
        .calicoctl_version
        .clone()
        .or_else(|| dump.cluster_info.as_ref().and_then(|c| c.spec.calico_version.clone()).filter(|v| !v.is_empty()))
        .unwrap_or(report.version);
    report.summary.duplicates = dump.duplicates.len() as u64;
    report.duplicates = dump.duplicates.clone();
    report.nodes_missing_from_dump = nodes_missing;
    report.dump_order = Some(order);
    super::loadbalancer::judge(dump, &index, now, &mut report);
    Ok(report)
}

/// Distinct nodes that present, unfinished pods run on.
fn nodes_named_by_live_pods(index: &IpamIndex) -> BTreeSet<crate::ipam::intern::Sym> {
    index.present_pods().filter(|p| !p.finished() && !index.resolve(p.node).is_empty()).map(|p| p.node).collect()
}

/// Nodes that live pods run on and the index does not know, sorted.
fn live_nodes_missing(index: &IpamIndex) -> Vec<String> {
    let mut v: Vec<String> =
        nodes_named_by_live_pods(index).into_iter().filter(|&n| !index.node_exists(n)).map(|n| index.resolve(n).to_string()).collect();
    v.sort();
    v
}

/// Every namespace some allocation names.
fn allocation_namespaces(index: &IpamIndex) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, b) in index.blocks() {
        for a in &b.allocs {
            let ns = index.resolve(a.namespace);
            if !ns.is_empty() && !out.contains(ns) {
                out.insert(ns.to_string());
            }
        }
    }
    out
}

/// What a scan must not release although the GC would: the dump could not say enough.
#[derive(Debug, Default)]
pub struct Holds {
    /// (namespace, pod) of pods the parser rejected.
    pub pods: BTreeSet<(String, String)>,
    /// Some rejected item named no one: every pod allocation is held, with this reason.
    pub any_pod: Option<HeldBy>,
    /// CIDRs of blocks with contested copies.
    pub blocks: BTreeSet<String>,
    /// Handle IDs with contested copies.
    pub handles: BTreeSet<String>,
    /// Hold everything, for this reason.
    pub everything: Option<HeldBy>,
}

impl Holds {
    fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.any_pod.is_none() && self.blocks.is_empty() && self.handles.is_empty() && self.everything.is_none()
    }

    /// Takes the held allocations out of `plan`'s releases and marks their leaks held; other
    /// leaks of a held allocation's handle are held too (a handle is released all or none), and
    /// so are the node and empty-block releases that would take a held allocation's block.
    pub fn apply(&self, index: &IpamIndex, plan: &mut Plan) {
        if self.is_empty() {
            return;
        }
        let mut held: HashMap<u32, HeldBy> = HashMap::new();
        for l in &plan.leaks {
            let (Some(b), Some(a)) = (index.block(gid_slot(l.gid)), index.alloc(l.gid)) else { continue };
            let reason = if let Some(r) = self.everything {
                Some(r)
            } else if self.blocks.contains(&b.cidr.to_string()) {
                Some(HeldBy::ConflictingCopies)
            } else if a.kind == AllocKind::Pod
                && self.pods.contains(&(index.resolve(a.namespace).to_string(), index.resolve(a.pod).to_string()))
            {
                Some(HeldBy::PodUnreadable)
            } else if a.kind == AllocKind::Pod {
                self.any_pod
            } else {
                None
            };
            if let Some(r) = reason {
                held.insert(l.gid, r);
            }
        }
        let held_handles: BTreeSet<_> = held.keys().filter_map(|&g| index.alloc(g)).map(|a| a.handle).collect();
        for l in &plan.leaks {
            if !held.contains_key(&l.gid) && index.alloc(l.gid).is_some_and(|a| held_handles.contains(&a.handle)) {
                held.insert(l.gid, HeldBy::HandleHasValidIp);
            }
        }
        for l in &mut plan.leaks {
            if let Some(&r) = held.get(&l.gid) {
                l.held_by = Some(l.held_by.unwrap_or(r));
            }
        }
        for release in &mut plan.releases {
            let slot = index.block_slot(&release.cidr);
            release.items.retain(|i| !slot.is_some_and(|s| held.contains_key(&crate::ipam::index::gid(s, i.ordinal))));
        }
        plan.releases.retain(|r| !r.items.is_empty());
        let mut held_nodes: BTreeSet<String> = BTreeSet::new();
        let mut held_cidrs: BTreeSet<String> = self.blocks.clone();
        for &g in held.keys() {
            let (Some(b), Some(a)) = (index.block(gid_slot(g)), index.alloc(g)) else { continue };
            held_nodes.insert(index.resolve(a.node).to_string());
            held_nodes.insert(index.resolve(b.host()).to_string());
            held_cidrs.insert(b.cidr.to_string());
        }
        let all = self.everything.is_some();
        plan.nodes_to_release.retain(|n| !all && !held_nodes.contains(&n.node) && !n.blocks.iter().any(|(_, c)| held_cidrs.contains(&c.to_string())));
        for e in &mut plan.empty_blocks {
            if e.releasable && (all || held_cidrs.contains(&e.cidr.to_string())) {
                e.releasable = false;
                e.held_by = Some(self.everything.unwrap_or(HeldBy::ConflictingCopies).as_str());
            }
        }
        for o in &mut plan.orphan_handles {
            if all || self.handles.contains(&o.handle_id) {
                o.releasable = false;
            }
        }
    }
}

/// One observation of `index` at `now` with fresh GC state, and the look-ahead pass that decides
/// what is releasable. Used by `leak-scan` in both its dump and live forms.
pub fn observe(index: &mut IpamIndex, cfg: &GcConfig, now: Millis, meta: ReportMeta, invalid: Vec<InvalidObject>) -> LeakReport {
    observe_holding(index, cfg, now, meta, invalid, &Holds::default())
}

/// As [`observe`], with `holds` taken out of what the look-ahead pass would release.
pub fn observe_holding(index: &mut IpamIndex, cfg: &GcConfig, now: Millis, meta: ReportMeta, invalid: Vec<InvalidObject>, holds: &Holds) -> LeakReport {
    let mut gc = GcState::new();
    let no_fresh = BTreeMap::new();
    let mut first = gc.pass(index, now, cfg, &Scope::Full, None, &no_fresh);
    let later = now + cfg.leak_grace.max(crate::ipam::gc::VM_MIN_GRACE) + 1;
    let mut second = gc.pass(index, later, cfg, &Scope::Full, None, &no_fresh);
    holds.apply(index, &mut first);
    holds.apply(index, &mut second);
    build_report(index, &first, &second, cfg, meta, invalid, AllocationMap::All)
}

/// Which addresses a report's calicoctl allocation map (`allocations`) lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationMap {
    /// Every allocation of the cluster, as `calicoctl ipam check` writes it.
    All,
    /// Only the addresses of the report's leaks (every allocation at such an address, so an
    /// address two overlapping blocks hold keeps both). `calicoctl ipam release --from-report`
    /// acts on `inUse: false` entries alone, so this is all of the map it uses; the summary
    /// keeps the totals. The rest is never formatted: at 30,000 allocations the whole map was
    /// about 30 MB, most of the controller's heap peak each time it published a report.
    LeakedOnly,
}

/// Renders a report from a pass (`current`) and the pass that decides releasability
/// (`outlook`; the controller passes the same plan twice), its allocation map as `map` says.
pub fn build_report(
    index: &IpamIndex,
    current: &Plan,
    outlook: &Plan,
    cfg: &GcConfig,
    meta: ReportMeta,
    invalid: Vec<InvalidObject>,
    map: AllocationMap,
) -> LeakReport {
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
            handle: index.handle_name(a.handle).into_owned(),
            namespace: index.resolve(a.namespace).to_string(),
            pod: index.resolve(a.pod).to_string(),
            service: String::new(),
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

    let leaked_ips: Option<HashSet<IpAddr>> = match map {
        AllocationMap::All => None,
        AllocationMap::LeakedOnly => Some(leaks.iter().filter_map(|l| l.ip.parse().ok()).collect()),
    };
    let mut allocations: BTreeMap<String, Vec<CheckAllocation>> = BTreeMap::new();
    for slot in index.blocks_sorted() {
        let b = index.block(slot).expect("sorted slot exists");
        let host = index.resolve(b.host());
        for a in &b.allocs {
            let g = crate::ipam::index::gid(slot, u32::from(a.ordinal));
            let ip = ordinal_to_ip(&b.cidr, u32::from(a.ordinal));
            if leaked_ips.as_ref().is_some_and(|keep| !keep.contains(&ip)) {
                continue;
            }
            let ip = ip.to_string();
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
                handle: (a.kind != AllocKind::WindowsReserved).then(|| index.handle_name(a.handle).into_owned()),
                sequence_number: a.seq,
                pod: index.resolve(a.pod).to_string(),
                namespace: index.resolve(a.namespace).to_string(),
                borrowed: !host.is_empty() && node != host || host.is_empty(),
                node,
                alloc_type: index.resolve(b.alloc_type(a.ordinal)).to_string(),
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
        duplicates: Vec::new(),
        nodes_missing_from_dump: Vec::new(),
        dump_order: None,
        load_balancer: None,
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
    if !r.duplicates.is_empty() {
        writeln!(out, "  duplicate objects:  {}", s.duplicates)?;
    }
    if !r.nodes_missing_from_dump.is_empty() {
        writeln!(out, "  nodes missing from the dump (judged live): {}", r.nodes_missing_from_dump.join(", "))?;
    }
    if let Some(o) = &r.dump_order {
        let state = match o.state {
            OrderState::Safe => "safe",
            OrderState::Unsafe => "UNSAFE",
            OrderState::Unknown => "unknown",
        };
        writeln!(out, "  dump order:         {state} ({})", o.detail)?;
    }
    if let Some(lb) = &r.load_balancer {
        let mode = if lb.assign_ips.is_empty() { String::new() } else { format!("; assignIPs {}", lb.assign_ips) };
        writeln!(out, "  loadbalancer:       {} addresses ({} unwanted, {} not judged{mode})", lb.addresses, lb.unwanted, lb.not_judged)?;
        for note in &lb.notes {
            writeln!(out, "    note: {note}")?;
        }
    }
    let mut by_node: BTreeMap<&str, Vec<&LeakEntry>> = BTreeMap::new();
    for l in &r.leaks {
        by_node.entry(if l.node.is_empty() { "<no node>" } else { &l.node }).or_default().push(l);
    }
    for (node, leaks) in by_node {
        writeln!(out, "\nnode {node} ({} leaks)", leaks.len())?;
        writeln!(out, "  {:<40} {:<20} {:<12} POD / HELD BY", "IP", "REASON", "RELEASABLE")?;
        for l in leaks {
            let who = if !l.service.is_empty() {
                format!("service {}/{}", l.namespace, l.service)
            } else if l.pod.is_empty() {
                l.handle.clone()
            } else {
                format!("{}/{}", l.namespace, l.pod)
            };
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
        let r = scan_dump(&mut d, NOW, &ScanOptions::default()).unwrap();
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
        assert!(table.contains("dump order:         unknown"), "{table}");
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
        let r = scan_dump(&mut d, NOW, &ScanOptions::default()).unwrap();
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

    /// The controller's report lists, of the allocation map, exactly what the whole map holds at
    /// the leaked addresses (both passes' leaks, releasable or held), and the same summary.
    #[test]
    fn a_leaked_only_allocation_map_is_the_whole_map_at_the_leaked_addresses() {
        let d = read_bytes("dump.json", dump().as_bytes()).unwrap();
        let mut index = IpamIndex::new();
        index.reset(Snapshot { blocks: &d.blocks, affinities: &d.affinities, handles: &d.handles, pods: &d.pods, nodes: &d.nodes });
        let cfg = GcConfig { leak_grace: 1000, ..GcConfig::default() };
        let mut gc = GcState::new();
        let fresh = BTreeMap::new();
        for now in [NOW, NOW + 5_000] {
            let plan = gc.pass(&mut index, now, &cfg, &Scope::Full, None, &fresh);
            let whole = build_report(&index, &plan, &plan, &cfg, ReportMeta::default(), Vec::new(), AllocationMap::All);
            let lean = build_report(&index, &plan, &plan, &cfg, ReportMeta::default(), Vec::new(), AllocationMap::LeakedOnly);
            assert_eq!(whole.leaks.len(), 2, "both dead and foreign allocations are leaks");
            let leaked: BTreeSet<&str> = whole.leaks.iter().map(|l| l.ip.as_str()).collect();
            let expected: BTreeMap<&String, &Vec<CheckAllocation>> = whole.allocations.iter().filter(|(ip, _)| leaked.contains(ip.as_str())).collect();
            let got: BTreeMap<&String, &Vec<CheckAllocation>> = lean.allocations.iter().collect();
            assert_eq!(serde_json::to_value(got).unwrap(), serde_json::to_value(expected).unwrap());
            assert!(whole.allocations.len() > lean.allocations.len(), "the live pod's address is left out");
            assert_eq!(lean.leaks, whole.leaks);
            assert_eq!(serde_json::to_value(&lean.summary).unwrap(), serde_json::to_value(&whole.summary).unwrap());
        }
    }

    #[test]
    fn a_dump_without_pods_is_refused() {
        let mut d = read_bytes("dump.json", br#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}}]}"#).unwrap();
        let Err(ScanRefused::Incomplete(err)) = scan_dump(&mut d, NOW, &ScanOptions::default()) else { panic!("not refused") };
        assert!(err.missing.contains(&"Pods (all namespaces)"));
        assert!(err.missing.contains(&"IPAMBlocks"));
    }

    // ---- issue #10: partial, contradictory and mis-ordered dumps --------------------------------

    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// A list as the API server writes it (`kubectl get --raw`): kind and version before the
    /// items, which carry no kind of their own.
    fn typed_list(kind: &str, rv: u64, items: Vec<Value>) -> String {
        format!(r#"{{"kind":"{kind}List","apiVersion":"v1","metadata":{{"resourceVersion":"{rv}"}},"items":{}}}"#, Value::Array(items))
    }

    fn live_pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": ns}, "spec": {"nodeName": node},
               "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    }

    /// A /28 block on n1 whose ordinal i belongs to pod `p<i>` in namespace `ns` (attribute i).
    fn block_of(pods: usize, rv: u64) -> Value {
        let attrs: Vec<Value> = (0..pods)
            .map(|i| json!({"handle_id": format!("k8s-pod-network.p{i}"), "secondary": {"namespace": "ns", "pod": format!("p{i}"), "node": "n1"}}))
            .collect();
        let mut allocations = vec![Value::Null; 16];
        for (i, a) in allocations.iter_mut().enumerate().take(pods) {
            *a = json!(i);
        }
        let seq: serde_json::Map<String, Value> = (0..pods).map(|i| (i.to_string(), json!(i + 1))).collect();
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-28", "resourceVersion": rv.to_string()},
               "spec": {"cidr": "10.0.0.0/28", "affinity": "host:n1", "strictAffinity": false, "allocations": allocations,
                        "unallocated": (pods..16).collect::<Vec<_>>(), "attributes": attrs, "sequenceNumber": 100,
                        "sequenceNumberForAllocation": seq}})
    }

    fn scan_text(text: &str, opts: &ScanOptions) -> Result<LeakReport, ScanRefused> {
        let mut d = read_bytes("dump.json", text.as_bytes()).unwrap();
        scan_dump(&mut d, NOW, opts)
    }

    fn free_ips(r: &LeakReport) -> Vec<String> {
        r.allocations.values().flatten().filter(|a| !a.in_use).map(|a| a.ip.clone()).collect()
    }

    /// What a pod of the generated dumps is.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Role {
        Live,
        Gone,
        Unreadable,
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Live), Just(Role::Gone), Just(Role::Unreadable)]
    }

    fn dump_of(roles: &[Role]) -> String {
        let mut pods = vec![live_pod("ns", "anchor", "n1", "10.0.0.15")];
        for (i, r) in roles.iter().enumerate() {
            match r {
                Role::Live => pods.push(live_pod("ns", &format!("p{i}"), "n1", &format!("10.0.0.{i}"))),
                Role::Gone => {}
                // `spec` of the wrong type: the pod parser rejects it, its metadata is intact.
                Role::Unreadable => pods.push(json!({"metadata": {"name": format!("p{i}"), "namespace": "ns"}, "spec": "broken"})),
            }
        }
        format!(
            "{}\n{}\n{}",
            typed_list("IPAMBlock", 10, vec![block_of(roles.len(), 9)]),
            typed_list("Node", 11, vec![json!({"metadata": {"name": "n1"}})]),
            typed_list("Pod", 12, pods)
        )
    }

    proptest! {
        /// Only the addresses of pods that are really gone are free in the report; a live or an
        /// unreadable pod's address never is, and each unreadable pod is listed under `invalid`.
        #[test]
        fn only_gone_pods_addresses_are_free(roles in proptest::collection::vec(role(), 1..10)) {
            let r = scan_text(&dump_of(&roles), &ScanOptions::default()).unwrap();
            let free = free_ips(&r);
            for (i, role) in roles.iter().enumerate() {
                let ip = format!("10.0.0.{i}");
                prop_assert_eq!(free.contains(&ip), *role == Role::Gone, "{} ({:?})", ip, role);
                if *role == Role::Unreadable {
                    let leak = r.leaks.iter().find(|l| l.ip == ip).unwrap();
                    prop_assert_eq!(leak.held_by, Some("pod-unreadable"));
                    let name = format!("ns/p{i}");
                    prop_assert!(r.invalid.iter().any(|e| e.kind == "Pod" && e.name == name));
                }
            }
        }

        /// Two snapshots of the pods in one dump: an address either snapshot shows a pod holding
        /// is never free, in either file order, and differing copies are reported.
        #[test]
        fn duplicate_pods_keep_the_union_of_their_ips(a in proptest::collection::vec(any::<bool>(), 4), b in proptest::collection::vec(any::<bool>(), 4), swap in any::<bool>()) {
            let snapshot = |holds: &[bool], rv: u64| {
                let pods = holds.iter().enumerate().map(|(i, &h)| {
                    if h { live_pod("ns", &format!("p{i}"), "n1", &format!("10.0.0.{i}")) }
                    else { json!({"metadata": {"name": format!("p{i}"), "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Succeeded"}}) }
                }).collect();
                typed_list("Pod", rv, pods)
            };
            let (first, second) = if swap { (snapshot(&b, 13), snapshot(&a, 12)) } else { (snapshot(&a, 12), snapshot(&b, 13)) };
            let text = format!("{}\n{}\n{first}\n{second}", typed_list("IPAMBlock", 10, vec![block_of(4, 9)]), typed_list("Node", 11, vec![json!({"metadata": {"name": "n1"}})]));
            let r = scan_text(&text, &ScanOptions::default()).unwrap();
            let free = free_ips(&r);
            for i in 0..4 {
                let ip = format!("10.0.0.{i}");
                prop_assert_eq!(free.contains(&ip), !a[i] && !b[i], "{}", ip);
            }
            prop_assert_eq!(r.duplicates.len(), (0..4).filter(|&i| a[i] != b[i]).count());
        }
    }

    #[test]
    fn a_pod_whose_name_cannot_be_read_holds_every_pod_address() {
        let text = format!(
            "{}\n{}\n{}",
            typed_list("IPAMBlock", 10, vec![block_of(3, 9)]),
            typed_list("Node", 11, vec![json!({"metadata": {"name": "n1"}})]),
            r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"12"},"items":[{"metadata":{"name":"anchor","namespace":"ns"},"spec":{"nodeName":"n1"}}, {"metadata": 7}]}"#
        );
        let r = scan_text(&text, &ScanOptions::default()).unwrap();
        assert!(free_ips(&r).is_empty(), "{:?}", free_ips(&r));
        assert!(r.leaks.iter().all(|l| l.held_by == Some("pod-unreadable")), "{:?}", r.leaks);
    }

    #[test]
    fn duplicate_blocks_newer_numeric_version_wins_and_unordered_copies_are_held() {
        let nodes = typed_list("Node", 11, vec![json!({"metadata": {"name": "n1"}})]);
        let pods = typed_list("Pod", 12, vec![live_pod("ns", "p0", "n1", "10.0.0.0")]);
        // The old copy holds p1's address; the newer one (rv 20) shows it released.
        let (old, new) = (block_of(2, 9), block_of(1, 20));
        for (first, second) in [(&old, &new), (&new, &old)] {
            let text = format!("{}\n{}\n{nodes}\n{pods}", typed_list("IPAMBlock", 21, vec![first.clone()]), typed_list("IPAMBlock", 21, vec![second.clone()]));
            let r = scan_text(&text, &ScanOptions::default()).unwrap();
            assert!(r.leaks.is_empty(), "the newer copy has no leak: {:?}", r.leaks);
            assert_eq!(r.duplicates.len(), 1);
        }
        // Without numeric versions nothing tells the copies apart: the block is held.
        let mut a = block_of(2, 0);
        let mut b = block_of(3, 0);
        a["metadata"]["resourceVersion"] = json!("");
        b["metadata"]["resourceVersion"] = json!("x");
        let text = format!("{}\n{nodes}\n{pods}", typed_list("IPAMBlock", 10, vec![a, b]));
        let r = scan_text(&text, &ScanOptions::default()).unwrap();
        assert!(free_ips(&r).is_empty());
        assert!(r.leaks.iter().all(|l| l.held_by == Some("conflicting-copies")), "{:?}", r.leaks);
        assert_eq!(r.duplicates[0].resolution, "held");
    }

    fn nodes_dump(listed: usize, named: usize) -> String {
        let nodes = (0..listed).map(|i| json!({"metadata": {"name": format!("n{i}")}})).collect();
        let pods = (0..named).map(|i| live_pod("ns", &format!("q{i}"), &format!("n{i}"), &format!("10.9.0.{i}"))).collect();
        // n<listed>'s tunnel address: released if the node counted as gone.
        let tunnel = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-28", "resourceVersion": "9"},
            "spec": {"cidr": "10.0.0.0/28", "strictAffinity": false, "allocations": [0, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null],
                     "unallocated": (1..16).collect::<Vec<_>>(), "attributes": [{"handle_id": format!("ipip-tunnel-addr-n{listed}"), "secondary": {"node": format!("n{listed}"), "type": "ipipTunnelAddress"}}],
                     "sequenceNumberForAllocation": {"0": 1}}});
        format!("{}\n{}\n{}", typed_list("IPAMBlock", 10, vec![tunnel]), typed_list("Node", 11, nodes), typed_list("Pod", 12, pods))
    }

    #[test]
    fn a_node_missing_from_the_dump_is_gone_only_if_no_live_pod_runs_on_it() {
        // 40 nodes listed, pods on 41: one missing (2.4%) is judged live, its tunnel kept.
        let r = scan_text(&nodes_dump(40, 41), &ScanOptions::default()).unwrap();
        assert_eq!(r.nodes_missing_from_dump, ["n40"]);
        assert!(free_ips(&r).is_empty(), "{:?}", free_ips(&r));
        // No pod on it: gone, its tunnel address free.
        let r = scan_text(&nodes_dump(40, 40), &ScanOptions::default()).unwrap();
        assert_eq!(free_ips(&r), ["10.0.0.0"]);
    }

    #[test]
    fn many_nodes_missing_under_live_pods_refuse_the_scan_unless_allowed() {
        // 10 listed, pods on 12: 2 of 12 missing (17%) is a partial Nodes dump.
        let err = scan_text(&nodes_dump(10, 12), &ScanOptions::default()).unwrap_err();
        assert!(matches!(err, ScanRefused::PartialNodes { missing: 2, named: 12, .. }), "{err}");
        assert!(err.to_string().contains("--allow-partial-nodes"));
        let r = scan_text(&nodes_dump(10, 12), &ScanOptions { allow_partial_nodes: true, ..ScanOptions::default() }).unwrap();
        assert_eq!(r.nodes_missing_from_dump, ["n10", "n11"]);
        assert!(free_ips(&r).is_empty());
        let r = scan_text(&nodes_dump(10, 12), &ScanOptions { missing_nodes_percent: 20.0, ..ScanOptions::default() });
        assert!(r.is_ok());
    }

    #[test]
    fn a_live_scan_is_never_refused_as_partial_and_still_judges_the_missing_nodes_live() {
        // The scan listed the Nodes itself: pods on deleted nodes are real, not a partial dump.
        let mut d = read_bytes("dump.json", nodes_dump(10, 12).as_bytes()).unwrap();
        d.read_live = true;
        let r = scan_dump(&mut d, NOW, &ScanOptions::default()).expect("a live scan is not refused");
        assert_eq!(r.nodes_missing_from_dump, ["n10", "n11"]);
        assert!(free_ips(&r).is_empty(), "their pods' addresses stay in use");
    }

    #[test]
    fn pods_read_before_ipam_hold_every_leak_and_say_why() {
        let text = dump_of(&[Role::Gone, Role::Live]).replace("\"resourceVersion\":\"10\"", "\"resourceVersion\":\"99\"");
        let r = scan_text(&text, &ScanOptions::default()).unwrap();
        let order = r.dump_order.as_ref().unwrap();
        assert_eq!(order.state, OrderState::Unsafe, "{}", order.detail);
        assert!(free_ips(&r).is_empty());
        assert_eq!(r.leaks[0].held_by, Some("dump-order-unsafe"));
        let r = scan_text(&dump_of(&[Role::Gone]), &ScanOptions::default()).unwrap();
        assert_eq!(r.dump_order.unwrap().state, OrderState::Safe);
    }

    #[test]
    fn leaks_in_namespaces_the_dump_shows_deleted_are_releasable() {
        let mut v: Value = serde_json::from_str(&dump()).unwrap();
        let items = v["items"].take();
        // The same objects as typed lists in the safe order, with a Namespace list lacking `elsewhere`.
        let of = |k: &str| items.as_array().unwrap().iter().filter(|o| o["kind"] == k).cloned().collect::<Vec<_>>();
        let namespaces = vec![json!({"metadata": {"name": "ns"}})];
        let text = format!("{}\n{}\n{}\n{}", typed_list("IPAMBlock", 10, of("IPAMBlock")), typed_list("Node", 11, of("Node")),
            typed_list("Namespace", 12, namespaces.clone()), typed_list("Pod", 13, of("Pod")));
        let r = scan_text(&text, &ScanOptions::default()).unwrap();
        let other = r.leaks.iter().find(|l| l.pod == "x").unwrap();
        assert!(other.releasable, "{other:?}");
        // A Namespace list read before IPAM proves nothing: `elsewhere` may be newer than it.
        let text = format!("{}\n{}\n{}\n{}", typed_list("Namespace", 9, namespaces), typed_list("IPAMBlock", 10, of("IPAMBlock")),
            typed_list("Node", 11, of("Node")), typed_list("Pod", 13, of("Pod")));
        let r = scan_text(&text, &ScanOptions::default()).unwrap();
        assert_eq!(r.leaks.iter().find(|l| l.pod == "x").unwrap().held_by, Some("namespace-not-in-dump"));
    }

    #[test]
    fn the_report_version_is_the_clusters_calico_version_or_the_one_given() {
        let mut v: Value = serde_json::from_str(&dump()).unwrap();
        v["items"].as_array_mut().unwrap().push(json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "ClusterInformation",
            "metadata": {"name": "default", "resourceVersion": "77"}, "spec": {"clusterGUID": "g", "calicoVersion": "v3.28.4", "datastoreReady": false}}));
        let text = v.to_string();
        let r = scan_text(&text, &ScanOptions::default()).unwrap();
        assert_eq!((r.version.as_str(), r.cluster_information_revision.as_str(), r.datastore_locked), ("v3.28.4", "77", true));
        let r = scan_text(&text, &ScanOptions { calicoctl_version: Some("v3.29.0".into()), ..ScanOptions::default() }).unwrap();
        assert_eq!(r.version, "v3.29.0");
    }
}
