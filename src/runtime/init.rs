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

use serde_json::{Value, json};

use crate::datastore::{Datastore, DatastoreError, ErrorKind, Kind, Stored};
use crate::model::CALICO_API_VERSION;
use crate::model::config::ClusterInformationSpec;

/// Upstream's retry interval and budget for EnsureInitialized before giving up.
const RETRY_EVERY: Duration = Duration::from_secs(5);
pub const RETRY_FOR: Duration = Duration::from_secs(60);
/// What kube-controllers on the Kubernetes datastore writes into `clusterType`.
pub const KDD_CLUSTER_TYPES: &[&str] = &["k8s", "kdd"];
/// What it writes on the etcd datastore (libcalico adds `kdd` only for KDD).
pub const ETCD_CLUSTER_TYPES: &[&str] = &["k8s"];
pub const DEFAULT_NAME: &str = "default";
/// The tiers upstream's EnsureInitialized creates: (name, order, default action). Calico's own
/// CRD validation pins these values, so they are not ours to tune.
const TIERS: [(&str, u64, &str); 3] = [("default", 1_000_000, "Deny"), ("kube-admin", 1_000, "Pass"), ("kube-baseline", 10_000_000, "Pass")];
/// The metric label and error name of the KubeControllersConfiguration's status subresource.
const KCC_STATUS: &str = "kubecontrollersconfigurations/status";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("initializing the datastore (ClusterInformation, KubeControllersConfiguration) failed for {secs}s: {last}")]
    GaveUp { secs: u64, last: String },
    #[error("{verb} {resource}: {source}")]
    Api { verb: &'static str, resource: &'static str, source: DatastoreError },
    #[error("{resource}/default does not decode: {problem}")]
    Decode { resource: &'static str, problem: String },
}

impl InitError {
    fn api(verb: &'static str, resource: &'static str) -> impl FnOnce(DatastoreError) -> InitError {
        move |source| InitError::Api { verb, resource, source }
    }
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

/// The repaired spec, or `None` if nothing needs writing: a GUID if missing, `cluster_types`
/// (`k8s`, and `kdd` on KDD) in `clusterType` (other entries kept, in order),
/// `datastoreReady: true` only if unset.
pub fn repair_cluster_information(spec: &ClusterInformationSpec, cluster_types: &[&str], guid: impl FnOnce() -> String) -> Option<ClusterInformationSpec> {
    let mut out = spec.clone();
    if out.cluster_guid.as_deref().is_none_or(str::is_empty) {
        out.cluster_guid = Some(guid());
    }
    let mut types: Vec<String> =
        out.cluster_type.as_deref().unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect();
    for &t in cluster_types {
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

/// A KDD-shaped body named `name`.
fn body(kind: Kind, name: &str, spec: Value) -> Value {
    json!({"apiVersion": CALICO_API_VERSION, "kind": kind.kind_name(), "metadata": {"name": name}, "spec": spec})
}

/// The object, or `None` when it does not exist.
async fn get_opt<D: Datastore>(ds: &D, kind: Kind, name: &str) -> Result<Option<Stored>, InitError> {
    match ds.get(kind, name).await {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(InitError::api("get", kind.plural())(e)),
    }
}

async fn ensure_cluster_information<D: Datastore>(ds: &D, cluster_types: &[&str]) -> Result<(), InitError> {
    let kind = Kind::ClusterInformation;
    match get_opt(ds, kind, DEFAULT_NAME).await? {
        None => {
            let spec = repair_cluster_information(&ClusterInformationSpec::default(), cluster_types, new_cluster_guid).unwrap_or_default();
            let value = body(kind, DEFAULT_NAME, serde_json::to_value(&spec).unwrap_or_default());
            // An AlreadyExists (someone else created it meanwhile) too: the next attempt repairs theirs.
            ds.create(kind, DEFAULT_NAME, value).await.map_err(InitError::api("create", kind.plural()))?;
            tracing::info!(guid = spec.cluster_guid.as_deref().unwrap_or(""), "created ClusterInformation default");
        }
        Some(existing) => {
            let spec: ClusterInformationSpec = serde_json::from_value(existing.value.get("spec").cloned().unwrap_or(json!({})))
                .map_err(|e| InitError::Decode { resource: kind.plural(), problem: e.to_string() })?;
            if let Some(repaired) = repair_cluster_information(&spec, cluster_types, new_cluster_guid) {
                // A compare-and-swap on the read revision: a concurrent writer makes this a
                // conflict and the retry reads theirs.
                let mut edit = existing;
                edit.value["spec"] = serde_json::to_value(&repaired).unwrap_or_default();
                ds.update(kind, &edit).await.map_err(InitError::api("update", kind.plural()))?;
                tracing::info!(cluster_type = repaired.cluster_type.as_deref().unwrap_or(""), "repaired ClusterInformation default");
            }
        }
    }
    Ok(())
}

/// Creates the KubeControllersConfiguration `name` (`default` unless `KUBE_CONTROLLERS_CONFIG_NAME`
/// names another) with upstream's defaults if it is missing (also after someone deletes it, as
/// upstream recreates it).
pub async fn ensure_default_kcc<D: Datastore>(ds: &D, name: &str) -> Result<(), InitError> {
    let kind = Kind::KubeControllersConfiguration;
    if get_opt(ds, kind, name).await?.is_some() {
        return Ok(());
    }
    let value = body(kind, name, serde_json::to_value(crate::config::default_kcc_spec()).unwrap_or_default());
    match ds.create(kind, name, value).await {
        Ok(_) => {
            tracing::info!(name, "created KubeControllersConfiguration with upstream's defaults");
            Ok(())
        }
        Err(e) if e.kind == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(InitError::api("create", kind.plural())(e)),
    }
}

/// Writes `status` on the KubeControllersConfiguration `name` if it differs from what is stored;
/// returns whether it wrote. Comparing first is what keeps our own status write from feeding the
/// watch forever.
pub async fn write_kcc_status<D: Datastore>(ds: &D, name: &str, status: &Value) -> Result<bool, InitError> {
    let kind = Kind::KubeControllersConfiguration;
    let Some(mut existing) = get_opt(ds, kind, name).await? else {
        return Ok(false);
    };
    if existing.value.get("status") == Some(status) {
        return Ok(false);
    }
    existing.value["status"] = status.clone();
    ds.update_status(kind, &existing).await.map_err(InitError::api("update", KCC_STATUS))?;
    Ok(true)
}

/// Creates the missing tiers; existing ones are left as they are (upstream does not rewrite
/// them either). A cluster without the Tier CRD has no tiers to ensure: there a tier is never
/// found and its create finds no resource (404) either.
async fn ensure_tiers<D: Datastore>(ds: &D) -> Result<(), InitError> {
    let kind = Kind::Tier;
    for (name, order, action) in TIERS {
        if get_opt(ds, kind, name).await?.is_some() {
            continue;
        }
        match ds.create(kind, name, body(kind, name, json!({"order": order, "defaultAction": action}))).await {
            Ok(_) => tracing::info!(tier = name, "created tier"),
            Err(e) if e.kind == ErrorKind::AlreadyExists => {}
            Err(e) if e.is_not_found() => {
                tracing::info!("no Tier resource in this cluster: tiers not ensured");
                return Ok(());
            }
            Err(e) => return Err(InitError::api("create", kind.plural())(e)),
        }
    }
    Ok(())
}

async fn ensure_once<D: Datastore>(ds: &D, cluster_types: &[&str], kcc: Option<&str>) -> Result<(), InitError> {
    ensure_cluster_information(ds, cluster_types).await?;
    ensure_tiers(ds).await?;
    match kcc {
        Some(name) => ensure_default_kcc(ds, name).await,
        // DISABLE_KUBE_CONTROLLERS_CONFIG_API: the configuration object is not ours to create.
        None => Ok(()),
    }
}

/// Upstream's EnsureInitialized for the Kubernetes datastore (plus the default
/// KubeControllersConfiguration), retried every 5 s for up to 60 s.
pub async fn ensure_initialized<D: Datastore>(ds: &D) -> Result<(), InitError> {
    ensure_initialized_as(ds, KDD_CLUSTER_TYPES, Some(DEFAULT_NAME)).await
}

/// [`ensure_initialized`] writing `cluster_types` ([`KDD_CLUSTER_TYPES`] or [`ETCD_CLUSTER_TYPES`])
/// and creating the KubeControllersConfiguration `kcc` when missing (`None`: none is created).
pub async fn ensure_initialized_as<D: Datastore>(ds: &D, cluster_types: &[&str], kcc: Option<&str>) -> Result<(), InitError> {
    ensure_initialized_for(ds, cluster_types, kcc, Some(RETRY_FOR), &mut |_| {}).await
}

/// The start-up writes, retried every 5 s: for up to `retry_for` (then [`InitError::GaveUp`]),
/// or until they succeed when `None`. `on_failure` hears every failed attempt.
pub async fn ensure_initialized_for<D: Datastore>(
    ds: &D,
    cluster_types: &[&str],
    kcc: Option<&str>,
    retry_for: Option<Duration>,
    on_failure: &mut (dyn FnMut(&InitError) + Send),
) -> Result<(), InitError> {
    let started = tokio::time::Instant::now();
    loop {
        match ensure_once(ds, cluster_types, kcc).await {
            Ok(()) => return Ok(()),
            Err(e) if retry_for.is_some_and(|budget| started.elapsed() + RETRY_EVERY > budget) => {
                return Err(InitError::GaveUp { secs: started.elapsed().as_secs(), last: e.to_string() });
            }
            Err(e) => {
                tracing::warn!(error = %e, "initializing the datastore failed; retrying in 5s");
                on_failure(&e);
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{MemoryDatastore, Op};

    fn spec(v: Value) -> ClusterInformationSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_missing_cluster_information_gets_a_guid_kdd_type_and_ready() {
        let r = repair_cluster_information(&ClusterInformationSpec::default(), KDD_CLUSTER_TYPES, new_cluster_guid).unwrap();
        let guid = r.cluster_guid.unwrap();
        assert!(guid.len() == 32 && guid.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{guid}");
        assert_eq!((r.cluster_type.as_deref(), r.datastore_ready), (Some("k8s,kdd"), Some(true)));
    }

    #[test]
    fn on_etcd_the_cluster_type_is_k8s_without_kdd() {
        let r = repair_cluster_information(&ClusterInformationSpec::default(), ETCD_CLUSTER_TYPES, new_cluster_guid).unwrap();
        assert_eq!(r.cluster_type.as_deref(), Some("k8s"));
        let s = spec(json!({"clusterGUID": "abc", "clusterType": "typha,k8s", "datastoreReady": true}));
        assert_eq!(repair_cluster_information(&s, ETCD_CLUSTER_TYPES, new_cluster_guid), None, "nothing to repair");
    }

    #[test]
    fn repair_keeps_other_cluster_types_and_an_explicit_not_ready() {
        let s = spec(json!({"clusterGUID": "abc", "clusterType": "typha,k8s", "datastoreReady": false, "variant": "Calico"}));
        let r = repair_cluster_information(&s, KDD_CLUSTER_TYPES, || unreachable!("the GUID is kept")).unwrap();
        assert_eq!(r.cluster_type.as_deref(), Some("typha,k8s,kdd"));
        assert_eq!(r.datastore_ready, Some(false), "an explicit false is an upgrade in progress: never flipped");
        assert_eq!(r.extra["variant"], "Calico");
    }

    #[test]
    fn a_complete_cluster_information_is_not_rewritten() {
        let s = spec(json!({"clusterGUID": "abc", "clusterType": "k8s,bgp,kdd", "datastoreReady": true}));
        assert_eq!(repair_cluster_information(&s, KDD_CLUSTER_TYPES, new_cluster_guid), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_datastore_gets_cluster_information_the_three_tiers_and_the_default_kcc() {
        let ds = MemoryDatastore::new();
        ensure_initialized(&ds).await.unwrap();
        let info = ds.peek(Kind::ClusterInformation, DEFAULT_NAME).expect("ClusterInformation default");
        let spec = &info.value["spec"];
        assert_eq!(spec["clusterGUID"].as_str().map(str::len), Some(32), "{spec}");
        assert_eq!((spec["clusterType"].as_str(), spec["datastoreReady"].as_bool()), (Some("k8s,kdd"), Some(true)));
        let tiers: Vec<(String, Value, Value)> = ds
            .snapshot(Kind::Tier)
            .into_iter()
            .map(|t| (t.name, t.value["spec"]["order"].clone(), t.value["spec"]["defaultAction"].clone()))
            .collect();
        assert_eq!(
            tiers,
            [
                ("default".to_string(), json!(1_000_000), json!("Deny")),
                ("kube-admin".to_string(), json!(1_000), json!("Pass")),
                ("kube-baseline".to_string(), json!(10_000_000), json!("Pass")),
            ]
        );
        let kcc = ds.peek(Kind::KubeControllersConfiguration, DEFAULT_NAME).expect("the default KubeControllersConfiguration");
        assert_eq!(kcc.value["spec"], serde_json::to_value(crate::config::default_kcc_spec()).unwrap());
        // A second start writes nothing.
        let revision = ds.revision();
        ensure_initialized(&ds).await.unwrap();
        assert_eq!(ds.revision(), revision);
    }

    #[tokio::test(start_paused = true)]
    async fn an_existing_explicit_datastore_not_ready_is_kept() {
        let ds = MemoryDatastore::new();
        let spec = json!({"clusterGUID": "abc", "clusterType": "typha", "datastoreReady": false});
        ds.create_now(Kind::ClusterInformation, DEFAULT_NAME, body(Kind::ClusterInformation, DEFAULT_NAME, spec)).unwrap();
        ensure_initialized(&ds).await.unwrap();
        let spec = ds.peek(Kind::ClusterInformation, DEFAULT_NAME).unwrap().value["spec"].clone();
        assert_eq!(spec, json!({"clusterGUID": "abc", "clusterType": "typha,k8s,kdd", "datastoreReady": false}));
    }

    #[tokio::test(start_paused = true)]
    async fn a_datastore_without_the_tier_resource_is_initialized_without_tiers() {
        let ds = MemoryDatastore::new();
        ds.inject(Some(Kind::Tier), None, Op::Create, ErrorKind::NotFound, 1);
        ensure_initialized(&ds).await.unwrap();
        assert!(ds.snapshot(Kind::Tier).is_empty());
        assert_eq!(ds.op_count(Op::Create, Kind::Tier), 1, "the first 404 ends the tiers");
        assert!(ds.peek(Kind::KubeControllersConfiguration, DEFAULT_NAME).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn initialization_retries_every_5s_and_gives_up_after_60s() {
        let ds = MemoryDatastore::new();
        ds.inject(Some(Kind::ClusterInformation), None, Op::Get, ErrorKind::Transient, 1000);
        let started = tokio::time::Instant::now();
        let err = ensure_initialized(&ds).await.unwrap_err();
        assert!(matches!(err, InitError::GaveUp { secs: 60, .. }), "{err}");
        assert!(err.to_string().starts_with("initializing the datastore (ClusterInformation, KubeControllersConfiguration) failed for 60s: get clusterinformations: transient: "), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_budget_initialization_retries_until_the_datastore_answers() {
        // etcd: an unusable etcd is reported, never a reason to exit (no crash loop).
        let ds = MemoryDatastore::new();
        ds.inject(Some(Kind::ClusterInformation), None, Op::Get, ErrorKind::Transient, 30);
        let started = tokio::time::Instant::now();
        let mut failures = 0;
        ensure_initialized_for(&ds, ETCD_CLUSTER_TYPES, Some(DEFAULT_NAME), None, &mut |_| failures += 1).await.unwrap();
        assert_eq!(failures, 30);
        assert_eq!(started.elapsed(), Duration::from_secs(150), "30 failures, 5 s apart: far past upstream's 60 s");
        assert!(ds.peek(Kind::ClusterInformation, DEFAULT_NAME).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_is_written_only_when_it_differs() {
        let ds = MemoryDatastore::new();
        assert!(!write_kcc_status(&ds, DEFAULT_NAME, &json!({"runningConfig": {}})).await.unwrap(), "no configuration: nothing to write");
        ensure_default_kcc(&ds, DEFAULT_NAME).await.unwrap();
        let status = json!({"runningConfig": {"controllers": {}}, "environmentVars": {"ENABLED_CONTROLLERS": "node"}});
        assert!(write_kcc_status(&ds, DEFAULT_NAME, &status).await.unwrap());
        assert!(!write_kcc_status(&ds, DEFAULT_NAME, &status).await.unwrap());
        assert_eq!(ds.op_count(Op::UpdateStatus, Kind::KubeControllersConfiguration), 1);
        let kcc = ds.peek(Kind::KubeControllersConfiguration, DEFAULT_NAME).unwrap();
        assert_eq!(kcc.value["status"], status);
        assert_eq!(kcc.value["spec"], serde_json::to_value(crate::config::default_kcc_spec()).unwrap(), "the spec is untouched");
    }
}
