//! Rate-limited log lines: a condition that repeats (a peer that fails every handshake, a clock
//! that stays off) is logged once per interval, with how many occurrences were held back.
//!
//! Invariant: time comes in as an argument (`Instant`), so the limiter is tested without
//! waiting.

use std::time::{Duration, Instant};

/// Allows one log line per `interval` for one repeating condition.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last line)` when a line may be logged at `now`; `None` when it
    /// is held back (and counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_logged
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            self.last_logged = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// The condition ended: its next occurrence is logged at once.
    pub fn reset(&mut self) {
        self.last_logged = None;
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let minute = Duration::from_secs(60);
        let mut limiter = LogLimiter::new(minute);
        let t0 = Instant::now();
        assert_eq!(limiter.allow(t0), Some(0), "the first occurrence is logged");
        for s in 1..30 {
            assert_eq!(limiter.allow(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(
            limiter.allow(t0 + minute),
            Some(29),
            "a minute later: one line, counting the 29 held back"
        );
        assert_eq!(limiter.allow(t0 + minute + Duration::from_secs(1)), None);
        limiter.reset();
        assert_eq!(
            limiter.allow(t0 + minute + Duration::from_secs(2)),
            Some(0),
            "after a reset the next occurrence is logged at once"
        );
    }
}
