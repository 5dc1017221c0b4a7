//! The LoadBalancer IP controller on the real API server (KDD, SPEC §6.6): a LoadBalancer Service
//! gets an address from the LoadBalancer pool in its status, claimed in a `virtual:load-balancer`
//! block with its handle; a requested address is honoured and, when taken, refused with an Event;
//! GC passes leave the addresses alone; a restarted controller gives no Service a second address;
//! a Service turned into ClusterIP or deleted frees its address, which another Service then gets.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::private_cluster;
use crate::support::controller::{ChildGuard, calico, free_port, start_controller, wait_for};

const POOL: &str = "203.0.113.0/28";

pub fn service(name: &str, annotations: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": name}}
    }))
    .unwrap()
}

pub fn ingress(s: &Service) -> Vec<String> {
    s.status.as_ref().and_then(|st| st.load_balancer.as_ref()).and_then(|lb| lb.ingress.clone()).unwrap_or_default().into_iter().filter_map(|i| i.ip).collect()
}

/// Every allocated address in the LoadBalancer blocks, with its handle.
async fn lb_allocations(blocks: &Api<DynamicObject>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for b in blocks.list(&ListParams::default()).await.expect("blocks").items {
        let spec = &b.data["spec"];
        if spec["affinity"] != "virtual:load-balancer" {
            continue;
        }
        let cidr: ipnet::IpNet = spec["cidr"].as_str().unwrap().parse().unwrap();
        for (ord, slot) in spec["allocations"].as_array().unwrap().iter().enumerate() {
            if let Some(a) = slot.as_u64() {
                let attr = &spec["attributes"][a as usize];
                if attr["releasedAt"].is_null() {
                    let ip = calico_kube_controllers::model::names::ordinal_to_ip(&cidr, ord as u32).to_string();
                    out.push((ip, attr["handle_id"].as_str().unwrap_or_default().to_string()));
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn load_balancer_services_get_pool_addresses_keep_them_across_restarts_and_free_them() {
    let cluster = private_cluster();
    let client = cluster.client();
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPPool", "ippools"));
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "lb-pool"},
        "spec": {"cidr": POOL, "blockSize": 29, "allowedUses": ["LoadBalancer"], "nodeSelector": "all()"}
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.expect("the LoadBalancer pool");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let blocks: Api<DynamicObject> = Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks"));
    let affinities: Api<DynamicObject> = Api::all_with(client.clone(), &calico("BlockAffinity", "blockaffinities"));

    let port = free_port();
    let start = |label: &str| start_controller(&cluster, &[], port, label);
    let mut controller: ChildGuard = start("lb-1");
    services.create(&PostParams::default(), &service("web", json!({}))).await.expect("web");
    services.create(&PostParams::default(), &service("pinned", json!({"projectcalico.org/loadBalancerIPs": "[\"203.0.113.9\"]"}))).await.expect("pinned");
    let web_ip = wait_for("web's address in its status", || async { ingress(&services.get("web").await.ok()?).first().cloned() }).await;
    let net: ipnet::IpNet = POOL.parse().unwrap();
    assert!(net.contains(&web_ip.parse::<std::net::IpAddr>().unwrap()), "{web_ip} is from the LoadBalancer pool");
    wait_for("pinned gets the address it asked for", || async { (ingress(&services.get("pinned").await.ok()?) == ["203.0.113.9"]).then_some(()) }).await;
    let allocs = lb_allocations(&blocks).await;
    assert_eq!(allocs.len(), 2, "one address each: {allocs:?}");
    assert!(allocs.iter().all(|(_, h)| h.starts_with("lb-")), "{allocs:?}");
    let affinity = affinities.list(&ListParams::default()).await.unwrap().items.into_iter().find(|a| a.data["spec"]["node"] == "load-balancer").expect("the virtual affinity");
    assert_eq!((affinity.data["spec"]["type"].as_str(), affinity.data["spec"]["state"].as_str()), (Some("virtual"), Some("confirmed")));

    // The same address again: refused, with an Event on the Service.
    services.create(&PostParams::default(), &service("taken", json!({"projectcalico.org/loadBalancerIPs": "[\"203.0.113.9\"]"}))).await.expect("taken");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let event = wait_for("the Event on the refused Service", || async {
        events.list(&ListParams::default()).await.ok()?.items.into_iter().find(|e| e.reason.as_deref() == Some("LoadBalancerIPAssignmentFailed") && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("taken"))
    })
    .await;
    assert!(event.note.as_deref().unwrap_or_default().contains("203.0.113.9"), "{:?}", event.note);
    assert!(ingress(&services.get("taken").await.unwrap()).is_empty());

    // GC passes (2 s grace here) leave the LoadBalancer addresses alone; a restart gives nobody
    // a second address.
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(controller);
    controller = start("lb-2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(lb_allocations(&blocks).await, allocs, "after GC passes and a restart: the same two addresses, nothing more\n{}", controller.log_text());
    assert_eq!(ingress(&services.get("web").await.unwrap()), std::slice::from_ref(&web_ip));

    // web becomes ClusterIP: its address goes. pinned is deleted: taken gets 203.0.113.9.
    let to_cluster_ip = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "targetPort": 8080, "nodePort": null}]}});
    services.patch("web", &PatchParams::default(), &Patch::Merge(&to_cluster_ip)).await.expect("web to ClusterIP");
    services.delete("pinned", &DeleteParams::default()).await.expect("deleting pinned");
    wait_for("taken gets the freed address", || async { (ingress(&services.get("taken").await.ok()?) == ["203.0.113.9"]).then_some(()) }).await;
    let left = wait_for("web's address freed", || async {
        let a = lb_allocations(&blocks).await;
        (a.len() == 1).then_some(a)
    })
    .await;
    assert_eq!(left[0].0, "203.0.113.9", "{left:?}");
    assert!(!controller.log_text().contains("panicked"), "{}", controller.log_text());
}
