//! What a running node tells operators and orchestrators beyond its data:
//! whether it is stopping (for `/readyz`), and the outcome of each config
//! reload (for `/v1/status` and `tiersync reload`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use utoipa::ToSchema;

/// The outcome of one reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ReloadOutcome {
    /// When it ran (RFC 3339, UTC).
    pub at: String,
    /// Whether the new configuration is in force.
    pub ok: bool,
    /// What changed, or why it was refused (the old configuration is kept).
    pub message: String,
}

/// The node's configuration reloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct ReloadStatus {
    /// Reloads attempted since the start (applied or refused).
    pub reloads: u64,
    /// The last one, if any.
    pub last: Option<ReloadOutcome>,
}

/// Shared operational state of a running node.
#[derive(Debug, Default)]
pub struct Ops {
    stopping: AtomicBool,
    reload: Mutex<ReloadStatus>,
}

impl Ops {
    /// Marks the node as stopping: `/readyz` answers 503 from now on, so a
    /// load balancer drains it while it finishes what is in flight.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether the node is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Records a reload's outcome, and counts it in
    /// `tiersync_config_reloads_total{result}`.
    pub fn record_reload(&self, ok: bool, message: String) {
        metrics::counter!("tiersync_config_reloads_total", "result" => if ok { "applied" } else { "refused" })
            .increment(1);
        if ok {
            metrics::gauge!("tiersync_config_last_reload_success_timestamp_seconds")
                .set(crate::now_ms() as f64 / 1000.0);
        }
        let mut r = self.reload.lock().unwrap_or_else(|e| e.into_inner());
        r.reloads += 1;
        r.last = Some(ReloadOutcome {
            at: crate::json::format_time_ms(crate::now_ms()),
            ok,
            message,
        });
    }

    /// The reloads so far.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
