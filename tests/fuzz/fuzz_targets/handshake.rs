//! A link session driven by a script decoded from the fuzz input.
//!
//! Byte 0 picks the side: bit 7 clear, the parent's `Downlink` (`zhejiang`,
//! a province, or the national node when bit 6 is set; children `hangzhou`
//! and `ningbo`) with the peer `IDS[(byte & 0x3f) % 6]`; bit 7 set, a city's `Uplink` whose changelog holds
//! entries `(low bits) + 1 ..= 20`. Then, repeatedly, an op byte (see
//! `tiersync_fuzz::op`): a codec frame for the session (garbage ends the
//! script, as it ends the connection), a driver answer, or a reconnect.
//!
//! Nothing may panic, and the session must refuse rather than accept what
//! the rules forbid: the parent accepts only a configured child that is who
//! its certificate says, of a lower tier, with the same policy and a
//! possible subtree; it merges only items it may accept (`up` category or
//! counters of an aggregate over a private category, origins in the
//! child's subtree, no stamp beyond its clock's skew), only ranges that
//! continue its cursor, and acknowledges only what was merged. The child
//! never reports as acknowledged what it did not send, never asks for
//! entries its changelog no longer holds, and sends contiguous ranges.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use tiersync_fuzz::{
    NOW_MS, assert_allocations_bounded, downlink_config, handshake_seeds, id, max_frame_bytes, op,
    policy, trace, write_corpus_if_asked,
};
use tiersync_protocol::codec;
use tiersync_protocol::frame::{Frame, PROTOCOL_VERSION, WireItem};
use tiersync_protocol::sync::{
    Downlink, DownlinkEvent, LoadedBatch, Uplink, UplinkConfig, UplinkEvent,
};
use tiersync_protocol::{Hlc, Item, NodeId, Policy, Replicate, Tier};

/// Reads the script: op bytes, their arguments and frames.
struct Script<'a>(&'a [u8]);

enum Step {
    Frame(Frame),
    Cursor(u64),
    Merged,
    Changes(u64),
    Reconnect,
}

impl Script<'_> {
    fn next(&mut self) -> Option<Step> {
        let (&o, rest) = self.0.split_first()?;
        self.0 = rest;
        match o % 8 {
            op::CURSOR | op::CHANGES => {
                let (&a, rest) = self.0.split_first()?;
                self.0 = rest;
                Some(if o % 8 == op::CURSOR {
                    Step::Cursor(u64::from(a))
                } else {
                    Step::Changes(u64::from(a))
                })
            }
            op::MERGED => Some(Step::Merged),
            op::RECONNECT => Some(Step::Reconnect),
            _ => {
                let (f, n) = codec::decode_frame::<Frame>(self.0, max_frame_bytes()).ok()??;
                self.0 = &self.0[n..];
                Some(Step::Frame(f))
            }
        }
    }
}

fuzz_target!(
    init: write_corpus_if_asked("handshake", handshake_seeds),
    |data: &[u8]| {
        let Some((&header, rest)) = data.split_first() else {
            return;
        };
        let script = Script(rest);
        if header & 0x80 == 0 {
            parent(id(usize::from(header & 0x3f)), header & 0x40 != 0, script);
        } else {
            child(u64::from(header & 0x7f) % 21, script);
        }
        assert_allocations_bounded();
    }
);

/// What a parent may merge from `allowed` (the child and its subtree).
fn assert_acceptable(policy: &Policy, allowed: &BTreeSet<NodeId>, w: &WireItem) {
    let limit = NOW_MS + policy.limits.max_clock_skew_ms;
    match &w.item {
        Item::Counters(c) => {
            assert_eq!(w.category, tiersync_protocol::aggregate::COUNTERS_CATEGORY);
            let def = policy
                .aggregates
                .get(&c.aggregate)
                .expect("declared aggregate");
            let source = &policy.categories[&def.source];
            assert_eq!(
                source.replicate,
                Replicate::Local,
                "counters of a shared category"
            );
            assert!(
                c.actors().iter().all(|a| allowed.contains(a)),
                "foreign actor"
            );
        }
        item => {
            let cat = policy
                .categories
                .get(&w.category)
                .expect("declared category");
            assert_eq!(
                cat.replicate,
                Replicate::Up,
                "accepted a private item {}",
                w.category
            );
            for s in item.stamps() {
                assert!(
                    allowed.contains(&s.origin),
                    "accepted a foreign origin {}",
                    s.origin
                );
                assert!(
                    s.hlc.physical_ms <= limit,
                    "accepted a stamp from the future"
                );
            }
            if let Item::Record(r) = item {
                assert!(r.is_canonical(), "accepted a non-canonical record");
            }
        }
    }
}

fn parent(peer: NodeId, national: bool, mut script: Script) {
    let policy = policy();
    let cfg = downlink_config(&policy, national);
    let mut d = Downlink::new(cfg.clone(), peer.clone());
    let mut last_frame: Option<Frame> = None;
    let mut allowed: Option<BTreeSet<NodeId>> = None;
    let mut awaiting_cursor = false;
    let mut cursor_given: Option<u64> = None;
    // The cursor as the parent's store holds it, and a merge asked for.
    let mut durable = 0u64;
    let mut pending: Option<Option<u64>> = None;
    let mut closed = false;
    for _ in 0..256 {
        let Some(step) = script.next() else { break };
        let fed = match step {
            Step::Frame(f) => {
                d.handle_frame(f.clone(), NOW_MS, &policy);
                last_frame = Some(f);
                true
            }
            Step::Cursor(c) => {
                if awaiting_cursor {
                    cursor_given = Some(c);
                    durable = c;
                }
                d.cursor_loaded(c, tiersync_protocol::Hlc::ZERO, NOW_MS);
                false
            }
            Step::Merged => {
                if let Some(p) = pending.take() {
                    if let Some(seq) = p {
                        durable = durable.max(seq);
                    }
                    d.merged();
                }
                false
            }
            Step::Changes(_) | Step::Reconnect => false,
        };
        while let Some(ev) = d.poll_event() {
            if trace() {
                eprintln!("parent: {ev:?}");
            }
            assert!(!closed, "an event after Close: {ev:?}");
            match ev {
                DownlinkEvent::Accepted { child, subtree, .. } => {
                    let Some(Frame::Hello {
                        protocol,
                        node,
                        tier,
                        policy_digest,
                        ..
                    }) = last_frame.as_ref().filter(|_| fed)
                    else {
                        panic!("accepted without a Hello");
                    };
                    assert_eq!(*protocol, PROTOCOL_VERSION);
                    assert!(*node == peer && child == peer, "accepted an impostor");
                    assert!(cfg.children.contains(&child), "accepted an unknown child");
                    assert!(*tier < cfg.tier, "accepted a child not below");
                    assert_eq!(*policy_digest, cfg.policy_digest);
                    assert!(*tier != Tier::City || subtree.is_empty());
                    let mut set = BTreeSet::from([child]);
                    for n in subtree {
                        assert!(
                            n != cfg.node && !cfg.children.contains(&n),
                            "impossible subtree"
                        );
                        assert!(set.insert(n), "a subtree node twice");
                    }
                    allowed = Some(set);
                    awaiting_cursor = true;
                }
                DownlinkEvent::Send(Frame::Welcome { resume_from, .. }) => {
                    assert_eq!(
                        Some(resume_from),
                        cursor_given,
                        "welcome without the cursor"
                    );
                    awaiting_cursor = false;
                }
                DownlinkEvent::Dropped { .. } => {}
                DownlinkEvent::Merge {
                    items,
                    cursor,
                    watermarks,
                    ..
                } => {
                    let allowed = allowed.as_ref().expect("merge before the handshake");
                    assert!(
                        pending.is_none(),
                        "a second merge before the first committed"
                    );
                    assert!(fed && !awaiting_cursor);
                    assert!(items.len() <= policy.limits.max_batch_items);
                    for w in &items {
                        assert_acceptable(&policy, allowed, w);
                    }
                    for w in &watermarks {
                        assert!(allowed.contains(&w.origin), "watermark of a foreign node");
                    }
                    match (&last_frame, cursor) {
                        (
                            Some(Frame::Batch {
                                after, last_seq, ..
                            }),
                            Some((seq, _)),
                        ) => {
                            assert!(*after <= durable, "a range that skips the cursor");
                            assert_eq!(*last_seq, seq);
                        }
                        (Some(Frame::SnapshotDone { last_seq, .. }), Some((seq, _))) => {
                            assert_eq!(*last_seq, seq);
                        }
                        (Some(Frame::SnapshotChunk { .. }), None) => {}
                        (f, c) => panic!("merge {c:?} for {f:?}"),
                    }
                    pending = Some(cursor.map(|c| c.0));
                }
                DownlinkEvent::Send(Frame::Ack { last_seq }) => {
                    assert!(last_seq <= durable, "acknowledged what is not durable");
                }
                DownlinkEvent::Send(Frame::SnapshotAck) => {}
                DownlinkEvent::Send(Frame::Refuse { .. }) => {}
                DownlinkEvent::Send(other) => panic!("a parent sent {other:?}"),
                DownlinkEvent::Close { .. } => {
                    assert!(d.is_closed());
                    closed = true;
                }
            }
        }
    }
}

fn child(retained_from: u64, mut script: Script) {
    let cfg = UplinkConfig {
        node: id(1),
        tier: Tier::City,
        policy_digest: policy().digest(),
        incarnation: 7,
        window: 2,
    };
    let mut local_last = 20u64;
    let mut retained = retained_from.max(1);
    let hlc = |seq: u64| Hlc {
        physical_ms: NOW_MS - 10_000 + seq,
        logical: 0,
    };
    let mut u = Uplink::new(cfg, local_last, hlc(local_last), retained);
    u.connected(Vec::new());
    // Highest sequence number sent on any connection, and the contiguous
    // position on the current one.
    let mut sent_max = 0u64;
    let mut acked = 0u64;
    for _ in 0..256 {
        let Some(step) = script.next() else { break };
        match step {
            Step::Frame(f) => u.handle_frame(f),
            Step::Changes(n) => {
                local_last += n;
                u.changes_available(local_last, hlc(local_last));
            }
            Step::Reconnect => {
                u.disconnected();
                u.connected(Vec::new());
            }
            Step::Cursor(_) | Step::Merged => {}
        }
        // Let the driver answer loads a bounded number of times per step.
        for _ in 0..64 {
            let Some(ev) = u.poll_event() else { break };
            if trace() {
                eprintln!("child: {ev:?}");
            }
            match ev {
                UplinkEvent::Send(Frame::Batch {
                    after, last_seq, ..
                }) => {
                    assert!(after < last_seq && last_seq <= local_last, "bad range");
                    sent_max = sent_max.max(last_seq);
                }
                UplinkEvent::Send(Frame::SnapshotDone { last_seq, .. }) => {
                    assert!(last_seq <= local_last);
                    sent_max = sent_max.max(last_seq);
                }
                UplinkEvent::Send(
                    Frame::Hello { .. } | Frame::SnapshotChunk { .. } | Frame::Ping { .. },
                ) => {}
                UplinkEvent::Send(other) => panic!("a child sent {other:?}"),
                UplinkEvent::LoadBatch { after, epoch } => {
                    assert!(
                        after + 1 >= retained,
                        "asked for trimmed entries after {after}"
                    );
                    assert!(after < local_last, "asked for nothing");
                    let last_seq = local_last.min(after + 3);
                    u.batch_loaded(
                        epoch,
                        LoadedBatch {
                            last_seq,
                            upto_hlc: hlc(last_seq),
                            items: Vec::new(),
                            watermarks: Vec::new(),
                        },
                    );
                }
                UplinkEvent::LoadSnapshot { after, epoch } => {
                    let next = if after.is_none() {
                        Some(("customer".to_string(), "c1".to_string()))
                    } else {
                        None
                    };
                    u.snapshot_loaded(epoch, Vec::new(), next, Vec::new());
                }
                UplinkEvent::CheckResume { seq, hlc: at, epoch } => {
                    // This child's changelog: entry n carries hlc(n); the
                    // last trimmed one is the mark.
                    let entry = (seq >= retained && seq <= local_last).then(|| hlc(seq));
                    let mark = (retained > 1).then(|| (retained - 1, hlc(retained - 1)));
                    let ok = tiersync_protocol::sync::resume_matches(seq, at, entry, mark);
                    u.resume_checked(epoch, ok);
                }
                UplinkEvent::Reincarnate { .. } => {
                    // A new history: the parent acknowledges it from 0.
                    acked = 0;
                    u.reincarnated(local_last.wrapping_add(1));
                }
                UplinkEvent::Acked { seq } => {
                    assert!(seq <= sent_max, "acknowledged {seq}, beyond what was sent");
                    assert!(seq > acked, "acknowledgements go forward");
                    acked = seq;
                    retained = retained.max(seq + 1);
                    u.trimmed(retained);
                }
                UplinkEvent::Close { .. } => {
                    u.disconnected();
                    u.connected(Vec::new());
                }
            }
        }
    }
}
