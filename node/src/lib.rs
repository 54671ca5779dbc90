//! The Meridian region node: the library behind the binary `meridian` (src/main.rs, a thin
//! CLI), so that tests can run a node in-process on a listener bound to port 0.
//!
//! # Layout
//!
//! Each folder has one role; a module imports only those listed before it here (tests may also
//! use `tools`), so there is no cycle:
//!
//! * [`sync`], [`clock`]: the lock helper; the HLC and the only wall-clock reads of the node.
//! * [`config`]: the topology file, parsed and validated. Knows residency, nothing else here.
//! * [`store`]: redb and the commit log: the table schema (private to it), record and batch
//!   codecs, replay, the residency audit and the offline dump. Never tokio.
//! * [`observe`]: metrics and logging.
//! * [`engine`]: local writes, the merge of received changes, the group-commit writer, the
//!   stamps and the safe point. Never axum, quinn or the peer driver.
//! * [`ops`]: the one executor of record operations, for clients and for forwarded requests.
//! * [`peer`]: mutual TLS over QUIC, the replication link driver, forwarding, peer status. The
//!   only module that knows quinn and rustls.
//! * [`http`]: the HTTP API. The only module that knows axum.
//! * [`server`]: one node: open its data directory, start the engine, the links and the API.
//! * [`tools`]: operator and developer commands, never on the serving path: certificates,
//!   `meridian dev`, `meridian proxy`, the offline reports.

pub mod clock;
pub mod config;
pub mod engine;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod observe;
pub mod ops;
pub mod peer;
pub mod server;
pub mod store;
pub mod sync;
#[cfg(test)]
mod testing;
pub mod tools;
