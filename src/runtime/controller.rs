//! The single writer: one task owns the [`IpamIndex`] and the [`GcState`], applies every watch
//! input, and runs the GC loop (dirty passes after batched events, full passes every
//! `leak_grace / 2`), executing plans through the datastore.
//!
//! Owns: relist bookkeeping (objects not re-listed at `InitDone` are deleted), the readiness
//! gate (no GC decision before every watch finished its first list), the `datastoreReady` pause,
//! the leadership gate (a follower computes passes and the report but executes no plan, and a
//! plan stops mid-way when leadership is lost),
//! the final re-validation reads of confirmed leaks, per-item backoff and the retry timer (their
//! arithmetic is in `backoff`), and publishing the report and metrics (IPAM gauges computed here,
//! in the GC task, never in a scrape). Stale sequence numbers are never retried blindly: the
//! executor re-reads every block before a write and skips reallocated addresses, and the index
//! learns the new numbers from the block watch.
//! merging env with each KubeControllersConfiguration it sees (no GC pass without the node controller),
//! and the heartbeat that liveness judges.
//! Must not: list or read anything else inside the loop (every input comes from a watch; the
//! only reads are the re-validation GETs), or hold the shared lock across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use kube::api::{Api, ApiResource, DynamicObject};
use tokio::sync::{mpsc, watch};

use super::backoff::{FIRST_DELAY, ItemBackoff, ItemKey, RetryTimer};
use super::ipam_gauges::{self, NO_POOL, PoolDef, UNKNOWN_NODE};
use super::watch::{Change, Input, Object, Source};
use super::{ConfigState, Shared};
use crate::config::{EnvConfig, RunConfig};
use crate::datastore::kube::{KubeDatastore, status_code};
use crate::datastore::{ErrorKind, ExecuteOptions, KeepGoing, PlanOutcome, execute_plan};
use crate::ipam::gc::{DEFAULT_MAX_RELEASES_PER_PASS, GcConfig, GcState, KubeVirtFacts};
use crate::ipam::plan::{Plan, Scope};
use crate::ipam::index::IpamIndex;
use crate::model::time::{Millis, format_go_duration};
use crate::model::{ClusterInformation, InvalidObject, IpamConfig, KubeControllersConfiguration, PodFacts};
use crate::scan::report::{ReportMeta, build_report};

/// Events are batched this long before a dirty pass, as upstream does (1 s): a burst of pod
/// deletions becomes one pass instead of hundreds.
const BATCH_WINDOW: Duration = Duration::from_secs(1);
/// Full passes with `leakGracePeriod` unset or 0: upstream's node reconciler period.
const UNSET_GRACE_FULL_PERIOD: Duration = Duration::from_secs(300);
/// Full passes never run more often than this, whatever the grace period.
const MIN_FULL_PERIOD: Duration = Duration::from_secs(1);
/// `build_report` formats every allocation (calicoctl's format): 450-600 ms at 250k allocations
/// (measured, release build). So the report is rebuilt when a pass plans releases (at most every
/// second), after a full pass at most every 5 s, and otherwise at most every 30 s: event churn
/// does not turn into report formatting nobody reads.
const REPORT_INTERVAL_RELEASES: Duration = Duration::from_secs(1);
const REPORT_INTERVAL_FULL: Duration = Duration::from_secs(5);
const REPORT_INTERVAL_DIRTY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Plans are computed and reported but never executed.
    pub dry_run: bool,
    /// Overrides the KubeControllersConfiguration's `leakGracePeriod` (tests).
    pub leak_grace_override: Option<Millis>,
    /// The environment's part of the configuration, merged with every KubeControllersConfiguration.
    pub env: EnvConfig,
    /// `--leak-report-file`: the leak report is also written here (atomically) after full passes.
    pub report_file: Option<std::path::PathBuf>,
}

pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// Keys of the objects of each kind the index holds, for deleting what a relist no longer shows.
#[derive(Default)]
/// Pods and handles are not here: the index holds their keys already (interned), and a copy
/// would cost ~300 bytes a pod.
struct Known {
    nodes: HashSet<String>,
    blocks: HashMap<String, IpNet>,
    affinities: HashSet<String>,
    pools: HashMap<String, IpNet>,
    /// IPReservation name → reserved CIDRs (unparsable ones are reported and left out).
    reservations: HashMap<String, Vec<IpNet>>,
    /// KubeVirt VMs and VMIs, once the cluster has them.
    kubevirt: KubeVirtFacts,
}

pub struct Controller {
    index: IpamIndex,
    gc: GcState,
    ds: KubeDatastore,
    opts: ControllerOptions,
    shared: Arc<Shared>,
    /// True while this replica holds the leader Lease: plans are executed only then.
    may_write: watch::Receiver<bool>,
    known: Known,
    /// Keys seen since the last `Init` of each source that is relisting.
    relisting: HashMap<Source, HashSet<String>>,
    synced: BTreeSet<Source>,
    cluster_info: Option<ClusterInformation>,
    kcc: Option<KubeControllersConfiguration>,
    ipam_config: Option<IpamConfig>,
    invalid: BTreeMap<(String, String), InvalidObject>,
    /// Re-read pods of confirmed leaks, for the next pass (`None` = NotFound).
    fresh: BTreeMap<(String, String), Option<PodFacts>>,
    /// `env` merged with `kcc` (the defaults we create while there is none).
    run_config: RunConfig,
    logged_grace: Option<Millis>,
    logged_pause: bool,
    logged_gc_disabled: bool,
    report_built: Option<Instant>,
    /// Plan items that failed with a transient error, skipped until due.
    backoff: ItemBackoff,
    retry: RetryTimer,
    /// When to run a round again because the last one left work behind.
    retry_at: Option<tokio::time::Instant>,
}

impl Controller {
    pub fn new(ds: KubeDatastore, opts: ControllerOptions, shared: Arc<Shared>, may_write: watch::Receiver<bool>) -> Self {
        let run_config = RunConfig::merge(&opts.env, None);
        Controller {
            run_config,
            logged_gc_disabled: false,
            index: IpamIndex::new(),
            gc: GcState::new(),
            ds,
            opts,
            shared,
            may_write,
            known: Known::default(),
            relisting: HashMap::new(),
            synced: BTreeSet::new(),
            cluster_info: None,
            kcc: None,
            ipam_config: None,
            invalid: BTreeMap::new(),
            fresh: BTreeMap::new(),
            logged_grace: None,
            logged_pause: false,
            report_built: None,
            backoff: ItemBackoff::default(),
            retry: RetryTimer::default(),
            retry_at: None,
        }
    }

    fn leak_grace(&self) -> Millis {
        self.opts.leak_grace_override.unwrap_or_else(|| self.run_config.leak_grace())
    }

    /// Re-merges env with the current KubeControllersConfiguration and publishes the result when
    /// it changed (the live-config and writer tasks act on it).
    fn config_changed(&mut self) {
        self.run_config = RunConfig::merge(&self.opts.env, self.kcc.as_ref().map(|k| &k.spec));
        let next = ConfigState { run: self.run_config.clone(), api_present: self.kcc.is_some() };
        self.shared.config.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            *current = next;
            true
        });
    }

    /// Full passes run every `leakGracePeriod / 2`, so a leak is confirmed within 1.5 grace
    /// periods. With `leakGracePeriod` unset, or 0 (confirmation off; full passes still find gone
    /// nodes), every 5 minutes: upstream's node reconciler period.
    fn full_period(&self) -> Duration {
        let explicit = self.opts.leak_grace_override.is_some() || self.run_config.leak_grace_is_set();
        let half = Duration::from_millis((self.leak_grace().max(0) / 2) as u64);
        if !explicit || half.is_zero() { UNSET_GRACE_FULL_PERIOD } else { half.max(MIN_FULL_PERIOD) }
    }

    fn all_synced(&self) -> bool {
        Source::ALL.iter().all(|s| self.synced.contains(s))
    }

    /// The KubeVirt facts once both kinds are listed. Before that (or without KubeVirt) VM
    /// allocations are judged valid, as upstream does without its KubeVirt informers: a VM is
    /// never released on a view that has not seen it.
    fn kubevirt_synced(&self) -> bool {
        self.synced.contains(&Source::VirtualMachines) && self.synced.contains(&Source::VirtualMachineInstances)
    }

    /// The loop: inputs, batched dirty passes, periodic full passes, until `shutdown` flips. A
    /// pass in progress (with its writes) is finished before the loop looks at `shutdown` again.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut shutdown: watch::Receiver<bool>) {
        let mut batch_deadline: Option<tokio::time::Instant> = None;
        let mut period = self.full_period();
        let mut next_full = tokio::time::Instant::now() + period;
        let mut leadership = self.may_write.clone();
        let mut leadership_open = true;
        let mut heartbeat = tokio::time::interval(super::status::HEARTBEAT_EVERY);
        loop {
            // Liveness: a loop that stops coming back here stops beating (see status.rs).
            self.shared.status.beat();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                changed = leadership.changed(), if leadership_open => {
                    if changed.is_err() {
                        // No election (dry run): leadership never changes.
                        leadership_open = false;
                        continue;
                    }
                    if *leadership.borrow_and_update() {
                        // While following, passes ran but nothing was written, and the old leader
                        // wrote meanwhile: look at everything once, now.
                        tracing::info!("leading: full pass requested");
                        self.index.request_full_scan();
                        batch_deadline = Some(tokio::time::Instant::now());
                    }
                }
                _ = heartbeat.tick() => {}
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    // Drain what is already queued so a burst is applied in one go.
                    for _ in 0..10_000 {
                        match rx.try_recv() {
                            Ok(i) => self.handle(i),
                            Err(_) => break,
                        }
                    }
                    if batch_deadline.is_none() {
                        batch_deadline = Some(tokio::time::Instant::now() + BATCH_WINDOW);
                    }
                    let p = self.full_period();
                    if p != period {
                        period = p;
                        next_full = tokio::time::Instant::now() + period;
                    }
                }
                _ = sleep_until_opt(batch_deadline) => {
                    batch_deadline = None;
                    self.gc_round(false).await;
                }
                _ = tokio::time::sleep_until(next_full) => {
                    next_full = tokio::time::Instant::now() + period;
                    self.gc_round(true).await;
                }
                _ = sleep_until_opt(self.retry_at) => {
                    self.retry_at = None;
                    // A full round: confirmed leaks and failed items are planned again whatever
                    // the dirty set, each failed item only once its own backoff is over.
                    self.gc_round(true).await;
                }
            }
        }
        tracing::info!("GC loop stopped");
    }

    fn handle(&mut self, input: Input) {
        let Input { source, change } = input;
        match change {
            Change::Init => {
                self.relisting.insert(source, HashSet::new());
            }
            Change::InitApply(obj) => {
                let key = self.apply(obj);
                if let Some(seen) = self.relisting.get_mut(&source) {
                    seen.insert(key);
                }
            }
            Change::InitDone => {
                let seen = self.relisting.remove(&source).unwrap_or_default();
                self.finish_relist(source, &seen);
                if self.synced.insert(source) {
                    tracing::info!(source = source.as_str(), "initial list complete");
                    if !self.all_synced() {
                        let waiting: Vec<&str> = Source::ALL.iter().filter(|s| !self.synced.contains(s)).map(|s| s.as_str()).collect();
                        let reason = format!("waiting for the first list of: {}", waiting.join(", "));
                        self.shared.status.set_ready(crate::health::WATCHES_SYNCED, false, reason);
                    }
                    if Source::ALL.contains(&source) && self.all_synced() {
                        tracing::info!(blocks = self.index.block_count(), allocations = self.index.allocation_count(), "every watch is in sync");
                        self.shared.set_synced();
                        self.index.request_full_scan();
                    }
                }
            }
            Change::Apply(obj) => {
                self.apply(obj);
            }
            Change::Delete(obj) => self.delete(obj),
            Change::Invalid(e) => {
                tracing::warn!(kind = %e.kind, name = %e.name, problem = %e.problem, "malformed object skipped");
                self.invalid.insert((e.kind.clone(), e.name.clone()), e);
            }
        }
    }

    /// Applies one object and returns its relist key.
    fn apply(&mut self, obj: Object) -> String {
        match obj {
            Object::Pod(p) => {
                self.index.apply_pod(&p);
                format!("{}/{}", p.namespace, p.name)
            }
            Object::Node(n) => {
                self.index.apply_node(&n);
                self.known.nodes.insert(n.metadata.name.clone());
                n.metadata.name
            }
            Object::Block(b) => {
                let name = b.metadata.name.clone();
                self.invalid.remove(&("IPAMBlock".to_string(), name.clone()));
                match self.index.apply_block(&b) {
                    Ok(()) => {
                        if let Ok(cidr) = b.spec.cidr.parse::<IpNet>() {
                            if b.spec.deleted {
                                self.known.blocks.remove(&name);
                            } else {
                                self.known.blocks.insert(name.clone(), cidr);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(block = %name, problem = %e.problem, "malformed block skipped");
                        self.invalid.insert((e.kind.clone(), e.name.clone()), e);
                    }
                }
                name
            }
            Object::Affinity(a) => {
                let name = a.metadata.name.clone();
                if let Err(e) = self.index.apply_affinity(&a) {
                    self.invalid.insert((e.kind.clone(), e.name.clone()), e);
                } else {
                    self.known.affinities.insert(name.clone());
                }
                name
            }
            // Handles are tracked by ID, as the index keys them (their object names derive from it).
            Object::Handle(h) => {
                self.index.apply_handle(&h);
                IpamIndex::handle_key(&h).to_string()
            }
            Object::ClusterInformation(c) => {
                let name = c.metadata.name.clone();
                if name == "default" {
                    self.cluster_info = Some(*c);
                }
                name
            }
            Object::KubeControllersConfiguration(k) => {
                let name = k.metadata.name.clone();
                if name == "default" {
                    self.kcc = Some(*k);
                    self.config_changed();
                }
                name
            }
            Object::IpamConfig(c) => {
                let name = c.metadata.name.clone();
                if name == "default" {
                    self.ipam_config = Some(*c);
                }
                name
            }
            Object::Reservation(r) => {
                let name = r.metadata.name.clone();
                let mut cidrs = Vec::new();
                for text in &r.spec.reserved_cidrs {
                    // A bare address reserves itself (Calico accepts both forms).
                    match text.parse::<IpNet>().or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from)) {
                        Ok(c) => cidrs.push(c.trunc()),
                        Err(_) => tracing::warn!(reservation = %name, cidr = %text, "unparsable reserved CIDR ignored"),
                    }
                }
                self.known.reservations.insert(name.clone(), cidrs);
                name
            }
            Object::VirtualMachine(v) => {
                let key = format!("{}/{}", v.namespace, v.name);
                self.known.kubevirt.vms.insert((v.namespace, v.name));
                key
            }
            Object::VirtualMachineInstance(v) => {
                let key = format!("{}/{}", v.namespace, v.name);
                self.known.kubevirt.vmis.insert((v.namespace, v.name), v.owned_by_vm);
                key
            }
            Object::Pool(p) => {
                let name = p.metadata.name.clone();
                match p.spec.cidr.parse::<IpNet>() {
                    Ok(cidr) if p.metadata.deletion_timestamp.is_none() => {
                        self.known.pools.insert(name.clone(), cidr);
                    }
                    _ => {
                        self.known.pools.remove(&name);
                    }
                }
                name
            }
        }
    }

    fn delete(&mut self, obj: Object) {
        match obj {
            Object::Pod(p) => self.index.delete_pod(&p.namespace, &p.name),
            Object::Node(n) => self.delete_key(Source::Nodes, &n.metadata.name),
            Object::Block(b) => self.delete_key(Source::Blocks, &b.metadata.name),
            Object::Affinity(a) => self.delete_key(Source::Affinities, &a.metadata.name),
            Object::Handle(h) => self.delete_key(Source::Handles, IpamIndex::handle_key(&h)),
            Object::ClusterInformation(c) => self.delete_key(Source::ClusterInformation, &c.metadata.name),
            Object::KubeControllersConfiguration(k) => self.delete_key(Source::KubeControllersConfiguration, &k.metadata.name),
            Object::IpamConfig(c) => self.delete_key(Source::IpamConfig, &c.metadata.name),
            Object::Pool(p) => self.delete_key(Source::Pools, &p.metadata.name),
            Object::Reservation(r) => self.delete_key(Source::Reservations, &r.metadata.name),
            Object::VirtualMachine(v) => self.delete_key(Source::VirtualMachines, &format!("{}/{}", v.namespace, v.name)),
            Object::VirtualMachineInstance(v) => self.delete_key(Source::VirtualMachineInstances, &format!("{}/{}", v.namespace, v.name)),
        }
    }

    fn delete_key(&mut self, source: Source, key: &str) {
        match source {
            Source::Pods => {
                if let Some((ns, name)) = key.split_once('/') {
                    self.index.delete_pod(ns, name);
                }
            }
            Source::Nodes => {
                self.index.delete_node(key);
                self.known.nodes.remove(key);
                // A node deletion is when upstream runs a full scan: its blocks and tunnels go.
                self.index.request_full_scan();
            }
            Source::Blocks => {
                if let Some(cidr) = self.known.blocks.remove(key) {
                    self.index.delete_block(&cidr);
                }
                self.invalid.remove(&("IPAMBlock".to_string(), key.to_string()));
            }
            Source::Affinities => {
                self.index.delete_affinity(key);
                self.known.affinities.remove(key);
            }
            Source::Handles => self.index.delete_handle(key),
            Source::ClusterInformation if key == "default" => self.cluster_info = None,
            Source::KubeControllersConfiguration if key == "default" => {
                self.kcc = None;
                self.config_changed();
            }
            Source::IpamConfig if key == "default" => self.ipam_config = None,
            Source::Pools => {
                self.known.pools.remove(key);
            }
            Source::Reservations => {
                self.known.reservations.remove(key);
            }
            Source::VirtualMachines => {
                if let Some((ns, name)) = key.split_once('/') {
                    self.known.kubevirt.vms.remove(&(ns.to_string(), name.to_string()));
                }
            }
            Source::VirtualMachineInstances => {
                if let Some((ns, name)) = key.split_once('/') {
                    self.known.kubevirt.vmis.remove(&(ns.to_string(), name.to_string()));
                }
            }
            _ => {}
        }
    }

    /// Deletes what the index holds of `source` but the relist did not show.
    fn finish_relist(&mut self, source: Source, seen: &HashSet<String>) {
        let stale: Vec<String> = match source {
            // Pods and handles are listed from the index itself: no second copy of their names.
            Source::Pods => self
                .index
                .present_pods()
                .map(|p| format!("{}/{}", self.index.resolve(p.namespace), self.index.resolve(p.name)))
                .filter(|k| !seen.contains(k))
                .collect(),
            Source::Nodes => self.known.nodes.iter().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Blocks => self.known.blocks.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Affinities => self.known.affinities.iter().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Handles => {
                self.index.handles().map(|(id, _)| self.index.resolve(id)).filter(|k| !seen.contains(*k)).map(str::to_string).collect()
            }
            Source::Pools => self.known.pools.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Reservations => self.known.reservations.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::VirtualMachines => {
                self.known.kubevirt.vms.iter().map(|(ns, n)| format!("{ns}/{n}")).filter(|k| !seen.contains(k)).collect()
            }
            Source::VirtualMachineInstances => {
                self.known.kubevirt.vmis.keys().map(|(ns, n)| format!("{ns}/{n}")).filter(|k| !seen.contains(k)).collect()
            }
            Source::ClusterInformation => singleton_gone(self.cluster_info.is_some(), seen),
            Source::KubeControllersConfiguration => singleton_gone(self.kcc.is_some(), seen),
            Source::IpamConfig => singleton_gone(self.ipam_config.is_some(), seen),
        };
        if !stale.is_empty() {
            tracing::info!(source = source.as_str(), gone = stale.len(), "objects gone since the last list");
        }
        for key in stale {
            self.delete_key(source, &key);
        }
    }

    fn datastore_paused(&self) -> bool {
        // Upstream also pauses when ClusterInformation is missing. Ours is created at start by the
        // writer task, but not in dry run (nor, later, by a follower); only an explicit
        // `datastoreReady: false` (an upgrade or migration in progress) pauses here.
        self.cluster_info.as_ref().is_some_and(|c| c.spec.datastore_ready == Some(false))
    }

    fn gc_config(&self) -> GcConfig {
        GcConfig {
            leak_grace: self.leak_grace(),
            max_releases_per_pass: DEFAULT_MAX_RELEASES_PER_PASS,
            ip_cooldown: self.cooldown_secs() as Millis * 1000,
            revalidate_live: true,
        }
    }

    fn cooldown_secs(&self) -> u32 {
        self.ipam_config.as_ref().and_then(|c| c.spec.ip_cooldown_seconds).unwrap_or(0)
    }

    /// One GC round: a pass, the report, the writes, and, if the pass asked for re-validation
    /// reads, those reads and one more pass that acts on them.
    async fn gc_round(&mut self, full: bool) {
        if !self.all_synced() {
            return;
        }
        self.pass_round(full).await;
        // Also after rounds without a pass: a pool, reservation or affinity change moves the
        // gauges without dirtying any node.
        self.publish_gauges();
    }

    async fn pass_round(&mut self, full: bool) {
        if !self.run_config.gc_enabled() {
            if !self.logged_gc_disabled {
                tracing::warn!("node controller not enabled: no GC pass runs (the watches stay up so enabling it is immediate)");
                self.logged_gc_disabled = true;
            }
            return;
        }
        self.logged_gc_disabled = false;
        let grace = self.leak_grace();
        if self.logged_grace != Some(grace) {
            let source = if self.opts.leak_grace_override.is_some() { "--leak-grace-period" } else { "KubeControllersConfiguration (unset = 15m)" };
            tracing::info!(leak_grace = %format_go_duration(grace), source, "leak grace period");
            self.logged_grace = Some(grace);
        }
        let paused = self.datastore_paused();
        self.shared.metrics(|m| m.datastore_paused = paused);
        if paused {
            if !self.logged_pause {
                tracing::warn!("ClusterInformation says datastoreReady=false: GC paused");
                self.logged_pause = true;
            }
            return;
        }
        self.logged_pause = false;
        let (dirty, full_requested) = self.index.take_dirty();
        let scope = if full || full_requested { Scope::Full } else { Scope::Dirty(dirty) };
        if let Scope::Dirty(nodes) = &scope
            && nodes.is_empty()
            && self.fresh.is_empty()
        {
            return;
        }
        let mut scope = scope;
        // At most one follow-up pass: the one that acts on the re-validation reads.
        for _ in 0..2 {
            let plan = self.pass_and_execute(&scope).await;
            if plan.revalidate.is_empty() {
                break;
            }
            self.revalidate(&plan).await;
            scope = Scope::Full;
        }
    }

    async fn pass_and_execute(&mut self, scope: &Scope) -> Plan {
        let started = Instant::now();
        let now = now_millis();
        let cfg = self.gc_config();
        let fresh = std::mem::take(&mut self.fresh);
        let kubevirt = self.kubevirt_synced().then_some(&self.known.kubevirt);
        let plan = self.gc.pass(&mut self.index, now, &cfg, scope, kubevirt, &fresh);
        let interval = if !plan.releases.is_empty() {
            REPORT_INTERVAL_RELEASES
        } else if plan.full {
            REPORT_INTERVAL_FULL
        } else {
            REPORT_INTERVAL_DIRTY
        };
        if self.report_built.is_none_or(|t| t.elapsed() >= interval) {
            let meta = ReportMeta::from_cluster_info(self.cluster_info.as_ref());
            let invalid: Vec<InvalidObject> = self.invalid.values().cloned().collect();
            let mut report = build_report(&self.index, &plan, &plan, &cfg, meta, invalid);
            // Keep only the leaked addresses of calicoctl's allocation map: the rest is every
            // allocation of the cluster (about 100 MB at 250k) and `release --from-report` only
            // acts on `inUse: false` entries anyway. The summary keeps the totals.
            let leaked: HashSet<&str> = report.leaks.iter().map(|l| l.ip.as_str()).collect();
            let kept: BTreeMap<_, _> = std::mem::take(&mut report.allocations)
                .into_iter()
                .filter(|(ip, _)| leaked.contains(ip.as_str()))
                .collect();
            report.allocations = kept;
            self.shared.set_report(report);
            self.report_built = Some(Instant::now());
            if plan.full
                && let (Some(path), Some(report)) = (&self.opts.report_file, self.shared.report())
            {
                // Off the GC task: the file system may be slow; the report is shared, not copied.
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = write_report_file(&path, &report) {
                        tracing::warn!(path = %path.display(), error = %e, "writing the leak report file failed");
                    }
                });
            }
        }

        let reclaimed_labels = self.reclamation_labels(&plan);
        let (due, held_back) = self.due_items(&plan, now);
        let leading = *self.may_write.borrow();
        let outcome = if self.opts.dry_run || !leading || plan_is_empty(&due) {
            PlanOutcome::default()
        } else {
            let may_write = self.may_write.clone();
            let keep_going = KeepGoing::new(move || *may_write.borrow());
            let exec = ExecuteOptions { keep_going: Some(keep_going), ..ExecuteOptions::default() };
            let o = execute_plan(&self.ds, &due, now, self.cooldown_secs(), &exec).await;
            tracing::info!(
                full = plan.full,
                released = o.released.len(),
                stale = o.stale.len(),
                conflicts = o.conflicts,
                errors = o.error_count(),
                handles_deleted = o.handles_deleted,
                blocks_deleted = o.blocks_deleted,
                nodes_released = o.nodes_released,
                interrupted = o.interrupted,
                held_back,
                "plan executed"
            );
            o
        };
        let released_nodes = self.record_item_results(&due, &outcome, now);
        // Work left behind is retried by a timer instead of waiting for the next full period
        // (grace/2, 7.5 min by default): failed items (conflicts that ran out of re-reads,
        // transient errors) back off round by round; leaks over the per-pass cap go on at
        // once; items waiting out their own backoff get a round when they come due.
        let mut retry_in = self.retry.round_finished(outcome.error_count() > 0);
        if retry_in.is_none() && plan.deferred > 0 {
            retry_in = Some(FIRST_DELAY);
        }
        let delay = match (retry_in, self.backoff.next_due(now).map(|due| due - now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let at = delay.map(|d| tokio::time::Instant::now() + Duration::from_millis(d.max(1) as u64));
        // A dirty round saw only some nodes: it never cancels a retry an earlier round asked for.
        self.retry_at = if plan.full { at } else { [self.retry_at, at].into_iter().flatten().min() };
        let elapsed = started.elapsed().as_secs_f64();
        let dirty_count = match scope {
            Scope::Dirty(n) => Some(n.len() as u64),
            Scope::Full => None,
        };
        let confirmed = self.gc.confirmed_count();
        let orphans = self.index.unreferenced_handles().len() as u64;
        let backing_off = self.backoff.waiting_by_category(now);
        self.shared.metrics(|m| {
            if plan.full { m.pass_full.observe(elapsed) } else { m.pass_dirty.observe(elapsed) }
            if let Some(n) = dirty_count {
                m.dirty_nodes = n;
            }
            m.confirmed_leaks = confirmed;
            m.orphan_handles = orphans;
            for (reason, n) in &outcome.released_by_reason {
                *m.releases_total.entry(reason.as_str()).or_default() += n;
            }
            for released in &outcome.released {
                if let Some(label) = reclaimed_labels.get(released) {
                    *m.reclamations.entry(label.clone()).or_default() += 1;
                }
            }
            // Upstream drops a node's reclamation series once the node's IPAM is released.
            m.reclamations.retain(|(_, node), _| !released_nodes.contains(node.as_str()));
            m.conflicts_total += outcome.conflicts;
            for (category, n) in &outcome.errors_by_category {
                *m.write_errors_total.entry(category).or_default() += n;
            }
            m.items_backing_off = backing_off;
            if outcome.error_count() == 0 {
                m.last_success_seconds = now as f64 / 1000.0;
            }
        });
        plan
    }

    /// The part of `plan` whose items are not waiting out a backoff, and how many were held
    /// back. Without any backoff the plan is executed as it is (no copy).
    fn due_items<'p>(&self, plan: &'p Plan, now: Millis) -> (std::borrow::Cow<'p, Plan>, usize) {
        if self.backoff.is_empty() {
            return (std::borrow::Cow::Borrowed(plan), 0);
        }
        let due = |k: ItemKey| self.backoff.is_due(&k, now);
        // Only the executed parts are copied; the leak records stay behind.
        let filtered = Plan {
            full: plan.full,
            releases: plan.releases.iter().filter(|r| due(ItemKey::Block(r.cidr))).cloned().collect(),
            cold_blocks: plan.cold_blocks.iter().filter(|c| due(ItemKey::Block(c.cidr))).cloned().collect(),
            empty_blocks: plan.empty_blocks.iter().filter(|e| !e.releasable || due(ItemKey::Block(e.cidr))).cloned().collect(),
            nodes_to_release: plan.nodes_to_release.iter().filter(|n| due(ItemKey::Node(n.node.clone()))).cloned().collect(),
            orphan_handles: plan
                .orphan_handles
                .iter()
                .filter(|o| !o.releasable || due(ItemKey::Handle(o.handle_id.clone())))
                .cloned()
                .collect(),
            ..Plan::default()
        };
        let held = (plan.releases.len() - filtered.releases.len())
            + (plan.cold_blocks.len() - filtered.cold_blocks.len())
            + (plan.empty_blocks.len() - filtered.empty_blocks.len())
            + (plan.nodes_to_release.len() - filtered.nodes_to_release.len())
            + (plan.orphan_handles.len() - filtered.orphan_handles.len());
        (std::borrow::Cow::Owned(filtered), held)
    }

    /// Backoff bookkeeping after a plan ran: transient and invalid failures wait per item (the
    /// apiserver is struggling or the object is broken: asking again at once would not help),
    /// conflicts do not (the next round re-reads), everything else executed starts afresh.
    /// Returns the nodes whose IPAM was released.
    fn record_item_results(&mut self, executed: &Plan, outcome: &PlanOutcome, now: Millis) -> HashSet<String> {
        let backs_off = |category: &str| category == ErrorKind::Transient.category() || category == ErrorKind::Invalid.category();
        let mut failed: HashSet<ItemKey> = HashSet::new();
        for f in &outcome.failures {
            let key = ItemKey::of(&f.item);
            if backs_off(f.category) {
                self.backoff.failed(key.clone(), now);
            }
            failed.insert(key);
        }
        let executed_keys = executed
            .releases
            .iter()
            .map(|r| ItemKey::Block(r.cidr))
            .chain(executed.cold_blocks.iter().map(|c| ItemKey::Block(c.cidr)))
            .chain(executed.empty_blocks.iter().filter(|e| e.releasable).map(|e| ItemKey::Block(e.cidr)))
            .chain(executed.nodes_to_release.iter().map(|n| ItemKey::Node(n.node.clone())))
            .chain(executed.orphan_handles.iter().filter(|o| o.releasable).map(|o| ItemKey::Handle(o.handle_id.clone())));
        for key in executed_keys {
            if !failed.contains(&key) {
                self.backoff.succeeded(&key);
            }
        }
        // Blocks that no longer exist, nodes without IPAM and handles nobody knows have nothing
        // left to retry.
        let index = &self.index;
        self.backoff.retain(|k| match k {
            ItemKey::Block(c) => index.block_slot(c).is_some(),
            ItemKey::Node(n) => index.strings().lookup(n).is_some_and(|s| !index.host_blocks(s).is_empty() || index.allocations_of_node(s).is_some()),
            ItemKey::Handle(h) => {
                index.strings().lookup(h).is_some_and(|s| index.handle(s).is_some() || !index.allocations_of_handle(s).is_empty())
            }
        });
        if self.opts.dry_run {
            return HashSet::new();
        }
        executed.nodes_to_release.iter().filter(|n| !failed.contains(&ItemKey::Node(n.node.clone()))).map(|n| n.node.clone()).collect()
    }

    /// Recomputes every IPAM gauge from the index and hands the finished numbers to the metrics
    /// (the HTTP handler only renders). Reclamation series of pools that are gone go with them.
    fn publish_gauges(&self) {
        let mut pools: Vec<PoolDef> = self.known.pools.iter().map(|(name, cidr)| PoolDef { name: name.clone(), cidr: *cidr }).collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        let reserved: Vec<IpNet> = self.known.reservations.values().flatten().copied().collect();
        let gauges = ipam_gauges::compute(&self.index, &pools, &reserved, self.gc.tracked(), self.index.node_names());
        let live: HashSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        let old = self.shared.metrics(|m| {
            m.reclamations.retain(|(pool, _), _| pool == NO_POOL || live.contains(pool.as_str()));
            std::mem::replace(&mut m.ipam, Arc::new(gauges))
        });
        // Dropped outside the lock: a scrape never waits for the previous value to be freed.
        drop(old);
    }

    /// (pool, node) of every address the plan releases, read before the writes land.
    fn reclamation_labels(&self, plan: &Plan) -> HashMap<(IpNet, u32), (String, String)> {
        let mut out = HashMap::new();
        for rel in &plan.releases {
            let Some(slot) = self.index.block_slot(&rel.cidr) else { continue };
            let Some(block) = self.index.block(slot) else { continue };
            let pool = self.pool_of(&rel.cidr);
            for item in &rel.items {
                let node = block
                    .alloc(item.ordinal)
                    .map(|a| self.index.resolve(a.node))
                    .filter(|n| !n.is_empty())
                    .unwrap_or(UNKNOWN_NODE);
                out.insert((rel.cidr, item.ordinal), (pool.clone(), node.to_string()));
            }
        }
        out
    }

    fn pool_of(&self, cidr: &IpNet) -> String {
        self.known
            .pools
            .iter()
            .filter(|(_, p)| p.contains(cidr))
            .max_by_key(|(_, p)| p.prefix_len())
            .map_or_else(|| NO_POOL.to_string(), |(name, _)| name.clone())
    }

    /// Re-reads the pods of confirmed leaks (SPEC §5.7). NotFound is an answer; any other error
    /// leaves the pod out, so its leak waits for a later pass instead of being released blind.
    async fn revalidate(&mut self, plan: &Plan) {
        let client = self.ds.client().clone();
        let resource = ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&());
        for (g, ns, pod) in &plan.revalidate {
            let key = (ns.clone(), pod.clone());
            if self.fresh.contains_key(&key) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
            self.ds.throttle().await;
            let result = api.get(pod).await;
            self.ds.counters().observe("get", "pods", 200, &result);
            match result {
                Ok(o) => match super::watch::decode(Source::Pods, &o).0 {
                    Ok(Object::Pod(p)) => {
                        self.fresh.insert(key, Some(*p));
                    }
                    _ => tracing::warn!(namespace = %ns, pod = %pod, "re-read pod did not decode"),
                },
                Err(e) if status_code(&e) == 404 => {
                    self.fresh.insert(key, None);
                }
                Err(e) => tracing::warn!(namespace = %ns, pod = %pod, gid = g, error = %e, "re-validation read failed; leak kept"),
            }
        }
    }
}

/// Writes `report` as pretty JSON to `path`, atomically (a reader never sees half a report).
fn write_report_file(path: &std::path::Path, report: &crate::scan::report::LeakReport) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    super::status::write_atomically(path, &bytes)
}

fn singleton_gone(held: bool, seen: &HashSet<String>) -> Vec<String> {
    if held && !seen.contains("default") { vec!["default".to_string()] } else { Vec::new() }
}

fn plan_is_empty(plan: &Plan) -> bool {
    plan.releases.is_empty()
        && plan.cold_blocks.is_empty()
        && !plan.empty_blocks.iter().any(|e| e.releasable)
        && plan.nodes_to_release.is_empty()
        && !plan.orphan_handles.iter().any(|o| o.releasable)
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::kube::ApiCounters;
    use crate::model::{IpamBlock, NodeLite};
    use serde_json::json;

    /// A controller whose client points nowhere: these tests never reach the network.
    fn controller() -> (Controller, Arc<Shared>) {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let api = Arc::new(ApiCounters::default());
        let shared = Arc::new(Shared::new(api.clone()));
        let ds = KubeDatastore::new(client, true, api);
        let opts = ControllerOptions { dry_run: true, leak_grace_override: Some(2000), env: EnvConfig::default(), report_file: None };
        let (_, may_write) = watch::channel(false);
        (Controller::new(ds, opts, shared.clone(), may_write), shared)
    }

    fn block(cidr: &str, node: &str) -> Object {
        let name = cidr.replace(['.', '/'], "-");
        let b: IpamBlock = serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": name, "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000001"},
            "spec": {"cidr": cidr, "affinity": format!("host:{node}"), "strictAffinity": false,
                     "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                     "attributes": [{"handle_id": "h", "secondary": {"namespace": "ns", "pod": "p", "node": node}}],
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        Object::Block(Box::new(b))
    }

    fn node(name: &str) -> Object {
        Object::Node(serde_json::from_value::<NodeLite>(json!({"metadata": {"name": name}})).unwrap())
    }

    fn input(source: Source, change: Change) -> Input {
        Input { source, change }
    }

    fn list(c: &mut Controller, source: Source, objects: Vec<Object>) {
        c.handle(input(source, Change::Init));
        for o in objects {
            c.handle(input(source, Change::InitApply(o)));
        }
        c.handle(input(source, Change::InitDone));
    }

    #[tokio::test]
    async fn full_passes_run_every_half_grace_and_every_five_minutes_when_grace_is_unset() {
        let (mut c, _) = controller();
        assert_eq!(c.full_period(), Duration::from_secs(1), "--leak-grace-period 2s");
        c.opts.leak_grace_override = None;
        assert_eq!(c.full_period(), Duration::from_secs(450), "no configuration yet: the default one's 15m, halved");
        let kcc = |grace: &str| {
            let mut node = json!({});
            if !grace.is_empty() {
                node["leakGracePeriod"] = json!(grace);
            }
            let k: KubeControllersConfiguration =
                serde_json::from_value(json!({"metadata": {"name": "default"}, "spec": {"controllers": {"node": node}}})).unwrap();
            Object::KubeControllersConfiguration(Box::new(k))
        };
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(kcc(""))));
        assert_eq!(c.full_period(), Duration::from_secs(300), "unset (a kubectl-written object): 5 minutes");
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(kcc("4m"))));
        assert_eq!(c.full_period(), Duration::from_secs(120));
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(kcc("0s"))));
        assert_eq!(c.full_period(), Duration::from_secs(300), "grace 0 still looks for gone nodes");
    }

    fn pod_obj(ns: &str, name: &str) -> Object {
        let lite: crate::model::PodLite = serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": "u"},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}
        }))
        .unwrap();
        Object::Pod(Box::new(PodFacts::from_lite(&lite).0))
    }

    fn handle_obj(id: &str) -> Object {
        Object::Handle(
            serde_json::from_value(json!({
                "metadata": {"name": crate::model::names::handle_object_name(id), "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000003"},
                "spec": {"handleID": id, "block": {}, "deleted": false}
            }))
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_relist_drops_pods_and_handles_it_no_longer_shows_straight_from_the_index() {
        let (mut c, _) = controller();
        list(&mut c, Source::Pods, vec![pod_obj("a", "p1"), pod_obj("a", "p2"), pod_obj("b", "p1")]);
        // A handle ID whose object name differs from it (upper case and a `\r` suffix).
        list(&mut c, Source::Handles, vec![handle_obj("k8s-pod-network.Keep\r"), handle_obj("k8s-pod-network.gone")]);
        assert_eq!(c.index.present_pods().count(), 3);
        assert_eq!(c.index.handles().count(), 2);
        list(&mut c, Source::Pods, vec![pod_obj("a", "p2")]);
        list(&mut c, Source::Handles, vec![handle_obj("k8s-pod-network.Keep\r")]);
        let pods: Vec<String> = c.index.present_pods().map(|p| format!("{}/{}", c.index.resolve(p.namespace), c.index.resolve(p.name))).collect();
        assert_eq!(pods, ["a/p2"]);
        let handles: Vec<&str> = c.index.handles().map(|(id, _)| c.index.resolve(id)).collect();
        assert_eq!(handles, ["k8s-pod-network.Keep"], "the index keys the handle by its cleaned ID");
        // A watch delete names the handle by its object; the index forgets it by ID.
        c.handle(input(Source::Handles, Change::Delete(handle_obj("k8s-pod-network.Keep\r"))));
        c.handle(input(Source::Pods, Change::Delete(pod_obj("a", "p2"))));
        assert_eq!((c.index.handles().count(), c.index.present_pods().count()), (0, 0));
        c.index.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn a_relist_drops_the_objects_it_no_longer_shows() {
        let (mut c, _) = controller();
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "n1"), block("10.0.0.4/30", "n2")]);
        list(&mut c, Source::Nodes, vec![node("n1"), node("n2")]);
        assert_eq!((c.index.block_count(), c.index.node_count()), (2, 2));
        // After a 410 Gone the watcher lists again: what the new list lacks was deleted meanwhile.
        list(&mut c, Source::Blocks, vec![block("10.0.0.4/30", "n2")]);
        list(&mut c, Source::Nodes, vec![node("n2")]);
        assert_eq!((c.index.block_count(), c.index.node_count()), (1, 1));
        assert!(c.index.block_slot(&"10.0.0.4/30".parse().unwrap()).is_some());
        c.index.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn no_pass_runs_and_readiness_waits_until_every_watch_listed() {
        let (mut c, shared) = controller();
        for source in Source::ALL.iter().copied().filter(|s| *s != Source::Pods) {
            list(&mut c, source, Vec::new());
        }
        c.gc_round(true).await;
        assert!(shared.report().is_none(), "no decision before the pod list is complete");
        assert!(!shared.ready());
        list(&mut c, Source::Pods, Vec::new());
        assert!(shared.ready());
        c.gc_round(true).await;
        assert!(shared.report().is_some());
    }

    /// A controller that would write (no dry run), steered by the returned "may write" sender.
    fn writer() -> (Controller, Arc<Shared>, watch::Sender<bool>) {
        let (c, shared) = controller();
        let (tx, may_write) = watch::channel(false);
        let c = Controller { opts: ControllerOptions { dry_run: false, ..c.opts.clone() }, may_write, ..c };
        (c, shared, tx)
    }

    /// An empty block still affine to node `gone`, which no longer exists: a plan to let it go.
    fn empty_block_of_gone_node() -> Object {
        let b: IpamBlock = serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": "10-0-0-0-30", "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000002"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:gone", "strictAffinity": false,
                     "allocations": [null, null, null, null], "unallocated": [0, 1, 2, 3], "attributes": [],
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        Object::Block(Box::new(b))
    }


    fn pool(name: &str, cidr: &str, deleting: bool) -> Object {
        let mut meta = json!({"name": name});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Object::Pool(serde_json::from_value(json!({"metadata": meta, "spec": {"cidr": cidr}})).unwrap())
    }

    fn reservation(name: &str, cidrs: &[&str]) -> Object {
        Object::Reservation(serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"reservedCIDRs": cidrs}})).unwrap())
    }

    /// A block with the given affinity and (ordinal, node attribute) allocations.
    fn block_with(cidr: &str, affinity: Option<&str>, allocs: &[(usize, &str)]) -> Object {
        let name = cidr.replace(['.', '/'], "-");
        let mut allocations = vec![serde_json::Value::Null; 4];
        let mut attributes = Vec::new();
        for (i, (ord, node)) in allocs.iter().enumerate() {
            allocations[*ord] = json!(i);
            let mut secondary = json!({"namespace": "ns", "pod": format!("p-{name}-{ord}")});
            if !node.is_empty() {
                secondary["node"] = json!(node);
            }
            attributes.push(json!({"handle_id": format!("h-{name}-{ord}"), "secondary": secondary}));
        }
        let unallocated: Vec<usize> = (0..4).filter(|o| !allocs.iter().any(|(a, _)| a == o)).collect();
        let b: IpamBlock = serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": name, "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000001"},
            "spec": {"cidr": cidr, "affinity": affinity, "strictAffinity": false,
                     "allocations": allocations, "unallocated": unallocated, "attributes": attributes,
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        Object::Block(Box::new(b))
    }

    fn block_calls(shared: &Shared) -> u64 {
        shared.api.snapshot().iter().filter(|((_, resource, _), _)| *resource == "ipamblocks").map(|(_, n)| n).sum()
    }

    #[tokio::test]
    async fn a_follower_plans_and_reports_but_executes_nothing_until_it_leads() {
        let (mut c, shared, leader) = writer();
        for source in Source::ALL.iter().copied() {
            let objects = if source == Source::Blocks { vec![empty_block_of_gone_node()] } else { Vec::new() };
            list(&mut c, source, objects);
        }
        c.gc_round(true).await;
        assert!(shared.report().is_some(), "a follower publishes its report");
        assert_eq!(block_calls(&shared), 0, "a follower sends no IPAM request: {:?}", shared.api.snapshot());

        // This client reaches nothing, so the leader's first write attempt fails, but it is made.
        leader.send_replace(true);
        c.gc_round(true).await;
        assert!(block_calls(&shared) > 0, "the leader executes the plan: {:?}", shared.api.snapshot());
    }

    /// The lines of the rendered text that start with one of `prefixes`, in rendered order.
    fn lines_of(text: &str, prefixes: &[&str]) -> Vec<String> {
        text.lines().filter(|l| prefixes.iter().any(|p| l.starts_with(&format!("{p}{{")))).map(str::to_string).collect()
    }

    const IPAM_METRICS: [&str; 10] = [
        "ipam_allocations_in_use",
        "ipam_allocations_borrowed",
        "ipam_blocks",
        "ipam_allocations_gc_candidates",
        "ipam_ippool_size",
        "ipam_ippool_reserved",
        "ipam_allocations_per_node",
        "ipam_allocations_borrowed_per_node",
        "ipam_blocks_per_node",
        "ipam_allocations_gc_reclamations",
    ];

    fn ipam_lines(c: &Controller, shared: &Shared) -> Vec<String> {
        c.publish_gauges();
        lines_of(&shared.render_metrics(), &IPAM_METRICS)
    }

    #[tokio::test]
    async fn ipam_gauges_count_by_pool_and_node_with_zero_series_for_known_nodes() {
        let (mut c, shared) = controller();
        list(&mut c, Source::Nodes, vec![node("n1"), node("n2")]);
        list(&mut c, Source::Pools, vec![pool("pool-a", "10.0.0.0/24", false), pool("pool-b", "10.1.0.0/24", false)]);
        list(&mut c, Source::Reservations, vec![reservation("r", &["10.0.0.0/30", "10.0.0.2", "10.9.0.0/16"])]);
        list(
            &mut c,
            Source::Blocks,
            vec![
                // n1's block: n1's pod, n2's borrowed pod, and one allocation without a node.
                block_with("10.0.0.0/30", Some("host:n1"), &[(0, "n1"), (1, "n2"), (2, "")]),
                // An unaffine block: every allocation in it is borrowed.
                block_with("10.0.0.4/30", None, &[(1, "n1")]),
                // A virtual block counts as no_affinity too.
                block_with("10.0.0.8/30", Some("virtual:lb"), &[]),
                // A block in no pool.
                block_with("192.168.0.0/30", Some("host:n2"), &[(3, "n2")]),
            ],
        );
        let expected = [
            r#"ipam_allocations_in_use{ippool="no_ippool",node="n2"} 1"#,
            r#"ipam_allocations_in_use{ippool="pool-a",node="n1"} 2"#,
            r#"ipam_allocations_in_use{ippool="pool-a",node="n2"} 1"#,
            r#"ipam_allocations_in_use{ippool="pool-a",node="unknown_node"} 1"#,
            r#"ipam_allocations_in_use{ippool="pool-b",node="n1"} 0"#,
            r#"ipam_allocations_in_use{ippool="pool-b",node="n2"} 0"#,
            r#"ipam_allocations_borrowed{ippool="pool-a",node="n1"} 1"#,
            r#"ipam_allocations_borrowed{ippool="pool-a",node="n2"} 1"#,
            r#"ipam_allocations_borrowed{ippool="pool-b",node="n1"} 0"#,
            r#"ipam_allocations_borrowed{ippool="pool-b",node="n2"} 0"#,
            r#"ipam_blocks{ippool="no_ippool",node="n2"} 1"#,
            r#"ipam_blocks{ippool="pool-a",node="n1"} 1"#,
            r#"ipam_blocks{ippool="pool-a",node="no_affinity"} 2"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-a",node="n1"} 0"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-a",node="n2"} 0"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-b",node="n1"} 0"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-b",node="n2"} 0"#,
            r#"ipam_ippool_size{ippool="pool-a"} 256"#,
            r#"ipam_ippool_size{ippool="pool-b"} 256"#,
            r#"ipam_ippool_reserved{ippool="pool-a"} 4"#,
            r#"ipam_ippool_reserved{ippool="pool-b"} 0"#,
            r#"ipam_allocations_per_node{node="n1"} 2"#,
            r#"ipam_allocations_per_node{node="n2"} 2"#,
            r#"ipam_allocations_borrowed_per_node{node="n1"} 1"#,
            r#"ipam_allocations_borrowed_per_node{node="n2"} 1"#,
            r#"ipam_blocks_per_node{node="n1"} 1"#,
            r#"ipam_blocks_per_node{node="n2"} 1"#,
            r#"ipam_blocks_per_node{node="no_affinity"} 2"#,
        ];
        assert_eq!(ipam_lines(&c, &shared), expected);
    }

    #[tokio::test]
    async fn a_deleted_pool_takes_its_series_along_and_its_blocks_move_to_no_ippool() {
        let (mut c, shared) = controller();
        list(&mut c, Source::Nodes, vec![node("n1")]);
        list(&mut c, Source::Pools, vec![pool("pool-a", "10.0.0.0/24", false)]);
        list(&mut c, Source::Blocks, vec![block_with("10.0.0.0/30", Some("host:n1"), &[(0, "n1")])]);
        shared.metrics(|m| {
            m.reclamations.insert(("pool-a".into(), "n1".into()), 3);
            m.reclamations.insert((NO_POOL.into(), "n1".into()), 1);
        });
        assert!(ipam_lines(&c, &shared).contains(&r#"ipam_allocations_gc_reclamations{ippool="pool-a",node="n1"} 3"#.to_string()));
        // A deletionTimestamp is as good as gone (upstream unregisters the pool's vectors then).
        c.handle(input(Source::Pools, Change::Apply(pool("pool-a", "10.0.0.0/24", true))));
        let expected = [
            r#"ipam_allocations_gc_reclamations{ippool="no_ippool",node="n1"} 1"#,
            r#"ipam_allocations_in_use{ippool="no_ippool",node="n1"} 1"#,
            r#"ipam_blocks{ippool="no_ippool",node="n1"} 1"#,
            r#"ipam_allocations_per_node{node="n1"} 1"#,
            r#"ipam_blocks_per_node{node="n1"} 1"#,
        ];
        assert_eq!(ipam_lines(&c, &shared), expected);
    }

    #[tokio::test]
    async fn gauges_are_recomputed_so_a_deleted_block_and_node_leave_no_series() {
        let (mut c, shared) = controller();
        list(&mut c, Source::Nodes, vec![node("n1"), node("n2")]);
        list(&mut c, Source::Pools, vec![pool("pool-a", "10.0.0.0/24", false)]);
        list(&mut c, Source::Blocks, vec![block_with("10.0.0.0/30", Some("host:n2"), &[(0, "n2")])]);
        assert_eq!(ipam_lines(&c, &shared).iter().filter(|l| l.contains("\"n2\"")).count(), 6);
        c.handle(input(Source::Blocks, Change::Delete(block_with("10.0.0.0/30", Some("host:n2"), &[]))));
        c.handle(input(Source::Nodes, Change::Delete(node("n2"))));
        let lines = ipam_lines(&c, &shared);
        assert!(lines.iter().all(|l| !l.contains("\"n2\"")), "{lines:#?}");
        assert!(lines.contains(&r#"ipam_allocations_in_use{ippool="pool-a",node="n1"} 0"#.to_string()));
    }

    fn api_calls(shared: &Shared) -> u64 {
        shared.api.snapshot().iter().map(|(_, n)| n).sum()
    }

    #[tokio::test]
    async fn items_failing_transiently_wait_out_their_backoff_and_a_retry_round_is_scheduled() {
        // The client points at a closed port: every request fails without an answer (transient).
        let (mut c, shared, leader) = writer();
        leader.send_replace(true);
        for source in Source::ALL.iter().copied().filter(|s| *s != Source::Blocks) {
            list(&mut c, source, Vec::new());
        }
        // A block of a node that no longer exists: its address and the node are released at once.
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "gone")]);
        c.gc_round(true).await;
        let after_first = api_calls(&shared);
        assert!(after_first > 0, "the first round tried the writes");
        assert!(c.retry_at.is_some(), "a round that failed schedules a retry soon");
        let waiting = shared.metrics(|m| m.items_backing_off.clone());
        assert_eq!(waiting.get("block"), Some(&1), "{waiting:?}");
        // Rounds before the items are due send nothing for them, yet still run and re-arm.
        c.gc_round(true).await;
        assert_eq!(api_calls(&shared), after_first, "a backing-off item is not retried early");
        assert!(c.retry_at.is_some());
        assert!(shared.render_metrics().contains("ipam_gc_items_backing_off{item=\"block\"} 1"));
    }

    fn kubevirt(namespace: &str, name: &str, owned_by_vm: bool) -> super::super::watch::KubeVirtObject {
        super::super::watch::KubeVirtObject { namespace: namespace.into(), name: name.into(), owned_by_vm }
    }

    #[tokio::test]
    async fn vm_allocations_become_candidates_only_once_kubevirt_is_listed_and_shows_the_vm_gone() {
        let (mut c, _) = controller();
        for source in Source::ALL.iter().copied().filter(|s| *s != Source::Blocks) {
            list(&mut c, source, if source == Source::Nodes { vec![node("n1")] } else { Vec::new() });
        }
        let b: IpamBlock = serde_json::from_value(json!({
            "metadata": {"name": "10-0-0-0-30", "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000001"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:n1", "strictAffinity": false,
                     "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                     "attributes": [{"handle_id": "h", "secondary": {"namespace": "ns", "pod": "virt-launcher-vm1-x", "node": "n1", "vmi-name": "vm1"}}],
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        list(&mut c, Source::Blocks, vec![Object::Block(Box::new(b))]);
        c.gc_round(true).await;
        assert_eq!(c.gc.candidate_count(), 0, "without KubeVirt facts a VM allocation is kept");

        // KubeVirt listed: the VM exists, so its allocation stays valid.
        list(&mut c, Source::VirtualMachines, vec![Object::VirtualMachine(kubevirt("ns", "vm1", false))]);
        list(&mut c, Source::VirtualMachineInstances, Vec::new());
        c.gc_round(true).await;
        assert_eq!(c.gc.candidate_count(), 0);

        // A VMI a VirtualMachine owns does not keep it alive on its own once the VM is gone.
        c.handle(input(Source::VirtualMachineInstances, Change::Apply(Object::VirtualMachineInstance(kubevirt("ns", "vm1", true)))));
        c.handle(input(Source::VirtualMachines, Change::Delete(Object::VirtualMachine(kubevirt("ns", "vm1", false)))));
        c.gc_round(true).await;
        assert_eq!(c.gc.candidate_count(), 1, "VM gone: its allocation is a leak candidate");
        assert!(c.all_synced(), "KubeVirt's sources never make readiness wait");
    }

    #[tokio::test]
    async fn without_the_node_controller_no_gc_pass_runs_but_readiness_still_follows_the_watches() {
        let (mut c, shared) = controller();
        let env = EnvConfig::from_env(&[("ENABLED_CONTROLLERS".to_string(), "loadbalancer".to_string())].into()).unwrap();
        c.opts.env = env;
        c.config_changed();
        for source in Source::ALL {
            list(&mut c, source, Vec::new());
        }
        c.gc_round(true).await;
        assert!(shared.ready(), "process stays up and ready");
        assert!(shared.report().is_none(), "no GC pass without the node controller");
        assert!(!shared.config.borrow().run.gc_enabled(), "the merged config is published");
    }

    #[tokio::test]
    async fn a_kcc_change_is_merged_and_published_once() {
        let (mut c, shared) = controller();
        let mut rx = shared.config.subscribe();
        let kcc: KubeControllersConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "default"},
            "spec": {"logSeverityScreen": "Debug", "controllers": {"node": {"leakGracePeriod": "7s"}}}
        }))
        .unwrap();
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(Object::KubeControllersConfiguration(Box::new(kcc.clone())))));
        assert!(rx.has_changed().unwrap());
        let state = rx.borrow_and_update().clone();
        assert_eq!((state.run.log_level, state.run.leak_grace(), state.api_present), (crate::config::LogLevel::Debug, 7000, true));
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(Object::KubeControllersConfiguration(Box::new(kcc)))));
        assert!(!rx.has_changed().unwrap(), "an unchanged merge (our own status write) is not republished");
    }

    #[tokio::test]
    async fn watch_deletes_remove_blocks_and_nodes_by_name() {
        let (mut c, _) = controller();
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "n1")]);
        list(&mut c, Source::Nodes, vec![node("n1")]);
        c.handle(input(Source::Blocks, Change::Delete(block("10.0.0.0/30", "n1"))));
        c.handle(input(Source::Nodes, Change::Delete(node("n1"))));
        assert_eq!((c.index.block_count(), c.index.node_count()), (0, 0));
    }
}
