//! Prometheus metrics of one node. A registry per node (no global recorder), so that several
//! nodes in one test process keep separate figures.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerRegion {
    pub peer_region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLink {
    pub peer: String,
    pub peer_region: String,
    /// "inbound": we receive the peer's changes; "outbound": we send ours.
    pub direction: &'static str,
}

impl PeerLink {
    /// The link on which we receive `peer`'s changes (we dialled it).
    pub fn inbound(peer: &str, peer_region: &str) -> Self {
        PeerLink {
            peer: peer.to_string(),
            peer_region: peer_region.to_string(),
            direction: "inbound",
        }
    }

    /// The link on which we send `peer` our changes (it dialled us).
    pub fn outbound(peer: &str, peer_region: &str) -> Self {
        PeerLink {
            peer: peer.to_string(),
            peer_region: peer_region.to_string(),
            direction: "outbound",
        }
    }
}

impl PeerRegion {
    pub fn of(peer_region: &str) -> Self {
        PeerRegion {
            peer_region: peer_region.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Which certificate: "node" (this node's own) or "ca" (the cluster CA that signed it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    pub cert: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerOnly {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOnly {
    pub op: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn lag_histogram() -> Histogram {
    // 100 µs .. ~70 s in steps of 25 %, fine enough to read p50/p99 of replication lag.
    Histogram::new(exponential_buckets(0.000_1, 1.25, 61))
}

pub struct Metrics {
    registry: Registry,
    pub writes_total: Family<OpLabels, Counter>,
    pub write_duration_seconds: Family<OpOnly, Histogram, fn() -> Histogram>,
    pub reads_total: Family<OpLabels, Counter>,
    pub commit_batch_writes: Histogram,
    pub commit_duration_seconds: Histogram,
    pub write_queue_depth: Gauge,
    pub cached_documents: Gauge,
    pub replication_lag_seconds: Family<PeerRegion, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub peer_up: Family<PeerLink, Gauge>,
    pub changes_sent_total: Family<PeerRegion, Counter>,
    pub changes_applied_total: Family<PeerRegion, Counter>,
    pub drift_refusals_total: Family<PeerRegion, Counter>,
    pub residency_refused_total: Family<PeerRegion, Counter>,
    pub changes_quarantined_total: Counter,
    pub pending_changes: Family<Reason, Gauge>,
    pub link_errors_total: Family<PeerRegion, Counter>,
    pub apply_lag_seconds: Family<PeerRegion, Histogram, fn() -> Histogram>,
    pub corrupt_records_total: Counter,
    pub record_repairs_total: Family<Reason, Counter>,
    pub peer_admission: super::peer_admission::PeerAdmissionMetrics,
    pub cert_expiry_seconds: Family<CertLabel, Gauge>,
    pub clock_offset_ms: Family<PeerOnly, Gauge>,
    pub clock_off: Gauge,
}

/// `metric`, registered in `registry` under `name` with `help`.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meridian");
        let r = &mut registry;
        let writes_total = registered(
            r,
            "writes",
            "Client writes by operation and outcome",
            Family::<OpLabels, Counter>::default(),
        );
        let write_duration_seconds = registered(
            r,
            "write_duration_seconds",
            "Time from receiving a write to answering it, including the durable commit",
            Family::<OpOnly, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram),
        );
        let reads_total = registered(
            r,
            "reads",
            "Client reads by operation and outcome",
            Family::<OpLabels, Counter>::default(),
        );
        let commit_batch_writes = registered(
            r,
            "commit_batch_writes",
            "Writes sharing one durable commit (group commit)",
            Histogram::new(exponential_buckets(1.0, 2.0, 11)),
        );
        let commit_duration_seconds = registered(
            r,
            "commit_duration_seconds",
            "Duration of one durable redb commit, fsync included",
            latency_histogram(),
        );
        let write_queue_depth = registered(
            r,
            "write_queue_depth",
            "Writes waiting for the group-commit writer",
            Gauge::default(),
        );
        let cached_documents = registered(
            r,
            "cached_documents",
            "Record documents held in memory",
            Gauge::default(),
        );
        let replication_lag_seconds = registered(
            r,
            "replication_lag_seconds",
            "Time from a change's origin HLC stamp to its durable application here, newest batch",
            Family::<PeerRegion, Gauge<f64, std::sync::atomic::AtomicU64>>::default(),
        );
        let peer_up = registered(
            r,
            "peer_up",
            "1 while the replication link is established",
            Family::<PeerLink, Gauge>::default(),
        );
        let changes_sent_total = registered(
            r,
            "replication_changes_sent",
            "Changes sent to peers and acknowledged",
            Family::<PeerRegion, Counter>::default(),
        );
        let changes_applied_total = registered(
            r,
            "replication_changes_applied",
            "Received changes applied to records",
            Family::<PeerRegion, Counter>::default(),
        );
        let drift_refusals_total = registered(
            r,
            "replication_drift_refusals",
            "Received changes stamped beyond the maximum clock drift (held until the clock catches up)",
            Family::<PeerRegion, Counter>::default(),
        );
        let residency_refused_total = registered(
            r,
            "residency_refused",
            "Received changes of records this region may not hold, refused",
            Family::<PeerRegion, Counter>::default(),
        );
        let changes_quarantined_total = registered(
            r,
            "replication_changes_quarantined",
            "Received changes that could not be decoded or applied, kept aside",
            Counter::default(),
        );
        let pending_changes = registered(
            r,
            "replication_pending_changes",
            "Received changes kept aside, by reason",
            Family::<Reason, Gauge>::default(),
        );
        let link_errors_total = registered(
            r,
            "replication_link_errors",
            "Replication links that ended with an error",
            Family::<PeerRegion, Counter>::default(),
        );
        let apply_lag_seconds = registered(
            r,
            "replication_apply_lag_seconds",
            "Per received change: time from its origin HLC stamp to its durable application here",
            Family::<PeerRegion, Histogram, fn() -> Histogram>::new_with_constructor(lag_histogram),
        );
        let corrupt_records_total = registered(
            r,
            "corrupt_records",
            "Reads that found a stored record whose bytes fail their checksum or do not decode",
            Counter::default(),
        );
        let record_repairs_total = registered(
            r,
            "record_repairs",
            "Repairs of corrupt records, by outcome (rebuilt from the change log, intact by then, failed)",
            Family::<Reason, Counter>::default(),
        );
        let peer_admission = super::peer_admission::PeerAdmissionMetrics::registered(r);
        let cert_expiry_seconds = registered(
            r,
            "cert_expiry_seconds",
            "Seconds until the certificate's notAfter (negative once expired): this node's (cert=node) and the cluster CA's (cert=ca)",
            Family::<CertLabel, Gauge>::default(),
        );
        let clock_offset_ms = registered(
            r,
            "clock_offset_ms",
            "This node's clock minus the peer's, estimated from the clock readings in its messages",
            Family::<PeerOnly, Gauge>::default(),
        );
        let clock_off = registered(
            r,
            "clock_off",
            "1 while this node's clock is more than max_drift_ms from a majority of its peers'",
            Gauge::default(),
        );
        Metrics {
            peer_admission,
            registry,
            cert_expiry_seconds,
            clock_offset_ms,
            clock_off,
            corrupt_records_total,
            record_repairs_total,
            apply_lag_seconds,
            replication_lag_seconds,
            peer_up,
            changes_sent_total,
            changes_applied_total,
            drift_refusals_total,
            residency_refused_total,
            changes_quarantined_total,
            pending_changes,
            link_errors_total,
            writes_total,
            write_duration_seconds,
            reads_total,
            commit_batch_writes,
            commit_duration_seconds,
            write_queue_depth,
            cached_documents,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
