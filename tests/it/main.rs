//! The single integration-test binary.

mod support;

mod conformance_kube;

mod e2e_controller;
mod e2e_kubevirt;
mod e2e_metrics;
mod e2e_smoke;

mod scenarios;
