//! Network faults on real links: city → province → national as real
//! processes, with a userspace UDP fault proxy (`harness/proxy.rs`) on the
//! city → province link (and, for the lossy test, on province → national
//! too).
//!
//! * partition/heal cycles: a backlog is written at the city while the link
//!   is cut (the province must not see it), then the link heals and the time
//!   until national holds everything is measured;
//! * one-way partitions, each way: the side that hears nothing times the
//!   link out, nothing is acknowledged, and the link recovers after heal;
//! * a lossy, duplicating, reordering, delayed link still converges.
//!
//! Every test ends by stopping the nodes and comparing stores: each tier
//! holds exactly the CRDT merge of its subtree.
//!
//! `TIERSYNC_PARTITION_CYCLES` (default 3) and `TIERSYNC_PARTITION_BACKLOG`
//! (items written per partition, default 2000) size the cycle test;
//! `TIERSYNC_SEED` seeds the proxies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::time::Duration;

use tiersync::deploygen::Spec;
use tiersync_tests::cluster::Cluster;
use tiersync_tests::proxy::{Dir, FaultProxy};
use tiersync_tests::{env_count, env_seed, p50_p99_ms, wait_for};

/// Longest wait for national to hold everything after a heal.
const HEAL: Duration = Duration::from_secs(120);

/// national ← zhejiang ← hangzhou, with a proxy on hangzhou → zhejiang.
fn chain(seed: u64) -> (Cluster, FaultProxy) {
    let c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    });
    let proxy = FaultProxy::start(c.peer_addr("zhejiang"), seed);
    c.set_parent_addr("hangzhou", proxy.addr);
    (c, proxy)
}

fn exists(c: &Cluster, id: &str, key: &str) -> bool {
    version_at(c, id, key).is_some()
}

/// The `version` field of customer `key` at node `id`, if it has the record.
fn version_at(c: &Cluster, id: &str, key: &str) -> Option<u64> {
    let r = c.get_opt(id, &format!("/v1/records/customer/{key}"))?;
    (r.status == 200).then(|| r.body["fields"]["version"].as_u64().unwrap_or(0))
}

#[test]
fn backlog_written_during_a_partition_arrives_after_heal() {
    let cycles = env_count("TIERSYNC_PARTITION_CYCLES", 3);
    let backlog = env_count("TIERSYNC_PARTITION_BACKLOG", 2000);
    let seed = env_seed(0x9a27_17f0);
    let (mut c, proxy) = chain(seed);
    c.start_all();
    c.bulk_customers("hangzhou", "warm-", 0, 10);
    assert!(
        c.wait_complete_at("national", HEAL).is_some(),
        "no convergence before the first partition"
    );
    let mut heal_times = Vec::new();
    // Every cycle writes the same keys with the cycle as their version: the
    // first cycle's backlog creates the records, each later one updates all
    // of them. The stores stay the backlog's size however many cycles run,
    // so the soak measures healing, not a store growing to 10 M items.
    let last = format!("b-{}", backlog - 1);
    for cycle in 0..cycles {
        proxy.faults.partition();
        let version = cycle + 1;
        c.bulk_customer_versions("hangzhou", "b-", 0, backlog, version);
        assert_eq!(version_at(&c, "hangzhou", &last), Some(version as u64));
        assert!(
            version_at(&c, "zhejiang", &last) < Some(version as u64),
            "cycle {cycle}: the province got data through a partition"
        );
        proxy.faults.heal();
        let took = c.wait_complete_at("national", HEAL).unwrap_or_else(|| {
            panic!(
                "cycle {cycle}: national incomplete {HEAL:?} after heal; city log: {}",
                c.log("hangzhou")
            )
        });
        assert_eq!(
            version_at(&c, "national", &last),
            Some(version as u64),
            "cycle {cycle}: {last} at national"
        );
        heal_times.push(took);
    }
    let (p50, p99) = p50_p99_ms(&heal_times);
    let max = heal_times.iter().max().copied().unwrap_or_default();
    // Figures first: comparing the stores of a soak run takes a while.
    eprintln!(
        "partition: {cycles} cycles, backlog {backlog}, heal->identical p50 {p50} ms p99 {p99} ms max {} ms, seed {seed}",
        max.as_millis()
    );
    c.assert_tiers_hold_merge_of_subtree();
    eprintln!("partition: stores compared, each tier holds the merge of its subtree");
}

#[test]
fn one_way_partitions_recover() {
    let seed = env_seed(0x0e_a7a1);
    let (mut c, proxy) = chain(seed);
    c.start_all();
    c.bulk_customers("hangzhou", "warm-", 0, 10);
    assert!(c.wait_complete_at("national", HEAL).is_some());

    // Child → parent cut: nothing arrives; the parent times the silent
    // child out (the QUIC idle timeout) and the link is rebuilt after heal.
    proxy.faults.set_blocked(Dir::Up, true);
    c.bulk_customers("hangzhou", "up-", 0, 500);
    let gone = wait_for(Duration::from_secs(60), || {
        let s = c.get("zhejiang", "/v1/status").body;
        (s["links"]["children"]["hangzhou"]["connected"] == false).then_some(())
    });
    assert!(
        gone.is_some(),
        "the province never noticed the silent child"
    );
    assert!(!exists(&c, "zhejiang", "up-499"));
    proxy.faults.set_blocked(Dir::Up, false);
    let up_heal = c
        .wait_complete_at("national", HEAL)
        .expect("national complete after the up-link heals");

    // Parent → child cut: the child hears nothing back (no acknowledgement,
    // and no QUIC ACKs, so its congestion window closes too); it times the
    // parent out and cannot reconnect until the link heals.
    proxy.faults.set_blocked(Dir::Down, true);
    c.bulk_customers("hangzhou", "down-", 0, 500);
    let noticed = wait_for(Duration::from_secs(60), || {
        let s = c.get("hangzhou", "/v1/status").body;
        (s["links"]["parent"]["state"] != "streaming").then_some(())
    });
    assert!(
        noticed.is_some(),
        "the child never noticed the silent parent"
    );
    let lag = c.get("hangzhou", "/v1/status").body["links"]["parent"]["lag_records"]
        .as_u64()
        .unwrap_or(0);
    assert!(lag > 0, "the child saw acknowledgements through a cut link");
    proxy.faults.set_blocked(Dir::Down, false);
    let down_heal = c
        .wait_complete_at("national", HEAL)
        .expect("national complete after the down-link heals");
    c.assert_tiers_hold_merge_of_subtree();
    eprintln!(
        "partition one-way: up cut (parent timed the child out) heal->identical {} ms; down cut (child timed the parent out) heal->identical {} ms",
        up_heal.as_millis(),
        down_heal.as_millis()
    );
}

#[test]
fn a_lossy_duplicating_reordering_link_converges() {
    let backlog = env_count("TIERSYNC_PARTITION_BACKLOG", 2000);
    let seed = env_seed(0x10_55e5);
    let (mut c, city_link) = chain(seed);
    let province_link = FaultProxy::start(c.peer_addr("national"), seed.wrapping_add(1));
    c.set_parent_addr("zhejiang", province_link.addr);
    for link in [&city_link, &province_link] {
        link.faults.set_loss(10);
        link.faults.set_duplication(10);
        link.faults.set_reordering(20);
        link.faults.set_delay(Duration::from_millis(2));
    }
    c.start_all();
    c.bulk_customers("hangzhou", "lossy-", 0, backlog);
    let took = c.wait_complete_at("national", HEAL).unwrap_or_else(|| {
        panic!(
            "no convergence over a lossy link; city log: {}",
            c.log("hangzhou")
        )
    });
    let dropped: u64 = [&city_link, &province_link]
        .iter()
        .map(|l| l.faults.dropped.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(dropped > 0, "the proxies dropped nothing: not in the path?");
    c.assert_tiers_hold_merge_of_subtree();
    eprintln!(
        "partition lossy: backlog {backlog} over 2 links with 10% loss, 10% duplication, 20% reordering, 2 ms delay: identical after {} ms ({dropped} datagrams dropped)",
        took.as_millis()
    );
}
