//! The single integration-test binary.

mod support;

mod chaos;
mod cli_compat;
mod cli_convert;
mod cli_leak_scan;
mod conformance_etcd;
mod conformance_kube;

mod e2e_controller;
mod e2e_chart;
mod e2e_deploy;
mod e2e_etcd;
mod e2e_events;
mod e2e_host_endpoints;
mod e2e_ha;
mod e2e_kubevirt;
mod e2e_leak_scan_live;
mod e2e_loadbalancer;
mod e2e_leak_scan_release;
mod e2e_metrics;
mod e2e_nodes;
mod e2e_operator;
mod e2e_policy_names;
mod e2e_restart;
mod e2e_rules;
mod e2e_scale;
mod e2e_smoke;
mod e2e_startup;

mod scenarios;
