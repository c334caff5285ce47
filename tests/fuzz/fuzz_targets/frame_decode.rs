//! Arbitrary bytes as a replication stream and as stored values: decoding
//! never panics, never allocates past the codec's limit (run with
//! `-malloc_limit_mb`), and whatever decodes re-encodes to bytes that decode
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiersync_fuzz::{
    assert_allocations_bounded, frame_seeds, max_frame_bytes, write_corpus_if_asked,
};
use tiersync_protocol::Item;
use tiersync_protocol::codec::{self, CodecError, FRAME_HEADER_BYTES};
use tiersync_protocol::frame::Frame;

fuzz_target!(
    init: write_corpus_if_asked("frame_decode", frame_seeds),
    |data: &[u8]| {
        let max = max_frame_bytes();
        // The bytes as a stream: frame after frame, as a link driver reads.
        let mut rest = data;
        loop {
            let checked = codec::check_frame(rest, max);
            match codec::decode_frame::<Frame>(rest, max) {
                Ok(Some((frame, n))) => {
                    assert!(matches!(checked, Ok(Some(m)) if m == n));
                    assert!((FRAME_HEADER_BYTES..=rest.len()).contains(&n));
                    round_trip_frame(&frame, max);
                    rest = &rest[n..];
                }
                Ok(None) => {
                    assert!(matches!(checked, Ok(None)));
                    break;
                }
                Err(e) => {
                    // A bad length is refused on the prefix alone; a bad
                    // body only once it is whole.
                    match checked {
                        Err(_) => assert!(matches!(
                            e,
                            CodecError::FrameTooLarge { .. } | CodecError::EmptyFrame
                        )),
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("decode failed on an incomplete frame: {e}"),
                    }
                    break;
                }
            }
        }
        // The bytes as a stored value.
        if let Ok(item) = codec::decode_stored::<Item>(data) {
            let bytes = codec::encode_stored(&item).expect("a decoded item re-encodes");
            let again: Item = codec::decode_stored(&bytes).expect("re-encoded item decodes");
            assert_eq!(again, item);
            assert!(bytes.len() <= data.len(), "re-encoding grew a stored item");
        }
        if let Ok(frame) = codec::decode_stored::<Frame>(data) {
            round_trip_frame(&frame, usize::MAX);
        }
        assert_allocations_bounded();
    }
);

fn round_trip_frame(frame: &Frame, max: usize) {
    // The canonical encoding is never longer than what was decoded, so a
    // frame that fit the limit re-encodes within it.
    let bytes = codec::encode_frame(frame, max).expect("a decoded frame re-encodes");
    let (again, n) = codec::decode_frame::<Frame>(&bytes, max)
        .expect("re-encoded frame decodes")
        .expect("re-encoded frame is whole");
    assert_eq!(n, bytes.len());
    assert_eq!(&again, frame);
    // Canonical bytes are a fixed point.
    let twice = codec::encode_frame(&again, max).expect("re-encodes again");
    assert_eq!(twice, bytes);
}
