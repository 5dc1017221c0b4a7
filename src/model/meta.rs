//! The Kubernetes object envelope shared by every kind we write back.
//!
//! Unknown fields are kept (`extra`) so that a newer Calico's or Kubernetes' fields survive our writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `metadata`: the fields we read, plus everything else kept verbatim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A whole object of one kind: `apiVersion`, `kind`, `metadata`, `spec`, and any other top-level
/// field (for example `status`) kept verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<S> {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: Meta,
    pub spec: S,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl<S> Object<S> {
    pub fn new(kind: &str, name: &str, spec: S) -> Self {
        Object {
            api_version: crate::model::CALICO_API_VERSION.to_string(),
            kind: kind.to_string(),
            metadata: Meta { name: name.to_string(), ..Meta::default() },
            spec,
            extra: BTreeMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn resource_version(&self) -> &str {
        self.metadata.resource_version.as_deref().unwrap_or("")
    }
}

/// `deleted` is a bool in etcd and in v3 CRDs but the string `"true"`/`"false"` in the v1
/// BlockAffinity CRD; accept both on input.
pub(crate) fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    Ok(match Option::<Flag>::deserialize(d)? {
        None => false,
        Some(Flag::Bool(b)) => b,
        Some(Flag::Text(s)) => s.eq_ignore_ascii_case("true"),
    })
}
