//! Versions: the HLC stamp of a change, rendered as an opaque, sortable string.
//!
//! The core never reads a clock; the node stamps changes and hands the stamp in.

use std::fmt;
use std::str::FromStr;

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
        let secs = self.time_ntp64 >> 32;
        let frac = self.time_ntp64 & 0xffff_ffff;
        secs * 1000 + ((frac * 1000) >> 32)
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
