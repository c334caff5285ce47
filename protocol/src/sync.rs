//! The replication link as two sans-IO state machines.
//!
//! [`Uplink`] runs at the child, [`Downlink`] at the parent, one pair per
//! connection. Neither touches a socket, a disk or a clock: the driver feeds
//! them what happened (`handle_frame`, `changes_available`, `batch_loaded`,
//! `merged`, …) and drains what they want done with `poll_event` — send a
//! frame, load a batch from the changelog, merge durably, close. Everything
//! about handshake, cursors, the window of unacknowledged batches and the
//! choice between streaming and snapshot catch-up lives here, and is tested
//! with an in-memory network in `tests` below.
//!
//! Delivery is at-least-once: after a reconnect the child resends from the
//! parent's durable cursor, and merges are idempotent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::clock::{Hlc, Stamp};
use crate::frame::{Frame, PROTOCOL_VERSION, RefuseReason, Watermark, WireItem};
use crate::id::{NodeId, Tier};
use crate::item::Item;
use crate::policy::{Dimension, Kind, Policy, Replicate};

/// A key in the child's data: `(category, key)`.
pub type ItemKey = (String, String);

/// What the child's driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum UplinkEvent {
    /// Write this frame to the link.
    Send(Frame),
    /// Read changelog entries after `after` (coalesced, `up` items only) and
    /// call [`Uplink::batch_loaded`] with the same `epoch`.
    LoadBatch {
        /// Load entries with a sequence number above this.
        after: u64,
        /// The connection epoch the answer belongs to.
        epoch: u64,
    },
    /// Read the next chunk of `up` items after `after` (from the start when
    /// `None`) and call [`Uplink::snapshot_loaded`] with the same `epoch`.
    LoadSnapshot {
        /// Resume after this key.
        after: Option<ItemKey>,
        /// The connection epoch the answer belongs to.
        epoch: u64,
    },
    /// The parent holds everything up to `seq` durably: changelog entries at
    /// or below it may be trimmed.
    Acked {
        /// The acknowledged sequence number.
        seq: u64,
    },
    /// Check that this node's changelog entry `seq` has HLC `hlc` (see
    /// [`resume_matches`]) and call [`Uplink::resume_checked`] with the
    /// answer and the same `epoch`.
    CheckResume {
        /// The parent's cursor.
        seq: u64,
        /// The HLC the parent holds for the entry at its cursor.
        hlc: Hlc,
        /// The connection epoch the answer belongs to.
        epoch: u64,
    },
    /// This node's data is behind what the parent holds of it (a restore
    /// from a backup or VM snapshot, a power cut of a `buffered` node): its
    /// sequence numbers up to the parent's cursor were, or will be, reissued
    /// for other changes. Take a new incarnation durably and call
    /// [`Uplink::reincarnated`]; the parent then re-learns this node's data
    /// by snapshot, and nothing written after the rollback is skipped.
    Reincarnate {
        /// What was found, for the log.
        reason: String,
        /// The HLC the parent holds for this node's change at its cursor:
        /// the node's clock must move past it, so that its new changes are
        /// later than anything of its old history the tree holds.
        parent_hlc: Hlc,
    },
    /// Close the connection (then reconnect with backoff).
    Close {
        /// Why, for the log.
        reason: String,
    },
}

/// Whether a child's changelog agrees with its parent's cursor `(seq, hlc)`:
/// `entry_hlc` is the HLC of the child's entry `seq` if it still holds it,
/// `acked_mark` the `(seq, hlc)` of the entry at the child's last trim.
///
/// An entry the child trimmed was acknowledged by a parent; if the parent's
/// cursor lies below the trim point, the parent went back in time, not the
/// child, and the child is consistent (a snapshot will refill the parent).
/// An unknown HLC ([`Hlc::ZERO`], a cursor from before protocol 2) is
/// trusted.
pub fn resume_matches(
    seq: u64,
    hlc: Hlc,
    entry_hlc: Option<Hlc>,
    acked_mark: Option<(u64, Hlc)>,
) -> bool {
    if seq == 0 || hlc == Hlc::ZERO {
        return true;
    }
    match (entry_hlc, acked_mark) {
        (Some(h), _) => h == hlc,
        (None, Some((a, ah))) if a == seq => ah == hlc,
        (None, Some((a, _))) => seq < a,
        (None, None) => false,
    }
}

/// Where a parent got a watermark from: the child that relayed it, that
/// child's incarnation, and the child's changelog position of the range it
/// came with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Relay {
    /// The child that sent it.
    pub child: NodeId,
    /// The child's incarnation.
    pub incarnation: u64,
    /// The end of the child's changelog range it came with.
    pub seq: u64,
}

/// Whether a watermark `new`, relayed `via`, replaces the one held (`cur`,
/// which came `cur_via`; `None` for one stored before relays were kept).
///
/// What the current history of the relaying child says is the truth, even
/// when it says less than before: a child that went back in time (restored,
/// then reincarnated) relays what it holds now, and a parent that kept a
/// higher claim would later claim changes the origin reissued before they
/// arrive. Within one history of one child, a range from before (a late
/// merge, a replay) never moves a watermark, and an origin's watermark
/// moves forward only, or to another incarnation of the origin.
pub fn watermark_replaces(
    cur: Option<&Watermark>,
    cur_via: Option<&Relay>,
    new: &Watermark,
    via: &Relay,
) -> bool {
    let Some(cur) = cur else {
        return true;
    };
    let moves = cur.incarnation != new.incarnation || new.seq > cur.seq;
    match cur_via {
        Some(v) if v.child == via.child && v.incarnation == via.incarnation => {
            via.seq >= v.seq && moves
        }
        Some(_) => cur != new,
        None => moves,
    }
}

/// A batch the child's driver loaded from its changelog.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedBatch {
    /// The sequence number of the last changelog entry read.
    pub last_seq: u64,
    /// The HLC of that entry.
    pub upto_hlc: Hlc,
    /// Current state of each `up` item changed in the range, once per key.
    pub items: Vec<WireItem>,
    /// Watermarks of the subtree recorded in the range.
    pub watermarks: Vec<Watermark>,
}

/// Static settings of a child's uplink.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// This node.
    pub node: NodeId,
    /// Its tier.
    pub tier: Tier,
    /// Its policy digest.
    pub policy_digest: [u8; 32],
    /// Its data directory's incarnation.
    pub incarnation: u64,
    /// Most batches sent and not yet acknowledged.
    pub window: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum UpState {
    Disconnected,
    AwaitWelcome,
    /// The parent's cursor is being checked against this node's changelog.
    AwaitCheck {
        resume_from: u64,
        resume_hlc: Hlc,
    },
    Snapshot {
        upto: u64,
        upto_hlc: Hlc,
        next: Option<ItemKey>,
        all_loaded: bool,
        watermarks: Vec<Watermark>,
    },
    Streaming,
}

/// The child's side of a link.
#[derive(Debug)]
pub struct Uplink {
    cfg: UplinkConfig,
    subtree: Vec<NodeId>,
    state: UpState,
    epoch: u64,
    local_last: u64,
    local_last_hlc: Hlc,
    retained_from: u64,
    acked: u64,
    sent_upto: u64,
    in_flight: VecDeque<u64>,
    /// Snapshot chunks sent and not yet acknowledged.
    chunks_in_flight: usize,
    loading: bool,
    events: VecDeque<UplinkEvent>,
}

impl Uplink {
    /// A disconnected uplink. `local_last` is the child's last sequence
    /// number; `retained_from` the lowest sequence number its changelog still
    /// holds (1 when nothing was trimmed).
    pub fn new(
        cfg: UplinkConfig,
        local_last: u64,
        local_last_hlc: Hlc,
        retained_from: u64,
    ) -> Self {
        Self {
            cfg,
            subtree: Vec::new(),
            state: UpState::Disconnected,
            epoch: 0,
            local_last,
            local_last_hlc,
            retained_from: retained_from.max(1),
            acked: 0,
            sent_upto: 0,
            in_flight: VecDeque::new(),
            chunks_in_flight: 0,
            loading: false,
            events: VecDeque::new(),
        }
    }

    /// The next thing the driver must do.
    pub fn poll_event(&mut self) -> Option<UplinkEvent> {
        self.events.pop_front()
    }

    /// The highest sequence number the parent acknowledged on this or an
    /// earlier connection.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The child's last known sequence number.
    pub fn local_last(&self) -> u64 {
        self.local_last
    }

    /// Whether the link is past the handshake.
    pub fn is_established(&self) -> bool {
        matches!(self.state, UpState::Streaming | UpState::Snapshot { .. })
    }

    /// This node's incarnation as announced in the next Hello.
    pub fn incarnation(&self) -> u64 {
        self.cfg.incarnation
    }

    /// Whether the child waits for the parent to answer: a Welcome, or the
    /// acknowledgement of something sent. A driver that hears nothing for
    /// long while this holds may take the link for dead.
    pub fn awaiting_answer(&self) -> bool {
        matches!(self.state, UpState::AwaitWelcome)
            || !self.in_flight.is_empty()
            || self.chunks_in_flight > 0
    }

    /// Whether a snapshot catch-up is under way.
    pub fn in_snapshot(&self) -> bool {
        matches!(self.state, UpState::Snapshot { .. })
    }

    /// A connection is up: say hello. `subtree` is the set of nodes below
    /// this one whose items it relays.
    pub fn connected(&mut self, subtree: Vec<NodeId>) {
        self.reset();
        self.subtree = subtree.clone();
        self.state = UpState::AwaitWelcome;
        self.events.push_back(UplinkEvent::Send(Frame::Hello {
            protocol: PROTOCOL_VERSION,
            node: self.cfg.node.clone(),
            tier: self.cfg.tier,
            policy_digest: self.cfg.policy_digest,
            incarnation: self.cfg.incarnation,
            subtree,
        }));
    }

    /// The connection is gone; in-flight batches will be resent from the
    /// parent's cursor on the next connection.
    pub fn disconnected(&mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        self.epoch += 1;
        self.state = UpState::Disconnected;
        self.in_flight.clear();
        self.chunks_in_flight = 0;
        self.loading = false;
        self.events.clear();
    }

    fn close(&mut self, reason: String) {
        self.reset();
        self.events.push_back(UplinkEvent::Close { reason });
    }

    /// The child's changelog grew to `last_seq` (whose entry has `hlc`).
    pub fn changes_available(&mut self, last_seq: u64, hlc: Hlc) {
        if last_seq > self.local_last {
            self.local_last = last_seq;
            self.local_last_hlc = hlc;
        }
        self.pump();
    }

    /// The changelog now starts at `retained_from` (entries below were trimmed).
    pub fn trimmed(&mut self, retained_from: u64) {
        self.retained_from = self.retained_from.max(retained_from);
    }

    /// A frame from the parent.
    pub fn handle_frame(&mut self, frame: Frame) {
        let state = self.state.clone();
        match (frame, &state) {
            (
                Frame::Welcome {
                    resume_from,
                    resume_hlc,
                    ..
                },
                UpState::AwaitWelcome,
            ) => self.welcome(resume_from, resume_hlc),
            (Frame::Refuse { reason, message }, _) => {
                self.close(format!("parent refused this node ({reason:?}): {message}"));
            }
            (Frame::Ack { last_seq }, UpState::Streaming) => self.ack(last_seq),
            (Frame::SnapshotAck, UpState::Snapshot { .. } | UpState::Streaming) => {
                if self.chunks_in_flight == 0 {
                    return self
                        .close("parent acknowledged a snapshot chunk that was not sent".into());
                }
                self.chunks_in_flight -= 1;
                self.pump();
            }
            (Frame::Ping { nonce }, _) => self
                .events
                .push_back(UplinkEvent::Send(Frame::Ping { nonce })),
            (other, state) => {
                self.close(format!(
                    "unexpected frame from parent in state {state:?}: {}",
                    frame_name(&other)
                ));
            }
        }
    }

    fn welcome(&mut self, resume_from: u64, resume_hlc: Hlc) {
        if resume_from > self.local_last {
            return self.behind(
                format!(
                    "the parent holds this node's changes up to {resume_from}, but its changelog ends at {}",
                    self.local_last
                ),
                resume_hlc,
            );
        }
        if resume_from == 0 || resume_hlc == Hlc::ZERO {
            return self.resume(resume_from);
        }
        self.state = UpState::AwaitCheck {
            resume_from,
            resume_hlc,
        };
        self.events.push_back(UplinkEvent::CheckResume {
            seq: resume_from,
            hlc: resume_hlc,
            epoch: self.epoch,
        });
    }

    /// The driver's answer to [`UplinkEvent::CheckResume`].
    pub fn resume_checked(&mut self, epoch: u64, matches: bool) {
        let UpState::AwaitCheck {
            resume_from,
            resume_hlc,
        } = self.state
        else {
            return;
        };
        if epoch != self.epoch {
            return;
        }
        if matches {
            self.resume(resume_from);
        } else {
            self.behind(
                format!(
                    "this node's change {resume_from} differs from the one the parent holds: its data went back in time"
                ),
                resume_hlc,
            );
        }
    }

    fn behind(&mut self, reason: String, parent_hlc: Hlc) {
        self.reset();
        self.events
            .push_back(UplinkEvent::Reincarnate { reason, parent_hlc });
    }

    /// The driver took the new incarnation `incarnation` durably (after
    /// [`UplinkEvent::Reincarnate`]), with a changelog entry that records it
    /// at a clock past the parent's: what the parent acknowledged belongs to
    /// the old incarnation. The link closes; the next Hello announces the
    /// new incarnation.
    pub fn reincarnated(&mut self, incarnation: u64) {
        self.cfg.incarnation = incarnation;
        self.acked = 0;
        self.close(format!(
            "took the new incarnation {incarnation:016x}: the parent re-learns this node's data"
        ));
    }

    fn resume(&mut self, resume_from: u64) {
        self.acked = self.acked.max(resume_from);
        if resume_from + 1 < self.retained_from {
            // The parent needs changes this node no longer keeps: catch up
            // with a snapshot of every `up` item, then stream after it.
            self.state = UpState::Snapshot {
                upto: self.local_last,
                upto_hlc: self.local_last_hlc,
                next: None,
                all_loaded: false,
                watermarks: Vec::new(),
            };
        } else {
            self.state = UpState::Streaming;
            self.sent_upto = resume_from;
        }
        self.pump();
    }

    fn ack(&mut self, last_seq: u64) {
        if last_seq > self.sent_upto {
            return self.close(format!(
                "parent acknowledged {last_seq}, beyond what was sent ({})",
                self.sent_upto
            ));
        }
        while self.in_flight.front().is_some_and(|&s| s <= last_seq) {
            self.in_flight.pop_front();
        }
        if last_seq > self.acked {
            self.acked = last_seq;
            self.events.push_back(UplinkEvent::Acked { seq: last_seq });
        }
        self.pump();
    }

    /// The driver's answer to [`UplinkEvent::LoadBatch`].
    pub fn batch_loaded(&mut self, epoch: u64, batch: LoadedBatch) {
        if epoch != self.epoch || self.state != UpState::Streaming {
            return; // an answer for an old connection
        }
        self.loading = false;
        if batch.last_seq > self.sent_upto {
            let after = self.sent_upto;
            self.sent_upto = batch.last_seq;
            self.in_flight.push_back(batch.last_seq);
            self.events.push_back(UplinkEvent::Send(Frame::Batch {
                after,
                last_seq: batch.last_seq,
                upto_hlc: batch.upto_hlc,
                items: batch.items,
                watermarks: batch.watermarks,
            }));
        }
        self.pump();
    }

    /// The driver's answer to [`UplinkEvent::LoadSnapshot`]: a chunk and the
    /// key to continue after (`None` when the snapshot is complete). With the
    /// first chunk (`after` was `None`) the driver also passes its
    /// watermarks as they are *before* it reads any item, so that what they
    /// claim is covered by the items read after them.
    pub fn snapshot_loaded(
        &mut self,
        epoch: u64,
        items: Vec<WireItem>,
        next: Option<ItemKey>,
        watermarks: Vec<Watermark>,
    ) {
        if epoch != self.epoch {
            return;
        }
        let UpState::Snapshot {
            upto,
            upto_hlc,
            next: cursor,
            all_loaded,
            watermarks: marks,
        } = &mut self.state
        else {
            return;
        };
        if cursor.is_none() {
            *marks = watermarks;
        }
        self.loading = false;
        if !items.is_empty() {
            self.chunks_in_flight += 1;
            self.events
                .push_back(UplinkEvent::Send(Frame::SnapshotChunk { items }));
        }
        match next {
            Some(k) => *cursor = Some(k),
            None => {
                *all_loaded = true;
                let (upto, upto_hlc, watermarks) = (*upto, *upto_hlc, std::mem::take(marks));
                // The stream is ordered: the parent merges every chunk before
                // it reads this, and its Ack covers the whole snapshot.
                self.events
                    .push_back(UplinkEvent::Send(Frame::SnapshotDone {
                        last_seq: upto,
                        upto_hlc,
                        watermarks,
                    }));
                self.state = UpState::Streaming;
                self.sent_upto = upto;
                self.in_flight.clear();
                self.in_flight.push_back(upto);
            }
        }
        self.pump();
    }

    fn pump(&mut self) {
        if self.loading {
            return;
        }
        let window = self.cfg.window.max(1);
        match &self.state {
            UpState::Streaming
                if self.in_flight.len() < window && self.sent_upto < self.local_last =>
            {
                self.loading = true;
                self.events.push_back(UplinkEvent::LoadBatch {
                    after: self.sent_upto,
                    epoch: self.epoch,
                });
            }
            UpState::Snapshot {
                next,
                all_loaded: false,
                ..
            } if self.chunks_in_flight < window => {
                self.loading = true;
                self.events.push_back(UplinkEvent::LoadSnapshot {
                    after: next.clone(),
                    epoch: self.epoch,
                });
            }
            _ => {}
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Refuse { .. } => "Refuse",
        Frame::Batch { .. } => "Batch",
        Frame::Ack { .. } => "Ack",
        Frame::Ping { .. } => "Ping",
        Frame::SnapshotChunk { .. } => "SnapshotChunk",
        Frame::SnapshotDone { .. } => "SnapshotDone",
        Frame::SnapshotAck => "SnapshotAck",
    }
}

/// Static settings of a parent's side of its links.
#[derive(Debug, Clone)]
pub struct DownlinkConfig {
    /// This node.
    pub node: NodeId,
    /// Its tier.
    pub tier: Tier,
    /// Its policy digest.
    pub policy_digest: [u8; 32],
    /// The children its config lists.
    pub children: BTreeSet<NodeId>,
    /// Who may appear below each child, from this node's configuration
    /// (`[subtree]`): a child's Hello may claim only those, and a child
    /// listed here relays (its tier is above a city's) while one not listed
    /// is a city. `None` (no `[subtree]` configured): the claims of the
    /// Hello are trusted, first come first served.
    pub subtrees: Option<BTreeMap<NodeId, BTreeSet<NodeId>>>,
}

/// The most nodes a parent remembers as having left one child's subtree.
/// The oldest departures are forgotten first (their writes are long
/// relayed); a child that claims and drops nodes at will cannot grow it.
pub const MAX_FORMER: usize = 1024;

/// What a parent remembers, durably, of the nodes one child relayed for:
/// the ones it claims now, and the ones that left it (a city moved to
/// another province, or removed) with the time they left.
///
/// The old parent keeps what a moved city sent it, in records other cities
/// edited too, and a write of the city that only it holds (the city lost it
/// in a restore or a power cut of a `buffered` disk after sending it) may
/// have overwritten a sibling's. Dropping the city's writes there would lose
/// that sibling's write too; so writes of a former member stamped before it
/// left (plus the allowed skew) are still taken from the old parent, and
/// only later ones, which it cannot have had, are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubtreeHistory {
    /// The nodes the child claimed at its last accepted Hello.
    pub current: BTreeSet<NodeId>,
    /// Nodes it no longer claims: stamps up to the time (ms) are accepted.
    pub former: BTreeMap<NodeId, u64>,
}

impl SubtreeHistory {
    /// The child's accepted Hello claims `subtree`, at `until_ms` (this
    /// node's time plus the allowed skew): nodes it no longer claims become
    /// former members, nodes it claims again current ones. Returns whether
    /// anything changed (the driver then stores it before any merge).
    pub fn claimed(&mut self, subtree: &BTreeSet<NodeId>, until_ms: u64) -> bool {
        if self.current == *subtree {
            return false;
        }
        for gone in self.current.difference(subtree) {
            self.former.insert(gone.clone(), until_ms);
        }
        self.former.retain(|n, _| !subtree.contains(n));
        while self.former.len() > MAX_FORMER {
            let oldest = self
                .former
                .iter()
                .min_by_key(|(n, t)| (**t, (*n).clone()))
                .map(|(n, _)| n.clone());
            match oldest {
                Some(n) => self.former.remove(&n),
                None => break,
            };
        }
        self.current = subtree.clone();
        true
    }

    /// The former members with the moves the operator recorded for this
    /// child (`[moved]`: node → until when, ms) added; the later time wins.
    pub fn former_with(&self, recorded: Option<&BTreeMap<NodeId, u64>>) -> BTreeMap<NodeId, u64> {
        let mut former = self.former.clone();
        for (n, t) in recorded.into_iter().flatten() {
            let until = former.entry(n.clone()).or_insert(*t);
            *until = (*until).max(*t);
        }
        former
    }
}

/// What the parent's driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkEvent {
    /// Write this frame to the link.
    Send(Frame),
    /// The child passed the handshake: check that no other child claims a
    /// node of `subtree`, load the durable cursor of (`child`,
    /// `incarnation`) and call [`Downlink::cursor_loaded`] (or
    /// [`Downlink::refuse`]).
    Accepted {
        /// The child's id (from its certificate).
        child: NodeId,
        /// Its data directory's incarnation.
        incarnation: u64,
        /// The nodes it relays for.
        subtree: Vec<NodeId>,
    },
    /// Merge `items` durably in one write together with the cursor update
    /// (if any) and the watermarks, then call [`Downlink::merged`].
    Merge {
        /// Validated items.
        items: Vec<WireItem>,
        /// The child's new cursor and the HLC of that change, if this
        /// completes a range of its changelog (for the child's incarnation
        /// given in [`DownlinkEvent::Accepted`]).
        cursor: Option<(u64, Hlc)>,
        /// Watermarks of the child's subtree.
        watermarks: Vec<Watermark>,
        /// Enter every item into this node's changelog, changed or not.
        /// Set while the parent re-learns a child from scratch (its cursor
        /// was 0 at the Welcome: a new child, a new incarnation): what the
        /// child sends then may be what the root dropped while the child
        /// was under another parent, and must travel on.
        relay_all: bool,
    },
    /// Writes of origins outside the child's subtree were dropped from what
    /// it sent (before the [`DownlinkEvent::Merge`] that follows): for the
    /// log and metrics. Data a city wrote while it was under another parent
    /// reaches the root through its current parent; a forged origin stores
    /// nothing.
    Dropped {
        /// Registers, log entries, counter actors and watermarks dropped.
        writes: usize,
        /// Their origins.
        origins: BTreeSet<NodeId>,
    },
    /// Close the connection.
    Close {
        /// Why, for the log.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownState {
    AwaitHello,
    AwaitCursor,
    Open,
    Merging(Pending),
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Batch(u64),
    Chunk,
}

/// The parent's side of one child's link.
#[derive(Debug)]
pub struct Downlink {
    cfg: DownlinkConfig,
    peer: NodeId,
    /// The tier the peer's certificate names, if it names one.
    peer_tier: Option<Tier>,
    child_tier: Tier,
    allowed_origins: BTreeSet<NodeId>,
    /// Nodes that left the child's subtree, and until when their writes
    /// may still come from it ([`SubtreeHistory::former`]).
    former_origins: BTreeMap<NodeId, u64>,
    /// What this parent durably holds of the child's changelog, as far as
    /// this link knows.
    cursor: u64,
    /// The cursor was 0 at the Welcome: the child is re-learnt from scratch.
    relearn: bool,
    state: DownState,
    events: VecDeque<DownlinkEvent>,
}

impl Downlink {
    /// A link whose peer authenticated as `peer` (the certificate's id).
    pub fn new(cfg: DownlinkConfig, peer: NodeId) -> Self {
        Self {
            cfg,
            peer,
            peer_tier: None,
            child_tier: Tier::City,
            allowed_origins: BTreeSet::new(),
            former_origins: BTreeMap::new(),
            cursor: 0,
            relearn: false,
            state: DownState::AwaitHello,
            events: VecDeque::new(),
        }
    }

    /// The tier the peer's certificate names (its `tier.<tier>.tiersync`
    /// SAN): the Hello must claim that tier.
    pub fn with_peer_tier(mut self, tier: Option<Tier>) -> Self {
        self.peer_tier = tier;
        self
    }

    /// The next thing the driver must do.
    pub fn poll_event(&mut self) -> Option<DownlinkEvent> {
        self.events.pop_front()
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &NodeId {
        &self.peer
    }

    /// Whether the link is closed.
    pub fn is_closed(&self) -> bool {
        self.state == DownState::Closed
    }

    /// Whether the child's Hello was read (accepted or not): until then
    /// the driver reads only a Hello-sized frame.
    pub fn is_greeted(&self) -> bool {
        self.state != DownState::AwaitHello
    }

    /// Refuses the child and closes the link.
    pub fn refuse(&mut self, reason: RefuseReason, message: String) {
        self.events.push_back(DownlinkEvent::Send(Frame::Refuse {
            reason,
            message: message.clone(),
        }));
        self.events.push_back(DownlinkEvent::Close {
            reason: format!("refused {} ({reason:?}): {message}", self.peer),
        });
        self.state = DownState::Closed;
    }

    /// A frame from the child, received at wall time `now_ms`.
    pub fn handle_frame(&mut self, frame: Frame, now_ms: u64, policy: &Policy) {
        match (frame, self.state) {
            (_, DownState::Closed) => {}
            (
                Frame::Hello {
                    protocol,
                    node,
                    tier,
                    policy_digest,
                    incarnation,
                    subtree,
                },
                DownState::AwaitHello,
            ) => self.hello(protocol, node, tier, policy_digest, incarnation, subtree),
            (
                Frame::Batch {
                    after,
                    last_seq,
                    upto_hlc,
                    items,
                    watermarks,
                },
                DownState::Open,
            ) => {
                let items = match self.check_items(items, now_ms, policy) {
                    Ok(items) => items,
                    Err(why) => return self.refuse(RefuseReason::Violation, why),
                };
                if after > self.cursor || last_seq < after {
                    let why = format!(
                        "batch covers ({after}, {last_seq}] but this node holds the child's changes only up to {}",
                        self.cursor
                    );
                    return self.refuse(RefuseReason::Violation, why);
                }
                self.complete_range(last_seq, upto_hlc, items, watermarks, now_ms);
            }
            (Frame::SnapshotChunk { items }, DownState::Open) => {
                let items = match self.check_items(items, now_ms, policy) {
                    Ok(items) => items,
                    Err(why) => return self.refuse(RefuseReason::Violation, why),
                };
                self.state = DownState::Merging(Pending::Chunk);
                self.events.push_back(DownlinkEvent::Merge {
                    items,
                    cursor: None,
                    watermarks: Vec::new(),
                    relay_all: self.relearn,
                });
            }
            (
                Frame::SnapshotDone {
                    last_seq,
                    upto_hlc,
                    watermarks,
                },
                DownState::Open,
            ) => {
                self.complete_range(last_seq, upto_hlc, Vec::new(), watermarks, now_ms);
            }
            (Frame::Ping { .. }, _) => {}
            (other, state) => {
                let why = format!("unexpected {} in state {state:?}", frame_name(&other));
                self.refuse(RefuseReason::Violation, why);
            }
        }
    }

    /// A batch (or the end of a snapshot) that brings the child's cursor to
    /// `last_seq`: check its watermarks and clock, then ask for the merge.
    fn complete_range(
        &mut self,
        last_seq: u64,
        upto_hlc: Hlc,
        items: Vec<WireItem>,
        watermarks: Vec<Watermark>,
        now_ms: u64,
    ) {
        let (watermarks, foreign): (Vec<Watermark>, Vec<Watermark>) = watermarks
            .into_iter()
            .partition(|w| self.allowed_origins.contains(&w.origin));
        if !foreign.is_empty() {
            self.events.push_back(DownlinkEvent::Dropped {
                writes: foreign.len(),
                origins: foreign.into_iter().map(|w| w.origin).collect(),
            });
        }
        // A changelog position's HLC and a watermark's time are metadata:
        // a child whose clock runs ahead must not stop its whole subtree
        // over them (its items' stamps are still checked). The cursor keeps
        // the HLC as sent (it identifies the child's change); what this node
        // claims about time is never later than its own clock.
        let ceiling = Hlc {
            physical_ms: now_ms,
            logical: 0,
        };
        let watermarks = watermarks
            .into_iter()
            .map(|w| Watermark {
                hlc: w.hlc.min(ceiling),
                ..w
            })
            .collect();
        self.state = DownState::Merging(Pending::Batch(last_seq));
        self.events.push_back(DownlinkEvent::Merge {
            items,
            cursor: Some((last_seq, upto_hlc)),
            watermarks,
            relay_all: self.relearn,
        });
    }

    fn hello(
        &mut self,
        protocol: u32,
        node: NodeId,
        tier: Tier,
        digest: [u8; 32],
        incarnation: u64,
        subtree: Vec<NodeId>,
    ) {
        if protocol != PROTOCOL_VERSION {
            let why = format!(
                "protocol version {protocol} is not supported (this node speaks {PROTOCOL_VERSION})"
            );
            return self.refuse(RefuseReason::UnsupportedVersion, why);
        }
        if node != self.peer {
            let why = format!(
                "Hello claims node {node} but the certificate is for {}",
                self.peer
            );
            return self.refuse(RefuseReason::IdMismatch, why);
        }
        if !self.cfg.children.contains(&node) {
            let why = format!("{node} is not a configured child of {}", self.cfg.node);
            return self.refuse(RefuseReason::UnknownChild, why);
        }
        if tier >= self.cfg.tier {
            let why = format!("{node} is a {tier}, not below this {} node", self.cfg.tier);
            return self.refuse(RefuseReason::TierNotBelow, why);
        }
        // The tier comes from the certificate, or from this node's
        // configuration: never from the Hello alone.
        if let Some(cert_tier) = self.peer_tier
            && cert_tier != tier
        {
            let why = format!("Hello claims tier {tier} but the certificate is for a {cert_tier}");
            return self.refuse(RefuseReason::IdMismatch, why);
        }
        let configured = self.cfg.subtrees.as_ref().map(|s| s.get(&node));
        if let Some(below) = configured {
            let relays = below.is_some();
            if self.peer_tier.is_none() && relays != (tier != Tier::City) {
                let why = match relays {
                    true => format!(
                        "{node} is configured here with a subtree, so it is not a city; its Hello says {tier}"
                    ),
                    false => format!(
                        "{node} is configured here as a city (no [subtree] entry); its Hello says {tier}"
                    ),
                };
                return self.refuse(RefuseReason::TierNotBelow, why);
            }
            if let Some(n) = subtree
                .iter()
                .find(|n| !below.is_some_and(|b| b.contains(*n)))
            {
                let why = format!(
                    "{node} claims {n} in its subtree, which this node's configuration does not place below it"
                );
                return self.refuse(RefuseReason::Violation, why);
            }
        }
        if digest != self.cfg.policy_digest {
            let why = format!(
                "policy digest {} differs from this node's {}",
                short_hex(&digest),
                short_hex(&self.cfg.policy_digest)
            );
            return self.refuse(RefuseReason::PolicyMismatch, why);
        }
        if tier == Tier::City && !subtree.is_empty() {
            return self.refuse(
                RefuseReason::Violation,
                format!("city {node} claims a subtree"),
            );
        }
        let mut allowed = BTreeSet::from([node.clone()]);
        for n in &subtree {
            if *n == self.cfg.node || self.cfg.children.contains(n) || !allowed.insert(n.clone()) {
                let why = format!("{node} claims {n} in its subtree, which cannot be below it");
                return self.refuse(RefuseReason::Violation, why);
            }
        }
        self.child_tier = tier;
        self.allowed_origins = allowed;
        self.state = DownState::AwaitCursor;
        self.events.push_back(DownlinkEvent::Accepted {
            child: node,
            incarnation,
            subtree,
        });
    }

    /// The driver's answer to [`DownlinkEvent::Accepted`], before
    /// [`Downlink::cursor_loaded`]: the nodes that left this child's subtree
    /// and until when (ms) their writes may still arrive through it (see
    /// [`SubtreeHistory`]). Without it, writes of any node outside the
    /// subtree the Hello claims are dropped.
    pub fn former_loaded(&mut self, former: BTreeMap<NodeId, u64>) {
        if self.state != DownState::AwaitCursor {
            return;
        }
        self.former_origins = former
            .into_iter()
            .filter(|(n, _)| !self.allowed_origins.contains(n))
            .collect();
    }

    /// The driver's answer to [`DownlinkEvent::Accepted`]: the durable cursor
    /// and the HLC of the child's change at it, at wall time `now_ms`.
    pub fn cursor_loaded(&mut self, resume_from: u64, resume_hlc: Hlc, now_ms: u64) {
        if self.state != DownState::AwaitCursor {
            return;
        }
        self.state = DownState::Open;
        self.cursor = resume_from;
        self.relearn = resume_from == 0;
        self.events.push_back(DownlinkEvent::Send(Frame::Welcome {
            resume_from,
            resume_hlc,
            now_ms,
        }));
    }

    /// The driver committed the last [`DownlinkEvent::Merge`] durably.
    pub fn merged(&mut self) {
        let DownState::Merging(pending) = self.state else {
            return;
        };
        self.state = DownState::Open;
        self.events.push_back(DownlinkEvent::Send(match pending {
            Pending::Batch(last_seq) => {
                self.cursor = self.cursor.max(last_seq);
                Frame::Ack { last_seq }
            }
            Pending::Chunk => Frame::SnapshotAck,
        }));
    }

    /// The child's tier (after the handshake).
    pub fn child_tier(&self) -> Tier {
        self.child_tier
    }

    /// Validates received items and drops the writes of origins outside
    /// the child's subtree (announced with [`DownlinkEvent::Dropped`]).
    ///
    /// Such writes are not refused: a city that moved to another parent left
    /// its writes at its old one (in records other cities edited too), and
    /// refusing them would stop the old parent's link for good. They reach
    /// the root through the city's current parent; dropping them here keeps
    /// every tier exact, and a forged origin stores nothing.
    fn check_items(
        &mut self,
        items: Vec<WireItem>,
        now_ms: u64,
        policy: &Policy,
    ) -> Result<Vec<WireItem>, String> {
        if items.len() > policy.limits.max_batch_items {
            return Err(format!(
                "{} items in one batch, over the limit of {}",
                items.len(),
                policy.limits.max_batch_items
            ));
        }
        let allowed = |o: &NodeId| self.allowed_origins.contains(o);
        // A former member's write is taken if it was made before it left;
        // its counter share is not: its current parent carries the newer one.
        let keep = |s: &Stamp| {
            allowed(&s.origin)
                || self
                    .former_origins
                    .get(&s.origin)
                    .is_some_and(|until| s.hlc.physical_ms <= *until)
        };
        let mut kept = Vec::with_capacity(items.len());
        let mut writes = 0;
        let mut origins = BTreeSet::new();
        for w in items {
            for s in w.item.stamps() {
                if !keep(s) {
                    origins.insert(s.origin.clone());
                }
            }
            if let Item::Counters(c) = &w.item {
                origins.extend(c.actors().into_iter().filter(|a| !allowed(a)));
            }
            // Everything but the origins first: a private category or a
            // far-future stamp refuses the link whoever claims to have
            // written it.
            validate_item(policy, now_ms, |_| true, &w)?;
            let WireItem {
                category,
                key,
                item,
            } = w;
            let (item, dropped) = item.retain_writes(keep, allowed);
            writes += dropped;
            if let Some(item) = item {
                kept.push(WireItem {
                    category,
                    key,
                    item,
                });
            }
        }
        if writes > 0 {
            self.events
                .push_back(DownlinkEvent::Dropped { writes, origins });
        }
        Ok(kept)
    }
}

fn short_hex(d: &[u8; 32]) -> String {
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why `hlc` is refused, if it is beyond `now_ms` plus the policy's
/// maximum clock skew.
fn too_far_ahead(hlc: Hlc, now_ms: u64, policy: &Policy) -> Option<String> {
    let limit = now_ms.saturating_add(policy.limits.max_clock_skew_ms);
    (hlc.physical_ms > limit).then(|| {
        format!(
            "stamp {hlc} is {} ms ahead of this node's clock, beyond the policy's max_clock_skew_ms of {}",
            hlc.physical_ms.saturating_sub(now_ms),
            policy.limits.max_clock_skew_ms
        )
    })
}

/// Checks one received item against the receiver's own policy: the category
/// is declared, `up`, and of the item's kind; the key is valid; every stamp's
/// origin is allowed and not beyond `now_ms` plus the maximum clock skew;
/// the state is canonical.
pub fn validate_item(
    policy: &Policy,
    now_ms: u64,
    origin_allowed: impl Fn(&NodeId) -> bool,
    w: &WireItem,
) -> Result<(), String> {
    let at = || format!("{}/{}", w.category, w.key);
    check_limits(policy, w).map_err(|e| format!("{}: {e}", at()))?;
    if w.category == crate::aggregate::COUNTERS_CATEGORY {
        return validate_counters(policy, now_ms, origin_allowed, w);
    }
    if w.category == crate::conflict::CONFLICTS_CATEGORY {
        crate::conflict::validate(policy, &w.key, &w.item).map_err(|e| format!("{}: {e}", at()))?;
        return check_stamps(policy, now_ms, origin_allowed, w);
    }
    let cat = policy
        .category(&w.category)
        .map_err(|e| format!("{}: {e}", at()))?;
    if cat.replicate != Replicate::Up {
        return Err(format!(
            "{}: category {:?} is private (replicate = \"local\") and never leaves its node",
            at(),
            w.category
        ));
    }
    policy
        .check_key(&w.key)
        .map_err(|e| format!("{}: {e}", at()))?;
    let kind_ok = matches!(
        (&w.item, cat.kind),
        (Item::Record(_), Kind::Record) | (Item::Log(_), Kind::Log)
    );
    if !kind_ok {
        return Err(format!(
            "{}: item kind does not match the category's kind {:?}",
            at(),
            cat.kind
        ));
    }
    if let Item::Record(r) = &w.item
        && !r.is_canonical()
    {
        return Err(format!("{}: record state is not canonical", at()));
    }
    // What it adds to an aggregate is within range (a value beyond
    // `MAX_SUMMED` would otherwise stop this node's merges, or be clamped).
    for agg in crate::aggregate::Compiled::all(policy)
        .iter()
        .filter(|a| a.source == w.category)
    {
        agg.contribution(&w.item)
            .map_err(|e| format!("{}: {e}", at()))?;
    }
    check_stamps(policy, now_ms, origin_allowed, w)
}

/// The most bytes one received item may take encoded, whatever wrote it:
/// half a frame, so that the sender can always ship it alone with the
/// watermarks of its range (`Policy::validate` keeps `max_item_bytes` at or
/// below it).
pub fn max_wire_item_bytes(policy: &Policy) -> usize {
    policy.limits.max_frame_bytes / 2
}

/// The size a value counts for against `max_item_bytes`: its text, or 8.
fn value_bytes(v: &crate::value::Value) -> usize {
    use crate::value::Value;
    match v {
        Value::Str(s) | Value::Json(s) => s.len(),
        Value::Bool(_) | Value::Int(_) | Value::Float(_) => 8,
    }
}

/// The policy's size limits on one received item, as its writers' own
/// writes were held to them: each origin's visible fields at most
/// `max_fields` and their names and values at most `max_item_bytes`; an item
/// of one origin (a log entry, a record only one node wrote) at most
/// `max_item_bytes` encoded, exactly as a local write is checked; a record
/// several nodes wrote (their fields merge) and counters (one share per city)
/// at most [`max_wire_item_bytes`]. Field names are checked as a local write
/// checks them.
pub fn check_limits(policy: &Policy, w: &WireItem) -> Result<(), String> {
    let l = &policy.limits;
    let encoded = crate::codec::encoded_len(&w.item).map_err(|e| e.to_string())? + 1;
    let single_origin_max = if w.category == crate::conflict::CONFLICTS_CATEGORY {
        // The loser's content plus its category and key.
        l.max_item_bytes + l.max_key_bytes + 256
    } else {
        l.max_item_bytes
    };
    let fields_max = if w.category == crate::conflict::CONFLICTS_CATEGORY {
        l.max_fields + 2
    } else {
        l.max_fields
    };
    let too_large = |size: usize, max: usize, what: &str| {
        (size > max).then(|| {
            format!("{what} is {size} bytes, over the policy's limit of {max} (max_item_bytes)")
        })
    };
    let names = |fields: &mut dyn Iterator<Item = &String>| -> Result<(), String> {
        let names: Vec<&String> = fields.collect();
        if names.len() > fields_max {
            return Err(format!(
                "{} fields, over the policy's limit of {fields_max} (max_fields)",
                names.len()
            ));
        }
        policy
            .check_fields(names.into_iter())
            .map_err(|e| e.to_string())
    };
    match &w.item {
        // A ledger entry's content names its category and key in fields
        // that no document may use; `conflict::validate` checks them.
        Item::Log(e) if w.category == crate::conflict::CONFLICTS_CATEGORY => {
            if e.fields.len() > fields_max {
                return Err(format!(
                    "{} fields, over the policy's limit of {fields_max} (max_fields)",
                    e.fields.len()
                ));
            }
            if let Some(why) = too_large(encoded, single_origin_max, "the entry") {
                return Err(why);
            }
        }
        Item::Log(e) => {
            names(&mut e.fields.keys())?;
            if let Some(why) = too_large(encoded, single_origin_max, "the entry") {
                return Err(why);
            }
        }
        Item::Record(r) => {
            let mut by_origin: BTreeMap<&NodeId, (usize, usize)> = BTreeMap::new();
            for (name, value, stamp) in r.fields() {
                crate::policy::check_field_name(name)?;
                let slot = by_origin.entry(&stamp.origin).or_default();
                if let Some(v) = value {
                    let size = name.len() + value_bytes(v);
                    if let Some(why) = too_large(size, l.max_item_bytes, &format!("field {name:?}"))
                    {
                        return Err(why);
                    }
                    slot.0 += 1;
                    slot.1 += size;
                }
            }
            for (origin, (fields, bytes)) in &by_origin {
                if *fields > l.max_fields {
                    return Err(format!(
                        "{fields} fields written by {origin}, over the policy's limit of {} (max_fields)",
                        l.max_fields
                    ));
                }
                if let Some(why) =
                    too_large(*bytes, l.max_item_bytes, &format!("what {origin} wrote"))
                {
                    return Err(why);
                }
            }
            let max = if r.stamps().map(|s| &s.origin).collect::<BTreeSet<_>>().len() <= 1 {
                single_origin_max
            } else {
                max_wire_item_bytes(policy)
            };
            if let Some(why) = too_large(encoded, max, "the record") {
                return Err(why);
            }
        }
        Item::Counters(c) => {
            for g in c.group.iter().flatten() {
                if let Some(why) = too_large(g.len(), l.max_item_bytes, "a group value") {
                    return Err(why);
                }
            }
            if let Some(why) = too_large(encoded, max_wire_item_bytes(policy), "the counters") {
                return Err(why);
            }
        }
    }
    Ok(())
}

/// Every stamp's origin is allowed and not beyond `now_ms` plus the maximum
/// clock skew.
fn check_stamps(
    policy: &Policy,
    now_ms: u64,
    origin_allowed: impl Fn(&NodeId) -> bool,
    w: &WireItem,
) -> Result<(), String> {
    let at = || format!("{}/{}", w.category, w.key);
    for s in w.item.stamps() {
        if !origin_allowed(&s.origin) {
            return Err(format!(
                "{}: origin {} is not the sender or a node of its subtree",
                at(),
                s.origin
            ));
        }
        if let Some(why) = too_far_ahead(s.hlc, now_ms, policy) {
            return Err(format!("{}: {why}", at()));
        }
    }
    Ok(())
}

/// Checks received aggregate counters: the aggregate is declared over a
/// private category, the key is the one its group maps to, the shape fits
/// the definition, and every actor is the sender or in its subtree.
fn validate_counters(
    policy: &Policy,
    now_ms: u64,
    origin_allowed: impl Fn(&NodeId) -> bool,
    w: &WireItem,
) -> Result<(), String> {
    let at = format!("{}/{}", w.category, w.key);
    let Item::Counters(c) = &w.item else {
        return Err(format!(
            "{at}: only aggregate counters belong to this category"
        ));
    };
    let def = policy
        .aggregates
        .get(&c.aggregate)
        .ok_or_else(|| format!("{at}: no aggregate named {:?} is declared", c.aggregate))?;
    let compiled =
        crate::aggregate::Compiled::new(&c.aggregate, def).map_err(|e| format!("{at}: {e}"))?;
    let private = policy
        .categories
        .get(&compiled.source)
        .is_some_and(|s| s.replicate == Replicate::Local);
    if !private {
        return Err(format!(
            "{at}: counters travel only for aggregates over private categories"
        ));
    }
    if c.group.len() != compiled.dims.len()
        || c.measures != compiled.measures.len()
        || !c.well_formed()
    {
        return Err(format!(
            "{at}: counters do not fit the definition of {} (one value per measure, each within ±{})",
            c.aggregate,
            crate::aggregate::MAX_SHARE
        ));
    }
    // A small group publishes nothing (privacy.min_group_size).
    if let Some(count_at) = compiled.count_index()
        && !c.all_public(count_at, policy.privacy.min_group_size)
    {
        return Err(format!(
            "{at}: a share counts fewer than privacy.min_group_size ({}) items",
            policy.privacy.min_group_size
        ));
    }
    // A city counts only its own opportunities: in a group by origin, the
    // one share is the origin's.
    if let Some(i) = compiled.dims.iter().position(|d| *d == Dimension::Origin) {
        let origin = c.group.get(i).cloned().flatten();
        if let Some(bad) = c
            .actors()
            .into_iter()
            .find(|a| origin.as_deref() != Some(a.as_str()))
        {
            return Err(format!(
                "{at}: counter share of {bad} in a group of origin {}",
                origin.as_deref().unwrap_or("(none)")
            ));
        }
    }
    if w.key != compiled.counters_key(&c.group) {
        return Err(format!("{at}: key does not match the counters' group"));
    }
    policy.check_key(&w.key).map_err(|e| format!("{at}: {e}"))?;
    // A share versioned in the future would overrule its city's real
    // totals until then.
    if let Some(why) = c
        .shares
        .values()
        .find_map(|s| too_far_ahead(s.version, now_ms, policy))
    {
        return Err(format!("{at}: {why}"));
    }
    if let Some(bad) = c.actors().into_iter().find(|a| !origin_allowed(a)) {
        return Err(format!(
            "{at}: counter actor {bad} is not the sender or a node of its subtree"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
