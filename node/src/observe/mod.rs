//! Observability: Prometheus metrics and logging.

pub mod logging;
pub mod metrics;
pub mod peer_admission;
