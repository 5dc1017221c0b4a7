//! Automatic host endpoints (SPEC §1.6), the shell around [`crate::host_endpoints`]: part of the
//! node controller, on both datastores. Nodes come from the Kubernetes Nodes and their
//! `projectcalico.org/*` annotations (KDD) or from the Calico Nodes (etcd); HostEndpoints are the
//! datastore's (`HostEndpoint` CRDs, or v3 resources in etcd).
//!
//! Owns: its watches of the nodes and of the HostEndpoints (only the facts the core needs of a
//! node; the HostEndpoints as stored, so an update carries the revision its compare-and-swap
//! needs without a read first), when a round runs (a node or HostEndpoint change, batched over
//! 1 s; a configuration change; every [`RESYNC_EVERY`]), the proof that a node is gone before
//! its HostEndpoints go, the mass-change guard's `host-endpoints` scope, the writes, and the
//! reports of templates it cannot use (log, metrics, the [`TEMPLATES_KEY`] readiness reason and
//! an Event on the KubeControllersConfiguration).
//! Must not: write on a view that is not whole or while this replica does not lead (a dry run
//! logs what it would write), delete a HostEndpoint because its node is missing from the view
//! without reading the node first, or touch a HostEndpoint it did not create, except (KDD) one
//! whose node is proven gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use super::Shared;
use super::events::{EventRecorder, EventRequest};
use super::listed::Listed;
use crate::config::NodeRunConfig;
use crate::datastore::cluster::{ClusterKind, ClusterReader};
use crate::datastore::watch::{WatchEvent, WatchStream};
use crate::datastore::{Datastore, DsResult, ErrorKind, Kind, Stored};
use crate::guard::{self, GuardConfig, MassGuard, Proposal, Scope, Unit};
use crate::host_endpoints::{self as core, HostEndpointConfig, NodeData};
use crate::reconcile::Write;

/// The metric label, readiness key and log name of this controller.
pub const NAME: &str = "hostendpoint";
/// Readiness key (always ready) whose reason lists the templates that cannot be used; absent
/// when every template is usable.
pub const TEMPLATES_KEY: &str = "HostEndpointTemplates";
const SCOPE: Scope = Scope { name: "host-endpoints", unit: Unit::Addresses };
/// Upstream's full host-endpoint sync period; events sync sooner.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// Changes within this window share one round.
const BATCH: Duration = Duration::from_secs(1);
/// A round that could not run (no whole view, a read failed) is tried again this much later.
const RETRY: Duration = Duration::from_secs(5);

/// Where the nodes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeSource {
    /// KDD: Kubernetes Nodes, converted as libcalico converts them (`use_pod_cidr`: `USE_POD_CIDR`).
    Kubernetes { use_pod_cidr: bool },
    /// etcd: Calico Nodes.
    Calico,
}

impl NodeSource {
    fn watch<D: Datastore, C: ClusterReader>(self, ds: &D, cluster: &C) -> WatchStream {
        match self {
            NodeSource::Kubernetes { .. } => cluster.watch(ClusterKind::Node),
            NodeSource::Calico => ds.watch(Kind::CalicoNode),
        }
    }

    fn node_data(self, value: &Value) -> Option<NodeData> {
        match self {
            NodeSource::Kubernetes { use_pod_cidr } => NodeData::from_kubernetes_node(value, use_pod_cidr),
            NodeSource::Calico => NodeData::from_calico_node(value),
        }
    }

    /// Whether the node exists, read from its source (not the watch). `Ok(false)` only on a
    /// not-found answer.
    async fn exists<D: Datastore, C: ClusterReader>(self, ds: &D, cluster: &C, name: &str) -> DsResult<bool> {
        let read = match self {
            NodeSource::Kubernetes { .. } => cluster.get(ClusterKind::Node, "", name).await,
            NodeSource::Calico => ds.get(Kind::CalicoNode, name).await,
        };
        match read {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// What the readiness reason names as watched.
    fn watched(self) -> &'static str {
        match self {
            NodeSource::Kubernetes { .. } => "Nodes and HostEndpoints",
            NodeSource::Calico => "Calico Nodes and HostEndpoints",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HostEndpointOptions {
    pub dry_run: bool,
    pub guard: GuardConfig,
    pub source: NodeSource,
    /// Where the Event about unusable templates goes.
    pub events: EventRecorder,
    /// The KubeControllersConfiguration the templates come from (the Event is about it).
    pub kcc: Option<String>,
    /// Writes in flight at once.
    pub workers: usize,
}

/// What the watches show: each node's facts, every HostEndpoint as stored, and whether both
/// views are whole.
#[derive(Debug, Default)]
struct View {
    nodes: Listed<NodeData>,
    heps: Listed<Stored>,
    /// Nodes this process saw deleted (and not back since): only their unmanaged HostEndpoints
    /// go with them in KDD, never those of a node that has not joined yet or is misspelt.
    deleted: BTreeSet<String>,
}

impl View {
    /// Applies one node event; true when what a node wants may have changed.
    fn apply_node(&mut self, source: NodeSource, event: WatchEvent) -> bool {
        match event {
            WatchEvent::Init => self.nodes.begin(),
            WatchEvent::InitApply(o) => {
                if let Some(n) = source.node_data(&o.value) {
                    self.deleted.remove(&n.name);
                    self.nodes.listed(n.name.clone(), n);
                }
            }
            WatchEvent::InitDone => {
                // A node known before the relist and missing from it was deleted meanwhile.
                let before: BTreeSet<String> = self.nodes.items().keys().cloned().collect();
                self.nodes.end();
                self.deleted.extend(before.into_iter().filter(|n| !self.nodes.contains(n)));
                return true;
            }
            WatchEvent::Apply(o) => {
                let Some(n) = source.node_data(&o.value) else {
                    self.nodes.delivered();
                    return false;
                };
                self.deleted.remove(&n.name);
                let old = self.nodes.upsert(n.name.clone(), n.clone());
                return old.as_ref() != Some(&n);
            }
            WatchEvent::Delete(o) => {
                let known = self.nodes.remove(&o.name).is_some();
                if known {
                    self.deleted.insert(o.name);
                }
                return known;
            }
            WatchEvent::Error(e) => self.nodes.failed(e.message),
            WatchEvent::Resumed => self.nodes.delivered(),
        }
        false
    }

    /// Applies one HostEndpoint event; true when a round should look (any change: an external
    /// edit is drift to repair, and a round with nothing to do writes nothing).
    fn apply_hep(&mut self, event: WatchEvent) -> bool {
        match event {
            WatchEvent::Init => self.heps.begin(),
            WatchEvent::InitApply(o) => self.heps.listed(o.name.clone(), o),
            WatchEvent::InitDone => {
                self.heps.end();
                return true;
            }
            WatchEvent::Apply(o) => {
                let old = self.heps.upsert(o.name.clone(), o.clone());
                return old.is_none_or(|old| old.value != o.value);
            }
            WatchEvent::Delete(o) => return self.heps.remove(&o.name).is_some(),
            WatchEvent::Error(e) => self.heps.failed(e.message),
            WatchEvent::Resumed => self.heps.delivered(),
        }
        false
    }

    fn whole(&self) -> bool {
        self.nodes.whole() && self.heps.whole()
    }

    /// Checks the view's own consistency (tests run it): every node is keyed by its name and
    /// every HostEndpoint by its own.
    #[cfg(test)]
    fn check_invariants(&self) -> Result<(), String> {
        if let Some((k, n)) = self.nodes.items().iter().find(|(k, n)| **k != n.name) {
            return Err(format!("node keyed {k} holds {}", n.name));
        }
        if let Some((k, h)) = self.heps.items().iter().find(|(k, h)| **k != h.name) {
            return Err(format!("host endpoint keyed {k} holds {}", h.name));
        }
        Ok(())
    }
}

/// Whether a round ran, or when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Ran,
    /// Nothing to do until the configuration or leadership changes (the node controller is off,
    /// this replica does not lead).
    Idle,
    NotNow,
    /// The guard holds deletes: the round that may let them through is due this much later.
    Held(Duration),
}

/// The templates last reported, so a report (log, Event) is made once per change.
#[derive(Debug, Default)]
struct Reported {
    problems: Option<Vec<String>>,
    blocked: Vec<String>,
}

/// Runs until `stop` turns true.
pub async fn run<D: Datastore, C: ClusterReader>(
    ds: Arc<D>,
    cluster: Arc<C>,
    shared: Arc<Shared>,
    mut may_write: watch::Receiver<bool>,
    opts: HostEndpointOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut nodes = opts.source.watch(&*ds, &*cluster);
    let mut heps = ds.watch(Kind::HostEndpoint);
    let mut config = shared.config.subscribe();
    let mut view = View::default();
    let mut guard = MassGuard::new();
    let mut reported = Reported::default();
    let started = tokio::time::Instant::now();
    let mut due: Option<tokio::time::Instant> = None;
    let mut periodic = tokio::time::interval(RESYNC_EVERY);
    periodic.tick().await;
    let mut node_config = shared.config.borrow().run.node.clone();
    let mut config_listed = shared.config.borrow().listed;
    loop {
        let enabled = node_config.is_some();
        let failing = view.nodes.failing().or(view.heps.failing());
        shared.status.controller_view(NAME, opts.source.watched(), enabled, view.nodes.synced() && view.heps.synced(), failing);
        let wait = super::sleep_until_due(due);
        tokio::select! {
            event = nodes.next() => {
                let Some(event) = event else { return };
                if view.apply_node(opts.source, event) {
                    due = super::due_within(due, BATCH);
                }
            }
            event = heps.next() => {
                let Some(event) = event else { return };
                if view.apply_hep(event) {
                    due = super::due_within(due, BATCH);
                }
            }
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                let (now, now_listed) = {
                    let c = config.borrow_and_update();
                    (c.run.node.clone(), c.listed)
                };
                if now != node_config || now_listed != config_listed {
                    node_config = now;
                    config_listed = now_listed;
                    due = super::due_within(due, BATCH);
                }
            }
            changed = may_write.changed() => {
                if changed.is_err() {
                    return;
                }
                if *may_write.borrow_and_update() {
                    due = super::due_within(due, BATCH);
                }
            }
            _ = wait => {
                let round_started = tokio::time::Instant::now();
                let outcome = round(&*ds, &*cluster, &shared, &may_write, &opts, node_config.as_ref(), &view, &mut guard, &mut reported, started.elapsed()).await;
                if matches!(outcome, Round::Ran | Round::Held(_)) {
                    shared.metrics(|m| m.light_round(NAME, round_started.elapsed()));
                }
                due = match outcome {
                    Round::Ran | Round::Idle => None,
                    Round::NotNow => Some(tokio::time::Instant::now() + RETRY),
                    // A zero wait lets only approvals through: the periodic sync, not a spin.
                    Round::Held(wait) if wait.is_zero() => None,
                    Round::Held(wait) => Some(tokio::time::Instant::now() + wait.min(RESYNC_EVERY) + BATCH),
                };
            }
            _ = periodic.tick() => {
                due = super::due_within(due, Duration::ZERO);
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// One round: the configuration's templates, the wanted HostEndpoints of every node, the plan,
/// the proof for deletes of nodes the view lacks, the guard, the writes.
#[allow(clippy::too_many_arguments)]
async fn round<D: Datastore, C: ClusterReader>(
    ds: &D,
    cluster: &C,
    shared: &Shared,
    may_write: &watch::Receiver<bool>,
    opts: &HostEndpointOptions,
    node_config: Option<&NodeRunConfig>,
    view: &View,
    guard: &mut MassGuard,
    reported: &mut Reported,
    now: Duration,
) -> Round {
    // Before the KubeControllersConfiguration's first list, `node_config` is the start-up
    // default (auto-create off): acting on it would delete every managed HostEndpoint.
    if !shared.config.borrow().listed {
        return Round::Idle;
    }
    let Some(node_config) = node_config else {
        report_templates(shared, opts, reported, &[]);
        return Round::Idle;
    };
    if !(opts.dry_run || *may_write.borrow()) {
        return Round::Idle;
    }
    if !view.whole() {
        return Round::NotNow;
    }
    let (cfg, errors) = HostEndpointConfig::from_api(node_config.host_endpoint.as_ref(), node_config.host_endpoint_override);
    report_templates(shared, opts, reported, &errors);

    let desired = core::desired_all(view.nodes.items().values(), &cfg);
    let mut plan = core::plan(&desired, view.heps.items().values());
    report_blocked(shared, reported, &plan.blocked);
    // KDD: a node's own HostEndpoints go with it, as etcd's cascade takes them.
    let mut cascaded = 0u64;
    if matches!(opts.source, NodeSource::Kubernetes { .. }) {
        let cascade = core::of_unknown_nodes(view.heps.items().values(), |n| view.nodes.contains(n) || !view.deleted.contains(n));
        cascaded = cascade.len() as u64;
        plan.writes.extend(cascade.into_iter().map(|s| Write::Delete { current: s.clone() }));
    }

    // A delete because the node is missing from the view waits for a read that proves it gone.
    let mut gone: BTreeMap<String, bool> = BTreeMap::new();
    let mut cut_short = false;
    let mut writes = Vec::with_capacity(plan.writes.len());
    for write in plan.writes {
        let node = match &write {
            Write::Delete { current } => core::node_of(&current.value).filter(|n| !view.nodes.contains(n)).map(str::to_string),
            _ => None,
        };
        let Some(node) = node else {
            writes.push(write);
            continue;
        };
        let proven = match gone.get(&node) {
            Some(g) => *g,
            None if cut_short => continue,
            None => match opts.source.exists(ds, cluster, &node).await {
                Ok(exists) => {
                    if exists {
                        tracing::info!(node = %node, "host endpoints: the node is missing from the watch but exists; its host endpoints kept");
                    }
                    gone.insert(node.clone(), !exists);
                    !exists
                }
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "host endpoints: reading the node failed; its host endpoints are kept this round");
                    cut_short = true;
                    continue;
                }
            },
        };
        if proven {
            writes.push(write);
        }
    }

    let deletes: BTreeMap<u64, usize> =
        writes.iter().enumerate().filter(|(_, w)| matches!(w, Write::Delete { .. })).map(|(i, w)| (guard::fingerprint(&[w.name().as_bytes()]), i)).collect();
    let members: BTreeSet<u64> = deletes.keys().copied().collect();
    let grace = shared.config.borrow().run.leak_grace();
    // What the deletes are a share of: the managed HostEndpoints and the cascade's candidates
    // (a user's own many HostEndpoints must not dilute a mass deletion of ours).
    let total = view.heps.items().values().filter(|h| core::is_managed(&h.value)).count() as u64 + cascaded;
    let decision = guard.review(SCOPE, Proposal { members: &members, total, complete: !cut_short }, &opts.guard, now.as_millis() as i64, grace, &BTreeSet::new());
    let held: u64 = guard.held().iter().filter(|h| h.scope == SCOPE).map(|h| h.waiting).sum();
    shared.metrics(|m| {
        m.mass_change_held.insert(SCOPE.name, held);
        m.light_desired.insert(NAME, desired.len() as u64);
    });
    if held > 0 {
        tracing::warn!(held, host_endpoints = total, "mass-change guard: host endpoint deletes held until a round one grace period later proposes them again");
    }
    let allowed: BTreeSet<usize> = deletes.iter().filter(|(m, _)| decision.allows(**m)).map(|(_, i)| *i).collect();
    let chosen: Vec<usize> = writes.iter().enumerate().filter(|(i, w)| !matches!(w, Write::Delete { .. }) || allowed.contains(i)).map(|(i, _)| i).collect();
    let done = match (held > 0, cut_short) {
        (true, _) => Round::Held(Duration::from_millis(grace.max(0) as u64)),
        (false, true) => Round::NotNow,
        (false, false) => Round::Ran,
    };
    if opts.dry_run {
        for w in chosen.iter().map(|i| &writes[*i]) {
            tracing::info!(controller = NAME, op = w.op(), name = w.name(), "dry run: would write");
        }
        return done;
    }
    // Creates and updates first, then deletes (a round cut short never removes before it adds).
    for deleting in [false, true] {
        let phase: Vec<usize> = chosen.iter().copied().filter(|i| matches!(writes[*i], Write::Delete { .. }) == deleting).collect();
        let (writes, desired) = (&writes, &desired);
        let results: Vec<(usize, Option<DsResult<()>>)> =
            futures::stream::iter(phase).map(|i| async move { (i, write_one(ds, may_write, desired, &writes[i]).await) }).buffer_unordered(opts.workers.max(1)).collect().await;
        let mut stopped_leading = false;
        for (i, result) in results {
            let write = &writes[i];
            let Some(result) = result else {
                stopped_leading = true;
                continue;
            };
            let outcome = match &result {
                Ok(()) => "ok",
                Err(e) if e.is_conflict() || e.is_not_found() || e.kind == ErrorKind::AlreadyExists => "conflict",
                Err(_) => "failed",
            };
            match &result {
                Ok(()) => tracing::info!(controller = NAME, op = write.op(), name = write.name(), "host endpoint written"),
                // The watch had not shown the object's latest state yet: the next round sees it.
                Err(e) if outcome == "conflict" => tracing::info!(controller = NAME, op = write.op(), name = write.name(), error = %e, "host endpoint changed meanwhile; the next round looks again"),
                Err(e) => tracing::warn!(controller = NAME, op = write.op(), name = write.name(), error = %e, "host endpoint write failed; the next round retries"),
            }
            shared.metrics(|m| *m.light_writes.entry((NAME, write.op(), outcome)).or_default() += 1);
        }
        if stopped_leading {
            return Round::Idle;
        }
    }
    done
}

/// One write, unless this replica stopped leading (`None`).
async fn write_one<D: Datastore>(ds: &D, may_write: &watch::Receiver<bool>, desired: &BTreeMap<String, Value>, write: &Write) -> Option<DsResult<()>> {
    if !*may_write.borrow() {
        return None;
    }
    let result = match write {
        Write::Create { name } => match desired.get(name) {
            Some(want) => ds.create(Kind::HostEndpoint, name, want.clone()).await.map(|_| ()),
            None => Err(crate::datastore::DatastoreError::invalid(format!("{name}: planned but not wanted"))),
        },
        Write::Update { current, value } => ds.update(Kind::HostEndpoint, &Stored { value: value.clone(), ..current.clone() }).await.map(|_| ()),
        Write::Delete { current } => ds.delete(Kind::HostEndpoint, &current.name, &current.exact()).await,
    };
    Some(result)
}

/// Reports the templates that cannot be used when that list changes: the log, the metrics, the
/// [`TEMPLATES_KEY`] readiness reason (ready: the other templates still work) and an Event on
/// the KubeControllersConfiguration.
fn report_templates(shared: &Shared, opts: &HostEndpointOptions, reported: &mut Reported, errors: &[core::TemplateError]) {
    let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
    if reported.problems.as_ref() == Some(&problems) {
        return;
    }
    shared.metrics(|m| {
        m.host_endpoint_templates_invalid = errors.len() as u64;
        for e in errors {
            *m.conversion_errors.entry((NAME, e.problem.category())).or_default() += 1;
        }
    });
    if problems.is_empty() {
        shared.status.remove_ready(TEMPLATES_KEY);
    } else {
        for p in &problems {
            tracing::error!(problem = %p, "host endpoint template cannot be used: skipped (its host endpoints are not made, existing ones go as stale)");
        }
        shared.status.set_ready(TEMPLATES_KEY, true, problems.join("; "));
        if let Some(kcc) = &opts.kcc {
            opts.events.record(EventRequest::invalid_host_endpoint_templates(kcc, &problems));
        }
    }
    reported.problems = Some(problems);
}

fn report_blocked(shared: &Shared, reported: &mut Reported, blocked: &[String]) {
    if reported.blocked == blocked {
        return;
    }
    for name in blocked.iter().filter(|n| !reported.blocked.contains(n)) {
        tracing::warn!(name = %name, "host endpoint: the name is held by a HostEndpoint this controller did not create; left alone");
    }
    shared.metrics(|m| m.host_endpoints_blocked = blocked.len() as u64);
    reported.blocked = blocked.to_vec();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EnvConfig, RunConfig};
    use crate::datastore::{MemoryCluster, MemoryDatastore};
    use crate::host_endpoints::{CREATED_BY_LABEL, CREATED_BY_VALUE};
    use serde_json::json;

    const KDD: NodeSource = NodeSource::Kubernetes { use_pod_cidr: false };

    fn shared_with(host_endpoint: Value) -> Shared {
        let shared = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec =
            serde_json::from_value(json!({"controllers": {"node": {"hostEndpoint": host_endpoint}}})).unwrap();
        shared.config.send_modify(|c| {
            c.run = RunConfig::merge(&EnvConfig::default(), Some(&api));
            c.listed = true;
        });
        shared
    }

    fn node_config(shared: &Shared) -> Option<NodeRunConfig> {
        shared.config.borrow().run.node.clone()
    }

    fn k8s_node(name: &str, labels: Value, ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
               "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    }

    fn stored(name: &str, value: Value) -> Stored {
        Stored { name: name.into(), revision: "1".into(), uid: format!("u-{name}"), value }
    }

    /// A view listed from `nodes` and the datastore's HostEndpoints.
    fn view_of(source: NodeSource, nodes: &[Value], ds: &MemoryDatastore) -> View {
        let mut v = View::default();
        v.apply_node(source, WatchEvent::Init);
        for n in nodes {
            v.apply_node(source, WatchEvent::InitApply(stored(n["metadata"]["name"].as_str().unwrap(), n.clone())));
        }
        assert!(v.apply_node(source, WatchEvent::InitDone));
        v.apply_hep(WatchEvent::Init);
        for h in ds.snapshot(Kind::HostEndpoint) {
            v.apply_hep(WatchEvent::InitApply(h));
        }
        assert!(v.apply_hep(WatchEvent::InitDone));
        v.check_invariants().unwrap();
        v
    }

    fn opts(source: NodeSource) -> HostEndpointOptions {
        HostEndpointOptions { dry_run: false, guard: GuardConfig::OFF, source, events: EventRecorder::off(), kcc: Some("default".into()), workers: 2 }
    }

    fn names(ds: &MemoryDatastore) -> Vec<String> {
        let mut n: Vec<String> = ds.snapshot(Kind::HostEndpoint).into_iter().map(|s| s.name).collect();
        n.sort();
        n
    }

    fn managed(name: &str, node: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {CREATED_BY_LABEL: CREATED_BY_VALUE}}, "spec": {"node": node, "interfaceName": "*"}})
    }

    async fn run_round(ds: &MemoryDatastore, cluster: &MemoryCluster, shared: &Shared, o: &HostEndpointOptions, view: &View, leading: bool) -> Round {
        let (_tx, may_write) = watch::channel(leading);
        let mut g = MassGuard::new();
        let r = round(ds, cluster, shared, &may_write, o, node_config(shared).as_ref(), view, &mut g, &mut Reported::default(), Duration::ZERO).await;
        g.check_invariants().unwrap();
        r
    }

    #[tokio::test]
    async fn kdd_nodes_get_their_default_host_endpoint_and_a_second_round_writes_nothing() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let shared = shared_with(json!({"autoCreate": "Enabled"}));
        let nodes = [k8s_node("a", json!({"zone": "1"}), "192.168.0.1"), k8s_node("b", json!({}), "192.168.0.2")];
        let view = view_of(KDD, &nodes, &ds);
        assert_eq!(run_round(&ds, &cluster, &shared, &opts(KDD), &view, true).await, Round::Ran);
        assert_eq!(names(&ds), ["a-auto-hep", "b-auto-hep"]);
        let a = ds.peek(Kind::HostEndpoint, "a-auto-hep").unwrap().value;
        assert_eq!(a["spec"]["expectedIPs"], json!(["192.168.0.1"]));
        assert_eq!(a["metadata"]["labels"], json!({"zone": "1", CREATED_BY_LABEL: CREATED_BY_VALUE}));
        let before = ds.revision();
        let view = view_of(KDD, &nodes, &ds);
        run_round(&ds, &cluster, &shared, &opts(KDD), &view, true).await;
        assert_eq!(ds.revision(), before, "in step: nothing written");
        assert_eq!(shared.metrics(|m| m.light_writes.get(&(NAME, "create", "ok")).copied()), Some(2));
        assert_eq!(shared.metrics(|m| m.light_desired.get(NAME).copied()), Some(2));
    }

    #[tokio::test]
    async fn a_node_missing_from_the_view_keeps_its_host_endpoints_until_a_read_proves_it_gone() {
        let ds = MemoryDatastore::new();
        ds.create(Kind::HostEndpoint, "late-auto-hep", managed("late-auto-hep", "late")).await.unwrap();
        ds.create(Kind::HostEndpoint, "gone-auto-hep", managed("gone-auto-hep", "gone")).await.unwrap();
        ds.create(Kind::HostEndpoint, "gone-eth0", json!({"metadata": {"name": "gone-eth0"}, "spec": {"node": "gone", "interfaceName": "eth0"}})).await.unwrap();
        ds.create(Kind::HostEndpoint, "mine", json!({"metadata": {"name": "mine"}, "spec": {"node": "late"}})).await.unwrap();
        ds.create(Kind::HostEndpoint, "typo", json!({"metadata": {"name": "typo"}, "spec": {"node": "nonode"}})).await.unwrap();
        let cluster = MemoryCluster::new();
        // `late` exists but the watch has not shown it yet.
        cluster.apply(ClusterKind::Node, k8s_node("late", json!({}), "10.0.0.9"));
        let shared = shared_with(json!({"autoCreate": "Enabled"}));
        // `gone` was listed, then deleted; `nonode` was never seen.
        let mut view = view_of(KDD, &[k8s_node("gone", json!({}), "10.0.0.8")], &ds);
        assert!(view.apply_node(KDD, WatchEvent::Delete(stored("gone", k8s_node("gone", json!({}), "10.0.0.8")))));

        cluster.inject_get(ClusterKind::Node, ErrorKind::Transient, 5);
        assert_eq!(run_round(&ds, &cluster, &shared, &opts(KDD), &view, true).await, Round::NotNow, "a read failed: tried again soon");
        assert_eq!(names(&ds), ["gone-auto-hep", "gone-eth0", "late-auto-hep", "mine", "typo"], "nothing deleted without proof");

        let cluster = MemoryCluster::new();
        cluster.apply(ClusterKind::Node, k8s_node("late", json!({}), "10.0.0.9"));
        assert_eq!(run_round(&ds, &cluster, &shared, &opts(KDD), &view, true).await, Round::Ran);
        assert_eq!(names(&ds), ["late-auto-hep", "mine", "typo"], "in KDD every host endpoint of a node seen deleted goes, managed or not; a live node's stay, and a user's naming a node never seen");

        // etcd: the node deleter's cascade owns a gone node's other host endpoints.
        let ds = MemoryDatastore::new();
        ds.create(Kind::HostEndpoint, "gone-auto-hep", managed("gone-auto-hep", "gone")).await.unwrap();
        ds.create(Kind::HostEndpoint, "gone-eth0", json!({"metadata": {"name": "gone-eth0"}, "spec": {"node": "gone"}})).await.unwrap();
        let view = view_of(NodeSource::Calico, &[], &ds);
        run_round(&ds, &cluster, &shared, &opts(NodeSource::Calico), &view, true).await;
        assert_eq!(names(&ds), ["gone-eth0"]);
    }

    #[tokio::test]
    async fn drift_is_repaired_labels_follow_the_node_and_turning_auto_create_off_deletes_only_managed_ones() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let shared = shared_with(json!({"autoCreate": "Enabled"}));
        ds.create(Kind::HostEndpoint, "users", json!({"metadata": {"name": "users"}, "spec": {"node": "a"}})).await.unwrap();
        let mut nodes = vec![k8s_node("a", json!({"zone": "1"}), "192.168.0.1")];
        run_round(&ds, &cluster, &shared, &opts(KDD), &view_of(KDD, &nodes, &ds), true).await;
        let mut edited = ds.peek(Kind::HostEndpoint, "a-auto-hep").unwrap();
        edited.value["spec"]["expectedIPs"] = json!(["1.2.3.4"]);
        edited.value["metadata"]["annotations"] = json!({"keep": "me?"});
        ds.update(Kind::HostEndpoint, &edited).await.unwrap();
        nodes[0]["metadata"]["labels"]["zone"] = json!("2");
        run_round(&ds, &cluster, &shared, &opts(KDD), &view_of(KDD, &nodes, &ds), true).await;
        let a = ds.peek(Kind::HostEndpoint, "a-auto-hep").unwrap();
        assert_eq!(a.value["spec"]["expectedIPs"], json!(["192.168.0.1"]), "drift repaired");
        assert_eq!(a.value["metadata"]["labels"]["zone"], "2", "labels follow the node");
        assert!(a.value["metadata"].get("annotations").is_none(), "the wanted annotations (none) replace an edit's");
        assert_eq!(a.uid, edited.uid, "updated in place, not recreated");

        let off = shared_with(json!({"autoCreate": "Disabled"}));
        run_round(&ds, &cluster, &off, &opts(KDD), &view_of(KDD, &nodes, &ds), true).await;
        assert_eq!(names(&ds), ["users"], "every managed one deleted, the user's kept");
    }

    #[tokio::test]
    async fn nothing_is_written_by_a_standby_on_a_partial_view_in_a_dry_run_or_with_the_node_controller_off() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let shared = shared_with(json!({"autoCreate": "Enabled"}));
        let nodes = [k8s_node("a", json!({}), "192.168.0.1")];
        let view = view_of(KDD, &nodes, &ds);
        assert_eq!(run_round(&ds, &cluster, &shared, &opts(KDD), &view, false).await, Round::Idle);
        let mut partial = view_of(KDD, &nodes, &ds);
        partial.apply_hep(WatchEvent::Init);
        assert_eq!(run_round(&ds, &cluster, &shared, &opts(KDD), &partial, true).await, Round::NotNow);
        let mut failing = view_of(KDD, &nodes, &ds);
        failing.apply_node(KDD, WatchEvent::Error(crate::datastore::WatchFailure::transient("boom")));
        assert_eq!(run_round(&ds, &cluster, &shared, &opts(KDD), &failing, true).await, Round::NotNow);
        let dry = HostEndpointOptions { dry_run: true, ..opts(KDD) };
        assert_eq!(run_round(&ds, &cluster, &shared, &dry, &view, false).await, Round::Ran);
        let none = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec = serde_json::from_value(json!({"controllers": {"policy": {}}})).unwrap();
        none.config.send_modify(|c| {
            c.run = RunConfig::merge(&EnvConfig::default(), Some(&api));
            c.listed = true;
        });
        assert_eq!(run_round(&ds, &cluster, &none, &opts(KDD), &view, true).await, Round::Idle);
        // Before the configuration's first list the start-up default (auto-create off) is no
        // instruction: nothing is deleted.
        ds.create(Kind::HostEndpoint, "a-auto-hep", managed("a-auto-hep", "a")).await.unwrap();
        let unlisted = shared_with(json!({"autoCreate": "Enabled"}));
        unlisted.config.send_modify(|c| {
            c.run = RunConfig::merge(&EnvConfig::default(), None);
            c.listed = false;
        });
        assert_eq!(run_round(&ds, &cluster, &unlisted, &opts(KDD), &view_of(KDD, &nodes, &ds), true).await, Round::Idle);
        assert_eq!(names(&ds), ["a-auto-hep"]);
        ds.delete(Kind::HostEndpoint, "a-auto-hep", &crate::datastore::Precondition::default()).await.unwrap();
        assert!(names(&ds).is_empty());
    }

    #[tokio::test]
    async fn an_unusable_template_is_logged_counted_shown_in_readiness_and_sent_as_one_event_while_the_rest_work() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let shared = shared_with(json!({"autoCreate": "Enabled", "templates": [
            {"generateName": "bad", "nodeSelector": "has(", "interfaceCIDRs": ["10.0.0.0/8"]},
            {"generateName": "good", "nodeSelector": "all()", "interfaceCIDRs": ["192.168.0.0/16"]}
        ]}));
        let (events, recorded) = EventRecorder::memory();
        let o = HostEndpointOptions { events, ..opts(KDD) };
        let view = view_of(KDD, &[k8s_node("a", json!({}), "192.168.0.1")], &ds);
        let (_tx, may_write) = watch::channel(true);
        let (mut g, mut reported) = (MassGuard::new(), Reported::default());
        for _ in 0..2 {
            round(&ds, &cluster, &shared, &may_write, &o, node_config(&shared).as_ref(), &view, &mut g, &mut reported, Duration::ZERO).await;
        }
        assert_eq!(names(&ds), ["a-auto-hep", "a-good-auto-hep"], "the usable template and the default still work");
        let e = recorded.take();
        assert_eq!(e.len(), 1, "one Event per change, not per round: {e:?}");
        assert_eq!((e[0].regarding.kind.as_str(), e[0].regarding.name.as_str(), e[0].reason), ("KubeControllersConfiguration", "default", "InvalidHostEndpointTemplate"));
        assert!(e[0].note.contains("\"bad\"") && e[0].note.contains("nodeSelector"), "{}", e[0].note);
        let status = shared.status.snapshot();
        assert_eq!(status.ready(), Ok(()), "a bad template never makes the process unready");
        let json = serde_json::to_value(&status).unwrap();
        let reason = json["Readiness"][TEMPLATES_KEY]["Reason"].as_str().unwrap_or_default().to_string();
        assert!(reason.contains("template 0 (\"bad\")"), "{json}");
        assert_eq!(json["Readiness"][TEMPLATES_KEY]["Ready"], true);
        let text = shared.render_metrics();
        assert!(text.contains("kube_controllers_host_endpoint_templates_invalid 1"), "{text}");
        assert!(text.contains("kube_controllers_conversion_errors_total{controller=\"hostendpoint\",category=\"selector\"} 1"), "{text}");
        // Fixed: the reason goes.
        let fixed = node_config(&shared_with(json!({"autoCreate": "Enabled"})));
        let view = view_of(KDD, &[k8s_node("a", json!({}), "192.168.0.1")], &ds);
        round(&ds, &cluster, &shared, &may_write, &o, fixed.as_ref(), &view, &mut g, &mut reported, Duration::ZERO).await;
        assert!(serde_json::to_value(shared.status.snapshot()).unwrap()["Readiness"].get(TEMPLATES_KEY).is_none());
        assert_eq!(names(&ds), ["a-auto-hep"], "the template's host endpoint goes with it");
    }

    #[tokio::test]
    async fn a_mass_delete_of_host_endpoints_waits_for_the_guard() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let mut nodes = Vec::new();
        for i in 0..60 {
            nodes.push(k8s_node(&format!("n{i}"), json!({}), &format!("10.0.0.{i}")));
        }
        let shared = shared_with(json!({"autoCreate": "Enabled"}));
        run_round(&ds, &cluster, &shared, &opts(KDD), &view_of(KDD, &nodes, &ds), true).await;
        assert_eq!(names(&ds).len(), 60);
        let off = shared_with(json!({"autoCreate": "Disabled"}));
        let guarded = HostEndpointOptions { guard: GuardConfig::default(), ..opts(KDD) };
        let round_result = run_round(&ds, &cluster, &off, &guarded, &view_of(KDD, &nodes, &ds), true).await;
        assert!(matches!(round_result, Round::Held(_)), "{round_result:?}");
        assert_eq!(names(&ds).len(), 60, "held, not deleted");
        assert_eq!(off.metrics(|m| m.mass_change_held.get(SCOPE.name).copied()), Some(60));
    }

    #[test]
    fn the_view_keeps_node_facts_and_says_which_events_call_for_a_round() {
        let mut v = View::default();
        let n = stored("a", k8s_node("a", json!({"x": "1"}), "10.0.0.1"));
        v.apply_node(KDD, WatchEvent::Init);
        assert!(v.apply_node(KDD, WatchEvent::InitDone));
        assert!(v.apply_node(KDD, WatchEvent::Apply(n.clone())));
        assert!(!v.apply_node(KDD, WatchEvent::Apply(n.clone())), "the same facts again: no round");
        let mut heartbeat = n.clone();
        heartbeat.value["status"]["conditions"] = json!([{"type": "Ready"}]);
        assert!(!v.apply_node(KDD, WatchEvent::Apply(heartbeat)), "a status heartbeat changes nothing a host endpoint holds");
        let mut relabelled = n.clone();
        relabelled.value["metadata"]["labels"]["x"] = json!("2");
        assert!(v.apply_node(KDD, WatchEvent::Apply(relabelled)));
        assert!(v.apply_node(KDD, WatchEvent::Delete(n)));
        assert!(!v.whole(), "no HostEndpoint list yet");
        v.apply_hep(WatchEvent::Init);
        v.apply_hep(WatchEvent::InitDone);
        assert!(v.whole());
        let h = stored("h", managed("h", "a"));
        assert!(v.apply_hep(WatchEvent::Apply(h.clone())));
        assert!(!v.apply_hep(WatchEvent::Apply(h.clone())));
        v.check_invariants().unwrap();
    }
}
