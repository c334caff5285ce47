//! Conversions between JSON (the local API's format) and the protocol's values.
//!
//! * JSON → [`Value`]: `true`/`false` → `Bool`; a number that fits `i64` →
//!   `Int`; any other number → `Float` (so `2^63` or `1.5`); a string →
//!   `Str`; an object or array → `Json` holding its *canonical* text (object
//!   members sorted by name at every depth, no whitespace), so equal JSON is
//!   an equal value whatever the client's key order. `null` is not a value:
//!   in a PATCH it removes the field ([`patch_from_json`]); in a PUT, an
//!   append or a bulk line a `null` field is simply absent from the document
//!   ([`document_from_json`]), which is what a PUT does to fields it omits.
//! * [`Value`] → JSON: the inverse; `Json` text is parsed back into JSON, so a
//!   nested object round-trips (with sorted keys). A non-finite `Float`
//!   (impossible from JSON; only a forged frame could carry one) becomes
//!   `null`.
//! * [`Item`] → [`ItemView`], the document view the API returns: the visible
//!   fields plus, under `meta`, the origin node and time of each field's
//!   current value (see [`ItemView`] for the shape).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Number, Value as Json};
use tiersync_protocol::item::Base;
use tiersync_protocol::{Item, Stamp, Value};
use utoipa::ToSchema;

/// Why a request body is not an acceptable JSON document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The bytes are not JSON (or not UTF-8).
    #[error("invalid JSON: {0}")]
    Syntax(String),
    /// The JSON is valid but not an object where an object is required.
    #[error("the {what} must be a JSON object, not {found}")]
    NotAnObject {
        /// What was expected to be an object ("document", "fields", ...).
        what: &'static str,
        /// The JSON type found instead.
        found: &'static str,
    },
}

/// The name of a JSON value's type, for error messages.
pub fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Parses `bytes` as one JSON object (`what` names it in errors).
pub fn parse_object(bytes: &[u8], what: &'static str) -> Result<Map<String, Json>, JsonError> {
    let v: Json = serde_json::from_slice(bytes).map_err(|e| JsonError::Syntax(e.to_string()))?;
    into_object(v, what)
}

/// Takes the object out of `v`, or says what `v` is instead.
pub fn into_object(v: Json, what: &'static str) -> Result<Map<String, Json>, JsonError> {
    match v {
        Json::Object(m) => Ok(m),
        other => Err(JsonError::NotAnObject {
            what,
            found: type_name(&other),
        }),
    }
}

/// Canonical JSON text: object members sorted by name at every depth, no
/// insignificant whitespace.
pub fn canonical_json(v: &Json) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Json, out: &mut String) {
    match v {
        Json::Object(m) => {
            let mut members: Vec<(&String, &Json)> = m.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Json::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A JSON value as a field value; `None` for `null` (a removal in a PATCH,
/// an absent field elsewhere).
pub fn value_from_json(v: &Json) -> Option<Value> {
    Some(match v {
        Json::Null => return None,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(_) | Json::Object(_) => Value::Json(canonical_json(v)),
    })
}

/// A field value as JSON.
pub fn value_to_json(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::Number((*i).into()),
        Value::Float(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.clone()),
        // Stored text always came from `canonical_json`; anything else (a
        // forged frame) is shown as the string it is rather than dropped.
        Value::Json(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.clone()))
        }
    }
}

/// A whole document for PUT, append and bulk lines: `null` fields are left
/// out (a PUT removes every field it does not carry).
pub fn document_from_json(obj: &Map<String, Json>) -> BTreeMap<String, Value> {
    obj.iter()
        .filter_map(|(k, v)| value_from_json(v).map(|v| (k.clone(), v)))
        .collect()
}

/// A PATCH: every member is set, `null` members are removed.
pub fn patch_from_json(obj: &Map<String, Json>) -> BTreeMap<String, Option<Value>> {
    obj.iter()
        .map(|(k, v)| (k.clone(), value_from_json(v)))
        .collect()
}

/// Fields as a JSON object.
pub fn fields_to_json<'a>(
    fields: impl IntoIterator<Item = (&'a str, &'a Value)>,
) -> Map<String, Json> {
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), value_to_json(v)))
        .collect()
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds,
/// e.g. `2024-04-05T19:34:38.901Z`.
pub fn format_time_ms(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let rem = ms % 86_400_000;
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// When and where a value was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct StampView {
    /// The node that accepted the write from a client (for HQ: the city).
    #[schema(example = "hangzhou")]
    pub origin: String,
    /// The hybrid logical clock, `physical_ms.logical`; with `origin` it
    /// orders every write of the deployment.
    #[schema(example = "1712345678901.0")]
    pub hlc: String,
    /// The HLC's physical part as RFC 3339 UTC.
    #[schema(example = "2024-04-05T19:34:38.901Z")]
    pub time: String,
}

impl From<&Stamp> for StampView {
    fn from(s: &Stamp) -> Self {
        StampView {
            origin: s.origin.to_string(),
            hlc: s.hlc.to_string(),
            time: format_time_ms(s.hlc.physical_ms),
        }
    }
}

/// The last whole-document operation on a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BaseView {
    /// `put` or `delete`.
    #[schema(example = "put")]
    pub op: String,
    /// When and where it happened.
    #[serde(flatten)]
    pub stamp: StampView,
}

/// Attribution of an item's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ItemMeta {
    /// The newest stamp in the item: the last change to a record, or the
    /// append of a log entry.
    pub updated: Option<StampView>,
    /// Records only: the last PUT or DELETE (absent if the record was only
    /// ever PATCHed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseView>,
    /// For each visible field, when and where its current value was written.
    /// Every field of a log entry carries the entry's stamp.
    pub fields: BTreeMap<String, StampView>,
}

/// An item as the API shows it.
///
/// ```json
/// {"category": "customer", "key": "c-42", "kind": "record", "deleted": false,
///  "fields": {"name": "Li Lei", "segment": "gold"},
///  "meta": {"updated": {"origin": "hangzhou", "hlc": "1712345678901.0", "time": "2024-04-05T19:34:38.901Z"},
///           "base": {"op": "put", "origin": "hangzhou", "hlc": "1712345678900.0", "time": "…"},
///           "fields": {"name": {"origin": "hangzhou", …}, "segment": {"origin": "hangzhou", …}}}}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ItemView {
    /// The category.
    pub category: String,
    /// The key.
    pub key: String,
    /// `record` or `log`.
    #[schema(example = "record")]
    pub kind: String,
    /// A deleted record (a tombstone). The endpoints never return one today:
    /// GET answers 404 and scans leave them out.
    pub deleted: bool,
    /// The visible document.
    #[schema(value_type = Object)]
    pub fields: Map<String, Json>,
    /// Who wrote what, when.
    pub meta: ItemMeta,
}

/// The API view of `item`.
pub fn item_view(category: &str, key: &str, item: &Item) -> ItemView {
    match item {
        Item::Record(r) => {
            let doc = r.document();
            let field_stamps: BTreeMap<String, StampView> = r
                .fields()
                .filter(|(_, v, _)| v.is_some())
                .map(|(k, _, s)| (k.to_string(), StampView::from(s)))
                .collect();
            let (base, base_stamp) = r.base();
            let base = match base {
                Base::Empty => None,
                Base::Put => Some("put"),
                Base::Deleted => Some("delete"),
            }
            .map(|op| BaseView {
                op: op.to_string(),
                stamp: base_stamp.into(),
            });
            ItemView {
                category: category.to_string(),
                key: key.to_string(),
                kind: "record".to_string(),
                deleted: r.is_deleted(),
                fields: fields_to_json(doc),
                meta: ItemMeta {
                    updated: item.max_stamp().map(StampView::from),
                    base,
                    fields: field_stamps,
                },
            }
        }
        Item::Log(l) => {
            let stamp = StampView::from(&l.stamp);
            ItemView {
                category: category.to_string(),
                key: key.to_string(),
                kind: "log".to_string(),
                deleted: false,
                fields: fields_to_json(l.fields.iter().map(|(k, v)| (k.as_str(), v))),
                meta: ItemMeta {
                    updated: Some(stamp.clone()),
                    base: None,
                    fields: l
                        .fields
                        .keys()
                        .map(|k| (k.clone(), stamp.clone()))
                        .collect(),
                },
            }
        }
        Item::Counters(c) => {
            let mut fields = Map::new();
            fields.insert("aggregate".into(), Json::String(c.aggregate.clone()));
            fields.insert("group".into(), serde_json::json!(c.group));
            fields.insert(
                "values".into(),
                serde_json::json!(c.values().iter().map(|v| v.to_string()).collect::<Vec<_>>()),
            );
            ItemView {
                category: category.to_string(),
                key: key.to_string(),
                kind: "counters".to_string(),
                deleted: false,
                fields,
                meta: ItemMeta {
                    updated: None,
                    base: None,
                    fields: BTreeMap::new(),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;
    use tiersync_protocol::{Hlc, LogEntry, NodeId, Record};

    use super::*;

    fn stamp(ms: u64, node: &str) -> Stamp {
        Stamp {
            hlc: Hlc {
                physical_ms: ms,
                logical: 3,
            },
            origin: NodeId::new(node).unwrap(),
        }
    }

    #[test]
    fn scalars_map_to_values() {
        assert_eq!(value_from_json(&json!(true)), Some(Value::Bool(true)));
        assert_eq!(value_from_json(&json!(-7)), Some(Value::Int(-7)));
        assert_eq!(value_from_json(&json!(1.5)), Some(Value::Float(1.5)));
        // Beyond i64: a float, not an error.
        assert_eq!(
            value_from_json(&json!(u64::MAX)),
            Some(Value::Float(u64::MAX as f64))
        );
        assert_eq!(value_from_json(&json!("x")), Some(Value::Str("x".into())));
        assert_eq!(value_from_json(&Json::Null), None);
    }

    #[test]
    fn nested_json_is_canonical() {
        let a: Json = serde_json::from_str(r#"{"b": [1, {"z": 1, "a": 2}], "a": "x"}"#).unwrap();
        let b: Json = serde_json::from_str(r#"{"a":"x","b":[1,{"a":2,"z":1}]}"#).unwrap();
        let va = value_from_json(&a).unwrap();
        assert_eq!(va, value_from_json(&b).unwrap());
        assert_eq!(va, Value::Json(r#"{"a":"x","b":[1,{"a":2,"z":1}]}"#.into()));
        assert_eq!(value_to_json(&va), b);
        assert_eq!(canonical_json(&json!(["\"q\"", null])), r#"["\"q\"",null]"#);
    }

    #[test]
    fn values_round_trip() {
        for v in [
            json!(false),
            json!(42),
            json!(-0.25),
            json!("héllo"),
            json!([1, 2]),
            json!({"k": null}),
        ] {
            assert_eq!(value_to_json(&value_from_json(&v).unwrap()), v);
        }
        assert_eq!(value_to_json(&Value::Float(f64::NAN)), Json::Null);
        assert_eq!(
            value_to_json(&Value::Json("not json".into())),
            json!("not json")
        );
    }

    #[test]
    fn null_is_absent_in_documents_and_a_removal_in_patches() {
        let obj = parse_object(br#"{"a": 1, "b": null}"#, "document").unwrap();
        let doc = document_from_json(&obj);
        assert_eq!(doc.len(), 1);
        assert_eq!(doc["a"], Value::Int(1));
        let patch = patch_from_json(&obj);
        assert_eq!(patch.len(), 2);
        assert_eq!(patch["b"], None);
    }

    #[test]
    fn objects_are_required() {
        assert!(matches!(
            parse_object(b"{", "document"),
            Err(JsonError::Syntax(_))
        ));
        assert!(matches!(
            parse_object(b"\xff", "document"),
            Err(JsonError::Syntax(_))
        ));
        assert_eq!(
            parse_object(b"[1]", "document"),
            Err(JsonError::NotAnObject {
                what: "document",
                found: "an array"
            })
        );
        assert_eq!(
            parse_object(b"null", "fields").unwrap_err().to_string(),
            "the fields must be a JSON object, not null"
        );
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time_ms(1_712_345_678_901),
            "2024-04-05T19:34:38.901Z"
        );
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            format_time_ms(4_107_542_399_999),
            "2100-02-28T23:59:59.999Z"
        );
        // Never panics, whatever a forged stamp says.
        assert!(format_time_ms(u64::MAX).ends_with('Z'));
    }

    #[test]
    fn record_view_attributes_each_field() {
        let mut r = Record::default();
        let mut doc = BTreeMap::new();
        doc.insert("name".to_string(), Value::Str("Li".into()));
        doc.insert("segment".to_string(), Value::Str("gold".into()));
        r.put(doc, stamp(1_000, "city-a"));
        let mut p = BTreeMap::new();
        p.insert("segment".to_string(), Some(Value::Str("silver".into())));
        p.insert("name".to_string(), None);
        r.patch(p, stamp(2_000, "city-b"));
        let v = serde_json::to_value(item_view("customer", "c-1", &Item::Record(r))).unwrap();
        assert_eq!(
            v,
            json!({
                "category": "customer", "key": "c-1", "kind": "record", "deleted": false,
                "fields": {"segment": "silver"},
                "meta": {
                    "updated": {"origin": "city-b", "hlc": "2000.3", "time": "1970-01-01T00:00:02.000Z"},
                    "base": {"op": "put", "origin": "city-a", "hlc": "1000.3", "time": "1970-01-01T00:00:01.000Z"},
                    "fields": {"segment": {"origin": "city-b", "hlc": "2000.3", "time": "1970-01-01T00:00:02.000Z"}}
                }
            })
        );
    }

    #[test]
    fn deleted_and_patch_only_records() {
        let mut r = Record::default();
        let mut p = BTreeMap::new();
        p.insert("a".to_string(), Some(Value::Int(1)));
        r.patch(p, stamp(5, "n"));
        let v = item_view("c", "k", &Item::Record(r.clone()));
        assert!(v.meta.base.is_none());
        assert!(!v.deleted);
        r.delete(stamp(6, "n"));
        let v = item_view("c", "k", &Item::Record(r));
        assert!(v.deleted);
        assert!(v.fields.is_empty());
        assert_eq!(v.meta.base.unwrap().op, "delete");
    }

    #[test]
    fn log_view_carries_the_entry_stamp() {
        let mut fields = BTreeMap::new();
        fields.insert("amount".to_string(), Value::Float(12.5));
        let e = LogEntry {
            fields,
            stamp: stamp(7, "city-a"),
        };
        let v = serde_json::to_value(item_view("billing", "b-1", &Item::Log(e))).unwrap();
        let s = json!({"origin": "city-a", "hlc": "7.3", "time": "1970-01-01T00:00:00.007Z"});
        assert_eq!(
            v,
            json!({
                "category": "billing", "key": "b-1", "kind": "log", "deleted": false,
                "fields": {"amount": 12.5},
                "meta": {"updated": s, "fields": {"amount": s}}
            })
        );
    }
}
