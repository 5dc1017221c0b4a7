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

#[derive(clap::Args, Debug)]
struct LeakScanArgs {
    /// Files or folders of Kubernetes objects (JSON or YAML, `List`s or single objects).
    #[arg(long = "from-dump", num_args = 1.., required = true)]
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
        None => Err(anyhow::anyhow!("the controller (`run`) is not part of this build yet; try `leak-scan` or `simulate`")),
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
    let mut contents = dump::read_paths_indexed(&a.from_dump, &mut progress).context("reading the dump")?;
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
