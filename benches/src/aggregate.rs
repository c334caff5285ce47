//! Aggregate query latency as the data grows, at a province.
//!
//! Loads billing items into a province's store the way replication does
//! (`Store::merge_remote` batches from two cities, each item with its
//! aggregate deltas in the same WriteBatch), and at each checkpoint measures
//! the latency of querying `billing_by_city_month` (reading the aggregate
//! rows and totalling them by city, as `?group_by=origin` does). A query
//! reads aggregate state only, so its latency must not grow with the item
//! count.

use std::time::{Duration, Instant};

use anyhow::Context;
use tiersync::config::Durability;
use tiersync::store::{RemoteMerge, Store};
use tiersync_protocol::aggregate::Compiled;
use tiersync_protocol::frame::WireItem;
use tiersync_protocol::{Hlc, Item, LogEntry, NodeId, Stamp, Value};

use crate::Latency;

/// Figures at one item count.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checkpoint {
    /// Billing items held.
    pub items: u64,
    /// Aggregate rows the query read.
    pub rows: usize,
    /// Query latency.
    pub query: Latency,
    /// Items merged per second while loading up to this checkpoint.
    pub load_items_per_s: f64,
}

fn bill(i: u64, origin: &NodeId) -> WireItem {
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
                origin: origin.clone(),
            },
        }),
    }
}

/// Loads up to `items` billing items, measuring `queries` queries at each
/// checkpoint (100 k, 1 M, 10 M, 100 M below `items`, and `items`).
pub fn run(items: u64, queries: usize) -> anyhow::Result<Vec<Checkpoint>> {
    let dir = tempfile::tempdir()?;
    let policy = std::sync::Arc::new(tiersync::config::load_policy(
        &crate::repo_root().join("config-examples/policy.toml"),
    )?);
    let agg = Compiled::all(&policy)
        .into_iter()
        .find(|a| a.name == "billing_by_city_month")
        .context("the shipped policy lacks billing_by_city_month")?;
    // Buffered durability: loading speed is not what this measures.
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
    let mut out = Vec::new();
    let mut loaded = 0u64;
    let mut seqs = [0u64; 2];
    for target in checkpoints {
        let t0 = Instant::now();
        let from = loaded;
        while loaded < target {
            let n = (target - loaded).min(1000);
            let c = (loaded / 1000 % 2) as usize;
            let batch: Vec<WireItem> = (loaded..loaded + n).map(|i| bill(i, &cities[c])).collect();
            seqs[c] += 1;
            store.merge_remote(RemoteMerge {
                relay_all: false,
                now_ms: tiersync::now_ms(),
                child: cities[c].clone(),
                incarnation: 1,
                items: batch,
                cursor: Some((seqs[c], Hlc::ZERO)),
                watermarks: vec![],
            })?;
            loaded += n;
        }
        let load_items_per_s = (loaded - from) as f64 / t0.elapsed().as_secs_f64();
        let mut lat: Vec<Duration> = Vec::with_capacity(queries);
        let mut rows = 0;
        for _ in 0..queries {
            let q = Instant::now();
            let r = store.aggregate_rows(&agg)?;
            let mut by_origin = std::collections::BTreeMap::new();
            for (g, v) in &r {
                *by_origin.entry(g[0].clone()).or_insert(0i128) += v[0];
            }
            std::hint::black_box(by_origin);
            lat.push(q.elapsed());
            rows = r.len();
        }
        out.push(Checkpoint {
            items: loaded,
            rows,
            query: Latency::of(lat),
            load_items_per_s,
        });
    }
    Ok(out)
}
