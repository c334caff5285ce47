//! The tiersync node: configuration, durable store, group-commit writer and
//! the command line. See `ARCHITECTURE.md` at the repository root for the map.

pub mod api;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod deploygen;
pub mod deployment;
pub mod failpoints;
pub mod json;
pub mod link;
pub mod node;
pub mod ops;
pub mod preflight;
pub mod process;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod writer;

/// Wall-clock milliseconds since the Unix epoch. The only place the node
/// reads the wall clock for stamps; a clock before 1970 reads as 0 and the
/// HLC still moves forward.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
