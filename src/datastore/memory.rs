//! The in-memory datastore: the same compare-and-swap and soft-delete semantics as KDD, for
//! tests, the simulator and trying the product without a cluster.
//!
//! Owns: the object table, one global revision counter (like etcd's revision and Kubernetes'
//! resourceVersion), deterministic uids, fault injection, "another writer" hooks, per
//! (verb, kind) operation counts, and the watches of every kind (a broadcast fed in commit
//! order under the table's lock, with the faults of a real watch on demand).
//! Must not: hold its lock across an `.await` (every operation runs synchronously inside one
//! lock section, so every returned future is already complete), or read the clock.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use serde_json::{Map, Value};

use super::watch::{WatchEvent, WatchStream};
use super::watch_hub::WatchHub;
use super::{Datastore, DatastoreError, DsResult, ErrorKind, Expect, Kind, Precondition, Stored, check_expected};
use crate::ipam::index::{HandleObject, Token};
use crate::model::meta::Object;
use crate::model::{BlockAffinity, IpamBlock, IpamHandle};
use serde::Deserialize;

/// The verbs of the trait, for fault injection and operation counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Get,
    List,
    Create,
    Update,
    /// A write of `status` alone (the status subresource).
    UpdateStatus,
    /// Checks and a soft-delete mark in one request ([`Datastore::soft_delete_if`]).
    Patch,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::List => "list",
            Op::Create => "create",
            Op::Update => "update",
            Op::UpdateStatus => "update_status",
            Op::Patch => "patch",
            Op::Delete => "delete",
        }
    }
}

/// A queued failure: the next `times` matching calls fail with `error` and change nothing.
#[derive(Debug, Clone)]
struct Fault {
    kind: Option<Kind>,
    name: Option<String>,
    op: Op,
    error: ErrorKind,
    times: u32,
}

impl Fault {
    fn matches(&self, op: Op, kind: Kind, name: Option<&str>) -> bool {
        self.times > 0
            && self.op == op
            && self.kind.is_none_or(|k| k == kind)
            && self.name.as_deref().is_none_or(|n| Some(n) == name)
    }
}

type Mutation = Box<dyn FnOnce(&mut Value) + Send>;

/// A one-shot "concurrent writer": runs just before the matching call, as if another client
/// had written the object between our read and our write.
struct Hook {
    op: Op,
    kind: Kind,
    name: String,
    mutate: Mutation,
}

/// One stored object. Bodies are never changed in place (a write stores a new one), so a
/// [`MemoryDatastore::fork`] shares them.
#[derive(Debug, Clone)]
struct Entry {
    revision: u64,
    /// The creation number the uid is spelled from ([`uid_of`]).
    created: u64,
    /// `spec.deleted`, read once when the body is stored.
    soft_deleted: bool,
    body: Body,
}

/// How a body is held.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// Compact JSON text (a quarter of the memory of a parsed `Value`), parsed again on every read.
    Json(Arc<[u8]>),
    /// An IPAMHandle in its compact form: a quarter of the memory of a decoded one, and what a
    /// listing of handles for the index shares ([`MemoryDatastore::shared_handles`]).
    Handle(Arc<CompactHandle>),
    /// An IPAM object decoded once and stamped with the entry's name, revision and uid: what a
    /// typed read ([`MemoryDatastore::shared_current`]) hands out, shared instead of copied, so a
    /// simulated cluster's relist costs a pointer an object.
    Block(Arc<IpamBlock>),
    Affinity(Arc<BlockAffinity>),
}

/// An IPAMHandle in the fewest bytes: its name, its handle ID where that is not the name, and
/// its block counts; the entry that holds it carries its revision and uid. Only a body that
/// encodes back from it to exactly what was written is held so (one with labels, unknown fields
/// or a soft delete stays text): a read always gives back what was written. A generator can
/// build one directly ([`CompactHandle::new`]) and hand it to [`MemoryDatastore::load_handle`],
/// so a simulated cluster's handles are never held in a second, larger form.
#[derive(Debug, PartialEq, Eq)]
pub struct CompactHandle {
    name: Box<str>,
    /// `spec.handleID` when it differs from the name.
    handle_id: Option<Box<str>>,
    blocks: Box<[(Box<str>, u32)]>,
}

impl CompactHandle {
    /// The handle of `handle_id` with `blocks`, named as Calico names it
    /// ([`handle_object_name`](crate::model::names::handle_object_name)).
    pub fn new(handle_id: &str, blocks: &crate::model::BlockCounts) -> CompactHandle {
        CompactHandle::named(&crate::model::names::handle_object_name(handle_id), handle_id, blocks)
    }

    /// The handle of `handle_id` with `blocks`, stored as `name`.
    fn named(name: &str, handle_id: &str, blocks: &crate::model::BlockCounts) -> CompactHandle {
        CompactHandle {
            name: name.into(),
            handle_id: (handle_id != name).then(|| handle_id.into()),
            blocks: blocks.iter().map(|(cidr, n)| (Box::from(cidr), n)).collect(),
        }
    }

    fn of(value: &Value, name: &str) -> Option<CompactHandle> {
        let h = IpamHandle::deserialize(value).ok()?;
        let plain_meta = crate::model::meta::Meta { name: name.to_string(), ..Default::default() };
        if h.api_version != crate::model::CALICO_API_VERSION
            || h.kind != crate::model::handle::KIND
            || h.metadata != plain_meta
            || h.spec.deleted
            || !h.spec.extra.is_empty()
            || !h.extra.is_empty()
        {
            return None;
        }
        let compact = CompactHandle::named(name, &h.spec.handle_id, &h.spec.block);
        (compact.value() == *value).then_some(compact)
    }

    /// The body as written (what `kubectl get ipamhandle -o json` shows, without the server's
    /// fields).
    pub fn value(&self) -> Value {
        let blocks: Map<String, Value> = self.blocks.iter().map(|(cidr, n)| (cidr.to_string(), Value::from(*n))).collect();
        serde_json::json!({
            "apiVersion": crate::model::CALICO_API_VERSION,
            "kind": crate::model::handle::KIND,
            "metadata": {"name": &*self.name},
            "spec": {"handleID": self.handle_id(), "block": blocks},
        })
    }

    /// (CIDR, count), ordered by the CIDRs' text as the object's map is.
    pub fn blocks(&self) -> impl Iterator<Item = (&str, u32)> {
        self.blocks.iter().map(|(cidr, n)| (&**cidr, *n))
    }
}

/// A handle not stored anywhere: it has no revision or uid.
impl HandleObject for CompactHandle {
    fn object_name(&self) -> &str {
        &self.name
    }
    fn handle_id(&self) -> &str {
        self.handle_id.as_deref().unwrap_or(&self.name)
    }
    fn soft_deleted(&self) -> bool {
        false
    }
    fn tokens(&self) -> (Token, Token) {
        (Token::new(""), Token::new(""))
    }
}

/// A handle of a listing for the index: shared with its revision and creation number when the
/// datastore holds it compact, decoded and stamped otherwise.
#[derive(Debug, Clone)]
pub enum SharedHandle {
    Compact { handle: Arc<CompactHandle>, revision: u64, created: u64 },
    Decoded(Arc<IpamHandle>),
}

impl SharedHandle {
    fn object(&self) -> &dyn HandleObject {
        match self {
            SharedHandle::Compact { handle, .. } => &**handle,
            SharedHandle::Decoded(h) => &**h,
        }
    }
}

impl HandleObject for SharedHandle {
    fn object_name(&self) -> &str {
        self.object().object_name()
    }
    fn handle_id(&self) -> &str {
        self.object().handle_id()
    }
    fn soft_deleted(&self) -> bool {
        self.object().soft_deleted()
    }
    fn tokens(&self) -> (Token, Token) {
        match self {
            SharedHandle::Compact { revision, created, .. } => (Token::Number(*revision), uid_token(*created)),
            SharedHandle::Decoded(h) => h.tokens(),
        }
    }
}

/// The IPAM kinds that can be read typed; the blocks and affinities a [`Body`] holds typed are
/// shared.
pub(crate) trait SharedKind: serde::de::DeserializeOwned + serde::Serialize + Send + Sync + 'static {
    fn shared(body: &Body) -> Option<&Arc<Self>>;
    fn meta_mut(&mut self) -> &mut crate::model::meta::Meta;
}

macro_rules! shared_kind {
    ($t:ty, $variant:ident) => {
        impl SharedKind for $t {
            fn shared(body: &Body) -> Option<&Arc<Self>> {
                match body {
                    Body::$variant(o) => Some(o),
                    _ => None,
                }
            }
            fn meta_mut(&mut self) -> &mut crate::model::meta::Meta {
                &mut self.metadata
            }
        }
    };
}
shared_kind!(IpamBlock, Block);
shared_kind!(BlockAffinity, Affinity);

/// Handles are held compact, never as a typed object: a typed read decodes one.
impl SharedKind for IpamHandle {
    fn shared(_: &Body) -> Option<&Arc<Self>> {
        None
    }
    fn meta_mut(&mut self) -> &mut crate::model::meta::Meta {
        &mut self.metadata
    }
}

/// Stamps `meta` as `name` (`<namespace>/<name>` for a namespaced kind) at `revision`, with the
/// uid of the `created`-th object.
fn stamp_meta(meta: &mut crate::model::meta::Meta, name: &str, revision: u64, created: u64) {
    match name.split_once('/') {
        Some((ns, n)) => {
            meta.namespace = Some(ns.to_string());
            meta.name = n.to_string();
        }
        None => meta.name = name.to_string(),
    }
    meta.resource_version = Some(revision.to_string());
    meta.uid = Some(uid_of(created));
}

/// `value` decoded into `T` when `T` encodes back to exactly `value`, stamped as `name` at
/// `revision` with the uid of the `created`-th object.
fn typed<T: SharedKind>(value: &Value, name: &str, revision: u64, created: u64) -> Option<Arc<T>> {
    let mut object = T::deserialize(value).ok()?;
    if serde_json::to_value(&object).ok()? != *value {
        return None;
    }
    stamp_meta(object.meta_mut(), name, revision, created);
    Some(Arc::new(object))
}

impl Entry {
    fn new(kind: Kind, name: &str, revision: u64, created: u64, value: &Value) -> Entry {
        // Cluster-scoped kinds only: a stamp names no namespace.
        let held = match kind {
            Kind::IpamHandle => CompactHandle::of(value, name).map(|h| Body::Handle(Arc::new(h))),
            Kind::IpamBlock => typed::<IpamBlock>(value, name, revision, created).map(Body::Block),
            Kind::BlockAffinity => typed::<BlockAffinity>(value, name, revision, created).map(Body::Affinity),
            _ => None,
        };
        let body = held.unwrap_or_else(|| Body::Json(serde_json::to_vec(value).expect("a JSON value always encodes").into()));
        Entry { revision, created, soft_deleted: soft_deleted(value), body }
    }

    /// The body as written when it is held typed (without the stamp's revision and uid), or
    /// its JSON text.
    fn typed_value(&self) -> Result<Value, &[u8]> {
        fn unstamped<T: serde::Serialize>(o: &T) -> Value {
            strip_server_fields(serde_json::to_value(o).expect("a typed body encodes"))
        }
        match &self.body {
            Body::Json(b) => Err(b),
            Body::Handle(h) => Ok(h.value()),
            Body::Block(o) => Ok(unstamped(&**o)),
            Body::Affinity(o) => Ok(unstamped(&**o)),
        }
    }

    /// The body as written.
    fn value(&self) -> Value {
        self.typed_value().unwrap_or_else(|b| serde_json::from_slice(b).expect("a stored body is JSON this datastore wrote"))
    }

    /// The body decoded into `T`.
    fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        match self.typed_value() {
            Ok(value) => T::deserialize(value).map_err(|e| e.to_string()),
            Err(b) => serde_json::from_slice(b).map_err(|e| e.to_string()),
        }
    }

    fn uid(&self) -> String {
        uid_of(self.created)
    }
}

/// The entry's body typed and stamped as `name`: shared when it is held typed, decoded otherwise.
fn shared<T: SharedKind>(name: &str, e: &Entry) -> DsResult<Arc<T>> {
    if let Some(o) = T::shared(&e.body) {
        return Ok(Arc::clone(o));
    }
    let mut object: T = e.decode().map_err(|err| DatastoreError::invalid(format!("{name} does not decode: {err}")))?;
    stamp_meta(object.meta_mut(), name, e.revision, e.created);
    Ok(Arc::new(object))
}

/// The uid [`uid_of`] spells, as [`Token::new`] reads it, without spelling it.
fn uid_token(created: u64) -> Token {
    if created >= 1 << 48 {
        return Token::new(&uid_of(created));
    }
    let mut bytes = [0u8; 16];
    bytes[6] = 0x40;
    bytes[8] = 0x80;
    bytes[10..].copy_from_slice(&created.to_be_bytes()[2..]);
    Token::Uuid(bytes)
}

/// The deterministic uid of the `created`-th object ever created.
fn uid_of(created: u64) -> String {
    format!("00000000-0000-4000-8000-{created:012x}")
}

fn soft_deleted(value: &Value) -> bool {
    match value.get("spec").and_then(|s| s.get("deleted")) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

#[derive(Default)]
struct Inner {
    objects: BTreeMap<(Kind, String), Entry>,
    /// Last revision handed out; every create, update and delete takes the next one.
    revision: u64,
    /// Objects ever created; the source of deterministic uids.
    created: u64,
    faults: Vec<Fault>,
    hooks: VecDeque<Hook>,
    ops: BTreeMap<(Op, Kind), u64>,
    watches: WatchHub<Kind>,
    /// Removed objects with their last bodies, kept from [`MemoryDatastore::record_removals`]
    /// until [`MemoryDatastore::take_removed`] takes them.
    removed: Option<Vec<(Kind, String, Entry)>>,
}

impl Inner {
    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Counts the call and returns the injected failure, if one is queued for it.
    fn enter(&mut self, op: Op, kind: Kind, name: Option<&str>) -> DsResult<()> {
        *self.ops.entry((op, kind)).or_default() += 1;
        if let Some(name) = name {
            while let Some(pos) = self.hooks.iter().position(|h| h.op == op && h.kind == kind && h.name == name) {
                let Some(hook) = self.hooks.remove(pos) else { break };
                self.mutate_now(kind, name, hook.mutate);
            }
        }
        if let Some(f) = self.faults.iter_mut().find(|f| f.matches(op, kind, name)) {
            f.times -= 1;
            let error = f.error;
            self.faults.retain(|f| f.times > 0);
            return Err(DatastoreError::new(error, format!("injected {} on {} {}", error.category(), op.as_str(), kind.plural())));
        }
        Ok(())
    }

    fn mutate_now(&mut self, kind: Kind, name: &str, mutate: Mutation) -> Option<Stored> {
        let revision = self.next_revision();
        let entry = self.objects.get_mut(&(kind, name.to_string()))?;
        let mut value = entry.value();
        mutate(&mut value);
        *entry = Entry::new(kind, name, revision, entry.created, &value);
        let stored = stamp(name, entry);
        self.watches.tell(kind, || WatchEvent::Apply(stored.clone()));
        Some(stored)
    }

    /// Stores a new version of an existing object and tells the watches.
    fn replace(&mut self, kind: Kind, name: &str, created: u64, value: Value) -> Stored {
        let revision = self.next_revision();
        let entry = Entry::new(kind, name, revision, created, &value);
        let stored = stamp(name, &entry);
        self.objects.insert((kind, name.to_string()), entry);
        self.watches.tell(kind, || WatchEvent::Apply(stored.clone()));
        stored
    }

    /// Stores a new object, made by `entry` from its revision and creation number, and tells
    /// the watches; an existing one of the same name is left as it is.
    fn create(&mut self, kind: Kind, name: &str, entry: impl FnOnce(u64, u64) -> Entry) -> DsResult<&Entry> {
        let key = (kind, name.to_string());
        if self.objects.contains_key(&key) {
            return Err(DatastoreError::new(ErrorKind::AlreadyExists, format!("{} {name} already exists", kind.kind_name())));
        }
        self.created += 1;
        let created = self.created;
        let revision = self.next_revision();
        let entry = self.objects.entry(key).or_insert(entry(revision, created));
        self.watches.tell(kind, || WatchEvent::Apply(stamp(name, entry)));
        Ok(entry)
    }

    /// The entries of `kind`, by name.
    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = (&String, &Entry)> {
        self.objects.range((kind, String::new())..).take_while(move |((k, _), _)| *k == kind).map(|((_, n), e)| (n, e))
    }

    /// Every object of `kind`, stamped, soft-deleted ones included (what a list returns).
    fn current(&self, kind: Kind) -> Vec<Stored> {
        self.of_kind(kind).map(|(n, e)| stamp(n, e)).collect()
    }

    /// Removes the object and tells the watches, its last body stamped with the delete's
    /// revision (as a Kubernetes DELETED event carries it).
    fn remove(&mut self, kind: Kind, name: &str) {
        let Some(mut entry) = self.objects.remove(&(kind, name.to_string())) else { return };
        entry.revision = self.next_revision();
        self.watches.tell(kind, || WatchEvent::Delete(stamp(name, &entry)));
        if let Some(log) = &mut self.removed {
            log.push((kind, name.to_string(), entry));
        }
    }
}

/// The stored body with `metadata` naming this version.
fn stamp(name: &str, entry: &Entry) -> Stored {
    let mut value = entry.value();
    if let Some(obj) = value.as_object_mut() {
        let meta = obj.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
        if let Some(meta) = meta.as_object_mut() {
            // A namespaced kind's `<namespace>/<name>` is both fields of the metadata.
            match name.split_once('/') {
                Some((ns, n)) => {
                    meta.insert("namespace".into(), Value::String(ns.to_string()));
                    meta.insert("name".into(), Value::String(n.to_string()));
                }
                None => {
                    meta.insert("name".into(), Value::String(name.to_string()));
                }
            }
            meta.insert("resourceVersion".into(), Value::String(entry.revision.to_string()));
            meta.insert("uid".into(), Value::String(entry.uid()));
        }
    }
    Stored { name: name.to_string(), revision: entry.revision.to_string(), uid: entry.uid(), value }
}

/// Checks the body an update or create carries: a JSON object whose `metadata.name`, if set,
/// is the object's name.
fn check_body(kind: Kind, name: &str, value: &Value) -> DsResult<()> {
    let Some(obj) = value.as_object() else {
        return Err(DatastoreError::invalid(format!("{} {name}: body is not a JSON object", kind.kind_name())));
    };
    if name.is_empty() {
        return Err(DatastoreError::invalid(format!("{}: empty name", kind.kind_name())));
    }
    let own = if kind.namespaced() { name.split_once('/').map_or(name, |(_, n)| n) } else { name };
    match obj.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str) {
        Some(n) if !n.is_empty() && n != own => {
            Err(DatastoreError::invalid(format!("{} {name}: metadata.name is {n:?}", kind.kind_name())))
        }
        _ => Ok(()),
    }
}

/// A datastore held in process memory. Cheap to create; share it by reference.
#[derive(Default)]
pub struct MemoryDatastore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryDatastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryDatastore").field("objects", &inner.objects.len()).field("revision", &inner.revision).finish()
    }
}

impl MemoryDatastore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in a test hook poisons the lock; the table itself is still consistent because
        // every operation mutates it in one step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the stored objects and counters (revisions and uids continue from the same
    /// numbers), without faults, hooks, operation counts or watchers: one loaded cluster serves
    /// several independent runs. The bodies are shared, not copied; a write to either side
    /// replaces its own entry's body and leaves the other's.
    pub fn fork(&self) -> MemoryDatastore {
        let inner = self.lock();
        let copy = Inner { objects: inner.objects.clone(), revision: inner.revision, created: inner.created, ..Inner::default() };
        MemoryDatastore { inner: Mutex::new(copy) }
    }

    /// Queues a failure: the next `times` calls of `op` on `kind` (any kind if `None`) and `name`
    /// (any name if `None`) fail with `error` and change nothing.
    pub fn inject(&self, kind: Option<Kind>, name: Option<&str>, op: Op, error: ErrorKind, times: u32) {
        if times > 0 {
            self.lock().faults.push(Fault { kind, name: name.map(str::to_string), op, error, times });
        }
    }

    /// Another writer changes the object now: `mutate` edits its body and it gets a new revision.
    /// Returns the new version, or `None` if the object does not exist.
    pub fn bump(&self, kind: Kind, name: &str, mutate: impl FnOnce(&mut Value) + Send + 'static) -> Option<Stored> {
        self.lock().mutate_now(kind, name, Box::new(mutate))
    }

    /// Another writer changes the object just before our next `op` on it (after any read we
    /// already made): the way to lose a race deterministically.
    pub fn bump_before(&self, op: Op, kind: Kind, name: &str, mutate: impl FnOnce(&mut Value) + Send + 'static) {
        self.lock().hooks.push_back(Hook { op, kind, name: name.to_string(), mutate: Box::new(mutate) });
    }

    /// A list + watch of `kind`: the current objects and, after them, every change in commit
    /// order, with the faults queued below. Not counted as an operation.
    pub fn watch_now(&self, kind: Kind) -> WatchStream {
        let mut inner = self.lock();
        let current = inner.current(kind);
        inner.watches.subscribe(kind, current)
    }

    /// The watches of `kind` expire (a 410 Gone): each gets a transient `expired` error, then a
    /// relist of the current objects.
    pub fn expire_watches(&self, kind: Kind) {
        let mut inner = self.lock();
        let current = inner.current(kind);
        inner.watches.expire(kind, current);
    }

    /// The next `n` changes of `kind` never reach the current watches: a missed event that only
    /// a later relist repairs.
    pub fn drop_watch_events(&self, kind: Kind, n: u64) {
        self.lock().watches.drop_events(kind, n);
    }

    /// The watches of `kind` stop delivering; their events are held until [`Self::resume_watches`].
    pub fn stall_watches(&self, kind: Kind) {
        self.lock().watches.stall(kind);
    }

    /// The apiserver refuses the watches of `kind` with `code` (401, 403, 404): each gets the
    /// refusal, then nothing until [`Self::resume_watches`].
    pub fn refuse_watches(&self, kind: Kind, code: u16) {
        self.lock().watches.refuse(kind, code, &format!("watching {} refused ({code})", kind.plural()));
    }

    /// Ends a stall (held events delivered in order) or a refusal (a relist, as a watcher that
    /// recovers lists again).
    pub fn resume_watches(&self, kind: Kind) {
        let mut inner = self.lock();
        let current = inner.current(kind);
        inner.watches.resume(kind, current);
    }

    /// One transient error on every watch of `kind`; the streams go on.
    pub fn fail_watches(&self, kind: Kind, message: &str) {
        self.lock().watches.fail(kind, message);
    }

    /// The object as stored, without counting an operation or finishing a soft delete.
    pub fn peek(&self, kind: Kind, name: &str) -> Option<Stored> {
        let inner = self.lock();
        inner.objects.get(&(kind, name.to_string())).map(|e| stamp(name, e))
    }

    /// Every object of `kind` as stored, by name, without counting an operation.
    pub fn snapshot(&self, kind: Kind) -> Vec<Stored> {
        self.lock().current(kind)
    }

    /// Every object of `kind` by name with its revision and whether it is soft-deleted, without
    /// reading a body or counting an operation: what a caller that keeps its own copies needs to
    /// find what changed.
    pub fn revisions(&self, kind: Kind) -> Vec<(String, String, bool)> {
        let inner = self.lock();
        inner.of_kind(kind).map(|(n, e)| (n.clone(), e.revision.to_string(), e.soft_deleted)).collect()
    }

    /// Every object of `kind` that is not soft-deleted, its stored body decoded into `T` and
    /// handed to `each` with its name, one at a time and without counting an operation: for a
    /// reader that wants a field or two of every object (a `T` that names only those), not a
    /// typed copy of the whole kind.
    pub fn decode_each<T: serde::de::DeserializeOwned>(&self, kind: Kind, mut each: impl FnMut(&str, T)) -> DsResult<()> {
        let inner = self.lock();
        for (name, e) in inner.of_kind(kind) {
            if e.soft_deleted {
                continue;
            }
            let object: T = e.decode().map_err(|err| DatastoreError::invalid(format!("{name} does not decode: {err}")))?;
            each(name, object);
        }
        Ok(())
    }

    /// Every object of `kind` that is not soft-deleted, decoded straight from its stored body
    /// into `Object<S>` with the name, revision and uid of the stored version, without counting an
    /// operation: a typed list that never holds the whole kind as parsed JSON.
    pub fn decode_current<S: serde::de::DeserializeOwned>(&self, kind: Kind) -> DsResult<Vec<Object<S>>> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (name, e) in inner.of_kind(kind) {
            if e.soft_deleted {
                continue;
            }
            let mut object: Object<S> = e.decode().map_err(|err| DatastoreError::invalid(format!("{name} does not decode: {err}")))?;
            stamp_meta(&mut object.metadata, name, e.revision, e.created);
            out.push(object);
        }
        Ok(out)
    }

    /// Every object of `kind` that is not soft-deleted, typed and stamped as a read would give
    /// it, without counting an operation. A body held typed is handed out shared (a pointer, no
    /// copy); any other is decoded into a new one.
    pub(crate) fn shared_current<T: SharedKind>(&self, kind: Kind) -> DsResult<Vec<Arc<T>>> {
        let inner = self.lock();
        let mut out = Vec::with_capacity(inner.of_kind(kind).filter(|(_, e)| !e.soft_deleted).count());
        for (name, e) in inner.of_kind(kind) {
            if e.soft_deleted {
                continue;
            }
            out.push(shared(name, e)?);
        }
        Ok(out)
    }

    /// Every IPAMHandle that is not soft-deleted, as the index loads it, without counting an
    /// operation: one held compact is shared (a pointer, no copy), any other decoded and stamped
    /// as a read gives it.
    pub(crate) fn shared_handles(&self) -> DsResult<Vec<SharedHandle>> {
        let inner = self.lock();
        let live = || inner.of_kind(Kind::IpamHandle).filter(|(_, e)| !e.soft_deleted);
        let mut out = Vec::with_capacity(live().count());
        for (name, e) in live() {
            out.push(match &e.body {
                Body::Handle(h) => SharedHandle::Compact { handle: Arc::clone(h), revision: e.revision, created: e.created },
                _ => SharedHandle::Decoded(shared(name, e)?),
            });
        }
        Ok(out)
    }

    /// From now on every removed object is kept, with its last body, until [`Self::take_removed`]:
    /// with [`Self::changed_since`], what a reader that keeps its own copies needs to follow the
    /// datastore without comparing every object.
    pub fn record_removals(&self) {
        self.lock().removed.get_or_insert_with(Vec::new);
    }

    /// The objects of `kind` removed since the last call (or [`Self::record_removals`]), typed.
    pub(crate) fn take_removed<T: SharedKind>(&self, kind: Kind) -> DsResult<Vec<Arc<T>>> {
        let mut inner = self.lock();
        // Without a log a reader would miss every removal: an error, not an empty answer.
        let Some(log) = inner.removed.as_mut() else {
            return Err(DatastoreError::invalid("removals are not being recorded (record_removals)".to_string()));
        };
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(log).into_iter().partition(|(k, _, _)| *k == kind);
        *log = kept;
        let decoded = taken.iter().map(|(_, name, e)| shared(name, e)).collect::<DsResult<Vec<_>>>();
        if decoded.is_err() {
            // Nothing is lost: the entries wait for the next call.
            log.extend(taken);
        }
        decoded
    }

    /// The objects of `kind` written after `revision` (soft-deleted ones included, flagged),
    /// typed, without counting an operation.
    pub(crate) fn changed_since<T: SharedKind>(&self, kind: Kind, revision: u64) -> DsResult<Vec<(bool, Arc<T>)>> {
        let inner = self.lock();
        inner.of_kind(kind).filter(|(_, e)| e.revision > revision).map(|(name, e)| Ok((e.soft_deleted, shared(name, e)?))).collect()
    }

    /// How many calls of `op` on `kind` were made (injected failures included).
    pub fn op_count(&self, op: Op, kind: Kind) -> u64 {
        self.lock().ops.get(&(op, kind)).copied().unwrap_or(0)
    }

    /// Every (verb, kind) count, for simulator reports.
    pub fn op_counts(&self) -> BTreeMap<(Op, Kind), u64> {
        self.lock().ops.clone()
    }

    /// The latest revision handed out.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    pub fn get_now(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        let mut inner = self.lock();
        inner.enter(Op::Get, kind, Some(name))?;
        let key = (kind, name.to_string());
        let entry = inner.objects.get(&key).ok_or_else(|| not_found(kind, name))?;
        let stored = stamp(name, entry);
        if kind == Kind::IpamBlock && stored.is_soft_deleted() {
            // KDD finishes a soft delete that its writer did not (SPEC §4.5).
            inner.remove(kind, name);
            return Err(not_found(kind, name));
        }
        Ok(stored)
    }

    pub fn list_now(&self, kind: Kind) -> DsResult<Vec<Stored>> {
        let mut inner = self.lock();
        inner.enter(Op::List, kind, None)?;
        Ok(inner.current(kind))
    }

    pub fn create_now(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        let mut inner = self.lock();
        inner.enter(Op::Create, kind, Some(name))?;
        check_body(kind, name, &value)?;
        let value = strip_server_fields(value);
        let entry = inner.create(kind, name, |revision, created| Entry::new(kind, name, revision, created, &value))?;
        Ok(stamp(name, entry))
    }

    /// Creates an IPAMHandle from its compact form, as [`Self::create_now`] would create the
    /// body [`CompactHandle::value`] spells, but holding this very handle (no copy) and
    /// returning nothing: how a generator loads a cluster's handles.
    pub fn load_handle(&self, handle: &Arc<CompactHandle>) -> DsResult<()> {
        let mut inner = self.lock();
        let name = &*handle.name;
        inner.enter(Op::Create, Kind::IpamHandle, Some(name))?;
        if name.is_empty() {
            // What `check_body` refuses in a create.
            return Err(DatastoreError::invalid(format!("{}: empty name", Kind::IpamHandle.kind_name())));
        }
        let body = Body::Handle(Arc::clone(handle));
        inner.create(Kind::IpamHandle, name, |revision, created| Entry { revision, created, soft_deleted: false, body })?;
        Ok(())
    }

    pub fn update_now(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        let mut inner = self.lock();
        inner.enter(Op::Update, kind, Some(&object.name))?;
        let created = cas_target(&inner, kind, object)?.created;
        let value = strip_server_fields(object.value.clone());
        Ok(inner.replace(kind, &object.name, created, value))
    }

    /// Replaces only `status`, under the same compare-and-swap as [`Self::update_now`]: what the
    /// status subresource does. A body without `status` clears it.
    pub fn update_status_now(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        let mut inner = self.lock();
        inner.enter(Op::UpdateStatus, kind, Some(&object.name))?;
        let entry = cas_target(&inner, kind, object)?;
        let (created, mut value) = (entry.created, entry.value());
        if let Some(body) = value.as_object_mut() {
            match object.value.get("status") {
                Some(status) => body.insert("status".into(), status.clone()),
                None => body.remove("status"),
            };
        }
        Ok(inner.replace(kind, &object.name, created, value))
    }

    /// What the Kubernetes backend's check-and-mark patch and delete do, with no read: the
    /// checks and the mark are one step ([`Op::Patch`]; only kinds that soft-delete are marked),
    /// the delete of the marked version another ([`Op::Delete`]; a fault there leaves the mark).
    pub fn soft_delete_if_now(&self, kind: Kind, name: &str, precondition: &Precondition, expect: &[Expect]) -> DsResult<()> {
        let mut inner = self.lock();
        inner.enter(Op::Patch, kind, Some(name))?;
        let entry = inner.objects.get(&(kind, name.to_string())).ok_or_else(|| not_found(kind, name))?;
        let (created, current) = (entry.created, stamp(name, entry));
        check_expected(kind, &current, precondition, expect)?;
        let marked = if kind.soft_deletes() {
            let marked = super::mark_deleted(kind, &current)?;
            inner.replace(kind, name, created, strip_server_fields(marked.value))
        } else {
            current
        };
        inner.enter(Op::Delete, kind, Some(name))?;
        let entry = inner.objects.get(&(kind, name.to_string())).ok_or_else(|| not_found(kind, name))?;
        if entry.revision.to_string() != marked.revision {
            return Err(conflict(kind, name, format!("changed after its mark: revision {}, marked {}", entry.revision, marked.revision)));
        }
        inner.remove(kind, name);
        Ok(())
    }

    pub fn delete_now(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        let mut inner = self.lock();
        inner.enter(Op::Delete, kind, Some(name))?;
        let key = (kind, name.to_string());
        let entry = inner.objects.get(&key).ok_or_else(|| not_found(kind, name))?;
        if let Some(rev) = &precondition.revision
            && entry.revision.to_string() != *rev
        {
            return Err(conflict(kind, name, format!("precondition revision {rev}, stored {}", entry.revision)));
        }
        if let Some(uid) = &precondition.uid
            && entry.uid() != *uid
        {
            return Err(conflict(kind, name, format!("precondition uid {uid}, stored {}", entry.uid())));
        }
        inner.remove(kind, name);
        Ok(())
    }
}

/// The stored object an update of `object` would replace: its body must be valid and its
/// revision (and uid, when set) must match the stored ones.
fn cas_target<'a>(inner: &'a Inner, kind: Kind, object: &Stored) -> DsResult<&'a Entry> {
    check_body(kind, &object.name, &object.value)?;
    if object.revision.is_empty() {
        // As for Kubernetes custom resources: an update must name the version it replaces.
        return Err(DatastoreError::invalid(format!("{} {}: update without a revision", kind.kind_name(), object.name)));
    }
    let entry = inner.objects.get(&(kind, object.name.clone())).ok_or_else(|| not_found(kind, &object.name))?;
    if entry.revision.to_string() != object.revision {
        return Err(conflict(kind, &object.name, format!("revision {} is stale, stored {}", object.revision, entry.revision)));
    }
    if !object.uid.is_empty() && entry.uid() != object.uid {
        return Err(conflict(kind, &object.name, format!("uid {} is not the stored {}", object.uid, entry.uid())));
    }
    Ok(entry)
}

/// The server owns `resourceVersion` and `uid`; what a client sends there is not stored.
fn strip_server_fields(mut value: Value) -> Value {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("uid");
    }
    value
}

fn not_found(kind: Kind, name: &str) -> DatastoreError {
    DatastoreError::not_found(format!("{} {name} not found", kind.kind_name()))
}

fn conflict(kind: Kind, name: &str, why: String) -> DatastoreError {
    DatastoreError::conflict(format!("{} {name}: {why}", kind.kind_name()))
}

impl Datastore for MemoryDatastore {
    fn get(&self, kind: Kind, name: &str) -> impl Future<Output = DsResult<Stored>> + Send {
        std::future::ready(self.get_now(kind, name))
    }

    fn list(&self, kind: Kind) -> impl Future<Output = DsResult<Vec<Stored>>> + Send {
        std::future::ready(self.list_now(kind))
    }

    fn create(&self, kind: Kind, name: &str, value: Value) -> impl Future<Output = DsResult<Stored>> + Send {
        std::future::ready(self.create_now(kind, name, value))
    }

    fn update(&self, kind: Kind, object: &Stored) -> impl Future<Output = DsResult<Stored>> + Send {
        std::future::ready(self.update_now(kind, object))
    }

    fn update_status(&self, kind: Kind, object: &Stored) -> impl Future<Output = DsResult<Stored>> + Send {
        std::future::ready(self.update_status_now(kind, object))
    }

    fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> impl Future<Output = DsResult<()>> + Send {
        std::future::ready(self.delete_now(kind, name, precondition))
    }

    fn soft_delete_if(&self, kind: Kind, name: &str, precondition: &Precondition, expect: &[Expect]) -> impl Future<Output = DsResult<()>> + Send {
        std::future::ready(self.soft_delete_if_now(kind, name, precondition, expect))
    }

    fn watch(&self, kind: Kind) -> WatchStream {
        self.watch_now(kind)
    }
}

/// Drives a future to completion on this thread without a runtime. Meant for futures that are
/// always ready (everything the memory backend returns, and code generic over the trait running
/// on it); a future that is pending is polled again after yielding the thread, so one that
/// waits on another thread still finishes, just without a waker to make it efficient.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn handle(name: &str) -> Value {
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": name},
               "spec": {"handleID": name, "block": {"10.0.0.0/26": 1}}})
    }

    fn block(name: &str, deleted: bool) -> Value {
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": name},
               "spec": {"cidr": "10.0.0.0/30", "allocations": [null, null, null, null], "unallocated": [0, 1, 2, 3],
                        "attributes": [], "strictAffinity": false, "deleted": deleted}})
    }

    #[test]
    fn a_body_kept_as_compact_text_reads_back_exactly_and_lists_typed_and_by_revision() {
        let ds = MemoryDatastore::new();
        let odd = json!({"metadata": {"name": "n", "labels": {"ünï": "€"}}, "spec": {"big": u64::MAX, "neg": -7, "f": 0.1, "deleted": false}});
        ds.create_now(Kind::IpamHandle, "n", odd.clone()).unwrap();
        let got = ds.peek(Kind::IpamHandle, "n").unwrap().value;
        assert_eq!((&got["spec"], &got["metadata"]["labels"]), (&odd["spec"], &odd["metadata"]["labels"]));
        ds.create_now(Kind::IpamBlock, "live", block("live", false)).unwrap();
        ds.create_now(Kind::IpamBlock, "gone", block("gone", true)).unwrap();
        ds.create_now(Kind::IpamHandle, "h", handle("h")).unwrap();
        let revisions = ds.revisions(Kind::IpamBlock);
        assert_eq!(revisions, vec![("gone".to_string(), "3".to_string(), true), ("live".to_string(), "2".to_string(), false)]);
        // A typed list skips soft-deleted objects and carries the stored version's metadata.
        let blocks: Vec<Object<crate::model::IpamBlockSpec>> = ds.decode_current(Kind::IpamBlock).unwrap();
        assert_eq!(blocks.len(), 1);
        let m = &blocks[0].metadata;
        assert_eq!((m.name.as_str(), m.resource_version.as_deref(), m.uid.as_deref()), ("live", Some("2"), Some(uid_of(2).as_str())));
        let stored = ds.peek(Kind::IpamBlock, "live").unwrap();
        assert_eq!(stored.decode::<crate::model::IpamBlock>().unwrap(), blocks[0]);
        // A body that is not the kind's shape is an error naming the object, not a panic.
        let err = ds.decode_current::<crate::model::IpamBlockSpec>(Kind::IpamHandle).unwrap_err();
        assert!(err.to_string().contains("does not decode"), "{err}");
    }

    fn held_as(ds: &MemoryDatastore, kind: Kind, name: &str) -> &'static str {
        match ds.lock().objects.get(&(kind, name.to_string())).map(|e| &e.body) {
            Some(Body::Json(_)) => "text",
            Some(Body::Handle(_)) => "compact",
            Some(Body::Block(_) | Body::Affinity(_)) => "typed",
            None => "absent",
        }
    }

    #[test]
    fn a_loaded_compact_handle_is_stored_as_a_create_of_the_body_it_spells_would_store_it() {
        let counts = crate::model::BlockCounts::from([("10.0.1.0/26".to_string(), 1), ("10.0.0.0/26".to_string(), 2)]);
        // An ID that is its own object name, and one with upper case and an underscore whose
        // object name differs from it.
        for id in ["k8s-pod-network.abc", "K8s-Pod.Net_1"] {
            let h = Arc::new(CompactHandle::new(id, &counts));
            assert_eq!(h.handle_id(), id);
            assert_eq!(h.object_name(), crate::model::names::handle_object_name(id));
            assert_eq!(h.blocks().collect::<Vec<_>>(), vec![("10.0.0.0/26", 2), ("10.0.1.0/26", 1)], "in CIDR order");
            let typed = IpamHandle::deserialize(h.value()).unwrap();
            assert_eq!((typed.spec.handle_id.as_str(), typed.spec.block.clone(), typed.name()), (id, counts.clone(), h.object_name()));
            let (loaded, created) = (MemoryDatastore::new(), MemoryDatastore::new());
            loaded.load_handle(&h).unwrap();
            created.create_now(Kind::IpamHandle, h.object_name(), h.value()).unwrap();
            for ds in [&loaded, &created] {
                assert_eq!(held_as(ds, Kind::IpamHandle, h.object_name()), "compact");
                assert_eq!(ds.op_count(Op::Create, Kind::IpamHandle), 1);
            }
            let (a, b) = (loaded.peek(Kind::IpamHandle, h.object_name()).unwrap(), created.peek(Kind::IpamHandle, h.object_name()).unwrap());
            assert_eq!((&a.name, &a.revision, &a.uid, &a.value), (&b.name, &b.revision, &b.uid, &b.value), "{id}");
            let listed = loaded.shared_handles().unwrap();
            assert!(matches!(&listed[..], [SharedHandle::Compact { handle, .. }] if Arc::ptr_eq(handle, &h)), "the loaded handle itself is listed");
            assert_eq!(listed[0].tokens(), created.shared_handles().unwrap()[0].tokens());
            // A second load of the same name is refused and changes nothing.
            let err = loaded.load_handle(&Arc::new(CompactHandle::new(id, &crate::model::BlockCounts::default()))).unwrap_err();
            assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err}");
            assert_eq!(loaded.peek(Kind::IpamHandle, h.object_name()).unwrap().value, a.value);
        }
        // An ID that sanitizes to nothing has no name: refused, as a create of it is.
        let nameless = Arc::new(CompactHandle::new("", &counts));
        let ds = MemoryDatastore::new();
        assert_eq!(ds.load_handle(&nameless).unwrap_err().kind, ErrorKind::Invalid);
        assert!(ds.list_now(Kind::IpamHandle).unwrap().is_empty());
        // A handle that is stored nowhere has no revision or uid.
        assert_eq!(CompactHandle::new("h", &counts).tokens(), (Token::new(""), Token::new("")));
    }

    #[test]
    fn an_ipam_body_that_encodes_back_exactly_is_held_typed_shared_by_listings_and_followed_by_revision() {
        let ds = MemoryDatastore::new();
        ds.create_now(Kind::IpamHandle, "h", handle("h")).unwrap();
        // A handle whose ID is not its name (as KDD names one with upper-case letters).
        let mut other = handle("other");
        other["spec"]["handleID"] = json!("Other");
        ds.create_now(Kind::IpamHandle, "other", other.clone()).unwrap();
        // `"deleted": false` and an unknown field of a non-object type: the typed form would write
        // the first differently, so that body stays text; the unknown field survives either way.
        let mut odd = handle("odd");
        odd["spec"]["deleted"] = json!(false);
        odd["spec"]["future"] = json!([1, "two"]);
        ds.create_now(Kind::IpamHandle, "odd", odd.clone()).unwrap();
        // Unknown fields and labels: what the compact form does not spell stays text.
        let mut extra = handle("extra");
        extra["spec"]["future"] = json!({"x": 1});
        ds.create_now(Kind::IpamHandle, "extra", extra.clone()).unwrap();
        let mut labelled = handle("labelled");
        labelled["metadata"]["labels"] = json!({"a": "b"});
        ds.create_now(Kind::IpamHandle, "labelled", labelled.clone()).unwrap();
        let mut future_block = block("fb", false);
        future_block["spec"].as_object_mut().unwrap().remove("deleted");
        future_block["spec"]["sequenceNumber"] = json!(0);
        future_block["spec"]["future"] = json!({"x": 1});
        ds.create_now(Kind::IpamBlock, "fb", future_block.clone()).unwrap();
        let held: Vec<&str> = ["h", "other", "odd", "extra", "labelled"].iter().map(|n| held_as(&ds, Kind::IpamHandle, n)).collect();
        assert_eq!(held, vec!["compact", "compact", "text", "text", "text"]);
        assert_eq!(held_as(&ds, Kind::IpamBlock, "fb"), "typed", "unknown fields are kept by the typed form");
        let written = [("h", handle("h")), ("other", other), ("odd", odd), ("extra", extra), ("labelled", labelled)];
        for (kind, name, written) in written.iter().map(|(n, w)| (Kind::IpamHandle, *n, w)).chain([(Kind::IpamBlock, "fb", &future_block)]) {
            let read = ds.peek(kind, name).unwrap();
            assert_eq!(strip_server_fields(read.value.clone()), *written, "{name} reads back as written");
            assert_eq!((read.value["metadata"]["resourceVersion"].as_str(), read.value["metadata"]["uid"].as_str()), (Some(read.revision.as_str()), Some(read.uid.as_str())));
        }
        // Two listings share the typed blocks, stamped as a read gives them.
        let (a, b) = (ds.shared_current::<IpamBlock>(Kind::IpamBlock).unwrap(), ds.shared_current::<IpamBlock>(Kind::IpamBlock).unwrap());
        assert!(Arc::ptr_eq(&a[0], &b[0]));
        assert_eq!(*a[0], ds.peek(Kind::IpamBlock, "fb").unwrap().decode::<IpamBlock>().unwrap(), "a shared object is what a read decodes to");
        // Two listings for the index share the compact handles; a text body is decoded each time.
        // Either way the index reads of it what it would read of a decoded read.
        let (a, b) = (ds.shared_handles().unwrap(), ds.shared_handles().unwrap());
        let names: Vec<&str> = a.iter().map(|h| h.object_name()).collect();
        assert_eq!(names, vec!["extra", "h", "labelled", "odd", "other"]);
        for (x, y) in a.iter().zip(&b) {
            let shared = matches!((x, y), (SharedHandle::Compact { handle: x, .. }, SharedHandle::Compact { handle: y, .. }) if Arc::ptr_eq(x, y));
            assert_eq!(shared, held_as(&ds, Kind::IpamHandle, x.object_name()) == "compact", "{}", x.object_name());
            let read: IpamHandle = ds.peek(Kind::IpamHandle, x.object_name()).unwrap().decode().unwrap();
            assert_eq!((x.object_name(), x.handle_id(), x.soft_deleted(), x.tokens()), (read.object_name(), read.handle_id(), read.soft_deleted(), read.tokens()));
        }
        let typed = ds.shared_current::<IpamHandle>(Kind::IpamHandle).unwrap();
        assert_eq!(typed.iter().map(|h| h.name()).collect::<Vec<_>>(), names, "handles read typed are decoded");
        // What changed after a revision, soft-deleted ones flagged; removals once recorded.
        let since = ds.revision();
        let mut h = ds.peek(Kind::IpamHandle, "h").unwrap();
        h.value["spec"]["deleted"] = json!(true);
        ds.update_now(Kind::IpamHandle, &h).unwrap();
        ds.delete_now(Kind::IpamHandle, "extra", &Precondition::default()).unwrap();
        ds.record_removals();
        ds.delete_now(Kind::IpamHandle, "odd", &Precondition::default()).unwrap();
        let changed = ds.changed_since::<IpamHandle>(Kind::IpamHandle, since).unwrap();
        assert_eq!(changed.iter().map(|(soft, h)| (*soft, h.name())).collect::<Vec<_>>(), vec![(true, "h")]);
        assert_eq!(held_as(&ds, Kind::IpamHandle, "h"), "text", "a soft-deleted handle is not held compact");
        let listed: Vec<String> = ds.shared_handles().unwrap().iter().map(|h| h.object_name().to_string()).collect();
        assert_eq!(listed, vec!["labelled", "other"], "soft-deleted objects are not listed");
        assert!(ds.fork().take_removed::<IpamHandle>(Kind::IpamHandle).is_err(), "a fork records nothing, and says so");
        assert!(ds.take_removed::<IpamBlock>(Kind::IpamBlock).unwrap().is_empty());
        let removed = ds.take_removed::<IpamHandle>(Kind::IpamHandle).unwrap();
        assert_eq!(removed.iter().map(|h| h.name()).collect::<Vec<_>>(), vec!["odd"], "only removals after recording began");
        assert!(ds.take_removed::<IpamHandle>(Kind::IpamHandle).unwrap().is_empty(), "taken once");
    }

    #[test]
    fn a_compact_handles_uid_token_is_the_one_its_spelled_uid_reads_as() {
        for created in [0, 1, 255, 1 << 40, (1 << 48) - 1, 1 << 48, u64::MAX] {
            assert_eq!(uid_token(created), Token::new(&uid_of(created)), "{created}");
        }
    }

    #[test]
    fn a_fork_holds_the_same_objects_and_counters_and_changes_apart() {
        let ds = MemoryDatastore::new();
        ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        ds.inject(Some(Kind::IpamHandle), None, Op::Create, ErrorKind::Conflict, 1);
        let fork = ds.fork();
        assert_eq!(fork.peek(Kind::IpamHandle, "a").unwrap(), ds.peek(Kind::IpamHandle, "a").unwrap());
        // Faults stay with the original; the counters continue from the same numbers in both.
        let b = fork.create_now(Kind::IpamHandle, "b", handle("b")).unwrap();
        assert!(ds.create_now(Kind::IpamHandle, "c", handle("c")).is_err(), "the injected fault fires on the original");
        let c = ds.create_now(Kind::IpamHandle, "c", handle("c")).unwrap();
        assert_eq!((&b.revision, &b.uid), (&c.revision, &c.uid));
        assert!(ds.peek(Kind::IpamHandle, "b").is_none() && fork.peek(Kind::IpamHandle, "c").is_none());
        // The shared body is replaced on the side that writes, not changed under the other.
        let mut changed = fork.peek(Kind::IpamHandle, "a").unwrap();
        changed.value["spec"]["handleID"] = json!("changed");
        fork.update_now(Kind::IpamHandle, &changed).unwrap();
        assert_eq!(fork.peek(Kind::IpamHandle, "a").unwrap().value["spec"]["handleID"], "changed");
        assert_eq!(ds.peek(Kind::IpamHandle, "a").unwrap().value["spec"]["handleID"], "a");
        fork.delete_now(Kind::IpamHandle, "a", &Precondition::default()).unwrap();
        assert!(ds.peek(Kind::IpamHandle, "a").is_some());
    }

    #[test]
    fn revisions_come_from_one_increasing_counter_and_uids_are_deterministic() {
        let ds = MemoryDatastore::new();
        let a = ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        let b = ds.create_now(Kind::BlockAffinity, "b", json!({"spec": {}})).unwrap();
        let a2 = ds.update_now(Kind::IpamHandle, &a).unwrap();
        let revs: Vec<u64> = [&a, &b, &a2].iter().map(|s| s.revision.parse().unwrap()).collect();
        assert_eq!(revs, vec![1, 2, 3]);
        assert_eq!(a2.uid, a.uid);
        assert_ne!(a.uid, b.uid);
        assert_eq!(a2.value["metadata"]["resourceVersion"], "3");
        let again = MemoryDatastore::new().create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        assert_eq!(again.uid, a.uid);
    }

    #[test]
    fn injected_faults_fire_the_requested_number_of_times_and_change_nothing() {
        let ds = MemoryDatastore::new();
        let a = ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        ds.inject(Some(Kind::IpamHandle), Some("a"), Op::Update, ErrorKind::Conflict, 2);
        ds.inject(None, None, Op::Get, ErrorKind::Transient, 1);
        assert_eq!(ds.update_now(Kind::IpamHandle, &a).unwrap_err().kind, ErrorKind::Conflict);
        assert_eq!(ds.update_now(Kind::IpamHandle, &a).unwrap_err().kind, ErrorKind::Conflict);
        assert_eq!(ds.get_now(Kind::IpPool, "x").unwrap_err().kind, ErrorKind::Transient);
        assert_eq!(ds.peek(Kind::IpamHandle, "a").unwrap().revision, a.revision);
        ds.update_now(Kind::IpamHandle, &a).unwrap();
        assert_eq!(ds.op_count(Op::Update, Kind::IpamHandle), 3);
        assert_eq!(ds.op_count(Op::Get, Kind::IpPool), 1);
    }

    #[test]
    fn a_bump_makes_the_reader_revision_stale() {
        let ds = MemoryDatastore::new();
        let a = ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        let bumped = ds.bump(Kind::IpamHandle, "a", |v| v["spec"]["block"]["10.0.0.0/26"] = json!(2)).unwrap();
        assert_ne!(bumped.revision, a.revision);
        assert!(ds.update_now(Kind::IpamHandle, &a).unwrap_err().is_conflict());
        assert!(ds.bump(Kind::IpamHandle, "missing", |_| {}).is_none());
    }

    #[test]
    fn a_hooked_writer_runs_just_before_the_matching_call() {
        let ds = MemoryDatastore::new();
        ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        let read = ds.get_now(Kind::IpamHandle, "a").unwrap();
        ds.bump_before(Op::Update, Kind::IpamHandle, "a", |v| v["spec"]["note"] = json!("other writer"));
        assert!(ds.update_now(Kind::IpamHandle, &read).unwrap_err().is_conflict());
        let fresh = ds.get_now(Kind::IpamHandle, "a").unwrap();
        assert_eq!(fresh.value["spec"]["note"], "other writer");
        ds.update_now(Kind::IpamHandle, &fresh).unwrap();
    }

    #[test]
    fn getting_a_soft_deleted_block_finishes_the_delete() {
        let ds = MemoryDatastore::new();
        ds.create_now(Kind::IpamBlock, "10-0-0-0-30", block("10-0-0-0-30", true)).unwrap();
        assert_eq!(ds.list_now(Kind::IpamBlock).unwrap().len(), 1, "list shows soft-deleted objects");
        assert!(ds.get_now(Kind::IpamBlock, "10-0-0-0-30").unwrap_err().is_not_found());
        assert!(ds.peek(Kind::IpamBlock, "10-0-0-0-30").is_none());
    }

    #[test]
    fn bodies_that_are_not_objects_or_name_another_object_are_invalid() {
        let ds = MemoryDatastore::new();
        assert_eq!(ds.create_now(Kind::IpPool, "p", json!(3)).unwrap_err().kind, ErrorKind::Invalid);
        assert_eq!(ds.create_now(Kind::IpPool, "p", json!({"metadata": {"name": "q"}})).unwrap_err().kind, ErrorKind::Invalid);
        let p = ds.create_now(Kind::IpPool, "p", json!({"spec": {}})).unwrap();
        let no_rev = Stored { revision: String::new(), ..p };
        assert_eq!(ds.update_now(Kind::IpPool, &no_rev).unwrap_err().kind, ErrorKind::Invalid);
    }

    #[test]
    fn block_on_drives_ready_futures() {
        assert_eq!(block_on(async { 7 }), 7);
        let ds = MemoryDatastore::new();
        assert!(block_on(ds.get(Kind::IpPool, "x")).unwrap_err().is_not_found());
    }

    /// Every event already delivered, without waiting.
    fn ready(stream: &mut WatchStream) -> Vec<WatchEvent> {
        use futures::{FutureExt, StreamExt};
        let mut out = Vec::new();
        while let Some(Some(e)) = stream.next().now_or_never() {
            out.push(e);
        }
        out
    }

    /// The events in a compact form: `I`, `I+name@rev`, `D`, `A name@rev`, `X name@rev`, `E`/`R403`.
    fn script(events: &[WatchEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WatchEvent::Init => "I".to_string(),
                WatchEvent::InitApply(s) => format!("I+{}@{}", s.name, s.revision),
                WatchEvent::InitDone => "D".to_string(),
                WatchEvent::Apply(s) => format!("A {}@{}", s.name, s.revision),
                WatchEvent::Delete(s) => format!("X {}@{}", s.name, s.revision),
                WatchEvent::Resumed => "S".to_string(),
                WatchEvent::Error(f) => match f.refused {
                    Some(code) => format!("R{code}"),
                    None => format!("E {}", f.message),
                },
            })
            .collect()
    }

    #[test]
    fn a_watch_starts_with_the_current_list_and_then_sees_every_change_in_commit_order() {
        let ds = MemoryDatastore::new();
        ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        ds.create_now(Kind::IpamBlock, "10-0-0-0-30", block("10-0-0-0-30", true)).unwrap();
        let mut handles = ds.watch_now(Kind::IpamHandle);
        let mut blocks = ds.watch_now(Kind::IpamBlock);
        assert_eq!(script(&ready(&mut handles)), ["I", "I+a@1", "D"]);
        assert_eq!(script(&ready(&mut blocks)), ["I", "I+10-0-0-0-30@2", "D"], "soft-deleted objects are listed");
        let b = ds.create_now(Kind::IpamHandle, "b", handle("b")).unwrap();
        ds.update_now(Kind::IpamHandle, &b).unwrap();
        ds.bump(Kind::IpamHandle, "a", |v| v["spec"]["note"] = json!(1)).unwrap();
        ds.bump_before(Op::Delete, Kind::IpamHandle, "b", |v| v["spec"]["note"] = json!(2));
        ds.delete_now(Kind::IpamHandle, "b", &Precondition::default()).unwrap();
        assert_eq!(script(&ready(&mut handles)), ["A b@3", "A b@4", "A a@5", "A b@6", "X b@7"]);
        assert!(ds.get_now(Kind::IpamBlock, "10-0-0-0-30").unwrap_err().is_not_found());
        assert_eq!(script(&ready(&mut blocks)), ["X 10-0-0-0-30@8"], "the finished soft delete is a Delete");
    }

    #[test]
    fn a_dropped_watch_unsubscribes() {
        let ds = MemoryDatastore::new();
        let kept = ds.watch_now(Kind::IpPool);
        drop(ds.watch_now(Kind::IpPool));
        ds.create_now(Kind::IpPool, "p", json!({"spec": {}})).unwrap();
        assert_eq!(ds.lock().watches.subscribers_of(Kind::IpPool), 1);
        drop(kept);
        ds.create_now(Kind::IpPool, "q", json!({"spec": {}})).unwrap();
        assert_eq!(ds.lock().watches.subscribers_of(Kind::IpPool), 0);
    }

    #[test]
    fn an_expired_watch_reports_it_and_relists_the_current_state() {
        let ds = MemoryDatastore::new();
        ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        let mut w = ds.watch_now(Kind::IpamHandle);
        ready(&mut w);
        ds.create_now(Kind::IpamHandle, "b", handle("b")).unwrap();
        ds.expire_watches(Kind::IpamHandle);
        assert_eq!(script(&ready(&mut w)), ["A b@2", "E expired", "I", "I+a@1", "I+b@2", "D"]);
    }

    #[test]
    fn dropped_events_are_missed_until_a_relist_repairs_them() {
        let ds = MemoryDatastore::new();
        let mut w = ds.watch_now(Kind::IpamHandle);
        let mut other = ds.watch_now(Kind::IpPool);
        ready(&mut w);
        ready(&mut other);
        ds.drop_watch_events(Kind::IpamHandle, 2);
        ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        ds.create_now(Kind::IpPool, "p", json!({"spec": {}})).unwrap();
        ds.create_now(Kind::IpamHandle, "b", handle("b")).unwrap();
        ds.create_now(Kind::IpamHandle, "c", handle("c")).unwrap();
        assert_eq!(script(&ready(&mut w)), ["A c@4"], "a and b were lost");
        assert_eq!(script(&ready(&mut other)), ["A p@2"], "other kinds lose nothing");
        ds.expire_watches(Kind::IpamHandle);
        assert_eq!(script(&ready(&mut w)), ["E expired", "I", "I+a@1", "I+b@3", "I+c@4", "D"]);
    }

    #[test]
    fn a_stalled_watch_holds_its_events_and_delivers_them_in_order_on_resume() {
        let ds = MemoryDatastore::new();
        let mut w = ds.watch_now(Kind::IpamHandle);
        ready(&mut w);
        ds.stall_watches(Kind::IpamHandle);
        let a = ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        ds.update_now(Kind::IpamHandle, &a).unwrap();
        let mut late = ds.watch_now(Kind::IpamHandle);
        assert!(ready(&mut w).is_empty() && ready(&mut late).is_empty());
        ds.resume_watches(Kind::IpamHandle);
        assert_eq!(script(&ready(&mut w)), ["A a@1", "A a@2"]);
        assert_eq!(script(&ready(&mut late)), ["I", "I+a@2", "D"]);
    }

    #[test]
    fn a_refused_watch_delivers_nothing_until_resumed_and_then_relists() {
        let ds = MemoryDatastore::new();
        ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        let mut w = ds.watch_now(Kind::IpamHandle);
        ready(&mut w);
        ds.refuse_watches(Kind::IpamHandle, 403);
        ds.create_now(Kind::IpamHandle, "b", handle("b")).unwrap();
        ds.fail_watches(Kind::IpamHandle, "ignored while refused");
        let mut late = ds.watch_now(Kind::IpamHandle);
        assert_eq!(script(&ready(&mut w)), ["R403"]);
        assert_eq!(script(&ready(&mut late)), ["R403"], "a new watch is refused too");
        ds.resume_watches(Kind::IpamHandle);
        assert_eq!(script(&ready(&mut w)), ["I", "I+a@1", "I+b@2", "D"]);
        assert_eq!(script(&ready(&mut late)), ["I", "I+a@1", "I+b@2", "D"]);
    }

    #[test]
    fn a_failed_watch_reports_one_transient_error_and_goes_on() {
        let ds = MemoryDatastore::new();
        let mut w = ds.watch_now(Kind::IpamHandle);
        ready(&mut w);
        ds.fail_watches(Kind::IpamHandle, "connection reset");
        ds.create_now(Kind::IpamHandle, "a", handle("a")).unwrap();
        let events = ready(&mut w);
        assert_eq!(script(&events), ["E connection reset", "A a@1"]);
        assert_eq!(events[0], WatchEvent::Error(crate::datastore::WatchFailure::transient("connection reset")));
    }

    #[test]
    fn a_status_update_replaces_only_the_status_under_the_revision_check() {
        let ds = MemoryDatastore::new();
        let kcc = ds.create_now(Kind::KubeControllersConfiguration, "default", json!({"spec": {"a": 1}})).unwrap();
        let mut edit = kcc.clone();
        edit.value["spec"]["a"] = json!(2);
        edit.value["status"] = json!({"runningConfig": {}});
        let written = ds.update_status_now(Kind::KubeControllersConfiguration, &edit).unwrap();
        assert_eq!((written.value["spec"]["a"].clone(), written.value["status"].clone()), (json!(1), json!({"runningConfig": {}})));
        assert!(ds.update_status_now(Kind::KubeControllersConfiguration, &edit).unwrap_err().is_conflict(), "stale revision");
        assert_eq!(ds.op_count(Op::UpdateStatus, Kind::KubeControllersConfiguration), 2);
    }

    #[test]
    fn memory_backend_passes_the_watch_conformance_suite() {
        let ds = std::sync::Arc::new(MemoryDatastore::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = ds.clone();
        // On its own thread: a missing event would leave block_on polling forever.
        std::thread::spawn(move || {
            let opts = super::super::conformance::Options { prefix: "conf-".into(), ..Default::default() };
            let _ = tx.send(block_on(super::super::conformance::run_watch(&*runner, &opts)));
        });
        let result = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the watch suite finished");
        result.unwrap();
    }

    #[test]
    fn memory_backend_passes_the_conformance_suite() {
        let ds = MemoryDatastore::new();
        let opts = super::super::conformance::Options { prefix: "conf-".into(), ..Default::default() };
        block_on(super::super::conformance::run_all(&ds, &opts)).unwrap();
        // The names the etcd run uses (Calico's own) are ordinary names here.
        let opts = super::super::conformance::Options { prefix: "conf2-".into(), calico_names: true, ipam_metadata: false, ..Default::default() };
        block_on(super::super::conformance::run_all(&ds, &opts)).unwrap();
    }
}
