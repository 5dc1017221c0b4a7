//! Events on the real API server: the recorder's Events pass events.k8s.io/v1 validation,
//! repeats within the series TTL are one Event whose `series.count` grows (the latest note in
//! an annotation, since the API server keeps `note` immutable), each node has its own Event, a
//! held mass change is a Warning on the KubeControllersConfiguration, an Event deleted under a
//! series is created again, and deploy/'s ServiceAccount may do all of it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use calico_kube_controllers::runtime::events::recorder::LATEST_NOTE_ANNOTATION;
use calico_kube_controllers::runtime::events::{self, EventCounters, EventOptions, Regarding};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::support::cluster::{private_cluster, shared_cluster, unique_name};
use crate::support::controller::{install_deploy_base, wait_for};

/// The Events this test's recorder wrote (its `reportingInstance` is unique to the test).
async fn events_of(api: &Api<Event>, instance: &str) -> Vec<Event> {
    let list = api.list(&ListParams::default()).await.expect("listing events");
    let mut mine: Vec<Event> = list.items.into_iter().filter(|e| e.reporting_instance.as_deref() == Some(instance)).collect();
    mine.sort_by_key(|e| e.regarding.as_ref().and_then(|r| r.name.clone()));
    mine
}

async fn wait_counts(counters: &EventCounters, created: u64, updated: u64) {
    let what = format!("{created} created and {updated} updated events");
    wait_for(&what, || async {
        let s = counters.snapshot();
        assert_eq!((s[2], s[3]), (("failed", 0), ("dropped", 0)), "no event may fail or be dropped: {s:?}");
        (s[0].1 == created && s[1].1 == updated).then_some(())
    })
    .await;
}

fn regarding_name(e: &Event) -> &str {
    e.regarding.as_ref().and_then(|r| r.name.as_deref()).unwrap_or_default()
}

#[tokio::test]
async fn three_batches_on_one_node_are_one_event_series_and_each_node_and_the_guard_have_their_own() {
    let cluster = shared_cluster();
    let client = cluster.client();
    let instance = unique_name("ckc-events");
    let counters = Arc::new(EventCounters::default());
    let (recorder, task) = events::spawn(client.clone(), EventOptions::with_instance(&instance), counters.clone());
    let (n1, n2) = (unique_name("n1"), unique_name("n2"));
    let node1 = Regarding::node(&n1, Some("0b8f5e3c-0000-4000-8000-000000000001"));
    recorder.addresses_released(&node1, 12, &[("pod-not-found", 10), ("node-deleted", 2)]);
    recorder.addresses_released(&node1, 3, &[("pod-not-found", 3)]);
    recorder.addresses_released(&node1, 1, &[("node-deleted", 1)]);
    recorder.node_ipam_released(&Regarding::node(&n2, None), "released 1 tunnel address and 4 pod addresses");
    recorder.mass_change_held("default", "address releases", 120, 400, "set-e2e", "held until a later observation confirms it");
    wait_counts(&counters, 3, 2).await;

    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    let mine = events_of(&api, &instance).await;
    assert_eq!(mine.len(), 3, "one Event per node and one for the guard: {mine:#?}");
    let e1 = mine.iter().find(|e| regarding_name(e) == n1).expect("n1's event");
    let series = e1.series.as_ref().expect("n1's event has a series");
    assert_eq!(series.count, 3);
    assert_eq!(e1.reason.as_deref(), Some(events::REASON_ADDRESSES_RELEASED));
    assert_eq!(e1.note.as_deref(), Some("released 12 addresses: 10 pod-not-found, 2 node-deleted"), "the first note stays");
    let latest = e1.metadata.annotations.as_ref().and_then(|a| a.get(LATEST_NOTE_ANNOTATION)).map(String::as_str);
    assert_eq!(latest, Some("released 1 address: 1 node-deleted"));
    let r1 = e1.regarding.as_ref().unwrap();
    assert_eq!((r1.api_version.as_deref(), r1.kind.as_deref()), (Some("v1"), Some("Node")));
    assert!(series.last_observed_time.0 >= e1.event_time.as_ref().expect("eventTime").0);

    let e2 = mine.iter().find(|e| regarding_name(e) == n2).expect("n2's event");
    assert!(e2.series.is_none(), "a single observation has no series");
    assert_eq!(e2.reason.as_deref(), Some(events::REASON_NODE_IPAM_RELEASED));
    let guard = mine.iter().find(|e| e.reason.as_deref() == Some(events::REASON_MASS_CHANGE_HELD)).expect("the guard's event");
    assert_eq!(guard.type_.as_deref(), Some("Warning"));
    let rg = guard.regarding.as_ref().unwrap();
    assert_eq!((rg.api_version.as_deref(), rg.kind.as_deref(), rg.name.as_deref()), (Some("crd.projectcalico.org/v1"), Some("KubeControllersConfiguration"), Some("default")));
    assert_eq!(guard.reporting_controller.as_deref(), Some(events::REPORTING_CONTROLLER));

    // Why the latest note goes to an annotation: events.k8s.io/v1 refuses to change a note.
    let name = e1.metadata.name.clone().unwrap();
    let refused = api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"note": "changed"}))).await;
    assert!(matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422), "changing a note: {refused:?}");

    drop(recorder);
    task.await.expect("the recorder task ends when its last handle is dropped");
}

#[tokio::test]
async fn an_event_deleted_under_its_series_is_created_again() {
    let cluster = shared_cluster();
    let client = cluster.client();
    let instance = unique_name("ckc-events-gone");
    let counters = Arc::new(EventCounters::default());
    let (recorder, _task) = events::spawn(client.clone(), EventOptions::with_instance(&instance), counters.clone());
    let node = Regarding::node(&unique_name("n-gone"), None);
    recorder.addresses_released(&node, 2, &[("pod-not-found", 2)]);
    wait_counts(&counters, 1, 0).await;
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    let first = events_of(&api, &instance).await;
    assert_eq!(first.len(), 1);
    let first_name = first[0].metadata.name.clone().unwrap();
    api.delete(&first_name, &DeleteParams::default()).await.expect("deleting the event");

    recorder.addresses_released(&node, 5, &[("pod-not-found", 5)]);
    wait_counts(&counters, 2, 0).await;
    let again = events_of(&api, &instance).await;
    assert_eq!(again.len(), 1, "{again:#?}");
    assert_ne!(again[0].metadata.name.as_deref(), Some(first_name.as_str()), "a new Event, not the deleted one");
    assert_eq!(again[0].note.as_deref(), Some("released 5 addresses: 5 pod-not-found"));
    assert!(again[0].series.is_none(), "a new series starts at one observation");
    assert_eq!(counters.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn the_deploy_service_account_may_create_and_patch_events() {
    let cluster = private_cluster();
    install_deploy_base(&cluster, "events").await;
    let client = cluster.client_for_service_account("kube-system", "calico-kube-controllers").await;
    let counters = Arc::new(EventCounters::default());
    let (recorder, _task) = events::spawn(client, EventOptions::with_instance("ckc-rbac-0"), counters.clone());
    let node = Regarding::node("n-rbac", None);
    recorder.node_ipam_released(&node, "released 1 tunnel address");
    recorder.node_ipam_released(&node, "released 2 pod addresses");
    recorder.mass_change_held("default", "node cleanups", 6, 10, "set-rbac", "approve it");
    // wait_counts fails at once on a refused write.
    wait_counts(&counters, 2, 1).await;
}
