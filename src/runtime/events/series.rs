//! The pure half of event recording: which observation creates a Kubernetes Event and which
//! one only bumps the `series` of an Event already written.
//!
//! Owns: the series table (key → the Event's name, count and last observation), its time to
//! live, its memory bound, the Event names it hands out, and [`SeriesTable::check_invariants`].
//! Must not: do I/O, read a clock (callers pass monotonic `now` and the wall time used only to
//! name new Events) or know what an Event looks like on the wire.
//!
//! Semantics: the first observation of a key starts a series (the shell creates an Event); an
//! observation of the same key within [`SERIES_TTL`] of the series' latest one joins it (the
//! shell patches `series.count` and `series.lastObservedTime`); a later one starts a new series
//! under a new name. A failed create or an Event found deleted is reported back with
//! [`SeriesTable::forget`], so the next observation starts afresh.

use std::collections::HashMap;

use crate::model::time::Millis;

/// An observation joins the series when the previous one is at most this old. Six minutes, as
/// client-go's events.k8s.io recorder: a GC running full passes every few minutes keeps one
/// series per node and reason through a long cleanup, and a quiet quarter hour later the next
/// release is a new Event, not count 57 of yesterday's. Well below the API server's default
/// Event TTL (one hour), so a series is rarely patched after the server dropped its Event.
pub const SERIES_TTL: Millis = 6 * 60 * 1000;

/// At most this many series are remembered. A key is a (node, reason) pair in practice, so this
/// covers a cleanup of thousands of nodes within one TTL; beyond it the stalest series is
/// forgotten (its next observation makes a new Event: more objects, never a wrong count).
pub const MAX_SERIES: usize = 4096;

/// Kubernetes object names (DNS subdomains) are at most this long.
const MAX_NAME: usize = 253;

/// What an Event is about and why: the series identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub kind: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    pub reason: String,
    pub action: String,
}

/// What the shell must write for one observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeriesStep {
    /// A new Event of this name.
    Create { name: String },
    /// The Event `name` now has `count` observations (at least 2).
    Update { name: String, count: u32 },
}

#[derive(Debug, Clone)]
struct Series {
    name: String,
    count: u32,
    last_seen: Millis,
}

/// Series by key, bounded in time ([`SERIES_TTL`]) and size ([`MAX_SERIES`]).
#[derive(Debug, Clone)]
pub struct SeriesTable {
    series: HashMap<SeriesKey, Series>,
    ttl: Millis,
    cap: usize,
    /// Makes names unique within this process even for several Events in one millisecond.
    next_id: u64,
}

impl Default for SeriesTable {
    fn default() -> Self {
        SeriesTable::new(SERIES_TTL, MAX_SERIES)
    }
}

impl SeriesTable {
    /// `cap` is at least 1.
    pub fn new(ttl: Millis, cap: usize) -> Self {
        SeriesTable { series: HashMap::new(), ttl, cap: cap.max(1), next_id: 0 }
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// One observation of `key` at monotonic `now`; `wall` (Unix millis) only names a new Event.
    pub fn observe(&mut self, key: &SeriesKey, now: Millis, wall: Millis) -> SeriesStep {
        if let Some(s) = self.series.get_mut(key)
            && now - s.last_seen <= self.ttl
        {
            s.count = s.count.saturating_add(1);
            s.last_seen = s.last_seen.max(now);
            return SeriesStep::Update { name: s.name.clone(), count: s.count };
        }
        // A new series: make room first (expired ones, then the stalest).
        self.series.remove(key);
        self.evict_expired(now);
        while self.series.len() >= self.cap {
            let Some(stalest) = self.series.iter().min_by_key(|(k, s)| (s.last_seen, *k)).map(|(k, _)| k.clone()) else { break };
            self.series.remove(&stalest);
        }
        let name = event_name(&key.name, wall, self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.series.insert(key.clone(), Series { name: name.clone(), count: 1, last_seen: now });
        SeriesStep::Create { name }
    }

    /// Drops `key`'s series (its create failed, or its Event is gone): the next observation
    /// creates a new Event.
    pub fn forget(&mut self, key: &SeriesKey) {
        self.series.remove(key);
    }

    /// Drops every series whose latest observation is older than the TTL at `now`.
    pub fn evict_expired(&mut self, now: Millis) {
        let ttl = self.ttl;
        self.series.retain(|_, s| now - s.last_seen <= ttl);
    }

    /// The table's laws: within its cap, every count at least 1, names valid Kubernetes object
    /// names and unique (two live series never patch the same Event).
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.series.len() > self.cap {
            return Err(format!("{} series over the cap of {}", self.series.len(), self.cap));
        }
        let mut names = std::collections::HashSet::new();
        for (key, s) in &self.series {
            if s.count == 0 {
                return Err(format!("series {key:?} has count 0"));
            }
            if !is_dns_subdomain(&s.name) {
                return Err(format!("series {key:?} has an invalid Event name {:?}", s.name));
            }
            if !names.insert(s.name.as_str()) {
                return Err(format!("Event name {:?} used by two series", s.name));
            }
        }
        Ok(())
    }
}

/// `<object name>.<wall ms><id>` in hex, as kubelet names Events after the object: readable in
/// `kubectl get events`, unique per process. The object's name is cut (and made a valid name)
/// so the whole stays within 253 characters.
fn event_name(object: &str, wall: Millis, id: u64) -> String {
    let suffix = format!("{:x}{:04x}", wall.max(0), id & 0xffff);
    let keep = MAX_NAME - suffix.len() - 1;
    let mut prefix: String = object
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .take(keep)
        .collect();
    // Each dot-separated label must start and end alphanumeric; the prefix ends before a dot.
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    let prefix: Vec<&str> = prefix.split('.').map(|l| l.trim_matches('-')).filter(|l| !l.is_empty()).collect();
    if prefix.is_empty() { format!("event.{suffix}") } else { format!("{}.{suffix}", prefix.join(".")) }
}

/// RFC 1123 subdomain: lowercase alphanumeric labels with inner dashes, dots between, ≤ 253.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(node: &str, reason: &str) -> SeriesKey {
        SeriesKey { kind: "Node".into(), namespace: String::new(), name: node.into(), reason: reason.into(), action: "Release".into() }
    }

    #[test]
    fn a_repeat_within_the_ttl_updates_the_first_event_and_a_late_one_starts_a_new_event() {
        let mut t = SeriesTable::default();
        let k = key("n1", "IPAddressesReleased");
        let SeriesStep::Create { name } = t.observe(&k, 0, 1_700_000_000_000) else { panic!("first observation creates") };
        assert!(name.starts_with("n1."), "{name}");
        assert_eq!(t.observe(&k, SERIES_TTL, 0), SeriesStep::Update { name: name.clone(), count: 2 });
        // The TTL counts from the latest observation, so a steady trickle stays one series.
        assert_eq!(t.observe(&k, 2 * SERIES_TTL, 0), SeriesStep::Update { name: name.clone(), count: 3 });
        let SeriesStep::Create { name: next } = t.observe(&k, 3 * SERIES_TTL + 1, 1) else { panic!("a late observation creates") };
        assert_ne!(next, name);
        t.check_invariants().unwrap();
    }

    #[test]
    fn reason_action_and_object_each_make_their_own_series() {
        let mut t = SeriesTable::default();
        let mut names = Vec::new();
        for k in [key("n1", "A"), key("n1", "B"), key("n2", "A"), SeriesKey { action: "Other".into(), ..key("n1", "A") }] {
            match t.observe(&k, 5, 5) {
                SeriesStep::Create { name } => names.push(name),
                step => panic!("{k:?} should start a series, got {step:?}"),
            }
        }
        assert_eq!(t.len(), 4);
        t.check_invariants().unwrap();
    }

    #[test]
    fn a_forgotten_series_is_created_again() {
        let mut t = SeriesTable::default();
        let k = key("n1", "A");
        t.observe(&k, 0, 0);
        t.forget(&k);
        assert!(matches!(t.observe(&k, 1, 1), SeriesStep::Create { .. }));
    }

    #[test]
    fn the_table_never_outgrows_its_cap_and_drops_the_stalest_series_first() {
        let mut t = SeriesTable::new(SERIES_TTL, 3);
        for (i, n) in ["a", "b", "c", "d"].into_iter().enumerate() {
            t.observe(&key(n, "R"), i as Millis, 0);
            t.check_invariants().unwrap();
        }
        assert_eq!(t.len(), 3);
        assert!(matches!(t.observe(&key("a", "R"), 10, 0), SeriesStep::Create { .. }), "a, the stalest, was dropped");
        assert!(matches!(t.observe(&key("d", "R"), 11, 0), SeriesStep::Update { count: 2, .. }));
    }

    #[test]
    fn expired_series_are_evicted() {
        let mut t = SeriesTable::default();
        t.observe(&key("a", "R"), 0, 0);
        t.observe(&key("b", "R"), SERIES_TTL, 0);
        t.evict_expired(SERIES_TTL + 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn event_names_are_valid_whatever_the_object_is_called() {
        for object in ["n1", "Node_With.Caps", "-.-", "", "a..b", &"x".repeat(300), "é.node-"] {
            let name = event_name(object, 1_700_000_000_123, 7);
            assert!(is_dns_subdomain(&name), "{object:?} → {name:?}");
        }
        assert_eq!(event_name("worker-1.example", 0x10, 1), "worker-1.example.100001");
    }

    proptest! {
        #[test]
        fn n_observations_within_the_ttl_are_one_create_and_n_minus_1_updates(n in 1u32..200, gaps in proptest::collection::vec(0..=SERIES_TTL, 200)) {
            let mut t = SeriesTable::default();
            let k = key("n1", "IPAddressesReleased");
            let (mut creates, mut updates, mut now, mut last_count) = (0, 0, 0, 0);
            for i in 0..n {
                now += gaps[i as usize];
                match t.observe(&k, now, now) {
                    SeriesStep::Create { .. } => creates += 1,
                    SeriesStep::Update { count, .. } => { updates += 1; last_count = count; }
                }
                t.check_invariants().unwrap();
            }
            prop_assert_eq!(creates, 1);
            prop_assert_eq!(updates, n - 1);
            if n > 1 { prop_assert_eq!(last_count, n); }
        }

        #[test]
        fn any_sequence_keeps_the_invariants_and_counts_match_a_model(ops in proptest::collection::vec((0u8..6, 0u8..3, 0..=2 * SERIES_TTL, any::<bool>()), 1..300)) {
            let mut t = SeriesTable::new(SERIES_TTL, 4);
            // Model: key → (count, last_seen), with the same eviction rule.
            let mut model: std::collections::BTreeMap<SeriesKey, (u32, Millis)> = Default::default();
            let mut now = 0;
            for (node, reason, gap, forget) in ops {
                now += gap;
                let k = key(&format!("n{node}"), &format!("r{reason}"));
                if forget {
                    t.forget(&k);
                    model.remove(&k);
                    continue;
                }
                let step = t.observe(&k, now, now);
                let joined = model.get(&k).is_some_and(|(_, last)| now - last <= SERIES_TTL);
                if joined {
                    let e = model.get_mut(&k).unwrap();
                    e.0 += 1;
                    e.1 = now;
                    let ok = matches!(step, SeriesStep::Update { count, .. } if count == e.0);
                    prop_assert!(ok, "{:?} should update to {}", step, e.0);
                } else {
                    model.remove(&k);
                    model.retain(|_, (_, last)| now - *last <= SERIES_TTL);
                    while model.len() >= 4 {
                        let stalest = model.iter().min_by_key(|(k, (_, last))| (*last, (*k).clone())).map(|(k, _)| k.clone()).unwrap();
                        model.remove(&stalest);
                    }
                    model.insert(k, (1, now));
                    let ok = matches!(step, SeriesStep::Create { .. });
                    prop_assert!(ok, "{:?} should create", step);
                }
                t.check_invariants().unwrap();
                prop_assert_eq!(t.len(), model.len());
            }
        }
    }
}
