//! Meridian's replication core.
//!
//! Architecture invariant: nothing in this crate performs I/O or reads a clock. Time, messages
//! and storage come in through narrow interfaces, so that the same code runs inside the node
//! and inside a deterministic simulation.
//!
//! # Layout
//!
//! * [`record`]: one record as an automerge document ([`RecordDoc`]), its view and conflicts.
//! * [`version`]: HLC stamps ([`Version`]) and the one ms ↔ NTP64 conversion.
//! * [`protocol`]: the link protocol: frontiers, the sender's and the subscriber's side, the
//!   handshake, what to store from a batch.
//! * [`wire`]: the messages, their binary encoding and the length-prefixed frame.
//! * [`backoff`]: the reconnect [`backoff::Backoff`] of a link's dialler.
//! * [`codec`]: the bounds-checked byte [`codec::Reader`] the wire codec (and the node's store
//!   codecs) read with.

pub mod backoff;
pub mod codec;
pub mod protocol;
pub mod record;
pub mod version;
pub mod wire;

#[cfg(test)]
mod fuzz;

pub use record::{LocalChange, RecordDoc, RecordError, RecordView, RemoteApply};
pub use version::Version;
