//! The controller's Prometheus metrics, kept as plain numbers and rendered in text format 0.0.4
//! on scrape.
//!
//! Owns: metric names, help texts, bucket bounds and rendering.
//! Must not: compute anything from the index (the GC loop hands over finished numbers), or use
//! unbounded labels (reasons, verbs and resources are static strings; pools and nodes are the
//! cluster's own bounded sets, as upstream labels them).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::ipam_gauges::{IpamGauges, LegacyCells, NodeCells};
use crate::datastore::kube::ApiCounters;

/// Pass duration buckets in seconds: a dirty pass takes well under a millisecond, a full pass at
/// 200k allocations a few milliseconds, a pass with writes up to seconds.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub pass_full: Histogram,
    pub pass_dirty: Histogram,
    pub last_success_seconds: f64,
    pub dirty_nodes: u64,
    pub confirmed_leaks: u64,
    pub orphan_handles: u64,
    pub releases_total: BTreeMap<&'static str, u64>,
    /// (pool, node) → releases, upstream's `ipam_allocations_gc_reclamations`.
    pub reclamations: BTreeMap<(String, String), u64>,
    /// Upstream's per-pool and per-node IPAM gauges, replaced whole after each pass; shared so
    /// a scrape takes a snapshot of the metrics without copying them.
    pub ipam: std::sync::Arc<IpamGauges>,
    /// Plan items waiting out a per-item backoff after a transient failure, by item category.
    pub items_backing_off: BTreeMap<&'static str, u64>,
    pub conflicts_total: u64,
    pub write_errors_total: BTreeMap<&'static str, u64>,
    pub datastore_paused: bool,
    /// This replica holds the Lease and may write.
    pub leader: bool,
    /// Datastore calls the plan executor made, by how they ended.
    pub executor_calls: crate::runtime::ipam_gc::executor::CallCounts,
    /// Required sources whose watch fails or relists (GC writes wait); absent = healthy.
    pub watch_unhealthy: std::collections::BTreeSet<&'static str>,
    /// Rounds whose due writes were held back by [`crate::runtime::ipam_gc::gating::WriteHold`].
    pub rounds_writes_held: u64,
    /// Members the mass-change guard holds, by scope (absent = none).
    pub mass_change_held: BTreeMap<&'static str, u64>,
    /// The etcd-mode node deleter's deletes, by (kind, outcome: deleted, absent, failed).
    pub node_deletions: BTreeMap<(&'static str, &'static str), u64>,
    /// The etcd-mode light controllers: objects each wants, and writes by (controller, op, outcome).
    pub light_desired: BTreeMap<&'static str, u64>,
    pub light_writes: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    /// Their reconcile rounds that ran: (count, total seconds), by controller.
    pub light_rounds: BTreeMap<&'static str, (u64, f64)>,
    /// Source objects (or, for policies, rules) that did not convert, by (controller, category).
    pub conversion_errors: BTreeMap<(&'static str, &'static str), u64>,
    /// The policy-name migrator's outcomes, by (kind plural, outcome), and the old-named
    /// policies its latest round found with a write to do, by kind plural.
    pub policy_name_migrations: BTreeMap<(&'static str, &'static str), u64>,
    pub policy_names_pending: BTreeMap<&'static str, u64>,
    /// Automatic host endpoints: templates left out as unusable, and wanted names held by a
    /// HostEndpoint this controller did not create.
    pub host_endpoint_templates_invalid: u64,
    /// LoadBalancer addresses allocated, by pool name, as the LoadBalancer controller's last
    /// round saw them; its assignment failures and releases by reason.
    pub lb_addresses: BTreeMap<String, u64>,
    pub lb_failures: BTreeMap<&'static str, u64>,
    pub lb_writes: BTreeMap<(&'static str, &'static str), u64>,
    pub host_endpoints_blocked: u64,
    /// Events written by the recorder task (and dropped by a full queue); shared with it.
    pub events: std::sync::Arc<crate::runtime::events::EventCounters>,
}

impl Metrics {
    /// One light-controller round that ran, and how long it took.
    pub fn light_round(&mut self, controller: &'static str, took: std::time::Duration) {
        let e = self.light_rounds.entry(controller).or_default();
        e.0 += 1;
        e.1 += took.as_secs_f64();
    }
}

/// Resident set size from `/proc/self/status` (`VmRSS`, in kB: no page-size assumption; Linux
/// only, `None` elsewhere). Read at scrape time.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, label: &str, h: &Histogram) {
    for (i, bound) in BUCKETS.iter().enumerate() {
        let _ = writeln!(out, "{name}_bucket{{scan=\"{label}\",le=\"{bound}\"}} {}", h.counts[i]);
    }
    let _ = writeln!(out, "{name}_bucket{{scan=\"{label}\",le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{scan=\"{label}\"}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{scan=\"{label}\"}} {}", h.count);
}

impl Metrics {
    /// The text exposition of every metric, API call counters included.
    pub fn render(&self, api: &ApiCounters) -> String {
        let mut out = String::with_capacity(4096);
        let h = "ipam_gc_pass_duration_seconds";
        header(&mut out, h, "histogram", "Duration of a GC pass (the decision; its writes run in the executor), by scan scope.");
        histogram(&mut out, h, "full", &self.pass_full);
        histogram(&mut out, h, "dirty", &self.pass_dirty);

        header(&mut out, "ipam_gc_last_success_timestamp_seconds", "gauge", "Unix time of the last GC pass whose writes all succeeded.");
        let _ = writeln!(out, "ipam_gc_last_success_timestamp_seconds {}", self.last_success_seconds);
        header(&mut out, "ipam_gc_dirty_nodes", "gauge", "Nodes examined by the latest dirty pass.");
        let _ = writeln!(out, "ipam_gc_dirty_nodes {}", self.dirty_nodes);
        header(&mut out, "ipam_gc_confirmed_leaks", "gauge", "Confirmed leaks waiting for release.");
        let _ = writeln!(out, "ipam_gc_confirmed_leaks {}", self.confirmed_leaks);
        header(&mut out, "ipam_gc_orphan_handles", "gauge", "IPAMHandles that no allocation refers to.");
        let _ = writeln!(out, "ipam_gc_orphan_handles {}", self.orphan_handles);
        header(&mut out, "ipam_gc_datastore_paused", "gauge", "1 while ClusterInformation says the datastore is not ready, or is missing (no writes).");
        let _ = writeln!(out, "ipam_gc_datastore_paused {}", u8::from(self.datastore_paused));

        header(&mut out, "ipam_gc_watch_unhealthy", "gauge", "1 while the watch of a required resource fails or relists, so GC writes wait; else 0.");
        for source in crate::runtime::watch::Source::ALL {
            let _ = writeln!(out, "ipam_gc_watch_unhealthy{{resource=\"{}\"}} {}", source.as_str(), u8::from(self.watch_unhealthy.contains(source.as_str())));
        }
        header(&mut out, "ipam_gc_rounds_writes_held_total", "counter", "GC rounds whose due writes were held: a required watch failed or relisted, or a malformed block held orphan-handle deletions.");
        let _ = writeln!(out, "ipam_gc_rounds_writes_held_total {}", self.rounds_writes_held);

        header(&mut out, "kube_controllers_mass_change_held", "gauge", "Destructive changes the mass-change guard holds (addresses to release, nodes to clean), by scope; 0 when nothing waits.");
        for scope in [crate::guard::IPAM_ADDRESSES, crate::guard::IPAM_NODES, crate::guard::ETCD_NODES] {
            let _ = writeln!(out, "kube_controllers_mass_change_held{{scope=\"{}\"}} {}", scope.name, self.mass_change_held.get(scope.name).copied().unwrap_or(0));
        }
        // The light controllers' scopes, once they ran.
        for (scope, n) in self.mass_change_held.iter().filter(|(s, _)| ![crate::guard::IPAM_ADDRESSES.name, crate::guard::IPAM_NODES.name, crate::guard::ETCD_NODES.name].contains(s)) {
            let _ = writeln!(out, "kube_controllers_mass_change_held{{scope=\"{scope}\"}} {n}");
        }
        header(&mut out, "kube_controllers_desired_objects", "gauge", "Objects a light controller wants in the datastore (etcd-mode Profiles and NetworkPolicies; automatic HostEndpoints), by controller.");
        for (controller, n) in &self.light_desired {
            let _ = writeln!(out, "kube_controllers_desired_objects{{controller=\"{controller}\"}} {n}");
        }
        header(&mut out, "kube_controllers_writes_total", "counter", "Writes of the light controllers (etcd-mode profiles, policies; automatic host endpoints), by controller, op (create, update, delete) and outcome (ok, conflict, failed).");
        for ((controller, op, outcome), n) in &self.light_writes {
            let _ = writeln!(out, "kube_controllers_writes_total{{controller=\"{controller}\",op=\"{op}\",outcome=\"{outcome}\"}} {n}");
        }

        header(&mut out, "kube_controllers_reconcile_seconds", "summary", "Reconcile rounds of the light controllers that ran (read, compare, write), by controller.");
        for (controller, (count, sum)) in &self.light_rounds {
            let _ = writeln!(out, "kube_controllers_reconcile_seconds_sum{{controller=\"{controller}\"}} {sum}");
            let _ = writeln!(out, "kube_controllers_reconcile_seconds_count{{controller=\"{controller}\"}} {count}");
        }
        header(&mut out, "kube_controllers_conversion_errors_total", "counter", "Source objects a light controller could not convert (malformed, policy_skipped), NetworkPolicy rules it dropped (rule_dropped) and host endpoint templates it skipped (selector, cidr, pattern, generate_name, malformed), by controller and category.");
        for ((controller, category), n) in &self.conversion_errors {
            let _ = writeln!(out, "kube_controllers_conversion_errors_total{{controller=\"{controller}\",category=\"{category}\"}} {n}");
        }

        header(&mut out, "kube_controllers_host_endpoint_templates_invalid", "gauge", "Host endpoint templates of the KubeControllersConfiguration that cannot be used (bad selector, CIDR or pattern) and are skipped.");
        let _ = writeln!(out, "kube_controllers_host_endpoint_templates_invalid {}", self.host_endpoint_templates_invalid);
        header(&mut out, "kube_controllers_host_endpoints_blocked", "gauge", "Automatic host endpoint names held by a HostEndpoint this controller did not create (left alone, not made).");
        let _ = writeln!(out, "kube_controllers_host_endpoints_blocked {}", self.host_endpoints_blocked);

        header(&mut out, "kube_controllers_loadbalancer_addresses", "gauge", "LoadBalancer addresses allocated, by IP pool, as the LoadBalancer controller's latest round saw them.");
        for (pool, n) in &self.lb_addresses {
            let _ = writeln!(out, "kube_controllers_loadbalancer_addresses{{pool=\"{}\"}} {n}", escape(pool));
        }
        header(&mut out, "kube_controllers_loadbalancer_assignment_failures_total", "counter", "LoadBalancer addresses not assigned, by reason (exhausted, in_use, not_in_pool, reserved, block_limit, a request that cannot be read, ...).");
        for (reason, n) in &self.lb_failures {
            let _ = writeln!(out, "kube_controllers_loadbalancer_assignment_failures_total{{reason=\"{reason}\"}} {n}");
        }
        header(&mut out, "kube_controllers_loadbalancer_writes_total", "counter", "Writes of the LoadBalancer controller, by op (assign, release, status) and outcome (ok, conflict, failed).");
        for ((op, outcome), n) in &self.lb_writes {
            let _ = writeln!(out, "kube_controllers_loadbalancer_writes_total{{op=\"{op}\",outcome=\"{outcome}\"}} {n}");
        }

        header(&mut out, "kube_controllers_node_deletions_total", "counter", "Deletes of the etcd-mode node deleter (a gone Kubernetes node's Calico Node and its objects), by kind and outcome (deleted, absent, failed).");
        for ((kind, outcome), n) in &self.node_deletions {
            let _ = writeln!(out, "kube_controllers_node_deletions_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}");
        }

        header(&mut out, "kube_controllers_policy_name_migrations_total", "counter", "Default-tier policies the policy-name migrator re-keyed from their pre-3.32 default.<name> names, by kind and outcome (migrated, already_migrated: the new name held the same policy, conflict: it held another, both kept, failed, unusable: no valid v3 name); conflict and unusable count once per policy and process.");
        for ((kind, outcome), n) in &self.policy_name_migrations {
            let _ = writeln!(out, "kube_controllers_policy_name_migrations_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}");
        }
        header(&mut out, "kube_controllers_policy_name_migrations_pending", "gauge", "Default-tier policies still under a pre-3.32 name with a re-keying to do, by kind, as the migrator's latest round found them (they wait for the calico-node rollout, or a write failed).");
        for (kind, n) in &self.policy_names_pending {
            let _ = writeln!(out, "kube_controllers_policy_name_migrations_pending{{kind=\"{kind}\"}} {n}");
        }

        header(&mut out, "ipam_gc_releases_total", "counter", "Addresses released by the GC, by reason.");
        for reason in crate::ipam::plan::LeakReason::ALL {
            let n = self.releases_total.get(reason.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "ipam_gc_releases_total{{reason=\"{}\"}} {n}", reason.as_str());
        }
        header(&mut out, "ipam_gc_conflicts_total", "counter", "Compare-and-swap conflicts met while executing plans.");
        let _ = writeln!(out, "ipam_gc_conflicts_total {}", self.conflicts_total);
        header(&mut out, "ipam_gc_write_errors_total", "counter", "Plan items given up for a pass, by error category.");
        for (category, n) in &self.write_errors_total {
            let _ = writeln!(out, "ipam_gc_write_errors_total{{category=\"{category}\"}} {n}");
        }

        header(&mut out, "ipam_gc_datastore_calls_total", "counter", "Datastore calls made by the plan executor (writes and re-validation reads), by outcome; each call runs under a timeout.");
        let calls = &self.executor_calls;
        for (outcome, n) in [("succeeded", calls.succeeded), ("failed", calls.failed), ("timed_out", calls.timed_out)] {
            let _ = writeln!(out, "ipam_gc_datastore_calls_total{{outcome=\"{outcome}\"}} {n}");
        }

        header(&mut out, "ipam_gc_items_backing_off", "gauge", "Plan items skipped until their per-item backoff after a transient failure ends, by item kind.");
        for (category, n) in &self.items_backing_off {
            let _ = writeln!(out, "ipam_gc_items_backing_off{{item=\"{category}\"}} {n}");
        }

        header(&mut out, "ipam_allocations_gc_reclamations", "counter", "Allocations released by the GC, by pool and node.");
        for ((pool, node), n) in &self.reclamations {
            let _ = writeln!(out, "ipam_allocations_gc_reclamations{{ippool=\"{}\",node=\"{}\"}} {n}", escape(pool), escape(node));
        }
        self.render_ipam(&mut out);

        // Memory, as operators compare it with upstream's `process_resident_memory_bytes`.
        if let Some(rss) = resident_bytes() {
            header(&mut out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
            let _ = writeln!(out, "process_resident_memory_bytes {rss}");
        }
        if let (Some(now), Some(peak)) = (crate::memstat::current_bytes(), crate::memstat::peak_bytes()) {
            header(&mut out, "kube_controllers_heap_bytes", "gauge", "Bytes allocated on the heap and not yet freed.");
            let _ = writeln!(out, "kube_controllers_heap_bytes {now}");
            header(&mut out, "kube_controllers_heap_peak_bytes", "gauge", "The most heap bytes allocated at once since start.");
            let _ = writeln!(out, "kube_controllers_heap_peak_bytes {peak}");
        }

        header(&mut out, "kube_controllers_leader", "gauge", "1 while this replica holds the leader Lease (the only one that writes), else 0.");
        let _ = writeln!(out, "kube_controllers_leader {}", u8::from(self.leader));

        header(&mut out, "kube_controllers_events_total", "counter", "Kubernetes Events about releases and held changes, by result (created, updated: a series repeat, failed, dropped: queue full).");
        for (result, n) in self.events.snapshot() {
            let _ = writeln!(out, "kube_controllers_events_total{{result=\"{result}\"}} {n}");
        }

        header(&mut out, "kube_controllers_api_requests_total", "counter", "Kubernetes API requests, by verb, resource and HTTP code (0: no answer).");
        for ((verb, resource, code), n) in api.snapshot() {
            let _ = writeln!(out, "kube_controllers_api_requests_total{{verb=\"{verb}\",resource=\"{resource}\",code=\"{code}\"}} {n}");
        }
        out
    }
}

/// Writes `name{ippool="…",node="…"} n` for every (pool, node) cell that has the series.
fn pool_node_series(out: &mut String, name: &str, g: &IpamGauges, cell: impl Fn(&NodeCells) -> Option<u64>) {
    for (pool, pg) in &g.pools {
        for (node, c) in &pg.nodes {
            if let Some(n) = cell(c) {
                let _ = writeln!(out, "{name}{{ippool=\"{}\",node=\"{}\"}} {n}", escape(pool), escape(node));
            }
        }
    }
}

fn node_series(out: &mut String, name: &str, g: &IpamGauges, cell: impl Fn(&LegacyCells) -> Option<u64>) {
    for (node, c) in &g.per_node {
        if let Some(n) = cell(c) {
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {n}", escape(node));
        }
    }
}

impl Metrics {
    fn render_ipam(&self, out: &mut String) {
        let g = &self.ipam;
        header(out, "ipam_allocations_in_use", "gauge", "IPs currently allocated in the pool, by the allocation's node.");
        pool_node_series(out, "ipam_allocations_in_use", g, |c| c.in_use);
        header(out, "ipam_allocations_borrowed", "gauge", "IPs allocated to a node from a block affine to another node (or to none).");
        pool_node_series(out, "ipam_allocations_borrowed", g, |c| c.borrowed);
        header(out, "ipam_blocks", "gauge", "IPAM blocks in the pool, by affine node.");
        pool_node_series(out, "ipam_blocks", g, |c| c.blocks);
        header(out, "ipam_allocations_gc_candidates", "gauge", "Allocations the GC holds as leak candidates or confirmed leaks.");
        pool_node_series(out, "ipam_allocations_gc_candidates", g, |c| c.gc_candidates);
        header(out, "ipam_ippool_size", "gauge", "Addresses in the pool's CIDR.");
        for (pool, pg) in &g.pools {
            if let Some(size) = pg.size {
                let _ = writeln!(out, "ipam_ippool_size{{ippool=\"{}\"}} {size}", escape(pool));
            }
        }
        header(out, "ipam_ippool_reserved", "gauge", "Addresses of the pool covered by IPReservations.");
        for (pool, pg) in &g.pools {
            if let Some(reserved) = pg.reserved {
                let _ = writeln!(out, "ipam_ippool_reserved{{ippool=\"{}\"}} {reserved}", escape(pool));
            }
        }
        header(out, "ipam_allocations_per_node", "gauge", "IPs allocated to the node, all pools (legacy).");
        node_series(out, "ipam_allocations_per_node", g, |c| c.allocations);
        header(out, "ipam_allocations_borrowed_per_node", "gauge", "IPs the node borrowed from other nodes' blocks, all pools (legacy).");
        node_series(out, "ipam_allocations_borrowed_per_node", g, |c| c.borrowed);
        header(out, "ipam_blocks_per_node", "gauge", "IPAM blocks affine to the node, all pools (legacy).");
        node_series(out, "ipam_blocks_per_node", g, |c| c.blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_rendered_with_inf() {
        let mut m = Metrics::default();
        m.pass_full.observe(0.002);
        m.pass_full.observe(3.0);
        m.releases_total.insert("pod-not-found", 2);
        let cell = NodeCells { in_use: Some(5), ..NodeCells::default() };
        let pool = crate::runtime::ipam_gauges::PoolGauges { nodes: vec![("n\"1".into(), cell)], ..Default::default() };
        m.ipam = std::sync::Arc::new(IpamGauges { pools: vec![("pool-a".into(), pool)], ..Default::default() });
        let text = m.render(&ApiCounters::default());
        assert!(text.contains("ipam_gc_pass_duration_seconds_bucket{scan=\"full\",le=\"0.0025\"} 1"), "{text}");
        assert!(text.contains("ipam_gc_pass_duration_seconds_bucket{scan=\"full\",le=\"5\"} 2"));
        assert!(text.contains("ipam_gc_pass_duration_seconds_bucket{scan=\"full\",le=\"+Inf\"} 2"));
        assert!(text.contains("ipam_gc_pass_duration_seconds_count{scan=\"dirty\"} 0"));
        assert!(text.contains("ipam_gc_releases_total{reason=\"pod-not-found\"} 2"));
        assert!(text.contains("ipam_gc_releases_total{reason=\"node-deleted\"} 0"));
        assert!(text.contains("ipam_allocations_in_use{ippool=\"pool-a\",node=\"n\\\"1\"} 5"));
        assert!(text.contains("kube_controllers_leader 0\n"));
        assert!(text.contains("kube_controllers_events_total{result=\"dropped\"} 0\n"), "{text}");
        m.events.created.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        assert!(m.clone().render(&ApiCounters::default()).contains("kube_controllers_events_total{result=\"created\"} 2\n"));
        m.leader = true;
        assert!(m.render(&ApiCounters::default()).contains("kube_controllers_leader 1\n"));
    }

    #[test]
    fn light_controller_rounds_and_conversion_errors_are_rendered_per_controller() {
        let mut m = Metrics::default();
        m.light_round("policy", std::time::Duration::from_millis(250));
        m.light_round("policy", std::time::Duration::from_millis(750));
        m.conversion_errors.insert(("policy", "rule_dropped"), 2);
        let text = m.render(&ApiCounters::default());
        for line in [
            "# TYPE kube_controllers_reconcile_seconds summary",
            "kube_controllers_reconcile_seconds_sum{controller=\"policy\"} 1",
            "kube_controllers_reconcile_seconds_count{controller=\"policy\"} 2",
            "kube_controllers_conversion_errors_total{controller=\"policy\",category=\"rule_dropped\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn policy_name_migrations_are_rendered_by_kind_and_outcome() {
        let mut m = Metrics::default();
        m.policy_name_migrations.insert(("networkpolicies", "migrated"), 3);
        m.policy_name_migrations.insert(("globalnetworkpolicies", "conflict"), 1);
        m.policy_names_pending.insert("stagednetworkpolicies", 2);
        let text = m.render(&ApiCounters::default());
        for line in [
            "# TYPE kube_controllers_policy_name_migrations_total counter",
            "kube_controllers_policy_name_migrations_total{kind=\"networkpolicies\",outcome=\"migrated\"} 3",
            "kube_controllers_policy_name_migrations_total{kind=\"globalnetworkpolicies\",outcome=\"conflict\"} 1",
            "# TYPE kube_controllers_policy_name_migrations_pending gauge",
            "kube_controllers_policy_name_migrations_pending{kind=\"stagednetworkpolicies\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn every_required_watch_has_an_unhealthy_gauge_and_held_rounds_are_counted() {
        let mut m = Metrics::default();
        let text = m.render(&ApiCounters::default());
        let gauges: Vec<&str> = text.lines().filter(|l| l.starts_with("ipam_gc_watch_unhealthy{")).collect();
        assert_eq!(gauges.len(), crate::runtime::watch::Source::ALL.len(), "{gauges:?}");
        assert!(gauges.iter().all(|l| l.ends_with(" 0")), "{gauges:?}");
        assert!(text.contains("ipam_gc_rounds_writes_held_total 0\n"));
        m.watch_unhealthy.insert("ipamblocks");
        m.rounds_writes_held = 3;
        let text = m.render(&ApiCounters::default());
        assert!(text.contains("ipam_gc_watch_unhealthy{resource=\"ipamblocks\"} 1\n"), "{text}");
        assert!(text.contains("ipam_gc_watch_unhealthy{resource=\"pods\"} 0\n"));
        assert!(text.contains("ipam_gc_rounds_writes_held_total 3\n"));
    }
}
