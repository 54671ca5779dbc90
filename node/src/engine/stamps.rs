//! Stamps in flight and the safe point of this node's own change log.
//!
//! Architecture invariant: stamps are issued under the book's lock, so the in-flight set never
//! misses a stamp smaller than one already issued; the safe point (the oldest in-flight stamp
//! minus one) is therefore a point up to which the own log is complete.

use meridian_replication::Version;

use super::Engine;
use crate::sync::lock;

/// Stamps issued but not yet committed (or failed), and the newest stamp issued: together they
/// give the point up to which this node's own change log is complete.
#[derive(Default)]
pub(super) struct StampBook {
    in_flight: std::collections::BTreeSet<u64>,
    newest: u64,
}

impl StampBook {
    /// A book whose newest stamp is `newest` (the last one an earlier run persisted).
    pub(super) fn new(newest: u64) -> Self {
        StampBook {
            in_flight: Default::default(),
            newest,
        }
    }
}

/// Releases a stamp from the [`StampBook`] when the write that carries it is done.
pub(super) struct StampGuard<'a> {
    engine: &'a Engine,
    time_ntp64: u64,
}

impl Drop for StampGuard<'_> {
    fn drop(&mut self) {
        let mut book = lock(&self.engine.stamps);
        book.in_flight.remove(&self.time_ntp64);
    }
}

impl Engine {
    /// Issue a stamp and register it as in flight until the returned guard drops.
    pub(super) fn stamp(&self) -> (Version, StampGuard<'_>) {
        let mut book = lock(&self.stamps);
        // Under the lock, so that the in-flight set never misses a stamp smaller than one
        // already issued: the safe point below relies on it.
        let stamp = self.clock.stamp();
        book.in_flight.insert(stamp.time_ntp64);
        book.newest = book.newest.max(stamp.time_ntp64);
        (
            stamp,
            StampGuard {
                engine: self,
                time_ntp64: stamp.time_ntp64,
            },
        )
    }

    /// The HLC up to which this node's own change log is complete: no write still in flight
    /// carries a smaller stamp. Senders stream the node's own changes only up to here.
    pub fn safe_own_hlc(&self) -> u64 {
        let book = lock(&self.stamps);
        match book.in_flight.first() {
            Some(oldest) => oldest.saturating_sub(1),
            None => book.newest,
        }
    }
}
