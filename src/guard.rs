//! The mass-change guard: the one brake on every destructive decision of the product. When one
//! pass would destroy more than a share of what there is (addresses released, nodes cleaned),
//! the members of that set wait until a complete observation at least one grace period after
//! each was first proposed proposes it again, or until an operator approves the set by its id.
//! Upstream has no such brake; a partial view once made it delete every node and endpoint of a
//! 5,000-pod cluster (projectcalico/calico#3187).
//!
//! Owns: [`GuardConfig`] (share, minimums, on/off), the held sets per scope and their ids, the
//! decision of which proposed members may proceed, and its invariant check.
//! Must not: read the clock (callers pass monotonic `now`), do I/O, or know what a member is:
//! members are stable 64-bit fingerprints the caller derives (an allocation's address, handle
//! and sequence number; a node's name), so any controller can put its deletes through it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use crate::model::time::Millis;

/// The settings, one set for every scope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    pub enabled: bool,
    /// A pass trips the guard when it would destroy more than this share of the scope's total…
    pub share: f64,
    /// …and at least this many addresses (scopes counting addresses)…
    pub min_addresses: u64,
    /// …or at least this many nodes (scopes counting nodes).
    pub min_nodes: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig { enabled: true, share: 0.2, min_addresses: 50, min_nodes: 5 }
    }
}

impl GuardConfig {
    /// Off: leak-scan and simulate, which judge one snapshot and write nothing.
    pub const OFF: GuardConfig = GuardConfig { enabled: false, share: 1.0, min_addresses: u64::MAX, min_nodes: u64::MAX };

    fn trips(&self, unit: Unit, proposed: u64, total: u64) -> bool {
        let min = match unit {
            Unit::Addresses => self.min_addresses,
            Unit::Nodes => self.min_nodes,
        };
        self.enabled && proposed >= min.max(1) && proposed as f64 > self.share * total as f64
    }
}

/// What a scope counts, for its minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    Addresses,
    Nodes,
}

/// One kind of destructive change, guarded on its own: `ipam-addresses`, `ipam-nodes`, and later
/// the etcd node deleter's and the light controllers' deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub name: &'static str,
    pub unit: Unit,
}

pub const IPAM_ADDRESSES: Scope = Scope { name: "ipam-addresses", unit: Unit::Addresses };
pub const IPAM_NODES: Scope = Scope { name: "ipam-nodes", unit: Unit::Nodes };
/// The etcd-mode node deleter's Calico Node cascades.
pub const ETCD_NODES: Scope = Scope { name: "etcd-nodes", unit: Unit::Nodes };

/// The set ids an operator approved, as an approval annotation lists them (comma-separated,
/// spaces and empty entries ignored).
pub fn parse_approvals(annotation: &str) -> BTreeSet<String> {
    annotation.split(',').map(str::trim).filter(|id| !id.is_empty()).map(str::to_string).collect()
}

/// A stable fingerprint of a member (FNV-1a over the caller's parts: the same on every
/// platform and in every process, so an approval id survives a restart).
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for p in parts {
        h.write(p);
        h.write(&[0xff]);
    }
    h.finish()
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The id an operator approves: a short hex digest of the held set (order-free).
fn set_id(members: impl Iterator<Item = u64>) -> String {
    let mut sorted: Vec<u64> = members.collect();
    sorted.sort_unstable();
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for m in sorted {
        m.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// One pass's proposal for one scope.
#[derive(Debug, Clone, Copy)]
pub struct Proposal<'a> {
    /// Fingerprints of what the pass would destroy (before any per-pass cap).
    pub members: &'a BTreeSet<u64>,
    /// What the scope held before the pass (allocations in the index, nodes known).
    pub total: u64,
    /// A full pass over healthy watches: only such an observation lets a held member proceed,
    /// and only it forgets held members it no longer proposes.
    pub complete: bool,
}

/// What may proceed of a proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Everything proposed: the pass did not trip the guard.
    Proceed,
    /// Only these members (possibly none); the rest wait.
    Only(BTreeSet<u64>),
}

impl Decision {
    pub fn allows(&self, member: u64) -> bool {
        match self {
            Decision::Proceed => true,
            Decision::Only(ok) => ok.contains(&member),
        }
    }
}

/// A set the guard holds, as the shell publishes it (metric, readiness, Event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub scope: Scope,
    /// Members waiting now.
    pub waiting: u64,
    /// The scope's total when the latest proposal was counted.
    pub total: u64,
    /// The id that approves exactly the current held set.
    pub id: String,
    /// Monotonic time the oldest waiting member was first proposed.
    pub since: Millis,
}

#[derive(Debug, Default, Clone)]
struct ScopeState {
    /// Members proposed while the scope trips, and when each was first proposed (monotonic).
    /// A member that may proceed stays until a complete observation no longer proposes it: the
    /// caller may not act on it in the same pass (a pod re-read still to come).
    first_seen: HashMap<u64, Millis>,
    /// Members an operator approved (by approving a set that held them).
    approved: HashSet<u64>,
    total: u64,
    id: String,
    /// The held set's id when it was last published (an approval must name what operators saw).
    waiting: BTreeSet<u64>,
}

/// The guard's memory across passes.
#[derive(Debug, Default, Clone)]
pub struct MassGuard {
    scopes: BTreeMap<Scope, ScopeState>,
}

impl MassGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides what of `p` may proceed now. `grace`: how long a member must have been proposed
    /// before a complete observation lets it go (0 = only an approval does); `approved`: the set
    /// ids operators approved.
    pub fn review(&mut self, scope: Scope, p: Proposal<'_>, cfg: &GuardConfig, now: Millis, grace: Millis, approved: &BTreeSet<String>) -> Decision {
        // Below the threshold (or off), a complete observation ends whatever was held: it is no
        // longer a mass change. An incomplete one (a dirty pass, a sweep cut short) cannot say
        // so: while something is held, its members go through the held path below.
        let holding = cfg.enabled && self.scopes.contains_key(&scope);
        if !cfg.trips(scope.unit, p.members.len() as u64, p.total) && (p.complete || !holding) {
            self.scopes.remove(&scope);
            return Decision::Proceed;
        }
        let st = self.scopes.entry(scope).or_default();
        let previously_waiting = std::mem::take(&mut st.waiting);
        if !previously_waiting.is_empty() && approved.contains(&st.id) {
            st.approved.extend(previously_waiting.iter().copied());
        }
        if p.complete {
            st.first_seen.retain(|m, _| p.members.contains(m));
            st.approved.retain(|m| p.members.contains(m));
        }
        let mut ok = BTreeSet::new();
        for m in p.members {
            let first = *st.first_seen.entry(*m).or_insert(now);
            let observed_twice = p.complete && grace > 0 && now - first >= grace;
            if observed_twice || st.approved.contains(m) {
                ok.insert(*m);
            } else {
                st.waiting.insert(*m);
            }
        }
        if !p.complete {
            // A partial view cannot say the rest went: what waited and was not let through
            // still waits (the published set and its id stay whole).
            for m in previously_waiting {
                if !ok.contains(&m) && !st.approved.contains(&m) && st.first_seen.contains_key(&m) {
                    st.waiting.insert(m);
                }
            }
        }
        st.total = p.total;
        st.id = set_id(st.waiting.iter().copied());
        if st.waiting.is_empty() && st.first_seen.is_empty() {
            self.scopes.remove(&scope);
        }
        Decision::Only(ok)
    }

    /// The sets held now, by scope.
    pub fn held(&self) -> Vec<Held> {
        self.scopes
            .iter()
            .filter(|(_, st)| !st.waiting.is_empty())
            .map(|(scope, st)| Held {
                scope: *scope,
                waiting: st.waiting.len() as u64,
                total: st.total,
                id: st.id.clone(),
                since: st.waiting.iter().filter_map(|m| st.first_seen.get(m)).copied().min().unwrap_or(0),
            })
            .collect()
    }

    pub fn check_invariants(&self) -> Result<(), String> {
        for (scope, st) in &self.scopes {
            if let Some(m) = st.waiting.iter().find(|m| !st.first_seen.contains_key(m)) {
                return Err(format!("{}: waiting member {m:016x} has no first-seen time", scope.name));
            }
            if st.id != set_id(st.waiting.iter().copied()) {
                return Err(format!("{}: the published id does not name the waiting set", scope.name));
            }
            if st.waiting.is_empty() && st.first_seen.is_empty() {
                return Err(format!("{}: an empty scope is kept", scope.name));
            }
            if let Some(m) = st.approved.iter().find(|m| !st.first_seen.contains_key(m)) {
                return Err(format!("{}: approved member {m:016x} is not tracked", scope.name));
            }
            if let Some(m) = st.waiting.iter().find(|m| st.approved.contains(m)) {
                return Err(format!("{}: approved member {m:016x} still waits", scope.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GRACE: Millis = 60_000;

    fn set(r: std::ops::Range<u64>) -> BTreeSet<u64> {
        r.collect()
    }

    fn review(g: &mut MassGuard, members: &BTreeSet<u64>, total: u64, complete: bool, now: Millis) -> Decision {
        let d = g.review(IPAM_ADDRESSES, Proposal { members, total, complete }, &GuardConfig::default(), now, GRACE, &BTreeSet::new());
        g.check_invariants().unwrap();
        d
    }

    #[test]
    fn small_or_proportionate_changes_pass_untouched() {
        let mut g = MassGuard::new();
        assert_eq!(review(&mut g, &set(0..49), 100, true, 0), Decision::Proceed, "under the minimum of 50");
        assert_eq!(review(&mut g, &set(0..200), 1_000, true, 0), Decision::Proceed, "exactly 20% is not more than 20%");
        assert!(g.held().is_empty());
    }

    #[test]
    fn a_mass_change_waits_for_a_complete_observation_a_grace_period_later() {
        let mut g = MassGuard::new();
        let all = set(0..300);
        assert_eq!(review(&mut g, &all, 1_000, true, 0), Decision::Only(BTreeSet::new()));
        let held = g.held();
        assert_eq!((held.len(), held[0].waiting, held[0].total, held[0].since), (1, 300, 1_000, 0));
        assert_eq!(review(&mut g, &all, 1_000, true, GRACE - 1), Decision::Only(BTreeSet::new()), "within the grace period");
        assert_eq!(review(&mut g, &all, 1_000, false, GRACE + 5), Decision::Only(BTreeSet::new()), "a dirty pass is no complete observation");
        assert_eq!(review(&mut g, &all, 1_000, true, GRACE), Decision::Only(all.clone()));
        assert!(g.held().is_empty());
    }

    #[test]
    fn members_proposed_later_start_their_own_wait_and_vanished_ones_are_forgotten() {
        let mut g = MassGuard::new();
        review(&mut g, &set(0..300), 1_000, true, 0);
        let later = set(100..400);
        assert_eq!(review(&mut g, &later, 1_000, true, GRACE), Decision::Only(set(100..300)), "0..100 were not proposed again; 300..400 are new");
        assert_eq!(g.held()[0].waiting, 100);
        assert_eq!(g.held()[0].since, GRACE);
    }

    #[test]
    fn approvals_are_the_comma_separated_ids_without_blanks() {
        assert_eq!(parse_approvals(" a1, ,b2,,"), ["a1".to_string(), "b2".to_string()].into());
        assert!(parse_approvals("").is_empty());
    }

    #[test]
    fn an_operator_approves_exactly_the_set_that_was_published() {
        let mut g = MassGuard::new();
        let cfg = GuardConfig::default();
        let p = |m| Proposal { members: m, total: 1_000, complete: false };
        let first = set(0..300);
        g.review(IPAM_NODES, p(&first), &cfg, 0, GRACE, &BTreeSet::new());
        let id = g.held()[0].id.clone();
        let approved: BTreeSet<String> = [id.clone()].into();
        let grown = set(0..350);
        assert_eq!(g.review(IPAM_NODES, p(&grown), &cfg, 1, GRACE, &approved), Decision::Only(set(0..300)), "approval covers only what was shown");
        assert_ne!(g.held()[0].id, id, "what still waits has a new id");
        g.check_invariants().unwrap();
        // Approved members stay approved while proposed (the caller may act on them a pass later)…
        assert_eq!(g.review(IPAM_NODES, p(&first), &cfg, 2, GRACE, &BTreeSet::new()), Decision::Only(first.clone()));
        // …until a complete observation no longer proposes them: then they are forgotten.
        let other = set(500..800);
        g.review(IPAM_NODES, Proposal { members: &other, total: 1_000, complete: true }, &cfg, 3, GRACE, &BTreeSet::new());
        assert_eq!(g.review(IPAM_NODES, p(&first), &cfg, 4, GRACE, &BTreeSet::new()), Decision::Only(BTreeSet::new()));
        g.check_invariants().unwrap();
    }

    #[test]
    fn a_grace_period_of_zero_leaves_only_approval_and_off_lets_everything_through() {
        let mut g = MassGuard::new();
        let all = set(0..300);
        let p = Proposal { members: &all, total: 300, complete: true };
        for now in [0, GRACE * 100] {
            assert_eq!(g.review(IPAM_ADDRESSES, p, &GuardConfig::default(), now, 0, &BTreeSet::new()), Decision::Only(BTreeSet::new()));
        }
        assert_eq!(g.review(IPAM_ADDRESSES, p, &GuardConfig::OFF, 0, 0, &BTreeSet::new()), Decision::Proceed);
        assert!(g.held().is_empty(), "switching the guard off drops what it held");
    }

    #[test]
    fn an_incomplete_observation_below_the_threshold_neither_ends_nor_passes_a_held_set() {
        let mut g = MassGuard::new();
        let all = set(0..300);
        review(&mut g, &all, 1_000, true, 0);
        // A dirty pass (or a sweep cut short) proposes a few of them past the grace period: it
        // cannot tell that the rest are gone, so they are not let through and not forgotten.
        assert_eq!(review(&mut g, &set(0..3), 1_000, false, GRACE + 1), Decision::Only(BTreeSet::new()));
        assert_eq!((g.held()[0].since, g.held()[0].waiting), (0, 300), "the held set keeps its place, whole");
        assert_eq!(review(&mut g, &all, 1_000, true, GRACE + 2), Decision::Only(all.clone()), "the next complete observation lets it go");
        // Nothing held: a small incomplete proposal proceeds as before.
        let mut fresh = MassGuard::new();
        assert_eq!(review(&mut fresh, &set(0..3), 1_000, false, 0), Decision::Proceed);
    }

    #[test]
    fn nodes_count_against_their_own_minimum() {
        let mut g = MassGuard::new();
        let cfg = GuardConfig::default();
        let four = set(0..4);
        assert_eq!(g.review(IPAM_NODES, Proposal { members: &four, total: 4, complete: true }, &cfg, 0, GRACE, &BTreeSet::new()), Decision::Proceed);
        let five = set(0..5);
        assert_eq!(g.review(IPAM_NODES, Proposal { members: &five, total: 20, complete: true }, &cfg, 0, GRACE, &BTreeSet::new()), Decision::Only(BTreeSet::new()));
    }

    #[test]
    fn fingerprints_are_stable_and_separate_their_parts() {
        assert_eq!(fingerprint(&[b"10.0.0.1", b"h1"]), fingerprint(&[b"10.0.0.1", b"h1"]));
        assert_ne!(fingerprint(&[b"10.0.0.1", b"h1"]), fingerprint(&[b"10.0.0.1h", b"1"]));
        // FNV-1a of "n1" and the separator, worked out by hand: the same in every process.
        assert_eq!(fingerprint(&[b"n1"]), 0x21ce_4d19_25f0_a70d);
    }

    proptest! {
        /// Whatever the sequence of proposals, a member proceeds only if the pass did not trip the
        /// guard (and, for an incomplete pass, nothing was held), or it was proposed at a complete
        /// observation at least a grace period after it was first proposed without proceeding.
        #[test]
        fn nothing_proceeds_early(steps in proptest::collection::vec((proptest::collection::btree_set(0u64..400, 0..400), 0i64..40_000, any::<bool>()), 1..12)) {
            let mut g = MassGuard::new();
            let cfg = GuardConfig::default();
            let mut now = 0;
            let mut first: HashMap<u64, Millis> = HashMap::new();
            for (members, dt, complete) in steps {
                now += dt;
                let tripped = cfg.trips(Unit::Addresses, members.len() as u64, 1_000);
                let holding = !first.is_empty();
                let d = g.review(IPAM_ADDRESSES, Proposal { members: &members, total: 1_000, complete }, &cfg, now, GRACE, &BTreeSet::new());
                g.check_invariants().unwrap();
                if !tripped && (complete || !holding) {
                    prop_assert_eq!(d, Decision::Proceed);
                    first.clear();
                    continue;
                }
                if complete {
                    first.retain(|m, _| members.contains(m));
                }
                for m in &members {
                    let f = *first.entry(*m).or_insert(now);
                    if d.allows(*m) {
                        prop_assert!(complete && now - f >= GRACE, "member {} proceeded {} ms after first proposed", m, now - f);
                    }
                }
            }
        }
    }
}
