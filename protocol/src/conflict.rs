//! The conflict ledger: every losing version of a conflicting log entry.
//!
//! Two nodes appending different content under one log key is resolved by
//! [`LogEntry::merge`] (the higher stamp wins everywhere), which would drop
//! the other version silently. The node that sees the conflict keeps the
//! loser as an item of the reserved category [`CONFLICTS_CATEGORY`], kind
//! log, which replicates up like shared data, so HQ holds every conflict of
//! its subtree.
//!
//! A ledger entry holds only the losing version (its fields, and its own
//! stamp), never the winner: the same conflict seen independently at two
//! tiers then gives byte-identical entries under one key, which merge as a
//! no-op. Its key is derived from the content ([`ledger_key`]), so a receiver
//! can check that a key and its content belong together.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::clock::Stamp;
use crate::item::{Item, LogEntry};
use crate::policy::{Kind, Policy, Replicate};
use crate::value::Value;

/// The reserved category of the conflict ledger. Category names starting
/// with `_` are reserved.
pub const CONFLICTS_CATEGORY: &str = "_conflict";

/// The ledger field holding the conflicting item's category. Parentheses
/// are not allowed in field names, so it never collides with the loser's own
/// fields.
pub const CATEGORY_FIELD: &str = "(category)";
/// The ledger field holding the conflicting item's key.
pub const KEY_FIELD: &str = "(key)";

/// One losing version of a log key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The log category of the conflicting item.
    pub category: String,
    /// The conflicting item's key.
    pub key: String,
    /// The version that lost: its content and its own stamp.
    pub loser: LogEntry,
}

/// The ledger key of a losing version: `category/origin/hlc/hash`, where
/// `hash` is 16 hex digits of SHA-256 over the category and key. Category
/// and origin first, so one category's (and one origin's) entries are one
/// key range; the hash keeps the key short whatever the item's key is
/// (at most 64 + 64 + 31 + 16 + 3 bytes).
pub fn ledger_key(category: &str, key: &str, loser: &Stamp) -> String {
    let mut h = Sha256::new();
    h.update(category.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let hash = hex::encode(&h.finalize()[..8]);
    format!(
        "{category}/{}/{:013}.{}/{hash}",
        loser.origin, loser.hlc.physical_ms, loser.hlc.logical
    )
}

/// The ledger key prefix of one category (and one loser origin).
pub fn ledger_prefix(category: &str, origin: Option<&str>) -> String {
    match origin {
        Some(o) => format!("{category}/{o}/"),
        None => format!("{category}/"),
    }
}

impl Conflict {
    /// The ledger item: key and content.
    pub fn to_item(&self) -> (String, Item) {
        let mut fields = self.loser.fields.clone();
        fields.insert(CATEGORY_FIELD.into(), Value::Str(self.category.clone()));
        fields.insert(KEY_FIELD.into(), Value::Str(self.key.clone()));
        let key = ledger_key(&self.category, &self.key, &self.loser.stamp);
        (
            key,
            Item::Log(LogEntry {
                fields,
                stamp: self.loser.stamp.clone(),
            }),
        )
    }

    /// Reads a ledger item back; refuses one that is not a log entry, lacks
    /// the category or key, or whose key is not the one its content derives.
    pub fn from_item(ledger_key_: &str, item: &Item) -> Result<Conflict, String> {
        let Item::Log(entry) = item else {
            return Err("a conflict ledger entry must be a log entry".into());
        };
        let mut fields: BTreeMap<String, Value> = entry.fields.clone();
        let mut take = |name: &str| match fields.remove(name) {
            Some(Value::Str(s)) => Ok(s),
            _ => Err(format!("the ledger entry has no text field {name:?}")),
        };
        let category = take(CATEGORY_FIELD)?;
        let key = take(KEY_FIELD)?;
        let expected = ledger_key(&category, &key, &entry.stamp);
        if ledger_key_ != expected {
            return Err(format!(
                "the ledger key does not match its content (expected {expected:?})"
            ));
        }
        Ok(Conflict {
            category,
            key,
            loser: LogEntry {
                fields,
                stamp: entry.stamp.clone(),
            },
        })
    }
}

/// The ledger entry for a log merge that reported a conflict: `before` is
/// the state held, `incoming` the version received; the loser is whichever
/// of them the merge did not keep. `None` when the two are not log entries
/// with different content (a kind mismatch or a reused stamp on equal
/// content is not a bill-line conflict).
pub fn loser_of(
    category: &str,
    key: &str,
    before: &Item,
    incoming: &Item,
    incoming_won: bool,
) -> Option<Conflict> {
    let (Item::Log(mine), Item::Log(theirs)) = (before, incoming) else {
        return None;
    };
    if mine.fields == theirs.fields {
        return None;
    }
    let loser = if incoming_won { mine } else { theirs };
    Some(Conflict {
        category: category.to_string(),
        key: key.to_string(),
        loser: loser.clone(),
    })
}

/// Checks a received ledger item against the receiver's policy: its content
/// derives its key, and it names a declared `up` log category and a valid
/// key. (Its stamp is checked like any item's by the caller.)
pub fn validate(policy: &Policy, ledger_key_: &str, item: &Item) -> Result<(), String> {
    let c = Conflict::from_item(ledger_key_, item)?;
    let cat = policy.category(&c.category).map_err(|e| e.to_string())?;
    if cat.replicate != Replicate::Up || cat.kind != Kind::Log {
        return Err(format!(
            "the ledger names category {:?}, which is not a shared log category",
            c.category
        ));
    }
    policy
        .check_key(&c.key)
        .map_err(|e| format!("the ledger names a bad key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::tests::stamp;

    fn entry(amount: i64, ms: u64, node: &str) -> LogEntry {
        LogEntry {
            fields: BTreeMap::from([("amount".to_string(), Value::Int(amount))]),
            stamp: stamp(ms, node),
        }
    }

    #[test]
    fn an_item_reads_back_and_its_key_is_checked() {
        let c = Conflict {
            category: "billing".into(),
            key: "b/1".into(),
            loser: entry(5, 10, "city-a"),
        };
        let (key, item) = c.to_item();
        assert!(key.starts_with(&ledger_prefix("billing", Some("city-a"))));
        assert_eq!(Conflict::from_item(&key, &item), Ok(c.clone()));
        let other = ledger_key("billing", "b/2", &c.loser.stamp);
        let err = Conflict::from_item(&other, &item).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
    }

    fn policy() -> Policy {
        let cat = |kind, replicate| crate::policy::Category {
            kind,
            replicate,
            customer_link: None,
            description: String::new(),
        };
        Policy {
            limits: crate::policy::Limits::default(),
            privacy: Default::default(),
            categories: BTreeMap::from([
                ("billing".to_string(), cat(Kind::Log, Replicate::Up)),
                ("customer".to_string(), cat(Kind::Record, Replicate::Up)),
                ("notes".to_string(), cat(Kind::Log, Replicate::Local)),
            ]),
            aggregates: BTreeMap::new(),
        }
    }

    fn wire(category: &str, key: &str, loser: LogEntry) -> crate::frame::WireItem {
        let (key_, item) = Conflict {
            category: category.into(),
            key: key.into(),
            loser,
        }
        .to_item();
        crate::frame::WireItem {
            category: CONFLICTS_CATEGORY.into(),
            key: key_,
            item,
        }
    }

    fn check(w: &crate::frame::WireItem) -> Result<(), String> {
        crate::sync::validate_item(&policy(), 1_000, |o| o.as_str() == "city-a", w)
    }

    #[test]
    fn the_receiver_accepts_only_genuine_ledger_entries() {
        let good = wire("billing", "b-1", entry(5, 10, "city-a"));
        assert_eq!(check(&good), Ok(()));

        // A forged key: the content does not derive it.
        let mut forged = good.clone();
        forged.key = ledger_key("billing", "b-2", &stamp(10, "city-a"));
        let err = check(&forged).unwrap_err();
        assert!(err.starts_with("_conflict/billing/city-a/"), "{err}");
        assert!(err.contains("does not match its content"), "{err}");

        // Content without the conflicting item's name.
        let mut bare = good.clone();
        if let Item::Log(l) = &mut bare.item {
            l.fields.remove(KEY_FIELD);
        }
        assert!(check(&bare).unwrap_err().contains("no text field"));

        // Only shared log categories have conflicts; a private one never
        // leaves its node.
        for cat in ["customer", "notes", "nope"] {
            let err = check(&wire(cat, "b-1", entry(5, 10, "city-a"))).unwrap_err();
            assert!(err.contains(cat), "{err}");
        }

        // The loser's origin must be in the sender's subtree, its stamp not
        // in the future.
        let err = check(&wire("billing", "b-1", entry(5, 10, "city-x"))).unwrap_err();
        assert!(err.contains("origin city-x"), "{err}");
        let far = 1_000 + crate::policy::Limits::default().max_clock_skew_ms + 1;
        let err = check(&wire("billing", "b-1", entry(5, far, "city-a"))).unwrap_err();
        assert!(err.contains("ahead of this node's clock"), "{err}");
    }

    #[test]
    fn the_loser_is_what_the_merge_did_not_keep() {
        let a = Item::Log(entry(5, 10, "city-a"));
        let b = Item::Log(entry(7, 11, "city-b"));
        let lost = loser_of("billing", "k", &a, &b, true).unwrap();
        assert_eq!(lost.loser.stamp.origin.as_str(), "city-a");
        let lost = loser_of("billing", "k", &b, &a, false).unwrap();
        assert_eq!(lost.loser.stamp.origin.as_str(), "city-a");
        // The same content under two stamps is no bill-line conflict.
        let a2 = Item::Log(entry(5, 12, "city-b"));
        assert_eq!(loser_of("billing", "k", &a, &a2, true), None);
    }
}
