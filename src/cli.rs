//! Argument parsing and dispatch only, under upstream's program names too (`kube-controllers`,
//! `check-status`, `calico component kube-controllers`, `calico health`). Exit codes: 0 success,
//! 1 "found something" (leaks to release, not ready), 2 the command could not run (bad flags,
//! bad configuration, a datastore that could not be initialized).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use calico_kube_controllers::config::{EnvConfig, LogLevel};
use calico_kube_controllers::health::StatusFile;
use calico_kube_controllers::runtime::{self, LogControl};
use calico_kube_controllers::scan::{dump, report};

#[derive(Parser, Debug)]
#[command(name = "calico-kube-controllers", version, about = "A faster, leaner Calico kube-controllers with a bitmap IPAM garbage collector")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default when no subcommand is given).
    Run(RunArgs),
    /// Report leaked IP allocations from a `kubectl get -o json|yaml` dump (read-only).
    LeakScan(LeakScanArgs),
    /// Build a synthetic cluster in memory and run the whole GC pipeline over it.
    Simulate(SimulateArgs),
    /// Upstream's probe: exit 0 and print `Ready` when the status file says so, else exit 1.
    CheckStatus(CheckStatusArgs),
    /// Upstream's unified `calico` binary: `component kube-controllers` runs the controller.
    Component {
        #[command(subcommand)]
        component: Component,
    },
    /// Upstream's `calico health`: GET 127.0.0.1:<port>/<type>; exit 0 on 2xx, else 1.
    Health(HealthArgs),
    /// Print the Calico objects the etcd-mode controllers write for Kubernetes NetworkPolicies,
    /// Namespaces, ServiceAccounts and Pods (read-only). Exit 0 when everything converted, 1 when
    /// some rule was dropped, 2 for unreadable input.
    Convert(ConvertArgs),
}

#[derive(clap::Args, Debug)]
struct ConvertArgs {
    /// Files or folders of Kubernetes objects (JSON or YAML, `List`s or single objects, as
    /// `kubectl get -o json|yaml` writes them); `-` reads standard input.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    paths: Vec<PathBuf>,
    #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
    output: ConvertOutput,
    /// What becomes of a NetworkPolicy rule that cannot be converted: `drop-rule` drops that rule
    /// alone (the traffic it allowed is denied) and writes the rest; `upstream` does as upstream
    /// does (some errors skip the whole policy, an unparsable CIDR allows everything).
    #[arg(long = "bad-rules", value_enum, default_value = "drop-rule")]
    bad_rules: BadRulesArg,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum ConvertOutput {
    Yaml,
    Json,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum BadRulesArg {
    DropRule,
    Upstream,
}

#[derive(Subcommand, Debug)]
enum Component {
    /// Run the controller, as `calico component kube-controllers`.
    KubeControllers(ComponentArgs),
}

#[derive(clap::Args, Debug)]
struct ComponentArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    probe: Option<ComponentProbe>,
}

#[derive(Subcommand, Debug)]
enum ComponentProbe {
    /// The probe upstream's chart runs (`... kube-controllers kube-controllers-health -l|-r`),
    /// which upstream itself lacks (SPEC §10.4): the same as `check-status`.
    KubeControllersHealth(CheckStatusArgs),
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq, Default)]
enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(clap::Args, Debug, Default)]
struct RunArgs {
    /// Compute and report plans (metrics, /leak-report) but write nothing.
    #[arg(long = "dry-run", env = "CKC_DRY_RUN")]
    dry_run: bool,
    /// Override the KubeControllersConfiguration's leakGracePeriod (Go duration, e.g. `2s`).
    #[arg(long = "leak-grace-period")]
    leak_grace_period: Option<String>,
    /// Port for /metrics (and the other endpoints); 0 disables. Default: the
    /// KubeControllersConfiguration's prometheusMetricsPort (9094 when unset), applied live.
    #[arg(long = "metrics-port")]
    metrics_port: Option<u16>,
    /// Port for /liveness and /readiness (and the other endpoints); 0 disables.
    #[arg(long = "health-port", default_value_t = 0)]
    health_port: u16,
    /// How long the leader's Lease stays valid without renewal (Go duration) [default: 10s].
    #[arg(long = "leader-election-lease-duration", env = "CKC_LEADER_ELECTION_LEASE_DURATION")]
    leader_election_lease_duration: Option<String>,
    /// A leader that could not renew for this long stops writing; below the lease duration
    /// [default: 7s].
    #[arg(long = "leader-election-renew-deadline", env = "CKC_LEADER_ELECTION_RENEW_DEADLINE")]
    leader_election_renew_deadline: Option<String>,
    /// How often the leader renews and a standby checks the Lease; below the renew deadline
    /// [default: 2s].
    #[arg(long = "leader-election-retry-period", env = "CKC_LEADER_ELECTION_RETRY_PERIOD")]
    leader_election_retry_period: Option<String>,
    /// Requests per second of the writer (never the watches); <= 0: unlimited.
    #[arg(long = "client-qps", env = "K8S_CLIENT_QPS", default_value_t = calico_kube_controllers::datastore::rate::DEFAULT_QPS)]
    client_qps: f32,
    #[arg(long = "client-burst", env = "K8S_CLIENT_BURST", default_value_t = calico_kube_controllers::datastore::rate::DEFAULT_BURST)]
    client_burst: u32,
    /// Calico API group to use; only `crd.projectcalico.org/v1` is supported.
    #[arg(long = "calico-api-group", env = "CALICO_API_GROUP")]
    calico_api_group: Option<String>,
    /// Also write the leak report (the `/leak-report` JSON) to this file after each full pass.
    #[arg(long = "leak-report-file", env = "CKC_LEAK_REPORT_FILE")]
    leak_report_file: Option<PathBuf>,
    /// Where the status file for `check-status` is written (upstream's default).
    #[arg(long = "status-file", default_value = runtime::DEFAULT_STATUS_FILE)]
    status_file: PathBuf,
    /// Log format.
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value = "text", ignore_case = true)]
    log_format: LogFormat,
}

#[derive(clap::Args, Debug)]
#[command(disable_version_flag = true)]
struct CheckStatusArgs {
    /// The status file to read.
    #[arg(short = 'f', long = "file", default_value = runtime::DEFAULT_STATUS_FILE)]
    file: PathBuf,
    /// Check readiness.
    #[arg(short = 'r', long = "ready")]
    ready: bool,
    /// Check liveness (its own conditions; upstream's files have none, then it is -r).
    #[arg(short = 'l', long = "live")]
    live: bool,
    /// Print the version.
    #[arg(short = 'v', long = "version")]
    version: bool,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum ProbeType {
    Readiness,
    Liveness,
}

#[derive(clap::Args, Debug)]
struct HealthArgs {
    /// The controller's --health-port.
    #[arg(long)]
    port: u16,
    #[arg(long = "type", value_enum, default_value = "readiness")]
    probe: ProbeType,
}

#[derive(clap::Args, Debug)]
struct LeakScanArgs {
    /// Files or folders of Kubernetes objects (JSON or YAML, `List`s or single objects).
    /// Without it, the cluster of KUBECONFIG (or the in-cluster account) is listed, read-only.
    #[arg(long = "from-dump", num_args = 1..)]
    from_dump: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// Judge nodes that live pods run on but the dump's Nodes lack as live, however many.
    #[arg(long = "allow-partial-nodes")]
    allow_partial_nodes: bool,
    /// Refuse (exit 2) when more than this percentage of the nodes live pods run on are missing
    /// from the dump's Nodes.
    #[arg(long = "missing-nodes-percent", default_value_t = report::DEFAULT_MISSING_NODES_PERCENT)]
    missing_nodes_percent: f64,
    /// The report's `version` (calicoctl's `calicoctl version` Client Version). Default: the
    /// cluster's `calicoVersion` from ClusterInformation.
    #[arg(long = "calicoctl-version")]
    calicoctl_version: Option<String>,
    /// Write a complete dump of the live cluster into this folder instead of scanning: IPAM
    /// first, then Nodes, Namespaces, Pods, Services, each a List with its resourceVersion.
    #[arg(long = "save-dump", conflicts_with = "from_dump")]
    save_dump: Option<PathBuf>,
    /// Also write the report (in --output's format) to this file, atomically: a reader never
    /// sees half of one (the CronJob's volume).
    #[arg(long = "report-file")]
    report_file: Option<PathBuf>,
    /// Also keep the report in this ConfigMap (NAMESPACE/NAME), created or replaced by
    /// server-side apply: key `leaks.json` (or `leaks.txt` for --output table), annotated with
    /// the scan's time and its count of releasable leaks.
    #[arg(long = "report-configmap", value_parser = parse_configmap_ref)]
    report_configmap: Option<(String, String)>,
    /// The exit code when releasable leaks were found. A scheduled scan sets 0: finding leaks is
    /// its result, kept in the report, not a failure of the Job.
    #[arg(long = "leaks-exit-code", default_value_t = 1)]
    leaks_exit_code: u8,
}

/// The largest report a ConfigMap is given: the API server refuses objects over 1 MiB, and the
/// metadata needs some room.
const CONFIGMAP_REPORT_LIMIT: usize = 1_000_000;

fn parse_configmap_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns.to_string(), name.to_string())),
        _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
    }
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long = "pods-per-node", default_value_t = 30)]
    pods_per_node: usize,
    #[arg(long = "leak-fraction", default_value_t = 0.02)]
    leak_fraction: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// Also write the cluster as a leak-scan input dump into this folder.
    #[arg(long = "write-dump")]
    write_dump: Option<PathBuf>,
    /// Timed repetitions per stage; the report gives medians.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Timed dirty passes of 10 nodes; the report gives their median and p99.
    #[arg(long = "dirty-samples", default_value_t = calico_kube_controllers::sim::DEFAULT_DIRTY_SAMPLES)]
    dirty_samples: usize,
    /// A previous run's `--output json` report: its figures are printed beside this run's.
    #[arg(long)]
    compare: Option<PathBuf>,
}

/// The arguments as clap should see them: upstream's images call this program by other names,
/// so `kube-controllers` means `run` and `check-status` means `check-status`. (As `calico`, the
/// subcommands `component kube-controllers` and `health` already match ours.)
fn effective_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut args = args;
    let invoked_as = args.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_string_lossy().into_owned()).unwrap_or_default();
    let implied = match invoked_as.as_str() {
        "kube-controllers" => Some("run"),
        "check-status" => Some("check-status"),
        _ => None,
    };
    if let Some(sub) = implied {
        args.insert(1.min(args.len()), sub.into());
    }
    args
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse_from(effective_args(std::env::args_os().collect())) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let result = match cli.command {
        Some(Command::LeakScan(a)) => leak_scan(a),
        Some(Command::Simulate(a)) => simulate(a),
        Some(Command::Run(a)) => run_controller(a),
        Some(Command::CheckStatus(a)) => Ok(check_status(&a)),
        Some(Command::Component { component: Component::KubeControllers(a) }) => match a.probe {
            Some(ComponentProbe::KubeControllersHealth(c)) => Ok(check_status(&c)),
            None => run_controller(a.run),
        },
        Some(Command::Health(a)) => Ok(health_probe(&a)),
        Some(Command::Convert(a)) => convert(a),
        // Parsed again as `run` so its defaults and environment (LOG_FORMAT, CKC_DRY_RUN) apply.
        None => match Cli::try_parse_from(["calico-kube-controllers", "run"]) {
            Ok(Cli { command: Some(Command::Run(a)) }) => run_controller(a),
            Ok(_) => unreachable!("`run` parses as Run"),
            Err(e) => {
                let _ = e.print();
                return 2;
            }
        },
    };
    match result {
        Ok(code) => code,
        // A reader that stopped early (`| head`) is not a failure of the scan.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

/// Upstream's `check-status`: prints `Ready` and returns 0, or prints the reasons and returns 1.
fn check_status(a: &CheckStatusArgs) -> i32 {
    if a.version {
        println!("{}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    if !a.ready && !a.live {
        println!("No command specified to check-status");
        return 1;
    }
    let file = match std::fs::read(&a.file)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice::<StatusFile>(&bytes).map_err(|e| e.to_string()))
    {
        Ok(f) => f,
        Err(e) => {
            println!("Failed to read status file {}: {e}", a.file.display());
            return 1;
        }
    };
    let verdict = if a.ready { file.ready() } else { Ok(()) }.and(if a.live { file.live() } else { Ok(()) });
    match verdict {
        Ok(()) => {
            println!("Ready");
            0
        }
        Err(reasons) => {
            println!("{reasons}");
            1
        }
    }
}

/// Upstream's `calico health`: one GET to the local health listener.
fn health_probe(a: &HealthArgs) -> i32 {
    use std::io::Read;
    // The kubelet's probe timeout in upstream's manifests; a slower answer is a failure anyway.
    const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
    let path = match a.probe {
        ProbeType::Readiness => "/readiness",
        ProbeType::Liveness => "/liveness",
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], a.port));
    let answer = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
        s.set_read_timeout(Some(PROBE_TIMEOUT))?;
        s.set_write_timeout(Some(PROBE_TIMEOUT))?;
        // One write: a server that answers after a partial request would reset the connection.
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })();
    match answer {
        Ok(text) => {
            let code: u16 = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
            println!("{path}: {code} {body}");
            if (200..300).contains(&code) { 0 } else { 1 }
        }
        Err(e) => {
            println!("{path} on {addr}: {e}");
            1
        }
    }
}


fn leak_scan(a: LeakScanArgs) -> anyhow::Result<i32> {
    if let Some(dir) = &a.save_dump {
        return save_dump(dir);
    }
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = Instant::now();
    let mut progress = |done: u64, total: u64| {
        // Progress only on a terminal, only for scans that take over a second.
        if tty && started.elapsed().as_secs_f64() > 1.0 && last.elapsed().as_millis() > 200 {
            last = Instant::now();
            eprint!("\rreading dump: {} / {} MB", done >> 20, total >> 20);
        }
    };
    let mut contents = if a.from_dump.is_empty() {
        read_live_cluster(tty, started)?
    } else {
        dump::read_paths_indexed(&a.from_dump, &mut progress).context("reading the dump")?
    };
    if tty && started.elapsed().as_secs_f64() > 1.0 {
        eprintln!();
    }
    let opts = report::ScanOptions {
        allow_partial_nodes: a.allow_partial_nodes,
        missing_nodes_percent: a.missing_nodes_percent,
        calicoctl_version: a.calicoctl_version.clone(),
    };
    let r = report::scan_dump(&mut contents, calico_kube_controllers::runtime::ipam_gc::clock::now_millis(), &opts)?;
    if let Some(order) = &r.dump_order
        && order.state != calico_kube_controllers::scan::order::OrderState::Safe
    {
        eprintln!("leak-scan: dump order {}: {}", serde_json::to_string(&order.state).unwrap_or_default().trim_matches('"'), order.detail);
    }
    // Rendered once, then written wherever asked (pretty JSON is many short lines: one buffer).
    let mut rendered = Vec::with_capacity(1 << 16);
    match a.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut rendered, &r)?;
            writeln!(rendered)?;
        }
        Output::Table => report::write_table(&r, &mut rendered)?,
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&rendered)?;
    out.flush()?;
    let leaks = r.releasable_leaks();
    if let Some(path) = &a.report_file {
        runtime::status::write_atomically(path, &rendered).with_context(|| format!("writing the report to {}", path.display()))?;
        eprintln!("leak-scan: report written to {} ({leaks} releasable leaks)", path.display());
    }
    if let Some((ns, name)) = &a.report_configmap {
        let key = if a.output == Output::Json { "leaks.json" } else { "leaks.txt" };
        store_report_configmap(ns, name, key, &rendered, leaks)?;
        eprintln!("leak-scan: report kept in ConfigMap {ns}/{name}, key {key} ({leaks} releasable leaks)");
    }
    Ok(if leaks > 0 { i32::from(a.leaks_exit_code) } else { 0 })
}

/// Creates or replaces ConfigMap `ns/name` holding the report under `key`, by server-side apply
/// (one PATCH: the right to patch that one ConfigMap is all it needs).
fn store_report_configmap(ns: &str, name: &str, key: &str, report: &[u8], leaks: u64) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams};
    anyhow::ensure!(
        report.len() <= CONFIGMAP_REPORT_LIMIT,
        "the report is {} bytes, over what a ConfigMap holds ({CONFIGMAP_REPORT_LIMIT}): keep it in a file (--report-file on a volume) instead",
        report.len()
    );
    let text = String::from_utf8_lossy(report);
    let scanned_at = calico_kube_controllers::model::time::format_rfc3339(calico_kube_controllers::runtime::ipam_gc::clock::now_millis());
    let object = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app.kubernetes.io/name": "calico-kube-controllers", "app.kubernetes.io/component": "leak-report"},
            "annotations": {
                "projectcalico.org/leak-scan-time": scanned_at,
                "projectcalico.org/releasable-leaks": leaks.to_string(),
            },
        },
        "data": {key: text},
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async {
        let client = kube::Client::try_default().await.context("building a Kubernetes client (KUBECONFIG or in-cluster)")?;
        let api: Api<ConfigMap> = Api::namespaced(client, ns);
        api.patch(name, &PatchParams::apply("calico-kube-controllers-leak-scan").force(), &Patch::Apply(&object))
            .await
            .with_context(|| format!("writing the report to ConfigMap {ns}/{name}"))?;
        anyhow::Ok(())
    })
}

/// LIST pages of the cluster of KUBECONFIG (or in-cluster), as they come.
struct KubePages(kube::Client);

impl calico_kube_controllers::scan::save::PageReader for KubePages {
    fn page(&self, path: &str, limit: u32, token: Option<&str>) -> impl std::future::Future<Output = Result<serde_json::Value, calico_kube_controllers::scan::save::ListFailure>> + Send {
        use calico_kube_controllers::scan::save::ListFailure;
        let mut uri = format!("{path}?limit={limit}");
        if let Some(t) = token {
            uri.push_str("&continue=");
            uri.push_str(&percent_encode(t));
        }
        let client = self.0.clone();
        async move {
            let request = http::Request::get(uri).body(Vec::new()).map_err(|e| ListFailure { status: 0, message: e.to_string() })?;
            client.request::<serde_json::Value>(request).await.map_err(|e| ListFailure {
                status: calico_kube_controllers::datastore::kube::status_code(&e),
                message: e.to_string(),
            })
        }
    }
}

/// A query value: everything but unreserved characters escaped (continue tokens are base64).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn save_dump(dir: &Path) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let saved = rt.block_on(async {
        let client = kube::Client::try_default().await.context("building a Kubernetes client (KUBECONFIG or in-cluster)")?;
        calico_kube_controllers::scan::save::save_dump(&KubePages(client), dir).await.context("saving the dump")
    })?;
    for p in &saved {
        eprintln!("{}: {} {} (resourceVersion {})", p.file.display(), p.items, p.kind, p.resource_version);
    }
    eprintln!("leak-scan: dump saved; scan it with: leak-scan --from-dump {}", dir.display());
    Ok(0)
}

/// One paged, read-only list per kind from the cluster of KUBECONFIG (or in-cluster).
/// The etcd settings of the environment (`DATASTORE_TYPE=etcdv3`, `ETCD_*`, each also
/// `CALICO_`-prefixed), if it names the etcd datastore; the controller's other variables are
/// not leak-scan's business and are not read.
fn etcd_from_env() -> anyhow::Result<Option<calico_kube_controllers::config::EtcdConfig>> {
    let vars: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            let k = k.strip_prefix("CALICO_").unwrap_or(k);
            k == "DATASTORE_TYPE" || k.starts_with("ETCD_")
        })
        .collect();
    Ok(EnvConfig::from_env(&vars).context("etcd datastore settings")?.etcd)
}

fn read_live_cluster(tty: bool, started: Instant) -> anyhow::Result<dump::DumpContents> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async {
        let client = kube::Client::try_default().await.context("building a Kubernetes client (KUBECONFIG or in-cluster)")?;
        let mut progress = |resource: &str, n: u64| {
            if tty && started.elapsed().as_secs_f64() > 1.0 {
                eprint!("\rlisting {resource}: {n}          ");
            }
        };
        // Read-only and unlimited, as a one-off scan: no writer shares the client.
        use calico_kube_controllers::datastore::{kube as kdd, kube_cluster};
        let counters = std::sync::Arc::new(kdd::ApiCounters::default());
        let cluster = kube_cluster::KubeCluster::new(client.clone(), counters.clone(), kdd::RequestLimiter::default());
        match etcd_from_env()? {
            // Calico's IPAM from etcd, pods and nodes from Kubernetes; writes are off.
            Some(cfg) => {
                let ds = calico_kube_controllers::datastore::etcd::EtcdDatastore::new(&cfg).map_err(|e| anyhow::anyhow!("etcd datastore: {}", e.message))?.with_dry_run(true);
                calico_kube_controllers::scan::live::read_cluster(&ds, &cluster, &mut progress).await.context("reading the cluster (Calico IPAM from etcd)")
            }
            None => {
                let ds = kdd::KubeDatastore::new(client, true, counters);
                calico_kube_controllers::scan::live::read_cluster(&ds, &cluster, &mut progress).await.context("reading the cluster")
            }
        }
    })
}

fn convert(a: ConvertArgs) -> anyhow::Result<i32> {
    use calico_kube_controllers::scan::objects;
    let (stdin, files): (Vec<PathBuf>, Vec<PathBuf>) = a.paths.into_iter().partition(|p| p.as_os_str() == "-");
    let mut read = if files.is_empty() { objects::Objects::default() } else { objects::read_objects(&files)? };
    if !stdin.is_empty() {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes).context("reading standard input")?;
        objects::read_bytes_into(Path::new("<stdin>"), &bytes, &mut read)?;
    }
    let mode = match a.bad_rules {
        BadRulesArg::DropRule => calico_kube_controllers::policy::BadRules::DropRule,
        BadRulesArg::Upstream => calico_kube_controllers::policy::BadRules::Upstream,
    };
    // Converted as it is written: one output object at a time is held.
    let list = calico_kube_controllers::convert::Streamed::new(&read.objects, mode);
    let mut stdout = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    match a.output {
        ConvertOutput::Json => serde_json::to_writer_pretty(&mut stdout, &list)?,
        ConvertOutput::Yaml => serde_saphyr::to_io_writer(&mut stdout, &list).map_err(|e| anyhow::anyhow!("writing YAML: {e}"))?,
    }
    if a.output == ConvertOutput::Json {
        writeln!(stdout)?;
    }
    stdout.flush()?;
    drop(stdout);
    let mut out = list.outcome();
    for (file, what) in read.unreadable {
        out.malformed.push(format!("{file}: {what}"));
    }
    for line in out.dropped.iter().chain(&out.skipped).chain(&out.malformed) {
        eprintln!("convert: {line}");
    }
    if !out.ignored.is_empty() {
        let kinds: Vec<String> = out.ignored.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        eprintln!("convert: not converted (not a kind convert reads): {}", kinds.join(", "));
    }
    Ok(out.exit_code())
}

fn simulate(a: SimulateArgs) -> anyhow::Result<i32> {
    use calico_kube_controllers::sim;
    let compare = match &a.compare {
        Some(path) => {
            let text = std::fs::read(path).with_context(|| format!("simulate: reading --compare {}", path.display()))?;
            let value: serde_json::Value =
                serde_json::from_slice(&text).with_context(|| format!("simulate: --compare {} is not a JSON report (write one with --output json)", path.display()))?;
            Some(value)
        }
        None => None,
    };
    let opts = sim::SimOptions {
        nodes: a.nodes,
        pods_per_node: a.pods_per_node,
        leak_fraction: a.leak_fraction,
        seed: a.seed,
        output: if a.output == Output::Json { sim::OutputFormat::Json } else { sim::OutputFormat::Table },
        write_dump: a.write_dump,
        repeats: a.repeats,
        dirty_samples: a.dirty_samples,
        compare,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let summary = sim::run(&opts, &mut out)?;
    out.flush()?;
    if !summary.ok {
        eprintln!("simulate: the independent checker found a mismatch (see report)");
        return Ok(1);
    }
    Ok(0)
}

/// The three leader election durations, defaulted and checked against each other.
fn election_timing(a: &RunArgs) -> anyhow::Result<calico_kube_controllers::runtime::Timing> {
    use calico_kube_controllers::model::time::parse_go_duration;
    use calico_kube_controllers::runtime::leader;
    let parse = |flag: &str, text: &Option<String>, default| match text {
        Some(t) => parse_go_duration(t).with_context(|| format!("--{flag} {t:?} is not a Go duration")),
        None => Ok(default),
    };
    let lease = parse("leader-election-lease-duration", &a.leader_election_lease_duration, leader::DEFAULT_LEASE_DURATION)?;
    let renew = parse("leader-election-renew-deadline", &a.leader_election_renew_deadline, leader::DEFAULT_RENEW_DEADLINE)?;
    let retry = parse("leader-election-retry-period", &a.leader_election_retry_period, leader::DEFAULT_RETRY_PERIOD)?;
    Ok(leader::Timing::new(lease, renew, retry)?)
}

/// The subscriber, with the level reloadable so a KubeControllersConfiguration change applies live.
fn init_logging(format: LogFormat, level: LogLevel) -> LogControl {
    use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, reload, util::SubscriberInitExt};
    let (filter, handle) = reload::Layer::new(EnvFilter::new(level.filter_directive()));
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let _ = tracing_subscriber::registry().with(filter).with(output).try_init();
    LogControl::new(move |level: LogLevel| {
        let _ = handle.reload(EnvFilter::new(level.filter_directive()));
    })
}

/// The client configuration (KUBECONFIG, CALICO_KUBECONFIG, else in-cluster from
/// KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount's files), trusting `CA_CRT_PATH` too.
async fn kube_config(env: &EnvConfig) -> anyhow::Result<kube::Config> {
    let mut config = kube_config_source(env).await?;
    if let Some(ca) = &env.ca_crt_path {
        let bundle = runtime::tls::read_certificates(ca)?;
        // Added to the kubeconfig's or the ServiceAccount's CA, which still count.
        config.root_cert.get_or_insert_with(Vec::new).extend(bundle.into_iter().map(|c| c.to_vec()));
    }
    Ok(config)
}

async fn kube_config_source(env: &EnvConfig) -> anyhow::Result<kube::Config> {
    // libcalico also reads CALICO_KUBECONFIG; kube's own default only knows KUBECONFIG.
    let plain = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty());
    match (&env.kubeconfig, plain) {
        (Some(path), false) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {path}"))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {path}"))?;
            Ok(config)
        }
        // KUBECONFIG if set, else the in-cluster service account.
        _ => kube::Config::infer().await.context("building a Kubernetes client configuration"),
    }
}

fn run_controller(a: RunArgs) -> anyhow::Result<i32> {
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    let env = EnvConfig::from_env(&vars).context("configuration from the environment")?;
    let log = init_logging(a.log_format, env.log_level.unwrap_or(LogLevel::Info));
    if env.datastore_defaulted {
        tracing::info!("DATASTORE_TYPE unset (upstream's default is etcdv3): using the Kubernetes datastore");
    }
    // Files are read now (a missing or unreadable certificate is a clear error naming its
    // setting); etcd itself is only contacted once running, where failures show in readiness.
    let etcd = match &env.etcd {
        Some(cfg) => {
            let ds = calico_kube_controllers::datastore::etcd::EtcdDatastore::new(cfg).map_err(|e| anyhow::anyhow!("etcd datastore: {}", e.message))?;
            tracing::info!(endpoints = %cfg.endpoints_setting.value, "Calico datastore: etcd v3 (pods, nodes and leader election stay in Kubernetes)");
            tracing::info!("etcd datastore: a node missing from the Kubernetes Node cache is proven gone only through its Calico Node's k8s orchRef");
            Some(ds)
        }
        None => None,
    };
    let leak_grace_override = match &a.leak_grace_period {
        Some(text) => Some(
            calico_kube_controllers::model::time::parse_go_duration(text)
                .with_context(|| format!("--leak-grace-period {text:?} is not a Go duration"))?,
        ),
        None => None,
    };
    let timing = election_timing(&a)?;
    let identity = runtime::leader::identity_from_env();
    let user_agent = runtime::leader::user_agent(&identity);
    let election = runtime::ElectionOptions { identity, namespace: runtime::leader::namespace_from_env(), timing };
    let opts = runtime::RunOptions {
        controller: runtime::ControllerOptions { dry_run: a.dry_run, leak_grace_override, env: env.clone(), report_file: a.leak_report_file.clone() },
        metrics_port: a.metrics_port,
        health_port: a.health_port,
        election,
        client_qps: a.client_qps,
        client_burst: a.client_burst,
        api_group: a.calico_api_group.clone(),
        status_file: Some(a.status_file),
        log,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let mut config = kube_config(&env).await?;
        // The replica's name in the user agent tells replicas apart in the API server's audit log.
        config.headers.push(("user-agent".parse().context("user-agent header name")?, user_agent.parse().context("user-agent header")?));
        let client = kube::Client::try_from(config).context("building a Kubernetes client")?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        if let Some(ds) = &etcd
            && let Err(e) = ds.probe().await
        {
            // Not fatal: the health loop keeps reporting it until etcd answers.
            tracing::error!(error = %e.message, "etcd datastore not reachable yet");
        }
        if let Err(e) = runtime::run_with(client, etcd, opts, stop).await {
            eprintln!("calico-kube-controllers: {e}");
            return anyhow::Ok(e.exit_code());
        }
        anyhow::Ok(0)
    })
}
