//! Any bytes as an IPAMBlock: parsing, validation, indexing and a release never panic, and a
//! release that succeeds leaves a block calicoctl's validator accepts (if the input was valid).
#![no_main]
use calico_kube_controllers::ipam::plan::{LeakReason, ReleaseItem};
use calico_kube_controllers::ipam::index::IpamIndex;
use calico_kube_controllers::ipam::release::{apply_release, check_block, collect_cooled};
use calico_kube_controllers::model::block::{validate_block, BlockView};
use calico_kube_controllers::model::IpamBlock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut block) = serde_json::from_slice::<IpamBlock>(data) else { return };
    let was_valid = validate_block(&block, i64::MAX / 4).is_empty();
    let mut index = IpamIndex::new();
    let _ = index.apply_block(&block);
    index.check_invariants().unwrap();
    let Ok(view) = BlockView::from_block(&block) else { return };
    let items: Vec<ReleaseItem> = view
        .slots()
        .map(|s| ReleaseItem {
            ordinal: s.ordinal,
            ip: calico_kube_controllers::model::names::ordinal_to_ip(&view.cidr, s.ordinal),
            handle: s.attribute.handle_id.clone().unwrap_or_default(),
            sequence: s.sequence,
            reason: LeakReason::PodNotFound,
        })
        .collect();
    let now = 1_800_000_000_000;
    if apply_release(&mut block, &items, now, 30).is_ok() && was_valid {
        check_block(&block, now).unwrap();
        collect_cooled(&mut block, now + 30_000, 30).unwrap();
        check_block(&block, now + 30_000).unwrap();
    }
});
