//! End-to-end smoke tests of the test cluster itself: the objects our controllers read and
//! write are accepted (or refused) by a real kube-apiserver with the Calico CRDs, can be
//! listed and watched from Rust, and RBAC is enforced. They prove the harness, not the product.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::runtime::watcher;
use serde_json::json;

use crate::support::cluster::{
    MARKER_NAME, MARKER_NAMESPACE, private_cluster, set_pod_ips, shared_cluster, unique_name,
    unique_number,
};

const WATCH_DEADLINE: Duration = Duration::from_secs(20);

fn calico(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.projectcalico.org", "v1", kind),
        plural,
    )
}

fn calico_api(
    client: &kube::Client,
    kind: &str,
    plural: &str,
) -> (Api<DynamicObject>, ApiResource) {
    let resource = calico(kind, plural);
    (Api::all_with(client.clone(), &resource), resource)
}

fn object(
    resource: &ApiResource,
    name: &str,
    labels: serde_json::Value,
    spec: serde_json::Value,
) -> DynamicObject {
    let mut object = DynamicObject::new(name, resource).data(json!({ "spec": spec }));
    object.metadata.labels = serde_json::from_value(labels).expect("labels");
    object
}

/// A /26 in 10.0.0.0/8 that no other test of this process uses, with its KDD object name.
fn unique_block() -> (String, String) {
    let n = unique_number();
    let cidr = format!(
        "10.{}.{}.{}/26",
        100 + (n >> 10) % 100,
        (n >> 2) % 256,
        (n % 4) * 64
    );
    let name = cidr.replace(['.', '/'], "-");
    (cidr, name)
}

fn api_status(error: kube::Error) -> u16 {
    match error {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error status, got {other}"),
    }
}

#[tokio::test]
async fn pod_on_a_node_gets_its_ips_through_the_status_subresource() {
    let cluster = shared_cluster();
    let client = cluster.client();
    let namespace = cluster
        .namespace_with_default_service_account(&client, "smoke-pod")
        .await;

    let nodes: Api<Node> = Api::all(client.clone());
    let node_name = unique_name("smoke-node");
    let node: Node = serde_json::from_value(json!({ "metadata": { "name": node_name } })).unwrap();
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("creating a node");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "nodeName": node_name, "containers": [{ "name": "web", "image": "registry.invalid/web:1" }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating a pod (its namespace has a default ServiceAccount)");

    let updated = set_pod_ips(&pods, "web", &["10.1.2.3", "fd00::3"]).await;
    let status = updated.status.expect("status");
    assert_eq!(status.pod_ip.as_deref(), Some("10.1.2.3"));
    let listed: Vec<String> = status
        .pod_ips
        .unwrap_or_default()
        .into_iter()
        .map(|ip| ip.ip)
        .collect();
    assert_eq!(listed, ["10.1.2.3", "fd00::3"]);
    let read = pods.get("web").await.expect("reading the pod back");
    assert_eq!(
        read.status.and_then(|s| s.pod_ip).as_deref(),
        Some("10.1.2.3")
    );

    // No kubelet: a bound pod only goes away with a zero grace period.
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .expect("deleting the pod");
    nodes
        .delete(&node_name, &DeleteParams::default())
        .await
        .expect("deleting the node");
}

#[tokio::test]
async fn ipam_objects_are_accepted_listed_and_watched() {
    let cluster = shared_cluster();
    let client = cluster.client();
    let run = unique_name("smoke-ipam");
    let selector = format!("ckc-test={run}");
    let labels = json!({ "ckc-test": run });
    let node = format!("{run}-node");
    let (cidr, block_name) = unique_block();
    let handle_id = format!("k8s-pod-network.{run}");

    let (blocks, block_resource) = calico_api(&client, "IPAMBlock", "ipamblocks");
    let (affinities, affinity_resource) = calico_api(&client, "BlockAffinity", "blockaffinities");
    let (handles, handle_resource) = calico_api(&client, "IPAMHandle", "ipamhandles");

    let mut events = watcher(blocks.clone(), watcher::Config::default().labels(&selector)).boxed();
    // The watch is established once the (empty) initial list is done.
    tokio::time::timeout(WATCH_DEADLINE, async {
        while let Some(event) = events.try_next().await.expect("watching ipamblocks") {
            if matches!(event, watcher::Event::InitDone) {
                break;
            }
        }
    })
    .await
    .expect("watch initial list");

    let mut allocations = vec![serde_json::Value::Null; 64];
    allocations[0] = json!(0);
    let block = object(
        &block_resource,
        &block_name,
        labels.clone(),
        json!({
            "cidr": cidr,
            "affinity": format!("host:{node}"),
            "affinityClaimTime": "2026-01-02T03:04:05Z",
            "strictAffinity": false,
            "deleted": false,
            "allocations": allocations,
            "unallocated": (1..64).collect::<Vec<_>>(),
            "attributes": [{
                "handle_id": handle_id,
                "secondary": { "namespace": "default", "node": node, "pod": "web", "timestamp": "2026-01-02 03:04:05.1 +0000 UTC" },
            }],
            "sequenceNumber": 7,
            "sequenceNumberForAllocation": { "0": 6 },
        }),
    );
    let created = blocks
        .create(&PostParams::default(), &block)
        .await
        .expect("creating an IPAMBlock");
    let affinity = object(
        &affinity_resource,
        &format!("{node}-{block_name}"),
        labels.clone(),
        json!({ "cidr": cidr, "node": node, "state": "confirmed", "type": "host", "deleted": "false" }),
    );
    affinities
        .create(&PostParams::default(), &affinity)
        .await
        .expect("creating a BlockAffinity");
    let handle = object(
        &handle_resource,
        &handle_id.to_lowercase(),
        labels.clone(),
        json!({ "handleID": handle_id, "block": { cidr.clone(): 1 }, "deleted": false }),
    );
    handles
        .create(&PostParams::default(), &handle)
        .await
        .expect("creating an IPAMHandle");

    let params = ListParams::default().labels(&selector);
    assert_eq!(
        blocks
            .list(&params)
            .await
            .expect("listing blocks")
            .items
            .len(),
        1
    );
    assert_eq!(
        affinities
            .list(&params)
            .await
            .expect("listing affinities")
            .items
            .len(),
        1
    );
    let listed_handles = handles.list(&params).await.expect("listing handles").items;
    assert_eq!(listed_handles.len(), 1);
    assert_eq!(listed_handles[0].data["spec"]["block"][&cidr], 1);

    // Release ordinal 0 the way Calico writes it: free slot, back on the unallocated list.
    let mut released = created.clone();
    released.data["spec"]["allocations"][0] = serde_json::Value::Null;
    released.data["spec"]["unallocated"] = json!((0..64).collect::<Vec<_>>());
    released.data["spec"]["attributes"] = json!([]);
    released.data["spec"]["sequenceNumber"] = json!(8);
    released.data["spec"]["sequenceNumberForAllocation"] = json!({});
    blocks
        .replace(&block_name, &PostParams::default(), &released)
        .await
        .expect("updating the IPAMBlock");

    let seen = tokio::time::timeout(WATCH_DEADLINE, async {
        while let Some(event) = events.try_next().await.expect("watching ipamblocks") {
            if let watcher::Event::Apply(object) = event
                && object.data["spec"]["sequenceNumber"] == 8
            {
                return object;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("the watch did not show the block update in time");
    assert!(seen.data["spec"]["allocations"][0].is_null());

    blocks
        .delete(&block_name, &DeleteParams::default())
        .await
        .expect("deleting the block");
    let deleted = tokio::time::timeout(WATCH_DEADLINE, async {
        while let Some(event) = events.try_next().await.expect("watching ipamblocks") {
            if let watcher::Event::Delete(object) = event {
                return object;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("the watch did not show the deletion in time");
    assert_eq!(deleted.metadata.name.as_deref(), Some(block_name.as_str()));
    affinities
        .delete_collection(&DeleteParams::default(), &params)
        .await
        .expect("deleting affinities");
    handles
        .delete_collection(&DeleteParams::default(), &params)
        .await
        .expect("deleting handles");
}

#[tokio::test]
async fn malformed_ipam_blocks_are_refused_by_the_schema() {
    let cluster = shared_cluster();
    let client = cluster.client();
    let (blocks, resource) = calico_api(&client, "IPAMBlock", "ipamblocks");
    let (cidr, name) = unique_block();
    let well_formed = json!({
        "cidr": cidr, "strictAffinity": false, "allocations": [null], "unallocated": [0], "attributes": [],
    });

    let mut allocations_as_string = well_formed.clone();
    allocations_as_string["allocations"] = json!("0,1,2");
    let error = blocks
        .create(
            &PostParams::default(),
            &object(&resource, &name, json!({}), allocations_as_string),
        )
        .await
        .expect_err("a block whose allocations are a string must be refused");
    assert_eq!(api_status(error), 422);

    let mut without_cidr = well_formed.clone();
    without_cidr.as_object_mut().unwrap().remove("cidr");
    let error = blocks
        .create(
            &PostParams::default(),
            &object(&resource, &name, json!({}), without_cidr),
        )
        .await
        .expect_err("a block without cidr must be refused");
    assert_eq!(api_status(error), 422);

    // The same object, well formed, goes in: the refusals were about the fields.
    blocks
        .create(
            &PostParams::default(),
            &object(&resource, &name, json!({}), well_formed),
        )
        .await
        .expect("well-formed block");
    blocks
        .delete(&name, &DeleteParams::default())
        .await
        .expect("deleting the block");
}

#[tokio::test]
async fn service_account_without_rbac_rights_cannot_list_ipam_blocks() {
    let cluster = shared_cluster();
    let admin = cluster.client();
    let namespace = cluster
        .namespace_with_default_service_account(&admin, "smoke-rbac")
        .await;
    let client = cluster
        .client_for_service_account(&namespace, "default")
        .await;

    let (blocks, _) = calico_api(&client, "IPAMBlock", "ipamblocks");
    let error = blocks
        .list(&ListParams::default())
        .await
        .expect_err("listing ipamblocks without RBAC rights");
    assert_eq!(api_status(error), 403);

    // The token itself is good: the API server knows who is asking.
    let (admin_blocks, _) = calico_api(&admin, "IPAMBlock", "ipamblocks");
    admin_blocks
        .list(&ListParams::default().limit(1))
        .await
        .expect("the admin may list ipamblocks");
}

#[tokio::test]
async fn private_cluster_is_separate_and_gone_after_drop() {
    let cluster = private_cluster();
    let client = cluster.client();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), MARKER_NAMESPACE);
    let marker = maps.get(MARKER_NAME).await.expect("the harness marker");
    let dir = cluster
        .dir
        .clone()
        .expect("a private cluster has a directory");
    assert_eq!(
        marker
            .data
            .unwrap_or_default()
            .get("dir")
            .map(String::as_str),
        dir.to_str()
    );

    let namespace = unique_name("smoke-private");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": namespace } })).unwrap();
    namespaces
        .create(&PostParams::default(), &object)
        .await
        .expect("creating a namespace");
    let shared: Api<Namespace> = Api::all(shared_cluster().client());
    assert!(
        shared
            .get_opt(&namespace)
            .await
            .expect("reading the shared cluster")
            .is_none()
    );

    let apiserver: u32 = std::fs::read_to_string(dir.join("pids/kube-apiserver.pid"))
        .expect("kube-apiserver pid file")
        .trim()
        .parse()
        .expect("a pid");
    drop(cluster);
    let state = std::fs::read_to_string(format!("/proc/{apiserver}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.split(' ').nth(2) == Some("Z"),
        "kube-apiserver {apiserver} still runs"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
