//! The child's driver: dials the parent, reconnects with exponential backoff
//! and jitter, and pumps an [`Uplink`] session. Local reads and writes never
//! wait for it: a node with its uplink down keeps serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tiersync_protocol::frame::Frame;
use tiersync_protocol::sync::{Uplink, UplinkConfig, UplinkEvent};
use tiersync_protocol::{NodeId, Policy, Tier};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use super::status::LinkStatus;
use super::{LinkError, blocking, read_frame, write_frame};
use crate::config::ParentSection;
use crate::store::{ParentView, Store};

/// Most batches in flight without an acknowledgement.
pub const WINDOW: usize = 8;
/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long the child waits for an answer it is owed (a Welcome, an
/// acknowledgement) before it drops the connection and dials again.
///
/// QUIC's idle timeout does not cover a cut of the child → parent direction
/// only: the parent's keep-alives still reach the child, so the child's
/// connection stays up after the parent dropped it, until a packet of the
/// child's gets through again and is answered with a reset — after a
/// blackout that is the next retransmission, which backs off for many
/// seconds. A fresh connection after the heal gets through within its first
/// retransmissions.
pub const ANSWER_TIMEOUT: Duration = crate::tls::IDLE_TIMEOUT;

/// Everything the uplink driver needs.
pub struct UplinkCtx {
    /// The node's store.
    pub store: Arc<Store>,
    /// The policy in force.
    pub policy: Arc<Policy>,
    /// This node.
    pub node: NodeId,
    /// Its tier.
    pub tier: Tier,
    /// The parent to dial.
    pub parent: ParentSection,
    /// The client endpoint (mutual TLS configured).
    pub endpoint: quinn::Endpoint,
    /// The nodes below this one (sent in Hello).
    pub subtree: Arc<dyn Fn() -> Vec<NodeId> + Send + Sync>,
    /// Shared status.
    pub status: Arc<LinkStatus>,
    /// How long acknowledged changelog entries are kept.
    pub retention: Duration,
}

/// Runs the uplink until `shutdown` turns true.
pub async fn run(ctx: UplinkCtx, mut shutdown: watch::Receiver<bool>) {
    let span = info_span!("uplink", node = %ctx.node, parent = %ctx.parent.id);
    async move {
        match ctx.store.start_under(&ctx.parent.id, crate::now_ms()) {
            Ok(Some(inc)) => warn!(
                new = format!("{inc:016x}"),
                "this node last ran under another parent: took a new incarnation, its new parent learns all of its data"
            ),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "could not record the parent this node runs under"),
        }
        let cfg = UplinkConfig {
            node: ctx.node.clone(),
            tier: ctx.tier,
            policy_digest: ctx.policy.digest(),
            incarnation: ctx.store.incarnation(),
            window: WINDOW,
        };
        let (last, hlc) = *ctx.store.subscribe().borrow();
        let retained = ctx.store.retained_from().unwrap_or(1);
        let mut session = Uplink::new(cfg, last, hlc, retained);
        ctx.status.uplink(|s| {
            s.parent = ctx.parent.id.to_string();
            s.addr = ctx.parent.addr.clone();
            s.state = "connecting".into();
        });
        let mut backoff = BACKOFF_MIN;
        while !*shutdown.borrow() {
            let result = connect_and_stream(&ctx, &mut session, &mut shutdown, &mut backoff).await;
            session.disconnected();
            metrics::gauge!("tiersync_link_up", "link" => "parent", "peer" => ctx.parent.id.to_string()).set(0.0);
            if *shutdown.borrow() {
                break;
            }
            let err = match result {
                Ok(()) => "parent closed the link".to_string(),
                Err(e) => e.to_string(),
            };
            warn!(error = %err, retry_in = ?backoff, "uplink down");
            metrics::counter!("tiersync_link_errors_total", "link" => "parent", "peer" => ctx.parent.id.to_string()).increment(1);
            ctx.status.uplink(|s| {
                s.state = "down".into();
                s.last_error = Some(err);
            });
            // Full jitter keeps a fleet of cities from reconnecting in step.
            let delay = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
            let wake = tokio::time::sleep(delay);
            tokio::pin!(wake);
            let mut committed = ctx.store.subscribe();
            loop {
                // Local writes go on while the link is down: keep the lag current.
                report_lag(&ctx, &session, "down");
                tokio::select! {
                    _ = &mut wake => break,
                    _ = shutdown.changed() => break,
                    r = committed.changed() => if r.is_err() { break },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        info!("uplink stopped");
    }
    .instrument(span)
    .await
}

async fn resolve(addr: &str) -> Result<SocketAddr, LinkError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| LinkError::Connect(format!("resolving {addr}: {e}")))?
        .next()
        .ok_or_else(|| LinkError::Connect(format!("{addr} resolves to no address")))
}

async fn connect_and_stream(
    ctx: &UplinkCtx,
    session: &mut Uplink,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), LinkError> {
    report_lag(ctx, session, "connecting");
    let addr = resolve(&ctx.parent.addr).await?;
    let connect = tokio::time::timeout(
        Duration::from_secs(10),
        crate::tls::connect(&ctx.endpoint, addr, &ctx.parent.id),
    );
    // A shutdown must not wait for an unanswered connection attempt.
    let conn = tokio::select! {
        c = connect => c,
        _ = shutdown.changed() => return Ok(()),
    }
    .map_err(|_| {
        LinkError::Connect(format!(
            "no answer from parent {} at {addr} ({}) within 10 s: is parent.addr its [listen] peer, is it running, and does UDP reach it?",
            ctx.parent.id, ctx.parent.addr
        ))
    })?
    .map_err(|e| LinkError::Connect(e.to_string()))?;
    let (mut send, recv) = conn.open_bi().await?;
    ctx.status.uplink(|s| {
        s.state = "handshake".into();
        s.connects += 1;
    });
    debug!(%addr, "connected");

    // A reader task turns the stream into a channel, so the select below is
    // cancel-safe (read_exact is not).
    let max = ctx.policy.limits.max_frame_bytes;
    let (frames_tx, mut frames) = mpsc::channel::<Result<Option<(Frame, usize)>, LinkError>>(16);
    let reader = tokio::spawn(async move {
        let mut recv = recv;
        loop {
            let r = read_frame(&mut recv, max).await;
            let stop = !matches!(r, Ok(Some(_)));
            if frames_tx.send(r).await.is_err() || stop {
                break;
            }
        }
    });
    let _reader_guard = AbortOnDrop(reader);

    let mut committed = ctx.store.subscribe();
    session.connected((ctx.subtree)());
    let (seq, hlc) = *committed.borrow_and_update();
    session.changes_available(seq, hlc);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // When the parent last answered, while an answer is owed.
    let mut heard = tokio::time::Instant::now();
    loop {
        while let Some(ev) = session.poll_event() {
            match ev {
                UplinkEvent::Send(frame) => {
                    let items = match &frame {
                        Frame::Batch { items, .. } | Frame::SnapshotChunk { items } => items.len(),
                        _ => 0,
                    };
                    let bytes = write_frame(&mut send, &frame, max).await?;
                    if matches!(frame, Frame::Batch { .. } | Frame::SnapshotChunk { .. }) {
                        metrics::counter!("tiersync_link_batches_total", "link" => "parent", "peer" => ctx.parent.id.to_string())
                            .increment(1);
                        metrics::counter!("tiersync_link_items_total", "link" => "parent", "peer" => ctx.parent.id.to_string())
                            .increment(items as u64);
                        metrics::counter!("tiersync_link_bytes_total", "link" => "parent", "peer" => ctx.parent.id.to_string())
                            .increment(bytes as u64);
                        ctx.status.uplink(|s| {
                            s.batches_sent += 1;
                            s.items_sent += items as u64;
                            s.bytes_sent += bytes as u64;
                        });
                    }
                }
                UplinkEvent::LoadBatch { after, epoch } => {
                    let store = ctx.store.clone();
                    let batch = blocking(move || store.load_batch(after)).await?;
                    session.batch_loaded(epoch, batch);
                }
                UplinkEvent::LoadSnapshot { after, epoch } => {
                    let store = ctx.store.clone();
                    let chunk = blocking(move || store.snapshot_chunk(after.as_ref())).await?;
                    session.snapshot_loaded(epoch, chunk.items, chunk.next, chunk.watermarks);
                }
                UplinkEvent::CheckResume { seq, hlc, epoch } => {
                    let store = ctx.store.clone();
                    let ok = blocking(move || store.resume_matches(seq, hlc)).await?;
                    session.resume_checked(epoch, ok);
                }
                UplinkEvent::Reincarnate { reason, parent_hlc } => {
                    let store = ctx.store.clone();
                    let old = store.incarnation();
                    let inc =
                        blocking(move || store.reincarnate(parent_hlc, crate::now_ms())).await?;
                    warn!(
                        %reason,
                        old = format!("{old:016x}"),
                        new = format!("{inc:016x}"),
                        "this node is behind its parent: took a new incarnation, the parent re-learns its data by snapshot"
                    );
                    metrics::counter!("tiersync_reincarnations_total").increment(1);
                    session.reincarnated(inc);
                }
                UplinkEvent::Acked { seq } => {
                    let store = ctx.store.clone();
                    let cutoff = crate::now_ms().saturating_sub(ctx.retention.as_millis() as u64);
                    store.acknowledged(seq);
                    let retained = blocking(move || store.trim_expired(false, cutoff)).await?;
                    session.trimmed(retained);
                }
                UplinkEvent::Close { reason } => {
                    conn.close(1u32.into(), reason.as_bytes());
                    return Err(LinkError::Closed(reason));
                }
            }
        }
        if session.is_established() {
            *backoff = super::uplink::BACKOFF_MIN;
        }
        let state = if session.in_snapshot() {
            "snapshot"
        } else if session.is_established() {
            "streaming"
        } else {
            "handshake"
        };
        report_lag(ctx, session, state);
        if !session.awaiting_answer() {
            heard = tokio::time::Instant::now();
        } else if heard.elapsed() > ANSWER_TIMEOUT {
            return Err(LinkError::Closed(format!(
                "the parent has not answered for {ANSWER_TIMEOUT:?}; dialling again"
            )));
        }
        tokio::select! {
            f = frames.recv() => match f {
                Some(Ok(Some((frame, _)))) => {
                    heard = tokio::time::Instant::now();
                    if let Frame::Welcome { now_ms, resume_from, resume_hlc } = &frame {
                        check_clock(ctx, *now_ms);
                        // Writes stamped while this node's clock ran ahead
                        // get new stamps before anything is streamed, or the
                        // parent would refuse them (`store/clock.rs`).
                        let view = ParentView {
                            resume_from: *resume_from,
                            resume_hlc: *resume_hlc,
                            parent_now_ms: *now_ms,
                        };
                        let store = ctx.store.clone();
                        if let Some(inc) =
                            blocking(move || store.restamp_unshipped(crate::now_ms(), view)).await?
                        {
                            metrics::counter!("tiersync_reincarnations_total").increment(1);
                            session.reincarnated(inc);
                            continue;
                        }
                        // The parent holds no more than its cursor (it may
                        // have been restored): nothing above it may be
                        // trimmed, and the snapshot decision needs the
                        // changelog's start as it is now.
                        ctx.store.parent_resumed(*resume_from)?;
                        session.trimmed(ctx.store.retained_from()?);
                    }
                    session.handle_frame(frame);
                }
                Some(Ok(None)) | None => return Ok(()),
                Some(Err(e)) => return Err(e),
            },
            r = committed.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let (seq, hlc) = *committed.borrow_and_update();
                session.changes_available(seq, hlc);
            }
            _ = tick.tick() => {}
            _ = shutdown.changed() => {
                let _ = send.finish();
                conn.close(0u32.into(), b"shutdown");
                return Ok(());
            }
        }
    }
}

/// Compares this node's clock with the parent's (from its Welcome), as
/// CockroachDB checks every peer against its maximum clock offset: the offset
/// is a metric, and beyond half the policy's `max_clock_skew_ms` an error
/// says which clock to fix. The measurement also bounds this node's time
/// ([`crate::now_ms`]): it never stamps beyond half the skew ahead of its
/// parent, so the parent keeps taking its writes and its subtree keeps
/// replicating while its clock is wrong.
fn check_clock(ctx: &UplinkCtx, parent_now_ms: u64) {
    let wall = crate::wall_ms();
    let offset = wall as i64 - parent_now_ms as i64;
    let max = ctx.policy.limits.max_clock_skew_ms;
    let peer = ctx.parent.id.to_string();
    metrics::gauge!("tiersync_clock_offset_seconds", "peer" => peer.clone())
        .set(offset as f64 / 1000.0);
    crate::set_parent_clock(parent_now_ms, max / 2);
    let correction = wall.saturating_sub(crate::now_ms());
    metrics::gauge!("tiersync_clock_correction_seconds").set(correction as f64 / 1000.0);
    ctx.status.uplink(|s| {
        s.clock_offset_ms = Some(offset);
        s.clock_correction_ms = correction;
    });
    if offset.unsigned_abs() > max / 2 {
        tracing::error!(
            offset_ms = offset,
            max_clock_skew_ms = max,
            parent = %ctx.parent.id,
            correction_ms = correction,
            "this node's clock is {} ms {} its parent's: fix its time source (NTP); {}",
            offset.unsigned_abs(),
            if offset > 0 { "ahead of" } else { "behind" },
            if correction > 0 {
                "until then it stamps its writes at most half the allowed skew ahead of its parent"
            } else {
                "its writes lose to concurrent writes stamped by correct clocks"
            },
        );
    }
}

fn report_lag(ctx: &UplinkCtx, session: &Uplink, state: &str) {
    // The changelog is trimmed only below what the parent acknowledged, so
    // its start bounds the acknowledged position after a restart too.
    let retained = ctx.store.retained_from().unwrap_or(1);
    let acked = session.acked().max(retained.saturating_sub(1));
    let local = ctx.store.last_seq().unwrap_or(0).max(session.local_last());
    let lag = local.saturating_sub(acked);
    let lag_seconds = if lag == 0 {
        0.0
    } else {
        match ctx.store.hlc_of(acked + 1) {
            Ok(Some(h)) => crate::now_ms().saturating_sub(h.physical_ms) as f64 / 1000.0,
            _ => 0.0,
        }
    };
    let parent = ctx.parent.id.to_string();
    metrics::gauge!("tiersync_link_up", "link" => "parent", "peer" => parent.clone())
        .set(if session.is_established() { 1.0 } else { 0.0 });
    metrics::gauge!("tiersync_uplink_lag_records", "peer" => parent.clone()).set(lag as f64);
    metrics::gauge!("tiersync_uplink_lag_seconds", "peer" => parent).set(lag_seconds);
    ctx.status.uplink(|s| {
        s.state = state.into();
        s.acked_seq = acked;
        s.local_seq = local;
        s.lag_records = lag;
        s.lag_seconds = lag_seconds;
        if session.is_established() {
            s.last_error = None;
        }
    });
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
