//! The parent's driver: accepts children on the peer endpoint, takes each
//! child's identity from its certificate, and pumps a [`Downlink`] session.
//! Each connection is its own task: a misbehaving child is refused or dropped
//! without touching the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tiersync_protocol::frame::RefuseReason;
use tiersync_protocol::sync::{Downlink, DownlinkConfig, DownlinkEvent};
use tiersync_protocol::{NodeId, Policy, Tier};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::status::LinkStatus;
use super::{LinkError, blocking, read_frame, write_frame};
use crate::store::{RemoteMerge, Store};

/// Which child relays for which node of the subtree (learned from Hellos).
pub type Claims = Arc<Mutex<BTreeMap<NodeId, NodeId>>>;

/// Who may appear below each child, from the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subtrees {
    /// `[subtree]` (`None`: not configured, the Hellos' claims are trusted).
    pub configured: Option<BTreeMap<NodeId, BTreeSet<NodeId>>>,
    /// `[moved]`: per child, the nodes that left it and until when (ms)
    /// their writes may still come from it.
    pub moved: BTreeMap<NodeId, BTreeMap<NodeId, u64>>,
}

/// Most connections being set up at once; more are refused at once, so a
/// flood of connection attempts cannot exhaust the parent.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// Most connections being set up at once from one IP address, so that a
/// flood from one address cannot take every slot from the real children.
pub const MAX_PENDING_PER_ADDRESS: usize = 8;

/// Most live connections of one node identity (one certificate): a child
/// has one link, and a second covers a reconnect that overlaps the old
/// connection's teardown. With frames read a chunk at a time, one identity
/// can make this node buffer at most this many frames.
pub const MAX_LINKS_PER_IDENTITY: usize = 2;

/// Largest first frame (the Hello) a parent reads: a Hello carries the
/// child's subtree (at most about 900 node ids of the longest length), not
/// data, so a peer cannot make the parent buffer a whole data frame before
/// it said who it is.
pub const HELLO_MAX_BYTES: usize = 64 * 1024;

/// How long a connected peer has to open its stream and send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Live connections per authenticated node identity.
type LinksByIdentity = Arc<Mutex<HashMap<NodeId, usize>>>;

/// One live connection of an identity, released when dropped.
struct IdentitySlot {
    links: LinksByIdentity,
    id: NodeId,
}

impl IdentitySlot {
    /// Takes a slot of `id`, or `None` when it has all of its slots.
    fn take(links: &LinksByIdentity, id: &NodeId) -> Option<Self> {
        let mut map = links.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(id.clone()).or_default();
        if *n >= MAX_LINKS_PER_IDENTITY {
            return None;
        }
        *n += 1;
        Some(Self {
            links: links.clone(),
            id: id.clone(),
        })
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut map = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}

/// Lets a repeated warning through at most once per interval and counts
/// what it held back, so a flood of refused handshakes cannot flood the log.
struct Throttle {
    interval_ms: u64,
    next_ms: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log this one, `n` were held back since the last; `None`:
    /// hold it back.
    fn pass(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let due = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if due {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Connections being set up, per remote IP address.
type PendingByAddress = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One pending handshake of an address, released when dropped.
struct AddressSlot {
    pending: PendingByAddress,
    ip: IpAddr,
}

impl AddressSlot {
    /// Takes a slot of `ip`, or `None` when it has all of its slots.
    fn take(pending: &PendingByAddress, ip: IpAddr) -> Option<Self> {
        // A counter stays meaningful even if a holder panicked.
        let mut map = pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= MAX_PENDING_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Self {
            pending: pending.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Everything the downlink server needs.
#[derive(Clone)]
pub struct DownlinkCtx {
    /// The node's store.
    pub store: Arc<Store>,
    /// The policy in force.
    pub policy: Arc<Policy>,
    /// This node.
    pub node: NodeId,
    /// Its tier.
    pub tier: Tier,
    /// Configured children (a reload may swap the set).
    pub children: Arc<arc_swap::ArcSwap<BTreeSet<NodeId>>>,
    /// Who may appear below each child (`[subtree]`; a reload may swap it).
    pub subtrees: Arc<arc_swap::ArcSwap<Subtrees>>,
    /// Subtree claims of connected children.
    pub claims: Claims,
    /// Shared status.
    pub status: Arc<LinkStatus>,
    /// Serial numbers of revoked certificates; a change closes the live
    /// links of the children they name.
    pub revoked: watch::Receiver<Arc<crate::tls::RevokedSerials>>,
}

/// Accepts children until `shutdown` turns true.
pub async fn serve(
    ctx: DownlinkCtx,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let by_address = PendingByAddress::default();
    let by_identity = LinksByIdentity::default();
    let refusal_log = Arc::new(Throttle::new(1000));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let Some(slot) = AddressSlot::take(&by_address, incoming.remote_address().ip()) else {
            metrics::counter!("tiersync_link_refused_total", "reason" => "address_overload")
                .increment(1);
            incoming.refuse();
            continue;
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            metrics::counter!("tiersync_link_refused_total", "reason" => "overload").increment(1);
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let refusal_log = refusal_log.clone();
        let by_identity = by_identity.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    metrics::counter!("tiersync_link_refused_total", "reason" => "handshake")
                        .increment(1);
                    // An operator needs to see this (an expired or foreign
                    // certificate is a child that silently stops syncing),
                    // but once a second is enough: the metric counts them all.
                    match refusal_log.pass(crate::now_ms()) {
                        Some(held_back) => {
                            warn!(%remote, error = %e, held_back, "refused a connection: TLS handshake failed")
                        }
                        None => {
                            debug!(%remote, error = %e, "refused a connection: TLS handshake failed")
                        }
                    }
                    return;
                }
                Err(_) => {
                    metrics::counter!("tiersync_link_refused_total", "reason" => "timeout")
                        .increment(1);
                    return;
                }
            };
            drop((permit, slot));
            let peer = match crate::tls::peer_cert(&conn) {
                Ok(p) => p,
                Err(e) => {
                    warn!(%remote, error = %e, "refusing a peer without a usable node id in its certificate");
                    conn.close(2u32.into(), b"certificate names no node id");
                    return;
                }
            };
            let Some(_slot) = IdentitySlot::take(&by_identity, &peer.id) else {
                metrics::counter!("tiersync_link_refused_total", "reason" => "identity_overload")
                    .increment(1);
                if let Some(held_back) = refusal_log.pass(crate::now_ms()) {
                    warn!(%remote, peer = %peer.id, held_back, "refused a connection: this node identity already has {MAX_LINKS_PER_IDENTITY} links");
                }
                conn.close(5u32.into(), b"too many connections for this node identity");
                return;
            };
            let span = info_span!("downlink", node = %ctx.node, child = %peer.id, %remote);
            handle(ctx, conn, peer, shutdown).instrument(span).await;
        });
    }
    endpoint.close(0u32.into(), b"shutdown");
}

async fn handle(
    ctx: DownlinkCtx,
    conn: quinn::Connection,
    cert: crate::tls::PeerCert,
    shutdown: watch::Receiver<bool>,
) {
    let peer = cert.id.clone();
    let id = peer.to_string();
    ctx.status.child(&id, |s| s.connected = true);
    metrics::gauge!("tiersync_link_up", "link" => "child", "peer" => id.clone()).set(1.0);
    let result = drive(&ctx, &conn, cert, shutdown).await;
    // Only connected children's claims count: a child that went away (or
    // lost a city to another province) must not block the new relay.
    if let Ok(mut map) = ctx.claims.lock() {
        map.retain(|_, c| *c != peer);
    }
    ctx.status.child(&id, |s| {
        s.connected = false;
        if let Err(e) = &result {
            s.last_error = Some(e.to_string());
        }
    });
    metrics::gauge!("tiersync_link_up", "link" => "child", "peer" => id.clone()).set(0.0);
    match result {
        Ok(()) => info!("child link closed"),
        Err(e) => {
            metrics::counter!("tiersync_link_errors_total", "link" => "child", "peer" => id.clone()).increment(1);
            warn!(error = %e, "child link closed");
        }
    }
}

async fn drive(
    ctx: &DownlinkCtx,
    conn: &quinn::Connection,
    cert: crate::tls::PeerCert,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let peer = cert.id.clone();
    // The stream and the Hello within HELLO_TIMEOUT, the Hello within
    // HELLO_MAX_BYTES: before it said who it is, a peer holds little.
    let hello_by = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let (mut send, mut recv) = tokio::select! {
        s = conn.accept_bi() => s?,
        _ = tokio::time::sleep_until(hello_by) => {
            metrics::counter!("tiersync_link_refused_total", "reason" => "hello_timeout").increment(1);
            conn.close(3u32.into(), b"no Hello in time");
            return Err(LinkError::Closed(format!("no stream opened within {HELLO_TIMEOUT:?}")));
        }
    };
    let cfg = DownlinkConfig {
        node: ctx.node.clone(),
        tier: ctx.tier,
        policy_digest: ctx.policy.digest(),
        children: ctx.children.load().as_ref().clone(),
        subtrees: ctx.subtrees.load().configured.clone(),
    };
    let mut session = Downlink::new(cfg, peer.clone()).with_peer_tier(cert.tier);
    let max = ctx.policy.limits.max_frame_bytes;
    let serial = cert.serial;
    let mut revoked = ctx.revoked.clone();
    let mut incarnation = 0u64;
    let id = peer.to_string();
    loop {
        // Reading is the only await in the loop that a shutdown may cut:
        // a merge in progress completes and is acknowledged first.
        let greeted = session.is_greeted();
        let limit = if greeted {
            max
        } else {
            HELLO_MAX_BYTES.min(max)
        };
        let deadline = if greeted { None } else { Some(hello_by) };
        // Only a revocation that concerns another child lets the read go
        // on: the read itself is never cut, or the stream would lose bytes.
        let read = read_frame(&mut recv, limit);
        tokio::pin!(read);
        let frame = loop {
            tokio::select! {
                f = &mut read => break f,
                _ = sleep_until_some(deadline) => {
                    metrics::counter!("tiersync_link_refused_total", "reason" => "hello_timeout").increment(1);
                    conn.close(3u32.into(), b"no Hello in time");
                    return Err(LinkError::Closed(format!("no Hello within {HELLO_TIMEOUT:?}")));
                }
                _ = shutdown.changed() => {
                    conn.close(0u32.into(), b"shutdown");
                    return Ok(());
                }
                Ok(()) = revoked.changed() => {
                    let now_revoked = revoked.borrow_and_update().contains(&serial);
                    if now_revoked {
                        metrics::counter!("tiersync_link_refused_total", "reason" => "revoked").increment(1);
                        conn.close(6u32.into(), b"certificate revoked");
                        return Err(LinkError::Closed(
                            "the child's certificate was revoked: link closed".into(),
                        ));
                    }
                }
            }
        };
        let (frame, bytes) = match frame {
            Ok(Some((f, n))) => (f, n as u64),
            Ok(None) => return Ok(()),
            Err(e) => {
                // Garbage or an oversized prefix: drop this link only.
                conn.close(3u32.into(), b"bad frame");
                return Err(e);
            }
        };
        session.handle_frame(frame, crate::now_ms(), &ctx.policy);
        while let Some(ev) = session.poll_event() {
            match ev {
                DownlinkEvent::Send(frame) => {
                    write_frame(&mut send, &frame, max).await?;
                }
                DownlinkEvent::Accepted {
                    child,
                    incarnation: inc,
                    subtree,
                } => {
                    if let Some((n, other)) = claim(&ctx.claims, &child, &subtree) {
                        session.refuse(
                            RefuseReason::Violation,
                            format!(
                                "{child} claims {n} in its subtree, but {other} relays for {n}"
                            ),
                        );
                        continue;
                    }
                    incarnation = inc;
                    // Who left this child's subtree, stored before anything
                    // of this session is merged (see `store/subtrees.rs`).
                    let until = crate::now_ms().saturating_add(ctx.policy.limits.max_clock_skew_ms);
                    let claimed: BTreeSet<NodeId> = subtree.iter().cloned().collect();
                    let (store, c) = (ctx.store.clone(), child.clone());
                    let history =
                        blocking(move || store.subtree_claimed(&c, &claimed, until)).await?;
                    let tree = ctx.subtrees.load();
                    let former = history.former_with(tree.moved.get(&child));
                    if !former.is_empty() {
                        let names: Vec<String> = former.keys().map(ToString::to_string).collect();
                        info!(
                            former = names.join(","),
                            "nodes that left this child's subtree: their writes made before they left are still taken from it"
                        );
                    }
                    session.former_loaded(former);
                    let store = ctx.store.clone();
                    let c = child.clone();
                    let (cursor, cursor_hlc) = blocking(move || store.cursor(&c, inc)).await?;
                    info!(resume_from = cursor, "child accepted");
                    ctx.status.child(&id, |s| {
                        s.cursor = cursor;
                        s.last_error = None;
                    });
                    session.cursor_loaded(cursor, cursor_hlc, crate::now_ms());
                }
                DownlinkEvent::Dropped { writes, origins } => {
                    let origins: Vec<String> = origins.iter().map(ToString::to_string).collect();
                    warn!(
                        writes,
                        origins = origins.join(","),
                        "dropped writes of nodes outside this child's subtree (a city that moved away, or a forgery); they reach this node through the city's current parent"
                    );
                    metrics::counter!("tiersync_link_foreign_dropped_total", "link" => "child", "peer" => id.clone())
                        .increment(writes as u64);
                }
                DownlinkEvent::Merge {
                    items,
                    cursor,
                    watermarks,
                    relay_all,
                } => {
                    let n = items.len() as u64;
                    let mut marks: Vec<(String, u64, u64)> = watermarks
                        .iter()
                        .map(|w| (w.origin.to_string(), w.seq, w.hlc.physical_ms))
                        .collect();
                    if let Some((seq, hlc)) = cursor {
                        marks.push((id.clone(), seq, hlc.physical_ms));
                    }
                    let store = ctx.store.clone();
                    let merge = RemoteMerge {
                        now_ms: crate::now_ms(),
                        relay_all,
                        child: peer.clone(),
                        incarnation,
                        items,
                        cursor: cursor.map(|c| (c.0, c.1)),
                        watermarks,
                    };
                    let stats = blocking(move || store.merge_remote(merge)).await?;
                    metrics::counter!("tiersync_link_batches_total", "link" => "child", "peer" => id.clone()).increment(1);
                    metrics::counter!("tiersync_link_items_total", "link" => "child", "peer" => id.clone()).increment(n);
                    metrics::counter!("tiersync_link_bytes_total", "link" => "child", "peer" => id.clone()).increment(bytes);
                    metrics::counter!("tiersync_merges_total").increment(stats.changed as u64);
                    for (origin, seq, ms) in marks {
                        // "Everything `origin` wrote up to `seq` (at time `ms`) is here."
                        metrics::gauge!("tiersync_origin_watermark_seq", "origin" => origin.clone()).set(seq as f64);
                        metrics::gauge!("tiersync_origin_complete_up_to_timestamp_seconds", "origin" => origin).set(ms as f64 / 1000.0);
                    }
                    metrics::counter!("tiersync_merge_conflicts_total")
                        .increment(stats.conflicts as u64);
                    ctx.status.child(&id, |s| {
                        s.batches += 1;
                        s.items += n;
                        s.changed += stats.changed as u64;
                        s.conflicts += stats.conflicts as u64;
                        s.bytes += bytes;
                        if let Some((seq, _)) = cursor {
                            s.cursor = s.cursor.max(seq);
                        }
                    });
                    session.merged();
                }
                DownlinkEvent::Close { reason } => {
                    warn!(%reason, "closing child link");
                    metrics::counter!("tiersync_link_refused_total", "reason" => "session")
                        .increment(1);
                    // Let the Refuse frame reach the child before closing.
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    conn.close(4u32.into(), reason.as_bytes());
                    return Err(LinkError::Closed(reason));
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Records `child`'s subtree claims; returns a node another child already
/// relays for, if any.
fn claim(claims: &Claims, child: &NodeId, subtree: &[NodeId]) -> Option<(NodeId, NodeId)> {
    let mut map = claims.lock().ok()?;
    for n in subtree {
        if let Some(other) = map.get(n)
            && other != child
        {
            return Some((n.clone(), other.clone()));
        }
    }
    map.retain(|_, c| c != child);
    for n in subtree {
        map.insert(n.clone(), child.clone());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_warning_passes_once_per_interval_and_counts_the_rest() {
        let t = Throttle::new(1000);
        assert_eq!(t.pass(5_000), Some(0));
        assert_eq!(t.pass(5_010), None);
        assert_eq!(t.pass(5_999), None);
        assert_eq!(t.pass(6_000), Some(2));
        assert_eq!(t.pass(9_000), Some(0));
    }

    #[test]
    fn an_address_gets_at_most_its_share_of_pending_handshakes() {
        let pending = PendingByAddress::default();
        let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 2].into(), [127, 0, 0, 1].into());
        let mut held: Vec<_> = (0..MAX_PENDING_PER_ADDRESS)
            .map(|_| AddressSlot::take(&pending, a).expect("a slot within the cap"))
            .collect();
        assert!(AddressSlot::take(&pending, a).is_none(), "beyond the cap");
        // Another address is not affected.
        let other = AddressSlot::take(&pending, b).expect("another address's slot");
        // A finished handshake frees its slot; the last one leaves no entry.
        held.pop();
        assert!(AddressSlot::take(&pending, a).is_some());
        drop(held);
        drop(other);
        assert!(pending.lock().unwrap().is_empty());
    }

    #[test]
    fn an_identity_gets_at_most_its_links() {
        let links = LinksByIdentity::default();
        let (a, b) = (
            NodeId::new("hangzhou").unwrap(),
            NodeId::new("ningbo").unwrap(),
        );
        let mut held: Vec<_> = (0..MAX_LINKS_PER_IDENTITY)
            .map(|_| IdentitySlot::take(&links, &a).expect("a link within the cap"))
            .collect();
        assert!(IdentitySlot::take(&links, &a).is_none(), "beyond the cap");
        let other = IdentitySlot::take(&links, &b).expect("another identity's link");
        held.pop();
        assert!(IdentitySlot::take(&links, &a).is_some());
        drop(held);
        drop(other);
        assert!(links.lock().unwrap().is_empty());
    }
}
