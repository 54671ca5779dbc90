//! `GET /v1/kv`: a page of the records stored on this node, in key order. Never forwarded.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::{AppState, refuse};
use crate::ops::ApiError;

/// Largest page of the list endpoint.
pub const MAX_LIST_LIMIT: usize = 1000;
const DEFAULT_LIST_LIMIT: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListParams {
    prefix: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

pub(super) async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("bad list parameters: {}", e.body_text()),
        )
    })?;
    let limit = params.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"),
        ));
    }
    let prefix = params.prefix.unwrap_or_default();
    // Fetch one more than asked, to know whether another page follows.
    let mut records = state
        .engine
        .list(&prefix, params.after.as_deref(), limit + 1)?;
    let more = records.len() > limit;
    records.truncate(limit);
    let next = if more {
        records.last().map(|r| Json::String(r.key.clone()))
    } else {
        None
    };
    let items: Vec<Json> = records.iter().map(|r| r.to_json()).collect();
    Ok(axum::Json(json!({"items": items, "next": next.unwrap_or(Json::Null)})).into_response())
}
