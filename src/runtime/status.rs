//! The status file and the conditions behind `/readiness` and `/liveness`: one board, updated by
//! the startup, health, watch and controller tasks, and written to `--status-file` (upstream's
//! `/status/status.json`) whenever a condition changes.
//!
//! Owns: file writing (mkdir -p, write to a temporary name, rename, so `check-status` never reads
//! half a file) and the controller loop's heartbeat.
//! Must not: decide readiness rules (`crate::health` does) or fail the process: a status
//! directory that cannot be created is a warning, and the HTTP probes keep working.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::health::{self, Liveness, StatusBoard, StatusFile};

/// Upstream's default `--status-file`.
pub const DEFAULT_STATUS_FILE: &str = "/status/status.json";

/// The controller loop beats at least this often while idle (see `ipam_gc`).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A heartbeat older than this means the loop is wedged and the process should be restarted.
/// The loop never waits on a write (the executor task runs them), so its longest legitimate
/// silence is applying one batch of inputs or one pass (well under a second at 250k
/// allocations); 300 s leaves room for a starved 2-core node, and with the kubelet's 6 × 10 s
/// failure threshold a wedged loop is restarted within 6 min.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct StatusReporter {
    board: Mutex<StatusBoard>,
    path: Option<PathBuf>,
    warned: AtomicBool,
    /// tokio's clock, so loop tests on a paused runtime see the heartbeat age as the loop does.
    heartbeat: Mutex<Option<tokio::time::Instant>>,
}

impl StatusReporter {
    pub fn new(path: Option<PathBuf>) -> Self {
        StatusReporter { path, ..Default::default() }
    }

    pub fn set_ready(&self, key: &str, ready: bool, reason: impl Into<String>) {
        self.update(|b| b.set_ready(key, ready, reason));
    }

    pub fn set_live(&self, key: &str, live: bool, reason: impl Into<String>) {
        self.update(|b| b.set_live(key, live, reason));
    }

    pub fn remove_ready(&self, key: &str) {
        self.update(|b| b.remove_ready(key));
    }

    /// A light controller's view of its source as its readiness key
    /// ([`health::controller_key`]): absent while the controller is disabled, not ready until the
    /// source's first list and while its watch fails (the reason says which and why).
    pub fn controller_view(&self, controller: &str, source: &str, enabled: bool, synced: bool, failing: Option<&str>) {
        let key = health::controller_key(controller);
        match failing {
            _ if !enabled => self.remove_ready(&key),
            Some(reason) => self.set_ready(&key, false, format!("{controller}: the {source} watch failed: {reason}")),
            None if !synced => self.set_ready(&key, false, format!("{controller}: waiting for the first list of {source}")),
            None => self.set_ready(&key, true, ""),
        }
    }

    /// A copy of the current conditions.
    pub fn snapshot(&self) -> StatusFile {
        self.board.lock().unwrap_or_else(|p| p.into_inner()).file().clone()
    }

    pub fn beat(&self) {
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// Time since the controller loop last beat; `None` before it started.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed())
    }

    /// Liveness: the recorded conditions, plus the heartbeat judged now (so a wedged loop shows
    /// even when no task is left to record it).
    pub fn live(&self) -> Result<(), String> {
        let mut file = self.snapshot();
        if let Some(age) = self.heartbeat_age()
            && age > HEARTBEAT_STALE
        {
            file.liveness.insert(
                crate::health::EVENT_LOOP.into(),
                Liveness { live: false, reason: format!("controller loop silent for {}s", age.as_secs()) },
            );
        }
        if file.liveness.is_empty() {
            // Nothing recorded yet: the process answers, so it is alive.
            return Ok(());
        }
        file.live()
    }

    fn update(&self, f: impl FnOnce(&mut StatusBoard) -> bool) {
        // The lock is held across the small file write so that writes land in change order.
        let board = &mut *self.board.lock().unwrap_or_else(|p| p.into_inner());
        if !f(board) {
            return;
        }
        let Some(path) = &self.path else { return };
        if let Err(e) = write_atomically(path, board.to_json().as_bytes()) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the status file; check-status will not see our state (HTTP probes still work)");
            }
        } else {
            self.warned.store(false, Ordering::Relaxed);
        }
    }
}

/// Writes `bytes` to `path` (creating its folder) through a temporary name and a rename, so a
/// reader never sees half a file. Also used for `--leak-report-file`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{STARTUP, StatusFile};

    #[test]
    fn a_controllers_view_is_its_readiness_key_only_while_it_is_enabled() {
        let r = StatusReporter::new(None);
        let key = health::controller_key("namespace");
        let reason = |r: &StatusReporter| r.snapshot().readiness.get(&key).map(|c| (c.ready, c.reason.clone()));
        r.controller_view("namespace", "namespaces", true, false, None);
        assert_eq!(reason(&r), Some((false, "namespace: waiting for the first list of namespaces".into())));
        r.controller_view("namespace", "namespaces", true, true, None);
        assert_eq!(reason(&r), Some((true, String::new())));
        r.controller_view("namespace", "namespaces", true, true, Some("403 forbidden"));
        assert_eq!(reason(&r), Some((false, "namespace: the namespaces watch failed: 403 forbidden".into())));
        r.controller_view("namespace", "namespaces", false, true, Some("403 forbidden"));
        assert_eq!(reason(&r), None, "a disabled controller holds up nothing");
    }

    #[test]
    fn the_file_is_written_on_change_and_parses_back() {
        let dir = std::env::temp_dir().join(format!("ckc-status-{}", std::process::id()));
        let path = dir.join("nested/status.json");
        let r = StatusReporter::new(Some(path.clone()));
        r.set_ready(STARTUP, false, "starting");
        let f: StatusFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(f.ready(), Err("starting".into()));
        r.set_ready(STARTUP, true, "");
        let f: StatusFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(f.ready(), Ok(()));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_unwritable_status_path_is_not_fatal() {
        let r = StatusReporter::new(Some(PathBuf::from("/proc/self/no-such-dir/status.json")));
        r.set_ready(STARTUP, true, "");
        assert_eq!(r.snapshot().ready(), Ok(()));
    }

    #[test]
    fn a_stale_heartbeat_fails_liveness() {
        let r = StatusReporter::new(None);
        assert_eq!(r.live(), Ok(()));
        *r.heartbeat.lock().unwrap() = tokio::time::Instant::now().checked_sub(HEARTBEAT_STALE + Duration::from_secs(1));
        if r.heartbeat_age().is_some() {
            assert!(r.live().unwrap_err().contains("controller loop silent"));
        }
        r.beat();
        assert_eq!(r.live(), Ok(()));
    }
}
