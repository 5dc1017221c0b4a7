//! End-to-end on the etcd datastore: the built controller with `DATASTORE_TYPE=etcdv3` against a
//! private test cluster (pods, nodes and the Lease in Kubernetes) and that cluster's TLS Calico
//! etcd (IPAM). A block in etcd holds a live pod's IP and a gone pod's IP: the controller frees
//! exactly the gone pod's IP and handle in etcd and writes its start-up objects there.

use std::time::{Duration, Instant};

use calico_kube_controllers::config::EnvConfig;
use calico_kube_controllers::datastore::etcd::EtcdDatastore;
use calico_kube_controllers::datastore::{Datastore, Kind};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::support::cluster::{private_cluster, set_pod_ips};
use crate::support::controller::{CIDR, DEADLINE, LIVE_IP, NODE, free_port, http_get, start_controller_with};
use crate::support::ipam::{Alloc, affinity_object, block_object, handle_object, pod_attrs};

#[tokio::test]
async fn controller_on_etcd_frees_a_gone_pods_ip_and_handle_and_keeps_the_live_one() {
    let cluster = private_cluster();
    let client = cluster.client();
    let etcd = cluster.calico_etcd.clone().expect("the harness's Calico etcd");
    let (ca, cert, key) = (etcd.ca_cert.display().to_string(), etcd.client_cert.display().to_string(), etcd.client_key.display().to_string());
    let env = [
        ("DATASTORE_TYPE", "etcdv3"),
        ("ETCD_ENDPOINTS", etcd.endpoints.as_str()),
        ("ETCD_CA_CERT_FILE", ca.as_str()),
        ("ETCD_CERT_FILE", cert.as_str()),
        ("ETCD_KEY_FILE", key.as_str()),
    ];
    let vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let cfg = EnvConfig::from_env(&vars).expect("valid settings").etcd.expect("etcd settings");
    let ds = EtcdDatastore::connect(&cfg).await.expect("connects to Calico's etcd");

    // Kubernetes: the node and the live pod with its IP.
    let ns = cluster.namespace_with_default_service_account(&client, "e2e-etcd").await;
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

    // etcd: the block with both allocations, their handles and the node's affinity.
    let live_handle = format!("k8s-pod-network.live-{ns}");
    let gone_handle = format!("k8s-pod-network.gone-{ns}");
    let block = block_object(CIDR, Some(NODE), &[
        Alloc { ordinal: 1, handle: &live_handle, secondary: pod_attrs(&ns, "live", NODE) },
        Alloc { ordinal: 2, handle: &gone_handle, secondary: pod_attrs(&ns, "gone", NODE) },
    ]);
    let block_name = block.metadata.name.clone().expect("named");
    let body = |o: kube::api::DynamicObject| serde_json::to_value(o).expect("JSON");
    ds.create(Kind::IpamBlock, &block_name, body(block)).await.expect("block in etcd");
    for h in [&live_handle, &gone_handle] {
        ds.create(Kind::IpamHandle, h, body(handle_object(h, CIDR, 1))).await.expect("handle in etcd");
    }
    let affinity = affinity_object(NODE, CIDR);
    let affinity_name = affinity.metadata.name.clone().expect("named");
    ds.create(Kind::BlockAffinity, &affinity_name, body(affinity)).await.expect("affinity in etcd");

    let port = free_port();
    let started = Instant::now();
    let controller = start_controller_with(&cluster.kubeconfig, &[], &env, port, "etcd-gc");
    let freed = loop {
        let block = ds.get(Kind::IpamBlock, &block_name).await.expect("reading the block");
        let gone = ds.get(Kind::IpamHandle, &gone_handle).await;
        if block.value["spec"]["allocations"][2].is_null() && gone.as_ref().is_err_and(|e| e.is_not_found()) {
            break block;
        }
        assert!(started.elapsed() < DEADLINE, "gone pod's IP not freed in {DEADLINE:?}: {}\n{}", block.value["spec"], controller.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("etcd: gone pod's IP freed {:.1} s after the controller started", started.elapsed().as_secs_f64());
    assert_eq!(freed.value["spec"]["allocations"][1], json!(0), "the live pod's IP stays allocated");
    ds.get(Kind::IpamHandle, &live_handle).await.expect("the live handle stays");
    ds.get(Kind::BlockAffinity, &affinity_name).await.expect("the live node keeps its affinity");
    // Start-up wrote its objects to etcd, not to the CRDs.
    let info = ds.get(Kind::ClusterInformation, "default").await.expect("ClusterInformation in etcd");
    assert!(info.value["spec"]["clusterGUID"].as_str().is_some_and(|g| !g.is_empty()), "{}", info.value);
    assert_eq!(info.value["spec"]["clusterType"], "k8s", "upstream's etcd mode: no kdd");
    ds.get(Kind::KubeControllersConfiguration, "default").await.expect("the default KubeControllersConfiguration in etcd");
    let ready = crate::support::controller::wait_for("readiness 200", || async { http_get(port, "/readiness").await.filter(|r| r.0 == 200) }).await;
    assert_eq!(ready.0, 200);
    // The etcd calls are counted like the apiserver's: the release was a block update in etcd.
    let (_, metrics) = http_get(port, "/metrics").await.expect("scraping /metrics");
    assert!(metrics.contains("kube_controllers_api_requests_total{verb=\"update\",resource=\"ipamblocks\",code=\"200\"}"), "{metrics}");
    assert!(metrics.contains("kube_controllers_api_requests_total{verb=\"delete\",resource=\"ipamhandles\",code=\"200\"}"), "{metrics}");
}

#[tokio::test]
async fn controller_with_an_unreachable_etcd_stays_up_not_ready_naming_etcd_endpoints() {
    let cluster = crate::support::cluster::shared_cluster();
    let etcd = cluster.calico_etcd.clone().expect("the harness's Calico etcd");
    let (ca, cert, key) = (etcd.ca_cert.display().to_string(), etcd.client_cert.display().to_string(), etcd.client_key.display().to_string());
    let env = [
        ("DATASTORE_TYPE", "etcdv3"),
        ("ETCD_ENDPOINTS", "https://127.0.0.1:1"),
        ("ETCD_CA_CERT_FILE", ca.as_str()),
        ("ETCD_CERT_FILE", cert.as_str()),
        ("ETCD_KEY_FILE", key.as_str()),
    ];
    let port = free_port();
    // A dry run: on the shared cluster this replica must not lead or write anything.
    let mut controller = start_controller_with(&cluster.kubeconfig, &["--dry-run"], &env, port, "etcd-unreachable");
    let text = crate::support::controller::wait_for("a readiness answer naming ETCD_ENDPOINTS", || async {
        http_get(port, "/readiness").await.filter(|(code, body)| *code != 200 && body.contains("ETCD_ENDPOINTS"))
    })
    .await;
    assert_eq!(text.0, 503, "{}", text.1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(controller.child.try_wait().expect("waiting").is_none(), "the controller must not exit (no crash loop): {}", controller.log_text());
}

#[tokio::test]
async fn live_leak_scan_on_etcd_reports_a_leak_in_etcd_and_writes_nothing() {
    let cluster = crate::support::cluster::shared_cluster();
    let etcd = cluster.calico_etcd.clone().expect("the harness's Calico etcd");
    let (ca, cert, key) = (etcd.ca_cert.display().to_string(), etcd.client_cert.display().to_string(), etcd.client_key.display().to_string());
    let env = [
        ("CALICO_DATASTORE_TYPE", "etcdv3"),
        ("CALICO_ETCD_ENDPOINTS", etcd.endpoints.as_str()),
        ("CALICO_ETCD_CA_CERT_FILE", ca.as_str()),
        ("CALICO_ETCD_CERT_FILE", cert.as_str()),
        ("CALICO_ETCD_KEY_FILE", key.as_str()),
    ];
    let vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let cfg = EnvConfig::from_env(&vars).expect("valid settings").etcd.expect("etcd settings");
    let ds = EtcdDatastore::connect(&cfg).await.expect("connects");
    let ghost = format!("k8s-pod-network.{}", crate::support::cluster::unique_name("ghost"));
    let node = crate::support::cluster::unique_name("scan-node");
    let block = block_object("10.66.9.0/26", Some(&node), &[Alloc { ordinal: 7, handle: &ghost, secondary: pod_attrs("no-such-namespace", "ghost", &node) }]);
    let name = block.metadata.name.clone().expect("named");
    if let Ok(old) = ds.get(Kind::IpamBlock, &name).await {
        ds.delete(Kind::IpamBlock, &name, &old.exact()).await.expect("clear an earlier run's block");
    }
    let created = ds.create(Kind::IpamBlock, &name, serde_json::to_value(block).unwrap()).await.expect("block in etcd");

    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"));
    command.args(["leak-scan", "--output", "json"]).env("KUBECONFIG", &cluster.kubeconfig).envs(env.iter().copied());
    let out = command.output().expect("running leak-scan");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON report ({e}); stderr: {stderr}"));
    let leak = report["leaks"].as_array().into_iter().flatten().find(|l| l["ip"] == "10.66.9.7").cloned();
    let leak = leak.unwrap_or_else(|| panic!("the etcd block's leak is reported: {report:#}; stderr: {stderr}"));
    assert_eq!(leak["releasable"], true, "{leak}");
    assert_eq!(out.status.code(), Some(1), "releasable leaks => exit 1; stderr: {stderr}");
    let after = ds.get(Kind::IpamBlock, &name).await.expect("the block is still there");
    assert_eq!(after.revision, created.revision, "read-only: the block is unchanged");
    ds.delete(Kind::IpamBlock, &name, &after.exact()).await.expect("clean up");
}
