//! Start-of-day writes (SPEC §0 step 3) and the KubeControllersConfiguration's status: create or
//! repair `ClusterInformation/default`, create the tiers upstream ensures (`default`,
//! `kube-admin`, `kube-baseline`) and the `default` KubeControllersConfiguration with upstream's
//! defaults when missing, and write `status` (runningConfig, environmentVars) through the status
//! subresource when it differs from what is stored.
//!
//! Owns: those writes and their retry policy (every 5 s for up to 60 s, as upstream).
//! Must not: run in dry-run mode or on a replica that may not write; the caller decides (see the
//! `WRITE GATE` in `runtime/mod.rs`). It never flips an explicit `datastoreReady: false`.

use std::time::Duration;

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};

use crate::datastore::Kind;
use crate::datastore::kube::{ApiCounters, api_resource, status_code};
use crate::model::{CALICO_API_VERSION, CALICO_GROUP};
use crate::model::config::ClusterInformationSpec;

/// Upstream's retry interval and budget for EnsureInitialized before giving up.
const RETRY_EVERY: Duration = Duration::from_secs(5);
const RETRY_FOR: Duration = Duration::from_secs(60);
/// What kube-controllers on the Kubernetes datastore writes into `clusterType`.
const CLUSTER_TYPES: [&str; 2] = ["k8s", "kdd"];
pub const DEFAULT_NAME: &str = "default";
/// The tiers upstream's EnsureInitialized creates: (name, order, default action). Calico's own
/// CRD validation pins these values, so they are not ours to tune.
const TIERS: [(&str, u64, &str); 3] = [("default", 1_000_000, "Deny"), ("kube-admin", 1_000, "Pass"), ("kube-baseline", 10_000_000, "Pass")];

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("initializing the datastore (ClusterInformation, KubeControllersConfiguration) failed for {secs}s: {last}")]
    GaveUp { secs: u64, last: String },
    #[error("{verb} {resource}: {source}")]
    Api { verb: &'static str, resource: &'static str, source: kube::Error },
    #[error("{resource}/default does not decode: {problem}")]
    Decode { resource: &'static str, problem: String },
}

/// 32 lowercase hex characters from the kernel's random source (upstream: a UUID's hex).
fn new_cluster_guid() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if read.is_err() {
        // No /dev/urandom (an odd container): fall back to the std hasher's per-process keys
        // mixed with the time, still unique per cluster in practice.
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The repaired spec, or `None` if nothing needs writing: a GUID if missing, `k8s` and `kdd` in
/// `clusterType` (other entries kept, in order), `datastoreReady: true` only if unset.
pub fn repair_cluster_information(spec: &ClusterInformationSpec, guid: impl FnOnce() -> String) -> Option<ClusterInformationSpec> {
    let mut out = spec.clone();
    if out.cluster_guid.as_deref().is_none_or(str::is_empty) {
        out.cluster_guid = Some(guid());
    }
    let mut types: Vec<String> =
        out.cluster_type.as_deref().unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect();
    for t in CLUSTER_TYPES {
        if !types.iter().any(|x| x == t) {
            types.push(t.to_string());
        }
    }
    out.cluster_type = Some(types.join(","));
    if out.datastore_ready.is_none() {
        out.datastore_ready = Some(true);
    }
    (out != *spec).then_some(out)
}

fn api(client: &Client, kind: Kind) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &api_resource(kind))
}

fn object(kind: Kind, spec: Value) -> Result<DynamicObject, InitError> {
    serde_json::from_value(json!({"apiVersion": CALICO_API_VERSION, "kind": kind.kind_name(), "metadata": {"name": DEFAULT_NAME}, "spec": spec}))
        .map_err(|e| InitError::Decode { resource: kind.plural(), problem: e.to_string() })
}

async fn ensure_cluster_information(client: &Client, counters: &ApiCounters) -> Result<(), InitError> {
    let kind = Kind::ClusterInformation;
    let infos = api(client, kind);
    let got = infos.get_opt(DEFAULT_NAME).await;
    counters.observe("get", kind.plural(), 200, &got);
    let got = got.map_err(|source| InitError::Api { verb: "get", resource: kind.plural(), source })?;
    match got {
        None => {
            let spec = repair_cluster_information(&ClusterInformationSpec::default(), new_cluster_guid).unwrap_or_default();
            let body = object(kind, serde_json::to_value(&spec).unwrap_or_default())?;
            let created = infos.create(&PostParams::default(), &body).await;
            counters.observe("create", kind.plural(), 201, &created);
            match created {
                Ok(_) => tracing::info!(guid = spec.cluster_guid.as_deref().unwrap_or(""), "created ClusterInformation default"),
                // A 409 (someone else created it meanwhile) too: the next attempt repairs theirs.
                Err(source) => return Err(InitError::Api { verb: "create", resource: kind.plural(), source }),
            }
        }
        Some(mut existing) => {
            let spec: ClusterInformationSpec = serde_json::from_value(existing.data.get("spec").cloned().unwrap_or(json!({})))
                .map_err(|e| InitError::Decode { resource: kind.plural(), problem: e.to_string() })?;
            if let Some(repaired) = repair_cluster_information(&spec, new_cluster_guid) {
                // A replace with the read resourceVersion: a concurrent writer makes this a 409
                // and the retry reads theirs.
                existing.data["spec"] = serde_json::to_value(&repaired).unwrap_or_default();
                let replaced = infos.replace(DEFAULT_NAME, &PostParams::default(), &existing).await;
                counters.observe("update", kind.plural(), 200, &replaced);
                replaced.map_err(|source| InitError::Api { verb: "update", resource: kind.plural(), source })?;
                tracing::info!(cluster_type = repaired.cluster_type.as_deref().unwrap_or(""), "repaired ClusterInformation default");
            }
        }
    }
    Ok(())
}

/// Creates the `default` KubeControllersConfiguration with upstream's defaults if it is missing
/// (also after someone deletes it, as upstream recreates it).
pub async fn ensure_default_kcc(client: &Client, counters: &ApiCounters) -> Result<(), InitError> {
    let kind = Kind::KubeControllersConfiguration;
    let kccs = api(client, kind);
    let got = kccs.get_opt(DEFAULT_NAME).await;
    counters.observe("get", kind.plural(), 200, &got);
    if got.map_err(|source| InitError::Api { verb: "get", resource: kind.plural(), source })?.is_some() {
        return Ok(());
    }
    let body = object(kind, serde_json::to_value(crate::config::default_kcc_spec()).unwrap_or_default())?;
    let created = kccs.create(&PostParams::default(), &body).await;
    counters.observe("create", kind.plural(), 201, &created);
    match created {
        Ok(_) => {
            tracing::info!("created KubeControllersConfiguration default with upstream's defaults");
            Ok(())
        }
        Err(e) if status_code(&e) == 409 => Ok(()),
        Err(source) => Err(InitError::Api { verb: "create", resource: kind.plural(), source }),
    }
}

/// Writes `status` on the `default` object if it differs from what is stored; returns whether
/// it wrote. Comparing first is what keeps our own status write from feeding the watch forever.
pub async fn write_kcc_status(client: &Client, counters: &ApiCounters, status: &Value) -> Result<bool, InitError> {
    let kind = Kind::KubeControllersConfiguration;
    let kccs = api(client, kind);
    let got = kccs.get_opt(DEFAULT_NAME).await;
    counters.observe("get", kind.plural(), 200, &got);
    let Some(mut existing) = got.map_err(|source| InitError::Api { verb: "get", resource: kind.plural(), source })? else {
        return Ok(false);
    };
    if existing.data.get("status") == Some(status) {
        return Ok(false);
    }
    existing.data["status"] = status.clone();
    let replaced = kccs.replace_status(DEFAULT_NAME, &PostParams::default(), &existing).await;
    counters.observe("update", "kubecontrollersconfigurations/status", 200, &replaced);
    replaced.map_err(|source| InitError::Api { verb: "update", resource: "kubecontrollersconfigurations/status", source })?;
    Ok(true)
}

/// Creates the missing tiers; existing ones are left as they are (upstream does not rewrite
/// them either). A cluster without the Tier CRD (404 on the resource) has no tiers to ensure.
async fn ensure_tiers(client: &Client, counters: &ApiCounters) -> Result<(), InitError> {
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(CALICO_GROUP, "v1", "Tier"), "tiers");
    let tiers: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    for (name, order, action) in TIERS {
        let got = tiers.get_opt(name).await;
        counters.observe("get", "tiers", 200, &got);
        match got {
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) if status_code(&e) == 404 => {
                tracing::info!("no Tier resource in this cluster: tiers not ensured");
                return Ok(());
            }
            Err(source) => return Err(InitError::Api { verb: "get", resource: "tiers", source }),
        }
        let body: DynamicObject = serde_json::from_value(json!({
            "apiVersion": CALICO_API_VERSION, "kind": "Tier", "metadata": {"name": name},
            "spec": {"order": order, "defaultAction": action}
        }))
        .map_err(|e| InitError::Decode { resource: "tiers", problem: e.to_string() })?;
        let created = tiers.create(&PostParams::default(), &body).await;
        counters.observe("create", "tiers", 201, &created);
        match created {
            Ok(_) => tracing::info!(tier = name, "created tier"),
            Err(e) if status_code(&e) == 409 => {}
            Err(source) => return Err(InitError::Api { verb: "create", resource: "tiers", source }),
        }
    }
    Ok(())
}

async fn ensure_once(client: &Client, counters: &ApiCounters) -> Result<(), InitError> {
    ensure_cluster_information(client, counters).await?;
    ensure_tiers(client, counters).await?;
    ensure_default_kcc(client, counters).await
}

/// Upstream's EnsureInitialized for the Kubernetes datastore (plus the default
/// KubeControllersConfiguration), retried every 5 s for up to 60 s.
pub async fn ensure_initialized(client: &Client, counters: &ApiCounters) -> Result<(), InitError> {
    let started = tokio::time::Instant::now();
    loop {
        match ensure_once(client, counters).await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() + RETRY_EVERY > RETRY_FOR => {
                return Err(InitError::GaveUp { secs: started.elapsed().as_secs(), last: e.to_string() });
            }
            Err(e) => {
                tracing::warn!(error = %e, "initializing the datastore failed; retrying in 5s");
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> ClusterInformationSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_missing_cluster_information_gets_a_guid_kdd_type_and_ready() {
        let r = repair_cluster_information(&ClusterInformationSpec::default(), new_cluster_guid).unwrap();
        let guid = r.cluster_guid.unwrap();
        assert!(guid.len() == 32 && guid.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{guid}");
        assert_eq!((r.cluster_type.as_deref(), r.datastore_ready), (Some("k8s,kdd"), Some(true)));
    }

    #[test]
    fn repair_keeps_other_cluster_types_and_an_explicit_not_ready() {
        let s = spec(json!({"clusterGUID": "abc", "clusterType": "typha,k8s", "datastoreReady": false, "variant": "Calico"}));
        let r = repair_cluster_information(&s, || unreachable!("the GUID is kept")).unwrap();
        assert_eq!(r.cluster_type.as_deref(), Some("typha,k8s,kdd"));
        assert_eq!(r.datastore_ready, Some(false), "an explicit false is an upgrade in progress: never flipped");
        assert_eq!(r.extra["variant"], "Calico");
    }

    #[test]
    fn a_complete_cluster_information_is_not_rewritten() {
        let s = spec(json!({"clusterGUID": "abc", "clusterType": "k8s,bgp,kdd", "datastoreReady": true}));
        assert_eq!(repair_cluster_information(&s, new_cluster_guid), None);
    }
}
