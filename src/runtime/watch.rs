//! Watches into one channel: a task per source reads one list + watch from the datastore seam
//! (Calico's kinds through [`Datastore::watch`], Kubernetes' own through
//! [`ClusterReader::watch`]), trims every object on arrival (a Pod becomes [`PodFacts`] at once,
//! never cached whole) and sends it to the single task that owns the index.
//!
//! Owns: which kinds are watched (KubeVirt's only once the cluster serves them), how each is
//! decoded, the [`Input`] protocol, reporting a watch the backend refuses (401/403/404) as a
//! not-ready condition naming the resource, and telling the loop when a watch fails and when it
//! delivers again (`Unhealthy` / `Healthy`).
//! Must not: touch the index or decide anything, or know which backend it reads; a malformed
//! object is reported, not dropped silently, and never stops the stream.

use std::sync::Arc;

use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::Shared;
use super::endpoints::EndpointFeed;
use crate::datastore::{ClusterKind, ClusterReader, Datastore, Kind, Stored, WatchEvent, WatchStream};
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
    /// Calico Nodes, watched only where the datastore keeps them apart from Kubernetes' (etcd;
    /// [`Datastore::keeps_calico_nodes`]), and required there.
    CalicoNodes,
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
            Source::CalicoNodes => "calico-nodes",
        }
    }

    /// The kind a malformed object of this source is reported under ([`InvalidObject::kind`]).
    pub fn kind_name(self) -> &'static str {
        match self {
            Source::Pods => "Pod",
            Source::Nodes => "Node",
            Source::Blocks => "IPAMBlock",
            Source::Affinities => "BlockAffinity",
            Source::Handles => "IPAMHandle",
            Source::ClusterInformation => "ClusterInformation",
            Source::KubeControllersConfiguration => "KubeControllersConfiguration",
            Source::IpamConfig => "IPAMConfig",
            Source::Pools => "IPPool",
            Source::Reservations => "IPReservation",
            Source::VirtualMachines | Source::VirtualMachineInstances => "KubeVirt",
            Source::CalicoNodes => "CalicoNode",
        }
    }

    /// Where this source is read: a Calico kind from the datastore, or a Kubernetes kind.
    pub fn origin(self) -> Origin {
        match self {
            Source::Pods => Origin::Cluster(ClusterKind::Pod),
            Source::Nodes => Origin::Cluster(ClusterKind::Node),
            Source::VirtualMachines => Origin::Cluster(ClusterKind::VirtualMachine),
            Source::VirtualMachineInstances => Origin::Cluster(ClusterKind::VirtualMachineInstance),
            Source::Blocks => Origin::Datastore(Kind::IpamBlock),
            Source::Affinities => Origin::Datastore(Kind::BlockAffinity),
            Source::Handles => Origin::Datastore(Kind::IpamHandle),
            Source::ClusterInformation => Origin::Datastore(Kind::ClusterInformation),
            Source::KubeControllersConfiguration => Origin::Datastore(Kind::KubeControllersConfiguration),
            Source::IpamConfig => Origin::Datastore(Kind::IpamConfig),
            Source::Pools => Origin::Datastore(Kind::IpPool),
            Source::Reservations => Origin::Datastore(Kind::IpReservation),
            Source::CalicoNodes => Origin::Datastore(Kind::CalicoNode),
        }
    }
}

/// The backend a source is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Datastore(Kind),
    Cluster(ClusterKind),
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
    CalicoNode(CalicoNodeRef),
}

/// What the GC needs of a Calico Node: its name and the Kubernetes node its `k8s` orchRef names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalicoNodeRef {
    pub name: String,
    pub k8s_node: Option<String>,
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
    fn from_value(v: &serde_json::Value) -> Result<Self, InvalidObject> {
        let meta = v.get("metadata");
        let text = |field: &str| meta.and_then(|m| m.get(field)).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
        let (name, namespace) = (text("name"), text("namespace"));
        if name.is_empty() || namespace.is_empty() {
            return Err(InvalidObject::new("KubeVirt", &name, "no name or namespace".to_string()));
        }
        let owned_by_vm = meta
            .and_then(|m| m.get("ownerReferences"))
            .and_then(serde_json::Value::as_array)
            .is_some_and(|refs| refs.iter().any(|r| r.get("kind").and_then(serde_json::Value::as_str) == Some("VirtualMachine")));
        Ok(KubeVirtObject { namespace, name, owned_by_vm })
    }
}

/// The watcher protocol, per source: `Init`, `InitApply`*, `InitDone` on every (re)list, then
/// `Apply`/`Delete`. `Invalid` reports an object that did not decode. `Unhealthy` says the watch
/// failed (sent on every failure, with its reason); `Healthy` follows the first good event after
/// a failure, once that event has been sent, so the loop never sees the kind healthy on a view
/// older than the event that proved it.
#[derive(Debug)]
pub enum Change {
    Init,
    InitApply(Object),
    InitDone,
    Apply(Object),
    Delete(Object),
    Invalid(InvalidObject),
    Unhealthy { reason: String },
    Healthy,
    /// An object that did not decode was deleted: its malformed record goes with it.
    DeleteMalformed { name: String },
}

#[derive(Debug)]
pub struct Input {
    pub source: Source,
    pub change: Change,
}

fn decode_as<T: for<'de> Deserialize<'de>>(kind: &str, o: &Stored) -> Result<T, InvalidObject> {
    T::deserialize(&o.value).map_err(|e| InvalidObject::new(kind, &o.name, e.to_string()))
}

/// Decodes one object of `source`. A pod is trimmed here, so the whole object is dropped as soon
/// as the caller drops the [`Stored`]; an unparsable pod IP is reported but the pod's facts are
/// still kept.
pub fn decode_stored(source: Source, o: &Stored) -> (Result<Object, InvalidObject>, Option<InvalidObject>) {
    let kind = source.kind_name();
    let r = match source {
        Source::Pods => match decode_as::<PodLite>(kind, o) {
            Ok(lite) => {
                let (facts, invalid) = PodFacts::from_lite(&lite);
                return (Ok(Object::Pod(Box::new(facts))), invalid);
            }
            Err(e) => Err(e),
        },
        Source::Nodes => decode_as(kind, o).map(Object::Node),
        Source::Blocks => decode_as(kind, o).map(|b| Object::Block(Box::new(b))),
        Source::Affinities => decode_as(kind, o).map(Object::Affinity),
        Source::Handles => decode_as(kind, o).map(Object::Handle),
        Source::ClusterInformation => decode_as(kind, o).map(|c| Object::ClusterInformation(Box::new(c))),
        Source::KubeControllersConfiguration => {
            decode_as(kind, o).map(|c| Object::KubeControllersConfiguration(Box::new(c)))
        }
        Source::IpamConfig => decode_as(kind, o).map(|c| Object::IpamConfig(Box::new(c))),
        Source::Pools => decode_as(kind, o).map(Object::Pool),
        Source::Reservations => decode_as(kind, o).map(Object::Reservation),
        Source::VirtualMachines => KubeVirtObject::from_value(&o.value).map(Object::VirtualMachine),
        Source::VirtualMachineInstances => KubeVirtObject::from_value(&o.value).map(Object::VirtualMachineInstance),
        Source::CalicoNodes => match crate::datastore::CalicoNodeView::of_node(&o.value) {
            _ if o.name.is_empty() => Err(InvalidObject::new(kind, &o.name, "no name".to_string())),
            crate::datastore::CalicoNodeView::Present { k8s_node } => Ok(Object::CalicoNode(CalicoNodeRef { name: o.name.clone(), k8s_node })),
            _ => Ok(Object::CalicoNode(CalicoNodeRef { name: o.name.clone(), k8s_node: None })),
        },
    };
    (r, None)
}

/// How often a cluster without KubeVirt is asked again whether it has it now: installing
/// KubeVirt is rare, and until its VMs are known their allocations are simply kept (valid), so
/// a minute of delay costs nothing but one discovery request per minute.
const KUBEVIRT_PROBE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until the cluster serves KubeVirt's VirtualMachines and VirtualMachineInstances, then
/// watches both. Never ends before the receiver is gone.
async fn watch_kubevirt_when_installed<C: ClusterReader + 'static>(cluster: Arc<C>, tx: mpsc::Sender<Input>, shared: Arc<Shared>) {
    loop {
        let vms = cluster.serves(ClusterKind::VirtualMachine).await;
        let vmis = cluster.serves(ClusterKind::VirtualMachineInstance).await;
        match (vms, vmis) {
            (Ok(true), Ok(true)) => {
                tracing::info!("KubeVirt found: watching VirtualMachines and VirtualMachineInstances");
                futures::join!(
                    forward(cluster.watch(ClusterKind::VirtualMachine), Source::VirtualMachines, tx.clone(), shared.clone()),
                    forward(cluster.watch(ClusterKind::VirtualMachineInstance), Source::VirtualMachineInstances, tx.clone(), shared.clone())
                );
                return;
            }
            (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "KubeVirt discovery failed; asking again later"),
            _ => {}
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(KUBEVIRT_PROBE).await;
    }
}

/// The list + watch of one source, from whichever backend holds it.
pub fn stream_of<D: Datastore, C: ClusterReader>(ds: &D, cluster: &C, source: Source) -> WatchStream {
    match source.origin() {
        Origin::Datastore(kind) => ds.watch(kind),
        // Only what the GC reads of a pod: most of a pod is never parsed.
        Origin::Cluster(ClusterKind::Pod) => cluster.watch_gc_pods(),
        Origin::Cluster(kind) => cluster.watch(kind),
    }
}

/// Starts one watch task per source, all feeding `tx`. The tasks end when the receiver is gone.
/// Without `kcc_api` (DISABLE_KUBE_CONTROLLERS_CONFIG_API) the KubeControllersConfiguration is
/// never watched: its source lists as empty once, so the configuration comes from the
/// environment alone and readiness does not wait for it.
///
/// With `endpoints` (etcd mode) the pod watch is tapped for the workload-endpoint controller, and
/// listed again when it asks (it was enabled after the start): one pod watch serves both.
pub fn spawn_all<D, C>(ds: &Arc<D>, cluster: &Arc<C>, tx: &mpsc::Sender<Input>, shared: &Arc<Shared>, kcc_api: bool, endpoints: Option<EndpointFeed>) -> Vec<tokio::task::JoinHandle<()>>
where
    D: Datastore + 'static,
    C: ClusterReader + 'static,
{
    let mut tasks: Vec<_> = Source::ALL
        .iter()
        .map(|&source| match (source, endpoints.clone()) {
            (Source::Pods, Some(feed)) => tokio::spawn(forward_tapped_pods(cluster.clone(), feed, tx.clone(), shared.clone())),
            _ => {
                let stream = if source == Source::KubeControllersConfiguration && !kcc_api { empty_list() } else { stream_of(&**ds, &**cluster, source) };
                tokio::spawn(forward(stream, source, tx.clone(), shared.clone()))
            }
        })
        .collect();
    if ds.keeps_calico_nodes() {
        let source = Source::CalicoNodes;
        tasks.push(tokio::spawn(forward(stream_of(&**ds, &**cluster, source), source, tx.clone(), shared.clone())));
    }
    tasks.push(tokio::spawn(watch_kubevirt_when_installed(cluster.clone(), tx.clone(), shared.clone())));
    tasks
}

/// The pod watch, tapped for the workload-endpoint controller; started again (a fresh list, which
/// the GC takes as any relist) when the controller asks.
async fn forward_tapped_pods<C: ClusterReader + 'static>(cluster: Arc<C>, feed: EndpointFeed, tx: mpsc::Sender<Input>, shared: Arc<Shared>) {
    let mut health = Health::default();
    loop {
        let stream = feed.tap(cluster.watch(ClusterKind::Pod));
        tokio::select! {
            _ = forward_with(stream, Source::Pods, &tx, &shared, &mut health) => return,
            _ = feed.relist_requested() => tracing::info!("pod watch listed again for the workloadendpoint controller"),
        }
    }
}

/// A source that lists empty once and then stays quiet (it never ends, as a watch does not).
fn empty_list() -> WatchStream {
    Box::pin(futures::stream::iter([WatchEvent::Init, WatchEvent::InitDone]).chain(futures::stream::pending()))
}

/// Feeds one source's watch into `tx` until either end is gone.
pub async fn forward(stream: WatchStream, source: Source, tx: mpsc::Sender<Input>, shared: Arc<Shared>) {
    forward_with(stream, source, &tx, &shared, &mut Health::default()).await
}

/// What `forward` has reported about a source, kept across a restarted stream so a failure
/// reported before the restart is ended by the new stream's first good event.
#[derive(Debug, Default)]
struct Health {
    /// The apiserver refused the watch (its readiness key says so).
    refused: bool,
    /// A failure was reported and no good event has arrived since.
    failing: bool,
}

async fn forward_with(mut stream: WatchStream, source: Source, tx: &mpsc::Sender<Input>, shared: &Shared, health: &mut Health) {
    let key = health::watch_key(source.as_str());
    let Health { refused, failing } = health;
    while let Some(event) = stream.next().await {
        if *refused && !matches!(event, WatchEvent::Error(_)) {
            *refused = false;
            shared.status.set_ready(&key, true, "");
        }
        let recovered = *failing && !matches!(event, WatchEvent::Error(_));
        if let Some(change) = change_of(event, source, tx, &key, shared, refused).await {
            *failing |= matches!(change, Change::Unhealthy { .. });
            if tx.send(Input { source, change }).await.is_err() {
                return;
            }
        }
        if recovered {
            *failing = false;
            if tx.send(Input { source, change: Change::Healthy }).await.is_err() {
                return;
            }
        }
    }
}

/// The input one watch event becomes, if any (a malformed object is sent as `Invalid` here).
async fn change_of(event: WatchEvent, source: Source, tx: &mpsc::Sender<Input>, key: &str, shared: &Shared, refused: &mut bool) -> Option<Change> {
    Some(match event {
        // Nothing changed, but the watch works again: `forward` reports the kind healthy.
        WatchEvent::Resumed => return None,
        WatchEvent::Init => Change::Init,
        WatchEvent::InitDone => Change::InitDone,
        WatchEvent::InitApply(o) => Change::InitApply(send_invalid(tx, source, decode_stored(source, &o)).await?),
        WatchEvent::Apply(o) => Change::Apply(send_invalid(tx, source, decode_stored(source, &o)).await?),
        WatchEvent::Delete(o) => match decode_stored(source, &o).0 {
            Ok(obj) => Change::Delete(obj),
            Err(e) => {
                tracing::warn!(source = source.as_str(), error = %e, "deleted object did not decode");
                Change::DeleteMalformed { name: o.name }
            }
        },
        WatchEvent::Error(e) => {
            // The backend retries; an expiry restarts with a fresh list (Init).
            tracing::warn!(source = source.as_str(), error = %e.message, "watch error");
            let reason = match e.refused {
                Some(code) => {
                    *refused = true;
                    let reason = format!("watching {} refused by the apiserver ({code}): {}", source.as_str(), e.message);
                    shared.status.set_ready(key, false, reason.clone());
                    reason
                }
                None => format!("watch error: {}", e.message),
            };
            Change::Unhealthy { reason }
        }
    })
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
    use crate::datastore::watch::WatchFailure;

    fn changes(rx: &mut mpsc::Receiver<Input>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(i) = rx.try_recv() {
            out.push(format!("{:?}", i.change).split([' ', '(', '{']).next().unwrap_or_default().to_string());
        }
        out
    }

    #[tokio::test]
    async fn a_failure_reported_before_a_restarted_stream_is_ended_by_the_new_streams_first_event() {
        let (tx, mut rx) = mpsc::channel(16);
        let shared = Shared::default();
        let mut health = Health::default();
        let failing: WatchStream = Box::pin(futures::stream::iter([WatchEvent::Error(WatchFailure::transient("apiserver gone"))]));
        forward_with(failing, Source::Pods, &tx, &shared, &mut health).await;
        assert_eq!(changes(&mut rx), ["Unhealthy"]);
        // The pod watch is started again (the workload-endpoint controller asked for a list).
        let fresh: WatchStream = Box::pin(futures::stream::iter([WatchEvent::Init, WatchEvent::InitDone]));
        forward_with(fresh, Source::Pods, &tx, &shared, &mut health).await;
        assert_eq!(changes(&mut rx), ["Init", "Healthy", "InitDone"], "the GC hears the source is healthy again");
    }
}
