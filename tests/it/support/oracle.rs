//! The chaos suite's oracle: its own list + watch of IPAMBlocks and IPAMHandles, raw JSON over
//! the API server's HTTP interface (`serde_json::Value`, no product type, no product code),
//! recording every revision it is shown and every change between two revisions: an address that
//! left a block, a handle that went away. It then judges those changes against the workload
//! driver's [`Record`] of which pod incarnation holds what, on the one clock both share: etcd's
//! revision (every object of the cluster, pods and IPAM alike, is stamped from one counter).
//!
//! Owns: the watched state, the change log, the verdicts (live addresses released, live handles
//! deleted, leaks left). Must not: use the product's model, index or GC modules, or correct
//! the product's view: it only looks.
//!
//! A change seen in a watch event carries its exact revision. One found by a relist (after a
//! 410, the watch's resourceVersion compacted away) is known only to lie between the last
//! revision the watch delivered and the object's new revision (or the list's, for a deletion):
//! the verdicts work with that interval, and an interval that straddles the pod's deletion is
//! counted as ambiguous (the suite syncs the oracle before each fault that can cost it a watch, so
//! there are none).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncBufReadExt, StreamExt};
use kube::Client;
use serde_json::Value;

use crate::support::workload::{PodLife, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Blocks,
    Handles,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Blocks => "ipamblocks",
            Kind::Handles => "ipamhandles",
        }
    }
}

/// A block as the oracle last saw it: its allocated ordinals with their handle and sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockSeen {
    pub rv: u64,
    pub cidr: String,
    pub allocations: BTreeMap<u32, (String, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandleSeen {
    pub rv: u64,
    pub handle_id: String,
    pub blocks: BTreeMap<String, u64>,
}

/// A change between two revisions the oracle saw, at a revision in `[lo, hi]`.
#[derive(Debug, Clone)]
pub enum Change {
    Released { block: String, cidr: String, ordinal: u32, handle: String, lo: u64, hi: u64 },
    HandleDeleted { object: String, handle: String, lo: u64, hi: u64 },
}

#[derive(Debug, Default)]
pub struct OracleState {
    pub blocks: HashMap<String, BlockSeen>,
    pub handles: HashMap<String, HandleSeen>,
    /// Every revision shown, per kind: (object, revision).
    pub revisions: BTreeMap<Kind, Vec<(String, u64)>>,
    pub changes: Vec<Change>,
    /// The last revision each watch delivered (events and bookmarks) or listed at.
    pub seen_rv: BTreeMap<Kind, u64>,
    pub relists: BTreeMap<Kind, u64>,
    pub watch_restarts: BTreeMap<Kind, u64>,
}

fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// What a raw IPAMBlock holds: ordinal -> (handle, sequence). A block marked deleted holds
/// nothing. Read defensively: a malformed block is read as far as it goes.
fn read_block(object: &Value) -> BlockSeen {
    let spec = &object["spec"];
    let mut allocations = BTreeMap::new();
    if spec["deleted"] != Value::Bool(true)
        && let Some(slots) = spec["allocations"].as_array()
    {
        for (ordinal, slot) in slots.iter().enumerate() {
            let Some(index) = slot.as_u64() else { continue };
            let attribute = &spec["attributes"][index as usize];
            let Some(handle) = attribute["handle_id"].as_str() else { continue };
            let seq = num(&spec["sequenceNumberForAllocation"][ordinal.to_string()]);
            allocations.insert(ordinal as u32, (handle.to_string(), seq));
        }
    }
    BlockSeen { rv: num(&object["metadata"]["resourceVersion"]), cidr: spec["cidr"].as_str().unwrap_or_default().to_string(), allocations }
}

fn read_handle(object: &Value) -> Option<HandleSeen> {
    let spec = &object["spec"];
    if spec["deleted"] == Value::Bool(true) {
        return None;
    }
    let blocks = spec["block"].as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), num(v))).collect()).unwrap_or_default();
    Some(HandleSeen { rv: num(&object["metadata"]["resourceVersion"]), handle_id: spec["handleID"].as_str().unwrap_or_default().to_string(), blocks })
}

impl OracleState {
    fn block_changed(&mut self, name: &str, next: Option<BlockSeen>, lo: u64, hi: u64) {
        let empty = BlockSeen::default();
        let prev = self.blocks.get(name).unwrap_or(&empty);
        for (ordinal, (handle, seq)) in &prev.allocations {
            let kept = next.as_ref().and_then(|n| n.allocations.get(ordinal)).is_some_and(|(h, s)| h == handle && s == seq);
            if !kept {
                self.changes.push(Change::Released { block: name.to_string(), cidr: prev.cidr.clone(), ordinal: *ordinal, handle: handle.clone(), lo, hi });
            }
        }
        match next {
            Some(n) => {
                self.revisions.entry(Kind::Blocks).or_default().push((name.to_string(), n.rv));
                self.blocks.insert(name.to_string(), n);
            }
            None => {
                self.revisions.entry(Kind::Blocks).or_default().push((name.to_string(), hi));
                self.blocks.remove(name);
            }
        }
    }

    fn handle_changed(&mut self, name: &str, next: Option<HandleSeen>, lo: u64, hi: u64) {
        if let Some(prev) = self.handles.get(name)
            && next.is_none()
        {
            self.changes.push(Change::HandleDeleted { object: name.to_string(), handle: prev.handle_id.clone(), lo, hi });
        }
        self.revisions.entry(Kind::Handles).or_default().push((name.to_string(), next.as_ref().map_or(hi, |n| n.rv)));
        match next {
            Some(n) => self.handles.insert(name.to_string(), n),
            None => self.handles.remove(name),
        };
    }

    /// One watch event of `kind` at revision `rv`: exact.
    fn event(&mut self, kind: Kind, object: &Value, deleted: bool) {
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let rv = num(&object["metadata"]["resourceVersion"]);
        match kind {
            Kind::Blocks => self.block_changed(&name, (!deleted).then(|| read_block(object)), rv, rv),
            Kind::Handles => self.handle_changed(&name, if deleted { None } else { read_handle(object) }, rv, rv),
        }
        self.seen_rv.insert(kind, rv);
    }

    /// A full list of `kind` at revision `list_rv` after a gap: every difference from what was
    /// seen happened after the last delivered revision.
    fn relist(&mut self, kind: Kind, items: &[Value], list_rv: u64) {
        let since = self.seen_rv.get(&kind).copied().unwrap_or(0) + 1;
        let mut listed = std::collections::HashSet::new();
        for object in items {
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
            listed.insert(name.clone());
            let rv = num(&object["metadata"]["resourceVersion"]);
            match kind {
                Kind::Blocks => {
                    let next = read_block(object);
                    if self.blocks.get(&name) != Some(&next) {
                        self.block_changed(&name, Some(next), since, rv.max(since));
                    }
                }
                Kind::Handles => {
                    let next = read_handle(object);
                    if self.handles.get(&name) != next.as_ref() {
                        self.handle_changed(&name, next, since, rv.max(since));
                    }
                }
            }
        }
        let gone: Vec<String> = match kind {
            Kind::Blocks => self.blocks.keys().filter(|n| !listed.contains(*n)).cloned().collect(),
            Kind::Handles => self.handles.keys().filter(|n| !listed.contains(*n)).cloned().collect(),
        };
        for name in gone {
            match kind {
                Kind::Blocks => self.block_changed(&name, None, since, list_rv),
                Kind::Handles => self.handle_changed(&name, None, since, list_rv),
            }
        }
        self.seen_rv.insert(kind, list_rv);
        *self.relists.entry(kind).or_default() += 1;
    }
}

/// A verdict on one change against the driver's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its pod was gone, or tearing down (the driver's own CNI DEL), when it happened.
    Fine,
    /// It happened while its pod lived: a live address released, or a live handle deleted.
    Violation,
    /// Its revision interval straddles the pod's deletion or teardown.
    Ambiguous,
    /// Not the driver's (no pod of the record has this handle).
    Unknown,
}

/// Judges a change in `[lo, hi]` to something of `pod`.
pub fn judge(pod: Option<&PodLife>, lo: u64, hi: u64) -> Verdict {
    let Some(pod) = pod else { return Verdict::Unknown };
    // From the teardown on, its addresses may go.
    let (gone_from, gone_by) = match (pod.deleted_rv, pod.deleted_between, pod.teardown_rv) {
        (_, _, Some(t)) => (t + 1, t + 1),
        (Some(d), _, None) => (d, d),
        (None, Some((after, by)), None) => (after + 1, by),
        (None, None, None) => (u64::MAX, u64::MAX),
    };
    if lo >= gone_by {
        Verdict::Fine
    } else if hi < gone_from {
        Verdict::Violation
    } else {
        Verdict::Ambiguous
    }
}

/// What the oracle found, for the figures and the assertions.
#[derive(Debug, Default)]
pub struct Findings {
    pub releases: u64,
    pub handle_deletions: u64,
    pub live_released: Vec<String>,
    pub live_handles_deleted: Vec<String>,
    pub ambiguous: Vec<String>,
    pub unknown: u64,
}

/// Leaks and losses in the oracle's current state, by the driver's record.
#[derive(Debug, Default)]
pub struct Leaks {
    /// Allocations of pods that are gone.
    pub addresses: Vec<String>,
    /// Handles of pods that are gone.
    pub handles: Vec<String>,
    /// Addresses of live pods missing from their blocks (or held by another handle).
    pub live_missing: Vec<String>,
    /// Handles of live pods missing.
    pub live_handles_missing: Vec<String>,
    /// Allocations whose handle no pod of the record has.
    pub unknown: Vec<String>,
}

impl Leaks {
    pub fn leak_count(&self) -> usize {
        self.addresses.len() + self.handles.len()
    }
}

pub struct Oracle {
    pub state: Arc<Mutex<OracleState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Oracle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Oracle {
    /// Starts one watch per kind; returns once both have listed.
    pub async fn start(client: &Client) -> Oracle {
        let state: Arc<Mutex<OracleState>> = Arc::default();
        let tasks = [Kind::Blocks, Kind::Handles].into_iter().map(|kind| tokio::spawn(watch_kind(client.clone(), kind, state.clone()))).collect();
        let oracle = Oracle { state, tasks };
        for _ in 0..300 {
            if oracle.state.lock().unwrap().seen_rv.len() == 2 {
                return oracle;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the oracle's watches did not list within 30 s");
    }

    /// Waits until the watch of `kind` delivered revision `rv` or later.
    pub async fn wait_seen(&self, kind: Kind, rv: u64, within: Duration) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if self.state.lock().unwrap().seen_rv.get(&kind).is_some_and(|r| *r >= rv) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// How many addresses of `handles` the oracle saw leave their blocks.
    pub fn releases_of(&self, handles: &std::collections::HashSet<String>) -> usize {
        let state = self.state.lock().unwrap();
        state.changes.iter().filter(|c| matches!(c, Change::Released { handle, .. } if handles.contains(handle))).count()
    }


    /// The names of the objects of `kind` the oracle sees now.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        let s = self.state.lock().unwrap();
        match kind {
            Kind::Blocks => s.blocks.keys().cloned().collect(),
            Kind::Handles => s.handles.keys().cloned().collect(),
        }
    }

    /// Every change judged against `record`.
    pub fn findings(&self, record: &Record) -> Findings {
        let state = self.state.lock().unwrap();
        let mut f = Findings::default();
        for change in &state.changes {
            let (what, handle, lo, hi, is_release) = match change {
                Change::Released { block, cidr, ordinal, handle, lo, hi } => {
                    (format!("{} (block {block} ordinal {ordinal}, handle {handle})", crate::support::workload::ordinal_ip(cidr, *ordinal)), handle, *lo, *hi, true)
                }
                Change::HandleDeleted { object, handle, lo, hi } => (format!("handle {handle} (object {object})"), handle, *lo, *hi, false),
            };
            if is_release {
                f.releases += 1;
            } else {
                f.handle_deletions += 1;
            }
            let pod = record.pod_of_handle(handle);
            let who = pod
                .map(|p| format!("pod {}/{} uid {} on node {} (deleted at {:?} / between {:?}, teardown at {:?})", p.namespace, p.name, p.uid, p.node, p.deleted_rv, p.deleted_between, p.teardown_rv))
                .unwrap_or_default();
            let line = format!("{what} at revision {lo}..={hi}, {who}");
            match judge(pod, lo, hi) {
                Verdict::Fine => {}
                Verdict::Violation if is_release => f.live_released.push(line),
                Verdict::Violation => f.live_handles_deleted.push(line),
                Verdict::Ambiguous => f.ambiguous.push(line),
                Verdict::Unknown => f.unknown += 1,
            }
        }
        f
    }

    /// Leaks and losses in the current state.
    pub fn leaks(&self, record: &Record) -> Leaks {
        let state = self.state.lock().unwrap();
        leaks_in(&state.blocks, &state.handles, record)
    }

    /// Lists both kinds afresh and checks that the watched state equals them: the oracle's own
    /// view was whole.
    pub async fn check_against_list(&self, client: &Client) -> Result<(), String> {
        let (blocks, _) = list_all(client, Kind::Blocks).await.map_err(|e| e.to_string())?;
        let (handles, _) = list_all(client, Kind::Handles).await.map_err(|e| e.to_string())?;
        let state = self.state.lock().unwrap();
        for b in &blocks {
            let name = b["metadata"]["name"].as_str().unwrap_or_default();
            if state.blocks.get(name) != Some(&read_block(b)) {
                return Err(format!("block {name}: watched {:?}, listed {:?}", state.blocks.get(name), read_block(b)));
            }
        }
        let listed: Vec<(String, Option<HandleSeen>)> = handles.iter().map(|h| (h["metadata"]["name"].as_str().unwrap_or_default().to_string(), read_handle(h))).collect();
        for (name, h) in &listed {
            if state.handles.get(name) != h.as_ref() {
                return Err(format!("handle {name}: watched {:?}, listed {h:?}", state.handles.get(name)));
            }
        }
        if state.blocks.len() != blocks.len() || state.handles.len() != listed.iter().filter(|(_, h)| h.is_some()).count() {
            return Err(format!("watched {} blocks and {} handles, listed {} and {}", state.blocks.len(), state.handles.len(), blocks.len(), listed.len()));
        }
        Ok(())
    }
}

fn leaks_in(blocks: &HashMap<String, BlockSeen>, handles: &HashMap<String, HandleSeen>, record: &Record) -> Leaks {
    let mut leaks = Leaks::default();
    let mut held: HashMap<(&str, u32), &str> = HashMap::new();
    for (name, b) in blocks {
        for (ordinal, (handle, _)) in &b.allocations {
            held.insert((name.as_str(), *ordinal), handle.as_str());
            let ip = crate::support::workload::ordinal_ip(&b.cidr, *ordinal);
            match record.pod_of_handle(handle) {
                Some(p) if !p.alive() => leaks.addresses.push(format!("{ip} of pod {}/{} (uid {}, handle {handle})", p.namespace, p.name, p.uid)),
                Some(_) => {}
                None => leaks.unknown.push(format!("{ip} in block {name}, handle {handle}")),
            }
        }
    }
    for h in handles.values() {
        if let Some(p) = record.pod_of_handle(&h.handle_id)
            && !p.alive()
        {
            leaks.handles.push(format!("handle {} of pod {}/{} (uid {})", h.handle_id, p.namespace, p.name, p.uid));
        }
    }
    for p in record.pods.values().filter(|p| p.alive()) {
        for a in &p.addresses {
            if held.get(&(a.block.as_str(), a.ordinal)) != Some(&p.handle.as_str()) {
                leaks.live_missing.push(format!("{} of live pod {}/{} (uid {}, block {})", a.ip, p.namespace, p.name, p.uid, a.block));
            }
        }
        // By its object name (the handle ID lowercased): an impostor carrying the same ID under
        // another name does not count.
        if !p.addresses.is_empty() && handles.get(&p.handle.to_lowercase()).is_none_or(|h| h.handle_id != p.handle) {
            leaks.live_handles_missing.push(format!("handle {} of live pod {}/{}", p.handle, p.namespace, p.name));
        }
    }
    leaks
}

/// A paged LIST of `kind` as raw JSON: its items and the list's revision.
async fn list_all(client: &Client, kind: Kind) -> Result<(Vec<Value>, u64), kube::Error> {
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut uri = format!("/apis/crd.projectcalico.org/v1/{}?limit=500", kind.plural());
        if let Some(t) = &token {
            uri.push_str(&format!("&continue={t}"));
        }
        let page: Value = client.request(http::Request::get(uri).body(Vec::new()).expect("a request")).await?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["metadata"]["continue"].as_str().filter(|c| !c.is_empty()) {
            Some(t) => token = Some(t.to_string()),
            None => return Ok((items, num(&page["metadata"]["resourceVersion"]))),
        }
    }
}

/// One kind's list + watch, forever: a broken watch resumes from the last delivered revision;
/// a 410 (that revision compacted away) lists again.
async fn watch_kind(client: Client, kind: Kind, state: Arc<Mutex<OracleState>>) {
    let mut from: Option<u64> = None;
    loop {
        let Some(rv) = from else {
            match list_all(&client, kind).await {
                Ok((items, list_rv)) => {
                    let mut s = state.lock().unwrap();
                    if s.seen_rv.contains_key(&kind) {
                        s.relist(kind, &items, list_rv);
                    } else {
                        for object in &items {
                            s.event(kind, object, false);
                        }
                        s.seen_rv.insert(kind, list_rv);
                    }
                    from = Some(list_rv);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            continue;
        };
        let uri = format!("/apis/crd.projectcalico.org/v1/{}?watch=1&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=60", kind.plural());
        let stream = match client.request_stream(http::Request::get(uri).body(Vec::new()).expect("a request")).await {
            Ok(s) => s,
            Err(kube::Error::Api(status)) if status.code == 410 => {
                from = None;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut lines = Box::pin(stream).lines();
        while let Some(Ok(line)) = lines.next().await {
            let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
            let object = &event["object"];
            match event["type"].as_str() {
                Some("ADDED") | Some("MODIFIED") => state.lock().unwrap().event(kind, object, false),
                Some("DELETED") => state.lock().unwrap().event(kind, object, true),
                Some("BOOKMARK") => {
                    state.lock().unwrap().seen_rv.insert(kind, num(&object["metadata"]["resourceVersion"]));
                }
                _ => {
                    // ERROR: 410 Gone means the revision was compacted away; anything else, retry.
                    if num(&object["code"]) == 410 {
                        from = None;
                    }
                    break;
                }
            }
            from = from.map(|_| state.lock().unwrap().seen_rv.get(&kind).copied().unwrap_or(rv));
        }
        *state.lock().unwrap().watch_restarts.entry(kind).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn life(deleted: Option<u64>, teardown: Option<u64>) -> PodLife {
        PodLife {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            node: "n".into(),
            handle: "h".into(),
            addresses: Vec::new(),
            last_rv: 10,
            deleted_rv: deleted,
            deleted_between: None,
            teardown_rv: teardown,
            leaked: teardown.is_none(),
        }
    }

    #[test]
    fn a_release_before_the_pods_deletion_is_a_violation_and_after_it_fine() {
        assert_eq!(judge(Some(&life(None, None)), 50, 50), Verdict::Violation, "the pod lives");
        assert_eq!(judge(Some(&life(Some(40), None)), 30, 30), Verdict::Violation);
        assert_eq!(judge(Some(&life(Some(40), None)), 41, 41), Verdict::Fine);
        assert_eq!(judge(Some(&life(Some(40), None)), 35, 45), Verdict::Ambiguous, "a relist interval across the deletion");
        assert_eq!(judge(Some(&life(Some(40), Some(20))), 25, 25), Verdict::Fine, "during its own teardown");
        assert_eq!(judge(Some(&life(Some(40), Some(20))), 15, 15), Verdict::Violation, "before its teardown");
        assert_eq!(judge(None, 1, 1), Verdict::Unknown);
    }

    #[test]
    fn a_block_revision_that_drops_or_reuses_an_ordinal_is_a_release() {
        let mut s = OracleState::default();
        let block = |rv: u64, allocations: Value, attributes: Value, seqs: Value| {
            json!({"metadata": {"name": "b", "resourceVersion": rv.to_string()}, "spec": {"cidr": "10.0.0.0/30", "allocations": allocations, "attributes": attributes, "sequenceNumberForAllocation": seqs}})
        };
        s.event(Kind::Blocks, &block(5, json!([0, 1, null, null]), json!([{"handle_id": "a"}, {"handle_id": "b"}]), json!({"0": 1, "1": 2})), false);
        // Ordinal 0 released, ordinal 1 kept (attribute renumbered), then 1 reallocated to another handle.
        s.event(Kind::Blocks, &block(6, json!([null, 0, null, null]), json!([{"handle_id": "b"}]), json!({"1": 2})), false);
        s.event(Kind::Blocks, &block(7, json!([null, 0, null, null]), json!([{"handle_id": "c"}]), json!({"1": 3})), false);
        let released: Vec<(String, u64)> = s.changes.iter().filter_map(|c| match c {
            Change::Released { handle, lo, .. } => Some((handle.clone(), *lo)),
            _ => None,
        }).collect();
        assert_eq!(released, vec![("a".to_string(), 6), ("b".to_string(), 7)]);
        // A relist after a gap: the deleted block's allocation is released somewhere in the gap.
        s.relist(Kind::Blocks, &[], 20);
        assert!(matches!(s.changes.last(), Some(Change::Released { handle, lo: 8, hi: 20, .. }) if handle == "c"));
    }
}
