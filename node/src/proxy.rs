//! The link emulator (`meridian proxy`, issue 5 item 1): a user-space UDP relay that injects
//! one-way delay, jitter, loss, duplication, reordering and partitions on the links a topology
//! routes through it (`[[links]] via`). The same emulator also relays TCP
//! ([`Emulator::start_tcp_links`]), so that a benchmark can put another system's TCP peer links
//! (etcd) behind the same per-link, per-direction settings as Meridian's QUIC links; see there
//! for what each setting means on a byte stream.
//!
//! For every link, the [`Emulator`] listens on `via` and relays to the `to` node's peer
//! address, in both directions: datagrams from a client (the dialling node) go *forward* to the
//! server, the server's answers go *reverse* back to that client. Each client address gets its
//! own upstream socket (bound to port 0 on loopback), kept as long as the client is active, so
//! QUIC sees one stable path per connection. At most [`EmulatorOptions::max_clients_per_link`]
//! clients are kept per link; a client idle for [`EmulatorOptions::client_idle`] is evicted, and
//! when the table is full the least recently active client makes room.
//!
//! Impairments ([`Impairment`]) are set per link and per direction and may change while the
//! emulator runs: they apply to datagrams that arrive after the change. Delayed datagrams wait
//! in one bounded min-heap per link and direction (a scheduler task driven by
//! `tokio::time::sleep_until`), never one task per datagram; beyond the bound they are dropped
//! and counted.
//!
//! TCP links have no such scheduler: every connection relays its two directions itself, in
//! order, with at most [`TCP_MAX_HELD_BYTES`] held per direction before it stops reading.
//!
//! A small HTTP control API ([`control_router`]) reads and changes the settings:
//! `GET /links`, `PUT /links/{from}/{to}`, `PUT /links`, `GET /healthz`. The CLI's
//! `meridian proxy set` talks to it with the tiny HTTP/1.1 client [`control_request`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::Topology;

/// Largest delay or jitter accepted, in milliseconds (one minute).
pub const MAX_DELAY_MS: u64 = 60_000;
/// Largest UDP datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// Capacity of the hand-off channel in front of each scheduler.
const HANDOFF_CAPACITY: usize = 1_024;
/// Largest HTTP answer the control client reads.
const MAX_CONTROL_RESPONSE: u64 = 8 * 1024 * 1024;
/// Timeout of one control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a TCP connection may hold per direction (read, not yet delivered) before the relay
/// stops reading from the source: the sender then sees TCP backpressure instead of the emulator
/// growing without bound while a direction is down or slow.
pub const TCP_MAX_HELD_BYTES: usize = 4 * 1024 * 1024;
/// Largest single read from a TCP source, so one chunk never needs more than this of the budget.
const TCP_READ_BYTES: usize = 64 * 1024;
/// Chunks a TCP connection may hold per direction: many tiny writes must not cost more
/// bookkeeping than the byte budget suggests.
const TCP_MAX_HELD_CHUNKS: usize = 16_384;
/// How long the relay waits for the upstream to accept a TCP connection.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Typed errors of the emulator, its control API and its client.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the topology routes no link through an emulator (no [[links]] entry)")]
    NoLinks,
    #[error("link {from} -> {to}: node {node:?} is not declared in the topology")]
    UnknownNode {
        from: String,
        to: String,
        node: String,
    },
    #[error("link {from} -> {to}: cannot bind via address {via}: {source}")]
    Bind {
        from: String,
        to: String,
        via: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind the control address {addr}: {source}")]
    BindControl {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the control API failed: {0}")]
    ControlServe(std::io::Error),
    #[error("no emulated link {from} -> {to}")]
    UnknownLink { from: String, to: String },
    #[error("{field}: {message}")]
    InvalidSetting {
        field: &'static str,
        message: String,
    },
    #[error("invalid settings body: {0}")]
    InvalidBody(String),
    #[error("control API at {addr}: {message}")]
    ControlConnect { addr: String, message: String },
    #[error("control API at {addr}: malformed answer: {message}")]
    ControlProtocol { addr: String, message: String },
    #[error("control API answered {status}: {message}")]
    ControlStatus { status: u16, message: String },
}

// ---------------------------------------------------------------------------------------------
// Settings

/// The impairments of one direction of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impairment {
    /// One-way delay, milliseconds.
    pub delay_ms: u64,
    /// Uniform jitter of ± this many milliseconds around `delay_ms` (never below zero).
    pub jitter_ms: u64,
    /// Probability (0..=1) that a datagram is dropped.
    pub loss: f64,
    /// Probability (0..=1) that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability (0..=1) that a datagram is held back by an extra random delay of 1 ms up to
    /// `max(delay_ms, 10)` ms, so that later datagrams overtake it.
    pub reorder: f64,
    /// Drop everything (a partition of this direction). On TCP links bytes are held instead,
    /// see [`Emulator::start_tcp_links`].
    pub down: bool,
}

/// Which direction(s) of a link an update applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectionSel {
    /// Both directions (the default).
    #[default]
    Both,
    /// Client (dialler, `from`) to server (`to`).
    Forward,
    /// Server (`to`) back to the client (`from`).
    Reverse,
}

impl std::str::FromStr for DirectionSel {
    type Err = ProxyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "both" => Ok(DirectionSel::Both),
            "forward" => Ok(DirectionSel::Forward),
            "reverse" => Ok(DirectionSel::Reverse),
            other => Err(ProxyError::InvalidSetting {
                field: "direction",
                message: format!("{other:?} is not one of both, forward, reverse"),
            }),
        }
    }
}

/// A change of settings: omitted fields stay as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<DirectionSel>,
}

impl SettingsUpdate {
    /// Checks every range: delays and jitter 0..=60000 ms, probabilities 0..=1.
    pub fn validate(&self) -> Result<(), ProxyError> {
        for (field, value) in [("delay_ms", self.delay_ms), ("jitter_ms", self.jitter_ms)] {
            if let Some(v) = value
                && v > MAX_DELAY_MS
            {
                return Err(ProxyError::InvalidSetting {
                    field,
                    message: format!("{v} is above the maximum of {MAX_DELAY_MS} ms"),
                });
            }
        }
        for (field, value) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if let Some(p) = value
                && !(p.is_finite() && (0.0..=1.0).contains(&p))
            {
                return Err(ProxyError::InvalidSetting {
                    field,
                    message: format!("{p} is not a probability between 0 and 1"),
                });
            }
        }
        Ok(())
    }

    /// Parses and validates a JSON body.
    pub fn from_json(body: &[u8]) -> Result<SettingsUpdate, ProxyError> {
        let update: SettingsUpdate = if body.iter().all(u8::is_ascii_whitespace) {
            SettingsUpdate::default()
        } else {
            let value: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| ProxyError::InvalidBody(e.to_string()))?;
            if !value.is_object() {
                return Err(ProxyError::InvalidBody(
                    "the settings must be a JSON object".into(),
                ));
            }
            serde_json::from_value(value).map_err(|e| ProxyError::InvalidBody(e.to_string()))?
        };
        update.validate()?;
        Ok(update)
    }

    /// `base` with the fields of this update applied.
    pub fn apply_to(&self, base: Impairment) -> Impairment {
        Impairment {
            delay_ms: self.delay_ms.unwrap_or(base.delay_ms),
            jitter_ms: self.jitter_ms.unwrap_or(base.jitter_ms),
            loss: self.loss.unwrap_or(base.loss),
            duplicate: self.duplicate.unwrap_or(base.duplicate),
            reorder: self.reorder.unwrap_or(base.reorder),
            down: self.down.unwrap_or(base.down),
        }
    }

    fn touches(&self, dir: Dir) -> bool {
        match self.direction.unwrap_or_default() {
            DirectionSel::Both => true,
            DirectionSel::Forward => dir == Dir::Forward,
            DirectionSel::Reverse => dir == Dir::Reverse,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State shared by the relay tasks and the control API

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Forward,
    Reverse,
}

#[derive(Default)]
struct Counters {
    packets_in: AtomicU64,
    forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_down: AtomicU64,
    dropped_queue_full: AtomicU64,
    duplicated: AtomicU64,
    send_errors: AtomicU64,
    queued: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counters of one direction of one link. On TCP links a "datagram" is a chunk: what one read
/// from the source returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    /// Datagrams received for this direction.
    pub packets_in: u64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: u64,
    /// Payload bytes delivered (duplicates included; UDP and TCP alike). Defaulted when absent
    /// so a newer `meridian proxy set` still reads an older emulator's answers.
    #[serde(default)]
    pub bytes_forwarded: u64,
    /// All drops: `dropped_loss + dropped_down + dropped_queue_full`.
    pub dropped: u64,
    pub dropped_loss: u64,
    pub dropped_down: u64,
    pub dropped_queue_full: u64,
    /// Extra copies scheduled.
    pub duplicated: u64,
    /// Sends the operating system refused.
    pub send_errors: u64,
    /// Datagrams waiting in the delay queue now.
    pub queued: u64,
}

impl Counters {
    fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (loss, down, full) = (
            get(&self.dropped_loss),
            get(&self.dropped_down),
            get(&self.dropped_queue_full),
        );
        CounterSnapshot {
            packets_in: get(&self.packets_in),
            forwarded: get(&self.forwarded),
            bytes_forwarded: get(&self.bytes_forwarded),
            dropped: loss + down + full,
            dropped_loss: loss,
            dropped_down: down,
            dropped_queue_full: full,
            duplicated: get(&self.duplicated),
            send_errors: get(&self.send_errors),
            queued: get(&self.queued),
        }
    }
}

struct DirState {
    /// A watch rather than a plain lock so that TCP relays holding bytes for a downed direction
    /// wake up when it comes back instead of polling.
    settings: watch::Sender<Impairment>,
    counters: Counters,
}

impl DirState {
    fn new() -> Self {
        DirState {
            settings: watch::Sender::new(Impairment::default()),
            counters: Counters::default(),
        }
    }

    fn settings(&self) -> Impairment {
        *self.settings.borrow()
    }

    fn update(&self, update: &SettingsUpdate) {
        self.settings.send_modify(|s| *s = update.apply_to(*s));
    }

    fn view(&self) -> DirectionView {
        DirectionView {
            settings: self.settings(),
            counters: self.counters.snapshot(),
        }
    }
}

struct LinkState {
    from: String,
    to: String,
    via: SocketAddr,
    upstream: SocketAddr,
    forward: DirState,
    reverse: DirState,
    clients: AtomicU64,
    clients_evicted: AtomicU64,
}

impl LinkState {
    fn new(spec: LinkSpec, via: SocketAddr) -> LinkState {
        LinkState {
            from: spec.from,
            to: spec.to,
            via,
            upstream: spec.upstream,
            forward: DirState::new(),
            reverse: DirState::new(),
            clients: AtomicU64::new(0),
            clients_evicted: AtomicU64::new(0),
        }
    }

    fn name(&self) -> String {
        format!("{} -> {}", self.from, self.to)
    }

    fn dir(&self, dir: Dir) -> &DirState {
        match dir {
            Dir::Forward => &self.forward,
            Dir::Reverse => &self.reverse,
        }
    }

    fn apply(&self, update: &SettingsUpdate) {
        for dir in [Dir::Forward, Dir::Reverse] {
            if update.touches(dir) {
                self.dir(dir).update(update);
            }
        }
    }

    fn info(&self) -> LinkInfo {
        LinkInfo {
            from: self.from.clone(),
            to: self.to.clone(),
            via: self.via,
            upstream: self.upstream,
            clients: self.clients.load(Ordering::Relaxed),
            clients_evicted: self.clients_evicted.load(Ordering::Relaxed),
            forward: self.forward.view(),
            reverse: self.reverse.view(),
        }
    }
}

/// Settings and counters of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectionView {
    #[serde(flatten)]
    pub settings: Impairment,
    pub counters: CounterSnapshot,
}

/// One link as the control API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkInfo {
    pub from: String,
    pub to: String,
    /// The address the emulator listens on (the bound address when `via` had port 0).
    pub via: SocketAddr,
    /// Where it relays to: the `to` node's peer address.
    pub upstream: SocketAddr,
    /// Client addresses with an upstream socket now (TCP: open connections).
    pub clients: u64,
    /// Clients that lost their upstream socket to make room or for idleness (TCP: connections
    /// closed at once because `max_clients_per_link` were already open).
    pub clients_evicted: u64,
    /// Client (`from`) to server (`to`).
    pub forward: DirectionView,
    /// Server back to client.
    pub reverse: DirectionView,
}

impl LinkInfo {
    /// One line per direction, for people.
    pub fn render(&self) -> String {
        let dir = |name: &str, d: &DirectionView| {
            let s = &d.settings;
            let c = &d.counters;
            format!(
                "  {name:<7} {state} delay {}ms jitter {}ms loss {} duplicate {} reorder {} | in {} forwarded {} ({} bytes) dropped {} (loss {}, down {}, queue full {}) duplicated {} queued {}",
                s.delay_ms,
                s.jitter_ms,
                s.loss,
                s.duplicate,
                s.reorder,
                c.packets_in,
                c.forwarded,
                c.bytes_forwarded,
                c.dropped,
                c.dropped_loss,
                c.dropped_down,
                c.dropped_queue_full,
                c.duplicated,
                c.queued,
                state = if s.down { "DOWN" } else { "up  " },
            )
        };
        format!(
            "{} → {}  via {}  upstream {}  clients {}\n{}\n{}",
            self.from,
            self.to,
            self.via,
            self.upstream,
            self.clients,
            dir("forward", &self.forward),
            dir("reverse", &self.reverse)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness (no cryptographic quality needed)

/// xorshift64* seeded through splitmix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn from_entropy(salt: u64) -> Rng {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        Rng::new(h.finish())
    }

    fn next_u64(&mut self) -> u64 {
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
fn hold_time(s: &Impairment, rng: &mut Rng) -> Duration {
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

// ---------------------------------------------------------------------------------------------
// The delay scheduler: one per link and direction

struct Scheduled {
    at: Instant,
    data: Vec<u8>,
    socket: Arc<UdpSocket>,
    dest: SocketAddr,
}

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
async fn run_scheduler(
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
fn admit(
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

// ---------------------------------------------------------------------------------------------
// The relay: one listener task per link, one upstream task per client

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

// ---------------------------------------------------------------------------------------------
// The TCP relay: one accept task per link, one task per connection relaying both directions

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
async fn run_tcp_listener(
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

// ---------------------------------------------------------------------------------------------
// The emulator

/// Tunables of an [`Emulator`].
#[derive(Clone, Copy, Debug)]
pub struct EmulatorOptions {
    /// Client addresses with their own upstream socket, per link (default 64); for TCP links,
    /// open connections per link.
    pub max_clients_per_link: usize,
    /// A client silent in both directions this long loses its upstream socket (default 60 s).
    /// UDP only: TCP connections live until closed.
    pub client_idle: Duration,
    /// Datagrams waiting per link and direction; beyond, they are dropped (default 10,000).
    /// UDP only: TCP holds at most [`TCP_MAX_HELD_BYTES`] per connection and direction.
    pub queue_capacity: usize,
    /// Seed of the random choices; `None` seeds from the clock.
    pub seed: Option<u64>,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            max_clients_per_link: 64,
            client_idle: Duration::from_secs(60),
            queue_capacity: 10_000,
            seed: None,
        }
    }
}

/// One link to emulate, independent of a topology file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    pub from: String,
    pub to: String,
    /// Where to listen (port 0 picks a free port; see [`LinkInfo::via`]).
    pub via: SocketAddr,
    /// Where to relay to.
    pub upstream: SocketAddr,
}

impl LinkSpec {
    /// The links of a topology: each `[[links]]` entry, relayed to its `to` node's peer address.
    pub fn from_topology(topology: &Topology) -> Result<Vec<LinkSpec>, ProxyError> {
        if topology.links.is_empty() {
            return Err(ProxyError::NoLinks);
        }
        topology
            .links
            .iter()
            .map(|l| {
                for node in [&l.from, &l.to] {
                    if topology.node(node).is_none() {
                        return Err(ProxyError::UnknownNode {
                            from: l.from.clone(),
                            to: l.to.clone(),
                            node: node.clone(),
                        });
                    }
                }
                let upstream = topology.node(&l.to).map(|n| n.peer).ok_or_else(|| {
                    ProxyError::UnknownNode {
                        from: l.from.clone(),
                        to: l.to.clone(),
                        node: l.to.clone(),
                    }
                })?;
                Ok(LinkSpec {
                    from: l.from.clone(),
                    to: l.to.clone(),
                    via: l.via,
                    upstream,
                })
            })
            .collect()
    }
}

/// A cheap, cloneable view of a running emulator's links: read and change settings.
#[derive(Clone)]
pub struct EmulatorHandle {
    links: Arc<Vec<Arc<LinkState>>>,
}

impl EmulatorHandle {
    /// Every link, in topology order.
    pub fn links(&self) -> Vec<LinkInfo> {
        self.links.iter().map(|l| l.info()).collect()
    }

    /// The link `from -> to`.
    pub fn link(&self, from: &str, to: &str) -> Option<LinkInfo> {
        self.find(from, to).map(|l| l.info())
    }

    fn find(&self, from: &str, to: &str) -> Option<&Arc<LinkState>> {
        self.links.iter().find(|l| l.from == from && l.to == to)
    }

    /// Applies `update` to the link `from -> to`; answers its new state.
    pub fn set(
        &self,
        from: &str,
        to: &str,
        update: &SettingsUpdate,
    ) -> Result<LinkInfo, ProxyError> {
        update.validate()?;
        let link = self.find(from, to).ok_or_else(|| ProxyError::UnknownLink {
            from: from.to_string(),
            to: to.to_string(),
        })?;
        link.apply(update);
        tracing::info!(from, to, ?update, "link settings changed");
        Ok(link.info())
    }

    /// Applies `update` to every link; answers their new state.
    pub fn set_all(&self, update: &SettingsUpdate) -> Result<Vec<LinkInfo>, ProxyError> {
        update.validate()?;
        for link in self.links.iter() {
            link.apply(update);
        }
        tracing::info!(?update, "settings of every link changed");
        Ok(self.links())
    }
}

/// Binds every spec's `via` before anything runs, so an error leaves nothing behind; answers
/// each spec with its socket and the address actually bound (port 0 picks one).
async fn bind_all<S, F, Fut>(
    specs: Vec<LinkSpec>,
    bind: F,
) -> Result<Vec<(LinkSpec, S, SocketAddr)>, ProxyError>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, SocketAddr)>>,
{
    if specs.is_empty() {
        return Err(ProxyError::NoLinks);
    }
    let mut bound = Vec::with_capacity(specs.len());
    for spec in specs {
        match bind(spec.via).await {
            Ok((socket, via)) => bound.push((spec, socket, via)),
            Err(source) => {
                return Err(ProxyError::Bind {
                    from: spec.from,
                    to: spec.to,
                    via: spec.via,
                    source,
                });
            }
        }
    }
    Ok(bound)
}

/// The generator of the links' own seeds: from `options.seed`, or from the clock.
fn link_seeds(options: &EmulatorOptions, links: usize) -> Rng {
    match options.seed {
        Some(seed) => Rng::new(seed),
        None => Rng::from_entropy(links as u64),
    }
}

/// A running link emulator. Dropping it stops every relay.
pub struct Emulator {
    handle: EmulatorHandle,
    _tasks: JoinSet<()>,
}

impl Deref for Emulator {
    type Target = EmulatorHandle;
    fn deref(&self) -> &EmulatorHandle {
        &self.handle
    }
}

impl Emulator {
    /// Starts a relay for every `[[links]]` entry of `topology`.
    pub async fn start(
        topology: &Topology,
        options: EmulatorOptions,
    ) -> Result<Emulator, ProxyError> {
        Emulator::start_links(LinkSpec::from_topology(topology)?, options).await
    }

    /// Starts a relay for each of `specs`. Every `via` is bound before anything runs, so an
    /// error leaves nothing behind.
    pub async fn start_links(
        specs: Vec<LinkSpec>,
        options: EmulatorOptions,
    ) -> Result<Emulator, ProxyError> {
        let bound = bind_all(specs, |via| async move {
            let socket = UdpSocket::bind(via).await?;
            let local = socket.local_addr()?;
            Ok((socket, local))
        })
        .await?;
        let epoch = Instant::now();
        let mut seeds = link_seeds(&options, bound.len());
        let mut tasks = JoinSet::new();
        let mut links = Vec::with_capacity(bound.len());
        for (spec, socket, via) in bound {
            let link = Arc::new(LinkState::new(spec, via));
            let (forward_tx, forward_rx) = mpsc::channel(HANDOFF_CAPACITY);
            let (reverse_tx, reverse_rx) = mpsc::channel(HANDOFF_CAPACITY);
            let capacity = options.queue_capacity.max(1);
            tasks.spawn(run_scheduler(
                Arc::clone(&link),
                Dir::Forward,
                forward_rx,
                capacity,
            ));
            tasks.spawn(run_scheduler(
                Arc::clone(&link),
                Dir::Reverse,
                reverse_rx,
                capacity,
            ));
            tasks.spawn(run_listener(RelayCtx {
                link: Arc::clone(&link),
                listener: Arc::new(socket),
                forward_tx,
                reverse_tx,
                options,
                epoch,
                seed: seeds.next_u64(),
            }));
            links.push(link);
        }
        Ok(Emulator {
            handle: EmulatorHandle {
                links: Arc::new(links),
            },
            _tasks: tasks,
        })
    }

    /// Starts a TCP relay for each of `specs`: it listens on `via` and, for every accepted
    /// connection, opens one connection to `upstream` and relays bytes both ways until both
    /// directions have ended. Same settings and handle as the UDP relays of
    /// [`Emulator::start_links`]; every `via` is bound before anything runs, so an error leaves
    /// nothing behind. Dropping the emulator closes every listener and relayed connection.
    ///
    /// What the settings mean on a byte stream:
    ///
    /// * *Forward* is the accepted client to the upstream, *reverse* the upstream back to the
    ///   client.
    /// * `delay_ms` and `jitter_ms`: every chunk read (whatever one read returned, at most
    ///   64 KiB) is delivered `delay ± jitter` after it was read, but never before the chunk
    ///   read before it on the same connection and direction: jitter varies the spacing, it
    ///   never reorders the stream. Changes apply to chunks read afterwards (so after a delay
    ///   is lowered, new chunks still queue behind the ones already held). Connection
    ///   establishment itself is not delayed: the relay connects to the upstream as soon as it
    ///   accepts the client.
    /// * `down`: the direction stops delivering but keeps every byte, like a cut cable under
    ///   TCP retransmission; when `down` clears, delivery resumes in order (chunks whose time
    ///   has passed go at once). Connections accepted while forward is down are still
    ///   accepted and connected upstream, with their bytes held. A direction holding more
    ///   than [`TCP_MAX_HELD_BYTES`] for one connection stops reading from its source, so the
    ///   sender sees TCP backpressure rather than the emulator growing; nothing is dropped.
    /// * `loss`, `duplicate` and `reorder` do not apply to a byte stream and are ignored
    ///   (accepted, shown, but without effect), so [`EmulatorHandle::set_all`] can still set
    ///   them for UDP links.
    /// * Counters: `packets_in` counts chunks read, `forwarded` chunks delivered,
    ///   `bytes_forwarded` bytes delivered, `queued` chunks held now, `send_errors` failed
    ///   writes and failed upstream connects; nothing is ever dropped. `clients` counts open
    ///   connections: at most [`EmulatorOptions::max_clients_per_link`], a connection beyond
    ///   that is closed at once and counted in `clients_evicted`. `client_idle` and
    ///   `queue_capacity` do not apply (connections live until closed; the bound is per
    ///   connection, above).
    /// * When a side closes its sending half (or reading from it fails), the other side's
    ///   sending half is shut down once the bytes already read from it have been delivered;
    ///   the connection ends when both directions have. A failed write ends that direction at
    ///   once, dropping what it still held. Each connection logs how it ended once, at debug
    ///   level; a failed upstream connect is logged at info level.
    pub async fn start_tcp_links(
        specs: Vec<LinkSpec>,
        options: EmulatorOptions,
    ) -> Result<Emulator, ProxyError> {
        let bound = bind_all(specs, |via| async move {
            let listener = TcpListener::bind(via).await?;
            let local = listener.local_addr()?;
            Ok((listener, local))
        })
        .await?;
        let mut seeds = link_seeds(&options, bound.len());
        let mut tasks = JoinSet::new();
        let mut links = Vec::with_capacity(bound.len());
        for (spec, listener, via) in bound {
            let link = Arc::new(LinkState::new(spec, via));
            tasks.spawn(run_tcp_listener(
                Arc::clone(&link),
                listener,
                options,
                seeds.next_u64(),
            ));
            links.push(link);
        }
        Ok(Emulator {
            handle: EmulatorHandle {
                links: Arc::new(links),
            },
            _tasks: tasks,
        })
    }

    /// A handle that outlives borrows of the emulator (for the control API).
    pub fn handle(&self) -> EmulatorHandle {
        self.handle.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Control API

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

/// `meridian proxy --topology F --control ADDR`: starts the emulator and its control API,
/// prints every link and the control address, and runs until `shutdown`.
pub async fn run(
    topology: &Topology,
    control: SocketAddr,
    options: EmulatorOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let emulator = Emulator::start(topology, options).await?;
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

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client for `meridian proxy set`

/// An HTTP answer: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `ADDR`, `host:port` or `http://host:port[/]`, as `host:port`.
pub fn control_authority(addr: &str) -> &str {
    let a = addr.strip_prefix("http://").unwrap_or(addr);
    a.trim_end_matches('/')
}

/// Sends one request to the control API at `addr` and reads the whole answer.
pub async fn control_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<HttpAnswer, ProxyError> {
    let authority = control_authority(addr).to_string();
    let connect_err = |message: String| ProxyError::ControlConnect {
        addr: authority.clone(),
        message,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(&authority)
            .await
            .map_err(|e| connect_err(format!("cannot connect: {e}")))?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: meridian-proxy\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| connect_err(format!("cannot send the request: {e}")))?;
        stream
            .write_all(body)
            .await
            .map_err(|e| connect_err(format!("cannot send the request: {e}")))?;
        let mut raw = Vec::new();
        stream
            .take(MAX_CONTROL_RESPONSE)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| connect_err(format!("cannot read the answer: {e}")))?;
        parse_http_response(&raw).map_err(|message| ProxyError::ControlProtocol {
            addr: authority.clone(),
            message,
        })
    };
    match tokio::time::timeout(CONTROL_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(connect_err(format!(
            "no answer within {} s",
            CONTROL_TIMEOUT.as_secs()
        ))),
    }
}

/// Parses a complete HTTP/1.x response (Content-Length, chunked, or read-to-close bodies).
pub fn parse_http_response(raw: &[u8]) -> Result<HttpAnswer, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no complete header")?;
    let head =
        std::str::from_utf8(&raw[..split]).map_err(|_| "the header is not UTF-8".to_string())?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| format!("bad status line: {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line: {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length: {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = content_length {
        if rest.len() < n {
            return Err(format!(
                "the body is cut short: {} of {n} bytes",
                rest.len()
            ));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpAnswer { status, body })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line is cut short")?;
        let line = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size line")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("a chunk is cut short".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// What `meridian proxy set` changes.
#[derive(Clone, Debug, PartialEq)]
pub enum SetTarget {
    /// One link, `FROM:TO`.
    Link { from: String, to: String },
    /// Every link.
    All,
}

impl SetTarget {
    /// Parses `FROM:TO`.
    pub fn parse_link(text: &str) -> Result<SetTarget, ProxyError> {
        match text.split_once(':') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() && !to.contains(':') => {
                Ok(SetTarget::Link {
                    from: from.to_string(),
                    to: to.to_string(),
                })
            }
            _ => Err(ProxyError::InvalidSetting {
                field: "--link",
                message: format!("{text:?} is not FROM:TO (two node ids)"),
            }),
        }
    }

    fn path(&self) -> String {
        use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
        const SEGMENT: &AsciiSet = &CONTROLS
            .add(b' ')
            .add(b'"')
            .add(b'#')
            .add(b'%')
            .add(b'/')
            .add(b'?')
            .add(b'<')
            .add(b'>')
            .add(b'`')
            .add(b'{')
            .add(b'}');
        match self {
            SetTarget::All => "/links".into(),
            SetTarget::Link { from, to } => format!(
                "/links/{}/{}",
                utf8_percent_encode(from, SEGMENT),
                utf8_percent_encode(to, SEGMENT)
            ),
        }
    }
}

/// `meridian proxy set`: sends `update` to the control API at `control` and answers the
/// resulting state of the links it touched.
pub async fn set_remote(
    control: &str,
    target: &SetTarget,
    update: &SettingsUpdate,
) -> Result<Vec<LinkInfo>, ProxyError> {
    update.validate()?;
    let body = serde_json::to_vec(update).map_err(|e| ProxyError::InvalidBody(e.to_string()))?;
    let answer = control_request(control, "PUT", &target.path(), Some(&body)).await?;
    let protocol = |message: String| ProxyError::ControlProtocol {
        addr: control_authority(control).to_string(),
        message,
    };
    if !(200..300).contains(&answer.status) {
        let message = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).into_owned());
        return Err(ProxyError::ControlStatus {
            status: answer.status,
            message,
        });
    }
    match target {
        SetTarget::All => serde_json::from_slice::<Vec<LinkInfo>>(&answer.body)
            .map_err(|e| protocol(e.to_string())),
        SetTarget::Link { .. } => serde_json::from_slice::<LinkInfo>(&answer.body)
            .map(|l| vec![l])
            .map_err(|e| protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_applies_only_given_fields() {
        let base = Impairment {
            delay_ms: 5,
            jitter_ms: 1,
            loss: 0.1,
            duplicate: 0.0,
            reorder: 0.0,
            down: false,
        };
        let u = SettingsUpdate::from_json(br#"{"delay_ms": 50, "down": true}"#).expect("valid");
        let s = u.apply_to(base);
        assert_eq!(s.delay_ms, 50);
        assert!(s.down);
        assert_eq!(s.jitter_ms, 1);
        assert!((s.loss - 0.1).abs() < f64::EPSILON);
        assert_eq!(
            SettingsUpdate::from_json(b"").expect("empty"),
            SettingsUpdate::default()
        );
    }

    #[test]
    fn invalid_updates_are_refused_with_the_field() {
        for (body, field) in [
            (r#"{"loss": 1.5}"#, "loss"),
            (r#"{"duplicate": -0.1}"#, "duplicate"),
            (r#"{"reorder": 2}"#, "reorder"),
            (r#"{"delay_ms": 60001}"#, "delay_ms"),
            (r#"{"jitter_ms": 999999}"#, "jitter_ms"),
        ] {
            match SettingsUpdate::from_json(body.as_bytes()) {
                Err(ProxyError::InvalidSetting { field: f, .. }) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        for body in [
            r#"{"delay_ms": -1}"#,
            r#"{"delay": 1}"#,
            r#"{"direction": "up"}"#,
            r#"{"down": "yes"}"#,
            "[1]",
            "{",
        ] {
            assert!(
                matches!(
                    SettingsUpdate::from_json(body.as_bytes()),
                    Err(ProxyError::InvalidBody(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn direction_selects_the_directions_touched() {
        let u = SettingsUpdate {
            direction: Some(DirectionSel::Reverse),
            ..SettingsUpdate::default()
        };
        assert!(u.touches(Dir::Reverse) && !u.touches(Dir::Forward));
        assert!(SettingsUpdate::default().touches(Dir::Forward));
        assert_eq!(
            "forward".parse::<DirectionSel>().ok(),
            Some(DirectionSel::Forward)
        );
        assert!("sideways".parse::<DirectionSel>().is_err());
    }

    #[test]
    fn hold_time_respects_delay_and_jitter_bounds() {
        let mut rng = Rng::new(7);
        let s = Impairment {
            delay_ms: 20,
            jitter_ms: 5,
            ..Impairment::default()
        };
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for _ in 0..10_000 {
            let d = hold_time(&s, &mut rng);
            assert!(
                d >= Duration::from_millis(15) && d <= Duration::from_millis(25),
                "{d:?}"
            );
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert!(lo < Duration::from_millis(16) && hi > Duration::from_millis(24));
        // Jitter larger than the delay never goes below zero.
        let s = Impairment {
            delay_ms: 1,
            jitter_ms: 10,
            ..Impairment::default()
        };
        for _ in 0..1000 {
            assert!(hold_time(&s, &mut rng) <= Duration::from_millis(11));
        }
        // Reordering adds between 1 ms and max(delay, 10) ms.
        let s = Impairment {
            delay_ms: 0,
            reorder: 1.0,
            ..Impairment::default()
        };
        for _ in 0..1000 {
            let d = hold_time(&s, &mut rng);
            assert!(
                d >= Duration::from_millis(1) && d <= Duration::from_millis(10),
                "{d:?}"
            );
        }
    }

    #[test]
    fn chance_is_exact_at_the_ends_and_roughly_right_between() {
        let mut rng = Rng::new(1);
        assert!((0..1000).all(|_| rng.chance(1.0)));
        assert!((0..1000).all(|_| !rng.chance(0.0)));
        let hits = (0..100_000).filter(|_| rng.chance(0.3)).count();
        assert!((27_000..33_000).contains(&hits), "{hits}");
    }

    #[tokio::test]
    async fn heap_entries_leave_in_deadline_then_arrival_order() {
        let now = Instant::now();
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("socket"));
        let dest: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let mut heap = BinaryHeap::new();
        for (seq, ms) in [(1u64, 30u64), (2, 10), (3, 10), (4, 20)] {
            heap.push(Reverse(HeapEntry {
                at: now + Duration::from_millis(ms),
                seq,
                item: Scheduled {
                    at: now + Duration::from_millis(ms),
                    data: vec![],
                    socket: Arc::clone(&sock),
                    dest,
                },
            }));
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|e| e.0.seq)).collect();
        assert_eq!(order, vec![2, 3, 4, 1]);
    }

    #[test]
    fn tcp_chunks_are_never_delivered_before_the_previous_one() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(tcp_delivery_time(now, ms(5), None), now + ms(5));
        // Jitter drew a shorter hold than the chunk before got: it waits for that one.
        assert_eq!(
            tcp_delivery_time(now, ms(5), Some(now + ms(20))),
            now + ms(20)
        );
        assert_eq!(
            tcp_delivery_time(now, ms(30), Some(now + ms(20))),
            now + ms(30)
        );
    }

    fn test_link() -> Arc<LinkState> {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        Arc::new(LinkState::new(
            LinkSpec {
                from: "a".into(),
                to: "b".into(),
                via: addr,
                upstream: addr,
            },
            addr,
        ))
    }

    /// A downed direction stops reading at the byte bound (the sender is held back, the relay
    /// does not grow), then delivers every byte in order once it is up again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_direction_holds_a_bounded_amount_while_down_and_loses_nothing() {
        const TOTAL_BYTES: usize = 16 * 1024 * 1024;
        const PIPE_BYTES: usize = 64 * 1024;
        const WRITE_BYTES: usize = 16 * 1024;
        let deadline = Duration::from_secs(60);
        let link = test_link();
        link.apply(&SettingsUpdate {
            down: Some(true),
            ..SettingsUpdate::default()
        });
        let (mut source_w, source_r) = tokio::io::duplex(PIPE_BYTES);
        let (dest_w, mut dest_r) = tokio::io::duplex(PIPE_BYTES);
        let payload: Vec<u8> = (0..TOTAL_BYTES).map(|i| (i % 251) as u8).collect();
        let written_bytes = Arc::new(AtomicU64::new(0));
        let sender = {
            let payload = payload.clone();
            let written_bytes = Arc::clone(&written_bytes);
            tokio::spawn(async move {
                for piece in payload.chunks(WRITE_BYTES) {
                    source_w.write_all(piece).await.expect("write the source");
                    written_bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
                source_w.shutdown().await.expect("shut the source down");
            })
        };
        let relay = {
            let link = Arc::clone(&link);
            tokio::spawn(async move {
                tcp_direction(&link, Dir::Forward, source_r, dest_w, Rng::new(3)).await
            })
        };
        // The relay fills its budget (less at most one read's worth) plus the pipe.
        let start = std::time::Instant::now();
        let floor = (TCP_MAX_HELD_BYTES - TCP_READ_BYTES - WRITE_BYTES) as u64;
        while written_bytes.load(Ordering::Relaxed) < floor {
            assert!(
                start.elapsed() < deadline,
                "the relay stopped reading too early"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let written = written_bytes.load(Ordering::Relaxed);
        assert!(
            written <= (TCP_MAX_HELD_BYTES + PIPE_BYTES) as u64,
            "{written} bytes accepted while down: the bound is not applied"
        );
        let mut first = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), dest_r.read(&mut first))
                .await
                .is_err(),
            "a byte crossed a downed direction"
        );
        assert!(link.forward.counters.snapshot().queued > 0);

        link.apply(&SettingsUpdate {
            down: Some(false),
            ..SettingsUpdate::default()
        });
        let mut received = Vec::with_capacity(TOTAL_BYTES);
        tokio::time::timeout(deadline, dest_r.read_to_end(&mut received))
            .await
            .expect("everything arrives after the direction is up")
            .expect("read the destination");
        assert!(
            received == payload,
            "the bytes arrived changed or out of order"
        );
        sender.await.expect("sender task");
        let end = relay.await.expect("relay task");
        assert!(matches!(end, TcpDirEnd::Closed), "{end}");
        let c = link.forward.counters.snapshot();
        assert_eq!(c.bytes_forwarded, TOTAL_BYTES as u64);
        assert_eq!((c.packets_in, c.queued, c.dropped), (c.forwarded, 0, 0));
    }

    #[test]
    fn http_responses_parse() {
        let a = parse_http_response(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )
        .expect("parse");
        assert_eq!(
            a,
            HttpAnswer {
                status: 400,
                body: b"{}".to_vec()
            }
        );
        let a = parse_http_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!(a.body, b"abcde");
        let a = parse_http_response(b"HTTP/1.0 204 No Content\r\n\r\n").expect("no length");
        assert_eq!(a.status, 204);
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_http_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc").is_err());
        assert!(parse_http_response(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
    }

    #[test]
    fn set_targets_parse_and_encode() {
        assert_eq!(
            SetTarget::parse_link("eu-1:us-1").expect("valid").path(),
            "/links/eu-1/us-1"
        );
        assert_eq!(SetTarget::All.path(), "/links");
        for bad in ["eu-1", ":us-1", "eu-1:", "a:b:c"] {
            assert!(SetTarget::parse_link(bad).is_err(), "{bad}");
        }
        assert_eq!(control_authority("http://127.0.0.1:80/"), "127.0.0.1:80");
    }
}
