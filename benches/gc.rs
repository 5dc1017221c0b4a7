//! GC benchmarks on synthetic clusters (fixed seeds) at 1k, 10k, 100k and 1M allocations:
//! index build (`reset`), a full pass and a dirty pass of 10 nodes on a built index, and the
//! leak-scan dump parser. Clusters and indexes are built once per scale, outside the timing.
//!
//! The passes run on the cluster as generated: ~2.5% of allocations are planted leaks that stay
//! candidates (and deleted nodes' leaks that stay confirmed), as in a cluster between two GC
//! passes, so each timed pass also plans their releases.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use calico_kube_controllers::datastore::memory::SharedHandle;

use calico_kube_controllers::ipam::gc::{GcConfig, GcState};
use calico_kube_controllers::ipam::plan::Scope;
use calico_kube_controllers::ipam::index::{IpamIndex, Snapshot};
use calico_kube_controllers::model::{BlockAffinity, IpamBlock};
use calico_kube_controllers::scan::dump::read_bytes;
use calico_kube_controllers::sim::{self, SimOptions, SimPodFacts, SyntheticCluster};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SEED: u64 = 42;
const SCALES: [usize; 4] = [1_000, 10_000, 100_000, 1_000_000];
/// Pods are a few KB each in a dump: past this scale the dump alone would take gigabytes.
const MAX_PARSE_SCALE: usize = 100_000;

/// The handles as a memory datastore lists them: each with a revision and a creation number, so
/// the index keeps their tokens compact (a bare handle has none, and its tokens would take the
/// path of odd ones, with two strings each).
fn listed_handles(c: &SyntheticCluster) -> Vec<SharedHandle> {
    (c.handles.iter().zip(1u64..)).map(|(h, n)| SharedHandle::Compact { handle: Arc::clone(h), revision: n, created: n }).collect()
}

fn snapshot<'a>(c: &'a SyntheticCluster, handles: &'a [SharedHandle]) -> Snapshot<'a, IpamBlock, BlockAffinity, SharedHandle, SimPodFacts> {
    Snapshot { blocks: &c.blocks, affinities: &c.affinities, handles, pods: &c.pod_facts, nodes: &c.nodes }
}

fn gc_benches(c: &mut Criterion) {
    let cfg = GcConfig::default();
    let fresh = BTreeMap::new();
    for scale in SCALES {
        let cluster = sim::generate(&SimOptions::for_allocations(scale, SEED)).expect("cluster");
        let allocations = cluster.allocation_count() as u64;
        let handles = listed_handles(&cluster);
        let mut index = IpamIndex::new();
        index.reset(snapshot(&cluster, &handles));
        let mut gc = GcState::new();
        gc.pass(&mut index, sim::T0, &cfg, &Scope::Full, None, &fresh);
        let now = sim::T0 + 1_000;
        let dirty: BTreeSet<Box<str>> = cluster.nodes.iter().take(10).map(|n| n.metadata.name.as_str().into()).collect();

        let mut group = c.benchmark_group("gc");
        group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(if scale >= 1_000_000 { 8 } else { 2 }));
        group.throughput(Throughput::Elements(allocations));
        group.bench_with_input(BenchmarkId::new("index_build", scale), &cluster, |b, cluster| {
            b.iter_with_large_drop(|| {
                let mut idx = IpamIndex::new();
                idx.reset(snapshot(cluster, &handles));
                idx
            })
        });
        group.bench_function(BenchmarkId::new("full_pass", scale), |b| {
            b.iter_with_large_drop(|| gc.pass(&mut index, now, &cfg, &Scope::Full, None, &fresh))
        });
        group.bench_function(BenchmarkId::new("dirty_pass_10_nodes", scale), |b| {
            b.iter_with_large_drop(|| gc.pass(&mut index, now, &cfg, &Scope::Dirty(dirty.clone()), None, &fresh))
        });
        if scale <= MAX_PARSE_SCALE {
            let mut pods = Vec::new();
            sim::dump::write_pods(&cluster, &mut pods).expect("pods dump");
            let mut ipam = Vec::new();
            sim::dump::write_ipam(&cluster, &mut ipam).expect("ipam dump");
            group.bench_function(BenchmarkId::new("leak_scan_parse", scale), |b| {
                b.iter_with_large_drop(|| {
                    let p = read_bytes("pods.json", &pods).expect("pods parse");
                    let i = read_bytes("ipam.json", &ipam).expect("ipam parse");
                    (p, i)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, gc_benches);
criterion_main!(benches);
