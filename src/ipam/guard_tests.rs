//! The mass-change guard inside the GC pass: what it holds, what lets it go, and that a held
//! node keeps its addresses and affinities. The guard's own rules are tested in `crate::guard`.

use std::collections::BTreeMap;

use super::plan::{HeldBy, Plan, Scope};
use super::tests::{block, node, pod, pod_alloc, World};
use crate::guard::GuardConfig;

const MIN: i64 = 60_000;
const T0: i64 = 1_800_000_000_000;
const GRACE: i64 = 15 * MIN;

/// `nodes` nodes n0…, each with a /26 block holding 10 running pods (10 addresses per node), the
/// guard on with its defaults.
fn cluster(nodes: usize) -> World {
    let mut w = World::new(15);
    w.cfg.guard = GuardConfig::default();
    for i in 0..nodes {
        let n = format!("n{i}");
        w.index.apply_node(&node(&n));
        let handles: Vec<String> = (0..10).map(|o| format!("h{i}-{o}")).collect();
        let pods: Vec<String> = (0..10).map(|o| format!("p{i}-{o}")).collect();
        let allocs: Vec<_> = (0..10).map(|o| pod_alloc(o as u32, &handles[o], "ns", &pods[o], &n)).collect();
        w.index.apply_block(&block(&format!("10.0.{i}.0/26"), Some(&n), &allocs)).unwrap();
        for (o, p) in pods.iter().enumerate() {
            w.index.apply_pod(&pod("ns", p, &n, &[&format!("10.0.{i}.{o}")]));
        }
    }
    w.index.check_invariants().unwrap();
    w
}

fn delete_pods_of(w: &mut World, nodes: std::ops::Range<usize>) {
    for i in nodes {
        for o in 0..10 {
            w.index.delete_pod("ns", &format!("p{i}-{o}"));
        }
    }
}

fn released(p: &Plan) -> usize {
    p.release_count()
}

fn held_by_guard(p: &Plan) -> usize {
    p.leaks.iter().filter(|l| l.held_by == Some(HeldBy::MassChangeGuard)).count()
}

#[test]
fn a_pass_releasing_more_than_a_fifth_of_all_addresses_waits_for_a_second_complete_observation() {
    let mut w = cluster(20);
    // 60 of 200 addresses (30%, and at least 50): a mass change.
    delete_pods_of(&mut w, 0..6);
    assert_eq!(released(&w.full(T0)), 0, "candidates first");
    let p = w.full(T0 + GRACE + 1);
    assert_eq!((released(&p), held_by_guard(&p)), (0, 60), "confirmed, but held by the guard");
    let held = w.gc.guard_held();
    assert_eq!((held.len(), held[0].scope.name, held[0].waiting, held[0].total), (1, "ipam-addresses", 60, 200));
    assert_eq!(released(&w.full(T0 + 2 * GRACE)), 0, "less than a grace period after the guard first saw them");
    w.cfg.view_complete = false;
    assert_eq!(released(&w.full(T0 + 3 * GRACE)), 0, "a pass over an unhealthy watch is no complete observation");
    w.cfg.view_complete = true;
    let (dirty, _) = w.index.take_dirty();
    assert_eq!(released(&w.pass(T0 + 3 * GRACE, Scope::Dirty(dirty), &BTreeMap::new())), 0, "nor is a dirty pass");
    let p = w.full(T0 + 3 * GRACE);
    assert_eq!((released(&p), held_by_guard(&p)), (60, 0), "the same set a grace period later goes");
    assert!(w.gc.guard_held().is_empty());
}

#[test]
fn a_proportionate_release_is_not_held() {
    let mut w = cluster(20);
    // 40 of 200 (20%, not more): no mass change.
    delete_pods_of(&mut w, 0..4);
    w.full(T0);
    assert_eq!(released(&w.full(T0 + GRACE + 1)), 40);
    // Under 50 addresses is never a mass change, whatever the share.
    let mut w = cluster(5);
    delete_pods_of(&mut w, 0..4);
    w.full(T0);
    assert_eq!(released(&w.full(T0 + GRACE + 1)), 40);
}

#[test]
fn an_operator_approval_releases_the_held_set_at_once() {
    let mut w = cluster(20);
    delete_pods_of(&mut w, 0..6);
    w.full(T0);
    w.full(T0 + GRACE + 1);
    let id = w.gc.guard_held()[0].id.clone();
    w.cfg.guard_approved = ["0123456789abcdef".to_string()].into();
    assert_eq!(released(&w.full(T0 + GRACE + 2)), 0, "another set's approval");
    w.cfg.guard_approved = [id].into();
    assert_eq!(released(&w.full(T0 + GRACE + 3)), 60);
}

#[test]
fn cleaning_more_than_a_fifth_of_the_nodes_waits_and_the_held_nodes_keep_their_addresses() {
    let mut w = cluster(20);
    // 6 of 20 nodes deleted (30%, at least 5): their 60 addresses would go at once.
    for i in 0..6 {
        w.index.delete_node(&format!("n{i}"));
    }
    delete_pods_of(&mut w, 0..6);
    w.cfg.guard.min_addresses = 1_000;
    let p = w.full(T0);
    assert!(p.nodes_to_release.is_empty(), "node cleanups held: {:?}", p.nodes_to_release);
    assert_eq!((released(&p), held_by_guard(&p)), (0, 60), "a held node's addresses wait with it");
    assert_eq!(w.gc.guard_held()[0].scope.name, "ipam-nodes");
    let p = w.full(T0 + GRACE);
    assert_eq!((p.nodes_to_release.len(), released(&p)), (6, 60));
}

#[test]
fn with_the_guard_off_a_mass_change_goes_at_once() {
    let mut w = cluster(20);
    w.cfg.guard = GuardConfig::OFF;
    for i in 0..10 {
        w.index.delete_node(&format!("n{i}"));
    }
    delete_pods_of(&mut w, 0..10);
    let p = w.full(T0);
    assert_eq!((p.nodes_to_release.len(), released(&p)), (10, 100));
}
