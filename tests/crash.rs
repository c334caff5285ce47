//! Crash test: a writer process acknowledges writes (durability `fsync`) and
//! is killed with SIGKILL at random moments, many times. After each kill the
//! store is reopened and checked:
//!
//! * every acknowledged write is present with the content acknowledged;
//! * the changelog holds exactly one entry per mutation: sequence numbers are
//!   contiguous from 1, every entry names a distinct item (each mutation of
//!   the writer targets a fresh key), the entry count equals the item count,
//!   and each acknowledged sequence number names its own key;
//! * the HLC is at or above every stamp stored, and acknowledged stamps
//!   increase with the sequence number across restarts.
//!
//! `TIERSYNC_CRASH_CYCLES` sets the number of kills (default 25).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tiersync::config::Durability;
use tiersync::store::Store;
use tiersync_protocol::{Hlc, Item, NodeId, Value};
use tiersync_tests::{env_count, example_policy, workspace_bin};

#[derive(Debug, Clone)]
struct Ack {
    seq: u64,
    hlc: Hlc,
    op: String,
    category: String,
    key: String,
    value: i64,
}

fn parse(line: &str) -> Option<Ack> {
    let f: Vec<&str> = line.split(' ').collect();
    let [tag, seq, ms, logical, op, category, key, value] = f.as_slice() else {
        return None;
    };
    if *tag != "ack" {
        return None;
    }
    Some(Ack {
        seq: seq.parse().ok()?,
        hlc: Hlc {
            physical_ms: ms.parse().ok()?,
            logical: logical.parse().ok()?,
        },
        op: op.to_string(),
        category: category.to_string(),
        key: key.to_string(),
        value: value.parse().ok()?,
    })
}

/// Runs the writer until it has acknowledged `target` writes, kills it with
/// SIGKILL, and returns every acknowledgement it printed before dying.
fn run_and_kill(dir: &Path, run: usize, target: usize, extra: Duration) -> Vec<Ack> {
    let mut child = Command::new(workspace_bin("crash-writer"))
        .arg(dir)
        .arg(run.to_string())
        .arg("4")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start crash-writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acks = Vec::new();
    while acks.len() < target {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => acks.extend(parse(&line)),
            Err(_) => panic!("crash-writer produced no acknowledgement for 30 s (run {run})"),
        }
    }
    std::thread::sleep(extra);
    child.kill().expect("SIGKILL crash-writer");
    child.wait().expect("reap crash-writer");
    reader.join().expect("reader thread");
    // Whole lines printed before the kill were acknowledged too.
    acks.extend(rx.try_iter().filter_map(|l| parse(&l)));
    acks
}

fn expected(ack: &Ack) -> BTreeMap<String, Value> {
    let v = Value::Int(ack.value);
    match ack.op.as_str() {
        "put" => [("v".to_string(), v)].into(),
        "patch" => [("p".to_string(), v)].into(),
        _ => {
            let task = ack
                .key
                .split('-')
                .nth(1)
                .unwrap_or_default()
                .trim_start_matches('t');
            [
                ("amount".to_string(), v),
                ("customer_id".to_string(), Value::Str(format!("c{task}"))),
            ]
            .into()
        }
    }
}

fn verify(dir: &Path, acked: &[Ack], cycle: usize) {
    let store = Store::open(
        dir,
        NodeId::new("crash-city").unwrap(),
        example_policy(),
        Durability::Fsync,
    )
    .unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e}"));
    for ack in acked {
        let doc = match store.get(&ack.category, &ack.key).unwrap() {
            Some(Item::Record(r)) => r
                .document()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            Some(Item::Log(l)) => l.fields,
            Some(Item::Counters(_)) => {
                panic!("cycle {cycle}: {}/{} holds counters", ack.category, ack.key)
            }
            None => panic!(
                "cycle {cycle}: acknowledged {} {}/{} (seq {}) is lost",
                ack.op, ack.category, ack.key, ack.seq
            ),
        };
        assert_eq!(
            doc,
            expected(ack),
            "cycle {cycle}: content of {}/{}",
            ack.category,
            ack.key
        );
    }

    let log = store.changes_after(0, usize::MAX).unwrap();
    let last = store.last_seq().unwrap();
    assert_eq!(
        log.len() as u64,
        last,
        "cycle {cycle}: changelog length vs last sequence"
    );
    for (i, (seq, _)) in log.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "cycle {cycle}: changelog has a gap");
    }
    let keys: BTreeSet<(&str, &str)> = log.iter().filter_map(|(_, e)| e.item()).collect();
    assert_eq!(
        keys.len(),
        log.len(),
        "cycle {cycle}: a mutation has more than one changelog entry"
    );
    let mut items = 0usize;
    let mut max_stamp = Hlc::ZERO;
    store
        .for_each_item(|_, _, item| {
            items += 1;
            for s in item.stamps() {
                max_stamp = max_stamp.max(s.hlc);
            }
        })
        .unwrap();
    assert_eq!(
        items,
        log.len(),
        "cycle {cycle}: items without a changelog entry, or entries without an item"
    );
    for ack in acked {
        let (_, entry) = &log[(ack.seq - 1) as usize];
        assert_eq!(
            entry.item(),
            Some((ack.category.as_str(), ack.key.as_str()))
        );
    }
    let clock = store.clock_last().unwrap();
    assert!(
        clock >= max_stamp,
        "cycle {cycle}: HLC {clock} is below a stored stamp {max_stamp}"
    );
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let cycles = env_count("TIERSYNC_CRASH_CYCLES", 25);
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = std::env::var("TIERSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7153_7e5d);
    eprintln!("crash test: {cycles} cycles, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acked: Vec<Ack> = Vec::new();
    for cycle in 0..cycles {
        let target = rng.random_range(1..200);
        let extra = Duration::from_millis(rng.random_range(0..15));
        acked.extend(run_and_kill(dir.path(), cycle, target, extra));
        verify(dir.path(), &acked, cycle);
    }
    // Acknowledged stamps rise with the sequence number, across restarts.
    acked.sort_by_key(|a| a.seq);
    for pair in acked.windows(2) {
        assert!(
            pair[0].seq < pair[1].seq,
            "sequence {} acknowledged twice",
            pair[0].seq
        );
        assert!(
            pair[0].hlc < pair[1].hlc,
            "HLC went backwards between seq {} and {}",
            pair[0].seq,
            pair[1].seq
        );
    }
    eprintln!(
        "crash test: {} acknowledged writes over {cycles} kills, none lost",
        acked.len()
    );
}
