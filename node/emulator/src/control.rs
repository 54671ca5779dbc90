//! The HTTP control API of a running emulator (`GET /links`, `PUT /links/{from}/{to}`,
//! `PUT /links`, `GET /healthz`) and [`run`], the `meridian proxy` main loop around it.
//! Invariant: a refused request changes nothing.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::{
    Emulator, EmulatorHandle, EmulatorOptions, LinkInfo, LinkSpec, ProxyError, SettingsUpdate,
};

fn error_response(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": kind, "message": message})),
    )
        .into_response()
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ProxyError::UnknownLink { .. } => (StatusCode::NOT_FOUND, "unknown_link"),
            ProxyError::InvalidSetting { .. } => (StatusCode::BAD_REQUEST, "invalid_setting"),
            ProxyError::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        error_response(status, kind, self.to_string())
    }
}

/// The control API: `GET /healthz`, `GET /links`, `PUT /links`, `GET|PUT /links/{from}/{to}`.
pub fn control_router(handle: EmulatorHandle) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/links", get(get_links).put(put_all))
        .route("/links/{from}/{to}", get(get_link).put(put_link))
        .fallback(|| async {
            error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; try GET /links".into(),
            )
        })
        .with_state(handle)
}

async fn get_links(State(h): State<EmulatorHandle>) -> axum::Json<Vec<LinkInfo>> {
    axum::Json(h.links())
}

async fn get_link(
    State(h): State<EmulatorHandle>,
    Path((from, to)): Path<(String, String)>,
) -> Result<axum::Json<LinkInfo>, ProxyError> {
    h.link(&from, &to)
        .map(axum::Json)
        .ok_or(ProxyError::UnknownLink { from, to })
}

async fn put_link(
    State(h): State<EmulatorHandle>,
    Path((from, to)): Path<(String, String)>,
    body: Bytes,
) -> Result<axum::Json<LinkInfo>, ProxyError> {
    let update = SettingsUpdate::from_json(&body)?;
    h.set(&from, &to, &update).map(axum::Json)
}

async fn put_all(
    State(h): State<EmulatorHandle>,
    body: Bytes,
) -> Result<axum::Json<Vec<LinkInfo>>, ProxyError> {
    let update = SettingsUpdate::from_json(&body)?;
    h.set_all(&update).map(axum::Json)
}

/// Serves the control API on `listener` until `shutdown` completes.
pub async fn serve_control(
    handle: EmulatorHandle,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    axum::serve(listener, control_router(handle))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ProxyError::ControlServe)
}

/// The `meridian proxy` main loop: starts a UDP relay for each of `links` and the control
/// API on `control`, prints every link and the control address on stdout, and runs until
/// `shutdown`.
pub async fn run(
    links: Vec<LinkSpec>,
    control: SocketAddr,
    options: EmulatorOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let emulator = Emulator::start_links(links, options).await?;
    let listener = TcpListener::bind(control)
        .await
        .map_err(|source| ProxyError::BindControl {
            addr: control,
            source,
        })?;
    let control_addr = listener
        .local_addr()
        .map_err(|source| ProxyError::BindControl {
            addr: control,
            source,
        })?;
    let links = emulator.links();
    println!("meridian proxy: {} links", links.len());
    for l in &links {
        println!(
            "link {} → {}  via {}  upstream {}",
            l.from, l.to, l.via, l.upstream
        );
    }
    println!("control http://{control_addr}");
    {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
    tracing::info!(%control_addr, links = links.len(), "link emulator running");
    serve_control(emulator.handle(), listener, shutdown).await
}
