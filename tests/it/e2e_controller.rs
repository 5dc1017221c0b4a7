//! End-to-end: the built controller binary against a private test cluster (the GC is
//! cluster-wide). A node with a live pod and a block holding the live pod's IP and a gone pod's
//! IP: the controller frees exactly the gone pod's IP and handle; in dry-run it reports the leak
//! and writes nothing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calico_kube_controllers::model::names::{affinity_name, handle_object_name};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::cluster::{TestCluster, private_cluster, set_pod_ips};

const DEADLINE: Duration = Duration::from_secs(30);
const CIDR: &str = "10.65.0.0/26";
const LIVE_IP: &str = "10.65.0.1";
const NODE: &str = "n1";

/// Kills the controller when the test ends, also on panic, and keeps its log path for the message.
struct ChildGuard {
    child: Child,
    log: PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("controller log: {}", self.log.display());
        }
    }
}

fn calico(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind), plural)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port()
}

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// Sum of every sample of `metric` in a Prometheus text body.
fn metric_sum(body: &str, metric: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Setup {
    blocks: Api<DynamicObject>,
    handles: Api<DynamicObject>,
    block_name: String,
    live_handle: String,
    gone_handle: String,
    gone_ip: &'static str,
}

/// Node n1, a live pod reporting LIVE_IP, and a block on n1 with the live pod's IP (ordinal 1)
/// and a gone pod's IP (ordinal 2), their handles and the block's affinity.
async fn setup(cluster: &TestCluster) -> Setup {
    let client = cluster.client();
    let ns = cluster.namespace_with_default_service_account(&client, "e2e-gc").await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NODE}})).unwrap()).await.expect("node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "live"},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "registry.invalid/c:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.expect("live pod");
    set_pod_ips(&pods, "live", &[LIVE_IP]).await;

    let cidr: ipnet::IpNet = CIDR.parse().unwrap();
    let block_name = CIDR.replace(['.', '/'], "-");
    let live_handle = format!("k8s-pod-network.live-{ns}");
    let gone_handle = format!("k8s-pod-network.gone-{ns}");
    let blocks: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let handles: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMHandle", "ipamhandles"));
    let affinities: Api<DynamicObject> = Api::all_with(client.clone(), &calico("BlockAffinity", "blockaffinities"));
    let mut allocations = vec![Value::Null; 64];
    allocations[1] = json!(0);
    allocations[2] = json!(1);
    let unallocated: Vec<u32> = (0..64).filter(|o| *o != 1 && *o != 2).collect();
    let attr = |handle: &str, pod: &str| json!({"handle_id": handle, "secondary": {"namespace": ns, "node": NODE, "pod": pod, "timestamp": "2026-01-02 03:04:05.1 +0000 UTC"}});
    let block = DynamicObject::new(&block_name, &calico("IPAMBlock", "ipamblocks")).data(json!({"spec": {
        "cidr": CIDR, "affinity": format!("host:{NODE}"), "strictAffinity": false, "deleted": false,
        "allocations": allocations, "unallocated": unallocated,
        "attributes": [attr(&live_handle, "live"), attr(&gone_handle, "gone")],
        "sequenceNumber": 3, "sequenceNumberForAllocation": {"1": 1, "2": 2},
    }}));
    blocks.create(&PostParams::default(), &block).await.expect("block");
    for h in [&live_handle, &gone_handle] {
        let o = DynamicObject::new(&handle_object_name(h), &calico("IPAMHandle", "ipamhandles"))
            .data(json!({"spec": {"handleID": h, "block": {CIDR: 1}, "deleted": false}}));
        handles.create(&PostParams::default(), &o).await.expect("handle");
    }
    let a = DynamicObject::new(&affinity_name(NODE, &cidr), &calico("BlockAffinity", "blockaffinities"))
        .data(json!({"spec": {"cidr": CIDR, "node": NODE, "state": "confirmed", "type": "host", "deleted": "false"}}));
    affinities.create(&PostParams::default(), &a).await.expect("affinity");
    Setup { blocks, handles, block_name, live_handle, gone_handle, gone_ip: "10.65.0.2" }
}

fn start_controller(cluster: &TestCluster, extra: &[&str], port: u16, label: &str) -> ChildGuard {
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("controller-{label}-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("log file");
    let port = port.to_string();
    let mut args = vec!["run", "--leak-grace-period", "2s", "--metrics-port", port.as_str()];
    args.extend_from_slice(extra);
    let child = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"))
        .args(&args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("LOG_LEVEL", "info")
        .env_remove("CKC_DRY_RUN")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("starting the controller");
    ChildGuard { child, log }
}

#[tokio::test]
async fn controller_frees_a_gone_pods_ip_and_handle_and_keeps_the_live_one() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let port = free_port();
    let started = Instant::now();
    let controller = start_controller(&cluster, &[], port, "gc");

    let freed = loop {
        let block = s.blocks.get(&s.block_name).await.expect("reading the block");
        let gone_handle = s.handles.get_opt(&handle_object_name(&s.gone_handle)).await.expect("reading the handle");
        if block.data["spec"]["allocations"][2].is_null() && gone_handle.is_none() {
            break block;
        }
        assert!(started.elapsed() < DEADLINE, "gone pod's IP not freed in {DEADLINE:?}: {}", block.data["spec"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("gone pod's IP {} freed {:.1} s after the controller started", s.gone_ip, started.elapsed().as_secs_f64());
    assert_eq!(freed.data["spec"]["allocations"][1], json!(0), "the live pod's IP stays allocated");
    assert!(s.handles.get_opt(&handle_object_name(&s.live_handle)).await.unwrap().is_some(), "the live handle stays");

    let (code, body) = http_get(port, "/metrics").await.expect("scraping /metrics");
    assert_eq!(code, 200);
    assert!(metric_sum(&body, "ipam_gc_releases_total") >= 1.0, "{body}");
    assert!(metric_sum(&body, "ipam_allocations_gc_reclamations") >= 1.0, "{body}");
    assert!(body.contains("kube_controllers_api_requests_total{verb=\"update\",resource=\"ipamblocks\",code=\"200\"}"), "{body}");
    assert_eq!(http_get(port, "/readiness").await.map(|r| r.0), Some(200));

    // SIGTERM: the pass in progress finishes, then a clean exit.
    let mut controller = controller;
    let pid = controller.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = controller.child.try_wait().expect("waiting for the controller") {
            break status;
        }
        assert!(stopping.elapsed() < Duration::from_secs(10), "no exit within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!("exited {:.2} s after SIGTERM", stopping.elapsed().as_secs_f64());
}

#[tokio::test]
async fn dry_run_controller_reports_the_leak_and_writes_nothing() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let before = s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version;
    let port = free_port();
    let started = Instant::now();
    let _controller = start_controller(&cluster, &["--dry-run"], port, "dry");

    // Wait until the leak is confirmed and releasable in the report, then for several more passes.
    loop {
        if let Some((200, body)) = http_get(port, "/leak-report").await {
            let report: Value = serde_json::from_str(&body).expect("report JSON");
            let leaks = report["leaks"].as_array().cloned().unwrap_or_default();
            if leaks.iter().any(|l| l["ip"] == s.gone_ip && l["releasable"] == true) {
                assert!(leaks.iter().all(|l| l["ip"] != LIVE_IP), "the live IP is no leak: {body}");
                break;
            }
        }
        assert!(started.elapsed() < DEADLINE, "the dry-run report never listed the leak as releasable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let confirmed_at = started.elapsed();
    // Grace 2 s ⇒ a full pass every second: wait for at least three more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = s.blocks.get(&s.block_name).await.unwrap();
    assert_eq!(after.metadata.resource_version, before, "dry run must not write the block");
    assert_eq!(after.data["spec"]["allocations"][2], json!(1));
    assert!(s.handles.get_opt(&handle_object_name(&s.gone_handle)).await.unwrap().is_some());
    let (_, body) = http_get(port, "/metrics").await.expect("scraping /metrics");
    assert_eq!(metric_sum(&body, "ipam_gc_releases_total"), 0.0, "{body}");
    assert!(metric_sum(&body, "ipam_gc_pass_duration_seconds_count") >= 3.0, "{body}");
    for verb in ["create", "update", "delete"] {
        let prefix = format!("kube_controllers_api_requests_total{{verb=\"{verb}\"");
        assert!(!body.lines().any(|l| l.starts_with(&prefix)), "dry run sent a {verb}: {body}");
    }
    eprintln!("dry run: leak reported {:.1} s after start", confirmed_at.as_secs_f64());
}

#[tokio::test]
async fn datastore_not_ready_pauses_the_gc_until_it_is_ready_again() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let infos: Api<DynamicObject> = Api::all_with(cluster.client(), &calico("ClusterInformation", "clusterinformations"));
    let info = DynamicObject::new("default", &calico("ClusterInformation", "clusterinformations"))
        .data(json!({"spec": {"clusterGUID": "0123456789abcdef0123456789abcdef", "clusterType": "k8s,kdd", "datastoreReady": false}}));
    infos.create(&PostParams::default(), &info).await.expect("ClusterInformation");
    let before = s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version;
    let port = free_port();
    let _controller = start_controller(&cluster, &[], port, "paused");

    // Grace 2 s: without the pause the IP would be gone in about 3 s (see the first test).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version, before, "paused GC wrote the block");
    let (_, body) = http_get(port, "/metrics").await.expect("scraping /metrics");
    assert!(body.contains("ipam_gc_datastore_paused 1"), "{body}");

    let patch = json!({"spec": {"datastoreReady": true}});
    infos.patch("default", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.expect("datastoreReady=true");
    let resumed = Instant::now();
    loop {
        let block = s.blocks.get(&s.block_name).await.unwrap();
        if block.data["spec"]["allocations"][2].is_null() {
            assert_eq!(block.data["spec"]["allocations"][1], json!(0));
            break;
        }
        assert!(resumed.elapsed() < DEADLINE, "GC did not resume after datastoreReady=true");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("released {:.1} s after datastoreReady=true", resumed.elapsed().as_secs_f64());
}
