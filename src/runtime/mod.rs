//! The controller process: watches into the index, the GC loop, the HTTP endpoints
//! (`/metrics`, `/leak-report`, `/liveness`, `/readiness`), the status file, start-of-day writes
//! and live configuration.
//!
//! Pipeline: `watch` (list + watch through the datastore seam and the Kubernetes reader) →
//! `ipam_gc` (owns the index; pure decisions from `ipam::gc`; its executor task writes through
//! the datastore only while `leader` says this replica holds the Lease) → [`Shared`] → `http`.
//! The controller merges env and the KubeControllersConfiguration (`crate::config`) and
//! publishes the result; `live` applies it in process (log level, metrics listener, health
//! checks) and the writer task (behind the WRITE GATE below, started only on the leader)
//! initializes the datastore and reports the config's status.
//! Owns: starting and stopping those tasks and the state they share, in this order on shutdown:
//! the GC loop finishes its writes, then the Lease is given up.
//! Must not: hold the shared lock across an `.await`; decide what is garbage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::config::{EnvConfig, LogLevel, RunConfig};
use crate::datastore::Datastore;
use crate::datastore::etcd::EtcdDatastore;
use crate::datastore::kube::{ApiCounters, KubeDatastore};
use crate::datastore::kube_cluster::KubeCluster;
use crate::health;
use crate::scan::report::LeakReport;

pub mod backoff;
pub mod discovery;
pub mod endpoints;
pub mod events;
pub mod health_check;
pub mod host_endpoints;
pub mod http;
pub mod init;
pub mod ipam_gauges;
pub mod ipam_gc;
pub mod leader;
pub mod listed;
pub mod light;
pub mod loadbalancer;
pub mod compactor;
pub mod live;
pub mod metrics;
pub mod migrator;
pub mod node_deleter;
pub mod status;
pub mod tls;
pub mod watch;

pub use ipam_gc::ControllerOptions;
pub use leader::{ElectionOptions, Timing};
pub use metrics::Metrics;
pub use status::{DEFAULT_STATUS_FILE, StatusReporter};

/// Watch inputs queued for the index owner. When full, the watchers wait: back-pressure instead
/// of unbounded memory during a relist of a large cluster (upstream buffers 1000 per channel).
pub(crate) const INPUT_QUEUE: usize = 4096;

/// The merged configuration as the controller last computed it, and whether the `default`
/// KubeControllersConfiguration exists (the writer recreates it when deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigState {
    pub run: RunConfig,
    pub api_present: bool,
    /// The KubeControllersConfiguration's watch finished its first list (or the API is off): `run`
    /// is the configuration, not the defaults a process starts with. A task that must not act on
    /// a setting the operator turned off (the policy-name migrator) waits for it.
    pub listed: bool,
}

/// What the GC loop publishes for the HTTP endpoints, and the conditions every task reports.
pub struct Shared {
    report: Mutex<Option<Arc<LeakReport>>>,
    metrics: Mutex<Metrics>,
    pub api: Arc<ApiCounters>,
    pub status: StatusReporter,
    /// The controller sends, `live` and the writer task subscribe.
    pub config: tokio::sync::watch::Sender<ConfigState>,
    stopping: AtomicBool,
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new(Arc::new(ApiCounters::default()))
    }
}

impl Shared {
    pub fn new(api: Arc<ApiCounters>) -> Self {
        Shared::with_status(api, StatusReporter::default(), &EnvConfig::default())
    }
    pub fn with_status(api: Arc<ApiCounters>, status: StatusReporter, env: &EnvConfig) -> Self {
        let (config, _) = tokio::sync::watch::channel(ConfigState { run: RunConfig::merge(env, None), api_present: false, listed: false });
        Shared {
            report: Mutex::new(None),
            metrics: Mutex::new(Metrics::default()),
            api,
            status,
            config,
            stopping: AtomicBool::new(false),
        }
    }
    pub fn set_report(&self, report: LeakReport) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(report));
    }
    pub fn report(&self) -> Option<Arc<LeakReport>> {
        self.report.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Runs `f` on the metrics under the lock (never across an `.await`).
    pub fn metrics<R>(&self, f: impl FnOnce(&mut Metrics) -> R) -> R {
        f(&mut self.metrics.lock().unwrap_or_else(|p| p.into_inner()))
    }
    /// Renders a snapshot taken under the lock (a cheap clone: the IPAM gauges are shared), so
    /// formatting never holds up the GC task.
    pub fn render_metrics(&self) -> String {
        self.metrics(|m| m.clone()).render(&self.api)
    }
    pub fn set_synced(&self) {
        self.status.set_ready(health::WATCHES_SYNCED, true, "");
    }
    /// Ready when every condition is (start-up done, apiserver and datastore healthy, every watch
    /// listed and permitted), until shutdown begins. `Err` carries the reasons.
    pub fn readiness(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        self.status.snapshot().ready()
    }
    pub fn ready(&self) -> bool {
        self.readiness().is_ok()
    }
}

/// Sleeps until `at`, or forever without one (a `select!` arm for an optional deadline).
pub(crate) async fn sleep_until_due(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// `due`, brought forward to at most `within` from now (changes share one round).
pub(crate) fn due_within(due: Option<tokio::time::Instant>, within: std::time::Duration) -> Option<tokio::time::Instant> {
    let soon = tokio::time::Instant::now() + within;
    Some(due.map_or(soon, |d| d.min(soon)))
}

/// Sets the process's log level; installed by the binary, which owns the subscriber.
#[derive(Clone, Default)]
pub struct LogControl(Option<Arc<dyn Fn(LogLevel) + Send + Sync>>);

impl LogControl {
    pub fn new(f: impl Fn(LogLevel) + Send + Sync + 'static) -> Self {
        LogControl(Some(Arc::new(f)))
    }
    pub fn set(&self, level: LogLevel) {
        if let Some(f) = &self.0 {
            f(level);
        }
    }
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "LogControl(installed)" } else { "LogControl(none)" })
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub controller: ControllerOptions,
    /// `--metrics-port`: when given it beats the KubeControllersConfiguration's
    /// `prometheusMetricsPort`; 0 disables.
    pub metrics_port: Option<u16>,
    /// `--health-port`; 0 disables. Both listeners serve every path.
    pub health_port: u16,
    /// Unused in dry run: a dry-run replica never touches the Lease and never leads.
    pub election: ElectionOptions,
    /// `K8S_CLIENT_QPS` / `K8S_CLIENT_BURST`: the limit of the writer's requests (watches are
    /// never limited); QPS <= 0 disables it.
    pub client_qps: f32,
    pub client_burst: u32,
    /// `CALICO_API_GROUP`, checked against what this version supports.
    pub api_group: Option<String>,
    /// `--status-file`; `None` writes no file.
    pub status_file: Option<PathBuf>,
    pub log: LogControl,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    RateLimit(#[from] crate::datastore::rate::RateError),
    #[error(transparent)]
    Init(#[from] init::InitError),
    #[error(transparent)]
    ApiGroup(#[from] discovery::ApiGroupError),
    #[error(transparent)]
    MetricsTls(#[from] tls::TlsSetupError),
}

impl RunError {
    /// The process exit code for this error (2: a setting or cluster this version refuses).
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::ApiGroup(e) => e.exit_code(),
            RunError::RateLimit(_) => 2,
            RunError::Bind { .. } => 1,
            RunError::Init(_) => 2,
            RunError::MetricsTls(_) => 2,
        }
    }
}

pub async fn bind(port: u16) -> Result<tokio::net::TcpListener, RunError> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::Bind { addr, source })
}

/// Runs the controller until `stop` resolves, then lets the GC loop finish its pass in progress
/// (in-flight writes complete) and returns. Fails if the datastore cannot be initialized.
pub async fn run(client: kube::Client, opts: RunOptions, stop: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with(client, None, opts, stop).await
}

/// [`run`] with Calico's objects in `etcd` when given (`DATASTORE_TYPE=etcdv3`), in Kubernetes
/// otherwise.
pub async fn run_with(client: kube::Client, etcd: Option<EtcdDatastore>, opts: RunOptions, stop: impl Future<Output = ()>) -> Result<(), RunError> {
    // Before anything else: a certificate that cannot be read is a setting to fix (exit 2).
    let tls = match &opts.controller.env.metrics_tls {
        Some(cfg) => {
            let acceptor = tls::acceptor(cfg)?;
            tracing::info!(client_ca = cfg.client_ca_file.is_some(), client_common_name = cfg.client_common_name.as_deref().unwrap_or(""), "metrics over TLS");
            Some(acceptor)
        }
        None => None,
    };
    let api = Arc::new(ApiCounters::default());
    let env = &opts.controller.env;
    let shared = Arc::new(Shared::with_status(api.clone(), StatusReporter::new(opts.status_file.clone()), env));
    shared.status.set_ready(health::STARTUP, false, "initializing the datastore");
    shared.status.set_ready(health::WATCHES_SYNCED, false, "waiting for the first list of every watch");
    if shared.config.borrow().run.health_enabled {
        // As upstream: not ready until the first health round has actually checked.
        shared.status.set_ready(health::KUBE_API_SERVER, false, "apiserver not checked yet");
        shared.status.set_ready(health::CALICO_DATASTORE, false, "datastore not checked yet");
    }
    let bucket = crate::datastore::rate::TokenBucket::new(opts.client_qps, opts.client_burst)?;
    match etcd {
        None => {
            // Before any watch: a cluster on Calico's v3 API would look empty through v1 watches.
            if let Err(e) = discovery::check_api_group(&client, opts.api_group.as_deref()).await {
                // Said in the log and in the status file too, so `check-status -r` in a
                // restarting pod names it.
                tracing::error!(error = %e, "not supported by this version; see deploy/README.md");
                shared.status.set_ready(health::STARTUP, false, e.to_string());
                return Err(e.into());
            }
            let ds = KubeDatastore::new(client.clone(), opts.controller.dry_run, api.clone()).with_rate_limit(bucket);
            // Pods, nodes and the re-validation reads: Kubernetes whatever the datastore (the same
            // client-side request limit as the writer's).
            let cluster = Arc::new(KubeCluster::new(client.clone(), api, ds.limiter().clone()));
            // Health reads never wait behind the writer's request limit: a burst of releases must
            // not make the datastore look unhealthy.
            let health_ds = KubeDatastore::new(client.clone(), opts.controller.dry_run, ds.counters().clone());
            let backend = Backend { ds: Arc::new(ds), health_ds, cluster, cluster_types: init::KDD_CLUSTER_TYPES, tls, compactor: None, init_retry_for: Some(init::RETRY_FOR) };
            run_on(client, backend, shared, opts, stop).await
        }
        Some(etcd) => {
            // Calico's objects in etcd; pods and nodes (and the Lease) still in Kubernetes.
            let ds = etcd.with_dry_run(opts.controller.dry_run).with_counters(api.clone());
            let cluster = Arc::new(KubeCluster::new(client.clone(), api, crate::datastore::kube::RequestLimiter::new(bucket)));
            let backend = Backend { ds: Arc::new(ds.clone()), health_ds: ds.clone(), cluster, cluster_types: init::ETCD_CLUSTER_TYPES, tls, compactor: Some(ds), init_retry_for: None };
            run_on(client, backend, shared, opts, stop).await
        }
    }
}

/// One Calico datastore with what the controller needs around it.
struct Backend<D> {
    ds: Arc<D>,
    /// For the health reads (never behind the writer's request limit).
    health_ds: D,
    /// Pods, nodes and the re-validation reads: always Kubernetes.
    cluster: Arc<KubeCluster>,
    /// What start-up writes into ClusterInformation's `clusterType`.
    cluster_types: &'static [&'static str],
    /// The metrics listener's TLS (TLS_CRT_PATH, TLS_KEY_PATH), if configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// etcd: the datastore the leader compacts periodically.
    compactor: Option<crate::datastore::etcd::EtcdDatastore>,
    /// How long the leader's start-up writes may fail before the process exits: upstream's 60 s
    /// on Kubernetes (the apiserver is the controller's own lifeline); on etcd `None`, retried
    /// until etcd answers, so an unusable etcd is a readiness reason, never a crash loop.
    init_retry_for: Option<std::time::Duration>,
}

/// The controller over one Calico datastore.
async fn run_on<D: Datastore + Clone + 'static>(client: kube::Client, backend: Backend<D>, shared: Arc<Shared>, opts: RunOptions, stop: impl Future<Output = ()>) -> Result<(), RunError> {
    let Backend { ds, health_ds, cluster, cluster_types, tls, compactor, init_retry_for } = backend;
    if opts.controller.dry_run {
        tracing::warn!("dry run: plans are reported, nothing is written");
    }

    let mut servers = Vec::new();
    if opts.health_port != 0 {
        let listener = bind(opts.health_port).await?;
        tracing::info!(port = opts.health_port, "health listener: /liveness, /readiness (and /metrics, /leak-report)");
        servers.push(tokio::spawn(http::serve(listener, shared.clone(), None)));
    }
    // An explicit --metrics-port must bind now; a port from the configuration is (re)bound by
    // `live`, which logs a failure and keeps running, as upstream's metrics server does.
    let mut metrics = live::MetricsListener::new(opts.health_port).with_tls(tls);
    if let Some(port) = opts.metrics_port {
        metrics.bind_now(port, &shared).await?;
    }

    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let kcc = opts.controller.env.kcc().map(str::to_string);
    match &kcc {
        Some(name) if name != crate::config::DEFAULT_KCC_NAME => tracing::info!(name = %name, "configuration: KubeControllersConfiguration {name} (KUBE_CONTROLLERS_CONFIG_NAME)"),
        Some(_) => {}
        None => tracing::info!("configuration: environment only (DISABLE_KUBE_CONTROLLERS_CONFIG_API); no KubeControllersConfiguration is read or written"),
    }
    // etcd mode only: the workload-endpoint controller taps the GC's pod watch (SPEC §6.5).
    let endpoint_feed = ds.keeps_calico_nodes().then(|| endpoints::EndpointFeed::new(shared.config.borrow().run.workload_endpoint.is_some()));
    let watchers = watch::spawn_all(&ds, &cluster, &tx, &shared, kcc.is_some(), endpoint_feed.as_ref().map(|(f, _)| f.clone()));
    drop(tx);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let live_task = tokio::spawn(live::apply_config(shared.clone(), opts.clone(), metrics));
    let (health_shared, health_cluster, dry_run) = (shared.clone(), cluster.clone(), opts.controller.dry_run);
    let health_task = tokio::spawn(async move { health_check::health_loop(&health_ds, &*health_cluster, health_shared, dry_run).await });

    // Followers are ready too (readiness is about the watches, not leadership): a standby that
    // failed readiness would be restarted for doing its job.
    let (may_write, election, _never_leader) = if opts.controller.dry_run {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (rx, None, Some(tx))
    } else {
        let (rx, handle) = leader::spawn(client.clone(), opts.election.clone(), shared.clone());
        (rx, Some(handle), None)
    };

    // WRITE GATE: the only place that starts start-of-day writes (ClusterInformation, the
    // default KubeControllersConfiguration, its status): `live::writer` runs while this replica
    // leads and is stopped when it stops leading.
    let (fatal_tx, mut fatal_rx) = tokio::sync::oneshot::channel::<init::InitError>();
    let writer_task = if opts.controller.dry_run {
        tracing::warn!("dry run: ClusterInformation and KubeControllersConfiguration are neither created nor repaired");
        shared.status.set_ready(health::STARTUP, true, "dry run: datastore not initialized by us");
        None
    } else {
        Some(tokio::spawn(writer_while_leading((*ds).clone(), shared.clone(), may_write.clone(), fatal_tx, (cluster_types, init_retry_for), kcc.clone())))
    };

    // Events go out only from a process that writes: a dry run records none.
    let events = if opts.controller.dry_run {
        events::EventRecorder::off()
    } else {
        events::spawn(client.clone(), events::EventOptions::from_env(), shared.metrics(|m| m.events.clone())).0
    };
    // etcd mode only, and only on the leader (SPEC §0 step 6); never in a dry run.
    let compactor_task = compactor.filter(|_| !opts.controller.dry_run).map(|etcd| tokio::spawn(compactor::run(etcd, shared.clone(), may_write.clone())));
    // etcd mode only: Calico Nodes of deleted Kubernetes nodes, with their objects (SPEC §1.4).
    let node_deleter_task = ds.keeps_calico_nodes().then(|| {
        let o = node_deleter::NodeDeleterOptions {
            dry_run: opts.controller.dry_run,
            guard: opts.controller.env.guard,
            guard_wait: opts.controller.leak_grace_override.map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
            kcc: kcc.clone(),
        };
        tokio::spawn(node_deleter::run(ds.clone(), cluster.clone(), shared.clone(), may_write.clone(), o, stop_rx.clone()))
    });
    // etcd mode only: profiles and policies (on Kubernetes upstream derives them; SPEC §6).
    let light_tasks: Vec<_> = if ds.keeps_calico_nodes() {
        light::ALL
            .into_iter()
            .map(|spec| {
                let o = light::LightOptions {
                    dry_run: opts.controller.dry_run,
                    guard: opts.controller.env.guard,
                    bad_rules: opts.controller.env.policy_bad_rules,
                    events: events.clone(),
                    workers: opts.controller.env.workers_for(spec.workers_var),
                };
                tokio::spawn(light::run(spec, ds.clone(), cluster.clone(), shared.clone(), may_write.clone(), o, stop_rx.clone()))
            })
            .collect()
    } else {
        Vec::new()
    };
    // Both datastores: LoadBalancer addresses (SPEC §6.6); Services come from Kubernetes either way.
    let loadbalancer_task = Some({
        let leading = may_write.clone();
        // Every write stops once this replica no longer leads, mid-round too.
        let execute = crate::datastore::apply::ExecuteOptions { keep_going: Some(crate::datastore::apply::KeepGoing::new(move || *leading.borrow())), ..Default::default() };
        let o = loadbalancer::LbOptions { dry_run: opts.controller.dry_run, guard: opts.controller.env.guard, events: events.clone(), execute };
        tokio::spawn(loadbalancer::run(ds.clone(), cluster.clone(), shared.clone(), may_write.clone(), o, stop_rx.clone()))
    });
    // Both datastores: the node controller's automatic host endpoints (SPEC §1.6).
    let host_endpoints_task = {
        let source = if ds.keeps_calico_nodes() { host_endpoints::NodeSource::Calico } else { host_endpoints::NodeSource::Kubernetes { use_pod_cidr: opts.controller.env.use_pod_cidr } };
        let o = host_endpoints::HostEndpointOptions {
            dry_run: opts.controller.dry_run,
            guard: opts.controller.env.guard,
            source,
            events: events.clone(),
            kcc: kcc.clone(),
            workers: opts.controller.env.workers_for("NODE_WORKERS"),
        };
        tokio::spawn(host_endpoints::run(ds.clone(), cluster.clone(), shared.clone(), may_write.clone(), o, stop_rx.clone()))
    };
    let endpoints_task = endpoint_feed.map(|(feed, rx)| {
        let o = endpoints::EndpointOptions { dry_run: opts.controller.dry_run, workers: opts.controller.env.workers_for("WORKLOAD_ENDPOINT_WORKERS") };
        tokio::spawn(endpoints::run(ds.clone(), shared.clone(), feed, rx, may_write.clone(), o, stop_rx.clone()))
    });
    // Both datastores: default-tier policies under pre-3.32 names re-keyed (SPEC §6.8). A task of
    // its own, so its wait for the calico-node rollout never holds up another controller.
    let migrator_task = {
        let o = migrator::MigratorOptions::new(&opts.controller.env, opts.controller.dry_run);
        tracing::info!(daemonset = %format!("{}/{}", o.namespace, migrator::CALICO_NODE), "policy-name migrator: re-keys pre-3.32 default.<name> policies once this DaemonSet rolled out");
        tokio::spawn(migrator::run(ds.clone(), cluster.clone(), shared.clone(), may_write.clone(), o, stop_rx.clone()))
    };
    let controller = ipam_gc::GcController::new(ds.clone(), cluster.clone(), opts.controller.clone(), shared.clone(), may_write).with_events(events);
    let gc_task = tokio::spawn(controller.run(rx, stop_rx));

    let result = tokio::select! {
        _ = stop => Ok(()),
        Ok(e) = &mut fatal_rx => Err(RunError::Init(e)),
    };
    tracing::info!("shutting down: finishing the pass in progress");
    shared.stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    // Every task that writes has ended before the Lease is given up: a standby starts writing as
    // soon as the Lease is free, and two writers of one object is what leadership prevents. The
    // GC finishes its pass; the other controllers that watch `stop` finish the write in progress
    // (within SHUTDOWN_GRACE); the start-of-day writer and the compactor, which do not, are
    // cancelled at once.
    let _ = gc_task.await;
    let stoppable = [node_deleter_task, endpoints_task, Some(host_endpoints_task), loadbalancer_task, Some(migrator_task)].into_iter().flatten().chain(light_tasks);
    let unstoppable = [writer_task, compactor_task].into_iter().flatten();
    let resign = async move {
        if let Some(election) = election {
            election.resign().await;
        }
    };
    end_writers_then_resign(stoppable.collect(), unstoppable.collect(), SHUTDOWN_GRACE, resign).await;
    for w in watchers {
        w.abort();
    }
    for task in [live_task, health_task] {
        task.abort();
    }
    for s in servers {
        s.abort();
    }
    result
}

/// Aborts the task it names when dropped: a task's own cancellation reaches what it spawned.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// How long shutdown waits for the controllers to finish the write in progress before it
/// cancels them (a pass's writes stop at the next object once `stop` is set).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Shutdown's order: the tasks that watch `stop` (already sent) get until `grace` to end on
/// their own and are cancelled after it; the others are cancelled at once; only when every one
/// of them has ended (a cancelled task is awaited, so it runs no further) is `resign` run.
async fn end_writers_then_resign(
    stoppable: Vec<tokio::task::JoinHandle<()>>,
    unstoppable: Vec<tokio::task::JoinHandle<()>>,
    grace: std::time::Duration,
    resign: impl std::future::Future<Output = ()>,
) {
    for t in &unstoppable {
        t.abort();
    }
    let deadline = tokio::time::Instant::now() + grace;
    for mut t in stoppable {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            tracing::warn!("shutdown: a controller did not finish within {grace:?}; cancelled");
            t.abort();
            let _ = t.await;
        }
    }
    for t in unstoppable {
        let _ = t.await;
    }
    resign.await;
}

/// Runs `live::writer` while `may_write` says this replica leads: started on election, stopped
/// on losing it. A standby reports `Startup` ready (the leader initializes the datastore); an
/// initialization that fails for good is sent to `fatal`.
async fn writer_while_leading<D: Datastore + Clone + 'static>(
    ds: D,
    shared: Arc<Shared>,
    mut may_write: tokio::sync::watch::Receiver<bool>,
    fatal: tokio::sync::oneshot::Sender<init::InitError>,
    (cluster_types, init_retry_for): (&'static [&'static str], Option<std::time::Duration>),
    kcc: Option<String>,
) {
    const STANDBY: &str = "standby: the leader initializes the datastore";
    let mut fatal = Some(fatal);
    let mut task: Option<tokio::task::JoinHandle<Result<(), init::InitError>>> = None;
    // Cancelling this task cancels the writer it started too (a dropped JoinHandle would not).
    let mut cancel_with_me = AbortOnDrop(None);
    // The writer ended on its own during this term (its config channel closed): not restarted
    // until leadership is lost and won again.
    let mut finished_this_term = false;
    loop {
        let leading = *may_write.borrow_and_update();
        if leading && task.is_none() && !finished_this_term {
            shared.status.set_ready(health::STARTUP, false, "initializing the datastore");
            let t = tokio::spawn(live::writer(ds.clone(), shared.clone(), cluster_types, kcc.clone(), init_retry_for));
            cancel_with_me.0 = Some(t.abort_handle());
            task = Some(t);
        } else if !leading {
            if let Some(t) = task.take() {
                t.abort();
            }
            finished_this_term = false;
            shared.status.set_ready(health::STARTUP, true, STANDBY);
        }
        match task.as_mut() {
            Some(t) => {
                tokio::select! {
                    changed = may_write.changed() => if changed.is_err() { break },
                    ended = t => {
                        task = None;
                        finished_this_term = true;
                        if let Ok(Err(e)) = ended
                            && let Some(tx) = fatal.take()
                        {
                            let _ = tx.send(e);
                            return;
                        }
                    }
                }
            }
            None => {
                if may_write.changed().await.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(t) = task {
        t.abort();
    }
}

#[cfg(test)]
mod shutdown_tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    fn log() -> Arc<Mutex<Vec<&'static str>>> {
        Arc::new(Mutex::new(Vec::new()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_controller_writes_once_the_lease_is_given_up() {
        let events = log();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // A controller that watches `stop` and finishes the write in progress first.
        let (e, mut stop) = (events.clone(), stop_rx.clone());
        let polite = tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            e.lock().unwrap().push("last write");
        });
        // One that never looks at `stop` and keeps writing.
        let e = events.clone();
        let deaf = tokio::spawn(async move {
            loop {
                e.lock().unwrap().push("deaf write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        // One that watches `stop` but is stuck past the grace period.
        let (e, mut stop) = (events.clone(), stop_rx.clone());
        let stuck = tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            loop {
                e.lock().unwrap().push("stuck write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        // The start-of-day writer, and the writer it spawned.
        let e = events.clone();
        let outer = tokio::spawn(async move {
            let e2 = e.clone();
            let inner = tokio::spawn(async move {
                loop {
                    e2.lock().unwrap().push("inner write");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            let _guard = AbortOnDrop(Some(inner.abort_handle()));
            std::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop_tx.send(true).unwrap();
        let e = events.clone();
        let resign = async move { e.lock().unwrap().push("resigned") };
        end_writers_then_resign(vec![polite, stuck], vec![deaf, outer], Duration::from_millis(300), resign).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let events = events.lock().unwrap().clone();
        let resigned = events.iter().position(|e| *e == "resigned").expect("resigned");
        assert_eq!(resigned, events.len() - 1, "a write after the Lease was given up: {:?}", &events[resigned..]);
        assert!(events.contains(&"last write"), "the polite controller was not let finish: {events:?}");
        assert!(events.contains(&"stuck write") && events.contains(&"inner write"), "{events:?}");
    }
}
