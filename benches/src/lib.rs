//! tiersync's benchmarks.
//!
//! * `benches/runner.rs` — the end-to-end runner: real nodes on loopback,
//!   every scenario next to a baseline measured in the same run (raw RocksDB,
//!   PostgreSQL logical replication), a JSON report and `RESULTS.md`.
//! * `benches/micro.rs` — criterion micro-benchmarks (codec, merges).
//! * `benches/aggregate_query.rs` — scenario 7 alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod aggregate;
pub mod data;
pub mod pg;
pub mod raw;
pub mod report;
pub mod rss;
pub mod scenarios;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Latency figures of a set of samples, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Latency {
    /// The figures of `samples` (nearest-rank percentiles).
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |p: f64| {
            let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
            samples.get(i).copied().unwrap_or_default().as_secs_f64() * 1e3
        };
        Self {
            count: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// Items moved in some time.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Throughput {
    /// Items.
    pub items: u64,
    /// Payload bytes (what the scenario counts: NDJSON, encoded items, rows).
    pub bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Items per second.
    pub items_per_s: f64,
    /// Payload megabytes (10^6) per second.
    pub mb_per_s: f64,
}

impl Throughput {
    /// `items` and `bytes` moved in `elapsed`.
    pub fn new(items: u64, bytes: u64, elapsed: Duration) -> Self {
        let s = elapsed.as_secs_f64().max(1e-9);
        Self {
            items,
            bytes,
            seconds: s,
            items_per_s: items as f64 / s,
            mb_per_s: bytes as f64 / s / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::of((1..=100).map(Duration::from_millis).collect());
        assert_eq!(l.count, 100);
        assert!((l.p50_ms - 51.0).abs() < 1e-9, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() < 1e-9, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 1e-9, "{l:?}");
        assert_eq!(Latency::of(vec![]).count, 0);
    }
}
