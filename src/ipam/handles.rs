//! The handle table: every handle ID the index knows, from an allocation or an IPAMHandle object,
//! with what the index keeps per handle (its allocations, the object's compare-and-swap tokens).
//!
//! Handle IDs are the bulk of a cluster's strings: a pod's is `k8s-pod-network.` and its
//! container's 64-hex ID, 80 bytes. Those are stored as the ID's 32 bytes; any other shape
//! (tunnels, LoadBalancer, Windows-reserved, upper-case hex) keeps its text. One record per
//! handle, found through a table of record numbers, replaces what used to be a string in the
//! interner plus two maps keyed by its symbol.
//!
//! Records are reference counted like interned strings: each allocation naming a handle holds
//! one reference and a present handle object holds one; the record is freed with the last.

use std::borrow::Cow;

use hashbrown::HashTable;

use super::index::{Gid, HandleEntry, HandleGids};
use super::intern::{hash_bytes, FastMap};

/// A handle known to the index. Numbers are reused after a handle is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandleId(pub u32);

/// What Calico's CNI plugin names a pod's handle: this prefix and the container ID.
pub const POD_HANDLE_PREFIX: &str = "k8s-pod-network.";

/// A key as looked up, without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyRef<'a> {
    Container([u8; 32]),
    Text(&'a str),
}

impl KeyRef<'_> {
    fn parse(s: &str) -> KeyRef<'_> {
        match container_bytes(s) {
            Some(b) => KeyRef::Container(b),
            None => KeyRef::Text(s),
        }
    }
    fn hash(self) -> u64 {
        match self {
            KeyRef::Container(b) => hash_bytes(&b) ^ 0x9e37_79b9_7f4a_7c15,
            KeyRef::Text(s) => hash_bytes(s.as_bytes()),
        }
    }
}

/// Lower-case hex digits' values; `NOT_HEX` for every other byte.
const HEX: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};
const NOT_HEX: u8 = 0xff;

/// The value of a lower-case hex digit.
pub(crate) fn hex_digit(c: u8) -> Option<u8> {
    let v = HEX[usize::from(c)];
    (v != NOT_HEX).then_some(v)
}

/// The container ID's bytes when `s` is a pod handle with a 64-hex, lower-case container ID
/// (only then does writing the bytes back give `s` again).
fn container_bytes(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix(POD_HANDLE_PREFIX)?.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
        // One test at the end instead of a branch a digit: NOT_HEX has the high bit set.
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 15);
    }
    (bad & 0x80 == 0).then_some(out)
}

fn container_text(b: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(POD_HANDLE_PREFIX.len() + 64);
    s.push_str(POD_HANDLE_PREFIX);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

/// 80 bytes: the key's 32 bytes, counts and flags in what would be padding, the allocations
/// (two inline), the object's tokens.
#[derive(Debug, Clone)]
struct Record {
    /// `k8s-pod-network.` and 64 lower-case hex digits: the 32 bytes they spell. Any other
    /// handle ID is in the table's `texts` under the record's number (and this is zero).
    container: [u8; 32],
    refs: u32,
    text: bool,
    /// A handle object is present; `object` holds its tokens.
    has_object: bool,
    /// The allocations naming this handle (kept by the index: linked when their block is).
    gids: HandleGids,
    object: HandleEntry,
}

impl Record {
    fn object(&self) -> Option<HandleEntry> {
        self.has_object.then_some(self.object)
    }
}

/// What a freed record holds until its number is reused.
const FREE: Record =
    Record { container: [0; 32], refs: 0, text: false, has_object: false, gids: HandleGids::EMPTY, object: HandleEntry::NONE };

#[derive(Debug, Default)]
pub struct HandleTable {
    records: Vec<Record>,
    free: Vec<u32>,
    /// Handle IDs of any other shape than a pod's, by record number.
    texts: FastMap<u32, Box<str>>,
    /// Record numbers of the live records, by their key's hash.
    by_key: HashTable<u32>,
}

/// A record's key, read through the table (text keys live beside the records).
fn key_of<'a>(records: &[Record], texts: &'a FastMap<u32, Box<str>>, i: u32) -> KeyRef<'a> {
    let r = &records[i as usize];
    if r.text {
        KeyRef::Text(texts.get(&i).map_or("", |t| t))
    } else {
        KeyRef::Container(r.container)
    }
}

/// A handle ID parsed into the table's key form and hashed, ready to look up: made where it
/// is cheap (on another thread, in a bulk load), used by the table's owner.
#[derive(Clone, Copy)]
pub struct HandleKey<'a> {
    key: KeyRef<'a>,
    hash: u64,
}

impl<'a> HandleKey<'a> {
    pub fn new(s: &'a str) -> HandleKey<'a> {
        let key = KeyRef::parse(s);
        HandleKey { key, hash: key.hash() }
    }
}

impl HandleTable {
    fn key(&self, i: u32) -> KeyRef<'_> {
        key_of(&self.records, &self.texts, i)
    }

    pub fn lookup(&self, s: &str) -> Option<HandleId> {
        self.lookup_key(HandleKey::new(s))
    }

    pub fn lookup_key(&self, HandleKey { key: k, hash }: HandleKey<'_>) -> Option<HandleId> {
        self.by_key.find(hash, |&i| self.key(i) == k).map(|&i| HandleId(i))
    }

    /// Finds or adds the handle `s` (non-empty) and takes one reference on it.
    pub fn intern(&mut self, s: &str) -> HandleId {
        self.intern_key(HandleKey::new(s))
    }

    /// [`Self::intern`] of a parsed key.
    pub fn intern_key(&mut self, HandleKey { key: k, hash: h }: HandleKey<'_>) -> HandleId {
        if let Some(&i) = self.by_key.find(h, |&i| self.key(i) == k) {
            self.records[i as usize].refs += 1;
            return HandleId(i);
        }
        let (container, text) = match k {
            KeyRef::Container(b) => (b, false),
            KeyRef::Text(_) => ([0; 32], true),
        };
        let rec = Record { container, refs: 1, text, ..FREE };
        let i = match self.free.pop() {
            Some(i) => {
                self.records[i as usize] = rec;
                i
            }
            None => {
                self.records.push(rec);
                (self.records.len() - 1) as u32
            }
        };
        if let KeyRef::Text(t) = k {
            self.texts.insert(i, t.into());
        }
        let (records, texts) = (&self.records, &self.texts);
        self.by_key.insert_unique(h, i, |&j| key_of(records, texts, j).hash());
        HandleId(i)
    }

    pub fn retain(&mut self, id: HandleId) {
        self.records[id.0 as usize].refs += 1;
    }

    /// Drops one reference; the record is freed with the last.
    pub fn release(&mut self, id: HandleId) {
        let rec = &mut self.records[id.0 as usize];
        debug_assert!(rec.refs > 0, "release of a freed handle");
        rec.refs = rec.refs.saturating_sub(1);
        if rec.refs > 0 {
            return;
        }
        let h = self.key(id.0).hash();
        if let Ok(e) = self.by_key.find_entry(h, |&i| i == id.0) {
            e.remove();
        }
        self.records[id.0 as usize] = FREE;
        self.texts.remove(&id.0);
        self.free.push(id.0);
    }

    /// The handle ID as Calico writes it.
    pub fn name(&self, id: HandleId) -> Cow<'_, str> {
        match self.key(id.0) {
            KeyRef::Container(b) => Cow::Owned(container_text(&b)),
            KeyRef::Text(t) => Cow::Borrowed(t),
        }
    }

    pub fn gids(&self, id: HandleId) -> &[Gid] {
        self.records.get(id.0 as usize).map_or(&[], |r| r.gids.as_slice())
    }

    pub(crate) fn gids_mut(&mut self, id: HandleId) -> &mut HandleGids {
        &mut self.records[id.0 as usize].gids
    }

    pub fn object(&self, id: HandleId) -> Option<HandleEntry> {
        self.records.get(id.0 as usize).and_then(Record::object)
    }

    /// Records the handle object's tokens; returns the ones it replaces.
    pub(crate) fn set_object(&mut self, id: HandleId, e: Option<HandleEntry>) -> Option<HandleEntry> {
        let r = &mut self.records[id.0 as usize];
        let old = r.object();
        (r.has_object, r.object) = (e.is_some(), e.unwrap_or(HandleEntry::NONE));
        old
    }

    /// Handles with an object, in record order.
    pub fn with_objects(&self) -> impl Iterator<Item = (HandleId, HandleEntry)> + '_ {
        self.records.iter().enumerate().filter_map(|(i, r)| Some((HandleId(i as u32), r.object()?)))
    }

    /// Handles with at least one allocation, in record order.
    pub fn with_allocations(&self) -> impl Iterator<Item = (HandleId, &[Gid])> + '_ {
        self.records.iter().enumerate().filter(|(_, r)| !r.gids.as_slice().is_empty()).map(|(i, r)| (HandleId(i as u32), r.gids.as_slice()))
    }

    pub fn live(&self) -> usize {
        self.records.len() - self.free.len()
    }

    pub fn ref_count(&self, id: HandleId) -> u32 {
        self.records[id.0 as usize].refs
    }

    pub fn reserve(&mut self, additional: usize) {
        self.records.reserve(additional);
        let (records, texts) = (&self.records, &self.texts);
        self.by_key.reserve(additional, |&j| key_of(records, texts, j).hash());
    }

    pub fn shrink_to_fit(&mut self) {
        self.records.shrink_to_fit();
        let (records, texts) = (&self.records, &self.texts);
        self.by_key.shrink_to_fit(|&j| key_of(records, texts, j).hash());
    }

    pub fn heap_bytes(&self) -> usize {
        let text: usize = self.texts.values().map(|t| t.len() + 24).sum();
        let spilled: usize = self.records.iter().map(|r| r.gids.heap_bytes()).sum();
        self.records.capacity() * std::mem::size_of::<Record>() + self.free.capacity() * 4 + self.by_key.capacity() * 5 + text + spilled
    }

    /// Every live record is found by its key and only under its own number; free records hold
    /// nothing; no two live records share a key.
    pub fn check_invariants(&self) -> Result<(), String> {
        let free: std::collections::HashSet<u32> = self.free.iter().copied().collect();
        if free.len() != self.free.len() {
            return Err("handle table free list has duplicates".into());
        }
        for (i, r) in self.records.iter().enumerate() {
            let i = i as u32;
            if free.contains(&i) {
                if r.refs != 0 || r.has_object || r.text || !r.gids.as_slice().is_empty() || self.texts.contains_key(&i) {
                    return Err(format!("free handle record {i} holds something"));
                }
                continue;
            }
            if r.refs == 0 {
                return Err(format!("handle record {i} is live with no reference"));
            }
            if r.text != self.texts.contains_key(&i) {
                return Err(format!("handle record {i}: text flag and text table disagree"));
            }
            if let KeyRef::Text(t) = self.key(i)
                && (t.is_empty() || container_bytes(t).is_some())
            {
                return Err(format!("handle record {i} keeps {t:?} as text"));
            }
            let name = self.name(HandleId(i));
            if self.lookup(&name) != Some(HandleId(i)) {
                return Err(format!("handle {name:?} (record {i}) is not found by its name"));
            }
        }
        if self.texts.len() > self.live() {
            return Err("handle table keeps texts of freed records".into());
        }
        if self.by_key.len() != self.live() {
            return Err(format!("handle table indexes {} records, {} are live", self.by_key.len(), self.live()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "k8s-pod-network.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn container_handles_are_kept_as_bytes_and_written_back_exactly() {
        assert!(container_bytes(POD).is_some());
        assert_eq!(container_text(&container_bytes(POD).unwrap()), POD);
        // Anything that would not come back byte for byte stays text.
        for other in [
            "k8s-pod-network.0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "k8s-pod-network.0123",
            "k8s-pod-network.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdefa",
            "k8s-pod-network.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeg",
            "ipip-tunnel-addr-node-1",
            "windows-reserved-ipam-handle",
        ] {
            assert!(container_bytes(other).is_none(), "{other}");
        }
    }

    #[test]
    fn a_record_is_80_bytes() {
        assert_eq!(std::mem::size_of::<Record>(), 80);
    }

    #[test]
    fn records_are_counted_found_and_freed() {
        let mut t = HandleTable::default();
        let a = t.intern(POD);
        let b = t.intern("ipip-tunnel-addr-node-1");
        assert_eq!(t.intern(POD), a);
        assert_eq!((t.ref_count(a), t.live()), (2, 2));
        assert_eq!(t.name(a), POD);
        assert_eq!(t.name(b), "ipip-tunnel-addr-node-1");
        assert_eq!(t.lookup(POD), Some(a));
        assert_eq!(t.lookup("k8s-pod-network.other"), None);
        t.check_invariants().unwrap();
        t.release(a);
        t.release(a);
        assert_eq!((t.lookup(POD), t.live()), (None, 1));
        t.check_invariants().unwrap();
        // A freed number is reused by the next handle.
        let c = t.intern("k8s-pod-network.x");
        assert_eq!(c, a);
        t.check_invariants().unwrap();
    }
}
