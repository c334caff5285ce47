//! The `tiersync` client commands, run as the built binary against a real
//! city node (`tiersync run` from a generated deployment): JSON and human
//! output, imports with rejected lines, API errors, and `config check` on a
//! certificate issued to another node.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value as Json, json};
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::Cluster;
use tiersync_tests::workspace_bin;

/// A running Hangzhou city node (its parent is not started).
struct Node {
    cluster: Cluster,
    url: String,
    /// Its operator token.
    token: String,
}

fn city() -> Node {
    let mut cluster = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    });
    cluster.start("hangzhou");
    let url = cluster.url("hangzhou", "");
    let token = cluster.token("hangzhou");
    Node {
        cluster,
        url,
        token,
    }
}

/// What a run of the binary printed.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Json {
        assert!(self.ok, "failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    #[track_caller]
    fn assert_failed_with(&self, text: &str) {
        assert!(!self.ok, "expected a failure, got stdout: {}", self.stdout);
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}: {}",
            self.stderr
        );
    }
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_bin("tiersync"));
    cmd.args(args)
        .env_remove("TIERSYNC_NODE")
        .env_remove("TIERSYNC_CONFIG")
        .env_remove("TIERSYNC_LOG_FORMAT")
        .env("RUST_LOG", "warn");
    cmd
}

fn finish(out: Output) -> Run {
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `tiersync ARGS` (no node option added).
fn run(args: &[&str]) -> Run {
    finish(command(args).output().expect("run tiersync"))
}

impl Node {
    /// Runs `tiersync ARGS --node URL --token TOKEN`.
    fn tiersync(&self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        all.extend(["--node", &self.url]);
        self.run(&all)
    }

    /// Runs `tiersync ARGS --token TOKEN`.
    fn run(&self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        all.extend(["--token", &self.token]);
        run(&all)
    }

    /// Runs `tiersync ARGS --node URL` with `input` on stdin.
    fn tiersync_stdin(&self, args: &[&str], input: &str) -> Run {
        let mut all = args.to_vec();
        all.extend(["--node", &self.url, "--token", &self.token]);
        let mut child = command(&all)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tiersync");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        finish(child.wait_with_output().unwrap())
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.cluster.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

#[test]
fn records_round_trip_with_json_output() {
    let n = city();

    let put = n
        .tiersync(&[
            "put",
            "customer",
            "c-1",
            r#"{"name":"Li Lei","segment":"gold","credit":3}"#,
            "--json",
        ])
        .json();
    assert_eq!(put["op"], "put");
    assert_eq!(put["changed"], true);
    assert_eq!(put["stamp"]["origin"], "hangzhou");

    let got = n.tiersync(&["get", "customer", "c-1", "--json"]).json();
    assert_eq!(
        got["fields"],
        json!({"name": "Li Lei", "segment": "gold", "credit": 3})
    );
    assert_eq!(got["meta"]["fields"]["name"]["origin"], "hangzhou");

    let patched = n
        .tiersync(&[
            "patch",
            "customer",
            "c-1",
            r#"{"segment":"platinum","credit":null}"#,
            "--json",
        ])
        .json();
    assert_eq!(patched["op"], "patch");
    let got = n.tiersync(&["get", "customer", "c-1", "--json"]).json();
    assert_eq!(
        got["fields"],
        json!({"name": "Li Lei", "segment": "platinum"})
    );

    // A key holding '/' travels as one path segment.
    n.tiersync(&["put", "customer", "c-2/x", r#"{"name":"Han"}"#, "--json"])
        .json();
    let got = n.tiersync(&["get", "customer", "c-2/x", "--json"]).json();
    assert_eq!(got["key"], "c-2/x");

    // A log entry from stdin; the same entry again is unchanged, other
    // content is a conflict.
    let bill = r#"{"customer_id":"c-1","amount":12.5,"billed_at":"2024-05-01"}"#;
    let appended = n
        .tiersync_stdin(&["put", "billing", "b-1", "-", "--json"], bill)
        .json();
    assert_eq!(
        (&appended["op"], &appended["changed"]),
        (&json!("append"), &json!(true))
    );
    let again = n
        .tiersync(&["put", "billing", "b-1", bill, "--json"])
        .json();
    assert_eq!(again["changed"], false);
    n.tiersync(&["put", "billing", "b-1", r#"{"amount":1}"#])
        .assert_failed_with("error: conflict: ");

    n.tiersync(&[
        "put",
        "opportunity",
        "o-1",
        r#"{"customer_id":"c-1","stage":"proposal"}"#,
    ]);

    // Scan: one page, then every page with --all.
    for i in 0..5 {
        n.tiersync(&["put", "customer", &format!("s-{i}"), r#"{"n":1}"#, "--json"])
            .json();
    }
    let page = n
        .tiersync(&[
            "scan", "customer", "--prefix", "s-", "--limit", "2", "--json",
        ])
        .json();
    let keys: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["s-0", "s-1"]);
    assert_eq!(page["next"], "s-1");
    let page = n
        .tiersync(&[
            "scan", "customer", "--prefix", "s-", "--after", "s-3", "--json",
        ])
        .json();
    assert_eq!(page["items"][0]["key"], "s-4");
    assert_eq!(page["next"], Json::Null);
    let all = n
        .tiersync(&[
            "scan", "customer", "--prefix", "s-", "--limit", "2", "--all", "--json",
        ])
        .json();
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
    assert_eq!(all["next"], Json::Null);

    // The unified customer view.
    let view = n.tiersync(&["customer", "c-1", "--json"]).json();
    assert_eq!(view["customer"]["fields"]["name"], "Li Lei");
    assert_eq!(view["related"]["billing"]["items"][0]["key"], "b-1");
    assert_eq!(view["related"]["opportunity"]["items"][0]["key"], "o-1");
    assert_eq!(
        view["related"]["service_activity"]["items"],
        json!([]),
        "{view}"
    );

    // Status.
    let status = n.tiersync(&["status", "--json"]).json();
    assert_eq!(status["node_id"], "hangzhou");
    assert_eq!(status["tier"], "city");
    assert_eq!(status["categories"]["customer"]["items"], 7);
    assert_eq!(status["categories"]["billing"]["items"], 1);
    assert_eq!(status["links"]["parent"]["parent"], "zhejiang");

    // Delete: gone for get, and a second delete is not_found.
    let deleted = n
        .tiersync(&["delete", "customer", "c-2/x", "--json"])
        .json();
    assert_eq!(deleted["op"], "delete");
    n.tiersync(&["get", "customer", "c-2/x"])
        .assert_failed_with("error: not_found: ");
    n.tiersync(&["delete", "customer", "c-2/x"])
        .assert_failed_with("error: not_found: ");
}

#[test]
fn human_output_shows_the_key_facts() {
    let n = city();
    let put = n.tiersync(&[
        "put",
        "customer",
        "c-7",
        r#"{"name":"Wang Fang","segment":"gold"}"#,
    ]);
    assert!(put.ok, "{}", put.stderr);
    assert!(put.stdout.contains("put customer/c-7"), "{}", put.stdout);

    let get = n.tiersync(&["get", "customer", "c-7"]);
    assert!(get.ok, "{}", get.stderr);
    for fact in [
        "customer/c-7",
        "record",
        "name",
        "Wang Fang",
        "segment",
        "gold",
        "hangzhou",
    ] {
        assert!(
            get.stdout.contains(fact),
            "get lacks {fact:?}:\n{}",
            get.stdout
        );
    }

    n.tiersync(&[
        "put",
        "customer",
        "c-8",
        r#"{"name":"Zhao Lei","credit":7}"#,
    ]);
    let scan = n.tiersync(&["scan", "customer"]);
    assert!(scan.ok, "{}", scan.stderr);
    for fact in [
        "key",
        "c-7",
        "c-8",
        "Wang Fang",
        "Zhao Lei",
        "credit",
        "2 item(s)",
    ] {
        assert!(
            scan.stdout.contains(fact),
            "scan lacks {fact:?}:\n{}",
            scan.stdout
        );
    }
    let page = n.tiersync(&["scan", "customer", "--limit", "1"]);
    assert!(page.stdout.contains("--after \"c-7\""), "{}", page.stdout);

    let status = n.tiersync(&["status"]);
    assert!(status.ok, "{}", status.stderr);
    for fact in [
        "hangzhou (city)",
        "tiersync ",
        "zhejiang",
        "customer",
        "opportunity",
        "service_activity",
    ] {
        assert!(
            status.stdout.contains(fact),
            "status lacks {fact:?}:\n{}",
            status.stdout
        );
    }
    assert!(
        status
            .stdout
            .lines()
            .any(|l| l.contains("customer") && l.contains('2')),
        "the customer count: {}",
        status.stdout
    );

    let view = n.tiersync(&["customer", "c-7"]);
    assert!(view.ok, "{}", view.stderr);
    assert!(view.stdout.contains("customer c-7"), "{}", view.stdout);
    assert!(
        view.stdout.contains("billing: 0 item(s)"),
        "{}",
        view.stdout
    );
}

const CSV: &str = "key,name,segment,credit,phone\n\
c-2001,Wang Fang,gold,12,0571-1\n\
\n\
,No Key,silver,3,\n\
c-2002,\"Zhao\nLei\",silver,7.5,\n\
c-2003,Sun Li,gold,,0571\n\
c-2004,Qian,,1,\n";

#[test]
fn import_csv_reports_rejected_lines_by_file_line() {
    let n = city();
    let file = n.file("customers.csv", CSV);

    // Chunks of two lines: the bad line (after a blank line) is the second
    // line of the first request, and the last good line the first of the
    // third.
    let out = n.tiersync(&[
        "import",
        "--category",
        "customer",
        &file,
        "--chunk-lines",
        "2",
    ]);
    out.assert_failed_with("1 of 5 line(s) rejected");
    assert!(
        out.stdout
            .contains("5 line(s) read, 4 written, 0 unchanged, 1 rejected in "),
        "{}",
        out.stdout
    );
    // The summary gives the throughput.
    assert!(out.stdout.contains(" lines/s)"), "{}", out.stdout);
    assert!(
        out.stdout.contains("line 4 (key \"\"): invalid_key"),
        "{}",
        out.stdout
    );

    // The good lines are there; numbers became numbers, empty cells absent.
    let got = n.tiersync(&["get", "customer", "c-2001", "--json"]).json();
    assert_eq!(
        got["fields"],
        json!({"name": "Wang Fang", "segment": "gold", "credit": 12, "phone": "0571-1"})
    );
    let got = n.tiersync(&["get", "customer", "c-2002", "--json"]).json();
    assert_eq!(
        got["fields"],
        json!({"name": "Zhao\nLei", "segment": "silver", "credit": 7.5})
    );
    let got = n.tiersync(&["get", "customer", "c-2003", "--json"]).json();
    assert_eq!(
        got["fields"],
        json!({"name": "Sun Li", "segment": "gold", "phone": "0571"})
    );
    n.tiersync(&["get", "customer", "c-2004", "--json"]).json();

    // Again, one chunk, as JSON: the same line; every good line unchanged
    // in content but written again (a PUT is a new version).
    let out = n.tiersync(&["import", "--category", "customer", &file, "--json"]);
    assert!(!out.ok);
    let summary: Json = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(summary["lines"], 5);
    assert_eq!(summary["written"], 4);
    assert_eq!(summary["rejected"], 1);
    assert_eq!(summary["errors"][0]["line"], 4);
    assert_eq!(summary["errors"][0]["error"]["code"], "invalid_key");

    // --key-column, and a row with too few cells rejected locally.
    let file = n.file("by_id.csv", "id,name\nc-3001,A\nc-3002\nc-3003,C\n");
    let out = n.tiersync(&[
        "import",
        "--category",
        "customer",
        &file,
        "--key-column",
        "id",
    ]);
    out.assert_failed_with("1 of 3 line(s) rejected");
    assert!(out.stdout.contains("line 3: invalid_csv"), "{}", out.stdout);
    let got = n.tiersync(&["get", "customer", "c-3003", "--json"]).json();
    assert_eq!(got["fields"], json!({"name": "C"}));
}

#[test]
fn import_ndjson_maps_line_numbers_across_chunks() {
    let n = city();
    let text = "{\"key\":\"b-1\",\"fields\":{\"customer_id\":\"c-1\",\"amount\":10}}\n\
                \n\
                {\"key\":\"b-2\",\"fields\":{\"customer_id\":\"c-1\",\"amount\":20}}\n\
                not json\n\
                {\"key\":\"b-3\",\"fields\":[1]}\n\
                {\"key\":\"b-4\",\"fields\":{\"customer_id\":\"c-1\",\"amount\":40}}\n";
    let file = n.file("bills.jsonl", text);
    let out = n.tiersync(&[
        "import",
        "--category",
        "billing",
        &file,
        "--chunk-lines",
        "1",
        "--json",
    ]);
    out.assert_failed_with("2 of 5 line(s) rejected");
    let summary: Json = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(summary["written"], 3);
    let errors: Vec<(u64, &str)> = summary["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["error"]["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(errors, [(4, "invalid_json"), (5, "not_an_object")]);

    // Sent again: every good line is unchanged (log entries), exit 0 for a
    // clean file read from stdin with --format.
    let clean: String = text
        .lines()
        .filter(|l| l.contains("amount"))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = n.tiersync_stdin(
        &["import", "--category", "billing", "-", "--format", "ndjson"],
        &clean,
    );
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("3 line(s) read, 0 written, 3 unchanged, 0 rejected"),
        "{}",
        out.stdout
    );
    let view = n.tiersync(&["customer", "c-1", "--json"]).json();
    assert_eq!(
        view["related"]["billing"]["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn api_errors_print_the_code_and_exit_non_zero() {
    let n = city();
    n.tiersync(&["get", "nosuch", "k"])
        .assert_failed_with("error: unknown_category: ");
    n.tiersync(&["scan", "nosuch"])
        .assert_failed_with("error: unknown_category: ");
    n.tiersync(&["put", "nosuch", "k", "{}"])
        .assert_failed_with("error: unknown_category: ");
    let file = n.file("x.csv", "key,a\nk,1\n");
    n.tiersync(&["import", "--category", "nosuch", &file])
        .assert_failed_with("error: unknown_category: ");
    n.tiersync(&["put", "customer", "k", "[1]"])
        .assert_failed_with("error: not_an_object: ");
    n.tiersync(&["put", "customer", "k", "{"])
        .assert_failed_with("error: invalid_json: ");
    n.tiersync(&["patch", "billing", "k", r#"{"a":1}"#])
        .assert_failed_with("error: wrong_kind: ");
    n.tiersync(&["customer", "nobody"])
        .assert_failed_with("error: not_found: ");
    // Nothing was written by any of them.
    let status = n.tiersync(&["status", "--json"]).json();
    assert_eq!(status["last_seq"], 0);

    // No node there.
    run(&["status", "--node", "http://127.0.0.1:1"]).assert_failed_with("cannot reach the node");
}

#[test]
fn node_url_comes_from_config_then_env() {
    let n = city();
    let config = n.cluster.config("hangzhou").display().to_string();
    let status = n.run(&["status", "--config", &config, "--json"]).json();
    assert_eq!(status["node_id"], "hangzhou");

    let out = finish(
        command(&["status", "--json"])
            .env("TIERSYNC_NODE", &n.url)
            .env("TIERSYNC_TOKEN", &n.token)
            .output()
            .unwrap(),
    );
    assert_eq!(out.json()["node_id"], "hangzhou");

    // --node wins over --config.
    n.run(&[
        "status",
        "--config",
        &config,
        "--node",
        "http://127.0.0.1:1",
    ])
    .assert_failed_with("cannot reach the node at http://127.0.0.1:1");
}

#[test]
fn config_check_refuses_a_certificate_of_another_node() {
    let c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 2,
        ..Spec::default()
    });
    let files: Vec<String> = c
        .deployment
        .config_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["config", "check"];
    args.extend(files.iter().map(String::as_str));
    let ok = run(&args);
    assert!(ok.ok, "{}", ok.stderr);

    // Hangzhou's certificate replaced by Ningbo's; Ningbo's by garbage.
    let certs = c.dir.path().join("certs");
    std::fs::copy(certs.join("ningbo.pem"), certs.join("hangzhou.pem")).unwrap();
    std::fs::write(certs.join("ningbo.pem"), "not a certificate\n").unwrap();
    let bad = run(&args);
    assert!(!bad.ok);
    let hangzhou = c.config("hangzhou");
    let ningbo = c.config("ningbo");
    assert_line(
        &bad.stderr,
        &hangzhou,
        "tls.cert",
        "is the certificate of node ningbo, not hangzhou",
    );
    assert_line(
        &bad.stderr,
        &ningbo,
        "tls.cert",
        "cannot read the certificate",
    );
}

#[track_caller]
fn assert_line(text: &str, file: &Path, key: &str, reason: &str) {
    let prefix = format!("{}: {key}: ", file.display());
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with(&prefix) && l.contains(reason)),
        "no line {prefix}…{reason}… in:\n{text}"
    );
}

#[test]
fn query_prints_aggregates_as_table_json_and_csv() {
    let n = city();
    let u = n.url.as_str();
    for (key, amount, month) in [
        ("b1", "10.5", "2026-09-01"),
        ("b2", "4.5", "2026-09-20"),
        ("b3", "1", "2026-10-01"),
    ] {
        let doc = format!(r#"{{"customer_id": "c1", "amount": {amount}, "billed_at": "{month}"}}"#);
        assert!(n.run(&["put", "billing", key, &doc, "--node", u]).ok);
    }
    let list = n.run(&["query", "--node", u, "--json"]).json();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "billing_by_city_month")
    );
    let rows = n
        .run(&["query", "billing_by_city_month", "--node", u, "--json"])
        .json();
    let rows = rows["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["group"]["month(billed_at)"], "2026-09");
    assert_eq!(rows[0]["values"]["count"], 2);
    assert_eq!(rows[0]["values"]["sum(amount)"], 15.0);
    let total = n
        .run(&[
            "query",
            "billing_by_city_month",
            "--group-by",
            "",
            "--node",
            u,
            "--json",
        ])
        .json();
    assert_eq!(total["rows"][0]["values"]["count"], 3);
    let csv = n.run(&[
        "query",
        "billing_by_city_month",
        "--group-by",
        "month(billed_at)",
        "--csv",
        "--node",
        u,
    ]);
    assert!(csv.ok, "{}", csv.stderr);
    assert_eq!(
        csv.stdout.lines().next(),
        Some("month(billed_at),count,sum(amount)")
    );
    assert!(csv.stdout.contains("2026-10,1,1.0"), "{}", csv.stdout);
    let table = n.run(&[
        "query",
        "billing_by_city_month",
        "--filter",
        "month(billed_at):2026-10",
        "--node",
        u,
    ]);
    assert!(
        table.ok && table.stdout.contains("hangzhou") && table.stdout.contains("1 row(s)"),
        "{}",
        table.stdout
    );
    n.run(&["query", "nope", "--node", u])
        .assert_failed_with("unknown_aggregate");
    n.run(&[
        "query",
        "billing_by_city_month",
        "--group-by",
        "week",
        "--node",
        u,
    ])
    .assert_failed_with("invalid_query");
}
