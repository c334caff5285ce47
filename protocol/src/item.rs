//! The mergeable items: `record` documents and `log` entries.
//!
//! Both are state-based CRDTs: `merge` is commutative, associative and
//! idempotent (property-tested below), so any order, duplication or delay of
//! delivery converges. Registers are `crdts::LWWReg`s keyed by [`Stamp`]; the
//! record type is the thin composition DESIGN.md asks for (sorted fields, one
//! register each) rather than a `crdts::Map`, which costs ~10x per merge.

use std::collections::{BTreeMap, BTreeSet};

use crdts::{CvRDT, LWWReg};
use serde::{Deserialize, Serialize};

use crate::clock::{Hlc, HlcClock, Stamp};
use crate::id::NodeId;
use crate::value::Value;

/// What a merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// The local state changed.
    pub changed: bool,
    /// Two different contents claimed one identity (a log key written twice
    /// with different content, or a reused stamp); resolved deterministically,
    /// and reported so the caller can count and log it.
    pub conflict: bool,
}

impl MergeOutcome {
    fn absorb(&mut self, other: MergeOutcome) {
        self.changed |= other.changed;
        self.conflict |= other.conflict;
    }
}

/// Merges `other` into `reg`. `crdts::LWWReg` keeps the local value when the
/// markers are equal, which is not commutative if the values differ; that can
/// only come from a bug or a forged frame, and we break the tie by value so
/// every node still agrees.
fn merge_reg<V: Ord + Clone>(reg: &mut LWWReg<V, Stamp>, other: &LWWReg<V, Stamp>) -> MergeOutcome {
    if reg.validate_merge(other).is_err() {
        if other.val > reg.val {
            reg.val = other.val.clone();
            return MergeOutcome {
                changed: true,
                conflict: true,
            };
        }
        return MergeOutcome {
            changed: false,
            conflict: true,
        };
    }
    if other.marker > reg.marker {
        reg.merge(other.clone());
        return MergeOutcome {
            changed: true,
            conflict: false,
        };
    }
    MergeOutcome::default()
}

/// The operation that last replaced or removed a whole record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Base {
    /// No PUT or DELETE yet: the document is the sum of its PATCHes.
    Empty,
    /// A PUT replaced the document: fields older than it are gone.
    Put,
    /// A DELETE removed the document: fields not newer than it are gone.
    Deleted,
}

/// The stamp below every real stamp, used for the initial base register.
fn zero_stamp() -> Stamp {
    Stamp {
        hlc: Hlc::ZERO,
        origin: NodeId::new("0").unwrap_or_else(|_| unreachable!("'0' is a valid id")),
    }
}

/// A mutable document: one LWW register per field plus a base register for
/// the last PUT/DELETE.
///
/// A field is visible when its stamp is newer than the base (or equal, for the
/// fields the PUT itself wrote). Fields that are no longer visible are pruned
/// on every change, so the state stays the size of the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    base: LWWReg<Base, Stamp>,
    fields: BTreeMap<String, LWWReg<Option<Value>, Stamp>>,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            base: LWWReg {
                val: Base::Empty,
                marker: zero_stamp(),
            },
            fields: BTreeMap::new(),
        }
    }
}

impl Record {
    /// Replaces the whole document (fields absent from `doc` are removed).
    pub fn put(&mut self, doc: BTreeMap<String, Value>, stamp: Stamp) -> MergeOutcome {
        let delta = Record {
            base: LWWReg {
                val: Base::Put,
                marker: stamp.clone(),
            },
            fields: doc
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        LWWReg {
                            val: Some(v),
                            marker: stamp.clone(),
                        },
                    )
                })
                .collect(),
        };
        self.merge(&delta)
    }

    /// Merges fields into the document; `None` removes a field.
    pub fn patch(&mut self, fields: BTreeMap<String, Option<Value>>, stamp: Stamp) -> MergeOutcome {
        let delta = Record {
            base: Record::default().base,
            fields: fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        LWWReg {
                            val: v,
                            marker: stamp.clone(),
                        },
                    )
                })
                .collect(),
        };
        self.merge(&delta)
    }

    /// Deletes the document (a tombstone that merges like any other write).
    pub fn delete(&mut self, stamp: Stamp) -> MergeOutcome {
        let delta = Record {
            base: LWWReg {
                val: Base::Deleted,
                marker: stamp,
            },
            fields: BTreeMap::new(),
        };
        self.merge(&delta)
    }

    /// Merges another replica's state into this one.
    pub fn merge(&mut self, other: &Record) -> MergeOutcome {
        self.merge_observing(other, |_, _, _| {})
    }

    /// [`merge`](Record::merge), calling `overwritten(field, loser, winner)`
    /// for every field whose value another origin's newer, different value
    /// replaces here (last-writer-wins between two origins: normal, but
    /// worth counting). Costs one stamp comparison per field when nothing
    /// is replaced.
    pub fn merge_observing(
        &mut self,
        other: &Record,
        mut overwritten: impl FnMut(&str, &Stamp, &Stamp),
    ) -> MergeOutcome {
        let mut out = merge_reg(&mut self.base, &other.base);
        for (name, reg) in &other.fields {
            match self.fields.get_mut(name) {
                Some(mine) => {
                    if reg.marker > mine.marker
                        && reg.marker.origin != mine.marker.origin
                        && reg.val != mine.val
                    {
                        overwritten(name, &mine.marker, &reg.marker);
                    }
                    out.absorb(merge_reg(mine, reg))
                }
                None => {
                    if self.is_visible(&reg.marker) {
                        self.fields.insert(name.clone(), reg.clone());
                        out.changed = true;
                    }
                }
            }
        }
        let before = self.fields.len();
        let base = self.base.clone();
        self.fields
            .retain(|_, reg| Self::visible_under(&base, &reg.marker));
        out.changed |= self.fields.len() != before;
        out
    }

    fn is_visible(&self, marker: &Stamp) -> bool {
        Self::visible_under(&self.base, marker)
    }

    fn visible_under(base: &LWWReg<Base, Stamp>, marker: &Stamp) -> bool {
        match base.val {
            Base::Put => *marker >= base.marker,
            Base::Empty | Base::Deleted => *marker > base.marker,
        }
    }

    /// Whether the state is one that [`put`](Record::put),
    /// [`patch`](Record::patch), [`delete`](Record::delete) and
    /// [`merge`](Record::merge) can produce: an empty base carries the zero
    /// stamp, and no field is hidden by the base. A received record that is
    /// not canonical was forged (e.g. an empty base with a far-future stamp
    /// would hide every field) and is refused.
    pub fn is_canonical(&self) -> bool {
        let base_ok = self.base.val != Base::Empty || self.base.marker == zero_stamp();
        base_ok && self.fields.values().all(|r| self.is_visible(&r.marker))
    }

    /// Whether the record is deleted: not PUT, and no field holds a value
    /// (a PATCH that only removes fields of a deleted record leaves it
    /// deleted, rather than bringing back an empty live document that
    /// counts and aggregates would include).
    pub fn is_deleted(&self) -> bool {
        self.base.val != Base::Put && self.fields.values().all(|r| r.val.is_none())
    }

    /// The visible document: field name → value, without removed fields.
    pub fn document(&self) -> BTreeMap<&str, &Value> {
        self.fields
            .iter()
            .filter_map(|(k, reg)| reg.val.as_ref().map(|v| (k.as_str(), v)))
            .collect()
    }

    /// Every field with the stamp of its current value (removed fields
    /// included, with `None`), for attribution.
    pub fn fields(&self) -> impl Iterator<Item = (&str, Option<&Value>, &Stamp)> {
        self.fields
            .iter()
            .map(|(k, reg)| (k.as_str(), reg.val.as_ref(), &reg.marker))
    }

    /// The last PUT/DELETE and its stamp.
    pub fn base(&self) -> (Base, &Stamp) {
        (self.base.val, &self.base.marker)
    }

    /// The node the record is attributed to (for the `origin` dimension of
    /// aggregates): the writer of its last PUT, else of its oldest field.
    pub fn origin(&self) -> Option<&NodeId> {
        if self.base.val == Base::Put {
            return Some(&self.base.marker.origin);
        }
        self.fields
            .values()
            .map(|r| &r.marker)
            .min()
            .map(|s| &s.origin)
    }

    /// Every stamp this state holds (base first, if set).
    pub fn stamps(&self) -> impl Iterator<Item = &Stamp> {
        let base = (self.base.val != Base::Empty).then_some(&self.base.marker);
        base.into_iter()
            .chain(self.fields.values().map(|r| &r.marker))
    }

    /// See [`Item::restamp`].
    fn restamp(&mut self, clock: &mut HlcClock, now_ms: u64, above: Hlc, own: &NodeId) -> bool {
        let movable = |s: &Stamp| s.origin == *own && s.hlc > above;
        let kept = self.stamps().filter(|s| !movable(s)).max().cloned();
        let old: BTreeSet<Stamp> = self
            .stamps()
            .filter(|s| movable(s) && kept.as_ref().is_none_or(|k| *s > k))
            .cloned()
            .collect();
        if old.is_empty() {
            return false;
        }
        if let Some(k) = &kept {
            clock.observe(k.hlc);
        }
        let new: BTreeMap<Stamp, Stamp> =
            old.into_iter().map(|s| (s, clock.tick(now_ms))).collect();
        let markers = std::iter::once(&mut self.base.marker)
            .chain(self.fields.values_mut().map(|r| &mut r.marker));
        for m in markers {
            if let Some(n) = new.get(m) {
                *m = n.clone();
            }
        }
        true
    }

    /// Drops every register whose stamp `keep` refuses (the base becomes
    /// empty if it was one of them); returns how many were dropped.
    /// The rest is the state of the kept writes alone: merging it with the
    /// dropped writes' own replicas gives back the whole state.
    pub fn retain_stamps(&mut self, keep: impl Fn(&Stamp) -> bool) -> usize {
        let mut dropped = 0;
        if self.base.val != Base::Empty && !keep(&self.base.marker) {
            self.base = Record::default().base;
            dropped += 1;
        }
        let before = self.fields.len();
        self.fields.retain(|_, r| keep(&r.marker));
        dropped + before - self.fields.len()
    }
}

/// An immutable entry of a `log` category (a bill line, a payment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The entry's content.
    pub fields: BTreeMap<String, Value>,
    /// When and where it was appended.
    pub stamp: Stamp,
}

impl LogEntry {
    /// Merges a replica of the same key. Equal entries are a no-op; different
    /// content under one key is a conflict, won by the higher stamp (then the
    /// larger content), everywhere alike.
    pub fn merge(&mut self, other: &LogEntry) -> MergeOutcome {
        if self == other {
            return MergeOutcome::default();
        }
        let conflict = self.fields != other.fields;
        let other_wins = (&other.stamp, &other.fields) > (&self.stamp, &self.fields);
        if other_wins {
            *self = other.clone();
        }
        MergeOutcome {
            changed: other_wins,
            conflict,
        }
    }
}

/// An item of any category, as stored and as sent upward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    /// A `record` category document.
    Record(Record),
    /// A `log` category entry.
    Log(LogEntry),
    /// Aggregate counters of a private category (see [`crate::aggregate`]).
    Counters(crate::aggregate::Counters),
}

impl Item {
    fn rank(&self) -> u8 {
        match self {
            Item::Record(_) => 0,
            Item::Log(_) => 1,
            Item::Counters(_) => 2,
        }
    }

    /// Merges `other` into `self`. Items of different kinds under one key
    /// (only a policy change or a forged frame can do that) are a conflict
    /// that the higher-ranked kind wins: ranking the kinds keeps the merge a
    /// join, so it stays associative.
    pub fn merge(&mut self, other: &Item) -> MergeOutcome {
        match (&mut *self, other) {
            (Item::Record(a), Item::Record(b)) => a.merge(b),
            (Item::Log(a), Item::Log(b)) => a.merge(b),
            (Item::Counters(a), Item::Counters(b)) => a.merge(b),
            (mine, theirs) => {
                let theirs_wins = theirs.rank() > mine.rank();
                if theirs_wins {
                    *mine = theirs.clone();
                }
                MergeOutcome {
                    changed: theirs_wins,
                    conflict: true,
                }
            }
        }
    }

    /// The newest stamp in the item.
    pub fn max_stamp(&self) -> Option<&Stamp> {
        match self {
            Item::Record(r) => r.stamps().max(),
            Item::Log(l) => Some(&l.stamp),
            Item::Counters(_) => None,
        }
    }

    /// Every stamp the item holds.
    pub fn stamps(&self) -> Vec<&Stamp> {
        match self {
            Item::Record(r) => r.stamps().collect(),
            Item::Log(l) => vec![&l.stamp],
            Item::Counters(_) => Vec::new(),
        }
    }

    /// Drops the writes whose stamps `keep` refuses (the counter shares of
    /// the actors `keep_actor` refuses); returns how many writes (registers,
    /// entries, actors) were dropped and `None` for the item when nothing is
    /// left of it.
    pub fn retain_writes(
        self,
        keep: impl Fn(&Stamp) -> bool,
        keep_actor: impl Fn(&NodeId) -> bool,
    ) -> (Option<Item>, usize) {
        match self {
            Item::Record(mut r) => {
                let n = r.retain_stamps(keep);
                let empty = r.stamps().next().is_none();
                ((!empty).then_some(Item::Record(r)), n)
            }
            Item::Log(l) if keep(&l.stamp) => (Some(Item::Log(l)), 0),
            Item::Log(_) => (None, 1),
            Item::Counters(mut c) => {
                let n = c.retain_actors(keep_actor);
                let empty = c.actors().is_empty();
                ((!empty).then_some(Item::Counters(c)), n)
            }
        }
    }

    /// Whether the item is a deleted record.
    pub fn is_deleted(&self) -> bool {
        matches!(self, Item::Record(r) if r.is_deleted())
    }

    /// Gives the clock's own writes in this item stamped after `above` new
    /// stamps from `clock` at wall time `now_ms`; returns whether anything
    /// changed. Used after a clock jump ahead, for writes no other node
    /// holds yet, so that they stop overruling what others write later.
    ///
    /// Order is kept: the new stamps follow one another as the old ones
    /// did, and come after every stamp the item keeps (the clock observes
    /// the highest first), so what was visible stays visible and a PUT's
    /// fields keep their base's stamp. Own stamps that another origin's
    /// kept stamp outranks are left as they are (re-stamping them above it
    /// would change who wins).
    pub fn restamp(&mut self, clock: &mut HlcClock, now_ms: u64, above: Hlc) -> bool {
        let own = clock.node().clone();
        match self {
            Item::Record(r) => r.restamp(clock, now_ms, above, &own),
            Item::Log(l) if l.stamp.origin == own && l.stamp.hlc > above => {
                l.stamp = clock.tick(now_ms);
                true
            }
            Item::Log(_) => false,
            Item::Counters(c) => match c.shares.get_mut(&own) {
                Some(share) if share.version > above => {
                    share.version = clock.tick(now_ms).hlc;
                    true
                }
                _ => false,
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn stamp(ms: u64, node: &str) -> Stamp {
        Stamp {
            hlc: Hlc {
                physical_ms: ms,
                logical: 0,
            },
            origin: NodeId::new(node).unwrap(),
        }
    }

    fn doc(pairs: &[(&str, i64)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::Int(*v)))
            .collect()
    }

    fn own_clock(node: &str) -> HlcClock {
        HlcClock::new(NodeId::new(node).unwrap())
    }

    /// Every HLC of millisecond `ms` is at or below it.
    fn at(ms: u64) -> Hlc {
        Hlc {
            physical_ms: ms,
            logical: u32::MAX,
        }
    }

    #[test]
    fn restamp_brings_own_future_writes_to_now_in_order() {
        const HOUR: u64 = 3_600_000;
        let mut r = Record::default();
        r.patch(
            [("old".to_string(), Some(Value::Int(0)))].into(),
            stamp(500, "nb"),
        );
        r.put(doc(&[("a", 1), ("b", 2)]), stamp(HOUR, "hz"));
        r.patch(
            [("c".to_string(), Some(Value::Int(3)))].into(),
            stamp(HOUR + 1, "hz"),
        );
        let before: Vec<(String, Value)> = r
            .document()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let mut item = Item::Record(r);
        let mut clock = own_clock("hz");
        assert!(item.restamp(&mut clock, 1_000, at(1_000)));
        let Item::Record(r) = &item else { panic!() };
        let after: Vec<(String, Value)> = r
            .document()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        assert_eq!(before, after, "values and visibility do not change");
        assert!(r.stamps().all(|s| s.hlc.physical_ms <= 1_000), "{r:?}");
        let (_, base) = r.base();
        let stamp_of = |f: &str| {
            r.fields()
                .find(|(k, _, _)| *k == f)
                .map(|(_, _, s)| s.clone())
        };
        assert_eq!(
            stamp_of("a").as_ref(),
            Some(base),
            "a PUT's fields keep its stamp"
        );
        assert!(
            stamp_of("c").unwrap() > *base,
            "the later patch stays later"
        );
        // Idempotent: nothing is left to move.
        assert!(!item.restamp(&mut clock, 1_000, at(1_000)));
    }

    #[test]
    fn restamp_leaves_what_another_origin_outranks_and_others_writes() {
        let mut r = Record::default();
        r.patch(
            [("f".to_string(), Some(Value::Int(1)))].into(),
            stamp(9_000, "hz"),
        );
        r.patch(
            [("g".to_string(), Some(Value::Int(2)))].into(),
            stamp(9_500, "nb"),
        );
        let mut item = Item::Record(r.clone());
        assert!(!item.restamp(&mut own_clock("hz"), 1_000, at(1_000)));
        assert_eq!(item, Item::Record(r));
        let mut log = Item::Log(LogEntry {
            fields: doc(&[("amount", 5)]),
            stamp: stamp(9_000, "nb"),
        });
        assert!(!log.restamp(&mut own_clock("hz"), 1_000, at(1_000)));
        let mut own_log = Item::Log(LogEntry {
            fields: doc(&[("amount", 5)]),
            stamp: stamp(9_000, "hz"),
        });
        assert!(own_log.restamp(&mut own_clock("hz"), 1_000, at(1_000)));
        assert_eq!(own_log.max_stamp().unwrap().hlc.physical_ms, 1_000);
    }

    #[test]
    fn put_replaces_the_document() {
        let mut r = Record::default();
        r.put(doc(&[("a", 1), ("b", 2)]), stamp(1, "x"));
        r.put(doc(&[("a", 3)]), stamp(2, "x"));
        assert_eq!(
            r.document().into_iter().collect::<Vec<_>>(),
            vec![("a", &Value::Int(3))]
        );
    }

    #[test]
    fn patch_merges_and_none_removes() {
        let mut r = Record::default();
        r.put(doc(&[("a", 1), ("b", 2)]), stamp(1, "x"));
        let mut p = BTreeMap::new();
        p.insert("b".to_string(), None);
        p.insert("c".to_string(), Some(Value::Int(9)));
        r.patch(p, stamp(2, "x"));
        let d = r.document();
        assert_eq!(d.len(), 2);
        assert_eq!(d["a"], &Value::Int(1));
        assert_eq!(d["c"], &Value::Int(9));
    }

    #[test]
    fn delete_then_patch_starts_a_new_document() {
        let mut r = Record::default();
        r.put(doc(&[("a", 1)]), stamp(1, "x"));
        r.delete(stamp(2, "x"));
        assert!(r.is_deleted());
        assert!(r.document().is_empty());
        let mut p = BTreeMap::new();
        p.insert("z".to_string(), Some(Value::Int(1)));
        r.patch(p, stamp(3, "x"));
        assert!(!r.is_deleted());
        assert_eq!(r.document().len(), 1);
    }

    #[test]
    fn removing_fields_of_a_deleted_record_keeps_it_deleted() {
        let mut r = Record::default();
        r.put(doc(&[("a", 1)]), stamp(1, "x"));
        r.delete(stamp(2, "x"));
        r.patch(BTreeMap::from([("a".to_string(), None)]), stamp(3, "x"));
        assert!(r.is_deleted(), "a removal alone brings nothing back");
        // Nor on a key never written.
        let mut fresh = Record::default();
        fresh.patch(BTreeMap::from([("a".to_string(), None)]), stamp(1, "x"));
        assert!(fresh.is_deleted());
    }

    #[test]
    fn overwrites_by_another_origin_are_observed_once() {
        let seg = |v: &str| BTreeMap::from([("seg".to_string(), Some(Value::Str(v.into())))]);
        let mut a = Record::default();
        a.patch(seg("gold"), stamp(10, "city-a"));
        let mut b = Record::default();
        b.patch(seg("silver"), stamp(11, "city-b"));
        let mut seen = Vec::new();
        let mut at_parent = a.clone();
        let mut observe = |r: &mut Record, other: &Record| {
            r.merge_observing(other, |f, l, w| {
                seen.push((f.to_string(), l.origin.to_string(), w.origin.to_string()))
            })
        };
        assert!(observe(&mut at_parent, &b).changed);
        // Re-delivery replaces nothing; the older value arriving late loses
        // without replacing anything.
        observe(&mut at_parent, &b);
        observe(&mut at_parent, &a);
        // The same origin rewriting its own field, or another origin
        // writing the same value, is no overwrite.
        let mut own = Record::default();
        own.patch(seg("gold"), stamp(12, "city-a"));
        let mut same = at_parent.clone();
        let mut c = Record::default();
        c.patch(seg("silver"), stamp(13, "city-c"));
        observe(&mut same, &c);
        let mut own_base = a.clone();
        observe(&mut own_base, &own);
        assert_eq!(
            seen,
            vec![(
                "seg".to_string(),
                "city-a".to_string(),
                "city-b".to_string()
            )]
        );
    }

    #[test]
    fn concurrent_patch_newer_than_put_survives() {
        let mut a = Record::default();
        a.put(doc(&[("a", 1)]), stamp(10, "city-a"));
        let mut b = Record::default();
        let mut p = BTreeMap::new();
        p.insert("seg".to_string(), Some(Value::Str("gold".into())));
        b.patch(p.clone(), stamp(11, "city-b"));
        let mut old = Record::default();
        old.patch(p, stamp(9, "city-b"));
        a.merge(&b);
        assert_eq!(a.document().len(), 2);
        let before = a.clone();
        let out = a.merge(&old);
        assert!(!out.changed);
        assert_eq!(a, before);
    }

    #[test]
    fn log_conflicts_are_reported_and_resolved_by_stamp() {
        let mut a = LogEntry {
            fields: doc(&[("amount", 5)]),
            stamp: stamp(1, "a"),
        };
        let b = LogEntry {
            fields: doc(&[("amount", 7)]),
            stamp: stamp(2, "b"),
        };
        let out = a.merge(&b);
        assert!(out.changed && out.conflict);
        assert_eq!(a, b);
        assert_eq!(a.merge(&b), MergeOutcome::default());
    }

    #[test]
    fn reused_stamp_with_other_value_resolves_the_same_both_ways() {
        let s = stamp(5, "x");
        let mut a = Record::default();
        a.put(doc(&[("a", 1)]), s.clone());
        let mut b = Record::default();
        b.put(doc(&[("a", 2)]), s);
        let mut ab = a.clone();
        assert!(ab.merge(&b).conflict);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
    }

    // ---- property tests: the CRDT laws ----

    pub fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            (-3i64..3).prop_map(Value::Int),
            (-2.0f64..2.0).prop_map(Value::Float),
            "[ab]{0,2}".prop_map(Value::Str),
        ]
    }

    fn arb_stamp() -> impl Strategy<Value = Stamp> {
        // Few distinct times and nodes so collisions and ties are common.
        (
            0u64..6,
            0u32..2,
            prop_oneof![Just("a"), Just("b"), Just("c")],
        )
            .prop_map(|(ms, logical, n)| Stamp {
                hlc: Hlc {
                    physical_ms: ms,
                    logical,
                },
                origin: NodeId::new(n).unwrap(),
            })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(BTreeMap<String, Value>),
        Patch(BTreeMap<String, Option<Value>>),
        Delete,
    }

    fn arb_field() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("f1".to_string()),
            Just("f2".to_string()),
            Just("f3".to_string())
        ]
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            proptest::collection::btree_map(arb_field(), arb_value(), 0..3).prop_map(Op::Put),
            proptest::collection::btree_map(arb_field(), proptest::option::of(arb_value()), 0..3)
                .prop_map(Op::Patch),
            Just(Op::Delete),
        ]
    }

    pub fn arb_record() -> impl Strategy<Value = Record> {
        proptest::collection::vec((arb_op(), arb_stamp()), 0..5).prop_map(|ops| {
            let mut r = Record::default();
            for (op, s) in ops {
                match op {
                    Op::Put(d) => r.put(d, s),
                    Op::Patch(p) => r.patch(p, s),
                    Op::Delete => r.delete(s),
                };
            }
            r
        })
    }

    pub fn arb_log() -> impl Strategy<Value = LogEntry> {
        (
            proptest::collection::btree_map(arb_field(), arb_value(), 0..3),
            arb_stamp(),
        )
            .prop_map(|(fields, stamp)| LogEntry { fields, stamp })
    }

    pub fn arb_item() -> impl Strategy<Value = Item> {
        prop_oneof![
            arb_record().prop_map(Item::Record),
            arb_log().prop_map(Item::Log)
        ]
    }

    fn merged(a: &Item, b: &Item) -> Item {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn record_merge_is_commutative(a in arb_record(), b in arb_record()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn record_merge_is_associative(a in arb_record(), b in arb_record(), c in arb_record()) {
            let mut ab_c = a.clone(); ab_c.merge(&b); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(ab_c, a_bc);
        }

        #[test]
        fn record_merge_is_idempotent(a in arb_record(), b in arb_record()) {
            let mut aa = a.clone();
            prop_assert!(!aa.merge(&a).changed);
            prop_assert_eq!(&aa, &a);
            let mut ab = a.clone(); ab.merge(&b);
            let once = ab.clone();
            prop_assert!(!ab.merge(&b).changed);
            prop_assert_eq!(ab, once);
        }

        #[test]
        fn log_merge_laws(a in arb_log(), b in arb_log(), c in arb_log()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(ab_c, a_bc);
            let mut aa = a.clone();
            prop_assert!(!aa.merge(&a).changed);
        }

        #[test]
        fn item_merge_laws(a in arb_item(), b in arb_item(), c in arb_item()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
        }

        #[test]
        fn merge_reports_change_truthfully(a in arb_item(), b in arb_item()) {
            let mut m = a.clone();
            let out = m.merge(&b);
            prop_assert_eq!(out.changed, m != a);
        }
    }
}
