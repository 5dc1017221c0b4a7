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
    let opts = Options { prefix: format!("{}-", unique_name("conf")), unknown_spec_fields: false, ..Default::default() };
    run_all(&ds, &opts).await.unwrap_or_else(|law| panic!("KubeDatastore broke a law: {law}"));
    let calls = counters.snapshot();
    assert!(calls.iter().any(|((verb, res, code), _)| *verb == "update" && *res == "ipamhandles" && *code == 409), "{calls:?}");
}

#[tokio::test]
async fn kube_datastore_watches_keep_the_watch_laws() {
    let cluster = shared_cluster();
    let ds = KubeDatastore::new(cluster.client(), false, Arc::new(ApiCounters::default()));
    let opts = Options { prefix: format!("{}-", unique_name("confw")), unknown_spec_fields: false, ..Default::default() };
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

#[tokio::test]
async fn kube_cluster_reads_pods_lists_them_whole_and_watches_them_with_their_kind() {
    use calico_kube_controllers::datastore::kube::RequestLimiter;
    use calico_kube_controllers::datastore::kube_cluster::KubeCluster;
    use calico_kube_controllers::datastore::{ClusterKind, ClusterReader, Stored, WatchEvent};
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};

    let cluster = shared_cluster();
    let client = cluster.client();
    let ns = cluster.namespace_with_default_service_account(&client, "kcluster").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "registry.invalid/c:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.expect("pod");

    let counters = Arc::new(ApiCounters::default());
    let reader = KubeCluster::new(client, counters.clone(), RequestLimiter::default());
    let got = reader.get(ClusterKind::Pod, &ns, "p").await.expect("the pod");
    assert_eq!((got.value["apiVersion"].as_str(), got.value["kind"].as_str()), (Some("v1"), Some("Pod")));
    assert_eq!(got.value["metadata"]["namespace"], json!(ns));
    assert!(reader.get(ClusterKind::Pod, &ns, "missing").await.unwrap_err().is_not_found());
    let calls = counters.snapshot();
    for code in [200, 404] {
        assert!(calls.iter().any(|(k, _)| *k == ("get", "pods", code)), "{calls:?}");
    }

    let mut listed: Vec<Stored> = Vec::new();
    let mut sink = |s: Stored| listed.push(s);
    reader.list_each(ClusterKind::Pod, &mut sink).await.expect("list pods");
    let mine = listed.iter().find(|s| s.name == "p" && s.value["metadata"]["namespace"] == json!(ns)).expect("listed");
    assert_eq!((mine.value["kind"].as_str(), mine.revision.as_str()), (Some("Pod"), got.revision.as_str()));

    assert!(reader.serves(ClusterKind::Node).await.unwrap());
    assert!(!reader.serves(ClusterKind::VirtualMachine).await.unwrap(), "the shared cluster has no KubeVirt");
    reader.healthz().await.expect("the apiserver is healthy");

    let mut stream = reader.watch(ClusterKind::Pod);
    let found = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(event) = stream.next().await {
            match event {
                WatchEvent::InitApply(s) if s.name == "p" && s.value["metadata"]["namespace"] == json!(ns) => return Some(s),
                WatchEvent::InitDone => return None,
                _ => {}
            }
        }
        None
    })
    .await
    .expect("the first list within 30s")
    .expect("the pod in the watch's first list");
    assert_eq!((found.value["apiVersion"].as_str(), found.value["kind"].as_str()), (Some("v1"), Some("Pod")));
}
