//! The Meridian region node: configuration, HLC stamping, durable storage, the HTTP API, and
//! the driver that joins them to tokio. The binary `meridian` (src/main.rs) is a thin CLI over
//! this library, so tests can run a node in-process on a listener bound to port 0.

pub mod api;
pub mod audit;
pub mod clock;
pub mod commit_log;
pub mod dev;
pub mod engine;
pub mod logging;
pub mod metrics;
pub mod proxy_cmd;
pub mod replica;
pub mod server;
pub mod storage;
pub mod tls;
pub mod topology;
