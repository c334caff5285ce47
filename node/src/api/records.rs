//! `/v1/records/…`: single-item reads and writes, prefix scans, NDJSON bulk.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;
use tiersync_protocol::{Kind, Policy};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, ErrorDetail};
use super::{ApiPath, ApiQuery, ApiState, RawBody, blocking};
use crate::json::{
    ItemView, JsonError, StampView, document_from_json, into_object, item_view, parse_object,
    patch_from_json, type_name,
};
use crate::store::{Applied, Mutation, WriteError};

/// Default page size of a scan.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page size of a scan.
pub const MAX_LIMIT: usize = 1000;
/// Lines of a bulk request applied as one group (one durable commit).
pub const BULK_CHUNK: usize = 1000;
/// Most rejected lines listed in a bulk report (all are counted).
pub const MAX_REPORTED_ERRORS: usize = 1000;

/// The outcome of an accepted write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct WriteResult {
    /// The category.
    pub category: String,
    /// The key.
    pub key: String,
    /// `put`, `patch`, `delete` or `append`.
    #[schema(example = "put")]
    pub op: String,
    /// Whether anything was written: `false` only for a log entry appended
    /// again with the same content.
    pub changed: bool,
    /// The node's changelog sequence number of this write (`null` if
    /// unchanged).
    pub seq: Option<u64>,
    /// The stamp of the write (of the existing entry, if unchanged).
    pub stamp: StampView,
}

fn op_name(m: &Mutation) -> &'static str {
    match m {
        Mutation::Put { .. } => "put",
        Mutation::Patch { .. } => "patch",
        Mutation::Delete { .. } => "delete",
        Mutation::Append { .. } => "append",
    }
}

fn count_write(category: &str, op: &'static str, applied: &Applied) {
    if applied.seq.is_some() {
        metrics::counter!("tiersync_writes_total", "category" => category.to_string(), "op" => op)
            .increment(1);
    }
}

/// Applies one mutation through the group-commit writer.
async fn write(st: &ApiState, m: Mutation) -> Result<Json<WriteResult>, ApiError> {
    let op = op_name(&m);
    let (category, key) = (m.target().0.to_string(), m.target().1.to_string());
    let applied = st.writer.apply_one(m).await?;
    count_write(&category, op, &applied);
    Ok(Json(WriteResult {
        category,
        key,
        op: op.to_string(),
        changed: applied.seq.is_some(),
        seq: applied.seq,
        stamp: StampView::from(&applied.stamp),
    }))
}

fn wrong_kind(category: &str, kind: Kind, op: &'static str) -> ApiError {
    WriteError::WrongKind {
        category: category.to_string(),
        kind,
        op,
    }
    .into()
}

/// Replace a record, or append a log entry.
///
/// The body is the whole document, a JSON object of fields. For a `record`
/// category the document replaces the stored one (fields it lacks are
/// removed; a `null` field counts as absent). For a `log` category the entry
/// is appended; the same content again is a no-op (`changed: false`), other
/// content under an existing key is 409 `conflict`.
#[utoipa::path(
    put,
    path = "/v1/records/{category}/{key}",
    tag = "records",
    params(
        ("category" = String, Path, description = "A category declared in the policy"),
        ("key" = String, Path, description = "Item key: 1 to max_key_bytes bytes, no control characters; percent-encode '/'"),
    ),
    request_body(content = Object, description = "The document: field → value (null = absent)", content_type = "application/json"),
    responses(
        (status = 200, description = "Written (durable) or unchanged", body = WriteResult),
        (status = 400, description = "invalid_json, not_an_object, invalid_key, invalid_document", body = ErrorBody),
        (status = 404, description = "unknown_category", body = ErrorBody),
        (status = 409, description = "conflict: the log key holds other content", body = ErrorBody),
        (status = 413, description = "body_too_large, item_too_large", body = ErrorBody),
        (status = 503, description = "unavailable: the store failed", body = ErrorBody),
        (status = 507, description = "storage_full: the disk is full; nothing was acknowledged", body = ErrorBody),
    )
)]
pub async fn put_record(
    State(st): State<ApiState>,
    ApiPath((category, key)): ApiPath<(String, String)>,
    body: RawBody,
) -> Result<Json<WriteResult>, ApiError> {
    let kind = st.target(&category, &key)?.kind;
    let doc = document_from_json(&parse_object(&body.0, "document")?);
    st.store.policy().check_fields(doc.keys())?;
    let m = match kind {
        Kind::Record => Mutation::Put { category, key, doc },
        Kind::Log => Mutation::Append {
            category,
            key,
            fields: doc,
        },
    };
    write(&st, m).await
}

/// Merge fields into a record.
///
/// The body is a JSON object of the fields to change: a value sets the
/// field, `null` removes it; other fields are kept. A missing (or deleted)
/// record starts as an empty document. Not allowed on `log` categories.
#[utoipa::path(
    patch,
    path = "/v1/records/{category}/{key}",
    tag = "records",
    params(
        ("category" = String, Path, description = "A record category declared in the policy"),
        ("key" = String, Path, description = "Item key"),
    ),
    request_body(content = Object, description = "Fields to set (null removes); at least one", content_type = "application/json"),
    responses(
        (status = 200, description = "Written (durable)", body = WriteResult),
        (status = 400, description = "invalid_json, not_an_object, invalid_key, invalid_document", body = ErrorBody),
        (status = 404, description = "unknown_category", body = ErrorBody),
        (status = 405, description = "wrong_kind: a log category", body = ErrorBody),
        (status = 413, description = "body_too_large, item_too_large", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
        (status = 507, description = "storage_full: the disk is full; nothing was acknowledged", body = ErrorBody),
    )
)]
pub async fn patch_record(
    State(st): State<ApiState>,
    ApiPath((category, key)): ApiPath<(String, String)>,
    body: RawBody,
) -> Result<Json<WriteResult>, ApiError> {
    let kind = st.target(&category, &key)?.kind;
    if kind != Kind::Record {
        return Err(wrong_kind(&category, kind, "patch"));
    }
    let fields = patch_from_json(&parse_object(&body.0, "document")?);
    if fields.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_document",
            "invalid document: a PATCH needs at least one field",
        ));
    }
    st.store.policy().check_fields(fields.keys())?;
    write(
        &st,
        Mutation::Patch {
            category,
            key,
            fields,
        },
    )
    .await
}

/// Delete a record (a tombstone that replicates like any write).
#[utoipa::path(
    delete,
    path = "/v1/records/{category}/{key}",
    tag = "records",
    params(
        ("category" = String, Path, description = "A record category declared in the policy"),
        ("key" = String, Path, description = "Item key"),
    ),
    responses(
        (status = 200, description = "Deleted (durable)", body = WriteResult),
        (status = 400, description = "invalid_key", body = ErrorBody),
        (status = 404, description = "unknown_category, not_found (missing or already deleted)", body = ErrorBody),
        (status = 405, description = "wrong_kind: a log category", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
        (status = 507, description = "storage_full: the disk is full; nothing was acknowledged", body = ErrorBody),
    )
)]
pub async fn delete_record(
    State(st): State<ApiState>,
    ApiPath((category, key)): ApiPath<(String, String)>,
) -> Result<Json<WriteResult>, ApiError> {
    let kind = st.target(&category, &key)?.kind;
    if kind != Kind::Record {
        return Err(wrong_kind(&category, kind, "delete"));
    }
    write(&st, Mutation::Delete { category, key }).await
}

/// Read one item, with the origin node and time of each field's value.
#[utoipa::path(
    get,
    path = "/v1/records/{category}/{key}",
    tag = "records",
    params(
        ("category" = String, Path, description = "A category declared in the policy"),
        ("key" = String, Path, description = "Item key"),
    ),
    responses(
        (status = 200, description = "The item", body = ItemView),
        (status = 400, description = "invalid_key", body = ErrorBody),
        (status = 404, description = "unknown_category, not_found (missing or deleted)", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    )
)]
pub async fn get_record(
    State(st): State<ApiState>,
    ApiPath((category, key)): ApiPath<(String, String)>,
) -> Result<Json<ItemView>, ApiError> {
    st.target(&category, &key)?;
    match st.store.get(&category, &key)? {
        Some(item) if !item.is_deleted() => Ok(Json(item_view(&category, &key, &item))),
        _ => Err(ApiError::not_found(format!(
            "{category}/{key} does not exist"
        ))),
    }
}

/// Answers every method on an empty key or customer id.
pub async fn empty_key() -> ApiError {
    ApiError::bad_request("invalid_key", "invalid key: the key is empty")
}

/// Query of a prefix scan.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ScanParams {
    /// Only keys starting with this (default: all).
    prefix: Option<String>,
    /// Start after this key: the `next` of the previous page.
    after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A page of a prefix scan.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ScanPage {
    /// The category.
    pub category: String,
    /// Items in key order (deleted records left out).
    pub items: Vec<ItemView>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// A page size parameter: [`DEFAULT_LIMIT`] when absent, else 1 to
/// [`MAX_LIMIT`] (400 `invalid_query`).
pub(super) fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_LIMIT}, not {limit}"),
        ));
    }
    Ok(limit)
}

/// List a category's items whose key starts with `prefix`, in key order.
#[utoipa::path(
    get,
    path = "/v1/records/{category}",
    tag = "records",
    params(
        ("category" = String, Path, description = "A category declared in the policy"),
        ScanParams,
    ),
    responses(
        (status = 200, description = "One page", body = ScanPage),
        (status = 400, description = "invalid_query", body = ErrorBody),
        (status = 404, description = "unknown_category", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    )
)]
pub async fn scan(
    State(st): State<ApiState>,
    ApiPath(category): ApiPath<String>,
    ApiQuery(q): ApiQuery<ScanParams>,
) -> Result<Json<ScanPage>, ApiError> {
    st.category(&category)?;
    let limit = page_limit(q.limit)?;
    let store = st.store.clone();
    blocking(move || {
        let prefix = q.prefix.unwrap_or_default();
        let page = store.scan(&category, &prefix, q.after.as_deref(), limit, false)?;
        Ok(Json(ScanPage {
            items: page
                .items
                .iter()
                .map(|(k, item)| item_view(&category, k, item))
                .collect(),
            category,
            next: page.next,
        }))
    })
    .await
}

/// A rejected line of a bulk request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct LineError {
    /// 1-based line number in the request body.
    pub line: usize,
    /// The line's key, if it had one (cut to 128 characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Why it was rejected (same codes as single writes).
    pub error: ErrorDetail,
}

/// The outcome of a bulk request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct BulkReport {
    /// Present only when nothing was accepted (status 400, 503 or 507).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
    /// Non-blank lines read.
    pub lines: usize,
    /// Lines written (durable).
    pub written: usize,
    /// Lines accepted that changed nothing (a log entry sent again).
    pub unchanged: usize,
    /// Lines rejected.
    pub rejected: usize,
    /// The first 1000 rejected lines, in line order.
    pub errors: Vec<LineError>,
    /// More lines were rejected than `errors` lists.
    pub errors_truncated: bool,
}

impl BulkReport {
    fn reject(&mut self, line: usize, key: Option<&str>, e: ApiError) {
        self.rejected += 1;
        if self.errors.len() == MAX_REPORTED_ERRORS {
            self.errors_truncated = true;
            return;
        }
        let key = key.map(|k| match k.char_indices().nth(128) {
            Some((i, _)) => format!("{}…", &k[..i]),
            None => k.to_string(),
        });
        self.errors.push(LineError {
            line,
            key,
            error: e.detail(),
        });
    }
}

type LineResult = Result<Mutation, (Option<String>, ApiError)>;

fn invalid_line(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_line", msg)
}

/// One NDJSON line → its mutation, or why not (with the key if known).
fn parse_line(policy: &Policy, category: &str, kind: Kind, raw: &[u8]) -> LineResult {
    let v: JsonValue =
        serde_json::from_slice(raw).map_err(|e| (None, JsonError::Syntax(e.to_string()).into()))?;
    let mut obj = into_object(v, "line").map_err(|e| (None, e.into()))?;
    let key = match obj.remove("key") {
        Some(JsonValue::String(k)) => k,
        Some(other) => {
            return Err((
                None,
                invalid_line(format!(
                    "\"key\" must be a string, not {}",
                    type_name(&other)
                )),
            ));
        }
        None => return Err((None, invalid_line("a line needs a \"key\" string"))),
    };
    let with_key = |e: ApiError| (Some(key.clone()), e);
    let fields = match obj.remove("fields") {
        Some(f) => into_object(f, "fields").map_err(|e| with_key(e.into()))?,
        None => return Err(with_key(invalid_line("a line needs a \"fields\" object"))),
    };
    if let Some(extra) = obj.keys().next() {
        return Err(with_key(invalid_line(format!(
            "unknown member {extra:?}: a line has only \"key\" and \"fields\""
        ))));
    }
    policy.check_key(&key).map_err(|e| with_key(e.into()))?;
    let doc = document_from_json(&fields);
    policy
        .check_fields(doc.keys())
        .map_err(|e| with_key(e.into()))?;
    let category = category.to_string();
    Ok(match kind {
        Kind::Record => Mutation::Put { category, key, doc },
        Kind::Log => Mutation::Append {
            category,
            key,
            fields: doc,
        },
    })
}

/// Applies one chunk as one writer request (one durable group commit).
async fn apply_chunk(st: &ApiState, chunk: Vec<(usize, Mutation)>, report: &mut BulkReport) {
    let (lines, mutations): (Vec<usize>, Vec<Mutation>) = chunk.into_iter().unzip();
    let targets: Vec<(String, &'static str)> = mutations
        .iter()
        .map(|m| (m.target().1.to_string(), op_name(m)))
        .collect();
    let category = mutations
        .first()
        .map(|m| m.target().0.to_string())
        .unwrap_or_default();
    match st.writer.apply(mutations).await {
        Ok(results) => {
            for ((line, (key, op)), r) in lines.into_iter().zip(targets).zip(results) {
                match r {
                    Ok(applied) => {
                        count_write(&category, op, &applied);
                        if applied.seq.is_some() {
                            report.written += 1;
                        } else {
                            report.unchanged += 1;
                        }
                    }
                    Err(e) => report.reject(line, Some(&key), e.into()),
                }
            }
        }
        Err(e) => {
            let e = ApiError::from(e);
            for (line, (key, _)) in lines.into_iter().zip(targets) {
                report.reject(line, Some(&key), e.clone());
            }
        }
    }
}

/// Write many items from an NDJSON body: one `{"key": …, "fields": {…}}`
/// per line.
///
/// For a `record` category each line replaces the record (like PUT); for a
/// `log` category it appends (like PUT). Blank lines are skipped. Lines are
/// applied in chunks of 1000, each chunk one durable group commit. Good
/// lines are kept even when others are rejected; the report lists the
/// rejected ones by 1-based line number. The status is 200 when at least one
/// line was accepted (or the body had none), 400 `no_valid_lines` when every
/// line was rejected (then nothing changed), 507 `storage_full` when the disk
/// is full for all of them, 503 when the store refused them
/// all.
#[utoipa::path(
    post,
    path = "/v1/records/{category}",
    tag = "records",
    params(("category" = String, Path, description = "A category declared in the policy")),
    request_body(content = String, description = "NDJSON: one {\"key\": string, \"fields\": object} per line", content_type = "application/x-ndjson"),
    responses(
        (status = 200, description = "Processed; see `rejected` and `errors`", body = BulkReport),
        (status = 400, description = "no_valid_lines: every line was rejected (`error` is set)", body = BulkReport),
        (status = 404, description = "unknown_category", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 503, description = "unavailable: the store refused every line", body = BulkReport),
        (status = 507, description = "storage_full: the disk is full; the store refused every line", body = BulkReport),
    )
)]
pub async fn bulk(
    State(st): State<ApiState>,
    ApiPath(category): ApiPath<String>,
    body: RawBody,
) -> Result<Response, ApiError> {
    let kind = st.category(&category)?.kind;
    let policy = st.store.policy().clone();
    let mut report = BulkReport::default();
    let mut chunk: Vec<(usize, Mutation)> = Vec::new();
    for (i, raw) in body.0.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.lines += 1;
        match parse_line(&policy, &category, kind, raw) {
            Ok(m) => {
                chunk.push((i + 1, m));
                if chunk.len() == BULK_CHUNK {
                    apply_chunk(&st, std::mem::take(&mut chunk), &mut report).await;
                }
            }
            Err((key, e)) => report.reject(i + 1, key.as_deref(), e),
        }
    }
    if !chunk.is_empty() {
        apply_chunk(&st, chunk, &mut report).await;
    }
    let accepted = report.written + report.unchanged;
    if accepted > 0 || report.rejected == 0 {
        return Ok((StatusCode::OK, Json(report)).into_response());
    }
    let all_full = report.errors.iter().all(|e| e.error.code == "storage_full");
    let all_unavailable = report
        .errors
        .iter()
        .all(|e| matches!(e.error.code.as_str(), "unavailable" | "storage_full"));
    let e = if all_full {
        ApiError::storage_full("the disk is full: the store refused every line")
    } else if all_unavailable {
        ApiError::unavailable("the store refused every line")
    } else {
        ApiError::bad_request(
            "no_valid_lines",
            format!("all {} lines were rejected", report.rejected),
        )
    };
    report.error = Some(e.detail());
    let mut resp = (e.status, Json(report)).into_response();
    resp.extensions_mut().insert(super::ErrorCode(e.code));
    Ok(resp)
}
