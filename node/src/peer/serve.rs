//! The sender side of a link: accept a peer's subscription and stream it what it lacks from
//! the change logs on disk.
//!
//! Architecture invariant: a sender streams from the log on disk, never from an unbounded
//! queue, and vouches only for what it has read after reading its frontier.

use std::time::Duration;

use meridian_replication::protocol::{
    ChangeSource, Frontier, LogEntry, Outbound, StreamLimits, check_hello,
};
use meridian_replication::wire::Message;
use tracing::Instrument;

use super::forward::serve_forwards;
use super::frame::{clock_of, close_link, hello, note_peer_clock, read_msg, write_msg};
use super::status::Direction;
use super::tls::{self, MAX_CONNECTION_AGE};
use super::{Ctx, LinkError};
use crate::clock::unix_ms;
use crate::engine::Engine;
use crate::observe::metrics::{PeerLink, PeerRegion};
use crate::store::{Store, StoreError};

/// A sender with nothing new still sends progress this often, and retries held changes.
const IDLE_TICK: Duration = Duration::from_millis(500);

/// The node's change logs as the core's [`ChangeSource`], at one moment.
struct NodeSource<'a> {
    store: &'a Store,
    own: &'a str,
    safe_own: u64,
    frontier: Frontier,
    origins: Vec<String>,
}

impl ChangeSource for NodeSource<'_> {
    type Error = StoreError;

    fn origins(&self) -> Vec<String> {
        self.origins.clone()
    }

    fn read_after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let mut out = Vec::new();
        for (hlc, entry) in self.store.log_after(origin, after, limit)? {
            if origin == self.own && hlc > self.safe_own {
                break;
            }
            out.push(LogEntry {
                hlc,
                key: entry.key,
                change: entry.change,
            });
        }
        Ok(out)
    }

    fn frontier(&self, origin: &str, class: &str) -> u64 {
        if origin == self.own {
            self.safe_own
        } else {
            self.frontier.get(origin, class)
        }
    }
}

fn snapshot(engine: &Engine) -> Result<NodeSource<'_>, StoreError> {
    // Order matters: the safe point and frontier are read before any log scan.
    let safe_own = engine.safe_own_hlc();
    let frontier = engine.store().frontier()?;
    Ok(NodeSource {
        store: engine.store(),
        own: &engine.node_id,
        safe_own,
        frontier,
        origins: engine.topology.nodes.iter().map(|n| n.id.clone()).collect(),
    })
}

/// Serve one authenticated connection: the peer's subscription, then stream to it.
pub(super) async fn serve_subscriber(ctx: &Ctx, conn: quinn::Connection) -> Result<(), LinkError> {
    let engine = &ctx.engine;
    // The TLS verifier admitted only a node of the topology in its own region.
    let identity = tls::peer_identity(&conn, &engine.topology)?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let their_hello = read_msg(&mut recv).await?;
    let stated = match check_hello(&their_hello, &engine.topology.cluster, &identity.node_id) {
        Ok(f) => f,
        Err(e) => {
            let reason = e.to_string();
            tracing::error!(peer = %identity.node_id, error = %reason, "refusing replication subscriber");
            close_link(&conn, &mut send, 1, &reason).await;
            return Err(e.into());
        }
    };
    note_peer_clock(engine, &identity.node_id, clock_of(&their_hello), None);
    write_msg(&mut send, &hello(engine, &Frontier::default())).await?;
    let (subscription, replaced) = ctx.subscribers.register(&identity.node_id, &conn);
    if replaced {
        tracing::info!(peer = %identity.node_id, "the peer subscribed again; closed its older subscription");
    }
    let result = serve_registered(ctx, &conn, send, recv, stated, &identity).await;
    ctx.subscribers.remove(&identity.node_id, subscription);
    result
}

async fn serve_registered(
    ctx: &Ctx,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    stated: Vec<meridian_replication::wire::FrontierEntry>,
    identity: &tls::PeerIdentity,
) -> Result<(), LinkError> {
    let engine = &ctx.engine;
    // Our own subscription to this peer may be stale (the peer restarted): the subscriber
    // probes it.
    if let Some(r) = ctx.reachable.get(&identity.node_id) {
        r.send_replace(());
    }
    // Further streams on this connection are requests the peer forwards to us.
    let forwards = tokio::spawn(
        serve_forwards(engine.clone(), conn.clone(), identity.node_id.clone())
            .instrument(tracing::Span::current()),
    );
    let policy = &engine.topology.residency;
    let mut out = Outbound::new(
        policy,
        &engine.region,
        &identity.node_id,
        &identity.region,
        &stated,
        StreamLimits::default(),
    );
    let link = PeerLink::outbound(&identity.node_id, &identity.region);
    let region_label = PeerRegion::of(&identity.region);
    let up = engine.metrics.peer_up.get_or_create(&link).clone();
    let _link_up =
        ctx.peers
            .link_up_until_dropped(&identity.node_id, Direction::Outbound, unix_ms(), up);
    tracing::info!(peer = %identity.node_id, peer_region = %identity.region, "streaming changes to peer");
    let result = stream_to(
        ctx,
        conn,
        &mut send,
        &mut recv,
        &mut out,
        &identity.node_id,
        &region_label,
    )
    .await;
    forwards.abort();
    result
}

async fn stream_to(
    ctx: &Ctx,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    out: &mut Outbound,
    peer: &str,
    region_label: &PeerRegion,
) -> Result<(), LinkError> {
    let engine = &ctx.engine;
    let policy = &engine.topology.residency;
    let mut commits = engine.subscribe_commits();
    let mut shutdown = ctx.shutdown.clone();
    let age_limit = tokio::time::sleep(MAX_CONNECTION_AGE);
    tokio::pin!(age_limit);
    loop {
        // Fill the window from the log on disk.
        loop {
            let source = snapshot(engine)?;
            match out.poll_batch(&source, policy)? {
                Some(batch) => write_msg(send, &batch).await?,
                None => break,
            }
        }
        tokio::select! {
            msg = read_msg(recv) => match msg? {
                Message::Ack { seq, clock_ntp64 } => {
                    note_peer_clock(engine, peer, clock_ntp64, None);
                    let n = out.on_ack(seq)?;
                    engine.metrics.changes_sent_total.get_or_create(region_label).inc_by(n as u64);
                    let acked: std::collections::BTreeMap<String, String> = out
                        .acked()
                        .iter()
                        .filter(|(_, c, _)| c.is_empty())
                        .map(|(o, _, h)| (o.to_string(), meridian_replication::Version { time_ntp64: h, node_hlc_id: 0 }.to_string()))
                        .collect();
                    ctx.peers.update(peer, |s| {
                        s.changes_sent += n as u64;
                        s.peer_frontier = acked;
                    });
                }
                Message::Close { reason } => return Err(LinkError::PeerClosed(reason)),
                Message::Hello { .. } => return Err(meridian_replication::protocol::ProtocolError::UnexpectedMessage("hello").into()),
                Message::Batch { .. } | Message::Forward { .. } | Message::Forwarded { .. } => {
                    return Err(meridian_replication::protocol::ProtocolError::UnexpectedMessage("batch or forward on the subscription stream").into());
                }
            },
            _ = commits.changed() => {}
            () = tokio::time::sleep(IDLE_TICK) => {}
            () = &mut age_limit => {
                conn.close(0u32.into(), b"connection age limit");
                return Ok(());
            }
            _ = shutdown.changed() => {
                close_link(conn, send, 0, "node shutting down").await;
                return Ok(());
            }
        }
    }
}
