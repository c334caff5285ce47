//! Who each child relays for, and who left it when.
//!
//! A city that moves to another province (or is removed) leaves its writes
//! at its old province, which goes on relaying them. The parent keeps, per
//! child, the subtree it claimed and the nodes that left it
//! ([`SubtreeHistory`]), so that writes those nodes made before they left
//! are still taken from the old parent (see `Downlink::former_loaded`). The
//! history is written synced at the handshake, before anything the new
//! session brings is merged.

use tiersync_protocol::NodeId;
use tiersync_protocol::sync::SubtreeHistory;

use super::keys::*;
use super::{Store, StoreError, decode, encode, sync_opts};

impl Store {
    /// `child`'s accepted Hello claims `subtree` at `until_ms` (this node's
    /// time plus the allowed skew): updates and stores its history, and
    /// returns it.
    pub fn subtree_claimed(
        &self,
        child: &NodeId,
        subtree: &std::collections::BTreeSet<NodeId>,
        until_ms: u64,
    ) -> Result<SubtreeHistory, StoreError> {
        let cf = self.cf(CF_CURSORS)?;
        let key = subtree_key(child);
        let mut history = self
            .db
            .get_pinned_cf(cf, &key)?
            .map(|b| decode::<SubtreeHistory>(CF_CURSORS, &b))
            .transpose()?
            .unwrap_or_default();
        if history.claimed(subtree, until_ms) {
            self.db
                .put_cf_opt(cf, &key, encode(CF_CURSORS, &history)?, &sync_opts())?;
        }
        Ok(history)
    }
}
