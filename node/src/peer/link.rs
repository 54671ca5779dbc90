//! The replication driver: the one place where the sans-IO core
//! (`meridian_replication::core`) meets quinn, redb and tokio.
//!
//! Each node dials every peer and *subscribes*: it states its frontier and receives, on that
//! connection, the changes it lacks (the peer's own and those the peer relays). Each node also
//! accepts its peers' subscriptions and streams to them. So every pair of nodes has two
//! connections, one per direction of data, which also matches how `[[links]]` routes one
//! directed dial through the link emulator.
//!
//! Architecture invariants:
//! * Both ends are authenticated by mutual TLS before any message (see `tls.rs`); the `Hello`
//!   must then name the authenticated node, the same cluster and protocol version.
//! * A sender streams from the change log on disk, never from an unbounded queue: a slow or dead
//!   peer costs one bounded window of batches, and local writes never wait for it.
//! * A frame is at most `MAX_FRAME_BYTES`, checked before reading it; a bad frame or protocol
//!   violation ends the link (which resumes from the durable frontier), never the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_replication::core::{
    ChangeSource, Frontier, Inbound, LogEntry, Outbound, StreamLimits, check_hello, plan_batch,
    shared_classes,
};
use meridian_replication::wire::{MAX_FRAME_BYTES, Message, PROTOCOL_VERSION};
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::engine::{ApplyStats, Engine, unix_ms};
use crate::observe::metrics::{PeerLink, PeerRegion, Reason};
use crate::peer::tls::{self, MAX_CONNECTION_AGE, PeerTls};
use crate::store::{Store, StoreError};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A peer that is down is dialled about this often (plus jitter). Low, because the time from a
/// healed partition to the redial is part of every catch-up (a cut longer than QUIC's idle
/// timeout ends the links), and a dial to a handful of peers every two seconds costs nothing.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Received batches waiting to be applied on one link; beyond it, the reader stops reading and
/// QUIC's stream flow control holds the sender back.
const INBOUND_QUEUE_BATCHES: usize = 8;
/// Received batches applied together in one transaction at most.
const MAX_COALESCED_BATCHES: usize = 8;
/// A sender with nothing new still sends progress this often, and retries held changes.
const IDLE_TICK: Duration = Duration::from_millis(500);

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
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    FrameTooLarge(usize),
    #[error("malformed message: {0}")]
    Wire(#[from] meridian_replication::wire::WireError),
    #[error("protocol: {0}")]
    Protocol(#[from] meridian_replication::core::ProtocolError),
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
}

/// The answer of a peer to a forwarded request.
#[derive(Debug)]
pub struct ForwardAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    pub region: String,
    pub node: String,
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no node of region(s) {regions:?} is connected{tried}")]
    NoneReachable { regions: Vec<String>, tried: String },
}

/// How long a forwarded request waits for a link to an allowed region that is still connecting.
const FORWARD_CONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long a forwarded request may take before the next candidate node is tried.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// Carries client requests for records pinned elsewhere over the authenticated peer links.
/// Uses the connections this node dialled (one per peer), one QUIC stream per request.
pub struct Forwarder {
    topology: Arc<crate::config::Topology>,
    conns: std::sync::Mutex<std::collections::HashMap<String, quinn::Connection>>,
}

impl Forwarder {
    fn conn(&self, node: &str) -> Option<quinn::Connection> {
        let conns = match self.conns.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        conns.get(node).cloned()
    }

    fn any_connected(&self, regions: &[String]) -> bool {
        regions
            .iter()
            .flat_map(|r| self.topology.nodes_in(r))
            .any(|n| self.conn(&n.id).is_some())
    }

    fn register(&self, node: &str, conn: Option<quinn::Connection>) {
        let mut conns = match self.conns.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        match conn {
            Some(c) => conns.insert(node.to_string(), c),
            None => conns.remove(node),
        };
    }

    /// Send `request` to a node of the first of `regions` that answers.
    pub async fn forward(
        &self,
        regions: &[String],
        request: Message,
    ) -> Result<ForwardAnswer, ForwardError> {
        // Right after start (or a reconnect) the links may still be connecting: wait a moment
        // for one instead of refusing at once.
        let waited = Instant::now();
        while !self.any_connected(regions) && waited.elapsed() < FORWARD_CONNECT_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut tried = Vec::new();
        for region in regions {
            for node in self.topology.nodes_in(region) {
                let Some(conn) = self.conn(&node.id) else {
                    continue;
                };
                match tokio::time::timeout(FORWARD_TIMEOUT, forward_rpc(&conn, &request)).await {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(e)) => tried.push(format!("{}: {e}", node.id)),
                    Err(_) => {
                        tried.push(format!("{}: no answer within {FORWARD_TIMEOUT:?}", node.id))
                    }
                }
            }
        }
        Err(ForwardError::NoneReachable {
            regions: regions.to_vec(),
            tried: if tried.is_empty() {
                String::new()
            } else {
                format!(" ({})", tried.join("; "))
            },
        })
    }
}

async fn forward_rpc(
    conn: &quinn::Connection,
    request: &Message,
) -> Result<ForwardAnswer, LinkError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, request).await?;
    let _ = send.finish();
    match read_msg(&mut recv).await? {
        Message::Forwarded {
            status,
            region,
            node,
            body,
        } => Ok(ForwardAnswer {
            status,
            body,
            region,
            node,
            replayed: false,
        }),
        _ => Err(
            meridian_replication::core::ProtocolError::UnexpectedMessage("non-forward answer")
                .into(),
        ),
    }
}

/// Serve requests that `peer` forwards to us on its connection, one stream each.
async fn serve_forwards(engine: Arc<Engine>, conn: quinn::Connection, peer: String) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let engine = engine.clone();
        let peer = peer.clone();
        tokio::spawn(
            async move {
                let request = match read_msg(&mut recv).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "bad forwarded request");
                        return;
                    }
                };
                let Message::Forward {
                    method,
                    key,
                    idempotency_key,
                    body,
                } = request
                else {
                    tracing::warn!(%peer, "unexpected message on a forwarding stream");
                    return;
                };
                let idem = (!idempotency_key.is_empty()).then_some(idempotency_key);
                let (status, answer, _) =
                    crate::http::execute_local(&engine, method, &key, &body, idem).await;
                let reply = Message::Forwarded {
                    status: status.as_u16(),
                    region: engine.region.clone(),
                    node: engine.node_id.clone(),
                    body: answer,
                };
                if let Err(e) = write_msg(&mut send, &reply).await {
                    tracing::warn!(%peer, error = %e, "answering a forwarded request failed");
                }
                let _ = send.finish();
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// Everything the link tasks share.
struct Ctx {
    forwarder: Arc<Forwarder>,
    engine: Arc<Engine>,
    tls: Arc<PeerTls>,
    endpoint: quinn::Endpoint,
    shutdown: watch::Receiver<bool>,
    /// Per peer: signalled when that peer reached us (its subscription was accepted). The path
    /// between us works again, so our own dial to it, waiting in backoff or in a handshake
    /// begun while the path was cut, starts over at once instead of at the next retry.
    reachable: HashMap<String, watch::Sender<()>>,
}

/// Start replication: bind the node's peer address, accept subscriptions, subscribe to every
/// peer. Returns when `shutdown` becomes true.
pub async fn run(
    engine: Arc<Engine>,
    tls: PeerTls,
    bind: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let endpoint = tls::endpoint(bind, &tls)?;
    let forwarder = Arc::new(Forwarder {
        topology: engine.topology.clone(),
        conns: Default::default(),
    });
    // Only one replication driver runs per engine; a second set would be a bug, not a state.
    let _ = engine.forwarder.set(forwarder.clone());
    let peers: Vec<NodeConfig> = engine.topology.peers_of(&engine.node_id).cloned().collect();
    let ctx = Arc::new(Ctx {
        forwarder,
        engine: engine.clone(),
        tls: Arc::new(tls),
        endpoint: endpoint.clone(),
        shutdown: shutdown.clone(),
        reachable: peers
            .iter()
            .map(|p| (p.id.clone(), watch::Sender::new(())))
            .collect(),
    });
    // Every line a link logs carries the node and region of the span we run in.
    let span = tracing::Span::current();
    let mut tasks = tokio::task::JoinSet::new();
    for peer in peers {
        tasks.spawn(subscribe_loop(ctx.clone(), peer).instrument(span.clone()));
    }
    tasks.spawn(accept_loop(ctx.clone()).instrument(span.clone()));
    tasks.spawn(retry_loop(ctx.clone()).instrument(span.clone()));
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

async fn write_msg(send: &mut quinn::SendStream, msg: &Message) -> Result<(), LinkError> {
    let bytes = msg.encode();
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bytes);
    send.write_all(&frame).await?;
    Ok(())
}

async fn read_msg(recv: &mut quinn::RecvStream) -> Result<Message, LinkError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(LinkError::StreamEnded),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME_BYTES {
        return Err(LinkError::FrameTooLarge(n));
    }
    let mut buf = vec![0u8; n];
    recv.read_exact(&mut buf).await?;
    Ok(Message::decode(&buf)?)
}

/// Reasons a node gives when it closes a link for ordinary causes.
const BENIGN_CLOSE_REASONS: [&str; 2] = ["node shutting down", "connection age limit"];

/// The reason, when a link ended because the peer closed it on purpose (shutdown, connection
/// age, refusal) rather than because something failed.
fn peer_said_goodbye(e: &LinkError) -> Option<String> {
    let conn_err = match e {
        // A refusal (identity, cluster, version) also arrives as a Close: it is a failure.
        LinkError::PeerClosed(reason) => {
            return BENIGN_CLOSE_REASONS
                .contains(&reason.as_str())
                .then(|| reason.clone());
        }
        LinkError::Connection(c) => c,
        LinkError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => c,
        LinkError::Write(quinn::WriteError::ConnectionLost(c)) => c,
        _ => return None,
    };
    match conn_err {
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == 0u32.into() => {
            Some(String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => None,
    }
}

/// Say why we close, let the peer read it (briefly), then close the connection with the same
/// reason, so both sides can log it.
async fn close_link(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: u32,
    reason: &str,
) {
    let _ = write_msg(
        send,
        &Message::Close {
            reason: reason.to_string(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(code.into(), reason.as_bytes());
}

fn hello(engine: &Engine, frontier: &Frontier) -> Message {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        cluster: engine.topology.cluster.clone(),
        node: engine.node_id.clone(),
        region: engine.region.clone(),
        frontier: frontier.entries(),
    }
}

fn update_peer(engine: &Engine, peer: &str, f: impl FnOnce(&mut crate::engine::PeerStatus)) {
    let mut peers = match engine.peers.lock() {
        Ok(p) => p,
        Err(p) => p.into_inner(),
    };
    if let Some(status) = peers.get_mut(peer) {
        f(status);
    }
}

fn jitter(base: Duration) -> Duration {
    // Spread reconnects of many links; cryptographic quality is not needed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64;
    let spread = (base.as_millis() as u64 / 2).max(1);
    Duration::from_millis(nanos % spread)
}

/// Keep a subscription to `peer` alive: dial, receive, reconnect with backoff.
async fn subscribe_loop(ctx: Arc<Ctx>, peer: NodeConfig) {
    let engine = &ctx.engine;
    let mut shutdown = ctx.shutdown.clone();
    let mut reachable = ctx.reachable.get(&peer.id).map(watch::Sender::subscribe);
    let mut backoff = BACKOFF_MIN;
    let mut last_error: Option<String> = None;
    let link = PeerLink {
        peer: peer.id.clone(),
        peer_region: peer.region.clone(),
        direction: "inbound",
    };
    loop {
        if *shutdown.borrow() {
            return;
        }
        let addr = engine
            .topology
            .dial_addr(&engine.node_id, &peer.id)
            .unwrap_or(peer.peer);
        let started = Instant::now();
        // Only a contact after this dial began counts as news.
        if let Some(r) = reachable.as_mut() {
            r.mark_unchanged();
        }
        let result = subscribe_once(&ctx, &peer, addr, reachable.as_mut()).await;
        ctx.forwarder.register(&peer.id, None);
        engine.metrics.peer_up.get_or_create(&link).set(0);
        update_peer(engine, &peer.id, |s| {
            s.inbound_connected = false;
            s.inbound_since_unix_ms = None;
        });
        match result {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                last_error = None;
            }
            Err(LinkError::PeerReachedUs) => {
                tracing::info!(peer = %peer.id, "peer reached this node while a dial to it was pending; dialling again now");
                backoff = BACKOFF_MIN;
                continue;
            }
            Err(e) if peer_said_goodbye(&e).is_some() => {
                let reason = peer_said_goodbye(&e).unwrap_or_default();
                // A peer that says goodbye (shutdown, connection age) is not a failure.
                tracing::info!(peer = %peer.id, %reason, "peer closed the link; reconnecting");
                backoff = BACKOFF_MIN;
                last_error = None;
            }
            Err(e) => {
                let text = e.to_string();
                // Log a failure once, not at every retry of the same failure.
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(peer = %peer.id, peer_region = %peer.region, %addr, error = %text, "replication link from peer failed; retrying with backoff");
                }
                engine
                    .metrics
                    .link_errors_total
                    .get_or_create(&PeerRegion {
                        peer_region: peer.region.clone(),
                    })
                    .inc();
                update_peer(engine, &peer.id, |s| s.last_error = Some(text.clone()));
                last_error = Some(text);
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = BACKOFF_MIN;
                }
            }
        }
        let wait = backoff + jitter(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = peer_reached_us(reachable.as_mut()) => backoff = BACKOFF_MIN,
            _ = shutdown.changed() => {}
        }
    }
}

/// Returns when the peer behind `reachable` reaches this node; never without one.
async fn peer_reached_us(reachable: Option<&mut watch::Receiver<()>>) {
    match reachable {
        Some(r) => {
            if r.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn subscribe_once(
    ctx: &Ctx,
    peer: &NodeConfig,
    addr: SocketAddr,
    reachable: Option<&mut watch::Receiver<()>>,
) -> Result<(), LinkError> {
    let engine = &ctx.engine;
    let policy = &engine.topology.residency;
    let mut stop = ctx.shutdown.clone();
    // A dial to an unreachable peer can take until the handshake times out: shutdown must not
    // wait for it.
    let conn = tokio::select! {
        c = tls::dial(&ctx.endpoint, &ctx.tls, &peer.id, addr) => c?,
        () = peer_reached_us(reachable) => return Err(LinkError::PeerReachedUs),
        _ = stop.changed() => return Ok(()),
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    let shared = shared_classes(policy, &engine.region, &peer.region);
    let frontier = engine.store().frontier()?.restricted_to(&shared);
    write_msg(&mut send, &hello(engine, &frontier)).await?;
    let their_hello = read_msg(&mut recv).await?;
    if let Err(e) = check_hello(&their_hello, &engine.topology.cluster, &peer.id) {
        let reason = e.to_string();
        tracing::error!(peer = %peer.id, error = %reason, "refusing replication link");
        close_link(&conn, &mut send, 1, &reason).await;
        return Err(e.into());
    }
    let link = PeerLink {
        peer: peer.id.clone(),
        peer_region: peer.region.clone(),
        direction: "inbound",
    };
    let region_label = PeerRegion {
        peer_region: peer.region.clone(),
    };
    engine.metrics.peer_up.get_or_create(&link).set(1);
    ctx.forwarder.register(&peer.id, Some(conn.clone()));
    update_peer(engine, &peer.id, |s| {
        s.inbound_connected = true;
        s.inbound_since_unix_ms = Some(unix_ms());
        s.last_error = None;
    });
    tracing::info!(peer = %peer.id, peer_region = %peer.region, "receiving changes from peer");
    let mut inbound = Inbound::default();
    let age_limit = tokio::time::sleep(MAX_CONNECTION_AGE);
    tokio::pin!(age_limit);
    let mut shutdown = ctx.shutdown.clone();
    // A reader task keeps receiving while a batch is being applied, so the batches that arrive
    // meanwhile are applied together, in one transaction and one fsync: group commit for
    // replication. The channel bounds what can queue here; QUIC flow control does the rest.
    let (frames_tx, mut frames) =
        tokio::sync::mpsc::channel::<Result<Message, LinkError>>(INBOUND_QUEUE_BATCHES);
    let reader = tokio::spawn(async move {
        loop {
            let msg = read_msg(&mut recv).await;
            let end = msg.is_err();
            if frames_tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let max_drift_ntp64 = ((u128::from(engine.topology.clock.max_drift_ms) << 32) / 1000) as u64;
    // At most one batch commits while the next is received and merged; its acknowledgements
    // are sent once it is durable.
    let mut in_flight: Option<CommitInFlight> = None;
    loop {
        let event = tokio::select! {
            m = frames.recv() => LinkEvent::Frame(m),
            r = commit_done(&mut in_flight) => LinkEvent::Committed(r),
            () = &mut age_limit => LinkEvent::AgeLimit,
            _ = shutdown.changed() => LinkEvent::Shutdown,
        };
        let first = match event {
            LinkEvent::Frame(Some(m)) => m?,
            LinkEvent::Frame(None) => return Err(LinkError::StreamEnded),
            LinkEvent::Committed(result) => {
                if let Some(done) = in_flight.take() {
                    finish_commit(engine, peer, &region_label, &mut send, done, result).await?;
                }
                continue;
            }
            LinkEvent::AgeLimit => {
                // Reconnecting re-checks certificates, so rotated or revoked ones take effect.
                // A commit still running finishes on its own; the next link's hello states it.
                conn.close(0u32.into(), b"connection age limit");
                return Ok(());
            }
            LinkEvent::Shutdown => {
                close_link(&conn, &mut send, 0, "node shutting down").await;
                return Ok(());
            }
        };
        let mut batches = Vec::new();
        let mut after: Option<Result<Message, LinkError>> = None;
        match first {
            b @ Message::Batch { .. } => batches.push(b),
            other => after = Some(Ok(other)),
        }
        while !batches.is_empty() && batches.len() < MAX_COALESCED_BATCHES {
            match frames.try_recv() {
                Ok(Ok(b @ Message::Batch { .. })) => batches.push(b),
                Ok(other) => {
                    after = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        if !batches.is_empty() {
            let mut seqs = Vec::with_capacity(batches.len());
            let mut changes = Vec::new();
            let mut progress = Vec::new();
            for batch in batches {
                if let Message::Batch {
                    seq,
                    changes: c,
                    progress: p,
                } = batch
                {
                    inbound.accept(seq)?;
                    seqs.push(seq);
                    changes.extend(c);
                    progress.extend(p);
                }
            }
            {
                let current = engine.store().frontier()?;
                // One plan for all: plan_batch tracks the frontier across the changes in order,
                // and applies the progress vouches after them.
                let plan = plan_batch(
                    changes,
                    &progress,
                    &|o, c| current.get(o, c),
                    policy,
                    &engine.region,
                    engine.clock.now().time_ntp64,
                    max_drift_ntp64,
                );
                if !plan.refused.is_empty() {
                    let keys: Vec<&str> = plan
                        .refused
                        .iter()
                        .take(5)
                        .map(|c| c.key.as_str())
                        .collect();
                    tracing::error!(peer = %peer.id, peer_region = %peer.region, refused = plan.refused.len(), example_keys = ?keys, "peer sent changes of records this region may not hold; refused");
                    engine
                        .metrics
                        .residency_refused_total
                        .get_or_create(&region_label)
                        .inc_by(plan.refused.len() as u64);
                    let n = plan.refused.len() as u64;
                    update_peer(engine, &peer.id, |s| s.residency_violations += n);
                }
                let accepted_hlcs: Vec<u64> = plan
                    .by_key
                    .values()
                    .flatten()
                    .filter(|a| !a.held_for_drift)
                    .map(|a| a.hlc)
                    .collect();
                let prepared = engine.prepare_remote(plan).await?;
                // Commits stay in order: the previous batch is durable and acknowledged before
                // this one is handed to the writer.
                if in_flight.is_some() {
                    let result = commit_done(&mut in_flight).await;
                    if let Some(done) = in_flight.take() {
                        finish_commit(engine, peer, &region_label, &mut send, done, result).await?;
                    }
                }
                let committing = Arc::clone(engine);
                in_flight = Some(CommitInFlight {
                    seqs,
                    accepted_hlcs,
                    task: tokio::spawn(async move { committing.commit_prepared(prepared).await }),
                });
            }
        }
        match after {
            None => {}
            Some(Err(e)) => return Err(e),
            Some(Ok(Message::Close { reason })) => return Err(LinkError::PeerClosed(reason)),
            Some(Ok(Message::Batch { .. })) => {}
            Some(Ok(Message::Hello { .. })) => {
                return Err(
                    meridian_replication::core::ProtocolError::UnexpectedMessage("hello").into(),
                );
            }
            Some(Ok(Message::Ack { .. } | Message::Forward { .. } | Message::Forwarded { .. })) => {
                return Err(
                    meridian_replication::core::ProtocolError::UnexpectedMessage(
                        "ack or forward on the subscription stream",
                    )
                    .into(),
                );
            }
        }
    }
}

/// What a link's event loop waits for.
enum LinkEvent {
    Frame(Option<Result<Message, LinkError>>),
    Committed(Result<ApplyStats, LinkError>),
    AgeLimit,
    Shutdown,
}

/// A received batch being committed in its own task, with what its acknowledgement and
/// metrics need once it is durable.
struct CommitInFlight {
    seqs: Vec<u64>,
    accepted_hlcs: Vec<u64>,
    task: tokio::task::JoinHandle<Result<ApplyStats, crate::engine::WriteError>>,
}

/// The outcome of the commit in flight; never ready when there is none.
async fn commit_done(in_flight: &mut Option<CommitInFlight>) -> Result<ApplyStats, LinkError> {
    match in_flight {
        Some(f) => match (&mut f.task).await {
            Ok(result) => result.map_err(LinkError::from),
            Err(e) => Err(LinkError::Apply(crate::engine::WriteError::Storage(
                format!("commit task failed: {e}"),
            ))),
        },
        None => std::future::pending().await,
    }
}

/// Acknowledge a committed batch and account for it in metrics and status.
async fn finish_commit(
    engine: &Arc<Engine>,
    peer: &NodeConfig,
    region_label: &PeerRegion,
    send: &mut quinn::SendStream,
    done: CommitInFlight,
    result: Result<ApplyStats, LinkError>,
) -> Result<(), LinkError> {
    let stats = result?;
    for seq in done.seqs {
        write_msg(send, &Message::Ack { seq }).await?;
    }
    let accepted_hlcs = done.accepted_hlcs;
    let newest_accepted = accepted_hlcs.iter().copied().max();
    if stats.held_for_drift > 0 {
        engine
            .metrics
            .drift_refusals_total
            .get_or_create(region_label)
            .inc_by(stats.held_for_drift as u64);
        tracing::warn!(peer = %peer.id, held = stats.held_for_drift, "received changes stamped beyond the maximum clock drift; held until this clock catches up");
    }
    engine
        .metrics
        .changes_applied_total
        .get_or_create(region_label)
        .inc_by(stats.applied as u64);
    if stats.quarantined > 0 {
        engine
            .metrics
            .changes_quarantined_total
            .inc_by(stats.quarantined as u64);
    }
    let now_ms = unix_ms();
    let lag_ms = newest_accepted.map(|hlc| {
        let origin_ms = meridian_replication::Version {
            time_ntp64: hlc,
            node_hlc_id: 0,
        }
        .unix_ms();
        now_ms.saturating_sub(origin_ms)
    });
    let lag_hist = engine.metrics.apply_lag_seconds.get_or_create(region_label);
    let now_ntp64 = engine.clock.now().time_ntp64;
    for hlc in &accepted_hlcs {
        // NTP64: upper 32 bits seconds, lower 32 bits fraction.
        lag_hist.observe(now_ntp64.saturating_sub(*hlc) as f64 / 4_294_967_296.0);
    }
    drop(lag_hist);
    if let Some(lag) = lag_ms {
        engine
            .metrics
            .replication_lag_seconds
            .get_or_create(region_label)
            .set(lag as f64 / 1000.0);
    }
    update_peer(engine, &peer.id, |s| {
        s.changes_applied += stats.applied as u64;
        s.drift_refusals += stats.held_for_drift as u64;
        if lag_ms.is_some() {
            s.lag_ms = lag_ms;
            s.last_applied_unix_ms = Some(now_ms);
        }
    });
    Ok(())
}

/// Aborts a task when dropped, so a link's reader never outlives the link.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut links = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = ctx.endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        // Bound the number of concurrent subscriptions: each peer needs one.
        let max_links = ctx.engine.topology.nodes.len() * 2;
        while links.try_join_next().is_some() {}
        if links.len() >= max_links {
            incoming.refuse();
            continue;
        }
        let ctx = ctx.clone();
        let span = tracing::Span::current();
        links.spawn(
            async move {
                let remote = incoming.remote_address();
                if let Err(e) = serve_subscriber(&ctx, incoming).await {
                    if peer_said_goodbye(&e).is_some() || matches!(e, LinkError::StreamEnded) {
                        tracing::debug!(%remote, error = %e, "subscriber link ended");
                    } else {
                        tracing::warn!(%remote, error = %e, "subscriber link ended with an error");
                    }
                }
            }
            .instrument(span),
        );
    }
    links.abort_all();
}

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

async fn serve_subscriber(ctx: &Ctx, incoming: quinn::Incoming) -> Result<(), LinkError> {
    let engine = &ctx.engine;
    let conn = incoming.await?;
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
    write_msg(&mut send, &hello(engine, &Frontier::default())).await?;
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
    let link = PeerLink {
        peer: identity.node_id.clone(),
        peer_region: identity.region.clone(),
        direction: "outbound",
    };
    let region_label = PeerRegion {
        peer_region: identity.region.clone(),
    };
    engine.metrics.peer_up.get_or_create(&link).set(1);
    update_peer(engine, &identity.node_id, |s| {
        s.outbound_connected = true;
        s.outbound_since_unix_ms = Some(unix_ms());
    });
    tracing::info!(peer = %identity.node_id, peer_region = %identity.region, "streaming changes to peer");
    let result = stream_to(
        ctx,
        &conn,
        &mut send,
        &mut recv,
        &mut out,
        &identity.node_id,
        &region_label,
    )
    .await;
    forwards.abort();
    engine.metrics.peer_up.get_or_create(&link).set(0);
    update_peer(engine, &identity.node_id, |s| {
        s.outbound_connected = false;
        s.outbound_since_unix_ms = None;
    });
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
                Message::Ack { seq } => {
                    let n = out.on_ack(seq)?;
                    engine.metrics.changes_sent_total.get_or_create(region_label).inc_by(n as u64);
                    let acked: std::collections::BTreeMap<String, String> = out
                        .acked()
                        .iter()
                        .filter(|(_, c, _)| c.is_empty())
                        .map(|(o, _, h)| (o.to_string(), meridian_replication::Version { time_ntp64: h, node_hlc_id: 0 }.to_string()))
                        .collect();
                    update_peer(engine, peer, |s| {
                        s.changes_sent += n as u64;
                        s.peer_frontier = acked;
                    });
                }
                Message::Close { reason } => return Err(LinkError::PeerClosed(reason)),
                Message::Hello { .. } => return Err(meridian_replication::core::ProtocolError::UnexpectedMessage("hello").into()),
                Message::Batch { .. } | Message::Forward { .. } | Message::Forwarded { .. } => {
                    return Err(meridian_replication::core::ProtocolError::UnexpectedMessage("batch or forward on the subscription stream").into());
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
        if let Ok((_, counts)) = engine.store().pending_summary(0, 0) {
            for (reason, n) in [
                ("waiting_for_dependencies", counts[0]),
                ("held_for_drift", counts[1]),
                ("quarantined", counts[2]),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pending_dial_is_cut_short_only_by_contact_after_it_began() {
        let reached = watch::Sender::new(());
        let mut seen = reached.subscribe();
        let short = Duration::from_millis(50);
        // Contact before this dial began is old news.
        reached.send_replace(());
        seen.mark_unchanged();
        assert!(
            tokio::time::timeout(short, peer_reached_us(Some(&mut seen)))
                .await
                .is_err()
        );
        // Contact while it is pending ends the wait.
        reached.send_replace(());
        assert!(
            tokio::time::timeout(Duration::from_secs(30), peer_reached_us(Some(&mut seen)))
                .await
                .is_ok()
        );
        // Without a signal for the peer, nothing ends it.
        assert!(
            tokio::time::timeout(short, peer_reached_us(None))
                .await
                .is_err()
        );
    }
}
