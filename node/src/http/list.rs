//! `GET /v1/kv`: a page of the records stored on this node, in key order. Never forwarded.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::{AppState, refuse};
use crate::engine::ListEntry;
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
    let mut entries = state
        .engine
        .list(&prefix, params.after.as_deref(), limit + 1)?;
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next = if more {
        entries.last().map(|e| Json::String(e.key().to_owned()))
    } else {
        None
    };
    let mut items = Vec::new();
    let mut corrupt = Vec::new();
    for entry in &entries {
        match entry {
            ListEntry::Record(r) => items.push(r.to_json()),
            ListEntry::Corrupt(key) => corrupt.push(Json::String(key.clone())),
        }
    }
    let mut page = json!({"items": items, "next": next.unwrap_or(Json::Null)});
    // A damaged record never fails the page: its key is listed apart (an extension of the
    // SPEC's answer, present only when there is one) and a read of it answers 500
    // `corrupt_record` until it is rebuilt.
    if !corrupt.is_empty()
        && let Some(page) = page.as_object_mut()
    {
        page.insert("corrupt".into(), Json::Array(corrupt));
    }
    Ok(axum::Json(page).into_response())
}
