pub mod dump;
pub mod etcd_dump;
pub mod merge;
pub mod order;
pub mod live;
pub mod report;
pub mod save;
