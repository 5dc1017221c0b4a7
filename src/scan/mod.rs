pub mod dump;
// etcdctl's JSON is base64 inside: read with the `cli` build's base64 (the pure core has none).
#[cfg(feature = "cli")]
pub mod etcd_dump;
pub mod merge;
pub mod objects;
pub mod order;
pub mod live;
pub mod loadbalancer;
pub mod report;
pub mod save;
