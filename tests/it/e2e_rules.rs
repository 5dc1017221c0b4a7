//! The GC rules of SPEC §9.2 (upstream's KDD FV) and Part A, end to end in one cluster with one
//! controller (grace 2 s): one block holds an address for each rule, so a single run shows what
//! is freed and, just as important, what survives several more passes. Meanwhile a concurrent
//! writer keeps allocating in the same block with compare-and-swap updates: none of its
//! allocations may be lost to a release that raced it.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use crate::support::cluster::{private_cluster, set_pod_ips, set_pod_status};
use crate::support::controller::{free_port, http_get, start_controller, wait_for};
use crate::support::ipam::{Alloc, Ipam, add_allocation, pod_attrs, tunnel_attrs};

const X: &str = "10.66.0.0/26";
const Y: &str = "10.66.0.64/26";
const Z: &str = "10.66.0.128/26";

async fn pod(pods: &Api<Pod>, name: &str, node: &str, finalizer: bool) {
    let mut p = json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/c:1"}]},
    });
    if finalizer {
        p["metadata"]["finalizers"] = json!(["e2e.test/hold"]);
    }
    pods.create(&PostParams::default(), &serde_json::from_value(p).unwrap()).await.unwrap_or_else(|e| panic!("pod {name}: {e}"));
}

#[tokio::test]
async fn each_gc_rule_frees_or_keeps_its_address_while_a_concurrent_writer_loses_nothing() {
    let cluster = private_cluster();
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    for n in ["n1", "n2"] {
        nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap()).await.unwrap();
    }
    let ns = cluster.namespace_with_default_service_account(&client, "rules").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (name, node) in [("p-podip", "n1"), ("p-podips", "n1"), ("p-pending", "n1"), ("p-other", "n1"), ("p-moved", "n2"), ("p-dual", "n1")] {
        pod(&pods, name, node, false).await;
    }
    pod(&pods, "p-term", "n1", true).await;
    set_pod_status(&pods, "p-podip", json!({"status": {"phase": "Running", "podIP": "10.66.0.6"}})).await;
    // Dual stack: the IPv4 address appears only in status.podIPs, after the IPv6 one.
    set_pod_ips(&pods, "p-podips", &["fd00:66::7", "10.66.0.7"]).await;
    set_pod_ips(&pods, "p-other", &["10.66.0.50"]).await;
    set_pod_ips(&pods, "p-moved", &["10.66.1.5"]).await;
    set_pod_ips(&pods, "p-dual", &["10.66.0.12"]).await;
    set_pod_ips(&pods, "p-term", &["10.66.0.10"]).await;
    pods.delete("p-term", &DeleteParams::default()).await.expect("p-term terminating");

    let ipam = Ipam::new(&client);
    let h = |pod: &str| format!("k8s-pod-network.{ns}.{pod}");
    let (nopod, podip, podips, pending, other, term, moved, dual) =
        (h("nopod"), h("p-podip"), h("p-podips"), h("p-pending"), h("p-other"), h("p-term"), h("p-moved"), h("p-dual"));
    fn a<'h>(ns: &str, ordinal: u32, handle: &'h str, pod: &str) -> Alloc<'h> {
        Alloc { ordinal, handle, secondary: pod_attrs(ns, pod, "n1") }
    }
    let x_allocs = vec![
        Alloc { ordinal: 1, handle: "ipip-tunnel-addr-n1", secondary: tunnel_attrs("n1", "ipipTunnelAddress") },
        Alloc { ordinal: 2, handle: "vxlan-tunnel-addr-n1", secondary: tunnel_attrs("n1", "vxlanTunnelAddress") },
        Alloc { ordinal: 3, handle: "wireguard-tunnel-addr-n1", secondary: tunnel_attrs("n1", "wireguardTunnelAddress") },
        Alloc { ordinal: 4, handle: "node-only-n1", secondary: json!({"node": "n1"}) },
        a(&ns, 5, &nopod, "nopod"),
        a(&ns, 6, &podip, "p-podip"),
        a(&ns, 7, &podips, "p-podips"),
        a(&ns, 8, &pending, "p-pending"),
        a(&ns, 9, &other, "p-other"),
        a(&ns, 10, &term, "p-term"),
        a(&ns, 11, &moved, "p-moved"),
        a(&ns, 12, &dual, "p-dual"),
        a(&ns, 13, &dual, "p-dual"),
    ];
    let block_x = ipam.block(X, Some("n1"), &x_allocs).await;
    let block_y = ipam.block(Y, Some("n1"), &[]).await;
    let z_gone = h("z-gone");
    let block_z = ipam.block(Z, Some("n2"), &[Alloc { ordinal: 1, handle: &z_gone, secondary: pod_attrs(&ns, "z-gone", "n2") }]).await;
    // Metadata our write does not manage must survive it. (The IPAMBlock CRD prunes unknown
    // spec fields, so those are covered by the model's round-trip tests instead.)
    let mut z = ipam.blocks.get(&block_z).await.unwrap();
    z.metadata.labels = Some([("team".to_string(), "net".to_string())].into());
    z.metadata.annotations = Some([("note".to_string(), "keep me".to_string())].into());
    ipam.blocks.replace(&block_z, &PostParams::default(), &z).await.expect("labelling block Z");

    let port = free_port();
    let started = Instant::now();
    let _controller = start_controller(&cluster, &[], port, "rules");

    // The concurrent writer: 3 s of allocations in block X, one every ~100 ms, each a CAS update.
    let writer_blocks = ipam.blocks.clone();
    let writer_block = block_x.clone();
    let writer = tokio::spawn(async move {
        let mut written = Vec::new();
        let mut conflicts = 0u32;
        for ordinal in 20u32..50 {
            let handle = format!("writer-{ordinal}");
            let tunnel = Alloc { ordinal, handle: &handle, secondary: tunnel_attrs("n1", "ipipTunnelAddress") };
            conflicts += add_allocation(&writer_blocks, &writer_block, &tunnel).await;
            written.push(ordinal);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (written, conflicts)
    });

    wait_for("the leaks of blocks X and Z freed and empty block Y released", || async {
        let x = ipam.block_spec(&block_x).await?;
        let zs = ipam.block_spec(&block_z).await?;
        let freed = [5, 9, 11].iter().all(|o| x["allocations"][*o].is_null()) && zs["allocations"][1].is_null();
        (freed && ipam.block_spec(&block_y).await.is_none()).then_some(())
    })
    .await;
    eprintln!("rules: everything to free was freed {:.1} s after start", started.elapsed().as_secs_f64());
    let (written, conflicts) = writer.await.expect("writer task");
    eprintln!("concurrent writer: {} allocations, {conflicts} conflicts", written.len());
    // More passes: what must survive keeps surviving.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let x = ipam.block_spec(&block_x).await.expect("block X stays");
    for (ordinal, why) in [
        (1, "IPIP tunnel of a live node"),
        (2, "VXLAN tunnel of a live node"),
        (3, "WireGuard tunnel of a live node"),
        (4, "allocation with only a node attribute"),
        (6, "IP reported in status.podIP"),
        (7, "IP reported in status.podIPs"),
        (8, "pod that has not reported its IP yet"),
        (10, "Terminating pod still reporting its IP"),
        (12, "dual handle: the IP its pod reports"),
        (13, "dual handle: all-or-none keeps the other IP of a valid handle"),
    ] {
        assert!(!x["allocations"][ordinal].is_null(), "ordinal {ordinal} ({why}) was released: {x}");
    }
    for ordinal in &written {
        assert!(!x["allocations"][*ordinal as usize].is_null(), "the concurrent writer's ordinal {ordinal} was lost: {x}");
    }
    for (ordinal, why) in [(5, "pod gone"), (9, "pod reports another IP"), (11, "pod recreated on another node")] {
        assert!(x["allocations"][ordinal].is_null(), "ordinal {ordinal} ({why}) not released");
    }
    for (handle, kept) in [(&nopod, false), (&other, false), (&moved, false), (&podip, true), (&dual, true), (&term, true), (&z_gone, false)] {
        assert_eq!(ipam.handle_exists(handle).await, kept, "handle {handle:?}");
    }
    let zs = ipam.blocks.get(&block_z).await.expect("block Z (affine, node alive) stays");
    assert_eq!(zs.metadata.annotations.unwrap_or_default().get("note").map(String::as_str), Some("keep me"));
    assert_eq!(zs.metadata.labels.unwrap_or_default().get("team").map(String::as_str), Some("net"), "labels lost by our write");
    assert!(ipam.affinity_exists("n1", X).await, "n1 keeps its block X affinity");
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    assert!(metrics.contains("ipam_gc_releases_total"), "{metrics}");
}
