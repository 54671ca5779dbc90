//! Admission of incoming peer connections (F3): for each QUIC `Incoming`, before any TLS work,
//! decide to accept it, to make the client prove its address (a Retry), or to refuse it.
//!
//! Architecture invariant: unauthenticated work never takes the room of authenticated work.
//! Handshakes in progress are bounded on their own, apart from established links (which only
//! authenticated peers hold): per address the topology declares as a peer's (their own lane,
//! which strangers cannot fill without that address), and for everyone else in total and per
//! source IP. A source that already has a handshake in progress, or any source while many are,
//! must first answer a Retry, so spoofed Initials hold at most one slot per address.
//!
//! Pure: no clock, no socket. The accept loop feeds it what quinn says of an `Incoming` and
//! releases each accepted slot when that handshake ends.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The bounds of admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Handshakes in progress from one address the topology declares as a peer's.
    pub declared_per_address: usize,
    /// Handshakes in progress from all other addresses together.
    pub shared_total: usize,
    /// Handshakes in progress from one IP address that is not a declared peer address.
    pub shared_per_ip: usize,
    /// From this many handshakes in progress (all lanes), every unvalidated source is retried.
    pub retry_from_in_progress: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            declared_per_address: 2,
            shared_total: 64,
            shared_per_ip: 8,
            retry_from_in_progress: 8,
        }
    }
}

/// A handshake that does not complete within this is abandoned, and its slot freed.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Where a handshake in progress is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// From an address the topology declares as a peer's.
    Declared(SocketAddr),
    /// From anywhere else, counted per IP and in total.
    Shared(IpAddr),
}

/// Why an `Incoming` was refused; also the `reason` label of the refusal counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The declared address already has its handshakes in progress.
    DeclaredAddressBusy,
    /// The source IP already has its handshakes in progress.
    SourceBusy,
    /// The shared lane is full.
    TooManyHandshakes,
    /// A Retry was needed but quinn cannot send one for this `Incoming` (its address was
    /// never validated and it already carries a token).
    NotValidated,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::DeclaredAddressBusy => "declared_address_busy",
            Refusal::SourceBusy => "source_busy",
            Refusal::TooManyHandshakes => "too_many_handshakes",
            Refusal::NotValidated => "not_validated",
        }
    }
}

/// What to do with one `Incoming`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start the handshake; release `Lane` when it ends, whichever way.
    Accept(Lane),
    /// Answer with a Retry: the client comes back with a token proving its address.
    Retry,
    Refuse(Refusal),
}

/// What quinn says of an `Incoming`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub remote: SocketAddr,
    /// The client answered a Retry from this endpoint (`Incoming::remote_address_validated`).
    pub validated: bool,
    /// quinn can still send a Retry (`Incoming::may_retry`).
    pub may_retry: bool,
}

/// Handshakes in progress, per lane.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    declared: HashSet<SocketAddr>,
    per_declared: HashMap<SocketAddr, usize>,
    per_ip: HashMap<IpAddr, usize>,
    shared: usize,
}

impl Admission {
    /// `declared`: the peer addresses of the topology (the addresses peers dial from).
    pub fn new(limits: AdmissionLimits, declared: impl IntoIterator<Item = SocketAddr>) -> Self {
        Admission {
            limits,
            declared: declared.into_iter().collect(),
            per_declared: HashMap::new(),
            per_ip: HashMap::new(),
            shared: 0,
        }
    }

    /// Handshakes in progress, all lanes.
    pub fn in_progress(&self) -> usize {
        self.shared + self.per_declared.values().sum::<usize>()
    }

    pub fn decide(&mut self, arrival: Arrival) -> Decision {
        let lane = if self.declared.contains(&arrival.remote) {
            Lane::Declared(arrival.remote)
        } else {
            Lane::Shared(arrival.remote.ip())
        };
        let source_in_progress = match lane {
            Lane::Declared(addr) => {
                let n = self.per_declared.get(&addr).copied().unwrap_or(0);
                if n >= self.limits.declared_per_address {
                    return Decision::Refuse(Refusal::DeclaredAddressBusy);
                }
                n
            }
            Lane::Shared(ip) => {
                let n = self.per_ip.get(&ip).copied().unwrap_or(0);
                if self.shared >= self.limits.shared_total {
                    return Decision::Refuse(Refusal::TooManyHandshakes);
                }
                if n >= self.limits.shared_per_ip {
                    return Decision::Refuse(Refusal::SourceBusy);
                }
                n
            }
        };
        let loaded = self.in_progress() >= self.limits.retry_from_in_progress;
        if !arrival.validated && (loaded || source_in_progress > 0) {
            return if arrival.may_retry {
                Decision::Retry
            } else {
                Decision::Refuse(Refusal::NotValidated)
            };
        }
        match lane {
            Lane::Declared(addr) => *self.per_declared.entry(addr).or_insert(0) += 1,
            Lane::Shared(ip) => {
                *self.per_ip.entry(ip).or_insert(0) += 1;
                self.shared += 1;
            }
        }
        Decision::Accept(lane)
    }

    /// The handshake admitted in `lane` ended (established, failed or abandoned).
    pub fn release(&mut self, lane: Lane) {
        match lane {
            Lane::Declared(addr) => release_one(&mut self.per_declared, addr),
            Lane::Shared(ip) => {
                if self.per_ip.contains_key(&ip) {
                    release_one(&mut self.per_ip, ip);
                    self.shared = self.shared.saturating_sub(1);
                }
            }
        }
    }
}

/// Counts drop to zero by removing the entry, so the maps hold only sources in progress.
fn release_one<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// A budget of log lines: at most `lines` per `window`, and how many were held back, so that a
/// flood costs a few lines, not one per packet.
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    window: Duration,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub const fn new(lines: u32, window: Duration) -> Self {
        LogBudget {
            lines,
            window,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` if a line may be logged at `now`, `n` being how many were held back since the
    /// last one logged; `None` if it must be held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.lines {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "10.0.0.2:7000";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn arrival(remote: &str, validated: bool) -> Arrival {
        Arrival {
            remote: addr(remote),
            validated,
            may_retry: !validated,
        }
    }

    fn admission() -> Admission {
        Admission::new(AdmissionLimits::default(), [addr(PEER)])
    }

    #[test]
    fn a_flood_of_unvalidated_initials_holds_one_slot_per_address() {
        let mut a = admission();
        assert_eq!(
            a.decide(arrival("10.0.0.9:1000", false)),
            Decision::Accept(Lane::Shared(addr("10.0.0.9:1").ip()))
        );
        // Every further Initial from that IP, any port, must prove its address first.
        for port in 1001..2000 {
            let remote = format!("10.0.0.9:{port}");
            assert_eq!(a.decide(arrival(&remote, false)), Decision::Retry);
        }
        assert_eq!(a.in_progress(), 1);
        // Spoofing the declared peer's address holds one slot at most, and the real peer,
        // answering the Retry, still gets in.
        assert!(matches!(
            a.decide(arrival(PEER, false)),
            Decision::Accept(Lane::Declared(_))
        ));
        assert_eq!(a.decide(arrival(PEER, false)), Decision::Retry);
        assert_eq!(
            a.decide(arrival(PEER, true)),
            Decision::Accept(Lane::Declared(addr(PEER)))
        );
        assert_eq!(
            a.decide(arrival(PEER, true)),
            Decision::Refuse(Refusal::DeclaredAddressBusy)
        );
    }

    #[test]
    fn strangers_cannot_take_the_declared_lane() {
        let mut a = admission();
        // Validated strangers from many IPs fill the shared lane...
        let mut accepted = 0;
        for i in 0..200u32 {
            let remote = format!("192.168.{}.{}:4433", i / 250, i % 250);
            if let Decision::Accept(_) = a.decide(arrival(&remote, true)) {
                accepted += 1;
            }
        }
        assert_eq!(accepted, AdmissionLimits::default().shared_total);
        assert_eq!(
            a.decide(arrival("192.168.9.9:1", true)),
            Decision::Refuse(Refusal::TooManyHandshakes)
        );
        // ...and the declared peer is still admitted (after proving its address under load).
        assert_eq!(a.decide(arrival(PEER, false)), Decision::Retry);
        assert!(matches!(
            a.decide(arrival(PEER, true)),
            Decision::Accept(Lane::Declared(_))
        ));
    }

    #[test]
    fn one_ip_has_a_bounded_share() {
        let mut a = admission();
        let limit = AdmissionLimits::default().shared_per_ip;
        for port in 0..limit {
            let remote = format!("10.1.1.1:{}", 2000 + port);
            assert!(matches!(
                a.decide(arrival(&remote, true)),
                Decision::Accept(_)
            ));
        }
        assert_eq!(
            a.decide(arrival("10.1.1.1:3000", true)),
            Decision::Refuse(Refusal::SourceBusy)
        );
        // Another IP is not affected.
        assert!(matches!(
            a.decide(arrival("10.1.1.2:3000", true)),
            Decision::Accept(_)
        ));
    }

    #[test]
    fn a_quiet_node_accepts_first_initials_without_a_retry_and_slots_come_back() {
        let mut a = admission();
        let lane = match a.decide(arrival("10.0.0.5:1", false)) {
            Decision::Accept(lane) => lane,
            other => panic!("{other:?}"),
        };
        a.release(lane);
        assert_eq!(a.in_progress(), 0);
        // Released: the same source is again admitted without a Retry.
        assert!(matches!(
            a.decide(arrival("10.0.0.5:2", false)),
            Decision::Accept(_)
        ));
        // Releasing what was never admitted changes nothing.
        a.release(Lane::Shared(addr("10.9.9.9:1").ip()));
        a.release(Lane::Declared(addr(PEER)));
        assert_eq!(a.in_progress(), 1);
    }

    #[test]
    fn under_load_every_unvalidated_source_is_retried_and_a_token_that_cannot_retry_is_refused() {
        let mut a = admission();
        let threshold = AdmissionLimits::default().retry_from_in_progress;
        for i in 0..threshold {
            let remote = format!("10.2.0.{}:1", i + 1);
            assert!(matches!(
                a.decide(arrival(&remote, false)),
                Decision::Accept(_)
            ));
        }
        assert_eq!(a.decide(arrival("10.3.0.1:1", false)), Decision::Retry);
        let no_retry = Arrival {
            remote: addr("10.3.0.1:1"),
            validated: false,
            may_retry: false,
        };
        assert_eq!(a.decide(no_retry), Decision::Refuse(Refusal::NotValidated));
        assert!(matches!(
            a.decide(arrival("10.3.0.1:1", true)),
            Decision::Accept(_)
        ));
    }

    #[test]
    fn a_log_budget_holds_back_lines_beyond_its_rate_and_counts_them() {
        let mut budget = LogBudget::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(budget.allow(t0), Some(0));
        assert_eq!(budget.allow(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(budget.allow(t0 + Duration::from_secs(1)), None);
        }
        // A new window: one line, saying how many were held back.
        assert_eq!(budget.allow(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(budget.allow(t0 + Duration::from_secs(11)), Some(0));
        assert_eq!(budget.allow(t0 + Duration::from_secs(12)), None);
    }
}
