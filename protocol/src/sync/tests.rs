//! A deterministic in-memory network: 1 national, 2 provinces, 2 cities each,
//! every node with an in-memory store and changelog, driven through the real
//! `Uplink`/`Downlink` state machines. Seeded random steps write at cities,
//! deliver frames, drop them (a lost frame breaks the connection, as on a
//! QUIC stream), re-deliver stale frames from old connections, restart nodes,
//! wipe parents and trim changelogs. After healing, every tier must hold
//! exactly the merge of its subtree's shared items, nothing private above a
//! city, and complete watermarks.

use std::collections::{BTreeMap, VecDeque};

use super::*;
use crate::clock::{HlcClock, Stamp};
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
    cursors: BTreeMap<(NodeId, u64), u64>,
    watermarks: BTreeMap<NodeId, Watermark>,
    uplink: Option<Uplink>,
}

impl Node {
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

/// One child ↔ parent connection.
struct Link {
    child: usize,
    parent: usize,
    up: VecDeque<Frame>,
    down: VecDeque<Frame>,
    downlink: Option<Downlink>,
    connected: bool,
}

struct Sim {
    rng: Rng,
    now: u64,
    policy: Policy,
    digest: [u8; 32],
    nodes: Vec<Node>,
    links: Vec<Link>,
    /// Frames from closed connections, delivered late to new ones, with the
    /// generations of both ends when they were sent: a frame can outlive its
    /// connection (the parent still draining it), never a process restart.
    stale: Vec<(usize, Frame, (u64, u64))>,
    /// Per node, incremented on every restart.
    generation: Vec<u64>,
}

const WINDOW: usize = 2;

impl Sim {
    fn new(seed: u64) -> Self {
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
                    uplink: None,
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
                });
            }
        }
        let generation = vec![0; nodes.len()];
        let mut sim = Sim {
            rng: Rng(seed.max(1)),
            now: 1_000_000,
            policy,
            digest,
            nodes,
            links,
            stale: Vec::new(),
            generation,
        };
        for i in 0..sim.nodes.len() {
            sim.restart(i);
        }
        sim
    }

    fn gens(&self, l: usize) -> (u64, u64) {
        (
            self.generation[self.links[l].child],
            self.generation[self.links[l].parent],
        )
    }

    fn restart(&mut self, i: usize) {
        self.generation[i] += 1;
        for l in 0..self.links.len() {
            if self.links[l].child == i || self.links[l].parent == i {
                self.disconnect(l);
            }
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
            Uplink::new(cfg, n.last_seq, n.last_hlc(), n.retained_from)
        });
    }

    fn wipe(&mut self, i: usize) {
        self.restart(i);
        let n = &mut self.nodes[i];
        n.incarnation = n.incarnation.wrapping_mul(31).wrapping_add(7);
        n.store.clear();
        n.changelog.clear();
        n.last_seq = 0;
        n.retained_from = 1;
        n.cursors.clear();
        n.watermarks.clear();
        // The HLC stays monotonic: a restored node resumes its clock above
        // what it issued (operators restore the clock with the data).
        self.restart(i);
    }

    fn disconnect(&mut self, l: usize) {
        let link = &mut self.links[l];
        if !link.connected {
            return;
        }
        link.connected = false;
        let gens = (self.generation[link.child], self.generation[link.parent]);
        for f in link.up.drain(..) {
            self.stale.push((l, f, gens));
        }
        link.down.clear();
        link.downlink = None;
        let child = link.child;
        if let Some(u) = self.nodes[child].uplink.as_mut() {
            u.disconnected();
        }
    }

    fn connect(&mut self, l: usize) {
        if self.links[l].connected {
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

    /// A local write at a city.
    fn write(&mut self, city: usize) {
        self.now += self.rng.below(3);
        let now = self.now;
        let key_n = self.rng.below(6);
        let choice = self.rng.below(5);
        let n = &mut self.nodes[city];
        let stamp = n.clock.tick(now);
        let v = Value::Int(self.rng.below(100) as i64);
        let (cat, key, item) = match choice {
            0 | 1 => {
                let key = ("customer".to_string(), format!("c{key_n}"));
                let mut r = match n.store.get(&key) {
                    Some(Item::Record(r)) => r.clone(),
                    _ => Record::default(),
                };
                if choice == 0 {
                    r.put(BTreeMap::from([("a".to_string(), v)]), stamp.clone());
                } else {
                    r.patch(
                        BTreeMap::from([(format!("f{}", key_n % 3), Some(v))]),
                        stamp.clone(),
                    );
                }
                (key.0, key.1, Item::Record(r))
            }
            2 => {
                let key = ("customer".to_string(), format!("c{key_n}"));
                let mut r = match n.store.get(&key) {
                    Some(Item::Record(r)) => r.clone(),
                    _ => Record::default(),
                };
                r.delete(stamp.clone());
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
        n.store.insert(k.clone(), item);
        n.append(Change::Item(k), stamp.hlc);
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
                    let n = &self.nodes[c];
                    let mut items = Vec::new();
                    let mut next = None;
                    for (k, item) in n
                        .store
                        .iter()
                        .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
                    {
                        if self.policy.categories[&k.0].replicate != Replicate::Up {
                            continue;
                        }
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
                UplinkEvent::Acked { seq } => {
                    if self.rng.chance(50) {
                        let n = &mut self.nodes[c];
                        n.changelog = n.changelog.split_off(&(seq + 1));
                        n.retained_from = n.retained_from.max(seq + 1);
                        let r = n.retained_from;
                        n.uplink.as_mut().unwrap().trimmed(r);
                    }
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

    fn current_watermarks(&self, c: usize) -> Vec<Watermark> {
        self.nodes[c].watermarks.values().cloned().collect()
    }

    fn load_batch(&self, c: usize, after: u64) -> LoadedBatch {
        let n = &self.nodes[c];
        let mut keys: Vec<ItemKey> = Vec::new();
        let mut wms: BTreeMap<NodeId, Watermark> = BTreeMap::new();
        let mut last = (after, Hlc::ZERO);
        for (&seq, (change, hlc)) in n.changelog.range(after + 1..).take(4) {
            assert!(seq >= n.retained_from, "loading a trimmed entry");
            last = (seq, *hlc);
            match change {
                Change::Item(k) => {
                    if self.policy.categories[&k.0].replicate == Replicate::Up && !keys.contains(k)
                    {
                        keys.push(k.clone());
                    }
                }
                Change::Watermark(w) => {
                    wms.insert(w.origin.clone(), w.clone());
                }
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
                    child, incarnation, ..
                } => {
                    let cur = self.nodes[p]
                        .cursors
                        .get(&(child, incarnation))
                        .copied()
                        .unwrap_or(0);
                    self.links[l].downlink.as_mut().unwrap().cursor_loaded(cur);
                }
                DownlinkEvent::Merge {
                    items,
                    cursor,
                    watermarks,
                } => {
                    let child_id = self.links[l].downlink.as_ref().unwrap().peer().clone();
                    let inc = self.nodes[self.links[l].child].incarnation;
                    let n = &mut self.nodes[p];
                    for w in items {
                        for s in w.item.stamps() {
                            n.clock.observe(s.hlc);
                        }
                        let k = (w.category, w.key);
                        let changed = match n.store.get_mut(&k) {
                            Some(mine) => mine.merge(&w.item).changed,
                            None => {
                                n.store.insert(k.clone(), w.item);
                                true
                            }
                        };
                        if changed {
                            let hlc = n.clock.last();
                            n.append(Change::Item(k), hlc);
                        }
                    }
                    let mut marks = watermarks;
                    if let Some((seq, hlc)) = cursor {
                        let c = n.cursors.entry((child_id.clone(), inc)).or_insert(0);
                        *c = (*c).max(seq);
                        marks.push(Watermark {
                            origin: child_id,
                            incarnation: inc,
                            seq,
                            hlc,
                        });
                    }
                    for w in marks {
                        let newer = match n.watermarks.get(&w.origin) {
                            Some(cur) => cur.incarnation != w.incarnation || w.seq > cur.seq,
                            None => true,
                        };
                        if newer {
                            n.watermarks.insert(w.origin.clone(), w.clone());
                            let hlc = n.clock.last();
                            n.append(Change::Watermark(w), hlc);
                        }
                    }
                    let (last, hlc) = (n.last_seq, n.last_hlc());
                    if let Some(u) = n.uplink.as_mut() {
                        u.changes_available(last, hlc);
                    }
                    self.links[l].downlink.as_mut().unwrap().merged();
                    self.pump_child(p);
                }
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

    fn deliver_up(&mut self, l: usize, f: Frame) {
        let now = self.now;
        let Some(d) = self.links[l].downlink.as_mut() else {
            return;
        };
        d.handle_frame(f, now, &self.policy);
        self.pump_parent(l);
    }

    fn step(&mut self) {
        let l = self.rng.below(self.links.len() as u64) as usize;
        match self.rng.below(100) {
            0..=24 => {
                let city = 3 + self.rng.below(4) as usize;
                self.write(city);
            }
            25..=59 => {
                if let Some(f) = self.links[l].up.pop_front() {
                    if self.rng.chance(3) {
                        // A lost frame: the stream breaks.
                        let gens = self.gens(l);
                        self.stale.push((l, f, gens));
                        self.disconnect(l);
                    } else {
                        self.deliver_up(l, f);
                    }
                }
            }
            60..=89 => {
                if let Some(f) = self.links[l].down.pop_front() {
                    let c = self.links[l].child;
                    if let Some(u) = self.nodes[c].uplink.as_mut() {
                        u.handle_frame(f);
                    }
                    self.pump_child(c);
                }
            }
            90..=93 => self.connect(l),
            94..=95 => self.disconnect(l),
            96 => {
                // A stale, duplicated or reordered frame from an earlier
                // connection reaches a fresh one.
                if !self.stale.is_empty() && self.links[l].connected {
                    let i = self.rng.below(self.stale.len() as u64) as usize;
                    let (sl, f, gens) = self.stale[i].clone();
                    let open = self.links[l]
                        .downlink
                        .as_ref()
                        .is_some_and(|d| d.state == DownState::Open);
                    if sl == l && gens == self.gens(l) && matches!(f, Frame::Batch { .. }) && open {
                        {
                            self.deliver_up(l, f);
                        }
                    }
                }
            }
            97 => {
                let i = self.rng.below(self.nodes.len() as u64) as usize;
                self.restart(i);
            }
            98 => {
                // A parent loses its data (restored empty): children catch up.
                if self.rng.chance(20) {
                    let i = self.rng.below(3) as usize;
                    self.wipe(i);
                }
            }
            _ => self.now += 50,
        }
    }

    /// Heals everything and runs until no frame moves.
    fn heal(&mut self) {
        for _ in 0..100_000 {
            for l in 0..self.links.len() {
                self.connect(l);
            }
            let mut moved = false;
            for l in 0..self.links.len() {
                while let Some(f) = self.links[l].up.pop_front() {
                    moved = true;
                    self.deliver_up(l, f);
                }
                while let Some(f) = self.links[l].down.pop_front() {
                    moved = true;
                    let c = self.links[l].child;
                    if let Some(u) = self.nodes[c].uplink.as_mut() {
                        u.handle_frame(f);
                    }
                    self.pump_child(c);
                }
            }
            if !moved && self.links.iter().all(|l| l.connected) {
                return;
            }
        }
        panic!("the network did not quiesce");
    }

    fn expected(&self, i: usize) -> BTreeMap<ItemKey, Item> {
        let mut out: BTreeMap<ItemKey, Item> = BTreeMap::new();
        let mut stack = vec![i];
        while let Some(n) = stack.pop() {
            let node = &self.nodes[n];
            stack.extend(&node.children);
            if node.tier != Tier::City {
                continue;
            }
            for (k, item) in &node.store {
                if self.policy.categories[&k.0].replicate != Replicate::Up {
                    continue;
                }
                match out.get_mut(k) {
                    Some(m) => {
                        m.merge(item);
                    }
                    None => {
                        out.insert(k.clone(), item.clone());
                    }
                }
            }
        }
        out
    }

    fn check(&self, seed: u64) {
        for i in 0..3 {
            let n = &self.nodes[i];
            assert!(
                n.store.keys().all(|k| k.0 != "opportunity"),
                "seed {seed}: a private item reached {}",
                n.id
            );
            let want = self.expected(i);
            for k in want.keys() {
                if !n.store.contains_key(k) {
                    eprintln!("missing at {}: {k:?} = {:?}", n.id, want[k]);
                }
            }
            assert_eq!(
                n.store.len(),
                want.len(),
                "seed {seed}: item count at {}",
                n.id
            );
            for (k, item) in &want {
                assert_eq!(n.store.get(k), Some(item), "seed {seed}: {k:?} at {}", n.id);
            }
            // Completeness: every city below knows to its last change.
            let mut stack = n.children.clone();
            while let Some(c) = stack.pop() {
                stack.extend(&self.nodes[c].children);
                let wm = n
                    .watermarks
                    .get(&self.nodes[c].id)
                    .map(|w| (w.incarnation, w.seq));
                let want = (self.nodes[c].incarnation, self.nodes[c].last_seq);
                if want.1 > 0 {
                    assert_eq!(
                        wm,
                        Some(want),
                        "seed {seed}: watermark of {} at {}",
                        self.nodes[c].id,
                        n.id
                    );
                }
            }
        }
    }
}

fn run(seed: u64, steps: usize) {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        sim.step();
    }
    sim.heal();
    sim.check(seed);
}

#[test]
fn topology_converges_under_faults() {
    let seeds: u64 = std::env::var("TIERSYNC_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let first: u64 = std::env::var("TIERSYNC_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for seed in first..first + seeds {
        let result = std::panic::catch_unwind(|| run(seed, 600));
        if let Err(e) = result {
            panic!(
                "seed {seed} failed (replay: TIERSYNC_SIM_FIRST_SEED={seed} TIERSYNC_SIM_SEEDS=1): {e:?}"
            );
        }
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
    d.cursor_loaded(0);
    assert_eq!(
        d.poll_event(),
        Some(DownlinkEvent::Send(Frame::Welcome { resume_from: 0 }))
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
        ("foreign origin", record_item("customer", "ningbo", now)),
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
        d.handle_frame(
            Frame::Batch {
                after: 0,
                last_seq: 1,
                upto_hlc: Hlc::ZERO,
                items: vec![item],
                watermarks: vec![],
            },
            now,
            &p,
        );
        assert_eq!(refused(&mut d), Some(RefuseReason::Violation), "{what}");
        assert!(d.is_closed(), "{what}");
    }
    let (mut d, p) = open_downlink();
    d.handle_frame(
        Frame::Batch {
            after: 0,
            last_seq: 1,
            upto_hlc: Hlc::ZERO,
            items: vec![record_item("customer", "hangzhou", now)],
            watermarks: vec![],
        },
        now,
        &p,
    );
    assert!(matches!(
        d.poll_event(),
        Some(DownlinkEvent::Merge {
            cursor: Some((1, _)),
            ..
        })
    ));
    d.merged();
    assert_eq!(
        d.poll_event(),
        Some(DownlinkEvent::Send(Frame::Ack { last_seq: 1 }))
    );
}

#[test]
fn uplink_window_bounds_unacknowledged_batches() {
    let cfg = UplinkConfig {
        node: NodeId::new("hangzhou").unwrap(),
        tier: Tier::City,
        policy_digest: [0; 32],
        incarnation: 1,
        window: 2,
    };
    let mut u = Uplink::new(cfg, 10, Hlc::ZERO, 1);
    u.connected(vec![]);
    assert!(matches!(
        u.poll_event(),
        Some(UplinkEvent::Send(Frame::Hello { .. }))
    ));
    u.handle_frame(Frame::Welcome { resume_from: 4 });
    let mut sent = Vec::new();
    for _ in 0..10 {
        match u.poll_event() {
            Some(UplinkEvent::LoadBatch { after, epoch }) => {
                let batch = LoadedBatch {
                    last_seq: after + 2,
                    upto_hlc: Hlc::ZERO,
                    items: vec![],
                    watermarks: vec![],
                };
                u.batch_loaded(epoch, batch);
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
fn uplink_chooses_snapshot_when_the_changelog_was_trimmed() {
    let cfg = UplinkConfig {
        node: NodeId::new("hangzhou").unwrap(),
        tier: Tier::City,
        policy_digest: [0; 32],
        incarnation: 1,
        window: 2,
    };
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
    u.handle_frame(Frame::Welcome { resume_from: 0 });
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
    // A parent that is ahead of what this node ever wrote is a violation.
    let mut u2 = Uplink::new(
        UplinkConfig {
            node: NodeId::new("hangzhou").unwrap(),
            tier: Tier::City,
            policy_digest: [0; 32],
            incarnation: 1,
            window: 2,
        },
        3,
        Hlc::ZERO,
        1,
    );
    u2.connected(vec![]);
    u2.poll_event();
    u2.handle_frame(Frame::Welcome { resume_from: 7 });
    assert!(matches!(u2.poll_event(), Some(UplinkEvent::Close { .. })));
}
