//! The release write, reproduced as a pure function on a block (SPEC §5.7, §4.1): what the
//! shell sends back to the datastore in one compare-and-swap update.
//!
//! Owns: freeing ordinals (into cooldown or back to the tail of `unallocated`), re-stamping
//! sequence numbers, compacting attributes, the cooldown backstop, and handle-count updates.
//! Must not: decide what is garbage (that is `gc`), or talk to a datastore.

use std::collections::BTreeMap;

use crate::model::block::{sequence_for, validate_block, AllocationAttribute, BlockView};
use crate::model::names::sanitize_handle;
use crate::model::time::{format_rfc3339, parse_rfc3339, Millis};
use crate::model::{InvalidObject, IpamBlock, IpamHandle};

use super::plan::ReleaseItem;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseOutcome {
    /// Ordinals freed by this write.
    pub released: Vec<u32>,
    /// Ordinals whose handle or sequence number no longer matches the plan: someone reallocated
    /// them since the scan. Never released; the shell refreshes its view from the block.
    pub stale: Vec<u32>,
    /// Ordinals already free or cooling down.
    pub already_free: Vec<u32>,
    /// Handle ID -> how many of its addresses this write freed.
    pub handle_counts: BTreeMap<String, u32>,
    /// The block is now empty and has no affinity: the shell deletes it instead of updating it.
    pub delete_block: bool,
}

impl ReleaseOutcome {
    pub fn changed(&self) -> bool {
        !self.released.is_empty()
    }
}

/// Frees `items` in `block`, checking each against the ordinal's current handle and sequence
/// number. Matching ordinals are freed even if others are stale: each carries its own CAS token,
/// so one moved allocation never holds back the rest (upstream fails the whole block instead).
pub fn apply_release(block: &mut IpamBlock, items: &[ReleaseItem], now: Millis, cooldown_secs: u32) -> Result<ReleaseOutcome, InvalidObject> {
    BlockView::from_block(block)?;
    let mut out = ReleaseOutcome::default();
    let spec = &mut block.spec;
    let mut to_free = Vec::new();
    for item in items {
        let ord = item.ordinal as usize;
        let Some(slot) = spec.allocations.get(ord).copied() else {
            out.stale.push(item.ordinal);
            continue;
        };
        let Some(attr_idx) = slot else {
            out.already_free.push(item.ordinal);
            continue;
        };
        let attr = &spec.attributes[attr_idx as usize];
        if attr.released_at.is_some() {
            out.already_free.push(item.ordinal);
            continue;
        }
        let handle = attr.handle_id.as_deref().map(sanitize_handle).unwrap_or("");
        if handle != item.handle || sequence_for(spec, item.ordinal) != item.sequence {
            out.stale.push(item.ordinal);
            continue;
        }
        *out.handle_counts.entry(handle.to_string()).or_default() += 1;
        to_free.push(item.ordinal);
    }
    if to_free.is_empty() {
        return Ok(out);
    }
    let next_seq = spec.sequence_number.wrapping_add(1);
    if cooldown_secs > 0 {
        // One shared cooldown attribute for everything released in this write.
        spec.attributes.push(AllocationAttribute { released_at: Some(format_rfc3339(now)), ..Default::default() });
        let idx = (spec.attributes.len() - 1) as u32;
        for ord in &to_free {
            spec.allocations[*ord as usize] = Some(idx);
            spec.sequence_number_for_allocation.insert(ord.to_string(), next_seq);
        }
    } else {
        for ord in &to_free {
            spec.allocations[*ord as usize] = None;
            spec.unallocated.push(*ord);
            spec.sequence_number_for_allocation.remove(&ord.to_string());
        }
    }
    compact_attributes(block);
    block.spec.sequence_number = next_seq;
    out.released = to_free;
    out.delete_block = block.spec.affinity.as_deref().unwrap_or("").is_empty() && block.spec.allocations.iter().all(Option::is_none);
    Ok(out)
}

/// The cold-IP backstop: ordinals whose cooldown has elapsed go back to `unallocated`.
/// Returns whether the block changed (and its sequence number was bumped).
pub fn collect_cooled(block: &mut IpamBlock, now: Millis, cooldown_secs: u32) -> Result<bool, InvalidObject> {
    BlockView::from_block(block)?;
    let spec = &mut block.spec;
    let due: Vec<u32> = spec
        .allocations
        .iter()
        .enumerate()
        .filter_map(|(ord, slot)| {
            let attr = &spec.attributes[(*slot)? as usize];
            let at = attr.released_at.as_deref()?;
            // An unparsable releasedAt is treated as long past: the address is not in use.
            let t = parse_rfc3339(at).unwrap_or(Millis::MIN / 2);
            (t + i64::from(cooldown_secs) * 1000 <= now).then_some(ord as u32)
        })
        .collect();
    if due.is_empty() {
        return Ok(false);
    }
    for ord in &due {
        spec.allocations[*ord as usize] = None;
        spec.unallocated.push(*ord);
        spec.sequence_number_for_allocation.remove(&ord.to_string());
    }
    compact_attributes(block);
    block.spec.sequence_number = block.spec.sequence_number.wrapping_add(1);
    Ok(true)
}

/// Drops attributes no ordinal points at and renumbers the rest, keeping their order.
fn compact_attributes(block: &mut IpamBlock) {
    let spec = &mut block.spec;
    let mut used = vec![false; spec.attributes.len()];
    for a in spec.allocations.iter().flatten() {
        used[*a as usize] = true;
    }
    if used.iter().all(|u| *u) {
        return;
    }
    let mut remap = vec![u32::MAX; used.len()];
    let mut kept = Vec::with_capacity(used.len());
    for (i, attr) in std::mem::take(&mut spec.attributes).into_iter().enumerate() {
        if used[i] {
            remap[i] = kept.len() as u32;
            kept.push(attr);
        }
    }
    spec.attributes = kept;
    for a in spec.allocations.iter_mut().flatten() {
        *a = remap[*a as usize];
    }
}

/// What to do with a handle object after a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleAction {
    Update,
    Delete,
    Unchanged,
}

/// Decrements the handle's count for `cidr` by `count`; the handle is deleted when nothing is left.
pub fn release_from_handle(handle: &mut IpamHandle, cidr: &str, count: u32) -> HandleAction {
    let Some(c) = handle.spec.block.get_mut(cidr) else { return HandleAction::Unchanged };
    *c = c.saturating_sub(count);
    if *c == 0 {
        handle.spec.block.remove(cidr);
    }
    if handle.spec.block.is_empty() { HandleAction::Delete } else { HandleAction::Update }
}

/// The post-write invariant: calicoctl's validator accepts the block.
pub fn check_block(block: &IpamBlock, now: Millis) -> Result<(), String> {
    let problems = validate_block(block, now);
    if problems.is_empty() { Ok(()) } else { Err(format!("block {}: {}", block.name(), problems.join("; "))) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::plan::LeakReason;
    use crate::model::block::tests::sample_block;

    fn item(ord: u32, handle: &str, seq: u64) -> ReleaseItem {
        ReleaseItem { ordinal: ord, ip: "10.0.0.0".parse().unwrap(), handle: handle.into(), sequence: seq, reason: LeakReason::PodNotFound }
    }

    fn block() -> IpamBlock {
        serde_json::from_value(sample_block()).unwrap()
    }

    #[test]
    fn release_without_cooldown_returns_ordinal_to_the_tail_of_unallocated() {
        let mut b = block();
        let out = apply_release(&mut b, &[item(0, "k8s-pod-network.abc", 10)], 1000, 0).unwrap();
        assert_eq!(out.released, vec![0]);
        assert_eq!(b.spec.unallocated, vec![1, 3, 0]);
        assert_eq!(b.spec.allocations, vec![None, None, Some(0), None]);
        assert_eq!(b.spec.attributes.len(), 1, "unused attribute compacted");
        assert_eq!(b.spec.attributes[0].handle_id.as_deref(), Some("ipip-tunnel-addr-node1"));
        assert_eq!(b.spec.sequence_number, 13);
        assert!(!b.spec.sequence_number_for_allocation.contains_key("0"));
        assert_eq!(out.handle_counts.get("k8s-pod-network.abc"), Some(&1));
        assert!(!out.delete_block, "affine block is kept");
        check_block(&b, 1000).unwrap();
    }

    #[test]
    fn release_with_cooldown_marks_released_at_and_restamps_sequence() {
        let mut b = block();
        let now = parse_rfc3339("2026-11-28T00:00:00Z").unwrap();
        apply_release(&mut b, &[item(0, "k8s-pod-network.abc", 10)], now, 60).unwrap();
        let idx = b.spec.allocations[0].unwrap() as usize;
        assert_eq!(b.spec.attributes[idx].released_at.as_deref(), Some("2026-11-28T00:00:00Z"));
        assert_eq!(b.spec.sequence_number_for_allocation["0"], 13);
        check_block(&b, now).unwrap();
        assert!(!collect_cooled(&mut b, now + 59_000, 60).unwrap());
        assert!(collect_cooled(&mut b, now + 60_000, 60).unwrap());
        assert_eq!(b.spec.allocations[0], None);
        assert_eq!(b.spec.unallocated, vec![1, 3, 0]);
        check_block(&b, now + 60_000).unwrap();
    }

    #[test]
    fn a_stale_sequence_number_or_handle_is_never_released() {
        let mut b = block();
        let before = b.clone();
        let out = apply_release(&mut b, &[item(0, "k8s-pod-network.abc", 9), item(2, "someone-else", 11)], 0, 0).unwrap();
        assert_eq!(out.stale, vec![0, 2]);
        assert!(!out.changed());
        assert_eq!(b, before, "nothing written");
    }

    #[test]
    fn an_unaffine_block_left_empty_is_deleted() {
        let mut b = block();
        b.spec.affinity = None;
        let out = apply_release(&mut b, &[item(0, "k8s-pod-network.abc", 10), item(2, "ipip-tunnel-addr-node1", 11)], 0, 0).unwrap();
        assert!(out.delete_block);
        check_block(&b, 0).unwrap();
    }

    #[test]
    fn unknown_fields_survive_a_release() {
        let mut b = block();
        apply_release(&mut b, &[item(0, "k8s-pod-network.abc", 10)], 0, 0).unwrap();
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["spec"]["someNewField"]["x"], 1);
        assert_eq!(v["status"]["future"], true);
        assert_eq!(v["spec"]["attributes"][0]["futureAttr"], 1);
    }

    #[test]
    fn handle_counts_are_decremented_and_empty_handles_deleted() {
        let mut h: IpamHandle = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h"}, "spec": {"handleID": "h", "block": {"10.0.0.0/30": 2, "10.0.1.0/30": 1}}
        })).unwrap();
        assert_eq!(release_from_handle(&mut h, "10.0.0.0/30", 1), HandleAction::Update);
        assert_eq!(release_from_handle(&mut h, "10.0.0.0/30", 1), HandleAction::Update);
        assert_eq!(release_from_handle(&mut h, "10.0.1.0/30", 1), HandleAction::Delete);
        assert_eq!(release_from_handle(&mut h, "10.9.9.0/30", 1), HandleAction::Unchanged);
    }
}
