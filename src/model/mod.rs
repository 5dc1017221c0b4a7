//! Calico and Kubernetes data as serde types, their name encodings and validation.
//!
//! Owns: the wire shapes of the `crd.projectcalico.org/v1` kinds we read or write, the few Pod and
//! Node fields the GC needs, RFC 3339 time parsing, and the rules that reject malformed objects.
//! Must not: hold state, touch the network or read the clock.

pub mod affinity;
pub mod block;
pub mod config;
pub mod handle;
pub mod meta;
pub mod names;
pub mod node;
pub mod pod;
pub mod pool;
pub mod time;

pub use affinity::{BlockAffinity, BlockAffinitySpec};
pub use block::{AllocationAttribute, BlockView, IpamBlock, IpamBlockSpec};
pub use config::{ClusterInformation, IpamConfig, KubeControllersConfiguration};
pub use handle::{BlockCounts, IpamHandle, IpamHandleSpec};
pub use meta::{Meta, Object};
pub use node::NodeLite;
pub use pod::{PodFacts, PodLite, PodPhase};
pub use pool::{IpPool, IpReservation};

/// The API group and version of every Calico kind this version reads and writes.
pub const CALICO_API_VERSION: &str = "crd.projectcalico.org/v1";
pub const CALICO_GROUP: &str = "crd.projectcalico.org";

/// A malformed object: which one, and what is wrong with it. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {problem}")]
pub struct InvalidObject {
    pub kind: String,
    pub name: String,
    pub problem: String,
}

impl InvalidObject {
    pub fn new(kind: &str, name: &str, problem: impl Into<String>) -> Self {
        InvalidObject { kind: kind.to_string(), name: name.to_string(), problem: problem.into() }
    }
}
