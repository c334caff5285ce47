//! `tiersync demo --exit-when-converged --json` with small sizes: the whole
//! topology starts as separate processes, loads data, converges, and its
//! summary says what each tier holds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::process::Command;

use serde_json::Value as Json;
use tiersync_tests::workspace_bin;

#[test]
fn demo_converges_and_keeps_private_data_at_cities() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("deployment");
    let out = Command::new(workspace_bin("tiersync"))
        .args([
            "demo",
            "--exit-when-converged",
            "--json",
            "--customers",
            "40",
            "--provinces",
            "2",
            "--cities",
            "2",
        ])
        .arg("--dir")
        .arg(&demo_dir)
        .output()
        .expect("run tiersync demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let s: Json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stderr}"));
    assert_eq!(s["converged"], true);
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 7);
    assert_eq!(nodes.iter().filter(|n| n["tier"] == "city").count(), 4);
    assert_eq!(s["private_items_above_cities"], 0);
    let tiers = &s["items_per_tier"];
    // 40 customers and 120 bills per city; every shared item reaches both
    // the provinces (together) and national.
    for tier in ["city", "province", "national"] {
        assert_eq!(tiers[tier]["customer"], 160, "{tier}: {s}");
        assert_eq!(tiers[tier]["billing"], 480, "{tier}: {s}");
    }
    for tier in ["province", "national"] {
        assert_eq!(tiers[tier]["opportunity"], 0);
        assert_eq!(tiers[tier]["service_activity"], 0);
    }
    assert!(tiers["city"]["opportunity"].as_u64().unwrap() > 0);
    // Each node's operator and analyst tokens, readable by this user only.
    for n in nodes {
        for key in ["operator_token_file", "analyst_token_file"] {
            use std::os::unix::fs::PermissionsExt;
            let file = n[key].as_str().unwrap();
            let meta = std::fs::metadata(file).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
            assert!(std::fs::read_to_string(file).unwrap().starts_with("tst_"));
        }
    }
    // The deployment it wrote can be checked (and run) node by node.
    let check = Command::new(workspace_bin("tiersync"))
        .args(["config", "check"])
        .args(
            nodes
                .iter()
                .map(|n| n["config"].as_str().unwrap().to_string()),
        )
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
