//! The Kubernetes (KDD) backend: Calico's `crd.projectcalico.org/v1` objects through
//! `kube::Api<DynamicObject>`, one API per [`Kind`] (a namespaced kind's objects are named
//! `<namespace>/<name>` above the seam, as on every backend).
//!
//! Owns: the mapping of the CAS trait onto Kubernetes (resourceVersion and uid in the body of a
//! replace, delete preconditions, `kube::runtime::watcher` onto the watch seam, restarted from a
//! fresh list after a failure so that recovery is visible as `InitDone`), the
//! classification of API and watch failures into [`ErrorKind`] and [`WatchFailure`], the
//! `dry_run` switch that turns every write into a successful no-op, and the API call counters
//! (verb, resource, code) the metrics endpoint reads.
//! Also owns the client-side request limit (`K8S_CLIENT_QPS`/`K8S_CLIENT_BURST`) every request
//! of the writer waits on ([`RequestLimiter`], shared with [`super::kube_cluster`]); watches
//! never wait on it.
//! Must not: decide what to write, retry (the plan executor does), or cache objects.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ::kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams, Preconditions};
use ::kube::Client;
use ::kube::runtime::watcher;
use futures::StreamExt;
use serde_json::Value;

use super::rate::TokenBucket;
use super::watch::{WatchEvent, WatchFailure, WatchStream};
use super::{Datastore, DatastoreError, DsResult, ErrorKind, Expect, Kind, Precondition, Stored, check_expected, deleted_mark, list_page};
use crate::model::{CALICO_GROUP, CALICO_API_VERSION};

/// The HTTP code label of a call that failed before an HTTP answer (connection, timeout, decode).
pub const CODE_TRANSPORT: u16 = 0;

/// API calls by (verb, resource, HTTP code), shared between the datastore, the watchers' reads
/// and the metrics endpoint. Labels are bounded: verbs and resources are static strings.
#[derive(Debug, Default)]
pub struct ApiCounters {
    calls: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
}

impl ApiCounters {
    pub fn record(&self, verb: &'static str, resource: &'static str, code: u16) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        *calls.entry((verb, resource, code)).or_default() += 1;
    }

    /// Records the outcome of one call: its success code or the code of its failure.
    pub fn observe<T>(&self, verb: &'static str, resource: &'static str, ok_code: u16, result: &Result<T, ::kube::Error>) {
        let code = match result {
            Ok(_) => ok_code,
            Err(e) => status_code(e),
        };
        self.record(verb, resource, code);
    }

    pub fn snapshot(&self) -> Vec<((&'static str, &'static str, u16), u64)> {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// The HTTP status of an API error, [`CODE_TRANSPORT`] when there was none.
pub fn status_code(e: &::kube::Error) -> u16 {
    match e {
        ::kube::Error::Api(status) => status.code,
        _ => CODE_TRANSPORT,
    }
}

/// Classifies a Kubernetes client error where it enters (STYLE: errors). `create` turns a 409
/// into `AlreadyExists` itself, since only it knows that a 409 means the name is taken.
pub fn classify(e: &::kube::Error) -> ErrorKind {
    match e {
        ::kube::Error::Api(status) => match status.code {
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            400 | 422 => ErrorKind::Invalid,
            // 410 Gone (expired continue token), 429 throttling, 5xx: the server may answer later.
            _ => ErrorKind::Transient,
        },
        ::kube::Error::SerdeError(_) | ::kube::Error::BuildRequest(_) => ErrorKind::Invalid,
        _ => ErrorKind::Transient,
    }
}

fn to_error(kind: Kind, name: &str, verb: &str, e: &::kube::Error) -> DatastoreError {
    to_error_on(kind.plural(), name, verb, e)
}

/// A classified error naming the call: `verb resource name: message (code)`.
pub(crate) fn to_error_on(resource: &str, name: &str, verb: &str, e: &::kube::Error) -> DatastoreError {
    let message = match e {
        ::kube::Error::Api(status) => format!("{verb} {resource} {name}: {} ({})", status.message, status.code),
        other => format!("{verb} {resource} {name}: {other}"),
    };
    DatastoreError::new(classify(e), message)
}

/// The HTTP status inside a watcher error, if the apiserver answered.
pub fn watch_error_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(k) | watcher::Error::WatchStartFailed(k) | watcher::Error::WatchFailed(k) => match k {
            ::kube::Error::Api(status) => Some(status.code),
            _ => None,
        },
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => None,
    }
}

/// Classifies a watcher error where it enters the seam: refused only for the answers that
/// retrying will not fix (401, 403: no permission; 404: no such resource); a 410 Gone, a 5xx or
/// a lost connection is routine and the watcher's backoff absorbs it.
pub fn watch_failure(e: &watcher::Error) -> WatchFailure {
    match watch_error_code(e) {
        Some(code @ (401 | 403 | 404)) => WatchFailure::refused(code, e.to_string()),
        _ => WatchFailure::transient(e.to_string()),
    }
}

/// A failed watch is started afresh after this delay, doubled for each failure that follows
/// within [`RESTART_RESET_AFTER`] of a restart, up to [`RESTART_MAX`]: kube's own default
/// backoff (800 ms to 30 s, reset after 120 s without a failure), so an apiserver that lists but
/// refuses watches is listed at most every 30 s.
const RESTART_FIRST: std::time::Duration = std::time::Duration::from_millis(800);
const RESTART_MAX: std::time::Duration = std::time::Duration::from_secs(30);
const RESTART_RESET_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// How long a failed watch waits before its fresh list. A 410 Gone (the resource version
/// expired: compaction, or a watch cache that began just after the list) is routine and the
/// apiserver answered, so the first one relists at once; one that follows another 410 with no
/// change in between waits as any failure does, so a relist loop cannot spin.
fn restart_delay(previous: std::time::Duration, ran_for: std::time::Duration, first_expiry: bool) -> std::time::Duration {
    if first_expiry {
        std::time::Duration::ZERO
    } else if ran_for >= RESTART_RESET_AFTER {
        RESTART_FIRST
    } else {
        (previous * 2).clamp(RESTART_FIRST, RESTART_MAX)
    }
}

type KubeWatcher<K> = futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// One kind's list + watch, restarted from a fresh list after every failure.
struct RestartingWatch<K, F> {
    api: Api<K>,
    stored: F,
    current: Option<KubeWatcher<K>>,
    started: tokio::time::Instant,
    delay: std::time::Duration,
    /// The last failure was a 410 Gone and no change has arrived since.
    expired: bool,
}

/// `kube::runtime::watcher` (paged initial list, `page` objects a page, then a watch) on `api`,
/// its events mapped onto the seam by `stored`. After a failure the watcher is not left to
/// resume on its own: kube's watcher re-establishes a failed watch without any event, so the
/// consumer could not tell when the kind is whole again. It is started afresh instead, and its relist ends in `InitDone`,
/// which says so. That costs a list per failure; failures are rare (a quiet watch that times
/// out is resumed by the watcher without one), and upstream's reflector relists on most too.
pub(crate) fn watch_stream<K, F>(api: Api<K>, page: u32, stored: F) -> WatchStream
where
    K: ::kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(K) -> DsResult<Stored> + Send + 'static,
{
    let state = RestartingWatch { api, stored, current: None, started: tokio::time::Instant::now(), delay: std::time::Duration::ZERO, expired: false };
    let events = futures::stream::unfold(state, move |mut s| async move {
        loop {
            if s.current.is_none() {
                if !s.delay.is_zero() {
                    tokio::time::sleep(s.delay).await;
                }
                s.current = Some(watcher(s.api.clone(), watcher::Config::default().page_size(page)).boxed());
                s.started = tokio::time::Instant::now();
            }
            let next = s.current.as_mut().expect("started above").next().await;
            let lift = |object, make: fn(Stored) -> WatchEvent| match (s.stored)(object) {
                Ok(stored) => make(stored),
                Err(e) => WatchEvent::Error(WatchFailure::transient(e.message)),
            };
            let event = match next {
                Some(Ok(watcher::Event::Init)) => WatchEvent::Init,
                Some(Ok(watcher::Event::InitApply(o))) => lift(o, WatchEvent::InitApply),
                Some(Ok(watcher::Event::InitDone)) => WatchEvent::InitDone,
                Some(Ok(watcher::Event::Apply(o))) => {
                    s.expired = false;
                    lift(o, WatchEvent::Apply)
                }
                Some(Ok(watcher::Event::Delete(o))) => {
                    s.expired = false;
                    lift(o, WatchEvent::Delete)
                }
                Some(Err(e)) => {
                    s.current = None;
                    let gone = watch_error_code(&e) == Some(410);
                    s.delay = restart_delay(s.delay, s.started.elapsed(), gone && !s.expired);
                    s.expired = gone;
                    WatchEvent::Error(watch_failure(&e))
                }
                // The watcher never ends; if it did, a fresh one takes over at once.
                None => {
                    s.current = None;
                    continue;
                }
            };
            return Some((event, s));
        }
    });
    read_ahead(events, READ_AHEAD_PAGES * page as usize)
}

/// List pages a watch may run ahead of its consumer. A Kubernetes watcher fetches its next page
/// only when the consumer asks for the next object, so fetching and the consumer's decoding
/// took turns; scale runs showed a 30,000-pod initial list taking twice the time of the raw
/// paged LIST. Events buffered here are the mapped `Stored` objects of at most this many pages.
const READ_AHEAD_PAGES: usize = 2;

/// Drives `events` on a task of its own and hands them over through a channel of `depth`
/// events, in order: the watch fetches (and maps) the next page while the consumer is still
/// applying the last one. The task ends when the consumer drops the stream, even on a quiet
/// watch.
fn read_ahead(events: impl futures::Stream<Item = WatchEvent> + Send + 'static, depth: usize) -> WatchStream {
    let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                _ = tx.closed() => return,
                event = events.next() => event,
            };
            let Some(event) = event else { return };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }))
}

/// A paged LIST (`page` objects a page), every page waiting on `limiter` and counted as
/// ("list", `resource`, code); each object goes to `each` as its page arrives, so no more than a
/// page is held here. Returns how many objects were listed.
pub(crate) async fn list_pages(
    api: &Api<DynamicObject>,
    limiter: &RequestLimiter,
    counters: &ApiCounters,
    resource: &'static str,
    page: u32,
    mut each: impl FnMut(DynamicObject) -> DsResult<()>,
) -> DsResult<u64> {
    let mut params = ListParams::default().limit(page);
    let mut listed = 0u64;
    loop {
        limiter.wait().await;
        let result = api.list(&params).await;
        counters.observe("list", resource, 200, &result);
        let page = result.map_err(|e| to_error_on(resource, "", "list", &e))?;
        let next = page.metadata.continue_.clone().filter(|t| !t.is_empty());
        for object in page.items {
            each(object)?;
            listed += 1;
        }
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(listed),
        }
    }
}

/// The metric label of a kind's status subresource.
fn status_resource(kind: Kind) -> &'static str {
    match kind {
        Kind::IpamBlock => "ipamblocks/status",
        Kind::BlockAffinity => "blockaffinities/status",
        Kind::IpamHandle => "ipamhandles/status",
        Kind::IpamConfig => "ipamconfigs/status",
        Kind::ClusterInformation => "clusterinformations/status",
        Kind::KubeControllersConfiguration => "kubecontrollersconfigurations/status",
        Kind::IpPool => "ippools/status",
        Kind::IpReservation => "ipreservations/status",
        Kind::Tier => "tiers/status",
        Kind::CalicoNode => "nodes/status",
        Kind::WorkloadEndpoint => "workloadendpoints/status",
        Kind::BgpPeer => "bgppeers/status",
        Kind::FelixConfiguration => "felixconfigurations/status",
        Kind::BgpConfiguration => "bgpconfigurations/status",
        Kind::HostEndpoint => "hostendpoints/status",
        Kind::Profile => "profiles/status",
        Kind::NetworkPolicy => "networkpolicies/status",
        Kind::GlobalNetworkPolicy => "globalnetworkpolicies/status",
        Kind::StagedNetworkPolicy => "stagednetworkpolicies/status",
        Kind::StagedGlobalNetworkPolicy => "stagedglobalnetworkpolicies/status",
    }
}

/// The `ApiResource` of a Calico v1 kind (all cluster-scoped).
pub fn api_resource(kind: Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(CALICO_GROUP, "v1", kind.kind_name()), kind.plural())
}

/// The client-side request limit, shared by every clone: the datastore and the cluster reader
/// of one process draw from one bucket.
#[derive(Clone, Default)]
pub struct RequestLimiter {
    /// The bucket with its time origin; `None` = unlimited.
    bucket: Option<Arc<Mutex<(std::time::Instant, TokenBucket)>>>,
}

impl RequestLimiter {
    /// `None` leaves requests unlimited.
    pub fn new(bucket: Option<TokenBucket>) -> Self {
        RequestLimiter { bucket: bucket.map(|b| Arc::new(Mutex::new((std::time::Instant::now(), b)))) }
    }

    pub fn is_limited(&self) -> bool {
        self.bucket.is_some()
    }

    /// Waits for a request token. The lock is released before the sleep.
    pub async fn wait(&self) {
        let Some(bucket) = &self.bucket else { return };
        let wait = {
            let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = b.0.elapsed();
            b.1.reserve(now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Calico's CRDs over the Kubernetes API.
#[derive(Clone)]
pub struct KubeDatastore {
    client: Client,
    dry_run: bool,
    counters: Arc<ApiCounters>,
    limiter: RequestLimiter,
}

impl KubeDatastore {
    pub fn new(client: Client, dry_run: bool, counters: Arc<ApiCounters>) -> Self {
        KubeDatastore { client, dry_run, counters, limiter: RequestLimiter::default() }
    }

    /// Limits every request this datastore (and [`KubeDatastore::throttle`]'s other callers)
    /// issues; `None` leaves them unlimited.
    pub fn with_rate_limit(mut self, bucket: Option<TokenBucket>) -> Self {
        self.limiter = RequestLimiter::new(bucket);
        self
    }

    /// Waits for a request token.
    pub async fn throttle(&self) {
        self.limiter.wait().await;
    }

    /// The request limit this datastore waits on, to share with a [`super::kube_cluster::KubeCluster`].
    pub fn limiter(&self) -> &RequestLimiter {
        &self.limiter
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn counters(&self) -> &Arc<ApiCounters> {
        &self.counters
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Every object of the kind, in all namespaces (lists and watches).
    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &api_resource(kind))
    }

    /// The API that holds `name`, and the object's own name there.
    fn api_for<'n>(&self, kind: Kind, name: &'n str) -> DsResult<(Api<DynamicObject>, &'n str)> {
        match split_name(kind, name)? {
            (Some(ns), own) => Ok((Api::namespaced_with(self.client.clone(), ns, &api_resource(kind)), own)),
            (None, own) => Ok((self.api(kind), own)),
        }
    }

    async fn get_raw(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        let (api, own) = self.api_for(kind, name)?;
        self.throttle().await;
        let result = api.get(own).await;
        self.counters.observe("get", kind.plural(), 200, &result);
        let object = result.map_err(|e| to_error(kind, name, "get", &e))?;
        to_stored(kind, object)
    }
}

/// A namespaced kind's `<namespace>/<name>` split into its parts; other kinds' names are whole.
fn split_name(kind: Kind, name: &str) -> DsResult<(Option<&str>, &str)> {
    if !kind.namespaced() {
        return Ok((None, name));
    }
    match name.split_once('/') {
        Some((ns, own)) if !ns.is_empty() && !own.is_empty() && !own.contains('/') => Ok((Some(ns), own)),
        _ => Err(DatastoreError::invalid(format!("{} {name:?} is not <namespace>/<name>", kind.plural()))),
    }
}

/// The whole object as the trait carries it, identity lifted out of `metadata` (a namespaced
/// object's name is `<namespace>/<name>`).
fn to_stored(kind: Kind, object: DynamicObject) -> DsResult<Stored> {
    let namespace = object.metadata.namespace.clone().filter(|n| !n.is_empty() && kind.namespaced());
    let mut stored = dynamic_to_stored(object, CALICO_API_VERSION, kind.kind_name(), kind.plural())?;
    if let Some(ns) = namespace {
        stored.name = format!("{ns}/{}", stored.name);
    }
    Ok(stored)
}

/// The whole object with `apiVersion` and `kind` set (list and watch items lack them) and its
/// identity lifted out of `metadata`; `resource` names it in an error. The body is moved, not
/// copied (a pod's spec and status are most of it), and `managedFields` is left out: nothing
/// here reads it and every write clears it (for a pod it is often the largest part of the
/// metadata).
pub(crate) fn dynamic_to_stored(object: DynamicObject, api_version: &str, kind: &str, resource: &str) -> DsResult<Stored> {
    let DynamicObject { types: _, mut metadata, data } = object;
    metadata.managed_fields = None;
    let name = metadata.name.clone().unwrap_or_default();
    let revision = metadata.resource_version.clone().unwrap_or_default();
    let uid = metadata.uid.clone().unwrap_or_default();
    let mut body = match data {
        Value::Object(map) => map,
        Value::Null => serde_json::Map::new(),
        other => return Err(DatastoreError::invalid(format!("{resource} {name} is not an object: {other}"))),
    };
    let metadata = serde_json::to_value(&metadata).map_err(|e| DatastoreError::invalid(format!("{resource} {name} does not encode: {e}")))?;
    body.insert("metadata".into(), metadata);
    body.insert("apiVersion".into(), Value::String(api_version.into()));
    body.insert("kind".into(), Value::String(kind.into()));
    Ok(Stored { name, revision, uid, value: Value::Object(body) })
}

/// A body to send: the trait's JSON with name, and the CAS token set or cleared.
fn to_object(kind: Kind, name: &str, value: &Value, revision: Option<&str>, uid: Option<&str>) -> DsResult<DynamicObject> {
    let mut object: DynamicObject = serde_json::from_value(value.clone())
        .map_err(|e| DatastoreError::invalid(format!("{} {name} is not an object: {e}", kind.plural())))?;
    object.types = Some(::kube::api::TypeMeta { api_version: CALICO_API_VERSION.into(), kind: kind.kind_name().into() });
    let (namespace, own) = split_name(kind, name)?;
    object.metadata.name = Some(own.to_string());
    object.metadata.namespace = namespace.map(str::to_string);
    object.metadata.resource_version = revision.filter(|r| !r.is_empty()).map(str::to_string);
    object.metadata.uid = uid.filter(|u| !u.is_empty()).map(str::to_string);
    // Server-owned fields the apiserver would reject or ignore on a write.
    object.metadata.managed_fields = None;
    object.metadata.creation_timestamp = None;
    object.metadata.generation = None;
    Ok(object)
}

impl Datastore for KubeDatastore {
    async fn get(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        let stored = self.get_raw(kind, name).await?;
        if kind == Kind::IpamBlock && stored.is_soft_deleted() {
            // KDD finishes a soft delete whose writer died between the mark and the delete
            // (SPEC §4.5); losing that race to another reader is fine.
            match self.delete(kind, name, &stored.exact()).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() || e.is_conflict() => {}
                Err(e) => return Err(e),
            }
            return Err(DatastoreError::not_found(format!("ipamblocks {name} is marked deleted")));
        }
        Ok(stored)
    }

    async fn list(&self, kind: Kind) -> DsResult<Vec<Stored>> {
        let mut out = Vec::new();
        list_pages(&self.api(kind), &self.limiter, &self.counters, kind.plural(), list_page(kind), |object| {
            out.push(to_stored(kind, object)?);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    async fn create(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        let object = to_object(kind, name, &value, None, None)?;
        if self.dry_run {
            return to_stored(kind, object);
        }
        let (api, _) = self.api_for(kind, name)?;
        self.throttle().await;
        let result = api.create(&PostParams::default(), &object).await;
        self.counters.observe("create", kind.plural(), 201, &result);
        match result {
            Ok(created) => to_stored(kind, created),
            Err(e) if status_code(&e) == 409 => {
                Err(DatastoreError::new(ErrorKind::AlreadyExists, format!("{} {name} already exists", kind.plural())))
            }
            Err(e) => Err(to_error(kind, name, "create", &e)),
        }
    }

    async fn update(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        // The apiserver takes a uid in the body as a precondition of the replace (409 if it
        // differs) and refuses a replace without resourceVersion for CRDs, which is our CAS.
        let body = to_object(kind, &object.name, &object.value, Some(&object.revision), Some(&object.uid))?;
        if self.dry_run {
            return Ok(object.clone());
        }
        let (api, own) = self.api_for(kind, &object.name)?;
        self.throttle().await;
        let result = api.replace(own, &PostParams::default(), &body).await;
        self.counters.observe("update", kind.plural(), 200, &result);
        let updated = result.map_err(|e| to_error(kind, &object.name, "update", &e))?;
        to_stored(kind, updated)
    }

    async fn update_status(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        let body = to_object(kind, &object.name, &object.value, Some(&object.revision), Some(&object.uid))?;
        if self.dry_run {
            return Ok(object.clone());
        }
        let (api, own) = self.api_for(kind, &object.name)?;
        self.throttle().await;
        let result = api.replace_status(own, &PostParams::default(), &body).await;
        self.counters.observe("update", status_resource(kind), 200, &result);
        let updated = result.map_err(|e| to_error_on(status_resource(kind), &object.name, "update", &e))?;
        to_stored(kind, updated)
    }

    fn watch(&self, kind: Kind) -> WatchStream {
        // Soft-deleted objects pass through: the consumer filters them, as it does a list's.
        watch_stream(self.api(kind), list_page(kind), move |object| to_stored(kind, object))
    }

    async fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        if self.dry_run {
            return Ok(());
        }
        let preconditions = (precondition.revision.is_some() || precondition.uid.is_some())
            .then(|| Preconditions { resource_version: precondition.revision.clone(), uid: precondition.uid.clone() });
        let params = DeleteParams { preconditions, ..DeleteParams::default() };
        let (api, own) = self.api_for(kind, name)?;
        self.throttle().await;
        let result = api.delete(own, &params).await;
        self.counters.observe("delete", kind.plural(), 200, &result);
        result.map(|_| ()).map_err(|e| to_error(kind, name, "delete", &e))
    }

    /// One JSON patch whose `test`s are the checks and whose last operation sets the mark, so
    /// the apiserver checks and marks atomically; then the delete of exactly the marked version.
    /// Two requests, none of them a read.
    async fn soft_delete_if(&self, kind: Kind, name: &str, precondition: &Precondition, expect: &[Expect]) -> DsResult<()> {
        // kube-apiserver 1.37's JSON patch `test` dereferences nil comparing an array that holds
        // a null (json-patch v4 `lazyNode.equal`): the request panics in the apiserver and the
        // connection drops. Such checks are made here, on a read, instead.
        let null_in_array = expect.iter().any(|e| holds_null_in_array(&e.value));
        if self.dry_run || !kind.soft_deletes() || null_in_array {
            // Nothing to mark (or nothing to write): read, check, and delete what was read.
            let stored = self.get(kind, name).await?;
            check_expected(kind, &stored, precondition, expect)?;
            return self.soft_delete(kind, &stored).await;
        }
        let patch = check_and_mark(kind, precondition, expect)?;
        let (api, own) = self.api_for(kind, name)?;
        self.throttle().await;
        let result = api.patch(own, &PatchParams::default(), &Patch::<()>::Json(patch)).await;
        self.counters.observe("patch", kind.plural(), 200, &result);
        let marked = match result {
            Ok(object) => to_stored(kind, object)?,
            // A failed `test` is answered 422: the object is not what the caller expected.
            Err(e) if status_code(&e) == 422 => {
                let why = if let ::kube::Error::Api(status) = &e { status.message.clone() } else { String::new() };
                return Err(DatastoreError::conflict(format!("{} {name} is not as expected: {why}", kind.plural())));
            }
            Err(e) => return Err(to_error(kind, name, "patch", &e)),
        };
        self.delete(kind, &marked.name, &marked.exact()).await
    }
}

/// Whether an array anywhere in `v` holds a `null`.
fn holds_null_in_array(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.iter().any(|i| i.is_null() || holds_null_in_array(i)),
        Value::Object(map) => map.values().any(holds_null_in_array),
        _ => false,
    }
}

/// The JSON patch (RFC 6902) that tests `precondition` and `expect` and then marks the object
/// deleted.
fn check_and_mark(kind: Kind, precondition: &Precondition, expect: &[Expect]) -> DsResult<json_patch::Patch> {
    let test = |path: &str, value: Value| serde_json::json!({"op": "test", "path": path, "value": value});
    let mut ops = Vec::with_capacity(expect.len() + 3);
    if let Some(uid) = &precondition.uid {
        ops.push(test("/metadata/uid", Value::String(uid.clone())));
    }
    if let Some(revision) = &precondition.revision {
        ops.push(test("/metadata/resourceVersion", Value::String(revision.clone())));
    }
    ops.extend(expect.iter().map(|e| test(&e.pointer, e.value.clone())));
    ops.push(serde_json::json!({"op": "add", "path": "/spec/deleted", "value": deleted_mark(kind)}));
    serde_json::from_value(Value::Array(ops)).map_err(|e| DatastoreError::invalid(format!("a JSON patch that does not encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> ::kube::Error {
        ::kube::Error::Api(Box::new(::kube::core::Status { code, ..Default::default() }))
    }

    #[test]
    fn api_failures_are_classified_by_status_code() {
        assert_eq!(classify(&api_error(404)), ErrorKind::NotFound);
        assert_eq!(classify(&api_error(409)), ErrorKind::Conflict);
        assert_eq!(classify(&api_error(422)), ErrorKind::Invalid);
        assert_eq!(classify(&api_error(400)), ErrorKind::Invalid);
        for code in [429, 500, 503, 504, 410] {
            assert_eq!(classify(&api_error(code)), ErrorKind::Transient, "{code}");
        }
    }

    #[test]
    fn an_expired_watch_relists_at_once_but_a_run_of_expiries_backs_off() {
        use std::time::Duration;
        let short = Duration::from_millis(50);
        assert_eq!(restart_delay(Duration::from_secs(4), short, true), Duration::ZERO, "the first 410 relists at once");
        assert_eq!(restart_delay(Duration::ZERO, short, false), RESTART_FIRST, "a 410 after a 410 waits");
        assert_eq!(restart_delay(Duration::from_secs(4), short, false), Duration::from_secs(8));
        assert_eq!(restart_delay(Duration::from_secs(20), short, false), RESTART_MAX);
        assert_eq!(restart_delay(Duration::from_secs(20), RESTART_RESET_AFTER, false), RESTART_FIRST, "a long good run resets");
    }

    #[test]
    fn a_body_to_write_carries_exactly_the_cas_token_given() {
        let value = serde_json::json!({
            "apiVersion": CALICO_API_VERSION, "kind": "IPAMHandle",
            "metadata": {"name": "h", "resourceVersion": "9", "uid": "u-old", "managedFields": []},
            "spec": {"handleID": "h", "block": {}}
        });
        let o = to_object(Kind::IpamHandle, "h", &value, Some("12"), Some("")).unwrap();
        assert_eq!(o.metadata.resource_version.as_deref(), Some("12"));
        assert_eq!(o.metadata.uid, None);
        assert_eq!(o.metadata.managed_fields, None);
        assert_eq!(o.data["spec"]["handleID"], "h");
        let back = to_stored(Kind::IpamHandle, o).unwrap();
        assert_eq!((back.revision.as_str(), back.value["kind"].as_str()), ("12", Some("IPAMHandle")));
    }

    #[test]
    fn a_read_object_keeps_its_body_and_metadata_but_not_its_managed_fields() {
        let pod: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7", "labels": {"app": "a"},
                "annotations": {"cni.projectcalico.org/podIPs": "10.0.0.1/32"},
                "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {"f:podIP": {}}}}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}]}
        }))
        .unwrap();
        let s = dynamic_to_stored(pod, "v1", "Pod", "pods").unwrap();
        assert_eq!((s.name.as_str(), s.revision.as_str(), s.uid.as_str()), ("p", "7", "u"));
        assert_eq!(s.value["apiVersion"], "v1");
        assert_eq!(s.value["kind"], "Pod");
        assert_eq!(s.value["metadata"]["labels"]["app"], "a");
        assert_eq!(s.value["metadata"]["annotations"]["cni.projectcalico.org/podIPs"], "10.0.0.1/32");
        assert_eq!(s.value["metadata"]["namespace"], "ns");
        assert_eq!(s.value["spec"]["nodeName"], "n1");
        assert_eq!(s.value["status"]["podIPs"][0]["ip"], "10.0.0.1");
        assert!(s.value["metadata"].get("managedFields").is_none(), "{}", s.value);
    }

    #[test]
    fn a_namespaced_kind_travels_as_namespace_slash_name() {
        let value = serde_json::json!({"metadata": {"name": "web"}, "spec": {"selector": "all()"}});
        let o = to_object(Kind::NetworkPolicy, "ns1/web", &value, None, None).unwrap();
        assert_eq!((o.metadata.namespace.as_deref(), o.metadata.name.as_deref()), (Some("ns1"), Some("web")));
        assert_eq!(to_stored(Kind::NetworkPolicy, o).unwrap().name, "ns1/web");
        for bad in ["web", "ns1/", "/web", "a/b/c"] {
            assert!(to_object(Kind::StagedNetworkPolicy, bad, &value, None, None).is_err(), "{bad}");
        }
        let global = to_object(Kind::GlobalNetworkPolicy, "deny", &value, None, None).unwrap();
        assert_eq!(global.metadata.namespace, None);
        assert_eq!(to_stored(Kind::GlobalNetworkPolicy, global).unwrap().name, "deny");
    }

    #[tokio::test]
    async fn requests_wait_for_the_client_rate_limit_and_unlimited_ones_do_not() {
        let client = ::kube::Client::try_from(::kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let counters = Arc::new(ApiCounters::default());
        // 50 per second, burst 1: the second and third requests wait 20 ms each.
        let limited = KubeDatastore::new(client.clone(), true, counters.clone()).with_rate_limit(TokenBucket::new(50.0, 1).unwrap());
        let started = std::time::Instant::now();
        for _ in 0..3 {
            limited.throttle().await;
        }
        assert!(started.elapsed() >= std::time::Duration::from_millis(35), "{:?}", started.elapsed());
        let unlimited = KubeDatastore::new(client, true, counters).with_rate_limit(TokenBucket::new(0.0, 0).unwrap());
        assert!(!unlimited.limiter.is_limited());
    }

    #[test]
    fn only_watch_refusals_that_retrying_cannot_fix_are_refused() {
        let refused = watcher::Error::InitialListFailed(api_error(403));
        assert_eq!(watch_failure(&refused).refused, Some(403));
        assert_eq!(watch_failure(&watcher::Error::WatchStartFailed(api_error(404))).refused, Some(404));
        assert_eq!(watch_failure(&watcher::Error::InitialListFailed(api_error(401))).refused, Some(401));
        // A 410 Gone or a 500 during a watch is routine: the watcher relists or retries.
        assert_eq!(watch_failure(&watcher::Error::WatchFailed(api_error(500))).refused, None);
        let gone = watcher::Error::WatchError(Box::new(::kube::core::Status { code: 410, ..Default::default() }));
        assert_eq!(watch_error_code(&gone), Some(410));
        assert_eq!(watch_failure(&gone).refused, None);
        assert_eq!(watch_failure(&watcher::Error::NoResourceVersion).refused, None);
        assert!(watch_failure(&refused).message.contains("initial object list"), "{}", watch_failure(&refused).message);
    }

    #[test]
    fn counters_group_calls_by_verb_resource_and_code() {
        let c = ApiCounters::default();
        c.observe::<()>("get", "ipamblocks", 200, &Ok(()));
        c.observe::<()>("get", "ipamblocks", 200, &Ok(()));
        c.observe::<()>("update", "ipamblocks", 200, &Err(api_error(409)));
        assert_eq!(c.snapshot(), vec![(("get", "ipamblocks", 200), 2), (("update", "ipamblocks", 409), 1)]);
    }
}
