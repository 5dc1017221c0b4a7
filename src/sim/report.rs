//! The `simulate` report: planted vs found vs released per category, the passes, stage medians,
//! memory and the targets, as a table for people or one JSON object.
//!
//! Must not: judge anything (the checker did) or measure anything (the pipeline did).

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;

use super::checker::CheckReport;
use super::cluster::Category;
use super::dump::DumpStats;
use super::{median, quantile, PipelineRun, SimOptions};
use crate::datastore::PlanOutcome;
use crate::ipam::plan::{LeakState, Plan};
use crate::model::time::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

impl std::str::FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(OutputFormat::Table),
            "json" => Ok(OutputFormat::Json),
            other => Err(format!("unknown output format {other:?} (table or json)")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Scale {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub leak_fraction: f64,
    pub seed: u64,
    pub pods: usize,
    pub allocations: usize,
    pub blocks: usize,
    pub handles: usize,
    pub deleted_nodes: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CategoryRow {
    pub category: &'static str,
    /// "release" or "keep".
    pub fate: &'static str,
    /// Handles (one per pod, tunnel, reservation block).
    pub planted: usize,
    pub addresses: usize,
    /// Addresses some pass reported as leaked.
    pub found: usize,
    /// Addresses gone from the datastore at the end.
    pub released: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRows {
    pub empty_blocks_planted: usize,
    pub deleted_node_blocks: usize,
    pub blocks_expected_removed: usize,
    pub blocks_removed: usize,
    pub affinities_expected_removed: usize,
    pub affinities_removed: usize,
    pub orphan_handles_planted: usize,
    pub handles_expected_removed: usize,
    pub handles_removed: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassStat {
    pub pass: &'static str,
    pub full: bool,
    /// Seconds after T0.
    pub at_seconds: i64,
    pub examined: u64,
    pub leaks: usize,
    pub confirmed: usize,
    pub planned_releases: usize,
    pub released: usize,
    pub stale: usize,
    pub nodes_released: u64,
    pub blocks_deleted: u64,
    pub handles_deleted: u64,
    pub errors: u64,
    pub pass_ms: f64,
    pub execute_ms: f64,
}

impl PassStat {
    pub fn new(pass: &'static str, full: bool, since_t0: Millis, plan: &Plan, o: &PlanOutcome, pass_ms: f64, execute_ms: f64) -> Self {
        PassStat {
            pass,
            full,
            at_seconds: since_t0 / 1000,
            examined: plan.examined,
            leaks: plan.leaks.len(),
            confirmed: plan.leaks.iter().filter(|l| matches!(l.state, LeakState::Confirmed { .. })).count(),
            planned_releases: plan.release_count(),
            released: o.released.len(),
            stale: o.stale.len(),
            nodes_released: o.nodes_released,
            blocks_deleted: o.blocks_deleted,
            handles_deleted: o.handles_deleted,
            errors: o.error_count(),
            pass_ms,
            execute_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageTiming {
    pub stage: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Nearest-rank 99th percentile.
    pub p99_ms: f64,
    pub samples: usize,
}

impl StageTiming {
    pub fn new(stage: &str, samples: &[f64]) -> Self {
        StageTiming {
            stage: stage.to_string(),
            median_ms: median(samples),
            min_ms: samples.iter().copied().fold(f64::INFINITY, f64::min).min(f64::MAX),
            max_ms: samples.iter().copied().fold(0.0, f64::max),
            p99_ms: quantile(samples, 0.99),
            samples: samples.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// `IpamIndex::heap_bytes()`: the index's own estimate.
    pub index_heap_bytes: usize,
    /// Index plus GC state after one full pass, by the counting allocator; absent when the
    /// allocator is not installed (library tests).
    pub retained_bytes: Option<usize>,
    pub bytes_per_allocation: f64,
    /// Which figure `bytesPerAllocation` uses: "allocator" or "index-estimate".
    pub source: &'static str,
    /// The process's peak resident set (Linux `VmHWM`) when the report was built: the whole
    /// run, generator and datastore included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub name: &'static str,
    /// The limit at this run's scale (see `basis`).
    pub limit: f64,
    pub measured: f64,
    pub unit: &'static str,
    /// How the limit follows the scale: every target applies at every scale.
    pub basis: &'static str,
    /// None only when the figure could not be measured (no counting allocator, no `/proc`).
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimReport {
    pub ok: bool,
    pub scale: Scale,
    pub categories: Vec<CategoryRow>,
    pub objects: ObjectRows,
    pub passes: Vec<PassStat>,
    pub stages: Vec<StageTiming>,
    pub memory: Memory,
    pub targets: Vec<Target>,
    pub check: CheckReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump: Option<DumpStats>,
    /// Figures beside those of a previous run's JSON report (`--compare`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub comparison: Vec<Compared>,
}

/// Stage names the targets and the comparison find their figures by.
pub const STAGE_DECODE: &str = "list (objects decoded when written)";
pub const STAGE_BUILD: &str = "index build (reset)";
pub const STAGE_FULL: &str = "full pass (steady state)";
pub const STAGE_DIRTY: &str = "dirty pass (10 nodes)";
pub const STAGE_DIRTY_SMALL: &str = "dirty pass (10 nodes) at 100 nodes";

/// The scale the figures were set at: 5,000 nodes x 30 pods (196,510 allocations).
const REFERENCE_ALLOCATIONS: f64 = 196_510.0;
const REFERENCE_PODS: f64 = 150_000.0;
const MB: f64 = 1_000_000.0;

/// The targets at this run's scale. Time and memory totals that grow with the cluster are
/// scaled from the scale they were set at; figures that must not grow (a dirty pass, bytes per
/// allocation) hold at every scale.
fn targets(allocations: usize, pods: usize, stages: &[StageTiming], per_alloc: Option<f64>, peak_rss: Option<u64>) -> Vec<Target> {
    let stage = |name: &str| stages.iter().find(|s| s.stage == name);
    let allocs = allocations.max(1) as f64;
    let mut out = Vec::new();
    let mut push = |name, limit: f64, measured: Option<f64>, unit, basis| {
        out.push(Target { name, limit, measured: measured.unwrap_or(0.0), unit, basis, met: measured.map(|m| m <= limit) });
    };
    push(
        "index build (reset)",
        100.0 * allocs / REFERENCE_ALLOCATIONS,
        stage(STAGE_BUILD).map(|s| s.median_ms),
        "ms",
        "100 ms at 196,510 allocations, in proportion",
    );
    push(
        "full pass (steady state)",
        2.0 * (pods as f64 / REFERENCE_PODS).max(1.0),
        stage(STAGE_FULL).map(|s| s.median_ms),
        "ms",
        "2 ms up to 150,000 pods, in proportion above",
    );
    let dirty = stage(STAGE_DIRTY).filter(|s| s.samples >= 100);
    push("dirty pass (10 nodes) median", 0.05, dirty.map(|s| s.median_ms), "ms", "50 us at every scale (O(dirty))");
    push("dirty pass (10 nodes) p99", 1.0, dirty.map(|s| s.p99_ms), "ms", "1 ms at every scale, over >= 100 samples");
    if let (Some(big), Some(small)) = (dirty, stage(STAGE_DIRTY_SMALL)) {
        let ratio = big.median_ms / small.median_ms.max(1e-9);
        push("dirty pass median / its median at 100 nodes", 1.5, Some(ratio), "x", "1.5x at every scale (same run)");
    }
    push("retained GC state per allocation", 256.0, per_alloc, "bytes", "256 B at every scale");
    let pods = pods as f64;
    // 200 MB up to 30,000 pods (the README's 1,000 x 30), 2 GB at 750,000 (25,000 x 30), on
    // the line through both above.
    let rss_limit = if pods <= 30_000.0 { 200.0 } else { 200.0 + (pods - 30_000.0) * (2000.0 - 200.0) / 720_000.0 };
    push(
        "simulate peak RSS",
        rss_limit,
        peak_rss.map(|b| b as f64 / MB),
        "MB",
        "200 MB up to 30,000 pods, 2 GB at 750,000, linear",
    );
    out
}

#[cfg(test)]
pub fn targets_for_test(allocations: usize, pods: usize, stages: &[StageTiming]) -> Vec<Target> {
    targets(allocations, pods, stages, Some(1.0), Some(1))
}

/// One figure of this run beside the same figure of a previous run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Compared {
    pub figure: String,
    pub unit: &'static str,
    pub previous: f64,
    pub now: f64,
    /// now / previous: below 1 is faster or leaner.
    pub ratio: f64,
}

/// The figures of `prev` (a previous `--output json` report) that this run also has. A figure
/// the previous run lacks is left out; a report that is not one is an error.
pub fn compare(prev: &serde_json::Value, now: &SimReport) -> Result<Vec<Compared>, String> {
    let stages = prev["stages"].as_array().ok_or("not a simulate JSON report: it has no \"stages\"")?;
    let prev_stage = |name: &str, field: &str| {
        stages.iter().find(|s| s["stage"].as_str().is_some_and(|n| n == name || (name.starts_with("execute") && n.starts_with("execute")))).and_then(|s| s[field].as_f64())
    };
    let mut out = Vec::new();
    let mut add = |figure: String, unit, previous: Option<f64>, now: f64| {
        if let Some(previous) = previous {
            out.push(Compared { figure, unit, previous, now, ratio: if previous > 0.0 { now / previous } else { f64::NAN } });
        }
    };
    for st in &now.stages {
        add(format!("{} median", st.stage), "ms", prev_stage(&st.stage, "medianMs"), st.median_ms);
        add(format!("{} p99", st.stage), "ms", prev_stage(&st.stage, "p99Ms"), st.p99_ms);
    }
    let m = &prev["memory"];
    add("retained bytes per allocation".into(), "bytes", m["bytesPerAllocation"].as_f64(), now.memory.bytes_per_allocation);
    if let Some(rss) = now.memory.peak_rss_bytes {
        add("peak RSS".into(), "MB", m["peakRssBytes"].as_f64().map(|b| b / MB), rss as f64 / MB);
    }
    let pa = &prev["scale"]["allocations"];
    add("allocations".into(), "", pa.as_f64(), now.scale.allocations as f64);
    Ok(out)
}

/// What the pipeline measured of memory, for [`build`].
#[derive(Debug, Clone, Copy)]
pub struct MemoryFigures {
    /// Index plus GC state by the counting allocator, when installed.
    pub retained: Option<usize>,
    /// The index's own estimate.
    pub heap: usize,
    /// The process's peak resident set.
    pub peak_rss: Option<u64>,
}

pub fn build(
    opts: &SimOptions,
    run: &PipelineRun,
    check: CheckReport,
    stages: Vec<StageTiming>,
    memory: MemoryFigures,
    dump: Option<DumpStats>,
) -> SimReport {
    let MemoryFigures { retained, heap, peak_rss } = memory;
    let c = &run.cluster;
    let allocations = run.before.allocations;
    let mut rows: BTreeMap<Category, CategoryRow> = BTreeMap::new();
    for p in &c.planted {
        let row = rows.entry(p.category).or_insert_with(|| CategoryRow {
            category: p.category.as_str(),
            fate: if p.category.released() { "release" } else { "keep" },
            planted: 0,
            addresses: 0,
            found: 0,
            released: 0,
        });
        row.planted += 1;
        row.addresses += p.ips.len();
        row.found += p.ips.iter().filter(|ip| run.found.contains(ip)).count();
    }
    for row in rows.values_mut() {
        row.released = check.released_by_category.get(row.category).copied().unwrap_or(0);
    }
    let objects = ObjectRows {
        empty_blocks_planted: c.expect.empty_blocks.len(),
        deleted_node_blocks: c.expect.deleted_node_blocks.len(),
        blocks_expected_removed: c.expect.removed_blocks.len(),
        blocks_removed: check.blocks_removed,
        affinities_expected_removed: c.expect.removed_affinities.len(),
        affinities_removed: check.affinities_removed,
        orphan_handles_planted: c.expect.orphan_handles.len(),
        handles_expected_removed: c.expect.removed_handles.len(),
        handles_removed: check.handles_removed,
    };
    let (bytes, source) = match retained {
        Some(r) => (r, "allocator"),
        None => (heap, "index-estimate"),
    };
    let per_alloc = bytes as f64 / allocations.max(1) as f64;
    let targets = targets(allocations, c.pod_facts.len(), &stages, retained.map(|_| per_alloc), peak_rss);
    SimReport {
        ok: check.ok,
        scale: Scale {
            nodes: opts.nodes,
            pods_per_node: opts.pods_per_node,
            leak_fraction: opts.leak_fraction,
            seed: opts.seed,
            pods: c.pod_facts.len(),
            allocations,
            blocks: run.before.blocks,
            handles: run.before.handles,
            deleted_nodes: c.deleted_nodes.len(),
        },
        categories: rows.into_values().collect(),
        objects,
        passes: run.passes.clone(),
        stages,
        memory: Memory { index_heap_bytes: heap, retained_bytes: retained, bytes_per_allocation: per_alloc, source, peak_rss_bytes: peak_rss },
        targets,
        check,
        dump,
        comparison: Vec::new(),
    }
}

pub fn write_table(r: &SimReport, out: &mut dyn Write) -> io::Result<()> {
    let s = &r.scale;
    writeln!(
        out,
        "simulate: {} nodes x {} pods (seed {}, leak fraction {}): {} pods, {} allocations, {} blocks, {} handles, {} nodes deleted",
        s.nodes, s.pods_per_node, s.seed, s.leak_fraction, s.pods, s.allocations, s.blocks, s.handles, s.deleted_nodes
    )?;
    writeln!(out)?;
    writeln!(out, "{:<26} {:<8} {:>8} {:>10} {:>10} {:>10}", "CATEGORY", "FATE", "PLANTED", "ADDRESSES", "FOUND", "RELEASED")?;
    for c in &r.categories {
        writeln!(out, "{:<26} {:<8} {:>8} {:>10} {:>10} {:>10}", c.category, c.fate, c.planted, c.addresses, c.found, c.released)?;
    }
    let o = &r.objects;
    writeln!(out)?;
    writeln!(out, "{:<26} {:>8} {:>10}", "OBJECTS", "EXPECTED", "REMOVED")?;
    writeln!(out, "{:<26} {:>8} {:>10}", format!("blocks ({} empty)", o.empty_blocks_planted), o.blocks_expected_removed, o.blocks_removed)?;
    writeln!(out, "{:<26} {:>8} {:>10}", "affinities", o.affinities_expected_removed, o.affinities_removed)?;
    writeln!(out, "{:<26} {:>8} {:>10}", format!("handles ({} orphan)", o.orphan_handles_planted), o.handles_expected_removed, o.handles_removed)?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<18} {:>6} {:>9} {:>8} {:>9} {:>8} {:>8} {:>6} {:>9} {:>10}",
        "PASS", "AT(s)", "EXAMINED", "LEAKS", "CONFIRMED", "RELEASED", "BLK DEL", "NODES", "PASS ms", "EXEC ms"
    )?;
    for p in &r.passes {
        writeln!(
            out,
            "{:<18} {:>6} {:>9} {:>8} {:>9} {:>8} {:>8} {:>6} {:>9.3} {:>10.3}",
            p.pass, p.at_seconds, p.examined, p.leaks, p.confirmed, p.released, p.blocks_deleted, p.nodes_released, p.pass_ms, p.execute_ms
        )?;
    }
    writeln!(out)?;
    writeln!(out, "{:<34} {:>10} {:>10} {:>10} {:>10} {:>8}", "STAGE", "MEDIAN ms", "P99 ms", "MIN ms", "MAX ms", "RUNS")?;
    for st in &r.stages {
        writeln!(out, "{:<34} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>8}", st.stage, st.median_ms, st.p99_ms, st.min_ms, st.max_ms, st.samples)?;
    }
    let m = &r.memory;
    writeln!(out)?;
    match m.retained_bytes {
        Some(b) => writeln!(out, "memory: index + GC state {} bytes (allocator), index estimate {} bytes; {:.0} bytes/allocation", b, m.index_heap_bytes, m.bytes_per_allocation)?,
        None => writeln!(
            out,
            "memory: index estimate {} bytes; {:.0} bytes/allocation (no counting allocator: GC tracker not included)",
            m.index_heap_bytes, m.bytes_per_allocation
        )?,
    }
    if let Some(rss) = m.peak_rss_bytes {
        writeln!(out, "memory: peak RSS of the whole run {:.1} MB", rss as f64 / MB)?;
    }
    writeln!(out)?;
    writeln!(out, "{:<46} {:>12} {:>12} {:>5}  LIMIT FOLLOWS", "TARGET (at this scale)", "LIMIT", "MEASURED", "MET")?;
    for t in &r.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "unmeasured",
        };
        let limit = format!("{} {}", figure(t.limit), t.unit);
        let measured = format!("{} {}", figure(t.measured), t.unit);
        writeln!(out, "{:<46} {:>12} {:>12} {:>5}  {}", t.name, limit, measured, met, t.basis)?;
    }
    if !r.comparison.is_empty() {
        writeln!(out)?;
        writeln!(out, "{:<46} {:>12} {:>12} {:>9}", "COMPARED WITH THE PREVIOUS RUN", "PREVIOUS", "NOW", "NOW/PREV")?;
        for c in &r.comparison {
            writeln!(out, "{:<46} {:>12} {:>12} {:>8.2}x", c.figure, format!("{} {}", figure(c.previous), c.unit).trim(), format!("{} {}", figure(c.now), c.unit).trim(), c.ratio)?;
        }
    }
    if let Some(d) = &r.dump {
        writeln!(out)?;
        writeln!(out, "dump: {} bytes in {} files ({} pods, {} bytes of pods)", d.bytes, d.files.len(), d.pods, d.pod_bytes)?;
    }
    writeln!(out)?;
    if r.check.ok {
        writeln!(
            out,
            "check: OK: released {} addresses, exactly the {} planted; none held by a live pod; every block valid",
            r.check.released_total, r.check.expected_total
        )?;
    } else {
        writeln!(out, "check: FAILED")?;
        for p in &r.check.problems {
            writeln!(out, "  - {p}")?;
        }
    }
    Ok(())
}

/// Four significant digits, without an exponent.
fn figure(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    let decimals = if a >= 1000.0 { 0 } else if a >= 100.0 { 1 } else if a >= 10.0 { 2 } else if a >= 1.0 { 3 } else { 4 };
    format!("{v:.decimals$}")
}
