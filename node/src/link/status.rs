//! Per-link state shared between the drivers, the status API and metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::store::Store;

/// The uplink as operators see it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkStatus {
    /// The parent's id.
    pub parent: String,
    /// The parent's address.
    pub addr: String,
    /// `connecting`, `handshake`, `streaming`, `snapshot` or `down`.
    pub state: String,
    /// The last error, if the link is or was down.
    pub last_error: Option<String>,
    /// The highest sequence number the parent acknowledged.
    pub acked_seq: u64,
    /// This node's last sequence number.
    pub local_seq: u64,
    /// Changelog entries not yet acknowledged.
    pub lag_records: u64,
    /// Age of the oldest unacknowledged change, in seconds.
    pub lag_seconds: f64,
    /// Batches sent since start.
    pub batches_sent: u64,
    /// Items sent since start.
    pub items_sent: u64,
    /// Bytes sent since start.
    pub bytes_sent: u64,
    /// Connections made since start.
    pub connects: u64,
    /// This node's clock minus the parent's, in ms, at the last handshake.
    pub clock_offset_ms: Option<i64>,
    /// How far this node stamps behind its own wall clock, in ms, because
    /// that clock was found ahead of the parent's (0 when it is not).
    pub clock_correction_ms: u64,
}

/// A child link as operators see it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChildStatus {
    /// Whether a connection is open.
    pub connected: bool,
    /// The child's last sequence number merged here.
    pub cursor: u64,
    /// Batches merged since start.
    pub batches: u64,
    /// Items received since start.
    pub items: u64,
    /// Items whose state changed.
    pub changed: u64,
    /// Conflicts resolved.
    pub conflicts: u64,
    /// Bytes received since start.
    pub bytes: u64,
    /// The last refusal or error.
    pub last_error: Option<String>,
}

/// Shared link state of one node.
#[derive(Debug, Default)]
pub struct LinkStatus {
    uplink: Mutex<Option<UplinkStatus>>,
    children: Mutex<BTreeMap<String, ChildStatus>>,
}

impl LinkStatus {
    /// Updates the uplink's status.
    pub fn uplink(&self, f: impl FnOnce(&mut UplinkStatus)) {
        if let Ok(mut g) = self.uplink.lock() {
            f(g.get_or_insert_with(UplinkStatus::default));
        }
    }

    /// Updates a child's status.
    pub fn child(&self, id: &str, f: impl FnOnce(&mut ChildStatus)) {
        if let Ok(mut g) = self.children.lock() {
            f(g.entry(id.to_string()).or_default());
        }
    }

    /// A copy of the uplink status.
    pub fn uplink_snapshot(&self) -> Option<UplinkStatus> {
        self.uplink.lock().ok().and_then(|g| g.clone())
    }

    /// The whole status as JSON, with the store's completeness watermarks.
    pub fn to_json(&self, store: &Store) -> serde_json::Value {
        let children = self.children.lock().map(|g| g.clone()).unwrap_or_default();
        let watermarks: BTreeMap<String, serde_json::Value> = store
            .watermarks()
            .unwrap_or_default()
            .into_iter()
            .map(|w| {
                (
                    w.origin.to_string(),
                    serde_json::json!({
                        "seq": w.seq,
                        "incarnation": format!("{:016x}", w.incarnation),
                        "complete_up_to_ms": w.hlc.physical_ms,
                    }),
                )
            })
            .collect();
        // The lag is computed now from the store: the cached figure could be
        // a moment old and show 0 right after a commit.
        let parent = self.uplink_snapshot().map(|mut u| {
            if let Ok(last) = store.last_seq() {
                u.local_seq = u.local_seq.max(last);
                u.lag_records = u.local_seq.saturating_sub(u.acked_seq);
                if u.lag_records > 0
                    && u.lag_seconds == 0.0
                    && let Ok(Some(h)) = store.hlc_of(u.acked_seq + 1)
                {
                    u.lag_seconds = crate::now_ms().saturating_sub(h.physical_ms) as f64 / 1000.0;
                }
            }
            u
        });
        serde_json::json!({
            "parent": parent,
            "children": children,
            "watermarks": watermarks,
        })
    }
}
