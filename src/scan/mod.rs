pub mod dump;
pub mod report;
