//! The tiersync node: configuration, durable store, group-commit writer and
//! the command line. See `ARCHITECTURE.md` at the repository root for the map.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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

/// The parent's clock as last measured (its Welcome), on this process's
/// monotonic clock: `now_ms` never runs more than half the allowed skew
/// ahead of it. Written by the uplink at each Welcome (`link/uplink.rs`).
static PARENT_MS: AtomicU64 = AtomicU64::new(0);
static PARENT_AT_MONO_MS: AtomicU64 = AtomicU64::new(0);
/// `u64::MAX` until a parent's clock was measured.
static PARENT_SLACK_MS: AtomicU64 = AtomicU64::new(u64::MAX);
static MONO_START: OnceLock<Instant> = OnceLock::new();

fn mono_ms() -> u64 {
    let start = MONO_START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Wall-clock milliseconds since the Unix epoch, as the operating system
/// says; a clock before 1970 reads as 0.
pub fn wall_ms() -> u64 {
    system_ms(std::time::SystemTime::now())
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub fn system_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The node's time for stamps, merges and checks: the wall clock, but
/// never more than half the allowed skew ahead of the parent's clock as
/// last measured and carried forward by the monotonic clock
/// ([`tiersync_protocol::clock::bounded_now`]). So a wall clock that jumps
/// ahead cannot stamp writes the parent would refuse, whether the jump
/// comes before or during a connection. The only place the node reads time
/// for stamps; the HLC moves forward whatever it says.
pub fn now_ms() -> u64 {
    let slack = PARENT_SLACK_MS.load(Ordering::Relaxed);
    let parent = (slack != u64::MAX).then(|| {
        let since = mono_ms().saturating_sub(PARENT_AT_MONO_MS.load(Ordering::Relaxed));
        PARENT_MS.load(Ordering::Relaxed).saturating_add(since)
    });
    tiersync_protocol::clock::bounded_now(wall_ms(), parent, slack)
}

/// Records the parent's wall clock `parent_ms` as read now, and the slack
/// (half the policy's `max_clock_skew_ms`) [`now_ms`] may run ahead of it.
pub fn set_parent_clock(parent_ms: u64, slack_ms: u64) {
    PARENT_AT_MONO_MS.store(mono_ms(), Ordering::Relaxed);
    PARENT_MS.store(parent_ms, Ordering::Relaxed);
    PARENT_SLACK_MS.store(slack_ms.min(u64::MAX - 1), Ordering::Relaxed);
}
