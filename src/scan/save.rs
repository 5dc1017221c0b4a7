//! `leak-scan --save-dump DIR`: a complete dump of a live cluster, read in the safe order, each
//! part one typed List file with the resourceVersion its LIST answered.
//!
//! Owns: which resources are read, in which order (IPAM first, then Nodes, Namespaces, Pods,
//! Services: a pod or Service created between two reads then has no allocation in the dump, so
//! its address cannot look leaked or unwanted), and the file format (what `kubectl get --raw` returns, pages joined).
//! Must not: write to the cluster, or hold more than one page of objects.

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Objects a LIST page asks for: the same as the controller's lists.
pub const SAVE_PAGE: u32 = 500;

/// One part of the dump: its file, its API path, and whether a cluster must serve it.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    pub file: &'static str,
    pub path: &'static str,
    pub required: bool,
}

const fn part(file: &'static str, path: &'static str, required: bool) -> Part {
    Part { file, path, required }
}

/// The safe order. The IPAM kinds come first (blocks before handles, as the CNI writes them the
/// other way round), the facts after.
pub const SAVE_ORDER: [Part; 12] = [
    part("01-ipamblocks.json", "/apis/crd.projectcalico.org/v1/ipamblocks", true),
    part("02-blockaffinities.json", "/apis/crd.projectcalico.org/v1/blockaffinities", false),
    part("03-ipamhandles.json", "/apis/crd.projectcalico.org/v1/ipamhandles", false),
    part("04-ippools.json", "/apis/crd.projectcalico.org/v1/ippools", false),
    part("05-ipreservations.json", "/apis/crd.projectcalico.org/v1/ipreservations", false),
    part("06-ipamconfigs.json", "/apis/crd.projectcalico.org/v1/ipamconfigs", false),
    part("07-clusterinformations.json", "/apis/crd.projectcalico.org/v1/clusterinformations", false),
    part("08-kubecontrollersconfigurations.json", "/apis/crd.projectcalico.org/v1/kubecontrollersconfigurations", false),
    part("09-nodes.json", "/api/v1/nodes", true),
    part("10-namespaces.json", "/api/v1/namespaces", true),
    part("11-pods.json", "/api/v1/pods", true),
    // After IPAM, for the LoadBalancer addresses: a Service created in between holds no address
    // in the dump rather than one that looks unwanted.
    part("12-services.json", "/api/v1/services", false),
];

/// A failed LIST: the HTTP status (0 when there was none) and what was said.
#[derive(Debug, Clone)]
pub struct ListFailure {
    pub status: u16,
    pub message: String,
}

/// Reads one LIST page of `path` (`continue_token` from the previous page).
pub trait PageReader {
    fn page(&self, path: &str, limit: u32, continue_token: Option<&str>) -> impl Future<Output = Result<Value, ListFailure>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("listing {path}: HTTP {status}: {message}")]
    List { path: String, status: u16, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("listing {path}: the answer is not a List: {problem}")]
    NotAList { path: String, problem: String },
}

/// What was written for one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedPart {
    pub file: PathBuf,
    pub kind: String,
    pub resource_version: String,
    pub items: u64,
}

/// Writes every part of [`SAVE_ORDER`] into `dir` (created if needed), in that order. A part
/// the cluster does not serve (404) is skipped unless it is required.
pub async fn save_dump<R: PageReader>(reader: &R, dir: &Path) -> Result<Vec<SavedPart>, SaveError> {
    fs::create_dir_all(dir).map_err(|source| SaveError::Io { path: dir.to_path_buf(), source })?;
    let mut saved = Vec::new();
    for part in SAVE_ORDER {
        let path = dir.join(part.file);
        match save_part(reader, part, &path).await {
            Ok(p) => saved.push(p),
            Err(SaveError::List { status: 404, .. }) if !part.required => {}
            Err(e) => return Err(e),
        }
    }
    Ok(saved)
}

async fn save_part<R: PageReader>(reader: &R, part: Part, path: &Path) -> Result<SavedPart, SaveError> {
    let io = |source| SaveError::Io { path: path.to_path_buf(), source };
    let list_error = |f: ListFailure| SaveError::List { path: part.path.to_string(), status: f.status, message: f.message };
    let mut first = reader.page(part.path, SAVE_PAGE, None).await.map_err(list_error)?;
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = text(&first, "kind");
    let api_version = text(&first, "apiVersion");
    // Every page of one paged LIST is of the first page's snapshot: its version is the part's.
    let resource_version = first.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    if !first.get("items").is_some_and(Value::is_array) {
        return Err(SaveError::NotAList { path: part.path.to_string(), problem: "no `items` array".into() });
    }
    // Written under a temporary name: a half-written part must never pass for a dump file.
    let partial = path.with_extension("json.partial");
    let mut out = BufWriter::with_capacity(1 << 16, File::create(&partial).map_err(io)?);
    let head = serde_json::json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": resource_version}});
    let head = serde_json::to_string(&head).unwrap_or_default();
    // `{"kind":…,"metadata":{…}` then `,"items":[…]}`: kind and version come before the items,
    // as in the API server's own answer, so a reader knows what the items are.
    write!(out, "{},\"items\":[", head.strip_suffix('}').unwrap_or(&head)).map_err(io)?;
    let mut items = 0u64;
    let mut page = Some(first.take());
    while let Some(mut current) = page.take() {
        if let Some(Value::Array(objects)) = current.get_mut("items").map(Value::take) {
            for object in objects {
                if items > 0 {
                    out.write_all(b",\n").map_err(io)?;
                }
                serde_json::to_writer(&mut out, &object).map_err(|e| io(e.into()))?;
                items += 1;
            }
        }
        let token = current.pointer("/metadata/continue").and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_string);
        if let Some(token) = token {
            page = Some(reader.page(part.path, SAVE_PAGE, Some(&token)).await.map_err(list_error)?);
        }
    }
    out.write_all(b"]}\n").map_err(io)?;
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    fs::rename(&partial, path).map_err(io)?;
    Ok(SavedPart { file: path.to_path_buf(), kind, resource_version, items })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::block_on;
    use crate::scan::order::{dump_order, OrderState};
    use serde_json::json;
    use std::sync::Mutex;

    /// A cluster that answers pages of two objects, with a version that grows per LIST, and
    /// records the order of the reads.
    struct FakeCluster {
        reads: Mutex<Vec<String>>,
        revision: Mutex<u64>,
    }

    impl PageReader for FakeCluster {
        fn page(&self, path: &str, _limit: u32, token: Option<&str>) -> impl Future<Output = Result<Value, ListFailure>> + Send {
            self.reads.lock().unwrap().push(path.to_string());
            let resource = path.rsplit('/').next().unwrap_or_default().to_string();
            let rv = {
                let mut r = self.revision.lock().unwrap();
                if token.is_none() {
                    *r += 1;
                }
                *r
            };
            let answer = match resource.as_str() {
                "ipreservations" => Err(ListFailure { status: 404, message: "not served".into() }),
                "ipamblocks" => Ok(json!({"kind": "IPAMBlockList", "apiVersion": "crd.projectcalico.org/v1", "metadata": {"resourceVersion": rv.to_string()},
                    "items": [{"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-30"},
                               "spec": {"cidr": "10.0.0.0/30", "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                                        "attributes": [{"handle_id": "h", "secondary": {"namespace": "ns", "pod": "gone", "node": "n1"}}]}}]})),
                "nodes" => Ok(json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": [{"metadata": {"name": "n1"}}]})),
                "pods" => {
                    // Two pages: the continue token must be followed.
                    let (items, next) = match token {
                        None => (vec![json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1"}})], "more"),
                        Some(_) => (vec![json!({"metadata": {"name": "b", "namespace": "ns"}, "spec": {"nodeName": "n1"}})], ""),
                    };
                    Ok(json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string(), "continue": next}, "items": items}))
                }
                _ => Ok(json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": []})),
            };
            std::future::ready(answer)
        }
    }

    #[test]
    fn a_saved_dump_is_read_in_the_safe_order_and_scans_as_such() {
        let dir = std::env::temp_dir().join(format!("save-dump-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let cluster = FakeCluster { reads: Mutex::new(Vec::new()), revision: Mutex::new(0) };
        let saved = block_on(save_dump(&cluster, &dir)).unwrap();
        let reads = cluster.reads.lock().unwrap().clone();
        let position = |p: &str| reads.iter().position(|r| r.ends_with(p)).unwrap();
        assert!(position("ipamblocks") < position("nodes") && position("nodes") < position("namespaces") && position("namespaces") < position("pods"));
        assert_eq!(saved.len(), SAVE_ORDER.len() - 1, "the unserved optional part is skipped");
        let pods = saved.iter().find(|p| p.kind == "PodList").unwrap();
        assert_eq!(pods.items, 2);
        let mut contents = crate::scan::dump::read_paths(std::slice::from_ref(&dir), &mut |_, _| {}).unwrap();
        assert_eq!(contents.kind_counts.get("Pod"), Some(&2));
        assert_eq!(dump_order(&contents).state, OrderState::Safe);
        assert!(fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().path().to_string_lossy().ends_with(".partial")));
        let r = crate::scan::report::scan_dump(&mut contents, 1_800_000_000_000, &Default::default()).unwrap();
        assert_eq!(r.leaks.len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_required_part_the_cluster_does_not_serve_is_an_error() {
        struct NoCalico;
        impl PageReader for NoCalico {
            fn page(&self, _: &str, _: u32, _: Option<&str>) -> impl Future<Output = Result<Value, ListFailure>> + Send {
                std::future::ready(Err(ListFailure { status: 404, message: "the server could not find the requested resource".into() }))
            }
        }
        let dir = std::env::temp_dir().join(format!("save-dump-none-{}", std::process::id()));
        let err = block_on(save_dump(&NoCalico, &dir)).unwrap_err();
        assert!(err.to_string().contains("ipamblocks: HTTP 404"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
