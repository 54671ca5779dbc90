//! The one executor of record operations: the HTTP API's requests for records this region may
//! hold, and the requests that peers forward here, go through [`execute`].
//!
//! Architecture invariant: everything a request carries (key, body, Idempotency-Key) is
//! validated here or before, whoever sent it, and every failure is an [`ApiError`] with an
//! HTTP status and a `{"error", "message"}` body; forwarded requests are answered with exactly
//! the bytes a local client would get. This module knows neither axum nor quinn.

use meridian_replication::RecordError;
use meridian_replication::record::{MAX_DEPTH, json_depth};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use crate::engine::{Engine, Idempotency, Pinned, ReadError, WriteError, WriteOp};

/// Longest record key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 512;

/// A record operation of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Patch,
    Incr,
    Delete,
}

impl Op {
    /// The HTTP method the request came with, as the idempotency fingerprint records it: a
    /// stored fingerprint must keep matching its retries, so these names never change.
    fn fingerprint_method(self) -> &'static str {
        match self {
            Op::Get => "GET",
            Op::Put => "PUT",
            Op::Patch => "PATCH",
            Op::Incr => "POST",
            Op::Delete => "DELETE",
        }
    }
}

/// The answer to an executed operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// JSON.
    pub body: Vec<u8>,
    /// True when this is the stored first answer to an earlier request with the same
    /// Idempotency-Key.
    pub replayed: bool,
}

/// An error answer: HTTP status, machine-readable kind, human-readable message, and for a
/// record pinned elsewhere its home region.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub home_region: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            home_region: None,
        }
    }

    /// A record pinned to another region: `kind` with the record's home region.
    pub fn pinned(status: u16, kind: &'static str, message: String, pinned: &Pinned) -> Self {
        ApiError {
            status,
            kind,
            message,
            home_region: Some(pinned.home.clone()),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Vec<u8> {
        let mut body = json!({"error": self.kind, "message": self.message});
        if let (Some(home), Some(obj)) = (&self.home_region, body.as_object_mut()) {
            obj.insert("home_region".into(), Json::String(home.clone()));
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let message = e.to_string();
        match e {
            WriteError::Record(RecordError::NotACounter { .. }) => {
                ApiError::new(409, "not_a_counter", message)
            }
            WriteError::Record(RecordError::CounterOverflow { .. }) => {
                ApiError::new(409, "counter_overflow", message)
            }
            WriteError::Record(RecordError::NotFound) => ApiError::new(404, "not_found", message),
            WriteError::Record(RecordError::TooDeep) => ApiError::new(400, "too_deep", message),
            WriteError::Record(RecordError::BadCounterField) => {
                ApiError::new(400, "invalid_request", message)
            }
            WriteError::Record(other) => {
                tracing::error!(error = %other, "record document failure");
                ApiError::new(500, "internal", other.to_string())
            }
            WriteError::Misdirected(p) => ApiError::pinned(421, "misdirected", message, &p),
            WriteError::NoAllowedRegionReachable(p) => {
                ApiError::pinned(503, "home_region_unreachable", message, &p)
            }
            WriteError::IdempotencyKeyReused(_) => {
                ApiError::new(422, "idempotency_key_reused", message)
            }
            WriteError::Storage(_) => ApiError::new(503, "storage_failed", message),
            WriteError::StorageFull(_) => ApiError::new(503, "storage_full", message),
            WriteError::CorruptRecord { .. } => ApiError::new(500, "corrupt_record", message),
            WriteError::ShuttingDown => ApiError::new(503, "shutting_down", message),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let message = e.to_string();
        match e {
            ReadError::Misdirected(p) => ApiError::pinned(421, "misdirected", message, &p),
            ReadError::NoAllowedRegionReachable(p) => {
                ApiError::pinned(503, "home_region_unreachable", message, &p)
            }
            // Logged and counted where it was found (`Engine::corrupt_record_found`).
            ReadError::CorruptRecord { .. } => ApiError::new(500, "corrupt_record", message),
            ReadError::Storage(_) | ReadError::CorruptView { .. } => {
                tracing::error!(error = %message, "read failed");
                ApiError::new(500, "storage_failed", message)
            }
        }
    }
}

/// Validate a decoded key: 1 to 512 bytes of UTF-8 without control characters.
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::new(400, "invalid_key", "the key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::new(
            400,
            "invalid_key",
            format!(
                "the key is {} bytes long; at most {MAX_KEY_BYTES} are allowed",
                key.len()
            ),
        ));
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(ApiError::new(
            400,
            "invalid_key",
            format!("the key contains the control character U+{:04X}", c as u32),
        ));
    }
    Ok(())
}

fn parse_object(body: &[u8]) -> Result<Map<String, Json>, ApiError> {
    let value: Json = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if json_depth(&value) > MAX_DEPTH {
        return Err(ApiError::new(
            400,
            "too_deep",
            format!("the value nests deeper than {MAX_DEPTH} levels"),
        ));
    }
    match value {
        Json::Object(m) => Ok(m),
        other => Err(ApiError::new(
            400,
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

/// The write a request's body asks for: a JSON object for put and patch (at most
/// [`MAX_DEPTH`] deep), `{"field", "by"}` for incr, nothing for delete. Pure, so that it can be
/// fuzzed; `Op::Get` is no write and is refused.
pub fn parse_write(op: Op, body: &[u8]) -> Result<WriteOp, ApiError> {
    Ok(match op {
        Op::Put => WriteOp::Put(parse_object(body)?),
        Op::Patch => WriteOp::Patch(parse_object(body)?),
        Op::Incr => {
            let incr: IncrBody = serde_json::from_slice(body).map_err(|e| {
                ApiError::new(
                    400,
                    "invalid_request",
                    format!("incr expects {{\"field\": \"name\", \"by\": 1}}: {e}"),
                )
            })?;
            WriteOp::Incr {
                field: incr.field,
                by: incr.by,
            }
        }
        Op::Delete => WriteOp::Delete,
        Op::Get => {
            return Err(ApiError::new(
                400,
                "invalid_request",
                "a GET carries no write",
            ));
        }
    })
}

/// Execute a record operation on this node: the HTTP API's path, and the path of requests
/// forwarded here by peers.
pub async fn execute(
    engine: &Engine,
    op: Op,
    key: &str,
    body: &[u8],
    idempotency_key: Option<String>,
) -> Answer {
    match execute_inner(engine, op, key, body, idempotency_key).await {
        Ok(done) => done,
        Err(e) => Answer {
            status: e.status,
            body: e.body(),
            replayed: false,
        },
    }
}

async fn execute_inner(
    engine: &Engine,
    op: Op,
    key: &str,
    body: &[u8],
    idempotency_key: Option<String>,
) -> Result<Answer, ApiError> {
    validate_key(key)?;
    let write = match op {
        Op::Get => {
            return match engine.read(key)? {
                Some(record) => Ok(Answer {
                    status: 200,
                    body: serde_json::to_vec(&record.to_json()).unwrap_or_default(),
                    replayed: false,
                }),
                None => Err(ApiError::new(
                    404,
                    "not_found",
                    format!("no record {key:?} is stored on this node"),
                )),
            };
        }
        Op::Put | Op::Patch | Op::Incr | Op::Delete => parse_write(op, body)?,
    };
    let idempotency =
        idempotency_key.map(|k| Idempotency::new(&k, op.fingerprint_method(), key, body));
    let answer = engine.write(key, write, idempotency).await?;
    Ok(Answer {
        status: answer.status,
        body: answer.body,
        replayed: answer.replayed,
    })
}
