//! Shared helpers for the integration tests. Owns nothing of the product; only test plumbing.

pub mod cluster;
pub mod controller;
pub mod audit;
pub mod ha;
pub mod ipam;
pub mod oracle;
pub mod workload;

/// An empty scratch directory `<label>-<pid>` under the test target's tmp dir (emptied first, so
/// a rerun starts clean).
pub fn scratch_dir(label: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
