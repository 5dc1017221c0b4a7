//! Real Kubernetes API servers for the end-to-end tests, started through
//! `scripts/test-cluster.sh`.
//!
//! Owns: finding or starting a cluster, handing out clients, unique names, and the few
//! chores a cluster without controller-manager or kubelet needs (a namespace's `default`
//! ServiceAccount, pod status). It never talks to a cluster it cannot prove is a test
//! cluster: no ambient `KUBECONFIG`, only clusters this process started or the one named by
//! `CKC_TEST_KUBECONFIG`, which must carry the harness marker ConfigMap.
//!
//! Clean-up: the script's watchdog stops a cluster when this test process exits, however it
//! exits (statics are never dropped, and a panic or SIGKILL skips destructors anyway). A
//! private cluster is also stopped when dropped.
#![allow(dead_code)] // Each test module uses a different subset.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

/// The variable that names an existing harness cluster to use instead of starting one.
pub const EXTERNAL_KUBECONFIG_VAR: &str = "CKC_TEST_KUBECONFIG";
/// The ConfigMap (in `kube-system`) that `test-cluster.sh start` creates in every cluster.
pub const MARKER_NAMESPACE: &str = "kube-system";
pub const MARKER_NAME: &str = "calico-kube-controllers-test-cluster";

/// Calico's etcd datastore of a harness cluster (TLS with client certificates).
#[derive(Debug, Clone)]
pub struct CalicoEtcd {
    pub endpoints: String,
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// One test cluster: kube-apiserver with the Calico CRDs, its etcd, and Calico's etcd.
#[derive(Debug)]
pub struct TestCluster {
    /// The harness directory (data, logs, certificates, `bin/kubectl`); `None` for a cluster
    /// named by `CKC_TEST_KUBECONFIG` that this process did not start.
    pub dir: Option<PathBuf>,
    pub kubeconfig: PathBuf,
    /// The etcd behind kube-apiserver (plain HTTP on loopback); `None` for an external cluster.
    pub etcd_endpoints: Option<String>,
    pub calico_etcd: Option<CalicoEtcd>,
    config: Config,
    /// Stop the processes when dropped (private clusters only; statics are never dropped).
    stop_on_drop: bool,
}

static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The cluster shared by all tests of this binary, started on first use. Tests on it must
/// stay inside their own namespaces and uniquely named objects, and must not run
/// cluster-wide controllers (use [`private_cluster`] for that).
///
/// Panics, failing the test, with the reason if no cluster can be had: these tests never skip.
pub fn shared_cluster() -> &'static TestCluster {
    let result = SHARED.get_or_init(|| match std::env::var_os(EXTERNAL_KUBECONFIG_VAR) {
        Some(path) => TestCluster::external(PathBuf::from(path)),
        None => TestCluster::start("shared", false),
    });
    match result {
        Ok(cluster) => cluster,
        Err(reason) => panic!("no test cluster: {reason}"),
    }
}

/// A cluster of its own, for a test that runs a controller over the whole cluster. Stopped
/// when dropped; its directory is removed unless the test is panicking (logs are kept then).
pub fn private_cluster() -> TestCluster {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let label = format!("private{}", NEXT.fetch_add(1, Ordering::Relaxed));
    TestCluster::start(&label, true)
        .unwrap_or_else(|reason| panic!("no private test cluster: {reason}"))
}

impl TestCluster {
    /// A new client for this cluster, as the admin (`system:masters`). Must be called inside
    /// a tokio runtime; make one per test, since a client's connections belong to the runtime
    /// that made it and every `#[tokio::test]` has its own.
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone())
            .expect("building a kube client from the test kubeconfig")
    }

    /// The admin client configuration.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// `DIR/bin`, holding kubectl and etcdctl of matching versions (harness clusters only).
    pub fn bin_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.join("bin"))
    }

    /// Stops and starts one component (`apiserver`, `etcd` or `calico-etcd`) with the same
    /// data and ports. Only for clusters this process started.
    pub fn restart(&self, component: &str) -> Result<(), String> {
        let dir = self
            .dir
            .as_ref()
            .ok_or("an external cluster cannot be restarted")?;
        run_script(&["restart".as_ref(), dir.as_os_str(), component.as_ref()]).map(|_| ())
    }

    /// Compacts the API server's etcd at its current revision: every older resourceVersion is
    /// gone, so a watch resumed from one gets 410 Gone. Only for clusters this process started.
    pub fn compact_etcd(&self) -> Result<u64, String> {
        let etcdctl = self.bin_dir().ok_or("an external cluster has no etcdctl")?.join("etcdctl");
        let endpoints = self.etcd_endpoints.clone().ok_or("an external cluster's etcd is not reachable")?;
        let run = |args: &[&str]| -> Result<Vec<u8>, String> {
            let out = Command::new(&etcdctl).arg("--endpoints").arg(&endpoints).args(args).output().map_err(|e| format!("running etcdctl: {e}"))?;
            if out.status.success() { Ok(out.stdout) } else { Err(format!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr))) }
        };
        let status: serde_json::Value = serde_json::from_slice(&run(&["endpoint", "status", "-w", "json"])?).map_err(|e| format!("etcdctl JSON: {e}"))?;
        let revision = status[0]["Status"]["header"]["revision"].as_u64().ok_or("etcdctl endpoint status without a revision")?;
        run(&["compact", &revision.to_string()])?;
        Ok(revision)
    }

    /// Creates a uniquely named namespace and its `default` ServiceAccount (which no
    /// controller-manager will create here), and returns the namespace name.
    pub async fn namespace_with_default_service_account(
        &self,
        client: &Client,
        prefix: &str,
    ) -> String {
        let name = unique_name(prefix);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("creating a test namespace");
        create_service_account(client, &name, "default").await;
        name
    }

    /// A client authenticated as ServiceAccount `namespace/name` with a token minted through
    /// the TokenRequest API; the cluster's RBAC decides what it may do.
    pub async fn client_for_service_account(&self, namespace: &str, name: &str) -> Client {
        let token = self.service_account_token(namespace, name).await;
        let mut config = self.config.clone();
        // Only the token: no client certificate may ride along from the admin identity.
        config.auth_info =
            serde_json::from_value::<AuthInfo>(json!({ "token": token })).expect("token AuthInfo");
        Client::try_from(config).expect("building a kube client with a ServiceAccount token")
    }

    /// A kubeconfig file at `path` for ServiceAccount `namespace/name` (a minted token, no
    /// client certificate), for running the controller binary as that account.
    pub async fn kubeconfig_for_service_account(&self, namespace: &str, name: &str, path: &Path) {
        let token = self.service_account_token(namespace, name).await;
        let admin = std::fs::read_to_string(&self.kubeconfig).expect("reading the admin kubeconfig");
        let field = |key: &str| {
            admin
                .lines()
                .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("{key} missing from the admin kubeconfig"))
        };
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": field("server:"), "certificate-authority-data": field("certificate-authority-data:")}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name}}],
            "current-context": "test",
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config).unwrap()).expect("writing a kubeconfig");
    }

    async fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|error| panic!("minting a token for {namespace}/{name}: {error}"))
            .status
            .expect("TokenRequest response without status")
            .token
            .expect("TokenRequest status without token")
    }

    fn start(label: &str, stop_on_drop: bool) -> Result<TestCluster, String> {
        let root = clusters_root();
        remove_stale_cluster_dirs(&root);
        let dir = root.join(format!("{}-{label}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("clearing {}: {e}", dir.display()))?;
        }
        let began = Instant::now();
        let owner = std::process::id().to_string();
        let stdout = run_script(&[
            "start".as_ref(),
            dir.as_os_str(),
            "--owner-pid".as_ref(),
            owner.as_ref(),
        ])?;
        let mut lines = stdout.lines();
        let (Some(kubeconfig), Some(etcd_endpoints_file)) = (lines.next(), lines.next()) else {
            return Err(format!(
                "test-cluster.sh start printed {stdout:?}, expected two paths"
            ));
        };
        eprintln!(
            "test cluster {label} started in {:.1} s: {}",
            began.elapsed().as_secs_f64(),
            dir.display()
        );
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let calico = dir.join("calico-etcd");
        Ok(TestCluster {
            config: config_from_kubeconfig(Path::new(kubeconfig))?,
            kubeconfig: PathBuf::from(kubeconfig),
            etcd_endpoints: Some(read(Path::new(etcd_endpoints_file))?),
            calico_etcd: Some(CalicoEtcd {
                endpoints: read(&calico.join("endpoints"))?,
                ca_cert: calico.join("ca.crt"),
                client_cert: calico.join("client.crt"),
                client_key: calico.join("client.key"),
            }),
            dir: Some(dir),
            stop_on_drop,
        })
    }

    fn external(kubeconfig: PathBuf) -> Result<TestCluster, String> {
        let config = config_from_kubeconfig(&kubeconfig)?;
        check_marker(config.clone()).map_err(|reason| {
            format!(
                "{EXTERNAL_KUBECONFIG_VAR}={} is not a harness cluster: {reason}",
                kubeconfig.display()
            )
        })?;
        Ok(TestCluster {
            dir: None,
            kubeconfig,
            etcd_endpoints: None,
            calico_etcd: None,
            config,
            stop_on_drop: false,
        })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let (true, Some(dir)) = (self.stop_on_drop, &self.dir) else {
            return;
        };
        if let Err(reason) = run_script(&["stop".as_ref(), dir.as_os_str()]) {
            eprintln!("stopping test cluster {}: {reason}", dir.display());
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "test failed; cluster logs kept in {}",
                dir.join("logs").display()
            );
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A name no other test (or earlier run against the same external cluster) uses: valid as a
/// DNS-1123 label when `prefix` is (lowercase, digits, `-`; keep it under 40 characters).
pub fn unique_name(prefix: &str) -> String {
    static RUN: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let run = RUN.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff
    });
    format!(
        "{prefix}-{run:06x}-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A small integer unique within this test process, for carving non-overlapping CIDRs.
pub fn unique_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub async fn create_service_account(
    client: &Client,
    namespace: &str,
    name: &str,
) -> ServiceAccount {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap_or_else(|error| panic!("creating ServiceAccount {namespace}/{name}: {error}"))
}

/// Writes what a kubelet would: phase Running and the pod's IPs, through the `/status`
/// subresource (a plain update of a pod ignores status).
pub async fn set_pod_ips(pods: &Api<Pod>, name: &str, ips: &[&str]) -> Pod {
    let status = json!({
        "status": {
            "phase": "Running",
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>(),
        }
    });
    set_pod_status(pods, name, status).await
}

/// Merge-patches `/status` of a pod with `patch` (an object with a `status` key).
pub async fn set_pod_status(pods: &Api<Pod>, name: &str, patch: serde_json::Value) -> Pod {
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|error| panic!("patching status of pod {name}: {error}"))
}

fn config_from_kubeconfig(path: &Path) -> Result<Config, String> {
    let kubeconfig =
        Kubeconfig::read_from(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    // Config::from_custom_kubeconfig is async only in signature (it may run exec plugins,
    // which our kubeconfigs never use); drive it on a private runtime on another thread so
    // this works from inside a test's runtime too.
    let mut config = on_private_runtime(async move {
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())
    })?
    .map_err(|e| format!("loading {}: {e}", path.display()))?;
    config.connect_timeout = Some(Duration::from_secs(10));
    Ok(config)
}

fn check_marker(config: Config) -> Result<(), String> {
    on_private_runtime(async move {
        let client = Client::try_from(config).map_err(|e| e.to_string())?;
        let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client, MARKER_NAMESPACE);
        match maps.get_opt(MARKER_NAME).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(format!(
                "ConfigMap {MARKER_NAMESPACE}/{MARKER_NAME} is missing"
            )),
            Err(error) => Err(format!(
                "cannot read ConfigMap {MARKER_NAMESPACE}/{MARKER_NAME}: {error}"
            )),
        }
    })?
}

fn on_private_runtime<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(runtime.block_on(work))
    })
    .join()
    .map_err(|_| "helper thread panicked".to_owned())?
}

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-cluster.sh")
}

fn clusters_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-clusters")
}

/// Runs the harness script; Ok(stdout) or Err(its one-line reason from stderr).
fn run_script(args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let output = Command::new("bash")
        .arg(script_path())
        .args(args)
        .output()
        .map_err(|e| format!("running {}: {e}", script_path().display()))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no message");
    Err(format!(
        "test-cluster.sh {:?} failed ({}): {reason}",
        args, output.status
    ))
}

/// Directories `<pid>-<label>` left by earlier test processes that are gone: stop whatever
/// may still run there (normally the watchdog already did) and delete them, since each one
/// holds two etcd data directories.
fn remove_stale_cluster_dirs(root: &Path) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if run_script(&["stop".as_ref(), entry.path().as_os_str()]).is_ok() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}
