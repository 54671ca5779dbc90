//! The TCP relay: one accept task per link, one task per connection relaying both
//! directions itself, in order. Invariant: at most [`TCP_MAX_HELD_BYTES`] are held per
//! connection and direction; beyond, the relay stops reading and the sender sees backpressure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::EmulatorOptions;
use crate::schedule::{Rng, hold_time};
use crate::settings::{Dir, Impairment, LinkState, bump};

/// Bytes a TCP connection may hold per direction (read, not yet delivered) before the relay
/// stops reading from the source: the sender then sees TCP backpressure instead of the emulator
/// growing without bound while a direction is down or slow.
pub const TCP_MAX_HELD_BYTES: usize = 4 * 1024 * 1024;
/// Largest single read from a TCP source, so one chunk never needs more than this of the budget.
pub(crate) const TCP_READ_BYTES: usize = 64 * 1024;
/// Chunks a TCP connection may hold per direction: many tiny writes must not cost more
/// bookkeeping than the byte budget suggests.
const TCP_MAX_HELD_CHUNKS: usize = 16_384;
/// How long the relay waits for the upstream to accept a TCP connection.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read from a TCP source, waiting for their delivery time. Counted in `queued` for as
/// long as it exists, so chunks discarded with a broken connection leave the gauge right.
struct HeldChunk<'a> {
    at: Instant,
    data: Vec<u8>,
    queued: &'a AtomicU64,
}

impl<'a> HeldChunk<'a> {
    fn new(at: Instant, data: Vec<u8>, queued: &'a AtomicU64) -> HeldChunk<'a> {
        queued.fetch_add(1, Ordering::Relaxed);
        HeldChunk { at, data, queued }
    }
}

impl Drop for HeldChunk<'_> {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one direction of a TCP connection ended.
#[derive(Debug)]
enum TcpDirEnd {
    /// The source closed; everything read was delivered and the destination was shut down.
    Closed,
    /// Reading the source failed; everything read before was delivered and the destination
    /// was shut down.
    ReadFailed(std::io::Error),
    /// Writing to the destination failed; what was still held is lost with the connection.
    WriteFailed(std::io::Error),
    /// Shutting the destination down after the source closed failed.
    ShutdownFailed(std::io::Error),
}

impl std::fmt::Display for TcpDirEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TcpDirEnd::Closed => f.write_str("closed by the source"),
            TcpDirEnd::ReadFailed(e) => write!(f, "reading the source failed: {e}"),
            TcpDirEnd::WriteFailed(e) => write!(f, "writing to the destination failed: {e}"),
            TcpDirEnd::ShutdownFailed(e) => {
                write!(f, "shutting the destination down failed: {e}")
            }
        }
    }
}

/// When a chunk read now is delivered: `hold` later, but never before the previous chunk,
/// because a byte stream cannot let jitter reorder it.
fn tcp_delivery_time(now: Instant, hold: Duration, previous: Option<Instant>) -> Instant {
    let at = now + hold;
    match previous {
        Some(p) if p > at => p,
        _ => at,
    }
}

/// Relays `src` to `dst` for direction `dir` of `link` until the source closes (then the
/// destination is shut down once everything read has been delivered) or the destination fails.
async fn tcp_direction<R, W>(
    link: &LinkState,
    dir: Dir,
    mut src: R,
    mut dst: W,
    mut rng: Rng,
) -> TcpDirEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let state = link.dir(dir);
    let counters = &state.counters;
    // The byte budget: the reader takes a whole read's worth before reading (and gives back
    // what the read did not fill), the writer gives back what it delivered.
    let budget = Semaphore::new(TCP_MAX_HELD_BYTES);
    let budget = &budget;
    let (tx, mut rx) = mpsc::channel::<HeldChunk<'_>>(TCP_MAX_HELD_CHUNKS);
    let read_permits = u32::try_from(TCP_READ_BYTES).unwrap_or(u32::MAX);

    // Owns `tx`, so the writer sees the end of the channel exactly when reading has ended.
    let reader = async move {
        let mut buf = vec![0u8; TCP_READ_BYTES];
        let mut previous: Option<Instant> = None;
        loop {
            match budget.acquire_many(read_permits).await {
                Ok(permit) => permit.forget(),
                // The semaphore is never closed; treat it like a closed source all the same.
                Err(_) => return None,
            }
            let read_bytes = match src.read(&mut buf).await {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => return Some(e),
            };
            budget.add_permits(TCP_READ_BYTES - read_bytes);
            bump(&counters.packets_in);
            // Loss, duplication and reordering have no meaning on a byte stream.
            let settings = Impairment {
                reorder: 0.0,
                ..state.settings()
            };
            let at = tcp_delivery_time(Instant::now(), hold_time(&settings, &mut rng), previous);
            previous = Some(at);
            let chunk = HeldChunk::new(at, buf[..read_bytes].to_vec(), &counters.queued);
            if tx.send(chunk).await.is_err() {
                // The writer gave up on the destination: nothing more to read for.
                return None;
            }
        }
    };

    let writer = async {
        let mut settings = state.settings.subscribe();
        while let Some(chunk) = rx.recv().await {
            // Skipping the timer when the time has come keeps a zero delay at zero: a timer
            // entry would wait for the driver's next millisecond tick.
            if chunk.at > Instant::now() {
                tokio::time::sleep_until(chunk.at).await;
            }
            // A downed direction holds its bytes, like a cut cable under TCP retransmission.
            if settings.wait_for(|s| !s.down).await.is_err() {
                // The settings live as long as the link, which outlives this relay.
                return Err(TcpDirEnd::WriteFailed(std::io::Error::other(
                    "the link's settings are gone",
                )));
            }
            if let Err(e) = dst.write_all(&chunk.data).await {
                bump(&counters.send_errors);
                return Err(TcpDirEnd::WriteFailed(e));
            }
            bump(&counters.forwarded);
            counters
                .bytes_forwarded
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            budget.add_permits(chunk.data.len());
        }
        dst.shutdown().await.map_err(TcpDirEnd::ShutdownFailed)
    };

    tokio::pin!(reader, writer);
    tokio::select! {
        read_error = &mut reader => {
            let shut = writer.await;
            match (read_error, shut) {
                (_, Err(end)) => end,
                (Some(e), Ok(())) => TcpDirEnd::ReadFailed(e),
                (None, Ok(())) => TcpDirEnd::Closed,
            }
        }
        // The writer only finishes first when the destination failed; the reader is dropped
        // with whatever it was waiting for.
        written = &mut writer => match written {
            Err(end) => end,
            Ok(()) => TcpDirEnd::Closed,
        },
    }
}

/// Relays one accepted connection: connects to the upstream, then both directions until both
/// have ended.
async fn run_tcp_connection(link: Arc<LinkState>, client: TcpStream, peer: SocketAddr, seed: u64) {
    let link_name = link.name();
    let upstream = match tokio::time::timeout(
        TCP_CONNECT_TIMEOUT,
        TcpStream::connect(link.upstream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            bump(&link.forward.counters.send_errors);
            tracing::info!(link = %link_name, %peer, upstream = %link.upstream, error = %e, "cannot connect to the upstream; closing the client connection");
            return;
        }
        Err(_) => {
            bump(&link.forward.counters.send_errors);
            tracing::info!(link = %link_name, %peer, upstream = %link.upstream, timeout_s = TCP_CONNECT_TIMEOUT.as_secs(), "the upstream did not accept in time; closing the client connection");
            return;
        }
    };
    // Without TCP_NODELAY, Nagle's algorithm would add its own delay to small chunks and
    // distort the emulated latency.
    for (side, stream) in [("client", &client), ("upstream", &upstream)] {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(link = %link_name, %peer, side, error = %e, "cannot set TCP_NODELAY");
        }
    }
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let mut seeds = Rng::new(seed);
    let (forward, reverse) = tokio::join!(
        tcp_direction(
            &link,
            Dir::Forward,
            client_read,
            upstream_write,
            Rng::new(seeds.next_u64()),
        ),
        tcp_direction(
            &link,
            Dir::Reverse,
            upstream_read,
            client_write,
            Rng::new(seeds.next_u64()),
        ),
    );
    tracing::debug!(link = %link_name, %peer, %forward, %reverse, "relayed TCP connection ended");
}

/// Accepts connections on `listener` for `link` until aborted; the connections are aborted
/// with it (they live in this task's `JoinSet`).
pub(crate) async fn run_tcp_listener(
    link: Arc<LinkState>,
    listener: TcpListener,
    options: EmulatorOptions,
    seed: u64,
) {
    let mut connections: JoinSet<()> = JoinSet::new();
    let mut seeds = Rng::new(seed);
    let max_connections = options.max_clients_per_link.max(1);
    let link_name = link.name();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= max_connections {
                        // Turned away rather than evicting a live connection: the client sees
                        // the connection closed and can retry.
                        bump(&link.clients_evicted);
                        tracing::debug!(link = %link_name, %peer, max_connections, "too many relayed TCP connections; closing the new one");
                        drop(stream);
                        continue;
                    }
                    connections.spawn(run_tcp_connection(
                        Arc::clone(&link),
                        stream,
                        peer,
                        seeds.next_u64(),
                    ));
                }
                Err(e) => {
                    // Usually out of file descriptors: give the connections time to end.
                    tracing::debug!(link = %link_name, error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = joined
                    && e.is_panic()
                {
                    tracing::warn!(link = %link_name, error = %e, "a TCP relay task panicked");
                }
            }
        }
        link.clients
            .store(connections.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
