//! The recorder task: takes [`EventRequest`]s off a bounded queue and writes them as
//! `events.k8s.io/v1` Events, one Event per series.
//!
//! Owns: the Event objects it writes (create, then merge patches of `series` and the latest-note
//! annotation), the per-call timeout, the created/updated/failed counters.
//! Must not: return an error to anyone (a failed write is logged, counted and forgotten: Events
//! are best-effort), retry in a loop (the next observation writes again), or write anything but
//! Events in its one namespace.
//!
//! The API server's rules for events.k8s.io/v1 (`ValidateEventCreate`/`ValidateEventUpdate`):
//! `eventTime`, `reportingController` (a qualified name), `reportingInstance` (≤ 128), `action`
//! and `reason` (≤ 128 each) are required, `type` is Normal or Warning, `note` ≤ 1 kB; the
//! Event of a cluster-scoped object lives in `default` or `kube-system`; a `series` has a count
//! of at least 2 and a `lastObservedTime`. On update everything but `series` and metadata is
//! immutable, the note included, so a series keeps its first note and carries the latest
//! batch's text in the annotation [`LATEST_NOTE_ANNOTATION`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::series::{SeriesStep, SeriesTable};
use super::{EventCounters, EventRecorder, EventRequest, REPORTING_CONTROLLER};
use crate::datastore::kube::status_code;
use crate::model::time::Millis;

/// The latest observation's note of a series (the Event's own `note` is immutable).
pub const LATEST_NOTE_ANNOTATION: &str = "projectcalico.org/latest-note";
/// Where Events about cluster-scoped objects (Nodes, the KubeControllersConfiguration) go, as
/// kubelet does for Nodes; `kubectl describe node` finds them there.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Requests waiting for the recorder. A big cleanup records one Event per node per round, so
/// this holds a round over a thousand nodes; beyond that Events are dropped and counted rather
/// than letting the GC wait on the API server.
pub const QUEUE: usize = 1024;
/// One Event write may take this long; a slower API server costs an Event, not the queue.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server's limit on `reportingInstance`.
const INSTANCE_LIMIT: usize = 128;

#[derive(Debug, Clone)]
pub struct EventOptions {
    /// Namespace of the Events: [`DEFAULT_NAMESPACE`] (or `kube-system`, the only other one the
    /// API server accepts for cluster-scoped objects).
    pub namespace: String,
    /// `reportingInstance`: this replica (cut to 128 characters).
    pub instance: String,
    pub queue: usize,
    /// See [`super::series::SERIES_TTL`].
    pub series_ttl: Millis,
    pub max_series: usize,
}

impl EventOptions {
    /// The `default` namespace, the replica's identity (`POD_NAME`, else host name and pid).
    pub fn from_env() -> Self {
        EventOptions::with_instance(&crate::runtime::leader::identity_from_env())
    }

    pub fn with_instance(instance: &str) -> Self {
        EventOptions {
            namespace: DEFAULT_NAMESPACE.to_string(),
            instance: instance.to_string(),
            queue: QUEUE,
            series_ttl: super::series::SERIES_TTL,
            max_series: super::series::MAX_SERIES,
        }
    }
}

/// Starts the recorder task; it ends when every [`EventRecorder`] clone is dropped.
pub fn spawn(client: kube::Client, opts: EventOptions, counters: Arc<EventCounters>) -> (EventRecorder, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(opts.queue.max(1));
    let writer = EventWriter::new(client, opts, counters.clone());
    (EventRecorder::queue(tx, counters), tokio::spawn(writer.run(rx)))
}

struct EventWriter {
    api: Api<Event>,
    instance: String,
    series: SeriesTable,
    counters: Arc<EventCounters>,
    started: tokio::time::Instant,
}

/// How one write ended.
enum Outcome {
    Done,
    /// The Event to patch is gone: start a new series.
    Gone,
    Failed,
}

impl EventWriter {
    fn new(client: kube::Client, opts: EventOptions, counters: Arc<EventCounters>) -> Self {
        let mut instance = opts.instance.trim().to_string();
        if instance.is_empty() {
            instance = "calico-kube-controllers".into();
        }
        while instance.len() > INSTANCE_LIMIT {
            instance.pop();
        }
        EventWriter {
            api: Api::namespaced(client, &opts.namespace),
            instance,
            series: SeriesTable::new(opts.series_ttl, opts.max_series),
            counters,
            started: tokio::time::Instant::now(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<EventRequest>) {
        while let Some(request) = rx.recv().await {
            self.write(&request).await;
        }
    }

    async fn write(&mut self, request: &EventRequest) {
        let key = request.series_key();
        for _attempt in 0..2 {
            // Monotonic for the series (a stepped wall clock neither splits nor joins them).
            let now = self.started.elapsed().as_millis() as Millis;
            let wall = crate::runtime::ipam_gc::clock::now_millis();
            let (outcome, created) = match self.series.observe(&key, now, wall) {
                SeriesStep::Create { name } => (self.create(&name, request, wall).await, true),
                SeriesStep::Update { name, count } => (self.update(&name, count, request, wall).await, false),
            };
            match outcome {
                Outcome::Done => return,
                Outcome::Gone => self.series.forget(&key),
                Outcome::Failed => {
                    // A series whose create failed has no Event to patch: the next observation
                    // creates. A failed patch keeps its series (the next patch sets the count).
                    if created {
                        self.series.forget(&key);
                    }
                    return;
                }
            }
        }
    }

    async fn create(&self, name: &str, request: &EventRequest, wall: Millis) -> Outcome {
        let event = build_event(name, request, &self.instance, wall);
        let result = tokio::time::timeout(CALL_TIMEOUT, self.api.create(&PostParams::default(), &event)).await;
        match result {
            Ok(Ok(_)) => {
                self.counters.created.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(event = name, reason = request.reason, object = %request.regarding.name, "event created");
                Outcome::Done
            }
            Ok(Err(e)) => self.failed("create", name, request, status_code(&e), &e.to_string()),
            Err(_) => self.failed("create", name, request, 0, "timed out"),
        }
    }

    async fn update(&self, name: &str, count: u32, request: &EventRequest, wall: Millis) -> Outcome {
        let patch = serde_json::json!({
            "metadata": {"annotations": {LATEST_NOTE_ANNOTATION: request.note}},
            "series": {"count": i32::try_from(count).unwrap_or(i32::MAX), "lastObservedTime": micro_time(wall)},
        });
        let result = tokio::time::timeout(CALL_TIMEOUT, self.api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await;
        match result {
            Ok(Ok(_)) => {
                self.counters.updated.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(event = name, count, reason = request.reason, object = %request.regarding.name, "event series updated");
                Outcome::Done
            }
            Ok(Err(e)) if status_code(&e) == 404 => {
                tracing::debug!(event = name, "event gone before its series update; creating a new one");
                Outcome::Gone
            }
            Ok(Err(e)) => self.failed("patch", name, request, status_code(&e), &e.to_string()),
            Err(_) => self.failed("patch", name, request, 0, "timed out"),
        }
    }

    fn failed(&self, verb: &str, name: &str, request: &EventRequest, code: u16, error: &str) -> Outcome {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(verb, event = name, reason = request.reason, object = %request.regarding.name, code, error, "writing an event failed");
        Outcome::Failed
    }
}

fn micro_time(wall: Millis) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::from_millisecond(wall).ok().map(MicroTime)
}

/// The Event that starts a series.
pub fn build_event(name: &str, request: &EventRequest, instance: &str, wall: Millis) -> Event {
    let r = &request.regarding;
    Event {
        metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
        event_time: micro_time(wall),
        type_: Some(request.type_.as_str().to_string()),
        reason: Some(request.reason.to_string()),
        action: Some(request.action.to_string()),
        note: Some(request.note.clone()),
        regarding: Some(ObjectReference {
            api_version: Some(r.api_version.clone()),
            kind: Some(r.kind.clone()),
            name: Some(r.name.clone()),
            namespace: r.namespace.clone(),
            uid: r.uid.clone(),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
        reporting_instance: Some(instance.to_string()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::events::Regarding;

    #[test]
    fn a_new_event_carries_every_field_the_api_server_requires() {
        let request = EventRequest::addresses_released(&Regarding::node("n1", Some("u1")), 3, &[("pod-not-found", 3)]);
        let e = build_event("n1.abc", &request, "ckc-0", 1_700_000_000_123);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["eventTime"], "2023-11-14T22:13:20.123000Z");
        assert_eq!(v["reportingController"], REPORTING_CONTROLLER);
        assert_eq!(v["reportingInstance"], "ckc-0");
        assert_eq!(v["type"], "Normal");
        assert_eq!(v["regarding"], serde_json::json!({"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "u1"}));
        assert!(v.get("series").is_none() && v.get("deprecatedCount").is_none());
        // A qualified name: a DNS subdomain prefix, '/', a name of at most 63 characters.
        let (prefix, name) = REPORTING_CONTROLLER.split_once('/').unwrap();
        assert!(crate::runtime::events::series::is_dns_subdomain(prefix) && !name.is_empty() && name.len() <= 63);
    }
}
