//! The status file's contents and the readiness/liveness verdicts read from it (SPEC §3.1), pure.
//!
//! Owns: upstream's JSON shape (`{"Readiness":{"<key>":{"Ready":bool,"Reason":"…"}}}`) plus our
//! `Liveness` section, the in-memory board the process updates, and the rules `check-status`
//! and the HTTP probes apply (ready = at least one key and every key ready; the not-ready text
//! is the reasons joined by "; ").
//! Must not: touch files, sockets or the clock; the runtime writes what [`StatusBoard::to_json`]
//! returns and `check-status` parses what it reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upstream's readiness keys.
pub const STARTUP: &str = "Startup";
pub const CALICO_DATASTORE: &str = "CalicoDatastore";
pub const KUBE_API_SERVER: &str = "KubeAPIServer";
/// Ours: every required watch finished its first list (no GC decision before that).
pub const WATCHES_SYNCED: &str = "WatchesSynced";
/// Ours: GC decisions are not waiting on a failing or relisting watch. Written only once they
/// first wait, so a process whose watches never fail shows no such key.
pub const GC_DECISIONS: &str = "GcDecisions";
/// Ours: no destructive change waits on the mass-change guard. Written only once something
/// first waits; the reason names the held sets and the id that approves each.
pub const MASS_CHANGE_GUARD: &str = "MassChangeGuard";
/// Ours: the controller loop's heartbeat is fresh.
pub const EVENT_LOOP: &str = "EventLoop";
/// Ours: always ready; its reason lists enabled controllers this version does not implement.
pub const CONTROLLERS: &str = "Controllers";
/// Ours: the policy-name migrator's name in its readiness key ([`controller_key`]). Always
/// ready (a migrator waiting for the `calico-node` rollout holds up nothing); its reason says
/// what it waits for, what it kept and what failed; absent while the migrator is disabled.
pub const POLICY_NAME_MIGRATOR: &str = "policy-name-migrator";
/// Ours: one enabled light controller's view (`Controller:<name>`): ready once its source is
/// listed and its watch healthy; absent while the controller is disabled.
pub fn controller_key(name: &str) -> String {
    format!("Controller:{name}")
}
/// Ours: the key of a watch the apiserver refuses (`Watch:<plural>`).
pub fn watch_key(plural: &str) -> String {
    format!("Watch:{plural}")
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    #[serde(rename = "Ready")]
    pub ready: bool,
    #[serde(rename = "Reason", default)]
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    #[serde(rename = "Live")]
    pub live: bool,
    #[serde(rename = "Reason", default)]
    pub reason: String,
}

/// The whole file. Upstream's has only `Readiness`; a reader of upstream's shape ignores ours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFile {
    #[serde(rename = "Readiness", default)]
    pub readiness: BTreeMap<String, Readiness>,
    #[serde(rename = "Liveness", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub liveness: BTreeMap<String, Liveness>,
}

fn reason_or(key: &str, reason: &str, what: &str) -> String {
    if reason.is_empty() { format!("{key} is not {what}") } else { reason.to_string() }
}

impl StatusFile {
    /// `Ok(())` when ready, else the not-ready reasons joined by "; ".
    pub fn ready(&self) -> Result<(), String> {
        if self.readiness.is_empty() {
            return Err("no readiness conditions reported yet".into());
        }
        let reasons: Vec<String> = self.readiness.iter().filter(|(_, c)| !c.ready).map(|(k, c)| reason_or(k, &c.reason, "ready")).collect();
        if reasons.is_empty() { Ok(()) } else { Err(reasons.join("; ")) }
    }

    /// `Ok(())` when live. Upstream's `check-status -l` is the readiness check (§10.3), which
    /// restarts a pod merely because the apiserver is unreachable; we judge liveness on its own
    /// conditions, and fall back to readiness only for a file without any (upstream's shape).
    pub fn live(&self) -> Result<(), String> {
        if self.liveness.is_empty() {
            return self.ready();
        }
        let reasons: Vec<String> = self.liveness.iter().filter(|(_, c)| !c.live).map(|(k, c)| reason_or(k, &c.reason, "live")).collect();
        if reasons.is_empty() { Ok(()) } else { Err(reasons.join("; ")) }
    }
}

/// The process's conditions. Every setter says whether anything changed, so the file is
/// rewritten only on change (as upstream does).
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    file: StatusFile,
}

impl StatusBoard {
    pub fn set_ready(&mut self, key: &str, ready: bool, reason: impl Into<String>) -> bool {
        // A ready condition may carry a note (e.g. which controllers are not implemented).
        let next = Readiness { ready, reason: reason.into() };
        if self.file.readiness.get(key) == Some(&next) {
            return false;
        }
        self.file.readiness.insert(key.to_string(), next);
        true
    }

    pub fn set_live(&mut self, key: &str, live: bool, reason: impl Into<String>) -> bool {
        let next = Liveness { live, reason: if live { String::new() } else { reason.into() } };
        if self.file.liveness.get(key) == Some(&next) {
            return false;
        }
        self.file.liveness.insert(key.to_string(), next);
        true
    }

    /// Drops a readiness key (a check that no longer runs, e.g. health checks turned off).
    pub fn remove_ready(&mut self, key: &str) -> bool {
        self.file.readiness.remove(key).is_some()
    }

    pub fn file(&self) -> &StatusFile {
        &self.file
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.file).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_board_is_not_ready() {
        assert!(StatusBoard::default().file().ready().is_err());
    }

    #[test]
    fn ready_only_when_every_key_is_ready_and_reasons_are_joined() {
        let mut b = StatusBoard::default();
        assert!(b.set_ready(STARTUP, true, ""));
        assert!(b.set_ready(KUBE_API_SERVER, false, "apiserver /healthz: 500"));
        assert!(b.set_ready(CALICO_DATASTORE, false, "Error verifying datastore: forbidden"));
        assert_eq!(b.file().ready(), Err("Error verifying datastore: forbidden; apiserver /healthz: 500".into()));
        b.set_ready(KUBE_API_SERVER, true, "a note on a ready key is kept but is no reason");
        b.set_ready(CALICO_DATASTORE, true, "");
        assert_eq!(b.file().ready(), Ok(()));
    }

    #[test]
    fn setters_report_change_only_when_ready_or_reason_differs() {
        let mut b = StatusBoard::default();
        assert!(b.set_ready(STARTUP, false, "starting"));
        assert!(!b.set_ready(STARTUP, false, "starting"));
        assert!(b.set_ready(STARTUP, false, "still starting"));
        assert!(b.set_live(EVENT_LOOP, true, ""));
        assert!(!b.set_live(EVENT_LOOP, true, "x"));
        assert!(b.remove_ready(STARTUP));
        assert!(!b.remove_ready(STARTUP));
    }

    #[test]
    fn the_file_has_upstreams_shape_and_reads_upstream_files() {
        let mut b = StatusBoard::default();
        b.set_ready(STARTUP, true, "");
        let json: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert_eq!(json, serde_json::json!({"Readiness": {"Startup": {"Ready": true, "Reason": ""}}}));
        let upstream = r#"{"Readiness":{"Startup":{"Ready":true,"Reason":""},"KubeAPIServer":{"Ready":false,"Reason":"down"}}}"#;
        let f: StatusFile = serde_json::from_str(upstream).unwrap();
        assert_eq!(f.ready(), Err("down".into()));
        assert_eq!(f.live(), Err("down".into()), "without liveness conditions -l is -r, as upstream");
    }

    #[test]
    fn liveness_is_judged_on_its_own_conditions_when_present() {
        let mut b = StatusBoard::default();
        b.set_ready(KUBE_API_SERVER, false, "apiserver unreachable");
        b.set_live(EVENT_LOOP, true, "");
        assert_eq!(b.file().live(), Ok(()), "an unreachable apiserver is no reason to restart us");
        b.set_live(EVENT_LOOP, false, "controller loop silent for 200s");
        assert_eq!(b.file().live(), Err("controller loop silent for 200s".into()));
        b.set_ready(STARTUP, false, "");
        assert!(b.file().ready().unwrap_err().contains("Startup is not ready"));
    }
}
