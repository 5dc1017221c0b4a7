pub mod dump;
pub mod merge;
pub mod live;
pub mod report;
