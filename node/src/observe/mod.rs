//! Observability: Prometheus metrics, logging, rate-limited log lines, and the node's health
//! conditions (certificate validity, clock offset from the peers).

pub mod clock_offset;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod peer_admission;
pub mod rate_limit;
