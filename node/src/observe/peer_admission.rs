//! Metrics of peer-port admission: connection attempts refused by reason, Retries sent.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::metrics::Reason;

#[derive(Clone, Debug, Default)]
pub struct PeerAdmissionMetrics {
    /// `meridian_peer_handshake_refused_total{reason}`: attempts that never became a link.
    pub handshake_refused_total: Family<Reason, Counter>,
    /// `meridian_peer_handshake_retries_total`: Retries sent to make a client prove its address.
    pub handshake_retries_total: Counter,
}

impl PeerAdmissionMetrics {
    pub fn registered(registry: &mut Registry) -> Self {
        let metrics = PeerAdmissionMetrics::default();
        registry.register(
            "peer_handshake_refused",
            "Peer connection attempts refused or abandoned before becoming a link, by reason",
            metrics.handshake_refused_total.clone(),
        );
        registry.register(
            "peer_handshake_retries",
            "QUIC Retries sent to make a connecting client prove its address",
            metrics.handshake_retries_total.clone(),
        );
        metrics
    }

    /// Counts one refusal.
    pub fn refused(&self, reason: &'static str) {
        self.handshake_refused_total
            .get_or_create(&Reason { reason })
            .inc();
    }
}
