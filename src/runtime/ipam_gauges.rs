//! Upstream's per-pool and per-node IPAM gauges (SPEC §3.2), computed from the index in one walk
//! over the blocks and one over the tracked leaks.
//!
//! Owns: which pool a block belongs to for metrics (`no_ippool` when none), the labels
//! `unknown_node` and `no_affinity`, zero seeding, pool size and reserved-address arithmetic.
//! Must not: do I/O, read the clock, or build a string per allocation: counting is keyed by
//! interned symbols and only the final (pool, node) cells are turned into strings, so a 200k
//! allocation cluster costs a few milliseconds after each pass.

use std::collections::BTreeMap;

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

/// The gauges of one pool (or of `no_ippool`), by node label.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolGauges {
    /// `ipam_ippool_size`; `None` for `no_ippool`.
    pub size: Option<f64>,
    /// `ipam_ippool_reserved`; `None` for `no_ippool`.
    pub reserved: Option<f64>,
    pub in_use: BTreeMap<String, u64>,
    pub borrowed: BTreeMap<String, u64>,
    pub blocks: BTreeMap<String, u64>,
    pub gc_candidates: BTreeMap<String, u64>,
}

/// Every IPAM gauge at one moment, replaced whole after each pass: nothing accumulates, so a
/// deleted pool or node simply is not in the next value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpamGauges {
    /// Pool name → gauges; `no_ippool` only when some block matches no pool.
    pub pools: BTreeMap<String, PoolGauges>,
    /// Legacy `ipam_allocations_per_node` (allocations with a node attribute, all pools).
    pub allocations_per_node: BTreeMap<String, u64>,
    pub borrowed_per_node: BTreeMap<String, u64>,
    /// Legacy `ipam_blocks_per_node`, `no_affinity` included.
    pub blocks_per_node: BTreeMap<String, u64>,
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

#[derive(Default, Clone, Copy)]
struct Cell {
    in_use: u64,
    borrowed: u64,
    candidates: u64,
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
    let mut pool_of_slot: FastMap<u32, usize> = FastMap::default();
    let mut cells: FastMap<(usize, Sym), Cell> = FastMap::default();
    // Blocks keyed by (pool, host); `Sym::NONE` stands for no_affinity.
    let mut blocks: FastMap<(usize, Sym), u64> = FastMap::default();
    for (slot, block) in index.blocks() {
        let p = pool_index(pools, &block.cidr).unwrap_or(no_pool);
        pool_of_slot.insert(slot, p);
        let host = match block.owner {
            BlockOwner::Host(h) => h,
            BlockOwner::None | BlockOwner::Virtual(_) => Sym::NONE,
        };
        *blocks.entry((p, host)).or_default() += 1;
        // A block's allocations mostly share one node: count runs, touch the map once per run.
        let mut run: Option<(Sym, Cell)> = None;
        for a in &block.allocs {
            let borrowed = !a.node.is_none() && a.node != host;
            match &mut run {
                Some((node, cell)) if *node == a.node => {
                    cell.in_use += 1;
                    cell.borrowed += u64::from(borrowed);
                }
                _ => {
                    if let Some((node, cell)) = run.take() {
                        add(&mut cells, (p, node), cell);
                    }
                    run = Some((a.node, Cell { in_use: 1, borrowed: u64::from(borrowed), candidates: 0 }));
                }
            }
        }
        if let Some((node, cell)) = run {
            add(&mut cells, (p, node), cell);
        }
    }
    for g in tracked {
        let slot = gid_slot(g);
        let Some(a) = index.block(slot).and_then(|b| b.alloc(gid_ordinal(g))) else { continue };
        let p = pool_of_slot.get(&slot).copied().unwrap_or(no_pool);
        cells.entry((p, a.node)).or_default().candidates += 1;
    }

    let pool_name = |p: usize| if p == no_pool { NO_POOL } else { pools[p].name.as_str() };
    let node_name = |s: Sym, none: &'static str| if s.is_none() { none.to_string() } else { index.resolve(s).to_string() };
    let mut out = IpamGauges::default();
    let mut seeded: Vec<String> = known_nodes.map(str::to_string).collect();
    seeded.sort();
    seeded.dedup();
    for pool in pools {
        let g = out.pools.entry(pool.name.clone()).or_default();
        g.size = Some(addresses(&pool.cidr));
        g.reserved = Some(reserved_in(&pool.cidr, reserved));
        for node in &seeded {
            g.in_use.insert(node.clone(), 0);
            g.borrowed.insert(node.clone(), 0);
            g.gc_candidates.insert(node.clone(), 0);
        }
    }
    for ((p, host), n) in blocks {
        let node = node_name(host, NO_AFFINITY);
        *out.blocks_per_node.entry(node.clone()).or_default() += n;
        *out.pools.entry(pool_name(p).to_string()).or_default().blocks.entry(node).or_default() += n;
    }
    for ((p, node), cell) in cells {
        let label = node_name(node, UNKNOWN_NODE);
        let g = out.pools.entry(pool_name(p).to_string()).or_default();
        if cell.in_use > 0 {
            *g.in_use.entry(label.clone()).or_default() += cell.in_use;
            // Upstream never reports a borrowed series for unknown_node; zeros come only from
            // seeding, so `no_ippool` has no zero series.
            if !node.is_none() && cell.borrowed > 0 {
                *g.borrowed.entry(label.clone()).or_default() += cell.borrowed;
            }
        }
        if cell.candidates > 0 {
            *g.gc_candidates.entry(label.clone()).or_default() += cell.candidates;
        }
        if !node.is_none() && cell.in_use > 0 {
            *out.allocations_per_node.entry(label.clone()).or_default() += cell.in_use;
            if cell.borrowed > 0 {
                *out.borrowed_per_node.entry(label).or_default() += cell.borrowed;
            }
        }
    }
    out
}

fn add(cells: &mut FastMap<(usize, Sym), Cell>, key: (usize, Sym), c: Cell) {
    let e = cells.entry(key).or_default();
    e.in_use += c.in_use;
    e.borrowed += c.borrowed;
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
