//! The `tiersync` command line: one module per command group.
//!
//! `deploy` (config check, topology, certs), `run` (a node, its signals and
//! `reload`), `client_cmd` (the client commands, their human views in
//! `views` and `import`), `output` (stdout, tables). Submodules use each
//! other, never this one, so there is no import circle.

mod client_cmd;
mod conflicts;
mod counters;
mod deploy;
mod import;
mod output;
mod run;
mod token;
mod views;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

pub use client_cmd::{ClientCommand, ClientOpts};
pub use deploy::{CertsCommand, ConfigCommand};
pub use import::ImportFormatArg;
pub use run::shutdown_signal;

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
    /// Make a running node re-read its node file, policy and certificates
    /// (as SIGHUP does), and print the outcome. Runs on the node's host.
    Reload {
        #[command(flatten)]
        opts: ClientOpts,
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
    /// Private aggregates' counters of this node (offline).
    Counters {
        /// What to do.
        #[command(subcommand)]
        command: counters::CountersCommand,
    },
    /// Run a whole deployment on this machine with synthetic CRM data.
    Demo(crate::demo::DemoArgs),
    /// Client commands against a running node's HTTP API.
    #[command(flatten)]
    Client(ClientCommand),
}

/// The filter handle of the logging set up by [`init_logging`]: a reload
/// changes the level through it.
pub type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Sets up logging on stderr; `RUST_LOG` filters (default `info`). Colours
/// only when stderr is a terminal, so files and pipes get plain text.
pub fn init_logging(format: LogFormat) -> Option<LogHandle> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    installed.ok().map(|()| handle)
}

/// An error and its causes on one line, each cause once: a cause whose text
/// the line already holds (an OS error a message quotes) is left out. An
/// unreachable node gets a hint on choosing another.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    let unreachable = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::client::ClientError>(),
            Some(crate::client::ClientError::Transport { .. })
        )
    });
    if unreachable {
        text.push_str(
            " (is the node running there? choose the node with --node URL, --config FILE or the TIERSYNC_NODE variable)",
        );
    }
    text
}

/// Runs the parsed command.
pub fn main(cli: Cli) -> Result<()> {
    let log = init_logging(cli.log_format);
    match cli.command {
        Command::Run { config } => run::run(config, log.as_ref()),
        Command::Reload { opts } => run::reload_command(&opts),
        Command::Config {
            command: ConfigCommand::Check { files },
        } => deploy::check(&files),
        Command::Topology { files, json } => deploy::topology(&files, json),
        Command::Certs { command } => deploy::certs_command(command),
        Command::Counters { command } => counters::run(command),
        Command::Demo(args) => {
            if crate::demo::run(&args)? {
                Ok(())
            } else {
                bail!("the demo did not converge")
            }
        }
        Command::Client(command) => client_cmd::client_command(command),
    }
}
