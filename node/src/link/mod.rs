//! Replication links: the only code that knows quinn streams.
//!
//! One thin driver per link owns the QUIC connection and its stream, and
//! pumps the sans-IO session from `tiersync_protocol::sync`: [`uplink`] at
//! the child (dial, reconnect with backoff and jitter, stream the changelog),
//! [`downlink`] at the parent (accept, authenticate, merge, acknowledge).
//! Store work runs on the blocking pool; acknowledgements are sent only
//! after `Store::merge_remote` returned, i.e. after the WriteBatch is durable.

pub mod downlink;
pub mod status;
pub mod uplink;

use std::time::Duration;

use tiersync_protocol::codec::{self, CodecError, FRAME_HEADER_BYTES};
use tiersync_protocol::frame::Frame;

/// Why a link broke. Every variant ends the connection; the uplink retries.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting or the TLS handshake failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection broke.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Writing the stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// A frame could not be encoded or decoded.
    #[error("frame: {0}")]
    Codec(#[from] CodecError),
    /// The peer sent the start of a frame and then nothing for too long.
    #[error("peer stalled mid-frame for more than {0:?}")]
    Stalled(Duration),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The session closed the link (refusal, violation).
    #[error("{0}")]
    Closed(String),
    /// A blocking task panicked or was cancelled.
    #[error("internal: {0}")]
    Internal(String),
}

/// How long a peer may take to deliver the rest of a frame once its length
/// prefix has arrived.
pub const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads one frame and its size: the 4-byte length is checked against `max`
/// before the body is allocated. `Ok(None)` when the peer finished the
/// stream cleanly.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<(Frame, usize)>, LinkError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    // With only the prefix, `check_frame` validates the length and answers
    // "incomplete"; anything else is an error.
    codec::check_frame(&header, max)?;
    let len = u32::from_be_bytes(header) as usize;
    // The buffer grows with what arrives, never to the announced length at
    // once: a peer that announces a large frame and stalls holds only what
    // it actually sent (at most a chunk more).
    let mut buf = Vec::with_capacity(4 + len.min(READ_CHUNK));
    buf.extend_from_slice(&header);
    tokio::time::timeout(FRAME_BODY_TIMEOUT, read_body(recv, &mut buf, 4 + len))
        .await
        .map_err(|_| LinkError::Stalled(FRAME_BODY_TIMEOUT))??;
    match codec::decode_frame::<Frame>(&buf, max)? {
        Some((frame, n)) => Ok(Some((frame, n))),
        None => Err(LinkError::Codec(CodecError::Malformed(
            "incomplete frame after a full read".into(),
        ))),
    }
}

/// How much of a frame's body is read (and allocated) at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Reads into `buf` until it holds `total` bytes, a chunk at a time.
async fn read_body(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    total: usize,
) -> Result<(), LinkError> {
    while buf.len() < total {
        let start = buf.len();
        buf.resize(start + (total - start).min(READ_CHUNK), 0);
        match recv.read(&mut buf[start..]).await {
            Ok(Some(n)) => buf.truncate(start + n),
            Ok(None) => {
                return Err(LinkError::Read(quinn::ReadExactError::FinishedEarly(
                    start - 4,
                )));
            }
            Err(e) => return Err(LinkError::Read(quinn::ReadExactError::ReadError(e))),
        }
    }
    Ok(())
}

/// Writes one frame; returns its size in bytes.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &Frame,
    max: usize,
) -> Result<usize, LinkError> {
    let bytes = codec::encode_frame(frame, max)?;
    if matches!(frame, Frame::Batch { .. } | Frame::SnapshotChunk { .. })
        && crate::failpoints::fires("link-mid-frame")
    {
        send.write_all(&bytes[..bytes.len() / 2]).await?;
        // Give quinn time to put the half frame on the wire before dying.
        tokio::time::sleep(Duration::from_millis(200)).await;
        crate::failpoints::crash("link-mid-frame");
    }
    send.write_all(&bytes).await?;
    Ok(bytes.len())
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, LinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LinkError::Internal(e.to_string()))?
        .map_err(LinkError::Store)
}

/// The frame overhead, for byte counters.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_BYTES;
