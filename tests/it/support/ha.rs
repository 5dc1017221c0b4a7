//! Plumbing for the leader election tests: replicas of the controller binary told apart by
//! `POD_NAME` (and so by their User-Agent), the `kube_controllers_leader` gauge, the Lease, and
//! one more leaked allocation for a fixture block. Test plumbing only.


use calico_kube_controllers::model::names::handle_object_name;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::TestCluster;
use crate::support::controller::{CIDR, ChildGuard, NODE, Setup, calico, http_get, metric_sum, start_controller_with};

pub const LEASE_NAMESPACE: &str = "kube-system";
pub const LEASE_NAME: &str = "calico-kube-controllers";

/// The controller binary as replica `pod_name` (POD_NAME, POD_NAMESPACE=kube-system), grace 2 s,
/// `/metrics` on `port`, then `extra` arguments; its log goes to a file named after `pod_name`.
pub fn start_replica(cluster: &TestCluster, pod_name: &str, port: u16, extra: &[&str]) -> ChildGuard {
    let env = [("POD_NAME", pod_name), ("POD_NAMESPACE", LEASE_NAMESPACE)];
    start_controller_with(&cluster.kubeconfig, extra, &env, port, &format!("ha-{pod_name}"))
}

/// The replica's `kube_controllers_leader` value, `None` if `/metrics` does not answer.
pub async fn leader_gauge(port: u16) -> Option<f64> {
    match http_get(port, "/metrics").await {
        Some((200, body)) if body.contains("kube_controllers_leader ") => Some(metric_sum(&body, "kube_controllers_leader")),
        _ => None,
    }
}

pub async fn lease(cluster: &TestCluster) -> Option<Lease> {
    let leases: Api<Lease> = Api::namespaced(cluster.client(), LEASE_NAMESPACE);
    leases.get_opt(LEASE_NAME).await.expect("reading the Lease")
}

pub fn lease_holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone().filter(|h| !h.is_empty())
}

/// Puts a pod that does not exist at `ordinal` of the fixture block (its handle first, as the
/// CNI plugin does), compare-and-swap on the block. Returns (handle ID, IP).
pub async fn add_gone_allocation(s: &Setup, ordinal: u32, pod: &str) -> (String, String) {
    let ns = s.gone_handle.trim_start_matches("k8s-pod-network.gone-").to_string();
    let handle = format!("k8s-pod-network.{pod}-{ns}");
    let o = DynamicObject::new(&handle_object_name(&handle), &calico("IPAMHandle", "ipamhandles"))
        .data(json!({"spec": {"handleID": handle, "block": {CIDR: 1}, "deleted": false}}));
    s.handles.create(&PostParams::default(), &o).await.expect("creating the new leak's handle");
    for _ in 0..20 {
        let mut block = s.blocks.get(&s.block_name).await.expect("reading the block");
        let spec = &mut block.data["spec"];
        assert!(spec["allocations"][ordinal as usize].is_null(), "ordinal {ordinal} is taken: {spec}");
        let attrs = spec["attributes"].as_array_mut().expect("attributes");
        attrs.push(json!({"handle_id": handle, "secondary": {"namespace": ns, "node": NODE, "pod": pod, "timestamp": "2026-01-02 03:04:05.1 +0000 UTC"}}));
        let index = attrs.len() - 1;
        spec["allocations"][ordinal as usize] = json!(index);
        let unallocated: Vec<Value> = spec["unallocated"].as_array().expect("unallocated").iter().filter(|o| o.as_u64() != Some(u64::from(ordinal))).cloned().collect();
        spec["unallocated"] = Value::Array(unallocated);
        let seq = spec["sequenceNumber"].as_u64().unwrap_or(0) + 1;
        spec["sequenceNumber"] = json!(seq);
        if !spec["sequenceNumberForAllocation"].is_object() {
            spec["sequenceNumberForAllocation"] = json!({});
        }
        spec["sequenceNumberForAllocation"][ordinal.to_string()] = json!(seq);
        match s.blocks.replace(&s.block_name, &PostParams::default(), &block).await {
            Ok(_) => {
                let ip = format!("10.65.0.{ordinal}");
                return (handle, ip);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => panic!("writing the new leak into the block: {e}"),
        }
    }
    panic!("20 conflicts in a row writing the block");
}
