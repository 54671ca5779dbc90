//! Link settings and counters: the [`Impairment`] of each direction, the [`SettingsUpdate`]
//! that changes it, and the state the relay tasks share with the control API. Invariant: a
//! setting is validated before it is stored, so the relays never see an out-of-range value.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{LinkSpec, ProxyError};

/// Largest delay or jitter accepted, in milliseconds (one minute).
pub const MAX_DELAY_MS: u64 = 60_000;

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
    /// see [`Emulator::start_tcp_links`](crate::Emulator::start_tcp_links).
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

/// One direction of a link: forward is client to server, reverse the answers back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    Forward,
    Reverse,
}

/// The live counters of one direction; [`CounterSnapshot`] documents each.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) packets_in: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) bytes_forwarded: AtomicU64,
    pub(crate) dropped_loss: AtomicU64,
    pub(crate) dropped_down: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) queued: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
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
    pub(crate) fn snapshot(&self) -> CounterSnapshot {
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

/// Settings and counters of one direction of one link.
pub(crate) struct DirState {
    /// A watch rather than a plain lock so that TCP relays holding bytes for a downed direction
    /// wake up when it comes back instead of polling.
    pub(crate) settings: watch::Sender<Impairment>,
    pub(crate) counters: Counters,
}

impl DirState {
    fn new() -> Self {
        DirState {
            settings: watch::Sender::new(Impairment::default()),
            counters: Counters::default(),
        }
    }

    pub(crate) fn settings(&self) -> Impairment {
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

/// One emulated link, shared by its relay tasks and the control API.
pub(crate) struct LinkState {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) via: SocketAddr,
    pub(crate) upstream: SocketAddr,
    pub(crate) forward: DirState,
    pub(crate) reverse: DirState,
    pub(crate) clients: AtomicU64,
    pub(crate) clients_evicted: AtomicU64,
}

impl LinkState {
    pub(crate) fn new(spec: LinkSpec, via: SocketAddr) -> LinkState {
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

    pub(crate) fn name(&self) -> String {
        format!("{} -> {}", self.from, self.to)
    }

    pub(crate) fn dir(&self, dir: Dir) -> &DirState {
        match dir {
            Dir::Forward => &self.forward,
            Dir::Reverse => &self.reverse,
        }
    }

    pub(crate) fn apply(&self, update: &SettingsUpdate) {
        for dir in [Dir::Forward, Dir::Reverse] {
            if update.touches(dir) {
                self.dir(dir).update(update);
            }
        }
    }

    pub(crate) fn info(&self) -> LinkInfo {
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

#[cfg(test)]
mod tests;
