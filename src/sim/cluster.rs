//! The synthetic cluster generator: pools, nodes, pods, blocks, affinities and handles, with leaks
//! planted in known places and the ground truth of every allocation recorded as it is built.
//!
//! Owns: the layout (which block holds which address), the planted categories and their fates
//! (released or kept at the end of the simulated pipeline), and the scripted events (pods and a
//! node deleted after the first pass).
//! Must not: ask the GC what is garbage. Every fate here follows from how the item was built and
//! the documented rules (SPEC §5, Part A), so the checker can hold the GC to it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use super::rng::{name_suffix, SplitMix64};
use super::{SimError, SimOptions};
use crate::datastore::memory::CompactHandle;
use crate::model::block::{self, AllocationAttribute, AttrMap, WINDOWS_RESERVED_HANDLE};
use crate::model::handle::BlockCounts;
use crate::model::names::{affinity_name, cidr_to_name};
use crate::model::node::NodeMeta;
use crate::model::pod::{PodIp, PodMeta, PodObject, PodState, PodView, PodSpecLite, PodStatusLite, ANNOTATION_POD_IP, ANNOTATION_POD_IPS};
use crate::model::pool::IpPoolSpec;
use crate::model::time::{format_rfc3339, Millis};
use crate::model::{affinity, BlockAffinity, BlockAffinitySpec, IpPool, IpamBlock, IpamBlockSpec, NodeLite, PodFacts, PodLite};

/// Addresses per block: /26 for IPv4 and /122 for IPv6, Calico's defaults.
pub const BLOCK_ADDRS: u32 = 64;
const V4_BLOCK_PREFIX: u8 = 26;
const V6_BLOCK_PREFIX: u8 = 122;
/// Allocations placed per block before opening the next: leaves ~12% of every block free, as in a
/// cluster that has seen churn, so borrowed and re-created pods fit.
const FILL: usize = 56;
/// Windows blocks hold Calico's reservation in the first three ordinals and the last one.
const WINDOWS_RESERVED: [u32; 4] = [0, 1, 2, BLOCK_ADDRS - 1];
/// When the synthetic objects were created (pods, blocks); `T0` in the pipeline is later.
pub const CREATED_AT: Millis = 1_788_854_400_000; // 2026-09-08T08:00:00Z
/// Shares of the per-pod leak fraction: deleted pods, finished pods, re-created pods with a stale IP.
const SHARE_DELETED: f64 = 0.4;
const SHARE_FINISHED: f64 = 0.3;
/// Share of live pods whose IPv4 address is borrowed from another node's block.
const BORROW_FRACTION: f64 = 0.04;
/// Share of live pods that have an allocation but do not report it yet (the CNI ran, the kubelet not).
const PENDING_FRACTION: f64 = 0.02;
/// Share of nodes that run dual-stack pods.
const DUAL_STACK_NODES: f64 = 0.25;
/// Sequence numbers are seeded like Calico's: UnixNano at block creation.
const SEQ_BASE: u64 = 1_788_854_400_000_000_000;

const NAMESPACES: [&str; 10] =
    ["default", "kube-system", "monitoring", "payments", "checkout", "search", "batch-jobs", "ingress", "data", "ml-serving"];
const APPS: [&str; 6] = ["api", "web", "worker", "cache", "exporter", "gateway"];

/// What a planted allocation is. The fate of each is fixed by construction (see [`Category::released`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    // Kept.
    LivePod,
    DualStackPod,
    BorrowedIp,
    PendingNoIp,
    /// Part A: a live pod reports the IP, the allocation names another (live) node.
    WrongNodeAttr,
    Tunnel,
    WindowsReserved,
    /// No pod or tunnel attributes on a deleted node: never released, and it holds the node.
    UnknownOwner,
    /// The tunnel of that held node: released only with the node.
    HeldNodeTunnel,
    // Released.
    PodDeleted,
    PodFinished,
    /// The pod was re-created and reports a newer IP; the old allocation names it still.
    StaleIp,
    DeletedNodePod,
    DeletedNodeTunnel,
    /// Live at the first pass, deleted before the incremental pass.
    LateDeletedPod,
    LateDeletedNodePod,
    LateDeletedNodeTunnel,
}

impl Category {
    pub const ALL: [Category; 17] = [
        Category::LivePod,
        Category::DualStackPod,
        Category::BorrowedIp,
        Category::PendingNoIp,
        Category::WrongNodeAttr,
        Category::Tunnel,
        Category::WindowsReserved,
        Category::UnknownOwner,
        Category::HeldNodeTunnel,
        Category::PodDeleted,
        Category::PodFinished,
        Category::StaleIp,
        Category::DeletedNodePod,
        Category::DeletedNodeTunnel,
        Category::LateDeletedPod,
        Category::LateDeletedNodePod,
        Category::LateDeletedNodeTunnel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::LivePod => "live-pod",
            Category::DualStackPod => "dual-stack-pod",
            Category::BorrowedIp => "borrowed-ip",
            Category::PendingNoIp => "pending-no-ip",
            Category::WrongNodeAttr => "wrong-node-attr",
            Category::Tunnel => "tunnel",
            Category::WindowsReserved => "windows-reserved",
            Category::UnknownOwner => "unknown-owner",
            Category::HeldNodeTunnel => "held-node-tunnel",
            Category::PodDeleted => "pod-deleted",
            Category::PodFinished => "pod-finished",
            Category::StaleIp => "stale-ip",
            Category::DeletedNodePod => "deleted-node-pod",
            Category::DeletedNodeTunnel => "deleted-node-tunnel",
            Category::LateDeletedPod => "late-deleted-pod",
            Category::LateDeletedNodePod => "late-deleted-node-pod",
            Category::LateDeletedNodeTunnel => "late-deleted-node-tunnel",
        }
    }

    /// Whether the pipeline must have released it by the end (grace 15 min, two full passes,
    /// the second after the grace period).
    pub fn released(self) -> bool {
        matches!(
            self,
            Category::PodDeleted
                | Category::PodFinished
                | Category::StaleIp
                | Category::DeletedNodePod
                | Category::DeletedNodeTunnel
                | Category::LateDeletedPod
                | Category::LateDeletedNodePod
                | Category::LateDeletedNodeTunnel
        )
    }
}

/// One planted allocation group: every address of one handle (two for a dual-stack pod). The
/// handle itself is known to the generator only: the truth a run is checked against is what
/// each address is, and a cluster keeps one of these for every allocation.
#[derive(Debug, Clone)]
pub struct Planted {
    pub category: Category,
    pub ips: Vec<IpAddr>,
}

/// Starts a planted group of `handle`'s addresses; returns its position.
fn plant(planted: &mut Vec<Planted>, handles: &mut Vec<String>, category: Category, handle: &str) -> usize {
    planted.push(Planted { category, ips: Vec::new() });
    handles.push(handle.to_string());
    planted.len() - 1
}

/// A pod as the generator knows it: enough to give the index its facts and to print it as
/// `kubectl get pods -o json` does.
#[derive(Debug, Clone)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub app: String,
    pub template_hash: String,
    pub container_id: String,
    pub phase: &'static str,
    /// IPs in `status.podIP(s)`; empty for a pod whose IP is not reported yet.
    pub status_ips: Vec<IpAddr>,
    /// IPs in Calico's `podIP(s)` annotations (set as soon as the CNI ran).
    pub annotation_ips: Vec<IpAddr>,
}

impl SimPod {
    /// The fields the GC reads, as a pod read from the API would carry them.
    pub fn lite(&self) -> PodLite {
        let mut annotations = BTreeMap::new();
        if let Some(first) = self.annotation_ips.first() {
            annotations.insert(ANNOTATION_POD_IP.to_string(), host_cidr(*first));
            annotations.insert(
                ANNOTATION_POD_IPS.to_string(),
                self.annotation_ips.iter().map(|ip| host_cidr(*ip)).collect::<Vec<_>>().join(","),
            );
        }
        PodLite {
            metadata: PodMeta {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
                uid: self.uid.clone(),
                deletion_timestamp: None,
                annotations,
            },
            spec: PodSpecLite { node_name: self.node.clone(), host_network: false },
            status: PodStatusLite {
                phase: self.phase.to_string(),
                reason: String::new(),
                pod_ip: self.status_ips.first().map(|i| i.to_string()).unwrap_or_default(),
                pod_ips: self.status_ips.iter().map(|i| PodIp { ip: i.to_string() }).collect(),
            },
        }
    }

    pub fn facts(&self) -> PodFacts {
        PodFacts::from_lite(&self.lite()).0
    }
}

/// A generated pod's facts as the index reads them ([`PodView`]), in the fewest bytes: the
/// namespace and node names shared with every pod in the same one, the addresses inline. The
/// uid, which the index does not keep, is left out; the pod it came from has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimPodFacts {
    namespace: Arc<str>,
    name: Box<str>,
    node: Arc<str>,
    ips: [IpAddr; 2],
    ip_count: u8,
    state: PodState,
}

impl PodObject for SimPodFacts {
    fn view(&self) -> PodView<'_> {
        PodView { namespace: &self.namespace, name: &self.name, node: &self.node, ips: &self.ips[..usize::from(self.ip_count)], state: self.state }
    }
}

/// Gives each distinct name one shared copy.
#[derive(Default)]
pub(super) struct NameTable(std::collections::HashSet<Arc<str>>);

impl NameTable {
    pub(super) fn of(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.0.get(name) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(name);
        self.0.insert(Arc::clone(&a));
        a
    }
}

impl SimPodFacts {
    /// `facts` without its uid; `None` for a pod with more than two addresses (a generated pod
    /// has one of each family at most).
    pub(super) fn of(facts: &PodFacts, names: &mut NameTable) -> Option<SimPodFacts> {
        let mut ips = [IpAddr::V4(Ipv4Addr::UNSPECIFIED); 2];
        ips.get_mut(..facts.ips.len())?.copy_from_slice(&facts.ips);
        Some(SimPodFacts {
            namespace: names.of(&facts.namespace),
            name: facts.name.as_str().into(),
            node: names.of(&facts.node),
            ips,
            ip_count: facts.ips.len() as u8,
            state: facts.state(),
        })
    }
}

/// `10.0.0.5/32`, `fd00::5/128`: how Calico writes addresses into pod annotations.
pub fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// Object-level fates, by construction.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// Blocks (and their affinities) that must be gone: planted empty second blocks, and every
    /// block of a released node.
    pub removed_blocks: BTreeSet<IpNet>,
    pub empty_blocks: BTreeSet<IpNet>,
    pub deleted_node_blocks: BTreeSet<IpNet>,
    pub removed_affinities: BTreeSet<String>,
    /// Handle IDs that must be gone: orphans and the handles of released groups.
    pub removed_handles: BTreeSet<String>,
    pub orphan_handles: BTreeSet<String>,
}

/// What happens after the first pass, in order.
#[derive(Debug, Clone, Default)]
pub struct Events {
    /// `(namespace, name)` of pods deleted before the incremental pass.
    pub deleted_pods: Vec<(String, String)>,
    /// A node deleted (with its pods) before the node-deletion pass.
    pub deleted_node: Option<String>,
    pub deleted_node_pods: Vec<(String, String)>,
}

/// The whole synthetic cluster before any GC ran.
#[derive(Debug, Clone, Default)]
pub struct SyntheticCluster {
    pub seed: u64,
    pub pools: Vec<IpPool>,
    /// Nodes that exist at the start (the late-deleted node included).
    pub nodes: Vec<NodeLite>,
    /// Pods that exist at the start, and their facts in the same order.
    pub pods: Vec<SimPod>,
    pub pod_facts: Vec<SimPodFacts>,
    pub namespaces: Vec<String>,
    pub blocks: Vec<IpamBlock>,
    pub affinities: Vec<BlockAffinity>,
    /// In the form the memory datastore holds them, which takes them as they are.
    pub handles: Vec<Arc<CompactHandle>>,
    pub planted: Vec<Planted>,
    pub expect: Expectations,
    pub events: Events,
    /// Nodes deleted before the start (their Node objects are absent).
    pub deleted_nodes: Vec<String>,
    pub windows_nodes: BTreeSet<String>,
}

impl SyntheticCluster {
    pub fn allocation_count(&self) -> usize {
        self.blocks.iter().map(|b| b.spec.allocations.iter().flatten().count()).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Plain,
    Deleted,
    /// Deleted, holding an allocation of unknown owner.
    Held,
    /// Deleted after the first pass.
    Late,
    Windows,
}

struct Req {
    handle: String,
    /// Held as the block will hold it: a map of strings would cost half a kilobyte an address
    /// while every host's requests wait for their blocks.
    attrs: AttrMap,
    planted: usize,
}

#[derive(Default)]
struct HostReqs {
    v4: Vec<Req>,
    v6: Vec<Req>,
}

struct PodPlan {
    pod: SimPod,
    /// The planted group whose addresses the pod reports.
    planted: usize,
    reports_status: bool,
    late_candidate: bool,
}

fn pod_attrs(ns: &str, pod: &str, node: &str, timestamp: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("namespace".to_string(), ns.to_string()),
        ("node".to_string(), node.to_string()),
        ("pod".to_string(), pod.to_string()),
        ("timestamp".to_string(), timestamp.to_string()),
    ])
}

fn tunnel_attrs(node: &str, typ: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("node".to_string(), node.to_string()), ("type".to_string(), typ.to_string())])
}

/// Go's `time.Time.String()` form, which Calico's CNI writes into `timestamp`.
fn go_time(ms: Millis) -> String {
    let base = format_rfc3339(ms);
    format!("{} {}.{:09} +0000 UTC", &base[..10], &base[11..19], (ms % 1000) * 1_000_000)
}

fn uuid(rng: &mut SplitMix64) -> String {
    let h = rng.hex64();
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn ceil_log2(n: usize) -> u32 {
    if n <= 1 { 0 } else { usize::BITS - (n - 1).leading_zeros() }
}

/// Builds the cluster for `opts`. Same options, same cluster.
pub fn generate(opts: &SimOptions) -> Result<SyntheticCluster, SimError> {
    if opts.nodes == 0 {
        return Err(SimError::Options("--nodes must be at least 1".into()));
    }
    if !(0.0..=0.5).contains(&opts.leak_fraction) {
        return Err(SimError::Options(format!("--leak-fraction {} is outside 0..=0.5", opts.leak_fraction)));
    }
    let mut rng = SplitMix64::new(opts.seed);
    let n = opts.nodes;
    let node_names: Vec<String> = (0..n).map(|i| format!("sim-node-{i:05}")).collect();

    // Roles: node 0 always stays plain (a borrow host and a wrong-node target exist).
    let mut roles = vec![Role::Plain; n];
    let mut order: Vec<usize> = (1..n).collect();
    rng.shuffle(&mut order);
    let take = |count: usize, role: Role, roles: &mut Vec<Role>, order: &mut Vec<usize>| {
        for _ in 0..count {
            // Keep at least two plain nodes besides node 0 when there are enough nodes.
            if order.len() <= 2 {
                return;
            }
            if let Some(i) = order.pop() {
                roles[i] = role;
            }
        }
    };
    let deleted = if opts.leak_fraction > 0.0 { ((n as f64 * opts.leak_fraction / 2.0).ceil() as usize).max(1) } else { 0 };
    take(deleted, Role::Deleted, &mut roles, &mut order);
    take(1, Role::Held, &mut roles, &mut order);
    take(1, Role::Late, &mut roles, &mut order);
    take(((n as f64 * 0.02).ceil() as usize).max(1), Role::Windows, &mut roles, &mut order);
    let plain: Vec<usize> = (0..n).filter(|i| roles[*i] == Role::Plain).collect();
    let dual: Vec<bool> = (0..n).map(|i| roles[i] != Role::Windows && rng.chance(DUAL_STACK_NODES)).collect();
    let empty_second: BTreeSet<usize> = {
        let mut p = plain.clone();
        rng.shuffle(&mut p);
        p.into_iter().take(((n as f64 * 0.03).ceil() as usize).max(1)).collect()
    };

    let template_hashes: Vec<Vec<String>> = NAMESPACES.iter().map(|_| APPS.iter().map(|_| rng.alnum(10)).collect()).collect();
    let mut hosts: Vec<HostReqs> = (0..n).map(|_| HostReqs::default()).collect();
    let mut planted: Vec<Planted> = Vec::new();
    // The handle of each planted group, by position.
    let mut planted_handles: Vec<String> = Vec::new();
    let mut pod_plans: Vec<PodPlan> = Vec::new();
    let mut pod_counter: u64 = 0;
    let lf = opts.leak_fraction;

    for (ni, node) in node_names.iter().enumerate() {
        let role = roles[ni];
        // Tunnels first, so they take the first ordinal of the node's first block(s).
        let (v4_tunnel_type, v4_tunnel_handle) = if role == Role::Windows || rng.chance(0.5) {
            ("vxlanTunnelAddress", format!("vxlan-tunnel-addr-{node}"))
        } else {
            ("ipipTunnelAddress", format!("ipip-tunnel-addr-{node}"))
        };
        let tunnel_cat = match role {
            Role::Plain | Role::Windows => Category::Tunnel,
            Role::Deleted => Category::DeletedNodeTunnel,
            Role::Held => Category::HeldNodeTunnel,
            Role::Late => Category::LateDeletedNodeTunnel,
        };
        let mut tunnels = vec![(v4_tunnel_type, v4_tunnel_handle, false)];
        if dual[ni] {
            tunnels.push(("vxlanV6TunnelAddress", format!("vxlan-v6-tunnel-addr-{node}"), true));
        }
        for (typ, h, v6) in tunnels {
            let idx = plant(&mut planted, &mut planted_handles, tunnel_cat, &h);
            let req = Req { handle: h, attrs: tunnel_attrs(node, typ).into(), planted: idx };
            if v6 { hosts[ni].v6.push(req) } else { hosts[ni].v4.push(req) }
        }
        if role == Role::Held {
            for _ in 0..2 {
                let h = format!("dhcp-lease.{}", &rng.hex64()[..16]);
                let idx = plant(&mut planted, &mut planted_handles, Category::UnknownOwner, &h);
                let attrs = BTreeMap::from([("node".to_string(), node.clone()), ("owner".to_string(), "external-dhcp".to_string())]);
                hosts[ni].v4.push(Req { handle: h, attrs: attrs.into(), planted: idx });
            }
        }

        for _ in 0..opts.pods_per_node {
            let nsi = rng.below(NAMESPACES.len());
            let ai = rng.below(APPS.len());
            let ns = NAMESPACES[nsi];
            let app = APPS[ai];
            let template_hash = template_hashes[nsi][ai].clone();
            let name = format!("{app}-{template_hash}-{}", name_suffix(pod_counter, 5));
            pod_counter += 1;
            let created = CREATED_AT + rng.below(86_400_000) as Millis;
            let timestamp = go_time(created);
            let roll = rng.unit();
            let live_node = matches!(role, Role::Plain | Role::Windows | Role::Late);
            let (category, pod_present) = match role {
                Role::Deleted | Role::Held => (Category::DeletedNodePod, false),
                Role::Late => (Category::LateDeletedNodePod, true),
                _ if roll < lf * SHARE_DELETED => (Category::PodDeleted, false),
                _ if roll < lf * (SHARE_DELETED + SHARE_FINISHED) => (Category::PodFinished, true),
                _ => (Category::LivePod, true),
            };
            let stale = live_node && role != Role::Late && category == Category::LivePod && roll < lf;
            let pending = category == Category::LivePod && !stale && rng.chance(PENDING_FRACTION);
            let borrow_host = if matches!(role, Role::Plain | Role::Windows) && rng.chance(BORROW_FRACTION) && plain.len() > 1 {
                let mut h = plain[rng.below(plain.len())];
                if h == ni {
                    h = plain[(plain.iter().position(|x| *x == h).unwrap_or(0) + 1) % plain.len()];
                }
                Some(h)
            } else {
                None
            };
            let category = match category {
                Category::LivePod if pending => Category::PendingNoIp,
                Category::LivePod if borrow_host.is_some() => Category::BorrowedIp,
                Category::LivePod if dual[ni] => Category::DualStackPod,
                c => c,
            };
            let container_id = rng.hex64();
            let handle = format!("k8s-pod-network.{container_id}");
            let idx = plant(&mut planted, &mut planted_handles, category, &handle);
            let attrs: AttrMap = pod_attrs(ns, &name, node, &timestamp).into();
            hosts[borrow_host.unwrap_or(ni)].v4.push(Req { handle: handle.clone(), attrs: attrs.clone(), planted: idx });
            if dual[ni] {
                hosts[ni].v6.push(Req { handle, attrs: attrs.clone(), planted: idx });
            }
            if stale {
                // The pod's previous incarnation: same name, older container, another address.
                let old_cid = rng.hex64();
                let old_handle = format!("k8s-pod-network.{old_cid}");
                let sidx = plant(&mut planted, &mut planted_handles, Category::StaleIp, &old_handle);
                hosts[ni].v4.push(Req { handle: old_handle, attrs: pod_attrs(ns, &name, node, &go_time(created - 3_600_000)).into(), planted: sidx });
            }
            if pod_present {
                let phase = match category {
                    Category::PodFinished if rng.chance(0.5) => "Failed",
                    Category::PodFinished => "Succeeded",
                    Category::PendingNoIp => "Pending",
                    _ => "Running",
                };
                pod_plans.push(PodPlan {
                    pod: SimPod {
                        namespace: ns.to_string(),
                        name,
                        uid: uuid(&mut rng),
                        node: node.clone(),
                        app: app.to_string(),
                        template_hash,
                        container_id,
                        phase,
                        status_ips: Vec::new(),
                        annotation_ips: Vec::new(),
                    },
                    planted: idx,
                    reports_status: category != Category::PendingNoIp,
                    late_candidate: role == Role::Plain && matches!(category, Category::LivePod | Category::DualStackPod) && !stale,
                });
            }
        }
    }

    // Part A: a live pod reports an IP whose allocation names another live node. The target node
    // is plain, so it is never deleted and never blocks a node release.
    let wrong_count = (n / 50).max(1);
    for k in 0..wrong_count {
        if plain.len() < 2 {
            break;
        }
        let a = plain[(k * 7) % plain.len()];
        let b = plain[(k * 7 + 1) % plain.len()];
        let (ns, app) = (NAMESPACES[k % NAMESPACES.len()], APPS[k % APPS.len()]);
        let template_hash = rng.alnum(10);
        let name = format!("{app}-{template_hash}-{}", name_suffix(pod_counter, 5));
        pod_counter += 1;
        let container_id = rng.hex64();
        let handle = format!("k8s-pod-network.{container_id}");
        let idx = plant(&mut planted, &mut planted_handles, Category::WrongNodeAttr, &handle);
        hosts[a].v4.push(Req { handle, attrs: pod_attrs(ns, &name, &node_names[b], &go_time(CREATED_AT)).into(), planted: idx });
        pod_plans.push(PodPlan {
            pod: SimPod {
                namespace: ns.to_string(),
                name,
                uid: uuid(&mut rng),
                node: node_names[a].clone(),
                app: app.to_string(),
                template_hash,
                container_id,
                phase: "Running",
                status_ips: Vec::new(),
                annotation_ips: Vec::new(),
            },
            planted: idx,
            reports_status: true,
            late_candidate: false,
        });
    }

    // Layout: pack every host's requests into its blocks.
    let v4_blocks_needed: usize = hosts.iter().enumerate().map(|(i, h)| h.v4.len().div_ceil(FILL).max(1) + usize::from(empty_second.contains(&i))).sum();
    let v4_bits = ceil_log2(v4_blocks_needed.max(1));
    if v4_bits > 18 {
        return Err(SimError::Options(format!("{v4_blocks_needed} IPv4 blocks do not fit in 10.0.0.0/8")));
    }
    let v4_pool = Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), (V4_BLOCK_PREFIX - v4_bits as u8).min(16)).map_err(|e| SimError::Options(e.to_string()))?;
    let v6_pool = Ipv6Net::new("fd00:a1b2:c3d4:1::".parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::UNSPECIFIED), 64).map_err(|e| SimError::Options(e.to_string()))?;
    let mut next_v4: u32 = 0;
    let mut next_v6: u128 = 0;
    let mut blocks: Vec<IpamBlock> = Vec::new();
    let mut affinities: Vec<BlockAffinity> = Vec::new();
    let mut handle_counts: BTreeMap<String, BlockCounts> = BTreeMap::new();
    let mut expect = Expectations::default();

    for (ni, node) in node_names.iter().enumerate() {
        let role = roles[ni];
        let windows = role == Role::Windows;
        for v6 in [false, true] {
            let reqs = if v6 { std::mem::take(&mut hosts[ni].v6) } else { std::mem::take(&mut hosts[ni].v4) };
            let mut count = reqs.len().div_ceil(FILL);
            if !v6 {
                count = count.max(1) + usize::from(empty_second.contains(&ni));
            }
            let mut chunks = reqs.chunks(FILL);
            for bi in 0..count {
                let cidr: IpNet = if v6 {
                    let base = u128::from(v6_pool.network()) + next_v6 * u128::from(BLOCK_ADDRS);
                    next_v6 += 1;
                    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(base), V6_BLOCK_PREFIX).map_err(|e| SimError::Options(e.to_string()))?)
                } else {
                    let base = u32::from(v4_pool.network()) + next_v4 * BLOCK_ADDRS;
                    next_v4 += 1;
                    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), V4_BLOCK_PREFIX).map_err(|e| SimError::Options(e.to_string()))?)
                };
                let chunk: &[Req] = chunks.next().unwrap_or(&[]);
                let block_index = blocks.len() as u64;
                let seq_base = SEQ_BASE + block_index * 1_000;
                let mut allocations: Vec<Option<u32>> = vec![None; BLOCK_ADDRS as usize];
                let mut attributes: Vec<AllocationAttribute> = Vec::new();
                let mut seqs: BTreeMap<String, u64> = BTreeMap::new();
                let reserved: &[u32] = if windows && !v6 { &WINDOWS_RESERVED } else { &[] };
                if !reserved.is_empty() {
                    attributes.push(AllocationAttribute {
                        handle_id: Some(WINDOWS_RESERVED_HANDLE.to_string()),
                        secondary: Some(BTreeMap::from([("note".to_string(), "windows reserved".to_string())]).into()),
                        ..AllocationAttribute::default()
                    });
                    for (k, ord) in reserved.iter().enumerate() {
                        allocations[*ord as usize] = Some(0);
                        seqs.insert(ord.to_string(), seq_base + k as u64);
                    }
                    handle_counts.entry(WINDOWS_RESERVED_HANDLE.to_string()).or_default().add(&cidr.to_string(), reserved.len() as u32);
                    let idx = plant(&mut planted, &mut planted_handles, Category::WindowsReserved, WINDOWS_RESERVED_HANDLE);
                    planted[idx].ips = reserved.iter().map(|o| crate::model::names::ordinal_to_ip(&cidr, *o)).collect();
                }
                let mut free_ords = (0..BLOCK_ADDRS).filter(|o| !reserved.contains(o));
                let cidr_text = cidr.to_string();
                for req in chunk {
                    let ord = free_ords.next().ok_or_else(|| SimError::Options("block overflow".into()))?;
                    allocations[ord as usize] = Some(attributes.len() as u32);
                    attributes.push(AllocationAttribute { handle_id: Some(req.handle.clone()), secondary: Some(req.attrs.clone()), ..AllocationAttribute::default() });
                    seqs.insert(ord.to_string(), seq_base + 10 + u64::from(ord));
                    planted[req.planted].ips.push(crate::model::names::ordinal_to_ip(&cidr, ord));
                    handle_counts.entry(req.handle.clone()).or_default().add(&cidr_text, 1);
                }
                let unallocated: Vec<u32> = (0..BLOCK_ADDRS).filter(|o| allocations[*o as usize].is_none()).collect();
                let claim = format_rfc3339(CREATED_AT - 30 * 86_400_000 + block_index as Millis * 1000);
                let spec = IpamBlockSpec {
                    cidr: cidr.to_string(),
                    affinity: Some(format!("host:{node}")),
                    affinity_claim_time: Some(claim),
                    allocations,
                    unallocated,
                    attributes,
                    sequence_number: seq_base + 500,
                    sequence_number_for_allocation: seqs,
                    deleted: false,
                    strict_affinity: false,
                    extra: BTreeMap::new(),
                };
                blocks.push(IpamBlock::new(block::KIND, &cidr_to_name(&cidr), spec));
                let aff_name = affinity_name(node, &cidr);
                affinities.push(BlockAffinity::new(
                    affinity::KIND,
                    &aff_name,
                    BlockAffinitySpec {
                        state: "confirmed".into(),
                        node: node.clone(),
                        affinity_type: "host".into(),
                        cidr: cidr.to_string(),
                        deleted: false,
                        extra: BTreeMap::new(),
                    },
                ));
                let planted_empty = !v6 && bi == count - 1 && empty_second.contains(&ni);
                if planted_empty {
                    expect.empty_blocks.insert(cidr);
                }
                if matches!(role, Role::Deleted | Role::Late) {
                    expect.deleted_node_blocks.insert(cidr);
                }
                if planted_empty || matches!(role, Role::Deleted | Role::Late) {
                    expect.removed_blocks.insert(cidr);
                    expect.removed_affinities.insert(aff_name);
                }
            }
        }
    }

    // Orphan handles: a handle object that no allocation refers to (the CNI crashed between
    // writing the handle and the block).
    let orphan_count = 1 + n / 1000;
    let orphan_block = blocks.first().map(|b| b.spec.cidr.clone()).unwrap_or_default();
    for _ in 0..orphan_count {
        let h = format!("k8s-pod-network.{}", rng.hex64());
        handle_counts.entry(h.clone()).or_default().insert(orphan_block.clone(), 1);
        expect.orphan_handles.insert(h.clone());
        expect.removed_handles.insert(h);
    }
    for (p, h) in planted.iter().zip(&planted_handles) {
        if p.category.released() {
            expect.removed_handles.insert(h.clone());
        }
    }
    let handles: Vec<Arc<CompactHandle>> = handle_counts.into_iter().map(|(id, block)| Arc::new(CompactHandle::new(&id, &block))).collect();

    // Pods' reported IPs come from where their addresses landed; IPv4 first, as the kubelet lists them.
    let mut events = Events::default();
    let mut late_pool: Vec<usize> = Vec::new();
    for (i, plan) in pod_plans.iter_mut().enumerate() {
        let mut ips = planted[plan.planted].ips.clone();
        ips.sort_by_key(|ip| ip.is_ipv6());
        plan.pod.annotation_ips = ips.clone();
        if plan.reports_status {
            plan.pod.status_ips = ips;
        }
        if plan.late_candidate {
            late_pool.push(i);
        }
    }
    rng.shuffle(&mut late_pool);
    let late_count = if lf > 0.0 { ((pod_plans.len() as f64 * lf / 2.0).ceil() as usize).max(1) } else { 1 };
    let mut late: Vec<usize> = late_pool.into_iter().take(late_count).collect();
    late.sort_unstable();
    for i in late {
        let plan = &pod_plans[i];
        planted[plan.planted].category = Category::LateDeletedPod;
        expect.removed_handles.insert(planted_handles[plan.planted].clone());
        events.deleted_pods.push((plan.pod.namespace.clone(), plan.pod.name.clone()));
    }
    if let Some(li) = roles.iter().position(|r| *r == Role::Late) {
        events.deleted_node = Some(node_names[li].clone());
        events.deleted_node_pods =
            pod_plans.iter().filter(|p| p.pod.node == node_names[li]).map(|p| (p.pod.namespace.clone(), p.pod.name.clone())).collect();
    }

    let nodes: Vec<NodeLite> = (0..n)
        .filter(|i| !matches!(roles[*i], Role::Deleted | Role::Held))
        .map(|i| NodeLite { metadata: NodeMeta { name: node_names[i].clone(), labels: BTreeMap::new() } })
        .collect();
    let deleted_nodes = (0..n).filter(|i| matches!(roles[*i], Role::Deleted | Role::Held)).map(|i| node_names[i].clone()).collect();
    let pools = vec![
        IpPool::new("IPPool", "default-ipv4-ippool", IpPoolSpec {
            cidr: v4_pool.to_string(),
            block_size: Some(V4_BLOCK_PREFIX),
            node_selector: Some("all()".into()),
            allowed_uses: vec!["Workload".into(), "Tunnel".into()],
            ..IpPoolSpec::default()
        }),
        IpPool::new("IPPool", "default-ipv6-ippool", IpPoolSpec {
            cidr: v6_pool.to_string(),
            block_size: Some(V6_BLOCK_PREFIX),
            node_selector: Some("all()".into()),
            allowed_uses: vec!["Workload".into(), "Tunnel".into()],
            ..IpPoolSpec::default()
        }),
    ];
    let pods: Vec<SimPod> = pod_plans.into_iter().map(|p| p.pod).collect();
    // As the API would give each pod to the GC, then held compact for the whole run.
    let mut names = NameTable::default();
    let pod_facts = pods
        .iter()
        .map(|p| SimPodFacts::of(&p.facts(), &mut names).ok_or_else(|| SimError::Generator(format!("pod {} has more than two IPs", p.name))))
        .collect::<Result<Vec<_>, _>>()?;
    drop(names);
    // One group per allocation, kept for the whole run: without the growth slack.
    planted.shrink_to_fit();
    Ok(SyntheticCluster {
        seed: opts.seed,
        pools,
        nodes,
        pods,
        pod_facts,
        namespaces: NAMESPACES.iter().map(|s| s.to_string()).collect(),
        blocks,
        affinities,
        handles,
        planted,
        expect,
        events,
        deleted_nodes,
        windows_nodes: (0..n).filter(|i| roles[*i] == Role::Windows).map(|i| node_names[i].clone()).collect(),
    })
}
