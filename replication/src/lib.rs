//! Meridian's replication core.
//!
//! Architecture invariant: nothing in this crate performs I/O or reads a clock. Time, messages
//! and storage come in through narrow interfaces, so that the same code runs inside the node
//! and inside a deterministic simulation.

pub mod record;
pub mod version;

pub use record::{LocalChange, RecordDoc, RecordError, RecordView, RemoteApply};
pub use version::Version;
pub mod core;
pub mod wire;
