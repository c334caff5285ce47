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
pub const PROTOCOL_VERSION: u32 = 1;

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
    },
    /// Parent → child: accepted; stream from after `resume_from`.
    Welcome {
        /// The last child sequence number the parent has durably merged.
        resume_from: u64,
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
        /// Child's changelog position this batch brings the parent to.
        last_seq: u64,
        /// The child's HLC when it sent the batch (for lag in seconds).
        sent_at: Hlc,
        /// The items.
        items: Vec<WireItem>,
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
}
