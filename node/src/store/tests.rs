//! Store conformance: semantics of each operation, the changelog, the HLC
//! across reopen, and a model check against a `BTreeMap` with reboots.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use tiersync_protocol::policy::{Category, Limits};
use tiersync_protocol::{Item, Kind, NodeId, Policy, Replicate, Value};

use super::*;

pub(crate) fn policy() -> Arc<Policy> {
    let cat = |kind, replicate| Category {
        kind,
        replicate,
        customer_link: None,
        description: String::new(),
    };
    let mut categories = BTreeMap::new();
    categories.insert("customer".to_string(), cat(Kind::Record, Replicate::Up));
    categories.insert("billing".to_string(), cat(Kind::Log, Replicate::Up));
    categories.insert(
        "opportunity".to_string(),
        cat(Kind::Record, Replicate::Local),
    );
    Arc::new(Policy {
        limits: Limits::default(),
        privacy: Default::default(),
        categories,
        aggregates: BTreeMap::new(),
    })
}

fn open(dir: &Path) -> Store {
    open_as(dir, "city-a")
}

fn open_as(dir: &Path, node: &str) -> Store {
    Store::open(dir, NodeId::new(node).unwrap(), policy(), Durability::Fsync).unwrap()
}

fn doc(pairs: &[(&str, i64)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Value::Int(*v)))
        .collect()
}

fn put(key: &str, d: BTreeMap<String, Value>) -> Mutation {
    Mutation::Put {
        category: "customer".into(),
        key: key.into(),
        doc: d,
    }
}

fn one(store: &Store, m: Mutation, now: u64) -> Result<Applied, WriteError> {
    store.apply(vec![m], now).unwrap().pop().unwrap()
}

fn visible(store: &Store, cat: &str, key: &str) -> Option<BTreeMap<String, Value>> {
    match store.get(cat, key).unwrap()? {
        Item::Record(r) if r.is_deleted() => None,
        Item::Record(r) => Some(
            r.document()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
        Item::Log(l) => Some(l.fields),
        Item::Counters(_) => None,
    }
}

#[test]
fn put_patch_delete_and_changelog() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert_eq!(
        one(&s, put("c1", doc(&[("a", 1), ("b", 2)])), 10)
            .unwrap()
            .seq,
        Some(1)
    );
    let mut p = BTreeMap::new();
    p.insert("b".to_string(), None);
    p.insert("c".to_string(), Some(Value::Int(3)));
    one(
        &s,
        Mutation::Patch {
            category: "customer".into(),
            key: "c1".into(),
            fields: p,
        },
        11,
    )
    .unwrap();
    assert_eq!(
        visible(&s, "customer", "c1"),
        Some(doc(&[("a", 1), ("c", 3)]))
    );
    one(
        &s,
        Mutation::Delete {
            category: "customer".into(),
            key: "c1".into(),
        },
        12,
    )
    .unwrap();
    assert_eq!(visible(&s, "customer", "c1"), None);
    assert!(matches!(
        one(
            &s,
            Mutation::Delete {
                category: "customer".into(),
                key: "c1".into()
            },
            13
        ),
        Err(WriteError::NotFound { .. })
    ));
    let log = s.changes_after(0, 100).unwrap();
    assert_eq!(
        log.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        log.iter()
            .all(|(_, e)| e.item() == Some(("customer", "c1")))
    );
    assert_eq!(s.changes_after(2, 100).unwrap().len(), 1);
}

#[test]
fn append_is_idempotent_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let append = |amount| Mutation::Append {
        category: "billing".into(),
        key: "b1".into(),
        fields: doc(&[("amount", amount)]),
    };
    let first = one(&s, append(5), 10).unwrap();
    let again = one(&s, append(5), 11).unwrap();
    assert_eq!(again.seq, None);
    assert_eq!(again.stamp, first.stamp);
    assert!(matches!(
        one(&s, append(6), 12),
        Err(WriteError::Conflict { .. })
    ));
    assert_eq!(s.last_seq().unwrap(), 1);
}

#[test]
fn refused_mutations_write_nothing_and_do_not_disturb_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let results = s
        .apply(
            vec![
                put("ok1", doc(&[("a", 1)])),
                Mutation::Put {
                    category: "nope".into(),
                    key: "k".into(),
                    doc: doc(&[]),
                },
                put("", doc(&[])),
                put("bad\u{7}key", doc(&[])),
                Mutation::Append {
                    category: "customer".into(),
                    key: "k".into(),
                    fields: doc(&[]),
                },
                Mutation::Put {
                    category: "billing".into(),
                    key: "k".into(),
                    doc: doc(&[]),
                },
                put(
                    "big",
                    [("x".to_string(), Value::Str("y".repeat(100_000)))].into(),
                ),
                put("ok2", doc(&[("a", 2)])),
            ],
            10,
        )
        .unwrap();
    assert!(results[0].is_ok() && results[7].is_ok());
    assert!(matches!(
        results[1],
        Err(WriteError::Policy(PolicyError::UnknownCategory(_)))
    ));
    assert!(matches!(
        results[2],
        Err(WriteError::Policy(PolicyError::BadKey(_)))
    ));
    assert!(matches!(
        results[3],
        Err(WriteError::Policy(PolicyError::BadKey(_)))
    ));
    assert!(matches!(results[4], Err(WriteError::WrongKind { .. })));
    assert!(matches!(results[5], Err(WriteError::WrongKind { .. })));
    assert!(matches!(results[6], Err(WriteError::TooLarge { .. })));
    assert_eq!(s.last_seq().unwrap(), 2);
    assert_eq!(s.changes_after(0, 10).unwrap().len(), 2);
    assert!(s.get("customer", "big").unwrap().is_none());
}

#[test]
fn hlc_survives_reopen_and_wall_clock_steps_back() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let s = open(dir.path());
        one(&s, put("a", doc(&[])), 10_000_000).unwrap().stamp
    };
    let s = open(dir.path());
    // A millisecond past what was persisted: lost changes are never
    // reissued with their HLCs.
    assert_eq!(
        s.clock_last().unwrap().physical_ms,
        first.hlc.physical_ms + 1
    );
    // The wall clock went back a minute (within the allowed skew) while
    // the node was down: stamps stay above. Beyond the skew the clock
    // recovers instead (`a_root_restamps_…`, `a_child_restamps_…`).
    let second = one(&s, put("b", doc(&[])), 10_000_000 - 60_000)
        .unwrap()
        .stamp;
    assert!(second > first);
    assert_eq!(s.last_seq().unwrap(), 2);
}

#[test]
fn no_space_errors_are_told_apart() {
    // What RocksDB says on ENOSPC, and for every write after it while its
    // background error stands.
    for msg in [
        "IO error: No space left on device: While appending to file: /d/000004.log: No space left on device",
        "IO error: No space left on deviceWhile appending to file: /d/000009.log",
    ] {
        assert!(is_no_space(msg), "{msg}");
    }
    assert!(!is_no_space("IO error: Permission denied"));
    assert!(!is_no_space("Corruption: bad block"));
}

#[test]
fn a_data_dir_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let err = Store::open(
        dir.path(),
        NodeId::new("city-b").unwrap(),
        policy(),
        Durability::Fsync,
    )
    .unwrap_err();
    assert!(err.to_string().contains("city-a"), "{err}");
}

#[test]
fn scan_pages_through_a_prefix_and_skips_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    for k in ["a/1", "a/2", "a/3", "a/4", "b/1", "a"] {
        one(&s, put(k, doc(&[])), 10).unwrap();
    }
    one(
        &s,
        Mutation::Delete {
            category: "customer".into(),
            key: "a/3".into(),
        },
        11,
    )
    .unwrap();
    let p1 = s.scan("customer", "a/", None, 2, false).unwrap();
    assert_eq!(
        p1.items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2"]
    );
    let p2 = s
        .scan("customer", "a/", p1.next.as_deref(), 2, false)
        .unwrap();
    assert_eq!(
        p2.items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["a/4"]
    );
    assert_eq!(p2.next, None);
    assert_eq!(
        s.scan("customer", "a/", None, 10, true)
            .unwrap()
            .items
            .len(),
        4
    );
    assert!(
        s.scan("billing", "", None, 10, false)
            .unwrap()
            .items
            .is_empty()
    );
}

#[derive(Debug, Clone)]
enum ModelOp {
    Put(u8, i64),
    Patch(u8, i64),
    Delete(u8),
    Append(u8, i64),
    Reopen,
}

fn arb_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        (0u8..6, any::<i64>()).prop_map(|(k, v)| ModelOp::Put(k, v)),
        (0u8..6, any::<i64>()).prop_map(|(k, v)| ModelOp::Patch(k, v)),
        (0u8..6).prop_map(ModelOp::Delete),
        (0u8..6, 0i64..3).prop_map(|(k, v)| ModelOp::Append(k, v)),
        Just(ModelOp::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The store behaves like a map, across reopens, and its changelog has one
    /// contiguous entry per accepted change.
    #[test]
    fn store_matches_a_model(ops in proptest::collection::vec(arb_op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let mut model: BTreeMap<(String, String), BTreeMap<String, Value>> = BTreeMap::new();
        let mut changes = 0u64;
        for (t, op) in ops.into_iter().enumerate() {
            let now = 1000 + t as u64;
            let (m, expect): (Mutation, Option<Option<BTreeMap<String, Value>>>) = match op {
                ModelOp::Reopen => { drop(s); s = open(dir.path()); continue; }
                ModelOp::Put(k, v) => (put(&k.to_string(), doc(&[("v", v)])), Some(Some(doc(&[("v", v)])))),
                ModelOp::Patch(k, v) => {
                    let mut cur = model.get(&("customer".into(), k.to_string())).cloned().unwrap_or_default();
                    cur.insert("p".into(), Value::Int(v));
                    (Mutation::Patch { category: "customer".into(), key: k.to_string(), fields: [("p".to_string(), Some(Value::Int(v)))].into() }, Some(Some(cur)))
                }
                ModelOp::Delete(k) => {
                    let exists = model.contains_key(&("customer".into(), k.to_string()));
                    (Mutation::Delete { category: "customer".into(), key: k.to_string() }, exists.then_some(None))
                }
                ModelOp::Append(k, v) => {
                    let cur = model.get(&("billing".into(), k.to_string())).cloned();
                    let want = doc(&[("amount", v)]);
                    let expect = match cur { None => Some(Some(want.clone())), Some(c) if c == want => None, Some(_) => None };
                    (Mutation::Append { category: "billing".into(), key: k.to_string(), fields: want }, expect)
                }
            };
            let (cat, key) = { let (c, k) = m.target(); (c.to_string(), k.to_string()) };
            let res = one(&s, m, now);
            match expect {
                Some(new) => {
                    prop_assert!(res.is_ok(), "{:?}", res);
                    changes += 1;
                    match new { Some(d) => { model.insert((cat, key), d); } None => { model.remove(&(cat, key)); } }
                }
                None => {
                    if let Ok(a) = res { prop_assert_eq!(a.seq, None); }
                }
            }
        }
        for ((cat, key), d) in &model {
            let got = visible(&s, cat, key);
            prop_assert_eq!(got.as_ref(), Some(d));
        }
        let mut live = 0;
        s.for_each_item(|_, _, item| if !item.is_deleted() { live += 1 }).unwrap();
        prop_assert_eq!(live, model.len());
        // The kept counts (committed with each write, reloaded on reopen)
        // equal the model's.
        let mut want: BTreeMap<String, u64> = BTreeMap::new();
        for (cat, _) in model.keys() {
            *want.entry(cat.clone()).or_default() += 1;
        }
        let mut got = s.item_counts().unwrap();
        got.retain(|_, n| *n > 0);
        prop_assert_eq!(got, want);
        let log = s.changes_after(0, usize::MAX).unwrap();
        prop_assert_eq!(log.len() as u64, changes);
        prop_assert!(log.iter().enumerate().all(|(i, (seq, _))| *seq == i as u64 + 1));
    }
}

/// Live items per category, counted by a scan.
fn scanned_counts(s: &Store) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    s.for_each_item(|cat, _, item| {
        if !item.is_deleted() {
            *counts.entry(cat.to_string()).or_default() += 1;
        }
    })
    .unwrap();
    counts
}

#[test]
fn item_counts_follow_merges_and_are_counted_once_in_an_older_store() {
    let city_dir = tempfile::tempdir().unwrap();
    let city = open(city_dir.path());
    for k in 0..5 {
        one(&city, put(&format!("c{k}"), doc(&[("v", k)])), 1000).unwrap();
    }
    let append = |k: &str| Mutation::Append {
        category: "billing".into(),
        key: k.into(),
        fields: doc(&[("amount", 1)]),
    };
    one(&city, append("b1"), 1001).unwrap();
    one(
        &city,
        Mutation::Delete {
            category: "customer".into(),
            key: "c0".into(),
        },
        1002,
    )
    .unwrap();
    let want = BTreeMap::from([("billing".to_string(), 1), ("customer".to_string(), 4)]);
    assert_eq!(scanned_counts(&city), want);

    let province_dir = tempfile::tempdir().unwrap();
    let province = open_as(province_dir.path(), "prov-a");
    let merge = |items| RemoteMerge {
        relay_all: false,
        now_ms: 5000,
        child: NodeId::new("city-a").unwrap(),
        incarnation: city.incarnation(),
        items,
        cursor: None,
        watermarks: Vec::new(),
    };
    let batch = city.load_batch(0).unwrap();
    // Twice: a re-delivered batch changes nothing, so counts nothing twice.
    province.merge_remote(merge(batch.items.clone())).unwrap();
    province.merge_remote(merge(batch.items)).unwrap();
    assert_eq!(province.item_counts().unwrap(), want);
    // A live record deleted and a deleted one written again, in one batch.
    let after = city.last_seq().unwrap();
    one(
        &city,
        Mutation::Delete {
            category: "customer".into(),
            key: "c1".into(),
        },
        1003,
    )
    .unwrap();
    one(&city, put("c0", doc(&[("v", 9)])), 1004).unwrap();
    province
        .merge_remote(merge(city.load_batch(after).unwrap().items))
        .unwrap();
    assert_eq!(province.item_counts().unwrap(), scanned_counts(&province));
    assert_eq!(province.item_counts().unwrap(), scanned_counts(&city));

    // A store written before counts were kept: counted once at open.
    let meta = province.cf(CF_META).unwrap();
    province.db.delete_cf(meta, META_COUNTS).unwrap();
    province.db.delete_cf(meta, count_key("customer")).unwrap();
    drop(province);
    let province = open_as(province_dir.path(), "prov-a");
    assert_eq!(province.item_counts().unwrap(), scanned_counts(&city));
}

fn with_aggregates(defs: &[(&str, &str, &[&str], &[&str])]) -> Arc<Policy> {
    let mut p = (*policy()).clone();
    p.privacy.dimensions = vec!["stage".into()];
    for (name, source, group_by, measures) in defs {
        p.aggregates.insert(
            name.to_string(),
            tiersync_protocol::policy::AggregateDef {
                source: source.to_string(),
                group_by: group_by.iter().map(|s| s.to_string()).collect(),
                measures: measures.iter().map(|s| s.to_string()).collect(),
                description: String::new(),
            },
        );
    }
    p.validate().unwrap();
    Arc::new(p)
}

fn rows(s: &Store, name: &str) -> BTreeMap<Vec<Option<String>>, Vec<i128>> {
    let agg = s
        .aggregates()
        .iter()
        .find(|a| a.name == name)
        .unwrap()
        .clone();
    s.aggregate_rows(&agg)
        .unwrap()
        .into_iter()
        .filter(|(_, v)| v.iter().any(|x| *x != 0))
        .collect()
}

#[test]
fn aggregates_follow_writes_and_rebuild_when_their_definition_changes() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeId::new("city-a").unwrap();
    let v1 = with_aggregates(&[
        ("by_seg", "customer", &["segment"], &["count"]),
        ("opp", "opportunity", &["stage"], &["count", "sum(value)"]),
    ]);
    {
        let s = Store::open(dir.path(), node.clone(), v1.clone(), Durability::Fsync).unwrap();
        let doc = |seg: &str| BTreeMap::from([("segment".to_string(), Value::Str(seg.into()))]);
        for (k, seg) in [("c1", "gold"), ("c2", "gold"), ("c3", "silver")] {
            one(&s, put(k, doc(seg)), 10).unwrap();
        }
        // An update moves c2 between groups; a delete takes c3 out.
        one(&s, put("c2", doc("silver")), 11).unwrap();
        one(
            &s,
            Mutation::Delete {
                category: "customer".into(),
                key: "c3".into(),
            },
            12,
        )
        .unwrap();
        let gold = vec![Some("gold".to_string())];
        let silver = vec![Some("silver".to_string())];
        assert_eq!(
            rows(&s, "by_seg"),
            BTreeMap::from([(gold, vec![1]), (silver, vec![1])])
        );
        let opp = BTreeMap::from([
            ("stage".to_string(), Value::Str("won".into())),
            ("value".to_string(), Value::Float(2.5)),
        ]);
        one(
            &s,
            Mutation::Put {
                category: "opportunity".into(),
                key: "o1".into(),
                doc: opp,
            },
            13,
        )
        .unwrap();
        assert_eq!(
            rows(&s, "opp"),
            BTreeMap::from([(vec![Some("won".to_string())], vec![1, 2_500_000])])
        );
    }
    // Same names, other dimensions: rebuilt from the data at open.
    let v2 = with_aggregates(&[
        ("by_seg", "customer", &["origin"], &["count"]),
        ("opp", "opportunity", &[], &["count", "sum(value)"]),
    ]);
    let s = Store::open(dir.path(), node.clone(), v2, Durability::Fsync).unwrap();
    assert_eq!(
        rows(&s, "by_seg"),
        BTreeMap::from([(vec![Some("city-a".to_string())], vec![2])])
    );
    assert_eq!(
        rows(&s, "opp"),
        BTreeMap::from([(vec![], vec![1, 2_500_000])])
    );
    drop(s);
    // Back to the first definition: built again, not double counted.
    let s = Store::open(dir.path(), node, v1, Durability::Fsync).unwrap();
    assert_eq!(rows(&s, "by_seg").values().map(|v| v[0]).sum::<i128>(), 2);
    assert_eq!(
        rows(&s, "opp"),
        BTreeMap::from([(vec![Some("won".to_string())], vec![1, 2_500_000])])
    );
}

/// A parent's cursor keeps the HLC of the child's change at it; a child
/// checks it against its own changelog (and its trim mark), and a restored
/// child that reissued the number sees the difference.
#[test]
fn cursors_keep_the_hlc_and_children_check_it() {
    let city_dir = tempfile::tempdir().unwrap();
    let city = open(city_dir.path());
    for k in 0..4 {
        one(
            &city,
            put(&format!("c{k}"), doc(&[("v", k)])),
            1000 + k as u64,
        )
        .unwrap();
    }
    let province_dir = tempfile::tempdir().unwrap();
    let province = open_as(province_dir.path(), "prov-a");
    let child = NodeId::new("city-a").unwrap();
    let batch = city.load_batch(0).unwrap();
    assert_eq!(batch.last_seq, 4);
    province
        .merge_remote(RemoteMerge {
            relay_all: false,
            now_ms: 5000,
            child: child.clone(),
            incarnation: city.incarnation(),
            items: batch.items,
            cursor: Some((batch.last_seq, batch.upto_hlc)),
            watermarks: Vec::new(),
        })
        .unwrap();
    let (seq, hlc) = province.cursor(&child, city.incarnation()).unwrap();
    assert_eq!((seq, hlc), (4, batch.upto_hlc));
    assert_eq!(
        province.cursor(&child, 1).unwrap(),
        (0, Hlc::ZERO),
        "another incarnation"
    );
    assert!(city.resume_matches(seq, hlc).unwrap());

    // Trimmed: the mark of the last trimmed entry answers.
    city.acknowledged(4);
    assert_eq!(city.trim_expired(false, u64::MAX).unwrap(), 5);
    assert!(city.hlc_of(4).unwrap().is_none());
    assert!(city.resume_matches(4, hlc).unwrap());
    let other = Hlc {
        physical_ms: hlc.physical_ms + 1,
        logical: 0,
    };
    assert!(!city.resume_matches(4, other).unwrap(), "a reissued change");

    // Nothing the parent did not acknowledge is trimmed, and a parent that
    // resumes lower holds back trimming to there.
    one(&city, put("c9", doc(&[("v", 9)])), 2000).unwrap();
    assert_eq!(city.trim_expired(false, u64::MAX).unwrap(), 5);
    city.parent_resumed(3).unwrap();
    city.acknowledged(3);
    assert_eq!(city.trim_expired(false, u64::MAX).unwrap(), 5);
    // A batch that would skip trimmed entries is refused.
    assert!(matches!(
        city.load_batch(2),
        Err(StoreError::Trimmed {
            after: 2,
            retained: 5
        })
    ));
    // At a root, everything older than the window goes.
    assert_eq!(
        city.trim_expired(true, 1500).unwrap(),
        5,
        "the window keeps c9"
    );
    assert_eq!(city.trim_expired(true, u64::MAX).unwrap(), 6);
}

/// A new incarnation is durable, and its changelog entry is stamped past
/// the parent's HLC.
#[test]
fn reincarnation_is_durable_and_later_than_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    one(&s, put("c1", doc(&[("v", 1)])), 1000).unwrap();
    let old = s.incarnation();
    let parent_hlc = Hlc {
        physical_ms: 50_000,
        logical: 3,
    };
    let inc = s.reincarnate(parent_hlc, 1001).unwrap();
    assert_ne!(inc, old);
    assert_eq!(s.last_seq().unwrap(), 2);
    assert!(s.hlc_of(2).unwrap().unwrap() > parent_hlc);
    // Not an item: nothing travels for it.
    assert!(s.load_batch(1).unwrap().items.is_empty());
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.incarnation(), inc);
    assert!(s.clock_last().unwrap() > parent_hlc);
}

/// A cursor stored before cursors kept an HLC still reads (its HLC is
/// unknown, which children trust).
#[test]
fn cursors_of_an_older_store_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_as(dir.path(), "prov-a");
    let child = NodeId::new("city-a").unwrap();
    let old = encode(
        CF_CURSORS,
        &CursorV1 {
            incarnation: 7,
            seq: 12,
        },
    )
    .unwrap();
    s.db.put_cf(s.cf(CF_CURSORS).unwrap(), cursor_key(&child), old)
        .unwrap();
    assert_eq!(s.cursor(&child, 7).unwrap(), (12, Hlc::ZERO));
}

const HOUR: u64 = 3_600_000;

fn newest(s: &Store, key: &str) -> Stamp {
    s.get("customer", key)
        .unwrap()
        .unwrap()
        .max_stamp()
        .unwrap()
        .clone()
}

fn patch(key: &str, field: &str, v: i64) -> Mutation {
    Mutation::Patch {
        category: "customer".into(),
        key: key.into(),
        fields: [(field.to_string(), Some(Value::Int(v)))].into(),
    }
}

#[test]
fn a_root_restamps_its_own_future_writes_when_its_clock_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.set_root(true);
    one(&s, put("early", doc(&[("a", 1)])), 5_000).unwrap();
    // The wall clock jumps an hour ahead, then back.
    one(&s, put("ahead", doc(&[("a", 2)])), HOUR + 10_000).unwrap();
    assert_eq!(newest(&s, "ahead").hlc.physical_ms, HOUR + 10_000);
    let last = s.last_seq().unwrap();
    let back = one(&s, put("back", doc(&[("a", 3)])), 20_000).unwrap();
    assert!(back.stamp.hlc.physical_ms < HOUR, "{}", back.stamp);
    let ahead = newest(&s, "ahead");
    assert!(ahead.hlc.physical_ms <= 20_000, "{ahead}");
    assert!(
        back.stamp > ahead,
        "the re-stamp comes before the write that found it"
    );
    assert_eq!(newest(&s, "early").hlc.physical_ms, 5_000, "untouched");
    assert_eq!(visible(&s, "customer", "ahead"), Some(doc(&[("a", 2)])));
    // The re-stamped item travels: a changelog entry names it.
    let entries = s.changes_after(last, 10).unwrap();
    assert!(
        entries
            .iter()
            .any(|(_, e)| e.item() == Some(("customer", "ahead"))),
        "{entries:?}"
    );
    // Durable: the clock resumes below the jump after a reopen.
    drop(s);
    let s = open(dir.path());
    s.set_root(true);
    let next = one(&s, put("later", doc(&[("a", 4)])), 30_000).unwrap();
    assert_eq!(next.stamp.hlc.physical_ms, 30_000);
}

#[test]
fn a_child_restamps_at_its_welcome_only_what_its_parent_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let skew = s.policy().limits.max_clock_skew_ms;
    one(&s, put("shipped", doc(&[("a", 1)])), 5_000).unwrap();
    let shipped_seq = s.last_seq().unwrap();
    let shipped_hlc = s.hlc_of(shipped_seq).unwrap().unwrap();
    one(&s, put("ahead", doc(&[("a", 2)])), HOUR + 10_000).unwrap();
    // Back: the child stamps from the wall clock again, but leaves its
    // future write alone until it knows what its parent holds...
    let back = one(&s, put("back", doc(&[("a", 3)])), 20_000).unwrap();
    assert_eq!(back.stamp.hlc.physical_ms, 20_000);
    assert_eq!(newest(&s, "ahead").hlc.physical_ms, HOUR + 10_000);
    // ...and a write to that item still wins over it.
    let over = one(&s, patch("ahead", "b", 9), 21_000).unwrap();
    assert!(over.stamp > newest_before_patch(), "{}", over.stamp);
    // The mark survives a restart.
    drop(s);
    let s = open(dir.path());
    let view = ParentView {
        resume_from: shipped_seq,
        resume_hlc: shipped_hlc,
        parent_now_ms: 22_000,
    };
    let before = s.incarnation();
    let inc = s.restamp_unshipped(22_000, view).unwrap();
    assert_eq!(inc, Some(s.incarnation()), "a re-stamp is a new history");
    assert_ne!(inc, Some(before));
    let limit = 22_000 + skew;
    for key in ["shipped", "ahead", "back"] {
        let n = newest(&s, key);
        assert!(n.hlc.physical_ms <= limit, "{key}: {n}");
    }
    assert_eq!(
        newest(&s, "shipped").hlc,
        shipped_hlc,
        "what the parent holds stays"
    );
    assert_eq!(
        visible(&s, "customer", "ahead"),
        Some(doc(&[("a", 2), ("b", 9)]))
    );
    // Done: nothing is left to re-stamp.
    assert_eq!(s.restamp_unshipped(22_000, view).unwrap(), None);

    fn newest_before_patch() -> Stamp {
        Stamp {
            hlc: Hlc {
                physical_ms: HOUR + 10_000,
                logical: 0,
            },
            origin: NodeId::new("city-a").unwrap(),
        }
    }
}

/// Case 1 of issue 15, the sender's side: a province holding items at the
/// policy's `max_item_bytes` and the watermarks of a large subtree ships
/// them in batches that each fit a frame (items and watermarks counted by
/// their encoded size), and every entry is shipped.
#[test]
fn batches_fit_a_frame_with_the_largest_items_and_many_watermarks() {
    let mut p = (*policy()).clone();
    p.limits.max_frame_bytes = 8192;
    p.limits.max_item_bytes = 4096;
    p.validate().unwrap();
    let p = Arc::new(p);
    let city_dir = tempfile::tempdir().unwrap();
    let city = Store::open(
        city_dir.path(),
        NodeId::new("city-a").unwrap(),
        p.clone(),
        Durability::Fsync,
    )
    .unwrap();
    // Items as large as a write may make them.
    let mut text = 4000;
    for k in 0..3 {
        loop {
            let d = BTreeMap::from([("t".to_string(), Value::Str("x".repeat(text)))]);
            match one(&city, put(&format!("c{k}"), d), 1000 + k) {
                Ok(_) => break,
                Err(WriteError::TooLarge { .. }) => text -= 16,
                Err(e) => panic!("{e}"),
            }
        }
    }
    let province_dir = tempfile::tempdir().unwrap();
    let province = Store::open(
        province_dir.path(),
        NodeId::new("prov-a").unwrap(),
        p.clone(),
        Durability::Fsync,
    )
    .unwrap();
    // The city itself ships them in batches that fit.
    let (mut city_items, mut city_last) = (Vec::new(), (0, Hlc::ZERO));
    while city_last.0 < city.last_seq().unwrap() {
        let b = city.load_batch(city_last.0).unwrap();
        city_items.extend(b.items);
        city_last = (b.last_seq, b.upto_hlc);
    }
    assert_eq!(city_items.len(), 3);
    let marks: Vec<Watermark> = (0..150)
        .map(|i| Watermark {
            origin: NodeId::new(format!("a-city-with-a-rather-long-name-{i:03}")).unwrap(),
            incarnation: u64::MAX - i,
            seq: u64::MAX / 3,
            hlc: Hlc {
                physical_ms: 1_700_000_000_000,
                logical: 7,
            },
        })
        .collect();
    province
        .merge_remote(RemoteMerge {
            relay_all: false,
            now_ms: 5000,
            child: NodeId::new("city-a").unwrap(),
            incarnation: city.incarnation(),
            items: city_items,
            cursor: Some(city_last),
            watermarks: marks,
        })
        .unwrap();
    let (mut after, mut items, mut watermarks) = (0, 0, 0);
    while after < province.last_seq().unwrap() {
        let b = province.load_batch(after).unwrap();
        assert!(b.last_seq > after, "every batch moves on");
        let frame = tiersync_protocol::frame::Frame::Batch {
            after,
            last_seq: b.last_seq,
            upto_hlc: b.upto_hlc,
            items: b.items.clone(),
            watermarks: b.watermarks.clone(),
        };
        codec::encode_frame(&frame, p.limits.max_frame_bytes)
            .unwrap_or_else(|e| panic!("batch after {after}: {e}"));
        items += b.items.len();
        watermarks += b.watermarks.len();
        after = b.last_seq;
    }
    assert_eq!(items, 3);
    assert!(watermarks >= 151, "{watermarks}");
}

/// Cases 2 and 8 of issue 15 at the store: a value beyond the summed range
/// is refused (422 aggregate_overflow) and changes nothing; `reset_counters`
/// rewrites this node's every share from its own data with a fresh version,
/// leaving other nodes' shares alone.
#[test]
fn out_of_range_sums_are_refused_and_counters_reset_from_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_aggregates(&[("opp", "opportunity", &["stage"], &["count", "sum(value)"])]);
    let s = Store::open(
        dir.path(),
        NodeId::new("city-a").unwrap(),
        p,
        Durability::Fsync,
    )
    .unwrap();
    let opp = |key: &str, value: Value| Mutation::Put {
        category: "opportunity".into(),
        key: key.into(),
        doc: BTreeMap::from([
            ("stage".to_string(), Value::Str("won".into())),
            ("value".to_string(), value),
        ]),
    };
    one(&s, opp("o1", Value::Int(2)), 10).unwrap();
    let last = s.last_seq().unwrap();
    for v in [
        Value::Float(1e33),
        Value::Float(-1e33),
        Value::Int(i64::MAX),
    ] {
        assert!(
            matches!(
                one(&s, opp("o2", v.clone()), 11),
                Err(WriteError::Overflow(_))
            ),
            "{v:?}"
        );
    }
    assert_eq!(s.last_seq().unwrap(), last, "nothing was written");
    assert!(s.get("opportunity", "o2").unwrap().is_none());
    let won = vec![Some("won".to_string())];
    assert_eq!(
        rows(&s, "opp"),
        BTreeMap::from([(won.clone(), vec![1, 2_000_000])])
    );

    // Another node's share in this node's counters (as a province holds
    // its cities'), and this node's own share gone wrong.
    let (key, mut c) = {
        let page = s.scan(COUNTERS_CATEGORY, "", None, 10, true).unwrap();
        match page.items.into_iter().next().unwrap() {
            (k, Item::Counters(c)) => (k, c),
            other => panic!("{other:?}"),
        }
    };
    let before = c.shares[&NodeId::new("city-a").unwrap()].version;
    let other = NodeId::new("city-b").unwrap();
    c.set(&other, vec![5, 5], before, 9);
    c.set(
        &NodeId::new("city-a").unwrap(),
        vec![7, 7],
        before,
        s.incarnation(),
    );
    s.merge_remote(RemoteMerge {
        relay_all: false,
        now_ms: 20,
        child: other.clone(),
        incarnation: 9,
        items: vec![WireItem {
            category: COUNTERS_CATEGORY.into(),
            key: key.clone(),
            item: Item::Counters(c),
        }],
        cursor: None,
        watermarks: Vec::new(),
    })
    .unwrap();
    assert_eq!(s.reset_counters().unwrap(), 1);
    let Some(Item::Counters(c)) = s.get(COUNTERS_CATEGORY, &key).unwrap() else {
        panic!("the counters are kept");
    };
    let mine = &c.shares[&NodeId::new("city-a").unwrap()];
    assert_eq!(mine.values, vec![1, 2_000_000], "from this node's own data");
    assert!(mine.version > before, "with a fresh version");
    assert_eq!(
        c.shares[&other].values,
        vec![5, 5],
        "another node's share stays"
    );
}

/// Case 6 of issue 15 at the store: a city keeps its exact counts, and
/// ships its share of a group only once the group holds
/// `privacy.min_group_size` items (zeros before, which withdraw what was
/// shipped when a group shrinks again).
#[test]
fn counters_ship_only_groups_of_min_group_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_aggregates(&[("opp", "opportunity", &["stage"], &["count", "sum(value)"])]);
    assert_eq!(p.privacy.min_group_size, 5);
    let s = Store::open(
        dir.path(),
        NodeId::new("city-a").unwrap(),
        p,
        Durability::Fsync,
    )
    .unwrap();
    let opp = |k: usize| Mutation::Put {
        category: "opportunity".into(),
        key: format!("o{k}"),
        doc: BTreeMap::from([
            ("stage".to_string(), Value::Str("won".into())),
            ("value".to_string(), Value::Int(100)),
        ]),
    };
    let shipped_share = |s: &Store| {
        let batch = s.load_batch(0).unwrap();
        let counters: Vec<_> = batch
            .items
            .iter()
            .filter_map(|w| match &w.item {
                Item::Counters(c) => Some(c.value_of(&NodeId::new("city-a").unwrap())),
                _ => None,
            })
            .collect();
        assert_eq!(counters.len(), 1, "one group");
        counters[0].clone()
    };
    let won = vec![Some("won".to_string())];
    for k in 0..3 {
        one(&s, opp(k), 10 + k as u64).unwrap();
    }
    assert_eq!(
        rows(&s, "opp"),
        BTreeMap::from([(won.clone(), vec![3, 300_000_000])])
    );
    assert_eq!(
        shipped_share(&s),
        vec![0, 0],
        "3 opportunities: nothing published"
    );
    for k in 3..5 {
        one(&s, opp(k), 10 + k as u64).unwrap();
    }
    assert_eq!(
        shipped_share(&s),
        vec![5, 500_000_000],
        "5: published as they are"
    );
    one(
        &s,
        Mutation::Delete {
            category: "opportunity".into(),
            key: "o0".into(),
        },
        20,
    )
    .unwrap();
    assert_eq!(shipped_share(&s), vec![0, 0], "4 again: withdrawn");
    assert_eq!(
        rows(&s, "opp"),
        BTreeMap::from([(won, vec![4, 400_000_000])])
    );
}
