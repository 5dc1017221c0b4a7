pub mod dump;
#[cfg(feature = "cli")]
pub mod live;
pub mod report;
