//! A deterministic simulation of a whole deployment: 1 national, 2
//! provinces, 2 cities each, every node with an in-memory store and
//! changelog, driven through the real `Uplink`/`Downlink` state machines by a
//! seeded PRNG on a virtual clock.
//!
//! # Fault model
//!
//! A link is one QUIC connection carrying one bidirectional stream. Within a
//! connection, frames therefore arrive in order and exactly once, until the
//! connection breaks, after which nothing more of it arrives. The simulation
//! injects only what a real network and real processes can do to that:
//!
//! * **Virtual time.** Every step advances a simulated clock by 0–39 ms.
//!   Each node reads it with a fixed skew of up to 300 ms (well within
//!   `max_clock_skew_ms`); HLC stamps, the parent's `now_ms` and the idle
//!   timeout all use it.
//! * **Connection resets.** A frame in flight, in either direction, is lost
//!   and the connection breaks with it (a reset, a NAT rebinding, a crashed
//!   middlebox); a random step may also close a healthy connection. The
//!   child reconnects later (the `connect` steps model its backoff).
//! * **Partitions**, two-way or one-way, for 100 ms to three idle timeouts.
//!   Frames in a blocked direction are held, not lost: QUIC retransmits them,
//!   so a partition shorter than the idle timeout only delays them. When a
//!   direction stays blocked for [`IDLE_TIMEOUT_MS`] the connection breaks,
//!   as QUIC's idle timeout breaks it on the side that hears nothing
//!   (keep-alives keep a healthy link busy), and whatever was still held is
//!   lost. No connection opens across a partition (the handshake needs both
//!   directions). In the one-way "acks lost" case, batches still reach the
//!   parent and are merged while its Acks are held: the child must not trim
//!   what was not acknowledged (checked at every trim), and resends after the
//!   timeout-driven reconnect.
//! * **Duplication and reordering across connections**, the only kind QUIC
//!   allows. After a reconnect the child resends from the parent's durable
//!   cursor, so batches whose Ack was lost arrive twice (duplicate batches).
//!   The parent's driver reads no frame while it commits a merge, and a merge
//!   under way when its connection breaks still commits, later, after the
//!   new connection's Welcome read the cursor and interleaved with the new
//!   session's merges (late merges; a crash of the parent commits it or not
//!   at random; one whose child was wiped meanwhile is dropped, as a restore
//!   takes far longer than a write).
//!   Stronger than the network, as defence in depth: a batch of a closed
//!   connection is occasionally replayed into the new session of the same
//!   processes (replays); the parent's cursor check (`after` ≤ cursor) must
//!   make it harmless.
//! * **Process faults.** Restarts of any node (session state lost, durable
//!   state kept), a parent wiped and restored empty with a new incarnation
//!   (its children catch up, by snapshot when their changelog was trimmed),
//!   changelog trims after Acks.
//! * **Power cuts.** A city's writes are in its store at once but durable
//!   (and acknowledged) only at its next sync (the writer's group commit);
//!   a power cut loses everything since the last sync, at any node. The
//!   uplink may read only what is synced. A quarter of the cities run
//!   `buffered`: they acknowledge at once and ship what is not synced, so a
//!   power cut takes them back behind what their parent holds (their
//!   acknowledged writes since the sync may be lost: that is what
//!   `buffered` means).
//! * **Moves.** A city is moved to the other province (the operator edits
//!   both provinces' `children` and restarts them): its old province keeps
//!   what it received from it, including in records other cities edited
//!   too, and goes on relaying them; national drops writes of origins
//!   outside a child's subtree instead of refusing the link, and gets the
//!   moved city's writes through its new province (by snapshot).
//! * **Clock jumps.** A city's wall clock jumps ahead by more than
//!   `max_clock_skew_ms` (up to an hour more), and later back. Nodes read
//!   time as `node::now_ms` does (`clock::bounded_now`: never more than half
//!   the skew ahead of the parent's clock measured at the last Welcome,
//!   carried forward on virtual time); a restart forgets the measurement,
//!   so a city restarted with its clock ahead stamps in the future until its
//!   next Welcome, which re-stamps what its parent would refuse
//!   (`Store::restamp_unshipped`); a write that finds the HLC ahead of the
//!   clock starts it again (`Store::check_clock`).
//! * **Restores.** Any node is occasionally restored from a backup of its
//!   synced state taken earlier (data, changelog, cursors, clock and
//!   incarnation all go back). Acknowledged writes of a restored city made
//!   after its backup may be lost, unless they reached its parent.
//!   A node that went back in time must notice at its next handshake (the
//!   parent's cursor names a change it no longer has, or a different one)
//!   and take a new incarnation, so that its parent re-learns its data and
//!   no later write is skipped.
//!
//! Not injected, because QUIC (or TLS) rules them out: corruption,
//! duplication or reordering within a connection, a frame of one connection
//! arriving on another (other than the replays above), frames surviving a
//! restart of either end.
//!
//! # Checks after heal
//!
//! Partitions end, every link reconnects and the network runs until no frame
//! moves. Then:
//! * every non-city node's shared state, encoded with [`crate::codec`], is
//!   byte-identical to the encoded merge of its subtree's cities
//!   (divergence);
//! * national's shared state is byte-identical to the merge of every write a
//!   city acknowledged (synced), and contains each one's effect: a
//!   later write of the same key may supersede it, never lose it (lost
//!   acknowledged writes); a private write is still at its city. Where a
//!   restore or a power cut of a `buffered` city lost acknowledged writes,
//!   each tier holds at least the merge of its subtree and of what is left
//!   acknowledged, and at most that plus what was lost (a parent may keep
//!   what it received before the loss); a write that was never synced
//!   never reaches a parent;
//! * no private item above its city (private leaks);
//! * every node knows each node below it complete up to its last change
//!   (watermark gaps);
//! * no child trimmed changelog entries that its parent did not hold
//!   durably (unsafe trims);
//! * nothing above the cities is stamped beyond real time plus the allowed
//!   skew (future stamps).
//!
//! `topology_converges_under_faults` runs `TIERSYNC_SIM_SEEDS` seeds (1000)
//! from `TIERSYNC_SIM_FIRST_SEED` (1), `TIERSYNC_SIM_STEPS` steps each (600),
//! prints a one-line summary with the faults actually injected, and fails
//! with a replay command for the first failing seed. `SIM_DEBUG=1` logs link
//! closes.

use std::collections::VecDeque;

use super::*;
use crate::clock::HlcClock;
use crate::codec;
use crate::item::{LogEntry, Record};
use crate::policy::{Category, Limits};
use crate::value::Value;

/// A small xorshift PRNG: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn policy() -> Policy {
    let cat = |kind, replicate| Category {
        kind,
        replicate,
        customer_link: None,
        description: String::new(),
    };
    Policy {
        limits: Limits {
            max_batch_items: 8,
            ..Limits::default()
        },
        privacy: Default::default(),
        categories: BTreeMap::from([
            ("customer".to_string(), cat(Kind::Record, Replicate::Up)),
            ("billing".to_string(), cat(Kind::Log, Replicate::Up)),
            (
                "opportunity".to_string(),
                cat(Kind::Record, Replicate::Local),
            ),
        ]),
        aggregates: BTreeMap::new(),
    }
}

#[derive(Debug, Clone)]
enum Change {
    Item(ItemKey),
    Watermark(Watermark),
    Reincarnated,
}

struct Node {
    id: NodeId,
    tier: Tier,
    parent: Option<usize>,
    children: Vec<usize>,
    incarnation: u64,
    clock: HlcClock,
    store: BTreeMap<ItemKey, Item>,
    changelog: BTreeMap<u64, (Change, Hlc)>,
    last_seq: u64,
    retained_from: u64,
    cursors: BTreeMap<(NodeId, u64), (u64, Hlc)>,
    watermarks: BTreeMap<NodeId, Watermark>,
    relays: BTreeMap<NodeId, Relay>,
    /// `(seq, hlc)` of the last trimmed changelog entry.
    acked_mark: Option<(u64, Hlc)>,
    /// The parent this node last started under.
    last_parent: Option<usize>,
    uplink: Option<Uplink>,
    /// Acknowledges and ships writes before they are synced.
    buffered: bool,
    /// What a power cut leaves: the state as of the last sync.
    synced: Option<Box<Disk>>,
    /// A backup of the synced state.
    backup: Option<Box<Disk>>,
    /// Writes since the last sync: (key, state after the write).
    unsynced: Vec<(ItemKey, Item)>,
    /// The parent's clock as its last Welcome said, and the virtual
    /// (monotonic) time it arrived: process memory, gone at a restart.
    parent_clock: Option<(u64, u64)>,
    /// The clock recovered from a jump at a local write: own writes are
    /// re-stamped at the next Welcome (durable, as `META_RESTAMP`).
    restamp_due: bool,
    /// Each child's subtree, now and before (`SubtreeHistory`).
    history: BTreeMap<NodeId, SubtreeHistory>,
    /// Configuration (`[moved]`): nodes that left a child's subtree, with
    /// the time they left, as the operator recorded the move.
    moved: BTreeMap<NodeId, BTreeMap<NodeId, u64>>,
}

/// What a node's uplink may read.
struct Shippable<'a> {
    store: &'a BTreeMap<ItemKey, Item>,
    changelog: &'a BTreeMap<u64, (Change, Hlc)>,
    watermarks: &'a BTreeMap<NodeId, Watermark>,
    last_seq: u64,
}

/// The durable part of a node.
#[derive(Clone)]
struct Disk {
    incarnation: u64,
    clock: Hlc,
    store: BTreeMap<ItemKey, Item>,
    changelog: BTreeMap<u64, (Change, Hlc)>,
    last_seq: u64,
    retained_from: u64,
    cursors: BTreeMap<(NodeId, u64), (u64, Hlc)>,
    watermarks: BTreeMap<NodeId, Watermark>,
    relays: BTreeMap<NodeId, Relay>,
    acked_mark: Option<(u64, Hlc)>,
    last_parent: Option<usize>,
    restamp_due: bool,
    history: BTreeMap<NodeId, SubtreeHistory>,
}

impl Node {
    fn disk(&self) -> Disk {
        Disk {
            incarnation: self.incarnation,
            clock: self.clock.last(),
            store: self.store.clone(),
            changelog: self.changelog.clone(),
            last_seq: self.last_seq,
            retained_from: self.retained_from,
            cursors: self.cursors.clone(),
            watermarks: self.watermarks.clone(),
            relays: self.relays.clone(),
            acked_mark: self.acked_mark,
            last_parent: self.last_parent,
            restamp_due: self.restamp_due,
            history: self.history.clone(),
        }
    }

    fn load(&mut self, d: Disk) {
        self.incarnation = d.incarnation;
        self.clock = HlcClock::resume(self.id.clone(), d.clock);
        self.store = d.store;
        self.changelog = d.changelog;
        self.last_seq = d.last_seq;
        self.retained_from = d.retained_from;
        self.cursors = d.cursors;
        self.watermarks = d.watermarks;
        self.relays = d.relays;
        self.acked_mark = d.acked_mark;
        self.last_parent = d.last_parent;
        self.restamp_due = d.restamp_due;
        self.history = d.history;
    }

    /// Everything written so far is durable.
    fn sync(&mut self) {
        self.synced = Some(Box::new(self.disk()));
    }

    /// What replication may read: the synced state, or everything for a
    /// `buffered` node (or when nothing is unsynced).
    fn shippable(&self) -> Shippable<'_> {
        match &self.synced {
            Some(d) if !self.buffered && !self.unsynced.is_empty() => Shippable {
                store: &d.store,
                changelog: &d.changelog,
                watermarks: &d.watermarks,
                last_seq: d.last_seq,
            },
            _ => Shippable {
                store: &self.store,
                changelog: &self.changelog,
                watermarks: &self.watermarks,
                last_seq: self.last_seq,
            },
        }
    }

    fn append(&mut self, change: Change, hlc: Hlc) {
        self.last_seq += 1;
        self.changelog.insert(self.last_seq, (change, hlc));
    }
    fn last_hlc(&self) -> Hlc {
        self.changelog
            .values()
            .next_back()
            .map_or(Hlc::ZERO, |(_, h)| *h)
    }
}

/// A merge the parent's driver was asked for and has not committed yet.
struct PendingMerge {
    relay_all: bool,
    child: NodeId,
    incarnation: u64,
    items: Vec<WireItem>,
    cursor: Option<(u64, Hlc)>,
    watermarks: Vec<Watermark>,
}

/// Directions of a link that drop every packet until `until` (virtual ms).
#[derive(Debug, Clone, Copy)]
struct Partition {
    up: bool,
    down: bool,
    since: u64,
    until: u64,
}

/// One child ↔ parent link and its current connection.
struct Link {
    child: usize,
    parent: usize,
    up: VecDeque<Frame>,
    down: VecDeque<Frame>,
    downlink: Option<Downlink>,
    connected: bool,
    /// The incarnation the child announced on this connection.
    incarnation: u64,
    /// The merge the parent's session is committing (it reads no frame
    /// meanwhile).
    merging: Option<PendingMerge>,
    partition: Option<Partition>,
}

/// Faults actually injected (and what they caused), summed over seeds.
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    writes: u64,
    resets: u64,
    closes: u64,
    partitions_two_way: u64,
    partitions_one_way: u64,
    held_then_delivered: u64,
    idle_timeouts: u64,
    duplicate_batches: u64,
    late_merges: u64,
    replays: u64,
    restarts: u64,
    wipes: u64,
    trims: u64,
    snapshots: u64,
    syncs: u64,
    power_cuts: u64,
    restores: u64,
    reincarnations: u64,
    moves: u64,
    clock_jumps: u64,
    restamped: u64,
    virtual_ms: u64,
}

impl Faults {
    fn fields(&self) -> [(&'static str, u64); 22] {
        [
            ("writes", self.writes),
            ("resets", self.resets),
            ("closes", self.closes),
            ("partitions two-way", self.partitions_two_way),
            ("one-way", self.partitions_one_way),
            ("frames held then delivered", self.held_then_delivered),
            ("idle timeouts", self.idle_timeouts),
            ("duplicate batches", self.duplicate_batches),
            ("late merges", self.late_merges),
            ("replays", self.replays),
            ("restarts", self.restarts),
            ("wipes", self.wipes),
            ("trims", self.trims),
            ("snapshots", self.snapshots),
            ("syncs", self.syncs),
            ("power cuts", self.power_cuts),
            ("restores", self.restores),
            ("reincarnations", self.reincarnations),
            ("moves", self.moves),
            ("clock jumps", self.clock_jumps),
            ("items re-stamped", self.restamped),
            ("virtual s", self.virtual_ms / 1000),
        ]
    }

    fn add(&mut self, o: &Faults) {
        self.writes += o.writes;
        self.resets += o.resets;
        self.closes += o.closes;
        self.partitions_two_way += o.partitions_two_way;
        self.partitions_one_way += o.partitions_one_way;
        self.held_then_delivered += o.held_then_delivered;
        self.idle_timeouts += o.idle_timeouts;
        self.duplicate_batches += o.duplicate_batches;
        self.late_merges += o.late_merges;
        self.replays += o.replays;
        self.restarts += o.restarts;
        self.wipes += o.wipes;
        self.trims += o.trims;
        self.snapshots += o.snapshots;
        self.syncs += o.syncs;
        self.power_cuts += o.power_cuts;
        self.restores += o.restores;
        self.reincarnations += o.reincarnations;
        self.moves += o.moves;
        self.clock_jumps += o.clock_jumps;
        self.restamped += o.restamped;
        self.virtual_ms += o.virtual_ms;
    }
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .fields()
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// What the checks after heal found in one seed.
#[derive(Debug, Default)]
struct Outcome {
    divergent: bool,
    lost: usize,
    leaks: usize,
    watermark_gaps: usize,
    unsafe_trims: usize,
    future_stamps: usize,
    notes: Vec<String>,
}

impl Outcome {
    fn failed(&self) -> bool {
        self.divergent
            || self.lost + self.leaks + self.watermark_gaps + self.unsafe_trims + self.future_stamps
                > 0
    }
}

struct Sim {
    rng: Rng,
    /// Virtual time, ms.
    now: u64,
    /// Per node, how far its wall clock is ahead of `now`.
    skew: Vec<u64>,
    /// Per node, how far its wall clock jumped ahead (0: it did not).
    jumped: Vec<u64>,
    policy: Policy,
    digest: [u8; 32],
    nodes: Vec<Node>,
    links: Vec<Link>,
    /// Frames from closed connections, with the generations of both ends
    /// when they were sent, for replays into the next connection of the same
    /// processes.
    stale: Vec<(usize, Frame, (u64, u64))>,
    /// Merges of closed connections still being committed: (link, merge).
    late: Vec<(usize, PendingMerge)>,
    /// Per node, incremented on every restart.
    generation: Vec<u64>,
    /// Every write a city acknowledged: (city, key, its state after it).
    acknowledged: Vec<(usize, ItemKey, Item)>,
    /// Acknowledged writes that a restore or a power cut of a `buffered`
    /// city may have lost: (city, key, state).
    maybe_lost: Vec<(usize, ItemKey, Item)>,
    /// (province, city) for every city that moved away from a province.
    former: Vec<(usize, usize)>,
    unsafe_trims: Vec<String>,
    faults: Faults,
    /// Steps taken so far, and per node the step after which it writes no
    /// more (some cities go quiet early, so that what they wrote last must
    /// reach national by itself, not pushed along by later writes).
    steps: usize,
    quiet_after: Vec<usize>,
}

const WINDOW: usize = 2;

/// The simulated links' QUIC idle timeout, scaled down from the node's 15 s
/// (`node::tls::IDLE_TIMEOUT`) so that partitions both shorter and longer
/// than it fit in one run.
const IDLE_TIMEOUT_MS: u64 = 2_000;

impl Sim {
    fn new(seed: u64, steps: usize) -> Self {
        let policy = policy();
        let digest = policy.digest();
        let spec: [(&str, Tier, Option<usize>); 7] = [
            ("national", Tier::National, None),
            ("zhejiang", Tier::Province, Some(0)),
            ("jiangsu", Tier::Province, Some(0)),
            ("hangzhou", Tier::City, Some(1)),
            ("ningbo", Tier::City, Some(1)),
            ("nanjing", Tier::City, Some(2)),
            ("suzhou", Tier::City, Some(2)),
        ];
        let mut nodes: Vec<Node> = spec
            .iter()
            .enumerate()
            .map(|(i, (id, tier, parent))| {
                let id = NodeId::new(*id).unwrap();
                Node {
                    clock: HlcClock::new(id.clone()),
                    id,
                    tier: *tier,
                    parent: *parent,
                    children: Vec::new(),
                    incarnation: 1000 + i as u64,
                    store: BTreeMap::new(),
                    changelog: BTreeMap::new(),
                    last_seq: 0,
                    retained_from: 1,
                    cursors: BTreeMap::new(),
                    watermarks: BTreeMap::new(),
                    relays: BTreeMap::new(),
                    acked_mark: None,
                    last_parent: None,
                    uplink: None,
                    buffered: false,
                    synced: None,
                    backup: None,
                    unsynced: Vec::new(),
                    parent_clock: None,
                    restamp_due: false,
                    history: BTreeMap::new(),
                    moved: BTreeMap::new(),
                }
            })
            .collect();
        let mut links = Vec::new();
        for i in 0..nodes.len() {
            if let Some(p) = nodes[i].parent {
                nodes[p].children.push(i);
                links.push(Link {
                    child: i,
                    parent: p,
                    up: VecDeque::new(),
                    down: VecDeque::new(),
                    downlink: None,
                    connected: false,
                    incarnation: 0,
                    merging: None,
                    partition: None,
                });
            }
        }
        let mut rng = Rng(seed.max(1));
        let skew: Vec<u64> = nodes.iter().map(|_| rng.below(300)).collect();
        let quiet_after = nodes
            .iter()
            .map(|_| {
                if rng.chance(50) {
                    rng.below(steps as u64) as usize
                } else {
                    usize::MAX
                }
            })
            .collect();
        for n in nodes.iter_mut() {
            n.buffered = n.tier == Tier::City && rng.chance(25);
            n.sync();
        }
        let generation = vec![0; nodes.len()];
        let mut sim = Sim {
            rng,
            now: 1_000_000,
            jumped: vec![0; skew.len()],
            skew,
            policy,
            digest,
            nodes,
            links,
            stale: Vec::new(),
            late: Vec::new(),
            generation,
            acknowledged: Vec::new(),
            maybe_lost: Vec::new(),
            former: Vec::new(),
            unsafe_trims: Vec::new(),
            faults: Faults::default(),
            steps: 0,
            quiet_after,
        };
        for i in 0..sim.nodes.len() {
            sim.restart(i);
        }
        sim
    }

    /// Node `i`'s time, as `node::now_ms` reads it: its wall clock, but
    /// never more than half the skew ahead of its parent's clock as last
    /// measured (carried forward by virtual time, which clock jumps do not
    /// move).
    fn wall(&self, i: usize) -> u64 {
        let wall = self.now + self.skew[i] + self.jumped[i];
        let parent = self.nodes[i]
            .parent_clock
            .map(|(p, at)| p + (self.now - at));
        crate::clock::bounded_now(wall, parent, self.policy.limits.max_clock_skew_ms / 2)
    }

    /// City `c`'s wall clock jumps ahead by more than the skew, or back.
    fn jump(&mut self, c: usize) {
        self.faults.clock_jumps += 1;
        self.jumped[c] = if self.jumped[c] == 0 {
            self.policy.limits.max_clock_skew_ms + 1 + self.rng.below(3_600_000)
        } else {
            0
        };
    }

    /// At a Welcome (as `Store::restamp_unshipped`): if city `c`'s clock
    /// runs ahead, or a write recovered it, it takes a new incarnation and
    /// its writes after the parent's cursor that the parent would refuse get
    /// new stamps, durably; the acknowledged states of those keys become the
    /// re-stamped ones. Returns the new incarnation if it took one (the
    /// link then closes and the parent re-learns the city).
    fn restamp_unshipped(
        &mut self,
        c: usize,
        parent_now: u64,
        resume_from: u64,
        resume_hlc: Hlc,
    ) -> Option<u64> {
        let now = self.wall(c);
        let skew = self.policy.limits.max_clock_skew_ms;
        let n = &mut self.nodes[c];
        // Own stamps beyond what the parent takes.
        let ahead = n.clock.runs_ahead(parent_now, skew);
        if !n.restamp_due && !ahead {
            return None;
        }
        // Only against a cursor of this node's own history (otherwise it
        // takes a new incarnation first, and re-stamps at the next Welcome).
        let valid = resume_from == 0
            || resume_hlc == Hlc::ZERO
            || (resume_from <= n.last_seq
                && resume_matches(
                    resume_from,
                    resume_hlc,
                    n.changelog.get(&resume_from).map(|(_, h)| *h),
                    n.acked_mark,
                ));
        if !valid {
            if ahead {
                n.clock.recover(now);
                n.restamp_due = true;
                self.sync(c);
            }
            return None;
        }
        // A new history: a restore to a backup from before the re-stamp
        // must not find its parent's cursor matching (that cursor would
        // cover the re-stamped versions, not the restored ones). Durable
        // first, with the obligation to re-stamp still marked.
        self.faults.reincarnations += 1;
        let inc = self.rng.next();
        let n = &mut self.nodes[c];
        n.incarnation = inc;
        n.restamp_due = true;
        n.clock.recover(now);
        let hlc = n.clock.tick(now).hlc;
        n.append(Change::Reincarnated, hlc);
        self.sync(c);
        let n = &mut self.nodes[c];
        let above = Hlc {
            physical_ms: parent_now + skew,
            logical: u32::MAX,
        };
        // New stamps above any the parent may hold of this node.
        let mut fresh = HlcClock::resume(
            n.id.clone(),
            Hlc {
                physical_ms: parent_now + skew,
                logical: 0,
            },
        );
        let keys: std::collections::BTreeSet<ItemKey> = n
            .changelog
            .range(resume_from + 1..)
            .filter_map(|(_, (ch, _))| match ch {
                Change::Item(k) => Some(k.clone()),
                _ => None,
            })
            .collect();
        let mut moved = Vec::new();
        for k in keys {
            let Some(item) = n.store.get_mut(&k) else {
                continue;
            };
            if item.restamp(&mut fresh, now, above) {
                let item = item.clone();
                let hlc = n.clock.tick(now).hlc;
                n.append(Change::Item(k.clone()), hlc);
                n.unsynced.push((k.clone(), item.clone()));
                moved.push((k, item));
            }
        }
        n.restamp_due = false;
        self.faults.restamped += moved.len() as u64;
        // One synced batch: what it re-stamped is acknowledged as it is now.
        self.sync(c);
        for (k, item) in moved {
            for (x, ak, a) in self.acknowledged.iter_mut() {
                if *x == c && *ak == k {
                    *a = item.clone();
                }
            }
            if self.nodes[c].buffered {
                self.acknowledged.push((c, k, item));
            }
        }
        Some(inc)
    }

    fn gens(&self, l: usize) -> (u64, u64) {
        (
            self.generation[self.links[l].child],
            self.generation[self.links[l].parent],
        )
    }

    fn is_private(&self, k: &ItemKey) -> bool {
        self.policy.categories[&k.0].replicate != Replicate::Up
    }

    fn restart(&mut self, i: usize) {
        // A merge under way at `i` either committed before the crash or not.
        for l in 0..self.links.len() {
            if self.links[l].parent == i
                && let Some(m) = self.links[l].merging.take()
                && self.rng.chance(50)
            {
                self.apply_merge(l, m);
            }
        }
        for (l, m) in std::mem::take(&mut self.late) {
            if self.links[l].parent != i {
                self.late.push((l, m));
            } else if self.rng.chance(50) {
                self.land_late(l, m);
            }
        }
        self.generation[i] += 1;
        // As `Store::open`: the clock resumes a millisecond past what was
        // synced, so lost changes are not reissued with the same HLCs.
        let n = &mut self.nodes[i];
        n.parent_clock = None;
        let last = n.clock.last();
        if last != Hlc::ZERO {
            n.clock = HlcClock::resume(
                n.id.clone(),
                Hlc {
                    physical_ms: last.physical_ms + 1,
                    logical: 0,
                },
            );
        }
        // Nothing of a connection survives a restart of either end.
        let links = &self.links;
        self.stale
            .retain(|(l, _, _)| links[*l].child != i && links[*l].parent != i);
        for l in 0..self.links.len() {
            if self.links[l].child == i || self.links[l].parent == i {
                self.disconnect(l);
            }
        }
        // A node that starts under another parent than before (it moved,
        // or was restored from a backup taken before it moved) takes a new
        // incarnation, so that its parent learns all of it by snapshot.
        let now = self.wall(i);
        let n = &mut self.nodes[i];
        if n.parent.is_some() && n.last_parent != n.parent {
            if n.last_parent.is_some() {
                self.faults.reincarnations += 1;
                n.incarnation = self.rng.next();
                let hlc = n.clock.tick(now).hlc;
                n.append(Change::Reincarnated, hlc);
            }
            n.last_parent = n.parent;
            // Durable at once (with everything before it).
            self.sync(i);
        }
        let n = &mut self.nodes[i];
        n.uplink = n.parent.map(|_| {
            let cfg = UplinkConfig {
                node: n.id.clone(),
                tier: n.tier,
                policy_digest: self.digest,
                incarnation: n.incarnation,
                window: WINDOW,
            };
            let d = n.shippable();
            // The HLC of the last change, also when it was trimmed: a
            // parent's cursor is checked against it.
            let last_hlc = match (d.changelog.get(&d.last_seq), n.acked_mark) {
                (Some((_, h)), _) => *h,
                (None, Some((s, h))) if s == d.last_seq => h,
                _ => Hlc::ZERO,
            };
            Uplink::new(cfg, d.last_seq, last_hlc, n.retained_from)
        });
    }

    fn wipe(&mut self, i: usize) {
        trace(|| format!("wipe {}", self.nodes[i].id));
        self.restart(i);
        let n = &mut self.nodes[i];
        n.incarnation = n.incarnation.wrapping_mul(31).wrapping_add(7);
        n.store.clear();
        n.changelog.clear();
        n.last_seq = 0;
        n.retained_from = 1;
        n.cursors.clear();
        n.watermarks.clear();
        n.relays.clear();
        n.history.clear();
        n.acked_mark = None;
        n.unsynced.clear();
        n.backup = None;
        // The HLC stays monotonic: a restored node resumes its clock above
        // what it issued (operators restore the clock with the data).
        n.sync();
        self.restart(i);
    }

    /// The writes since node `i`'s last sync become durable and, at a city,
    /// acknowledged; only now may its uplink ship them.
    fn sync(&mut self, i: usize) {
        self.faults.syncs += 1;
        let n = &mut self.nodes[i];
        n.sync();
        let buffered = n.buffered;
        for (k, item) in std::mem::take(&mut n.unsynced) {
            if !buffered {
                self.acknowledged.push((i, k, item));
            }
        }
        let n = &mut self.nodes[i];
        let (last, hlc) = (n.last_seq, n.last_hlc());
        if let Some(u) = n.uplink.as_mut() {
            u.changes_available(last, hlc);
        }
        self.pump_child(i);
    }

    /// A node that goes back in time (a restore, a power cut and reboot)
    /// takes far longer than a write: a merge of its link still under way
    /// at its parent has landed or died by the time it is back.
    fn settle_merges_of(&mut self, i: usize) {
        for (l, m) in std::mem::take(&mut self.late) {
            if self.links[l].child != i {
                self.late.push((l, m));
            } else if self.rng.chance(50) {
                self.land_late(l, m);
            }
        }
    }

    /// Power is cut at node `i`: what was not synced is gone.
    fn power_cut(&mut self, i: usize) {
        trace(|| {
            format!(
                "power cut {} buffered={}",
                self.nodes[i].id, self.nodes[i].buffered
            )
        });
        self.faults.power_cuts += 1;
        self.restart(i);
        self.settle_merges_of(i);
        let n = &mut self.nodes[i];
        n.unsynced.clear();
        if let Some(d) = n.synced.clone() {
            n.load(*d);
        }
        // With `fsync` every acknowledged write was synced: none may go.
        if n.buffered {
            self.forget_lost_writes(i);
        }
        self.restart(i);
    }

    /// Node `i`'s data went back in time (a restore, a power cut of a
    /// `buffered` node): its acknowledged writes that its store no longer
    /// contains may be lost (a parent may still have them).
    fn forget_lost_writes(&mut self, i: usize) {
        let store = &self.nodes[i].store;
        let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.acknowledged)
            .into_iter()
            .partition(|(c, k, item)| *c == i && !contains(store.get(k), item));
        self.acknowledged = kept;
        self.maybe_lost.extend(lost);
    }

    /// City `c` moves to the other province; the operator restarts both
    /// provinces with their new `children`.
    fn move_city(&mut self, c: usize) {
        trace(|| format!("move {}", self.nodes[c].id));
        let Some(old) = self.nodes[c].parent else {
            return;
        };
        let new = if old == 1 { 2 } else { 1 };
        let Some(l) = self.link_of_child(c) else {
            return;
        };
        self.faults.moves += 1;
        self.restart(c);
        // A merge of the old link still under way dies with the restart of
        // the old province below.
        self.late.retain(|(ll, _)| *ll != l);
        self.stale.retain(|(ll, _, _)| *ll != l);
        self.nodes[old].children.retain(|&x| x != c);
        self.nodes[new].children.push(c);
        self.nodes[c].parent = Some(new);
        self.links[l].parent = new;
        self.former.retain(|&(p, x)| !(p == new && x == c));
        self.former.push((old, c));
        // The operator records the move in national's `[moved]`: the old
        // province may still relay what the city wrote before it.
        let until = self.wall(0) + self.policy.limits.max_clock_skew_ms;
        let (old_id, city) = (self.nodes[old].id.clone(), self.nodes[c].id.clone());
        self.nodes[0]
            .moved
            .entry(old_id)
            .or_default()
            .insert(city.clone(), until);
        let new_id = self.nodes[new].id.clone();
        if let Some(m) = self.nodes[0].moved.get_mut(&new_id) {
            m.remove(&city);
        }
        self.restart(c);
        self.restart(old);
        self.restart(new);
    }

    /// Node `i` is restored from its backup (if it has one): its data,
    /// changelog, cursors, clock and incarnation go back in time.
    fn restore(&mut self, i: usize) {
        trace(|| format!("restore {}", self.nodes[i].id));
        let Some(disk) = self.nodes[i].backup.clone() else {
            return;
        };
        self.faults.restores += 1;
        self.restart(i);
        self.settle_merges_of(i);
        let n = &mut self.nodes[i];
        n.unsynced.clear();
        n.load(*disk);
        n.sync();
        self.forget_lost_writes(i);
        self.restart(i);
    }

    /// The connection breaks; frames on their way up may still have reached
    /// the parent (kept for replays), frames on their way down are lost.
    fn disconnect(&mut self, l: usize) {
        self.break_link(l, true);
    }

    /// The connection breaks. `up_arrived`: whether frames still queued
    /// upward reached the parent's receive buffer (false when a partition
    /// held them).
    fn break_link(&mut self, l: usize, up_arrived: bool) {
        let gens = self.gens(l);
        let link = &mut self.links[l];
        if !link.connected {
            return;
        }
        link.connected = false;
        if up_arrived {
            for f in link.up.drain(..) {
                self.stale.push((l, f, gens));
            }
        }
        link.up.clear();
        link.down.clear();
        link.downlink = None;
        if let Some(m) = link.merging.take() {
            self.late.push((l, m));
        }
        let child = link.child;
        if let Some(u) = self.nodes[child].uplink.as_mut() {
            u.disconnected();
        }
    }

    fn connect(&mut self, l: usize) {
        if self.links[l].connected || self.links[l].partition.is_some() {
            return;
        }
        let (c, p) = (self.links[l].child, self.links[l].parent);
        let cfg = DownlinkConfig {
            node: self.nodes[p].id.clone(),
            tier: self.nodes[p].tier,
            policy_digest: self.digest,
            children: self.nodes[p]
                .children
                .iter()
                .map(|&k| self.nodes[k].id.clone())
                .collect(),
            // The parent's configuration places below each child what the
            // topology does.
            subtrees: Some(
                self.nodes[p]
                    .children
                    .iter()
                    .filter(|&&k| self.nodes[k].tier != Tier::City)
                    .map(|&k| {
                        let below = self.nodes[k]
                            .children
                            .iter()
                            .map(|&g| self.nodes[g].id.clone())
                            .collect();
                        (self.nodes[k].id.clone(), below)
                    })
                    .collect(),
            ),
        };
        let peer = self.nodes[c].id.clone();
        let subtree: Vec<NodeId> = self.nodes[c]
            .children
            .iter()
            .map(|&k| self.nodes[k].id.clone())
            .collect();
        let link = &mut self.links[l];
        link.connected = true;
        link.downlink = Some(Downlink::new(cfg, peer));
        if let Some(u) = self.nodes[c].uplink.as_mut() {
            u.connected(subtree);
        }
        self.pump_child(c);
    }

    fn link_of_child(&self, c: usize) -> Option<usize> {
        self.links.iter().position(|l| l.child == c)
    }

    /// A local write at a city, acknowledged once it is in the store and
    /// changelog (the store's WriteBatch).
    fn write(&mut self, city: usize) {
        if self.steps > self.quiet_after[city] {
            return;
        }
        let now = self.wall(city);
        let key_n = self.rng.below(6);
        let choice = self.rng.below(5);
        let v = Value::Int(self.rng.below(100) as i64);
        let skew = self.policy.limits.max_clock_skew_ms;
        let n = &mut self.nodes[city];
        // As `Store::check_clock`: a clock that came back from a jump
        // starts again from the wall clock; re-stamping waits for a Welcome.
        if n.clock.runs_ahead(now, skew) {
            n.clock.recover(now);
            n.restamp_due = true;
        }
        // As `Store::apply_one`: a write outranks the item it changes.
        let target = match choice {
            0..=2 => ("customer".to_string(), format!("c{key_n}")),
            3 => ("billing".to_string(), format!("{}-b{}", n.id, n.last_seq)),
            _ => ("opportunity".to_string(), format!("o{key_n}")),
        };
        if let Some(newest) = n.store.get(&target).and_then(Item::max_stamp) {
            n.clock.observe(newest.hlc);
        }
        let stamp = n.clock.tick(now);
        trace(|| {
            format!(
                "write {} {:?} choice {choice} at {}",
                n.id, target, stamp.hlc.physical_ms
            )
        });
        let (cat, key, item) = match choice {
            0..=2 => {
                let key = ("customer".to_string(), format!("c{key_n}"));
                let mut r = match n.store.get(&key) {
                    Some(Item::Record(r)) => r.clone(),
                    _ => Record::default(),
                };
                match choice {
                    0 => r.put(BTreeMap::from([("a".to_string(), v)]), stamp.clone()),
                    1 => r.patch(
                        BTreeMap::from([(format!("f{}", key_n % 3), Some(v))]),
                        stamp.clone(),
                    ),
                    _ => r.delete(stamp.clone()),
                };
                (key.0, key.1, Item::Record(r))
            }
            3 => {
                let key = format!("{}-b{}", n.id, n.last_seq);
                (
                    "billing".to_string(),
                    key,
                    Item::Log(LogEntry {
                        fields: BTreeMap::from([("amount".to_string(), v)]),
                        stamp: stamp.clone(),
                    }),
                )
            }
            _ => {
                let mut r = Record::default();
                r.put(BTreeMap::from([("stage".to_string(), v)]), stamp.clone());
                (
                    "opportunity".to_string(),
                    format!("o{key_n}"),
                    Item::Record(r),
                )
            }
        };
        let k = (cat, key);
        n.store.insert(k.clone(), item.clone());
        n.append(Change::Item(k.clone()), stamp.hlc);
        n.unsynced.push((k.clone(), item.clone()));
        self.faults.writes += 1;
        if !self.nodes[city].buffered {
            // Acknowledged, and offered to the uplink, at the next sync.
            return;
        }
        self.acknowledged.push((city, k, item));
        let n = &mut self.nodes[city];
        let (last, hlc) = (n.last_seq, stamp.hlc);
        if let Some(u) = n.uplink.as_mut() {
            u.changes_available(last, hlc);
        }
        self.pump_child(city);
    }

    fn pump_child(&mut self, c: usize) {
        let Some(l) = self.link_of_child(c) else {
            return;
        };
        while let Some(ev) = self.nodes[c].uplink.as_mut().and_then(Uplink::poll_event) {
            match ev {
                UplinkEvent::Send(f) => {
                    if self.links[l].connected {
                        self.links[l].up.push_back(f);
                    }
                }
                UplinkEvent::LoadBatch { after, epoch } => {
                    let batch = self.load_batch(c, after);
                    self.nodes[c]
                        .uplink
                        .as_mut()
                        .unwrap()
                        .batch_loaded(epoch, batch);
                }
                UplinkEvent::LoadSnapshot { after, epoch } => {
                    let (items, next) = self.snapshot_chunk(c, after.as_ref());
                    let marks = if after.is_none() {
                        self.current_watermarks(c)
                    } else {
                        Vec::new()
                    };
                    self.nodes[c]
                        .uplink
                        .as_mut()
                        .unwrap()
                        .snapshot_loaded(epoch, items, next, marks);
                }
                UplinkEvent::Acked { seq } => self.acked(l, seq),
                UplinkEvent::CheckResume { seq, hlc, epoch } => {
                    let n = &self.nodes[c];
                    let entry = n.changelog.get(&seq).map(|(_, h)| *h);
                    let ok = resume_matches(seq, hlc, entry, n.acked_mark);
                    self.nodes[c]
                        .uplink
                        .as_mut()
                        .unwrap()
                        .resume_checked(epoch, ok);
                }
                UplinkEvent::Reincarnate { reason, parent_hlc } => {
                    if std::env::var("SIM_DEBUG").is_ok() {
                        eprintln!("{} reincarnates: {reason}", self.nodes[c].id);
                    }
                    self.faults.reincarnations += 1;
                    let inc = self.rng.next();
                    let now = self.wall(c);
                    let n = &mut self.nodes[c];
                    // As the store does: the new incarnation and a changelog
                    // entry for it at a clock past the parent's, synced (with
                    // whatever else was written before).
                    n.incarnation = inc;
                    n.clock.observe(parent_hlc);
                    let hlc = n.clock.tick(now).hlc;
                    n.append(Change::Reincarnated, hlc);
                    self.sync(c);
                    self.nodes[c].uplink.as_mut().unwrap().reincarnated(inc);
                }
                UplinkEvent::Close { reason } => {
                    if std::env::var("SIM_DEBUG").is_ok() {
                        eprintln!("uplink {} closed: {reason}", self.nodes[c].id);
                    }
                    self.disconnect(l)
                }
            }
        }
    }

    /// The child learnt that its parent holds everything up to `seq`: check
    /// that this is true, then maybe trim the changelog.
    fn acked(&mut self, l: usize, seq: u64) {
        let (c, p) = (self.links[l].child, self.links[l].parent);
        let key = (self.nodes[c].id.clone(), self.nodes[c].incarnation);
        let held = self.nodes[p].cursors.get(&key).map_or(0, |c| c.0);
        if held < seq {
            self.unsafe_trims.push(format!(
                "{} was acknowledged up to {seq}, but {} holds its changes only up to {held}",
                key.0, self.nodes[p].id
            ));
        }
        if self.rng.chance(50) {
            self.faults.trims += 1;
            let n = &mut self.nodes[c];
            if let Some((_, h)) = n.changelog.get(&seq) {
                n.acked_mark = Some((seq, *h));
            }
            n.changelog = n.changelog.split_off(&(seq + 1));
            n.retained_from = n.retained_from.max(seq + 1);
            let r = n.retained_from;
            n.uplink.as_mut().unwrap().trimmed(r);
        }
    }

    /// Up to three `up` items after `after`, and the key to continue after.
    fn snapshot_chunk(
        &self,
        c: usize,
        after: Option<&ItemKey>,
    ) -> (Vec<WireItem>, Option<ItemKey>) {
        let mut items = Vec::new();
        let mut next = None;
        let disk = self.nodes[c].shippable();
        for (k, item) in disk
            .store
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| *k > a) && !self.is_private(k))
        {
            if items.len() == 3 {
                next = items
                    .last()
                    .map(|w: &WireItem| (w.category.clone(), w.key.clone()));
                break;
            }
            items.push(WireItem {
                category: k.0.clone(),
                key: k.1.clone(),
                item: item.clone(),
            });
        }
        (items, next)
    }

    fn current_watermarks(&self, c: usize) -> Vec<Watermark> {
        self.nodes[c]
            .shippable()
            .watermarks
            .values()
            .cloned()
            .collect()
    }

    fn load_batch(&self, c: usize, after: u64) -> LoadedBatch {
        let n = self.nodes[c].shippable();
        let retained_from = self.nodes[c].retained_from;
        let mut keys: Vec<ItemKey> = Vec::new();
        let mut wms: BTreeMap<NodeId, Watermark> = BTreeMap::new();
        let mut last = (after, Hlc::ZERO);
        for (&seq, (change, hlc)) in n.changelog.range(after + 1..).take(4) {
            assert!(seq >= retained_from, "loading a trimmed entry");
            last = (seq, *hlc);
            match change {
                Change::Item(k) => {
                    if !self.is_private(k) && !keys.contains(k) {
                        keys.push(k.clone());
                    }
                }
                Change::Watermark(w) => {
                    wms.insert(w.origin.clone(), w.clone());
                }
                Change::Reincarnated => {}
            }
        }
        let items = keys
            .into_iter()
            .map(|k| WireItem {
                item: n.store[&k].clone(),
                category: k.0,
                key: k.1,
            })
            .collect();
        LoadedBatch {
            last_seq: last.0,
            upto_hlc: last.1,
            items,
            watermarks: wms.into_values().collect(),
        }
    }

    fn pump_parent(&mut self, l: usize) {
        while let Some(ev) = self.links[l]
            .downlink
            .as_mut()
            .and_then(Downlink::poll_event)
        {
            let p = self.links[l].parent;
            match ev {
                DownlinkEvent::Send(f) => self.links[l].down.push_back(f),
                DownlinkEvent::Accepted {
                    child,
                    incarnation,
                    subtree,
                } => {
                    // As the driver does: the child's subtree history,
                    // stored before anything is merged.
                    let until = self.wall(p) + self.policy.limits.max_clock_skew_ms;
                    let n = &mut self.nodes[p];
                    let h = n.history.entry(child.clone()).or_default();
                    let changed = h.claimed(&subtree.into_iter().collect(), until);
                    let former = h.former_with(n.moved.get(&child));
                    if changed {
                        n.sync();
                    }
                    self.links[l]
                        .downlink
                        .as_mut()
                        .unwrap()
                        .former_loaded(former);
                    let (cur, hlc) = self.nodes[p]
                        .cursors
                        .get(&(child, incarnation))
                        .copied()
                        .unwrap_or((0, Hlc::ZERO));
                    self.links[l].incarnation = incarnation;
                    let now = self.wall(p);
                    self.links[l]
                        .downlink
                        .as_mut()
                        .unwrap()
                        .cursor_loaded(cur, hlc, now);
                }
                DownlinkEvent::Merge {
                    items,
                    cursor,
                    watermarks,
                    relay_all,
                } => {
                    // The driver writes in the background; a later step
                    // commits it.
                    let child = self.links[l].downlink.as_ref().unwrap().peer().clone();
                    self.links[l].merging = Some(PendingMerge {
                        relay_all,
                        child,
                        incarnation: self.links[l].incarnation,
                        items,
                        cursor,
                        watermarks,
                    });
                }
                DownlinkEvent::Dropped { .. } => {}
                DownlinkEvent::Close { reason } => {
                    if std::env::var("SIM_DEBUG").is_ok() {
                        eprintln!("downlink closed: {reason}");
                    }
                    self.disconnect(l);
                    break;
                }
            }
        }
    }

    /// The parent's store commits a merge of link `l`'s child in one batch:
    /// items, the child's cursor and the watermarks.
    fn apply_merge(&mut self, l: usize, m: PendingMerge) {
        trace(|| {
            format!(
                "merge at {} from {} inc {} cursor {:?}: {:?}",
                self.nodes[self.links[l].parent].id,
                m.child,
                m.incarnation,
                m.cursor,
                m.items
                    .iter()
                    .map(|w| (
                        w.key.clone(),
                        w.item
                            .stamps()
                            .into_iter()
                            .map(|s| (s.hlc.physical_ms, s.origin.to_string()))
                            .collect::<Vec<_>>()
                    ))
                    .collect::<Vec<_>>()
            )
        });
        let now = self.wall(self.links[l].parent);
        let n = &mut self.nodes[self.links[l].parent];
        // As the store does: one fresh HLC for every entry of the merge,
        // past every stamp it brings.
        for s in m.items.iter().flat_map(|w| w.item.stamps()) {
            n.clock.observe(s.hlc);
        }
        let entry_hlc = n.clock.tick(now).hlc;
        for w in m.items {
            let k = (w.category, w.key);
            let changed = match n.store.get_mut(&k) {
                Some(mine) => mine.merge(&w.item).changed,
                None => {
                    n.store.insert(k.clone(), w.item);
                    true
                }
            };
            if changed || m.relay_all {
                let hlc = entry_hlc;
                n.append(Change::Item(k), hlc);
            }
        }
        let mut marks = m.watermarks;
        if let Some((seq, hlc)) = m.cursor {
            let c = n
                .cursors
                .entry((m.child.clone(), m.incarnation))
                .or_insert((0, Hlc::ZERO));
            if seq >= c.0 {
                *c = (seq, hlc);
            }
            marks.push(Watermark {
                origin: m.child.clone(),
                incarnation: m.incarnation,
                seq,
                hlc,
            });
        }
        let via = Relay {
            child: m.child.clone(),
            incarnation: m.incarnation,
            seq: m.cursor.map_or(0, |c| c.0),
        };
        for w in marks {
            let newer = watermark_replaces(
                n.watermarks.get(&w.origin),
                n.relays.get(&w.origin),
                &w,
                &via,
            );
            if newer {
                n.relays.insert(w.origin.clone(), via.clone());
                n.watermarks.insert(w.origin.clone(), w.clone());
                let hlc = entry_hlc;
                n.append(Change::Watermark(w), hlc);
            }
        }
        // A merge is committed with a sync (only parents merge, and they
        // write nothing else).
        n.sync();
        let (last, hlc) = (n.last_seq, n.last_hlc());
        if let Some(u) = n.uplink.as_mut() {
            u.changes_available(last, hlc);
        }
    }

    /// The parent's driver finished writing link `l`'s merge.
    fn commit(&mut self, l: usize) {
        let Some(m) = self.links[l].merging.take() else {
            return;
        };
        self.apply_merge(l, m);
        if let Some(d) = self.links[l].downlink.as_mut() {
            d.merged();
        }
        self.pump_parent(l);
        self.pump_child(self.links[l].parent);
    }

    /// The merge of an old connection, still under way, commits now.
    fn commit_late(&mut self, i: usize) {
        let (l, m) = self.late.swap_remove(i);
        self.land_late(l, m);
        self.pump_child(self.links[l].parent);
    }

    fn land_late(&mut self, l: usize, m: PendingMerge) {
        if m.incarnation == self.nodes[self.links[l].child].incarnation {
            self.faults.late_merges += 1;
            self.apply_merge(l, m);
        }
    }

    fn deliver_up(&mut self, l: usize, f: Frame) {
        let now = self.wall(self.links[l].parent);
        let held = {
            let link = &self.links[l];
            let key = (self.nodes[link.child].id.clone(), link.incarnation);
            self.nodes[link.parent].cursors.get(&key).map(|c| c.0)
        };
        match &f {
            Frame::Batch { last_seq, .. } if held.is_some_and(|h| *last_seq <= h) => {
                self.faults.duplicate_batches += 1;
            }
            Frame::SnapshotDone { .. } => self.faults.snapshots += 1,
            _ => {}
        }
        let Some(d) = self.links[l].downlink.as_mut() else {
            return;
        };
        d.handle_frame(f, now, &self.policy);
        self.pump_parent(l);
    }

    fn deliver_down(&mut self, l: usize, f: Frame) {
        let c = self.links[l].child;
        if let Frame::Welcome {
            resume_from,
            resume_hlc,
            now_ms,
        } = &f
        {
            self.nodes[c].parent_clock = Some((*now_ms, self.now));
            if let Some(inc) = self.restamp_unshipped(c, *now_ms, *resume_from, *resume_hlc) {
                if let Some(u) = self.nodes[c].uplink.as_mut() {
                    u.reincarnated(inc);
                }
                self.pump_child(c);
                return;
            }
        }
        if let Some(u) = self.nodes[c].uplink.as_mut() {
            u.handle_frame(f);
        }
        self.pump_child(c);
    }

    /// Virtual time passes: partitions end, or break connections whose
    /// blocked direction stayed silent for the idle timeout.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.faults.virtual_ms += ms;
        for l in 0..self.links.len() {
            let Some(p) = self.links[l].partition else {
                continue;
            };
            if p.until <= self.now {
                self.end_partition(l);
            } else if self.links[l].connected && self.now >= p.since + IDLE_TIMEOUT_MS {
                // Both ends started the connection before the partition (no
                // handshake crosses one), so each has heard nothing since.
                self.faults.idle_timeouts += 1;
                if std::env::var("SIM_DEBUG").is_ok() {
                    eprintln!("link {l}: idle timeout");
                }
                self.break_link(l, !p.up);
            }
        }
    }

    fn start_partition(&mut self, l: usize) {
        if self.links[l].partition.is_some() {
            return;
        }
        let (up, down) = match self.rng.below(3) {
            0 => (true, true),
            1 => (true, false),
            _ => (false, true),
        };
        if up && down {
            self.faults.partitions_two_way += 1;
        } else {
            self.faults.partitions_one_way += 1;
        }
        let until = self.now + 100 + self.rng.below(3 * IDLE_TIMEOUT_MS);
        self.links[l].partition = Some(Partition {
            up,
            down,
            since: self.now,
            until,
        });
    }

    fn end_partition(&mut self, l: usize) {
        if let Some(p) = self.links[l].partition.take() {
            let link = &self.links[l];
            let held = usize::from(p.up) * link.up.len() + usize::from(p.down) * link.down.len();
            self.faults.held_then_delivered += held as u64;
        }
    }

    fn step(&mut self) {
        self.steps += 1;
        let dt = self.rng.below(40);
        self.advance(dt);
        let l = self.rng.below(self.links.len() as u64) as usize;
        let up_open = self.links[l].partition.is_none_or(|p| !p.up);
        let down_open = self.links[l].partition.is_none_or(|p| !p.down);
        match self.rng.below(100) {
            0..=21 => {
                let city = 3 + self.rng.below(4) as usize;
                self.write(city);
            }
            // The parent reads the next frame unless it is committing a merge.
            22..=51 if up_open && self.links[l].merging.is_none() => {
                if let Some(f) = self.links[l].up.pop_front() {
                    if self.rng.chance(3) {
                        // The connection breaks with this frame in flight.
                        self.faults.resets += 1;
                        let gens = self.gens(l);
                        self.stale.push((l, f, gens));
                        self.disconnect(l);
                    } else {
                        self.deliver_up(l, f);
                    }
                }
            }
            52..=76 if down_open => {
                if let Some(f) = self.links[l].down.pop_front() {
                    if self.rng.chance(2) {
                        self.faults.resets += 1;
                        self.disconnect(l);
                    } else {
                        self.deliver_down(l, f);
                    }
                }
            }
            77..=84 => self.commit(l),
            85..=88 => self.connect(l),
            89 if self.links[l].connected && self.rng.chance(50) => {
                self.faults.closes += 1;
                self.disconnect(l);
            }
            90 => self.start_partition(l),
            91..=92 if !self.late.is_empty() => {
                let i = self.rng.below(self.late.len() as u64) as usize;
                self.commit_late(i);
            }
            93..=94 => self.replay(l),
            95 => {
                self.faults.restarts += 1;
                let i = self.rng.below(self.nodes.len() as u64) as usize;
                self.restart(i);
            }
            // A parent loses its data (restored empty): children catch up.
            96 if self.rng.chance(20) => {
                self.faults.wipes += 1;
                let i = self.rng.below(3) as usize;
                self.wipe(i);
            }
            96 if self.rng.chance(30) => {
                let city = 3 + self.rng.below(4) as usize;
                self.jump(city);
            }
            97 => {
                let i = self.rng.below(self.nodes.len() as u64) as usize;
                if self.rng.chance(50) {
                    self.power_cut(i);
                } else if self.rng.chance(30) {
                    self.restore(i);
                } else if self.rng.chance(25) {
                    let city = 3 + self.rng.below(4) as usize;
                    self.move_city(city);
                } else {
                    let n = &mut self.nodes[i];
                    n.backup = n.synced.clone();
                }
            }
            98..=99 => {
                let city = 3 + self.rng.below(4) as usize;
                self.sync(city);
            }
            _ => {}
        }
    }

    /// A batch of an earlier connection between the same two processes is
    /// replayed into the current one.
    fn replay(&mut self, l: usize) {
        let open = self.links[l]
            .downlink
            .as_ref()
            .is_some_and(|d| d.state == DownState::Open);
        if !open || self.links[l].merging.is_some() {
            return;
        }
        let gens = self.gens(l);
        let candidates: Vec<&Frame> = self
            .stale
            .iter()
            .filter(|(sl, f, g)| *sl == l && *g == gens && matches!(f, Frame::Batch { .. }))
            .map(|(_, f, _)| f)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let f = candidates[self.rng.below(candidates.len() as u64) as usize].clone();
        self.faults.replays += 1;
        self.deliver_up(l, f);
    }

    /// Ends every partition, reconnects every link and runs until no frame
    /// moves and no merge is pending.
    fn heal(&mut self) {
        for l in 0..self.links.len() {
            self.end_partition(l);
        }
        for i in 0..self.nodes.len() {
            self.sync(i);
        }
        // A healthy network settles in a few rounds; a session that keeps
        // refusing its peer never does. Rounds are 10 ms of virtual time
        // apart (reconnect backoff), so a refusal that time ends (a stamp
        // a few ms ahead of a grandparent whose clock is behind its
        // parent's) ends.
        for _ in 0..1_000 {
            self.now += 10;
            for l in 0..self.links.len() {
                self.connect(l);
            }
            let mut moved = false;
            while !self.late.is_empty() {
                moved = true;
                self.commit_late(0);
            }
            for l in 0..self.links.len() {
                loop {
                    if self.links[l].merging.is_some() {
                        self.commit(l);
                    } else if let Some(f) = self.links[l].up.pop_front() {
                        self.deliver_up(l, f);
                    } else {
                        break;
                    }
                    moved = true;
                }
                while let Some(f) = self.links[l].down.pop_front() {
                    moved = true;
                    self.deliver_down(l, f);
                }
            }
            if !moved && self.links.iter().all(|l| l.connected) {
                return;
            }
        }
        panic!("the network did not quiesce");
    }

    /// The merge of the shared items of the cities below (or at) `i`.
    fn expected(&self, i: usize) -> BTreeMap<ItemKey, Item> {
        let mut out: BTreeMap<ItemKey, Item> = BTreeMap::new();
        let mut stack = vec![i];
        while let Some(n) = stack.pop() {
            let node = &self.nodes[n];
            stack.extend(&node.children);
            if node.tier != Tier::City {
                continue;
            }
            for (k, item) in node.store.iter().filter(|(k, _)| !self.is_private(k)) {
                merge_into(&mut out, k, item);
            }
        }
        out
    }

    fn shared(&self, i: usize) -> BTreeMap<&ItemKey, &Item> {
        self.nodes[i]
            .store
            .iter()
            .filter(|(k, _)| !self.is_private(k))
            .collect()
    }

    fn shared_bytes(&self, i: usize) -> Vec<u8> {
        codec::encode_stored(&self.shared(i)).unwrap()
    }

    /// The merge of the shared writes that cities below (or at) `i` may
    /// have lost.
    fn ghost(&self, i: usize) -> BTreeMap<ItemKey, Item> {
        let mut below = vec![i];
        let mut cities = Vec::new();
        while let Some(n) = below.pop() {
            below.extend(&self.nodes[n].children);
            cities.push(n);
        }
        let mut out = BTreeMap::new();
        for (c, k, item) in &self.maybe_lost {
            if cities.contains(c) && !self.is_private(k) {
                merge_into(&mut out, k, item);
            }
        }
        out
    }

    fn check(&self) -> Outcome {
        let mut o = Outcome {
            unsafe_trims: self.unsafe_trims.len(),
            notes: self.unsafe_trims.clone(),
            ..Outcome::default()
        };
        // Above the cities nothing is stamped beyond real time plus the
        // allowed skew (and the fixed per-node skew), however the cities'
        // clocks jumped.
        let limit = self.now + 300 + self.policy.limits.max_clock_skew_ms;
        for i in 0..3 {
            let n = &self.nodes[i];
            for (k, item) in &n.store {
                if let Some(s) = item
                    .stamps()
                    .into_iter()
                    .find(|s| s.hlc.physical_ms > limit)
                {
                    o.future_stamps += 1;
                    o.notes
                        .push(format!("{} holds {k:?} stamped {s}, in the future", n.id));
                }
            }
        }
        for i in 0..3 {
            let n = &self.nodes[i];
            let leaks = n.store.keys().filter(|k| self.is_private(k)).count();
            if leaks > 0 {
                o.leaks += leaks;
                o.notes.push(format!("{leaks} private items at {}", n.id));
            }
            let want = self.expected(i);
            let mut ghost = self.ghost(i);
            // A province keeps what cities that moved away sent it.
            for &(p, c) in &self.former {
                if p == i {
                    let lost = self
                        .maybe_lost
                        .iter()
                        .filter(|(x, _, _)| *x == c)
                        .map(|(_, k, item)| (k, item));
                    for (k, item) in self.nodes[c].store.iter().chain(lost) {
                        if !self.is_private(k) {
                            merge_into(&mut ghost, k, item);
                        }
                    }
                }
            }
            if !ghost.is_empty() {
                // Lost writes may or may not have reached this node: it
                // holds the merge of its subtree, and at most that plus
                // what was lost.
                let have = self.shared(i);
                let mut most = want.clone();
                for (k, item) in &ghost {
                    merge_into(&mut most, k, item);
                }
                let at_most: BTreeMap<&ItemKey, &Item> = most.iter().collect();
                let have_owned: BTreeMap<ItemKey, Item> = have
                    .iter()
                    .map(|(k, v)| ((*k).clone(), (*v).clone()))
                    .collect();
                if std::env::var("SIM_DEBUG").is_ok() {
                    for (k, v) in &have_owned {
                        if !below(&BTreeMap::from([(k.clone(), v.clone())]), &at_most) {
                            eprintln!(
                                "{} {k:?} beyond:\n  have {v:?}\n  most {:?}",
                                n.id,
                                at_most.get(k)
                            );
                        }
                    }
                    for (k, v) in &want {
                        if !below(&BTreeMap::from([(k.clone(), v.clone())]), &have) {
                            eprintln!(
                                "{} {k:?} below:\n  want {v:?}\n  have {:?}",
                                n.id,
                                have.get(k)
                            );
                        }
                    }
                }
                if !below(&want, &have) || !below(&have_owned, &at_most) {
                    o.divergent = true;
                    o.notes.push(format!(
                        "{}: shared state is not between the merge of its subtree and that plus the lost writes",
                        n.id
                    ));
                }
            } else if self.shared_bytes(i) != codec::encode_stored(&want).unwrap() {
                o.divergent = true;
                let differ = want
                    .iter()
                    .filter(|(k, v)| n.store.get(*k) != Some(*v))
                    .inspect(|(k, v)| {
                        if std::env::var("SIM_DEBUG").is_ok() {
                            eprintln!(
                                "{} {k:?}:\n  want {v:?}\n  have {:?}",
                                n.id,
                                n.store.get(*k)
                            );
                        }
                    })
                    .count();
                o.notes.push(format!(
                    "{}: shared state differs from the merge of its subtree ({} of {} items)",
                    n.id,
                    differ,
                    want.len()
                ));
            }
            // Completeness: every node below is known up to its last change.
            let mut stack = n.children.clone();
            while let Some(c) = stack.pop() {
                let below = &self.nodes[c];
                stack.extend(&below.children);
                let wm = n.watermarks.get(&below.id).map(|w| (w.incarnation, w.seq));
                let want = (below.incarnation, below.last_seq);
                if want.1 > 0 && wm != Some(want) {
                    o.watermark_gaps += 1;
                    o.notes.push(format!(
                        "watermark of {} at {}: {wm:?}, want {want:?}",
                        below.id, n.id
                    ));
                }
            }
        }
        // Acknowledged writes: each one's effect is still there, and
        // national holds exactly their merge.
        let mut merged: BTreeMap<ItemKey, Item> = BTreeMap::new();
        for (city, k, item) in &self.acknowledged {
            let private = self.is_private(k);
            let holder = if private { *city } else { 0 };
            let present = contains(self.nodes[holder].store.get(k), item);
            if !present {
                o.lost += 1;
                o.notes.push(format!(
                    "write of {k:?} at {} lost at {}",
                    self.nodes[*city].id, self.nodes[holder].id
                ));
            }
            if !private {
                merge_into(&mut merged, k, item);
            }
        }
        let ghost = self.ghost(0);
        if ghost.is_empty() {
            if self.shared_bytes(0) != codec::encode_stored(&merged).unwrap() {
                o.divergent = true;
                o.notes
                    .push("national differs from the merge of all acknowledged writes".into());
            }
        } else if !below(&merged, &self.shared(0)) {
            o.divergent = true;
            o.notes.push("national lacks acknowledged writes".into());
        }
        o
    }
}

/// Whether `have` already contains `item`'s effect (merging it changes nothing).
fn contains(have: Option<&Item>, item: &Item) -> bool {
    have.is_some_and(|h| {
        let mut m = h.clone();
        m.merge(item);
        m == *h
    })
}

/// Whether every item of `small` is contained in `big`.
fn below(small: &BTreeMap<ItemKey, Item>, big: &BTreeMap<&ItemKey, &Item>) -> bool {
    small
        .iter()
        .all(|(k, item)| contains(big.get(k).copied(), item))
}

fn merge_into(out: &mut BTreeMap<ItemKey, Item>, k: &ItemKey, item: &Item) {
    match out.get_mut(k) {
        Some(m) => {
            m.merge(item);
        }
        None => {
            out.insert(k.clone(), item.clone());
        }
    }
}

/// `SIM_TRACE=1`: every fault and merge, for replaying one seed.
fn trace(msg: impl FnOnce() -> String) {
    if std::env::var("SIM_TRACE").is_ok() {
        eprintln!("{}", msg());
    }
}

fn run(seed: u64, steps: usize) -> (Outcome, Faults) {
    let mut sim = Sim::new(seed, steps);
    for _ in 0..steps {
        sim.step();
    }
    sim.heal();
    (sim.check(), sim.faults)
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn topology_converges_under_faults() {
    let seeds = env_or("TIERSYNC_SIM_SEEDS", 1000);
    let first = env_or("TIERSYNC_SIM_FIRST_SEED", 1);
    let steps = env_or("TIERSYNC_SIM_STEPS", 600) as usize;
    let started = std::time::Instant::now();
    let (mut divergent, mut lost, mut leaks, mut gaps, mut trims, mut panicked) =
        (0, 0, 0, 0, 0, 0);
    let mut faults = Faults::default();
    let mut failures: Vec<(u64, String)> = Vec::new();
    for seed in first..first + seeds {
        match std::panic::catch_unwind(|| run(seed, steps)) {
            Ok((o, f)) => {
                faults.add(&f);
                divergent += usize::from(o.divergent);
                lost += o.lost;
                leaks += o.leaks;
                gaps += o.watermark_gaps;
                trims += o.unsafe_trims;
                if o.failed() {
                    failures.push((seed, o.notes.join("; ")));
                }
            }
            Err(e) => {
                panicked += 1;
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push((seed, format!("panicked: {why}")));
            }
        }
    }
    println!(
        "sim: {seeds} seeds ({steps} steps each) in {:.1} s, {divergent} divergent, {lost} lost acknowledged writes, {leaks} private leaks, {gaps} watermark gaps, {trims} unsafe trims, {panicked} panicked; injected: {faults}",
        started.elapsed().as_secs_f64()
    );
    if let Some((seed, why)) = failures.first() {
        let some: Vec<String> = failures
            .iter()
            .take(10)
            .map(|(s, _)| s.to_string())
            .collect();
        panic!(
            "{} of {seeds} seeds failed ({}{}); first: seed {seed}: {why}\nreplay: TIERSYNC_SIM_FIRST_SEED={seed} TIERSYNC_SIM_SEEDS=1 TIERSYNC_SIM_STEPS={steps} cargo test --release -p tiersync-protocol topology -- --nocapture",
            failures.len(),
            some.join(", "),
            if failures.len() > 10 { ", …" } else { "" },
        );
    }
}

fn policy_for_unit() -> Policy {
    policy()
}

fn hello(node: &str, tier: Tier, digest: [u8; 32]) -> Frame {
    Frame::Hello {
        protocol: PROTOCOL_VERSION,
        node: NodeId::new(node).unwrap(),
        tier,
        policy_digest: digest,
        incarnation: 1,
        subtree: vec![],
    }
}

fn downlink(peer: &str) -> Downlink {
    let p = policy_for_unit();
    Downlink::new(
        DownlinkConfig {
            node: NodeId::new("zhejiang").unwrap(),
            tier: Tier::Province,
            policy_digest: p.digest(),
            children: BTreeSet::from([NodeId::new("hangzhou").unwrap()]),
            subtrees: None,
        },
        NodeId::new(peer).unwrap(),
    )
}

fn refused(d: &mut Downlink) -> Option<RefuseReason> {
    while let Some(e) = d.poll_event() {
        if let DownlinkEvent::Send(Frame::Refuse { reason, .. }) = e {
            return Some(reason);
        }
    }
    None
}

#[test]
fn handshake_refusals() {
    let p = policy_for_unit();
    let d0 = p.digest();
    let cases: Vec<(&str, Frame, RefuseReason)> = vec![
        (
            "hangzhou",
            hello("ningbo", Tier::City, d0),
            RefuseReason::IdMismatch,
        ),
        (
            "ningbo",
            hello("ningbo", Tier::City, d0),
            RefuseReason::UnknownChild,
        ),
        (
            "hangzhou",
            hello("hangzhou", Tier::Province, d0),
            RefuseReason::TierNotBelow,
        ),
        (
            "hangzhou",
            hello("hangzhou", Tier::City, [9; 32]),
            RefuseReason::PolicyMismatch,
        ),
        (
            "hangzhou",
            Frame::Hello {
                protocol: 99,
                node: NodeId::new("hangzhou").unwrap(),
                tier: Tier::City,
                policy_digest: d0,
                incarnation: 1,
                subtree: vec![],
            },
            RefuseReason::UnsupportedVersion,
        ),
        (
            "hangzhou",
            Frame::Hello {
                protocol: PROTOCOL_VERSION,
                node: NodeId::new("hangzhou").unwrap(),
                tier: Tier::City,
                policy_digest: d0,
                incarnation: 1,
                subtree: vec![NodeId::new("x").unwrap()],
            },
            RefuseReason::Violation,
        ),
    ];
    for (peer, frame, want) in cases {
        let mut d = downlink(peer);
        d.handle_frame(frame, 0, &p);
        assert_eq!(refused(&mut d), Some(want), "peer {peer}");
        assert!(d.is_closed());
    }
}

fn open_downlink() -> (Downlink, Policy) {
    let p = policy_for_unit();
    let mut d = downlink("hangzhou");
    d.handle_frame(hello("hangzhou", Tier::City, p.digest()), 0, &p);
    assert!(matches!(
        d.poll_event(),
        Some(DownlinkEvent::Accepted { .. })
    ));
    d.cursor_loaded(0, Hlc::ZERO, 0);
    assert_eq!(
        d.poll_event(),
        Some(DownlinkEvent::Send(Frame::Welcome {
            resume_from: 0,
            resume_hlc: Hlc::ZERO,
            now_ms: 0
        }))
    );
    (d, p)
}

fn record_item(category: &str, origin: &str, ms: u64) -> WireItem {
    let mut r = Record::default();
    r.put(
        BTreeMap::from([("a".to_string(), Value::Int(1))]),
        Stamp {
            hlc: Hlc {
                physical_ms: ms,
                logical: 0,
            },
            origin: NodeId::new(origin).unwrap(),
        },
    );
    WireItem {
        category: category.into(),
        key: "k".into(),
        item: Item::Record(r),
    }
}

#[test]
fn batch_refusals() {
    let now = 10_000_000;
    let cases = [
        (
            "private category",
            record_item("opportunity", "hangzhou", now),
        ),
        ("unknown category", record_item("nope", "hangzhou", now)),
        (
            "far-future stamp",
            record_item("customer", "hangzhou", now + 3_600_000),
        ),
        (
            "year 9999",
            record_item("customer", "hangzhou", 253_402_300_799_000),
        ),
        ("wrong kind", record_item("billing", "hangzhou", now)),
    ];
    for (what, item) in cases {
        let (mut d, p) = open_downlink();
        d.handle_frame(batch_of(item), now, &p);
        assert_eq!(refused(&mut d), Some(RefuseReason::Violation), "{what}");
        assert!(d.is_closed(), "{what}");
    }
    // A foreign origin (a city that moved away, or a forgery) is dropped,
    // not refused: the rest of the batch is merged.
    let (mut d, p) = open_downlink();
    d.handle_frame(
        Frame::Batch {
            after: 0,
            last_seq: 1,
            upto_hlc: Hlc::ZERO,
            items: vec![
                record_item("customer", "hangzhou", now),
                record_item("customer", "ningbo", now),
            ],
            watermarks: vec![Watermark {
                origin: NodeId::new("ningbo").unwrap(),
                incarnation: 1,
                seq: 3,
                hlc: Hlc::ZERO,
            }],
        },
        now,
        &p,
    );
    let Some(DownlinkEvent::Dropped { writes, origins }) = d.poll_event() else {
        panic!("the foreign writes are reported");
    };
    assert_eq!(writes, 2, "one record's registers");
    assert_eq!(origins.len(), 1);
    assert!(matches!(
        d.poll_event(),
        Some(DownlinkEvent::Dropped { writes: 1, .. })
    ));
    let Some(DownlinkEvent::Merge {
        cursor: Some((1, _)),
        items,
        watermarks,
        ..
    }) = d.poll_event()
    else {
        panic!("the rest is merged");
    };
    assert_eq!(items.len(), 1);
    assert!(
        items[0]
            .item
            .stamps()
            .iter()
            .all(|s| s.origin.as_str() == "hangzhou")
    );
    assert!(watermarks.is_empty());
    d.merged();
    assert_eq!(
        d.poll_event(),
        Some(DownlinkEvent::Send(Frame::Ack { last_seq: 1 }))
    );
}

/// A loaded batch up to `last_seq` with no items (the uplink tests count
/// batches, not items).
/// The child's first batch, holding `item` alone.
fn batch_of(item: WireItem) -> Frame {
    Frame::Batch {
        after: 0,
        last_seq: 1,
        upto_hlc: Hlc::ZERO,
        items: vec![item],
        watermarks: vec![],
    }
}

fn empty_batch(last_seq: u64) -> LoadedBatch {
    LoadedBatch {
        last_seq,
        upto_hlc: Hlc::ZERO,
        items: vec![],
        watermarks: vec![],
    }
}

/// A city's uplink settings with a window of 2.
fn hangzhou_uplink() -> UplinkConfig {
    UplinkConfig {
        node: NodeId::new("hangzhou").unwrap(),
        tier: Tier::City,
        policy_digest: [0; 32],
        incarnation: 1,
        window: 2,
    }
}

#[test]
fn uplink_window_bounds_unacknowledged_batches() {
    let cfg = hangzhou_uplink();
    let mut u = Uplink::new(cfg, 10, Hlc::ZERO, 1);
    u.connected(vec![]);
    assert!(matches!(
        u.poll_event(),
        Some(UplinkEvent::Send(Frame::Hello { .. }))
    ));
    u.handle_frame(Frame::Welcome {
        resume_from: 4,
        resume_hlc: Hlc::ZERO,
        now_ms: 0,
    });
    let mut sent = Vec::new();
    for _ in 0..10 {
        match u.poll_event() {
            Some(UplinkEvent::LoadBatch { after, epoch }) => {
                u.batch_loaded(epoch, empty_batch(after + 2));
            }
            Some(UplinkEvent::Send(Frame::Batch { last_seq, .. })) => sent.push(last_seq),
            _ => break,
        }
    }
    assert_eq!(sent, vec![6, 8], "two batches in flight, no more");
    u.handle_frame(Frame::Ack { last_seq: 6 });
    assert_eq!(u.poll_event(), Some(UplinkEvent::Acked { seq: 6 }));
    assert_eq!(
        u.poll_event(),
        Some(UplinkEvent::LoadBatch { after: 8, epoch: 1 })
    );
}

#[test]
fn uplink_awaits_an_answer_only_while_one_is_owed() {
    let cfg = hangzhou_uplink();
    let mut u = Uplink::new(cfg, 4, Hlc::ZERO, 1);
    assert!(!u.awaiting_answer(), "not connected");
    u.connected(vec![]);
    assert!(u.awaiting_answer(), "a Welcome is owed");
    u.handle_frame(Frame::Welcome {
        resume_from: 4,
        resume_hlc: Hlc::ZERO,
        now_ms: 0,
    });
    assert!(!u.awaiting_answer(), "caught up: nothing owed");
    u.changes_available(6, Hlc::ZERO);
    while let Some(ev) = u.poll_event() {
        if let UplinkEvent::LoadBatch { after, epoch } = ev {
            u.batch_loaded(epoch, empty_batch(after + 2));
        }
    }
    assert!(u.awaiting_answer(), "a batch is in flight");
    u.handle_frame(Frame::Ack { last_seq: 6 });
    assert!(!u.awaiting_answer(), "everything acknowledged");
    u.changes_available(8, Hlc::ZERO);
    u.disconnected();
    assert!(!u.awaiting_answer(), "nothing is owed on a closed link");
}

#[test]
fn uplink_chooses_snapshot_when_the_changelog_was_trimmed() {
    let cfg = hangzhou_uplink();
    let mut u = Uplink::new(
        cfg,
        50,
        Hlc {
            physical_ms: 5,
            logical: 0,
        },
        41,
    );
    u.connected(vec![]);
    u.poll_event();
    u.handle_frame(Frame::Welcome {
        resume_from: 0,
        resume_hlc: Hlc::ZERO,
        now_ms: 0,
    });
    assert_eq!(
        u.poll_event(),
        Some(UplinkEvent::LoadSnapshot {
            after: None,
            epoch: 1
        })
    );
    u.snapshot_loaded(
        1,
        vec![record_item("customer", "hangzhou", 1)],
        None,
        vec![],
    );
    assert!(matches!(
        u.poll_event(),
        Some(UplinkEvent::Send(Frame::SnapshotChunk { .. }))
    ));
    assert_eq!(
        u.poll_event(),
        Some(UplinkEvent::Send(Frame::SnapshotDone {
            last_seq: 50,
            upto_hlc: Hlc {
                physical_ms: 5,
                logical: 0
            },
            watermarks: vec![]
        }))
    );
}

fn hlc(ms: u64) -> Hlc {
    Hlc {
        physical_ms: ms,
        logical: 0,
    }
}

/// A parent that holds more of this node than its changelog has: the node
/// went back in time, takes a new incarnation and reconnects.
#[test]
fn uplink_behind_its_parent_reincarnates() {
    let mut u = Uplink::new(hangzhou_uplink(), 3, hlc(3), 1);
    u.connected(vec![]);
    u.poll_event();
    u.handle_frame(Frame::Welcome {
        resume_from: 7,
        resume_hlc: hlc(7),
        now_ms: 0,
    });
    assert!(matches!(
        u.poll_event(),
        Some(UplinkEvent::Reincarnate { .. })
    ));
    assert!(
        !u.is_established(),
        "nothing is streamed after the rollback"
    );
    u.reincarnated(99);
    assert_eq!(u.incarnation(), 99);
    assert!(matches!(u.poll_event(), Some(UplinkEvent::Close { .. })));
    u.connected(vec![]);
    assert!(matches!(
        u.poll_event(),
        Some(UplinkEvent::Send(Frame::Hello {
            incarnation: 99,
            ..
        }))
    ));
}

/// A parent whose cursor names a change this node reissued (restored, then
/// wrote past the cursor): caught by the HLC check, not by the numbers.
#[test]
fn uplink_checks_the_change_at_the_parents_cursor() {
    for (matches, established) in [(true, true), (false, false)] {
        let mut u = Uplink::new(hangzhou_uplink(), 10, hlc(10), 1);
        u.connected(vec![]);
        u.poll_event();
        u.handle_frame(Frame::Welcome {
            resume_from: 5,
            resume_hlc: hlc(5),
            now_ms: 0,
        });
        let Some(UplinkEvent::CheckResume {
            seq: 5,
            hlc: h,
            epoch,
        }) = u.poll_event()
        else {
            panic!("the cursor must be checked");
        };
        assert_eq!(h, hlc(5));
        assert!(!u.is_established());
        u.resume_checked(epoch, matches);
        assert_eq!(u.is_established(), established);
        if established {
            assert_eq!(
                u.poll_event(),
                Some(UplinkEvent::LoadBatch { after: 5, epoch })
            );
        } else {
            assert!(matches!(
                u.poll_event(),
                Some(UplinkEvent::Reincarnate { .. })
            ));
        }
    }
}

#[test]
fn resume_matches_rules() {
    // The entry is retained: its HLC decides.
    assert!(resume_matches(5, hlc(5), Some(hlc(5)), None));
    assert!(!resume_matches(5, hlc(5), Some(hlc(6)), None));
    // Trimmed: the mark of the last trim decides at the mark...
    assert!(resume_matches(5, hlc(5), None, Some((5, hlc(5)))));
    assert!(!resume_matches(5, hlc(5), None, Some((5, hlc(9)))));
    // ...and below it the parent went back, not this node.
    assert!(resume_matches(3, hlc(3), None, Some((5, hlc(5)))));
    // Neither entry nor mark: nothing proves the history is the same.
    assert!(!resume_matches(5, hlc(5), None, None));
    assert!(!resume_matches(7, hlc(7), None, Some((5, hlc(5)))));
    // A fresh parent, or a cursor from before protocol 2.
    assert!(resume_matches(0, Hlc::ZERO, None, None));
    assert!(resume_matches(5, Hlc::ZERO, None, None));
}

/// A customer record of `fields` fields named `{prefix}{i}`, of
/// `value_bytes`-byte text each, written by `origin` at `ms` (a PATCH).
fn sized_record(prefix: &str, origin: &str, ms: u64, fields: usize, value_bytes: usize) -> Record {
    let doc = (0..fields)
        .map(|i| {
            (
                format!("{prefix}{i}"),
                Some(Value::Str("x".repeat(value_bytes))),
            )
        })
        .collect();
    let mut r = Record::default();
    r.patch(
        doc,
        Stamp {
            hlc: hlc(ms),
            origin: NodeId::new(origin).unwrap(),
        },
    );
    r
}

/// Case 1 of issue 15: a child's item over the policy's limits (size,
/// fields, one value) refuses the link and nothing is merged; an item at
/// the limits passes, and so does a record two nodes wrote whose merged
/// state is larger than one write may be (each origin within the limits).
#[test]
fn items_over_the_policy_limits_are_refused() {
    let now = 10_000_000;
    let l = policy_for_unit().limits;
    let wire = |r: Record| WireItem {
        category: "customer".into(),
        key: "k".into(),
        item: Item::Record(r),
    };
    let log = LogEntry {
        fields: BTreeMap::from([("memo".to_string(), Value::Str("x".repeat(l.max_item_bytes)))]),
        stamp: Stamp {
            hlc: hlc(now),
            origin: NodeId::new("hangzhou").unwrap(),
        },
    };
    let cases = [
        (
            "just under a frame",
            wire(sized_record(
                "f",
                "hangzhou",
                now,
                1,
                l.max_frame_bytes - 1024,
            )),
            "max_item_bytes",
        ),
        (
            "over max_item_bytes",
            wire(sized_record("f", "hangzhou", now, 4, l.max_item_bytes / 4)),
            "max_item_bytes",
        ),
        (
            "too many fields",
            wire(sized_record("f", "hangzhou", now, l.max_fields + 1, 1)),
            "max_fields",
        ),
        (
            "a log entry over max_item_bytes",
            WireItem {
                category: "billing".into(),
                key: "b".into(),
                item: Item::Log(log),
            },
            "max_item_bytes",
        ),
    ];
    for (what, item, why) in cases {
        let (mut d, p) = open_downlink();
        d.handle_frame(batch_of(item), now, &p);
        let mut refusal = None;
        while let Some(e) = d.poll_event() {
            match e {
                DownlinkEvent::Send(Frame::Refuse { reason, message }) => {
                    refusal = Some((reason, message))
                }
                DownlinkEvent::Merge { .. } => panic!("{what}: nothing may be merged"),
                _ => {}
            }
        }
        let (reason, message) = refusal.unwrap_or_else(|| panic!("{what}: not refused"));
        assert_eq!(reason, RefuseReason::Violation, "{what}");
        assert!(message.contains(why), "{what}: {message}");
        assert!(d.is_closed(), "{what}");
    }
    // At the limits: accepted.
    let p = policy_for_unit();
    let full = sized_record("f", "hangzhou", now, l.max_fields, 8);
    assert_eq!(check_limits(&p, &wire(full)), Ok(()));
    // Two writers' fields merged: larger than one write may be, and each
    // writer within the limits: accepted (a province relays such records).
    let half = l.max_item_bytes / 2 - 64;
    let mut two = sized_record("f", "hangzhou", now, 2, half);
    assert_eq!(check_limits(&p, &wire(two.clone())), Ok(()));
    two.merge(&sized_record("g", "wenzhou", now + 1, 2, half));
    let size = codec::encoded_len(&Item::Record(two.clone())).unwrap();
    assert!(size > l.max_item_bytes, "{size}");
    assert_eq!(check_limits(&p, &wire(two)), Ok(()));
}

/// Case 2 of issue 15: a city's counters may hold only its own share in
/// its own origin's group, within range; anything else refuses the link and
/// nothing is merged. Another city's share is dropped (not stored).
#[test]
fn forged_counters_are_refused_or_dropped() {
    use crate::aggregate::{Compiled, Counters, MAX_SHARE};
    use crate::policy::AggregateDef;
    let now = 10_000_000;
    let mut p = policy_for_unit();
    p.aggregates.insert(
        "opp".into(),
        AggregateDef {
            source: "opportunity".into(),
            group_by: vec!["origin".into(), "stage".into()],
            measures: vec!["count".into()],
            description: String::new(),
        },
    );
    let agg = Compiled::new("opp", &p.aggregates["opp"]).unwrap();
    let counters = |group_origin: &str, actor: &str, value: i128| {
        let group = vec![Some(group_origin.to_string()), Some("won".to_string())];
        let mut c = Counters::new("opp", group.clone(), 1);
        c.set(&NodeId::new(actor).unwrap(), vec![value], hlc(now), 1);
        WireItem {
            category: crate::aggregate::COUNTERS_CATEGORY.into(),
            key: agg.counters_key(&group),
            item: Item::Counters(c),
        }
    };
    let batch = |items| Frame::Batch {
        after: 0,
        last_seq: 1,
        upto_hlc: Hlc::ZERO,
        items,
        watermarks: vec![],
    };
    for (what, item, why) in [
        (
            "its own share in another city's group",
            counters("wenzhou", "hangzhou", 1_000),
            "group of origin wenzhou",
        ),
        (
            "a share beyond the range",
            counters("hangzhou", "hangzhou", MAX_SHARE + 1),
            "do not fit",
        ),
        (
            "a group smaller than min_group_size",
            counters("hangzhou", "hangzhou", 4),
            "min_group_size",
        ),
    ] {
        let (mut d, _) = open_downlink();
        d.handle_frame(batch(vec![item]), now, &p);
        let mut refusal = None;
        while let Some(e) = d.poll_event() {
            match e {
                DownlinkEvent::Send(Frame::Refuse { message, .. }) => refusal = Some(message),
                DownlinkEvent::Merge { .. } => panic!("{what}: nothing may be merged"),
                _ => {}
            }
        }
        let message = refusal.unwrap_or_else(|| panic!("{what}: not refused"));
        assert!(message.contains(why), "{what}: {message}");
    }
    // Another city's share, in its own group: dropped, the rest merged.
    let (mut d, _) = open_downlink();
    d.handle_frame(
        batch(vec![
            counters("wenzhou", "wenzhou", 1_000),
            counters("hangzhou", "hangzhou", 5),
        ]),
        now,
        &p,
    );
    assert!(matches!(
        d.poll_event(),
        Some(DownlinkEvent::Dropped { writes: 1, .. })
    ));
    let Some(DownlinkEvent::Merge { items, .. }) = d.poll_event() else {
        panic!("the honest counters are merged");
    };
    assert_eq!(items.len(), 1);
    let Item::Counters(c) = &items[0].item else {
        panic!("counters");
    };
    assert_eq!(c.actors(), vec![NodeId::new("hangzhou").unwrap()]);
}

/// Case 3 of issue 15: with `[subtree]` configured, a child may claim only
/// what the parent's configuration places below it; its tier comes from
/// its certificate or, without a tier there, from the configuration.
#[test]
fn the_tree_is_authorized_by_configuration() {
    let p = policy_for_unit();
    let id = |s: &str| NodeId::new(s).unwrap();
    let national = |peer: &str, cert_tier: Option<Tier>| {
        Downlink::new(
            DownlinkConfig {
                node: id("national"),
                tier: Tier::National,
                policy_digest: p.digest(),
                children: BTreeSet::from([id("zhejiang"), id("jiangsu"), id("shanghai")]),
                subtrees: Some(BTreeMap::from([
                    (
                        id("zhejiang"),
                        BTreeSet::from([id("hangzhou"), id("ningbo")]),
                    ),
                    (id("jiangsu"), BTreeSet::from([id("nanjing")])),
                ])),
            },
            id(peer),
        )
        .with_peer_tier(cert_tier)
    };
    let hello = |node: &str, tier: Tier, subtree: &[&str]| Frame::Hello {
        protocol: PROTOCOL_VERSION,
        node: id(node),
        tier,
        policy_digest: p.digest(),
        incarnation: 1,
        subtree: subtree.iter().map(|n| id(n)).collect(),
    };
    let refusals = [
        (
            "a sibling's city",
            "zhejiang",
            None,
            hello("zhejiang", Tier::Province, &["hangzhou", "nanjing"]),
            RefuseReason::Violation,
        ),
        (
            "a node nobody configured",
            "jiangsu",
            Some(Tier::Province),
            hello("jiangsu", Tier::Province, &["nanjing", "suzhou"]),
            RefuseReason::Violation,
        ),
        (
            "a tier other than the certificate's",
            "zhejiang",
            Some(Tier::Province),
            hello("zhejiang", Tier::City, &[]),
            RefuseReason::IdMismatch,
        ),
        (
            "a relay configured as a city",
            "shanghai",
            None,
            hello("shanghai", Tier::Province, &[]),
            RefuseReason::TierNotBelow,
        ),
        (
            "a city configured as a relay",
            "jiangsu",
            None,
            hello("jiangsu", Tier::City, &[]),
            RefuseReason::TierNotBelow,
        ),
    ];
    for (what, peer, cert_tier, frame, want) in refusals {
        let mut d = national(peer, cert_tier);
        d.handle_frame(frame, 0, &p);
        assert_eq!(refused(&mut d), Some(want), "{what}");
        assert!(d.is_closed(), "{what}");
    }
    for (peer, cert_tier, frame) in [
        (
            "zhejiang",
            None,
            hello("zhejiang", Tier::Province, &["ningbo"]),
        ),
        (
            "jiangsu",
            Some(Tier::Province),
            hello("jiangsu", Tier::Province, &["nanjing"]),
        ),
        ("shanghai", None, hello("shanghai", Tier::City, &[])),
    ] {
        let mut d = national(peer, cert_tier);
        d.handle_frame(frame, 0, &p);
        assert!(
            matches!(d.poll_event(), Some(DownlinkEvent::Accepted { .. })),
            "{peer}"
        );
    }
}

/// A parent remembers who left a child's subtree, and when.
#[test]
fn subtree_history_remembers_who_left() {
    let ids = |names: &[&str]| -> BTreeSet<NodeId> {
        names.iter().map(|n| NodeId::new(*n).unwrap()).collect()
    };
    let id = |n: &str| NodeId::new(n).unwrap();
    let mut h = SubtreeHistory::default();
    assert!(h.claimed(&ids(&["a", "b"]), 10));
    assert!(!h.claimed(&ids(&["a", "b"]), 20), "nothing changed");
    assert!(h.claimed(&ids(&["a"]), 30));
    assert_eq!(h.former, BTreeMap::from([(id("b"), 30)]));
    // Back again: current, no longer former.
    assert!(h.claimed(&ids(&["a", "b"]), 40));
    assert!(h.former.is_empty());
    assert!(h.claimed(&ids(&["a"]), 50));
    // What the operator recorded (`[moved]`) adds to it; the later time wins.
    let recorded = BTreeMap::from([(id("b"), 70), (id("c"), 5)]);
    assert_eq!(
        h.former_with(Some(&recorded)),
        BTreeMap::from([(id("b"), 70), (id("c"), 5)])
    );
    assert_eq!(h.former_with(None), BTreeMap::from([(id("b"), 50)]));
    // A child that claims and drops nodes at will cannot grow it without
    // bound: the oldest departures go first.
    let many: BTreeSet<NodeId> = (0..MAX_FORMER + 10).map(|i| id(&format!("n{i}"))).collect();
    let mut h = SubtreeHistory::default();
    h.claimed(&many, 1);
    h.claimed(&ids(&["a"]), 2);
    assert_eq!(h.former.len(), MAX_FORMER);
}

/// Writes of a node that left the child's subtree are taken up to the time
/// it left, and dropped after it; its counter share never is.
#[test]
fn writes_of_a_former_member_are_taken_until_it_left() {
    let p = policy_for_unit();
    let now = 10_000;
    let mut d = downlink("hangzhou");
    d.handle_frame(hello("hangzhou", Tier::City, p.digest()), now, &p);
    assert!(matches!(
        d.poll_event(),
        Some(DownlinkEvent::Accepted { .. })
    ));
    d.former_loaded(BTreeMap::from([(NodeId::new("ningbo").unwrap(), 5_000)]));
    d.cursor_loaded(0, Hlc::ZERO, now);
    assert!(matches!(
        d.poll_event(),
        Some(DownlinkEvent::Send(Frame::Welcome { .. }))
    ));
    let mut before = record_item("customer", "ningbo", 4_000);
    before.key = "before".into();
    let mut after = record_item("customer", "ningbo", 6_000);
    after.key = "after".into();
    let mut own = record_item("customer", "hangzhou", 6_000);
    own.key = "own".into();
    d.handle_frame(
        Frame::Batch {
            after: 0,
            last_seq: 1,
            upto_hlc: Hlc::ZERO,
            items: vec![before, after, own],
            watermarks: vec![],
        },
        now,
        &p,
    );
    let Some(DownlinkEvent::Dropped { writes, origins }) = d.poll_event() else {
        panic!("the write made after the move is dropped");
    };
    assert_eq!(writes, 2, "the later record's registers");
    assert_eq!(origins, BTreeSet::from([NodeId::new("ningbo").unwrap()]));
    let Some(DownlinkEvent::Merge { items, .. }) = d.poll_event() else {
        panic!("the rest is merged");
    };
    let keys: Vec<&str> = items.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(keys, ["before", "own"]);
}
