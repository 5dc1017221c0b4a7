//! The chaos suite: two controller replicas (grace 2 s, the mass-change guard on, a restricted
//! ServiceAccount) run on a private cluster while a workload driver plays the CNI plugin and the
//! kubelet (pods and nodes created, deleted, recreated under the same names, dual-stack addresses
//! allocated by compare-and-swap, some borrowed across nodes, some left behind as leaks) and a
//! fault injector attacks: the leader SIGKILLed in the middle of a release, the leader SIGSTOPped
//! past its Lease and resumed, kube-apiserver and etcd restarted, watches expired by compaction,
//! conflict storms on the blocks, the Node watch refused by an RBAC change, a malformed block and
//! a malformed handle injected. An oracle that shares no code with the GC watches every revision
//! of the blocks and handles and judges each change against the driver's record.
//!
//! It asserts: no address of a live pod is ever released and no live pod's handle deleted (by
//! etcd revision: the change happened while the pod existed and before its own teardown), and
//! the oracle does see such a release (a canary: a rogue writer frees one live address at the
//! end, which must be reported, alone); after the churn stops (with a last burst of leaks) every
//! leak (an address or handle of a pod that is gone) is released within [`DRAIN_BOUND`]; the malformed objects were never written by the controllers; the oracle's
//! view equals a fresh list; the controllers never panicked.
//!
//! CI churns [`CI_CHURN`] (one cycle of every fault); `CHAOS_MINUTES=N` churns N minutes (the
//! fault cycle repeated) and `CHAOS_SEED=S` replays a run's random choices.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::audit::{self, now_ms};
use crate::support::cluster::{TestCluster, private_cluster};
use crate::support::controller::{CONTROLLER_USER, ChildGuard, free_port, http_get, install_deploy_base, metric_sum, start_controller_with, vm_hwm_kib};
use crate::support::ha::{LEASE_NAMESPACE, leader_gauge};
use crate::support::oracle::{Kind, Oracle};
use crate::support::workload::{BLOCK_SIZE, Workload, block_name, calico_resource};

/// The CI run's churn: one cycle of every fault (about 150 s of faults) with room to spare,
/// which keeps the whole test near 4 minutes on 2 cores (cluster start, population, drain).
const CI_CHURN: Duration = Duration::from_secs(160);
/// Every leak is released within this after the churn stops. Why 45 s: at that moment every
/// fault has healed (the last, a leader kill, lies 25+ s back, more than a takeover's 15 s; the
/// Node watch was given back 45+ s earlier, more than its restart backoff's 30 s cap), so what
/// is left is: a block that lost writes to the conflict storm waiting out its per-item backoff
/// (at most 30 s), the grace period (2 s) seen by full passes every 1 s, the batch window (1 s),
/// the mass-change guard's hold when the last leaks trip it (one more grace period plus a full
/// pass, 3 s), and the re-validation read and the writes (about a second): 38 s, and 7 s of slack
/// for a loaded machine.
const DRAIN_BOUND: Duration = Duration::from_secs(45);
/// After the drain the oracle keeps watching this long: nothing live may go afterwards either.
const QUIET_AFTER_DRAIN: Duration = Duration::from_secs(5);
const GRACE: &str = "2s";
/// The mass-change guard, tightened so the churn's bursts trip it (defaults: 50 addresses, 5 nodes).
const GUARD_MIN_ADDRESSES: &str = "20";
const GUARD_MIN_NODES: &str = "2";
const START_NODES: usize = 6;
const MIN_NODES: usize = 4;
const MAX_NODES: usize = 8;
/// Live pods are kept between these (each with two addresses): enough that a burst of 16
/// leaks trips the guard (32 addresses, over 20% of the ~100-150 held), small enough for 2 cores.
const LOW_PODS: usize = 35;
const HIGH_PODS: usize = 65;
const WORKERS: usize = 3;
/// Pause between one worker's operations: the apiserver, etcd, two controllers, the oracle and
/// the driver share 2 cores.
const WORKER_PACE: Duration = Duration::from_millis(60);
/// The Lease runs 10 s; a replica paused this long has certainly lost it.
const STOP_PAST_LEASE: Duration = Duration::from_secs(13);
const BURST: usize = 16;

// --- replicas -------------------------------------------------------------------------------

struct Replica {
    name: &'static str,
    port: u16,
    health_port: u16,
    status_file: PathBuf,
    guard: Option<ChildGuard>,
    starts: u32,
    stopped: bool,
}

impl Replica {
    fn start(kubeconfig: &Path, name: &'static str) -> Replica {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a status directory");
        let mut r = Replica { name, port: free_port(), health_port: free_port(), status_file: dir.join("status.json"), guard: None, starts: 0, stopped: false };
        r.launch(kubeconfig);
        r
    }

    fn launch(&mut self, kubeconfig: &Path) {
        self.starts += 1;
        let (hp, sf) = (self.health_port.to_string(), self.status_file.to_string_lossy().into_owned());
        let env = [
            ("POD_NAME", self.name),
            ("POD_NAMESPACE", LEASE_NAMESPACE),
            ("CKC_MASS_CHANGE_GUARD", "enabled"),
            ("CKC_MASS_CHANGE_MIN_ADDRESSES", GUARD_MIN_ADDRESSES),
            ("CKC_MASS_CHANGE_MIN_NODES", GUARD_MIN_NODES),
        ];
        let extra = ["--leak-grace-period", GRACE, "--health-port", hp.as_str(), "--status-file", sf.as_str()];
        let label = format!("chaos-{}-{}", self.name, self.starts);
        self.guard = Some(start_controller_with(kubeconfig, &extra, &env, self.port, &label));
        self.stopped = false;
    }

    fn pid(&self) -> Option<u32> {
        self.guard.as_ref().map(|g| g.child.id())
    }

    fn signal(&mut self, sig: &str) {
        let pid = self.pid().expect("a running replica").to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().expect("kill").success(), "kill {sig} {pid}");
        match sig {
            "-STOP" => self.stopped = true,
            "-CONT" => self.stopped = false,
            _ => {}
        }
    }

    fn kill(&mut self) {
        if let Some(g) = self.guard.as_mut() {
            g.child.kill().expect("SIGKILL");
            let _ = g.child.wait();
        }
    }

    fn logs(&self) -> Vec<PathBuf> {
        (1..=self.starts).map(|i| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("controller-chaos-{}-{i}-{}.log", self.name, std::process::id()))).collect()
    }

    fn refuses_node_watch(&self) -> bool {
        let Ok(bytes) = std::fs::read(&self.status_file) else { return false };
        let file: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        file["Readiness"]["Watch:nodes"]["Ready"] == false
    }
}

async fn leader_of(replicas: &[Replica]) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        if r.stopped {
            continue;
        }
        if tokio::time::timeout(Duration::from_secs(1), leader_gauge(r.port)).await.ok().flatten() == Some(1.0) {
            leaders.push(i);
        }
    }
    (leaders.len() == 1).then(|| leaders[0])
}

async fn wait_leader(replicas: &[Replica], within: Duration) -> usize {
    let started = Instant::now();
    loop {
        if let Some(i) = leader_of(replicas).await {
            return i;
        }
        assert!(started.elapsed() < within, "no single leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a sampler sees of the replicas every half second.
#[derive(Default)]
struct Samples {
    /// (replica, incarnation) -> pid, metrics port
    running: BTreeMap<(&'static str, u32), (u32, u16, PathBuf)>,
    peak_rss_kib: BTreeMap<String, u64>,
    guard_held_peak: f64,
    guard_held_samples: u64,
    node_watch_refused_seen: bool,
}

async fn sample(samples: Arc<Mutex<Samples>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let running: Vec<_> = samples.lock().unwrap().running.iter().map(|(k, v)| (*k, v.clone())).collect();
        for ((name, incarnation), (pid, port, status)) in running {
            let hwm = vm_hwm_kib(pid);
            let held = match tokio::time::timeout(Duration::from_secs(1), http_get(port, "/metrics")).await {
                Ok(Some((200, body))) => Some(metric_sum(&body, "kube_controllers_mass_change_held")),
                _ => None,
            };
            let refused = std::fs::read(&status).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).is_some_and(|f| f["Readiness"]["Watch:nodes"]["Ready"] == false);
            let mut s = samples.lock().unwrap();
            if let Some(kib) = hwm {
                let peak = s.peak_rss_kib.entry(format!("{name}#{incarnation}")).or_default();
                *peak = (*peak).max(kib);
            }
            if let Some(h) = held {
                s.guard_held_peak = s.guard_held_peak.max(h);
                if h > 0.0 {
                    s.guard_held_samples += 1;
                }
            }
            s.node_watch_refused_seen |= refused;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn track(samples: &Mutex<Samples>, r: &Replica) {
    let mut s = samples.lock().unwrap();
    s.running.retain(|(name, _), _| *name != r.name);
    if let Some(pid) = r.pid() {
        s.running.insert((r.name, r.starts), (pid, r.port, r.status_file.clone()));
    }
}

// --- the driver's churn -----------------------------------------------------------------------

/// One worker: random pod operations until `stop`, each under the driver's pause lock.
async fn pod_churn(w: Arc<Workload>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        {
            let _running = w.pause.read().await;
            let live = w.live_pod_count();
            let create = live < LOW_PODS || (live < HIGH_PODS && w.chance(0.45));
            if create {
                let nodes = w.live_nodes();
                if let Some(node) = pick(&w, &nodes) {
                    let (name, reused) = w.pod_name(w.chance(0.3));
                    w.create_pod(&name, &node, None).await;
                    if reused {
                        w.counters.pods_recreated.fetch_add(1, Ordering::Relaxed);
                    }
                    w.release_busy(&name);
                }
            } else if let Some(name) = w.take_live_pod() {
                if w.chance(0.25) {
                    // Recreated at once under the same name, perhaps on another node: the old
                    // incarnation's addresses (if left behind) name a pod that exists again.
                    w.delete_pod(&name, w.chance(0.5)).await;
                    if let Some(node) = pick(&w, &w.live_nodes()) {
                        w.create_pod(&name, &node, None).await;
                        w.counters.pods_recreated.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    w.delete_pod(&name, w.chance(0.5)).await;
                }
                w.release_busy(&name);
            }
        }
        tokio::time::sleep(WORKER_PACE).await;
    }
}

fn pick(w: &Workload, items: &[String]) -> Option<String> {
    w.pick(items)
}

/// Node churn: every few seconds a node is deleted (its pods live on a while, then go leaking,
/// as the pod GC would delete them), recreated under its old name, or a new one joins.
async fn node_churn(w: Arc<Workload>, stop: Arc<AtomicBool>) {
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(7)).await;
        let _running = w.pause.read().await;
        w.collect_pods_of_deleted_nodes(Duration::from_secs(4)).await;
        let live = w.live_nodes();
        let dead = w.nodes_deleted_for(Duration::from_secs(8));
        if live.len() > MIN_NODES && (live.len() >= MAX_NODES || w.chance(0.5)) {
            if let Some(n) = pick(&w, &live) {
                w.delete_node(&n).await;
            }
        } else if let Some(n) = pick(&w, &dead).filter(|_| w.chance(0.7)) {
            w.create_node(&n).await;
        } else if live.len() < MAX_NODES {
            next += 1;
            w.create_node(&format!("cn-new{next}")).await;
        }
    }
}

/// Deletes `n` live pods at once, leaking all their addresses: a burst that makes the GC plan a
/// large release (and trips the guard). Returns their handles.
async fn burst(w: &Workload, n: usize) -> HashSet<String> {
    let _running = w.pause.read().await;
    let names: Vec<String> = (0..n).filter_map(|_| w.take_live_pod()).collect();
    let handles: HashSet<String> = {
        let record = w.record.lock().unwrap();
        names.iter().filter_map(|name| w.pod_uid(name)).filter_map(|uid| record.pods.get(&uid).map(|p| p.handle.clone())).collect()
    };
    futures::future::join_all(names.iter().map(|name| w.delete_pod(name, false))).await;
    for name in &names {
        w.release_busy(name);
    }
    handles
}

// --- faults ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    ConflictStorm,
    LeaderKilledMidRelease,
    MalformedInjected,
    LeaderStoppedPastLease,
    CompactionAndApiserverRestart,
    MalformedRepaired,
    NodeWatchRefused,
    EtcdRestart,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::ConflictStorm => "409 storm on blocks",
            Fault::LeaderKilledMidRelease => "leader SIGKILLed mid-release",
            Fault::MalformedInjected => "malformed block + handle injected",
            Fault::LeaderStoppedPastLease => "leader SIGSTOPped past its Lease",
            Fault::CompactionAndApiserverRestart => "etcd compacted + kube-apiserver restarted",
            Fault::MalformedRepaired => "malformed block repaired, handle removed",
            Fault::NodeWatchRefused => "Node watch refused (RBAC) + kube-apiserver restarted",
            Fault::EtcdRestart => "etcd compacted + restarted",
        }
    }
}

/// One cycle of faults, each at an offset (seconds) from the cycle's start; faults run one after
/// the other, so a slow one pushes the rest back.
const CYCLE: [(u64, Fault); 10] = [
    (5, Fault::ConflictStorm),
    (15, Fault::LeaderKilledMidRelease),
    (30, Fault::MalformedInjected),
    (38, Fault::LeaderStoppedPastLease),
    (58, Fault::CompactionAndApiserverRestart),
    (75, Fault::MalformedRepaired),
    (78, Fault::NodeWatchRefused),
    (100, Fault::EtcdRestart),
    (112, Fault::ConflictStorm),
    (122, Fault::LeaderKilledMidRelease),
];
const CYCLE_LENGTH: u64 = 150;

struct Malformed {
    block: String,
    impostor: String,
    holder: String,
    since_ms: i64,
}

struct Chaos<'a> {
    cluster: &'a TestCluster,
    kubeconfig: PathBuf,
    client: kube::Client,
    w: Arc<Workload>,
    oracle: Oracle,
    replicas: Vec<Replica>,
    samples: Arc<Mutex<Samples>>,
    faults: BTreeMap<Fault, u32>,
    notes: Vec<String>,
    malformed: Option<Malformed>,
    storm_writes: Arc<AtomicU64>,
    storm_conflicts: Arc<AtomicU64>,
    bumps: u64,
    apiserver_restarts: u32,
    etcd_restarts: u32,
    compactions: u32,
    mid_release_hits: u32,
    kills: u32,
    takeovers_after_kill: u32,
    takeovers_while_stopped: u32,
}

impl Chaos<'_> {
    async fn run(&mut self, fault: Fault) {
        let t = Instant::now();
        match fault {
            Fault::ConflictStorm => self.conflict_storm(Duration::from_secs(6)).await,
            Fault::LeaderKilledMidRelease => self.leader_mid_release(true).await,
            Fault::LeaderStoppedPastLease => self.leader_mid_release(false).await,
            Fault::MalformedInjected => self.inject_malformed().await,
            Fault::MalformedRepaired => self.repair_malformed().await,
            Fault::CompactionAndApiserverRestart => self.outage("apiserver", true).await,
            Fault::EtcdRestart => self.outage("etcd", true).await,
            Fault::NodeWatchRefused => self.refuse_node_watch().await,
        }
        *self.faults.entry(fault).or_default() += 1;
        eprintln!("chaos: {} ({:.1} s)", fault.label(), t.elapsed().as_secs_f64());
    }

    /// A burst of leaks, then, as soon as the oracle sees the first of them leave its block,
    /// the leader is SIGKILLed (and restarted 2 s later) or SIGSTOPped past its Lease (and
    /// resumed): its plan is cut mid-way, or its view goes stale while the standby takes over.
    async fn leader_mid_release(&mut self, kill: bool) {
        let leader = wait_leader(&self.replicas, Duration::from_secs(30)).await;
        let handles = burst(&self.w, BURST).await;
        let started = Instant::now();
        let mut hit = false;
        while started.elapsed() < Duration::from_secs(20) {
            if self.oracle.releases_of(&handles) > 0 {
                hit = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if hit {
            self.mid_release_hits += 1;
        } else {
            self.notes.push(format!("no release of the burst seen within 20 s before the {} of the leader", if kill { "kill" } else { "stop" }));
        }
        if kill {
            self.replicas[leader].kill();
            self.kills += 1;
            if self.kills % 2 == 1 {
                // The standby takes over (the Lease runs out), then the killed one comes back.
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(25) {
                    if leader_of(&self.replicas).await.is_some_and(|i| i != leader) {
                        self.takeovers_after_kill += 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            } else {
                // Back at once under the same identity: it finds itself in the Lease and goes on.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            self.replicas[leader].launch(&self.kubeconfig);
            track(&self.samples, &self.replicas[leader]);
        } else {
            self.replicas[leader].signal("-STOP");
            let stopped = Instant::now();
            let mut took_over = false;
            while stopped.elapsed() < STOP_PAST_LEASE {
                if leader_of(&self.replicas).await.is_some_and(|i| i != leader) {
                    took_over = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            self.takeovers_while_stopped += u32::from(took_over);
            self.replicas[leader].signal("-CONT");
        }
    }

    /// Two writers bump the blocks the driver knows (metadata only) as fast as they can for
    /// `how_long`, while a burst of leaks gives the GC writes to lose.
    async fn conflict_storm(&mut self, how_long: Duration) {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..2u64 {
            let (w, stop, writes, conflicts) = (self.w.clone(), stop.clone(), self.storm_writes.clone(), self.storm_conflicts.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let blocks = w.known_blocks();
                    let Some(name) = pick(&w, &blocks) else { break };
                    n += 2;
                    // Each bump is a GET and a PUT; a PUT that loses counts as the storm's conflict.
                    let api = w.blocks_api().clone();
                    let Ok(Some(mut o)) = api.get_opt(&name).await else { continue };
                    o.metadata.annotations.get_or_insert_with(Default::default).insert("chaos/storm".into(), n.to_string());
                    match api.replace(&name, &PostParams::default(), &o).await {
                        Ok(_) => writes.fetch_add(1, Ordering::Relaxed),
                        Err(kube::Error::Api(s)) if s.code == 409 => conflicts.fetch_add(1, Ordering::Relaxed),
                        Err(_) => 0,
                    };
                }
            }));
        }
        burst(&self.w, BURST / 2).await;
        tokio::time::sleep(how_long).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    }

    /// The driver paused (its operations finished, none half done), the oracle synced to a
    /// revision past the pause, then `component` restarted (etcd compacted first if `compact`,
    /// so resumed watches get 410 and must list again).
    async fn outage(&mut self, component: &'static str, compact: bool) {
        let w = self.w.clone();
        let _paused = w.pause.write().await;
        self.sync_oracle().await;
        if compact {
            self.cluster.compact_etcd().expect("compacting etcd");
            self.compactions += 1;
        }
        let dir = self.cluster.dir.clone().expect("a harness cluster");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-cluster.sh");
        let status = tokio::task::spawn_blocking(move || Command::new("bash").arg(script).arg("restart").arg(dir).arg(component).output())
            .await
            .expect("the restart task")
            .expect("running test-cluster.sh restart");
        assert!(status.status.success(), "restarting {component}: {}", String::from_utf8_lossy(&status.stderr));
        match component {
            "etcd" => self.etcd_restarts += 1,
            _ => self.apiserver_restarts += 1,
        }
        // Still paused: the oracle's watches must be whole again (resumed, or relisted after a
        // 410) before the driver goes on, or a relist after the pause would span its deletions.
        // (The API server's watch cache re-initializes after an etcd restart and only then drops
        // its watchers.)
        self.sync_oracle().await;
    }

    /// Bumps a block and a handle and waits until the oracle's watches delivered both: every
    /// change before this point is seen with its exact revision, whatever an outage costs the
    /// watches afterwards, and a watch that broke has resumed or relisted.
    async fn sync_oracle(&mut self) {
        for kind in [Kind::Blocks, Kind::Handles] {
            let api = match kind {
                Kind::Blocks => self.w.blocks_api().clone(),
                Kind::Handles => self.w.handles_api().clone(),
            };
            let mut names = self.oracle.names(kind);
            names.sort();
            let mut synced = false;
            for name in names.iter().rev() {
                self.bumps += 1;
                if let Some(rv) = Workload::bump(&api, name, self.bumps).await.expect("bumping an IPAM object") {
                    assert!(self.oracle.wait_seen(kind, rv, Duration::from_secs(60)).await, "the oracle's {kind:?} watch did not deliver revision {rv} within 60 s");
                    synced = true;
                    break;
                }
            }
            assert!(synced, "no {kind:?} object to sync the oracle on");
        }
    }

    /// Takes `nodes` out of the controllers' ClusterRole and restarts kube-apiserver (so every
    /// watch starts again, and the Node watch is refused with 403), holds it so until a replica's
    /// status file names the refused watch and 8 s more, then gives the right back.
    async fn refuse_node_watch(&mut self) {
        let roles: Api<ClusterRole> = Api::all(self.client.clone());
        let original = roles.get("calico-kube-controllers").await.expect("the controllers' ClusterRole");
        let mut cut = original.clone();
        let rules = cut.rules.take().unwrap_or_default();
        cut.rules = Some(rules.iter().filter(|r| !r.resources.as_ref().is_some_and(|res| res.iter().any(|x| x == "nodes"))).cloned().collect());
        roles.replace("calico-kube-controllers", &PostParams::default(), &cut).await.expect("removing the nodes rule");
        self.outage("apiserver", false).await;
        let started = Instant::now();
        while !self.replicas.iter().any(Replica::refuses_node_watch) && started.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !self.replicas.iter().any(Replica::refuses_node_watch) {
            self.notes.push("no replica reported the Node watch refused within 30 s".into());
        }
        tokio::time::sleep(Duration::from_secs(8)).await;
        let mut back = roles.get("calico-kube-controllers").await.expect("the controllers' ClusterRole");
        back.rules = original.rules.clone();
        roles.replace("calico-kube-controllers", &PostParams::default(), &back).await.expect("giving the nodes rule back");
    }

    /// A block named by its CIDR but with one `allocations` entry too few (malformed: the GC
    /// must skip it), holding the only address of a live pod, so that pod's handle looks like an
    /// orphan to a GC that cannot read the block; and an impostor handle carrying a live pod's
    /// handle ID under another name.
    async fn inject_malformed(&mut self) {
        let w = self.w.clone();
        let _running = w.pause.read().await;
        let since_ms = now_ms();
        let node = pick(&self.w, &self.w.live_nodes()).expect("a live node");
        let cidr = "10.80.255.192/26";
        let name = block_name(cidr);
        self.w.reserve_block(&name);
        let short = (BLOCK_SIZE - 1) as usize;
        let block = DynamicObject::new(&name, &calico_resource("IPAMBlock", "ipamblocks")).data(json!({"spec": {
            "cidr": cidr, "affinity": format!("host:{node}"), "strictAffinity": false, "deleted": false,
            "allocations": vec![Value::Null; short], "unallocated": (0..short).collect::<Vec<_>>(), "attributes": [],
            "sequenceNumber": 0, "sequenceNumberForAllocation": {},
        }}));
        match self.w.blocks_api().create(&PostParams::default(), &block).await {
            Ok(_) => {}
            // The driver claimed this CIDR earlier: shorten that block instead.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.w.put_block(&name, |spec| {
                    if let Some(a) = spec["allocations"].as_array_mut() {
                        a.truncate(short);
                    }
                    if let Some(u) = spec["unallocated"].as_array_mut() {
                        u.retain(|o| o.as_u64().is_some_and(|o| o < short as u64));
                    }
                })
                .await;
            }
            Err(e) => panic!("creating the malformed block: {e}"),
        }
        let affinity = DynamicObject::new(&format!("{node}-{name}"), &calico_resource("BlockAffinity", "blockaffinities"))
            .data(json!({"spec": {"cidr": cidr, "node": node, "state": "confirmed", "type": "host", "deleted": "false"}}));
        let affinities: Api<DynamicObject> = Api::all_with(self.client.clone(), &calico_resource("BlockAffinity", "blockaffinities"));
        match affinities.create(&PostParams::default(), &affinity).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating the malformed block's affinity: {e}"),
        }
        let (holder, _) = self.w.pod_name(false);
        self.w.create_pod(&holder, &node, Some((&name, cidr))).await;
        // An impostor of a live pod's handle: same handleID and blocks, another object name.
        let victim = self.w.take_live_pod().expect("a live pod");
        let uid = self.w.pod_uid(&victim).expect("its uid");
        let handle_id = self.w.record.lock().unwrap().pods[&uid].handle.clone();
        self.w.release_busy(&victim);
        let real = self.w.handles_api().get(&handle_id.to_lowercase()).await.expect("the victim's handle");
        let impostor = format!("chaos-impostor-{}", since_ms);
        let object = DynamicObject::new(&impostor, &calico_resource("IPAMHandle", "ipamhandles")).data(json!({"spec": real.data["spec"].clone()}));
        self.w.handles_api().create(&PostParams::default(), &object).await.expect("creating the impostor handle");
        self.malformed = Some(Malformed { block: name, impostor, holder, since_ms });
    }

    /// The block gets its missing entry (valid again, its pod's address visible), the impostor
    /// goes, and the audit log must show no controller write to either while they were malformed.
    async fn repair_malformed(&mut self) {
        let Some(m) = self.malformed.take() else { return };
        let w = self.w.clone();
        let _running = w.pause.read().await;
        let until_ms = now_ms();
        self.w
            .put_block(&m.block, |spec| {
                if let Some(a) = spec["allocations"].as_array_mut() {
                    a.push(Value::Null);
                }
                if let Some(u) = spec["unallocated"].as_array_mut() {
                    u.push(json!(BLOCK_SIZE - 1));
                }
            })
            .await;
        match self.w.handles_api().delete(&m.impostor, &Default::default()).await {
            Ok(_) => {}
            Err(e) => self.notes.push(format!("the impostor handle {} could not be deleted: {e}", m.impostor)),
        }
        let writes: Vec<_> = audit::read(self.cluster.dir.as_ref().unwrap())
            .into_iter()
            .filter(|e| e.user == CONTROLLER_USER && e.is_write() && (e.name == m.block || e.name == m.impostor))
            .filter(|e| e.received_ms >= m.since_ms && e.received_ms < until_ms)
            .collect();
        assert!(writes.is_empty(), "the controllers wrote a malformed object: {writes:#?}");
        self.w.release_busy(&m.holder);
    }
}

fn minutes_from_env() -> Option<f64> {
    let v = std::env::var("CHAOS_MINUTES").ok()?;
    Some(v.parse::<f64>().ok().filter(|m| *m > 0.0).unwrap_or_else(|| panic!("CHAOS_MINUTES={v:?} is not a positive number of minutes")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_chaos_no_live_address_is_released_and_every_leak_drains() {
    let began = Instant::now();
    let churn = minutes_from_env().map_or(CI_CHURN, |m| Duration::from_secs_f64(m * 60.0));
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| now_ms() as u64);
    eprintln!("chaos: seed {seed} (CHAOS_SEED to replay), churn {:.1} min", churn.as_secs_f64() / 60.0);

    let cluster = private_cluster();
    let client = cluster.client();
    let kubeconfig = install_deploy_base(&cluster, "chaos").await;
    let ns = cluster.namespace_with_default_service_account(&client, "chaos").await;
    let w = Arc::new(Workload::new(&client, &ns, seed));
    w.create_pools(&client).await;
    for i in 0..START_NODES {
        w.create_node(&format!("cn{i}")).await;
    }
    let oracle = Oracle::start(&client).await;
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let replicas = vec![Replica::start(&kubeconfig, "chaos-a"), Replica::start(&kubeconfig, "chaos-b")];
    for r in &replicas {
        track(&samples, r);
    }
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(samples.clone(), sampling.clone()));
    wait_leader(&replicas, Duration::from_secs(60)).await;

    let mut chaos = Chaos {
        cluster: &cluster,
        kubeconfig,
        client: client.clone(),
        w: w.clone(),
        oracle,
        replicas,
        samples: samples.clone(),
        faults: BTreeMap::new(),
        notes: Vec::new(),
        malformed: None,
        storm_writes: Arc::default(),
        storm_conflicts: Arc::default(),
        bumps: 0,
        apiserver_restarts: 0,
        etcd_restarts: 0,
        compactions: 0,
        mid_release_hits: 0,
        kills: 0,
        takeovers_after_kill: 0,
        takeovers_while_stopped: 0,
    };

    // Churn with the faults on top, once the population is there (a burst needs pods to delete).
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers: Vec<_> = (0..WORKERS).map(|_| tokio::spawn(pod_churn(w.clone(), stop.clone()))).collect();
    let warming = Instant::now();
    while w.live_pod_count() < LOW_PODS {
        assert!(warming.elapsed() < Duration::from_secs(90), "only {} pods after 90 s of warm-up", w.live_pod_count());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("chaos: {} pods up in {:.1} s; churn and faults begin", w.live_pod_count(), warming.elapsed().as_secs_f64());
    let churn_started = Instant::now();
    workers.push(tokio::spawn(node_churn(w.clone(), stop.clone())));
    let mut cycle_start = Duration::ZERO;
    loop {
        for (at, fault) in CYCLE {
            let due = cycle_start + Duration::from_secs(at);
            if let Some(wait) = due.checked_sub(churn_started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            chaos.run(fault).await;
        }
        cycle_start += Duration::from_secs(CYCLE_LENGTH);
        // Another whole cycle only if it fits in the churn.
        if cycle_start + Duration::from_secs(CYCLE_LENGTH) > churn {
            break;
        }
    }
    // The churn goes on at least 25 s past the last fault, whatever the faults cost: the drain
    // bound counts on every fault having healed (a takeover takes up to 15 s).
    let end = churn.max(churn_started.elapsed() + Duration::from_secs(25));
    if let Some(rest) = end.checked_sub(churn_started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in workers {
        t.await.expect("a driver task panicked");
    }
    let churned = churn_started.elapsed();
    // Every fault has healed: nothing is stopped, killed or refused, nothing malformed is left.
    chaos.repair_malformed().await;
    for r in &chaos.replicas {
        assert!(!r.stopped && r.guard.is_some(), "replica {} is not running at the end of the churn", r.name);
    }

    // The oracle's canary: a rogue writer frees a live pod's address, then the pod goes
    // (leaking the rest). The oracle must report exactly this one live release.
    let canary = w.take_live_pod().expect("a live pod for the canary");
    let canary_handle = w.rogue_release(&canary).await;
    w.delete_pod(&canary, false).await;
    w.release_busy(&canary);
    // The churn's last leaks: the drain is timed from here.
    let last = burst(&w, BURST / 2).await.len();
    eprintln!("chaos: churn stopped; canary released, {last} more pods deleted leaking");

    // The drain: every leak released within the bound.
    let drain_started = Instant::now();
    let drained = loop {
        let leaks = chaos.oracle.leaks(&w.record.lock().unwrap());
        if leaks.leak_count() == 0 {
            break drain_started.elapsed();
        }
        if drain_started.elapsed() > DRAIN_BOUND {
            panic!(
                "{} leaks left {DRAIN_BOUND:?} after the churn stopped:\naddresses: {:#?}\nhandles: {:#?}",
                leaks.leak_count(),
                leaks.addresses,
                leaks.handles
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(QUIET_AFTER_DRAIN).await;
    sampling.store(true, Ordering::Relaxed);
    let _ = sampler.await;

    // Verdicts.
    let listed = chaos.oracle.check_against_list(&client).await;
    let record = w.record.lock().unwrap();
    let findings = chaos.oracle.findings(&record);
    let leaks = chaos.oracle.leaks(&record);
    let c = &w.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let s = samples.lock().unwrap();
    let state = chaos.oracle.state.lock().unwrap();
    eprintln!("chaos figures:");
    eprintln!("  minutes run: {:.2} (churn {:.2}, whole test {:.2}), seed {seed}", churned.as_secs_f64() / 60.0, churn.as_secs_f64() / 60.0, began.elapsed().as_secs_f64() / 60.0);
    eprintln!(
        "  pods churned: {} created ({} under a reused name), {} deleted with a CNI DEL, {} deleted leaking; {} live at the end",
        get(&c.pods_created),
        get(&c.pods_recreated),
        get(&c.pods_deleted_clean),
        get(&c.pods_deleted_leaking),
        w.live_pod_count()
    );
    eprintln!(
        "  nodes churned: {} created, {} deleted, {} recreated under their old name; addresses allocated {} ({} borrowed from another node's block), blocks claimed {}, driver conflicts {}",
        get(&c.nodes_created),
        get(&c.nodes_deleted),
        get(&c.nodes_recreated),
        get(&c.addresses),
        get(&c.borrowed),
        get(&c.blocks_claimed),
        get(&c.conflicts)
    );
    for (fault, n) in &chaos.faults {
        eprintln!("  fault: {} x{n}", fault.label());
    }
    eprintln!(
        "  of which: kube-apiserver restarts {}, etcd restarts {}, compactions {}, kills/stops landing mid-release {}, standby takeovers after a kill {}, while the leader was stopped {}, storm writes {} ({} lost to conflicts)",
        chaos.apiserver_restarts,
        chaos.etcd_restarts,
        chaos.compactions,
        chaos.mid_release_hits,
        chaos.takeovers_after_kill,
        chaos.takeovers_while_stopped,
        get(&chaos.storm_writes),
        get(&chaos.storm_conflicts)
    );
    eprintln!(
        "  oracle: {} revisions recorded, {} addresses seen released, {} handles seen deleted, relists {:?}, watch restarts {:?}",
        state.revisions.values().map(Vec::len).sum::<usize>(),
        findings.releases,
        findings.handle_deletions,
        state.relists,
        state.watch_restarts
    );
    drop(state);
    let by_gc = findings.live_released.iter().filter(|l| !l.contains(&canary_handle)).count();
    eprintln!(
        "  live addresses released: {by_gc} (plus the canary's, which the oracle caught: {}); live handles deleted: {}; ambiguous: {}",
        findings.live_released.len() - by_gc,
        findings.live_handles_deleted.len(),
        findings.ambiguous.len()
    );
    eprintln!("  leaks left: {} (after the drain); time to drain: {:.1} s (bound {:?})", leaks.leak_count(), drained.as_secs_f64(), DRAIN_BOUND);
    let restarts: u32 = chaos.replicas.iter().map(|r| r.starts - 1).sum();
    eprintln!("  controller restarts: {restarts}; mass-change guard held up to {} at once ({} samples holding)", s.guard_held_peak, s.guard_held_samples);
    eprintln!("  peak RSS (VmHWM) per replica incarnation, MiB: {}", s.peak_rss_kib.iter().map(|(k, v)| format!("{k} {:.1}", *v as f64 / 1024.0)).collect::<Vec<_>>().join(", "));
    for note in &chaos.notes {
        eprintln!("  note: {note}");
    }

    let (canaries, live_released): (Vec<&String>, Vec<&String>) = findings.live_released.iter().partition(|l| l.contains(&canary_handle));
    assert_eq!(canaries.len(), 1, "the oracle missed the canary's live release (or saw it twice): {canaries:?}");
    assert!(live_released.is_empty(), "addresses of live pods released:\n{}", live_released.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"));
    assert!(findings.live_handles_deleted.is_empty(), "handles of live pods deleted:\n{}", findings.live_handles_deleted.join("\n"));
    assert!(findings.ambiguous.is_empty(), "changes the oracle could not judge:\n{}", findings.ambiguous.join("\n"));
    assert!(leaks.live_missing.is_empty() && leaks.live_handles_missing.is_empty(), "live pods lost addresses or handles: {:#?} {:#?}", leaks.live_missing, leaks.live_handles_missing);
    assert_eq!(leaks.leak_count(), 0, "leaks came back after the drain: {:#?} {:#?}", leaks.addresses, leaks.handles);
    assert!(leaks.unknown.is_empty(), "allocations nobody made: {:#?}", leaks.unknown);
    listed.expect("the oracle's watched state equals a fresh list");
    assert!(s.node_watch_refused_seen, "the RBAC change never made a replica report the Node watch refused");
    assert!(chaos.mid_release_hits > 0, "no kill or stop landed in the middle of a release");
    for (_, fault) in CYCLE {
        assert!(chaos.faults.get(&fault).copied().unwrap_or(0) > 0, "fault {} never ran", fault.label());
    }
    for r in &chaos.replicas {
        for log in r.logs() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(!text.contains("panicked"), "replica {} panicked (log {})", r.name, log.display());
        }
    }
}
