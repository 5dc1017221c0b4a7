//! Any bytes as a Pod: trimming to facts never panics, and unparsable IPs are flagged, not lost.
#![no_main]
use calico_kube_controllers::model::{PodFacts, PodLite};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pod) = serde_json::from_slice::<PodLite>(data) {
        let (facts, invalid) = PodFacts::from_lite(&pod);
        assert_eq!(invalid.is_some(), facts.unparsable_ips);
    }
});
