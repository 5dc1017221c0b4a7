//! Kubernetes Events (`events.k8s.io/v1`) that make every release visible: a node's IPAM
//! cleaned up, a batch of pod addresses released on a node, a mass change held by the guard.
//!
//! Owns: the reasons, actions and notes of those Events, what they are about (`regarding`), the
//! [`EventRecorder`] handle the GC holds (a bounded queue to the recorder task, an in-memory
//! sink for tests, or off), the `kube_controllers_events_total` counters.
//! Must not: block or fail its caller (a full queue drops the Event and counts it; API errors
//! are logged and counted, never returned), decide anything about IPAM, or write anything but
//! Events.
//!
//! Pipeline: caller → [`EventRecorder`] (builds an [`EventRequest`], `try_send`) → `recorder`
//! task (needs a client: reads the clock, asks [`series::SeriesTable`] whether to create or
//! patch, writes) → the API server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

pub mod recorder;
pub mod series;

pub use recorder::{EventOptions, spawn};

/// `reportingController` of every Event: a qualified name, as the API server requires.
pub const REPORTING_CONTROLLER: &str = "projectcalico.org/calico-kube-controllers";
/// A node's IPAM (tunnel addresses, its pods' addresses, affinities) was cleaned up after the
/// node was proven gone.
pub const REASON_NODE_IPAM_RELEASED: &str = "NodeIPAMReleased";
pub const ACTION_NODE_IPAM_RELEASED: &str = "ReleaseNodeIPAM";
/// Leaked pod addresses on the node were released (one Event per node per executed plan round,
/// merged into a series).
pub const REASON_ADDRESSES_RELEASED: &str = "IPAddressesReleased";
pub const ACTION_ADDRESSES_RELEASED: &str = "ReleaseIPAddresses";
/// The mass-change guard held a pass's destructive changes until they are confirmed or approved.
pub const REASON_MASS_CHANGE_HELD: &str = "MassChangeHeld";
pub const ACTION_MASS_CHANGE_HELD: &str = "HoldChanges";
/// A Kubernetes NetworkPolicy was written to Calico without the rules that could not be
/// converted (the traffic they allowed is denied).
pub const REASON_POLICY_RULES_DROPPED: &str = "PolicyRulesDropped";
/// Host endpoint templates of the KubeControllersConfiguration that cannot be used (bad selector,
/// CIDR or pattern): skipped, so their HostEndpoints are not made (or go as stale).
/// A LoadBalancer Service could not be given an address (pools exhausted, the requested address
/// taken or outside every pool, a request that cannot be read).
pub const REASON_LOAD_BALANCER_IP_FAILED: &str = "LoadBalancerIPAssignmentFailed";
pub const ACTION_LOAD_BALANCER_IP_FAILED: &str = "AssignLoadBalancerIP";
pub const REASON_INVALID_HOST_ENDPOINT_TEMPLATE: &str = "InvalidHostEndpointTemplate";
pub const ACTION_INVALID_HOST_ENDPOINT_TEMPLATE: &str = "ReadHostEndpointTemplates";
pub const ACTION_POLICY_RULES_DROPPED: &str = "ConvertPolicy";

/// The API server refuses notes longer than this (bytes).
pub const NOTE_LIMIT: usize = 1024;

/// `type` of an Event: the API server accepts only these two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// The object an Event is about (`regarding`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regarding {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// `None` for cluster-scoped objects (their Events go to [`EventOptions::namespace`]).
    pub namespace: Option<String>,
    pub uid: Option<String>,
}

impl Regarding {
    /// A Kubernetes NetworkPolicy.
    pub fn network_policy(namespace: &str, name: &str, uid: Option<&str>) -> Self {
        Regarding {
            api_version: "networking.k8s.io/v1".into(),
            kind: "NetworkPolicy".into(),
            name: name.into(),
            namespace: Some(namespace.into()),
            uid: uid.map(str::to_string),
        }
    }

    /// A Kubernetes Service.
    pub fn service(namespace: &str, name: &str, uid: Option<&str>) -> Self {
        Regarding { api_version: "v1".into(), kind: "Service".into(), name: name.into(), namespace: Some(namespace.into()), uid: uid.map(str::to_string) }
    }

    /// A Kubernetes Node, with its uid when the caller knows it (`kubectl describe node` finds
    /// the Event by name either way).
    pub fn node(name: &str, uid: Option<&str>) -> Self {
        Regarding { api_version: "v1".into(), kind: "Node".into(), name: name.into(), namespace: None, uid: uid.map(str::to_string) }
    }

    /// The KubeControllersConfiguration `name` (`default` unless the operator names another):
    /// where operators look at the controller's configuration, and what the mass-change guard's
    /// Event is about.
    pub fn kube_controllers_configuration(name: &str) -> Self {
        Regarding {
            api_version: "crd.projectcalico.org/v1".into(),
            kind: "KubeControllersConfiguration".into(),
            name: name.into(),
            namespace: None,
            uid: None,
        }
    }
}

/// One Event to record; the recorder merges repeats of (regarding, reason, action) into a series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRequest {
    pub regarding: Regarding,
    pub type_: EventType,
    pub reason: &'static str,
    pub action: &'static str,
    /// Human-readable; cut to [`NOTE_LIMIT`] bytes at a character boundary.
    pub note: String,
}

impl EventRequest {
    fn new(regarding: Regarding, type_: EventType, reason: &'static str, action: &'static str, note: String) -> Self {
        EventRequest { regarding, type_, reason, action, note: truncate(note, NOTE_LIMIT) }
    }

    pub fn series_key(&self) -> series::SeriesKey {
        series::SeriesKey {
            kind: self.regarding.kind.clone(),
            namespace: self.regarding.namespace.clone().unwrap_or_default(),
            name: self.regarding.name.clone(),
            reason: self.reason.to_string(),
            action: self.action.to_string(),
        }
    }

    /// A node's IPAM cleaned up; `summary` says what went (e.g. "released 2 tunnel addresses, 5
    /// pod addresses and 3 block affinities").
    pub fn node_ipam_released(node: &Regarding, summary: &str) -> Self {
        let note = format!("node {} is gone: {summary}", node.name);
        EventRequest::new(node.clone(), EventType::Normal, REASON_NODE_IPAM_RELEASED, ACTION_NODE_IPAM_RELEASED, note)
    }

    /// `count` leaked addresses of `node` released in one plan round, `reasons` the tally by
    /// leak reason (e.g. `[("pod-not-found", 10), ("node-deleted", 2)]`).
    pub fn addresses_released(node: &Regarding, count: u64, reasons: &[(&str, u64)]) -> Self {
        let mut note = format!("released {count} address{}", if count == 1 { "" } else { "es" });
        let tally: Vec<String> = reasons.iter().filter(|(_, n)| *n > 0).map(|(r, n)| format!("{n} {r}")).collect();
        if !tally.is_empty() {
            note.push_str(": ");
            note.push_str(&tally.join(", "));
        }
        EventRequest::new(node.clone(), EventType::Normal, REASON_ADDRESSES_RELEASED, ACTION_ADDRESSES_RELEASED, note)
    }

    /// `policy` was written without the rules `dropped` names (one line each: direction, index,
    /// reason).
    pub fn policy_rules_dropped(policy: &Regarding, dropped: &[String]) -> Self {
        let note = format!(
            "{} rule{} could not be converted and {} dropped (the traffic {} allowed is denied): {}",
            dropped.len(),
            if dropped.len() == 1 { "" } else { "s" },
            if dropped.len() == 1 { "was" } else { "were" },
            if dropped.len() == 1 { "it" } else { "they" },
            dropped.join("; ")
        );
        EventRequest::new(policy.clone(), EventType::Warning, REASON_POLICY_RULES_DROPPED, ACTION_POLICY_RULES_DROPPED, note)
    }

    /// The Service `service` got no (or not every) address: `why` says what failed.
    pub fn load_balancer_ip_failed(service: &Regarding, why: &str) -> Self {
        EventRequest::new(service.clone(), EventType::Warning, REASON_LOAD_BALANCER_IP_FAILED, ACTION_LOAD_BALANCER_IP_FAILED, format!("no LoadBalancer address assigned: {why}"))
    }

    /// The KubeControllersConfiguration `kcc` has host endpoint templates that cannot be used;
    /// `problems` says which and why (one line each).
    pub fn invalid_host_endpoint_templates(kcc: &str, problems: &[String]) -> Self {
        let note = format!("{} host endpoint template{} skipped: {}", problems.len(), if problems.len() == 1 { "" } else { "s" }, problems.join("; "));
        EventRequest::new(Regarding::kube_controllers_configuration(kcc), EventType::Warning, REASON_INVALID_HOST_ENDPOINT_TEMPLATE, ACTION_INVALID_HOST_ENDPOINT_TEMPLATE, note)
    }

    /// The guard held `count` changes of `kind` (e.g. "address releases", "node cleanups") out of
    /// `total` known; `set_id` names the held set, `how_to_approve` tells the operator what to do.
    pub fn mass_change_held(kcc: &str, kind: &str, count: u64, total: u64, set_id: &str, how_to_approve: &str) -> Self {
        let share = if total == 0 { 100.0 } else { count as f64 * 100.0 / total as f64 };
        let note = format!("held {count} {kind} of {total} ({share:.1}%), set {set_id}: {how_to_approve}");
        EventRequest::new(Regarding::kube_controllers_configuration(kcc), EventType::Warning, REASON_MASS_CHANGE_HELD, ACTION_MASS_CHANGE_HELD, note)
    }
}

/// Cuts `s` to at most `limit` bytes, at a character boundary, marking the cut with "…".
fn truncate(mut s: String, limit: usize) -> String {
    if s.len() <= limit {
        return s;
    }
    let mut end = limit - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// `kube_controllers_events_total{result}`: shared by the recorder handle (drops) and task.
#[derive(Debug, Default)]
pub struct EventCounters {
    pub created: AtomicU64,
    pub updated: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

impl EventCounters {
    /// (result label, count), in rendering order.
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [("created", get(&self.created)), ("updated", get(&self.updated)), ("failed", get(&self.failed)), ("dropped", get(&self.dropped))]
    }
}

/// Events recorded by [`EventRecorder::memory`], for loop tests and dry runs.
#[derive(Debug, Clone, Default)]
pub struct MemoryEvents(Arc<Mutex<Vec<EventRequest>>>);

impl MemoryEvents {
    /// Every request so far, oldest first.
    pub fn snapshot(&self) -> Vec<EventRequest> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Every request so far, emptying the sink.
    pub fn take(&self) -> Vec<EventRequest> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[derive(Debug, Clone)]
enum Sink {
    Off,
    Memory(MemoryEvents),
    Queue { tx: mpsc::Sender<EventRequest>, counters: Arc<EventCounters> },
}

/// What the GC (and the mass-change guard) holds to record Events: cheap to clone, never blocks,
/// never fails. Make one with [`spawn`], [`EventRecorder::memory`] or [`EventRecorder::off`].
#[derive(Debug, Clone)]
pub struct EventRecorder(Sink);

impl Default for EventRecorder {
    fn default() -> Self {
        EventRecorder::off()
    }
}

impl EventRecorder {
    /// Records nothing (dry run, or a replica that does not write).
    pub const fn off() -> Self {
        EventRecorder(Sink::Off)
    }

    /// Keeps every request in memory; the [`MemoryEvents`] reads them.
    pub fn memory() -> (Self, MemoryEvents) {
        let events = MemoryEvents::default();
        (EventRecorder(Sink::Memory(events.clone())), events)
    }

    /// Queues onto the recorder task's channel; drops (counted) when it is full or closed.
    pub(crate) fn queue(tx: mpsc::Sender<EventRequest>, counters: Arc<EventCounters>) -> Self {
        EventRecorder(Sink::Queue { tx, counters })
    }

    /// Records `request` without waiting.
    pub fn record(&self, request: EventRequest) {
        match &self.0 {
            Sink::Off => {}
            Sink::Memory(events) => events.0.lock().unwrap_or_else(|p| p.into_inner()).push(request),
            Sink::Queue { tx, counters } => {
                if let Err(e) = tx.try_send(request) {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    let (why, request) = match e {
                        mpsc::error::TrySendError::Full(r) => ("queue full", r),
                        mpsc::error::TrySendError::Closed(r) => ("recorder stopped", r),
                    };
                    tracing::debug!(reason = request.reason, object = %request.regarding.name, why, "event dropped");
                }
            }
        }
    }

    /// See [`EventRequest::node_ipam_released`].
    pub fn node_ipam_released(&self, node: &Regarding, summary: &str) {
        self.record(EventRequest::node_ipam_released(node, summary));
    }

    /// See [`EventRequest::addresses_released`].
    pub fn addresses_released(&self, node: &Regarding, count: u64, reasons: &[(&str, u64)]) {
        self.record(EventRequest::addresses_released(node, count, reasons));
    }

    /// See [`EventRequest::mass_change_held`].
    pub fn mass_change_held(&self, kcc: &str, kind: &str, count: u64, total: u64, set_id: &str, how_to_approve: &str) {
        self.record(EventRequest::mass_change_held(kcc, kind, count, total, set_id, how_to_approve));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_batch_note_tallies_its_reasons() {
        let node = Regarding::node("n1", Some("uid-1"));
        let r = EventRequest::addresses_released(&node, 12, &[("pod-not-found", 10), ("node-deleted", 2), ("other", 0)]);
        assert_eq!(r.note, "released 12 addresses: 10 pod-not-found, 2 node-deleted");
        assert_eq!((r.reason, r.action, r.type_), (REASON_ADDRESSES_RELEASED, ACTION_ADDRESSES_RELEASED, EventType::Normal));
        assert_eq!(EventRequest::addresses_released(&node, 1, &[]).note, "released 1 address");
        assert_eq!(r.series_key().name, "n1");
    }

    #[test]
    fn a_held_mass_change_is_a_warning_on_the_kube_controllers_configuration() {
        let r = EventRequest::mass_change_held("default", "address releases", 120, 400, "set-7f3a", "approve with kubectl annotate …");
        assert_eq!(r.type_, EventType::Warning);
        assert_eq!(r.regarding.kind, "KubeControllersConfiguration");
        assert_eq!(r.regarding.api_version, "crd.projectcalico.org/v1");
        assert_eq!(r.note, "held 120 address releases of 400 (30.0%), set set-7f3a: approve with kubectl annotate …");
    }

    #[test]
    fn notes_are_cut_to_the_api_limit_at_a_character_boundary() {
        let r = EventRequest::node_ipam_released(&Regarding::node("n", None), &"é".repeat(2000));
        assert!(r.note.len() <= NOTE_LIMIT && r.note.ends_with('…'), "{}", r.note.len());
        assert_eq!(truncate("short".into(), NOTE_LIMIT), "short");
    }

    #[test]
    fn the_memory_sink_records_every_call_and_off_records_nothing() {
        let (rec, events) = EventRecorder::memory();
        let node = Regarding::node("n1", None);
        rec.node_ipam_released(&node, "released 3 addresses");
        rec.addresses_released(&node, 2, &[("pod-not-found", 2)]);
        rec.mass_change_held("default", "node cleanups", 6, 10, "s1", "wait");
        let reasons: Vec<_> = events.take().iter().map(|r| r.reason).collect();
        assert_eq!(reasons, [REASON_NODE_IPAM_RELEASED, REASON_ADDRESSES_RELEASED, REASON_MASS_CHANGE_HELD]);
        assert!(events.snapshot().is_empty());
        EventRecorder::off().node_ipam_released(&node, "x");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let (tx, mut rx) = mpsc::channel(2);
        let counters = Arc::new(EventCounters::default());
        let rec = EventRecorder::queue(tx, counters.clone());
        let node = Regarding::node("n1", None);
        for _ in 0..5 {
            rec.addresses_released(&node, 1, &[]);
        }
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 3);
        assert!(rx.try_recv().is_ok());
        drop(rx);
        rec.addresses_released(&node, 1, &[]);
        assert_eq!(counters.snapshot()[3], ("dropped", 4));
    }
}
