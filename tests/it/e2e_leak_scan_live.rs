//! `leak-scan` with no `--from-dump` reads the live cluster (as the deploy/ ServiceAccount:
//! its read rights suffice), reports what the GC would release and writes nothing. Unlike a
//! dump, a live listing sees every pod, so a leak in a namespace without pods is releasable.

use std::process::Command;

use serde_json::Value;

use crate::support::cluster::private_cluster;
use crate::support::controller::{LIVE_IP, install_deploy_base, setup};
use crate::support::ipam::{Alloc, Ipam, pod_attrs};

#[tokio::test]
async fn live_leak_scan_reports_releasable_leaks_and_writes_nothing() {
    let cluster = private_cluster();
    let kubeconfig = install_deploy_base(&cluster, "scan").await;
    let s = setup(&cluster).await;
    let ipam = Ipam::new(&cluster.client());
    let ghost = "k8s-pod-network.ghost";
    let ghost_block = ipam.block("10.65.2.0/26", Some("n1"), &[Alloc { ordinal: 7, handle: ghost, secondary: pod_attrs("no-such-namespace", "ghost", "n1") }]).await;
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

    // Read-only: every object is still there, unchanged.
    assert_eq!(ipam.all_names().await, before);
    assert_eq!(s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version, block_rv);
    assert!(ipam.block_spec(&ghost_block).await.is_some_and(|b| !b["allocations"][7].is_null()));
}
