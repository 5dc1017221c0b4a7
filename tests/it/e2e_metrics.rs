//! End-to-end metrics (in the spirit of upstream's metrics FV, SPEC §9.5): pools, nodes, blocks
//! and a reservation on a private cluster, the running controller's `/metrics` scraped and
//! compared sample by sample; then a pool deleted (its series go, its blocks count under
//! `no_ippool`) and a node deleted (its IPAM cleaned, its per-node series gone). Also the start-up
//! refusal of clusters and settings on Calico's v3 API.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::{TestCluster, private_cluster, set_pod_ips};
use crate::support::controller::{DEADLINE, calico, free_port, http_get, start_controller};

/// The samples of IPAM metrics (name starting with `ipam_` and a label set) in a scrape.
fn ipam_samples(body: &str) -> Vec<&str> {
    body.lines().filter(|l| l.starts_with("ipam_") && l.contains('{') && !l.starts_with("ipam_gc_")).collect()
}

/// Scrapes until `done` holds for the samples, or fails with the last scrape after DEADLINE.
async fn scrape_until(port: u16, what: &str, done: impl Fn(&[&str]) -> bool) -> String {
    let started = Instant::now();
    loop {
        if let Some((200, body)) = http_get(port, "/metrics").await
            && done(&ipam_samples(&body))
        {
            return body;
        }
        if started.elapsed() > DEADLINE {
            let body = http_get(port, "/metrics").await.map(|r| r.1).unwrap_or_default();
            panic!("{what}: not seen within {DEADLINE:?}; last IPAM samples:\n{}", ipam_samples(&body).join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn has_all(samples: &[&str], expected: &[&str]) -> bool {
    expected.iter().all(|e| samples.contains(e))
}

/// Block `cidr` (a /26) affine to `host` with `(ordinal, attributes)` allocations.
async fn create_block(blocks: &Api<DynamicObject>, cidr: &str, host: &str, allocs: &[(usize, Value)]) {
    let mut allocations = vec![Value::Null; 64];
    let mut attributes = Vec::new();
    let mut seq = serde_json::Map::new();
    for (i, (ord, attr)) in allocs.iter().enumerate() {
        allocations[*ord] = json!(i);
        attributes.push(attr.clone());
        seq.insert(ord.to_string(), json!(i + 1));
    }
    let unallocated: Vec<usize> = (0..64).filter(|o| !allocs.iter().any(|(a, _)| a == o)).collect();
    let name = cidr.replace(['.', '/'], "-");
    let block = DynamicObject::new(&name, &calico("IPAMBlock", "ipamblocks")).data(json!({"spec": {
        "cidr": cidr, "affinity": format!("host:{host}"), "strictAffinity": false, "deleted": false,
        "allocations": allocations, "unallocated": unallocated, "attributes": attributes,
        "sequenceNumber": 10, "sequenceNumberForAllocation": seq,
    }}));
    blocks.create(&PostParams::default(), &block).await.expect("block");
    let affinities: Api<DynamicObject> = Api::all_with(blocks.clone().into_client(), &calico("BlockAffinity", "blockaffinities"));
    let cidr_net: ipnet::IpNet = cidr.parse().unwrap();
    let a = DynamicObject::new(&calico_kube_controllers::model::names::affinity_name(host, &cidr_net), &calico("BlockAffinity", "blockaffinities"))
        .data(json!({"spec": {"cidr": cidr, "node": host, "state": "confirmed", "type": "host", "deleted": "false"}}));
    affinities.create(&PostParams::default(), &a).await.expect("affinity");
}

fn pod_attr(ns: &str, pod: &str, node: &str) -> Value {
    json!({"handle_id": format!("k8s-pod-network.{pod}"), "secondary": {"namespace": ns, "pod": pod, "node": node}})
}

async fn live_pod(pods: &Api<Pod>, name: &str, node: &str, ip: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/c:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.expect("pod");
    set_pod_ips(pods, name, &[ip]).await;
}

async fn cluster_objects(cluster: &TestCluster) -> Api<DynamicObject> {
    let client = cluster.client();
    let ns = cluster.namespace_with_default_service_account(&client, "e2e-metrics").await;
    let nodes: Api<Node> = Api::all(client.clone());
    for n in ["n1", "n2", "n3"] {
        nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap()).await.expect("node");
    }
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPPool", "ippools"));
    for (name, cidr) in [("pool-a", "10.70.0.0/24"), ("pool-b", "10.71.0.0/24")] {
        let p = DynamicObject::new(name, &calico("IPPool", "ippools")).data(json!({"spec": {"cidr": cidr, "blockSize": 26}}));
        pools.create(&PostParams::default(), &p).await.expect("pool");
    }
    let reservations: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPReservation", "ipreservations"));
    let r = DynamicObject::new("reserved", &calico("IPReservation", "ipreservations"))
        .data(json!({"spec": {"reservedCIDRs": ["10.70.0.248/29", "10.70.0.250/32", "192.168.0.0/16"]}}));
    reservations.create(&PostParams::default(), &r).await.expect("reservation");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    live_pod(&pods, "a1", "n1", "10.70.0.1").await;
    live_pod(&pods, "a2", "n2", "10.70.0.2").await;
    live_pod(&pods, "b1", "n2", "10.71.0.1").await;
    let blocks: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let tunnel = json!({"handle_id": "ipip-tunnel-addr-n1", "secondary": {"node": "n1", "type": "ipipTunnelAddress"}});
    // n1's block: n1's pod, a pod of n2 borrowing from it, n1's tunnel address.
    create_block(&blocks, "10.70.0.0/26", "n1", &[(1, pod_attr(&ns, "a1", "n1")), (2, pod_attr(&ns, "a2", "n2")), (3, tunnel)]).await;
    // n3's block holds only a gone pod's address: reclaimed after the 2 s grace.
    create_block(&blocks, "10.70.0.64/26", "n3", &[(5, pod_attr(&ns, "gone", "n3"))]).await;
    create_block(&blocks, "10.71.0.0/26", "n2", &[(1, pod_attr(&ns, "b1", "n2"))]).await;
    pools
}

#[tokio::test]
async fn ipam_metrics_follow_pools_nodes_and_blocks_and_leave_no_stale_series() {
    let cluster = private_cluster();
    let pools = cluster_objects(&cluster).await;
    let port = free_port();
    let _controller = start_controller(&cluster, &[], port, "metrics");

    scrape_until(port, "n3's gone pod reclaimed", |s| s.contains(&r#"ipam_allocations_gc_reclamations{ippool="pool-a",node="n3"} 1"#)).await;
    let steady = [
        r#"ipam_allocations_gc_reclamations{ippool="pool-a",node="n3"} 1"#,
        r#"ipam_allocations_in_use{ippool="pool-a",node="n1"} 2"#,
        r#"ipam_allocations_in_use{ippool="pool-a",node="n2"} 1"#,
        r#"ipam_allocations_in_use{ippool="pool-a",node="n3"} 0"#,
        r#"ipam_allocations_in_use{ippool="pool-b",node="n1"} 0"#,
        r#"ipam_allocations_in_use{ippool="pool-b",node="n2"} 1"#,
        r#"ipam_allocations_in_use{ippool="pool-b",node="n3"} 0"#,
        r#"ipam_allocations_borrowed{ippool="pool-a",node="n1"} 0"#,
        r#"ipam_allocations_borrowed{ippool="pool-a",node="n2"} 1"#,
        r#"ipam_allocations_borrowed{ippool="pool-a",node="n3"} 0"#,
        r#"ipam_allocations_borrowed{ippool="pool-b",node="n1"} 0"#,
        r#"ipam_allocations_borrowed{ippool="pool-b",node="n2"} 0"#,
        r#"ipam_allocations_borrowed{ippool="pool-b",node="n3"} 0"#,
        r#"ipam_blocks{ippool="pool-a",node="n1"} 1"#,
        r#"ipam_blocks{ippool="pool-a",node="n3"} 1"#,
        r#"ipam_blocks{ippool="pool-b",node="n2"} 1"#,
        r#"ipam_allocations_gc_candidates{ippool="pool-a",node="n1"} 0"#,
        r#"ipam_allocations_gc_candidates{ippool="pool-a",node="n2"} 0"#,
        r#"ipam_allocations_gc_candidates{ippool="pool-a",node="n3"} 0"#,
        r#"ipam_allocations_gc_candidates{ippool="pool-b",node="n1"} 0"#,
        r#"ipam_allocations_gc_candidates{ippool="pool-b",node="n2"} 0"#,
        r#"ipam_allocations_gc_candidates{ippool="pool-b",node="n3"} 0"#,
        r#"ipam_ippool_size{ippool="pool-a"} 256"#,
        r#"ipam_ippool_size{ippool="pool-b"} 256"#,
        // 10.70.0.248/29 (the /32 inside it counts once); 192.168/16 is outside both pools.
        r#"ipam_ippool_reserved{ippool="pool-a"} 8"#,
        r#"ipam_ippool_reserved{ippool="pool-b"} 0"#,
        r#"ipam_allocations_per_node{node="n1"} 2"#,
        r#"ipam_allocations_per_node{node="n2"} 2"#,
        r#"ipam_allocations_borrowed_per_node{node="n2"} 1"#,
        r#"ipam_blocks_per_node{node="n1"} 1"#,
        r#"ipam_blocks_per_node{node="n2"} 1"#,
        r#"ipam_blocks_per_node{node="n3"} 1"#,
    ];
    // Once the release came back through the watch, the samples are exactly these.
    let body = scrape_until(port, "the steady state", |s| s.len() == steady.len() && has_all(s, &steady)).await;
    assert!(!body.contains(r#"ippool="no_ippool""#), "no zero series for no_ippool:\n{body}");

    // A deleted pool: its series go, reclamations included; its block counts under no_ippool.
    pools.delete("pool-b", &DeleteParams::default()).await.expect("deleting pool-b");
    let body = scrape_until(port, "pool-b's series gone", |s| {
        s.iter().all(|l| !l.contains(r#"ippool="pool-b""#))
            && has_all(s, &[r#"ipam_blocks{ippool="no_ippool",node="n2"} 1"#, r#"ipam_allocations_in_use{ippool="no_ippool",node="n2"} 1"#])
    })
    .await;
    let no_pool: Vec<&str> = ipam_samples(&body).into_iter().filter(|l| l.contains("no_ippool")).collect();
    assert_eq!(no_pool, [r#"ipam_allocations_in_use{ippool="no_ippool",node="n2"} 1"#, r#"ipam_blocks{ippool="no_ippool",node="n2"} 1"#]);

    // A deleted node: the GC releases its (now empty) block and affinity, and every series
    // naming it goes, its reclamations included.
    let nodes: Api<Node> = Api::all(cluster.client());
    nodes.delete("n3", &DeleteParams::default()).await.expect("deleting n3");
    let body = scrape_until(port, "n3's series gone", |s| s.iter().all(|l| !l.contains(r#"node="n3""#))).await;
    let blocks: Api<DynamicObject> = Api::all_with(cluster.client(), &calico("IPAMBlock", "ipamblocks"));
    assert!(blocks.get_opt("10-70-0-64-26").await.unwrap().is_none(), "n3's empty block is released");
    assert!(ipam_samples(&body).contains(&r#"ipam_allocations_in_use{ippool="pool-a",node="n1"} 2"#));
}

/// Runs the controller binary with `env` until it exits (bounded), returning (code, stderr).
async fn run_to_exit(cluster: &TestCluster, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("controller-apigroup-{}.log", crate::support::cluster::unique_number()));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"));
    cmd.args(["run", "--metrics-port", "0"]).env("KUBECONFIG", &cluster.kubeconfig).env_remove("CALICO_API_GROUP").stdout(Stdio::null()).stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = crate::support::controller::ChildGuard { child: cmd.spawn().expect("starting the controller"), log: log.clone() };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.child.try_wait().expect("waiting") {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    (status.and_then(|s| s.code()), std::fs::read_to_string(&log).unwrap_or_default())
}

#[tokio::test]
async fn a_cluster_or_setting_on_calicos_v3_api_is_refused_with_exit_code_2() {
    let cluster = private_cluster();
    let (code, log) = run_to_exit(&cluster, &[("CALICO_API_GROUP", "projectcalico.org/v3")]).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("supports crd.projectcalico.org/v1 only"), "{log}");

    // The cluster serves IPAM blocks only under projectcalico.org/v3.
    let client = cluster.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("ipamblocks.crd.projectcalico.org", &DeleteParams::default()).await.expect("deleting the v1 CRD");
    let v3: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "ipamblocks.projectcalico.org"},
        "spec": {"group": "projectcalico.org", "scope": "Cluster",
                 "names": {"kind": "IPAMBlock", "listKind": "IPAMBlockList", "plural": "ipamblocks", "singular": "ipamblock"},
                 "versions": [{"name": "v3", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))
    .unwrap();
    crds.create(&PostParams::default(), &v3).await.expect("creating the v3 CRD");
    // Discovery catches up with CRD changes asynchronously.
    let started = Instant::now();
    loop {
        let v1 = client.list_api_group_resources("crd.projectcalico.org/v1").await.map(|l| l.resources.iter().any(|r| r.name == "ipamblocks"));
        let v3 = client.list_api_group_resources("projectcalico.org/v3").await.map(|l| l.resources.iter().any(|r| r.name == "ipamblocks"));
        if matches!((v1, v3), (Ok(false), Ok(true))) {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "discovery never showed ipamblocks under v3 only");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, log) = run_to_exit(&cluster, &[]).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("serves Calico's IPAM kinds under projectcalico.org/v3"), "{log}");
}
