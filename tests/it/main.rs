//! The single integration-test binary.

mod support;

mod cli_compat;
mod conformance_kube;

mod e2e_controller;
mod e2e_smoke;
mod e2e_startup;

mod scenarios;
