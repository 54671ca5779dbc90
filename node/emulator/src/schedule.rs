//! The delay scheduler (one bounded min-heap per link and direction, driven by
//! `tokio::time::sleep_until`) and the seeded RNG behind every random choice. Invariant:
//! datagrams leave in deadline order, FIFO among equal deadlines, and at most the queue
//! capacity wait at once.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::settings::{Dir, Impairment, LinkState, bump};

/// xorshift64* seeded through splitmix64 (no cryptographic quality needed).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    pub(crate) fn from_entropy(salt: u64) -> Rng {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        Rng::new(h.finish())
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            self.unit() < p
        }
    }

    /// Uniform in [0, n] (n inclusive).
    fn upto(&mut self, n: u64) -> u64 {
        if n == u64::MAX {
            self.next_u64()
        } else {
            self.next_u64() % (n + 1)
        }
    }
}

/// The time a datagram arriving now under `s` waits before it is sent on.
pub(crate) fn hold_time(s: &Impairment, rng: &mut Rng) -> Duration {
    let base_us = i128::from(s.delay_ms) * 1000;
    let jitter_us = u64::from(u32::try_from(s.jitter_ms.saturating_mul(1000)).unwrap_or(u32::MAX));
    let offset = if jitter_us == 0 {
        0
    } else {
        i128::from(rng.upto(2 * jitter_us)) - i128::from(jitter_us)
    };
    let mut us = (base_us + offset).max(0);
    if rng.chance(s.reorder) {
        let span_us = s.delay_ms.max(10) * 1000;
        us += 1000 + i128::from(rng.upto(span_us.saturating_sub(1000)));
    }
    Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX))
}

/// A datagram waiting for its time: sent on through `socket` to `dest` at `at`.
pub(crate) struct Scheduled {
    pub(crate) at: Instant,
    pub(crate) data: Vec<u8>,
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) dest: SocketAddr,
}

/// A heap entry: ordered by deadline, then by arrival (`seq`).
struct HeapEntry {
    at: Instant,
    seq: u64,
    item: Scheduled,
}

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for HeapEntry {}
impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Runs until every sender is gone. Datagrams leave in deadline order (FIFO among equal
/// deadlines); at most `capacity` wait at once.
pub(crate) async fn run_scheduler(
    link: Arc<LinkState>,
    dir: Dir,
    mut rx: mpsc::Receiver<Scheduled>,
    capacity: usize,
) {
    let mut heap: BinaryHeap<Reverse<HeapEntry>> = BinaryHeap::new();
    let mut seq: u64 = 0;
    let counters = &link.dir(dir).counters;
    let mut push = |heap: &mut BinaryHeap<Reverse<HeapEntry>>, item: Scheduled| {
        if heap.len() >= capacity {
            bump(&counters.dropped_queue_full);
        } else {
            seq += 1;
            heap.push(Reverse(HeapEntry {
                at: item.at,
                seq,
                item,
            }));
        }
    };
    loop {
        let next = heap.peek().map(|e| e.0.at);
        let wake = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = wake => {
                let now = Instant::now();
                while heap.peek().is_some_and(|e| e.0.at <= now) {
                    let Some(Reverse(entry)) = heap.pop() else { break };
                    let item = entry.item;
                    match item.socket.send_to(&item.data, item.dest).await {
                        Ok(sent_bytes) => {
                            bump(&counters.forwarded);
                            counters.bytes_forwarded.fetch_add(sent_bytes as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            bump(&counters.send_errors);
                            tracing::debug!(link = %format!("{} -> {}", link.from, link.to), dest = %item.dest, error = %e, "relay send failed");
                        }
                    }
                }
            }
            msg = rx.recv() => match msg {
                Some(item) => {
                    push(&mut heap, item);
                    while let Ok(item) = rx.try_recv() {
                        push(&mut heap, item);
                    }
                }
                None => break,
            },
        }
        counters.queued.store(heap.len() as u64, Ordering::Relaxed);
    }
}

/// Decides the fate of one datagram arriving for `dir` and hands it (and a duplicate) to the
/// scheduler.
pub(crate) fn admit(
    link: &LinkState,
    dir: Dir,
    rng: &mut Rng,
    data: &[u8],
    socket: &Arc<UdpSocket>,
    dest: SocketAddr,
    tx: &mpsc::Sender<Scheduled>,
) {
    let state = link.dir(dir);
    let c = &state.counters;
    bump(&c.packets_in);
    let s = state.settings();
    if s.down {
        bump(&c.dropped_down);
        return;
    }
    if rng.chance(s.loss) {
        bump(&c.dropped_loss);
        return;
    }
    let copies = if rng.chance(s.duplicate) {
        bump(&c.duplicated);
        2
    } else {
        1
    };
    let now = Instant::now();
    for _ in 0..copies {
        let item = Scheduled {
            at: now + hold_time(&s, rng),
            data: data.to_vec(),
            socket: Arc::clone(socket),
            dest,
        };
        if tx.try_send(item).is_err() {
            bump(&c.dropped_queue_full);
        }
    }
}

#[cfg(test)]
mod tests;
