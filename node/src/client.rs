//! A small blocking client for a node's HTTP API (see [`crate::api`]), used
//! by the CLI's client commands (`tiersync get`, `put`, `scan`, `import`, …).
//!
//! Every method returns the API's JSON body, or a [`ClientError`]: an API
//! refusal keeps the API's `{"error": {"code", "message"}}` (it displays as
//! `code: message`), a network failure names the URL. Keys and customer ids
//! are percent-encoded into one path segment, so a key may hold `/`.
//!
//! The module also holds the pieces of `tiersync import` that do not print:
//! reading CSV and NDJSON files into NDJSON chunks whose lines remember
//! their line number in the input file ([`Chunker`]).

pub mod auth;
mod conflicts;
mod tokens;
pub use auth::Credentials;
pub use conflicts::ConflictQuery;
pub use tokens::TokenInfo;

use std::io::{BufRead, Read};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// The API address used when neither `--node`, `--config` nor
/// `TIERSYNC_NODE` says otherwise (the example Hangzhou node).
pub const DEFAULT_NODE: &str = "http://127.0.0.1:8411";
/// The environment variable naming the node's API base URL.
pub const NODE_ENV: &str = "TIERSYNC_NODE";
/// Largest response body read, in bytes.
const MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// Why a request did not produce the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node refused the request; `code` and `message` are the API's.
    #[error("{code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's machine-readable code (`unknown_category`, …).
        code: String,
        /// The API's message.
        message: String,
    },
    /// The node could not be reached, or the exchange broke off.
    #[error("cannot reach the node at {url}: {reason}")]
    Transport {
        /// The request URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The answer is not one the tiersync API gives (another server?).
    #[error("unexpected answer from {url}: HTTP {status}: {reason}")]
    Unexpected {
        /// The request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// What is wrong with it.
        reason: String,
    },
    /// The token or CA could not be read.
    #[error("credentials: {reason}")]
    Credentials {
        /// What is wrong.
        reason: String,
    },
    /// The base URL is not usable.
    #[error("invalid node URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it is refused.
        reason: String,
    },
}

impl ClientError {
    /// The API's error code, if the node refused the request.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The base URL of a node's API from a node file: `http://<listen.api>`
/// (`https://` with `[api] tls`), with an unspecified address (`0.0.0.0`,
/// `::`) replaced by loopback.
pub fn url_from_config(file: &Path) -> anyhow::Result<String> {
    let loaded = crate::config::load(file)?;
    let scheme = if loaded.config.api.tls {
        "https"
    } else {
        "http"
    };
    let mut addr = loaded.config.listen.api;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("{scheme}://{addr}"))
}

/// The CA of a node file's `[tls]` when its API speaks TLS.
pub fn ca_from_config(file: &Path) -> anyhow::Result<Option<std::path::PathBuf>> {
    let loaded = crate::config::load(file)?;
    Ok(match (&loaded.config.tls, loaded.config.api.tls) {
        (Some(t), true) => Some(t.ca.clone()),
        _ => None,
    })
}

/// The node's base URL: `node` if given, else from the node file `config`,
/// else `$TIERSYNC_NODE`, else [`DEFAULT_NODE`].
pub fn resolve_base_url(node: Option<&str>, config: Option<&Path>) -> anyhow::Result<String> {
    if let Some(url) = node {
        return Ok(url.to_string());
    }
    if let Some(file) = config {
        return url_from_config(file);
    }
    match std::env::var(NODE_ENV) {
        Ok(url) if !url.trim().is_empty() => Ok(url),
        _ => Ok(DEFAULT_NODE.to_string()),
    }
}

/// Percent-encodes `s` as one URL path segment or query value: everything
/// but `A-Z a-z 0-9 - . _ ~` (and a segment that is only dots) is encoded.
pub fn encode_component(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b == b'.') {
        return "%2E".repeat(s.len());
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Query of a prefix scan (`GET /v1/records/{category}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanQuery {
    /// Only keys starting with this.
    pub prefix: Option<String>,
    /// Start after this key (the `next` of the previous page).
    pub after: Option<String>,
    /// Page size, 1 to 1000 (the node's default is 100).
    pub limit: Option<usize>,
}

/// A rejected line of a bulk write, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// 1-based line number (in the request body, or in an import's file
    /// once mapped by [`Chunk::file_line`]).
    pub line: usize,
    /// The line's key, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Why it was rejected.
    pub error: ErrorDetail,
}

/// The API's `{"code", "message"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

/// The answer to `POST /v1/records/{category}` (an NDJSON bulk write).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkReport {
    /// Non-blank lines read.
    pub lines: usize,
    /// Lines written.
    pub written: usize,
    /// Lines accepted that changed nothing.
    pub unchanged: usize,
    /// Lines rejected.
    pub rejected: usize,
    /// The first rejected lines (the API lists up to 1000).
    #[serde(default)]
    pub errors: Vec<LineError>,
    /// More lines were rejected than `errors` lists.
    #[serde(default)]
    pub errors_truncated: bool,
}

/// A blocking client for one node's API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client without credentials (only `/healthz` and `/readyz` answer
    /// it); see [`Client::with_credentials`].
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::with_credentials(base_url, timeout, &Credentials::default())
    }

    /// A client for the API at `base_url` (`http://host:port`; a bare
    /// `host:port` means `http://`), giving up on a request after `timeout`,
    /// sending `credentials`' token with every request.
    pub fn with_credentials(
        base_url: &str,
        timeout: Duration,
        credentials: &Credentials,
    ) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = base_url.trim().trim_end_matches('/');
        let base = if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
            trimmed.to_string()
        } else if trimmed.contains("://") {
            return Err(bad("only http:// and https:// URLs are supported"));
        } else {
            format!("http://{trimmed}")
        };
        let scheme_len = if base.starts_with("https://") { 8 } else { 7 };
        if base.len() <= scheme_len {
            return Err(bad("no host"));
        }
        base.parse::<ureq::http::Uri>()
            .map_err(|e| bad(&e.to_string()))?;
        let authorization = match &credentials.token {
            Some(t) => Some(
                ureq::http::HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    ClientError::Credentials {
                        reason: "the token is not a valid header value".into(),
                    }
                })?,
            ),
            None => None,
        };
        let tls = if base.starts_with("https://") {
            let ca = credentials.ca.as_deref().ok_or_else(|| ClientError::Credentials {
                reason: format!(
                    "{base} is https: give the deployment CA that signs its certificate (--ca FILE, ${}, or --config FILE)",
                    auth::CA_ENV
                ),
            })?;
            auth::tls_config(ca)?
        } else {
            ureq::tls::TlsConfig::default()
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .timeout_global(Some(timeout))
            .tls_config(tls)
            .middleware(
                move |mut req: ureq::http::Request<ureq::SendBody>,
                      next: ureq::middleware::MiddlewareNext| {
                    if let Some(v) = &authorization {
                        req.headers_mut()
                            .insert(ureq::http::header::AUTHORIZATION, v.clone());
                    }
                    next.handle(req)
                },
            )
            .build()
            .new_agent();
        Ok(Self { base, agent })
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn record_url(&self, category: &str, key: &str) -> String {
        format!(
            "{}/v1/records/{}/{}",
            self.base,
            encode_component(category),
            encode_component(key)
        )
    }

    /// `GET /v1/records/{category}/{key}`: one item with field attribution.
    pub fn get(&self, category: &str, key: &str) -> Result<Json, ClientError> {
        let url = self.record_url(category, key);
        self.json(&url, self.agent.get(&url).call())
    }

    /// `PUT /v1/records/{category}/{key}`: replace a record or append a log
    /// entry; `document` is the JSON object as text (sent as is).
    pub fn put(&self, category: &str, key: &str, document: &str) -> Result<Json, ClientError> {
        let url = self.record_url(category, key);
        let r = self
            .agent
            .put(&url)
            .content_type("application/json")
            .send(document);
        self.json(&url, r)
    }

    /// `PATCH /v1/records/{category}/{key}`: merge fields (`null` removes).
    pub fn patch(&self, category: &str, key: &str, fields: &str) -> Result<Json, ClientError> {
        let url = self.record_url(category, key);
        let r = self
            .agent
            .patch(&url)
            .content_type("application/json")
            .send(fields);
        self.json(&url, r)
    }

    /// `DELETE /v1/records/{category}/{key}`.
    pub fn delete(&self, category: &str, key: &str) -> Result<Json, ClientError> {
        let url = self.record_url(category, key);
        self.json(&url, self.agent.delete(&url).call())
    }

    /// `GET /v1/records/{category}?prefix=&after=&limit=`: one page.
    pub fn scan(&self, category: &str, q: &ScanQuery) -> Result<Json, ClientError> {
        let mut url = format!("{}/v1/records/{}", self.base, encode_component(category));
        let mut params = Vec::new();
        if let Some(p) = &q.prefix {
            params.push(format!("prefix={}", encode_component(p)));
        }
        if let Some(a) = &q.after {
            params.push(format!("after={}", encode_component(a)));
        }
        if let Some(l) = q.limit {
            params.push(format!("limit={l}"));
        }
        if !params.is_empty() {
            url = format!("{url}?{}", params.join("&"));
        }
        self.json(&url, self.agent.get(&url).call())
    }

    /// `GET /v1/customers/{id}`: the unified customer view.
    pub fn customer(&self, id: &str) -> Result<Json, ClientError> {
        let url = format!("{}/v1/customers/{}", self.base, encode_component(id));
        self.json(&url, self.agent.get(&url).call())
    }

    /// `GET /v1/aggregates/{name}?group_by=&filter=&drill=`.
    pub fn aggregate(
        &self,
        name: &str,
        group_by: Option<&str>,
        filter: Option<&str>,
        drill: Option<&str>,
    ) -> Result<Json, ClientError> {
        let mut url = format!("{}/v1/aggregates/{}", self.base, encode_component(name));
        let params: Vec<String> = [("group_by", group_by), ("filter", filter), ("drill", drill)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode_component(v))))
            .collect();
        if !params.is_empty() {
            url = format!("{url}?{}", params.join("&"));
        }
        self.json(&url, self.agent.get(&url).call())
    }

    /// `GET /v1/aggregates`: the declared aggregates.
    pub fn aggregates(&self) -> Result<Json, ClientError> {
        let url = format!("{}/v1/aggregates", self.base);
        self.json(&url, self.agent.get(&url).call())
    }

    /// `GET path` (a path of the API with its query string), as JSON.
    pub fn get_json(&self, path: &str) -> Result<Json, ClientError> {
        let url = format!("{}{path}", self.base);
        self.json(&url, self.agent.get(&url).call())
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let (status, text) = self.exchange_text(&url, self.agent.get(&url).call())?;
        if status != 200 {
            return Err(ClientError::Unexpected {
                url,
                status,
                reason: "GET /metrics did not answer 200".to_string(),
            });
        }
        Ok(text)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Json, ClientError> {
        let url = format!("{}/v1/status", self.base);
        self.json(&url, self.agent.get(&url).call())
    }

    /// `POST /v1/records/{category}` with an NDJSON body. A request whose
    /// every line was rejected (400 `no_valid_lines`) still returns its
    /// report; any other refusal is an error.
    pub fn bulk(&self, category: &str, ndjson: &[u8]) -> Result<BulkReport, ClientError> {
        let url = format!("{}/v1/records/{}", self.base, encode_component(category));
        let r = self
            .agent
            .post(&url)
            .content_type("application/x-ndjson")
            .send(ndjson);
        let (status, body) = self.exchange(&url, r)?;
        let no_valid_lines = status == 400 && body["error"]["code"] == "no_valid_lines";
        if status != 200 && !no_valid_lines {
            return Err(api_error(&url, status, &body));
        }
        serde_json::from_value(body).map_err(|e| ClientError::Unexpected {
            url,
            status,
            reason: format!("not a bulk report: {e}"),
        })
    }

    /// Status and body text of an exchange (at most `MAX_RESPONSE_BYTES`).
    fn exchange_text(
        &self,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, String), ClientError> {
        let transport = |e: ureq::Error| ClientError::Transport {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let mut resp = r.map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_string()
            .map_err(transport)?;
        Ok((status, text))
    }

    /// Status and parsed JSON body of an exchange.
    fn exchange(
        &self,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Json), ClientError> {
        let (status, text) = self.exchange_text(url, r)?;
        match serde_json::from_str(&text) {
            Ok(body) => Ok((status, body)),
            Err(_) => {
                let snippet: String = text.chars().take(200).collect();
                Err(ClientError::Unexpected {
                    url: url.to_string(),
                    status,
                    reason: format!("the body is not JSON: {snippet:?}"),
                })
            }
        }
    }

    /// The JSON body of a 2xx answer, or the API's error.
    fn json(
        &self,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Json, ClientError> {
        let (status, body) = self.exchange(url, r)?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(api_error(url, status, &body))
        }
    }
}

/// The error of a non-2xx answer: the API's code and message if the body has
/// them.
fn api_error(url: &str, status: u16, body: &Json) -> ClientError {
    match (
        body["error"]["code"].as_str(),
        body["error"]["message"].as_str(),
    ) {
        (Some(code), Some(message)) => ClientError::Api {
            status,
            code: code.to_string(),
            message: message.to_string(),
        },
        _ => ClientError::Unexpected {
            url: url.to_string(),
            status,
            reason: "no {\"error\": {\"code\", \"message\"}} in the body".to_string(),
        },
    }
}

/// The value of the series `name` with (at least) the labels `labels` in a
/// Prometheus text exposition; label order does not matter.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (have, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (inside, value) = r.split_once("} ")?;
                (inside.split(',').collect::<Vec<_>>(), value)
            }
            None => (Vec::new(), rest.strip_prefix(' ')?),
        };
        wanted
            .iter()
            .all(|w| have.contains(&w.as_str()))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

// ------------------------------------------------------------------ import

/// Input formats of `tiersync import`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// A header row of field names, then one item per row.
    Csv,
    /// One `{"key": …, "fields": {…}}` per line (sent as is).
    Ndjson,
}

impl ImportFormat {
    /// The format a file name implies: `.csv`, `.ndjson` or `.jsonl`.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(ImportFormat::Csv),
            "ndjson" | "jsonl" => Some(ImportFormat::Ndjson),
            _ => None,
        }
    }

    /// `csv` or `ndjson`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportFormat::Csv => "csv",
            ImportFormat::Ndjson => "ndjson",
        }
    }
}

/// A CSV cell as a field value: an empty cell is absent; a cell that is a
/// JSON number (no leading zeros, no `+`, an integer within 64 bits or a
/// finite decimal) is a number; anything else is text. So `42`, `-7` and
/// `12.50` are numbers while `0571`, `+86`, `1e999` and a 20-digit id stay
/// text.
pub fn csv_value(cell: &str) -> Option<Json> {
    if cell.is_empty() {
        return None;
    }
    if looks_like_json_number(cell) {
        if let Ok(i) = cell.parse::<i64>() {
            return Some(Json::from(i));
        }
        let is_integer = !cell.contains(['.', 'e', 'E']);
        if !is_integer
            && let Some(n) = cell
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
        {
            return Some(Json::Number(n));
        }
    }
    Some(Json::String(cell.to_string()))
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn looks_like_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 || (n > 1 && b[int_start] == b'0') {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// One bulk request's worth of NDJSON lines, each with its line number in
/// the input file.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    /// The NDJSON body: one line per item, no blank lines.
    pub body: Vec<u8>,
    /// `file_lines[i]` is the input file's line of the body's line `i + 1`.
    pub file_lines: Vec<usize>,
}

impl Chunk {
    /// Items in the chunk.
    pub fn len(&self) -> usize {
        self.file_lines.len()
    }

    /// Whether it holds no item.
    pub fn is_empty(&self) -> bool {
        self.file_lines.is_empty()
    }

    fn push(&mut self, line: &[u8], file_line: usize) {
        self.body.extend_from_slice(line);
        self.body.push(b'\n');
        self.file_lines.push(file_line);
    }

    /// The input file's line number of the body's 1-based line `line`.
    pub fn file_line(&self, line: usize) -> Option<usize> {
        line.checked_sub(1)
            .and_then(|i| self.file_lines.get(i))
            .copied()
    }
}

/// What the [`Chunker`] yields.
#[derive(Debug)]
pub enum ImportEvent {
    /// A chunk to send.
    Chunk(Chunk),
    /// A line that could not be read or converted (never sent), with its
    /// line number in the input file.
    Rejected(LineError),
}

/// Reads an import file into chunks of at most `max_lines` lines (and about
/// `max_bytes` bytes), converting CSV rows to NDJSON lines.
pub struct Chunker {
    source: Source,
    max_lines: usize,
    max_bytes: usize,
    /// Items (CSV rows, non-blank NDJSON lines) read so far.
    pub items_read: usize,
    pending: Option<LineError>,
    done: bool,
}

enum Source {
    Csv {
        reader: csv::Reader<Tee>,
        headers: Vec<String>,
        key_index: usize,
    },
    Ndjson {
        reader: Box<dyn BufRead>,
        line: usize,
        bytes: u64,
    },
}

/// The CSV input, keeping the bytes the CSV reader has not finished with:
/// the reader reports a row at the line where its read began, before the
/// blank lines it skipped, so the row's own line is found by looking at
/// those bytes.
struct Tee {
    inner: Box<dyn Read>,
    /// Bytes read from `inner`, from offset `base` on.
    kept: Vec<u8>,
    base: u64,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.kept.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Tee {
    /// The line a row starts on, from where its read began: the line then,
    /// plus the line ends (blank lines, the rest of a CRLF) skipped first.
    fn row_line(&self, read_start: &csv::Position) -> usize {
        let from = usize::try_from(read_start.byte().saturating_sub(self.base)).unwrap_or(0);
        let skipped = self
            .kept
            .get(from..)
            .unwrap_or_default()
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .filter(|b| **b == b'\n')
            .count();
        usize::try_from(read_start.line())
            .unwrap_or(usize::MAX)
            .saturating_add(skipped)
    }

    /// Drops the bytes before offset `pos` (consumed by the CSV reader).
    fn forget_before(&mut self, pos: u64) {
        let n = usize::try_from(pos.saturating_sub(self.base))
            .unwrap_or(usize::MAX)
            .min(self.kept.len());
        self.kept.drain(..n);
        self.base += n as u64;
    }
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunker")
            .field("max_lines", &self.max_lines)
            .field("items_read", &self.items_read)
            .finish_non_exhaustive()
    }
}

fn local_error(line: usize, code: &str, message: impl Into<String>) -> LineError {
    LineError {
        line,
        key: None,
        error: ErrorDetail {
            code: code.to_string(),
            message: message.into(),
        },
    }
}

impl Chunker {
    /// A chunker over `input` in `format`. For CSV, `key_column` names the
    /// column holding the key (default `key`); the header is read and
    /// checked here.
    pub fn new(
        input: Box<dyn Read>,
        format: ImportFormat,
        key_column: Option<&str>,
        max_lines: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Self> {
        let source = match format {
            ImportFormat::Ndjson => {
                if key_column.is_some() {
                    anyhow::bail!("--key-column applies to CSV only: NDJSON lines carry \"key\"");
                }
                Source::Ndjson {
                    reader: Box::new(std::io::BufReader::new(input)),
                    line: 0,
                    bytes: 0,
                }
            }
            ImportFormat::Csv => {
                let tee = Tee {
                    inner: input,
                    kept: Vec::new(),
                    base: 0,
                };
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(false)
                    .from_reader(tee);
                let headers: Vec<String> = reader
                    .headers()
                    .map_err(|e| anyhow::anyhow!("reading the CSV header (line 1): {e}"))?
                    .iter()
                    .map(str::to_string)
                    .collect();
                let pos = reader.position().byte();
                reader.get_mut().forget_before(pos);
                let want = key_column.unwrap_or("key");
                let mut seen = std::collections::BTreeSet::new();
                for (i, h) in headers.iter().enumerate() {
                    if h.is_empty() {
                        anyhow::bail!("CSV header (line 1): column {} has no name", i + 1);
                    }
                    if !seen.insert(h.as_str()) {
                        anyhow::bail!("CSV header (line 1): column {h:?} appears twice");
                    }
                }
                let key_index = headers.iter().position(|h| h == want).ok_or_else(|| {
                    anyhow::anyhow!(
                        "CSV header (line 1) has no {want:?} column (columns: {}){}",
                        headers.join(", "),
                        if key_column.is_none() {
                            "; name the key column with --key-column"
                        } else {
                            ""
                        }
                    )
                })?;
                Source::Csv {
                    reader,
                    headers,
                    key_index,
                }
            }
        };
        Ok(Self {
            source,
            max_lines: max_lines.max(1),
            max_bytes: max_bytes.max(1),
            items_read: 0,
            pending: None,
            done: false,
        })
    }

    /// Bytes of input consumed so far (for a progress bar).
    pub fn bytes_read(&self) -> u64 {
        match &self.source {
            Source::Csv { reader, .. } => reader.position().byte(),
            Source::Ndjson { bytes, .. } => *bytes,
        }
    }

    /// The next chunk or locally rejected line; `None` at the end of the
    /// input. An I/O error reading the input is an error.
    pub fn next_event(&mut self) -> anyhow::Result<Option<ImportEvent>> {
        if let Some(e) = self.pending.take() {
            return Ok(Some(ImportEvent::Rejected(e)));
        }
        if self.done {
            return Ok(None);
        }
        let mut chunk = Chunk::default();
        while chunk.len() < self.max_lines && chunk.body.len() < self.max_bytes {
            match self.read_line(&mut chunk)? {
                Read1::Item => self.items_read += 1,
                Read1::Rejected(e) => {
                    self.items_read += 1;
                    if chunk.is_empty() {
                        return Ok(Some(ImportEvent::Rejected(e)));
                    }
                    // Report it after the chunk that precedes it.
                    self.pending = Some(e);
                    break;
                }
                Read1::Skipped => {}
                Read1::End => {
                    self.done = true;
                    break;
                }
            }
        }
        if chunk.is_empty() {
            return Ok(self.pending.take().map(ImportEvent::Rejected));
        }
        Ok(Some(ImportEvent::Chunk(chunk)))
    }

    fn read_line(&mut self, chunk: &mut Chunk) -> anyhow::Result<Read1> {
        match &mut self.source {
            Source::Ndjson {
                reader,
                line,
                bytes,
            } => {
                let mut buf = Vec::new();
                let n = reader.read_until(b'\n', &mut buf)?;
                if n == 0 {
                    return Ok(Read1::End);
                }
                *line += 1;
                *bytes += n as u64;
                let raw = buf.strip_suffix(b"\n").unwrap_or(&buf);
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                if raw.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Read1::Skipped);
                }
                chunk.push(raw, *line);
                Ok(Read1::Item)
            }
            Source::Csv {
                reader,
                headers,
                key_index,
            } => {
                let mut record = csv::StringRecord::new();
                let before = reader.position().clone();
                let result = reader.read_record(&mut record);
                let line = reader.get_ref().row_line(&before);
                let after = reader.position().byte();
                reader.get_mut().forget_before(after);
                match result {
                    Ok(false) => Ok(Read1::End),
                    Ok(true) => {
                        let mut fields = Map::new();
                        let mut key = String::new();
                        for (i, cell) in record.iter().enumerate() {
                            if i == *key_index {
                                key = cell.to_string();
                            } else if let Some(v) = csv_value(cell)
                                && let Some(name) = headers.get(i)
                            {
                                fields.insert(name.clone(), v);
                            }
                        }
                        let obj = serde_json::json!({"key": key, "fields": fields});
                        chunk.push(obj.to_string().as_bytes(), line);
                        Ok(Read1::Item)
                    }
                    Err(e) if e.is_io_error() => Err(e.into()),
                    Err(e) => {
                        if after == before.byte() && reader.is_done() {
                            return Ok(Read1::End);
                        }
                        let msg = match e.kind() {
                            csv::ErrorKind::UnequalLengths {
                                expected_len, len, ..
                            } => format!("the row has {len} field(s), the header {expected_len}"),
                            csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8".to_string(),
                            _ => e.to_string(),
                        };
                        Ok(Read1::Rejected(local_error(line, "invalid_csv", msg)))
                    }
                }
            }
        }
    }
}

enum Read1 {
    Item,
    Rejected(LineError),
    Skipped,
    End,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn metric_values_are_found_by_exact_series() {
        let text =
            "# TYPE g gauge\ng{origin=\"ab\"} 7\ng{peer=\"p\",origin=\"a\"} 12\ngx 3\nh 5.5\n";
        assert_eq!(metric_value(text, "g", &[("origin", "a")]), Some(12.0));
        assert_eq!(
            metric_value(text, "g", &[("origin", "a"), ("peer", "p")]),
            Some(12.0)
        );
        assert_eq!(metric_value(text, "g", &[("origin", "ab")]), Some(7.0));
        assert_eq!(metric_value(text, "h", &[]), Some(5.5));
        assert_eq!(metric_value(text, "g", &[("origin", "b")]), None);
    }

    #[test]
    fn components_are_one_segment() {
        assert_eq!(encode_component("c-42/0001"), "c-42%2F0001");
        assert_eq!(encode_component("a b?#%"), "a%20b%3F%23%25");
        assert_eq!(encode_component(".."), "%2E%2E");
        assert_eq!(encode_component("a.b_c~"), "a.b_c~");
        assert_eq!(encode_component("王"), "%E7%8E%8B");
    }

    #[test]
    fn base_urls() {
        let t = Duration::from_secs(1);
        assert_eq!(
            Client::new("127.0.0.1:8411", t).unwrap().base_url(),
            "http://127.0.0.1:8411"
        );
        assert_eq!(
            Client::new("http://h:1/", t).unwrap().base_url(),
            "http://h:1"
        );
        assert!(Client::new("https://h:1", t).is_err());
        assert!(Client::new("", t).is_err());
    }

    #[test]
    fn csv_cells() {
        assert_eq!(csv_value(""), None);
        assert_eq!(csv_value("42"), Some(json!(42)));
        assert_eq!(csv_value("-7"), Some(json!(-7)));
        assert_eq!(csv_value("12.50"), Some(json!(12.5)));
        assert_eq!(csv_value("1e3"), Some(json!(1000.0)));
        assert_eq!(csv_value("0"), Some(json!(0)));
        for text in [
            "0571",
            "+86",
            "1.",
            ".5",
            "1e999",
            "12345678901234567890",
            "NaN",
            "inf",
            " 1",
            "gold",
            "-",
        ] {
            assert_eq!(csv_value(text), Some(json!(text)), "{text}");
        }
    }

    fn events(input: &str, format: ImportFormat, max_lines: usize) -> Vec<ImportEvent> {
        let mut c = Chunker::new(
            Box::new(std::io::Cursor::new(input.as_bytes().to_vec())),
            format,
            None,
            max_lines,
            1 << 20,
        )
        .unwrap();
        let mut out = Vec::new();
        while let Some(e) = c.next_event().unwrap() {
            out.push(e);
        }
        out
    }

    #[test]
    fn csv_rows_become_lines_with_file_line_numbers() {
        let input =
            "key,name,amount,note\nb-1,Li,12.5,\n\nb-2,\"Wang\nFang\",7,x\nb-3,Z\nb-4,Q,1,\n";
        let ev = events(input, ImportFormat::Csv, 2);
        let mut lines = Vec::new();
        let mut rejected = Vec::new();
        for e in &ev {
            match e {
                ImportEvent::Chunk(c) => {
                    let text = String::from_utf8(c.body.clone()).unwrap();
                    for (l, t) in c.file_lines.iter().zip(text.lines()) {
                        lines.push((*l, serde_json::from_str::<Json>(t).unwrap()));
                    }
                }
                ImportEvent::Rejected(r) => rejected.push(r.clone()),
            }
        }
        assert_eq!(
            lines,
            vec![
                (
                    2,
                    json!({"key": "b-1", "fields": {"name": "Li", "amount": 12.5}})
                ),
                (
                    4,
                    json!({"key": "b-2", "fields": {"name": "Wang\nFang", "amount": 7, "note": "x"}})
                ),
                (
                    7,
                    json!({"key": "b-4", "fields": {"name": "Q", "amount": 1}})
                ),
            ]
        );
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].line, 6);
        assert_eq!(rejected[0].error.code, "invalid_csv");
    }

    /// The file line of every row sent, and of every row rejected.
    fn csv_lines(input: &str) -> (Vec<(usize, String)>, Vec<usize>) {
        let (mut sent, mut rejected) = (Vec::new(), Vec::new());
        for e in events(input, ImportFormat::Csv, 1) {
            match e {
                ImportEvent::Chunk(c) => {
                    let v: Json = serde_json::from_slice(&c.body).unwrap();
                    sent.push((c.file_lines[0], v["key"].as_str().unwrap().to_string()));
                }
                ImportEvent::Rejected(r) => rejected.push(r.line),
            }
        }
        (sent, rejected)
    }

    #[test]
    fn csv_line_numbers_survive_blank_lines_and_crlf() {
        let lf = "key,a\n\nk1,1\n\n\nk2,\"x\ny\"\nk3\nk4,4";
        let want = (
            vec![
                (3, "k1".to_string()),
                (6, "k2".to_string()),
                (9, "k4".to_string()),
            ],
            vec![8],
        );
        assert_eq!(csv_lines(lf), want);
        assert_eq!(csv_lines(&lf.replace('\n', "\r\n")), want);
        assert_eq!(
            csv_lines("key,a\r\nk1,1\r\nk2,2\r\n").0,
            vec![(2, "k1".to_string()), (3, "k2".to_string())]
        );
    }

    #[test]
    fn ndjson_lines_pass_through() {
        let input =
            "{\"key\":\"a\",\"fields\":{}}\n\n  \r\nnot json\r\n{\"key\":\"b\",\"fields\":{}}";
        let ev = events(input, ImportFormat::Ndjson, 1000);
        assert_eq!(ev.len(), 1);
        let ImportEvent::Chunk(c) = &ev[0] else {
            panic!("a chunk")
        };
        assert_eq!(c.file_lines, vec![1, 4, 5]);
        assert_eq!(c.file_line(2), Some(4));
        assert_eq!(c.file_line(0), None);
        assert_eq!(
            String::from_utf8(c.body.clone()).unwrap(),
            "{\"key\":\"a\",\"fields\":{}}\nnot json\n{\"key\":\"b\",\"fields\":{}}\n"
        );
    }

    #[test]
    fn csv_header_problems() {
        let new = |s: &str, k: Option<&str>| {
            Chunker::new(
                Box::new(std::io::Cursor::new(s.as_bytes().to_vec())),
                ImportFormat::Csv,
                k,
                10,
                100,
            )
        };
        assert!(
            new("id,name\n", None)
                .unwrap_err()
                .to_string()
                .contains("--key-column")
        );
        assert!(new("id,name\n", Some("id")).is_ok());
        assert!(
            new("key,a,a\n", None)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(ImportFormat::from_path(Path::new("x.JSONL")) == Some(ImportFormat::Ndjson));
        assert!(ImportFormat::from_path(Path::new("x.txt")).is_none());
    }
}
