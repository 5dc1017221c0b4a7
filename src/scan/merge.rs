//! Two copies of one object in a dump (two snapshots in one folder, a file given twice with
//! edits): which copy the scan keeps, and what it must hold because it cannot tell.
//!
//! Owns: the rules. Pods: the copy that keeps more addresses wins and takes the union of both
//! copies' IPs, so no address either copy reports can look leaked. IPAM objects: the copy with
//! the newer `resourceVersion` wins when both are numbers; otherwise (or equal versions with
//! different content) the first copy is kept and the object is held. A copy identical to the
//! one already seen is not a conflict. Every differing duplicate is reported.
//! Must not: keep whole objects (a digest and a version per object is all it stores).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::Serialize;

use crate::model::PodFacts;

/// A duplicate that differed from the copy seen first, and what the scan did about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Duplicate {
    pub kind: String,
    pub name: String,
    /// `union-of-ips`, `newer-kept`, `older-ignored` or `held`.
    pub resolution: &'static str,
}

/// What is known of the first copy of an IPAM object.
#[derive(Debug, Clone, Copy)]
struct Version {
    number: Option<u64>,
    digest: u64,
    /// Where the kept copy sits in its vector (objects collected rather than indexed).
    position: u32,
}

/// What to do with a second copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First copy of this object.
    New,
    /// The same content again: nothing to do, nothing to report.
    Same,
    /// The new copy is newer: it replaces the kept one (at this position, when collected).
    TakeNew { position: u32 },
    /// The new copy is older: ignore it.
    KeepOld,
    /// Cannot tell which is newer: keep the first and hold the object.
    Conflict,
}

/// The versions of the IPAM objects seen so far, keyed by a hash of (kind, name): 24 bytes an
/// object, so even one handle per pod of a large cluster costs a few MB.
#[derive(Default)]
pub struct Registry {
    seen: HashMap<u64, Version>,
}

impl std::fmt::Debug for Registry {
    // The map's order is random per instance; its size is what tells two readings apart.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} objects)", self.seen.len())
    }
}

pub fn digest<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

impl Registry {
    /// Records a copy of `kind`/`name` with `resource_version` and a digest of its content;
    /// `position` is where it would be stored if kept.
    pub fn judge(&mut self, kind: &str, name: &str, resource_version: &str, content: u64, position: u32) -> Verdict {
        let key = digest(&(kind, name));
        let number = resource_version.parse::<u64>().ok();
        let new = Version { number, digest: content, position };
        let Some(old) = self.seen.get_mut(&key) else {
            self.seen.insert(key, new);
            return Verdict::New;
        };
        if old.digest == content {
            return Verdict::Same;
        }
        match (old.number, number) {
            (Some(a), Some(b)) if b > a => {
                let position = old.position;
                *old = Version { position, ..new };
                Verdict::TakeNew { position }
            }
            (Some(a), Some(b)) if b < a => Verdict::KeepOld,
            _ => Verdict::Conflict,
        }
    }
}

/// Merges two copies of one pod: the copy keeping more addresses wins and carries the union of
/// both copies' IPs. Returns the merged facts and whether the copies differed at all.
pub fn merge_pods(old: PodFacts, new: PodFacts) -> (PodFacts, bool) {
    let differs = !same_pod(&old, &new);
    if !differs {
        return (new, false);
    }
    // Ties go to the copy that is not finished (a finished pod gives its addresses up).
    let new_wins = new.ips.len() > old.ips.len() || (new.ips.len() == old.ips.len() && !new.finished());
    let (mut winner, loser) = if new_wins { (new, old) } else { (old, new) };
    for ip in loser.ips {
        if !winner.ips.contains(&ip) {
            winner.ips.push(ip);
        }
    }
    winner.unparsable_ips |= loser.unparsable_ips;
    winner.status_reports_ip |= loser.status_reports_ip;
    (winner, true)
}

/// The facts the GC judges by (the uid and host-network flag are not kept by the index).
fn same_pod(a: &PodFacts, b: &PodFacts) -> bool {
    a.node == b.node
        && a.phase == b.phase
        && a.evicted == b.evicted
        && a.deleting == b.deleting
        && a.status_reports_ip == b.status_reports_ip
        && a.unparsable_ips == b.unparsable_ips
        && a.ips == b.ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PodPhase;
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn pod(ips: &[u8], phase: PodPhase) -> PodFacts {
        PodFacts {
            namespace: "ns".into(),
            name: "p".into(),
            node: "n1".into(),
            phase,
            ips: ips.iter().map(|i| IpAddr::from([10, 0, 0, *i])).collect(),
            status_reports_ip: !ips.is_empty(),
            ..PodFacts::default()
        }
    }

    fn phase() -> impl Strategy<Value = PodPhase> {
        prop_oneof![Just(PodPhase::Running), Just(PodPhase::Pending), Just(PodPhase::Succeeded), Just(PodPhase::Failed)]
    }

    proptest! {
        /// Whatever the order and content of two copies, every IP either copy reports is kept,
        /// and the winner keeps at least as many addresses as either copy.
        #[test]
        fn merged_pod_keeps_every_ip_of_both_copies(a in proptest::collection::vec(0u8..8, 0..4), b in proptest::collection::vec(0u8..8, 0..4), pa in phase(), pb in phase()) {
            let (x, y) = (pod(&a, pa), pod(&b, pb));
            for (first, second) in [(x.clone(), y.clone()), (y.clone(), x.clone())] {
                let (merged, differs) = merge_pods(first.clone(), second.clone());
                for ip in first.ips.iter().chain(&second.ips) {
                    prop_assert!(merged.ips.contains(ip), "{ip} lost");
                }
                prop_assert_eq!(differs, !same_pod(&first, &second));
                prop_assert!(merged.ips.len() >= first.ips.len().max(second.ips.len()));
            }
        }

        /// Numeric versions: the newer copy wins in either order; equal content is never a conflict.
        #[test]
        fn newer_numeric_version_wins_in_either_order(v1 in 1u64..1000, v2 in 1u64..1000, d1 in 0u64..3, d2 in 0u64..3) {
            let mut r = Registry::default();
            prop_assert_eq!(r.judge("IPAMBlock", "b", &v1.to_string(), d1, 0), Verdict::New);
            let verdict = r.judge("IPAMBlock", "b", &v2.to_string(), d2, 1);
            let expected = if d1 == d2 { Verdict::Same } else if v2 > v1 { Verdict::TakeNew { position: 0 } } else if v2 < v1 { Verdict::KeepOld } else { Verdict::Conflict };
            prop_assert_eq!(verdict, expected);
        }
    }

    #[test]
    fn versions_that_are_not_numbers_make_a_differing_copy_a_conflict() {
        let mut r = Registry::default();
        assert_eq!(r.judge("IPAMBlock", "b", "", 1, 0), Verdict::New);
        assert_eq!(r.judge("IPAMBlock", "b", "", 1, 1), Verdict::Same);
        assert_eq!(r.judge("IPAMBlock", "b", "7", 2, 1), Verdict::Conflict);
        assert_eq!(r.judge("IPAMHandle", "b", "7", 2, 0), Verdict::New, "kinds are apart");
    }

    #[test]
    fn a_running_copy_beats_a_finished_one() {
        let (merged, differs) = merge_pods(pod(&[1], PodPhase::Running), pod(&[], PodPhase::Succeeded));
        assert!(differs);
        assert_eq!(merged.phase, PodPhase::Running);
        assert_eq!(merged.ips.len(), 1);
    }
}
