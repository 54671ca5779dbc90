//! The sender's side of a link: select, in origin order, what the subscriber lacks and may
//! hold, keep a window of batches in flight, and learn from acknowledgements.
//!
//! Invariant: a batch vouches (progress) only for what the sender's own frontier covered
//! *before* it scanned its log, and never carries a change of a class the subscriber's region
//! may not hold. A subscriber's own changes are sent back to it only if its `Hello` states
//! what it holds of itself, and only above that: a node that lost part of its own log (a
//! damaged commit log, a restore) states less and gets the rest back from its peers.

use std::collections::VecDeque;

use meridian_residency::Policy;

use super::{Frontier, ProtocolError};
use crate::wire::{FrontierEntry, MAX_BATCH_CHANGES, Message, WireChange};

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

struct InFlight {
    seq: u64,
    vouched: Vec<FrontierEntry>,
    changes: usize,
}

/// The sender's side of one link: what the subscriber has, what is in flight, where the scan
/// of each origin's log stands.
pub struct Outbound {
    peer_node: String,
    /// The subscriber stated its own origin in its `Hello`: its own changes above what it
    /// stated are streamed back to it, up to what this sender held of them when the link
    /// began (`own_limit`, taken at the first poll): the subscriber's later changes are not
    /// echoed.
    streams_own: bool,
    own_limit: Option<Frontier>,
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
            streams_own: stated.iter().any(|e| e.origin == peer_node),
            own_limit: None,
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
            if origin == self.peer_node && !self.streams_own {
                // The subscriber made these changes and does not say it lacks any.
                continue;
            }
            let room = self.batch_changes.saturating_sub(changes.len());
            if room == 0 || bytes >= self.batch_bytes {
                break;
            }
            // The frontier first: everything it covers is in the log before the scan below.
            let mut held: Vec<(String, u64)> = self
                .shared
                .iter()
                .map(|c| (c.clone(), source.frontier(&origin, c)))
                .collect();
            if origin == self.peer_node {
                let limit = self
                    .own_limit
                    .get_or_insert_with(|| Frontier::from_entries(&held_entries(&origin, &held)));
                for (class, h) in &mut held {
                    *h = (*h).min(limit.get(&origin, class));
                }
            }
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
                let class = policy.class_of(&entry.key);
                if origin == self.peer_node
                    && self
                        .own_limit
                        .as_ref()
                        .is_some_and(|l| entry.hlc > l.get(&origin, class))
                {
                    // Made by the subscriber after this link began: it has it.
                    continue;
                }
                scanned_to = entry.hlc;
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

fn held_entries(origin: &str, held: &[(String, u64)]) -> Vec<FrontierEntry> {
    held.iter()
        .map(|(class, hlc)| FrontierEntry {
            origin: origin.to_string(),
            class: class.clone(),
            hlc: *hlc,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    use super::*;

    /// A sender's logs in memory: every origin complete up to its newest entry.
    struct Logs(BTreeMap<String, Vec<LogEntry>>);

    impl ChangeSource for Logs {
        type Error = Infallible;
        fn origins(&self) -> Vec<String> {
            self.0.keys().cloned().collect()
        }
        fn read_after(
            &self,
            origin: &str,
            after: u64,
            limit: usize,
        ) -> Result<Vec<LogEntry>, Infallible> {
            Ok(self.0.get(origin).map_or_else(Vec::new, |log| {
                log.iter()
                    .filter(|e| e.hlc > after)
                    .take(limit)
                    .cloned()
                    .collect()
            }))
        }
        fn frontier(&self, origin: &str, _class: &str) -> u64 {
            self.0
                .get(origin)
                .and_then(|l| l.last())
                .map_or(0, |e| e.hlc)
        }
    }

    /// Two regions, every record global.
    fn policy() -> Policy {
        let regions = ["r1".to_string(), "r2".to_string()];
        Policy::new(Vec::new(), &regions).expect("policy")
    }

    fn log(n: u64) -> Vec<LogEntry> {
        (1..=n)
            .map(|hlc| LogEntry {
                hlc,
                key: format!("k{hlc}"),
                change: vec![hlc as u8],
            })
            .collect()
    }

    /// What one poll sends of `origin`.
    fn sent_of(batch: &Message, origin: &str) -> Vec<u64> {
        match batch {
            Message::Batch { changes, .. } => changes
                .iter()
                .filter(|c| c.origin == origin)
                .map(|c| c.hlc)
                .collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn a_subscribers_own_changes_go_back_to_it_only_above_what_it_states_of_itself() {
        let policy = policy();
        let logs = Logs(BTreeMap::from([
            ("a".to_string(), log(3)),
            ("b".to_string(), log(10)),
        ]));
        let own = |hlc| FrontierEntry {
            origin: "b".into(),
            class: String::new(),
            hlc,
        };
        // b states it holds its own changes up to 6: 7..=10 come back, and a's from the start.
        let mut out = Outbound::new(&policy, "r1", "b", "r2", &[own(6)], StreamLimits::default());
        let batch = out
            .poll_batch(&logs, &policy)
            .expect("poll")
            .expect("a batch");
        assert_eq!(sent_of(&batch, "b"), [7, 8, 9, 10]);
        assert_eq!(sent_of(&batch, "a"), [1, 2, 3]);
        // b states nothing of itself (a node of an older build): nothing of b goes back.
        let mut out = Outbound::new(&policy, "r1", "b", "r2", &[], StreamLimits::default());
        let batch = out
            .poll_batch(&logs, &policy)
            .expect("poll")
            .expect("a batch");
        assert!(sent_of(&batch, "b").is_empty());
        // b holds all of itself: nothing of b, and no progress about b beyond what it said.
        let mut out = Outbound::new(
            &policy,
            "r1",
            "b",
            "r2",
            &[own(10)],
            StreamLimits::default(),
        );
        let batch = out
            .poll_batch(&logs, &policy)
            .expect("poll")
            .expect("a batch");
        assert!(sent_of(&batch, "b").is_empty());
    }
}
