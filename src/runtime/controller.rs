//! The single writer: one task owns the [`IpamIndex`] and the [`GcState`], applies every watch
//! input, and runs the GC loop (dirty passes after batched events, full passes every
//! `leak_grace / 2`), executing plans through the datastore.
//!
//! Owns: relist bookkeeping (objects not re-listed at `InitDone` are deleted), the readiness
//! gate (no GC decision before every watch finished its first list), the `datastoreReady` pause,
//! the final re-validation reads of confirmed leaks, publishing the report and metrics, merging
//! env with each KubeControllersConfiguration it sees (no GC pass without the node controller),
//! and the heartbeat that liveness judges.
//! Must not: list or read anything else inside the loop (every input comes from a watch; the
//! only reads are the re-validation GETs), or hold the shared lock across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use kube::api::{Api, ApiResource, DynamicObject};
use tokio::sync::{mpsc, watch};

use super::watch::{Change, Input, Object, Source};
use super::{ConfigState, Shared};
use crate::config::{EnvConfig, RunConfig};
use crate::datastore::kube::{KubeDatastore, status_code};
use crate::datastore::{ExecuteOptions, PlanOutcome, execute_plan};
use crate::ipam::gc::{DEFAULT_MAX_RELEASES_PER_PASS, GcConfig, GcState, Plan, Scope};
use crate::ipam::index::IpamIndex;
use crate::model::time::{Millis, format_go_duration};
use crate::model::{ClusterInformation, InvalidObject, IpamConfig, KubeControllersConfiguration, PodFacts};
use crate::scan::report::{ReportMeta, build_report};

/// Events are batched this long before a dirty pass, as upstream does (1 s): a burst of pod
/// deletions becomes one pass instead of hundreds.
const BATCH_WINDOW: Duration = Duration::from_secs(1);
/// Full passes never run more often than this, whatever the grace period.
const MIN_FULL_PERIOD: Duration = Duration::from_secs(1);
/// `build_report` formats every allocation (calicoctl's format): 450-600 ms at 250k allocations
/// (measured, release build). So the report is rebuilt when a pass plans releases (at most every
/// second), after a full pass at most every 5 s, and otherwise at most every 30 s: event churn
/// does not turn into report formatting nobody reads.
const REPORT_INTERVAL_RELEASES: Duration = Duration::from_secs(1);
const REPORT_INTERVAL_FULL: Duration = Duration::from_secs(5);
const REPORT_INTERVAL_DIRTY: Duration = Duration::from_secs(30);
/// The pool label of blocks that no IPPool contains (upstream's name).
const NO_POOL: &str = "no_ippool";

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Plans are computed and reported but never executed.
    pub dry_run: bool,
    /// Overrides the KubeControllersConfiguration's `leakGracePeriod` (tests).
    pub leak_grace_override: Option<Millis>,
    /// The environment's part of the configuration, merged with every KubeControllersConfiguration.
    pub env: EnvConfig,
}

pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// Keys of the objects of each kind the index holds, for deleting what a relist no longer shows.
#[derive(Default)]
struct Known {
    pods: HashSet<(String, String)>,
    nodes: HashSet<String>,
    blocks: HashMap<String, IpNet>,
    affinities: HashSet<String>,
    /// Object name → handle ID (the index keys handles by ID).
    handles: HashMap<String, String>,
    pools: HashMap<String, IpNet>,
}

pub struct Controller {
    index: IpamIndex,
    gc: GcState,
    ds: KubeDatastore,
    opts: ControllerOptions,
    shared: Arc<Shared>,
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
}

impl Controller {
    pub fn new(ds: KubeDatastore, opts: ControllerOptions, shared: Arc<Shared>) -> Self {
        let run_config = RunConfig::merge(&opts.env, None);
        Controller {
            run_config,
            logged_gc_disabled: false,
            index: IpamIndex::new(),
            gc: GcState::new(),
            ds,
            opts,
            shared,
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

    fn full_period(&self) -> Duration {
        let half = Duration::from_millis((self.leak_grace().max(0) / 2) as u64);
        // A grace of 0 disables confirmation; full passes still find gone nodes (upstream: 5 min).
        if half.is_zero() { Duration::from_secs(300) } else { half.max(MIN_FULL_PERIOD) }
    }

    fn all_synced(&self) -> bool {
        self.synced.len() == Source::ALL.len()
    }

    /// The loop: inputs, batched dirty passes, periodic full passes, until `shutdown` flips. A
    /// pass in progress (with its writes) is finished before the loop looks at `shutdown` again.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut shutdown: watch::Receiver<bool>) {
        let mut batch_deadline: Option<tokio::time::Instant> = None;
        let mut period = self.full_period();
        let mut next_full = tokio::time::Instant::now() + period;
        let mut heartbeat = tokio::time::interval(super::status::HEARTBEAT_EVERY);
        loop {
            // Liveness: a loop that stops coming back here stops beating (see status.rs).
            self.shared.status.beat();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
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
                    if self.all_synced() {
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
                let key = format!("{}/{}", p.namespace, p.name);
                self.known.pods.insert((p.namespace.clone(), p.name.clone()));
                key
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
            Object::Handle(h) => {
                let name = h.metadata.name.clone();
                self.index.apply_handle(&h);
                let id = IpamIndex::handle_key(&h).to_string();
                self.known.handles.insert(name.clone(), id);
                name
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
            Object::Pod(p) => {
                self.index.delete_pod(&p.namespace, &p.name);
                self.known.pods.remove(&(p.namespace.clone(), p.name.clone()));
            }
            Object::Node(n) => self.delete_key(Source::Nodes, &n.metadata.name),
            Object::Block(b) => self.delete_key(Source::Blocks, &b.metadata.name),
            Object::Affinity(a) => self.delete_key(Source::Affinities, &a.metadata.name),
            Object::Handle(h) => self.delete_key(Source::Handles, &h.metadata.name),
            Object::ClusterInformation(c) => self.delete_key(Source::ClusterInformation, &c.metadata.name),
            Object::KubeControllersConfiguration(k) => self.delete_key(Source::KubeControllersConfiguration, &k.metadata.name),
            Object::IpamConfig(c) => self.delete_key(Source::IpamConfig, &c.metadata.name),
            Object::Pool(p) => self.delete_key(Source::Pools, &p.metadata.name),
        }
    }

    fn delete_key(&mut self, source: Source, key: &str) {
        match source {
            Source::Pods => {
                if let Some((ns, name)) = key.split_once('/') {
                    self.index.delete_pod(ns, name);
                    self.known.pods.remove(&(ns.to_string(), name.to_string()));
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
            Source::Handles => {
                if let Some(id) = self.known.handles.remove(key) {
                    self.index.delete_handle(&id);
                }
            }
            Source::ClusterInformation if key == "default" => self.cluster_info = None,
            Source::KubeControllersConfiguration if key == "default" => {
                self.kcc = None;
                self.config_changed();
            }
            Source::IpamConfig if key == "default" => self.ipam_config = None,
            Source::Pools => {
                self.known.pools.remove(key);
            }
            _ => {}
        }
    }

    /// Deletes what the index holds of `source` but the relist did not show.
    fn finish_relist(&mut self, source: Source, seen: &HashSet<String>) {
        let stale: Vec<String> = match source {
            Source::Pods => self.known.pods.iter().map(|(ns, n)| format!("{ns}/{n}")).filter(|k| !seen.contains(k)).collect(),
            Source::Nodes => self.known.nodes.iter().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Blocks => self.known.blocks.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Affinities => self.known.affinities.iter().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Handles => self.known.handles.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Pools => self.known.pools.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
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
        let plan = self.gc.pass(&self.index, now, &cfg, scope, None, &fresh);
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
        }

        let reclaimed_labels = self.reclamation_labels(&plan);
        let outcome = if self.opts.dry_run || plan_is_empty(&plan) {
            PlanOutcome::default()
        } else {
            let o = execute_plan(&self.ds, &plan, now, self.cooldown_secs(), &ExecuteOptions::default()).await;
            tracing::info!(
                full = plan.full,
                released = o.released.len(),
                stale = o.stale.len(),
                conflicts = o.conflicts,
                errors = o.error_count(),
                handles_deleted = o.handles_deleted,
                blocks_deleted = o.blocks_deleted,
                nodes_released = o.nodes_released,
                "plan executed"
            );
            o
        };
        let elapsed = started.elapsed().as_secs_f64();
        let in_use = self.in_use_by_pool_and_node();
        let dirty_count = match scope {
            Scope::Dirty(n) => Some(n.len() as u64),
            Scope::Full => None,
        };
        let confirmed = self.gc.confirmed_count();
        let orphans = self.index.unreferenced_handles().len() as u64;
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
            m.conflicts_total += outcome.conflicts;
            for (category, n) in &outcome.errors_by_category {
                *m.write_errors_total.entry(category).or_default() += n;
            }
            m.in_use = in_use;
            if outcome.error_count() == 0 {
                m.last_success_seconds = now as f64 / 1000.0;
            }
        });
        plan
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
                    .unwrap_or("unknown_node");
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

    fn in_use_by_pool_and_node(&self) -> BTreeMap<(String, String), u64> {
        // Counted by interned symbols first: no string is built per allocation.
        let mut counts: HashMap<(String, crate::ipam::intern::Sym), u64> = HashMap::new();
        let mut per_block: HashMap<crate::ipam::intern::Sym, u64> = HashMap::new();
        for (_, block) in self.index.blocks() {
            for a in &block.allocs {
                *per_block.entry(a.node).or_default() += 1;
            }
            let pool = self.pool_of(&block.cidr);
            for (node, n) in per_block.drain() {
                *counts.entry((pool.clone(), node)).or_default() += n;
            }
        }
        let mut out: BTreeMap<(String, String), u64> = BTreeMap::new();
        for ((pool, node), n) in counts {
            let node = self.index.resolve(node);
            let node = if node.is_empty() { "unknown_node" } else { node };
            *out.entry((pool, node.to_string())).or_default() += n;
        }
        out
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
        let opts = ControllerOptions { dry_run: true, leak_grace_override: Some(2000), env: EnvConfig::default() };
        (Controller::new(ds, opts, shared.clone()), shared)
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
