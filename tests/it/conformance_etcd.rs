//! The etcd v3 backend against real etcd: the shared conformance suite (CAS, soft-delete and
//! watch laws) on the harness's TLS Calico etcd with client certificates, Calico's keys and value
//! shapes as etcdctl sees them, member failover, and the clear errors for a wrong CA, an
//! unreachable member and wrong credentials (a private etcd with authentication enabled).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calico_kube_controllers::config::{EnvConfig, EtcdConfig};
use calico_kube_controllers::datastore::conformance::{Options, run_all, run_watch};
use calico_kube_controllers::datastore::etcd::EtcdDatastore;
use calico_kube_controllers::datastore::{CalicoNodeView, Datastore, DsResult, ErrorKind, ExecuteOptions, GoneProof, Kind, Precondition, Stored, WatchEvent, WatchStream, execute_plan};
use calico_kube_controllers::ipam::plan::{BlockRelease, LeakReason, Plan, ReleaseItem};
use calico_kube_controllers::model::names::{cidr_to_name, ordinal_to_ip};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::cluster::{TestCluster, shared_cluster, unique_name};

/// The etcd settings through the same parser `run` uses.
fn etcd_config(vars: &[(&str, &str)]) -> EtcdConfig {
    let env: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut env = EnvConfig::from_env(&env).expect("valid etcd settings");
    env.etcd.take().expect("etcd settings")
}

fn harness(cluster: &TestCluster) -> (String, String, String, String) {
    let etcd = cluster.calico_etcd.as_ref().expect("a harness cluster with Calico's etcd");
    let s = |p: &Path| p.display().to_string();
    (etcd.endpoints.clone(), s(&etcd.ca_cert), s(&etcd.client_cert), s(&etcd.client_key))
}

fn tls_config(cluster: &TestCluster) -> EtcdConfig {
    let (endpoints, ca, cert, key) = harness(cluster);
    etcd_config(&[("DATASTORE_TYPE", "etcdv3"), ("ETCD_ENDPOINTS", &endpoints), ("ETCD_CA_CERT_FILE", &ca), ("ETCD_CERT_FILE", &cert), ("ETCD_KEY_FILE", &key)])
}

fn etcd_options(label: &str) -> Options {
    Options { prefix: format!("{}-", unique_name(label)), unknown_spec_fields: true, ipam_metadata: false, calico_names: true }
}

/// `etcdctl get KEY --print-value-only` on the harness's Calico etcd.
fn etcdctl_get(cluster: &TestCluster, key: &str) -> String {
    let (endpoints, ca, cert, key_file) = harness(cluster);
    let etcdctl = cluster.bin_dir().expect("harness bin dir").join("etcdctl");
    let out = Command::new(etcdctl)
        .args(["--endpoints", &endpoints, "--cacert", &ca, "--cert", &cert, "--key", &key_file, "get", key, "--print-value-only"])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl runs");
    assert!(out.status.success(), "etcdctl get {key}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `etcdctl put KEY VALUE` on the harness's Calico etcd.
fn etcdctl_put(cluster: &TestCluster, key: &str, value: &str) {
    let (endpoints, ca, cert, key_file) = harness(cluster);
    let etcdctl = cluster.bin_dir().expect("harness bin dir").join("etcdctl");
    let out = Command::new(etcdctl)
        .args(["--endpoints", &endpoints, "--cacert", &ca, "--cert", &cert, "--key", &key_file, "put", key, value])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl runs");
    assert!(out.status.success(), "etcdctl put {key}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The node proof on etcd reads the Calico Node as calico/node writes it: its `k8s` orchRef
/// names the Kubernetes Node to read; without one the node is never taken as deleted.
#[tokio::test]
async fn etcd_calico_nodes_name_the_kubernetes_node_that_proves_them_gone() {
    let cluster = shared_cluster();
    let ds = EtcdDatastore::connect(&tls_config(cluster)).await.expect("connects");
    let prefix = "/calico/resources/v3/projectcalico.org/nodes/";
    let mapped = r#"{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"cn-mapped"},"spec":{"orchRefs":[{"orchestrator":"k8s","nodeName":"worker-1.example"}]}}"#;
    let bare = r#"{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"cn-bare"},"spec":{}}"#;
    etcdctl_put(cluster, &format!("{prefix}cn-mapped"), mapped);
    etcdctl_put(cluster, &format!("{prefix}cn-bare"), bare);
    let mapped = ds.calico_node("cn-mapped").await.expect("read");
    assert_eq!(mapped, CalicoNodeView::Present { k8s_node: Some("worker-1.example".into()) });
    assert_eq!(mapped.proof("cn-mapped"), GoneProof::KubernetesNode("worker-1.example".into()));
    let bare = ds.calico_node("cn-bare").await.expect("read");
    assert_eq!(bare.proof("cn-bare"), GoneProof::Never, "no Kubernetes orchestrator reference: never proven gone");
    let missing = ds.calico_node("cn-missing").await.expect("read");
    assert_eq!(missing, CalicoNodeView::Missing);
    assert_eq!(missing.proof("cn-missing"), GoneProof::CalicoNodeMissing, "no Calico Node: gone (SPEC §9.3)");
    assert!(ds.calico_node("a/b").await.is_err(), "a name that is no key segment is refused");
}

#[tokio::test]
async fn etcd_datastore_keeps_the_cas_and_soft_delete_laws_on_tls_etcd() {
    let cluster = shared_cluster();
    let ds = EtcdDatastore::connect(&tls_config(cluster)).await.expect("connects to Calico's TLS etcd with the harness's client certificate");
    let laws = tokio::time::timeout(Duration::from_secs(60), run_all(&ds, &etcd_options("etcdconf"))).await.expect("the laws finished within 60s");
    laws.unwrap_or_else(|law| panic!("EtcdDatastore broke a law: {law}"));
}

#[tokio::test]
async fn etcd_datastore_watches_keep_the_watch_laws() {
    let cluster = shared_cluster();
    let ds = EtcdDatastore::connect(&tls_config(cluster)).await.expect("connects");
    // The suite has no clock: a watch that never delivers its event would wait forever.
    let laws = tokio::time::timeout(Duration::from_secs(60), run_watch(&ds, &etcd_options("etcdwatch"))).await.expect("the watch laws finished within 60s");
    laws.unwrap_or_else(|law| panic!("EtcdDatastore's watch broke a law: {law}"));
}

#[tokio::test]
async fn objects_land_under_calicos_keys_in_libcalicos_shapes() {
    let cluster = shared_cluster();
    let ds = EtcdDatastore::connect(&tls_config(cluster)).await.expect("connects");
    let node = unique_name("etcdnode");
    let handle = format!("k8s-pod-network.{}", unique_name("c"));
    let block = json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-251-7-0-30"},
        "spec": {"cidr": "10.251.7.0/30", "affinity": format!("host:{node}"), "affinityClaimTime": "2026-01-02T03:04:05Z", "strictAffinity": false,
                 "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                 "attributes": [{"handle_id": handle, "secondary": {"node": node, "namespace": "ns", "pod": "p"}}],
                 "sequenceNumber": 1, "sequenceNumberForAllocation": {"0": 1}, "deleted": false}
    });
    let aff_name = format!("{node}-10-251-7-0-30");
    let affinity = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity", "metadata": {"name": aff_name},
                          "spec": {"state": "confirmed", "node": node, "cidr": "10.251.7.0/30", "deleted": "false"}});
    let handle_body = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": handle},
                             "spec": {"handleID": handle, "block": {"10.251.7.0/30": 1}, "deleted": false}});
    // A leftover of an earlier run of this test would make the creates fail.
    if let Ok(old) = ds.get(Kind::IpamBlock, "10-251-7-0-30").await {
        ds.delete(Kind::IpamBlock, "10-251-7-0-30", &old.exact()).await.expect("clear the old block");
    }
    let b = ds.create(Kind::IpamBlock, "10-251-7-0-30", block).await.expect("create block");
    let a = ds.create(Kind::BlockAffinity, &aff_name, affinity).await.expect("create affinity");
    let h = ds.create(Kind::IpamHandle, &handle, handle_body).await.expect("create handle");

    let raw: Value = serde_json::from_str(&etcdctl_get(cluster, "/calico/ipam/v2/assignment/ipv4/block/10.251.7.0-30")).expect("the block value is JSON");
    assert_eq!(raw["cidr"], "10.251.7.0/30");
    assert_eq!(raw["affinity_claim_time"], "2026-01-02T03:04:05Z");
    assert_eq!(raw["attributes"][0]["handle_id"], json!(handle));
    assert!(raw.get("strictAffinity").is_none() && raw.get("metadata").is_none(), "{raw}");
    let raw: Value = serde_json::from_str(&etcdctl_get(cluster, &format!("/calico/ipam/v2/host/{node}/ipv4/block/10.251.7.0-30"))).unwrap();
    assert_eq!(raw, json!({"state": "confirmed", "deleted": false}));
    let raw: Value = serde_json::from_str(&etcdctl_get(cluster, &format!("/calico/ipam/v2/handle/{handle}"))).unwrap();
    assert_eq!(raw, json!({"block": {"10.251.7.0/30": 1}, "deleted": false}));

    // Read back through the seam in the KDD shape the GC decodes.
    let got: calico_kube_controllers::model::BlockAffinity = ds.get(Kind::BlockAffinity, &aff_name).await.unwrap().decode().unwrap();
    assert_eq!((got.spec.node.as_str(), got.spec.cidr.as_str()), (node.as_str(), "10.251.7.0/30"));
    let listed = ds.list(Kind::IpamBlock).await.unwrap();
    assert!(listed.iter().any(|s| s.name == "10-251-7-0-30" && s.revision == b.revision), "{listed:?}");

    ds.soft_delete(Kind::IpamHandle, &h).await.expect("delete handle");
    ds.soft_delete(Kind::BlockAffinity, &a).await.expect("delete affinity");
    ds.soft_delete(Kind::IpamBlock, &b).await.expect("delete block");
    assert_eq!(etcdctl_get(cluster, &format!("/calico/ipam/v2/handle/{handle}")), "", "gone from etcd");
}

#[tokio::test]
async fn a_dead_member_is_skipped_for_the_next_one() {
    let cluster = shared_cluster();
    let (endpoints, ca, cert, key) = harness(cluster);
    let both = format!("https://127.0.0.1:1,{endpoints}");
    let cfg = etcd_config(&[("ETCD_ENDPOINTS", &both), ("ETCD_CA_CERT_FILE", &ca), ("ETCD_CERT_FILE", &cert), ("ETCD_KEY_FILE", &key)]);
    let ds = EtcdDatastore::connect(&cfg).await.expect("the second member answers");
    let err = ds.get(Kind::IpamHandle, &unique_name("nothing")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn an_unreachable_member_is_a_transient_error_naming_etcd_endpoints_not_a_hang() {
    let cluster = shared_cluster();
    let (_, ca, cert, key) = harness(cluster);
    let cfg = etcd_config(&[("CALICO_ETCD_ENDPOINTS", "https://127.0.0.1:1"), ("ETCD_CA_CERT_FILE", &ca), ("ETCD_CERT_FILE", &cert), ("ETCD_KEY_FILE", &key)]);
    let began = Instant::now();
    let err = EtcdDatastore::connect(&cfg).await.err().expect("nothing listens on port 1");
    assert!(began.elapsed() < Duration::from_secs(10), "took {:?}", began.elapsed());
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(err.message.contains("CALICO_ETCD_ENDPOINTS") && err.message.contains("127.0.0.1:1"), "{err}");
}

#[tokio::test]
async fn a_wrong_ca_is_refused_naming_the_ca_setting() {
    let cluster = shared_cluster();
    let (endpoints, _, cert, key) = harness(cluster);
    // The Kubernetes CA of the harness: a real CA, but not the one that signed Calico's etcd.
    let other_ca = cluster.dir.as_ref().expect("harness dir").join("pki/ca.crt").display().to_string();
    let cfg = etcd_config(&[("ETCD_ENDPOINTS", &endpoints), ("ETCD_CA_CERT_FILE", &other_ca), ("ETCD_CERT_FILE", &cert), ("ETCD_KEY_FILE", &key)]);
    let err = EtcdDatastore::connect(&cfg).await.err().expect("the server certificate does not verify");
    assert!(err.message.contains("TLS") && err.message.contains("ETCD_CA_CERT_FILE"), "{err}");
    assert!(err.message.to_ascii_lowercase().contains("certificate"), "{err}");

    let missing = etcd_config(&[("ETCD_ENDPOINTS", &endpoints), ("ETCD_CA_CERT_FILE", "/nonexistent/ca.pem")]);
    let err = EtcdDatastore::new(&missing).err().expect("no such file");
    assert!(err.message.starts_with("ETCD_CA_CERT_FILE=/nonexistent/ca.pem"), "{err}");
    let not_pem = etcd_config(&[("ETCD_ENDPOINTS", &endpoints), ("ETCD_CA_CERT_FILE", &key)]);
    let err = EtcdDatastore::new(&not_pem).err().expect("a key is no certificate");
    assert!(err.message.contains("ETCD_CA_CERT_FILE") && err.message.contains("no PEM certificate"), "{err}");
    let swapped = etcd_config(&[("ETCD_ENDPOINTS", &endpoints), ("ETCD_CERT_FILE", &cert), ("ETCD_KEY_FILE", &cert)]);
    let err = EtcdDatastore::new(&swapped).err().expect("a certificate is no key");
    assert!(err.message.contains("ETCD_KEY_FILE"), "{err}");
}

/// A private plain-HTTP etcd of this test (tests that enable authentication, compact or restart
/// it must not share the harness's), stopped and its directory removed when dropped.
struct PrivateEtcd {
    child: Option<Child>,
    extra: Vec<String>,
    endpoint: String,
    peer_url: String,
    binary: PathBuf,
    etcdctl: PathBuf,
    dir: PathBuf,
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn etcd_binary(cluster: &TestCluster) -> PathBuf {
    let in_dir = cluster.bin_dir().map(|d| d.join("etcd")).filter(|p| p.exists());
    in_dir
        .or_else(|| {
            let cache = PathBuf::from(std::env::var_os("HOME")?).join(".cache/calico-kube-controllers");
            std::fs::read_dir(cache).ok()?.flatten().map(|e| e.path().join("etcd")).find(|p| p.exists())
        })
        .expect("the harness's etcd binary")
}

impl PrivateEtcd {
    fn start(cluster: &TestCluster) -> PrivateEtcd {
        Self::start_with(cluster, &[])
    }

    fn start_with(cluster: &TestCluster, extra: &[&str]) -> PrivateEtcd {
        let dir = std::env::temp_dir().join(unique_name("ckc-private-etcd"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = PrivateEtcd {
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            endpoint: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            binary: etcd_binary(cluster),
            etcdctl: cluster.bin_dir().expect("harness bin dir").join("etcdctl"),
            dir,
        };
        etcd.launch();
        etcd
    }

    /// Starts (again) on the same data and ports, and waits until it is healthy.
    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log")).unwrap();
        let child = Command::new(&self.binary)
            .args(["--name", "private", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.endpoint, "--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &self.peer_url, "--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("private={}", self.peer_url)])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ctl(&["endpoint", "health"]).status.success() {
            assert!(Instant::now() < deadline, "the private etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.etcdctl).args(["--endpoints", &self.endpoint]).args(args).output().expect("etcdctl runs")
    }

    fn ctl_ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn start_auth_etcd(cluster: &TestCluster, password: &str) -> PrivateEtcd {
    // Tokens that expire after a second idle, so the renewal is exercised.
    let etcd = PrivateEtcd::start_with(cluster, &["--auth-token", "simple", "--auth-token-ttl", "1"]);
    etcd.ctl_ok(&["user", "add", "root", "--new-user-password", password]);
    etcd.ctl_ok(&["auth", "enable"]);
    etcd
}

fn handle(name: &str) -> Value {
    json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": name},
           "spec": {"handleID": name, "block": {"10.253.0.0/30": 1}, "deleted": false}})
}

/// The names in the next complete (re)list of `stream`, and the events before it.
async fn next_list(stream: &mut calico_kube_controllers::datastore::WatchStream) -> (Vec<String>, Vec<WatchEvent>) {
    let mut before = Vec::new();
    let mut names: Option<Vec<String>> = None;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("an event within 30s").expect("the stream goes on");
        match (&mut names, event) {
            (_, WatchEvent::Init) => names = Some(Vec::new()),
            (Some(n), WatchEvent::InitApply(s)) => n.push(s.name),
            (Some(_), WatchEvent::InitDone) => return (names.unwrap_or_default(), before),
            (_, other) => before.push(other),
        }
    }
}

#[tokio::test]
async fn a_watch_that_resumes_past_a_compaction_relists_and_drops_what_is_gone() {
    let cluster = shared_cluster();
    let etcd = PrivateEtcd::start(cluster);
    let ds = EtcdDatastore::connect(&etcd_config(&[("ETCD_ENDPOINTS", &etcd.endpoint)])).await.expect("connects");
    ds.create(Kind::IpamHandle, "kept", handle("kept")).await.unwrap();
    let gone = ds.create(Kind::IpamHandle, "gone", handle("gone")).await.unwrap();
    let mut stream = ds.watch(Kind::IpamHandle);
    let (mut first, _) = next_list(&mut stream).await;
    first.sort();
    assert_eq!(first, ["gone", "kept"]);
    // The stream is not polled: its watch opens only now, from the revision after its list,
    // which the compaction below removes from etcd's history.
    ds.delete(Kind::IpamHandle, "gone", &gone.exact()).await.unwrap();
    let new = ds.create(Kind::IpamHandle, "new", handle("new")).await.unwrap();
    etcd.ctl_ok(&["compact", &new.revision]);
    let (mut relisted, before) = next_list(&mut stream).await;
    relisted.sort();
    assert_eq!(relisted, ["kept", "new"], "the relist is the truth: gone is gone");
    assert!(before.iter().any(|e| matches!(e, WatchEvent::Error(f) if f.refused.is_none() && f.message.contains("compacted"))), "{before:?}");
}

#[tokio::test]
async fn a_watch_resumes_after_an_etcd_restart_from_its_last_revision_without_a_relist() {
    let cluster = shared_cluster();
    let mut etcd = PrivateEtcd::start(cluster);
    let ds = EtcdDatastore::connect(&etcd_config(&[("ETCD_ENDPOINTS", &etcd.endpoint)])).await.expect("connects");
    ds.create(Kind::IpamHandle, "before", handle("before")).await.unwrap();
    let mut stream = ds.watch(Kind::IpamHandle);
    let (first, _) = next_list(&mut stream).await;
    assert_eq!(first, ["before"]);
    // Let the watch open (etcd says so: Resumed), then take etcd away under it.
    let opened = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("the watch opens").expect("the stream goes on");
    assert!(matches!(opened, WatchEvent::Resumed), "{opened:?}");
    assert!(tokio::time::timeout(Duration::from_millis(700), stream.next()).await.is_err(), "nothing happened yet");
    etcd.stop();
    let err = ds.get(Kind::IpamHandle, "before").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    etcd.launch();
    let after = ds.create(Kind::IpamHandle, "after", handle("after")).await.expect("etcd is back");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no Apply of after within 30s: {seen:?}");
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("an event").expect("the stream goes on");
        match event {
            WatchEvent::Apply(s) if s.name == "after" => {
                assert_eq!(s.revision, after.revision);
                break;
            }
            other => seen.push(other),
        }
    }
    assert!(seen.iter().all(|e| matches!(e, WatchEvent::Resumed) || matches!(e, WatchEvent::Error(f) if f.refused.is_none())), "only routine errors, no relist: {seen:?}");
    // After the failures, the re-established watch says so before any change arrives: a quiet
    // kind (nothing written after the restart) is healthy again too.
    let last_error = seen.iter().rposition(|e| matches!(e, WatchEvent::Error(_))).expect("the restart was seen");
    assert!(matches!(seen.get(last_error + 1), Some(WatchEvent::Resumed)), "{seen:?}");
}

#[tokio::test]
async fn credentials_are_used_and_wrong_ones_are_refused_naming_the_settings() {
    let cluster = shared_cluster();
    let etcd = start_auth_etcd(cluster, "right-password");
    let endpoint = etcd.endpoint.as_str();

    let good = etcd_config(&[("ETCD_ENDPOINTS", endpoint), ("ETCD_USERNAME", "root"), ("ETCD_PASSWORD", "right-password")]);
    let ds = EtcdDatastore::connect(&good).await.expect("the right password works");
    let name = unique_name("auth-handle");
    let body = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": name},
                      "spec": {"handleID": name, "block": {"10.252.0.0/30": 1}, "deleted": false}});
    let created = ds.create(Kind::IpamHandle, &name, body).await.expect("create with a token");
    assert_eq!(ds.get(Kind::IpamHandle, &name).await.expect("get with a token").revision, created.revision);
    // The token expires: the next call is refused once, renews it and goes through.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(ds.get(Kind::IpamHandle, &name).await.expect("get after the token expired").revision, created.revision);
    let mut stream = ds.watch(Kind::IpamHandle);
    let (listed, _) = next_list(&mut stream).await;
    assert_eq!(listed, std::slice::from_ref(&name), "a watch with a renewed token");

    let wrong = etcd_config(&[("ETCD_ENDPOINTS", endpoint), ("CALICO_ETCD_USERNAME", "root"), ("ETCD_PASSWORD", "wrong-password")]);
    let err = EtcdDatastore::connect(&wrong).await.err().expect("the wrong password is refused");
    assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
    assert!(err.message.contains("CALICO_ETCD_USERNAME=root") && err.message.contains("ETCD_PASSWORD"), "{err}");
    assert!(!err.message.contains("wrong-password"), "the password is never shown: {err}");

    let none = etcd_config(&[("ETCD_ENDPOINTS", endpoint)]);
    let err = EtcdDatastore::connect(&none).await.err().expect("etcd wants a user");
    assert!(err.message.contains("ETCD_USERNAME") && err.message.contains("ETCD_PASSWORD"), "{err}");
}

#[tokio::test]
async fn lists_and_watches_page_through_more_keys_than_one_range_returns() {
    let cluster = shared_cluster();
    let etcd = PrivateEtcd::start(cluster);
    let ds = EtcdDatastore::connect(&etcd_config(&[("ETCD_ENDPOINTS", &etcd.endpoint)])).await.expect("connects");
    const N: usize = 1234; // more than two pages of 500
    let began = Instant::now();
    let creates = futures::stream::iter(0..N).map(|i| {
        let ds = ds.clone();
        async move {
            let name = format!("k8s-pod-network.page-{i:05}");
            ds.create(Kind::IpamHandle, &name, handle(&name)).await.map(|_| ())
        }
    });
    let results: Vec<_> = creates.buffer_unordered(16).collect().await;
    assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
    eprintln!("{N} creates in {:.2} s (16 in flight)", began.elapsed().as_secs_f64());
    // Keys around the handles that are no handles must not show up.
    etcd.ctl_ok(&["put", "/calico/ipam/v2/handlez", "{}"]);
    etcd.ctl_ok(&["put", "/calico/ipam/v2/host/n1", ""]);
    let began = Instant::now();
    let listed = ds.list(Kind::IpamHandle).await.expect("list");
    eprintln!("list of {} handles in {:.3} s", listed.len(), began.elapsed().as_secs_f64());
    assert_eq!(listed.len(), N);
    let mut names: Vec<_> = listed.iter().map(|s| s.name.clone()).collect();
    names.dedup();
    assert_eq!(names.len(), N, "no key twice across pages");
    // The watch hands its relist over a page at a time. A handle created once the first objects
    // are out (its key after every listed one, so a later page would meet it) is not in the
    // relist, which reads at one revision across its pages: it follows as a change.
    let mut stream = ds.watch(Kind::IpamHandle);
    let mut next = async || tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("an event within 30s").expect("the stream goes on");
    assert!(matches!(next().await, WatchEvent::Init));
    let mut watched = Vec::new();
    while watched.len() < 10 {
        match next().await {
            WatchEvent::InitApply(s) => watched.push(s.name),
            other => panic!("{other:?} in the relist"),
        }
    }
    let late = "k8s-pod-network.zz-late";
    ds.create(Kind::IpamHandle, late, handle(late)).await.unwrap();
    loop {
        match next().await {
            WatchEvent::InitApply(s) => watched.push(s.name),
            WatchEvent::InitDone => break,
            other => panic!("{other:?} in the relist"),
        }
    }
    assert_eq!(watched.len(), N, "every handle of the revision the relist began at, and no other");
    assert!(!watched.iter().any(|n| n == late));
    loop {
        match next().await {
            // The watch says it is (re)established before its first change.
            WatchEvent::Resumed => {}
            WatchEvent::Apply(s) => break assert_eq!(s.name, late),
            other => panic!("{other:?} instead of the late handle"),
        }
    }
    assert!(ds.list(Kind::BlockAffinity).await.expect("list affinities").is_empty(), "a host marker is no affinity");
}

/// A second writer that reallocates ordinal 0 of the block (what the CNI does when a pod is
/// deleted and another takes its address) just before the first update of that block reaches
/// etcd: the release then loses the compare-and-swap.
struct RacingWriter {
    inner: EtcdDatastore,
    block: String,
    raced: std::sync::atomic::AtomicBool,
}

fn reallocate_ordinal_zero(spec: &mut Value) {
    let attrs = spec["attributes"].as_array_mut().unwrap();
    attrs.push(json!({"handle_id": "h-new", "secondary": {"namespace": "default", "pod": "new", "node": "node1"}}));
    spec["allocations"][0] = json!(attrs.len() - 1);
    spec["sequenceNumber"] = json!(101);
    spec["sequenceNumberForAllocation"]["0"] = json!(101);
}

impl Datastore for RacingWriter {
    async fn get(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        self.inner.get(kind, name).await
    }
    async fn list(&self, kind: Kind) -> DsResult<Vec<Stored>> {
        self.inner.list(kind).await
    }
    async fn create(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        self.inner.create(kind, name, value).await
    }
    async fn update(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        if kind == Kind::IpamBlock && object.name == self.block && !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut theirs = self.inner.get(kind, &object.name).await.expect("the racer reads the block");
            reallocate_ordinal_zero(&mut theirs.value["spec"]);
            self.inner.update(kind, &theirs).await.expect("the racer's write lands first");
        }
        self.inner.update(kind, object).await
    }
    async fn update_status(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        self.inner.update_status(kind, object).await
    }
    async fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        self.inner.delete(kind, name, precondition).await
    }
    async fn soft_delete(&self, kind: Kind, object: &Stored) -> DsResult<()> {
        self.inner.soft_delete(kind, object).await
    }
    fn watch(&self, kind: Kind) -> WatchStream {
        self.inner.watch(kind)
    }
}

/// SPEC §5.7 on etcd: a release planned on ordinals 0 and 1 whose block another writer changes
/// between our read and our compare-and-swap re-reads the block and frees only what is still
/// the planned allocation: the reallocated ordinal 0 and its new owner are untouched.
#[tokio::test]
async fn a_writer_racing_a_release_on_etcd_loses_nothing() {
    let cluster = shared_cluster();
    let ds = EtcdDatastore::connect(&tls_config(cluster)).await.expect("connects");
    let n = crate::support::cluster::unique_number() % 250;
    let cidr: ipnet::IpNet = format!("10.253.{n}.0/29").parse().unwrap();
    let name = cidr_to_name(&cidr);
    if let Ok(old) = ds.get(Kind::IpamBlock, &name).await {
        ds.delete(Kind::IpamBlock, &name, &old.exact()).await.expect("clear an earlier run's block");
    }
    let (ha, hb) = (unique_name("race-a"), unique_name("race-b"));
    let block = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": name},
        "spec": {"cidr": cidr.to_string(), "affinity": "host:node1", "strictAffinity": false,
                 "allocations": [0, 1, null, null, null, null, null, null], "unallocated": [2, 3, 4, 5, 6, 7],
                 "attributes": [{"handle_id": ha, "secondary": {"namespace": "default", "pod": "a", "node": "node1"}},
                                {"handle_id": hb, "secondary": {"namespace": "default", "pod": "b", "node": "node1"}}],
                 "sequenceNumber": 100, "sequenceNumberForAllocation": {"0": 10, "1": 11}, "deleted": false}});
    ds.create(Kind::IpamBlock, &name, block).await.expect("block");
    for h in [&ha, &hb] {
        let handle = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": h},
            "spec": {"handleID": h, "block": {cidr.to_string(): 1}, "deleted": false}});
        ds.create(Kind::IpamHandle, h, handle).await.expect("handle");
    }
    let item = |ordinal: u32, handle: &str, sequence: u64| ReleaseItem { ordinal, ip: ordinal_to_ip(&cidr, ordinal), handle: handle.to_string(), sequence, reason: LeakReason::PodNotFound };
    let plan = Plan { releases: vec![BlockRelease { cidr, block_name: name.clone(), revision: String::new(), items: vec![item(0, &ha, 10), item(1, &hb, 11)] }], ..Plan::default() };
    let racer = RacingWriter { inner: ds.clone(), block: name.clone(), raced: Default::default() };
    let out = execute_plan(&racer, &plan, 1_000_000, 0, &ExecuteOptions::default()).await;
    assert!(out.conflicts >= 1, "the release lost the compare-and-swap to the racer: {out:?}");
    assert_eq!(out.released, vec![(cidr, 1)], "{out:?}");
    assert_eq!(out.stale, vec![(cidr, 0)], "the reallocated ordinal is reported, not released");
    assert_eq!(out.error_count(), 0, "{:?}", out.failures);
    let after = ds.get(Kind::IpamBlock, &name).await.expect("the block stays");
    let spec = &after.value["spec"];
    let owner = spec["allocations"][0].as_u64().expect("the new pod keeps its address") as usize;
    assert_eq!(spec["attributes"][owner]["handle_id"], "h-new");
    assert!(spec["allocations"][1].is_null(), "b's address is freed");
    assert!(ds.get(Kind::IpamHandle, &hb).await.is_err_and(|e| e.is_not_found()), "b's handle is deleted");
    ds.get(Kind::IpamHandle, &ha).await.expect("a's handle stays: nothing of it was released");
    ds.delete(Kind::IpamBlock, &name, &after.exact()).await.expect("clean up");
    let h = ds.get(Kind::IpamHandle, &ha).await.unwrap();
    ds.delete(Kind::IpamHandle, &ha, &h.exact()).await.expect("clean up");
}

/// A DNS server on loopback for `ETCD_DISCOVERY_SRV`: each query for `_etcd-client-ssl._tcp.*`
/// gets the next answer of `answers` (the last one repeats; none: NXDOMAIN), and the plain
/// `_etcd-client._tcp.*` gets NXDOMAIN.
async fn dns_server(answers: Vec<Vec<(u16, u16, u16, String)>>) -> std::net::SocketAddr {
    use calico_kube_controllers::datastore::dns_srv;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let mut asked = 0;
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let q = &buf[..n];
            let reply = match answers.get(asked.min(answers.len().saturating_sub(1))) {
                Some(records) if q.windows(16).any(|w| w == b"_etcd-client-ssl") => {
                    asked += 1;
                    let records: Vec<(u16, u16, u16, &str)> = records.iter().map(|(p, w, port, t)| (*p, *w, *port, t.as_str())).collect();
                    dns_srv::answer(q, 0x8180, &records)
                }
                _ => dns_srv::answer(q, 0x8183, &[]),
            };
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

#[tokio::test]
async fn members_found_by_dns_srv_discovery_are_used_and_looked_up_again_when_none_answers() {
    let cluster = shared_cluster();
    let (endpoints, ca, cert, key) = harness(cluster);
    let port: u16 = endpoints.rsplit(':').next().unwrap().trim_end_matches('/').parse().expect("the harness's etcd port");
    // First a dead member only; then a dead one and the harness's etcd, by name (its
    // certificate holds localhost).
    let dead = (0, 0, 1, "localhost.".to_string());
    let dns = dns_server(vec![vec![dead.clone()], vec![dead, (10, 0, port, "localhost.".to_string())]]).await;
    let dns = dns.to_string();
    let cfg = etcd_config(&[("DATASTORE_TYPE", "etcdv3"), ("ETCD_DISCOVERY_SRV", "etcd.test"), ("CKC_DNS_SERVER", &dns), ("ETCD_CA_CERT_FILE", &ca), ("ETCD_CERT_FILE", &cert), ("ETCD_KEY_FILE", &key)]);
    let ds = EtcdDatastore::new(&cfg).expect("settings");
    let err = ds.probe().await.expect_err("the only member found is dead");
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(err.message.contains("ETCD_DISCOVERY_SRV") && err.message.contains("localhost:1"), "{err}");
    // No member answered: the next call looks the members up again and finds the live one.
    ds.probe().await.expect("looked up again: the live member answers");
    assert_eq!(ds.get(Kind::IpamHandle, &unique_name("nothing")).await.unwrap_err().kind, ErrorKind::NotFound);

    // No records at all: a clear transient error naming the setting and both names asked.
    let empty = dns_server(Vec::new()).await.to_string();
    let cfg = etcd_config(&[("DATASTORE_TYPE", "etcdv3"), ("CALICO_ETCD_DISCOVERY_SRV", "etcd.test"), ("CKC_DNS_SERVER", &empty), ("ETCD_CA_CERT_FILE", &ca)]);
    let err = EtcdDatastore::connect(&cfg).await.err().expect("nothing to connect to");
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    for part in ["CALICO_ETCD_DISCOVERY_SRV=etcd.test", "_etcd-client-ssl._tcp.etcd.test", "_etcd-client._tcp.etcd.test"] {
        assert!(err.message.contains(part), "{part}: {err}");
    }
}
