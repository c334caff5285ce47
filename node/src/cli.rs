//! The `tiersync` command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::config;
use crate::deployment;
use crate::store::Store;
use crate::writer::Writer;

/// tiersync: multi-tier CRM data sync (city → province → national).
#[derive(Debug, Parser)]
#[command(name = "tiersync", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TIERSYNC_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Run {
        /// The node's config file.
        #[arg(long, short, env = "TIERSYNC_CONFIG")]
        config: PathBuf,
    },
    /// Work with config files.
    Config {
        /// What to do with them.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a deployment's topology as a tree.
    Topology {
        /// Every node file of the deployment.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
    },
}

/// `tiersync config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a whole deployment: each file, then the rules across files.
    Check {
        /// Every node file of the deployment.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Sets up logging; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the parsed command.
pub fn main(cli: Cli) -> Result<()> {
    init_logging(cli.log_format);
    match cli.command {
        Command::Run { config } => run(config),
        Command::Config {
            command: ConfigCommand::Check { files },
        } => check(&files),
        Command::Topology { files, json } => topology(&files, json),
    }
}

fn load_all(files: &[PathBuf]) -> Result<Vec<config::Loaded>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match config::load(f) {
            Ok(l) => loaded.push(l),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("{} file(s) refused:\n  {}", errors.len(), errors.join("\n  "));
    }
    Ok(loaded)
}

fn check(files: &[PathBuf]) -> Result<()> {
    let loaded = load_all(files)?;
    let problems = deployment::check(&loaded);
    if !problems.is_empty() {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        bail!("{} problem(s) in the deployment:\n  {}", problems.len(), lines.join("\n  "));
    }
    let digest = loaded.first().map(|l| l.policy.digest_hex()).unwrap_or_default();
    println!("ok: {} node(s), policy digest {}", loaded.len(), &digest[..digest.len().min(16)]);
    Ok(())
}

fn topology(files: &[PathBuf], json: bool) -> Result<()> {
    let loaded = load_all(files)?;
    let tree = deployment::tree(&loaded);
    if json {
        let nodes: Vec<serde_json::Value> = tree
            .iter()
            .map(|(depth, l)| {
                serde_json::json!({
                    "id": l.config.node.id.as_str(),
                    "tier": l.config.node.tier.as_str(),
                    "depth": depth,
                    "parent": l.config.parent.as_ref().map(|p| p.id.as_str()),
                    "children": l.config.children.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                    "peer": l.config.listen.peer.to_string(),
                    "api": l.config.listen.api.to_string(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        for (depth, l) in tree {
            println!(
                "{}{} ({}) peer {} api {}",
                "  ".repeat(depth),
                l.config.node.id,
                l.config.node.tier,
                l.config.listen.peer,
                l.config.listen.api
            );
        }
    }
    Ok(())
}

fn run(config_path: PathBuf) -> Result<()> {
    let loaded = config::load(&config_path)?;
    let cfg = &loaded.config;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let store = Arc::new(
        Store::open(&cfg.node.data_dir, cfg.node.id.clone(), loaded.policy.clone(), cfg.storage.durability)
            .with_context(|| format!("opening the store in {}", cfg.node.data_dir.display()))?,
    );
    let (writer, writer_thread) = Writer::spawn(store.clone(), 4096).context("starting the writer thread")?;
    tracing::info!(
        node = %cfg.node.id,
        tier = %cfg.node.tier,
        policy = %&loaded.policy.digest_hex()[..16],
        last_seq = store.last_seq()?,
        "node started"
    );
    rt.block_on(shutdown_signal())?;
    tracing::info!("shutting down");
    drop(writer);
    writer_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    store.flush().context("flushing the store")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
