//! Configuration: the topology file (SPEC §3), parsed and validated with a position for every
//! problem.
//!
//! Architecture invariant: a [`Topology`] value is always valid: every node, region, link and
//! residency rule in it has been checked, so the rest of the node never re-validates it.

pub mod topology;

pub use topology::*;
