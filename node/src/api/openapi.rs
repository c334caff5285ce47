//! The OpenAPI document as strict as the API: what the annotations cannot
//! say is added here, from the node's policy, so a request that is valid by
//! the schema is one the node accepts (a property-based tester such as
//! schemathesis then finds no request "valid by schema, rejected").
//!
//! - `category` path parameters: an `enum` of the declared categories (of
//!   `record` categories for PATCH and DELETE); `name`: of the aggregates;
//! - keys and customer ids: `minLength` 1, no control characters, not `.`
//!   or `..` (a client cannot send those as a path segment), and a
//!   `maxLength` in characters that every key of `max_key_bytes` UTF-8 bytes
//!   fits (4 bytes per character at most);
//! - `format`: `json` or `csv`; a PATCH body: `minProperties: 1`; the NDJSON
//!   bulk body: a string of lines, each described.

use serde_json::{Value as Json, json};
use tiersync_protocol::{Kind, Policy};
use utoipa::OpenApi;

use super::ApiDoc;

/// The path parameters that hold a key or a customer id.
const KEY_PARAMS: &[&str] = &["key", "id"];

/// The document served by `GET /v1/openapi.json` for `policy`.
pub fn document(policy: &Policy) -> Json {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    let all: Vec<&str> = policy.categories.keys().map(String::as_str).collect();
    let records: Vec<&str> = policy
        .categories
        .iter()
        .filter(|(_, c)| c.kind == Kind::Record)
        .map(|(n, _)| n.as_str())
        .collect();
    let aggregates: Vec<&str> = policy.aggregates.keys().map(String::as_str).collect();
    let max_chars = (policy.limits.max_key_bytes / 4).max(1);
    let key_schema = json!({
        "type": "string",
        "minLength": 1,
        "maxLength": max_chars,
        "pattern": "^(?!\\.\\.?$)[^\\u0000-\\u001f\\u007f]+$",
    });
    let Some(paths) = doc.get_mut("paths").and_then(Json::as_object_mut) else {
        return doc;
    };
    for (path, item) in paths.iter_mut() {
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            let categories = if matches!(method.as_str(), "patch" | "delete") {
                &records
            } else {
                &all
            };
            for param in op
                .get_mut("parameters")
                .and_then(Json::as_array_mut)
                .into_iter()
                .flatten()
            {
                let name = param["name"].as_str().unwrap_or("").to_string();
                let in_path = param["in"] == "path";
                let schema = match (name.as_str(), in_path) {
                    ("category", true) => json!({"type": "string", "enum": categories}),
                    ("name", true) if path.starts_with("/v1/aggregates/") => {
                        json!({"type": "string", "enum": aggregates})
                    }
                    (n, true) if KEY_PARAMS.contains(&n) => key_schema.clone(),
                    ("format", false) => json!({"type": "string", "enum": ["json", "csv"]}),
                    _ => continue,
                };
                param["schema"] = schema;
            }
            if method == "patch"
                && let Some(schema) =
                    op.pointer_mut("/requestBody/content/application~1json/schema")
            {
                *schema = json!({"type": "object", "minProperties": 1});
            }
            if let Some(schema) =
                op.pointer_mut("/requestBody/content/application~1x-ndjson/schema")
            {
                *schema = json!({
                    "type": "string",
                    "description": "Lines of {\"key\": string, \"fields\": object}, one JSON object per line; blank lines are skipped",
                });
            }
        }
    }
    doc
}
