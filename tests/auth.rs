//! API access control across real processes: tokens are per node, the CLI
//! manages them, revocation applies at the next request, the audit log
//! names who did what, TLS off loopback, and the CLI over HTTPS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value as Json, json};
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::Cluster;
use tiersync_tests::workspace_bin;

fn small() -> Cluster {
    Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    })
}

fn tiersync(args: &[&str]) -> Output {
    Command::new(workspace_bin("tiersync"))
        .args(args)
        .env_remove("TIERSYNC_NODE")
        .env_remove("TIERSYNC_TOKEN")
        .env_remove("TIERSYNC_CA")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tiersync")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn tokens_are_valid_only_at_their_node_revoked_at_once_and_audited() {
    let mut c = small();
    c.start_all();
    let city = c.cities()[0].clone();
    let province = "zhejiang";
    let hz = c.tokens(&city);
    // A city's token opens nothing at its province.
    for t in [&hz.operator, &hz.admin] {
        let r = c.get_as(Some(t), province, "/v1/records/customer");
        assert_eq!(r.status, 401, "{}", r.body);
    }
    assert_eq!(c.get_as(None, &city, "/v1/status").status, 401);

    // The CLI creates, lists and revokes tokens with the admin token.
    let config = c.config(&city).display().to_string();
    let out = tiersync(&[
        "token", "create", "--role", "operator", "--name", "crm-app", "--config", &config,
        "--token", &hz.admin, "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let created: Json = serde_json::from_slice(&out.stdout).unwrap();
    let (token, id) = (
        created["token"].as_str().unwrap().to_string(),
        created["id"].as_str().unwrap().to_string(),
    );
    let out = tiersync(&["token", "list", "--config", &config, "--token", &hz.admin]);
    let listed = text(&out);
    assert!(
        out.status.success() && listed.contains("crm-app") && listed.contains(&id),
        "{listed}"
    );
    assert!(
        !listed.contains(&token),
        "a listing shows a secret: {listed}"
    );
    // An operator token cannot manage tokens.
    let out = tiersync(&[
        "token",
        "list",
        "--config",
        &config,
        "--token",
        &hz.operator,
    ]);
    assert!(
        !out.status.success() && text(&out).contains("forbidden"),
        "{}",
        text(&out)
    );

    // The new token writes (through the CLI, from the environment)...
    let put = |t: &str| {
        Command::new(workspace_bin("tiersync"))
            .args([
                "put",
                "customer",
                "c-audit",
                r#"{"name":"Li"}"#,
                "--config",
                &config,
            ])
            .env("TIERSYNC_TOKEN", t)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = put(&token);
    assert!(out.status.success(), "{}", text(&out));
    let out = tiersync(&[
        "token", "revoke", &id, "--config", &config, "--token", &hz.admin,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // ... and is refused at the very next request.
    let out = put(&token);
    assert!(!out.status.success(), "a revoked token wrote");
    assert!(text(&out).contains("unauthorized"), "{}", text(&out));

    // The audit log names who wrote and who was refused.
    let log = c.log(&city);
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tiersync::audit"))
        .collect();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("who=crm-app") && l.contains("write") && l.contains("c-audit")),
        "no audit line of crm-app's write in:\n{}",
        audit.join("\n")
    );
    assert!(
        audit.iter().any(|l| l.contains("denied")),
        "{}",
        audit.join("\n")
    );
    assert!(
        !log.contains(&token[token.len() - 64..]),
        "a secret reached the log"
    );
    c.stop_all();
}

#[test]
fn a_node_off_loopback_refuses_to_start_without_tls_and_speaks_https_with_it() {
    let c = small();
    let city = c.cities()[0].clone();
    let config = c.config(&city);
    let original = std::fs::read_to_string(&config).unwrap();
    let api = c.api(&city);
    // 0.0.0.0 without TLS: refused before anything starts.
    let open = original.replace(
        &format!("api = \"{api}\""),
        &format!("api = \"0.0.0.0:{}\"", api.port()),
    );
    assert_ne!(open, original);
    std::fs::write(&config, &open).unwrap();
    let out = tiersync(&["run", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("api listens on 0.0.0.0 without TLS"),
        "{}",
        text(&out)
    );

    // With [api] tls = true it serves HTTPS (here on loopback: tests bind
    // nothing else), and the CLI speaks it, trusting the deployment CA
    // named by the node file.
    std::fs::write(&config, format!("{original}\n[api]\ntls = true\n")).unwrap();
    let log = std::fs::File::create(c.dir.path().join("tls-node.log")).unwrap();
    let mut child = tiersync::process::spawn_node(
        &workspace_bin("tiersync"),
        &config,
        log,
        &[("RUST_LOG", "info")],
        Duration::from_secs(30),
    )
    .expect("the TLS node starts");
    let loaded = tiersync::config::load(&config).unwrap();
    let admin_file = loaded
        .config
        .node
        .data_dir
        .join(tiersync::api::auth::BOOTSTRAP_FILE);
    let cfg = config.display().to_string();
    let admin = admin_file.display().to_string();
    let out = tiersync(&["status", "--config", &cfg, "--token-file", &admin, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["node_id"], json!(city));
    // Plain HTTP gets no answer from a TLS listener.
    let url = format!("http://{api}");
    let out = tiersync(&["status", "--node", &url, "--token-file", &admin]);
    assert!(!out.status.success(), "{}", text(&out));
    let _ = tiersync::process::terminate(child.id());
    let _ = child.wait();
}
