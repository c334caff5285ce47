//! `GET /v1/conflicts` for the typed client.

use serde_json::Value as Json;

use super::{Client, ClientError, encode_component};

/// Query of the conflict ledger (`GET /v1/conflicts`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictQuery {
    /// Only this category.
    pub category: Option<String>,
    /// Only conflicts in which this node wrote the losing or the current version.
    pub origin: Option<String>,
    /// Start after this entry id (the `next` of the previous page).
    pub after: Option<String>,
    /// Page size, 1 to 1000 (the node's default is 100).
    pub limit: Option<usize>,
}

impl Client {
    /// `GET /v1/conflicts?category=&origin=&after=&limit=`: one page of the
    /// conflict ledger, with the overwrite summaries.
    pub fn conflicts(&self, q: &ConflictQuery) -> Result<Json, ClientError> {
        let limit = q.limit.map(|l| l.to_string());
        let params: Vec<String> = [
            ("category", q.category.as_deref()),
            ("origin", q.origin.as_deref()),
            ("after", q.after.as_deref()),
            ("limit", limit.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode_component(v))))
        .collect();
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
        self.get_json(&format!("/v1/conflicts{query}"))
    }
}
