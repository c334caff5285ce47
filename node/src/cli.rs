//! The `tiersync` command line.

mod conflicts;

use std::collections::BTreeSet;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::{Value as Json, json};
use tiersync_protocol::{NodeId, Tier};

use crate::certs;
use crate::client::{self, Chunker, Client, ImportEvent, ImportFormat, LineError, ScanQuery};
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
    /// Run a whole deployment on this machine with synthetic CRM data.
    Demo(crate::demo::DemoArgs),
    /// Client commands against a running node's HTTP API.
    #[command(flatten)]
    Client(ClientCommand),
}

/// Client commands: each talks to one node's HTTP API.
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
    Conflicts(conflicts::ConflictsArgs),
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
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,
    /// Print the API's JSON instead of the human view.
    #[arg(long)]
    pub json: bool,
}

impl ClientOpts {
    fn client(&self) -> Result<Client> {
        let url = client::resolve_base_url(self.node.as_deref(), self.config.as_deref())?;
        Ok(Client::new(&url, Duration::from_secs(self.timeout.max(1)))?)
    }
}

/// `tiersync import --format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImportFormatArg {
    /// Header row of field names, one item per row.
    Csv,
    /// One `{"key": …, "fields": {…}}` per line.
    Ndjson,
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
        Command::Demo(args) => {
            if crate::demo::run(&args)? {
                Ok(())
            } else {
                bail!("the demo did not converge")
            }
        }
        Command::Client(command) => client_command(command),
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
    crate::failpoints::setup_from_env()?;
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
        // After a failed WAL sync the store takes no more writes; the node
        // exits so that its supervisor restarts it and RocksDB recovers
        // from the WAL (fail-stop, as PostgreSQL does after "fsyncgate").
        let store = node.store.clone();
        let stopped = async move {
            loop {
                if let Some(why) = store.stopped() {
                    return why.to_string();
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            r = shutdown_signal() => r?,
            why = stopped => {
                tracing::error!(error = %why, "a WAL sync failed: stopping; restart the node to recover from its WAL");
                if let Err(e) = node.shutdown().await {
                    tracing::warn!(error = %e, "shutdown after the failed sync");
                }
                anyhow::bail!("a WAL sync failed ({why}); the node stopped without acknowledging anything after it");
            }
        }
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

// ------------------------------------------------------------ client commands

fn client_command(command: ClientCommand) -> Result<()> {
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
        ClientCommand::Conflicts(args) => conflicts::run(args),
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

/// Writes `text` to stdout (an error, e.g. a closed pipe, is reported
/// rather than a panic).
fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Prints the API's JSON with `--json`, else the human view.
fn emit(opts: &ClientOpts, body: &Json, human: impl FnOnce() -> String) -> Result<()> {
    if opts.json {
        print_out(&format!("{}\n", serde_json::to_string_pretty(body)?))
    } else {
        print_out(&human())
    }
}

/// A JSON document argument: the text itself, or stdin for `-`. It is sent
/// as is; the node validates it.
fn json_argument(arg: &str) -> Result<String> {
    if arg != "-" {
        return Ok(arg.to_string());
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the document from stdin")?;
    Ok(text)
}

/// A field value for a table cell: text as is, anything else as JSON.
fn cell(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn str_of<'a>(v: &'a Json, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

/// `2024-04-05T19:34:38.901Z by hangzhou` from a stamp view.
fn stamp_text(stamp: &Json) -> String {
    if stamp.is_null() {
        return "-".to_string();
    }
    format!("{} by {}", str_of(stamp, "time"), str_of(stamp, "origin"))
}

/// The fields of an item view with their origin and time.
fn fields_table(item: &Json) -> String {
    let Some(fields) = item["fields"].as_object().filter(|f| !f.is_empty()) else {
        return "(no fields)\n".to_string();
    };
    let mut t = table(&["field", "value", "origin", "written"]);
    for (name, value) in fields {
        let stamp = &item["meta"]["fields"][name];
        t.add_row(vec![
            name.clone(),
            cell(value),
            str_of(stamp, "origin").to_string(),
            str_of(stamp, "time").to_string(),
        ]);
    }
    format!("{t}\n")
}

/// `tiersync get`: the item's key, kind, last change and fields.
fn item_text(item: &Json) -> String {
    let mut out = format!(
        "{}/{} ({})\nupdated {}\n",
        str_of(item, "category"),
        str_of(item, "key"),
        str_of(item, "kind"),
        stamp_text(&item["meta"]["updated"]),
    );
    let base = &item["meta"]["base"];
    if !base.is_null() {
        out += &format!("last {} {}\n", str_of(base, "op"), stamp_text(base));
    }
    out + &fields_table(item)
}

/// `tiersync put/patch/delete`: what happened.
fn write_result_text(r: &Json) -> String {
    let target = format!("{}/{}", str_of(r, "category"), str_of(r, "key"));
    let op = str_of(r, "op");
    if r["changed"] == json!(false) {
        return format!(
            "{op} {target}: unchanged (the same entry exists, {})\n",
            stamp_text(&r["stamp"])
        );
    }
    format!(
        "{op} {target}: done, seq {} (hlc {}, {})\n",
        cell(&r["seq"]),
        str_of(&r["stamp"], "hlc"),
        stamp_text(&r["stamp"])
    )
}

/// Items as a table: key, every field seen (sorted), origin of the last
/// change.
fn items_table(items: &[Json]) -> String {
    let names: BTreeSet<&str> = items
        .iter()
        .filter_map(|i| i["fields"].as_object())
        .flat_map(|f| f.keys().map(String::as_str))
        .collect();
    let mut header = vec!["key"];
    header.extend(names.iter().copied());
    header.push("origin");
    let mut t = table(&header);
    for item in items {
        let mut row = vec![str_of(item, "key").to_string()];
        row.extend(names.iter().map(|n| match item["fields"].get(*n) {
            Some(v) => cell(v),
            None => String::new(),
        }));
        row.push(str_of(&item["meta"]["updated"], "origin").to_string());
        t.add_row(row);
    }
    format!("{t}\n")
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

fn scan_text(category: &str, items: &[Json], next: &Json) -> String {
    if items.is_empty() {
        return format!("{category}: no items\n");
    }
    let mut out = items_table(items);
    out += &format!("{} item(s)", items.len());
    if let Some(next) = next.as_str() {
        out += &format!("; more after {next:?} (--after {next:?}, or --all)");
    }
    out + "\n"
}

/// `tiersync customer`: the customer record, then each linked category.
fn customer_text(view: &Json) -> String {
    let id = str_of(view, "id");
    let mut out = format!("customer {id}\n");
    let customer = &view["customer"];
    if customer.is_null() {
        out += "no customer record on this node\n";
    } else {
        out += &format!("updated {}\n", stamp_text(&customer["meta"]["updated"]));
        out += &fields_table(customer);
    }
    if let Some(related) = view["related"].as_object() {
        for (category, rel) in related {
            let items = rel["items"].as_array().cloned().unwrap_or_default();
            let link = match (
                rel["link"]["field"].as_str(),
                rel["link"]["key_prefix"].as_str(),
            ) {
                (Some(f), _) => format!("field {f}"),
                (_, Some(sep)) => format!("key prefix \"{id}{sep}\""),
                _ => rel["link"].to_string(),
            };
            out += &format!("\n{category}: {} item(s), linked by {link}", items.len());
            if rel["truncated"] == json!(true) {
                out += " (only the first are listed)";
            }
            out += "\n";
            if !items.is_empty() {
                out += &items_table(&items);
            }
        }
    }
    out
}

/// `tiersync status`.
fn status_text(s: &Json) -> String {
    let digest = str_of(s, "policy_digest");
    let mut out = format!(
        "node        {} ({})\nversion     tiersync {}\npolicy      {}\nlast seq    {}\n",
        str_of(s, "node_id"),
        str_of(s, "tier"),
        str_of(s, "version"),
        &digest[..digest.len().min(12)],
        cell(&s["last_seq"]),
    );
    let links = &s["links"];
    let parent = &links["parent"];
    if parent.is_null() {
        out += "parent      none\n";
    } else {
        out += &format!(
            "parent      {} at {}: {}, lag {} record(s) / {:.1} s, acked seq {}, last error: {}\n",
            str_of(parent, "parent"),
            str_of(parent, "addr"),
            str_of(parent, "state"),
            cell(&parent["lag_records"]),
            parent["lag_seconds"].as_f64().unwrap_or(0.0),
            cell(&parent["acked_seq"]),
            parent["last_error"].as_str().unwrap_or("none"),
        );
    }
    match links["children"].as_object().filter(|c| !c.is_empty()) {
        None => out += "children    none\n",
        Some(children) => {
            let mut t = table(&["child", "connected", "cursor", "items", "last error"]);
            for (id, c) in children {
                t.add_row(vec![
                    id.clone(),
                    if c["connected"] == json!(true) {
                        "yes"
                    } else {
                        "no"
                    }
                    .to_string(),
                    cell(&c["cursor"]),
                    cell(&c["items"]),
                    c["last_error"].as_str().unwrap_or("").to_string(),
                ]);
            }
            out += &format!("children\n{t}\n");
        }
    }
    let mut t = table(&["category", "kind", "replicate", "items"]);
    if let Some(categories) = s["categories"].as_object() {
        for (name, c) in categories {
            t.add_row(vec![
                name.clone(),
                str_of(c, "kind").to_string(),
                str_of(c, "replicate").to_string(),
                cell(&c["items"]),
            ]);
        }
    }
    out += &format!("categories\n{t}\n");
    match links["watermarks"].as_object().filter(|w| !w.is_empty()) {
        None => out += "watermarks  none\n",
        Some(marks) => {
            let mut t = table(&["origin", "seq", "complete up to"]);
            for (origin, w) in marks {
                let upto = w["complete_up_to_ms"]
                    .as_u64()
                    .map_or_else(|| "-".to_string(), crate::json::format_time_ms);
                t.add_row(vec![origin.clone(), cell(&w["seq"]), upto]);
            }
            out += &format!("watermarks\n{t}\n");
        }
    }
    out
}

// ------------------------------------------------------------------ import

/// Most rejected lines kept for the summary (all are counted).
const MAX_KEPT_ERRORS: usize = 1000;
/// Rejected lines listed by the human summary.
const SHOWN_ERRORS: usize = 10;
/// A request body is sent once it reaches this size, whatever its lines.
const MAX_CHUNK_BYTES: usize = 4 << 20;

/// The outcome of an import, in input-file line numbers.
#[derive(Debug, Default, serde::Serialize)]
struct ImportSummary {
    file: String,
    category: String,
    format: &'static str,
    lines: usize,
    written: usize,
    unchanged: usize,
    rejected: usize,
    errors: Vec<LineError>,
    errors_truncated: bool,
}

impl ImportSummary {
    fn reject(&mut self, e: LineError) {
        self.rejected += 1;
        if self.errors.len() < MAX_KEPT_ERRORS {
            self.errors.push(e);
        } else {
            self.errors_truncated = true;
        }
    }

    fn text(&self) -> String {
        let mut out = format!(
            "{} → {}: {} line(s) read, {} written, {} unchanged, {} rejected\n",
            self.file, self.category, self.lines, self.written, self.unchanged, self.rejected
        );
        for e in self.errors.iter().take(SHOWN_ERRORS) {
            let key = e
                .key
                .as_ref()
                .map(|k| format!(" (key {k:?})"))
                .unwrap_or_default();
            out += &format!(
                "  line {}{key}: {}: {}\n",
                e.line, e.error.code, e.error.message
            );
        }
        if self.rejected > SHOWN_ERRORS {
            out += &format!(
                "  … and {} more rejected line(s) (--json lists up to {MAX_KEPT_ERRORS})\n",
                self.rejected - SHOWN_ERRORS
            );
        }
        out
    }
}

fn import(
    opts: &ClientOpts,
    category: &str,
    file: &Path,
    format: Option<ImportFormatArg>,
    key_column: Option<&str>,
    chunk_lines: u32,
) -> Result<()> {
    let format = match format {
        Some(ImportFormatArg::Csv) => ImportFormat::Csv,
        Some(ImportFormatArg::Ndjson) => ImportFormat::Ndjson,
        None => ImportFormat::from_path(file).with_context(|| {
            format!(
                "{}: cannot tell the format from the name (.csv, .ndjson, .jsonl); use --format",
                file.display()
            )
        })?,
    };
    let (input, total): (Box<dyn Read>, Option<u64>) = if file == Path::new("-") {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(file)
            .with_context(|| format!("{}: cannot open", file.display()))?;
        let len = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        (Box::new(f), len)
    };
    let client = opts.client()?;
    // Fail fast on an unknown category or an unreachable node, before
    // reading the file.
    client.scan(
        category,
        &ScanQuery {
            limit: Some(1),
            ..ScanQuery::default()
        },
    )?;
    let max_lines = usize::try_from(chunk_lines).unwrap_or(1000);
    let mut chunker = Chunker::new(input, format, key_column, max_lines, MAX_CHUNK_BYTES)
        .with_context(|| file.display().to_string())?;
    let bar = progress_bar(total);
    let mut summary = ImportSummary {
        file: file.display().to_string(),
        category: category.to_string(),
        format: format.as_str(),
        ..ImportSummary::default()
    };
    let outcome = import_chunks(&client, category, &mut chunker, &mut summary, &bar);
    bar.finish_and_clear();
    summary.lines = chunker.items_read;
    if opts.json {
        print_out(&format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
    } else {
        print_out(&summary.text())?;
    }
    outcome.with_context(|| {
        format!(
            "import stopped after {} line(s) of {}",
            summary.lines,
            file.display()
        )
    })?;
    if summary.rejected > 0 {
        bail!("{} of {} line(s) rejected", summary.rejected, summary.lines);
    }
    Ok(())
}

/// Sends every chunk, adding the node's reports (line numbers mapped to the
/// file) and the locally rejected lines to `summary`.
fn import_chunks(
    client: &Client,
    category: &str,
    chunker: &mut Chunker,
    summary: &mut ImportSummary,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    while let Some(event) = chunker.next_event()? {
        match event {
            ImportEvent::Rejected(e) => summary.reject(e),
            ImportEvent::Chunk(chunk) => {
                let report = client.bulk(category, &chunk.body)?;
                summary.written += report.written;
                summary.unchanged += report.unchanged;
                // Lines the node rejected beyond those it listed.
                let unlisted = report.rejected.saturating_sub(report.errors.len());
                for mut e in report.errors {
                    e.line = chunk.file_line(e.line).unwrap_or(0);
                    summary.reject(e);
                }
                if unlisted > 0 {
                    summary.rejected += unlisted;
                    summary.errors_truncated = true;
                }
            }
        }
        bar.set_position(chunker.bytes_read());
        bar.set_message(format!(
            "{} lines, {} rejected",
            chunker.items_read, summary.rejected
        ));
    }
    summary.errors.sort_by_key(|e| e.line);
    Ok(())
}

/// A progress bar on stderr when it is a terminal, else a hidden one.
fn progress_bar(total: Option<u64>) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
