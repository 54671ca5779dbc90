//! Conditions of the node that no request shows by itself, kept where readiness, `/v1/status`
//! and the metrics read them: the validity of its own certificate and the CA's (F14) and how
//! far its clock is from its peers' (F15).
//!
//! Invariant: once this node's own certificate has been seen expired, the node stays not ready
//! until it restarts (certificates are loaded once, at start; a reload comes with access
//! control), so readiness never flaps around the expiry.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::clock_offset::ClockWatch;

/// The validity period of a certificate, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before_unix_s: i64,
    pub not_after_unix_s: i64,
}

impl Validity {
    /// Seconds from `now_unix_s` until the end of the period; negative once it has ended.
    pub fn seconds_left(&self, now_unix_s: i64) -> i64 {
        self.not_after_unix_s.saturating_sub(now_unix_s)
    }
}

/// The certificates this node presents and trusts, as loaded at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Certificates {
    /// This node's own certificate.
    pub node: Validity,
    /// The cluster CA that signed it (of a bundle, the one that issued the node certificate,
    /// else the one that expires first).
    pub ca: Validity,
}

#[derive(Debug, Default)]
pub struct Health {
    /// Clock samples of the peers.
    pub clock: ClockWatch,
    certificates: OnceLock<Certificates>,
    certificate_expired: AtomicBool,
    clock_off: AtomicBool,
}

impl Health {
    /// Set once, when the peer transport has loaded the certificates.
    pub fn set_certificates(&self, certificates: Certificates) {
        let _ = self.certificates.set(certificates);
    }

    /// `None` on a node without peers (it loads no certificate).
    pub fn certificates(&self) -> Option<Certificates> {
        self.certificates.get().copied()
    }

    /// This node's certificate was seen expired.
    pub fn mark_certificate_expired(&self) {
        self.certificate_expired.store(true, Ordering::Relaxed);
    }

    pub fn certificate_expired(&self) -> bool {
        self.certificate_expired.load(Ordering::Relaxed)
    }

    /// Whether this node's clock is off, as the clock watch last decided (the samples' verdict,
    /// held for a while so that a moment's verdict raises no alarm).
    pub fn set_clock_off(&self, off: bool) {
        self.clock_off.store(off, Ordering::Relaxed);
    }

    pub fn clock_off(&self) -> bool {
        self.clock_off.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_left_turn_negative_after_the_end() {
        let v = Validity {
            not_before_unix_s: 0,
            not_after_unix_s: 1_000,
        };
        assert_eq!(v.seconds_left(400), 600);
        assert_eq!(v.seconds_left(1_000), 0);
        assert_eq!(v.seconds_left(1_030), -30);
    }

    #[test]
    fn an_expired_certificate_stays_marked() {
        let health = Health::default();
        assert!(!health.certificate_expired());
        health.mark_certificate_expired();
        assert!(health.certificate_expired());
        let certs = Certificates {
            node: Validity {
                not_before_unix_s: 1,
                not_after_unix_s: 2,
            },
            ca: Validity {
                not_before_unix_s: 0,
                not_after_unix_s: 9,
            },
        };
        health.set_certificates(certs);
        // Set once: a second call changes nothing.
        health.set_certificates(Certificates {
            node: certs.ca,
            ..certs
        });
        assert_eq!(health.certificates(), Some(certs));
    }
}
