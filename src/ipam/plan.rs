//! What a GC pass decides: the scope it examines, the leaks it found and why, what holds them,
//! and the releases, deletions and writes it wants (the plan the shell executes).
//!
//! Owns: the plan types and the documented `reason` / `heldBy` strings of reports.
//! Must not: judge allocations or keep state across passes (that is `gc`), read the index,
//! read the clock or do I/O. Plain data only, so the shell and reports depend on it alone.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::index::Gid;
use crate::model::time::{Millis, PassTime};

/// Why an allocation is garbage. The strings are the documented `reason` values of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeakReason {
    PodNotFound,
    PodRescheduled,
    IpNotInPod,
    PodFinished,
    PodEvicted,
    NodeDeleted,
    TunnelNodeDeleted,
    VmDeleted,
    /// A LoadBalancer address its Service no longer wants (gone, no longer managed, asking for
    /// another address or pool): released by the LoadBalancer controller, never by the GC.
    LoadBalancerUnwanted,
}

impl LeakReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakReason::PodNotFound => "pod-not-found",
            LeakReason::PodRescheduled => "pod-rescheduled",
            LeakReason::IpNotInPod => "ip-not-in-pod",
            LeakReason::PodFinished => "pod-finished",
            LeakReason::PodEvicted => "pod-evicted",
            LeakReason::NodeDeleted => "node-deleted",
            LeakReason::TunnelNodeDeleted => "tunnel-node-deleted",
            LeakReason::VmDeleted => "vm-deleted",
            LeakReason::LoadBalancerUnwanted => "lb-unwanted",
        }
    }
    /// The GC's reasons (the LoadBalancer controller's own is not among them).
    pub const ALL: [LeakReason; 8] = [
        LeakReason::PodNotFound,
        LeakReason::PodRescheduled,
        LeakReason::IpNotInPod,
        LeakReason::PodFinished,
        LeakReason::PodEvicted,
        LeakReason::NodeDeleted,
        LeakReason::TunnelNodeDeleted,
        LeakReason::VmDeleted,
    ];
}

/// What keeps a leak from being released. The strings are the documented `heldBy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeldBy {
    /// Another address of the same handle is still valid (all-or-none per handle).
    HandleHasValidIp,
    /// A tunnel address of a deleted node whose other allocations are not all garbage.
    NodeHasValidAllocations,
    /// The dump does not cover the allocation's namespace.
    NamespaceNotInDump,
    /// `leakGracePeriod` is 0: leaks on live nodes are never confirmed.
    GraceDisabled,
    /// The final re-validation found the pod holding the IP again.
    Revalidated,
    /// A tunnel address of a node missing from the Node cache that no read has proven deleted
    /// yet (a watch behind, refused or stuck, or a node newer than the cache).
    NodeNotProvenGone,
    /// The pass would release more than the mass-change guard allows at once: waiting for a
    /// complete observation a grace period later, or an operator's approval.
    MassChangeGuard,
    /// A deleted node's block still holds addresses once this pass's releases are done (another
    /// node's pod, a cooling-down address): as upstream's `mustBeEmpty`, the block keeps its
    /// affinity and the node's release is retried until the block is empty.
    BlockNotEmpty,
    /// leak-scan only: a Pod the dump's parser rejected may own the address.
    PodUnreadable,
    /// leak-scan only: an item of the dump was unreadable and may have been a pod.
    ObjectUnreadable,
    /// leak-scan only: the dump holds two copies of the block (or of what shapes every verdict)
    /// and nothing tells which is newer.
    ConflictingCopies,
    /// leak-scan only: the dump's lists were read in an order in which a new pod's address
    /// looks leaked (Pods before IPAM).
    DumpOrderUnsafe,
    /// leak-scan only: a LoadBalancer address its Service no longer wants (`lb-unwanted`): the
    /// LoadBalancer controller releases it, never the GC or a report.
    LoadBalancerController,
}

impl HeldBy {
    pub fn as_str(self) -> &'static str {
        match self {
            HeldBy::HandleHasValidIp => "handle-has-valid-ip",
            HeldBy::NodeHasValidAllocations => "node-has-valid-allocations",
            HeldBy::NamespaceNotInDump => "namespace-not-in-dump",
            HeldBy::GraceDisabled => "grace-period-disabled",
            HeldBy::Revalidated => "pod-holds-ip-on-recheck",
            HeldBy::NodeNotProvenGone => "node-not-proven-gone",
            HeldBy::MassChangeGuard => "mass-change-guard",
            HeldBy::BlockNotEmpty => "block-not-empty",
            HeldBy::PodUnreadable => "pod-unreadable",
            HeldBy::ObjectUnreadable => "object-unreadable",
            HeldBy::ConflictingCopies => "conflicting-copies",
            HeldBy::DumpOrderUnsafe => "dump-order-unsafe",
            HeldBy::LoadBalancerController => "loadbalancer-controller",
        }
    }
}

/// Which allocations a pass examines.
#[derive(Debug, Clone)]
pub enum Scope {
    Full,
    /// Only allocations attributed to these nodes (and those nodes' blocks).
    Dirty(BTreeSet<Box<str>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakState {
    Candidate { since: Millis },
    Confirmed { since: Millis },
}

/// One allocation found to be garbage in the latest pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakRecord {
    pub gid: Gid,
    pub reason: LeakReason,
    pub state: LeakState,
    pub held_by: Option<HeldBy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseItem {
    pub ordinal: u32,
    pub ip: IpAddr,
    pub handle: String,
    /// `sequenceNumberForAllocation` as indexed: the release must fail if the block moved on.
    pub sequence: u64,
    pub reason: LeakReason,
}

/// All releases in one block, to be written as one compare-and-swap update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRelease {
    pub cidr: IpNet,
    pub block_name: String,
    pub revision: String,
    pub items: Vec<ReleaseItem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmptyBlockRecord {
    pub cidr: IpNet,
    pub block_name: String,
    pub node: String,
    pub revision: String,
    pub releasable: bool,
    pub held_by: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRelease {
    pub node: String,
    /// `(affinity object name, cidr)` of every host affinity the node still has.
    pub affinities: Vec<(String, IpNet)>,
    /// `(object name as stored, cidr)` of every block affine to the node (by the block's own
    /// `affinity`).
    pub blocks: Vec<(String, IpNet)>,
    /// The blocks this pass expects to still hold addresses after its own releases, and why.
    /// They keep their affinity, the node's affinity for them stays, and the node is retried.
    /// A prediction for the report: the executor decides on its fresh read of each block.
    pub held: Vec<(IpNet, HeldBy)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanHandle {
    pub handle_id: String,
    pub object_name: String,
    pub revision: String,
    pub uid: String,
    pub releasable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColdBlock {
    pub cidr: IpNet,
    pub block_name: String,
    pub revision: String,
}

/// A block marked `deleted` whose deleter died before the second KDD step. Every KDD reader
/// finishes such a block (and answers NotFound); the leader does the same, deleting exactly the
/// version it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftDeletedBlock {
    pub cidr: IpNet,
    pub block_name: String,
    pub revision: String,
    pub uid: String,
}

/// What one pass decided. Tests assert on this, not on HTTP.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub full: bool,
    pub examined: u64,
    /// Every garbage allocation examined this pass, sorted by gid.
    pub leaks: Vec<LeakRecord>,
    pub releases: Vec<BlockRelease>,
    /// Confirmed leaks left for a later pass by the per-pass cap.
    pub deferred: usize,
    pub empty_blocks: Vec<EmptyBlockRecord>,
    pub nodes_to_release: Vec<NodeRelease>,
    pub orphan_handles: Vec<OrphanHandle>,
    pub cold_blocks: Vec<ColdBlock>,
    /// Half soft-deleted blocks to finish. The watch inputs track them (the index ignores
    /// soft-deleted objects), so the controller fills this in beside the pass's own decisions.
    pub soft_deleted_blocks: Vec<SoftDeletedBlock>,
    /// Confirmed leaks whose pod the shell must re-read before releasing (namespace, pod).
    pub revalidate: Vec<(Gid, String, String)>,
    /// Nodes missing from the Node cache whose deletion no read has proven: the shell reads
    /// each, and only a NotFound lets a later pass treat it as deleted. Sorted, no duplicates.
    pub prove_gone: Vec<String>,
    /// When the pass ran: leak `since` values are `time.mono` readings, reports show them as
    /// wall time with [`PassTime::wall_of`].
    pub time: PassTime,
}

impl Plan {
    pub fn release_count(&self) -> usize {
        self.releases.iter().map(|b| b.items.len()).sum()
    }
}

