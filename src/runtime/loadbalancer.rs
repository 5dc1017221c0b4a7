//! The LoadBalancer IP controller (SPEC §6.6), Kubernetes datastore: the shell around
//! [`crate::loadbalancer`] (what each Service wants) and [`crate::ipam::assign`] (where an
//! address comes from), writing through [`crate::datastore::apply`].
//!
//! Owns: its watches (Services, kept slim; the IPAM blocks that are not a host's, as stored; IP
//! pools; reservations; the IPAM configuration), when a round runs (a change, batched over 1 s;
//! every [`RESYNC_EVERY`]; soon again after a round that wrote), the addresses each Service's
//! handle holds (read off the blocks, so a restart finds every assignment and never gives a
//! Service a second one: projectcalico/calico#12503), the release, status and assignment writes,
//! the Events on a Service that gets no address, and its metrics.
//! Must not: decide or write on a view that is not whole (every watch listed and healthy, the
//! KubeControllersConfiguration listed) or while this replica does not lead (a dry run logs what
//! it would do); write a block a host owns; release an address another Service holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::Shared;
use super::events::{EventRecorder, EventRequest, Regarding};
use super::listed::Listed;
use crate::datastore::apply::{self, ExecuteOptions};
use crate::datastore::cluster::{ClusterKind, ClusterReader, StatusWriter};
use crate::datastore::watch::WatchEvent;
use crate::datastore::{Datastore, Kind, Stored};
use crate::guard::{self, GuardConfig, MassGuard, Proposal, Scope, Unit};
use crate::ipam::assign::{self, IpamView, Owner, PoolInfo};
use crate::ipam::plan::{BlockRelease, LeakReason, Plan, ReleaseItem};
use crate::loadbalancer::{self as lb, AssignMode, Decision, Family, LB_AFFINITY, LbHolding, LbPool, ServiceKey};
use crate::model::IpamBlock;
use crate::model::block::{Affinity, BlockView};
use crate::model::time::Millis;

pub const NAME: &str = "loadbalancer";
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
const BATCH: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_secs(5);
/// The mass-change guard's scope for releases (a Service list that came back nearly empty must
/// not free every address at once).
const SCOPE: Scope = Scope { name: "loadbalancer-addresses", unit: Unit::Addresses };
/// Readiness key (always ready) whose reason says why the controller does nothing.
pub const CONFIG_KEY: &str = "LoadBalancerConfig";

#[derive(Debug, Clone)]
pub struct LbOptions {
    pub dry_run: bool,
    pub guard: GuardConfig,
    pub events: EventRecorder,
    pub execute: ExecuteOptions,
}

/// What the watches show.
#[derive(Debug, Default)]
struct View {
    /// `<namespace>/<name>` -> the Service's few fields the decision reads.
    services: Listed<Value>,
    /// Blocks without a host's affinity (LoadBalancer blocks, unowned ones), by object name.
    blocks: Listed<Stored>,
    pools: Listed<Value>,
    reservations: Listed<Vec<IpNet>>,
    config: Listed<Value>,
}

/// A Service as the view keeps it ([`lb::slim_service`]).
fn slim_service(o: &Stored) -> Value {
    lb::slim_service(&o.value, &o.revision)
}

fn service_key(v: &Value) -> String {
    format!("{}/{}", v["metadata"]["namespace"].as_str().unwrap_or_default(), v["metadata"]["name"].as_str().unwrap_or_default())
}

/// Applies one event to `listed`, keeping `keep(o)` under `key(o)` (`None`: not kept). True when
/// a round should look.
fn apply_event<V: PartialEq + Clone>(listed: &mut Listed<V>, event: WatchEvent, key: impl Fn(&Stored) -> String, keep: impl Fn(&Stored) -> Option<V>) -> bool {
    match event {
        WatchEvent::Init => listed.begin(),
        WatchEvent::InitApply(o) => {
            if let Some(v) = keep(&o) {
                listed.listed(key(&o), v);
            }
        }
        WatchEvent::InitDone => {
            listed.end();
            return true;
        }
        WatchEvent::Apply(o) => {
            let k = key(&o);
            return match keep(&o) {
                Some(v) => listed.upsert(k, v.clone()).is_none_or(|old| old != v),
                None => listed.remove(&k).is_some(),
            };
        }
        WatchEvent::Delete(o) => return listed.remove(&key(&o)).is_some(),
        WatchEvent::Error(e) => listed.failed(e.message),
        WatchEvent::Resumed => listed.delivered(),
    }
    false
}

/// A block event, ignoring one older than the version the view holds (this controller's own
/// writes go into the view before their events arrive).
fn apply_block_event(blocks: &mut Listed<Stored>, event: WatchEvent) -> bool {
    if let WatchEvent::Apply(o) = &event
        && let Some(current) = blocks.get(&o.name)
        && let (Ok(have), Ok(got)) = (current.revision.parse::<u64>(), o.revision.parse::<u64>())
        && got < have
    {
        blocks.delivered();
        return false;
    }
    apply_event(blocks, event, |o| o.name.clone(), not_a_hosts_block)
}

/// A block as this controller keeps it: whole unless a host owns it; a host's only by its CIDR
/// and affinity (the planner must know the CIDR is taken, never what is in it).
fn not_a_hosts_block(o: &Stored) -> Option<Stored> {
    let affinity = Affinity::parse(o.value["spec"]["affinity"].as_str());
    if !matches!(affinity, Affinity::Host(_)) {
        return Some(o.clone());
    }
    let slim = json!({"metadata": {"name": o.name}, "spec": {"cidr": o.value["spec"]["cidr"], "affinity": o.value["spec"]["affinity"]}});
    Some(Stored { value: slim, ..o.clone() })
}

fn is_hosts(o: &Stored) -> bool {
    matches!(Affinity::parse(o.value["spec"]["affinity"].as_str()), Affinity::Host(_))
}

fn reserved_cidrs(o: &Stored) -> Option<Vec<IpNet>> {
    let cidrs = o.value["spec"]["reservedCIDRs"].as_array()?;
    Some(cidrs.iter().filter_map(Value::as_str).filter_map(|c| c.parse::<IpNet>().ok().or_else(|| c.parse::<IpAddr>().ok().map(IpNet::from))).collect())
}

impl View {
    fn whole(&self) -> bool {
        self.services.whole() && self.blocks.whole() && self.pools.whole() && self.reservations.whole() && self.config.whole()
    }

    fn failing(&self) -> Option<&str> {
        self.services.failing().or(self.blocks.failing()).or(self.pools.failing()).or(self.reservations.failing()).or(self.config.failing())
    }

    fn synced(&self) -> bool {
        self.services.synced() && self.blocks.synced() && self.pools.synced() && self.reservations.synced() && self.config.synced()
    }
}

/// An IP pool as the planner reads it: usable for LoadBalancer addresses when enabled, not being
/// deleted and allowed for that use.
fn pool_info(pool: &Value) -> Option<PoolInfo> {
    let spec = &pool["spec"];
    let cidr = spec["cidr"].as_str()?.parse::<IpNet>().ok()?.trunc();
    let default_block = if cidr.addr().is_ipv4() { 26 } else { 122 };
    let lb_use = spec["allowedUses"].as_array().is_some_and(|u| u.iter().any(|u| u.as_str() == Some(lb::LB_USE)));
    Some(PoolInfo {
        name: pool["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        cidr,
        block_prefix: spec["blockSize"].as_u64().map_or(default_block, |b| b as u8),
        usable: lb_use && !spec["disabled"].as_bool().unwrap_or(false) && pool["metadata"]["deletionTimestamp"].is_null(),
        automatic: spec["assignmentMode"].as_str() != Some("Manual"),
    })
}

/// Whether a round ran, or when to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Ran,
    /// It wrote: look again soon (the status of what it assigned, the next step of a Service).
    Again,
    Idle,
    NotNow,
    /// The guard holds releases: the round that may let them through is due this much later.
    Held(Duration),
}

pub async fn run<D: Datastore, C: ClusterReader + StatusWriter>(
    ds: Arc<D>,
    cluster: Arc<C>,
    shared: Arc<Shared>,
    mut may_write: watch::Receiver<bool>,
    opts: LbOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut services = cluster.watch(ClusterKind::Service);
    let mut blocks = ds.watch(Kind::IpamBlock);
    let mut pools = ds.watch(Kind::IpPool);
    let mut reservations = ds.watch(Kind::IpReservation);
    let mut configs = ds.watch(Kind::IpamConfig);
    let mut config = shared.config.subscribe();
    let mut view = View::default();
    let mut guard = MassGuard::new();
    let started = tokio::time::Instant::now();
    let mut due: Option<tokio::time::Instant> = None;
    let mut periodic = tokio::time::interval(RESYNC_EVERY);
    periodic.tick().await;
    let name = |o: &Stored| o.name.clone();
    loop {
        let enabled = shared.config.borrow().run.load_balancer.is_some();
        shared.status.controller_view(NAME, "Services, IPAM blocks, IP pools, reservations and the IPAM configuration", enabled, view.synced(), view.failing());
        let wait = super::sleep_until_due(due);
        let changed = tokio::select! {
            e = services.next() => { let Some(e) = e else { return }; apply_event(&mut view.services, e, |o| service_key(&o.value), |o| Some(slim_service(o))) }
            e = blocks.next() => { let Some(e) = e else { return }; apply_block_event(&mut view.blocks, e) }
            e = pools.next() => { let Some(e) = e else { return }; apply_event(&mut view.pools, e, name, |o| Some(o.value.clone())) }
            e = reservations.next() => { let Some(e) = e else { return }; apply_event(&mut view.reservations, e, name, reserved_cidrs) }
            e = configs.next() => { let Some(e) = e else { return }; apply_event(&mut view.config, e, name, |o| Some(o.value["spec"].clone())) }
            c = config.changed() => { if c.is_err() { return } config.borrow_and_update(); true }
            c = may_write.changed() => { if c.is_err() { return } *may_write.borrow_and_update() }
            _ = periodic.tick() => true,
            _ = stop.changed() => { if *stop.borrow() { return } false }
            _ = wait => {
                let (outcome, written) = round(&*ds, &*cluster, &shared, &may_write, &opts, &view, &mut guard, started.elapsed()).await;
                // What this round wrote is in the view before the next round plans: a watch that
                // lags behind its own writes must never make a Service look empty-handed (a second
                // address). The watch's older events for these blocks are then ignored.
                for b in written {
                    view.blocks.upsert(b.name.clone(), b);
                }
                due = match outcome {
                    Round::Ran | Round::Idle => None,
                    Round::Again => Some(tokio::time::Instant::now() + BATCH),
                    Round::NotNow => Some(tokio::time::Instant::now() + RETRY),
                    Round::Held(wait) if wait.is_zero() => None,
                    Round::Held(wait) => Some(tokio::time::Instant::now() + wait.min(RESYNC_EVERY) + BATCH),
                };
                false
            }
        };
        if changed {
            due = super::due_within(due, BATCH);
        }
    }
}

fn wall_now() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
}

/// One round over every Service that is managed or holds addresses.
#[allow(clippy::too_many_arguments)]
async fn round<D: Datastore, C: ClusterReader + StatusWriter>(
    ds: &D,
    cluster: &C,
    shared: &Shared,
    may_write: &watch::Receiver<bool>,
    opts: &LbOptions,
    view: &View,
    guard: &mut MassGuard,
    since_start: Duration,
) -> (Round, Vec<Stored>) {
    let mut written_blocks: Vec<Stored> = Vec::new();
    let outcome = round_inner(ds, cluster, shared, may_write, opts, view, guard, since_start, &mut written_blocks).await;
    (outcome, written_blocks)
}

#[allow(clippy::too_many_arguments)]
async fn round_inner<D: Datastore, C: ClusterReader + StatusWriter>(
    ds: &D,
    cluster: &C,
    shared: &Shared,
    may_write: &watch::Receiver<bool>,
    opts: &LbOptions,
    view: &View,
    guard: &mut MassGuard,
    since_start: Duration,
    written_blocks: &mut Vec<Stored>,
) -> Round {
    let (listed, mode) = {
        let c = shared.config.borrow();
        (c.listed, c.run.load_balancer.clone())
    };
    let Some(mode) = mode.filter(|_| listed) else {
        shared.status.remove_ready(CONFIG_KEY);
        return Round::Idle;
    };
    let mode = match AssignMode::from_config(&mode) {
        Ok(m) => {
            shared.status.remove_ready(CONFIG_KEY);
            m
        }
        Err(e) => {
            // Managing nothing and releasing nothing: upstream would release every address.
            shared.status.set_ready(CONFIG_KEY, true, format!("loadbalancer: {e}; nothing is assigned or released"));
            return Round::Idle;
        }
    };
    if !(opts.dry_run || *may_write.borrow()) {
        return Round::Idle;
    }
    if !view.whole() {
        return Round::NotNow;
    }
    let started = tokio::time::Instant::now();
    let now = wall_now();
    let lb_pools: Vec<LbPool> = view.pools.items().values().filter_map(LbPool::from_ip_pool).collect();
    let pool_infos: Vec<PoolInfo> = view.pools.items().values().filter_map(pool_info).collect();
    let reserved: Vec<IpNet> = view.reservations.items().values().flatten().copied().collect();
    let ipam_config = view.config.items().values().next().cloned().unwrap_or(Value::Null);
    let strict_affinity = ipam_config["strictAffinity"].as_bool().unwrap_or(false);
    let max_blocks_per_host = ipam_config["maxBlocksPerHost"].as_u64().unwrap_or(0) as u32;
    let cooldown_secs = ipam_config["ipCooldownSeconds"].as_u64().unwrap_or(0) as u32;

    // The blocks, typed; what each LoadBalancer handle holds; who holds it.
    let mut blocks: BTreeMap<IpNet, (Stored, IpamBlock)> = BTreeMap::new();
    // Hosts' blocks (CIDR and affinity only), for the planner to keep off; and the handles in
    // blocks that cannot be read, whose Services are left as they are (what they hold is unknown).
    let mut occupied: BTreeMap<IpNet, IpamBlock> = BTreeMap::new();
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    for stored in view.blocks.items().values() {
        if is_hosts(stored) {
            if let (Some(cidr), Ok(b)) = (stored.value["spec"]["cidr"].as_str().and_then(|c| c.parse::<IpNet>().ok()), stored.decode::<IpamBlock>()) {
                occupied.insert(cidr, b);
            }
            continue;
        }
        match stored.decode::<IpamBlock>() {
            Ok(b) if BlockView::from_block(&b).is_ok() => {
                if let Ok(cidr) = b.spec.cidr.parse::<IpNet>() {
                    blocks.insert(cidr, (stored.clone(), b));
                }
            }
            _ => {
                tracing::debug!(block = %stored.name, "loadbalancer: invalid block skipped (the GC's scan reports it)");
                unknown.extend(lb::unreadable_block_handles(&stored.value));
                if let Some(cidr) = stored.value["spec"]["cidr"].as_str().and_then(|c| c.parse::<IpNet>().ok())
                    && let Ok(b) = stored.decode::<IpamBlock>()
                {
                    occupied.insert(cidr, b);
                }
            }
        }
    }
    // What each handle holds, by the rule `leak-scan` shares.
    let held = lb::by_handle(blocks.values().filter_map(|(_, b)| BlockView::from_block(b).ok()).flat_map(|v| lb::holdings(&v)));
    let mut by_pool: BTreeMap<String, u64> = lb_pools.iter().map(|p| (p.name.clone(), 0)).collect();
    for h in held.values().flat_map(|(_, hs)| hs) {
        if let Some(p) = lb_pools.iter().find(|p| p.cidr.contains(&h.ip)) {
            *by_pool.entry(p.name.clone()).or_default() += 1;
        }
    }
    shared.metrics(|m| m.lb_addresses = by_pool);

    // What the planner reads: hosts' and unreadable blocks as occupied, ours as they are; built
    // once per round and kept current with this round's own writes.
    let mut planner_blocks: BTreeMap<IpNet, IpamBlock> = occupied;
    planner_blocks.extend(blocks.iter().map(|(c, (_, b))| (*c, b.clone())));

    let mut keys: BTreeMap<String, ServiceKey> = held.iter().map(|(h, (k, _))| (h.clone(), k.clone())).collect();
    for svc in view.services.items().values().filter(|s| lb::is_managed(s, mode)) {
        let key = ServiceKey::of_service(svc);
        keys.entry(key.handle.clone()).or_insert(key);
    }

    // Decisions first. A Service missing from the view (or there under another UID) is read
    // again: only a NotFound, or another incarnation, proves its addresses unwanted.
    let mut decided: Vec<(ServiceKey, Option<Value>, Vec<LbHolding>, Decision)> = Vec::new();
    let mut cut_short = false;
    for key in keys.values().filter(|k| !unknown.contains(&k.handle)) {
        let mut service = view.services.get(&format!("{}/{}", key.namespace, key.name)).filter(|s| key.is_of(s)).cloned();
        let holding: Vec<LbHolding> = held.get(&key.handle).map(|(_, h)| h.clone()).unwrap_or_default();
        if service.is_none() && !holding.is_empty() {
            match cluster.get(ClusterKind::Service, &key.namespace, &key.name).await {
                Ok(o) if key.is_of(&o.value) => service = Some(slim_service(&o)),
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(service = %format!("{}/{}", key.namespace, key.name), error = %e, "loadbalancer: reading a Service missing from the watch failed; its addresses are kept this round");
                    cut_short = true;
                    continue;
                }
            }
        }
        let d = lb::decide_held(service.as_ref(), key, mode, &holding, &lb_pools);
        if d.is_noop() && d.problems.is_empty() {
            continue;
        }
        decided.push((key.clone(), service, holding, d));
    }
    // Releases through the guard.
    let members: BTreeSet<u64> = decided.iter().flat_map(|(_, _, _, d)| d.release.iter()).map(|ip| guard::fingerprint(&[ip.to_string().as_bytes()])).collect();
    let total = held.values().map(|(_, h)| h.len() as u64).sum();
    let grace = shared.config.borrow().run.leak_grace();
    let decision = guard.review(SCOPE, Proposal { members: &members, total, complete: !cut_short }, &opts.guard, since_start.as_millis() as i64, grace, &BTreeSet::new());
    let waiting: u64 = guard.held().iter().filter(|h| h.scope == SCOPE).map(|h| h.waiting).sum();
    shared.metrics(|m| m.mass_change_held.insert(SCOPE.name, waiting));
    if waiting > 0 {
        tracing::warn!(held = waiting, addresses = total, "mass-change guard: LoadBalancer address releases held until a round one grace period later proposes them again");
    }
    let mut outcome = match (waiting > 0, cut_short) {
        (true, _) => Round::Held(Duration::from_millis(grace.max(0) as u64)),
        (false, true) => Round::NotNow,
        (false, false) => Round::Ran,
    };
    // Releases before assignments: an address freed this round must not have made another
    // Service's request look unservable. What a release frees reaches the planner with the
    // blocks' next state (the next round), so a request that fails in a round that released
    // is tried again then, not reported.
    decided.sort_by_key(|(_, _, _, d)| d.release.is_empty());
    let mut released_this_round = false;
    for (key, service, holding, mut d) in decided {
        let key = &key;
        let service = service.as_ref();
        if !(opts.dry_run || *may_write.borrow()) {
            return Round::Idle;
        }
        let planned = d.release.len();
        d.release.retain(|ip| decision.allows(guard::fingerprint(&[ip.to_string().as_bytes()])));
        if opts.dry_run {
            tracing::info!(service = %format!("{}/{}", key.namespace, key.name), release = ?d.release, assign = ?d.assign_specific, auto = ?(d.assign_auto.v4, d.assign_auto.v6), "loadbalancer: dry run: would write");
            continue;
        }
        if let Some(svc) = service {
            report_problems(shared, opts, svc, &d);
        }
        // Some of its releases are held: its status and assignments wait with them (the view
        // the guard doubts must not reach the Service's status either).
        if d.release.len() < planned {
            continue;
        }
        // The status first (stop advertising, then free): it says what is held once the
        // releases are done. A status not written holds the releases back to the next round.
        if let (Some(svc), Some(ingress)) = (service, d.ingress.as_ref()) {
            let revision = svc["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            let result = cluster.patch_status(ClusterKind::Service, &key.namespace, &key.name, revision, json!({"loadBalancer": {"ingress": ingress}})).await;
            let label = match &result {
                Ok(_) => "ok",
                Err(e) if e.is_conflict() || e.is_not_found() => "conflict",
                Err(_) => "failed",
            };
            shared.metrics(|m| *m.lb_writes.entry(("status", label)).or_default() += 1);
            match &result {
                Ok(_) => tracing::info!(service = %format!("{}/{}", key.namespace, key.name), ingress = %serde_json::Value::Array(ingress.clone()), "loadbalancer: status written"),
                Err(e) => {
                    tracing::warn!(service = %format!("{}/{}", key.namespace, key.name), error = %e, "loadbalancer: status write failed; the next round retries");
                    outcome = Round::NotNow.max_with(outcome);
                    continue;
                }
            }
        }
        // Releases next; the rest of this Service waits for the blocks' next state.
        if !d.release.is_empty() {
            let failed = release(ds, shared, opts, key, &holding, &d.release, now, cooldown_secs).await;
            released_this_round = true;
            outcome = if failed { Round::NotNow } else { Round::Again }.max_with(outcome);
            continue;
        }
        let Some(svc) = service else { continue };
        let attrs = lb::allocation_attributes(&key.name, &key.namespace, now);
        let owner = Owner { handle: &key.handle, attrs: &attrs, affinity: LB_AFFINITY };
        let mut wants: Vec<Want> = d.assign_specific.iter().map(|ip| Want::Specific(*ip)).collect();
        for (family, n, pools) in [(Family::V4, d.assign_auto.v4, &d.assign_auto.v4_pools), (Family::V6, d.assign_auto.v6, &d.assign_auto.v6_pools)] {
            for _ in 0..n {
                wants.push(Want::Auto(family, pools.clone()));
            }
        }
        for want in wants {
            if !*may_write.borrow() {
                return Round::Idle;
            }
            let ipam = IpamView { pools: &pool_infos, blocks: &planner_blocks, reserved: &reserved, strict_affinity, max_blocks_per_host };
            let planned = match &want {
                Want::Specific(ip) => assign::assign_ip(&ipam, &owner, *ip, now),
                Want::Auto(family, pools) => assign::auto_assign(&ipam, &owner, *family, pools.as_deref(), now),
            };
            let a = match planned {
                Ok(a) => a,
                Err(e) if released_this_round => {
                    tracing::debug!(service = %format!("{}/{}", key.namespace, key.name), error = %e, "loadbalancer: no address yet; planned again once this round's releases are in view");
                    outcome = Round::Again.max_with(outcome);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(service = %format!("{}/{}", key.namespace, key.name), error = %e, "loadbalancer: no address assigned");
                    shared.metrics(|m| *m.lb_failures.entry(e.category()).or_default() += 1);
                    opts.events.record(EventRequest::load_balancer_ip_failed(&regarding(svc), &e.to_string()));
                    continue;
                }
            };
            let read = blocks.get(&a.block_cidr).map(|(s, _)| s.clone());
            match apply::execute_assignment(ds, &a, &owner, read.as_ref(), now, &opts.execute).await {
                Ok((ip, written)) => {
                    tracing::info!(service = %format!("{}/{}", key.namespace, key.name), %ip, block = %a.block_cidr, "loadbalancer: address assigned");
                    shared.metrics(|m| *m.lb_writes.entry(("assign", "ok")).or_default() += 1);
                    written_blocks.push(written.clone());
                    if let Ok(b) = written.decode::<IpamBlock>() {
                        planner_blocks.insert(a.block_cidr, b.clone());
                        blocks.insert(a.block_cidr, (written, b));
                    }
                    outcome = Round::Again.max_with(outcome);
                }
                Err(e) => {
                    let moved = e.category() == "conflict";
                    tracing::info!(service = %format!("{}/{}", key.namespace, key.name), error = %e, "loadbalancer: assignment not written; a later round plans again");
                    shared.metrics(|m| *m.lb_writes.entry(("assign", if moved { "conflict" } else { "failed" })).or_default() += 1);
                    // A block that moved is planned again at once; a refusal waits (no spin).
                    outcome = if moved { Round::Again } else { Round::NotNow }.max_with(outcome);
                    break;
                }
            }
        }
    }
    shared.metrics(|m| m.light_round(NAME, started.elapsed()));
    outcome
}

impl Round {
    /// The sooner of two "look again" outcomes.
    fn max_with(self, other: Round) -> Round {
        match (self, other) {
            // A round that wrote looks again soon (a hold is judged by when its members were
            // first proposed, so an early look changes nothing about it).
            (Round::Again, _) | (_, Round::Again) => Round::Again,
            (Round::Held(w), _) | (_, Round::Held(w)) => Round::Held(w),
            (Round::NotNow, _) | (_, Round::NotNow) => Round::NotNow,
            _ => other,
        }
    }
}

enum Want {
    Specific(IpAddr),
    Auto(Family, Option<Vec<IpNet>>),
}

fn regarding(svc: &Value) -> Regarding {
    let m = &svc["metadata"];
    Regarding::service(m["namespace"].as_str().unwrap_or_default(), m["name"].as_str().unwrap_or_default(), m["uid"].as_str())
}

/// A Service's request problems: counted, logged and an Event on it.
fn report_problems(shared: &Shared, opts: &LbOptions, svc: &Value, d: &Decision) {
    for p in &d.problems {
        tracing::warn!(service = %service_key(svc), problem = %p, "loadbalancer: the Service's request cannot be served");
        shared.metrics(|m| *m.lb_failures.entry(p.category()).or_default() += 1);
        opts.events.record(EventRequest::load_balancer_ip_failed(&regarding(svc), &p.to_string()));
    }
}

/// Releases `ips` (each held by `key`'s handle) by compare-and-swap on their blocks, with their
/// handle's counts.
#[allow(clippy::too_many_arguments)]
async fn release<D: Datastore>(ds: &D, shared: &Shared, opts: &LbOptions, key: &ServiceKey, holding: &[LbHolding], ips: &[IpAddr], now: Millis, cooldown_secs: u32) -> bool {
    let mut by_block: BTreeMap<&str, BlockRelease> = BTreeMap::new();
    for h in holding.iter().filter(|h| ips.contains(&h.ip)) {
        // Each block is read fresh by the writer; an address whose handle or sequence number
        // moved on since this view is not released.
        by_block
            .entry(h.block.as_str())
            .or_insert_with(|| BlockRelease { cidr: h.cidr, block_name: h.block.clone(), revision: String::new(), items: Vec::new() })
            .items
            .push(ReleaseItem { ordinal: h.ordinal, ip: h.ip, handle: key.handle.clone(), sequence: h.sequence, reason: LeakReason::LoadBalancerUnwanted });
    }
    let plan = Plan { releases: by_block.into_values().collect(), ..Plan::default() };
    let out = apply::execute_plan(ds, &plan, now, cooldown_secs, &opts.execute).await;
    let released = out.released.len() as u64;
    let failed = out.error_count() as u64;
    tracing::info!(service = %format!("{}/{}", key.namespace, key.name), released, stale = out.stale.len(), failed, "loadbalancer: addresses its Service no longer wants released");
    shared.metrics(|m| {
        *m.lb_writes.entry(("release", "ok")).or_default() += released;
        if failed > 0 {
            *m.lb_writes.entry(("release", "failed")).or_default() += failed;
        }
    });
    failed > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EnvConfig, RunConfig};
    use crate::datastore::{MemoryCluster, MemoryDatastore};

    fn shared(assign_ips: &str, listed: bool) -> Shared {
        let shared = Shared::default();
        let api: crate::model::config::KubeControllersConfigurationSpec = serde_json::from_value(json!({"controllers": {"node": {}, "loadBalancer": {"assignIPs": assign_ips}}})).unwrap();
        shared.config.send_modify(|c| {
            c.run = RunConfig::merge(&EnvConfig::default(), Some(&api));
            c.listed = listed;
        });
        shared
    }

    fn listed<V: PartialEq + Clone>(objects: Vec<Stored>, key: impl Fn(&Stored) -> String, keep: impl Fn(&Stored) -> Option<V>) -> Listed<V> {
        let mut l = Listed::default();
        apply_event(&mut l, WatchEvent::Init, &key, &keep);
        for o in objects {
            apply_event(&mut l, WatchEvent::InitApply(o), &key, &keep);
        }
        assert!(apply_event(&mut l, WatchEvent::InitDone, &key, &keep));
        l
    }

    fn view_of(ds: &MemoryDatastore, cluster: &MemoryCluster) -> View {
        View {
            services: listed(cluster.list_now(ClusterKind::Service).unwrap(), |o| service_key(&o.value), |o| Some(slim_service(o))),
            blocks: listed(ds.snapshot(Kind::IpamBlock), |o| o.name.clone(), not_a_hosts_block),
            pools: listed(ds.snapshot(Kind::IpPool), |o| o.name.clone(), |o| Some(o.value.clone())),
            reservations: listed(ds.snapshot(Kind::IpReservation), |o| o.name.clone(), reserved_cidrs),
            config: listed(Vec::new(), |o| o.name.clone(), |o| Some(o.value["spec"].clone())),
        }
    }

    async fn setup() -> (MemoryDatastore, MemoryCluster) {
        let ds = MemoryDatastore::new();
        ds.create(Kind::IpPool, "lb", json!({"metadata": {"name": "lb"}, "spec": {"cidr": "192.0.2.0/28", "blockSize": 30, "allowedUses": ["LoadBalancer"]}})).await.unwrap();
        let cluster = MemoryCluster::new();
        cluster.apply(ClusterKind::Service, json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "ports": [{"port": 80}]}}));
        (ds, cluster)
    }

    fn opts() -> LbOptions {
        LbOptions { dry_run: false, guard: GuardConfig::OFF, events: EventRecorder::off(), execute: ExecuteOptions::default() }
    }

    async fn rounds(ds: &MemoryDatastore, cluster: &MemoryCluster, shared: &Shared, leading: bool, n: usize) -> Round {
        let (_tx, may_write) = watch::channel(leading);
        let mut last = Round::Idle;
        for _ in 0..n {
            last = round(ds, cluster, shared, &may_write, &opts(), &view_of(ds, cluster), &mut MassGuard::new(), Duration::ZERO).await.0;
        }
        last
    }

    fn ingress(cluster: &MemoryCluster) -> Value {
        cluster.get_now(ClusterKind::Service, "default", "web").unwrap().value["status"]["loadBalancer"]["ingress"].clone()
    }

    #[tokio::test]
    async fn a_service_gets_one_address_keeps_it_and_loses_it_with_the_service() {
        let (ds, cluster) = setup().await;
        let shared = shared("AllServices", true);
        assert_eq!(rounds(&ds, &cluster, &shared, true, 1).await, Round::Again, "assigned: the status follows");
        rounds(&ds, &cluster, &shared, true, 1).await;
        assert_eq!(ingress(&cluster), json!([{"ip": "192.0.2.0"}]));
        let before = ds.revision();
        assert_eq!(rounds(&ds, &cluster, &shared, true, 3).await, Round::Ran);
        assert_eq!(ds.revision(), before, "in step: nothing more written, no second address");
        assert_eq!(shared.metrics(|m| m.lb_addresses.get("lb").copied()), Some(1));
        cluster.delete(ClusterKind::Service, "default", "web");
        rounds(&ds, &cluster, &shared, true, 2).await;
        let block: IpamBlock = ds.peek(Kind::IpamBlock, "192-0-2-0-30").unwrap().decode().unwrap();
        assert!(block.spec.allocations.iter().all(Option::is_none), "released with its Service");
        assert!(ds.snapshot(Kind::IpamHandle).is_empty(), "and its handle");
    }

    #[tokio::test]
    async fn nothing_is_written_by_a_standby_before_the_configuration_listed_on_a_partial_view_or_with_an_unknown_mode() {
        let (ds, cluster) = setup().await;
        let before = ds.revision();
        assert_eq!(rounds(&ds, &cluster, &shared("AllServices", true), false, 1).await, Round::Idle);
        assert_eq!(rounds(&ds, &cluster, &shared("AllServices", false), true, 1).await, Round::Idle);
        let odd = shared("Sometimes", true);
        assert_eq!(rounds(&ds, &cluster, &odd, true, 1).await, Round::Idle);
        let status = serde_json::to_value(odd.status.snapshot()).unwrap();
        assert!(status["Readiness"][CONFIG_KEY]["Reason"].as_str().unwrap().contains("Sometimes"), "{status}");
        let mut partial = view_of(&ds, &cluster);
        apply_event(&mut partial.blocks, WatchEvent::Init, |o| o.name.clone(), not_a_hosts_block);
        let (_tx, leading) = watch::channel(true);
        assert_eq!(round(&ds, &cluster, &shared("AllServices", true), &leading, &opts(), &partial, &mut MassGuard::new(), Duration::ZERO).await.0, Round::NotNow);
        assert_eq!(ds.revision(), before);
    }

    #[tokio::test]
    async fn a_service_missing_from_the_watch_keeps_its_address_until_a_read_proves_it_gone() {
        let (ds, cluster) = setup().await;
        let shared = shared("AllServices", true);
        rounds(&ds, &cluster, &shared, true, 2).await;
        let before = ds.revision();
        // The Service watch lags (it listed before web existed): web is read, found, kept.
        let mut lagging = view_of(&ds, &cluster);
        lagging.services = listed(Vec::new(), |o| service_key(&o.value), |o| Some(slim_service(o)));
        let (_tx, leading) = watch::channel(true);
        round(&ds, &cluster, &shared, &leading, &opts(), &lagging, &mut MassGuard::new(), Duration::ZERO).await;
        assert_eq!(ds.revision(), before, "nothing released on a missing observation");
        // The read fails: kept too, and looked at again soon.
        cluster.inject_get(ClusterKind::Service, crate::datastore::ErrorKind::Transient, 1);
        assert_eq!(round(&ds, &cluster, &shared, &leading, &opts(), &lagging, &mut MassGuard::new(), Duration::ZERO).await.0, Round::NotNow);
        assert_eq!(ds.revision(), before);
        // Recreated under the same name (another UID, another handle): the old address goes.
        cluster.delete(ClusterKind::Service, "default", "web");
        cluster.apply(ClusterKind::Service, json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"type": "ClusterIP"}}));
        round(&ds, &cluster, &shared, &leading, &opts(), &view_of(&ds, &cluster), &mut MassGuard::new(), Duration::ZERO).await;
        let block: IpamBlock = ds.peek(Kind::IpamBlock, "192-0-2-0-30").unwrap().decode().unwrap();
        assert!(block.spec.allocations.iter().all(Option::is_none));
    }

    #[tokio::test]
    async fn a_block_view_behind_the_controllers_own_write_never_gives_a_second_address() {
        let (ds, cluster) = setup().await;
        let shared = shared("AllServices", true);
        let (_tx, leading) = watch::channel(true);
        let mut view = view_of(&ds, &cluster);
        let mut g = MassGuard::new();
        let (_, written) = round(&ds, &cluster, &shared, &leading, &opts(), &view, &mut g, Duration::ZERO).await;
        assert_eq!(written.len(), 1, "the claimed block");
        // As the run loop does; the watch has not delivered the write.
        for b in written {
            view.blocks.upsert(b.name.clone(), b);
        }
        round(&ds, &cluster, &shared, &leading, &opts(), &view, &mut g, Duration::ZERO).await;
        let handles = ds.snapshot(Kind::IpamHandle);
        let h: crate::model::IpamHandle = handles[0].decode().unwrap();
        assert_eq!(h.spec.block.values().sum::<u32>(), 1, "one address, not two");
        // An older event of that block arriving late does not move the view back.
        let current = view.blocks.get("192-0-2-0-30").unwrap().clone();
        let mut old = current.clone();
        old.revision = "1".into();
        assert!(!apply_block_event(&mut view.blocks, WatchEvent::Apply(old)));
        assert_eq!(view.blocks.get("192-0-2-0-30"), Some(&current));
    }

    #[tokio::test]
    async fn a_service_calico_stops_managing_loses_its_status_entry_before_its_address() {
        let (ds, cluster) = setup().await;
        let shared = shared("AllServices", true);
        rounds(&ds, &cluster, &shared, true, 2).await;
        assert_eq!(ingress(&cluster), json!([{"ip": "192.0.2.0"}]));
        let mut web = cluster.get_now(ClusterKind::Service, "default", "web").unwrap().value;
        web["spec"]["loadBalancerClass"] = json!("other.io/lb");
        cluster.apply(ClusterKind::Service, web);
        rounds(&ds, &cluster, &shared, true, 3).await;
        assert_eq!(ingress(&cluster), json!([]), "no longer advertised");
        let block: IpamBlock = ds.peek(Kind::IpamBlock, "192-0-2-0-30").unwrap().decode().unwrap();
        assert!(block.spec.allocations.iter().all(Option::is_none), "and freed");
    }

    #[tokio::test]
    async fn a_hosts_block_in_the_pool_is_never_claimed_or_written() {
        let (ds, cluster) = setup().await;
        let host = json!({"metadata": {"name": "192-0-2-0-30"}, "spec": {"cidr": "192.0.2.0/30", "affinity": "host:n1", "allocations": [null, null, null, null], "unallocated": [0, 1, 2, 3], "attributes": []}});
        ds.create(Kind::IpamBlock, "192-0-2-0-30", host.clone()).await.unwrap();
        let shared = shared("AllServices", true);
        rounds(&ds, &cluster, &shared, true, 2).await;
        assert_eq!(ds.peek(Kind::IpamBlock, "192-0-2-0-30").unwrap().value["spec"]["allocations"], host["spec"]["allocations"], "the host's block untouched");
        assert_eq!(ingress(&cluster), json!([{"ip": "192.0.2.4"}]), "the next free block claimed");
    }

    #[tokio::test]
    async fn an_address_freed_in_a_round_goes_to_the_waiting_service_without_an_exhausted_report() {
        // A one-address pool; web holds it; wait is created later and queues behind it. Its
        // handle sorts before web's, so without the ordering it would be planned first.
        let ds = MemoryDatastore::new();
        ds.create(Kind::IpPool, "lb", json!({"metadata": {"name": "lb"}, "spec": {"cidr": "192.0.2.0/32", "blockSize": 32, "allowedUses": ["LoadBalancer"]}})).await.unwrap();
        let cluster = MemoryCluster::new();
        let lb_service = |name: &str, uid: &str| json!({"metadata": {"name": name, "namespace": "default", "uid": uid}, "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}});
        cluster.apply(ClusterKind::Service, lb_service("web", "u-web"));
        let shared = shared("AllServices", true);
        rounds(&ds, &cluster, &shared, true, 2).await;
        assert_eq!(ingress(&cluster), json!([{"ip": "192.0.2.0"}]));
        let (mut waiting, mut uid) = (String::new(), String::new());
        for i in 0..64 {
            let (name, u) = (format!("wait-{i}"), format!("u-{i}"));
            if lb::handle_id(&name, "default", &u) < lb::handle_id("web", "default", "u-web") {
                (waiting, uid) = (name, u);
                break;
            }
        }
        assert!(!waiting.is_empty(), "a Service whose handle sorts first");
        cluster.apply(ClusterKind::Service, lb_service(&waiting, &uid));
        rounds(&ds, &cluster, &shared, true, 1).await;
        assert_eq!(shared.metrics(|m| m.lb_failures.get("exhausted").copied()), Some(1), "the pool is full: reported");
        cluster.delete(ClusterKind::Service, "default", "web");
        assert_eq!(rounds(&ds, &cluster, &shared, true, 1).await, Round::Again, "released: look again soon");
        assert_eq!(shared.metrics(|m| m.lb_failures.get("exhausted").copied()), Some(1), "not reported again in the round that freed the address");
        rounds(&ds, &cluster, &shared, true, 2).await;
        let got = cluster.get_now(ClusterKind::Service, "default", &waiting).unwrap().value["status"]["loadBalancer"]["ingress"].clone();
        assert_eq!(got, json!([{"ip": "192.0.2.0"}]), "the freed address, next round");
        assert_eq!(shared.metrics(|m| m.lb_failures.get("exhausted").copied()), Some(1));
    }
}
