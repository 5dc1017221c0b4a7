//! calico-kube-controllers: the library behind the binary.
#![forbid(unsafe_code)]
pub mod datastore;
pub mod ipam;
pub mod memstat;
pub mod model;
pub mod scan;
pub mod sim;
#[cfg(feature = "cli")]
pub mod runtime;
