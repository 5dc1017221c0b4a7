//! A kind as one list + watch shows it, for the controllers that keep a trimmed view of their
//! source (node deleter, light controllers, workload endpoints): the items by key, the list in
//! progress, and whether the view is whole.
//!
//! Owns: the list protocol (a relist builds a fresh map that replaces the old one only when it
//! completes) and the health of the view (a failure is remembered until the watch delivers
//! again).
//! Must not: decide what an item is or what a change calls for; the controllers do.

use std::collections::BTreeMap;

#[derive(Debug)]
pub struct Listed<V> {
    items: BTreeMap<String, V>,
    relisting: Option<BTreeMap<String, V>>,
    synced: bool,
    /// The watch failed and has not delivered since: why.
    failing: Option<String>,
}

impl<V> Default for Listed<V> {
    fn default() -> Self {
        Listed { items: BTreeMap::new(), relisting: None, synced: false, failing: None }
    }
}

impl<V> Listed<V> {
    /// A (re)list begins: items now go to the fresh map.
    pub fn begin(&mut self) {
        self.relisting = Some(BTreeMap::new());
    }

    /// One item of the list in progress (ignored outside a list).
    pub fn listed(&mut self, key: String, value: V) {
        if let Some(r) = self.relisting.as_mut() {
            r.insert(key, value);
        }
    }

    /// The list is complete: its items are the whole kind, and the watch is healthy.
    pub fn end(&mut self) {
        self.items = self.relisting.take().unwrap_or_default();
        self.synced = true;
        self.failing = None;
    }

    /// A created or changed item; returns the one it replaced.
    pub fn upsert(&mut self, key: String, value: V) -> Option<V> {
        self.failing = None;
        self.items.insert(key, value)
    }

    /// A deleted item; returns it.
    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.failing = None;
        self.items.remove(key)
    }

    /// The watch delivered again without a list (nothing was missed).
    pub fn delivered(&mut self) {
        self.failing = None;
    }

    pub fn failed(&mut self, reason: impl Into<String>) {
        self.failing = Some(reason.into());
    }

    /// Listed at least once, healthy, and no list in progress: safe to act on absences.
    pub fn whole(&self) -> bool {
        self.synced && self.failing.is_none() && self.relisting.is_none()
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.items.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.items.contains_key(key)
    }

    pub fn items(&self) -> &BTreeMap<String, V> {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relist_replaces_the_view_only_when_complete_and_failures_last_until_a_delivery() {
        let mut l = Listed::default();
        assert!(!l.whole(), "never listed");
        l.begin();
        l.listed("a".into(), 1);
        assert!(!l.whole() && l.is_empty(), "a list in progress is not the view");
        l.end();
        assert!(l.whole() && l.get("a") == Some(&1));
        l.listed("ignored".into(), 9);
        assert!(!l.contains("ignored"), "outside a list");
        l.failed("gone");
        assert_eq!((l.whole(), l.failing()), (false, Some("gone")));
        assert_eq!(l.upsert("b".into(), 2), None);
        assert!(l.whole(), "a delivery ends the failure");
        l.begin();
        l.listed("c".into(), 3);
        assert_eq!(l.get("a"), Some(&1), "the old view serves until the list completes");
        l.end();
        assert_eq!(l.items().keys().collect::<Vec<_>>(), ["c"]);
        assert_eq!(l.remove("c"), Some(3));
        l.failed("x");
        l.delivered();
        assert!(l.whole() && l.synced() && l.is_empty());
    }
}
