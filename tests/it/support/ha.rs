//! Plumbing for the leader election tests: replicas of the controller binary told apart by
//! `POD_NAME` (and so by their User-Agent), the `kube_controllers_leader` gauge, the Lease, the
//! wait for a single leader, and one more leaked allocation for a fixture block. Test plumbing
//! only.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

use crate::support::cluster::TestCluster;
use crate::support::controller::{CIDR, ChildGuard, NODE, Setup, free_port, http_get, metric_sum, start_controller_with};
use crate::support::ipam::{Alloc, add_allocation, handle_object, pod_attrs};

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

/// A running replica: its `POD_NAME`, its `/metrics` port and its process.
pub struct Replica {
    pub name: &'static str,
    pub port: u16,
    pub guard: ChildGuard,
}

/// Replica `name` on a free port, with `extra` arguments (see [`start_replica`]).
pub fn replica(cluster: &TestCluster, name: &'static str, extra: &[&str]) -> Replica {
    let port = free_port();
    Replica { name, port, guard: start_replica(cluster, name, port, extra) }
}

/// Waits until exactly one of `replicas` reports `kube_controllers_leader 1`, every other one
/// 0, and the Lease names that one; returns its index.
pub async fn sole_leader(cluster: &TestCluster, replicas: &[&Replica], within: Duration) -> usize {
    let started = Instant::now();
    loop {
        let mut gauges = Vec::new();
        for r in replicas {
            gauges.push(leader_gauge(r.port).await);
        }
        let leaders: Vec<usize> = gauges.iter().enumerate().filter(|(_, g)| **g == Some(1.0)).map(|(i, _)| i).collect();
        if gauges.iter().all(|g| matches!(g, Some(v) if *v == 0.0 || *v == 1.0)) && leaders.len() == 1 {
            let holder = lease(cluster).await.as_ref().and_then(lease_holder);
            if holder.as_deref() == Some(replicas[leaders[0]].name) {
                return leaders[0];
            }
        }
        assert!(started.elapsed() < within, "no single leader within {within:?}: gauges {gauges:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
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
    s.handles.create(&PostParams::default(), &handle_object(&handle, CIDR, 1)).await.expect("creating the new leak's handle");
    add_allocation(&s.blocks, &s.block_name, &Alloc { ordinal, handle: &handle, secondary: pod_attrs(&ns, pod, NODE) }).await;
    (handle, format!("10.65.0.{ordinal}"))
}
