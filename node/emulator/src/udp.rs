//! The UDP relay: one listener task per link and one upstream task per client address, each
//! client with its own upstream socket so QUIC sees one stable path per connection.
//! Invariant: at most `max_clients_per_link` clients per link; the least recently active one
//! makes room, and one idle for `client_idle` is evicted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::EmulatorOptions;
use crate::schedule::{Rng, Scheduled, admit, run_scheduler};
use crate::settings::{Dir, LinkState, bump};

/// Largest UDP datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// Capacity of the hand-off channel in front of each scheduler.
const HANDOFF_CAPACITY: usize = 1_024;

/// Spawns the relay of one link into `tasks`: a delay scheduler per direction and the
/// listener on `socket` (the link's bound `via`).
pub(crate) fn spawn_link(
    tasks: &mut JoinSet<()>,
    link: &Arc<LinkState>,
    socket: UdpSocket,
    options: EmulatorOptions,
    epoch: Instant,
    seed: u64,
) {
    let (forward_tx, forward_rx) = mpsc::channel(HANDOFF_CAPACITY);
    let (reverse_tx, reverse_rx) = mpsc::channel(HANDOFF_CAPACITY);
    let capacity = options.queue_capacity.max(1);
    tasks.spawn(run_scheduler(
        Arc::clone(link),
        Dir::Forward,
        forward_rx,
        capacity,
    ));
    tasks.spawn(run_scheduler(
        Arc::clone(link),
        Dir::Reverse,
        reverse_rx,
        capacity,
    ));
    tasks.spawn(run_listener(RelayCtx {
        link: Arc::clone(link),
        listener: Arc::new(socket),
        forward_tx,
        reverse_tx,
        options,
        epoch,
        seed,
    }));
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Client {
    upstream: Arc<UdpSocket>,
    last_seen: Arc<AtomicU64>,
    _task: AbortOnDrop,
}

/// Milliseconds since `epoch`.
fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What a link's listener task needs: its socket, the hand-offs to its two schedulers, and
/// the seed of its random choices.
struct RelayCtx {
    link: Arc<LinkState>,
    listener: Arc<UdpSocket>,
    forward_tx: mpsc::Sender<Scheduled>,
    reverse_tx: mpsc::Sender<Scheduled>,
    options: EmulatorOptions,
    epoch: Instant,
    seed: u64,
}

async fn run_listener(ctx: RelayCtx) {
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let mut rng = Rng::new(ctx.seed);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let sweep_every = (ctx.options.client_idle / 4).max(Duration::from_millis(100));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_ms = u64::try_from(ctx.options.client_idle.as_millis()).unwrap_or(u64::MAX);
    let link_name = format!("{} -> {}", ctx.link.from, ctx.link.to);
    loop {
        tokio::select! {
            received = ctx.listener.recv_from(&mut buf) => {
                let (n, client) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(link = %link_name, error = %e, "relay receive failed");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                };
                let now_ms = millis_since(ctx.epoch);
                if !clients.contains_key(&client) {
                    if clients.len() >= ctx.options.max_clients_per_link.max(1) {
                        // Make room: the least recently active client goes.
                        if let Some(oldest) = clients
                            .iter()
                            .min_by_key(|(_, c)| c.last_seen.load(Ordering::Relaxed))
                            .map(|(a, _)| *a)
                        {
                            clients.remove(&oldest);
                            bump(&ctx.link.clients_evicted);
                        }
                    }
                    match new_client(&ctx, client, clients.len() as u64).await {
                        Ok(c) => {
                            tracing::debug!(link = %link_name, %client, "new relay client");
                            clients.insert(client, c);
                        }
                        Err(e) => {
                            tracing::warn!(link = %link_name, %client, error = %e, "cannot open an upstream socket");
                            bump(&ctx.link.forward.counters.packets_in);
                            bump(&ctx.link.forward.counters.send_errors);
                            continue;
                        }
                    }
                    ctx.link.clients.store(clients.len() as u64, Ordering::Relaxed);
                }
                let Some(c) = clients.get(&client) else { continue };
                c.last_seen.store(now_ms, Ordering::Relaxed);
                admit(
                    &ctx.link,
                    Dir::Forward,
                    &mut rng,
                    &buf[..n],
                    &c.upstream,
                    ctx.link.upstream,
                    &ctx.forward_tx,
                );
            }
            _ = sweep.tick() => {
                let now_ms = millis_since(ctx.epoch);
                let before = clients.len();
                clients.retain(|_, c| now_ms.saturating_sub(c.last_seen.load(Ordering::Relaxed)) < idle_ms);
                let evicted = before - clients.len();
                if evicted > 0 {
                    ctx.link.clients_evicted.fetch_add(evicted as u64, Ordering::Relaxed);
                    ctx.link.clients.store(clients.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn new_client(ctx: &RelayCtx, client: SocketAddr, salt: u64) -> std::io::Result<Client> {
    let bind: SocketAddr = match ctx.link.upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
    };
    let bind = if ctx.link.upstream.ip().is_loopback() {
        bind
    } else {
        // A non-loopback upstream: let the OS choose the source address.
        match bind {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        }
    };
    let upstream = Arc::new(UdpSocket::bind(bind).await?);
    let last_seen = Arc::new(AtomicU64::new(millis_since(ctx.epoch)));
    let task = tokio::spawn(run_upstream(
        Arc::clone(&ctx.link),
        Arc::clone(&upstream),
        Arc::clone(&ctx.listener),
        client,
        ctx.reverse_tx.clone(),
        Arc::clone(&last_seen),
        ctx.epoch,
        ctx.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(client.port()),
    ));
    Ok(Client {
        upstream,
        last_seen,
        _task: AbortOnDrop(task),
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_upstream(
    link: Arc<LinkState>,
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    reverse_tx: mpsc::Sender<Scheduled>,
    last_seen: Arc<AtomicU64>,
    epoch: Instant,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match upstream.recv_from(&mut buf).await {
            Ok((n, from)) => {
                if from != link.upstream {
                    // Only the server may answer through this socket.
                    continue;
                }
                last_seen.store(millis_since(epoch), Ordering::Relaxed);
                admit(
                    &link,
                    Dir::Reverse,
                    &mut rng,
                    &buf[..n],
                    &listener,
                    client,
                    &reverse_tx,
                );
            }
            Err(e) => {
                tracing::debug!(%client, error = %e, "upstream receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}
