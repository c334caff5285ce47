//! Clock skew: a city whose clock runs hours ahead (under `faketime`) has its
//! batches refused by its parent with a clear reason; nothing far-future is
//! stored above it, and another city's write is not overruled by it. A city
//! behind keeps replicating (its stamps are merely old) as long as its clock
//! is within the hour certificates are backdated by; further behind, TLS
//! refuses the parent's certificate as not yet valid, with a clear error.
//!
//! Needs `faketime` (Debian package `faketime`, installed by scripts/env.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::Cluster;
use tiersync_tests::{ProcessGroup, example_policy, wait_for, workspace_bin};

/// Starts node `id` with its wall clock shifted by `offset` (e.g. "+2h").
fn start_skewed(c: &Cluster, id: &str, offset: &str) -> ProcessGroup {
    let log = std::fs::File::create(c.dir.path().join("logs").join(format!("{id}.log"))).unwrap();
    // faketime runs the node as its child: only stopping the whole group
    // stops the node.
    let child = ProcessGroup::spawn(
        Command::new("faketime")
            .arg("-f")
            .arg(offset)
            .arg(workspace_bin("tiersync"))
            .args(["run", "--config"])
            .arg(c.config(id))
            // Timers and timeouts keep the real monotonic clock.
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdout(Stdio::null())
            .stderr(log),
    )
    .expect("faketime must be installed (Debian package faketime; scripts/env.sh installs it)");
    let up = wait_for(Duration::from_secs(30), || {
        (c.get_opt(id, "/v1/status")?.status == 200).then_some(())
    });
    assert!(
        up.is_some(),
        "{id} did not start under faketime: {}",
        c.log(id)
    );
    child
}

#[test]
fn a_city_hours_ahead_is_refused_and_one_behind_still_replicates() {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 3,
        ..Spec::default()
    });
    c.start("national");
    c.start("zhejiang");
    let mut ahead = start_skewed(&c, "hangzhou", "+2h");
    // 30 min behind: within the hour certificates are backdated by.
    let mut behind = start_skewed(&c, "ningbo", "-30m");
    // 2 h behind: the parent's certificate is "not valid yet" there, and the
    // city says so.
    let mut far_behind = start_skewed(&c, "wenzhou", "-2h");

    // ningbo (2 h behind) writes first in real time; hangzhou (2 h ahead)
    // writes the same customer after it.
    assert_eq!(
        c.send(
            "PUT",
            "ningbo",
            "/v1/records/customer/shared-x",
            &json!({"v": "ningbo"})
        )
        .status,
        200
    );
    assert_eq!(
        c.send(
            "PUT",
            "ningbo",
            "/v1/records/customer/from-behind",
            &json!({"v": 1})
        )
        .status,
        200
    );
    assert_eq!(
        c.send(
            "PUT",
            "hangzhou",
            "/v1/records/customer/shared-x",
            &json!({"v": "hangzhou"})
        )
        .status,
        200
    );
    assert_eq!(
        c.send(
            "PUT",
            "hangzhou",
            "/v1/records/customer/from-ahead",
            &json!({"v": 1})
        )
        .status,
        200
    );

    // The city ahead is refused, and says why.
    let err = c.wait_uplink_error("hangzhou", c.api("hangzhou"), "ahead of this node's clock");
    assert!(err.contains("max_clock_skew_ms"), "{err}");
    let parent_side =
        c.get("zhejiang", "/v1/status").body["links"]["children"]["hangzhou"]["last_error"].clone();
    assert!(
        parent_side.as_str().unwrap_or("").contains("ahead"),
        "{parent_side}"
    );

    // The city behind replicates normally.
    let arrived = wait_for(Duration::from_secs(30), || {
        (c.get("national", "/v1/records/customer/from-behind").status == 200).then_some(())
    });
    assert!(
        arrived.is_some(),
        "the city behind did not replicate: {}",
        c.log("ningbo")
    );
    c.wait_uplink_error("wenzhou", c.api("wenzhou"), "not valid yet");
    assert_eq!(
        c.get("zhejiang", "/v1/records/customer/from-ahead").status,
        404
    );
    let doc = c.get("national", "/v1/records/customer/shared-x").body;
    assert_eq!(
        doc["fields"]["v"], "ningbo",
        "the far-future write must not win above its city: {doc}"
    );

    for child in [&mut ahead, &mut behind, &mut far_behind] {
        child.stop();
    }
    c.stop_all();
    // Nothing far-future was stored above the city.
    let limit = tiersync::now_ms() + example_policy().limits.max_clock_skew_ms;
    for id in ["zhejiang", "national"] {
        for ((cat, key), item) in c.read_store(id) {
            for s in item.stamps() {
                assert!(
                    s.hlc.physical_ms <= limit,
                    "{id} stores {cat}/{key} stamped {s}"
                );
            }
        }
    }
}

/// A child whose certificate has expired (by its parent's clock: the parent
/// runs three days ahead, the child's certificate was issued for one day) is
/// refused in the TLS handshake; the parent logs why.
#[test]
fn an_expired_child_certificate_is_refused() {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    });
    tiersync::certs::issue(
        &c.dir.path().join("certs"),
        &tiersync_protocol::NodeId::new("hangzhou").unwrap(),
        Some(tiersync_protocol::Tier::City),
        1,
    )
    .unwrap();
    let mut parent = start_skewed(&c, "zhejiang", "+3d");
    c.start("hangzhou");
    // TLS 1.3 checks the client's certificate after the client finished its
    // side of the handshake, so the child sees its connection closed; the
    // parent logs why.
    c.wait_uplink_error("hangzhou", c.api("hangzhou"), "connection");
    let why = wait_for(Duration::from_secs(30), || {
        let log = c.log("zhejiang");
        log.to_lowercase().contains("expired").then_some(log)
    });
    assert!(
        why.is_some(),
        "the parent did not log the expired certificate: {}",
        c.log("zhejiang")
    );
    let link = &c.get("zhejiang", "/v1/status").body["links"]["children"]["hangzhou"];
    assert!(
        link.is_null(),
        "a link was opened for an expired certificate: {link}"
    );
    parent.stop();
    c.stop_all();
}
