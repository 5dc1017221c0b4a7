//! A reference-counted string interner: every handle, pod, namespace and node name is stored once
//! and referred to by a 4-byte [`Sym`].
//!
//! Strings are kept once, back to back in one arena, and found through a table of symbol numbers
//! probed by the string's hash (4 bytes a slot, compared against the arena on a hit), so a
//! 150k-allocation cluster pays for each name one time.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use hashbrown::HashTable;

/// A multiply-rotate hasher for the index's integer keys (symbols, ids, addresses): several
/// times faster than SipHash there, and the keys are not attacker-chosen strings.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = (self.0.rotate_left(5) ^ hash_bytes(bytes)).wrapping_mul(K);
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(K);
    }
    fn write_u128(&mut self, i: u128) {
        self.write_u64(i as u64);
        self.write_u64((i >> 64) as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

const K: u64 = 0x517c_c1b7_2722_0a95;

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// An interned string. `Sym::NONE` stands for "absent or empty".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Sym(pub u32);

impl Sym {
    pub const NONE: Sym = Sym(0);
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

#[derive(Debug)]
pub struct Interner {
    /// Every live string's bytes back to back: one allocation instead of one per string (which
    /// costs a 16-byte pointer and the allocator's own header each). Freed strings leave garbage
    /// that is compacted away once it outweighs the live bytes.
    arena: String,
    garbage: usize,
    /// Symbol -> (offset, length) in `arena`. Slot 0 is the empty string and is never freed.
    spans: Vec<(u32, u32)>,
    refs: Vec<u32>,
    free: Vec<u32>,
    /// Live symbols by their string's hash.
    by_hash: HashTable<u32>,
}

/// FxHash-style multiply-rotate over 8-byte words: fast and good enough for a table whose
/// collisions are handled exactly.
pub fn hash_str(s: &str) -> u64 {
    hash_bytes(s.as_bytes())
}

pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^ (h >> 29)
}

/// A string with its [`hash_str`].
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'a>(&'a str, u64);

impl<'a> Hashed<'a> {
    pub fn new(s: &'a str) -> Hashed<'a> {
        Hashed(s, if s.is_empty() { 0 } else { hash_str(s) })
    }
}

fn span_str(arena: &str, (o, l): (u32, u32)) -> &str {
    &arena[o as usize..(o + l) as usize]
}

/// `Default` is the same valid, empty interner as `new()` (slot 0 reserved), so an index built
/// with `IpamIndex::default()` works too.
impl Default for Interner {
    fn default() -> Self {
        Interner {
            arena: String::new(),
            garbage: 0,
            spans: vec![(0, 0)],
            refs: vec![u32::MAX],
            free: Vec::new(),
            by_hash: HashTable::new(),
        }
    }
}

impl Interner {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn lookup(&self, s: &str) -> Option<Sym> {
        if s.is_empty() {
            return Some(Sym::NONE);
        }
        self.lookup_hashed(s, hash_str(s))
    }

    fn lookup_hashed(&self, s: &str, h: u64) -> Option<Sym> {
        self.by_hash.find(h, |&id| self.resolve(Sym(id)) == s).map(|&id| Sym(id))
    }

    /// Interns `s` and takes one reference on it.
    pub fn intern(&mut self, s: &str) -> Sym {
        self.intern_hashed(Hashed::new(s))
    }

    /// [`Self::intern`] of a string whose hash was taken before (on another thread, in a bulk
    /// load).
    pub fn intern_hashed(&mut self, Hashed(s, h): Hashed<'_>) -> Sym {
        if s.is_empty() {
            return Sym::NONE;
        }
        if let Some(sym) = self.lookup_hashed(s, h) {
            self.refs[sym.0 as usize] += 1;
            return sym;
        }
        if self.arena.len() + s.len() > self.arena.capacity() {
            // Grow by an eighth, not double: the arena is the interner's bulk, and doubling would
            // leave up to half of it unused.
            self.arena.reserve_exact((self.arena.len() / 8).max(s.len()).max(4096));
        }
        let span = (self.arena.len() as u32, s.len() as u32);
        self.arena.push_str(s);
        let id = match self.free.pop() {
            Some(id) => {
                self.spans[id as usize] = span;
                self.refs[id as usize] = 1;
                id
            }
            None => {
                self.spans.push(span);
                self.refs.push(1);
                (self.spans.len() - 1) as u32
            }
        };
        let (arena, spans) = (&self.arena, &self.spans);
        self.by_hash.insert_unique(h, id, |&j| hash_str(span_str(arena, spans[j as usize])));
        Sym(id)
    }

    /// Makes room for `additional` more strings, so a bulk load does not rehash its way up.
    pub fn reserve(&mut self, additional: usize) {
        let (arena, spans) = (&self.arena, &self.spans);
        self.by_hash.reserve(additional, |&j| hash_str(span_str(arena, spans[j as usize])));
        self.spans.reserve(additional);
        self.refs.reserve(additional);
    }

    /// Takes another reference on an interned symbol.
    pub fn retain(&mut self, sym: Sym) {
        if !sym.is_none() {
            self.refs[sym.0 as usize] += 1;
        }
    }

    /// Drops one reference; the string is freed with the last one.
    pub fn release(&mut self, sym: Sym) {
        if sym.is_none() {
            return;
        }
        let id = sym.0 as usize;
        debug_assert!(self.refs[id] > 0, "release of a dead symbol");
        self.refs[id] = self.refs[id].saturating_sub(1);
        if self.refs[id] > 0 {
            return;
        }
        let h = hash_str(self.resolve(sym));
        if let Ok(e) = self.by_hash.find_entry(h, |&j| j == sym.0) {
            e.remove();
        }
        self.garbage += self.spans[id].1 as usize;
        self.spans[id] = (0, 0);
        self.free.push(id as u32);
        if self.garbage > 1 << 16 && self.garbage > self.arena.len() / 2 {
            self.compact();
        }
    }

    /// Rewrites the arena with only the live strings; symbols keep their numbers.
    fn compact(&mut self) {
        let mut arena = String::with_capacity(self.arena.len() - self.garbage);
        for (id, span) in self.spans.iter_mut().enumerate().skip(1) {
            if self.refs[id] == 0 {
                continue;
            }
            let (o, l) = (span.0 as usize, span.1 as usize);
            *span = (arena.len() as u32, span.1);
            arena.push_str(&self.arena[o..o + l]);
        }
        self.arena = arena;
        self.garbage = 0;
    }

    /// Returns spare arena capacity after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        self.arena.shrink_to_fit();
    }

    pub fn resolve(&self, sym: Sym) -> &str {
        span_str(&self.arena, self.spans[sym.0 as usize])
    }

    pub fn live(&self) -> usize {
        self.spans.len() - 1 - self.free.len()
    }

    pub fn ref_count(&self, sym: Sym) -> u32 {
        self.refs[sym.0 as usize]
    }

    /// Heap bytes held by the interner (strings and tables), for memory reports.
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.spans.capacity() * 8
            + self.refs.capacity() * 4
            + self.free.capacity() * 4
            + self.by_hash.capacity() * 5
    }

    /// Every live string is found by lookup, every free slot is unreachable, and counts agree.
    pub fn check_invariants(&self) -> Result<(), String> {
        let free: std::collections::HashSet<u32> = self.free.iter().copied().collect();
        if free.len() != self.free.len() {
            return Err("interner free list has duplicates".into());
        }
        let mut reachable = 0;
        if self.spans.iter().skip(1).map(|(_, l)| *l as usize).sum::<usize>() + self.garbage != self.arena.len() {
            return Err("interner arena size is not live bytes plus garbage".into());
        }
        for id in 1..self.spans.len() {
            let s = self.resolve(Sym(id as u32));
            let id = id as u32;
            if free.contains(&id) {
                if self.refs[id as usize] != 0 {
                    return Err(format!("free symbol {id} still has references"));
                }
                continue;
            }
            if self.refs[id as usize] == 0 {
                return Err(format!("symbol {id} ({s:?}) is live with no references"));
            }
            if self.lookup(s) != Some(Sym(id)) {
                return Err(format!("symbol {id} ({s:?}) is not found by lookup"));
            }
            reachable += 1;
        }
        if self.by_hash.len() != reachable {
            return Err(format!("interner table holds {} entries for {reachable} strings", self.by_hash.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn interning_twice_gives_the_same_symbol_and_last_release_frees_it() {
        let mut i = Interner::new();
        let a = i.intern("node-1");
        assert_eq!(i.intern("node-1"), a);
        assert_eq!(i.resolve(a), "node-1");
        i.release(a);
        assert_eq!(i.lookup("node-1"), Some(a));
        i.release(a);
        assert_eq!(i.lookup("node-1"), None);
        assert_eq!(i.intern(""), Sym::NONE);
        i.check_invariants().unwrap();
    }

    #[test]
    fn freed_strings_are_compacted_away_and_survivors_keep_their_symbols() {
        let mut i = Interner::new();
        let syms: Vec<Sym> = (0..20_000).map(|n| i.intern(&format!("k8s-pod-network.{n:040}"))).collect();
        for (n, s) in syms.iter().enumerate() {
            if n % 10 != 0 {
                i.release(*s);
            }
        }
        assert!(i.arena.len() < 20_000 * 56 / 2, "compaction ran: {} bytes", i.arena.len());
        for (n, s) in syms.iter().enumerate().filter(|(n, _)| n % 10 == 0) {
            assert_eq!(i.resolve(*s), format!("k8s-pod-network.{n:040}"));
            assert_eq!(i.lookup(&format!("k8s-pod-network.{n:040}")), Some(*s));
        }
        i.check_invariants().unwrap();
    }

    proptest! {
        #[test]
        fn interner_matches_a_counting_model(ops in proptest::collection::vec((0u8..12, any::<bool>()), 0..300)) {
            let mut i = Interner::new();
            let mut model: std::collections::HashMap<String, u32> = Default::default();
            for (k, add) in ops {
                let s = format!("s{k}");
                if add {
                    i.intern(&s);
                    *model.entry(s).or_default() += 1;
                } else if let Some(c) = model.get_mut(&s) {
                    i.release(i.lookup(&s).unwrap());
                    *c -= 1;
                    if *c == 0 { model.remove(&s); }
                }
                i.check_invariants().map_err(TestCaseError::fail)?;
            }
            prop_assert_eq!(i.live(), model.len());
            for (s, c) in model { prop_assert_eq!(i.ref_count(i.lookup(&s).unwrap()), c); }
        }
    }
}
