//! Hybrid logical clocks and stamps.
//!
//! A [`Stamp`] orders every write in the deployment: the HLC first, then the
//! origin node id, so two distinct writes never share a stamp and every merge
//! picks the same winner everywhere. The clock never reads time itself; the
//! caller passes the wall clock in milliseconds.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::NodeId;

/// A hybrid logical clock value: wall-clock milliseconds plus a counter that
/// orders events within one millisecond (or while the wall clock stands still
/// or steps back).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (as far as the issuing node knew).
    pub physical_ms: u64,
    /// Orders events that share `physical_ms`.
    pub logical: u32,
}

impl Hlc {
    /// The smallest value; every real stamp is above it.
    pub const ZERO: Hlc = Hlc {
        physical_ms: 0,
        logical: 0,
    };

    /// The next value after `self`.
    pub fn successor(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc {
                physical_ms: self.physical_ms,
                logical,
            },
            None => Hlc {
                physical_ms: self.physical_ms.saturating_add(1),
                logical: 0,
            },
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms, self.logical)
    }
}

/// When and where a value was written: the HLC, then the origin node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// The HLC at the origin when the write happened.
    pub hlc: Hlc,
    /// The node that accepted the write from a client.
    pub origin: NodeId,
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hlc, self.origin)
    }
}

/// One node's hybrid logical clock.
///
/// Monotonic: every [`tick`](HlcClock::tick) returns a value above every value
/// it returned or [`observe`](HlcClock::observe)d before, whatever the wall
/// clock does. Restore it across restarts with [`HlcClock::resume`] from the
/// highest stamp the node persisted.
#[derive(Debug, Clone)]
pub struct HlcClock {
    node: NodeId,
    last: Hlc,
}

impl HlcClock {
    /// A fresh clock for `node`.
    pub fn new(node: NodeId) -> Self {
        Self::resume(node, Hlc::ZERO)
    }

    /// A clock that continues above `last`, the highest HLC this node persisted.
    pub fn resume(node: NodeId, last: Hlc) -> Self {
        Self { node, last }
    }

    /// The node this clock stamps for.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The highest HLC issued or observed so far.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// The stamp a new local write at wall time `now_ms` would get, without
    /// issuing it.
    pub fn peek(&self, now_ms: u64) -> Stamp {
        Stamp {
            hlc: self.next_hlc(now_ms),
            origin: self.node.clone(),
        }
    }

    /// Issues a stamp for a local write at wall time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Stamp {
        let stamp = self.peek(now_ms);
        self.last = stamp.hlc;
        stamp
    }

    /// Takes a remote HLC into account, so later local writes order after it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }

    /// Whether the clock runs more than `max_ahead_ms` ahead of the wall
    /// clock `now_ms`: the wall clock jumped ahead and came back (or a
    /// restored high-water mark came from such a time). Stamping on from
    /// `last` would put every later write that far in the future, where
    /// parents refuse it and where it would overrule writes made later
    /// elsewhere; [`HlcClock::recover`] starts again from the wall clock.
    pub fn runs_ahead(&self, now_ms: u64, max_ahead_ms: u64) -> bool {
        self.last.physical_ms > now_ms.saturating_add(max_ahead_ms)
    }

    /// Starts again from the wall clock `now_ms`, below values issued
    /// before (the one deliberate step back of an HLC). Callers keep two
    /// rules that make it safe: a local write observes the stamps of the
    /// item it changes before it ticks, so it still wins over them; and
    /// only writes no other node holds yet are re-stamped
    /// ([`crate::item::Item::restamp`]).
    pub fn recover(&mut self, now_ms: u64) {
        self.last = Hlc {
            physical_ms: now_ms,
            logical: 0,
        };
    }

    fn next_hlc(&self, now_ms: u64) -> Hlc {
        if now_ms > self.last.physical_ms {
            Hlc {
                physical_ms: now_ms,
                logical: 0,
            }
        } else {
            self.last.successor()
        }
    }
}

/// The time a node stamps with: its wall clock `wall_ms`, but never more
/// than `slack_ms` (half the policy's `max_clock_skew_ms`) ahead of its
/// parent's clock `parent_ms` (as last measured, carried forward by a
/// monotonic clock; `None` before the first handshake and at the root).
///
/// Only a node ahead of its parent is held back: the parent refuses stamps
/// beyond its own clock plus the skew, so such a node would otherwise stop
/// its link (and, at a province, its whole subtree) for as long as its
/// clock is wrong, and its stamps would overrule writes made later
/// elsewhere. A node behind its parent is never moved forward, so a root
/// whose clock jumps ahead does not drag the tree with it.
pub fn bounded_now(wall_ms: u64, parent_ms: Option<u64>, slack_ms: u64) -> u64 {
    match parent_ms {
        Some(p) => wall_ms.min(p.saturating_add(slack_ms)),
        None => wall_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node() -> NodeId {
        NodeId::new("n1").unwrap()
    }

    #[test]
    fn follows_wall_clock_when_it_advances() {
        let mut c = HlcClock::new(node());
        assert_eq!(
            c.tick(100).hlc,
            Hlc {
                physical_ms: 100,
                logical: 0
            }
        );
        assert_eq!(
            c.tick(100).hlc,
            Hlc {
                physical_ms: 100,
                logical: 1
            }
        );
        assert_eq!(
            c.tick(250).hlc,
            Hlc {
                physical_ms: 250,
                logical: 0
            }
        );
    }

    #[test]
    fn never_goes_back_when_wall_clock_steps_back() {
        let mut c = HlcClock::new(node());
        let a = c.tick(10_000);
        let b = c.tick(5_000);
        assert!(b > a);
        assert_eq!(b.hlc.physical_ms, 10_000);
    }

    #[test]
    fn resume_continues_above_persisted_value() {
        let persisted = Hlc {
            physical_ms: 9_000,
            logical: 7,
        };
        let mut c = HlcClock::resume(node(), persisted);
        assert!(c.tick(1).hlc > persisted);
    }

    #[test]
    fn logical_overflow_carries_into_physical() {
        let mut c = HlcClock::resume(
            node(),
            Hlc {
                physical_ms: 5,
                logical: u32::MAX,
            },
        );
        assert_eq!(
            c.tick(0).hlc,
            Hlc {
                physical_ms: 6,
                logical: 0
            }
        );
    }

    #[test]
    fn observe_orders_later_writes_after_remote() {
        let mut c = HlcClock::new(node());
        c.observe(Hlc {
            physical_ms: 50_000,
            logical: 3,
        });
        assert!(
            c.tick(10).hlc
                > Hlc {
                    physical_ms: 50_000,
                    logical: 3
                }
        );
    }

    proptest! {
        #[test]
        fn ticks_are_strictly_increasing(walls in proptest::collection::vec(0u64..1_000, 1..200)) {
            let mut c = HlcClock::new(node());
            let mut prev = c.tick(0);
            for w in walls {
                let s = c.tick(w);
                prop_assert!(s > prev);
                prev = s;
            }
        }
    }

    #[test]
    fn runs_ahead_only_beyond_the_bound() {
        let c = HlcClock::resume(
            node(),
            Hlc {
                physical_ms: 10_000,
                logical: 3,
            },
        );
        assert!(!c.runs_ahead(9_000, 1_000));
        assert!(c.runs_ahead(8_999, 1_000));
    }

    #[test]
    fn recover_stamps_at_the_wall_clock_again() {
        let mut c = HlcClock::resume(
            node(),
            Hlc {
                physical_ms: 3_600_000,
                logical: 0,
            },
        );
        c.recover(1_000);
        assert_eq!(c.tick(1_000).hlc.physical_ms, 1_000);
        assert_eq!(c.tick(2_000).hlc.physical_ms, 2_000);
    }

    #[test]
    fn a_node_ahead_of_its_parent_is_held_back_and_one_behind_is_not() {
        assert_eq!(bounded_now(10_000, None, 500), 10_000);
        assert_eq!(bounded_now(10_000, Some(10_000), 500), 10_000);
        assert_eq!(bounded_now(10_400, Some(10_000), 500), 10_400);
        assert_eq!(bounded_now(3_600_000, Some(0), 500), 500);
        // behind: never moved forward by its parent
        assert_eq!(bounded_now(0, Some(3_600_000), 500), 0);
    }
}
