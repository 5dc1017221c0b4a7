//! End-to-end: the built controller binary against a private test cluster (the GC is
//! cluster-wide). A node with a live pod and a block holding the live pod's IP and a gone pod's
//! IP: the controller frees exactly the gone pod's IP and handle; in dry-run it reports the leak
//! and writes nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use calico_kube_controllers::model::names::handle_object_name;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::e2e_policy_names::Planted;
use crate::support::audit;
use crate::support::cluster::private_cluster;
use crate::support::controller::{CONTROLLER_USER, DEADLINE, wait_for, install_deploy_base, start_controller_with, LIVE_IP, calico, free_port, http_get, metric_sum, setup, start_controller};

/// A status file and health port of its own for one controller process of this file.
fn own_status(label: &str) -> (std::path::PathBuf, String) {
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("status-{label}-{}", std::process::id())).join("status.json");
    let _ = std::fs::remove_file(&file);
    (file, free_port().to_string())
}

/// Also the policy-name migrator on the same cluster (SPEC §6.8, `e2e_policy_names.rs`): it waits
/// for a `calico-node` DaemonSet that does not exist while the GC frees the leak, then re-keys
/// the old-named policies once one has rolled out, and a restarted controller does nothing more.
#[tokio::test]
async fn controller_frees_a_gone_pods_ip_and_handle_and_keeps_the_live_one() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let policies = Planted::plant(&cluster).await;
    let migrator_env = policies.env();
    let migrator_env: Vec<(&str, &str)> = migrator_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let port = free_port();
    let started = Instant::now();
    let report_file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("leak-report-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report_file);
    let report_arg = report_file.to_string_lossy().into_owned();
    let (status_file, health_port) = own_status("gc");
    let status_arg = status_file.to_string_lossy().into_owned();
    let controller = start_controller_with(
        &cluster.kubeconfig,
        &["--leak-report-file", &report_arg, "--status-file", &status_arg, "--health-port", &health_port],
        &migrator_env,
        port,
        "gc",
    );

    let freed = loop {
        let block = s.blocks.get(&s.block_name).await.expect("reading the block");
        let gone_handle = s.handles.get_opt(&handle_object_name(&s.gone_handle)).await.expect("reading the handle");
        if block.data["spec"]["allocations"][2].is_null() && gone_handle.is_none() {
            break block;
        }
        assert!(started.elapsed() < DEADLINE, "gone pod's IP not freed in {DEADLINE:?}: {}", block.data["spec"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("gone pod's IP {} freed {:.1} s after the controller started", s.gone_ip, started.elapsed().as_secs_f64());
    assert_eq!(freed.data["spec"]["allocations"][1], json!(0), "the live pod's IP stays allocated");
    assert!(s.handles.get_opt(&handle_object_name(&s.live_handle)).await.unwrap().is_some(), "the live handle stays");
    // The GC did its job while the migrator waits for calico-node, which it says, ready.
    let waiting = policies.wait_for_the_migrator_waiting(&status_file).await;
    eprintln!("while the GC freed the leak, the migrator said: {waiting}");
    policies.roll_out_calico_node().await;
    let re_keyed = policies.wait_re_keyed().await;
    eprintln!("old-named policies re-keyed {:.1} s after the controller started", started.elapsed().as_secs_f64());

    let (code, body) = http_get(port, "/metrics").await.expect("scraping /metrics");
    assert_eq!(code, 200);
    assert!(metric_sum(&body, "ipam_gc_releases_total") >= 1.0, "{body}");
    assert!(metric_sum(&body, "ipam_allocations_gc_reclamations") >= 1.0, "{body}");
    assert!(body.contains("kube_controllers_api_requests_total{verb=\"update\",resource=\"ipamblocks\",code=\"200\"}"), "{body}");
    assert_eq!(metric_sum(&body, "kube_controllers_policy_name_migrations_total"), 4.0, "{body}");
    assert!(body.contains("kube_controllers_policy_name_migrations_total{kind=\"stagednetworkpolicies\",outcome=\"migrated\"} 1"), "{body}");
    assert_eq!(http_get(port, "/readiness").await.map(|r| r.0), Some(200));
    // --leak-report-file: the same JSON as /leak-report, written after full passes.
    let file: Value = serde_json::from_slice(&std::fs::read(&report_file).expect("the leak report file is written")).expect("report file JSON");
    assert!(file["summary"]["allocations"].as_u64().is_some(), "{file}");
    assert!(file["leaks"].is_array());

    // SIGTERM: the pass in progress finishes, then a clean exit.
    let mut controller = controller;
    let pid = controller.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = controller.child.try_wait().expect("waiting for the controller") {
            break status;
        }
        assert!(stopping.elapsed() < Duration::from_secs(10), "no exit within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!("exited {:.2} s after SIGTERM", stopping.elapsed().as_secs_f64());

    // Restarted: the migrator's round finds nothing to re-key and writes nothing.
    let (status_file, health_port) = own_status("gc-restart");
    let status_arg = status_file.to_string_lossy().into_owned();
    let _again = start_controller_with(&cluster.kubeconfig, &["--status-file", &status_arg, "--health-port", &health_port], &migrator_env, free_port(), "gc-restart");
    policies.assert_nothing_more(&status_file, &re_keyed).await;
}

#[tokio::test]
async fn dry_run_controller_reports_the_leak_and_writes_nothing() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let before = s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version;
    let kubeconfig = install_deploy_base(&cluster, "dry").await;
    let port = free_port();
    let started = Instant::now();
    let report_file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("leak-report-dry-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report_file);
    let report_arg = report_file.to_string_lossy().into_owned();
    let _controller = start_controller_with(&kubeconfig, &["--dry-run", "--leak-report-file", &report_arg], &[], port, "dry");

    // Wait until the leak is confirmed and releasable in the report, then for several more passes.
    loop {
        if let Some((200, body)) = http_get(port, "/leak-report").await {
            let report: Value = serde_json::from_str(&body).expect("report JSON");
            let leaks = report["leaks"].as_array().cloned().unwrap_or_default();
            if leaks.iter().any(|l| l["ip"] == s.gone_ip && l["releasable"] == true) {
                assert!(leaks.iter().all(|l| l["ip"] != LIVE_IP), "the live IP is no leak: {body}");
                // calicoctl's allocation map holds the leaked addresses only; the summary counts all.
                let map = report["allocations"].as_object().expect("calicoctl's allocation map");
                let leaked: std::collections::BTreeSet<&str> = leaks.iter().filter_map(|l| l["ip"].as_str()).collect();
                assert_eq!(map.keys().map(String::as_str).collect::<std::collections::BTreeSet<_>>(), leaked, "{body}");
                assert!(!map.contains_key(LIVE_IP), "{body}");
                assert_eq!(map[s.gone_ip][0]["inUse"], false, "{body}");
                assert!(report["summary"]["allocations"].as_u64() >= Some(2), "{body}");
                break;
            }
        }
        assert!(started.elapsed() < DEADLINE, "the dry-run report never listed the leak as releasable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let confirmed_at = started.elapsed();
    // The report file (written after full passes) says the same once a full pass has run.
    wait_for("the leak in the report file", || async {
        let file: Value = serde_json::from_slice(&std::fs::read(&report_file).ok()?).ok()?;
        file["leaks"].as_array()?.iter().any(|l| l["ip"] == s.gone_ip && l["releasable"] == true).then_some(())
    })
    .await;
    // Grace 2 s ⇒ a full pass every second: wait for at least three more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = s.blocks.get(&s.block_name).await.unwrap();
    assert_eq!(after.metadata.resource_version, before, "dry run must not write the block");
    assert_eq!(after.data["spec"]["allocations"][2], json!(1));
    assert!(s.handles.get_opt(&handle_object_name(&s.gone_handle)).await.unwrap().is_some());
    let (_, body) = http_get(port, "/metrics").await.expect("scraping /metrics");
    assert_eq!(metric_sum(&body, "ipam_gc_releases_total"), 0.0, "{body}");
    assert!(metric_sum(&body, "ipam_gc_pass_duration_seconds_count") >= 3.0, "{body}");
    for verb in ["create", "update", "delete"] {
        let prefix = format!("kube_controllers_api_requests_total{{verb=\"{verb}\"");
        assert!(!body.lines().any(|l| l.starts_with(&prefix)), "dry run sent a {verb}: {body}");
    }
    let writes: Vec<_> = audit::read(cluster.dir.as_ref().unwrap())
        .into_iter()
        .filter(|e| e.user == CONTROLLER_USER && e.is_write())
        .map(|e| format!("{} {}/{}/{} -> {}", e.verb, e.resource, e.namespace, e.name, e.code))
        .collect();
    assert!(writes.is_empty(), "the dry run sent writes (audit log): {writes:#?}");
    eprintln!("dry run: leak reported {:.1} s after start", confirmed_at.as_secs_f64());
}

#[tokio::test]
async fn datastore_not_ready_pauses_the_gc_until_it_is_ready_again() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let infos: Api<DynamicObject> = Api::all_with(cluster.client(), &calico("ClusterInformation", "clusterinformations"));
    let info = DynamicObject::new("default", &calico("ClusterInformation", "clusterinformations"))
        .data(json!({"spec": {"clusterGUID": "0123456789abcdef0123456789abcdef", "clusterType": "k8s,kdd", "datastoreReady": false}}));
    infos.create(&PostParams::default(), &info).await.expect("ClusterInformation");
    let before = s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version;
    let port = free_port();
    let _controller = start_controller(&cluster, &[], port, "paused");

    // Grace 2 s: without the pause the IP would be gone in about 3 s (see the first test).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version, before, "paused GC wrote the block");
    let (_, body) = http_get(port, "/metrics").await.expect("scraping /metrics");
    assert!(body.contains("ipam_gc_datastore_paused 1"), "{body}");

    let patch = json!({"spec": {"datastoreReady": true}});
    infos.patch("default", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.expect("datastoreReady=true");
    let resumed = Instant::now();
    loop {
        let block = s.blocks.get(&s.block_name).await.unwrap();
        if block.data["spec"]["allocations"][2].is_null() {
            assert_eq!(block.data["spec"]["allocations"][1], json!(0));
            break;
        }
        assert!(resumed.elapsed() < DEADLINE, "GC did not resume after datastoreReady=true");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("released {:.1} s after datastoreReady=true", resumed.elapsed().as_secs_f64());
}
