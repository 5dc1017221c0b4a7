//! Any UTF-8 as a Calico selector: parsing never panics and an error's position lies inside the
//! input; a selector that parses renders to a canonical form that reparses to the same selector
//! (unless a `!` sat directly over another, a pair upstream's rendering drops), is a fixed point
//! from then on, and matches exactly the label sets the original matches.
#![no_main]
use std::collections::BTreeMap;

use calico_kube_controllers::selector::Selector;
use libfuzzer_sys::fuzz_target;

/// Label sets that make the usual keys present, absent, empty and quote-laden.
fn label_sets() -> Vec<BTreeMap<String, String>> {
    let sets: [&[(&str, &str)]; 5] = [
        &[],
        &[("a", "x")],
        &[("a", "xy"), ("b", "")],
        &[("b", "y"), ("k8s-app", "it's"), ("projectcalico.org/namespace", "default")],
        &[("a", "say \"hi\""), ("c", "é"), ("in", "x"), ("has", "y")],
    ];
    sets.iter().map(|pairs| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let selector = match Selector::parse(text) {
        Ok(selector) => selector,
        Err(err) => {
            assert!(err.position <= text.chars().count(), "{err}");
            return;
        }
    };
    let canonical = selector.to_string();
    let reparsed = Selector::parse(&canonical).unwrap_or_else(|err| panic!("{canonical:?} does not reparse: {err}"));
    let again = reparsed.to_string();
    // Without a "!!" in it (which a string value may also hold) the canonical form is exact.
    if !canonical.contains("!!") {
        assert_eq!(reparsed, selector, "{canonical:?}");
        assert_eq!(again, canonical);
    }
    assert_eq!(Selector::parse(&again).map(|s| s.to_string()).as_deref(), Ok(again.as_str()));
    for labels in &label_sets() {
        let expected = selector.matches_map(labels);
        assert_eq!(reparsed.matches_map(labels), expected, "{canonical:?} on {labels:?}");
        assert_eq!(selector.matches(|key| labels.get(key).map(String::as_str)), expected);
    }
});
