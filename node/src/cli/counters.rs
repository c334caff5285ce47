//! `tiersync counters reset`: a node's private aggregate counters set again
//! from its own data (offline: the node must be stopped).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

/// `tiersync counters` subcommands.
#[derive(Debug, Subcommand)]
pub enum CountersCommand {
    /// Set this node's share of every private aggregate's counters to what
    /// its own data adds up to, each with a fresh version, so that the new
    /// shares replace whatever the tree holds for this node. Run it with
    /// the node stopped; the shares travel up once it runs again.
    Reset {
        /// The node's config file.
        #[arg(long, short, env = "TIERSYNC_CONFIG")]
        config: PathBuf,
    },
}

/// Runs a `tiersync counters` subcommand.
pub fn run(command: CountersCommand) -> Result<()> {
    match command {
        CountersCommand::Reset { config } => {
            let loaded = crate::config::load(&config)
                .with_context(|| format!("loading {}", config.display()))?;
            let store = crate::node::open_store(&loaded.config, loaded.policy.clone())?;
            let written = store
                .reset_counters()
                .context("resetting the counters from this node's data")?;
            println!(
                "{}: {written} counters of private aggregates set from this node's own data; they replace this node's shares up the tree once it runs again",
                loaded.config.node.id
            );
            Ok(())
        }
    }
}
