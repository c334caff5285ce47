//! The API's error type and the one place where failures become status codes.
//!
//! | code | status | when |
//! |---|---|---|
//! | `invalid_json` | 400 | the body (or an NDJSON line) is not JSON |
//! | `not_an_object` | 400 | the document (or a line, or its `fields`) is not a JSON object |
//! | `invalid_line` | 400 | an NDJSON line lacks a string `key` / an object `fields`, or has other members |
//! | `invalid_key` | 400 | the key is empty, too long or has control characters |
//! | `invalid_document` | 400 | too many fields, a bad field name, an empty PATCH |
//! | `invalid_body` | 400 | the body could not be read (e.g. the client stopped sending) |
//! | `invalid_path` | 400 | a path segment is not valid percent-encoded UTF-8 |
//! | `invalid_query` | 400 | an unknown query parameter, or `limit` outside 1..=1000 |
//! | `no_valid_lines` | 400 | every line of a bulk request was rejected |
//! | `unauthorized` | 401 | no bearer token, or one malformed, unknown at this node, or revoked (with `WWW-Authenticate: Bearer`) |
//! | `forbidden` | 403 | the token's role (or category list) does not allow this route or category |
//! | `request_timeout` | 408 | the request (its body included) took longer than `[api] request_timeout` |
//! | `unsupported_media_type` | 415 | a write without `Content-Type: application/json` (or `application/x-ndjson`) |
//! | `wrong_host` | 421 | the `Host` header names a host this node does not answer for (`[api] hosts`) |
//! | `rate_limited` | 429 | the token is over `[api] rate_limit_per_second` (with `Retry-After`) |
//! | `unknown_category` | 404 | the policy declares no such category |
//! | `not_found` | 404 | no such item (or it is deleted); no such customer |
//! | `no_route` | 404 | no such endpoint |
//! | `metrics_disabled` | 404 | `/metrics` on a node started without a recorder |
//! | `wrong_kind` / `method_not_allowed` | 405 | PATCH/DELETE on a `log` category / a method an endpoint lacks (with `Allow`) |
//! | `conflict` | 409 | a log key already holds other content |
//! | `body_too_large` | 413 | the body is over the node's `api.max_body_bytes` |
//! | `item_too_large` | 413 | the encoded item would be over the policy's `max_item_bytes` |
//! | `storage_full` | 507 | the data directory's disk is full: nothing of the request is acknowledged; writes resume once space is freed |
//! | `unavailable` | 503 | the store failed or is shutting down (the message says why) |
//! | `internal` | 500 | a bug (a handler task panicked) |

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tiersync_protocol::{Kind, PolicyError};
use utoipa::ToSchema;

use crate::json::JsonError;
use crate::store::{StoreError, WriteError};
use crate::writer::WriterError;

/// The body of every error response: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A machine-readable code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_json`, `not_an_object`,
    /// `invalid_key`, `unknown_category`, `not_found`, `conflict`,
    /// `wrong_kind`, `body_too_large`, `storage_full`, `unavailable`, …
    #[schema(example = "invalid_key")]
    pub code: String,
    /// For people; may change between versions.
    #[schema(example = "invalid key: the key is empty")]
    pub message: String,
}

/// A refused request: its status, code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 507 `storage_full`.
    pub fn storage_full(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INSUFFICIENT_STORAGE, "storage_full", message)
    }

    /// The body's detail part.
    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}

/// The methods `/v1/records/{category}/{key}` accepts for a kind.
pub fn allowed_methods(kind: Kind) -> &'static str {
    match kind {
        Kind::Record => "GET,HEAD,PUT,PATCH,DELETE",
        Kind::Log => "GET,HEAD,PUT",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.detail(),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp.extensions_mut().insert(super::ErrorCode(self.code));
        resp
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        let msg = e.to_string();
        match e {
            PolicyError::UnknownCategory(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_category", msg)
            }
            PolicyError::BadKey(_) => ApiError::bad_request("invalid_key", msg),
            PolicyError::BadDocument(_) => ApiError::bad_request("invalid_document", msg),
            // Only a policy *file* is Invalid; a request can never cause it.
            PolicyError::Invalid { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_no_space() {
            ApiError::storage_full(e.to_string())
        } else {
            ApiError::unavailable(e.to_string())
        }
    }
}

impl From<WriterError> for ApiError {
    fn from(e: WriterError) -> Self {
        ApiError::unavailable(e.to_string())
    }
}

impl From<JsonError> for ApiError {
    fn from(e: JsonError) -> Self {
        let code = match e {
            JsonError::Syntax(_) => "invalid_json",
            JsonError::NotAnObject { .. } => "not_an_object",
        };
        ApiError::bad_request(code, e.to_string())
    }
}

/// Every [`WriteError`] → status and code, here and nowhere else.
impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let msg = e.to_string();
        match e {
            WriteError::Policy(p) => p.into(),
            WriteError::WrongKind { kind, .. } => ApiError {
                allow: Some(allowed_methods(kind)),
                ..ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "wrong_kind", msg)
            },
            WriteError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", msg),
            WriteError::NotFound { .. } => ApiError::not_found(msg),
            WriteError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "item_too_large", msg)
            }
            WriteError::Overflow(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "aggregate_overflow", msg)
            }
            WriteError::Store(e) => e.into(),
            WriteError::Unavailable(_) => ApiError::unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn write_errors_map_to_statuses() {
        let cases: Vec<(WriteError, u16, &str)> = vec![
            (
                PolicyError::UnknownCategory("x".into()).into(),
                404,
                "unknown_category",
            ),
            (
                PolicyError::BadKey("empty".into()).into(),
                400,
                "invalid_key",
            ),
            (
                PolicyError::BadDocument("too many".into()).into(),
                400,
                "invalid_document",
            ),
            (
                WriteError::WrongKind {
                    category: "billing".into(),
                    kind: Kind::Log,
                    op: "patch",
                },
                405,
                "wrong_kind",
            ),
            (
                WriteError::Conflict {
                    category: "b".into(),
                    key: "k".into(),
                },
                409,
                "conflict",
            ),
            (
                WriteError::NotFound {
                    category: "c".into(),
                    key: "k".into(),
                },
                404,
                "not_found",
            ),
            (
                WriteError::TooLarge { size: 9, max: 1 },
                413,
                "item_too_large",
            ),
            (WriteError::Store(StoreError::Poisoned), 503, "unavailable"),
            (
                WriteError::Store(StoreError::NoSpace(
                    "IO error: No space left on device".into(),
                )),
                507,
                "storage_full",
            ),
            (
                WriteError::Unavailable("closing".into()),
                503,
                "unavailable",
            ),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.code), (status, code), "{}", a.message);
        }
    }
}
