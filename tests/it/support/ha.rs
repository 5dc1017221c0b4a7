//! Plumbing for the leader election tests: replicas of the controller binary told apart by
//! `POD_NAME` (and so by their User-Agent), the `kube_controllers_leader` gauge, the Lease, the
//! API server's audit log read per user agent, and one more leaked allocation for a fixture
//! block. Test plumbing only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use calico_kube_controllers::model::names::handle_object_name;
use calico_kube_controllers::model::time::parse_rfc3339;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::TestCluster;
use crate::support::controller::{CIDR, ChildGuard, NODE, Setup, calico, http_get, metric_sum};

pub const LEASE_NAMESPACE: &str = "kube-system";
pub const LEASE_NAME: &str = "calico-kube-controllers";

/// The controller binary as replica `pod_name` (POD_NAME, POD_NAMESPACE=kube-system), grace 2 s,
/// `/metrics` on `port`, then `extra` arguments; its log goes to a file named after `pod_name`.
pub fn start_replica(cluster: &TestCluster, pod_name: &str, port: u16, extra: &[&str]) -> ChildGuard {
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("controller-ha-{pod_name}-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("log file");
    let port = port.to_string();
    let mut args = vec!["run", "--leak-grace-period", "2s", "--metrics-port", port.as_str()];
    args.extend_from_slice(extra);
    let child = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"))
        .args(&args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("LOG_LEVEL", "info")
        .env("POD_NAME", pod_name)
        .env("POD_NAMESPACE", LEASE_NAMESPACE)
        .env_remove("CKC_DRY_RUN")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("starting the controller");
    ChildGuard { child, log }
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

/// One finished request from the audit log.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub user_agent: String,
    pub received_ms: i64,
}

impl AuditEntry {
    pub fn is_ipam(&self) -> bool {
        matches!(self.resource.as_str(), "ipamblocks" | "ipamhandles" | "blockaffinities")
    }

    pub fn is_ipam_write(&self) -> bool {
        self.is_ipam() && matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete" | "deletecollection")
    }

    /// Sent by the replica named `pod_name` (its User-Agent ends with `(pod_name)`).
    pub fn sent_by(&self, pod_name: &str) -> bool {
        self.user_agent.starts_with("calico-kube-controllers/") && self.user_agent.ends_with(&format!("({pod_name})"))
    }
}

/// Every `ResponseComplete` event of `DIR/audit.log` (level Metadata, see scripts/test-cluster.sh).
pub fn audit(cluster: &TestCluster) -> Vec<AuditEntry> {
    let dir: &Path = cluster.dir.as_deref().expect("a harness cluster with an audit log");
    let text = std::fs::read_to_string(dir.join("audit.log")).expect("reading the audit log");
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["stage"] == "ResponseComplete")
        .map(|v| AuditEntry {
            verb: s(&v["verb"]),
            resource: s(&v["objectRef"]["resource"]),
            namespace: s(&v["objectRef"]["namespace"]),
            user_agent: s(&v["userAgent"]),
            received_ms: v["requestReceivedTimestamp"].as_str().and_then(parse_rfc3339).unwrap_or(0),
        })
        .collect()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
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
