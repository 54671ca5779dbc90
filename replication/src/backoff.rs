//! How long a link's dialler waits before it dials again: exponential from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`], plus jitter, and the rules that start it over from the minimum.
//!
//! Invariant: pure. The caller passes the random bits for the jitter and how long the failed
//! attempt lasted; a [`Backoff`] reads no clock and draws no random numbers, so the node and
//! the simulation drive the same value.
//!
//! The caller's loop, per attempt:
//!
//! ```text
//! match attempt() {
//!     ended cleanly, or the peer closed it on purpose => backoff.reset(),
//!     the peer reached us meanwhile                    => { backoff.reset(); dial again now }
//!     failed after running `lasted`                    => backoff.failed_after(lasted),
//! }
//! sleep(backoff.next_wait(random_bits)), cut short (and backoff.reset()) if the peer reaches us
//! ```

use std::time::Duration;

/// The first wait, and the wait after a reset.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A peer that is down is dialled about this often (plus jitter). Low, because the time from a
/// healed partition to the redial is part of every catch-up (a cut longer than QUIC's idle
/// timeout ends the links), and a dial to a handful of peers every two seconds costs nothing.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A failed attempt that ran longer than this was a working link that broke, not a peer that
/// cannot be reached: the next wait starts from the minimum again.
pub const LONG_ATTEMPT: Duration = Duration::from_secs(10);

/// The reconnect backoff of one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The next wait before jitter.
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { base: BACKOFF_MIN }
    }

    /// The next wait before jitter.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The link worked, or the peer showed it is reachable: wait the minimum next time.
    pub fn reset(&mut self) {
        self.base = BACKOFF_MIN;
    }

    /// An attempt failed after running for `lasted`.
    pub fn failed_after(&mut self, lasted: Duration) {
        if lasted > LONG_ATTEMPT {
            self.reset();
        }
    }

    /// The wait before the next attempt: the base plus up to half of it again, taken from
    /// `random_bits` (any 64 bits; cryptographic quality is not needed, only that links spread
    /// their redials). The base then doubles, up to [`BACKOFF_MAX`].
    pub fn next_wait(&mut self, random_bits: u64) -> Duration {
        let wait = self.base + jitter(self.base, random_bits);
        self.base = (self.base * 2).min(BACKOFF_MAX);
        wait
    }
}

/// Whole milliseconds in `0..base/2` (at least `0..1`), from `random_bits`.
fn jitter(base: Duration, random_bits: u64) -> Duration {
    let spread_ms = (base.as_millis() as u64 / 2).max(1);
    Duration::from_millis(random_bits % spread_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn waits_double_from_the_minimum_to_the_maximum() {
        let mut b = Backoff::new();
        let waits: Vec<Duration> = (0..7).map(|_| b.next_wait(0)).collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 2000, 2000].map(ms).to_vec()
        );
        assert_eq!(b.base(), BACKOFF_MAX);
        assert_eq!(Backoff::default(), Backoff::new());
    }

    #[test]
    fn jitter_adds_up_to_half_the_base() {
        let mut b = Backoff::new();
        assert_eq!(b.next_wait(49), ms(149));
        assert_eq!(b.next_wait(99), ms(299));
        assert_eq!(
            b.next_wait(200),
            ms(400),
            "the jitter wraps at half the base"
        );
        let mut b = Backoff::new();
        assert_eq!(b.next_wait(u64::MAX), ms(100 + u64::MAX % 50));
    }

    #[test]
    fn a_reset_or_a_long_attempt_starts_from_the_minimum() {
        let mut b = Backoff::new();
        for _ in 0..4 {
            b.next_wait(0);
        }
        b.failed_after(LONG_ATTEMPT);
        assert_eq!(b.base(), ms(1600), "an attempt of exactly 10 s is not long");
        b.failed_after(LONG_ATTEMPT + ms(1));
        assert_eq!(b.base(), BACKOFF_MIN);
        b.next_wait(0);
        b.reset();
        assert_eq!(b.next_wait(0), BACKOFF_MIN);
    }

    proptest! {
        #[test]
        fn every_wait_is_within_the_base_and_one_and_a_half_times_it(
            draws in prop::collection::vec(any::<u64>(), 1..20),
        ) {
            let mut b = Backoff::new();
            for bits in draws {
                let base = b.base();
                let wait = b.next_wait(bits);
                prop_assert!(wait >= base && wait < base + base / 2, "{:?} from {:?}", wait, base);
                prop_assert!(b.base() <= BACKOFF_MAX && b.base() >= base);
            }
        }
    }
}
