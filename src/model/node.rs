//! The few Node fields the GC needs.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A Kubernetes Node trimmed on arrival: its name, whether it is being deleted, and the
/// Flannel-migration label that pauses empty-block release.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeLite {
    pub metadata: NodeMeta,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

pub const MIGRATION_LABEL: &str = "projectcalico.org/node-network-during-migration";

impl NodeLite {
    /// True while a Flannel migration has not yet moved this node to Calico networking.
    pub fn migration_in_progress(&self) -> bool {
        self.metadata.labels.get(MIGRATION_LABEL).is_some_and(|v| v != "calico")
    }
}
