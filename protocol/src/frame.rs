//! Frames exchanged on a replication link (child → parent and back).
//!
//! Encoded by [`crate::codec`] with a length prefix and version byte. Field
//! order is part of the wire format: append new variants at the end and bump
//! [`crate::codec::VERSION`] for anything else.

use serde::{Deserialize, Serialize};

use crate::clock::Hlc;
use crate::id::{NodeId, Tier};
use crate::item::Item;

/// The replication protocol version spoken in `Hello`.
///
/// Version 2: `Welcome` carries the HLC of the child's change at the cursor
/// (so a child whose data went back in time notices) and the parent's wall
/// clock (so the child knows its clock offset).
pub const PROTOCOL_VERSION: u32 = 2;

/// A changed item as it travels upward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireItem {
    /// Category name (must be `up` under the receiver's policy).
    pub category: String,
    /// The item's key within its category.
    pub key: String,
    /// The sender's whole current state of the item.
    pub item: Item,
}

/// Why a parent refused a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The child is not in the parent's configuration.
    UnknownChild,
    /// The certificate's node id differs from the one in `Hello`.
    IdMismatch,
    /// The child's tier is not below the parent's.
    TierNotBelow,
    /// The policy digests differ.
    PolicyMismatch,
    /// The protocol version is not supported.
    UnsupportedVersion,
    /// A frame broke a rule (private category, foreign origin, future stamp…).
    Violation,
}

/// A replication frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Child → parent, first frame of a link.
    Hello {
        /// [`PROTOCOL_VERSION`] of the child.
        protocol: u32,
        /// The id the child claims (checked against its certificate).
        node: NodeId,
        /// The child's tier.
        tier: Tier,
        /// SHA-256 of the child's canonical policy.
        policy_digest: [u8; 32],
        /// Random id of the child's data directory: a parent keeps its cursor
        /// per incarnation, so a child whose data was wiped starts over.
        incarnation: u64,
        /// The nodes below the child whose items it relays.
        subtree: Vec<NodeId>,
    },
    /// Parent → child: accepted; stream from after `resume_from`.
    Welcome {
        /// The last child sequence number the parent has durably merged.
        resume_from: u64,
        /// The HLC of the child's changelog entry `resume_from`, as the
        /// parent received it ([`Hlc::ZERO`] when unknown). A child whose
        /// entry `resume_from` is missing or has another HLC went back in
        /// time (a restore, a power cut of a buffered node) and must not
        /// stream after it.
        resume_hlc: Hlc,
        /// The parent's wall clock in ms since the epoch when it answered:
        /// the child checks its own clock's offset against it.
        now_ms: u64,
    },
    /// Parent → child: refused; the link closes.
    Refuse {
        /// Machine-readable reason.
        reason: RefuseReason,
        /// What was wrong, for the child's log.
        message: String,
    },
    /// Child → parent: changed items up to the child's sequence `last_seq`.
    Batch {
        /// The child's changelog position this batch continues from: the
        /// parent advances its cursor only if it already holds everything up
        /// to here, so a cursor never skips a range.
        after: u64,
        /// Child's changelog position this batch brings the parent to.
        last_seq: u64,
        /// The HLC of the child's changelog entry `last_seq`.
        upto_hlc: Hlc,
        /// The items (current state of every `up` item changed in the range).
        items: Vec<WireItem>,
        /// Completeness watermarks of the child's subtree reached in the range.
        watermarks: Vec<Watermark>,
    },
    /// Parent → child: everything up to `last_seq` is durably merged.
    Ack {
        /// The acknowledged child sequence number.
        last_seq: u64,
    },
    /// Liveness probe.
    Ping {
        /// Echoed in the reply.
        nonce: u64,
    },
    /// Child → parent during catch-up: a chunk of the child's `up` items.
    SnapshotChunk {
        /// The items.
        items: Vec<WireItem>,
    },
    /// Child → parent: the snapshot is complete and covers the child's
    /// changelog up to `last_seq`; streaming continues after it.
    SnapshotDone {
        /// The child's last sequence number when the snapshot started.
        last_seq: u64,
        /// The HLC of that changelog entry.
        upto_hlc: Hlc,
        /// The child's watermarks of its subtree when the snapshot started.
        watermarks: Vec<Watermark>,
    },
    /// Parent → child: a snapshot chunk is merged.
    SnapshotAck,
}

/// "Everything `origin` wrote up to its sequence `seq` (at HLC `hlc`) is
/// here": carried up with the data so every tier knows how complete it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The node whose changes are complete.
    pub origin: NodeId,
    /// The incarnation of its data directory (sequence numbers restart when
    /// a node's data is wiped; a different incarnation replaces the old).
    pub incarnation: u64,
    /// Its changelog sequence number.
    pub seq: u64,
    /// The HLC of that change.
    pub hlc: Hlc,
}
