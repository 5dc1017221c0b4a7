//! The GC controller's unit tests on the memory backends: inputs, rounds, gauges, backoff.

    use super::*;
    use crate::datastore::{ErrorKind, Kind, MemoryCluster, MemoryDatastore, Op};
    use crate::model::{IpamBlock, KubeControllersConfiguration, NodeLite, PodFacts};
    use crate::runtime::ipam_gauges::NO_POOL;
    use crate::runtime::watch::{Change, Object, Source};
    use serde_json::json;

    /// A dry-run controller on the memory backends, with a 2 s grace period.
    fn controller() -> (GcController, Arc<Shared>) {
        let (c, shared, _, _) = harness(true);
        (c, shared)
    }

    /// A controller on the memory backends; the returned sender says whether it leads.
    fn harness(dry_run: bool) -> (GcController, Arc<Shared>, watch::Sender<bool>, Arc<MemoryDatastore>) {
        let shared = Arc::new(Shared::default());
        let ds = Arc::new(MemoryDatastore::new());
        let cluster = Arc::new(MemoryCluster::new());
        let opts = ControllerOptions { dry_run, leak_grace_override: Some(2000), env: EnvConfig::default(), report_file: None };
        let (tx, may_write) = watch::channel(false);
        let c = GcController::with_executor(ds.clone(), cluster, opts, shared.clone(), may_write, ExecutorOptions::default(), Clock::system());
        (c, shared, tx, ds)
    }

    /// Waits for the job in flight, if any, and lets the controller act on its result (the
    /// follow-up pass included), until nothing is in flight.
    async fn settle(c: &mut GcController) {
        while c.in_flight.is_some() {
            let r = c.executor.results.recv().await.expect("the executor runs");
            c.job_finished(r);
        }
    }

    /// A round and everything it sets off, as the loop would run it.
    async fn round(c: &mut GcController, full: bool) {
        c.gc_round(full);
        settle(c).await;
        c.inputs.check_invariants().unwrap();
        c.gc.check_invariants(&c.inputs.index).unwrap();
    }

    fn block(cidr: &str, node: &str) -> Object {
        let name = cidr.replace(['.', '/'], "-");
        let b: IpamBlock = serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": name, "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000001"},
            "spec": {"cidr": cidr, "affinity": format!("host:{node}"), "strictAffinity": false,
                     "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                     "attributes": [{"handle_id": "h", "secondary": {"namespace": "ns", "pod": "p", "node": node}}],
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        Object::Block(Box::new(b))
    }

    fn node(name: &str) -> Object {
        Object::Node(serde_json::from_value::<NodeLite>(json!({"metadata": {"name": name}})).unwrap())
    }

    fn input(source: Source, change: Change) -> Input {
        Input { source, change }
    }

    fn list(c: &mut GcController, source: Source, objects: Vec<Object>) {
        c.handle(input(source, Change::Init));
        for o in objects {
            c.handle(input(source, Change::InitApply(o)));
        }
        c.handle(input(source, Change::InitDone));
    }

    #[tokio::test]
    async fn full_passes_run_every_half_grace_and_every_five_minutes_when_grace_is_unset() {
        let (mut c, _) = controller();
        assert_eq!(c.full_period(), Duration::from_secs(1), "--leak-grace-period 2s");
        c.opts.leak_grace_override = None;
        assert_eq!(c.full_period(), Duration::from_secs(450), "no configuration yet: the default one's 15m, halved");
        let kcc = |grace: &str| {
            let mut node = json!({});
            if !grace.is_empty() {
                node["leakGracePeriod"] = json!(grace);
            }
            let k: KubeControllersConfiguration =
                serde_json::from_value(json!({"metadata": {"name": "default"}, "spec": {"controllers": {"node": node}}})).unwrap();
            Object::KubeControllersConfiguration(Box::new(k))
        };
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(kcc(""))));
        assert_eq!(c.full_period(), Duration::from_secs(300), "unset (a kubectl-written object): 5 minutes");
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(kcc("4m"))));
        assert_eq!(c.full_period(), Duration::from_secs(120));
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(kcc("0s"))));
        assert_eq!(c.full_period(), Duration::from_secs(300), "grace 0 still looks for gone nodes");
    }

    fn pod_obj(ns: &str, name: &str) -> Object {
        let lite: crate::model::PodLite = serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": "u"},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}
        }))
        .unwrap();
        Object::Pod(Box::new(PodFacts::from_lite(&lite).0))
    }

    fn handle_obj(id: &str) -> Object {
        Object::Handle(
            serde_json::from_value(json!({
                "metadata": {"name": crate::model::names::handle_object_name(id), "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000003"},
                "spec": {"handleID": id, "block": {}, "deleted": false}
            }))
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_relist_drops_pods_and_handles_it_no_longer_shows_straight_from_the_index() {
        let (mut c, _) = controller();
        list(&mut c, Source::Pods, vec![pod_obj("a", "p1"), pod_obj("a", "p2"), pod_obj("b", "p1")]);
        // A handle ID whose object name differs from it (upper case and a `\r` suffix).
        list(&mut c, Source::Handles, vec![handle_obj("k8s-pod-network.Keep\r"), handle_obj("k8s-pod-network.gone")]);
        assert_eq!(c.inputs.index.present_pods().count(), 3);
        assert_eq!(c.inputs.index.handles().count(), 2);
        list(&mut c, Source::Pods, vec![pod_obj("a", "p2")]);
        list(&mut c, Source::Handles, vec![handle_obj("k8s-pod-network.Keep\r")]);
        let pods: Vec<String> = c.inputs.index.present_pods().map(|p| format!("{}/{}", c.inputs.index.resolve(p.namespace), c.inputs.index.resolve(p.name))).collect();
        assert_eq!(pods, ["a/p2"]);
        let handles: Vec<String> = c.inputs.index.handles().map(|(id, _)| c.inputs.index.handle_name(id).into_owned()).collect();
        assert_eq!(handles, ["k8s-pod-network.Keep"], "the index keys the handle by its cleaned ID");
        // A watch delete names the handle by its object; the index forgets it by ID.
        c.handle(input(Source::Handles, Change::Delete(handle_obj("k8s-pod-network.Keep\r"))));
        c.handle(input(Source::Pods, Change::Delete(pod_obj("a", "p2"))));
        assert_eq!((c.inputs.index.handles().count(), c.inputs.index.present_pods().count()), (0, 0));
        c.inputs.check_invariants().unwrap();
    }

    fn named_handle_obj(name: &str, id: &str, rv: &str) -> Object {
        Object::Handle(
            serde_json::from_value(json!({
                "metadata": {"name": name, "resourceVersion": rv, "uid": "00000000-0000-4000-8000-000000000004"},
                "spec": {"handleID": id, "block": {}, "deleted": false}
            }))
            .unwrap(),
        )
    }

    fn affinity_obj(name: &str, node: &str, cidr: &str) -> Object {
        Object::Affinity(
            serde_json::from_value(json!({
                "metadata": {"name": name, "resourceVersion": "1"},
                "spec": {"state": "confirmed", "node": node, "cidr": cidr, "deleted": "false"}
            }))
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_handle_or_affinity_whose_name_contradicts_its_content_is_reported_and_never_stands_in_for_the_real_one() {
        let (mut c, _) = controller();
        let bogus = named_handle_obj("bogus", "k8s-pod-network.a", "9");
        list(&mut c, Source::Handles, vec![handle_obj("k8s-pod-network.a"), bogus.clone()]);
        list(&mut c, Source::Affinities, vec![affinity_obj("n1-10-0-0-0-30", "n1", "10.0.0.0/30"), affinity_obj("n2-10-0-0-0-30", "n1", "10.0.0.0/30")]);
        let invalid: Vec<(String, String)> = c.inputs.invalid.keys().cloned().collect();
        assert_eq!(invalid, [("BlockAffinity".to_string(), "n2-10-0-0-0-30".to_string()), ("IPAMHandle".to_string(), "bogus".to_string())]);
        let sym = c.inputs.index.handle_id("k8s-pod-network.a").unwrap();
        assert_eq!(c.inputs.index.handle(sym).unwrap().revision, "1", "the real handle's tokens");
        assert_eq!(c.inputs.index.affinities().map(|(n, _)| n.to_string()).collect::<Vec<_>>(), ["n1-10-0-0-0-30"]);
        // The bogus handle's deletion takes only its own report with it.
        c.handle(input(Source::Handles, Change::Delete(bogus)));
        assert_eq!(c.inputs.index.handles().count(), 1, "the real handle stays indexed");
        // A relist no longer showing the bogus affinity drops its report too.
        list(&mut c, Source::Affinities, vec![affinity_obj("n1-10-0-0-0-30", "n1", "10.0.0.0/30")]);
        assert!(c.inputs.invalid.is_empty(), "{:?}", c.inputs.invalid);
        c.inputs.check_invariants().unwrap();
    }

    fn marked_deleted(o: Object, revision: &str) -> Object {
        let Object::Block(mut b) = o else { unreachable!() };
        b.spec.deleted = true;
        b.metadata.resource_version = Some(revision.into());
        Object::Block(b)
    }

    #[tokio::test]
    async fn a_block_marked_deleted_is_tracked_until_it_is_gone_or_live_again_and_planned_for_completion() {
        let (mut c, _) = controller();
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "n1"), marked_deleted(block("10.0.0.4/30", "n1"), "7")]);
        assert_eq!(c.inputs.index.block_count(), 1, "the index ignores the marked block");
        let pending = c.inputs.soft_deleted_blocks();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].block_name.as_str(), pending[0].revision.as_str()), ("10-0-0-4-30", "7"));
        assert_eq!(pending[0].uid, "00000000-0000-4000-8000-000000000001");
        assert_eq!(c.write_hold().soft_deleted_blocks, 1);
        c.inputs.check_invariants().unwrap();
        // The live block is marked too; the other one's mark is taken back.
        c.handle(input(Source::Blocks, Change::Apply(marked_deleted(block("10.0.0.0/30", "n1"), "8"))));
        c.handle(input(Source::Blocks, Change::Apply(block("10.0.0.4/30", "n1"))));
        assert_eq!(c.inputs.soft_deleted_blocks().iter().map(|b| b.block_name.as_str()).collect::<Vec<_>>(), ["10-0-0-0-30"]);
        assert_eq!(c.inputs.index.block_count(), 1);
        c.inputs.check_invariants().unwrap();
        // Its delete arrives: nothing is pending. A relist no longer showing a marked block forgets it too.
        c.handle(input(Source::Blocks, Change::Delete(block("10.0.0.0/30", "n1"))));
        assert_eq!(c.inputs.soft_deleted_count(), 0);
        c.handle(input(Source::Blocks, Change::Apply(marked_deleted(block("10.0.0.8/30", "n1"), "9"))));
        list(&mut c, Source::Blocks, vec![block("10.0.0.4/30", "n1")]);
        assert_eq!(c.inputs.soft_deleted_count(), 0);
        assert_eq!(c.write_hold().soft_deleted_blocks, 0);
        c.inputs.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn a_relist_drops_the_objects_it_no_longer_shows() {
        let (mut c, _) = controller();
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "n1"), block("10.0.0.4/30", "n2")]);
        list(&mut c, Source::Nodes, vec![node("n1"), node("n2")]);
        assert_eq!((c.inputs.index.block_count(), c.inputs.index.node_count()), (2, 2));
        // After a 410 Gone the watcher lists again: what the new list lacks was deleted meanwhile.
        list(&mut c, Source::Blocks, vec![block("10.0.0.4/30", "n2")]);
        list(&mut c, Source::Nodes, vec![node("n2")]);
        assert_eq!((c.inputs.index.block_count(), c.inputs.index.node_count()), (1, 1));
        assert!(c.inputs.index.block_slot(&"10.0.0.4/30".parse().unwrap()).is_some());
        c.inputs.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn no_pass_runs_and_readiness_waits_until_every_watch_listed() {
        let (mut c, shared) = controller();
        for source in Source::ALL.iter().copied().filter(|s| *s != Source::Pods) {
            list(&mut c, source, Vec::new());
        }
        round(&mut c, true).await;
        assert!(shared.report().is_none(), "no decision before the pod list is complete");
        assert!(!shared.ready());
        list(&mut c, Source::Pods, Vec::new());
        assert!(shared.ready());
        round(&mut c, true).await;
        assert!(shared.report().is_some());
    }

    /// A controller that would write (no dry run), steered by the returned "may write" sender.
    fn writer() -> (GcController, Arc<Shared>, watch::Sender<bool>, Arc<MemoryDatastore>) {
        harness(false)
    }

    /// An empty block still affine to node `gone`, which no longer exists: a plan to let it go.
    fn empty_block_of_gone_node() -> Object {
        let b: IpamBlock = serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": "10-0-0-0-30", "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000002"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:gone", "strictAffinity": false,
                     "allocations": [null, null, null, null], "unallocated": [0, 1, 2, 3], "attributes": [],
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        Object::Block(Box::new(b))
    }


    fn pool(name: &str, cidr: &str, deleting: bool) -> Object {
        let mut meta = json!({"name": name});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Object::Pool(serde_json::from_value(json!({"metadata": meta, "spec": {"cidr": cidr}})).unwrap())
    }

    fn reservation(name: &str, cidrs: &[&str]) -> Object {
        Object::Reservation(serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"reservedCIDRs": cidrs}})).unwrap())
    }

    /// A block with the given affinity and (ordinal, node attribute) allocations.
    fn block_with(cidr: &str, affinity: Option<&str>, allocs: &[(usize, &str)]) -> Object {
        let name = cidr.replace(['.', '/'], "-");
        let mut allocations = vec![serde_json::Value::Null; 4];
        let mut attributes = Vec::new();
        for (i, (ord, node)) in allocs.iter().enumerate() {
            allocations[*ord] = json!(i);
            let mut secondary = json!({"namespace": "ns", "pod": format!("p-{name}-{ord}")});
            if !node.is_empty() {
                secondary["node"] = json!(node);
            }
            attributes.push(json!({"handle_id": format!("h-{name}-{ord}"), "secondary": secondary}));
        }
        let unallocated: Vec<usize> = (0..4).filter(|o| !allocs.iter().any(|(a, _)| a == o)).collect();
        let b: IpamBlock = serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": name, "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000001"},
            "spec": {"cidr": cidr, "affinity": affinity, "strictAffinity": false,
                     "allocations": allocations, "unallocated": unallocated, "attributes": attributes,
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        Object::Block(Box::new(b))
    }

    fn block_calls(ds: &MemoryDatastore) -> u64 {
        ds.op_counts().iter().filter(|((_, kind), _)| *kind == Kind::IpamBlock).map(|(_, n)| n).sum()
    }

    #[tokio::test]
    async fn a_follower_plans_and_reports_but_executes_nothing_until_it_leads() {
        let (mut c, shared, leader, ds) = writer();
        for source in Source::ALL.iter().copied() {
            let objects = match source {
                Source::Blocks => vec![empty_block_of_gone_node()],
                Source::ClusterInformation => vec![cluster_info()],
                _ => Vec::new(),
            };
            list(&mut c, source, objects);
        }
        round(&mut c, true).await;
        assert!(shared.report().is_some(), "a follower publishes its report");
        assert_eq!(block_calls(&ds), 0, "a follower sends no IPAM request: {:?}", ds.op_counts());

        // The block is not in the datastore, so the leader's first write attempt fails, but it is made.
        leader.send_replace(true);
        round(&mut c, true).await;
        assert!(block_calls(&ds) > 0, "the leader executes the plan: {:?}", ds.op_counts());
    }

    /// The lines of the rendered text that start with one of `prefixes`, in rendered order.
    fn lines_of(text: &str, prefixes: &[&str]) -> Vec<String> {
        text.lines().filter(|l| prefixes.iter().any(|p| l.starts_with(&format!("{p}{{")))).map(str::to_string).collect()
    }

    const IPAM_METRICS: [&str; 10] = [
        "ipam_allocations_in_use",
        "ipam_allocations_borrowed",
        "ipam_blocks",
        "ipam_allocations_gc_candidates",
        "ipam_ippool_size",
        "ipam_ippool_reserved",
        "ipam_allocations_per_node",
        "ipam_allocations_borrowed_per_node",
        "ipam_blocks_per_node",
        "ipam_allocations_gc_reclamations",
    ];

    fn ipam_lines(c: &GcController, shared: &Shared) -> Vec<String> {
        publish::publish_gauges(&c.inputs, &c.gc, shared);
        lines_of(&shared.render_metrics(), &IPAM_METRICS)
    }

    #[tokio::test]
    async fn ipam_gauges_count_by_pool_and_node_with_zero_series_for_known_nodes() {
        let (mut c, shared) = controller();
        list(&mut c, Source::Nodes, vec![node("n1"), node("n2")]);
        list(&mut c, Source::Pools, vec![pool("pool-a", "10.0.0.0/24", false), pool("pool-b", "10.1.0.0/24", false)]);
        list(&mut c, Source::Reservations, vec![reservation("r", &["10.0.0.0/30", "10.0.0.2", "10.9.0.0/16"])]);
        list(
            &mut c,
            Source::Blocks,
            vec![
                // n1's block: n1's pod, n2's borrowed pod, and one allocation without a node.
                block_with("10.0.0.0/30", Some("host:n1"), &[(0, "n1"), (1, "n2"), (2, "")]),
                // An unaffine block: every allocation in it is borrowed.
                block_with("10.0.0.4/30", None, &[(1, "n1")]),
                // A virtual block counts as no_affinity too.
                block_with("10.0.0.8/30", Some("virtual:lb"), &[]),
                // A block in no pool.
                block_with("192.168.0.0/30", Some("host:n2"), &[(3, "n2")]),
            ],
        );
        let expected = [
            r#"ipam_allocations_in_use{ippool="no_ippool",node="n2"} 1"#,
            r#"ipam_allocations_in_use{ippool="pool-a",node="n1"} 2"#,
            r#"ipam_allocations_in_use{ippool="pool-a",node="n2"} 1"#,
            r#"ipam_allocations_in_use{ippool="pool-a",node="unknown_node"} 1"#,
            r#"ipam_allocations_in_use{ippool="pool-b",node="n1"} 0"#,
            r#"ipam_allocations_in_use{ippool="pool-b",node="n2"} 0"#,
            r#"ipam_allocations_borrowed{ippool="pool-a",node="n1"} 1"#,
            r#"ipam_allocations_borrowed{ippool="pool-a",node="n2"} 1"#,
            r#"ipam_allocations_borrowed{ippool="pool-b",node="n1"} 0"#,
            r#"ipam_allocations_borrowed{ippool="pool-b",node="n2"} 0"#,
            r#"ipam_blocks{ippool="no_ippool",node="n2"} 1"#,
            r#"ipam_blocks{ippool="pool-a",node="n1"} 1"#,
            r#"ipam_blocks{ippool="pool-a",node="no_affinity"} 2"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-a",node="n1"} 0"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-a",node="n2"} 0"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-b",node="n1"} 0"#,
            r#"ipam_allocations_gc_candidates{ippool="pool-b",node="n2"} 0"#,
            r#"ipam_ippool_size{ippool="pool-a"} 256"#,
            r#"ipam_ippool_size{ippool="pool-b"} 256"#,
            r#"ipam_ippool_reserved{ippool="pool-a"} 4"#,
            r#"ipam_ippool_reserved{ippool="pool-b"} 0"#,
            r#"ipam_allocations_per_node{node="n1"} 2"#,
            r#"ipam_allocations_per_node{node="n2"} 2"#,
            r#"ipam_allocations_borrowed_per_node{node="n1"} 1"#,
            r#"ipam_allocations_borrowed_per_node{node="n2"} 1"#,
            r#"ipam_blocks_per_node{node="n1"} 1"#,
            r#"ipam_blocks_per_node{node="n2"} 1"#,
            r#"ipam_blocks_per_node{node="no_affinity"} 2"#,
        ];
        assert_eq!(ipam_lines(&c, &shared), expected);
    }

    #[tokio::test]
    async fn a_deleted_pool_takes_its_series_along_and_its_blocks_move_to_no_ippool() {
        let (mut c, shared) = controller();
        list(&mut c, Source::Nodes, vec![node("n1")]);
        list(&mut c, Source::Pools, vec![pool("pool-a", "10.0.0.0/24", false)]);
        list(&mut c, Source::Blocks, vec![block_with("10.0.0.0/30", Some("host:n1"), &[(0, "n1")])]);
        shared.metrics(|m| {
            m.reclamations.insert(("pool-a".into(), "n1".into()), 3);
            m.reclamations.insert((NO_POOL.into(), "n1".into()), 1);
        });
        assert!(ipam_lines(&c, &shared).contains(&r#"ipam_allocations_gc_reclamations{ippool="pool-a",node="n1"} 3"#.to_string()));
        // A deletionTimestamp is as good as gone (upstream unregisters the pool's vectors then).
        c.handle(input(Source::Pools, Change::Apply(pool("pool-a", "10.0.0.0/24", true))));
        let expected = [
            r#"ipam_allocations_gc_reclamations{ippool="no_ippool",node="n1"} 1"#,
            r#"ipam_allocations_in_use{ippool="no_ippool",node="n1"} 1"#,
            r#"ipam_blocks{ippool="no_ippool",node="n1"} 1"#,
            r#"ipam_allocations_per_node{node="n1"} 1"#,
            r#"ipam_blocks_per_node{node="n1"} 1"#,
        ];
        assert_eq!(ipam_lines(&c, &shared), expected);
    }

    #[tokio::test]
    async fn gauges_are_recomputed_so_a_deleted_block_and_node_leave_no_series() {
        let (mut c, shared) = controller();
        list(&mut c, Source::Nodes, vec![node("n1"), node("n2")]);
        list(&mut c, Source::Pools, vec![pool("pool-a", "10.0.0.0/24", false)]);
        list(&mut c, Source::Blocks, vec![block_with("10.0.0.0/30", Some("host:n2"), &[(0, "n2")])]);
        assert_eq!(ipam_lines(&c, &shared).iter().filter(|l| l.contains("\"n2\"")).count(), 6);
        c.handle(input(Source::Blocks, Change::Delete(block_with("10.0.0.0/30", Some("host:n2"), &[]))));
        c.handle(input(Source::Nodes, Change::Delete(node("n2"))));
        let lines = ipam_lines(&c, &shared);
        assert!(lines.iter().all(|l| !l.contains("\"n2\"")), "{lines:#?}");
        assert!(lines.contains(&r#"ipam_allocations_in_use{ippool="pool-a",node="n1"} 0"#.to_string()));
    }

    fn api_calls(ds: &MemoryDatastore) -> u64 {
        ds.op_counts().values().sum()
    }

    #[tokio::test]
    async fn items_failing_transiently_wait_out_their_backoff_and_a_retry_round_is_scheduled() {
        // The datastore fails every request as an apiserver that does not answer would (transient).
        let (mut c, shared, leader, ds) = writer();
        for op in [Op::Get, Op::List, Op::Create, Op::Update, Op::Patch, Op::Delete] {
            ds.inject(None, None, op, ErrorKind::Transient, 1_000);
        }
        leader.send_replace(true);
        for source in Source::ALL.iter().copied().filter(|s| *s != Source::Blocks) {
            list(&mut c, source, if source == Source::ClusterInformation { vec![cluster_info()] } else { Vec::new() });
        }
        // A block of a node that no longer exists: its address and the node are released at once.
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "gone")]);
        round(&mut c, true).await;
        let after_first = api_calls(&ds);
        assert!(after_first > 0, "the first round tried the writes");
        assert!(c.retry_at.is_some(), "a round that failed schedules a retry soon");
        let waiting = shared.metrics(|m| m.items_backing_off.clone());
        assert_eq!(waiting.get("block"), Some(&1), "{waiting:?}");
        // Rounds before the items are due send nothing for them, yet still run and re-arm.
        round(&mut c, true).await;
        assert_eq!(api_calls(&ds), after_first, "a backing-off item is not retried early");
        assert!(c.retry_at.is_some());
        assert!(shared.render_metrics().contains("ipam_gc_items_backing_off{item=\"block\"} 1"));
    }

    fn kubevirt(namespace: &str, name: &str, owned_by_vm: bool) -> crate::runtime::watch::KubeVirtObject {
        crate::runtime::watch::KubeVirtObject { namespace: namespace.into(), name: name.into(), owned_by_vm }
    }

    #[tokio::test]
    async fn vm_allocations_become_candidates_only_once_kubevirt_is_listed_and_shows_the_vm_gone() {
        let (mut c, _) = controller();
        for source in Source::ALL.iter().copied().filter(|s| *s != Source::Blocks) {
            list(&mut c, source, if source == Source::Nodes { vec![node("n1")] } else { Vec::new() });
        }
        let b: IpamBlock = serde_json::from_value(json!({
            "metadata": {"name": "10-0-0-0-30", "resourceVersion": "1", "uid": "00000000-0000-4000-8000-000000000001"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:n1", "strictAffinity": false,
                     "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                     "attributes": [{"handle_id": "h", "secondary": {"namespace": "ns", "pod": "virt-launcher-vm1-x", "node": "n1", "vmi-name": "vm1"}}],
                     "sequenceNumber": 1, "deleted": false}
        }))
        .unwrap();
        list(&mut c, Source::Blocks, vec![Object::Block(Box::new(b))]);
        round(&mut c, true).await;
        assert_eq!(c.gc.candidate_count(), 0, "without KubeVirt facts a VM allocation is kept");

        // KubeVirt listed: the VM exists, so its allocation stays valid.
        list(&mut c, Source::VirtualMachines, vec![Object::VirtualMachine(kubevirt("ns", "vm1", false))]);
        list(&mut c, Source::VirtualMachineInstances, Vec::new());
        round(&mut c, true).await;
        assert_eq!(c.gc.candidate_count(), 0);

        // A VMI a VirtualMachine owns does not keep it alive on its own once the VM is gone.
        c.handle(input(Source::VirtualMachineInstances, Change::Apply(Object::VirtualMachineInstance(kubevirt("ns", "vm1", true)))));
        c.handle(input(Source::VirtualMachines, Change::Delete(Object::VirtualMachine(kubevirt("ns", "vm1", false)))));
        round(&mut c, true).await;
        assert_eq!(c.gc.candidate_count(), 1, "VM gone: its allocation is a leak candidate");
        assert!(c.inputs.all_synced(), "KubeVirt's sources never make readiness wait");
    }

    #[tokio::test]
    async fn without_the_node_controller_no_gc_pass_runs_but_readiness_still_follows_the_watches() {
        let (mut c, shared) = controller();
        let env = EnvConfig::from_env(&[("ENABLED_CONTROLLERS".to_string(), "loadbalancer".to_string())].into()).unwrap();
        c.opts.env = env;
        c.config_changed();
        for source in Source::ALL {
            list(&mut c, source, Vec::new());
        }
        round(&mut c, true).await;
        assert!(shared.ready(), "process stays up and ready");
        assert!(shared.report().is_none(), "no GC pass without the node controller");
        assert!(!shared.config.borrow().run.gc_enabled(), "the merged config is published");
    }

    #[tokio::test]
    async fn a_kcc_change_is_merged_and_published_once() {
        let (mut c, shared) = controller();
        let mut rx = shared.config.subscribe();
        let kcc: KubeControllersConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "default"},
            "spec": {"logSeverityScreen": "Debug", "controllers": {"node": {"leakGracePeriod": "7s"}}}
        }))
        .unwrap();
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(Object::KubeControllersConfiguration(Box::new(kcc.clone())))));
        assert!(rx.has_changed().unwrap());
        let state = rx.borrow_and_update().clone();
        assert_eq!((state.run.log_level, state.run.leak_grace(), state.api_present), (crate::config::LogLevel::Debug, 7000, true));
        c.handle(input(Source::KubeControllersConfiguration, Change::Apply(Object::KubeControllersConfiguration(Box::new(kcc)))));
        assert!(!rx.has_changed().unwrap(), "an unchanged merge (our own status write) is not republished");
    }

    #[tokio::test]
    async fn watch_deletes_remove_blocks_and_nodes_by_name() {
        let (mut c, _) = controller();
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "n1")]);
        list(&mut c, Source::Nodes, vec![node("n1")]);
        c.handle(input(Source::Blocks, Change::Delete(block("10.0.0.0/30", "n1"))));
        c.handle(input(Source::Nodes, Change::Delete(node("n1"))));
        assert_eq!((c.inputs.index.block_count(), c.inputs.index.node_count()), (0, 0));
    }

    #[tokio::test]
    async fn the_input_side_tables_are_checked_against_the_index() {
        let (mut c, _) = controller();
        list(&mut c, Source::Blocks, vec![block("10.0.0.0/30", "n1")]);
        list(&mut c, Source::Nodes, vec![node("n1")]);
        c.inputs.check_invariants().unwrap();
        // A block the side table names but the index lost is caught, and so is a node.
        c.inputs.known.blocks.insert("10-9-9-0-30".into(), "10.9.9.0/30".parse().unwrap());
        assert!(c.inputs.check_invariants().unwrap_err().contains("10-9-9-0-30"));
        c.inputs.known.blocks.remove("10-9-9-0-30");
        c.inputs.known.nodes.insert("ghost".into());
        assert!(c.inputs.check_invariants().unwrap_err().contains("ghost"));
    }


    #[tokio::test]
    async fn a_proven_gone_node_is_forgotten_when_the_node_watch_delivers_it_and_never_remembered_while_cached() {
        let (mut c, _) = controller();
        list(&mut c, Source::Nodes, vec![node("n1")]);
        // A read that answered NotFound before the watch delivered the node proves nothing.
        c.inputs.nodes_proven_gone([("n1".to_string(), "n1".to_string()), ("n2".to_string(), "n2".to_string())]);
        assert_eq!(c.inputs.proven_gone.keys().map(String::as_str).collect::<Vec<_>>(), vec!["n2"]);
        c.inputs.check_invariants().unwrap();
        c.handle(input(Source::Nodes, Change::Apply(node("n2"))));
        assert!(c.inputs.proven_gone.is_empty(), "the watch delivered n2 again");
        c.inputs.check_invariants().unwrap();
        // The invariant catches a proof of a node the cache holds.
        c.inputs.proven_gone.insert("n1".into(), "n1".into());
        assert!(c.inputs.check_invariants().unwrap_err().contains("n1"));
    }

    #[tokio::test]
    async fn a_calico_node_proven_gone_through_its_kubernetes_node_is_forgotten_when_that_node_comes_back() {
        let (mut c, _) = controller();
        list(&mut c, Source::Nodes, vec![node("n1")]);
        // etcd: the allocations name the Calico Node `calico-n2`, whose orchRef names `n2`.
        c.inputs.nodes_proven_gone([("calico-n2".to_string(), "n2".to_string())]);
        assert_eq!(c.inputs.proven_gone_names().into_iter().collect::<Vec<_>>(), vec!["calico-n2"]);
        c.inputs.check_invariants().unwrap();
        // The Kubernetes node is created again (same name): the old proof no longer holds.
        c.handle(input(Source::Nodes, Change::Apply(node("n2"))));
        assert!(c.inputs.proven_gone.is_empty(), "the watch delivered n2 again: {:?}", c.inputs.proven_gone);
        // A NotFound that raced with the node's creation proves nothing either.
        c.inputs.nodes_proven_gone([("calico-n2".to_string(), "n2".to_string())]);
        assert!(c.inputs.proven_gone.is_empty());
    }


    fn calico_node(name: &str, k8s: Option<&str>) -> Object {
        Object::CalicoNode(crate::runtime::watch::CalicoNodeRef { name: name.into(), k8s_node: k8s.map(str::to_string) })
    }

    #[tokio::test]
    async fn on_etcd_a_node_exists_when_its_calico_node_maps_to_a_live_kubernetes_node_or_to_none() {
        let (mut c, _) = controller();
        c.inputs = GcInputs::new().with_calico_nodes(true);
        assert!(c.inputs.waiting().contains(&Source::CalicoNodes), "a required source on etcd");
        list(&mut c, Source::Nodes, vec![node("k8s-a"), node("common")]);
        // `cal-a` stands for k8s-a; `bare` has no k8s orchRef; `common` has no Calico Node.
        list(&mut c, Source::CalicoNodes, vec![calico_node("cal-a", Some("k8s-a")), calico_node("bare", None)]);
        c.inputs.check_invariants().unwrap();
        let exists = |c: &GcController, n: &str| c.inputs.node_cached(n);
        assert!(exists(&c, "cal-a") && exists(&c, "bare"));
        assert!(!exists(&c, "common"), "a same-named Kubernetes Node is no Calico Node (SPEC §9.3)");
        assert!(!exists(&c, "k8s-a"), "the index holds Calico names");
        let sym = c.inputs.index.strings().lookup("cal-a").unwrap();
        assert_eq!(c.inputs.index.kubernetes_name(sym), "k8s-a");
        // The Kubernetes node goes: so does the Calico node it stood for.
        c.handle(input(Source::Nodes, Change::Delete(node("k8s-a"))));
        c.inputs.check_invariants().unwrap();
        assert!(!exists(&c, "cal-a"));
        // ... and comes back; then the Calico Node is re-pointed elsewhere, then deleted.
        c.handle(input(Source::Nodes, Change::Apply(node("k8s-a"))));
        assert!(exists(&c, "cal-a"));
        c.handle(input(Source::CalicoNodes, Change::Apply(calico_node("cal-a", Some("k8s-gone")))));
        c.inputs.check_invariants().unwrap();
        assert!(!exists(&c, "cal-a"));
        c.handle(input(Source::CalicoNodes, Change::Delete(calico_node("cal-a", Some("k8s-gone")))));
        c.inputs.check_invariants().unwrap();
        assert!(!exists(&c, "cal-a"));
        // A relist without `bare` deletes it.
        list(&mut c, Source::CalicoNodes, vec![]);
        c.inputs.check_invariants().unwrap();
        assert!(!exists(&c, "bare") && c.inputs.index.node_count() == 0);
    }

    #[tokio::test]
    async fn on_etcd_a_proof_by_a_missing_calico_node_holds_even_beside_a_same_named_kubernetes_node() {
        let (mut c, _) = controller();
        c.inputs = GcInputs::new().with_calico_nodes(true);
        list(&mut c, Source::Nodes, vec![node("common")]);
        list(&mut c, Source::CalicoNodes, vec![calico_node("cal-a", Some("k8s-a"))]);
        c.inputs.nodes_proven_gone([("common".to_string(), String::new()), ("cal-a".to_string(), "k8s-a".to_string())]);
        assert_eq!(c.inputs.proven_gone_names().into_iter().collect::<Vec<_>>(), vec!["cal-a", "common"]);
        c.inputs.check_invariants().unwrap();
        // The Calico Node appears: its absence proves nothing any more.
        c.handle(input(Source::CalicoNodes, Change::Apply(calico_node("common", None))));
        assert_eq!(c.inputs.proven_gone_names().into_iter().collect::<Vec<_>>(), vec!["cal-a"]);
        // A proof through a Kubernetes node the Calico Node no longer names is refused.
        c.inputs.proven_gone.clear();
        c.inputs.nodes_proven_gone([("cal-a".to_string(), "k8s-old".to_string())]);
        assert!(c.inputs.proven_gone.is_empty());
        c.inputs.check_invariants().unwrap();
    }

    /// A leader with every source listed and one block of the gone node `gone`: a plan to write.
    async fn a_leader_with_a_gone_nodes_block() -> (GcController, Arc<Shared>, watch::Sender<bool>, Arc<MemoryDatastore>) {
        let (mut c, shared, leader, ds) = writer();
        leader.send_replace(true);
        for source in Source::ALL.iter().copied() {
            let objects = match source {
                Source::Blocks => vec![empty_block_of_gone_node()],
                Source::ClusterInformation => vec![cluster_info()],
                _ => Vec::new(),
            };
            list(&mut c, source, objects);
        }
        (c, shared, leader, ds)
    }

    #[tokio::test]
    async fn a_failing_watch_holds_every_write_and_readiness_names_it_until_its_next_good_event() {
        let (mut c, shared, _leader, ds) = a_leader_with_a_gone_nodes_block().await;
        assert!(shared.ready() && !shared.status.snapshot().readiness.contains_key(crate::health::GC_DECISIONS), "no such key while nothing failed");
        c.handle(input(Source::Affinities, Change::Unhealthy { reason: "watch error: connection reset".into() }));
        c.inputs.check_invariants().unwrap();
        round(&mut c, true).await;
        assert_eq!(block_calls(&ds), 0, "no IPAM request while the affinity watch fails: {:?}", ds.op_counts());
        assert!(shared.report().is_some(), "the pass still runs for the report");
        let why = shared.readiness().unwrap_err();
        assert!(why.contains("blockaffinities (watch error: connection reset)"), "{why}");
        assert_eq!(shared.metrics(|m| m.rounds_writes_held), 1);
        c.handle(input(Source::Affinities, Change::Healthy));
        assert!(shared.ready());
        assert!(c.inputs.index.take_dirty().1, "the next round looks at everything the held ones planned");
        round(&mut c, true).await;
        assert!(block_calls(&ds) > 0, "written once the watch delivers again: {:?}", ds.op_counts());
    }

    #[tokio::test]
    async fn a_relist_holds_writes_from_its_init_to_its_init_done_but_a_follower_counts_no_held_round() {
        let (mut c, shared, leader, ds) = a_leader_with_a_gone_nodes_block().await;
        leader.send_replace(false);
        c.handle(input(Source::Pods, Change::Init));
        round(&mut c, true).await;
        assert!(!shared.ready(), "a relist after the first list is named");
        assert_eq!(shared.metrics(|m| m.rounds_writes_held), 0, "a follower writes nothing anyway: no round held");
        leader.send_replace(true);
        round(&mut c, true).await;
        assert_eq!(block_calls(&ds), 0, "nothing written mid-relist");
        assert_eq!(shared.metrics(|m| m.rounds_writes_held), 1);
        c.handle(input(Source::Pods, Change::InitDone));
        assert!(shared.ready());
        round(&mut c, true).await;
        assert!(block_calls(&ds) > 0, "written once the relist is complete");
    }

    #[tokio::test]
    async fn a_malformed_block_is_counted_for_the_orphan_hold_and_forgotten_when_deleted_or_no_longer_listed() {
        let (mut c, _) = controller();
        let malformed = crate::model::InvalidObject::new("IPAMBlock", "10-0-0-0-30", "bad cidr".to_string());
        c.handle(input(Source::Blocks, Change::Invalid(malformed)));
        assert_eq!(c.inputs.invalid_blocks(), 1);
        c.inputs.check_invariants().unwrap();
        c.handle(input(Source::Blocks, Change::Delete(block("10.0.0.0/30", "n1"))));
        assert_eq!(c.inputs.invalid_blocks(), 0);
        // One that never decoded goes when its deletion arrives, or when a relist no longer shows it.
        let undecodable = |name: &str| crate::model::InvalidObject::new("IPAMBlock", name, "invalid type: string".to_string());
        c.handle(input(Source::Blocks, Change::Invalid(undecodable("a"))));
        c.handle(input(Source::Blocks, Change::Invalid(undecodable("b"))));
        c.handle(input(Source::Pods, Change::DeleteMalformed { name: "a".into() }));
        assert_eq!(c.inputs.invalid_blocks(), 2, "a pod of that name is another object");
        c.handle(input(Source::Blocks, Change::DeleteMalformed { name: "a".into() }));
        assert_eq!(c.inputs.invalid_blocks(), 1);
        c.handle(input(Source::Blocks, Change::Init));
        c.handle(input(Source::Blocks, Change::Invalid(undecodable("b"))));
        c.handle(input(Source::Blocks, Change::InitDone));
        assert_eq!(c.inputs.invalid_blocks(), 1, "still listed, still held");
        list(&mut c, Source::Blocks, Vec::new());
        assert_eq!(c.inputs.invalid_blocks(), 0, "gone from the relist");
        // An entry held under another key than its own is caught.
        let stray = crate::model::InvalidObject::new("IPAMBlock", "elsewhere", "x".to_string());
        c.inputs.invalid.insert(("IPAMBlock".into(), "10-0-0-4-30".into()), stray);
        assert!(c.inputs.check_invariants().unwrap_err().contains("10-0-0-4-30"));
    }

    fn cluster_info() -> Object {
        Object::ClusterInformation(Box::new(
            serde_json::from_value(json!({"metadata": {"name": "default", "resourceVersion": "1"}, "spec": {"datastoreReady": true}})).unwrap(),
        ))
    }

    /// Every source listed, one block of the gone node `gone`, and no ClusterInformation.
    fn listed_without_cluster_information(c: &mut GcController) {
        for source in Source::ALL.iter().copied().filter(|s| *s != Source::ClusterInformation) {
            let objects = if source == Source::Blocks { vec![empty_block_of_gone_node()] } else { Vec::new() };
            list(c, source, objects);
        }
        assert!(!c.shared.status.snapshot().readiness.contains_key(crate::health::GC_DECISIONS), "nothing judged before its watch listed");
        list(c, Source::ClusterInformation, Vec::new());
    }

    #[tokio::test]
    async fn a_missing_cluster_information_holds_every_write_and_readiness_names_it_while_passes_still_report() {
        let (mut c, shared, leader, ds) = writer();
        leader.send_replace(true);
        listed_without_cluster_information(&mut c);
        let why = shared.readiness().unwrap_err();
        assert!(why.contains("ClusterInformation default does not exist"), "{why}");
        round(&mut c, true).await;
        assert_eq!(block_calls(&ds), 0, "no IPAM request without ClusterInformation: {:?}", ds.op_counts());
        assert!(shared.report().is_some(), "the pass still runs for the report");
        assert!(shared.metrics(|m| m.datastore_paused));
        assert_eq!(shared.metrics(|m| m.rounds_writes_held), 1);

        c.handle(input(Source::ClusterInformation, Change::Apply(cluster_info())));
        assert!(shared.ready(), "{:?}", shared.readiness());
        round(&mut c, true).await;
        assert!(block_calls(&ds) > 0, "written once ClusterInformation exists: {:?}", ds.op_counts());
        assert!(!shared.metrics(|m| m.datastore_paused));

        c.handle(input(Source::ClusterInformation, Change::Delete(cluster_info())));
        assert!(shared.readiness().unwrap_err().contains("ClusterInformation default does not exist"), "deleted: held again");
    }

    #[tokio::test]
    async fn a_dry_run_without_cluster_information_stays_ready_and_keeps_reporting() {
        let (mut c, shared) = controller();
        listed_without_cluster_information(&mut c);
        assert!(shared.ready(), "{:?}", shared.readiness());
        round(&mut c, true).await;
        assert!(shared.report().is_some());
        assert!(!shared.metrics(|m| m.datastore_paused));
        assert!(shared.ready());
    }
