//! End-to-end start-up on an empty private cluster: the controller creates
//! `ClusterInformation/default` and the `default` KubeControllersConfiguration (with its status),
//! reports an enabled but unimplemented controller without failing, becomes ready in the status
//! file (`check-status -r`) and over HTTP, and applies KubeControllersConfiguration changes
//! (log level, leak grace period, metrics port) without a restart.

use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::cluster::private_cluster;
use crate::support::controller::{ChildGuard, DEADLINE, calico, free_port, http_get, start_controller_env};

/// Polls `probe` every 200 ms until it returns `Some`, failing after [`DEADLINE`] with `what`.
async fn wait_for<T, F: Future<Output = Option<T>>>(what: &str, guard: &ChildGuard, mut probe: impl FnMut() -> F) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(started.elapsed() < DEADLINE, "{what} not within {DEADLINE:?}; log tail:\n{}", tail(&guard.log_text()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn check_status(file: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"))
        .args(["check-status", "-r", "-f", file.to_str().unwrap()])
        .output()
        .expect("running check-status");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test]
async fn start_up_initializes_the_datastore_reports_status_and_applies_config_live() {
    let cluster = private_cluster();
    let client = cluster.client();
    let infos: Api<DynamicObject> = Api::all_with(client.clone(), &calico("ClusterInformation", "clusterinformations"));
    let kccs: Api<DynamicObject> = Api::all_with(client.clone(), &calico("KubeControllersConfiguration", "kubecontrollersconfigurations"));
    assert!(infos.get_opt("default").await.unwrap().is_none() && kccs.get_opt("default").await.unwrap().is_none(), "an empty cluster");

    let status_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("startup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&status_dir);
    let status_file = status_dir.join("status/status.json");
    let health_port = free_port();
    let (hp, sf) = (health_port.to_string(), status_file.to_str().unwrap().to_string());
    // As upstream's images start it: `calico component kube-controllers`, KDD env of the manifests.
    let guard = start_controller_env(
        &cluster,
        &["component", "kube-controllers", "--health-port", &hp, "--status-file", &sf],
        &[("ENABLED_CONTROLLERS", "node,loadbalancer,namespace"), ("DATASTORE_TYPE", "kubernetes")],
        "startup",
    );

    let info = wait_for("ClusterInformation default", &guard, || async { infos.get_opt("default").await.ok().flatten() }).await;
    let spec = &info.data["spec"];
    let guid = spec["clusterGUID"].as_str().unwrap_or_default();
    assert!(guid.len() == 32 && guid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{spec}");
    assert_eq!((spec["clusterType"].as_str(), spec["datastoreReady"].as_bool()), (Some("k8s,kdd"), Some(true)), "{spec}");

    let kcc = wait_for("KubeControllersConfiguration default with status", &guard, || async {
        kccs.get_opt("default").await.ok().flatten().filter(|k| k.data.get("status").is_some_and(|s| !s.is_null()))
    })
    .await;
    let spec = &kcc.data["spec"];
    assert_eq!(spec["logSeverityScreen"], "Info");
    assert_eq!(spec["healthChecks"], "Enabled");
    assert_eq!(spec["etcdV3CompactionPeriod"], "10m");
    assert_eq!(spec["prometheusMetricsPort"], 9094);
    assert_eq!(spec["controllers"]["node"], json!({"reconcilerPeriod": "5m", "syncLabels": "Enabled", "leakGracePeriod": "15m",
        "hostEndpoint": {"autoCreate": "Disabled", "createDefaultHostEndpoint": "Enabled"}}));
    for section in ["policy", "workloadEndpoint", "serviceAccount", "namespace"] {
        assert_eq!(spec["controllers"][section], json!({"reconcilerPeriod": "5m"}), "{section}");
    }
    assert_eq!(spec["controllers"]["loadBalancer"], json!({"assignIPs": "AllServices"}));
    assert_eq!(spec["controllers"]["migration"], json!({"policyNameMigrator": "Enabled"}));
    let tiers: Api<DynamicObject> = Api::all_with(client.clone(), &calico("Tier", "tiers"));
    for (name, order, action) in [("default", 1e6, "Deny"), ("kube-admin", 1e3, "Pass"), ("kube-baseline", 1e7, "Pass")] {
        let tier = tiers.get(name).await.unwrap_or_else(|e| panic!("tier {name}: {e}"));
        assert_eq!((tier.data["spec"]["order"].as_f64(), tier.data["spec"]["defaultAction"].as_str()), (Some(order), Some(action)), "{name}");
    }
    let status = &kcc.data["status"];
    assert_eq!(status["environmentVars"], json!({"DATASTORE_TYPE": "kubernetes", "ENABLED_CONTROLLERS": "node,loadbalancer,namespace"}), "{status}");
    assert_eq!(status["runningConfig"]["controllers"]["node"]["leakGracePeriod"], "15m0s", "{status}");
    assert_eq!(status["runningConfig"]["controllers"]["loadBalancer"], json!({"assignIPs": "AllServices"}), "{status}");
    assert_eq!(status["runningConfig"]["controllers"]["policy"], Value::Null, "not in ENABLED_CONTROLLERS: {status}");

    // Ready, in the file and over HTTP, although the namespace controller does not run on
    // Kubernetes (upstream derives profiles there).
    let (code, out) = wait_for("check-status -r to pass", &guard, || async {
        let r = check_status(&status_file);
        (r.0 == 0).then_some(r)
    })
    .await;
    assert_eq!((code, out.as_str()), (0, "Ready"));
    let file: Value = serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
    for key in ["Startup", "CalicoDatastore", "KubeAPIServer"] {
        assert_eq!(file["Readiness"][key]["Ready"], true, "{key}: {file}");
    }
    let note = file["Readiness"]["Controllers"]["Reason"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("not implemented in this version") && note.contains("namespace") && !note.contains("loadbalancer") && !note.contains("node,"), "{file}");
    assert!(guard.log_text().contains("not implemented in this version"), "logged once at start");
    assert_eq!(http_get(health_port, "/readiness").await.map(|r| r.0), Some(200));
    assert_eq!(http_get(health_port, "/liveness").await.map(|r| r.0), Some(200));

    // Live: log level, leak grace period and metrics port from one edit, no restart.
    let metrics_port = free_port();
    let patch = json!({"spec": {"logSeverityScreen": "Debug", "prometheusMetricsPort": metrics_port, "controllers": {"node": {"leakGracePeriod": "3s"}}}});
    kccs.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("editing the KCC");
    wait_for("the new leak grace period in the running config", &guard, || async {
        let k = kccs.get("default").await.ok()?;
        let running = &k.data["status"]["runningConfig"];
        (running["controllers"]["node"]["leakGracePeriod"] == "3s" && running["logSeverityScreen"] == "Debug").then_some(())
    })
    .await;
    wait_for("the log level and grace period applied", &guard, || async {
        let log = guard.log_text();
        (log.contains("log level applied") && log.contains("level=\"Debug\"") && log.contains("DEBUG") && log.contains("leak_grace=3s")).then_some(())
    })
    .await;
    let (code, body) = wait_for("metrics on the new port", &guard, || async { http_get(metrics_port, "/metrics").await }).await;
    assert_eq!(code, 200);
    assert!(body.contains("ipam_gc_pass_duration_seconds"), "{body}");

    // Health checks off: their conditions leave the file and readiness holds (upstream's HTTP
    // readiness would never pass again, §10.3).
    let patch = json!({"spec": {"healthChecks": "Disabled"}});
    kccs.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("disabling health checks");
    wait_for("health conditions gone from the status file", &guard, || async {
        let file: Value = serde_json::from_slice(&std::fs::read(&status_file).ok()?).ok()?;
        file["Readiness"].get("KubeAPIServer").is_none().then_some(())
    })
    .await;
    // A watch may expire at any moment (a 410 relists), so readiness is awaited, not sampled.
    wait_for("readiness with health checks off", &guard, || async { (check_status(&status_file) == (0, "Ready".to_string())).then_some(()) }).await;
    assert_eq!(http_get(health_port, "/readiness").await.map(|r| r.0), Some(200));

    // Deleted, it comes back (as upstream), with the defaults and a fresh status.
    let old_uid = kccs.get("default").await.unwrap().metadata.uid;
    kccs.delete("default", &Default::default()).await.expect("deleting the KCC");
    wait_for("the default KCC re-created", &guard, || async {
        let k = kccs.get_opt("default").await.ok().flatten()?;
        (k.metadata.uid != old_uid && k.data["spec"]["logSeverityScreen"] == "Info" && k.data["status"]["runningConfig"]["logSeverityScreen"] == "Info")
            .then_some(())
    })
    .await;

    let mut guard = guard;
    assert!(guard.child.try_wait().unwrap().is_none(), "still the same process: no restart on config change");
}

#[tokio::test]
async fn an_explicit_not_ready_datastore_is_kept_and_a_partial_cluster_type_is_completed() {
    let cluster = private_cluster();
    let client = cluster.client();
    let infos: Api<DynamicObject> = Api::all_with(client.clone(), &calico("ClusterInformation", "clusterinformations"));
    let info = DynamicObject::new("default", &calico("ClusterInformation", "clusterinformations"))
        .data(json!({"spec": {"clusterType": "typha", "datastoreReady": false}}));
    infos.create(&Default::default(), &info).await.expect("ClusterInformation");
    let guard = start_controller_env(&cluster, &["run", "--metrics-port", "0", "--status-file", "/proc/nonexistent/status.json"], &[], "repair");
    let spec = wait_for("ClusterInformation repaired", &guard, || async {
        let o = infos.get("default").await.ok()?;
        o.data["spec"]["clusterGUID"].is_string().then(|| o.data["spec"].clone())
    })
    .await;
    assert_eq!(spec["clusterType"], "typha,k8s,kdd");
    assert_eq!(spec["datastoreReady"], false, "never flipped: an upgrade may be in progress");
    assert!(guard.log_text().contains("cannot write the status file"), "an unwritable status path is a warning, not fatal");
}

/// A kubeconfig file for ServiceAccount `namespace/name`: the cluster's own file with the user
/// replaced by a freshly minted token.
async fn kubeconfig_for_service_account(cluster: &crate::support::cluster::TestCluster, namespace: &str, name: &str) -> std::path::PathBuf {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client(), namespace);
    let request = TokenRequest { spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }), ..Default::default() };
    let token = accounts.create_token_request(name, &Default::default(), &request).await.expect("token").status.expect("token status").token;
    let text = std::fs::read_to_string(&cluster.kubeconfig).expect("reading the kubeconfig");
    let mut kc: Value = serde_saphyr::from_str(&text).expect("kubeconfig YAML");
    for user in kc["users"].as_array_mut().expect("users") {
        user["user"] = json!({"token": token});
    }
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kubeconfig-{name}-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec(&kc).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn a_refused_watch_makes_the_controller_not_ready_with_a_reason_naming_the_resource() {
    use crate::support::cluster::create_service_account;
    let cluster = private_cluster();
    let client = cluster.client();
    let ns = cluster.namespace_with_default_service_account(&client, "ckc-rbac").await;
    create_service_account(&client, &ns, "ckc").await;
    // Everything the controller needs except access to IPAMHandles.
    let role: k8s_openapi::api::rbac::v1::ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": "ckc-without-handles"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["crd.projectcalico.org"], "verbs": ["get", "list", "watch", "create", "update", "delete"],
             "resources": ["ipamblocks", "blockaffinities", "ipamconfigs", "ippools", "clusterinformations", "tiers", "kubecontrollersconfigurations", "kubecontrollersconfigurations/status"]},
        ]
    }))
    .unwrap();
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "ckc-without-handles"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ckc-without-handles"},
        "subjects": [{"kind": "ServiceAccount", "name": "ckc", "namespace": ns}]
    }))
    .unwrap();
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone()).create(&Default::default(), &role).await.expect("ClusterRole");
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone()).create(&Default::default(), &binding).await.expect("binding");
    let kubeconfig = kubeconfig_for_service_account(&cluster, &ns, "ckc").await;

    let status_file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("rbac-{}/status.json", std::process::id()));
    let health_port = free_port();
    let (hp, sf) = (health_port.to_string(), status_file.to_str().unwrap().to_string());
    let guard = start_controller_env(
        &cluster,
        &["run", "--metrics-port", "0", "--health-port", &hp, "--status-file", &sf],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap()), ("ENABLED_CONTROLLERS", "node")],
        "rbac",
    );
    let reason = wait_for("the refused watch in the status file", &guard, || async {
        let file: Value = serde_json::from_slice(&std::fs::read(&status_file).ok()?).ok()?;
        let c = &file["Readiness"]["Watch:ipamhandles"];
        (c["Ready"] == false).then(|| c["Reason"].as_str().unwrap_or_default().to_string())
    })
    .await;
    assert!(reason.contains("ipamhandles") && reason.contains("403"), "{reason}");
    // Everything else it may do works: start-up finished with the permissions it has.
    wait_for("start-up done", &guard, || async {
        let file: Value = serde_json::from_slice(&std::fs::read(&status_file).ok()?).ok()?;
        (file["Readiness"]["Startup"]["Ready"] == true).then_some(())
    })
    .await;
    let (code, out) = check_status(&status_file);
    assert_eq!(code, 1);
    assert!(out.contains("watching ipamhandles refused by the apiserver (403)"), "{out}");
    let (code, body) = http_get(health_port, "/readiness").await.expect("readiness");
    assert!(code == 503 && body.contains("ipamhandles"), "{code} {body}");
    assert_eq!(http_get(health_port, "/liveness").await.map(|r| r.0), Some(200), "a refused watch is no reason to restart");
}
