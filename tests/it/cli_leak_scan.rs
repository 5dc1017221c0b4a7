//! `leak-scan --from-dump` against the built binary, on a dump laid out as `--save-dump` writes
//! one (a typed List per file, IPAM first, Services last): LoadBalancer addresses whose Service is
//! gone are reported as `lb-unwanted`, never releasable (`inUse: true`, exit 0 when nothing else
//! leaked), and a dump without Services judges none of them and says so. No cluster needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use calico_kube_controllers::loadbalancer::handle_id;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_calico-kube-controllers");

fn scratch(label: &str) -> PathBuf {
    crate::support::scratch_dir(&format!("cli-leak-scan-{label}"))
}

/// One part of the dump: a typed List with its resourceVersion, kind and version first.
fn write_list(dir: &Path, file: &str, kind: &str, api_version: &str, rv: u64, items: &[Value]) {
    let items: Vec<String> = items.iter().map(Value::to_string).collect();
    let text = format!(r#"{{"kind":"{kind}List","apiVersion":"{api_version}","metadata":{{"resourceVersion":"{rv}"}},"items":[{}]}}"#, items.join(",\n"));
    std::fs::write(dir.join(file), text).unwrap();
}

/// A live pod on n1 in its host block, and a LoadBalancer block holding web's address and the
/// address of a Service that was deleted.
fn write_dump(dir: &Path, with_services: bool) {
    let calico = "crd.projectcalico.org/v1";
    let lb_attr = |name: &str, uid: &str| json!({"handle_id": handle_id(name, "shop", uid), "secondary": {"namespace": "shop", "service": name, "type": "LoadBalancer", "timestamp": "2026-01-02 03:04:05 +0000 UTC"}});
    write_list(dir, "01-ipamblocks.json", "IPAMBlock", calico, 10, &[
        json!({"metadata": {"name": "10-0-0-0-30"}, "spec": {"cidr": "10.0.0.0/30", "affinity": "host:n1", "allocations": [null, 0, null, null], "unallocated": [0, 2, 3],
            "attributes": [{"handle_id": "k8s-pod-network.live", "secondary": {"namespace": "shop", "pod": "live", "node": "n1"}}]}}),
        json!({"metadata": {"name": "192-0-2-0-30"}, "spec": {"cidr": "192.0.2.0/30", "affinity": "virtual:load-balancer", "allocations": [0, 1, null, null], "unallocated": [2, 3],
            "attributes": [lb_attr("web", "u-web"), lb_attr("deleted", "u-deleted")], "sequenceNumberForAllocation": {"0": 3, "1": 4}}}),
    ]);
    write_list(dir, "04-ippools.json", "IPPool", calico, 10, &[json!({"metadata": {"name": "lb"}, "spec": {"cidr": "192.0.2.0/28", "allowedUses": ["LoadBalancer"]}})]);
    write_list(dir, "09-nodes.json", "Node", "v1", 11, &[json!({"metadata": {"name": "n1"}})]);
    write_list(dir, "11-pods.json", "Pod", "v1", 12, &[json!({"metadata": {"name": "live", "namespace": "shop", "uid": "p1"}, "spec": {"nodeName": "n1"},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}})]);
    if with_services {
        write_list(dir, "12-services.json", "Service", "v1", 13, &[
            json!({"metadata": {"name": "web", "namespace": "shop", "uid": "u-web"}, "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "ports": [{"port": 80}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.0"}]}}}),
            json!({"metadata": {"name": "kubernetes", "namespace": "default", "uid": "k"}, "spec": {"type": "ClusterIP"}}),
        ]);
    }
}

fn leak_scan(dir: &Path, output: &str) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["leak-scan", "--from-dump", dir.to_str().unwrap(), "--output", output])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .expect("running leak-scan");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn in_use(report: &Value, ip: &str) -> Option<bool> {
    report["allocations"][ip][0]["inUse"].as_bool()
}

#[test]
fn leak_scan_from_a_dump_reports_a_gone_services_lb_address_as_unwanted_in_use_and_not_releasable() {
    let dir = scratch("lb");
    write_dump(&dir, true);
    let (code, stdout, stderr) = leak_scan(&dir, "json");
    assert_eq!(code, 0, "an lb-unwanted leak is not releasable: exit 0; stderr: {stderr}; stdout: {stdout}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON ({e}): {stdout}"));
    let leaks = report["leaks"].as_array().unwrap();
    assert_eq!(leaks.len(), 1, "{report:#}");
    let l = &leaks[0];
    assert_eq!((l["ip"].as_str(), l["reason"].as_str(), l["service"].as_str(), l["namespace"].as_str()), (Some("192.0.2.1"), Some("lb-unwanted"), Some("deleted"), Some("shop")));
    assert_eq!((l["releasable"].as_bool(), l["heldBy"].as_str()), (Some(false), Some("loadbalancer-controller")));
    assert_eq!(in_use(&report, "192.0.2.1"), Some(true), "calicoctl's release --from-report must leave it");
    assert_eq!(report["allocations"]["192.0.2.1"][0]["sequenceNumber"], 4);
    assert_eq!(in_use(&report, "192.0.2.0"), Some(true));
    assert_eq!(report["summary"]["releasableLeaks"], 0);
    assert_eq!(report["summary"]["leaksByReason"], json!({"lb-unwanted": 1}));
    assert_eq!(report["loadBalancer"], json!({"assignIPs": "AllServices", "addresses": 2, "unwanted": 1, "notJudged": 0, "notes": ["no KubeControllersConfiguration read: judged with assignIPs AllServices, the default"]}));
    let (code, table, _) = leak_scan(&dir, "table");
    assert_eq!(code, 0);
    assert!(table.contains("lb-unwanted") && table.contains("service shop/deleted (held: loadbalancer-controller)"), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn leak_scan_from_a_dump_without_services_judges_no_lb_address_and_says_how_to_dump_them() {
    let dir = scratch("no-services");
    write_dump(&dir, false);
    let (code, stdout, stderr) = leak_scan(&dir, "json");
    assert_eq!(code, 0, "stderr: {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["leaks"], json!([]), "no leak from a missing observation");
    assert_eq!(report["loadBalancer"]["notJudged"], 2);
    assert!(report["loadBalancer"]["notes"][0].as_str().unwrap().contains("kubectl get --raw /api/v1/services"), "{report:#}");
    let (_, table, _) = leak_scan(&dir, "table");
    assert!(table.contains("2 addresses (0 unwanted, 2 not judged") && table.contains("the dump has no Services"), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}
