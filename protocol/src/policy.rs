//! The deployment's shared policy: categories, aggregates and limits.
//!
//! Every node of a deployment loads the same policy file; its
//! [digest](Policy::digest) is compared in the replication handshake, so
//! parents and children always agree on what replicates. Parsing the TOML is
//! the node's job; this module holds the types and every rule about them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{self, HARD_MAX_BYTES};

/// Whether a category's items leave the node that wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replicate {
    /// Shared: replicated city → province → national and merged.
    Up,
    /// Private: never leaves the node that owns it (only aggregate counts do).
    Local,
}

/// How a category's items behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Mutable documents: PUT, PATCH, DELETE, merged field by field.
    Record,
    /// Immutable entries: appended once, merged as a union by key.
    Log,
}

/// How an item of a category belongs to a customer (for the unified view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CustomerLink {
    /// The customer id is this field's value.
    Field(String),
    /// The key starts with the customer id followed by this separator.
    KeyPrefix(String),
}

/// A category declared in the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// `record` or `log`.
    pub kind: Kind,
    /// `up` or `local`.
    pub replicate: Replicate,
    /// How items link to a customer, if they do.
    #[serde(default)]
    pub customer_link: Option<CustomerLink>,
    /// Free text for operators.
    #[serde(default)]
    pub description: String,
}

/// An aggregate declared in the policy (maintained by the node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateDef {
    /// The category it follows.
    pub source: String,
    /// Dimensions: `origin`, a field name, or `day(f)` / `month(f)` / `year(f)`.
    pub group_by: Vec<String>,
    /// Measures: `count` or `sum(f)`.
    pub measures: Vec<String>,
    /// Free text for operators.
    #[serde(default)]
    pub description: String,
}

/// A parsed group-by dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dimension {
    /// The node that wrote the item.
    Origin,
    /// A field's value.
    Field(String),
    /// A time bucket of a date/time field.
    Bucket(TimeBucket, String),
}

/// Time bucket sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeBucket {
    /// `YYYY-MM-DD`.
    Day,
    /// `YYYY-MM`.
    Month,
    /// `YYYY`.
    Year,
}

/// A parsed measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measure {
    /// Number of items.
    Count,
    /// Sum of a numeric field.
    Sum(String),
}

/// Splits `name(arg)` into its parts.
fn call(s: &str) -> Option<(&str, &str)> {
    let (name, rest) = s.split_once('(')?;
    let arg = rest.strip_suffix(')')?;
    Some((name.trim(), arg.trim()))
}

impl Dimension {
    /// Parses a `group_by` entry.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "origin" {
            return Ok(Dimension::Origin);
        }
        if let Some((f, arg)) = call(s) {
            let bucket = match f {
                "day" => TimeBucket::Day,
                "month" => TimeBucket::Month,
                "year" => TimeBucket::Year,
                other => {
                    return Err(format!(
                        "unknown function {other:?} in {s:?}: expected day, month or year"
                    ));
                }
            };
            check_field_name(arg)?;
            return Ok(Dimension::Bucket(bucket, arg.to_string()));
        }
        check_field_name(s)?;
        Ok(Dimension::Field(s.to_string()))
    }
}

impl Measure {
    /// Parses a `measures` entry.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "count" {
            return Ok(Measure::Count);
        }
        match call(s) {
            Some(("sum", arg)) => {
                check_field_name(arg)?;
                Ok(Measure::Sum(arg.to_string()))
            }
            _ => Err(format!(
                "unknown measure {s:?}: expected \"count\" or \"sum(field)\""
            )),
        }
    }
}

/// Whether `s` is a valid field name (1 to 128 bytes, no control
/// characters, no parentheses).
pub fn check_field_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c == '(' || c == ')') {
        return Err(format!("{s:?} is not a field name"));
    }
    Ok(())
}

/// Size and time limits shared by the deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// How far ahead of the receiver's clock a stamp may be, in milliseconds.
    pub max_clock_skew_ms: u64,
    /// Longest item key, in bytes.
    pub max_key_bytes: usize,
    /// Largest encoded item, in bytes.
    pub max_item_bytes: usize,
    /// Most fields in one document.
    pub max_fields: usize,
    /// Most items in one replication batch.
    pub max_batch_items: usize,
    /// Largest replication frame, in bytes (at most 16 MiB).
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_clock_skew_ms: 5 * 60 * 1000,
            max_key_bytes: 256,
            max_item_bytes: 64 * 1024,
            max_fields: 256,
            max_batch_items: 1024,
            max_frame_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What aggregates over private categories may reveal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Privacy {
    /// Fewest items of a group a node publishes (k-anonymity): under it, a
    /// node's share of the group leaves the node as zeros, so a group of one
    /// opportunity never reveals its amount. Default 5.
    pub min_group_size: u64,
    /// Fields allowed as dimensions (`group_by`) of aggregates over private
    /// (`local`) categories, besides `origin` and time buckets
    /// (`day(F)`/`month(F)`/`year(F)`): low-cardinality fields such as a
    /// sales stage. A category's customer link field is never allowed.
    pub dimensions: Vec<String>,
}

impl Default for Privacy {
    fn default() -> Self {
        Self {
            min_group_size: 5,
            dimensions: Vec::new(),
        }
    }
}

/// The shared policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Limits (all optional, with defaults).
    #[serde(default)]
    pub limits: Limits,
    /// What aggregates over private categories may reveal.
    #[serde(default)]
    pub privacy: Privacy,
    /// Categories by name.
    pub categories: BTreeMap<String, Category>,
    /// Aggregates by name.
    #[serde(default)]
    pub aggregates: BTreeMap<String, AggregateDef>,
}

/// A rule of the policy that a file or a request broke. `key` names where:
/// a policy key like `aggregates.by_city.source`, or the request's part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The policy file itself is inconsistent.
    #[error("{key}: {reason}")]
    Invalid {
        /// The offending key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request names a category the policy does not declare.
    #[error("unknown category {0:?}")]
    UnknownCategory(String),
    /// A request's key is not acceptable.
    #[error("invalid key: {0}")]
    BadKey(String),
    /// A request's document is not acceptable.
    #[error("invalid document: {0}")]
    BadDocument(String),
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Whether `name` is a valid category name.
pub fn valid_category_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Policy {
    /// Checks every rule that serde's types cannot express.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let l = &self.limits;
        if l.max_frame_bytes < 1024 || l.max_frame_bytes > HARD_MAX_BYTES {
            return Err(invalid(
                "limits.max_frame_bytes",
                format!("{} is outside 1024..={HARD_MAX_BYTES}", l.max_frame_bytes),
            ));
        }
        if l.max_item_bytes == 0 || l.max_item_bytes > l.max_frame_bytes / 2 {
            return Err(invalid(
                "limits.max_item_bytes",
                format!(
                    "{} must be above 0 and at most half of limits.max_frame_bytes ({})",
                    l.max_item_bytes, l.max_frame_bytes
                ),
            ));
        }
        for (key, v) in [
            ("limits.max_key_bytes", l.max_key_bytes),
            ("limits.max_fields", l.max_fields),
            ("limits.max_batch_items", l.max_batch_items),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be above 0"));
            }
        }
        if self.privacy.min_group_size == 0 {
            return Err(invalid("privacy.min_group_size", "must be above 0"));
        }
        if self.categories.is_empty() {
            return Err(invalid("categories", "at least one category is required"));
        }
        for name in self.categories.keys() {
            if name.starts_with('_') {
                return Err(invalid(
                    format!("categories.{name}"),
                    "names starting with '_' are reserved",
                ));
            }
            if !valid_category_name(name) {
                return Err(invalid(
                    format!("categories.{name}"),
                    "a category name has 1 to 64 lowercase letters, digits or '_'",
                ));
            }
        }
        for (name, cat) in &self.categories {
            if let Some(CustomerLink::Field(f) | CustomerLink::KeyPrefix(f)) = &cat.customer_link
                && f.is_empty()
            {
                return Err(invalid(
                    format!("categories.{name}.customer_link"),
                    "the field name or key separator is empty",
                ));
            }
        }
        for (name, agg) in &self.aggregates {
            let at = |k: &str| format!("aggregates.{name}.{k}");
            if !valid_category_name(name) {
                return Err(invalid(
                    format!("aggregates.{name}"),
                    "an aggregate name has 1 to 64 lowercase letters, digits or '_'",
                ));
            }
            if !self.categories.contains_key(&agg.source) {
                return Err(invalid(
                    at("source"),
                    format!("no category named {:?} is declared", agg.source),
                ));
            }
            for (i, d) in agg.group_by.iter().enumerate() {
                Dimension::parse(d).map_err(|r| invalid(format!("{}[{i}]", at("group_by")), r))?;
            }
            if agg.measures.is_empty() {
                return Err(invalid(at("measures"), "at least one measure is required"));
            }
            for (i, m) in agg.measures.iter().enumerate() {
                Measure::parse(m).map_err(|r| invalid(format!("{}[{i}]", at("measures")), r))?;
            }
            self.check_private_dimensions(name, agg)?;
        }
        Ok(())
    }

    /// An aggregate over a private category groups only by `origin`, time
    /// buckets and the fields `[privacy] dimensions` allows, never by the
    /// category's customer link: a policy edit cannot turn a private
    /// aggregate into a per-customer (or per-opportunity) export.
    fn check_private_dimensions(&self, name: &str, agg: &AggregateDef) -> Result<(), PolicyError> {
        let Some(source) = self.categories.get(&agg.source) else {
            return Ok(());
        };
        if source.replicate != Replicate::Local {
            return Ok(());
        }
        if !agg
            .measures
            .iter()
            .any(|m| Measure::parse(m) == Ok(Measure::Count))
        {
            return Err(invalid(
                format!("aggregates.{name}.measures"),
                "an aggregate over a private category needs a \"count\" measure: privacy.min_group_size is judged on it",
            ));
        }
        let link = match &source.customer_link {
            Some(CustomerLink::Field(f)) => Some(f.as_str()),
            _ => None,
        };
        for (i, d) in agg.group_by.iter().enumerate() {
            let key = format!("aggregates.{name}.group_by[{i}]");
            let field = match Dimension::parse(d) {
                Ok(Dimension::Origin) => continue,
                Ok(Dimension::Bucket(_, f)) => {
                    if Some(f.as_str()) == link {
                        return Err(invalid(
                            key,
                            format!(
                                "{d:?} buckets the customer link of private category {:?}",
                                agg.source
                            ),
                        ));
                    }
                    continue;
                }
                Ok(Dimension::Field(f)) => f,
                Err(r) => return Err(invalid(key, r)),
            };
            if Some(field.as_str()) == link {
                return Err(invalid(
                    key,
                    format!(
                        "{field:?} is the customer link of private category {:?}: it can never group a private aggregate",
                        agg.source
                    ),
                ));
            }
            if !self.privacy.dimensions.contains(&field) {
                return Err(invalid(
                    key,
                    format!(
                        "{field:?} is not in privacy.dimensions: an aggregate over private category {:?} groups only by origin, time buckets and the fields listed there",
                        agg.source
                    ),
                ));
            }
        }
        Ok(())
    }

    /// SHA-256 of the canonical encoding: equal for equal policies, whatever
    /// the file's formatting or key order.
    pub fn digest(&self) -> [u8; 32] {
        // Encoding plain data with BTreeMaps cannot fail.
        let bytes = codec::encode_stored(self).unwrap_or_default();
        Sha256::digest(&bytes).into()
    }

    /// The digest as lowercase hex.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest())
    }

    /// Whether items of `category` travel upward: a declared `up` category,
    /// or the reserved categories of private aggregates' counters and of the
    /// conflict ledger.
    pub fn replicates_up(&self, category: &str) -> bool {
        category == crate::aggregate::COUNTERS_CATEGORY
            || category == crate::conflict::CONFLICTS_CATEGORY
            || self
                .categories
                .get(category)
                .is_some_and(|c| c.replicate == Replicate::Up)
    }

    /// Looks a category up.
    pub fn category(&self, name: &str) -> Result<&Category, PolicyError> {
        self.categories
            .get(name)
            .ok_or_else(|| PolicyError::UnknownCategory(name.to_string()))
    }

    /// Checks an item key: not empty, not too long, no control characters.
    pub fn check_key(&self, key: &str) -> Result<(), PolicyError> {
        if key.is_empty() {
            return Err(PolicyError::BadKey("the key is empty".into()));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(PolicyError::BadKey(format!(
                "the key is {} bytes, over the limit of {}",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        if let Some(c) = key.chars().find(|c| c.is_control()) {
            return Err(PolicyError::BadKey(format!(
                "the key contains the control character {:?}",
                c
            )));
        }
        Ok(())
    }

    /// Checks a document's shape: field count and field names.
    pub fn check_fields<'a>(
        &self,
        names: impl ExactSizeIterator<Item = &'a String>,
    ) -> Result<(), PolicyError> {
        if names.len() > self.limits.max_fields {
            return Err(PolicyError::BadDocument(format!(
                "{} fields, over the limit of {}",
                names.len(),
                self.limits.max_fields
            )));
        }
        for n in names {
            check_field_name(n).map_err(PolicyError::BadDocument)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let mut categories = BTreeMap::new();
        categories.insert(
            "customer".to_string(),
            Category {
                kind: Kind::Record,
                replicate: Replicate::Up,
                customer_link: None,
                description: String::new(),
            },
        );
        Policy {
            limits: Limits::default(),
            privacy: Privacy::default(),
            categories,
            aggregates: BTreeMap::new(),
        }
    }

    /// Case 6 of issue 15: only allowed dimensions group a private
    /// aggregate; the customer link never does.
    #[test]
    fn private_aggregates_group_only_by_allowed_dimensions() {
        let mut p = policy();
        p.categories.insert(
            "opportunity".into(),
            Category {
                kind: Kind::Record,
                replicate: Replicate::Local,
                customer_link: Some(CustomerLink::Field("customer_id".into())),
                description: String::new(),
            },
        );
        let with = |group_by: &[&str]| {
            let mut p = p.clone();
            p.aggregates.insert(
                "opp".into(),
                AggregateDef {
                    source: "opportunity".into(),
                    group_by: group_by.iter().map(|s| s.to_string()).collect(),
                    measures: vec!["count".into()],
                    description: String::new(),
                },
            );
            p
        };
        assert_eq!(
            with(&["origin", "month(expected_close)"]).validate(),
            Ok(())
        );
        let err = with(&["origin", "stage"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("aggregates.opp.group_by[1]:") && err.contains("privacy.dimensions"),
            "{err}"
        );
        let mut allowed = with(&["origin", "stage"]);
        allowed.privacy.dimensions = vec!["stage".into(), "customer_id".into()];
        assert_eq!(allowed.validate(), Ok(()));
        for by in ["customer_id", "year(customer_id)"] {
            let mut p = with(&[by]);
            p.privacy = allowed.privacy.clone();
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains("customer link"), "{by}: {err}");
        }
        // A shared category's aggregate is not restricted.
        let mut shared = with(&["stage"]);
        shared.categories.get_mut("opportunity").unwrap().replicate = Replicate::Up;
        assert_eq!(shared.validate(), Ok(()));
    }

    #[test]
    fn default_limits_validate() {
        assert_eq!(policy().validate(), Ok(()));
    }

    #[test]
    fn aggregate_errors_name_the_key() {
        let mut p = policy();
        p.aggregates.insert(
            "by_city".into(),
            AggregateDef {
                source: "customer".into(),
                group_by: vec!["origin".into(), "week(created)".into()],
                measures: vec!["count".into()],
                description: String::new(),
            },
        );
        let err = p.validate().unwrap_err().to_string();
        assert!(err.starts_with("aggregates.by_city.group_by[1]:"), "{err}");
        p.aggregates.get_mut("by_city").unwrap().group_by.pop();
        p.aggregates.get_mut("by_city").unwrap().source = "nope".into();
        let err = p.validate().unwrap_err().to_string();
        assert!(err.starts_with("aggregates.by_city.source:"), "{err}");
    }

    #[test]
    fn parses_dimensions_and_measures() {
        assert_eq!(Dimension::parse("origin"), Ok(Dimension::Origin));
        assert_eq!(
            Dimension::parse("month(billed_at)"),
            Ok(Dimension::Bucket(TimeBucket::Month, "billed_at".into()))
        );
        assert_eq!(
            Dimension::parse("segment"),
            Ok(Dimension::Field("segment".into()))
        );
        assert_eq!(
            Measure::parse("sum(amount)"),
            Ok(Measure::Sum("amount".into()))
        );
        assert!(Measure::parse("avg(amount)").is_err());
    }

    #[test]
    fn keys_are_checked() {
        let p = policy();
        assert!(p.check_key("c-1/2024").is_ok());
        assert!(p.check_key("").is_err());
        assert!(p.check_key("a\nb").is_err());
        assert!(p.check_key(&"k".repeat(257)).is_err());
    }

    #[test]
    fn digest_depends_on_content() {
        let a = policy();
        let mut b = policy();
        assert_eq!(a.digest(), b.digest());
        b.categories.get_mut("customer").unwrap().replicate = Replicate::Local;
        assert_ne!(a.digest(), b.digest());
    }
}
