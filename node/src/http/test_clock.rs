//! TEST ONLY: `PUT /v1/test/clock-offset` (see `meridian serve --test-clock-control`).

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::refuse;
use crate::ops::ApiError;

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
                refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("expected {{\"offset_ms\": <integer>}}: {e}"),
                )
            })?;
            if parsed.offset_ms.abs() > MAX_TEST_CLOCK_OFFSET_MS {
                return Err(refuse(
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
