//! The health loop (SPEC §3.1): the apiserver's `/healthz` (`KubeAPIServer`), a read of
//! `ClusterInformation/default` (`CalicoDatastore`), and the controller loop's heartbeat
//! (`EventLoop` liveness).
//!
//! Owns: the check timings (upstream's: timeout 4 s doubling to 16 s while failing, next round
//! after 2 s when failing and 10 s when healthy).
//! Must not: write anything to the API; stop the process (the kubelet decides on liveness).

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use super::status::HEARTBEAT_STALE;
use crate::datastore::{ClusterReader, Datastore, Kind};
use crate::health::{CALICO_DATASTORE, EVENT_LOOP, KUBE_API_SERVER};

const FIRST_TIMEOUT: Duration = Duration::from_secs(4);
const MAX_TIMEOUT: Duration = Duration::from_secs(16);
const HEALTHY_PAUSE: Duration = Duration::from_secs(10);
const FAILING_PAUSE: Duration = Duration::from_secs(2);

async fn check_apiserver<C: ClusterReader>(cluster: &C, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, cluster.healthz()).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("Error reaching apiserver: /healthz timed out after {}s", timeout.as_secs())),
    }
}

/// `missing_ok`: a dry run never creates `ClusterInformation/default`, so for it a readable
/// datastore without one is healthy (a shadow beside upstream must not stay unready forever).
async fn check_datastore<D: Datastore>(ds: &D, timeout: Duration, missing_ok: bool) -> Result<(), String> {
    match tokio::time::timeout(timeout, ds.get(Kind::ClusterInformation, "default")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.is_not_found() && missing_ok => Ok(()),
        Ok(Err(e)) if e.is_not_found() => Err("Error verifying datastore: ClusterInformation default does not exist".into()),
        Ok(Err(e)) => Err(format!("Error verifying datastore: {e}")),
        Err(_) => Err(format!("Error verifying datastore: timed out after {}s", timeout.as_secs())),
    }
}

/// Runs until aborted.
pub async fn health_loop<D: Datastore, C: ClusterReader>(ds: &D, cluster: &C, shared: Arc<Shared>, dry_run: bool) {
    let mut timeout = FIRST_TIMEOUT;
    let mut config = shared.config.subscribe();
    loop {
        match shared.status.heartbeat_age() {
            Some(age) if age > HEARTBEAT_STALE => {
                shared.status.set_live(EVENT_LOOP, false, format!("controller loop silent for {}s", age.as_secs()))
            }
            Some(_) => shared.status.set_live(EVENT_LOOP, true, ""),
            None => {}
        }
        let enabled = config.borrow_and_update().run.health_enabled;
        let pause = if enabled {
            let (api, ds) = tokio::join!(check_apiserver(cluster, timeout), check_datastore(ds, timeout, dry_run));
            let healthy = api.is_ok() && ds.is_ok();
            shared.status.set_ready(KUBE_API_SERVER, api.is_ok(), api.err().unwrap_or_default());
            shared.status.set_ready(CALICO_DATASTORE, ds.is_ok(), ds.err().unwrap_or_default());
            if healthy {
                timeout = FIRST_TIMEOUT;
                HEALTHY_PAUSE
            } else {
                timeout = (timeout * 2).min(MAX_TIMEOUT);
                FAILING_PAUSE
            }
        } else {
            // Upstream leaves these false forever with health checks off, so HTTP readiness never
            // passes (§10.3); a check that does not run does not count here.
            shared.status.remove_ready(KUBE_API_SERVER);
            shared.status.remove_ready(CALICO_DATASTORE);
            HEALTHY_PAUSE
        };
        // A config change (health checks switched on) starts the next round at once.
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            r = config.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{ErrorKind, MemoryCluster, MemoryDatastore, Op};

    fn condition(shared: &Shared, name: &str) -> (bool, String) {
        let ready = shared.status.snapshot().readiness.get(name).cloned().expect("condition reported");
        (ready.ready, ready.reason)
    }

    #[tokio::test(start_paused = true)]
    async fn an_unhealthy_apiserver_and_a_failing_datastore_read_are_reported_not_ready() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        let shared = Arc::new(Shared::default());
        cluster.set_healthz(Err("Error reaching apiserver: /healthz answered \"nok\"".into()));
        ds.inject(Some(Kind::ClusterInformation), None, Op::Get, ErrorKind::Transient, 1);
        tokio::select! {
            _ = health_loop(&ds, &cluster, shared.clone(), false) => unreachable!("the loop runs until aborted"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        assert_eq!(condition(&shared, KUBE_API_SERVER), (false, "Error reaching apiserver: /healthz answered \"nok\"".to_string()));
        let (ready, reason) = condition(&shared, CALICO_DATASTORE);
        assert!(!ready && reason.starts_with("Error verifying datastore: transient: injected"), "{reason}");

        // Both recover: the next round (2 s after a failing one) reports them ready.
        cluster.set_healthz(Ok(()));
        ds.create_now(Kind::ClusterInformation, "default", serde_json::json!({"spec": {}})).unwrap();
        tokio::select! {
            _ = health_loop(&ds, &cluster, shared.clone(), false) => unreachable!("the loop runs until aborted"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        assert_eq!(condition(&shared, KUBE_API_SERVER), (true, String::new()));
        assert_eq!(condition(&shared, CALICO_DATASTORE), (true, String::new()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_cluster_information_is_unhealthy_except_in_a_dry_run() {
        let ds = MemoryDatastore::new();
        let cluster = MemoryCluster::new();
        for (dry_run, want) in [(false, false), (true, true)] {
            let shared = Arc::new(Shared::default());
            tokio::select! {
                _ = health_loop(&ds, &cluster, shared.clone(), dry_run) => unreachable!("the loop runs until aborted"),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            assert_eq!(condition(&shared, CALICO_DATASTORE).0, want, "dry run {dry_run}");
        }
    }
}
