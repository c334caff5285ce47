//! Key layout of the column families.
//!
//! `data`: `category 0x00 key` (category names cannot contain 0x00, keys
//! cannot contain control characters, so the split is unambiguous and a
//! category's items are contiguous). `changelog`: the sequence number as 8
//! big-endian bytes, so iteration order is sequence order.

/// Column family names, in the order they are opened.
pub const CF_DATA: &str = "data";
/// Local sequence number → changed key.
pub const CF_CHANGELOG: &str = "changelog";
/// Per-child replication cursors.
pub const CF_CURSORS: &str = "cursors";
/// Aggregate state.
pub const CF_AGGREGATES: &str = "aggregates";
/// Node metadata: identity, HLC high-water mark, last sequence number.
pub const CF_META: &str = "meta";
/// API tokens: token id → its hash, name, role and categories (never
/// replicated; see `store::tokens`).
pub const CF_TOKENS: &str = "tokens";
/// Every column family.
pub const ALL_CFS: [&str; 6] = [
    CF_DATA,
    CF_CHANGELOG,
    CF_CURSORS,
    CF_AGGREGATES,
    CF_META,
    CF_TOKENS,
];

/// Metadata keys.
pub const META_NODE_ID: &[u8] = b"node_id";
/// The highest HLC this node ever issued or observed.
pub const META_HLC: &[u8] = b"hlc";
/// The last changelog sequence number assigned.
pub const META_SEQ: &[u8] = b"seq";
/// The random id of this data directory.
pub const META_INCARNATION: &[u8] = b"incarnation";
/// `(seq, hlc)` of the last changelog entry trimmed after a parent's
/// acknowledgement.
pub const META_ACKED: &[u8] = b"acked";
/// Present once private aggregates are kept as per-city shares.
pub const META_COUNTERS_V2: &[u8] = b"counters_v2";
/// The parent this node last started under.
pub const META_PARENT: &[u8] = b"parent";
/// Present once the per-category item counts below are kept.
pub const META_COUNTS: &[u8] = b"counts";
/// Present while this node holds writes stamped by a clock that ran ahead,
/// to be re-stamped at its next Welcome (`store/clock.rs`).
pub const META_RESTAMP: &[u8] = b"restamp";
/// Prefix of the live (not deleted) item count of each declared category,
/// written in the WriteBatch of every mutation that changes it.
pub const COUNT_PREFIX: &[u8] = b"count/";

/// The meta key of `category`'s item count.
pub fn count_key(category: &str) -> Vec<u8> {
    [COUNT_PREFIX, category.as_bytes()].concat()
}

/// Prefix of per-child cursors in the `cursors` column family.
pub const CURSOR_PREFIX: &[u8] = b"c/";
/// Prefix of per-origin watermarks in the `cursors` column family.
pub const WATERMARK_PREFIX: &[u8] = b"w/";

/// The key of a child's cursor.
pub fn cursor_key(child: &tiersync_protocol::NodeId) -> Vec<u8> {
    [CURSOR_PREFIX, child.as_str().as_bytes()].concat()
}

/// Prefix of each child's subtree history (who it relays for, and who left
/// it when: [`tiersync_protocol::sync::SubtreeHistory`]) in the `cursors`
/// column family (`store/subtrees.rs`).
pub const SUBTREE_PREFIX: &[u8] = b"h/";

/// The key of a child's subtree history.
pub fn subtree_key(child: &tiersync_protocol::NodeId) -> Vec<u8> {
    [SUBTREE_PREFIX, child.as_str().as_bytes()].concat()
}

/// Prefix of "which child relays for this origin" in the `cursors` column family.
pub const RELAY_PREFIX: &[u8] = b"s/";

/// The key of an origin's relaying child.
pub fn relay_key(origin: &tiersync_protocol::NodeId) -> Vec<u8> {
    [RELAY_PREFIX, origin.as_str().as_bytes()].concat()
}

/// Prefix of "where this origin's watermark came from" ([`tiersync_protocol::sync::Relay`]).
pub const VIA_PREFIX: &[u8] = b"v/";

/// The key of where an origin's watermark came from.
pub fn via_key(origin: &tiersync_protocol::NodeId) -> Vec<u8> {
    [VIA_PREFIX, origin.as_str().as_bytes()].concat()
}

/// The key of an origin's watermark.
pub fn watermark_key(origin: &tiersync_protocol::NodeId) -> Vec<u8> {
    [WATERMARK_PREFIX, origin.as_str().as_bytes()].concat()
}

/// The data key of an item.
pub fn data_key(category: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(category.len() + 1 + key.len());
    k.extend_from_slice(category.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The first data key of a category's items whose key starts with `prefix`.
pub fn data_prefix(category: &str, prefix: &str) -> Vec<u8> {
    data_key(category, prefix)
}

/// Splits a data key into category and key.
pub fn split_data_key(k: &[u8]) -> Option<(&str, &str)> {
    let at = k.iter().position(|&b| b == 0)?;
    let cat = std::str::from_utf8(&k[..at]).ok()?;
    let key = std::str::from_utf8(&k[at + 1..]).ok()?;
    Some((cat, key))
}

/// A changelog key.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Parses a changelog key.
pub fn parse_seq(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_split_back() {
        let k = data_key("customer", "c-1/x");
        assert_eq!(split_data_key(&k), Some(("customer", "c-1/x")));
        assert!(data_key("a", "z") < data_key("ab", ""));
    }

    #[test]
    fn seq_keys_sort_numerically() {
        assert!(seq_key(255) < seq_key(256));
        assert_eq!(parse_seq(&seq_key(77)), Some(77));
    }
}
