//! The single integration-test binary.

mod support;

mod e2e_smoke;

mod scenarios;
