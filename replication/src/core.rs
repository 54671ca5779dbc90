//! The replication protocol's logic, without I/O and without a clock.
//!
//! # Model
//!
//! Every node keeps a change log per *origin* (the node that made the change), ordered by the
//! origin's HLC. Records fall into residency *classes*: `""` for global records, or the name of
//! the residency rule that pins them. A node's *frontier* says, per (origin, class), the HLC up
//! to which it holds every change of that origin and class that its region may hold.
//!
//! A link is one-directional in data: the *subscriber* dials, states its frontier in `Hello`,
//! and the *sender* streams, in origin order, every change after that frontier whose class both
//! regions may hold — its own changes and those it relays from third origins. Each batch also
//! carries *progress*: per (origin, class), the HLC up to which the sender vouches the
//! subscriber is complete once it has applied the batch. The subscriber applies the batch,
//! stores documents, log entries and the new frontier in one transaction, and acknowledges.
//!
//! # Invariants
//!
//! * **Contiguity.** A node's log for (origin, class) holds every such change up to its frontier.
//!   A sender only vouches (progress) for what its own frontier covers and it has streamed, and
//!   reads its frontier *before* scanning its log, so a vouch never covers an entry it missed.
//! * **Residency.** A sender never selects a change of a class the subscriber's region may not
//!   hold ([`Outbound`]); a subscriber refuses and counts any that arrives anyway
//!   ([`plan_batch`]).
//! * **Order.** Batches and acks on a link are numbered; any gap, repeat or reordering is a
//!   protocol error, and the link is reset and resumes from the durable frontier. That makes
//!   loss, duplication and reordering of messages safe (the simulation injects all three).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use meridian_residency::Policy;

use crate::wire::{FrontierEntry, MAX_BATCH_CHANGES, Message, WireChange};

/// The residency class of a key: `""` for global records, else the pinning rule's name.
/// Same as [`Policy::class_of`], which is the canonical form.
pub fn class_of<'p>(policy: &'p Policy, key: &str) -> &'p str {
    policy.class_of(key)
}

/// May `region` hold records of `class`? Same as [`Policy::class_holdable`].
pub fn class_holdable(policy: &Policy, class: &str, region: &str) -> bool {
    policy.class_holdable(class, region)
}

/// The classes two regions may both hold: what may flow on a link between them. Same as
/// [`Policy::shared_classes`].
pub fn shared_classes(policy: &Policy, a: &str, b: &str) -> Vec<String> {
    policy.shared_classes(a, b)
}

/// Per (origin, class): the newest HLC held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier(BTreeMap<(String, String), u64>);

impl Frontier {
    pub fn get(&self, origin: &str, class: &str) -> u64 {
        self.0
            .get(&(origin.to_string(), class.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Raise an entry; never lowers it.
    pub fn raise(&mut self, origin: &str, class: &str, hlc: u64) {
        let slot = self
            .0
            .entry((origin.to_string(), class.to_string()))
            .or_insert(0);
        *slot = (*slot).max(hlc);
    }

    pub fn entries(&self) -> Vec<FrontierEntry> {
        self.0
            .iter()
            .map(|((origin, class), hlc)| FrontierEntry {
                origin: origin.clone(),
                class: class.clone(),
                hlc: *hlc,
            })
            .collect()
    }

    pub fn from_entries(entries: &[FrontierEntry]) -> Self {
        let mut f = Frontier::default();
        for e in entries {
            f.raise(&e.origin, &e.class, e.hlc);
        }
        f
    }

    /// Only the entries of the given classes.
    pub fn restricted_to(&self, classes: &[String]) -> Frontier {
        Frontier(
            self.0
                .iter()
                .filter(|((_, c), _)| classes.contains(c))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.0
            .iter()
            .map(|((o, c), h)| (o.as_str(), c.as_str(), *h))
    }
}

/// One entry of an origin's change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub hlc: u64,
    pub key: String,
    pub change: Vec<u8>,
}

/// Where a sender reads its change logs from. Implemented over redb in the node and over memory
/// in the simulation.
pub trait ChangeSource {
    type Error: std::fmt::Display;
    /// Every origin with a log here.
    fn origins(&self) -> Vec<String>;
    /// Entries of `origin` with HLC greater than `after`, in HLC order, at most `limit`. For the
    /// node's own origin, only entries at or below its safe point (no write still in flight has
    /// a smaller stamp).
    fn read_after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, Self::Error>;
    /// Everything of (origin, class) up to this HLC is in this log.
    fn frontier(&self, origin: &str, class: &str) -> u64;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error(
        "acknowledgement for batch {got} while batch {expected:?} was the oldest unacknowledged"
    )]
    UnexpectedAck { got: u64, expected: Option<u64> },
    #[error("batch {got} arrived while batch {expected} was expected")]
    UnexpectedBatch { got: u64, expected: u64 },
    #[error("unexpected {0} message on an established link")]
    UnexpectedMessage(&'static str),
    #[error("peer speaks protocol {got}, this node speaks {ours}")]
    Version { got: u16, ours: u16 },
    #[error("peer belongs to cluster {got:?}, this node to {ours:?}")]
    Cluster { got: String, ours: String },
    #[error("peer says it is node {claimed:?} but authenticated as {authenticated:?}")]
    Identity {
        claimed: String,
        authenticated: String,
    },
}

/// Check the peer's `Hello` against who we are and who the peer authenticated as.
pub fn check_hello(
    msg: &Message,
    our_cluster: &str,
    authenticated_node: &str,
) -> Result<Vec<FrontierEntry>, ProtocolError> {
    match msg {
        Message::Hello {
            protocol,
            cluster,
            node,
            frontier,
            ..
        } => {
            if *protocol != crate::wire::PROTOCOL_VERSION {
                return Err(ProtocolError::Version {
                    got: *protocol,
                    ours: crate::wire::PROTOCOL_VERSION,
                });
            }
            if cluster != our_cluster {
                return Err(ProtocolError::Cluster {
                    got: cluster.clone(),
                    ours: our_cluster.to_string(),
                });
            }
            if node != authenticated_node {
                return Err(ProtocolError::Identity {
                    claimed: node.clone(),
                    authenticated: authenticated_node.to_string(),
                });
            }
            Ok(frontier.clone())
        }
        Message::Batch { .. } => Err(ProtocolError::UnexpectedMessage("batch")),
        Message::Ack { .. } => Err(ProtocolError::UnexpectedMessage("ack")),
        Message::Close { .. } => Err(ProtocolError::UnexpectedMessage("close")),
        Message::Forward { .. } | Message::Forwarded { .. } => {
            Err(ProtocolError::UnexpectedMessage("forward"))
        }
    }
}

struct InFlight {
    seq: u64,
    vouched: Vec<FrontierEntry>,
    changes: usize,
}

/// The sender's side of one link: what the subscriber has, what is in flight, where the scan
/// of each origin's log stands.
pub struct Outbound {
    peer_node: String,
    shared: Vec<String>,
    /// Acknowledged by the subscriber.
    acked: Frontier,
    /// Sent, acknowledged or not: nothing at or below it is sent again on this link.
    sent: Frontier,
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    window: usize,
    batch_changes: usize,
    batch_bytes: usize,
}

/// Limits of one link's stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// Unacknowledged batches at most.
    pub window: usize,
    /// Changes per batch at most.
    pub batch_changes: usize,
    /// Bytes of change data per batch, roughly, at most.
    pub batch_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            // Batches in flight cost only their metadata here, and the subscriber's side is
            // bounded by QUIC's stream flow control. The window must cover a round trip of
            // commits (~850/s at 1,000 writes/s): with 4, a 150 ms link held each change up to a
            // round trip (lag p50 ≈ 2 × delay even at 100 writes/s); with 128, lag p50 at 150 ms
            // one way was 520 ms; with 1024, 179 ms (`meridian-bench lag`).
            window: 1024,
            batch_changes: 1024,
            batch_bytes: 4 << 20,
        }
    }
}

impl Outbound {
    /// `stated` is the subscriber's `Hello` frontier; only shared classes count.
    pub fn new(
        policy: &Policy,
        local_region: &str,
        peer_node: &str,
        peer_region: &str,
        stated: &[FrontierEntry],
        limits: StreamLimits,
    ) -> Self {
        let shared = policy.shared_classes(local_region, peer_region);
        let acked = Frontier::from_entries(stated).restricted_to(&shared);
        Outbound {
            peer_node: peer_node.to_string(),
            sent: acked.clone(),
            acked,
            shared,
            in_flight: VecDeque::new(),
            next_seq: 1,
            window: limits.window.max(1),
            batch_changes: limits.batch_changes.clamp(1, MAX_BATCH_CHANGES),
            batch_bytes: limits.batch_bytes.max(1),
        }
    }

    pub fn acked(&self) -> &Frontier {
        &self.acked
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn shared_classes(&self) -> &[String] {
        &self.shared
    }

    /// The next batch to send, if the window has room and there is anything to say.
    pub fn poll_batch<S: ChangeSource>(
        &mut self,
        source: &S,
        policy: &Policy,
    ) -> Result<Option<Message>, S::Error> {
        if self.in_flight.len() >= self.window {
            return Ok(None);
        }
        let mut changes: Vec<WireChange> = Vec::new();
        let mut progress: Vec<FrontierEntry> = Vec::new();
        let mut bytes = 0usize;
        let mut origins = source.origins();
        origins.sort();
        for origin in origins {
            if origin == self.peer_node {
                // The subscriber made these changes; it has them.
                continue;
            }
            let room = self.batch_changes.saturating_sub(changes.len());
            if room == 0 || bytes >= self.batch_bytes {
                break;
            }
            // The frontier first: everything it covers is in the log before the scan below.
            let held: Vec<(String, u64)> = self
                .shared
                .iter()
                .map(|c| (c.clone(), source.frontier(&origin, c)))
                .collect();
            // Start at the lowest `sent` of a class with something left (held above sent).
            // Derived on every poll: the log of a relayed origin grows out of HLC order across
            // classes, so a cached cursor could pass entries inserted behind it later.
            let Some(cursor) = held
                .iter()
                .filter(|(c, h)| *h > self.sent.get(&origin, c))
                .map(|(c, _)| self.sent.get(&origin, c))
                .min()
            else {
                continue;
            };
            let entries = source.read_after(&origin, cursor, room + 1)?;
            let mut exhausted = entries.len() <= room;
            let mut scanned_to = cursor;
            for entry in entries.into_iter().take(room) {
                if bytes >= self.batch_bytes {
                    exhausted = false;
                    break;
                }
                scanned_to = entry.hlc;
                let class = policy.class_of(&entry.key);
                if !self.shared.iter().any(|c| c == class) {
                    // Residency: the subscriber's region may not hold this record.
                    continue;
                }
                if entry.hlc <= self.sent.get(&origin, class) {
                    continue;
                }
                self.sent.raise(&origin, class, entry.hlc);
                bytes += entry.change.len() + entry.key.len();
                changes.push(WireChange {
                    origin: origin.clone(),
                    hlc: entry.hlc,
                    key: entry.key,
                    change: entry.change,
                });
            }
            for (class, held_hlc) in held {
                let vouch = if exhausted {
                    held_hlc
                } else {
                    held_hlc.min(scanned_to)
                };
                if vouch > self.sent.get(&origin, &class) {
                    self.sent.raise(&origin, &class, vouch);
                    progress.push(FrontierEntry {
                        origin: origin.clone(),
                        class,
                        hlc: vouch,
                    });
                }
            }
        }
        if changes.is_empty() && progress.is_empty() {
            return Ok(None);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut vouched = progress.clone();
        for c in &changes {
            vouched.push(FrontierEntry {
                origin: c.origin.clone(),
                class: policy.class_of(&c.key).to_string(),
                hlc: c.hlc,
            });
        }
        self.in_flight.push_back(InFlight {
            seq,
            vouched,
            changes: changes.len(),
        });
        Ok(Some(Message::Batch {
            seq,
            changes,
            progress,
        }))
    }

    /// The subscriber applied batch `seq`; returns how many changes it held.
    pub fn on_ack(&mut self, seq: u64) -> Result<usize, ProtocolError> {
        match self.in_flight.front() {
            Some(f) if f.seq == seq => {}
            other => {
                return Err(ProtocolError::UnexpectedAck {
                    got: seq,
                    expected: other.map(|f| f.seq),
                });
            }
        }
        let Some(done) = self.in_flight.pop_front() else {
            return Ok(0);
        };
        for e in &done.vouched {
            self.acked.raise(&e.origin, &e.class, e.hlc);
        }
        Ok(done.changes)
    }
}

/// The subscriber's side of one link: batches must arrive in order.
pub struct Inbound {
    expected_seq: u64,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound { expected_seq: 1 }
    }
}

impl Inbound {
    /// Accept batch `seq` if it is the next one.
    pub fn accept(&mut self, seq: u64) -> Result<(), ProtocolError> {
        if seq != self.expected_seq {
            return Err(ProtocolError::UnexpectedBatch {
                got: seq,
                expected: self.expected_seq,
            });
        }
        self.expected_seq += 1;
        Ok(())
    }
}

/// A change accepted for storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub origin: String,
    pub hlc: u64,
    pub key: String,
    pub change: Vec<u8>,
    /// Stamped further ahead of this node's clock than the maximum drift: stored and relayed,
    /// but applied to the record only once the clock has caught up.
    pub held_for_drift: bool,
}

/// What to do with one received batch.
#[derive(Debug, Default)]
pub struct Plan {
    /// Changes to store (log) and apply, grouped by record key, each group in arrival order.
    pub by_key: BTreeMap<String, Vec<Accepted>>,
    /// The frontier after the batch is stored.
    pub frontier: Vec<FrontierEntry>,
    /// Changes of records this region may not hold: refused and counted.
    pub refused: Vec<WireChange>,
    /// Changes already held (at or below the frontier).
    pub duplicates: usize,
    /// Changes held back because of clock drift.
    pub held_for_drift: usize,
}

impl Plan {
    pub fn accepted(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }
}

/// Decide what to store from a batch, given the current frontier.
///
/// `now_ntp64` and `max_drift_ntp64` come from the caller: the core reads no clock.
pub fn plan_batch(
    changes: Vec<WireChange>,
    progress: &[FrontierEntry],
    current: &dyn Fn(&str, &str) -> u64,
    policy: &Policy,
    local_region: &str,
    now_ntp64: u64,
    max_drift_ntp64: u64,
) -> Plan {
    let mut plan = Plan::default();
    let mut frontier = Frontier::default();
    let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
    let horizon = now_ntp64.saturating_add(max_drift_ntp64);
    for change in changes {
        if !policy.may_hold(&change.key, local_region) {
            plan.refused.push(change);
            continue;
        }
        let class = policy.class_of(&change.key).to_string();
        let held = frontier
            .get(&change.origin, &class)
            .max(current(&change.origin, &class));
        if change.hlc <= held {
            plan.duplicates += 1;
            continue;
        }
        frontier.raise(&change.origin, &class, change.hlc);
        touched.insert((change.origin.clone(), class));
        let held_for_drift = change.hlc > horizon;
        if held_for_drift {
            plan.held_for_drift += 1;
        }
        plan.by_key
            .entry(change.key.clone())
            .or_default()
            .push(Accepted {
                origin: change.origin,
                hlc: change.hlc,
                key: change.key,
                change: change.change,
                held_for_drift,
            });
    }
    for p in progress {
        if !policy.class_holdable(&p.class, local_region) {
            continue;
        }
        if p.hlc > current(&p.origin, &p.class).max(frontier.get(&p.origin, &p.class)) {
            frontier.raise(&p.origin, &p.class, p.hlc);
            touched.insert((p.origin.clone(), p.class.clone()));
        }
    }
    plan.frontier = touched
        .into_iter()
        .map(|(origin, class)| FrontierEntry {
            hlc: frontier.get(&origin, &class),
            origin,
            class,
        })
        .collect();
    plan
}
