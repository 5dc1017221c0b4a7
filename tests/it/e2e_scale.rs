//! A scale run on the real API server: N nodes x 30 pods (each pod with its IP reported, its
//! handle, one affine /26 block per node), the controller brought up on it, then a fifth of the
//! nodes deleted together with their pods. Measures the time until every deleted node's IPAM is
//! gone and the controller's peak RSS, and checks nothing of the surviving nodes was touched.
//! Its cold start (process start to the first finished GC pass) is printed beside the floor it
//! is held against: the paged LISTs of every kind its first pass needs, issued by a bare client
//! in the same run (500 objects a page, all kinds at once; the controller pages as many, but
//! blocks 50 a page).
//!
//! CI runs it at `CKC_SCALE_NODES` (default 40) nodes; the figures in the README and the issue
//! notes come from `CKC_SCALE_NODES=1000 cargo test --release --test it e2e_scale -- --nocapture`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DeleteParams, ListParams, PostParams};
use serde_json::json;

use crate::support::cluster::{private_cluster, set_pod_ips};
use crate::support::controller::{calico, free_port, http_get, metric_sum, start_controller_with, vm_hwm_kib};
use crate::support::ipam::{Alloc, affinity_object, block_object, handle_object, pod_attrs};

const PODS_PER_NODE: u32 = 30;
/// Requests in flight while building the cluster: enough to keep kube-apiserver busy on 2 cores.
const CONCURRENCY: usize = 48;
/// The whole cleanup must finish well inside this for every 1,000 nodes (at any scale CI runs,
/// the first 1,000's).
const CLEANUP_DEADLINE: Duration = Duration::from_secs(240);

fn deadline(nodes: u32) -> Duration {
    CLEANUP_DEADLINE * nodes.div_ceil(1000).max(1)
}

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
    // The mass-change guard is off (its setting), so the cleanup runs at the API's pace: these
    // figures measure writing, not the guard's hold.
    let controller = start_controller_with(&cluster.kubeconfig, &["--leak-grace-period", "1h"], &[("CKC_MASS_CHANGE_GUARD", "disabled")], port, "scale");
    let pid = controller.child.id();
    loop {
        if let Some((200, body)) = http_get(port, "/metrics").await
            && metric_sum(&body, "ipam_gc_pass_duration_seconds_count") >= 1.0
        {
            break;
        }
        assert!(started.elapsed() < deadline(nodes_n), "the controller never finished a pass");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cold = started.elapsed();
    eprintln!(
        "scale: controller synced and passed in {:.2} s, {:.2}x the raw LISTs' {:.2} s (target 1.2x at 1,000 nodes)",
        cold.as_secs_f64(),
        cold.as_secs_f64() / list_floor.as_secs_f64(),
        list_floor.as_secs_f64()
    );

    let (_, before) = http_get(port, "/metrics").await.expect("scraping /metrics");
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
            t.elapsed() < deadline(nodes_n),
            "not cleaned in {:?}: {b} blocks, {h} handles, {a} affinities left (want {expected_blocks}, {expected_handles})",
            deadline(nodes_n)
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
    let sent = Sent::between(&before, &metrics);
    drop(controller);
    eprintln!(
        "scale: {deleted_n} of {nodes_n} nodes ({} pods) deleted in {:.1} s; their IPAM fully cleaned {:.1} s after the deletions began; controller peak RSS {:.1} MiB",
        deleted_n * PODS_PER_NODE,
        deleted_at.as_secs_f64(),
        cleaned.as_secs_f64(),
        hwm as f64 / 1024.0
    );
    // The floor: the same writes, node reads and Event writes from a bare client at the
    // controller's QPS and burst, with the controller stopped (it would act on the objects).
    eprintln!("scale: the controller sent during the cleanup {:?}; {} node reads, {} Event writes", sent.by_call, sent.node_reads, sent.events);
    let writes: u64 = sent.writes().map(|(_, n)| n).sum();
    assert!(writes > 0, "the cleanup wrote nothing: {:?}", sent.by_call);
    let reads_before_writes: u64 = sent.by_call.iter().filter(|((v, r), _)| v == "get" && IPAM_KINDS.iter().any(|(_, plural)| plural == r)).map(|(_, n)| n).sum();
    let floor = write_floor(&client, &sent).await;
    eprintln!(
        "scale: cleanup {:.1} s ({:.1} s after the deletions ended) against a floor of {:.1} s for its {writes} writes, {} node reads and {} Events: {:.2}x (target 1.5x; mass-change guard off); {reads_before_writes} IPAM reads besides",
        cleaned.as_secs_f64(),
        (cleaned - deleted_at).as_secs_f64(),
        floor.as_secs_f64(),
        sent.node_reads,
        sent.events,
        cleaned.as_secs_f64() / floor.as_secs_f64()
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

/// What the controller sent the API server between two scrapes of its metrics.
struct Sent {
    /// Requests by (verb, resource), any answer.
    by_call: BTreeMap<(String, String), u64>,
    node_reads: u64,
    /// Events created or updated.
    events: u64,
}

impl Sent {
    fn between(before: &str, after: &str) -> Sent {
        let calls = |body: &str| {
            let mut m = BTreeMap::<(String, String), u64>::new();
            for line in body.lines().filter(|l| l.starts_with("kube_controllers_api_requests_total{")) {
                let label = |name: &str| line.split(&format!("{name}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
                let n: u64 = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
                *m.entry((label("verb"), label("resource"))).or_default() += n;
            }
            m
        };
        let (b, a) = (calls(before), calls(after));
        let by_call: BTreeMap<_, _> =
            a.into_iter().map(|(k, n)| (k.clone(), n - b.get(&k).copied().unwrap_or(0))).filter(|(_, n)| *n > 0).collect();
        let events = |body: &str| metric_sum(body, "kube_controllers_events_total{result=\"created\"}") + metric_sum(body, "kube_controllers_events_total{result=\"updated\"}");
        let node_reads = by_call.get(&("get".to_string(), "nodes".to_string())).copied().unwrap_or(0);
        Sent { by_call, node_reads, events: (events(after) - events(before)) as u64 }
    }

    /// The writes to Calico's IPAM kinds, by (verb, resource).
    fn writes(&self) -> impl Iterator<Item = (&(String, String), u64)> {
        self.by_call
            .iter()
            .filter(|((v, r), _)| v != "get" && v != "list" && v != "watch" && IPAM_KINDS.iter().any(|(_, plural)| plural == r))
            .map(|(k, n)| (k, *n))
    }
}

const IPAM_KINDS: [(&str, &str); 3] = [("IPAMHandle", "ipamhandles"), ("IPAMBlock", "ipamblocks"), ("BlockAffinity", "blockaffinities")];
/// The controller's client-side limit (its defaults: `K8S_CLIENT_QPS`, `K8S_CLIENT_BURST`).
const QPS: f64 = 500.0;
const BURST: usize = 1000;
/// Requests the floor client keeps in flight: what the controller's executor may (8 blocks,
/// 4 handles each).
const FLOOR_IN_FLIGHT: usize = 32;

enum FloorCall {
    Write(Api<kube::api::DynamicObject>, String, usize),
    Delete(Api<kube::api::DynamicObject>, String),
    NodeRead(String),
    Event(usize),
}

/// How long a bare client takes for `sent`'s writes, node reads and Event writes at the
/// controller's QPS and burst: each write (update or patch) a merge patch that changes the
/// object, each delete a delete, on objects of the same kinds made for it beforehand (untimed).
async fn write_floor(client: &kube::Client, sent: &Sent) -> Duration {
    let mut calls = Vec::new();
    let mut deletes = Vec::new();
    for (kind, plural) in IPAM_KINDS {
        let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &calico(kind, plural));
        let n_of = |verb: &str| sent.writes().filter(|((v, r), _)| v == verb && r == plural).map(|(_, n)| n as usize).sum::<usize>();
        let (changes, removals) = (n_of("update") + n_of("patch") + n_of("create"), n_of("delete"));
        let objects = removals.max(usize::from(changes > 0));
        let names: Vec<String> = (0..objects)
            .map(|i| match plural {
                "ipamblocks" => calico_kube_controllers::model::names::cidr_to_name(&floor_cidr(i).parse().unwrap()),
                "blockaffinities" => calico_kube_controllers::model::names::affinity_name(&format!("floor-n{i}"), &floor_cidr(i).parse().unwrap()),
                _ => format!("floor-h-{i}"),
            })
            .collect();
        stream::iter(0..objects)
            .for_each_concurrent(CONCURRENCY, |i| {
                let api = api.clone();
                async move {
                    let cidr = floor_cidr(i);
                    let object = match plural {
                        "ipamblocks" => block_object(&cidr, Some("floor-node"), &[]),
                        "blockaffinities" => affinity_object(&format!("floor-n{i}"), &cidr),
                        _ => handle_object(&format!("floor-h-{i}"), &cidr, 1),
                    };
                    api.create(&PostParams::default(), &object).await.expect("a floor object");
                }
            })
            .await;
        calls.extend((0..changes).map(|i| FloorCall::Write(api.clone(), names[i % names.len()].clone(), i)));
        deletes.extend(names.into_iter().take(removals).map(|name| FloorCall::Delete(api.clone(), name)));
    }
    calls.extend((0..sent.node_reads).map(|i| FloorCall::NodeRead(format!("scale-n{i}"))));
    calls.extend((0..sent.events as usize).map(FloorCall::Event));
    calls.extend(deletes);
    // In `default`, as the controller's Events about Nodes (cluster-scoped objects) are.
    let events: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk("events.k8s.io", "v1", "Event")));
    let nodes: Api<Node> = Api::all(client.clone());
    let start = tokio::time::Instant::now();
    stream::iter(calls.into_iter().enumerate())
        .for_each_concurrent(FLOOR_IN_FLIGHT, |(i, call)| {
            let (events, nodes) = (events.clone(), nodes.clone());
            async move {
                // A token bucket of BURST tokens refilled at QPS: call i may start once it has one.
                tokio::time::sleep_until(start + Duration::from_secs_f64(i.saturating_sub(BURST) as f64 / QPS)).await;
                match call {
                    FloorCall::Write(api, name, n) => {
                        let patch = json!({"metadata": {"annotations": {"floor": n.to_string()}}});
                        api.patch(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.expect("a floor write");
                    }
                    FloorCall::Delete(api, name) => {
                        api.delete(&name, &DeleteParams::default()).await.expect("a floor delete");
                    }
                    FloorCall::NodeRead(name) => {
                        assert!(nodes.get_opt(&name).await.expect("a floor node read").is_none(), "{name} was deleted");
                    }
                    FloorCall::Event(n) => {
                        let event = json!({
                            "metadata": {"name": format!("floor-{n}")},
                            "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "example.org/floor", "reportingInstance": "floor",
                            "action": "Floor", "reason": "Floor", "type": "Normal", "note": "floor",
                            "regarding": {"apiVersion": "v1", "kind": "Node", "name": "floor"}
                        });
                        let object: kube::api::DynamicObject = serde_json::from_value(event).unwrap();
                        events.create(&PostParams::default(), &object).await.expect("a floor Event");
                    }
                }
            }
        })
        .await;
    start.elapsed()
}

/// The i-th floor block's CIDR, outside every scale node's range.
fn floor_cidr(i: usize) -> String {
    let base = (10u32 << 24) | (200 << 16) | (i as u32 * 64);
    let o = base.to_be_bytes();
    format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3])
}
