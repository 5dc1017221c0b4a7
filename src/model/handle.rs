//! IPAMHandle: how many addresses one handle (one pod, one tunnel) holds in each block.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::meta::Object;

pub type IpamHandle = Object<IpamHandleSpec>;
pub const KIND: &str = "IPAMHandle";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamHandleSpec {
    #[serde(rename = "handleID", default)]
    pub handle_id: String,
    /// Block CIDR -> number of this handle's addresses in that block.
    #[serde(default)]
    pub block: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}
