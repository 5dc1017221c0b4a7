//! Singletons: IPAMConfig, ClusterInformation and KubeControllersConfiguration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::meta::Object;
use super::time::{parse_go_duration, Millis};

pub type IpamConfig = Object<IpamConfigSpec>;
pub type ClusterInformation = Object<ClusterInformationSpec>;
pub type KubeControllersConfiguration = Object<KubeControllersConfigurationSpec>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConfigSpec {
    #[serde(default)]
    pub strict_affinity: bool,
    #[serde(default = "yes")]
    pub auto_allocate_blocks: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blocks_per_host: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "kubeVirtVMAddressPersistence")]
    pub kube_virt_vm_address_persistence: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_cooldown_seconds: Option<u32>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn yes() -> bool {
    true
}

impl Default for IpamConfigSpec {
    /// What the IPAM library assumes when no IPAMConfig exists (SPEC §4.4).
    fn default() -> Self {
        IpamConfigSpec {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: None,
            kube_virt_vm_address_persistence: None,
            ip_cooldown_seconds: None,
            extra: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInformationSpec {
    #[serde(default, rename = "clusterGUID", skip_serializing_if = "Option::is_none")]
    pub cluster_guid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calico_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore_ready: Option<bool>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeControllersConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_v3_compaction_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_profile_port: Option<u16>,
    #[serde(default)]
    pub controllers: ControllersConfig,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllersConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeControllerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_endpoint: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl ControllersConfig {
    /// `loadBalancer.assignIPs` as the LoadBalancer controller reads it: `AllServices`
    /// (libcalico's default) when the section leaves it unset; `None` without a `loadBalancer`
    /// section (then the controller runs only if `ENABLED_CONTROLLERS` names it).
    pub fn load_balancer_assign_ips(&self) -> Option<&str> {
        let section = self.load_balancer.as_ref()?;
        Some(section.get("assignIPs").and_then(Value::as_str).unwrap_or("AllServices"))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeControllerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciler_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_labels: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leak_grace_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_endpoint: Option<Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Upstream's documented default for an unset `leakGracePeriod` (SPEC Part A).
pub const DEFAULT_LEAK_GRACE: Millis = 15 * 60 * 1000;

impl KubeControllersConfigurationSpec {
    /// The effective leak grace period: unset means 15 minutes, `0s` disables confirmation on
    /// live nodes. An unparsable value falls back to the default rather than disabling the GC.
    pub fn leak_grace_period(&self) -> Millis {
        self.controllers
            .node
            .as_ref()
            .and_then(|n| n.leak_grace_period.as_deref())
            .and_then(parse_go_duration)
            .unwrap_or(DEFAULT_LEAK_GRACE)
    }
}
