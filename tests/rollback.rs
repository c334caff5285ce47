//! Data that goes back in time, and a disk that fails its fsync, on real
//! nodes (national ← zhejiang ← hangzhou over QUIC on loopback).
//!
//! * `restored_city_keeps_replicating_everything`: a city's data directory
//!   is restored from an earlier copy (as from a backup or a VM snapshot)
//!   after it wrote more, then it writes past its parent's cursor again.
//!   Its sequence numbers are reissued: without the check of the parent's
//!   cursor at the handshake, the province would take the new writes for
//!   ones it holds and skip them. Everything every write made reaches
//!   national, and national's watermark of the city names its new
//!   incarnation.
//! * `failed_fsync_stops_the_node`: the 4th WAL sync fails (fail point
//!   `store-sync-error`): that write is not acknowledged, the node stops
//!   (exits non-zero), a retried identical append is never acknowledged
//!   as "unchanged", and after a restart without the fault every
//!   acknowledged write is there.
//! * `moved_city_blocks_nothing_and_counts_once`: a city that edited a
//!   customer a sibling edits too moves to the other province; its old
//!   province goes on relaying that record (national takes the moved
//!   city's part of it, written before the move) and is never blocked; every later write of every
//!   city reaches national, the record holds both cities' fields, and the
//!   moved city's private opportunities count once.
//! * `moved_city_writes_only_its_old_province_holds_reach_national`: a city
//!   overwrites a sibling's customer while national is away, loses its disk
//!   and moves: national takes the overwrite from the old province (the
//!   city left that province's subtree after writing it), so every tier
//!   holds the same record.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::Cluster;
use tiersync_tests::wait_for;

const CONVERGE: Duration = Duration::from_secs(60);

fn one_city() -> Cluster {
    Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn put(c: &Cluster, node: &str, path: &str, body: serde_json::Value) {
    let r = c.send("PUT", node, path, &body);
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// Every city writes a customer (completeness is per city).
fn every_city_writes(c: &Cluster) {
    for city in c.cities() {
        put(
            c,
            &city,
            &format!("/v1/records/customer/first-{city}"),
            json!({"name": city}),
        );
    }
}

fn has_customer(c: &Cluster, node: &str, key: &str) -> bool {
    c.get_opt(node, &format!("/v1/records/customer/{key}"))
        .is_some_and(|r| r.status == 200)
}

#[test]
fn restored_city_keeps_replicating_everything() {
    let mut c = one_city();
    c.start_all();
    let city = "hangzhou";
    c.bulk_customers(city, "before-", 0, 300);
    assert!(c.wait_complete_at("national", CONVERGE).is_some());

    // The backup: a copy of the stopped city's data directory.
    let data = c.deployment.node(city).unwrap().data_dir.clone();
    let backup = c.dir.path().join("hangzhou-backup");
    c.stop(city);
    copy_dir(&data, &backup);
    let old_inc = {
        c.start(city);
        c.get(city, "/v1/status").body["incarnation"].clone()
    };

    // Written after the backup, replicated, then lost at the city.
    c.bulk_customers(city, "lost-", 0, 300);
    assert!(c.wait_complete_at("national", CONVERGE).is_some());
    let cursor_before = c.get(city, "/v1/status").body["last_seq"].as_u64().unwrap();
    c.stop(city);
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&backup, &data);
    // The province is away while the restored city works: the city writes
    // past the province's cursor before they meet again, so the numbers
    // alone cannot show that it went back in time.
    c.stop("zhejiang");
    c.start(city);
    let restored_seq = c.get(city, "/v1/status").body["last_seq"].as_u64().unwrap();
    assert!(
        restored_seq < cursor_before,
        "the restore went back in time"
    );
    c.bulk_customers(city, "after-", 0, 400);
    let seq = c.get(city, "/v1/status").body["last_seq"].as_u64().unwrap();
    assert!(
        seq > cursor_before,
        "the city wrote past its parent's cursor"
    );
    c.start("zhejiang");

    let arrived = wait_for(CONVERGE, || {
        (0..400)
            .all(|i| has_customer(&c, "national", &format!("after-{i}")))
            .then_some(())
    });
    assert!(
        arrived.is_some(),
        "writes made after the restore are missing at national"
    );
    assert!(c.wait_complete_at("national", CONVERGE).is_some());
    for prefix in ["before-", "lost-"] {
        for i in [0, 150, 299] {
            let key = format!("{prefix}{i}");
            assert!(has_customer(&c, "national", &key), "{key} at national");
        }
    }
    assert!(!has_customer(&c, city, "lost-0"), "the city lost them");

    let status = c.get(city, "/v1/status").body;
    let inc = status["incarnation"].clone();
    assert_ne!(inc, old_inc, "the restored city took a new incarnation");
    let marks = c.get("national", "/v1/status").body["links"]["watermarks"].clone();
    assert_eq!(marks[city]["incarnation"], inc, "{marks}");
    assert_eq!(marks[city]["seq"], status["last_seq"], "{marks}");
    assert!(
        c.log(city).contains("took a new incarnation"),
        "the city says why it re-sends its data"
    );
}

#[test]
fn failed_fsync_stops_the_node() {
    let mut c = one_city();
    c.start("national");
    c.start("zhejiang");
    let city = "hangzhou";
    // Sync groups 1-3 succeed, the 4th fails, later ones would succeed.
    c.start_env(
        city,
        &[("FAILPOINTS", "store-sync-error=3*off->1*return->off")],
    );
    let bill = |i: usize| json!({"customer_id": format!("c{i}"), "amount": 10 + i, "billed_at": "2026-11-01"});
    for i in 0..3 {
        let r = c.send("PUT", city, &format!("/v1/records/billing/b{i}"), &bill(i));
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = c.send("PUT", city, "/v1/records/billing/b3", &bill(3));
    assert!(
        r.status >= 500,
        "a write whose sync failed is not acknowledged: {r:?}"
    );

    // The same append again would change nothing; it must still not be
    // acknowledged, nor anything else: the node stops.
    let retried = c.get_opt(city, "/v1/records/billing/b3").map(|_| {
        c.send("PUT", city, "/v1/records/billing/b3", &bill(3))
            .status
    });
    assert_ne!(retried, Some(200), "acknowledged after a failed fsync");
    let exit = c.wait_exit(city, Duration::from_secs(30));
    let exit = exit.expect("the node stops after a failed fsync");
    assert!(!exit.success(), "it exits with an error: {exit:?}");
    assert!(
        c.log(city).contains("WAL sync failed"),
        "the log says why: {}",
        c.log(city)
    );

    // A restart recovers from the WAL: every acknowledged write is there
    // and replicates.
    c.start(city);
    for i in 0..3 {
        let r = c.get(city, &format!("/v1/records/billing/b{i}"));
        assert_eq!(r.status, 200, "b{i} was acknowledged: {r:?}");
    }
    let r = c.send("PUT", city, "/v1/records/billing/b4", &bill(4));
    assert_eq!(r.status, 200, "writes go on after the restart: {r:?}");
    assert!(c.wait_complete_at("national", CONVERGE).is_some());
    for i in [0, 1, 2, 4] {
        let r = c.get("national", &format!("/v1/records/billing/b{i}"));
        assert_eq!(r.status, 200, "b{i} at national");
    }
}

/// A city edits a customer that a sibling edits too, then moves to the other
/// province. Its old province keeps relaying the shared record (with the
/// moved city's fields in it) and must not be blocked for it; every later
/// write of every city reaches national, and national counts the moved
/// city's private aggregates once.
#[test]
fn moved_city_blocks_nothing_and_counts_once() {
    let mut c = Cluster::new(&Spec::default());
    c.start_all();
    let (moved, sibling) = ("hangzhou", "ningbo");
    every_city_writes(&c);
    put(
        &c,
        moved,
        "/v1/records/customer/shared-1",
        json!({"name": "Li", "segment": "gold"}),
    );
    // As many opportunities in one group as privacy.min_group_size: the
    // smallest group a city publishes.
    for i in 1..=5 {
        put(
            &c,
            moved,
            &format!("/v1/records/opportunity/opp-{i}"),
            json!({"customer_id": "shared-1", "stage": "won", "expected_value": 700, "expected_close": "2026-11-20"}),
        );
    }
    assert!(c.wait_complete_at("national", CONVERGE).is_some());
    let r = c.send(
        "PATCH",
        sibling,
        "/v1/records/customer/shared-1",
        &json!({"phone": "555"}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(c.wait_complete_at("national", CONVERGE).is_some());

    // The move: stop the city, change both provinces and the city, restart.
    c.stop(moved);
    c.move_city(moved, "zhejiang", "jiangsu");
    c.stop("zhejiang");
    c.stop("jiangsu");
    c.start("zhejiang");
    c.start("jiangsu");
    c.start(moved);

    // Later writes of every city, including the sibling editing the shared
    // record again: the old province relays it with the moved city's
    // fields in it.
    let r = c.send(
        "PATCH",
        sibling,
        "/v1/records/customer/shared-1",
        &json!({"phone": "556"}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    put(
        &c,
        moved,
        "/v1/records/customer/after-move",
        json!({"name": "Wang"}),
    );
    put(
        &c,
        sibling,
        "/v1/records/customer/sibling-after",
        json!({"name": "Zhao"}),
    );
    put(
        &c,
        "nanjing",
        "/v1/records/customer/nanjing-after",
        json!({"name": "Sun"}),
    );
    let arrived = wait_for(CONVERGE, || {
        ["after-move", "sibling-after", "nanjing-after"]
            .iter()
            .all(|k| has_customer(&c, "national", k))
            .then_some(())
    });
    assert!(
        arrived.is_some(),
        "later writes of every city reach national"
    );
    assert!(c.wait_complete_at("national", CONVERGE).is_some());
    let shared = c.get("national", "/v1/records/customer/shared-1").body;
    assert_eq!(shared["fields"]["segment"], "gold", "{shared}");
    assert_eq!(shared["fields"]["phone"], "556", "{shared}");
    let zhejiang = &c.get("national", "/v1/status").body["links"]["children"]["zhejiang"];
    assert_eq!(zhejiang["connected"], true, "{zhejiang}");
    assert!(zhejiang["last_error"].is_null(), "{zhejiang}");
    // The moved city's private opportunity counts once at national.
    let rows = c
        .get(
            "national",
            "/v1/aggregates/opportunities_by_city_stage_month?group_by=origin",
        )
        .body;
    let mine: Vec<&serde_json::Value> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["group"]["origin"] == moved)
        .collect();
    assert_eq!(mine.len(), 1, "{rows}");
    assert_eq!(mine[0]["values"]["count"], 5, "{rows}");
}

/// A city overwrites a customer a sibling wrote while national is away,
/// then loses its disk and moves to the other province: its overwrite now
/// exists only at its old province. National must take it from there (the
/// city wrote it while it was below that province, which national learnt
/// from the province's earlier Hello), or it would keep the sibling's
/// superseded version while the province holds the city's: the tiers would
/// disagree for good.
#[test]
fn moved_city_writes_only_its_old_province_holds_reach_national() {
    let mut c = Cluster::new(&Spec::default());
    c.start_all();
    let (moved, sibling) = ("hangzhou", "ningbo");
    every_city_writes(&c);
    put(
        &c,
        sibling,
        "/v1/records/customer/shared-2",
        json!({"name": "Li", "segment": "silver"}),
    );
    assert!(c.wait_complete_at("national", CONVERGE).is_some());

    // National is away: the city's overwrite reaches only its province.
    c.stop("national");
    put(
        &c,
        moved,
        "/v1/records/customer/shared-2",
        json!({"name": "Li Wei", "segment": "gold"}),
    );
    let at_province = wait_for(CONVERGE, || {
        let r = c.get_opt("zhejiang", "/v1/records/customer/shared-2")?;
        (r.body["fields"]["segment"] == "gold").then_some(())
    });
    assert!(at_province.is_some(), "the overwrite reached the province");

    // The city's disk is lost, and it starts over below the other province.
    let data = c.deployment.node(moved).unwrap().data_dir.clone();
    c.stop(moved);
    std::fs::remove_dir_all(&data).unwrap();
    c.move_city(moved, "zhejiang", "jiangsu");
    c.stop("zhejiang");
    c.stop("jiangsu");
    c.start("zhejiang");
    c.start("jiangsu");
    c.start(moved);
    c.start("national");
    put(
        &c,
        moved,
        "/v1/records/customer/after-move-2",
        json!({"name": "Wang"}),
    );
    assert!(c.wait_complete_at("national", CONVERGE).is_some());
    let arrived = wait_for(CONVERGE, || {
        has_customer(&c, "national", "after-move-2").then_some(())
    });
    assert!(
        arrived.is_some(),
        "the moved city's later write reaches national"
    );
    let province = c.get("zhejiang", "/v1/records/customer/shared-2").body;
    let national = wait_for(CONVERGE, || {
        let r = c.get_opt("national", "/v1/records/customer/shared-2")?;
        (r.body["fields"] == province["fields"]).then_some(r.body)
    });
    assert!(
        national.is_some(),
        "national holds the moved city's overwrite its old province relays: {province} vs {:?}",
        c.get_opt("national", "/v1/records/customer/shared-2")
            .map(|r| r.body)
    );
    assert_eq!(province["fields"]["segment"], "gold", "{province}");
}
