//! Which parts of a plan may be executed now, and what an execution's outcome means for the
//! per-item backoff: pure functions over the plan, the backoff table and the set of items in
//! flight, so they are tested without a loop, a clock or a datastore.
//!
//! Owns: the due filter (items waiting out a backoff, or already in flight in the executor, are
//! left out), the write hold (nothing is written while a required watch fails or relists; no
//! orphan handle is deleted while a malformed block is known), the keys of a plan's executable
//! items, and the backoff bookkeeping after a plan ran.
//! Must not: decide what is garbage (the GC did), read the clock (callers pass `now`), or do I/O.

use std::borrow::Cow;
use std::collections::HashSet;

use crate::datastore::{ErrorKind, PlanOutcome};
use crate::ipam::index::IpamIndex;
use crate::ipam::plan::Plan;
use crate::model::time::Millis;
use crate::runtime::backoff::{ItemBackoff, ItemKey};
use crate::runtime::watch::Source;

/// What this round's writes wait on.
#[derive(Debug, Default, Clone)]
pub struct WriteHold {
    /// Required sources whose view is not to be trusted now, with why
    /// ([`super::inputs::GcInputs::decisions_waiting`]).
    pub watches: Vec<(Source, String)>,
    /// IPAMBlocks known only as malformed.
    pub invalid_blocks: usize,
    /// Blocks marked deleted whose delete is not finished yet.
    pub soft_deleted_blocks: usize,
    /// `ClusterInformation/default` is missing after its watch listed, and this process would
    /// write (not a dry run): upstream writes nothing then.
    pub cluster_info_missing: bool,
}

impl WriteHold {
    /// Every decision rests on more than one kind (a release on pods, nodes and blocks; a node
    /// release on nodes, blocks and affinities; an empty block on blocks, affinities and pools;
    /// an orphan handle on blocks and handles), and a gone pod's release is confirmed against
    /// all of them: so any failing or relisting required watch holds every write, not only the
    /// decisions of its own kind.
    pub fn holds_everything(&self) -> bool {
        !self.watches.is_empty() || self.cluster_info_missing
    }

    /// A handle no readable block refers to may still be referred to by a malformed block (a
    /// live pod's allocation the index cannot see): deleting it would make the CNI's
    /// release-by-handle free nothing. Held while any malformed block is known, whatever its pool.
    ///
    /// Held too while any block marked deleted is not finished. The index ignores such a block,
    /// so every handle it names looks orphaned, yet until its second step the block is half
    /// there: the mark can still be taken back by its writer (then the block and its allocations
    /// are live again) and readers disagree on whether it exists. So no handle goes before the
    /// block is gone for good. Held globally rather than only for the handles it names: its body
    /// is a record of a writer that died mid-operation (what it names is not to be trusted), the
    /// state is short-lived (the leader finishes it in its next plan), and a wrong deletion is a
    /// leak for good while waiting costs one round.
    pub fn holds_orphan_handles(&self) -> bool {
        self.holds_everything() || self.invalid_blocks > 0 || self.soft_deleted_blocks > 0
    }

    /// The readiness reason naming what the decisions wait on.
    pub fn reason(&self) -> String {
        let mut parts = Vec::new();
        if self.cluster_info_missing {
            parts.push("GC writes paused: ClusterInformation default does not exist".to_string());
        }
        if !self.watches.is_empty() {
            let watches: Vec<String> = self.watches.iter().map(|(s, why)| format!("{} ({why})", s.as_str())).collect();
            parts.push(format!("GC decisions wait for the watches of: {}", watches.join(", ")));
        }
        parts.join("; ")
    }
}

/// The part of `due` that `hold` lets through, and how many executable items it held.
pub fn without_held<'p>(due: Cow<'p, Plan>, hold: &WriteHold) -> (Cow<'p, Plan>, usize) {
    if hold.holds_everything() {
        let held = executable_keys(&due).count();
        if held == 0 {
            return (due, 0);
        }
        // The leak records stay with the pass's own plan (the report); nothing executable is left.
        return (Cow::Owned(Plan { full: due.full, ..Plan::default() }), held);
    }
    let orphans = due.orphan_handles.iter().filter(|o| o.releasable).count();
    if !hold.holds_orphan_handles() || orphans == 0 {
        return (due, 0);
    }
    let mut kept = due.into_owned();
    kept.orphan_handles.retain(|o| !o.releasable);
    (Cow::Owned(kept), orphans)
}

/// The keys of every item of `plan` that executing it would write.
pub fn executable_keys(plan: &Plan) -> impl Iterator<Item = ItemKey> + '_ {
    plan.releases
        .iter()
        .map(|r| ItemKey::Block(r.cidr))
        .chain(plan.cold_blocks.iter().map(|c| ItemKey::Block(c.cidr)))
        .chain(plan.soft_deleted_blocks.iter().map(|b| ItemKey::Block(b.cidr)))
        .chain(plan.empty_blocks.iter().filter(|e| e.releasable).map(|e| ItemKey::Block(e.cidr)))
        .chain(plan.nodes_to_release.iter().map(|n| ItemKey::Node(n.node.clone())))
        .chain(plan.orphan_handles.iter().filter(|o| o.releasable).map(|o| ItemKey::Handle(o.handle_id.clone())))
}

/// Whether executing `plan` would write nothing.
pub fn plan_is_empty(plan: &Plan) -> bool {
    executable_keys(plan).next().is_none()
}

/// The part of `plan` whose items are neither waiting out a backoff nor in flight, and how many
/// were held back. With nothing to hold back the plan is returned as it is (no copy).
pub fn due_items<'p>(plan: &'p Plan, backoff: &ItemBackoff, in_flight: &HashSet<ItemKey>, now: Millis) -> (Cow<'p, Plan>, usize) {
    if backoff.is_empty() && in_flight.is_empty() {
        return (Cow::Borrowed(plan), 0);
    }
    let due = |k: ItemKey| !in_flight.contains(&k) && backoff.is_due(&k, now);
    // Only the executed parts are copied; the leak records stay behind.
    let filtered = Plan {
        full: plan.full,
        releases: plan.releases.iter().filter(|r| due(ItemKey::Block(r.cidr))).cloned().collect(),
        cold_blocks: plan.cold_blocks.iter().filter(|c| due(ItemKey::Block(c.cidr))).cloned().collect(),
        soft_deleted_blocks: plan.soft_deleted_blocks.iter().filter(|b| due(ItemKey::Block(b.cidr))).cloned().collect(),
        empty_blocks: plan.empty_blocks.iter().filter(|e| !e.releasable || due(ItemKey::Block(e.cidr))).cloned().collect(),
        nodes_to_release: plan.nodes_to_release.iter().filter(|n| due(ItemKey::Node(n.node.clone()))).cloned().collect(),
        orphan_handles: plan.orphan_handles.iter().filter(|o| !o.releasable || due(ItemKey::Handle(o.handle_id.clone()))).cloned().collect(),
        ..Plan::default()
    };
    let held = (plan.releases.len() - filtered.releases.len())
        + (plan.cold_blocks.len() - filtered.cold_blocks.len())
        + (plan.soft_deleted_blocks.len() - filtered.soft_deleted_blocks.len())
        + (plan.empty_blocks.len() - filtered.empty_blocks.len())
        + (plan.nodes_to_release.len() - filtered.nodes_to_release.len())
        + (plan.orphan_handles.len() - filtered.orphan_handles.len());
    (Cow::Owned(filtered), held)
}

/// Backoff bookkeeping after a plan ran: transient and invalid failures wait per item (the
/// apiserver is struggling or the object is broken: asking again at once would not help),
/// conflicts do not (the next round re-reads), a node kept for its non-empty blocks waits too,
/// everything else executed starts afresh. Items the
/// index no longer knows are forgotten. Returns the nodes whose IPAM was released.
pub fn record_item_results(backoff: &mut ItemBackoff, index: &IpamIndex, executed: &Plan, outcome: &PlanOutcome, now: Millis) -> HashSet<String> {
    let backs_off = |category: &str| category == ErrorKind::Transient.category() || category == ErrorKind::Invalid.category();
    let mut failed: HashSet<ItemKey> = HashSet::new();
    for f in &outcome.failures {
        let key = ItemKey::of(&f.item);
        if backs_off(f.category) {
            backoff.failed(key.clone(), now);
        }
        failed.insert(key);
    }
    // A deleted node whose blocks still hold addresses is retried with a backoff, as a failure
    // (upstream's `work remaining`): the pod rules release those addresses meanwhile.
    for (node, _) in &outcome.blocks_held {
        let key = ItemKey::Node(node.clone());
        if failed.insert(key.clone()) {
            backoff.failed(key, now);
        }
    }
    for key in executable_keys(executed) {
        if !failed.contains(&key) {
            backoff.succeeded(&key);
        }
    }
    // Blocks that no longer exist, nodes without IPAM and handles nobody knows have nothing
    // left to retry.
    backoff.retain(|k| match k {
        ItemKey::Block(c) => index.block_slot(c).is_some(),
        ItemKey::Node(n) => index.strings().lookup(n).is_some_and(|s| !index.host_blocks(s).is_empty() || index.allocations_of_node(s).is_some()),
        ItemKey::Handle(h) => index.handle_id(h).is_some_and(|s| index.handle(s).is_some() || !index.allocations_of_handle(s).is_empty()),
    });
    executed.nodes_to_release.iter().filter(|n| !failed.contains(&ItemKey::Node(n.node.clone()))).map(|n| n.node.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{ItemFailure, ItemRef};
    use crate::ipam::plan::{BlockRelease, NodeRelease, OrphanHandle};

    fn plan() -> Plan {
        Plan {
            releases: vec![
                BlockRelease { cidr: "10.0.0.0/30".parse().unwrap(), block_name: "10-0-0-0-30".into(), revision: "1".into(), items: Vec::new() },
                BlockRelease { cidr: "10.0.0.4/30".parse().unwrap(), block_name: "10-0-0-4-30".into(), revision: "1".into(), items: Vec::new() },
            ],
            nodes_to_release: vec![NodeRelease { node: "gone".into(), affinities: Vec::new(), blocks: Vec::new(), held: Vec::new() }],
            ..Plan::default()
        }
    }

    #[test]
    fn items_in_flight_and_items_backing_off_are_held_back_and_the_rest_is_due() {
        let p = plan();
        let mut backoff = ItemBackoff::default();
        let (due, held) = due_items(&p, &backoff, &HashSet::new(), 0);
        assert!(matches!(due, Cow::Borrowed(_)) && held == 0, "nothing to hold back: no copy");
        backoff.failed(ItemKey::Node("gone".into()), 0);
        let in_flight: HashSet<ItemKey> = [ItemKey::Block("10.0.0.0/30".parse().unwrap())].into();
        let (due, held) = due_items(&p, &backoff, &in_flight, 1);
        assert_eq!(held, 2);
        assert_eq!(due.releases.iter().map(|r| r.block_name.as_str()).collect::<Vec<_>>(), ["10-0-0-4-30"]);
        assert!(due.nodes_to_release.is_empty());
        assert!(!plan_is_empty(&due));
    }

    #[test]
    fn transient_failures_back_off_and_conflicts_do_not() {
        let p = plan();
        let outcome = PlanOutcome {
            failures: vec![
                ItemFailure { item: ItemRef::Release("10.0.0.0/30".parse().unwrap()), category: "transient", message: String::new() },
                ItemFailure { item: ItemRef::Release("10.0.0.4/30".parse().unwrap()), category: "conflict", message: String::new() },
            ],
            ..PlanOutcome::default()
        };
        // Both blocks are still indexed, so what backs off stays in the table.
        let mut index = IpamIndex::new();
        for cidr in ["10.0.0.0/30", "10.0.0.4/30"] {
            let net: ipnet::IpNet = cidr.parse().unwrap();
            let block: crate::model::IpamBlock = serde_json::from_value(serde_json::json!({
                "metadata": {"name": crate::model::names::cidr_to_name(&net), "resourceVersion": "1"},
                "spec": {"cidr": cidr, "affinity": "host:gone", "strictAffinity": false, "allocations": [null, null, null, null],
                         "unallocated": [0, 1, 2, 3], "attributes": [], "sequenceNumber": 1, "deleted": false}
            }))
            .unwrap();
            index.apply_block(&block).unwrap();
        }
        let mut backoff = ItemBackoff::default();
        let released = record_item_results(&mut backoff, &index, &p, &outcome, 0);
        assert_eq!(released, HashSet::from(["gone".to_string()]), "the node's release went through");
        assert!(!backoff.is_due(&ItemKey::Block("10.0.0.0/30".parse().unwrap()), 1), "a transient failure waits out its backoff");
        assert!(backoff.is_due(&ItemKey::Block("10.0.0.4/30".parse().unwrap()), 1), "a conflict is retried by the next round");
        assert!(backoff.is_due(&ItemKey::Node("gone".into()), 1));
        // An empty index knows none of the items: the backoff forgets them all.
        record_item_results(&mut backoff, &IpamIndex::new(), &Plan::default(), &PlanOutcome::default(), 1);
        assert!(backoff.is_empty(), "items the index no longer knows have nothing to retry");
    }

    #[test]
    fn a_node_kept_for_its_non_empty_blocks_backs_off_and_is_not_released() {
        let p = plan();
        let cidr: ipnet::IpNet = "10.0.0.0/30".parse().unwrap();
        let outcome = PlanOutcome { blocks_held: vec![("gone".into(), cidr)], ..PlanOutcome::default() };
        let mut index = IpamIndex::new();
        let block: crate::model::IpamBlock = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "10-0-0-0-30", "resourceVersion": "1"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:gone", "strictAffinity": false, "allocations": [0, null, null, null],
                     "unallocated": [1, 2, 3], "attributes": [{"handle_id": "h", "secondary": {"namespace": "ns", "pod": "p", "node": "other"}}],
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        index.apply_block(&block).unwrap();
        let mut backoff = ItemBackoff::default();
        let released = record_item_results(&mut backoff, &index, &p, &outcome, 0);
        assert!(released.is_empty(), "its reclamation series stay: the node is not released yet");
        assert!(!backoff.is_due(&ItemKey::Node("gone".into()), 1), "retried after a backoff");
        assert!(backoff.is_due(&ItemKey::Node("gone".into()), crate::runtime::backoff::FIRST_DELAY));
    }

    fn with_orphan(mut p: Plan) -> Plan {
        let orphan = |id: &str, releasable| OrphanHandle { handle_id: id.into(), object_name: id.into(), revision: "1".into(), uid: "u".into(), releasable };
        p.orphan_handles = vec![orphan("old", true), orphan("young", false)];
        p
    }

    #[test]
    fn a_failing_or_relisting_watch_holds_every_write_and_names_itself() {
        let p = with_orphan(plan());
        let hold = WriteHold { watches: vec![(Source::Blocks, "relist in progress".into())], invalid_blocks: 0, ..WriteHold::default() };
        let (kept, held) = without_held(Cow::Borrowed(&p), &hold);
        assert_eq!(held, 4, "two block releases, a node release, an orphan handle");
        assert!(plan_is_empty(&kept));
        assert!(hold.reason().contains("ipamblocks (relist in progress)"), "{}", hold.reason());
        let (kept, held) = without_held(Cow::Borrowed(&p), &WriteHold::default());
        assert!(matches!(kept, Cow::Borrowed(_)) && held == 0, "nothing held in the normal case: no copy");
    }

    #[test]
    fn a_pending_soft_delete_holds_the_orphan_handle_deletions_and_is_itself_executable() {
        let mut p = with_orphan(plan());
        let cidr: ipnet::IpNet = "10.0.1.0/30".parse().unwrap();
        p.soft_deleted_blocks = vec![crate::ipam::plan::SoftDeletedBlock { cidr, block_name: "10-0-1-0-30".into(), revision: "5".into(), uid: "u".into() }];
        assert!(executable_keys(&p).any(|k| k == ItemKey::Block(cidr)), "finishing it is a write of its own");
        let hold = WriteHold { soft_deleted_blocks: 1, ..WriteHold::default() };
        let (kept, held) = without_held(Cow::Borrowed(&p), &hold);
        assert_eq!(held, 1, "only the orphan handle");
        assert!(kept.orphan_handles.iter().all(|o| !o.releasable));
        assert_eq!((kept.releases.len(), kept.soft_deleted_blocks.len()), (2, 1), "the rest goes ahead, the completion included");
    }

    #[test]
    fn a_malformed_block_holds_only_the_orphan_handle_deletions() {
        let p = with_orphan(plan());
        let hold = WriteHold { watches: Vec::new(), invalid_blocks: 1, ..WriteHold::default() };
        let (kept, held) = without_held(Cow::Borrowed(&p), &hold);
        assert_eq!(held, 1);
        assert_eq!((kept.releases.len(), kept.nodes_to_release.len()), (2, 1), "releases and node releases go ahead");
        assert!(kept.orphan_handles.iter().all(|o| !o.releasable), "no orphan handle is deleted");
        // Without an orphan due, nothing is copied.
        let no_orphans = plan();
        let (kept, held) = without_held(Cow::Borrowed(&no_orphans), &hold);
        assert!(matches!(kept, Cow::Borrowed(_)) && held == 0);
    }
}
