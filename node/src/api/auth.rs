//! Who is calling, and may they: bearer tokens, roles, per-token
//! categories, per-token rate limits, and the audit log.
//!
//! Every route but `/healthz` and `/readyz` (liveness and readiness probes,
//! which tell nothing about data) needs `Authorization: Bearer <token>`. A
//! token is `tst_<id>_<secret>`: the id (16 hex digits) finds the stored
//! record, the secret (64 hex digits, 256 random bits) is checked against
//! its salted SHA-256 in constant time. The store is read on every request,
//! so a revocation takes effect at the next one.
//!
//! | route | who |
//! |---|---|
//! | `GET /v1/records/…` | operator (any category); analyst (`up` categories only) |
//! | `PUT`/`PATCH`/`DELETE`/`POST /v1/records/…` | operator |
//! | `GET /v1/customers/{id}` | operator; analyst (private related items left out) |
//! | `GET /v1/aggregates…`, `GET /v1/conflicts` | operator, analyst |
//! | `GET /metrics` | admin, operator |
//! | `/v1/tokens…` | admin |
//! | `GET /v1/status`, `/v1/openapi.json` | any valid token (no personal data) |
//!
//! A token with a category list touches only those categories (records,
//! customer view, aggregates over them) and not the conflict ledger.
//!
//! Audit: every read of personal data (items, scans, customer views, the
//! conflict ledger), every write, every token change and every refused
//! credential is one `tracing` event with target [`AUDIT_TARGET`]: who
//! (token name and id), role, method, route, path, status, and the time.

use std::collections::BTreeSet;
use std::io::Write;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tiersync_protocol::{Policy, Replicate};

use super::ApiState;
use super::error::ApiError;
use crate::store::{Role, Store, StoreError, StoredToken};

/// The `tracing` target of audit events.
pub const AUDIT_TARGET: &str = "tiersync::audit";
/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "tst_";
/// Name of the admin token a node creates at its first start.
pub const BOOTSTRAP_NAME: &str = "bootstrap-admin";
/// File (in the data directory) the first admin token is written to.
pub const BOOTSTRAP_FILE: &str = "admin.token";

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
const SALT_BYTES: usize = 16;

/// The authenticated caller of a request (in the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's public id.
    pub id: String,
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The only categories it may touch, if limited.
    pub categories: Option<BTreeSet<String>>,
}

impl Caller {
    fn from_token(t: &StoredToken) -> Self {
        Self {
            id: t.id.clone(),
            name: t.name.clone(),
            role: t.role,
            categories: t.categories.as_ref().map(|c| c.iter().cloned().collect()),
        }
    }

    fn listed(&self, category: &str) -> bool {
        self.categories
            .as_ref()
            .is_none_or(|c| c.contains(category))
    }

    /// Whether it may read items of `category`: an operator any, an analyst
    /// only shared (`up`) ones, an admin none; within its category list.
    pub fn may_read(&self, policy: &Policy, category: &str) -> bool {
        let shared = policy
            .categories
            .get(category)
            .is_some_and(|c| c.replicate == Replicate::Up);
        self.listed(category)
            && match self.role {
                Role::Operator => true,
                Role::Analyst => shared,
                Role::Admin => false,
            }
    }

    /// Whether it may write items of `category`: operators only.
    pub fn may_write(&self, category: &str) -> bool {
        self.role == Role::Operator && self.listed(category)
    }
}

/// A token just issued: the secret (shown once) and what the node keeps.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The whole token, `tst_<id>_<secret>`: give it to its holder.
    pub token: String,
    /// The stored record (hash only).
    pub stored: StoredToken,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn digest(salt: &[u8], secret: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().to_vec()
}

/// A new random token for `name` with `role`.
pub fn issue(name: &str, role: Role, categories: Option<Vec<String>>, now_ms: u64) -> Issued {
    let id = random_hex(ID_BYTES);
    let secret = random_hex(SECRET_BYTES);
    let mut salt = vec![0u8; SALT_BYTES];
    rand::rng().fill_bytes(&mut salt);
    let hash = digest(&salt, &secret);
    Issued {
        token: format!("{TOKEN_PREFIX}{id}_{secret}"),
        stored: StoredToken {
            id,
            name: name.to_string(),
            role,
            categories,
            salt,
            hash,
            created_ms: now_ms,
            revoked_ms: None,
        },
    }
}

/// `(id, secret)` of a well-formed token.
fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == 2 * n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, ID_BYTES) && hex(secret, SECRET_BYTES)).then_some((id, secret))
}

/// Why a request has no valid credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Malformed, unknown, wrong or revoked.
    Invalid,
}

/// The caller presenting `token` at this node.
pub fn authenticate(store: &Store, token: Option<&str>) -> Result<Caller, AuthError> {
    let token = token.ok_or(AuthError::Refused(Refusal::Missing))?;
    let (id, secret) = split_token(token).ok_or(AuthError::Refused(Refusal::Invalid))?;
    let stored = store
        .token(id)?
        .ok_or(AuthError::Refused(Refusal::Invalid))?;
    let ok: bool = digest(&stored.salt, secret).ct_eq(&stored.hash).into();
    if !ok || !stored.active() {
        return Err(AuthError::Refused(Refusal::Invalid));
    }
    Ok(Caller::from_token(&stored))
}

/// Authentication failures.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credentials are missing or not valid here.
    #[error("{0:?}")]
    Refused(Refusal),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bootstrap token file could not be written.
    #[error("cannot write the first admin token to {file}: {source}")]
    Bootstrap {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Refused(Refusal::Missing) => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing credentials: send the header Authorization: Bearer <token> (tiersync token create)",
            ),
            AuthError::Refused(Refusal::Invalid) => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid credentials: the bearer token is malformed, unknown at this node, or revoked",
            ),
            AuthError::Store(e) => e.into(),
            AuthError::Bootstrap { .. } => ApiError::unavailable(e.to_string()),
        }
    }
}

/// At a node with no valid admin token (its first start, or after every
/// admin token was revoked): issues one named [`BOOTSTRAP_NAME`], writes it
/// to `data_dir/`[`BOOTSTRAP_FILE`] (mode 0600, synced) and only then stores
/// its hash. Returns the file written, if any.
pub fn bootstrap_admin(
    store: &Store,
    data_dir: &Path,
    now_ms: u64,
) -> Result<Option<std::path::PathBuf>, AuthError> {
    if store.has_active_admin()? {
        return Ok(None);
    }
    let issued = issue(BOOTSTRAP_NAME, Role::Admin, None, now_ms);
    let file = data_dir.join(BOOTSTRAP_FILE);
    let failed = |source| AuthError::Bootstrap {
        file: file.display().to_string(),
        source,
    };
    let _ = std::fs::remove_file(&file);
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(failed)?
    };
    f.write_all(format!("{}\n", issued.token).as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
        .map_err(failed)?;
    store.token_insert(&issued.stored)?;
    Ok(Some(file))
}

/// Per-token request rate limits (`[api] rate_limit_per_second`,
/// `rate_limit_burst`).
pub struct RateLimits {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

impl RateLimits {
    /// `per_second` requests a second per token, bursts up to `burst`;
    /// `None` if `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Arc<Self>> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(rate);
        Some(Arc::new(Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }))
    }

    /// One request per `period` on average, bursts up to `burst`.
    pub fn with_period(period: std::time::Duration, burst: u32) -> Arc<Self> {
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Arc::new(Self {
            limiter: RateLimiter::keyed(quota),
        })
    }

    /// `Ok` if token `id` may make a request now, else the seconds to wait.
    fn check(&self, id: &str) -> Result<(), u64> {
        self.limiter
            .check_key(&id.to_string())
            .map_err(|not_until| {
                not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs()
                    .max(1)
            })
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Nothing (health probes).
    Open,
    /// Any valid token.
    Any,
    /// One of these roles.
    Roles(&'static [Role]),
    /// Reading the `category` path parameter's items.
    Read,
    /// Writing them.
    Write,
    /// An aggregate: operator or analyst, its source category listed.
    Aggregate,
    /// The conflict ledger: operator or analyst without a category list.
    Ledger,
}

const DATA_READERS: &[Role] = &[Role::Operator, Role::Analyst];
const ADMIN: &[Role] = &[Role::Admin];
const OPS: &[Role] = &[Role::Admin, Role::Operator];

/// Whether a route answers without credentials: the liveness and
/// readiness probes only.
pub fn is_open(route: &str) -> bool {
    matches!(route, "/healthz" | "/readyz")
}

fn need(route: &str, method: &Method) -> Need {
    let write = matches!(
        *method,
        Method::PUT | Method::PATCH | Method::DELETE | Method::POST
    );
    match route {
        r if is_open(r) => Need::Open,
        "/v1/records/{category}/{key}" | "/v1/records/{category}" if write => Need::Write,
        "/v1/records/{category}/{key}" | "/v1/records/{category}" => Need::Read,
        "/v1/customers/{id}" | "/v1/aggregates" => Need::Roles(DATA_READERS),
        "/v1/aggregates/{name}" => Need::Aggregate,
        "/v1/conflicts" => Need::Ledger,
        "/metrics" => Need::Roles(OPS),
        "/v1/tokens" | "/v1/tokens/{id}" => Need::Roles(ADMIN),
        _ => Need::Any,
    }
}

/// What the audit log calls a request, if it logs it.
fn audited(route: &str, method: &Method) -> Option<&'static str> {
    let get = *method == Method::GET || *method == Method::HEAD;
    match route {
        "/v1/records/{category}/{key}" | "/v1/records/{category}" if get => Some("read"),
        "/v1/customers/{id}" | "/v1/conflicts" => Some("read"),
        "/v1/records/{category}/{key}" | "/v1/records/{category}" => Some("write"),
        "/v1/tokens" | "/v1/tokens/{id}" if !get => Some("tokens"),
        _ => None,
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The `Authorization: Bearer` token, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Whether `caller` may make this request (403 `forbidden` if not).
fn authorize(
    st: &ApiState,
    caller: &Caller,
    need: Need,
    param: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ApiError> {
    let policy = st.store.policy();
    let role = caller.role;
    match need {
        Need::Open | Need::Any => Ok(()),
        Need::Roles(roles) if roles.contains(&role) => Ok(()),
        Need::Roles(roles) => Err(forbidden(format!(
            "a token of role {role} may not use this endpoint; it needs: {}",
            roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        ))),
        Need::Read | Need::Write => {
            let category = param("category").unwrap_or_default();
            // An undeclared category is the handler's 404, whoever asks.
            if !policy.categories.contains_key(&category) {
                return if role == Role::Admin {
                    Err(forbidden(format!(
                        "a token of role {role} reads and writes no items"
                    )))
                } else {
                    Ok(())
                };
            }
            let (ok, verb) = match need {
                Need::Write => (caller.may_write(&category), "write"),
                _ => (caller.may_read(policy, &category), "read"),
            };
            if ok {
                Ok(())
            } else {
                Err(forbidden(format!(
                    "token {:?} (role {role}) may not {verb} category {category:?}",
                    caller.name
                )))
            }
        }
        Need::Aggregate => {
            authorize(st, caller, Need::Roles(DATA_READERS), param)?;
            let name = param("name").unwrap_or_default();
            let source = st.store.aggregates().iter().find(|a| a.name == name);
            match source {
                Some(a) if !caller.listed(&a.source) => Err(forbidden(format!(
                    "token {:?} may not read aggregate {name:?} (over category {:?})",
                    caller.name, a.source
                ))),
                _ => Ok(()),
            }
        }
        Need::Ledger => {
            authorize(st, caller, Need::Roles(DATA_READERS), param)?;
            if caller.categories.is_some() {
                return Err(forbidden(format!(
                    "token {:?} is limited to some categories; the conflict ledger spans all",
                    caller.name
                )));
            }
            Ok(())
        }
    }
}

/// The middleware on every route: authenticates, authorizes, rate-limits,
/// then runs the handler (with the [`Caller`] in the request's extensions)
/// and writes the audit event.
pub async fn guard(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |m| m.as_str().to_string());
    let method = req.method().clone();
    let need = need(&route, &method);
    if need == Need::Open {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let (mut parts, body) = req.into_parts();
    let params = RawPathParams::from_request_parts(&mut parts, &st)
        .await
        .ok();
    let param = |name: &str| {
        params.as_ref().and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    };
    let action = audited(&route, &method);
    let store = st.store.clone();
    let token = bearer(&parts.headers).map(str::to_string);
    let authenticated = tokio::task::spawn_blocking(move || authenticate(&store, token.as_deref()))
        .await
        .unwrap_or_else(|e| Err(AuthError::Store(StoreError::Stopped(e.to_string()))));
    let caller = match authenticated {
        Ok(c) => c,
        Err(e) => {
            let err = ApiError::from(e);
            if err.status == StatusCode::UNAUTHORIZED {
                tracing::warn!(target: AUDIT_TARGET, action = "denied", who = "", method = %method,
                    route = %route, path = %path, status = 401u16, at_ms = crate::now_ms(),
                    "request without valid credentials");
                let mut resp = err.into_response();
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tiersync\""),
                );
                return resp;
            }
            return err.into_response();
        }
    };
    if let Err(e) = authorize(&st, &caller, need, &param) {
        tracing::warn!(target: AUDIT_TARGET, action = "denied", who = %caller.name, token = %caller.id,
            role = %caller.role, method = %method, route = %route, path = %path,
            status = e.status.as_u16(), at_ms = crate::now_ms(), "request refused: {}", e.message);
        return e.into_response();
    }
    if let Some(limits) = &st.rate_limits
        && let Err(wait) = limits.check(&caller.id)
    {
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "token {:?} is over its rate limit; retry in {wait} s",
                caller.name
            ),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return resp;
    }
    parts.extensions.insert(caller.clone());
    let resp = next.run(Request::from_parts(parts, body)).await;
    if let Some(action) = action {
        tracing::info!(target: AUDIT_TARGET, action, who = %caller.name, token = %caller.id,
            role = %caller.role, method = %method, route = %route, path = %path,
            status = resp.status().as_u16(), at_ms = crate::now_ms(), "audit");
    }
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn tokens_split_only_when_well_formed() {
        let i = issue("x", Role::Operator, None, 1);
        let (id, secret) = split_token(&i.token).unwrap();
        assert_eq!(id, i.stored.id);
        assert_eq!(digest(&i.stored.salt, secret), i.stored.hash);
        assert!(!i.token.contains(&hex::encode(&i.stored.hash)));
        for bad in [
            "",
            "tst_",
            "tst_abc_def",
            "xyz_0123456789abcdef_00",
            &i.token[1..],
        ] {
            assert!(split_token(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn bearer_header_is_parsed() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tst_x"),
        );
        assert_eq!(bearer(&h), Some("tst_x"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
