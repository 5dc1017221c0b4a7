//! The policy-name migrator (SPEC §6.8), both datastores: policies of the `default` tier still
//! stored under their pre-3.32 `default.<name>` names are re-keyed to their v3 names (create the
//! new object, then delete the old one under its revision), once the `calico-node` DaemonSet has
//! rolled out, as upstream waits for it (older calico-nodes read the old names).
//!
//! Owns: its rounds (once the KubeControllersConfiguration has listed, so a migrator the operator
//! disabled never runs on start-up defaults; then every [`INTERVAL`] or
//! `CKC_POLICY_MIGRATOR_INTERVAL`, on becoming leader and on being enabled), the DaemonSet gate (one GET of `calico-node` per round that has
//! something to re-key), the writes, its readiness key (always ready: its reason says what it
//! waits for or what it kept) and its metrics.
//! Must not: hold up any other controller (it is a task of its own with its own reads: upstream's
//! migrator blocks the shared syncer while it waits, so on a cluster without that DaemonSet its
//! IPAM GC never starts), write unless this replica leads (a dry run logs what it would do),
//! delete an old policy unless the new name holds the same policy, or decide anything the pure
//! [`crate::policy_names`] decides.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Shared;
use crate::datastore::cluster::{ClusterKind, ClusterReader};
use crate::datastore::{Datastore, DatastoreError, DsResult, ErrorKind, Kind, Stored};
use crate::health;
use crate::policy_names::{self, Outcome, Plan, Rename, Step};

/// Upstream's retry period, and how often a finished migrator looks again (a pre-3.32 client may
/// still write old names; a round without work is four LISTs).
pub const INTERVAL: Duration = Duration::from_secs(300);
/// The DaemonSet whose rollout gates every rename, as upstream.
pub const CALICO_NODE: &str = "calico-node";
/// Where it is looked for when the ServiceAccount's namespace is unknown (the operator's).
pub const FALLBACK_NAMESPACE: &str = "calico-system";
/// The in-cluster ServiceAccount's namespace (upstream looks for `calico-node` there).
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Every datastore or apiserver call is bounded, so a hung call delays only this task's round.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Names quoted in a readiness reason at most (the rest are counted).
const NAMES_IN_REASON: usize = 5;

/// The readiness key: `Controller:policy-name-migrator`.
pub fn status_key() -> String {
    health::controller_key(health::POLICY_NAME_MIGRATOR)
}

#[derive(Debug, Clone)]
pub struct MigratorOptions {
    pub dry_run: bool,
    pub interval: Duration,
    /// The namespace of the `calico-node` DaemonSet.
    pub namespace: String,
}

impl MigratorOptions {
    /// From `CKC_CALICO_NODE_NAMESPACE` and `CKC_POLICY_MIGRATOR_INTERVAL`, else the
    /// ServiceAccount's namespace file and upstream's 5 minutes.
    pub fn new(env: &crate::config::EnvConfig, dry_run: bool) -> Self {
        MigratorOptions {
            dry_run,
            interval: env.policy_migrator_interval.map_or(INTERVAL, |ms| Duration::from_millis(ms.max(1) as u64)),
            namespace: daemonset_namespace(env.calico_node_namespace.as_deref(), Path::new(SERVICE_ACCOUNT_NAMESPACE_FILE)),
        }
    }
}

/// The namespace of `calico-node`: the override, else the ServiceAccount's namespace as its file
/// says, else [`FALLBACK_NAMESPACE`].
pub fn daemonset_namespace(overridden: Option<&str>, service_account_file: &Path) -> String {
    if let Some(ns) = overridden {
        return ns.to_string();
    }
    std::fs::read_to_string(service_account_file).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).unwrap_or_else(|| FALLBACK_NAMESPACE.to_string())
}

async fn bounded<T>(call: impl Future<Output = DsResult<T>>) -> DsResult<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(DatastoreError::new(ErrorKind::Transient, format!("no answer within {}s", CALL_TIMEOUT.as_secs()))),
    }
}

/// What one round found and did, for the readiness reason.
#[derive(Debug, Default, PartialEq)]
struct Round {
    /// Old-named policies with a write to do.
    pending: usize,
    /// Why the writes wait: the DaemonSet is not rolled out (or could not be read).
    waiting: Option<String>,
    /// A list or write failed: the first error.
    failed: Option<String>,
    failures: usize,
    done: usize,
    /// Old and new names kept side by side because they hold different policies.
    kept_both: Vec<String>,
    unusable: Vec<String>,
    /// Waiting for their new name to be vacated by another old-named policy.
    deferred: Vec<String>,
    /// The replica stopped leading during the round.
    stopped_leading: bool,
}

fn quote(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(NAMES_IN_REASON).map(String::as_str).collect();
    let more = names.len().saturating_sub(NAMES_IN_REASON);
    let extra = format!("and {more} more");
    if more > 0 {
        shown.push(&extra);
    }
    shown.join(", ")
}

impl Round {
    /// The readiness reason (the key is always ready: a waiting migrator holds up nothing).
    fn reason(&self, opts: &MigratorOptions) -> String {
        let every = crate::model::time::format_go_duration(opts.interval.as_millis() as i64);
        let mut parts = Vec::new();
        if let Some(why) = &self.waiting {
            parts.push(format!(
                "waiting for DaemonSet {}/{CALICO_NODE} to finish its rollout before re-keying {} policies of the default tier from their pre-3.32 default.<name> names: {why} (looked at again every {every})",
                opts.namespace, self.pending
            ));
        }
        match (&self.failed, self.failures) {
            (Some(e), 0) => parts.push(format!("{e}; retried in {every}")),
            (Some(e), n) => parts.push(format!("{n} re-keyings failed (first: {e}); retried in {every}")),
            (None, _) => {}
        }
        if !self.kept_both.is_empty() {
            parts.push(format!("kept both the old and the new name of {} policies whose new name holds a different policy, resolve by hand: {}", self.kept_both.len(), quote(&self.kept_both)));
        }
        if !self.unusable.is_empty() {
            parts.push(format!("left {} policies whose v3 name is no valid object name: {}", self.unusable.len(), quote(&self.unusable)));
        }
        if !self.deferred.is_empty() {
            parts.push(format!("{} policies wait for their new name to be freed by another old-named policy: {}", self.deferred.len(), quote(&self.deferred)));
        }
        if opts.dry_run && self.waiting.is_none() && self.pending > 0 {
            parts.push(format!("dry run: would re-key {} policies", self.pending));
        }
        if parts.is_empty() {
            parts.push(if self.done > 0 { format!("re-keyed {} policies; nothing left to re-key", self.done) } else { "nothing to re-key".to_string() });
        }
        format!("{}: {}", health::POLICY_NAME_MIGRATOR, parts.join("; "))
    }
}

/// Runs until `stop` turns true. Reads `controllers.migration.policyNameMigrator` live.
pub async fn run<D: Datastore, C: ClusterReader>(
    ds: Arc<D>,
    cluster: Arc<C>,
    shared: Arc<Shared>,
    mut may_write: watch::Receiver<bool>,
    opts: MigratorOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut config = shared.config.subscribe();
    let mut reported = Reported::default();
    loop {
        let (enabled, listed) = {
            let c = shared.config.borrow();
            (c.run.policy_name_migrator, c.listed)
        };
        let acting = opts.dry_run || *may_write.borrow_and_update();
        let mut next = None;
        if !listed {
            // Not on the defaults a process starts with: the operator may have disabled it.
            shared.status.set_ready(&status_key(), true, format!("{}: waiting for the first list of the KubeControllersConfiguration", health::POLICY_NAME_MIGRATOR));
        } else if !enabled {
            shared.status.remove_ready(&status_key());
        } else if !acting {
            shared.status.set_ready(&status_key(), true, format!("{}: standby: the leader re-keys old policy names", health::POLICY_NAME_MIGRATOR));
        } else {
            let round = round(&*ds, &*cluster, &shared, &may_write, &opts, &mut reported).await;
            shared.status.set_ready(&status_key(), true, round.reason(&opts));
            next = (!round.stopped_leading).then(|| tokio::time::Instant::now() + opts.interval);
        }
        // Wait for the next round, or for a change of what this task may do.
        loop {
            tokio::select! {
                _ = super::sleep_until_due(next) => break,
                changed = may_write.changed() => {
                    if changed.is_err() || *may_write.borrow() != acting {
                        break;
                    }
                }
                changed = config.changed() => {
                    let c = config.borrow_and_update();
                    if changed.is_err() || (c.run.policy_name_migrator, c.listed) != (enabled, listed) {
                        break;
                    }
                }
                _ = stop.changed() => {
                    if *stop.borrow() {
                        return;
                    }
                }
            }
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Conflicts and unusable names already counted in the metrics (a standing conflict counts once
/// per process, not once per round).
#[derive(Debug, Default)]
struct Reported {
    kept_both: BTreeSet<(Kind, String)>,
    unusable: BTreeSet<(Kind, String)>,
}

fn count(shared: &Shared, kind: Kind, outcome: Outcome) {
    shared.metrics(|m| *m.policy_name_migrations.entry((kind.plural(), outcome.as_str())).or_default() += 1);
}

/// One round: list the four kinds, plan, and (gate open, leading) execute.
async fn round<D: Datastore, C: ClusterReader>(
    ds: &D,
    cluster: &C,
    shared: &Shared,
    may_write: &watch::Receiver<bool>,
    opts: &MigratorOptions,
    reported: &mut Reported,
) -> Round {
    let mut out = Round::default();
    let mut plans: Vec<Plan> = Vec::new();
    for kind in policy_names::KINDS {
        match bounded(ds.list(kind)).await {
            Ok(objects) => plans.push(policy_names::plan(kind, &objects)),
            Err(e) => {
                tracing::warn!(kind = kind.plural(), error = %e, "policy-name migrator: listing failed; retried next round");
                out.failed = Some(format!("listing {} failed: {e}", kind.plural()));
                return out;
            }
        }
    }
    for plan in &plans {
        for r in plan.conflicts() {
            out.kept_both.push(format!("{} {} -> {}", r.kind.plural(), r.old.name, r.new_name));
            if reported.kept_both.insert((r.kind, r.old.name.clone())) {
                tracing::warn!(kind = r.kind.plural(), old = %r.old.name, new = %r.new_name, "policy-name migrator: the new name holds a different policy; both kept (resolve by hand: delete one of them)");
                count(shared, r.kind, Outcome::Conflict);
            }
        }
    }
    for (kind, plan) in policy_names::KINDS.into_iter().zip(&plans) {
        for u in &plan.unusable {
            out.unusable.push(format!("{} {}", kind.plural(), u.name));
            if reported.unusable.insert((kind, u.name.clone())) {
                count(shared, kind, Outcome::Unusable);
                tracing::warn!(name = %u.name, why = %u.why, "policy-name migrator: left under its old name");
            }
        }
    }
    let pending: usize = plans.iter().map(Plan::writes).sum();
    out.pending = pending;
    for (kind, plan) in policy_names::KINDS.into_iter().zip(&plans) {
        for r in &plan.deferred {
            out.deferred.push(format!("{} {} -> {}", kind.plural(), r.old.name, r.new_name));
        }
    }
    let gauge: Vec<(&'static str, u64)> = policy_names::KINDS.iter().zip(&plans).map(|(k, p)| (k.plural(), (p.writes() + p.deferred.len()) as u64)).collect();
    shared.metrics(|m| m.policy_names_pending = gauge.into_iter().collect());
    if pending == 0 {
        return out;
    }
    if let Err(why) = gate(cluster, &opts.namespace).await {
        tracing::info!(namespace = %opts.namespace, daemonset = CALICO_NODE, pending, reason = %why, "policy-name migrator: waiting for the calico-node rollout before re-keying");
        out.waiting = Some(why);
        return out;
    }
    for step in plans.iter().flat_map(|p| p.steps.iter()) {
        if matches!(step, Step::KeepBoth(_)) {
            continue;
        }
        let r = step.rename();
        if opts.dry_run {
            tracing::info!(kind = r.kind.plural(), old = %r.old.name, new = %r.new_name, "dry run: would re-key the policy (create the new name, delete the old)");
            continue;
        }
        if !*may_write.borrow() {
            out.stopped_leading = true;
            break;
        }
        let outcome = match execute(ds, step).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(kind = r.kind.plural(), old = %r.old.name, new = %r.new_name, error = %e, "policy-name migrator: re-keying failed; retried next round");
                out.failures += 1;
                out.failed.get_or_insert_with(|| format!("{} {}: {e}", r.kind.plural(), r.old.name));
                Outcome::Failed
            }
        };
        match outcome {
            Outcome::Migrated | Outcome::AlreadyMigrated => {
                tracing::info!(kind = r.kind.plural(), old = %r.old.name, new = %r.new_name, outcome = outcome.as_str(), "policy-name migrator: re-keyed");
                out.done += 1;
                out.pending -= 1;
            }
            Outcome::Conflict => {
                out.pending -= 1;
                out.kept_both.push(format!("{} {} -> {}", r.kind.plural(), r.old.name, r.new_name));
                reported.kept_both.insert((r.kind, r.old.name.clone()));
                tracing::warn!(kind = r.kind.plural(), old = %r.old.name, new = %r.new_name, "policy-name migrator: the new name holds a different policy; both kept (resolve by hand)");
            }
            Outcome::Failed | Outcome::Unusable => {}
        }
        count(shared, r.kind, outcome);
    }
    out
}

/// Whether `calico-node` is rolled out; `Err` says what the migrator waits for.
async fn gate<C: ClusterReader>(cluster: &C, namespace: &str) -> Result<(), String> {
    match bounded(cluster.get(ClusterKind::DaemonSet, namespace, CALICO_NODE)).await {
        Ok(ds) => policy_names::rolled_out(&ds.value),
        Err(e) if e.is_not_found() => Err("it does not exist".to_string()),
        Err(e) => Err(format!("reading it failed: {e}")),
    }
}

/// One step: the new object made sure of (created, or found holding the same policy), then the
/// old one deleted under exactly the revision and uid it was listed with.
async fn execute<D: Datastore>(ds: &D, step: &Step) -> DsResult<Outcome> {
    let r = step.rename();
    let outcome = match step {
        Step::Create(_) => match bounded(ds.create(r.kind, &r.new_name, r.body.clone())).await {
            Ok(_) => Outcome::Migrated,
            Err(e) if e.kind == ErrorKind::AlreadyExists => same_as_new(ds, r).await?,
            Err(e) => return Err(e),
        },
        Step::DeleteOld(_) => same_as_new(ds, r).await?,
        Step::KeepBoth(_) => return Ok(Outcome::Conflict),
    };
    if outcome == Outcome::Conflict {
        return Ok(outcome);
    }
    match bounded(ds.delete(r.kind, &r.old.name, &r.old.exact())).await {
        Ok(()) => Ok(outcome),
        // Someone else finished the job.
        Err(e) if e.is_not_found() => Ok(outcome),
        // Changed since it was listed: the next round judges it again (the new copy stays; if
        // the policy itself changed, the two then differ and both are kept).
        Err(e) => Err(e),
    }
}

/// Re-reads the new name before the old object goes: `AlreadyMigrated` when it holds the same
/// policy, `Conflict` when another; a missing one fails the step (the next round creates it).
async fn same_as_new<D: Datastore>(ds: &D, r: &Rename) -> DsResult<Outcome> {
    let existing: Stored = bounded(ds.get(r.kind, &r.new_name)).await?;
    Ok(if policy_names::same_policy(&existing.value, &r.old.value) { Outcome::AlreadyMigrated } else { Outcome::Conflict })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EnvConfig, RunConfig};
    use crate::datastore::{MemoryCluster, MemoryDatastore, Op};
    use serde_json::{Value, json};

    fn opts() -> MigratorOptions {
        MigratorOptions { dry_run: false, interval: INTERVAL, namespace: "calico-system".into() }
    }

    fn policy(kind: Kind, name: &str, order: i64) -> Value {
        let (ns, own) = name.split_once('/').map_or((None, name), |(n, o)| (Some(n), o));
        let mut meta = json!({"name": own, "labels": {"app": "web"}});
        if let Some(ns) = ns {
            meta["namespace"] = json!(ns);
        }
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": kind.kind_name(), "metadata": meta, "spec": {"order": order, "selector": "all()"}})
    }

    async fn store(ds: &MemoryDatastore, kind: Kind, name: &str, order: i64) -> Stored {
        ds.create(kind, name, policy(kind, name, order)).await.unwrap()
    }

    fn rolled_out_daemonset(cluster: &MemoryCluster, ready: bool) {
        let updated = if ready { 3 } else { 2 };
        cluster.apply(ClusterKind::DaemonSet, json!({
            "metadata": {"namespace": "calico-system", "name": CALICO_NODE, "generation": 4},
            "status": {"observedGeneration": 4, "desiredNumberScheduled": 3, "currentNumberScheduled": 3, "updatedNumberScheduled": updated, "numberUnavailable": 0, "numberMisscheduled": 0},
        }));
    }

    fn names(ds: &MemoryDatastore, kind: Kind) -> Vec<String> {
        let mut n: Vec<String> = ds.snapshot(kind).into_iter().map(|s| s.name).collect();
        n.sort();
        n
    }

    fn reason(shared: &Shared) -> Option<(bool, String)> {
        shared.status.snapshot().readiness.get(&status_key()).map(|c| (c.ready, c.reason.clone()))
    }

    #[tokio::test]
    async fn it_waits_without_the_daemonset_and_says_so_then_re_keys_once_it_rolled_out() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let old_np = store(&ds, Kind::NetworkPolicy, "web/default.allow", 1).await;
        store(&ds, Kind::GlobalNetworkPolicy, "default.deny", 1).await;
        store(&ds, Kind::StagedNetworkPolicy, "web/default.try", 1).await;
        store(&ds, Kind::StagedGlobalNetworkPolicy, "default.try-global", 1).await;
        store(&ds, Kind::NetworkPolicy, "web/current", 1).await;
        let mut other_tier = policy(Kind::GlobalNetworkPolicy, "security.deny", 1);
        other_tier["spec"]["tier"] = json!("security");
        ds.create(Kind::GlobalNetworkPolicy, "security.deny", other_tier).await.unwrap();
        let shared = Shared::default();
        let (_tx, leading) = watch::channel(true);
        let mut reported = Reported::default();

        let waiting = round(&ds, &cluster, &shared, &leading, &opts(), &mut reported).await;
        assert_eq!(waiting.pending, 4);
        let text = waiting.reason(&opts());
        assert!(text.contains("waiting for DaemonSet calico-system/calico-node") && text.contains("it does not exist") && text.contains("4 policies"), "{text}");
        assert_eq!(ds.revision(), 6, "nothing written while waiting");
        rolled_out_daemonset(&cluster, false);
        let text = round(&ds, &cluster, &shared, &leading, &opts(), &mut reported).await.reason(&opts());
        assert!(text.contains("2 of 3 pods updated"), "{text}");

        rolled_out_daemonset(&cluster, true);
        let done = round(&ds, &cluster, &shared, &leading, &opts(), &mut reported).await;
        assert_eq!((done.done, done.pending, done.failed.as_deref()), (4, 0, None), "{done:?}");
        assert_eq!(names(&ds, Kind::NetworkPolicy), ["web/allow", "web/current"]);
        assert_eq!(names(&ds, Kind::GlobalNetworkPolicy), ["deny", "security.deny"]);
        assert_eq!(names(&ds, Kind::StagedNetworkPolicy), ["web/try"]);
        assert_eq!(names(&ds, Kind::StagedGlobalNetworkPolicy), ["try-global"]);
        let moved = ds.peek(Kind::NetworkPolicy, "web/allow").unwrap();
        assert_eq!((moved.value["spec"].clone(), moved.value["metadata"]["labels"].clone()), (old_np.value["spec"].clone(), json!({"app": "web"})));
        assert_ne!(moved.uid, old_np.uid);
        let before = ds.revision();
        let again = round(&ds, &cluster, &shared, &leading, &opts(), &mut reported).await;
        assert_eq!(ds.revision(), before, "a second round writes nothing");
        assert_eq!(again.reason(&opts()), "policy-name-migrator: nothing to re-key");
        let m = shared.metrics(|m| m.policy_name_migrations.clone());
        assert_eq!(m.get(&("networkpolicies", "migrated")), Some(&1));
        assert_eq!(m.values().sum::<u64>(), 4);
    }

    #[tokio::test]
    async fn a_different_policy_under_the_new_name_keeps_both_and_the_same_one_only_loses_the_old_name() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        rolled_out_daemonset(&cluster, true);
        store(&ds, Kind::NetworkPolicy, "web/default.a", 1).await;
        store(&ds, Kind::NetworkPolicy, "web/a", 2).await;
        store(&ds, Kind::NetworkPolicy, "web/default.b", 1).await;
        store(&ds, Kind::NetworkPolicy, "web/b", 1).await;
        let shared = Shared::default();
        let (_tx, leading) = watch::channel(true);
        let mut reported = Reported::default();
        let r = round(&ds, &cluster, &shared, &leading, &opts(), &mut reported).await;
        assert_eq!(names(&ds, Kind::NetworkPolicy), ["web/a", "web/b", "web/default.a"]);
        assert_eq!(ds.peek(Kind::NetworkPolicy, "web/a").unwrap().value["spec"]["order"], 2, "never written over");
        let text = r.reason(&opts());
        assert!(text.contains("kept both") && text.contains("networkpolicies web/default.a -> web/a"), "{text}");
        round(&ds, &cluster, &shared, &leading, &opts(), &mut reported).await;
        let m = shared.metrics(|m| m.policy_name_migrations.clone());
        assert_eq!((m.get(&("networkpolicies", "conflict")), m.get(&("networkpolicies", "already_migrated"))), (Some(&1), Some(&1)), "a standing conflict counts once: {m:?}");
    }

    #[tokio::test]
    async fn a_policy_created_under_the_new_name_between_list_and_create_is_compared_not_overwritten() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        rolled_out_daemonset(&cluster, true);
        let old = store(&ds, Kind::GlobalNetworkPolicy, "default.a", 1).await;
        // Another writer takes the new name with another policy just before our create.
        let objects = ds.list(Kind::GlobalNetworkPolicy).await.unwrap();
        let p = policy_names::plan(Kind::GlobalNetworkPolicy, &objects);
        store(&ds, Kind::GlobalNetworkPolicy, "a", 7).await;
        assert_eq!(execute(&ds, &p.steps[0]).await, Ok(Outcome::Conflict));
        assert_eq!(ds.peek(Kind::GlobalNetworkPolicy, "default.a").map(|s| s.revision), Some(old.revision.clone()), "the old one stays");
        assert_eq!(ds.peek(Kind::GlobalNetworkPolicy, "a").unwrap().value["spec"]["order"], 7);
        // A DeleteOld planned on a stale list re-reads the new name first.
        ds.delete(Kind::GlobalNetworkPolicy, "a", &crate::datastore::Precondition::default()).await.unwrap();
        let stale = Step::DeleteOld(Rename { kind: Kind::GlobalNetworkPolicy, old: old.clone(), new_name: "a".into(), body: json!({}) });
        assert!(execute(&ds, &stale).await.unwrap_err().is_not_found(), "the new name is gone: the old one is not deleted");
        assert!(ds.peek(Kind::GlobalNetworkPolicy, "default.a").is_some());
    }

    #[tokio::test]
    async fn an_old_policy_changed_since_the_list_is_not_deleted() {
        let ds = MemoryDatastore::new();
        let old = store(&ds, Kind::GlobalNetworkPolicy, "default.a", 1).await;
        let objects = ds.list(Kind::GlobalNetworkPolicy).await.unwrap();
        let p = policy_names::plan(Kind::GlobalNetworkPolicy, &objects);
        ds.bump(Kind::GlobalNetworkPolicy, "default.a", |v| v["metadata"]["labels"]["x"] = json!("y")).unwrap();
        assert!(execute(&ds, &p.steps[0]).await.unwrap_err().is_conflict());
        assert!(ds.peek(Kind::GlobalNetworkPolicy, "default.a").is_some() && ds.peek(Kind::GlobalNetworkPolicy, "a").is_some());
        // Only a label changed: the next round finds the same policy under the new name.
        let objects = ds.list(Kind::GlobalNetworkPolicy).await.unwrap();
        let p = policy_names::plan(Kind::GlobalNetworkPolicy, &objects);
        assert!(matches!(p.steps[..], [Step::DeleteOld(_)]), "{p:?}");
        assert_eq!(execute(&ds, &p.steps[0]).await, Ok(Outcome::AlreadyMigrated));
        assert_eq!(names(&ds, Kind::GlobalNetworkPolicy), ["a"]);
        assert_ne!(old.revision, ds.peek(Kind::GlobalNetworkPolicy, "a").unwrap().revision);
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_and_a_dry_run_write_nothing_and_a_disabled_migrator_has_no_key() {
        let ds = Arc::new(MemoryDatastore::new());
        let cluster = Arc::new(MemoryCluster::new());
        rolled_out_daemonset(&cluster, true);
        store(&ds, Kind::NetworkPolicy, "web/default.a", 1).await;
        let before = ds.revision();
        let shared = Arc::new(Shared::default());
        let (lead_tx, standby) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(ds.clone(), cluster.clone(), shared.clone(), standby, opts(), stop));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reason(&shared), Some((true, "policy-name-migrator: waiting for the first list of the KubeControllersConfiguration".into())));
        shared.config.send_modify(|c| c.listed = true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reason(&shared), Some((true, "policy-name-migrator: standby: the leader re-keys old policy names".into())));
        assert_eq!(ds.revision(), before);
        assert_eq!(ds.op_count(Op::List, Kind::NetworkPolicy), 0, "a standby does not even list");

        // Disabled live: the key goes.
        let api: crate::model::config::KubeControllersConfigurationSpec = serde_json::from_value(json!({"controllers": {"node": {}, "migration": {"policyNameMigrator": "Disabled"}}})).unwrap();
        shared.config.send_modify(|c| c.run = RunConfig::merge(&EnvConfig::default(), Some(&api)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reason(&shared), None);
        lead_tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(ds.revision(), before, "disabled: nothing re-keyed");
        // Enabled again, and leading: re-keyed at once.
        shared.config.send_modify(|c| c.run = RunConfig::merge(&EnvConfig::default(), None));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(names(&ds, Kind::NetworkPolicy), ["web/a"]);
        assert_eq!(reason(&shared).map(|r| r.0), Some(true));
        stop_tx.send(true).unwrap();
        task.await.unwrap();

        // A dry run, not leading: lists and logs, writes nothing.
        let ds = MemoryDatastore::new();
        store(&ds, Kind::NetworkPolicy, "web/default.b", 1).await;
        let before = ds.revision();
        let (_tx, standby) = watch::channel(false);
        let dry = MigratorOptions { dry_run: true, ..opts() };
        let r = round(&ds, &*cluster, &shared, &standby, &dry, &mut Reported::default()).await;
        assert_eq!(ds.revision(), before);
        assert!(r.reason(&dry).contains("dry run: would re-key 1 policies"), "{}", r.reason(&dry));
    }

    #[tokio::test]
    async fn a_failing_list_or_gate_read_is_a_reason_not_a_write() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        store(&ds, Kind::NetworkPolicy, "web/default.a", 1).await;
        let shared = Shared::default();
        let (_tx, leading) = watch::channel(true);
        ds.inject(Some(Kind::GlobalNetworkPolicy), None, Op::List, ErrorKind::Transient, 1);
        let r = round(&ds, &cluster, &shared, &leading, &opts(), &mut Reported::default()).await;
        assert!(r.reason(&opts()).contains("listing globalnetworkpolicies"), "{}", r.reason(&opts()));
        cluster.inject_get(ClusterKind::DaemonSet, ErrorKind::Transient, 1);
        let r = round(&ds, &cluster, &shared, &leading, &opts(), &mut Reported::default()).await;
        assert!(r.reason(&opts()).contains("reading it failed"), "{}", r.reason(&opts()));
        assert_eq!(names(&ds, Kind::NetworkPolicy), ["web/default.a"]);
    }

    #[test]
    fn the_daemonset_namespace_is_the_override_else_the_service_accounts_else_calico_system() {
        let dir = std::env::temp_dir().join(format!("ckc-migrator-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("namespace");
        assert_eq!(daemonset_namespace(None, &file), FALLBACK_NAMESPACE);
        std::fs::write(&file, "kube-system\n").unwrap();
        assert_eq!(daemonset_namespace(None, &file), "kube-system");
        assert_eq!(daemonset_namespace(Some("tigera"), &file), "tigera");
        let _ = std::fs::remove_dir_all(dir);
    }
}
