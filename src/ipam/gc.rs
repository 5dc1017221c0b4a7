//! GC decisions: which allocations are valid, candidate or confirmed leaks, and what one pass
//! releases (SPEC §5.5-§5.10, with Part A's stricter rules).
//!
//! Owns: the verdict of one allocation against the live facts, the verdict cache (which
//! allocations are leaks on cached facts, refreshed from the index's changed-allocation record),
//! the leak tracker (first seen, confirmed), the empty-block and orphan-handle trackers, and the
//! computing of the plan (its types live in `plan`).
//! Must not: read the clock (callers pass `now`), do I/O, or change the index's facts: the only
//! write is taking its changed-allocation record.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use roaring::RoaringBitmap;

use super::index::{gid_ordinal, gid_slot, Alloc, AllocKind, Gid, IpamIndex, PodSlot};
use super::intern::{FastMap, Sym};
use super::plan::{BlockRelease, ColdBlock, EmptyBlockRecord, HeldBy, LeakReason, LeakRecord, LeakState, NodeRelease, OrphanHandle, Plan, ReleaseItem, Scope};
use crate::guard::{self, Decision, GuardConfig, MassGuard, Proposal};
use crate::model::names::ordinal_to_ip;
use crate::model::time::{Millis, PassTime};
use crate::model::{PodFacts, PodPhase};

/// KubeVirt VM allocations are never confirmed sooner than this (upstream's floor).
pub const VM_MIN_GRACE: Millis = 5 * 60 * 1000;
/// Upstream releases at most this many addresses per pass; the rest roll over to the next.
pub const DEFAULT_MAX_RELEASES_PER_PASS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct GcConfig {
    /// 0 disables confirmation of leaks on live nodes and empty-block release.
    pub leak_grace: Millis,
    pub max_releases_per_pass: usize,
    /// IPAMConfig `ipCooldownSeconds`, in milliseconds.
    pub ip_cooldown: Millis,
    /// A confirmed pod leak on a live node is released only after the shell re-read its pod
    /// from the API (SPEC §5.7 final re-validation) and passed it in `fresh_pods`. The
    /// controller sets this; leak-scan and simulate judge on their snapshot alone.
    pub revalidate_live: bool,
    /// Which nodes missing from the index are deleted (SPEC issue #9: a cache miss is not a
    /// deletion).
    pub node_proof: NodeProof,
    /// The mass-change guard over address releases and node cleanups (off for snapshots).
    pub guard: GuardConfig,
    /// Held sets an operator approved, by id.
    pub guard_approved: BTreeSet<String>,
    /// Every required watch is healthy: a full pass then is a complete observation for the guard.
    pub view_complete: bool,
}

/// Which nodes absent from the index count as deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NodeProof {
    /// Every absent node is deleted: the input is a complete snapshot (leak-scan's dump or live
    /// listing, simulate).
    #[default]
    AbsenceIsProof,
    /// Only these absent nodes are deleted (a read answered NotFound); any other absent node is
    /// unproven: its tunnel and affinities are kept and its pod leaks are judged as on a live node.
    Proven(BTreeSet<String>),
}

/// A node as one pass sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Exists,
    Gone,
    /// Absent from the index, but not proven deleted.
    Unproven,
}

/// `NodeProof` resolved against the index for one pass.
#[derive(Debug, Clone, Copy)]
enum Proof<'a> {
    /// A complete snapshot: every absent node is gone.
    Complete,
    /// Symbols of the proven-gone nodes.
    Proven(&'a RoaringBitmap),
    /// No absent node is proven gone (the verdict cache's second view).
    NoneProven,
}

impl Proof<'_> {
    fn state(self, index: &IpamIndex, node: Sym) -> NodeState {
        if index.node_exists(node) {
            return NodeState::Exists;
        }
        // No node attribute: nothing to read, and absence is all there is (as before proofs).
        if node.is_none() {
            return NodeState::Gone;
        }
        match self {
            Proof::Complete => NodeState::Gone,
            Proof::Proven(bm) if bm.contains(node.0) => NodeState::Gone,
            Proof::Proven(_) | Proof::NoneProven => NodeState::Unproven,
        }
    }
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            leak_grace: crate::model::config::DEFAULT_LEAK_GRACE,
            max_releases_per_pass: DEFAULT_MAX_RELEASES_PER_PASS,
            ip_cooldown: 0,
            revalidate_live: false,
            node_proof: NodeProof::AbsenceIsProof,
            guard: GuardConfig::OFF,
            guard_approved: BTreeSet::new(),
            view_complete: true,
        }
    }
}

/// Why an allocation is not garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValidReason {
    PodOwnsIp,
    /// Part A: a live, unfinished pod reports this IP, whatever the allocation's attributes say.
    LivePodReportsIp,
    PodIpNotReported,
    UnparsablePodIp,
    TunnelNodeExists,
    /// Neither pod nor tunnel attributes: an owner we cannot judge.
    UnknownOwner,
    NoNodeAttribute,
    VmNotProvenGone,
    WindowsReserved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid(ValidReason),
    Leak(LeakReason),
}

/// KubeVirt VirtualMachines and VirtualMachineInstances, when the cluster has them.
#[derive(Debug, Clone, Default)]
pub struct KubeVirtFacts {
    /// `(namespace, name)` of every VirtualMachine.
    pub vms: HashSet<(String, String)>,
    /// `(namespace, name)` of every VMI -> whether a VirtualMachine owns it.
    pub vmis: HashMap<(String, String), bool>,
}

/// The facts about the pod an allocation names, from the cache or from a fresh read.
#[derive(Debug, Clone, Copy)]
struct PodView<'a> {
    same_node_or_unknown: bool,
    status_reports_ip: bool,
    unparsable_ips: bool,
    evicted: bool,
    phase: PodPhase,
    finished: bool,
    ips: &'a [IpAddr],
}

impl<'a> PodView<'a> {
    /// `knode`: the Kubernetes name of the allocation's node ("" when gone or unknown).
    fn from_slot(index: &IpamIndex, p: &'a PodSlot, knode: &str) -> Self {
        PodView {
            same_node_or_unknown: p.node.is_none() || knode.is_empty() || index.resolve(p.node) == knode,
            status_reports_ip: p.status_reports_ip,
            unparsable_ips: p.unparsable_ips,
            evicted: p.evicted,
            phase: p.phase(),
            finished: p.finished(),
            ips: &p.ips,
        }
    }
    fn from_facts(p: &'a PodFacts, knode: &str) -> Self {
        PodView {
            same_node_or_unknown: p.node.is_empty() || knode.is_empty() || p.node == knode,
            status_reports_ip: p.status_reports_ip,
            unparsable_ips: p.unparsable_ips,
            evicted: p.evicted,
            phase: p.phase,
            finished: p.finished(),
            ips: if p.host_network { &[] } else { &p.ips },
        }
    }
}

/// SPEC §5.6 steps 4-8 for a pod allocation whose pod lookup gave `pod`.
fn judge_pod(pod: Option<PodView<'_>>, ip: IpAddr, node_gone: bool) -> Verdict {
    let Some(p) = pod else {
        return Verdict::Leak(if node_gone { LeakReason::NodeDeleted } else { LeakReason::PodNotFound });
    };
    if !p.same_node_or_unknown {
        return Verdict::Leak(LeakReason::PodRescheduled);
    }
    if p.unparsable_ips {
        return Verdict::Valid(ValidReason::UnparsablePodIp);
    }
    if !p.status_reports_ip && !p.finished {
        return Verdict::Valid(ValidReason::PodIpNotReported);
    }
    if p.phase == PodPhase::Failed && p.evicted {
        return Verdict::Leak(LeakReason::PodEvicted);
    }
    if p.finished {
        return Verdict::Leak(LeakReason::PodFinished);
    }
    if p.ips.contains(&ip) {
        Verdict::Valid(ValidReason::PodOwnsIp)
    } else {
        Verdict::Leak(LeakReason::IpNotInPod)
    }
}

fn judge_vm(index: &IpamIndex, g: Gid, a: &Alloc, kubevirt: Option<&KubeVirtFacts>) -> Verdict {
    let Some(kv) = kubevirt else { return Verdict::Valid(ValidReason::VmNotProvenGone) };
    let vmi = index.block(gid_slot(g)).map_or(Sym::NONE, |b| b.vmi(a.ordinal));
    if a.namespace.is_none() || vmi.is_none() {
        // Upstream: a VM allocation without a namespace or VMI name is valid.
        return Verdict::Valid(ValidReason::VmNotProvenGone);
    }
    let key = (index.resolve(a.namespace).to_string(), index.resolve(vmi).to_string());
    if kv.vms.contains(&key) || kv.vmis.get(&key) == Some(&false) {
        return Verdict::Valid(ValidReason::VmNotProvenGone);
    }
    Verdict::Leak(LeakReason::VmDeleted)
}

/// The verdict for one allocation against the cached facts, every node absent from the index
/// taken as deleted.
pub fn classify(index: &IpamIndex, g: Gid, a: &Alloc, cidr: &IpNet, kubevirt: Option<&KubeVirtFacts>) -> Verdict {
    classify_with(index, g, a, cidr, kubevirt, Proof::Complete)
}

/// The verdict for one allocation against the cached facts and `proof`. A tunnel of an unproven
/// node is a leak (the pass holds it); a pod allocation on one is judged as on a live node.
fn classify_with(index: &IpamIndex, g: Gid, a: &Alloc, cidr: &IpNet, kubevirt: Option<&KubeVirtFacts>, proof: Proof<'_>) -> Verdict {
    match a.kind {
        AllocKind::WindowsReserved => return Verdict::Valid(ValidReason::WindowsReserved),
        AllocKind::Unknown => return Verdict::Valid(ValidReason::UnknownOwner),
        // Part A: whatever the allocation says it is, an IP a live pod reports is not garbage.
        _ if index.live_gids().contains(g) => return Verdict::Valid(ValidReason::LivePodReportsIp),
        AllocKind::Tunnel => {
            return if index.node_exists(a.node) {
                Verdict::Valid(ValidReason::TunnelNodeExists)
            } else {
                Verdict::Leak(LeakReason::TunnelNodeDeleted)
            };
        }
        AllocKind::Pod => {}
    }
    if a.node.is_none() {
        // Upstream never examines allocations without a node attribute.
        return Verdict::Valid(ValidReason::NoNodeAttribute);
    }
    if a.vm {
        return judge_vm(index, g, a, kubevirt);
    }
    let node_gone = proof.state(index, a.node) == NodeState::Gone;
    // Upstream compares the pod's node with the Kubernetes node the allocation's node maps to.
    let knode = if node_gone { "" } else { index.kubernetes_name(a.node) };
    let pod = index.pod(a.pod_slot).filter(|p| p.present).map(|p| PodView::from_slot(index, p, knode));
    judge_pod(pod, ordinal_to_ip(cidr, gid_ordinal(g)), node_gone)
}

/// The verdict for a confirmed leak against a freshly read pod (`None` = NotFound), the final
/// re-validation before a release (SPEC §5.7), every absent node taken as deleted.
pub fn revalidate(index: &IpamIndex, g: Gid, fresh: Option<&PodFacts>, kubevirt: Option<&KubeVirtFacts>) -> Verdict {
    revalidate_with(index, g, fresh, kubevirt, Proof::Complete)
}

fn revalidate_with(index: &IpamIndex, g: Gid, fresh: Option<&PodFacts>, kubevirt: Option<&KubeVirtFacts>, proof: Proof<'_>) -> Verdict {
    let Some(a) = index.alloc(g) else { return Verdict::Valid(ValidReason::UnknownOwner) };
    let Some(ip) = index.ip_of(g) else { return Verdict::Valid(ValidReason::UnknownOwner) };
    if a.kind != AllocKind::Pod || a.vm || index.live_gids().contains(g) {
        // Tunnels and VMs are judged on cached facts only; a live pod reporting the IP wins.
        let slot = gid_slot(g);
        return classify_with(index, g, a, &index.block(slot).expect("allocated gid has a block").cidr, kubevirt, proof);
    }
    let node_gone = proof.state(index, a.node) == NodeState::Gone;
    let knode = if node_gone { "" } else { index.kubernetes_name(a.node) };
    // A pod that now reports this IP from any node keeps it (Part A), even if it moved.
    if let Some(p) = fresh
        && !p.finished() && p.ips.contains(&ip) {
            return Verdict::Valid(ValidReason::LivePodReportsIp);
        }
    judge_pod(fresh.map(|p| PodView::from_facts(p, knode)), ip, node_gone)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    since: Millis,
    confirmed: bool,
    /// Identity of the allocation when first seen: a reallocation resets the leak state.
    identity: Identity,
}

/// The GC's memory across passes: leak candidates, empty blocks and orphan handles first seen.
#[derive(Debug, Default)]
pub struct GcState {
    leaks: FastMap<Gid, Tracked>,
    tracked: RoaringBitmap,
    confirmed: RoaringBitmap,
    /// Reasons of the latest verdict for tracked leaks.
    reasons: FastMap<Gid, LeakReason>,
    empty_since: HashMap<IpNet, Millis>,
    orphan_since: HashMap<String, (Millis, String)>,
    release_cursor: Gid,
    /// Allocations whose cached verdict (without KubeVirt facts) is a leak; VM allocations are
    /// left out, they are judged in every pass against that pass's VM facts. Exact for every
    /// allocation the index has not recorded as changed since the last refresh, so a pass
    /// re-judges O(suspects + changed) allocations, not O(allocations).
    suspects: RoaringBitmap,
    /// False until the first refresh, which judges every allocation rather than only the
    /// changed ones: a state created beside an index whose record was already taken (a new
    /// state for an old index) still starts exact.
    verdicts_primed: bool,
    /// The mass-change guard's held sets.
    guard: MassGuard,
}

/// The cached verdict of one allocation: a leak on the index's facts alone, with its node's
/// absence taken either as a deletion or as unproven (so the cache holds no proofs: a pass
/// re-judges its suspects with the proofs it has). Unallocated gids and VM allocations are never
/// suspects.
fn leaks_on_cached_facts(index: &IpamIndex, g: Gid) -> bool {
    let Some(b) = index.block(gid_slot(g)) else { return false };
    let Some(a) = b.alloc(gid_ordinal(g)) else { return false };
    if index.vm_allocations().contains(g) {
        return false;
    }
    let leaks = |proof| matches!(classify_with(index, g, a, &b.cidr, None, proof), Verdict::Leak(_));
    leaks(Proof::Complete) || (!index.node_exists(a.node) && leaks(Proof::NoneProven))
}

/// The blocks of `blocks` that still hold an address once `releases` are done: any used ordinal
/// that is neither released in this pass nor one of Calico's Windows-reserved addresses (a block
/// holding only those is empty to the IPAM library). Cooling-down ordinals count as used.
fn blocks_left_non_empty(index: &IpamIndex, blocks: &[(String, IpNet)], releases: &[BlockRelease]) -> Vec<IpNet> {
    blocks
        .iter()
        .filter_map(|(_, cidr)| {
            let b = index.block(index.block_slot(cidr)?)?;
            let released = releases.iter().find(|r| r.cidr == *cidr).map_or(0, |r| r.items.len()) as u32;
            let reserved = b.allocs.iter().filter(|a| a.kind == AllocKind::WindowsReserved).count() as u32;
            (b.used_ordinals > released + reserved).then_some(*cidr)
        })
        .collect()
}

/// An allocation's identity for leak tracking: its handle and sequence number, and the facts a
/// confirmation rests on (node, kind, namespace, pod). The CNI stamps a new sequence number on
/// every allocation, so a reallocated ordinal never looks like the leak it replaced; a block
/// rewritten with other attributes under the same handle and sequence (a pod leak of a deleted
/// node turned into a live node's tunnel) starts over too, instead of keeping a confirmation
/// its new facts never earned. (A symbol is only reused after its last reference is gone, and a
/// block update interns the new strings before releasing the old ones.)
fn identity(a: &Alloc) -> Identity {
    (a.handle, a.seq, a.node, a.kind, a.namespace, a.pod)
}

type Identity = (crate::ipam::index::HandleId, u64, Sym, AllocKind, Sym, Sym);

/// The confirmation rules of one leak (SPEC §5.2-§5.3): `Ok(true)` confirms it now, `Ok(false)`
/// leaves it a candidate within its grace period, `Err` says what holds it. `node_blocked`: its
/// node is deleted but still has valid (or unreleasable) allocations besides tunnels.
fn confirmation(index: &IpamIndex, a: &Alloc, node: NodeState, node_blocked: bool, cfg: &GcConfig, since: Millis, now: Millis) -> Result<bool, HeldBy> {
    if a.kind == AllocKind::Pod && !index.namespace_covered(a.namespace) {
        return Err(HeldBy::NamespaceNotInDump);
    }
    if a.kind == AllocKind::Tunnel && node == NodeState::Unproven {
        return Err(HeldBy::NodeNotProvenGone);
    }
    if node == NodeState::Gone {
        return if a.kind == AllocKind::Tunnel && node_blocked { Err(HeldBy::NodeHasValidAllocations) } else { Ok(true) };
    }
    if cfg.leak_grace <= 0 {
        return Err(HeldBy::GraceDisabled);
    }
    let grace = if !a.vm { cfg.leak_grace } else { cfg.leak_grace.max(VM_MIN_GRACE) };
    Ok(now - since > grace)
}

/// Whether deleted node `n` still has something that keeps its tunnel address: a non-tunnel
/// allocation that is not a leak, or a pod leak that may not be released (its namespace is
/// outside the dump).
fn node_blocked(index: &IpamIndex, n: Sym, leaks: &RoaringBitmap) -> bool {
    let Some(bm) = index.allocations_of_node(n) else { return false };
    bm.iter().any(|g| {
        index.alloc(g).is_some_and(|a| {
            let leak = leaks.contains(g);
            (!leak && a.kind != AllocKind::Tunnel) || (leak && a.kind == AllocKind::Pod && !index.namespace_covered(a.namespace))
        })
    })
}

impl GcState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn candidate_count(&self) -> u64 {
        self.tracked.len()
    }
    pub fn confirmed_count(&self) -> u64 {
        self.confirmed.len()
    }
    /// Every tracked leak, candidate or confirmed (upstream's `gc_candidates`).
    pub fn tracked(&self) -> &RoaringBitmap {
        &self.tracked
    }
    /// Allocations whose verdict on cached facts was a leak at the last pass (VM allocations
    /// excluded).
    pub fn suspects(&self) -> &RoaringBitmap {
        &self.suspects
    }
    pub fn is_confirmed(&self, g: Gid) -> bool {
        self.confirmed.contains(g)
    }

    /// Forgets tracked allocations that no longer exist or were reallocated. Only allocations the
    /// index recorded as changed since the last pass (`changed`) can be either: a leak is tracked
    /// with its identity of that pass, and a new identity or a gid no longer allocated is a change
    /// of its block entry, which the index records. So this costs O(changed), not O(tracked);
    /// `check_invariants` verifies the premise.
    fn prune(&mut self, index: &IpamIndex, changed: &RoaringBitmap) {
        let mut candidates = changed.clone();
        candidates &= &self.tracked;
        let stale: Vec<Gid> = candidates
            .iter()
            .filter(|g| match (index.alloc(*g), self.leaks.get(g)) {
                (Some(a), Some(t)) => identity(a) != t.identity,
                _ => true,
            })
            .collect();
        for g in stale {
            self.forget(g);
        }
    }

    fn forget(&mut self, g: Gid) {
        self.leaks.remove(&g);
        self.reasons.remove(&g);
        self.tracked.remove(g);
        self.confirmed.remove(g);
    }

    /// Brings the verdict cache up to date with the index: drops suspects that are no longer
    /// allocated and re-judges every allocation the index recorded as changed since the last
    /// refresh (every allocation, the first time). Only `pass` calls it, so "recorded as changed"
    /// also means "changed since the last pass", which `check_invariants` relies on.
    ///
    /// Returns the allocations re-judged. A suspect no longer allocated is among them (the index
    /// records a gid that stops being allocated), so removing them drops it: no pass over every
    /// allocation.
    fn refresh_verdicts(&mut self, index: &mut IpamIndex) -> RoaringBitmap {
        let mut changed = index.take_changed_allocations();
        if !self.verdicts_primed {
            changed |= index.allocated();
            self.verdicts_primed = true;
        }
        // `changed` iterates in order, so the re-judged leaks build a bitmap without searching.
        let leaks = RoaringBitmap::from_sorted_iter(changed.iter().filter(|g| leaks_on_cached_facts(index, *g)))
            .expect("a roaring bitmap iterates in order");
        self.suspects -= &changed;
        self.suspects |= leaks;
        changed
    }

    /// One GC pass: classify the scope, advance leak states, and plan releases (SPEC §5.4 order:
    /// leaks, cold IPs, empty blocks, nodes). `fresh_pods` holds the re-read pods of confirmed
    /// leaks (`None` = NotFound) for the final re-validation; pods missing from it are judged on
    /// cached facts (what leak-scan and simulate do).
    pub fn pass(
        &mut self,
        index: &mut IpamIndex,
        time: impl Into<PassTime>,
        cfg: &GcConfig,
        scope: &Scope,
        kubevirt: Option<&KubeVirtFacts>,
        fresh_pods: &BTreeMap<(String, String), Option<PodFacts>>,
    ) -> Plan {
        let time = time.into();
        // Every duration below is measured on the monotonic reading; only the cooldown compares
        // with wall timestamps written into blocks.
        let now = time.mono;
        let changed = self.refresh_verdicts(index);
        let index: &IpamIndex = index;
        self.prune(index, &changed);
        drop(changed);
        let proven: RoaringBitmap;
        let proof = match &cfg.node_proof {
            NodeProof::AbsenceIsProof => Proof::Complete,
            NodeProof::Proven(names) => {
                proven = names.iter().filter_map(|n| index.strings().lookup(n)).map(|s| s.0).collect();
                Proof::Proven(&proven)
            }
        };
        let full = matches!(scope, Scope::Full);
        let dirty_set: RoaringBitmap;
        let examined: &RoaringBitmap = match scope {
            Scope::Full => index.allocated(),
            Scope::Dirty(nodes) => {
                let mut bm = RoaringBitmap::new();
                for b in nodes.iter().filter_map(|n| index.allocations_of_node(index.strings().lookup(n)?)) {
                    bm |= b;
                }
                dirty_set = bm;
                &dirty_set
            }
        };
        // The refreshed cache holds every allocation's verdict on cached facts, so a pass only
        // re-judges the suspects (for their reasons) and the KubeVirt allocations (whose facts
        // arrive with the pass): O(suspects), not O(allocations); and a dirty pass only those of
        // its nodes, O(dirty), never a copy of the cluster-wide sets.
        let vm = index.vm_allocations();
        let mut to_judge = examined & &self.suspects;
        if !vm.is_empty() {
            to_judge |= examined & vm;
        }
        let verdicts: Vec<(Gid, LeakReason)> = to_judge
            .iter()
            .filter_map(|g| {
                let b = index.block(gid_slot(g))?;
                let a = b.alloc(gid_ordinal(g))?;
                match classify_with(index, g, a, &b.cidr, kubevirt, proof) {
                    Verdict::Leak(r) => Some((g, r)),
                    Verdict::Valid(_) => None,
                }
            })
            .collect();
        let mut leak_bm = RoaringBitmap::new();
        for (g, _) in &verdicts {
            leak_bm.insert(*g);
        }
        // Valid allocations lose any leak state ("resurrected").
        // Tracked leaks that were examined and are no longer garbage: ((tracked ∩ examined) − leaks).
        let revived = &(examined & &self.tracked) - &leak_bm;
        for g in revived.iter() {
            self.forget(g);
        }

        // Nodes that are gone, and which of them still hold something valid or unjudgeable.
        // Nodes absent but unproven are only listed for the shell to prove.
        let mut gone_nodes: BTreeSet<Sym> = BTreeSet::new();
        let mut unproven_nodes: BTreeSet<Sym> = BTreeSet::new();
        let mut blocked: HashSet<Sym> = HashSet::new();
        let node_syms: Vec<Sym> = match scope {
            Scope::Full => {
                // Only nodes that no longer exist matter here; test existence before collecting.
                let mut v: BTreeSet<Sym> = BTreeSet::new();
                let gone = |n: &Sym| !n.is_none() && !index.node_exists(*n);
                v.extend(index.nodes_with_allocations().filter(gone));
                v.extend(index.hosts_with_blocks().filter(gone));
                v.extend(index.affinities().map(|(_, a)| a.node).filter(gone));
                v.into_iter().collect()
            }
            Scope::Dirty(nodes) => {
                let mut v = Vec::with_capacity(nodes.len());
                v.extend(nodes.iter().filter_map(|n| index.strings().lookup(n)));
                v
            }
        };
        // A dirty pass looks at the empty blocks of its own nodes only (a full pass at all).
        let scope_hosts: Option<Vec<Sym>> = (!full).then(|| node_syms.clone());
        for n in node_syms {
            if n.is_none() {
                continue;
            }
            match proof.state(index, n) {
                NodeState::Exists => continue,
                NodeState::Unproven => {
                    unproven_nodes.insert(n);
                    continue;
                }
                NodeState::Gone => {}
            }
            gone_nodes.insert(n);
            if node_blocked(index, n, &leak_bm) {
                blocked.insert(n);
            }
        }

        let mut plan = Plan { full, examined: examined.len(), time, ..Plan::default() };
        plan.leaks.reserve_exact(verdicts.len());
        for (g, reason) in verdicts {
            let a = *index.alloc(g).expect("classified gid is allocated");
            let id = identity(&a);
            let node_state = proof.state(index, a.node);
            let t = self.leaks.entry(g).or_insert(Tracked { since: now, confirmed: false, identity: id });
            self.tracked.insert(g);
            self.reasons.insert(g, reason);
            let (confirm, held) = match confirmation(index, &a, node_state, blocked.contains(&a.node), cfg, t.since, now) {
                Ok(due) => (due, None),
                Err(h) => (false, Some(h)),
            };
            if confirm {
                t.confirmed = true;
                self.confirmed.insert(g);
            } else if t.confirmed {
                t.confirmed = false;
                self.confirmed.remove(g);
            }
            let state = if t.confirmed { LeakState::Confirmed { since: t.since } } else { LeakState::Candidate { since: t.since } };
            plan.leaks.push(LeakRecord { gid: g, reason, state, held_by: held });
        }

        // Nodes whose IPAM this pass would clean, through the guard before anything of theirs is
        // released: a node held back keeps its addresses too.
        let cleanable: Vec<Sym> = gone_nodes.iter().filter(|n| !blocked.contains(n)).copied().collect();
        let node_print = |n: Sym| guard::fingerprint(&[index.resolve(n).as_bytes()]);
        let proposed: BTreeSet<u64> = cleanable.iter().map(|n| node_print(*n)).collect();
        let complete = full && cfg.view_complete;
        let node_total = (index.node_count() + gone_nodes.len()) as u64;
        let nodes_ok = self.guard.review(guard::IPAM_NODES, Proposal { members: &proposed, total: node_total, complete }, &cfg.guard, now, cfg.leak_grace, &cfg.guard_approved);
        let held_nodes: BTreeSet<Sym> = cleanable.iter().filter(|n| !nodes_ok.allows(node_print(**n))).copied().collect();
        self.plan_releases(index, now, cfg, kubevirt, proof, fresh_pods, &held_nodes, &mut plan);
        self.plan_cold_blocks(index, time.wall, cfg, &mut plan);
        self.plan_empty_blocks(index, now, cfg, scope_hosts.as_deref(), &gone_nodes, &unproven_nodes, &mut plan);
        // Symbols order by interning, not by name.
        plan.prove_gone = unproven_nodes.iter().map(|n| index.resolve(*n).to_string()).collect();
        plan.prove_gone.sort();
        for n in &gone_nodes {
            if blocked.contains(n) || held_nodes.contains(n) {
                continue;
            }
            // Every remaining allocation of the node is being released in this pass.
            let name = index.resolve(*n).to_string();
            let mut affinities: Vec<(String, IpNet)> = index
                .affinities()
                .filter(|(_, a)| a.node == *n)
                .map(|(k, a)| (k.to_string(), a.cidr))
                .collect();
            affinities.sort();
            let mut blocks: Vec<(String, IpNet)> = index.host_blocks(*n).iter().filter_map(|s| index.block(*s)).map(|b| (b.name.to_string(), b.cidr)).collect();
            blocks.sort_by_key(|(_, c)| *c);
            let held = blocks_left_non_empty(index, &blocks, &plan.releases).into_iter().map(|c| (c, HeldBy::BlockNotEmpty)).collect();
            plan.nodes_to_release.push(NodeRelease { node: name, affinities, blocks, held });
        }
        if full {
            self.plan_orphan_handles(index, now, cfg, &mut plan);
        }
        plan
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_releases(
        &mut self,
        index: &IpamIndex,
        now: Millis,
        cfg: &GcConfig,
        kubevirt: Option<&KubeVirtFacts>,
        proof: Proof<'_>,
        fresh: &BTreeMap<(String, String), Option<PodFacts>>,
        held_nodes: &BTreeSet<Sym>,
        plan: &mut Plan,
    ) {
        self.recheck_confirmations(index, now, cfg, proof, plan);
        // Final re-validation, then all-or-none per handle.
        let mut releasable = RoaringBitmap::new();
        let mut awaiting = RoaringBitmap::new();
        let mut revalidated_valid = RoaringBitmap::new();
        for g in self.confirmed.iter() {
            let Some(a) = index.alloc(g) else { continue };
            let is_pod = a.kind == AllocKind::Pod && !a.vm;
            let key = || (index.resolve(a.namespace).to_string(), index.resolve(a.pod).to_string());
            let fresh_entry = if is_pod && !fresh.is_empty() { fresh.get(&key()) } else { None };
            let verdict = match fresh_entry {
                Some(f) => revalidate_with(index, g, f.as_ref(), kubevirt, proof),
                None => {
                    let b = index.block(gid_slot(g)).expect("allocated gid has a block");
                    classify_with(index, g, a, &b.cidr, kubevirt, proof)
                }
            };
            // Only a proven-gone node spares the re-read (its pods' leaks are released on cached
            // facts, as upstream's final check uses the cache when the node is gone).
            match verdict {
                Verdict::Leak(_) if is_pod && cfg.revalidate_live && fresh_entry.is_none() && proof.state(index, a.node) != NodeState::Gone => {
                    // Not yet: the shell reads the pod and the next pass decides.
                    awaiting.insert(g);
                    let (ns, pod) = key();
                    plan.revalidate.push((g, ns, pod));
                }
                Verdict::Leak(_) => {
                    releasable.insert(g);
                }
                Verdict::Valid(_) => {
                    revalidated_valid.insert(g);
                }
            }
        }
        if !revalidated_valid.is_empty() {
            for r in plan.leaks.iter_mut().filter(|r| revalidated_valid.contains(r.gid)) {
                r.held_by = Some(HeldBy::Revalidated);
            }
        }
        // Revalidated-valid leaks are forgotten: they start over if they leak again.
        for g in revalidated_valid.iter() {
            self.forget(g);
        }
        let mut allowed = RoaringBitmap::new();
        let mut handle_held = RoaringBitmap::new();
        for g in releasable.iter() {
            let a = index.alloc(g).expect("releasable gid is allocated");
            if index.allocations_of_handle(a.handle).iter().all(|h| releasable.contains(*h)) {
                allowed.insert(g);
            } else {
                handle_held.insert(g);
            }
        }
        for r in plan.leaks.iter_mut() {
            if handle_held.contains(r.gid) && r.held_by.is_none() {
                r.held_by = Some(HeldBy::HandleHasValidIp);
            }
        }
        let guarded = self.guard_addresses(index, now, cfg, plan.full, held_nodes, &awaiting, &mut allowed);
        if !guarded.is_empty() {
            for r in plan.leaks.iter_mut().filter(|r| guarded.contains(r.gid)) {
                r.held_by = r.held_by.or(Some(HeldBy::MassChangeGuard));
            }
        }
        // The cap rolls over: start after the last address planned in the previous pass, and keep
        // whole handles together so all-or-none holds across the cut.
        let order: Vec<Gid> = allowed.iter().filter(|g| *g >= self.release_cursor).chain(allowed.iter().filter(|g| *g < self.release_cursor)).collect();
        let mut chosen: Vec<Gid> = Vec::new();
        let mut chosen_set = RoaringBitmap::new();
        for g in order {
            if chosen_set.contains(g) {
                continue;
            }
            let a = index.alloc(g).expect("allowed gid is allocated");
            let group = index.allocations_of_handle(a.handle);
            if chosen.len() + group.len() > cfg.max_releases_per_pass.max(1) && !chosen.is_empty() {
                break;
            }
            for h in group {
                if chosen_set.insert(*h) {
                    chosen.push(*h);
                }
            }
        }
        plan.deferred = (allowed.len() - chosen_set.len()) as usize;
        if let Some(last) = chosen.last() {
            self.release_cursor = last.wrapping_add(1);
        }
        let mut by_block: BTreeMap<u32, Vec<Gid>> = BTreeMap::new();
        for g in chosen_set.iter() {
            by_block.entry(gid_slot(g)).or_default().push(g);
        }
        for (slot, gs) in by_block {
            let b = index.block(slot).expect("block of an allocated gid");
            let items = gs
                .iter()
                .map(|g| {
                    let a = b.alloc(gid_ordinal(*g)).expect("allocated");
                    ReleaseItem {
                        ordinal: gid_ordinal(*g),
                        ip: ordinal_to_ip(&b.cidr, gid_ordinal(*g)),
                        handle: index.handle_name(a.handle).into_owned(),
                        sequence: a.seq,
                        reason: self.reasons.get(g).copied().unwrap_or(LeakReason::PodNotFound),
                    }
                })
                .collect();
            plan.releases.push(BlockRelease { cidr: b.cidr, block_name: b.name.to_string(), revision: b.revision.to_string(), items });
        }
        plan.releases.sort_by_key(|r| crate::model::names::ip_sort_key(&r.cidr.network()));
    }

    /// Puts the addresses this pass would release (before the per-pass cap, so a cap never hides
    /// a mass change) through the guard, and removes what must wait from `allowed`, whole handles
    /// at a time. Addresses of nodes the guard holds wait with their node. Confirmed leaks
    /// awaiting their pod's re-read count as proposed (the pass after the read releases them):
    /// a set is not forgotten by the pass that only asked for the reads. Returns what waits.
    #[allow(clippy::too_many_arguments)]
    fn guard_addresses(
        &mut self,
        index: &IpamIndex,
        now: Millis,
        cfg: &GcConfig,
        full: bool,
        held_nodes: &BTreeSet<Sym>,
        awaiting: &RoaringBitmap,
        allowed: &mut RoaringBitmap,
    ) -> RoaringBitmap {
        let mut waiting: RoaringBitmap = allowed.iter().filter(|g| index.alloc(*g).is_some_and(|a| held_nodes.contains(&a.node))).collect();
        let print = |g: Gid| -> u64 {
            let a = index.alloc(g).expect("allowed gid is allocated");
            let ip = index.ip_of(g).map(|ip| ip.to_string()).unwrap_or_default();
            guard::fingerprint(&[ip.as_bytes(), index.handle_name(a.handle).as_bytes(), &a.seq.to_le_bytes()])
        };
        let candidates = &(&*allowed | awaiting) - &waiting;
        let prints: Vec<(Gid, u64)> = candidates.iter().map(|g| (g, print(g))).collect();
        let members: BTreeSet<u64> = prints.iter().map(|(_, p)| *p).collect();
        let proposal = Proposal { members: &members, total: index.allocation_count(), complete: full && cfg.view_complete };
        let decision = self.guard.review(guard::IPAM_ADDRESSES, proposal, &cfg.guard, now, cfg.leak_grace, &cfg.guard_approved);
        if let Decision::Only(_) = decision {
            // Leaks awaiting their re-read are listed too, so their records say what holds them.
            waiting.extend(prints.iter().filter(|(_, p)| !decision.allows(*p)).map(|(g, _)| *g));
        }
        // All or none per handle: a handle with one address waiting waits whole.
        let handles: HashSet<crate::ipam::index::HandleId> = waiting.iter().filter_map(|g| index.alloc(g)).map(|a| a.handle).collect();
        for h in handles {
            waiting.extend(index.allocations_of_handle(h).iter().copied().filter(|g| allowed.contains(*g)));
        }
        *allowed -= &waiting;
        waiting
    }

    /// The sets the mass-change guard holds now.
    pub fn guard_held(&self) -> Vec<guard::Held> {
        self.guard.held()
    }

    /// Applies the confirmation rules again to every confirmed leak, examined or not: a dirty
    /// pass examines only its nodes, but the rules may have changed for the others since they
    /// were confirmed (`leakGracePeriod` set to 0 or raised, a deleted node's proof withdrawn, a
    /// valid allocation on a deleted node that holds its tunnel). A leak the rules no longer
    /// confirm goes back to being a candidate, with the hold in its record.
    fn recheck_confirmations(&mut self, index: &IpamIndex, now: Millis, cfg: &GcConfig, proof: Proof<'_>, plan: &mut Plan) {
        let mut blocked: HashMap<Sym, bool> = HashMap::new();
        let mut withdrawn: Vec<(Gid, Option<HeldBy>)> = Vec::new();
        for g in self.confirmed.iter() {
            let (Some(a), Some(t)) = (index.alloc(g), self.leaks.get(&g)) else { continue };
            let state = proof.state(index, a.node);
            let node_blocked = state == NodeState::Gone
                && a.kind == AllocKind::Tunnel
                && *blocked.entry(a.node).or_insert_with(|| node_blocked(index, a.node, &self.tracked));
            match confirmation(index, a, state, node_blocked, cfg, t.since, now) {
                Ok(true) => {}
                Ok(false) => withdrawn.push((g, None)),
                Err(h) => withdrawn.push((g, Some(h))),
            }
        }
        if withdrawn.is_empty() {
            return;
        }
        let held: HashMap<Gid, Option<HeldBy>> = withdrawn.iter().copied().collect();
        for (g, _) in &withdrawn {
            if let Some(t) = self.leaks.get_mut(g) {
                t.confirmed = false;
            }
            self.confirmed.remove(*g);
        }
        for r in plan.leaks.iter_mut() {
            if let Some(h) = held.get(&r.gid) {
                let since = match r.state {
                    LeakState::Candidate { since } | LeakState::Confirmed { since } => since,
                };
                r.state = LeakState::Candidate { since };
                r.held_by = r.held_by.or(*h);
            }
        }
    }

    /// `wall`: the blocks' release timestamps are wall time written by other hosts.
    fn plan_cold_blocks(&self, index: &IpamIndex, wall: Millis, cfg: &GcConfig, plan: &mut Plan) {
        for slot in index.cold_blocks().iter() {
            let b = index.block(slot).expect("cold block exists");
            if b.earliest_release.is_some_and(|t| t + cfg.ip_cooldown <= wall) {
                plan.cold_blocks.push(ColdBlock { cidr: b.cidr, block_name: b.name.to_string(), revision: b.revision.to_string() });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// Empty blocks to release. `scope_hosts` is the dirty pass's nodes (`None` in a full pass):
    /// a dirty pass judges only their blocks, so it costs O(dirty) and not O(empty blocks in the
    /// cluster); another node's empty block waits for a pass of its node or the next full pass
    /// (every grace/2), which is also what starts its grace period.
    #[allow(clippy::too_many_arguments)]
    fn plan_empty_blocks(
        &mut self,
        index: &IpamIndex,
        now: Millis,
        cfg: &GcConfig,
        scope_hosts: Option<&[Sym]>,
        gone: &BTreeSet<Sym>,
        unproven: &BTreeSet<Sym>,
        plan: &mut Plan,
    ) {
        let full = scope_hosts.is_none();
        let mut still_empty: HashSet<IpNet> = HashSet::new();
        // Blocks planned for release per host in this pass: a node keeps at least one block even
        // when several of its blocks are empty at once.
        let mut releasing: HashMap<Sym, usize> = HashMap::new();
        let slots: RoaringBitmap = match scope_hosts {
            None => index.empty_blocks().clone(),
            Some(hosts) => hosts
                .iter()
                .flat_map(|h| index.host_blocks(*h).iter().copied())
                .filter(|s| index.empty_blocks().contains(*s))
                .collect(),
        };
        for slot in slots.iter() {
            let b = index.block(slot).expect("empty block exists");
            let host = b.host();
            if gone.contains(&host) || unproven.contains(&host) || (!full && !index.node_exists(host)) {
                // A deleted node's blocks go with the node release; an unproven node's wait for
                // its proof.
                continue;
            }
            still_empty.insert(b.cidr);
            let mut rec = EmptyBlockRecord {
                cidr: b.cidr,
                block_name: b.name.to_string(),
                node: index.resolve(host).to_string(),
                revision: b.revision.to_string(),
                releasable: false,
                held_by: None,
            };
            if index.host_blocks(host).len() <= 1 + releasing.get(&host).copied().unwrap_or(0) {
                rec.held_by = Some("node-last-block");
                self.empty_since.remove(&b.cidr);
            } else if index.node(host).is_some_and(|n| n.migration_in_progress) {
                rec.held_by = Some("flannel-migration");
                self.empty_since.remove(&b.cidr);
            } else if cfg.leak_grace <= 0 {
                rec.held_by = Some(HeldBy::GraceDisabled.as_str());
            } else {
                let since = *self.empty_since.entry(b.cidr).or_insert(now);
                rec.releasable = now - since > cfg.leak_grace;
                if rec.releasable {
                    *releasing.entry(host).or_default() += 1;
                } else {
                    rec.held_by = Some("within-grace-period");
                }
            }
            plan.empty_blocks.push(rec);
        }
        if full {
            self.empty_since.retain(|c, _| still_empty.contains(c));
        } else {
            // A dirty pass sees only part of the cluster; forget only blocks that are no longer empty.
            self.empty_since.retain(|c, _| index.block_slot(c).is_some_and(|s| index.empty_blocks().contains(s)));
        }
        plan.empty_blocks.sort_by_key(|e| crate::model::names::ip_sort_key(&e.cidr.network()));
    }

    fn plan_orphan_handles(&mut self, index: &IpamIndex, now: Millis, cfg: &GcConfig, plan: &mut Plan) {
        let mut seen = HashSet::new();
        for h in index.unreferenced_handles() {
            let id = index.handle_name(h).into_owned();
            let e = index.handle(h).expect("listed handle exists");
            let entry = self.orphan_since.entry(id.clone()).or_insert((now, e.revision.clone()));
            if entry.1 != e.revision {
                // The handle changed since first seen: the CNI is using it; start over.
                *entry = (now, e.revision.clone());
            }
            let releasable = cfg.leak_grace > 0 && now - entry.0 > cfg.leak_grace;
            plan.orphan_handles.push(OrphanHandle {
                handle_id: id.clone(),
                object_name: crate::model::names::handle_object_name(&id),
                revision: e.revision.clone(),
                uid: e.uid.clone(),
                releasable,
            });
            seen.insert(id);
        }
        self.orphan_since.retain(|k, _| seen.contains(k));
    }

    /// Cross-checks the tracker's maps with each other and with the index, and the verdict cache
    /// with a fresh classification of every allocation the index has not recorded as changed.
    pub fn check_invariants(&self, index: &IpamIndex) -> Result<(), String> {
        self.check_verdict_cache(index)?;
        self.guard.check_invariants()?;
        let keys: RoaringBitmap = self.leaks.keys().copied().collect();
        if keys != self.tracked {
            return Err("tracked bitmap differs from leak map".into());
        }
        let confirmed: RoaringBitmap = self.leaks.iter().filter(|(_, t)| t.confirmed).map(|(g, _)| *g).collect();
        if confirmed != self.confirmed {
            return Err("confirmed bitmap differs from leak map".into());
        }
        if self.reasons.len() != self.leaks.len() || self.reasons.keys().any(|g| !self.leaks.contains_key(g)) {
            return Err("reasons and leaks disagree".into());
        }
        let pending = index.changed_allocations();
        for (g, t) in &self.leaks {
            if index.alloc(*g).is_none_or(|a| identity(a) != t.identity) && !pending.contains(*g) {
                // `prune` looks only at recorded changes: a leak gone or reallocated unrecorded
                // would be kept.
                return Err(format!("tracked allocation {g} is gone or reallocated, and the index has not recorded it as changed"));
            }
            if let Some(a) = index.alloc(*g) {
                if identity(a) != t.identity {
                    // Allowed only until the next prune; a pass always prunes first.
                    continue;
                }
                // A pod may start reporting a confirmed leak's IP between passes: the index records
                // that as a change and the next pass forgets the leak.
                if index.live_gids().contains(*g) && t.confirmed && !index.changed_allocations().contains(*g) {
                    return Err(format!("allocation {g} is confirmed but a live pod reports it"));
                }
            }
        }
        Ok(())
    }

    fn check_verdict_cache(&self, index: &IpamIndex) -> Result<(), String> {
        if !self.verdicts_primed {
            // Never refreshed: every allocation is still to be judged.
            return if self.suspects.is_empty() { Ok(()) } else { Err("suspects cached before the first refresh".into()) };
        }
        let pending = index.changed_allocations();
        let (mut cached_only, mut fresh_only) = (Vec::new(), Vec::new());
        for g in (&self.suspects | index.allocated()).iter().filter(|g| !pending.contains(*g)) {
            match (self.suspects.contains(g), leaks_on_cached_facts(index, g)) {
                (true, false) => cached_only.push(g),
                (false, true) => fresh_only.push(g),
                _ => {}
            }
        }
        if cached_only.is_empty() && fresh_only.is_empty() {
            return Ok(());
        }
        cached_only.truncate(5);
        fresh_only.truncate(5);
        Err(format!("cached suspects differ from a fresh classification of unchanged allocations: cached-only {cached_only:?}, fresh-only {fresh_only:?}"))
    }
}
