//! Assembles a running node: store, writer, API, peer endpoint, uplink.
//!
//! [`start`] takes a loaded config and returns a [`Running`] handle with the
//! bound addresses (tests and the demo bind port 0) and a clean
//! [`Running::shutdown`]: links close, the writer drains, RocksDB is flushed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tiersync_protocol::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::config::Loaded;
use crate::link::downlink::{self, Claims, DownlinkCtx};
use crate::link::status::LinkStatus;
use crate::link::uplink::{self, UplinkCtx};
use crate::store::Store;
use crate::writer::Writer;

/// Bounded queue of write requests waiting for the writer thread.
pub const WRITE_QUEUE: usize = 4096;

/// A running node.
pub struct Running {
    /// The HTTP API's bound address.
    pub api_addr: SocketAddr,
    /// The QUIC peer endpoint's bound address, if the node has children.
    pub peer_addr: Option<SocketAddr>,
    /// The store (for in-process tests).
    pub store: Arc<Store>,
    /// Link state.
    pub status: Arc<LinkStatus>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: Option<Writer>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts a node from its loaded config. Must run inside a tokio runtime.
pub async fn start(
    loaded: &Loaded,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<Running> {
    let cfg = &loaded.config;
    let policy = loaded.policy.clone();
    let store = Arc::new(
        Store::open(
            &cfg.node.data_dir,
            cfg.node.id.clone(),
            policy.clone(),
            cfg.storage.durability,
        )
        .with_context(|| format!("opening the store in {}", cfg.node.data_dir.display()))?,
    );
    let (writer, writer_thread) =
        Writer::spawn(store.clone(), WRITE_QUEUE).context("starting the writer thread")?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let status = Arc::new(LinkStatus::default());
    let claims: Claims = Claims::default();
    let mut tasks = Vec::new();

    let children: BTreeSet<NodeId> = cfg.children.iter().cloned().collect();
    let mut peer_addr = None;
    if let Some(tls) = &cfg.tls {
        if !children.is_empty() {
            let endpoint = crate::tls::peer_endpoint(cfg.listen.peer, tls)
                .with_context(|| format!("binding the peer address {}", cfg.listen.peer))?;
            peer_addr = Some(endpoint.local_addr().context("peer endpoint address")?);
            let ctx = DownlinkCtx {
                store: store.clone(),
                policy: policy.clone(),
                node: cfg.node.id.clone(),
                tier: cfg.node.tier,
                children: children.clone(),
                claims: claims.clone(),
                status: status.clone(),
            };
            tasks.push(tokio::spawn(downlink::serve(
                ctx,
                endpoint,
                shutdown_rx.clone(),
            )));
        }
        if let Some(parent) = &cfg.parent {
            let client =
                crate::tls::quinn_client_config(tls).context("building the uplink TLS config")?;
            let bind: SocketAddr = if cfg.listen.peer.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            }
            .parse()
            .context("client bind address")?;
            let endpoint =
                crate::tls::client_endpoint(bind, client).context("binding the uplink endpoint")?;
            let config_children: Vec<NodeId> = children.iter().cloned().collect();
            let claims = claims.clone();
            let subtree = Arc::new(move || {
                let mut all: BTreeSet<NodeId> = config_children.iter().cloned().collect();
                if let Ok(map) = claims.lock() {
                    all.extend(map.keys().cloned());
                }
                all.into_iter().collect()
            });
            let ctx = UplinkCtx {
                store: store.clone(),
                policy: policy.clone(),
                node: cfg.node.id.clone(),
                tier: cfg.node.tier,
                parent: parent.clone(),
                endpoint,
                subtree,
                status: status.clone(),
                retention: cfg.storage.changelog_retention,
            };
            tasks.push(tokio::spawn(uplink::run(ctx, shutdown_rx.clone())));
        }
    }

    // Storage size for operators (RocksDB properties are cheap to read),
    // and the changelog's retention: acknowledged entries (all of them at a
    // node without a parent) go once they are older than the window.
    let size_store = store.clone();
    let mut size_stop = shutdown_rx.clone();
    let root = cfg.parent.is_none();
    let retention = cfg.storage.changelog_retention;
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = size_stop.changed() => break,
            }
            let cutoff = crate::now_ms().saturating_sub(retention.as_millis() as u64);
            let trim_store = size_store.clone();
            match tokio::task::spawn_blocking(move || trim_store.trim_expired(root, cutoff)).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "trimming the changelog failed"),
                Err(e) => tracing::warn!(error = %e, "trimming the changelog failed"),
                Ok(Ok(_)) => {}
            }
            if let Ok(bytes) = size_store.size_bytes() {
                metrics::gauge!("tiersync_rocksdb_size_bytes").set(bytes as f64);
            }
            if let Ok(seq) = size_store.last_seq() {
                metrics::gauge!("tiersync_last_seq").set(seq as f64);
            }
        }
    }));

    let listener = tokio::net::TcpListener::bind(cfg.listen.api)
        .await
        .with_context(|| format!("binding the API address {}", cfg.listen.api))?;
    let api_addr = listener.local_addr().context("API address")?;
    let status_store = store.clone();
    let status_links = status.clone();
    let state = ApiState {
        store: store.clone(),
        writer: writer.clone(),
        node_id: cfg.node.id.clone(),
        tier: cfg.node.tier,
        max_body_bytes: cfg.api.max_body_bytes,
        status: Arc::new(move || status_links.to_json(&status_store)),
        metrics,
    };
    let mut api_shutdown = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = api_shutdown.changed().await;
        };
        if let Err(e) = api::serve(listener, state, stop).await {
            tracing::error!(error = %e, "API server failed");
        }
    }));
    tracing::info!(
        node = %cfg.node.id,
        tier = %cfg.node.tier,
        api = %api_addr,
        peer = ?peer_addr,
        policy = %&policy.digest_hex()[..16],
        last_seq = store.last_seq()?,
        "node started"
    );
    Ok(Running {
        api_addr,
        peer_addr,
        store,
        status,
        shutdown,
        tasks,
        writer: Some(writer),
        writer_thread: Some(writer_thread),
    })
}

impl Running {
    /// Stops the node: links close, the API stops, the writer drains, and
    /// RocksDB is flushed.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        drop(self.writer.take());
        if let Some(t) = self.writer_thread.take() {
            tokio::task::spawn_blocking(move || t.join())
                .await
                .context("joining the writer thread")?
                .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
        }
        self.store.flush().context("flushing the store")?;
        Ok(())
    }
}
