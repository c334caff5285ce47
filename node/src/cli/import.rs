//! `tiersync import`: a CSV or NDJSON file into a category, in chunks.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

use super::client_cmd::ClientOpts;
use super::output::print_out;
use crate::client::{Chunker, Client, ImportEvent, ImportFormat, LineError, ScanQuery};

/// `tiersync import --format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImportFormatArg {
    /// Header row of field names, one item per row.
    Csv,
    /// One `{"key": …, "fields": {…}}` per line.
    Ndjson,
}

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
    /// Wall time of the import, in seconds.
    seconds: f64,
    /// Lines read per second.
    lines_per_second: f64,
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
            "{} → {}: {} line(s) read, {} written, {} unchanged, {} rejected in {:.1} s ({:.0} lines/s)\n",
            self.file,
            self.category,
            self.lines,
            self.written,
            self.unchanged,
            self.rejected,
            self.seconds,
            self.lines_per_second
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

pub(super) fn import(
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
    let started = std::time::Instant::now();
    let mut summary = ImportSummary {
        file: file.display().to_string(),
        category: category.to_string(),
        format: format.as_str(),
        ..ImportSummary::default()
    };
    let outcome = import_chunks(&client, category, &mut chunker, &mut summary, &bar);
    bar.finish_and_clear();
    summary.lines = chunker.items_read;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.lines_per_second = summary.lines as f64 / summary.seconds.max(1e-3);
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
        let secs = bar.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{} lines ({:.0}/s), {} rejected",
            chunker.items_read,
            chunker.items_read as f64 / secs,
            summary.rejected
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
                    "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {bytes} {binary_bytes_per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
