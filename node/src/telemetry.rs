//! Prometheus metrics in Prometheus's conventions: every family described
//! (HELP), durations as histograms (mergeable across nodes, unlike
//! per-process quantiles), and every family given its series at start, so a
//! fresh node's `/metrics` already shows what dashboards and alerts query.
//!
//! The names are listed once, here; the code that updates a family uses the
//! same literal name.

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tiersync_protocol::{Kind, Policy};

use crate::config::NodeConfig;

/// Histogram buckets of durations, in seconds: 100 µs (a cached read) to
/// 10 s (a large bulk import chunk at fsync).
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The API's route templates and their methods (series registered at start).
pub const API_ROUTES: &[(&str, &[&str])] = &[
    (
        "/v1/records/{category}/{key}",
        &["GET", "PUT", "PATCH", "DELETE"],
    ),
    ("/v1/records/{category}", &["GET", "POST"]),
    ("/v1/customers/{id}", &["GET"]),
    ("/v1/aggregates", &["GET"]),
    ("/v1/aggregates/{name}", &["GET"]),
    ("/v1/status", &["GET"]),
    ("/v1/tokens", &["GET", "POST"]),
    ("/v1/tokens/{id}", &["DELETE"]),
    ("/v1/openapi.json", &["GET"]),
    ("/metrics", &["GET"]),
    ("/healthz", &["GET"]),
    ("/readyz", &["GET"]),
];

/// Reasons a parent refuses a connection (`tiersync_link_refused_total`).
pub const REFUSAL_REASONS: &[&str] = &[
    "overload",
    "address_overload",
    "handshake",
    "timeout",
    "session",
    "identity_overload",
    "hello_timeout",
    "revoked",
];

/// Installs the process-wide Prometheus recorder with histogram buckets.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(DURATION_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// HELP text of every family.
pub fn describe() {
    describe_counter!(
        "tiersync_api_requests_total",
        "HTTP API requests by route template, method and status code"
    );
    describe_counter!(
        "tiersync_api_errors_total",
        "HTTP API error responses by route template and error code"
    );
    describe_counter!(
        "tiersync_api_connections_refused_total",
        "HTTP API connections closed on arrival because [api] max_connections were open"
    );
    describe_histogram!(
        "tiersync_api_request_duration_seconds",
        "HTTP API request duration by route template, in seconds"
    );
    describe_counter!(
        "tiersync_writes_total",
        "Local writes acknowledged, by category and operation"
    );
    describe_counter!(
        "tiersync_merges_total",
        "Items changed by merging a child's batches"
    );
    describe_counter!(
        "tiersync_merge_conflicts_total",
        "Log entries that two nodes wrote with different content (won by the newer stamp)"
    );
    describe_gauge!(
        "tiersync_link_up",
        "1 while a replication link is established, else 0 (link = parent or child, peer = the other node)"
    );
    describe_counter!(
        "tiersync_link_batches_total",
        "Replication batches sent (link=parent) or merged (link=child)"
    );
    describe_counter!(
        "tiersync_link_items_total",
        "Items sent (link=parent) or merged (link=child)"
    );
    describe_counter!(
        "tiersync_link_bytes_total",
        "Batch bytes sent (link=parent) or received (link=child)"
    );
    describe_counter!(
        "tiersync_link_errors_total",
        "Replication links closed by an error"
    );
    describe_counter!(
        "tiersync_link_refused_total",
        "Incoming replication connections refused, by reason"
    );
    describe_gauge!(
        "tiersync_uplink_lag_records",
        "Local changes the parent has not acknowledged yet"
    );
    describe_gauge!(
        "tiersync_uplink_lag_seconds",
        "Age of the oldest change the parent has not acknowledged, in seconds"
    );
    describe_gauge!(
        "tiersync_origin_watermark_seq",
        "Per node below this one: everything it wrote up to this sequence number is here"
    );
    describe_gauge!(
        "tiersync_origin_complete_up_to_timestamp_seconds",
        "Per node below this one: everything it wrote up to this time (Unix seconds) is here"
    );
    describe_gauge!(
        "tiersync_rocksdb_size_bytes",
        "Size of the node's RocksDB files, in bytes"
    );
    describe_gauge!(
        "tiersync_last_seq",
        "The node's last changelog sequence number"
    );
    describe_gauge!(
        "tiersync_build_info",
        "Always 1; the labels name the running build"
    );
    describe_gauge!(
        "tiersync_tls_cert_expiry_timestamp_seconds",
        "When a TLS certificate in use expires (Unix seconds); cert = ca or node"
    );
    describe_counter!(
        "tiersync_config_reloads_total",
        "Configuration reloads (SIGHUP, tiersync reload), by result: applied or refused"
    );
    describe_gauge!(
        "tiersync_config_last_reload_success_timestamp_seconds",
        "When the configuration was last loaded successfully (Unix seconds): the start or the last applied reload"
    );
    describe_gauge!(
        "tiersync_clock_offset_seconds",
        "This node's clock minus its parent's, at the last handshake (seconds)"
    );
    describe_gauge!(
        "tiersync_clock_correction_seconds",
        "How far this node stamps behind its own wall clock because that clock runs ahead of its parent's (0 normally)"
    );
    describe_counter!(
        "tiersync_clock_recoveries_total",
        "Times the HLC was found ahead of the wall clock by more than the allowed skew and started again from it"
    );
    describe_counter!(
        "tiersync_reincarnations_total",
        "New incarnations taken because this node's data was behind its parent (restore, buffered power cut) or it started under another parent"
    );
    describe_counter!(
        "tiersync_link_foreign_dropped_total",
        "Writes of origins outside a child's subtree dropped from what it sent (a city that moved away, or a forgery)"
    );
    describe_counter!(
        "tiersync_store_sync_failures_total",
        "Failed WAL syncs; after one the store takes no more writes and the node stops"
    );
    describe_counter!(
        "tiersync_lww_overwrites_total",
        "Record fields whose value from one origin was replaced by another origin's newer value"
    );
    metrics_process::Collector::default().describe();
}

/// Gives every family its series for what this node is configured with, so
/// they are present (at 0) before their first event.
pub fn register(config: &NodeConfig, policy: &Policy) {
    for (route, methods) in API_ROUTES {
        let _ = metrics::histogram!("tiersync_api_request_duration_seconds", "route" => *route);
        for method in *methods {
            metrics::counter!("tiersync_api_requests_total", "route" => *route, "method" => *method, "status" => "200")
                .absolute(0);
        }
    }
    metrics::counter!("tiersync_api_errors_total", "route" => "unmatched", "code" => "no_route")
        .absolute(0);
    metrics::counter!("tiersync_api_connections_refused_total").absolute(0);
    for (name, cat) in &policy.categories {
        let ops: &[&'static str] = match cat.kind {
            Kind::Record => &["put", "patch", "delete"],
            Kind::Log => &["append"],
        };
        for op in ops {
            metrics::counter!("tiersync_writes_total", "category" => name.clone(), "op" => *op)
                .absolute(0);
        }
    }
    metrics::counter!("tiersync_merges_total").absolute(0);
    metrics::counter!("tiersync_merge_conflicts_total").absolute(0);
    metrics::counter!("tiersync_reincarnations_total").absolute(0);
    metrics::counter!("tiersync_store_sync_failures_total").absolute(0);
    for child in &config.children {
        metrics::counter!("tiersync_link_foreign_dropped_total", "link" => "child", "peer" => child.to_string())
            .absolute(0);
    }
    let mut links: Vec<(&'static str, String)> = config
        .children
        .iter()
        .map(|c| ("child", c.to_string()))
        .collect();
    if let Some(p) = &config.parent {
        links.push(("parent", p.id.to_string()));
        metrics::gauge!("tiersync_uplink_lag_records", "peer" => p.id.to_string()).set(0.0);
        metrics::gauge!("tiersync_uplink_lag_seconds", "peer" => p.id.to_string()).set(0.0);
        metrics::gauge!("tiersync_clock_offset_seconds", "peer" => p.id.to_string()).set(0.0);
        metrics::gauge!("tiersync_clock_correction_seconds").set(0.0);
    }
    metrics::counter!("tiersync_clock_recoveries_total").absolute(0);
    for (link, peer) in links {
        metrics::gauge!("tiersync_link_up", "link" => link, "peer" => peer.clone()).set(0.0);
        for name in [
            "tiersync_link_batches_total",
            "tiersync_link_items_total",
            "tiersync_link_bytes_total",
            "tiersync_link_errors_total",
        ] {
            metrics::counter!(name, "link" => link, "peer" => peer.clone()).absolute(0);
        }
    }
    if !config.children.is_empty() {
        for reason in REFUSAL_REASONS {
            metrics::counter!("tiersync_link_refused_total", "reason" => *reason).absolute(0);
        }
    }
    metrics::counter!("tiersync_config_reloads_total", "result" => "applied").absolute(0);
    metrics::counter!("tiersync_config_reloads_total", "result" => "refused").absolute(0);
    metrics::gauge!("tiersync_config_last_reload_success_timestamp_seconds")
        .set(crate::now_ms() as f64 / 1000.0);
    metrics::gauge!(
        "tiersync_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "node" => config.node.id.to_string(),
        "tier" => config.node.tier.to_string(),
        "policy_digest" => policy.digest_hex()[..16].to_string(),
    )
    .set(1.0);
    set_cert_expiry(config);
    collect_process();
}

/// Sets the certificate expiry gauges from the files in use.
pub fn set_cert_expiry(config: &NodeConfig) {
    if let Some(tls) = &config.tls {
        for (which, not_after) in crate::preflight::expiries(tls) {
            metrics::gauge!("tiersync_tls_cert_expiry_timestamp_seconds", "cert" => which)
                .set(not_after as f64);
        }
    }
}

/// Refreshes the `process_*` families (CPU, memory, open files, threads).
pub fn collect_process() {
    metrics_process::Collector::default().collect();
}
