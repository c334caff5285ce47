//! Criterion micro-benchmarks: the codec and record merges.
//!
//! `cargo bench -p tiersync-benches --bench micro`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tiersync_protocol::codec;
use tiersync_protocol::{Hlc, Item, NodeId, Record, Stamp, Value};

fn stamp(ms: u64, node: &str) -> Stamp {
    Stamp {
        hlc: Hlc {
            physical_ms: ms,
            logical: 0,
        },
        origin: NodeId::new(node).unwrap_or_else(|e| panic!("{e}")),
    }
}

/// A ~300-byte, 12-field customer record, the size DESIGN.md measures.
fn customer(ms: u64, node: &str) -> Record {
    let mut doc = BTreeMap::new();
    for (i, name) in [
        "name", "phone", "email", "city", "district", "segment", "plan", "status", "agent",
        "address", "id_type", "opened",
    ]
    .iter()
    .enumerate()
    {
        doc.insert(name.to_string(), Value::Str(format!("{name}-value-{i:04}")));
    }
    let mut r = Record::default();
    r.put(doc, stamp(ms, node));
    r
}

fn bench(c: &mut Criterion) {
    let item = Item::Record(customer(1_700_000_000_000, "hangzhou"));
    let bytes = codec::encode_stored(&item).unwrap_or_default();
    eprintln!("encoded 12-field customer record: {} bytes", bytes.len());
    c.bench_function("codec/encode_record", |b| {
        b.iter(|| codec::encode_stored(black_box(&item)))
    });
    c.bench_function("codec/decode_record", |b| {
        b.iter(|| codec::decode_stored::<Item>(black_box(&bytes)))
    });

    let a = customer(1_700_000_000_000, "hangzhou");
    let mut newer = customer(1_700_000_000_500, "ningbo");
    let mut patch = BTreeMap::new();
    patch.insert("segment".to_string(), Some(Value::Str("gold".into())));
    newer.patch(patch, stamp(1_700_000_000_600, "ningbo"));
    c.bench_function("record/merge_12_fields", |b| {
        b.iter(|| {
            let mut m = a.clone();
            m.merge(black_box(&newer))
        })
    });
    c.bench_function("record/decode_merge_encode", |b| {
        let incoming = codec::encode_stored(&Item::Record(newer.clone())).unwrap_or_default();
        b.iter(|| {
            let mut mine = a.clone();
            if let Ok(Item::Record(theirs)) = codec::decode_stored::<Item>(black_box(&incoming)) {
                mine.merge(&theirs);
            }
            codec::encode_stored(&Item::Record(mine))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
