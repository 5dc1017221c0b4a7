//! The datastore seam: one compare-and-swap shaped trait that the memory, Kubernetes (KDD) and
//! etcd backends implement, the error classification every backend maps its failures into, and
//! the KDD soft-delete protocol (SPEC §4.5).
//!
//! Owns: [`Kind`], [`Stored`], [`Precondition`], [`DatastoreError`] and the [`Datastore`] trait;
//! the watch seam ([`watch`]) and the Kubernetes reader trait ([`cluster`]); the memory backends
//! ([`memory`], [`memory_cluster`], sharing one watch broadcast), the plan executor shared by
//! every backend ([`apply`]) and the conformance suite every backend must pass ([`conformance`]).
//! Must not: import tokio or kube (this module is part of the pure core and builds with
//! `--no-default-features`), read the clock, or decide what is garbage.
//!
//! Objects travel as JSON in the KDD shape (`apiVersion`, `kind`, `metadata`, `spec`, …). A
//! backend that stores another shape (etcd keeps only the spec under a key) converts at its edge,
//! so everything above this seam sees one shape and unknown fields pass through untouched.

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod apply;
pub mod cluster;
pub mod conformance;
#[cfg(feature = "cli")]
pub mod etcd;
pub mod dns_srv;
pub mod etcd_layout;
#[cfg(feature = "cli")]
pub mod kube;
#[cfg(feature = "cli")]
pub mod kube_cluster;
pub mod memory;
pub mod memory_cluster;
pub mod rate;
pub mod watch;
mod watch_hub;

pub use apply::{ExecuteOptions, ItemFailure, ItemRef, KeepGoing, PlanOutcome, execute_plan};
pub use cluster::{ClusterKind, ClusterReader};
pub use memory::{MemoryDatastore, Op, block_on};
pub use memory_cluster::MemoryCluster;
pub use watch::{WatchEvent, WatchFailure, WatchStream};

/// The Calico kinds this product reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    IpamBlock,
    BlockAffinity,
    IpamHandle,
    IpamConfig,
    ClusterInformation,
    KubeControllersConfiguration,
    IpPool,
    IpReservation,
    /// Policy tiers: only the ones upstream's start-up ensures are written (`runtime::init`).
    Tier,
    /// Calico Nodes, where the datastore keeps them apart from Kubernetes' (etcd): read for the
    /// Calico -> Kubernetes node name of their `orchRefs`; the etcd-mode node deleter deletes the
    /// ones whose Kubernetes node is gone.
    CalicoNode,
    /// What the etcd-mode node deleter removes with a Calico Node (SPEC §1.4). A workload endpoint
    /// is namespaced: its name here is `<namespace>/<name>`.
    WorkloadEndpoint,
    BgpPeer,
    FelixConfiguration,
    BgpConfiguration,
    HostEndpoint,
    /// What the etcd-mode profile and policy controllers write: `kns.`/`ksa.` Profiles and
    /// `knp.default.` NetworkPolicies (namespaced: `<namespace>/<name>`).
    Profile,
    NetworkPolicy,
    /// The other policy kinds the policy-name migrator re-keys (with [`Kind::NetworkPolicy`]);
    /// the staged NetworkPolicy is namespaced (`<namespace>/<name>`).
    GlobalNetworkPolicy,
    StagedNetworkPolicy,
    StagedGlobalNetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 20] = [
        Kind::IpamBlock,
        Kind::BlockAffinity,
        Kind::IpamHandle,
        Kind::IpamConfig,
        Kind::ClusterInformation,
        Kind::KubeControllersConfiguration,
        Kind::IpPool,
        Kind::IpReservation,
        Kind::Tier,
        Kind::CalicoNode,
        Kind::WorkloadEndpoint,
        Kind::BgpPeer,
        Kind::FelixConfiguration,
        Kind::BgpConfiguration,
        Kind::HostEndpoint,
        Kind::Profile,
        Kind::NetworkPolicy,
        Kind::GlobalNetworkPolicy,
        Kind::StagedNetworkPolicy,
        Kind::StagedGlobalNetworkPolicy,
    ];

    /// The CRD plural (`crd.projectcalico.org/v1`); also a bounded metric label.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::IpamBlock => "ipamblocks",
            Kind::BlockAffinity => "blockaffinities",
            Kind::IpamHandle => "ipamhandles",
            Kind::IpamConfig => "ipamconfigs",
            Kind::ClusterInformation => "clusterinformations",
            Kind::KubeControllersConfiguration => "kubecontrollersconfigurations",
            Kind::IpPool => "ippools",
            Kind::IpReservation => "ipreservations",
            Kind::Tier => "tiers",
            Kind::CalicoNode => "nodes",
            Kind::WorkloadEndpoint => "workloadendpoints",
            Kind::BgpPeer => "bgppeers",
            Kind::FelixConfiguration => "felixconfigurations",
            Kind::BgpConfiguration => "bgpconfigurations",
            Kind::HostEndpoint => "hostendpoints",
            Kind::Profile => "profiles",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::GlobalNetworkPolicy => "globalnetworkpolicies",
            Kind::StagedNetworkPolicy => "stagednetworkpolicies",
            Kind::StagedGlobalNetworkPolicy => "stagedglobalnetworkpolicies",
        }
    }

    /// The `kind` field of the v1 CRD objects.
    pub fn kind_name(self) -> &'static str {
        match self {
            Kind::IpamBlock => crate::model::block::KIND,
            Kind::BlockAffinity => crate::model::affinity::KIND,
            Kind::IpamHandle => crate::model::handle::KIND,
            Kind::IpamConfig => "IPAMConfig",
            Kind::ClusterInformation => "ClusterInformation",
            Kind::KubeControllersConfiguration => "KubeControllersConfiguration",
            Kind::IpPool => "IPPool",
            Kind::IpReservation => "IPReservation",
            Kind::Tier => "Tier",
            Kind::CalicoNode => "Node",
            Kind::WorkloadEndpoint => "WorkloadEndpoint",
            Kind::BgpPeer => "BGPPeer",
            Kind::FelixConfiguration => "FelixConfiguration",
            Kind::BgpConfiguration => "BGPConfiguration",
            Kind::HostEndpoint => "HostEndpoint",
            Kind::Profile => "Profile",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            Kind::StagedNetworkPolicy => "StagedNetworkPolicy",
            Kind::StagedGlobalNetworkPolicy => "StagedGlobalNetworkPolicy",
        }
    }

    /// Kinds whose objects live in a namespace; their names here are `<namespace>/<name>`.
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::WorkloadEndpoint | Kind::NetworkPolicy | Kind::StagedNetworkPolicy)
    }

    /// Kinds that KDD deletes in two steps (mark `spec.deleted`, then delete), so that a reader
    /// racing the delete sees the object as gone (SPEC §4.5).
    pub fn soft_deletes(self) -> bool {
        matches!(self, Kind::IpamBlock | Kind::BlockAffinity | Kind::IpamHandle)
    }
}

/// Objects per LIST page (a Kubernetes LIST, an etcd range): large enough that 30,000 pods or
/// handles list in 60 round trips, small enough that one page of them never holds more than a
/// few MB.
#[cfg(feature = "cli")]
pub(crate) const LIST_PAGE: u32 = 500;

/// IPAMBlocks per LIST page. A block carries an attribute map for each of up to 64 allocations,
/// so one decodes to about 40 KB of JSON values where a handle takes about 1 KB: a 500-block
/// page and a watch's read-ahead of two more held every block of a 1,000-node cluster at once,
/// the largest part of the controller's heap peak while it synced. At 50 a page holds about as
/// much as a page of handles, and the blocks (a node's worth each, far fewer than pods) still
/// list in fewer round trips than the pods.
#[cfg(feature = "cli")]
pub(crate) const BLOCK_LIST_PAGE: u32 = 50;

/// Objects per LIST page of `kind` (see [`BLOCK_LIST_PAGE`]).
#[cfg(feature = "cli")]
pub(crate) fn list_page(kind: Kind) -> u32 {
    match kind {
        Kind::IpamBlock => BLOCK_LIST_PAGE,
        _ => LIST_PAGE,
    }
}

/// One object as a backend returned it: identity, the CAS token, and the whole KDD-shaped body.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub name: String,
    /// The CAS token: Kubernetes `resourceVersion`, etcd `ModRevision`, the memory counter.
    pub revision: String,
    /// Kubernetes `metadata.uid`; etcd and memory backends generate a stable one per creation.
    pub uid: String,
    /// The whole object, `metadata.resourceVersion`/`uid`/`name` matching the fields above.
    pub value: Value,
}

impl Stored {
    /// Decodes the body into a typed object (for example [`crate::model::IpamBlock`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DatastoreError> {
        T::deserialize(&self.value)
            .map_err(|e| DatastoreError::invalid(format!("{} does not decode: {e}", self.name)))
    }

    /// The same identity and CAS token with a new body: what an update sends back.
    pub fn with_value<T: Serialize>(&self, object: &T) -> Result<Stored, DatastoreError> {
        let value = serde_json::to_value(object)
            .map_err(|e| DatastoreError::invalid(format!("{} does not encode: {e}", self.name)))?;
        Ok(Stored { name: self.name.clone(), revision: self.revision.clone(), uid: self.uid.clone(), value })
    }

    /// Whether `spec.deleted` is set, as a bool (blocks, handles) or as the v1 BlockAffinity
    /// string `"true"`.
    pub fn is_soft_deleted(&self) -> bool {
        match self.value.get("spec").and_then(|s| s.get("deleted")) {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        }
    }

    /// The precondition that deletes exactly this version of this object.
    pub fn exact(&self) -> Precondition {
        Precondition { revision: Some(self.revision.clone()), uid: Some(self.uid.clone()) }
    }
}

/// What must still hold for a delete to go ahead. `None` fields are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    pub revision: Option<String>,
    pub uid: Option<String>,
}

/// How a datastore call failed, classified where the failure enters (STYLE: errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    NotFound,
    /// The revision or uid no longer matches: re-read and retry soon.
    Conflict,
    AlreadyExists,
    /// Timeouts, throttling, unavailable servers: back off per item.
    Transient,
    /// The object or the request is malformed: report and skip.
    Invalid,
}

impl ErrorKind {
    pub fn category(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Transient => "transient",
            ErrorKind::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.category())]
pub struct DatastoreError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DatastoreError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        DatastoreError { kind, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }
    /// A bounded label for metrics (never the message).
    pub fn category(&self) -> &'static str {
        self.kind.category()
    }
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
    pub fn is_conflict(&self) -> bool {
        self.kind == ErrorKind::Conflict
    }
}

pub type DsResult<T> = Result<T, DatastoreError>;

/// A compare-and-swap datastore of Calico objects.
///
/// Every returned future is `Send`, so the Kubernetes backend's calls can run on tokio's
/// multi-threaded runtime; the memory backend's futures are always ready (see [`block_on`]).
pub trait Datastore: Send + Sync {
    /// The object, or `NotFound`. A soft-deleted block is finished off and reported `NotFound`,
    /// as KDD does (SPEC §4.5).
    fn get(&self, kind: Kind, name: &str) -> impl Future<Output = DsResult<Stored>> + Send;

    /// Every object of the kind, soft-deleted ones included (readers filter them on entry).
    fn list(&self, kind: Kind) -> impl Future<Output = DsResult<Vec<Stored>>> + Send;

    /// Creates `name` from a KDD-shaped body; `AlreadyExists` if the name is taken.
    fn create(&self, kind: Kind, name: &str, value: Value) -> impl Future<Output = DsResult<Stored>> + Send;

    /// Replaces the body if the stored revision (and uid, when not empty) still match
    /// `object`'s: `Conflict` otherwise, `NotFound` if the object is gone. Returns the new version.
    fn update(&self, kind: Kind, object: &Stored) -> impl Future<Output = DsResult<Stored>> + Send;

    /// Replaces only `status` (the status subresource: the rest of `object`'s body is ignored),
    /// under the same revision check as [`Datastore::update`]. Returns the new version.
    fn update_status(&self, kind: Kind, object: &Stored) -> impl Future<Output = DsResult<Stored>> + Send;

    /// Deletes `name` if `precondition` holds: `NotFound` if missing, `Conflict` if not.
    fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> impl Future<Output = DsResult<()>> + Send;

    /// List + watch of every object of `kind` with the protocol of [`watch`]: soft-deleted
    /// objects included (consumers filter them, as for [`Datastore::list`]). Never rate limited.
    fn watch(&self, kind: Kind) -> WatchStream;

    /// The Calico Node `name`, where the datastore keeps Calico Nodes apart from Kubernetes
    /// (etcd). A node is proven gone only through what this says (see
    /// [`CalicoNodeView::proof`]).
    fn calico_node(&self, name: &str) -> impl Future<Output = DsResult<CalicoNodeView>> + Send {
        let _ = name;
        async { Ok(CalicoNodeView::NotKept) }
    }

    /// Whether this datastore keeps Calico Nodes of its own ([`Kind::CalicoNode`], etcd): then
    /// the allocations' node names are Calico Node names, mapped to Kubernetes nodes through
    /// their `orchRefs`, and the GC watches them. KDD: the Calico Nodes are the Kubernetes Nodes.
    fn keeps_calico_nodes(&self) -> bool {
        false
    }

    /// The name the handle with ID `id` has here: KDD's object name is the lowercased ID; etcd
    /// keys (and so names) keep the ID as it is.
    fn handle_object_name(&self, id: &str) -> String {
        crate::model::names::handle_object_name(id)
    }

    /// The name `host`'s affinity for `cidr` has here: KDD's object name, hashed when long;
    /// etcd keys hold host and CIDR as they are, so the plain `<host>-<cidrname>`.
    fn affinity_object_name(&self, host: &str, cidr: &ipnet::IpNet) -> String {
        crate::model::names::affinity_name(host, cidr)
    }

    /// Deletes exactly this version of the object. For blocks, affinities and handles this is the
    /// KDD two-step: mark `spec.deleted` under CAS, then delete with revision and uid
    /// preconditions. An etcd backend, whose deletes are atomic, overrides it with one delete.
    fn soft_delete(&self, kind: Kind, object: &Stored) -> impl Future<Output = DsResult<()>> + Send {
        async move {
            if !kind.soft_deletes() {
                return self.delete(kind, &object.name, &object.exact()).await;
            }
            let marked = mark_deleted(kind, object)?;
            let marked = self.update(kind, &marked).await?;
            self.delete(kind, &marked.name, &marked.exact()).await
        }
    }

    /// Soft-deletes `name` as [`Datastore::soft_delete`] does, but only if `precondition` holds
    /// and every [`Expect`] matches the object as it is now, and without the caller reading it
    /// first: `Conflict` if anything differs (nothing is written then), `NotFound` if it is gone.
    /// For writers that already know what the object must hold (from the watch, or from the
    /// release they just made), so a delete costs its writes and no read. This default reads the
    /// object, checks it and soft-deletes the version read; the Kubernetes backend has the
    /// apiserver do the checks in the same request that sets the mark.
    fn soft_delete_if(&self, kind: Kind, name: &str, precondition: &Precondition, expect: &[Expect]) -> impl Future<Output = DsResult<()>> + Send {
        async move {
            let stored = self.get(kind, name).await?;
            check_expected(kind, &stored, precondition, expect)?;
            self.soft_delete(kind, &stored).await
        }
    }
}

/// A field [`Datastore::soft_delete_if`] checks: the value at `pointer` (RFC 6901, into the
/// KDD-shaped body) must equal `value` exactly; a missing field never matches.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    pub pointer: String,
    pub value: Value,
}

impl Expect {
    /// `spec.<field>` must hold `value`.
    pub fn spec(field: &str, value: Value) -> Expect {
        Expect { pointer: format!("/spec/{}", pointer_token(field)), value }
    }
}

/// One reference token of a JSON pointer (RFC 6901): `~` and `/` escaped.
pub fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// `Conflict` unless `stored` is the version `precondition` names and holds every `expect`.
pub fn check_expected(kind: Kind, stored: &Stored, precondition: &Precondition, expect: &[Expect]) -> DsResult<()> {
    let what = || format!("{} {}", kind.plural(), stored.name);
    if precondition.revision.as_ref().is_some_and(|r| *r != stored.revision) {
        return Err(DatastoreError::conflict(format!("{} is at revision {}, not {:?}", what(), stored.revision, precondition.revision)));
    }
    if precondition.uid.as_ref().is_some_and(|u| *u != stored.uid) {
        return Err(DatastoreError::conflict(format!("{} has uid {}, not {:?}", what(), stored.uid, precondition.uid)));
    }
    for e in expect {
        if stored.value.pointer(&e.pointer) != Some(&e.value) {
            return Err(DatastoreError::conflict(format!("{}: {} is not {}", what(), e.pointer, e.value)));
        }
    }
    Ok(())
}

/// What a datastore holds about a Calico Node, for the proof that a node is gone (SPEC §9.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalicoNodeView {
    /// The datastore keeps no Calico Nodes of its own (KDD: they are the Kubernetes Nodes).
    NotKept,
    /// No Calico Node of that name.
    Missing,
    /// The Calico Node exists; `k8s_node` is the Kubernetes node its `orchRefs` name for the
    /// `k8s` orchestrator, `None` when it names none (not a Kubernetes node).
    Present { k8s_node: Option<String> },
}

/// What proves an absent node gone, from what the datastore says of its Calico Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoneProof {
    /// The NotFound of this Kubernetes Node.
    KubernetesNode(String),
    /// Nothing more: no Calico Node of that name exists (etcd; upstream takes such a node as
    /// gone, whatever Kubernetes Node shares its name).
    CalicoNodeMissing,
    /// Nothing may: a Calico Node without a Kubernetes orchestrator reference is never taken as
    /// deleted (upstream leaves such nodes alone).
    Never,
}

impl CalicoNodeView {
    /// What proves the allocations' node `name` gone.
    pub fn proof(&self, name: &str) -> GoneProof {
        match self {
            CalicoNodeView::NotKept => GoneProof::KubernetesNode(name.to_string()),
            CalicoNodeView::Missing => GoneProof::CalicoNodeMissing,
            CalicoNodeView::Present { k8s_node: Some(k) } => GoneProof::KubernetesNode(k.clone()),
            CalicoNodeView::Present { k8s_node: None } => GoneProof::Never,
        }
    }

    /// Reads the `k8s` orchestrator reference of a v3 Calico Node body.
    pub fn of_node(body: &Value) -> CalicoNodeView {
        let refs = body.pointer("/spec/orchRefs").and_then(Value::as_array);
        let k8s_node = refs
            .into_iter()
            .flatten()
            .find(|r| r.get("orchestrator").and_then(Value::as_str).is_some_and(|o| o.eq_ignore_ascii_case("k8s")))
            .and_then(|r| r.get("nodeName").and_then(Value::as_str))
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        CalicoNodeView::Present { k8s_node }
    }
}

/// The soft-delete mark: `spec.deleted = true`, a string in the v1 BlockAffinity CRD.
pub fn mark_deleted(kind: Kind, object: &Stored) -> DsResult<Stored> {
    let mut marked = object.clone();
    let spec = marked
        .value
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| DatastoreError::invalid(format!("{} {} has no spec", kind.kind_name(), object.name)))?;
    spec.insert("deleted".into(), deleted_mark(kind));
    Ok(marked)
}

/// The value of `spec.deleted` that marks an object deleted: the string `"true"` in the v1
/// BlockAffinity CRD, a bool elsewhere.
pub fn deleted_mark(kind: Kind) -> Value {
    if kind == Kind::BlockAffinity { Value::String("true".into()) } else { Value::Bool(true) }
}

/// The helper form of [`Datastore::soft_delete`].
pub async fn soft_delete<D: Datastore>(ds: &D, kind: Kind, object: &Stored) -> DsResult<()> {
    ds.soft_delete(kind, object).await
}

/// Typed get: the stored object decoded into `T`.
pub async fn get_typed<D: Datastore, T: DeserializeOwned>(ds: &D, kind: Kind, name: &str) -> DsResult<(Stored, T)> {
    let stored = ds.get(kind, name).await?;
    let typed = stored.decode()?;
    Ok((stored, typed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn affinity_body() -> Value {
        json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity",
            "metadata": {"name": "n1-10-0-0-0-26"},
            "spec": {"state": "confirmed", "node": "n1", "cidr": "10.0.0.0/26", "deleted": "false"}
        })
    }

    #[test]
    fn categories_are_bounded_snake_case_labels() {
        let all = [ErrorKind::NotFound, ErrorKind::Conflict, ErrorKind::AlreadyExists, ErrorKind::Transient, ErrorKind::Invalid];
        let labels: Vec<_> = all.iter().map(|k| k.category()).collect();
        assert_eq!(labels, ["not_found", "conflict", "already_exists", "transient", "invalid"]);
        assert_eq!(DatastoreError::conflict("x").to_string(), "conflict: x");
    }

    #[test]
    fn kinds_name_their_crd_plural_and_kind() {
        assert_eq!(Kind::IpamBlock.plural(), "ipamblocks");
        assert_eq!(Kind::BlockAffinity.kind_name(), "BlockAffinity");
        assert_eq!(Kind::IpamHandle.kind_name(), "IPAMHandle");
        assert!(Kind::IpamHandle.soft_deletes() && !Kind::IpPool.soft_deletes());
        let plurals: std::collections::BTreeSet<_> = Kind::ALL.iter().map(|k| k.plural()).collect();
        assert_eq!(plurals.len(), Kind::ALL.len());
    }

    #[test]
    fn a_calico_node_is_proven_gone_only_through_the_kubernetes_node_its_orch_ref_names() {
        let node = |spec: serde_json::Value| CalicoNodeView::of_node(&json!({"metadata": {"name": "cn"}, "spec": spec}));
        let mapped = node(json!({"orchRefs": [{"orchestrator": "openstack", "nodeName": "os-1"}, {"orchestrator": "k8s", "nodeName": "worker-1"}]}));
        assert_eq!(mapped.proof("cn"), GoneProof::KubernetesNode("worker-1".into()));
        for unmapped in [json!({}), json!({"orchRefs": []}), json!({"orchRefs": [{"orchestrator": "k8s", "nodeName": ""}]}), json!({"orchRefs": "bogus"})] {
            assert_eq!(node(unmapped.clone()).proof("cn"), GoneProof::Never, "{unmapped}");
        }
        // SPEC §9.3: no Calico Node is proof enough, even if a Kubernetes Node has its name.
        assert_eq!(CalicoNodeView::Missing.proof("cn"), GoneProof::CalicoNodeMissing);
        assert_eq!(CalicoNodeView::NotKept.proof("cn"), GoneProof::KubernetesNode("cn".into()));
    }

    #[test]
    fn affinity_soft_delete_mark_is_the_string_true() {
        let s = Stored { name: "n1-10-0-0-0-26".into(), revision: "1".into(), uid: "u".into(), value: affinity_body() };
        let marked = mark_deleted(Kind::BlockAffinity, &s).unwrap();
        assert_eq!(marked.value["spec"]["deleted"], "true");
        assert!(marked.is_soft_deleted());
        let handle = Stored { value: json!({"spec": {"handleID": "h"}}), ..s };
        assert_eq!(mark_deleted(Kind::IpamHandle, &handle).unwrap().value["spec"]["deleted"], true);
    }

    #[test]
    fn soft_delete_marks_then_deletes_and_a_failed_delete_leaves_the_string_mark() {
        let ds = MemoryDatastore::new();
        let created = block_on(ds.create(Kind::BlockAffinity, "n1-10-0-0-0-26", affinity_body())).unwrap();
        ds.inject(Some(Kind::BlockAffinity), None, Op::Delete, ErrorKind::Transient, 1);
        let err = block_on(soft_delete(&ds, Kind::BlockAffinity, &created)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient);
        let left = ds.peek(Kind::BlockAffinity, "n1-10-0-0-0-26").unwrap();
        assert_eq!(left.value["spec"]["deleted"], "true", "v1 affinity mark is a string");
        block_on(ds.delete(Kind::BlockAffinity, &left.name, &left.exact())).unwrap();
        assert!(ds.peek(Kind::BlockAffinity, "n1-10-0-0-0-26").is_none());
    }

    #[test]
    fn soft_delete_of_a_changed_object_is_a_conflict_and_deletes_nothing() {
        let ds = MemoryDatastore::new();
        let name = "n1-10-0-0-0-26";
        let created = block_on(ds.create(Kind::BlockAffinity, name, affinity_body())).unwrap();
        ds.bump(Kind::BlockAffinity, name, |v| v["spec"]["state"] = json!("pendingDeletion")).unwrap();
        let err = block_on(soft_delete(&ds, Kind::BlockAffinity, &created)).unwrap_err();
        assert!(err.is_conflict());
        assert!(!ds.peek(Kind::BlockAffinity, name).unwrap().is_soft_deleted());
    }

    #[test]
    fn typed_get_decodes_the_model_type() {
        let ds = MemoryDatastore::new();
        block_on(ds.create(Kind::BlockAffinity, "n1-10-0-0-0-26", affinity_body())).unwrap();
        let (stored, a): (_, crate::model::BlockAffinity) = block_on(get_typed(&ds, Kind::BlockAffinity, "n1-10-0-0-0-26")).unwrap();
        assert_eq!(a.spec.node, "n1");
        assert_eq!(a.resource_version(), stored.revision);
        assert_eq!(a.metadata.uid.as_deref(), Some(stored.uid.as_str()));
    }
}
