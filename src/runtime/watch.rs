//! Watches into one channel: a task per kind runs `kube::runtime::watcher` (paged initial list,
//! then a watch, restarted with backoff), trims every object on arrival (a Pod becomes
//! [`PodFacts`] at once, never cached whole) and sends it to the single task that owns the index.
//!
//! Owns: which kinds are watched, how each is decoded, the [`Input`] protocol, and reporting a
//! watch the apiserver refuses (401/403/404) as a not-ready condition naming the resource.
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
    BlockAffinity, ClusterInformation, InvalidObject, IpPool, IpamBlock, IpamConfig, IpamHandle, KubeControllersConfiguration, NodeLite,
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
}

impl Source {
    pub const ALL: [Source; 9] = [
        Source::Pods,
        Source::Nodes,
        Source::Blocks,
        Source::Affinities,
        Source::Handles,
        Source::ClusterInformation,
        Source::KubeControllersConfiguration,
        Source::IpamConfig,
        Source::Pools,
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
    }
}

/// Starts one watch task per source, all feeding `tx`. The tasks end when the receiver is gone.
pub fn spawn_all(client: &Client, tx: &mpsc::Sender<Input>, shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    Source::ALL.iter().map(|&source| tokio::spawn(watch_one(client.clone(), source, tx.clone(), shared.clone()))).collect()
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
