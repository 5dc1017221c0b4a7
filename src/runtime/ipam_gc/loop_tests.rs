//! The whole loop on the memory backends and tokio's paused clock: watches through the seam,
//! the owner task, the executor task, with faults injected where a real cluster has them
//! (slow writes, writes past the timeout, 409 storms, stalled and expired watches).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::clock::Clock;
use super::executor::ExecutorOptions;
use super::{ControllerOptions, GcController};
use crate::config::EnvConfig;
use crate::datastore::{
    ClusterKind, Datastore, DsResult, ErrorKind, Kind, MemoryCluster, MemoryDatastore, Op, Precondition, Stored, WatchStream,
};
use crate::model::names::{cidr_to_name, handle_object_name};
use crate::runtime::Shared;
use crate::runtime::watch::spawn_all;

/// 2026-01-01T00:00:00Z: the wall time the paused clock starts at.
const T0: i64 = 1_767_225_600_000;

/// A datastore whose every call takes `delay` (on tokio's clock) before the memory backend
/// answers, and whose block updates can be made slower still: an apiserver under load.
struct Slow {
    inner: Arc<MemoryDatastore>,
    delay: Duration,
    block_update_delay: std::sync::Mutex<Duration>,
    done: AtomicU64,
    writes: AtomicU64,
}

impl Slow {
    fn new(inner: Arc<MemoryDatastore>, delay: Duration) -> Self {
        Slow { inner, delay, block_update_delay: std::sync::Mutex::new(Duration::ZERO), done: AtomicU64::new(0), writes: AtomicU64::new(0) }
    }
    async fn wait(&self, extra: Duration) {
        tokio::time::sleep(self.delay + extra).await;
        self.done.fetch_add(1, Ordering::Relaxed);
    }
    async fn write(&self, extra: Duration) {
        self.wait(extra).await;
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

impl Datastore for Slow {
    async fn get(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        self.wait(Duration::ZERO).await;
        self.inner.get(kind, name).await
    }
    async fn list(&self, kind: Kind) -> DsResult<Vec<Stored>> {
        self.wait(Duration::ZERO).await;
        self.inner.list(kind).await
    }
    async fn create(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        self.write(Duration::ZERO).await;
        self.inner.create(kind, name, value).await
    }
    async fn update(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        let extra = if kind == Kind::IpamBlock { *self.block_update_delay.lock().unwrap() } else { Duration::ZERO };
        self.write(extra).await;
        self.inner.update(kind, object).await
    }
    async fn update_status(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        self.write(Duration::ZERO).await;
        self.inner.update_status(kind, object).await
    }
    async fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        self.write(Duration::ZERO).await;
        self.inner.delete(kind, name, precondition).await
    }
    fn watch(&self, kind: Kind) -> WatchStream {
        self.inner.watch(kind)
    }
}

/// A memory datastore holding what the leader creates at start: `ClusterInformation/default`
/// (without it the GC writes nothing).
fn initialized_store() -> Arc<MemoryDatastore> {
    let mem = Arc::new(MemoryDatastore::new());
    let info = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "ClusterInformation", "metadata": {"name": "default"},
                      "spec": {"datastoreReady": true}});
    mem.create_now(Kind::ClusterInformation, "default", info).unwrap();
    mem
}

/// A /30 block affine to `node` with one pod allocation per (ordinal, pod, handle), the handles,
/// and the block's affinity, written to `ds` as the CNI leaves them.
fn put_block(ds: &MemoryDatastore, cidr: &str, node: &str, allocs: &[(u32, &str, &str)]) {
    let net: IpNet = cidr.parse().unwrap();
    let name = cidr_to_name(&net);
    let mut allocations = vec![Value::Null; 4];
    let mut attributes = Vec::new();
    for (i, (ordinal, pod, handle)) in allocs.iter().enumerate() {
        allocations[*ordinal as usize] = json!(i);
        attributes.push(json!({"handle_id": handle, "secondary": {"namespace": "ns", "pod": pod, "node": node}}));
    }
    let unallocated: Vec<u32> = (0..4).filter(|o| !allocs.iter().any(|(a, _, _)| a == o)).collect();
    let block = json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": name},
        "spec": {"cidr": cidr, "affinity": format!("host:{node}"), "strictAffinity": false, "allocations": allocations,
                 "unallocated": unallocated, "attributes": attributes, "sequenceNumber": 1, "deleted": false}
    });
    ds.create_now(Kind::IpamBlock, &name, block).unwrap();
    for (_, _, handle) in allocs {
        let object_name = handle_object_name(handle);
        let body = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": object_name},
                          "spec": {"handleID": handle, "block": {cidr: 1}, "deleted": false}});
        ds.create_now(Kind::IpamHandle, &object_name, body).unwrap();
    }
    let affinity = crate::model::names::affinity_name(node, &net);
    let body = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity", "metadata": {"name": affinity},
                      "spec": {"state": "confirmed", "node": node, "cidr": cidr, "deleted": "false"}});
    ds.create_now(Kind::BlockAffinity, &affinity, body).unwrap();
}

/// A /30 block affine to `node` holding the node's IPIP tunnel address at .0 and the address of
/// pod `pod` at .1 (with their handles), and the block's affinity.
fn put_tunnel_and_pod_block(ds: &MemoryDatastore, cidr: &str, node: &str, pod: &str) {
    put_block(ds, cidr, node, &[(1, pod, &format!("k8s-pod-network.{pod}"))]);
    let name = cidr_to_name(&cidr.parse::<IpNet>().unwrap());
    let mut block = ds.peek(Kind::IpamBlock, &name).unwrap();
    let spec = &mut block.value["spec"];
    spec["allocations"][0] = json!(1);
    spec["attributes"].as_array_mut().unwrap().push(json!({"handle_id": format!("ipip-tunnel-addr-{node}"), "secondary": {"node": node, "type": "ipipTunnelAddress"}}));
    spec["unallocated"] = json!([2, 3]);
    block.value["metadata"]["resourceVersion"] = json!(block.revision);
    ds.update_now(Kind::IpamBlock, &block).unwrap();
    let handle = format!("ipip-tunnel-addr-{node}");
    let body = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": handle_object_name(&handle)},
                      "spec": {"handleID": handle, "block": {cidr: 1}, "deleted": false}});
    ds.create_now(Kind::IpamHandle, &handle_object_name(&handle), body).unwrap();
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "ns", "name": name, "uid": format!("uid-{name}")},
           "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// The default KubeControllersConfiguration, with a log level to see when the loop applied it.
fn kcc(level: &str) -> Value {
    json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "KubeControllersConfiguration", "metadata": {"name": "default"},
           "spec": {"logSeverityScreen": level, "controllers": {"node": {"leakGracePeriod": "2s"}}}})
}

/// How many addresses the blocks in `ds` still hold.
fn allocated(ds: &MemoryDatastore) -> usize {
    ds.snapshot(Kind::IpamBlock)
        .iter()
        .map(|b| b.value["spec"]["allocations"].as_array().map_or(0, |a| a.iter().filter(|x| !x.is_null()).count()))
        .sum()
}

/// Node `n1` with a live pod at 10.0.0.1, and one block holding that address and the address of
/// a pod that no longer exists.
fn a_live_and_a_gone_pod_in_one_block() -> (Arc<MemoryDatastore>, Arc<MemoryCluster>) {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    cluster.apply(ClusterKind::Pod, pod("live", "n1", "10.0.0.1"));
    put_block(&mem, "10.0.0.0/30", "n1", &[(0, "gone", "k8s-pod-network.gone"), (1, "live", "k8s-pod-network.live")]);
    (mem, cluster)
}

/// The gone pod's address is free and the live pod's is held, with its handle.
fn only_the_gone_address_was_released(mem: &MemoryDatastore) {
    let block = mem.peek(Kind::IpamBlock, "10-0-0-0-30").unwrap();
    assert!(block.value["spec"]["allocations"][0].is_null(), "the gone pod's address is free");
    assert!(!block.value["spec"]["allocations"][1].is_null(), "the live pod keeps its address");
    assert!(mem.peek(Kind::IpamHandle, "k8s-pod-network.live").is_some());
}

/// The running loop: watches from both backends, the owner task, the executor.
struct Running {
    shared: Arc<Shared>,
    /// The Events the loop recorded.
    events: crate::runtime::events::MemoryEvents,
    stop: tokio::sync::watch::Sender<bool>,
    owner: tokio::task::JoinHandle<()>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start<D: Datastore + 'static>(ds: Arc<D>, cluster: Arc<MemoryCluster>, exec: ExecutorOptions) -> Running {
        Self::start_with_clock(ds, cluster, exec, Clock::tokio_from(T0))
    }

    fn start_with_clock<D: Datastore + 'static>(ds: Arc<D>, cluster: Arc<MemoryCluster>, exec: ExecutorOptions, clock: Clock) -> Running {
        Self::start_with_grace(ds, cluster, exec, clock, 2_000)
    }

    fn start_with_grace<D: Datastore + 'static>(ds: Arc<D>, cluster: Arc<MemoryCluster>, exec: ExecutorOptions, clock: Clock, grace: i64) -> Running {
        Self::start_as(ds, cluster, exec, clock, grace, true)
    }

    /// `leads`: whether this replica holds the Lease throughout (else a standby throughout).
    fn start_as<D: Datastore + 'static>(ds: Arc<D>, cluster: Arc<MemoryCluster>, exec: ExecutorOptions, clock: Clock, grace: i64, leads: bool) -> Running {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(crate::runtime::INPUT_QUEUE);
        let watchers = spawn_all(&ds, &cluster, &tx, &shared, true, None);
        drop(tx);
        let opts = ControllerOptions { dry_run: false, leak_grace_override: Some(grace), env: EnvConfig::default(), report_file: None };
        let (leader, may_write) = tokio::sync::watch::channel(leads);
        let (events, recorded) = crate::runtime::events::EventRecorder::memory();
        let c = GcController::with_executor(ds, cluster, opts, shared.clone(), may_write, exec, clock).with_events(events);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let owner = tokio::spawn(async move {
            // Leading or not, throughout: the sender lives as long as the loop.
            let _leader = leader;
            c.run(rx, stop_rx).await;
        });
        Running { shared, stop, owner, watchers, events: recorded }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.owner.await.unwrap();
        for w in self.watchers {
            w.abort();
        }
    }
}

/// Sleeps on the paused clock until `done` holds, at most `limit`, looking every 100 ms.
async fn until(limit: Duration, done: impl FnMut() -> bool) -> bool {
    until_every(Duration::from_millis(100), limit, done).await
}

async fn until_every(step: Duration, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let mut waited = Duration::ZERO;
    while waited < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
    done()
}

#[tokio::test(start_paused = true)]
async fn watch_events_are_applied_and_the_heartbeat_stays_fresh_while_ten_thousand_writes_run() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    // 1,000 blocks of a deleted node, four pod addresses each with a handle of its own: the plan
    // is 1,000 block releases (a read and a write each), 4,000 handle releases (a read and a
    // write each) and the node's release, about 10,000 calls.
    for i in 0..1_000u32 {
        let cidr = format!("10.{}.{}.{}/30", 1 + i / 16_384, (i / 64) % 256, (i % 64) * 4);
        let pods: Vec<(u32, String, String)> = (0..4).map(|o| (o, format!("p{i}-{o}"), format!("k8s-pod-network.h{i}-{o}"))).collect();
        let allocs: Vec<(u32, &str, &str)> = pods.iter().map(|(o, p, h)| (*o, p.as_str(), h.as_str())).collect();
        put_block(&mem, &cidr, "gone", &allocs);
    }
    mem.create_now(Kind::KubeControllersConfiguration, "default", kcc("Info")).unwrap();
    let before = mem.revision();
    // Every call takes 250 ms: with 8 items at once, about 300 s for the whole plan, longer than
    // the heartbeat may stay silent (300 s) if the loop waited for it.
    let slow = Arc::new(Slow::new(mem.clone(), Duration::from_millis(250)));
    let run = Running::start(slow.clone(), cluster.clone(), ExecutorOptions::default());
    let mut config = run.shared.config.subscribe();

    assert!(until(Duration::from_secs(30), || slow.done.load(Ordering::Relaxed) > 100).await, "the plan started");
    let mut checks = 0;
    let mut applied_mid_plan = false;
    while allocated(&mem) > 0 {
        let age = run.shared.status.heartbeat_age().expect("the loop beats");
        assert!(age <= Duration::from_secs(6), "heartbeat {age:?} old while the executor writes");
        checks += 1;
        if checks == 20 {
            // A change arrives through the watch mid-plan: the owner applies it at once.
            let stored = mem.peek(Kind::KubeControllersConfiguration, "default").unwrap();
            let mut next = stored.clone();
            next.value = kcc("Debug");
            next.value["metadata"]["resourceVersion"] = json!(stored.revision);
            mem.update_now(Kind::KubeControllersConfiguration, &next).unwrap();
            cluster.apply(ClusterKind::Node, node("new-node"));
            let debug = crate::config::LogLevel::Debug;
            assert!(until(Duration::from_secs(5), || config.borrow_and_update().run.log_level == debug).await, "the KCC change was applied");
            applied_mid_plan = allocated(&mem) > 0;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(checks < 1_000, "the plan never finished");
    }
    assert!(applied_mid_plan, "the event was applied while the plan still had addresses to release");
    assert!(checks * 5 >= 240, "the releases ran for {} s of tokio time, long enough to matter", checks * 5);
    // Everything of the gone node is released: handles deleted, blocks and affinities let go.
    let all_gone = || mem.snapshot(Kind::IpamHandle).is_empty() && mem.snapshot(Kind::BlockAffinity).is_empty();
    assert!(until_every(Duration::from_secs(5), Duration::from_secs(3_600), all_gone).await, "the node's IPAM is gone");
    let writes = slow.writes.load(Ordering::Relaxed);
    assert!(writes >= 10_000, "at least 10,000 writes: {writes}");
    assert!(mem.revision() > before);
    let text = run.shared.render_metrics();
    assert!(text.contains("ipam_gc_datastore_calls_total{outcome=\"timed_out\"} 0"), "{text}");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_write_past_the_timeout_is_counted_backs_off_and_goes_through_once_the_store_answers() {
    let (mem, cluster) = a_live_and_a_gone_pod_in_one_block();
    let slow = Arc::new(Slow::new(mem.clone(), Duration::from_millis(1)));
    *slow.block_update_delay.lock().unwrap() = Duration::from_secs(60);
    let exec = ExecutorOptions { call_timeout: Duration::from_secs(5), ..ExecutorOptions::default() };
    let run = Running::start(slow.clone(), cluster.clone(), exec);
    let timed_out = |shared: &Shared| shared.metrics(|m| m.executor_calls.timed_out);
    assert!(until(Duration::from_secs(60), || timed_out(&run.shared) > 0).await, "a block update timed out");
    assert_eq!(allocated(&mem), 2, "a write that timed out changed nothing");
    assert!(run.shared.render_metrics().contains("ipam_gc_write_errors_total{category=\"transient\"}"));
    // The store answers again: the next due round releases the gone pod's address, only it.
    *slow.block_update_delay.lock().unwrap() = Duration::ZERO;
    assert!(until(Duration::from_secs(120), || allocated(&mem) == 1).await, "released once the store answers");
    only_the_gone_address_was_released(&mem);
    run.stop().await;
}

/// The gone pod's address is released a grace period (2 s) of monotonic time after it was
/// first seen however the wall clock steps meanwhile (an NTP correction, `date -s`): a step
/// forward never shortens the grace, a step back never stretches it. Returns how long after it
/// was first seen it went, and checks that the report shows `firstSeen` in wall time.
async fn release_time_with_wall_step(step: i64) -> Duration {
    let (mem, cluster) = a_live_and_a_gone_pod_in_one_block();
    let clock = Clock::tokio_from(T0);
    let started = tokio::time::Instant::now();
    let run = Running::start_with_clock(mem.clone(), cluster.clone(), ExecutorOptions::default(), clock.clone());
    let leak_reported = |shared: &Shared| shared.report().is_some_and(|r| !r.leaks.is_empty());
    assert!(until_every(Duration::from_millis(10), Duration::from_millis(1_900), || leak_reported(&run.shared)).await, "the gone pod's address is a candidate");
    assert_eq!(allocated(&mem), 2, "a candidate waits out its grace");
    let first_seen = run.shared.report().unwrap().leaks[0].first_seen;
    assert!((0..2_000).contains(&(first_seen - T0)), "first seen at {first_seen}, in wall time");
    clock.step_wall(step);
    assert!(until_every(Duration::from_millis(10), Duration::from_secs(60), || allocated(&mem) == 1).await, "released in the end");
    let released = started.elapsed();
    only_the_gone_address_was_released(&mem);
    run.stop().await;
    released - Duration::from_millis((first_seen - T0) as u64)
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_step_forward_never_shortens_the_grace_period() {
    let released = release_time_with_wall_step(3_600_000).await;
    assert!(released >= Duration::from_secs(2), "released {released:?} after it was first seen, within the grace period");
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_step_back_never_stretches_the_grace_period() {
    let released = release_time_with_wall_step(-3_600_000).await;
    assert!(released < Duration::from_secs(5), "released {released:?} after it was first seen: the step back held it");
}

#[tokio::test(start_paused = true)]
async fn a_409_storm_delays_a_release_and_never_takes_the_live_address() {
    let (mem, cluster) = a_live_and_a_gone_pod_in_one_block();
    // Another writer wins the block 60 times in a row.
    mem.inject(Some(Kind::IpamBlock), None, Op::Update, ErrorKind::Conflict, 60);
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(120), || allocated(&mem) == 1).await, "released after the storm");
    let events = run.events.snapshot();
    assert_eq!(events.len(), 1, "one Event for the one release: {events:?}");
    assert_eq!((events[0].regarding.kind.as_str(), events[0].regarding.name.as_str(), events[0].reason), ("Node", "n1", "IPAddressesReleased"));
    assert_eq!(events[0].note, "released 1 address: 1 pod-not-found");
    let conflicts = run.shared.metrics(|m| m.conflicts_total);
    assert!(conflicts >= 60, "every lost race was counted: {conflicts}");
    only_the_gone_address_was_released(&mem);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_pod_watch_holds_the_release_back_and_a_resumed_one_lets_it_go() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    cluster.apply(ClusterKind::Pod, pod("p", "n1", "10.0.0.1"));
    put_block(&mem, "10.0.0.0/30", "n1", &[(1, "p", "k8s-pod-network.p")]);
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    // The pod is deleted while its watch is stuck: the loop still sees the pod, so its address stays.
    cluster.stall_watches(ClusterKind::Pod);
    cluster.delete(ClusterKind::Pod, "ns", "p");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(allocated(&mem), 1, "no release on a view that has not seen the deletion");
    cluster.resume_watches(ClusterKind::Pod);
    assert!(until(Duration::from_secs(30), || allocated(&mem) == 0).await, "released once the deletion arrived");
    assert!(mem.peek(Kind::IpamHandle, "k8s-pod-network.p").is_none());
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_block_event_is_repaired_by_the_relist_after_an_expiry() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    // The block of a pod that does not exist arrives, but its watch event is lost.
    mem.drop_watch_events(Kind::IpamBlock, 1);
    put_block(&mem, "10.0.0.0/30", "n1", &[(2, "never-existed", "k8s-pod-network.x")]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(allocated(&mem), 1, "unseen, so not judged");
    // The watch expires (a compaction): the relist shows the block and the leak is found.
    mem.expire_watches(Kind::IpamBlock);
    assert!(until(Duration::from_secs(30), || allocated(&mem) == 0).await, "the relisted leak is released");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_standby_makes_no_re_validation_reads_and_writes_nothing_while_the_leader_reads_and_releases() {
    let (mem, cluster) = a_live_and_a_gone_pod_in_one_block();
    let run = Running::start_as(mem.clone(), cluster.clone(), ExecutorOptions::default(), Clock::tokio_from(T0), 2_000, false);
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(cluster.get_count(ClusterKind::Pod), 0, "a standby reads no pod to confirm a leak");
    assert_eq!(allocated(&mem), 2, "and writes nothing");
    run.stop().await;

    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(30), || allocated(&mem) == 1).await, "the leader releases the gone pod's address");
    assert!(cluster.get_count(ClusterKind::Pod) >= 1, "after re-reading the pod");
    only_the_gone_address_was_released(&mem);
    run.stop().await;
}

/// Whether the block holds an address at `ordinal`.
fn holds(mem: &MemoryDatastore, block: &str, ordinal: usize) -> bool {
    mem.peek(Kind::IpamBlock, block).is_some_and(|b| !b.value["spec"]["allocations"][ordinal].is_null())
}

#[tokio::test(start_paused = true)]
async fn a_node_whose_watch_event_was_lost_keeps_its_tunnel_and_affinity_and_a_gone_pods_address_waits_for_grace_and_a_reread() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n0"));
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    // A new node joins but its watch event is lost: the Node cache never sees it.
    cluster.drop_watch_events(ClusterKind::Node, 1);
    cluster.apply(ClusterKind::Node, node("n1"));
    put_tunnel_and_pod_block(&mem, "10.0.0.0/30", "n1", "gone");
    // The dirty pass after the batch window sees n1 missing: before the fix this released all
    // of it at once.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(allocated(&mem), 2, "a cache miss confirms nothing at once");
    assert!(cluster.get_count(ClusterKind::Node) >= 1, "the node was read to prove its deletion");
    // After the grace period (2 s) and the pod's re-read, the gone pod's address goes; the
    // tunnel and the affinity stay.
    assert!(until(Duration::from_secs(30), || !holds(&mem, "10-0-0-0-30", 1)).await, "the gone pod's address is released");
    assert!(cluster.get_count(ClusterKind::Pod) >= 1, "the pod was re-read before its release");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(holds(&mem, "10-0-0-0-30", 0), "the tunnel of a node that exists is kept");
    assert!(mem.peek(Kind::IpamHandle, &handle_object_name("ipip-tunnel-addr-n1")).is_some(), "and its handle");
    assert_eq!(mem.snapshot(Kind::BlockAffinity).len(), 1, "the affinity is kept");
    run.stop().await;
}

/// Node `n1` with its tunnel and a running pod's address in one block, every watch listed, and
/// then the Node deleted (the pod object is still there).
async fn a_running_pod_on_a_node_just_deleted() -> (Arc<MemoryDatastore>, Arc<MemoryCluster>, Running) {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    cluster.apply(ClusterKind::Pod, pod("p", "n1", "10.0.0.1"));
    put_tunnel_and_pod_block(&mem, "10.0.0.0/30", "n1", "p");
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    cluster.delete(ClusterKind::Node, "", "n1");
    (mem, cluster, run)
}

#[tokio::test(start_paused = true)]
async fn a_deleted_node_is_proven_by_one_read_and_then_released_as_before() {
    let (mem, cluster, run) = a_running_pod_on_a_node_just_deleted().await;
    // The pod still runs, so the node's tunnel stays; rounds go on and never read the node again.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(allocated(&mem), 2, "a running pod keeps its address and the node's tunnel");
    assert_eq!(cluster.get_count(ClusterKind::Node), 1, "one read proved the deletion; quiet rounds read nothing");
    // The pod goes: as before, everything of the node goes at once, without a pod re-read.
    cluster.delete(ClusterKind::Pod, "ns", "p");
    let all_gone = || allocated(&mem) == 0 && mem.snapshot(Kind::BlockAffinity).is_empty() && mem.snapshot(Kind::IpamHandle).is_empty();
    assert!(until(Duration::from_secs(30), all_gone).await, "the node's addresses, handles and affinity are released");
    assert_eq!(cluster.get_count(ClusterKind::Pod), 0, "a proven-gone node's pods are judged on the cache");
    assert_eq!(cluster.get_count(ClusterKind::Node), 1);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_the_watch_delivers_again_is_no_longer_taken_as_proven_gone() {
    let (mem, cluster, run) = a_running_pod_on_a_node_just_deleted().await;
    assert!(until(Duration::from_secs(10), || cluster.get_count(ClusterKind::Node) == 1).await, "the deletion was proven");
    // The node comes back, then is deleted again: the old NotFound is forgotten, so the new
    // deletion needs its own read.
    cluster.apply(ClusterKind::Node, node("n1"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.delete(ClusterKind::Node, "", "n1");
    assert!(until(Duration::from_secs(10), || cluster.get_count(ClusterKind::Node) == 2).await, "the second deletion was read too");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(cluster.get_count(ClusterKind::Node), 2);
    assert_eq!(allocated(&mem), 2, "the running pod keeps its address and the node's tunnel");
    run.stop().await;
}


/// The `GcDecisions` readiness condition as the status file holds it, if it was ever written.
fn decisions_condition(shared: &Shared) -> Option<crate::health::Readiness> {
    shared.status.snapshot().readiness.get("GcDecisions").cloned()
}

/// The `ipam_gc_watch_unhealthy` line of `resource` in the rendered metrics.
fn unhealthy_gauge(shared: &Shared, resource: &str) -> Option<String> {
    let prefix = format!("ipam_gc_watch_unhealthy{{resource=\"{resource}\"}} ");
    shared.render_metrics().lines().find(|l| l.starts_with(&prefix)).map(str::to_string)
}

/// Node `n1` with a pod at 10.0.0.1 that holds its address in a /30 block, every watch listed.
async fn a_listed_pod_with_its_address() -> (Arc<MemoryDatastore>, Arc<MemoryCluster>) {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    cluster.apply(ClusterKind::Pod, pod("p", "n1", "10.0.0.1"));
    put_block(&mem, "10.0.0.0/30", "n1", &[(1, "p", "k8s-pod-network.p")]);
    (mem, cluster)
}

#[tokio::test(start_paused = true)]
async fn a_pod_deleted_while_the_block_watch_is_refused_keeps_its_address_until_the_watch_is_back() {
    let (mem, cluster) = a_listed_pod_with_its_address().await;
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    assert!(decisions_condition(&run.shared).is_none_or(|c| c.ready), "decisions do not wait in the normal case");
    assert_eq!(unhealthy_gauge(&run.shared, "ipamblocks").as_deref(), Some("ipam_gc_watch_unhealthy{resource=\"ipamblocks\"} 0"));
    // The block watch is refused, then the pod goes: the pod watch sees it, the block view is stale.
    mem.refuse_watches(Kind::IpamBlock, 403);
    cluster.delete(ClusterKind::Pod, "ns", "p");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(allocated(&mem), 1, "no release while the block watch is refused");
    assert!(mem.peek(Kind::IpamHandle, "k8s-pod-network.p").is_some(), "no handle deleted either");
    let held = decisions_condition(&run.shared).expect("the decisions condition is written");
    assert!(!held.ready && held.reason.contains("ipamblocks"), "{held:?}");
    assert_eq!(unhealthy_gauge(&run.shared, "ipamblocks").as_deref(), Some("ipam_gc_watch_unhealthy{resource=\"ipamblocks\"} 1"));
    assert_eq!(unhealthy_gauge(&run.shared, "pods").as_deref(), Some("ipam_gc_watch_unhealthy{resource=\"pods\"} 0"));
    let text = run.shared.render_metrics();
    let held_rounds = text.lines().find_map(|l| l.strip_prefix("ipam_gc_rounds_writes_held_total ")).map(|n| n.parse::<u64>().unwrap());
    assert!(held_rounds.is_some_and(|n| n > 0), "{text}");
    // The watch is allowed again: it relists, and the leak is released.
    mem.resume_watches(Kind::IpamBlock);
    assert!(until(Duration::from_secs(30), || allocated(&mem) == 0).await, "released once the block watch is back");
    assert!(decisions_condition(&run.shared).is_some_and(|c| c.ready));
    assert_eq!(unhealthy_gauge(&run.shared, "ipamblocks").as_deref(), Some("ipam_gc_watch_unhealthy{resource=\"ipamblocks\"} 0"));
    assert!(run.shared.ready());
    run.stop().await;
}

/// The memory datastore, except that the block watch is fed by the test: the first list is the
/// store's blocks, and later events are whatever the test sends (a relist it never finishes).
struct ScriptedBlocks {
    inner: Arc<MemoryDatastore>,
    blocks: std::sync::Mutex<Option<futures::channel::mpsc::UnboundedReceiver<crate::datastore::WatchEvent>>>,
}

impl Datastore for ScriptedBlocks {
    async fn get(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        self.inner.get(kind, name).await
    }
    async fn list(&self, kind: Kind) -> DsResult<Vec<Stored>> {
        self.inner.list(kind).await
    }
    async fn create(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        self.inner.create(kind, name, value).await
    }
    async fn update(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        self.inner.update(kind, object).await
    }
    async fn update_status(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        self.inner.update_status(kind, object).await
    }
    async fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        self.inner.delete(kind, name, precondition).await
    }
    fn watch(&self, kind: Kind) -> WatchStream {
        match (kind, self.blocks.lock().unwrap().take()) {
            (Kind::IpamBlock, Some(rx)) => Box::pin(rx),
            _ => self.inner.watch(kind),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_relist_in_progress_holds_every_write_until_its_init_done() {
    use crate::datastore::WatchEvent;
    let (mem, cluster) = a_listed_pod_with_its_address().await;
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let relist = |tx: &futures::channel::mpsc::UnboundedSender<WatchEvent>, done: bool| {
        tx.unbounded_send(WatchEvent::Init).unwrap();
        for b in mem.snapshot(Kind::IpamBlock) {
            tx.unbounded_send(WatchEvent::InitApply(b)).unwrap();
        }
        if done {
            tx.unbounded_send(WatchEvent::InitDone).unwrap();
        }
    };
    relist(&tx, true);
    let ds = Arc::new(ScriptedBlocks { inner: mem.clone(), blocks: std::sync::Mutex::new(Some(rx)) });
    let run = Running::start(ds, cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    // The block watch expired and its relist is under way (no InitDone yet) when the pod goes.
    tx.unbounded_send(WatchEvent::Error(crate::datastore::WatchFailure::transient("expired"))).unwrap();
    relist(&tx, false);
    cluster.delete(ClusterKind::Pod, "ns", "p");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(allocated(&mem), 1, "no release while the block relist is incomplete");
    let held = decisions_condition(&run.shared).expect("the decisions condition is written");
    assert!(!held.ready && held.reason.contains("ipamblocks") && held.reason.contains("relist"), "{held:?}");
    tx.unbounded_send(WatchEvent::InitDone).unwrap();
    assert!(until(Duration::from_secs(30), || allocated(&mem) == 0).await, "released once the relist is complete");
    assert!(decisions_condition(&run.shared).is_some_and(|c| c.ready));
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_orphan_handle_is_kept_while_a_malformed_block_is_known_and_deleted_once_it_is_gone() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    // A handle that no block the loop can read refers to; the block that may hold its address
    // does not validate.
    let body = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": "k8s-pod-network.orphan"},
                      "spec": {"handleID": "k8s-pod-network.orphan", "block": {"10.0.0.0/30": 1}, "deleted": false}});
    mem.create_now(Kind::IpamHandle, "k8s-pod-network.orphan", body).unwrap();
    let malformed = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-30"},
                           "spec": {"cidr": "not-a-cidr", "affinity": "host:n1", "strictAffinity": false, "allocations": [0, null, null, null],
                                    "unallocated": [1, 2, 3], "attributes": [{"handle_id": "k8s-pod-network.orphan", "secondary": {}}],
                                    "sequenceNumber": 1, "deleted": false}});
    mem.create_now(Kind::IpamBlock, "10-0-0-0-30", malformed).unwrap();
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(mem.peek(Kind::IpamHandle, "k8s-pod-network.orphan").is_some(), "kept while a malformed block may hold its address");
    assert!(run.shared.ready(), "a malformed block is reported, not a readiness failure");
    mem.delete_now(Kind::IpamBlock, "10-0-0-0-30", &Precondition::default()).unwrap();
    assert!(until(Duration::from_secs(30), || mem.peek(Kind::IpamHandle, "k8s-pod-network.orphan").is_none()).await, "deleted once the block is gone");
    run.stop().await;
}

/// 60 addresses of pods that are gone, in 15 blocks of live node `n1`: every address of the
/// cluster, so releasing them at once is a mass change.
fn sixty_addresses_of_gone_pods() -> (Arc<MemoryDatastore>, Arc<MemoryCluster>) {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    for b in 0..15u32 {
        let pods: Vec<(u32, String, String)> = (0..4).map(|o| (o, format!("p{b}-{o}"), format!("k8s-pod-network.h{b}-{o}"))).collect();
        let allocs: Vec<(u32, &str, &str)> = pods.iter().map(|(o, p, h)| (*o, p.as_str(), h.as_str())).collect();
        put_block(&mem, &format!("10.0.{b}.0/30"), "n1", &allocs);
    }
    (mem, cluster)
}

fn guard_gauge(shared: &Shared, scope: &str) -> Option<String> {
    let prefix = format!("kube_controllers_mass_change_held{{scope=\"{scope}\"}} ");
    shared.render_metrics().lines().find(|l| l.starts_with(&prefix)).map(|l| l[prefix.len()..].to_string())
}

#[tokio::test(start_paused = true)]
async fn a_mass_release_is_held_visibly_until_an_operator_approves_the_set_it_published() {
    let (mem, cluster) = sixty_addresses_of_gone_pods();
    mem.create_now(Kind::KubeControllersConfiguration, "default", kcc("Info")).unwrap();
    // A grace period of 10 minutes: the guard's own wait would end 10 minutes after it held.
    let run = Running::start_with_grace(mem.clone(), cluster.clone(), ExecutorOptions::default(), Clock::tokio_from(T0), 600_000);
    assert_eq!(guard_gauge(&run.shared, "ipam-addresses").as_deref(), Some("0"));
    let held = |shared: &Shared| guard_gauge(shared, "ipam-addresses").as_deref() == Some("60");
    assert!(until_every(Duration::from_secs(1), Duration::from_secs(1_200), || held(&run.shared)).await, "the guard holds the 60 confirmed leaks");
    assert_eq!(allocated(&mem), 60, "nothing released");
    let cond = run.shared.status.snapshot().readiness.get("MassChangeGuard").cloned().expect("a readiness condition names the hold");
    assert!(!cond.ready, "{cond:?}");
    assert!(cond.reason.contains("ipam-addresses: 60 of 60") && cond.reason.contains("calico-kube-controllers/approve-mass-change="), "{}", cond.reason);
    let id = cond.reason.rsplit('=').next().unwrap().to_string();
    let report = run.shared.report().unwrap();
    assert!(report.leaks.iter().all(|l| l.held_by == Some("mass-change-guard")), "the report says why");
    // The operator approves exactly that set.
    let stored = mem.peek(Kind::KubeControllersConfiguration, "default").unwrap();
    let mut next = stored.clone();
    next.value["metadata"]["annotations"] = json!({"calico-kube-controllers/approve-mass-change": id});
    mem.update_now(Kind::KubeControllersConfiguration, &next).unwrap();
    let events = run.events.snapshot();
    assert_eq!(events.len(), 1, "one Event for the held set: {events:?}");
    assert_eq!((events[0].regarding.kind.as_str(), events[0].reason, events[0].type_.as_str()), ("KubeControllersConfiguration", "MassChangeHeld", "Warning"));
    assert!(events[0].note.contains("held 60 address releases of 60") && events[0].note.contains(&id), "{}", events[0].note);
    assert!(until(Duration::from_secs(30), || allocated(&mem) == 0).await, "released once approved, well before the guard's own wait");
    let released: Vec<_> = run.events.snapshot().into_iter().filter(|e| e.reason == "IPAddressesReleased").collect();
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0].note, "released 60 addresses: 60 pod-not-found");
    assert!(until(Duration::from_secs(30), || guard_gauge(&run.shared, "ipam-addresses").as_deref() == Some("0")).await);
    let cond = run.shared.status.snapshot().readiness.get("MassChangeGuard").cloned().unwrap();
    assert!(cond.ready, "{cond:?}");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_half_soft_deleted_block_is_finished_before_its_handle_is_touched() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    // A block whose deleter died between the two KDD steps: marked `deleted`, never deleted. It
    // still names its pod's handle.
    put_block(&mem, "10.0.0.0/30", "n1", &[(1, "p", "k8s-pod-network.p")]);
    let marked = mem.bump(Kind::IpamBlock, "10-0-0-0-30", |v| v["spec"]["deleted"] = json!(true)).unwrap();
    // The first completions fail (an apiserver hiccup): the block stays pending a while.
    mem.inject(Some(Kind::IpamBlock), Some("10-0-0-0-30"), Op::Delete, ErrorKind::Transient, 3);
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    let block_gone = || mem.peek(Kind::IpamBlock, "10-0-0-0-30").is_none();
    let handle_gone = || mem.peek(Kind::IpamHandle, "k8s-pod-network.p").is_none();
    // Well past the grace period (2 s) and its two observations, the handle is never deleted
    // while the block is pending; the block is finished once the store answers.
    let mut waited = Duration::ZERO;
    while !block_gone() {
        assert!(!handle_gone(), "the handle was deleted while its soft-deleted block was pending ({waited:?})");
        assert!(waited < Duration::from_secs(120), "the soft-deleted block was never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    assert!(waited >= Duration::from_secs(1), "the injected failures held the completion back a while ({waited:?})");
    assert_eq!(mem.op_count(Op::Delete, Kind::IpamBlock), 4, "three failed completions, one that went through");
    let _ = marked;
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_held_mass_release_goes_by_itself_after_a_complete_observation_a_grace_period_later() {
    let (mem, cluster) = sixty_addresses_of_gone_pods();
    let run = Running::start_with_grace(mem.clone(), cluster.clone(), ExecutorOptions::default(), Clock::tokio_from(T0), 60_000);
    let held = |shared: &Shared| guard_gauge(shared, "ipam-addresses").as_deref() == Some("60");
    assert!(until_every(Duration::from_secs(1), Duration::from_secs(300), || held(&run.shared)).await, "held");
    let since = tokio::time::Instant::now();
    assert!(until(Duration::from_secs(300), || allocated(&mem) == 0).await, "released in the end");
    assert!(since.elapsed() >= Duration::from_secs(55), "released {:?} after the hold, within the grace period", since.elapsed());
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_soft_deleted_block_rewritten_since_is_not_finished_by_a_stale_plan() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    cluster.apply(ClusterKind::Pod, pod("p", "n1", "10.0.0.1"));
    put_block(&mem, "10.0.0.0/30", "n1", &[(1, "p", "k8s-pod-network.p")]);
    mem.bump(Kind::IpamBlock, "10-0-0-0-30", |v| v["spec"]["deleted"] = json!(true)).unwrap();
    // Just before the completion, another writer takes the mark back: the delete's revision
    // precondition fails and the block, live again, stays.
    mem.bump_before(Op::Delete, Kind::IpamBlock, "10-0-0-0-30", |v| v["spec"]["deleted"] = json!(false));
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(holds(&mem, "10-0-0-0-30", 1), "the block and the live pod's address stay");
    assert!(mem.peek(Kind::IpamHandle, "k8s-pod-network.p").is_some());
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_nodes_block_holding_another_nodes_pod_keeps_its_affinity_and_the_node_is_released_once_that_pod_goes() {
    let mem = initialized_store();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.apply(ClusterKind::Node, node("n1"));
    cluster.apply(ClusterKind::Node, node("n2"));
    cluster.apply(ClusterKind::Pod, pod("b", "n2", "10.0.0.2"));
    // n1's block holds n1's pod `a` (gone) and n2's pod `b`, borrowed.
    put_block(&mem, "10.0.0.0/30", "n1", &[(1, "a", "k8s-pod-network.a")]);
    mem.bump(Kind::IpamBlock, "10-0-0-0-30", |v| {
        v["spec"]["allocations"][2] = json!(1);
        v["spec"]["attributes"].as_array_mut().unwrap().push(json!({"handle_id": "k8s-pod-network.b", "secondary": {"namespace": "ns", "pod": "b", "node": "n2"}}));
        v["spec"]["unallocated"] = json!([0, 3]);
    });
    let run = Running::start(mem.clone(), cluster.clone(), ExecutorOptions::default());
    assert!(until(Duration::from_secs(10), || run.shared.ready()).await, "every watch listed");
    cluster.delete(ClusterKind::Node, "", "n1");
    assert!(until(Duration::from_secs(30), || !holds(&mem, "10-0-0-0-30", 1)).await, "n1's pod address goes");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let block = mem.peek(Kind::IpamBlock, "10-0-0-0-30").expect("the block stays");
    assert_eq!(block.value["spec"]["affinity"], "host:n1", "still affine to n1 (mustBeEmpty)");
    assert!(holds(&mem, "10-0-0-0-30", 2), "n2's pod keeps its address");
    assert_eq!(mem.snapshot(Kind::BlockAffinity).len(), 1, "n1's affinity for it stays");
    let gets = mem.op_count(Op::Get, Kind::IpamBlock);
    assert!(gets <= 10, "the held node is retried with a backoff, not every round: {gets} block reads in 60 s");
    // n2's pod goes: its address is released (grace 2 s and a re-read), and the retried node
    // release finds the block empty.
    cluster.delete(ClusterKind::Pod, "ns", "b");
    let all_gone = || mem.peek(Kind::IpamBlock, "10-0-0-0-30").is_none() && mem.snapshot(Kind::BlockAffinity).is_empty();
    assert!(until(Duration::from_secs(120), all_gone).await, "block and affinity go once the block is empty");
    let cleaned: Vec<_> = run.events.snapshot().into_iter().filter(|e| e.reason == "NodeIPAMReleased").collect();
    assert_eq!(cleaned.len(), 1, "one Event for n1's cleanup, none while it was held: {cleaned:?}");
    assert_eq!(cleaned[0].regarding.name, "n1");
    run.stop().await;
}
