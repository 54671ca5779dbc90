//! The replication driver: the one place where the sans-IO core
//! (`meridian_replication::protocol`) meets quinn, redb and tokio.
//!
//! Each node dials every peer and *subscribes*: it states its frontier and receives, on that
//! connection, the changes it lacks (the peer's own and those the peer relays). Each node also
//! accepts its peers' subscriptions and streams to them. So every pair of nodes has two
//! connections, one per direction of data, which also matches how `[[links]]` routes one
//! directed dial through the link emulator.
//!
//! Architecture invariants:
//! * Both ends are authenticated by mutual TLS before any message (see `tls`); the `Hello`
//!   must then name the authenticated node, the same cluster and protocol version.
//! * A sender streams from the change log on disk, never from an unbounded queue: a slow or dead
//!   peer costs one bounded window of batches, and local writes never wait for it.
//! * A frame is at most `MAX_FRAME_BYTES`, checked before reading it; a bad frame or protocol
//!   violation ends the link (which resumes from the durable frontier), never the process.
//!
//! * Unauthenticated work never takes the room of authenticated work: connection attempts are
//!   admitted into bounded handshake lanes (`admission`), links exist only for authenticated
//!   nodes, one per node and direction; a node's newer link replaces its older one at once.
//!
//! Layout: `accept` (the peer port: admission, handshakes), `subscribe` (the receiving side of
//! a link), `serve` (the sending side), `forward`
//! (requests carried to other regions), `frame` (messages over QUIC streams), `status` (what
//! the links report), `tls` (identity and the QUIC transport), `health_watch` (certificate expiry and
//! clock offset, checked as the node runs).

mod accept;
pub mod admission;
mod forward;
mod frame;
mod health_watch;
mod serve;
mod status;
mod subscribe;
pub mod tls;

pub use forward::{ForwardAnswer, ForwardError, ForwardRequest, Forwarder};
pub use status::{PeerStatus, PeerTable};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::observe::metrics::Reason;
use crate::store::StoreError;
use accept::{Subscribers, accept_loop};
use subscribe::subscribe_loop;
use tls::PeerTls;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("reading from the peer: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing to the peer: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    FrameTooLarge(#[from] meridian_replication::wire::frame::FrameTooLarge),
    #[error("malformed message: {0}")]
    Wire(#[from] meridian_replication::wire::WireError),
    #[error("protocol: {0}")]
    Protocol(#[from] meridian_replication::protocol::ProtocolError),
    #[error("the peer closed the link: {0}")]
    PeerClosed(String),
    #[error("the peer closed the stream")]
    StreamEnded,
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("applying received changes: {0}")]
    Apply(#[from] crate::engine::WriteError),
    #[error("the peer reached this node while a dial to it was pending")]
    PeerReachedUs,
    #[error(
        "the link went stale: the peer reached this node anew, and this link received nothing in {waited:?} after a probe"
    )]
    StaleLink { waited: Duration },
}

/// Everything the link tasks share.
struct Ctx {
    forwarder: Arc<Forwarder>,
    engine: Arc<Engine>,
    peers: Arc<PeerTable>,
    tls: Arc<PeerTls>,
    endpoint: quinn::Endpoint,
    shutdown: watch::Receiver<bool>,
    /// Per peer: signalled when that peer reached us (its subscription was accepted). The path
    /// between us works again, so our own dial to it, waiting in backoff or in a handshake
    /// begun while the path was cut, starts over at once instead of at the next retry.
    reachable: HashMap<String, watch::Sender<()>>,
    /// The live subscription of each peer node to us.
    subscribers: Subscribers,
}

/// What the replication driver needs from the node.
pub struct Links {
    pub engine: Arc<Engine>,
    /// Where the links report their state.
    pub peers: Arc<PeerTable>,
    /// Where the links register the connections that forwarded requests travel on.
    pub forwarder: Arc<Forwarder>,
    pub tls: PeerTls,
    /// Becomes true when the node shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Start replication: bind the node's peer address, accept subscriptions, subscribe to every
/// peer. Returns when `shutdown` becomes true.
pub async fn run(links: Links, bind: SocketAddr) -> Result<(), LinkError> {
    let Links {
        engine,
        peers: table,
        forwarder,
        tls,
        shutdown,
    } = links;
    let endpoint = tls::endpoint(bind, &tls)?;
    let peers: Vec<NodeConfig> = engine.topology.peers_of(&engine.node_id).cloned().collect();
    let ctx = Arc::new(Ctx {
        forwarder,
        engine: engine.clone(),
        peers: table,
        tls: Arc::new(tls),
        endpoint: endpoint.clone(),
        shutdown: shutdown.clone(),
        reachable: peers
            .iter()
            .map(|p| (p.id.clone(), watch::Sender::new(())))
            .collect(),
        subscribers: Subscribers::default(),
    });
    // Every line a link logs carries the node and region of the span we run in.
    let span = tracing::Span::current();
    let mut tasks = tokio::task::JoinSet::new();
    for peer in peers {
        tasks.spawn(subscribe_loop(ctx.clone(), peer).instrument(span.clone()));
    }
    tasks.spawn(accept_loop(ctx.clone()).instrument(span.clone()));
    tasks.spawn(retry_loop(ctx.clone()).instrument(span.clone()));
    tasks.spawn(health_watch::watch_loop(ctx.clone()).instrument(span.clone()));
    let mut shutdown = shutdown;
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    endpoint.close(0u32.into(), b"node shutting down");
    // Links notice the shutdown flag or the closed endpoint; give them a moment to say goodbye.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

/// Apply changes held for clock drift once the clock has caught up, and keep the pending gauges
/// current.
async fn retry_loop(ctx: Arc<Ctx>) {
    let engine = &ctx.engine;
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        match engine.retry_due_pending(256).await {
            Ok(stats) if stats.applied > 0 => {
                tracing::info!(
                    applied = stats.applied,
                    "applied changes that were held for clock drift"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retrying held changes failed; will retry"),
        }
        if let Ok(summary) = engine.store().pending_summary(0, 0) {
            let counts = summary.counts;
            for (reason, n) in [
                ("waiting_for_dependencies", counts.waiting_for_dependencies),
                ("held_for_drift", counts.held_for_drift),
                ("quarantined", counts.quarantined),
            ] {
                engine
                    .metrics
                    .pending_changes
                    .get_or_create(&Reason { reason })
                    .set(n as i64);
            }
        }
    }
}
