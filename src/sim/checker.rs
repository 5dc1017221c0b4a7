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
    pub handle_ids: &'a BTreeSet<String>,
    /// IPs that pods present at the end report (finished pods report none).
    pub live_ips: &'a HashSet<IpAddr>,
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

/// What the end is compared with, read off the generated cluster before the run: a summary, so
/// the generated objects need not stay in memory while the run goes on.
#[derive(Debug, Clone, Default)]
pub struct Before {
    /// Allocated addresses with their handle, as [`allocated_ips`] reads them.
    pub allocated: HashMap<IpAddr, String>,
    pub cidrs: BTreeSet<IpNet>,
    pub affinity_names: BTreeSet<String>,
    pub handle_ids: BTreeSet<String>,
    /// Every used ordinal (cooling down and Windows-reserved ones included).
    pub allocations: usize,
    pub blocks: usize,
    pub handles: usize,
}

impl Before {
    pub fn of(cluster: &SyntheticCluster) -> Before {
        Before {
            allocated: allocated_ips(&cluster.blocks),
            cidrs: cluster.blocks.iter().filter_map(|b| b.spec.cidr.parse().ok()).collect(),
            affinity_names: cluster.affinities.iter().map(|a| a.metadata.name.clone()).collect(),
            handle_ids: cluster.handles.iter().map(|h| h.spec.handle_id.clone()).collect(),
            allocations: cluster.allocation_count(),
            blocks: cluster.blocks.len(),
            handles: cluster.handles.len(),
        }
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

    // Borrowed from the blocks: no second copy of every handle ID.
    let now_allocated: HashMap<IpAddr, &str> = allocated(after.blocks).collect();
    let category_of: HashMap<IpAddr, Category> =
        cluster.planted.iter().flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.category))).collect();

    // Nothing appears and nothing changes hands: the simulation allocates nothing.
    let appeared: Vec<String> = now_allocated
        .iter()
        .filter(|(ip, h)| before.allocated.get(*ip).map(String::as_str) != Some(**h))
        .map(|(ip, h)| format!("{ip} now held by {h}"))
        .collect();
    law("addresses allocated or re-owned during the run", appeared);

    let released: BTreeSet<IpAddr> = before.allocated.keys().filter(|ip| !now_allocated.contains_key(ip)).copied().collect();
    let expected: BTreeSet<IpAddr> =
        cluster.planted.iter().filter(|p| p.category.released()).flat_map(|p| p.ips.iter().copied()).collect();
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
    let live_released: Vec<String> = released.iter().filter(|ip| after.live_ips.contains(ip)).map(label).collect();
    r.released_live_ips = live_released.len();
    law("released while a live pod reports it", live_released);

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

    let handles_removed: BTreeSet<String> = before.handle_ids.difference(after.handle_ids).cloned().collect();
    r.handles_removed = handles_removed.len();
    law("handles removed but planted as kept", handles_removed.difference(&cluster.expect.removed_handles).cloned().collect());
    law("handles planted for removal but still present", cluster.expect.removed_handles.difference(&handles_removed).cloned().collect());

    r.ok = problems.is_empty();
    r.problems = problems;
    r
}
