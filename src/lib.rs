//! calico-kube-controllers: the library behind the binary.
#![forbid(unsafe_code)]
pub mod config;
pub mod convert;
pub mod endpoint_labels;
pub mod datastore;
pub mod guard;
pub mod host_endpoints;
pub mod health;
pub mod ipam;
pub mod loadbalancer;
pub mod memstat;
pub mod model;
pub mod node_cleanup;
pub mod policy;
pub mod policy_names;
pub mod reconcile;
pub mod scan;
pub mod selector;
pub mod sim;
#[cfg(feature = "cli")]
pub mod runtime;
