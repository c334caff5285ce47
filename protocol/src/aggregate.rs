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

use crdts::{CmRDT, CvRDT, PNCounter};
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
    /// 1; sums in fixed point). `None` for a deleted record.
    pub fn contribution(&self, item: &Item) -> Option<(GroupKey, Vec<i128>)> {
        let (doc, origin): (BTreeMap<&str, &Value>, &NodeId) = match item {
            Item::Record(r) if r.is_deleted() => return None,
            Item::Record(r) => (r.document(), r.origin()?),
            Item::Log(l) => (
                l.fields.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                &l.stamp.origin,
            ),
            Item::Counters(_) => return None,
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
                Measure::Count => 1,
                Measure::Sum(f) => doc.get(f.as_str()).map_or(0, |v| fixed(v)),
            })
            .collect();
        Some((group, values))
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

/// A numeric value in fixed point (non-numbers count as 0).
pub fn fixed(v: &Value) -> i128 {
    match v {
        Value::Int(i) => i128::from(*i) * SCALE,
        Value::Float(f) if f.is_finite() => (f * SCALE as f64).round() as i128,
        _ => 0,
    }
}

/// The per-group totals of a `local`-category aggregate, one PN-counter per
/// measure with each city as its own actor. Merging is the counters' merge,
/// so totals from every city in a subtree add up exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The aggregate's name.
    pub aggregate: String,
    /// The group.
    pub group: GroupKey,
    /// One counter per measure, in fixed point for sums.
    pub measures: Vec<PNCounter<NodeId>>,
}

impl Counters {
    /// Zero counters for `group`.
    pub fn new(aggregate: &str, group: GroupKey, measures: usize) -> Self {
        Self {
            aggregate: aggregate.to_string(),
            group,
            measures: vec![PNCounter::new(); measures],
        }
    }

    /// Adds `delta` (one value per measure) as `actor`.
    pub fn add(&mut self, actor: &NodeId, delta: &[i128]) {
        for (c, d) in self.measures.iter_mut().zip(delta) {
            let steps = u64::try_from(d.unsigned_abs()).unwrap_or(u64::MAX);
            if *d > 0 {
                let op = c.inc_many(actor.clone(), steps);
                c.apply(op);
            } else if *d < 0 {
                let op = c.dec_many(actor.clone(), steps);
                c.apply(op);
            }
        }
    }

    /// Each actor's increments and decrements of one counter. `PNCounter`
    /// keeps them private; its encoding is the two version vectors in order,
    /// which the codec reads back positionally.
    fn dots(c: &PNCounter<NodeId>) -> (BTreeMap<NodeId, u64>, BTreeMap<NodeId, u64>) {
        crate::codec::encode_stored(c)
            .ok()
            .and_then(|b| crate::codec::decode_stored(&b).ok())
            .unwrap_or_default()
    }

    /// Drops the contributions of every actor `keep` refuses; returns how
    /// many actors were dropped.
    pub fn retain_actors(&mut self, keep: impl Fn(&NodeId) -> bool) -> usize {
        let gone: Vec<NodeId> = self.actors().into_iter().filter(|a| !keep(a)).collect();
        if gone.is_empty() {
            return 0;
        }
        for c in &mut self.measures {
            let (p, n) = Self::dots(c);
            let mut kept = PNCounter::new();
            for (actor, steps) in p.into_iter().filter(|(a, _)| keep(a)) {
                let op = kept.inc_many(actor, steps);
                kept.apply(op);
            }
            for (actor, steps) in n.into_iter().filter(|(a, _)| keep(a)) {
                let op = kept.dec_many(actor, steps);
                kept.apply(op);
            }
            *c = kept;
        }
        gone.len()
    }

    /// Every actor that contributed.
    pub fn actors(&self) -> Vec<NodeId> {
        let mut out = std::collections::BTreeSet::new();
        for c in &self.measures {
            let (p, n) = Self::dots(c);
            out.extend(p.into_keys());
            out.extend(n.into_keys());
        }
        out.into_iter().collect()
    }

    /// `actor`'s own contribution, one value per measure.
    pub fn value_of(&self, actor: &NodeId) -> Vec<i128> {
        self.measures
            .iter()
            .map(|c| {
                let (p, n) = Self::dots(c);
                i128::from(p.get(actor).copied().unwrap_or(0))
                    - i128::from(n.get(actor).copied().unwrap_or(0))
            })
            .collect()
    }

    /// The totals, one per measure.
    pub fn values(&self) -> Vec<i128> {
        self.measures
            .iter()
            .map(|c| c.read().to_string().parse().unwrap_or(0))
            .collect()
    }

    /// Merges another replica. Counters of different identity under one key
    /// (only a forged frame can do that) resolve to the larger identity.
    pub fn merge(&mut self, other: &Counters) -> MergeOutcome {
        let same = self.aggregate == other.aggregate
            && self.group == other.group
            && self.measures.len() == other.measures.len();
        if !same {
            let theirs_wins = (&other.aggregate, &other.group, other.measures.len())
                > (&self.aggregate, &self.group, self.measures.len());
            if theirs_wins {
                *self = other.clone();
            }
            return MergeOutcome {
                changed: theirs_wins,
                conflict: true,
            };
        }
        let before = self.clone();
        for (mine, theirs) in self.measures.iter_mut().zip(&other.measures) {
            mine.merge(theirs.clone());
        }
        MergeOutcome {
            changed: *self != before,
            conflict: false,
        }
    }
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
            .unwrap();
        assert_eq!(g, vec![Some("hangzhou".into()), Some("2026-09".into())]);
        assert_eq!(v, vec![1, 12_500_000]);
        let (g, _) = d
            .contribution(&bill(Value::Int(1), Value::Int(1_790_000_000_000)))
            .unwrap();
        assert_eq!(g[1].as_deref(), Some("2026-09"));
        let (g, _) = d
            .contribution(&bill(Value::Int(1), Value::Str("soon".into())))
            .unwrap();
        assert_eq!(g[1], None);
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
        proptest::collection::vec((0usize..3, -50i128..50), 0..8).prop_map(|ops| {
            let mut c = Counters::new("a", vec![Some("g".into())], 2);
            for (actor, d) in ops {
                let actor = NodeId::new(["x", "y", "z"][actor]).unwrap();
                c.add(&actor, &[d, -d]);
            }
            c
        })
    }

    #[test]
    fn per_actor_values_and_actors() {
        let (x, y) = (NodeId::new("x").unwrap(), NodeId::new("y").unwrap());
        let mut c = Counters::new("a", vec![None], 2);
        c.add(&x, &[5, 7]);
        c.add(&x, &[-2, 0]);
        c.add(&y, &[1, -3]);
        assert_eq!(c.value_of(&x), vec![3, 7]);
        assert_eq!(c.value_of(&y), vec![1, -3]);
        assert_eq!(c.values(), vec![4, 4]);
        assert_eq!(c.actors(), vec![x, y]);
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
