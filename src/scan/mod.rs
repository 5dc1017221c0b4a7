pub mod dump;
pub mod live;
pub mod report;
