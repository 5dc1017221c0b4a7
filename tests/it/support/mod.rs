//! Shared helpers for the integration tests. Owns nothing of the product; only test plumbing.

pub mod cluster;
pub mod controller;
pub mod audit;
pub mod ha;
pub mod ipam;
pub mod oracle;
pub mod workload;
