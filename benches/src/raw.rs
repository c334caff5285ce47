//! Scenario 1, the ceiling: the same items written straight into RocksDB in
//! WriteBatches of the same size, with the same durability (one synced WAL
//! write per batch), and no tiersync logic at all.
//!
//! This is the one place outside `node/src/store` that opens RocksDB: it
//! measures RocksDB itself.

use std::time::Instant;

use tiersync::json::document_from_json;
use tiersync::store::keys::data_key;
use tiersync_protocol::codec::encode_stored;
use tiersync_protocol::{Hlc, Item, NodeId, Record, Stamp};

use crate::Throughput;
use crate::data::{customer_fields, customer_key};

/// The stored form of customer `i` of `city`, as a city node stores it after
/// a PUT: its data key and encoded item.
pub fn stored_customer(city: &NodeId, i: u64) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let fields = customer_fields(city.as_str(), i);
    let obj = fields
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("generated customer is not an object"))?;
    let mut r = Record::default();
    r.put(
        document_from_json(obj),
        Stamp {
            hlc: Hlc {
                physical_ms: 1_790_000_000_000 + i,
                logical: 0,
            },
            origin: city.clone(),
        },
    );
    Ok((
        data_key("customer", &customer_key(city.as_str(), i)),
        encode_stored(&Item::Record(r))?,
    ))
}

/// Writes `n` customers in synced WriteBatches of `batch` items; the items
/// are encoded before the clock starts.
pub fn run(n: u64, batch: usize) -> anyhow::Result<Throughput> {
    let city = NodeId::new("hangzhou")?;
    let items: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
        .map(|i| stored_customer(&city, i))
        .collect::<anyhow::Result<_>>()?;
    let bytes: u64 = items.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    let dir = tempfile::tempdir()?;
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let db = rocksdb::DB::open(&opts, dir.path())?;
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    let t0 = Instant::now();
    for chunk in items.chunks(batch.max(1)) {
        let mut b = rocksdb::WriteBatch::default();
        for (k, v) in chunk {
            b.put(k, v);
        }
        db.write_opt(b, &wo)?;
    }
    let elapsed = t0.elapsed();
    Ok(Throughput::new(n, bytes, elapsed))
}
