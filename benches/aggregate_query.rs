//! Aggregate query latency as the data grows, at a province (see
//! `tiersync_benches::aggregate`). The runner (`benches/runner.rs`) runs the
//! same measurement as its scenario 7; this bench runs it alone.
//!
//! cargo bench --profile release -p tiersync-benches --bench aggregate_query -- [--items N] [--queries Q]

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let items = arg("--items", 10_000_000);
    let queries = arg("--queries", 2000) as usize;
    println!("| billing items | rows | query p50 | query p99 | query max | load rate (items/s) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for c in tiersync_benches::aggregate::run(items, queries)? {
        println!(
            "| {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} |",
            c.items,
            c.rows,
            c.query.p50_ms * 1e3,
            c.query.p99_ms * 1e3,
            c.query.max_ms * 1e3,
            c.load_items_per_s
        );
    }
    Ok(())
}
