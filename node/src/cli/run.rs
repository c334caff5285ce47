//! `tiersync run` (a node until SIGTERM or Ctrl-C, reloading on SIGHUP) and
//! `tiersync reload`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use super::LogHandle;
use super::client_cmd::ClientOpts;
use super::output::print_out;
use crate::config::{self, Loaded};
use crate::node::Running;

pub(super) fn run(config_path: PathBuf, log: Option<&LogHandle>) -> Result<()> {
    let loaded = config::load(&config_path)?;
    set_log_level(log, &loaded);
    crate::failpoints::setup_from_env()?;
    let metrics =
        crate::telemetry::install_recorder().context("installing the metrics recorder")?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // The runtime (and with it every task holding the store) is dropped
    // before this returns, so RocksDB is closed before the process exits.
    rt.block_on(async {
        // Installed first: SIGHUP's default action would kill the node.
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let node = crate::node::start(&loaded, Some(metrics)).await?;
        // Scripts and the demo read this line to find the bound addresses.
        println!(
            "ready api={} peer={}",
            node.api_addr,
            node.peer_addr.map(|a| a.to_string()).unwrap_or_default()
        );
        let stop = shutdown_signal();
        tokio::pin!(stop);
        // After a failed WAL sync the store takes no more writes; the node
        // exits so that its supervisor restarts it and RocksDB recovers
        // from the WAL (fail-stop, as PostgreSQL does after "fsyncgate").
        let store = node.store.clone();
        let failed = async move {
            loop {
                if let Some(why) = store.stopped() {
                    return why.to_string();
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        tokio::pin!(failed);
        let stopped = loop {
            tokio::select! {
                r = &mut stop => break r,
                _ = hangup.recv() => reload(&node, &config_path, log),
                why = &mut failed => {
                    tracing::error!(error = %why, "a WAL sync failed: stopping; restart the node to recover from its WAL");
                    if let Err(e) = node.shutdown().await {
                        tracing::warn!(error = %e, "shutdown after the failed sync");
                    }
                    anyhow::bail!("a WAL sync failed ({why}); the node stopped without acknowledging anything after it");
                }
            }
        };
        tracing::info!("shutting down");
        let closed = node.shutdown().await;
        stopped?;
        closed?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

/// The log filter: `RUST_LOG` if set, else the node file's `[log] level`,
/// else `info`.
fn set_log_level(log: Option<&LogHandle>, loaded: &Loaded) {
    let (Some(handle), Some(level)) = (log, &loaded.config.log.level) else {
        return;
    };
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    // The level was parsed when the file was loaded.
    if let Ok(filter) = tracing_subscriber::EnvFilter::builder().parse(level)
        && let Err(e) = handle.reload(filter)
    {
        tracing::warn!(error = %e, "cannot change the log level");
    }
}

/// Re-reads the node file and applies it, or keeps the running
/// configuration and says why.
fn reload(node: &Running, path: &Path, log: Option<&LogHandle>) {
    let outcome = config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|new| {
            let changes = node.reload(&new).map_err(|e| e.to_string())?;
            set_log_level(log, &new);
            Ok(changes)
        });
    match outcome {
        Ok(changes) => {
            let message = if changes.is_empty() {
                "no change".to_string()
            } else {
                changes.join("; ")
            };
            tracing::info!(changes = %message, "configuration reloaded");
            node.ops.record_reload(true, message);
        }
        Err(e) => {
            tracing::warn!(error = %e, "reload refused; the running configuration is kept");
            node.ops.record_reload(false, e);
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// `tiersync reload`: SIGHUP to the node's process (its pid from
/// `/v1/status`), then the outcome it records.
pub(super) fn reload_command(opts: &ClientOpts) -> Result<()> {
    let client = opts.client()?;
    let status = client.status()?;
    let pid = status["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .context("the node's status names no pid (an older tiersync?)")?;
    let before = status["config"]["reloads"].as_u64().unwrap_or(0);
    // The pid is only meaningful on the node's own host: make sure it is a
    // tiersync node here before signalling it.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_node =
        args.first().is_some_and(|a| a.ends_with(b"tiersync")) && args.iter().any(|a| *a == b"run");
    if !is_node {
        bail!(
            "process {pid} (the node at {}) is not a `tiersync run` on this host: run `tiersync reload` on the node's host, or send it SIGHUP",
            client.base_url()
        );
    }
    crate::process::signal(pid, crate::process::SIGHUP)
        .with_context(|| format!("sending SIGHUP to process {pid}"))?;
    let deadline = Instant::now() + Duration::from_secs(opts.timeout.max(1));
    loop {
        let status = client.status()?;
        if status["config"]["reloads"].as_u64().unwrap_or(0) > before {
            let last = &status["config"]["last"];
            if opts.json {
                print_out(&format!("{}\n", serde_json::to_string_pretty(last)?))?;
            }
            let message = last["message"].as_str().unwrap_or("");
            if last["ok"].as_bool() == Some(true) {
                if !opts.json {
                    print_out(&format!("reloaded: {message}\n"))?;
                }
                return Ok(());
            }
            bail!("reload refused, the running configuration is kept: {message}");
        }
        if Instant::now() >= deadline {
            bail!(
                "process {pid} did not report a reload within {} s",
                opts.timeout.max(1)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
