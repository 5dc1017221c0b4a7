//! The Kubernetes reader: the objects the GC judges allocations against, which live in
//! Kubernetes whatever Calico's datastore is (pods, nodes, KubeVirt's VMs), and the apiserver's
//! own health. The GC loop, start-up and health checks see Kubernetes only through this trait.
//!
//! Owns: [`ClusterKind`] and the [`ClusterReader`] trait (list + watch with the protocol of
//! [`super::watch`], single reads for re-validation and the migrator's DaemonSet gate, discovery,
//! `/healthz`).
//! Must not: import tokio or kube (part of the pure core), write anything, or cache objects.

use serde_json::Value;
use std::future::Future;

use super::watch::WatchStream;
use super::{DsResult, Stored};

/// The Kubernetes kinds the controller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClusterKind {
    Pod,
    Node,
    VirtualMachine,
    VirtualMachineInstance,
    /// Read by the etcd-mode profile and policy controllers.
    Namespace,
    ServiceAccount,
    NetworkPolicy,
    /// `apps/v1`: only read, one object at a time (the policy-name migrator's gate on the
    /// `calico-node` rollout); never watched.
    DaemonSet,
    /// Watched by the LoadBalancer controller, which also writes their `status.loadBalancer`.
    Service,
}

impl ClusterKind {
    pub const ALL: [ClusterKind; 9] = [
        ClusterKind::Pod,
        ClusterKind::Node,
        ClusterKind::VirtualMachine,
        ClusterKind::VirtualMachineInstance,
        ClusterKind::Namespace,
        ClusterKind::ServiceAccount,
        ClusterKind::NetworkPolicy,
        ClusterKind::DaemonSet,
        ClusterKind::Service,
    ];

    /// The resource plural; also a bounded metric label.
    pub fn plural(self) -> &'static str {
        match self {
            ClusterKind::Pod => "pods",
            ClusterKind::Node => "nodes",
            ClusterKind::VirtualMachine => "virtualmachines",
            ClusterKind::VirtualMachineInstance => "virtualmachineinstances",
            ClusterKind::Namespace => "namespaces",
            ClusterKind::ServiceAccount => "serviceaccounts",
            ClusterKind::NetworkPolicy => "networkpolicies",
            ClusterKind::DaemonSet => "daemonsets",
            ClusterKind::Service => "services",
        }
    }

    /// The objects' `kind`.
    pub fn kind_name(self) -> &'static str {
        match self {
            ClusterKind::Pod => "Pod",
            ClusterKind::Node => "Node",
            ClusterKind::VirtualMachine => "VirtualMachine",
            ClusterKind::VirtualMachineInstance => "VirtualMachineInstance",
            ClusterKind::Namespace => "Namespace",
            ClusterKind::ServiceAccount => "ServiceAccount",
            ClusterKind::NetworkPolicy => "NetworkPolicy",
            ClusterKind::DaemonSet => "DaemonSet",
            ClusterKind::Service => "Service",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, ClusterKind::Node | ClusterKind::Namespace)
    }

    /// Served only where KubeVirt is installed.
    pub fn optional(self) -> bool {
        matches!(self, ClusterKind::VirtualMachine | ClusterKind::VirtualMachineInstance)
    }
}

/// Read access to Kubernetes. [`Stored::name`] is the object's `metadata.name`; the namespace is
/// in the body (`metadata.namespace`).
pub trait ClusterReader: Send + Sync {
    /// List + watch of every object of `kind`, in all namespaces.
    fn watch(&self, kind: ClusterKind) -> WatchStream;

    /// The pods as the IPAM GC reads them, with [`ClusterReader::watch`]'s protocol: each object
    /// carries at least what [`crate::model::PodLite`] reads, and a backend may leave the rest
    /// out (unparsed, never held). By default the whole pods.
    fn watch_gc_pods(&self) -> WatchStream {
        self.watch(ClusterKind::Pod)
    }

    /// One object, or `NotFound`. `namespace` is ignored for cluster-scoped kinds.
    fn get(&self, kind: ClusterKind, namespace: &str, name: &str) -> impl Future<Output = DsResult<Stored>> + Send;

    /// Every object of `kind`, handed to `sink` page by page as it arrives (a large cluster's
    /// pods are never all in memory at once). `NotFound` if the cluster does not serve the kind.
    fn list_each(&self, kind: ClusterKind, sink: &mut (dyn FnMut(Stored) + Send)) -> impl Future<Output = DsResult<u64>> + Send;

    /// Whether the cluster serves `kind` now (KubeVirt's kinds may be installed later).
    fn serves(&self, kind: ClusterKind) -> impl Future<Output = DsResult<bool>> + Send;

    /// The apiserver's `/healthz`: `Ok` when it answers `ok`, else why not.
    fn healthz(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// The one write to Kubernetes' own objects besides Events: a merge patch of an object's
/// `status` subresource, refused (`Conflict`) unless the object is still at `revision`.
pub trait StatusWriter: Send + Sync {
    fn patch_status(&self, kind: ClusterKind, namespace: &str, name: &str, revision: &str, status: Value) -> impl Future<Output = DsResult<Stored>> + Send;
}
