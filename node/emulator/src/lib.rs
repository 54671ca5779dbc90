//! The link emulator behind `meridian proxy`: a user-space UDP relay that injects one-way
//! delay, jitter, loss, duplication, reordering and partitions on the links given to it. The
//! same emulator also relays TCP ([`Emulator::start_tcp_links`]), so that a benchmark can put
//! another system's TCP peer links (etcd) behind the same per-link, per-direction settings as
//! Meridian's QUIC links; see there for what each setting means on a byte stream.
//!
//! For every link ([`LinkSpec`]), the [`Emulator`] listens on `via` and relays to `upstream`,
//! in both directions: datagrams from a client (the dialling node) go *forward* to the
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
//! `meridian proxy set` talks to it through [`set_remote`].
//!
//! **Architecture invariant:** this crate knows no Meridian type. A topology file reaches it
//! only as a list of [`LinkSpec`]s, built by the node (`meridian_node::tools::proxy_cmd`).
//!
//! # Layout
//!
//! * `lib.rs`: [`Emulator`], [`EmulatorHandle`], [`EmulatorOptions`], [`LinkSpec`] and
//!   [`ProxyError`]: starting relays and reaching their settings.
//! * `settings.rs`: [`Impairment`], [`SettingsUpdate`], [`DirectionSel`], the counters and
//!   [`LinkInfo`]: the state the relays share with the control API.
//! * `schedule.rs`: the delay scheduler's min-heap, the fate of each datagram, and the seeded
//!   RNG behind every random choice.
//! * `udp.rs`: the UDP relay (a listener per link, an upstream socket per client).
//! * `tcp.rs`: the TCP relay (a task per connection, both directions in order).
//! * `control.rs`: the axum control API and [`run`], the `meridian proxy` main loop.
//! * `client.rs`: the control client behind `meridian proxy set` ([`set_remote`]).

mod client;
mod control;
mod schedule;
mod settings;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use client::{HttpAnswer, SetTarget, control_authority, control_request, set_remote};
pub use control::{control_router, run, serve_control};
pub use settings::{
    CounterSnapshot, DirectionSel, DirectionView, Impairment, LinkInfo, MAX_DELAY_MS,
    SettingsUpdate,
};
pub use tcp::TCP_MAX_HELD_BYTES;

use schedule::Rng;
use settings::LinkState;

/// Typed errors of the emulator, its control API and its client.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no link to emulate: the list of links is empty")]
    NoLinks,
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

/// One link to emulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    pub from: String,
    pub to: String,
    /// Where to listen (port 0 picks a free port; see [`LinkInfo::via`]).
    pub via: SocketAddr,
    /// Where to relay to.
    pub upstream: SocketAddr,
}

/// A cheap, cloneable view of a running emulator's links: read and change settings.
#[derive(Clone)]
pub struct EmulatorHandle {
    links: Arc<Vec<Arc<LinkState>>>,
}

impl EmulatorHandle {
    /// Every link, in the order it was given.
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
            udp::spawn_link(&mut tasks, &link, socket, options, epoch, seeds.next_u64());
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
            tasks.spawn(tcp::run_tcp_listener(
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
