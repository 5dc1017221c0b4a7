//! The shell's write step: executes a GC [`Plan`] against any [`Datastore`], so the memory
//! backend (simulator, tests) and the Kubernetes backend (controller) share one implementation.
//!
//! Owns: the order of writes, compare-and-swap retries (every retry re-reads, so sequence numbers
//! are refreshed from the block and never retried blindly), the two-step empty-block release,
//! node release, orphan-handle deletion, the cold-IP backstop, and the per-item outcome.
//! Must not: decide what is garbage (the plan did), force a stale release, or let one failing
//! block, node or handle stop the others: every item's failure is recorded and the loop goes on.
//! The one early stop is [`ExecuteOptions::keep_going`] turning false (leadership lost).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use ipnet::IpNet;

use super::{Datastore, DatastoreError, DsResult, Expect, Kind, Precondition, Stored};
use crate::ipam::plan::{BlockRelease, ColdBlock, EmptyBlockRecord, LeakReason, NodeRelease, OrphanHandle, Plan, SoftDeletedBlock};
use crate::ipam::release::{HandleAction, apply_release, check_block, collect_cooled, release_from_handle};
use crate::model::affinity::STATE_PENDING_DELETION;
use crate::model::block::{Affinity, IpamBlockSpec, WINDOWS_RESERVED_HANDLE};
use crate::model::time::Millis;
use crate::model::{BlockAffinity, IpamBlock, IpamHandle};

/// Blocks (and nodes) written at once. Each item is a read-modify-CAS round trip; one at a time
/// a 200-node deletion (6,000 addresses, ~12k requests) took minutes at API latency alone. Items
/// never share a block (a plan has one release per block and one record per node); a handle
/// spanning two blocks may see a conflict, which the CAS retry absorbs. Bounded so the API
/// server sees a handful of writers, not a burst; the QPS bucket still limits the rate.
const PARALLEL_ITEMS: usize = 8;

/// Handles of one released block accounted at once (each of the `PARALLEL_ITEMS` blocks in
/// flight has its own), so a block's 30-60 handle writes do not go one round trip at a time.
const PARALLEL_HANDLES: usize = 4;

/// How hard to push one item before leaving it for the next pass.
#[derive(Debug, Clone)]
pub struct ExecuteOptions {
    /// Re-reads after a `Conflict` before an item is given up. Each retry works from a fresh read,
    /// so a few suffice against CNI churn; an object that keeps moving is simply picked up again
    /// by the next pass instead of spinning here (upstream tries 100 times per block).
    pub conflict_retries: u32,
    /// Refuse to write any block calicoctl's validator rejects, even one that was already broken
    /// before our change. On in debug builds and tests. Either way a block that was valid when read
    /// is never written back invalid: the validator runs on every write, and only a block someone
    /// else already broke (say, a `releasedAt` from a skewed clock) may still be cleaned.
    pub validate_writes: bool,
    /// Asked before each plan item and before each retry after a conflict; once it answers
    /// false, the rest of the plan is skipped (`PlanOutcome::interrupted`). The controller
    /// passes "still the leader" here, so a replica that lost its Lease stops writing mid-plan.
    /// The writes of an item already begun (a block release and its handle decrements) are
    /// finished, so no item is left half-done by the stop itself.
    pub keep_going: Option<KeepGoing>,
}

impl Default for ExecuteOptions {
    fn default() -> Self {
        ExecuteOptions { conflict_retries: 5, validate_writes: cfg!(debug_assertions), keep_going: None }
    }
}

impl ExecuteOptions {
    fn may_continue(&self) -> bool {
        self.keep_going.as_ref().is_none_or(|k| (k.0)())
    }
}

/// A cheap, synchronous "may I keep writing?" check (no I/O, no lock held for long).
#[derive(Clone)]
pub struct KeepGoing(Arc<dyn Fn() -> bool + Send + Sync>);

impl KeepGoing {
    pub fn new(check: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        KeepGoing(Arc::new(check))
    }
}

impl std::fmt::Debug for KeepGoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeepGoing(..)")
    }
}

/// Which plan item a failure belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemRef {
    /// A block of `Plan::releases`.
    Release(IpNet),
    /// A handle decremented after a release.
    Handle(String),
    EmptyBlock(IpNet),
    Node(String),
    OrphanHandle(String),
    ColdBlock(IpNet),
    /// A half soft-deleted block being finished.
    SoftDeletedBlock(IpNet),
}

impl ItemRef {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            ItemRef::Release(_) => "release",
            ItemRef::Handle(_) => "handle",
            ItemRef::EmptyBlock(_) => "empty_block",
            ItemRef::Node(_) => "node",
            ItemRef::OrphanHandle(_) => "orphan_handle",
            ItemRef::ColdBlock(_) => "cold_block",
            ItemRef::SoftDeletedBlock(_) => "soft_deleted_block",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    pub item: ItemRef,
    /// [`DatastoreError::category`].
    pub category: &'static str,
    pub message: String,
}

/// What executing one plan did.
#[derive(Debug, Clone, Default)]
pub struct PlanOutcome {
    /// Every address freed, as (block, ordinal), in plan order.
    pub released: Vec<(IpNet, u32)>,
    pub released_by_reason: BTreeMap<LeakReason, u64>,
    /// Planned addresses whose handle or sequence number had moved on: reallocated since the scan,
    /// never released.
    pub stale: Vec<(IpNet, u32)>,
    /// Planned addresses already free, cooling down, or in a block that no longer exists.
    pub already_free: u64,
    /// `Conflict` answers seen, retried ones included.
    pub conflicts: u64,
    /// Items given up for this pass, by [`DatastoreError::category`].
    pub errors_by_category: BTreeMap<&'static str, u64>,
    pub failures: Vec<ItemFailure>,
    pub blocks_updated: u64,
    pub blocks_deleted: u64,
    /// `(node, block)` of each deleted node's block kept because it still holds addresses
    /// (upstream's `mustBeEmpty`): the block and the node's affinity stay, the node is retried.
    pub blocks_held: Vec<(String, IpNet)>,
    /// Empty blocks found holding addresses again at the re-check; their affinity was restored.
    pub empty_blocks_kept: u64,
    pub blocks_cooled: u64,
    pub affinities_released: u64,
    pub handles_updated: u64,
    pub handles_deleted: u64,
    /// Orphan handles changed (or replaced) since the plan, therefore not deleted.
    pub orphans_skipped: u64,
    pub nodes_released: u64,
    /// Half soft-deleted blocks this plan finished (deleted under the revision and uid seen).
    pub soft_deletes_finished: u64,
    /// `keep_going` said stop: the items after that point were not attempted.
    pub interrupted: bool,
}

impl PlanOutcome {
    pub fn error_count(&self) -> u64 {
        self.errors_by_category.values().sum()
    }

    /// Adds another item's outcome to this one. Destructured field by field, so a new field
    /// cannot be forgotten here.
    fn absorb(&mut self, other: PlanOutcome) {
        let PlanOutcome {
            released,
            released_by_reason,
            stale,
            already_free,
            conflicts,
            errors_by_category,
            failures,
            blocks_updated,
            blocks_deleted,
            blocks_held,
            empty_blocks_kept,
            blocks_cooled,
            affinities_released,
            handles_updated,
            handles_deleted,
            orphans_skipped,
            nodes_released,
            soft_deletes_finished,
            interrupted,
        } = other;
        self.released.extend(released);
        for (reason, n) in released_by_reason {
            *self.released_by_reason.entry(reason).or_default() += n;
        }
        self.stale.extend(stale);
        self.already_free += already_free;
        self.conflicts += conflicts;
        for (category, n) in errors_by_category {
            *self.errors_by_category.entry(category).or_default() += n;
        }
        self.failures.extend(failures);
        self.blocks_updated += blocks_updated;
        self.blocks_deleted += blocks_deleted;
        self.blocks_held.extend(blocks_held);
        self.empty_blocks_kept += empty_blocks_kept;
        self.blocks_cooled += blocks_cooled;
        self.affinities_released += affinities_released;
        self.handles_updated += handles_updated;
        self.handles_deleted += handles_deleted;
        self.orphans_skipped += orphans_skipped;
        self.nodes_released += nodes_released;
        self.soft_deletes_finished += soft_deletes_finished;
        self.interrupted |= interrupted;
    }

    fn fail(&mut self, item: ItemRef, e: DatastoreError) {
        tracing::warn!(item = item.category(), target_item = ?item, category = e.category(), error = %e.message, "plan item failed");
        *self.errors_by_category.entry(e.category()).or_default() += 1;
        self.failures.push(ItemFailure { item, category: e.category(), message: e.message });
    }
}

/// Executes `plan`: half soft-deleted blocks, releases, the cold-IP backstop, empty blocks, node
/// releases, orphan handles, in that order (a node's last addresses are released before its
/// blocks are let go; a pending soft delete is finished before any handle is deleted).
pub async fn execute_plan<D: Datastore>(ds: &D, plan: &Plan, now: Millis, cooldown_secs: u32, opts: &ExecuteOptions) -> PlanOutcome {
    let mut out = PlanOutcome::default();
    // Checked before every item; `go` records the first refusal so the remaining sections are
    // skipped too.
    let go = |out: &mut PlanOutcome| {
        if !out.interrupted && !opts.may_continue() {
            out.interrupted = true;
            tracing::info!("plan execution stopped: no longer allowed to write");
        }
        !out.interrupted
    };
    for pending in &plan.soft_deleted_blocks {
        if !go(&mut out) {
            break;
        }
        if let Err(e) = finish_soft_delete(ds, pending, &mut out).await {
            out.fail(ItemRef::SoftDeletedBlock(pending.cidr), e);
        }
    }
    // Releases next, several blocks at once; outcomes are merged in plan order.
    let pending: Vec<_> = plan.releases.iter().map(|rel| release_one(ds, rel, now, cooldown_secs, opts)).collect();
    let releases: Vec<PlanOutcome> = futures::stream::iter(pending).buffered(PARALLEL_ITEMS).collect().await;
    for o in releases {
        out.absorb(o);
    }
    if out.interrupted {
        tracing::info!("plan execution stopped: no longer allowed to write");
    }
    for cold in &plan.cold_blocks {
        if !go(&mut out) {
            break;
        }
        if let Err(e) = collect_cold_block(ds, cold, now, cooldown_secs, opts, &mut out).await {
            out.fail(ItemRef::ColdBlock(cold.cidr), e);
        }
    }
    for rec in plan.empty_blocks.iter().filter(|r| r.releasable) {
        if !go(&mut out) {
            break;
        }
        if let Err(e) = release_empty_block(ds, rec, opts, &mut out).await {
            out.fail(ItemRef::EmptyBlock(rec.cidr), e);
        }
    }
    if go(&mut out) {
        let pending: Vec<_> = plan.nodes_to_release.iter().map(|node| release_node_one(ds, node, opts)).collect();
        let nodes: Vec<PlanOutcome> = futures::stream::iter(pending).buffered(PARALLEL_ITEMS).collect().await;
        for o in nodes {
            out.absorb(o);
        }
    }
    for orphan in plan.orphan_handles.iter().filter(|o| o.releasable) {
        if !go(&mut out) {
            break;
        }
        if let Err(e) = delete_orphan_handle(ds, orphan, &mut out).await {
            out.fail(ItemRef::OrphanHandle(orphan.handle_id.clone()), e);
        }
    }
    tracing::debug!(
        released = out.released.len(),
        stale = out.stale.len(),
        conflicts = out.conflicts,
        errors = out.error_count(),
        "plan executed"
    );
    out
}

/// One block's release as an outcome of its own, for running several at once.
async fn release_one<D: Datastore>(ds: &D, rel: &BlockRelease, now: Millis, cooldown_secs: u32, opts: &ExecuteOptions) -> PlanOutcome {
    let mut o = PlanOutcome::default();
    if !opts.may_continue() {
        o.interrupted = true;
        return o;
    }
    if let Err(e) = release_block(ds, rel, now, cooldown_secs, opts, &mut o).await {
        o.fail(ItemRef::Release(rel.cidr), e);
    }
    o
}

/// One node's release as an outcome of its own, for running several at once.
async fn release_node_one<D: Datastore>(ds: &D, node: &NodeRelease, opts: &ExecuteOptions) -> PlanOutcome {
    let mut o = PlanOutcome::default();
    if !opts.may_continue() {
        o.interrupted = true;
        return o;
    }
    if release_node(ds, node, opts, &mut o).await {
        o.nodes_released += 1;
    }
    o
}

/// Counts a conflict and says whether another attempt is allowed (not once writing must stop:
/// the conflict is then this item's failure, and the next item is not started).
fn retry_conflict(e: &DatastoreError, attempt: &mut u32, opts: &ExecuteOptions, out: &mut PlanOutcome) -> bool {
    if !e.is_conflict() {
        return false;
    }
    out.conflicts += 1;
    *attempt += 1;
    *attempt <= opts.conflict_retries && opts.may_continue()
}

fn validate(block: &IpamBlock, was_valid: bool, now: Millis, opts: &ExecuteOptions) -> DsResult<()> {
    if opts.validate_writes || was_valid {
        check_block(block, now).map_err(|p| DatastoreError::invalid(format!("refusing to write an invalid block: {p}")))?;
    }
    Ok(())
}

async fn release_block<D: Datastore>(
    ds: &D,
    rel: &BlockRelease,
    now: Millis,
    cooldown_secs: u32,
    opts: &ExecuteOptions,
    out: &mut PlanOutcome,
) -> DsResult<()> {
    let mut attempt = 0;
    let (result, cidr_text) = loop {
        let stored = match ds.get(Kind::IpamBlock, &rel.block_name).await {
            Err(e) if e.is_not_found() => {
                // The block went away with everything in it (upstream counts these as released;
                // we did not free them, so they are reported as already free).
                out.already_free += rel.items.len() as u64;
                return Ok(());
            }
            r => r?,
        };
        let mut block: IpamBlock = stored.decode()?;
        // Items are checked against this fresh read: after a conflict, an address reallocated in
        // the meantime no longer matches its planned handle and sequence number and is skipped.
        let was_valid = check_block(&block, now).is_ok();
        let result = apply_release(&mut block, &rel.items, now, cooldown_secs).map_err(|e| DatastoreError::invalid(e.to_string()))?;
        if !result.changed() {
            break (result, block.spec.cidr);
        }
        validate(&block, was_valid, now, opts)?;
        let next = stored.with_value(&block)?;
        let written = if result.delete_block {
            ds.soft_delete(Kind::IpamBlock, &next).await
        } else {
            ds.update(Kind::IpamBlock, &next).await.map(|_| ())
        };
        match written {
            Ok(()) => {
                if result.delete_block {
                    out.blocks_deleted += 1;
                } else {
                    out.blocks_updated += 1;
                }
                break (result, block.spec.cidr);
            }
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    };
    let reasons: BTreeMap<u32, LeakReason> = rel.items.iter().map(|i| (i.ordinal, i.reason)).collect();
    for ord in &result.released {
        out.released.push((rel.cidr, *ord));
        if let Some(r) = reasons.get(ord) {
            *out.released_by_reason.entry(*r).or_default() += 1;
        }
    }
    out.stale.extend(result.stale.iter().map(|o| (rel.cidr, *o)));
    out.already_free += result.already_free.len() as u64;
    if !result.stale.is_empty() {
        tracing::debug!(block = %rel.cidr, stale = result.stale.len(), "stale release items skipped");
    }
    // The block's handles are accounted a few at a time (each is its own object).
    let decrements: Vec<_> = result.handle_counts.iter().map(|(handle, count)| decrement_one(ds, handle, &cidr_text, *count, opts)).collect();
    let done: Vec<PlanOutcome> = futures::stream::iter(decrements).buffered(PARALLEL_HANDLES).collect().await;
    for o in done {
        out.absorb(o);
    }
    Ok(())
}

/// One handle's decrement as an outcome of its own, for running several at once.
async fn decrement_one<D: Datastore>(ds: &D, handle_id: &str, cidr: &str, count: u32, opts: &ExecuteOptions) -> PlanOutcome {
    let mut o = PlanOutcome::default();
    if let Err(e) = decrement_handle(ds, handle_id, cidr, count, opts, &mut o).await {
        o.fail(ItemRef::Handle(handle_id.to_string()), e);
    }
    o
}

/// Takes `count` addresses in `cidr` off the handle; deletes the handle when nothing is left.
async fn decrement_handle<D: Datastore>(ds: &D, handle_id: &str, cidr: &str, count: u32, opts: &ExecuteOptions, out: &mut PlanOutcome) -> DsResult<()> {
    let name = ds.handle_object_name(handle_id);
    // The usual case first: the release took every address the handle holds (a pod's one
    // address). Then the handle is deleted with no read, if it holds exactly these: the backend
    // checks that in the request that marks it. Anything else (a dual-stack pod's other
    // address, a count that moved, a concurrent writer) is a `Conflict` that writes nothing,
    // and the read-modify-write below accounts the handle as it really is.
    let only_these = Expect::spec("block", serde_json::json!({ cidr: count }));
    match ds.soft_delete_if(Kind::IpamHandle, &name, &Precondition::default(), &[only_these]).await {
        Ok(()) => {
            out.handles_deleted += 1;
            return Ok(());
        }
        // No handle object: nothing to account (old or hand-made allocations).
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) if e.is_conflict() => {}
        Err(e) => return Err(e),
    }
    let mut attempt = 0;
    loop {
        let stored = match ds.get(Kind::IpamHandle, &name).await {
            // No handle object: nothing to account (old or hand-made allocations).
            Err(e) if e.is_not_found() => return Ok(()),
            r => r?,
        };
        let mut handle: IpamHandle = stored.decode()?;
        let written = match release_from_handle(&mut handle, cidr, count) {
            HandleAction::Unchanged => return Ok(()),
            HandleAction::Update => ds.update(Kind::IpamHandle, &stored.with_value(&handle)?).await.map(|_| HandleAction::Update),
            HandleAction::Delete => ds.soft_delete(Kind::IpamHandle, &stored).await.map(|_| HandleAction::Delete),
        };
        match written {
            Ok(HandleAction::Delete) => {
                out.handles_deleted += 1;
                return Ok(());
            }
            Ok(_) => {
                out.handles_updated += 1;
                return Ok(());
            }
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn collect_cold_block<D: Datastore>(ds: &D, cold: &ColdBlock, now: Millis, cooldown_secs: u32, opts: &ExecuteOptions, out: &mut PlanOutcome) -> DsResult<()> {
    let mut attempt = 0;
    loop {
        let stored = match ds.get(Kind::IpamBlock, &cold.block_name).await {
            Err(e) if e.is_not_found() => return Ok(()),
            r => r?,
        };
        let mut block: IpamBlock = stored.decode()?;
        let was_valid = check_block(&block, now).is_ok();
        if !collect_cooled(&mut block, now, cooldown_secs).map_err(|e| DatastoreError::invalid(e.to_string()))? {
            return Ok(());
        }
        validate(&block, was_valid, now, opts)?;
        match ds.update(Kind::IpamBlock, &stored.with_value(&block)?).await {
            Ok(_) => {
                out.blocks_cooled += 1;
                return Ok(());
            }
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// No allocation other than Calico's pre-allocated Windows addresses (the library's "empty").
fn holds_only_reserved(spec: &IpamBlockSpec) -> bool {
    spec.allocations.iter().flatten().all(|a| {
        spec.attributes.get(*a as usize).and_then(|attr| attr.handle_id.as_deref()) == Some(WINDOWS_RESERVED_HANDLE)
    })
}

/// Sets the affinity's `state` under CAS, re-reading on conflict. `None` if the affinity is gone.
async fn set_affinity_state<D: Datastore>(ds: &D, name: &str, state: &str, opts: &ExecuteOptions, out: &mut PlanOutcome) -> DsResult<Option<Stored>> {
    let mut attempt = 0;
    loop {
        let stored = match ds.get(Kind::BlockAffinity, name).await {
            Err(e) if e.is_not_found() => return Ok(None),
            r => r?,
        };
        let mut affinity: BlockAffinity = stored.decode()?;
        if affinity.spec.state == state {
            return Ok(Some(stored));
        }
        affinity.spec.state = state.to_string();
        match ds.update(Kind::BlockAffinity, &stored.with_value(&affinity)?).await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Soft-deletes the object; on conflict re-reads and retries, but only while `still_wanted`
/// holds for the fresh version. Returns whether this call deleted it.
async fn delete_fresh<D: Datastore>(
    ds: &D,
    kind: Kind,
    first: Option<Stored>,
    name: &str,
    still_wanted: impl Fn(&Stored) -> bool + Send,
    opts: &ExecuteOptions,
    out: &mut PlanOutcome,
) -> DsResult<bool> {
    let mut attempt = 0;
    let mut current = first;
    loop {
        let stored = match current.take() {
            Some(s) => s,
            None => match ds.get(kind, name).await {
                Err(e) if e.is_not_found() => return Ok(false),
                r => r?,
            },
        };
        if !still_wanted(&stored) {
            return Ok(false);
        }
        match ds.soft_delete(kind, &stored).await {
            Ok(()) => return Ok(true),
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Upstream's two-step affinity release with `mustBeEmpty`: mark the affinity `pendingDeletion`
/// (so a concurrent claim backs off), delete the block only if it is still empty and still the
/// node's, then delete the affinity.
async fn release_empty_block<D: Datastore>(ds: &D, rec: &EmptyBlockRecord, opts: &ExecuteOptions, out: &mut PlanOutcome) -> DsResult<()> {
    let aff_name = ds.affinity_object_name(&rec.node, &rec.cidr);
    let marked = set_affinity_state(ds, &aff_name, STATE_PENDING_DELETION, opts, out).await?;
    let mut attempt = 0;
    loop {
        let stored = match ds.get(Kind::IpamBlock, &rec.block_name).await {
            Err(e) if e.is_not_found() => break,
            r => r?,
        };
        let block: IpamBlock = stored.decode()?;
        let ours = Affinity::parse(block.spec.affinity.as_deref()) == Affinity::Host(rec.node.clone());
        if !ours || block.spec.allocations.iter().any(Option::is_some) {
            // Someone allocated from it (or re-claimed it) since the scan. Upstream leaves the
            // affinity in pendingDeletion on this error; we restore it so the node keeps a usable
            // claim on a block it is using.
            out.empty_blocks_kept += 1;
            if marked.is_some() {
                set_affinity_state(ds, &aff_name, "confirmed", opts, out).await?;
            }
            return Ok(());
        }
        match ds.soft_delete(Kind::IpamBlock, &stored).await {
            Ok(()) => {
                out.blocks_deleted += 1;
                break;
            }
            Err(e) if e.is_not_found() => break,
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    }
    if marked.is_some() {
        let pending = |s: &Stored| s.value["spec"]["state"] == STATE_PENDING_DELETION;
        if delete_fresh(ds, Kind::BlockAffinity, marked, &aff_name, pending, opts, out).await? {
            out.affinities_released += 1;
        }
    }
    Ok(())
}

/// Lets go of a deleted node's blocks with upstream's `mustBeEmpty`: an empty block (nothing but
/// Windows' reserved addresses) is deleted; a block still holding addresses (another node's pod,
/// a cooling-down address) is left exactly as it is, affinity included, and so is the node's
/// affinity for it: it is recorded in `blocks_held` and the node's release is retried until
/// the block is empty. The node's other affinities are deleted. No address is ever released
/// here. Returns whether the node's IPAM is now released entirely.
async fn release_node<D: Datastore>(ds: &D, node: &NodeRelease, opts: &ExecuteOptions, out: &mut PlanOutcome) -> bool {
    let mut ok = true;
    let mut kept = BTreeSet::new();
    for (name, cidr) in &node.blocks {
        match let_go_of_block(ds, &node.node, name, opts, out).await {
            Ok(LetGo::Done) => {}
            Ok(LetGo::NotEmpty) => {
                ok = false;
                kept.insert(*cidr);
                out.blocks_held.push((node.node.clone(), *cidr));
            }
            Err(e) => {
                ok = false;
                kept.insert(*cidr);
                out.fail(ItemRef::Node(node.node.clone()), e);
            }
        }
    }
    // An affinity goes only after its block has let go of the node, so that a failure never
    // leaves a block claiming a node that has no affinity for it.
    for (name, _) in node.affinities.iter().filter(|(_, c)| !kept.contains(c)) {
        match delete_affinity(ds, name, opts, out).await {
            Ok(true) => out.affinities_released += 1,
            Ok(false) => {}
            Err(e) => {
                ok = false;
                out.fail(ItemRef::Node(node.node.clone()), e);
            }
        }
    }
    if ok {
        tracing::debug!(node = %node.node, "node's IPAM released");
    } else if !kept.is_empty() {
        tracing::info!(node = %node.node, blocks = kept.len(), "deleted node's blocks still hold addresses: kept with their affinities, retried");
    }
    ok
}

/// Deletes a released node's affinity whatever it holds: marked and deleted without a read
/// where the backend can; a write that raced another is retried from a fresh read.
async fn delete_affinity<D: Datastore>(ds: &D, name: &str, opts: &ExecuteOptions, out: &mut PlanOutcome) -> DsResult<bool> {
    match ds.soft_delete_if(Kind::BlockAffinity, name, &Precondition::default(), &[]).await {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) if e.is_conflict() => delete_fresh(ds, Kind::BlockAffinity, None, name, |_| true, opts, out).await,
        Err(e) => Err(e),
    }
}

/// What became of one block of a released node.
enum LetGo {
    /// Deleted, already gone, or no longer the node's.
    Done,
    /// Still holds addresses: kept as it is.
    NotEmpty,
}

async fn let_go_of_block<D: Datastore>(ds: &D, node: &str, name: &str, opts: &ExecuteOptions, out: &mut PlanOutcome) -> DsResult<LetGo> {
    let mut attempt = 0;
    loop {
        let stored = match ds.get(Kind::IpamBlock, name).await {
            Err(e) if e.is_not_found() => return Ok(LetGo::Done),
            r => r?,
        };
        let block: IpamBlock = stored.decode()?;
        if Affinity::parse(block.spec.affinity.as_deref()).host() != Some(node) {
            // Claimed by someone else (or nobody) since the scan: not ours to touch.
            return Ok(LetGo::Done);
        }
        if !holds_only_reserved(&block.spec) {
            // Upstream strips nothing here either (`mustBeEmpty`): the node stays affine until
            // the pod rules have released what the block holds.
            return Ok(LetGo::NotEmpty);
        }
        match ds.soft_delete(Kind::IpamBlock, &stored).await {
            Ok(()) => {
                out.blocks_deleted += 1;
                return Ok(LetGo::Done);
            }
            Err(e) if e.is_not_found() => return Ok(LetGo::Done),
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Finishes a half soft-deleted block as KDD readers do: deletes it only if it is still exactly
/// the version that was seen marked (same revision and uid). A conflict means someone rewrote
/// it since (took the mark back, or re-created the block): it is left alone, and the watch
/// shows what it is now.
async fn finish_soft_delete<D: Datastore>(ds: &D, pending: &SoftDeletedBlock, out: &mut PlanOutcome) -> DsResult<()> {
    let exact = Precondition { revision: Some(pending.revision.clone()), uid: Some(pending.uid.clone()).filter(|u| !u.is_empty()) };
    match ds.delete(Kind::IpamBlock, &pending.block_name, &exact).await {
        Ok(()) => {
            tracing::info!(block = %pending.cidr, "finished a block its deleter left marked deleted");
            out.soft_deletes_finished += 1;
            Ok(())
        }
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) if e.is_conflict() => {
            out.conflicts += 1;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Deletes an orphan handle only if it is exactly the object the plan saw: same uid (not
/// deleted and re-created by the CNI) and same revision (not touched since). A changed handle is
/// in use again and is left alone, never retried.
/// The check needs no read: the plan holds the revision and uid the watch saw.
async fn delete_orphan_handle<D: Datastore>(ds: &D, orphan: &OrphanHandle, out: &mut PlanOutcome) -> DsResult<()> {
    let exact = Precondition { revision: Some(orphan.revision.clone()), uid: Some(orphan.uid.clone()).filter(|u| !u.is_empty()) };
    // The plan names it as KDD would; the datastore knows its own name for the ID.
    match ds.soft_delete_if(Kind::IpamHandle, &ds.handle_object_name(&orphan.handle_id), &exact, &[]).await {
        Ok(()) => {
            out.handles_deleted += 1;
            Ok(())
        }
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) if e.is_conflict() => {
            out.orphans_skipped += 1;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

// -------------------------------------------------------------------------------------------------
// Assignment: the write of one address planned by `ipam::assign` (the LoadBalancer controller's).

/// Why a planned address was not written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssignWriteError {
    /// The block changed, or was claimed by someone else, since it was read: read again and
    /// plan again. Nothing of this attempt is left behind (the handle's count is given back, a
    /// pending affinity this attempt created is deleted).
    #[error("block {0} changed since it was read")]
    Moved(IpNet),
    #[error("block {0}: {1}")]
    Failed(IpNet, DatastoreError),
}

impl AssignWriteError {
    pub fn category(&self) -> &'static str {
        match self {
            AssignWriteError::Moved(_) => "conflict",
            AssignWriteError::Failed(_, e) => e.category(),
        }
    }
}

/// The BlockAffinity of a virtual owner (`virtual:<host>`) for `cidr`, in `state`.
fn virtual_affinity(name: &str, host: &str, cidr: &IpNet, state: &str) -> serde_json::Value {
    let version = if cidr.addr().is_ipv4() { "4" } else { "6" };
    serde_json::json!({
        "apiVersion": crate::model::CALICO_API_VERSION, "kind": crate::model::affinity::KIND,
        "metadata": {"name": name, "labels": {"projectcalico.org/affinity-type": "virtual", "projectcalico.org/ip-version": version, "projectcalico.org/hostname-hash": crate::model::names::hostname_hash(host)}},
        "spec": {"state": state, "node": host, "type": "virtual", "cidr": cidr.to_string(), "deleted": "false"}
    })
}

/// Adds one address in `cidr` to `handle_id`'s handle, creating it when missing.
async fn increment_handle<D: Datastore>(ds: &D, handle_id: &str, cidr: &str, opts: &ExecuteOptions, out: &mut PlanOutcome) -> DsResult<()> {
    let name = ds.handle_object_name(handle_id);
    let mut attempt = 0;
    loop {
        let written = match ds.get(Kind::IpamHandle, &name).await {
            Err(e) if e.is_not_found() => {
                let spec = crate::model::handle::IpamHandleSpec { handle_id: handle_id.to_string(), block: [(cidr.to_string(), 1)].into(), ..Default::default() };
                let handle = IpamHandle::new(crate::model::handle::KIND, &name, spec);
                let value = serde_json::to_value(&handle).map_err(|e| DatastoreError::invalid(e.to_string()))?;
                ds.create(Kind::IpamHandle, &name, value).await.map(|_| ())
            }
            Err(e) => return Err(e),
            Ok(stored) => {
                let mut handle: IpamHandle = stored.decode()?;
                if handle.spec.deleted {
                    return Err(DatastoreError::conflict(format!("handle {handle_id} is being deleted")));
                }
                handle.spec.block.add(cidr, 1);
                ds.update(Kind::IpamHandle, &stored.with_value(&handle)?).await.map(|_| ())
            }
        };
        match written {
            Ok(()) => {
                out.handles_updated += 1;
                return Ok(());
            }
            // Created or deleted meanwhile: read again.
            Err(e) if e.kind == super::ErrorKind::AlreadyExists || e.is_not_found() => {
                attempt += 1;
                if attempt > opts.conflict_retries {
                    return Err(e);
                }
            }
            Err(e) if retry_conflict(&e, &mut attempt, opts, out) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes one planned address in the CNI's order: for a claim the owner's BlockAffinity
/// (pending), then the handle's count, then the block (created for a claim, else a
/// compare-and-swap update of `read`, the stored block the plan was made from), then the claim's
/// affinity confirmed. A block that moved meanwhile gives [`AssignWriteError::Moved`] and takes
/// back what this attempt wrote. Returns the address and the block as written.
pub async fn execute_assignment<D: Datastore>(
    ds: &D,
    a: &crate::ipam::assign::Assignment,
    owner: &crate::ipam::assign::Owner<'_>,
    read: Option<&Stored>,
    now: Millis,
    opts: &ExecuteOptions,
) -> Result<(std::net::IpAddr, Stored), AssignWriteError> {
    use crate::ipam::assign::BlockWrite;
    let cidr = a.block_cidr;
    let fail = |e: DatastoreError| AssignWriteError::Failed(cidr, e);
    if !opts.may_continue() {
        return Err(fail(DatastoreError::invalid("no longer allowed to write")));
    }
    let block = a.write.block();
    validate(block, true, now, opts).map_err(fail)?;
    let host = owner.affinity.strip_prefix("virtual:").ok_or_else(|| fail(DatastoreError::invalid(format!("{:?} is not a virtual affinity", owner.affinity))))?;
    let affinity_name = ds.affinity_object_name(host, &cidr);
    let claim = matches!(a.write, BlockWrite::Create(_));
    let mut out = PlanOutcome::default();
    let mut created_affinity = false;
    if claim {
        match ds.create(Kind::BlockAffinity, &affinity_name, virtual_affinity(&affinity_name, host, &cidr, "pending")).await {
            Ok(_) => created_affinity = true,
            Err(e) if e.kind == super::ErrorKind::AlreadyExists => {
                // Ours from an earlier attempt, or another owner's of the same name: only ours is used.
                let stored = ds.get(Kind::BlockAffinity, &affinity_name).await.map_err(fail)?;
                let aff: BlockAffinity = stored.decode().map_err(fail)?;
                if aff.spec.node != host || aff.spec.affinity_type != "virtual" || aff.spec.cidr != cidr.to_string() || aff.spec.deleted {
                    return Err(AssignWriteError::Moved(cidr));
                }
            }
            Err(e) => return Err(fail(e)),
        }
    }
    let undo_affinity = |created: bool| {
        let name = affinity_name.clone();
        async move {
            if created
                && let Ok(stored) = ds.get(Kind::BlockAffinity, &name).await
                && let Err(e) = ds.delete(Kind::BlockAffinity, &name, &stored.exact()).await
            {
                tracing::warn!(affinity = %name, error = %e, "assignment: deleting the pending affinity of a lost claim failed");
            }
        }
    };
    if let Err(e) = increment_handle(ds, owner.handle, &cidr.to_string(), opts, &mut out).await {
        undo_affinity(created_affinity).await;
        return Err(fail(e));
    }
    let value = |b: &IpamBlock| serde_json::to_value(b).map_err(|e| DatastoreError::invalid(e.to_string()));
    let written = match &a.write {
        BlockWrite::Create(b) => match value(b) {
            Ok(v) => ds.create(Kind::IpamBlock, b.name(), v).await,
            Err(e) => Err(e),
        },
        BlockWrite::Update(b) => match read.filter(|r| r.name == b.name()) {
            Some(stored) => match stored.with_value(b) {
                Ok(s) => ds.update(Kind::IpamBlock, &s).await,
                Err(e) => Err(e),
            },
            None => Err(DatastoreError::invalid("an update needs the block as read")),
        },
    };
    // A write whose answer was lost (a timeout) may have been applied: the block says. Only a
    // definite refusal takes back the handle's count and the pending affinity.
    let written = match written {
        Err(e) if e.kind == super::ErrorKind::Transient => match ds.get(Kind::IpamBlock, block.name()).await {
            Ok(now) if holds(&now, &cidr, a.ip, owner.handle) => Ok(now),
            Ok(_) => Err(e),
            Err(g) if g.is_not_found() => Err(e),
            // Unknown: take nothing back; the next round's view and the GC's handle check settle it.
            Err(_) => return Err(fail(e)),
        },
        other => other,
    };
    let written = match written {
        Ok(stored) => stored,
        Err(e) => {
        if let Err(h) = decrement_handle(ds, owner.handle, &cidr.to_string(), 1, opts, &mut out).await {
            tracing::warn!(handle = owner.handle, error = %h, "assignment: giving back the handle's count failed; the GC's handle check reports it");
        }
        undo_affinity(created_affinity).await;
        return Err(if e.is_conflict() || e.is_not_found() || e.kind == super::ErrorKind::AlreadyExists { AssignWriteError::Moved(cidr) } else { fail(e) });
        }
    };
    // The address is taken whatever happens next: a pending affinity is confirmed by the next
    // claim of this block, and a caller must not assign again.
    if claim && let Err(e) = set_affinity_state(ds, &affinity_name, "confirmed", opts, &mut out).await {
        tracing::warn!(affinity = %affinity_name, error = %e, "assignment: the address is taken but its block's affinity is still pending");
    }
    Ok((a.ip, written))
}

/// Whether `stored` (a block) has `ip` allocated to `handle`.
fn holds(stored: &Stored, cidr: &IpNet, ip: std::net::IpAddr, handle: &str) -> bool {
    let Ok(block) = stored.decode::<IpamBlock>() else { return false };
    let Some(ord) = crate::model::names::ip_to_ordinal(cidr, ip) else { return false };
    block.spec.allocations.get(ord as usize).copied().flatten().and_then(|i| block.spec.attributes.get(i as usize)).is_some_and(|a| a.handle_id.as_deref() == Some(handle) && a.released_at.is_none())
}

#[cfg(test)]
mod tests;
