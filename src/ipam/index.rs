//! The allocation index and the live facts it is judged against: a synchronous single-writer
//! state machine fed `apply_*` / `delete_*` / `reset` by one owner.
//!
//! Owns: every allocation of every block (compact records, per-block sorted vectors), cluster-wide
//! roaring bitmaps over global allocation ids (allocated, by node, live IPs, empty and cold blocks),
//! the compact pod and node facts, affinities and handle objects, the dirty-node set, and the
//! record of which allocations' facts changed (for the GC's verdict cache).
//! Must not: read the clock, do I/O, or decide anything about leaks (that is `gc`).
//!
//! A global allocation id (`Gid`) is `block_slot << 12 | ordinal`: Calico blocks hold at most
//! 4096 addresses (/20 for IPv4, /116 for IPv6), so ordinals fit in 12 bits and a u32 id leaves
//! room for a million blocks, which lets every cluster-wide set be a `RoaringBitmap`.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use rayon::prelude::*;
use roaring::RoaringBitmap;

use hashbrown::HashTable;

use super::handles::{HandleKey, HandleTable};
pub use super::handles::HandleId;
use super::intern::{FastMap, Hashed, Interner, Sym};
use crate::model::block::{Affinity, BlockView, WINDOWS_RESERVED_HANDLE};
use crate::model::names::{affinity_name, handle_object_name, ip_sort_key, ip_to_ordinal, ordinal_to_ip, sanitize_handle};
use crate::model::time::{parse_rfc3339, Millis};
use crate::model::{BlockAffinity, InvalidObject, IpamBlock, IpamHandle, NodeLite, PodFacts, PodPhase};
use crate::model::pod::{PodObject, PodView};

pub type Gid = u32;
pub const ORDINAL_BITS: u32 = 12;
const MAX_BLOCK_SLOTS: u32 = 1 << (32 - ORDINAL_BITS);

pub fn gid(slot: u32, ordinal: u32) -> Gid {
    (slot << ORDINAL_BITS) | ordinal
}
pub fn gid_slot(g: Gid) -> u32 {
    g >> ORDINAL_BITS
}
pub fn gid_ordinal(g: Gid) -> u32 {
    g & ((1 << ORDINAL_BITS) - 1)
}

/// The five `type` attribute values that mark a node's tunnel address.
pub const TUNNEL_TYPES: [&str; 5] =
    ["ipipTunnelAddress", "vxlanTunnelAddress", "vxlanV6TunnelAddress", "wireguardTunnelAddress", "wireguardV6TunnelAddress"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocKind {
    /// `namespace` and `pod` attributes both set.
    Pod,
    /// `type` is one of [`TUNNEL_TYPES`]; judged by node existence only.
    Tunnel,
    /// Pre-allocated by Calico for Windows; never garbage.
    WindowsReserved,
    /// Neither a pod nor a tunnel: an owner we cannot judge, never released.
    Unknown,
}

/// One allocated ordinal that carries a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alloc {
    pub ordinal: u16,
    pub kind: AllocKind,
    pub handle: HandleId,
    pub namespace: Sym,
    pub pod: Sym,
    pub node: Sym,
    /// The allocation has a `vmi-name` attribute, even an empty one: it belongs to a VM
    /// (upstream tests the key's presence, not its value).
    pub vm: bool,
    /// Index into the pod table, `NO_POD` unless kind is Pod.
    pub pod_slot: u32,
    /// `sequenceNumberForAllocation[ordinal]`, the CAS token for releasing it.
    pub seq: u64,
}

pub const NO_POD: u32 = u32::MAX;

/// Blocks prepared in one batch of a bulk load, a batch ahead of the one being applied.
const PREPARE_BATCH: usize = 64;

/// What a block's load reads from each allocated ordinal, read without the index: in a bulk
/// load every block is prepared in parallel, and the index's owner is left the table work.
struct PreparedSlot<'a> {
    ordinal: u16,
    sequence: u64,
    /// `releasedAt`; an unparsable one counts as released at the earliest possible time, so the
    /// cooldown backstop looks at the block (calicoctl's validator reports it).
    released_at: Option<Millis>,
    /// The sanitized handle ID; `None` when the attribute has none (the ordinal is still used).
    handle: Option<HandleKey<'a>>,
    kind: AllocKind,
    namespace: &'a str,
    pod: Hashed<'a>,
    node: &'a str,
    alloc_type: &'a str,
    vmi: &'a str,
    vm: bool,
}

/// What the index reads of a handle object, whatever holds it: a decoded IPAMHandle, or a
/// store's compact form of one (the memory datastore's, so a simulated relist shares its handles
/// instead of decoding them).
pub trait HandleObject {
    fn object_name(&self) -> &str;
    /// `spec.handleID` as written.
    fn handle_id(&self) -> &str;
    /// `spec.deleted`.
    fn soft_deleted(&self) -> bool;
    /// `metadata.resourceVersion` and `metadata.uid` ("" when absent) as [`Token::new`] reads them.
    fn tokens(&self) -> (Token, Token);
}

impl HandleObject for IpamHandle {
    fn object_name(&self) -> &str {
        self.name()
    }
    fn handle_id(&self) -> &str {
        &self.spec.handle_id
    }
    fn soft_deleted(&self) -> bool {
        self.spec.deleted
    }
    fn tokens(&self) -> (Token, Token) {
        (Token::new(self.resource_version()), Token::new(self.metadata.uid.as_deref().unwrap_or("")))
    }
}

impl<T: HandleObject + ?Sized> HandleObject for std::sync::Arc<T> {
    fn object_name(&self) -> &str {
        (**self).object_name()
    }
    fn handle_id(&self) -> &str {
        (**self).handle_id()
    }
    fn soft_deleted(&self) -> bool {
        (**self).soft_deleted()
    }
    fn tokens(&self) -> (Token, Token) {
        (**self).tokens()
    }
}

/// What a handle object's load reads from it, read without the index (in a bulk load, on the
/// core that fills the handle table beside the pods): its checked key and its compare-and-swap
/// tokens.
struct PreparedHandle<'a> {
    id: &'a str,
    key: HandleKey<'a>,
    deleted: bool,
    /// The tokens in their compact form, or as written when they have another shape.
    tokens: Result<HandleEntry, (Box<str>, Box<str>)>,
}

impl<'a> PreparedHandle<'a> {
    fn new<H: HandleObject + ?Sized>(h: &'a H) -> Result<PreparedHandle<'a>, InvalidObject> {
        let id = IpamIndex::checked_handle_key(h)?;
        // A token of another shape prints back exactly as written (see `Token::new`).
        let tokens = match h.tokens() {
            (Token::Number(n), Token::Uuid(u)) if n != ODD_TOKEN => Ok(HandleEntry { revision: n, uid: u }),
            (rev, uid) => Err((rev.to_string().into(), uid.to_string().into())),
        };
        Ok(PreparedHandle { id, key: HandleKey::new(id), deleted: h.soft_deleted(), tokens })
    }
}

/// What a handle object's arrival or removal changes in the index, and nothing else: the
/// handle table, the orphans among its records and the odd tokens. A bulk load fills it on one
/// core while the other applies the pods.
struct HandleObjects<'a> {
    table: &'a mut HandleTable,
    orphans: &'a mut BTreeSet<HandleId>,
    odd: &'a mut FastMap<HandleId, (Box<str>, Box<str>)>,
}

impl HandleObjects<'_> {
    fn apply(&mut self, p: PreparedHandle<'_>) {
        if p.deleted {
            self.delete(p.id);
            return;
        }
        let sym = self.table.intern_key(p.key);
        let entry = match p.tokens {
            Ok(entry) => {
                self.odd.remove(&sym);
                entry
            }
            Err(written) => {
                self.odd.insert(sym, written);
                HandleEntry { revision: ODD_TOKEN, uid: [0; 16] }
            }
        };
        // The object holds one reference: a replaced object's is given back.
        if self.table.set_object(sym, Some(entry)).is_some() {
            self.table.release(sym);
        } else if self.table.gids(sym).is_empty() {
            self.orphans.insert(sym);
        }
    }

    fn delete(&mut self, handle_id: &str) {
        if let Some(s) = self.table.lookup(handle_id)
            && self.table.set_object(s, None).is_some()
        {
            self.orphans.remove(&s);
            self.odd.remove(&s);
            self.table.release(s);
        }
    }
}

struct PreparedBlock<'a> {
    view: BlockView<'a>,
    /// Every allocated ordinal, in order.
    slots: Vec<PreparedSlot<'a>>,
    /// How many of them carry a handle.
    with_handle: usize,
}

impl<'a> PreparedBlock<'a> {
    fn new(view: BlockView<'a>) -> PreparedBlock<'a> {
        let mut with_handle = 0;
        let slots: Vec<PreparedSlot<'a>> = view
            .slots()
            .map(|s| {
                let attr = s.attribute;
                let released_at = attr.released_at.as_deref().map(|at| parse_rfc3339(at).unwrap_or(0));
                let handle = attr.handle_id.as_deref().map(sanitize_handle).filter(|h| !h.is_empty());
                let owner = attr.owner();
                let kind = match handle {
                    Some(WINDOWS_RESERVED_HANDLE) => AllocKind::WindowsReserved,
                    _ if !owner.namespace.is_empty() && !owner.pod.is_empty() => AllocKind::Pod,
                    _ if TUNNEL_TYPES.contains(&owner.alloc_type) => AllocKind::Tunnel,
                    _ => AllocKind::Unknown,
                };
                with_handle += usize::from(handle.is_some());
                PreparedSlot {
                    ordinal: s.ordinal as u16,
                    sequence: s.sequence,
                    released_at,
                    handle: handle.map(HandleKey::new),
                    kind,
                    namespace: owner.namespace,
                    pod: Hashed::new(owner.pod),
                    node: owner.node,
                    alloc_type: owner.alloc_type,
                    vmi: owner.vmi,
                    vm: owner.vm,
                }
            })
            .collect();
        PreparedBlock { view, slots, with_handle }
    }
}

/// The attributes few allocations carry, kept beside the block's allocations instead of in each
/// (a pod's address has neither: 8 bytes saved on every one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocTags {
    pub ordinal: u16,
    /// `type` attribute (tunnels, LoadBalancer), kept for reports.
    pub alloc_type: Sym,
    /// KubeVirt `vmi-name` attribute (`Sym::NONE` when absent or empty).
    pub vmi: Sym,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOwner {
    None,
    Host(Sym),
    Virtual(Sym),
}

#[derive(Debug, Clone)]
pub struct BlockEntry {
    pub cidr: IpNet,
    pub name: Box<str>,
    pub revision: Box<str>,
    pub owner: BlockOwner,
    pub seq: u64,
    /// Allocations with a handle, sorted by ordinal.
    pub allocs: Vec<Alloc>,
    /// The allocations with a `type` or a `vmi-name`, sorted by ordinal.
    pub tags: Box<[AllocTags]>,
    /// Non-nil ordinals, including cooldown and Windows-reserved ones (upstream's notion of empty).
    pub used_ordinals: u32,
    /// Earliest `releasedAt` of a cooling-down ordinal, if any.
    pub earliest_release: Option<Millis>,
    /// Ordinals in cooldown (reported as `coolingDown` in the check report).
    pub cooling: Vec<u16>,
}

impl BlockEntry {
    pub fn alloc(&self, ordinal: u32) -> Option<&Alloc> {
        self.allocs.binary_search_by_key(&(ordinal as u16), |a| a.ordinal).ok().map(|i| &self.allocs[i])
    }
    fn tags_of(&self, ordinal: u16) -> Option<&AllocTags> {
        self.tags.binary_search_by_key(&ordinal, |t| t.ordinal).ok().map(|i| &self.tags[i])
    }
    /// The `type` attribute of the allocation at `ordinal` (`Sym::NONE` when absent or empty).
    pub fn alloc_type(&self, ordinal: u16) -> Sym {
        self.tags_of(ordinal).map_or(Sym::NONE, |t| t.alloc_type)
    }
    /// The `vmi-name` attribute of the allocation at `ordinal` (`Sym::NONE` when absent or empty).
    pub fn vmi(&self, ordinal: u16) -> Sym {
        self.tags_of(ordinal).map_or(Sym::NONE, |t| t.vmi)
    }
    pub fn host(&self) -> Sym {
        match self.owner {
            BlockOwner::Host(h) => h,
            _ => Sym::NONE,
        }
    }
}

/// A pod's addresses: nearly every pod has one (or none), kept inline; dual-stack and
/// multi-address pods spill into a slice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PodIps {
    #[default]
    None,
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl PodIps {
    pub fn new(ips: &[IpAddr]) -> PodIps {
        match ips {
            [] => PodIps::None,
            [ip] => PodIps::One(*ip),
            many => PodIps::Many(many.into()),
        }
    }
    fn heap_bytes(&self) -> usize {
        match self {
            PodIps::Many(v) => v.len() * std::mem::size_of::<IpAddr>(),
            _ => 0,
        }
    }
}

impl std::ops::Deref for PodIps {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        match self {
            PodIps::None => &[],
            PodIps::One(ip) => std::slice::from_ref(ip),
            PodIps::Many(v) => v,
        }
    }
}

/// A pod as the GC sees it; a slot exists while the pod is present or an allocation names it.
#[derive(Debug, Clone)]
pub struct PodSlot {
    pub namespace: Sym,
    pub name: Sym,
    pub present: bool,
    pub node: Sym,
    pub phase: u8,
    pub evicted: bool,
    pub deleting: bool,
    pub status_reports_ip: bool,
    pub unparsable_ips: bool,
    pub ips: PodIps,
    /// Allocations naming this pod (their verdicts are re-evaluated when the pod changes).
    allocs: HandleGids,
}

impl Default for PodSlot {
    fn default() -> Self {
        PodSlot {
            namespace: Sym::NONE,
            name: Sym::NONE,
            present: false,
            node: Sym::NONE,
            phase: 0,
            evicted: false,
            deleting: false,
            status_reports_ip: false,
            unparsable_ips: false,
            ips: PodIps::None,
            allocs: HandleGids::EMPTY,
        }
    }
}

impl PodSlot {
    fn alloc_refs(&self) -> usize {
        self.allocs.as_slice().len()
    }
    pub fn phase(&self) -> PodPhase {
        match self.phase {
            1 => PodPhase::Running,
            2 => PodPhase::Succeeded,
            3 => PodPhase::Failed,
            4 => PodPhase::Unknown,
            5 => PodPhase::Completed,
            _ => PodPhase::Pending,
        }
    }
    pub fn finished(&self) -> bool {
        self.phase().finished()
    }
}

fn phase_code(p: PodPhase) -> u8 {
    match p {
        PodPhase::Pending => 0,
        PodPhase::Running => 1,
        PodPhase::Succeeded => 2,
        PodPhase::Failed => 3,
        PodPhase::Unknown => 4,
        PodPhase::Completed => 5,
    }
}

#[derive(Debug, Clone)]
pub struct AffinityEntry {
    pub node: Sym,
    pub cidr: IpNet,
    pub revision: Box<str>,
    pub state: Box<str>,
}

/// What the GC keeps of an IPAMHandle object: enough to delete it under a precondition.
/// The object name is derived from the handle ID (lowercased), the block counts are re-read
/// by the executor, so neither is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandleEntry {
    /// The resourceVersion as a number, or `ODD_TOKEN` when either token has another shape and
    /// lives in the index's side table.
    revision: u64,
    uid: [u8; 16],
}

impl HandleEntry {
    pub(crate) const NONE: HandleEntry = HandleEntry { revision: 0, uid: [0; 16] };
}

const ODD_TOKEN: u64 = u64::MAX;

/// A handle object's CAS tokens, as strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleMeta {
    pub revision: String,
    pub uid: String,
}

/// An opaque token (resourceVersion, UID) stored compactly when it has the usual shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Number(u64),
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl Token {
    /// Decimal without a leading zero (so it prints back the same) is a number; a lower-case
    /// 8-4-4-4-12 hex UUID is a UUID; anything else is kept as text. Nothing is allocated for
    /// the usual shapes: a bulk load parses two tokens per handle.
    pub fn new(s: &str) -> Token {
        let b = s.as_bytes();
        if !b.is_empty() && b.iter().all(u8::is_ascii_digit) && (b[0] != b'0' || b.len() == 1)
            && let Ok(n) = s.parse::<u64>()
        {
            return Token::Number(n);
        }
        if b.len() == 36 && [8, 13, 18, 23].iter().all(|i| b[*i] == b'-') {
            let mut digits = b.iter().copied().filter(|c| *c != b'-');
            let mut out = [0u8; 16];
            let mut ok = true;
            for o in out.iter_mut() {
                match (digits.next().and_then(crate::ipam::handles::hex_digit), digits.next().and_then(crate::ipam::handles::hex_digit)) {
                    (Some(hi), Some(lo)) => *o = (hi << 4) | lo,
                    _ => ok = false,
                }
            }
            if ok && digits.next().is_none() {
                return Token::Uuid(out);
            }
        }
        Token::Text(s.into())
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Number(n) => write!(f, "{n}"),
            Token::Text(t) => f.write_str(t),
            Token::Uuid(b) => {
                for (i, x) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{x:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// The allocations of one handle: almost always one (IPv4) or two (dual stack), kept inline
/// without a heap allocation; more spill into a vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleGids {
    Inline([Gid; 2], u8),
    /// A thin pointer, so the whole is 16 bytes (a boxed slice would make it 24).
    Spill(Box<Vec<Gid>>),
}

impl HandleGids {
    pub const EMPTY: HandleGids = HandleGids::Inline([0, 0], 0);
    pub fn as_slice(&self) -> &[Gid] {
        match self {
            HandleGids::Inline(a, n) => &a[..*n as usize],
            HandleGids::Spill(v) => v,
        }
    }
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            HandleGids::Inline(..) => 0,
            HandleGids::Spill(v) => 24 + v.capacity() * 4,
        }
    }
    pub(crate) fn push(&mut self, g: Gid) {
        match self {
            HandleGids::Inline(a, n) if *n < 2 => {
                a[*n as usize] = g;
                *n += 1;
            }
            HandleGids::Inline(a, _) => *self = HandleGids::Spill(Box::new(vec![a[0], a[1], g])),
            HandleGids::Spill(v) => v.push(g),
        }
    }
    /// Removes `g`; returns true when nothing is left.
    pub(crate) fn remove(&mut self, g: Gid) -> bool {
        let mut rest: Vec<Gid> = self.as_slice().to_vec();
        if let Some(i) = rest.iter().position(|x| *x == g) {
            rest.remove(i);
        }
        if rest.len() <= 2 {
            let mut a = [0; 2];
            a[..rest.len()].copy_from_slice(&rest);
            *self = HandleGids::Inline(a, rest.len() as u8);
        } else {
            *self = HandleGids::Spill(Box::new(rest));
        }
        self.as_slice().is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct NodeEntry {
    pub migration_in_progress: bool,
}

/// Which namespaces' pods the facts cover. A live controller watches every pod; a dump may not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PodCoverage {
    #[default]
    All,
    /// Only these namespaces are known completely; allocations elsewhere are never releasable.
    Namespaces(BTreeSet<String>),
}

#[derive(Debug, Default)]
pub struct IpamIndex {
    pub(crate) strings: Interner,
    blocks: Vec<Option<BlockEntry>>,
    free_slots: Vec<u32>,
    by_cidr: FastMap<IpNet, u32>,
    by_network: BTreeMap<(u8, u128), u32>,
    allocated: RoaringBitmap,
    by_node: FastMap<Sym, RoaringBitmap>,
    /// Every handle named by an allocation or a handle object: its allocations and tokens.
    handles: HandleTable,
    /// Handle objects no allocation refers to, kept up to date on every change.
    orphans: BTreeSet<HandleId>,
    blocks_by_host: FastMap<Sym, Vec<u32>>,
    empty_blocks: RoaringBitmap,
    cold_blocks: RoaringBitmap,
    pods: Vec<PodSlot>,
    free_pods: Vec<u32>,
    /// Pod slots by a hash of their (namespace, name) symbols: 4 bytes an entry, the key is
    /// read from the slot.
    pod_by_key: HashTable<u32>,
    /// Ordinals of known blocks that at least one live, unfinished pod reports as its IP.
    live_gids: RoaringBitmap,
    /// Holders beyond the first of a live ordinal (two pods reporting one IP: rare).
    live_extra: FastMap<Gid, u32>,
    /// Live pod IPs in no known block yet, with their holder counts; placed when the block comes.
    live_unplaced: BTreeMap<(u8, u128), u32>,
    /// Allocations whose facts changed since the GC last took this record: their block entry,
    /// their pod, their node's existence or their IP's liveness. The GC re-judges exactly these,
    /// so its verdict cache stays exact and a pass costs O(suspects), not O(allocations).
    changed: RoaringBitmap,
    /// Allocations of KubeVirt VMs: judged in every pass against the VM facts of that pass.
    vm_allocs: RoaringBitmap,
    nodes: FastMap<Sym, NodeEntry>,
    /// Symbols of existing nodes, for the hot loop's existence test.
    node_bits: RoaringBitmap,
    affinities: HashMap<Box<str>, AffinityEntry>,
    /// Tokens of handle objects whose resourceVersion is not a number or UID not a UUID.
    odd_handle_tokens: FastMap<HandleId, (Box<str>, Box<str>)>,
    dirty_nodes: BTreeSet<Box<str>>,
    full_scan_requested: bool,
    /// Set while [`IpamIndex::reset`] loads a whole snapshot: it ends in a full scan with every
    /// allocation recorded as changed, so no node is marked dirty and no gid recorded on the way.
    bulk_loading: bool,
    pub coverage: PodCoverage,
    /// Node name -> the Kubernetes node it stands for, where they differ (etcd: a Calico Node's
    /// `k8s` orchRef). A pod's `spec.nodeName` is compared with this name (SPEC §5.6 step 5).
    node_aliases: BTreeMap<Box<str>, Box<str>>,
}

impl IpamIndex {
    pub fn new() -> Self {
        IpamIndex { strings: Interner::new(), ..Default::default() }
    }

    // ---- read access -------------------------------------------------------------------------

    pub fn strings(&self) -> &Interner {
        &self.strings
    }
    pub fn resolve(&self, s: Sym) -> &str {
        self.strings.resolve(s)
    }
    pub fn block(&self, slot: u32) -> Option<&BlockEntry> {
        self.blocks.get(slot as usize)?.as_ref()
    }
    pub fn block_slot(&self, cidr: &IpNet) -> Option<u32> {
        self.by_cidr.get(cidr).copied()
    }
    pub fn blocks(&self) -> impl Iterator<Item = (u32, &BlockEntry)> {
        self.blocks.iter().enumerate().filter_map(|(i, b)| Some((i as u32, b.as_ref()?)))
    }
    /// Blocks in a deterministic order (by address).
    pub fn blocks_sorted(&self) -> Vec<u32> {
        self.by_network.values().copied().collect()
    }
    pub fn block_count(&self) -> usize {
        self.by_cidr.len()
    }
    pub fn allocation_count(&self) -> u64 {
        self.allocated.len()
    }
    pub fn allocated(&self) -> &RoaringBitmap {
        &self.allocated
    }
    pub fn alloc(&self, g: Gid) -> Option<&Alloc> {
        self.block(gid_slot(g))?.alloc(gid_ordinal(g))
    }
    pub fn ip_of(&self, g: Gid) -> Option<IpAddr> {
        Some(ordinal_to_ip(&self.block(gid_slot(g))?.cidr, gid_ordinal(g)))
    }
    pub fn allocations_of_node(&self, node: Sym) -> Option<&RoaringBitmap> {
        self.by_node.get(&node)
    }
    pub fn nodes_with_allocations(&self) -> impl Iterator<Item = Sym> + '_ {
        self.by_node.keys().copied()
    }
    pub fn allocations_of_handle(&self, handle: HandleId) -> &[Gid] {
        self.handles.gids(handle)
    }
    pub fn host_blocks(&self, node: Sym) -> &[u32] {
        self.blocks_by_host.get(&node).map(Vec::as_slice).unwrap_or(&[])
    }
    pub fn hosts_with_blocks(&self) -> impl Iterator<Item = Sym> + '_ {
        self.blocks_by_host.keys().copied()
    }
    pub fn empty_blocks(&self) -> &RoaringBitmap {
        &self.empty_blocks
    }
    pub fn cold_blocks(&self) -> &RoaringBitmap {
        &self.cold_blocks
    }
    pub fn live_gids(&self) -> &RoaringBitmap {
        &self.live_gids
    }
    pub fn pod(&self, slot: u32) -> Option<&PodSlot> {
        self.pods.get(slot as usize)
    }
    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<&PodSlot> {
        let key = (self.strings.lookup(namespace)?, self.strings.lookup(name)?);
        self.pods.get(self.find_pod(key.0, key.1)? as usize).filter(|p| p.present)
    }
    pub fn present_pods(&self) -> impl Iterator<Item = &PodSlot> {
        self.pods.iter().filter(|p| p.present)
    }
    pub fn node_exists(&self, node: Sym) -> bool {
        self.node_bits.contains(node.0)
    }
    pub fn node(&self, node: Sym) -> Option<&NodeEntry> {
        self.nodes.get(&node)
    }
    /// The Kubernetes node name `node` stands for: its alias (etcd's orchRef mapping), else itself.
    pub fn kubernetes_name(&self, node: Sym) -> &str {
        let name = self.resolve(node);
        self.node_aliases.get(name).map_or(name, |k| k)
    }
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(|s| self.strings.resolve(*s))
    }
    pub fn affinities(&self) -> impl Iterator<Item = (&str, &AffinityEntry)> {
        self.affinities.iter().map(|(k, v)| (&**k, v))
    }
    /// A handle's allocation list, for tests that corrupt it to see the invariant check fail.
    #[cfg(test)]
    pub(crate) fn handle_gids_mut(&mut self, handle: HandleId) -> &mut HandleGids {
        self.handles.gids_mut(handle)
    }

    pub fn handles(&self) -> impl Iterator<Item = (HandleId, HandleMeta)> + '_ {
        self.handles.with_objects().filter_map(|(k, _)| Some((k, self.handle(k)?)))
    }
    /// The handle ID as Calico writes it (an allocation's `handle_id`, a handle object's name).
    pub fn handle_name(&self, handle: HandleId) -> std::borrow::Cow<'_, str> {
        self.handles.name(handle)
    }
    pub fn handle_id(&self, handle: &str) -> Option<HandleId> {
        self.handles.lookup(handle)
    }
    pub fn handle(&self, handle: HandleId) -> Option<HandleMeta> {
        let e = self.handles.object(handle)?;
        if e.revision == ODD_TOKEN {
            let (r, u) = self.odd_handle_tokens.get(&handle)?;
            return Some(HandleMeta { revision: r.to_string(), uid: u.to_string() });
        }
        Some(HandleMeta { revision: e.revision.to_string(), uid: Token::Uuid(e.uid).to_string() })
    }
    pub fn namespace_covered(&self, ns: Sym) -> bool {
        match &self.coverage {
            PodCoverage::All => true,
            PodCoverage::Namespaces(set) => set.contains(self.strings.resolve(ns)),
        }
    }

    /// The block holding `ip`, if any.
    pub fn block_containing(&self, ip: IpAddr) -> Option<u32> {
        let key = ip_sort_key(&ip);
        let (_, &slot) = self.by_network.range(..=key).next_back()?;
        let b = self.block(slot)?;
        b.cidr.contains(&ip).then_some(slot)
    }

    pub fn gid_of_ip(&self, ip: IpAddr) -> Option<Gid> {
        let slot = self.block_containing(ip)?;
        Some(gid(slot, ip_to_ordinal(&self.block(slot)?.cidr, ip)?))
    }

    pub fn vm_allocations(&self) -> &RoaringBitmap {
        &self.vm_allocs
    }

    /// Allocations whose facts changed since the last call (including gids that are no longer
    /// allocated). The GC's verdict cache is their one consumer.
    pub fn take_changed_allocations(&mut self) -> RoaringBitmap {
        std::mem::take(&mut self.changed)
    }
    /// Allocations whose facts changed and that nobody has taken yet.
    pub fn changed_allocations(&self) -> &RoaringBitmap {
        &self.changed
    }

    fn pod_facts_changed(&mut self, slot: u32) {
        if self.bulk_loading {
            // Every allocation is recorded as changed at the end of the load.
            return;
        }
        let gids = self.pods[slot as usize].allocs.as_slice();
        self.changed.extend(gids.iter().copied());
    }

    fn node_existence_changed(&mut self, node: Sym) {
        if let Some(bm) = self.by_node.get(&node) {
            self.changed |= bm;
        }
    }

    /// Nodes marked dirty since the last call, and whether a full scan was requested.
    pub fn take_dirty(&mut self) -> (BTreeSet<Box<str>>, bool) {
        (std::mem::take(&mut self.dirty_nodes), std::mem::take(&mut self.full_scan_requested))
    }
    pub fn mark_dirty(&mut self, node: &str) {
        if !node.is_empty() && !self.bulk_loading && !self.dirty_nodes.contains(node) {
            self.dirty_nodes.insert(node.into());
        }
    }
    pub fn request_full_scan(&mut self) {
        self.full_scan_requested = true;
    }
    pub fn dirty_node_count(&self) -> usize {
        self.dirty_nodes.len()
    }

    // ---- blocks ------------------------------------------------------------------------------

    /// Adds or replaces a block. A soft-deleted block (`deleted: true`) is treated as gone.
    pub fn apply_block(&mut self, block: &IpamBlock) -> Result<(), InvalidObject> {
        self.apply_prepared_block(&PreparedBlock::new(BlockView::from_block(block)?))
    }

    fn apply_prepared_block(&mut self, prepared: &PreparedBlock<'_>) -> Result<(), InvalidObject> {
        let view = &prepared.view;
        let block = view.block;
        if block.spec.deleted {
            self.delete_block(&view.cidr);
            return Ok(());
        }
        let slot = match self.by_cidr.get(&view.cidr) {
            Some(&s) => s,
            None => {
                let s = match self.free_slots.pop() {
                    Some(s) => s,
                    None => {
                        let s = self.blocks.len() as u32;
                        if s >= MAX_BLOCK_SLOTS {
                            return Err(InvalidObject::new("IPAMBlock", block.name(), "index is full (over 1M blocks)"));
                        }
                        self.blocks.push(None);
                        s
                    }
                };
                self.by_cidr.insert(view.cidr, s);
                self.by_network.insert(ip_sort_key(&view.cidr.network()), s);
                self.place_live_ips(s, &view.cidr);
                s
            }
        };
        let new_entry = self.build_entry(prepared, slot);
        let old = self.blocks[slot as usize].take();
        if let Some(old) = &old {
            self.unlink_block(slot, old, Some(&new_entry));
        } else {
            for a in &new_entry.allocs {
                self.mark_dirty_sym(a.node);
            }
        }
        self.link_block(slot, &new_entry);
        if !self.bulk_loading {
            self.changed.extend(new_entry.allocs.iter().map(|a| gid(slot, u32::from(a.ordinal))));
        }
        self.blocks[slot as usize] = Some(new_entry);
        if let Some(old) = old {
            self.release_entry_refs(slot, &old);
        }
        Ok(())
    }

    /// Removes a block and every allocation in it.
    pub fn delete_block(&mut self, cidr: &IpNet) {
        let Some(slot) = self.by_cidr.remove(cidr) else { return };
        self.unplace_live_ips(slot, cidr);
        self.by_network.remove(&ip_sort_key(&cidr.network()));
        if let Some(old) = self.blocks[slot as usize].take() {
            self.unlink_block(slot, &old, None);
            self.release_entry_refs(slot, &old);
        }
        self.free_slots.push(slot);
    }

    fn mark_dirty_sym(&mut self, node: Sym) {
        if !node.is_none() && !self.bulk_loading {
            let name = self.strings.resolve(node);
            if !self.dirty_nodes.contains(name) {
                let boxed: Box<str> = name.into();
                self.dirty_nodes.insert(boxed);
            }
        }
    }

    /// Interns the block's strings (taking references) and builds its entry.
    fn build_entry(&mut self, prepared: &PreparedBlock<'_>, slot: u32) -> BlockEntry {
        let view = &prepared.view;
        let spec = &view.block.spec;
        let owner = match &view.affinity {
            Affinity::None => BlockOwner::None,
            Affinity::Host(h) => BlockOwner::Host(self.strings.intern(h)),
            Affinity::Virtual(v) => BlockOwner::Virtual(self.strings.intern(v)),
        };
        let mut allocs = Vec::with_capacity(prepared.with_handle);
        let mut earliest: Option<Millis> = None;
        let mut cooling = Vec::new();
        let mut tags = Vec::new();
        let mut last_ns: (&str, Sym) = ("", Sym::NONE);
        let mut last_node: (&str, Sym) = ("", Sym::NONE);
        for s in &prepared.slots {
            if let Some(t) = s.released_at {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
                cooling.push(s.ordinal);
            }
            let Some(handle) = s.handle else { continue };
            // A block's addresses mostly share a node and often a namespace: the previous
            // address's symbol is reused (one more reference) when the string repeats.
            let namespace = self.intern_repeated(&mut last_ns, s.namespace);
            let pod_sym = self.strings.intern_hashed(s.pod);
            let pod_slot = if s.kind == AllocKind::Pod { self.pod_slot_ref(namespace, pod_sym, gid(slot, u32::from(s.ordinal))) } else { NO_POD };
            if !s.alloc_type.is_empty() || !s.vmi.is_empty() {
                tags.push(AllocTags { ordinal: s.ordinal, alloc_type: self.strings.intern(s.alloc_type), vmi: self.strings.intern(s.vmi) });
            }
            allocs.push(Alloc {
                ordinal: s.ordinal,
                kind: s.kind,
                handle: self.handles.intern_key(handle),
                namespace,
                pod: pod_sym,
                node: self.intern_repeated(&mut last_node, s.node),
                vm: s.vm,
                pod_slot,
                seq: s.sequence,
            });
        }
        BlockEntry {
            cidr: view.cidr,
            name: view.block.name().into(),
            revision: view.block.resource_version().into(),
            owner,
            seq: spec.sequence_number,
            allocs,
            tags: tags.into_boxed_slice(),
            used_ordinals: prepared.slots.len() as u32,
            earliest_release: earliest,
            cooling,
        }
    }

    /// Interns `s`, reusing `last`'s symbol when `s` is the string interned just before.
    fn intern_repeated<'s>(&mut self, last: &mut (&'s str, Sym), s: &'s str) -> Sym {
        if !last.1.is_none() && last.0 == s {
            self.strings.retain(last.1);
            return last.1;
        }
        let sym = self.strings.intern(s);
        *last = (s, sym);
        sym
    }

    fn release_entry_refs(&mut self, slot: u32, e: &BlockEntry) {
        match e.owner {
            BlockOwner::Host(s) | BlockOwner::Virtual(s) => self.strings.release(s),
            BlockOwner::None => {}
        }
        for t in e.tags.iter() {
            self.strings.release(t.alloc_type);
            self.strings.release(t.vmi);
        }
        for a in &e.allocs {
            self.handles.release(a.handle);
            for s in [a.namespace, a.pod, a.node] {
                self.strings.release(s);
            }
            if a.pod_slot != NO_POD {
                self.pod_slot_unref(a.pod_slot, gid(slot, u32::from(a.ordinal)));
            }
        }
    }

    fn link_block(&mut self, slot: u32, e: &BlockEntry) {
        for a in &e.allocs {
            let g = gid(slot, u32::from(a.ordinal));
            self.allocated.insert(g);
            if !a.node.is_none() {
                self.by_node.entry(a.node).or_default().insert(g);
            }
            let list = self.handles.gids_mut(a.handle);
            let first = list.as_slice().is_empty();
            list.push(g);
            if first && !self.orphans.is_empty() {
                self.orphans.remove(&a.handle);
            }
            if a.vm {
                self.vm_allocs.insert(g);
            }
        }
        if let BlockOwner::Host(h) = e.owner {
            self.blocks_by_host.entry(h).or_default().push(slot);
            if e.used_ordinals == 0 {
                self.empty_blocks.insert(slot);
            }
        }
        if e.earliest_release.is_some() {
            self.cold_blocks.insert(slot);
        }
    }

    /// Removes the old entry's bitmap memberships; marks dirty the nodes of allocations that
    /// changed or vanished (compared with `new`, if the block is being replaced).
    fn unlink_block(&mut self, slot: u32, e: &BlockEntry, new: Option<&BlockEntry>) {
        let lo = gid(slot, 0);
        let hi = gid(slot, (1 << ORDINAL_BITS) - 1);
        self.allocated.remove_range(lo..=hi);
        self.vm_allocs.remove_range(lo..=hi);
        for a in &e.allocs {
            let g = gid(slot, u32::from(a.ordinal));
            // The old allocation is gone or replaced: a verdict cached for it is stale.
            self.changed.insert(g);
            if !a.node.is_none()
                && let Some(bm) = self.by_node.get_mut(&a.node) {
                    bm.remove(g);
                    if bm.is_empty() {
                        self.by_node.remove(&a.node);
                    }
                }
            if self.handles.gids_mut(a.handle).remove(g) && self.handles.object(a.handle).is_some() {
                self.orphans.insert(a.handle);
            }
            let changed = match new.and_then(|n| n.alloc(u32::from(a.ordinal))) {
                Some(b) => b.handle != a.handle || b.seq != a.seq || b.node != a.node || b.pod != a.pod,
                None => true,
            };
            if changed {
                self.mark_dirty_sym(a.node);
            }
        }
        if let Some(n) = new {
            for b in &n.allocs {
                if e.alloc(u32::from(b.ordinal)).is_none() {
                    self.mark_dirty_sym(b.node);
                }
            }
        }
        if let BlockOwner::Host(h) = e.owner
            && let Some(list) = self.blocks_by_host.get_mut(&h) {
                list.retain(|s| *s != slot);
                if list.is_empty() {
                    self.blocks_by_host.remove(&h);
                }
            }
        self.empty_blocks.remove(slot);
        self.cold_blocks.remove(slot);
    }

    // ---- pods --------------------------------------------------------------------------------

    fn pod_slot_ref(&mut self, ns: Sym, name: Sym, g: Gid) -> u32 {
        let slot = match self.find_pod(ns, name) {
            Some(slot) => slot,
            None => self.new_pod_slot(ns, name),
        };
        self.pods[slot as usize].allocs.push(g);
        slot
    }

    fn new_pod_slot(&mut self, ns: Sym, name: Sym) -> u32 {
        self.strings.retain(ns);
        self.strings.retain(name);
        let fresh = PodSlot { namespace: ns, name, ..PodSlot::default() };
        let slot = match self.free_pods.pop() {
            Some(s) => {
                self.pods[s as usize] = fresh;
                s
            }
            None => {
                self.pods.push(fresh);
                (self.pods.len() - 1) as u32
            }
        };
        let pods = &self.pods;
        self.pod_by_key.insert_unique(pod_key_hash(ns, name), slot, |&s| pod_slot_hash(pods, s));
        slot
    }

    fn find_pod(&self, ns: Sym, name: Sym) -> Option<u32> {
        self.pod_by_key.find(pod_key_hash(ns, name), |&s| self.pods[s as usize].namespace == ns && self.pods[s as usize].name == name).copied()
    }

    fn pod_slot_unref(&mut self, slot: u32, g: Gid) {
        self.pods[slot as usize].allocs.remove(g);
        self.maybe_free_pod(slot);
    }

    fn maybe_free_pod(&mut self, slot: u32) {
        let p = &self.pods[slot as usize];
        if p.alloc_refs() > 0 || p.present {
            return;
        }
        let (ns, name) = (p.namespace, p.name);
        if let Ok(e) = self.pod_by_key.find_entry(pod_key_hash(ns, name), |&s| s == slot) {
            e.remove();
        }
        self.strings.release(ns);
        self.strings.release(name);
        self.pods[slot as usize] = PodSlot::default();
        self.free_pods.push(slot);
    }

    /// A new block: live IPs waiting in `live_unplaced` inside it become live ordinals.
    fn place_live_ips(&mut self, slot: u32, cidr: &IpNet) {
        let (lo, hi) = (ip_sort_key(&cidr.network()), ip_sort_key(&cidr.broadcast()));
        let inside: Vec<((u8, u128), u32)> = self.live_unplaced.range(lo..=hi).map(|(k, v)| (*k, *v)).collect();
        for (key, count) in inside {
            self.live_unplaced.remove(&key);
            let g = gid(slot, (key.1 - lo.1) as u32);
            self.live_gids.insert(g);
            if count > 1 {
                self.live_extra.insert(g, count - 1);
            }
        }
    }

    /// A block is going: its live ordinals go back to `live_unplaced` as addresses.
    fn unplace_live_ips(&mut self, slot: u32, cidr: &IpNet) {
        let (lo, hi) = (gid(slot, 0), gid(slot, (1 << ORDINAL_BITS) - 1));
        let live: Vec<Gid> = self.live_gids.range(lo..=hi).collect();
        for g in live {
            let count = 1 + self.live_extra.remove(&g).unwrap_or(0);
            self.live_unplaced.insert(ip_sort_key(&ordinal_to_ip(cidr, gid_ordinal(g))), count);
        }
        self.live_gids.remove_range(lo..=hi);
    }

    fn set_live_ips(&mut self, ips: &[IpAddr], add: bool) {
        for ip in ips {
            let Some(g) = self.gid_of_ip(*ip) else {
                let key = ip_sort_key(ip);
                if add {
                    *self.live_unplaced.entry(key).or_default() += 1;
                } else if let Some(c) = self.live_unplaced.get_mut(&key) {
                    *c -= 1;
                    if *c == 0 {
                        self.live_unplaced.remove(&key);
                    }
                }
                continue;
            };
            let flipped = if add {
                if self.live_gids.contains(g) {
                    *self.live_extra.entry(g).or_default() += 1;
                    false
                } else {
                    self.live_gids.insert(g)
                }
            } else if let Some(extra) = self.live_extra.get_mut(&g) {
                *extra -= 1;
                if *extra == 0 {
                    self.live_extra.remove(&g);
                }
                false
            } else {
                self.live_gids.remove(g)
            };
            if flipped && !self.bulk_loading && self.allocated.contains(g) {
                self.changed.insert(g);
            }
        }
    }

    /// Adds or replaces a pod's facts. Host-network pods hold no Calico IPs and are still
    /// recorded: an allocation naming one is judged against it like any other.
    pub fn apply_pod<P: PodObject + ?Sized>(&mut self, pod: &P) {
        let f = pod.view();
        let node = self.strings.intern(f.node);
        self.apply_pod_view(f, node);
    }

    /// [`Self::apply_pod`] with the pod's node interned already (the reference is the slot's).
    fn apply_pod_view(&mut self, f: PodView<'_>, node: Sym) {
        // A pod already known has its names interned: looked up, not interned and released.
        let known = match (self.strings.lookup(f.namespace), self.strings.lookup(f.name)) {
            (Some(ns), Some(name)) => self.find_pod(ns, name),
            _ => None,
        };
        let slot = known.unwrap_or_else(|| {
            let (ns, name) = (self.strings.intern(f.namespace), self.strings.intern(f.name));
            let slot = self.new_pod_slot(ns, name);
            self.strings.release(ns);
            self.strings.release(name);
            slot
        });
        let ips = if f.state.host_network { PodIps::None } else { PodIps::new(f.ips) };
        let old = std::mem::take(&mut self.pods[slot as usize]);
        let changed = !old.present
            || old.node != node
            || old.ips != ips
            || old.phase != phase_code(f.state.phase)
            || old.status_reports_ip != f.state.status_reports_ip
            || old.deleting != f.state.deleting;
        if old.present {
            self.set_live_ips(&old.ips, false);
            self.strings.release(old.node);
        }
        self.set_live_ips(&ips, true);
        self.pods[slot as usize] = PodSlot {
            namespace: old.namespace,
            name: old.name,
            present: true,
            node,
            phase: phase_code(f.state.phase),
            evicted: f.state.evicted,
            deleting: f.state.deleting,
            status_reports_ip: f.state.status_reports_ip,
            unparsable_ips: f.state.unparsable_ips,
            ips,
            allocs: old.allocs,
        };
        if changed {
            if old.present && old.node != node {
                self.mark_dirty_sym(old.node);
            }
            self.mark_dirty_sym(node);
        }
        self.pod_facts_changed(slot);
    }

    /// A pod is gone: its node is re-examined on the next dirty pass.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let (Some(ns), Some(n)) = (self.strings.lookup(namespace), self.strings.lookup(name)) else { return };
        let Some(slot) = self.find_pod(ns, n) else { return };
        if !self.pods[slot as usize].present {
            return;
        }
        let old = std::mem::take(&mut self.pods[slot as usize]);
        self.set_live_ips(&old.ips, false);
        self.mark_dirty_sym(old.node);
        self.strings.release(old.node);
        self.pods[slot as usize] = PodSlot { namespace: old.namespace, name: old.name, allocs: old.allocs, ..PodSlot::default() };
        self.pod_facts_changed(slot);
        self.maybe_free_pod(slot);
    }

    // ---- nodes, affinities, handles ---------------------------------------------------------

    pub fn apply_node(&mut self, node: &NodeLite) {
        let name = &node.metadata.name;
        if name.is_empty() {
            return;
        }
        let entry = NodeEntry { migration_in_progress: node.migration_in_progress() };
        match self.strings.lookup(name).filter(|s| self.nodes.contains_key(s)) {
            Some(s) => {
                self.nodes.insert(s, entry);
            }
            None => {
                let s = self.strings.intern(name);
                self.nodes.insert(s, entry);
                self.node_bits.insert(s.0);
                self.mark_dirty(name);
                self.node_existence_changed(s);
            }
        }
    }

    /// Records that node `node` stands for Kubernetes node `k8s` (`None`, or the same name: no
    /// alias). Its allocations' verdicts are re-judged: the pods they name are compared with it.
    pub fn set_node_alias(&mut self, node: &str, k8s: Option<&str>) {
        let want = k8s.filter(|k| !k.is_empty() && *k != node);
        if self.node_aliases.get(node).map(|k| &**k) == want {
            return;
        }
        match want {
            Some(k) => {
                self.node_aliases.insert(node.into(), k.into());
            }
            None => {
                self.node_aliases.remove(node);
            }
        }
        if let Some(s) = self.strings.lookup(node) {
            self.node_existence_changed(s);
            self.mark_dirty(node);
        }
    }

    /// A node is gone: as upstream, this forces a full scan.
    pub fn delete_node(&mut self, name: &str) {
        if let Some(s) = self.strings.lookup(name)
            && self.nodes.remove(&s).is_some() {
                self.node_bits.remove(s.0);
                self.node_existence_changed(s);
                self.strings.release(s);
                self.mark_dirty(name);
                self.full_scan_requested = true;
            }
    }

    /// Adds or replaces a host affinity. One whose name is not the name KDD derives from its node
    /// and CIDR (`<node>-<cidr name>`, hashed when long) is not the affinity of that node and
    /// block: it is reported invalid and dropped, so it never stands in for the real one (its
    /// node would look affine, and a node release would act on the wrong object).
    pub fn apply_affinity(&mut self, a: &BlockAffinity) -> Result<(), InvalidObject> {
        let name = a.name();
        if a.spec.deleted || !a.spec.is_host() {
            self.delete_affinity(name);
            return Ok(());
        }
        let invalid = |problem: String| InvalidObject::new(crate::model::affinity::KIND, name, problem);
        let checked = match a.spec.cidr.parse::<IpNet>() {
            Err(_) => Err(invalid(format!("cidr {:?} is not a CIDR", a.spec.cidr))),
            Ok(c) if c.network() != c.addr() => Err(invalid(format!("cidr {c} has host bits set"))),
            Ok(c) => {
                let expected = affinity_name(&a.spec.node, &c);
                if crate::model::names::is_affinity_name(name, &a.spec.node, &c) {
                    Ok(c)
                } else {
                    Err(invalid(format!("name {name:?} does not match node {:?} and cidr {c} (whose affinity is named {expected:?})", a.spec.node)))
                }
            }
        };
        let cidr = match checked {
            Ok(c) => c,
            Err(e) => {
                // A version that was valid is replaced by this one: the old entry must not linger.
                self.delete_affinity(name);
                return Err(e);
            }
        };
        let node = self.strings.intern(&a.spec.node);
        let entry = AffinityEntry { node, cidr, revision: a.resource_version().into(), state: a.spec.state.as_str().into() };
        if let Some(old) = self.affinities.insert(name.into(), entry) {
            self.strings.release(old.node);
        }
        Ok(())
    }

    pub fn delete_affinity(&mut self, name: &str) {
        if let Some(old) = self.affinities.remove(name) {
            self.strings.release(old.node);
        }
    }

    /// The handle ID the index keys a handle object by: `spec.handleID` as the IPAM library
    /// sanitizes it. Deletes must use the same key.
    pub fn handle_key<H: HandleObject + ?Sized>(h: &H) -> &str {
        sanitize_handle(h.handle_id())
    }

    /// The handle's key if its object name is the one KDD derives from its handle ID (the
    /// lowercased ID); otherwise the object is not that handle (another object claiming its ID,
    /// or one with no ID at all) and is reported invalid.
    pub fn checked_handle_key<H: HandleObject + ?Sized>(h: &H) -> Result<&str, InvalidObject> {
        let id = Self::handle_key(h);
        let name = h.object_name();
        if id.is_empty() {
            return Err(InvalidObject::new(crate::model::handle::KIND, name, "spec.handleID is empty"));
        }
        if !crate::model::names::is_handle_name(name, id) {
            let expected = handle_object_name(id);
            return Err(InvalidObject::new(
                crate::model::handle::KIND,
                name,
                format!("name {name:?} does not match handleID {id:?} (whose handle is named {expected:?})"),
            ));
        }
        Ok(id)
    }

    /// Adds or replaces a handle object (a soft-deleted one is treated as gone). One whose name
    /// contradicts its handle ID is reported invalid and changes nothing: indexed, its tokens
    /// would replace the real handle's (a delete by them would fail or hit the wrong object)
    /// and its soft delete would drop the real handle from the index.
    pub fn apply_handle(&mut self, h: &IpamHandle) -> Result<(), InvalidObject> {
        self.handle_objects().apply(PreparedHandle::new(h)?);
        Ok(())
    }

    pub fn delete_handle(&mut self, handle_id: &str) {
        self.handle_objects().delete(handle_id);
    }

    fn handle_objects(&mut self) -> HandleObjects<'_> {
        HandleObjects { table: &mut self.handles, orphans: &mut self.orphans, odd: &mut self.odd_handle_tokens }
    }

    /// Handle IDs with a handle object but no allocation referring to them, sorted.
    pub fn unreferenced_handles(&self) -> Vec<HandleId> {
        let mut v: Vec<(std::borrow::Cow<'_, str>, HandleId)> = self.orphans.iter().map(|h| (self.handle_name(*h), *h)).collect();
        v.sort();
        v.into_iter().map(|(_, h)| h).collect()
    }

    // ---- bulk ---------------------------------------------------------------------------------

    /// Replaces the whole state from a snapshot (a relist). Blocks are validated in parallel;
    /// malformed objects are returned, everything else is applied. Dirty state is cleared and a
    /// full scan requested.
    pub fn reset<'s, B, A, H, P>(&mut self, snap: Snapshot<'s, B, A, H, P>) -> Vec<InvalidObject>
    where
        B: Borrow<IpamBlock> + Sync,
        A: Borrow<BlockAffinity> + Sync,
        H: HandleObject + Sync,
        P: PodObject + Sync,
    {
        let coverage = std::mem::take(&mut self.coverage);
        // The node name mapping comes from another source than the snapshot: it stays.
        let aliases = std::mem::take(&mut self.node_aliases);
        // Every allocation of the old state changed too (it may be gone): verdicts cached for
        // those gids are stale until the GC re-judges them.
        let mut changed = std::mem::take(&mut self.changed);
        changed |= &self.allocated;
        *self = IpamIndex::new();
        self.coverage = coverage;
        self.node_aliases = aliases;
        self.changed = changed;
        self.bulk_loading = true;
        // Sizes known up front: each pod and node brings about one new string, each handle
        // object one handle.
        self.strings.reserve(snap.pods.len() + snap.nodes.len());
        self.handles.reserve(snap.handles.len());
        self.pods.reserve(snap.pods.len());
        let pods = &self.pods;
        self.pod_by_key.reserve(snap.pods.len(), |&s| pod_slot_hash(pods, s));
        // Two phases after the nodes, both on two cores. While one core fills the tables with a
        // batch of blocks, the other validates, parses and hashes the next batch (what needs no
        // index). Then one applies the pods and affinities while the other prepares and applies
        // the handle objects.
        let mut invalid = Vec::new();
        for n in snap.nodes {
            self.apply_node(n);
        }
        // Blocks before pods: a pod's IP then lands straight on its block's ordinal
        // instead of waiting in `live_unplaced` for the block.
        let prepare = |batch: &'s [B]| -> Vec<Result<PreparedBlock<'s>, InvalidObject>> {
            batch.par_iter().map(|b| BlockView::from_block(b.borrow()).map(PreparedBlock::new)).collect()
        };
        let mut batches = snap.blocks.chunks(PREPARE_BATCH);
        let mut ready = batches.next().map(prepare);
        while let Some(batch) = ready.take() {
            let next = batches.next();
            (ready, ()) = rayon::join(
                || next.map(prepare),
                || {
                    for block in batch {
                        if let Err(e) = block.and_then(|b| self.apply_prepared_block(&b)) {
                            invalid.push(e);
                        }
                    }
                },
            );
        }
        // The handle objects go into the handle table on the other core while this one applies
        // the pods and affinities: no pod or affinity touches the table, the orphans or the odd
        // tokens, so those are moved out of the index for the while and put back after.
        let mut table = std::mem::take(&mut self.handles);
        let mut orphans = std::mem::take(&mut self.orphans);
        let mut odd = std::mem::take(&mut self.odd_handle_tokens);
        let (bad_handles, bad_affinities) = rayon::join(
            || {
                let mut objects = HandleObjects { table: &mut table, orphans: &mut orphans, odd: &mut odd };
                let mut bad = Vec::new();
                for h in snap.handles {
                    match PreparedHandle::new(h) {
                        Ok(p) => objects.apply(p),
                        Err(e) => bad.push(e),
                    }
                }
                bad
            },
            || {
                // The previous pod's node symbol is reused while the node repeats (pods listed a
                // node at a time, as the simulator generates them; a LIST by name rarely does).
                let mut last_node: (&str, Sym) = ("", Sym::NONE);
                for p in snap.pods {
                    let f = p.view();
                    let node = self.intern_repeated(&mut last_node, f.node);
                    self.apply_pod_view(f, node);
                }
                snap.affinities.iter().filter_map(|a| self.apply_affinity(a.borrow()).err()).collect::<Vec<_>>()
            },
        );
        (self.handles, self.orphans, self.odd_handle_tokens) = (table, orphans, odd);
        invalid.extend(bad_affinities);
        invalid.extend(bad_handles);
        // Every allocation of the new state is new to the GC's verdict cache: recorded at once.
        self.changed |= &self.allocated;
        self.bulk_loading = false;
        debug_assert!(self.dirty_nodes.is_empty(), "a bulk load marks no node dirty");
        self.dirty_nodes.clear();
        self.full_scan_requested = true;
        self.strings.shrink_to_fit();
        // A bulk load knows its final sizes: give back the growth slack of the big tables.
        self.pods.shrink_to_fit();
        let pods = &self.pods;
        self.pod_by_key.shrink_to_fit(|&s| pod_slot_hash(pods, s));
        self.handles.shrink_to_fit();
        invalid
    }

    /// Approximate heap bytes retained by the index and facts, for `simulate`'s memory report
    /// alongside the allocator's own count.
    pub fn heap_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .flatten()
            .map(|b| std::mem::size_of::<BlockEntry>() + b.allocs.capacity() * std::mem::size_of::<Alloc>() + b.tags.len() * std::mem::size_of::<AllocTags>() + b.name.len() + b.revision.len() + b.cooling.capacity() * 2)
            .sum();
        let pods = self.pods.capacity() * std::mem::size_of::<PodSlot>()
            + self.pods.iter().map(|p| p.ips.heap_bytes()).sum::<usize>();
        let maps = self.pod_by_key.capacity() * 5
            + self.live_extra.capacity() * 9
            + self.live_unplaced.len() * 40
            + self.handles.heap_bytes()
            + self.orphans.len() * 8
            + self.by_node.values().map(|b| b.serialized_size()).sum::<usize>()
            + self.allocated.serialized_size()
            + self.live_gids.serialized_size()
            + self.changed.serialized_size();
        blocks + pods + maps + self.strings.heap_bytes()
    }

    // ---- invariants ----------------------------------------------------------------------------

    /// Cross-checks every map against the blocks and pods they are derived from. Tests, property
    /// tests and fuzz targets call this after every mutation.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.bulk_loading {
            return Err("bulk_loading is set outside reset: dirty marks would be lost".into());
        }
        if let Some((n, k)) = self.node_aliases.iter().find(|(n, k)| n.is_empty() || k.is_empty() || n == k) {
            return Err(format!("node alias {n:?} -> {k:?} is empty or names itself"));
        }
        self.strings.check_invariants()?;
        let mut allocated = RoaringBitmap::new();
        let mut by_node: HashMap<Sym, RoaringBitmap> = HashMap::new();
        let mut allocation_count = 0usize;
        let mut handle_refs: HashMap<HandleId, u32> = HashMap::new();
        let mut hosts: HashMap<Sym, Vec<u32>> = HashMap::new();
        let mut empty = RoaringBitmap::new();
        let mut cold = RoaringBitmap::new();
        let mut expected_refs: HashMap<Sym, u32> = HashMap::new();
        let mut pod_refs: HashMap<u32, u32> = HashMap::new();
        let bump = |s: Sym, m: &mut HashMap<Sym, u32>| {
            if !s.is_none() {
                *m.entry(s).or_default() += 1;
            }
        };
        if self.by_cidr.len() != self.by_network.len() {
            return Err("by_cidr and by_network disagree in size".into());
        }
        for (cidr, &slot) in &self.by_cidr {
            let b = self.block(slot).ok_or_else(|| format!("block {cidr} maps to empty slot {slot}"))?;
            if b.cidr != *cidr {
                return Err(format!("slot {slot} holds {} not {cidr}", b.cidr));
            }
            if self.by_network.get(&ip_sort_key(&cidr.network())) != Some(&slot) {
                return Err(format!("block {cidr} missing from by_network"));
            }
            if b.allocs.windows(2).any(|w| w[0].ordinal >= w[1].ordinal) {
                return Err(format!("block {cidr} allocations not sorted"));
            }
            match b.owner {
                BlockOwner::Host(h) => {
                    hosts.entry(h).or_default().push(slot);
                    bump(h, &mut expected_refs);
                    if b.used_ordinals == 0 {
                        empty.insert(slot);
                    }
                }
                BlockOwner::Virtual(v) => bump(v, &mut expected_refs),
                BlockOwner::None => {}
            }
            if b.earliest_release.is_some() {
                cold.insert(slot);
            }
            if b.tags.windows(2).any(|w| w[0].ordinal >= w[1].ordinal) {
                return Err(format!("block {cidr} tags not sorted"));
            }
            for t in b.tags.iter() {
                if t.alloc_type.is_none() && t.vmi.is_none() || b.alloc(u32::from(t.ordinal)).is_none() {
                    return Err(format!("block {cidr} tags ordinal {} with no tag or no allocation", t.ordinal));
                }
                bump(t.alloc_type, &mut expected_refs);
                bump(t.vmi, &mut expected_refs);
            }
            for a in &b.allocs {
                let g = gid(slot, u32::from(a.ordinal));
                allocated.insert(g);
                if !a.node.is_none() {
                    by_node.entry(a.node).or_default().insert(g);
                }
                allocation_count += 1;
                *handle_refs.entry(a.handle).or_default() += 1;
                for s in [a.namespace, a.pod, a.node] {
                    bump(s, &mut expected_refs);
                }
                if (a.kind == AllocKind::Pod) != (a.pod_slot != NO_POD) {
                    return Err(format!("allocation {g} kind/pod slot mismatch"));
                }
                if a.pod_slot != NO_POD {
                    let p = &self.pods[a.pod_slot as usize];
                    if p.namespace != a.namespace || p.name != a.pod {
                        return Err(format!("allocation {g} points at the wrong pod slot"));
                    }
                    *pod_refs.entry(a.pod_slot).or_default() += 1;
                }
            }
        }
        if allocated != self.allocated {
            return Err("allocated bitmap differs from blocks".into());
        }
        if by_node.len() != self.by_node.len() || by_node.iter().any(|(k, v)| self.by_node.get(k) != Some(v)) {
            return Err("by_node differs from blocks".into());
        }
        // Each list sorted in place: compared as sets.
        fn norm<K>(mut m: HashMap<K, Vec<u32>>) -> HashMap<K, Vec<u32>> {
            m.values_mut().for_each(|v| v.sort_unstable());
            m
        }
        // Each handle's list names only allocations of that handle, each once; and the lists
        // together are as long as the blocks' allocations: so each is exactly its handle's
        // allocations, checked with no copy of the map (at 750k handles a copy was this
        // check's largest cost in memory).
        let mut listed = 0usize;
        let mut sorted: Vec<Gid> = Vec::new();
        for (k, gids) in self.handles.with_allocations() {
            sorted.clear();
            sorted.extend_from_slice(gids);
            sorted.sort_unstable();
            // `allocated` holds the gids of the blocks `by_cidr` reaches (checked above).
            if sorted.windows(2).any(|w| w[0] == w[1]) || gids.iter().any(|g| !allocated.contains(*g) || self.alloc(*g).is_none_or(|a| a.handle != k)) {
                return Err("by_handle differs from blocks".into());
            }
            listed += gids.len();
        }
        if listed != allocation_count {
            return Err("by_handle differs from blocks".into());
        }
        // Block slots and gids are both u32 lists keyed by symbol: the same normalisation serves.
        let theirs: HashMap<Sym, Vec<u32>> = self.blocks_by_host.iter().map(|(k, v)| (*k, v.clone())).collect();
        if norm(hosts) != norm(theirs) {
            return Err("blocks_by_host differs from block owners".into());
        }
        if empty != self.empty_blocks {
            return Err("empty_blocks differs from blocks".into());
        }
        if cold != self.cold_blocks {
            return Err("cold_blocks differs from blocks".into());
        }
        // Pods: slot table, key map, references, live IPs.
        let mut live_refs: HashMap<IpAddr, u32> = HashMap::new();
        let free: BTreeSet<u32> = self.free_pods.iter().copied().collect();
        for (i, p) in self.pods.iter().enumerate() {
            let i = i as u32;
            if free.contains(&i) {
                if p.present || p.alloc_refs() != 0 {
                    return Err(format!("free pod slot {i} is in use"));
                }
                continue;
            }
            if !p.present && p.alloc_refs() == 0 {
                return Err(format!("pod slot {i} is neither present nor referenced"));
            }
            if self.find_pod(p.namespace, p.name) != Some(i) {
                return Err(format!("pod slot {i} not reachable by key"));
            }
            if p.alloc_refs() as u32 != pod_refs.get(&i).copied().unwrap_or(0) {
                return Err(format!("pod slot {i} has {} refs, {} allocations name it", p.alloc_refs(), pod_refs.get(&i).copied().unwrap_or(0)));
            }
            bump(p.namespace, &mut expected_refs);
            bump(p.name, &mut expected_refs);
            if p.present {
                bump(p.node, &mut expected_refs);
                for ip in p.ips.iter() {
                    *live_refs.entry(*ip).or_default() += 1;
                }
            }
        }
        if self.pod_by_key.len() + free.len() != self.pods.len() {
            return Err("pod key map size does not match live slots".into());
        }
        let mut live = RoaringBitmap::new();
        let mut extra: HashMap<Gid, u32> = HashMap::new();
        let mut unplaced: BTreeMap<(u8, u128), u32> = BTreeMap::new();
        for (ip, count) in &live_refs {
            match self.gid_of_ip(*ip) {
                Some(g) => {
                    live.insert(g);
                    if *count > 1 {
                        extra.insert(g, count - 1);
                    }
                }
                None => {
                    unplaced.insert(ip_sort_key(ip), *count);
                }
            }
        }
        if live != self.live_gids {
            return Err("live_gids differs from pods' IPs".into());
        }
        if extra.len() != self.live_extra.len() || extra.iter().any(|(k, v)| self.live_extra.get(k) != Some(v)) {
            return Err("live_extra differs from pods' shared IPs".into());
        }
        if unplaced != self.live_unplaced {
            return Err("live_unplaced differs from pods' IPs outside known blocks".into());
        }
        for n in self.nodes.keys() {
            bump(*n, &mut expected_refs);
        }
        // `changed` is a record, not derived state: any gid may be in it, stale ones included, so
        // there is nothing here to cross-check; the GC's invariant checks what it must make exact.
        let mut vms = RoaringBitmap::new();
        for (slot, b) in self.blocks() {
            for a in &b.allocs {
                if a.vm {
                    vms.insert(gid(slot, u32::from(a.ordinal)));
                }
            }
        }
        if vms != self.vm_allocs {
            return Err("vm_allocs differs from blocks".into());
        }
        let bits: RoaringBitmap = self.nodes.keys().map(|s| s.0).collect();
        if bits != self.node_bits {
            return Err("node_bits differs from nodes".into());
        }
        let odd: BTreeSet<HandleId> = self.handles.with_objects().filter(|(_, e)| e.revision == ODD_TOKEN).map(|(k, _)| k).collect();
        if odd != self.odd_handle_tokens.keys().copied().collect::<BTreeSet<HandleId>>() {
            return Err("odd handle tokens differ from handles marked odd".into());
        }
        let orphans: BTreeSet<HandleId> = self.handles.with_objects().map(|(k, _)| k).filter(|h| self.handles.gids(*h).is_empty()).collect();
        if orphans != self.orphans {
            return Err("orphan set differs from handles without allocations".into());
        }
        for a in self.affinities.values() {
            bump(a.node, &mut expected_refs);
        }
        for (h, _) in self.handles.with_objects() {
            *handle_refs.entry(h).or_default() += 1;
        }
        self.handles.check_invariants()?;
        for (h, c) in &handle_refs {
            if self.handles.ref_count(*h) != *c {
                return Err(format!("handle {:?} has {} references, {} expected", self.handle_name(*h), self.handles.ref_count(*h), c));
            }
        }
        if self.handles.live() != handle_refs.len() {
            return Err(format!("handle table holds {} handles, {} are referenced", self.handles.live(), handle_refs.len()));
        }
        for (s, c) in &expected_refs {
            if self.strings.ref_count(*s) != *c {
                return Err(format!("symbol {:?} has {} references, {} expected", self.resolve(*s), self.strings.ref_count(*s), c));
            }
        }
        if self.strings.live() != expected_refs.len() {
            return Err(format!("interner holds {} strings, {} are referenced", self.strings.live(), expected_refs.len()));
        }
        Ok(())
    }
}

fn pod_key_hash(ns: Sym, name: Sym) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<super::intern::FastHasher>::default().hash_one((ns.0, name.0))
}

fn pod_slot_hash(pods: &[PodSlot], slot: u32) -> u64 {
    let p = &pods[slot as usize];
    pod_key_hash(p.namespace, p.name)
}

/// Everything needed to rebuild the index in one go. The objects may be held by value or
/// behind any pointer that borrows as one (a shared listing of `Arc`s, say).
pub struct Snapshot<'a, B = IpamBlock, A = BlockAffinity, H = IpamHandle, P = PodFacts> {
    pub blocks: &'a [B],
    pub affinities: &'a [A],
    pub handles: &'a [H],
    pub pods: &'a [P],
    pub nodes: &'a [NodeLite],
}

impl<B, A, H, P> Default for Snapshot<'_, B, A, H, P> {
    fn default() -> Self {
        Snapshot { blocks: &[], affinities: &[], handles: &[], pods: &[], nodes: &[] }
    }
}

impl<B, A, H, P> Clone for Snapshot<'_, B, A, H, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B, A, H, P> Copy for Snapshot<'_, B, A, H, P> {}
