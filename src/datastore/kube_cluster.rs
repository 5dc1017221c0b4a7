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

use std::sync::Arc;

use ::kube::Client;
use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use k8s_openapi::api::core::v1::{Node, Pod};

use super::cluster::{ClusterKind, ClusterReader};
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
        watch_stream(api, move |object| Self::to_stored(kind, &resource, object))
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
        list_pages(&api, &self.limiter, &self.counters, kind.plural(), |object| {
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
}
