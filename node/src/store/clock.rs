//! Recovery from a clock that jumped ahead.
//!
//! While the wall clock runs ahead, the HLC stamps writes in the future and
//! its persisted high-water mark keeps them there after the clock is fixed.
//! Parents refuse stamps beyond their own clock plus the policy's
//! `max_clock_skew_ms`, and stamps that get through overrule writes made
//! later elsewhere. So, when the HLC runs more than the skew ahead of the
//! wall clock, the store starts it again from the wall clock
//! ([`HlcClock::recover`]) and gives its own writes that no other node holds
//! new stamps ([`Item::restamp`]):
//!
//! - a root (no parent) holds the only copy of its own writes, and
//!   re-stamps at once, at the first write group that finds its clock ahead;
//! - a child only marks that it must (`META_RESTAMP`), and re-stamps at its
//!   next Welcome, when it knows what its parent holds: the writes after the
//!   parent's cursor whose stamps that parent would refuse, in a new
//!   incarnation.

use std::collections::BTreeSet;

use rocksdb::{Direction, IteratorMode, WriteBatch};
use tiersync_protocol::conflict::CONFLICTS_CATEGORY;
use tiersync_protocol::{Hlc, HlcClock};

use super::keys::*;
use super::{Change, ChangeEntry, Store, StoreError, WriterState, decode, encode, sync_opts};

/// What the parent holds of this node, as its Welcome said.
#[derive(Debug, Clone, Copy)]
pub struct ParentView {
    /// The parent's cursor: changes up to it were shipped.
    pub resume_from: u64,
    /// The HLC of this node's change at the cursor.
    pub resume_hlc: Hlc,
    /// The parent's wall clock.
    pub parent_now_ms: u64,
}

impl Store {
    /// Called by each local write group with its wall time: if the HLC runs
    /// ahead by more than the policy's skew, start it again from `now_ms`.
    pub(super) fn check_clock(
        &self,
        state: &mut WriterState,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let skew = self.policy.limits.max_clock_skew_ms;
        if !state.clock.runs_ahead(now_ms, skew) {
            return Ok(());
        }
        let ahead = state.clock.last().physical_ms.saturating_sub(now_ms);
        tracing::warn!(
            ahead_ms = ahead,
            max_clock_skew_ms = skew,
            "the HLC is ahead of the wall clock by more than the allowed skew (the clock jumped ahead and back): stamping from the wall clock again, and re-stamping this node's future writes"
        );
        metrics::counter!("tiersync_clock_recoveries_total").increment(1);
        if self.is_root() {
            let above = Hlc {
                physical_ms: now_ms,
                logical: u32::MAX,
            };
            let after = self.last_seq_stamped_before(above)?;
            self.restamp_locked(state, now_ms, after, Hlc::ZERO, above)?;
        } else {
            // Durable before any write of this group is acknowledged (the
            // group's WAL sync covers it), so a restart still re-stamps.
            self.db.put_cf(self.cf(CF_META)?, META_RESTAMP, [])?;
            state.clock.recover(now_ms);
        }
        Ok(())
    }

    /// At a Welcome: if this node's HLC runs beyond the parent's clock plus
    /// the skew (or a write group found it ahead and recovered it), takes a
    /// new incarnation and gives this node's writes after the parent's
    /// cursor whose stamps the parent would refuse new stamps, at the limit
    /// of what it takes. Returns the new incarnation, if it took one: the
    /// link must then close, and the parent re-learns this node. Nothing
    /// the parent holds changes: it took only stamps within its clock plus
    /// the skew, and only later ones move.
    ///
    /// The new incarnation makes the re-stamp a new history: restored from
    /// a backup taken before it, this node would otherwise find its
    /// parent's cursor matching while the parent holds the re-stamped
    /// versions of its writes and it the old ones.
    pub fn restamp_unshipped(
        &self,
        now_ms: u64,
        parent: ParentView,
    ) -> Result<Option<u64>, StoreError> {
        let skew = self.policy.limits.max_clock_skew_ms;
        {
            let mut state = self.lock()?;
            self.check_running()?;
            let meta = self.cf(CF_META)?;
            let flagged = self.db.get_pinned_cf(meta, META_RESTAMP)?.is_some();
            // This node's stamps may go beyond what the parent takes.
            let ahead = state.clock.runs_ahead(parent.parent_now_ms, skew);
            if !flagged && !ahead {
                return Ok(None);
            }
            // The obligation is durable before anything else changes.
            if !flagged {
                self.db.put_cf_opt(meta, META_RESTAMP, [], &sync_opts())?;
            }
            if ahead {
                state.clock.recover(now_ms);
            }
            // Only against a cursor of this node's own history: otherwise
            // the link takes a new incarnation first, and the next Welcome
            // (cursor 0) re-stamps.
            let valid = parent.resume_from == 0
                || parent.resume_hlc == Hlc::ZERO
                || (parent.resume_from <= state.last_seq
                    && self.resume_matches(parent.resume_from, parent.resume_hlc)?);
            if !valid {
                return Ok(None);
            }
        }
        let incarnation = self.reincarnate(Hlc::ZERO, now_ms)?;
        let above = Hlc {
            physical_ms: parent.parent_now_ms.saturating_add(skew),
            logical: u32::MAX,
        };
        // The new stamps go above every stamp of this node the parent may
        // hold (it took none beyond its clock plus the skew), so that they
        // win there too: at the limit of what it takes.
        let from = Hlc {
            physical_ms: above.physical_ms,
            logical: 0,
        };
        let mut state = self.lock()?;
        let n = self.restamp_locked(&mut state, now_ms, parent.resume_from, from, above)?;
        tracing::warn!(
            items = n,
            after = parent.resume_from,
            incarnation = format!("{incarnation:016x}"),
            "re-stamped this node's writes that its parent would refuse as too far ahead, in a new incarnation (the parent re-learns this node)"
        );
        Ok(Some(incarnation))
    }

    /// The highest sequence number below every trailing changelog entry
    /// stamped after `above` (the HLC is monotonic between recoveries, so
    /// those entries are a suffix).
    fn last_seq_stamped_before(&self, above: Hlc) -> Result<u64, StoreError> {
        let mut after = self.trimmed_upto.load(std::sync::atomic::Ordering::SeqCst);
        for kv in self
            .db
            .iterator_cf(self.cf(CF_CHANGELOG)?, IteratorMode::End)
        {
            let (k, v) = kv?;
            let Some(seq) = parse_seq(&k) else { continue };
            if decode::<ChangeEntry>(CF_CHANGELOG, &v)?.hlc <= above {
                after = seq;
                break;
            }
        }
        Ok(after)
    }

    /// Starts the clock again from `now_ms`, gives this node's stamps later
    /// than `above` in the items changed after `after` new stamps from
    /// `from` on (each item's above every stamp it keeps), and commits it
    /// all in one synced batch with a changelog entry per re-stamped item
    /// (so the new stamps travel up). Only a re-stamped item carries the
    /// new stamps; the clock itself restarts from the wall clock, and a
    /// later write to such an item observes them.
    fn restamp_locked(
        &self,
        state: &mut WriterState,
        now_ms: u64,
        after: u64,
        from: Hlc,
        above: Hlc,
    ) -> Result<usize, StoreError> {
        let mut clock: HlcClock = state.clock.clone();
        clock.recover(now_ms);
        let mut fresh = HlcClock::resume(self.node.clone(), from);
        let mut keys = BTreeSet::new();
        for kv in self.db.iterator_cf(
            self.cf(CF_CHANGELOG)?,
            IteratorMode::From(&seq_key(after.saturating_add(1)), Direction::Forward),
        ) {
            let (_, v) = kv?;
            let entry: ChangeEntry = decode(CF_CHANGELOG, &v)?;
            if let Change::Item { category, key } = entry.change
                // A ledger entry's key derives from its stamp.
                && category != CONFLICTS_CATEGORY
            {
                keys.insert((category, key));
            }
        }
        let mut batch = WriteBatch::default();
        let mut seq = state.last_seq;
        let mut n = 0;
        for (category, key) in keys {
            let Some(mut item) = self.get(&category, &key)? else {
                continue;
            };
            if !item.restamp(&mut fresh, now_ms, above) {
                continue;
            }
            batch.put_cf(
                self.cf(CF_DATA)?,
                data_key(&category, &key),
                encode(CF_DATA, &item)?,
            );
            seq += 1;
            let entry = ChangeEntry {
                change: Change::Item { category, key },
                hlc: clock.tick(now_ms).hlc,
            };
            batch.put_cf(
                self.cf(CF_CHANGELOG)?,
                seq_key(seq),
                encode(CF_CHANGELOG, &entry)?,
            );
            n += 1;
        }
        let meta = self.cf(CF_META)?;
        batch.delete_cf(meta, META_RESTAMP);
        batch.put_cf(meta, META_SEQ, encode(CF_META, &seq)?);
        batch.put_cf(meta, META_HLC, encode(CF_META, &clock.last())?);
        self.db.write_opt(batch, &sync_opts())?;
        state.clock = clock;
        if seq != state.last_seq {
            state.last_seq = seq;
            self.committed.send_replace((seq, state.clock.last()));
        }
        Ok(n)
    }
}
