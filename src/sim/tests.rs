//! The simulator's own tests: the pipeline passes its checker, the checker can fail, runs are
//! deterministic, and the dump says what the cluster says.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use serde_json::Value;

use super::*;
use crate::datastore::Kind;

fn small(seed: u64) -> SimOptions {
    SimOptions { nodes: 20, pods_per_node: 10, leak_fraction: 0.05, seed, output: OutputFormat::Json, write_dump: None, repeats: 1, dirty_samples: 1, compare: None }
}

fn category_counts(r: &SimReport) -> Vec<(&'static str, usize, usize, usize)> {
    r.categories.iter().map(|c| (c.category, c.addresses, c.found, c.released)).collect()
}

#[test]
fn a_small_simulation_releases_exactly_what_was_planted() {
    let mut out = Vec::new();
    let summary = run(&small(1), &mut out).unwrap();
    assert!(summary.ok, "{:#?}", summary.report.check.problems);
    let r = &summary.report;
    assert!(r.check.released_total > 0 && r.check.released_total == r.check.expected_total);
    // Every planted category is present at this size, and every releasable one was found.
    let present: BTreeSet<&str> = r.categories.iter().map(|c| c.category).collect();
    for c in Category::ALL {
        assert!(present.contains(c.as_str()), "no {} planted", c.as_str());
    }
    for c in &r.categories {
        if c.fate == "release" {
            assert_eq!((c.found, c.released), (c.addresses, c.addresses), "{}", c.category);
        } else {
            assert_eq!(c.released, 0, "{}", c.category);
        }
    }
    assert_eq!(r.objects.blocks_removed, r.objects.blocks_expected_removed);
    assert!(r.objects.empty_blocks_planted > 0 && r.objects.orphan_handles_planted > 0);
    let json: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(json["ok"], true);
    let stages: Vec<&str> = json["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages[..4], [report::STAGE_DECODE, report::STAGE_BUILD, report::STAGE_FULL, report::STAGE_DIRTY]);
    assert!(stages[4].starts_with("execute (") && stages.len() == 5, "{stages:?}");
}

#[test]
fn the_table_report_says_ok_and_names_every_stage() {
    let mut out = Vec::new();
    let opts = SimOptions { output: OutputFormat::Table, ..small(3) };
    assert!(run(&opts, &mut out).unwrap().ok);
    let text = String::from_utf8(out).unwrap();
    for needle in ["CATEGORY", "index build", "full pass (steady state)", "dirty pass (10 nodes)", "execute (", "check: OK", "stale-ip"] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
}

/// Releases `ip` behind the GC's back with the real release write, as a wrong decision would.
fn free_behind_the_gcs_back(run: &PipelineRun, ip: IpAddr) {
    let block = run.index.block(run.index.block_containing(ip).unwrap()).unwrap();
    let ord = crate::model::names::ip_to_ordinal(&block.cidr, ip).unwrap();
    let stored = run.ds.peek(Kind::IpamBlock, &block.name).unwrap();
    let mut current: crate::model::IpamBlock = stored.decode().unwrap();
    let attr = current.spec.attributes[current.spec.allocations[ord as usize].unwrap() as usize].clone();
    let item = crate::ipam::plan::ReleaseItem {
        ordinal: ord,
        ip,
        handle: attr.handle_id.unwrap(),
        sequence: current.spec.sequence_number_for_allocation[&ord.to_string()],
        reason: crate::ipam::plan::LeakReason::PodNotFound,
    };
    let out = crate::ipam::release::apply_release(&mut current, &[item], run.now, 0).unwrap();
    assert_eq!(out.released, vec![ord]);
    run.ds.update_now(Kind::IpamBlock, &stored.with_value(&current).unwrap()).unwrap();
}

#[test]
fn the_checker_fails_when_a_live_ip_is_released() {
    let run = run_pipeline(generate(&small(2)).unwrap(), 1).unwrap();
    assert!(check_run(&run).unwrap().ok);
    let live = run.cluster.planted.iter().find(|p| p.category == Category::LivePod).unwrap().ips[0];
    free_behind_the_gcs_back(&run, live);
    let report = check_run(&run).unwrap();
    assert!(!report.ok);
    assert_eq!(report.unexpected_releases, 1);
    assert_eq!(report.released_live_ips, 1);
    let text = report.problems.join("\n");
    assert!(text.contains("released but planted as kept") && text.contains("live pod reports it"), "{text}");
    // The block itself is valid: only the ground truth catches this.
    assert!(!text.contains("calicoctl"), "{text}");
}

#[test]
fn the_checker_fails_when_a_kept_handle_or_block_goes_or_a_planted_leak_survives() {
    let run = run_pipeline(generate(&small(4)).unwrap(), 1).unwrap();
    let tunnel = run.cluster.planted.iter().find(|p| p.category == Category::Tunnel).unwrap();
    let name = crate::model::names::handle_object_name(run.before.holder(&tunnel.ips[0]).unwrap());
    let stored = run.ds.peek(Kind::IpamHandle, &name).unwrap();
    run.ds.delete_now(Kind::IpamHandle, &name, &stored.exact()).unwrap();
    let report = check_run(&run).unwrap();
    assert!(!report.ok);
    assert!(report.problems.iter().any(|p| p.starts_with("handles removed but planted as kept")), "{:?}", report.problems);

    // A checker that is told a kept item should have gone reports it as missed.
    let mut cluster = run.cluster.clone();
    let idx = cluster.planted.iter().position(|p| p.category == Category::WrongNodeAttr).unwrap();
    cluster.planted[idx].category = Category::PodDeleted;
    let run2 = PipelineRun { cluster, ..run };
    let report = check_run(&run2).unwrap();
    assert_eq!(report.missed_releases, 1, "{:?}", report.problems);
}

#[test]
fn compact_pod_facts_read_as_the_facts_they_keep_and_share_their_names() {
    use crate::model::pod::{PodFacts, PodObject, PodPhase};
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let facts = |name: &str, ips: &[&str]| PodFacts {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        node: "n1".into(),
        phase: PodPhase::Running,
        ips: ips.iter().map(|s| ip(s)).collect(),
        ..PodFacts::default()
    };
    // Each flag set alone, so two that were swapped would show.
    let flagged: [fn(&mut PodFacts); 6] = [
        |f| f.evicted = true,
        |f| f.deleting = true,
        |f| f.host_network = true,
        |f| f.status_reports_ip = true,
        |f| f.unparsable_ips = true,
        |f| f.phase = PodPhase::Failed,
    ];
    let mut names = cluster::NameTable::default();
    for ips in [&[][..], &["10.0.0.1"], &["fd00::1", "10.0.0.1"]] {
        for set in flagged {
            let mut f = facts("p", ips);
            set(&mut f);
            let compact = SimPodFacts::of(&f, &mut names).unwrap();
            assert_eq!(compact.view(), f.view(), "{ips:?}");
        }
    }
    assert!(SimPodFacts::of(&facts("p", &["10.0.0.1", "10.0.0.2", "fd00::1"]), &mut names).is_none(), "three addresses do not fit");
    let (a, b) = (SimPodFacts::of(&facts("a", &[]), &mut names).unwrap(), SimPodFacts::of(&facts("b", &[]), &mut names).unwrap());
    assert!(std::ptr::eq(a.view().node, b.view().node) && std::ptr::eq(a.view().namespace, b.view().namespace), "one copy of each name");
}

#[test]
fn the_same_seed_gives_the_same_cluster_and_the_same_counts() {
    let a = generate(&small(9)).unwrap();
    let b = generate(&small(9)).unwrap();
    let c = generate(&small(10)).unwrap();
    assert_eq!(a.blocks, b.blocks);
    assert_eq!(a.handles, b.handles);
    assert_eq!(a.pod_facts, b.pod_facts);
    assert_ne!(a.blocks, c.blocks);
    let ra = run(&small(9), &mut Vec::new()).unwrap().report;
    let rb = run(&small(9), &mut Vec::new()).unwrap().report;
    assert_eq!(category_counts(&ra), category_counts(&rb));
    let passes = |r: &SimReport| r.passes.iter().map(|p| (p.pass, p.examined, p.leaks, p.released)).collect::<Vec<_>>();
    assert_eq!(passes(&ra), passes(&rb));
}

#[test]
fn generated_objects_are_valid_and_pods_report_what_their_allocations_hold() {
    let c = generate(&small(5)).unwrap();
    for b in &c.blocks {
        crate::ipam::release::check_block(b, T0).unwrap();
    }
    let allocated = checker::allocated_ips(&c.blocks);
    let planted: usize = c.planted.iter().map(|p| p.ips.len()).sum();
    assert_eq!(planted, allocated.len(), "every allocation is planted exactly once");
    for p in &c.planted {
        let holders: HashSet<&String> = p.ips.iter().map(|ip| &allocated[ip]).collect();
        assert_eq!(holders.len(), 1, "a planted group is the addresses of one handle: {p:?}");
    }
    let handles: HashSet<&str> = c.handles.iter().map(|h| h.handle_id()).collect();
    assert!(allocated.values().all(|h| handles.contains(h.as_str())), "every allocation has a handle object");
    for (pod, facts) in c.pods.iter().zip(&c.pod_facts) {
        assert!(pod.container_id.len() == 64);
        assert_eq!(facts.view(), pod.facts().view(), "the compact facts are the pod's");
    }
}

#[test]
fn the_dump_reads_back_and_leak_scan_finds_the_initial_leaks() {
    let c = generate(&small(6)).unwrap();
    let dir = std::env::temp_dir().join(format!("sim-dump-test-{}", std::process::id()));
    let stats = dump::write_dump(&c, &dir).unwrap();
    assert!(stats.pod_bytes / stats.pods as u64 > 2_000, "pods are a few KB each: {stats:?}");
    let mut contents = crate::scan::dump::read_paths(std::slice::from_ref(&dir), &mut |_, _| {}).unwrap();
    let mut indexed = crate::scan::dump::read_paths_indexed(std::slice::from_ref(&dir), &mut |_, _| {}).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(contents.invalid.is_empty(), "{:?}", contents.invalid);
    assert_eq!(contents.pods, c.pods.iter().map(SimPod::facts).collect::<Vec<_>>());
    assert_eq!(contents.nodes.len(), c.nodes.len());
    assert_eq!(contents.blocks.len(), c.blocks.len());
    assert_eq!(contents.handles.len(), c.handles.len());
    assert_eq!(contents.affinities.len(), c.affinities.len());
    assert_eq!(contents.namespaces.len(), c.namespaces.len());

    let report = crate::scan::report::scan_dump(&mut contents, T0, &Default::default()).unwrap();
    let releasable: BTreeSet<IpAddr> = report.leaks.iter().filter(|l| l.releasable).map(|l| l.ip.parse().unwrap()).collect();
    let initial = [Category::PodDeleted, Category::PodFinished, Category::StaleIp, Category::DeletedNodePod, Category::DeletedNodeTunnel];
    let planted: BTreeSet<IpAddr> = c.planted.iter().filter(|p| initial.contains(&p.category)).flat_map(|p| p.ips.iter().copied()).collect();
    assert_eq!(releasable, planted);

    // Streaming the same dump straight into the index gives the same report.
    assert!(indexed.blocks.is_empty() && indexed.pods.is_empty(), "objects went to the index, not the vectors");
    let streamed = crate::scan::report::scan_dump(&mut indexed, T0, &Default::default()).unwrap();
    assert_eq!(streamed.leaks, report.leaks);
    assert_eq!(serde_json::to_value(&streamed.summary).unwrap(), serde_json::to_value(&report.summary).unwrap());
    assert_eq!(streamed.allocations.len(), report.allocations.len());
}

#[test]
fn every_target_is_judged_at_any_scale_and_its_limit_follows_the_scale() {
    let mut out = Vec::new();
    let summary = run(&SimOptions { dirty_samples: 100, ..small(4) }, &mut out).unwrap();
    let targets = &summary.report.targets;
    // Library tests have no counting allocator: only the retained-bytes figure is unmeasured.
    for t in targets {
        let unmeasured = t.name == "retained GC state per allocation";
        assert_eq!(t.met.is_none(), unmeasured, "{}: {:?}", t.name, t.met);
        assert!(t.limit > 0.0 && !t.basis.is_empty(), "{t:?}");
    }
    let limit = |name: &str, allocations: usize, pods: usize| {
        let stages = vec![report::StageTiming::new(report::STAGE_BUILD, &[1.0]), report::StageTiming::new(report::STAGE_FULL, &[1.0])];
        report::targets_for_test(allocations, pods, &stages).into_iter().find(|t| t.name == name).unwrap().limit
    };
    // The index build is held in proportion to the allocations: 100 ms at 196,510.
    assert!((limit("index build (reset)", 196_510, 150_000) - 100.0).abs() < 1e-9);
    assert!((limit("index build (reset)", 19_651, 15_000) - 10.0).abs() < 1e-9);
    // A full pass: 2 ms up to 150,000 pods, in proportion above.
    assert_eq!(limit("full pass (steady state)", 1_000, 600), 2.0);
    assert!((limit("full pass (steady state)", 400_000, 300_000) - 4.0).abs() < 1e-9);
    // Peak RSS: 200 MB up to the README's 30,000 pods, 2 GB at 25,000 x 30.
    assert_eq!(limit("simulate peak RSS", 1_000, 600), 200.0);
    assert_eq!(limit("simulate peak RSS", 39_000, 30_000), 200.0);
    assert!((limit("simulate peak RSS", 975_000, 750_000) - 2000.0).abs() < 1e-9);
    // A dirty pass does not grow with the cluster.
    assert_eq!(limit("dirty pass (10 nodes) median", 975_000, 750_000), 0.05);
}

#[test]
fn a_run_compared_with_a_previous_report_lists_each_shared_figure_with_its_ratio() {
    let mut first = Vec::new();
    run(&small(5), &mut first).unwrap();
    let previous: Value = serde_json::from_slice(&first).unwrap();
    let mut out = Vec::new();
    let opts = SimOptions { output: OutputFormat::Table, compare: Some(previous.clone()), ..small(5) };
    let summary = run(&opts, &mut out).unwrap();
    let c = &summary.report.comparison;
    let figures: Vec<&str> = c.iter().map(|c| c.figure.as_str()).collect();
    for f in ["index build (reset) median", "dirty pass (10 nodes) p99", "retained bytes per allocation", "allocations"] {
        assert!(figures.contains(&f), "{f} missing from {figures:?}");
    }
    let allocations = c.iter().find(|c| c.figure == "allocations").unwrap();
    assert_eq!((allocations.previous, allocations.ratio), (summary.report.scale.allocations as f64, 1.0));
    let build = c.iter().find(|c| c.figure == "index build (reset) median").unwrap();
    assert_eq!(build.previous, previous["stages"][1]["medianMs"].as_f64().unwrap());
    assert!((build.ratio - build.now / build.previous).abs() < 1e-9);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("COMPARED WITH THE PREVIOUS RUN") && text.contains("NOW/PREV"), "{text}");
    // Something that is not a report is refused, not compared with nothing.
    let err = run(&SimOptions { compare: Some(serde_json::json!({"x": 1})), ..small(5) }, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("not a simulate JSON report"), "{err}");
}

/// (name, revision) pairs of one kind.
type Versions = Vec<(String, String)>;

/// What the index holds of each IPAM kind: object names (handle IDs for handles) and revisions.
fn indexed(index: &IpamIndex) -> (Versions, Versions, Versions) {
    let mut blocks: Vec<_> = index.blocks().map(|(_, b)| (b.name.to_string(), b.revision.to_string())).collect();
    let mut affinities: Vec<_> = index.affinities().map(|(k, a)| (k.to_string(), a.revision.to_string())).collect();
    let mut handles: Vec<_> = index.handles().map(|(s, h)| (index.handle_name(s).into_owned(), h.revision.to_string())).collect();
    blocks.sort();
    affinities.sort();
    handles.sort();
    (blocks, affinities, handles)
}

#[test]
fn following_the_datastore_by_revision_leaves_the_index_as_comparing_every_object_does() {
    let loaded = Loaded::new(generate(&small(5)).unwrap()).unwrap();
    let listed = loaded.listing().unwrap();
    let (mut followed, mut compared, mut planner) = (IpamIndex::new(), IpamIndex::new(), IpamIndex::new());
    for ix in [&mut followed, &mut compared, &mut planner] {
        assert!(ix.reset(loaded.snapshot(&listed)).is_empty());
        ix.take_dirty();
    }
    drop(listed);
    let ds = &loaded.ds;
    ds.record_removals();
    let mut synced = ds.revision();
    // Two rounds of the post-grace plan's writes (releases, block updates and deletes, handle
    // soft-deletes and deletes, affinity deletes), and another writer's change besides.
    let mut gc = GcState::new();
    let cfg = gc_config();
    gc.pass(&mut planner, T0, &cfg, &Scope::Full, None, &BTreeMap::new());
    for round in 0..2 {
        let now = T0 + GRACE + 120_000 + round * 60_000;
        let plan = gc.pass(&mut planner, now, &cfg, &Scope::Full, None, &BTreeMap::new());
        assert!(round > 0 || plan_has_work(&plan), "the first plan writes");
        block_on(execute_plan(ds, &plan, now, 0, &ExecuteOptions::default()));
        let some_handle = ds.revisions(Kind::IpamHandle).into_iter().find(|(_, _, soft)| !soft).unwrap().0;
        let mut h = ds.peek(Kind::IpamHandle, &some_handle).unwrap();
        h.value["metadata"]["labels"] = serde_json::json!({"touched": round.to_string()});
        ds.update_now(Kind::IpamHandle, &h).unwrap();
        synced = follow(ds, &mut followed, synced).unwrap();
        sync_index(ds, &mut compared).unwrap();
        sync_index(ds, &mut planner).unwrap();
        assert_eq!(indexed(&followed), indexed(&compared), "round {round}");
        assert_eq!(followed.allocation_count(), compared.allocation_count());
        followed.check_invariants().unwrap();
    }
    assert!(indexed(&followed).2.len() < loaded.before.handles, "handles were deleted along the way");
}

#[test]
fn removing_an_object_that_claims_an_indexed_blocks_cidr_leaves_the_block_indexed() {
    let loaded = Loaded::new(generate(&small(6)).unwrap()).unwrap();
    let ds = &loaded.ds;
    let real = ds.shared_current::<IpamBlock>(Kind::IpamBlock).unwrap()[0].clone();
    let mut stray = serde_json::to_value(&*real).unwrap();
    stray["metadata"] = serde_json::json!({"name": "stray"});
    ds.create_now(Kind::IpamBlock, "stray", stray).unwrap();
    let listed = loaded.listing().unwrap();
    let mut index = IpamIndex::new();
    let invalid = index.reset(loaded.snapshot(&listed));
    assert_eq!(invalid.len(), 1, "the stray block is reported, not indexed: {invalid:?}");
    drop(listed);
    ds.record_removals();
    let since = ds.revision();
    let before = indexed(&index).0;
    ds.delete_now(Kind::IpamBlock, "stray", &crate::datastore::Precondition::default()).unwrap();
    follow(ds, &mut index, since).unwrap();
    assert_eq!(indexed(&index).0, before, "{} is still indexed", real.name());
    index.check_invariants().unwrap();
}
