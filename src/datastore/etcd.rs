//! The etcd v3 backend: Calico's objects in Calico's own etcd, through etcd's v3 JSON gateway
//! (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/watch`, `/v3/auth/authenticate`; keys and values
//! base64) over HTTP/1.1, TLS by rustls. The key layout and value shapes are
//! [`super::etcd_layout`]'s.
//!
//! Owns: the connection settings (members tried in `ETCD_ENDPOINTS` order, the member that last
//! answered first; CA, client certificate and key files; user and password with the token they
//! buy, renewed when etcd says it expired), compare-and-swap as transactions (create: the key
//! does not exist; update and delete: its mod revision is still the one read), the
//! classification of etcd's answers into [`ErrorKind`] with the setting to check named in the
//! message, and list + watch onto the watch seam (list at a revision, watch from the next one,
//! resume after the last event seen, relist when etcd compacted past it).
//! Must not: decide what to write, retry a write (the plan executor does), or cache objects.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use super::etcd_layout::{self, candidate_keys, from_etcd_value, key_for_write, kind_range, parse_key, to_etcd_value};
use super::watch::{WatchEvent, WatchFailure, WatchStream};
use super::{CalicoNodeView, Datastore, DatastoreError, DsResult, ErrorKind, Kind, Precondition, Stored, list_page};
use crate::config::{EtcdConfig, Setting};

/// A member that does not accept a connection within this is skipped for the next one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A unary call (range, txn, authenticate) that has no answer within this is given up on that member.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
const WATCH_RETRY_FIRST: Duration = Duration::from_millis(500);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(10);

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Calico's etcd datastore. Cheap to clone: clones share connections and the auth token.
#[derive(Clone)]
pub struct EtcdDatastore {
    inner: Arc<Inner>,
    /// Every write succeeds without reaching etcd (`--dry-run`); reads and watches are real.
    dry_run: bool,
    counters: Option<Arc<super::kube::ApiCounters>>,
}

struct Inner {
    http: HttpClient,
    /// Base URLs in `ETCD_ENDPOINTS` order, or as DNS SRV discovery found them.
    endpoints: std::sync::RwLock<Arc<Vec<String>>>,
    endpoints_var: &'static str,
    /// `ETCD_DISCOVERY_SRV` and the DNS server to ask (else resolv.conf's).
    discovery: Option<(Setting, Option<std::net::SocketAddr>)>,
    /// No member answered: look the members up again before the next call.
    rediscover: std::sync::atomic::AtomicBool,
    /// The member that answered last; calls start there.
    current: AtomicUsize,
    credentials: Option<(Setting, Setting)>,
    token: Mutex<Option<String>>,
    /// What to check when a TLS handshake fails, naming the settings in use.
    tls_hint: String,
}

/// How one attempt on one member failed.
enum Attempt {
    /// No usable answer from this member (refused, timed out, TLS failed, 5xx): try the next.
    Unreachable(String),
    /// The member answered with an error: the same on every member.
    Refused { grpc: i64, message: String },
}

/// One key as etcd returned it.
#[derive(Debug, Clone)]
struct Kv {
    key: String,
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    /// How many times the key was written since its creation.
    version: i64,
}

fn num(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn parse_kv(v: &Value) -> DsResult<Kv> {
    let decode = |field: &str| -> DsResult<Vec<u8>> {
        match v.get(field).and_then(Value::as_str) {
            Some(s) => B64.decode(s).map_err(|e| DatastoreError::invalid(format!("etcd returned a {field} that is not base64: {e}"))),
            None => Ok(Vec::new()),
        }
    };
    let key = String::from_utf8(decode("key")?).map_err(|_| DatastoreError::invalid("etcd returned a key that is not UTF-8"))?;
    Ok(Kv { key, value: decode("value")?, create_revision: num(&v["create_revision"]), mod_revision: num(&v["mod_revision"]), version: num(&v["version"]) })
}

/// `source: source: …` of an error, the whole chain (hyper's top-level message alone says
/// only "client error (Connect)").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    parts.join(": ")
}

fn read_file(setting: &Setting) -> DsResult<Vec<u8>> {
    std::fs::read(&setting.value).map_err(|e| DatastoreError::invalid(format!("{}={}: cannot read the file: {e}", setting.var, setting.value)))
}

fn tls_config(cfg: &EtcdConfig) -> DsResult<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_cert_file {
        Some(ca) => {
            let pem = read_file(ca)?;
            let mut any = false;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| DatastoreError::invalid(format!("{}={}: not a PEM certificate file: {e}", ca.var, ca.value)))?;
                roots.add(cert).map_err(|e| DatastoreError::invalid(format!("{}={}: unusable CA certificate: {e}", ca.var, ca.value)))?;
                any = true;
            }
            if !any {
                return Err(DatastoreError::invalid(format!("{}={}: holds no PEM certificate", ca.var, ca.value)));
            }
        }
        None if cfg.tls() => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
        None => {}
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DatastoreError::invalid(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let pem = read_file(cert)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| DatastoreError::invalid(format!("{}={}: not a PEM certificate file: {e}", cert.var, cert.value)))?;
            if chain.is_empty() {
                return Err(DatastoreError::invalid(format!("{}={}: holds no PEM certificate", cert.var, cert.value)));
            }
            let key_pem = read_file(key)?;
            let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| DatastoreError::invalid(format!("{}={}: no usable PEM private key: {e}", key.var, key.value)))?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                DatastoreError::invalid(format!("{}={} and {}={}: the key does not fit the certificate: {e}", cert.var, cert.value, key.var, key.value))
            })
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// etcd's gRPC status codes, as the gateway reports them in `code`.
mod grpc {
    pub const INVALID_ARGUMENT: i64 = 3;
    pub const DEADLINE_EXCEEDED: i64 = 4;
    pub const NOT_FOUND: i64 = 5;
    pub const ALREADY_EXISTS: i64 = 6;
    pub const PERMISSION_DENIED: i64 = 7;
    pub const FAILED_PRECONDITION: i64 = 9;
    pub const ABORTED: i64 = 10;
    pub const UNAVAILABLE: i64 = 14;
    pub const UNAUTHENTICATED: i64 = 16;
}

/// What to fix when etcd's gateway could not reach etcd's own gRPC server: the gateway presents
/// the server certificate as a client certificate there (etcd issues 9785, 16590).
fn gateway_hint(message: &str) -> Option<&'static str> {
    let lower = message.to_ascii_lowercase();
    (lower.contains("error reading server preface") || lower.contains("authentication handshake failed") || lower.contains("incompatible key usage")).then_some(
        "etcd's JSON gateway could not reach its own gRPC server: with --client-cert-auth the etcd server certificate must also allow clientAuth (extendedKeyUsage serverAuth,clientAuth, as kubeadm issues it)",
    )
}

fn token_expired(grpc_code: i64, message: &str) -> bool {
    grpc_code == grpc::UNAUTHENTICATED || message.ends_with("(code 16)") || message.contains("invalid auth token") || message.contains("auth token is expired")
}

impl EtcdDatastore {
    /// Builds the client from validated settings: reads the CA, certificate and key files (errors
    /// name the setting), contacts nothing.
    pub fn new(cfg: &EtcdConfig) -> DsResult<Self> {
        let tls = tls_config(cfg)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        // A member that vanished without closing the connection (power loss, partition) would
        // otherwise leave a quiet watch waiting forever: TCP keepalive ends it, and the watch
        // resumes on another member.
        http.set_keepalive(Some(TCP_KEEPALIVE));
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        let files: Vec<String> = [&cfg.ca_cert_file, &cfg.cert_file, &cfg.key_file].into_iter().flatten().map(|s| format!("{}={}", s.var, s.value)).collect();
        let tls_hint = if files.is_empty() {
            "check that the system trust store holds the CA of the etcd server certificate, or set ETCD_CA_CERT_FILE".to_string()
        } else {
            format!("check {}", files.join(", "))
        };
        Ok(EtcdDatastore {
            inner: Arc::new(Inner {
                http: client,
                endpoints: std::sync::RwLock::new(Arc::new(cfg.endpoints.iter().map(|e| e.url()).collect())),
                endpoints_var: cfg.endpoints_setting.var,
                discovery: cfg.discovery.clone().map(|d| (d, cfg.dns_server)),
                rediscover: std::sync::atomic::AtomicBool::new(false),
                current: AtomicUsize::new(0),
                credentials: cfg.username.clone().zip(cfg.password.clone()),
                token: Mutex::new(None),
                tls_hint,
            }),
            dry_run: false,
            counters: None,
        })
    }

    /// The same datastore with writes turned into successful no-ops when `dry_run`.
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// [`EtcdDatastore::new`], then proves the settings work: authenticates if a user is set and
    /// reads one key under `/calico/`. The error names the setting to fix.
    pub async fn connect(cfg: &EtcdConfig) -> DsResult<Self> {
        let ds = Self::new(cfg)?;
        ds.probe().await?;
        Ok(ds)
    }

    /// One cheap read: succeeds when a member answers and accepts our credentials.
    pub async fn probe(&self) -> DsResult<()> {
        let body = json!({"key": b64("/calico/"), "range_end": b64(&etcd_layout::prefix_end("/calico/")), "limit": 1, "keys_only": true});
        self.inner.call("/v3/kv/range", &body).await.map(|_| ())
    }

    async fn range_one(&self, key: &str) -> DsResult<Option<Kv>> {
        let answer = self.inner.call("/v3/kv/range", &json!({"key": b64(key)})).await?;
        match answer.get("kvs").and_then(Value::as_array).and_then(|k| k.first()) {
            Some(kv) => parse_kv(kv).map(Some),
            None => Ok(None),
        }
    }

    /// The key holding `kind`/`name`, if any (affinity names may have several candidate keys).
    async fn locate(&self, kind: Kind, name: &str) -> DsResult<Option<Kv>> {
        for key in candidate_keys(kind, name)? {
            if let Some(kv) = self.range_one(&key).await?
                && parse_key(kind, &kv.key).is_some_and(|i| i.name == name)
            {
                return Ok(Some(kv));
            }
        }
        Ok(None)
    }

    fn stored(kind: Kind, kv: &Kv) -> DsResult<Stored> {
        from_etcd_value(kind, &kv.key, &kv.value, kv.mod_revision, kv.create_revision)
    }

    /// Every object of `kind` at one revision, and that revision.
    async fn list_at(&self, kind: Kind) -> DsResult<(Vec<Stored>, i64)> {
        let (mut from, _) = kind_range(kind);
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let page = self.list_page(kind, &from, revision).await?;
            revision = page.revision;
            out.extend(page.objects);
            match page.next {
                Some(key) => from = key,
                None => return Ok((out, revision)),
            }
        }
    }

    /// One range page of `kind`'s keys from `from` ([`list_page`] keys) at `revision`, 0 for the
    /// current one (the answer names it; later pages pin it, so the pages make one snapshot).
    async fn list_page(&self, kind: Kind, from: &str, revision: i64) -> DsResult<ListPage> {
        let (_, end) = kind_range(kind);
        let body = json!({"key": b64(from), "range_end": b64(&end), "limit": list_page(kind), "revision": revision});
        let answer = self.inner.call("/v3/kv/range", &body).await?;
        let revision = if revision == 0 { num(&answer["header"]["revision"]) } else { revision };
        let mut objects = Vec::new();
        let mut last = None;
        for raw in answer.get("kvs").and_then(Value::as_array).map_or(&[][..], Vec::as_slice) {
            let kv = parse_kv(raw)?;
            if parse_key(kind, &kv.key).is_some() {
                match Self::stored(kind, &kv) {
                    Ok(s) => objects.push(s),
                    Err(e) => tracing::warn!(key = %kv.key, error = %e, "skipping an etcd value that does not decode"),
                }
            }
            last = Some(kv.key);
        }
        let next = match (answer.get("more").and_then(Value::as_bool).unwrap_or(false), last) {
            (true, Some(key)) => Some(format!("{key}\0")),
            _ => None,
        };
        Ok(ListPage { objects, revision, next })
    }

    /// A transaction: `compare` all hold -> `success`, else `failure`. Returns whether it
    /// succeeded, the revision after it, and the responses of the branch taken.
    async fn txn(&self, compare: Value, success: Value, failure: Value) -> DsResult<(bool, i64, Vec<Value>)> {
        let answer = self.inner.call("/v3/kv/txn", &json!({"compare": compare, "success": success, "failure": failure})).await?;
        let ok = answer.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let responses = answer.get("responses").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok((ok, num(&answer["header"]["revision"]), responses))
    }

    /// The kv in the `index`th response of a txn branch, if its range found one.
    fn range_response(responses: &[Value], index: usize) -> DsResult<Option<Kv>> {
        match responses.get(index).and_then(|r| r["response_range"]["kvs"].as_array()).and_then(|k| k.first()) {
            Some(kv) => parse_kv(kv).map(Some),
            None => Ok(None),
        }
    }

    /// Writes `bytes` to `key` if its mod revision is still `revision`. `NotFound` if the key is
    /// gone, `Conflict` if it changed.
    async fn put_if(&self, kind: Kind, key: &str, bytes: &[u8], revision: i64) -> DsResult<Stored> {
        let compare = json!([{"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision.to_string()}]);
        let put = json!({"request_put": {"key": b64(key), "value": B64.encode(bytes)}});
        let read = json!({"request_range": {"key": b64(key)}});
        let (ok, _, responses) = self.txn(compare, json!([put, read]), json!([read])).await?;
        let name = parse_key(kind, key).map(|i| i.name).unwrap_or_default();
        match (ok, Self::range_response(&responses, if ok { 1 } else { 0 })?) {
            (true, Some(kv)) => Self::stored(kind, &kv),
            (true, None) => Err(DatastoreError::new(ErrorKind::Transient, format!("update {} {name}: etcd did not return what it wrote", kind.plural()))),
            (false, None) => Err(DatastoreError::not_found(format!("update {} {name}: not found", kind.plural()))),
            (false, Some(kv)) => Err(DatastoreError::conflict(format!("update {} {name}: revision {revision} is stale (now {})", kind.plural(), kv.mod_revision))),
        }
    }

    fn revision_of(kind: Kind, name: &str, revision: &str) -> DsResult<i64> {
        revision.parse::<i64>().map_err(|_| DatastoreError::conflict(format!("{} {name}: {revision:?} is not an etcd revision", kind.plural())))
    }
}

impl Inner {
    fn current_token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_token(&self, token: Option<String>) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }

    fn request(&self, base: &str, path: &str, body: &Value, token: Option<&str>) -> DsResult<hyper::Request<Full<Bytes>>> {
        let mut builder = hyper::Request::post(format!("{base}{path}")).header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            builder = builder.header(hyper::header::AUTHORIZATION, t);
        }
        builder.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| DatastoreError::invalid(format!("building an etcd request to {base}{path}: {e}")))
    }

    /// Names the setting behind a transport failure: TLS trouble points at the certificate settings.
    fn unreachable(&self, base: &str, e: &(dyn std::error::Error + 'static)) -> Attempt {
        let text = chain(e);
        let lower = text.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") || lower.contains("unknownissuer") {
            Attempt::Unreachable(format!("{base}: TLS failed: {text} ({})", self.tls_hint))
        } else {
            Attempt::Unreachable(format!("{base}: {text}"))
        }
    }

    async fn send(&self, base: &str, path: &str, body: &Value, token: Option<&str>) -> Result<hyper::Response<Incoming>, Attempt> {
        let request = self.request(base, path, body, token).map_err(|e| Attempt::Unreachable(e.message))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(request)).await {
            Err(_) => Err(Attempt::Unreachable(format!("{base}: no answer within {}s", REQUEST_TIMEOUT.as_secs()))),
            Ok(Err(e)) => Err(self.unreachable(base, &e)),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// One unary call on one member.
    async fn attempt(&self, base: &str, path: &str, body: &Value, token: Option<&str>) -> Result<Value, Attempt> {
        let response = self.send(base, path, body, token).await?;
        let status = response.status();
        let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return Err(self.unreachable(base, &e)),
            Err(_) => return Err(Attempt::Unreachable(format!("{base}: the answer did not arrive within {}s", REQUEST_TIMEOUT.as_secs()))),
        };
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return parsed.ok_or_else(|| Attempt::Unreachable(format!("{base}{path}: the answer is not JSON (is this an etcd v3 member?)")));
        }
        let message = parsed
            .as_ref()
            .and_then(|v| v.get("message").or_else(|| v.get("error")).and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned());
        let message = match gateway_hint(&message) {
            Some(hint) => format!("{message} ({hint})"),
            None => message,
        };
        let grpc_code = parsed.as_ref().map(|v| num(&v["code"])).unwrap_or(0);
        match grpc_code {
            grpc::UNAVAILABLE | grpc::DEADLINE_EXCEEDED => Err(Attempt::Unreachable(format!("{base}: {message}"))),
            0 if status.is_server_error() || status.as_u16() == 404 => Err(Attempt::Unreachable(format!("{base}{path}: HTTP {status}: {message}"))),
            code => Err(Attempt::Refused { grpc: code, message }),
        }
    }

    /// Exchanges the user and password for a token on some member.
    async fn authenticate(&self) -> DsResult<Option<String>> {
        let Some((user, password)) = &self.credentials else {
            return Ok(None);
        };
        let body = json!({"name": user.value, "password": password.value});
        let answer = self.failover("/v3/auth/authenticate", &body, None).await.map_err(|e| match e.kind {
            ErrorKind::Transient => e,
            _ => DatastoreError::invalid(format!("{}={} / {}: etcd refused the credentials: {}", user.var, user.value, password.var, e.message)),
        })?;
        let token = answer.get("token").and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_string);
        match token {
            Some(t) => {
                self.set_token(Some(t.clone()));
                Ok(Some(t))
            }
            None => Err(DatastoreError::invalid(format!("{}={}: etcd returned no token (is authentication enabled on etcd?)", user.var, user.value))),
        }
    }

    /// `attempt` on the member that answered last, then on the others in order, until one
    /// succeeds (it becomes the current member) or refuses (the same on every member). The
    /// error when none answered says `what` none of them did.
    async fn on_some_member<T, F, Fut>(&self, what: &str, mut attempt: F) -> DsResult<T>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let endpoints = self.members().await?;
        let n = endpoints.len().max(1);
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let index = (start + i) % n;
            let Some(base) = endpoints.get(index) else { break };
            match attempt(base.clone()).await {
                Ok(v) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(Attempt::Unreachable(m)) => failures.push(m),
                Err(Attempt::Refused { grpc, message }) => return Err(self.refused(grpc, message)),
            }
        }
        if self.discovery.is_some() {
            self.rediscover.store(true, Ordering::Relaxed);
        }
        Err(DatastoreError::new(ErrorKind::Transient, format!("no etcd member in {} {what}: {}", self.endpoints_var, failures.join("; "))))
    }

    /// The members to try: the configured list, or what DNS SRV discovery finds (looked up at
    /// the first call and again after a call no member answered; the last list found stays in
    /// use while a lookup fails).
    async fn members(&self) -> DsResult<Arc<Vec<String>>> {
        let known = self.endpoints.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let Some((setting, server)) = &self.discovery else { return Ok(known) };
        if !known.is_empty() && !self.rediscover.load(Ordering::Relaxed) {
            return Ok(known);
        }
        let servers = match server {
            Some(s) => vec![*s],
            None => super::dns_srv::nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
        };
        match super::dns_srv::discover(&setting.value, &servers).await {
            Ok(found) => {
                let found = Arc::new(found);
                if found != known {
                    tracing::info!(members = ?found, "{}={}: etcd members found by DNS SRV discovery", setting.var, setting.value);
                    self.current.store(0, Ordering::Relaxed);
                }
                *self.endpoints.write().unwrap_or_else(std::sync::PoisonError::into_inner) = found.clone();
                self.rediscover.store(false, Ordering::Relaxed);
                Ok(found)
            }
            Err(e) if !known.is_empty() => {
                tracing::warn!(error = %e, "{}={}: DNS SRV discovery failed; trying the members found before", setting.var, setting.value);
                Ok(known)
            }
            Err(e) => Err(DatastoreError::new(ErrorKind::Transient, format!("{}={}: DNS SRV discovery found no etcd member: {e}", setting.var, setting.value))),
        }
    }

    /// The call on the member that answered last, then on the others in order.
    async fn failover(&self, path: &str, body: &Value, token: Option<&str>) -> DsResult<Value> {
        self.on_some_member("answered", |base| async move { self.attempt(&base, path, body, token).await }).await
    }

    fn refused(&self, grpc_code: i64, message: String) -> DatastoreError {
        let needs_auth = message.contains("user name is empty") || message.contains("user name not found");
        match grpc_code {
            _ if needs_auth && self.credentials.is_none() => {
                DatastoreError::invalid(format!("etcd requires authentication ({message}): set ETCD_USERNAME and ETCD_PASSWORD"))
            }
            grpc::PERMISSION_DENIED => {
                let user = self.credentials.as_ref().map(|(u, _)| format!("{}={}", u.var, u.value)).unwrap_or_else(|| "the etcd client".into());
                DatastoreError::invalid(format!("{user}: permission denied by etcd: {message}"))
            }
            grpc::NOT_FOUND => DatastoreError::not_found(message),
            grpc::ALREADY_EXISTS => DatastoreError::new(ErrorKind::AlreadyExists, message),
            grpc::FAILED_PRECONDITION | grpc::ABORTED => DatastoreError::conflict(message),
            grpc::INVALID_ARGUMENT => DatastoreError::invalid(message),
            _ => DatastoreError::new(ErrorKind::Transient, format!("etcd: {message} (code {grpc_code})")),
        }
    }

    /// A unary call with the auth token, renewed once if etcd says it expired.
    async fn call(&self, path: &str, body: &Value) -> DsResult<Value> {
        let mut token = self.current_token();
        if token.is_none() {
            token = self.authenticate().await?;
        }
        match self.failover(path, body, token.as_deref()).await {
            Err(e) if self.credentials.is_some() && token_expired(0, &e.message) => {
                self.set_token(None);
                let fresh = self.authenticate().await?;
                self.failover(path, body, fresh.as_deref()).await
            }
            other => other,
        }
    }

    /// Opens a watch stream on the first member that takes it.
    async fn open_watch(&self, body: &Value) -> DsResult<Incoming> {
        let mut token = self.current_token();
        if token.is_none() {
            token = self.authenticate().await?;
        }
        let token = token.as_deref();
        self.on_some_member("accepted a watch", |base| async move {
            match self.send(&base, "/v3/watch", body, token).await {
                Ok(r) if r.status().is_success() => Ok(r.into_body()),
                Ok(r) => Err(Attempt::Unreachable(format!("{base}/v3/watch: HTTP {}", r.status()))),
                Err(a) => Err(a),
            }
        })
        .await
    }
}

/// The HTTP-like code a call's outcome is counted under, as the Kubernetes backend counts its
/// calls (`kube_controllers_api_requests_total`): 0 when no member answered.
fn outcome_code<T>(ok: u16, result: &DsResult<T>) -> u16 {
    match result {
        Ok(_) => ok,
        Err(e) => match e.kind {
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict | ErrorKind::AlreadyExists => 409,
            ErrorKind::Invalid => 400,
            ErrorKind::Transient => super::kube::CODE_TRANSPORT,
        },
    }
}

impl EtcdDatastore {
    /// Counts every call of this datastore in `counters` (verb, plural, code), as the Kubernetes
    /// backend does, so the API request metrics cover the etcd datastore too.
    pub fn with_counters(mut self, counters: Arc<super::kube::ApiCounters>) -> Self {
        self.counters = Some(counters);
        self
    }

    fn count<T>(&self, verb: &'static str, resource: &'static str, ok: u16, result: &DsResult<T>) {
        if let Some(c) = &self.counters {
            c.record(verb, resource, outcome_code(ok, result));
        }
    }
}

impl Datastore for EtcdDatastore {
    async fn calico_node(&self, name: &str) -> DsResult<CalicoNodeView> {
        if name.is_empty() || name.contains('/') {
            return Err(DatastoreError::invalid(format!("{name:?} is not a Calico Node name")));
        }
        let key = format!("{}nodes/{name}", etcd_layout::RESOURCE_PREFIX);
        let result = self.range_one(&key).await;
        self.count("get", "nodes", 200, &result);
        match result? {
            None => Ok(CalicoNodeView::Missing),
            Some(kv) => {
                let body: Value = serde_json::from_slice(&kv.value).map_err(|e| DatastoreError::invalid(format!("Calico Node {name}: {e}")))?;
                Ok(CalicoNodeView::of_node(&body))
            }
        }
    }

    async fn get(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        let result = self.get_inner(kind, name).await;
        self.count("get", kind.plural(), 200, &result);
        result
    }

    async fn list(&self, kind: Kind) -> DsResult<Vec<Stored>> {
        let result = self.list_at(kind).await.map(|(objects, _)| objects);
        self.count("list", kind.plural(), 200, &result);
        result
    }

    async fn create(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        let result = self.create_inner(kind, name, value).await;
        self.count("create", kind.plural(), 201, &result);
        result
    }

    async fn update(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        let result = self.update_inner(kind, object).await;
        self.count("update", kind.plural(), 200, &result);
        result
    }

    async fn update_status(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        let result = self.update_status_inner(kind, object).await;
        self.count("update", kind.plural(), 200, &result);
        result
    }

    async fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        let result = self.delete_inner(kind, name, precondition).await;
        self.count("delete", kind.plural(), 200, &result);
        result
    }

    /// etcd deletes are atomic: the KDD mark-then-delete is one guarded delete here.
    async fn soft_delete(&self, kind: Kind, object: &Stored) -> DsResult<()> {
        self.delete(kind, &object.name, &object.exact()).await
    }

    fn watch(&self, kind: Kind) -> WatchStream {
        self.watch_inner(kind)
    }

    fn keeps_calico_nodes(&self) -> bool {
        true
    }

    fn handle_object_name(&self, id: &str) -> String {
        crate::model::names::sanitize_handle(id).to_string()
    }

    fn affinity_object_name(&self, host: &str, cidr: &ipnet::IpNet) -> String {
        crate::model::names::plain_affinity_name(host, cidr)
    }
}

/// The key every periodic compactor of one etcd agrees through (kube-apiserver's and
/// upstream kube-controllers', outside any prefix): its version counts the rounds, its value is
/// the revision the round saw, compacted one round later.
pub const COMPACT_REV_KEY: &str = "compact_rev_key";

/// The compactor's memory between rounds: the version of [`COMPACT_REV_KEY`] it expects and
/// the revision it saw one period ago (0: none yet, nothing to compact).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactState {
    pub version: i64,
    pub revision: i64,
}

impl CompactState {
    /// After a round's transaction: `won` (the key still had our version, and we bumped it),
    /// `now` the revision etcd was at, `their_version` the key's version when another
    /// compactor moved it first. Returns the next state and the revision to compact now.
    pub fn after_round(self, won: bool, now: i64, their_version: i64) -> (CompactState, Option<i64>) {
        if !won {
            // Someone else compacted this period: follow their count, compact nothing.
            return (CompactState { version: their_version, revision: now }, None);
        }
        let compact = (self.revision > 0).then_some(self.revision);
        (CompactState { version: self.version + 1, revision: now }, compact)
    }
}

impl EtcdDatastore {
    /// One compaction round: claims the round on [`COMPACT_REV_KEY`] (a transaction on its
    /// version, so one compactor per period wins among replicas and kube-apiservers sharing the
    /// etcd), then compacts at the revision seen one round earlier. Returns the next state and
    /// the revision compacted, if any. Revisions already compacted by someone else are fine.
    pub async fn compact_round(&self, state: CompactState) -> DsResult<(CompactState, Option<i64>)> {
        if self.dry_run {
            return Ok((state, None));
        }
        let key = b64(COMPACT_REV_KEY);
        let compare = json!([{"key": key, "target": "VERSION", "result": "EQUAL", "version": state.version.to_string()}]);
        let put = json!({"request_put": {"key": key, "value": b64(&state.revision.to_string())}});
        let read = json!({"request_range": {"key": key}});
        let result = self.txn(compare, json!([put]), json!([read])).await;
        self.count("update", "compaction", 200, &result);
        let (won, now, responses) = result?;
        let their_version = Self::range_response(&responses, 0)?.map(|kv| kv.version).unwrap_or(0);
        let (next, compact) = state.after_round(won, now, their_version);
        if let Some(revision) = compact {
            let result = self.inner.call("/v3/kv/compaction", &json!({"revision": revision.to_string()})).await;
            self.count("delete", "compaction", 200, &result);
            match result {
                Ok(_) => {}
                Err(e) if e.message.contains("required revision has been compacted") => {}
                Err(e) => return Err(e),
            }
        }
        Ok((next, compact))
    }
}

impl EtcdDatastore {
    async fn get_inner(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        let Some(kv) = self.locate(kind, name).await? else {
            return Err(DatastoreError::not_found(format!("get {} {name}: not found", kind.plural())));
        };
        let stored = Self::stored(kind, &kv)?;
        if kind == Kind::IpamBlock && stored.is_soft_deleted() {
            // A KDD-style writer marked it and died before deleting: finish the job, as KDD reads do.
            let _ = self.delete(kind, name, &stored.exact()).await;
            return Err(DatastoreError::not_found(format!("get {} {name}: marked deleted", kind.plural())));
        }
        Ok(stored)
    }

    async fn create_inner(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        let key = key_for_write(kind, name, &value)?;
        let bytes = to_etcd_value(kind, name, &value)?;
        if self.dry_run {
            return from_etcd_value(kind, &key, &bytes, 1, 1);
        }
        let compare = json!([{"key": b64(&key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}]);
        let put = json!({"request_put": {"key": b64(&key), "value": B64.encode(&bytes)}});
        let (ok, revision, _) = self.txn(compare, json!([put]), json!([])).await?;
        if !ok {
            return Err(DatastoreError::new(ErrorKind::AlreadyExists, format!("create {} {name}: already exists", kind.plural())));
        }
        from_etcd_value(kind, &key, &bytes, revision, revision)
    }

    async fn update_inner(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        let key = key_for_write(kind, &object.name, &object.value)?;
        let revision = Self::revision_of(kind, &object.name, &object.revision)?;
        if !object.uid.is_empty() {
            let Some(current) = self.range_one(&key).await? else {
                return Err(DatastoreError::not_found(format!("update {} {}: not found", kind.plural(), object.name)));
            };
            let uid = Self::stored(kind, &current).map(|s| s.uid).unwrap_or_default();
            if uid != object.uid {
                return Err(DatastoreError::conflict(format!("update {} {}: uid {} is not the stored {uid}", kind.plural(), object.name, object.uid)));
            }
        }
        let bytes = to_etcd_value(kind, &object.name, &object.value)?;
        if self.dry_run {
            return Ok(object.clone());
        }
        self.put_if(kind, &key, &bytes, revision).await
    }

    async fn update_status_inner(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        if matches!(kind, Kind::IpamBlock | Kind::BlockAffinity | Kind::IpamHandle | Kind::IpamConfig) {
            return Err(DatastoreError::invalid(format!("{} has no status on etcd", kind.kind_name())));
        }
        let Some(kv) = self.locate(kind, &object.name).await? else {
            return Err(DatastoreError::not_found(format!("update status {} {}: not found", kind.plural(), object.name)));
        };
        let mut current = Self::stored(kind, &kv)?;
        if current.revision != object.revision || (!object.uid.is_empty() && current.uid != object.uid) {
            return Err(DatastoreError::conflict(format!("update status {} {}: revision {} is stale (now {})", kind.plural(), object.name, object.revision, current.revision)));
        }
        match (object.value.get("status"), current.value.as_object_mut()) {
            (Some(status), Some(body)) => {
                body.insert("status".into(), status.clone());
            }
            (None, Some(body)) => {
                body.remove("status");
            }
            _ => {}
        }
        let bytes = to_etcd_value(kind, &object.name, &current.value)?;
        if self.dry_run {
            return Ok(current);
        }
        self.put_if(kind, &kv.key, &bytes, kv.mod_revision).await
    }

    async fn delete_inner(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        let Some(kv) = self.locate(kind, name).await? else {
            return Err(DatastoreError::not_found(format!("delete {} {name}: not found", kind.plural())));
        };
        if let Some(want) = &precondition.uid {
            let uid = Self::stored(kind, &kv).map(|s| s.uid).unwrap_or_default();
            if *want != uid {
                return Err(DatastoreError::conflict(format!("delete {} {name}: uid {want} is not the stored {uid}", kind.plural())));
            }
        }
        if let Some(want) = &precondition.revision
            && Self::revision_of(kind, name, want)? != kv.mod_revision
        {
            return Err(DatastoreError::conflict(format!("delete {} {name}: revision {want} is stale (now {})", kind.plural(), kv.mod_revision)));
        }
        if self.dry_run {
            return Ok(());
        }
        let compare = json!([{"key": b64(&kv.key), "target": "MOD", "result": "EQUAL", "mod_revision": kv.mod_revision.to_string()}]);
        let delete = json!({"request_delete_range": {"key": b64(&kv.key)}});
        let read = json!({"request_range": {"key": b64(&kv.key)}});
        let (ok, _, responses) = self.txn(compare, json!([delete]), json!([read])).await?;
        match (ok, Self::range_response(&responses, 0)?) {
            (true, _) => Ok(()),
            (false, None) => Err(DatastoreError::not_found(format!("delete {} {name}: not found", kind.plural()))),
            (false, Some(now)) => Err(DatastoreError::conflict(format!("delete {} {name}: changed to revision {} meanwhile", kind.plural(), now.mod_revision))),
        }
    }

    fn watch_inner(&self, kind: Kind) -> WatchStream {
        let state = WatchState {
            ds: self.clone(),
            kind,
            pending: VecDeque::new(),
            relist: true,
            listing: None,
            next_revision: 0,
            body: None,
            buffer: Vec::new(),
            delay: Duration::ZERO,
        };
        Box::pin(futures::stream::unfold(state, |mut s| async move {
            let event = s.next_event().await;
            Some((event, s))
        }))
    }
}

/// One range page of a list: its objects, the revision the list reads at, and the key the next
/// page starts from (none after the last).
struct ListPage {
    objects: Vec<Stored>,
    revision: i64,
    next: Option<String>,
}

/// One kind's list + watch: relist when told to (start, compaction), otherwise resume the watch
/// after the last revision seen. A relist hands its objects over a page at a time, so no more
/// than a page of them is held here, where it used to hold the whole kind as parsed JSON.
struct WatchState {
    ds: EtcdDatastore,
    kind: Kind,
    pending: VecDeque<WatchEvent>,
    relist: bool,
    /// While a relist is under way: the key its next page starts from and the revision it reads at.
    listing: Option<(String, i64)>,
    /// The first revision the watch has not delivered.
    next_revision: i64,
    body: Option<Incoming>,
    /// Bytes of the stream not yet parsed into a whole JSON message.
    buffer: Vec<u8>,
    delay: Duration,
}

fn failure_of(e: &DatastoreError) -> WatchFailure {
    match e.kind {
        ErrorKind::Transient | ErrorKind::Conflict | ErrorKind::NotFound => WatchFailure::transient(e.message.clone()),
        // Credentials, permissions, certificates: retrying will not fix them.
        _ => WatchFailure::refused(if e.message.contains("permission denied") { 403 } else { 401 }, e.message.clone()),
    }
}

impl WatchState {
    async fn back_off(&mut self) {
        self.delay = (self.delay * 2).clamp(WATCH_RETRY_FIRST, WATCH_RETRY_MAX);
        tokio::time::sleep(self.delay).await;
    }

    async fn next_event(&mut self) -> WatchEvent {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return e;
            }
            if self.relist {
                let (from, revision) = match self.listing.take() {
                    Some(next) => next,
                    None => {
                        if !self.delay.is_zero() {
                            tokio::time::sleep(self.delay).await;
                        }
                        (kind_range(self.kind).0, 0)
                    }
                };
                match self.ds.list_page(self.kind, &from, revision).await {
                    Ok(page) => {
                        if revision == 0 {
                            self.pending.push_back(WatchEvent::Init);
                        }
                        self.pending.extend(page.objects.into_iter().map(WatchEvent::InitApply));
                        match page.next {
                            Some(key) => self.listing = Some((key, page.revision)),
                            None => {
                                self.pending.push_back(WatchEvent::InitDone);
                                self.next_revision = page.revision + 1;
                                self.relist = false;
                                self.body = None;
                                self.buffer.clear();
                                self.delay = Duration::ZERO;
                            }
                        }
                    }
                    Err(e) => {
                        // A relist that fails part way starts again from its first page (and
                        // `Init`): the consumer holds its writes from `Init` to `InitDone`.
                        self.delay = (self.delay * 2).clamp(WATCH_RETRY_FIRST, WATCH_RETRY_MAX);
                        return WatchEvent::Error(failure_of(&e));
                    }
                }
                continue;
            }
            let Some(body) = self.body.as_mut() else {
                let (start, end) = kind_range(self.kind);
                let request = json!({"create_request": {"key": b64(&start), "range_end": b64(&end), "start_revision": self.next_revision.to_string(), "prev_kv": true}});
                match self.ds.inner.open_watch(&request).await {
                    Ok(b) => {
                        self.body = Some(b);
                        self.buffer.clear();
                    }
                    Err(e) => {
                        if token_expired(0, &e.message) {
                            self.ds.inner.set_token(None);
                        }
                        let failure = failure_of(&e);
                        self.back_off().await;
                        return WatchEvent::Error(failure);
                    }
                }
                continue;
            };
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buffer.extend_from_slice(data);
                        if let Err(message) = self.parse_messages() {
                            self.body = None;
                            return WatchEvent::Error(WatchFailure::transient(message));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    let message = format!("etcd watch of {} broke: {}", self.kind.plural(), chain(&e));
                    self.back_off().await;
                    return WatchEvent::Error(WatchFailure::transient(message));
                }
                None => {
                    self.body = None;
                    let message = format!("etcd ended the watch of {}; resuming at revision {}", self.kind.plural(), self.next_revision);
                    self.back_off().await;
                    return WatchEvent::Error(WatchFailure::transient(message));
                }
            }
        }
    }

    /// Moves every whole message in the buffer into `pending`. `Err` ends this watch stream.
    fn parse_messages(&mut self) -> Result<(), String> {
        let mut consumed = 0;
        let mut messages = Vec::new();
        {
            let mut iter = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
            loop {
                match iter.next() {
                    Some(Ok(v)) => {
                        consumed = iter.byte_offset();
                        messages.push(v);
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => return Err(format!("etcd watch of {}: unreadable message: {e}", self.kind.plural())),
                    None => break,
                }
            }
        }
        self.buffer.drain(..consumed);
        for message in messages {
            self.handle(message)?;
        }
        Ok(())
    }

    fn handle(&mut self, message: Value) -> Result<(), String> {
        if let Some(error) = message.get("error") {
            let text = error.get("message").and_then(Value::as_str).unwrap_or("unknown error").to_string();
            if token_expired(num(&error["code"]), &text) {
                self.ds.inner.set_token(None);
            }
            return Err(format!("etcd watch of {}: {text}", self.kind.plural()));
        }
        let result = &message["result"];
        let compacted = num(&result["compact_revision"]);
        if compacted > 0 {
            // What we missed is gone from etcd's history: only a fresh list says what exists now.
            self.relist = true;
            self.pending.push_back(WatchEvent::Error(WatchFailure::transient(format!(
                "etcd compacted {} past revision {} (now {compacted}): relisting",
                self.kind.plural(),
                self.next_revision
            ))));
            return Ok(());
        }
        if result.get("canceled").and_then(Value::as_bool).unwrap_or(false) {
            let reason = result.get("cancel_reason").and_then(Value::as_str).unwrap_or("no reason given");
            return Err(format!("etcd canceled the watch of {}: {reason}", self.kind.plural()));
        }
        if result.get("created").and_then(Value::as_bool).unwrap_or(false) {
            // The watch is (re)established at `next_revision`: after a failure, that is the news
            // that the kind is healthy again even if nothing changes for hours.
            self.delay = Duration::ZERO;
            self.pending.push_back(WatchEvent::Resumed);
            return Ok(());
        }
        for event in result.get("events").and_then(Value::as_array).into_iter().flatten() {
            let kv = parse_kv(&event["kv"]).map_err(|e| e.message)?;
            self.next_revision = self.next_revision.max(kv.mod_revision + 1);
            if parse_key(self.kind, &kv.key).is_none() {
                continue;
            }
            let is_delete = event.get("type").and_then(Value::as_str) == Some("DELETE");
            let lifted = if is_delete {
                match event.get("prev_kv").filter(|p| p.is_object()).map(parse_kv) {
                    Some(Ok(prev)) => EtcdDatastore::stored(self.kind, &prev).map(WatchEvent::Delete),
                    _ => gone_without_history(self.kind, &kv).map(WatchEvent::Delete),
                }
            } else {
                EtcdDatastore::stored(self.kind, &kv).map(WatchEvent::Apply)
            };
            self.pending.push_back(lifted.unwrap_or_else(|e| WatchEvent::Error(WatchFailure::transient(e.message))));
        }
        Ok(())
    }
}

/// A delete whose previous value etcd no longer has: the name, and nothing else known.
fn gone_without_history(kind: Kind, kv: &Kv) -> DsResult<Stored> {
    let info = parse_key(kind, &kv.key).ok_or_else(|| DatastoreError::invalid(format!("{} is no {} key", kv.key, kind.kind_name())))?;
    Ok(Stored {
        name: info.name.clone(),
        revision: kv.mod_revision.to_string(),
        uid: String::new(),
        value: json!({"apiVersion": crate::model::CALICO_API_VERSION, "kind": kind.kind_name(), "metadata": {"name": info.name}}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_refused_by_its_own_server_names_the_certificate_fix() {
        let hint = gateway_hint("connection error: desc = \"error reading server preface: remote error: tls: bad certificate\"").unwrap();
        assert!(hint.contains("clientAuth"));
        assert!(gateway_hint("etcdserver: key not found").is_none());
    }

    #[test]
    fn the_compactor_compacts_at_the_revision_it_saw_one_round_earlier_and_only_when_it_won_the_round() {
        let start = CompactState::default();
        let (s1, none) = start.after_round(true, 100, 0);
        assert_eq!((s1, none), (CompactState { version: 1, revision: 100 }, None), "no compaction on the first round");
        let (s2, compact) = s1.after_round(true, 250, 0);
        assert_eq!((s2, compact), (CompactState { version: 2, revision: 250 }, Some(100)));
        // Another compactor claimed the round: follow its version, compact nothing.
        let (s3, none) = s2.after_round(false, 300, 7);
        assert_eq!((s3, none), (CompactState { version: 7, revision: 300 }, None));
        assert_eq!(s3.after_round(true, 400, 0), (CompactState { version: 8, revision: 400 }, Some(300)));
    }

    #[test]
    fn expired_tokens_are_recognised_by_code_and_text() {
        assert!(token_expired(grpc::UNAUTHENTICATED, ""));
        assert!(token_expired(0, "etcdserver: invalid auth token"));
        assert!(token_expired(0, "etcd: whatever (code 16)"));
        assert!(!token_expired(grpc::INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password"));
    }

    #[test]
    fn gateway_numbers_arrive_as_strings_or_numbers_and_garbage_is_zero() {
        assert_eq!((num(&json!("42")), num(&json!(42)), num(&json!("x")), num(&Value::Null)), (42, 42, 0, 0));
        let kv = parse_kv(&json!({"key": b64("/calico/ipam/v2/handle/h"), "value": B64.encode(b"{}"), "mod_revision": "7", "create_revision": "5"})).unwrap();
        assert_eq!((kv.key.as_str(), kv.value.as_slice(), kv.mod_revision, kv.create_revision), ("/calico/ipam/v2/handle/h", &b"{}"[..], 7, 5));
        assert!(parse_kv(&json!({"key": "%%%"})).is_err());
        assert!(parse_kv(&json!({"key": B64.encode([0xff, 0xfe])})).is_err());
    }
}
