//! Live configuration: what the merged [`RunConfig`] changes in a running process, without the
//! exit-and-re-exec upstream uses (§10.1): the log level, the metrics listener's port, whether
//! health checks run, and the notes on controllers this version does not implement. Also the
//! writer task that initializes the datastore and keeps the KubeControllersConfiguration's
//! status current.
//!
//! Owns: applying each new config once, and the metrics listener's lifetime.
//! Must not: merge configuration (the controller does, with `crate::config`) or write to the
//! API outside [`writer`], which only the WRITE GATE in `runtime/mod.rs` starts.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::{ConfigState, RunError, RunOptions, Shared, init};
use crate::config::RunConfig;
use crate::datastore::Datastore;
use crate::health;

/// The metrics listener, rebound when `prometheusMetricsPort` changes, over TLS when the operator
/// configured it. A port equal to the health port is already served there (both listeners serve
/// every path; the health listener always in plain HTTP, for `calico health` on loopback).
pub struct MetricsListener {
    health_port: u16,
    port: u16,
    task: Option<JoinHandle<()>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl MetricsListener {
    pub fn new(health_port: u16) -> Self {
        MetricsListener { health_port, port: 0, task: None, tls: None }
    }

    /// Serves the metrics port through `tls` (from the next bind on).
    pub fn with_tls(mut self, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        self.tls = tls;
        self
    }

    /// Binds `port` (0 = none) in place of the current listener; an error leaves none bound.
    pub async fn bind_now(&mut self, port: u16, shared: &Arc<Shared>) -> Result<(), RunError> {
        if port == self.port && (self.task.is_some() || port == 0) {
            return Ok(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.port = port;
        if port == 0 || port == self.health_port {
            if port != 0 && self.tls.is_some() {
                tracing::warn!(port, "the metrics port is the health port: metrics are served there without TLS");
            }
            tracing::info!(port, "metrics: no separate listener");
            return Ok(());
        }
        let listener = super::bind(port).await?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(port, scheme, "serving /metrics, /leak-report, /liveness, /readiness");
        self.task = Some(tokio::spawn(super::http::serve(listener, shared.clone(), self.tls.clone())));
        Ok(())
    }
}

/// Applies every published configuration until the channel closes.
pub async fn apply_config(shared: Arc<Shared>, opts: RunOptions, mut metrics: MetricsListener) {
    let mut rx = shared.config.subscribe();
    let mut last: Option<RunConfig> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        apply(&shared, &opts, &mut metrics, last.as_ref(), &state.run).await;
        last = Some(state.run);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn apply(shared: &Arc<Shared>, opts: &RunOptions, metrics: &mut MetricsListener, last: Option<&RunConfig>, rc: &RunConfig) {
    if last.map(|l| l.log_level) != Some(rc.log_level) {
        opts.log.set(rc.log_level);
        // Logged at warn so the change is visible at any level but the new one's "None".
        tracing::warn!(level = rc.log_level.title(), "log level applied");
    }
    if last.map(|l| l.health_enabled) != Some(rc.health_enabled) {
        tracing::info!(enabled = rc.health_enabled, "health checks");
    }
    // The explicit flag wins over the API, so a test or an operator can pin the port.
    let port = opts.metrics_port.unwrap_or(rc.metrics_port);
    if let Err(e) = metrics.bind_now(port, shared).await {
        tracing::error!(error = %e, "metrics listener not bound; will retry when the configuration changes");
    }
    let missing = rc.not_implemented();
    if last.map(RunConfig::not_implemented) != Some(missing.clone()) && !missing.is_empty() {
        tracing::warn!(controllers = %missing.join(","), "enabled but not implemented in this version; ignored");
    }
    if last.map(RunConfig::gc_enabled) != Some(rc.gc_enabled()) && !rc.gc_enabled() {
        tracing::error!("node controller not enabled (ENABLED_CONTROLLERS or controllers.node): the IPAM garbage collector does not run");
    }
    if rc.flannel_migration && last.map(|l| l.flannel_migration) != Some(true) {
        tracing::error!("ENABLED_CONTROLLERS=flannelmigration: the Flannel to Calico migration is not supported by this version and nothing is migrated; run upstream's calico-kube-controllers image for the migration");
    }
    let (ready, note) = controllers_condition(rc);
    shared.status.set_ready(health::CONTROLLERS, ready, note);
    tracing::debug!(config = ?rc, "configuration applied");
}

/// The readiness reason while `flannelmigration` is enabled.
pub const FLANNEL_MIGRATION_UNSUPPORTED: &str = "flannelmigration (the Flannel to Calico migration) is not supported by this version: nothing is migrated";

/// The `Controllers` condition for `rc`: ready unless `flannelmigration` is enabled (the migration
/// is the only job of such a process, upstream allows no other controller beside it, and doing
/// nothing must not look healthy); the reason names what does not run.
pub fn controllers_condition(rc: &RunConfig) -> (bool, String) {
    let missing = rc.not_implemented();
    let mut parts = Vec::new();
    if rc.flannel_migration {
        parts.push(FLANNEL_MIGRATION_UNSUPPORTED.to_string());
    }
    if !rc.gc_enabled() {
        parts.push("node controller not enabled: the IPAM garbage collector does not run".to_string());
    }
    if !missing.is_empty() {
        parts.push(format!("not implemented in this version: {}", missing.join(",")));
    }
    (!rc.flannel_migration, parts.join("; "))
}

/// Start-of-day writes, then the status of the KubeControllersConfiguration `kcc` on every config
/// change (and its re-creation when deleted); with `kcc` `None` (DISABLE_KUBE_CONTROLLERS_CONFIG_API)
/// only the start-of-day writes, never the configuration object. Runs only behind the WRITE GATE.
/// Returns an error only when start-of-day initialization gave up (fatal, as upstream).
/// `retry_for`: how long the start-up writes may fail before the process gives up (upstream's
/// 60 s); `None` retries until they succeed, each failure in the `Startup` reason.
pub async fn writer<D: Datastore>(
    ds: D,
    shared: Arc<Shared>,
    cluster_types: &'static [&'static str],
    kcc: Option<String>,
    retry_for: Option<std::time::Duration>,
) -> Result<(), init::InitError> {
    let status = shared.clone();
    let mut report = move |e: &init::InitError| status.status.set_ready(health::STARTUP, false, format!("initializing the datastore: {e}"));
    init::ensure_initialized_for(&ds, cluster_types, kcc.as_deref(), retry_for, &mut report).await?;
    shared.status.set_ready(health::STARTUP, true, "");
    let Some(kcc) = kcc else {
        return Ok(());
    };
    let mut rx = shared.config.subscribe();
    loop {
        let state: ConfigState = rx.borrow_and_update().clone();
        if !state.api_present
            && let Err(e) = init::ensure_default_kcc(&ds, &kcc).await
        {
            tracing::warn!(error = %e, "re-creating the default KubeControllersConfiguration failed");
        }
        match init::write_kcc_status(&ds, &kcc, &state.run.status()).await {
            Ok(true) => tracing::info!("KubeControllersConfiguration status updated"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "writing the KubeControllersConfiguration status failed"),
        }
        if rx.changed().await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnvConfig;

    fn condition(enabled: &str) -> (bool, String) {
        let vars = [("ENABLED_CONTROLLERS".to_string(), enabled.to_string())].into_iter().collect();
        controllers_condition(&RunConfig::merge(&EnvConfig::from_env(&vars).unwrap(), None))
    }

    #[test]
    fn flannel_migration_is_named_as_unsupported_and_keeps_the_controllers_condition_not_ready() {
        let (ready, reason) = condition("flannelmigration");
        assert!(!ready);
        assert!(reason.starts_with(FLANNEL_MIGRATION_UNSUPPORTED), "{reason}");
        // The policy-name migrator is on by default and not implemented: named, still ready.
        let (ready, reason) = condition("node");
        assert!(ready && !reason.contains("flannel") && !reason.contains("loadbalancer"), "{reason}");
        let (ready, reason) = condition("node,loadbalancer");
        assert!(ready && reason.is_empty(), "loadbalancer runs on Kubernetes: {reason}");
        let (ready, reason) = condition("node,namespace");
        assert!(ready && reason.starts_with("not implemented in this version: ") && reason.contains("namespace"), "{reason}");
        let (ready, reason) = condition("policy");
        assert!(ready && reason.contains("garbage collector does not run") && reason.contains("policy"), "{reason}");
    }
}
