//! The benchmark runner: real nodes on loopback, every scenario next to a
//! baseline measured in the same run. Writes a JSON report and the tables of
//! `benches/RESULTS.md`. `bash scripts/bench.sh` builds and runs it
//! (installing PostgreSQL for the baseline when missing); `--help` lists
//! the knobs.
//!
//! cargo bench --profile release -p tiersync-benches --bench runner -- [OPTIONS]

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tiersync_benches::report::{self, Machine, Report};
use tiersync_benches::scenarios::{self, Options};
use tiersync_benches::{aggregate, pg, raw};

/// tiersync's end-to-end benchmark runner.
#[derive(Debug, Parser)]
#[command(name = "runner")]
struct Args {
    /// Backlog sizes (items) of the node scenarios, smallest first; the
    /// memory check compares the first and the last.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    sizes: Vec<u64>,
    /// Items per NDJSON request and per raw WriteBatch.
    #[arg(long, default_value_t = 1000)]
    chunk: usize,
    /// Concurrent bulk clients at the city.
    #[arg(long, default_value_t = 2)]
    ingest_clients: usize,
    /// Single writes of the convergence-latency scenario.
    #[arg(long, default_value_t = 2000)]
    latency_writes: usize,
    /// Their rate (writes per second).
    #[arg(long, default_value_t = 100.0)]
    latency_rate: f64,
    /// Billing items of the aggregate-query scenario (0 skips it).
    #[arg(long, default_value_t = 10_000_000)]
    agg_items: u64,
    /// Queries at each aggregate checkpoint.
    #[arg(long, default_value_t = 2000)]
    agg_queries: usize,
    /// Skip the PostgreSQL baseline.
    #[arg(long)]
    no_pg: bool,
    /// Where to write `results.json` and splice `RESULTS.md` (default: the
    /// repository's `benches/`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cargo passes `--bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(!args.sizes.is_empty(), "--sizes: give at least one size");
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    let options = Options {
        chunk: args.chunk,
        ingest_clients: args.ingest_clients,
        latency_writes: args.latency_writes,
        latency_rate: args.latency_rate,
    };
    let command: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut r = Report {
        machine: Machine::here(),
        command: format!("bash scripts/bench.sh {}", command.join(" "))
            .trim()
            .to_string(),
        options: options.clone(),
        raw: Vec::new(),
        sizes: Vec::new(),
        aggregate: Vec::new(),
        postgres: None,
        postgres_skipped: None,
        targets: Vec::new(),
    };
    for (i, &n) in sizes.iter().enumerate() {
        eprintln!("runner: N = {n}: raw RocksDB ceiling");
        r.raw.push(raw::run(n, args.chunk)?);
        eprintln!("runner: N = {n}: ingest, backlog replication, convergence, catch-up");
        r.sizes
            .push(scenarios::run_size(n, &options, i == 0).with_context(|| format!("N = {n}"))?);
    }
    if args.agg_items > 0 {
        eprintln!("runner: aggregate queries up to {} items", args.agg_items);
        r.aggregate = aggregate::run(args.agg_items, args.agg_queries)?;
    }
    let largest = sizes.last().copied().unwrap_or(0);
    if args.no_pg {
        r.postgres_skipped = Some("--no-pg".into());
    } else {
        eprintln!("runner: PostgreSQL logical replication of {largest} rows");
        r.postgres = Some(pg::run(largest, args.chunk)?);
    }
    r.targets = report::targets(&r);

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| tiersync_benches::repo_root().join("benches"));
    std::fs::create_dir_all(&out)?;
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&r)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out.join("RESULTS.md");
    let existing =
        std::fs::read_to_string(&md_path).unwrap_or_else(|_| "# Benchmark results\n".into());
    let md = report::markdown(&r);
    std::fs::write(&md_path, report::splice(&existing, &md))
        .with_context(|| format!("writing {}", md_path.display()))?;
    println!("{md}");
    eprintln!(
        "runner: wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
    Ok(())
}
