//! The chaos suite's workload driver: plays the Calico CNI plugin and the kubelet on a cluster that
//! has neither. It creates pods and nodes, gives each pod an IPv4 and an IPv6 address the way the
//! CNI does (the handle first, then a compare-and-swap on the block, retried on 409), reports them
//! in the pod's status, releases them on a clean delete, and leaves them behind on a dirty one (a
//! CNI DEL that never ran: a leak for the GC). Pods and nodes are recreated under the same names,
//! some addresses are borrowed from other nodes' blocks, and deleted nodes keep their pods for a
//! while (as before the pod GC catches up).
//!
//! Owns: the [`Record`] of which pod incarnation (uid) holds which address and handle, with the
//! etcd revisions of its life (the oracle judges the GC against it), and the driver's own small
//! view of blocks. It shares no code with the product: names, block edits and IP arithmetic are
//! written here again, so a bug in the product's cannot hide a bug in the test.
//! Must not: judge anything (the oracle does), or write IPAM state the real CNI would not write.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};

/// Addresses per block (a /26 and a /122), as Calico's default block sizes give.
pub const BLOCK_SIZE: u32 = 64;
/// The IPv4 pool: 1024 blocks of 64.
pub const POOL_V4: &str = "10.80.0.0/16";
/// The IPv6 pool: 1024 blocks of 64.
pub const POOL_V6: &str = "fd80::/112";
const POOL_BLOCKS: u32 = 1024;
/// An operation that keeps failing for this long (not a conflict: the apiserver is away) fails
/// the test: every fault the suite injects heals well within it.
const OP_DEADLINE: Duration = Duration::from_secs(90);

/// A small deterministic PRNG (xorshift64*): the run is reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// Calico's KDD object name of a block: every `.`, `:` and `/` of the CIDR becomes `-`.
pub fn block_name(cidr: &str) -> String {
    cidr.replace(['.', ':', '/'], "-")
}

/// The `k`th block CIDR of a family's pool.
pub fn block_cidr(family: Family, k: u32) -> String {
    match family {
        Family::V4 => format!("{}/26", Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 0)) + k * BLOCK_SIZE)),
        Family::V6 => format!("{}/122", Ipv6Addr::from(u128::from("fd80::".parse::<Ipv6Addr>().unwrap()) + u128::from(k * BLOCK_SIZE))),
    }
}

/// The address at `ordinal` of block `cidr`.
pub fn ordinal_ip(cidr: &str, ordinal: u32) -> String {
    let base = cidr.split('/').next().unwrap_or_default();
    if let Ok(v4) = base.parse::<Ipv4Addr>() {
        Ipv4Addr::from(u32::from(v4) + ordinal).to_string()
    } else {
        let v6: Ipv6Addr = base.parse().expect("a block CIDR");
        Ipv6Addr::from(u128::from(v6) + u128::from(ordinal)).to_string()
    }
}

pub fn calico_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind), plural)
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Worth asking again unchanged: the apiserver or etcd is away or overloaded.
fn transient(e: &kube::Error) -> bool {
    !matches!(code(e), Some(c) if c < 500 && c != 429)
}

fn rv_of(meta_rv: Option<&String>) -> u64 {
    meta_rv.and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// One address the driver gave a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub block: String,
    pub cidr: String,
    pub ordinal: u32,
    pub ip: String,
}

/// One pod incarnation, as the driver made it.
#[derive(Debug, Clone)]
pub struct PodLife {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub handle: String,
    pub addresses: Vec<Address>,
    /// The revision of its last write (creation, status): it certainly lived until then.
    pub last_rv: u64,
    /// The revision its deletion was committed at; `None` while it lives.
    pub deleted_rv: Option<u64>,
    /// When the outcome of the delete call was lost: deleted after `.0` and no later than `.1`.
    pub deleted_between: Option<(u64, u64)>,
    /// Its teardown (the CNI DEL) began at this revision: from then on its addresses and handle
    /// may go, by the driver's hand or the GC's.
    pub teardown_rv: Option<u64>,
    /// Deleted without releasing its addresses: each is a leak the GC must free.
    pub leaked: bool,
}

impl PodLife {
    pub fn alive(&self) -> bool {
        self.deleted_rv.is_none() && self.deleted_between.is_none()
    }
}

/// The driver's record: every pod incarnation it made, keyed by uid and by handle ID.
#[derive(Debug, Default)]
pub struct Record {
    pub pods: HashMap<String, PodLife>,
    pub by_handle: HashMap<String, String>,
}

impl Record {
    pub fn pod_of_handle(&self, handle: &str) -> Option<&PodLife> {
        self.pods.get(self.by_handle.get(handle)?)
    }
}

/// What the driver did, for the figures.
#[derive(Debug, Default)]
pub struct Counters {
    pub pods_created: AtomicU64,
    pub pods_deleted_clean: AtomicU64,
    pub pods_deleted_leaking: AtomicU64,
    pub pods_recreated: AtomicU64,
    pub nodes_created: AtomicU64,
    pub nodes_deleted: AtomicU64,
    pub nodes_recreated: AtomicU64,
    pub borrowed: AtomicU64,
    pub conflicts: AtomicU64,
    pub blocks_claimed: AtomicU64,
    pub addresses: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The driver's view of one block it knows (its own guess; every write is a CAS anyway).
#[derive(Debug, Clone)]
struct KnownBlock {
    cidr: String,
    family: Family,
    node: String,
    full: bool,
}

#[derive(Debug, Default)]
struct NodeState {
    alive: bool,
    /// When it was deleted (its pods are collected a little later; it may come back).
    deleted_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct View {
    nodes: BTreeMap<String, NodeState>,
    /// Live pods by name -> uid, with the node they run on.
    live: BTreeMap<String, (String, String)>,
    blocks: BTreeMap<String, KnownBlock>,
    /// Pods being changed by a task: no other task picks them.
    busy: std::collections::BTreeSet<String>,
    /// Names whose pods were deleted, for recreation under the same name.
    dead_names: Vec<String>,
    next_block: BTreeMap<Family, u32>,
}

pub struct Workload {
    pub namespace: String,
    pods: Api<Pod>,
    nodes: Api<Node>,
    blocks: Api<DynamicObject>,
    handles: Api<DynamicObject>,
    affinities: Api<DynamicObject>,
    pub record: Arc<Mutex<Record>>,
    pub counters: Counters,
    view: Mutex<View>,
    rng: Mutex<Rng>,
    next_id: AtomicU64,
    /// Operations hold it shared; a fault that takes the apiserver away holds it exclusively, so
    /// no operation's outcome is lost in the outage (the record stays exact).
    pub pause: tokio::sync::RwLock<()>,
    /// Blocks written by the fault injector only: the driver never allocates in them.
    reserved_blocks: Mutex<std::collections::BTreeSet<String>>,
}

impl Workload {
    pub fn new(client: &Client, namespace: &str, seed: u64) -> Workload {
        Workload {
            namespace: namespace.to_string(),
            pods: Api::namespaced(client.clone(), namespace),
            nodes: Api::all(client.clone()),
            blocks: Api::all_with(client.clone(), &calico_resource("IPAMBlock", "ipamblocks")),
            handles: Api::all_with(client.clone(), &calico_resource("IPAMHandle", "ipamhandles")),
            affinities: Api::all_with(client.clone(), &calico_resource("BlockAffinity", "blockaffinities")),
            record: Arc::default(),
            counters: Counters::default(),
            view: Mutex::default(),
            rng: Mutex::new(Rng::new(seed)),
            next_id: AtomicU64::new(1),
            pause: tokio::sync::RwLock::new(()),
            reserved_blocks: Mutex::default(),
        }
    }

    pub fn chance(&self, p: f64) -> bool {
        self.rng.lock().unwrap().chance(p)
    }

    pub fn pick<T: Clone>(&self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let i = self.rng.lock().unwrap().below(items.len());
        Some(items[i].clone())
    }

    /// The IPv4 and IPv6 pools the addresses come from (the GC reports per pool).
    pub async fn create_pools(&self, client: &Client) {
        let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico_resource("IPPool", "ippools"));
        for (name, cidr, size) in [("chaos-v4", POOL_V4, 26), ("chaos-v6", POOL_V6, 122)] {
            let pool = DynamicObject::new(name, &calico_resource("IPPool", "ippools"))
                .data(json!({"spec": {"cidr": cidr, "blockSize": size, "ipipMode": "Never", "vxlanMode": "Never", "natOutgoing": false, "nodeSelector": "all()"}}));
            pools.create(&PostParams::default(), &pool).await.unwrap_or_else(|e| panic!("creating pool {name}: {e}"));
        }
    }

    // --- nodes ------------------------------------------------------------------------------

    pub fn live_nodes(&self) -> Vec<String> {
        self.view.lock().unwrap().nodes.iter().filter(|(_, s)| s.alive).map(|(n, _)| n.clone()).collect()
    }

    pub fn live_pod_count(&self) -> usize {
        self.view.lock().unwrap().live.len()
    }

    /// Creates node `name` (again, if it existed before).
    pub async fn create_node(&self, name: &str) {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"chaos": "true"}}})).unwrap();
        let recreated = self.view.lock().unwrap().nodes.contains_key(name);
        retry_write(&format!("creating node {name}"), || async {
            match self.nodes.create(&PostParams::default(), &node).await {
                Err(e) if code(&e) == Some(409) => Ok(()),
                other => other.map(|_| ()),
            }
        })
        .await;
        let mut view = self.view.lock().unwrap();
        view.nodes.insert(name.to_string(), NodeState { alive: true, deleted_at: None });
        drop(view);
        inc(if recreated { &self.counters.nodes_recreated } else { &self.counters.nodes_created });
    }

    /// Deletes node `name`; its pods live on until [`Workload::collect_pods_of_deleted_nodes`]
    /// deletes them, as the pod GC would.
    pub async fn delete_node(&self, name: &str) {
        {
            let mut view = self.view.lock().unwrap();
            match view.nodes.get_mut(name) {
                Some(s) if s.alive => {
                    s.alive = false;
                    s.deleted_at = Some(Instant::now());
                }
                _ => return,
            }
        }
        retry_write(&format!("deleting node {name}"), || async {
            match self.nodes.delete(name, &DeleteParams::default()).await {
                Err(e) if code(&e) == Some(404) => Ok(()),
                other => other.map(|_| ()),
            }
        })
        .await;
        inc(&self.counters.nodes_deleted);
    }

    /// Deleted nodes whose pods have waited `after`: those pods go (leaking, as the pod GC deletes
    /// them without any CNI DEL). Returns how many pods were deleted.
    pub async fn collect_pods_of_deleted_nodes(&self, after: Duration) -> usize {
        let victims: Vec<String> = {
            let mut view = self.view.lock().unwrap();
            let gone: Vec<String> = view
                .nodes
                .iter()
                .filter(|(_, s)| !s.alive && s.deleted_at.is_some_and(|t| t.elapsed() >= after))
                .map(|(n, _)| n.clone())
                .collect();
            let names: Vec<String> =
                view.live.iter().filter(|(name, (_, node))| gone.contains(node) && !view.busy.contains(*name)).map(|(name, _)| name.clone()).collect();
            for n in &names {
                view.busy.insert(n.clone());
            }
            names
        };
        for name in &victims {
            self.delete_pod(name, false).await;
            self.view.lock().unwrap().busy.remove(name);
        }
        victims.len()
    }

    /// Deleted nodes that have been gone at least `after`.
    pub fn nodes_deleted_for(&self, after: Duration) -> Vec<String> {
        let view = self.view.lock().unwrap();
        view.nodes.iter().filter(|(_, s)| !s.alive && s.deleted_at.is_some_and(|t| t.elapsed() >= after)).map(|(n, _)| n.clone()).collect()
    }

    // --- pods -------------------------------------------------------------------------------

    /// A new pod name, or one whose pod was deleted (recreated under the same name).
    pub fn pod_name(&self, reuse: bool) -> (String, bool) {
        if reuse {
            let mut view = self.view.lock().unwrap();
            let n = view.dead_names.len();
            if n > 0 {
                let i = self.rng.lock().unwrap().below(n);
                let name = view.dead_names.swap_remove(i);
                if !view.live.contains_key(&name) && !view.busy.contains(&name) {
                    view.busy.insert(name.clone());
                    return (name, true);
                }
            }
        }
        let name = format!("p{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        self.view.lock().unwrap().busy.insert(name.clone());
        (name, false)
    }

    /// Picks a live pod no other task is changing, and marks it busy.
    pub fn take_live_pod(&self) -> Option<String> {
        let mut view = self.view.lock().unwrap();
        let names: Vec<String> = view.live.keys().filter(|n| !view.busy.contains(*n)).cloned().collect();
        let name = self.pick(&names)?;
        view.busy.insert(name.clone());
        Some(name)
    }

    pub fn release_busy(&self, name: &str) {
        self.view.lock().unwrap().busy.remove(name);
    }

    /// Creates pod `name` on `node` and gives it an IPv4 and an IPv6 address, as kubelet and
    /// the CNI plugin would: the pod exists first, then the CNI allocates (handle first, then
    /// the block), then the kubelet reports the IPs in the pod's status. `in_block` forces the
    /// IPv4 address into that block (the fault injector's malformed block).
    pub async fn create_pod(&self, name: &str, node: &str, in_block: Option<(&str, &str)>) -> String {
        let incarnation = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"chaos/incarnation": incarnation.to_string()}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/c:1"}]},
        }))
        .unwrap();
        let created = retry_write(&format!("creating pod {name}"), || async {
            match self.pods.create(&PostParams::default(), &pod).await {
                Ok(p) => Ok(p),
                Err(e) if code(&e) == Some(409) || transient(&e) => {
                    // A lost answer: it may be ours already (its incarnation says so).
                    match self.pods.get_opt(name).await? {
                        Some(p) if p.metadata.annotations.as_ref().and_then(|a| a.get("chaos/incarnation")) == Some(&incarnation.to_string()) => Ok(p),
                        Some(_) => panic!("pod {name} exists but is not ours"),
                        None => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        })
        .await;
        let uid = created.metadata.uid.clone().expect("a pod uid");
        // The CNI's container ID names the handle: one per sandbox, never reused.
        let container = format!("{:016x}{:048x}", incarnation, self.rng.lock().unwrap().next());
        let handle = format!("k8s-pod-network.{container}");
        {
            let mut record = self.record.lock().unwrap();
            record.by_handle.insert(handle.clone(), uid.clone());
            record.pods.insert(
                uid.clone(),
                PodLife {
                    uid: uid.clone(),
                    namespace: self.namespace.clone(),
                    name: name.to_string(),
                    node: node.to_string(),
                    handle: handle.clone(),
                    addresses: Vec::new(),
                    last_rv: rv_of(created.metadata.resource_version.as_ref()),
                    deleted_rv: None,
                    deleted_between: None,
                    teardown_rv: None,
                    leaked: false,
                },
            );
        }
        let mut ips = Vec::new();
        // A pod placed in a given block has that one address (its handle names no other block).
        let families: &[Family] = if in_block.is_some() { &[Family::V4] } else { &[Family::V4, Family::V6] };
        for &family in families {
            let address = self.allocate(&handle, name, node, family, in_block).await;
            ips.push(address.ip.clone());
            let mut record = self.record.lock().unwrap();
            record.pods.get_mut(&uid).expect("recorded above").addresses.push(address);
        }
        let status = json!({"status": {"phase": "Running", "podIP": ips[0], "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}});
        let patched = retry_write(&format!("reporting the IPs of pod {name}"), || async {
            self.pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await
        })
        .await;
        self.record.lock().unwrap().pods.get_mut(&uid).expect("recorded").last_rv = rv_of(patched.metadata.resource_version.as_ref());
        let mut view = self.view.lock().unwrap();
        view.live.insert(name.to_string(), (uid.clone(), node.to_string()));
        drop(view);
        inc(&self.counters.pods_created);
        uid
    }

    /// Deletes pod `name`: `clean` runs the CNI DEL first (its addresses and handle released by
    /// the driver), otherwise they are left behind as leaks.
    pub async fn delete_pod(&self, name: &str, clean: bool) {
        let Some((uid, _node)) = self.view.lock().unwrap().live.get(name).cloned() else { return };
        let life = self.record.lock().unwrap().pods.get(&uid).cloned().expect("a recorded pod");
        if clean {
            let teardown = self.current_rv().await;
            self.record.lock().unwrap().pods.get_mut(&uid).unwrap().teardown_rv = Some(teardown);
            for a in &life.addresses {
                self.release(a, &life.handle).await;
            }
            self.release_handle(&life).await;
        }
        let before = life.last_rv;
        let params = DeleteParams { grace_period_seconds: Some(0), preconditions: Some(Preconditions { uid: Some(uid.clone()), resource_version: None }), ..Default::default() };
        let started = Instant::now();
        let deleted = loop {
            match self.pods.delete(name, &params).await {
                Ok(either) => {
                    let rv = either.left().map(|p| rv_of(p.metadata.resource_version.as_ref()));
                    break rv.map(Ok).unwrap_or(Err(()));
                }
                // Gone already, or another incarnation took the name: the call before this one
                // went through and its answer was lost.
                Err(e) if matches!(code(&e), Some(404) | Some(409)) => break Err(()),
                Err(e) if transient(&e) && started.elapsed() < OP_DEADLINE => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("deleting pod {name}: {e}"),
            }
        };
        let after = match deleted {
            Ok(_) => 0,
            Err(()) => self.current_rv().await,
        };
        {
            let mut record = self.record.lock().unwrap();
            let p = record.pods.get_mut(&uid).unwrap();
            match deleted {
                Ok(rv) => {
                    // The answer to a DELETE carries the revision the deletion was committed at;
                    // the oracle's verdicts rest on it.
                    assert!(rv > before, "pod {name}: the DELETE answered revision {rv}, not after its last write {before}");
                    p.deleted_rv = Some(rv);
                }
                Err(()) => p.deleted_between = Some((before, after)),
            }
            p.leaked = !clean;
        }
        let mut view = self.view.lock().unwrap();
        view.live.remove(name);
        view.dead_names.push(name.to_string());
        drop(view);
        inc(if clean { &self.counters.pods_deleted_clean } else { &self.counters.pods_deleted_leaking });
    }

    /// The current etcd revision (a consistent LIST of one pod returns it).
    pub async fn current_rv(&self) -> u64 {
        let list = retry_write("reading the current revision", || async { self.pods.list_metadata(&ListParams::default().limit(1)).await }).await;
        rv_of(list.metadata.resource_version.as_ref())
    }

    // --- IPAM -------------------------------------------------------------------------------

    /// Keeps the driver off a block the fault injector owns.
    pub fn reserve_block(&self, name: &str) {
        self.reserved_blocks.lock().unwrap().insert(name.to_string());
    }

    /// The names of the blocks the driver knows, for the conflict storm.
    pub fn known_blocks(&self) -> Vec<String> {
        let reserved = self.reserved_blocks.lock().unwrap().clone();
        self.view.lock().unwrap().blocks.keys().filter(|b| !reserved.contains(*b)).cloned().collect()
    }

    /// A block to allocate from: one of `node`'s with room, sometimes another node's (borrowed),
    /// else a newly claimed one.
    async fn choose_block(&self, node: &str, family: Family, avoid: &[String]) -> (String, String) {
        let borrow = self.chance(0.15);
        let reserved = self.reserved_blocks.lock().unwrap().clone();
        let candidates: Vec<(String, String, bool)> = {
            let view = self.view.lock().unwrap();
            view.blocks
                .iter()
                .filter(|(name, b)| b.family == family && !b.full && !avoid.contains(name) && !reserved.contains(*name))
                .map(|(name, b)| (name.clone(), b.cidr.clone(), b.node == node))
                .collect()
        };
        let own: Vec<(String, String)> = candidates.iter().filter(|c| c.2).map(|c| (c.0.clone(), c.1.clone())).collect();
        let others: Vec<(String, String)> = candidates.iter().filter(|c| !c.2).map(|c| (c.0.clone(), c.1.clone())).collect();
        if borrow && let Some(b) = self.pick(&others) {
            inc(&self.counters.borrowed);
            return b;
        }
        if let Some(b) = own.first() {
            return b.clone();
        }
        self.claim_block(node, family).await
    }

    /// Claims a new block for `node` as the CNI does: the affinity, then the block affine to it.
    async fn claim_block(&self, node: &str, family: Family) -> (String, String) {
        for _ in 0..POOL_BLOCKS {
            // Round the pool: a block the GC released (empty) is claimed again later, as Calico would.
            let k = {
                let mut view = self.view.lock().unwrap();
                let next = view.next_block.entry(family).or_insert(0);
                let k = *next % POOL_BLOCKS;
                *next += 1;
                k
            };
            let cidr = block_cidr(family, k);
            let name = block_name(&cidr);
            let affinity = DynamicObject::new(&format!("{node}-{name}"), &calico_resource("BlockAffinity", "blockaffinities"))
                .data(json!({"spec": {"cidr": cidr, "node": node, "state": "confirmed", "type": "host", "deleted": "false"}}));
            let size = BLOCK_SIZE as usize;
            let block = DynamicObject::new(&name, &calico_resource("IPAMBlock", "ipamblocks")).data(json!({"spec": {
                "cidr": cidr, "affinity": format!("host:{node}"), "strictAffinity": false, "deleted": false,
                "allocations": vec![Value::Null; size], "unallocated": (0..size).collect::<Vec<_>>(), "attributes": [],
                "sequenceNumber": 0, "sequenceNumberForAllocation": {},
            }}));
            let created = retry_write(&format!("claiming block {cidr}"), || async {
                match self.blocks.create(&PostParams::default(), &block).await {
                    Ok(_) => Ok(true),
                    Err(e) if code(&e) == Some(409) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await;
            if !created {
                continue;
            }
            retry_write(&format!("creating the affinity of block {cidr}"), || async {
                match self.affinities.create(&PostParams::default(), &affinity).await {
                    Err(e) if code(&e) == Some(409) => Ok(()),
                    other => other.map(|_| ()),
                }
            })
            .await;
            self.view.lock().unwrap().blocks.insert(name.clone(), KnownBlock { cidr: cidr.clone(), family, node: node.to_string(), full: false });
            inc(&self.counters.blocks_claimed);
            return (name, cidr);
        }
        panic!("the {family:?} pool has no free block left");
    }

    /// One address for `handle` (pod `pod` on `node`): the handle counts it first, then the
    /// block gets it by compare-and-swap. A block that is full or gone is left for another (and
    /// the handle's count taken back).
    async fn allocate(&self, handle: &str, pod: &str, node: &str, family: Family, forced: Option<(&str, &str)>) -> Address {
        let mut avoid = Vec::new();
        // The count taken for a block that had no room is given back only after the next
        // block's is added, so the handle of a live pod never empties (and is never deleted).
        let mut give_back: Option<String> = None;
        loop {
            let (name, cidr) = match forced {
                Some((n, c)) => (n.to_string(), c.to_string()),
                None => self.choose_block(node, family, &avoid).await,
            };
            self.handle_add(handle, &cidr, 1).await;
            if let Some(old) = give_back.take() {
                self.handle_add(handle, &old, -1).await;
            }
            match self.assign(&name, &cidr, handle, pod, node).await {
                Some(ordinal) => {
                    inc(&self.counters.addresses);
                    return Address { block: name, ip: ordinal_ip(&cidr, ordinal), cidr, ordinal };
                }
                None => {
                    assert!(forced.is_none(), "the forced block {name} has no room");
                    give_back = Some(cidr);
                    avoid.push(name);
                }
            }
        }
    }

    /// Adds `delta` to the handle's count for `cidr` (creating it, or deleting it when its map
    /// empties), compare-and-swap on the handle.
    async fn handle_add(&self, handle: &str, cidr: &str, delta: i64) {
        let object = handle.to_lowercase();
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < OP_DEADLINE, "handle {handle} could not be written in {OP_DEADLINE:?}");
            let current = match self.handles.get_opt(&object).await {
                Ok(h) => h,
                Err(e) if transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => panic!("reading handle {handle}: {e}"),
            };
            let result = match current {
                None if delta > 0 => {
                    let h = DynamicObject::new(&object, &calico_resource("IPAMHandle", "ipamhandles"))
                        .data(json!({"spec": {"handleID": handle, "block": {cidr: delta}, "deleted": false}}));
                    self.handles.create(&PostParams::default(), &h).await.map(|_| ())
                }
                None => return,
                Some(mut h) => {
                    let count = h.data["spec"]["block"][cidr].as_i64().unwrap_or(0) + delta;
                    let map = h.data["spec"]["block"].as_object_mut().expect("a handle's block map");
                    if count > 0 {
                        map.insert(cidr.to_string(), json!(count));
                    } else {
                        map.remove(cidr);
                    }
                    if map.is_empty() {
                        let rv = h.metadata.resource_version.clone();
                        let dp = DeleteParams { preconditions: Some(Preconditions { resource_version: rv, uid: None }), ..Default::default() };
                        match self.handles.delete(&object, &dp).await {
                            Err(e) if code(&e) == Some(404) => Ok(()),
                            other => other.map(|_| ()),
                        }
                    } else {
                        self.handles.replace(&object, &PostParams::default(), &h).await.map(|_| ())
                    }
                }
            };
            match result {
                Ok(()) => return,
                Err(e) if code(&e) == Some(409) => inc(&self.counters.conflicts),
                Err(e) if transient(&e) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("writing handle {handle}: {e}"),
            }
        }
    }

    /// Takes the first free ordinal of block `name` for `handle`, compare-and-swap on the block,
    /// retried on conflict. `None` when the block is full or gone.
    async fn assign(&self, name: &str, cidr: &str, handle: &str, pod: &str, node: &str) -> Option<u32> {
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < OP_DEADLINE, "block {name} could not be written in {OP_DEADLINE:?}");
            let mut block = match self.blocks.get_opt(name).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.view.lock().unwrap().blocks.remove(name);
                    return None;
                }
                Err(e) if transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => panic!("reading block {name}: {e}"),
            };
            let spec = &mut block.data["spec"];
            if spec["deleted"] == json!(true) {
                return None;
            }
            let allocations_len = spec["allocations"].as_array().map_or(0, Vec::len);
            let mut unallocated: Vec<u64> = spec["unallocated"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
            let free = unallocated.iter().position(|o| (*o as usize) < allocations_len && spec["allocations"][*o as usize].is_null());
            let Some(at) = free else {
                if let Some(b) = self.view.lock().unwrap().blocks.get_mut(name) {
                    b.full = true;
                }
                return None;
            };
            let ordinal = unallocated.remove(at) as u32;
            let attrs = spec["attributes"].as_array_mut().expect("attributes");
            let timestamp = "2026-01-02 03:04:05.1 +0000 UTC";
            attrs.push(json!({"handle_id": handle, "secondary": {"namespace": self.namespace, "pod": pod, "node": node, "timestamp": timestamp}}));
            let index = attrs.len() - 1;
            spec["allocations"][ordinal as usize] = json!(index);
            spec["unallocated"] = json!(unallocated);
            let seq = spec["sequenceNumber"].as_u64().unwrap_or(0) + 1;
            spec["sequenceNumber"] = json!(seq);
            if !spec["sequenceNumberForAllocation"].is_object() {
                spec["sequenceNumberForAllocation"] = json!({});
            }
            spec["sequenceNumberForAllocation"][ordinal.to_string()] = json!(seq);
            match self.blocks.replace(name, &PostParams::default(), &block).await {
                Ok(_) => return Some(ordinal),
                Err(e) if code(&e) == Some(409) => inc(&self.counters.conflicts),
                Err(e) if code(&e) == Some(404) => {
                    self.view.lock().unwrap().blocks.remove(name);
                    return None;
                }
                Err(e) if transient(&e) => {
                    // The answer was lost: did the write land? Our handle at our ordinal says so.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(Some(b)) = self.blocks.get_opt(name).await
                        && attribute_handle(&b.data["spec"], ordinal) == Some(handle)
                    {
                        return Some(ordinal);
                    }
                }
                Err(e) => panic!("allocating in block {name} ({cidr}): {e}"),
            }
        }
    }

    /// The CNI DEL of one address: the ordinal is freed if it still holds `handle`, its
    /// attribute dropped, compare-and-swap on the block.
    async fn release(&self, a: &Address, handle: &str) {
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < OP_DEADLINE, "block {} could not be written in {OP_DEADLINE:?}", a.block);
            let mut block = match self.blocks.get_opt(&a.block).await {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) if transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => panic!("reading block {}: {e}", a.block),
            };
            let spec = &mut block.data["spec"];
            if attribute_handle(spec, a.ordinal) != Some(handle) {
                return;
            }
            free_ordinal(spec, a.ordinal);
            match self.blocks.replace(&a.block, &PostParams::default(), &block).await {
                Ok(_) => {
                    if let Some(b) = self.view.lock().unwrap().blocks.get_mut(&a.block) {
                        b.full = false;
                    }
                    return;
                }
                Err(e) if code(&e) == Some(409) => inc(&self.counters.conflicts),
                Err(e) if code(&e) == Some(404) => return,
                Err(e) if transient(&e) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => panic!("releasing {} in block {}: {e}", a.ip, a.block),
            }
        }
    }

    async fn release_handle(&self, life: &PodLife) {
        for a in &life.addresses {
            self.handle_add(&life.handle, &a.cidr, -1).await;
        }
    }

    // --- fault injection helpers ----------------------------------------------------------------

    /// A rogue writer frees the first address of live pod `name` (no teardown, the pod stays):
    /// exactly what the GC must never do, so the oracle must call it a violation. Returns the
    /// pod's handle.
    pub async fn rogue_release(&self, name: &str) -> String {
        let uid = self.pod_uid(name).expect("a live pod");
        let life = self.record.lock().unwrap().pods[&uid].clone();
        self.release(&life.addresses[0], &life.handle).await;
        life.handle
    }

    /// Writes `spec` to block `name` as it stands (no CAS retry): the fault injector's edits.
    pub async fn put_block(&self, name: &str, edit: impl Fn(&mut Value)) -> u64 {
        loop {
            let mut b = self.blocks.get(name).await.unwrap_or_else(|e| panic!("reading block {name}: {e}"));
            edit(&mut b.data["spec"]);
            match self.blocks.replace(name, &PostParams::default(), &b).await {
                Ok(b) => return rv_of(b.metadata.resource_version.as_ref()),
                Err(e) if code(&e) == Some(409) => continue,
                Err(e) => panic!("writing block {name}: {e}"),
            }
        }
    }

    /// Sets annotation `chaos/bump` on `name` (a metadata-only write: a new revision, nothing
    /// else changed), compare-and-swap retried on conflict. Returns the new revision, `None` if
    /// the object is gone. The conflict storm and the oracle's sync point use it.
    pub async fn bump(api: &Api<DynamicObject>, name: &str, n: u64) -> Result<Option<u64>, kube::Error> {
        loop {
            let Some(mut o) = api.get_opt(name).await? else { return Ok(None) };
            o.metadata.annotations.get_or_insert_with(Default::default).insert("chaos/bump".into(), n.to_string());
            match api.replace(name, &PostParams::default(), &o).await {
                Ok(o) => return Ok(Some(rv_of(o.metadata.resource_version.as_ref()))),
                Err(e) if code(&e) == Some(409) => continue,
                Err(e) if code(&e) == Some(404) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn blocks_api(&self) -> &Api<DynamicObject> {
        &self.blocks
    }

    pub fn handles_api(&self) -> &Api<DynamicObject> {
        &self.handles
    }

    pub fn pod_uid(&self, name: &str) -> Option<String> {
        self.view.lock().unwrap().live.get(name).map(|(uid, _)| uid.clone())
    }
}

/// The handle ID at `ordinal` of a block spec, if the ordinal is allocated.
pub fn attribute_handle(spec: &Value, ordinal: u32) -> Option<&str> {
    let index = spec["allocations"].get(ordinal as usize)?.as_u64()?;
    spec["attributes"].get(index as usize)?["handle_id"].as_str()
}

/// Frees `ordinal` in a block spec as libcalico does: back on the unallocated list, its sequence
/// number dropped, attributes no ordinal refers to any more removed (and the others renumbered).
fn free_ordinal(spec: &mut Value, ordinal: u32) {
    spec["allocations"][ordinal as usize] = Value::Null;
    if let Some(u) = spec["unallocated"].as_array_mut() {
        u.push(json!(ordinal));
    }
    if let Some(m) = spec["sequenceNumberForAllocation"].as_object_mut() {
        m.remove(&ordinal.to_string());
    }
    let seq = spec["sequenceNumber"].as_u64().unwrap_or(0) + 1;
    spec["sequenceNumber"] = json!(seq);
    let allocations: Vec<Option<u64>> = spec["allocations"].as_array().map(|a| a.iter().map(Value::as_u64).collect()).unwrap_or_default();
    let attributes = spec["attributes"].as_array().cloned().unwrap_or_default();
    let mut renumber: HashMap<u64, u64> = HashMap::new();
    let mut kept = Vec::new();
    for (i, attr) in attributes.into_iter().enumerate() {
        if allocations.contains(&Some(i as u64)) {
            renumber.insert(i as u64, kept.len() as u64);
            kept.push(attr);
        }
    }
    for (o, a) in allocations.iter().enumerate() {
        if let Some(a) = a {
            spec["allocations"][o] = json!(renumber[a]);
        }
    }
    spec["attributes"] = Value::Array(kept);
}

/// Runs a write until it succeeds, waiting out transient failures (the apiserver or etcd
/// restarting) for up to [`OP_DEADLINE`]; any other error fails the test.
async fn retry_write<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if transient(&e) && started.elapsed() < OP_DEADLINE => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_and_addresses_follow_calico() {
        assert_eq!(block_cidr(Family::V4, 5), "10.80.1.64/26");
        assert_eq!(block_name("10.80.1.64/26"), "10-80-1-64-26");
        assert_eq!(block_cidr(Family::V6, 1), "fd80::40/122");
        assert_eq!(block_name("fd80::40/122"), "fd80--40-122");
        assert_eq!(ordinal_ip("10.80.1.64/26", 3), "10.80.1.67");
        assert_eq!(ordinal_ip("fd80::40/122", 1), "fd80::41");
    }

    #[test]
    fn freeing_an_ordinal_compacts_the_attributes() {
        let mut spec = json!({"allocations": [0, null, 1], "unallocated": [1], "attributes": [{"handle_id": "a"}, {"handle_id": "b"}], "sequenceNumber": 3, "sequenceNumberForAllocation": {"0": 1, "2": 2}});
        free_ordinal(&mut spec, 0);
        assert_eq!(spec["allocations"], json!([null, null, 0]));
        assert_eq!(spec["attributes"], json!([{"handle_id": "b"}]));
        assert_eq!(spec["unallocated"], json!([1, 0]));
        assert_eq!(attribute_handle(&spec, 2), Some("b"));
    }
}
