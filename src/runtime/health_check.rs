//! The health loop (SPEC §3.1): the apiserver's `/healthz` (`KubeAPIServer`), a read of
//! `ClusterInformation/default` (`CalicoDatastore`), and the controller loop's heartbeat
//! (`EventLoop` liveness).
//!
//! Owns: the check timings (upstream's: timeout 4 s doubling to 16 s while failing, next round
//! after 2 s when failing and 10 s when healthy).
//! Must not: write anything to the API; stop the process (the kubelet decides on liveness).

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, DynamicObject};

use super::Shared;
use super::status::HEARTBEAT_STALE;
use crate::datastore::Kind;
use crate::datastore::kube::api_resource;
use crate::health::{CALICO_DATASTORE, EVENT_LOOP, KUBE_API_SERVER};

const FIRST_TIMEOUT: Duration = Duration::from_secs(4);
const MAX_TIMEOUT: Duration = Duration::from_secs(16);
const HEALTHY_PAUSE: Duration = Duration::from_secs(10);
const FAILING_PAUSE: Duration = Duration::from_secs(2);

async fn check_apiserver(client: &Client, timeout: Duration) -> Result<(), String> {
    let request = http::Request::get("/healthz").body(Vec::new()).map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request_text(request)).await {
        Ok(Ok(body)) if body.trim() == "ok" => Ok(()),
        Ok(Ok(body)) => Err(format!("Error reaching apiserver: /healthz answered {:?}", body.trim())),
        Ok(Err(e)) => Err(format!("Error reaching apiserver: {e}")),
        Err(_) => Err(format!("Error reaching apiserver: /healthz timed out after {}s", timeout.as_secs())),
    }
}

/// `missing_ok`: a dry run never creates `ClusterInformation/default`, so for it a readable
/// datastore without one is healthy (a shadow beside upstream must not stay unready forever).
async fn check_datastore(client: &Client, timeout: Duration, missing_ok: bool) -> Result<(), String> {
    let infos: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(Kind::ClusterInformation));
    match tokio::time::timeout(timeout, infos.get_opt("default")).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) if missing_ok => Ok(()),
        Ok(Ok(None)) => Err("Error verifying datastore: ClusterInformation default does not exist".into()),
        Ok(Err(e)) => Err(format!("Error verifying datastore: {e}")),
        Err(_) => Err(format!("Error verifying datastore: timed out after {}s", timeout.as_secs())),
    }
}

/// Runs until aborted.
pub async fn health_loop(client: Client, shared: Arc<Shared>, dry_run: bool) {
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
            let (api, ds) = tokio::join!(check_apiserver(&client, timeout), check_datastore(&client, timeout, dry_run));
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
