//! Client certificates this node refused (F16): the reason stays here, in the node's log; the
//! client, not yet authenticated, is told only "access denied".
//!
//! Architecture invariant: nothing a refused client receives depends on the topology, the
//! node's clock or which check failed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::IdentityError;
use crate::peer::admission::LogBudget;
use crate::sync::lock;

/// Log lines about refused certificates: a few per window, the rest counted.
const LOG_LINES: u32 = 5;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// What the server tells a client whose certificate it refuses, whatever the reason: the
/// `access_denied` TLS alert, and a reason text naming no check.
pub(super) fn access_denied() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
}

/// The client certificates refused so far.
#[derive(Debug)]
pub struct CertRefusals {
    count: AtomicU64,
    last: Mutex<Option<IdentityError>>,
    log: Mutex<LogBudget>,
}

impl Default for CertRefusals {
    fn default() -> Self {
        CertRefusals {
            count: AtomicU64::new(0),
            last: Mutex::new(None),
            log: Mutex::new(LogBudget::new(LOG_LINES, LOG_WINDOW)),
        }
    }
}

impl CertRefusals {
    /// Counts and (rate-limited) logs one refusal.
    pub(super) fn record(&self, reason: IdentityError) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let allowed = lock(&self.log).allow(Instant::now());
        if let Some(held_back) = allowed {
            tracing::warn!(
                reason = %reason,
                similar_lines_held_back = held_back,
                "refused a peer's client certificate (the client was told only \"access denied\")"
            );
        }
        *lock(&self.last) = Some(reason);
    }

    /// How many client certificates were refused.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The reason of the latest refusal.
    pub fn last(&self) -> Option<IdentityError> {
        lock(&self.last).clone()
    }
}
