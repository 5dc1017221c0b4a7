//! Retry pacing for the GC loop: a per-item backoff (one failing block, handle or node waits
//! while every other item proceeds) and the round retry timer (a pass that left work behind is
//! retried soon, not after the next full period).
//!
//! Owns: the delays and the bookkeeping of which item is due when.
//! Must not: read the clock (callers pass `now` in milliseconds), sleep, or decide which errors
//! deserve a backoff (the controller does, from the error category).

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::datastore::ItemRef;
use crate::model::time::Millis;

/// First retry of a failed item or round. Short: most failures are a conflict lost to the CNI
/// or a brief apiserver hiccup, and upstream's first retry is even sooner (5 ms).
pub const FIRST_DELAY: Millis = 1_000;
/// Longest wait of a failing item or round: a broken object is retried twice a minute, cheap
/// for the apiserver, and a recovered one is picked up within half a minute (upstream caps its
/// round retry at 30 s too).
pub const MAX_DELAY: Millis = 30_000;

/// `FIRST_DELAY` doubled per consecutive failure beyond the first, capped at `MAX_DELAY`.
pub fn delay_after(failures: u32) -> Millis {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_DELAY << doublings).min(MAX_DELAY)
}

/// What a plan item is, for backoff: blocks by CIDR (releases, cold and empty blocks share it,
/// since a block that fails one write fails the others), handles by ID, nodes by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ItemKey {
    Block(IpNet),
    Handle(String),
    Node(String),
}

impl ItemKey {
    pub fn of(item: &ItemRef) -> ItemKey {
        match item {
            ItemRef::Release(c) | ItemRef::EmptyBlock(c) | ItemRef::ColdBlock(c) | ItemRef::SoftDeletedBlock(c) => ItemKey::Block(*c),
            ItemRef::Handle(h) | ItemRef::OrphanHandle(h) => ItemKey::Handle(h.clone()),
            ItemRef::Node(n) => ItemKey::Node(n.clone()),
        }
    }

    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            ItemKey::Block(_) => "block",
            ItemKey::Handle(_) => "handle",
            ItemKey::Node(_) => "node",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    failures: u32,
    due: Millis,
}

/// Items that failed with a transient error, each skipped until its own due time.
#[derive(Debug, Default)]
pub struct ItemBackoff {
    waiting: BTreeMap<ItemKey, Waiting>,
}

impl ItemBackoff {
    /// Records a failure at `now`; the item is due again after its doubled delay.
    pub fn failed(&mut self, key: ItemKey, now: Millis) {
        let w = self.waiting.entry(key).or_insert(Waiting { failures: 0, due: now });
        w.failures = w.failures.saturating_add(1);
        w.due = now + delay_after(w.failures);
    }

    /// The item went through: it starts afresh next time.
    pub fn succeeded(&mut self, key: &ItemKey) {
        self.waiting.remove(key);
    }

    /// Whether the item may be tried at `now`.
    pub fn is_due(&self, key: &ItemKey, now: Millis) -> bool {
        self.waiting.get(key).is_none_or(|w| w.due <= now)
    }

    /// The earliest due time among items still waiting at `now`.
    pub fn next_due(&self, now: Millis) -> Option<Millis> {
        self.waiting.values().map(|w| w.due).filter(|d| *d > now).min()
    }

    /// Items still waiting at `now`, by [`ItemKey::category`].
    pub fn waiting_by_category(&self, now: Millis) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (k, w) in &self.waiting {
            if w.due > now {
                *out.entry(k.category()).or_default() += 1;
            }
        }
        out
    }

    /// Forgets items the GC no longer plans anything for (a block deleted by someone else, a
    /// node whose IPAM went): the map stays as small as the set of currently broken items.
    pub fn retain(&mut self, keep: impl Fn(&ItemKey) -> bool) {
        self.waiting.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// When to run another round after one that left work behind (conflicts that ran out of
/// retries, failed items): soon, then less often while rounds keep failing.
#[derive(Debug, Default)]
pub struct RetryTimer {
    failed_rounds: u32,
}

impl RetryTimer {
    /// Records a round's result; returns the delay until the retry round, `None` after success.
    pub fn round_finished(&mut self, work_left: bool) -> Option<Millis> {
        if work_left {
            self.failed_rounds = self.failed_rounds.saturating_add(1);
            Some(delay_after(self.failed_rounds))
        } else {
            self.failed_rounds = 0;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(s: &str) -> ItemKey {
        ItemKey::Block(s.parse().unwrap())
    }

    #[test]
    fn delays_double_from_one_second_up_to_the_cap() {
        let d: Vec<Millis> = (1..=8).map(delay_after).collect();
        assert_eq!(d, vec![1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]);
        assert_eq!(delay_after(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn a_failing_item_waits_while_other_items_stay_due() {
        let mut b = ItemBackoff::default();
        let (bad, good) = (block("10.0.0.0/26"), block("10.0.0.64/26"));
        b.failed(bad.clone(), 10_000);
        assert!(!b.is_due(&bad, 10_500));
        assert!(b.is_due(&good, 10_500), "one failing block never stalls another");
        assert!(b.is_due(&bad, 11_000));
        assert_eq!(b.next_due(10_500), Some(11_000));
        assert_eq!(b.waiting_by_category(10_500).get("block"), Some(&1));
    }

    #[test]
    fn consecutive_failures_lengthen_the_wait_and_success_resets_it() {
        let mut b = ItemBackoff::default();
        let node = ItemKey::Node("n1".into());
        b.failed(node.clone(), 0);
        b.failed(node.clone(), 1_000);
        b.failed(node.clone(), 3_000);
        assert!(!b.is_due(&node, 6_999));
        assert!(b.is_due(&node, 7_000));
        b.succeeded(&node);
        assert!(b.is_empty());
        b.failed(node.clone(), 20_000);
        assert!(b.is_due(&node, 21_000), "after a success the delay starts at one second again");
    }

    #[test]
    fn retained_keys_are_the_only_ones_left() {
        let mut b = ItemBackoff::default();
        b.failed(ItemKey::Handle("h1".into()), 0);
        b.failed(ItemKey::Node("gone".into()), 0);
        b.retain(|k| matches!(k, ItemKey::Handle(_)));
        assert_eq!(b.len(), 1);
        assert!(b.is_due(&ItemKey::Node("gone".into()), 0));
    }

    #[test]
    fn item_refs_of_one_block_share_a_key() {
        let c: IpNet = "10.0.0.0/26".parse().unwrap();
        assert_eq!(ItemKey::of(&ItemRef::Release(c)), ItemKey::of(&ItemRef::EmptyBlock(c)));
        assert_eq!(ItemKey::of(&ItemRef::OrphanHandle("h".into())), ItemKey::Handle("h".into()));
    }

    #[test]
    fn the_retry_timer_backs_off_while_rounds_fail_and_resets_on_success() {
        let mut t = RetryTimer::default();
        assert_eq!(t.round_finished(true), Some(1_000));
        assert_eq!(t.round_finished(true), Some(2_000));
        assert_eq!(t.round_finished(false), None);
        assert_eq!(t.round_finished(true), Some(1_000));
    }
}
