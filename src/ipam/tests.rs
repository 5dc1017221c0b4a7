//! Rule tests for the GC core: one test per rule of SPEC §5.5-§5.10 and Part A, named as the rule.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use serde_json::json;

use super::gc::{GcConfig, GcState, KubeVirtFacts, NodeProof};
use super::plan::{HeldBy, LeakReason, LeakState, Plan, Scope};
use super::index::{IpamIndex, PodCoverage};
use crate::model::{IpamBlock, IpamHandle, NodeLite, PodFacts, PodPhase};

const MIN: i64 = 60_000;
const T0: i64 = 1_800_000_000_000;

/// A tiny cluster builder: blocks are /29 (8 addresses) under 10.0.<n>.0.
pub struct World {
    pub index: IpamIndex,
    pub gc: GcState,
    pub cfg: GcConfig,
    pub kubevirt: Option<KubeVirtFacts>,
}

pub struct AllocSpec<'a> {
    pub ord: u32,
    pub handle: &'a str,
    pub attrs: serde_json::Value,
    pub seq: u64,
}

pub fn pod_alloc<'a>(ord: u32, handle: &'a str, ns: &str, pod: &str, node: &str) -> AllocSpec<'a> {
    AllocSpec { ord, handle, attrs: json!({"namespace": ns, "pod": pod, "node": node}), seq: 100 + u64::from(ord) }
}

pub fn block(cidr: &str, host: Option<&str>, allocs: &[AllocSpec<'_>]) -> IpamBlock {
    let net: ipnet::IpNet = cidr.parse().unwrap();
    let size = crate::model::names::block_size(&net).unwrap() as usize;
    let mut allocations = vec![serde_json::Value::Null; size];
    let mut attributes = vec![];
    let mut seqs = serde_json::Map::new();
    for (i, a) in allocs.iter().enumerate() {
        allocations[a.ord as usize] = json!(i);
        attributes.push(json!({"handle_id": a.handle, "secondary": a.attrs}));
        seqs.insert(a.ord.to_string(), json!(a.seq));
    }
    let unallocated: Vec<usize> = (0..size).filter(|o| allocations[*o].is_null()).collect();
    serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
        "metadata": {"name": crate::model::names::cidr_to_name(&net), "resourceVersion": "1"},
        "spec": {"cidr": cidr, "affinity": host.map(|h| format!("host:{h}")), "strictAffinity": false,
                 "allocations": allocations, "unallocated": unallocated, "attributes": attributes,
                 "sequenceNumber": 1000, "sequenceNumberForAllocation": seqs}
    }))
    .unwrap()
}

pub fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> PodFacts {
    PodFacts {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        node: node.into(),
        phase: PodPhase::Running,
        status_reports_ip: !ips.is_empty(),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        ..PodFacts::default()
    }
}

pub fn node(name: &str) -> NodeLite {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

impl World {
    pub fn new(grace_min: i64) -> Self {
        World {
            index: IpamIndex::new(),
            gc: GcState::new(),
            cfg: GcConfig { leak_grace: grace_min * MIN, ..GcConfig::default() },
            kubevirt: None,
        }
    }
    pub fn full(&mut self, now: i64) -> Plan {
        self.pass(now, Scope::Full, &BTreeMap::new())
    }
    pub fn pass(&mut self, now: i64, scope: Scope, fresh: &BTreeMap<(String, String), Option<PodFacts>>) -> Plan {
        let plan = self.gc.pass(&mut self.index, now, &self.cfg, &scope, self.kubevirt.as_ref(), fresh);
        self.index.check_invariants().unwrap();
        self.gc.check_invariants(&self.index).unwrap();
        plan
    }
}

fn released_ips(plan: &Plan) -> Vec<String> {
    plan.releases.iter().flat_map(|b| b.items.iter().map(|i| i.ip.to_string())).collect()
}

fn leak_of<'p>(plan: &'p Plan, w: &World, ip: &str) -> Option<&'p super::plan::LeakRecord> {
    let g = w.index.gid_of_ip(ip.parse::<IpAddr>().unwrap())?;
    plan.leaks.iter().find(|l| l.gid == g)
}

#[test]
fn the_invariant_check_catches_a_handle_list_that_is_not_its_handles_allocations() {
    fn g(w: &World, ip: &str) -> u32 {
        w.index.gid_of_ip(ip.parse::<IpAddr>().unwrap()).unwrap()
    }
    fn h(w: &World, id: &str) -> crate::ipam::index::HandleId {
        w.index.handle_id(id).unwrap()
    }
    // Each corruption of a consistent index must be reported.
    type Corruption = (&'static str, fn(&mut World));
    let corruptions: [Corruption; 4] = [
        ("a gid listed twice", |w| {
            let (h1, g1) = (h(w, "h1"), g(w, "10.0.0.1"));
            w.index.handle_gids_mut(h1).push(g1);
        }),
        ("a gid listed under another handle as well", |w| {
            let (h2, g1) = (h(w, "h2"), g(w, "10.0.0.1"));
            w.index.handle_gids_mut(h2).push(g1);
        }),
        ("a gid missing from its handle", |w| {
            let (h1, g1) = (h(w, "h1"), g(w, "10.0.0.1"));
            w.index.handle_gids_mut(h1).remove(g1);
        }),
        ("a gid moved to another handle", |w| {
            let (h1, h2, g1) = (h(w, "h1"), h(w, "h2"), g(w, "10.0.0.1"));
            w.index.handle_gids_mut(h1).remove(g1);
            w.index.handle_gids_mut(h2).push(g1);
        }),
    ];
    for (what, corrupt) in corruptions {
        let mut w = basic(5);
        corrupt(&mut w);
        let err = w.index.check_invariants().expect_err(what);
        assert!(err.contains("by_handle differs from blocks"), "{what}: {err}");
    }
}

/// One node `n1`, one block 10.0.0.0/29 with pod p1 on .1 and a leaked allocation for gone pod p2 on .2.
fn basic(grace_min: i64) -> World {
    let mut w = World::new(grace_min);
    w.index.apply_node(&node("n1"));
    w.index.apply_pod(&pod("ns", "p1", "n1", &["10.0.0.1"]));
    w.index
        .apply_block(&block("10.0.0.0/29", Some("n1"), &[pod_alloc(1, "h1", "ns", "p1", "n1"), pod_alloc(2, "h2", "ns", "p2", "n1")]))
        .unwrap();
    w.index.check_invariants().unwrap();
    w
}

#[test]
fn a_deleted_pods_ip_is_a_candidate_first_and_released_after_the_grace_period() {
    let mut w = basic(15);
    let p = w.full(T0);
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().state, LeakState::Candidate { since: T0 });
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().reason, LeakReason::PodNotFound);
    assert!(p.releases.is_empty());
    assert!(w.full(T0 + 15 * MIN).releases.is_empty(), "exactly the grace period is not past it");
    let p = w.full(T0 + 15 * MIN + 1);
    assert_eq!(released_ips(&p), vec!["10.0.0.2"]);
    assert_eq!(p.releases[0].items[0].sequence, 102);
    assert!(p.revalidate.is_empty(), "judged on the snapshot when live re-validation is off");
}

#[test]
fn live_pod_ip_is_never_released() {
    let mut w = basic(1);
    for t in 0..5 {
        let p = w.full(T0 + t * 10 * MIN);
        assert!(!released_ips(&p).contains(&"10.0.0.1".to_string()));
        assert!(leak_of(&p, &w, "10.0.0.1").is_none());
    }
}

#[test]
fn a_live_pod_reporting_the_ip_keeps_it_whatever_the_node_attribute_says() {
    let mut w = World::new(1);
    w.index.apply_node(&node("n1"));
    w.index.apply_node(&node("n2"));
    // The pod runs on n2 and reports .3, but the allocation claims pod "old" on n1.
    w.index.apply_pod(&pod("ns", "p", "n2", &["10.0.0.3"]));
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[pod_alloc(3, "h", "ns", "old", "n1")])).unwrap();
    w.full(T0);
    let p = w.full(T0 + 10 * MIN);
    assert!(p.releases.is_empty());
    assert!(p.leaks.is_empty());
    // Even once the node named in the attribute is deleted.
    w.index.delete_node("n1");
    assert!(w.full(T0 + 20 * MIN).releases.is_empty());
}

#[test]
fn grace_period_zero_never_confirms_leaks_on_live_nodes() {
    let mut w = basic(0);
    for t in 0..4 {
        let p = w.full(T0 + t * 60 * MIN);
        assert!(p.releases.is_empty());
        assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().held_by, Some(HeldBy::GraceDisabled));
    }
}

#[test]
fn a_deleted_nodes_leaks_are_confirmed_at_once_with_its_tunnel_address_and_affinities() {
    let mut w = World::new(15);
    w.index.apply_node(&node("n2"));
    let tunnel = super::tests::AllocSpec { ord: 0, handle: "ipip-tunnel-addr-n1", attrs: json!({"node": "n1", "type": "ipipTunnelAddress"}), seq: 1 };
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[tunnel, pod_alloc(1, "h1", "ns", "p1", "n1")])).unwrap();
    w.index.apply_affinity(&serde_json::from_value(json!({"metadata": {"name": "n1-10-0-0-0-29"}, "spec": {"state": "confirmed", "node": "n1", "cidr": "10.0.0.0/29", "deleted": "false"}})).unwrap()).unwrap();
    let p = w.full(T0);
    let mut ips = released_ips(&p);
    ips.sort();
    assert_eq!(ips, vec!["10.0.0.0", "10.0.0.1"]);
    assert_eq!(leak_of(&p, &w, "10.0.0.1").unwrap().reason, LeakReason::NodeDeleted);
    assert_eq!(leak_of(&p, &w, "10.0.0.0").unwrap().reason, LeakReason::TunnelNodeDeleted);
    assert_eq!(p.nodes_to_release.len(), 1);
    assert_eq!(p.nodes_to_release[0].node, "n1");
    assert_eq!(p.nodes_to_release[0].affinities, vec![("n1-10-0-0-0-29".to_string(), "10.0.0.0/29".parse().unwrap())]);
}

#[test]
fn a_pod_still_running_on_a_deleted_node_keeps_its_ip_and_the_nodes_tunnel_and_affinities() {
    let mut w = World::new(60);
    w.index.apply_pod(&pod("ns", "p1", "n1", &["10.0.0.1"]));
    let tunnel = AllocSpec { ord: 0, handle: "ipip-tunnel-addr-n1", attrs: json!({"node": "n1", "type": "ipipTunnelAddress"}), seq: 1 };
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[tunnel, pod_alloc(1, "h1", "ns", "p1", "n1")])).unwrap();
    let p = w.full(T0);
    assert!(p.releases.is_empty());
    assert_eq!(leak_of(&p, &w, "10.0.0.0").unwrap().held_by, Some(HeldBy::NodeHasValidAllocations));
    assert!(p.nodes_to_release.is_empty());
    // The pod GC deletes the pod: everything goes in one pass.
    w.index.delete_pod("ns", "p1");
    let (dirty, _) = w.index.take_dirty();
    let p = w.pass(T0 + MIN, Scope::Dirty(dirty), &BTreeMap::new());
    assert_eq!(released_ips(&p).len(), 2);
    assert_eq!(p.nodes_to_release.len(), 1);
}

#[test]
fn unknown_owners_are_never_released_and_block_node_cleanup() {
    let mut w = World::new(1);
    let lb = AllocSpec { ord: 4, handle: "mystery", attrs: json!({"node": "n1"}), seq: 1 };
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[lb])).unwrap();
    let p = w.full(T0);
    assert!(p.leaks.is_empty() && p.releases.is_empty());
    assert!(p.nodes_to_release.is_empty(), "deleted node n1 still holds an unjudgeable allocation");
}

#[test]
fn tunnel_addresses_on_live_nodes_are_valid() {
    let mut w = World::new(1);
    w.index.apply_node(&node("n1"));
    let types = ["ipipTunnelAddress", "vxlanTunnelAddress", "vxlanV6TunnelAddress", "wireguardTunnelAddress", "wireguardV6TunnelAddress"];
    let allocs: Vec<AllocSpec> = types.iter().enumerate().map(|(i, t)| AllocSpec { ord: i as u32, handle: "tunnel", attrs: json!({"node": "n1", "type": t}), seq: 1 }).collect();
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &allocs)).unwrap();
    w.full(T0);
    assert!(w.full(T0 + 60 * MIN).leaks.is_empty());
}

#[test]
fn windows_reserved_addresses_are_skipped() {
    let mut w = World::new(1);
    let win: Vec<AllocSpec> = [0, 1, 2, 7].iter().map(|o| AllocSpec { ord: *o, handle: "windows-reserved-ipam-handle", attrs: json!({"note": "reserved"}), seq: 1 }).collect();
    w.index.apply_block(&block("10.0.0.0/29", Some("gone"), &win)).unwrap();
    let p = w.full(T0);
    assert!(p.leaks.is_empty() && p.releases.is_empty());
}

#[test]
fn a_pod_that_has_not_reported_its_ip_yet_keeps_the_allocation() {
    let mut w = basic(1);
    w.index.apply_pod(&pod("ns", "p2", "n1", &[]));
    w.full(T0);
    assert!(w.full(T0 + 10 * MIN).leaks.is_empty());
}

#[test]
fn finished_and_evicted_pods_lose_their_ips() {
    let mut w = basic(1);
    let mut done = pod("ns", "p2", "n1", &[]);
    done.phase = PodPhase::Succeeded;
    done.status_reports_ip = true;
    w.index.apply_pod(&done);
    let p = w.full(T0);
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().reason, LeakReason::PodFinished);
    let mut evicted = done.clone();
    evicted.phase = PodPhase::Failed;
    evicted.evicted = true;
    w.index.apply_pod(&evicted);
    let p = w.full(T0 + MIN);
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().reason, LeakReason::PodEvicted);
    assert_eq!(released_ips(&w.full(T0 + 2 * MIN)), vec!["10.0.0.2"]);
}

#[test]
fn a_pod_recreated_on_another_node_does_not_keep_the_old_allocation() {
    let mut w = basic(1);
    w.index.apply_node(&node("n2"));
    w.index.apply_pod(&pod("ns", "p2", "n2", &["10.0.1.9"]));
    let p = w.full(T0);
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().reason, LeakReason::PodRescheduled);
}

#[test]
fn an_ip_the_pod_does_not_report_is_a_leak() {
    let mut w = basic(1);
    w.index.apply_pod(&pod("ns", "p2", "n1", &["10.0.0.6"]));
    let p = w.full(T0);
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().reason, LeakReason::IpNotInPod);
}

#[test]
fn a_handle_is_released_all_or_none() {
    let mut w = World::new(1);
    w.index.apply_node(&node("n1"));
    // Dual-stack handle: the v4 address is still the pod's, the v6 one is not.
    w.index.apply_pod(&pod("ns", "p", "n1", &["10.0.0.1"]));
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[pod_alloc(1, "h", "ns", "p", "n1")])).unwrap();
    w.index.apply_block(&block("fd00::/125", Some("n1"), &[pod_alloc(1, "h", "ns", "p", "n1")])).unwrap();
    w.full(T0);
    let p = w.full(T0 + 2 * MIN);
    assert!(p.releases.is_empty());
    assert_eq!(leak_of(&p, &w, "fd00::1").unwrap().held_by, Some(HeldBy::HandleHasValidIp));
    // Once the pod is gone both go together.
    w.index.delete_pod("ns", "p");
    w.full(T0 + 3 * MIN);
    let mut ips = released_ips(&w.full(T0 + 5 * MIN));
    ips.sort();
    assert_eq!(ips, vec!["10.0.0.1", "fd00::1"]);
}

#[test]
fn the_per_pass_cap_rolls_the_rest_over_to_the_next_pass() {
    let mut w = World::new(1);
    let allocs: Vec<AllocSpec> = (0..8).map(|o| pod_alloc(o, Box::leak(format!("h{o}").into_boxed_str()), "ns", Box::leak(format!("p{o}").into_boxed_str()), "gone")).collect();
    w.index.apply_block(&block("10.0.0.0/29", None, &allocs)).unwrap();
    w.cfg.max_releases_per_pass = 3;
    let p1 = w.full(T0);
    assert_eq!(p1.release_count(), 3);
    assert_eq!(p1.deferred, 5);
    let p2 = w.full(T0 + 1);
    assert_eq!(p2.release_count(), 3);
    let first: Vec<_> = released_ips(&p1);
    assert!(released_ips(&p2).iter().all(|ip| !first.contains(ip)), "the next pass continues after the cut");
}

#[test]
fn a_reallocated_address_starts_over_as_valid() {
    let mut w = basic(15);
    w.full(T0);
    // The CNI reallocated .2 to a new pod (new handle and sequence number) that is running.
    w.index.apply_pod(&pod("ns", "p3", "n1", &["10.0.0.2"]));
    let mut a = pod_alloc(2, "h3", "ns", "p3", "n1");
    a.seq = 999;
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[pod_alloc(1, "h1", "ns", "p1", "n1"), a])).unwrap();
    let p = w.full(T0 + 20 * MIN);
    assert!(p.leaks.is_empty() && p.releases.is_empty());
    // And if that new pod goes, its own grace period starts from its own first sighting.
    w.index.delete_pod("ns", "p3");
    let p = w.full(T0 + 21 * MIN);
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().state, LeakState::Candidate { since: T0 + 21 * MIN });
}

#[test]
fn final_revalidation_with_a_fresh_read_saves_an_ip_the_cache_thought_leaked() {
    let mut w = basic(1);
    w.full(T0);
    let mut fresh = BTreeMap::new();
    fresh.insert(("ns".to_string(), "p2".to_string()), Some(pod("ns", "p2", "n1", &["10.0.0.2"])));
    let p = w.pass(T0 + 2 * MIN, Scope::Full, &fresh);
    assert!(p.releases.is_empty());
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().held_by, Some(HeldBy::Revalidated));
    // A fresh NotFound confirms it.
    fresh.insert(("ns".to_string(), "p2".to_string()), None);
    w.pass(T0 + 3 * MIN, Scope::Full, &fresh);
    assert_eq!(released_ips(&w.pass(T0 + 5 * MIN, Scope::Full, &fresh)), vec!["10.0.0.2"]);
}

#[test]
fn empty_blocks_are_released_after_two_observations_spanning_the_grace_period_but_never_a_nodes_last_block() {
    let mut w = World::new(5);
    w.index.apply_node(&node("n1"));
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[])).unwrap();
    let p = w.full(T0);
    assert_eq!(p.empty_blocks[0].held_by, Some("node-last-block"));
    w.index.apply_block(&block("10.0.0.8/29", Some("n1"), &[])).unwrap();
    let p = w.full(T0 + MIN);
    assert!(p.empty_blocks.iter().all(|e| !e.releasable));
    let p = w.full(T0 + 6 * MIN + 1);
    assert_eq!(p.empty_blocks.iter().filter(|e| e.releasable).count(), 1, "one goes, the node keeps the other: {:?}", p.empty_blocks);
    // With grace 0, never.
    let mut w0 = World::new(0);
    w0.index.apply_node(&node("n1"));
    w0.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[])).unwrap();
    w0.index.apply_block(&block("10.0.0.8/29", Some("n1"), &[])).unwrap();
    w0.full(T0);
    assert!(w0.full(T0 + 600 * MIN).empty_blocks.iter().all(|e| !e.releasable));
}

#[test]
fn a_block_that_fills_up_again_restarts_its_empty_clock() {
    let mut w = World::new(5);
    w.index.apply_node(&node("n1"));
    w.index.apply_pod(&pod("ns", "p", "n1", &["10.0.0.9"]));
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[])).unwrap();
    w.index.apply_block(&block("10.0.0.8/29", Some("n1"), &[])).unwrap();
    w.full(T0);
    w.index.apply_block(&block("10.0.0.8/29", Some("n1"), &[pod_alloc(1, "h", "ns", "p", "n1")])).unwrap();
    w.full(T0 + 3 * MIN);
    w.index.apply_block(&block("10.0.0.8/29", Some("n1"), &[])).unwrap();
    let p = w.full(T0 + 6 * MIN);
    let rec = p.empty_blocks.iter().find(|e| e.cidr.to_string() == "10.0.0.8/29").unwrap();
    assert!(!rec.releasable, "first seen empty again at +6m");
}

#[test]
fn cooling_down_addresses_are_not_leaks_and_the_backstop_collects_them_when_due() {
    let mut w = World::new(1);
    w.cfg.ip_cooldown = 60_000;
    let mut b = block("10.0.0.0/29", Some("n1"), &[]);
    b.spec.attributes.push(serde_json::from_value(json!({"releasedAt": crate::model::time::format_rfc3339(T0)})).unwrap());
    b.spec.allocations[3] = Some(0);
    b.spec.unallocated.retain(|o| *o != 3);
    w.index.apply_node(&node("n1"));
    w.index.apply_block(&b).unwrap();
    let p = w.full(T0 + 1000);
    assert!(p.leaks.is_empty());
    assert!(p.cold_blocks.is_empty());
    assert!(p.empty_blocks.is_empty(), "a cooling block is not empty");
    assert_eq!(w.full(T0 + 60_000).cold_blocks.len(), 1);
}

#[test]
fn orphan_handles_are_deleted_only_after_a_full_grace_period_unchanged() {
    let mut w = World::new(5);
    let h = |rv: &str| -> IpamHandle {
        serde_json::from_value(json!({"metadata": {"name": "k8s-pod-network.x", "resourceVersion": rv, "uid": "u"}, "spec": {"handleID": "k8s-pod-network.x", "block": {}}})).unwrap()
    };
    w.index.apply_handle(&h("1")).unwrap();
    assert!(!w.full(T0).orphan_handles[0].releasable);
    w.index.apply_handle(&h("2")).unwrap();
    assert!(!w.full(T0 + 6 * MIN).orphan_handles[0].releasable, "changed: the CNI is using it");
    assert!(w.full(T0 + 12 * MIN).orphan_handles[0].releasable);
    // Referenced by a block: not an orphan.
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[pod_alloc(1, "k8s-pod-network.x", "ns", "p", "n1")])).unwrap();
    assert!(w.full(T0 + 13 * MIN).orphan_handles.is_empty());
    let mut w0 = World::new(0);
    w0.index.apply_handle(&h("1")).unwrap();
    w0.full(T0);
    assert!(!w0.full(T0 + 600 * MIN).orphan_handles[0].releasable, "never with grace 0");
}

#[test]
fn kubevirt_allocations_stay_valid_without_facts_and_get_a_five_minute_floor_when_the_vm_is_gone() {
    let mut w = World::new(1);
    w.index.apply_node(&node("n1"));
    let vm = AllocSpec { ord: 1, handle: "net.ns-vm1", attrs: json!({"namespace": "ns", "pod": "virt-launcher-vm1-abc", "node": "n1", "vmi-name": "vm1"}), seq: 1 };
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[vm])).unwrap();
    w.full(T0);
    assert!(w.full(T0 + 30 * MIN).leaks.is_empty(), "no KubeVirt facts: valid");
    let mut kv = KubeVirtFacts::default();
    kv.vms.insert(("ns".into(), "vm1".into()));
    w.kubevirt = Some(kv);
    assert!(w.full(T0 + 31 * MIN).leaks.is_empty(), "the VM exists");
    w.kubevirt = Some(KubeVirtFacts::default());
    let p = w.full(T0 + 32 * MIN);
    assert_eq!(leak_of(&p, &w, "10.0.0.1").unwrap().reason, LeakReason::VmDeleted);
    assert!(w.full(T0 + 36 * MIN).releases.is_empty(), "within the 5 minute floor");
    assert_eq!(released_ips(&w.full(T0 + 37 * MIN + 1)).len(), 1);
}

/// A leak confirmed and waiting for its re-read when `leakGracePeriod` changes; the next pass is
/// a dirty one elsewhere and the re-read answers NotFound.
fn confirmed_leak_then_new_grace(new_grace: i64) -> Plan {
    let mut w = basic(15);
    w.cfg.revalidate_live = true;
    w.index.apply_node(&node("n2"));
    w.index.apply_block(&block("10.0.1.0/29", Some("n2"), &[pod_alloc(1, "hx", "ns", "px", "n2")])).unwrap();
    w.full(T0);
    let p = w.full(T0 + 15 * MIN + 1);
    assert!(p.releases.is_empty() && p.revalidate.len() == 2, "confirmed, waiting for the re-reads");
    w.cfg.leak_grace = new_grace;
    w.index.take_dirty();
    w.index.apply_pod(&pod("ns", "px", "n2", &["10.0.1.1"]));
    let (dirty, _) = w.index.take_dirty();
    let fresh: BTreeMap<_, _> = [(("ns".to_string(), "p2".to_string()), None)].into_iter().collect();
    w.pass(T0 + 15 * MIN + 2, Scope::Dirty(dirty), &fresh)
}

#[test]
fn a_grace_period_turned_off_holds_confirmed_leaks_a_dirty_pass_does_not_examine() {
    let p = confirmed_leak_then_new_grace(0);
    assert!(p.releases.is_empty(), "released after leakGracePeriod became 0: {:?}", released_ips(&p));
}

#[test]
fn a_longer_grace_period_turns_confirmed_leaks_back_into_candidates() {
    let p = confirmed_leak_then_new_grace(60 * MIN);
    assert!(p.releases.is_empty(), "released before the new grace period: {:?}", released_ips(&p));
}

#[test]
fn a_dirty_pass_examines_only_the_dirty_nodes() {
    let mut w = basic(1);
    w.index.apply_node(&node("n2"));
    w.index.apply_block(&block("10.0.1.0/29", Some("n2"), &[pod_alloc(1, "hx", "ns", "px", "n2")])).unwrap();
    w.index.take_dirty();
    w.index.delete_pod("ns", "p1");
    let (dirty, full) = w.index.take_dirty();
    assert!(!full);
    assert_eq!(dirty.iter().map(|s| s.to_string()).collect::<Vec<_>>(), vec!["n1"]);
    let p = w.pass(T0, Scope::Dirty(dirty), &BTreeMap::new());
    assert_eq!(p.examined, 2);
    assert!(leak_of(&p, &w, "10.0.1.1").is_none(), "n2 was not examined");
    assert!(leak_of(&p, &w, "10.0.0.1").is_some());
}

#[test]
fn allocations_in_namespaces_a_dump_does_not_cover_are_never_releasable() {
    let mut w = basic(1);
    w.index.coverage = PodCoverage::Namespaces(["other".to_string()].into());
    w.full(T0);
    let p = w.full(T0 + 10 * MIN);
    assert!(p.releases.is_empty());
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().held_by, Some(HeldBy::NamespaceNotInDump));
}

#[test]
fn a_terminating_pod_keeps_its_ip() {
    let mut w = basic(1);
    let mut t = pod("ns", "p1", "n1", &["10.0.0.1"]);
    t.deleting = true;
    w.index.apply_pod(&t);
    w.full(T0);
    assert!(leak_of(&w.full(T0 + 10 * MIN), &w, "10.0.0.1").is_none());
}

// ---- the index records, the GC judges --------------------------------------------------------

fn gid_of(w: &World, ip: &str) -> u32 {
    w.index.gid_of_ip(ip.parse::<IpAddr>().unwrap()).unwrap()
}

#[test]
fn the_index_records_changed_allocations_and_the_gc_takes_them() {
    let mut w = basic(15);
    let (g1, g2) = (gid_of(&w, "10.0.0.1"), gid_of(&w, "10.0.0.2"));
    assert!(w.index.changed_allocations().contains(g1) && w.index.changed_allocations().contains(g2), "applied allocations are recorded");
    w.full(T0);
    assert!(w.index.changed_allocations().is_empty(), "the pass took the record");
    assert!(w.gc.suspects().contains(g2) && !w.gc.suspects().contains(g1));
    w.index.delete_pod("ns", "p1");
    assert!(w.index.changed_allocations().contains(g1), "the pod's allocation is recorded as changed");
    assert!(!w.gc.suspects().contains(g1), "the index judges nothing: the GC has not seen it yet");
    w.gc.check_invariants(&w.index).unwrap();
    let p = w.full(T0 + MIN);
    assert!(w.index.changed_allocations().is_empty());
    assert!(w.gc.suspects().contains(g1), "the pass re-judged it");
    assert_eq!(leak_of(&p, &w, "10.0.0.1").unwrap().reason, LeakReason::PodNotFound);
}

#[test]
fn a_deleted_block_leaves_no_suspect_behind() {
    let mut w = basic(15);
    w.full(T0);
    let g2 = gid_of(&w, "10.0.0.2");
    w.index.delete_block(&"10.0.0.0/29".parse().unwrap());
    assert!(w.index.changed_allocations().contains(g2), "the old entry's allocations are recorded");
    w.gc.check_invariants(&w.index).unwrap();
    let p = w.full(T0 + MIN);
    assert!(p.leaks.is_empty() && w.gc.suspects().is_empty());
}

#[test]
fn a_reset_records_the_old_allocations_so_no_cached_verdict_goes_stale() {
    let mut w = basic(15);
    w.full(T0);
    let g2 = gid_of(&w, "10.0.0.2");
    // A relist in which the block is gone and another takes its slot.
    let other = block("10.0.5.0/29", Some("n1"), &[pod_alloc(1, "h9", "ns", "p1", "n1")]);
    let nodes = [node("n1")];
    let pods = [pod("ns", "p1", "n1", &["10.0.5.1"])];
    let snap: super::index::Snapshot = super::index::Snapshot { blocks: std::slice::from_ref(&other), nodes: &nodes, pods: &pods, ..Default::default() };
    w.index.reset(snap);
    assert!(w.index.changed_allocations().contains(g2), "the old allocations are recorded as changed");
    w.gc.check_invariants(&w.index).unwrap();
    let p = w.full(T0 + MIN);
    assert!(p.leaks.is_empty() && w.gc.suspects().is_empty());
}

#[test]
fn a_new_gc_state_beside_an_index_whose_record_was_taken_still_finds_every_leak() {
    let mut w = basic(15);
    w.full(T0);
    let mut gc = GcState::new();
    gc.check_invariants(&w.index).unwrap();
    let p = gc.pass(&mut w.index, T0 + MIN, &w.cfg, &Scope::Full, None, &BTreeMap::new());
    assert_eq!(leak_of(&p, &w, "10.0.0.2").unwrap().state, LeakState::Candidate { since: T0 + MIN });
    gc.check_invariants(&w.index).unwrap();
}

#[test]
fn the_gc_invariant_catches_a_change_the_gc_never_saw() {
    let mut w = basic(15);
    w.full(T0);
    w.index.delete_pod("ns", "p1");
    // Someone else takes the record: the cache is now wrong for .1 and nothing says it is pending.
    let taken = w.index.take_changed_allocations();
    assert!(taken.contains(gid_of(&w, "10.0.0.1")));
    let err = w.gc.check_invariants(&w.index).unwrap_err();
    assert!(err.contains("fresh-only"), "{err}");
}

// ---- properties ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Block { b: u8, allocs: Vec<(u8, u8, u8, u8)> },
    DeleteBlock(u8),
    Pod { p: u8, node: u8, ip: Option<(u8, u8)>, phase: u8 },
    DeletePod(u8),
    Node(u8),
    DeleteNode(u8),
    Pass { minutes: u8, dirty: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, proptest::collection::vec((0u8..8, 0u8..6, 0u8..4, 0u8..3), 0..6)).prop_map(|(b, allocs)| Op::Block { b, allocs }),
        (0u8..4).prop_map(Op::DeleteBlock),
        (0u8..6, 0u8..4, proptest::option::of((0u8..4, 0u8..8)), 0u8..4).prop_map(|(p, node, ip, phase)| Op::Pod { p, node, ip, phase }),
        (0u8..6).prop_map(Op::DeletePod),
        (0u8..4).prop_map(Op::Node),
        (0u8..4).prop_map(Op::DeleteNode),
        (0u8..20, any::<bool>()).prop_map(|(minutes, dirty)| Op::Pass { minutes, dirty }),
    ]
}

fn apply_op(w: &mut World, op: &Op, now: &mut i64) -> Option<Plan> {
    match op {
        Op::Block { b, allocs } => {
            let mut seen = std::collections::BTreeSet::new();
            let specs: Vec<AllocSpec> = allocs
                .iter()
                .filter(|(o, ..)| seen.insert(*o))
                .map(|(o, p, n, kind)| {
                    let handle: &str = Box::leak(format!("h{p}").into_boxed_str());
                    let attrs = match kind {
                        0 | 1 => json!({"namespace": "ns", "pod": format!("p{p}"), "node": format!("n{n}")}),
                        _ => json!({"node": format!("n{n}"), "type": "vxlanTunnelAddress"}),
                    };
                    AllocSpec { ord: u32::from(*o), handle, attrs, seq: u64::from(*p) * 10 + u64::from(*o) }
                })
                .collect();
            w.index.apply_block(&block(&format!("10.0.{b}.0/29"), Some(&format!("n{}", b % 4)), &specs)).unwrap();
        }
        Op::DeleteBlock(b) => w.index.delete_block(&format!("10.0.{b}.0/29").parse().unwrap()),
        Op::Pod { p, node: n, ip, phase } => {
            let ips: Vec<String> = ip.iter().map(|(b, o)| format!("10.0.{b}.{o}")).collect();
            let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
            let mut f = pod("ns", &format!("p{p}"), &format!("n{n}"), &refs);
            f.phase = [PodPhase::Running, PodPhase::Pending, PodPhase::Succeeded, PodPhase::Failed][*phase as usize];
            if f.finished() {
                f.ips.clear();
            }
            w.index.apply_pod(&f);
        }
        Op::DeletePod(p) => w.index.delete_pod("ns", &format!("p{p}")),
        Op::Node(n) => w.index.apply_node(&node(&format!("n{n}"))),
        Op::DeleteNode(n) => w.index.delete_node(&format!("n{n}")),
        Op::Pass { minutes, dirty } => {
            *now += i64::from(*minutes) * MIN;
            let (d, full) = w.index.take_dirty();
            let scope = if *dirty && !full { Scope::Dirty(d) } else { Scope::Full };
            return Some(w.pass(*now, scope, &BTreeMap::new()));
        }
    }
    w.index.check_invariants().map_err(|e| format!("{op:?}: {e}")).unwrap();
    w.gc.check_invariants(&w.index).map_err(|e| format!("{op:?}: {e}")).unwrap();
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The index's maps agree after any sequence of mutations, and no plan ever releases an IP
    /// that a live, unfinished pod reports, nor one whose pod holds it, nor half a handle.
    #[test]
    fn no_plan_releases_a_live_ip_and_every_map_stays_consistent(ops in proptest::collection::vec(op(), 1..60)) {
        let mut w = World::new(5);
        let mut now = T0;
        for op in &ops {
            if let Some(plan) = apply_op(&mut w, op, &mut now) {
                let mut released = std::collections::HashSet::new();
                for b in &plan.releases {
                    for it in &b.items {
                        let g = w.index.gid_of_ip(it.ip).unwrap();
                        prop_assert!(!w.index.live_gids().contains(g), "released live IP {}", it.ip);
                        let live_holder = w.index.present_pods().any(|p| !p.finished() && p.ips.contains(&it.ip));
                        prop_assert!(!live_holder, "released {} held by a live pod", it.ip);
                        released.insert(g);
                    }
                }
                for g in &released {
                    let a = w.index.alloc(*g).unwrap();
                    for h in w.index.allocations_of_handle(a.handle) {
                        prop_assert!(released.contains(h), "handle split");
                    }
                }
                w.gc.check_invariants(&w.index).map_err(TestCaseError::fail)?;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// With only n0 and n1 ever proven gone and no pod re-read answered, nothing is released
    /// unless its node is absent and proven gone, and only such nodes are released: a cache miss
    /// alone never frees an address or an affinity.
    #[test]
    fn only_nodes_proven_gone_lose_anything_without_a_reread(ops in proptest::collection::vec(op(), 1..60)) {
        let mut w = World::new(5);
        w.cfg.node_proof = proven(&["n0", "n1"]);
        w.cfg.revalidate_live = true;
        let mut now = T0;
        let proven_absent = |w: &World, n: &str| (n == "n0" || n == "n1") && !w.index.node_names().any(|c| c == n);
        for op in &ops {
            if let Some(plan) = apply_op(&mut w, op, &mut now) {
                for b in &plan.releases {
                    for it in &b.items {
                        let a = w.index.alloc(w.index.gid_of_ip(it.ip).unwrap()).unwrap();
                        let n = w.index.resolve(a.node).to_string();
                        prop_assert!(proven_absent(&w, &n), "released {} of node {n}, not proven gone", it.ip);
                    }
                }
                for r in &plan.nodes_to_release {
                    prop_assert!(proven_absent(&w, &r.node), "released node {}, not proven gone", r.node);
                }
                for n in &plan.prove_gone {
                    prop_assert!(!proven_absent(&w, n) && !w.index.node_names().any(|c| c == n), "asked to prove {n}");
                }
            }
        }
    }
}

#[test]
fn several_empty_blocks_of_one_node_are_released_together_except_the_last() {
    let mut w = World::new(1);
    w.index.apply_node(&node("n1"));
    for i in 0..5 {
        w.index.apply_block(&block(&format!("10.0.{i}.0/29"), Some("n1"), &[])).unwrap();
    }
    w.full(T0);
    let p = w.full(T0 + 2 * MIN);
    assert_eq!(p.empty_blocks.iter().filter(|e| e.releasable).count(), 4);
    assert_eq!(p.empty_blocks.iter().filter(|e| e.held_by == Some("node-last-block")).count(), 1);
}

#[test]
fn handle_tokens_are_stored_compactly_and_read_back_exactly() {
    let mut w = World::new(5);
    for (name, rv, uid) in [("a", "12345", "0b3d2c1e-9f8a-4b7c-8d6e-5f4a3b2c1d0e"), ("b", "rv-text", "not-a-uuid"), ("c", "007", "")] {
        let h: IpamHandle = serde_json::from_value(json!({"metadata": {"name": name, "resourceVersion": rv, "uid": uid}, "spec": {"handleID": name, "block": {}}})).unwrap();
        w.index.apply_handle(&h).unwrap();
        let meta = w.index.handle(w.index.handle_id(name).unwrap()).unwrap();
        assert_eq!((meta.revision.as_str(), meta.uid.as_str()), (rv, uid));
    }
    w.index.delete_handle("b");
    w.index.check_invariants().unwrap();
}

#[test]
fn with_live_revalidation_a_confirmed_leak_waits_for_a_fresh_read_of_its_pod() {
    let mut w = basic(1);
    w.cfg.revalidate_live = true;
    w.full(T0);
    let g = w.index.gid_of_ip("10.0.0.2".parse().unwrap()).unwrap();
    let p = w.full(T0 + 2 * MIN);
    assert!(p.releases.is_empty(), "no release on cached facts alone");
    assert_eq!(p.revalidate, vec![(g, "ns".to_string(), "p2".to_string())]);
    assert!(w.gc.is_confirmed(g), "stays confirmed while the read is pending");
    // The read shows the pod back with this IP: kept, and its leak state forgotten.
    let mut fresh = BTreeMap::new();
    fresh.insert(("ns".to_string(), "p2".to_string()), Some(pod("ns", "p2", "n1", &["10.0.0.2"])));
    let p = w.pass(T0 + 3 * MIN, Scope::Full, &fresh);
    assert!(p.releases.is_empty());
    assert!(!w.gc.is_confirmed(g));
    // Later the read says NotFound: released in that pass.
    w.full(T0 + 4 * MIN);
    w.full(T0 + 6 * MIN);
    fresh.insert(("ns".to_string(), "p2".to_string()), None);
    assert_eq!(released_ips(&w.pass(T0 + 7 * MIN, Scope::Full, &fresh)), vec!["10.0.0.2"]);
}

#[test]
fn a_handle_written_with_a_carriage_return_is_deleted_by_the_key_it_was_indexed_under() {
    let mut w = World::new(5);
    let h: IpamHandle = serde_json::from_value(json!({"metadata": {"name": "k8s-pod-network.x", "resourceVersion": "1"}, "spec": {"handleID": "k8s-pod-network.x\r\n", "block": {}}})).unwrap();
    w.index.apply_handle(&h).unwrap();
    assert_eq!(IpamIndex::handle_key(&h), "k8s-pod-network.x");
    w.index.delete_handle(IpamIndex::handle_key(&h));
    assert_eq!(w.index.handles().count(), 0);
    w.index.check_invariants().unwrap();
}

#[test]
fn a_default_index_is_as_usable_as_a_new_one() {
    let mut a = crate::ipam::index::IpamIndex::default();
    let mut b = crate::ipam::index::IpamIndex::new();
    for ix in [&mut a, &mut b] {
        ix.apply_node(&serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}})).unwrap());
        ix.check_invariants().unwrap();
    }
    assert_eq!(a.node_count(), b.node_count());
}

#[test]
fn an_empty_vmi_name_still_makes_a_vm_allocation() {
    // Upstream tests the attribute's presence, not its value: such an allocation is judged as a
    // VM's (kept without KubeVirt facts), never as a plain pod leak.
    let mut w = World::new(1);
    w.index.apply_node(&node("n1"));
    let vm = AllocSpec { ord: 1, handle: "net.ns-vm1", attrs: json!({"namespace": "ns", "pod": "virt-launcher-vm1-abc", "node": "n1", "vmi-name": ""}), seq: 1 };
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[vm])).unwrap();
    assert_eq!(w.index.vm_allocations().len(), 1);
    w.full(T0);
    assert!(w.full(T0 + 30 * MIN).leaks.is_empty(), "no KubeVirt facts: valid");
    w.kubevirt = Some(KubeVirtFacts::default());
    w.full(T0 + 31 * MIN);
    assert!(released_ips(&w.full(T0 + 60 * MIN)).is_empty(), "an empty VMI name can never be proven gone");
}

#[test]
fn a_finished_pod_that_reports_no_ip_loses_its_allocation_after_the_grace_period() {
    // A deliberate difference: upstream keeps such an allocation forever (a pod without an IP in
    // its status is "not yet reported"); a Succeeded or Failed pod will never report one.
    let mut w = World::new(1);
    w.index.apply_node(&node("n1"));
    let mut done = pod("ns", "job", "n1", &[]);
    done.phase = PodPhase::Succeeded;
    w.index.apply_pod(&done);
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[pod_alloc(1, "hj", "ns", "job", "n1")])).unwrap();
    let p = w.full(T0);
    let l = leak_of(&p, &w, "10.0.0.1").expect("a finished pod's allocation is a leak");
    assert_eq!(l.reason, LeakReason::PodFinished);
    assert!(matches!(l.state, LeakState::Candidate { .. }));
    assert!(w.full(T0 + MIN).releases.is_empty(), "exactly the grace period is not past it");
    assert_eq!(released_ips(&w.full(T0 + MIN + 1)), vec!["10.0.0.1"]);
}

/// Node n1 missing from the index: a tunnel on .0, gone pod p1's address on .1, an affinity for its block.
fn uncached_node(grace_min: i64, proof: NodeProof) -> World {
    let mut w = World::new(grace_min);
    w.cfg.node_proof = proof;
    w.cfg.revalidate_live = true;
    w.index.apply_node(&node("n2"));
    let tunnel = AllocSpec { ord: 0, handle: "ipip-tunnel-addr-n1", attrs: json!({"node": "n1", "type": "ipipTunnelAddress"}), seq: 1 };
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[tunnel, pod_alloc(1, "h1", "ns", "p1", "n1")])).unwrap();
    w.index.apply_affinity(&serde_json::from_value(json!({"metadata": {"name": "n1-10-0-0-0-29"}, "spec": {"state": "confirmed", "node": "n1", "cidr": "10.0.0.0/29", "deleted": "false"}})).unwrap()).unwrap();
    w
}

fn proven(names: &[&str]) -> NodeProof {
    NodeProof::Proven(names.iter().map(|n| n.to_string()).collect())
}

#[test]
fn a_node_missing_from_the_cache_but_not_proven_gone_keeps_its_tunnel_and_affinities_and_its_pods_get_the_grace_period() {
    let mut w = uncached_node(1, proven(&[]));
    let p = w.full(T0);
    assert!(p.releases.is_empty(), "nothing goes on a cache miss");
    assert!(p.nodes_to_release.is_empty(), "no node release on a cache miss");
    assert_eq!(p.prove_gone, vec!["n1".to_string()], "the plan asks for a read of the node");
    let tunnel = leak_of(&p, &w, "10.0.0.0").unwrap();
    assert_eq!(tunnel.held_by, Some(HeldBy::NodeNotProvenGone));
    assert!(matches!(tunnel.state, LeakState::Candidate { .. }));
    let pod_leak = leak_of(&p, &w, "10.0.0.1").unwrap();
    assert_eq!(pod_leak.reason, LeakReason::PodNotFound, "not node-deleted: the node is not known to be gone");
    assert!(matches!(pod_leak.state, LeakState::Candidate { .. }), "no instant confirmation");
    // After the grace period the pod's address is confirmed but waits for its live re-read.
    let p = w.full(T0 + 2 * MIN);
    assert!(p.releases.is_empty());
    assert!(matches!(leak_of(&p, &w, "10.0.0.1").unwrap().state, LeakState::Confirmed { .. }));
    assert_eq!(p.revalidate.iter().map(|(_, ns, pod)| (ns.as_str(), pod.as_str())).collect::<Vec<_>>(), vec![("ns", "p1")]);
    let fresh: BTreeMap<(String, String), Option<PodFacts>> = [(("ns".to_string(), "p1".to_string()), None)].into();
    let p = w.pass(T0 + 2 * MIN, Scope::Full, &fresh);
    assert_eq!(released_ips(&p), vec!["10.0.0.1"], "the re-read pod is gone: only its address goes");
    assert!(p.nodes_to_release.is_empty());
    assert_eq!(leak_of(&p, &w, "10.0.0.0").unwrap().held_by, Some(HeldBy::NodeNotProvenGone));
}

#[test]
fn a_dirty_pass_on_a_node_not_proven_gone_asks_for_its_proof_and_releases_nothing() {
    let mut w = uncached_node(1, proven(&[]));
    w.index.take_dirty();
    let p = w.pass(T0, Scope::Dirty(["n1".into()].into()), &BTreeMap::new());
    assert!(p.releases.is_empty() && p.nodes_to_release.is_empty());
    assert_eq!(p.prove_gone, vec!["n1".to_string()]);
}

#[test]
fn a_node_proven_gone_loses_its_addresses_and_affinities_at_once() {
    let mut w = uncached_node(15, proven(&["n1"]));
    let p = w.full(T0);
    let mut ips = released_ips(&p);
    ips.sort();
    assert_eq!(ips, vec!["10.0.0.0", "10.0.0.1"]);
    assert_eq!(leak_of(&p, &w, "10.0.0.1").unwrap().reason, LeakReason::NodeDeleted);
    assert_eq!(leak_of(&p, &w, "10.0.0.0").unwrap().reason, LeakReason::TunnelNodeDeleted);
    assert_eq!(p.nodes_to_release.len(), 1);
    assert_eq!(p.nodes_to_release[0].affinities, vec![("n1-10-0-0-0-29".to_string(), "10.0.0.0/29".parse().unwrap())]);
    assert!(p.prove_gone.is_empty());
}

#[test]
fn a_node_proven_gone_later_is_released_in_the_pass_that_has_the_proof() {
    let mut w = uncached_node(15, proven(&[]));
    assert!(w.full(T0).releases.is_empty());
    w.cfg.node_proof = proven(&["n1"]);
    let p = w.full(T0 + MIN);
    assert_eq!(released_ips(&p).len(), 2);
    assert_eq!(p.nodes_to_release.len(), 1);
}

#[test]
fn a_cached_node_is_there_whatever_the_proof_says() {
    let mut w = uncached_node(15, proven(&["n1"]));
    w.index.apply_node(&node("n1"));
    let p = w.full(T0);
    assert!(p.releases.is_empty() && p.nodes_to_release.is_empty() && p.prove_gone.is_empty());
    assert!(leak_of(&p, &w, "10.0.0.0").is_none(), "the tunnel of a live node is valid");
}

#[test]
fn a_complete_snapshot_takes_every_absent_node_as_gone() {
    let mut w = uncached_node(15, NodeProof::AbsenceIsProof);
    let p = w.full(T0);
    assert_eq!(released_ips(&p).len(), 2);
    assert_eq!(p.nodes_to_release.len(), 1);
    assert!(p.prove_gone.is_empty());
}

/// `block` under another object name.
fn misnamed(mut b: IpamBlock, name: &str) -> IpamBlock {
    b.metadata.name = name.to_string();
    b
}

#[test]
fn a_block_named_for_another_cidr_is_invalid_and_never_stands_in_for_the_real_block() {
    let mut w = basic(15);
    // Same CIDR as the real block, but stored under the name of 10.0.1.0/29: it must not replace
    // the real block (p1's allocation would vanish from the index) nor add its own leak.
    let impostor = misnamed(block("10.0.0.0/29", Some("n1"), &[pod_alloc(5, "h9", "ns", "gone", "n1")]), "10-0-1-0-29");
    let err = w.index.apply_block(&impostor).unwrap_err();
    assert_eq!((err.kind.as_str(), err.name.as_str()), ("IPAMBlock", "10-0-1-0-29"));
    assert!(err.problem.contains("10-0-1-0-29") && err.problem.contains("10.0.0.0/29") && err.problem.contains("10-0-0-0-29"), "{err}");
    // A block under a name no CIDR of its own matches is not indexed either (IPv6 too).
    let v4 = misnamed(block("10.0.2.0/29", Some("n1"), &[pod_alloc(3, "h8", "ns", "gone", "n1")]), "10-0-2-0-28");
    assert!(w.index.apply_block(&v4).is_err());
    let v6 = misnamed(block("fd00:1::/125", Some("n1"), &[pod_alloc(3, "h7", "ns", "gone", "n1")]), "fd00:1::-125");
    assert!(w.index.apply_block(&v6).is_err());
    w.index.apply_block(&block("fd00:2::/125", None, &[])).expect("an IPv6 block under its own name is valid");
    w.index.check_invariants().unwrap();

    assert_eq!(w.index.block_count(), 2);
    assert!(w.index.gid_of_ip("10.0.0.5".parse().unwrap()).is_some_and(|g| !w.index.allocated().contains(g)));
    assert!(w.index.gid_of_ip("10.0.2.3".parse().unwrap()).is_none());
    assert!(w.index.gid_of_ip("fd00:1::3".parse().unwrap()).is_none());
    let p = w.full(T0);
    assert!(leak_of(&p, &w, "10.0.0.1").is_none(), "the live pod's address in the real block is kept");
    assert!(leak_of(&p, &w, "10.0.0.2").is_some(), "the real block's own leak is still judged");
    assert_eq!(p.leaks.len(), 1, "no leak from any misnamed block: {:?}", p.leaks);
}

// ---- name and content agree (issue #9) ----------------------------------------------------

fn affinity_object(name: &str, node: &str, cidr: &str) -> crate::model::BlockAffinity {
    serde_json::from_value(json!({"metadata": {"name": name, "resourceVersion": "1"},
                                  "spec": {"state": "confirmed", "node": node, "cidr": cidr, "deleted": "false"}}))
    .unwrap()
}

fn handle_object(name: &str, id: &str, rv: &str, deleted: bool) -> IpamHandle {
    serde_json::from_value(json!({"metadata": {"name": name, "resourceVersion": rv, "uid": "0b3d2c1e-9f8a-4b7c-8d6e-5f4a3b2c1d0e"},
                                  "spec": {"handleID": id, "block": {}, "deleted": deleted}}))
    .unwrap()
}

#[test]
fn an_affinity_whose_name_is_not_the_one_its_node_and_cidr_derive_is_invalid_and_never_indexed() {
    let mut w = World::new(5);
    // Named for n2, claiming n1: it would make n1 look affine (and be deleted with n1's release).
    let e = w.index.apply_affinity(&affinity_object("n2-10-0-0-0-29", "n1", "10.0.0.0/29")).unwrap_err();
    assert_eq!((e.kind.as_str(), e.name.as_str()), ("BlockAffinity", "n2-10-0-0-0-29"));
    assert!(e.problem.contains("n1-10-0-0-0-29"), "{}", e.problem);
    assert_eq!(w.index.affinities().count(), 0);
    // A valid affinity later rewritten to contradict its name is dropped, not kept stale.
    w.index.apply_affinity(&affinity_object("n1-10-0-0-0-29", "n1", "10.0.0.0/29")).unwrap();
    assert_eq!(w.index.affinities().count(), 1);
    assert!(w.index.apply_affinity(&affinity_object("n1-10-0-0-0-29", "n1", "10.0.0.8/29")).is_err());
    assert_eq!(w.index.affinities().count(), 0);
    // A CIDR with host bits set names no block.
    assert!(w.index.apply_affinity(&affinity_object("n1-10-0-0-1-29", "n1", "10.0.0.1/29")).is_err());
    w.index.check_invariants().unwrap();
}

#[test]
fn a_handle_whose_name_contradicts_its_handle_id_is_invalid_and_never_stands_in_for_the_real_one() {
    let mut w = World::new(5);
    w.index.apply_handle(&handle_object("k8s-pod-network.a", "k8s-pod-network.a", "10", false)).unwrap();
    // Another object claims the same handle ID: indexed, its tokens would replace the real
    // handle's, and its soft delete would drop the real one from the index.
    let e = w.index.apply_handle(&handle_object("bogus", "k8s-pod-network.a", "99", false)).unwrap_err();
    assert_eq!((e.kind.as_str(), e.name.as_str()), ("IPAMHandle", "bogus"));
    assert!(w.index.apply_handle(&handle_object("bogus", "k8s-pod-network.a", "99", true)).is_err());
    let sym = w.index.handle_id("k8s-pod-network.a").unwrap();
    assert_eq!(w.index.handle(sym).unwrap().revision, "10", "the real handle is untouched");
    // No handle ID at all says nothing about which handle the object is.
    assert!(w.index.apply_handle(&handle_object("k8s-pod-network.b", "", "1", false)).is_err());
    // The KDD name is the lowercased ID; a `\r` suffix of old CNIs is not part of it.
    w.index.apply_handle(&handle_object("k8s-pod-network.mixed", "k8s-pod-network.MiXed", "1", false)).unwrap();
    w.index.apply_handle(&handle_object("k8s-pod-network.cr", "k8s-pod-network.cr\r\n", "1", false)).unwrap();
    assert_eq!(w.index.handles().count(), 3);
    w.index.check_invariants().unwrap();
}

#[test]
fn etcd_names_the_handle_by_its_id_and_a_long_affinity_unhashed_and_both_are_that_object() {
    // Kubernetes object names cannot hold these, so accepting them changes nothing for KDD.
    let mut w = World::new(5);
    w.index.apply_handle(&handle_object("k8s-pod-network.MiXed", "k8s-pod-network.MiXed", "1", false)).unwrap();
    let sym = w.index.handle_id("k8s-pod-network.MiXed").unwrap();
    assert_eq!(w.index.handle(sym).unwrap().revision, "1");
    assert!(w.index.apply_handle(&handle_object("k8s-pod-network.Mixed", "k8s-pod-network.MiXed", "2", false)).is_err(), "another spelling is not its name");
    let host = "h".repeat(250);
    let cidr: ipnet::IpNet = "10.0.0.0/29".parse().unwrap();
    let plain = crate::model::names::plain_affinity_name(&host, &cidr);
    assert_ne!(plain, crate::model::names::affinity_name(&host, &cidr));
    w.index.apply_affinity(&affinity_object(&plain, &host, "10.0.0.0/29")).unwrap();
    assert_eq!(w.index.affinities().map(|(n, _)| n.to_string()).collect::<Vec<_>>(), vec![plain]);
    w.index.check_invariants().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// An affinity is indexed exactly when its name is the one KDD derives from its node and
    /// CIDR (long names included); any other name is reported invalid and leaves the index as
    /// it was.
    #[test]
    fn an_affinity_is_indexed_only_under_the_name_its_content_derives(
        host in "[a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?",
        third in 0u8..=255,
        prefix in 26u8..=32,
        other in "[a-z0-9-]{1,20}",
    ) {
        let cidr = ipnet::IpNet::new(IpAddr::from([10, 1, third, 0]), prefix).unwrap().trunc();
        let good = crate::model::names::affinity_name(&host, &cidr);
        let mut w = World::new(5);
        prop_assert!(w.index.apply_affinity(&affinity_object(&good, &host, &cidr.to_string())).is_ok());
        prop_assert_eq!(w.index.affinities().count(), 1);
        let bad = format!("{other}-{good}");
        prop_assert!(w.index.apply_affinity(&affinity_object(&bad, &host, &cidr.to_string())).is_err());
        prop_assert_eq!(w.index.affinities().map(|(n, _)| n.to_string()).collect::<Vec<_>>(), vec![good]);
        w.index.check_invariants().map_err(TestCaseError::fail)?;
    }

    /// A handle is indexed exactly when its object name is its lowercased handle ID; a name
    /// that differs anywhere is reported invalid and never replaces the real handle's entry.
    #[test]
    fn a_handle_is_indexed_only_under_the_name_its_id_derives(id in "[A-Za-z0-9][A-Za-z0-9.-]{0,60}", flip in 0usize..61) {
        let mut w = World::new(5);
        let name = id.to_lowercase();
        prop_assert!(w.index.apply_handle(&handle_object(&name, &id, "7", false)).is_ok());
        let mut wrong: Vec<char> = name.chars().collect();
        let i = flip % wrong.len();
        wrong[i] = if wrong[i] == 'x' { 'y' } else { 'x' };
        let wrong: String = wrong.into_iter().collect();
        prop_assert!(w.index.apply_handle(&handle_object(&wrong, &id, "8", false)).is_err());
        prop_assert!(w.index.apply_handle(&handle_object(&wrong, &id, "9", true)).is_err());
        let sym = w.index.handle_id(crate::model::names::sanitize_handle(&id)).unwrap();
        prop_assert_eq!(w.index.handle(sym).map(|h| h.revision), Some("7".to_string()));
        w.index.check_invariants().map_err(TestCaseError::fail)?;
    }
}

// ---- node release keeps upstream's mustBeEmpty (issue #9) ---------------------------------

#[test]
fn a_deleted_nodes_block_still_holding_another_nodes_address_is_planned_as_held_and_its_affinity_kept() {
    let mut w = World::new(15);
    w.index.apply_node(&node("n2"));
    w.index.apply_pod(&pod("ns", "b", "n2", &["10.0.0.2"]));
    // n1 is gone. Its block A holds its own gone pod and n2's running pod; its block B only its own.
    w.index.apply_block(&block("10.0.0.0/29", Some("n1"), &[pod_alloc(1, "h1", "ns", "p1", "n1"), pod_alloc(2, "hb", "ns", "b", "n2")])).unwrap();
    w.index.apply_block(&block("10.0.0.8/29", Some("n1"), &[pod_alloc(1, "h9", "ns", "p9", "n1")])).unwrap();
    let p = w.full(T0);
    let mut ips = released_ips(&p);
    ips.sort();
    assert_eq!(ips, vec!["10.0.0.1", "10.0.0.9"], "n1's own addresses go at once");
    let r = &p.nodes_to_release[0];
    assert_eq!(r.node, "n1");
    let a: ipnet::IpNet = "10.0.0.0/29".parse().unwrap();
    let b: ipnet::IpNet = "10.0.0.8/29".parse().unwrap();
    assert_eq!(r.blocks, vec![("10-0-0-0-29".to_string(), a), ("10-0-0-8-29".to_string(), b)], "blocks by their stored names");
    assert_eq!(r.held, vec![(a, HeldBy::BlockNotEmpty)], "B empties with this pass's releases; A keeps n2's address");
    assert_eq!(HeldBy::BlockNotEmpty.as_str(), "block-not-empty");
    // n2's pod goes and its address is released (a live node: after the grace period): A is
    // empty after that pass, and n1's release holds nothing any more.
    w.index.delete_pod("ns", "b");
    w.full(T0 + MIN);
    let p = w.full(T0 + 20 * MIN);
    // (Nothing executes here, so n1's own addresses are planned again beside it.)
    assert!(released_ips(&p).contains(&"10.0.0.2".to_string()), "{:?}", released_ips(&p));
    let r = p.nodes_to_release.iter().find(|r| r.node == "n1").expect("n1 is planned again");
    assert!(r.held.is_empty(), "{:?}", r.held);
    w.gc.check_invariants(&w.index).unwrap();
}

#[test]
fn a_dirty_pass_judges_only_its_own_nodes_empty_blocks_and_the_full_pass_the_rest() {
    let mut w = World::new(1);
    for n in ["n1", "n2"] {
        w.index.apply_node(&node(n));
    }
    // Each node has two empty blocks: one of them may go once the grace period is over.
    for (i, n) in [(0, "n1"), (1, "n1"), (2, "n2"), (3, "n2")] {
        w.index.apply_block(&block(&format!("10.0.{i}.0/29"), Some(n), &[])).unwrap();
    }
    w.full(T0);
    let dirty = |n: &str| Scope::Dirty([Box::<str>::from(n)].into_iter().collect());
    let p = w.pass(T0 + 2 * MIN, dirty("n1"), &BTreeMap::new());
    let judged: Vec<String> = p.empty_blocks.iter().map(|e| e.node.clone()).collect();
    assert_eq!(judged, ["n1", "n1"], "a dirty pass of n1 looks at n1's blocks only: {:?}", p.empty_blocks);
    assert_eq!(p.empty_blocks.iter().filter(|e| e.releasable).count(), 1);
    // n2's grace period started at the full pass: the next full pass releases one of its blocks.
    let p = w.full(T0 + 3 * MIN);
    let n2: Vec<_> = p.empty_blocks.iter().filter(|e| e.node == "n2").collect();
    assert_eq!(n2.len(), 2);
    assert_eq!(n2.iter().filter(|e| e.releasable).count(), 1, "{n2:?}");
}

#[test]
fn a_pod_is_compared_with_the_kubernetes_node_its_calico_node_maps_to() {
    // etcd: the allocation names Calico Node `calico-n1`, which stands for Kubernetes node
    // `k8s-n1`, where the pod runs without reporting its IP yet. Judged against the Calico name
    // it would look rescheduled and be released after the grace period (SPEC §5.6 step 5).
    let mut w = World::new(1);
    w.index.apply_node(&node("calico-n1"));
    w.index.set_node_alias("calico-n1", Some("k8s-n1"));
    w.index.apply_pod(&pod("ns", "p1", "k8s-n1", &[]));
    w.index.apply_block(&block("10.0.0.0/29", Some("calico-n1"), &[pod_alloc(1, "h1", "ns", "p1", "calico-n1")])).unwrap();
    w.index.check_invariants().unwrap();
    assert!(leak_of(&w.full(T0), &w, "10.0.0.1").is_none(), "the pod on the mapped node keeps its address");
    assert!(w.full(T0 + 2 * MIN).releases.is_empty());
    // The mapping goes (the Calico Node's orchRef no longer names k8s-n1): now it moved.
    w.index.set_node_alias("calico-n1", None);
    w.index.check_invariants().unwrap();
    let p = w.full(T0 + 3 * MIN);
    let l = leak_of(&p, &w, "10.0.0.1").expect("a pod on another node");
    assert_eq!(l.reason, LeakReason::PodRescheduled);
}

#[test]
fn handle_tokens_keep_their_usual_shapes_compact_and_everything_else_as_text() {
    use super::index::Token;
    for (s, number) in [("0", true), ("7", true), ("18446744073709551615", true), ("18446744073709551616", false), ("01", false), ("+5", false), ("", false), ("12a", false)] {
        assert_eq!(matches!(Token::new(s), Token::Number(_)), number, "{s:?}");
    }
    assert!(matches!(Token::new("0b9a3c1e-5f6d-4e2a-9b8c-7d6e5f4a3b2c"), Token::Uuid(_)));
    for text in ["0B9A3C1E-5F6D-4E2A-9B8C-7D6E5F4A3B2C", "0b9a3c1e-5f6d-4e2a-9b8c-7d6e5f4a3b2", "0b9a3c1e5f6d-4e2a-9b8c-7d6e5f4a3b2c-", "0b9a3c1e-5f6d-4e2a-9b8c-7d6e5f4a3b2g"] {
        assert!(matches!(Token::new(text), Token::Text(_)), "{text:?}");
    }
}

proptest! {
    #[test]
    fn every_token_prints_back_as_it_was_read(s in "[0-9a-f-]{0,40}|[0-9]{1,21}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\\PC{0,12}") {
        prop_assert_eq!(super::index::Token::new(&s).to_string(), s);
    }

    #[test]
    fn handle_ids_are_found_and_written_back_exactly(ids in proptest::collection::vec("k8s-pod-network\\.[0-9a-fA-F]{62,66}|[a-z-]{1,12}", 1..40), drop_mask in any::<u64>()) {
        let mut t = super::handles::HandleTable::default();
        let got: Vec<_> = ids.iter().map(|s| t.intern(s)).collect();
        for (s, id) in ids.iter().zip(&got) {
            prop_assert_eq!(&*t.name(*id), s.as_str());
            prop_assert_eq!(t.lookup(s), Some(*id));
        }
        t.check_invariants().map_err(TestCaseError::fail)?;
        for (i, id) in got.iter().enumerate() {
            if drop_mask & (1 << (i % 64)) != 0 {
                t.release(*id);
            }
        }
        t.check_invariants().map_err(TestCaseError::fail)?;
        for (i, s) in ids.iter().enumerate() {
            let held = ids.iter().enumerate().filter(|(j, o)| *o == s && drop_mask & (1 << (j % 64)) == 0).count();
            prop_assert_eq!(t.lookup(s).is_some(), held > 0, "{} (#{})", s, i);
        }
    }
}

// ---- a bulk load and the same objects one at a time ------------------------------------------

/// What the index says of a cluster, spelled out (no symbols, which depend on interning order).
fn described(ix: &IpamIndex, handles: &[&str], pods: &[(&str, &str)]) -> Vec<String> {
    let mut out: Vec<String> = handles
        .iter()
        .map(|h| {
            let id = ix.handle_id(h);
            let ips: Vec<String> = id.map_or(vec![], |id| ix.allocations_of_handle(id).iter().map(|g| ix.ip_of(*g).unwrap().to_string()).collect());
            format!("handle {h}: {:?} {ips:?}", id.and_then(|id| ix.handle(id)))
        })
        .collect();
    out.extend(ix.unreferenced_handles().into_iter().map(|h| format!("unreferenced {}", ix.handle_name(h))));
    out.extend(pods.iter().map(|(ns, name)| {
        let p = ix.pod_by_name(ns, name);
        let facts = p.map(|p| (p.present, ix.resolve(p.node), p.phase, p.evicted, p.deleting, p.status_reports_ip, p.unparsable_ips, &p.ips));
        format!("pod {ns}/{name}: {facts:?}")
    }));
    out.extend(ix.affinities().map(|(name, a)| format!("affinity {name}: {} {} {} {}", ix.resolve(a.node), a.cidr, a.revision, a.state)));
    out.extend(ix.live_gids().iter().map(|g| format!("live {}", ix.ip_of(g).unwrap())));
    out.push(format!("allocated {:?}", ix.allocated().iter().map(|g| ix.ip_of(g).unwrap().to_string()).collect::<Vec<_>>()));
    out.sort();
    out
}

/// The bulk load applies the pods on one core and the handle objects on the other, with the
/// handle table moved out of the index meanwhile: it must end where applying every object in
/// turn ends, in either order of pods and handles (the two commute), handle objects of every
/// kind included (tokens, odd tokens, soft-deleted, without allocations, misnamed) and pods of
/// every path (known, new, listed twice on another node, named like a node, without a node, with
/// an IP in no block), and report the same invalid objects.
#[test]
fn a_bulk_load_ends_in_the_state_applying_each_object_in_turn_reaches() {
    let blocks = [
        block("10.0.0.0/29", Some("n1"), &[pod_alloc(1, "h1", "ns", "p1", "n1"), pod_alloc(2, "h2", "ns", "p2", "n1"), pod_alloc(3, "h3", "ns", "p3", "n1")]),
        block("10.0.1.0/29", Some("n2"), &[pod_alloc(1, "h4", "other", "p1", "n2")]),
    ];
    let nodes = [node("n1"), node("n2")];
    let pods = [
        pod("ns", "p1", "n1", &["10.0.0.1"]),
        pod("ns", "p2", "n1", &["10.0.0.2"]),
        PodFacts { evicted: true, deleting: true, unparsable_ips: true, ..pod("other", "p1", "n2", &[]) },
        pod("ns", "p9", "n2", &["10.0.1.5"]),
        pod("ns", "n1", "n1", &["10.0.9.1"]),
        pod("ns", "p8", "", &[]),
        pod("ns", "p2", "n2", &["10.0.0.2"]),
    ];
    let affinities = [affinity_object("n1-10-0-0-0-29", "n1", "10.0.0.0/29"), affinity_object("n9-10-0-1-0-29", "n2", "10.0.1.0/29")];
    let handles = [
        handle_object("h1", "h1", "10", false),
        handle_object("h2", "h2", "not-a-number", false),
        handle_object("h3", "h3", "12", true),
        handle_object("h8", "h8", "13", false),
        handle_object("bogus", "h4", "14", false),
    ];
    let names = |v: &[crate::model::InvalidObject]| v.iter().map(|e| format!("{} {}", e.kind, e.name)).collect::<Vec<_>>();
    let handle_ids = ["h1", "h2", "h3", "h4", "h8"];
    let pod_keys = [("ns", "p1"), ("ns", "p2"), ("ns", "p3"), ("other", "p1"), ("ns", "p9"), ("ns", "n1"), ("ns", "p8")];
    let mut bulk = IpamIndex::new();
    let invalid = bulk.reset(super::index::Snapshot { blocks: &blocks, affinities: &affinities, handles: &handles, pods: &pods, nodes: &nodes });
    bulk.check_invariants().unwrap();
    assert_eq!(names(&invalid), ["BlockAffinity n9-10-0-1-0-29", "IPAMHandle bogus"]);
    let state = described(&bulk, &handle_ids, &pod_keys);
    for handles_first in [false, true] {
        let mut in_turn = IpamIndex::new();
        let mut invalid_in_turn = Vec::new();
        nodes.iter().for_each(|n| in_turn.apply_node(n));
        invalid_in_turn.extend(blocks.iter().filter_map(|b| in_turn.apply_block(b).err()));
        let handle_errors: Vec<_> = if handles_first { handles.iter().filter_map(|h| in_turn.apply_handle(h).err()).collect() } else { vec![] };
        pods.iter().for_each(|p| in_turn.apply_pod(p));
        invalid_in_turn.extend(affinities.iter().filter_map(|a| in_turn.apply_affinity(a).err()));
        invalid_in_turn.extend(handle_errors);
        if !handles_first {
            invalid_in_turn.extend(handles.iter().filter_map(|h| in_turn.apply_handle(h).err()));
        }
        in_turn.check_invariants().unwrap();
        assert_eq!(names(&invalid), names(&invalid_in_turn), "handles first: {handles_first}");
        assert_eq!(state, described(&in_turn, &handle_ids, &pod_keys), "handles first: {handles_first}");
    }
    // What the comparison covers is there to compare: tokens, odd tokens, the orphan, the
    // soft-deleted handle without an object, the pod moved to another node, the flags, and the
    // live and unplaced IPs.
    let needles = [
        "handle h1: Some(HandleMeta { revision: \"10\"",
        "revision: \"not-a-number\"",
        "handle h3: None",
        "unreferenced h8",
        "pod ns/p2: Some((true, \"n2\"",
        "pod other/p1: Some((true, \"n2\", 1, true, true, false, true",
        "pod ns/n1: Some((true, \"n1\"",
        "pod ns/p8: Some((true, \"\"",
        "live 10.0.0.2",
    ];
    for needle in needles {
        assert!(state.iter().any(|l| l.contains(needle)), "{needle} missing from {state:#?}");
    }
    assert_eq!(bulk.gid_of_ip("10.0.9.1".parse().unwrap()), None, "10.0.9.1 is in no block: its pod's IP waits unplaced");
}
