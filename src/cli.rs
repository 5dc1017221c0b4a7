//! Argument parsing and dispatch only. Exit codes: 0 success, 1 "found something" (leaks to
//! release, not ready), 2 the command could not run.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

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
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
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
    /// Port for /metrics (and the other endpoints); 0 disables.
    #[arg(long = "metrics-port", default_value_t = 9094)]
    metrics_port: u16,
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
}

#[derive(clap::Args, Debug)]
struct LeakScanArgs {
    /// Files or folders of Kubernetes objects (JSON or YAML, `List`s or single objects).
    /// Without it, the cluster of KUBECONFIG (or the in-cluster account) is listed, read-only.
    #[arg(long = "from-dump", num_args = 1..)]
    from_dump: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
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
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
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
        // No subcommand (the upstream image's entry point): `run` with its defaults and env.
        None => <RunArgs as clap::FromArgMatches>::from_arg_matches(
            &<RunArgs as clap::Args>::augment_args(clap::Command::new("run")).get_matches_from(["run"]),
        )
        .map_err(anyhow::Error::from)
        .and_then(run_controller),
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

pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn leak_scan(a: LeakScanArgs) -> anyhow::Result<i32> {
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
    let r = report::scan_dump(&mut contents, now_millis())?;
    // Pretty JSON is many short lines: buffer them instead of a write per line.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    match a.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, &r)?;
            writeln!(out)?;
        }
        Output::Table => report::write_table(&r, &mut out)?,
    }
    out.flush()?;
    Ok(if r.releasable_leaks() > 0 { 1 } else { 0 })
}

/// One paged, read-only list per kind from the cluster of KUBECONFIG (or in-cluster).
fn read_live_cluster(tty: bool, started: Instant) -> anyhow::Result<dump::DumpContents> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async {
        let client = kube::Client::try_default().await.context("building a Kubernetes client (KUBECONFIG or in-cluster)")?;
        let mut progress = |resource: &str, n: u64| {
            if tty && started.elapsed().as_secs_f64() > 1.0 {
                eprint!("\rlisting {resource}: {n}          ");
            }
        };
        calico_kube_controllers::scan::live::read_cluster(&client, &mut progress).await.context("reading the cluster")
    })
}

fn simulate(a: SimulateArgs) -> anyhow::Result<i32> {
    use calico_kube_controllers::sim;
    let opts = sim::SimOptions {
        nodes: a.nodes,
        pods_per_node: a.pods_per_node,
        leak_fraction: a.leak_fraction,
        seed: a.seed,
        output: if a.output == Output::Json { sim::OutputFormat::Json } else { sim::OutputFormat::Table },
        write_dump: a.write_dump,
        repeats: a.repeats,
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

fn run_controller(a: RunArgs) -> anyhow::Result<i32> {
    use calico_kube_controllers::runtime;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new("info"))
        .context("log filter")?;
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).try_init();
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
        controller: runtime::ControllerOptions { dry_run: a.dry_run, leak_grace_override },
        metrics_port: a.metrics_port,
        health_port: a.health_port,
        election,
        client_qps: a.client_qps,
        client_burst: a.client_burst,
        api_group: a.calico_api_group.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        // KUBECONFIG if set, else the in-cluster service account.
        let mut config = kube::Config::infer().await.context("building a Kubernetes client")?;
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
        if let Err(e) = runtime::run(client, opts, stop).await {
            eprintln!("calico-kube-controllers: {e}");
            return anyhow::Ok(e.exit_code());
        }
        anyhow::Ok(0)
    })
}
