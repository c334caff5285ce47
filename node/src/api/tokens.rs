//! `/v1/tokens`: list, create and revoke this node's API tokens (admin).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::issue;
use super::error::{ApiError, ErrorBody};
use super::{ApiPath, ApiState, RawBody, blocking};
use crate::store::{Role, StoredToken};

/// Longest token name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// A token as listed: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Public id (the part of the token after `tst_`, before the secret).
    pub id: String,
    /// Who holds it.
    pub name: String,
    /// `operator`, `analyst` or `admin`.
    pub role: String,
    /// The only categories it may touch (`null`: all its role allows).
    pub categories: Option<Vec<String>>,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// Revoked, ms since the epoch (`null`: valid).
    pub revoked_ms: Option<u64>,
}

impl From<&StoredToken> for TokenView {
    fn from(t: &StoredToken) -> Self {
        Self {
            id: t.id.clone(),
            name: t.name.clone(),
            role: t.role.to_string(),
            categories: t.categories.clone(),
            created_ms: t.created_ms,
            revoked_ms: t.revoked_ms,
        }
    }
}

/// A new token: shown once, in this answer only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    /// The bearer token (`Authorization: Bearer <token>`). The node keeps
    /// only its hash: store it now.
    pub token: String,
    /// What was created.
    #[serde(flatten)]
    pub info: TokenView,
}

/// The body of `POST /v1/tokens`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Who will hold it (1 to 128 bytes, no control characters).
    pub name: String,
    /// `operator`, `analyst` or `admin`.
    pub role: String,
    /// Optional: the only categories it may touch (declared ones).
    #[serde(default)]
    pub categories: Option<Vec<String>>,
}

fn invalid(message: String) -> ApiError {
    ApiError::bad_request("invalid_document", message)
}

/// Checks a token request against the policy.
fn validate(
    st: &ApiState,
    req: TokenRequest,
) -> Result<(String, Role, Option<Vec<String>>), ApiError> {
    let name = req.name.trim().to_string();
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "name: 1 to {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    let role: Role = req
        .role
        .parse()
        .map_err(|e: String| invalid(format!("role: {e}")))?;
    let policy = st.store.policy();
    if let Some(cats) = &req.categories {
        if role == Role::Admin {
            return Err(invalid(
                "categories: an admin token touches no items; leave categories out".into(),
            ));
        }
        if cats.is_empty() {
            return Err(invalid(
                "categories: an empty list allows nothing; leave it out for all".into(),
            ));
        }
        for c in cats {
            let Some(cat) = policy.categories.get(c) else {
                return Err(invalid(format!(
                    "categories: {c:?} is not declared by the policy"
                )));
            };
            if role == Role::Analyst && cat.replicate != tiersync_protocol::Replicate::Up {
                return Err(invalid(format!(
                    "categories: {c:?} is private; an analyst never reads private items"
                )));
            }
        }
    }
    Ok((name, role, req.categories))
}

/// List this node's tokens (revoked ones included), without secrets.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses(
        (status = 200, description = "Every token", body = Vec<TokenView>),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: not an admin token", body = ErrorBody),
    ))]
pub async fn list(State(st): State<ApiState>) -> Result<Json<Vec<TokenView>>, ApiError> {
    let store = st.store.clone();
    blocking(move || Ok(Json(store.tokens()?.iter().map(TokenView::from).collect()))).await
}

/// Create a token. The answer holds the token itself, once; the node keeps
/// only its salted hash.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens",
    request_body(content = TokenRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created: the token is in this answer only", body = NewToken),
        (status = 400, description = "invalid_json, invalid_document", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: not an admin token", body = ErrorBody),
    ))]
pub async fn create(
    State(st): State<ApiState>,
    body: RawBody,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    let req: TokenRequest = serde_json::from_slice(&body.0)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("token request: {e}")))?;
    let (name, role, categories) = validate(&st, req)?;
    let issued = issue(&name, role, categories, crate::now_ms());
    let store = st.store.clone();
    let stored = issued.stored.clone();
    blocking(move || Ok(store.token_insert(&stored)?)).await?;
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            token: issued.token,
            info: TokenView::from(&issued.stored),
        }),
    ))
}

/// Revoke a token: the next request with it gets 401.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's public id")),
    responses(
        (status = 200, description = "Revoked (or already revoked)", body = TokenView),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden: not an admin token", body = ErrorBody),
        (status = 404, description = "not_found: no such token", body = ErrorBody),
    ))]
pub async fn revoke(
    State(st): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TokenView>, ApiError> {
    let store = st.store.clone();
    blocking(move || match store.token_revoke(&id, crate::now_ms())? {
        Some(t) => Ok(Json(TokenView::from(&t))),
        None => Err(ApiError::not_found(format!("no token with id {id:?}"))),
    })
    .await
}
