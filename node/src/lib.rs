//! The Meridian region node: configuration, HLC stamping, durable storage, the HTTP API, and
//! the driver that joins them to tokio. The binary `meridian` (src/main.rs) is a thin CLI over
//! this library, so tests can run a node in-process on a listener bound to port 0.

pub mod clock;
pub mod config;
pub mod engine;
pub mod http;
pub mod observe;
pub mod ops;
pub mod peer;
pub mod server;
pub mod store;
mod sync;
pub mod tools;
