//! The node's durable store: RocksDB with one WriteBatch per mutation.
//!
//! Only this module knows RocksDB. Every mutation writes, in one batch, the
//! item's new state, its changelog entry, the new last sequence number and the
//! HLC high-water mark, so a crash can never separate them. Writes are applied
//! in groups ([`Store::apply`]): each mutation is its own batch, and with
//! [`Durability::Fsync`] the group shares one WAL fsync before any of them is
//! acknowledged (group commit).

mod clock;
mod conflicts;
mod subtrees;
pub use conflicts::{ConflictPage, OverwriteExample, OverwriteSummary};
pub mod keys;
pub mod tokens;
pub use tokens::{Role, StoredToken};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions,
};
use serde::{Deserialize, Serialize};
use tiersync_protocol::aggregate::{self, COUNTERS_CATEGORY, Compiled, Counters, GroupKey};
use tiersync_protocol::codec::{self, CodecError};
use tiersync_protocol::frame::{Watermark, WireItem};
use tiersync_protocol::policy::Replicate;
use tiersync_protocol::sync::{ItemKey, LoadedBatch, Relay, watermark_replaces};
use tiersync_protocol::{
    Hlc, HlcClock, Item, Kind, LogEntry, NodeId, Policy, PolicyError, Record, Stamp, Value,
};
use tokio::sync::watch;

use crate::config::Durability;
pub use clock::ParentView;
use keys::*;

/// A failure of the store itself (not of one request).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB reported an error.
    #[error("storage error: {0}")]
    Rocks(rocksdb::Error),
    /// The disk of the data directory is full ("No space left on device").
    /// RocksDB stops taking writes; it resumes by itself once enough space
    /// is free again (see the README, Operations).
    #[error("storage full: {0}; writes resume once space is freed on the data directory's disk")]
    NoSpace(String),
    /// Bytes in the store could not be decoded.
    #[error("corrupt value in column family {cf}: {source}")]
    Corrupt {
        /// Where.
        cf: &'static str,
        /// Why.
        source: CodecError,
    },
    /// The data directory belongs to another node.
    #[error("data directory {dir} belongs to node {found:?}, not {expected:?}")]
    WrongNode {
        /// The directory.
        dir: String,
        /// The id stored in it.
        found: String,
        /// The id this node runs as.
        expected: String,
    },
    /// A column family is missing (should be impossible after open).
    #[error("column family {0} is missing")]
    MissingCf(&'static str),
    /// The changelog no longer holds the entries after `after`.
    #[error("the changelog was trimmed: entries after {after} start at {retained}")]
    Trimmed {
        /// The position asked for.
        after: u64,
        /// The first entry still held.
        retained: u64,
    },
    /// An aggregate total would overflow.
    #[error(transparent)]
    Overflow(tiersync_protocol::aggregate::Overflow),
    /// The writer lock was poisoned by a panic in another writer.
    #[error("the store's writer lock is poisoned")]
    Poisoned,
    /// A WAL sync failed earlier. After a failed fsync the OS may have
    /// dropped the unsynced pages while reporting them clean, so nothing
    /// written since can be trusted to be durable: the store takes no more
    /// writes until the node restarts and RocksDB recovers from its WAL.
    #[error(
        "the store stopped taking writes after a failed WAL sync ({0}); restart the node to recover from its WAL"
    )]
    Stopped(String),
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        if is_no_space(e.as_ref()) {
            StoreError::NoSpace(e.into())
        } else {
            StoreError::Rocks(e)
        }
    }
}

/// Whether RocksDB failed for lack of disk space: ENOSPC on a write, or the
/// background error RocksDB keeps (and returns for every write) after it.
fn is_no_space(msg: &str) -> bool {
    msg.contains("No space left on device") || msg.contains("NoSpace")
}

impl StoreError {
    /// Whether the store failed because its disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace(_))
    }
}

/// Why one mutation was refused. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The policy refuses the request (unknown category, bad key, bad document).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The operation does not fit the category's kind.
    #[error("category {category:?} is a {kind:?} category: {op} is not allowed")]
    WrongKind {
        /// The category.
        category: String,
        /// Its kind.
        kind: Kind,
        /// The refused operation.
        op: &'static str,
    },
    /// A log key already holds different content.
    #[error("{category}/{key} already exists with different content")]
    Conflict {
        /// The category.
        category: String,
        /// The key.
        key: String,
    },
    /// The key does not exist (or is deleted).
    #[error("{category}/{key} does not exist")]
    NotFound {
        /// The category.
        category: String,
        /// The key.
        key: String,
    },
    /// The encoded item would be over the policy's limit.
    #[error("the item would be {size} bytes, over the limit of {max}")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The item's contribution would push an aggregate total past what
    /// fixed point can hold.
    #[error(transparent)]
    Overflow(#[from] tiersync_protocol::aggregate::Overflow),
    /// The store failed; the mutation may or may not have been written, and is
    /// not acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer is not taking requests (shutting down, or the store failed).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

impl From<rocksdb::Error> for WriteError {
    fn from(e: rocksdb::Error) -> Self {
        WriteError::Store(StoreError::from(e))
    }
}

/// A local write request.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Replace a record.
    Put {
        /// Category.
        category: String,
        /// Key.
        key: String,
        /// The new document.
        doc: BTreeMap<String, Value>,
    },
    /// Merge fields into a record (`None` removes a field).
    Patch {
        /// Category.
        category: String,
        /// Key.
        key: String,
        /// Fields to set or remove.
        fields: BTreeMap<String, Option<Value>>,
    },
    /// Delete a record.
    Delete {
        /// Category.
        category: String,
        /// Key.
        key: String,
    },
    /// Append a log entry (idempotent for equal content).
    Append {
        /// Category.
        category: String,
        /// Key.
        key: String,
        /// The entry.
        fields: BTreeMap<String, Value>,
    },
}

impl Mutation {
    /// The category and key the mutation targets.
    pub fn target(&self) -> (&str, &str) {
        match self {
            Mutation::Put { category, key, .. }
            | Mutation::Patch { category, key, .. }
            | Mutation::Delete { category, key }
            | Mutation::Append { category, key, .. } => (category, key),
        }
    }

    fn op(&self) -> &'static str {
        match self {
            Mutation::Put { .. } => "put",
            Mutation::Patch { .. } => "patch",
            Mutation::Delete { .. } => "delete",
            Mutation::Append { .. } => "append",
        }
    }
}

/// The result of an accepted mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The changelog sequence number, or `None` if the write changed nothing
    /// (an append repeated with the same content).
    pub seq: Option<u64>,
    /// The stamp of the item's newest value.
    pub stamp: Stamp,
}

/// What a changelog entry records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// An item changed (by a local write or a merge from a child).
    Item {
        /// Category of the changed item.
        category: String,
        /// Key of the changed item.
        key: String,
    },
    /// A node of the subtree became complete up to a point; relayed upward
    /// with the data so every tier knows how complete it is.
    Watermark(Watermark),
    /// This node took a new incarnation ([`Store::reincarnate`]); nothing
    /// travels for it, but its HLC dates the start of the new history.
    Reincarnated {
        /// The new incarnation.
        incarnation: u64,
    },
}

/// One changelog entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEntry {
    /// What changed.
    pub change: Change,
    /// The node's HLC when it changed (for lag in seconds).
    pub hlc: Hlc,
}

impl ChangeEntry {
    /// The item this entry names, if it names one.
    pub fn item(&self) -> Option<(&str, &str)> {
        match &self.change {
            Change::Item { category, key } => Some((category, key)),
            Change::Watermark(_) | Change::Reincarnated { .. } => None,
        }
    }
}

/// A batch of items merged from a child, with the cursor and watermarks that
/// commit in the same WriteBatch.
#[derive(Debug, Clone)]
pub struct RemoteMerge {
    /// The child the items came from.
    pub child: NodeId,
    /// The incarnation of the child's data directory.
    pub incarnation: u64,
    /// The validated items.
    pub items: Vec<WireItem>,
    /// The child's new cursor and the HLC of that change, if any.
    pub cursor: Option<(u64, Hlc)>,
    /// Watermarks relayed from the child's subtree.
    pub watermarks: Vec<Watermark>,
    /// The wall clock when it is merged (the changelog entries' HLC).
    pub now_ms: u64,
    /// Enter every item into the changelog, changed or not
    /// ([`tiersync_protocol::sync::DownlinkEvent::Merge`]).
    pub relay_all: bool,
}

/// What a remote merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Items received.
    pub received: usize,
    /// Items whose state changed.
    pub changed: usize,
    /// Conflicts resolved (log keys with two contents, reused stamps).
    pub conflicts: usize,
}

/// A durable per-child cursor: the child's incarnation, the last of its
/// sequence numbers merged here and the HLC of that change (which lets a
/// child that went back in time notice that it reissued the number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    incarnation: u64,
    seq: u64,
    hlc: Hlc,
}

/// A cursor as stored before it kept the HLC.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct CursorV1 {
    incarnation: u64,
    seq: u64,
}

impl Cursor {
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        decode::<Cursor>(CF_CURSORS, bytes).or_else(|e| {
            // An HLC of zero means "unknown": the child trusts the number.
            decode::<CursorV1>(CF_CURSORS, bytes)
                .map(|c| Cursor {
                    incarnation: c.incarnation,
                    seq: c.seq,
                    hlc: Hlc::ZERO,
                })
                .map_err(|_| e)
        })
    }
}

/// A chunk of a snapshot catch-up ([`Store::snapshot_chunk`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotChunk {
    /// `up` items in key order.
    pub items: Vec<WireItem>,
    /// The key to continue after; `None` when the snapshot is complete.
    pub next: Option<ItemKey>,
    /// With the first chunk: the watermarks, read before any item, so that
    /// what they claim is covered by the items read after them.
    pub watermarks: Vec<Watermark>,
}

/// A page of a prefix scan.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Items in key order.
    pub items: Vec<(String, Item)>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

struct WriterState {
    clock: HlcClock,
    last_seq: u64,
    /// Live items per declared category, as committed in `META`.
    counts: BTreeMap<String, u64>,
}

/// Memtables of all column families together (RocksDB flushes the largest
/// when they reach it).
const MEMTABLE_BUDGET_BYTES: usize = 128 << 20;
/// The block cache shared by all column families.
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// The node's store.
pub struct Store {
    db: DB,
    policy: Arc<Policy>,
    durability: Durability,
    /// The data directory's current incarnation (a new one is taken when
    /// the parent holds more of this node than its disk does).
    incarnation: AtomicU64,
    /// Set when a WAL sync failed: the store takes no more writes.
    stopped: std::sync::OnceLock<String>,
    /// This node (the actor of its private aggregates' counters).
    node: NodeId,
    /// The policy's aggregates, parsed once.
    aggs: Vec<Compiled>,
    writer: Mutex<WriterState>,
    /// The last committed sequence number and its HLC, for the uplink.
    committed: watch::Sender<(u64, Hlc)>,
    /// Changelog entries up to here are trimmed. Kept in memory because the
    /// uplink asks for it on every event, and finding the first live key
    /// behind many range deletions costs more the longer a node runs.
    trimmed_upto: AtomicU64,
    /// What the parent holds of this node's changelog, as far as this
    /// process knows: entries above it are never trimmed.
    acked: AtomicU64,
    /// Serializes trims with resets of `acked`.
    trim_lock: Mutex<()>,
    /// This node has no parent (it re-stamps its own writes at once after a
    /// clock jump: `store/clock.rs`).
    root: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish_non_exhaustive()
    }
}

fn decode<T: serde::de::DeserializeOwned>(cf: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    codec::decode_stored(bytes).map_err(|source| StoreError::Corrupt { cf, source })
}

fn encode<T: Serialize>(cf: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    codec::encode_stored(value).map_err(|source| StoreError::Corrupt { cf, source })
}

impl Store {
    /// Opens (or creates) the store in `dir` for node `node`.
    ///
    /// Refuses a directory written by another node id. The HLC resumes above
    /// the highest value persisted, so it never goes backwards across restarts.
    pub fn open(
        dir: &Path,
        node: NodeId,
        policy: Arc<Policy>,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Memory stays bounded whatever the data size: one memtable budget
        // for all column families (the largest is flushed when it is
        // reached) and one block cache shared by them.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let cf_opts = || {
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            // Most point reads are of keys not there yet (a first write, a
            // first merge): a bloom filter answers them without reading
            // every level's index.
            table.set_bloom_filter(10.0, false);
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_block_based_table_factory(&table);
            o
        };
        let cfs = ALL_CFS
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_opts()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;

        let meta = db
            .cf_handle(CF_META)
            .ok_or(StoreError::MissingCf(CF_META))?;
        match db.get_cf(meta, META_NODE_ID)? {
            Some(found) if found != node.as_str().as_bytes() => {
                return Err(StoreError::WrongNode {
                    dir: dir.display().to_string(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: node.to_string(),
                });
            }
            Some(_) => {}
            None => {
                let wo = sync_opts();
                let mut b = WriteBatch::default();
                b.put_cf(meta, META_NODE_ID, node.as_str());
                db.write_opt(b, &wo)?;
            }
        }
        let hlc = match db.get_cf(meta, META_HLC)? {
            Some(b) => decode::<Hlc>(CF_META, &b)?,
            None => Hlc::ZERO,
        };
        let last_seq = match db.get_cf(meta, META_SEQ)? {
            Some(b) => decode::<u64>(CF_META, &b)?,
            None => 0,
        };
        let incarnation = match db.get_cf(meta, META_INCARNATION)? {
            Some(b) => decode::<u64>(CF_META, &b)?,
            None => {
                // A new data directory: parents keep their cursors per
                // incarnation, so a wiped node is never mistaken for the old.
                let inc: u64 = rand::random();
                db.put_cf_opt(meta, META_INCARNATION, encode(CF_META, &inc)?, &sync_opts())?;
                inc
            }
        };
        let aggs = Compiled::all(&policy);
        let store = Self {
            db,
            policy,
            durability,
            incarnation: AtomicU64::new(incarnation),
            stopped: std::sync::OnceLock::new(),
            node: node.clone(),
            aggs,
            writer: Mutex::new(WriterState {
                // One millisecond past what was persisted: changes lost
                // since (not synced, or a `buffered` node's) must not be
                // reissued with the same HLCs, which a parent's cursor check
                // relies on. With a clock running ahead of the wall clock
                // (after a re-stamp, or observing a child) ticks only count
                // the logical part, and would repeat the lost ones.
                clock: HlcClock::resume(
                    node,
                    if hlc == Hlc::ZERO {
                        hlc
                    } else {
                        Hlc {
                            physical_ms: hlc.physical_ms.saturating_add(1),
                            logical: 0,
                        }
                    },
                ),
                last_seq,
                counts: BTreeMap::new(),
            }),
            committed: watch::channel((0, Hlc::ZERO)).0,
            trimmed_upto: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            trim_lock: Mutex::new(()),
            root: std::sync::atomic::AtomicBool::new(false),
        };
        let first_live = store
            .db
            .iterator_cf(store.cf(CF_CHANGELOG)?, IteratorMode::Start)
            .next()
            .transpose()?
            .and_then(|(k, _)| parse_seq(&k));
        // The changelog is contiguous: everything below its first entry (or
        // all of it, when it is empty) was trimmed.
        let trimmed = first_live.map_or(last_seq, |f| f.saturating_sub(1));
        store.trimmed_upto.store(trimmed, Ordering::SeqCst);
        // Only what a parent acknowledged was ever trimmed.
        store.acked.store(trimmed, Ordering::SeqCst);
        store.migrate_counters()?;
        store.rebuild_changed_aggregates()?;
        store.load_counts()?;
        let (last_seq, hlc) = {
            let st = store.lock()?;
            (st.last_seq, st.clock.last())
        };
        // The HLC of the last change, also when it was trimmed: a parent's
        // cursor is checked against it (`resume_matches`).
        let mark = store
            .db
            .get_pinned_cf(store.cf(CF_META)?, META_ACKED)?
            .map(|b| decode::<(u64, Hlc)>(CF_META, &b))
            .transpose()?
            .filter(|(s, _)| *s == last_seq)
            .map(|(_, h)| h);
        let last_hlc = store.hlc_of(last_seq)?.or(mark).unwrap_or(hlc);
        store.committed.send_replace((last_seq, last_hlc));
        Ok(store)
    }

    /// A store written when private aggregates were grow-only counters (which
    /// a wiped city could not reset) drops them; each aggregate is rebuilt
    /// from the node's own data, and its children send theirs again.
    fn migrate_counters(&self) -> Result<(), StoreError> {
        let meta = self.cf(CF_META)?;
        if self.db.get_pinned_cf(meta, META_COUNTERS_V2)?.is_some() {
            return Ok(());
        }
        let mut b = WriteBatch::default();
        let from = data_key(COUNTERS_CATEGORY, "");
        let mut to = COUNTERS_CATEGORY.as_bytes().to_vec();
        to.push(1);
        b.delete_range_cf(self.cf(CF_DATA)?, from, to);
        for agg in self.aggs.iter().filter(|a| self.source_is_private(a)) {
            b.delete_cf(meta, format!("agg/{}", agg.name).as_bytes());
        }
        b.put_cf(meta, META_COUNTERS_V2, []);
        self.db.write_opt(b, &sync_opts())?;
        Ok(())
    }

    /// Loads the item counts; a store written before they were kept is
    /// counted once, by a scan.
    fn load_counts(&self) -> Result<(), StoreError> {
        let meta = self.cf(CF_META)?;
        let mut counts = BTreeMap::new();
        if self.db.get_pinned_cf(meta, META_COUNTS)?.is_some() {
            let from = IteratorMode::From(COUNT_PREFIX, Direction::Forward);
            for kv in self.db.iterator_cf(meta, from) {
                let (k, v) = kv?;
                let Some(category) = k.strip_prefix(COUNT_PREFIX) else {
                    break;
                };
                let category = String::from_utf8_lossy(category).into_owned();
                counts.insert(category, decode::<u64>(CF_META, &v)?);
            }
        } else {
            tracing::info!("counting this node's items once; the counts are kept from now on");
            self.for_each_item(|category, _, item| {
                if live_delta(None, &item) == 1 && self.policy.categories.contains_key(category) {
                    *counts.entry(category.to_string()).or_default() += 1;
                }
            })?;
            let mut b = WriteBatch::default();
            for (category, n) in &counts {
                b.put_cf(meta, count_key(category), encode(CF_META, n)?);
            }
            b.put_cf(meta, META_COUNTS, []);
            self.db.write_opt(b, &sync_opts())?;
        }
        self.lock()?.counts = counts;
        Ok(())
    }

    /// Live (not deleted) items per declared category, as committed.
    pub fn item_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        Ok(self.lock()?.counts.clone())
    }

    /// Stages the new counts of the categories whose live items changed by
    /// `deltas` into `batch`; they go into the writer state once the batch
    /// is committed.
    fn stage_counts(
        &self,
        state: &WriterState,
        batch: &mut WriteBatch,
        deltas: BTreeMap<String, i64>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut staged = Vec::new();
        for (category, delta) in deltas {
            if delta == 0 || !self.policy.categories.contains_key(&category) {
                continue;
            }
            let n = state
                .counts
                .get(&category)
                .copied()
                .unwrap_or(0)
                .saturating_add_signed(delta);
            batch.put_cf(
                self.cf(CF_META)?,
                count_key(&category),
                encode(CF_META, &n)?,
            );
            staged.push((category, n));
        }
        Ok(staged)
    }

    /// Declares whether this node has a parent (`false` until told).
    pub fn set_root(&self, root: bool) {
        self.root.store(root, Ordering::SeqCst);
    }

    fn is_root(&self) -> bool {
        self.root.load(Ordering::SeqCst)
    }

    /// The random id of this data directory's history: set at creation and
    /// replaced by [`Store::reincarnate`].
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    /// Takes a new random incarnation, durably. Called when the parent holds
    /// changes of this node that its disk no longer has (restored from a
    /// backup, a `buffered` node after a power cut): the sequence numbers
    /// were reissued, so the parent's cursor for the old incarnation must not
    /// be used, and the parent re-learns this node's data by snapshot.
    ///
    /// The clock first moves past `parent_hlc` (what the parent holds of
    /// this node's old history), and a changelog entry records the new
    /// incarnation, in the same synced batch: so the new history starts
    /// later than anything of the old one, and the watermark the parent
    /// records for it replaces the old incarnation's.
    pub fn reincarnate(&self, parent_hlc: Hlc, now_ms: u64) -> Result<u64, StoreError> {
        let mut state = self.lock()?;
        self.check_running()?;
        let inc: u64 = rand::random();
        let mut clock = state.clock.clone();
        clock.observe(parent_hlc);
        let hlc = clock.tick(now_ms).hlc;
        let seq = state.last_seq + 1;
        let entry = ChangeEntry {
            change: Change::Reincarnated { incarnation: inc },
            hlc,
        };
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_META)?, META_INCARNATION, encode(CF_META, &inc)?);
        b.put_cf(
            self.cf(CF_CHANGELOG)?,
            seq_key(seq),
            encode(CF_CHANGELOG, &entry)?,
        );
        // This node's private aggregate shares now count for the new
        // incarnation: written again, they travel up and replace the old.
        let mut seq = seq;
        let mut pending = AggPending::default();
        let page = self.scan(COUNTERS_CATEGORY, "", None, usize::MAX, true)?;
        for (key, item) in page.items {
            if let Item::Counters(mut c) = item
                && c.shares.contains_key(&self.node)
            {
                let values = c.value_of(&self.node);
                c.set(&self.node, values, hlc, inc);
                pending.counters.insert(key, c);
            }
        }
        self.flush_aggregates(&mut b, pending, &mut seq, hlc)?;
        b.put_cf(self.cf(CF_META)?, META_SEQ, encode(CF_META, &seq)?);
        b.put_cf(self.cf(CF_META)?, META_HLC, encode(CF_META, &clock.last())?);
        self.db.write_opt(b, &sync_opts())?;
        state.clock = clock;
        state.last_seq = seq;
        self.incarnation.store(inc, Ordering::SeqCst);
        self.committed.send_replace((seq, hlc));
        Ok(inc)
    }

    /// Records that this node starts under `parent`. If it last ran under
    /// another one (it moved, or its data was restored from before a move),
    /// it takes a new incarnation ([`Store::reincarnate`]) and returns it:
    /// the new parent then learns all of its data by snapshot, and relays
    /// it on even where it held it before.
    pub fn start_under(&self, parent: &NodeId, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let meta = self.cf(CF_META)?;
        let before = self
            .db
            .get_pinned_cf(meta, META_PARENT)?
            .map(|b| b.to_vec());
        if before.as_deref() == Some(parent.as_str().as_bytes()) {
            return Ok(None);
        }
        let inc = match before {
            Some(_) => Some(self.reincarnate(Hlc::ZERO, now_ms)?),
            None => None,
        };
        self.db
            .put_cf_opt(meta, META_PARENT, parent.as_str(), &sync_opts())?;
        Ok(inc)
    }

    /// Whether this node's changelog agrees with a parent's cursor: its
    /// entry `seq` (or the last trimmed one) has the HLC `hlc`
    /// ([`tiersync_protocol::sync::resume_matches`]).
    pub fn resume_matches(&self, seq: u64, hlc: Hlc) -> Result<bool, StoreError> {
        let mark = self
            .db
            .get_pinned_cf(self.cf(CF_META)?, META_ACKED)?
            .map(|b| decode::<(u64, Hlc)>(CF_META, &b))
            .transpose()?;
        Ok(tiersync_protocol::sync::resume_matches(
            seq,
            hlc,
            self.hlc_of(seq)?,
            mark,
        ))
    }

    /// Why the store takes no more writes, if it stopped.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    fn check_running(&self) -> Result<(), StoreError> {
        match self.stopped.get() {
            Some(why) => Err(StoreError::Stopped(why.clone())),
            None => Ok(()),
        }
    }

    /// A sync failed: from now on nothing is written or acknowledged.
    fn stop(&self, why: &str) {
        if self.stopped.set(why.to_string()).is_ok() {
            tracing::error!(
                error = %why,
                "WAL sync failed: this node takes no more writes; restart it to recover from its WAL"
            );
            metrics::counter!("tiersync_store_sync_failures_total").increment(1);
        }
    }

    /// Watches the last committed sequence number (and its HLC).
    pub fn subscribe(&self) -> watch::Receiver<(u64, Hlc)> {
        self.committed.subscribe()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingCf(name))
    }

    fn lock(&self) -> Result<MutexGuard<'_, WriterState>, StoreError> {
        self.writer.lock().map_err(|_| StoreError::Poisoned)
    }

    /// The last sequence number written to the changelog.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.last_seq)
    }

    /// The highest HLC this node issued or observed.
    pub fn clock_last(&self) -> Result<Hlc, StoreError> {
        Ok(self.lock()?.clock.last())
    }

    /// Applies a group of mutations at wall time `now_ms`.
    ///
    /// Each mutation is validated, then written as one WriteBatch; refused
    /// mutations write nothing and do not disturb the others. With
    /// `Durability::Fsync` the WAL is synced once for the whole group before
    /// this returns, so an `Ok` result is durable. If that sync fails, every
    /// result of the group becomes an error: nothing is acknowledged.
    pub fn apply(
        &self,
        mutations: Vec<Mutation>,
        now_ms: u64,
    ) -> Result<Vec<Result<Applied, WriteError>>, StoreError> {
        let mut state = self.lock()?;
        self.check_running()?;
        self.check_clock(&mut state, now_ms)?;
        let mut results: Vec<Result<Applied, WriteError>> = mutations
            .into_iter()
            .map(|m| self.apply_one(&mut state, m, now_ms))
            .collect();
        let wrote = results
            .iter()
            .any(|r| matches!(r, Ok(Applied { seq: Some(_), .. })));
        if wrote && crate::failpoints::fires("store-after-append") {
            crate::failpoints::crash("store-after-append");
        }
        // An append repeated with the same content writes nothing, but its
        // Ok says the entry is durable: the group is synced whenever it
        // holds any accepted mutation.
        let accepted = results.iter().any(Result::is_ok);
        if accepted
            && self.durability == Durability::Fsync
            && let Err(msg) = self.sync_wal()
        {
            self.stop(&msg);
            for r in &mut results {
                if r.is_ok() {
                    *r = Err(WriteError::Store(StoreError::Stopped(msg.clone())));
                }
            }
            return Ok(results);
        }
        if wrote && crate::failpoints::fires("store-after-sync") {
            crate::failpoints::crash("store-after-sync");
        }
        if wrote {
            self.committed
                .send_replace((state.last_seq, state.clock.last()));
        }
        Ok(results)
    }

    /// Syncs the WAL (`store-sync-error`: a fail point makes it fail, as a
    /// disk that reports EIO on fsync would).
    fn sync_wal(&self) -> Result<(), String> {
        if crate::failpoints::fires("store-sync-error") {
            return Err("fsync: Input/output error (fail point store-sync-error)".into());
        }
        self.db.flush_wal(true).map_err(|e| e.to_string())
    }

    fn apply_one(
        &self,
        state: &mut WriterState,
        m: Mutation,
        now_ms: u64,
    ) -> Result<Applied, WriteError> {
        let (category, key) = m.target();
        let cat = self.policy.category(category)?;
        self.policy.check_key(key)?;
        let kind_ok = match &m {
            Mutation::Put { .. } | Mutation::Patch { .. } | Mutation::Delete { .. } => {
                cat.kind == Kind::Record
            }
            Mutation::Append { .. } => cat.kind == Kind::Log,
        };
        if !kind_ok {
            return Err(WriteError::WrongKind {
                category: category.to_string(),
                kind: cat.kind,
                op: m.op(),
            });
        }
        let current = self.get(category, key)?;
        let old = current.clone();
        let mut clock = state.clock.clone();
        // A write outranks what it replaces, even when the item carries a
        // stamp from before the clock recovered from a jump ahead.
        if let Some(newest) = current.as_ref().and_then(Item::max_stamp) {
            clock.observe(newest.hlc);
        }
        let stamp = clock.tick(now_ms);
        let (category, key) = (category.to_string(), key.to_string());
        let item = match m {
            Mutation::Put { doc, .. } => {
                self.policy.check_fields(doc.keys())?;
                let mut r = record_of(current);
                r.put(doc, stamp.clone());
                Item::Record(r)
            }
            Mutation::Patch { fields, .. } => {
                self.policy.check_fields(fields.keys())?;
                let mut r = record_of(current);
                r.patch(fields, stamp.clone());
                Item::Record(r)
            }
            Mutation::Delete { .. } => match current {
                Some(Item::Record(mut r)) if !r.is_deleted() => {
                    r.delete(stamp.clone());
                    Item::Record(r)
                }
                _ => return Err(WriteError::NotFound { category, key }),
            },
            Mutation::Append { fields, .. } => {
                self.policy.check_fields(fields.keys())?;
                match current {
                    Some(Item::Log(existing)) if existing.fields == fields => {
                        return Ok(Applied {
                            seq: None,
                            stamp: existing.stamp,
                        });
                    }
                    Some(_) => return Err(WriteError::Conflict { category, key }),
                    None => Item::Log(LogEntry {
                        fields,
                        stamp: stamp.clone(),
                    }),
                }
            }
        };
        // A PATCH adds to the document: the result is held to `max_fields`
        // too, as a parent holds every received record to it.
        if let Item::Record(r) = &item {
            let fields = r.document().len();
            if fields > self.policy.limits.max_fields {
                return Err(PolicyError::BadDocument(format!(
                    "the document would have {fields} fields, over the limit of {}",
                    self.policy.limits.max_fields
                ))
                .into());
            }
        }
        let value = encode(CF_DATA, &item)?;
        let max = self.policy.limits.max_item_bytes;
        if value.len() > max {
            return Err(WriteError::TooLarge {
                size: value.len(),
                max,
            });
        }
        let mut seq = state.last_seq + 1;
        let mut batch = WriteBatch::default();
        let mut aggs = AggPending::default();
        self.account(&mut aggs, &category, old.as_ref(), Some(&item), stamp.hlc)
            .map_err(|e| match e {
                StoreError::Overflow(o) => WriteError::Overflow(o),
                other => WriteError::Store(other),
            })?;
        let counts = match live_delta(old.as_ref(), &item) {
            0 => Vec::new(),
            d => self.stage_counts(state, &mut batch, BTreeMap::from([(category.clone(), d)]))?,
        };
        batch.put_cf(self.cf(CF_DATA)?, data_key(&category, &key), value);
        let entry = ChangeEntry {
            change: Change::Item { category, key },
            hlc: stamp.hlc,
        };
        batch.put_cf(
            self.cf(CF_CHANGELOG)?,
            seq_key(seq),
            encode(CF_CHANGELOG, &entry)?,
        );
        let item_seq = seq;
        // Aggregates follow in the same batch (a private aggregate's counters
        // get their own changelog entry, after the item's).
        self.flush_aggregates(&mut batch, aggs, &mut seq, stamp.hlc)?;
        batch.put_cf(self.cf(CF_META)?, META_SEQ, encode(CF_META, &seq)?);
        batch.put_cf(self.cf(CF_META)?, META_HLC, encode(CF_META, &clock.last())?);
        // Not synced here: `apply` syncs the WAL once for the whole group.
        self.db.write_opt(batch, &WriteOptions::default())?;
        state.clock = clock;
        state.last_seq = seq;
        state.counts.extend(counts);
        Ok(Applied {
            seq: Some(item_seq),
            stamp,
        })
    }

    /// Reads one item (deleted records included, as tombstones).
    pub fn get(&self, category: &str, key: &str) -> Result<Option<Item>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_DATA)?, data_key(category, key))?
            .map(|b| decode(CF_DATA, &b))
            .transpose()
    }

    /// Scans a category's items whose key starts with `prefix`, in key order,
    /// starting after `after` (exclusive), at most `limit` items. Deleted
    /// records are skipped unless `include_deleted`.
    pub fn scan(
        &self,
        category: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        include_deleted: bool,
    ) -> Result<Page, StoreError> {
        let start = match after {
            Some(a) if a >= prefix => {
                let mut k = data_key(category, a);
                k.push(0); // the smallest key after `a`
                k
            }
            _ => data_prefix(category, prefix),
        };
        let bound = data_prefix(category, prefix);
        let mut items = Vec::new();
        let mut next = None;
        for kv in self.db.iterator_cf(
            self.cf(CF_DATA)?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = kv?;
            if !k.starts_with(&bound) {
                break;
            }
            let Some((_, key)) = split_data_key(&k) else {
                continue;
            };
            let item: Item = decode(CF_DATA, &v)?;
            if !include_deleted && item.is_deleted() {
                continue;
            }
            if items.len() == limit {
                next = items.last().map(|(k, _): &(String, Item)| k.clone());
                break;
            }
            items.push((key.to_string(), item));
        }
        Ok(Page { items, next })
    }

    /// Changelog entries with sequence number above `after`, at most `limit`.
    pub fn changes_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, ChangeEntry)>, StoreError> {
        let start = seq_key(after.saturating_add(1));
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(
            self.cf(CF_CHANGELOG)?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if out.len() == limit {
                break;
            }
            let (k, v) = kv?;
            let Some(seq) = parse_seq(&k) else { continue };
            out.push((seq, decode(CF_CHANGELOG, &v)?));
        }
        Ok(out)
    }

    /// The HLC of changelog entry `seq`, if it is still retained.
    pub fn hlc_of(&self, seq: u64) -> Result<Option<Hlc>, StoreError> {
        if seq == 0 {
            return Ok(None);
        }
        self.db
            .get_pinned_cf(self.cf(CF_CHANGELOG)?, seq_key(seq))?
            .map(|b| decode::<ChangeEntry>(CF_CHANGELOG, &b).map(|e| e.hlc))
            .transpose()
    }

    /// The lowest sequence number the changelog still holds (`last_seq + 1`
    /// when it is empty).
    pub fn retained_from(&self) -> Result<u64, StoreError> {
        Ok(self.trimmed_upto.load(Ordering::SeqCst) + 1)
    }

    /// What the parent acknowledged of this node's changelog, as far as this
    /// process knows (at least everything trimmed).
    pub fn acked_seq(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// The parent acknowledged this node's changes up to `seq`.
    pub fn acknowledged(&self, seq: u64) {
        self.acked.fetch_max(seq, Ordering::SeqCst);
    }

    /// The parent (re)started its link at `seq`: it holds no more than
    /// that, whatever it acknowledged before (it may have been restored), so
    /// nothing above `seq` may be trimmed until it acknowledges again.
    pub fn parent_resumed(&self, seq: u64) -> Result<(), StoreError> {
        let _trim = self.trim_lock.lock().map_err(|_| StoreError::Poisoned)?;
        self.acked.store(seq, Ordering::SeqCst);
        Ok(())
    }

    /// Trims the changelog entries older than `cutoff_ms` that the parent
    /// acknowledged (all of them at a node without a parent, `root`).
    /// Returns the new first retained sequence number.
    pub fn trim_expired(&self, root: bool, cutoff_ms: u64) -> Result<u64, StoreError> {
        let _trim = self.trim_lock.lock().map_err(|_| StoreError::Poisoned)?;
        let bound = if root {
            self.last_seq()?
        } else {
            self.acked.load(Ordering::SeqCst)
        };
        let from = self.retained_from()?;
        let mut upto = None;
        for kv in self.db.iterator_cf(
            self.cf(CF_CHANGELOG)?,
            IteratorMode::From(&seq_key(from), Direction::Forward),
        ) {
            let (k, v) = kv?;
            let Some(seq) = parse_seq(&k) else { continue };
            let entry: ChangeEntry = decode(CF_CHANGELOG, &v)?;
            if seq > bound || entry.hlc.physical_ms >= cutoff_ms {
                break;
            }
            upto = Some(seq);
        }
        if let Some(upto) = upto {
            self.trim_changelog(upto)?;
        }
        self.retained_from()
    }

    /// Removes changelog entries at or below `upto` (the parent acknowledged
    /// them). Never trims past the last sequence number.
    fn trim_changelog(&self, upto: u64) -> Result<(), StoreError> {
        let upto = upto.min(self.last_seq()?);
        let from = self.retained_from()?;
        if upto < from {
            return Ok(());
        }
        let mut b = WriteBatch::default();
        // What the trimmed end was: a parent whose cursor is here can still
        // be checked against this node's history (`resume_matches`).
        if let Some(hlc) = self.hlc_of(upto)? {
            b.put_cf(
                self.cf(CF_META)?,
                META_ACKED,
                encode(CF_META, &(upto, hlc))?,
            );
        }
        b.delete_range_cf(self.cf(CF_CHANGELOG)?, seq_key(from), seq_key(upto + 1));
        self.db.write_opt(b, &WriteOptions::default())?;
        self.trimmed_upto.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    /// A consistent view of what is durable: taken while no write group is
    /// between its write and its sync (the writer lock is held from a
    /// group's first write through its WAL sync), so with
    /// `Durability::Fsync` everything it shows survives a power cut. What
    /// replication ships is read from such a view only: a parent must never
    /// hold a change its child can lose, or the child would reissue the
    /// change's sequence number for another change after a power cut.
    fn durable_view(&self) -> Result<rocksdb::Snapshot<'_>, StoreError> {
        let _writer = self.lock()?;
        Ok(self.db.snapshot())
    }

    /// Loads the next replication batch after `after`: changelog entries in
    /// order, coalesced by key, `up` categories only (private items never
    /// leave), with the current state of each item, bounded by the policy's
    /// batch and frame limits. Reads only what is durable.
    pub fn load_batch(&self, after: u64) -> Result<LoadedBatch, StoreError> {
        let view = self.durable_view()?;
        // A batch must never skip entries: if the range after `after` was
        // trimmed, the parent needs a snapshot, not the entries after the gap.
        let retained = self.retained_from()?;
        if after.saturating_add(1) < retained {
            return Err(StoreError::Trimmed { after, retained });
        }
        let limits = &self.policy.limits;
        // Everything counted by (an upper bound of) its encoded size, items
        // and watermarks alike: the frame never exceeds `max_frame_bytes`,
        // and the first entry always fits (an item is at most half a frame).
        let byte_budget = limits.max_frame_bytes - codec::BATCH_OVERHEAD_BYTES;
        let mut seen = std::collections::HashSet::new();
        let mut marks: BTreeMap<NodeId, Watermark> = BTreeMap::new();
        let mut items = Vec::new();
        let mut bytes = 0usize;
        let mut last = (after, Hlc::ZERO);
        let start = seq_key(after.saturating_add(1));
        for kv in view.iterator_cf(
            self.cf(CF_CHANGELOG)?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = kv?;
            let Some(seq) = parse_seq(&k) else { continue };
            let entry: ChangeEntry = decode(CF_CHANGELOG, &v)?;
            match entry.change {
                Change::Item { category, key } => {
                    let up = self.policy.replicates_up(&category);
                    if up && !seen.contains(&(category.clone(), key.clone())) {
                        if items.len() >= limits.max_batch_items {
                            break;
                        }
                        let raw =
                            view.get_pinned_cf(self.cf(CF_DATA)?, data_key(&category, &key))?;
                        if let Some(raw) = raw {
                            // The stored encoding's size, without encoding again.
                            let size = codec::wire_item_len_bound(&category, &key, raw.len());
                            if bytes + size > byte_budget && last.0 > after {
                                break;
                            }
                            let item: Item = decode(CF_DATA, &raw)?;
                            let item =
                                aggregate::shipped(&self.aggs, &self.policy, &self.node, item);
                            bytes += size;
                            seen.insert((category.clone(), key.clone()));
                            items.push(WireItem {
                                category,
                                key,
                                item,
                            });
                        }
                    }
                }
                Change::Watermark(w) => {
                    if !marks.contains_key(&w.origin) {
                        let size = encode(CF_CHANGELOG, &w)?.len();
                        if bytes + size > byte_budget && last.0 > after {
                            break;
                        }
                        bytes += size;
                    }
                    marks.insert(w.origin.clone(), w);
                }
                Change::Reincarnated { .. } => {}
            }
            last = (seq, entry.hlc);
        }
        Ok(LoadedBatch {
            last_seq: last.0,
            upto_hlc: last.1,
            items,
            watermarks: marks.into_values().collect(),
        })
    }

    /// Loads the next chunk of `up` items after `after` (from the start when
    /// `None`), for snapshot catch-up, from a durable view. Returns the
    /// items, the key to continue after (`None` when done) and, with the
    /// first chunk, the watermarks as they were before any item was read.
    pub fn snapshot_chunk(&self, after: Option<&ItemKey>) -> Result<SnapshotChunk, StoreError> {
        let view = self.durable_view()?;
        let watermarks = match after {
            None => self.watermarks_in(&view)?,
            Some(_) => Vec::new(),
        };
        let limits = &self.policy.limits;
        let byte_budget = limits.max_frame_bytes - codec::BATCH_OVERHEAD_BYTES;
        let start = match after {
            Some((c, k)) => {
                let mut key = data_key(c, k);
                key.push(0);
                key
            }
            None => Vec::new(),
        };
        let mut items: Vec<WireItem> = Vec::new();
        let mut bytes = 0usize;
        for kv in view.iterator_cf(
            self.cf(CF_DATA)?,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = kv?;
            let Some((category, key)) = split_data_key(&k) else {
                continue;
            };
            let up = self.policy.replicates_up(category);
            if !up {
                continue;
            }
            let size = codec::wire_item_len_bound(category, key, v.len());
            if items.len() >= limits.max_batch_items
                || (bytes + size > byte_budget && !items.is_empty())
            {
                let next = items.last().map(|w| (w.category.clone(), w.key.clone()));
                return Ok(SnapshotChunk {
                    items,
                    next,
                    watermarks,
                });
            }
            bytes += size;
            let item = decode(CF_DATA, &v)?;
            items.push(WireItem {
                category: category.to_string(),
                key: key.to_string(),
                item: aggregate::shipped(&self.aggs, &self.policy, &self.node, item),
            });
        }
        Ok(SnapshotChunk {
            items,
            next: None,
            watermarks,
        })
    }

    /// The durable cursor of `child` for `incarnation` and the HLC of the
    /// child's change at it (`(0, ZERO)` when unknown or when the child's
    /// incarnation changed).
    pub fn cursor(&self, child: &NodeId, incarnation: u64) -> Result<(u64, Hlc), StoreError> {
        let key = cursor_key(child);
        let cur = self
            .db
            .get_pinned_cf(self.cf(CF_CURSORS)?, key)?
            .map(|b| Cursor::decode(&b))
            .transpose()?;
        Ok(cur
            .filter(|c| c.incarnation == incarnation)
            .map_or((0, Hlc::ZERO), |c| (c.seq, c.hlc)))
    }

    /// Every completeness watermark this node holds, by origin.
    pub fn watermarks(&self) -> Result<Vec<Watermark>, StoreError> {
        self.watermarks_in(&self.db.snapshot())
    }

    fn watermarks_in(&self, view: &rocksdb::Snapshot<'_>) -> Result<Vec<Watermark>, StoreError> {
        let mut out = Vec::new();
        let prefix = WATERMARK_PREFIX;
        for kv in view.iterator_cf(
            self.cf(CF_CURSORS)?,
            IteratorMode::From(prefix, Direction::Forward),
        ) {
            let (k, v) = kv?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(decode(CF_CURSORS, &v)?);
        }
        Ok(out)
    }

    /// Merges a batch from a child: every changed item with its changelog
    /// entry, the child's cursor and the watermarks, in one WriteBatch,
    /// synced before this returns (with `Durability::Fsync`). Only then may
    /// the parent acknowledge the batch.
    pub fn merge_remote(&self, m: RemoteMerge) -> Result<MergeStats, StoreError> {
        let mut state = self.lock()?;
        self.check_running()?;
        let mut clock = state.clock.clone();
        let mut seq = state.last_seq;
        let mut batch = WriteBatch::default();
        let mut aggs = AggPending::default();
        let mut stats = MergeStats {
            received: m.items.len(),
            ..MergeStats::default()
        };
        // Later items of one batch see earlier ones (a hostile child may repeat a key).
        let mut pending: BTreeMap<(String, String), Item> = BTreeMap::new();
        let mut live: BTreeMap<String, i64> = BTreeMap::new();
        // One fresh HLC for every entry of this merge, past every stamp it
        // brings: a child checks its parent's cursor by the HLC of the
        // entry at it, so a reissued number must not get the same one.
        for s in m.items.iter().flat_map(|w| w.item.stamps()) {
            clock.observe(s.hlc);
        }
        let entry_hlc = clock.tick(m.now_ms).hlc;
        // Received items, then the ledger entries of the conflicts they
        // bring (merged like received items, so a re-delivered conflict or
        // one already relayed from below changes nothing).
        let mut queue: std::collections::VecDeque<WireItem> = m.items.into();
        let mut overwrites = conflicts::Overwrites::default();
        while let Some(w) = queue.pop_front() {
            let k = (w.category, w.key);
            let current = match pending.remove(&k) {
                Some(item) => Some(item),
                None => self.get(&k.0, &k.1)?,
            };
            let old = current.clone();
            let (merged, out) = match current {
                Some(mut mine) => {
                    let (out, ledger) =
                        self.merge_noting(&k.0, &k.1, &mut mine, &w.item, &mut overwrites);
                    queue.extend(ledger);
                    (mine, out)
                }
                None => (
                    w.item,
                    tiersync_protocol::MergeOutcome {
                        changed: true,
                        conflict: false,
                    },
                ),
            };
            if out.conflict {
                stats.conflicts += 1;
                tracing::warn!(category = %k.0, key = %k.1, child = %m.child, "conflict resolved by stamp");
            }
            if out.changed {
                stats.changed += 1;
                self.account(&mut aggs, &k.0, old.as_ref(), Some(&merged), entry_hlc)?;
                match live_delta(old.as_ref(), &merged) {
                    0 => {}
                    d => *live.entry(k.0.clone()).or_default() += d,
                }
                batch.put_cf(
                    self.cf(CF_DATA)?,
                    data_key(&k.0, &k.1),
                    encode(CF_DATA, &merged)?,
                );
            }
            // While a child is re-learnt from scratch, what it sends travels
            // on even when this node held it: the root may have dropped it
            // while the child was under another parent.
            if out.changed || m.relay_all {
                seq += 1;
                let entry = ChangeEntry {
                    change: Change::Item {
                        category: k.0.clone(),
                        key: k.1.clone(),
                    },
                    hlc: entry_hlc,
                };
                batch.put_cf(
                    self.cf(CF_CHANGELOG)?,
                    seq_key(seq),
                    encode(CF_CHANGELOG, &entry)?,
                );
            }
            pending.insert(k, merged);
        }
        let mut marks = m.watermarks;
        if let Some((cseq, chlc)) = m.cursor {
            let (old, old_hlc) = self.cursor(&m.child, m.incarnation)?;
            // A replayed range below the cursor leaves it (and its HLC) alone.
            let new = if cseq >= old {
                Cursor {
                    incarnation: m.incarnation,
                    seq: cseq,
                    hlc: chlc,
                }
            } else {
                Cursor {
                    incarnation: m.incarnation,
                    seq: old,
                    hlc: old_hlc,
                }
            };
            batch.put_cf(
                self.cf(CF_CURSORS)?,
                cursor_key(&m.child),
                encode(CF_CURSORS, &new)?,
            );
            marks.push(Watermark {
                origin: m.child.clone(),
                incarnation: m.incarnation,
                seq: cseq,
                hlc: chlc,
            });
        }
        let via = Relay {
            child: m.child.clone(),
            incarnation: m.incarnation,
            seq: m.cursor.map_or(0, |c| c.0),
        };
        for w in marks {
            // Which child relays for each node of its subtree (for drill-down).
            batch.put_cf(self.cf(CF_CURSORS)?, relay_key(&w.origin), m.child.as_str());
            let key = watermark_key(&w.origin);
            let cur: Option<Watermark> = self
                .db
                .get_pinned_cf(self.cf(CF_CURSORS)?, &key)?
                .map(|b| decode(CF_CURSORS, &b))
                .transpose()?;
            let cur_via: Option<Relay> = self
                .db
                .get_pinned_cf(self.cf(CF_CURSORS)?, via_key(&w.origin))?
                .map(|b| decode(CF_CURSORS, &b))
                .transpose()?;
            if watermark_replaces(cur.as_ref(), cur_via.as_ref(), &w, &via) {
                batch.put_cf(
                    self.cf(CF_CURSORS)?,
                    via_key(&w.origin),
                    encode(CF_CURSORS, &via)?,
                );
                batch.put_cf(self.cf(CF_CURSORS)?, &key, encode(CF_CURSORS, &w)?);
                seq += 1;
                let entry = ChangeEntry {
                    change: Change::Watermark(w),
                    hlc: entry_hlc,
                };
                batch.put_cf(
                    self.cf(CF_CHANGELOG)?,
                    seq_key(seq),
                    encode(CF_CHANGELOG, &entry)?,
                );
            }
        }
        self.flush_aggregates(&mut batch, aggs, &mut seq, entry_hlc)?;
        self.stage_overwrites(&mut batch, &overwrites)?;
        let counts = self.stage_counts(&state, &mut batch, live)?;
        batch.put_cf(self.cf(CF_META)?, META_SEQ, encode(CF_META, &seq)?);
        batch.put_cf(self.cf(CF_META)?, META_HLC, encode(CF_META, &clock.last())?);
        if crate::failpoints::fires("store-mid-merge") {
            crate::failpoints::crash("store-mid-merge");
        }
        self.db.write_opt(batch, &WriteOptions::default())?;
        if self.durability == Durability::Fsync
            && let Err(e) = self.sync_wal()
        {
            self.stop(&e);
            return Err(StoreError::Stopped(e));
        }
        let changed_log = seq != state.last_seq;
        state.clock = clock;
        state.last_seq = seq;
        state.counts.extend(counts);
        if changed_log {
            self.committed.send_replace((seq, state.clock.last()));
        }
        overwrites.publish();
        Ok(stats)
    }

    /// The aggregates of the policy, parsed.
    pub fn aggregates(&self) -> &[Compiled] {
        &self.aggs
    }

    fn source_is_private(&self, agg: &Compiled) -> bool {
        self.policy
            .categories
            .get(&agg.source)
            .is_some_and(|c| c.replicate == Replicate::Local)
    }

    /// Moves an item's old contribution out of, and its new one into, every
    /// aggregate over `category` (staged in `pending`, written by
    /// [`Store::flush_aggregates`] into the same WriteBatch).
    fn account(
        &self,
        pending: &mut AggPending,
        category: &str,
        old: Option<&Item>,
        new: Option<&Item>,
        version: Hlc,
    ) -> Result<(), StoreError> {
        for (i, agg) in self
            .aggs
            .iter()
            .enumerate()
            .filter(|(_, a)| a.source == category)
        {
            // An item stored before summed values were bounded, with one
            // beyond the bound, counts nothing (a rebuild skips it too); a
            // new state beyond it is refused.
            let before = old.and_then(|o| agg.contribution(o).ok().flatten());
            let after = match new {
                Some(n) => agg.contribution(n).map_err(StoreError::Overflow)?,
                None => None,
            };
            if before == after {
                continue;
            }
            for (contribution, sign) in [(before, -1i128), (after, 1)] {
                let Some((group, values)) = contribution else {
                    continue;
                };
                let delta: Vec<i128> = values.iter().map(|v| v * sign).collect();
                if self.source_is_private(agg) {
                    let key = agg.counters_key(&group);
                    if !pending.counters.contains_key(&key) {
                        let cur = match self.get(COUNTERS_CATEGORY, &key)? {
                            Some(Item::Counters(c)) => c,
                            _ => Counters::new(&agg.name, group.clone(), agg.measures.len()),
                        };
                        pending.counters.insert(key.clone(), cur);
                    }
                    if let Some(c) = pending.counters.get_mut(&key) {
                        c.add(&self.node, &delta, version, self.incarnation())
                            .map_err(StoreError::Overflow)?;
                    }
                } else {
                    let key = agg_row_key(agg, &group)?;
                    let row = match pending.rows.remove(&key) {
                        Some((_, r)) => r,
                        None => self
                            .agg_row(&key)?
                            .unwrap_or_else(|| vec![0; agg.measures.len()]),
                    };
                    let row = row
                        .iter()
                        .zip(&delta)
                        .map(|(a, d)| a.checked_add(*d))
                        .collect::<Option<Vec<i128>>>()
                        .ok_or_else(|| {
                            StoreError::Overflow(tiersync_protocol::aggregate::Overflow {
                                aggregate: agg.name.clone(),
                                detail: "a total would overflow".into(),
                            })
                        })?;
                    pending.rows.insert(key, (i, row));
                }
            }
        }
        Ok(())
    }

    fn agg_row(&self, key: &[u8]) -> Result<Option<Vec<i128>>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_AGGREGATES)?, key)?
            .map(|b| decode::<AggRow>(CF_AGGREGATES, &b).map(|r| r.values))
            .transpose()
    }

    /// Writes staged aggregate changes into `batch`: rows of shared
    /// aggregates, and the counters items of private ones (with changelog
    /// entries, so they travel up like any shared item).
    fn flush_aggregates(
        &self,
        batch: &mut WriteBatch,
        pending: AggPending,
        seq: &mut u64,
        hlc: Hlc,
    ) -> Result<(), StoreError> {
        for (key, (i, values)) in pending.rows {
            let group = self
                .aggs
                .get(i)
                .map(|a| a.name.as_str())
                .unwrap_or_default();
            if values.iter().all(|v| *v == 0) {
                batch.delete_cf(self.cf(CF_AGGREGATES)?, &key);
            } else {
                let row = AggRow {
                    group: decode_row_group(&key, group)?,
                    values,
                };
                batch.put_cf(self.cf(CF_AGGREGATES)?, &key, encode(CF_AGGREGATES, &row)?);
            }
        }
        for (key, counters) in pending.counters {
            batch.put_cf(
                self.cf(CF_DATA)?,
                data_key(COUNTERS_CATEGORY, &key),
                encode(CF_DATA, &Item::Counters(counters))?,
            );
            *seq += 1;
            let entry = ChangeEntry {
                change: Change::Item {
                    category: COUNTERS_CATEGORY.to_string(),
                    key,
                },
                hlc,
            };
            batch.put_cf(
                self.cf(CF_CHANGELOG)?,
                seq_key(*seq),
                encode(CF_CHANGELOG, &entry)?,
            );
        }
        Ok(())
    }

    /// The rows of an aggregate: group and one value per measure (sums in
    /// fixed point). Reads only aggregate state, never the source data.
    pub fn aggregate_rows(&self, agg: &Compiled) -> Result<Vec<(GroupKey, Vec<i128>)>, StoreError> {
        let mut out = Vec::new();
        if self.source_is_private(agg) {
            // Each city counts with its current incarnation only: the one
            // its watermark here names (this node's own, for itself).
            let mut current: BTreeMap<NodeId, u64> = self
                .watermarks()?
                .into_iter()
                .map(|w| (w.origin, w.incarnation))
                .collect();
            current.insert(self.node.clone(), self.incarnation());
            let prefix = agg.counters_prefix();
            let mut after: Option<String> = None;
            loop {
                let page = self.scan(COUNTERS_CATEGORY, &prefix, after.as_deref(), 1024, true)?;
                for (_, item) in &page.items {
                    if let Item::Counters(c) = item {
                        out.push((c.group.clone(), c.values_where(|a| current.get(a).copied())));
                    }
                }
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        } else {
            let prefix = agg_row_prefix(agg);
            for kv in self.db.iterator_cf(
                self.cf(CF_AGGREGATES)?,
                IteratorMode::From(&prefix, Direction::Forward),
            ) {
                let (k, v) = kv?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let row: AggRow = decode(CF_AGGREGATES, &v)?;
                out.push((row.group, row.values));
            }
        }
        Ok(out)
    }

    /// The child through which `origin`'s data arrives here, if known.
    pub fn relay_of(&self, origin: &NodeId) -> Result<Option<NodeId>, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_CURSORS)?, relay_key(origin))?
            .and_then(|b| {
                std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| NodeId::new(s).ok())
            }))
    }

    /// Rebuilds every aggregate whose definition changed since it was last
    /// built (or that was never built), from the node's own data.
    fn rebuild_changed_aggregates(&self) -> Result<(), StoreError> {
        self.rebuild_aggregates(false).map(|_| ())
    }

    /// Sets this node's share of every counter of its private aggregates
    /// to what its own data adds up to, each with a fresh version (so the
    /// new shares replace the old ones up the tree), whether it changed or
    /// not (`tiersync counters reset`). Other nodes' shares stay. Returns
    /// how many counters were written.
    pub fn reset_counters(&self) -> Result<usize, StoreError> {
        self.rebuild_aggregates(true)
    }

    /// With `reset_counters`, rebuilds this node's shares of every private
    /// aggregate; otherwise every aggregate whose definition changed.
    fn rebuild_aggregates(&self, reset_counters: bool) -> Result<usize, StoreError> {
        let mut written = 0;
        for agg in &self.aggs {
            let meta_key = format!("agg/{}", agg.name);
            let built = self
                .db
                .get_pinned_cf(self.cf(CF_META)?, meta_key.as_bytes())?;
            let skip = if reset_counters {
                !self.source_is_private(agg)
            } else {
                built.as_deref() == Some(agg.digest.as_bytes())
            };
            if skip {
                continue;
            }
            let mut state = self.lock()?;
            let mut batch = WriteBatch::default();
            let mut pending = AggPending::default();
            let mut n = 0u64;
            let private = self.source_is_private(agg);
            if !private {
                // Rows of every earlier definition of this name go.
                let prefix = [agg.name.as_bytes(), &[0u8]].concat();
                let mut end = agg.name.as_bytes().to_vec();
                end.push(1);
                batch.delete_range_cf(self.cf(CF_AGGREGATES)?, &prefix, &end);
            }
            tracing::info!(aggregate = %agg.name, source = %agg.source, "rebuilding aggregate from this node's data");
            let mut totals: BTreeMap<GroupKey, Vec<i128>> = BTreeMap::new();
            let start = data_prefix(&agg.source, "");
            for kv in self.db.iterator_cf(
                self.cf(CF_DATA)?,
                IteratorMode::From(&start, Direction::Forward),
            ) {
                let (k, v) = kv?;
                if !k.starts_with(&start) {
                    break;
                }
                let item: Item = decode(CF_DATA, &v)?;
                // Private items count only where they were written.
                if private && !item.stamps().iter().any(|s| s.origin == self.node) {
                    continue;
                }
                match agg.contribution(&item) {
                    Ok(Some((group, values))) => {
                        let t = totals.entry(group).or_insert_with(|| vec![0; values.len()]);
                        for (a, b) in t.iter_mut().zip(&values) {
                            *a = a.checked_add(*b).ok_or_else(|| {
                                StoreError::Overflow(tiersync_protocol::aggregate::Overflow {
                                    aggregate: agg.name.clone(),
                                    detail: "a total would overflow".into(),
                                })
                            })?;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let key = String::from_utf8_lossy(&k).into_owned();
                        tracing::warn!(aggregate = %agg.name, %key, error = %e, "an item beyond the aggregate's range counts nothing");
                    }
                }
                n += 1;
                if n.is_multiple_of(1_000_000) {
                    tracing::info!(aggregate = %agg.name, items = n, "rebuilding");
                }
            }
            let i = self
                .aggs
                .iter()
                .position(|a| a.name == agg.name)
                .unwrap_or(0);
            if private {
                // Set this node's own share of every counter to its total.
                let mut existing = Vec::new();
                let page = self.scan(
                    COUNTERS_CATEGORY,
                    &agg.counters_prefix(),
                    None,
                    usize::MAX,
                    true,
                )?;
                for (key, item) in page.items {
                    if let Item::Counters(c) = item {
                        existing.push((key, c));
                    }
                }
                let version = state.clock.tick(crate::now_ms()).hlc;
                for (key, c) in existing {
                    let target = totals
                        .remove(&c.group)
                        .unwrap_or_else(|| vec![0; agg.measures.len()]);
                    if reset_counters || c.value_of(&self.node) != target {
                        let mut c = c;
                        c.set(&self.node, target, version, self.incarnation());
                        pending.counters.insert(key, c);
                    }
                }
                for (group, target) in totals {
                    let mut c = Counters::new(&agg.name, group.clone(), agg.measures.len());
                    c.set(&self.node, target, version, self.incarnation());
                    pending.counters.insert(agg.counters_key(&group), c);
                }
            } else {
                for (group, values) in totals {
                    pending.rows.insert(agg_row_key(agg, &group)?, (i, values));
                }
            }
            written += pending.counters.len();
            let mut seq = state.last_seq;
            let hlc = state.clock.last();
            self.flush_aggregates(&mut batch, pending, &mut seq, hlc)?;
            batch.put_cf(self.cf(CF_META)?, META_SEQ, encode(CF_META, &seq)?);
            batch.put_cf(self.cf(CF_META)?, META_HLC, encode(CF_META, &hlc)?);
            batch.put_cf(
                self.cf(CF_META)?,
                meta_key.as_bytes(),
                agg.digest.as_bytes(),
            );
            self.db.write_opt(batch, &sync_opts())?;
            state.last_seq = seq;
            tracing::info!(aggregate = %agg.name, items = n, "aggregate rebuilt");
        }
        Ok(written)
    }

    /// Calls `f` for every stored item (tombstones included), in key order.
    pub fn for_each_item(&self, mut f: impl FnMut(&str, &str, Item)) -> Result<(), StoreError> {
        for kv in self.db.iterator_cf(self.cf(CF_DATA)?, IteratorMode::Start) {
            let (k, v) = kv?;
            if let Some((cat, key)) = split_data_key(&k) {
                f(cat, key, decode(CF_DATA, &v)?);
            }
        }
        Ok(())
    }

    /// Bytes the store holds: SST files plus memtables, over every column family.
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for name in ALL_CFS {
            let cf = self.cf(name)?;
            for prop in [
                "rocksdb.total-sst-files-size",
                "rocksdb.cur-size-all-mem-tables",
            ] {
                total += self.db.property_int_value_cf(cf, prop)?.unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Flushes memtables to SST files (used on clean shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        self.db.flush()?;
        Ok(())
    }
}

/// Aggregate changes staged for one WriteBatch.
#[derive(Default)]
struct AggPending {
    /// Row key → (aggregate index, new values).
    rows: BTreeMap<Vec<u8>, (usize, Vec<i128>)>,
    /// Counters key → new counters.
    counters: BTreeMap<String, Counters>,
}

/// A stored row of a shared aggregate.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AggRow {
    group: GroupKey,
    values: Vec<i128>,
}

fn agg_row_prefix(agg: &Compiled) -> Vec<u8> {
    [agg.name.as_bytes(), &[0], agg.digest.as_bytes(), &[0]].concat()
}

fn agg_row_key(agg: &Compiled, group: &GroupKey) -> Result<Vec<u8>, StoreError> {
    Ok([agg_row_prefix(agg), encode(CF_AGGREGATES, group)?].concat())
}

/// The group of a row key (after the `name 0 digest 0` prefix).
fn decode_row_group(key: &[u8], name: &str) -> Result<GroupKey, StoreError> {
    let rest = key.get(name.len() + 1..).unwrap_or_default();
    let at = rest
        .iter()
        .position(|b| *b == 0)
        .map_or(rest.len(), |p| p + 1);
    decode(CF_AGGREGATES, &rest[at..])
}

/// How an item's change moves its category's live count: +1 for a new live
/// item, -1 for a record deleted, 0 otherwise.
fn live_delta(old: Option<&Item>, new: &Item) -> i64 {
    let live = |i: &Item| !i.is_deleted();
    i64::from(live(new)) - i64::from(old.is_some_and(live))
}

fn record_of(current: Option<Item>) -> Record {
    match current {
        Some(Item::Record(r)) => r,
        _ => Record::default(),
    }
}

fn sync_opts() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

#[cfg(test)]
mod tests;
