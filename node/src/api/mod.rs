//! The local HTTP/JSON API (axum).
//!
//! City CRM apps write into their node here; HQ analysts and operators read
//! from it. Routes (the OpenAPI document at `GET /v1/openapi.json` is
//! generated from the same handlers):
//!
//! | method | path | what |
//! |---|---|---|
//! | `PUT` | `/v1/records/{category}/{key}` | replace a record / append a log entry |
//! | `PATCH` | `/v1/records/{category}/{key}` | merge fields into a record (`null` removes) |
//! | `DELETE` | `/v1/records/{category}/{key}` | tombstone a record |
//! | `GET` | `/v1/records/{category}/{key}` | one item with per-field origin and time |
//! | `GET` | `/v1/records/{category}?prefix=&after=&limit=` | prefix scan, paginated |
//! | `POST` | `/v1/records/{category}` | NDJSON bulk write |
//! | `GET` | `/v1/customers/{id}` | unified customer view |
//! | `GET` | `/v1/conflicts?category=&origin=&after=&limit=` | conflict ledger, overwrite counts |
//! | `GET` | `/v1/status` | node, policy, counts, links |
//! | `GET`/`POST` | `/v1/tokens` | list / create API tokens (admin) |
//! | `DELETE` | `/v1/tokens/{id}` | revoke a token (admin) |
//! | `GET` | `/v1/openapi.json` | this API as OpenAPI 3 |
//! | `GET` | `/metrics` | Prometheus text |
//! | `GET` | `/healthz` | liveness: the process serves HTTP |
//! | `GET` | `/readyz` | readiness: store usable, not stopping (503 otherwise) |
//!
//! Every route but `/healthz` and `/readyz` needs a bearer token of a role
//! that may use it ([`auth`]: 401 `unauthorized` without one, 403
//! `forbidden` for the wrong role or category, 429 `rate_limited` over the
//! token's rate).
//!
//! Keys are one path segment: a key holding `/` is sent percent-encoded
//! (`c-42%2F0001`). Request bodies are read as JSON whatever their
//! `Content-Type` (so `curl -d` works); every error is
//! `{"error": {"code": …, "message": …}}` with a 4xx/5xx status (see
//! [`error`] for the table) and a refused request changes nothing.
//!
//! # Who may write what
//!
//! Any node may write any category its policy declares, at any tier: a
//! province or national operator may correct a shared (`up`) record, and the
//! correction replicates upward from there like any other write (it does not
//! flow down: replication is child → parent only). A node may also write a
//! private (`local`) category; those items never leave the node that wrote
//! them — the uplink filters them out and every parent refuses them — so a
//! province writing `opportunity` keeps that data at the province, exactly as
//! a city does. Nothing is refused by tier; the policy is the only gate.

mod aggregates;
pub mod auth;
mod conflicts;
pub mod error;
pub mod guards;
pub mod openapi;
mod records;
pub mod serve;
mod tokens;
mod views;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request,
};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use tiersync_protocol::{Category, NodeId, Tier};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

pub use aggregates::{AggregateInfo, AggregateResult, AggregateRow, to_csv as aggregate_csv};
pub use conflicts::{ConflictPage, ConflictView, OverwriteView, VersionView};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use records::{BulkReport, LineError, ScanPage, WriteResult};
pub use tokens::{NewToken, TokenRequest, TokenView};
pub use views::{CategoryStatus, CustomerView, RelatedItems, StatusView};

use crate::store::Store;
use crate::writer::Writer;

/// Everything the handlers need.
#[derive(Clone)]
pub struct ApiState {
    /// The store (reads go straight to it).
    pub store: Arc<Store>,
    /// The group-commit writer (every write goes through it).
    pub writer: Writer,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's tier.
    pub tier: Tier,
    /// Largest request body accepted, in bytes (`[api] max_body_bytes`).
    pub max_body_bytes: usize,
    /// Link and replication status, shown under `"links"` in `GET /v1/status`.
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The Prometheus recorder's handle, rendered by `GET /metrics`; `None`
    /// makes `/metrics` answer 404 `metrics_disabled`.
    pub metrics: Option<PrometheusHandle>,
    /// Stopping flag (for `/readyz`) and config reload outcomes.
    pub ops: Arc<crate::ops::Ops>,
    /// Per-token rate limits (`None`: unlimited).
    pub rate_limits: Option<Arc<auth::RateLimits>>,
    /// Host names the `Host` header may name (`None`: any).
    pub hosts: guards::AllowedHosts,
    /// Longest a request may take, its body included.
    pub request_timeout: std::time::Duration,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("node_id", &self.node_id)
            .field("tier", &self.tier)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// A state with no link status (`"links": {}`) and no metrics recorder.
    pub fn new(
        store: Arc<Store>,
        writer: Writer,
        node_id: NodeId,
        tier: Tier,
        max_body_bytes: usize,
    ) -> Self {
        let hosts = guards::allowed_hosts(node_id.as_str(), None, &[]);
        Self {
            store,
            writer,
            node_id,
            tier,
            max_body_bytes,
            status: Arc::new(|| serde_json::json!({})),
            metrics: None,
            ops: Arc::default(),
            rate_limits: None,
            hosts,
            request_timeout: crate::config::ApiSection::default().request_timeout,
        }
    }

    /// The declared category `name`, or 404 `unknown_category`.
    fn category(&self, name: &str) -> Result<&Category, ApiError> {
        let policy = self.store.policy();
        policy.category(name).map_err(|e| match e {
            tiersync_protocol::PolicyError::UnknownCategory(_) => {
                let declared: Vec<&str> = policy.categories.keys().map(String::as_str).collect();
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_category",
                    format!(
                        "unknown category {name:?}; the policy declares: {}",
                        declared.join(", ")
                    ),
                )
            }
            other => other.into(),
        })
    }

    /// The category, after checking `key` too (400 `invalid_key`).
    fn target(&self, category: &str, key: &str) -> Result<&Category, ApiError> {
        let cat = self.category(category)?;
        self.store.policy().check_key(key)?;
        Ok(cat)
    }
}

/// The API's routes, with body limit, metrics and tracing layers.
pub fn router(state: ApiState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route(
            "/v1/records/{category}/{key}",
            get(records::get_record)
                .put(records::put_record)
                .patch(records::patch_record)
                .delete(records::delete_record),
        )
        // An empty key (`/v1/records/customer/`) is a bad key, not a missing route.
        .route("/v1/records/{category}/", any(records::empty_key))
        .route(
            "/v1/records/{category}",
            get(records::scan).post(records::bulk),
        )
        .route("/v1/customers/", any(records::empty_key))
        .route("/v1/customers/{id}", get(views::customer))
        .route("/v1/aggregates", get(aggregates::list))
        .route("/v1/aggregates/{name}", get(aggregates::query))
        .route("/v1/conflicts", get(conflicts::list))
        .route("/v1/status", get(views::status))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/v1/openapi.json", get(views::openapi))
        .route("/metrics", get(views::metrics))
        .route("/healthz", get(views::healthz))
        .route("/readyz", get(views::readyz))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::guard))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guards::browser,
        ))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guards::deadline,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves the API over plain HTTP on `listener` with the default limits
/// until `shutdown` completes, then finishes the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, serve::ServeOptions::default(), shutdown).await
}

/// Serves the API on `listener` with `options` (TLS, timeouts, connection
/// cap) until `shutdown` completes, then finishes the requests in flight.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: ApiState,
    options: serve::ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve::serve_router(listener, router(state), options, shutdown).await
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiersync local API",
        description = "Records, bulk import, unified customer view, status and metrics of one tiersync node. \
                       Every error is {\"error\": {\"code\", \"message\"}} and changes nothing."
    ),
    paths(
        records::put_record,
        records::patch_record,
        records::delete_record,
        records::get_record,
        records::scan,
        records::bulk,
        views::customer,
        aggregates::list,
        aggregates::query,
        conflicts::list,
        views::status,
        tokens::list,
        tokens::create,
        tokens::revoke,
        views::openapi,
        views::metrics,
        views::healthz,
        views::readyz,
    ),
    tags(
        (name = "records", description = "Items of the policy's categories"),
        (name = "views", description = "Unified customer view"),
        (name = "aggregates", description = "Grouped counts and sums, with drill-down"),
        (name = "ops", description = "Status, metrics and this document"),
        (name = "tokens", description = "API tokens of this node (admin)"),
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// Declares the bearer token scheme every route but the probes needs.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tst_<id>_<secret>")
                    .description(Some(
                        "A token from `tiersync token create` (valid only at the node that issued it)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The error code of an error response, for the metrics layer.
#[derive(Debug, Clone, Copy)]
struct ErrorCode(&'static str);

/// Counts every request by route template, method and status, and every
/// error by code.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("tiersync_api_request_duration_seconds", "route" => route.clone())
        .record(start.elapsed().as_secs_f64());
    if let Some(ErrorCode(code)) = resp.extensions().get::<ErrorCode>() {
        metrics::counter!("tiersync_api_errors_total", "route" => route.clone(), "code" => *code)
            .increment(1);
    }
    metrics::counter!("tiersync_api_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    resp
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!(
            "no endpoint {} {}; see GET /v1/openapi.json",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    // axum adds the `Allow` header to this response.
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Runs blocking store work (scans) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

/// `Path<T>` whose rejection is a JSON 400 `invalid_path`.
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(ApiPath(t)),
            Err(e) => Err(ApiError::bad_request("invalid_path", e.body_text())),
        }
    }
}

/// `Query<T>` whose rejection is a JSON 400 `invalid_query`.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(t)) => Ok(ApiQuery(t)),
            Err(e) => Err(ApiError::bad_request("invalid_query", e.body_text())),
        }
    }
}

/// The raw request body, within `max_body_bytes` (else 413 `body_too_large`).
struct RawBody(Bytes);

impl FromRequest<ApiState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is over the limit of {} bytes",
                    state.max_body_bytes
                ),
            )),
            Err(e) => Err(ApiError::bad_request("invalid_body", e.body_text())),
        }
    }
}

#[cfg(test)]
mod tests;
