//! The sans-IO core of tiersync: the data model, the CRDTs that merge it, the
//! shared policy, and the wire/storage codec.
//!
//! Nothing in this crate does I/O or reads a clock: callers pass time in
//! (`now_ms`) and get values back, so every rule here is testable with plain
//! unit and property tests.
//!
//! A short tour:
//!
//! ```
//! use std::collections::BTreeMap;
//! use tiersync_protocol::{HlcClock, NodeId, Record, Value};
//!
//! let city = NodeId::new("hangzhou").unwrap();
//! let mut clock = HlcClock::new(city.clone());
//!
//! // A PUT at one node, a concurrent PATCH of another field elsewhere.
//! let mut doc = BTreeMap::new();
//! doc.insert("name".to_string(), Value::Str("Li Lei".into()));
//! let mut a = Record::default();
//! a.put(doc, clock.tick(1_000));
//!
//! let mut b = a.clone();
//! let mut patch = BTreeMap::new();
//! patch.insert("segment".to_string(), Some(Value::Str("gold".into())));
//! b.patch(patch, clock.tick(1_001));
//!
//! // Merging in either order gives the same document.
//! let mut ab = a.clone();
//! ab.merge(&b);
//! let mut ba = b.clone();
//! ba.merge(&a);
//! assert_eq!(ab, ba);
//! assert_eq!(ab.document().len(), 2);
//! ```
#![warn(missing_docs)]

pub mod aggregate;
pub mod clock;
pub mod codec;
pub mod conflict;
pub mod frame;
pub mod id;
pub mod item;
pub mod policy;
pub mod sync;
pub mod value;

pub use clock::{Hlc, HlcClock, Stamp};
pub use codec::CodecError;
pub use id::{IdError, NodeId, Tier};
pub use item::{Item, LogEntry, MergeOutcome, Record};
pub use policy::{Category, Kind, Policy, PolicyError, Replicate};
pub use value::Value;
