//! Power-loss tests: a node's data directory lives on powerfs
//! (`tests/bin/powerfs.rs`), a FUSE file system that drops every byte and
//! every name not fsynced when its power is cut. Unlike a SIGKILL, which
//! leaves the OS page cache intact, these tests fail if an fsync is missing.
//!
//! * `powerfs_keeps_exactly_what_was_synced`: the file system itself, with
//!   plain file operations: synced data and names survive a cut, unsynced
//!   appends, overwrites, truncates, creates, renames and unlinks do not.
//! * `ingest`: an `AckedWriter` streams writes to the city (national ←
//!   zhejiang ← hangzhou) whose data directory is on powerfs; at seeded
//!   random moments the city's power is cut (SIGKILL + cut), the file
//!   system remounted and the city restarted. With `durability = "fsync"`
//!   no acknowledged write may be lost: the last one before each cut is
//!   read back after the restart, and at the end every one is at the city
//!   and at national, whose tiers hold the merge of their subtrees.
//! * `control`: the same with the city at `durability = "buffered"` must
//!   lose acknowledged writes, which shows the harness sees what a missing
//!   fsync loses.
//! * `replication`: the province's data directory is on powerfs and its
//!   power is cut while the city replicates through it; afterwards every
//!   acknowledged write is at national.
//!
//! `TIERSYNC_POWER_CUTS` sets the number of cuts per test (default 10),
//! `TIERSYNC_SEED` the moments. Each test prints one summary line. Needs
//! root, `/dev/fuse` and `fusermount3`; without them each test prints
//! `SKIPPED: …` and passes without running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::{AckedWriter, Cluster, Items, assert_acked_present};
use tiersync_tests::powerfs::{self, CutReport, PowerFs};
use tiersync_tests::{env_count, env_seed};

const WAIT: Duration = Duration::from_secs(120);
const CITY: &str = "hangzhou";
const PROVINCE: &str = "zhejiang";

/// Whether powerfs can run here; prints why not.
fn powerfs_available(test: &str) -> bool {
    match powerfs::unavailable() {
        Some(why) => {
            eprintln!("{test}: SKIPPED: {why}");
            false
        }
        None => true,
    }
}

/// national ← zhejiang ← hangzhou, the data directories of `on` on
/// powerfs, not started.
fn chain_with_powerfs(on: &[&str]) -> Cluster {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    });
    for id in on {
        c.put_on_powerfs(id);
    }
    c
}

/// What the cut loop saw.
#[derive(Default)]
struct Cuts {
    dropped: CutReport,
    /// Last acknowledged writes before a cut of the writer's node that were
    /// gone after it.
    last_lost: Vec<String>,
}

/// Cuts the power of `victims` (together: all are cut, then all restarted,
/// in that order) `cuts` times while `writer` streams to the city, each time
/// after a random number of new acknowledgements. After a cut of the city
/// the last write acknowledged before it is looked up; with `strict` a
/// missing one fails at once.
fn cut_loop(
    c: &mut Cluster,
    writer: &AckedWriter,
    victims: &[&str],
    cuts: usize,
    rng: &mut StdRng,
    strict: bool,
) -> Cuts {
    let mut seen = Cuts::default();
    for cut in 1..=cuts {
        let since = writer.acked();
        let n = rng.random_range(1..60);
        assert!(
            writer.wait_acked(since, n, WAIT),
            "cut {cut}: the writer stalled; city log: {}",
            c.log(CITY)
        );
        let last = writer.last_acked();
        for victim in victims {
            seen.dropped.add(c.power_cut(victim));
        }
        for victim in victims {
            c.start(victim);
        }
        let Some((key, value)) = last.filter(|_| victims.contains(&CITY)) else {
            continue;
        };
        let r = c.get(CITY, &format!("/v1/records/customer/{key}"));
        let present = r.status == 200 && r.body["fields"]["n"] == value;
        if !present {
            assert!(
                !strict,
                "cut {cut}: customer/{key}, acknowledged before the power cut, is gone \
                 after it ({} {:?}); city log: {}",
                r.status,
                r.body,
                c.log(CITY)
            );
            seen.last_lost.push(key);
        }
    }
    seen
}

/// Acknowledged writes missing (or with other content) in `items`.
fn lost(items: &Items, acked: &[(String, i64)]) -> usize {
    acked
        .iter()
        .filter(|(key, n)| {
            let k = ("customer".to_string(), key.clone());
            !matches!(items.get(&k), Some(tiersync_protocol::Item::Record(r))
                if r.document().get("n").copied() == Some(&tiersync_protocol::Value::Int(*n)))
        })
        .count()
}

fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

fn create(path: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f
}

fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[test]
fn powerfs_keeps_exactly_what_was_synced() {
    if !powerfs_available("powerfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut fs = PowerFs::mount(
        &dir.path().join("disk"),
        &dir.path().join("mnt"),
        &dir.path().join("powerfs.log"),
    );
    let m = fs.path().to_path_buf();

    // Durable: data and name synced.
    let f = create(&m.join("synced"), b"0123456789");
    f.sync_all().unwrap();
    let f2 = create(&m.join("replaced"), b"old");
    f2.sync_all().unwrap();
    let f3 = create(&m.join("unlinked"), b"still here");
    f3.sync_all().unwrap();
    let f4 = create(&m.join("renamed"), b"moved?");
    f4.sync_all().unwrap();
    fsync_dir(&m);
    drop((f2, f3, f4));

    // Not durable: unsynced data, and names whose directory was not synced
    // (even though the file itself was).
    f.write_all_at(b"AB", 2).unwrap(); // overwrite
    f.write_all_at(b"-tail", 10).unwrap(); // append
    let g = create(&m.join("new-synced-file"), b"data");
    g.sync_all().unwrap();
    create(&m.join("new-unsynced"), b"x");
    std::fs::create_dir(m.join("newdir")).unwrap();
    std::fs::rename(m.join("renamed"), m.join("renamed-to")).unwrap();
    std::fs::write(m.join("tmp"), b"new").unwrap();
    std::fs::rename(m.join("tmp"), m.join("replaced")).unwrap();
    std::fs::remove_file(m.join("unlinked")).unwrap();

    // Reads see everything, synced or not.
    assert_eq!(read(&m.join("synced")).unwrap(), b"01AB456789-tail");
    assert_eq!(read(&m.join("replaced")).unwrap(), b"new");
    assert!(read(&m.join("unlinked")).is_none());
    assert!(
        std::fs::read_dir(&m)
            .unwrap()
            .flatten()
            .all(|e| e.file_name() != ".powerfs-trash")
    );
    drop((f, g));

    let report = fs.cut_and_remount();
    let m = fs.path().to_path_buf();
    assert_eq!(read(&m.join("synced")).unwrap(), b"0123456789", "data");
    assert!(
        read(&m.join("new-synced-file")).is_none(),
        "unsynced create"
    );
    assert!(read(&m.join("new-unsynced")).is_none());
    assert!(!m.join("newdir").exists(), "unsynced mkdir");
    assert_eq!(
        read(&m.join("renamed")).unwrap(),
        b"moved?",
        "unsynced rename"
    );
    assert!(read(&m.join("renamed-to")).is_none());
    assert_eq!(
        read(&m.join("replaced")).unwrap(),
        b"old",
        "unsynced replace"
    );
    assert_eq!(
        read(&m.join("unlinked")).unwrap(),
        b"still here",
        "unsynced unlink"
    );
    assert!(read(&m.join("tmp")).is_none());

    // Synced truncate and rename survive; an unsynced truncate does not.
    let f = OpenOptions::new()
        .write(true)
        .open(m.join("synced"))
        .unwrap();
    f.set_len(4).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(m.join("renamed"), m.join("renamed-to")).unwrap();
    fsync_dir(&m);
    f.set_len(1).unwrap();
    drop(f);
    let second = fs.cut_and_remount();
    let m = fs.path().to_path_buf();
    assert_eq!(read(&m.join("synced")).unwrap(), b"0123");
    assert_eq!(read(&m.join("renamed-to")).unwrap(), b"moved?");
    assert!(read(&m.join("renamed")).is_none());

    // A clean unmount keeps what was not synced.
    std::fs::write(m.join("kept"), b"clean").unwrap();
    fs.unmount();
    assert_eq!(read(&dir.path().join("disk/kept")).unwrap(), b"clean");
    eprintln!(
        "powerfs: first cut dropped {} bytes in {} files and {} name operations; \
         second cut {} bytes in {} files, {} name operations",
        report.bytes, report.files, report.names, second.bytes, second.files, second.names
    );
}

#[test]
fn ingest_loses_no_acknowledged_write_at_power_cuts_of_the_city() {
    if !powerfs_available("powerloss ingest") {
        return;
    }
    let cuts = env_count("TIERSYNC_POWER_CUTS", 10);
    let seed = env_seed(0x90_3e12);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = chain_with_powerfs(&[CITY]);
    c.start_all();
    let writer = AckedWriter::start(c.api(CITY), &c.token(CITY), "p");
    let seen = cut_loop(&mut c, &writer, &[CITY], cuts, &mut rng, true);
    let (acked, _) = writer.finish();
    assert!(
        c.wait_complete_at("national", WAIT).is_some(),
        "national never caught up; city log: {}",
        c.log(CITY)
    );
    let stores = c.assert_tiers_hold_merge_of_subtree();
    let (lost_city, lost_national) = (
        lost(&stores[CITY], &acked),
        lost(&stores["national"], &acked),
    );
    for id in [CITY, "national"] {
        assert_acked_present(&stores[id], &acked, id);
    }
    eprintln!(
        "powerloss ingest: {cuts} power cuts of the city (durability fsync), {} acknowledged \
         writes, {lost_city} lost at the city, {lost_national} at national; the cuts dropped \
         {} unsynced bytes in {} files and {} name operations; seed {seed}",
        acked.len(),
        seen.dropped.bytes,
        seen.dropped.files,
        seen.dropped.names
    );
}

#[test]
fn control_buffered_durability_loses_acknowledged_writes_at_power_cuts() {
    if !powerfs_available("powerloss control") {
        return;
    }
    let cuts = env_count("TIERSYNC_POWER_CUTS", 10);
    let seed = env_seed(0xc0_9e12);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = chain_with_powerfs(&[CITY]);
    c.set_durability(CITY, "buffered");
    c.start_all();
    let writer = AckedWriter::start(c.api(CITY), &c.token(CITY), "b");
    let seen = cut_loop(&mut c, &writer, &[CITY], cuts, &mut rng, false);
    let (acked, _) = writer.finish();
    c.stop(CITY);
    let lost_city = lost(&c.read_store(CITY), &acked);
    eprintln!(
        "powerloss control: {cuts} power cuts of the city (durability buffered), {} \
         acknowledged writes, {lost_city} lost at the city (the last one before the cut lost \
         at {} of {cuts} cuts); the cuts dropped {} unsynced bytes in {} files and {} name \
         operations; seed {seed}",
        acked.len(),
        seen.last_lost.len(),
        seen.dropped.bytes,
        seen.dropped.files,
        seen.dropped.names
    );
    assert!(
        lost_city > 0,
        "no acknowledged write was lost with durability = buffered: the power cuts did not \
         drop unsynced data"
    );
}

#[test]
fn replication_loses_no_acknowledged_write_at_power_cuts_of_the_province() {
    if !powerfs_available("powerloss replication") {
        return;
    }
    let cuts = env_count("TIERSYNC_POWER_CUTS", 10);
    let seed = env_seed(0x9e_91ca);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = chain_with_powerfs(&[PROVINCE]);
    c.start_all();
    let writer = AckedWriter::start(c.api(CITY), &c.token(CITY), "r");
    let seen = cut_loop(&mut c, &writer, &[PROVINCE], cuts, &mut rng, true);
    let (acked, _) = writer.finish();
    assert!(
        c.wait_complete_at("national", WAIT).is_some(),
        "national never caught up; province log: {}",
        c.log(PROVINCE)
    );
    let stores = c.assert_tiers_hold_merge_of_subtree();
    let lost_national = lost(&stores["national"], &acked);
    for id in [CITY, PROVINCE, "national"] {
        assert_acked_present(&stores[id], &acked, id);
    }
    eprintln!(
        "powerloss replication: {cuts} power cuts of the province while the city replicates, \
         {} acknowledged writes at the city, {lost_national} lost at national; the cuts dropped \
         {} unsynced bytes in {} files and {} name operations; seed {seed}",
        acked.len(),
        seen.dropped.bytes,
        seen.dropped.files,
        seen.dropped.names
    );
}

/// A power cut of a whole site: the province and its city lose power
/// together (both data directories on powerfs), again and again while the
/// city ingests and replicates. No acknowledged write is lost anywhere, and
/// every tier ends with the merge of its subtree.
#[test]
fn no_acknowledged_write_is_lost_when_city_and_province_lose_power_together() {
    if !powerfs_available("powerloss city+province") {
        return;
    }
    let cuts = env_count("TIERSYNC_POWER_CUTS", 10);
    let seed = env_seed(0x51_7e5);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = chain_with_powerfs(&[PROVINCE, CITY]);
    c.start_all();
    let writer = AckedWriter::start(c.api(CITY), &c.token(CITY), "s");
    let seen = cut_loop(&mut c, &writer, &[PROVINCE, CITY], cuts, &mut rng, true);
    let (acked, _) = writer.finish();
    assert!(
        c.wait_complete_at("national", WAIT).is_some(),
        "national never caught up; province log: {}",
        c.log(PROVINCE)
    );
    let stores = c.assert_tiers_hold_merge_of_subtree();
    for id in [CITY, PROVINCE, "national"] {
        assert_acked_present(&stores[id], &acked, id);
    }
    eprintln!(
        "powerloss city+province: {cuts} power cuts of both, {} acknowledged writes, {} lost \
         at national; the cuts dropped {} unsynced bytes in {} files and {} name operations; \
         seed {seed}",
        acked.len(),
        lost(&stores["national"], &acked),
        seen.dropped.bytes,
        seen.dropped.files,
        seen.dropped.names
    );
}
