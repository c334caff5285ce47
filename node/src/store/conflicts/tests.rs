//! The conflict ledger and overwrite summaries through real stores: cities
//! write, provinces and national merge their batches.

use std::collections::BTreeMap;
use std::path::Path;

use tiersync_protocol::Value;

use super::super::tests::policy;
use super::*;
use crate::config::Durability;
use crate::store::{Mutation, RemoteMerge};

fn open_as(dir: &Path, node: &str) -> Store {
    Store::open(dir, NodeId::new(node).unwrap(), policy(), Durability::Fsync).unwrap()
}

fn bill(store: &Store, key: &str, amount: i64, now: u64) {
    let m = Mutation::Append {
        category: "billing".into(),
        key: key.into(),
        fields: BTreeMap::from([("amount".to_string(), Value::Int(amount))]),
    };
    store.apply(vec![m], now).unwrap().pop().unwrap().unwrap();
}

/// Merges everything `child` has after `after` into `parent`; returns the
/// child's last sequence number.
fn ship(child: &Store, child_id: &str, parent: &Store, after: u64) -> u64 {
    let batch = child.load_batch(after).unwrap();
    parent
        .merge_remote(RemoteMerge {
            child: NodeId::new(child_id).unwrap(),
            incarnation: child.incarnation(),
            items: batch.items,
            cursor: None,
            watermarks: Vec::new(),
            now_ms: 10_000,
            relay_all: false,
        })
        .unwrap();
    batch.last_seq
}

/// (loser origin, loser amount) of each ledger entry.
type Losers = Vec<(String, i64)>;

/// The ledger as its losers and its raw items.
fn ledger(s: &Store) -> (Losers, Vec<(String, Item)>) {
    let page = s.conflicts(None, None, None, 100).unwrap();
    assert_eq!(page.next, None);
    let losers = page
        .entries
        .iter()
        .map(|(_, c, _)| {
            let amount = match c.loser.fields.get("amount") {
                Some(Value::Int(a)) => *a,
                other => panic!("amount {other:?}"),
            };
            (c.loser.stamp.origin.to_string(), amount)
        })
        .collect();
    let raw = s
        .scan(CONFLICTS_CATEGORY, "", None, 100, true)
        .unwrap()
        .items;
    (losers, raw)
}

fn dirs(n: usize) -> Vec<tempfile::TempDir> {
    (0..n).map(|_| tempfile::tempdir().unwrap()).collect()
}

/// `n` directories; city-a (in the first) bills b-1 for 10, then city-b (in
/// the second) for 20, so city-b's version wins.
fn two_cities_billing_b1(n: usize) -> (Vec<tempfile::TempDir>, Store, Store) {
    let d = dirs(n);
    let a = open_as(d[0].path(), "city-a");
    let b = open_as(d[1].path(), "city-b");
    bill(&a, "b-1", 10, 1000);
    bill(&b, "b-1", 20, 2000);
    (d, a, b)
}

#[test]
fn a_conflict_at_a_parent_keeps_the_loser_durably_and_once() {
    let (d, a, b) = two_cities_billing_b1(3);
    let p = open_as(d[2].path(), "prov");
    ship(&a, "city-a", &p, 0);
    assert_eq!(ledger(&p).0, vec![]);
    let before = p.last_seq().unwrap();
    ship(&b, "city-b", &p, 0);
    // B's later stamp wins; A's version is kept, with its winner alongside.
    let page = p.conflicts(None, None, None, 10).unwrap();
    let [(_, c, Some(Item::Log(winner)))] = page.entries.as_slice() else {
        panic!("one entry with a winner: {page:?}")
    };
    assert_eq!((c.category.as_str(), c.key.as_str()), ("billing", "b-1"));
    assert_eq!(c.loser.stamp.origin.as_str(), "city-a");
    assert_eq!(winner.stamp.origin.as_str(), "city-b");
    // It has its own changelog entry, so it travels up with the winner.
    let shipped = p.load_batch(before).unwrap();
    let cats: Vec<&str> = shipped.items.iter().map(|w| w.category.as_str()).collect();
    assert_eq!(cats, vec!["billing", CONFLICTS_CATEGORY]);

    // Re-delivered, from either side: nothing new, nothing in the changelog.
    let seq = p.last_seq().unwrap();
    ship(&a, "city-a", &p, 0);
    ship(&b, "city-b", &p, 0);
    assert_eq!(p.last_seq().unwrap(), seq);
    assert_eq!(ledger(&p).0, vec![("city-a".to_string(), 10)]);

    drop(p);
    let p = open_as(d[2].path(), "prov");
    assert_eq!(ledger(&p).0, vec![("city-a".to_string(), 10)]);
}

#[test]
fn three_versions_keep_every_loser_in_any_order() {
    let d = dirs(5);
    let cities: Vec<Store> = ["city-a", "city-b", "city-c"]
        .iter()
        .zip(&d)
        .map(|(id, dir)| open_as(dir.path(), id))
        .collect();
    for (i, c) in cities.iter().enumerate() {
        bill(c, "b-1", 10 * (i as i64 + 1), 1000 * (i as u64 + 1));
    }
    let ids = ["city-a", "city-b", "city-c"];
    let p1 = open_as(d[3].path(), "prov-1");
    for i in [0, 1, 2] {
        ship(&cities[i], ids[i], &p1, 0);
    }
    let p2 = open_as(d[4].path(), "prov-2");
    for i in [2, 0, 1] {
        ship(&cities[i], ids[i], &p2, 0);
    }
    let want = vec![("city-a".to_string(), 10), ("city-b".to_string(), 20)];
    assert_eq!(ledger(&p1).0, want);
    assert_eq!(ledger(&p2), ledger(&p1), "the same entries, byte for byte");
    // Paged one by one.
    let first = p1.conflicts(None, None, None, 1).unwrap();
    assert!(first.next.is_some());
    let rest = p1.conflicts(None, None, first.next.as_deref(), 1).unwrap();
    let origins: Vec<&str> = [&first, &rest]
        .iter()
        .map(|p| p.entries[0].1.loser.stamp.origin.as_str())
        .collect();
    assert_eq!(
        (origins, rest.next.as_deref()),
        (vec!["city-a", "city-b"], None)
    );
}

#[test]
fn one_conflict_seen_at_two_tiers_is_one_entry() {
    let (d, a, b) = two_cities_billing_b1(4);
    let p = open_as(d[2].path(), "prov");
    let n = open_as(d[3].path(), "nat");
    // National gets A's version before the province sees B's ...
    ship(&a, "city-a", &p, 0);
    let sent = ship(&p, "prov", &n, 0);
    // ... then B's version and the province's ledger entry together: national
    // finds the same conflict itself, and both entries are one.
    ship(&b, "city-b", &p, 0);
    ship(&p, "prov", &n, sent);
    assert_eq!(ledger(&n).0, vec![("city-a".to_string(), 10)]);
    assert_eq!(ledger(&n).1, ledger(&p).1);
    // Filters: by category, by either origin.
    let only = |cat, origin| n.conflicts(cat, origin, None, 10).unwrap().entries.len();
    assert_eq!(only(Some("billing"), Some("city-b")), 1);
    assert_eq!(only(None, Some("city-a")), 1);
    assert_eq!(only(Some("customer"), None), 0);
    assert_eq!(only(None, Some("city-z")), 0);
}

#[test]
fn overwrites_by_another_origin_are_summarised_once() {
    let d = dirs(3);
    let seg = |store: &Store, v: &str, now| {
        let m = Mutation::Patch {
            category: "customer".into(),
            key: "c-1".into(),
            fields: BTreeMap::from([("seg".to_string(), Some(Value::Str(v.into())))]),
        };
        store.apply(vec![m], now).unwrap().pop().unwrap().unwrap();
    };
    let a = open_as(d[0].path(), "city-a");
    let b = open_as(d[1].path(), "city-b");
    seg(&a, "gold", 1000);
    seg(&b, "silver", 2000);
    let p = open_as(d[2].path(), "prov");
    ship(&a, "city-a", &p, 0);
    ship(&b, "city-b", &p, 0);
    ship(&b, "city-b", &p, 0);
    ship(&a, "city-a", &p, 0);
    let s = p.overwrites().unwrap();
    assert_eq!(s.len(), 1, "{s:?}");
    let s = &s[0];
    assert_eq!(
        (
            s.category.as_str(),
            s.winner.as_str(),
            s.loser.as_str(),
            s.count
        ),
        ("customer", "city-b", "city-a", 1)
    );
    assert_eq!(s.examples.len(), 1);
    assert_eq!(
        (s.examples[0].key.as_str(), s.examples[0].field.as_str()),
        ("c-1", "seg")
    );
    // Log conflicts are no overwrites, and overwrites no ledger entries.
    assert_eq!(ledger(&p).0, vec![]);
}
