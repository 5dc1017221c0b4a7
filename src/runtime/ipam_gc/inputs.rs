//! The GC controller's inputs: the [`IpamIndex`] and every fact beside it that the watches
//! deliver (pools, reservations, KubeVirt objects, the singleton configuration objects,
//! malformed objects), with the relist bookkeeping of the watch protocol, and the nodes a read
//! proved deleted while the Node cache lacked them (forgotten when the Node watch delivers one).
//!
//! Owns: applying one [`Input`] (objects not re-listed at `InitDone` are deleted), which
//! sources have finished their first list, which are failing or relisting (decisions resting on
//! them wait), and the keys of what is held per source (pods and handles are listed from the
//! index itself: no second copy of their names).
//! Must not: decide anything, touch the network or the clock, or publish anything; it reports
//! what changed in an [`Applied`] and the loop acts on it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::IpNet;

use crate::ipam::gc::KubeVirtFacts;
use crate::ipam::index::IpamIndex;
use crate::ipam::plan::SoftDeletedBlock;
use crate::model::node::NodeMeta;
use crate::model::{ClusterInformation, InvalidObject, IpamConfig, KubeControllersConfiguration, NodeLite};
use crate::runtime::watch::{CalicoNodeRef, Change, Input, Object, Source};

/// The annotation of `KubeControllersConfiguration/default` that approves sets the mass-change
/// guard holds: `kubectl annotate kubecontrollersconfigurations default
/// calico-kube-controllers/approve-mass-change=<id>[,<id>…] --overwrite`.
pub const APPROVE_ANNOTATION: &str = "calico-kube-controllers/approve-mass-change";

/// Keys of the objects of each kind held, for deleting what a relist no longer shows. Pods and
/// handles are not here: the index holds their keys already (interned), and a copy would cost
/// ~300 bytes a pod.
#[derive(Default)]
pub struct Known {
    pub nodes: HashSet<String>,
    pub blocks: HashMap<String, IpNet>,
    pub affinities: HashSet<String>,
    pub pools: HashMap<String, IpNet>,
    /// IPReservation name → reserved CIDRs (unparsable ones are reported and left out).
    pub reservations: HashMap<String, Vec<IpNet>>,
    /// KubeVirt VMs and VMIs, once the cluster has them.
    pub kubevirt: KubeVirtFacts,
}

/// What applying an input changed that the loop must act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The `default` KubeControllersConfiguration appeared, changed or went.
    pub kcc_changed: bool,
    /// This source finished its first list just now.
    pub first_sync: Option<Source>,
    /// A source failed, recovered, or began or finished a relist: what decisions wait on may
    /// have changed.
    pub health_changed: bool,
}

#[derive(Default)]
pub struct GcInputs {
    pub index: IpamIndex,
    pub known: Known,
    /// Keys seen since the last `Init` of each source that is relisting.
    relisting: HashMap<Source, HashSet<String>>,
    synced: BTreeSet<Source>,
    /// Sources whose watch failed and has delivered nothing good since, with the last reason.
    unhealthy: BTreeMap<Source, String>,
    pub cluster_info: Option<ClusterInformation>,
    pub kcc: Option<KubeControllersConfiguration>,
    pub ipam_config: Option<IpamConfig>,
    pub invalid: BTreeMap<(String, String), InvalidObject>,
    /// Nodes a read found deleted (NotFound) while the Node cache lacked them, each with the
    /// Kubernetes Node whose NotFound proved it (the same name in KDD; in etcd the one the
    /// Calico Node's orchRef names); forgotten when the Node watch delivers that Kubernetes name
    /// again. Only these absent nodes count as deleted.
    pub proven_gone: BTreeMap<String, String>,
    /// Blocks marked `deleted` and not deleted yet, by object name: the index ignores them, the
    /// leader finishes them, and no orphan handle is deleted while one is pending.
    soft_deleted: BTreeMap<String, SoftDeletedBlock>,
    /// The KubeControllersConfiguration that configures this process (`KUBE_CONTROLLERS_CONFIG_NAME`,
    /// `default` unless set); others of the kind are not ours.
    kcc_name: String,
    /// etcd: the Calico Nodes and the Kubernetes Nodes they map to. The index's nodes are then
    /// the Calico Nodes whose Kubernetes node exists (SPEC §5.5: `kubernetesNodeExists`).
    calico: Option<CalicoNames>,
}

/// The node name mapping of a datastore that keeps Calico Nodes (etcd), as upstream's
/// `kubernetesNodesByCalicoName`. A Calico Node counts as an existing node when its `k8s`
/// orchRef names a Kubernetes Node in the cache, or when it has no such reference (upstream
/// never takes those as deleted); without a Calico Node, a node does not exist, whatever
/// Kubernetes Node has its name.
#[derive(Default)]
struct CalicoNames {
    /// Calico Node name -> the Kubernetes node its `k8s` orchRef names.
    nodes: BTreeMap<String, Option<String>>,
    /// The Kubernetes Nodes, by name.
    kube: BTreeMap<String, NodeLite>,
    /// Kubernetes node name -> the Calico Nodes whose orchRef names it.
    by_kube: BTreeMap<String, BTreeSet<String>>,
}

impl CalicoNames {
    /// What the index should hold for Calico Node `name`: its node facts (the Kubernetes
    /// node's labels, under the Calico name) if it counts as existing, and its Kubernetes name.
    fn effective(&self, name: &str) -> (Option<NodeLite>, Option<&str>) {
        let named = |labels: BTreeMap<String, String>| NodeLite { metadata: NodeMeta { name: name.to_string(), labels } };
        match self.nodes.get(name) {
            None => (None, None),
            Some(None) => (Some(named(BTreeMap::new())), None),
            Some(Some(k)) => (self.kube.get(k).map(|n| named(n.metadata.labels.clone())), Some(k.as_str())),
        }
    }

    fn link(&mut self, calico: &str, k8s: Option<&String>, on: bool) {
        let Some(k) = k8s else { return };
        if on {
            self.by_kube.entry(k.clone()).or_default().insert(calico.to_string());
        } else if let Some(set) = self.by_kube.get_mut(k) {
            set.remove(calico);
            if set.is_empty() {
                self.by_kube.remove(k);
            }
        }
    }
}

impl GcInputs {
    pub fn new() -> Self {
        GcInputs { index: IpamIndex::new(), kcc_name: crate::config::DEFAULT_KCC_NAME.to_string(), ..GcInputs::default() }
    }

    /// Reads the KubeControllersConfiguration `name` instead of `default`.
    pub fn with_kcc_name(mut self, name: &str) -> Self {
        self.kcc_name = name.to_string();
        self
    }

    /// Inputs for a datastore that keeps Calico Nodes of its own (etcd): the Calico Nodes are a
    /// required source, and the index's nodes are the Calico Nodes mapped to existing
    /// Kubernetes Nodes ([`CalicoNames`]).
    pub fn with_calico_nodes(mut self, keeps: bool) -> Self {
        self.calico = keeps.then(CalicoNames::default);
        self
    }

    /// The sources every decision waits on.
    fn required(&self) -> impl Iterator<Item = Source> + '_ {
        Source::ALL.iter().copied().chain(self.calico.as_ref().map(|_| Source::CalicoNodes))
    }

    /// Whether `source` is one the decisions wait on.
    pub fn is_required(&self, source: Source) -> bool {
        self.required().any(|s| s == source)
    }

    /// Whether the index holds node `name` (the allocations' node names: Calico Node names in
    /// etcd).
    pub fn node_cached(&self, name: &str) -> bool {
        self.index.strings().lookup(name).is_some_and(|s| self.index.node_exists(s))
    }

    /// Whether the Kubernetes Node cache holds `name`.
    fn kube_node_cached(&self, name: &str) -> bool {
        match &self.calico {
            Some(c) => c.kube.contains_key(name),
            None => self.node_cached(name),
        }
    }

    /// Remembers nodes a read found deleted, each with the Kubernetes Node whose NotFound proved
    /// it ("" when the missing Calico Node was the proof), unless the watches delivered them
    /// meanwhile (the read answered before the node was created).
    pub fn nodes_proven_gone(&mut self, proofs: impl IntoIterator<Item = (String, String)>) {
        for (name, k8s_name) in proofs {
            // etcd: the watch holds this Calico Node now, and its orchRef is not the Kubernetes
            // node the read found missing (or that node is back): the read is out of date.
            let delivered = match &self.calico {
                Some(c) => c.nodes.get(&name).is_some_and(|k| k.is_none() || k.as_deref() != Some(k8s_name.as_str()) || c.kube.contains_key(&k8s_name)),
                None => false,
            };
            if !delivered && !self.node_cached(&name) && !self.kube_node_cached(&k8s_name) {
                self.proven_gone.insert(name, k8s_name);
            }
        }
    }

    /// Brings the index's view of Calico Node `name` up to date (etcd).
    fn refresh_calico(&mut self, name: &str) {
        let Some(c) = &self.calico else { return };
        let (node, k8s) = c.effective(name);
        let k8s = k8s.map(str::to_string);
        match node {
            Some(n) => self.index.apply_node(&n),
            None => self.index.delete_node(name),
        }
        self.index.set_node_alias(name, k8s.as_deref());
    }

    fn apply_kube_node(&mut self, n: NodeLite) {
        let name = n.metadata.name.clone();
        self.proven_gone.retain(|node, k8s| *node != name && *k8s != name);
        self.known.nodes.insert(name.clone());
        let Some(c) = &mut self.calico else {
            self.index.apply_node(&n);
            return;
        };
        c.kube.insert(name.clone(), n);
        let mapped: Vec<String> = c.by_kube.get(&name).into_iter().flatten().cloned().collect();
        for calico in mapped {
            self.refresh_calico(&calico);
        }
    }

    fn delete_kube_node(&mut self, name: &str) {
        self.known.nodes.remove(name);
        let Some(c) = &mut self.calico else {
            self.index.delete_node(name);
            return;
        };
        c.kube.remove(name);
        let mapped: Vec<String> = c.by_kube.get(name).into_iter().flatten().cloned().collect();
        for calico in mapped {
            self.refresh_calico(&calico);
        }
    }

    fn apply_calico_node(&mut self, n: CalicoNodeRef) -> String {
        let Some(c) = &mut self.calico else { return n.name };
        let old = c.nodes.insert(n.name.clone(), n.k8s_node.clone()).flatten();
        c.link(&n.name, old.as_ref(), false);
        c.link(&n.name, n.k8s_node.as_ref(), true);
        self.proven_gone.remove(&n.name);
        self.refresh_calico(&n.name);
        n.name
    }

    fn delete_calico_node(&mut self, name: &str) {
        let Some(c) = &mut self.calico else { return };
        if let Some(old) = c.nodes.remove(name) {
            c.link(name, old.as_ref(), false);
        }
        self.refresh_calico(name);
    }

    /// The nodes proven gone, for the pass.
    pub fn proven_gone_names(&self) -> BTreeSet<String> {
        self.proven_gone.keys().cloned().collect()
    }

    /// Every required source finished its first list: decisions may be made.
    pub fn all_synced(&self) -> bool {
        self.required().all(|s| self.synced.contains(&s))
    }

    /// Whether `source` finished its first list.
    pub fn has_listed(&self, source: Source) -> bool {
        self.synced.contains(&source)
    }

    /// The required sources still waiting for their first list.
    pub fn waiting(&self) -> Vec<Source> {
        self.required().filter(|s| !self.synced.contains(s)).collect()
    }

    /// The mass-change sets operators approved: the ids listed (comma-separated) in the
    /// [`APPROVE_ANNOTATION`] of this process's KubeControllersConfiguration.
    pub fn guard_approvals(&self) -> BTreeSet<String> {
        let Some(kcc) = &self.kcc else { return BTreeSet::new() };
        kcc.metadata.annotations.get(APPROVE_ANNOTATION).map_or_else(BTreeSet::new, |v| crate::guard::parse_approvals(v))
    }

    /// The required sources whose view decisions may not rest on now, each with why: its watch
    /// is failing (errors, refusal), or it is relisting after its first list (between `Init` and
    /// `InitDone` the kind is part old view, part new). The first list is not counted here: no
    /// decision is made before every source finished it anyway ([`Self::all_synced`]).
    pub fn decisions_waiting(&self) -> Vec<(Source, String)> {
        self.required()
            .filter_map(|s| match self.unhealthy.get(&s) {
                Some(reason) => Some((s, reason.clone())),
                None if self.synced.contains(&s) && self.relisting.contains_key(&s) => Some((s, "relist in progress".to_string())),
                None => None,
            })
            .collect()
    }

    /// How many IPAMBlocks are known only as malformed: one of them may hold a live pod's
    /// allocation, so the handles no readable block refers to are not all orphans.
    pub fn invalid_blocks(&self) -> usize {
        self.invalid.keys().filter(|(kind, _)| kind == "IPAMBlock").count()
    }

    /// Half soft-deleted blocks waiting to be finished, by address.
    pub fn soft_deleted_blocks(&self) -> Vec<SoftDeletedBlock> {
        let mut v: Vec<SoftDeletedBlock> = self.soft_deleted.values().cloned().collect();
        v.sort_by_key(|b| crate::model::names::ip_sort_key(&b.cidr.network()));
        v
    }

    pub fn soft_deleted_count(&self) -> usize {
        self.soft_deleted.len()
    }

    /// Both KubeVirt kinds finished their first list. Before that (or without KubeVirt) VM
    /// allocations are judged valid, as upstream does without its KubeVirt informers: a VM is
    /// never released on a view that has not seen it.
    pub fn kubevirt_listed(&self) -> bool {
        self.synced.contains(&Source::VirtualMachines) && self.synced.contains(&Source::VirtualMachineInstances)
    }

    /// `datastoreReady: false` (an upgrade or migration in progress) pauses the GC: no pass runs.
    /// A missing ClusterInformation is [`Self::cluster_info_missing`].
    pub fn datastore_paused(&self) -> bool {
        self.cluster_info.as_ref().is_some_and(|c| c.spec.datastore_ready == Some(false))
    }

    /// `ClusterInformation/default` does not exist although its watch finished its first list.
    /// Upstream's GC pauses then (its `datastoreReady` cache is false without one); the leader
    /// creates ours at start, so before that list this is not yet known and says false.
    pub fn cluster_info_missing(&self) -> bool {
        self.synced.contains(&Source::ClusterInformation) && self.cluster_info.is_none()
    }

    /// IPAMConfig `ipCooldownSeconds` (0 when unset).
    pub fn cooldown_secs(&self) -> u32 {
        self.ipam_config.as_ref().and_then(|c| c.spec.ip_cooldown_seconds).unwrap_or(0)
    }

    pub fn handle(&mut self, input: Input) -> Applied {
        let Input { source, change } = input;
        let mut applied = Applied::default();
        match change {
            Change::Init => {
                self.relisting.insert(source, HashSet::new());
                applied.health_changed = true;
            }
            Change::InitApply(obj) => {
                let key = self.apply(obj, &mut applied);
                if let Some(seen) = self.relisting.get_mut(&source) {
                    seen.insert(key);
                }
            }
            Change::InitDone => {
                let seen = self.relisting.remove(&source).unwrap_or_default();
                self.finish_relist(source, &seen, &mut applied);
                if self.synced.insert(source) {
                    applied.first_sync = Some(source);
                }
                applied.health_changed = true;
            }
            Change::Apply(obj) => {
                self.apply(obj, &mut applied);
            }
            Change::Delete(obj) => self.delete(obj, &mut applied),
            Change::Invalid(e) => {
                tracing::warn!(kind = %e.kind, name = %e.name, problem = %e.problem, "malformed object skipped");
                // A relist that shows a malformed block keeps its record (see `finish_relist`).
                if source == Source::Blocks
                    && let Some(seen) = self.relisting.get_mut(&source)
                {
                    seen.insert(e.name.clone());
                }
                self.invalid.insert((e.kind.clone(), e.name.clone()), e);
            }
            Change::Unhealthy { reason } => {
                applied.health_changed = self.unhealthy.get(&source) != Some(&reason);
                self.unhealthy.insert(source, reason);
            }
            Change::Healthy => applied.health_changed = self.unhealthy.remove(&source).is_some(),
            Change::DeleteMalformed { name } => {
                let kind = source.kind_name();
                self.invalid.retain(|(k, n), _| !(k == kind && *n == name));
            }
        }
        applied
    }

    /// Applies one object and returns its relist key.
    fn apply(&mut self, obj: Object, applied: &mut Applied) -> String {
        match obj {
            Object::Pod(p) => {
                self.index.apply_pod(&*p);
                format!("{}/{}", p.namespace, p.name)
            }
            Object::Node(n) => {
                let name = n.metadata.name.clone();
                self.apply_kube_node(n);
                name
            }
            Object::CalicoNode(n) => self.apply_calico_node(n),
            Object::Block(b) => {
                let name = b.metadata.name.clone();
                self.invalid.remove(&("IPAMBlock".to_string(), name.clone()));
                self.soft_deleted.remove(&name);
                match self.index.apply_block(&b) {
                    Ok(()) => {
                        if let Ok(cidr) = b.spec.cidr.parse::<IpNet>() {
                            if b.spec.deleted {
                                self.known.blocks.remove(&name);
                                let (revision, uid) = (b.resource_version().to_string(), b.metadata.uid.clone().unwrap_or_default());
                                tracing::info!(block = %name, "block marked deleted but not deleted: the leader finishes it");
                                self.soft_deleted.insert(name.clone(), SoftDeletedBlock { cidr, block_name: name.clone(), revision, uid });
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
                self.invalid.remove(&(crate::model::affinity::KIND.to_string(), name.clone()));
                if let Err(e) = self.index.apply_affinity(&a) {
                    tracing::warn!(affinity = %name, problem = %e.problem, "malformed affinity skipped");
                    // The index dropped any earlier version held under this name.
                    self.known.affinities.remove(&name);
                    self.invalid.insert((e.kind.clone(), e.name.clone()), e);
                } else {
                    self.known.affinities.insert(name.clone());
                }
                name
            }
            // Handles are tracked by ID, as the index keys them (their object names derive from
            // it); one whose name contradicts its ID is held as malformed under its name.
            Object::Handle(h) => {
                let name = h.metadata.name.clone();
                self.invalid.remove(&(crate::model::handle::KIND.to_string(), name.clone()));
                match self.index.apply_handle(&h) {
                    Ok(()) => IpamIndex::handle_key(&h).to_string(),
                    Err(e) => {
                        tracing::warn!(handle = %name, problem = %e.problem, "malformed handle skipped");
                        self.invalid.insert((e.kind.clone(), e.name.clone()), e);
                        name
                    }
                }
            }
            Object::ClusterInformation(c) => {
                let name = c.metadata.name.clone();
                if name == "default" {
                    // Its appearance lifts the write hold of a missing one.
                    applied.health_changed |= self.cluster_info.is_none();
                    self.cluster_info = Some(*c);
                }
                name
            }
            Object::KubeControllersConfiguration(k) => {
                let name = k.metadata.name.clone();
                if name == self.kcc_name {
                    self.kcc = Some(*k);
                    applied.kcc_changed = true;
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

    fn delete(&mut self, obj: Object, applied: &mut Applied) {
        match obj {
            Object::Pod(p) => self.index.delete_pod(&p.namespace, &p.name),
            Object::Node(n) => self.delete_key(Source::Nodes, &n.metadata.name, applied),
            Object::CalicoNode(n) => self.delete_key(Source::CalicoNodes, &n.name, applied),
            Object::Block(b) => self.delete_key(Source::Blocks, &b.metadata.name, applied),
            Object::Affinity(a) => self.delete_key(Source::Affinities, &a.metadata.name, applied),
            Object::Handle(h) => {
                self.invalid.remove(&(crate::model::handle::KIND.to_string(), h.metadata.name.clone()));
                // An object whose name contradicts its ID was never indexed: its deletion must
                // not take the real handle's entry with it.
                if let Ok(id) = IpamIndex::checked_handle_key(&h) {
                    self.delete_key(Source::Handles, id, applied);
                }
            }
            Object::ClusterInformation(c) => self.delete_key(Source::ClusterInformation, &c.metadata.name, applied),
            Object::KubeControllersConfiguration(k) => self.delete_key(Source::KubeControllersConfiguration, &k.metadata.name, applied),
            Object::IpamConfig(c) => self.delete_key(Source::IpamConfig, &c.metadata.name, applied),
            Object::Pool(p) => self.delete_key(Source::Pools, &p.metadata.name, applied),
            Object::Reservation(r) => self.delete_key(Source::Reservations, &r.metadata.name, applied),
            Object::VirtualMachine(v) => self.delete_key(Source::VirtualMachines, &format!("{}/{}", v.namespace, v.name), applied),
            Object::VirtualMachineInstance(v) => {
                self.delete_key(Source::VirtualMachineInstances, &format!("{}/{}", v.namespace, v.name), applied)
            }
        }
    }

    fn delete_key(&mut self, source: Source, key: &str, applied: &mut Applied) {
        match source {
            Source::Pods => {
                if let Some((ns, name)) = key.split_once('/') {
                    self.index.delete_pod(ns, name);
                }
            }
            Source::Nodes => {
                self.delete_kube_node(key);
                // A node deletion is when upstream runs a full scan: its blocks and tunnels go.
                self.index.request_full_scan();
            }
            Source::CalicoNodes => {
                self.delete_calico_node(key);
                self.index.request_full_scan();
            }
            Source::Blocks => {
                if let Some(cidr) = self.known.blocks.remove(key) {
                    self.index.delete_block(&cidr);
                }
                self.soft_deleted.remove(key);
                self.invalid.remove(&("IPAMBlock".to_string(), key.to_string()));
            }
            Source::Affinities => {
                self.index.delete_affinity(key);
                self.known.affinities.remove(key);
                self.invalid.remove(&(crate::model::affinity::KIND.to_string(), key.to_string()));
            }
            Source::Handles => self.index.delete_handle(key),
            Source::ClusterInformation if key == "default" => {
                // Its deletion holds every write (see `cluster_info_missing`).
                applied.health_changed |= self.cluster_info.take().is_some();
            }
            Source::KubeControllersConfiguration if key == self.kcc_name => {
                self.kcc = None;
                applied.kcc_changed = true;
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

    /// Deletes what is held of `source` but the relist did not show.
    fn finish_relist(&mut self, source: Source, seen: &HashSet<String>, applied: &mut Applied) {
        let stale: Vec<String> = match source {
            // Pods and handles are listed from the index itself: no second copy of their names.
            Source::Pods => self
                .index
                .present_pods()
                .map(|p| format!("{}/{}", self.index.resolve(p.namespace), self.index.resolve(p.name)))
                .filter(|k| !seen.contains(k))
                .collect(),
            Source::Nodes => self.known.nodes.iter().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Blocks => self.known.blocks.keys().chain(self.soft_deleted.keys()).filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Affinities => self.known.affinities.iter().filter(|k| !seen.contains(*k)).cloned().collect(),
            Source::Handles => {
                self.index.handles().map(|(id, _)| self.index.handle_name(id)).filter(|k| !seen.contains(&**k)).map(|k| k.into_owned()).collect()
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
            Source::CalicoNodes => self.calico.iter().flat_map(|c| c.nodes.keys()).filter(|k| !seen.contains(*k)).cloned().collect(),
        };
        if !stale.is_empty() {
            tracing::info!(source = source.as_str(), gone = stale.len(), "objects gone since the last list");
        }
        if matches!(source, Source::Blocks | Source::Affinities | Source::Handles) {
            // A malformed object the relist no longer shows was deleted unseen (a malformed block
            // then no longer holds orphan-handle deletions back). Malformed handles are seen by
            // their object names, valid ones by their IDs.
            let kind = source.kind_name();
            self.invalid.retain(|(k, name), _| k != kind || seen.contains(name));
        }
        for key in stale {
            self.delete_key(source, &key, applied);
        }
    }

    /// Cross-checks the side tables with the index they shadow. Tests call it after inputs.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.index.check_invariants()?;
        for (name, cidr) in &self.known.blocks {
            let Some(slot) = self.index.block_slot(cidr) else {
                return Err(format!("known block {name} ({cidr}) is not in the index"));
            };
            if self.index.block(slot).is_none() {
                return Err(format!("known block {name} has an empty slot"));
            }
        }
        if self.known.blocks.len() > self.index.block_count() {
            return Err(format!("{} known blocks, {} in the index", self.known.blocks.len(), self.index.block_count()));
        }
        match &self.calico {
            None => {
                for name in self.known.nodes.iter().filter(|n| !n.is_empty()) {
                    if !self.node_cached(name) {
                        return Err(format!("known node {name} is not in the index"));
                    }
                }
            }
            Some(c) => {
                if c.kube.keys().ne(self.known.nodes.iter().collect::<BTreeSet<_>>()) {
                    return Err("the Kubernetes Node cache and the known nodes differ".into());
                }
                for (k8s, names) in &c.by_kube {
                    if names.is_empty() || names.iter().any(|n| c.nodes.get(n).is_none_or(|r| r.as_ref() != Some(k8s))) {
                        return Err(format!("the Calico Nodes recorded for Kubernetes node {k8s} ({names:?}) do not name it"));
                    }
                }
                for (name, k8s) in &c.nodes {
                    if let Some(k) = k8s
                        && !c.by_kube.get(k).is_some_and(|s| s.contains(name))
                    {
                        return Err(format!("Calico Node {name} -> {k} is missing from the reverse map"));
                    }
                    let want = c.effective(name);
                    if self.node_cached(name) != want.0.is_some() {
                        return Err(format!("Calico Node {name}: the index says exists={}, the mapping says {}", self.node_cached(name), want.0.is_some()));
                    }
                    let sym = self.index.strings().lookup(name);
                    if let Some(s) = sym
                        && self.index.kubernetes_name(s) != want.1.unwrap_or(name)
                    {
                        return Err(format!("Calico Node {name}: the index maps it to {}, its orchRef to {:?}", self.index.kubernetes_name(s), want.1));
                    }
                }
                if let Some(n) = self.index.node_names().find(|n| !c.nodes.contains_key(*n)) {
                    return Err(format!("the index holds node {n}, which is no Calico Node"));
                }
            }
        }
        for (name, b) in &self.soft_deleted {
            if *name != b.block_name || *name != crate::model::names::cidr_to_name(&b.cidr) {
                return Err(format!("soft-deleted block {name} is held under another name ({}, {})", b.block_name, b.cidr));
            }
            if self.known.blocks.contains_key(name) || self.index.block_slot(&b.cidr).is_some() {
                return Err(format!("block {name} is both soft-deleted and live"));
            }
        }
        if let Some((name, _)) = self.proven_gone.iter().find(|(n, k8s)| self.node_cached(n) || self.kube_node_cached(k8s)) {
            return Err(format!("node {name} is proven gone but the Node cache holds it"));
        }
        if self.known.pools.keys().chain(self.known.reservations.keys()).any(String::is_empty) {
            return Err("a pool or reservation is held under an empty name".into());
        }
        if let Some((source, _)) = self.unhealthy.iter().find(|(_, reason)| reason.is_empty()) {
            return Err(format!("{} is unhealthy without a reason", source.as_str()));
        }
        // The orphan-handle hold counts malformed blocks by these keys: each must be its entry's.
        if let Some(((kind, name), e)) = self.invalid.iter().find(|((kind, name), e)| *kind != e.kind || *name != e.name) {
            return Err(format!("malformed object {kind}/{name} is held under another key ({}/{})", e.kind, e.name));
        }
        Ok(())
    }
}

fn singleton_gone(held: bool, seen: &HashSet<String>) -> Vec<String> {
    if held && !seen.contains("default") { vec!["default".to_string()] } else { Vec::new() }
}
