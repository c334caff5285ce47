//! The node's durable store: RocksDB with one WriteBatch per mutation.
//!
//! Only this module knows RocksDB. Every mutation writes, in one batch, the
//! item's new state, its changelog entry, the new last sequence number and the
//! HLC high-water mark, so a crash can never separate them. Writes are applied
//! in groups ([`Store::apply`]): each mutation is its own batch, and with
//! [`Durability::Fsync`] the group shares one WAL fsync before any of them is
//! acknowledged (group commit).

pub mod keys;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use tiersync_protocol::codec::{self, CodecError};
use tiersync_protocol::{Hlc, HlcClock, Item, Kind, LogEntry, NodeId, Policy, PolicyError, Record, Stamp, Value};

use crate::config::Durability;
use keys::*;

/// A failure of the store itself (not of one request).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB reported an error.
    #[error("storage error: {0}")]
    Rocks(#[from] rocksdb::Error),
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
    /// The writer lock was poisoned by a panic in another writer.
    #[error("the store's writer lock is poisoned")]
    Poisoned,
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
        WriteError::Store(StoreError::Rocks(e))
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

/// One changelog entry: which item changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEntry {
    /// Category of the changed item.
    pub category: String,
    /// Key of the changed item.
    pub key: String,
    /// The HLC of the change (for lag in seconds).
    pub hlc: Hlc,
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
}

/// The node's store.
pub struct Store {
    db: DB,
    policy: Arc<Policy>,
    durability: Durability,
    writer: Mutex<WriterState>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.db.path()).finish_non_exhaustive()
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
    pub fn open(dir: &Path, node: NodeId, policy: Arc<Policy>, durability: Durability) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = ALL_CFS.iter().map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;

        let meta = db.cf_handle(CF_META).ok_or(StoreError::MissingCf(CF_META))?;
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
        Ok(Self {
            db,
            policy,
            durability,
            writer: Mutex::new(WriterState {
                clock: HlcClock::resume(node, hlc),
                last_seq,
            }),
        })
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
    pub fn apply(&self, mutations: Vec<Mutation>, now_ms: u64) -> Result<Vec<Result<Applied, WriteError>>, StoreError> {
        let mut state = self.lock()?;
        let mut results: Vec<Result<Applied, WriteError>> =
            mutations.into_iter().map(|m| self.apply_one(&mut state, m, now_ms)).collect();
        let wrote = results.iter().any(|r| matches!(r, Ok(Applied { seq: Some(_), .. })));
        if wrote && self.durability == Durability::Fsync {
            if let Err(e) = self.db.flush_wal(true) {
                let msg = e.to_string();
                for r in &mut results {
                    if r.is_ok() {
                        *r = Err(WriteError::Store(StoreError::Rocks(e.clone())));
                    }
                }
                tracing::error!(error = %msg, "WAL sync failed; the group is not acknowledged");
            }
        }
        Ok(results)
    }

    fn apply_one(&self, state: &mut WriterState, m: Mutation, now_ms: u64) -> Result<Applied, WriteError> {
        let (category, key) = m.target();
        let cat = self.policy.category(category)?;
        self.policy.check_key(key)?;
        let kind_ok = match &m {
            Mutation::Put { .. } | Mutation::Patch { .. } | Mutation::Delete { .. } => cat.kind == Kind::Record,
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
        let mut clock = state.clock.clone();
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
                        return Ok(Applied { seq: None, stamp: existing.stamp });
                    }
                    Some(_) => return Err(WriteError::Conflict { category, key }),
                    None => Item::Log(LogEntry { fields, stamp: stamp.clone() }),
                }
            }
        };
        let value = encode(CF_DATA, &item)?;
        let max = self.policy.limits.max_item_bytes;
        if value.len() > max {
            return Err(WriteError::TooLarge { size: value.len(), max });
        }
        let seq = state.last_seq + 1;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_DATA)?, data_key(&category, &key), value);
        let entry = ChangeEntry { category, key, hlc: stamp.hlc };
        batch.put_cf(self.cf(CF_CHANGELOG)?, seq_key(seq), encode(CF_CHANGELOG, &entry)?);
        batch.put_cf(self.cf(CF_META)?, META_SEQ, encode(CF_META, &seq)?);
        batch.put_cf(self.cf(CF_META)?, META_HLC, encode(CF_META, &clock.last())?);
        // Not synced here: `apply` syncs the WAL once for the whole group.
        self.db.write_opt(batch, &WriteOptions::default())?;
        state.clock = clock;
        state.last_seq = seq;
        Ok(Applied { seq: Some(seq), stamp })
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
        for kv in self.db.iterator_cf(self.cf(CF_DATA)?, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = kv?;
            if !k.starts_with(&bound) {
                break;
            }
            let Some((_, key)) = split_data_key(&k) else { continue };
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
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeEntry)>, StoreError> {
        let start = seq_key(after.saturating_add(1));
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_CHANGELOG)?, IteratorMode::From(&start, Direction::Forward)) {
            if out.len() == limit {
                break;
            }
            let (k, v) = kv?;
            let Some(seq) = parse_seq(&k) else { continue };
            out.push((seq, decode(CF_CHANGELOG, &v)?));
        }
        Ok(out)
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

    /// Flushes memtables to SST files (used on clean shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        self.db.flush()?;
        Ok(())
    }
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
