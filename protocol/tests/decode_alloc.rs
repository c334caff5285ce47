//! Decoding hostile bytes never allocates beyond the codec's hard limit.
//!
//! A counting global allocator records the largest single allocation made
//! while decoding; property-tested over arbitrary and adversarial inputs.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use proptest::prelude::*;
use tiersync_protocol::Item;
use tiersync_protocol::codec::{self, HARD_MAX_BYTES, VERSION};
use tiersync_protocol::frame::Frame;

fn decode_all(bytes: &[u8]) {
    let _ = codec::decode_stored::<Item>(bytes);
    let _ = codec::decode_stored::<Frame>(bytes);
    let _ = codec::decode_frame::<Frame>(bytes, HARD_MAX_BYTES);
}

/// Inputs shaped to lie about lengths: a version byte, a variant index, then
/// varint length prefixes announcing up to 2^64 elements.
fn adversarial() -> impl Strategy<Value = Vec<u8>> {
    (0u8..8, proptest::collection::vec(any::<u8>(), 0..24)).prop_map(|(variant, tail)| {
        let mut v = vec![
            VERSION, variant, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        v.extend(tail);
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_stay_within_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
        prop_assert!(counting_alloc::largest() <= HARD_MAX_BYTES);
    }

    #[test]
    fn lying_length_prefixes_stay_within_the_limit(bytes in adversarial()) {
        decode_all(&bytes);
        prop_assert!(counting_alloc::largest() <= HARD_MAX_BYTES);
    }
}

#[test]
fn terabyte_claims_are_errors() {
    let evil = [
        VERSION, 3, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ];
    assert!(codec::decode_stored::<Frame>(&evil).is_err());
    assert!(counting_alloc::largest() <= HARD_MAX_BYTES);
}
