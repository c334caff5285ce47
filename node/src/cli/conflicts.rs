//! `tiersync conflicts`: the conflict ledger and overwrite counts of a node.

use anyhow::Result;
use clap::Args;
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::Value as Json;

use super::ClientOpts;
use super::client_cmd::emit;
use crate::client::ConflictQuery;

/// `tiersync conflicts` arguments.
#[derive(Debug, Args)]
pub struct ConflictsArgs {
    /// Only this category (log: ledger entries; record: overwrites).
    #[arg(long)]
    category: Option<String>,
    /// Only conflicts in which this node wrote the losing or the current version.
    #[arg(long)]
    origin: Option<String>,
    /// Start after this entry id (the `next` printed by the previous page).
    #[arg(long)]
    after: Option<String>,
    /// Page size, 1 to 1000 [default: 100].
    #[arg(long)]
    limit: Option<usize>,
    #[command(flatten)]
    opts: ClientOpts,
}

/// Runs `tiersync conflicts`.
pub fn run(args: ConflictsArgs) -> Result<()> {
    let q = ConflictQuery {
        category: args.category,
        origin: args.origin,
        after: args.after,
        limit: args.limit,
    };
    let page = args.opts.client()?.conflicts(&q)?;
    emit(&args.opts, &page, || text(&page))
}

/// A version as `origin time {fields}`.
fn version(v: &Json) -> (String, String, String) {
    let stamp = |k: &str| v["stamp"][k].as_str().unwrap_or("-").to_string();
    (stamp("origin"), stamp("time"), v["fields"].to_string())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// The human view: one row per losing version with the version kept, then
/// the overwrite counts.
fn text(page: &Json) -> String {
    let empty = Vec::new();
    let conflicts = page["conflicts"].as_array().unwrap_or(&empty);
    let mut out = String::new();
    if conflicts.is_empty() {
        out.push_str("no conflicts\n");
    } else {
        let mut t = table(&[
            "category",
            "key",
            "lost",
            "lost at",
            "lost content",
            "kept",
            "kept content",
        ]);
        for c in conflicts {
            let (lo, lt, lf) = version(&c["loser"]);
            let (wo, _, wf) = match &c["winner"] {
                Json::Null => ("-".into(), String::new(), "(not here yet)".into()),
                w => version(w),
            };
            let s = |k: &str| c[k].as_str().unwrap_or("-").to_string();
            t.add_row(vec![s("category"), s("key"), lo, lt, lf, wo, wf]);
        }
        out.push_str(&format!("{t}\n{} conflict(s)\n", conflicts.len()));
        if let Some(next) = page["next"].as_str() {
            out.push_str(&format!("more: --after {next}\n"));
        }
    }
    let overwrites = page["overwrites"].as_array().unwrap_or(&empty);
    if !overwrites.is_empty() {
        let mut t = table(&["category", "winner", "overwrote", "fields", "latest"]);
        for o in overwrites {
            let latest = o["examples"]
                .as_array()
                .and_then(|e| e.last())
                .map(|e| {
                    format!(
                        "{}.{}",
                        e["key"].as_str().unwrap_or("-"),
                        e["field"].as_str().unwrap_or("-")
                    )
                })
                .unwrap_or_default();
            let s = |k: &str| o[k].as_str().unwrap_or("-").to_string();
            t.add_row(vec![
                s("category"),
                s("winner"),
                s("loser"),
                o["count"].to_string(),
                latest,
            ]);
        }
        out.push_str(&format!(
            "record fields overwritten by another origin:\n{t}\n"
        ));
    }
    out
}
