//! The memory backends' watch broadcast: one subscriber list per store, fed under the store's own
//! lock so that a stream's initial list and every later event are in commit order, and the
//! faults a real watch suffers (expiry, lost events, stalls, refusals, errors) on demand.
//!
//! Owns: the subscribers of [`super::MemoryDatastore`] and [`super::MemoryCluster`] watches,
//! and the per-kind fault state.
//! Must not: lock anything itself (its owner calls it under the owner's lock), block (channels
//! are unbounded), import tokio, or keep objects beyond the events it holds during a stall.

use std::collections::BTreeMap;

use futures::channel::mpsc::{UnboundedSender, unbounded};

use super::Stored;
use super::watch::{WatchEvent, WatchFailure, WatchStream};

struct Subscriber<K> {
    kind: K,
    tx: UnboundedSender<WatchEvent>,
    /// Events held while the kind is stalled, delivered in order on resume.
    held: Vec<WatchEvent>,
}

/// The faults in force for one kind.
#[derive(Debug, Default)]
struct KindFaults {
    /// Apply/Delete events still to lose.
    drop_next: u64,
    stalled: bool,
    /// The code and message every subscriber was refused with; nothing is delivered meanwhile.
    refused: Option<(u16, String)>,
}

/// Subscribers by kind, and the faults to play on them.
pub(crate) struct WatchHub<K> {
    subscribers: Vec<Subscriber<K>>,
    faults: BTreeMap<K, KindFaults>,
}

impl<K> Default for WatchHub<K> {
    fn default() -> Self {
        WatchHub { subscribers: Vec::new(), faults: BTreeMap::new() }
    }
}

fn relist(objects: Vec<Stored>) -> impl Iterator<Item = WatchEvent> {
    std::iter::once(WatchEvent::Init).chain(objects.into_iter().map(WatchEvent::InitApply)).chain(std::iter::once(WatchEvent::InitDone))
}

impl<K: Copy + Ord> WatchHub<K> {
    fn faults(&mut self, kind: K) -> &mut KindFaults {
        self.faults.entry(kind).or_default()
    }

    /// A new stream whose first events are the list of `current` (unless the kind is refused:
    /// then the refusal, and nothing until [`WatchHub::resume`]).
    pub fn subscribe(&mut self, kind: K, current: Vec<Stored>) -> WatchStream {
        self.prune();
        let (tx, rx) = unbounded();
        let mut sub = Subscriber { kind, tx, held: Vec::new() };
        let faults = self.faults(kind);
        let stalled = faults.stalled;
        let first: Vec<WatchEvent> = match &faults.refused {
            Some((code, message)) => vec![WatchEvent::Error(WatchFailure::refused(*code, message.clone()))],
            None => relist(current).collect(),
        };
        for event in first {
            send(&mut sub, stalled, event);
        }
        self.subscribers.push(sub);
        Box::pin(rx)
    }

    /// Sends a committed change to every subscriber of `kind`, or loses it if a drop is queued.
    /// Whether any stream watches `kind`: with none, an event is not even built (stamping and
    /// cloning every body cost the simulator a tenth of its time).
    pub fn watched(&self, kind: K) -> bool {
        self.subscribers.iter().any(|s| s.kind == kind)
    }

    /// Publishes the event `make` builds, if anyone watches `kind`.
    pub fn tell(&mut self, kind: K, make: impl FnOnce() -> WatchEvent) {
        if self.watched(kind) {
            self.publish(kind, make());
        }
    }

    fn publish(&mut self, kind: K, event: WatchEvent) {
        let faults = self.faults(kind);
        if faults.refused.is_some() {
            return;
        }
        if faults.drop_next > 0 {
            faults.drop_next -= 1;
            return;
        }
        self.deliver(kind, &[event]);
    }

    /// The next `n` changes of `kind` are lost for the current (and new) subscribers.
    pub fn drop_events(&mut self, kind: K, n: u64) {
        self.faults(kind).drop_next += n;
    }

    /// An expired watch (410 Gone): a transient error, then a relist of `current`.
    pub fn expire(&mut self, kind: K, current: Vec<Stored>) {
        if self.faults(kind).refused.is_some() {
            return;
        }
        let mut events = vec![WatchEvent::Error(WatchFailure::transient("expired"))];
        events.extend(relist(current));
        self.deliver(kind, &events);
    }

    /// One transient error; the stream goes on.
    pub fn fail(&mut self, kind: K, message: &str) {
        if self.faults(kind).refused.is_some() {
            return;
        }
        let event = WatchEvent::Error(WatchFailure::transient(message));
        self.deliver(kind, &[event]);
    }

    /// Events of `kind` are held until [`WatchHub::resume`].
    pub fn stall(&mut self, kind: K) {
        self.faults(kind).stalled = true;
    }

    /// The server refuses the watch: every subscriber gets the refusal, then nothing until
    /// [`WatchHub::resume`].
    pub fn refuse(&mut self, kind: K, code: u16, message: &str) {
        let event = WatchEvent::Error(WatchFailure::refused(code, message));
        self.deliver(kind, &[event]);
        self.faults(kind).refused = Some((code, message.to_string()));
    }

    /// Lifts a stall (held events delivered in order) and a refusal (a relist of `current`, as
    /// a watcher that recovers lists again).
    pub fn resume(&mut self, kind: K, current: Vec<Stored>) {
        let faults = self.faults(kind);
        faults.stalled = false;
        let was_refused = faults.refused.take().is_some();
        for sub in self.subscribers.iter_mut().filter(|s| s.kind == kind) {
            for event in std::mem::take(&mut sub.held) {
                let _ = sub.tx.unbounded_send(event);
            }
        }
        if was_refused {
            let events: Vec<WatchEvent> = relist(current).collect();
            self.deliver(kind, &events);
        }
        self.prune();
    }

    fn deliver(&mut self, kind: K, events: &[WatchEvent]) {
        let stalled = self.faults(kind).stalled;
        for sub in self.subscribers.iter_mut().filter(|s| s.kind == kind) {
            for event in events {
                send(sub, stalled, event.clone());
            }
        }
        self.prune();
    }

    /// Forgets the subscribers whose stream was dropped.
    fn prune(&mut self) {
        self.subscribers.retain(|s| !s.tx.is_closed());
    }
}

fn send<K>(sub: &mut Subscriber<K>, stalled: bool, event: WatchEvent) {
    if stalled {
        sub.held.push(event);
    } else {
        // A closed receiver is pruned on the next call.
        let _ = sub.tx.unbounded_send(event);
    }
}

#[cfg(test)]
impl<K: Copy + Ord> WatchHub<K> {
    /// How many streams of `kind` are registered (dropped ones until pruned).
    pub fn subscribers_of(&self, kind: K) -> usize {
        self.subscribers.iter().filter(|s| s.kind == kind).count()
    }
}
