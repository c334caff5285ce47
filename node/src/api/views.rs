//! Read-only views: the unified customer view, status, metrics, OpenAPI.

use std::collections::BTreeMap;

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tiersync_protocol::policy::CustomerLink;
use tiersync_protocol::{Item, Kind, Replicate, Value};
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::{ApiPath, ApiState, blocking};
use crate::json::{ItemView, item_view};
use crate::store::Store;

/// The category holding customer records (the key is the customer id).
pub const CUSTOMER_CATEGORY: &str = "customer";
/// Most items listed per related category in a customer view.
pub const MAX_RELATED: usize = 1000;
/// Page size of the store scans behind the customer view.
const SCAN_PAGE: usize = 1000;

/// The items of one category that belong to a customer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RelatedItems {
    /// How the category links to a customer, as in the policy:
    /// `{"field": "customer_id"}` or `{"key_prefix": "/"}`.
    #[schema(value_type = Object)]
    pub link: serde_json::Value,
    /// The items, in key order (deleted records left out).
    pub items: Vec<ItemView>,
    /// More than 1000 items matched; only the first 1000 are listed.
    pub truncated: bool,
}

/// A customer and everything that belongs to it, on this node.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CustomerView {
    /// The customer id.
    pub id: String,
    /// The record of the `customer` category (`null` if this node holds
    /// none, e.g. not replicated yet).
    pub customer: Option<ItemView>,
    /// For every category with a `customer_link`: its items of this customer.
    pub related: BTreeMap<String, RelatedItems>,
}

/// Whether a link field's value names customer `id` (text, or a whole number
/// written as JSON number).
fn names_customer(v: Option<&Value>, id: &str) -> bool {
    match v {
        Some(Value::Str(s)) => s == id,
        Some(Value::Int(i)) => i.to_string() == id,
        _ => false,
    }
}

fn field_of<'a>(item: &'a Item, field: &str) -> Option<&'a Value> {
    match item {
        Item::Record(r) => r.document().get(field).copied(),
        Item::Log(l) => l.fields.get(field),
        Item::Counters(_) => None,
    }
}

/// The items of `category` linked to customer `id`, at most `MAX_RELATED`.
fn related_items(
    store: &Store,
    category: &str,
    link: &CustomerLink,
    id: &str,
) -> Result<RelatedItems, ApiError> {
    let mut items = Vec::new();
    let mut truncated = false;
    match link {
        CustomerLink::KeyPrefix(sep) => {
            let page = store.scan(category, &format!("{id}{sep}"), None, MAX_RELATED, false)?;
            truncated = page.next.is_some();
            items.extend(
                page.items
                    .iter()
                    .map(|(k, item)| item_view(category, k, item)),
            );
        }
        CustomerLink::Field(field) => {
            // A full scan of the category: fine for a city's data, linear in
            // the category's size at HQ. A secondary index (customer id →
            // keys, kept in the same WriteBatch) is the fix when it matters.
            let mut after: Option<String> = None;
            'pages: loop {
                let page = store.scan(category, "", after.as_deref(), SCAN_PAGE, false)?;
                for (k, item) in &page.items {
                    if names_customer(field_of(item, field), id) {
                        if items.len() == MAX_RELATED {
                            truncated = true;
                            break 'pages;
                        }
                        items.push(item_view(category, k, item));
                    }
                }
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
    }
    Ok(RelatedItems {
        link: serde_json::to_value(link).unwrap_or_default(),
        items,
        truncated,
    })
}

/// The unified customer view: the customer record and every item of the
/// categories that link to customers.
///
/// At a city this includes the city's private (`local`) items; above, only
/// what replicated there. A token sees only the categories it may read: an
/// analyst never a private one, a token with a category list only those.
#[utoipa::path(
    get,
    path = "/v1/customers/{id}",
    tag = "views",
    params(("id" = String, Path, description = "Customer id: the key of the customer record")),
    responses(
        (status = 200, description = "The customer and its items", body = CustomerView),
        (status = 400, description = "invalid_key", body = ErrorBody),
        (status = 404, description = "not_found: no record and no item of this customer", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    )
)]
pub async fn customer(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CustomerView>, ApiError> {
    st.store.policy().check_key(&id)?;
    let store = st.store.clone();
    blocking(move || {
        let policy = store.policy().clone();
        let readable = |c: &str| caller.may_read(&policy, c);
        let customer = match readable(CUSTOMER_CATEGORY) {
            true => store
                .get(CUSTOMER_CATEGORY, &id)?
                .filter(|item| !item.is_deleted())
                .map(|item| item_view(CUSTOMER_CATEGORY, &id, &item)),
            false => None,
        };
        let mut related = BTreeMap::new();
        for (name, cat) in &policy.categories {
            // An analyst never sees a private item, not even here.
            if name == CUSTOMER_CATEGORY || !readable(name) {
                continue;
            }
            if let Some(link) = &cat.customer_link {
                related.insert(name.clone(), related_items(&store, name, link, &id)?);
            }
        }
        if customer.is_none() && related.values().all(|r| r.items.is_empty()) {
            return Err(ApiError::not_found(format!(
                "no customer {id:?} and no item linked to it on this node"
            )));
        }
        Ok(Json(CustomerView {
            id,
            customer,
            related,
        }))
    })
    .await
}

/// A category in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CategoryStatus {
    /// `record` or `log`.
    pub kind: String,
    /// `up` or `local`.
    pub replicate: String,
    /// Items held (deleted records not counted).
    pub items: u64,
}

/// What `GET /v1/status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StatusView {
    /// This node's id.
    pub node_id: String,
    /// `city`, `province` or `national`.
    pub tier: String,
    /// The tiersync version.
    pub version: String,
    /// SHA-256 of the policy (equal on every node of a deployment).
    pub policy_digest: String,
    /// The last changelog sequence number.
    pub last_seq: u64,
    /// The data directory's incarnation (16 hex digits): a new one is taken
    /// when the node finds its data behind what its parent holds (a
    /// restore, a power cut of a `buffered` node).
    pub incarnation: String,
    /// Every declared category with its item count.
    pub categories: BTreeMap<String, CategoryStatus>,
    /// The parent and children links (state, lag in records and seconds,
    /// last error), as the replication layer reports them.
    #[schema(value_type = Object)]
    pub links: serde_json::Value,
    /// The node's process id (what `tiersync reload` signals).
    pub pid: u32,
    /// Configuration reloads since the start and the last one's outcome.
    pub config: crate::ops::ReloadStatus,
}

/// Node id, tier, version, item counts and replication links.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "ops",
    responses(
        (status = 200, description = "The node's status", body = StatusView),
        (status = 503, description = "unavailable", body = ErrorBody),
    )
)]
pub async fn status(State(st): State<ApiState>) -> Result<Json<StatusView>, ApiError> {
    let store = st.store.clone();
    let (last_seq, counts) =
        blocking(move || Ok((store.last_seq()?, store.item_counts()?))).await?;
    let policy = st.store.policy();
    let categories = policy
        .categories
        .iter()
        .map(|(name, cat)| {
            let status = CategoryStatus {
                kind: match cat.kind {
                    Kind::Record => "record",
                    Kind::Log => "log",
                }
                .to_string(),
                replicate: match cat.replicate {
                    Replicate::Up => "up",
                    Replicate::Local => "local",
                }
                .to_string(),
                items: counts.get(name).copied().unwrap_or(0),
            };
            (name.clone(), status)
        })
        .collect();
    Ok(Json(StatusView {
        node_id: st.node_id.to_string(),
        tier: st.tier.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        policy_digest: policy.digest_hex(),
        last_seq,
        incarnation: format!("{:016x}", st.store.incarnation()),
        categories,
        links: (st.status)(),
        pid: std::process::id(),
        config: st.ops.reload_status(),
    }))
}

/// This API as an OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "ops",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn openapi(State(st): State<ApiState>) -> Json<serde_json::Value> {
    Json(super::openapi::document(
        st.store.policy(),
        st.store.aggregates(),
    ))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 404, description = "metrics_disabled: the node runs without a recorder", body = ErrorBody),
    )
)]
pub async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let handle = st.metrics.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_disabled",
            "this node runs without a metrics recorder",
        )
    })?;
    crate::telemetry::collect_process();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

/// What `/healthz` and `/readyz` answer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HealthView {
    /// `ok`, or (`/readyz` only) `unavailable`.
    pub status: String,
    /// `/readyz` only: each check and its result (`ok` or why not); the
    /// uplink's state is reported but does not decide readiness, since a
    /// node serves reads and writes with its uplink down.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, String>,
}

/// Liveness: 200 while the process serves HTTP. Restart the node if this
/// fails.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "The process is alive", body = HealthView))
)]
pub async fn healthz() -> Json<HealthView> {
    Json(HealthView {
        status: "ok".into(),
        checks: BTreeMap::new(),
    })
}

/// Readiness: 200 when the node can take reads and writes (store readable,
/// writer running, not stopping), else 503 with the failed checks. Route
/// traffic only to a ready node.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "Ready", body = HealthView),
        (status = 503, description = "Not ready: see `checks`", body = HealthView),
    )
)]
pub async fn readyz(State(st): State<ApiState>) -> Response {
    let mut checks = BTreeMap::new();
    let store = st.store.clone();
    let readable = blocking(move || Ok(store.last_seq()?)).await;
    checks.insert(
        "store".to_string(),
        match readable {
            Ok(_) => "ok".to_string(),
            Err(e) => e.message,
        },
    );
    checks.insert(
        "writer".to_string(),
        if st.writer.is_closed() {
            "stopped".to_string()
        } else {
            "ok".to_string()
        },
    );
    checks.insert(
        "shutdown".to_string(),
        if st.ops.stopping() {
            "stopping".to_string()
        } else {
            "ok".to_string()
        },
    );
    let ready = checks.values().all(|v| v == "ok");
    let links = (st.status)();
    if let Some(state) = links["parent"]["state"].as_str() {
        checks.insert("uplink".to_string(), state.to_string());
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = HealthView {
        status: if ready { "ok" } else { "unavailable" }.into(),
        checks,
    };
    (code, Json(body)).into_response()
}
