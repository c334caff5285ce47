//! The one place that knows bincode.
//!
//! Two encodings, both versioned:
//!
//! * **frames** on the wire: `[u32 big-endian length][u8 version][payload]`,
//!   where length counts the version byte and the payload. The length is
//!   checked against the maximum *before* anything is allocated, and
//!   "incomplete" is an expected answer, not an error.
//! * **stored values** in RocksDB: `[u8 version][payload]`.
//!
//! Every decode of bytes that came from a peer or a disk goes through
//! [`decode_payload`]: it has a hard allocation limit (bincode otherwise
//! trusts a length prefix and aborts the process on a terabyte allocation) and
//! rejects trailing bytes. bincode's configuration is pinned here; the golden
//! bytes test fails if it ever changes.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The version byte of frames and stored values this build writes and reads.
pub const VERSION: u8 = 1;

/// Hard ceiling for one frame or stored value, whatever the policy says; also
/// the most a single decode may allocate.
pub const HARD_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Bytes before a frame's payload: the length prefix and the version.
pub const FRAME_HEADER_BYTES: usize = 5;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_variable_int_encoding()
        .with_limit::<HARD_MAX_BYTES>()
}

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input is empty where a version byte was expected.
    #[error("empty input: expected a version byte")]
    Empty,
    /// The version byte is not one this build understands.
    #[error("unsupported version {found} (this build speaks version {VERSION})")]
    UnsupportedVersion {
        /// The version byte that was read.
        found: u8,
    },
    /// A frame's length prefix is above the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A frame's length prefix is zero (no room for the version byte).
    #[error("frame length 0 is invalid: a frame holds at least its version byte")]
    EmptyFrame,
    /// The payload is not a valid encoding.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The payload decoded but bytes were left over.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    /// The value could not be encoded (or would be over the limit).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Encodes a value's payload (no version byte).
fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a whole payload: bounded allocation, no trailing bytes.
pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > HARD_MAX_BYTES {
        return Err(CodecError::FrameTooLarge {
            len: bytes.len(),
            max: HARD_MAX_BYTES,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}

/// Encodes a value for storage: version byte, then payload.
pub fn encode_stored<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    // Encoded in place after the version byte: this is on every write's
    // path, and a second buffer plus a copy showed in profiles.
    let mut out = Vec::with_capacity(256);
    out.push(VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes a stored value written by [`encode_stored`].
pub fn decode_stored<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&VERSION, payload)) => decode_payload(payload),
        Some((&found, _)) => Err(CodecError::UnsupportedVersion { found }),
    }
}

/// The size of `value`'s payload (no version byte), for budgets.
pub fn encoded_len<T: Serialize>(value: &T) -> Result<usize, CodecError> {
    encode_payload(value).map(|p| p.len())
}

/// Most bytes a varint length prefix of a string takes.
const MAX_LEN_PREFIX: usize = 9;

/// An upper bound of the encoded size of a `WireItem` whose item is stored
/// as `stored_len` bytes (version byte included) under `category`/`key`:
/// the sender's batch budget without encoding the item again.
pub fn wire_item_len_bound(category: &str, key: &str, stored_len: usize) -> usize {
    category.len() + key.len() + 2 * MAX_LEN_PREFIX + stored_len
}

/// Bytes of a `Batch` frame besides its items and watermarks (frame header,
/// variant tag, `after`, `last_seq`, `upto_hlc`, two sequence lengths), as an
/// upper bound: what a sender reserves from `max_frame_bytes`.
pub const BATCH_OVERHEAD_BYTES: usize = 64;

/// Encodes a frame: length prefix, version byte, payload. Fails if the frame
/// would be over `max_frame_bytes` (so a sender never emits what its peer
/// must refuse).
pub fn encode_frame<T: Serialize>(
    value: &T,
    max_frame_bytes: usize,
) -> Result<Vec<u8>, CodecError> {
    let payload = encode_payload(value)?;
    let len = payload.len() + 1;
    let max = max_frame_bytes.min(HARD_MAX_BYTES);
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| CodecError::FrameTooLarge { len, max })?;
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&len32.to_be_bytes());
    out.push(VERSION);
    out.extend(payload);
    Ok(out)
}

/// Checks whether `buf` starts with a whole frame, without decoding it.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some(n))` when the first
/// `n` bytes are one frame, and an error for a length over `max_frame_bytes`
/// (checked on the 4-byte prefix alone, before any allocation).
pub fn check_frame(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, CodecError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    let max = max_frame_bytes.min(HARD_MAX_BYTES);
    if len == 0 {
        return Err(CodecError::EmptyFrame);
    }
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some(4 + len))
}

/// Decodes the first frame in `buf`: `Ok(None)` if incomplete, else the frame
/// and how many bytes it took.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max_frame_bytes: usize,
) -> Result<Option<(T, usize)>, CodecError> {
    let Some(n) = check_frame(buf, max_frame_bytes)? else {
        return Ok(None);
    };
    let value = decode_stored(&buf[4..n])?;
    Ok(Some((value, n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use crate::item::Item;
    use crate::item::tests::arb_item;
    use proptest::prelude::*;

    #[test]
    fn stored_round_trip_and_version_check() {
        let bytes = encode_stored(&vec![1u32, 2, 3]).unwrap();
        assert_eq!(bytes[0], VERSION);
        assert_eq!(decode_stored::<Vec<u32>>(&bytes).unwrap(), vec![1, 2, 3]);
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert!(matches!(
            decode_stored::<Vec<u32>>(&wrong),
            Err(CodecError::UnsupportedVersion { found: 9 })
        ));
        assert!(matches!(decode_stored::<u8>(&[]), Err(CodecError::Empty)));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_stored(&7u32).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode_stored::<u32>(&bytes),
            Err(CodecError::TrailingBytes(1))
        ));
    }

    #[test]
    fn huge_length_prefix_is_refused_before_allocating() {
        // A 12-byte input claiming a multi-terabyte vector.
        let evil = [
            VERSION, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02,
        ];
        assert!(decode_stored::<Vec<u64>>(&evil).is_err());
        assert!(decode_stored::<String>(&evil).is_err());
        let frame = [0xff, 0xff, 0xff, 0xf0, VERSION];
        assert!(matches!(
            check_frame(&frame, 1 << 20),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn frames_are_incomplete_until_whole() {
        let bytes = encode_frame(&Frame::Ping { nonce: 42 }, 1 << 20).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode_frame::<Frame>(&bytes[..cut], 1 << 20)
                    .unwrap()
                    .is_none()
            );
        }
        let (f, n) = decode_frame::<Frame>(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(f, Frame::Ping { nonce: 42 });
        assert!(matches!(
            check_frame(&[0, 0, 0, 0], 100),
            Err(CodecError::EmptyFrame)
        ));
    }

    #[test]
    fn encoder_refuses_frames_over_the_limit() {
        assert!(matches!(
            encode_frame(&vec![0u8; 100], 50),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    /// Pins bincode's configuration: if these bytes change, stored data and
    /// peers of older builds can no longer be read.
    #[test]
    fn golden_bytes() {
        assert_eq!(
            encode_frame(&Frame::Ping { nonce: 300 }, 1024).unwrap(),
            [0, 0, 0, 5, VERSION, 5, 251, 1, 44]
        );
        assert_eq!(
            encode_stored(&(1u64, "ab")).unwrap(),
            [VERSION, 1, 2, b'a', b'b']
        );
    }

    proptest! {
        #[test]
        fn items_round_trip(item in arb_item()) {
            let bytes = encode_stored(&item).unwrap();
            prop_assert_eq!(decode_stored::<Item>(&bytes).unwrap(), item);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_stored::<Item>(&bytes);
            let _ = decode_stored::<Frame>(&bytes);
            let _ = decode_frame::<Frame>(&bytes, 1 << 20);
        }
    }
}
