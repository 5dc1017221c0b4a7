//! The IPAM GC controller: one task owns the index and the GC state, applies every watch input,
//! runs the GC passes (dirty passes after batched events, full passes every `leak_grace / 2`)
//! and hands each plan to the executor task, whose results come back as messages. The owner
//! never waits on the network, so watch events keep being applied and the liveness heartbeat
//! keeps beating while a long cleanup runs.
//!
//! Rooms: `inputs` (the index and the facts beside it, relist bookkeeping), `gating` (pure:
//! which plan items are due, backoff after an outcome), `executor` (the writes and re-validation
//! reads, each call under a timeout), `publish` (report, gauges), `clock`.
//! Owns: the readiness gate (no GC decision before every watch finished its first list), the
//! watch-health hold (no write while a required watch fails or relists, readiness and gauges
//! saying which; no orphan-handle deletion while a malformed block is known), the
//! `datastoreReady` pause, the leadership gate (a follower computes passes and the report but
//! executes no plan, and a plan stops mid-way when leadership is lost), at most one plan in
//! flight (its items are excluded from passes until its result is back), the retry timer,
//! merging env with each KubeControllersConfiguration it sees (no GC pass without the node
//! controller), and the heartbeat that liveness judges.
//! Stale sequence numbers are never retried blindly: the executor re-reads every block before a
//! write and skips reallocated addresses, and the index learns the new numbers from the watch.
//! Must not: list or read anything itself (every input comes from a watch, every read and write
//! goes through the executor), or hold the shared lock across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{mpsc, watch};

pub mod clock;
pub mod executor;
pub mod gating;
pub mod inputs;
pub mod publish;

use self::clock::Clock;
use crate::runtime::events::{EventRecorder, Regarding};
use self::executor::{Executor, ExecutorOptions, Job, JobResult};
use self::inputs::GcInputs;
use super::backoff::{FIRST_DELAY, ItemBackoff, ItemKey, RetryTimer};
use super::watch::Input;
use super::{ConfigState, Shared};
use crate::config::{EnvConfig, RunConfig};
use crate::datastore::{ClusterReader, Datastore, KeepGoing};
use crate::ipam::gc::{DEFAULT_MAX_RELEASES_PER_PASS, GcConfig, GcState, NodeProof};
use crate::ipam::plan::{Plan, Scope};
use crate::model::PodFacts;
use crate::model::time::{Millis, format_go_duration};

/// Events are batched this long before a dirty pass, as upstream does (1 s): a burst of pod
/// deletions becomes one pass instead of hundreds.
const BATCH_WINDOW: Duration = Duration::from_secs(1);
/// Full passes with `leakGracePeriod` unset or 0: upstream's node reconciler period.
const UNSET_GRACE_FULL_PERIOD: Duration = Duration::from_secs(300);
/// Full passes never run more often than this, whatever the grace period.
const MIN_FULL_PERIOD: Duration = Duration::from_secs(1);
/// `build_report` walks every allocation (and formats the leaked ones in calicoctl's format; it
/// formatted all of them, 450-600 ms at 250k allocations, before the served report kept only
/// those). So the report is rebuilt when a pass plans releases (at most every second), after a
/// full pass at most every 5 s, and otherwise at most every 30 s: event churn does not turn into
/// report building nobody reads.
const REPORT_INTERVAL_RELEASES: Duration = Duration::from_secs(1);
const REPORT_INTERVAL_FULL: Duration = Duration::from_secs(5);
const REPORT_INTERVAL_DIRTY: Duration = Duration::from_secs(30);
/// Inputs applied in one go before the loop looks at its timers and the executor again: a burst
/// is applied together, and a relist of 100k pods still lets a result in every few milliseconds.
const DRAIN_BATCH: usize = 10_000;

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

/// The plan in the executor, as the loop remembers it.
struct InFlight {
    keys: HashSet<ItemKey>,
    full: bool,
    deferred: usize,
    /// A job of a follow-up pass: its re-read pods wait for the next round instead of starting
    /// another follow-up (at most one per round, as before the executor existed).
    follow_up: bool,
    reclaimed: HashMap<(IpNet, u32), (String, String)>,
    /// Wall time of the pass that planned it (for `last_success_seconds`).
    wall: Millis,
}

/// Log lines said once per state change, not once per pass.
#[derive(Default)]
struct Said {
    grace: Option<Millis>,
    pause: bool,
    gc_disabled: bool,
    /// Why GC writes are held now (the `GcDecisions` reason); `None` while they are not.
    decisions_held: Option<String>,
    /// Ids of the sets the mass-change guard held at the last pass.
    guard_ids: Vec<String>,
    /// Mass-change approvals last seen in the configuration.
    approvals: BTreeSet<String>,
}

pub struct GcController {
    /// Events of executed releases and of held mass changes (only the leader records them).
    events: EventRecorder,
    inputs: GcInputs,
    gc: GcState,
    opts: ControllerOptions,
    shared: Arc<Shared>,
    /// True while this replica holds the leader Lease: plans are executed only then.
    may_write: watch::Receiver<bool>,
    clock: Clock,
    /// `env` merged with the KubeControllersConfiguration (the defaults we create while there is none).
    run_config: RunConfig,
    said: Said,
    report_built: Option<tokio::time::Instant>,
    /// Re-read pods of confirmed leaks, for the next pass (`None` = NotFound).
    fresh: BTreeMap<(String, String), Option<PodFacts>>,
    /// Plan items that failed with a transient error, skipped until due.
    backoff: ItemBackoff,
    retry: RetryTimer,
    /// When to run a round again because the last one left work behind.
    retry_at: Option<tokio::time::Instant>,
    executor: Executor,
    in_flight: Option<InFlight>,
    /// A round planned work while a job was in flight: run one when its result is back.
    round_after_flight: bool,
}

impl GcController {
    /// A controller whose plans run on `ds` and whose re-validation reads go to `cluster`.
    pub fn new<D, C>(ds: Arc<D>, cluster: Arc<C>, opts: ControllerOptions, shared: Arc<Shared>, may_write: watch::Receiver<bool>) -> Self
    where
        D: Datastore + 'static,
        C: ClusterReader + 'static,
    {
        Self::with_executor(ds, cluster, opts, shared, may_write, ExecutorOptions::default(), Clock::system())
    }

    pub fn with_executor<D, C>(
        ds: Arc<D>,
        cluster: Arc<C>,
        opts: ControllerOptions,
        shared: Arc<Shared>,
        may_write: watch::Receiver<bool>,
        mut exec: ExecutorOptions,
        clock: Clock,
    ) -> Self
    where
        D: Datastore + 'static,
        C: ClusterReader + 'static,
    {
        let leading = may_write.clone();
        exec.execute.keep_going = Some(KeepGoing::new(move || *leading.borrow()));
        let keeps_calico_nodes = ds.keeps_calico_nodes();
        let executor = Executor::spawn(ds, cluster, exec);
        GcController {
            run_config: RunConfig::merge(&opts.env, None),
            inputs: GcInputs::new().with_kcc_name(opts.env.kcc().unwrap_or(crate::config::DEFAULT_KCC_NAME)).with_calico_nodes(keeps_calico_nodes),
            gc: GcState::new(),
            opts,
            shared,
            may_write,
            clock,
            said: Said::default(),
            report_built: None,
            fresh: BTreeMap::new(),
            backoff: ItemBackoff::default(),
            retry: RetryTimer::default(),
            retry_at: None,
            executor,
            in_flight: None,
            round_after_flight: false,
            events: EventRecorder::off(),
        }
    }

    /// Where the Events of executed releases and of the mass-change guard go (off by default:
    /// tests and dry runs).
    pub fn with_events(mut self, events: EventRecorder) -> Self {
        self.events = events;
        self
    }

    fn leak_grace(&self) -> Millis {
        self.opts.leak_grace_override.unwrap_or_else(|| self.run_config.leak_grace())
    }

    /// Re-merges env with the current KubeControllersConfiguration and publishes the result when
    /// it changed (the live-config and writer tasks act on it).
    fn config_changed(&mut self) {
        self.run_config = RunConfig::merge(&self.opts.env, self.inputs.kcc.as_ref().map(|k| &k.spec));
        let listed = self.inputs.has_listed(crate::runtime::watch::Source::KubeControllersConfiguration);
        let next = ConfigState { run: self.run_config.clone(), api_present: self.inputs.kcc.is_some(), listed };
        self.shared.config.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            *current = next;
            true
        });
        let approvals = self.inputs.guard_approvals();
        if approvals != self.said.approvals {
            if !approvals.is_empty() {
                tracing::info!(approved = ?approvals, "mass-change approval seen: a full pass applies it");
            }
            self.said.approvals = approvals;
            self.inputs.index.request_full_scan();
        }
    }

    /// Full passes run every `leakGracePeriod / 2`, so a leak is confirmed within 1.5 grace
    /// periods. With `leakGracePeriod` unset, or 0 (confirmation off; full passes still find gone
    /// nodes), every 5 minutes: upstream's node reconciler period.
    fn full_period(&self) -> Duration {
        let explicit = self.opts.leak_grace_override.is_some() || self.run_config.leak_grace_is_set();
        let half = Duration::from_millis((self.leak_grace().max(0) / 2) as u64);
        if !explicit || half.is_zero() { UNSET_GRACE_FULL_PERIOD } else { half.max(MIN_FULL_PERIOD) }
    }

    /// The loop: inputs, executor results, batched dirty passes, periodic full passes, until
    /// `shutdown` flips. Then the plan in flight is finished (its writes complete) before it
    /// returns, so the Lease is given up only after the last write.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut shutdown: watch::Receiver<bool>) {
        let mut batch_deadline: Option<tokio::time::Instant> = None;
        let mut period = self.full_period();
        let mut next_full = tokio::time::Instant::now() + period;
        let mut leadership = self.may_write.clone();
        let mut leadership_open = true;
        let mut heartbeat = tokio::time::interval(super::status::HEARTBEAT_EVERY);
        loop {
            // Liveness: the ingest loop beats here; it never waits on a write, so a long cleanup
            // does not silence it (see status.rs).
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
                        self.inputs.index.request_full_scan();
                        batch_deadline = Some(tokio::time::Instant::now());
                    }
                }
                result = self.executor.results.recv(), if self.in_flight.is_some() => {
                    match result {
                        Some(r) => self.job_finished(r),
                        None => {
                            tracing::error!("the plan executor stopped; no more plans run");
                            self.in_flight = None;
                        }
                    }
                }
                _ = heartbeat.tick() => {}
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    // Drain what is already queued so a burst is applied in one go.
                    for _ in 0..DRAIN_BATCH {
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
                    self.gc_round(false);
                }
                _ = tokio::time::sleep_until(next_full) => {
                    next_full = tokio::time::Instant::now() + period;
                    self.gc_round(true);
                }
                _ = sleep_until_opt(self.retry_at) => {
                    self.retry_at = None;
                    // A full round: confirmed leaks and failed items are planned again whatever
                    // the dirty set, each failed item only once its own backoff is over.
                    self.gc_round(true);
                }
            }
        }
        if self.in_flight.is_some() {
            tracing::info!("shutting down: waiting for the plan in flight");
            if let Some(r) = self.executor.results.recv().await {
                self.record_result(r);
            }
        }
        tracing::info!("GC loop stopped");
    }

    /// Applies one watch input.
    pub fn handle(&mut self, input: Input) {
        let applied = self.inputs.handle(input);
        if applied.kcc_changed || applied.first_sync == Some(crate::runtime::watch::Source::KubeControllersConfiguration) {
            self.config_changed();
        }
        if applied.health_changed {
            self.watch_health_changed();
        }
        if let Some(source) = applied.first_sync {
            tracing::info!(source = source.as_str(), "initial list complete");
            if !self.inputs.all_synced() {
                let waiting: Vec<&str> = self.inputs.waiting().iter().map(|s| s.as_str()).collect();
                let reason = format!("waiting for the first list of: {}", waiting.join(", "));
                self.shared.status.set_ready(crate::health::WATCHES_SYNCED, false, reason);
            }
            if self.inputs.is_required(source) && self.inputs.all_synced() {
                let index = &self.inputs.index;
                tracing::info!(blocks = index.block_count(), allocations = index.allocation_count(), "every watch is in sync");
                // The initial lists' decoded pages are all freed by now: the allocator tidies up
                // once here instead of in the first passes (see `memstat::give_back`).
                crate::memstat::give_back();
                self.shared.set_synced();
                self.inputs.index.request_full_scan();
            }
        }
    }

    /// Publishes which required watches the decisions wait on, and whether a missing
    /// ClusterInformation holds the writes: the gauges always, the readiness condition once it
    /// was first not ready (a process whose watches never fail has no such key).
    fn watch_health_changed(&mut self) {
        let hold = self.write_hold();
        let reason = hold.holds_everything().then(|| hold.reason());
        if reason == self.said.decisions_held {
            return;
        }
        let waiting: std::collections::BTreeSet<&'static str> = hold.watches.iter().map(|(s, _)| s.as_str()).collect();
        self.shared.metrics(|m| m.watch_unhealthy = waiting);
        match &reason {
            Some(why) => {
                tracing::warn!(reason = %why, "GC writes held");
                self.shared.status.set_ready(crate::health::GC_DECISIONS, false, why.clone());
            }
            None => {
                tracing::info!("every required watch is healthy again and ClusterInformation exists: GC writes resume");
                self.shared.status.set_ready(crate::health::GC_DECISIONS, true, "");
                // What the held rounds planned is planned again by the next round, whatever
                // its dirty set, instead of waiting for the next full period.
                self.inputs.index.request_full_scan();
            }
        }
        self.said.decisions_held = reason;
    }

    /// The mass-change guard's held sets: the gauge after every pass, and once per new held set
    /// a warning, the readiness reason and (through the events sink) an Event. A set that no
    /// longer waits clears them.
    fn publish_guard(&mut self, time: crate::model::time::PassTime) {
        let held = self.gc.guard_held();
        let counts: BTreeMap<&'static str, u64> = held.iter().map(|h| (h.scope.name, h.waiting)).collect();
        // Only the GC's own scopes: the node deleter and the light controllers keep theirs.
        self.shared.metrics(|m| {
            for scope in [crate::guard::IPAM_ADDRESSES, crate::guard::IPAM_NODES] {
                m.mass_change_held.remove(scope.name);
            }
            m.mass_change_held.extend(counts);
        });
        let ids: Vec<String> = held.iter().map(|h| h.id.clone()).collect();
        if ids == self.said.guard_ids {
            return;
        }
        self.said.guard_ids = ids;
        if held.is_empty() {
            tracing::info!("the mass-change guard holds nothing any more");
            self.shared.status.set_ready(crate::health::MASS_CHANGE_GUARD, true, "");
            return;
        }
        let why: Vec<String> = held
            .iter()
            .map(|h| {
                let share = if h.total == 0 { 100.0 } else { 100.0 * h.waiting as f64 / h.total as f64 };
                let waited = format_go_duration(time.mono - h.since);
                format!("{}: {} of {} ({share:.1}%) held for {waited}; approve with the annotation {}={}", h.scope.name, h.waiting, h.total, inputs::APPROVE_ANNOTATION, h.id)
            })
            .collect();
        let reason = format!("mass change held until a complete observation a grace period later shows it again, or approval: {}", why.join("; "));
        tracing::warn!(reason = %reason, "mass-change guard");
        if self.opts.dry_run {
            // A dry run beside upstream stays ready: the report's heldBy says what would wait.
            return;
        }
        self.shared.status.set_ready(crate::health::MASS_CHANGE_GUARD, false, reason);
        if *self.may_write.borrow() {
            for h in &held {
                let kind = if h.scope.unit == crate::guard::Unit::Nodes { "node cleanups" } else { "address releases" };
                let kcc = self.opts.env.kcc().unwrap_or(crate::config::DEFAULT_KCC_NAME);
                let how = match self.opts.env.kcc() {
                    Some(name) => format!(
                        "waits for a complete observation one leakGracePeriod later, or: kubectl annotate kubecontrollersconfigurations.crd.projectcalico.org {name} {}={} --overwrite",
                        inputs::APPROVE_ANNOTATION,
                        h.id
                    ),
                    // No configuration object to annotate: only the later observation lets it go.
                    None => "waits for a complete observation one leakGracePeriod later (DISABLE_KUBE_CONTROLLERS_CONFIG_API: no approval annotation is read)".to_string(),
                };
                self.events.mass_change_held(kcc, kind, h.waiting, h.total, &h.id, &how);
            }
        }
    }

    fn write_hold(&self) -> gating::WriteHold {
        gating::WriteHold {
            watches: self.inputs.decisions_waiting(),
            invalid_blocks: self.inputs.invalid_blocks(),
            soft_deleted_blocks: self.inputs.soft_deleted_count(),
            cluster_info_missing: self.cluster_info_holds_writes(),
        }
    }

    /// A dry run never creates `ClusterInformation/default` and writes nothing anyway: beside
    /// upstream (which owns the object) it must stay ready and keep reporting.
    fn cluster_info_holds_writes(&self) -> bool {
        !self.opts.dry_run && self.inputs.cluster_info_missing()
    }

    fn gc_config(&self) -> GcConfig {
        GcConfig {
            leak_grace: self.leak_grace(),
            max_releases_per_pass: DEFAULT_MAX_RELEASES_PER_PASS,
            ip_cooldown: self.inputs.cooldown_secs() as Millis * 1000,
            revalidate_live: true,
            node_proof: NodeProof::Proven(self.inputs.proven_gone_names()),
            guard: self.opts.env.guard,
            guard_approved: self.inputs.guard_approvals(),
            view_complete: self.inputs.decisions_waiting().is_empty(),
        }
    }

    /// One GC round: a pass, the report, and a job for the executor if the pass planned writes
    /// or re-validation reads. Returns at once: the job's result arrives as a message.
    pub fn gc_round(&mut self, full: bool) {
        if !self.inputs.all_synced() {
            return;
        }
        self.pass_round(full);
        // Also after rounds without a pass: a pool, reservation or affinity change moves the
        // gauges without dirtying any node.
        publish::publish_gauges(&self.inputs, &self.gc, &self.shared);
    }

    fn pass_round(&mut self, full: bool) {
        if !self.run_config.gc_enabled() {
            if !self.said.gc_disabled {
                tracing::warn!("node controller not enabled: no GC pass runs (the watches stay up so enabling it is immediate)");
                self.said.gc_disabled = true;
            }
            return;
        }
        self.said.gc_disabled = false;
        let grace = self.leak_grace();
        if self.said.grace != Some(grace) {
            let source = if self.opts.leak_grace_override.is_some() { "--leak-grace-period" } else { "KubeControllersConfiguration (unset = 15m)" };
            tracing::info!(leak_grace = %format_go_duration(grace), source, "leak grace period");
            self.said.grace = Some(grace);
        }
        let paused = self.inputs.datastore_paused();
        // A missing ClusterInformation pauses the writes too, but the passes still run for the
        // report (the write hold takes the executor's part, see `pass_and_dispatch`).
        let missing = self.cluster_info_holds_writes();
        self.shared.metrics(|m| m.datastore_paused = paused || missing);
        if paused {
            if !self.said.pause {
                tracing::warn!("ClusterInformation says datastoreReady=false: GC paused");
                self.said.pause = true;
            }
            return;
        }
        self.said.pause = false;
        let (dirty, full_requested) = self.inputs.index.take_dirty();
        let scope = if full || full_requested { Scope::Full } else { Scope::Dirty(dirty) };
        if let Scope::Dirty(nodes) = &scope
            && nodes.is_empty()
            && self.fresh.is_empty()
        {
            return;
        }
        self.pass_and_dispatch(&scope, false);
    }

    /// One pass; its executable, due part goes to the executor if none is in flight.
    fn pass_and_dispatch(&mut self, scope: &Scope, follow_up: bool) {
        let started = std::time::Instant::now();
        let time = self.clock.now();
        let now = time.mono;
        let cfg = self.gc_config();
        let fresh = std::mem::take(&mut self.fresh);
        let listed = self.inputs.kubevirt_listed();
        let inputs = &mut self.inputs;
        let kubevirt = listed.then_some(&inputs.known.kubevirt);
        let mut plan = self.gc.pass(&mut inputs.index, time, &cfg, scope, kubevirt, &fresh);
        // The index ignores soft-deleted blocks; the inputs hold the ones left half done.
        plan.soft_deleted_blocks = self.inputs.soft_deleted_blocks();
        self.publish_guard(time);
        let interval = if !plan.releases.is_empty() {
            REPORT_INTERVAL_RELEASES
        } else if plan.full {
            REPORT_INTERVAL_FULL
        } else {
            REPORT_INTERVAL_DIRTY
        };
        if self.report_built.is_none_or(|t| t.elapsed() >= interval) {
            publish::publish_report(&self.inputs, &plan, &cfg, &self.shared, self.opts.report_file.as_deref());
            self.report_built = Some(tokio::time::Instant::now());
        }
        self.publish_pass_metrics(&plan, scope, started.elapsed().as_secs_f64());

        let nothing_in_flight = HashSet::new();
        let in_flight = self.in_flight.as_ref().map_or(&nothing_in_flight, |f| &f.keys);
        let (due, held_back) = gating::due_items(&plan, &self.backoff, in_flight, now);
        let may_execute = !self.opts.dry_run && *self.may_write.borrow();
        let (due, held) = gating::without_held(due, &self.write_hold());
        if held > 0 && may_execute {
            tracing::debug!(held, "plan items held: a required watch fails or relists, ClusterInformation is missing, or a malformed block is known");
            self.shared.metrics(|m| m.rounds_writes_held += 1);
        }
        let writes = may_execute && !gating::plan_is_empty(&due);
        // Re-validation reads serve writes (the leader) and the report of a dry run; a standby
        // makes none, so a second replica adds no reads to the apiserver. What it would have
        // confirmed stays a candidate in its report until it leads.
        let reads = self.opts.dry_run || may_execute;
        // A pod named twice is read once: the executor skips a key it already holds.
        let revalidate: Vec<(String, String)> =
            if reads { plan.revalidate.iter().map(|(_, ns, pod)| (ns.clone(), pod.clone())).collect() } else { Vec::new() };
        // Nodes proven gone already are not in the plan's list; names are read only while unproven.
        let prove_gone = if reads { plan.prove_gone.clone() } else { Vec::new() };
        if !writes && revalidate.is_empty() && prove_gone.is_empty() {
            // Nothing for the executor: the round is over (no errors, nothing left but what the
            // per-pass cap deferred). A round whose writes were held is no success.
            if held == 0 || !may_execute {
                self.shared.metrics(|m| m.last_success_seconds = time.wall as f64 / 1000.0);
            }
            self.schedule_retry(false, plan.deferred, plan.full, now);
            return;
        }
        if self.in_flight.is_some() {
            // At most one plan in flight: this round's work is planned again once it is back.
            self.round_after_flight = true;
            return;
        }
        let job_plan = if writes { due.into_owned() } else { Plan::default() };
        let flight = InFlight {
            keys: gating::executable_keys(&job_plan).collect(),
            full: plan.full,
            deferred: plan.deferred,
            follow_up,
            reclaimed: publish::reclamation_labels(&self.inputs, &job_plan),
            wall: time.wall,
        };
        if held_back > 0 {
            tracing::debug!(held_back, "plan items waiting out their backoff or in flight");
        }
        // Release timestamps written into blocks are wall time, as every other host writes them.
        let job = Job { plan: job_plan, now: time.wall, cooldown_secs: self.inputs.cooldown_secs(), revalidate, prove_gone };
        match self.executor.send(job) {
            Ok(()) => self.in_flight = Some(flight),
            Err(_) => tracing::error!("the plan executor is gone; plan dropped"),
        }
    }

    /// A job is back: bookkeeping, then the follow-up pass its re-read pods or proven-gone nodes
    /// call for, or the round that waited for it.
    fn job_finished(&mut self, result: JobResult) {
        let follow_up_done = self.in_flight.as_ref().is_some_and(|f| f.follow_up);
        let had_reads = !result.fresh.is_empty() || !result.nodes_gone.is_empty();
        self.record_result(result);
        if had_reads && !follow_up_done {
            // The pass that acts on the re-validation reads or the proven-gone nodes, in the same round.
            self.pass_and_dispatch(&Scope::Full, true);
        } else if std::mem::take(&mut self.round_after_flight) {
            self.gc_round(true);
        }
    }

    fn record_result(&mut self, result: JobResult) {
        let Some(flight) = self.in_flight.take() else { return };
        let JobResult { plan, outcome, fresh, nodes_gone, calls } = result;
        let now = self.clock.mono();
        let released_nodes = gating::record_item_results(&mut self.backoff, &self.inputs.index, &plan, &outcome, now);
        if !gating::plan_is_empty(&plan) {
            tracing::info!(
                full = flight.full,
                released = outcome.released.len(),
                stale = outcome.stale.len(),
                conflicts = outcome.conflicts,
                errors = outcome.error_count(),
                handles_deleted = outcome.handles_deleted,
                blocks_deleted = outcome.blocks_deleted,
                nodes_released = outcome.nodes_released,
                interrupted = outcome.interrupted,
                timed_out = calls.timed_out,
                "plan executed"
            );
        }
        self.record_release_events(&plan, &outcome, &flight, &released_nodes);
        self.fresh.extend(fresh);
        if !nodes_gone.is_empty() {
            tracing::info!(nodes = ?nodes_gone, "nodes missing from the Node cache proven deleted");
        }
        self.inputs.nodes_proven_gone(nodes_gone);
        self.schedule_retry(outcome.error_count() > 0, flight.deferred, flight.full, now);
        let backing_off = self.backoff.waiting_by_category(now);
        self.shared.metrics(|m| {
            for (reason, n) in &outcome.released_by_reason {
                *m.releases_total.entry(reason.as_str()).or_default() += n;
            }
            for released in &outcome.released {
                if let Some(label) = flight.reclaimed.get(released) {
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
            m.executor_calls.succeeded += calls.succeeded;
            m.executor_calls.failed += calls.failed;
            m.executor_calls.timed_out += calls.timed_out;
            if outcome.error_count() == 0 {
                m.last_success_seconds = flight.wall as f64 / 1000.0;
            }
        });
    }

    /// One Event per node for the addresses this round released there (tallied by reason), and
    /// one per node whose IPAM was cleaned up; repeats merge into series in the recorder.
    fn record_release_events(&self, plan: &Plan, outcome: &crate::datastore::apply::PlanOutcome, flight: &InFlight, released_nodes: &HashSet<String>) {
        if outcome.released.is_empty() && released_nodes.is_empty() {
            return;
        }
        let reasons: HashMap<(IpNet, u32), &'static str> =
            plan.releases.iter().flat_map(|b| b.items.iter().map(move |i| ((b.cidr, i.ordinal), i.reason.as_str()))).collect();
        let mut by_node: BTreeMap<&str, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for released in &outcome.released {
            let node = flight.reclaimed.get(released).map_or(crate::runtime::ipam_gauges::UNKNOWN_NODE, |(_, n)| n.as_str());
            let reason = reasons.get(released).copied().unwrap_or("released");
            *by_node.entry(node).or_default().entry(reason).or_default() += 1;
        }
        // Addresses without a node (no attribute, no affine host) have no object to be about:
        // they are counted in the metrics only.
        for (node, tally) in by_node.iter().filter(|(n, _)| **n != crate::runtime::ipam_gauges::UNKNOWN_NODE) {
            let count = tally.values().sum();
            let tally: Vec<(&str, u64)> = tally.iter().map(|(r, n)| (*r, *n)).collect();
            self.events.addresses_released(&Regarding::node(node, None), count, &tally);
        }
        for node in released_nodes {
            let summary = match by_node.get(node.as_str()) {
                Some(t) => format!("its affinities and empty blocks released, with {} of its addresses", t.values().sum::<u64>()),
                None => "its affinities and empty blocks released".to_string(),
            };
            self.events.node_ipam_released(&Regarding::node(node, None), &summary);
        }
    }

    /// Work left behind is retried by a timer instead of waiting for the next full period
    /// (grace/2, 7.5 min by default): failed items (conflicts that ran out of re-reads,
    /// transient errors) back off round by round; leaks over the per-pass cap go on at once;
    /// items waiting out their own backoff get a round when they come due.
    fn schedule_retry(&mut self, errors: bool, deferred: usize, full: bool, now: Millis) {
        let mut retry_in = self.retry.round_finished(errors);
        if retry_in.is_none() && deferred > 0 {
            retry_in = Some(FIRST_DELAY);
        }
        let delay = match (retry_in, self.backoff.next_due(now).map(|due| due - now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let at = delay.map(|d| tokio::time::Instant::now() + Duration::from_millis(d.max(1) as u64));
        // A dirty round saw only some nodes: it never cancels a retry an earlier round asked for.
        self.retry_at = if full { at } else { [self.retry_at, at].into_iter().flatten().min() };
    }

    fn publish_pass_metrics(&self, plan: &Plan, scope: &Scope, elapsed: f64) {
        let dirty_count = match scope {
            Scope::Dirty(n) => Some(n.len() as u64),
            Scope::Full => None,
        };
        let confirmed = self.gc.confirmed_count();
        let orphans = self.inputs.index.unreferenced_handles().len() as u64;
        let backing_off = self.backoff.waiting_by_category(self.clock.mono());
        self.shared.metrics(|m| {
            if plan.full { m.pass_full.observe(elapsed) } else { m.pass_dirty.observe(elapsed) }
            if let Some(n) = dirty_count {
                m.dirty_nodes = n;
            }
            m.confirmed_leaks = confirmed;
            m.orphan_handles = orphans;
            m.items_backing_off = backing_off;
        });
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod loop_tests;
#[cfg(test)]
mod tests;
