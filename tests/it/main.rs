//! The single integration-test binary.

mod support;

mod conformance_kube;

mod e2e_controller;
mod e2e_ha;
mod e2e_smoke;

mod scenarios;
