//! Access control: every route without credentials, each role on each
//! route kind, revocation, per-token categories, rate limits.

use serde_json::json;
use tiersync_protocol::Tier;

use super::*;

/// Every route of the API with a method it answers, and a body for writes.
fn routes() -> Vec<(&'static str, &'static str, Option<J>)> {
    vec![
        ("GET", "/v1/records/customer/c-1", None),
        (
            "PUT",
            "/v1/records/customer/c-1",
            Some(json!({"name": "x"})),
        ),
        (
            "PATCH",
            "/v1/records/customer/c-1",
            Some(json!({"name": "y"})),
        ),
        ("DELETE", "/v1/records/customer/c-1", None),
        ("GET", "/v1/records/customer", None),
        (
            "POST",
            "/v1/records/customer",
            Some(json!({"key": "k", "fields": {"a": 1}})),
        ),
        ("GET", "/v1/records/customer/", None),
        ("GET", "/v1/customers/c-1", None),
        ("GET", "/v1/aggregates", None),
        ("GET", "/v1/aggregates/customers_by_city_segment", None),
        ("GET", "/v1/conflicts", None),
        ("GET", "/v1/status", None),
        ("GET", "/v1/tokens", None),
        (
            "POST",
            "/v1/tokens",
            Some(json!({"name": "n", "role": "admin"})),
        ),
        ("DELETE", "/v1/tokens/0123456789abcdef", None),
        ("GET", "/v1/openapi.json", None),
        ("GET", "/metrics", None),
    ]
}

async fn call_with(
    n: &Node,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &Option<J>,
) -> Resp {
    let body = body.as_ref().map(|b| b.to_string().into_bytes());
    n.call_as(
        token,
        method,
        path,
        body,
        &[("content-type", "application/json")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_valid_credentials_and_refusals_change_nothing() {
    let n = start().await;
    let w = n
        .send("PUT", "/v1/records/customer/c-1", &json!({"name": "a"}))
        .await;
    assert_eq!(w.status, 200, "{}", w.body);
    let seq = n.last_seq();
    let tokens_before = n.store.tokens().unwrap().len();
    // A well-formed token unknown here, as another node would have issued.
    let foreign = auth::issue("elsewhere", Role::Admin, None, 1).token;
    let mut tampered = n.admin.clone();
    tampered.pop();
    tampered.push(if n.admin.ends_with('0') { '1' } else { '0' });
    for (method, path, body) in routes() {
        for token in [
            None,
            Some("tst_nonsense"),
            Some(foreign.as_str()),
            Some(tampered.as_str()),
        ] {
            let r = call_with(&n, token, method, path, &body).await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (401, "unauthorized"),
                "{method} {path} with {token:?}: {}",
                r.body
            );
        }
    }
    assert_eq!(n.last_seq(), seq, "a refused request wrote");
    assert_eq!(n.store.tokens().unwrap().len(), tokens_before);
    // The probes stay open: they say nothing about data.
    for path in ["/healthz", "/readyz"] {
        let r = n.call_as(None, "GET", path, None, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_never_reads_a_private_item_at_any_tier() {
    for tier in [Tier::City, Tier::Province, Tier::National] {
        let n = start_custom(shipped_policy(), 1024 * 1024, |st| st.tier = tier).await;
        let op = |m, p, b: J| {
            let n = &n;
            async move { n.send(m, p, &b).await }
        };
        assert_eq!(
            op("PUT", "/v1/records/customer/c-1", json!({"name": "Li"}))
                .await
                .status,
            200
        );
        let w = op(
            "PUT",
            "/v1/records/opportunity/o-1",
            json!({"customer_id": "c-1", "stage": "won", "expected_value": 5, "expected_close": "2026-10"}),
        )
        .await;
        assert_eq!(w.status, 200, "{tier}: {}", w.body);
        let seq = n.last_seq();
        let analyst = Some(n.analyst.as_str());
        for (method, path, body) in [
            ("GET", "/v1/records/opportunity/o-1", None),
            ("GET", "/v1/records/opportunity", None),
            ("GET", "/v1/records/opportunity?prefix=o", None),
            ("PUT", "/v1/records/opportunity/o-2", Some(json!({"a": 1}))),
            ("DELETE", "/v1/records/opportunity/o-1", None),
            ("PUT", "/v1/records/customer/c-2", Some(json!({"a": 1}))),
            (
                "POST",
                "/v1/records/customer",
                Some(json!({"key": "k", "fields": {"a": 1}})),
            ),
            ("GET", "/v1/tokens", None),
            ("GET", "/metrics", None),
        ] {
            let r = call_with(&n, analyst, method, path, &body).await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (403, "forbidden"),
                "{tier}: analyst {method} {path}: {}",
                r.body
            );
        }
        assert_eq!(n.last_seq(), seq, "{tier}: a refused request wrote");
        // Shared data, the customer view (without private items) and
        // aggregates are the analyst's.
        for path in [
            "/v1/records/customer/c-1",
            "/v1/records/customer",
            "/v1/aggregates",
            "/v1/aggregates/customers_by_city_segment",
            "/v1/conflicts",
            "/v1/openapi.json",
            "/v1/status",
        ] {
            let r = n.call_as(analyst, "GET", path, None, &[]).await;
            assert_eq!(r.status, 200, "{tier}: analyst GET {path}: {}", r.body);
        }
        let view = n
            .call_as(analyst, "GET", "/v1/customers/c-1", None, &[])
            .await;
        assert_eq!(view.status, 200, "{}", view.body);
        let v = view.json();
        assert_eq!(v["customer"]["fields"]["name"], "Li");
        assert!(
            v["related"].get("opportunity").is_none()
                && v["related"].get("service_activity").is_none(),
            "{tier}: private items in an analyst's customer view: {v}"
        );
        assert!(v["related"].get("billing").is_some(), "{v}");
        // The operator sees them.
        let v = n.get("/v1/customers/c-1").await.json();
        assert_eq!(v["related"]["opportunity"]["items"][0]["key"], "o-1", "{v}");
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_checked_per_route() {
    let n = start().await;
    let (op, admin) = (Some(n.operator.as_str()), Some(n.admin.as_str()));
    // An admin reads and writes no data.
    for (method, path, body) in [
        ("GET", "/v1/records/customer/c-1", None),
        ("GET", "/v1/records/nope", None),
        ("PUT", "/v1/records/customer/c-1", Some(json!({"a": 1}))),
        ("GET", "/v1/customers/c-1", None),
        ("GET", "/v1/aggregates", None),
        ("GET", "/v1/conflicts", None),
    ] {
        let r = call_with(&n, admin, method, path, &body).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "forbidden"),
            "admin {method} {path}"
        );
    }
    // An operator does not manage tokens.
    for (method, path, body) in [
        ("GET", "/v1/tokens", None),
        (
            "POST",
            "/v1/tokens",
            Some(json!({"name": "me", "role": "admin"})),
        ),
    ] {
        let r = call_with(&n, op, method, path, &body).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "forbidden"),
            "operator {method} {path}"
        );
    }
    for path in ["/v1/status", "/metrics", "/v1/tokens", "/v1/openapi.json"] {
        assert_eq!(
            n.call_as(admin, "GET", path, None, &[]).await.status,
            200,
            "admin {path}"
        );
    }
    // An undeclared category is still the handler's 404 for data roles.
    let r = n.call_as(op, "GET", "/v1/records/nope", None, &[]).await;
    assert_eq!(r.code(), "unknown_category");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_created_listed_and_revoked_at_the_next_request() {
    let n = start().await;
    let r = n
        .send(
            "POST",
            "/v1/tokens",
            &json!({"name": "crm-app", "role": "operator"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["role"], "operator");
    // Only the hash is kept.
    let stored = n.store.token(&id).unwrap().unwrap();
    assert!(!format!("{stored:?}").contains(&token[token.len() - 64..]));
    let listed = n.get("/v1/tokens").await.json();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (entry["name"].as_str(), entry["revoked_ms"].clone()),
        (Some("crm-app"), J::Null)
    );
    assert!(entry.get("token").is_none() && !listed.to_string().contains(&token));

    let put = |t: String| {
        let n = &n;
        async move {
            n.call_as(
                Some(&t),
                "PUT",
                "/v1/records/customer/r-1",
                Some(b"{\"a\":1}".to_vec()),
                &[("content-type", "application/json")],
            )
            .await
        }
    };
    assert_eq!(put(token.clone()).await.status, 200);
    let r = n
        .send("DELETE", &format!("/v1/tokens/{id}"), &json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["revoked_ms"].is_u64());
    let seq = n.last_seq();
    let r = put(token.clone()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "unauthorized"),
        "{}",
        r.body
    );
    assert_eq!(n.last_seq(), seq);
    let r = n
        .send("DELETE", "/v1/tokens/0000000000000000", &json!({}))
        .await;
    assert_eq!(r.code(), "not_found");

    // Bad requests create nothing.
    let before = n.store.tokens().unwrap().len();
    for body in [
        json!({"name": "x", "role": "root"}),
        json!({"name": "", "role": "operator"}),
        json!({"name": "x", "role": "analyst", "categories": ["opportunity"]}),
        json!({"name": "x", "role": "operator", "categories": ["nope"]}),
        json!({"name": "x", "role": "admin", "categories": ["customer"]}),
        json!({"name": "x", "role": "operator", "extra": 1}),
    ] {
        let r = n.send("POST", "/v1/tokens", &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    assert_eq!(n.store.tokens().unwrap().len(), before);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limited_to_categories_touches_only_those() {
    let n = start().await;
    assert_eq!(
        n.send("PUT", "/v1/records/customer/c-1", &json!({"n": 1}))
            .await
            .status,
        200
    );
    let t = issue_token(&n.store, Role::Operator, Some(vec!["billing"]));
    let t = Some(t.as_str());
    let r = n
        .call_as(t, "GET", "/v1/records/customer/c-1", None, &[])
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = call_with(
        &n,
        t,
        "PUT",
        "/v1/records/billing/b-1",
        &Some(json!({"customer_id": "c-1", "amount": 3, "billed_at": "2026-09-01"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = n
        .call_as(t, "GET", "/v1/customers/c-1", None, &[])
        .await
        .json();
    assert_eq!(v["customer"], J::Null, "{v}");
    assert_eq!(v["related"]["billing"]["items"][0]["key"], "b-1", "{v}");
    assert!(v["related"].get("opportunity").is_none(), "{v}");
    let r = n
        .call_as(
            t,
            "GET",
            "/v1/aggregates/customers_by_city_segment",
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        n.call_as(t, "GET", "/v1/aggregates/billing_by_city_month", None, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        n.call_as(t, "GET", "/v1/conflicts", None, &[]).await.status,
        403
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_token_gets_429_while_another_is_served() {
    // One request an hour after a burst of 3: the 4th is refused however
    // slowly the test runs.
    let n = start_custom(shipped_policy(), 1024, |st| {
        st.rate_limits = Some(auth::RateLimits::with_period(
            std::time::Duration::from_secs(3600),
            3,
        ));
    })
    .await;
    let flood = Some(n.analyst.as_str());
    for _ in 0..3 {
        assert_eq!(
            n.call_as(flood, "GET", "/v1/aggregates", None, &[])
                .await
                .status,
            200
        );
    }
    let r = n.call_as(flood, "GET", "/v1/aggregates", None, &[]).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "rate_limited"),
        "{}",
        r.body
    );
    assert!(
        r.retry_after
            .as_deref()
            .is_some_and(|s| s.parse::<u64>().unwrap() >= 1)
    );
    let other = n
        .call_as(Some(&n.operator), "GET", "/v1/aggregates", None, &[])
        .await;
    assert_eq!(other.status, 200, "{}", other.body);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_declares_the_bearer_scheme() {
    let n = start().await;
    let doc = n.get("/v1/openapi.json").await.json();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "{}",
        doc["components"]["securitySchemes"]
    );
    assert_eq!(doc["security"][0]["bearer"], json!([]));
    n.stop().await;
}

#[test]
fn the_first_admin_token_is_written_0600_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        tiersync_protocol::NodeId::new("city-a").unwrap(),
        Arc::new(shipped_policy()),
        Durability::Fsync,
    )
    .unwrap();
    let file = auth::bootstrap_admin(&store, dir.path(), 1)
        .unwrap()
        .unwrap();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&file).unwrap();
    let caller = auth::authenticate(&store, Some(token.trim())).unwrap();
    assert_eq!(
        (caller.role, caller.name.as_str()),
        (Role::Admin, auth::BOOTSTRAP_NAME)
    );
    // An admin exists: nothing new.
    assert!(
        auth::bootstrap_admin(&store, dir.path(), 2)
            .unwrap()
            .is_none()
    );
    // Every admin revoked: a new one at the next start.
    store.token_revoke(&caller.id, 3).unwrap();
    assert!(auth::authenticate(&store, Some(token.trim())).is_err());
    let again = auth::bootstrap_admin(&store, dir.path(), 4)
        .unwrap()
        .unwrap();
    let token2 = std::fs::read_to_string(again).unwrap();
    assert_ne!(token, token2);
    assert!(auth::authenticate(&store, Some(token2.trim())).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_text_plain_post_is_refused_with_415() {
    let n = start().await;
    let op = Some(n.operator.as_str());
    let body = || Some(br#"{"name":"x"}"#.to_vec());
    for (method, path) in [
        ("POST", "/v1/records/customer"),
        ("PUT", "/v1/records/customer/c-1"),
        ("PATCH", "/v1/records/customer/c-1"),
    ] {
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            let r = n
                .call_as(op, method, path, body(), &[("content-type", ct)])
                .await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (415, "unsupported_media_type"),
                "{method} {path} {ct}: {}",
                r.body
            );
        }
        let r = n.call_as(op, method, path, body(), &[]).await;
        assert_eq!(r.status, 415, "{method} {path} without a content type");
    }
    assert_eq!(n.last_seq(), 0, "a refused write wrote");
    let ok = n
        .call_as(
            op,
            "PUT",
            "/v1/records/customer/c-1",
            body(),
            &[("content-type", "application/json; charset=utf-8")],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused() {
    let n = start().await;
    let op = Some(n.operator.as_str());
    for host in ["evil.example.com", "attacker.test:8411", "127.0.0.2"] {
        let r = n
            .call_as(op, "GET", "/v1/records/customer", None, &[("host", host)])
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (421, "wrong_host"),
            "{host}: {}",
            r.body
        );
        let r = n
            .call_as(
                op,
                "PUT",
                "/v1/records/customer/c-1",
                Some(b"{\"a\":1}".to_vec()),
                &[("host", host), ("content-type", "application/json")],
            )
            .await;
        assert_eq!(r.status, 421, "{host}");
    }
    assert_eq!(n.last_seq(), 0);
    for host in ["localhost:1", "127.0.0.1", "city-a", "[::1]:9"] {
        let r = n
            .call_as(op, "GET", "/v1/records/customer", None, &[("host", host)])
            .await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    // Probes answer whatever the host (a kubelet names the pod's address).
    let r = n
        .call_as(None, "GET", "/healthz", None, &[("host", "10.1.2.3:8400")])
        .await;
    assert_eq!(r.status, 200);
    n.stop().await;
}

/// A server with `options` (TLS, timeouts) around the usual state.
async fn start_serving(options: serve::ServeOptions) -> (Node, std::net::SocketAddr) {
    // A plain node for its store and tokens, then a second listener with
    // `options` on the same state.
    let n = start().await;
    let (writer, _thread) = Writer::spawn(n.store.clone(), 8).unwrap();
    let state = ApiState::new(
        n.store.clone(),
        writer,
        NodeId::new("city-a").unwrap(),
        Tier::City,
        1 << 20,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_with(listener, state, options, std::future::pending()));
    (n, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_dropped_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let options = serve::ServeOptions {
        header_timeout: std::time::Duration::from_millis(300),
        ..serve::ServeOptions::default()
    };
    let (n, addr) = start_serving(options).await;
    // Half a request line, then nothing.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0")
        .await
        .unwrap();
    // Meanwhile a whole request is served.
    let token = n.operator.clone();
    let served = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .get(&format!("http://{addr}/v1/status"))
            .header("authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    })
    .await
    .unwrap();
    assert_eq!(served, 200);
    // The slow one is closed by the server (EOF, or a reset), not served.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        slow.read_to_end(&mut buf),
    )
    .await
    .expect("the slow connection was never dropped");
    let text = String::from_utf8_lossy(&buf);
    assert!(read.is_err() || !text.contains("200 OK"), "{text}");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_tls_with_the_node_certificate() {
    let dir = tempfile::tempdir().unwrap();
    crate::certs::init_ca(dir.path()).unwrap();
    let id = NodeId::new("city-a").unwrap();
    let files = crate::certs::issue_with_hosts(
        dir.path(),
        &id,
        Some(Tier::City),
        30,
        &["127.0.0.1".into()],
    )
    .unwrap();
    let tls = crate::config::TlsSection {
        ca: dir.path().join(crate::certs::CA_CERT_FILE),
        cert: files.cert,
        key: files.key,
        crl: None,
    };
    let config = Arc::new(crate::tls::api_server_config(&tls).unwrap());
    let options = serve::ServeOptions {
        tls: Some(config),
        ..serve::ServeOptions::default()
    };
    let (n, addr) = start_serving(options).await;
    let (token, ca) = (n.operator.clone(), tls.ca.clone());
    tokio::task::spawn_blocking(move || {
        let creds = crate::client::Credentials {
            token: Some(token.clone()),
            ca: Some(ca.clone()),
        };
        let timeout = std::time::Duration::from_secs(10);
        let c =
            crate::client::Client::with_credentials(&format!("https://{addr}"), timeout, &creds)
                .unwrap();
        assert_eq!(c.status().unwrap()["node_id"], "city-a");
        // Without the CA there is no https client; plain HTTP gets no answer.
        let no_ca = crate::client::Credentials::token(token.clone());
        assert!(
            crate::client::Client::with_credentials(&format!("https://{addr}"), timeout, &no_ca)
                .is_err()
        );
        let plain =
            crate::client::Client::with_credentials(&format!("http://{addr}"), timeout, &no_ca)
                .unwrap();
        assert!(plain.status().is_err());
        // A CA that did not sign the certificate is refused.
        let other = tempfile::tempdir().unwrap();
        crate::certs::init_ca(other.path()).unwrap();
        let wrong = crate::client::Credentials {
            token: Some(token),
            ca: Some(other.path().join(crate::certs::CA_CERT_FILE)),
        };
        let c =
            crate::client::Client::with_credentials(&format!("https://{addr}"), timeout, &wrong)
                .unwrap();
        let e = c.status().unwrap_err();
        assert!(
            matches!(e, crate::client::ClientError::Transport { .. }),
            "{e}"
        );
    })
    .await
    .unwrap();
    n.stop().await;
}
