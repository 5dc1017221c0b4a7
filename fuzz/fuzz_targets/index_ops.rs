//! Differential: a byte string decoded into index operations, applied both to the roaring index
//! and to a plain BTreeMap model; after each operation the invariants hold and both agree on
//! every allocation, every node's allocation count and every live pod IP. A GC pass then never
//! plans to release an IP a live pod reports.
#![no_main]
use std::collections::{BTreeMap, BTreeSet};

use calico_kube_controllers::ipam::gc::{GcConfig, GcState};
use calico_kube_controllers::ipam::plan::Scope;
use calico_kube_controllers::ipam::index::IpamIndex;
use calico_kube_controllers::model::{IpamBlock, NodeLite, PodFacts, PodPhase};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

type Model = BTreeMap<u8, BTreeMap<u8, (String, String, String)>>; // block -> ordinal -> (handle, pod, node)

fn block_json(b: u8, allocs: &BTreeMap<u8, (String, String, String)>) -> IpamBlock {
    let mut allocations = vec![serde_json::Value::Null; 8];
    let mut attributes = vec![];
    for (o, (h, p, n)) in allocs {
        allocations[*o as usize] = json!(attributes.len());
        attributes.push(json!({"handle_id": h, "secondary": {"namespace": "ns", "pod": p, "node": n}}));
    }
    let unallocated: Vec<usize> = (0..8).filter(|o| allocations[*o].is_null()).collect();
    serde_json::from_value(json!({"metadata": {"name": format!("10-0-{b}-0-29")}, "spec": {
        "cidr": format!("10.0.{b}.0/29"), "affinity": format!("host:n{}", b % 3), "allocations": allocations,
        "unallocated": unallocated, "attributes": attributes, "strictAffinity": false}}))
    .unwrap()
}

fuzz_target!(|data: &[u8]| {
    let mut index = IpamIndex::new();
    let mut gc = GcState::new();
    let mut model: Model = BTreeMap::new();
    let mut pods: BTreeMap<u8, (u8, Option<u8>)> = BTreeMap::new(); // pod -> (node, ip ordinal in block 0)
    let mut now = 1_800_000_000_000i64;
    let cfg = GcConfig { leak_grace: 60_000, ..GcConfig::default() };
    for chunk in data.chunks(4) {
        let [op, a, b, c] = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0), *chunk.get(3).unwrap_or(&0)];
        match op % 7 {
            0 => {
                let blk = a % 4;
                let entry = model.entry(blk).or_default();
                entry.insert(b % 8, (format!("h{}", c % 5), format!("p{}", c % 6), format!("n{}", (c / 8) % 3)));
                index.apply_block(&block_json(blk, entry)).unwrap();
            }
            1 => {
                let blk = a % 4;
                if let Some(entry) = model.get_mut(&blk) {
                    entry.remove(&(b % 8));
                    index.apply_block(&block_json(blk, entry)).unwrap();
                }
            }
            2 => {
                model.remove(&(a % 4));
                index.delete_block(&format!("10.0.{}.0/29", a % 4).parse().unwrap());
            }
            3 => {
                let ip = (b % 2 == 0).then_some(c % 8);
                pods.insert(a % 6, ((b / 2) % 3, ip));
                let f = PodFacts {
                    namespace: "ns".into(),
                    name: format!("p{}", a % 6),
                    node: format!("n{}", (b / 2) % 3),
                    phase: PodPhase::Running,
                    status_reports_ip: ip.is_some(),
                    ips: ip.iter().map(|o| format!("10.0.0.{o}").parse().unwrap()).collect(),
                    ..PodFacts::default()
                };
                index.apply_pod(&f);
            }
            4 => {
                pods.remove(&(a % 6));
                index.delete_pod("ns", &format!("p{}", a % 6));
            }
            5 => {
                let n: NodeLite = serde_json::from_value(json!({"metadata": {"name": format!("n{}", a % 3)}})).unwrap();
                if b % 2 == 0 { index.apply_node(&n) } else { index.delete_node(&n.metadata.name) }
            }
            _ => {
                now += i64::from(a) * 1000;
                let plan = gc.pass(&mut index, now, &cfg, &Scope::Full, None, &BTreeMap::new());
                let live: BTreeSet<String> = pods.values().filter_map(|(_, ip)| ip.map(|o| format!("10.0.0.{o}"))).collect();
                for r in &plan.releases {
                    for it in &r.items {
                        assert!(!live.contains(&it.ip.to_string()), "planned release of live IP {}", it.ip);
                    }
                }
                gc.check_invariants(&index).unwrap();
            }
        }
        index.check_invariants().unwrap();
        gc.check_invariants(&index).unwrap();
        let total: usize = model.values().map(BTreeMap::len).sum();
        assert_eq!(index.allocation_count() as usize, total);
        for (blk, allocs) in &model {
            for (o, (h, _, _)) in allocs {
                let g = index.gid_of_ip(format!("10.0.{blk}.{o}").parse().unwrap()).unwrap();
                let a = index.alloc(g).expect("model allocation missing from index");
                assert_eq!(index.handle_name(a.handle), h.as_str());
            }
        }
        let mut per_node: BTreeMap<String, u64> = BTreeMap::new();
        for allocs in model.values() {
            for (_, _, n) in allocs.values() {
                *per_node.entry(n.clone()).or_default() += 1;
            }
        }
        for (n, count) in per_node {
            let s = index.strings().lookup(&n).unwrap();
            assert_eq!(index.allocations_of_node(s).map_or(0, |b| b.len()), count);
        }
    }
});
