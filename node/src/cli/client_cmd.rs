//! The client commands: each talks to one node's HTTP API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value as Json, json};

use super::import::{ImportFormatArg, import};
use super::output::{json_argument, print_out, table};
use super::views::{customer_text, item_text, scan_text, status_text, write_result_text};
use crate::client::{self, Client, ScanQuery};

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Read one item: its fields, with the origin node and time of each.
    Get {
        /// The category (as declared in the policy).
        category: String,
        /// The item's key.
        key: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Replace a record, or append a log entry.
    Put {
        /// The category.
        category: String,
        /// The item's key.
        key: String,
        /// The whole document as a JSON object, or `-` to read it from stdin.
        document: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Merge fields into a record (a `null` value removes the field).
    Patch {
        /// The category (a `record` category).
        category: String,
        /// The item's key.
        key: String,
        /// The fields to change as a JSON object, or `-` to read it from stdin.
        fields: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Delete a record.
    Delete {
        /// The category (a `record` category).
        category: String,
        /// The item's key.
        key: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List a category's items in key order, as a table.
    Scan {
        /// The category.
        category: String,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Start after this key (the `next` of a previous page).
        #[arg(long)]
        after: Option<String>,
        /// Page size, 1 to 1000 [default: 100, or 1000 with --all].
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: Option<u16>,
        /// Follow `next` to the last page (with --json: one object holding
        /// every item).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// The unified customer view: the customer and its items per category.
    Customer {
        /// The customer id (the key of its `customer` record).
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Query an aggregate (grouped counts and sums), or list them without a
    /// name.
    Query {
        /// The aggregate's name (omit to list the declared aggregates).
        aggregate: Option<String>,
        /// Comma-separated dimensions to group by (a subset; empty for one total).
        #[arg(long)]
        group_by: Option<String>,
        /// Comma-separated `dimension:value` filters.
        #[arg(long)]
        filter: Option<String>,
        /// Only rows of this child's subtree (national → province → city).
        #[arg(long)]
        drill: Option<String>,
        /// Print CSV.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// The conflict ledger: log keys two nodes wrote with different content
    /// (the version lost and the version kept), and record fields one
    /// origin's newer value took over from another's.
    Conflicts(super::conflicts::ConflictsArgs),
    /// API tokens of a node: create, list, revoke (with an admin token).
    Token {
        /// What to do.
        #[command(subcommand)]
        command: super::token::TokenCommand,
    },
    /// The node's status: tier, version, policy, links, counts, watermarks.
    Status {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Bulk-write a CSV or NDJSON file into a category; prints a summary
    /// and exits with status 1 if any line was rejected.
    Import {
        /// The category to write into.
        #[arg(long)]
        category: String,
        /// The file: `.csv`, `.ndjson` or `.jsonl` (else use --format); `-`
        /// reads stdin.
        file: PathBuf,
        /// The file's format [default: from the file's extension].
        #[arg(long, value_enum)]
        format: Option<ImportFormatArg>,
        /// CSV only: the column holding the item key [default: key].
        #[arg(long, value_name = "NAME")]
        key_column: Option<String>,
        /// Lines per request.
        #[arg(long, default_value_t = 1000, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        chunk_lines: u32,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// Options of every client command.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// The node's API base URL [default: from --config, else
    /// $TIERSYNC_NODE, else http://127.0.0.1:8411].
    #[arg(long, value_name = "URL")]
    pub node: Option<String>,
    /// A node file: talk to its `[listen] api` address.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The bearer token [default: --token-file, else $TIERSYNC_TOKEN].
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file holding the bearer token (e.g. a node's first
    /// `<data_dir>/admin.token`).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The deployment CA certificate an `https://` node's certificate must
    /// chain to [default: $TIERSYNC_CA, else the `[tls] ca` of --config].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,
    /// Print the API's JSON instead of the human view.
    #[arg(long)]
    pub json: bool,
}

impl ClientOpts {
    pub(super) fn client(&self) -> Result<Client> {
        let url = client::resolve_base_url(self.node.as_deref(), self.config.as_deref())?;
        let mut credentials = client::Credentials::resolve(
            self.token.as_deref(),
            self.token_file.as_deref(),
            self.ca.as_deref(),
        )?;
        if credentials.ca.is_none()
            && let Some(file) = &self.config
        {
            credentials.ca = client::ca_from_config(file)?;
        }
        Ok(Client::with_credentials(
            &url,
            Duration::from_secs(self.timeout.max(1)),
            &credentials,
        )?)
    }
}

// ------------------------------------------------------------ client commands

pub(super) fn client_command(command: ClientCommand) -> Result<()> {
    match command {
        ClientCommand::Get {
            category,
            key,
            opts,
        } => {
            let item = opts.client()?.get(&category, &key)?;
            emit(&opts, &item, || item_text(&item))
        }
        ClientCommand::Put {
            category,
            key,
            document,
            opts,
        } => {
            let body = json_argument(&document)?;
            let r = opts.client()?.put(&category, &key, &body)?;
            emit(&opts, &r, || write_result_text(&r))
        }
        ClientCommand::Patch {
            category,
            key,
            fields,
            opts,
        } => {
            let body = json_argument(&fields)?;
            let r = opts.client()?.patch(&category, &key, &body)?;
            emit(&opts, &r, || write_result_text(&r))
        }
        ClientCommand::Delete {
            category,
            key,
            opts,
        } => {
            let r = opts.client()?.delete(&category, &key)?;
            emit(&opts, &r, || write_result_text(&r))
        }
        ClientCommand::Scan {
            category,
            prefix,
            after,
            limit,
            all,
            opts,
        } => scan(&opts, category, prefix, after, limit, all),
        ClientCommand::Customer { id, opts } => {
            let view = opts.client()?.customer(&id)?;
            emit(&opts, &view, || customer_text(&view))
        }
        ClientCommand::Query {
            aggregate: None,
            opts,
            ..
        } => {
            let list = opts.client()?.aggregates()?;
            emit(&opts, &list, || {
                let mut t = table(&["aggregate", "source", "replicate", "group by", "measures"]);
                for a in list.as_array().into_iter().flatten() {
                    let join = |k: &str| {
                        a[k].as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    t.add_row([
                        a["name"].as_str().unwrap_or(""),
                        a["source"].as_str().unwrap_or(""),
                        a["replicate"].as_str().unwrap_or(""),
                        &join("group_by"),
                        &join("measures"),
                    ]);
                }
                format!("{t}\n")
            })
        }
        ClientCommand::Query {
            aggregate: Some(name),
            group_by,
            filter,
            drill,
            csv,
            opts,
        } => {
            let body = opts.client()?.aggregate(
                &name,
                group_by.as_deref(),
                filter.as_deref(),
                drill.as_deref(),
            )?;
            let result: crate::api::AggregateResult = serde_json::from_value(body.clone())
                .context("the node answered an unexpected aggregate shape")?;
            if csv {
                return print_out(&crate::api::aggregate_csv(&result));
            }
            emit(&opts, &body, || {
                let header: Vec<&str> = result
                    .group_by
                    .iter()
                    .chain(&result.measures)
                    .map(String::as_str)
                    .collect();
                let mut t = table(&header);
                for row in &result.rows {
                    let mut cells: Vec<String> = result
                        .group_by
                        .iter()
                        .map(|g| {
                            row.group
                                .get(g)
                                .cloned()
                                .flatten()
                                .unwrap_or_else(|| "-".into())
                        })
                        .collect();
                    cells.extend(
                        result
                            .measures
                            .iter()
                            .map(|m| row.values.get(m).map(|v| v.to_string()).unwrap_or_default()),
                    );
                    t.add_row(cells);
                }
                format!("{}\n{t}\n{} row(s)\n", result.aggregate, result.rows.len())
            })
        }
        ClientCommand::Conflicts(args) => super::conflicts::run(args),
        ClientCommand::Token { command } => super::token::run(command),
        ClientCommand::Status { opts } => {
            let status = opts.client()?.status()?;
            emit(&opts, &status, || status_text(&status))
        }
        ClientCommand::Import {
            category,
            file,
            format,
            key_column,
            chunk_lines,
            opts,
        } => import(
            &opts,
            &category,
            &file,
            format,
            key_column.as_deref(),
            chunk_lines,
        ),
    }
}

/// Prints the API's JSON with `--json`, else the human view.
pub(super) fn emit(opts: &ClientOpts, body: &Json, human: impl FnOnce() -> String) -> Result<()> {
    if opts.json {
        print_out(&format!("{}\n", serde_json::to_string_pretty(body)?))
    } else {
        print_out(&human())
    }
}

fn scan(
    opts: &ClientOpts,
    category: String,
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<u16>,
    all: bool,
) -> Result<()> {
    let client = opts.client()?;
    let default_limit = if all { 1000 } else { 100 };
    let mut q = ScanQuery {
        prefix,
        after,
        limit: Some(limit.map_or(default_limit, usize::from)),
    };
    let mut page = client.scan(&category, &q)?;
    if !all {
        let items = page["items"].as_array().cloned().unwrap_or_default();
        return emit(opts, &page, || scan_text(&category, &items, &page["next"]));
    }
    let mut items = Vec::new();
    loop {
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            // A `next` that does not move on would loop forever.
            Some(next) if q.after.as_deref() != Some(next) => {
                q.after = Some(next.to_string());
                page = client.scan(&category, &q)?;
            }
            _ => break,
        }
    }
    let whole = json!({"category": category, "items": items, "next": null});
    emit(opts, &whole, || scan_text(&category, &items, &Json::Null))
}
