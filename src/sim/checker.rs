//! The independent checker: compares what the datastore holds after the pipeline with what the
//! generator planted, without asking the GC anything.
//!
//! Owns: the released set (allocated before minus allocated after, read from block objects, not
//! from plans), and the laws: released == planted-releasable; released ∩ live = ∅; the expected
//! blocks, affinities and handles are gone and no others; every block passes calicoctl's rules.
//! Must not: call `gc::classify`, look at plans, or trust the index.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::cluster::{Category, SyntheticCluster};
use crate::ipam::index::HandleObject;
use crate::ipam::release::check_block;
use crate::model::names::ordinal_to_ip;
use crate::model::time::Millis;
use crate::model::IpamBlock;

/// Problems listed per law before the rest is summarised as a count.
const EXAMPLES: usize = 8;

/// The state the checker judges.
pub struct FinalState<'a> {
    pub blocks: &'a [std::sync::Arc<IpamBlock>],
    pub affinity_names: &'a BTreeSet<String>,
    /// The handle objects present at the end, as positions in [`Before::names`] (any order;
    /// handles the generated cluster never named are not compared).
    pub handle_objects: &'a [u32],
    /// IPs that pods present at the end report (finished pods report none), in any order.
    pub live_ips: &'a [IpAddr],
    pub now: Millis,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub problems: Vec<String>,
    /// Addresses released per planted category (from the datastore).
    pub released_by_category: BTreeMap<&'static str, usize>,
    pub released_total: usize,
    pub expected_total: usize,
    /// Released though planted as kept.
    pub unexpected_releases: usize,
    /// Planted as released but still allocated.
    pub missed_releases: usize,
    pub released_live_ips: usize,
    pub blocks_removed: usize,
    pub affinities_removed: usize,
    pub handles_removed: usize,
}

/// Allocated addresses of `blocks` with their handle: ordinals with a handle and no `releasedAt`.
pub fn allocated_ips<B: std::borrow::Borrow<IpamBlock>>(blocks: &[B]) -> HashMap<IpAddr, String> {
    allocated(blocks).map(|(ip, h)| (ip, h.to_string())).collect()
}

/// How many distinct addresses [`allocated_ips`] finds, without keeping their handles.
pub fn allocated_count<B: std::borrow::Borrow<IpamBlock>>(blocks: &[B]) -> usize {
    allocated(blocks).map(|(ip, _)| ip).collect::<HashSet<IpAddr>>().len()
}

fn allocated<B: std::borrow::Borrow<IpamBlock>>(blocks: &[B]) -> impl Iterator<Item = (IpAddr, &str)> {
    blocks.iter().flat_map(|b| {
        let b = b.borrow();
        let cidr = b.spec.cidr.parse::<IpNet>().ok();
        cidr.into_iter().flat_map(move |cidr| {
            b.spec.allocations.iter().enumerate().filter_map(move |(ord, slot)| {
                let attr = slot.and_then(|a| b.spec.attributes.get(a as usize))?;
                if attr.released_at.is_some() {
                    return None;
                }
                attr.handle_id.as_deref().map(|h| (ordinal_to_ip(&cidr, ord as u32), h))
            })
        })
    })
}

/// A sorted set of distinct strings in one buffer, each known by its position: the handle IDs
/// of a cluster cost their text and four bytes each, not an allocation apiece.
#[derive(Debug, Clone, Default)]
pub struct Names {
    text: String,
    /// End offset in `text` of each name, in sorted order.
    ends: Vec<u32>,
}

impl Names {
    pub fn new<'s>(names: impl IntoIterator<Item = &'s str>) -> Names {
        let mut all: Vec<&str> = names.into_iter().collect();
        all.sort_unstable();
        all.dedup();
        let mut text = String::with_capacity(all.iter().map(|n| n.len()).sum());
        let mut ends = Vec::with_capacity(all.len());
        for n in all {
            text.push_str(n);
            ends.push(u32::try_from(text.len()).expect("names shorter than 4 GiB in all"));
        }
        Names { text, ends }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The name at `position` (which must be below [`Self::len`]).
    pub fn get(&self, position: u32) -> &str {
        let i = position as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    pub fn position(&self, name: &str) -> Option<u32> {
        let (mut lo, mut hi) = (0usize, self.ends.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.get(mid as u32).cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid as u32),
            }
        }
        None
    }
}

/// What the end is compared with, read off the generated cluster before the run: a summary, so
/// the generated objects need not stay in memory while the run goes on. Handle IDs are kept
/// once each ([`Names`]) and named elsewhere by position.
#[derive(Debug, Clone, Default)]
pub struct Before {
    /// Every handle ID the cluster names, by a handle object or an allocation.
    pub names: Names,
    /// Allocated addresses, as [`allocated_ips`] reads them, with their handle's position in
    /// `names`; sorted by address, one entry per address.
    pub allocated: Vec<(IpAddr, u32)>,
    /// Positions in `names` of the handle objects, sorted.
    pub handle_objects: Vec<u32>,
    pub cidrs: BTreeSet<IpNet>,
    pub affinity_names: BTreeSet<String>,
    /// Every used ordinal (cooling down and Windows-reserved ones included).
    pub allocations: usize,
    pub blocks: usize,
    pub handles: usize,
}

impl Before {
    pub fn of(cluster: &SyntheticCluster) -> Before {
        let ids = cluster.handles.iter().map(|h| h.handle_id());
        let names = Names::new(ids.chain(allocated(&cluster.blocks).map(|(_, h)| h)));
        let at = |h: &str| names.position(h).expect("every handle ID of the cluster is named");
        // As a map would keep them: the last of a repeated address wins.
        let mut allocated: Vec<(IpAddr, u32)> = allocated(&cluster.blocks).map(|(ip, h)| (ip, at(h))).collect();
        allocated.reverse();
        allocated.sort_by_key(|(ip, _)| *ip);
        allocated.dedup_by_key(|(ip, _)| *ip);
        let mut handle_objects: Vec<u32> = cluster.handles.iter().map(|h| at(h.handle_id())).collect();
        handle_objects.sort_unstable();
        handle_objects.dedup();
        Before {
            allocated,
            handle_objects,
            cidrs: cluster.blocks.iter().filter_map(|b| b.spec.cidr.parse().ok()).collect(),
            affinity_names: cluster.affinities.iter().map(|a| a.metadata.name.clone()).collect(),
            allocations: cluster.allocation_count(),
            blocks: cluster.blocks.len(),
            handles: cluster.handles.len(),
            names,
        }
    }

    /// The handle that held `ip` before the run, if any.
    pub fn holder(&self, ip: &IpAddr) -> Option<&str> {
        let i = self.allocated.binary_search_by_key(ip, |(a, _)| *a).ok()?;
        Some(self.names.get(self.allocated[i].1))
    }
}

pub fn check(cluster: &SyntheticCluster, before: &Before, after: &FinalState<'_>) -> CheckReport {
    let mut r = CheckReport::default();
    let mut problems: Vec<String> = Vec::new();
    let mut law = |name: &str, items: Vec<String>| {
        if items.is_empty() {
            return;
        }
        let n = items.len();
        let shown: Vec<String> = items.into_iter().take(EXAMPLES).collect();
        problems.push(format!("{name}: {n} ({}{})", shown.join(", "), if n > EXAMPLES { ", …" } else { "" }));
    };

    // Nothing appears and nothing changes hands: the simulation allocates nothing. Each
    // address allocated at the end is compared as it is read; only the addresses are kept.
    let mut appeared = Vec::new();
    let mut now_ips: Vec<IpAddr> = Vec::new();
    for (ip, h) in allocated(after.blocks) {
        if before.holder(&ip) != Some(h) {
            appeared.push(format!("{ip} now held by {h}"));
        }
        now_ips.push(ip);
    }
    law("addresses allocated or re-owned during the run", appeared);
    now_ips.sort_unstable();

    let released: BTreeSet<IpAddr> =
        before.allocated.iter().map(|(ip, _)| *ip).filter(|ip| now_ips.binary_search(ip).is_err()).collect();
    drop(now_ips);
    let expected: BTreeSet<IpAddr> =
        cluster.planted.iter().filter(|p| p.category.released()).flat_map(|p| p.ips.iter().copied()).collect();
    // Categories of the addresses a problem or a count can name: released or planted so.
    let category_of: HashMap<IpAddr, Category> = cluster
        .planted
        .iter()
        .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.category)))
        .filter(|(ip, c)| c.released() || released.contains(ip))
        .collect();
    r.released_total = released.len();
    r.expected_total = expected.len();
    for ip in &released {
        let c = category_of.get(ip).map_or("unplanted", |c| c.as_str());
        *r.released_by_category.entry(c).or_default() += 1;
    }
    let label = |ip: &IpAddr| format!("{ip} [{}]", category_of.get(ip).map_or("unplanted", |c| c.as_str()));
    let unexpected: Vec<String> = released.difference(&expected).map(label).collect();
    let missed: Vec<String> = expected.difference(&released).map(label).collect();
    r.unexpected_releases = unexpected.len();
    r.missed_releases = missed.len();
    law("released but planted as kept", unexpected);
    law("planted as released but still allocated", missed);
    let live_released: BTreeSet<IpAddr> = after.live_ips.iter().filter(|ip| released.contains(ip)).copied().collect();
    r.released_live_ips = live_released.len();
    law("released while a live pod reports it", live_released.iter().map(label).collect());

    let invalid: Vec<String> = after.blocks.iter().filter_map(|b| check_block(b, after.now).err()).collect();
    law("blocks failing calicoctl's rules", invalid);

    // Objects: exactly the expected ones are gone.
    let cidrs_before = &before.cidrs;
    let cidrs_after: BTreeSet<IpNet> = after.blocks.iter().filter_map(|b| b.spec.cidr.parse().ok()).collect();
    let removed: BTreeSet<IpNet> = cidrs_before.difference(&cidrs_after).copied().collect();
    r.blocks_removed = removed.len();
    law("blocks removed but planted as kept", removed.difference(&cluster.expect.removed_blocks).map(|c| c.to_string()).collect());
    law("blocks planted for removal but still present", cluster.expect.removed_blocks.difference(&removed).map(|c| c.to_string()).collect());
    law("blocks that appeared", cidrs_after.difference(cidrs_before).map(|c| c.to_string()).collect());

    let aff_removed: BTreeSet<String> = before.affinity_names.difference(after.affinity_names).cloned().collect();
    r.affinities_removed = aff_removed.len();
    law("affinities removed but planted as kept", aff_removed.difference(&cluster.expect.removed_affinities).cloned().collect());
    law("affinities planted for removal but still present", cluster.expect.removed_affinities.difference(&aff_removed).cloned().collect());

    let present: HashSet<u32> = after.handle_objects.iter().copied().collect();
    let handles_removed: BTreeSet<String> =
        before.handle_objects.iter().filter(|p| !present.contains(p)).map(|p| before.names.get(*p).to_string()).collect();
    drop(present);
    r.handles_removed = handles_removed.len();
    law("handles removed but planted as kept", handles_removed.difference(&cluster.expect.removed_handles).cloned().collect());
    law("handles planted for removal but still present", cluster.expect.removed_handles.difference(&handles_removed).cloned().collect());

    r.ok = problems.is_empty();
    r.problems = problems;
    r
}
