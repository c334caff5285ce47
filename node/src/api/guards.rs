//! Checks that run before authentication: the `Host` header (against DNS
//! rebinding: a page of another site whose name resolves to this node),
//! the `Content-Type` of writes (a cross-site form can post `text/plain`
//! without a preflight; JSON needs one), and the whole-request timeout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::error::ApiError;

/// The media types a write may carry.
pub const WRITE_MEDIA_TYPES: [&str; 3] = [
    "application/json",
    "application/x-ndjson",
    "application/ndjson",
];

/// The host names a request may name: `None` accepts any.
pub type AllowedHosts = Option<Arc<BTreeSet<String>>>;

/// `localhost`, the loopback addresses, the node id, the listen address
/// (if specified) and `extra`; `None` if `extra` holds `"*"`.
pub fn allowed_hosts(node_id: &str, listen: Option<SocketAddr>, extra: &[String]) -> AllowedHosts {
    if extra.iter().any(|h| h.trim() == "*") {
        return None;
    }
    let mut set: BTreeSet<String> = ["localhost", "127.0.0.1", "::1", node_id]
        .into_iter()
        .map(str::to_string)
        .collect();
    if let Some(addr) = listen
        && !addr.ip().is_unspecified()
    {
        set.insert(addr.ip().to_string());
    }
    set.extend(extra.iter().map(|h| normalize(h)));
    Some(Arc::new(set))
}

/// A host name without port, brackets or trailing dot, in lower case.
fn normalize(host: &str) -> String {
    let h = host.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match h.rsplit_once(':') {
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => h,
        }
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn is_write(method: &Method) -> bool {
    matches!(*method, Method::PUT | Method::PATCH | Method::POST)
}

/// The route-level checks before authentication (`/healthz` and `/readyz`
/// are exempt: probes name the pod's address).
pub async fn browser(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("", |m| m.as_str());
    if super::auth::is_open(route) {
        return next.run(req).await;
    }
    if let Some(allowed) = &st.hosts {
        let named = req
            .uri()
            .host()
            .map(str::to_string)
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .map(|h| normalize(&h));
        match named {
            Some(h) if allowed.contains(&h) => {}
            other => {
                return ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "wrong_host",
                    format!(
                        "this node does not answer for host {:?}; it answers for: {} (add names to [api] hosts)",
                        other.unwrap_or_default(),
                        allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
                .into_response();
            }
        }
    }
    if is_write(req.method()) {
        let media = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        if !media
            .as_deref()
            .is_some_and(|m| WRITE_MEDIA_TYPES.contains(&m))
        {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "a write needs Content-Type application/json (or application/x-ndjson for a bulk write), not {}",
                    media.map_or_else(|| "none".to_string(), |m| format!("{m:?}"))
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Answers 408 `request_timeout` when a request (its body included) takes
/// longer than `[api] request_timeout`.
pub async fn deadline(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(st.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request took longer than {} s",
                st.request_timeout.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize("LocalHost:8411"), "localhost");
        assert_eq!(normalize("[::1]:80"), "::1");
        assert_eq!(normalize("::1"), "::1");
        assert_eq!(normalize("crm.example.org."), "crm.example.org");
        let set = allowed_hosts("hangzhou", None, &["crm.example.org".into()]);
        let set = set.as_deref().cloned().unwrap_or_default();
        assert!(
            set.contains("hangzhou")
                && set.contains("crm.example.org")
                && set.contains("127.0.0.1")
        );
        assert!(allowed_hosts("x", None, &["*".into()]).is_none());
    }
}
