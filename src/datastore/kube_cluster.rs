//! The Kubernetes reader over the real apiserver: pods, nodes, KubeVirt's `kubevirt.io/v1`
//! VirtualMachine(Instance)s and the other [`ClusterKind`]s (the `apps/v1` DaemonSet read by the
//! policy-name migrator) through `kube::Api<DynamicObject>`, KubeVirt discovery, `/healthz`.
//!
//! Owns: the [`ClusterReader`] mapping onto Kubernetes: which API resource each
//! [`ClusterKind`] is, setting `apiVersion`/`kind` on items of built-in kinds (the apiserver
//! leaves them out of list and watch items), paging, and counting single reads and list pages
//! as (verb, resource, code) in the shared [`ApiCounters`].
//! Must not: write, cache objects, or retry; single reads and list pages wait on the writer's
//! [`RequestLimiter`] (re-validation reads are part of the writer's traffic), watches and
//! `/healthz` never do. Timeouts belong to the callers.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use ::kube::Client;
use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use crate::model::pod::{PodSpecLite, PodStatusLite};

use super::cluster::{ClusterKind, ClusterReader};
use super::LIST_PAGE;
use super::kube::{ApiCounters, RequestLimiter, dynamic_to_stored, list_pages, status_code, to_error_on, watch_stream};
use super::watch::WatchStream;
use super::{DsResult, Stored};

/// KubeVirt's API group and version.
pub const KUBEVIRT_GROUP_VERSION: &str = "kubevirt.io/v1";

/// The API resource of a cluster kind.
pub fn cluster_resource(kind: ClusterKind) -> ApiResource {
    let kubevirt = |kind: &str| GroupVersionKind::gvk("kubevirt.io", "v1", kind);
    match kind {
        ClusterKind::Pod => ApiResource::erase::<Pod>(&()),
        ClusterKind::Node => ApiResource::erase::<Node>(&()),
        ClusterKind::VirtualMachine => ApiResource::from_gvk_with_plural(&kubevirt("VirtualMachine"), kind.plural()),
        ClusterKind::VirtualMachineInstance => ApiResource::from_gvk_with_plural(&kubevirt("VirtualMachineInstance"), kind.plural()),
        ClusterKind::Namespace => ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()),
        ClusterKind::ServiceAccount => ApiResource::erase::<k8s_openapi::api::core::v1::ServiceAccount>(&()),
        ClusterKind::NetworkPolicy => ApiResource::erase::<k8s_openapi::api::networking::v1::NetworkPolicy>(&()),
        ClusterKind::DaemonSet => ApiResource::erase::<k8s_openapi::api::apps::v1::DaemonSet>(&()),
        ClusterKind::Service => ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
    }
}

/// Kubernetes' own kinds over the API of `client`.
#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
    counters: Arc<ApiCounters>,
    limiter: RequestLimiter,
}

impl KubeCluster {
    /// `limiter`: the writer's (see [`super::kube::KubeDatastore::limiter`]), or
    /// `RequestLimiter::default()` for none.
    pub fn new(client: Client, counters: Arc<ApiCounters>, limiter: RequestLimiter) -> Self {
        KubeCluster { client, counters, limiter }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn to_stored(kind: ClusterKind, resource: &ApiResource, object: DynamicObject) -> DsResult<Stored> {
        dynamic_to_stored(object, &resource.api_version, &resource.kind, kind.plural())
    }
}

impl ClusterReader for KubeCluster {
    fn watch(&self, kind: ClusterKind) -> WatchStream {
        let resource = cluster_resource(kind);
        let api = Api::all_with(self.client.clone(), &resource);
        watch_stream(api, LIST_PAGE, move |object| Self::to_stored(kind, &resource, object))
    }

    fn watch_gc_pods(&self) -> WatchStream {
        watch_stream(Api::<GcPod>::all(self.client.clone()), LIST_PAGE, GcPod::into_stored)
    }

    async fn get(&self, kind: ClusterKind, namespace: &str, name: &str) -> DsResult<Stored> {
        let resource = cluster_resource(kind);
        let api: Api<DynamicObject> = if kind.namespaced() {
            Api::namespaced_with(self.client.clone(), namespace, &resource)
        } else {
            Api::all_with(self.client.clone(), &resource)
        };
        self.limiter.wait().await;
        let result = api.get(name).await;
        self.counters.observe("get", kind.plural(), 200, &result);
        let named = if kind.namespaced() { format!("{namespace}/{name}") } else { name.to_string() };
        let object = result.map_err(|e| to_error_on(kind.plural(), &named, "get", &e))?;
        Self::to_stored(kind, &resource, object)
    }

    async fn list_each(&self, kind: ClusterKind, sink: &mut (dyn FnMut(Stored) + Send)) -> DsResult<u64> {
        let resource = cluster_resource(kind);
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        list_pages(&api, &self.limiter, &self.counters, kind.plural(), LIST_PAGE, |object| {
            sink(Self::to_stored(kind, &resource, object)?);
            Ok(())
        })
        .await
    }

    async fn serves(&self, kind: ClusterKind) -> DsResult<bool> {
        if !kind.optional() {
            return Ok(true);
        }
        match self.client.list_api_group_resources(KUBEVIRT_GROUP_VERSION).await {
            Ok(list) => {
                let plurals = [ClusterKind::VirtualMachine.plural(), ClusterKind::VirtualMachineInstance.plural()];
                Ok(plurals.iter().all(|p| list.resources.iter().any(|r| r.name == *p)))
            }
            Err(e) if status_code(&e) == 404 => Ok(false),
            Err(e) => Err(to_error_on("apis", KUBEVIRT_GROUP_VERSION, "discover", &e)),
        }
    }

    async fn healthz(&self) -> Result<(), String> {
        let request = http::Request::get("/healthz").body(Vec::new()).map_err(|e| e.to_string())?;
        match self.client.request_text(request).await {
            Ok(body) if body.trim() == "ok" => Ok(()),
            Ok(body) => Err(format!("Error reaching apiserver: /healthz answered {:?}", body.trim())),
            Err(e) => Err(format!("Error reaching apiserver: {e}")),
        }
    }
}

/// A pod as the IPAM GC reads it, parsed straight from the API's JSON: the identity the watcher
/// needs and what [`PodLite`] reads; everything else (containers, volumes, conditions, labels,
/// managedFields, most annotations) is skipped without being built. Most of a pod is never read
/// by the GC, so a 30,000-pod list costs a fraction of the parse and none of the copies.
#[derive(Clone, Debug, Deserialize)]
struct GcPod {
    #[serde(deserialize_with = "gc_pod_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpecLite,
    #[serde(default)]
    status: PodStatusLite,
}

/// The part of a pod's metadata [`GcPod`] keeps.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GcPodMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    deletion_timestamp: Option<Time>,
    #[serde(default, deserialize_with = "crate::model::pod::calico_annotations")]
    annotations: BTreeMap<String, String>,
}

fn gc_pod_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = GcPodMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        annotations: (!m.annotations.is_empty()).then_some(m.annotations),
        ..ObjectMeta::default()
    })
}

impl kube::Resource for GcPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl GcPod {
    /// The seam's shape of what was kept: a pod body with only these fields.
    fn into_stored(self) -> DsResult<Stored> {
        let GcPod { metadata, spec, status } = self;
        let name = metadata.name.clone().unwrap_or_default();
        let encode = |e: serde_json::Error| super::DatastoreError::invalid(format!("pods {name} does not encode: {e}"));
        let value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": serde_json::to_value(&metadata).map_err(encode)?,
            "spec": serde_json::to_value(&spec).map_err(encode)?,
            "status": serde_json::to_value(&status).map_err(encode)?,
        });
        let (revision, uid) = (metadata.resource_version.unwrap_or_default(), metadata.uid.unwrap_or_default());
        Ok(Stored { name, revision, uid, value })
    }
}

impl super::cluster::StatusWriter for KubeCluster {
    async fn patch_status(&self, kind: ClusterKind, namespace: &str, name: &str, revision: &str, status: serde_json::Value) -> DsResult<Stored> {
        let resource = cluster_resource(kind);
        let api: Api<DynamicObject> = if kind.namespaced() { Api::namespaced_with(self.client.clone(), namespace, &resource) } else { Api::all_with(self.client.clone(), &resource) };
        // A resourceVersion in a merge patch is a precondition: 409 if the object moved on.
        let patch = serde_json::json!({"metadata": {"resourceVersion": revision}, "status": status});
        self.limiter.wait().await;
        let result = api.patch_status(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await;
        self.counters.observe("patch", kind.plural(), 200, &result);
        let object = result.map_err(|e| to_error_on(kind.plural(), &format!("{namespace}/{name}"), "patch status", &e))?;
        Self::to_stored(kind, &resource, object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_kinds_map_onto_their_api_resources() {
        let pods = cluster_resource(ClusterKind::Pod);
        assert_eq!((pods.api_version.as_str(), pods.kind.as_str(), pods.plural.as_str()), ("v1", "Pod", "pods"));
        assert_eq!(cluster_resource(ClusterKind::Node).plural, "nodes");
        let vmi = cluster_resource(ClusterKind::VirtualMachineInstance);
        assert_eq!((vmi.api_version.as_str(), vmi.kind.as_str(), vmi.plural.as_str()), ("kubevirt.io/v1", "VirtualMachineInstance", "virtualmachineinstances"));
        let ds = cluster_resource(ClusterKind::DaemonSet);
        assert_eq!((ds.api_version.as_str(), ds.kind.as_str(), ds.plural.as_str()), ("apps/v1", "DaemonSet", "daemonsets"));
        for kind in ClusterKind::ALL {
            assert_eq!(cluster_resource(kind).plural, kind.plural(), "{kind:?}");
        }
    }

    #[test]
    fn items_of_built_in_kinds_get_their_api_version_and_kind() {
        let mut object = DynamicObject::new("p", &cluster_resource(ClusterKind::Pod)).within("ns");
        object.types = None;
        object.metadata.resource_version = Some("7".into());
        let stored = KubeCluster::to_stored(ClusterKind::Pod, &cluster_resource(ClusterKind::Pod), object).unwrap();
        assert_eq!((stored.value["apiVersion"].as_str(), stored.value["kind"].as_str()), (Some("v1"), Some("Pod")));
        assert_eq!((stored.name.as_str(), stored.revision.as_str()), ("p", "7"));
        assert_eq!(stored.value["metadata"]["namespace"], "ns");
    }

    /// Pods of many shapes read through the GC's lean path and as whole objects give the GC the
    /// same facts.
    #[test]
    fn a_lean_pod_gives_the_gc_the_facts_of_the_whole_pod() {
        use crate::runtime::watch::{Object, Source, decode_stored};
        let pods = [
            serde_json::json!({"metadata": {"name": "a", "namespace": "ns", "uid": "u1", "resourceVersion": "5",
                    "labels": {"app": "x"}, "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
                    "annotations": {"cni.projectcalico.org/podIP": "10.0.0.1/32", "cni.projectcalico.org/podIPs": "10.0.0.1/32,fd00::1/128", "other": "y"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80}]}], "volumes": [{"name": "v"}]},
                "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "conditions": [{"type": "Ready"}]}}),
            serde_json::json!({"metadata": {"name": "b", "namespace": "ns", "uid": "u2", "resourceVersion": "6", "deletionTimestamp": "2026-01-02T03:04:05Z"},
                "spec": {"nodeName": "n2", "hostNetwork": true},
                "status": {"phase": "Failed", "reason": "Evicted"}}),
            serde_json::json!({"metadata": {"name": "c", "namespace": "kube-system", "uid": "u3", "resourceVersion": "7",
                    "annotations": {"vpc.amazonaws.com/pod-ips": "10.1.0.9"}},
                "spec": {}, "status": {"phase": "Pending", "podIP": "not-an-ip"}}),
            serde_json::json!({"metadata": {"name": "d", "namespace": "ns", "uid": "u4", "resourceVersion": "8"}}),
        ];
        for pod in pods {
            let whole: DynamicObject = serde_json::from_value(pod.clone()).unwrap();
            let whole = KubeCluster::to_stored(ClusterKind::Pod, &cluster_resource(ClusterKind::Pod), whole).unwrap();
            let lean: GcPod = serde_json::from_value(pod.clone()).unwrap();
            let lean = lean.into_stored().unwrap();
            assert_eq!((&lean.name, &lean.revision, &lean.uid), (&whole.name, &whole.revision, &whole.uid));
            let facts = |s: &Stored| match decode_stored(Source::Pods, s) {
                (Ok(Object::Pod(p)), invalid) => (*p, invalid.map(|i| i.problem)),
                other => panic!("not a pod: {other:?}"),
            };
            assert_eq!(facts(&lean), facts(&whole), "{pod}");
            assert!(lean.value.pointer("/spec/containers").is_none() && lean.value.pointer("/metadata/labels").is_none(), "{}", lean.value);
        }
    }
}
