//! A scale run on the real API server: N nodes x 30 pods (each pod with its IP reported, its
//! handle, one affine /26 block per node), the controller brought up on it, then a fifth of the
//! nodes deleted together with their pods. Measures the time until every deleted node's IPAM is
//! gone and the controller's peak RSS, and checks nothing of the surviving nodes was touched.
//! Its cold start (process start to the first finished GC pass) is printed beside the floor it
//! is held against: the paged LISTs of every kind its first pass needs, issued by a bare client
//! in the same run (500 objects a page, as the controller pages, all kinds at once).
//!
//! CI runs it at `CKC_SCALE_NODES` (default 40) nodes; the figures in the README and the issue
//! notes come from `CKC_SCALE_NODES=1000 cargo test --release --test it e2e_scale -- --nocapture`.

use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DeleteParams, ListParams, PostParams};
use serde_json::json;

use crate::support::cluster::{private_cluster, set_pod_ips};
use crate::support::controller::{calico, free_port, http_get, metric_sum, start_controller, vm_hwm_kib};
use crate::support::ipam::{Alloc, affinity_object, block_object, handle_object, pod_attrs};

const PODS_PER_NODE: u32 = 30;
/// Requests in flight while building the cluster: enough to keep kube-apiserver busy on 2 cores.
const CONCURRENCY: usize = 48;
/// The whole cleanup must finish well inside this, at any scale CI runs.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(240);

fn block_cidr(node: u32) -> (String, [u8; 4]) {
    let base = (10u32 << 24) | (128 << 16) | (node * 64);
    let o = base.to_be_bytes();
    (format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3]), o)
}

fn pod_ip(node: u32, pod: u32) -> String {
    let (_, o) = block_cidr(node);
    format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3] + 1 + pod as u8)
}

/// Every object of `api`, 500 a page as the controller pages: how many there were.
async fn paged_count(api: &Api<kube::api::DynamicObject>) -> usize {
    let mut params = ListParams::default().limit(500);
    let mut n = 0;
    loop {
        let page = api.list(&params).await.expect("a paged LIST");
        n += page.items.len();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => return n,
        }
    }
}

fn handle_id(node: u32, pod: u32) -> String {
    format!("k8s-pod-network.{:064x}", (u64::from(node) << 32) | u64::from(pod))
}

#[tokio::test]
async fn deleting_a_fifth_of_the_nodes_cleans_their_ipam_and_touches_nothing_else() {
    let nodes_n: u32 = std::env::var("CKC_SCALE_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let deleted_n = nodes_n / 5;
    let cluster = private_cluster();
    let client = cluster.client();
    let ns = cluster.namespace_with_default_service_account(&client, "scale").await;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let blocks: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let handles: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &calico("IPAMHandle", "ipamhandles"));
    let affinities: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &calico("BlockAffinity", "blockaffinities"));

    let build = Instant::now();
    stream::iter(0..nodes_n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (nodes, blocks, affinities) = (nodes.clone(), blocks.clone(), affinities.clone());
            let ns = ns.clone();
            async move {
                let name = format!("scale-n{i}");
                nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()).await.expect("node");
                let (cidr, _) = block_cidr(i);
                let handles: Vec<String> = (0..PODS_PER_NODE).map(|j| handle_id(i, j)).collect();
                let allocs: Vec<Alloc> = (0..PODS_PER_NODE)
                    .map(|j| Alloc { ordinal: 1 + j, handle: &handles[j as usize], secondary: pod_attrs(&ns, &format!("p-{i}-{j}"), &name) })
                    .collect();
                blocks.create(&PostParams::default(), &block_object(&cidr, Some(&name), &allocs)).await.expect("block");
                affinities.create(&PostParams::default(), &affinity_object(&name, &cidr)).await.expect("affinity");
            }
        })
        .await;
    let work: Vec<(u32, u32)> = (0..nodes_n).flat_map(|i| (0..PODS_PER_NODE).map(move |j| (i, j))).collect();
    stream::iter(work.clone())
        .for_each_concurrent(CONCURRENCY, |(i, j)| {
            let (pods, handles) = (pods.clone(), handles.clone());
            async move {
                let name = format!("p-{i}-{j}");
                let pod = json!({"metadata": {"name": name}, "spec": {"nodeName": format!("scale-n{i}"), "containers": [{"name": "c", "image": "registry.invalid/c:1"}]}});
                pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.expect("pod");
                set_pod_ips(&pods, &name, &[&pod_ip(i, j)]).await;
                let (cidr, _) = block_cidr(i);
                handles.create(&PostParams::default(), &handle_object(&handle_id(i, j), &cidr, 1)).await.expect("handle");
            }
        })
        .await;
    eprintln!(
        "scale: built {nodes_n} nodes, {} pods with IPs, handles and blocks in {:.1} s",
        nodes_n * PODS_PER_NODE,
        build.elapsed().as_secs_f64()
    );

    // The floor of a cold start: the raw paged LISTs of what the first pass needs, all at once.
    let kinds: Vec<ApiResource> = vec![
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<Node>(&()),
        calico("IPAMBlock", "ipamblocks"),
        calico("BlockAffinity", "blockaffinities"),
        calico("IPAMHandle", "ipamhandles"),
        calico("IPPool", "ippools"),
    ];
    let listed = Instant::now();
    let counts = futures::future::join_all(kinds.iter().map(|k| {
        let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), k);
        async move { paged_count(&api).await }
    }))
    .await;
    let list_floor = listed.elapsed();
    eprintln!("scale: raw paged LISTs of pods, nodes, blocks, affinities, handles, pools {counts:?} in {:.2} s", list_floor.as_secs_f64());

    let port = free_port();
    let started = Instant::now();
    let controller = start_controller(&cluster, &["--leak-grace-period", "1h"], port, "scale");
    let pid = controller.child.id();
    loop {
        if let Some((200, body)) = http_get(port, "/metrics").await
            && metric_sum(&body, "ipam_gc_pass_duration_seconds_count") >= 1.0
        {
            break;
        }
        assert!(started.elapsed() < CLEANUP_DEADLINE, "the controller never finished a pass");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cold = started.elapsed();
    eprintln!(
        "scale: controller synced and passed in {:.2} s, {:.2}x the raw LISTs' {:.2} s (target 1.2x at 1,000 nodes)",
        cold.as_secs_f64(),
        cold.as_secs_f64() / list_floor.as_secs_f64(),
        list_floor.as_secs_f64()
    );

    let t = Instant::now();
    stream::iter(0..deleted_n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (nodes, pods) = (nodes.clone(), pods.clone());
            async move {
                nodes.delete(&format!("scale-n{i}"), &DeleteParams::default()).await.expect("deleting a node");
                for j in 0..PODS_PER_NODE {
                    pods.delete(&format!("p-{i}-{j}"), &DeleteParams::default().grace_period(0)).await.expect("deleting a pod");
                }
            }
        })
        .await;
    let deleted_at = t.elapsed();
    let expected_blocks = (nodes_n - deleted_n) as usize;
    let expected_handles = ((nodes_n - deleted_n) * PODS_PER_NODE) as usize;
    loop {
        let b = blocks.list_metadata(&ListParams::default()).await.expect("blocks").items.len();
        let h = handles.list_metadata(&ListParams::default()).await.expect("handles").items.len();
        let a = affinities.list_metadata(&ListParams::default()).await.expect("affinities").items.len();
        if b == expected_blocks && h == expected_handles && a == expected_blocks {
            break;
        }
        assert!(
            t.elapsed() < CLEANUP_DEADLINE,
            "not cleaned in {CLEANUP_DEADLINE:?}: {b} blocks, {h} handles, {a} affinities left (want {expected_blocks}, {expected_handles})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cleaned = t.elapsed();
    let hwm = vm_hwm_kib(pid).unwrap_or(0);
    let (_, metrics) = http_get(port, "/metrics").await.expect("scraping /metrics");
    let heap_peak = metric_sum(&metrics, "kube_controllers_heap_peak_bytes");
    let heap_now = metric_sum(&metrics, "kube_controllers_heap_bytes");
    assert!(heap_peak > 0.0 && heap_now > 0.0 && metric_sum(&metrics, "process_resident_memory_bytes") > 0.0, "memory metrics: {metrics}");
    eprintln!("scale: controller heap now {:.1} MiB, heap peak {:.1} MiB", heap_now / 1048576.0, heap_peak / 1048576.0);
    eprintln!(
        "scale: {deleted_n} of {nodes_n} nodes ({} pods) deleted in {:.1} s; their IPAM fully cleaned {:.1} s after the deletions began; controller peak RSS {:.1} MiB",
        deleted_n * PODS_PER_NODE,
        deleted_at.as_secs_f64(),
        cleaned.as_secs_f64(),
        hwm as f64 / 1024.0
    );
    // Survivors: every remaining block still holds all of its pods' addresses.
    for i in deleted_n..nodes_n {
        let (cidr, _) = block_cidr(i);
        let name = calico_kube_controllers::model::names::cidr_to_name(&cidr.parse().unwrap());
        let b = blocks.get(&name).await.expect("a surviving node's block");
        let held = b.data["spec"]["allocations"].as_array().unwrap().iter().filter(|v| !v.is_null()).count();
        assert_eq!(held, PODS_PER_NODE as usize, "surviving node scale-n{i} lost addresses");
    }
}
