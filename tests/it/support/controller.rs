//! Running the built controller binary against a test cluster: a child-process guard that keeps
//! its log, a fixture cluster state (node, live pod, block with a live and a gone allocation),
//! HTTP scraping and metric parsing. Test plumbing only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::cluster::{TestCluster, set_pod_ips};
use crate::support::ipam::{Alloc, Ipam, pod_attrs};

pub const DEADLINE: Duration = Duration::from_secs(30);
pub const CIDR: &str = "10.65.0.0/26";
pub const LIVE_IP: &str = "10.65.0.1";
pub const NODE: &str = "n1";

/// Kills the controller when the test ends, also on panic, and keeps its log path for the message.
pub struct ChildGuard {
    pub child: Child,
    pub log: PathBuf,
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

pub fn calico(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind), plural)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port()
}

pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// A process's peak resident set (`VmHWM`) in KiB, `None` once it is gone.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// A process's resident set now (`VmRSS`) in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// Sum of every sample of `metric` in a Prometheus text body.
pub fn metric_sum(body: &str, metric: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub struct Setup {
    pub blocks: Api<DynamicObject>,
    pub handles: Api<DynamicObject>,
    pub block_name: String,
    pub live_handle: String,
    pub gone_handle: String,
    pub gone_ip: &'static str,
}

/// A fresh namespace (named from `prefix`) holding pod `live` on node n1 (created here),
/// reporting LIVE_IP: the Kubernetes half of every GC fixture. Returns the namespace.
pub async fn live_pod_on_node(cluster: &TestCluster, client: &kube::Client, prefix: &str) -> String {
    let ns = cluster.namespace_with_default_service_account(client, prefix).await;
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
    ns
}

/// Node n1, a live pod reporting LIVE_IP, and a block on n1 with the live pod's IP (ordinal 1)
/// and a gone pod's IP (ordinal 2), their handles and the block's affinity.
pub async fn setup(cluster: &TestCluster) -> Setup {
    let client = cluster.client();
    let ns = live_pod_on_node(cluster, &client, "e2e-gc").await;
    let live_handle = format!("k8s-pod-network.live-{ns}");
    let gone_handle = format!("k8s-pod-network.gone-{ns}");
    let ipam = Ipam::new(&client);
    let block_name = ipam
        .block(CIDR, Some(NODE), &[
            Alloc { ordinal: 1, handle: &live_handle, secondary: pod_attrs(&ns, "live", NODE) },
            Alloc { ordinal: 2, handle: &gone_handle, secondary: pod_attrs(&ns, "gone", NODE) },
        ])
        .await;
    let Ipam { blocks, handles, .. } = ipam;
    Setup { blocks, handles, block_name, live_handle, gone_handle, gone_ip: "10.65.0.2" }
}

pub fn start_controller(cluster: &TestCluster, extra: &[&str], port: u16, label: &str) -> ChildGuard {
    start_controller_with(&cluster.kubeconfig, extra, &[], port, label)
}

/// `run --metrics-port port`, `--leak-grace-period 2s` unless `extra` sets it, then `extra`,
/// reaching the cluster through `kubeconfig`, with `LOG_LEVEL=info` and `env`.
pub fn start_controller_with(kubeconfig: &Path, extra: &[&str], env: &[(&str, &str)], port: u16, label: &str) -> ChildGuard {
    let port = port.to_string();
    let mut args = vec!["run", "--metrics-port", port.as_str()];
    if !extra.contains(&"--leak-grace-period") {
        args.extend_from_slice(&["--leak-grace-period", "2s"]);
    }
    args.extend_from_slice(extra);
    let mut all_env = vec![("LOG_LEVEL", "info")];
    all_env.extend_from_slice(env);
    spawn_controller(kubeconfig, &args, &all_env, label)
}

/// Polls `check` every 200 ms until it returns `Some`, failing the test with `what` after
/// [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}


/// The ServiceAccount the controller runs as in deploy/.
pub const CONTROLLER_USER: &str = "system:serviceaccount:kube-system:calico-kube-controllers";

/// Applies deploy/base (ServiceAccount, ClusterRole, bindings, Deployment) with the cluster's
/// kubectl, as an operator would, and returns a kubeconfig for the controller's ServiceAccount:
/// a controller started with it has exactly the rights deploy/ grants.
pub async fn install_deploy_base(cluster: &TestCluster, label: &str) -> PathBuf {
    let kubectl = cluster.bin_dir().expect("a harness cluster").join("kubectl");
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base");
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["apply", "-k"])
        .arg(&base)
        .output()
        .expect("running kubectl");
    assert!(out.status.success(), "kubectl apply -k deploy/base: {}", String::from_utf8_lossy(&out.stderr));
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kubeconfig-sa-{label}-{}", std::process::id()));
    cluster.kubeconfig_for_service_account("kube-system", "calico-kube-controllers", &path).await;
    path
}

/// Starts the binary with exactly `args` and `env` (on top of KUBECONFIG): no implied `run`, no
/// grace override, no LOG_LEVEL, so the KubeControllersConfiguration decides what the test
/// leaves open.
pub fn start_controller_env(cluster: &TestCluster, args: &[&str], env: &[(&str, &str)], label: &str) -> ChildGuard {
    spawn_controller(&cluster.kubeconfig, args, env, label)
}

/// The controller binary with exactly `args`, `KUBECONFIG` and `env`: the configuration variables
/// of the test process itself are not inherited. Its log goes to a file named after `label`.
fn spawn_controller(kubeconfig: &Path, args: &[&str], env: &[(&str, &str)], label: &str) -> ChildGuard {
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("controller-{label}-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"));
    command.args(args).env("KUBECONFIG", kubeconfig);
    for var in ["LOG_LEVEL", "CKC_DRY_RUN", "ENABLED_CONTROLLERS", "DATASTORE_TYPE", "LOG_FORMAT", "HEALTH_ENABLED"] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let child = command.stdout(Stdio::null()).stderr(file).spawn().expect("starting the controller");
    ChildGuard { child, log }
}

impl ChildGuard {
    /// The controller's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
