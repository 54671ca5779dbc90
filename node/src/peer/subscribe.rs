//! The subscriber side of a link: dial a peer, state our frontier, receive the changes we
//! lack, merge them and acknowledge each batch once it is durable; reconnect with backoff.
//!
//! Architecture invariant: batches of one link commit in order, and each is acknowledged only
//! after its commit: the peer never believes we hold what a crash could lose.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_replication::backoff::Backoff;
use meridian_replication::protocol::{Frontier, Inbound, check_hello, plan_batch};
use meridian_replication::version::{ms_from_ntp64, ntp64_from_ms, seconds_from_ntp64};
use meridian_replication::wire::Message;
use tokio::sync::watch;

use super::frame::{
    AbortOnDrop, ack, clock_of, close_link, hello, note_peer_clock, peer_said_goodbye, read_msg,
    write_msg,
};
use super::status::Direction;
use super::tls::{self, MAX_CONNECTION_AGE};
use super::{Ctx, LinkError};
use crate::clock::unix_ms;
use crate::config::NodeConfig;
use crate::engine::{ApplyStats, Engine};
use crate::observe::metrics::{PeerLink, PeerRegion};
use crate::observe::rate_limit::LogLimiter;
use crate::store::StoreError;

/// Random bits to spread the reconnects of many links: no cryptographic quality is needed, and
/// no clock is read (each `RandomState` is keyed afresh).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// A failing link to one peer is logged at most once per this (with how many failures were
/// not logged in between).
const LINK_FAILURE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// Received batches waiting to be applied on one link; beyond it, the reader stops reading and
/// QUIC's stream flow control holds the sender back.
const INBOUND_QUEUE_BATCHES: usize = 8;
/// Received batches applied together in one transaction at most.
const MAX_COALESCED_BATCHES: usize = 8;

/// What this node states it holds, per origin and class both regions may hold: its stored
/// frontier; and, while a recovery may have lost some of its own batches, what it knows it
/// holds of itself, so that `peer` sends back what it has above that. Without a recovery the
/// node states nothing of itself and is sent nothing of itself, as peers of older builds do.
fn hello_frontier(engine: &Engine, shared: &[String]) -> Result<Frontier, StoreError> {
    let store = engine.store();
    let mut frontier = store.frontier()?;
    if let Some(recovery) = store.own_recovery()? {
        if own_recovery_done(engine, &frontier, recovery.lost_before) {
            store.finish_own_recovery()?;
            tracing::info!(
                "peers sent back every change of this node's own that they hold; recovery done"
            );
        } else {
            for class in shared {
                frontier.raise(&engine.node_id, class, recovery.complete_to);
            }
        }
    }
    Ok(frontier.restricted_to(shared))
}

/// Peers vouched for this node's own changes, of every class some peer may hold, up to the
/// end of what a recovery may have lost: all of them that exist anywhere are back.
fn own_recovery_done(engine: &Engine, frontier: &Frontier, lost_before: u64) -> bool {
    let policy = &engine.topology.residency;
    engine
        .topology
        .peers_of(&engine.node_id)
        .flat_map(|peer| policy.shared_classes(&engine.region, &peer.region))
        .all(|class| frontier.get(&engine.node_id, &class) >= lost_before)
}

/// Keep a subscription to `peer` alive: dial, receive, reconnect with backoff.
pub(super) async fn subscribe_loop(ctx: Arc<Ctx>, peer: NodeConfig) {
    let engine = &ctx.engine;
    let mut shutdown = ctx.shutdown.clone();
    let mut reachable = ctx.reachable.get(&peer.id).map(watch::Sender::subscribe);
    let mut backoff = Backoff::new();
    let mut failure_log = LogLimiter::new(LINK_FAILURE_LOG_INTERVAL);
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
        match result {
            Ok(()) => {
                backoff.reset();
                failure_log.reset();
            }
            Err(LinkError::PeerReachedUs) => {
                tracing::info!(peer = %peer.id, "peer reached this node while a dial to it was pending; dialling again now");
                backoff.reset();
                continue;
            }
            Err(e) if peer_restarted(&e) => {
                // The link was to an earlier process of the peer: a new one is there now.
                tracing::info!(peer = %peer.id, error = %e, "the peer restarted; dialling its new process now");
                backoff.reset();
                failure_log.reset();
                continue;
            }
            Err(e) if peer_said_goodbye(&e).is_some() => {
                let reason = peer_said_goodbye(&e).unwrap_or_default();
                // A peer that says goodbye (shutdown, connection age) is not a failure.
                tracing::info!(peer = %peer.id, %reason, "peer closed the link; reconnecting");
                backoff.reset();
                failure_log.reset();
            }
            Err(e) => {
                let text = e.to_string();
                // One line per peer per interval, not one per retry: the text of a repeating
                // failure may differ each time (an expired certificate counts its seconds).
                if let Some(suppressed) = failure_log.allow(Instant::now()) {
                    tracing::warn!(peer = %peer.id, peer_region = %peer.region, %addr, error = %text, suppressed, "replication link from peer failed; retrying with backoff");
                }
                engine
                    .metrics
                    .link_errors_total
                    .get_or_create(&PeerRegion::of(&peer.region))
                    .inc();
                ctx.peers.update(&peer.id, |s| s.last_error = Some(text));
                backoff.failed_after(started.elapsed());
            }
        }
        let wait = backoff.next_wait(random_u64());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = peer_reached_us(reachable.as_mut()) => backoff.reset(),
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

/// The link to a process that is gone: our probe was answered by a stateless reset from the
/// peer's new process, or by nothing.
fn peer_restarted(e: &LinkError) -> bool {
    let conn_err = match e {
        LinkError::StaleLink { .. } => return true,
        LinkError::Connection(c) => c,
        LinkError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => c,
        LinkError::Write(quinn::WriteError::ConnectionLost(c)) => c,
        _ => return false,
    };
    matches!(conn_err, quinn::ConnectionError::Reset)
}

/// A probe of an established link: anything received after it was sent shows the link alive.
struct Probe {
    datagrams_before: u64,
    wait: Duration,
    due: tokio::time::Instant,
}

/// A live peer acknowledges a probe within a round trip and its acknowledgement delay; this
/// is several times that, at least [`PROBE_MIN_WAIT`].
const PROBE_MIN_WAIT: Duration = Duration::from_millis(1500);

impl Probe {
    /// Sends one ack-eliciting packet (a one-byte datagram, which a live peer drops unread):
    /// a live peer acknowledges it, and a restarted peer answers it with a stateless reset
    /// (its reset key is stable), which ends this link at once. `None` if the connection
    /// cannot carry datagrams.
    fn send(conn: &quinn::Connection) -> Option<Probe> {
        let datagrams_before = conn.stats().udp_rx.datagrams;
        conn.send_datagram(bytes::Bytes::from_static(&[0])).ok()?;
        let wait = PROBE_MIN_WAIT.max(conn.rtt() * 4);
        Some(Probe {
            datagrams_before,
            wait,
            due: tokio::time::Instant::now() + wait,
        })
    }

    fn answered(&self, conn: &quinn::Connection) -> bool {
        conn.stats().udp_rx.datagrams > self.datagrams_before
    }
}

/// Returns when `probe` is due; never without one.
async fn probe_due(probe: &Option<Probe>) {
    match probe {
        Some(p) => tokio::time::sleep_until(p.due).await,
        None => std::future::pending().await,
    }
}

async fn subscribe_once(
    ctx: &Ctx,
    peer: &NodeConfig,
    addr: SocketAddr,
    mut reachable: Option<&mut watch::Receiver<()>>,
) -> Result<(), LinkError> {
    let engine = &ctx.engine;
    let policy = &engine.topology.residency;
    let mut stop = ctx.shutdown.clone();
    // A dial to an unreachable peer can take until the handshake times out: shutdown must not
    // wait for it.
    let conn = tokio::select! {
        c = tls::dial(&ctx.endpoint, &ctx.tls, &peer.id, addr) => c?,
        () = peer_reached_us(reachable.as_deref_mut()) => return Err(LinkError::PeerReachedUs),
        _ = stop.changed() => return Ok(()),
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    let shared = policy.shared_classes(&engine.region, &peer.region);
    let frontier = hello_frontier(engine, &shared)?;
    let our_hello = hello(engine, &frontier);
    write_msg(&mut send, &our_hello).await?;
    let their_hello = read_msg(&mut recv).await?;
    if let Err(e) = check_hello(&their_hello, &engine.topology.cluster, &peer.id) {
        let reason = e.to_string();
        tracing::error!(peer = %peer.id, error = %reason, "refusing replication link");
        close_link(&conn, &mut send, 1, &reason).await;
        return Err(e.into());
    }
    note_peer_clock(
        engine,
        &peer.id,
        clock_of(&their_hello),
        Some(clock_of(&our_hello)),
    );
    let link = PeerLink::inbound(&peer.id, &peer.region);
    let region_label = PeerRegion::of(&peer.region);
    let up = engine.metrics.peer_up.get_or_create(&link).clone();
    let _link_up = ctx
        .peers
        .link_up_until_dropped(&peer.id, Direction::Inbound, unix_ms(), up);
    ctx.forwarder.register(&peer.id, Some(conn.clone()));
    ctx.peers.update(&peer.id, |s| s.last_error = None);
    // Set when the peer reached us while this link is up: is this link still to a live
    // process of the peer?
    let mut probe: Option<Probe> = None;
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
    let max_drift_ntp64 = ntp64_from_ms(engine.topology.clock.max_drift_ms);
    // At most one batch commits while the next is received and merged; its acknowledgements
    // are sent once it is durable.
    let mut in_flight: Option<CommitInFlight> = None;
    loop {
        let event = tokio::select! {
            m = frames.recv() => LinkEvent::Frame(m),
            r = commit_done(&mut in_flight) => LinkEvent::Committed(r),
            () = &mut age_limit => LinkEvent::AgeLimit,
            _ = shutdown.changed() => LinkEvent::Shutdown,
            () = peer_reached_us(reachable.as_deref_mut()) => LinkEvent::PeerReachedUs,
            () = probe_due(&probe) => LinkEvent::ProbeDue,
        };
        let first = match event {
            LinkEvent::Frame(Some(m)) => m?,
            LinkEvent::Frame(None) => return Err(LinkError::StreamEnded),
            LinkEvent::Committed(result) => {
                if let Some(done) = in_flight.take() {
                    finish_commit(ctx, peer, &region_label, &mut send, done, result).await?;
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
            LinkEvent::PeerReachedUs => {
                // A pending probe may predate the peer's restart (and have been answered by
                // the process that died since): only a probe sent now tells.
                probe = Probe::send(&conn);
                tracing::debug!(peer = %peer.id, sent = probe.is_some(), "the peer reached this node anew; probing this link");
                continue;
            }
            LinkEvent::ProbeDue => {
                if let Some(p) = probe.take()
                    && !p.answered(&conn)
                {
                    tracing::debug!(peer = %peer.id, "the probe of this link was not answered");
                    conn.close(0u32.into(), b"link went stale");
                    return Err(LinkError::StaleLink { waited: p.wait });
                }
                tracing::debug!(peer = %peer.id, "the probe of this link was answered");
                continue;
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
                    ctx.peers.update(&peer.id, |s| s.residency_violations += n);
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
                        finish_commit(ctx, peer, &region_label, &mut send, done, result).await?;
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
                    meridian_replication::protocol::ProtocolError::UnexpectedMessage("hello")
                        .into(),
                );
            }
            Some(Ok(Message::Ack { .. } | Message::Forward { .. } | Message::Forwarded { .. })) => {
                return Err(
                    meridian_replication::protocol::ProtocolError::UnexpectedMessage(
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
    /// The peer's subscription to us was accepted: probe this link.
    PeerReachedUs,
    ProbeDue,
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
    ctx: &Ctx,
    peer: &NodeConfig,
    region_label: &PeerRegion,
    send: &mut quinn::SendStream,
    done: CommitInFlight,
    result: Result<ApplyStats, LinkError>,
) -> Result<(), LinkError> {
    let engine = &ctx.engine;
    let stats = result?;
    for seq in done.seqs {
        write_msg(send, &ack(engine, seq)).await?;
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
    let lag_ms = newest_accepted.map(|hlc| now_ms.saturating_sub(ms_from_ntp64(hlc)));
    let lag_hist = engine.metrics.apply_lag_seconds.get_or_create(region_label);
    let now_ntp64 = engine.clock.now().time_ntp64;
    for hlc in &accepted_hlcs {
        lag_hist.observe(seconds_from_ntp64(now_ntp64.saturating_sub(*hlc)));
    }
    drop(lag_hist);
    if let Some(lag) = lag_ms {
        engine
            .metrics
            .replication_lag_seconds
            .get_or_create(region_label)
            .set(lag as f64 / 1000.0);
    }
    ctx.peers.update(&peer.id, |s| {
        s.changes_applied += stats.applied as u64;
        s.drift_refusals += stats.held_for_drift as u64;
        if lag_ms.is_some() {
            s.lag_ms = lag_ms;
            s.last_applied_unix_ms = Some(now_ms);
        }
    });
    Ok(())
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
