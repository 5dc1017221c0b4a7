//! `convert`: the Kubernetes objects people hold (NetworkPolicies, Namespaces, ServiceAccounts,
//! Pods) in, the Calico objects the etcd-mode controllers would write for them out, with every
//! rule that could not be converted named.
//!
//! Owns: choosing the converter by kind, the order of the output (input order), and the report of
//! what was dropped, skipped, unreadable or not ours to convert.
//! Must not: do I/O (the CLI reads files and prints), decide a conversion itself (that is
//! [`crate::policy`]).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::policy::{self, BadRules, ConvertError};
use crate::scan::objects::SourcedObject;

/// Everything one `convert` run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The Calico objects, in input order.
    pub items: Vec<Value>,
    /// One line per Kubernetes rule dropped (or, in upstream mode, per policy skipped).
    pub dropped: Vec<String>,
    /// Objects with nothing to write (a pod not on a node, a host-network pod), one line each.
    pub skipped: Vec<String>,
    /// Objects of a converted kind that could not be read, one line each.
    pub malformed: Vec<String>,
    /// Objects of kinds `convert` does not read, counted by kind.
    pub ignored: BTreeMap<String, u64>,
}

impl Outcome {
    /// 0: everything converted; 1: some rule was dropped or some policy skipped; 2: some object
    /// could not be read.
    pub fn exit_code(&self) -> i32 {
        if !self.malformed.is_empty() {
            2
        } else if !self.dropped.is_empty() {
            1
        } else {
            0
        }
    }

    /// The items as `kubectl get -o json` writes a List of them, moved out (not copied).
    pub fn take_list(&mut self) -> Value {
        let mut list = serde_json::Map::new();
        list.insert("apiVersion".into(), json!("v1"));
        list.insert("kind".into(), json!("List"));
        list.insert("items".into(), Value::Array(std::mem::take(&mut self.items)));
        Value::Object(list)
    }
}

/// `namespace/name` of an object (namespace `default` when unset, as the API server fills it).
fn place(o: &Value, namespaced: bool) -> String {
    let name = o["metadata"]["name"].as_str().unwrap_or("<no name>");
    if namespaced {
        format!("{}/{name}", o["metadata"]["namespace"].as_str().filter(|n| !n.is_empty()).unwrap_or("default"))
    } else {
        name.to_string()
    }
}

/// Converts `objects` in order; `mode` says what becomes of a NetworkPolicy rule that cannot be
/// converted.
pub fn convert(objects: &[SourcedObject], mode: BadRules) -> Outcome {
    let mut out = Outcome::default();
    for o in objects {
        if let Some(item) = convert_one(o, mode, &mut out) {
            out.items.push(item);
        }
    }
    out
}

/// Converts one object: its Calico object, if any; what went wrong is noted in `out` (whose
/// `items` it leaves alone).
pub fn convert_one(source: &SourcedObject, mode: BadRules, out: &mut Outcome) -> Option<Value> {
    let SourcedObject { file, object } = source;
    let kind = object["kind"].as_str().unwrap_or("<no kind>");
    let namespaced = kind != "Namespace";
    let result = match kind {
        "NetworkPolicy" if is_kubernetes_policy(object) => policy::network_policy(object, mode).map(|c| {
            for d in &c.dropped {
                out.dropped.push(format!("NetworkPolicy {}: {} rule {} dropped: {}", place(object, true), d.direction, d.index, d.reason));
            }
            c.object
        }),
        "Namespace" => policy::namespace_profile(object),
        "ServiceAccount" => policy::service_account_profile(object),
        "Pod" => policy::workload_endpoint(object),
        _ => {
            *out.ignored.entry(kind.to_string()).or_default() += 1;
            return None;
        }
    };
    let what = format!("{kind} {}", place(object, namespaced));
    match result {
        Ok(item) => return Some(item),
        Err(ConvertError::Malformed(why)) => out.malformed.push(format!("{file}: {what}: {why}")),
        Err(ConvertError::PolicySkipped(why)) => out.dropped.push(format!("{what}: whole policy skipped (upstream behaviour): {why}")),
        Err(ConvertError::NotApplicable(why)) => out.skipped.push(format!("{what}: {why}")),
    }
    None
}

/// The `v1` List of what `objects` convert to, serialized as it is converted: one item at a time
/// is held, never the whole output (`convert` on 12,000 objects holds its input, not twice it).
/// What went wrong is gathered in [`Streamed::outcome`] as the List is written.
pub struct Streamed<'a> {
    objects: &'a [SourcedObject],
    mode: BadRules,
    outcome: std::cell::RefCell<Outcome>,
}

impl<'a> Streamed<'a> {
    pub fn new(objects: &'a [SourcedObject], mode: BadRules) -> Self {
        Streamed { objects, mode, outcome: Default::default() }
    }

    /// What was dropped, skipped, unreadable or ignored (after serializing).
    pub fn outcome(self) -> Outcome {
        self.outcome.into_inner()
    }
}

impl serde::Serialize for Streamed<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        // Keys in the order the copying form (a sorted map) writes them.
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("apiVersion", "v1")?;
        map.serialize_entry("items", &Items(self))?;
        map.serialize_entry("kind", "List")?;
        map.end()
    }
}

struct Items<'b, 'a>(&'b Streamed<'a>);

impl serde::Serialize for Items<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(None)?;
        for o in self.0.objects {
            let item = convert_one(o, self.0.mode, &mut self.0.outcome.borrow_mut());
            if let Some(item) = item {
                seq.serialize_element(&item)?;
            }
        }
        seq.end()
    }
}

/// A Calico v3 NetworkPolicy shares the kind; only Kubernetes' (`networking.k8s.io`) is input.
fn is_kubernetes_policy(o: &Value) -> bool {
    o["apiVersion"].as_str().is_none_or(|v| v.starts_with("networking.k8s.io/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sourced(object: Value) -> SourcedObject {
        SourcedObject { file: "in.json".into(), object }
    }

    #[test]
    fn the_streamed_list_is_the_copied_one_and_gathers_the_same_outcome() {
        let objects = [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "b", "namespace": "web"},
                "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 70}]}, {}]}}),
        ]
        .map(sourced);
        let mut copied = convert(&objects, BadRules::DropRule);
        let streamed = Streamed::new(&objects, BadRules::DropRule);
        let text = serde_json::to_string_pretty(&streamed).unwrap();
        assert_eq!(text, serde_json::to_string_pretty(&copied.take_list()).unwrap());
        let out = streamed.outcome();
        assert_eq!((out.exit_code(), &out.dropped, &out.ignored), (copied.exit_code(), &copied.dropped, &copied.ignored));
    }

    #[test]
    fn each_kind_goes_to_its_converter_in_input_order_and_the_exit_code_follows_the_worst_case() {
        let objects = [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web", "labels": {"team": "a"}}}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "web"}, "spec": {"podSelector": {}}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa", "namespace": "web"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
            json!({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy", "metadata": {"name": "calico"}}),
        ]
        .map(sourced);
        let out = convert(&objects, BadRules::DropRule);
        let names: Vec<&str> = out.items.iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["kns.web", "knp.default.p", "ksa.web.sa"]);
        assert_eq!(out.ignored, BTreeMap::from([("ConfigMap".to_string(), 1), ("NetworkPolicy".to_string(), 1)]));
        assert_eq!(out.exit_code(), 0);
        let mut out = out;
        assert_eq!(out.take_list()["items"].as_array().unwrap().len(), 3);
        assert!(out.items.is_empty(), "moved, not copied");

        let bad_port = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "b", "namespace": "web"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 70}]}, {}]}});
        let out = convert(&[sourced(bad_port.clone())], BadRules::DropRule);
        assert_eq!(out.items.len(), 1, "the policy is written without its bad rule");
        assert_eq!(out.dropped.len(), 1, "{:?}", out.dropped);
        assert!(out.dropped[0].starts_with("NetworkPolicy web/b: ingress rule 0 dropped"), "{:?}", out.dropped);
        assert_eq!(out.exit_code(), 1);
        let out = convert(&[sourced(bad_port)], BadRules::Upstream);
        assert!(out.items.is_empty(), "upstream skips the whole policy");
        assert_eq!(out.exit_code(), 1);

        let out = convert(&[sourced(json!({"kind": "Namespace", "metadata": {}}))], BadRules::DropRule);
        assert_eq!(out.malformed.len(), 1);
        assert_eq!(out.exit_code(), 2);
    }
}
