//! The HTTP API of SPEC §5.
//!
//! Architecture invariant: handlers validate everything that comes from the client (key,
//! size, JSON, depth, headers) before the engine sees it, and every failure is answered as
//! `{"error": kind, "message": ...}` with a 4xx or 5xx status; nothing a client sends can panic
//! the process.

// Error answers are built on the cold path; boxing them would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http_body_util::BodyExt;
use meridian_replication::RecordError;
use meridian_replication::record::{MAX_DEPTH, json_depth};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use crate::engine::{Admission, Engine, Idempotency, ReadError, WriteError, WriteOp};
use meridian_replication::wire::ForwardMethod;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest record key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 512;
/// Longest `Idempotency-Key` header.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// Largest page of the list endpoint.
pub const MAX_LIST_LIMIT: usize = 1000;
const DEFAULT_LIST_LIMIT: usize = 100;
const KV_PREFIX: &str = "/v1/kv/";

/// An error answer: status, machine-readable kind, human-readable message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub extra: Option<(&'static str, Json)>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            extra: None,
        }
    }
}

impl ApiError {
    /// The JSON body of this error.
    pub fn body(&self) -> Vec<u8> {
        let mut body = json!({"error": self.kind, "message": self.message});
        if let (Some((k, v)), Some(obj)) = (&self.extra, body.as_object_mut()) {
            obj.insert(k.to_string(), v.clone());
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, self.body(), false, None)
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let message = e.to_string();
        match e {
            WriteError::Record(RecordError::NotACounter { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "not_a_counter", message)
            }
            WriteError::Record(RecordError::CounterOverflow { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "counter_overflow", message)
            }
            WriteError::Record(RecordError::NotFound) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            WriteError::Record(RecordError::TooDeep) => {
                ApiError::new(StatusCode::BAD_REQUEST, "too_deep", message)
            }
            WriteError::Record(RecordError::BadCounterField) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
            }
            WriteError::Record(other) => {
                tracing::error!(error = %other, "record document failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    other.to_string(),
                )
            }
            WriteError::Misdirected { home, .. } => ApiError {
                status: StatusCode::MISDIRECTED_REQUEST,
                kind: "misdirected",
                message,
                extra: Some(("home_region", Json::String(home))),
            },
            WriteError::NoAllowedRegionReachable { home, .. } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "home_region_unreachable",
                message,
                extra: Some(("home_region", Json::String(home))),
            },
            WriteError::IdempotencyKeyReused(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                message,
            ),
            WriteError::Storage(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_failed", message)
            }
            WriteError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let message = e.to_string();
        match e {
            ReadError::Misdirected { home, .. } => ApiError {
                status: StatusCode::MISDIRECTED_REQUEST,
                kind: "misdirected",
                message,
                extra: Some(("home_region", Json::String(home))),
            },
            ReadError::NoAllowedRegionReachable { home, .. } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "home_region_unreachable",
                message,
                extra: Some(("home_region", Json::String(home))),
            },
            ReadError::Storage(_) | ReadError::CorruptView { .. } => {
                tracing::error!(error = %message, "read failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_failed", message)
            }
        }
    }
}

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/kv", get(list))
        .route("/v1/kv/", get(list))
        .route("/v1/kv/{*rest}", any(kv))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(engine)
}

/// The largest skew the test-only clock control accepts: a day either way.
const MAX_TEST_CLOCK_OFFSET_MS: i64 = 86_400_000;

/// TEST ONLY: `PUT /v1/test/clock-offset` with `{"offset_ms": N}` skews this process's wall
/// clock by N ms from now on (see `meridian serve --test-clock-control`). The HLC still never
/// goes back: a negative step only slows its physical part until the wall clock catches up.
pub fn test_clock_router() -> Router {
    Router::new().route(
        "/v1/test/clock-offset",
        axum::routing::put(|body: Bytes| async move {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                offset_ms: i64,
            }
            let parsed: Body = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("expected {{\"offset_ms\": <integer>}}: {e}"),
                )
            })?;
            if parsed.offset_ms.abs() > MAX_TEST_CLOCK_OFFSET_MS {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_offset",
                    format!(
                        "offset_ms {} is beyond ±{MAX_TEST_CLOCK_OFFSET_MS}",
                        parsed.offset_ms
                    ),
                ));
            }
            crate::clock::set_test_clock_offset_ms(parsed.offset_ms);
            tracing::warn!(
                offset_ms = parsed.offset_ms,
                "TEST ONLY: wall clock skew changed"
            );
            Ok::<_, ApiError>(axum::Json(json!({"offset_ms": parsed.offset_ms})))
        }),
    )
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(engine): State<Arc<Engine>>) -> Response {
    if engine.ready() {
        axum::Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "storage has failed or the node is shutting down",
        )
        .into_response()
    }
}

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics.render(),
    )
        .into_response()
}

async fn status(State(engine): State<Arc<Engine>>) -> Response {
    let peers_snapshot = match engine.peers.lock() {
        Ok(p) => p.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let mut peers = Vec::new();
    for (node, s) in &peers_snapshot {
        // Changes the peer lacks of what we hold (global records; an estimate capped at 100,000).
        let changes_behind: usize = engine
            .topology
            .nodes
            .iter()
            .filter(|n| n.id != *node)
            .map(|origin| {
                let after = s
                    .peer_frontier
                    .get(&origin.id)
                    .and_then(|v| v.parse::<meridian_replication::Version>().ok())
                    .map_or(0, |v| v.time_ntp64);
                engine
                    .store()
                    .count_after(&origin.id, after, 100_000)
                    .unwrap_or(0)
            })
            .sum();
        peers.push(json!({
            "node": node,
            "region": s.region,
            "connected": s.inbound_connected && s.outbound_connected,
            "receiving": {"connected": s.inbound_connected, "since_unix_ms": s.inbound_since_unix_ms,
                          "changes_applied": s.changes_applied, "lag_ms": s.lag_ms,
                          "last_applied_unix_ms": s.last_applied_unix_ms,
                          "drift_refusals": s.drift_refusals,
                          "residency_violations": s.residency_violations},
            "sending": {"connected": s.outbound_connected, "since_unix_ms": s.outbound_since_unix_ms,
                        "changes_sent": s.changes_sent, "changes_behind": changes_behind,
                        "peer_frontier": s.peer_frontier},
            "lag_ms": s.lag_ms,
            "changes_behind": changes_behind,
            "misbehaving": s.residency_violations > 0,
            "last_error": s.last_error,
        }));
    }
    let frontier: serde_json::Map<String, Json> = engine
        .store()
        .frontier()
        .map(|f| {
            f.iter()
                .filter(|(_, c, _)| c.is_empty())
                .map(|(o, _, h)| {
                    (
                        o.to_string(),
                        Json::String(
                            meridian_replication::Version {
                                time_ntp64: h,
                                node_hlc_id: 0,
                            }
                            .to_string(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let records = engine.store().record_count().ok();
    axum::Json(json!({
        "cluster": engine.topology.cluster,
        "node": engine.node_id,
        "region": engine.region,
        "incarnation": engine.incarnation,
        "hlc": engine.clock.now().to_string(),
        "ready": engine.ready(),
        "records_stored": records,
        "frontier": frontier,
        "peers": peers,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    prefix: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn list(
    State(engine): State<Arc<Engine>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("bad list parameters: {}", e.body_text()),
        )
    })?;
    let limit = params.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"),
        ));
    }
    let prefix = params.prefix.unwrap_or_default();
    // Fetch one more than asked, to know whether another page follows.
    let mut records = engine.list(&prefix, params.after.as_deref(), limit + 1)?;
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

/// Validate a decoded key: 1 to 512 bytes of UTF-8 without control characters.
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_key",
            "the key is empty",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_key",
            format!(
                "the key is {} bytes long; at most {MAX_KEY_BYTES} are allowed",
                key.len()
            ),
        ));
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_key",
            format!("the key contains the control character U+{:04X}", c as u32),
        ));
    }
    Ok(())
}

fn decode_key(raw: &str) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_key",
                "the key is not valid UTF-8 after percent-decoding",
            )
        })?
        .into_owned();
    validate_key(&decoded)?;
    Ok(decoded)
}

async fn read_body(body: Body, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("cannot read the request body: {e}"),
        )),
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Json>, ApiError> {
    let value: Json = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if json_depth(&value) > MAX_DEPTH {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_deep",
            format!("the value nests deeper than {MAX_DEPTH} levels"),
        ));
    }
    match value {
        Json::Object(m) => Ok(m),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not_an_object",
            format!(
                "the body must be a JSON object, got {}",
                match other {
                    Json::Array(_) => "an array",
                    Json::String(_) => "a string",
                    Json::Number(_) => "a number",
                    Json::Bool(_) => "a boolean",
                    _ => "null",
                }
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncrBody {
    field: String,
    #[serde(default = "one")]
    by: i64,
}

fn one() -> i64 {
    1
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"
            ),
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty()
        || s.len() > MAX_IDEMPOTENCY_KEY_BYTES
        || !s.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// Everything under `/v1/kv/`: the key is the rest of the path, percent-decoded.
async fn kv(
    State(engine): State<Arc<Engine>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = uri.path().strip_prefix(KV_PREFIX).unwrap_or_default();
    let (raw_key, is_incr) = match raw.strip_suffix("/incr") {
        Some(k) if method == Method::POST => (k, true),
        _ => (raw, false),
    };
    if method == Method::POST && !is_incr {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST is allowed only on /v1/kv/{key}/incr",
        ));
    }
    let key = decode_key(raw_key)?;
    let op = match method {
        Method::GET | Method::HEAD => ForwardMethod::Get,
        Method::PUT => ForwardMethod::Put,
        Method::PATCH => ForwardMethod::Patch,
        Method::POST => ForwardMethod::Incr,
        Method::DELETE => ForwardMethod::Delete,
        other => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{other} is not allowed on /v1/kv/{{key}}"),
            ));
        }
    };
    let (idem_key, bytes) = if op == ForwardMethod::Get {
        (None, Bytes::new())
    } else {
        (idempotency_key(&headers)?, read_body(body, &headers).await?)
    };
    if let Admission::Forward {
        home,
        rule,
        regions,
    } = engine.admission(&key)
    {
        return forward(&engine, op, &key, idem_key, &bytes, &home, &rule, &regions).await;
    }
    let (status, body, replayed) = execute_local(&engine, op, &key, &bytes, idem_key).await;
    Ok(json_response(status, body, replayed, None))
}

fn json_response(
    status: StatusCode,
    body: Vec<u8>,
    replayed: bool,
    served_by: Option<(&str, &str)>,
) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if let Some((region, node)) = served_by {
        if let Ok(v) = HeaderValue::from_str(region) {
            headers.insert("meridian-served-by-region", v);
        }
        if let Ok(v) = HeaderValue::from_str(node) {
            headers.insert("meridian-served-by-node", v);
        }
    }
    response
}

/// Carry a request for a record this region may not hold to a node of a region that may, and
/// relay its answer. Nothing of the record is stored here.
#[allow(clippy::too_many_arguments)]
async fn forward(
    engine: &Engine,
    op: ForwardMethod,
    key: &str,
    idem_key: Option<String>,
    bytes: &[u8],
    home: &str,
    rule: &str,
    regions: &[String],
) -> Result<Response, ApiError> {
    let unreachable = |why: String| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "home_region_unreachable",
        message: format!(
            "record {key:?} is pinned to region {home:?} by rule {rule:?} and may not be stored in region {:?}; forwarding failed: {why}",
            engine.region
        ),
        extra: Some(("home_region", Json::String(home.to_string()))),
    };
    let Some(forwarder) = engine.forwarder.get() else {
        return Err(unreachable("this node has no peer links".into()));
    };
    let request = meridian_replication::wire::Message::Forward {
        method: op,
        key: key.to_string(),
        idempotency_key: idem_key.unwrap_or_default(),
        body: bytes.to_vec(),
    };
    match forwarder.forward(regions, request).await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            Ok(json_response(
                status,
                answer.body,
                answer.replayed,
                Some((&answer.region, &answer.node)),
            ))
        }
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// Execute a record operation on this node: the HTTP API's path, and the path of requests
/// forwarded here by peers. Returns status, JSON body, and whether it was an idempotent replay.
pub async fn execute_local(
    engine: &Engine,
    op: ForwardMethod,
    key: &str,
    bytes: &[u8],
    idem_key: Option<String>,
) -> (StatusCode, Vec<u8>, bool) {
    match execute_inner(engine, op, key, bytes, idem_key).await {
        Ok(done) => done,
        Err(e) => (e.status, e.body(), false),
    }
}

async fn execute_inner(
    engine: &Engine,
    op: ForwardMethod,
    key: &str,
    bytes: &[u8],
    idem_key: Option<String>,
) -> Result<(StatusCode, Vec<u8>, bool), ApiError> {
    validate_key(key)?;
    let (write, method_name) = match op {
        ForwardMethod::Get => {
            return match engine.read(key)? {
                Some(record) => Ok((
                    StatusCode::OK,
                    serde_json::to_vec(&record.to_json()).unwrap_or_default(),
                    false,
                )),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no record {key:?} is stored on this node"),
                )),
            };
        }
        ForwardMethod::Put => (WriteOp::Put(parse_object(bytes)?), "PUT"),
        ForwardMethod::Patch => (WriteOp::Patch(parse_object(bytes)?), "PATCH"),
        ForwardMethod::Incr => {
            let incr: IncrBody = serde_json::from_slice(bytes).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("incr expects {{\"field\": \"name\", \"by\": 1}}: {e}"),
                )
            })?;
            (
                WriteOp::Incr {
                    field: incr.field,
                    by: incr.by,
                },
                "POST",
            )
        }
        ForwardMethod::Delete => (WriteOp::Delete, "DELETE"),
    };
    let idempotency = idem_key.map(|k| Idempotency::new(&k, method_name, key, bytes));
    let answer = engine.write(key, write, idempotency).await?;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    Ok((status, answer.body, answer.replayed))
}
