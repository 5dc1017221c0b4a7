//! Any bytes as the answer to an etcd discovery query: reading it never panics or loops; what
//! it reads is sorted, free of duplicates and names no empty target; and an answer built from
//! the records read reads back to the same records.
#![no_main]
use calico_kube_controllers::datastore::dns_srv::{Answer, answer, parse, query};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "_etcd-client-ssl._tcp.example.com";

fuzz_target!(|data: &[u8]| {
    let id = data.first().map_or(0, |b| u16::from(*b) << 8 | 0x5a);
    // Raw bytes as they came, and the same bytes after a well-formed question.
    let q = query(id, NAME).expect("a valid name");
    let mut framed = q.clone();
    framed[2] = 0x81;
    framed.extend_from_slice(data);
    for msg in [data, framed.as_slice()] {
        let Ok(Answer::Records(records)) = parse(id, NAME, msg) else { continue };
        assert!(!records.is_empty());
        assert!(records.windows(2).all(|w| (w[0].priority, std::cmp::Reverse(w[0].weight)) <= (w[1].priority, std::cmp::Reverse(w[1].weight)) && w[0] != w[1]), "{records:?}");
        assert!(records.iter().all(|r| !r.target.is_empty()));
        // Targets with labels DNS cannot carry (empty, too long, holding dots) do not round-trip.
        if records.iter().all(|r| r.target.split('.').all(|l| !l.is_empty() && l.len() <= 63)) {
            let tuples: Vec<(u16, u16, u16, &str)> = records.iter().map(|r| (r.priority, r.weight, r.port, r.target.as_str())).collect();
            let rebuilt = answer(&q, 0x8180, &tuples);
            assert_eq!(parse(id, NAME, &rebuilt), Ok(Answer::Records(records.clone())));
        }
    }
});
