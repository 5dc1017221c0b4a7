//! `simulate`: a synthetic cluster of any size through the whole GC pipeline in memory, checked
//! by an independent checker, with stage timings and memory.
//!
//! The pipeline, in order (the steps that a real controller does against a cluster are marked):
//! 1. generate: build the cluster with leaks planted in known places ([`cluster`]);
//! 2. load: write it into a [`MemoryDatastore`] (cluster: the objects already exist);
//! 3. build: list the datastore and `reset` the index (timed, median of `repeats`);
//! 4. full pass #1 at T0: leaks on deleted nodes confirm at once; the plan is executed
//!    (cluster: writes) and the written objects are fed back into the index (cluster: watches);
//! 5. events: pods deleted → dirty pass; a node and its pods deleted → the pass the index asks for;
//! 6. full pass #2 after the grace period: second observations confirm live-node leaks, empty
//!    blocks and orphan handles; executed and fed back; then passes until nothing is left
//!    (the per-pass cap rolls over);
//! 7. check: [`checker`] compares the datastore with the planted truth, never asking the GC;
//! 8. steady-state timings (full pass, dirty pass of 10 nodes, execute) and memory.
//!
//! Must not: read the clock for anything but measuring (`now` is advanced by hand), or touch
//! the network. Builds without the `cli` feature.

pub mod checker;
pub mod cluster;
pub mod dump;
pub mod report;
pub mod rng;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::datastore::memory::SharedHandle;
use crate::datastore::{block_on, execute_plan, ExecuteOptions, Kind, MemoryDatastore, PlanOutcome};
use crate::ipam::gc::{GcConfig, GcState};
use crate::ipam::plan::{Plan, Scope};
use crate::ipam::index::{HandleObject, IpamIndex, Snapshot};
use crate::model::time::Millis;
use crate::model::pod::{PodObject, PodView};
use crate::model::{BlockAffinity, IpamBlock, IpamHandle};

pub use checker::{check, Before, CheckReport, FinalState};
pub use cluster::{generate, Category, Planted, SimPod, SimPodFacts, SyntheticCluster};
pub use report::{OutputFormat, SimReport};

/// T0 of the pipeline: two days after the objects were created.
pub const T0: Millis = cluster::CREATED_AT + 2 * 86_400_000;
/// The grace period the simulated controller runs with (the product's default).
pub const GRACE: Millis = crate::model::config::DEFAULT_LEAK_GRACE;
/// Upper bound on follow-up passes after pass #2; the cap of 10,000 releases per pass means a
/// cluster with N leaks needs N/10,000 of them.
const MAX_DRAIN_PASSES: usize = 200;
/// Nodes in the timed incremental pass.
const DIRTY_NODES: usize = 10;
/// The cluster size a dirty pass is compared with.
const SMALL_NODES: usize = 100;
/// Timed dirty passes (of `DIRTY_NODES` nodes) by default: enough for a p99.
pub const DEFAULT_DIRTY_SAMPLES: usize = 200;

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Share of pods planted as leaks (deleted, finished, stale IP), and half of it as the share
    /// of nodes deleted.
    pub leak_fraction: f64,
    pub seed: u64,
    pub output: OutputFormat,
    pub write_dump: Option<PathBuf>,
    /// Runs per timed stage; the median is reported.
    pub repeats: usize,
    /// Timed dirty passes of 10 nodes (at least `repeats`); the median and p99 are reported.
    pub dirty_samples: usize,
    /// A previous run's JSON report to compare this run's figures with.
    pub compare: Option<serde_json::Value>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions { nodes: 100, pods_per_node: 30, leak_fraction: 0.02, seed: 1, output: OutputFormat::Table, write_dump: None, repeats: 5, dirty_samples: DEFAULT_DIRTY_SAMPLES, compare: None }
    }
}

impl SimOptions {
    /// Options whose cluster holds about `allocations` allocations at 30 pods per node (a node
    /// carries ~39 on average: 30 pods, a quarter of them dual-stack, and its tunnels).
    pub fn for_allocations(allocations: usize, seed: u64) -> SimOptions {
        SimOptions { nodes: (allocations / 39).max(4), seed, ..SimOptions::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulate: {0}")]
    Options(String),
    #[error("simulate: writing the dump: {0}")]
    Dump(#[source] std::io::Error),
    #[error("simulate: writing the report: {0}")]
    Output(#[source] std::io::Error),
    #[error("simulate: the memory datastore refused {what}: {message}")]
    Datastore { what: String, message: String },
    /// The generator made a cluster it should not have: a defect of `simulate`, not of its input.
    #[error("simulate: the generated cluster is not what it should be: {0}")]
    Generator(String),
}

impl SimError {
    pub fn category(&self) -> &'static str {
        match self {
            SimError::Options(_) => "options",
            SimError::Dump(_) => "dump",
            SimError::Output(_) => "output",
            SimError::Datastore { .. } => "datastore",
            SimError::Generator(_) => "generator",
        }
    }
}

/// The outcome: `ok` is the checker's verdict, so the CLI exits non-zero on any mismatch.
#[derive(Debug, Clone)]
pub struct SimSummary {
    pub ok: bool,
    pub report: SimReport,
}

/// Everything the pipeline leaves behind, for the checker and for tests that tamper with it.
pub struct PipelineRun {
    /// The cluster as generated, without its IPAM objects and API-shaped pods (see [`Loaded`]).
    pub cluster: SyntheticCluster,
    pub before: Before,
    pub ds: MemoryDatastore,
    pub index: IpamIndex,
    pub gc: GcState,
    pub cfg: GcConfig,
    /// Addresses that some pass reported as leaked (candidate or confirmed).
    pub found: HashSet<IpAddr>,
    pub passes: Vec<report::PassStat>,
    /// Problems found by the pipeline itself (invariants, index vs datastore, leftover work).
    pub problems: Vec<String>,
    pub build_samples: Vec<f64>,
    /// Listing and decoding the IPAM objects, once per phase of the run.
    pub decode_samples: Vec<f64>,
    pub now: Millis,
}

impl PipelineRun {
    /// The pods present at the end: the generated ones less those the run's events deleted.
    pub fn live_pods(&self) -> impl Iterator<Item = PodView<'_>> + '_ {
        let events = &self.cluster.events;
        let node_pods = if events.deleted_node.is_some() { &events.deleted_node_pods[..] } else { &[] };
        let gone: HashSet<(&str, &str)> = events.deleted_pods.iter().chain(node_pods).map(|(ns, n)| (ns.as_str(), n.as_str())).collect();
        self.cluster.pod_facts.iter().map(PodObject::view).filter(move |p| !gone.contains(&(p.namespace, p.name)))
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn ds_error(what: impl Into<String>) -> impl FnOnce(crate::datastore::DatastoreError) -> SimError {
    let what = what.into();
    move |e| SimError::Datastore { what, message: e.to_string() }
}

/// Moves the cluster's Calico objects into a fresh memory datastore: its blocks, affinities and
/// handles are left empty (pools stay).
pub fn load_datastore(cluster: &mut SyntheticCluster) -> Result<MemoryDatastore, SimError> {
    let ds = MemoryDatastore::new();
    fn put<T: serde::Serialize>(ds: &MemoryDatastore, kind: Kind, name: &str, obj: &T) -> Result<(), SimError> {
        let value = serde_json::to_value(obj).map_err(|e| SimError::Datastore { what: name.to_string(), message: e.to_string() })?;
        ds.create_now(kind, name, value).map_err(ds_error(name))?;
        Ok(())
    }
    // Each typed object is dropped once stored: the cluster's typed copy and the datastore's
    // never both hold everything.
    fn put_all<S: serde::Serialize>(ds: &MemoryDatastore, kind: Kind, objects: Vec<crate::model::meta::Object<S>>) -> Result<(), SimError> {
        for o in objects {
            put(ds, kind, o.name(), &o)?;
        }
        Ok(())
    }
    for p in &cluster.pools {
        put(&ds, Kind::IpPool, p.name(), p)?;
    }
    put_all(&ds, Kind::IpamBlock, std::mem::take(&mut cluster.blocks))?;
    put_all(&ds, Kind::BlockAffinity, std::mem::take(&mut cluster.affinities))?;
    for h in std::mem::take(&mut cluster.handles) {
        // The error's name is spelled only when there is an error.
        ds.load_handle(&h).map_err(|e| ds_error(h.object_name())(e))?;
    }
    Ok(ds)
}

/// The datastore's IPAM objects as a relist would deliver them (soft-deleted ones skipped),
/// decoded and shared with the datastore, which holds blocks and affinities typed and handles
/// in a compact form the index reads as they are: a listing costs a pointer an object, not a
/// second copy of the cluster.
pub struct Listed {
    pub blocks: Vec<Arc<IpamBlock>>,
    pub affinities: Vec<Arc<BlockAffinity>>,
    pub handles: Vec<SharedHandle>,
}

/// A whole listing goes at once, as after a controller's initial sync: the allocator is asked
/// to tidy up now rather than a little in each later allocation (see `memstat::give_back`).
fn drop_listing(listed: Listed) {
    drop(listed);
    crate::memstat::give_back();
}

pub fn list_ipam(ds: &MemoryDatastore) -> Result<Listed, SimError> {
    let decode = |e: crate::datastore::DatastoreError| SimError::Datastore { what: "the IPAM objects".into(), message: e.to_string() };
    Ok(Listed {
        blocks: ds.shared_current(Kind::IpamBlock).map_err(decode)?,
        affinities: ds.shared_current(Kind::BlockAffinity).map_err(decode)?,
        handles: ds.shared_handles().map_err(decode)?,
    })
}

/// Brings the index's copies of one kind in line with the datastore. `indexed` lists each copy
/// as (object name, revision, what `delete` takes); copies the datastore no longer holds (or holds
/// soft-deleted) are deleted, and objects whose revision differs are read, decoded and applied.
/// An unchanged object costs a lookup and is never read.
fn sync_kind<K, T: serde::de::DeserializeOwned>(
    ds: &MemoryDatastore,
    index: &mut IpamIndex,
    kind: Kind,
    indexed: Vec<(String, String, K)>,
    delete: impl Fn(&mut IpamIndex, &K),
    apply: impl Fn(&mut IpamIndex, &T) -> Result<(), crate::model::InvalidObject>,
) -> Result<(), SimError> {
    let revisions: HashMap<&str, &str> = indexed.iter().map(|(n, r, _)| (n.as_str(), r.as_str())).collect();
    let mut seen = HashSet::new();
    let mut changed = Vec::new();
    for (name, revision, soft_deleted) in ds.revisions(kind) {
        if soft_deleted {
            continue;
        }
        if revisions.get(name.as_str()) != Some(&revision.as_str()) {
            changed.push(name.clone());
        }
        seen.insert(name);
    }
    for (_, _, key) in indexed.iter().filter(|(n, _, _)| !seen.contains(n)) {
        delete(index, key);
    }
    for name in changed {
        let Some(stored) = ds.peek(kind, &name) else { continue };
        let object: T = stored.decode().map_err(ds_error(name.clone()))?;
        apply(index, &object).map_err(|e| SimError::Datastore { what: name, message: e.to_string() })?;
    }
    Ok(())
}

/// Feeds what the datastore now holds back into the index, as the watches would: changed
/// objects are applied, vanished ones deleted.
pub fn sync_index(ds: &MemoryDatastore, index: &mut IpamIndex) -> Result<(), SimError> {
    let blocks = index.blocks().map(|(_, b)| (b.name.to_string(), b.revision.to_string(), b.cidr)).collect();
    sync_kind(ds, index, Kind::IpamBlock, blocks, |ix, cidr| ix.delete_block(cidr), |ix, b: &IpamBlock| ix.apply_block(b))?;
    let affinities = index.affinities().map(|(k, a)| (k.to_string(), a.revision.to_string(), k.to_string())).collect();
    sync_kind(ds, index, Kind::BlockAffinity, affinities, |ix, name: &String| ix.delete_affinity(name), |ix, a: &BlockAffinity| ix.apply_affinity(a))?;
    let handles = index
        .handles()
        .map(|(sym, h)| {
            let id = index.handle_name(sym);
            (crate::model::names::handle_object_name(&id), h.revision.to_string(), id.into_owned())
        })
        .collect();
    sync_kind(ds, index, Kind::IpamHandle, handles, |ix, id: &String| ix.delete_handle(id), |ix, h: &IpamHandle| ix.apply_handle(h))
}

/// Feeds the index what was written after revision `since`, as the watches would, and
/// returns the revision it is now in line with: objects written since are applied (or deleted
/// when soft-deleted), removed ones deleted. Needs [`MemoryDatastore::record_removals`] from the
/// revision the index was built at; reads only what changed, never a copy of every object.
pub fn follow(ds: &MemoryDatastore, index: &mut IpamIndex, since: u64) -> Result<u64, SimError> {
    let now = ds.revision();
    let invalid = |e: crate::model::InvalidObject| SimError::Datastore { what: e.to_string(), message: "invalid".into() };
    // A block is indexed under its CIDR only when its name is that CIDR's: another object
    // claiming the CIDR was never indexed, so its removal deletes nothing.
    let cidr = |b: &IpamBlock| {
        b.spec.cidr.parse::<ipnet::IpNet>().ok().filter(|c| crate::model::names::cidr_to_name(c) == b.name())
    };
    for b in ds.take_removed::<IpamBlock>(Kind::IpamBlock).map_err(ds_error("the removed IPAM blocks"))? {
        if let Some(c) = cidr(&b) {
            index.delete_block(&c);
        }
    }
    for (soft_deleted, b) in ds.changed_since::<IpamBlock>(Kind::IpamBlock, since).map_err(ds_error("the IPAM blocks"))? {
        match (soft_deleted, cidr(&b)) {
            (true, Some(c)) => index.delete_block(&c),
            (true, None) => {}
            (false, _) => index.apply_block(&b).map_err(invalid)?,
        }
    }
    for a in ds.take_removed::<BlockAffinity>(Kind::BlockAffinity).map_err(ds_error("the removed affinities"))? {
        index.delete_affinity(a.name());
    }
    for (soft_deleted, a) in ds.changed_since::<BlockAffinity>(Kind::BlockAffinity, since).map_err(ds_error("the affinities"))? {
        if soft_deleted {
            index.delete_affinity(a.name());
        } else {
            index.apply_affinity(&a).map_err(invalid)?;
        }
    }
    // A handle is keyed by its handle ID; an object whose name does not match its ID was never
    // indexed under it, so its removal deletes nothing.
    for h in ds.take_removed::<IpamHandle>(Kind::IpamHandle).map_err(ds_error("the removed handles"))? {
        if let Ok(id) = IpamIndex::checked_handle_key(&h) {
            index.delete_handle(id);
        }
    }
    for (soft_deleted, h) in ds.changed_since::<IpamHandle>(Kind::IpamHandle, since).map_err(ds_error("the handles"))? {
        if !soft_deleted {
            index.apply_handle(&h).map_err(invalid)?;
        } else if let Ok(id) = IpamIndex::checked_handle_key(&h) {
            index.delete_handle(id);
        }
    }
    Ok(now)
}

/// The one field of an IPAMHandle the checker reads.
#[derive(serde::Deserialize)]
struct HandleIdOnly {
    spec: HandleIdSpec,
}

#[derive(serde::Deserialize)]
struct HandleIdSpec {
    #[serde(rename = "handleID", default)]
    handle_id: String,
}

/// The nearest-rank `q` quantile (0 < q <= 1) of `samples`; 0 when there are none.
fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn gc_config() -> GcConfig {
    GcConfig { leak_grace: GRACE, ..GcConfig::default() }
}

struct Runner<'a> {
    ds: &'a MemoryDatastore,
    index: IpamIndex,
    /// The datastore revision the index is in line with.
    synced: u64,
    gc: GcState,
    cfg: GcConfig,
    found: HashSet<IpAddr>,
    passes: Vec<report::PassStat>,
    exec: ExecuteOptions,
}

impl Runner<'_> {
    /// One pass, its execution and the feed-back. Returns the plan's outcome.
    fn step(&mut self, name: &'static str, now: Millis, scope: Scope) -> Result<(Plan, PlanOutcome), SimError> {
        let full = matches!(scope, Scope::Full);
        let started = Instant::now();
        let plan = self.gc.pass(&mut self.index, now, &self.cfg, &scope, None, &BTreeMap::new());
        let pass_ms = ms(started);
        for l in &plan.leaks {
            if let Some(ip) = self.index.ip_of(l.gid) {
                self.found.insert(ip);
            }
        }
        let started = Instant::now();
        let outcome = block_on(execute_plan(self.ds, &plan, now, 0, &self.exec));
        let execute_ms = ms(started);
        self.synced = follow(self.ds, &mut self.index, self.synced)?;
        if plan_has_work(&plan) {
            // After a burst of writes, as the controller does after executing a plan.
            crate::memstat::give_back();
        }
        self.passes.push(report::PassStat::new(name, full, now - T0, &plan, &outcome, pass_ms, execute_ms));
        Ok((plan, outcome))
    }
}

fn plan_has_work(plan: &Plan) -> bool {
    plan.release_count() > 0
        || !plan.nodes_to_release.is_empty()
        || plan.empty_blocks.iter().any(|e| e.releasable)
        || plan.orphan_handles.iter().any(|o| o.releasable)
        || !plan.cold_blocks.is_empty()
}

/// A generated cluster written into a datastore once, keeping of its generated objects only
/// what the checker compares the end with ([`Before`]) and what the pipeline feeds the index
/// besides the datastore (pod facts, nodes). Its IPAM objects live in the datastore alone, as a
/// controller's would live in the API server: each phase lists the datastore (a listing shares
/// the typed objects the datastore holds, see [`list_ipam`]), builds its index from the listing
/// and drops the listing, and the pipeline follows the datastore's writes by revision
/// ([`follow`]), so no phase holds a second copy of the cluster's IPAM objects.
pub struct Loaded {
    pub cluster: SyntheticCluster,
    pub before: Before,
    pub ds: MemoryDatastore,
    /// How long each phase's listing took to decode.
    decode_samples: std::cell::RefCell<Vec<f64>>,
}

impl Loaded {
    pub fn new(mut cluster: SyntheticCluster) -> Result<Loaded, SimError> {
        // Pods as the API would show them are only for dumps, written before this: gone before
        // anything else is built beside the generated cluster.
        cluster.pods = Vec::new();
        let before = Before::of(&cluster);
        let ds = load_datastore(&mut cluster)?;
        crate::memstat::give_back();
        Ok(Loaded { cluster, before, ds, decode_samples: Default::default() })
    }

    /// The datastore's IPAM objects decoded (the time it took is recorded).
    fn listing(&self) -> Result<Listed, SimError> {
        let started = Instant::now();
        let listed = list_ipam(&self.ds)?;
        self.decode_samples.borrow_mut().push(ms(started));
        Ok(listed)
    }

    fn snapshot<'a>(&'a self, listed: &'a Listed) -> Snapshot<'a, Arc<IpamBlock>, Arc<BlockAffinity>, SharedHandle, SimPodFacts> {
        let c = &self.cluster;
        Snapshot { blocks: &listed.blocks, affinities: &listed.affinities, handles: &listed.handles, pods: &c.pod_facts, nodes: &c.nodes }
    }
}

/// Runs steps 2-6 of the pipeline on `cluster` and collects what the checker needs.
pub fn run_pipeline(cluster: SyntheticCluster, repeats: usize) -> Result<PipelineRun, SimError> {
    run_loaded(Loaded::new(cluster)?, repeats)
}

/// The pipeline on a loaded cluster, in its own datastore.
fn run_loaded(loaded: Loaded, repeats: usize) -> Result<PipelineRun, SimError> {
    let listed = loaded.listing()?;
    let mut build_samples = Vec::new();
    let mut index = IpamIndex::new();
    for _ in 0..repeats.max(1) {
        // One index at a time: the previous build is dropped before the next starts.
        index = IpamIndex::new();
        let started = Instant::now();
        let invalid = index.reset(loaded.snapshot(&listed));
        build_samples.push(ms(started));
        if !invalid.is_empty() {
            return Err(SimError::Generator(format!("generated objects are invalid: {:?}", &invalid[..invalid.len().min(3)])));
        }
    }
    drop_listing(listed);
    let Loaded { cluster, before, ds, decode_samples } = loaded;
    index.take_dirty();

    ds.record_removals();
    let mut r = Runner { ds: &ds, index, synced: ds.revision(), gc: GcState::new(), cfg: gc_config(), found: HashSet::new(), passes: Vec::new(), exec: ExecuteOptions::default() };
    let mut problems = Vec::new();

    // Pass #1: first observation.
    r.step("full #1", T0, Scope::Full)?;

    // Events: pods deleted, then a node and its pods.
    for (ns, name) in &cluster.events.deleted_pods {
        r.index.delete_pod(ns, name);
    }
    let (dirty, full) = r.index.take_dirty();
    r.step("pods deleted", T0 + 30_000, if full { Scope::Full } else { Scope::Dirty(dirty) })?;
    if let Some(node) = &cluster.events.deleted_node {
        for (ns, name) in &cluster.events.deleted_node_pods {
            r.index.delete_pod(ns, name);
        }
        r.index.delete_node(node);
        let (dirty, full) = r.index.take_dirty();
        r.step("node deleted", T0 + 45_000, if full { Scope::Full } else { Scope::Dirty(dirty) })?;
    }

    // Pass #2 after the grace period, then until nothing is left.
    let t2 = T0 + GRACE + 120_000;
    let mut now = t2;
    let (plan, _) = r.step("full #2", now, Scope::Full)?;
    let mut more = plan_has_work(&plan) && plan.deferred > 0;
    let mut drained = 0;
    while more && drained < MAX_DRAIN_PASSES {
        now += 10_000;
        drained += 1;
        let (plan, _) = r.step("full (roll-over)", now, Scope::Full)?;
        more = plan.deferred > 0;
    }
    now += 10_000;
    let (last, outcome) = r.step("full (final)", now, Scope::Full)?;
    if plan_has_work(&last) {
        problems.push(format!(
            "the final pass still had work: {} releases, {} nodes, {} of it done",
            last.release_count(),
            last.nodes_to_release.len(),
            outcome.released.len()
        ));
    }
    r.index.take_dirty();

    if let Err(e) = r.index.check_invariants() {
        problems.push(format!("index invariant: {e}"));
    }
    if let Err(e) = r.gc.check_invariants(&r.index) {
        problems.push(format!("GC state invariant: {e}"));
    }
    let blocks: Vec<Arc<IpamBlock>> = ds.shared_current(Kind::IpamBlock).map_err(ds_error("the IPAM blocks"))?;
    let ds_allocations = checker::allocated_count(&blocks) as u64;
    if ds_allocations != r.index.allocation_count() {
        problems.push(format!("index holds {} allocations, the datastore {ds_allocations}", r.index.allocation_count()));
    }
    drop(blocks);
    crate::memstat::give_back();
    let Runner { index, gc, cfg, found, passes, .. } = r;
    Ok(PipelineRun {
        ds,
        index,
        gc,
        cfg,
        found,
        passes,
        problems,
        build_samples,
        decode_samples: decode_samples.into_inner(),
        now,
        cluster,
        before,
    })
}

/// Runs the independent checker on a finished pipeline.
pub fn check_run(run: &PipelineRun) -> Result<CheckReport, SimError> {
    let decode = |e: crate::datastore::DatastoreError| SimError::Datastore { what: "the IPAM objects".into(), message: e.to_string() };
    // Of affinities and handles the checker reads a name each, so only that is decoded: a typed
    // listing of every handle beside the finished run was simulate's peak of memory.
    let blocks: Vec<Arc<IpamBlock>> = run.ds.shared_current(Kind::IpamBlock).map_err(decode)?;
    let mut affinity_names = BTreeSet::new();
    run.ds.decode_each(Kind::BlockAffinity, |name, _: serde::de::IgnoredAny| {
        affinity_names.insert(name.to_string());
    })
    .map_err(decode)?;
    // Handle objects by their position among the names the cluster started with: one that is
    // not there appeared during the run and has nothing to be compared with.
    let mut handle_objects = Vec::new();
    run.ds.decode_each(Kind::IpamHandle, |_, h: HandleIdOnly| {
        handle_objects.extend(run.before.names.position(&h.spec.handle_id));
    })
    .map_err(decode)?;
    let live_ips: Vec<IpAddr> = run.live_pods().filter(|p| !p.state.finished()).flat_map(|p| p.ips.iter().copied()).collect();
    let mut report = check(
        &run.cluster,
        &run.before,
        &FinalState { blocks: &blocks, affinity_names: &affinity_names, handle_objects: &handle_objects, live_ips: &live_ips, now: run.now },
    );
    drop(blocks);
    crate::memstat::give_back();
    report.problems.extend(run.problems.iter().cloned());
    report.ok = report.problems.is_empty();
    Ok(report)
}

/// Stage timings on the finished pipeline's steady state: `repeats` full passes, each followed by
/// a dirty pass of `DIRTY_NODES` nodes, then more dirty passes until there are `dirty_samples`.
fn steady_state_timings(run: &mut PipelineRun, repeats: usize, dirty_samples: usize) -> (Vec<f64>, Vec<f64>) {
    let mut full = Vec::new();
    let mut dirty = Vec::new();
    let nodes: BTreeSet<Box<str>> = run.cluster.nodes.iter().take(DIRTY_NODES).map(|n| n.metadata.name.as_str().into()).collect();
    let fresh = BTreeMap::new();
    let mut now = run.now;
    let dirty_pass = |run: &mut PipelineRun, now: Millis, dirty: &mut Vec<f64>| {
        let scope = Scope::Dirty(nodes.clone());
        let started = Instant::now();
        let plan = run.gc.pass(&mut run.index, now, &run.cfg, &scope, None, &fresh);
        dirty.push(ms(started));
        drop(plan);
    };
    for _ in 0..repeats.max(1) {
        now += 1_000;
        let started = Instant::now();
        let plan = run.gc.pass(&mut run.index, now, &run.cfg, &Scope::Full, None, &fresh);
        full.push(ms(started));
        drop(plan);
        dirty_pass(run, now, &mut dirty);
    }
    while dirty.len() < dirty_samples {
        now += 1_000;
        dirty_pass(run, now, &mut dirty);
    }
    (full, dirty)
}

/// Execute timing: the first post-grace plan (every live-node leak, empty block and orphan),
/// written into a fresh copy of the cluster each time.
fn execute_timings(loaded: &Loaded, repeats: usize) -> Result<(Vec<f64>, usize), SimError> {
    // The plan depends on the index alone: made once, and the listing and index dropped before
    // the copies of the cluster are written.
    let listed = loaded.listing()?;
    let mut index = IpamIndex::new();
    index.reset(loaded.snapshot(&listed));
    drop_listing(listed);
    let mut gc = GcState::new();
    let cfg = gc_config();
    gc.pass(&mut index, T0, &cfg, &Scope::Full, None, &BTreeMap::new());
    let plan = gc.pass(&mut index, T0 + GRACE + 120_000, &cfg, &Scope::Full, None, &BTreeMap::new());
    drop((index, gc));
    let mut samples = Vec::new();
    let mut released = 0;
    for _ in 0..repeats.max(1) {
        let ds = loaded.ds.fork();
        let opts = ExecuteOptions { validate_writes: false, ..ExecuteOptions::default() };
        let started = Instant::now();
        let outcome = block_on(execute_plan(&ds, &plan, T0 + GRACE + 120_000, 0, &opts));
        samples.push(ms(started));
        released = outcome.released.len();
        drop(ds);
        crate::memstat::give_back();
    }
    Ok((samples, released))
}

/// Retained bytes of a freshly built index plus the GC state after one full pass, by the
/// counting allocator if the binary installed one.
fn retained_bytes(loaded: &Loaded) -> Result<(Option<usize>, usize), SimError> {
    let listed = loaded.listing()?;
    let before = crate::memstat::current_bytes();
    let mut index = IpamIndex::new();
    index.reset(loaded.snapshot(&listed));
    let mut gc = GcState::new();
    let plan = gc.pass(&mut index, T0, &gc_config(), &Scope::Full, None, &BTreeMap::new());
    drop(plan);
    let after = crate::memstat::current_bytes();
    let heap = index.heap_bytes();
    let retained = match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    drop((index, gc));
    drop_listing(listed);
    Ok((retained, heap))
}

/// The whole `simulate` command: generate, run, check, time, report to `out`.
pub fn run(opts: &SimOptions, out: &mut dyn Write) -> Result<SimSummary, SimError> {
    let cluster = generate(opts)?;
    let dump = match &opts.write_dump {
        Some(dir) => Some(dump::write_dump(&cluster, dir).map_err(SimError::Dump)?),
        None => None,
    };
    let loaded = Loaded::new(cluster)?;
    let (retained, heap) = retained_bytes(&loaded)?;
    let (execute_samples, execute_released) = execute_timings(&loaded, opts.repeats)?;
    let mut run = run_loaded(loaded, opts.repeats)?;
    let check = check_run(&run)?;
    let (full, dirty) = steady_state_timings(&mut run, opts.repeats, opts.dirty_samples);
    let mut stages = vec![
        report::StageTiming::new(report::STAGE_DECODE, &run.decode_samples),
        report::StageTiming::new(report::STAGE_BUILD, &run.build_samples),
        report::StageTiming::new(report::STAGE_FULL, &full),
        report::StageTiming::new(report::STAGE_DIRTY, &dirty),
    ];
    if opts.nodes > SMALL_NODES {
        // The same dirty pass on a 100-node cluster of the same shape, in the same run: a dirty
        // pass must not grow with the cluster.
        let small = SimOptions { nodes: SMALL_NODES, write_dump: None, ..opts.clone() };
        let mut small_run = run_pipeline(generate(&small)?, 1)?;
        let (_, small_dirty) = steady_state_timings(&mut small_run, 1, opts.dirty_samples);
        stages.push(report::StageTiming::new(report::STAGE_DIRTY_SMALL, &small_dirty));
    }
    stages.push(report::StageTiming::new(&format!("execute ({execute_released} releases)"), &execute_samples));
    let peak_rss = crate::memstat::peak_rss_bytes();
    let memory = report::MemoryFigures { retained, heap, peak_rss };
    let mut report = report::build(opts, &run, check, stages, memory, dump);
    if let Some(prev) = &opts.compare {
        report.comparison = report::compare(prev, &report).map_err(SimError::Options)?;
    }
    match opts.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &report).map_err(|e| SimError::Output(std::io::Error::other(e)))?;
            writeln!(out).map_err(SimError::Output)?;
        }
        OutputFormat::Table => report::write_table(&report, out).map_err(SimError::Output)?,
    }
    Ok(SimSummary { ok: report.ok, report })
}

#[cfg(test)]
mod tests;
