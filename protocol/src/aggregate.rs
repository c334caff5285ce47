//! Aggregates: grouped counts and sums declared in the policy.
//!
//! Pure functions only: what an item contributes to an aggregate (its group
//! and measure values), and the [`Counters`] CRDT that carries the totals of
//! a private (`local`) category upward — the only thing of a private category
//! that ever leaves its city. The node keeps the totals incrementally, in the
//! same WriteBatch as the data they follow.
//!
//! Sums are fixed-point integers ([`SCALE`] = 10^6 units per 1), so adding and
//! removing contributions in any order is exact.

use std::collections::BTreeMap;

use crate::clock::Hlc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::NodeId;
use crate::item::{Item, MergeOutcome};
use crate::policy::{AggregateDef, Dimension, Measure, Policy, TimeBucket};
use crate::value::Value;

/// The reserved category that holds the counters of `local`-category
/// aggregates. Category names starting with `_` are reserved.
pub const COUNTERS_CATEGORY: &str = "_agg";

/// Fixed-point scale of sums: one unit is 10^-6.
pub const SCALE: i128 = 1_000_000;

/// Largest magnitude of a value that a `sum` adds up (10^15, a
/// quadrillion): a write or a received item with a summed value beyond it
/// is refused. Bounding each value keeps every total exact: a city would
/// need 10^10 such items before its share nears [`MAX_SHARE`].
pub const MAX_SUMMED: i128 = 1_000_000_000_000_000;

/// Largest magnitude of one city's share of a group, in fixed point (about
/// 10^31): the totals of up to 2^24 cities' shares always fit `i128`, so a
/// query's sum cannot overflow.
pub const MAX_SHARE: i128 = i128::MAX >> 24;

/// A group: one value per dimension (`None` when the item has none).
pub type GroupKey = Vec<Option<String>>;

/// An aggregate definition, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Its name.
    pub name: String,
    /// The source category.
    pub source: String,
    /// The group-by dimensions.
    pub dims: Vec<Dimension>,
    /// The dimensions as written in the policy (column names).
    pub dim_names: Vec<String>,
    /// The measures.
    pub measures: Vec<Measure>,
    /// The measures as written in the policy (column names).
    pub measure_names: Vec<String>,
    /// Short digest of the definition: state built for another definition
    /// of the same name is never mixed in.
    pub digest: String,
}

impl Compiled {
    /// Parses a (validated) definition.
    pub fn new(name: &str, def: &AggregateDef) -> Result<Self, String> {
        let dims = def
            .group_by
            .iter()
            .map(|d| Dimension::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        let measures = def
            .measures
            .iter()
            .map(|m| Measure::parse(m))
            .collect::<Result<Vec<_>, _>>()?;
        let mut h = Sha256::new();
        h.update(def.source.as_bytes());
        for d in &def.group_by {
            h.update([0]);
            h.update(d.trim().as_bytes());
        }
        h.update([1]);
        for m in &def.measures {
            h.update([0]);
            h.update(m.trim().as_bytes());
        }
        let digest = hex::encode(&h.finalize()[..6]);
        Ok(Self {
            name: name.to_string(),
            source: def.source.clone(),
            dims,
            dim_names: def.group_by.iter().map(|d| d.trim().to_string()).collect(),
            measures,
            measure_names: def.measures.iter().map(|m| m.trim().to_string()).collect(),
            digest,
        })
    }

    /// Every aggregate of a policy, in name order.
    pub fn all(policy: &Policy) -> Vec<Compiled> {
        policy
            .aggregates
            .iter()
            .filter_map(|(n, d)| Compiled::new(n, d).ok())
            .collect()
    }

    /// What `item` contributes: its group and one value per measure (count
    /// 1; sums in fixed point). `None` for a deleted record; an error when a
    /// summed value is beyond [`MAX_SUMMED`] (such an item is refused, never
    /// counted saturated).
    pub fn contribution(&self, item: &Item) -> Result<Option<(GroupKey, Vec<i128>)>, Overflow> {
        let (doc, origin): (BTreeMap<&str, &Value>, &NodeId) = match item {
            Item::Record(r) if r.is_deleted() => return Ok(None),
            Item::Record(r) => match r.origin() {
                Some(o) => (r.document(), o),
                None => return Ok(None),
            },
            Item::Log(l) => (
                l.fields.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                &l.stamp.origin,
            ),
            Item::Counters(_) => return Ok(None),
        };
        let group = self
            .dims
            .iter()
            .map(|d| match d {
                Dimension::Origin => Some(origin.to_string()),
                Dimension::Field(f) => doc.get(f.as_str()).map(|v| render(v)),
                Dimension::Bucket(b, f) => doc.get(f.as_str()).and_then(|v| bucket(*b, v)),
            })
            .collect();
        let values = self
            .measures
            .iter()
            .map(|m| match m {
                Measure::Count => Ok(1),
                Measure::Sum(f) => doc.get(f.as_str()).map_or(Ok(0), |v| {
                    fixed(v).ok_or_else(|| Overflow {
                        aggregate: self.name.clone(),
                        detail: format!(
                            "field {f:?} is beyond the largest summed value (±{MAX_SUMMED})"
                        ),
                    })
                }),
            })
            .collect::<Result<Vec<i128>, Overflow>>()?;
        Ok(Some((group, values)))
    }

    /// The key of the counters item of `group` in [`COUNTERS_CATEGORY`].
    pub fn counters_key(&self, group: &GroupKey) -> String {
        let mut h = Sha256::new();
        for g in group {
            match g {
                Some(s) => {
                    h.update([1]);
                    h.update((s.len() as u64).to_be_bytes());
                    h.update(s.as_bytes());
                }
                None => h.update([0]),
            }
        }
        format!(
            "{}/{}/{}",
            self.name,
            self.digest,
            hex::encode(&h.finalize()[..12])
        )
    }

    /// Which measure is the `count` (the one the privacy threshold judges).
    pub fn count_index(&self) -> Option<usize> {
        self.measures.iter().position(|m| *m == Measure::Count)
    }

    /// The key prefix of this definition's counters items.
    pub fn counters_prefix(&self) -> String {
        format!("{}/{}/", self.name, self.digest)
    }
}

/// A value as a group label.
fn render(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) | Value::Json(s) => s.clone(),
    }
}

/// A date/time bucket: from text (`YYYY-MM-DD…`, the ISO 8601 prefix is
/// used) or from an integer of Unix milliseconds.
fn bucket(b: TimeBucket, v: &Value) -> Option<String> {
    let text = match v {
        Value::Str(s) => s.clone(),
        Value::Int(ms) => civil_date(*ms),
        _ => return None,
    };
    let len = match b {
        TimeBucket::Year => 4,
        TimeBucket::Month => 7,
        TimeBucket::Day => 10,
    };
    let head = text.get(..len)?;
    let ok = head.char_indices().all(|(i, c)| {
        if i == 4 || i == 7 {
            c == '-'
        } else {
            c.is_ascii_digit()
        }
    });
    ok.then(|| head.to_string())
}

/// `YYYY-MM-DD` of Unix milliseconds (proleptic Gregorian, UTC).
fn civil_date(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

/// A numeric value in fixed point (non-numbers count as 0); `None` beyond
/// [`MAX_SUMMED`], where a float's conversion would lose the value (and,
/// far enough, saturate).
pub fn fixed(v: &Value) -> Option<i128> {
    let units = match v {
        Value::Int(i) => i128::from(*i).checked_mul(SCALE)?,
        Value::Float(f) if f.is_finite() => {
            if f.abs() > MAX_SUMMED as f64 {
                return None;
            }
            (f * SCALE as f64).round() as i128
        }
        _ => 0,
    };
    (units.unsigned_abs() <= (MAX_SUMMED * SCALE).unsigned_abs()).then_some(units)
}

/// The per-group totals of a `local`-category aggregate: each city's own
/// totals (one value per measure, sums in fixed point) as a last-writer-wins
/// register versioned by the city's HLC. Merging keeps, per city, the newer
/// share, so totals from every city in a subtree add up exactly once, and a
/// city that was wiped (or restored) and starts over replaces its old
/// totals instead of mixing with them, as a grow-only counter would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The aggregate's name.
    pub aggregate: String,
    /// The group.
    pub group: GroupKey,
    /// How many measures each share holds.
    pub measures: usize,
    /// Each city's share.
    pub shares: BTreeMap<NodeId, Share>,
}

/// One city's totals of one group and when it last changed them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Share {
    /// When the city last changed its totals (its HLC).
    pub version: Hlc,
    /// The incarnation of the city's data it counts. A node counts only
    /// the shares of each city's current incarnation (the one its
    /// watermark names), so the groups a wiped or moved city no longer
    /// writes stop counting everywhere.
    pub incarnation: u64,
    /// One total per measure.
    pub values: Vec<i128>,
}

/// An aggregate total would leave the range of `i128` fixed point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("aggregate {aggregate}: {detail}")]
pub struct Overflow {
    /// The aggregate.
    pub aggregate: String,
    /// Which value or total, and its bound.
    pub detail: String,
}

impl Overflow {
    /// A city's share of a group would leave ±[`MAX_SHARE`].
    pub fn share(aggregate: &str) -> Self {
        Self {
            aggregate: aggregate.to_string(),
            detail: format!("a city's total would be beyond ±{MAX_SHARE} in fixed point"),
        }
    }
}

impl Counters {
    /// Zero counters for `group`.
    pub fn new(aggregate: &str, group: GroupKey, measures: usize) -> Self {
        Self {
            aggregate: aggregate.to_string(),
            group,
            measures,
            shares: BTreeMap::new(),
        }
    }

    /// Adds `delta` (one value per measure) to `actor`'s share of its
    /// `incarnation`, as changed at `version`. Refuses (changing nothing) a
    /// total that would overflow.
    pub fn add(
        &mut self,
        actor: &NodeId,
        delta: &[i128],
        version: Hlc,
        incarnation: u64,
    ) -> Result<(), Overflow> {
        let cur = self.value_of(actor);
        let values = cur
            .iter()
            .zip(delta.iter().chain(std::iter::repeat(&0)))
            .map(|(a, d)| {
                a.checked_add(*d)
                    .filter(|t| t.unsigned_abs() <= MAX_SHARE.unsigned_abs())
            })
            .collect::<Option<Vec<i128>>>()
            .ok_or_else(|| Overflow::share(&self.aggregate))?;
        self.set(actor, values, version, incarnation);
        Ok(())
    }

    /// Sets `actor`'s share of its `incarnation` to `values`, as changed at
    /// `version`, or just after the share's current version if that is
    /// later: replicas keep the share with the highest version, so a new
    /// total must always outrank the one it replaces (even after the
    /// actor's clock recovered from a jump ahead).
    pub fn set(&mut self, actor: &NodeId, values: Vec<i128>, version: Hlc, incarnation: u64) {
        let version = self
            .shares
            .get(actor)
            .map_or(version, |s| version.max(s.version.successor()));
        self.shares.insert(
            actor.clone(),
            Share {
                version,
                incarnation,
                values,
            },
        );
    }

    /// Drops the shares of every actor `keep` refuses; returns how many
    /// actors were dropped.
    pub fn retain_actors(&mut self, keep: impl Fn(&NodeId) -> bool) -> usize {
        let before = self.shares.len();
        self.shares.retain(|a, _| keep(a));
        before - self.shares.len()
    }

    /// Every actor that contributed.
    pub fn actors(&self) -> Vec<NodeId> {
        self.shares.keys().cloned().collect()
    }

    /// `actor`'s own contribution, one value per measure.
    pub fn value_of(&self, actor: &NodeId) -> Vec<i128> {
        let mut v = self
            .shares
            .get(actor)
            .map(|s| s.values.clone())
            .unwrap_or_default();
        v.resize(self.measures, 0);
        v
    }

    /// The totals, one per measure. Every share is within ±[`MAX_SHARE`]
    /// (checked where it is written and where it is received), so up to 2^24
    /// cities' shares add up exactly; the saturation is never reached.
    pub fn values(&self) -> Vec<i128> {
        self.values_where(|_| None)
    }

    /// The totals over the shares of each city's current incarnation:
    /// `current(city)` names it (`None`: unknown, every share counts).
    pub fn values_where(&self, current: impl Fn(&NodeId) -> Option<u64>) -> Vec<i128> {
        let mut out = vec![0i128; self.measures];
        for (actor, s) in &self.shares {
            if current(actor).is_some_and(|inc| inc != s.incarnation) {
                continue;
            }
            for (o, v) in out.iter_mut().zip(&s.values) {
                *o = o.saturating_add(*v);
            }
        }
        out
    }

    /// What `node` publishes of these counters: its own share as it is if
    /// it counts at least `min_group_size` items (measure `count_at`), else
    /// as zeros with the same version, so a published share of the group is
    /// withdrawn everywhere and a small group reveals nothing of its items.
    /// Other nodes' shares (already published by them) pass unchanged.
    pub fn published(&self, node: &NodeId, count_at: usize, min_group_size: u64) -> Counters {
        let mut out = self.clone();
        if let Some(s) = out.shares.get_mut(node)
            && !share_is_public(s, count_at, min_group_size)
        {
            s.values.iter_mut().for_each(|v| *v = 0);
        }
        out
    }

    /// Whether every share is either withdrawn (all zeros) or counts at
    /// least `min_group_size` items: what a node may receive.
    pub fn all_public(&self, count_at: usize, min_group_size: u64) -> bool {
        self.shares.values().all(|s| {
            s.values.iter().all(|v| *v == 0) || share_is_public(s, count_at, min_group_size)
        })
    }

    /// Whether every share fits the definition (one value per measure,
    /// each within ±[`MAX_SHARE`]).
    pub fn well_formed(&self) -> bool {
        self.shares.values().all(|s| {
            s.values.len() == self.measures
                && s.values
                    .iter()
                    .all(|v| v.unsigned_abs() <= MAX_SHARE.unsigned_abs())
        })
    }

    /// Merges another replica: per actor, the newer share (ties, which only
    /// a bug or a forged frame can make, break by value). Counters of
    /// different identity under one key (only a forged frame can do that)
    /// resolve to the larger identity.
    pub fn merge(&mut self, other: &Counters) -> MergeOutcome {
        let same = self.aggregate == other.aggregate
            && self.group == other.group
            && self.measures == other.measures;
        if !same {
            let theirs_wins = (&other.aggregate, &other.group, other.measures)
                > (&self.aggregate, &self.group, self.measures);
            if theirs_wins {
                *self = other.clone();
            }
            return MergeOutcome {
                changed: theirs_wins,
                conflict: true,
            };
        }
        let mut out = MergeOutcome::default();
        for (actor, theirs) in &other.shares {
            match self.shares.get_mut(actor) {
                Some(mine) if *mine >= *theirs => {
                    out.conflict |= mine.version == theirs.version && mine != theirs;
                }
                Some(mine) => {
                    out.conflict |= mine.version == theirs.version;
                    *mine = theirs.clone();
                    out.changed = true;
                }
                None => {
                    self.shares.insert(actor.clone(), theirs.clone());
                    out.changed = true;
                }
            }
        }
        out
    }
}

/// `item` as `node` ships it to its parent: counters through
/// [`Counters::published`] (the node keeps its exact share; what leaves it
/// counts at least the policy's `privacy.min_group_size` items, or is
/// zeros); anything else as it is. `aggs` are the policy's aggregates.
pub fn shipped(aggs: &[Compiled], policy: &Policy, node: &NodeId, item: Item) -> Item {
    let Item::Counters(c) = item else {
        return item;
    };
    let count_at = aggs
        .iter()
        .find(|a| a.name == c.aggregate)
        .and_then(Compiled::count_index);
    match count_at {
        Some(i) => Item::Counters(c.published(node, i, policy.privacy.min_group_size)),
        None => Item::Counters(c),
    }
}

/// Whether a share counts enough items to leave its node.
fn share_is_public(s: &Share, count_at: usize, min_group_size: u64) -> bool {
    s.values
        .get(count_at)
        .is_some_and(|c| *c >= i128::from(min_group_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Hlc, Stamp};
    use crate::item::LogEntry;
    use proptest::prelude::*;

    fn def(group_by: &[&str], measures: &[&str]) -> Compiled {
        Compiled::new(
            "a",
            &AggregateDef {
                source: "billing".into(),
                group_by: group_by.iter().map(|s| s.to_string()).collect(),
                measures: measures.iter().map(|s| s.to_string()).collect(),
                description: String::new(),
            },
        )
        .unwrap()
    }

    fn bill(amount: Value, at: Value) -> Item {
        Item::Log(LogEntry {
            fields: BTreeMap::from([
                ("amount".to_string(), amount),
                ("billed_at".to_string(), at),
            ]),
            stamp: Stamp {
                hlc: Hlc {
                    physical_ms: 1,
                    logical: 0,
                },
                origin: NodeId::new("hangzhou").unwrap(),
            },
        })
    }

    #[test]
    fn groups_and_measures() {
        let d = def(&["origin", "month(billed_at)"], &["count", "sum(amount)"]);
        let (g, v) = d
            .contribution(&bill(Value::Float(12.5), Value::Str("2026-09-01".into())))
            .unwrap()
            .unwrap();
        assert_eq!(g, vec![Some("hangzhou".into()), Some("2026-09".into())]);
        assert_eq!(v, vec![1, 12_500_000]);
        let (g, _) = d
            .contribution(&bill(Value::Int(1), Value::Int(1_790_000_000_000)))
            .unwrap()
            .unwrap();
        assert_eq!(g[1].as_deref(), Some("2026-09"));
        let (g, _) = d
            .contribution(&bill(Value::Int(1), Value::Str("soon".into())))
            .unwrap()
            .unwrap();
        assert_eq!(g[1], None);
    }

    /// Case 8 of issue 15: a summed value beyond MAX_SUMMED (1e33 would
    /// have saturated the float conversion) is an error, never a clamped
    /// or wrapped figure; a share beyond MAX_SHARE is refused by `add` and
    /// is not well formed when received.
    #[test]
    fn out_of_range_values_and_shares_are_refused() {
        let d = def(&["origin"], &["sum(amount)"]);
        for v in [
            Value::Float(1e33),
            Value::Float(-1e16),
            Value::Int(i64::MAX),
            Value::Int(-(MAX_SUMMED as i64) - 1),
        ] {
            let err = d
                .contribution(&bill(v.clone(), Value::Int(0)))
                .expect_err("refused");
            assert!(err.to_string().contains("amount"), "{v:?}: {err}");
        }
        let (_, v) = d
            .contribution(&bill(Value::Int(MAX_SUMMED as i64), Value::Int(0)))
            .unwrap()
            .unwrap();
        assert_eq!(v, vec![MAX_SUMMED * SCALE]);
        // (`overflowing_totals_are_refused`: `add` stops at MAX_SHARE.)
        let mut c = Counters::new("a", vec![Some("hangzhou".into())], 1);
        let city = NodeId::new("hangzhou").unwrap();
        c.set(&city, vec![MAX_SHARE], Hlc::ZERO, 1);
        assert!(c.well_formed());
        c.set(&city, vec![MAX_SHARE + 1], Hlc::ZERO, 1);
        assert!(!c.well_formed());
    }

    /// Case 6 of issue 15: under the threshold a node's own share leaves
    /// as zeros (withdrawing what was published), at it as it is; other
    /// nodes' shares pass unchanged.
    #[test]
    fn small_groups_publish_nothing() {
        let (me, other) = (
            NodeId::new("hangzhou").unwrap(),
            NodeId::new("ningbo").unwrap(),
        );
        let mut c = Counters::new("a", vec![Some("won".into())], 2);
        c.set(&me, vec![3, 300 * SCALE], at(9), 1);
        c.set(&other, vec![7, 700 * SCALE], at(8), 1);
        let p = c.published(&me, 0, 5);
        assert_eq!(p.shares[&me].values, vec![0, 0]);
        assert_eq!(p.shares[&me].version, at(9), "a newer version withdraws");
        assert_eq!(p.shares[&other], c.shares[&other]);
        assert!(p.all_public(0, 5));
        assert!(!c.all_public(0, 5));
        c.set(&me, vec![5, 500 * SCALE], at(10), 1);
        assert_eq!(c.published(&me, 0, 5), c);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(951_782_400_000), "2000-02-29");
        assert_eq!(civil_date(-86_400_000), "1969-12-31");
    }

    #[test]
    fn digest_follows_the_definition() {
        assert_ne!(
            def(&["origin"], &["count"]).digest,
            def(&["origin"], &["count", "sum(amount)"]).digest
        );
        assert_eq!(
            def(&["origin"], &["count"]).digest,
            def(&[" origin "], &["count"]).digest
        );
    }

    fn arb_counters() -> impl Strategy<Value = Counters> {
        proptest::collection::vec((0usize..3, -50i128..50, 0u64..4), 0..8).prop_map(|ops| {
            let mut c = Counters::new("a", vec![Some("g".into())], 2);
            for (actor, d, t) in ops {
                let actor = NodeId::new(["x", "y", "z"][actor]).unwrap();
                let version = Hlc {
                    physical_ms: t,
                    logical: 0,
                };
                c.add(&actor, &[d, -d], version, t % 2).unwrap();
            }
            c
        })
    }

    fn at(ms: u64) -> Hlc {
        Hlc {
            physical_ms: ms,
            logical: 0,
        }
    }

    #[test]
    fn per_actor_values_and_actors() {
        let (x, y) = (NodeId::new("x").unwrap(), NodeId::new("y").unwrap());
        let mut c = Counters::new("a", vec![None], 2);
        c.add(&x, &[5, 7], at(1), 1).unwrap();
        c.add(&x, &[-2, 0], at(2), 1).unwrap();
        c.add(&y, &[1, -3], at(1), 1).unwrap();
        assert_eq!(c.value_of(&x), vec![3, 7]);
        assert_eq!(c.value_of(&y), vec![1, -3]);
        assert_eq!(c.values(), vec![4, 4]);
        assert_eq!(c.actors(), vec![x, y]);
    }

    /// A city that starts over (wiped) replaces its old totals everywhere:
    /// its new share is newer.
    #[test]
    fn a_newer_share_replaces_an_older_one() {
        let x = NodeId::new("x").unwrap();
        let mut old = Counters::new("a", vec![None], 1);
        old.add(&x, &[100], at(5), 1).unwrap();
        let mut fresh = Counters::new("a", vec![None], 1);
        fresh.add(&x, &[3], at(9), 2).unwrap();
        let mut parent = old.clone();
        assert!(parent.merge(&fresh).changed);
        assert_eq!(parent.values(), vec![3]);
        assert!(
            !parent.merge(&old).changed,
            "the old share never comes back"
        );
        assert_eq!(parent.values(), vec![3]);
        // A group the city no longer writes keeps its old incarnation's
        // share, which stops counting once the city's new incarnation is
        // known.
        assert_eq!(old.values_where(|_| Some(2)), vec![0]);
        assert_eq!(old.values_where(|_| Some(1)), vec![100]);
    }

    #[test]
    fn overflowing_totals_are_refused() {
        let x = NodeId::new("x").unwrap();
        let mut c = Counters::new("a", vec![None], 1);
        c.add(&x, &[MAX_SHARE - 1], at(1), 1).unwrap();
        let before = c.clone();
        assert!(c.add(&x, &[2], at(2), 1).is_err());
        assert_eq!(c, before, "nothing changed");
    }

    proptest! {
        #[test]
        fn counters_merge_laws(a in arb_counters(), b in arb_counters(), c in arb_counters()) {
            let m = |x: &Counters, y: &Counters| { let mut z = x.clone(); z.merge(y); z };
            prop_assert_eq!(m(&a, &b), m(&b, &a));
            prop_assert_eq!(m(&m(&a, &b), &c), m(&a, &m(&b, &c)));
            prop_assert_eq!(m(&a, &a), a.clone());
        }
    }
}
