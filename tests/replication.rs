//! Replication over real QUIC on loopback: real `tiersync run` processes,
//! temp dirs, mutual TLS with generated certificates.
//!
//! The strongest check stops the nodes and compares their stores item by
//! item: each province and the national node must hold exactly the CRDT
//! merge of the shared items written in their subtree, and no private item.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::time::Duration;

use serde_json::json;
use tiersync::deploygen::Spec;
use tiersync_protocol::Tier;
use tiersync_tests::cluster::Cluster;

const CONVERGE: Duration = Duration::from_secs(60);

fn write_city_data(c: &Cluster, city: &str, n: usize) {
    for i in 0..n {
        let r = c.send(
            "PUT",
            city,
            &format!("/v1/records/customer/cust-{city}-{i}"),
            &json!({"name": format!("Customer {i} of {city}"), "segment": (["gold", "silver", "bronze"][i % 3])}),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
        let r = c.send(
            "PUT",
            city,
            &format!("/v1/records/billing/bill-{city}-{i}"),
            &json!({"customer_id": format!("cust-{city}-{i}"), "amount": 100 + i, "billed_at": "2026-11-01"}),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
        let r = c.send(
            "PUT",
            city,
            &format!("/v1/records/opportunity/opp-{city}-{i}"),
            &json!({"customer_id": format!("cust-{city}-{i}"), "stage": "proposal", "expected_value": 5000}),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = c.send(
        "PATCH",
        city,
        &format!("/v1/records/customer/cust-{city}-0"),
        &json!({"segment": "platinum"}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c.send(
        "DELETE",
        city,
        &format!("/v1/records/customer/cust-{city}-1"),
        &json!(null),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[test]
fn three_tiers_converge_and_private_data_stays_home() {
    let mut c = Cluster::new(&Spec::default());
    c.start_all();
    let cities = c.cities();
    assert_eq!(cities.len(), 4);
    for city in &cities {
        write_city_data(&c, city, 15);
    }
    // Concurrent conflicting PATCHes to one customer in two provinces.
    let (a, b) = (&cities[0], &cities[2]);
    for city in [a, b] {
        let r = c.send(
            "PUT",
            city,
            "/v1/records/customer/shared-1",
            &json!({"name": "Shared", "note": format!("from {city}")}),
        );
        assert_eq!(r.status, 200);
    }
    c.send(
        "PATCH",
        a,
        "/v1/records/customer/shared-1",
        &json!({"phone": "111", "tier": "a"}),
    );
    c.send(
        "PATCH",
        b,
        "/v1/records/customer/shared-1",
        &json!({"email": "x@y", "tier": "b"}),
    );
    assert!(c.wait_converged(CONVERGE), "did not converge");

    let national = c.get("national", "/v1/records/customer/shared-1").body;
    for p in c
        .deployment
        .nodes
        .iter()
        .filter(|n| n.tier == Tier::Province)
    {
        let doc = c.get(p.id.as_str(), "/v1/records/customer/shared-1").body;
        assert!(doc["fields"].is_object(), "{} lacks shared-1: {doc}", p.id);
    }
    // Per-field last writer wins: both PATCHes' distinct fields survive.
    assert_eq!(national["fields"]["phone"], "111", "{national}");
    assert_eq!(national["fields"]["email"], "x@y", "{national}");
    // Completeness watermarks at national cover every city.
    let status = c.get("national", "/v1/status").body;
    for city in &cities {
        let city_seq = c.get(city, "/v1/status").body["last_seq"]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(
            status["links"]["watermarks"][city]["seq"].as_u64(),
            Some(city_seq),
            "watermark of {city}: {status}"
        );
    }
    assert_eq!(
        c.get("national", "/v1/records/opportunity/opp-hangzhou-0")
            .status,
        404
    );
    c.assert_tiers_hold_merge_of_subtree();
}

fn small() -> Spec {
    Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    }
}

#[test]
fn parent_killed_mid_stream_loses_nothing_and_a_wiped_parent_is_refilled() {
    let mut c = Cluster::new(&small());
    c.start_all();
    c.bulk_customers("hangzhou", "bulk-", 0, 3000);
    // Kill the province while batches are in flight, then bring it back.
    c.kill("zhejiang");
    c.bulk_customers("hangzhou", "bulk-", 3000, 500);
    c.start("zhejiang");
    assert!(c.wait_converged(CONVERGE), "did not converge after kill -9");
    assert_eq!(
        c.get("national", "/v1/records/customer/bulk-3499").status,
        200
    );

    // Wipe the province's data: the city's changelog is trimmed, so the
    // province is refilled by snapshot catch-up.
    c.stop("zhejiang");
    std::fs::remove_dir_all(&c.deployment.node("zhejiang").expect("node").data_dir).expect("wipe");
    c.start("zhejiang");
    assert!(c.wait_converged(CONVERGE), "did not converge after wipe");
    assert_eq!(c.get("zhejiang", "/v1/records/customer/bulk-0").status, 200);
    c.assert_tiers_hold_merge_of_subtree();
}

#[test]
fn a_city_writes_while_its_parent_is_down() {
    let mut c = Cluster::new(&small());
    c.start_all();
    c.stop("zhejiang");
    for i in 0..20 {
        let r = c.send(
            "PUT",
            "hangzhou",
            &format!("/v1/records/customer/offline-{i}"),
            &json!({"name": i}),
        );
        assert_eq!(
            r.status, 200,
            "writes must be accepted with the uplink down: {:?}",
            r.body
        );
    }
    assert_eq!(
        c.get("hangzhou", "/v1/records/customer/offline-7").status,
        200
    );
    let s = c.get("hangzhou", "/v1/status").body;
    assert!(
        s["links"]["parent"]["lag_records"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );
    c.start("zhejiang");
    assert!(c.wait_converged(CONVERGE));
    assert_eq!(
        c.get("national", "/v1/records/customer/offline-19").status,
        200
    );
}

/// Moves `city` from its province to `to` by editing the three node files,
/// as an operator would.
fn move_city(c: &Cluster, city: &str, from: &str, to: &str) {
    let edit = |id: &str, f: &dyn Fn(String) -> String| {
        let path = c.config(id);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, f(text)).unwrap();
    };
    let to_peer = tiersync::config::load(&c.config(to))
        .unwrap()
        .config
        .listen
        .peer
        .expect("a province has a peer address");
    edit(city, &|t| {
        let mut out = String::new();
        let mut in_parent = false;
        for line in t.lines() {
            if line.starts_with('[') {
                in_parent = line == "[parent]";
            }
            let line = if in_parent && line.starts_with("id = ") {
                format!("id = {to:?}")
            } else if in_parent && line.starts_with("addr = ") {
                format!("addr = \"{to_peer}\"")
            } else {
                line.to_string()
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    });
    edit(from, &|t| {
        t.replace(&format!("\"{city}\", "), "")
            .replace(&format!(", \"{city}\""), "")
            .replace(&format!("\"{city}\""), "")
    });
    edit(to, &|t| {
        t.replacen("children = [", &format!("children = [\"{city}\", "), 1)
    });
    // national places the city below its new province (`[subtree]`).
    c.move_in_subtree("national", city, from, to);
}

#[test]
fn a_city_moved_to_another_province_is_caught_up_there() {
    let mut c = Cluster::new(&Spec::default());
    c.start_all();
    write_city_data(&c, "hangzhou", 10);
    assert!(c.wait_converged(CONVERGE));
    // hangzhou's changelog is trimmed now: jiangsu can only learn its data
    // by snapshot catch-up.
    for id in ["hangzhou", "zhejiang", "jiangsu"] {
        c.stop(id);
    }
    move_city(&c, "hangzhou", "zhejiang", "jiangsu");
    c.reload("national");
    let files = c.deployment.config_files();
    let loaded: Vec<_> = files
        .iter()
        .map(|f| tiersync::config::load(f).unwrap())
        .collect();
    assert_eq!(
        tiersync::deployment::check(&loaded),
        vec![],
        "the moved deployment must pass config check"
    );
    for id in ["zhejiang", "jiangsu", "hangzhou"] {
        c.start(id);
    }
    c.send(
        "PUT",
        "hangzhou",
        "/v1/records/customer/after-move",
        &json!({"name": "new"}),
    );
    assert!(
        c.wait_converged(CONVERGE),
        "did not converge after the move"
    );
    assert_eq!(
        c.get("jiangsu", "/v1/records/customer/cust-hangzhou-3")
            .status,
        200
    );
    assert_eq!(
        c.get("jiangsu", "/v1/records/customer/after-move").status,
        200
    );
    assert_eq!(
        c.get("national", "/v1/records/customer/after-move").status,
        200
    );
    // zhejiang keeps what it merged before the move (shared data is never
    // deleted by a topology change) but gets nothing new.
    assert_eq!(
        c.get("zhejiang", "/v1/records/customer/after-move").status,
        404
    );
}
