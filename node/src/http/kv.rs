//! Everything under `/v1/kv/{key}`: a record operation, run here by [`ops::execute`] or
//! forwarded to a region that may hold the record.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use http_body_util::BodyExt;

use super::{AppState, json_response, refuse};

use crate::engine::{Admission, ForwardTo};
use crate::ops::{self, ApiError, Op, validate_key};
use crate::peer::ForwardRequest;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest `Idempotency-Key` header.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
const KV_PREFIX: &str = "/v1/kv/";

fn decode_key(raw: &str) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| {
            refuse(
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
        refuse(
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
        Err(e) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("cannot read the request body: {e}"),
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        refuse(
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
pub(super) async fn kv(
    State(state): State<AppState>,
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
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST is allowed only on /v1/kv/{key}/incr",
        ));
    }
    let key = decode_key(raw_key)?;
    let op = match method {
        Method::GET | Method::HEAD => Op::Get,
        Method::PUT => Op::Put,
        Method::PATCH => Op::Patch,
        Method::POST => Op::Incr,
        Method::DELETE => Op::Delete,
        other => {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{other} is not allowed on /v1/kv/{{key}}"),
            ));
        }
    };
    let (idempotency_key, body) = if op == Op::Get {
        (None, Bytes::new())
    } else {
        (idempotency_key(&headers)?, read_body(body, &headers).await?)
    };
    let request = ForwardRequest {
        op,
        key,
        idempotency_key,
        body: body.to_vec(),
    };
    if let Admission::Forward(to) = state.engine.admission(&request.key) {
        return forward(&state, request, &to).await;
    }
    let answer = ops::execute(
        &state.engine,
        request.op,
        &request.key,
        &request.body,
        request.idempotency_key,
    )
    .await;
    Ok(json_response(
        status_of(answer.status),
        answer.body,
        answer.replayed,
        None,
    ))
}

fn status_of(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Carry a request for a record this region may not hold to a node of a region that may, and
/// relay its answer. Nothing of the record is stored here.
async fn forward(
    state: &AppState,
    request: ForwardRequest,
    to: &ForwardTo,
) -> Result<Response, ApiError> {
    let unreachable = |why: String| {
        let message = format!(
            "record {:?} is pinned to region {:?} by rule {:?} and may not be stored in region {:?}; forwarding failed: {why}",
            request.key, to.home, to.rule, state.engine.region
        );
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
            kind: "home_region_unreachable",
            message,
            home_region: Some(to.home.clone()),
        }
    };
    let Some(forwarder) = &state.forwarder else {
        return Err(unreachable("this node has no peer links".into()));
    };
    match forwarder.forward(&to.regions, &request).await {
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
