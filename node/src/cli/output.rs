//! Writing to stdout, and the table and cell helpers of the human views.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::Value as Json;

/// Writes `text` to stdout (an error, e.g. a closed pipe, is reported
/// rather than a panic).
pub(super) fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// A JSON document argument: the text itself, or stdin for `-`. It is sent
/// as is; the node validates it.
pub(super) fn json_argument(arg: &str) -> Result<String> {
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
pub(super) fn cell(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => "-".to_string(),
        other => other.to_string(),
    }
}

pub(super) fn str_of<'a>(v: &'a Json, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}
