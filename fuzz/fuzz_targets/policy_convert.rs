//! Any bytes as JSON through every policy converter in both modes: nothing panics, every converted
//! selector keeps the orchestrator term, and a policy that drops no rule converts the same upstream.
#![no_main]
use calico_kube_controllers::policy::{self, BadRules, Direction};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let strict = policy::network_policy(&value, BadRules::DropRule);
    let upstream = policy::network_policy(&value, BadRules::Upstream);
    for out in strict.iter().chain(upstream.iter()) {
        let selector = out.object["spec"]["selector"].as_str().unwrap();
        assert!(selector.starts_with(policy::ORCHESTRATOR_TERM));
        serde_json::to_vec(&out.object).unwrap();
    }
    if let Ok(out) = &upstream {
        assert!(out.dropped.is_empty());
    }
    if let Ok(out) = &strict {
        let spec = &value["spec"];
        for d in &out.dropped {
            let key = if d.direction == Direction::Ingress { "ingress" } else { "egress" };
            assert!(d.index < spec[key].as_array().map_or(0, Vec::len));
        }
        // DropRule checks everything upstream checks: with nothing dropped the two agree.
        if out.dropped.is_empty() {
            assert_eq!(upstream.as_ref().map(|u| &u.object), Ok(&out.object));
        }
    }
    let _ = policy::namespace_profile(&value);
    let _ = policy::service_account_profile(&value);
    let _ = policy::workload_endpoint(&value);
});
