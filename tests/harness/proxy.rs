//! A userspace UDP fault proxy for one replication link, loopback only.
//!
//! It sits between a real child and its real parent: the child's config
//! names the proxy as its parent address ([`Cluster::set_parent_addr`]), and
//! the proxy forwards each datagram to the parent from one upstream socket
//! per child address (so a restarted child, with a new port, gets a new
//! flow). On the way it applies the faults set through [`Faults`]: loss,
//! duplication, reordering (hold one datagram, release it after the next),
//! delay, and a partition in either direction or both. Every decision comes
//! from an RNG seeded per direction, so a run's choices are reproducible
//! given the same datagrams.
//!
//! QUIC recovers from loss, duplication and reordering by itself; the proxy
//! checks the whole stack (and its reconnects) survives them.
//!
//! [`Cluster::set_parent_addr`]: crate::cluster::Cluster::set_parent_addr

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// Direction of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Child → parent.
    Up,
    /// Parent → child.
    Down,
}

/// The faults in force, changeable while traffic flows. Percentages are
/// 0..=100.
#[derive(Debug, Default)]
pub struct Faults {
    loss_pct: AtomicU32,
    dup_pct: AtomicU32,
    reorder_pct: AtomicU32,
    delay_ms: AtomicU64,
    block_up: AtomicBool,
    block_down: AtomicBool,
    /// Datagrams forwarded / dropped (both directions).
    pub forwarded: AtomicU64,
    /// Datagrams dropped by loss or a partition.
    pub dropped: AtomicU64,
}

impl Faults {
    /// Drops this share of datagrams (each direction).
    pub fn set_loss(&self, pct: u32) {
        self.loss_pct.store(pct.min(100), Ordering::SeqCst);
    }

    /// Sends this share of datagrams twice.
    pub fn set_duplication(&self, pct: u32) {
        self.dup_pct.store(pct.min(100), Ordering::SeqCst);
    }

    /// Holds this share of datagrams back until the next one has passed.
    pub fn set_reordering(&self, pct: u32) {
        self.reorder_pct.store(pct.min(100), Ordering::SeqCst);
    }

    /// Delays every datagram by this much.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Cuts (or restores) one direction.
    pub fn set_blocked(&self, dir: Dir, blocked: bool) {
        match dir {
            Dir::Up => self.block_up.store(blocked, Ordering::SeqCst),
            Dir::Down => self.block_down.store(blocked, Ordering::SeqCst),
        }
    }

    /// Cuts both directions.
    pub fn partition(&self) {
        self.set_blocked(Dir::Up, true);
        self.set_blocked(Dir::Down, true);
    }

    /// Restores both directions.
    pub fn heal(&self) {
        self.set_blocked(Dir::Up, false);
        self.set_blocked(Dir::Down, false);
    }

    /// Back to a perfect link.
    pub fn clear(&self) {
        self.heal();
        self.set_loss(0);
        self.set_duplication(0);
        self.set_reordering(0);
        self.set_delay(Duration::ZERO);
    }

    fn blocked(&self, dir: Dir) -> bool {
        match dir {
            Dir::Up => self.block_up.load(Ordering::SeqCst),
            Dir::Down => self.block_down.load(Ordering::SeqCst),
        }
    }
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    /// Where the child must send (the proxy's listening address).
    pub addr: SocketAddr,
    /// The controls.
    pub faults: Arc<Faults>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to `parent`
    /// (a loopback address), with RNG seed `seed`.
    pub fn start(parent: SocketAddr, seed: u64) -> Self {
        assert!(
            parent.ip().is_loopback(),
            "the fault proxy forwards to loopback only, not {parent}"
        );
        let std_sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the proxy socket");
        std_sock.set_nonblocking(true).expect("non-blocking socket");
        let addr = std_sock.local_addr().expect("proxy address");
        let faults = Arc::new(Faults::default());
        let (stop, stop_rx) = watch::channel(false);
        let f = faults.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(serve(std_sock, parent, f, seed, stop_rx));
            })
            .expect("spawn the proxy thread");
        Self {
            addr,
            faults,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a held-back datagram waits for a successor before it is
/// released anyway.
const HOLD_MAX: Duration = Duration::from_millis(20);

/// One direction's state: its RNG and the datagram held back for
/// reordering.
struct Lane {
    dir: Dir,
    rng: StdRng,
    held: Option<(Vec<u8>, tokio::time::Instant)>,
}

impl Lane {
    fn new(dir: Dir, seed: u64) -> Self {
        Self {
            dir,
            rng: StdRng::seed_from_u64(seed),
            held: None,
        }
    }

    fn hit(&mut self, pct: &AtomicU32) -> bool {
        let p = pct.load(Ordering::SeqCst);
        p > 0 && self.rng.random_range(0..100) < p
    }

    /// The datagrams to send now for one received datagram, in order.
    fn on_packet(&mut self, faults: &Faults, pkt: Vec<u8>) -> Vec<Vec<u8>> {
        if faults.blocked(self.dir) || self.hit(&faults.loss_pct) {
            faults.dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let copies = if self.hit(&faults.dup_pct) { 2 } else { 1 };
        let mut out = Vec::new();
        if self.held.is_none() && self.hit(&faults.reorder_pct) {
            self.held = Some((pkt, tokio::time::Instant::now()));
            return out;
        }
        for _ in 0..copies {
            out.push(pkt.clone());
        }
        // A held datagram goes after the one that overtook it.
        if let Some((h, _)) = self.held.take() {
            out.push(h);
        }
        out
    }

    /// Releases a datagram held for longer than [`HOLD_MAX`].
    fn expired(&mut self) -> Option<Vec<u8>> {
        match &self.held {
            Some((_, at)) if at.elapsed() >= HOLD_MAX => self.held.take().map(|(p, _)| p),
            _ => None,
        }
    }
}

async fn send_all(faults: &Faults, sock: &Arc<UdpSocket>, to: SocketAddr, pkts: Vec<Vec<u8>>) {
    let delay = Duration::from_millis(faults.delay_ms.load(Ordering::SeqCst));
    faults
        .forwarded
        .fetch_add(pkts.len() as u64, Ordering::Relaxed);
    if delay.is_zero() {
        for p in pkts {
            let _ = sock.send_to(&p, to).await;
        }
    } else {
        let sock = sock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for p in pkts {
                let _ = sock.send_to(&p, to).await;
            }
        });
    }
}

async fn serve(
    std_sock: std::net::UdpSocket,
    parent: SocketAddr,
    faults: Arc<Faults>,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(front) = UdpSocket::from_std(std_sock) else {
        return;
    };
    let front = Arc::new(front);
    let mut up = Lane::new(Dir::Up, seed);
    // One upstream socket per child address, each with its own reader task.
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut buf = vec![0u8; 65_536];
    let mut last_client: Option<SocketAddr> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                let flow = last_client.and_then(|c| flows.get(&c));
                if let (Some(p), Some(sock)) = (up.expired(), flow) {
                    send_all(&faults, sock, parent, vec![p]).await;
                }
            }
            r = front.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                if !client.ip().is_loopback() {
                    continue;
                }
                let sock = match flows.get(&client) {
                    Some(s) => s.clone(),
                    None => {
                        let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                        let s = Arc::new(s);
                        flows.insert(client, s.clone());
                        let lane_seed = seed ^ 0x9e37_79b9_7f4a_7c15 ^ flows.len() as u64;
                        tokio::spawn(downstream(
                            s.clone(),
                            front.clone(),
                            client,
                            faults.clone(),
                            Lane::new(Dir::Down, lane_seed),
                            parent,
                            stop.clone(),
                        ));
                        s
                    }
                };
                last_client = Some(client);
                let pkts = up.on_packet(&faults, buf[..n].to_vec());
                send_all(&faults, &sock, parent, pkts).await;
            }
        }
    }
}

/// Parent → child for one flow.
async fn downstream(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    faults: Arc<Faults>,
    mut lane: Lane,
    parent: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                if let Some(p) = lane.expired() {
                    send_all(&faults, &front, client, vec![p]).await;
                }
            }
            r = upstream.recv_from(&mut buf) => {
                // Only the parent's datagrams go back to the child.
                let Ok((n, from)) = r else { continue };
                if from != parent {
                    continue;
                }
                let pkts = lane.on_packet(&faults, buf[..n].to_vec());
                send_all(&faults, &front, client, pkts).await;
            }
        }
    }
}
