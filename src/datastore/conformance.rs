//! The datastore conformance suite: the compare-and-swap and soft-delete laws every backend must
//! keep, and the laws of its watches ([`run_watch`]), written once against the trait. The memory
//! backend runs it in a unit test; the Kubernetes and etcd backends run it from `tests/it`
//! against the test cluster.
//!
//! Owns: the laws and the objects they are checked with (schema-valid for Calico's v1 CRDs, all
//! named under a caller-chosen prefix and removed afterwards, so the suite can share a cluster).
//! Must not: depend on a particular backend or leave objects behind on success, or time out by
//! itself (it has no clock): a watch law that never sees its event waits, so a caller on a real
//! backend bounds the suite with its own timeout.

use futures::StreamExt;
use serde_json::{Value, json};

use super::{Datastore, ErrorKind, Expect, Kind, Precondition, Stored, WatchEvent, WatchStream, mark_deleted};

#[derive(Debug, Clone)]
pub struct Options {
    /// Prepended to every object name the suite creates.
    pub prefix: String,
    /// Whether unknown `spec` fields survive a write. Kubernetes prunes fields the CRD schema does
    /// not declare, so there only `metadata` labels and annotations are checked.
    pub unknown_spec_fields: bool,
    /// Whether `metadata` labels and annotations of IPAM objects survive a write. etcd keeps
    /// libcalico's v1 IPAM model, which has no metadata, so there they do not.
    pub ipam_metadata: bool,
    /// Whether names must be Calico's own: blocks named for their CIDR (`10-250-1-0-30`, which
    /// cannot carry the prefix) and affinities `<node>-<cidrname>` (the node carries it). etcd
    /// derives its keys from these names.
    pub calico_names: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { prefix: "conformance-".into(), unknown_spec_fields: true, ipam_metadata: true, calico_names: false }
    }
}

/// The name and CIDR of the block a law uses; `n` tells the laws' blocks apart.
fn block_for(opts: &Options, law: &str, n: u8) -> (String, String) {
    if opts.calico_names {
        let cidr = format!("10.250.{n}.0/30");
        (cidr.replace(['.', '/'], "-"), cidr)
    } else {
        (format!("{}{law}", opts.prefix), "10.250.0.0/30".to_string())
    }
}

/// The name and node of the affinity a law uses (for the block 10.250.0.0/30).
fn affinity_for(opts: &Options, law: &str) -> (String, String) {
    if opts.calico_names {
        let node = format!("{}{law}", opts.prefix);
        (format!("{node}-10-250-0-0-30"), node)
    } else {
        (format!("{}{law}", opts.prefix), "conformance-node".to_string())
    }
}

/// Runs every law; the error names the first one broken and how.
pub async fn run_all<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    create_twice_is_already_exists(ds, opts).await.map_err(|e| format!("create_twice_is_already_exists: {e}"))?;
    update_with_stale_revision_conflicts(ds, opts).await.map_err(|e| format!("update_with_stale_revision_conflicts: {e}"))?;
    delete_preconditions_are_enforced(ds, opts).await.map_err(|e| format!("delete_preconditions_are_enforced: {e}"))?;
    missing_objects_are_not_found(ds, opts).await.map_err(|e| format!("missing_objects_are_not_found: {e}"))?;
    soft_delete_then_get_is_not_found(ds, opts).await.map_err(|e| format!("soft_delete_then_get_is_not_found: {e}"))?;
    checked_soft_delete_writes_nothing_unless_all_holds(ds, opts)
        .await
        .map_err(|e| format!("checked_soft_delete_writes_nothing_unless_all_holds: {e}"))?;
    list_returns_every_object(ds, opts).await.map_err(|e| format!("list_returns_every_object: {e}"))?;
    unknown_fields_survive_update(ds, opts).await.map_err(|e| format!("unknown_fields_survive_update: {e}"))?;
    namespaced_objects_travel_as_namespace_slash_name(ds, opts).await.map_err(|e| format!("namespaced_objects_travel_as_namespace_slash_name: {e}"))?;
    Ok(())
}

fn handle_body(name: &str) -> Value {
    json!({
        "apiVersion": crate::model::CALICO_API_VERSION, "kind": "IPAMHandle",
        "metadata": {"name": name},
        "spec": {"handleID": name, "block": {"10.250.0.0/30": 1}, "deleted": false}
    })
}

fn affinity_body(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": crate::model::CALICO_API_VERSION, "kind": "BlockAffinity",
        "metadata": {"name": name},
        "spec": {"state": "confirmed", "node": node, "cidr": "10.250.0.0/30", "deleted": "false"}
    })
}

fn block_body(name: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": crate::model::CALICO_API_VERSION, "kind": "IPAMBlock",
        "metadata": {"name": name},
        "spec": {
            "cidr": cidr, "affinity": "host:conformance-node", "strictAffinity": false,
            "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
            "attributes": [{"handle_id": "conformance-handle", "secondary": {"node": "conformance-node"}}],
            "sequenceNumber": 1, "deleted": false
        }
    })
}

fn expect_kind<T: std::fmt::Debug>(what: &str, got: Result<T, super::DatastoreError>, want: ErrorKind) -> Result<(), String> {
    match got {
        Err(e) if e.kind == want => Ok(()),
        other => Err(format!("{what}: expected {}, got {other:?}", want.category())),
    }
}

async fn cleanup<D: Datastore>(ds: &D, kind: Kind, name: &str) {
    // Best effort: the law under test may already have removed it.
    if let Ok(s) = ds.get(kind, name).await {
        let _ = ds.delete(kind, name, &Precondition { revision: None, uid: Some(s.uid) }).await;
    }
}

async fn create_twice_is_already_exists<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let name = format!("{}create-twice", opts.prefix);
    cleanup(ds, Kind::IpamHandle, &name).await;
    let first = ds.create(Kind::IpamHandle, &name, handle_body(&name)).await.map_err(|e| format!("first create: {e}"))?;
    if first.revision.is_empty() || first.uid.is_empty() || first.name != name {
        return Err(format!("create returned no identity: {first:?}"));
    }
    let second = ds.create(Kind::IpamHandle, &name, handle_body(&name)).await;
    let r = expect_kind("second create", second, ErrorKind::AlreadyExists);
    cleanup(ds, Kind::IpamHandle, &name).await;
    r
}

async fn update_with_stale_revision_conflicts<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let name = format!("{}stale-revision", opts.prefix);
    cleanup(ds, Kind::IpamHandle, &name).await;
    let v1 = ds.create(Kind::IpamHandle, &name, handle_body(&name)).await.map_err(|e| e.to_string())?;
    let mut edit = v1.clone();
    edit.value["spec"]["block"]["10.250.0.0/30"] = json!(2);
    let v2 = ds.update(Kind::IpamHandle, &edit).await.map_err(|e| format!("first update: {e}"))?;
    let result = async {
        if v2.revision == v1.revision || v2.uid != v1.uid {
            return Err(format!("update must change the revision and keep the uid: {v1:?} -> {v2:?}"));
        }
        expect_kind("update with the old revision", ds.update(Kind::IpamHandle, &edit).await, ErrorKind::Conflict)?;
        let got = ds.get(Kind::IpamHandle, &name).await.map_err(|e| e.to_string())?;
        if got.revision != v2.revision || got.value["spec"]["block"]["10.250.0.0/30"] != json!(2) {
            return Err(format!("a conflicting update changed the object: {got:?}"));
        }
        let wrong_uid = Stored { uid: "00000000-dead-beef-0000-000000000000".into(), ..got.clone() };
        expect_kind("update with another uid", ds.update(Kind::IpamHandle, &wrong_uid).await, ErrorKind::Conflict)?;
        Ok(())
    }
    .await;
    cleanup(ds, Kind::IpamHandle, &name).await;
    result
}

async fn delete_preconditions_are_enforced<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let name = format!("{}delete-precondition", opts.prefix);
    cleanup(ds, Kind::IpamHandle, &name).await;
    let v1 = ds.create(Kind::IpamHandle, &name, handle_body(&name)).await.map_err(|e| e.to_string())?;
    let result = async {
        let wrong_uid = Precondition { revision: Some(v1.revision.clone()), uid: Some("00000000-dead-beef-0000-000000000000".into()) };
        expect_kind("delete with another uid", ds.delete(Kind::IpamHandle, &name, &wrong_uid).await, ErrorKind::Conflict)?;
        // A real change: Kubernetes keeps the resourceVersion of a replace that changes nothing.
        let mut edit = v1.clone();
        edit.value["spec"]["block"]["10.250.0.0/30"] = json!(3);
        let v2 = ds.update(Kind::IpamHandle, &edit).await.map_err(|e| e.to_string())?;
        expect_kind("delete with an old revision", ds.delete(Kind::IpamHandle, &name, &v1.exact()).await, ErrorKind::Conflict)?;
        ds.get(Kind::IpamHandle, &name).await.map_err(|e| format!("a failed delete removed the object: {e}"))?;
        ds.delete(Kind::IpamHandle, &name, &v2.exact()).await.map_err(|e| format!("exact delete: {e}"))?;
        expect_kind("get after delete", ds.get(Kind::IpamHandle, &name).await, ErrorKind::NotFound)
    }
    .await;
    cleanup(ds, Kind::IpamHandle, &name).await;
    result
}

async fn missing_objects_are_not_found<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let name = format!("{}never-created", opts.prefix);
    expect_kind("get", ds.get(Kind::IpamHandle, &name).await, ErrorKind::NotFound)?;
    expect_kind("delete", ds.delete(Kind::IpamHandle, &name, &Precondition::default()).await, ErrorKind::NotFound)?;
    let ghost = Stored { name: name.clone(), revision: "1".into(), uid: String::new(), value: handle_body(&name) };
    expect_kind("update", ds.update(Kind::IpamHandle, &ghost).await, ErrorKind::NotFound)
}

async fn soft_delete_then_get_is_not_found<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let (block, cidr) = block_for(opts, "soft-delete-ipamblocks", 1);
    let (affinity, node) = affinity_for(opts, "soft-delete-blockaffinities");
    let handle = format!("{}soft-delete-ipamhandles", opts.prefix);
    for (kind, name, body) in [
        (Kind::IpamBlock, block.clone(), block_body(&block, &cidr)),
        (Kind::BlockAffinity, affinity.clone(), affinity_body(&affinity, &node)),
        (Kind::IpamHandle, handle.clone(), handle_body(&handle)),
    ] {
        cleanup(ds, kind, &name).await;
        let created = ds.create(kind, &name, body).await.map_err(|e| format!("{}: {e}", kind.plural()))?;
        ds.soft_delete(kind, &created).await.map_err(|e| format!("soft delete {}: {e}", kind.plural()))?;
        expect_kind(&format!("get {} after soft delete", kind.plural()), ds.get(kind, &name).await, ErrorKind::NotFound)?;
    }
    // A writer that marked a block deleted and died before deleting it: readers finish the job.
    let (name, cidr) = block_for(opts, "half-deleted-block", 2);
    cleanup(ds, Kind::IpamBlock, &name).await;
    let created = ds.create(Kind::IpamBlock, &name, block_body(&name, &cidr)).await.map_err(|e| e.to_string())?;
    let marked = mark_deleted(Kind::IpamBlock, &created).map_err(|e| e.to_string())?;
    ds.update(Kind::IpamBlock, &marked).await.map_err(|e| format!("mark: {e}"))?;
    let r = expect_kind("get of a soft-deleted block", ds.get(Kind::IpamBlock, &name).await, ErrorKind::NotFound);
    cleanup(ds, Kind::IpamBlock, &name).await;
    r
}

/// `soft_delete_if` changes nothing when any check fails (a field, the revision, the uid), says
/// `Conflict`, and soft-deletes when every check holds; a missing object is `NotFound`.
async fn checked_soft_delete_writes_nothing_unless_all_holds<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let name = format!("{}checked-delete", opts.prefix);
    cleanup(ds, Kind::IpamHandle, &name).await;
    let created = ds.create(Kind::IpamHandle, &name, handle_body(&name)).await.map_err(|e| format!("create: {e}"))?;
    let none = Precondition::default();
    let other_count = [Expect::spec("block", json!({"10.250.0.0/30": 2}))];
    let missing_field = [Expect::spec("noSuchField", json!(1))];
    let stale = Precondition { revision: Some(format!("{}9", created.revision)), uid: None };
    let other_uid = Precondition { revision: None, uid: Some("00000000-0000-4000-8000-0000000fffff".into()) };
    for (what, pre, expect) in
        [("another count", &none, &other_count[..]), ("a missing field", &none, &missing_field[..]), ("a stale revision", &stale, &[]), ("another uid", &other_uid, &[])]
    {
        expect_kind(what, ds.soft_delete_if(Kind::IpamHandle, &name, pre, expect).await, ErrorKind::Conflict)?;
        let now = ds.get(Kind::IpamHandle, &name).await.map_err(|e| format!("get after {what}: {e}"))?;
        if now.revision != created.revision || now.is_soft_deleted() {
            return Err(format!("a failed check ({what}) wrote: {now:?}"));
        }
    }
    // Every check at once, one of them into a key that holds a `/`.
    let entry = Expect { pointer: format!("/spec/block/{}", super::pointer_token("10.250.0.0/30")), value: json!(1) };
    let all = [Expect::spec("block", json!({"10.250.0.0/30": 1})), entry, Expect::spec("handleID", json!(name))];
    ds.soft_delete_if(Kind::IpamHandle, &name, &created.exact(), &all).await.map_err(|e| format!("checked delete: {e}"))?;
    expect_kind("get after the checked delete", ds.get(Kind::IpamHandle, &name).await, ErrorKind::NotFound)?;
    expect_kind("checked delete of a missing object", ds.soft_delete_if(Kind::IpamHandle, &name, &none, &[]).await, ErrorKind::NotFound)?;
    // A check of an array with nulls in it (a block's free ordinals), which some apiservers
    // cannot compare: refused while an address is allocated, done once none is.
    let (block, cidr) = block_for(opts, "checked-delete-block", 3);
    cleanup(ds, Kind::IpamBlock, &block).await;
    ds.create(Kind::IpamBlock, &block, block_body(&block, &cidr)).await.map_err(|e| format!("create block: {e}"))?;
    let empty = [Expect::spec("allocations", json!([null, null, null, null]))];
    expect_kind("checked delete of a block in use", ds.soft_delete_if(Kind::IpamBlock, &block, &none, &empty).await, ErrorKind::Conflict)?;
    let held = [Expect::spec("allocations", json!([0, null, null, null]))];
    ds.soft_delete_if(Kind::IpamBlock, &block, &none, &held).await.map_err(|e| format!("checked delete of a block: {e}"))?;
    expect_kind("get of the deleted block", ds.get(Kind::IpamBlock, &block).await, ErrorKind::NotFound)?;
    // An affinity's mark is the string the v1 CRD wants.
    let (affinity, node) = affinity_for(opts, "checked-delete-affinity");
    cleanup(ds, Kind::BlockAffinity, &affinity).await;
    ds.create(Kind::BlockAffinity, &affinity, affinity_body(&affinity, &node)).await.map_err(|e| format!("create affinity: {e}"))?;
    ds.soft_delete_if(Kind::BlockAffinity, &affinity, &none, &[]).await.map_err(|e| format!("affinity: {e}"))?;
    expect_kind("get of the deleted affinity", ds.get(Kind::BlockAffinity, &affinity).await, ErrorKind::NotFound)
}

/// A namespaced policy is `<namespace>/<name>` in every call and in lists; the namespace is
/// `default`, which every Kubernetes cluster has.
async fn namespaced_objects_travel_as_namespace_slash_name<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let own = format!("{}namespaced", opts.prefix);
    let name = format!("default/{own}");
    cleanup(ds, Kind::StagedNetworkPolicy, &name).await;
    let body = json!({
        "apiVersion": crate::model::CALICO_API_VERSION, "kind": "StagedNetworkPolicy",
        "metadata": {"name": own, "namespace": "default", "labels": {"conformance": "yes"}},
        "spec": {"selector": "all()", "order": 5}
    });
    let created = ds.create(Kind::StagedNetworkPolicy, &name, body).await.map_err(|e| format!("create: {e}"))?;
    let result = async {
        if created.name != name || created.value["metadata"]["name"] != json!(own) || created.value["metadata"]["namespace"] != "default" {
            return Err(format!("created as {:?}: {}", created.name, created.value["metadata"]));
        }
        let got = ds.get(Kind::StagedNetworkPolicy, &name).await.map_err(|e| format!("get: {e}"))?;
        if got.revision != created.revision || got.value["metadata"]["labels"]["conformance"] != "yes" {
            return Err(format!("get disagrees with create: {got:?}"));
        }
        let listed = ds.list(Kind::StagedNetworkPolicy).await.map_err(|e| e.to_string())?;
        if !listed.iter().any(|s| s.name == name && s.revision == created.revision) {
            return Err(format!("{name} missing from the list: {:?}", listed.iter().map(|s| &s.name).collect::<Vec<_>>()));
        }
        expect_kind("get in another namespace", ds.get(Kind::StagedNetworkPolicy, &format!("other-{}/{own}", opts.prefix.trim_end_matches('-'))).await, ErrorKind::NotFound)?;
        ds.delete(Kind::StagedNetworkPolicy, &name, &got.exact()).await.map_err(|e| format!("delete: {e}"))?;
        expect_kind("get after delete", ds.get(Kind::StagedNetworkPolicy, &name).await, ErrorKind::NotFound)
    }
    .await;
    cleanup(ds, Kind::StagedNetworkPolicy, &name).await;
    result
}

async fn list_returns_every_object<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let affinities: Vec<(String, String)> = (0..3).map(|i| affinity_for(opts, &format!("list-{i}"))).collect();
    let names: Vec<String> = affinities.iter().map(|(n, _)| n.clone()).collect();
    for (n, node) in &affinities {
        cleanup(ds, Kind::BlockAffinity, n).await;
        ds.create(Kind::BlockAffinity, n, affinity_body(n, node)).await.map_err(|e| e.to_string())?;
    }
    let result = async {
        let listed = ds.list(Kind::BlockAffinity).await.map_err(|e| e.to_string())?;
        for n in &names {
            let Some(s) = listed.iter().find(|s| s.name == *n) else {
                return Err(format!("{n} missing from list"));
            };
            let fresh = ds.get(Kind::BlockAffinity, n).await.map_err(|e| e.to_string())?;
            if s.revision != fresh.revision || s.uid != fresh.uid {
                return Err(format!("list and get disagree on {n}: {s:?} vs {fresh:?}"));
            }
        }
        let other = ds.list(Kind::IpamHandle).await.map_err(|e| e.to_string())?;
        if other.iter().any(|s| names.contains(&s.name)) {
            return Err("list of another kind returned these objects".into());
        }
        Ok(())
    }
    .await;
    for n in &names {
        cleanup(ds, Kind::BlockAffinity, n).await;
    }
    result
}

async fn unknown_fields_survive_update<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let (name, cidr) = block_for(opts, "unknown-fields", 3);
    cleanup(ds, Kind::IpamBlock, &name).await;
    let mut body = block_body(&name, &cidr);
    body["metadata"]["labels"] = json!({"conformance.example/label": "kept"});
    body["metadata"]["annotations"] = json!({"conformance.example/note": "kept"});
    if opts.unknown_spec_fields {
        body["spec"]["futureField"] = json!({"nested": [1, 2]});
        body["spec"]["attributes"][0]["futureAttr"] = json!(true);
    }
    let created = ds.create(Kind::IpamBlock, &name, body).await.map_err(|e| e.to_string())?;
    let result = async {
        // Round-trip through the typed model, as the GC does, and write it back.
        let mut block: crate::model::IpamBlock = created.decode().map_err(|e| e.to_string())?;
        block.spec.sequence_number += 1;
        let edited = created.with_value(&block).map_err(|e| e.to_string())?;
        ds.update(Kind::IpamBlock, &edited).await.map_err(|e| format!("update: {e}"))?;
        let got = ds.get(Kind::IpamBlock, &name).await.map_err(|e| e.to_string())?;
        let v = &got.value;
        if opts.ipam_metadata && (v["metadata"]["labels"]["conformance.example/label"] != "kept" || v["metadata"]["annotations"]["conformance.example/note"] != "kept") {
            return Err(format!("metadata lost: {}", v["metadata"]));
        }
        if v["spec"]["sequenceNumber"] != json!(2) {
            return Err(format!("the update did not land: {}", v["spec"]));
        }
        if opts.unknown_spec_fields && (v["spec"]["futureField"] != json!({"nested": [1, 2]}) || v["spec"]["attributes"][0]["futureAttr"] != json!(true)) {
            return Err(format!("unknown spec fields lost: {}", v["spec"]));
        }
        Ok(())
    }
    .await;
    cleanup(ds, Kind::IpamBlock, &name).await;
    result
}

/// Runs every watch law; the error names the first one broken and how. Objects of other
/// writers (a shared cluster) are ignored: only names under the prefix are checked.
pub async fn run_watch<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    initial_list_matches_list(ds, opts).await.map_err(|e| format!("initial_list_matches_list: {e}"))?;
    changes_arrive_as_apply_apply_delete(ds, opts).await.map_err(|e| format!("changes_arrive_as_apply_apply_delete: {e}"))?;
    a_later_watch_lists_earlier_changes(ds, opts).await.map_err(|e| format!("a_later_watch_lists_earlier_changes: {e}"))?;
    Ok(())
}

async fn next_event(stream: &mut WatchStream) -> Result<WatchEvent, String> {
    stream.next().await.ok_or_else(|| "the watch stream ended".to_string())
}

/// The objects under `prefix` in the stream's first complete list. Transient errors are
/// skipped (the backend retries); a list that starts over is read again from its `Init`.
async fn first_list(stream: &mut WatchStream, prefix: &str) -> Result<Vec<Stored>, String> {
    let mut listed = None;
    loop {
        match next_event(stream).await? {
            WatchEvent::Init => listed = Some(Vec::new()),
            WatchEvent::InitApply(s) => match listed.as_mut() {
                Some(l) if s.name.starts_with(prefix) => l.push(s),
                Some(_) => {}
                None => return Err(format!("InitApply of {} before Init", s.name)),
            },
            WatchEvent::InitDone => return listed.ok_or_else(|| "InitDone before Init".to_string()),
            WatchEvent::Error(f) if f.refused.is_none() => {}
            WatchEvent::Resumed => {}
            other => return Err(format!("unexpected event during the first list: {other:?}")),
        }
    }
}

fn identities(objects: &[Stored]) -> Vec<(String, String, String)> {
    let mut ids: Vec<_> = objects.iter().map(|s| (s.name.clone(), s.revision.clone(), s.uid.clone())).collect();
    ids.sort();
    ids
}

async fn initial_list_matches_list<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let prefix = format!("{}watch-list-", opts.prefix);
    let names: Vec<String> = (0..2).map(|i| format!("{prefix}{i}")).collect();
    for n in &names {
        cleanup(ds, Kind::IpamHandle, n).await;
        ds.create(Kind::IpamHandle, n, handle_body(n)).await.map_err(|e| e.to_string())?;
    }
    let result = async {
        let listed: Vec<Stored> = ds.list(Kind::IpamHandle).await.map_err(|e| e.to_string())?.into_iter().filter(|s| s.name.starts_with(&prefix)).collect();
        let mut stream = ds.watch(Kind::IpamHandle);
        let watched = first_list(&mut stream, &prefix).await?;
        if identities(&watched) != identities(&listed) || listed.len() != names.len() {
            return Err(format!("the watch listed {:?}, list() {:?}", identities(&watched), identities(&listed)));
        }
        if let Some(s) = watched.iter().find(|s| s.value["spec"]["handleID"] != json!(s.name)) {
            return Err(format!("{} listed without its body: {}", s.name, s.value));
        }
        Ok(())
    }
    .await;
    for n in &names {
        cleanup(ds, Kind::IpamHandle, n).await;
    }
    result
}

async fn changes_arrive_as_apply_apply_delete<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let name = format!("{}watch-changes", opts.prefix);
    cleanup(ds, Kind::IpamHandle, &name).await;
    let mut stream = ds.watch(Kind::IpamHandle);
    first_list(&mut stream, &name).await?;
    let created = ds.create(Kind::IpamHandle, &name, handle_body(&name)).await.map_err(|e| format!("create: {e}"))?;
    let mut edit = created.clone();
    edit.value["spec"]["block"]["10.250.0.0/30"] = json!(2);
    let updated = ds.update(Kind::IpamHandle, &edit).await.map_err(|e| format!("update: {e}"));
    let updated = match updated {
        Ok(u) => u,
        Err(e) => {
            cleanup(ds, Kind::IpamHandle, &name).await;
            return Err(e);
        }
    };
    ds.delete(Kind::IpamHandle, &name, &updated.exact()).await.map_err(|e| format!("delete: {e}"))?;
    let mut seen = Vec::new();
    while !matches!(seen.last(), Some(WatchEvent::Delete(_))) {
        match next_event(&mut stream).await? {
            WatchEvent::Apply(s) | WatchEvent::Delete(s) if s.name != name => {}
            e @ (WatchEvent::Apply(_) | WatchEvent::Delete(_)) => seen.push(e),
            WatchEvent::Error(f) if f.refused.is_none() => {}
            // The watch (re)established: no change, and nothing missed.
            WatchEvent::Resumed => {}
            other => return Err(format!("unexpected event while watching changes: {other:?}")),
        }
    }
    match seen.as_slice() {
        [WatchEvent::Apply(a), WatchEvent::Apply(b), WatchEvent::Delete(d)]
            if a.revision == created.revision && b.revision == updated.revision && d.uid == created.uid && b.value["spec"]["block"]["10.250.0.0/30"] == json!(2) =>
        {
            Ok(())
        }
        _ => Err(format!("expected Apply@{} Apply@{} Delete, got {seen:?}", created.revision, updated.revision)),
    }
}

async fn a_later_watch_lists_earlier_changes<D: Datastore>(ds: &D, opts: &Options) -> Result<(), String> {
    let prefix = format!("{}watch-later-", opts.prefix);
    let (kept, gone) = (format!("{prefix}kept"), format!("{prefix}gone"));
    for n in [&kept, &gone] {
        cleanup(ds, Kind::IpamHandle, n).await;
    }
    let result = async {
        let k = ds.create(Kind::IpamHandle, &kept, handle_body(&kept)).await.map_err(|e| e.to_string())?;
        let g = ds.create(Kind::IpamHandle, &gone, handle_body(&gone)).await.map_err(|e| e.to_string())?;
        let mut edit = k.clone();
        edit.value["spec"]["block"]["10.250.0.0/30"] = json!(3);
        let k2 = ds.update(Kind::IpamHandle, &edit).await.map_err(|e| e.to_string())?;
        ds.delete(Kind::IpamHandle, &gone, &g.exact()).await.map_err(|e| e.to_string())?;
        let mut stream = ds.watch(Kind::IpamHandle);
        let listed = first_list(&mut stream, &prefix).await?;
        match listed.as_slice() {
            [s] if s.name == kept && s.revision == k2.revision && s.value["spec"]["block"]["10.250.0.0/30"] == json!(3) => Ok(()),
            _ => Err(format!("expected only {kept}@{}, the watch listed {:?}", k2.revision, identities(&listed))),
        }
    }
    .await;
    for n in [&kept, &gone] {
        cleanup(ds, Kind::IpamHandle, n).await;
    }
    result
}
