//! Watches into one channel: a task per kind runs `kube::runtime::watcher` (paged initial list,
//! then a watch, restarted with backoff), trims every object on arrival (a Pod becomes
//! [`PodFacts`] at once, never cached whole) and sends it to the single task that owns the index.
//!
//! Owns: which kinds are watched (KubeVirt's only once discovery shows them), how each is
//! decoded, the [`Input`] protocol, and reporting a watch the apiserver refuses (401/403/404) as
//! a not-ready condition naming the resource.
//! Must not: touch the index or decide anything; a malformed object is reported, not dropped
//! silently, and never stops the stream.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::Shared;
use crate::datastore::Kind;
use crate::datastore::kube::api_resource;
use crate::health;
use crate::model::{
    BlockAffinity, ClusterInformation, InvalidObject, IpPool, IpReservation, IpamBlock, IpamConfig, IpamHandle, KubeControllersConfiguration, NodeLite,
    PodFacts, PodLite,
};

/// Which watch an input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Pods,
    Nodes,
    Blocks,
    Affinities,
    Handles,
    ClusterInformation,
    KubeControllersConfiguration,
    IpamConfig,
    Pools,
    Reservations,
    /// KubeVirt's kinds: watched only once the cluster serves them, and not part of
    /// [`Source::ALL`], so a cluster without KubeVirt is ready without them.
    VirtualMachines,
    VirtualMachineInstances,
}

impl Source {
    pub const ALL: [Source; 10] = [
        Source::Pods,
        Source::Nodes,
        Source::Blocks,
        Source::Affinities,
        Source::Handles,
        Source::ClusterInformation,
        Source::KubeControllersConfiguration,
        Source::IpamConfig,
        Source::Pools,
        Source::Reservations,
    ];

    /// A bounded label (the resource plural).
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Pods => "pods",
            Source::Nodes => "nodes",
            Source::Blocks => Kind::IpamBlock.plural(),
            Source::Affinities => Kind::BlockAffinity.plural(),
            Source::Handles => Kind::IpamHandle.plural(),
            Source::ClusterInformation => Kind::ClusterInformation.plural(),
            Source::KubeControllersConfiguration => Kind::KubeControllersConfiguration.plural(),
            Source::IpamConfig => Kind::IpamConfig.plural(),
            Source::Pools => Kind::IpPool.plural(),
            Source::Reservations => Kind::IpReservation.plural(),
            Source::VirtualMachines => "virtualmachines",
            Source::VirtualMachineInstances => "virtualmachineinstances",
        }
    }
}

/// One object, trimmed to what the controller keeps.
#[derive(Debug, Clone)]
pub enum Object {
    Pod(Box<PodFacts>),
    Node(NodeLite),
    Block(Box<IpamBlock>),
    Affinity(BlockAffinity),
    Handle(IpamHandle),
    ClusterInformation(Box<ClusterInformation>),
    KubeControllersConfiguration(Box<KubeControllersConfiguration>),
    IpamConfig(Box<IpamConfig>),
    Pool(IpPool),
    Reservation(IpReservation),
    VirtualMachine(KubeVirtObject),
    VirtualMachineInstance(KubeVirtObject),
}

/// What the GC needs of a KubeVirt VirtualMachine or VirtualMachineInstance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeVirtObject {
    pub namespace: String,
    pub name: String,
    /// A VirtualMachine owns this instance (only meaningful for instances).
    pub owned_by_vm: bool,
}

impl KubeVirtObject {
    fn from_dynamic(o: &DynamicObject) -> Result<Self, InvalidObject> {
        let name = o.metadata.name.clone().unwrap_or_default();
        let namespace = o.metadata.namespace.clone().unwrap_or_default();
        if name.is_empty() || namespace.is_empty() {
            return Err(InvalidObject::new("KubeVirt", &name, "no name or namespace".to_string()));
        }
        let owned_by_vm = o.metadata.owner_references.iter().flatten().any(|r| r.kind == "VirtualMachine");
        Ok(KubeVirtObject { namespace, name, owned_by_vm })
    }
}

/// The watcher protocol, per source: `Init`, `InitApply`*, `InitDone` on every (re)list, then
/// `Apply`/`Delete`. `Invalid` reports an object that did not decode.
#[derive(Debug)]
pub enum Change {
    Init,
    InitApply(Object),
    InitDone,
    Apply(Object),
    Delete(Object),
    Invalid(InvalidObject),
}

#[derive(Debug)]
pub struct Input {
    pub source: Source,
    pub change: Change,
}

fn decode_as<T: DeserializeOwned>(kind: &str, o: &DynamicObject) -> Result<T, InvalidObject> {
    let name = o.metadata.name.clone().unwrap_or_default();
    let value = serde_json::to_value(o).map_err(|e| InvalidObject::new(kind, &name, e.to_string()))?;
    serde_json::from_value(value).map_err(|e| InvalidObject::new(kind, &name, e.to_string()))
}

/// Decodes one object of `source`. A pod is trimmed here, so the whole object is dropped as soon
/// as this returns; an unparsable pod IP is reported but the pod's facts are still kept.
pub fn decode(source: Source, o: &DynamicObject) -> (Result<Object, InvalidObject>, Option<InvalidObject>) {
    let r = match source {
        Source::Pods => match decode_as::<PodLite>("Pod", o) {
            Ok(lite) => {
                let (facts, invalid) = PodFacts::from_lite(&lite);
                return (Ok(Object::Pod(Box::new(facts))), invalid);
            }
            Err(e) => Err(e),
        },
        Source::Nodes => decode_as("Node", o).map(Object::Node),
        Source::Blocks => decode_as("IPAMBlock", o).map(|b| Object::Block(Box::new(b))),
        Source::Affinities => decode_as("BlockAffinity", o).map(Object::Affinity),
        Source::Handles => decode_as("IPAMHandle", o).map(Object::Handle),
        Source::ClusterInformation => decode_as("ClusterInformation", o).map(|c| Object::ClusterInformation(Box::new(c))),
        Source::KubeControllersConfiguration => {
            decode_as("KubeControllersConfiguration", o).map(|c| Object::KubeControllersConfiguration(Box::new(c)))
        }
        Source::IpamConfig => decode_as("IPAMConfig", o).map(|c| Object::IpamConfig(Box::new(c))),
        Source::Pools => decode_as("IPPool", o).map(Object::Pool),
        Source::Reservations => decode_as("IPReservation", o).map(Object::Reservation),
        Source::VirtualMachines => KubeVirtObject::from_dynamic(o).map(Object::VirtualMachine),
        Source::VirtualMachineInstances => KubeVirtObject::from_dynamic(o).map(Object::VirtualMachineInstance),
    };
    (r, None)
}

fn resource(source: Source) -> ApiResource {
    match source {
        Source::Pods => ApiResource::erase::<Pod>(&()),
        Source::Nodes => ApiResource::erase::<Node>(&()),
        Source::Blocks => api_resource(Kind::IpamBlock),
        Source::Affinities => api_resource(Kind::BlockAffinity),
        Source::Handles => api_resource(Kind::IpamHandle),
        Source::ClusterInformation => api_resource(Kind::ClusterInformation),
        Source::KubeControllersConfiguration => api_resource(Kind::KubeControllersConfiguration),
        Source::IpamConfig => api_resource(Kind::IpamConfig),
        Source::Pools => api_resource(Kind::IpPool),
        Source::Reservations => api_resource(Kind::IpReservation),
        Source::VirtualMachines => kubevirt_resource("VirtualMachine", "virtualmachines"),
        Source::VirtualMachineInstances => kubevirt_resource("VirtualMachineInstance", "virtualmachineinstances"),
    }
}

/// KubeVirt's API group and version.
pub const KUBEVIRT_GROUP_VERSION: &str = "kubevirt.io/v1";
/// How often a cluster without KubeVirt is asked again whether it has it now: installing
/// KubeVirt is rare, and until its VMs are known their allocations are simply kept (valid), so
/// a minute of delay costs nothing but one discovery request per minute.
const KUBEVIRT_PROBE: std::time::Duration = std::time::Duration::from_secs(60);

fn kubevirt_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&kube::api::GroupVersionKind::gvk("kubevirt.io", "v1", kind), plural)
}

/// Waits until the cluster serves KubeVirt's VirtualMachines and VirtualMachineInstances, then
/// watches both. Never ends before the receiver is gone.
async fn watch_kubevirt_when_installed(client: Client, tx: mpsc::Sender<Input>, shared: Arc<Shared>) {
    loop {
        match client.list_api_group_resources(KUBEVIRT_GROUP_VERSION).await {
            Ok(list) if ["virtualmachines", "virtualmachineinstances"].iter().all(|r| list.resources.iter().any(|x| x.name == *r)) => {
                tracing::info!("KubeVirt found: watching VirtualMachines and VirtualMachineInstances");
                futures::join!(
                    watch_one(client.clone(), Source::VirtualMachines, tx.clone(), shared.clone()),
                    watch_one(client.clone(), Source::VirtualMachineInstances, tx.clone(), shared.clone())
                );
                return;
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::debug!(error = %e, "KubeVirt discovery failed; asking again later"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(KUBEVIRT_PROBE).await;
    }
}

/// Starts one watch task per source, all feeding `tx`. The tasks end when the receiver is gone.
pub fn spawn_all(client: &Client, tx: &mpsc::Sender<Input>, shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks: Vec<_> =
        Source::ALL.iter().map(|&source| tokio::spawn(watch_one(client.clone(), source, tx.clone(), shared.clone()))).collect();
    tasks.push(tokio::spawn(watch_kubevirt_when_installed(client.clone(), tx.clone(), shared.clone())));
    tasks
}

/// The HTTP status inside a watcher error, if the apiserver answered.
fn watch_error_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(k) | watcher::Error::WatchStartFailed(k) | watcher::Error::WatchFailed(k) => match k {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        },
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => None,
    }
}

/// Errors that retrying will not fix (no permission, no such resource): they make the process
/// not ready, with a reason naming the resource, until the watch works again.
fn is_configuration_error(code: Option<u16>) -> bool {
    matches!(code, Some(401 | 403 | 404))
}

async fn watch_one(client: Client, source: Source, tx: mpsc::Sender<Input>, shared: Arc<Shared>) {
    let key = health::watch_key(source.as_str());
    let mut refused = false;
    let api: Api<DynamicObject> = Api::all_with(client, &resource(source));
    // Default config: ListWatch with 500-object pages for the initial list.
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        if refused && event.is_ok() {
            refused = false;
            shared.status.set_ready(&key, true, "");
        }
        let change = match event {
            Ok(watcher::Event::Init) => Change::Init,
            Ok(watcher::Event::InitDone) => Change::InitDone,
            Ok(watcher::Event::InitApply(o)) => match send_invalid(&tx, source, decode(source, &o)).await {
                Some(obj) => Change::InitApply(obj),
                None => continue,
            },
            Ok(watcher::Event::Apply(o)) => match send_invalid(&tx, source, decode(source, &o)).await {
                Some(obj) => Change::Apply(obj),
                None => continue,
            },
            Ok(watcher::Event::Delete(o)) => match decode(source, &o).0 {
                Ok(obj) => Change::Delete(obj),
                Err(e) => {
                    tracing::warn!(source = source.as_str(), error = %e, "deleted object did not decode");
                    continue;
                }
            },
            Err(e) => {
                // The backoff wrapper retries; a 410 Gone restarts with a fresh list (Init).
                tracing::warn!(source = source.as_str(), error = %e, "watch error");
                let code = watch_error_code(&e);
                if is_configuration_error(code) {
                    refused = true;
                    let code = code.unwrap_or_default();
                    shared.status.set_ready(&key, false, format!("watching {} refused by the apiserver ({code}): {e}", source.as_str()));
                }
                continue;
            }
        };
        if tx.send(Input { source, change }).await.is_err() {
            return;
        }
    }
}

async fn send_invalid(
    tx: &mpsc::Sender<Input>,
    source: Source,
    (result, extra): (Result<Object, InvalidObject>, Option<InvalidObject>),
) -> Option<Object> {
    if let Some(e) = extra {
        let _ = tx.send(Input { source, change: Change::Invalid(e) }).await;
    }
    match result {
        Ok(o) => Some(o),
        Err(e) => {
            let _ = tx.send(Input { source, change: Change::Invalid(e) }).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status { code, ..Default::default() }))
    }

    #[test]
    fn only_refusals_that_retrying_cannot_fix_count_against_readiness() {
        let refused = watcher::Error::InitialListFailed(api_error(403));
        assert!(is_configuration_error(watch_error_code(&refused)));
        assert!(is_configuration_error(watch_error_code(&watcher::Error::WatchStartFailed(api_error(404)))));
        // A 410 Gone or a 500 during a watch is routine: the watcher relists or retries.
        assert!(!is_configuration_error(watch_error_code(&watcher::Error::WatchFailed(api_error(500)))));
        let gone = watcher::Error::WatchError(Box::new(kube::core::Status { code: 410, ..Default::default() }));
        assert!(!is_configuration_error(watch_error_code(&gone)));
        assert!(!is_configuration_error(watch_error_code(&watcher::Error::NoResourceVersion)));
    }
}
