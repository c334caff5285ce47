//! API tests against a real server on 127.0.0.1 (ureq as the client), with
//! the shipped policy: every endpoint, every bad input (status, error code,
//! and that nothing changed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value as J, json};
use tiersync_protocol::{NodeId, Policy, Tier};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;
use crate::config::{Durability, load_policy};
use crate::store::Role;

mod access;

fn shipped_policy_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples/policy.toml")
}

pub(super) fn shipped_policy() -> Policy {
    load_policy(&shipped_policy_path()).unwrap()
}

/// The process-wide recorder (the `metrics` macros need a global one).
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

pub(super) struct Node {
    pub(super) base: String,
    pub(super) store: Arc<Store>,
    /// Bearer tokens of each role, issued at start.
    pub(super) operator: String,
    pub(super) analyst: String,
    pub(super) admin: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

pub(super) struct Resp {
    pub(super) status: u16,
    pub(super) body: String,
    pub(super) allow: Option<String>,
    pub(super) content_type: Option<String>,
    pub(super) retry_after: Option<String>,
}

impl Resp {
    pub(super) fn json(&self) -> J {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The error code, after checking the error body's shape.
    pub(super) fn code(&self) -> String {
        let j = self.json();
        assert!(j["error"]["message"].is_string(), "no error message: {j}");
        j["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code: {j}"))
            .to_string()
    }
}

pub(super) fn issue_token(store: &Store, role: Role, categories: Option<Vec<&str>>) -> String {
    let cats = categories.map(|c| c.into_iter().map(String::from).collect());
    let issued = auth::issue(&format!("test-{role}"), role, cats, 1);
    store.token_insert(&issued.stored).unwrap();
    issued.token
}

pub(super) async fn start_custom(
    policy: Policy,
    max_body_bytes: usize,
    customize: impl FnOnce(&mut ApiState),
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let id = NodeId::new("city-a").unwrap();
    let store =
        Arc::new(Store::open(dir.path(), id.clone(), Arc::new(policy), Durability::Fsync).unwrap());
    let (writer, _thread) = Writer::spawn(store.clone(), 64).unwrap();
    let mut state = ApiState::new(store.clone(), writer, id, Tier::City, max_body_bytes);
    state.status = Arc::new(|| json!({"parent": {"state": "connected", "lag_records": 0}}));
    state.metrics = Some(recorder());
    customize(&mut state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    Node {
        base,
        operator: issue_token(&store, Role::Operator, None),
        analyst: issue_token(&store, Role::Analyst, None),
        admin: issue_token(&store, Role::Admin, None),
        store,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

async fn start_with(policy: Policy, max_body_bytes: usize) -> Node {
    start_custom(policy, max_body_bytes, |_| {}).await
}

pub(super) async fn start() -> Node {
    start_with(shipped_policy(), 1024 * 1024).await
}

impl Node {
    /// The token a test uses for `path` unless it says otherwise: admin
    /// for the ops endpoints, operator for data.
    pub(super) fn token_for(&self, path: &str) -> &str {
        let admin = ["/metrics", "/v1/tokens"];
        if admin.iter().any(|p| path.starts_with(p)) {
            &self.admin
        } else {
            &self.operator
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Resp {
        let token = self.token_for(path).to_string();
        self.call_as(
            Some(&token),
            method,
            path,
            body,
            &[("content-type", "application/json")],
        )
        .await
    }

    /// A request with `token` (none if `None`) and extra `headers` (the
    /// content type goes only with a body).
    pub(super) async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = format!("{}{}", self.base, path);
        let method = method.to_string();
        let token = token.map(str::to_string);
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut req = ureq::http::Request::builder()
                .method(method.as_str())
                .uri(&url);
            if let Some(t) = &token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            for (k, v) in &headers {
                if k != "content-type" || body.is_some() {
                    req = req.header(k.as_str(), v.as_str());
                }
            }
            let resp = match body {
                Some(b) => agent.run(req.body(b).unwrap()),
                None => agent.run(req.body(()).unwrap()),
            }
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            let (allow, content_type) = (header("allow"), header("content-type"));
            let retry_after = header("retry-after");
            let status = resp.status().as_u16();
            let body = resp.into_body().read_to_string().unwrap();
            Resp {
                status,
                body,
                allow,
                content_type,
                retry_after,
            }
        })
        .await
        .unwrap()
    }

    pub(super) async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None).await
    }

    pub(super) async fn send(&self, method: &str, path: &str, body: &J) -> Resp {
        self.call(method, path, Some(body.to_string().into_bytes()))
            .await
    }

    fn last_seq(&self) -> u64 {
        self.store.last_seq().unwrap()
    }

    pub(super) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_put_get_patch_delete() {
    let n = start().await;
    let path = "/v1/records/customer/c-1";
    let r = n
        .send("PUT", path, &json!({"name": "Li Lei", "segment": "gold", "tags": ["a", {"z": 1, "b": 2}], "gone": null}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let w = r.json();
    assert_eq!(
        (w["op"].as_str(), w["changed"].as_bool(), w["seq"].as_u64()),
        (Some("put"), Some(true), Some(1))
    );
    assert_eq!(w["stamp"]["origin"], "city-a");
    assert_eq!(w["category"], "customer");
    assert_eq!(w["key"], "c-1");

    let g = n.get(path).await;
    assert_eq!(g.status, 200);
    let v = g.json();
    assert_eq!(
        v["fields"],
        json!({"name": "Li Lei", "segment": "gold", "tags": ["a", {"b": 2, "z": 1}]})
    );
    assert_eq!(v["kind"], "record");
    assert_eq!(v["deleted"], false);
    assert_eq!(v["meta"]["fields"]["name"]["origin"], "city-a");
    assert_eq!(v["meta"]["fields"]["name"]["hlc"], w["stamp"]["hlc"]);
    assert!(
        v["meta"]["fields"]["name"]["time"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(v["meta"]["base"]["op"], "put");

    let r = n
        .send("PATCH", path, &json!({"segment": "silver", "name": null}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["op"], "patch");
    let v = n.get(path).await.json();
    assert_eq!(
        v["fields"],
        json!({"segment": "silver", "tags": ["a", {"b": 2, "z": 1}]})
    );
    assert_ne!(
        v["meta"]["fields"]["segment"]["hlc"],
        v["meta"]["base"]["hlc"]
    );

    // PUT replaces: fields it lacks are gone.
    assert_eq!(
        n.send("PUT", path, &json!({"name": "Wang"})).await.status,
        200
    );
    assert_eq!(n.get(path).await.json()["fields"], json!({"name": "Wang"}));

    // PATCH of a missing record creates it.
    let r = n
        .send("PATCH", "/v1/records/customer/c-2", &json!({"a": 1}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        n.get("/v1/records/customer/c-2").await.json()["fields"],
        json!({"a": 1})
    );

    let r = n.call("DELETE", path, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["op"], "delete");
    let g = n.get(path).await;
    assert_eq!((g.status, g.code().as_str()), (404, "not_found"));

    // Deleting again, or a key that never existed: 404, nothing written.
    let seq = n.last_seq();
    for p in [path, "/v1/records/customer/never"] {
        let r = n.call("DELETE", p, None).await;
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"), "{p}");
    }
    assert_eq!(n.last_seq(), seq);

    // A key with '/' travels percent-encoded.
    let r = n
        .send("PUT", "/v1/records/customer/a%2Fb", &json!({"x": 1}))
        .await;
    assert_eq!(r.json()["key"], "a/b");
    assert!(n.store.get("customer", "a/b").unwrap().is_some());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_append_is_idempotent_and_other_content_conflicts() {
    let n = start().await;
    let path = "/v1/records/billing/b-1";
    let entry = json!({"customer_id": "c-1", "amount": 12.5, "billed_at": "2024-05-01"});
    let r = n.send("PUT", path, &entry).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let first = r.json();
    assert_eq!(
        (first["op"].as_str(), first["changed"].as_bool()),
        (Some("append"), Some(true))
    );

    let seq = n.last_seq();
    let again = n.send("PUT", path, &entry).await.json();
    assert_eq!(
        (again["changed"].as_bool(), again["seq"].is_null()),
        (Some(false), true)
    );
    assert_eq!(again["stamp"], first["stamp"]);

    let r = n
        .send("PUT", path, &json!({"customer_id": "c-1", "amount": 99}))
        .await;
    assert_eq!((r.status, r.code().as_str()), (409, "conflict"));

    for method in ["PATCH", "DELETE"] {
        let r = n
            .call(method, path, Some(b"{\"amount\": 1}".to_vec()))
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (405, "wrong_kind"),
            "{method}"
        );
        assert_eq!(r.allow.as_deref(), Some("GET,HEAD,PUT"));
    }
    assert_eq!(n.last_seq(), seq);

    let v = n.get(path).await.json();
    assert_eq!(v["kind"], "log");
    assert_eq!(v["fields"], entry);
    assert_eq!(v["meta"]["updated"], first["stamp"]);
    assert_eq!(v["meta"]["fields"]["amount"], first["stamp"]);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() {
    let n = start().await;
    let good = "/v1/records/customer/c-1";
    assert_eq!(
        n.send("PUT", good, &json!({"name": "Li"})).await.status,
        200
    );
    let before = n.get(good).await.json();
    let seq = n.last_seq();

    let long_key = format!("/v1/records/customer/{}", "k".repeat(257));
    let many_fields: serde_json::Map<String, J> =
        (0..257).map(|i| (format!("f{i}"), json!(i))).collect();
    let many_fields = J::Object(many_fields).to_string().into_bytes();
    let big_item = json!({"blob": "x".repeat(70 * 1024)})
        .to_string()
        .into_bytes();
    let b = |s: &str| Some(s.as_bytes().to_vec());
    // (method, path, body, status, code)
    type Case<'a> = (&'a str, &'a str, Option<Vec<u8>>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("PUT", good, b("{"), 400, "invalid_json"),
        ("PUT", good, b(""), 400, "invalid_json"),
        ("PUT", good, Some(vec![0xff, 0xfe]), 400, "invalid_json"),
        ("PUT", good, b("{\"a\": 1} {\"b\": 2}"), 400, "invalid_json"),
        ("PUT", good, b("[1, 2]"), 400, "not_an_object"),
        ("PUT", good, b("\"text\""), 400, "not_an_object"),
        ("PUT", good, b("null"), 400, "not_an_object"),
        ("PATCH", good, b("42"), 400, "not_an_object"),
        ("PATCH", good, b("{"), 400, "invalid_json"),
        ("PATCH", good, b("{}"), 400, "invalid_document"),
        ("PUT", good, b("{\"\": 1}"), 400, "invalid_document"),
        ("PUT", good, b("{\"a(b)\": 1}"), 400, "invalid_document"),
        ("PUT", good, Some(many_fields), 400, "invalid_document"),
        ("PUT", good, Some(big_item), 413, "item_too_large"),
        (
            "PUT",
            "/v1/records/nope/k",
            b("{}"),
            404,
            "unknown_category",
        ),
        (
            "PATCH",
            "/v1/records/nope/k",
            b("{\"a\": 1}"),
            404,
            "unknown_category",
        ),
        (
            "DELETE",
            "/v1/records/nope/k",
            None,
            404,
            "unknown_category",
        ),
        ("GET", "/v1/records/nope/k", None, 404, "unknown_category"),
        ("GET", "/v1/records/nope", None, 404, "unknown_category"),
        (
            "POST",
            "/v1/records/nope",
            b("{\"key\": \"k\", \"fields\": {}}"),
            404,
            "unknown_category",
        ),
        ("PUT", "/v1/records/customer/", b("{}"), 400, "invalid_key"),
        ("GET", "/v1/records/customer/", None, 400, "invalid_key"),
        ("PUT", &long_key, b("{}"), 400, "invalid_key"),
        ("GET", &long_key, None, 400, "invalid_key"),
        (
            "PUT",
            "/v1/records/customer/a%0Ab",
            b("{}"),
            400,
            "invalid_key",
        ),
        (
            "PATCH",
            "/v1/records/customer/a%00b",
            b("{\"a\": 1}"),
            400,
            "invalid_key",
        ),
        (
            "DELETE",
            "/v1/records/customer/a%7Fb",
            None,
            400,
            "invalid_key",
        ),
        (
            "PUT",
            "/v1/records/customer/%FF",
            b("{}"),
            400,
            "invalid_path",
        ),
        ("GET", "/v1/customers/", None, 400, "invalid_key"),
        ("GET", "/v1/customers/c%0A1", None, 400, "invalid_key"),
        (
            "DELETE",
            "/v1/records/customer/missing",
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/records/customer/missing",
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/records/customer?limit=0",
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/records/customer?limit=1001",
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/records/customer?limit=ten",
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/records/customer?prefx=c",
            None,
            400,
            "invalid_query",
        ),
        ("GET", "/v1/nothing", None, 404, "no_route"),
        (
            "PUT",
            "/v1/records/customer/c-1/extra",
            b("{}"),
            404,
            "no_route",
        ),
        ("POST", "/v1/status", b("{}"), 405, "method_not_allowed"),
        (
            "DELETE",
            "/v1/records/customer",
            None,
            405,
            "method_not_allowed",
        ),
        (
            "POST",
            "/v1/records/customer",
            b("{\"key\": 1}\nnot json\n"),
            400,
            "no_valid_lines",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = n.call(method, path, body).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{method} {path}: {}",
            r.body
        );
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/json"),
            "{method} {path}"
        );
        assert_eq!(n.last_seq(), seq, "{method} {path} wrote something");
    }
    let r = n.call("POST", "/v1/status", None).await;
    assert_eq!(r.allow.as_deref(), Some("GET,HEAD"));
    assert_eq!(n.get(good).await.json(), before);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_json() {
    let n = start_with(shipped_policy(), 1024).await;
    let big = json!({"blob": "x".repeat(2000)}).to_string().into_bytes();
    let ndjson = format!(
        "{{\"key\": \"k\", \"fields\": {{\"blob\": \"{}\"}}}}\n",
        "x".repeat(2000)
    )
    .into_bytes();
    for (method, path, body) in [
        ("PUT", "/v1/records/customer/c-1", big.clone()),
        ("PATCH", "/v1/records/customer/c-1", big),
        ("POST", "/v1/records/customer", ndjson),
    ] {
        let r = n.call(method, path, Some(body)).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (413, "body_too_large"),
            "{method} {path}"
        );
    }
    assert_eq!(n.last_seq(), 0);
    // Under the limit is fine.
    assert_eq!(
        n.send("PUT", "/v1/records/customer/c-1", &json!({"a": 1}))
            .await
            .status,
        200
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_keeps_good_lines_and_reports_bad_ones() {
    let n = start().await;
    let body = [
        r#"{"key": "c-1", "fields": {"name": "Li", "segment": "gold"}}"#, // 1 ok
        r#"{"key": "c-2", "fields": "#,                                   // 2 invalid_json
        "",                                                               // 3 blank: skipped
        r#"[1, 2]"#,                                                      // 4 not_an_object
        r#"{"fields": {}}"#,                                              // 5 invalid_line (no key)
        r#"{"key": 7, "fields": {}}"#,                                    // 6 invalid_line
        r#"{"key": "c-3", "fields": [1]}"#,                               // 7 not_an_object
        r#"{"key": "c-4", "fields": {}, "op": "put"}"#,                   // 8 invalid_line
        r#"{"key": "c\u0001", "fields": {}}"#,                            // 9 invalid_key
        r#"{"key": "c-5", "fields": {"": 1}}"#,                           // 10 invalid_document
        "   \r",                                                          // 11 blank
        r#"{"key": "c-6", "fields": {"name": "Wang", "x": null}}"#,       // 12 ok
    ]
    .join("\r\n");
    let r = n
        .call("POST", "/v1/records/customer", Some(body.into_bytes()))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rep = r.json();
    assert_eq!(
        (
            &rep["lines"],
            &rep["written"],
            &rep["unchanged"],
            &rep["rejected"]
        ),
        (&json!(10), &json!(2), &json!(0), &json!(8))
    );
    assert!(rep.get("error").is_none());
    let errs: Vec<(u64, String)> = rep["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["error"]["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = [
        (2, "invalid_json"),
        (4, "not_an_object"),
        (5, "invalid_line"),
        (6, "invalid_line"),
        (7, "not_an_object"),
        (8, "invalid_line"),
        (9, "invalid_key"),
        (10, "invalid_document"),
    ];
    assert_eq!(errs, expect.map(|(l, c)| (l, c.to_string())).to_vec());
    assert_eq!(rep["errors"][5]["key"], "c-4");
    assert_eq!(n.last_seq(), 2);
    assert_eq!(
        n.get("/v1/records/customer/c-6").await.json()["fields"],
        json!({"name": "Wang"})
    );

    // A log category: appends; the same entry again is unchanged, other
    // content under a known key is a conflict the store reports per line.
    let body = concat!(
        "{\"key\": \"b-1\", \"fields\": {\"customer_id\": \"c-1\", \"amount\": 5}}\n",
        "{\"key\": \"b-1\", \"fields\": {\"customer_id\": \"c-1\", \"amount\": 5}}\n",
        "{\"key\": \"b-1\", \"fields\": {\"customer_id\": \"c-1\", \"amount\": 6}}\n",
        "{\"key\": \"b-2\", \"fields\": {\"customer_id\": \"c-1\", \"amount\": 7}}",
    );
    let rep = n
        .call("POST", "/v1/records/billing", Some(body.into()))
        .await
        .json();
    assert_eq!(
        (&rep["written"], &rep["unchanged"], &rep["rejected"]),
        (&json!(2), &json!(1), &json!(1))
    );
    assert_eq!(rep["errors"][0]["line"], 3);
    assert_eq!(rep["errors"][0]["key"], "b-1");
    assert_eq!(rep["errors"][0]["error"]["code"], "conflict");

    // Every line bad: 400, nothing written, the report still lists them.
    let seq = n.last_seq();
    let r = n
        .call("POST", "/v1/records/customer", Some(b"{\n[]\n".to_vec()))
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "no_valid_lines"));
    assert_eq!(r.json()["rejected"], 2);
    assert_eq!(n.last_seq(), seq);

    // An empty body is an empty (successful) import.
    let r = n
        .call("POST", "/v1/records/customer", Some(Vec::new()))
        .await;
    assert_eq!((r.status, r.json()["lines"].as_u64()), (200, Some(0)));

    // More lines than one chunk: all written.
    let lines: String = (0..2500)
        .map(|i| format!("{{\"key\": \"bulk-{i:05}\", \"fields\": {{\"i\": {i}}}}}\n"))
        .collect();
    let r = n
        .call("POST", "/v1/records/customer", Some(lines.into_bytes()))
        .await;
    assert_eq!(r.json()["written"], 2500, "{}", r.body);
    assert_eq!(n.last_seq(), seq + 2500);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_paginates_by_prefix() {
    let n = start().await;
    let mut lines = String::new();
    for i in 0..25 {
        lines.push_str(&format!(
            "{{\"key\": \"c-{i:02}\", \"fields\": {{\"i\": {i}}}}}\n"
        ));
    }
    lines.push_str("{\"key\": \"d-1\", \"fields\": {}}\n");
    assert_eq!(
        n.call("POST", "/v1/records/customer", Some(lines.into_bytes()))
            .await
            .status,
        200
    );
    assert_eq!(
        n.call("DELETE", "/v1/records/customer/c-13", None)
            .await
            .status,
        200
    );

    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/records/customer?prefix=c-&limit=10&after={a}"),
            None => "/v1/records/customer?prefix=c-&limit=10".to_string(),
        };
        let page = n.get(&q).await.json();
        pages += 1;
        assert_eq!(page["category"], "customer");
        for item in page["items"].as_array().unwrap() {
            keys.push(item["key"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    let expect: Vec<String> = (0..25)
        .filter(|i| *i != 13)
        .map(|i| format!("c-{i:02}"))
        .collect();
    assert_eq!(keys, expect);
    assert_eq!(pages, 3);

    // Default limit 100: everything; fields are shown.
    let all = n.get("/v1/records/customer").await.json();
    assert_eq!(all["items"].as_array().unwrap().len(), 25);
    assert_eq!(all["next"], J::Null);
    assert_eq!(all["items"][0]["fields"], json!({"i": 0}));
    let none = n.get("/v1/records/customer?prefix=zz").await.json();
    assert_eq!(none["items"], json!([]));
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_view_joins_linked_categories() {
    let text = std::fs::read_to_string(shipped_policy_path()).unwrap()
        + "\n[categories.contacts]\nkind = \"record\"\nreplicate = \"local\"\ncustomer_link = { key_prefix = \"/\" }\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, text).unwrap();
    let n = start_with(load_policy(&file).unwrap(), 1024 * 1024).await;

    let puts = [
        ("customer/c-1", json!({"name": "Li", "segment": "gold"})),
        ("billing/b-1", json!({"customer_id": "c-1", "amount": 10})),
        ("billing/b-2", json!({"customer_id": "c-2", "amount": 20})),
        (
            "opportunity/o-1",
            json!({"customer_id": "c-1", "stage": "won"}),
        ),
        (
            "opportunity/o-2",
            json!({"customer_id": "c-1", "stage": "lost"}),
        ),
        (
            "service_activity/s-1",
            json!({"customer_id": "c-1", "type": "visit"}),
        ),
        ("contacts/c-1%2Fp-1", json!({"name": "Han"})),
        ("contacts/c-10%2Fp-1", json!({"name": "not c-1's"})),
    ];
    for (p, doc) in &puts {
        assert_eq!(
            n.send("PUT", &format!("/v1/records/{p}"), doc).await.status,
            200,
            "{p}"
        );
    }
    assert_eq!(
        n.call("DELETE", "/v1/records/opportunity/o-2", None)
            .await
            .status,
        200
    );

    let r = n.get("/v1/customers/c-1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["id"], "c-1");
    assert_eq!(v["customer"]["fields"]["name"], "Li");
    let keys = |cat: &str| -> Vec<String> {
        v["related"][cat]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(keys("billing"), ["b-1"]);
    assert_eq!(keys("opportunity"), ["o-1"]);
    assert_eq!(keys("service_activity"), ["s-1"]);
    assert_eq!(keys("contacts"), ["c-1/p-1"]);
    assert_eq!(
        v["related"]["billing"]["link"],
        json!({"field": "customer_id"})
    );
    assert_eq!(v["related"]["contacts"]["link"], json!({"key_prefix": "/"}));
    assert_eq!(v["related"]["billing"]["truncated"], false);
    assert!(v["related"].get("customer").is_none());

    // No customer record, but linked items: the view, with a null customer.
    let v = n.get("/v1/customers/c-2").await.json();
    assert_eq!(v["customer"], J::Null);
    assert_eq!(v["related"]["billing"]["items"][0]["key"], "b-2");

    let r = n.get("/v1/customers/c-404").await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_openapi() {
    let n = start().await;
    assert_eq!(
        n.send("PUT", "/v1/records/customer/c-1", &json!({"a": 1}))
            .await
            .status,
        200
    );
    assert_eq!(
        n.send("PUT", "/v1/records/customer/c-2", &json!({"a": 2}))
            .await
            .status,
        200
    );
    assert_eq!(
        n.call("DELETE", "/v1/records/customer/c-2", None)
            .await
            .status,
        200
    );
    assert_eq!(
        n.send(
            "PUT",
            "/v1/records/opportunity/o-1",
            &json!({"stage": "new"})
        )
        .await
        .status,
        200
    );
    assert_eq!(n.get("/v1/records/nope/x").await.status, 404);

    let s = n.get("/v1/status").await;
    assert_eq!(s.status, 200);
    let s = s.json();
    assert_eq!(s["node_id"], "city-a");
    assert_eq!(s["tier"], "city");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    // 4 writes, plus the counters entry of the private opportunity aggregate.
    assert_eq!(s["last_seq"], 5);
    assert_eq!(s["policy_digest"], shipped_policy().digest_hex());
    assert_eq!(
        s["categories"]["customer"],
        json!({"kind": "record", "replicate": "up", "items": 1})
    );
    assert_eq!(s["categories"]["opportunity"]["items"], 1);
    assert_eq!(s["categories"]["opportunity"]["replicate"], "local");
    assert_eq!(
        s["categories"]["billing"],
        json!({"kind": "log", "replicate": "up", "items": 0})
    );
    assert_eq!(
        s["links"],
        json!({"parent": {"state": "connected", "lag_records": 0}})
    );

    let m = n.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.content_type.unwrap().starts_with("text/plain"));
    for needle in [
        "tiersync_writes_total{category=\"customer\",op=\"put\"}",
        "tiersync_writes_total{category=\"customer\",op=\"delete\"}",
        "tiersync_api_requests_total{route=\"/v1/records/{category}/{key}\",method=\"PUT\",status=\"200\"}",
        "tiersync_api_errors_total{route=\"/v1/records/{category}/{key}\",code=\"unknown_category\"}",
        "tiersync_api_request_duration_seconds",
    ] {
        assert!(
            m.body.contains(needle),
            "{needle} missing from:\n{}",
            m.body
        );
    }

    // The OpenAPI document lists exactly the routes the server has, and every
    // listed operation is routed (not `no_route` / `method_not_allowed`).
    let doc = n.get("/v1/openapi.json").await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut ops = BTreeSet::new();
    // One path per declared aggregate stands for `/v1/aggregates/{name}`.
    let mut aggregates = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let path = match path.strip_prefix("/v1/aggregates/") {
            Some(name) => {
                assert!(shipped_policy().aggregates.contains_key(name), "{path}");
                aggregates += 1;
                "/v1/aggregates/{name}".to_string()
            }
            None => path.clone(),
        };
        for method in item.as_object().unwrap().keys() {
            ops.insert((path.clone(), method.to_uppercase()));
        }
    }
    assert_eq!(aggregates, shipped_policy().aggregates.len());
    let expect: BTreeSet<(String, String)> = [
        ("/v1/records/{category}/{key}", "PUT"),
        ("/v1/records/{category}/{key}", "PATCH"),
        ("/v1/records/{category}/{key}", "DELETE"),
        ("/v1/records/{category}/{key}", "GET"),
        ("/v1/records/{category}", "GET"),
        ("/v1/records/{category}", "POST"),
        ("/v1/customers/{id}", "GET"),
        ("/v1/aggregates", "GET"),
        ("/v1/aggregates/{name}", "GET"),
        ("/v1/conflicts", "GET"),
        ("/v1/status", "GET"),
        ("/v1/tokens", "GET"),
        ("/v1/tokens", "POST"),
        ("/v1/tokens/{id}", "DELETE"),
        ("/v1/openapi.json", "GET"),
        ("/metrics", "GET"),
        ("/healthz", "GET"),
        ("/readyz", "GET"),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(ops, expect);
    for (path, method) in &ops {
        let concrete = path
            .replace("{category}", "customer")
            .replace("{key}", "c-1")
            .replace("{id}", "c-1")
            .replace("{name}", "billing_by_city_month");
        let r = n
            .call(method, &concrete, Some(b"{\"a\": 1}".to_vec()))
            .await;
        if r.status >= 400 {
            let code = r.code();
            assert!(
                code != "no_route" && code != "method_not_allowed",
                "{method} {path}: {code}"
            );
        }
    }
    let scan_params: BTreeSet<&str> = doc["paths"]["/v1/records/{category}"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        scan_params,
        BTreeSet::from(["category", "prefix", "after", "limit"])
    );
    let bulk = &doc["paths"]["/v1/records/{category}"]["post"]["requestBody"]["content"];
    assert!(bulk.get("application/x-ndjson").is_some(), "{bulk}");
    for schema in [
        "ItemView",
        "WriteResult",
        "ErrorBody",
        "BulkReport",
        "ScanPage",
        "CustomerView",
        "StatusView",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "schema {schema} missing"
        );
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_disabled_and_default_links() {
    let n = start_custom(shipped_policy(), 1024, |st| {
        st.metrics = None;
        st.status = ApiState::new(
            st.store.clone(),
            st.writer.clone(),
            st.node_id.clone(),
            Tier::Province,
            1,
        )
        .status;
        st.tier = Tier::Province;
    })
    .await;
    let r = n.get("/metrics").await;
    assert_eq!((r.status, r.code().as_str()), (404, "metrics_disabled"));
    let s = n.get("/v1/status").await.json();
    assert_eq!(
        (s["tier"].as_str(), s["links"].clone()),
        (Some("province"), json!({}))
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_stopping_flag() {
    let ops = Arc::new(crate::ops::Ops::default());
    let flag = ops.clone();
    let n = start_custom(shipped_policy(), 1024, move |st| st.ops = flag).await;
    let live = n.call("GET", "/healthz", None).await;
    assert_eq!(live.status, 200);
    let ready = n.call("GET", "/readyz", None).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["checks"]["uplink"], "connected");
    ops.set_stopping();
    let stopping = n.call("GET", "/readyz", None).await;
    assert_eq!(stopping.status, 503);
    assert_eq!(stopping.json()["status"], "unavailable");
    assert_eq!(stopping.json()["checks"]["shutdown"], "stopping");
    // Liveness does not depend on it.
    assert_eq!(n.call("GET", "/healthz", None).await.status, 200);
    n.stop().await;
}
