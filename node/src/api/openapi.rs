//! The OpenAPI document as strict as the API: what the annotations cannot
//! say is added here, from the node's policy, so a request that is valid by
//! the schema is one the node accepts (a property-based tester such as
//! schemathesis then finds no request "valid by schema, rejected").
//!
//! - `category` path parameters: an `enum` of the declared categories (of
//!   `record` categories for PATCH and DELETE);
//! - keys and customer ids: `minLength` 1, no control characters (C0, DEL,
//!   C1), not `.` or `..` (a client cannot send those as a path segment),
//!   and a `maxLength` in characters that every key of `max_key_bytes` UTF-8
//!   bytes fits (4 bytes per character at most) — so a longer key of
//!   single-byte characters, which the API takes, is outside the schema;
//! - documents: field names as the policy allows them (no control
//!   characters or parentheses, at most 128 bytes: 32 characters), at most
//!   `max_fields`; a PATCH at least one;
//! - `/v1/aggregates/{name}`: one path per declared aggregate, its
//!   `group_by` and `filter` patterns made of that aggregate's dimensions,
//!   `drill` only where it has an origin dimension, CSV documented;
//! - `format`: `json` or `csv`; the NDJSON bulk body: optional (an empty
//!   body is an empty import), a string of lines.

use serde_json::{Map, Value as Json, json};
use tiersync_protocol::aggregate::Compiled;
use tiersync_protocol::policy::Dimension;
use tiersync_protocol::{Kind, Policy};
use utoipa::OpenApi;

use super::ApiDoc;

/// The path parameters that hold a key or a customer id.
const KEY_PARAMS: &[&str] = &["key", "id"];

/// The `group_by` value a comma-separated list of the aggregate's dimensions
/// (and `child` with an origin dimension) matches; `filter`,
/// `dimension:value` pairs.
fn dimension_patterns(agg: &Compiled) -> (String, String) {
    let names: Vec<String> = agg.dim_names.iter().map(|d| regex_escape(d)).collect();
    let dims = names.join("|");
    let with_child = if agg.dims.contains(&Dimension::Origin) {
        format!("{dims}|child")
    } else {
        dims.clone()
    };
    (
        format!("^((?:{with_child})(?:,(?:{with_child}))*)?$"),
        format!("^((?:{dims}):[^,:]*(?:,(?:{dims}):[^,:]*)*)?$"),
    )
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\^$.|?*+()[]{}".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// One path per declared aggregate in place of `/v1/aggregates/{name}`.
fn concrete_aggregates(paths: &mut Map<String, Json>, aggregates: &[Compiled]) {
    let Some(template) = paths.remove("/v1/aggregates/{name}") else {
        return;
    };
    for agg in aggregates {
        let mut item = template.clone();
        if let Some(op) = item.get_mut("get") {
            let (group_by, filter) = dimension_patterns(agg);
            let has_origin = agg.dims.contains(&Dimension::Origin);
            if let Some(params) = op.get_mut("parameters").and_then(Json::as_array_mut) {
                params.retain(|p| p["name"] != "name" && (has_origin || p["name"] != "drill"));
                for p in params.iter_mut() {
                    let schema = match p["name"].as_str() {
                        Some("group_by") => json!({"type": "string", "pattern": group_by}),
                        Some("filter") => json!({"type": "string", "pattern": filter}),
                        _ => continue,
                    };
                    p["schema"] = schema;
                }
            }
            if let Some(ok) = op.pointer_mut("/responses/200/content")
                && let Some(content) = ok.as_object_mut()
            {
                content.insert("text/csv".into(), json!({"schema": {"type": "string"}}));
            }
        }
        paths.insert(format!("/v1/aggregates/{}", agg.name), item);
    }
}

/// Routes without credentials (liveness and readiness probes).
const PROBES: [&str; 2] = ["/healthz", "/readyz"];

/// What any route may answer besides its own responses: the guards' refusals
/// (`api/auth.rs`, `api/guards.rs`) before the handler runs. A probe needs no
/// credentials, which the document says with an empty `security`.
fn common_responses(op: &mut Json, probe: bool) {
    if probe {
        op["security"] = json!([]);
        return;
    }
    let writes = op.get("requestBody").is_some();
    let Some(responses) = op.get_mut("responses").and_then(Json::as_object_mut) else {
        return;
    };
    let error = |why: &str| {
        json!({
            "description": why,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        })
    };
    let mut common = vec![
        ("401", "unauthorized: no valid bearer token"),
        (
            "403",
            "forbidden: the token's role or categories do not allow this",
        ),
        (
            "408",
            "request_timeout: the request took longer than the node allows",
        ),
        ("421", "wrong_host: the Host header names another server"),
        (
            "429",
            "rate_limited: this token sent too many requests; retry after Retry-After",
        ),
    ];
    if writes {
        common.push((
            "415",
            "unsupported_media_type: a write needs a JSON or NDJSON Content-Type",
        ));
    }
    for (code, why) in common {
        responses.entry(code).or_insert_with(|| error(why));
    }
}

/// The document served by `GET /v1/openapi.json` for `policy` and its
/// compiled `aggregates`.
pub fn document(policy: &Policy, aggregates: &[Compiled]) -> Json {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    let all: Vec<&str> = policy.categories.keys().map(String::as_str).collect();
    let records: Vec<&str> = policy
        .categories
        .iter()
        .filter(|(_, c)| c.kind == Kind::Record)
        .map(|(n, _)| n.as_str())
        .collect();
    let max_chars = (policy.limits.max_key_bytes / 4).max(1);
    let key_schema = json!({
        "type": "string",
        "minLength": 1,
        "maxLength": max_chars,
        "pattern": "^(?!\\.\\.?$)[^\\u0000-\\u001f\\u007f-\\u009f]+$",
    });
    let document_schema = |min: usize| {
        json!({
            "type": "object",
            "minProperties": min,
            "maxProperties": policy.limits.max_fields,
            "propertyNames": {
                "minLength": 1,
                "maxLength": 32,
                "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f()]+$",
            },
        })
    };
    let Some(paths) = doc.get_mut("paths").and_then(Json::as_object_mut) else {
        return doc;
    };
    concrete_aggregates(paths, aggregates);
    for (path, item) in paths.iter_mut() {
        let probe = PROBES.contains(&path.as_str());
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            common_responses(op, probe);
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
                    (n, true) if KEY_PARAMS.contains(&n) => key_schema.clone(),
                    ("format", false) => json!({"type": "string", "enum": ["json", "csv"]}),
                    _ => continue,
                };
                param["schema"] = schema;
            }
            if let Some(schema) = op.pointer_mut("/requestBody/content/application~1json/schema") {
                *schema = document_schema(usize::from(method == "patch"));
            }
            if let Some(schema) =
                op.pointer_mut("/requestBody/content/application~1x-ndjson/schema")
            {
                *schema = json!({
                    "type": "string",
                    "description": "Lines of {\"key\": string, \"fields\": object}, one JSON object per line; blank lines are skipped",
                });
                if let Some(body) = op.get_mut("requestBody") {
                    body["required"] = json!(false);
                }
            }
        }
    }
    doc
}
