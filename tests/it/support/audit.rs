//! Reading the test cluster's audit log (JSON lines, one `ResponseComplete` event per request,
//! level Metadata; see `launch_apiserver` in scripts/test-cluster.sh) to prove what a controller
//! asked the API server: which verbs, by whom, with which answers. Test plumbing only.

use std::path::Path;

use calico_kube_controllers::model::time::parse_rfc3339;
use serde_json::Value;

/// One finished request.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub verb: String,
    pub user: String,
    pub user_agent: String,
    pub resource: String,
    /// `status`, `scale`, …; empty for the resource itself.
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub code: u16,
    /// When the API server received the request, Unix milliseconds.
    pub received_ms: i64,
}

impl AuditEvent {
    pub fn is_write(&self) -> bool {
        matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete" | "deletecollection")
    }

    pub fn is_ipam(&self) -> bool {
        matches!(self.resource.as_str(), "ipamblocks" | "ipamhandles" | "blockaffinities")
    }

    pub fn is_ipam_write(&self) -> bool {
        self.is_ipam() && self.is_write()
    }

    /// `verb resource[/subresource]`, as RBAC rules name what they grant.
    pub fn rbac_pair(&self) -> String {
        if self.subresource.is_empty() { format!("{} {}", self.verb, self.resource) } else { format!("{} {}/{}", self.verb, self.resource, self.subresource) }
    }

    /// Sent by the controller replica named `pod_name` (its User-Agent ends with `(pod_name)`).
    pub fn sent_by(&self, pod_name: &str) -> bool {
        self.user_agent.starts_with("calico-kube-controllers/") && self.user_agent.ends_with(&format!("({pod_name})"))
    }
}

/// Every finished or started (watch) request in `DIR/audit.log` (and its rotated predecessor, if any), oldest first.
pub fn read(cluster_dir: &Path) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(cluster_dir)
        .expect("reading the cluster directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("audit") && n.contains(".log")))
        .collect();
    files.sort();
    // A watch is logged when its response starts and again when it ends, which for a watch still
    // open (or one whose end the API server has not flushed yet) is later than the test reads
    // the log: each request counts once, from the first of its stages seen.
    let mut seen = std::collections::HashSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
            if v["stage"] != "ResponseComplete" && v["stage"] != "ResponseStarted" {
                continue;
            }
            if !seen.insert(v["auditID"].as_str().unwrap_or_default().to_string()) {
                continue;
            }
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            events.push(AuditEvent {
                verb: s(&v["verb"]),
                user: s(&v["user"]["username"]),
                user_agent: s(&v["userAgent"]),
                resource: s(&v["objectRef"]["resource"]),
                subresource: s(&v["objectRef"]["subresource"]),
                namespace: s(&v["objectRef"]["namespace"]),
                name: s(&v["objectRef"]["name"]),
                code: v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                received_ms: v["requestReceivedTimestamp"].as_str().and_then(parse_rfc3339).unwrap_or(0),
            });
        }
    }
    events.sort_by_key(|e| e.received_ms);
    events
}

/// Wall-clock now in Unix milliseconds, comparable with [`AuditEvent::received_ms`] (the API
/// server runs on this machine).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
