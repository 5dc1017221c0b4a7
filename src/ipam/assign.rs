//! IP assignment, pure (SPEC §6.6; for the LoadBalancer controller's virtual host): where a new
//! address comes from, and the one block write that takes it.
//!
//! Owns: choosing the block (one of the owner's affine blocks with a usable free ordinal first, in
//! CIDR order; then claiming the first block CIDR of a usable pool that has no block yet; then,
//! without strict affinity, a block in those pools that has no affinity at all), choosing the
//! ordinal (`unallocated` in its stored order, skipping reserved addresses), the new block object
//! a claim creates, and the allocation written into a block (the owner's attribute shared by
//! equality, `sequenceNumberForAllocation`, the block's sequence number bumped).
//! Must not: do I/O or read the clock; take an ordinal that is allocated or cooling down (only
//! `unallocated` ordinals whose slot is empty are taken); take an address in a block another
//! owner's affinity holds; take a reserved address; claim past the per-host block limit for an
//! automatic assignment; write a block that fails calicoctl's validator.
//!
//! The caller writes an [`Assignment`] as the CNI does: the BlockAffinity (pending) before a
//! claimed block, the handle's count before the block, the block by create (a claim) or by
//! compare-and-swap update on the revision it was read at, then the affinity confirmed; a
//! conflict re-reads and plans again.
//!
//! Upstream: `libcalico-go/lib/ipam/ipam.go` (`autoAssign`, `findOrClaimBlock`,
//! `assignFromExistingBlock`, `AssignIP`), `ipam_block.go` (`newBlock`, `autoAssign`, `assign`,
//! `findOrAddAttribute`), `ipam_block_reader_writer.go` (`findUsableBlock`, `claimAffineBlock`).
//!
//! # Departures from upstream, each for a reason
//!
//! * New blocks are claimed in ascending CIDR order within a pool, from its first block. Upstream
//!   walks a pseudo-random order seeded by a hash of the host name (through Go's `math/rand`); the
//!   order only decides which free addresses come first, and ascending order is reproducible
//!   without Go's generator.
//! * Affine blocks are tried in CIDR order (upstream: the order its affinity list returns, which
//!   is lexical by name).
//! * A specific address is refused when it is reserved (upstream's `AssignIP` ignores
//!   IPReservations) and when its block is held by another owner's affinity (upstream takes it
//!   from any block without strict affinity).
//! * Borrowing (no affine block has room and no new block can be claimed) takes only blocks
//!   without any affinity; upstream takes any block in the pools when strict affinity is off.
//! * Empty blocks held by other owners are never reclaimed here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::block::{Affinity, AllocationAttribute, AttrMap, BlockView, IpamBlockSpec, KIND};
use crate::model::names::{block_size, cidr_to_name, ip_to_ordinal, ordinal_to_ip};
use crate::model::time::{Millis, format_rfc3339};
use crate::model::IpamBlock;

/// The LoadBalancer controller's virtual host, and the affinity its blocks carry.
pub const LB_HOST: &str = "load-balancer";
pub const LB_AFFINITY: &str = "virtual:load-balancer";
/// Upstream's per-host block limit when IPAMConfig's `maxBlocksPerHost` is 0.
pub const DEFAULT_MAX_BLOCKS_PER_HOST: u32 = 20;

/// An IP pool as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    pub cidr: IpNet,
    /// Its `blockSize` (default 26 for IPv4, 122 for IPv6).
    pub block_prefix: u8,
    /// Enabled, not being deleted, and allowed for this use (`allowedUses` has `LoadBalancer`).
    pub usable: bool,
    /// `assignmentMode: Automatic` (the default): used without being asked for by name or CIDR.
    pub automatic: bool,
}

/// What the planner reads: the pools, every block inside them as stored, the reserved CIDRs and
/// the IPAM configuration's switches.
#[derive(Debug, Clone, Copy)]
pub struct IpamView<'a> {
    pub pools: &'a [PoolInfo],
    /// Blocks by CIDR (those inside `pools`; others are ignored).
    pub blocks: &'a BTreeMap<IpNet, IpamBlock>,
    pub reserved: &'a [IpNet],
    pub strict_affinity: bool,
    /// IPAMConfig's `maxBlocksPerHost` (0: [`DEFAULT_MAX_BLOCKS_PER_HOST`]).
    pub max_blocks_per_host: u32,
}

/// Who the address is for: the handle ID, the attributes written with it and the affinity of
/// its blocks (e.g. [`LB_AFFINITY`]).
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub handle: &'a str,
    pub attrs: &'a AttrMap,
    pub affinity: &'a str,
}

/// The address family of an auto-assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// An IPv4-mapped IPv6 address counts as IPv4, as Go's `To4` reads it.
    pub fn of(ip: IpAddr) -> Family {
        if ip.to_canonical().is_ipv4() { Family::V4 } else { Family::V6 }
    }
    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The block write that takes the address.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockWrite {
    /// A claim: create this block (with the owner's affinity and the allocation in it); its
    /// BlockAffinity is created pending before it and confirmed after it.
    Create(IpamBlock),
    /// Compare-and-swap update of the stored block (read at the revision it carries).
    Update(IpamBlock),
}

impl BlockWrite {
    pub fn block(&self) -> &IpamBlock {
        match self {
            BlockWrite::Create(b) | BlockWrite::Update(b) => b,
        }
    }
}

/// One planned address.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub ip: IpAddr,
    pub block_cidr: IpNet,
    pub write: BlockWrite,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    #[error("no usable {family} pool allows this use", family = .0.as_str())]
    NoPool(Family),
    #[error("the requested pool {0} does not exist, is disabled, or does not allow this use")]
    PoolNotUsable(IpNet),
    #[error("the requested pool {0} is not an {family} pool", family = .1.as_str())]
    WrongFamily(IpNet, Family),
    #[error("no free {family} address in pools {pools}", family = .0.as_str(), pools = .1.join(", "))]
    Exhausted(Family, Vec<String>),
    #[error("the per-host block limit ({0}) is reached and no owned block has a free address")]
    BlockLimit(u32),
    #[error("{0} is not in a usable pool that allows this use")]
    NotInPool(IpAddr),
    #[error("{0} is already assigned")]
    InUse(IpAddr),
    #[error("{0} is reserved by an IPReservation")]
    Reserved(IpAddr),
    #[error("{0} is in block {1}, held by affinity {2:?}")]
    ForeignBlock(IpAddr, IpNet, String),
    #[error("block {0} is invalid: {1}")]
    InvalidBlock(IpNet, String),
}

impl AssignError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            AssignError::NoPool(_) => "no_pool",
            AssignError::PoolNotUsable(_) | AssignError::WrongFamily(..) => "pool_not_usable",
            AssignError::Exhausted(..) => "exhausted",
            AssignError::BlockLimit(_) => "block_limit",
            AssignError::NotInPool(_) => "not_in_pool",
            AssignError::InUse(_) => "in_use",
            AssignError::Reserved(_) => "reserved",
            AssignError::ForeignBlock(..) => "foreign_block",
            AssignError::InvalidBlock(..) => "invalid_block",
        }
    }
}

impl IpamView<'_> {
    fn reserved(&self, ip: &IpAddr) -> bool {
        self.reserved.iter().any(|r| r.contains(ip))
    }

    fn block_limit(&self) -> u32 {
        if self.max_blocks_per_host == 0 { DEFAULT_MAX_BLOCKS_PER_HOST } else { self.max_blocks_per_host }
    }

    /// The pool holding `ip`, usable or not.
    fn pool_of(&self, ip: &IpAddr) -> Option<&PoolInfo> {
        self.pools.iter().find(|p| p.cidr.contains(ip))
    }

    /// The pools an auto-assignment of `family` may use: the requested ones (each must be a
    /// usable pool of that family; manual pools are reached this way), else every usable
    /// automatic pool of the family, in the order given.
    fn pools_for(&self, family: Family, requested: Option<&[IpNet]>) -> Result<Vec<&PoolInfo>, AssignError> {
        let pools: Vec<&PoolInfo> = match requested.filter(|r| !r.is_empty()) {
            Some(cidrs) => {
                let mut out = Vec::new();
                for c in cidrs {
                    if Family::of_net(c) != family {
                        return Err(AssignError::WrongFamily(*c, family));
                    }
                    let p = self.pools.iter().find(|p| p.cidr == c.trunc() && p.usable).ok_or(AssignError::PoolNotUsable(*c))?;
                    out.push(p);
                }
                out
            }
            None => self.pools.iter().filter(|p| p.usable && p.automatic && Family::of_net(&p.cidr) == family).collect(),
        };
        if pools.is_empty() {
            return Err(AssignError::NoPool(family));
        }
        Ok(pools)
    }

    /// The first ordinal of `block` that is free in `unallocated` order, whose slot is empty and
    /// whose address is not reserved.
    fn free_ordinal(&self, block: &IpamBlock, cidr: &IpNet) -> Option<u32> {
        let spec = &block.spec;
        spec.unallocated
            .iter()
            .copied()
            .find(|o| spec.allocations.get(*o as usize).is_some_and(Option::is_none) && !self.reserved(&ordinal_to_ip(cidr, *o)))
    }
}

/// Block CIDRs of `pool` in ascending order.
fn block_cidrs(pool: &PoolInfo) -> impl Iterator<Item = IpNet> + '_ {
    let prefix = pool.block_prefix.max(pool.cidr.prefix_len());
    pool.cidr.subnets(prefix).into_iter().flatten()
}

/// Whether every address of `cidr` is reserved (upstream skips such a block).
fn wholly_reserved(view: &IpamView<'_>, cidr: &IpNet) -> bool {
    view.reserved.iter().any(|r| r.contains(cidr))
}

/// One address of `family` for `owner`, from `requested` pools (CIDRs) or every usable automatic
/// pool of the family.
pub fn auto_assign(view: &IpamView<'_>, owner: &Owner<'_>, family: Family, requested: Option<&[IpNet]>, now: Millis) -> Result<Assignment, AssignError> {
    let pools = view.pools_for(family, requested)?;
    let in_pools = |c: &IpNet| pools.iter().any(|p| p.cidr.contains(c));
    let mine = |b: &IpamBlock| b.spec.affinity.as_deref() == Some(owner.affinity);

    // 1. An affine block with room.
    let mut owned = 0u32;
    for (cidr, block) in view.blocks.iter().filter(|(c, b)| in_pools(c) && mine(b)) {
        owned += 1;
        // An invalid block is never written (the GC's scan reports it); the others still serve.
        if checked(cidr, block).is_err() {
            continue;
        }
        if let Some(ord) = view.free_ordinal(block, cidr) {
            return Ok(allocate(block, cidr, ord, owner, false));
        }
    }
    // 2. Claim the first free block CIDR.
    let limit = view.block_limit();
    let may_claim = owned < limit;
    if may_claim {
        for pool in &pools {
            for cidr in block_cidrs(pool) {
                if view.blocks.contains_key(&cidr) || wholly_reserved(view, &cidr) {
                    continue;
                }
                let block = new_block(&cidr, owner.affinity, now);
                if let Some(ord) = view.free_ordinal(&block, &cidr) {
                    return Ok(allocate(&block, &cidr, ord, owner, true));
                }
            }
        }
    }
    // 3. Borrow from a block without affinity.
    if !view.strict_affinity {
        for (cidr, block) in view.blocks.iter().filter(|(c, b)| in_pools(c) && Affinity::parse(b.spec.affinity.as_deref()) == Affinity::None) {
            if checked(cidr, block).is_err() {
                continue;
            }
            if let Some(ord) = view.free_ordinal(block, cidr) {
                return Ok(allocate(block, cidr, ord, owner, false));
            }
        }
    }
    if !may_claim {
        return Err(AssignError::BlockLimit(limit));
    }
    Err(AssignError::Exhausted(family, pools.iter().map(|p| p.name.clone()).collect()))
}

/// The address `ip` for `owner`: its block claimed when it has none yet (as upstream's
/// `AssignIP`, a claim for a named address is not held to the per-host block limit: the address
/// can only live in that block).
pub fn assign_ip(view: &IpamView<'_>, owner: &Owner<'_>, ip: IpAddr, now: Millis) -> Result<Assignment, AssignError> {
    let pool = view.pool_of(&ip).filter(|p| p.usable).ok_or(AssignError::NotInPool(ip))?;
    if view.reserved(&ip) {
        return Err(AssignError::Reserved(ip));
    }
    let prefix = pool.block_prefix.max(pool.cidr.prefix_len());
    let cidr = IpNet::new(ip, prefix).map_err(|_| AssignError::NotInPool(ip))?.trunc();
    let Some(block) = view.blocks.get(&cidr) else {
        let block = new_block(&cidr, owner.affinity, now);
        let ord = ip_to_ordinal(&cidr, ip).ok_or(AssignError::NotInPool(ip))?;
        return Ok(allocate(&block, &cidr, ord, owner, true));
    };
    match block.spec.affinity.as_deref() {
        Some(a) if a == owner.affinity => {}
        None | Some("") if !view.strict_affinity => {}
        other => return Err(AssignError::ForeignBlock(ip, cidr, other.unwrap_or("").to_string())),
    }
    checked(&cidr, block)?;
    let ord = ip_to_ordinal(&cidr, ip).ok_or(AssignError::NotInPool(ip))?;
    let spec = &block.spec;
    let free = spec.allocations.get(ord as usize).is_some_and(Option::is_none) && spec.unallocated.contains(&ord);
    if !free {
        return Err(AssignError::InUse(ip));
    }
    Ok(allocate(block, &cidr, ord, owner, false))
}

fn checked(cidr: &IpNet, block: &IpamBlock) -> Result<(), AssignError> {
    BlockView::from_block(block).map(|_| ()).map_err(|e| AssignError::InvalidBlock(*cidr, e.to_string()))
}

/// An empty block for `cidr` claimed with `affinity` at `now`: every ordinal free in ascending
/// order, the sequence number from the claim time in nanoseconds (as upstream stamps it).
pub fn new_block(cidr: &IpNet, affinity: &str, now: Millis) -> IpamBlock {
    let size = block_size(cidr).unwrap_or(0);
    let spec = IpamBlockSpec {
        cidr: cidr.to_string(),
        affinity: Some(affinity.to_string()),
        affinity_claim_time: Some(format_rfc3339(now)),
        allocations: vec![None; size as usize],
        unallocated: (0..size).collect(),
        sequence_number: (now.max(0) as u64).saturating_mul(1_000_000),
        ..IpamBlockSpec::default()
    };
    IpamBlock::new(KIND, &cidr_to_name(cidr), spec)
}

/// Attribute maps compare as maps (a stored block's keys come back in the store's order).
fn same_attrs(a: Option<&AttrMap>, b: Option<&AttrMap>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.len() == b.len() && a.iter().all(|(k, v)| b.get(k) == Some(v)),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// `block` with ordinal `ord` allocated to `owner`: its attribute shared with an equal one,
/// `sequenceNumberForAllocation` set to the block's sequence number before the write, which
/// bumps it.
fn allocate(block: &IpamBlock, cidr: &IpNet, ord: u32, owner: &Owner<'_>, claim: bool) -> Assignment {
    let mut block = block.clone();
    let spec = &mut block.spec;
    let attr = AllocationAttribute { handle_id: Some(owner.handle.to_string()), secondary: Some(owner.attrs.clone()), ..AllocationAttribute::default() };
    let idx = match spec.attributes.iter().position(|a| a.handle_id == attr.handle_id && same_attrs(a.secondary.as_ref(), attr.secondary.as_ref()) && a.released_at.is_none() && a.alternate_owner_attrs.is_none()) {
        Some(i) => i,
        None => {
            spec.attributes.push(attr);
            spec.attributes.len() - 1
        }
    };
    spec.allocations[ord as usize] = Some(idx as u32);
    spec.unallocated.retain(|o| *o != ord);
    spec.sequence_number_for_allocation.insert(ord.to_string(), spec.sequence_number);
    spec.sequence_number = spec.sequence_number.wrapping_add(1);
    let ip = ordinal_to_ip(cidr, ord);
    let write = if claim { BlockWrite::Create(block) } else { BlockWrite::Update(block) };
    Assignment { ip, block_cidr: *cidr, write }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::block::validate_block;
    use proptest::prelude::*;

    const NOW: Millis = 1_780_000_000_000;

    fn pool(name: &str, cidr: &str, block: u8) -> PoolInfo {
        PoolInfo { name: name.into(), cidr: cidr.parse().unwrap(), block_prefix: block, usable: true, automatic: true }
    }

    fn attrs(svc: &str) -> AttrMap {
        AttrMap::new([("namespace", "web"), ("service", svc), ("type", "LoadBalancer")])
    }

    fn owner<'a>(handle: &'a str, attrs: &'a AttrMap) -> Owner<'a> {
        Owner { handle, attrs, affinity: LB_AFFINITY }
    }

    fn view<'a>(pools: &'a [PoolInfo], blocks: &'a BTreeMap<IpNet, IpamBlock>, reserved: &'a [IpNet]) -> IpamView<'a> {
        IpamView { pools, blocks, reserved, strict_affinity: false, max_blocks_per_host: 0 }
    }

    /// Applies the write to the block map, as a datastore would.
    fn apply(blocks: &mut BTreeMap<IpNet, IpamBlock>, a: &Assignment) {
        blocks.insert(a.block_cidr, a.write.block().clone());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_address_claims_the_first_block_and_later_ones_fill_it_in_unallocated_order() {
        let pools = [pool("lb", "192.0.2.0/24", 30)];
        let mut blocks = BTreeMap::new();
        let a = attrs("a");
        let first = auto_assign(&view(&pools, &blocks, &[]), &owner("lb-a", &a), Family::V4, None, NOW).unwrap();
        assert_eq!(first.ip, ip("192.0.2.0"), "ordinal 0 of a fresh block, as upstream");
        let BlockWrite::Create(b) = &first.write else { panic!("a claim creates: {first:?}") };
        assert_eq!(b.spec.affinity.as_deref(), Some(LB_AFFINITY));
        assert_eq!(b.spec.unallocated, [1, 2, 3]);
        assert_eq!(b.spec.sequence_number_for_allocation["0"] + 1, b.spec.sequence_number);
        assert_eq!(b.name(), "192-0-2-0-30");
        assert!(validate_block(b, NOW).is_empty(), "{:?}", validate_block(b, NOW));
        apply(&mut blocks, &first);
        let got: Vec<IpAddr> = (0..5)
            .map(|_| {
                let x = auto_assign(&view(&pools, &blocks, &[]), &owner("lb-a", &a), Family::V4, None, NOW).unwrap();
                apply(&mut blocks, &x);
                x.ip
            })
            .collect();
        assert_eq!(got, [ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"), ip("192.0.2.4"), ip("192.0.2.5")], "the block fills, then the next is claimed");
        let b = &blocks[&"192.0.2.0/30".parse::<IpNet>().unwrap()];
        assert_eq!(b.spec.attributes.len(), 1, "one attribute shared by equal owners");
        assert!(validate_block(b, NOW).is_empty());
    }

    #[test]
    fn reserved_cooling_down_allocated_and_foreign_addresses_are_never_taken() {
        let pools = [pool("lb", "192.0.2.0/29", 29)];
        let cidr: IpNet = "192.0.2.0/29".parse().unwrap();
        let mut block = new_block(&cidr, LB_AFFINITY, NOW);
        // Ordinal 0 taken by another service; ordinal 1 cooling down (not in unallocated); 2 reserved.
        let other = attrs("other");
        block = match allocate(&block, &cidr, 0, &owner("lb-other", &other), false).write {
            BlockWrite::Update(b) => b,
            _ => unreachable!(),
        };
        block.spec.attributes.push(AllocationAttribute { released_at: Some(format_rfc3339(NOW)), ..Default::default() });
        block.spec.allocations[1] = Some(1);
        block.spec.unallocated.retain(|o| *o != 1);
        let blocks = BTreeMap::from([(cidr, block)]);
        let reserved = ["192.0.2.2/32".parse().unwrap()];
        let a = attrs("a");
        let v = view(&pools, &blocks, &reserved);
        assert_eq!(auto_assign(&v, &owner("lb-a", &a), Family::V4, None, NOW).unwrap().ip, ip("192.0.2.3"));
        for (taken, why) in [("192.0.2.0", "in_use"), ("192.0.2.1", "in_use"), ("192.0.2.2", "reserved"), ("198.51.100.1", "not_in_pool")] {
            assert_eq!(assign_ip(&v, &owner("lb-a", &a), ip(taken), NOW).unwrap_err().category(), why, "{taken}");
        }
        // A block another owner holds is never written, even without strict affinity.
        let mut host = new_block(&cidr, "host:node-1", NOW);
        host.spec.unallocated = (0..8).collect();
        let blocks = BTreeMap::from([(cidr, host)]);
        let v = view(&pools, &blocks, &[]);
        assert_eq!(assign_ip(&v, &owner("lb-a", &a), ip("192.0.2.5"), NOW).unwrap_err().category(), "foreign_block");
        assert_eq!(auto_assign(&v, &owner("lb-a", &a), Family::V4, None, NOW).unwrap_err().category(), "exhausted");
    }

    #[test]
    fn a_specific_address_claims_its_block_or_is_written_into_an_owned_one() {
        let pools = [pool("lb", "192.0.2.0/24", 26)];
        let mut blocks = BTreeMap::new();
        let a = attrs("a");
        let x = assign_ip(&view(&pools, &blocks, &[]), &owner("lb-a", &a), ip("192.0.2.77"), NOW).unwrap();
        assert_eq!(x.block_cidr, "192.0.2.64/26".parse::<IpNet>().unwrap());
        assert!(matches!(x.write, BlockWrite::Create(_)));
        apply(&mut blocks, &x);
        let y = assign_ip(&view(&pools, &blocks, &[]), &owner("lb-b", &a), ip("192.0.2.78"), NOW).unwrap();
        assert!(matches!(y.write, BlockWrite::Update(_)));
        assert_eq!(y.write.block().spec.allocations[14], Some(1), "a different handle, its own attribute");
        assert_eq!(assign_ip(&view(&pools, &blocks, &[]), &owner("lb-a", &a), ip("192.0.2.77"), NOW).unwrap_err(), AssignError::InUse(ip("192.0.2.77")));
    }

    #[test]
    fn requested_pools_reach_manual_pools_and_are_checked() {
        let mut manual = pool("manual", "198.51.100.0/24", 28);
        manual.automatic = false;
        let mut disabled = pool("off", "203.0.113.0/24", 28);
        disabled.usable = false;
        let pools = [pool("auto", "192.0.2.0/24", 28), manual, disabled, pool("v6", "fd00:1::/120", 124)];
        let blocks = BTreeMap::new();
        let v = view(&pools, &blocks, &[]);
        let a = attrs("a");
        let o = owner("lb-a", &a);
        assert_eq!(auto_assign(&v, &o, Family::V4, None, NOW).unwrap().ip, ip("192.0.2.0"), "automatic pools only without a request");
        let want: [IpNet; 1] = ["198.51.100.0/24".parse().unwrap()];
        assert_eq!(auto_assign(&v, &o, Family::V4, Some(&want), NOW).unwrap().ip, ip("198.51.100.0"));
        let off: [IpNet; 1] = ["203.0.113.0/24".parse().unwrap()];
        assert_eq!(auto_assign(&v, &o, Family::V4, Some(&off), NOW).unwrap_err().category(), "pool_not_usable");
        let v6: [IpNet; 1] = ["fd00:1::/120".parse().unwrap()];
        assert_eq!(auto_assign(&v, &o, Family::V4, Some(&v6), NOW).unwrap_err().category(), "pool_not_usable");
        assert_eq!(auto_assign(&v, &o, Family::V6, None, NOW).unwrap().ip, ip("fd00:1::"));
        assert_eq!(assign_ip(&v, &o, ip("203.0.113.9"), NOW).unwrap_err().category(), "not_in_pool", "a disabled pool gives nothing");
        let none = [pool("auto", "192.0.2.0/24", 28)];
        assert_eq!(auto_assign(&view(&none, &blocks, &[]), &o, Family::V6, None, NOW).unwrap_err(), AssignError::NoPool(Family::V6));
    }

    #[test]
    fn the_block_limit_stops_claims_and_borrowing_takes_only_unowned_blocks() {
        let pools = [pool("lb", "192.0.2.0/28", 30)];
        let mut blocks = BTreeMap::new();
        let a = attrs("a");
        let mut v = view(&pools, &blocks, &[]);
        v.max_blocks_per_host = 1;
        let x = auto_assign(&v, &owner("lb-a", &a), Family::V4, None, NOW).unwrap();
        apply(&mut blocks, &x);
        for _ in 0..3 {
            let mut v = view(&pools, &blocks, &[]);
            v.max_blocks_per_host = 1;
            let y = auto_assign(&v, &owner("lb-a", &a), Family::V4, None, NOW).unwrap();
            apply(&mut blocks, &y);
        }
        let mut v = view(&pools, &blocks, &[]);
        v.max_blocks_per_host = 1;
        assert_eq!(auto_assign(&v, &owner("lb-a", &a), Family::V4, None, NOW).unwrap_err(), AssignError::BlockLimit(1));
        // An unowned block in the pool is borrowed from (not with strict affinity).
        let cidr: IpNet = "192.0.2.4/30".parse().unwrap();
        let mut unowned = new_block(&cidr, "", NOW);
        unowned.spec.affinity = None;
        blocks.insert(cidr, unowned);
        let mut v = view(&pools, &blocks, &[]);
        v.max_blocks_per_host = 1;
        assert_eq!(auto_assign(&v, &owner("lb-a", &a), Family::V4, None, NOW).unwrap().ip, ip("192.0.2.4"));
        v.strict_affinity = true;
        assert_eq!(auto_assign(&v, &owner("lb-a", &a), Family::V4, None, NOW).unwrap_err(), AssignError::BlockLimit(1));
    }

    #[test]
    fn a_wholly_reserved_block_is_never_claimed_and_an_invalid_owned_block_is_skipped() {
        let pools = [pool("lb", "192.0.2.0/29", 30)];
        let blocks = BTreeMap::new();
        let reserved = ["192.0.2.0/30".parse().unwrap()];
        let a = attrs("a");
        let x = auto_assign(&view(&pools, &blocks, &reserved), &owner("lb-a", &a), Family::V4, None, NOW).unwrap();
        assert_eq!(x.ip, ip("192.0.2.4"));
        let cidr: IpNet = "192.0.2.0/30".parse().unwrap();
        let mut broken = new_block(&cidr, LB_AFFINITY, NOW);
        broken.spec.allocations.pop();
        let blocks = BTreeMap::from([(cidr, broken)]);
        assert_eq!(auto_assign(&view(&pools, &blocks, &[]), &owner("lb-a", &a), Family::V4, None, NOW).unwrap().ip, ip("192.0.2.4"), "the next block is claimed");
        assert_eq!(assign_ip(&view(&pools, &blocks, &[]), &owner("lb-a", &a), ip("192.0.2.1"), NOW).unwrap_err().category(), "invalid_block");
    }

    proptest! {
        /// Assigning until the pools run out hands out every usable address exactly once, never a
        /// reserved one, and every block written stays valid.
        #[test]
        fn assignments_are_distinct_valid_and_exhaust_exactly_the_usable_addresses(
            block_prefix in 28u8..=30,
            reserved_ords in proptest::collection::btree_set(0u32..16, 0..5),
            handles in 1usize..4,
        ) {
            let pools = [pool("lb", "192.0.2.0/28", block_prefix)];
            let pool_net: IpNet = "192.0.2.0/28".parse().unwrap();
            let reserved: Vec<IpNet> = reserved_ords.iter().map(|o| IpNet::new(ordinal_to_ip(&pool_net, *o), 32).unwrap()).collect();
            let mut blocks = BTreeMap::new();
            let mut seen = std::collections::BTreeSet::new();
            let a = attrs("a");
            let names: Vec<String> = (0..handles).map(|i| format!("lb-{i}")).collect();
            let mut i = 0;
            loop {
                let o = owner(&names[i % handles], &a);
                i += 1;
                match auto_assign(&view(&pools, &blocks, &reserved), &o, Family::V4, None, NOW) {
                    Ok(x) => {
                        prop_assert!(seen.insert(x.ip), "{} handed out twice", x.ip);
                        prop_assert!(!reserved.iter().any(|r| r.contains(&x.ip)));
                        prop_assert!(validate_block(x.write.block(), NOW).is_empty());
                        apply(&mut blocks, &x);
                    }
                    Err(e) => {
                        prop_assert_eq!(e.category(), "exhausted");
                        break;
                    }
                }
                prop_assert!(i <= 17);
            }
            prop_assert_eq!(seen.len(), 16 - reserved_ords.len());
        }
    }
}
