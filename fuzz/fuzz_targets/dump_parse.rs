//! Any bytes as a leak-scan dump: the reader and the scan never panic.
#![no_main]
use calico_kube_controllers::scan::{dump, report};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut d) = dump::read_bytes("fuzz.json", data) {
        let _ = report::scan_dump(&mut d, 1_800_000_000_000, &Default::default());
    }
});
