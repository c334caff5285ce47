//! Clock skew and jumps: a city whose clock runs hours ahead (under
//! `faketime`) stamps no further ahead than its parent's clock allows, so it
//! keeps replicating and overrules nobody; a clock that jumps ahead and back
//! (live, or across restarts with the parent down) has its future writes
//! re-stamped before they ship. A city behind keeps replicating (its stamps
//! are merely old) as long as its clock is within the hour certificates are
//! backdated by; further behind, TLS refuses the parent's certificate as not
//! yet valid, with a clear error.
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
    c.adopt(id);
    child
}

/// Nothing at `id` is stamped beyond real time plus `skew_ms`.
fn assert_no_future_stamps(c: &Cluster, id: &str, skew_ms: u64) {
    let limit = tiersync::wall_ms() + skew_ms;
    for ((cat, key), item) in c.read_store(id) {
        for s in item.stamps() {
            assert!(
                s.hlc.physical_ms <= limit,
                "{id} stores {cat}/{key} stamped {s}"
            );
        }
    }
}

fn put(c: &Cluster, id: &str, key: &str, v: &str) {
    let path = format!("/v1/records/customer/{key}");
    let r = c.send("PUT", id, &path, &json!({ "v": v }));
    assert_eq!(r.status, 200, "{id} PUT {key}: {:?}", r.body);
}

/// Waits until `id` holds customer `key` with field `v` equal to `want`.
fn wait_value(c: &Cluster, id: &str, key: &str, want: &str) -> bool {
    let path = format!("/v1/records/customer/{key}");
    wait_for(Duration::from_secs(30), || {
        let r = c.get(id, &path);
        (r.status == 200 && r.body["fields"]["v"] == want).then_some(())
    })
    .is_some()
}

/// A city whose clock runs hours ahead stamps its writes no further ahead
/// than its parent allows (it measured its parent's clock at the
/// handshake), so it keeps replicating and its writes do not overrule
/// later writes elsewhere; a city behind replicates with old stamps; far
/// behind, TLS refuses the parent's certificate as not yet valid.
#[test]
fn a_city_hours_ahead_is_held_to_its_parents_clock_and_one_behind_still_replicates() {
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

    // hangzhou (2 h ahead) writes a customer first; ningbo writes it after.
    put(&c, "hangzhou", "from-ahead", "1");
    put(&c, "hangzhou", "shared-x", "hangzhou");
    put(&c, "ningbo", "from-behind", "1");
    put(&c, "ningbo", "shared-x", "ningbo");

    // Both cities replicate.
    assert!(
        wait_value(&c, "national", "from-ahead", "1"),
        "the city ahead did not replicate: {}",
        c.log("hangzhou")
    );
    assert!(
        wait_value(&c, "national", "from-behind", "1"),
        "the city behind did not replicate: {}",
        c.log("ningbo")
    );
    c.wait_uplink_error("wenzhou", c.api("wenzhou"), "not valid yet");
    // The city ahead knows and says so.
    let up = c.get("hangzhou", "/v1/status").body["links"]["parent"].clone();
    let correction = up["clock_correction_ms"].as_u64().unwrap_or(0);
    assert!(correction > 3_600_000, "{up}");
    assert!(
        c.log("hangzhou").contains("ahead of its parent's"),
        "{}",
        c.log("hangzhou")
    );
    // ningbo's write, stamped 30 min behind, loses to hangzhou's made
    // before it in real time: the cost of a clock behind.
    assert!(wait_value(&c, "national", "shared-x", "hangzhou"));

    for child in [&mut ahead, &mut behind, &mut far_behind] {
        child.stop();
    }
    c.stop_all();
    for id in ["zhejiang", "national"] {
        assert_no_future_stamps(&c, id, example_policy().limits.max_clock_skew_ms);
    }
}

/// Starts node `id` with its wall clock offset read from `clock` (a
/// libfaketime timestamp file such as "+3h"), so a test can move it while
/// the node runs, as an NTP step would (the monotonic clock is left alone).
fn start_with_clock_file(c: &mut Cluster, id: &str, clock: &std::path::Path) {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    assert!(
        std::path::Path::new(lib).exists(),
        "{lib} is missing (Debian package faketime; scripts/env.sh installs it)"
    );
    let clock = clock.to_str().unwrap().to_string();
    c.start_env(
        id,
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", &clock),
            ("FAKETIME_CACHE_DURATION", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
}

fn set_clock(clock: &std::path::Path, offset: &str) {
    std::fs::write(clock, format!("{offset}\n")).unwrap();
    // libfaketime re-reads the file once a second.
    std::thread::sleep(Duration::from_millis(2_500));
}

/// The physical part of the stamp of customer `key`'s newest value at `id`.
fn stamped_ms(c: &Cluster, id: &str, key: &str) -> u64 {
    let body = c.get(id, &format!("/v1/records/customer/{key}")).body;
    let hlc = body["meta"]["updated"]["hlc"].as_str().unwrap_or("");
    hlc.split('.')
        .next()
        .unwrap_or("")
        .parse()
        .unwrap_or_else(|_| panic!("{body}"))
}

/// A city's clock jumps three hours ahead while it runs, and later while
/// it is restarted with its parent down, then comes back: the province keeps
/// taking the city's writes (none is refused as too far ahead), none of
/// them overrules a later write of another city, and nothing above the city
/// is stamped in the future. The policy allows 4 s of skew here, so "later"
/// needs seconds, not minutes.
#[test]
fn a_clock_that_jumps_ahead_and_back_keeps_the_subtree_replicating() {
    const SKEW_MS: u64 = 4_000;
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 2,
        ..Spec::default()
    });
    let policy = c.dir.path().join("policy.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let changed = text.replace(
        "max_clock_skew_ms = 300000",
        &format!("max_clock_skew_ms = {SKEW_MS}"),
    );
    assert_ne!(text, changed, "the shipped policy's skew line moved");
    std::fs::write(&policy, changed).unwrap();
    let clock = c.dir.path().join("hangzhou.clock");
    std::fs::write(&clock, "+0\n").unwrap();
    c.start("national");
    c.start("zhejiang");
    c.start("ningbo");
    start_with_clock_file(&mut c, "hangzhou", &clock);
    put(&c, "hangzhou", "before", "1");
    assert!(wait_value(&c, "national", "before", "1"));

    // 1. The clock jumps ahead while the city is connected: it stamps no
    //    further ahead than its parent's clock allows.
    set_clock(&clock, "+3h");
    put(&c, "hangzhou", "live", "hangzhou");
    std::thread::sleep(Duration::from_millis(SKEW_MS));
    put(&c, "ningbo", "live", "ningbo");
    put(&c, "hangzhou", "live-marker", "1");
    assert!(
        wait_value(&c, "national", "live-marker", "1"),
        "the city stopped replicating after its clock jumped: {}",
        c.log("hangzhou")
    );
    assert!(
        stamped_ms(&c, "national", "live-marker") <= tiersync::wall_ms() + SKEW_MS,
        "stamped ahead"
    );
    assert!(
        wait_value(&c, "national", "live", "ningbo"),
        "a write of the city whose clock jumped overruled a later one"
    );

    // 2. The city restarts 3 h ahead while its parent is down (so it
    //    cannot measure it), writes, restarts with its clock back, writes
    //    again; then the parent comes back.
    c.stop("zhejiang");
    c.stop("hangzhou");
    start_with_clock_file(&mut c, "hangzhou", &clock);
    put(&c, "hangzhou", "offline-ahead", "hangzhou");
    assert!(stamped_ms(&c, "hangzhou", "offline-ahead") > tiersync::wall_ms() + 3_000_000);
    c.stop("hangzhou");
    std::fs::write(&clock, "+0\n").unwrap();
    start_with_clock_file(&mut c, "hangzhou", &clock);
    put(&c, "hangzhou", "after-back", "1");
    c.start("zhejiang");
    assert!(
        wait_value(&c, "national", "offline-ahead", "hangzhou"),
        "the writes stamped ahead were not re-stamped: {}",
        c.log("hangzhou")
    );
    assert!(wait_value(&c, "national", "after-back", "1"));
    assert!(
        c.log("hangzhou").contains("re-stamped"),
        "{}",
        c.log("hangzhou")
    );
    assert!(stamped_ms(&c, "hangzhou", "offline-ahead") <= tiersync::wall_ms() + SKEW_MS);
    // A later write of another city wins over the re-stamped one.
    std::thread::sleep(Duration::from_millis(SKEW_MS));
    put(&c, "ningbo", "offline-ahead", "ningbo");
    assert!(wait_value(&c, "national", "offline-ahead", "ningbo"));
    c.stop_all();
    for id in ["zhejiang", "national"] {
        assert_no_future_stamps(&c, id, SKEW_MS);
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
