//! Running one node: open its data directory, start the engine, serve the API until shutdown.
//!
//! [`run`] takes an already bound listener (so tests bind port 0) and a shutdown future.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::Instrument;

use crate::clock::{ClockError, NodeClock};
use crate::config::Topology;
use crate::engine::{Engine, EngineConfig};
use crate::http::{AppState, ServeOptions};
use crate::peer::{Forwarder, Links, PeerTable};
use crate::store::{Store, StoreError, StoreOptions};
use meridian_replication::version::ntp64_from_ms;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("node {0:?} is not declared in the topology")]
    UnknownNode(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Clock(#[from] ClockError),
    #[error("cannot start the engine: {0}")]
    Engine(String),
    #[error("cannot bind the API address {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the API server failed: {0}")]
    Http(std::io::Error),
    #[error("replication cannot start: {0}")]
    Tls(#[from] crate::peer::tls::TlsError),
    #[error(transparent)]
    Residency(#[from] crate::store::audit::StartRefused),
}

/// Where a node keeps its data when `--data-dir` is not given: `data/<node>` beside the
/// topology file.
pub fn default_data_dir(topology: &Topology, node_id: &str) -> PathBuf {
    topology.base_dir.join("data").join(node_id)
}

#[derive(Default)]
pub struct NodeOptions {
    pub engine: EngineConfig,
    /// Delete at start what the residency policy does not allow in this node's region,
    /// instead of refusing to start (`meridian serve --purge-disallowed`).
    pub purge_disallowed: bool,
    /// Start on a damaged or missing commit log, keeping every intact entry
    /// (`meridian serve --recover`).
    pub recover_log: bool,
    /// TEST ONLY (`meridian serve --test-clock-control`): serve `PUT /v1/test/clock-offset`,
    /// which skews this process's wall clock while it runs (the partition suite's clock nemesis).
    pub test_clock_control: bool,
}

/// Open the data directory and start the engine (and its writer thread).
pub fn open(
    topology: Arc<Topology>,
    node_id: &str,
    data_dir: &Path,
    options: NodeOptions,
) -> Result<(Arc<Engine>, crate::engine::WriterHandle), ServeError> {
    if topology.node(node_id).is_none() {
        return Err(ServeError::UnknownNode(node_id.to_string()));
    }
    let max_drift_ms = topology.clock.max_drift_ms;
    let store_options = StoreOptions {
        recover_log: options.recover_log,
        lost_before_ntp64: ntp64_from_ms(crate::clock::unix_ms().saturating_add(max_drift_ms)),
    };
    let (store, identity) = Store::open_with(data_dir, node_id, store_options)?;
    crate::store::audit::enforce_at_start(&store, &topology, node_id, options.purge_disallowed)?;
    let clock = NodeClock::new(node_id, topology.clock.max_drift_ms, identity.last_hlc)?;
    Engine::start(topology, node_id, store, clock, &identity, options.engine)
        .map_err(ServeError::Engine)
}

/// Serve the node on `listener` until `shutdown` resolves; then finish in-flight requests,
/// drain the writer and return.
pub async fn run(
    topology: Arc<Topology>,
    node_id: &str,
    data_dir: &Path,
    listener: TcpListener,
    options: NodeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Certificates are checked before anything is opened: a node that cannot authenticate
    // must not start half-way.
    let has_peers = topology.peers_of(node_id).next().is_some();
    let peer_tls = if has_peers {
        crate::peer::tls::install_crypto_provider();
        Some(crate::peer::tls::PeerTls::load(topology.clone(), node_id)?)
    } else {
        None
    };
    let peer_addr = topology.node(node_id).map(|n| n.peer);
    let test_clock_control = options.test_clock_control;
    let (engine, writer) = open(topology, node_id, data_dir, options)?;
    let span = tracing::info_span!("node", node = %engine.node_id, region = %engine.region);
    let local = listener.local_addr().map_err(ServeError::Http)?;
    span.in_scope(|| {
        tracing::info!(
            api = %local,
            data_dir = %data_dir.display(),
            incarnation = engine.incarnation,
            "node serving"
        );
    });
    let peers = Arc::new(PeerTable::new(&engine.topology, node_id));
    let forwarder = peer_tls
        .is_some()
        .then(|| Arc::new(Forwarder::new(engine.topology.clone())));
    let state = AppState {
        engine: engine.clone(),
        peers: peers.clone(),
        forwarder: forwarder.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let replication = match (peer_tls, peer_addr, forwarder) {
        (Some(tls), Some(bind), Some(forwarder)) => {
            let links = Links {
                engine: engine.clone(),
                peers,
                forwarder,
                tls,
                shutdown: stop_rx,
            };
            let span = span.clone();
            Some(tokio::spawn(
                async move {
                    let result = crate::peer::run(links, bind).await;
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "replication stopped");
                    }
                    result
                }
                .instrument(span),
            ))
        }
        _ => None,
    };
    let options = ServeOptions { test_clock_control };
    let result = crate::http::serve(listener, state, options, span.clone(), async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await
    .map_err(ServeError::Http);
    if let Some(task) = replication {
        // A bind failure of the peer endpoint ends the task early; report it.
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                span.in_scope(|| tracing::error!(error = %e, "replication ended with an error"))
            }
            Err(e) => span.in_scope(|| tracing::error!(error = %e, "replication task failed")),
        }
    }
    // The router (and its engine clones) are gone once serve returns: dropping the last engine
    // closes the writer's queue, and the writer finishes the batch it holds.
    drop(engine);
    let join = tokio::task::spawn_blocking(move || writer.join());
    if join.await.is_err() {
        span.in_scope(|| tracing::error!("writer thread did not finish cleanly"));
    }
    span.in_scope(|| tracing::info!("node stopped"));
    result
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested");
}
