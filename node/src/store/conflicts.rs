//! The conflict ledger and the overwrite summary, on the merge path.
//!
//! A log key merged with different content keeps its loser as a
//! [`CONFLICTS_CATEGORY`] item, written (with its changelog entry, so it
//! travels up) in the WriteBatch of the merge that found it. A record field
//! that another origin's newer, different value replaces is counted per
//! (category, winner, loser) in `meta` (`lww/…`), in the same WriteBatch,
//! with the latest few examples; those counts are this node's own and do
//! not replicate.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};
use tiersync_protocol::conflict::{self, CONFLICTS_CATEGORY, Conflict};
use tiersync_protocol::frame::WireItem;
use tiersync_protocol::{Item, Kind, MergeOutcome, NodeId, Replicate, Stamp};

use super::keys::CF_META;
use super::{Store, StoreError, decode, encode};

/// Prefix of the overwrite summaries in `meta`: `lww/category/winner/loser`.
pub const OVERWRITE_PREFIX: &[u8] = b"lww/";
/// Examples kept per (category, winner, loser): the latest.
pub const OVERWRITE_EXAMPLES: usize = 5;
/// Ledger entries examined for one page of [`Store::conflicts`] at most, so
/// a filter that matches little cannot make one request scan everything.
pub const CONFLICT_SCAN_BUDGET: usize = 10_000;

/// One field value replaced by another origin's newer value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverwriteExample {
    /// The record's key.
    pub key: String,
    /// The field.
    pub field: String,
    /// The stamp of the value that won.
    pub winner: Stamp,
    /// The stamp of the value it replaced.
    pub loser: Stamp,
}

/// Overwrites between two origins in one category, as seen at this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverwriteSummary {
    /// The record category.
    pub category: String,
    /// The origin whose value won.
    pub winner: NodeId,
    /// The origin whose value was replaced.
    pub loser: NodeId,
    /// How many field values were replaced here.
    pub count: u64,
    /// The latest few, oldest first.
    pub examples: Vec<OverwriteExample>,
}

fn overwrite_key(category: &str, winner: &NodeId, loser: &NodeId) -> Vec<u8> {
    [
        OVERWRITE_PREFIX,
        format!("{category}/{winner}/{loser}").as_bytes(),
    ]
    .concat()
}

/// Overwrites found by one merge, staged until its WriteBatch.
#[derive(Debug, Default)]
pub(super) struct Overwrites {
    pairs: BTreeMap<(String, NodeId, NodeId), (u64, Vec<OverwriteExample>)>,
}

impl Overwrites {
    fn note(&mut self, category: &str, key: &str, field: &str, loser: &Stamp, winner: &Stamp) {
        let (n, examples) = self
            .pairs
            .entry((
                category.to_string(),
                winner.origin.clone(),
                loser.origin.clone(),
            ))
            .or_default();
        *n += 1;
        examples.push(OverwriteExample {
            key: key.to_string(),
            field: field.to_string(),
            winner: winner.clone(),
            loser: loser.clone(),
        });
        if examples.len() > OVERWRITE_EXAMPLES {
            examples.remove(0);
        }
    }

    /// Counts them in Prometheus, once their batch is committed.
    pub(super) fn publish(&self) {
        for ((category, winner, loser), (n, _)) in &self.pairs {
            metrics::counter!(
                "tiersync_lww_overwrites_total",
                "category" => category.clone(),
                "winner" => winner.to_string(),
                "loser" => loser.to_string()
            )
            .increment(*n);
        }
    }
}

/// One page of the ledger ([`Store::conflicts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictPage {
    /// Ledger key, the losing version, and the item as this node holds it
    /// now (the winner, as far as this node knows; `None` if it holds none).
    pub entries: Vec<(String, Conflict, Option<Item>)>,
    /// The ledger key to pass as `after` for the next page.
    pub next: Option<String>,
}

impl Store {
    /// Whether conflicts of `category` go to the ledger: declared shared log
    /// categories only (private items never merge from a child, and the
    /// ledger's own entries are no bill lines).
    fn ledgers(&self, category: &str) -> bool {
        self.policy
            .categories
            .get(category)
            .is_some_and(|c| c.kind == Kind::Log && c.replicate == Replicate::Up)
    }

    /// Merges a received item into the state held (as [`Item::merge`]),
    /// noting record fields overwritten by another origin, and returns the
    /// ledger entry of the losing version when two log contents met.
    pub(super) fn merge_noting(
        &self,
        category: &str,
        key: &str,
        mine: &mut Item,
        incoming: &Item,
        overwrites: &mut Overwrites,
    ) -> (MergeOutcome, Option<WireItem>) {
        match (&mut *mine, incoming) {
            (Item::Record(a), Item::Record(b)) => {
                let out = a.merge_observing(b, |field, loser, winner| {
                    overwrites.note(category, key, field, loser, winner);
                });
                (out, None)
            }
            (Item::Log(a), Item::Log(b)) if a.fields != b.fields && self.ledgers(category) => {
                let before = Item::Log(a.clone());
                let out = a.merge(b);
                let ledger =
                    conflict::loser_of(category, key, &before, incoming, out.changed).map(|c| {
                        let (key, item) = c.to_item();
                        WireItem {
                            category: CONFLICTS_CATEGORY.to_string(),
                            key,
                            item,
                        }
                    });
                (out, ledger)
            }
            _ => (mine.merge(incoming), None),
        }
    }

    /// Adds staged overwrites to their durable summaries, in `batch`.
    pub(super) fn stage_overwrites(
        &self,
        batch: &mut WriteBatch,
        overwrites: &Overwrites,
    ) -> Result<(), StoreError> {
        let meta = self.cf(CF_META)?;
        for ((category, winner, loser), (n, examples)) in &overwrites.pairs {
            let key = overwrite_key(category, winner, loser);
            let mut summary = match self.db.get_pinned_cf(meta, &key)? {
                Some(b) => decode::<OverwriteSummary>(CF_META, &b)?,
                None => OverwriteSummary {
                    category: category.clone(),
                    winner: winner.clone(),
                    loser: loser.clone(),
                    count: 0,
                    examples: Vec::new(),
                },
            };
            summary.count += n;
            summary.examples.extend(examples.iter().cloned());
            let extra = summary.examples.len().saturating_sub(OVERWRITE_EXAMPLES);
            summary.examples.drain(..extra);
            batch.put_cf(meta, &key, encode(CF_META, &summary)?);
        }
        Ok(())
    }

    /// Every overwrite summary kept here, by category, winner and loser.
    pub fn overwrites(&self) -> Result<Vec<OverwriteSummary>, StoreError> {
        let meta = self.cf(CF_META)?;
        let mut out = Vec::new();
        let from = IteratorMode::From(OVERWRITE_PREFIX, Direction::Forward);
        for kv in self.db.iterator_cf(meta, from) {
            let (k, v) = kv?;
            if !k.starts_with(OVERWRITE_PREFIX) {
                break;
            }
            out.push(decode(CF_META, &v)?);
        }
        Ok(out)
    }

    /// One page of the conflict ledger in ledger-key order (by category,
    /// then the loser's origin and stamp), after `after`: at most `limit`
    /// entries of `category` (all when `None`) in which `origin` (any when
    /// `None`) wrote the losing or the current version. At most
    /// [`CONFLICT_SCAN_BUDGET`] entries are examined per page, so a page may
    /// hold fewer than `limit` and still have a `next`.
    pub fn conflicts(
        &self,
        category: Option<&str>,
        origin: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ConflictPage, StoreError> {
        let prefix = category.map_or_else(String::new, |c| conflict::ledger_prefix(c, None));
        let mut entries = Vec::new();
        let mut after = after.map(str::to_string);
        let mut examined = 0;
        loop {
            let want = limit.saturating_sub(entries.len()).max(1);
            let page = self.scan(CONFLICTS_CATEGORY, &prefix, after.as_deref(), want, true)?;
            // Whether an entry of this page was left for the next one.
            let mut left = false;
            for (key, item) in page.items {
                if entries.len() == limit || examined == CONFLICT_SCAN_BUDGET {
                    left = true;
                    break;
                }
                examined += 1;
                after = Some(key.clone());
                let c = match Conflict::from_item(&key, &item) {
                    Ok(c) => c,
                    Err(e) => {
                        // Only entries validated on receipt or made here are
                        // stored; one that does not read back is skipped, not
                        // allowed to hide the rest of the ledger.
                        tracing::warn!(key = %key, error = %e, "unreadable conflict ledger entry");
                        continue;
                    }
                };
                let current = self.get(&c.category, &c.key)?;
                let current_origin = match &current {
                    Some(Item::Log(l)) => Some(l.stamp.origin.as_str()),
                    _ => None,
                };
                let matches = origin.is_none_or(|o| {
                    c.loser.stamp.origin.as_str() == o || current_origin == Some(o)
                });
                if matches {
                    entries.push((key, c, current));
                }
            }
            let more = left || page.next.is_some();
            if !more {
                return Ok(ConflictPage {
                    entries,
                    next: None,
                });
            }
            if entries.len() == limit || examined == CONFLICT_SCAN_BUDGET {
                return Ok(ConflictPage {
                    entries,
                    next: after,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
