//! Automatic host endpoints on the real API server (KDD, SPEC §1.6): the default HostEndpoint
//! from a Node's `projectcalico.org/*` annotations and InternalIP, templates with a selector,
//! CIDRs and an interface pattern, labels that follow the Node, drift repaired, a stale managed
//! HostEndpoint deleted and the user's kept, a name held by the user's left alone, an unusable
//! template reported (Event, status file, metric) while the rest keep working, a deleted Node's
//! HostEndpoints gone (managed or not), and turning `autoCreate` off removing every managed one.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::private_cluster;
use crate::support::controller::{calico, free_port, http_get, start_controller, wait_for};

const CREATED_BY: &str = "projectcalico.org/created-by";

fn hep(name: &str, node: &str, managed: bool, interface: &str) -> DynamicObject {
    let mut labels = json!({});
    if managed {
        labels[CREATED_BY] = json!("calico-kube-controllers");
    }
    serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "HostEndpoint",
        "metadata": {"name": name, "labels": labels},
        "spec": {"node": node, "interfaceName": interface, "expectedIPs": ["203.0.113.1"]}
    }))
    .unwrap()
}

async fn names(heps: &Api<DynamicObject>) -> Vec<String> {
    let mut n: Vec<String> = heps.list(&ListParams::default()).await.expect("listing host endpoints").items.into_iter().filter_map(|h| h.metadata.name).collect();
    n.sort();
    n
}

#[tokio::test]
async fn automatic_host_endpoints_follow_nodes_templates_and_the_switch() {
    let cluster = private_cluster();
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let interfaces = json!([{"name": "eth0", "addresses": ["192.168.0.1"]}, {"name": "eth1", "addresses": ["172.16.0.1"]}, {"name": "lo", "addresses": ["127.0.0.1"]}]).to_string();
    for (name, labels, annotations, ip) in [
        ("n1", json!({"role": "worker"}), json!({"projectcalico.org/IPv4Address": "10.0.0.1/24", "projectcalico.org/IPv4VXLANTunnelAddr": "10.2.0.1", "projectcalico.org/Interfaces": interfaces}), "192.168.0.1"),
        ("n2", json!({}), json!({}), "192.168.0.2"),
    ] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}})).unwrap();
        nodes.create(&PostParams::default(), &node).await.expect("node");
        let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}});
        nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("node status");
    }
    let heps: Api<DynamicObject> = Api::all_with(client.clone(), &calico("HostEndpoint", "hostendpoints"));
    for h in [hep("user-n1", "n1", false, "eth9"), hep("user-n2", "n2", false, "eth9"), hep("n2-auto-hep", "n2", false, "*"), hep("n1-old-auto-hep", "n1", true, "*")] {
        heps.create(&PostParams::default(), &h).await.expect("host endpoint");
    }

    let port = free_port();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let status_file = dir.join(format!("status-hep-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&status_file);
    let sf = status_file.display().to_string();
    let health = free_port().to_string();
    let controller = start_controller(&cluster, &["--status-file", sf.as_str(), "--health-port", health.as_str()], port, "host-endpoints");

    // autoCreate is off in the default configuration: the managed stale one goes, nothing is made.
    let kccs: Api<DynamicObject> = Api::all_with(client.clone(), &calico("KubeControllersConfiguration", "kubecontrollersconfigurations"));
    wait_for("the default configuration, and the stale managed host endpoint gone", || async {
        let kcc = kccs.get("default").await.ok()?;
        (names(&heps).await == ["n2-auto-hep", "user-n1", "user-n2"]).then_some(kcc)
    })
    .await;

    let template = json!({"generateName": "eth", "nodeSelector": "role == 'worker'", "interfaceCIDRs": ["192.168.0.0/16"], "interfacePattern": "^eth[0-9]$", "labels": {"hep": "template"}});
    let set_host_endpoint = |section: Value| {
        let kccs = kccs.clone();
        async move {
            let patch = json!({"spec": {"controllers": {"node": {"hostEndpoint": section}}}});
            kccs.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patching the configuration");
        }
    };
    set_host_endpoint(json!({"autoCreate": "Enabled", "templates": [template.clone()]})).await;
    let want = ["n1-auto-hep", "n1-eth-eth0-auto-hep", "n1-eth-eth1-auto-hep", "n2-auto-hep", "user-n1", "user-n2"];
    wait_for("the default and template host endpoints", || async { (names(&heps).await == want).then_some(()) }).await;
    let spec = |name: &'static str| {
        let heps = heps.clone();
        async move { heps.get(name).await.ok().map(|h| h.data["spec"].clone()) }
    };
    let labels = |name: &'static str| {
        let heps = heps.clone();
        async move { heps.get(name).await.ok().map(|h| serde_json::to_value(h.metadata.labels.unwrap_or_default()).unwrap()) }
    };
    let default = spec("n1-auto-hep").await.unwrap();
    assert_eq!(default["interfaceName"], "*");
    assert_eq!(default["expectedIPs"], json!(["10.0.0.1", "10.2.0.1", "192.168.0.1", "172.16.0.1", "127.0.0.1"]), "BGP, VXLAN, InternalIP, then interface addresses, each once: {default}");
    assert_eq!(default["profiles"], json!(["projectcalico-default-allow"]));
    assert_eq!(labels("n1-auto-hep").await.unwrap(), json!({"role": "worker", CREATED_BY: "calico-kube-controllers"}));
    assert_eq!(spec("n1-eth-eth0-auto-hep").await.unwrap()["expectedIPs"], json!(["192.168.0.1"]));
    assert_eq!(spec("n1-eth-eth1-auto-hep").await.unwrap()["expectedIPs"], json!(["192.168.0.1", "172.16.0.1"]), "the template's addresses, then the interface's own");
    assert_eq!(labels("n1-eth-eth0-auto-hep").await.unwrap()["hep"], "template");
    let n2 = heps.get("n2-auto-hep").await.unwrap();
    assert!(n2.metadata.labels.unwrap_or_default().is_empty(), "a name held by the user's host endpoint is left alone");
    let metrics = wait_for("the blocked name in the metrics", || async {
        let body = http_get(port, "/metrics").await?.1;
        body.contains("kube_controllers_host_endpoints_blocked 1").then_some(body)
    })
    .await;
    assert!(metrics.contains("kube_controllers_writes_total{controller=\"hostendpoint\",op=\"create\",outcome=\"ok\"} 3"), "{metrics}");

    // The node's labels change: its template no longer matches, the default follows the labels.
    nodes.patch("n1", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"labels": {"role": "db"}}}))).await.expect("relabelling n1");
    wait_for("labels followed and the template's host endpoints gone", || async {
        let l = labels("n1-auto-hep").await?;
        (l["role"] == "db" && names(&heps).await == ["n1-auto-hep", "n2-auto-hep", "user-n1", "user-n2"]).then_some(())
    })
    .await;

    // An edit of a managed one is drift, repaired.
    let mut edited = heps.get("n1-auto-hep").await.unwrap();
    edited.data["spec"]["expectedIPs"] = json!(["198.51.100.7"]);
    heps.replace("n1-auto-hep", &PostParams::default(), &edited).await.expect("editing the managed host endpoint");
    wait_for("the drift repaired", || async { (spec("n1-auto-hep").await?["expectedIPs"][0] == "10.0.0.1").then_some(()) }).await;

    // An unusable template: reported, while the default keeps working.
    set_host_endpoint(json!({"autoCreate": "Enabled", "templates": [{"generateName": "bad", "nodeSelector": "has(", "interfaceCIDRs": ["10.0.0.0/8"]}, template.clone()]})).await;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let event = wait_for("the Event on the configuration", || async {
        events.list(&ListParams::default()).await.ok()?.items.into_iter().find(|e| e.reason.as_deref() == Some("InvalidHostEndpointTemplate"))
    })
    .await;
    let regarding = event.regarding.expect("regarding");
    assert_eq!((regarding.kind.as_deref(), regarding.name.as_deref()), (Some("KubeControllersConfiguration"), Some("default")));
    assert!(event.note.as_deref().unwrap_or_default().contains("nodeSelector"), "{:?}", event.note);
    let status: Value = wait_for("the status file's reason", || async {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&status_file).ok()?).ok()?;
        v["Readiness"]["HostEndpointTemplates"]["Reason"].as_str().is_some_and(|r| r.contains("\"bad\"")).then_some(v)
    })
    .await;
    assert_eq!(status["Readiness"]["HostEndpointTemplates"]["Ready"], true, "a bad template does not make the controller unready: {status}");
    wait_for("the invalid-template gauge", || async { http_get(port, "/metrics").await?.1.contains("kube_controllers_host_endpoint_templates_invalid 1").then_some(()) }).await;
    assert_eq!(http_get(health.parse().unwrap(), "/readiness").await.map(|r| r.0), Some(200));

    // n2 deleted: its host endpoints go, the user's included (KDD, as the etcd cascade does).
    nodes.delete("n2", &DeleteParams::default()).await.expect("deleting n2");
    wait_for("n2's host endpoints gone", || async { (names(&heps).await == ["n1-auto-hep", "user-n1"]).then_some(()) }).await;

    // autoCreate off: every managed one goes, the user's stays.
    set_host_endpoint(json!({"autoCreate": "Disabled"})).await;
    wait_for("every managed host endpoint gone", || async { (names(&heps).await == ["user-n1"]).then_some(()) }).await;
    assert!(!controller.log_text().contains("panicked"), "{}", controller.log_text());
}
