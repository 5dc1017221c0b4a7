//! The etcd-mode `workloadendpoint` controller (SPEC §6.5): each pod's labels and service
//! account, written onto the WorkloadEndpoints the CNI plugin created for it.
//!
//! Its pods come from the GC's one pod watch ([`EndpointFeed`] taps it in `watch`): no second
//! pod LIST, and per pod only an [`EndpointWant`] is kept (endpoint name, labels, service
//! account), and only while the controller is enabled. Enabled later through the
//! KubeControllersConfiguration, it has the pod watch list again to fill its view.
//!
//! Rounds: a changed pod's endpoint is read and patched within the 1 s batch; at start (once the
//! pods are listed) and every `reconcilerPeriod` every endpoint is listed and compared. A write
//! is a compare-and-swap on the endpoint's revision; a conflict re-reads and tries again.
//! Owns: the per-pod wants, the dirty set, the writes and their concurrency
//! (`WORKLOAD_ENDPOINT_WORKERS`), its readiness key.
//! Must not: create or delete an endpoint, touch any field but labels and
//! `spec.serviceAccountName`, write as a standby, or stall the pod watch it taps (the tap's
//! channel is unbounded: each message is a few labels, and the controller only files them).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, watch};

use super::Shared;
use super::listed::Listed;
use crate::datastore::watch::{WatchEvent, WatchStream};
use crate::datastore::{Datastore, Kind, Stored};
use crate::endpoint_labels::{EndpointWant, pod_of};

/// The controller's name (`ENABLED_CONTROLLERS`, metric label).
pub const NAME: &str = "workloadendpoint";
/// Changes within this window share one round.
const BATCH: Duration = Duration::from_secs(1);
/// Writes that failed are tried again this much later.
const RETRY: Duration = Duration::from_secs(5);
/// A write that keeps conflicting is left to the next round after this many tries.
const TRIES: usize = 3;

/// One pod change, as the controller needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum PodFeed {
    Init,
    /// `<namespace>/<pod>` and what it wants (`Ok(None)`: no endpoint; `Err`: the pod did not
    /// convert, so its last want stays).
    Listed(String, Result<Option<EndpointWant>, ConvertFailure>),
    InitDone,
    Changed(String, Result<Option<EndpointWant>, ConvertFailure>),
    Deleted(String),
    Failed(String),
    Resumed,
}

/// Why a pod did not convert: the metric's category and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertFailure {
    pub category: &'static str,
    pub message: String,
}

/// The tap on the GC's pod watch. Cloned into the watch task; the controller holds the receiver.
#[derive(Debug, Clone)]
pub struct EndpointFeed {
    tx: mpsc::UnboundedSender<PodFeed>,
    /// Whether pods are converted and sent at all (the controller is enabled).
    keep: Arc<AtomicBool>,
    /// Asks the pod watch to list again (the controller was enabled while nothing was kept).
    relist: Arc<Notify>,
}

impl EndpointFeed {
    /// A feed that keeps pods from the start when `enabled`.
    pub fn new(enabled: bool) -> (EndpointFeed, mpsc::UnboundedReceiver<PodFeed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EndpointFeed { tx, keep: Arc::new(AtomicBool::new(enabled)), relist: Arc::new(Notify::new()) }, rx)
    }

    /// Resolves when the controller asks for a fresh pod list.
    pub async fn relist_requested(&self) {
        self.relist.notified().await
    }

    fn offer(&self, event: &WatchEvent) {
        if !self.keep.load(Ordering::Relaxed) {
            return;
        }
        let want = |o: &Stored| EndpointWant::of_pod(&o.value).map_err(|e| ConvertFailure { category: e.category(), message: e.to_string() });
        let msg = match event {
            WatchEvent::Init => PodFeed::Init,
            WatchEvent::InitApply(o) => PodFeed::Listed(pod_key(o), want(o)),
            WatchEvent::InitDone => PodFeed::InitDone,
            WatchEvent::Apply(o) => PodFeed::Changed(pod_key(o), want(o)),
            WatchEvent::Delete(o) => PodFeed::Deleted(pod_key(o)),
            WatchEvent::Error(e) => PodFeed::Failed(e.message.clone()),
            WatchEvent::Resumed => PodFeed::Resumed,
        };
        let _ = self.tx.send(msg);
    }

    /// `stream` with every event also offered to the controller.
    pub fn tap(&self, stream: WatchStream) -> WatchStream {
        let feed = self.clone();
        Box::pin(stream.inspect(move |event| feed.offer(event)))
    }
}

fn pod_key(o: &Stored) -> String {
    format!("{}/{}", o.value["metadata"]["namespace"].as_str().unwrap_or_default(), o.name)
}

/// The pods' wants, and whether that view is whole.
#[derive(Debug, Default)]
struct Pods {
    by_pod: Listed<EndpointWant>,
    /// Pods whose endpoint may be out of step since the last round.
    dirty: BTreeSet<String>,
    /// A full round is due (after a list).
    full_due: bool,
}

impl Pods {
    /// Files one message; true when a round is due.
    fn apply(&mut self, msg: PodFeed) -> bool {
        match msg {
            PodFeed::Init => self.by_pod.begin(),
            PodFeed::Listed(key, want) => {
                if let Some(w) = want.ok().unwrap_or_else(|| self.by_pod.get(&key).cloned()) {
                    self.by_pod.listed(key, w);
                }
            }
            PodFeed::InitDone => {
                self.by_pod.end();
                // The full round the list makes due covers every pod.
                self.dirty.clear();
                self.full_due = true;
                return true;
            }
            PodFeed::Changed(key, want) => match want {
                // Did not convert: the last want stays (never strip an endpoint's labels).
                Err(e) => {
                    tracing::debug!(pod = %key, error = %e.message, "pod not converted; its endpoint keeps its labels");
                    self.by_pod.delivered();
                }
                Ok(None) => {
                    self.by_pod.remove(&key);
                    self.dirty.remove(&key);
                }
                Ok(Some(w)) => {
                    if self.by_pod.get(&key) == Some(&w) {
                        self.by_pod.delivered();
                        return false;
                    }
                    self.by_pod.upsert(key.clone(), w);
                    self.dirty.insert(key);
                    return true;
                }
            },
            PodFeed::Deleted(key) => {
                self.by_pod.remove(&key);
                self.dirty.remove(&key);
            }
            PodFeed::Failed(reason) => self.by_pod.failed(reason),
            PodFeed::Resumed => self.by_pod.delivered(),
        }
        false
    }

    fn forget(&mut self) {
        *self = Pods::default();
    }

    /// Every dirty pod is wanted; a pod in `dirty` is in `by_pod`; the relisting view exists only
    /// between `Init` and `InitDone`.
    #[cfg(test)]
    fn check_invariants(&self) -> Result<(), String> {
        match self.dirty.iter().find(|k| !self.by_pod.contains(k)) {
            Some(k) => Err(format!("dirty pod {k} has no want")),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EndpointOptions {
    pub dry_run: bool,
    /// `WORKLOAD_ENDPOINT_WORKERS`: writes in flight at once.
    pub workers: usize,
}

/// Runs the controller until `stop` turns true.
pub async fn run<D: Datastore>(
    ds: Arc<D>,
    shared: Arc<Shared>,
    feed: EndpointFeed,
    mut rx: mpsc::UnboundedReceiver<PodFeed>,
    may_write: watch::Receiver<bool>,
    opts: EndpointOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut config = shared.config.subscribe();
    let mut pods = Pods::default();
    let mut due: Option<tokio::time::Instant> = None;
    let mut last_full = tokio::time::Instant::now();
    let mut was_enabled = feed.keep.load(Ordering::Relaxed);
    loop {
        let period = shared.config.borrow().run.workload_endpoint;
        let enabled = period.is_some();
        if !enabled {
            // Nothing to retry while disabled (a round would only say "not now" every 5 s).
            due = None;
        }
        if enabled != was_enabled {
            was_enabled = enabled;
            pods.forget();
            feed.keep.store(enabled, Ordering::Relaxed);
            if enabled {
                tracing::info!("workloadendpoint controller enabled: the pod watch lists again to fill its view");
                feed.relist.notify_one();
            } else {
                tracing::info!("workloadendpoint controller disabled: its pod view is dropped");
            }
        }
        shared.status.controller_view(NAME, "pods", enabled, pods.by_pod.synced(), pods.by_pod.failing());
        let full_at = period.filter(|p| *p > 0 && pods.by_pod.synced()).map(|p| last_full + Duration::from_millis(p as u64));
        let next = [due, full_at].into_iter().flatten().min();
        let wait = super::sleep_until_due(next);
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                if let PodFeed::Listed(_, Err(e)) | PodFeed::Changed(_, Err(e)) = &msg {
                    shared.metrics(|m| *m.conversion_errors.entry((NAME, e.category)).or_default() += 1);
                }
                if enabled && pods.apply(msg) {
                    due = super::due_within(due, BATCH);
                }
            }
            _ = wait => {
                let now = tokio::time::Instant::now();
                let full = pods.full_due || full_at.is_some_and(|t| t <= now);
                if full {
                    last_full = now;
                }
                let ran = pods.by_pod.synced() && (opts.dry_run || *may_write.borrow());
                let done = round(&*ds, &shared, &may_write, &opts, &mut pods, full).await;
                if ran {
                    shared.metrics(|m| m.light_round(NAME, now.elapsed()));
                }
                due = if done { None } else { Some(tokio::time::Instant::now() + RETRY) };
            }
            changed = config.changed() => if changed.is_err() { return },
            _ = stop.changed() => if *stop.borrow() { return },
        }
    }
}

/// One round: the dirty pods' endpoints (or, `full`, every endpoint) read, compared and patched.
/// False when it must be tried again (not leading, a read or write failed).
async fn round<D: Datastore>(ds: &D, shared: &Shared, may_write: &watch::Receiver<bool>, opts: &EndpointOptions, pods: &mut Pods, full: bool) -> bool {
    if !pods.by_pod.synced() || !(opts.dry_run || *may_write.borrow()) {
        return false;
    }
    shared.metrics(|m| m.light_desired.insert(NAME, pods.by_pod.len() as u64));
    // (pod, endpoint as read or None to read it)
    let mut todo: Vec<(String, Option<Stored>)> = Vec::new();
    if full {
        let all = match ds.list(Kind::WorkloadEndpoint).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(controller = NAME, error = %e, "listing workload endpoints failed; retried shortly");
                return false;
            }
        };
        for wep in all {
            let ns = wep.name.split_once('/').map_or("", |(ns, _)| ns);
            // The pod's endpoints on its current node only: an old endpoint left on a node the
            // pod ran on before must not get the live pod's labels (policy would select its IP).
            if let Some(pod) = pod_of(ns, &wep.value).filter(|p| pods.by_pod.get(p).is_some_and(|w| w.names_endpoint(&wep.name))) {
                todo.push((pod, Some(wep)));
            }
        }
        pods.full_due = false;
        pods.dirty.clear();
    } else {
        todo.extend(std::mem::take(&mut pods.dirty).into_iter().map(|p| (p, None)));
    }
    let by_pod = &pods.by_pod;
    let results: Vec<(String, Outcome)> = futures::stream::iter(todo)
        .map(|(pod, current)| async move {
            let Some(want) = by_pod.get(&pod) else { return (pod, Outcome::InStep) };
            let outcome = sync_one(ds, may_write, opts, want, current).await;
            (pod, outcome)
        })
        .buffer_unordered(opts.workers.max(1))
        .collect()
        .await;
    let mut again = false;
    for (pod, outcome) in results {
        if let Some(label) = outcome.label() {
            shared.metrics(|m| *m.light_writes.entry((NAME, "update", label)).or_default() += 1);
        }
        if matches!(outcome, Outcome::Failed | Outcome::NotLeading | Outcome::Conflict) && pods.by_pod.contains(&pod) {
            pods.dirty.insert(pod);
            again = true;
        }
    }
    !again
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    InStep,
    /// No endpoint under the pod's name (the CNI plugin has not made it, or it is gone).
    Missing,
    Written,
    DryRun,
    Conflict,
    Failed,
    NotLeading,
}

impl Outcome {
    /// The `outcome` label of a write, `None` when nothing was written.
    fn label(self) -> Option<&'static str> {
        match self {
            Outcome::Written => Some("ok"),
            Outcome::Conflict => Some("conflict"),
            Outcome::Failed => Some("failed"),
            Outcome::InStep | Outcome::Missing | Outcome::DryRun | Outcome::NotLeading => None,
        }
    }
}

/// Brings one endpoint in step with `want`: read (unless given), patch, compare-and-swap; a
/// conflict re-reads and tries again, up to [`TRIES`] times.
async fn sync_one<D: Datastore>(ds: &D, may_write: &watch::Receiver<bool>, opts: &EndpointOptions, want: &EndpointWant, mut current: Option<Stored>) -> Outcome {
    // The endpoint as listed (a pod may have more than its `eth0` one), else its primary one.
    let name: String = current.as_ref().map_or_else(|| want.endpoint.to_string(), |c| c.name.clone());
    for _ in 0..TRIES {
        let stored = match current.take() {
            Some(s) => s,
            None => match ds.get(Kind::WorkloadEndpoint, &name).await {
                Ok(s) => s,
                Err(e) if e.is_not_found() => return Outcome::Missing,
                Err(e) => {
                    tracing::warn!(controller = NAME, endpoint = %want.endpoint, error = %e, "reading the endpoint failed; retried shortly");
                    return Outcome::Failed;
                }
            },
        };
        let Some(value) = want.patched(&stored.value) else { return Outcome::InStep };
        if opts.dry_run {
            tracing::info!(controller = NAME, endpoint = %stored.name, "dry run: would update the endpoint's labels");
            return Outcome::DryRun;
        }
        if !*may_write.borrow() {
            return Outcome::NotLeading;
        }
        match ds.update(Kind::WorkloadEndpoint, &Stored { value, ..stored }).await {
            Ok(_) => return Outcome::Written,
            Err(e) if e.is_conflict() => {
                tracing::debug!(controller = NAME, endpoint = %want.endpoint, "endpoint changed under us; read again");
            }
            Err(e) if e.is_not_found() => return Outcome::Missing,
            Err(e) => {
                tracing::warn!(controller = NAME, endpoint = %want.endpoint, error = %e, "updating the endpoint failed; retried shortly");
                return Outcome::Failed;
            }
        }
    }
    Outcome::Conflict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::MemoryDatastore;
    use crate::datastore::{ErrorKind, Op};
    use serde_json::{Value, json};

    fn pod(name: &str, node: &str, labels: Value) -> Stored {
        Stored {
            name: name.into(),
            revision: "1".into(),
            uid: "u".into(),
            value: json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "spec": {"nodeName": node, "serviceAccountName": "sa"}}),
        }
    }

    fn endpoint_body(pod: &str, node: &str, labels: Value) -> Value {
        json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": crate::policy::workload_endpoint_name(node, pod), "namespace": "shop", "labels": labels},
            "spec": {"orchestrator": "k8s", "node": node, "pod": pod, "endpoint": "eth0", "containerID": "c1", "ipNetworks": ["10.0.0.1/32"]}})
    }

    async fn seed(ds: &MemoryDatastore, pod: &str, node: &str, labels: Value) -> String {
        let name = format!("shop/{}", crate::policy::workload_endpoint_name(node, pod));
        ds.create(Kind::WorkloadEndpoint, &name, endpoint_body(pod, node, labels)).await.unwrap();
        name
    }

    fn feed_all(feed: &EndpointFeed, events: Vec<WatchEvent>) {
        for e in &events {
            feed.offer(e);
        }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<PodFeed>, pods: &mut Pods) -> bool {
        let mut due = false;
        while let Ok(m) = rx.try_recv() {
            due |= pods.apply(m);
        }
        pods.check_invariants().unwrap();
        due
    }

    const OPTS: EndpointOptions = EndpointOptions { dry_run: false, workers: 2 };

    #[tokio::test]
    async fn listed_and_changed_pods_label_their_existing_endpoints_and_never_create_one() {
        let ds = MemoryDatastore::new();
        let a = seed(&ds, "a", "n1", json!({"old": "x"})).await;
        let b = seed(&ds, "b", "n1", json!({})).await;
        // Pod a's endpoint left on the node it ran on before.
        let stale = seed(&ds, "a", "n0", json!({"old": "y"})).await;
        ds.create(Kind::WorkloadEndpoint, "shop/foreign", json!({"metadata": {"name": "foreign", "namespace": "shop", "labels": {"k": "v"}}, "spec": {"orchestrator": "openstack"}})).await.unwrap();
        let (feed, mut rx) = EndpointFeed::new(true);
        feed_all(&feed, vec![WatchEvent::Init, WatchEvent::InitApply(pod("a", "n1", json!({"app": "a"}))), WatchEvent::InitApply(pod("c", "n2", json!({}))), WatchEvent::InitDone]);
        let mut pods = Pods::default();
        assert!(drain(&mut rx, &mut pods));
        let shared = Shared::default();
        let (_tx, leading) = watch::channel(true);
        assert!(pods.full_due, "a list makes a full round due");
        assert!(round(&ds, &shared, &leading, &OPTS, &mut pods, true).await);
        let got = ds.peek(Kind::WorkloadEndpoint, &a).unwrap().value;
        assert_eq!(got["metadata"]["labels"], json!({"app": "a", "projectcalico.org/namespace": "shop", "projectcalico.org/orchestrator": "k8s", "projectcalico.org/serviceaccount": "sa"}));
        assert_eq!((got["spec"]["serviceAccountName"].as_str(), got["spec"]["containerID"].as_str()), (Some("sa"), Some("c1")));
        assert_eq!(ds.peek(Kind::WorkloadEndpoint, &b).unwrap().value["metadata"]["labels"], json!({}), "a pod not in the view: untouched");
        assert_eq!(ds.snapshot(Kind::WorkloadEndpoint).len(), 4, "pod c has no endpoint: none created");
        assert_eq!(ds.peek(Kind::WorkloadEndpoint, &stale).unwrap().value["metadata"]["labels"], json!({"old": "y"}), "an endpoint on another node keeps its labels");
        assert_eq!(ds.peek(Kind::WorkloadEndpoint, "shop/foreign").unwrap().value["metadata"]["labels"], json!({"k": "v"}));
        let before = ds.revision();
        assert!(round(&ds, &shared, &leading, &OPTS, &mut pods, true).await);
        assert_eq!(ds.revision(), before, "in step: a full round writes nothing");
        // A label change is one read and one write of that pod's endpoint.
        feed.offer(&WatchEvent::Apply(pod("a", "n1", json!({"app": "a", "tier": "1"}))));
        assert!(drain(&mut rx, &mut pods));
        assert_eq!(pods.dirty.len(), 1);
        assert!(round(&ds, &shared, &leading, &OPTS, &mut pods, false).await);
        assert_eq!(ds.peek(Kind::WorkloadEndpoint, &a).unwrap().value["metadata"]["labels"]["tier"], "1");
        assert_eq!(ds.revision(), before + 1);
        // The same labels again: nothing due.
        feed.offer(&WatchEvent::Apply(pod("a", "n1", json!({"app": "a", "tier": "1"}))));
        assert!(!drain(&mut rx, &mut pods));
        assert_eq!(shared.metrics(|m| m.light_writes.get(&(NAME, "update", "ok")).copied()), Some(2));
    }

    #[tokio::test]
    async fn a_standby_or_a_dry_run_writes_nothing_and_a_malformed_pod_keeps_its_endpoints_labels() {
        let ds = MemoryDatastore::new();
        let a = seed(&ds, "a", "n1", json!({"keep": "me"})).await;
        let (feed, mut rx) = EndpointFeed::new(true);
        let mut bad = pod("a", "n1", json!({}));
        bad.value["metadata"]["labels"] = json!(["not", "a", "map"]);
        feed_all(&feed, vec![WatchEvent::Init, WatchEvent::InitApply(bad.clone()), WatchEvent::InitDone]);
        let mut pods = Pods::default();
        drain(&mut rx, &mut pods);
        let shared = Shared::default();
        let (_tx, leading) = watch::channel(true);
        let before = ds.revision();
        assert!(round(&ds, &shared, &leading, &OPTS, &mut pods, true).await);
        assert_eq!(ds.revision(), before, "a pod that does not convert wants nothing: its endpoint keeps its labels");
        feed.offer(&WatchEvent::Apply(pod("a", "n1", json!({"app": "a"}))));
        drain(&mut rx, &mut pods);
        feed.offer(&WatchEvent::Apply(bad));
        drain(&mut rx, &mut pods);
        assert_eq!(pods.by_pod.get("shop/a").unwrap().labels()["app"], "a", "a good want survives a later malformed version");
        let (_tx2, standby) = watch::channel(false);
        assert!(!round(&ds, &shared, &standby, &OPTS, &mut pods, true).await, "a standby does not run a round");
        let dry = EndpointOptions { dry_run: true, ..OPTS };
        assert!(round(&ds, &shared, &standby, &dry, &mut pods, true).await);
        assert_eq!(ds.revision(), before);
        assert!(round(&ds, &shared, &leading, &OPTS, &mut pods, true).await);
        assert_eq!(ds.peek(Kind::WorkloadEndpoint, &a).unwrap().value["metadata"]["labels"]["app"], "a");
    }

    #[test]
    fn nothing_is_kept_while_disabled_and_a_relist_rebuilds_the_view() {
        let (feed, mut rx) = EndpointFeed::new(false);
        feed.offer(&WatchEvent::Apply(pod("a", "n1", json!({}))));
        assert!(rx.try_recv().is_err(), "disabled: pods are not even converted");
        feed.keep.store(true, Ordering::Relaxed);
        let mut pods = Pods::default();
        feed_all(&feed, vec![WatchEvent::Apply(pod("a", "n1", json!({})))]);
        drain(&mut rx, &mut pods);
        assert!(!pods.by_pod.synced(), "changes before a list give no whole view");
        feed_all(&feed, vec![WatchEvent::Init, WatchEvent::InitApply(pod("b", "n1", json!({}))), WatchEvent::InitDone]);
        drain(&mut rx, &mut pods);
        assert!(pods.by_pod.synced() && pods.full_due);
        assert_eq!(pods.by_pod.items().keys().collect::<Vec<_>>(), ["shop/b"], "the list replaces what came before it");
        feed.offer(&WatchEvent::Delete(pod("b", "n1", json!({}))));
        drain(&mut rx, &mut pods);
        assert!(pods.by_pod.is_empty());
    }

    #[tokio::test]
    async fn a_conflict_re_reads_and_keeps_the_other_writers_change() {
        let ds = MemoryDatastore::new();
        let a = seed(&ds, "a", "n1", json!({})).await;
        let want = EndpointWant::of_pod(&pod("a", "n1", json!({"app": "a"})).value).unwrap().unwrap();
        let (_tx, leading) = watch::channel(true);
        // The CNI plugin rewrites the endpoint between our read and our write.
        ds.bump_before(Op::Update, Kind::WorkloadEndpoint, &a, |v| v["spec"]["containerID"] = json!("c2"));
        assert_eq!(sync_one(&ds, &leading, &OPTS, &want, None).await, Outcome::Written);
        let got = ds.peek(Kind::WorkloadEndpoint, &a).unwrap().value;
        assert_eq!((got["metadata"]["labels"]["app"].as_str(), got["spec"]["containerID"].as_str()), (Some("a"), Some("c2")), "both writes kept");
        let want = want.with_own_labels(&[("x", "y")]);
        ds.inject(Some(Kind::WorkloadEndpoint), Some(&a), Op::Update, ErrorKind::Conflict, TRIES as u32);
        assert_eq!(sync_one(&ds, &leading, &OPTS, &want, None).await, Outcome::Conflict, "gives up after a few tries; the next round retries");
        let mut missing = want.clone();
        missing.endpoint = "shop/none".into();
        assert_eq!(sync_one(&ds, &leading, &OPTS, &missing, None).await, Outcome::Missing, "never created");
    }
}
