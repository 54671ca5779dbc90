//! The replication protocol's logic, without I/O and without a clock.
//!
//! # Model
//!
//! Every node keeps a change log per *origin* (the node that made the change), ordered by the
//! origin's HLC. Records fall into residency *classes*: `""` for global records, or the name of
//! the residency rule that pins them. A node's *frontier* says, per (origin, class), the HLC up
//! to which it holds every change of that origin and class that its region may hold.
//!
//! A link is one-directional in data: the *subscriber* dials, states its frontier in `Hello`,
//! and the *sender* streams, in origin order, every change after that frontier whose class both
//! regions may hold — its own changes and those it relays from third origins. Each batch also
//! carries *progress*: per (origin, class), the HLC up to which the sender vouches the
//! subscriber is complete once it has applied the batch. The subscriber applies the batch,
//! stores documents, log entries and the new frontier in one transaction, and acknowledges.
//!
//! # Invariants
//!
//! * **Contiguity.** A node's log for (origin, class) holds every such change up to its frontier.
//!   A sender only vouches (progress) for what its own frontier covers and it has streamed, and
//!   reads its frontier *before* scanning its log, so a vouch never covers an entry it missed.
//! * **Residency.** A sender never selects a change of a class the subscriber's region may not
//!   hold ([`Outbound`]); a subscriber refuses and counts any that arrives anyway
//!   ([`plan_batch`]).
//! * **Order.** Batches and acks on a link are numbered; any gap, repeat or reordering is a
//!   protocol error, and the link is reset and resumes from the durable frontier. That makes
//!   loss, duplication and reordering of messages safe (the simulation injects all three).
//!
//! # Layout
//!
//! * [`frontier`]: [`Frontier`], what a node holds per (origin, class).
//! * [`hello`]: [`check_hello`], the handshake both ends run on a peer's `Hello`.
//! * [`outbound`]: the sender's side of a link, [`Outbound`], and where it reads from,
//!   [`ChangeSource`].
//! * [`inbound`]: the subscriber's side of a link, [`Inbound`].
//! * [`plan`]: [`plan_batch`], what a subscriber stores from one received batch.

pub mod frontier;
pub mod hello;
pub mod inbound;
pub mod outbound;
pub mod plan;

pub use frontier::Frontier;
pub use hello::check_hello;
pub use inbound::Inbound;
pub use outbound::{ChangeSource, LogEntry, Outbound, StreamLimits};
pub use plan::{Accepted, Plan, plan_batch};

/// Why a link breaks: the peer said or did something the protocol does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error(
        "acknowledgement for batch {got} while batch {expected:?} was the oldest unacknowledged"
    )]
    UnexpectedAck { got: u64, expected: Option<u64> },
    #[error("batch {got} arrived while batch {expected} was expected")]
    UnexpectedBatch { got: u64, expected: u64 },
    #[error("unexpected {0} message on an established link")]
    UnexpectedMessage(&'static str),
    #[error("peer speaks protocol {got}, this node speaks {ours}")]
    Version { got: u16, ours: u16 },
    #[error("peer belongs to cluster {got:?}, this node to {ours:?}")]
    Cluster { got: String, ours: String },
    #[error("peer says it is node {claimed:?} but authenticated as {authenticated:?}")]
    Identity {
        claimed: String,
        authenticated: String,
    },
}
