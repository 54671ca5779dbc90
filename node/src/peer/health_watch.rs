//! Conditions that build up while a node runs and that no request shows: its own
//! certificate's expiry (F14) and its clock's offset from its peers' (F15). Checked once a
//! second: gauges, readiness, and log lines that do not repeat more than they must.
//!
//! Architecture invariant: the node's own certificate seen expired makes it not ready until it
//! restarts (see `observe::health`); every log line here is rate-limited, whatever the peers
//! send.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Ctx;
use super::tls::expiry::{self, Notice};
use crate::clock::unix_ms;
use crate::engine::Engine;
use crate::observe::clock_offset::{ClockVerdict, SAMPLE_MAX_AGE, sustained};
use crate::observe::health::Validity;
use crate::observe::metrics::{CertLabel, PeerOnly};
use crate::observe::rate_limit::LogLimiter;

const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// While the clock is off, it is said this often.
const CLOCK_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// The samples must say "off" this long before the alarm is raised: at start, or while a
/// partition heals, the first peer heard of may be the only one connected for a moment.
const CLOCK_OFF_HOLD: Duration = Duration::from_secs(10);

/// What was said about one certificate.
struct CertNotices {
    /// "node" or "ca", as in the metric's label.
    which: &'static str,
    last_warning: Option<Instant>,
    expiry_reported: bool,
}

impl CertNotices {
    fn new(which: &'static str) -> Self {
        CertNotices {
            which,
            last_warning: None,
            expiry_reported: false,
        }
    }

    fn check(&mut self, engine: &Engine, validity: Validity, now_unix_s: i64, now: Instant) {
        let left = validity.seconds_left(now_unix_s);
        engine
            .metrics
            .cert_expiry_seconds
            .get_or_create(&CertLabel { cert: self.which })
            .set(left);
        let since = self.last_warning.map(|t| now.saturating_duration_since(t));
        match expiry::notice(left, since, self.expiry_reported) {
            Notice::Nothing => {}
            Notice::ExpiresSoon { seconds_left } => {
                self.last_warning = Some(now);
                tracing::warn!(
                    cert = self.which,
                    expires_in_s = seconds_left,
                    not_after_unix_s = validity.not_after_unix_s,
                    "certificate expires soon; renew it (`meridian certs`) and restart the node before then"
                );
            }
            Notice::Expired { seconds_ago } => {
                self.expiry_reported = true;
                let own = self.which == "node";
                if own {
                    engine.health.mark_certificate_expired();
                }
                tracing::error!(
                    cert = self.which,
                    expired_s_ago = seconds_ago,
                    not_after_unix_s = validity.not_after_unix_s,
                    not_ready = own,
                    "certificate has expired: peers refuse new replication links; restart the node with a renewed certificate"
                );
            }
        }
    }
}

/// What was said about the clock.
struct ClockNotices {
    limiter: LogLimiter,
    /// Since when the samples say "off", without a break.
    off_since: Option<Instant>,
    alarmed: bool,
}

impl ClockNotices {
    fn check(&mut self, engine: &Engine, verdict: &ClockVerdict, now: Instant) {
        for (peer, offset_ms) in &verdict.peers {
            engine
                .metrics
                .clock_offset_ms
                .get_or_create(&PeerOnly { peer: peer.clone() })
                .set(*offset_ms);
        }
        let alarm = sustained(&mut self.off_since, verdict.off, now, CLOCK_OFF_HOLD);
        engine.health.set_clock_off(alarm);
        engine.metrics.clock_off.set(i64::from(alarm));
        let max_drift_ms = engine.topology.clock.max_drift_ms;
        if alarm {
            if self.limiter.allow(now).is_some() {
                tracing::warn!(
                    offset_ms_estimate = verdict.offset_ms_estimate,
                    max_drift_ms,
                    peers_off = verdict.peers_off,
                    peers = ?verdict.peers,
                    "this node's clock is off from its peers' by more than the maximum drift: its writes (or its view of theirs) are delayed by the offset; fix its time synchronisation"
                );
            }
        } else if self.alarmed {
            tracing::info!(
                offset_ms_estimate = verdict.offset_ms_estimate,
                max_drift_ms,
                "this node's clock is back within the maximum drift of its peers'"
            );
            self.limiter.reset();
        }
        self.alarmed = alarm;
    }
}

pub(super) async fn watch_loop(ctx: Arc<Ctx>) {
    let engine = &ctx.engine;
    let certificates = ctx.tls.certificates();
    engine.health.set_certificates(certificates);
    let mut node_cert = CertNotices::new("node");
    let mut ca_cert = CertNotices::new("ca");
    let mut clock = ClockNotices {
        limiter: LogLimiter::new(CLOCK_WARNING_INTERVAL),
        off_since: None,
        alarmed: false,
    };
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let now = Instant::now();
        let now_unix_s = i64::try_from(unix_ms() / 1000).unwrap_or(i64::MAX);
        node_cert.check(engine, certificates.node, now_unix_s, now);
        ca_cert.check(engine, certificates.ca, now_unix_s, now);
        let connected = ctx.peers.connected();
        let verdict = engine.health.clock.verdict(
            now,
            SAMPLE_MAX_AGE,
            &connected,
            engine.topology.clock.max_drift_ms,
        );
        clock.check(engine, &verdict, now);
        tokio::select! {
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}
