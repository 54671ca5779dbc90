//! The errors of the engine's operations.

use meridian_replication::RecordError;

use crate::store::StoreError;

/// A record that a residency rule pins to a region other than this node's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub key: String,
    pub home: String,
    pub rule: String,
    /// This node's region.
    pub here: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(
        "record {:?} is pinned to region {:?} by rule {:?} and may not be stored in region {:?}",
        .0.key, .0.home, .0.rule, .0.here
    )]
    Misdirected(Pinned),
    #[error(
        "record {:?} is pinned to region {:?} by rule {:?}; it must be forwarded there, but no node of an allowed region is reachable from region {:?}",
        .0.key, .0.home, .0.rule, .0.here
    )]
    NoAllowedRegionReachable(Pinned),
    #[error("Idempotency-Key {0:?} was already used for a different request")]
    IdempotencyKeyReused(String),
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("{0}; nothing was stored, retry once the disk has room")]
    StorageFull(String),
    #[error("stored record {key:?} is corrupt ({why}); it is being rebuilt from the change log")]
    CorruptRecord { key: String, why: String },
    #[error("the node is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "record {:?} is pinned to region {:?} by rule {:?} and is not stored in region {:?}",
        .0.key, .0.home, .0.rule, .0.here
    )]
    Misdirected(Pinned),
    #[error(
        "record {:?} is pinned to region {:?} by rule {:?}; no node of an allowed region is reachable to serve it",
        .0.key, .0.home, .0.rule
    )]
    NoAllowedRegionReachable(Pinned),
    #[error("storage failed: {0}")]
    Storage(#[from] StoreError),
    #[error("stored view of {key:?} is not valid JSON: {why}")]
    CorruptView { key: String, why: String },
    #[error("stored record {key:?} is corrupt ({why}); it is being rebuilt from the change log")]
    CorruptRecord { key: String, why: String },
}
