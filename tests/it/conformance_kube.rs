//! The datastore conformance suite (CAS, soft-delete and watch laws) against [`KubeDatastore`]
//! on the real test cluster, and the dry-run switch that must write nothing.

use std::sync::Arc;

use calico_kube_controllers::datastore::conformance::{Options, run_all, run_watch};
use calico_kube_controllers::datastore::kube::{ApiCounters, KubeDatastore};
use calico_kube_controllers::datastore::{Datastore, ErrorKind, Kind};
use serde_json::json;

use crate::support::cluster::{shared_cluster, unique_name};

#[tokio::test]
async fn kube_datastore_keeps_the_cas_and_soft_delete_laws() {
    let cluster = shared_cluster();
    let counters = Arc::new(ApiCounters::default());
    let ds = KubeDatastore::new(cluster.client(), false, counters.clone());
    // The CRD schema prunes unknown spec fields, so only metadata round-trips are checked.
    let opts = Options { prefix: format!("{}-", unique_name("conf")), unknown_spec_fields: false };
    run_all(&ds, &opts).await.unwrap_or_else(|law| panic!("KubeDatastore broke a law: {law}"));
    let calls = counters.snapshot();
    assert!(calls.iter().any(|((verb, res, code), _)| *verb == "update" && *res == "ipamhandles" && *code == 409), "{calls:?}");
}

#[tokio::test]
async fn kube_datastore_watches_keep_the_watch_laws() {
    let cluster = shared_cluster();
    let ds = KubeDatastore::new(cluster.client(), false, Arc::new(ApiCounters::default()));
    let opts = Options { prefix: format!("{}-", unique_name("confw")), unknown_spec_fields: false };
    // The suite has no clock: a watch that never delivers its event would wait forever.
    let laws = tokio::time::timeout(std::time::Duration::from_secs(60), run_watch(&ds, &opts)).await.expect("the watch laws finished within 60s");
    laws.unwrap_or_else(|law| panic!("KubeDatastore's watch broke a law: {law}"));
}

#[tokio::test]
async fn dry_run_datastore_writes_nothing() {
    let cluster = shared_cluster();
    let counters = Arc::new(ApiCounters::default());
    let ds = KubeDatastore::new(cluster.client(), true, counters.clone());
    let name = unique_name("dry-handle");
    let body = json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle",
        "metadata": {"name": name},
        "spec": {"handleID": name, "block": {"10.251.0.0/30": 1}, "deleted": false}
    });
    let created = ds.create(Kind::IpamHandle, &name, body).await.expect("a dry-run create succeeds");
    ds.update(Kind::IpamHandle, &created).await.expect("a dry-run update succeeds");
    ds.delete(Kind::IpamHandle, &name, &created.exact()).await.expect("a dry-run delete succeeds");
    let err = ds.get(Kind::IpamHandle, &name).await.expect_err("nothing was written");
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(counters.snapshot().iter().all(|((verb, _, _), _)| *verb == "get"), "only the read reached the server");
}
