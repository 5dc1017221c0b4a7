//! `leak-scan` with no `--from-dump` reads the live cluster (as the deploy/ ServiceAccount:
//! its read rights suffice), reports what the GC would release and writes nothing. Unlike a
//! dump, a live listing sees every pod, so a leak in a namespace without pods is releasable.
//! A LoadBalancer address whose Service was deleted is reported as `lb-unwanted` (not
//! releasable, in use for calicoctl); one its Service still has is no leak.

use std::process::Command;

use calico_kube_controllers::loadbalancer::handle_id;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::private_cluster;
use crate::support::controller::{LIVE_IP, calico, install_deploy_base, setup};
use crate::support::ipam::{Alloc, Ipam, block_object, pod_attrs};

/// A LoadBalancer pool, and its block holding the addresses of Service `kept` (ordinal 0) and of
/// Service `deleted` (ordinal 1, the Service created and deleted again), as the LoadBalancer
/// controller leaves them.
async fn load_balancer_addresses(client: &kube::Client) {
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPPool", "ippools"));
    let pool: DynamicObject = serde_json::from_value(json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "lb-pool"},
        "spec": {"cidr": "203.0.113.0/28", "blockSize": 29, "allowedUses": ["LoadBalancer"]}}))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.expect("the LoadBalancer pool");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let mut uids = Vec::new();
    for name in ["kept", "deleted"] {
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}})).unwrap();
        let created = services.create(&PostParams::default(), &svc).await.expect("a LoadBalancer Service");
        uids.push(created.metadata.uid.expect("a uid"));
    }
    services.delete("deleted", &DeleteParams::default()).await.expect("deleting a Service");
    let attrs = |name: &str| json!({"namespace": "default", "service": name, "type": "LoadBalancer", "timestamp": "2026-01-02 03:04:05 +0000 UTC"});
    let (kept, deleted) = (handle_id("kept", "default", &uids[0]), handle_id("deleted", "default", &uids[1]));
    let mut block = block_object("203.0.113.0/29", None, &[Alloc { ordinal: 0, handle: &kept, secondary: attrs("kept") }, Alloc { ordinal: 1, handle: &deleted, secondary: attrs("deleted") }]);
    block.data["spec"]["affinity"] = json!("virtual:load-balancer");
    Ipam::new(client).blocks.create(&PostParams::default(), &block).await.expect("the LoadBalancer block");
}

#[tokio::test]
async fn live_leak_scan_reports_releasable_leaks_and_writes_nothing() {
    let cluster = private_cluster();
    let kubeconfig = install_deploy_base(&cluster, "scan").await;
    let s = setup(&cluster).await;
    let ipam = Ipam::new(&cluster.client());
    let ghost = "k8s-pod-network.ghost";
    let ghost_block = ipam.block("10.65.2.0/26", Some("n1"), &[Alloc { ordinal: 7, handle: ghost, secondary: pod_attrs("no-such-namespace", "ghost", "n1") }]).await;
    load_balancer_addresses(&cluster.client()).await;
    let before: Vec<_> = ipam.all_names().await;
    let block_rv = s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version;

    let out = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"))
        .args(["leak-scan", "--output", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("running leak-scan");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "releasable leaks ⇒ exit 1; stderr: {stderr}; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON report ({e}); stderr: {stderr}"));
    let leaks = report["leaks"].as_array().expect("leaks");
    let leak = |ip: &str| leaks.iter().find(|l| l["ip"] == ip).cloned();
    let gone = leak(s.gone_ip).unwrap_or_else(|| panic!("the gone pod's IP is reported: {report:#}"));
    assert_eq!(gone["releasable"], true, "{gone}");
    let ghost_leak = leak("10.65.2.7").unwrap_or_else(|| panic!("the pod-less namespace's IP is reported: {report:#}"));
    assert_eq!(ghost_leak["releasable"], true, "a live scan covers every namespace: {ghost_leak}");
    assert!(leak(LIVE_IP).is_none(), "the live pod's IP is no leak: {report:#}");
    // calicoctl's view: allocations grouped by block, only releasable leaks `inUse: false`.
    let in_use = |ip: &str| {
        report["allocations"].as_object().into_iter().flat_map(|m| m.values()).filter_map(Value::as_array).flatten().find(|a| a["ip"] == ip).map(|a| a["inUse"].clone())
    };
    assert_eq!(in_use(s.gone_ip), Some(Value::Bool(false)), "{report:#}");
    assert_eq!(in_use(LIVE_IP), Some(Value::Bool(true)));
    // LoadBalancer addresses: the deleted Service's is unwanted, left to the LoadBalancer
    // controller (never releasable, in use for calicoctl); the kept Service's is no leak.
    let lb = leak("203.0.113.1").unwrap_or_else(|| panic!("the deleted Service's address is reported: {report:#}"));
    assert_eq!((lb["reason"].as_str(), lb["service"].as_str(), lb["releasable"].as_bool()), (Some("lb-unwanted"), Some("deleted"), Some(false)), "{lb}");
    assert_eq!(in_use("203.0.113.1"), Some(Value::Bool(true)));
    assert!(leak("203.0.113.0").is_none(), "the kept Service's address is wanted: {report:#}");
    assert_eq!(report["loadBalancer"]["addresses"], 2, "{report:#}");
    assert_eq!(report["loadBalancer"]["unwanted"], 1);
    assert_eq!(report["summary"]["releasableLeaks"], 2, "the LoadBalancer leak is not counted releasable");

    // Read-only: every object is still there, unchanged.
    assert_eq!(ipam.all_names().await, before);
    assert_eq!(s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version, block_rv);
    assert!(ipam.block_spec(&ghost_block).await.is_some_and(|b| !b["allocations"][7].is_null()));
}
