//! The light controllers' reconcile rule, pure (SPEC §6.1): what to write so that the objects a
//! controller owns in the datastore are exactly the ones it wants.
//!
//! Owns: the comparison (the `spec` decides, as upstream copies only the spec onto the stored
//! object), the create/update/delete list and its order (creates and updates first, deletes
//! last, so a cut-short round never removes before it adds), and what an update writes (the
//! stored object with the wanted spec: its other fields kept).
//! Must not: decide what is owned (the caller lists by name prefix), or do I/O.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::datastore::Stored;

/// One write of a reconcile round.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// The caller writes its wanted object `name` (made only when it is written, so a round
    /// that creates everything does not hold every object at once).
    Create { name: String },
    /// `value` is the stored object with the wanted `spec`.
    Update { current: Stored, value: Value },
    Delete { current: Stored },
}

impl Write {
    /// A bounded label for metrics.
    pub fn op(&self) -> &'static str {
        match self {
            Write::Create { .. } => "create",
            Write::Update { .. } => "update",
            Write::Delete { .. } => "delete",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Write::Create { name, .. } => name,
            Write::Update { current, .. } | Write::Delete { current } => &current.name,
        }
    }
}

/// A wanted object as [`plan`] needs it: whether a stored `spec` is the wanted one, and the
/// wanted `spec` for an update.
pub trait Desired {
    fn spec_is(&self, spec: Option<&Value>) -> bool;
    fn spec(&self) -> Value;
}

impl Desired for Value {
    fn spec_is(&self, spec: Option<&Value>) -> bool {
        self.get("spec") == spec
    }
    fn spec(&self) -> Value {
        self.get("spec").cloned().unwrap_or(Value::Object(Default::default()))
    }
}

impl<T: Desired + ?Sized> Desired for &T {
    fn spec_is(&self, spec: Option<&Value>) -> bool {
        (**self).spec_is(spec)
    }
    fn spec(&self) -> Value {
        (**self).spec()
    }
}

/// A wanted object kept as compact JSON text (a `serde_json::Value` costs a B-tree node of
/// about 600 bytes for every map, however small: a converted NetworkPolicy is ~15 KB as a
/// `Value` and under 1 KB as text). The `spec` is kept apart, so comparing it with a stored one
/// streams the stored one's canonical text against it without building anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactObject {
    spec: Box<str>,
    rest: Box<str>,
}

impl CompactObject {
    pub fn new(mut object: Value) -> CompactObject {
        let spec = object.as_object_mut().and_then(|o| o.remove("spec")).unwrap_or(Value::Object(Default::default()));
        CompactObject { spec: spec.to_string().into_boxed_str(), rest: object.to_string().into_boxed_str() }
    }

    /// The whole object again.
    pub fn object(&self) -> Value {
        let mut object: Value = serde_json::from_str(&self.rest).unwrap_or(Value::Object(Default::default()));
        if let Some(o) = object.as_object_mut() {
            o.insert("spec".into(), self.spec());
        }
        object
    }

    /// Heap bytes kept.
    pub fn heap_bytes(&self) -> usize {
        self.spec.len() + self.rest.len()
    }
}

impl Desired for CompactObject {
    fn spec_is(&self, spec: Option<&Value>) -> bool {
        // Maps serialize with sorted keys, so equal values have equal text.
        let Some(spec) = spec else { return false };
        let mut cmp = SameText { expected: self.spec.as_bytes(), at: 0, same: true };
        serde_json::to_writer(&mut cmp, spec).is_ok() && cmp.same && cmp.at == cmp.expected.len()
    }
    fn spec(&self) -> Value {
        serde_json::from_str(&self.spec).unwrap_or(Value::Object(Default::default()))
    }
}

/// A writer that checks what is written against `expected`, byte by byte.
struct SameText<'a> {
    expected: &'a [u8],
    at: usize,
    same: bool,
}

impl std::io::Write for SameText<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.same {
            let end = self.at + buf.len();
            self.same = self.expected.get(self.at..end) == Some(buf);
            self.at = end;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The writes that turn `owned` (the controller's objects as listed) into `desired` (datastore
/// name -> wanted object): a create for each missing one, an update for each whose `spec`
/// differs, a delete for each owned object nothing wants. Nothing when they agree.
pub fn plan<D: Desired>(desired: &BTreeMap<String, D>, owned: &[Stored]) -> Vec<Write> {
    let mut writes = Vec::new();
    let by_name: BTreeMap<&str, &Stored> = owned.iter().map(|s| (s.name.as_str(), s)).collect();
    for (name, want) in desired {
        match by_name.get(name.as_str()) {
            None => writes.push(Write::Create { name: name.clone() }),
            Some(current) if !want.spec_is(current.value.get("spec")) => {
                let mut value = current.value.clone();
                value["spec"] = want.spec();
                writes.push(Write::Update { current: (*current).clone(), value });
            }
            Some(_) => {}
        }
    }
    for current in owned {
        if !desired.contains_key(&current.name) {
            writes.push(Write::Delete { current: current.clone() });
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(name: &str, spec: Value) -> Stored {
        Stored { name: name.into(), revision: "3".into(), uid: "u".into(), value: json!({"metadata": {"name": name, "labels": {"x": "1"}}, "spec": spec}) }
    }

    #[test]
    fn missing_objects_are_created_changed_ones_updated_unwanted_ones_deleted_and_equal_ones_left() {
        let desired: BTreeMap<String, Value> = [
            ("kns.new", json!({"metadata": {"name": "kns.new"}, "spec": {"a": 1}})),
            ("kns.same", json!({"metadata": {"name": "kns.same"}, "spec": {"a": 1}})),
            ("kns.changed", json!({"metadata": {"name": "kns.changed"}, "spec": {"a": 2}})),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let owned = [stored("kns.same", json!({"a": 1})), stored("kns.changed", json!({"a": 1})), stored("kns.stale", json!({}))];
        let writes = plan(&desired, &owned);
        let ops: Vec<(&str, &str)> = writes.iter().map(|w| (w.op(), w.name())).collect();
        assert_eq!(ops, [("update", "kns.changed"), ("create", "kns.new"), ("delete", "kns.stale")]);
        let Write::Update { value, current } = &writes[0] else { panic!() };
        assert_eq!(value["spec"], json!({"a": 2}));
        assert_eq!(value["metadata"]["labels"], json!({"x": "1"}), "an update keeps the stored object's other fields");
        assert_eq!(current.revision, "3", "and is made against the revision it saw");
        assert!(plan(&desired, &[stored("kns.new", json!({"a": 1})), stored("kns.same", json!({"a": 1})), stored("kns.changed", json!({"a": 2}))]).is_empty());
        assert_eq!(plan(&BTreeMap::<String, Value>::new(), &owned).len(), 3, "nothing wanted: every owned object goes");
        // The same plan from the compact form.
        let compact: BTreeMap<String, CompactObject> = desired.iter().map(|(k, v)| (k.clone(), CompactObject::new(v.clone()))).collect();
        assert_eq!(plan(&compact, &owned), writes);
    }

    #[test]
    fn a_compact_object_gives_back_the_object_and_compares_specs_exactly() {
        let object = json!({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy", "metadata": {"name": "knp.default.p", "namespace": "web"},
            "spec": {"order": 1000.0, "selector": "a == 'b'", "ingress": [{"action": "Allow", "destination": {"ports": [80, "http"]}}], "types": ["Ingress"]}});
        let c = CompactObject::new(object.clone());
        assert_eq!(c.object(), object);
        assert!(c.spec_is(object.get("spec")));
        let mut other = object["spec"].clone();
        other["ingress"][0]["destination"]["ports"][0] = json!(81);
        assert!(!c.spec_is(Some(&other)));
        other["ingress"][0]["destination"]["ports"][0] = json!(80.0);
        assert!(!c.spec_is(Some(&other)), "a float is not the integer, as Value equality says");
        let mut longer = object["spec"].clone();
        longer["zzz"] = json!(1);
        assert!(!c.spec_is(Some(&longer)) && !c.spec_is(None));
        let mut shorter = object["spec"].clone();
        shorter.as_object_mut().unwrap().remove("types");
        assert!(!c.spec_is(Some(&shorter)), "a prefix of the text is not the same spec");
        assert!(c.heap_bytes() < 300, "{} bytes", c.heap_bytes());
    }
}
