//! The HTTP API of SPEC §5.
//!
//! Architecture invariant: handlers validate everything that comes from the client (key,
//! size, JSON, depth, headers) before the engine sees it, and every failure is answered as
//! `{"error": kind, "message": ...}` with a 4xx or 5xx status; nothing a client sends can panic
//! the process.

// Error answers are built on the cold path; boxing them would only add noise.
#![allow(clippy::result_large_err)]

mod kv;
mod list;
mod status;
mod test_clock;

pub use kv::{MAX_BODY_BYTES, MAX_IDEMPOTENCY_KEY_BYTES};
pub use list::MAX_LIST_LIMIT;
pub use test_clock::test_clock_router;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::Instrument;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;

use crate::engine::Engine;
use crate::ops::ApiError;
use crate::peer::{Forwarder, PeerTable};

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    /// What the replication links report, for `/v1/status`.
    pub peers: Arc<PeerTable>,
    /// Carries requests for records pinned elsewhere; `None` on a node without peers.
    pub forwarder: Option<Arc<Forwarder>>,
}

/// What `serve` may add to the API.
pub struct ServeOptions {
    /// TEST ONLY: serve `PUT /v1/test/clock-offset`.
    pub test_clock_control: bool,
}

/// Serve the API on `listener` until `shutdown` resolves, then finish the requests in flight.
/// Every request is handled inside `span` (the node's), so its log lines name the node.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    options: ServeOptions,
    span: tracing::Span,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = router(state);
    if options.test_clock_control {
        tracing::warn!("TEST ONLY: PUT /v1/test/clock-offset can skew this node's wall clock");
        app = test_clock_router().merge(app);
    }
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let span = span.clone();
            async move { next.run(req).instrument(span).await }
        },
    ));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// An error answer with an HTTP status.
pub(crate) fn refuse(
    status: StatusCode,
    kind: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError::new(status.as_u16(), kind, message)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, self.body(), false, None)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status::status))
        .route("/v1/kv", get(list::list))
        .route("/v1/kv/", get(list::list))
        .route("/v1/kv/{*rest}", any(kv::kv))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    refuse(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    refuse(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.engine.not_ready_reason() {
        None => axum::Json(json!({"status": "ready"})).into_response(),
        Some(why) => {
            let body =
                json!({"error": "not_ready", "message": why.explanation(), "reason": why.code()});
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::to_vec(&body).unwrap_or_default(),
                false,
                None,
            )
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.engine.metrics.render(),
    )
        .into_response()
}

pub(crate) fn json_response(
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
