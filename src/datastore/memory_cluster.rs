//! The in-memory Kubernetes reader: pods, nodes and KubeVirt's kinds held in process memory,
//! for tests of everything that reads the cluster through [`ClusterReader`].
//!
//! Owns: the object table keyed by (kind, namespace, name), its revision counter and
//! deterministic uids, which kinds are served, the `/healthz` answer, injected `get` failures
//! and `get` counts, and the watches (the broadcast and faults shared with
//! [`super::MemoryDatastore`]).
//! Must not: hold its lock across an `.await` (every future it returns is already complete), or
//! read the clock.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use serde_json::{Map, Value};

use super::cluster::{ClusterKind, ClusterReader};
use super::watch::{WatchEvent, WatchStream};
use super::watch_hub::WatchHub;
use super::{DatastoreError, DsResult, ErrorKind, Stored};

#[derive(Debug, Clone)]
struct Entry {
    revision: u64,
    uid: String,
    value: Value,
}

type Key = (ClusterKind, String, String);

struct Inner {
    objects: BTreeMap<Key, Entry>,
    revision: u64,
    created: u64,
    served: BTreeMap<ClusterKind, bool>,
    healthz: Result<(), String>,
    /// Per kind: the error the next gets fail with, and how many more times.
    get_faults: BTreeMap<ClusterKind, (ErrorKind, u32)>,
    gets: BTreeMap<ClusterKind, u64>,
    watches: WatchHub<ClusterKind>,
}

/// A Kubernetes cluster held in process memory. Pods and nodes are served from the start,
/// KubeVirt's kinds only after [`MemoryCluster::set_serves`].
pub struct MemoryCluster {
    inner: Mutex<Inner>,
}

impl Default for MemoryCluster {
    fn default() -> Self {
        let mut inner = Inner {
            objects: BTreeMap::new(),
            revision: 0,
            created: 0,
            served: ClusterKind::ALL.iter().map(|&k| (k, !k.optional())).collect(),
            healthz: Ok(()),
            get_faults: BTreeMap::new(),
            gets: BTreeMap::new(),
            watches: WatchHub::default(),
        };
        for kind in ClusterKind::ALL.into_iter().filter(|k| k.optional()) {
            inner.watches.refuse(kind, 404, &not_served_message(kind));
        }
        MemoryCluster { inner: Mutex::new(inner) }
    }
}

impl std::fmt::Debug for MemoryCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryCluster").field("objects", &inner.objects.len()).field("revision", &inner.revision).finish()
    }
}

fn not_served_message(kind: ClusterKind) -> String {
    format!("the server could not find the requested resource ({})", kind.plural())
}

fn stamp(key: &Key, entry: &Entry) -> Stored {
    let mut value = entry.value.clone();
    let meta = value.as_object_mut().map(|o| o.entry("metadata").or_insert_with(|| Value::Object(Map::new()))).and_then(Value::as_object_mut);
    if let Some(meta) = meta {
        meta.insert("resourceVersion".into(), Value::String(entry.revision.to_string()));
        meta.insert("uid".into(), Value::String(entry.uid.clone()));
    }
    Stored { name: key.2.clone(), revision: entry.revision.to_string(), uid: entry.uid.clone(), value }
}

impl Inner {
    fn current(&self, kind: ClusterKind) -> Vec<Stored> {
        self.objects.iter().filter(|(k, _)| k.0 == kind).map(|(k, e)| stamp(k, e)).collect()
    }

    fn key(kind: ClusterKind, namespace: &str, name: &str) -> Key {
        let namespace = if kind.namespaced() { namespace } else { "" };
        (kind, namespace.to_string(), name.to_string())
    }
}

impl MemoryCluster {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every operation changes the table in one step, so a poisoned lock still guards a
        // consistent table.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces the object named by `value`'s `metadata.namespace`/`metadata.name`
    /// (the namespace is ignored for nodes), stamping `resourceVersion` and `uid` (kept across
    /// replaces). Returns the stored version.
    pub fn apply(&self, kind: ClusterKind, mut value: Value) -> Stored {
        let meta = |field: &str| value.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str).unwrap_or("").to_string();
        let (namespace, name) = (meta("namespace"), meta("name"));
        assert!(!name.is_empty(), "MemoryCluster::apply: {} without metadata.name", kind.plural());
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
            meta.remove("uid");
        }
        let mut inner = self.lock();
        let key = Inner::key(kind, &namespace, &name);
        let uid = match inner.objects.get(&key) {
            Some(e) => e.uid.clone(),
            None => {
                inner.created += 1;
                format!("00000000-0000-4000-9000-{:012x}", inner.created)
            }
        };
        inner.revision += 1;
        let entry = Entry { revision: inner.revision, uid, value };
        let stored = stamp(&key, &entry);
        inner.objects.insert(key, entry);
        inner.watches.tell(kind, || WatchEvent::Apply(stored.clone()));
        stored
    }

    /// Deletes the object; returns its last version, `None` if there was none.
    pub fn delete(&self, kind: ClusterKind, namespace: &str, name: &str) -> Option<Stored> {
        let mut inner = self.lock();
        let key = Inner::key(kind, namespace, name);
        let mut entry = inner.objects.remove(&key)?;
        inner.revision += 1;
        entry.revision = inner.revision;
        let last = stamp(&key, &entry);
        inner.watches.tell(kind, || WatchEvent::Delete(last.clone()));
        Some(last)
    }

    /// Whether the cluster serves `kind`. Watches of a kind that is not served are refused
    /// (404) until it is, and then list it, as a watcher that finds the resource installed.
    pub fn set_serves(&self, kind: ClusterKind, serves: bool) {
        let mut inner = self.lock();
        if inner.served.insert(kind, serves) == Some(serves) {
            return;
        }
        if serves {
            let current = inner.current(kind);
            inner.watches.resume(kind, current);
        } else {
            inner.watches.refuse(kind, 404, &not_served_message(kind));
        }
    }

    /// What `/healthz` answers from now on.
    pub fn set_healthz(&self, answer: Result<(), String>) {
        self.lock().healthz = answer;
    }

    /// The next `times` gets of `kind` fail with `error`.
    pub fn inject_get(&self, kind: ClusterKind, error: ErrorKind, times: u32) {
        let mut inner = self.lock();
        if times == 0 {
            inner.get_faults.remove(&kind);
        } else {
            inner.get_faults.insert(kind, (error, times));
        }
    }

    /// How many gets of `kind` were made (injected failures included).
    pub fn get_count(&self, kind: ClusterKind) -> u64 {
        self.lock().gets.get(&kind).copied().unwrap_or(0)
    }

    /// See [`super::MemoryDatastore::expire_watches`].
    pub fn expire_watches(&self, kind: ClusterKind) {
        let mut inner = self.lock();
        let current = inner.current(kind);
        inner.watches.expire(kind, current);
    }

    /// See [`super::MemoryDatastore::drop_watch_events`].
    pub fn drop_watch_events(&self, kind: ClusterKind, n: u64) {
        self.lock().watches.drop_events(kind, n);
    }

    /// See [`super::MemoryDatastore::stall_watches`].
    pub fn stall_watches(&self, kind: ClusterKind) {
        self.lock().watches.stall(kind);
    }

    /// See [`super::MemoryDatastore::refuse_watches`].
    pub fn refuse_watches(&self, kind: ClusterKind, code: u16) {
        self.lock().watches.refuse(kind, code, &format!("watching {} refused ({code})", kind.plural()));
    }

    /// See [`super::MemoryDatastore::resume_watches`].
    pub fn resume_watches(&self, kind: ClusterKind) {
        let mut inner = self.lock();
        let current = inner.current(kind);
        inner.watches.resume(kind, current);
    }

    /// See [`super::MemoryDatastore::fail_watches`].
    pub fn fail_watches(&self, kind: ClusterKind, message: &str) {
        self.lock().watches.fail(kind, message);
    }

    pub fn get_now(&self, kind: ClusterKind, namespace: &str, name: &str) -> DsResult<Stored> {
        let mut inner = self.lock();
        *inner.gets.entry(kind).or_default() += 1;
        if let Some((error, times)) = inner.get_faults.get_mut(&kind) {
            let error = *error;
            *times -= 1;
            if *times == 0 {
                inner.get_faults.remove(&kind);
            }
            return Err(DatastoreError::new(error, format!("injected {} on get {}", error.category(), kind.plural())));
        }
        let key = Inner::key(kind, namespace, name);
        match inner.objects.get(&key) {
            Some(entry) if inner.served[&kind] => Ok(stamp(&key, entry)),
            _ => Err(DatastoreError::not_found(format!("{} {namespace}/{name} not found", kind.plural()))),
        }
    }

    pub fn list_now(&self, kind: ClusterKind) -> DsResult<Vec<Stored>> {
        let inner = self.lock();
        if !inner.served[&kind] {
            return Err(DatastoreError::not_found(not_served_message(kind)));
        }
        Ok(inner.current(kind))
    }
}

impl ClusterReader for MemoryCluster {
    fn watch(&self, kind: ClusterKind) -> WatchStream {
        let mut inner = self.lock();
        let current = inner.current(kind);
        inner.watches.subscribe(kind, current)
    }

    fn get(&self, kind: ClusterKind, namespace: &str, name: &str) -> impl Future<Output = DsResult<Stored>> + Send {
        std::future::ready(self.get_now(kind, namespace, name))
    }

    fn list_each(&self, kind: ClusterKind, sink: &mut (dyn FnMut(Stored) + Send)) -> impl Future<Output = DsResult<u64>> + Send {
        // Listed under the lock, handed out after it: a sink may call back into the cluster.
        let listed = self.list_now(kind).map(|objects| {
            let n = objects.len() as u64;
            objects.into_iter().for_each(&mut *sink);
            n
        });
        std::future::ready(listed)
    }

    fn serves(&self, kind: ClusterKind) -> impl Future<Output = DsResult<bool>> + Send {
        std::future::ready(Ok(self.lock().served[&kind]))
    }

    fn healthz(&self) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(self.lock().healthz.clone())
    }
}

impl super::cluster::StatusWriter for MemoryCluster {
    fn patch_status(&self, kind: ClusterKind, namespace: &str, name: &str, revision: &str, status: Value) -> impl Future<Output = DsResult<Stored>> + Send {
        let result = (|| {
            let mut inner = self.lock();
            let key = Inner::key(kind, namespace, name);
            let current = inner.revision + 1;
            let entry = inner.objects.get_mut(&key).ok_or_else(|| DatastoreError::not_found(format!("{} {namespace}/{name} not found", kind.plural())))?;
            if entry.revision.to_string() != revision {
                return Err(DatastoreError::conflict(format!("{} {namespace}/{name} is at {}, not {revision}", kind.plural(), entry.revision)));
            }
            merge(&mut entry.value["status"], status);
            entry.revision = current;
            let stored = stamp(&key, entry);
            inner.revision = current;
            inner.watches.tell(kind, || WatchEvent::Apply(stored.clone()));
            Ok(stored)
        })();
        std::future::ready(result)
    }
}

/// JSON merge patch (RFC 7386): objects merge, `null` deletes, anything else replaces.
fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in fields {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::block_on;
    use futures::StreamExt;
    use serde_json::json;

    fn pod(ns: &str, name: &str, ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name},
               "spec": {"nodeName": "n1"}, "status": {"podIP": ip}})
    }

    /// Every event already delivered, without waiting.
    fn ready(stream: &mut WatchStream) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        while let Some(Some(e)) = futures::FutureExt::now_or_never(stream.next()) {
            out.push(e);
        }
        out
    }

    #[test]
    fn pods_are_got_by_namespace_and_name_and_replaces_keep_the_uid() {
        let c = MemoryCluster::new();
        let a = c.apply(ClusterKind::Pod, pod("ns1", "p", "10.0.0.1"));
        c.apply(ClusterKind::Pod, pod("ns2", "p", "10.0.0.2"));
        let a2 = c.apply(ClusterKind::Pod, pod("ns1", "p", "10.0.0.3"));
        assert_eq!((a2.uid.as_str(), a2.value["metadata"]["resourceVersion"].as_str()), (a.uid.as_str(), Some("3")));
        let got = block_on(c.get(ClusterKind::Pod, "ns1", "p")).unwrap();
        assert_eq!(got.value["status"]["podIP"], "10.0.0.3");
        assert!(block_on(c.get(ClusterKind::Pod, "ns3", "p")).unwrap_err().is_not_found());
        c.inject_get(ClusterKind::Pod, ErrorKind::Transient, 1);
        assert_eq!(block_on(c.get(ClusterKind::Pod, "ns1", "p")).unwrap_err().kind, ErrorKind::Transient);
        block_on(c.get(ClusterKind::Pod, "ns1", "p")).unwrap();
        assert_eq!(c.get_count(ClusterKind::Pod), 4);
        assert!(c.delete(ClusterKind::Pod, "ns1", "p").is_some());
        assert!(block_on(c.get(ClusterKind::Pod, "ns1", "p")).unwrap_err().is_not_found());
    }

    #[test]
    fn kubevirt_kinds_are_served_and_listed_only_once_installed() {
        let c = MemoryCluster::new();
        assert!(!block_on(c.serves(ClusterKind::VirtualMachine)).unwrap());
        assert!(block_on(c.serves(ClusterKind::Node)).unwrap());
        let mut vms = c.watch(ClusterKind::VirtualMachine);
        assert!(matches!(ready(&mut vms).as_slice(), [WatchEvent::Error(f)] if f.refused == Some(404)));
        let mut sink = |_: Stored| {};
        assert!(block_on(c.list_each(ClusterKind::VirtualMachine, &mut sink)).unwrap_err().is_not_found());
        c.apply(ClusterKind::VirtualMachine, json!({"metadata": {"namespace": "ns", "name": "vm"}}));
        assert!(ready(&mut vms).is_empty(), "a refused watch delivers nothing");
        c.set_serves(ClusterKind::VirtualMachine, true);
        let events = ready(&mut vms);
        assert!(matches!(events.as_slice(), [WatchEvent::Init, WatchEvent::InitApply(s), WatchEvent::InitDone] if s.name == "vm"), "{events:?}");
        let mut names = Vec::new();
        let mut sink = |s: Stored| names.push(s.name);
        assert_eq!(block_on(c.list_each(ClusterKind::VirtualMachine, &mut sink)).unwrap(), 1);
        assert_eq!(names, ["vm"]);
    }

    #[test]
    fn cluster_watches_see_applies_and_deletes_and_share_the_faults() {
        let c = MemoryCluster::new();
        c.apply(ClusterKind::Node, json!({"metadata": {"name": "n1"}}));
        let mut nodes = c.watch(ClusterKind::Node);
        assert_eq!(ready(&mut nodes).len(), 3);
        c.stall_watches(ClusterKind::Node);
        c.apply(ClusterKind::Node, json!({"metadata": {"name": "n2"}}));
        c.delete(ClusterKind::Node, "ignored", "n1");
        assert!(ready(&mut nodes).is_empty());
        c.resume_watches(ClusterKind::Node);
        let events = ready(&mut nodes);
        assert!(matches!(events.as_slice(), [WatchEvent::Apply(a), WatchEvent::Delete(d)] if a.name == "n2" && d.name == "n1"), "{events:?}");
        c.set_healthz(Err("Error reaching apiserver: down".into()));
        assert_eq!(block_on(c.healthz()), Err("Error reaching apiserver: down".to_string()));
    }
}
