//! The policy-name migration (SPEC §6.8), pure: which stored policies of the `default` tier still
//! carry a pre-3.32 name (`default.<name>`), the object each is re-keyed to, whether an object
//! already under the new name is the same policy, and whether the `calico-node` DaemonSet is
//! rolled out (the gate before any rename).
//!
//! Owns: the name rules (the v3 name from the `projectcalico.org/metadata` annotation, else the
//! stored name without its `default.` prefix), the copy (spec, labels and annotations as stored,
//! no identity fields), the same-policy check, the plan of one round over a kind's list, and the
//! rollout rule.
//! Must not: touch a datastore, the network or the clock; delete anything itself. The shell
//! (`runtime::migrator`) executes a plan: it creates the new object, re-reads it when the name is
//! taken, and deletes the old one only when the new one holds the same policy.
//!
//! Upstream differs on purpose here: it takes an AlreadyExists on the create as success even when
//! the object under the new name is another policy, and then deletes the old one, losing it. We
//! keep both, and say so.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::datastore::{Kind, Stored};

/// The kinds whose default-tier objects are re-keyed, in the order a round visits them.
pub const KINDS: [Kind; 4] = [Kind::NetworkPolicy, Kind::GlobalNetworkPolicy, Kind::StagedNetworkPolicy, Kind::StagedGlobalNetworkPolicy];

/// Where Calico keeps a policy's v3 metadata on its v1 CRD object (JSON with a `name` field).
pub const METADATA_ANNOTATION: &str = "projectcalico.org/metadata";
/// The tier whose policies pre-3.32 Calico stored as `default.<name>`.
pub const DEFAULT_TIER: &str = "default";
const DEFAULT_PREFIX: &str = "default.";
/// Kubernetes' longest object name (a DNS subdomain).
const MAX_NAME: usize = 253;

/// What a round decided for one old-named policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing holds the new name: create `body` there, then delete the old object.
    Create(Rename),
    /// The new name already holds the same policy (a round cut short, or another migrator): only
    /// the old object is deleted.
    DeleteOld(Rename),
    /// The new name holds a different policy: both are kept and the conflict reported.
    KeepBoth(Rename),
}

impl Step {
    pub fn rename(&self) -> &Rename {
        match self {
            Step::Create(r) | Step::DeleteOld(r) | Step::KeepBoth(r) => r,
        }
    }
}

/// One old-named policy and what it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Rename {
    pub kind: Kind,
    /// The stored object (its name is the datastore name, `<namespace>/<name>` when namespaced):
    /// deleted under exactly its revision and uid.
    pub old: Stored,
    /// The datastore name it is re-keyed to.
    pub new_name: String,
    /// The object to create under `new_name`.
    pub body: Value,
}

/// A stored policy that needs re-keying but cannot be: its v3 name is no usable object name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    pub name: String,
    pub why: String,
}

/// One round's plan for one kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub unusable: Vec<Unusable>,
    /// Old-named policies whose new name is held by another old-named policy that moves away
    /// first (a chain such as `default.default.a` -> `default.a` -> `a`): re-keyed in a later
    /// round, once the name is free; a cycle of such names is never touched.
    pub deferred: Vec<Rename>,
}

impl Plan {
    /// Steps that write (creates and deletes); a plan without any has nothing left to do.
    pub fn writes(&self) -> usize {
        self.steps.iter().filter(|s| !matches!(s, Step::KeepBoth(_))).count()
    }
    pub fn conflicts(&self) -> impl Iterator<Item = &Rename> {
        self.steps.iter().filter_map(|s| match s {
            Step::KeepBoth(r) => Some(r),
            _ => None,
        })
    }
}

/// How one old-named policy ended in a round: the `outcome` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Created under the new name, the old one deleted.
    Migrated,
    /// The new name already held the same policy; the old one deleted.
    AlreadyMigrated,
    /// The new name holds a different policy: both kept.
    Conflict,
    /// A write failed (or the old object changed under us); tried again next round.
    Failed,
    /// The v3 name is no usable object name: left alone.
    Unusable,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [Outcome::Migrated, Outcome::AlreadyMigrated, Outcome::Conflict, Outcome::Failed, Outcome::Unusable];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Migrated => "migrated",
            Outcome::AlreadyMigrated => "already_migrated",
            Outcome::Conflict => "conflict",
            Outcome::Failed => "failed",
            Outcome::Unusable => "unusable",
        }
    }
}

fn metadata(body: &Value) -> &Value {
    &body["metadata"]
}

/// The object's own name and namespace, from its datastore name (namespaced kinds carry
/// `<namespace>/<name>` there).
fn split_name(kind: Kind, name: &str) -> (Option<&str>, &str) {
    match name.split_once('/').filter(|_| kind.namespaced()) {
        Some((ns, own)) => (Some(ns), own),
        None => (None, name),
    }
}

/// Whether the policy is in the `default` tier (`spec.tier` empty or absent counts as default).
pub fn in_default_tier(body: &Value) -> bool {
    match &body["spec"]["tier"] {
        Value::Null => true,
        Value::String(t) => t.is_empty() || t == DEFAULT_TIER,
        _ => false,
    }
}

/// The v3 name of a stored policy whose own (stored) name is `stored`: the `name` of the
/// `projectcalico.org/metadata` annotation when it carries one, else `stored` without a leading
/// `default.`.
pub fn v3_name(stored: &str, body: &Value) -> String {
    let annotated = metadata(body)["annotations"][METADATA_ANNOTATION]
        .as_str()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|m| m["name"].as_str().filter(|n| !n.is_empty()).map(str::to_string));
    annotated.unwrap_or_else(|| stored.strip_prefix(DEFAULT_PREFIX).unwrap_or(stored).to_string())
}

/// Why `name` cannot be an object name, if it cannot (a DNS subdomain, as Kubernetes and the
/// etcd key layout both accept it).
fn unusable_name(name: &str) -> Option<String> {
    let label_ok = |l: &str| {
        !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
    };
    if name.is_empty() {
        Some("the new name is empty".into())
    } else if name.len() > MAX_NAME {
        Some(format!("the new name is longer than {MAX_NAME} characters"))
    } else if !name.split('.').all(label_ok) {
        Some(format!("the new name {name:?} is not a valid object name"))
    } else {
        None
    }
}

/// The datastore name `stored` (a policy of `kind`) is re-keyed to, `None` when it needs no
/// migration (another tier, or already under its v3 name, or being deleted), `Err` when it
/// needs one but its v3 name is no usable object name.
pub fn new_name(kind: Kind, stored: &Stored) -> Option<Result<String, String>> {
    let body = &stored.value;
    if !in_default_tier(body) || !metadata(body)["deletionTimestamp"].is_null() {
        // A policy being deleted is left to finish; re-keying it would resurrect it.
        return None;
    }
    let (namespace, own) = split_name(kind, &stored.name);
    let v3 = v3_name(own, body);
    if v3 == own {
        return None;
    }
    if let Some(why) = unusable_name(&v3) {
        return Some(Err(why));
    }
    Some(Ok(match namespace {
        Some(ns) => format!("{ns}/{v3}"),
        None => v3,
    }))
}

/// The object to create under `new_name`: the stored spec, labels and annotations, without any
/// identity field (uid, resourceVersion, creation time, generation, managed fields, owners).
pub fn renamed_body(kind: Kind, stored: &Stored, new_name: &str) -> Value {
    let (namespace, own) = split_name(kind, new_name);
    let old_meta = metadata(&stored.value);
    let mut meta = Map::new();
    meta.insert("name".into(), Value::String(own.to_string()));
    if let Some(ns) = namespace {
        meta.insert("namespace".into(), Value::String(ns.to_string()));
    }
    for field in ["labels", "annotations"] {
        if let Some(v) = old_meta.get(field).filter(|v| v.as_object().is_some_and(|m| !m.is_empty())) {
            meta.insert(field.into(), v.clone());
        }
    }
    if own.starts_with(DEFAULT_PREFIX) {
        // A v3 name that itself starts with `default.` would read as a pre-3.32 name again and be
        // re-keyed a second time: the copy names itself in the annotation, so it stays put.
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        let mut v3_meta = annotations[METADATA_ANNOTATION].as_str().and_then(|t| serde_json::from_str::<Value>(t).ok()).filter(Value::is_object).unwrap_or_else(|| json!({}));
        v3_meta["name"] = Value::String(own.to_string());
        annotations[METADATA_ANNOTATION] = Value::String(v3_meta.to_string());
    }
    let mut body = json!({"apiVersion": stored.value["apiVersion"].clone(), "kind": kind.kind_name(), "metadata": meta});
    if body["apiVersion"].is_null() {
        body["apiVersion"] = json!(crate::model::CALICO_API_VERSION);
    }
    if let Some(spec) = stored.value.get("spec") {
        body["spec"] = spec.clone();
    }
    body
}

/// The spec with the tier spelled out (an empty or absent tier is `default`), so that a copy
/// written by another migrator that filled the tier in still counts as the same policy.
fn normalized_spec(body: &Value) -> Value {
    let mut spec = body.get("spec").cloned().unwrap_or(Value::Null);
    if in_default_tier(body) {
        if let Some(map) = spec.as_object_mut() {
            map.insert("tier".into(), Value::String(DEFAULT_TIER.into()));
        } else if spec.is_null() {
            spec = json!({"tier": DEFAULT_TIER});
        }
    }
    spec
}

/// Whether two stored objects hold the same policy: the same spec, tier spelled out. Labels and
/// annotations do not count (the v3 name annotation differs by design).
pub fn same_policy(a: &Value, b: &Value) -> bool {
    normalized_spec(a) == normalized_spec(b)
}

/// One round over every stored object of `kind` (a whole list): the old-named policies and
/// what becomes of each, in name order. A new name is judged only against a policy that stays
/// where it is: one held by another old-named policy is deferred (never compared with a policy
/// about to move, never reused in the round that vacates it), and two old objects that map onto
/// one new name are judged in order, the second against the first's copy, so it is never written
/// over.
pub fn plan(kind: Kind, objects: &[Stored]) -> Plan {
    let mut present: BTreeMap<String, Value> = objects.iter().map(|o| (o.name.clone(), o.value.clone())).collect();
    let moving: std::collections::BTreeSet<&str> = objects.iter().filter(|o| matches!(new_name(kind, o), Some(Ok(_)))).map(|o| o.name.as_str()).collect();
    let mut sorted: Vec<&Stored> = objects.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Plan::default();
    for stored in sorted {
        let new = match new_name(kind, stored) {
            None => continue,
            Some(Err(why)) => {
                out.unusable.push(Unusable { name: stored.name.clone(), why });
                continue;
            }
            Some(Ok(n)) => n,
        };
        let body = renamed_body(kind, stored, &new);
        let rename = Rename { kind, old: stored.clone(), new_name: new.clone(), body };
        if moving.contains(new.as_str()) {
            out.deferred.push(rename);
            continue;
        }
        let step = match present.get(&new) {
            None => {
                present.insert(new, rename.body.clone());
                Step::Create(rename)
            }
            // Being deleted: deleting the old one now would lose both once it is gone.
            Some(e) if !metadata(e)["deletionTimestamp"].is_null() => {
                out.deferred.push(rename);
                continue;
            }
            Some(e) if same_policy(e, &stored.value) => Step::DeleteOld(rename),
            Some(_) => Step::KeepBoth(rename),
        };
        out.steps.push(step);
    }
    out
}

/// Whether the DaemonSet (its whole object) is fully rolled out, as upstream judges it: the
/// controller saw the latest generation, and every desired pod is scheduled, updated and
/// available, none misscheduled. `Err` says what is missing.
pub fn rolled_out(daemonset: &Value) -> Result<(), String> {
    let num = |v: &Value| v.as_i64().unwrap_or(0);
    let status = &daemonset["status"];
    let generation = num(&daemonset["metadata"]["generation"]);
    let observed = num(&status["observedGeneration"]);
    if observed < generation || status.is_null() {
        return Err(format!("its controller has not observed generation {generation} yet (observed {observed})"));
    }
    let desired = num(&status["desiredNumberScheduled"]);
    let current = num(&status["currentNumberScheduled"]);
    let updated = num(&status["updatedNumberScheduled"]);
    let unavailable = num(&status["numberUnavailable"]);
    let misscheduled = num(&status["numberMisscheduled"]);
    if current != desired {
        return Err(format!("{current} of {desired} pods scheduled"));
    }
    if updated != desired {
        return Err(format!("{updated} of {desired} pods updated"));
    }
    if unavailable != 0 {
        return Err(format!("{unavailable} pods unavailable"));
    }
    if misscheduled != 0 {
        return Err(format!("{misscheduled} pods misscheduled"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(name: &str, tier: Option<&str>, order: i64) -> Stored {
        let (ns, own) = name.split_once('/').map_or((None, name), |(n, o)| (Some(n), o));
        let mut meta = json!({"name": own, "resourceVersion": "7", "uid": format!("uid-{name}"), "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 2, "labels": {"app": "web"}});
        if let Some(ns) = ns {
            meta["namespace"] = json!(ns);
        }
        let mut spec = json!({"order": order, "selector": "all()"});
        if let Some(t) = tier {
            spec["tier"] = json!(t);
        }
        Stored { name: name.into(), revision: "7".into(), uid: format!("uid-{name}"), value: json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}) }
    }

    fn annotated(mut s: Stored, v3: &str) -> Stored {
        s.value["metadata"]["annotations"] = json!({METADATA_ANNOTATION: json!({"name": v3}).to_string()});
        s
    }

    #[test]
    fn name_rules_of_the_default_tier() {
        let kind = Kind::NetworkPolicy;
        let cases: Vec<(Stored, Option<Result<String, String>>)> = vec![
            (policy("ns/default.web", None, 1), Some(Ok("ns/web".into()))),
            (policy("ns/default.web", Some(""), 1), Some(Ok("ns/web".into()))),
            (policy("ns/default.web", Some("default"), 1), Some(Ok("ns/web".into()))),
            (policy("ns/web", None, 1), None),
            // Other tiers keep their `<tier>.` names.
            (policy("ns/security.web", Some("security"), 1), None),
            (policy("ns/default.web", Some("security"), 1), None),
            // The annotation names the v3 name, whatever the stored name.
            (annotated(policy("ns/default.web", None, 1), "frontend"), Some(Ok("ns/frontend".into()))),
            (annotated(policy("ns/default.web", None, 1), "default.web"), None),
            (annotated(policy("ns/web", None, 1), "web"), None),
            // Only a leading prefix is stripped, once.
            (policy("ns/default.default.web", None, 1), Some(Ok("ns/default.web".into()))),
            (policy("ns/my.default.web", None, 1), None),
        ];
        for (stored, want) in cases {
            assert_eq!(new_name(kind, &stored), want, "{}: {}", stored.name, stored.value);
        }
        assert!(matches!(new_name(kind, &annotated(policy("ns/default.web", None, 1), "Bad_Name")), Some(Err(_))));
        // Cluster-wide kinds have no namespace part.
        assert_eq!(new_name(Kind::GlobalNetworkPolicy, &policy("default.deny", None, 1)), Some(Ok("deny".into())));
        // A policy being deleted is left alone.
        let mut going = policy("ns/default.web", None, 1);
        going.value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        assert_eq!(new_name(kind, &going), None);
    }

    #[test]
    fn the_copy_keeps_spec_labels_and_annotations_and_drops_identity() {
        let old = annotated(policy("ns/default.web", None, 5), "web");
        let body = renamed_body(Kind::NetworkPolicy, &old, "ns/web");
        assert_eq!(body["metadata"], json!({"name": "web", "namespace": "ns", "labels": {"app": "web"}, "annotations": old.value["metadata"]["annotations"]}));
        assert_eq!(body["spec"], old.value["spec"]);
        assert_eq!((body["kind"].as_str(), body["apiVersion"].as_str()), (Some("NetworkPolicy"), Some("crd.projectcalico.org/v1")));
        let global = renamed_body(Kind::GlobalNetworkPolicy, &policy("default.deny", None, 1), "deny");
        assert_eq!(global["metadata"], json!({"name": "deny", "labels": {"app": "web"}}));
        assert_eq!(global["kind"], "GlobalNetworkPolicy");
        // A v3 name starting with `default.` is written down, so the copy is not re-keyed again.
        let doubled = policy("ns/default.default.web", None, 1);
        let copy = renamed_body(Kind::NetworkPolicy, &doubled, "ns/default.web");
        let copy = Stored { name: "ns/default.web".into(), value: copy, ..doubled };
        assert_eq!(v3_name("default.web", &copy.value), "default.web");
        assert_eq!(new_name(Kind::NetworkPolicy, &copy), None);
    }

    #[test]
    fn same_policy_compares_specs_with_the_tier_spelled_out() {
        let a = policy("ns/default.web", None, 1);
        let b = policy("ns/web", Some("default"), 1);
        assert!(same_policy(&a.value, &b.value));
        assert!(!same_policy(&a.value, &policy("ns/web", None, 2).value));
        assert!(!same_policy(&a.value, &policy("ns/web", Some("security"), 1).value));
        let mut relabelled = a.clone();
        relabelled.value["metadata"]["labels"] = json!({"other": "x"});
        assert!(same_policy(&a.value, &relabelled.value), "labels are no part of the policy");
    }

    #[test]
    fn a_round_creates_deletes_or_keeps_both() {
        let objects = vec![
            policy("ns/default.a", None, 1),
            policy("ns/default.b", None, 1),
            policy("ns/b", None, 1),
            policy("ns/default.c", None, 1),
            policy("ns/c", None, 9),
            policy("ns/d", None, 1),
            policy("ns/sec.e", Some("sec"), 1),
            annotated(policy("ns/default.x", None, 1), "Bad_Name"),
        ];
        let p = plan(Kind::NetworkPolicy, &objects);
        let summary: Vec<(&str, &str, &str)> = p
            .steps
            .iter()
            .map(|s| {
                let what = match s {
                    Step::Create(_) => "create",
                    Step::DeleteOld(_) => "delete-old",
                    Step::KeepBoth(_) => "keep-both",
                };
                (what, s.rename().old.name.as_str(), s.rename().new_name.as_str())
            })
            .collect();
        assert_eq!(summary, [("create", "ns/default.a", "ns/a"), ("delete-old", "ns/default.b", "ns/b"), ("keep-both", "ns/default.c", "ns/c")]);
        assert_eq!(p.unusable.len(), 1);
        assert_eq!(p.writes(), 2);
        assert_eq!(p.conflicts().count(), 1);
        // The same policy under the new name, but being deleted: the old one is kept for now.
        let mut going = policy("ns/b", None, 1);
        going.value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let p = plan(Kind::NetworkPolicy, &[policy("ns/default.b", None, 1), going]);
        assert!(p.steps.is_empty() && p.deferred.len() == 1, "{:?}", p.steps.len());
    }

    #[test]
    fn two_old_names_for_one_new_name_never_write_over_each_other() {
        let objects = vec![policy("ns/default.a", None, 1), annotated(policy("ns/default.z", None, 2), "a"), annotated(policy("ns/default.y", None, 1), "a")];
        let p = plan(Kind::NetworkPolicy, &objects);
        let kinds: Vec<_> = p.steps.iter().map(|s| (std::mem::discriminant(s), s.rename().old.name.clone())).collect();
        assert_eq!(kinds.len(), 3);
        assert!(matches!(p.steps[0], Step::Create(_)));
        assert!(matches!(p.steps[1], Step::DeleteOld(_)), "default.y holds the same policy as the copy of default.a");
        assert!(matches!(p.steps[2], Step::KeepBoth(_)), "default.z differs");
    }

    #[test]
    fn a_new_name_held_by_a_policy_that_moves_itself_waits_for_a_later_round() {
        // A chain: default.default.a -> default.a -> a.
        let chain = vec![policy("ns/default.a", None, 1), policy("ns/default.default.a", None, 2)];
        let p = plan(Kind::NetworkPolicy, &chain);
        assert!(matches!(&p.steps[..], [Step::Create(r)] if r.new_name == "ns/a"), "{p:?}");
        assert_eq!(p.deferred.iter().map(|r| r.old.name.as_str()).collect::<Vec<_>>(), ["ns/default.default.a"]);
        // A swap of two annotated names is never touched (either order would lose one of them).
        let swap = vec![annotated(policy("ns/a", None, 1), "c"), annotated(policy("ns/c", None, 1), "a")];
        let p = plan(Kind::NetworkPolicy, &swap);
        assert_eq!((p.writes(), p.deferred.len()), (0, 2));
    }

    #[test]
    fn the_gate_is_a_finished_rollout() {
        let ds = |generation: i64, observed: i64, desired: i64, current: i64, updated: i64, unavailable: i64, mis: i64| {
            json!({"metadata": {"generation": generation}, "status": {"observedGeneration": observed, "desiredNumberScheduled": desired, "currentNumberScheduled": current,
                "updatedNumberScheduled": updated, "numberUnavailable": unavailable, "numberMisscheduled": mis}})
        };
        assert_eq!(rolled_out(&ds(3, 3, 2, 2, 2, 0, 0)), Ok(()));
        assert!(rolled_out(&ds(3, 2, 2, 2, 2, 0, 0)).unwrap_err().contains("generation 3"));
        assert!(rolled_out(&ds(3, 3, 2, 1, 1, 0, 0)).unwrap_err().contains("1 of 2 pods scheduled"));
        assert!(rolled_out(&ds(3, 3, 2, 2, 1, 0, 0)).unwrap_err().contains("1 of 2 pods updated"));
        assert!(rolled_out(&ds(3, 3, 2, 2, 2, 1, 0)).unwrap_err().contains("unavailable"));
        assert!(rolled_out(&ds(3, 3, 2, 2, 2, 0, 1)).unwrap_err().contains("misscheduled"));
        assert!(rolled_out(&json!({"metadata": {"generation": 1}})).is_err(), "no status yet");
    }

    /// Executes a plan on a map of stored objects as the shell does: create (an existing name is
    /// compared, never overwritten), then delete the old one only if the new one holds the same
    /// policy.
    fn execute(kind: Kind, store: &mut BTreeMap<String, Stored>, p: &Plan) {
        for step in &p.steps {
            let r = step.rename();
            if let Step::Create(_) = step {
                store.entry(r.new_name.clone()).or_insert_with(|| Stored { name: r.new_name.clone(), revision: "1".into(), uid: format!("new-{}", r.new_name), value: r.body.clone() });
            }
            if matches!(step, Step::KeepBoth(_)) {
                continue;
            }
            if store.get(&r.new_name).is_some_and(|n| same_policy(&n.value, &r.old.value)) {
                store.remove(&r.old.name);
            }
        }
        let _ = kind;
    }

    fn arb_store() -> impl Strategy<Value = Vec<Stored>> {
        let name = prop_oneof![Just("a"), Just("b"), Just("c"), Just("default.a"), Just("default.b"), Just("default.default.a"), Just("sec.a")];
        let ns = prop_oneof![Just("n1"), Just("n2")];
        let tier = prop_oneof![Just(None), Just(Some("default")), Just(Some("sec"))];
        let annotation = prop_oneof![Just(None), Just(Some("a")), Just(Some("c"))];
        proptest::collection::vec((ns, name, tier, 0i64..2, annotation), 0..10).prop_map(|items| {
            let mut by_name = BTreeMap::new();
            for (ns, name, tier, order, ann) in items {
                let full = format!("{ns}/{name}");
                let mut s = policy(&full, tier, order);
                if let Some(a) = ann {
                    s = annotated(s, a);
                }
                by_name.insert(full, s);
            }
            by_name.into_values().collect()
        })
    }

    proptest! {
        /// Migration converges (a chain of old names one link per round), a round after that is
        /// a no-op, and no policy is ever lost: every policy stored before is afterwards under
        /// its old name or, the same policy, under its new one.
        #[test]
        fn migrating_twice_is_idempotent_and_never_loses_a_policy(objects in arb_store()) {
            let kind = Kind::NetworkPolicy;
            let mut store: BTreeMap<String, Stored> = objects.iter().map(|o| (o.name.clone(), o.clone())).collect();
            // A chain of old names resolves one link per round; names here chain at most twice.
            let mut rounds = 0;
            loop {
                let p = plan(kind, &store.values().cloned().collect::<Vec<_>>());
                if p.writes() == 0 {
                    break;
                }
                rounds += 1;
                prop_assert!(rounds <= 3, "no convergence: {:?}", p.steps);
                execute(kind, &mut store, &p);
            }
            let once = store.clone();
            let again = plan(kind, &store.values().cloned().collect::<Vec<_>>());
            prop_assert_eq!(again.writes(), 0);
            execute(kind, &mut store, &again);
            prop_assert_eq!(&store, &once, "a round after convergence changes nothing");
            for old in &objects {
                let kept = store.get(&old.name).is_some_and(|s| s.value == old.value);
                let moved = match new_name(kind, old) {
                    Some(Ok(n)) => store.get(&n).is_some_and(|s| same_policy(&s.value, &old.value)),
                    _ => false,
                };
                prop_assert!(kept || moved, "{} lost: {:?}", old.name, store.keys().collect::<Vec<_>>());
            }
            // Objects that needed no migration are untouched.
            for old in objects.iter().filter(|o| new_name(kind, o).is_none()) {
                prop_assert_eq!(store.get(&old.name), Some(old));
            }
        }
    }
}
