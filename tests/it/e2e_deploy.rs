//! deploy/ against the real API server: `kubectl apply -k deploy/base` is accepted, and the
//! controller running with a token of its ServiceAccount does its whole job (the GC frees a
//! gone pod's address, then one more leak made while it runs) without a single 403. The audit
//! log also proves the steady-state loop issues no LIST: after the first sync every input
//! comes from watches, and a quiet loop reads nothing. (Each write reads the object it writes
//! first, so reads scale with the writes of a pass, never with the cluster.)

use std::time::Duration;

use calico_kube_controllers::model::names::handle_object_name;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};

use crate::support::audit;
use crate::support::cluster::private_cluster;
use crate::support::controller::{CONTROLLER_USER, free_port, install_deploy_base, setup, start_controller_with, wait_for};

#[tokio::test]
async fn controller_with_the_deploy_service_account_needs_no_other_right_and_lists_only_at_start() {
    let cluster = private_cluster();
    let kubeconfig = install_deploy_base(&cluster, "deploy").await;
    let s = setup(&cluster).await;
    let port = free_port();
    let _controller = start_controller_with(&kubeconfig, &[], &[("POD_NAMESPACE", "kube-system"), ("POD_NAME", "ckc-deploy-0")], port, "deploy");

    wait_for("the gone pod's IP freed", || async {
        let block = s.blocks.get(&s.block_name).await.ok()?;
        block.data["spec"]["allocations"][2].is_null().then_some(())
    })
    .await;
    let synced_at = audit::now_ms();

    // One more leak while the controller runs: the live pod goes away.
    let live_pod_ns = setup_namespace(&s).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), &live_pod_ns);
    pods.delete("live", &DeleteParams::default().grace_period(0)).await.expect("deleting the live pod");
    // The block is written first, then the handle: wait for both.
    let block = wait_for("the deleted pod's IP and handle freed", || async {
        let block = s.blocks.get(&s.block_name).await.ok()?;
        let handle_gone = s.handles.get_opt(&handle_object_name(&s.live_handle)).await.ok()?.is_none();
        (block.data["spec"]["allocations"][1].is_null() && handle_gone).then_some(block)
    })
    .await;
    assert_eq!(block.data["spec"]["allocations"].as_array().map(|a| a.iter().all(|v| v.is_null())), Some(true));
    // Quiet steady state: several full passes (grace 2 s ⇒ one a second) with nothing to do.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet_from = audit::now_ms();
    tokio::time::sleep(Duration::from_secs(4)).await;

    let events: Vec<_> = audit::read(cluster.dir.as_ref().unwrap()).into_iter().filter(|e| e.user == CONTROLLER_USER).collect();
    assert!(!events.is_empty(), "the audit log has no request of {CONTROLLER_USER}");
    let forbidden: Vec<_> = events.iter().filter(|e| e.code == 403).collect();
    assert!(forbidden.is_empty(), "deploy/base's ClusterRole lacks rights the controller used: {forbidden:#?}");
    assert!(
        events.iter().any(|e| e.verb == "update" && e.resource == "ipamblocks" && e.code == 200),
        "the controller's block updates went through"
    );
    // Both releases happened on one node within the series window: an Event, then a patch of its
    // series, both allowed by deploy/base's ClusterRole.
    let event_writes: Vec<_> = events.iter().filter(|e| e.resource == "events").map(|e| (e.verb.as_str(), e.code)).collect();
    assert!(event_writes.contains(&("create", 201)), "the release Event was created: {event_writes:?}");
    assert!(event_writes.contains(&("patch", 200)), "the second release patched its series: {event_writes:?}");
    let late_lists: Vec<_> = events.iter().filter(|e| e.verb == "list" && e.received_ms > synced_at).collect();
    assert!(late_lists.is_empty(), "LIST inside the steady-state loop: {late_lists:#?}");
    // With nothing to release, the loop reads nothing at all: no GET per pass. Only the Lease
    // renewal and the health loop's probes (`/healthz` and ClusterInformation/default, every
    // 10 s, as upstream's CalicoDatastore and KubeAPIServer checks) read.
    let is_health_probe = |e: &&audit::AuditEvent| e.resource.is_empty() || (e.resource == "clusterinformations" && e.name == "default");
    let quiet_reads: Vec<_> = events
        .iter()
        .filter(|e| e.received_ms > quiet_from && e.verb == "get" && e.resource != "leases")
        .filter(|e| !is_health_probe(e))
        .collect();
    assert!(quiet_reads.is_empty(), "reads in a quiet steady state: {quiet_reads:#?}");
    let mut verbs = std::collections::BTreeMap::new();
    for e in &events {
        *verbs.entry(format!("{} {}", e.verb, e.resource)).or_insert(0u32) += 1;
    }
    eprintln!("requests of the controller's ServiceAccount: {verbs:?}");
}

/// The namespace of the fixture's live pod (its handle is `k8s-pod-network.live-<ns>`).
async fn setup_namespace(s: &crate::support::controller::Setup) -> String {
    s.live_handle.strip_prefix("k8s-pod-network.live-").expect("fixture handle naming").to_string()
}
