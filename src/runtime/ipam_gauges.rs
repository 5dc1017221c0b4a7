//! Upstream's per-pool and per-node IPAM gauges (SPEC §3.2), computed from the index in one walk
//! over the blocks and one over the tracked leaks.
//!
//! Owns: which pool a block belongs to for metrics (`no_ippool` when none), the labels
//! `unknown_node` and `no_affinity`, zero seeding, pool size and reserved-address arithmetic.
//! Must not: do I/O, read the clock, or build a string per allocation: counting is keyed by
//! interned symbols and only the final (pool, node) cells are turned into strings, so a 200k
//! allocation cluster costs a few milliseconds after each pass.

use ipnet::IpNet;
use roaring::RoaringBitmap;

use crate::ipam::index::{BlockOwner, IpamIndex, gid_ordinal, gid_slot};
use crate::ipam::intern::{FastMap, Sym};

/// The pool label of blocks that no IPPool contains (upstream's name).
pub const NO_POOL: &str = "no_ippool";
/// The node label of allocations without a `node` attribute (upstream's name).
pub const UNKNOWN_NODE: &str = "unknown_node";
/// The node label of blocks without a host affinity, virtual ones included (upstream's name).
pub const NO_AFFINITY: &str = "no_affinity";

/// One live IPPool (pools with a deletionTimestamp are left out by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDef {
    pub name: String,
    pub cidr: IpNet,
}

/// One (pool, node) cell; `None` = no series (upstream only zero-seeds some of them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCells {
    pub in_use: Option<u64>,
    pub borrowed: Option<u64>,
    pub blocks: Option<u64>,
    pub gc_candidates: Option<u64>,
}

/// The gauges of one pool (or of `no_ippool`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolGauges {
    /// `ipam_ippool_size`; `None` for `no_ippool`.
    pub size: Option<f64>,
    /// `ipam_ippool_reserved`; `None` for `no_ippool`.
    pub reserved: Option<f64>,
    /// Node label → cells, sorted by label.
    pub nodes: Vec<(String, NodeCells)>,
}

/// One node's legacy all-pool gauges; `None` = no series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegacyCells {
    pub allocations: Option<u64>,
    pub borrowed: Option<u64>,
    pub blocks: Option<u64>,
}

/// Every IPAM gauge at one moment, replaced whole after each pass: nothing accumulates, so a
/// deleted pool or node simply is not in the next value. One cell per (pool, node) keeps the
/// string work at the number of series, whatever the number of allocations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpamGauges {
    /// Pool name → gauges, sorted by name; `no_ippool` only when some block matches no pool.
    pub pools: Vec<(String, PoolGauges)>,
    /// Node label → legacy gauges, sorted by label.
    pub per_node: Vec<(String, LegacyCells)>,
}

/// Addresses in `net` (2^(bits − prefix)), as a float because an IPv6 /0 has 2^128.
pub fn addresses(net: &IpNet) -> f64 {
    let host_bits = i32::from(net.max_prefix_len() - net.prefix_len());
    2f64.powi(host_bits)
}

/// Addresses of `pool` covered by the reserved CIDRs, each counted once however many
/// reservations name it. CIDRs either nest or are disjoint, so each reservation's part of the
/// pool is either the reservation, the whole pool, or nothing.
pub fn reserved_in(pool: &IpNet, reserved: &[IpNet]) -> f64 {
    let parts: Vec<IpNet> = reserved
        .iter()
        .filter_map(|r| {
            if pool.contains(r) {
                Some(*r)
            } else if r.contains(pool) {
                Some(*pool)
            } else {
                None
            }
        })
        .collect();
    // A fold from +0: an empty f64 `sum()` is -0, which would render as "-0".
    IpNet::aggregate(&parts).iter().map(addresses).fold(0.0, |a, b| a + b)
}

/// The most specific pool containing `cidr`, as an index into `pools`.
pub fn pool_index(pools: &[PoolDef], cidr: &IpNet) -> Option<usize> {
    pools.iter().enumerate().filter(|(_, p)| p.cidr.contains(cidr)).max_by_key(|(_, p)| p.cidr.prefix_len()).map(|(i, _)| i)
}

/// A node label before it becomes a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Label {
    Node(Sym),
    /// An allocation without a `node` attribute.
    UnknownNode,
    /// A block without a host affinity.
    NoAffinity,
}

fn bump(cell: &mut Option<u64>, n: u64) {
    *cell = Some(cell.unwrap_or(0) + n);
}

/// Computes every gauge. `tracked` holds the GC's candidate and confirmed leaks (gids);
/// `known_nodes` the nodes that get zero series in each real pool.
pub fn compute<'a>(
    index: &IpamIndex,
    pools: &[PoolDef],
    reserved: &[IpNet],
    tracked: &RoaringBitmap,
    known_nodes: impl Iterator<Item = &'a str>,
) -> IpamGauges {
    // Pool of each block slot, as `pools.len()` for `no_ippool`: the candidate walk reuses it.
    let no_pool = pools.len();
    // Slots are dense (freed ones are reused), so a vector indexed by slot is the cheap map.
    let mut pool_of_slot: Vec<usize> = Vec::new();
    let mut cells: FastMap<(usize, Label), NodeCells> = FastMap::default();
    for (slot, block) in index.blocks() {
        let p = pool_index(pools, &block.cidr).unwrap_or(no_pool);
        let i = slot as usize;
        if pool_of_slot.len() <= i {
            pool_of_slot.resize(i + 1, no_pool);
        }
        pool_of_slot[i] = p;
        let host = match block.owner {
            BlockOwner::Host(h) if !h.is_none() => Label::Node(h),
            _ => Label::NoAffinity,
        };
        bump(&mut cells.entry((p, host)).or_default().blocks, 1);
        // A block's allocations mostly share one node: count runs, touch the map once per run.
        let mut run: Option<(Sym, u64, u64)> = None;
        for a in &block.allocs {
            let borrowed = u64::from(!a.node.is_none() && Label::Node(a.node) != host);
            match &mut run {
                Some((node, in_use, b)) if *node == a.node => {
                    *in_use += 1;
                    *b += borrowed;
                }
                _ => {
                    if let Some(r) = run.take() {
                        add_run(&mut cells, p, r);
                    }
                    run = Some((a.node, 1, borrowed));
                }
            }
        }
        if let Some(r) = run {
            add_run(&mut cells, p, r);
        }
    }
    for g in tracked {
        let slot = gid_slot(g);
        let Some(a) = index.block(slot).and_then(|b| b.alloc(gid_ordinal(g))) else { continue };
        let p = pool_of_slot.get(slot as usize).copied().unwrap_or(no_pool);
        let label = if a.node.is_none() { Label::UnknownNode } else { Label::Node(a.node) };
        bump(&mut cells.entry((p, label)).or_default().gc_candidates, 1);
    }
    // Zero seeding (real pools only): known nodes get in_use, borrowed and gc_candidates.
    let seeded: Vec<Sym> = known_nodes.filter_map(|n| index.strings().lookup(n)).filter(|s| !s.is_none()).collect();
    for p in 0..pools.len() {
        for node in &seeded {
            let c = cells.entry((p, Label::Node(*node))).or_default();
            c.in_use.get_or_insert(0);
            c.borrowed.get_or_insert(0);
            c.gc_candidates.get_or_insert(0);
        }
    }

    let label_text = |l: Label| match l {
        Label::Node(s) => index.resolve(s).to_string(),
        Label::UnknownNode => UNKNOWN_NODE.to_string(),
        Label::NoAffinity => NO_AFFINITY.to_string(),
    };
    let mut by_pool: Vec<Vec<(String, NodeCells)>> = vec![Vec::new(); pools.len() + 1];
    let mut legacy: FastMap<Label, LegacyCells> = FastMap::default();
    for ((p, label), c) in cells {
        // Legacy series: allocations and borrowed only for named nodes, blocks for any label.
        if c.blocks.is_some() || (matches!(label, Label::Node(_)) && c.in_use.is_some_and(|n| n > 0)) {
            let l = legacy.entry(label).or_default();
            if let Some(n) = c.blocks {
                bump(&mut l.blocks, n);
            }
            if let (Label::Node(_), Some(n)) = (label, c.in_use.filter(|n| *n > 0)) {
                bump(&mut l.allocations, n);
                if let Some(b) = c.borrowed.filter(|b| *b > 0) {
                    bump(&mut l.borrowed, b);
                }
            }
        }
        by_pool[p].push((label_text(label), c));
    }
    let mut out = IpamGauges::default();
    for (p, mut nodes) in by_pool.into_iter().enumerate() {
        nodes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if p == no_pool {
            if !nodes.is_empty() {
                out.pools.push((NO_POOL.to_string(), PoolGauges { size: None, reserved: None, nodes }));
            }
        } else {
            let cidr = &pools[p].cidr;
            let g = PoolGauges { size: Some(addresses(cidr)), reserved: Some(reserved_in(cidr, reserved)), nodes };
            out.pools.push((pools[p].name.clone(), g));
        }
    }
    out.pools.sort_by(|a, b| a.0.cmp(&b.0));
    out.per_node = legacy.into_iter().map(|(l, c)| (label_text(l), c)).collect();
    out.per_node.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Adds a run of `in_use` allocations of `node` (of which `borrowed` borrowed) to pool `p`.
/// Upstream never reports a borrowed series for unknown_node, and zeros come only from
/// seeding, so `no_ippool` has no zero series.
fn add_run(cells: &mut FastMap<(usize, Label), NodeCells>, p: usize, (node, in_use, borrowed): (Sym, u64, u64)) {
    let label = if node.is_none() { Label::UnknownNode } else { Label::Node(node) };
    let c = cells.entry((p, label)).or_default();
    bump(&mut c.in_use, in_use);
    if borrowed > 0 {
        bump(&mut c.borrowed, borrowed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn pool_size_is_two_to_the_host_bits() {
        assert_eq!(addresses(&net("10.0.0.0/24")), 256.0);
        assert_eq!(addresses(&net("fd00::/64")), 18446744073709551616.0);
        assert_eq!(addresses(&net("10.0.0.1/32")), 1.0);
    }

    #[test]
    fn reserved_addresses_count_each_address_of_the_pool_once() {
        let pool = net("10.0.0.0/24");
        let reserved = [net("10.0.0.0/30"), net("10.0.0.0/31"), net("10.0.0.128/25"), net("10.1.0.0/16")];
        assert_eq!(reserved_in(&pool, &reserved), 4.0 + 128.0);
        assert_eq!(reserved_in(&pool, &[net("10.0.0.0/8")]), 256.0, "a reservation covering the pool reserves all of it");
        assert_eq!(reserved_in(&pool, &[]), 0.0);
    }

    #[test]
    fn the_most_specific_pool_owns_a_block() {
        let pools = [PoolDef { name: "wide".into(), cidr: net("10.0.0.0/8") }, PoolDef { name: "narrow".into(), cidr: net("10.1.0.0/16") }];
        assert_eq!(pool_index(&pools, &net("10.1.2.0/26")), Some(1));
        assert_eq!(pool_index(&pools, &net("10.2.2.0/26")), Some(0));
        assert_eq!(pool_index(&pools, &net("192.168.0.0/26")), None);
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;
    use crate::ipam::gc::{GcConfig, GcState};
    use crate::ipam::plan::Scope;
    use crate::ipam::index::Snapshot;
    use crate::sim::{self, SimOptions};

    fn totals(scale: usize) -> (IpamGauges, u64, usize) {
        let c = sim::generate(&SimOptions::for_allocations(scale, 7)).expect("cluster");
        let mut index = IpamIndex::new();
        index.reset(Snapshot { blocks: &c.blocks, affinities: &c.affinities, handles: &c.handles, pods: &c.pod_facts, nodes: &c.nodes });
        let mut gc = GcState::new();
        gc.pass(&mut index, sim::T0, &GcConfig::default(), &Scope::Full, None, &Default::default());
        let pools = [PoolDef { name: "all-v4".into(), cidr: "0.0.0.0/0".parse().unwrap() }];
        let g = compute(&index, &pools, &[], gc.tracked(), index.node_names());
        (g, index.allocation_count(), index.block_count())
    }

    #[test]
    fn gauges_account_for_every_allocation_and_block_of_a_synthetic_cluster() {
        let (g, allocations, blocks) = totals(10_000);
        let cells = || g.pools.iter().flat_map(|(_, p)| p.nodes.iter().map(|(_, c)| *c));
        let in_use: u64 = cells().filter_map(|c| c.in_use).sum();
        let block_sum: u64 = cells().filter_map(|c| c.blocks).sum();
        let borrowed: u64 = cells().filter_map(|c| c.borrowed).sum();
        assert_eq!(in_use, allocations);
        assert_eq!(block_sum as usize, blocks);
        let legacy = || g.per_node.iter().map(|(_, c)| *c);
        assert_eq!(legacy().filter_map(|c| c.blocks).sum::<u64>() as usize, blocks);
        assert_eq!(borrowed, legacy().filter_map(|c| c.borrowed).sum::<u64>());
        assert!(in_use >= legacy().filter_map(|c| c.allocations).sum::<u64>());
    }
}
