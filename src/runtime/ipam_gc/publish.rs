//! What the GC loop publishes for the HTTP endpoints and the leak report file: the report (built
//! at a bounded rate, because formatting every allocation costs hundreds of milliseconds at
//! 250k), the IPAM gauges (recomputed from the index, never in a scrape), and the labels of the
//! addresses a plan releases.
//!
//! Owns: report trimming and its rate, the report file write (off the loop's task), gauge
//! computation hand-off, reclamation labels.
//! Must not: decide anything, or hold the shared lock across an `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;

use super::inputs::GcInputs;
use crate::ipam::gc::{GcConfig, GcState};
use crate::ipam::plan::Plan;
use crate::model::InvalidObject;
use crate::runtime::Shared;
use crate::runtime::ipam_gauges::{self, NO_POOL, PoolDef, UNKNOWN_NODE};
use crate::scan::report::{AllocationMap, ReportMeta, build_report};

/// Builds the report of `plan` and publishes it; after a full pass also writes the report file.
pub fn publish_report(inputs: &GcInputs, plan: &Plan, cfg: &GcConfig, shared: &Shared, report_file: Option<&std::path::Path>) {
    let meta = ReportMeta::from_cluster_info(inputs.cluster_info.as_ref());
    let invalid: Vec<InvalidObject> = inputs.invalid.values().cloned().collect();
    // Only the leaked addresses of calicoctl's allocation map: the rest is every allocation of
    // the cluster (about 100 MB at 250k), never formatted.
    let report = build_report(&inputs.index, plan, plan, cfg, meta, invalid, AllocationMap::LeakedOnly);
    shared.set_report(report);
    if plan.full
        && let (Some(path), Some(report)) = (report_file, shared.report())
    {
        // Off the GC task: the file system may be slow; the report is shared, not copied.
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = write_report_file(&path, &report) {
                tracing::warn!(path = %path.display(), error = %e, "writing the leak report file failed");
            }
        });
    }
}

/// Writes `report` as pretty JSON to `path`, atomically (a reader never sees half a report).
fn write_report_file(path: &std::path::Path, report: &crate::scan::report::LeakReport) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    crate::runtime::status::write_atomically(path, &bytes)
}

/// Recomputes every IPAM gauge from the index and hands the finished numbers to the metrics (the
/// HTTP handler only renders). Reclamation series of pools that are gone go with them.
pub fn publish_gauges(inputs: &GcInputs, gc: &GcState, shared: &Shared) {
    let mut pools: Vec<PoolDef> = inputs.known.pools.iter().map(|(name, cidr)| PoolDef { name: name.clone(), cidr: *cidr }).collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let reserved: Vec<IpNet> = inputs.known.reservations.values().flatten().copied().collect();
    let gauges = ipam_gauges::compute(&inputs.index, &pools, &reserved, gc.tracked(), inputs.index.node_names());
    let live: HashSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    let old = shared.metrics(|m| {
        m.reclamations.retain(|(pool, _), _| pool == NO_POOL || live.contains(pool.as_str()));
        std::mem::replace(&mut m.ipam, Arc::new(gauges))
    });
    // Dropped outside the lock: a scrape never waits for the previous value to be freed.
    drop(old);
}

/// (pool, node) of every address the plan releases, read before the writes land.
pub fn reclamation_labels(inputs: &GcInputs, plan: &Plan) -> HashMap<(IpNet, u32), (String, String)> {
    let index = &inputs.index;
    let mut out = HashMap::new();
    for rel in &plan.releases {
        let Some(slot) = index.block_slot(&rel.cidr) else { continue };
        let Some(block) = index.block(slot) else { continue };
        let pool = pool_of(inputs, &rel.cidr);
        for item in &rel.items {
            let node = block.alloc(item.ordinal).map(|a| index.resolve(a.node)).filter(|n| !n.is_empty()).unwrap_or(UNKNOWN_NODE);
            out.insert((rel.cidr, item.ordinal), (pool.clone(), node.to_string()));
        }
    }
    out
}

fn pool_of(inputs: &GcInputs, cidr: &IpNet) -> String {
    inputs
        .known
        .pools
        .iter()
        .filter(|(_, p)| p.contains(cidr))
        .max_by_key(|(_, p)| p.prefix_len())
        .map_or_else(|| NO_POOL.to_string(), |(name, _)| name.clone())
}
