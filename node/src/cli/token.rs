//! `tiersync token create|list|revoke`: a node's API tokens, through its
//! API with an admin token.

use anyhow::Result;
use clap::Subcommand;

use super::ClientOpts;
use super::client_cmd::emit;
use super::output::{print_out, table};
use crate::client::TokenInfo;
use crate::store::Role;

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (once: the node keeps only its hash).
    Create {
        /// `operator` (a city's apps and staff: read and write every
        /// category), `analyst` (HQ: shared categories, customer view,
        /// aggregates) or `admin` (status, tokens, metrics).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Who will hold it (shown in the audit log).
        #[arg(long)]
        name: String,
        /// Only these categories (comma-separated) [default: all the role allows].
        #[arg(long, value_delimiter = ',', value_name = "CATEGORY,…")]
        categories: Option<Vec<String>>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List the node's tokens (ids, names, roles; never the secrets).
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Revoke a token: its next request is refused (401).
    Revoke {
        /// The token's id (as `list` shows it).
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

fn time(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), crate::json::format_time_ms)
}

fn rows(tokens: &[TokenInfo]) -> String {
    let mut t = table(&["id", "name", "role", "categories", "created", "revoked"]);
    for k in tokens {
        t.add_row(vec![
            k.id.clone(),
            k.name.clone(),
            k.role.clone(),
            k.categories.as_ref().map_or("-".into(), |c| c.join(",")),
            time(Some(k.created_ms)),
            time(k.revoked_ms),
        ]);
    }
    format!("{t}\n")
}

/// Runs a token command.
pub fn run(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            role,
            name,
            categories,
            opts,
        } => {
            let created =
                opts.client()?
                    .token_create(&name, role.as_str(), categories.as_deref())?;
            emit(&opts, &created, || {
                format!(
                    "{}\n\nid {} · name {} · role {} — this is the only time the token is shown; \
                     use it as: curl -H \"Authorization: Bearer $TOKEN\" … or TIERSYNC_TOKEN=… tiersync …\n",
                    created["token"].as_str().unwrap_or_default(),
                    created["id"].as_str().unwrap_or_default(),
                    created["name"].as_str().unwrap_or_default(),
                    created["role"].as_str().unwrap_or_default(),
                )
            })
        }
        TokenCommand::List { opts } => {
            let tokens = opts.client()?.tokens()?;
            if opts.json {
                return print_out(&format!("{}\n", serde_json::to_string_pretty(&tokens)?));
            }
            print_out(&rows(&tokens))
        }
        TokenCommand::Revoke { id, opts } => {
            let t = opts.client()?.token_revoke(&id)?;
            if opts.json {
                return print_out(&format!("{}\n", serde_json::to_string_pretty(&t)?));
            }
            print_out(&format!(
                "revoked token {} ({}, {}) at {}\n",
                t.id,
                t.name,
                t.role,
                time(t.revoked_ms)
            ))
        }
    }
}
