//! The controller process: watches into the index, the GC loop, and the HTTP endpoints
//! (`/metrics`, `/leak-report`, `/liveness`, `/readiness`).
//!
//! Pipeline: `watch` (needs a client) → `controller` (owns the index; pure decisions from
//! `ipam::gc`, writes through the datastore, which needs a client, only while `leader` says this
//! replica holds the Lease) → [`Shared`] → `http`.
//! Owns: starting and stopping those tasks and the state they share, in this order on shutdown:
//! the GC loop finishes its writes, then the Lease is given up.
//! Must not: hold the shared lock across an `.await`; decide what is garbage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::datastore::kube::{ApiCounters, KubeDatastore};
use crate::scan::report::LeakReport;

pub mod backoff;
pub mod controller;
pub mod discovery;
pub mod http;
pub mod leader;
pub mod ipam_gauges;
pub mod metrics;
pub mod watch;

pub use controller::ControllerOptions;
pub use leader::{ElectionOptions, Timing};
pub use metrics::Metrics;

/// Watch inputs queued for the index owner. When full, the watchers wait: back-pressure instead
/// of unbounded memory during a relist of a large cluster (upstream buffers 1000 per channel).
const INPUT_QUEUE: usize = 4096;

/// What the GC loop publishes for the HTTP endpoints.
#[derive(Default)]
pub struct Shared {
    report: Mutex<Option<Arc<LeakReport>>>,
    metrics: Mutex<Metrics>,
    pub api: Arc<ApiCounters>,
    synced: AtomicBool,
    stopping: AtomicBool,
}

impl Shared {
    pub fn new(api: Arc<ApiCounters>) -> Self {
        Shared { api, ..Default::default() }
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
        self.synced.store(true, Ordering::Relaxed);
    }
    /// Ready once every watch finished its first list, until shutdown begins.
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub controller: ControllerOptions,
    /// Ports for the HTTP endpoints; 0 disables a listener. Both serve every path.
    pub metrics_port: u16,
    pub health_port: u16,
    /// Unused in dry run: a dry-run replica never touches the Lease and never leads.
    pub election: ElectionOptions,
    /// `K8S_CLIENT_QPS` / `K8S_CLIENT_BURST`: the limit of the writer's requests (watches are
    /// never limited); QPS <= 0 disables it.
    pub client_qps: f32,
    pub client_burst: u32,
    /// `CALICO_API_GROUP`, checked against what this version supports.
    pub api_group: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    RateLimit(#[from] crate::datastore::rate::RateError),
    #[error(transparent)]
    ApiGroup(#[from] discovery::ApiGroupError),
}

impl RunError {
    /// The process exit code for this error (2: a setting or cluster this version refuses).
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::ApiGroup(e) => e.exit_code(),
            RunError::RateLimit(_) => 2,
            RunError::Bind { .. } => 1,
        }
    }
}

/// Runs the controller until `stop` resolves, then lets the GC loop finish its pass in progress
/// (in-flight writes complete) and returns.
pub async fn run(client: kube::Client, opts: RunOptions, stop: impl Future<Output = ()>) -> Result<(), RunError> {
    let api = Arc::new(ApiCounters::default());
    let shared = Arc::new(Shared::new(api.clone()));
    let bucket = crate::datastore::rate::TokenBucket::new(opts.client_qps, opts.client_burst)?;
    // Before any watch: a cluster on Calico's v3 API would look empty through v1 watches.
    discovery::check_api_group(&client, opts.api_group.as_deref()).await?;
    let ds = KubeDatastore::new(client.clone(), opts.controller.dry_run, api).with_rate_limit(bucket);
    if opts.controller.dry_run {
        tracing::warn!("dry run: plans are reported, nothing is written");
    }

    let mut servers = Vec::new();
    let ports: std::collections::BTreeSet<u16> = [opts.metrics_port, opts.health_port].into_iter().filter(|p| *p != 0).collect();
    for port in ports {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::Bind { addr, source })?;
        tracing::info!(%addr, "serving /metrics, /leak-report, /liveness, /readiness");
        servers.push(tokio::spawn(http::serve(listener, shared.clone())));
    }

    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let watchers = watch::spawn_all(&client, &tx);
    drop(tx);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Followers are ready too (readiness is about the watches, not leadership): a standby that
    // failed readiness would be restarted for doing its job.
    let (may_write, election, _never_leader) = if opts.controller.dry_run {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (rx, None, Some(tx))
    } else {
        let (rx, handle) = leader::spawn(client.clone(), opts.election.clone(), shared.clone());
        (rx, Some(handle), None)
    };
    let controller = controller::Controller::new(ds, opts.controller.clone(), shared.clone(), may_write);
    let gc_task = tokio::spawn(controller.run(rx, stop_rx));

    stop.await;
    tracing::info!("shutting down: finishing the pass in progress");
    shared.stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = gc_task.await;
    if let Some(election) = election {
        election.resign().await;
    }
    for w in watchers {
        w.abort();
    }
    for s in servers {
        s.abort();
    }
    Ok(())
}
