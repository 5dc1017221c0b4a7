//! The etcd-mode light controllers (SPEC §6.1-§6.4): namespaces to `kns.` Profiles, service
//! accounts to `ksa.` Profiles, Kubernetes NetworkPolicies to `knp.default.` Calico
//! NetworkPolicies. One shape for all: a watch of the Kubernetes kind, the wanted objects
//! computed by the pure converters ([`crate::policy`]), and reconcile rounds
//! ([`crate::reconcile`]) after changes (batched over 1 s), at start and every
//! `reconcilerPeriod`.
//!
//! Owns: each controller's wanted objects (its cache), when a round may run (the watch has listed
//! and is healthy, the controller is enabled, this replica leads), the mass-change guard on its
//! deletes, and the writes.
//! Must not: delete on a view that is not whole, write objects it does not own (by name prefix),
//! or keep more of a source object than the converted result.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use super::Shared;
use super::listed::Listed;
use super::events::{EventRecorder, EventRequest, Regarding};
use crate::config::RunConfig;
use crate::model::time::Millis;
use crate::datastore::cluster::{ClusterKind, ClusterReader};
use crate::datastore::watch::WatchEvent;
use crate::datastore::{DatastoreError, Datastore, DsResult, Kind, Stored};
use crate::guard::{self, GuardConfig, MassGuard, Proposal, Scope, Unit};
use crate::policy::{self, BadRules};
use crate::reconcile::{self, CompactObject, Write};

/// Changes within this window share one round.
const BATCH: Duration = Duration::from_secs(1);
/// A round that could not run (no whole view, not leading, the controller off) is tried again
/// this much later.
const RETRY: Duration = Duration::from_secs(5);

/// One light controller.
#[derive(Debug, Clone, Copy)]
pub struct LightSpec {
    /// `ENABLED_CONTROLLERS` name; also the metric label and the guard scope.
    pub name: &'static str,
    pub source: ClusterKind,
    pub target: Kind,
    /// The names it owns start with this (after `<namespace>/` for namespaced kinds).
    pub prefix: &'static str,
    scope: Scope,
    /// Its reconciler period in the merged configuration (`Some` = enabled).
    enabled: fn(&RunConfig) -> Option<Millis>,
    /// The `*_WORKERS` variable that sets how many of its writes are in flight at once.
    pub workers_var: &'static str,
}

pub const NAMESPACE: LightSpec = LightSpec {
    name: "namespace",
    source: ClusterKind::Namespace,
    target: Kind::Profile,
    prefix: policy::NAMESPACE_PROFILE_PREFIX,
    scope: Scope { name: "namespace-profiles", unit: Unit::Addresses },
    enabled: |run| run.namespace,
    workers_var: "PROFILE_WORKERS",
};
pub const SERVICE_ACCOUNT: LightSpec = LightSpec {
    name: "serviceaccount",
    source: ClusterKind::ServiceAccount,
    target: Kind::Profile,
    prefix: policy::SERVICE_ACCOUNT_PROFILE_PREFIX,
    scope: Scope { name: "serviceaccount-profiles", unit: Unit::Addresses },
    enabled: |run| run.service_account,
    workers_var: "PROFILE_WORKERS",
};
pub const POLICY: LightSpec = LightSpec {
    name: "policy",
    source: ClusterKind::NetworkPolicy,
    target: Kind::NetworkPolicy,
    prefix: policy::POLICY_NAME_PREFIX,
    scope: Scope { name: "network-policies", unit: Unit::Addresses },
    enabled: |run| run.policy,
    workers_var: "POLICY_WORKERS",
};
pub const ALL: [LightSpec; 3] = [NAMESPACE, SERVICE_ACCOUNT, POLICY];

impl LightSpec {
    /// The reconciler period when the configuration enables this controller (0: no periodic
    /// round).
    fn period(&self, run: &RunConfig) -> Option<u64> {
        (self.enabled)(run).map(|ms| ms.max(0) as u64)
    }

    /// Whether the datastore object `name` is this controller's.
    fn owns(&self, name: &str) -> bool {
        let own = if self.target.namespaced() { name.split_once('/').map_or("", |(_, n)| n) } else { name };
        own.starts_with(self.prefix)
    }

    /// The datastore name a source object's object has, converted or not.
    fn target_name(&self, source: &Value) -> Option<String> {
        let meta = &source["metadata"];
        let name = meta["name"].as_str().filter(|n| !n.is_empty())?;
        let ns = meta["namespace"].as_str().filter(|n| !n.is_empty()).unwrap_or("default");
        Some(match self.source {
            ClusterKind::Namespace => format!("{}{name}", policy::NAMESPACE_PROFILE_PREFIX),
            ClusterKind::ServiceAccount => format!("{}{ns}.{name}", policy::SERVICE_ACCOUNT_PROFILE_PREFIX),
            _ => format!("{ns}/{}{name}", policy::POLICY_NAME_PREFIX),
        })
    }

    /// The wanted object for one source object, `None` when it wants none. Conversion failures
    /// (and dropped rules) are added to `errors` by category.
    fn want(&self, source: &Value, bad_rules: BadRules, errors: &mut BTreeMap<&'static str, u64>) -> Option<Want> {
        let mut dropped = Vec::new();
        let result = match self.source {
            ClusterKind::Namespace => policy::namespace_profile(source),
            ClusterKind::ServiceAccount => policy::service_account_profile(source),
            _ => policy::network_policy(source, bad_rules).map(|c| {
                for d in &c.dropped {
                    tracing::warn!(
                        namespace = source["metadata"]["namespace"].as_str().unwrap_or(""), policy = source["metadata"]["name"].as_str().unwrap_or(""),
                        direction = %d.direction, rule = d.index, reason = %d.reason,
                        "NetworkPolicy rule cannot be converted: dropped (the traffic it allowed is denied), the rest is written"
                    );
                    dropped.push(format!("{} rule {}: {}", d.direction, d.index, d.reason));
                    *errors.entry("rule_dropped").or_default() += 1;
                }
                c.object
            }),
        };
        match result {
            Ok(object) => {
                let name = object["metadata"]["name"].as_str()?.to_string();
                let name = match object["metadata"]["namespace"].as_str().filter(|_| self.target.namespaced()) {
                    Some(ns) => format!("{ns}/{name}"),
                    None => name,
                };
                let regarding = (!dropped.is_empty()).then(|| {
                    let meta = &source["metadata"];
                    Regarding::network_policy(meta["namespace"].as_str().unwrap_or("default"), meta["name"].as_str().unwrap_or(""), meta["uid"].as_str())
                });
                Some(Want { name, object: CompactObject::new(object), dropped, regarding })
            }
            Err(e) => {
                tracing::warn!(controller = self.name, category = e.category(), error = %e, "source object not converted; skipped");
                *errors.entry(e.category()).or_default() += 1;
                None
            }
        }
    }
}

/// What one source object wants: the datastore object, and for a policy the rules that could not
/// be converted (the Event's note) and the policy the Event is about.
#[derive(Debug, Clone, PartialEq)]
struct Want {
    name: String,
    object: CompactObject,
    dropped: Vec<String>,
    regarding: Option<Regarding>,
}

/// What one source object stands for: the object it wants, or (it does not convert, and had no
/// good object in this process) the datastore name of its object, which is then left as it is,
/// never deleted (after a restart too: dropping a whole policy would fail open).
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Want(Want),
    Unconverted(String),
}

/// The wanted objects, by source object (`<namespace>/<name>` or `<name>`), and whether that view
/// is whole.
#[derive(Debug, Default)]
struct Wanted {
    by_source: Listed<Entry>,
    bad_rules: BadRules,
    /// Conversion failures since the run loop last took them, by category.
    errors: BTreeMap<&'static str, u64>,
}

fn source_key(o: &Stored) -> String {
    match o.value["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", o.name),
        _ => o.name.clone(),
    }
}

impl Wanted {
    /// Applies one event; true when it may change what is wanted.
    fn apply(&mut self, spec: &LightSpec, event: WatchEvent) -> bool {
        let bad_rules = self.bad_rules;
        let mut errors = std::mem::take(&mut self.errors);
        let changed = self.apply_counted(spec, event, &mut |o: &Stored| spec.want(&o.value, bad_rules, &mut errors));
        self.errors = errors;
        changed
    }

    /// What a source object stands for now: its want, else (it does not convert) the good
    /// object it had before, else the name of the object left alone.
    fn entry_of(&self, spec: &LightSpec, o: &Stored, key: &str, want: Option<Want>) -> Option<Entry> {
        match (want, self.by_source.get(key)) {
            (Some(w), _) => Some(Entry::Want(w)),
            (None, Some(Entry::Want(old))) => Some(Entry::Want(old.clone())),
            (None, _) => spec.target_name(&o.value).map(Entry::Unconverted),
        }
    }

    fn apply_counted(&mut self, spec: &LightSpec, event: WatchEvent, want: &mut dyn FnMut(&Stored) -> Option<Want>) -> bool {
        match event {
            WatchEvent::Init => self.by_source.begin(),
            WatchEvent::InitApply(o) => {
                let key = source_key(&o);
                if let Some(e) = self.entry_of(spec, &o, &key, want(&o)) {
                    self.by_source.listed(key, e);
                }
            }
            WatchEvent::InitDone => {
                self.by_source.end();
                return true;
            }
            WatchEvent::Apply(o) => {
                // A namespace being deleted keeps its profile until it is gone (SPEC §6.2).
                let terminating = spec.source == ClusterKind::Namespace && o.value["status"]["phase"] == "Terminating";
                let key = source_key(&o);
                if terminating && self.by_source.contains(&key) {
                    self.by_source.delivered();
                    return false;
                }
                let Some(e) = self.entry_of(spec, &o, &key, want(&o)) else {
                    self.by_source.delivered();
                    return false;
                };
                let wants = matches!(e, Entry::Want(_));
                let old = self.by_source.upsert(key, e.clone());
                // Only a change of what is wanted calls for a round (an object left alone is
                // never written).
                return wants && old != Some(e);
            }
            WatchEvent::Delete(o) => return self.by_source.remove(&source_key(&o)).is_some(),
            WatchEvent::Error(e) => self.by_source.failed(e.message),
            WatchEvent::Resumed => self.by_source.delivered(),
        }
        false
    }

    fn whole(&self) -> bool {
        self.by_source.whole()
    }

    /// Datastore names of objects whose sources exist but do not convert: left alone.
    fn left_alone(&self) -> BTreeSet<&str> {
        self.by_source.items().values().filter_map(|e| match e {
            Entry::Unconverted(name) => Some(name.as_str()),
            Entry::Want(_) => None,
        }).collect()
    }

    fn wants(&self) -> impl Iterator<Item = &Want> {
        self.by_source.items().values().filter_map(|e| match e {
            Entry::Want(w) => Some(w),
            Entry::Unconverted(_) => None,
        })
    }

    /// The wanted objects by datastore name (borrowed: a round makes only what it writes).
    fn desired(&self) -> BTreeMap<String, &CompactObject> {
        self.wants().map(|w| (w.name.clone(), &w.object)).collect()
    }

    /// The Event for the policy written as datastore object `name`, if it lost rules.
    fn dropped_event(&self, name: &str) -> Option<EventRequest> {
        let w = self.wants().find(|w| w.name == name)?;
        Some(EventRequest::policy_rules_dropped(w.regarding.as_ref()?, &w.dropped))
    }
}

#[derive(Debug, Clone)]
pub struct LightOptions {
    pub dry_run: bool,
    pub guard: GuardConfig,
    /// What becomes of a NetworkPolicy rule that cannot be converted (`CKC_POLICY_BAD_RULES`).
    pub bad_rules: BadRules,
    /// Where the Event about a policy written without some rules goes.
    pub events: EventRecorder,
    /// Writes in flight at once (the spec's `*_WORKERS`).
    pub workers: usize,
}

/// Whether a round ran, or must be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Ran,
    NotNow,
    /// The guard holds deletes: the round that may let them through is due this much later.
    Held(Duration),
}

/// Runs one controller until `stop` turns true.
pub async fn run<D: Datastore, C: ClusterReader>(
    spec: LightSpec,
    ds: Arc<D>,
    cluster: Arc<C>,
    shared: Arc<Shared>,
    may_write: watch::Receiver<bool>,
    opts: LightOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = cluster.watch(spec.source);
    let mut wanted = Wanted { bad_rules: opts.bad_rules, ..Wanted::default() };
    let mut guard = MassGuard::new();
    let started = tokio::time::Instant::now();
    let mut due: Option<tokio::time::Instant> = None;
    let mut last_round = tokio::time::Instant::now();
    loop {
        let enabled = spec.period(&shared.config.borrow().run);
        shared.status.controller_view(spec.name, spec.source.plural(), enabled.is_some(), wanted.by_source.synced(), wanted.by_source.failing());
        let period = enabled.filter(|p| *p > 0).map(Duration::from_millis);
        let next = match (due, period) {
            (Some(d), _) => Some(d),
            (None, Some(p)) if wanted.by_source.synced() => Some(last_round + p),
            _ => None,
        };
        let wait = super::sleep_until_due(next);
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                // A change is acted on within the batch window, even while the guard holds
                // deletes (a round before the hold ends is safe: the guard judges each member by
                // when it was first proposed).
                if wanted.apply(&spec, event) {
                    due = super::due_within(due, BATCH);
                }
                if !wanted.errors.is_empty() {
                    let errors = std::mem::take(&mut wanted.errors);
                    shared.metrics(|m| errors.into_iter().for_each(|(c, n)| *m.conversion_errors.entry((spec.name, c)).or_default() += n));
                }
            }
            _ = wait => {
                last_round = tokio::time::Instant::now();
                let outcome = round(&spec, &*ds, &shared, &may_write, &opts, &wanted, &mut guard, started.elapsed()).await;
                if outcome != Round::NotNow {
                    shared.metrics(|m| m.light_round(spec.name, last_round.elapsed()));
                }
                due = match outcome {
                    Round::Ran => None,
                    Round::NotNow => Some(tokio::time::Instant::now() + RETRY),
                    // A zero wait lets only approvals through: the usual period, not a spin.
                    Round::Held(wait) if wait.is_zero() => None,
                    Round::Held(wait) => Some(tokio::time::Instant::now() + wait + BATCH),
                };
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// One reconcile round: list what the controller owns, plan, put the deletes through the guard,
/// write.
#[allow(clippy::too_many_arguments)]
async fn round<D: Datastore>(
    spec: &LightSpec,
    ds: &D,
    shared: &Shared,
    may_write: &watch::Receiver<bool>,
    opts: &LightOptions,
    wanted: &Wanted,
    guard: &mut MassGuard,
    now: Duration,
) -> Round {
    if spec.period(&shared.config.borrow().run).is_none() || !wanted.whole() || !(opts.dry_run || *may_write.borrow()) {
        return Round::NotNow;
    }
    let left_alone = wanted.left_alone();
    let owned: Vec<Stored> = match ds.list(spec.target).await {
        Ok(all) => all.into_iter().filter(|s| spec.owns(&s.name) && !left_alone.contains(s.name.as_str())).collect(),
        Err(e) => {
            tracing::warn!(controller = spec.name, error = %e, "listing the objects it owns failed; retried shortly");
            return Round::NotNow;
        }
    };
    let desired = wanted.desired();
    shared.metrics(|m| m.light_desired.insert(spec.name, desired.len() as u64));
    let writes = reconcile::plan(&desired, &owned);
    let deletes: BTreeMap<u64, usize> =
        writes.iter().enumerate().filter(|(_, w)| matches!(w, Write::Delete { .. })).map(|(i, w)| (guard::fingerprint(&[w.name().as_bytes()]), i)).collect();
    let members: BTreeSet<u64> = deletes.keys().copied().collect();
    let grace = shared.config.borrow().run.leak_grace();
    let decision = guard.review(spec.scope, Proposal { members: &members, total: owned.len() as u64, complete: true }, &opts.guard, now.as_millis() as i64, grace, &BTreeSet::new());
    let held: u64 = guard.held().iter().filter(|h| h.scope == spec.scope).map(|h| h.waiting).sum();
    shared.metrics(|m| m.mass_change_held.insert(spec.scope.name, held));
    if held > 0 {
        tracing::warn!(controller = spec.name, held, owned = owned.len(), "mass-change guard: deletes held until a round one grace period later proposes them again");
    }
    let done = if held > 0 { Round::Held(Duration::from_millis(grace.max(0) as u64)) } else { Round::Ran };
    let allowed: BTreeSet<usize> = deletes.iter().filter(|(m, _)| decision.allows(**m)).map(|(_, i)| *i).collect();
    let chosen: Vec<usize> = writes.iter().enumerate().filter(|(i, w)| !matches!(w, Write::Delete { .. }) || allowed.contains(i)).map(|(i, _)| i).collect();
    if opts.dry_run {
        for write in chosen.iter().map(|i| &writes[*i]) {
            tracing::info!(controller = spec.name, op = write.op(), name = write.name(), "dry run: would write");
        }
        return done;
    }
    // Creates and updates first, then deletes (a round cut short never removes before it adds),
    // each phase with `workers` writes in flight.
    for deletes in [false, true] {
        let phase: Vec<usize> = chosen.iter().copied().filter(|i| matches!(writes[*i], Write::Delete { .. }) == deletes).collect();
        let (writes, desired) = (&writes, &desired);
        let results: Vec<(usize, Option<DsResult<()>>)> =
            futures::stream::iter(phase).map(|i| async move { (i, write_one(spec, ds, may_write, desired, &writes[i]).await) }).buffer_unordered(opts.workers.max(1)).collect().await;
        let mut stopped_leading = false;
        for (i, result) in results {
            let write = &writes[i];
            let Some(result) = result else {
                stopped_leading = true;
                continue;
            };
            let outcome = match &result {
                Ok(()) => "ok",
                Err(e) if e.is_conflict() || e.is_not_found() => "conflict",
                Err(_) => "failed",
            };
            if let Err(e) = &result {
                tracing::warn!(controller = spec.name, op = write.op(), name = write.name(), error = %e, "write failed; the next round retries");
            }
            shared.metrics(|m| *m.light_writes.entry((spec.name, write.op(), outcome)).or_default() += 1);
            if result.is_ok()
                && !matches!(write, Write::Delete { .. })
                && let Some(event) = wanted.dropped_event(write.name())
            {
                opts.events.record(event);
            }
        }
        if stopped_leading {
            return Round::NotNow;
        }
    }
    done
}

/// One write, unless this replica stopped leading (`None`).
async fn write_one<D: Datastore>(spec: &LightSpec, ds: &D, may_write: &watch::Receiver<bool>, desired: &BTreeMap<String, &CompactObject>, write: &Write) -> Option<DsResult<()>> {
    if !*may_write.borrow() {
        return None;
    }
    let result = match write {
        Write::Create { name } => match desired.get(name) {
            Some(want) => ds.create(spec.target, name, want.object()).await.map(|_| ()),
            None => Err(DatastoreError::invalid(format!("{name}: planned but not wanted"))),
        },
        Write::Update { current, value } => ds.update(spec.target, &Stored { value: value.clone(), ..current.clone() }).await.map(|_| ()),
        Write::Delete { current } => ds.delete(spec.target, &current.name, &current.exact()).await,
    };
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::MemoryDatastore;
    use serde_json::json;

    fn shared() -> Shared {
        let shared = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec =
            serde_json::from_value(json!({"controllers": {"node": {}, "namespace": {}, "serviceAccount": {}, "policy": {}}})).unwrap();
        let vars = [("DATASTORE_TYPE", "etcdv3"), ("ETCD_ENDPOINTS", "http://127.0.0.1:2379")].map(|(k, v)| (k.to_string(), v.to_string())).into_iter().collect();
        let env = crate::config::EnvConfig::from_env(&vars).unwrap();
        shared.config.send_modify(|c| c.run = RunConfig::merge(&env, Some(&api)));
        shared
    }

    fn source(name: &str, value: Value) -> Stored {
        Stored { name: name.into(), revision: "1".into(), uid: "u".into(), value }
    }

    fn listed(spec: &LightSpec, objects: Vec<Stored>) -> Wanted {
        let mut w = Wanted::default();
        assert_eq!(w.bad_rules, BadRules::DropRule);
        w.apply(spec, WatchEvent::Init);
        for o in objects {
            w.apply(spec, WatchEvent::InitApply(o));
        }
        assert!(w.apply(spec, WatchEvent::InitDone));
        w
    }

    fn namespace(name: &str, labels: Value) -> Stored {
        source(name, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))
    }

    fn names(ds: &MemoryDatastore, kind: Kind) -> Vec<String> {
        let mut n: Vec<String> = ds.snapshot(kind).into_iter().map(|s| s.name).collect();
        n.sort();
        n
    }

    const OPTS: LightOptions = LightOptions { dry_run: false, guard: GuardConfig::OFF, bad_rules: BadRules::DropRule, events: EventRecorder::off(), workers: 3 };

    #[tokio::test]
    async fn a_round_creates_updates_and_deletes_only_what_the_controller_owns() {
        let ds = MemoryDatastore::new();
        ds.create(Kind::Profile, "kns.a", json!({"metadata": {"name": "kns.a"}, "spec": {"labelsToApply": {"old": "x"}}})).await.unwrap();
        ds.create(Kind::Profile, "kns.stale", json!({"metadata": {"name": "kns.stale"}, "spec": {}})).await.unwrap();
        ds.create(Kind::Profile, "ksa.web.sa", json!({"metadata": {"name": "ksa.web.sa"}, "spec": {}})).await.unwrap();
        ds.create(Kind::Profile, "my-own", json!({"metadata": {"name": "my-own"}, "spec": {}})).await.unwrap();
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let wanted = listed(&NAMESPACE, vec![namespace("a", json!({"team": "t"})), namespace("b", json!({}))]);
        let mut g = MassGuard::new();
        assert_eq!(round(&NAMESPACE, &ds, &shared, &leading, &OPTS, &wanted, &mut g, Duration::ZERO).await, Round::Ran);
        assert_eq!(names(&ds, Kind::Profile), ["kns.a", "kns.b", "ksa.web.sa", "my-own"], "another controller's and a user's profiles stay");
        assert_eq!(ds.peek(Kind::Profile, "kns.a").unwrap().value["spec"]["labelsToApply"], json!({"pcns.team": "t", "pcns.projectcalico.org/name": "a"}));
        let before = ds.revision();
        round(&NAMESPACE, &ds, &shared, &leading, &OPTS, &wanted, &mut g, Duration::ZERO).await;
        assert_eq!(ds.revision(), before, "in step: nothing written");
        let writes = shared.metrics(|m| m.light_writes.clone());
        assert_eq!(writes.get(&("namespace", "create", "ok")), Some(&1));
        assert_eq!(writes.get(&("namespace", "delete", "ok")), Some(&1));
        g.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn nothing_is_written_on_a_partial_view_by_a_standby_or_with_the_controller_off() {
        let ds = MemoryDatastore::new();
        ds.create(Kind::Profile, "kns.old", json!({"metadata": {"name": "kns.old"}, "spec": {}})).await.unwrap();
        let before = ds.revision();
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let (_tx2, standby) = watch::channel(false);
        let mut g = MassGuard::new();
        let mut relisting = listed(&NAMESPACE, vec![]);
        relisting.apply(&NAMESPACE, WatchEvent::Init);
        assert_eq!(round(&NAMESPACE, &ds, &shared, &leading, &OPTS, &Wanted::default(), &mut g, Duration::ZERO).await, Round::NotNow);
        assert_eq!(round(&NAMESPACE, &ds, &shared, &leading, &OPTS, &relisting, &mut g, Duration::ZERO).await, Round::NotNow);
        assert_eq!(round(&NAMESPACE, &ds, &shared, &standby, &OPTS, &listed(&NAMESPACE, vec![]), &mut g, Duration::ZERO).await, Round::NotNow);
        let off = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec = serde_json::from_value(json!({"controllers": {"node": {}}})).unwrap();
        off.config.send_modify(|c| c.run = RunConfig::merge(&crate::config::EnvConfig::default(), Some(&api)));
        assert_eq!(round(&NAMESPACE, &ds, &off, &leading, &OPTS, &listed(&NAMESPACE, vec![]), &mut g, Duration::ZERO).await, Round::NotNow);
        let dry = LightOptions { dry_run: true, ..OPTS };
        assert_eq!(round(&NAMESPACE, &ds, &shared, &standby, &dry, &listed(&NAMESPACE, vec![]), &mut g, Duration::ZERO).await, Round::Ran);
        assert_eq!(ds.revision(), before);
    }

    #[tokio::test]
    async fn a_policy_with_a_bad_rule_is_written_without_it_in_its_namespace_and_goes_with_its_source() {
        let ds = MemoryDatastore::new();
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let np = source("p", json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "web"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 9000, "endPort": 8000}]}, {"ports": [{"port": 80}]}]}}));
        let mut wanted = listed(&POLICY, vec![np.clone()]);
        let mut g = MassGuard::new();
        let (events, recorded) = EventRecorder::memory();
        let opts = LightOptions { events, ..OPTS };
        round(&POLICY, &ds, &shared, &leading, &opts, &wanted, &mut g, Duration::ZERO).await;
        assert_eq!(wanted.errors.get("rule_dropped"), Some(&1), "the dropped rule is counted");
        let e = recorded.take();
        assert_eq!(e.len(), 1, "one Event on the Kubernetes policy: {e:?}");
        assert_eq!((e[0].regarding.kind.as_str(), e[0].regarding.namespace.as_deref(), e[0].regarding.name.as_str()), ("NetworkPolicy", Some("web"), "p"));
        assert!(e[0].note.contains("ingress rule 0"), "{}", e[0].note);
        round(&POLICY, &ds, &shared, &leading, &opts, &wanted, &mut g, Duration::ZERO).await;
        assert!(recorded.take().is_empty(), "nothing written, no new Event");
        let written = ds.peek(Kind::NetworkPolicy, "web/knp.default.p").unwrap_or_else(|| panic!("written under <namespace>/<name>: {:?} {:?}", names(&ds, Kind::NetworkPolicy), shared.metrics(|m| m.light_writes.clone())));
        assert_eq!(written.value["spec"]["ingress"].as_array().unwrap().len(), 1, "the bad rule is dropped, the good one kept");
        assert!(wanted.apply(&POLICY, WatchEvent::Delete(np)));
        round(&POLICY, &ds, &shared, &leading, &OPTS, &wanted, &mut g, Duration::ZERO).await;
        assert!(names(&ds, Kind::NetworkPolicy).is_empty());
    }

    #[tokio::test]
    async fn a_resync_that_would_delete_most_profiles_waits_a_grace_period() {
        let ds = MemoryDatastore::new();
        for i in 0..60 {
            let name = format!("kns.n{i}");
            ds.create(Kind::Profile, &name, json!({"metadata": {"name": name}, "spec": {}})).await.unwrap();
        }
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let opts = LightOptions { guard: GuardConfig::default(), ..OPTS };
        let wanted = listed(&NAMESPACE, vec![]);
        let mut g = MassGuard::new();
        let grace = Duration::from_millis(shared.config.borrow().run.leak_grace() as u64);
        assert_eq!(round(&NAMESPACE, &ds, &shared, &leading, &opts, &wanted, &mut g, Duration::ZERO).await, Round::Held(grace));
        assert_eq!(ds.snapshot(Kind::Profile).len(), 60, "an empty namespace list does not wipe every profile at once");
        assert_eq!(shared.metrics(|m| m.mass_change_held.get("namespace-profiles").copied()), Some(60));
        round(&NAMESPACE, &ds, &shared, &leading, &opts, &wanted, &mut g, grace + Duration::from_secs(1)).await;
        assert!(ds.snapshot(Kind::Profile).is_empty(), "proposed again a grace period later: deleted");
    }

    #[test]
    fn a_policy_edited_into_one_that_does_not_convert_keeps_its_last_good_object() {
        let good = source("p", json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "web"}, "spec": {"podSelector": {}}}));
        let mut bad = good.clone();
        bad.value["spec"] = json!("not an object");
        let mut w = listed(&POLICY, vec![good]);
        assert!(!w.apply(&POLICY, WatchEvent::Apply(bad.clone())), "nothing to do");
        assert_eq!(w.errors.get("malformed"), Some(&1), "counted by category");
        assert!(w.desired().contains_key("web/knp.default.p"), "deleting it would fail open");
        w.apply(&POLICY, WatchEvent::Init);
        w.apply(&POLICY, WatchEvent::InitApply(bad.clone()));
        w.apply(&POLICY, WatchEvent::InitDone);
        assert!(w.desired().contains_key("web/knp.default.p"), "a relist keeps it too");
        assert!(w.apply(&POLICY, WatchEvent::Delete(bad.clone())));
        assert!(w.desired().is_empty(), "deleted with its source");
        // A fresh process that never saw it convert leaves the stored object alone.
        let fresh = listed(&POLICY, vec![bad]);
        assert!(fresh.desired().is_empty());
        assert_eq!(fresh.left_alone(), ["web/knp.default.p"].into());
    }

    #[tokio::test]
    async fn after_a_restart_the_object_of_a_policy_that_does_not_convert_is_not_deleted() {
        let ds = MemoryDatastore::new();
        ds.create(Kind::NetworkPolicy, "web/knp.default.p", json!({"metadata": {"name": "knp.default.p"}, "spec": {"selector": "all()"}})).await.unwrap();
        let bad = source("p", json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "web"}, "spec": "broken"}));
        let shared = shared();
        let (_tx, leading) = watch::channel(true);
        let mut g = MassGuard::new();
        round(&POLICY, &ds, &shared, &leading, &OPTS, &listed(&POLICY, vec![bad]), &mut g, Duration::ZERO).await;
        assert!(ds.peek(Kind::NetworkPolicy, "web/knp.default.p").is_some(), "kept: deleting it would fail open");
        round(&POLICY, &ds, &shared, &leading, &OPTS, &listed(&POLICY, vec![]), &mut g, Duration::ZERO).await;
        assert!(ds.peek(Kind::NetworkPolicy, "web/knp.default.p").is_none(), "its source gone: deleted");
    }

    #[test]
    fn a_terminating_namespace_keeps_its_profile_until_it_is_deleted() {
        let mut w = listed(&NAMESPACE, vec![namespace("a", json!({"x": "1"}))]);
        let mut terminating = namespace("a", json!({"x": "2"}));
        terminating.value["status"] = json!({"phase": "Terminating"});
        assert!(!w.apply(&NAMESPACE, WatchEvent::Apply(terminating.clone())));
        assert_eq!(w.desired()["kns.a"].object()["spec"]["labelsToApply"]["pcns.x"], "1");
        assert!(w.apply(&NAMESPACE, WatchEvent::Delete(terminating)));
        assert!(w.desired().is_empty());
        assert!(NAMESPACE.owns("kns.a") && !NAMESPACE.owns("ksa.a.b") && POLICY.owns("ns/knp.default.x") && !POLICY.owns("ns/other"));
    }
}
