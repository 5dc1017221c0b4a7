//! End-to-end KubeVirt: with VirtualMachine and VirtualMachineInstance CRDs installed (minimal
//! ones, made here), the controller watches them, keeps a VM's allocation while the VM exists,
//! and holds it as a GC candidate once the VM is gone (observed through the metrics).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::private_cluster;
use crate::support::controller::{DEADLINE, calico, free_port, http_get, start_controller};

fn kubevirt_crd(kind: &str, plural: &str) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{plural}.kubevirt.io")},
        "spec": {"group": "kubevirt.io", "scope": "Namespaced",
                 "names": {"kind": kind, "listKind": format!("{kind}List"), "plural": plural, "singular": kind.to_lowercase()},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))
    .unwrap()
}

const CANDIDATE: &str = r#"ipam_allocations_gc_candidates{ippool="pool-vm",node="n1"}"#;

async fn candidates(port: u16) -> Option<String> {
    let (_, body) = http_get(port, "/metrics").await?;
    body.lines().find(|l| l.starts_with(CANDIDATE)).map(|l| l[CANDIDATE.len()..].trim().to_string())
}

#[tokio::test]
async fn a_vms_allocation_is_kept_while_the_vm_exists_and_becomes_a_candidate_once_it_is_gone() {
    let cluster = private_cluster();
    let client = cluster.client();
    let ns = cluster.namespace_with_default_service_account(&client, "e2e-kubevirt").await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (kind, plural) in [("VirtualMachine", "virtualmachines"), ("VirtualMachineInstance", "virtualmachineinstances")] {
        crds.create(&PostParams::default(), &kubevirt_crd(kind, plural)).await.expect("KubeVirt CRD");
    }
    let started = Instant::now();
    while !client.list_api_group_resources("kubevirt.io/v1").await.is_ok_and(|l| l.resources.len() >= 2) {
        assert!(started.elapsed() < DEADLINE, "discovery never showed kubevirt.io/v1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let vm_resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"), "virtualmachines");
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &vm_resource);
    vms.create(&PostParams::default(), &DynamicObject::new("vm1", &vm_resource).data(json!({"spec": {}}))).await.expect("VM");

    let nodes: Api<Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap()).await.expect("node");
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPPool", "ippools"));
    pools
        .create(&PostParams::default(), &DynamicObject::new("pool-vm", &calico("IPPool", "ippools")).data(json!({"spec": {"cidr": "10.80.0.0/24"}})))
        .await
        .expect("pool");
    let mut allocations = vec![Value::Null; 64];
    allocations[1] = json!(0);
    let unallocated: Vec<u32> = (0..64).filter(|o| *o != 1).collect();
    let blocks: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let block = DynamicObject::new("10-80-0-0-26", &calico("IPAMBlock", "ipamblocks")).data(json!({"spec": {
        "cidr": "10.80.0.0/26", "affinity": "host:n1", "strictAffinity": false, "deleted": false,
        "allocations": allocations, "unallocated": unallocated,
        "attributes": [{"handle_id": "k8s-pod-network.vm1", "secondary": {"namespace": ns, "pod": "virt-launcher-vm1-abcde", "node": "n1", "vmi-name": "vm1"}}],
        "sequenceNumber": 1, "sequenceNumberForAllocation": {"1": 1},
    }}));
    blocks.create(&PostParams::default(), &block).await.expect("block");

    let port = free_port();
    let _controller = start_controller(&cluster, &[], port, "kubevirt");
    // The launcher pod does not exist: without KubeVirt facts that alone would make it a leak
    // (upstream keeps VM allocations then, and so do we); with them, the existing VM keeps it.
    let started = Instant::now();
    while candidates(port).await.is_none() {
        assert!(started.elapsed() < DEADLINE, "no gc_candidates series for pool-vm");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several full passes (grace 2 s: one a second) with the VM present.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(candidates(port).await.as_deref(), Some("0"), "the VM exists: its allocation is no candidate");

    vms.delete("vm1", &DeleteParams::default()).await.expect("deleting the VM");
    let deleted = Instant::now();
    loop {
        if candidates(port).await.as_deref() == Some("1") {
            break;
        }
        assert!(deleted.elapsed() < DEADLINE, "the gone VM's allocation never became a candidate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A VM's leak is confirmed only after max(5 min, grace): the address is still allocated.
    let b = blocks.get("10-80-0-0-26").await.unwrap();
    assert_eq!(b.data["spec"]["allocations"][1], json!(0));
}
