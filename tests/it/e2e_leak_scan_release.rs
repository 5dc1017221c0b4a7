//! The release procedure's data path on a real cluster, up to calicoctl: `leak-scan --save-dump`
//! writes a dump in the safe order, its scan says so and frees only the gone pod's address, and a
//! scan taken after the datastore is locked carries exactly what `calicoctl ipam release
//! --from-report` checks before it releases (the cluster GUID, the live ClusterInformation
//! revision, `datastoreLocked`, and a `version` equal to the cluster's Calico version, so no
//! `--force`). calicoctl itself is not run here: see the README's release procedure for why.

use std::collections::BTreeSet;
use std::process::Command;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::private_cluster;
use crate::support::controller::{LIVE_IP, setup};

const CALICO_VERSION: &str = "v3.28.4";

fn leak_scan(kubeconfig: &std::path::Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_calico-kube-controllers"))
        .arg("leak-scan")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("running leak-scan");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), report, stderr)
}

/// The addresses calicoctl would release from this report: `inUse: false`, not cooling down.
fn released_by_calicoctl(report: &Value) -> BTreeSet<String> {
    report["allocations"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(Value::as_array)
        .flatten()
        .filter(|a| a["inUse"] == false && a["coolingDown"] != true)
        .filter_map(|a| a["ip"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn saved_dump_is_in_safe_order_and_a_locked_scan_carries_what_calicoctl_checks() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let client = cluster.client();
    let resource = ApiResource {
        group: "crd.projectcalico.org".into(),
        version: "v1".into(),
        api_version: "crd.projectcalico.org/v1".into(),
        kind: "ClusterInformation".into(),
        plural: "clusterinformations".into(),
    };
    let infos: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let info: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "ClusterInformation", "metadata": {"name": "default"},
        "spec": {"clusterGUID": "e2e-guid", "clusterType": "k8s,kdd", "calicoVersion": CALICO_VERSION, "datastoreReady": true}
    }))
    .unwrap();
    infos.create(&PostParams::default(), &info).await.expect("ClusterInformation");
    let block_rv = s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version;

    // Scan A, from a saved dump.
    let dir = tempdir("release-dump");
    let (code, _, stderr) = leak_scan(&cluster.kubeconfig, &["--save-dump", dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let mut versions = Vec::new();
    for part in ["01-ipamblocks", "07-clusterinformations", "09-nodes", "10-namespaces", "11-pods"] {
        let text = std::fs::read_to_string(dir.join(format!("{part}.json"))).unwrap_or_else(|e| panic!("{part}: {e}; {stderr}"));
        let list: Value = serde_json::from_str(&text).unwrap();
        let rv: u64 = list["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{part}: {list}"));
        versions.push(rv);
    }
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "read in the safe order: {versions:?}");
    let (code, a, stderr) = leak_scan(&cluster.kubeconfig, &["--from-dump", dir.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, Some(1), "releasable leaks ⇒ exit 1; {stderr}");
    assert_eq!(a["dumpOrder"]["state"], "safe", "{:#}", a["dumpOrder"]);
    assert_eq!(a["version"], CALICO_VERSION);
    assert_eq!(released_by_calicoctl(&a), BTreeSet::from([s.gone_ip.to_string()]), "{a:#}");

    // Lock as `calicoctl datastore migrate lock` does, then scan B live.
    infos.patch("default", &PatchParams::default(), &Patch::Merge(json!({"spec": {"datastoreReady": false}}))).await.expect("lock");
    let live_rv = infos.get("default").await.unwrap().metadata.resource_version.unwrap();
    let (code, b, stderr) = leak_scan(&cluster.kubeconfig, &["--output", "json"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(b["datastoreLocked"], true);
    assert_eq!(b["clusterGUID"], "e2e-guid");
    assert_eq!(b["clusterInformationRevision"], live_rv.as_str(), "one report must carry the live revision");
    assert_eq!(b["version"], CALICO_VERSION, "equal to calicoctl's version: no --force");
    // calicoctl frees what every report given marks free: A ∩ B is exactly the gone pod's address.
    let both: BTreeSet<_> = released_by_calicoctl(&a).intersection(&released_by_calicoctl(&b)).cloned().collect();
    assert_eq!(both, BTreeSet::from([s.gone_ip.to_string()]));
    assert!(!both.contains(LIVE_IP));

    // Both scans wrote nothing.
    assert_eq!(s.blocks.get(&s.block_name).await.unwrap().metadata.resource_version, block_rv);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ckc-{tag}-{}-{}", std::process::id(), crate::support::cluster::unique_number()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
