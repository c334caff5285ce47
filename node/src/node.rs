//! Assembles a running node: store, writer, API, peer endpoint, uplink.
//!
//! [`start`] takes a loaded config and returns a [`Running`] handle with the
//! bound addresses (tests and the demo bind port 0) and a clean
//! [`Running::shutdown`]: links close, the writer drains, RocksDB is flushed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use tiersync_protocol::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::config::Loaded;
use crate::link::downlink::{self, Claims, DownlinkCtx};
use crate::link::status::LinkStatus;
use crate::link::uplink::{self, UplinkCtx};
use crate::ops::Ops;
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
    /// Stopping flag and reload outcomes.
    pub ops: Arc<Ops>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: Option<Writer>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    live: Live,
}

/// What a reload may change while the node runs.
struct Live {
    /// The configuration in force.
    config: ArcSwap<Loaded>,
    /// The peer endpoint (children), whose server TLS config a reload swaps.
    peer_endpoint: Option<quinn::Endpoint>,
    /// The uplink's certificate and CA, which a reload swaps.
    client_material: Option<Arc<crate::tls::ClientMaterial>>,
    /// The children allowed to connect.
    children: Arc<ArcSwap<BTreeSet<NodeId>>>,
    /// Who may appear below each child.
    subtrees: Arc<ArcSwap<downlink::Subtrees>>,
    /// Serial numbers on the revocation list: a reload that changes them
    /// closes the live links of revoked children.
    revoked: watch::Sender<Arc<crate::tls::RevokedSerials>>,
}

/// Why a reload was refused; the running configuration is kept.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Settings that only a restart can change.
    #[error("{file}: needs a restart, so nothing was changed: {changes}", file = .file.display())]
    NeedsRestart {
        /// The node file.
        file: std::path::PathBuf,
        /// `key: old → new`, `; `-separated.
        changes: String,
    },
    /// The new certificates or keys are unusable.
    #[error("{0}")]
    Tls(String),
}

/// Everything bound and checked before the store is opened.
struct Prepared {
    api: tokio::net::TcpListener,
    api_addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    peer_endpoint: Option<quinn::Endpoint>,
    uplink_endpoint: Option<quinn::Endpoint>,
    client_material: Option<Arc<crate::tls::ClientMaterial>>,
    api_tls: Option<Arc<rustls::ServerConfig>>,
    revoked: crate::tls::RevokedSerials,
}

/// Checks certificates and binds every address `loaded` names. Nothing here
/// touches the data directory, so a configuration that cannot run fails
/// before RocksDB (and its threads) exists.
async fn prepare(loaded: &Loaded) -> Result<Prepared> {
    let cfg = &loaded.config;
    let findings = crate::preflight::check_tls(loaded, crate::preflight::now_secs());
    if !findings.errors.is_empty() {
        let lines: Vec<String> = findings.errors.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "cannot start with these certificates:\n  {}",
            lines.join("\n  ")
        );
    }
    for w in &findings.warnings {
        tracing::warn!("{w}");
    }
    for v in &findings.validity {
        tracing::error!("{v}; replication links will fail until it is valid");
    }
    let api = tokio::net::TcpListener::bind(cfg.listen.api)
        .await
        .map_err(|e| anyhow::anyhow!(bind_message("listen.api", cfg.listen.api, &e)))?;
    let api_tls = match (&cfg.tls, cfg.api.tls) {
        (Some(tls), true) => Some(Arc::new(
            crate::tls::api_server_config(tls).context("building the API's TLS config")?,
        )),
        _ => None,
    };
    let mut peer_endpoint = None;
    let mut uplink_endpoint = None;
    let mut client_material = None;
    if let Some(tls) = &cfg.tls {
        if !cfg.children.is_empty() {
            let peer = cfg.listen.peer.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: listen.peer: missing: a node with children needs the address they connect to",
                    loaded.path.display()
                )
            })?;
            peer_endpoint = Some(crate::tls::peer_endpoint(peer, tls).map_err(|e| match e {
                crate::tls::TlsError::Bind { addr, source } => {
                    anyhow::anyhow!(bind_message("listen.peer", addr, &source))
                }
                other => anyhow::Error::new(other).context("setting up the peer endpoint"),
            })?);
        }
        if cfg.parent.is_some() {
            let material =
                crate::tls::ClientMaterial::load(tls).context("reading the uplink's TLS files")?;
            let client = crate::tls::quinn_client_config_reloadable(material.clone())
                .context("building the uplink TLS config")?;
            client_material = Some(material);
            let bind: SocketAddr = if cfg.listen.peer.is_some_and(|p| p.is_ipv6()) {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            }
            .parse()
            .context("client bind address")?;
            uplink_endpoint = Some(
                crate::tls::client_endpoint(bind, client).context("binding the uplink endpoint")?,
            );
        }
    }
    let revoked = match &cfg.tls {
        Some(tls) => crate::tls::revoked_serials(tls).context("reading the revocation list")?,
        None => Default::default(),
    };
    let api_addr = api.local_addr().context("API address")?;
    let peer_addr = match &peer_endpoint {
        Some(e) => Some(e.local_addr().context("peer endpoint address")?),
        None => None,
    };
    Ok(Prepared {
        api,
        api_addr,
        peer_addr,
        peer_endpoint,
        uplink_endpoint,
        client_material,
        api_tls,
        revoked,
    })
}

/// An address that cannot be bound, with what to do about it.
fn bind_message(key: &str, addr: SocketAddr, e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there: is this node already running? else change [listen] in the node file)"
        }
        std::io::ErrorKind::AddrNotAvailable => " (no interface of this host has that address)",
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        _ => "",
    };
    format!("{key}: cannot bind {addr}: {e}{hint}")
}

/// Opens the store, naming a data directory held by another process as such
/// instead of with RocksDB's lock-file message.
pub(crate) fn open_store(
    cfg: &crate::config::NodeConfig,
    policy: Arc<tiersync_protocol::Policy>,
) -> Result<Store> {
    let dir = &cfg.node.data_dir;
    Store::open(dir, cfg.node.id.clone(), policy, cfg.storage.durability).map_err(|e| {
        let text = e.to_string();
        if text.contains("lock file") || text.contains("/LOCK:") {
            anyhow::anyhow!(
                "{}: another tiersync process holds this data directory (stop it first, or give this node its own node.data_dir); RocksDB said: {text}",
                dir.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("opening the store in {}", dir.display()))
        }
    })
}

/// Starts a node from its loaded config. Must run inside a tokio runtime.
///
/// Certificates, the API and peer addresses are checked and bound first; only
/// then is the store opened, so a configuration error never leaves RocksDB
/// open behind an error exit.
pub async fn start(
    loaded: &Loaded,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<Running> {
    let cfg = &loaded.config;
    let policy = loaded.policy.clone();
    let prepared = prepare(loaded).await?;
    let store = Arc::new(open_store(cfg, policy.clone())?);
    store.set_root(cfg.parent.is_none());
    // Never fails the start (the store is open): an error is logged.
    match api::auth::bootstrap_admin(&store, &cfg.node.data_dir, crate::now_ms()) {
        Ok(Some(file)) => tracing::warn!(
            file = %file.display(),
            "no valid admin token: created one (bootstrap-admin), readable only by this user in this file; \
             create the tokens you need with it (tiersync token create), then delete the file"
        ),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "could not create the first admin token"),
    }
    let (writer, writer_thread) =
        Writer::spawn(store.clone(), WRITE_QUEUE).context("starting the writer thread")?;
    crate::telemetry::register(cfg, &policy);
    // Before the first scrape, so a restarted child with a backlog never
    // shows a lag of 0.
    store_gauges(&store, &LinkStatus::default(), parent_id(cfg).as_deref());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let status = Arc::new(LinkStatus::default());
    let claims: Claims = Claims::default();
    let mut tasks = Vec::new();
    let ops = Arc::new(Ops::default());

    let children = Arc::new(ArcSwap::from_pointee(
        cfg.children.iter().cloned().collect::<BTreeSet<NodeId>>(),
    ));
    let subtrees = Arc::new(ArcSwap::from_pointee(downlink::Subtrees {
        configured: cfg.subtrees(),
        moved: cfg.moved(),
    }));
    let peer_addr = prepared.peer_addr;
    let (revoked, revoked_rx) = watch::channel(Arc::new(prepared.revoked));
    if let Some(endpoint) = &prepared.peer_endpoint {
        let ctx = DownlinkCtx {
            revoked: revoked_rx,
            store: store.clone(),
            policy: policy.clone(),
            node: cfg.node.id.clone(),
            tier: cfg.node.tier,
            children: children.clone(),
            subtrees: subtrees.clone(),
            claims: claims.clone(),
            status: status.clone(),
        };
        tasks.push(tokio::spawn(downlink::serve(
            ctx,
            endpoint.clone(),
            shutdown_rx.clone(),
        )));
    }
    if let (Some(parent), Some(endpoint)) = (&cfg.parent, &prepared.uplink_endpoint) {
        let claims = claims.clone();
        let configured = children.clone();
        let subtree = Arc::new(move || {
            let mut all: BTreeSet<NodeId> = configured.load().as_ref().clone();
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
            endpoint: endpoint.clone(),
            subtree,
            status: status.clone(),
            retention: cfg.storage.changelog_retention,
        };
        tasks.push(tokio::spawn(uplink::run(ctx, shutdown_rx.clone())));
    }

    // Gauges read from the store, so they agree with `/v1/status`; and the
    // changelog's retention: acknowledged entries (all of them at a node
    // without a parent) go once they are older than the window.
    let gauge_store = store.clone();
    let gauge_links = status.clone();
    let parent_id = parent_id(cfg);
    let retention = cfg.storage.changelog_retention;
    let mut gauge_stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = gauge_stop.changed() => break,
            }
            let store = gauge_store.clone();
            let links = gauge_links.clone();
            let parent_id = parent_id.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let cutoff = crate::now_ms().saturating_sub(retention.as_millis() as u64);
                if let Err(e) = store.trim_expired(parent_id.is_none(), cutoff) {
                    tracing::warn!(error = %e, "trimming the changelog failed");
                }
                store_gauges(&store, &links, parent_id.as_deref());
            })
            .await;
        }
    }));

    let api_addr = prepared.api_addr;
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
        ops: ops.clone(),
        rate_limits: api::auth::RateLimits::new(
            cfg.api.rate_limit_per_second,
            cfg.api.rate_limit_burst,
        ),
        hosts: api::guards::allowed_hosts(
            cfg.node.id.as_str(),
            Some(cfg.listen.api),
            &cfg.api.hosts,
        ),
        request_timeout: cfg.api.request_timeout,
    };
    let serve_options = api::serve::ServeOptions {
        tls: prepared.api_tls.clone(),
        header_timeout: cfg.api.header_timeout,
        max_connections: cfg.api.max_connections,
    };
    let mut api_shutdown = shutdown_rx.clone();
    let listener = prepared.api;
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = api_shutdown.changed().await;
        };
        if let Err(e) = api::serve_with(listener, state, serve_options, stop).await {
            tracing::error!(error = %e, "API server failed");
        }
    }));
    tracing::info!(
        node = %cfg.node.id,
        tier = %cfg.node.tier,
        api = %api_addr,
        peer = ?peer_addr,
        policy = %&policy.digest_hex()[..16],
        last_seq = store.last_seq().unwrap_or(0),
        "node started"
    );
    Ok(Running {
        api_addr,
        peer_addr,
        store,
        status,
        ops,
        shutdown,
        tasks,
        writer: Some(writer),
        writer_thread: Some(writer_thread),
        live: Live {
            config: ArcSwap::from_pointee(loaded.clone()),
            peer_endpoint: prepared.peer_endpoint,
            client_material: prepared.client_material,
            children,
            subtrees,
            revoked,
        },
    })
}

fn parent_id(cfg: &crate::config::NodeConfig) -> Option<String> {
    cfg.parent.as_ref().map(|p| p.id.to_string())
}

/// Changes the parent has not acknowledged and the age of the oldest, from
/// the store alone (before the uplink has reported): the changelog is
/// trimmed only below what the parent acknowledged.
fn unacknowledged(store: &Store) -> (f64, f64) {
    let acked = store
        .acked_seq()
        .max(store.retained_from().unwrap_or(1).saturating_sub(1));
    let lag = store.last_seq().unwrap_or(0).saturating_sub(acked);
    let seconds = match store.hlc_of(acked + 1) {
        Ok(Some(h)) if lag > 0 => crate::now_ms().saturating_sub(h.physical_ms) as f64 / 1000.0,
        _ => 0.0,
    };
    (lag as f64, seconds)
}

/// Size, sequence, uplink lag and watermark gauges, from the store.
fn store_gauges(store: &Store, links: &LinkStatus, parent: Option<&str>) {
    if let Ok(bytes) = store.size_bytes() {
        metrics::gauge!("tiersync_rocksdb_size_bytes").set(bytes as f64);
    }
    if let Ok(seq) = store.last_seq() {
        metrics::gauge!("tiersync_last_seq").set(seq as f64);
    }
    if let Some(parent) = parent {
        // The wall clock may have jumped since the last Welcome.
        let correction = crate::wall_ms().saturating_sub(crate::now_ms());
        metrics::gauge!("tiersync_clock_correction_seconds").set(correction as f64 / 1000.0);
        links.uplink(|s| s.clock_correction_ms = correction);
        let view = links.to_json(store);
        let p = &view["parent"];
        let (records, seconds) = if p.is_null() {
            unacknowledged(store)
        } else {
            (
                p["lag_records"].as_f64().unwrap_or(0.0),
                p["lag_seconds"].as_f64().unwrap_or(0.0),
            )
        };
        metrics::gauge!("tiersync_uplink_lag_records", "peer" => parent.to_string()).set(records);
        metrics::gauge!("tiersync_uplink_lag_seconds", "peer" => parent.to_string()).set(seconds);
    }
    for w in store.watermarks().unwrap_or_default() {
        let origin = w.origin.to_string();
        metrics::gauge!("tiersync_origin_watermark_seq", "origin" => origin.clone())
            .set(w.seq as f64);
        metrics::gauge!("tiersync_origin_complete_up_to_timestamp_seconds", "origin" => origin)
            .set(w.hlc.physical_ms as f64 / 1000.0);
    }
}

impl Running {
    /// Stops the node: links close, the API stops, the writer drains, and
    /// RocksDB is flushed.
    pub async fn shutdown(mut self) -> Result<()> {
        self.ops.set_stopping();
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

impl Running {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Loaded> {
        self.live.config.load_full()
    }

    /// Applies a reloaded configuration: validates everything first, then
    /// swaps the certificates (new links use them; established ones keep
    /// theirs) and the list of children. A change only a restart can make
    /// refuses the whole reload and keeps the running configuration.
    /// Returns what changed.
    pub fn reload(&self, new: &Loaded) -> Result<Vec<String>, ReloadError> {
        let old = self.live.config.load_full();
        let (o, n) = (&old.config, &new.config);
        type Get = fn(&Loaded) -> String;
        let restart_only: [(&str, Get); 10] = [
            ("node.id", |l| l.config.node.id.to_string()),
            ("node.tier", |l| l.config.node.tier.to_string()),
            ("node.data_dir", |l| {
                l.config.node.data_dir.display().to_string()
            }),
            ("listen.api", |l| l.config.listen.api.to_string()),
            ("listen.peer", |l| format!("{:?}", l.config.listen.peer)),
            ("parent", |l| {
                format!("{:?}", l.config.parent.as_ref().map(|p| (&p.id, &p.addr)))
            }),
            ("storage.durability", |l| {
                format!("{:?}", l.config.storage.durability)
            }),
            ("api", |l| format!("{:?}", l.config.api)),
            ("tls", |l| {
                if l.config.tls.is_some() {
                    "present"
                } else {
                    "absent"
                }
                .to_string()
            }),
            ("node.policy (digest)", |l| {
                l.policy.digest_hex()[..16].to_string()
            }),
        ];
        let mut fixed: Vec<String> = restart_only
            .iter()
            .filter_map(|(key, get)| {
                let (a, b) = (get(&old), get(new));
                (a != b).then(|| format!("{key}: {a} → {b}"))
            })
            .collect();
        if self.live.peer_endpoint.is_none() && !n.children.is_empty() {
            fixed.push(
                "children: the node started without children, so it listens for none; restart it to accept children"
                    .into(),
            );
        }
        if !fixed.is_empty() {
            return Err(ReloadError::NeedsRestart {
                file: new.path.clone(),
                changes: fixed.join("; "),
            });
        }
        let mut applied = Vec::new();
        if let Some(tls) = &n.tls {
            let findings = crate::preflight::check_tls(new, crate::preflight::now_secs());
            if !findings.errors.is_empty() || !findings.validity.is_empty() {
                let lines: Vec<String> = findings
                    .errors
                    .iter()
                    .chain(&findings.validity)
                    .map(ToString::to_string)
                    .collect();
                return Err(ReloadError::Tls(lines.join("; ")));
            }
            // Everything is built before anything is swapped: the
            // revocation list and the server configuration first, then the
            // client material (whose reload swaps only once all its files
            // are usable).
            let revoked =
                crate::tls::revoked_serials(tls).map_err(|e| ReloadError::Tls(e.to_string()))?;
            let server = match &self.live.peer_endpoint {
                Some(_) => Some(
                    crate::tls::quinn_server_config(tls)
                        .map_err(|e| ReloadError::Tls(e.to_string()))?,
                ),
                None => None,
            };
            if let Some(material) = &self.live.client_material {
                material
                    .reload(tls)
                    .map_err(|e| ReloadError::Tls(e.to_string()))?;
            }
            if let (Some(endpoint), Some(server)) = (&self.live.peer_endpoint, server) {
                endpoint.set_server_config(Some(server));
            }
            applied.push("certificates re-read".to_string());
            let more = revoked.len();
            if self.live.revoked.send_if_modified(|cur| {
                let changed = **cur != revoked;
                if changed {
                    *cur = Arc::new(revoked);
                }
                changed
            }) {
                applied.push(format!(
                    "revocation list: {more} certificate(s) revoked; live links of revoked children closed"
                ));
            }
        }
        if o.children != n.children {
            let list: Vec<&str> = n.children.iter().map(NodeId::as_str).collect();
            applied.push(format!("children: [{}]", list.join(", ")));
        }
        self.live
            .children
            .store(Arc::new(n.children.iter().cloned().collect()));
        if o.subtree != n.subtree {
            applied.push("subtree: the nodes allowed below each child".to_string());
        }
        if o.moved != n.moved {
            applied.push("moved: the nodes that left each child's subtree".to_string());
        }
        self.live.subtrees.store(Arc::new(downlink::Subtrees {
            configured: n.subtrees(),
            moved: n.moved(),
        }));
        if o.log != n.log {
            applied.push(format!("log.level: {:?}", n.log.level));
        }
        self.live.config.store(Arc::new(new.clone()));
        crate::telemetry::set_cert_expiry(n);
        Ok(applied)
    }
}
