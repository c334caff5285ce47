//! Crashes of real node processes while a writer streams acknowledged
//! writes at a city (national ← zhejiang ← hangzhou):
//!
//! * the province (parent) and the city (child) are SIGKILLed at random
//!   moments, alone or together, and restarted; the time from spawning a
//!   node to its API answering is measured;
//! * named fail points crash a node at the worst places (see
//!   `node/src/failpoints.rs`): after the WAL append before the sync, after
//!   the sync before the acknowledgement, halfway through sending a frame,
//!   and between validating and committing a merge at the parent.
//!
//! Afterwards every write the writer saw acknowledged is at the city and at
//! national with the content written, and each tier holds exactly the CRDT
//! merge of its subtree.
//!
//! `TIERSYNC_KILLS` sets how many SIGKILLs at least (default 8; each cycle
//! kills the city, the province or both); `TIERSYNC_SEED` seeds the choices.
//! `TIERSYNC_FAILPOINT_ROUNDS` (default 1) repeats the four fail points.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::{AckedWriter, Cluster, assert_acked_present};
use tiersync_tests::{env_count, env_seed, p50_p99_ms};

const WAIT: Duration = Duration::from_secs(120);
/// SIGABRT: how a fail point ends the process.
const SIGABRT: i32 = 6;

fn chain() -> Cluster {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    });
    c.start_all();
    c
}

/// Stops the writer, waits for national to hold everything, compares the
/// stores and checks every acknowledged write is at the city and national.
fn finish_and_verify(mut c: Cluster, writer: AckedWriter) -> usize {
    let (acked, _) = writer.finish();
    assert!(
        c.wait_complete_at("national", WAIT).is_some(),
        "national never caught up; city log: {}",
        c.log("hangzhou")
    );
    let stores = c.assert_tiers_hold_merge_of_subtree();
    for id in ["hangzhou", "national"] {
        assert_acked_present(&stores[id], &acked, id);
    }
    acked.len()
}

#[test]
fn sigkill_parent_and_child_while_a_writer_streams() {
    let target = env_count("TIERSYNC_KILLS", 8);
    let seed = env_seed(0x5e_7c11);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = chain();
    let writer = AckedWriter::start(c.api("hangzhou"), &c.token("hangzhou"), "w");
    let mut restarts = Vec::new();
    let (mut parent_kills, mut child_kills) = (0usize, 0usize);
    let mut cycle = 0;
    while parent_kills + child_kills < target {
        cycle += 1;
        let since = writer.acked();
        let n = rng.random_range(1..60);
        assert!(
            writer.wait_acked(since, n, WAIT),
            "cycle {cycle}: the writer stalled; city log: {}",
            c.log("hangzhou")
        );
        let victims: &[&str] = match rng.random_range(0..3) {
            0 => &["hangzhou"],
            1 => &["zhejiang"],
            _ => &["zhejiang", "hangzhou"],
        };
        for v in victims {
            c.kill(v);
            if *v == "zhejiang" {
                parent_kills += 1;
            } else {
                child_kills += 1;
            }
        }
        // Parents first, as a restarted deployment would come up.
        for v in victims {
            restarts.push(c.start_timed(v));
        }
    }
    let acked = finish_and_verify(c, writer);
    let (p50, p99) = p50_p99_ms(&restarts);
    let max = restarts.iter().max().copied().unwrap_or_default();
    eprintln!(
        "kill: {} SIGKILLs ({parent_kills} parent, {child_kills} child) in {cycle} cycles, \
         {acked} acknowledged writes, none lost; restart->serving p50 {p50} ms p99 {p99} ms max {} ms \
         (target < 5000 ms: {}), seed {seed}",
        parent_kills + child_kills,
        max.as_millis(),
        if max < Duration::from_secs(5) {
            "met"
        } else {
            "NOT met"
        }
    );
}

#[test]
fn fail_points_crash_nodes_without_losing_acknowledged_writes() {
    // (fail point, node it crashes, actions)
    let cases = [
        ("store-after-append", "hangzhou", "20*off->return"),
        ("store-after-sync", "hangzhou", "20*off->return"),
        ("link-mid-frame", "hangzhou", "3*off->return"),
        ("store-mid-merge", "zhejiang", "3*off->return"),
    ];
    let rounds = env_count("TIERSYNC_FAILPOINT_ROUNDS", 1);
    let mut c = chain();
    let writer = AckedWriter::start(c.api("hangzhou"), &c.token("hangzhou"), "f");
    let mut restarts = Vec::new();
    for (point, victim, actions) in (0..rounds).flat_map(|_| cases) {
        c.kill(victim);
        let spec = format!("{point}={actions}");
        c.start_env(victim, &[("FAILPOINTS", spec.as_str())]);
        // From one acknowledgement after the start on, the writer's next
        // failure is the write in flight at the crash.
        assert!(
            writer.wait_acked(writer.acked(), 1, WAIT),
            "{point}: no write"
        );
        let failed_before = writer.failed_keys().len();
        let status = c
            .wait_exit(victim, WAIT)
            .unwrap_or_else(|| panic!("{point}: {victim} never reached the fail point"));
        assert_eq!(
            status.signal(),
            Some(SIGABRT),
            "{point}: {victim} ended with {status}, not by the fail point"
        );
        assert!(
            c.log(victim)
                .contains(&format!("fail point {point}: crashing")),
            "{point}: {victim}'s log does not show the fail point"
        );
        if point == "link-mid-frame" {
            // The parent read half a frame, dropped that link and carries on.
            assert_eq!(
                c.get_opt("zhejiang", "/v1/status").map(|r| r.status),
                Some(200),
                "the province did not survive half a frame"
            );
        }
        restarts.push(c.start_timed(victim));
        if point == "store-after-sync" {
            // The write in flight at the crash was synced: it survives,
            // though its client never saw the acknowledgement.
            let inflight = writer.failed_keys().get(failed_before).cloned();
            if let Some(key) = inflight {
                assert_eq!(
                    c.get("hangzhou", &format!("/v1/records/customer/{key}"))
                        .status,
                    200,
                    "{key} was synced before the crash but is gone"
                );
            }
        }
        let since = writer.acked();
        assert!(
            writer.wait_acked(since, 10, WAIT),
            "{point}: writes did not resume after the restart"
        );
    }
    let acked = finish_and_verify(c, writer);
    let (p50, p99) = p50_p99_ms(&restarts);
    let max = restarts.iter().max().copied().unwrap_or_default();
    eprintln!(
        "failpoints: {} crashes at fail points ({rounds} rounds of store-after-append, \
         store-after-sync, link-mid-frame, store-mid-merge), {acked} acknowledged writes, \
         none lost; restart->serving p50 {p50} ms p99 {p99} ms max {} ms",
        restarts.len(),
        max.as_millis()
    );
}
