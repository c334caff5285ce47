//! The `tiersync` command line.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tiersync_protocol::{NodeId, Tier};

use crate::certs;
use crate::config;
use crate::deployment;

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
    /// Create the deployment CA and node certificates.
    Certs {
        /// What to do.
        #[command(subcommand)]
        command: CertsCommand,
    },
}

/// `tiersync certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a deployment CA: DIR/ca.pem and DIR/ca.key (never overwritten).
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue node certificates signed by the CA in DIR: DIR/<id>.pem and
    /// DIR/<id>.key (replaced if they exist).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days (capped at the CA's own expiry).
        #[arg(long, default_value_t = certs::DEFAULT_NODE_VALIDITY_DAYS)]
        days: u32,
        /// Also name this tier in the certificates (`tier.<tier>.tiersync`).
        #[arg(long, value_parser = parse_tier)]
        tier: Option<Tier>,
        /// Node ids to issue certificates for.
        #[arg(required = true, value_parser = parse_node_id)]
        ids: Vec<NodeId>,
    },
    /// Print a certificate's node id, tier, issuer and validity.
    Inspect {
        /// The certificate (PEM).
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_node_id(s: &str) -> Result<NodeId, String> {
    NodeId::new(s).map_err(|e| e.to_string())
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    [Tier::City, Tier::Province, Tier::National]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not a tier (city, province, national)"))
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
        Command::Certs { command } => certs_command(command),
    }
}

fn certs_command(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Init { dir } => {
            let files = certs::init_ca(&dir)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
            println!(
                "keep {} secret: it can issue certificates for any node",
                files.key.display()
            );
        }
        CertsCommand::Issue {
            dir,
            days,
            tier,
            ids,
        } => {
            for id in &ids {
                let files = certs::issue(&dir, id, tier, days)?;
                let info = certs::inspect(&files.cert)?;
                println!(
                    "{id}: wrote {} and {} (valid until {})",
                    files.cert.display(),
                    files.key.display(),
                    format_time(info.not_after)
                );
            }
        }
        CertsCommand::Inspect { file, json } => {
            let info = certs::inspect(&file)?;
            let now = i64::try_from(crate::now_ms() / 1000).unwrap_or(i64::MAX);
            let days_left = (info.not_after - now).div_euclid(86_400);
            if json {
                let value = serde_json::json!({
                    "node_id": info.node_id.as_ref().map(NodeId::as_str),
                    "tier": info.tier.map(Tier::as_str),
                    "subject": info.subject,
                    "issuer": info.issuer,
                    "is_ca": info.is_ca,
                    "not_before": info.not_before,
                    "not_after": info.not_after,
                    "days_left": days_left,
                    "expired": info.not_after <= now,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let id = info.node_id.as_ref().map_or("-", NodeId::as_str);
                println!(
                    "node id:    {id}{}",
                    if info.is_ca { " (CA certificate)" } else { "" }
                );
                println!("tier:       {}", info.tier.map_or("-", Tier::as_str));
                println!("subject:    {}", info.subject);
                println!("issuer:     {}", info.issuer);
                println!("not before: {}", format_time(info.not_before));
                let state = if info.not_after <= now {
                    "EXPIRED".to_string()
                } else {
                    format!("{days_left} days left")
                };
                println!("not after:  {} ({state})", format_time(info.not_after));
            }
        }
    }
    Ok(())
}

/// A Unix time as `Nov  5 12:00:00 2027 +00:00`.
fn format_time(secs: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_or_else(|_| format!("@{secs}"), |t| t.to_string())
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
        bail!(
            "{} file(s) refused:\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }
    Ok(loaded)
}

fn check(files: &[PathBuf]) -> Result<()> {
    let loaded = load_all(files)?;
    let problems = deployment::check(&loaded);
    if !problems.is_empty() {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        bail!(
            "{} problem(s) in the deployment:\n  {}",
            problems.len(),
            lines.join("\n  ")
        );
    }
    let digest = loaded
        .first()
        .map(|l| l.policy.digest_hex())
        .unwrap_or_default();
    println!(
        "ok: {} node(s), policy digest {}",
        loaded.len(),
        &digest[..digest.len().min(16)]
    );
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
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let node = crate::node::start(&loaded, Some(metrics)).await?;
        // Scripts and the demo read this line to find the bound addresses.
        println!(
            "ready api={} peer={}",
            node.api_addr,
            node.peer_addr.map(|a| a.to_string()).unwrap_or_default()
        );
        shutdown_signal().await?;
        tracing::info!("shutting down");
        node.shutdown().await?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
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
