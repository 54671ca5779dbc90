//! The peer port: admit connection attempts (see `admission`), run their handshakes with a
//! deadline, and hand authenticated connections to `serve`.
//!
//! Architecture invariant: an attempt holds a handshake slot, never a link slot; a link exists
//! only for an authenticated node of the topology, at most one per node (a newer subscription
//! of a node replaces its older one, see [`Subscribers`]). Refusals are counted and logged at
//! a bounded rate, never one line per packet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::admission::{
    Admission, AdmissionLimits, Arrival, Decision, HANDSHAKE_DEADLINE, Lane, LogBudget,
};
use super::frame::peer_said_goodbye;
use super::serve::serve_subscriber;
use super::{Ctx, LinkError};
use crate::sync::lock;

/// Log lines about refused or failed connection attempts: a few per window, the rest counted.
const LOG_LINES: u32 = 5;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The close reason an older subscription gets when the same node subscribes again.
pub(super) const REPLACED_REASON: &str = "replaced by a newer link from the same node";

/// What the accept loop shares with the handshakes it started.
struct AcceptState {
    admission: Mutex<Admission>,
    handshake_log: Mutex<LogBudget>,
}

/// A handshake slot; given back when dropped, however the handshake ends.
struct HandshakeSlot {
    state: Arc<AcceptState>,
    lane: Lane,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.state.admission).release(self.lane);
    }
}

/// The addresses peers dial from: their peer addresses (a node dials from the endpoint it
/// accepts on).
fn declared_addresses(ctx: &Ctx) -> Vec<SocketAddr> {
    let engine = &ctx.engine;
    engine
        .topology
        .peers_of(&engine.node_id)
        .map(|n| n.peer)
        .collect()
}

pub(super) async fn accept_loop(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.clone();
    let state = Arc::new(AcceptState {
        admission: Mutex::new(Admission::new(
            AdmissionLimits::default(),
            declared_addresses(&ctx),
        )),
        handshake_log: Mutex::new(LogBudget::new(LOG_LINES, LOG_WINDOW)),
    });
    let mut refusal_log = LogBudget::new(LOG_LINES, LOG_WINDOW);
    let metrics = &ctx.engine.metrics.peer_admission;
    // Handshakes in progress (bounded by admission) and links (one per peer node, plus
    // replaced ones while they close).
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = ctx.endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        while tasks.try_join_next().is_some() {}
        let arrival = Arrival {
            remote: incoming.remote_address(),
            validated: incoming.remote_address_validated(),
            may_retry: incoming.may_retry(),
        };
        let decision = lock(&state.admission).decide(arrival);
        let refusal = match decision {
            Decision::Accept(lane) => {
                let slot = HandshakeSlot {
                    state: state.clone(),
                    lane,
                };
                let span = tracing::Span::current();
                tasks.spawn(serve_incoming(ctx.clone(), incoming, slot).instrument(span));
                continue;
            }
            Decision::Retry => match incoming.retry() {
                Ok(()) => {
                    metrics.handshake_retries_total.inc();
                    continue;
                }
                Err(e) => {
                    e.into_incoming().refuse();
                    "not_validated"
                }
            },
            Decision::Refuse(reason) => {
                incoming.refuse();
                reason.label()
            }
        };
        metrics.refused(refusal);
        if let Some(held_back) = refusal_log.allow(Instant::now()) {
            let in_progress = lock(&state.admission).in_progress();
            tracing::warn!(
                remote = %arrival.remote,
                reason = refusal,
                handshakes_in_progress = in_progress,
                similar_lines_held_back = held_back,
                "refused a connection attempt on the peer port"
            );
        }
    }
    tasks.abort_all();
}

/// Why a handshake did not give an authenticated connection.
enum HandshakeFailure {
    TimedOut,
    Failed(quinn::ConnectionError),
}

async fn handshake(incoming: quinn::Incoming) -> Result<quinn::Connection, HandshakeFailure> {
    let connecting = incoming.accept().map_err(HandshakeFailure::Failed)?;
    // Dropping `connecting` on the deadline abandons the handshake and frees its state.
    match tokio::time::timeout(HANDSHAKE_DEADLINE, connecting).await {
        Ok(result) => result.map_err(HandshakeFailure::Failed),
        Err(_) => Err(HandshakeFailure::TimedOut),
    }
}

async fn serve_incoming(ctx: Arc<Ctx>, incoming: quinn::Incoming, slot: HandshakeSlot) {
    let remote = incoming.remote_address();
    let conn = match handshake(incoming).await {
        Ok(conn) => conn,
        Err(failure) => {
            let (reason, error) = match failure {
                HandshakeFailure::TimedOut => (
                    "handshake_timeout",
                    format!("did not complete within {HANDSHAKE_DEADLINE:?}"),
                ),
                // A node gives up a dial when we reached it meanwhile: not a failure.
                HandshakeFailure::Failed(e @ quinn::ConnectionError::ApplicationClosed(_)) => {
                    ctx.engine
                        .metrics
                        .peer_admission
                        .refused("abandoned_by_client");
                    tracing::debug!(%remote, error = %e, "the client gave up its handshake");
                    return;
                }
                HandshakeFailure::Failed(e) => ("handshake_failed", e.to_string()),
            };
            ctx.engine.metrics.peer_admission.refused(reason);
            let allowed = lock(&slot.state.handshake_log).allow(Instant::now());
            if let Some(held_back) = allowed {
                tracing::warn!(%remote, reason, %error, similar_lines_held_back = held_back, "peer handshake failed");
            }
            return;
        }
    };
    // Authenticated: from here on the connection is a link, not a handshake.
    drop(slot);
    if let Err(e) = serve_subscriber(&ctx, conn).await {
        if peer_said_goodbye(&e).is_some() || matches!(e, LinkError::StreamEnded) || closed_here(&e)
        {
            tracing::debug!(%remote, error = %e, "subscriber link ended");
        } else {
            tracing::warn!(%remote, error = %e, "subscriber link ended with an error");
        }
    }
}

/// The link ended because this node closed it (a newer subscription replaced it, shutdown).
fn closed_here(e: &LinkError) -> bool {
    let conn_err = match e {
        LinkError::Connection(c) => c,
        LinkError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => c,
        LinkError::Write(quinn::WriteError::ConnectionLost(c)) => c,
        _ => return false,
    };
    matches!(conn_err, quinn::ConnectionError::LocallyClosed)
}

/// The live subscription of each peer node. A node has one subscription to us at a time, so
/// a newer one means the older is stale (its process restarted, or it gave the link up): the
/// older is closed at once instead of living out the idle timeout.
#[derive(Default)]
pub(super) struct Subscribers {
    next_id: AtomicU64,
    by_node: Mutex<HashMap<String, (u64, quinn::Connection)>>,
}

impl Subscribers {
    /// `conn` is `node`'s subscription from now on; closes the one it replaces. Returns its id
    /// for [`Subscribers::remove`], and whether it replaced one.
    pub(super) fn register(&self, node: &str, conn: &quinn::Connection) -> (u64, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let older = lock(&self.by_node).insert(node.to_string(), (id, conn.clone()));
        let replaced = older.is_some();
        if let Some((_, older)) = older {
            older.close(0u32.into(), REPLACED_REASON.as_bytes());
        }
        (id, replaced)
    }

    /// Subscription `id` of `node` ended; a newer one stays.
    pub(super) fn remove(&self, node: &str, id: u64) {
        let mut by_node = lock(&self.by_node);
        if by_node.get(node).is_some_and(|(current, _)| *current == id) {
            by_node.remove(node);
        }
    }
}
