//! Pure conversion of Kubernetes objects into the Calico `projectcalico.org/v3` objects the
//! light controllers write: NetworkPolicy -> NetworkPolicy (SPEC §6.4), Namespace and
//! ServiceAccount -> Profile (§6.2, §6.3), Pod -> the WorkloadEndpoint fields the pod controller
//! owns (§6.5).
//!
//! Owns: the exact output shapes (Go's `omitempty` rules applied by hand) and the bad-rule policy
//! of Part A. Must not: do I/O, read the clock, or depend on kube/k8s-openapi types; input is
//! `serde_json::Value` so that any JSON, however malformed, comes back as a value or an error,
//! never a panic.

mod json;
mod netpol;
mod objects;
#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod tests;

use std::fmt;

pub use netpol::{NAME_PREFIX as POLICY_NAME_PREFIX, network_policy};
pub use objects::{MAX_SERVICE_ACCOUNT_LABEL, NAMESPACE_PROFILE_PREFIX, SERVICE_ACCOUNT_PROFILE_PREFIX, namespace_profile, service_account_profile, workload_endpoint, workload_endpoint_name};

/// The API version of every object this module produces.
pub const API_VERSION: &str = "projectcalico.org/v3";
/// The term every converted pod selector starts with.
pub const ORCHESTRATOR_TERM: &str = "projectcalico.org/orchestrator == 'k8s'";

/// How a Kubernetes rule that cannot be converted is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BadRules {
    /// Drop the offending Kubernetes rule whole (its traffic is denied), convert the rest, and
    /// report it in [`Converted::dropped`] (Part A).
    #[default]
    DropRule,
    /// Do what upstream kube-controllers does: skip the whole policy on port and validation errors,
    /// turn an unparsable CIDR into an empty peer, stop at the first bad `except` entry.
    Upstream,
}

/// The direction of a Kubernetes NetworkPolicy rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A rule of `spec.ingress`.
    Ingress,
    /// A rule of `spec.egress`.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// A Kubernetes rule left out of the converted policy, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedRule {
    /// Which list the rule was in.
    pub direction: Direction,
    /// 0-based index of the rule in `spec.ingress` or `spec.egress`.
    pub index: usize,
    /// What is wrong with it, for the log and the `convert` command.
    pub reason: String,
}

/// A converted NetworkPolicy and the Kubernetes rules that were dropped on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct Converted {
    /// The Calico NetworkPolicy, as `calicoctl get -o json` shows it.
    pub object: serde_json::Value,
    /// Rules dropped in [`BadRules::DropRule`] mode (always empty in [`BadRules::Upstream`] mode).
    pub dropped: Vec<DroppedRule>,
}

/// Why an object produced nothing to write.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ConvertError {
    /// The input is not a readable object of its kind (no metadata.name, spec of the wrong type, ...).
    #[error("{0}")]
    Malformed(String),
    /// Upstream mode only: upstream skips the whole policy (endPort < port, named port with endPort, port > 65535, invalid protocol).
    #[error("{0}")]
    PolicySkipped(String),
    /// Nothing to write for this object (a pod with no spec.nodeName, a host-network pod, ...).
    #[error("{0}")]
    NotApplicable(String),
}

impl ConvertError {
    /// A bounded label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            ConvertError::Malformed(_) => "malformed",
            ConvertError::PolicySkipped(_) => "policy_skipped",
            ConvertError::NotApplicable(_) => "not_applicable",
        }
    }
}
