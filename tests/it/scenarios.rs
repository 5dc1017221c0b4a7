//! Scenario tests on the in-memory datastore (SPEC §9.1 unit scenarios and §9.2 KDD FV scenarios):
//! objects live in a `MemoryDatastore` with upstream's CAS, sequence-number and soft-delete
//! semantics; the index is fed from it as the watches would; plans are executed by the same
//! `execute_plan` the controller uses. Assertions are on the datastore, not on plans.

use std::collections::BTreeMap;

use calico_kube_controllers::datastore::apply::{execute_plan, ExecuteOptions};
use calico_kube_controllers::datastore::memory::{block_on, MemoryDatastore, Op};
use calico_kube_controllers::datastore::{ErrorKind, Kind};
use calico_kube_controllers::ipam::gc::{GcConfig, GcState};
use calico_kube_controllers::ipam::plan::Scope;
use calico_kube_controllers::ipam::index::IpamIndex;
use calico_kube_controllers::model::{IpamBlock, NodeLite, PodFacts, PodPhase};
use calico_kube_controllers::sim::sync_index;
use serde_json::{json, Value};

const MIN: i64 = 60_000;
const T0: i64 = 1_800_000_000_000;

struct Cluster {
    ds: MemoryDatastore,
    index: IpamIndex,
    gc: GcState,
    cfg: GcConfig,
    now: i64,
}

struct A<'a> {
    ord: usize,
    handle: &'a str,
    attrs: Value,
}

fn pod_attr<'a>(ord: usize, handle: &'a str, ns: &str, pod: &str, node: &str) -> A<'a> {
    A { ord, handle, attrs: json!({"namespace": ns, "pod": pod, "node": node}) }
}

fn block_value(cidr: &str, host: Option<&str>, allocs: &[A<'_>]) -> Value {
    let net: ipnet::IpNet = cidr.parse().unwrap();
    let size = 1usize << (net.max_prefix_len() - net.prefix_len());
    let mut allocations = vec![Value::Null; size];
    let mut attributes = vec![];
    let mut seqs = serde_json::Map::new();
    for (i, a) in allocs.iter().enumerate() {
        allocations[a.ord] = json!(i);
        attributes.push(json!({"handle_id": a.handle, "secondary": a.attrs}));
        seqs.insert(a.ord.to_string(), json!(500 + a.ord));
    }
    let unallocated: Vec<usize> = (0..size).filter(|o| allocations[*o].is_null()).collect();
    json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
        "metadata": {"name": calico_kube_controllers::model::names::cidr_to_name(&net)},
        "spec": {"cidr": cidr, "affinity": host.map(|h| format!("host:{h}")), "strictAffinity": false,
                 "allocations": allocations, "unallocated": unallocated, "attributes": attributes,
                 "sequenceNumber": 600, "sequenceNumberForAllocation": seqs}})
}

fn running(ns: &str, name: &str, node: &str, ips: &[&str]) -> PodFacts {
    PodFacts {
        namespace: ns.into(),
        name: name.into(),
        node: node.into(),
        phase: PodPhase::Running,
        status_reports_ip: !ips.is_empty(),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        ..PodFacts::default()
    }
}

fn node(name: &str) -> NodeLite {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

impl Cluster {
    fn new(grace_min: i64) -> Self {
        Cluster {
            ds: MemoryDatastore::new(),
            index: IpamIndex::new(),
            gc: GcState::new(),
            cfg: GcConfig { leak_grace: grace_min * MIN, ..GcConfig::default() },
            now: T0,
        }
    }

    /// A block with its affinity and one handle object per distinct handle.
    fn block(&self, cidr: &str, host: Option<&str>, allocs: &[A<'_>]) {
        let v = block_value(cidr, host, allocs);
        let net: ipnet::IpNet = cidr.parse().unwrap();
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        self.ds.create_now(Kind::IpamBlock, &name, v).unwrap();
        if let Some(h) = host {
            let name = calico_kube_controllers::model::names::affinity_name(h, &net);
            self.ds
                .create_now(Kind::BlockAffinity, &name, json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity",
                    "metadata": {"name": name}, "spec": {"state": "confirmed", "node": h, "cidr": cidr, "deleted": "false"}}))
                .unwrap();
        }
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for a in allocs {
            *counts.entry(a.handle).or_default() += 1;
        }
        for (h, n) in counts {
            let name = calico_kube_controllers::model::names::handle_object_name(h);
            let existing = self.ds.peek(Kind::IpamHandle, &name);
            let mut blocks = existing.as_ref().map(|s| s.value["spec"]["block"].clone()).unwrap_or(json!({}));
            blocks[cidr] = json!(n);
            let v = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": name},
                "spec": {"handleID": h, "block": blocks}});
            match existing {
                Some(s) => {
                    self.ds.update_now(Kind::IpamHandle, &s.with_value(&v).unwrap()).unwrap();
                }
                None => {
                    self.ds.create_now(Kind::IpamHandle, &name, v).unwrap();
                }
            }
        }
    }

    /// One controller cycle at `now + minutes`: watches deliver, a full pass runs, the plan is
    /// written, and the watches deliver the writes.
    fn cycle(&mut self, minutes: i64) -> calico_kube_controllers::datastore::apply::PlanOutcome {
        self.now += minutes * MIN;
        sync_index(&self.ds, &mut self.index).unwrap();
        self.index.take_dirty();
        let plan = self.gc.pass(&mut self.index, self.now, &self.cfg, &Scope::Full, None, &BTreeMap::new());
        let out = block_on(execute_plan(&self.ds, &plan, self.now, 0, &ExecuteOptions { validate_writes: true, ..ExecuteOptions::default() }));
        sync_index(&self.ds, &mut self.index).unwrap();
        self.index.check_invariants().unwrap();
        self.gc.check_invariants(&self.index).unwrap();
        out
    }

    fn allocated(&self, cidr: &str) -> Vec<usize> {
        let net: ipnet::IpNet = cidr.parse().unwrap();
        let Some(s) = self.ds.peek(Kind::IpamBlock, &calico_kube_controllers::model::names::cidr_to_name(&net)) else { return vec![] };
        let b: IpamBlock = s.decode().unwrap();
        b.spec.allocations.iter().enumerate().filter(|(_, a)| a.is_some()).map(|(i, _)| i).collect()
    }

    fn has(&self, kind: Kind, name: &str) -> bool {
        self.ds.peek(kind, name).is_some_and(|s| !s.is_soft_deleted())
    }
}

#[test]
fn leaked_ip_of_a_missing_pod_on_a_live_node_is_released_after_the_grace_period_and_live_pods_keep_theirs() {
    let mut c = Cluster::new(1);
    c.index.apply_node(&node("n1"));
    c.index.apply_pod(&running("ns", "live", "n1", &["192.168.0.1"]));
    c.block("192.168.0.0/26", Some("n1"), &[pod_attr(1, "h-live", "ns", "live", "n1"), pod_attr(2, "h-gone", "ns", "gone", "n1")]);
    c.cycle(0);
    assert_eq!(c.allocated("192.168.0.0/26"), vec![1, 2], "candidate only");
    let out = c.cycle(2);
    assert_eq!(out.released.len(), 1);
    assert_eq!(c.allocated("192.168.0.0/26"), vec![1]);
    assert!(!c.has(Kind::IpamHandle, "h-gone"), "the handle went with its last address");
    assert!(c.has(Kind::IpamHandle, "h-live"));
}

#[test]
fn kdd_fv_rules_tunnels_node_only_attrs_pending_pods_and_wrong_ips() {
    let mut c = Cluster::new(1);
    c.index.apply_node(&node("n1"));
    c.index.apply_pod(&running("ns", "by-ip", "n1", &["192.168.0.10"]));
    c.index.apply_pod(&running("ns", "pending", "n1", &[]));
    c.index.apply_pod(&running("ns", "moved", "n1", &["192.168.0.99"]));
    c.block(
        "192.168.0.0/26",
        Some("n1"),
        &[
            A { ord: 1, handle: "ipip-tunnel-addr-n1", attrs: json!({"node": "n1", "type": "ipipTunnelAddress"}) },
            A { ord: 2, handle: "vxlan-tunnel-addr-n1", attrs: json!({"node": "n1", "type": "vxlanTunnelAddress"}) },
            A { ord: 3, handle: "wireguard-tunnel-addr-n1", attrs: json!({"node": "n1", "type": "wireguardTunnelAddress"}) },
            A { ord: 4, handle: "node-only", attrs: json!({"node": "n1"}) },
            pod_attr(10, "h-by-ip", "ns", "by-ip", "n1"),
            pod_attr(11, "h-pending", "ns", "pending", "n1"),
            pod_attr(12, "h-moved", "ns", "moved", "n1"),
            pod_attr(13, "h-nopod", "ns", "nopod", "n1"),
        ],
    );
    for _ in 0..4 {
        c.cycle(2);
    }
    assert_eq!(c.allocated("192.168.0.0/26"), vec![1, 2, 3, 4, 10, 11], "pod with another IP and missing pod are released");
}

#[test]
fn grace_period_zero_never_releases_on_live_nodes() {
    let mut c = Cluster::new(0);
    c.index.apply_node(&node("n1"));
    c.block("192.168.0.0/26", Some("n1"), &[pod_attr(2, "h", "ns", "gone", "n1")]);
    for _ in 0..5 {
        c.cycle(60);
    }
    assert_eq!(c.allocated("192.168.0.0/26"), vec![2]);
}

#[test]
fn an_empty_second_block_is_released_after_two_observations_and_the_last_block_is_kept() {
    let mut c = Cluster::new(5);
    c.index.apply_node(&node("n1"));
    c.index.apply_pod(&running("ns", "p", "n1", &["192.168.0.1"]));
    c.block("192.168.0.0/26", Some("n1"), &[pod_attr(1, "h", "ns", "p", "n1")]);
    c.block("192.168.0.64/26", Some("n1"), &[]);
    c.cycle(0);
    c.cycle(3);
    assert!(c.has(Kind::IpamBlock, "192-168-0-64-26"), "within the grace period");
    c.cycle(3);
    assert!(!c.has(Kind::IpamBlock, "192-168-0-64-26"));
    assert!(!c.has(Kind::BlockAffinity, "n1-192-168-0-64-26"));
    assert!(c.has(Kind::IpamBlock, "192-168-0-0-26"));
    // Now the remaining block empties: it is the node's last and stays.
    c.index.delete_pod("ns", "p");
    for _ in 0..4 {
        c.cycle(10);
    }
    assert!(c.has(Kind::IpamBlock, "192-168-0-0-26"));
    assert!(c.allocated("192.168.0.0/26").is_empty());
}

#[test]
fn four_of_five_tiny_empty_blocks_are_released() {
    let mut c = Cluster::new(1);
    c.index.apply_node(&node("n1"));
    for i in 0..5 {
        c.block(&format!("192.168.0.{}/31", i * 2), Some("n1"), &[]);
    }
    c.cycle(0);
    c.cycle(2);
    let left = (0..5).filter(|i| c.has(Kind::IpamBlock, &format!("192-168-0-{}-31", i * 2))).count();
    assert_eq!(left, 1);
}

#[test]
fn deleting_a_node_with_pods_still_present_releases_nothing_until_the_pods_go() {
    let mut c = Cluster::new(60);
    c.index.apply_pod(&running("ns", "p1", "n1", &["192.168.0.1"]));
    c.block(
        "192.168.0.0/26",
        Some("n1"),
        &[A { ord: 0, handle: "ipip-tunnel-addr-n1", attrs: json!({"node": "n1", "type": "ipipTunnelAddress"}) }, pod_attr(1, "h1", "ns", "p1", "n1")],
    );
    // n1 was never created / is deleted.
    c.cycle(0);
    c.cycle(1);
    assert_eq!(c.allocated("192.168.0.0/26"), vec![0, 1]);
    assert!(c.has(Kind::BlockAffinity, "n1-192-168-0-0-26"));
    c.index.delete_pod("ns", "p1");
    c.cycle(1);
    assert!(!c.has(Kind::IpamBlock, "192-168-0-0-26"), "emptied block of the deleted node is removed");
    assert!(!c.has(Kind::BlockAffinity, "n1-192-168-0-0-26"));
    assert!(!c.has(Kind::IpamHandle, "ipip-tunnel-addr-n1"));
}

#[test]
fn a_deleted_nodes_block_holding_another_nodes_borrowed_ip_keeps_its_affinity_until_that_ip_is_released() {
    let mut c = Cluster::new(15);
    c.index.apply_node(&node("n2"));
    c.index.apply_pod(&running("ns", "b", "n2", &["192.168.0.5"]));
    c.block("192.168.0.0/26", Some("n1"), &[pod_attr(5, "hb", "ns", "b", "n2"), pod_attr(6, "hx", "ns", "x", "n1")]);
    let out = c.cycle(0);
    assert_eq!(c.allocated("192.168.0.0/26"), vec![5], "the deleted node's pod IP goes at once, the borrowed one stays");
    // Upstream's mustBeEmpty: a block that is not empty keeps its affinity, and so does the node.
    assert_eq!(out.blocks_held, vec![("n1".to_string(), "192.168.0.0/26".parse().unwrap())]);
    assert_eq!(out.nodes_released, 0);
    assert!(c.has(Kind::BlockAffinity, "n1-192-168-0-0-26"));
    let b: IpamBlock = c.ds.peek(Kind::IpamBlock, "192-168-0-0-26").unwrap().decode().unwrap();
    assert_eq!(b.spec.affinity.as_deref(), Some("host:n1"), "the block stays affine to the deleted node");
    // n2's pod goes; its address is released after the grace period, and the retried node
    // release then finds the block empty: block and affinity go.
    c.index.delete_pod("ns", "b");
    c.cycle(1);
    c.cycle(16);
    c.cycle(1);
    assert!(!c.has(Kind::IpamBlock, "192-168-0-0-26"), "the emptied block is deleted");
    assert!(!c.has(Kind::BlockAffinity, "n1-192-168-0-0-26"), "with the node's affinity");
}

#[test]
fn a_writer_bumping_the_block_between_scan_and_release_loses_nothing() {
    let mut c = Cluster::new(1);
    c.index.apply_node(&node("n1"));
    c.block("192.168.0.0/26", Some("n1"), &[pod_attr(2, "h2", "ns", "gone2", "n1"), pod_attr(3, "h3", "ns", "gone3", "n1")]);
    c.cycle(0);
    // Just before our write, the CNI reallocates ordinal 3 to a new pod (new handle, new sequence).
    c.ds.bump_before(Op::Update, Kind::IpamBlock, "192-168-0-0-26", |v| {
        let idx = v["spec"]["attributes"].as_array().unwrap().len();
        v["spec"]["attributes"].as_array_mut().unwrap().push(json!({"handle_id": "h-new", "secondary": {"namespace": "ns", "pod": "new", "node": "n1"}}));
        v["spec"]["allocations"][3] = json!(idx);
        v["spec"]["sequenceNumberForAllocation"]["3"] = json!(9999);
    });
    c.index.apply_pod(&running("ns", "new", "n1", &["192.168.0.3"]));
    let out = c.cycle(2);
    assert_eq!(c.allocated("192.168.0.0/26"), vec![3], "ordinal 2 released, the reallocated ordinal 3 kept");
    assert_eq!(out.released.len(), 1);
}

#[test]
fn one_failing_block_does_not_stall_another() {
    let mut c = Cluster::new(1);
    c.block("192.168.0.0/26", Some("n1"), &[pod_attr(1, "ha", "ns", "a", "n1")]);
    c.block("192.168.1.0/26", Some("n2"), &[pod_attr(1, "hb", "ns", "b", "n2")]);
    c.ds.inject(Some(Kind::IpamBlock), Some("192-168-0-0-26"), Op::Update, ErrorKind::Transient, 100);
    c.ds.inject(Some(Kind::IpamBlock), Some("192-168-0-0-26"), Op::Delete, ErrorKind::Transient, 100);
    let out = c.cycle(0);
    assert!(out.error_count() > 0);
    assert!(c.allocated("192.168.1.0/26").is_empty() && !c.has(Kind::IpamBlock, "192-168-1-0-26"), "n2's block is cleaned");
    assert_eq!(c.allocated("192.168.0.0/26"), vec![1], "n1's block failed and is retried later");
}

#[test]
fn a_handle_with_one_valid_address_is_released_all_or_none() {
    let mut c = Cluster::new(1);
    c.index.apply_node(&node("n1"));
    c.index.apply_pod(&running("ns", "p", "n1", &["192.168.0.1"]));
    c.block("192.168.0.0/26", Some("n1"), &[pod_attr(1, "h", "ns", "p", "n1")]);
    c.block("fd00::/122", Some("n1"), &[pod_attr(1, "h", "ns", "p", "n1")]);
    for _ in 0..3 {
        c.cycle(2);
    }
    assert_eq!(c.allocated("fd00::/122"), vec![1]);
    c.index.delete_pod("ns", "p");
    c.cycle(0);
    c.cycle(2);
    assert!(c.allocated("fd00::/122").is_empty() && c.allocated("192.168.0.0/26").is_empty());
    assert!(!c.has(Kind::IpamHandle, "h"));
}

#[test]
fn unknown_fields_on_a_block_survive_a_release() {
    let mut c = Cluster::new(1);
    c.index.apply_node(&node("n1"));
    let mut v = block_value("192.168.0.0/26", Some("n1"), &[pod_attr(2, "h", "ns", "gone", "n1")]);
    v["spec"]["futureField"] = json!({"keep": true});
    c.ds.create_now(Kind::IpamBlock, "192-168-0-0-26", v).unwrap();
    c.cycle(0);
    c.cycle(2);
    let s = c.ds.peek(Kind::IpamBlock, "192-168-0-0-26").unwrap();
    assert!(c.allocated("192.168.0.0/26").is_empty());
    assert_eq!(s.value["spec"]["futureField"]["keep"], true);
}
