//! Aggregate query latency as the data grows, at a province.
//!
//! Loads billing items into a province's store the way replication does
//! (`Store::merge_remote` batches from two cities, each item with its
//! aggregate deltas in the same WriteBatch), and at each checkpoint measures
//! the latency of querying `billing_by_city_month` (reading the aggregate
//! rows and totalling them, as the API does). A query reads aggregate state
//! only, so its latency must not grow with the item count.
//!
//! cargo bench --profile release -p tiersync-benches --bench aggregate_query -- [--items N] [--queries Q]

use std::time::{Duration, Instant};

use tiersync::config::Durability;
use tiersync::store::{RemoteMerge, Store};
use tiersync_protocol::aggregate::Compiled;
use tiersync_protocol::frame::WireItem;
use tiersync_protocol::{Hlc, Item, LogEntry, NodeId, Stamp, Value};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let items = arg("--items", 10_000_000);
    let queries = arg("--queries", 2000) as usize;
    let dir = tempfile::tempdir()?;
    let policy = std::sync::Arc::new(tiersync::config::load_policy(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples/policy.toml"),
    )?);
    let agg = Compiled::all(&policy)
        .into_iter()
        .find(|a| a.name == "billing_by_city_month")
        .ok_or_else(|| anyhow::anyhow!("the shipped policy lacks billing_by_city_month"))?;
    // Buffered durability: loading speed is not what this bench measures.
    let store = Store::open(
        dir.path(),
        NodeId::new("zhejiang")?,
        policy.clone(),
        Durability::Buffered,
    )?;
    let cities = [NodeId::new("hangzhou")?, NodeId::new("ningbo")?];
    let mut checkpoints: Vec<u64> = [100_000u64, 1_000_000, 10_000_000, 100_000_000]
        .into_iter()
        .filter(|c| *c < items)
        .collect();
    checkpoints.push(items);
    println!("| billing items | rows | query p50 | query p99 | query max | load rate (items/s) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut loaded = 0u64;
    let mut seqs = [0u64; 2];
    let started = Instant::now();
    for target in checkpoints {
        let t0 = Instant::now();
        let from = loaded;
        while loaded < target {
            let n = (target - loaded).min(1000);
            let c = (loaded / 1000 % 2) as usize;
            let batch: Vec<WireItem> = (loaded..loaded + n)
                .map(|i| {
                    let month = 1 + i % 12;
                    WireItem {
                        category: "billing".into(),
                        key: format!("b{i:010}"),
                        item: Item::Log(LogEntry {
                            fields: [
                                (
                                    "customer_id".to_string(),
                                    Value::Str(format!("c{}", i % 100_000)),
                                ),
                                (
                                    "amount".to_string(),
                                    Value::Float((i % 20_000) as f64 / 100.0),
                                ),
                                (
                                    "billed_at".to_string(),
                                    Value::Str(format!("2026-{month:02}-01")),
                                ),
                            ]
                            .into(),
                            stamp: Stamp {
                                hlc: Hlc {
                                    physical_ms: 1_790_000_000_000 + i,
                                    logical: 0,
                                },
                                origin: cities[c].clone(),
                            },
                        }),
                    }
                })
                .collect();
            seqs[c] += 1;
            store.merge_remote(RemoteMerge {
                child: cities[c].clone(),
                incarnation: 1,
                items: batch,
                cursor: Some((seqs[c], Hlc::ZERO)),
                watermarks: vec![],
            })?;
            loaded += n;
        }
        let load_rate = (loaded - from) as f64 / t0.elapsed().as_secs_f64();
        let mut lat = Vec::with_capacity(queries);
        let mut rows = 0;
        for _ in 0..queries {
            let q = Instant::now();
            let r = store.aggregate_rows(&agg)?;
            // Total per origin, as `?group_by=origin` does.
            let mut by_origin = std::collections::BTreeMap::new();
            for (g, v) in &r {
                *by_origin.entry(g[0].clone()).or_insert(0i128) += v[0];
            }
            std::hint::black_box(by_origin);
            lat.push(q.elapsed());
            rows = r.len();
        }
        lat.sort();
        println!(
            "| {loaded} | {rows} | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} |",
            percentile(&lat, 0.5).as_secs_f64() * 1e6,
            percentile(&lat, 0.99).as_secs_f64() * 1e6,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
            load_rate
        );
    }
    eprintln!("total time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
