//! Peer links: mutual TLS over QUIC, the replication link driver, request forwarding and the
//! per-peer status.
//!
//! Architecture invariant: this is the only module that knows quinn and rustls.

mod link;
pub mod tls;

pub use link::*;
