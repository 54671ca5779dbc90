//! Versions: the HLC stamp of a change, rendered as an opaque, sortable string; and the one
//! conversion between milliseconds and NTP64 time.
//!
//! The core never reads a clock; the node stamps changes and hands the stamp in.
//!
//! NTP64 is the HLC's time format: seconds in the upper 32 bits, the fraction of a second in
//! the lower 32. The same conversion serves Unix times and durations (a drift bound, a lag).
//! Milliseconds to NTP64 and back rounds down both ways, so a round trip may lose up to 1 ms.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One second in NTP64 units.
const NTP64_PER_SECOND: u64 = 1 << 32;

/// Milliseconds (a Unix time or a duration) as NTP64, the fraction rounded down.
pub fn ntp64_from_ms(ms: u64) -> u64 {
    ((u128::from(ms) << 32) / 1000) as u64
}

/// NTP64 time (a stamp or a difference of stamps) in whole milliseconds, rounded down.
pub fn ms_from_ntp64(ntp64: u64) -> u64 {
    let secs = ntp64 >> 32;
    let frac = ntp64 & (NTP64_PER_SECOND - 1);
    secs * 1000 + ((frac * 1000) >> 32)
}

/// A duration (or a time since the Unix epoch) as NTP64, the fraction rounded down to the
/// nanosecond's share of 2^32.
pub fn ntp64_from_duration(d: Duration) -> u64 {
    (d.as_secs() << 32) | ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// NTP64 time (typically a difference of stamps) in seconds.
pub fn seconds_from_ntp64(ntp64: u64) -> f64 {
    ntp64 as f64 / NTP64_PER_SECOND as f64
}

/// A hybrid-logical-clock stamp: 64-bit NTP time (upper 32 bits seconds, lower 32 bits
/// fraction, lowest bits used as the logical counter) and the 64-bit id of the node that
/// issued it. Ordered by time first, then node, so that two nodes never tie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub time_ntp64: u64,
    pub node_hlc_id: u64,
}

impl Version {
    pub const ZERO: Version = Version {
        time_ntp64: 0,
        node_hlc_id: 0,
    };

    /// Milliseconds since the Unix epoch of the physical part of the stamp.
    pub fn unix_ms(&self) -> u64 {
        ms_from_ntp64(self.time_ntp64)
    }
}

/// Fixed-width lowercase hex, so that string order equals version order.
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}", self.time_ntp64, self.node_hlc_id)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid version {0:?}: expected 16 hex digits, '-', 16 hex digits")]
pub struct ParseVersionError(pub String);

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseVersionError(s.chars().take(64).collect());
        let (time, node) = s.split_once('-').ok_or_else(bad)?;
        if time.len() != 16 || node.len() != 16 {
            return Err(bad());
        }
        Ok(Version {
            time_ntp64: u64::from_str_radix(time, 16).map_err(|_| bad())?,
            node_hlc_id: u64::from_str_radix(node, 16).map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn milliseconds_and_ntp64_convert_both_ways() {
        assert_eq!(ntp64_from_ms(0), 0);
        assert_eq!(ntp64_from_ms(1000), 1 << 32);
        assert_eq!(ntp64_from_ms(1500), (1 << 32) | (1 << 31));
        assert_eq!(ntp64_from_ms(500), 1 << 31);
        assert_eq!(ms_from_ntp64((5 << 32) | (1 << 31)), 5500);
        assert_eq!(
            ntp64_from_duration(Duration::from_millis(1500)),
            ntp64_from_ms(1500)
        );
        assert_eq!(ntp64_from_duration(Duration::from_nanos(1)), 4);
        assert_eq!(seconds_from_ntp64(3 << 31), 1.5);
        // Rounded down both ways: 1 ms is 4294967.296 units, kept as 4294967, read back as 0.
        assert_eq!(ntp64_from_ms(1), 4_294_967);
        assert_eq!(ms_from_ntp64(ntp64_from_ms(1)), 0);
    }

    proptest! {
        /// The conversion equals splitting into seconds and a fraction, and a round trip
        /// loses at most one millisecond.
        #[test]
        fn ms_to_ntp64_splits_seconds_and_fraction(ms in 0u64..(1 << 32) * 1000) {
            let split = ((ms / 1000) << 32) | (((ms % 1000) << 32) / 1000);
            prop_assert_eq!(ntp64_from_ms(ms), split);
            let back = ms_from_ntp64(ntp64_from_ms(ms));
            prop_assert!(back == ms || back + 1 == ms, "{} -> {}", ms, back);
            prop_assert_eq!(ntp64_from_duration(Duration::from_millis(ms)), split);
        }
    }

    #[test]
    fn display_parses_back_and_sorts_like_the_stamp() {
        let a = Version {
            time_ntp64: 0x0000_0001_0000_0000,
            node_hlc_id: 7,
        };
        let b = Version {
            time_ntp64: 0x0000_0001_0000_0001,
            node_hlc_id: 1,
        };
        assert_eq!(a.to_string().parse::<Version>(), Ok(a));
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert!("nonsense".parse::<Version>().is_err());
        assert!(
            "0000000100000000-zz00000000000000"
                .parse::<Version>()
                .is_err()
        );
    }

    #[test]
    fn unix_ms_converts_the_ntp_fraction() {
        let v = Version {
            time_ntp64: (5u64 << 32) | (1u64 << 31),
            node_hlc_id: 0,
        };
        assert_eq!(v.unix_ms(), 5500);
    }
}
