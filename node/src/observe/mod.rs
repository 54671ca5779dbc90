//! Observability: Prometheus metrics and logging.

pub mod logging;
pub mod metrics;
