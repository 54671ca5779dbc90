//! The node's hybrid logical clock: uhlc, with an id derived from the node id, the maximum
//! drift of the topology, and a physical clock that never reads earlier than the newest stamp
//! persisted by an earlier run (so versions keep growing after the wall clock steps back).
//!
//! Architecture invariant: this is the only module of the node that reads the wall clock
//! (`SystemTime`); everything else gets time from here. Durations and timeouts use the
//! monotonic clock (`Instant`, tokio's timers), which never orders anything.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_replication::Version;
use sha2::{Digest, Sha256};
use uhlc::{HLC, HLCBuilder, ID, NTP64, Timestamp};

/// Test-only wall-clock offset in milliseconds (`--test-clock-offset-ms`), used by the
/// partition suite to skew a node. Process-wide because uhlc takes a plain function pointer.
static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);
/// The physical clock never reads below this NTP64 time (see [`NodeClock::new`]).
static CLOCK_FLOOR_NTP64: AtomicU64 = AtomicU64::new(0);

fn physical_clock() -> NTP64 {
    let wall = wall_clock()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let offset_ms = CLOCK_OFFSET_MS.load(Ordering::Relaxed);
    let skewed = if offset_ms >= 0 {
        wall.saturating_add(Duration::from_millis(offset_ms.unsigned_abs()))
    } else {
        wall.saturating_sub(Duration::from_millis(offset_ms.unsigned_abs()))
    };
    NTP64(
        NTP64::from(skewed)
            .0
            .max(CLOCK_FLOOR_NTP64.load(Ordering::Relaxed)),
    )
}

/// The wall clock: the one place the node reads it (certificate validity, unix times shown).
#[allow(clippy::disallowed_methods)]
pub fn wall_clock() -> SystemTime {
    SystemTime::now()
}

/// Milliseconds since the Unix epoch by the wall clock, for what is shown or kept in unix
/// time (status pages, idempotency entries, lag figures); never for ordering, which is the
/// HLC's. Unaffected by the test-only skew, as it always was.
pub fn unix_ms() -> u64 {
    wall_clock()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Skew this process's physical clock (test-only; see the README's partition-testing section).
pub fn set_test_clock_offset_ms(offset_ms: i64) {
    CLOCK_OFFSET_MS.store(offset_ms, Ordering::Relaxed);
}

/// The 64-bit HLC id of a node: the first 8 bytes of SHA-256 of its id (never 0).
pub fn hlc_id_of(node_id: &str) -> u64 {
    let digest = Sha256::digest(node_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first).max(1)
}

/// The automerge actor of one incarnation of a node: 12 bytes of SHA-256 of the node id,
/// then the incarnation. A data directory bumps its incarnation at every open, so an actor id
/// is never reused across processes.
pub fn actor_of(node_id: &str, incarnation: u32) -> automerge::ActorId {
    let digest = Sha256::digest(node_id.as_bytes());
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&digest[..12]);
    bytes.extend_from_slice(&incarnation.to_be_bytes());
    automerge::ActorId::from(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("environment variable UHLC_MAX_DELTA_MS={0:?} is not a whole number of milliseconds")]
    BadEnvironment(String),
    #[error("HLC id for node {0:?} is invalid")]
    BadId(String),
}

pub struct NodeClock {
    hlc: HLC,
    hlc_id: u64,
}

impl NodeClock {
    /// `floor` is the newest stamp an earlier run of this node persisted: every stamp issued
    /// from now on is greater.
    pub fn new(node_id: &str, max_drift_ms: u64, floor: Version) -> Result<Self, ClockError> {
        // uhlc reads this variable while building and panics on a bad value: check it first.
        if let Ok(v) = std::env::var("UHLC_MAX_DELTA_MS")
            && v.parse::<u64>().is_err()
        {
            return Err(ClockError::BadEnvironment(v));
        }
        let hlc_id = hlc_id_of(node_id);
        let id = ID::try_from(hlc_id).map_err(|_| ClockError::BadId(node_id.to_string()))?;
        // uhlc masks the lowest CSIZE bits of the physical clock off for its counter: the floor
        // must be the next physical tick after the persisted stamp, not merely stamp + 1.
        let counter_mask = (1u64 << uhlc::CSIZE) - 1;
        let next_tick = (floor.time_ntp64 | counter_mask).saturating_add(1);
        CLOCK_FLOOR_NTP64.fetch_max(next_tick, Ordering::Relaxed);
        let hlc = HLCBuilder::new()
            .with_id(id)
            .with_clock(physical_clock)
            .with_max_delta(Duration::from_millis(max_drift_ms))
            .build();
        Ok(NodeClock { hlc, hlc_id })
    }

    /// A new stamp, greater than every stamp issued or observed before.
    pub fn stamp(&self) -> Version {
        let ts = self.hlc.new_timestamp();
        Version {
            time_ntp64: ts.get_time().0,
            node_hlc_id: self.hlc_id,
        }
    }

    /// Advance past a remote stamp; refused if it is further ahead than the maximum drift.
    pub fn observe(&self, remote: Version) -> Result<(), uhlc::ExceedingDeltaError> {
        let id = ID::try_from(remote.node_hlc_id.max(1)).unwrap_or(*self.hlc.get_id());
        self.hlc
            .update_with_timestamp(&Timestamp::new(NTP64(remote.time_ntp64), id))
    }

    /// The current HLC reading without issuing a stamp, for status pages.
    pub fn now(&self) -> Version {
        Version {
            time_ntp64: physical_clock().0,
            node_hlc_id: self.hlc_id,
        }
    }

    pub fn hlc_id(&self) -> u64 {
        self.hlc_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_strictly_grow_and_pass_the_persisted_floor() {
        let now = physical_clock().0;
        // A floor slightly ahead of the wall clock, as after a small step back.
        let floor = Version {
            time_ntp64: now + (1 << 28),
            node_hlc_id: 1,
        };
        let clock = NodeClock::new("n1", 500, floor).unwrap();
        let mut last = clock.stamp();
        assert!(last > floor);
        for _ in 0..10_000 {
            let next = clock.stamp();
            assert!(next > last);
            last = next;
        }
    }

    #[test]
    fn remote_stamps_beyond_the_drift_are_refused() {
        let clock = NodeClock::new("n2", 500, Version::ZERO).unwrap();
        let ahead = |ms: u64| Version {
            time_ntp64: physical_clock().0 + NTP64::from(Duration::from_millis(ms)).0,
            node_hlc_id: 77,
        };
        assert!(clock.observe(ahead(100)).is_ok());
        assert!(clock.observe(ahead(60_000)).is_err());
        assert!(clock.stamp().time_ntp64 > ahead(0).time_ntp64 - (1 << 32));
    }

    #[test]
    fn ids_and_actors_are_stable_and_distinct() {
        assert_eq!(hlc_id_of("a"), hlc_id_of("a"));
        assert_ne!(hlc_id_of("a"), hlc_id_of("b"));
        assert_ne!(actor_of("a", 1), actor_of("a", 2));
        assert_eq!(actor_of("a", 1), actor_of("a", 1));
    }
}
