//! Aggregates: `GET /v1/aggregates` and `GET /v1/aggregates/{name}`.
//!
//! Rows come from the aggregate state the store keeps incrementally (or, for
//! private categories, the counters that travelled up); a query never scans
//! source data. Re-grouping to fewer dimensions, filters and drill-down are
//! applied to those rows here.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tiersync_protocol::NodeId;
use tiersync_protocol::aggregate::{Compiled, GroupKey, SCALE};
use tiersync_protocol::policy::{Dimension, Measure, Replicate};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::{ApiError, ApiPath, ApiQuery, ApiState, blocking};

/// The query-time column `child`: the child of this node through which a
/// row's origin replicates (at national: the province).
const CHILD_COLUMN: &str = "child";

/// An aggregate as the policy declares it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AggregateInfo {
    /// Its name.
    pub name: String,
    /// The category it follows.
    pub source: String,
    /// `up` (computed from the merged items here) or `local` (the sum of
    /// the counters of every node below that wrote such items).
    pub replicate: String,
    /// Dimensions.
    pub group_by: Vec<String>,
    /// Measures.
    pub measures: Vec<String>,
    /// Free text.
    pub description: String,
}

/// List the aggregates of the policy.
#[utoipa::path(get, path = "/v1/aggregates", tag = "aggregates",
    responses((status = 200, description = "The declared aggregates", body = Vec<AggregateInfo>)))]
pub async fn list(State(st): State<ApiState>) -> Json<Vec<AggregateInfo>> {
    let policy = st.store.policy();
    Json(
        st.store
            .aggregates()
            .iter()
            .map(|a| AggregateInfo {
                name: a.name.clone(),
                source: a.source.clone(),
                replicate: match policy.categories.get(&a.source).map(|c| c.replicate) {
                    Some(Replicate::Local) => "local",
                    _ => "up",
                }
                .to_string(),
                group_by: a.dim_names.clone(),
                measures: a.measure_names.clone(),
                description: policy
                    .aggregates
                    .get(&a.name)
                    .map(|d| d.description.clone())
                    .unwrap_or_default(),
            })
            .collect(),
    )
}

/// Query parameters of an aggregate.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AggregateQuery {
    /// Comma-separated dimensions to group by (a subset of the aggregate's,
    /// plus `child`: the child of this node each row's origin replicates
    /// through, e.g. the province at national; default: all). `group_by=`
    /// (empty) gives one total row.
    group_by: Option<String>,
    /// Comma-separated `dimension:value` filters, e.g. `origin:hangzhou,month(billed_at):2026-09`.
    filter: Option<String>,
    /// A child of this node: only rows whose origin is that child or below it.
    drill: Option<String>,
    /// `json` (default) or `csv` (also chosen by `Accept: text/csv`).
    format: Option<String>,
}

/// One row.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AggregateRow {
    /// Dimension → value (`null` when items have none).
    #[schema(value_type = Object)]
    pub group: BTreeMap<String, Option<String>>,
    /// Measure → value.
    #[schema(value_type = Object)]
    pub values: BTreeMap<String, serde_json::Value>,
}

/// The rows of an aggregate.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AggregateResult {
    /// The aggregate.
    pub aggregate: String,
    /// The dimensions of the rows.
    pub group_by: Vec<String>,
    /// The measures of the rows.
    pub measures: Vec<String>,
    /// Rows in group order.
    pub rows: Vec<AggregateRow>,
}

fn measure_json(m: &Measure, v: i128) -> serde_json::Value {
    match m {
        Measure::Count => serde_json::json!(i64::try_from(v).unwrap_or(i64::MAX)),
        // Fixed point to decimal: exact to 10^-6, printed as a number.
        Measure::Sum(_) => serde_json::json!(v as f64 / SCALE as f64),
    }
}

/// Rows of an aggregate, re-grouped, filtered and drilled.
#[utoipa::path(get, path = "/v1/aggregates/{name}", tag = "aggregates",
    params(("name" = String, Path, description = "An aggregate declared in the policy"), AggregateQuery),
    responses(
        (status = 200, description = "Rows (JSON, or CSV with format=csv / Accept: text/csv)", body = AggregateResult),
        (status = 400, description = "invalid_query", body = ErrorBody),
        (status = 404, description = "unknown_aggregate; not_found (drill names no node below this one)", body = ErrorBody),
    ))]
pub async fn query(
    State(st): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<AggregateQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let agg = st
        .store
        .aggregates()
        .iter()
        .find(|a| a.name == name)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "unknown_aggregate",
                format!("no aggregate named {name:?} is declared"),
            )
        })?;
    // Columns to keep: a dimension of the aggregate, or `None` for the
    // `child` column (the child of this node its origin's data comes through).
    let keep: Vec<Option<usize>> = match &q.group_by {
        None => (0..agg.dims.len()).map(Some).collect(),
        Some(s) if s.trim().is_empty() => Vec::new(),
        Some(s) => s
            .split(',')
            .map(|d| match d.trim() {
                CHILD_COLUMN if !agg.dim_names.iter().any(|n| n == CHILD_COLUMN) => Ok(None),
                d => dim_index(&agg, d).map(Some),
            })
            .collect::<Result<_, _>>()?,
    };
    let mut filters: Vec<(usize, String)> = Vec::new();
    for f in q
        .filter
        .iter()
        .flat_map(|f| f.split(','))
        .filter(|f| !f.trim().is_empty())
    {
        let (d, v) = f.rsplit_once(':').ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("filter {f:?} is not dimension:value"),
            )
        })?;
        filters.push((dim_index(&agg, d.trim())?, v.trim().to_string()));
    }
    let origin_dim = agg.dims.iter().position(|d| *d == Dimension::Origin);
    if origin_dim.is_none() && keep.iter().any(Option::is_none) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("{name} has no origin dimension, so rows cannot be grouped by child"),
        ));
    }
    let store = st.store.clone();
    let me = st.node_id.clone();
    let def = agg.clone();
    let me_id = st.node_id.clone();
    let drill = q.drill.clone();
    let (rows, relay, drill_known) = blocking(move || {
        let rows = store.aggregate_rows(&def)?;
        // A node is below this one once data from it arrived here: the
        // parent records which child relays each origin.
        let drill_known = match drill.map(NodeId::new) {
            Some(Ok(id)) if id != me_id => store.relay_of(&id)?.is_some(),
            Some(_) => false,
            None => true,
        };
        // Which child each origin's data arrives through (for drill and `child`).
        let mut relay: BTreeMap<String, String> = BTreeMap::new();
        for (g, _) in &rows {
            if let Some(Some(o)) = origin_dim.map(|i| &g[i]) {
                if relay.contains_key(o) {
                    continue;
                }
                let via = match NodeId::new(o.clone()) {
                    Ok(id) if id == me_id => Some(o.clone()),
                    Ok(id) => store.relay_of(&id)?.map(|r| r.to_string()),
                    Err(_) => None,
                };
                if let Some(v) = via {
                    relay.insert(o.clone(), v);
                }
            }
        }
        Ok((rows, relay, drill_known))
    })
    .await?;
    if let Some(child) = &q.drill {
        if origin_dim.is_none() {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("{name} has no origin dimension to drill down by"),
            ));
        }
        if !drill_known {
            return Err(ApiError::not_found(format!(
                "{child:?} is not a node below {me} (no data from it has reached {me})"
            )));
        }
    }
    let mut grouped: BTreeMap<GroupKey, Vec<i128>> = BTreeMap::new();
    for (group, values) in rows {
        if filters
            .iter()
            .any(|(i, v)| group[*i].as_deref() != Some(v.as_str()))
        {
            continue;
        }
        let via = origin_dim
            .and_then(|i| group[i].as_ref())
            .and_then(|o| relay.get(o));
        if let Some(child) = &q.drill {
            let origin = origin_dim.and_then(|i| group[i].as_ref());
            if origin != Some(child) && via != Some(child) {
                continue;
            }
        }
        if values.iter().all(|v| *v == 0) {
            continue; // a group whose items are all gone
        }
        let key: GroupKey = keep
            .iter()
            .map(|k| match k {
                Some(i) => group[*i].clone(),
                None => via.cloned(),
            })
            .collect();
        let acc = grouped.entry(key).or_insert_with(|| vec![0; values.len()]);
        for (a, b) in acc.iter_mut().zip(&values) {
            *a = a.checked_add(*b).ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "aggregate_overflow",
                    format!(
                        "aggregate {}: a total of this query would overflow",
                        agg.name
                    ),
                )
            })?;
        }
    }
    let group_by: Vec<String> = keep
        .iter()
        .map(|k| k.map_or_else(|| CHILD_COLUMN.to_string(), |i| agg.dim_names[i].clone()))
        .collect();
    let result = AggregateResult {
        aggregate: agg.name.clone(),
        group_by: group_by.clone(),
        measures: agg.measure_names.clone(),
        rows: grouped
            .into_iter()
            .map(|(g, v)| AggregateRow {
                group: group_by.iter().cloned().zip(g).collect(),
                values: agg
                    .measure_names
                    .iter()
                    .cloned()
                    .zip(
                        agg.measures
                            .iter()
                            .zip(&v)
                            .map(|(m, v)| measure_json(m, *v)),
                    )
                    .collect(),
            })
            .collect(),
    };
    let wants_csv = q.format.as_deref() == Some("csv")
        || headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("text/csv"));
    match q.format.as_deref() {
        None | Some("json") | Some("csv") => {}
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("format {other:?}: expected json or csv"),
            ));
        }
    }
    if wants_csv {
        return Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            to_csv(&result),
        )
            .into_response());
    }
    Ok(Json(result).into_response())
}

fn dim_index(agg: &Compiled, d: &str) -> Result<usize, ApiError> {
    agg.dim_names.iter().position(|n| n == d).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{d:?} is not a dimension of {} (dimensions: {})",
                agg.name,
                agg.dim_names.join(", ")
            ),
        )
    })
}

/// The rows as CSV: one column per dimension, then per measure.
pub fn to_csv(r: &AggregateResult) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    let header: Vec<&str> = r
        .group_by
        .iter()
        .chain(&r.measures)
        .map(String::as_str)
        .collect();
    let _ = w.write_record(&header);
    for row in &r.rows {
        let mut rec: Vec<String> = r
            .group_by
            .iter()
            .map(|g| row.group.get(g).cloned().flatten().unwrap_or_default())
            .collect();
        rec.extend(
            r.measures
                .iter()
                .map(|m| row.values.get(m).map(|v| v.to_string()).unwrap_or_default()),
        );
        let _ = w.write_record(&rec);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}
