//! `execute_plan` on the memory backend: races, injected faults, and every plan section.

use serde_json::{Value, json};

use super::*;
use crate::datastore::{ErrorKind, MemoryDatastore, Op, block_on};
use crate::ipam::plan::ReleaseItem;
use crate::model::names::{affinity_name, cidr_to_name, handle_object_name, ordinal_to_ip};
use crate::model::time::parse_rfc3339;

/// One allocated ordinal: (ordinal, handle, node, sequence number).
type Slot<'a> = (u32, &'a str, &'a str, u64);

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn block_value(cidr: &str, affinity: Option<&str>, slots: &[Slot<'_>]) -> Value {
    let c = net(cidr);
    let size = crate::model::names::block_size(&c).unwrap() as usize;
    let mut allocations = vec![Value::Null; size];
    let mut attributes = Vec::new();
    let mut seqs = serde_json::Map::new();
    for (i, (ord, handle, node, seq)) in slots.iter().enumerate() {
        allocations[*ord as usize] = json!(i);
        let secondary = if *handle == WINDOWS_RESERVED_HANDLE {
            json!({"note": "windows reserved"})
        } else {
            json!({"namespace": "default", "pod": format!("pod-{handle}"), "node": node})
        };
        attributes.push(json!({"handle_id": handle, "secondary": secondary}));
        seqs.insert(ord.to_string(), json!(seq));
    }
    let unallocated: Vec<u32> = (0..size as u32).filter(|o| !slots.iter().any(|s| s.0 == *o)).collect();
    let mut spec = json!({
        "cidr": cidr, "strictAffinity": false, "allocations": allocations, "unallocated": unallocated,
        "attributes": attributes, "sequenceNumber": 100, "sequenceNumberForAllocation": seqs
    });
    if let Some(a) = affinity {
        spec["affinity"] = json!(a);
    }
    json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": cidr_to_name(&c)}, "spec": spec})
}

fn handle_value(handle: &str, blocks: &[(&str, u32)]) -> Value {
    let block: serde_json::Map<String, Value> = blocks.iter().map(|(c, n)| (c.to_string(), json!(n))).collect();
    json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": handle_object_name(handle)},
           "spec": {"handleID": handle, "block": block}})
}

fn affinity_value(node: &str, cidr: &str) -> Value {
    json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity", "metadata": {"name": affinity_name(node, &net(cidr))},
           "spec": {"state": "confirmed", "node": node, "cidr": cidr, "deleted": "false"}})
}

fn put(ds: &MemoryDatastore, kind: Kind, value: Value) -> Stored {
    let name = value["metadata"]["name"].as_str().unwrap().to_string();
    ds.create_now(kind, &name, value).unwrap()
}

fn release(cidr: &str, items: &[(u32, &str, u64)]) -> BlockRelease {
    let c = net(cidr);
    BlockRelease {
        cidr: c,
        block_name: cidr_to_name(&c),
        revision: String::new(),
        items: items
            .iter()
            .map(|(ord, handle, seq)| ReleaseItem {
                ordinal: *ord,
                ip: ordinal_to_ip(&c, *ord),
                handle: handle.to_string(),
                sequence: *seq,
                reason: LeakReason::PodNotFound,
            })
            .collect(),
    }
}

fn block_of(ds: &MemoryDatastore, cidr: &str) -> Option<IpamBlock> {
    ds.peek(Kind::IpamBlock, &cidr_to_name(&net(cidr))).map(|s| s.decode().unwrap())
}

fn run(ds: &MemoryDatastore, plan: &Plan) -> PlanOutcome {
    block_on(execute_plan(ds, plan, 1_000_000, 0, &ExecuteOptions::default()))
}

const A: &str = "10.0.0.0/29";
const B: &str = "10.0.0.8/29";

/// Node1's block A with two pods (h-a at 0, h-b at 1) and node2's pod h-c at 2, plus handles.
fn two_pod_block() -> MemoryDatastore {
    let ds = MemoryDatastore::new();
    put(&ds, Kind::IpamBlock, block_value(A, Some("host:node1"), &[(0, "h-a", "node1", 10), (1, "h-b", "node1", 11), (2, "h-c", "node2", 12)]));
    for h in ["h-a", "h-b", "h-c"] {
        put(&ds, Kind::IpamHandle, handle_value(h, &[(A, 1)]));
    }
    ds
}

/// What another CNI writer does: ordinal 0 freed and handed to a new pod at a new sequence number.
fn reallocate_ordinal_zero(v: &mut Value) {
    let spec = &mut v["spec"];
    let attrs = spec["attributes"].as_array_mut().unwrap();
    attrs.push(json!({"handle_id": "h-new", "secondary": {"namespace": "default", "pod": "new", "node": "node1"}}));
    let idx = attrs.len() - 1;
    spec["attributes"][0]["handle_id"] = json!("unused");
    spec["allocations"][0] = json!(idx);
    // The old attribute 0 is now unreferenced; drop it the way the library compacts.
    let attrs = spec["attributes"].as_array_mut().unwrap();
    attrs.remove(0);
    for a in spec["allocations"].as_array_mut().unwrap().iter_mut() {
        if let Some(n) = a.as_u64() {
            *a = json!(n - 1);
        }
    }
    spec["sequenceNumber"] = json!(101);
    spec["sequenceNumberForAllocation"]["0"] = json!(101);
}

#[test]
fn a_writer_reallocating_an_ordinal_between_plan_and_execute_loses_nothing() {
    let ds = two_pod_block();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10), (1, "h-b", 11)])], ..Plan::default() };
    ds.bump(Kind::IpamBlock, &cidr_to_name(&net(A)), reallocate_ordinal_zero).unwrap();
    let out = run(&ds, &plan);
    assert_eq!(out.released, vec![(net(A), 1)]);
    assert_eq!(out.stale, vec![(net(A), 0)], "the reallocated ordinal is reported, not released");
    assert_eq!(out.error_count(), 0, "{:?}", out.failures);
    let b = block_of(&ds, A).unwrap();
    let idx = b.spec.allocations[0].expect("new pod keeps its address") as usize;
    assert_eq!(b.spec.attributes[idx].handle_id.as_deref(), Some("h-new"));
    assert_eq!(b.spec.allocations[1], None);
    assert!(b.spec.allocations[2].is_some(), "node2's pod untouched");
    check_block(&b, 1_000_000).unwrap();
    assert!(ds.peek(Kind::IpamHandle, "h-b").is_none(), "h-b's only address freed: handle deleted");
    assert!(ds.peek(Kind::IpamHandle, "h-a").is_some(), "no release was made for h-a");
    assert_eq!(out.handles_deleted, 1);
    assert_eq!(out.released_by_reason.get(&LeakReason::PodNotFound), Some(&1));
}

#[test]
fn losing_the_race_at_write_time_rereads_and_skips_the_reallocated_ordinal() {
    let ds = two_pod_block();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10), (1, "h-b", 11)])], ..Plan::default() };
    // The other writer lands after our read, just before our CAS update.
    ds.bump_before(Op::Update, Kind::IpamBlock, &cidr_to_name(&net(A)), reallocate_ordinal_zero);
    let out = run(&ds, &plan);
    assert_eq!(out.conflicts, 1);
    assert_eq!(out.released, vec![(net(A), 1)]);
    assert_eq!(out.stale, vec![(net(A), 0)]);
    assert_eq!(out.error_count(), 0);
    let b = block_of(&ds, A).unwrap();
    assert!(b.spec.allocations[0].is_some() && b.spec.allocations[1].is_none());
    assert_eq!(ds.op_count(Op::Get, Kind::IpamBlock), 2, "one re-read after the conflict");
}

#[test]
fn injected_conflicts_are_retried_until_the_release_lands() {
    let ds = two_pod_block();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)])], ..Plan::default() };
    ds.inject(Some(Kind::IpamBlock), None, Op::Update, ErrorKind::Conflict, 2);
    let out = run(&ds, &plan);
    assert_eq!(out.conflicts, 2);
    assert_eq!(out.released, vec![(net(A), 0)]);
    assert_eq!(out.error_count(), 0);
    assert_eq!(out.blocks_updated, 1);
    assert!(block_of(&ds, A).unwrap().spec.allocations[0].is_none());
}

#[test]
fn endless_conflicts_give_the_block_up_for_this_pass_without_writing() {
    let ds = two_pod_block();
    let before = block_of(&ds, A).unwrap();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)])], ..Plan::default() };
    ds.inject(Some(Kind::IpamBlock), None, Op::Update, ErrorKind::Conflict, 100);
    let opts = ExecuteOptions { conflict_retries: 2, ..ExecuteOptions::default() };
    let out = block_on(execute_plan(&ds, &plan, 0, 0, &opts));
    assert_eq!(out.conflicts, 3);
    assert!(out.released.is_empty());
    assert_eq!(out.errors_by_category.get("conflict"), Some(&1));
    assert_eq!(out.failures[0].item, ItemRef::Release(net(A)));
    assert_eq!(block_of(&ds, A).unwrap(), before);
    assert!(ds.peek(Kind::IpamHandle, "h-a").is_some(), "handle untouched when the block write failed");
}

#[test]
fn a_transient_error_on_one_block_does_not_stop_another_blocks_release() {
    let ds = two_pod_block();
    put(&ds, Kind::IpamBlock, block_value(B, Some("host:node1"), &[(3, "h-d", "node1", 20)]));
    put(&ds, Kind::IpamHandle, handle_value("h-d", &[(B, 1)]));
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)]), release(B, &[(3, "h-d", 20)])], ..Plan::default() };
    ds.inject(Some(Kind::IpamBlock), Some(&cidr_to_name(&net(A))), Op::Get, ErrorKind::Transient, 1);
    let out = run(&ds, &plan);
    assert_eq!(out.released, vec![(net(B), 3)]);
    assert_eq!(out.errors_by_category.get("transient"), Some(&1));
    assert_eq!(out.failures.len(), 1);
    assert_eq!(out.failures[0].item, ItemRef::Release(net(A)));
    assert!(block_of(&ds, A).unwrap().spec.allocations[0].is_some());
    assert!(ds.peek(Kind::IpamHandle, "h-d").is_none());
}

#[test]
fn a_handle_write_failure_is_recorded_but_the_release_stands() {
    let ds = two_pod_block();
    put(&ds, Kind::IpamHandle, handle_value("h-x", &[]));
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10), (1, "h-b", 11)])], ..Plan::default() };
    ds.inject(Some(Kind::IpamHandle), Some("h-a"), Op::Patch, ErrorKind::Transient, 1);
    let out = run(&ds, &plan);
    assert_eq!(out.released.len(), 2);
    assert_eq!(out.failures.iter().map(|f| f.item.clone()).collect::<Vec<_>>(), vec![ItemRef::Handle("h-a".into())]);
    assert!(ds.peek(Kind::IpamHandle, "h-a").is_some(), "the failed handle is left for the orphan rule");
    assert!(ds.peek(Kind::IpamHandle, "h-b").is_none());
}

#[test]
fn handles_left_with_nothing_and_a_deleted_nodes_affinities_go_without_a_read() {
    let ds = two_pod_block();
    put(&ds, Kind::IpamBlock, block_value(B, Some("host:node9"), &[]));
    put(&ds, Kind::BlockAffinity, affinity_value("node9", B));
    let plan = Plan {
        releases: vec![release(A, &[(0, "h-a", 10), (1, "h-b", 11), (2, "h-c", 12)])],
        nodes_to_release: vec![node_plan("node9", &[B])],
        ..Plan::default()
    };
    let out = run(&ds, &plan);
    assert_eq!(out.error_count(), 0, "{:?}", out.failures);
    assert_eq!((out.handles_deleted, out.affinities_released, out.blocks_deleted, out.conflicts), (3, 1, 1, 0));
    assert_eq!(out.nodes_released, 1);
    assert!(block_of(&ds, B).is_none(), "the deleted node's empty block is gone");

    for h in ["h-a", "h-b", "h-c"] {
        assert!(ds.peek(Kind::IpamHandle, h).is_none(), "{h} deleted");
    }
    assert_eq!(ds.op_count(Op::Get, Kind::IpamHandle), 0, "a handle holding exactly the released addresses is not read");
    assert_eq!((ds.op_count(Op::Patch, Kind::IpamHandle), ds.op_count(Op::Delete, Kind::IpamHandle)), (3, 3));
    assert_eq!(ds.op_count(Op::Get, Kind::BlockAffinity), 0, "a deleted node's affinity is not read");
    assert!(ds.peek(Kind::BlockAffinity, &affinity_name("node9", &net(B))).is_none());
}

#[test]
fn handles_holding_other_addresses_are_decremented_and_missing_ones_ignored() {
    let ds = two_pod_block();
    ds.bump(Kind::IpamHandle, "h-a", |v| v["spec"]["block"]["10.9.0.0/29"] = json!(1)).unwrap();
    ds.delete_now(Kind::IpamHandle, "h-b", &Default::default()).unwrap();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10), (1, "h-b", 11)])], ..Plan::default() };
    let out = run(&ds, &plan);
    assert_eq!(out.error_count(), 0);
    assert_eq!(out.handles_updated, 1);
    assert_eq!(out.conflicts, 0, "a handle not left empty is no compare-and-swap conflict");
    let h: IpamHandle = ds.peek(Kind::IpamHandle, "h-a").unwrap().decode().unwrap();
    assert_eq!(h.spec.block.keys().collect::<Vec<_>>(), vec!["10.9.0.0/29"]);
}

#[test]
fn an_unaffine_block_emptied_by_release_is_deleted() {
    let ds = MemoryDatastore::new();
    put(&ds, Kind::IpamBlock, block_value(A, None, &[(4, "h-a", "gone", 10)]));
    let plan = Plan { releases: vec![release(A, &[(4, "h-a", 10)])], ..Plan::default() };
    let out = run(&ds, &plan);
    assert_eq!(out.blocks_deleted, 1);
    assert_eq!(out.released, vec![(net(A), 4)]);
    assert!(block_of(&ds, A).is_none());
}

#[test]
fn an_invalid_block_is_never_written() {
    let ds = two_pod_block();
    // Someone else left a cooldown attribute stamped in the future.
    ds.bump(Kind::IpamBlock, &cidr_to_name(&net(A)), |v| {
        v["spec"]["attributes"].as_array_mut().unwrap().push(json!({"releasedAt": "2999-01-01T00:00:00Z"}));
        v["spec"]["allocations"][5] = json!(3);
        v["spec"]["unallocated"] = json!([3, 4, 6, 7]);
    })
    .unwrap();
    let before = block_of(&ds, A).unwrap();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)])], ..Plan::default() };
    let out = run(&ds, &plan);
    assert_eq!(out.errors_by_category.get("invalid"), Some(&1));
    assert!(out.released.is_empty());
    assert_eq!(block_of(&ds, A).unwrap(), before);
}

fn empty_block_plan(releasable: bool) -> Plan {
    Plan {
        empty_blocks: vec![EmptyBlockRecord {
            cidr: net(B),
            block_name: cidr_to_name(&net(B)),
            node: "node1".into(),
            revision: String::new(),
            releasable,
            held_by: None,
        }],
        ..Plan::default()
    }
}

fn node1_with_an_empty_block() -> MemoryDatastore {
    let ds = two_pod_block();
    put(&ds, Kind::IpamBlock, block_value(B, Some("host:node1"), &[]));
    put(&ds, Kind::BlockAffinity, affinity_value("node1", A));
    put(&ds, Kind::BlockAffinity, affinity_value("node1", B));
    ds
}

#[test]
fn an_empty_block_is_released_in_two_steps() {
    let ds = node1_with_an_empty_block();
    let out = run(&ds, &empty_block_plan(true));
    assert_eq!(out.error_count(), 0, "{:?}", out.failures);
    assert_eq!((out.blocks_deleted, out.affinities_released), (1, 1));
    assert!(block_of(&ds, B).is_none());
    assert!(ds.peek(Kind::BlockAffinity, &affinity_name("node1", &net(B))).is_none());
    assert!(ds.peek(Kind::BlockAffinity, &affinity_name("node1", &net(A))).is_some(), "the other block's affinity stays");
    // pendingDeletion, then the soft-delete mark.
    assert_eq!(ds.op_count(Op::Update, Kind::BlockAffinity), 2);
}

#[test]
fn the_affinity_is_marked_pending_deletion_before_the_block_goes() {
    let ds = node1_with_an_empty_block();
    // The block's soft-delete mark fails: the first step must already have happened.
    ds.inject(Some(Kind::IpamBlock), None, Op::Update, ErrorKind::Transient, 1);
    let out = run(&ds, &empty_block_plan(true));
    assert_eq!(out.failures.len(), 1);
    assert_eq!(out.failures[0].item, ItemRef::EmptyBlock(net(B)));
    assert!(block_of(&ds, B).is_some());
    let aff = ds.peek(Kind::BlockAffinity, &affinity_name("node1", &net(B))).unwrap();
    assert_eq!(aff.value["spec"]["state"], STATE_PENDING_DELETION);
    // The next pass finishes the job.
    let out = run(&ds, &empty_block_plan(true));
    assert_eq!((out.blocks_deleted, out.affinities_released, out.error_count()), (1, 1, 0));
}

#[test]
fn an_empty_block_that_gained_an_allocation_is_kept_with_its_affinity_confirmed() {
    let ds = node1_with_an_empty_block();
    ds.bump_before(Op::Get, Kind::IpamBlock, &cidr_to_name(&net(B)), |v| {
        v["spec"]["attributes"] = json!([{"handle_id": "h-late", "secondary": {"namespace": "default", "pod": "late", "node": "node1"}}]);
        v["spec"]["allocations"][0] = json!(0);
        v["spec"]["unallocated"] = json!([1, 2, 3, 4, 5, 6, 7]);
    });
    let out = run(&ds, &empty_block_plan(true));
    assert_eq!(out.error_count(), 0);
    assert_eq!((out.empty_blocks_kept, out.blocks_deleted, out.affinities_released), (1, 0, 0));
    assert!(block_of(&ds, B).unwrap().spec.allocations[0].is_some());
    let aff = ds.peek(Kind::BlockAffinity, &affinity_name("node1", &net(B))).unwrap();
    assert_eq!(aff.value["spec"]["state"], "confirmed");
}

#[test]
fn empty_blocks_within_their_grace_period_are_left_alone() {
    let ds = node1_with_an_empty_block();
    let out = run(&ds, &empty_block_plan(false));
    assert_eq!(out.blocks_deleted, 0);
    assert!(block_of(&ds, B).is_some());
    assert_eq!(ds.op_count(Op::Get, Kind::BlockAffinity), 0);
}

fn node_plan(node: &str, cidrs: &[&str]) -> NodeRelease {
    NodeRelease {
        node: node.into(),
        affinities: cidrs.iter().map(|c| (affinity_name(node, &net(c)), net(c))).collect(),
        blocks: cidrs.iter().map(|c| (cidr_to_name(&net(c)), net(c))).collect(),
        held: Vec::new(),
    }
}

#[test]
fn node_release_keeps_a_block_holding_another_nodes_ip_with_its_affinity_and_reports_it_held() {
    let ds = MemoryDatastore::new();
    // Node1 is gone; its block A still holds node2's pod; its block B holds only Windows' reserved addresses.
    put(&ds, Kind::IpamBlock, block_value(A, Some("host:node1"), &[(2, "h-c", "node2", 12)]));
    put(&ds, Kind::IpamBlock, block_value(B, Some("host:node1"), &[(0, WINDOWS_RESERVED_HANDLE, "", 1), (7, WINDOWS_RESERVED_HANDLE, "", 1)]));
    put(&ds, Kind::BlockAffinity, affinity_value("node1", A));
    put(&ds, Kind::BlockAffinity, affinity_value("node1", B));
    let before_a = block_of(&ds, A).unwrap();
    let plan = Plan { nodes_to_release: vec![node_plan("node1", &[A, B])], ..Plan::default() };
    let out = run(&ds, &plan);
    assert_eq!(out.error_count(), 0, "a held block is no write error: {:?}", out.failures);
    // Upstream's mustBeEmpty: the non-empty block keeps its affinity, the node is not released.
    assert_eq!((out.nodes_released, out.blocks_deleted, out.affinities_released), (0, 1, 1));
    assert_eq!(out.blocks_held, vec![("node1".to_string(), net(A))]);
    assert!(out.released.is_empty(), "a node release never releases an address");
    assert_eq!(block_of(&ds, A).unwrap(), before_a, "block A is untouched, affinity and all");
    assert!(ds.peek(Kind::BlockAffinity, &affinity_name("node1", &net(A))).is_some(), "and so is the node's affinity for it");
    assert!(block_of(&ds, B).is_none(), "a block of reserved addresses only counts as empty");
    assert!(ds.peek(Kind::BlockAffinity, &affinity_name("node1", &net(B))).is_none());
    // Node2's pod goes: the retried release empties the node.
    ds.bump(Kind::IpamBlock, &cidr_to_name(&net(A)), |v| {
        v["spec"]["allocations"][2] = json!(null);
        v["spec"]["attributes"] = json!([]);
    });
    let again = run(&ds, &Plan { nodes_to_release: vec![node_plan("node1", &[A])], ..Plan::default() });
    assert_eq!((again.nodes_released, again.blocks_deleted, again.affinities_released, again.error_count()), (1, 1, 1, 0));
    assert!(again.blocks_held.is_empty());
    assert!(ds.snapshot(Kind::IpamBlock).is_empty() && ds.snapshot(Kind::BlockAffinity).is_empty());
}

#[test]
fn node_release_finds_blocks_by_their_stored_names() {
    let ds = MemoryDatastore::new();
    put(&ds, Kind::IpamBlock, block_value(A, Some("host:node1"), &[]));
    put(&ds, Kind::BlockAffinity, affinity_value("node1", A));
    // The plan names the block as the index stored it; the executor reads that name only.
    let mut plan = node_plan("node1", &[A]);
    plan.blocks = vec![("not-the-derived-name".to_string(), net(A))];
    let out = run(&ds, &Plan { nodes_to_release: vec![plan], ..Plan::default() });
    assert_eq!(ds.op_count(Op::Get, Kind::IpamBlock), 1);
    assert_eq!(out.blocks_deleted, 0, "nothing under that name: nothing deleted");
    assert!(block_of(&ds, A).is_some());
}

#[test]
fn a_block_claimed_by_another_node_is_not_touched_by_a_node_release() {
    let ds = MemoryDatastore::new();
    put(&ds, Kind::IpamBlock, block_value(A, Some("host:node2"), &[]));
    put(&ds, Kind::BlockAffinity, affinity_value("node1", A));
    let before = block_of(&ds, A).unwrap();
    let out = run(&ds, &Plan { nodes_to_release: vec![node_plan("node1", &[A])], ..Plan::default() });
    assert_eq!((out.nodes_released, out.affinities_released, out.blocks_deleted), (1, 1, 0));
    assert_eq!(block_of(&ds, A).unwrap(), before);
}

#[test]
fn a_failing_node_does_not_stall_the_next_node() {
    let ds = MemoryDatastore::new();
    put(&ds, Kind::IpamBlock, block_value(A, Some("host:node1"), &[]));
    put(&ds, Kind::IpamBlock, block_value(B, Some("host:node2"), &[]));
    put(&ds, Kind::BlockAffinity, affinity_value("node1", A));
    put(&ds, Kind::BlockAffinity, affinity_value("node2", B));
    ds.inject(Some(Kind::IpamBlock), Some(&cidr_to_name(&net(A))), Op::Get, ErrorKind::Transient, 1);
    let plan = Plan { nodes_to_release: vec![node_plan("node1", &[A]), node_plan("node2", &[B])], ..Plan::default() };
    let out = run(&ds, &plan);
    assert_eq!(out.nodes_released, 1);
    assert_eq!(out.failures.len(), 1);
    assert_eq!(out.failures[0].item, ItemRef::Node("node1".into()));
    assert!(block_of(&ds, A).is_some() && block_of(&ds, B).is_none());
    assert!(ds.peek(Kind::BlockAffinity, &affinity_name("node1", &net(A))).is_some(), "affinity kept while its block still claims the node");
    let again = run(&ds, &Plan { nodes_to_release: vec![node_plan("node1", &[A])], ..Plan::default() });
    assert_eq!((again.nodes_released, again.error_count()), (1, 0));
    assert!(ds.snapshot(Kind::BlockAffinity).is_empty());
}

fn orphan(stored: &Stored, handle: &str, releasable: bool) -> OrphanHandle {
    OrphanHandle {
        handle_id: handle.into(),
        object_name: stored.name.clone(),
        revision: stored.revision.clone(),
        uid: stored.uid.clone(),
        releasable,
    }
}

#[test]
fn an_orphan_handle_with_a_changed_uid_is_not_deleted() {
    let ds = MemoryDatastore::new();
    let gone = put(&ds, Kind::IpamHandle, handle_value("h-1", &[]));
    let kept = put(&ds, Kind::IpamHandle, handle_value("h-2", &[]));
    let young = put(&ds, Kind::IpamHandle, handle_value("h-3", &[]));
    let touched = put(&ds, Kind::IpamHandle, handle_value("h-4", &[]));
    ds.bump(Kind::IpamHandle, "h-4", |v| v["spec"]["block"][A] = json!(1)).unwrap();
    // Same revision string, another object: deleted and re-created by the CNI.
    let recreated = OrphanHandle { uid: "00000000-0000-4000-8000-ffffffffffff".into(), ..orphan(&kept, "h-2", true) };
    let plan = Plan {
        orphan_handles: vec![orphan(&gone, "h-1", true), recreated, orphan(&young, "h-3", false), orphan(&touched, "h-4", true)],
        ..Plan::default()
    };
    let out = run(&ds, &plan);
    assert_eq!(out.error_count(), 0);
    assert_eq!((out.handles_deleted, out.orphans_skipped), (1, 2));
    assert_eq!(ds.op_count(Op::Get, Kind::IpamHandle), 0, "the plan's revision and uid are checked by the write itself");
    assert!(ds.peek(Kind::IpamHandle, "h-1").is_none());
    for h in ["h-2", "h-3", "h-4"] {
        assert!(ds.peek(Kind::IpamHandle, h).is_some(), "{h} kept");
    }
}

#[test]
fn a_cooldown_release_is_collected_once_cold() {
    let ds = two_pod_block();
    let now = parse_rfc3339("2026-11-28T00:00:00Z").unwrap();
    let opts = ExecuteOptions::default();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)])], ..Plan::default() };
    let out = block_on(execute_plan(&ds, &plan, now, 60, &opts));
    assert_eq!(out.released, vec![(net(A), 0)]);
    let b = block_of(&ds, A).unwrap();
    let idx = b.spec.allocations[0].expect("cooling down, still allocated") as usize;
    assert_eq!(b.spec.attributes[idx].released_at.as_deref(), Some("2026-11-28T00:00:00Z"));
    assert!(ds.peek(Kind::IpamHandle, "h-a").is_none(), "the handle lets go at release time");

    let cold = Plan { cold_blocks: vec![ColdBlock { cidr: net(A), block_name: cidr_to_name(&net(A)), revision: String::new() }], ..Plan::default() };
    let early = block_on(execute_plan(&ds, &cold, now + 30_000, 60, &opts));
    assert_eq!(early.blocks_cooled, 0);
    assert!(block_of(&ds, A).unwrap().spec.allocations[0].is_some());
    let due = block_on(execute_plan(&ds, &cold, now + 60_000, 60, &opts));
    assert_eq!((due.blocks_cooled, due.error_count()), (1, 0));
    let b = block_of(&ds, A).unwrap();
    assert_eq!(b.spec.allocations[0], None);
    assert_eq!(b.spec.unallocated.last(), Some(&0));
    check_block(&b, now + 60_000).unwrap();
}

#[test]
fn a_cold_block_that_moved_on_is_reread_and_collected() {
    let ds = two_pod_block();
    let now = parse_rfc3339("2026-11-28T00:00:00Z").unwrap();
    let opts = ExecuteOptions::default();
    block_on(execute_plan(&ds, &Plan { releases: vec![release(A, &[(0, "h-a", 10)])], ..Plan::default() }, now, 60, &opts));
    ds.bump_before(Op::Update, Kind::IpamBlock, &cidr_to_name(&net(A)), |v| v["metadata"]["annotations"] = json!({"x": "y"}));
    let cold = Plan { cold_blocks: vec![ColdBlock { cidr: net(A), block_name: cidr_to_name(&net(A)), revision: String::new() }], ..Plan::default() };
    let out = block_on(execute_plan(&ds, &cold, now + 61_000, 60, &opts));
    assert_eq!((out.conflicts, out.blocks_cooled, out.error_count()), (1, 1, 0));
}

#[test]
fn execute_plan_is_send_so_it_runs_on_a_multi_threaded_runtime() {
    fn assert_send<T: Send>(_: &T) {}
    let ds = MemoryDatastore::new();
    let plan = Plan::default();
    let opts = ExecuteOptions::default();
    let fut = execute_plan(&ds, &plan, 0, 0, &opts);
    assert_send(&fut);
    assert_eq!(block_on(fut).error_count(), 0);
}

/// A `keep_going` that says yes `allowed` times, then no, and counts how often it was asked.
fn keep_going_for(allowed: usize) -> (ExecuteOptions, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let check = KeepGoing::new(move || counter.fetch_add(1, Ordering::SeqCst) < allowed);
    (ExecuteOptions { keep_going: Some(check), ..ExecuteOptions::default() }, asked)
}

#[test]
fn a_replica_that_may_not_write_executes_nothing_of_the_plan() {
    let ds = two_pod_block();
    let before = block_of(&ds, A).unwrap();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)])], ..Plan::default() };
    let (opts, _) = keep_going_for(0);
    let out = block_on(execute_plan(&ds, &plan, 1_000_000, 0, &opts));
    assert!(out.interrupted);
    assert!(out.released.is_empty() && out.failures.is_empty(), "{out:?}");
    assert_eq!(block_of(&ds, A).unwrap(), before);
    assert_eq!(ds.op_count(Op::Update, Kind::IpamBlock) + ds.op_count(Op::Get, Kind::IpamBlock), 0, "not even a read");
}

#[test]
fn losing_leadership_mid_plan_finishes_the_item_in_hand_and_starts_no_other() {
    let ds = two_pod_block();
    put(&ds, Kind::IpamBlock, block_value(B, Some("host:node1"), &[(3, "h-d", "node1", 20)]));
    put(&ds, Kind::IpamHandle, handle_value("h-d", &[(B, 1)]));
    let before_b = block_of(&ds, B).unwrap();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)]), release(B, &[(3, "h-d", 20)])], ..Plan::default() };
    // Yes for block A, no from block B on.
    let (opts, asked) = keep_going_for(1);
    let out = block_on(execute_plan(&ds, &plan, 1_000_000, 0, &opts));
    assert!(out.interrupted);
    assert_eq!(out.released, vec![(net(A), 0)]);
    assert!(ds.peek(Kind::IpamHandle, "h-a").is_none(), "A's item finished, handle included");
    assert_eq!(block_of(&ds, B).unwrap(), before_b, "B never started");
    assert!(ds.peek(Kind::IpamHandle, "h-d").is_some());
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2, "asked once per item, then never again");
}

#[test]
fn a_conflict_after_leadership_is_lost_is_not_retried() {
    let ds = two_pod_block();
    let before = block_of(&ds, A).unwrap();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10)])], ..Plan::default() };
    ds.inject(Some(Kind::IpamBlock), None, Op::Update, ErrorKind::Conflict, 1);
    let (opts, _) = keep_going_for(1);
    let out = block_on(execute_plan(&ds, &plan, 1_000_000, 0, &opts));
    assert_eq!(out.conflicts, 1);
    assert_eq!(ds.op_count(Op::Update, Kind::IpamBlock), 1, "no second attempt");
    assert_eq!(out.errors_by_category.get("conflict"), Some(&1));
    assert_eq!(block_of(&ds, A).unwrap(), before);
}

#[test]
fn without_a_keep_going_check_the_whole_plan_runs() {
    let ds = two_pod_block();
    let plan = Plan { releases: vec![release(A, &[(0, "h-a", 10), (1, "h-b", 11)])], ..Plan::default() };
    let out = run(&ds, &plan);
    assert!(!out.interrupted);
    assert_eq!(out.released.len(), 2);
}

mod assignment {
    use super::*;
    use crate::ipam::assign::{self, BlockWrite, Family, IpamView, LB_AFFINITY, LB_HOST, Owner, PoolInfo};
    use crate::model::block::AttrMap;

    const NOW: Millis = 1_780_000_000_000;

    fn pools() -> Vec<PoolInfo> {
        vec![PoolInfo { name: "lb".into(), cidr: net("192.0.2.0/24"), block_prefix: 30, usable: true, automatic: true }]
    }

    /// The stored blocks as the planner reads them.
    fn blocks(ds: &MemoryDatastore) -> BTreeMap<IpNet, (Stored, IpamBlock)> {
        ds.snapshot(Kind::IpamBlock).into_iter().map(|s| {
            let b: IpamBlock = s.decode().unwrap();
            (net(&b.spec.cidr), (s, b))
        }).collect()
    }

    fn plan(ds: &MemoryDatastore, owner: &Owner<'_>, specific: Option<&str>) -> (assign::Assignment, Option<Stored>) {
        let stored = blocks(ds);
        let typed: BTreeMap<IpNet, IpamBlock> = stored.iter().map(|(c, (_, b))| (*c, b.clone())).collect();
        let pools = pools();
        let view = IpamView { pools: &pools, blocks: &typed, reserved: &[], strict_affinity: false, max_blocks_per_host: 0 };
        let a = match specific {
            Some(ip) => assign::assign_ip(&view, owner, ip.parse().unwrap(), NOW).unwrap(),
            None => assign::auto_assign(&view, owner, Family::V4, None, NOW).unwrap(),
        };
        let read = stored.get(&a.block_cidr).map(|(s, _)| s.clone());
        (a, read)
    }

    fn handle_count(ds: &MemoryDatastore, id: &str, cidr: &str) -> Option<u32> {
        let h: IpamHandle = ds.peek(Kind::IpamHandle, &handle_object_name(id))?.decode().unwrap();
        h.spec.block.get(cidr).copied()
    }

    #[test]
    fn a_claim_writes_the_affinity_pending_then_the_handle_the_block_and_the_affinity_confirmed() {
        let ds = MemoryDatastore::new();
        let attrs = AttrMap::new([("service", "web"), ("namespace", "default"), ("type", "LoadBalancer")]);
        let owner = Owner { handle: "lb-Abc", attrs: &attrs, affinity: LB_AFFINITY };
        let opts = ExecuteOptions::default();
        let (a, read) = plan(&ds, &owner, None);
        assert!(matches!(a.write, BlockWrite::Create(_)) && read.is_none());
        assert_eq!(block_on(execute_assignment(&ds, &a, &owner, None, NOW, &opts)).unwrap().0, "192.0.2.0".parse::<std::net::IpAddr>().unwrap());
        let aff: BlockAffinity = ds.peek(Kind::BlockAffinity, &affinity_name(LB_HOST, &net("192.0.2.0/30"))).expect("the virtual affinity").decode().unwrap();
        assert_eq!((aff.spec.state.as_str(), aff.spec.node.as_str(), aff.spec.affinity_type.as_str()), ("confirmed", LB_HOST, "virtual"));
        assert_eq!(handle_count(&ds, "lb-Abc", "192.0.2.0/30"), Some(1), "the handle keeps its ID's case; its object name is lowercased");
        // The next address goes into the same block by compare-and-swap.
        let (b, read) = plan(&ds, &owner, None);
        assert!(matches!(b.write, BlockWrite::Update(_)));
        let (ip, written) = block_on(execute_assignment(&ds, &b, &owner, read.as_ref(), NOW, &opts)).unwrap();
        assert_eq!(ip, "192.0.2.1".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(Some(written), ds.peek(Kind::IpamBlock, "192-0-2-0-30"), "the block as written");
        assert_eq!(handle_count(&ds, "lb-Abc", "192.0.2.0/30"), Some(2));
        let (_, block) = &blocks(&ds)[&net("192.0.2.0/30")];
        assert!(crate::model::block::validate_block(block, NOW).is_empty());
        assert_eq!(block.spec.allocations, [Some(0), Some(0), None, None]);
    }

    #[test]
    fn a_block_that_moved_or_a_claim_lost_to_another_writer_leaves_nothing_behind() {
        let ds = MemoryDatastore::new();
        let attrs = AttrMap::new([("service", "web")]);
        let owner = Owner { handle: "lb-x", attrs: &attrs, affinity: LB_AFFINITY };
        let opts = ExecuteOptions::default();
        let (a, _) = plan(&ds, &owner, None);
        block_on(execute_assignment(&ds, &a, &owner, None, NOW, &opts)).unwrap();
        // Planned on a read the CNI then changed: refused, the handle's count given back.
        let (b, read) = plan(&ds, &owner, None);
        let (stored, mut block) = blocks(&ds).remove(&net("192.0.2.0/30")).unwrap();
        block.spec.sequence_number += 1;
        block_on(ds.update(Kind::IpamBlock, &stored.with_value(&block).unwrap())).unwrap();
        assert_eq!(block_on(execute_assignment(&ds, &b, &owner, read.as_ref(), NOW, &opts)).unwrap_err(), AssignWriteError::Moved(net("192.0.2.0/30")));
        assert_eq!(handle_count(&ds, "lb-x", "192.0.2.0/30"), Some(1));
        // A claim whose block someone else created meanwhile: no pending affinity, no handle count left.
        let (c, _) = plan(&ds, &owner, Some("192.0.2.9"));
        assert!(matches!(c.write, BlockWrite::Create(_)));
        block_on(ds.create(Kind::IpamBlock, &cidr_to_name(&net("192.0.2.8/30")), block_value("192.0.2.8/30", Some("host:n1"), &[]))).unwrap();
        assert_eq!(block_on(execute_assignment(&ds, &c, &owner, None, NOW, &opts)).unwrap_err(), AssignWriteError::Moved(net("192.0.2.8/30")));
        assert!(ds.peek(Kind::BlockAffinity, &affinity_name(LB_HOST, &net("192.0.2.8/30"))).is_none(), "the lost claim's affinity is deleted");
        assert_eq!(handle_count(&ds, "lb-x", "192.0.2.8/30"), None);
        assert_eq!(handle_count(&ds, "lb-x", "192.0.2.0/30"), Some(1));
        // A refused write (here a transient failure the block shows was not applied) also takes
        // back what it wrote; the address is not reported as taken.
        let (d, _) = plan(&ds, &owner, Some("192.0.2.13"));
        ds.inject(Some(Kind::IpamBlock), None, Op::Create, ErrorKind::Transient, 1);
        assert!(matches!(block_on(execute_assignment(&ds, &d, &owner, None, NOW, &opts)), Err(AssignWriteError::Failed(..))));
        assert!(ds.peek(Kind::BlockAffinity, &affinity_name(LB_HOST, &net("192.0.2.12/30"))).is_none());
        assert_eq!(handle_count(&ds, "lb-x", "192.0.2.12/30"), None);
        // An update against another block's read is refused before anything is written.
        let (e, _) = plan(&ds, &owner, None);
        let wrong = ds.peek(Kind::IpamBlock, &cidr_to_name(&net("192.0.2.8/30"))).unwrap();
        assert!(matches!(block_on(execute_assignment(&ds, &e, &owner, Some(&wrong), NOW, &opts)), Err(AssignWriteError::Failed(..))));
        assert_eq!(handle_count(&ds, "lb-x", "192.0.2.0/30"), Some(1));
    }
}
