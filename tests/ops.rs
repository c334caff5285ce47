//! Operability (issue 20): a failing start never crashes, health endpoints,
//! SIGHUP / `tiersync reload` (applied and refused), metrics present at
//! start and clean under `promtool check metrics`, `config check` of
//! certificates, `certs issue` / `certs list`, and the operator-facing
//! error messages.
//!
//! `TIERSYNC_RESTART_LOOPS` sets how many failing starts the restart loop
//! makes (default 30; `scripts/soak.sh` runs 200). `promtool` comes from
//! Debian's `prometheus` package, `faketime` from `faketime` (both installed
//! by `scripts/env.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value as Json;
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::Cluster;
use tiersync_tests::{ProcessGroup, env_count, wait_for, workspace_bin};

fn tiersync(args: &[&str]) -> Output {
    Command::new(workspace_bin("tiersync"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TIERSYNC_NODE")
        .stdin(Stdio::null())
        .output()
        .expect("run tiersync")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A national, one province, one city; nothing started.
fn small() -> Cluster {
    Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    })
}

/// Writes `text` to `DIR/name` and returns the path.
fn write(c: &Cluster, name: &str, text: &str) -> PathBuf {
    let path = c.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The node file of `id` with each `(from, to)` replaced (each must occur).
fn edited(c: &Cluster, id: &str, edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(c.config(id)).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} not in {id}'s file:\n{text}");
        text = text.replacen(from, to, 1);
    }
    text
}

fn api_line(c: &Cluster, id: &str) -> String {
    format!("api = \"{}\"", c.api(id))
}

#[test]
fn a_failing_start_never_crashes_and_says_why() {
    let mut c = small();
    let starts = env_count("TIERSYNC_RESTART_LOOPS", 30);
    // The national node runs: its data directory is locked, its API port taken.
    c.start("national");
    let free_api = format!(
        "api = \"127.0.0.1:{}\"",
        tiersync::deploygen::free_port().unwrap()
    );
    let fresh_dir = "data_dir = \"data/never-created\"";
    let missing_cert = write(
        &c,
        "missing-cert.toml",
        &edited(
            &c,
            "national",
            &[
                ("data_dir = \"data/national\"", fresh_dir),
                ("cert = \"certs/national.pem\"", "cert = \"certs/gone.pem\""),
                (&api_line(&c, "national"), &free_api),
            ],
        ),
    );
    let api_in_use = write(
        &c,
        "api-in-use.toml",
        &edited(
            &c,
            "national",
            &[("data_dir = \"data/national\"", fresh_dir)],
        )
        .replacen("children = [\"zhejiang\"]\n", "", 1)
        .replacen("\n[subtree]\n\"zhejiang\" = [\"hangzhou\"]\n", "", 1)
        .replacen("\n[listen]\npeer = ", "\n[listen]\n# peer = ", 1),
    );
    let locked = write(
        &c,
        "locked.toml",
        &edited(&c, "national", &[(&api_line(&c, "national"), &free_api)])
            .replacen("children = [\"zhejiang\"]\n", "", 1)
            .replacen("\n[subtree]\n\"zhejiang\" = [\"hangzhou\"]\n", "", 1)
            .replacen("\n[listen]\npeer = ", "\n[listen]\n# peer = ", 1),
    );
    let cases: [(&Path, &str, &str); 3] = [
        (&missing_cert, "tls.cert", "gone.pem: no such file"),
        (&api_in_use, "listen.api", "is this node already running?"),
        (
            &locked,
            "data",
            "another tiersync process holds this data directory",
        ),
    ];
    let mut crashes = Vec::new();
    for i in 0..starts {
        let (config, key, reason) = cases[i % cases.len()];
        let out = tiersync(&["run", "--config", config.to_str().unwrap()]);
        let err = stderr(&out);
        if let Some(sig) = out.status.signal() {
            crashes.push(format!("start {i} ({key}): killed by signal {sig}: {err}"));
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "start {i} ({key}): {err}");
        assert!(
            err.contains(key) && err.contains(reason),
            "start {i}: expected {key} … {reason}, got:\n{err}"
        );
        // Refused before the store: nothing was created.
        assert!(
            !c.dir.path().join("data/never-created").exists(),
            "start {i} ({key}) created a data directory"
        );
    }
    eprintln!(
        "restart loop: {starts} failing starts (missing certificate, API port in use, locked data directory), {} crashed",
        crashes.len()
    );
    assert!(
        crashes.is_empty(),
        "{} of {starts} failing starts crashed:\n{}",
        crashes.len(),
        crashes.join("\n")
    );
    // The running node was not disturbed.
    assert_eq!(c.get("national", "/readyz").status, 200);
    c.stop_all();
}

#[test]
fn health_endpoints_and_plain_logs() {
    let mut c = small();
    c.start_all();
    let city = "hangzhou";
    let live = c.get(city, "/healthz");
    assert_eq!(live.status, 200);
    assert_eq!(live.body["status"], "ok");
    let ready = c.get(city, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    for check in ["store", "writer", "shutdown"] {
        assert_eq!(ready.body["checks"][check], "ok", "{}", ready.body);
    }
    // The uplink's state is reported (a city serves with its uplink down).
    let state = wait_for(Duration::from_secs(30), || {
        let r = c.get(city, "/readyz");
        (r.body["checks"]["uplink"] == "streaming").then_some(())
    });
    assert!(state.is_some(), "{}", c.get(city, "/readyz").body);
    // Both are in the OpenAPI document.
    let doc = c.get(city, "/v1/openapi.json").body;
    assert!(doc["paths"]["/healthz"].is_object());
    assert!(doc["paths"]["/readyz"].is_object());
    // As strict as the API: declared categories only (records for PATCH),
    // keys without control characters, `format` json or csv, PATCH non-empty.
    let item = &doc["paths"]["/v1/records/{category}/{key}"];
    let param = |op: &str, name: &str| -> Json {
        item[op]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["schema"]
            .clone()
    };
    assert_eq!(
        param("put", "category")["enum"].as_array().unwrap().len(),
        4
    );
    let patchable = param("patch", "category")["enum"].clone();
    assert!(
        !patchable
            .as_array()
            .unwrap()
            .contains(&Json::from("billing"))
    );
    assert!(param("get", "key")["pattern"].is_string());
    assert_eq!(
        item["patch"]["requestBody"]["content"]["application/json"]["schema"]["minProperties"],
        1
    );
    let agg = &doc["paths"]["/v1/aggregates/billing_by_city_month"]["get"]["parameters"];
    let format = agg
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "format")
        .unwrap();
    assert_eq!(format["schema"]["enum"], serde_json::json!(["json", "csv"]));
    c.stop_all();
    // Logs to a file carry no terminal colour codes.
    let log = c.log(city);
    assert!(log.contains("node started"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI codes in a log file:\n{log}");
}

fn reload(c: &Cluster, id: &str) -> Output {
    tiersync(&[
        "reload",
        "--config",
        c.config(id).to_str().unwrap(),
        "--token",
        &c.token(id),
        "--timeout",
        "30",
    ])
}

/// `tiersync reload --node URL`: when the file names another API address.
fn reload_at(c: &Cluster, id: &str) -> Output {
    let url = format!("http://{}", c.api(id));
    tiersync(&[
        "reload",
        "--node",
        &url,
        "--token",
        &c.token(id),
        "--timeout",
        "30",
    ])
}

fn metrics_text(c: &Cluster, id: &str) -> String {
    ureq::get(&c.url(id, "/metrics"))
        .header("authorization", &format!("Bearer {}", c.tokens(id).admin))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn metric(c: &Cluster, id: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    tiersync::client::metric_value(&metrics_text(c, id), name, labels)
}

#[test]
fn sighup_reloads_what_it_can_and_refuses_the_rest() {
    let mut c = small();
    c.start_all();
    let id = "zhejiang";
    let pid = c.pid(id).unwrap();

    // A bare SIGHUP (what systemd's ExecReload sends) no longer kills the node.
    tiersync::process::signal(pid, tiersync::process::SIGHUP).unwrap();
    let reloaded = wait_for(Duration::from_secs(30), || {
        let s = c.get(id, "/v1/status").body;
        (s["config"]["reloads"] == 1).then_some(s)
    })
    .expect("the SIGHUP reload was not recorded");
    assert_eq!(reloaded["config"]["last"]["ok"], true, "{reloaded}");

    // A renewed certificate (5 days) and a new child and log level are applied.
    let before = metric(
        &c,
        id,
        "tiersync_tls_cert_expiry_timestamp_seconds",
        &[("cert", "node")],
    )
    .expect("the expiry gauge is there from the start");
    let certs = c.dir.path().join("certs");
    tiersync::certs::issue(
        &certs,
        &tiersync_protocol::NodeId::new(id).unwrap(),
        None,
        5,
    )
    .unwrap();
    let text = edited(
        &c,
        id,
        &[(
            "children = [\"hangzhou\"]",
            "children = [\"hangzhou\", \"newcity\"]",
        )],
    ) + "\n[log]\nlevel = \"debug\"\n";
    std::fs::write(c.config(id), &text).unwrap();
    let out = reload(&c, id);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    for what in ["certificates re-read", "newcity", "log.level"] {
        assert!(said.contains(what), "{what} not in {said}");
    }
    let after = metric(
        &c,
        id,
        "tiersync_tls_cert_expiry_timestamp_seconds",
        &[("cert", "node")],
    )
    .unwrap();
    assert!(
        after < before - 86_400.0,
        "the renewed certificate is not in use: expiry {before} → {after}"
    );
    // The new child is admitted: before the reload the province refused it
    // as unknown.
    tiersync::certs::issue(
        &certs,
        &tiersync_protocol::NodeId::new("newcity").unwrap(),
        None,
        5,
    )
    .unwrap();
    let newcity = write(
        &c,
        "newcity.toml",
        &edited(
            &c,
            "hangzhou",
            &[
                ("id = \"hangzhou\"", "id = \"newcity\""),
                (
                    "data_dir = \"data/hangzhou\"",
                    "data_dir = \"data/newcity\"",
                ),
                ("certs/hangzhou.pem", "certs/newcity.pem"),
                ("certs/hangzhou.key", "certs/newcity.key"),
                (
                    &api_line(&c, "hangzhou"),
                    &format!(
                        "api = \"127.0.0.1:{}\"",
                        tiersync::deploygen::free_port().unwrap()
                    ),
                ),
            ],
        ),
    );
    c.start_with("newcity", newcity);
    let admitted = wait_for(Duration::from_secs(30), || {
        let s = c.get(id, "/v1/status").body;
        (s["links"]["children"]["newcity"]["connected"] == true).then_some(())
    });
    assert!(admitted.is_some(), "{}", c.get(id, "/v1/status").body);
    c.stop("newcity");
    // Links still work with the renewed certificate.
    assert_eq!(
        c.send(
            "PUT",
            "hangzhou",
            "/v1/records/customer/after-reload",
            &serde_json::json!({"v": 1})
        )
        .status,
        200
    );
    assert!(
        c.wait_converged(Duration::from_secs(60)),
        "no convergence after the reload"
    );

    // A change only a restart can make is refused, and nothing changes.
    let moved = edited(&c, id, &[(&api_line(&c, id), "api = \"127.0.0.1:1\"")]);
    std::fs::write(c.config(id), &moved).unwrap();
    let out = reload_at(&c, id);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("needs a restart") && err.contains("listen.api"),
        "{err}"
    );
    let status = c.get(id, "/v1/status").body;
    assert_eq!(status["config"]["last"]["ok"], false, "{status}");
    assert_eq!(status["config"]["reloads"], 3, "{status}");
    // A broken file is refused too, naming the key.
    std::fs::write(
        c.config(id),
        text.replace("tier = \"province\"", "tier = \"county\""),
    )
    .unwrap();
    let out = reload_at(&c, id);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("node.tier"), "{}", stderr(&out));
    assert_eq!(
        metric(
            &c,
            id,
            "tiersync_config_reloads_total",
            &[("result", "refused")]
        ),
        Some(2.0)
    );
    assert!(c.is_running(id));
    c.stop_all();
}

/// Whether `promtool` is installed (Debian package `prometheus`).
fn promtool() -> Command {
    let found = Command::new("promtool").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "promtool is required (Debian package prometheus; scripts/env.sh installs it)"
    );
    Command::new("promtool")
}

#[test]
fn metrics_are_present_at_start_and_pass_promtool() {
    let mut c = small();
    c.start_all();
    for id in ["national", "zhejiang", "hangzhou"] {
        let text = metrics_text(&c, id);
        // Every family has HELP text.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{id}: no HELP for {name}"
            );
        }
        // Families present before their first event, with the same labels
        // everywhere.
        let mut wanted = vec![
            "tiersync_build_info{",
            "tiersync_api_request_duration_seconds_bucket{",
            "tiersync_writes_total{",
            "tiersync_merges_total ",
            "tiersync_tls_cert_expiry_timestamp_seconds{cert=\"node\"}",
            "tiersync_config_reloads_total{",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
        ];
        if id != "national" {
            wanted.extend([
                "tiersync_link_up{link=\"parent\"",
                "tiersync_link_batches_total{link=\"parent\"",
                "tiersync_link_errors_total{link=\"parent\"",
                "tiersync_uplink_lag_records{",
            ]);
        }
        if id != "hangzhou" {
            wanted.extend([
                "tiersync_link_up{link=\"child\"",
                "tiersync_link_items_total{link=\"child\"",
                "tiersync_link_refused_total{reason=\"overload\"}",
            ]);
        }
        for w in wanted {
            assert!(text.contains(w), "{id}: no {w} in:\n{text}");
        }
        assert!(!text.contains("quantile="), "{id}: a summary is left");
        let mut check = promtool()
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{id}: promtool check metrics:\n{}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    c.stop_all();
}

#[test]
fn config_check_checks_certificates_one_file_and_policies() {
    let c = small();
    let city = c.config("hangzhou");
    let policy = c.dir.path().join("policy.toml");
    // One node's file on its own, with the policy file: fine, with a warning.
    let out = tiersync(&[
        "config",
        "check",
        city.to_str().unwrap(),
        policy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1 node file(s), 1 policy file(s)"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("node zhejiang's file was not given"),
        "{}",
        stderr(&out)
    );

    // A certificate expiring within 30 days is a warning.
    let certs = c.dir.path().join("certs");
    let hangzhou = tiersync_protocol::NodeId::new("hangzhou").unwrap();
    tiersync::certs::issue(&certs, &hangzhou, None, 10).unwrap();
    let out = tiersync(&["config", "check", city.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("tls.cert: ") && err.contains("expires in") && err.contains("day(s)"),
        "{err}"
    );

    // Expired (seen from 2 days later): an error.
    tiersync::certs::issue(&certs, &hangzhou, None, 1).unwrap();
    let out = Command::new("faketime")
        .args(["-f", "+2d"])
        .arg(workspace_bin("tiersync"))
        .args(["config", "check"])
        .arg(&city)
        .output()
        .expect("faketime is required (Debian package faketime; scripts/env.sh installs it)");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("tls.cert") && stderr(&out).contains("expired on"),
        "{}",
        stderr(&out)
    );

    // Missing: an error naming the key and the file.
    std::fs::remove_file(certs.join("hangzhou.pem")).unwrap();
    let out = tiersync(&["config", "check", city.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("tls.cert: ") && stderr(&out).contains("hangzhou.pem: no such file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn certs_issue_keeps_existing_files_without_force_and_certs_list_shows_them() {
    let c = small();
    let dir = c.dir.path().join("certs");
    let dir_s = dir.to_str().unwrap();
    let key_before = std::fs::read(dir.join("hangzhou.key")).unwrap();
    let out = tiersync(&["certs", "issue", "--dir", dir_s, "newcity", "hangzhou"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.join("hangzhou.key")).unwrap(), key_before);
    assert!(
        !dir.join("newcity.pem").exists(),
        "a refused issue wrote a file"
    );
    let out = tiersync(&["certs", "issue", "--dir", dir_s, "--force", "hangzhou"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(std::fs::read(dir.join("hangzhou.key")).unwrap(), key_before);

    let out = tiersync(&["certs", "list", "--dir", dir_s, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Json = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["node_id"].as_str())
        .collect();
    assert_eq!(ids, ["hangzhou", "national", "zhejiang"]);
    let out = tiersync(&["certs", "list", "--dir", dir_s]);
    assert!(stdout(&out).contains("(CA)"), "{}", stdout(&out));
}

#[test]
fn error_messages_say_what_to_do() {
    let mut c = small();
    c.start("national");
    let url = format!("http://{}", c.api("national"));
    // An unknown category lists the declared ones.
    let token = c.token("national");
    let out = tiersync(&["get", "orders", "k", "--node", &url, "--token", &token]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("unknown_category") && err.contains("customer, "),
        "{err}"
    );
    // An unknown drill-down node is a 404.
    let r = c.get(
        "national",
        "/v1/aggregates/billing_by_city_month?drill=nowhere",
    );
    assert_eq!(r.status, 404, "{}", r.body);
    // An unreachable node names the ways to choose another.
    let port = tiersync::deploygen::free_port().unwrap();
    let out = tiersync(&["status", "--node", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--node") && err.contains("TIERSYNC_NODE"),
        "{err}"
    );
    // An OS error quoted by a message is not printed again.
    let out = tiersync(&["run", "--config", "/nonexistent/node.toml"]);
    let err = stderr(&out);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    c.stop_all();
}

#[test]
fn a_node_under_a_wrapper_is_stopped_with_its_group() {
    let c = small();
    // faketime runs the node as its child, as the clock-skew tests do.
    let log = std::fs::File::create(c.dir.path().join("logs").join("national.log")).unwrap();
    let group = ProcessGroup::spawn(
        Command::new("faketime")
            .args(["-f", "+0s"])
            .arg(workspace_bin("tiersync"))
            .args(["run", "--config"])
            .arg(c.config("national"))
            .stdout(Stdio::null())
            .stderr(log),
    )
    .expect("faketime is required (Debian package faketime; scripts/env.sh installs it)");
    let pid = wait_for(Duration::from_secs(30), || {
        c.get_opt("national", "/v1/status")?.body["pid"].as_u64()
    })
    .expect("the node under faketime did not start");
    assert_ne!(
        u64::from(group.id()),
        pid,
        "faketime exec'd: no wrapper to test"
    );
    // What a failing test does: the guard is dropped.
    drop(group);
    // Gone, or a zombie waiting for whoever adopted it to reap it.
    let gone = wait_for(Duration::from_secs(30), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        matches!(state, None | Some('Z')).then_some(())
    });
    assert!(gone.is_some(), "node {pid} outlived its wrapper's group");
}

#[test]
fn uplink_lag_metric_agrees_with_status_from_the_start() {
    let mut c = small();
    c.start_all();
    c.stop("zhejiang");
    for i in 0..3 {
        let r = c.send(
            "PUT",
            "hangzhou",
            &format!("/v1/records/customer/lag-{i}"),
            &serde_json::json!({"i": i}),
        );
        assert_eq!(r.status, 200);
    }
    // Restarted with its parent away: the backlog shows at once.
    c.stop("hangzhou");
    c.start("hangzhou");
    let lag = metric(
        &c,
        "hangzhou",
        "tiersync_uplink_lag_records",
        &[("peer", "zhejiang")],
    );
    assert!(lag.is_some_and(|l| l >= 3.0), "lag at start: {lag:?}");
    // Once the uplink reports, the status says the same.
    let in_status = wait_for(Duration::from_secs(30), || {
        c.get("hangzhou", "/v1/status").body["links"]["parent"]["lag_records"].as_f64()
    });
    assert_eq!(lag, in_status);
    c.stop_all();
}
