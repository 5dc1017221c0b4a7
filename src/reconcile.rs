//! The light controllers' reconcile rule, pure (SPEC §6.1): what to write so that the objects a
//! controller owns in the datastore are exactly the ones it wants.
//!
//! Owns: the comparison (the `spec` decides, as upstream copies only the spec onto the stored
//! object), the create/update/delete list and its order (creates and updates first, deletes
//! last, so a cut-short round never removes before it adds), and what an update writes (the
//! stored object with the wanted spec: its other fields kept).
//! Must not: decide what is owned (the caller lists by name prefix), or do I/O.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use serde_json::Value;

use crate::datastore::Stored;

/// One write of a reconcile round.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Create { name: String, value: Value },
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

/// The writes that turn `owned` (the controller's objects as listed) into `desired` (datastore
/// name -> wanted object): a create for each one missing, an update for each whose `spec`
/// differs, a delete for each owned object nothing wants. Nothing when they agree.
pub fn plan<V: Borrow<Value>>(desired: &BTreeMap<String, V>, owned: &[Stored]) -> Vec<Write> {
    let mut writes = Vec::new();
    let by_name: BTreeMap<&str, &Stored> = owned.iter().map(|s| (s.name.as_str(), s)).collect();
    for (name, want) in desired {
        let want: &Value = want.borrow();
        match by_name.get(name.as_str()) {
            None => writes.push(Write::Create { name: name.clone(), value: want.clone() }),
            Some(current) if current.value.get("spec") != want.get("spec") => {
                let mut value = current.value.clone();
                value["spec"] = want.get("spec").cloned().unwrap_or(Value::Object(Default::default()));
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
    }
}
