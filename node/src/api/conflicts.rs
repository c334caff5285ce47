//! `GET /v1/conflicts`: the conflict ledger and the overwrite summaries.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue};
use tiersync_protocol::{Item, LogEntry, NodeId};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::records::page_limit;
use super::{ApiQuery, ApiState, blocking};
use crate::json::{StampView, fields_to_json};
use crate::store::{OverwriteExample, OverwriteSummary};

/// Query of `GET /v1/conflicts`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConflictParams {
    /// Only conflicts (log categories) or overwrites (record categories) of this category.
    category: Option<String>,
    /// Only conflicts in which this node wrote the losing or the current version.
    origin: Option<String>,
    /// Start after this entry: the `next` of the previous page.
    after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// One version of a log entry.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct VersionView {
    /// Its content.
    #[schema(value_type = Object)]
    pub fields: Map<String, JsonValue>,
    /// When and where it was appended.
    pub stamp: StampView,
}

impl From<&LogEntry> for VersionView {
    fn from(l: &LogEntry) -> Self {
        VersionView {
            fields: fields_to_json(l.fields.iter().map(|(k, v)| (k.as_str(), v))),
            stamp: (&l.stamp).into(),
        }
    }
}

/// A log key that two nodes wrote with different content.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ConflictView {
    /// The ledger entry's id (pass as `after` to continue after it).
    pub id: String,
    /// The log category.
    pub category: String,
    /// The conflicting key.
    pub key: String,
    /// The version that lost: kept here, counted nowhere.
    pub loser: VersionView,
    /// The version this node holds now, which its aggregates count; `null`
    /// if it holds none yet (the winner is still on its way).
    pub winner: Option<VersionView>,
}

/// One overwritten field value (an example of a summary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct OverwriteExampleView {
    /// The record's key.
    pub key: String,
    /// The field.
    pub field: String,
    /// The value that won.
    pub winner: StampView,
    /// The value it replaced.
    pub loser: StampView,
}

/// Record fields that one origin's newer value took over from another's
/// (normal last-writer-wins, counted at this node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct OverwriteView {
    /// The record category.
    pub category: String,
    /// The origin whose value won.
    pub winner: String,
    /// The origin whose value was replaced.
    pub loser: String,
    /// How many field values were replaced at this node.
    pub count: u64,
    /// The latest few, oldest first.
    pub examples: Vec<OverwriteExampleView>,
}

impl From<&OverwriteSummary> for OverwriteView {
    fn from(s: &OverwriteSummary) -> Self {
        let example = |e: &OverwriteExample| OverwriteExampleView {
            key: e.key.clone(),
            field: e.field.clone(),
            winner: (&e.winner).into(),
            loser: (&e.loser).into(),
        };
        OverwriteView {
            category: s.category.clone(),
            winner: s.winner.to_string(),
            loser: s.loser.to_string(),
            count: s.count,
            examples: s.examples.iter().map(example).collect(),
        }
    }
}

/// A page of the conflict ledger, with the overwrite summaries.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ConflictPage {
    /// Ledger entries in id order (category, then the loser's origin and time).
    pub conflicts: Vec<ConflictView>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
    /// Record-field overwrites between two origins, by category and origin
    /// pair (filtered like the conflicts; not paged).
    pub overwrites: Vec<OverwriteView>,
}

/// The conflict ledger: every losing version of a log key written with
/// different content by two nodes, here or anywhere below this node.
///
/// The winner (the higher stamp) is the item's state, and the version the
/// aggregates count; the loser is kept only here. Entries replicate up like
/// shared data, so national lists every conflict of the country. A page may
/// hold fewer than `limit` entries and still have a `next` (at most 10 000
/// entries are examined per request when filtering by origin).
#[utoipa::path(
    get,
    path = "/v1/conflicts",
    tag = "ops",
    params(ConflictParams),
    responses(
        (status = 200, description = "One page", body = ConflictPage),
        (status = 400, description = "invalid_query", body = ErrorBody),
        (status = 404, description = "unknown_category", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    )
)]
pub async fn list(
    State(st): State<ApiState>,
    ApiQuery(q): ApiQuery<ConflictParams>,
) -> Result<Json<ConflictPage>, ApiError> {
    // Any declared category: log categories have ledger entries, record
    // categories overwrites.
    if let Some(c) = &q.category {
        st.category(c)?;
    }
    if let Some(o) = &q.origin {
        NodeId::new(o)
            .map_err(|e| ApiError::bad_request("invalid_query", format!("origin {o:?}: {e}")))?;
    }
    let limit = page_limit(q.limit)?;
    let store = st.store.clone();
    blocking(move || {
        let page = store.conflicts(
            q.category.as_deref(),
            q.origin.as_deref(),
            q.after.as_deref(),
            limit,
        )?;
        let conflicts = page
            .entries
            .iter()
            .map(|(id, c, current)| ConflictView {
                id: id.clone(),
                category: c.category.clone(),
                key: c.key.clone(),
                loser: (&c.loser).into(),
                winner: match current {
                    Some(Item::Log(l)) => Some(l.into()),
                    _ => None,
                },
            })
            .collect();
        let keep = |s: &&OverwriteSummary| {
            q.category.as_ref().is_none_or(|c| *c == s.category)
                && q.origin
                    .as_ref()
                    .is_none_or(|o| s.winner.as_str() == o || s.loser.as_str() == o)
        };
        let overwrites = store.overwrites()?;
        Ok(Json(ConflictPage {
            conflicts,
            next: page.next,
            overwrites: overwrites.iter().filter(keep).map(Into::into).collect(),
        }))
    })
    .await
}
