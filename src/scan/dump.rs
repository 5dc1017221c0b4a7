//! Reading `kubectl get … -o json|yaml` dumps for `leak-scan`: files and folders in, the trimmed
//! objects the GC needs out ([`DumpContents`]).
//!
//! Owns: finding dump files, cutting them into objects, sending each object to the model type of
//! its kind, and the rule that one malformed object is reported (`invalid`) while a file that is
//! not JSON or YAML at all is an error.
//!
//! JSON is streamed. A small structural scanner ([`JsonScanner`]: strings, escapes, bracket depth,
//! nothing more) reads the file through a fixed buffer and cuts out the byte extent of every item
//! of a `List` (or every top-level object, for a single object or concatenated values). Items are
//! gathered into batches of a few MiB; each batch is parsed in parallel with rayon while the next
//! one is being read, and results are merged in input order. Peak memory is two batches of raw
//! text plus the compact results: pods are trimmed to [`PodFacts`] as they arrive.
//!
//! YAML is streamed too: serde-saphyr's reader parses document by document on a thread of its
//! own and hands every item (the items of a `kind: List` document one by one) over as JSON text
//! through a bounded channel, to the same per-item parser, so both formats agree.
//!
//! A List's own `kind` and `metadata.resourceVersion` are kept ([`DumpList`]): they tell the
//! order the parts were read in, and a typed List's kind (`PodList`) is the kind of its items,
//! which the API server writes without one. Second copies of an object are judged by
//! [`super::merge`] as they arrive.
//!
//! Must not: keep whole pods, panic or loop on any input, touch the network or the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::merge::{self, Duplicate, Verdict};
use crate::ipam::index::IpamIndex;
use crate::model::{
    BlockAffinity, ClusterInformation, InvalidObject, IpPool, IpReservation, IpamBlock, IpamConfig, IpamHandle,
    KubeControllersConfiguration, NodeLite, Object, PodFacts, PodLite, CALICO_API_VERSION,
};

/// Read size. 1 MiB makes read calls free next to parsing while staying cache-friendly.
const READ_CHUNK: usize = 1 << 20;
/// Raw item text gathered before a parallel parse. 4 MiB is ~1,000 pods: enough work to split
/// across cores, small enough that two batches in flight stay far below a dump's size.
const BATCH_BYTES: usize = 4 << 20;
/// The progress callback fires at most this often; a 150 MB dump gives ~20 updates.
const PROGRESS_EVERY: u64 = 8 << 20;
/// Deeper nesting than this is not a Kubernetes object; serde_json itself stops at 128, this only
/// bounds the scanner's own stack on hostile input.
const MAX_SCAN_DEPTH: usize = 4096;
/// Nested `List` items are followed this deep (bounded so hostile input cannot recurse far).
pub(crate) const MAX_LIST_NESTING: usize = 8;
pub(crate) const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
/// The v3 (aggregated API server) group, accepted leniently for the kinds it shares with v1.
pub const CALICO_V3_API_VERSION: &str = "projectcalico.org/v3";

/// Everything `leak-scan` takes from a dump.
#[derive(Debug, Default)]
pub struct DumpContents {
    pub blocks: Vec<IpamBlock>,
    pub affinities: Vec<BlockAffinity>,
    pub handles: Vec<IpamHandle>,
    pub pools: Vec<IpPool>,
    pub reservations: Vec<IpReservation>,
    /// The singletons: the one named `default` wins, else the first seen.
    pub ipam_config: Option<IpamConfig>,
    pub cluster_info: Option<ClusterInformation>,
    pub kube_controllers_config: Option<KubeControllersConfiguration>,
    /// Pods trimmed on arrival, including those being deleted (the GC decides about them).
    pub pods: Vec<PodFacts>,
    pub nodes: Vec<NodeLite>,
    /// Names of the Namespace objects seen.
    pub namespaces: BTreeSet<String>,
    /// Objects seen per kind, ignored kinds included (`List` wrappers are not objects). Items with
    /// no readable `kind` count as `<unreadable>`, objects without one as `<no kind>`.
    pub kind_counts: BTreeMap<String, u64>,
    /// Objects of a known kind that could not be read, and pods with unparsable IPs (kept).
    pub invalid: Vec<InvalidObject>,
    /// IPAM objects with `spec.deleted` set: Calico has soft-deleted them, so they are skipped.
    pub soft_deleted: u64,
    /// Some Calico object came through the v3 API group (`projectcalico.org/v3`).
    pub saw_v3_api: bool,
    pub bytes_read: u64,
    pub files: Vec<PathBuf>,
    /// Namespaces with at least one Pod in the dump.
    pub pod_namespaces: BTreeSet<String>,
    /// Set by [`read_paths_indexed`]: Pods, Nodes and IPAM objects were applied here instead of
    /// being collected in the vectors above.
    pub index: Option<Box<crate::ipam::index::IpamIndex>>,
    /// Every Pod of the cluster was read (a live scan), so every namespace counts as covered.
    pub complete_pod_view: bool,
    /// The top-level Lists read, with their point in time, in reading order.
    pub lists: Vec<DumpList>,
    /// Pods the parser rejected, as (namespace, name) salvaged from them; empty strings when
    /// even those were unreadable. Every allocation such a pod may own is held.
    pub unreadable_pods: Vec<(String, String)>,
    /// Items that were not even an object with a readable kind (they might have been pods).
    pub unreadable_items: u64,
    /// Objects seen twice with different content, and what was kept.
    pub duplicates: Vec<Duplicate>,
    /// CIDRs of blocks whose copies (or whose affinity's copies) could not be ordered: their
    /// allocations are held.
    pub held_blocks: BTreeSet<String>,
    /// Handle IDs whose copies could not be ordered.
    pub held_handles: BTreeSet<String>,
    /// A pool, reservation or configuration singleton came in copies that could not be ordered.
    pub conflicting_settings: bool,
    /// Namespace objects came in a List (so a namespace missing from it may have been deleted).
    pub namespaces_listed: bool,
    /// `leak-scan` read a live cluster itself, in the safe order.
    pub read_live: bool,
    /// etcd: Calico Node name -> the Kubernetes node its `k8s` orchRef names (from an etcd dump
    /// or a live etcd scan); see [`DumpContents::map_calico_nodes`].
    pub calico_nodes: BTreeMap<String, Option<String>>,
    /// Some part was an etcdctl dump of Calico's etcd: its revisions are not Kubernetes'.
    pub etcd_dump: bool,
    /// What the LoadBalancer judgment reads: Services, each block's LB addresses.
    pub lb: super::loadbalancer::LbInputs,
    pub(crate) registry: merge::Registry,
    pub(crate) pod_positions: BTreeMap<(String, String), usize>,
}

/// One top-level List of a dump file: its own kind and resourceVersion, and the kinds of the
/// objects it held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpList {
    pub file: String,
    pub head: ListHead,
    pub items: BTreeMap<String, u64>,
}

/// Why a dump could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{}: no such file or folder", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}:{line}:{column}: not a JSON dump: {problem}", path.display())]
    Json { path: PathBuf, line: u64, column: u64, problem: String },
    #[error("{}: not a YAML dump: {problem}", path.display())]
    Yaml { path: PathBuf, problem: String },
    #[error("{}: holds no .json, .yaml or .yml file", path.display())]
    NoDumpFiles { path: PathBuf },
}

impl DumpError {
    /// A bounded label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            DumpError::NotFound { .. } => "not_found",
            DumpError::Io { .. } => "io",
            DumpError::Json { .. } => "json",
            DumpError::Yaml { .. } => "yaml",
            DumpError::NoDumpFiles { .. } => "no_dump_files",
        }
    }
}

pub(crate) fn io_error(path: &Path, source: io::Error) -> DumpError {
    if source.kind() == io::ErrorKind::NotFound {
        DumpError::NotFound { path: path.to_path_buf() }
    } else {
        DumpError::Io { path: path.to_path_buf(), source }
    }
}

/// Reads every dump file named by `paths` (files, or folders searched recursively for `.json`,
/// `.yaml` and `.yml`), in sorted path order. `progress(bytes_so_far, total_bytes)` is called at
/// most every ~8 MiB and once at the end.
pub fn read_paths(paths: &[PathBuf], progress: &mut dyn FnMut(u64, u64)) -> Result<DumpContents, DumpError> {
    read_paths_into(paths, DumpContents::default(), progress)
}

/// Like [`read_paths`], but Pods, Nodes, IPAMBlocks, BlockAffinities and IPAMHandles go straight
/// into an allocation index as they arrive instead of being kept as objects: what a large scan
/// holds is then the compact index, not the dump's objects.
pub fn read_paths_indexed(paths: &[PathBuf], progress: &mut dyn FnMut(u64, u64)) -> Result<DumpContents, DumpError> {
    let contents = DumpContents { index: Some(Box::new(crate::ipam::index::IpamIndex::new())), ..DumpContents::default() };
    read_paths_into(paths, contents, progress)
}

fn read_paths_into(paths: &[PathBuf], mut contents: DumpContents, progress: &mut dyn FnMut(u64, u64)) -> Result<DumpContents, DumpError> {
    let files = collect_files(paths)?;
    let mut total = 0;
    for f in &files {
        total += fs::metadata(f).map_err(|e| io_error(f, e))?.len();
    }
    let mut progress = Progress { done: 0, reported: 0, total, report: progress };
    for path in &files {
        let label = path.display().to_string();
        match format_of(path)? {
            Format::Json => {
                let file = File::open(path).map_err(|e| io_error(path, e))?;
                read_json(file, &label, READ_CHUNK, BATCH_BYTES, &mut contents, &mut progress).map_err(|f| match f {
                    JsonFailure::Io(e) => io_error(path, e),
                    JsonFailure::Syntax(s) => {
                        let (line, column) = locate_in_file(path, s.offset);
                        DumpError::Json { path: path.clone(), line, column, problem: s.problem }
                    }
                })?;
            }
            Format::Yaml => {
                let file = File::open(path).map_err(|e| io_error(path, e))?;
                let size = file.metadata().map_or(0, |m| m.len());
                read_yaml(io::BufReader::with_capacity(READ_CHUNK, file), &label, &mut contents)
                    .map_err(|problem| DumpError::Yaml { path: path.clone(), problem })?;
                progress.advance(size);
            }
        }
        contents.files.push(path.clone());
    }
    contents.bytes_read = progress.done;
    progress.finish();
    contents.map_calico_nodes();
    Ok(contents)
}

/// Reads one in-memory dump; `name` gives its format (by extension, else the first byte decides)
/// and labels its errors. Never panics, whatever the bytes.
pub fn read_bytes(name: &str, bytes: &[u8]) -> Result<DumpContents, DumpError> {
    let path = PathBuf::from(name);
    let mut report = |_: u64, _: u64| {};
    let mut progress = Progress { done: 0, reported: 0, total: bytes.len() as u64, report: &mut report };
    let mut contents = DumpContents::default();
    let format = extension_format(&path).unwrap_or_else(|| sniff(bytes));
    match format {
        Format::Json => read_json(bytes, name, READ_CHUNK, BATCH_BYTES, &mut contents, &mut progress).map_err(|f| match f {
            JsonFailure::Io(e) => DumpError::Io { path: path.clone(), source: e },
            JsonFailure::Syntax(s) => {
                let (line, column) = locate(bytes, s.offset);
                DumpError::Json { path: path.clone(), line, column, problem: s.problem }
            }
        })?,
        Format::Yaml => {
            progress.advance(bytes.len() as u64);
            read_yaml(bytes, name, &mut contents).map_err(|problem| DumpError::Yaml { path: path.clone(), problem })?
        }
    }
    contents.bytes_read = progress.done;
    contents.files.push(path);
    contents.map_calico_nodes();
    Ok(contents)
}

struct Progress<'a> {
    done: u64,
    reported: u64,
    total: u64,
    report: &'a mut dyn FnMut(u64, u64),
}

impl Progress<'_> {
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.done - self.reported >= PROGRESS_EVERY {
            self.reported = self.done;
            (self.report)(self.done, self.total.max(self.done));
        }
    }

    fn finish(&mut self) {
        if self.reported != self.done || self.done == 0 {
            self.reported = self.done;
            (self.report)(self.done, self.total.max(self.done));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Finding files and telling their format.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Yaml,
}

pub(crate) fn extension_format(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "json" => Some(Format::Json),
        "yaml" | "yml" => Some(Format::Yaml),
        _ => None,
    }
}

/// `{` or `[` first (after whitespace and a BOM) means JSON; anything else is read as YAML.
pub(crate) fn sniff(bytes: &[u8]) -> Format {
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[') => Format::Json,
        _ => Format::Yaml,
    }
}

fn format_of(path: &Path) -> Result<Format, DumpError> {
    if let Some(f) = extension_format(path) {
        return Ok(f);
    }
    let mut head = Vec::with_capacity(4096);
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    file.take(4096).read_to_end(&mut head).map_err(|e| io_error(path, e))?;
    Ok(sniff(&head))
}

/// Files named directly are taken whatever their extension; folders are searched recursively for
/// dump extensions. Symlinked folders are not followed (a link loop must not hang the scan).
pub(crate) fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DumpError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
        if meta.is_dir() {
            let before = files.len();
            walk(path, &mut files)?;
            if files.len() == before {
                return Err(DumpError::NoDumpFiles { path: path.clone() });
            }
        } else {
            files.push(path.clone());
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DumpError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        entries.push(entry.map_err(|e| io_error(dir, e))?);
    }
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| io_error(&path, e))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if (kind.is_file() || (kind.is_symlink() && path.is_file())) && extension_format(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// 1-based line and column (in bytes) of `offset`.
pub(crate) fn locate(bytes: &[u8], offset: u64) -> (u64, u64) {
    let end = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
    let before = &bytes[..end];
    let line = before.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    (line, (end - line_start) as u64 + 1)
}

/// As [`locate`], re-reading the file: only on the error path, so the happy path never counts lines.
fn locate_in_file(path: &Path, offset: u64) -> (u64, u64) {
    let Ok(file) = File::open(path) else { return (0, 0) };
    let mut reader = file.take(offset);
    let mut buf = vec![0u8; READ_CHUNK];
    let (mut line, mut column) = (1u64, 1u64);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return (line, column),
            Ok(n) => {
                for &b in &buf[..n] {
                    if b == b'\n' {
                        line += 1;
                        column = 1;
                    } else {
                        column += 1;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (line, column),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON: the streaming scanner.

#[derive(Debug)]
struct SyntaxError {
    offset: u64,
    problem: String,
}

enum JsonFailure {
    Io(io::Error),
    Syntax(SyntaxError),
}

/// Item text waiting to be parsed: one buffer, many extents, so a batch costs two allocations.
#[derive(Debug, Default)]
struct Batch {
    data: Vec<u8>,
    items: Vec<RawItem>,
}

#[derive(Debug, Clone)]
struct RawItem {
    start: usize,
    end: usize,
    /// The item's position in its file, for naming objects whose own name is unreadable.
    index: u64,
    /// The `List` (its position among the file's lists) this item came from, or [`NO_LIST`].
    list: u32,
    /// The kind and apiVersion of items that carry none: the API server leaves them out of the
    /// items of a typed list (`PodList`, `NodeList`: what `kubectl get --raw` returns).
    default: Option<Arc<Head>>,
}

const NO_LIST: u32 = u32::MAX;

/// A `List` wrapper's own kind and `metadata.resourceVersion`: the list's point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListHead {
    pub kind: String,
    pub api_version: String,
    pub resource_version: String,
}

#[derive(Debug, Default, Deserialize)]
struct ListWrapper {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "apiVersion")]
    api_version: String,
    #[serde(default)]
    metadata: ListMeta,
}

#[derive(Debug, Default, Deserialize)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<String>,
}

impl ListHead {
    fn from_wrapper(json: &[u8]) -> ListHead {
        let w: ListWrapper = serde_json::from_slice(json).unwrap_or_default();
        ListHead { kind: w.kind, api_version: w.api_version, resource_version: w.metadata.resource_version.unwrap_or_default() }
    }

    /// What items without a kind of their own are: `PodList` holds `Pod`s. A plain `List` says
    /// nothing about its items.
    fn item_head(&self) -> Option<Arc<Head>> {
        let kind = self.kind.strip_suffix("List").filter(|k| !k.is_empty())?;
        Some(Arc::new(Head { kind: kind.to_string(), api_version: self.api_version.clone() }))
    }
}

/// Where the bytes being scanned go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Nowhere,
    /// The top-level object, kept until we know whether it is a List (dropped) or an object.
    Wrapper,
    Item,
}

/// Position among the keys of a top-level object, to spot its `items` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    ExpectKey,
    InKey,
    AfterKey,
    ExpectValue,
    InValue,
}

/// Cuts a stream of JSON text into items. It checks only what it needs to find boundaries
/// (strings, escapes, matching brackets, what may stand at the top level); each item's own
/// syntax is left to serde_json, so a broken item becomes an invalid object, not an error.
struct JsonScanner {
    /// Open containers (`{` or `[`), on the heap so hostile nesting costs no call stack.
    stack: Vec<u8>,
    in_string: bool,
    escaped: bool,
    capturing_key: bool,
    key: Vec<u8>,
    key_state: KeyState,
    /// Stack depth of the array whose elements are items (1: a top-level array, 2: a List's
    /// `items`); 0 when not inside one.
    items_level: usize,
    wrapper: Vec<u8>,
    wrapper_is_list: bool,
    element_open: bool,
    after_comma: bool,
    element_start: usize,
    sink: Sink,
    /// File offset of the chunk being fed.
    offset: u64,
    next_index: u64,
    /// Bytes of a leading byte order mark seen so far (3 once past the start).
    bom_matched: usize,
    batch: Batch,
    /// The file's top-level Lists, in order.
    lists: Vec<ListHead>,
    current_default: Option<Arc<Head>>,
}

impl JsonScanner {
    fn new() -> Self {
        JsonScanner {
            stack: Vec::new(),
            in_string: false,
            escaped: false,
            capturing_key: false,
            key: Vec::new(),
            key_state: KeyState::ExpectKey,
            items_level: 0,
            wrapper: Vec::new(),
            wrapper_is_list: false,
            element_open: false,
            after_comma: false,
            element_start: 0,
            sink: Sink::Nowhere,
            offset: 0,
            next_index: 0,
            bom_matched: 0,
            batch: Batch::default(),
            lists: Vec::new(),
            current_default: None,
        }
    }

    fn error(&self, i: usize, problem: String) -> SyntaxError {
        SyntaxError { offset: self.offset + i as u64, problem }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), SyntaxError> {
        let mut i = 0;
        // A byte order mark may open the file, possibly split across reads.
        while self.bom_matched < UTF8_BOM.len() && self.offset + i as u64 == self.bom_matched as u64 {
            match chunk.get(i) {
                Some(&b) if b == UTF8_BOM[self.bom_matched] => {
                    self.bom_matched += 1;
                    i += 1;
                }
                Some(_) => self.bom_matched = UTF8_BOM.len(),
                None => break,
            }
        }
        // Bytes from `run` up to `i` still have to be copied to `self.sink`: copying whole runs
        // rather than byte by byte is what keeps the scanner near memory speed.
        let mut run = i;
        let n = chunk.len();
        while i < n {
            if self.in_string {
                i = self.skip_string(chunk, i);
                continue;
            }
            let b = chunk[i];
            if self.element_open && self.stack.len() > self.items_level {
                // Hot path: inside a container of an item, only brackets and quotes matter.
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.push(b, i)?,
                    b'}' | b']' => self.pop(b, i)?,
                    _ => {}
                }
            } else {
                self.structural(chunk, i, &mut run)?;
            }
            i += 1;
        }
        self.copy(&chunk[run..]);
        self.offset += n as u64;
        Ok(())
    }

    /// Everything outside an item's containers: the top level, a wrapper object's keys, and the
    /// separators between items.
    fn structural(&mut self, chunk: &[u8], i: usize, run: &mut usize) -> Result<(), SyntaxError> {
        let b = chunk[i];
        let depth = self.stack.len();
        if depth == 0 {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'{' => {
                    self.switch(chunk, i, run, Sink::Wrapper);
                    self.wrapper.clear();
                    self.wrapper_is_list = false;
                    self.key_state = KeyState::ExpectKey;
                    self.push(b, i)?;
                }
                b'[' => {
                    self.push(b, i)?;
                    self.open_items_array();
                }
                _ => {
                    return Err(self.error(i, format!("expected an object or a list, found {}", describe(b))));
                }
            }
            return Ok(());
        }
        if depth == self.items_level {
            match b {
                // Whitespace inside an open item is copied and trimmed when it closes.
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b',' => {
                    self.close_element(chunk, i, run);
                    self.after_comma = true;
                }
                b']' => {
                    if self.element_open || self.after_comma {
                        self.close_element(chunk, i, run);
                    }
                    self.pop(b, i)?;
                    if self.items_level == 2 && self.wrapper_is_list {
                        // The keys after `items` (kubectl writes `kind` and `metadata` there) go
                        // to the wrapper again, with an empty list standing in for the items.
                        self.switch(chunk, i + 1, run, Sink::Wrapper);
                        self.wrapper.extend_from_slice(b"[]");
                    }
                    self.items_level = 0;
                    self.current_default = None;
                    self.key_state = KeyState::InValue;
                }
                b'}' => return Err(self.error(i, "found '}' closing a list".to_string())),
                _ => {
                    if !self.element_open {
                        self.open_element(chunk, i, run);
                    }
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.push(b, i)?,
                        _ => {}
                    }
                }
            }
            return Ok(());
        }
        // Inside a top-level object, outside any item.
        let at_keys = depth == 1;
        match b {
            b'"' => {
                self.in_string = true;
                if at_keys && self.key_state == KeyState::ExpectKey {
                    self.key_state = KeyState::InKey;
                    self.capturing_key = true;
                    self.key.clear();
                } else if at_keys {
                    self.key_state = KeyState::InValue;
                }
            }
            b':' if at_keys && self.key_state == KeyState::AfterKey => self.key_state = KeyState::ExpectValue,
            b',' if at_keys => self.key_state = KeyState::ExpectKey,
            b'[' if at_keys && self.key_state == KeyState::ExpectValue && self.key == b"items" => {
                // A List: its wrapper is not an object of its own, only its items are.
                self.switch(chunk, i, run, Sink::Nowhere);
                self.wrapper_is_list = true;
                // The keys before `items` (all of them, in an API server's own answer) tell what
                // the items are; a copy closed with `[]}` parses as the List without its items.
                let mut head = self.wrapper.clone();
                head.extend_from_slice(b"[]}");
                let head = ListHead::from_wrapper(&head);
                self.current_default = head.item_head();
                self.lists.push(head);
                self.push(b, i)?;
                self.open_items_array();
            }
            b'{' | b'[' => {
                if at_keys {
                    self.key_state = KeyState::InValue;
                }
                self.push(b, i)?;
            }
            b'}' | b']' => {
                self.pop(b, i)?;
                if self.stack.is_empty() {
                    self.switch(chunk, i + 1, run, Sink::Nowhere);
                    if !self.wrapper_is_list {
                        self.emit_wrapper();
                    } else if let Some(last) = self.lists.last_mut() {
                        let whole = ListHead::from_wrapper(&self.wrapper);
                        if !whole.kind.is_empty() || !whole.resource_version.is_empty() {
                            *last = ListHead { api_version: if whole.api_version.is_empty() { last.api_version.clone() } else { whole.api_version }, ..whole };
                        }
                    }
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => {
                if at_keys {
                    self.key_state = KeyState::InValue;
                }
            }
        }
        Ok(())
    }

    /// Skips string content from `i`; returns the index after the closing quote, or the chunk's
    /// end (the string then continues in the next chunk).
    fn skip_string(&mut self, chunk: &[u8], mut i: usize) -> usize {
        let n = chunk.len();
        if self.capturing_key {
            // Only the keys of a top-level object: short and rare, byte by byte is fine. The first
            // 16 bytes are enough to tell `items` from anything else.
            while i < n {
                let b = chunk[i];
                i += 1;
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    self.capturing_key = false;
                    self.key_state = KeyState::AfterKey;
                    return i;
                }
                if self.key.len() < 16 {
                    self.key.push(b);
                }
            }
            return n;
        }
        while i < n {
            if self.escaped {
                self.escaped = false;
                i += 1;
                continue;
            }
            match find_quote_or_backslash(&chunk[i..]) {
                None => return n,
                Some(k) => {
                    i += k;
                    if chunk[i] == b'\\' {
                        self.escaped = true;
                        i += 1;
                    } else {
                        self.in_string = false;
                        return i + 1;
                    }
                }
            }
        }
        n
    }

    fn push(&mut self, b: u8, i: usize) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_SCAN_DEPTH {
            return Err(self.error(i, format!("nested deeper than {MAX_SCAN_DEPTH} levels")));
        }
        self.stack.push(b);
        Ok(())
    }

    fn pop(&mut self, b: u8, i: usize) -> Result<(), SyntaxError> {
        let open = if b == b'}' { b'{' } else { b'[' };
        match self.stack.pop() {
            Some(o) if o == open => Ok(()),
            Some(o) => Err(self.error(i, format!("found {} closing {}", describe(b), describe(o)))),
            None => Err(self.error(i, format!("found {} with nothing open", describe(b)))),
        }
    }

    /// Sends the bytes before `i` to the current sink and the following ones to `to`.
    fn switch(&mut self, chunk: &[u8], i: usize, run: &mut usize, to: Sink) {
        self.copy(&chunk[*run..i]);
        *run = i;
        self.sink = to;
    }

    fn copy(&mut self, bytes: &[u8]) {
        match self.sink {
            Sink::Nowhere => {}
            Sink::Wrapper => self.wrapper.extend_from_slice(bytes),
            Sink::Item => self.batch.data.extend_from_slice(bytes),
        }
    }

    fn open_items_array(&mut self) {
        self.items_level = self.stack.len();
        self.element_open = false;
        self.after_comma = false;
    }

    fn open_element(&mut self, chunk: &[u8], i: usize, run: &mut usize) {
        self.switch(chunk, i, run, Sink::Nowhere);
        self.element_start = self.batch.data.len();
        self.element_open = true;
        self.sink = Sink::Item;
    }

    /// Ends the current item (an empty one after a stray comma, which then fails to parse and is
    /// reported like any other malformed item).
    fn close_element(&mut self, chunk: &[u8], i: usize, run: &mut usize) {
        if !self.element_open {
            self.element_start = self.batch.data.len();
        }
        self.switch(chunk, i, run, Sink::Nowhere);
        let data = &self.batch.data;
        let mut end = data.len();
        while end > self.element_start && data[end - 1].is_ascii_whitespace() {
            end -= 1;
        }
        self.batch.data.truncate(end);
        let list = if self.wrapper_is_list && self.items_level == 2 { self.lists.len() as u32 - 1 } else { NO_LIST };
        self.batch.items.push(RawItem { start: self.element_start, end, index: self.next_index, list, default: self.current_default.clone() });
        self.next_index += 1;
        self.element_open = false;
        self.after_comma = false;
    }

    fn emit_wrapper(&mut self) {
        let start = self.batch.data.len();
        self.batch.data.extend_from_slice(&self.wrapper);
        self.batch.items.push(RawItem { start, end: self.batch.data.len(), index: self.next_index, list: NO_LIST, default: None });
        self.next_index += 1;
        // A single huge object must not pin its buffer for the rest of the scan.
        if self.wrapper.capacity() > BATCH_BYTES {
            self.wrapper = Vec::new();
        } else {
            self.wrapper.clear();
        }
    }

    /// The finished items, once there are `min_bytes` of them; a partly read item stays behind.
    fn take_batch(&mut self, min_bytes: usize) -> Option<Batch> {
        if self.batch.items.is_empty() || self.batch.data.len() < min_bytes {
            return None;
        }
        let keep_from = if self.element_open { self.element_start } else { self.batch.data.len() };
        let tail = self.batch.data[keep_from..].to_vec();
        self.batch.data.truncate(keep_from);
        self.element_start = 0;
        let mut fresh = Vec::with_capacity(min_bytes.saturating_add(min_bytes / 4).min(2 * BATCH_BYTES).max(tail.len()));
        fresh.extend_from_slice(&tail);
        Some(std::mem::replace(&mut self.batch, Batch { data: fresh, items: Vec::new() }))
    }

    fn finish(&self) -> Result<(), SyntaxError> {
        let open = if self.in_string {
            Some("a string")
        } else {
            self.stack.last().map(|&b| if b == b'{' { "an object" } else { "a list" })
        };
        match open {
            None => Ok(()),
            Some(what) => Err(SyntaxError {
                offset: self.offset,
                problem: format!("the file ends inside {what} (truncated?)"),
            }),
        }
    }
}

fn describe(b: u8) -> String {
    if b.is_ascii_graphic() { format!("'{}'", b as char) } else { format!("byte 0x{b:02x}") }
}

/// Position of the first `"` or `\` in `s`, eight bytes at a time (a zero-byte test on the word
/// XORed with each target: exact for the lowest match, which is the one we take).
fn find_quote_or_backslash(s: &[u8]) -> Option<usize> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTE: u64 = LOW * b'"' as u64;
    const BACKSLASH: u64 = LOW * b'\\' as u64;
    let mut words = s.chunks_exact(8);
    let mut base = 0;
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let w = u64::from_le_bytes(bytes);
        let (q, bs) = (w ^ QUOTE, w ^ BACKSLASH);
        let hits = ((q.wrapping_sub(LOW) & !q) | (bs.wrapping_sub(LOW) & !bs)) & HIGH;
        if hits != 0 {
            return Some(base + (hits.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    words.remainder().iter().position(|&b| b == b'"' || b == b'\\').map(|p| base + p)
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What one reading step produced: a batch to parse (if any), the bytes read, and whether the
/// input is exhausted.
struct Step {
    batch: Option<Batch>,
    bytes: u64,
    eof: bool,
}

fn fill_batch(
    reader: &mut impl Read,
    buf: &mut [u8],
    scanner: &mut JsonScanner,
    batch_bytes: usize,
) -> Result<Step, JsonFailure> {
    let mut bytes = 0;
    loop {
        let n = read_full(reader, buf).map_err(JsonFailure::Io)?;
        bytes += n as u64;
        if n == 0 {
            scanner.finish().map_err(JsonFailure::Syntax)?;
            return Ok(Step { batch: scanner.take_batch(0), bytes, eof: true });
        }
        scanner.feed(&buf[..n]).map_err(JsonFailure::Syntax)?;
        if let Some(batch) = scanner.take_batch(batch_bytes) {
            return Ok(Step { batch: Some(batch), bytes, eof: false });
        }
    }
}

/// Streams JSON text: reading and scanning the next batch runs alongside the parallel parse of
/// the previous one, and results are merged in input order.
fn read_json(
    mut reader: impl Read + Send,
    label: &str,
    chunk_bytes: usize,
    batch_bytes: usize,
    contents: &mut DumpContents,
    progress: &mut Progress<'_>,
) -> Result<(), JsonFailure> {
    let mut scanner = JsonScanner::new();
    let list_base = contents.lists.len();
    let mut buf = vec![0u8; chunk_bytes.max(1)];
    let mut pending: Option<Batch> = None;
    let mut eof = false;
    while !eof || pending.is_some() {
        let previous = pending.take();
        let (parsed, step) = rayon::join(
            || previous.map(|b| parse_batch(&b, label)),
            || {
                if eof {
                    Ok(Step { batch: None, bytes: 0, eof: true })
                } else {
                    fill_batch(&mut reader, &mut buf, &mut scanner, batch_bytes)
                }
            },
        );
        // Lists the scanner opened so far (its items may be in this batch), then the items.
        sync_lists(contents, &scanner.lists, label, list_base);
        for (outcome, list) in parsed.into_iter().flatten() {
            contents.absorb(outcome, (list != NO_LIST).then(|| list_base + list as usize));
        }
        let step = step?;
        progress.advance(step.bytes);
        eof = step.eof;
        pending = step.batch;
    }
    // A List's kind and version may follow its items (kubectl writes them last).
    sync_lists(contents, &scanner.lists, label, list_base);
    Ok(())
}

/// Mirrors the file's Lists (`lists`, the scanner's) into `contents` from `base` on.
fn sync_lists(contents: &mut DumpContents, lists: &[ListHead], label: &str, base: usize) {
    for (i, head) in lists.iter().enumerate() {
        match contents.lists.get_mut(base + i) {
            Some(known) => known.head = head.clone(),
            None => contents.lists.push(DumpList { file: label.to_string(), head: head.clone(), items: BTreeMap::new() }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// YAML: streamed. serde-saphyr reads the file document by document on a thread of its own; the
// items of a document (a List's `items`, a sequence's elements, or the document itself) are sent,
// each as JSON text, through a bounded channel as they are parsed, and go through the same
// per-item parser as JSON. A List never exists whole, neither as text nor as `Value`s.

/// Items in flight between the YAML parser and the item parser: enough to keep both busy, few
/// enough that a huge List costs a few MB at most.
const YAML_CHANNEL_ITEMS: usize = 256;

pub(crate) fn yaml_options() -> serde_saphyr::Options {
    // The default budget is sized for configuration files; a cluster dump has millions of nodes
    // and events. Size caps go, the depth and alias caps (the ones that stop hostile input) stay.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_documents = usize::MAX;
    budget.max_total_scalar_bytes = usize::MAX;
    budget.max_reader_input_bytes = None;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// What the YAML parser thread sends.
enum YamlMessage {
    /// An object's JSON text, the List it is an item of (its position among the file's Lists),
    /// and the kind its List gives items that carry none.
    Item(Vec<u8>, u32, Option<Arc<Head>>),
    /// A List's head, as known when its items start (`opened`) or once it is whole.
    List { position: u32, head: ListHead },
}

/// The parser thread's way out: serde-saphyr deserializes documents into owned values, with
/// no seed to carry state, so the visitors below find the channel here.
struct YamlSink {
    to_reader: std::sync::mpsc::SyncSender<YamlMessage>,
    lists: u32,
    /// The List whose items are being read.
    current: Option<(u32, Option<Arc<Head>>)>,
}

thread_local! {
    static YAML_SINK: std::cell::RefCell<Option<YamlSink>> = const { std::cell::RefCell::new(None) };
}

fn yaml_send<E: de::Error>(message: YamlMessage) -> Result<(), E> {
    YAML_SINK.with(|s| match s.borrow().as_ref() {
        Some(sink) => sink.to_reader.send(message).map_err(|_| E::custom("the dump reader stopped")),
        None => Err(E::custom("YAML items read outside a dump reader")),
    })
}

fn yaml_send_item<E: de::Error>(value: &Value) -> Result<(), E> {
    let (list, default) = YAML_SINK.with(|s| s.borrow().as_ref().and_then(|s| s.current.clone())).unwrap_or((NO_LIST, None));
    yaml_send(YamlMessage::Item(to_json(value)?, list, default))
}

fn read_yaml(reader: impl Read + Send, label: &str, contents: &mut DumpContents) -> Result<(), String> {
    let (to_reader, from_parser) = std::sync::mpsc::sync_channel::<YamlMessage>(YAML_CHANNEL_ITEMS);
    let list_base = contents.lists.len();
    std::thread::scope(|scope| {
        let parser = scope.spawn(move || {
            YAML_SINK.with(|s| *s.borrow_mut() = Some(YamlSink { to_reader, lists: 0, current: None }));
            let mut reader = reader;
            let mut result = Ok(());
            for document in serde_saphyr::read_with_options::<_, YamlDocument>(&mut reader, yaml_options()) {
                if let Err(e) = document {
                    result = Err(e.to_string());
                    break;
                }
            }
            // Dropping the sender ends the reader's loop.
            YAML_SINK.with(|s| s.borrow_mut().take());
            result
        });
        let mut batch = Batch::default();
        let mut index = 0u64;
        let flush = |batch: &mut Batch, contents: &mut DumpContents| {
            for (outcome, list) in parse_batch(&std::mem::take(batch), label) {
                contents.absorb(outcome, (list != NO_LIST).then(|| list_base + list as usize));
            }
        };
        for message in from_parser {
            match message {
                YamlMessage::Item(json, list, default) => {
                    let start = batch.data.len();
                    batch.data.extend_from_slice(&json);
                    batch.items.push(RawItem { start, end: batch.data.len(), index, list, default });
                    index += 1;
                    if batch.data.len() >= BATCH_BYTES {
                        flush(&mut batch, contents);
                    }
                }
                YamlMessage::List { position, head } => {
                    let at = list_base + position as usize;
                    match contents.lists.get_mut(at) {
                        Some(known) => known.head = head,
                        None => contents.lists.push(DumpList { file: label.to_string(), head, items: BTreeMap::new() }),
                    }
                }
            }
        }
        flush(&mut batch, contents);
        parser.join().unwrap_or_else(|_| Err("the YAML parser failed".to_string()))
    })
}

/// One YAML document; deserializing it sends its objects to the [`YamlSink`] as it goes.
struct YamlDocument;

fn to_json<E: de::Error>(value: &Value) -> Result<Vec<u8>, E> {
    serde_json::to_vec(value).map_err(E::custom)
}

fn send_elements<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while let Some(value) = seq.next_element::<Value>()? {
        yaml_send_item(&value)?;
    }
    Ok(())
}

fn head_of(rest: &serde_json::Map<String, Value>) -> ListHead {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    ListHead {
        kind: text(rest.get("kind")),
        api_version: text(rest.get("apiVersion")),
        resource_version: text(rest.get("metadata").and_then(|m| m.get("resourceVersion"))),
    }
}

impl<'de> Deserialize<'de> for YamlDocument {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DocumentVisitor;
        impl<'de> Visitor<'de> for DocumentVisitor {
            type Value = YamlDocument;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Kubernetes object, a List of them, or a sequence of them")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<YamlDocument, A::Error> {
                send_elements(seq).map(|_| YamlDocument)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<YamlDocument, A::Error> {
                let mut rest = serde_json::Map::new();
                let mut list: Option<u32> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "items" && list.is_none() {
                        // A List, if `items` is a sequence: its head so far names the items' kind.
                        let head = head_of(&rest);
                        let position = YAML_SINK.with(|s| {
                            let mut s = s.borrow_mut();
                            let sink = s.as_mut()?;
                            let position = sink.lists;
                            sink.current = Some((position, head.item_head()));
                            Some(position)
                        });
                        let field = map.next_value::<ItemsField>();
                        YAML_SINK.with(|s| {
                            if let Some(sink) = s.borrow_mut().as_mut() {
                                sink.current = None;
                            }
                        });
                        match field? {
                            ItemsField::Streamed => {
                                let position = position.ok_or_else(|| de::Error::custom("YAML items read outside a dump reader"))?;
                                YAML_SINK.with(|s| {
                                    if let Some(sink) = s.borrow_mut().as_mut() {
                                        sink.lists += 1;
                                    }
                                });
                                yaml_send(YamlMessage::List { position, head })?;
                                list = Some(position);
                            }
                            ItemsField::Other(v) => {
                                rest.insert(key, v);
                            }
                        }
                    } else {
                        let value: Value = map.next_value()?;
                        rest.insert(key, value);
                    }
                }
                match list {
                    // The keys after `items` (kubectl sorts them: `kind` and `metadata` follow).
                    Some(position) => yaml_send(YamlMessage::List { position, head: head_of(&rest) })?,
                    None => yaml_send_item(&Value::Object(rest))?,
                }
                Ok(YamlDocument)
            }
        }
        d.deserialize_any(DocumentVisitor)
    }
}

/// A document's `items`: a sequence (the document is a List; its elements were sent as they
/// came) or anything else (kept as a field).
enum ItemsField {
    Streamed,
    Other(Value),
}

impl<'de> Deserialize<'de> for ItemsField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ItemsVisitor;
        impl<'de> Visitor<'de> for ItemsVisitor {
            type Value = ItemsField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ItemsField, A::Error> {
                send_elements(seq).map(|_| ItemsField::Streamed)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ItemsField, A::Error> {
                Value::deserialize(de::value::MapAccessDeserializer::new(map)).map(ItemsField::Other)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ItemsField, E> {
                Ok(ItemsField::Other(Value::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ItemsField, E> {
                Ok(ItemsField::Other(Value::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ItemsField, E> {
                Ok(ItemsField::Other(Value::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ItemsField, E> {
                Ok(ItemsField::Other(Value::from(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ItemsField, E> {
                Ok(ItemsField::Other(Value::from(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ItemsField, E> {
                Ok(ItemsField::Other(Value::Null))
            }
            fn visit_none<E: de::Error>(self) -> Result<ItemsField, E> {
                Ok(ItemsField::Other(Value::Null))
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<ItemsField, D2::Error> {
                d.deserialize_any(ItemsVisitor)
            }
        }
        d.deserialize_any(ItemsVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// One item: find its kind, parse it into that kind's type.

/// One parsed item, merged into [`DumpContents`] in input order.
#[derive(Debug)]
enum Outcome {
    Object { kind: String, v3: bool, parsed: Parsed },
    /// A nested List's items (the wrapper itself is not an object).
    List(Vec<Outcome>),
}

#[derive(Debug)]
enum Parsed {
    Block(Box<IpamBlock>),
    Affinity(Box<BlockAffinity>),
    Handle(Box<IpamHandle>),
    Pool(Box<IpPool>),
    Reservation(Box<IpReservation>),
    IpamConfig(Box<IpamConfig>),
    ClusterInfo(Box<ClusterInformation>),
    KubeControllersConfig(Box<KubeControllersConfiguration>),
    Pod(Box<PodFacts>, Option<InvalidObject>),
    /// A Pod the parser rejected: the problem, and the namespace and name salvaged from it
    /// (empty when even those are unreadable).
    UnreadablePod(InvalidObject, String, String),
    Node(Box<NodeLite>),
    /// A Calico Node of an etcd dump: its name and its `k8s` orchRef's node.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    CalicoNode(String, Option<String>),
    /// The start of an etcdctl dump.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    EtcdDump,
    Namespace(String),
    /// A core Service: `<namespace>/<name>`, its resourceVersion, and its slim form.
    Service(String, String, Box<Value>),
    /// A Service the parser rejected, with the namespace and name salvaged from it (empty when
    /// even those are unreadable): its LoadBalancer addresses are not judged.
    UnreadableService(InvalidObject, String, String),
    /// An IPAMBlock the parser rejected, and the handle IDs its attributes name (what they hold
    /// is unknown, so their Services' LoadBalancer addresses are not judged).
    InvalidBlock(InvalidObject, Vec<String>),
    SoftDeleted,
    /// A kind the scan does not use, or a Calico kind from a foreign API group (with a note).
    Ignored(Option<InvalidObject>),
    Invalid(InvalidObject),
}

/// The kind recorded for an item that is not even a JSON object with a readable `kind`.
const UNREADABLE_KIND: &str = "<unreadable>";
/// The pseudo-kind counted once per etcdctl dump read.
pub const ETCD_DUMP_KIND: &str = "<etcd dump>";
/// The kind recorded for an object that has no `kind`.
const NO_KIND: &str = "<no kind>";

fn parse_batch(batch: &Batch, label: &str) -> Vec<(Outcome, u32)> {
    batch
        .items
        .par_iter()
        .map(|item| {
            let bytes = &batch.data[item.start..item.end];
            (classify(bytes, &format!("{label}#{}", item.index), 0, item.default.as_deref()), item.list)
        })
        .collect()
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Head {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "apiVersion")]
    api_version: String,
}

#[derive(Debug, Default, Deserialize)]
struct Named {
    #[serde(default)]
    metadata: NamedMeta,
}

#[derive(Debug, Default, Deserialize)]
struct NamedMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// `metadata.namespace` and `metadata.name` of an object whose other fields may be broken,
/// read leniently: a scan of the raw text for the first `metadata` object that parses.
fn salvage_name(bytes: &[u8]) -> (String, String) {
    if let Ok(Named { metadata: NamedMeta { name, namespace } }) = serde_json::from_slice::<Named>(bytes) {
        return (namespace.unwrap_or_default(), name);
    }
    #[derive(Deserialize)]
    struct Lenient<'a> {
        #[serde(borrow, default)]
        metadata: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct LenientMeta {
        #[serde(default)]
        name: Option<Value>,
        #[serde(default)]
        namespace: Option<Value>,
    }
    let text = |v: Option<Value>| match v {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    // The object as a whole failed; its metadata alone may still be readable text.
    let meta = serde_json::from_slice::<Lenient>(bytes).ok().and_then(|l| l.metadata).map(|m| m.get().to_string()).or_else(|| {
        let at = find_subslice(bytes, b"\"metadata\"")?;
        let rest = &bytes[at..];
        let open = rest.iter().position(|&b| b == b'{')?;
        let end = skip_value(rest, open)?;
        Some(String::from_utf8_lossy(&rest[open..end]).into_owned())
    });
    match meta.and_then(|m| serde_json::from_str::<LenientMeta>(&m).ok()) {
        Some(m) => (text(m.namespace), text(m.name)),
        None => (String::new(), String::new()),
    }
}

fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The name an invalid object is reported under: `namespace/name`, `name`, or its position.
fn recover_name(bytes: &[u8], fallback: &str) -> String {
    match serde_json::from_slice::<Named>(bytes) {
        Ok(Named { metadata: NamedMeta { name, namespace } }) if !name.is_empty() => match namespace {
            Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
            _ => name,
        },
        _ => fallback.to_string(),
    }
}

#[derive(Deserialize)]
struct NestedList<'a> {
    #[serde(borrow)]
    items: Vec<&'a serde_json::value::RawValue>,
}

/// One key of an etcdctl dump as the reader takes it.
#[cfg(feature = "cli")]
fn etcd_outcome(item: super::etcd_dump::EtcdItem, fallback: &str) -> Outcome {
    use super::etcd_dump::EtcdItem;
    match item {
        EtcdItem::Object(json) => classify(&json, fallback, 1, None),
        EtcdItem::CalicoNode { name, k8s_node } => Outcome::Object { kind: "CalicoNode".into(), v3: true, parsed: Parsed::CalicoNode(name, k8s_node) },
        EtcdItem::Invalid(problem) => Outcome::Object { kind: problem.kind.clone(), v3: false, parsed: Parsed::Invalid(problem) },
    }
}

fn classify(bytes: &[u8], fallback: &str, nesting: usize, default: Option<&Head>) -> Outcome {
    let head = match peek_head(bytes) {
        Some(head) => head,
        None => match serde_json::from_slice::<Head>(bytes) {
            Ok(head) => head,
            // An item of a typed list is of the list's kind even when it is not readable at all:
            // a broken item of a PodList is still a pod.
            Err(e) if default.is_some_and(|d| d.kind == "Pod") => {
                return Outcome::Object {
                    kind: "Pod".to_string(),
                    v3: false,
                    parsed: Parsed::UnreadablePod(InvalidObject::new("Pod", fallback, e.to_string()), String::new(), String::new()),
                };
            }
            Err(e) => {
                return Outcome::Object {
                    kind: UNREADABLE_KIND.to_string(),
                    v3: false,
                    parsed: Parsed::Invalid(InvalidObject::new(UNREADABLE_KIND, fallback, e.to_string())),
                };
            }
        },
    };
    let Head { kind, api_version } = match default {
        Some(d) if head.kind.is_empty() => Head { kind: d.kind.clone(), api_version: if head.api_version.is_empty() { d.api_version.clone() } else { head.api_version } },
        _ => head,
    };
    #[cfg(feature = "cli")]
    if kind.is_empty()
        && nesting == 0
        && let Some(items) = super::etcd_dump::read(bytes)
    {
        let marker = Outcome::Object { kind: ETCD_DUMP_KIND.into(), v3: false, parsed: Parsed::EtcdDump };
        return Outcome::List(std::iter::once(marker).chain(items.into_iter().map(|item| etcd_outcome(item, fallback))).collect());
    }
    let v3 = api_version == CALICO_V3_API_VERSION;
    let calico_api = api_version.is_empty() || api_version == CALICO_API_VERSION || v3;
    let invalid = |e: serde_json::Error| Parsed::Invalid(InvalidObject::new(&kind, &recover_name(bytes, fallback), e.to_string()));
    let parsed = match kind.as_str() {
        "Pod" => match serde_json::from_slice::<PodLite>(bytes) {
            Ok(pod) => {
                let (facts, problem) = PodFacts::from_lite(&pod);
                Parsed::Pod(Box::new(facts), problem)
            }
            // The pod still names someone: salvage who, so that its allocations can be held.
            Err(e) => {
                let (namespace, name) = salvage_name(bytes);
                let label = if name.is_empty() { fallback.to_string() } else { format!("{namespace}/{name}") };
                let problem = format!("{e}; every allocation of this pod is held");
                Parsed::UnreadablePod(InvalidObject::new("Pod", &label, problem), namespace, name)
            }
        },
        "Node" => serde_json::from_slice::<NodeLite>(bytes).map_or_else(invalid, |n| Parsed::Node(Box::new(n))),
        "Namespace" => serde_json::from_slice::<Named>(bytes).map_or_else(invalid, |n| Parsed::Namespace(n.metadata.name)),
        // Knative and others have kinds named Service too: only the core one.
        "Service" if api_version.is_empty() || api_version == "v1" => match serde_json::from_slice::<Value>(bytes) {
            Ok(v) if v["metadata"]["name"].as_str().is_some_and(|n| !n.is_empty()) => {
                let meta = &v["metadata"];
                let key = format!("{}/{}", meta["namespace"].as_str().unwrap_or_default(), meta["name"].as_str().unwrap_or_default());
                let revision = meta["resourceVersion"].as_str().unwrap_or_default().to_string();
                let slim = crate::loadbalancer::slim_service(&v, &revision);
                Parsed::Service(key, revision, Box::new(slim))
            }
            other => {
                let problem = match other {
                    Ok(_) => "a Service without a name".to_string(),
                    Err(e) => e.to_string(),
                };
                let (namespace, name) = salvage_name(bytes);
                let label = if name.is_empty() { fallback.to_string() } else { format!("{namespace}/{name}") };
                Parsed::UnreadableService(InvalidObject::new("Service", &label, format!("{problem}; its LoadBalancer addresses are not judged")), namespace, name)
            }
        },
        k if k.ends_with("List") && nesting < MAX_LIST_NESTING => {
            if let Ok(list) = serde_json::from_slice::<NestedList>(bytes) {
                let items = list
                    .items
                    .iter()
                    .enumerate()
                    .map(|(j, raw)| classify(raw.get().as_bytes(), &format!("{fallback}.{j}"), nesting + 1, None))
                    .collect();
                return Outcome::List(items);
            }
            Parsed::Ignored(None)
        }
        "IPAMBlock" | "BlockAffinity" | "IPAMHandle" | "IPPool" | "IPReservation" | "IPAMConfig"
        | "IPAMConfiguration" | "ClusterInformation" | "KubeControllersConfiguration"
            if !calico_api =>
        {
            Parsed::Ignored(Some(InvalidObject::new(
                &kind,
                &recover_name(bytes, fallback),
                format!("apiVersion {api_version:?} is neither {CALICO_API_VERSION} nor {CALICO_V3_API_VERSION}; ignored"),
            )))
        }
        "IPAMBlock" => match serde_json::from_slice::<IpamBlock>(bytes) {
            Ok(b) if b.spec.deleted => Parsed::SoftDeleted,
            Ok(b) => Parsed::Block(Box::new(trimmed(b))),
            Err(e) => {
                let handles = serde_json::from_slice::<Value>(bytes).map(|v| crate::loadbalancer::unreadable_block_handles(&v)).unwrap_or_default();
                Parsed::InvalidBlock(InvalidObject::new(&kind, &recover_name(bytes, fallback), e.to_string()), handles)
            }
        },
        "BlockAffinity" => match serde_json::from_slice::<BlockAffinity>(bytes) {
            Ok(a) if a.spec.deleted => Parsed::SoftDeleted,
            Ok(a) => Parsed::Affinity(Box::new(trimmed(a))),
            Err(e) => invalid(e),
        },
        "IPAMHandle" => match serde_json::from_slice::<IpamHandle>(bytes) {
            Ok(h) if h.spec.deleted => Parsed::SoftDeleted,
            Ok(h) => Parsed::Handle(Box::new(trimmed(h))),
            Err(e) => invalid(e),
        },
        "IPPool" => serde_json::from_slice(bytes).map_or_else(invalid, |p| Parsed::Pool(Box::new(p))),
        "IPReservation" => serde_json::from_slice(bytes).map_or_else(invalid, |r| Parsed::Reservation(Box::new(r))),
        "IPAMConfig" | "IPAMConfiguration" => {
            serde_json::from_slice(bytes).map_or_else(invalid, |c| Parsed::IpamConfig(Box::new(c)))
        }
        "ClusterInformation" => serde_json::from_slice(bytes).map_or_else(invalid, |c| Parsed::ClusterInfo(Box::new(c))),
        "KubeControllersConfiguration" => {
            serde_json::from_slice(bytes).map_or_else(invalid, |c| Parsed::KubeControllersConfig(Box::new(c)))
        }
        _ => Parsed::Ignored(None),
    };
    let kind = if kind.is_empty() { NO_KIND.to_string() } else { kind };
    Outcome::Object { kind, v3: v3 && calico_api, parsed }
}

/// Reads `kind` and `apiVersion` from an object's first keys without parsing the rest: kubectl
/// writes them first, so this touches a few dozen bytes of a multi-KB pod. `None` when the item
/// is not that simple (then serde reads the head properly, and reports what is wrong).
fn peek_head(b: &[u8]) -> Option<Head> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let (mut kind, mut api) = (None, None);
    loop {
        i = skip_ws(b, i);
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key = &b[i + 1..key_end - 1];
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let value_start = i;
        i = skip_value(b, i)?;
        let slot = match key {
            b"kind" => Some(&mut kind),
            b"apiVersion" => Some(&mut api),
            _ => None,
        };
        if let Some(slot @ None) = slot {
            *slot = Some(serde_json::from_slice::<String>(&b[value_start..i]).ok()?);
        }
        if kind.is_some() && api.is_some() {
            break;
        }
        i = skip_ws(b, i);
        match b.get(i)? {
            b',' => i += 1,
            b'}' => break,
            _ => return None,
        }
    }
    // No kind: let serde decide (an escaped key spelling would only be seen there).
    Some(Head { kind: kind?, api_version: api.unwrap_or_default() })
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// `b[i]` is a quote: the index after the closing quote.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        i += find_quote_or_backslash(b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

/// The index after the value starting at `b[i]`, without checking it (serde does that later).
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match *b.get(i)? {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']') && !b[i].is_ascii_whitespace() {
                i += 1;
            }
            Some(i)
        }
    }
}

fn keep_singleton<S>(slot: &mut Option<Object<S>>, new: Object<S>, newer_copy: bool) {
    let replace = match slot {
        None => true,
        Some(old) => (old.name() != "default" && new.name() == "default") || (newer_copy && old.name() == new.name()),
    };
    if replace {
        *slot = Some(new);
    }
}

impl DumpContents {
    /// Takes one object given as JSON text (with its `kind` and `apiVersion`), exactly as if it
    /// had been read from a dump file; `label` names it in errors when it has no name.
    pub fn absorb_object_json(&mut self, bytes: &[u8], label: &str) {
        self.absorb(classify(bytes, label, 0, None), None);
    }

    fn absorb(&mut self, outcome: Outcome, list: Option<usize>) {
        let (kind, v3, parsed) = match outcome {
            Outcome::List(items) => {
                for item in items {
                    self.absorb(item, list);
                }
                return;
            }
            Outcome::Object { kind, v3, parsed } => (kind, v3, parsed),
        };
        if let Some(l) = list.and_then(|l| self.lists.get_mut(l)) {
            *l.items.entry(kind.clone()).or_default() += 1;
        }
        if kind == "Namespace" && list.is_some() {
            self.namespaces_listed = true;
        }
        *self.kind_counts.entry(kind).or_default() += 1;
        self.saw_v3_api |= v3;
        match parsed {
            Parsed::Block(b) => {
                let verdict = self.judge("IPAMBlock", &b.metadata.name, b.resource_version(), &b.spec, self.blocks.len());
                if verdict == Verdict::Conflict {
                    self.held_blocks.insert(b.spec.cidr.clone());
                }
                if self.keep(verdict).is_some() {
                    self.lb.absorb_block(&b);
                }
                self.keep_ipam(verdict, *b, IpamIndex::apply_block, |c| &mut c.blocks);
            }
            Parsed::Affinity(a) => {
                let verdict = self.judge("BlockAffinity", &a.metadata.name, a.resource_version(), &a.spec, self.affinities.len());
                if verdict == Verdict::Conflict {
                    // The block of a contested affinity keeps everything it holds.
                    self.held_blocks.insert(a.spec.cidr.clone());
                }
                self.keep_ipam(verdict, *a, IpamIndex::apply_affinity, |c| &mut c.affinities);
            }
            Parsed::Handle(h) => {
                let verdict = self.judge("IPAMHandle", &h.metadata.name, h.resource_version(), &h.spec, self.handles.len());
                if verdict == Verdict::Conflict {
                    self.held_handles.insert(IpamIndex::handle_key(&*h).to_string());
                }
                self.keep_ipam(verdict, *h, IpamIndex::apply_handle, |c| &mut c.handles);
            }
            Parsed::Node(n) => {
                // Kept in both modes: few, and what an etcd dump's Calico Nodes are mapped onto.
                if let Some(index) = self.index.as_deref_mut() {
                    index.apply_node(&n);
                }
                self.nodes.push(*n);
            }
            Parsed::CalicoNode(name, k8s_node) => {
                self.calico_nodes.insert(name, k8s_node);
            }
            Parsed::EtcdDump => self.etcd_dump = true,
            Parsed::Pod(facts, problem) => {
                self.invalid.extend(problem);
                self.absorb_pod(*facts);
            }
            Parsed::UnreadablePod(problem, namespace, name) => {
                self.invalid.push(problem);
                self.unreadable_pods.push((namespace, name));
            }
            Parsed::Pool(p) => {
                let verdict = self.judge("IPPool", &p.metadata.name, p.resource_version(), &p.spec, self.pools.len());
                self.hold_all_on_conflict(verdict);
                if let Some(at) = self.keep(verdict) {
                    put(&mut self.pools, at, *p);
                }
            }
            Parsed::Reservation(r) => {
                let verdict = self.judge("IPReservation", &r.metadata.name, r.resource_version(), &r.spec, self.reservations.len());
                self.hold_all_on_conflict(verdict);
                if let Some(at) = self.keep(verdict) {
                    put(&mut self.reservations, at, *r);
                }
            }
            Parsed::IpamConfig(c) => {
                let verdict = self.judge("IPAMConfig", &c.metadata.name, c.resource_version(), &c.spec, 0);
                self.hold_all_on_conflict(verdict);
                if verdict != Verdict::KeepOld && verdict != Verdict::Conflict {
                    keep_singleton(&mut self.ipam_config, *c, matches!(verdict, Verdict::TakeNew { .. }));
                }
            }
            Parsed::ClusterInfo(c) => {
                let verdict = self.judge("ClusterInformation", &c.metadata.name, c.resource_version(), &c.spec, 0);
                self.hold_all_on_conflict(verdict);
                if verdict != Verdict::KeepOld && verdict != Verdict::Conflict {
                    keep_singleton(&mut self.cluster_info, *c, matches!(verdict, Verdict::TakeNew { .. }));
                }
            }
            Parsed::KubeControllersConfig(c) => {
                let verdict = self.judge("KubeControllersConfiguration", &c.metadata.name, c.resource_version(), &c.spec, 0);
                self.hold_all_on_conflict(verdict);
                if verdict != Verdict::KeepOld && verdict != Verdict::Conflict {
                    keep_singleton(&mut self.kube_controllers_config, *c, matches!(verdict, Verdict::TakeNew { .. }));
                }
            }
            Parsed::Namespace(name) => {
                self.namespaces.insert(name);
            }
            Parsed::Service(key, revision, slim) => {
                self.lb.services_read += 1;
                match self.judge("Service", &key, &revision, &*slim, 0) {
                    Verdict::New | Verdict::TakeNew { .. } if crate::loadbalancer::is_load_balancer(&slim) => {
                        self.lb.services.insert(key, *slim);
                    }
                    Verdict::New | Verdict::TakeNew { .. } => {
                        self.lb.services.remove(&key);
                    }
                    Verdict::Conflict => {
                        self.lb.held_services.insert(key);
                    }
                    Verdict::Same | Verdict::KeepOld => {}
                }
            }
            Parsed::UnreadableService(problem, namespace, name) => {
                self.invalid.push(problem);
                if name.is_empty() {
                    self.lb.unnamed_service = true;
                } else {
                    self.lb.held_services.insert(format!("{namespace}/{name}"));
                }
            }
            Parsed::InvalidBlock(problem, handles) => {
                self.lb.unreadable_handles.extend(handles);
                self.invalid.push(problem);
            }
            Parsed::SoftDeleted => self.soft_deleted += 1,
            Parsed::Ignored(note) => self.invalid.extend(note),
            Parsed::Invalid(problem) => {
                if problem.kind == UNREADABLE_KIND {
                    self.unreadable_items += 1;
                }
                self.invalid.push(problem)
            }
        }
    }

    /// Keeps a judged block, affinity or handle: applied to the index when the dump is read
    /// indexed (one it rejects is reported), else stored in its list (`list`) where `keep` says.
    fn keep_ipam<T>(&mut self, verdict: Verdict, object: T, apply: fn(&mut IpamIndex, &T) -> Result<(), InvalidObject>, list: fn(&mut Self) -> &mut Vec<T>) {
        let Some(at) = self.keep(verdict) else { return };
        match self.index.as_deref_mut() {
            Some(index) => {
                if let Err(e) = apply(index, &object) {
                    self.invalid.push(e);
                }
            }
            None => put(list(self), at, object),
        }
    }

    /// etcd: the allocations name Calico Nodes. Every Kubernetes Node is also seen under the
    /// name of each Calico Node whose `k8s` orchRef names it (its labels with it), a Calico Node
    /// without one as a node of its own (never deleted), and pods are compared with the
    /// Kubernetes name ([`IpamIndex::set_node_alias`]). The Kubernetes names stay too, so a
    /// dump's pods still find their nodes and an allocation on a Kubernetes node without a
    /// Calico Node is judged as on a live node: more cautious than the GC, never less.
    pub fn map_calico_nodes(&mut self) {
        if self.calico_nodes.is_empty() {
            return;
        }
        let mut extra = Vec::new();
        for (calico, k8s) in &self.calico_nodes {
            let labels = match k8s {
                Some(k) => match self.nodes.iter().find(|n| n.metadata.name == *k) {
                    Some(n) => n.metadata.labels.clone(),
                    None => continue,
                },
                None => BTreeMap::new(),
            };
            extra.push(NodeLite { metadata: crate::model::node::NodeMeta { name: calico.clone(), labels } });
        }
        if let Some(index) = self.index.as_deref_mut() {
            for n in &extra {
                index.apply_node(n);
            }
            for (calico, k8s) in &self.calico_nodes {
                index.set_node_alias(calico, k8s.as_deref());
            }
        }
        self.nodes.extend(extra);
    }

    /// Judges a copy of an IPAM object against the copies seen before, recording what differed.
    fn judge<S: serde::Serialize>(&mut self, kind: &str, name: &str, resource_version: &str, spec: &S, position: usize) -> Verdict {
        let content = merge::digest(&serde_json::to_vec(spec).unwrap_or_default());
        let verdict = self.registry.judge(kind, name, resource_version, content, position as u32);
        let resolution = match verdict {
            Verdict::New | Verdict::Same => return verdict,
            Verdict::TakeNew { .. } => "newer-kept",
            Verdict::KeepOld => "older-ignored",
            Verdict::Conflict => "held",
        };
        self.duplicates.push(Duplicate { kind: kind.to_string(), name: name.to_string(), resolution });
        verdict
    }

    /// Where a judged copy goes: `Some(position)` to store it (a new one at the end, a newer one
    /// over the old), `None` to drop it.
    fn keep(&self, verdict: Verdict) -> Option<Option<usize>> {
        match verdict {
            Verdict::New => Some(None),
            Verdict::TakeNew { position } => Some(Some(position as usize)),
            Verdict::Same | Verdict::KeepOld | Verdict::Conflict => None,
        }
    }

    fn hold_all_on_conflict(&mut self, verdict: Verdict) {
        // Pools, reservations and the configuration singletons shape every verdict: with two
        // readings of one and no way to tell the newer, nothing is releasable.
        if verdict == Verdict::Conflict {
            self.conflicting_settings = true;
        }
    }

    /// A pod, merged with an earlier copy of itself if there was one.
    fn absorb_pod(&mut self, facts: PodFacts) {
        self.pod_namespaces.insert(facts.namespace.clone());
        let (namespace, name) = (facts.namespace.clone(), facts.name.clone());
        let earlier = match self.index.as_deref() {
            Some(index) => index.pod_by_name(&namespace, &name).map(|slot| facts_of_slot(index, slot)),
            None => self.pod_positions.get(&(namespace.clone(), name.clone())).map(|&at| self.pods[at].clone()),
        };
        let facts = match earlier {
            Some(old) => {
                let (merged, differs) = merge::merge_pods(old, facts);
                if differs {
                    self.duplicates.push(Duplicate { kind: "Pod".into(), name: format!("{namespace}/{name}"), resolution: "union-of-ips" });
                }
                merged
            }
            None => facts,
        };
        match self.index.as_deref_mut() {
            Some(index) => index.apply_pod(&facts),
            None => match self.pod_positions.get(&(namespace.clone(), name.clone())) {
                Some(&at) => self.pods[at] = facts,
                None => {
                    self.pod_positions.insert((namespace, name), self.pods.len());
                    self.pods.push(facts);
                }
            },
        }
    }
}

/// Stores `value` at `at` (a newer copy over the old one) or at the end.
fn put<T>(v: &mut Vec<T>, at: Option<usize>, value: T) {
    match at.filter(|&i| i < v.len()) {
        Some(i) => v[i] = value,
        None => v.push(value),
    }
}

/// The facts of an indexed pod, as far as the index keeps them (enough to merge a second copy).
fn facts_of_slot(index: &crate::ipam::index::IpamIndex, slot: &crate::ipam::index::PodSlot) -> PodFacts {
    PodFacts {
        namespace: index.resolve(slot.namespace).to_string(),
        name: index.resolve(slot.name).to_string(),
        uid: String::new(),
        node: index.resolve(slot.node).to_string(),
        phase: slot.phase(),
        evicted: slot.evicted,
        deleting: slot.deleting,
        host_network: false,
        status_reports_ip: slot.status_reports_ip,
        ips: slot.ips.to_vec(),
        unparsable_ips: slot.unparsable_ips,
    }
}

/// A scan never writes objects back, so the metadata it does not read (managedFields, labels,
/// annotations, status) is dropped as each IPAM object arrives: with one handle per pod, that
/// metadata would otherwise outweigh everything the GC keeps.
fn trimmed<S>(mut o: crate::model::Object<S>) -> crate::model::Object<S> {
    o.metadata.extra = Default::default();
    o.metadata.labels = Default::default();
    o.metadata.annotations = Default::default();
    o.extra = Default::default();
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, ip: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                "annotations": {"cni.projectcalico.org/podIP": format!("{ip}/32"), "note": "a \"quoted\" {[ ]} \\ value"},
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {"f:podIP": {}, ".": {}}}}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox", "args": ["]", "}", "\"", "items"]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        })
    }

    fn block(cidr: &str, deleted: bool) -> Value {
        json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": cidr.replace(['.', '/'], "-")},
            "spec": {"cidr": cidr, "affinity": "host:n1", "allocations": [0, null], "unallocated": [1],
                "attributes": [{"handle_id": "h1", "secondary": {"node": "n1"}}], "strictAffinity": false, "deleted": deleted}
        })
    }

    fn calico(kind: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
    }

    fn every_kind() -> Vec<Value> {
        vec![
            pod("ns", "p1", "10.0.0.1"),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"a": "b"}}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}),
            block("10.0.0.0/31", false),
            calico("BlockAffinity", "n1-10-0-0-0-31", json!({"state": "confirmed", "node": "n1", "cidr": "10.0.0.0/31", "deleted": "false"})),
            calico("IPAMHandle", "h1", json!({"handleID": "h1", "block": {"10.0.0.0/31": 1}})),
            calico("IPPool", "default-ipv4", json!({"cidr": "10.0.0.0/16", "blockSize": 26})),
            calico("IPReservation", "r", json!({"reservedCIDRs": ["10.0.0.9/32"]})),
            calico("IPAMConfig", "default", json!({"strictAffinity": true})),
            calico("ClusterInformation", "default", json!({"clusterGUID": "g"})),
            calico("KubeControllersConfiguration", "default", json!({"controllers": {"node": {"leakGracePeriod": "5m"}}})),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"items": "[{"}}),
        ]
    }

    fn list(items: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items})
    }

    fn read(name: &str, text: &str) -> DumpContents {
        read_bytes(name, text.as_bytes()).unwrap()
    }

    /// Reads JSON with tiny reads and batches, so every scanner state crosses a chunk boundary.
    fn read_chunked(bytes: &[u8], chunk: usize, batch: usize) -> Result<DumpContents, String> {
        let mut report = |_: u64, _: u64| {};
        let mut progress = Progress { done: 0, reported: 0, total: 0, report: &mut report };
        let mut contents = DumpContents::default();
        read_json(bytes, "t", chunk, batch, &mut contents, &mut progress).map_err(|f| match f {
            JsonFailure::Io(e) => e.to_string(),
            JsonFailure::Syntax(s) => format!("{}@{}", s.problem, s.offset),
        })?;
        Ok(contents)
    }

    fn assert_every_kind(c: &DumpContents) {
        assert_eq!(c.pods.len(), 1);
        assert_eq!(c.pods[0].ips, vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(c.nodes.len(), 1);
        assert!(c.namespaces.contains("ns"));
        assert_eq!(c.blocks.len(), 1);
        assert_eq!(c.blocks[0].spec.allocations, vec![Some(0), None]);
        assert_eq!(c.affinities.len(), 1);
        assert_eq!(c.handles.len(), 1);
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.reservations.len(), 1);
        assert!(c.ipam_config.as_ref().unwrap().spec.strict_affinity);
        assert!(c.cluster_info.is_some());
        assert_eq!(c.kube_controllers_config.as_ref().unwrap().spec.leak_grace_period(), 5 * 60 * 1000);
        assert_eq!(c.kind_counts.get("ConfigMap"), Some(&1));
        assert_eq!(c.kind_counts.values().sum::<u64>(), 12);
        assert!(c.invalid.is_empty(), "{:?}", c.invalid);
        assert!(!c.saw_v3_api);
    }

    #[test]
    fn json_list_with_mixed_kinds_is_read() {
        let text = serde_json::to_string_pretty(&list(every_kind())).unwrap();
        let c = read("dump.json", &text);
        assert_every_kind(&c);
        assert_eq!(c.bytes_read, text.len() as u64);
    }

    #[test]
    fn single_object_json_is_read() {
        let c = read("pod.json", &pod("ns", "p", "10.0.0.7").to_string());
        assert_eq!(c.pods.len(), 1);
        assert_eq!(c.pods[0].name, "p");
        assert_eq!(c.kind_counts.get("Pod"), Some(&1));
    }

    #[test]
    fn concatenated_json_values_are_each_read_in_order() {
        let text = format!(
            "{}\n{}{}\n[{}]",
            pod("ns", "a", "10.0.0.1"),
            list(vec![pod("ns", "b", "10.0.0.2"), pod("ns", "c", "10.0.0.3")]),
            pod("ns", "d", "10.0.0.4"),
            pod("ns", "e", "10.0.0.5")
        );
        let c = read("dump", &text);
        let names: Vec<_> = c.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn multi_document_yaml_is_read() {
        let docs: Vec<String> = every_kind().iter().map(|v| serde_saphyr::to_string(v).unwrap()).collect();
        let text = format!("---\n{}", docs.join("---\n"));
        let c = read("dump.yaml", &text);
        assert_every_kind(&c);
    }

    #[test]
    fn yaml_list_is_read() {
        let text = serde_saphyr::to_string(&list(every_kind())).unwrap();
        assert_every_kind(&read("dump.yml", &text));
        // kubectl writes keys sorted: `items` comes before `kind: List`.
        let text = "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: a\n- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: b\nkind: List\nmetadata:\n  resourceVersion: \"\"\n";
        let c = read("ns.yaml", text);
        assert_eq!(c.namespaces.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert!(c.invalid.is_empty());
    }

    #[test]
    fn extensionless_input_is_sniffed() {
        assert_every_kind(&read("dump", &list(every_kind()).to_string()));
        assert_every_kind(&read("dump", &serde_saphyr::to_string(&list(every_kind())).unwrap()));
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("dump-test-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn folders_are_searched_recursively_in_sorted_order_skipping_other_files() {
        let tmp = TempDir::new("walk");
        let d = &tmp.0;
        fs::create_dir_all(d.join("sub/deeper")).unwrap();
        fs::write(d.join("b.json"), pod("ns", "b", "10.0.0.2").to_string()).unwrap();
        fs::write(d.join("a.yaml"), serde_saphyr::to_string(&pod("ns", "a", "10.0.0.1")).unwrap()).unwrap();
        fs::write(d.join("notes.txt"), "not a dump").unwrap();
        fs::write(d.join("sub/deeper/c.yml"), serde_saphyr::to_string(&pod("ns", "c", "10.0.0.3")).unwrap()).unwrap();
        let mut calls = Vec::new();
        let c = read_paths(std::slice::from_ref(d), &mut |done, total| calls.push((done, total))).unwrap();
        let names: Vec<_> = c.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(c.files, vec![d.join("a.yaml"), d.join("b.json"), d.join("sub/deeper/c.yml")]);
        assert_eq!(calls.last().copied(), Some((c.bytes_read, c.bytes_read)));
        let empty = TempDir::new("empty");
        fs::write(empty.0.join("notes.txt"), "x").unwrap();
        assert!(matches!(read_paths(std::slice::from_ref(&empty.0), &mut |_, _| {}), Err(DumpError::NoDumpFiles { .. })));
    }

    #[test]
    fn missing_path_and_non_json_file_are_errors_with_a_location() {
        let err = read_paths(&[PathBuf::from("/nonexistent/dump.json")], &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, DumpError::NotFound { .. }), "{err}");
        let tmp = TempDir::new("bad");
        let bad = tmp.0.join("bad.json");
        fs::write(&bad, "{\"kind\": \"List\", \"items\": []}\n\n  hello").unwrap();
        match read_paths(std::slice::from_ref(&bad), &mut |_, _| {}).unwrap_err() {
            DumpError::Json { path, line, column, problem } => {
                assert_eq!((path, line, column), (bad, 3, 3));
                assert!(problem.contains("'h'"), "{problem}");
            }
            other => panic!("{other}"),
        }
        let err = read_bytes("bad.yaml", b"a: [1, 2\nb: }").unwrap_err();
        assert!(matches!(err, DumpError::Yaml { .. }), "{err}");
        let err = read_bytes("bad.yaml", b"just a sentence").unwrap_err();
        assert!(matches!(err, DumpError::Yaml { .. }), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error() {
        let text = list(vec![pod("ns", "a", "10.0.0.1"), pod("ns", "b", "10.0.0.2")]).to_string();
        for cut in [text.len() - 1, text.len() / 2, 30] {
            let err = read_bytes("dump.json", &text.as_bytes()[..cut]).unwrap_err();
            match err {
                DumpError::Json { problem, .. } => assert!(problem.contains("truncated"), "{problem}"),
                other => panic!("{other}"),
            }
        }
        assert!(matches!(read_bytes("x.json", b"{\"a\": [}").unwrap_err(), DumpError::Json { .. }));
        assert!(matches!(read_bytes("x.json", b"]").unwrap_err(), DumpError::Json { .. }));
    }

    #[test]
    fn malformed_item_is_reported_and_the_rest_still_read() {
        let mut bad_block = block("10.0.0.0/31", false);
        bad_block["spec"]["allocations"] = json!("not a list");
        let text = format!(
            "{{\"kind\":\"List\",\"items\":[{},{},{{\"kind\":\"Pod\",\"metadata\":{{\"name\": oops}}}}, 5 ,,{}]}}",
            pod("ns", "a", "10.0.0.1"),
            bad_block,
            pod("ns", "b", "10.0.0.2")
        );
        let c = read("dump.json", &text);
        assert_eq!(c.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c.invalid.len(), 4, "{:#?}", c.invalid);
        assert_eq!(c.invalid[0].kind, "IPAMBlock");
        assert_eq!(c.invalid[0].name, "10-0-0-0-31");
        assert!(c.invalid[0].problem.contains("invalid type"), "{}", c.invalid[0].problem);
        assert_eq!((c.invalid[1].kind.as_str(), c.invalid[1].name.as_str()), ("Pod", "dump.json#2"));
        assert_eq!((c.invalid[2].kind.as_str(), c.invalid[2].name.as_str()), (UNREADABLE_KIND, "dump.json#3"));
        assert_eq!(c.invalid[3].name, "dump.json#4");
        assert_eq!(c.kind_counts.get("IPAMBlock"), Some(&1));
    }

    #[test]
    fn pod_with_unparsable_ip_is_kept_and_reported() {
        let c = read("dump.json", &list(vec![pod("ns", "p", "10.0.0.999")]).to_string());
        assert_eq!(c.pods.len(), 1);
        assert!(c.pods[0].unparsable_ips);
        assert_eq!(c.invalid.len(), 1);
        assert_eq!(c.invalid[0].name, "ns/p");
    }

    #[test]
    fn soft_deleted_ipam_objects_are_skipped_and_counted() {
        let items = vec![
            block("10.0.0.0/31", true),
            block("10.0.0.2/31", false),
            calico("BlockAffinity", "a", json!({"state": "confirmed", "node": "n1", "cidr": "10.0.0.0/31", "deleted": "true"})),
            calico("IPAMHandle", "h", json!({"handleID": "h", "block": {}, "deleted": true})),
        ];
        let c = read("dump.json", &list(items).to_string());
        assert_eq!(c.blocks.len(), 1);
        assert_eq!(c.blocks[0].spec.cidr, "10.0.0.2/31");
        assert!(c.affinities.is_empty() && c.handles.is_empty());
        assert_eq!(c.soft_deleted, 3);
        assert_eq!(c.kind_counts.get("IPAMBlock"), Some(&2));
    }

    #[test]
    fn objects_being_deleted_are_kept() {
        let mut p = pod("ns", "p", "10.0.0.1");
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let c = read("dump.json", &list(vec![p]).to_string());
        assert_eq!(c.pods.len(), 1);
        assert!(c.pods[0].deleting);
    }

    #[test]
    fn strings_with_brackets_quotes_and_escapes_do_not_confuse_the_scanner() {
        let text = format!(
            concat!(
                "{{\"metadata\":{{\"items\":[1,2],\"x\":\"\\\"items\\\": [\"}},\"note\":\"items\",",
                "\"items\" : [ {} , {{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"n\\\\\\\"]}}\"}}}} ],",
                "\"kind\":\"List\"}}"
            ),
            pod("ns", "a", "10.0.0.1")
        );
        let c = read("dump.json", &text);
        assert!(c.invalid.is_empty(), "{:?}", c.invalid);
        assert_eq!(c.pods.len(), 1);
        assert_eq!(c.namespaces.iter().collect::<Vec<_>>(), ["n\\\"]}"]);
        assert_eq!(c.kind_counts.len(), 2);
    }

    #[test]
    fn chunk_and_batch_boundaries_do_not_change_the_result() {
        let mut items = every_kind();
        items.extend((0..20).map(|i| pod("ns", &format!("p{i}"), &format!("10.0.1.{i}"))));
        let text = format!("\u{feff}{}\n{}", serde_json::to_string_pretty(&list(items)).unwrap(), pod("x", "last", "10.0.2.1"));
        let whole = format!("{:?}", read_chunked(text.as_bytes(), 1 << 20, 1 << 20).unwrap());
        for chunk in [1, 2, 3, 7, 64, 1000] {
            for batch in [1, 100, 5000] {
                assert_eq!(format!("{:?}", read_chunked(text.as_bytes(), chunk, batch).unwrap()), whole, "chunk {chunk} batch {batch}");
            }
        }
    }

    #[test]
    fn nested_lists_and_top_level_arrays_are_read() {
        let text = json!([list(vec![pod("ns", "a", "10.0.0.1")]), {"kind": "PodList", "items": [pod("ns", "b", "10.0.0.2")]}]).to_string();
        let c = read("dump.json", &text);
        assert_eq!(c.pods.len(), 2);
        assert!(!c.kind_counts.contains_key("List"));
    }

    #[test]
    fn v3_objects_are_accepted_and_noted_and_foreign_groups_are_ignored() {
        let mut pool = calico("IPPool", "p", json!({"cidr": "10.0.0.0/16"}));
        pool["apiVersion"] = json!("projectcalico.org/v3");
        let mut other = calico("IPPool", "q", json!({"cidr": "10.1.0.0/16"}));
        other["apiVersion"] = json!("example.com/v1");
        let c = read("dump.json", &list(vec![pool, other]).to_string());
        assert_eq!(c.pools.len(), 1);
        assert!(c.saw_v3_api);
        assert_eq!(c.invalid.len(), 1);
        assert!(c.invalid[0].problem.contains("example.com/v1"));
        assert_eq!(c.kind_counts.get("IPPool"), Some(&2));
    }

    #[test]
    fn singletons_prefer_the_one_named_default() {
        let items = vec![
            calico("IPAMConfig", "other", json!({"strictAffinity": false})),
            calico("IPAMConfig", "default", json!({"strictAffinity": true})),
            calico("IPAMConfig", "third", json!({"strictAffinity": false})),
        ];
        let c = read("dump.json", &list(items).to_string());
        assert_eq!(c.ipam_config.unwrap().metadata.name, "default");
    }

    #[test]
    fn quote_search_finds_the_first_quote_or_backslash() {
        let s = b"abcdefghij\\klmnopq\"rs";
        for start in 0..s.len() {
            let expected = s[start..].iter().position(|&b| b == b'"' || b == b'\\');
            assert_eq!(find_quote_or_backslash(&s[start..]), expected);
        }
        assert_eq!(find_quote_or_backslash(&[0xa2; 9]), None);
        assert_eq!(find_quote_or_backslash(b"\x00\x00\x00\x00\x00\x00\x00\x00\"\x22"), Some(8));
    }

    fn json_soup() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just(&b"{"[..]), Just(&b"}"[..]), Just(&b"["[..]), Just(&b"]"[..]), Just(&b","[..]), Just(&b":"[..]),
            Just(&b"\""[..]), Just(&b"\\"[..]), Just(&b" "[..]), Just(&b"\"items\""[..]), Just(&b"\"kind\""[..]),
            Just(&b"\"Pod\""[..]), Just(&b"\"IPAMBlock\""[..]), Just(&b"\"metadata\""[..]), Just(&b"1"[..]), Just(&b"null"[..]),
            Just(&b"\xff"[..]),
        ];
        proptest::collection::vec(token, 0..64).prop_map(|t| t.concat())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_bytes("fuzz.json", &bytes);
            let _ = read_bytes("fuzz.yaml", &bytes);
            let _ = read_bytes("fuzz", &bytes);
        }

        #[test]
        fn json_like_soup_never_panics_and_chunking_agrees(bytes in json_soup(), chunk in 1usize..16) {
            let _ = read_bytes("fuzz.yaml", &bytes);
            let whole = read_chunked(&bytes, 1 << 20, 1 << 20).map(|c| format!("{c:?}"));
            let split = read_chunked(&bytes, chunk, 8).map(|c| format!("{c:?}"));
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn mutated_dumps_never_panic_and_chunking_agrees(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6),
            chunk in 1usize..64,
        ) {
            let mut bytes = list(every_kind()).to_string().into_bytes();
            for (at, op, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => { bytes.remove(i); }
                    _ => {}
                }
            }
            let _ = read_bytes("fuzz.yaml", &bytes);
            let whole = read_chunked(&bytes, 1 << 20, 1 << 20).map(|c| format!("{c:?}"));
            let split = read_chunked(&bytes, chunk, 256).map(|c| format!("{c:?}"));
            prop_assert_eq!(whole, split);
        }

        /// A List read as YAML gives what the same List gives as JSON, item for item, however
        /// its items are split into documents; and its version is kept either way.
        #[test]
        fn yaml_and_json_lists_read_alike(n in 0usize..12, rv in 1u64..1000, split in any::<bool>()) {
            let pods: Vec<Value> = (0..n).map(|i| pod("ns", &format!("p{i}"), &format!("10.0.0.{i}"))).collect();
            let mut l = list(pods.clone());
            l["metadata"] = json!({"resourceVersion": rv.to_string()});
            let from_json = read("dump.json", &l.to_string());
            let yaml = if split {
                pods.iter().map(|p| serde_saphyr::to_string(p).unwrap()).collect::<Vec<_>>().join("---\n")
            } else {
                serde_saphyr::to_string(&l).unwrap()
            };
            let from_yaml = read("dump.yaml", &yaml);
            prop_assert_eq!(format!("{:?}", from_json.pods), format!("{:?}", from_yaml.pods));
            prop_assert_eq!(&from_json.kind_counts, &from_yaml.kind_counts);
            if !split {
                prop_assert_eq!(from_yaml.lists.len(), 1);
                prop_assert_eq!(&from_yaml.lists[0].head.resource_version, &rv.to_string());
                prop_assert_eq!(&from_json.lists[0].head, &from_yaml.lists[0].head);
            }
        }

        #[test]
        fn text_never_panics_as_yaml(text in "[a-z:{}\\[\\]\\-, \n\"'&*!|>#]{0,200}") {
            let _ = read_bytes("fuzz.yaml", text.as_bytes());
            let _ = read_bytes("fuzz.json", text.as_bytes());
        }
    }
}

