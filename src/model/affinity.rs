//! BlockAffinity: which host (or virtual owner) has claimed a block.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::meta::{bool_or_string, Object};

pub type BlockAffinity = Object<BlockAffinitySpec>;
pub const KIND: &str = "BlockAffinity";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockAffinitySpec {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub node: String,
    /// Empty means `host`.
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub affinity_type: String,
    #[serde(default)]
    pub cidr: String,
    /// A string in the v1 CRD (`"true"`/`"false"`); we write it back as a string.
    #[serde(default, deserialize_with = "bool_or_string", serialize_with = "bool_as_string")]
    pub deleted: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn bool_as_string<S: serde::Serializer>(b: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *b { "true" } else { "false" })
}

impl BlockAffinitySpec {
    pub fn is_host(&self) -> bool {
        self.affinity_type.is_empty() || self.affinity_type == "host"
    }
}

pub const STATE_PENDING_DELETION: &str = "pendingDeletion";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_is_read_as_bool_or_string_and_written_as_string() {
        let a: BlockAffinity = serde_json::from_value(serde_json::json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "BlockAffinity",
            "metadata": {"name": "n1-10-0-0-0-26"},
            "spec": {"state": "confirmed", "node": "n1", "cidr": "10.0.0.0/26", "deleted": "true", "x": 1}
        })).unwrap();
        assert!(a.spec.deleted && a.spec.is_host());
        let back = serde_json::to_value(&a).unwrap();
        assert_eq!(back["spec"]["deleted"], "true");
        assert_eq!(back["spec"]["x"], 1);
        let b: BlockAffinitySpec = serde_json::from_value(serde_json::json!({"deleted": false})).unwrap();
        assert!(!b.deleted);
    }
}
