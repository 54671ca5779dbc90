//! Durable storage: one redb file per data directory.
//!
//! Tables:
//! * `records`: record key → [`StoredRecord`] (header, rendered view, automerge document bytes).
//! * `changes`: (origin node id, HLC time) → [`StoredChange`], the per-origin change log that the
//!   replication layer streams from. Keys of one origin are in HLC order, so appends are cheap.
//! * `meta`: node identity (node id, incarnation, format). The newest HLC stamp issued here is
//!   not stored separately: it is the last key of this node's own change log.
//! * `idempotency`: `Idempotency-Key` → fingerprint of the request and the first answer.
//! * `frontier`: (origin, residency class) → newest HLC held of that origin and class.
//! * `pending`: (key, origin, HLC) → a received change kept aside (waiting for dependencies,
//!   held for clock drift, or quarantined), with the reason.
//!
//! Architecture invariant: a record and the log entry of the change that produced it are written
//! in one transaction, so they never disagree after a crash.
//!
//! Durability: a batch is made durable by the [commit log](commit_log) (one append and
//! one sync) before its redb transaction commits without syncing; readers therefore never see a
//! write that is not durable. Every batch transaction records its log sequence number in
//! `meta`; a checkpoint (a durable redb commit, at most [`CHECKPOINT_EVERY`] apart or when the
//! log passes [`CHECKPOINT_LOG_BYTES`]) makes redb hold everything and empties the log. At open,
//! the log's entries newer than redb's durable sequence number are committed again.

use crate::sync::lock;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meridian_replication::Version;
use meridian_replication::protocol::Frontier;
use meridian_replication::wire::FrontierEntry;
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

pub use space::{REOPEN_HEADROOM_BYTES, free_bytes};

pub mod audit;
mod batch;
mod codec;
pub mod commit_log;
mod dump;
mod open;
mod repair;
mod space;

pub use batch::{ItemOutcome, PendingChange, PendingReason, WriteItem};
pub use codec::{IdempotentAnswer, StoredChange, StoredRecord};
pub use dump::{DumpRow, dump};
pub use repair::KeyChange;

/// The record keys a commit-log batch holds, in order (for tools and recovery tests).
pub fn batch_keys(batch: &commit_log::LoggedBatch) -> Result<Vec<String>, String> {
    let (items, _) = batch::decode_batch(&batch.payload)?;
    Ok(items.into_iter().map(|i| i.key).collect())
}

use batch::{apply_batch, encode_batch};
use commit_log::{CommitLog, CommitLogError};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const FRONTIER: TableDefinition<(&str, &str), u64> = TableDefinition::new("frontier");
const PENDING: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("pending");

const META_NODE_ID: &str = "node_id";
const META_INCARNATION: &str = "incarnation";
const META_FORMAT: &str = "format";
/// The newest own HLC stamp known at the last open (see `Store::open`).
const META_HLC_FLOOR: &str = "hlc_floor";
/// Sequence number of the newest commit-log batch this redb state holds.
const META_LOG_SEQ: &str = "log_seq";
/// Present once a checkpoint was made while the commit log carried its marker: from then on
/// the log is never empty, and an empty one was lost or truncated.
const META_LOG_MARKED: &str = "log_marked";
/// Set when a recovery may have lost acknowledged batches: this node's own log is known to be
/// complete only up to this HLC, and what was lost was stamped before the second value (see
/// [`Store::own_recovery`]). Cleared once peers have vouched for everything before it.
const META_OWN_RECOVERY: &str = "own_recovery";
/// Longest time between two checkpoints. A checkpoint holds the writer while redb flushes what
/// the batches since the last one dirtied: every 2 s, that stall set replication lag p99 to
/// ~30 ms at 1,000 writes/s; every 200 ms, 8.5 ms (and 64-client throughput did not drop).
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// A log longer than this is checkpointed at once (bounds the replay at open and the log file).
pub const CHECKPOINT_LOG_BYTES: u64 = 64 << 20;
/// 2: record documents use the flat root layout (meridian_replication::record, format 2).
const FORMAT_VERSION: u32 = 2;

pub const DB_FILE: &str = "meridian.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}{}", open_hint(source))]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error(
        "database {path} was not shut down cleanly (the node is running or was killed), and a copy to read it from could not be made in {scratch}: {source}"
    )]
    NotClean {
        path: PathBuf,
        scratch: PathBuf,
        source: std::io::Error,
    },
    #[error("no database at {0}: not a Meridian data directory")]
    Missing(PathBuf),
    #[error(
        "data directory {path} belongs to node {stored:?}, refusing to start it as node {requested:?}"
    )]
    WrongNode {
        path: PathBuf,
        stored: String,
        requested: String,
    },
    #[error("data directory {path} has format {found}, this build reads format {FORMAT_VERSION}")]
    WrongFormat { path: PathBuf, found: u32 },
    #[error("database operation failed: {0}")]
    Db(#[from] redb::Error),
    #[error("stored {what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
    #[error("stored record {key:?} is corrupt: {why}")]
    CorruptRecord { key: String, why: String },
    #[error("the disk is full: {why}")]
    StorageFull { why: String },
    #[error(
        "the database is closed after a storage failure and is being opened again; retry shortly"
    )]
    Reopening,
    #[error(transparent)]
    Log(#[from] CommitLogError),
    #[error(
        "commit log of {path} starts at batch {first} but the database holds batches up to {durable}: batches in between are missing"
    )]
    LogGap {
        path: PathBuf,
        first: u64,
        durable: u64,
    },
    #[error(
        "commit log {path} is empty, but it always holds at least its checkpoint marker: it was truncated or replaced, and batches acknowledged after batch {durable} may be lost. The node does not start on it; `meridian serve --recover` starts anyway (peers that hold this node's changes send them back)"
    )]
    LogMissing { path: PathBuf, durable: u64 },
}

/// How [`Store::open_with`] opens a data directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOptions {
    /// Start on a damaged or missing commit log, keeping every intact entry, instead of
    /// refusing (`meridian serve --recover`).
    pub recover_log: bool,
    /// With `recover_log`: an HLC beyond every stamp the previous run can have issued (now
    /// plus the maximum drift), the end of what a recovery may have lost.
    pub lost_before_ntp64: u64,
}

/// What a recovery that may have lost acknowledged batches of this node's own origin left:
/// the own log is complete up to `complete_to`, and what is missing was stamped before
/// `lost_before`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnRecovery {
    pub complete_to: u64,
    pub lost_before: u64,
}

/// Only a database another process holds is worth the guess.
fn open_hint(source: &redb::DatabaseError) -> &'static str {
    match source {
        redb::DatabaseError::DatabaseAlreadyOpen => " (is another meridian process using it?)",
        _ => "",
    }
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

fn corrupt(what: impl Into<String>, why: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        why: why.into(),
    }
}

/// One entry of a listing.
#[derive(Clone, Debug, PartialEq)]
pub enum Listed {
    Record(StoredRecord),
    /// The record's bytes do not decode or fail their checksum: why.
    Corrupt(String),
}

/// Kept-aside changes by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCounts {
    pub waiting_for_dependencies: u64,
    pub held_for_drift: u64,
    /// Also the ones whose stored reason cannot be read.
    pub quarantined: u64,
}

/// What [`Store::pending_summary`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSummary {
    /// Keys with changes held for drift that are due.
    pub due: Vec<String>,
    pub counts: PendingCounts,
}

/// Identity of the node that owns a data directory, established at open.
#[derive(Clone, Debug)]
pub struct Identity {
    pub node_id: String,
    /// Bumped on every open; part of the automerge actor id so that actors are never reused.
    pub incarnation: u32,
    /// Newest HLC stamp persisted by an earlier run.
    pub last_hlc: Version,
}

pub struct Store {
    db: space::DbHandle,
    health: space::StorageHealth,
    node_id: String,
    path: PathBuf,
    log: Mutex<LogState>,
}

/// The commit log and the bookkeeping of batches and checkpoints; its lock also orders
/// batches, so that log order is commit order.
struct LogState {
    log: CommitLog,
    next_seq: u64,
    last_checkpoint: Instant,
    /// Whether `META_LOG_MARKED` is durable already.
    marked: bool,
}

/// redb's page cache. Its default (1 GiB) filled up with record pages as the store grew: a node
/// held 1.2 GiB resident at 830k records (`meridian-bench scale`). The B-tree's interior pages,
/// which every lookup touches, fit many times in this; leaf pages come from the OS page cache.
const REDB_CACHE_BYTES: usize = 64 * 1024 * 1024;

impl Store {
    /// Open (or create) the data directory of `node_id`; refuses a directory of another node.
    pub fn open(dir: &Path, node_id: &str) -> Result<(Store, Identity), StoreError> {
        Store::open_with(dir, node_id, StoreOptions::default())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After a recovery that may have lost acknowledged batches of this node's own origin:
    /// what the own log is known to hold. `None` when nothing is missing.
    pub fn own_recovery(&self) -> Result<Option<OwnRecovery>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let meta = txn.open_table(META).map_err(dberr)?;
        open::own_recovery(&meta)
    }

    /// The recovery is done: peers vouched for this node's own changes up to its end.
    pub fn finish_own_recovery(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().map_err(dberr)?;
        txn.open_table(META)
            .map_err(dberr)?
            .remove(META_OWN_RECOVERY)
            .map_err(dberr)?;
        txn.commit().map_err(dberr)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The record stored under `key`; [`StoreError::CorruptRecord`] when its bytes do not
    /// decode or fail their checksum.
    pub fn record(&self, key: &str) -> Result<Option<StoredRecord>, StoreError> {
        let decoded = self.get_decoded(RECORDS, key, StoredRecord::decode)?;
        decoded
            .transpose()
            .map_err(|why| StoreError::CorruptRecord {
                key: key.to_owned(),
                why,
            })
    }

    /// Live records in key order with the given prefix, strictly after `after`. A record whose
    /// bytes are corrupt is listed as [`Listed::Corrupt`] (it may have been deleted: that is
    /// not known), so that one damaged record never fails a whole page.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Listed)>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(RECORDS).map_err(dberr)?;
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut out = Vec::new();
        for item in table.range(start..).map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let key = k.value();
            if Some(key) == after {
                continue;
            }
            if !key.starts_with(prefix) || out.len() >= limit {
                break;
            }
            match StoredRecord::decode(v.value()) {
                Ok(rec) if rec.live => out.push((key.to_string(), Listed::Record(rec))),
                Ok(_) => {}
                Err(why) => out.push((key.to_string(), Listed::Corrupt(why))),
            }
        }
        Ok(out)
    }

    pub fn idempotent_answer(
        &self,
        idem_key: &str,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        let decoded = self.get_decoded(IDEMPOTENCY, idem_key, IdempotentAnswer::decode)?;
        decoded
            .transpose()
            .map_err(|why| corrupt("idempotency entry", why))
    }

    /// The value under `key` in a committed table keyed by strings, decoded; `None` when absent.
    fn get_decoded<T, E>(
        &self,
        table: TableDefinition<&'static str, &'static [u8]>,
        key: &str,
        decode: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<Option<Result<T, E>>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(table).map_err(dberr)?;
        let guard = table.get(key).map_err(dberr)?;
        Ok(guard.map(|guard| decode(guard.value())))
    }

    /// Entries of one origin's change log after `after_time`, at most `limit`.
    pub fn log_after(
        &self,
        origin: &str,
        after_time: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredChange)>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(CHANGES).map_err(dberr)?;
        let mut out = Vec::new();
        let Some(start) = after_time.checked_add(1) else {
            return Ok(out);
        };
        for item in table
            .range((origin, start)..=(origin, u64::MAX))
            .map_err(dberr)?
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(dberr)?;
            let time = k.value().1;
            let entry = StoredChange::decode(v.value()).map_err(|why| corrupt("log entry", why))?;
            out.push((time, entry));
        }
        Ok(out)
    }

    /// Commit a batch durably in one transaction (group commit): records, change-log entries,
    /// kept-aside changes, and frontier raises. An item whose idempotency key was already used
    /// is not applied. Durable through the commit log before the transaction becomes visible.
    pub fn commit_batch(
        &self,
        items: &[WriteItem],
        frontier: &[FrontierEntry],
    ) -> Result<Vec<ItemOutcome>, StoreError> {
        let mut state = lock(&self.log);
        if !self.reopen_locked(&mut state)? {
            return Err(StoreError::StorageFull {
                why: "the database failed a commit and is reopened once the disk has room again"
                    .into(),
            });
        }
        let seq = state.next_seq;
        let db = self.db()?;
        let mut txn = db
            .begin_write()
            .map_err(|e| self.health.observe(dberr(e)))?;
        txn.set_durability(Durability::None).map_err(dberr)?;
        let outcomes = apply_batch(&txn, items, frontier, seq)?;
        let applied = items
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == ItemOutcome::Applied)
            .map(|(i, _)| i);
        let payload = encode_batch(applied, frontier)?;
        // Not durable, not visible: a failed append drops the transaction.
        state
            .log
            .append(seq, &payload)
            .map_err(|e| self.health.observe(e.into()))?;
        state.next_seq += 1;
        if let Err(e) = txn.commit() {
            // The batch is durable in the log but not in redb: later batches must not commit on
            // top of a state that lacks it. The reopen (or a restart) replays it.
            state.log.refuse_appends();
            self.health.database_failed();
            return Err(self.health.observe(dberr(e)));
        }
        self.health.write_succeeded();
        if state.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            || state.log.len_bytes() >= CHECKPOINT_LOG_BYTES
        {
            // The batch is durable (log) and visible (redb) already: a failed checkpoint must not
            // turn it into a failed write. The log keeps everything until one succeeds.
            if let Err(e) = self.checkpoint_locked(&mut state) {
                // redb takes nothing more after a failed commit: reopened once there is room.
                self.health.database_failed();
                let e = self.health.observe(e);
                tracing::error!(error = %e, log_bytes = state.log.len_bytes(), "checkpoint failed; the commit log keeps the batches, and the database is reopened once the disk has room");
            }
        }
        Ok(outcomes)
    }

    /// Make redb hold every committed batch durably and empty the commit log.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut state = lock(&self.log);
        self.checkpoint_locked(&mut state)
    }

    fn checkpoint_locked(&self, state: &mut LogState) -> Result<(), StoreError> {
        state.last_checkpoint = Instant::now();
        if !state.log.has_batches() {
            return Ok(());
        }
        let held = state.next_seq.saturating_sub(1);
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(dberr)?;
        txn.set_durability(Durability::Immediate).map_err(dberr)?;
        {
            let mut meta = txn.open_table(META).map_err(dberr)?;
            meta.insert(META_LOG_SEQ, &held.to_be_bytes()[..])
                .map_err(dberr)?;
            // The log has held its marker since the open's clear: say so once.
            if !state.marked {
                meta.insert(META_LOG_MARKED, &[1u8][..]).map_err(dberr)?;
            }
        }
        txn.commit().map_err(dberr)?;
        state.marked = true;
        // If the truncation fails, the entries stay and are skipped at open (their sequence
        // numbers are now durable in redb); appends go on after them.
        if let Err(e) = state.log.clear(held) {
            tracing::warn!(error = %e, "emptying the commit log after a checkpoint failed; it will be retried");
        }
        Ok(())
    }

    /// The stored frontier: per (origin, class) the newest change held, for remote origins.
    pub fn frontier(&self) -> Result<Frontier, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(FRONTIER).map_err(dberr)?;
        let mut f = Frontier::default();
        for item in table.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let (origin, class) = k.value();
            f.raise(origin, class, v.value());
        }
        Ok(f)
    }

    /// Changes kept aside for `key`.
    pub fn pending_for(&self, key: &str) -> Result<Vec<PendingChange>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(PENDING).map_err(dberr)?;
        let mut out = Vec::new();
        for item in table
            .range((key, "", 0)..=(key, "\u{10FFFF}", u64::MAX))
            .map_err(dberr)?
        {
            let (k, v) = item.map_err(dberr)?;
            let (_, origin, hlc) = k.value();
            let bytes = v.value();
            let Some((&reason, change)) = bytes.split_first() else {
                return Err(corrupt("pending change", "empty value"));
            };
            let reason = PendingReason::from_byte(reason)
                .ok_or_else(|| corrupt("pending change", format!("unknown reason {reason}")))?;
            out.push(PendingChange {
                origin: origin.to_string(),
                hlc,
                reason,
                change: change.to_vec(),
            });
        }
        Ok(out)
    }

    /// Keys with changes held for drift whose stamp is at or below `horizon_ntp64`, at most
    /// `limit`; and counts of kept-aside changes by reason.
    pub fn pending_summary(
        &self,
        horizon_ntp64: u64,
        limit: usize,
    ) -> Result<PendingSummary, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(PENDING).map_err(dberr)?;
        let mut due = Vec::new();
        let mut counts = PendingCounts::default();
        for item in table.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let (key, _, hlc) = k.value();
            let reason = v
                .value()
                .first()
                .copied()
                .and_then(PendingReason::from_byte);
            match reason {
                Some(PendingReason::WaitingForDependencies) => counts.waiting_for_dependencies += 1,
                Some(PendingReason::HeldForDrift) => {
                    counts.held_for_drift += 1;
                    if hlc <= horizon_ntp64
                        && due.len() < limit
                        && due.last().is_none_or(|k: &String| k != key)
                    {
                        due.push(key.to_string());
                    }
                }
                Some(PendingReason::Quarantined) | None => counts.quarantined += 1,
            }
        }
        Ok(PendingSummary { due, counts })
    }

    /// How many entries of `origin`'s log lie after `after`, counting at most `cap`.
    pub fn count_after(&self, origin: &str, after: u64, cap: usize) -> Result<usize, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(CHANGES).map_err(dberr)?;
        let Some(start) = after.checked_add(1) else {
            return Ok(0);
        };
        let mut n = 0;
        for item in table
            .range((origin, start)..=(origin, u64::MAX))
            .map_err(dberr)?
        {
            item.map_err(dberr)?;
            n += 1;
            if n >= cap {
                break;
            }
        }
        Ok(n)
    }

    /// Drop idempotency entries created before `cutoff_unix_ms`; returns how many.
    pub fn prune_idempotency(&self, cutoff_unix_ms: u64, max: usize) -> Result<usize, StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().map_err(dberr)?;
        let mut removed = 0;
        {
            let mut table = txn.open_table(IDEMPOTENCY).map_err(dberr)?;
            let mut stale = Vec::new();
            for item in table.iter().map_err(dberr)? {
                let (k, v) = item.map_err(dberr)?;
                let old = IdempotentAnswer::decode(v.value())
                    .map(|a| a.created_unix_ms < cutoff_unix_ms)
                    .unwrap_or(true);
                if old {
                    stale.push(k.value().to_string());
                    if stale.len() >= max {
                        break;
                    }
                }
            }
            for key in stale {
                table.remove(key.as_str()).map_err(dberr)?;
                removed += 1;
            }
        }
        txn.commit().map_err(dberr)?;
        Ok(removed)
    }

    pub fn record_count(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = txn.open_table(RECORDS).map_err(dberr)?;
        table.len().map_err(dberr)
    }
}

fn db_err(e: redb::TransactionError) -> StoreError {
    dberr(e)
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
