//! The etcd-mode node deleter (SPEC §1.4): a Calico Node whose Kubernetes node is gone is
//! deleted with its workload endpoints, BGP peers, `node.<name>` Felix and BGP configurations
//! and host endpoints. Its addresses, handles and affinities are the IPAM GC's, which releases
//! them once the Kubernetes node is gone (see [`crate::node_cleanup`]).
//!
//! Owns: its own watch of the Kubernetes Nodes (names only), the sweeps (once the Node list is
//! complete, after every Node deletion, and every [`SWEEP_EVERY`]), the re-read that confirms
//! each node gone, the mass-change guard's `etcd-nodes` scope, and the deletes.
//! Must not: sweep on a Node view that is not whole (before its first list, while the watch
//! fails or relists), write unless this replica leads (a dry run logs what it would delete),
//! or write IPAM.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::Shared;
use super::listed::Listed;
use crate::datastore::cluster::{ClusterKind, ClusterReader};
use crate::datastore::watch::WatchEvent;
use crate::datastore::{Datastore, DsResult, Kind, Precondition};
use crate::guard::{self, ETCD_NODES, GuardConfig, MassGuard, Proposal};
use crate::datastore::Stored;
use crate::node_cleanup::{self, KUBE_LABELS_ANNOTATION, Labels, NodeObjects, Orphan};

/// Upstream sweeps on Node deletions and at start; a periodic sweep also catches a deletion
/// whose event was lost.
pub const SWEEP_EVERY: Duration = Duration::from_secs(300);
/// Node deletions within this window share one sweep.
const BATCH: Duration = Duration::from_secs(1);

/// A sweep that could not run (no whole view, not leading, the node controller off) is tried
/// again this much later.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct NodeDeleterOptions {
    pub dry_run: bool,
    pub guard: GuardConfig,
    /// How long a held set waits before a later sweep may let it through; `None`: the
    /// configuration's leak grace period.
    pub guard_wait: Option<Duration>,
    /// The KubeControllersConfiguration whose approval annotation may let a held set through.
    pub kcc: Option<String>,
}

/// Whether a sweep ran, or must be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Swept {
    Ran,
    NotNow,
    /// The guard holds deletions: the sweep that may let them through is due this much later.
    Held(Duration),
}

/// When the next sweep is due after one that ended with `swept` (`None`: at the usual times).
fn next_sweep(swept: Swept) -> Option<Duration> {
    match swept {
        Swept::Ran => None,
        Swept::NotNow => Some(RETRY),
        // Just past the guard's wait, so the held set is proposed again as soon as it may pass.
        // A zero wait lets only approvals through: the periodic sweep, not a spin.
        Swept::Held(wait) if wait.is_zero() => None,
        Swept::Held(wait) => Some(wait.min(SWEEP_EVERY) + BATCH),
    }
}

/// The Kubernetes Node names as the watch shows them, each with its labels (nothing else of a
/// Node is kept), and whether that view is whole.
#[derive(Debug, Default)]
struct NodeView {
    names: Listed<Labels>,
}

fn labels_of(o: &Stored) -> Labels {
    o.value["metadata"]["labels"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

impl NodeView {
    /// Applies one event; true when it calls for a sweep (a list completed, a node deleted, a
    /// node's labels changed).
    fn apply(&mut self, event: WatchEvent) -> bool {
        match event {
            WatchEvent::Init => self.names.begin(),
            WatchEvent::InitApply(o) => self.names.listed(o.name.clone(), labels_of(&o)),
            WatchEvent::InitDone => {
                self.names.end();
                return true;
            }
            WatchEvent::Apply(o) => {
                let labels = labels_of(&o);
                return self.names.upsert(o.name, labels.clone()).is_none_or(|old| old != labels);
            }
            WatchEvent::Delete(o) => return self.names.remove(&o.name).is_some(),
            WatchEvent::Error(e) => self.names.failed(e.message),
            WatchEvent::Resumed => self.names.delivered(),
        }
        false
    }

    fn whole(&self) -> bool {
        self.names.whole()
    }
}

/// Runs until `stop` turns true: watches the Kubernetes Nodes and sweeps.
pub async fn run<D: Datastore, C: ClusterReader>(
    ds: Arc<D>,
    cluster: Arc<C>,
    shared: Arc<Shared>,
    may_write: watch::Receiver<bool>,
    opts: NodeDeleterOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut nodes = cluster.watch(ClusterKind::Node);
    let mut view = NodeView::default();
    let mut guard = MassGuard::new();
    let started = tokio::time::Instant::now();
    let mut due: Option<tokio::time::Instant> = None;
    let mut periodic = tokio::time::interval(SWEEP_EVERY);
    periodic.tick().await;
    loop {
        let wait_due = super::sleep_until_due(due);
        tokio::select! {
            event = nodes.next() => {
                let Some(event) = event else { return };
                // Within the batch window, even while the guard holds a set (see light.rs).
                if view.apply(event) {
                    due = super::due_within(due, BATCH);
                }
            }
            _ = wait_due => {
                due = next_sweep(sweep(&*ds, &*cluster, &shared, &may_write, &opts, &view, &mut guard, started.elapsed()).await).map(|d| tokio::time::Instant::now() + d);
            }
            _ = periodic.tick() => {
                let next = next_sweep(sweep(&*ds, &*cluster, &shared, &may_write, &opts, &view, &mut guard, started.elapsed()).await);
                if due.is_none() {
                    due = next.map(|d| tokio::time::Instant::now() + d);
                }
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// One sweep: the orphans of a whole view, each confirmed by a re-read of its Kubernetes node,
/// put through the guard, then cascaded.
#[allow(clippy::too_many_arguments)]
async fn sweep<D: Datastore, C: ClusterReader>(
    ds: &D,
    cluster: &C,
    shared: &Shared,
    may_write: &watch::Receiver<bool>,
    opts: &NodeDeleterOptions,
    view: &NodeView,
    guard: &mut MassGuard,
    now: Duration,
) -> Swept {
    let (enabled, sync_labels, grace) = {
        let config = shared.config.borrow();
        let sync = config.run.node.as_ref().is_some_and(|n| n.sync_labels);
        (config.run.gc_enabled(), sync, Duration::from_millis(config.run.leak_grace().max(0) as u64))
    };
    if !enabled || !view.whole() || !(opts.dry_run || *may_write.borrow()) {
        return Swept::NotNow;
    }
    let calico_nodes = match ds.list(Kind::CalicoNode).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "node deleter: listing Calico Nodes failed; retried shortly");
            return Swept::NotNow;
        }
    };
    let mut confirmed = Vec::new();
    // A re-read failed: this sweep confirmed only some orphans, which is no complete observation.
    let mut cut_short = false;
    // Every orphan the view shows, confirmed or not: what the guard counts, so a mass deletion
    // cannot pass in slices of sweeps cut short.
    let mut proposed = BTreeSet::new();
    if sync_labels {
        sync_node_labels(ds, shared, may_write, opts, view, &calico_nodes).await;
    }
    for orphan in node_cleanup::orphans(&calico_nodes, |n| view.names.contains(n)) {
        proposed.insert(guard::fingerprint(&[orphan.calico_node.as_bytes()]));
        if cut_short {
            continue;
        }
        match cluster.get(ClusterKind::Node, "", &orphan.kubernetes_node).await {
            Err(e) if e.is_not_found() => confirmed.push(orphan),
            Ok(_) => tracing::info!(node = %orphan.calico_node, kubernetes_node = %orphan.kubernetes_node, "node deleter: the Kubernetes node exists after all; kept"),
            Err(e) => {
                tracing::warn!(node = %orphan.calico_node, error = %e, "node deleter: re-reading the Kubernetes node failed; kept until a later sweep");
                cut_short = true;
            }
        }
    }
    let members: BTreeMap<u64, Orphan> = confirmed.into_iter().map(|o| (guard::fingerprint(&[o.calico_node.as_bytes()]), o)).collect();
    // Incomplete, a held set keeps its place (it is neither let through nor forgotten, so its
    // grace period does not start again); only confirmed orphans are ever deleted.
    let proposal = Proposal { members: &proposed, total: calico_nodes.len() as u64, complete: !cut_short };
    let approvals = approvals(ds, opts.kcc.as_deref()).await;
    let wait = opts.guard_wait.unwrap_or(grace);
    let decision = guard.review(ETCD_NODES, proposal, &opts.guard, now.as_millis() as i64, wait.as_millis() as i64, &approvals);
    let held = guard.held().iter().filter(|h| h.scope == ETCD_NODES).map(|h| h.waiting).sum::<u64>();
    shared.metrics(|m| m.mass_change_held.insert(ETCD_NODES.name, held));
    if held > 0 {
        for h in guard.held().iter().filter(|h| h.scope == ETCD_NODES) {
            tracing::warn!(waiting = h.waiting, total = h.total, id = %h.id, "mass-change guard: Calico Node deletions held until a sweep one grace period later proposes them again, or approval");
        }
    }
    let done = match held {
        // The rest of the orphans are read again shortly, not at the next periodic sweep.
        _ if cut_short => Swept::NotNow,
        0 => Swept::Ran,
        _ => Swept::Held(wait),
    };
    let allowed: Vec<&Orphan> = members.iter().filter(|(m, _)| decision.allows(**m)).map(|(_, o)| o).collect();
    if allowed.is_empty() {
        return done;
    }
    // The kinds that name their node, listed once for every node of this sweep.
    let (weps, peers, heps) = match (ds.list(Kind::WorkloadEndpoint).await, ds.list(Kind::BgpPeer).await, ds.list(Kind::HostEndpoint).await) {
        (Ok(w), Ok(p), Ok(h)) => (w, p, h),
        (w, p, h) => {
            let e = [w.err(), p.err(), h.err()].into_iter().flatten().next().map(|e| e.to_string()).unwrap_or_default();
            tracing::warn!(error = %e, "node deleter: listing the nodes' objects failed; retried shortly");
            return Swept::NotNow;
        }
    };
    let objects = NodeObjects { workload_endpoints: &weps, bgp_peers: &peers, host_endpoints: &heps };
    for orphan in allowed {
        let plan = node_cleanup::cascade(&orphan.calico_node, &objects);
        if opts.dry_run {
            tracing::info!(node = %orphan.calico_node, kubernetes_node = %orphan.kubernetes_node, deletes = plan.len(), "dry run: would delete the Calico Node of a deleted Kubernetes node, with its objects");
            continue;
        }
        tracing::info!(node = %orphan.calico_node, kubernetes_node = %orphan.kubernetes_node, deletes = plan.len(), "deleting the Calico Node of a deleted Kubernetes node, with its objects");
        for (kind, name) in plan {
            // A lost Lease stops the cascade where it is; the new leader's sweep finishes it.
            if !*may_write.borrow() {
                return Swept::NotNow;
            }
            let result = delete(ds, kind, &name).await;
            let outcome = match &result {
                Ok(true) => "deleted",
                Ok(false) => "absent",
                Err(_) => "failed",
            };
            shared.metrics(|m| *m.node_deletions.entry((kind.kind_name(), outcome)).or_default() += 1);
            if let Err(e) = result {
                tracing::warn!(node = %orphan.calico_node, kind = kind.kind_name(), name = %name, error = %e, "node deleter: a delete failed; the Calico Node is kept and a later sweep goes on");
                break;
            }
        }
    }
    done
}

/// Label sync (SPEC §1.5): every Calico Node with a `k8s` orchRef whose Kubernetes node the
/// view holds gets that node's labels, written only when something changed. A conflict (the
/// node was written meanwhile) is left to the next sweep.
async fn sync_node_labels<D: Datastore>(ds: &D, shared: &Shared, may_write: &watch::Receiver<bool>, opts: &NodeDeleterOptions, view: &NodeView, calico_nodes: &[Stored]) {
    for node in calico_nodes {
        let crate::datastore::CalicoNodeView::Present { k8s_node: Some(k8s) } = crate::datastore::CalicoNodeView::of_node(&node.value) else { continue };
        let Some(k8s_labels) = view.names.get(&k8s) else { continue };
        let current = labels_of(node);
        let annotation = node.value["metadata"]["annotations"][KUBE_LABELS_ANNOTATION].as_str();
        let Some((labels, bookkeeping)) = node_cleanup::synced_labels(&current, annotation, k8s_labels) else { continue };
        if opts.dry_run {
            tracing::info!(node = %node.name, "dry run: would copy the Kubernetes node's labels onto its Calico Node");
            continue;
        }
        if !*may_write.borrow() {
            return;
        }
        let mut value = node.value.clone();
        let meta = &mut value["metadata"];
        meta["labels"] = serde_json::to_value(&labels).unwrap_or_default();
        if !meta["annotations"].is_object() {
            meta["annotations"] = serde_json::json!({});
        }
        meta["annotations"][KUBE_LABELS_ANNOTATION] = serde_json::Value::String(bookkeeping);
        let updated = Stored { value, ..node.clone() };
        let outcome = match ds.update(Kind::CalicoNode, &updated).await {
            Ok(_) => "synced",
            Err(e) if e.is_conflict() || e.is_not_found() => "conflict",
            Err(e) => {
                tracing::warn!(node = %node.name, error = %e, "label sync: writing the Calico Node failed; a later sweep retries");
                "failed"
            }
        };
        shared.metrics(|m| *m.node_deletions.entry(("NodeLabels", outcome)).or_default() += 1);
    }
}

/// The mass-change approvals in the configuration's annotation (none when it is not read or
/// cannot be read: a held set then waits for its later sweep).
async fn approvals<D: Datastore>(ds: &D, kcc: Option<&str>) -> BTreeSet<String> {
    let Some(name) = kcc else { return BTreeSet::new() };
    match ds.get(Kind::KubeControllersConfiguration, name).await {
        Ok(o) => o.value["metadata"]["annotations"][super::ipam_gc::inputs::APPROVE_ANNOTATION]
            .as_str()
            .map(guard::parse_approvals)
            .unwrap_or_default(),
        Err(_) => BTreeSet::new(),
    }
}

/// Deletes one object; `Ok(false)` when it was not there.
async fn delete<D: Datastore>(ds: &D, kind: Kind, name: &str) -> DsResult<bool> {
    match ds.delete(kind, name, &Precondition::default()).await {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{MemoryCluster, MemoryDatastore};
    use serde_json::json;

    fn calico_node(name: &str, k8s: Option<&str>) -> serde_json::Value {
        let refs: Vec<_> = k8s.into_iter().map(|k| json!({"orchestrator": "k8s", "nodeName": k})).collect();
        json!({"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": name}, "spec": {"orchRefs": refs}})
    }

    fn on_node(node: &str) -> serde_json::Value {
        json!({"metadata": {}, "spec": {"node": node}})
    }

    fn names(ds: &MemoryDatastore, kind: Kind) -> Vec<String> {
        let mut n: Vec<String> = ds.snapshot(kind).into_iter().map(|s| s.name).collect();
        n.sort();
        n
    }

    fn stored(name: &str) -> Stored {
        Stored { name: name.into(), revision: "1".into(), uid: "u".into(), value: json!({}) }
    }

    fn whole_view(names: &[&str]) -> NodeView {
        let mut v = NodeView::default();
        v.apply(WatchEvent::Init);
        for n in names {
            v.apply(WatchEvent::InitApply(stored(n)));
        }
        assert!(v.apply(WatchEvent::InitDone));
        v
    }

    fn opts(dry_run: bool) -> NodeDeleterOptions {
        NodeDeleterOptions { dry_run, guard: GuardConfig::OFF, guard_wait: Some(Duration::from_secs(2)), kcc: None }
    }

    /// Shared state whose configuration enables the node controller.
    fn shared() -> Shared {
        let shared = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec = serde_json::from_value(json!({"controllers": {"node": {}}})).unwrap();
        let run = crate::config::RunConfig::merge(&crate::config::EnvConfig::default(), Some(&api));
        shared.config.send_modify(|c| c.run = run);
        shared
    }

    async fn setup() -> (Arc<MemoryDatastore>, Arc<MemoryCluster>) {
        let ds = Arc::new(MemoryDatastore::new());
        let cluster = Arc::new(MemoryCluster::new());
        cluster.apply(ClusterKind::Node, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "live"}}));
        ds.create(Kind::CalicoNode, "gone", calico_node("gone", Some("gone"))).await.unwrap();
        ds.create(Kind::CalicoNode, "live", calico_node("live", Some("live"))).await.unwrap();
        ds.create(Kind::CalicoNode, "bare", calico_node("bare", None)).await.unwrap();
        for (kind, name, node) in [
            (Kind::WorkloadEndpoint, "ns/gone-k8s-a-eth0", "gone"),
            (Kind::WorkloadEndpoint, "ns/live-k8s-b-eth0", "live"),
            (Kind::BgpPeer, "peer-gone", "gone"),
            (Kind::HostEndpoint, "gone-eth0", "gone"),
            (Kind::HostEndpoint, "bare-eth0", "bare"),
        ] {
            ds.create(kind, name, on_node(node)).await.unwrap();
        }
        ds.create(Kind::FelixConfiguration, "node.gone", json!({"spec": {}})).await.unwrap();
        ds.create(Kind::FelixConfiguration, "default", json!({"spec": {}})).await.unwrap();
        (ds, cluster)
    }

    #[tokio::test]
    async fn a_calico_node_whose_kubernetes_node_is_gone_goes_with_its_objects_and_the_rest_stays() {
        let (ds, cluster) = setup().await;
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let mut g = MassGuard::new();
        sweep(&*ds, &*cluster, &shared, &leading, &opts(false), &whole_view(&["live"]), &mut g, Duration::ZERO).await;
        assert_eq!(names(&ds, Kind::CalicoNode), ["bare", "live"], "a node without a k8s orchRef is never touched");
        assert_eq!(names(&ds, Kind::WorkloadEndpoint), ["ns/live-k8s-b-eth0"]);
        assert!(names(&ds, Kind::BgpPeer).is_empty());
        assert_eq!(names(&ds, Kind::HostEndpoint), ["bare-eth0"]);
        assert_eq!(names(&ds, Kind::FelixConfiguration), ["default"]);
        let deleted = shared.metrics(|m| m.node_deletions.clone());
        assert_eq!(deleted.get(&("Node", "deleted")), Some(&1));
        assert_eq!(deleted.get(&("BGPConfiguration", "absent")), Some(&1));
        g.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn nothing_is_deleted_on_a_partial_view_by_a_standby_in_a_dry_run_or_while_the_node_exists() {
        let (ds, cluster) = setup().await;
        let before = ds.revision();
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let (_tx2, standby) = watch::channel(false);
        let mut g = MassGuard::new();
        // The node controller is off.
        let off = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec = serde_json::from_value(json!({"controllers": {}})).unwrap();
        off.config.send_modify(|c| c.run = crate::config::RunConfig::merge(&crate::config::EnvConfig::default(), Some(&api)));
        assert!(!off.config.borrow().run.gc_enabled());
        assert_eq!(sweep(&*ds, &*cluster, &off, &leading, &opts(false), &whole_view(&["live"]), &mut g, Duration::ZERO).await, Swept::NotNow);
        // Not listed yet, or listed but the watch fails since.
        assert_eq!(sweep(&*ds, &*cluster, &shared, &leading, &opts(false), &NodeView::default(), &mut g, Duration::ZERO).await, Swept::NotNow);
        let mut failing = whole_view(&["live"]);
        failing.apply(WatchEvent::Error(crate::datastore::watch::WatchFailure::transient("x")));
        assert!(!failing.whole());
        sweep(&*ds, &*cluster, &shared, &leading, &opts(false), &failing, &mut g, Duration::ZERO).await;
        sweep(&*ds, &*cluster, &shared, &standby, &opts(false), &whole_view(&["live"]), &mut g, Duration::ZERO).await;
        sweep(&*ds, &*cluster, &shared, &standby, &opts(true), &whole_view(&["live"]), &mut g, Duration::ZERO).await;
        // The view lacks the node but the re-read finds it.
        cluster.apply(ClusterKind::Node, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gone"}}));
        sweep(&*ds, &*cluster, &shared, &leading, &opts(false), &whole_view(&["live"]), &mut g, Duration::ZERO).await;
        assert_eq!(ds.revision(), before, "nothing written");
    }

    #[tokio::test]
    async fn a_mass_deletion_waits_for_a_sweep_a_grace_period_later() {
        let ds = Arc::new(MemoryDatastore::new());
        let cluster = Arc::new(MemoryCluster::new());
        for i in 0..10 {
            let name = format!("n{i}");
            ds.create(Kind::CalicoNode, &name, calico_node(&name, Some(&name))).await.unwrap();
        }
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let mut o = opts(false);
        o.guard = GuardConfig::default();
        let view = whole_view(&[]);
        // A sweep cut short by a failed re-read still counts every orphan the view shows: the
        // set is held, never let through in slices.
        let mut sliced = MassGuard::new();
        cluster.inject_get(ClusterKind::Node, crate::datastore::ErrorKind::Transient, 1);
        assert_eq!(sweep(&*ds, &*cluster, &shared, &leading, &o, &view, &mut sliced, Duration::ZERO).await, Swept::NotNow);
        assert_eq!(sliced.held().first().map(|h| h.waiting), Some(10));
        let mut g = MassGuard::new();
        let swept = sweep(&*ds, &*cluster, &shared, &leading, &o, &view, &mut g, Duration::ZERO).await;
        assert_eq!(swept, Swept::Held(Duration::from_secs(2)));
        assert_eq!(next_sweep(swept), Some(Duration::from_secs(3)), "the next sweep comes just after the guard's wait");
        assert_eq!(next_sweep(Swept::Held(Duration::from_secs(3600))), Some(SWEEP_EVERY + BATCH));
        assert_eq!(next_sweep(Swept::Held(Duration::ZERO)), None, "grace 0: no one-second spin");
        assert_eq!(ds.snapshot(Kind::CalicoNode).len(), 10, "every node at once: held");
        assert_eq!(shared.metrics(|m| m.mass_change_held.get(ETCD_NODES.name).copied()), Some(10));
        sweep(&*ds, &*cluster, &shared, &leading, &o, &view, &mut g, Duration::from_secs(1)).await;
        assert_eq!(ds.snapshot(Kind::CalicoNode).len(), 10, "still within the grace period");
        // Past the grace period a re-read fails: that sweep is no complete observation, lets
        // nothing through, and the held set keeps its place for the retry shortly after.
        cluster.inject_get(ClusterKind::Node, crate::datastore::ErrorKind::Transient, 1);
        assert_eq!(sweep(&*ds, &*cluster, &shared, &leading, &o, &view, &mut g, Duration::from_secs(3)).await, Swept::NotNow);
        assert_eq!(ds.snapshot(Kind::CalicoNode).len(), 10, "a cut-short sweep deletes nothing");
        g.check_invariants().unwrap();
        sweep(&*ds, &*cluster, &shared, &leading, &o, &view, &mut g, Duration::from_secs(3) + BATCH).await;
        assert!(ds.snapshot(Kind::CalicoNode).is_empty(), "proposed again a grace period later: done");
        g.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn with_label_sync_on_a_calico_node_gets_its_kubernetes_nodes_labels_once_and_keeps_its_own() {
        let ds = Arc::new(MemoryDatastore::new());
        let cluster = Arc::new(MemoryCluster::new());
        let mut node = calico_node("cn", Some("k"));
        node["metadata"]["labels"] = json!({"user": "x"});
        ds.create(Kind::CalicoNode, "cn", node).await.unwrap();
        ds.create(Kind::CalicoNode, "bare", calico_node("bare", None)).await.unwrap();
        let shared = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec =
            serde_json::from_value(json!({"controllers": {"node": {"syncLabels": "Enabled"}}})).unwrap();
        let vars = [("DATASTORE_TYPE", "etcdv3"), ("ETCD_ENDPOINTS", "http://127.0.0.1:2379")].map(|(k, v)| (k.to_string(), v.to_string())).into_iter().collect();
        let env = crate::config::EnvConfig::from_env(&vars).unwrap();
        shared.config.send_modify(|c| c.run = crate::config::RunConfig::merge(&env, Some(&api)));
        assert!(shared.config.borrow().run.node.as_ref().unwrap().sync_labels);
        let (_tx, leading) = watch::channel(true);
        let mut g = MassGuard::new();
        let mut view = whole_view(&[]);
        let mut k = stored("k");
        k.value = json!({"metadata": {"labels": {"zone": "a", "role": "w"}}});
        view.apply(WatchEvent::Apply(k));
        sweep(&*ds, &*cluster, &shared, &leading, &opts(false), &view, &mut g, Duration::ZERO).await;
        let cn = ds.peek(Kind::CalicoNode, "cn").unwrap();
        assert_eq!(cn.value["metadata"]["labels"], json!({"user": "x", "zone": "a", "role": "w"}));
        assert_eq!(cn.value["metadata"]["annotations"][KUBE_LABELS_ANNOTATION], r#"{"role":"w","zone":"a"}"#);
        let before = ds.revision();
        sweep(&*ds, &*cluster, &shared, &leading, &opts(false), &view, &mut g, Duration::ZERO).await;
        assert_eq!(ds.revision(), before, "nothing changed: nothing written");
        let mut k = stored("k");
        k.value = json!({"metadata": {"labels": {"zone": "b"}}});
        view.apply(WatchEvent::Apply(k));
        sweep(&*ds, &*cluster, &shared, &leading, &opts(false), &view, &mut g, Duration::ZERO).await;
        assert_eq!(ds.peek(Kind::CalicoNode, "cn").unwrap().value["metadata"]["labels"], json!({"user": "x", "zone": "b"}));
        assert!(ds.peek(Kind::CalicoNode, "bare").unwrap().value["metadata"].get("labels").is_none(), "no Kubernetes node: untouched");
    }

    #[test]
    fn the_view_is_whole_only_between_a_completed_list_and_a_failure() {
        let mut v = NodeView::default();
        assert!(!v.whole());
        v = whole_view(&["a", "b"]);
        assert!(v.whole());
        assert!(v.apply(WatchEvent::Delete(stored("a"))), "a deletion calls for a sweep");
        assert!(v.apply(WatchEvent::Apply(stored("c"))), "a new node calls for a sweep (its labels)");
        assert!(!v.apply(WatchEvent::Apply(stored("c"))), "a status update without a label change does not");
        let mut labelled = stored("c");
        labelled.value = json!({"metadata": {"labels": {"zone": "a"}}});
        assert!(v.apply(WatchEvent::Apply(labelled)), "a label change does");
        assert_eq!(v.names.items().keys().collect::<Vec<_>>(), ["b", "c"]);
        v.apply(WatchEvent::Init);
        assert!(!v.whole(), "a relist in progress is not whole");
        v.apply(WatchEvent::InitApply(stored("b")));
        v.apply(WatchEvent::InitDone);
        assert_eq!(v.names.items().keys().collect::<Vec<_>>(), ["b"], "a relist replaces the names");
    }
}
