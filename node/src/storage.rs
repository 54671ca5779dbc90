//! Durable storage: one redb file per data directory.
//!
//! Tables:
//! * `records`: record key → [`StoredRecord`] (header, rendered view, automerge document bytes).
//! * `changes`: (origin node id, HLC time) → [`LogEntry`], the per-origin change log that the
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
//! Durability: a batch is made durable by the [commit log](crate::commit_log) (one append and
//! one sync) before its redb transaction commits without syncing; readers therefore never see a
//! write that is not durable. Every batch transaction records its log sequence number in
//! `meta`; a checkpoint (a durable redb commit, at most [`CHECKPOINT_EVERY`] apart or when the
//! log passes [`CHECKPOINT_LOG_BYTES`]) makes redb hold everything and empties the log. At open,
//! the log's entries newer than redb's durable sequence number are committed again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::commit_log::{CommitLog, CommitLogError};

use meridian_replication::Version;
use meridian_replication::core::Frontier;
use meridian_replication::wire::FrontierEntry;
use redb::{
    Database, Durability, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition,
};

pub(crate) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
pub(crate) const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
pub(crate) const FRONTIER: TableDefinition<(&str, &str), u64> = TableDefinition::new("frontier");
pub(crate) const PENDING: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("pending");

const META_NODE_ID: &str = "node_id";
const META_INCARNATION: &str = "incarnation";
const META_FORMAT: &str = "format";
/// The newest own HLC stamp known at the last open (see `Store::open`).
const META_HLC_FLOOR: &str = "hlc_floor";
/// Sequence number of the newest commit-log batch this redb state holds.
const META_LOG_SEQ: &str = "log_seq";
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
    #[error("cannot open database {path}: {source} (is another meridian process using it?)")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error(
        "database {path} was not shut down cleanly (the node is running or was killed); an offline read needs a clean one: start the node once and stop it with SIGTERM, then read again"
    )]
    NotClean { path: PathBuf },
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
}

pub(crate) fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

pub(crate) fn corrupt(what: impl Into<String>, why: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        why: why.into(),
    }
}

/// A record as stored: everything a read needs without loading the automerge document.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    /// False once deleted: the document is kept as a tombstone so that later changes merge.
    pub live: bool,
    pub version: Version,
    /// `None` for a global record (no residency rule matched).
    pub home_region: Option<String>,
    /// The rendered [`meridian_replication::RecordView`] as JSON (empty when not live).
    pub view_json: Vec<u8>,
    /// A saved automerge document followed by `appended_changes` change chunks.
    pub doc: Vec<u8>,
    pub appended_changes: u32,
}

const RECORD_MAGIC: u8 = 0xA7;
const RECORD_FORMAT: u8 = 1;

impl StoredRecord {
    pub fn encode(&self) -> Vec<u8> {
        let home = self.home_region.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(32 + home.len() + self.view_json.len() + self.doc.len());
        out.push(RECORD_MAGIC);
        out.push(RECORD_FORMAT);
        out.push(u8::from(self.live));
        out.extend_from_slice(&self.version.time_ntp64.to_be_bytes());
        out.extend_from_slice(&self.version.node_hlc_id.to_be_bytes());
        out.extend_from_slice(&(home.len() as u16).to_be_bytes());
        out.extend_from_slice(home.as_bytes());
        out.extend_from_slice(&self.appended_changes.to_be_bytes());
        out.extend_from_slice(&(self.view_json.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.view_json);
        out.extend_from_slice(&(self.doc.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.doc);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != RECORD_MAGIC {
            return Err("bad magic byte".into());
        }
        let format = r.u8()?;
        if format != RECORD_FORMAT {
            return Err(format!("unknown record format {format}"));
        }
        let live = r.u8()? != 0;
        let version = Version {
            time_ntp64: r.u64()?,
            node_hlc_id: r.u64()?,
        };
        let home_len = r.u16()? as usize;
        let home = std::str::from_utf8(r.take(home_len)?)
            .map_err(|_| "home region is not UTF-8".to_string())?;
        let appended_changes = r.u32()?;
        let view_len = r.u32()? as usize;
        let view_json = r.take(view_len)?.to_vec();
        let doc_len = r.u32()? as usize;
        let doc = r.take(doc_len)?.to_vec();
        if r.at != bytes.len() {
            return Err("trailing bytes".into());
        }
        Ok(StoredRecord {
            live,
            version,
            home_region: (!home.is_empty()).then(|| home.to_string()),
            view_json,
            doc,
            appended_changes,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("truncated: wanted {n} bytes at offset {}", self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

/// One entry of an origin's change log.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    pub key: String,
    pub change: Vec<u8>,
}

impl LogEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.key.len() + self.change.len());
        out.extend_from_slice(&(self.key.len() as u16).to_be_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&self.change);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader { bytes, at: 0 };
        let len = r.u16()? as usize;
        let key = std::str::from_utf8(r.take(len)?)
            .map_err(|_| "log entry key is not UTF-8".to_string())?
            .to_string();
        Ok(LogEntry {
            key,
            change: bytes[r.at..].to_vec(),
        })
    }
}

/// The stored answer to a write carrying an `Idempotency-Key`.
#[derive(Clone, Debug, PartialEq)]
pub struct IdempotentAnswer {
    /// SHA-256 over method, record key and body: a retry must match it.
    pub fingerprint: [u8; 32],
    pub created_unix_ms: u64,
    pub status: u16,
    pub body: Vec<u8>,
}

impl IdempotentAnswer {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(42 + self.body.len());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.created_unix_ms.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader { bytes, at: 0 };
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(r.take(32)?);
        let created_unix_ms = r.u64()?;
        let status = r.u16()?;
        Ok(IdempotentAnswer {
            fingerprint,
            created_unix_ms,
            status,
            body: bytes[r.at..].to_vec(),
        })
    }
}

/// One write of a group commit.
#[derive(Debug)]
pub struct WriteItem {
    pub key: String,
    /// The record's new state; `None` when the item changes no document (for example every
    /// received change waits for a dependency).
    pub record: Option<StoredRecord>,
    /// Change-log entries: (origin node, HLC time, change bytes).
    pub log: Vec<(String, u64, Vec<u8>)>,
    pub idempotency: Option<(String, IdempotentAnswer)>,
    /// Received changes kept aside (waiting for dependencies, held for drift, quarantined).
    pub pending_put: Vec<PendingChange>,
    /// Kept-aside changes that are now applied: (origin, HLC time).
    pub pending_remove: Vec<(String, u64)>,
}

impl WriteItem {
    /// A local write: one record, one change of this node.
    pub fn local(
        key: String,
        record: StoredRecord,
        origin: &str,
        hlc: u64,
        change: Vec<u8>,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Self {
        WriteItem {
            key,
            record: Some(record),
            log: vec![(origin.to_string(), hlc, change)],
            idempotency,
            pending_put: Vec::new(),
            pending_remove: Vec::new(),
        }
    }
}

/// Why a received change is kept aside instead of applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingReason {
    /// Automerge is missing changes it depends on; offered again with the record's next changes.
    WaitingForDependencies = 1,
    /// Stamped beyond the maximum clock drift; applied once this node's clock catches up.
    HeldForDrift = 2,
    /// Undecodable, or it made automerge fail: never applied automatically.
    Quarantined = 3,
}

impl PendingReason {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(PendingReason::WaitingForDependencies),
            2 => Some(PendingReason::HeldForDrift),
            3 => Some(PendingReason::Quarantined),
            _ => None,
        }
    }
}

/// A received change kept aside.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingChange {
    pub origin: String,
    pub hlc: u64,
    pub reason: PendingReason,
    pub change: Vec<u8>,
}

/// What became of one item of a batch.
#[derive(Debug, PartialEq)]
pub enum ItemOutcome {
    Applied,
    /// The idempotency key was used before with the same request: its first answer.
    Replayed(IdempotentAnswer),
    /// The idempotency key was used before with a different request: nothing applied.
    KeyReused,
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
    pub(crate) db: Database,
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
}

/// redb's page cache. Its default (1 GiB) filled up with record pages as the store grew: a node
/// held 1.2 GiB resident at 830k records (`meridian-bench scale`). The B-tree's interior pages,
/// which every lookup touches, fit many times in this; leaf pages come from the OS page cache.
const REDB_CACHE_BYTES: usize = 64 * 1024 * 1024;

impl Store {
    /// Open (or create) the data directory of `node_id`; refuses a directory of another node.
    pub fn open(dir: &Path, node_id: &str) -> Result<(Store, Identity), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(&path)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let (log, replayed_to) = replay_log(&db, dir)?;
        let txn = db.begin_write().map_err(db_err)?;
        let identity = {
            let mut meta = txn.open_table(META).map_err(dberr)?;
            meta.insert(META_LOG_SEQ, &replayed_to.to_be_bytes()[..])
                .map_err(dberr)?;
            txn.open_table(RECORDS).map_err(dberr)?;
            txn.open_table(CHANGES).map_err(dberr)?;
            txn.open_table(IDEMPOTENCY).map_err(dberr)?;
            txn.open_table(FRONTIER).map_err(dberr)?;
            txn.open_table(PENDING).map_err(dberr)?;
            let stored_node = meta
                .get(META_NODE_ID)
                .map_err(dberr)?
                .map(|g| String::from_utf8_lossy(g.value()).into_owned());
            match stored_node {
                Some(stored) if stored != node_id => {
                    return Err(StoreError::WrongNode {
                        path: dir.to_path_buf(),
                        stored,
                        requested: node_id.to_string(),
                    });
                }
                Some(_) => {
                    let format = read_u32(&meta, META_FORMAT)?.unwrap_or(0);
                    if format != FORMAT_VERSION {
                        return Err(StoreError::WrongFormat {
                            path: dir.to_path_buf(),
                            found: format,
                        });
                    }
                }
                None => {
                    meta.insert(META_NODE_ID, node_id.as_bytes())
                        .map_err(dberr)?;
                    meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes()[..])
                        .map_err(dberr)?;
                }
            }
            let incarnation = read_u32(&meta, META_INCARNATION)?
                .unwrap_or(0)
                .checked_add(1)
                .ok_or_else(|| corrupt("incarnation", "exhausted"))?;
            meta.insert(META_INCARNATION, &incarnation.to_be_bytes()[..])
                .map_err(dberr)?;
            // The newest stamp issued here is the last key of this node's own change log:
            // derived, so commits need not write it again.
            let changes = txn.open_table(CHANGES).map_err(dberr)?;
            let last_time = changes
                .range((node_id, 0)..=(node_id, u64::MAX))
                .map_err(dberr)?
                .next_back()
                .transpose()
                .map_err(dberr)?
                .map_or(0, |(k, _)| k.value().1);
            // A purge (residency policy change) may delete the newest own entries; the floor
            // recorded at every open keeps the clock from going back after one.
            drop(changes);
            let recorded = match meta.get(META_HLC_FLOOR).map_err(dberr)? {
                Some(g) => {
                    let bytes: [u8; 8] = g
                        .value()
                        .try_into()
                        .map_err(|_| corrupt("meta hlc_floor", "expected 8 bytes"))?;
                    u64::from_be_bytes(bytes)
                }
                None => 0,
            };
            let floor = last_time.max(recorded);
            meta.insert(META_HLC_FLOOR, &floor.to_be_bytes()[..])
                .map_err(dberr)?;
            let last_hlc = Version {
                time_ntp64: floor,
                node_hlc_id: 0,
            };
            Identity {
                node_id: node_id.to_string(),
                incarnation,
                last_hlc,
            }
        };
        // The new incarnation must be durable before any change carries it. This commit is
        // durable, so it is also the checkpoint of whatever the log replayed.
        txn.commit().map_err(dberr)?;
        let mut log = log;
        log.clear()?;
        Ok((
            Store {
                db,
                node_id: node_id.to_string(),
                path,
                log: Mutex::new(LogState {
                    log,
                    next_seq: replayed_to + 1,
                    last_checkpoint: Instant::now(),
                }),
            },
            identity,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn record(&self, key: &str) -> Result<Option<StoredRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(RECORDS).map_err(dberr)?;
        let Some(guard) = table.get(key).map_err(dberr)? else {
            return Ok(None);
        };
        StoredRecord::decode(guard.value())
            .map(Some)
            .map_err(|why| corrupt(format!("record {key:?}"), why))
    }

    /// Live records in key order with the given prefix, strictly after `after`.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, StoredRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
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
            let rec = StoredRecord::decode(v.value())
                .map_err(|why| corrupt(format!("record {key:?}"), why))?;
            if rec.live {
                out.push((key.to_string(), rec));
            }
        }
        Ok(out)
    }

    pub fn idempotent_answer(
        &self,
        idem_key: &str,
    ) -> Result<Option<IdempotentAnswer>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(IDEMPOTENCY).map_err(dberr)?;
        let Some(guard) = table.get(idem_key).map_err(dberr)? else {
            return Ok(None);
        };
        IdempotentAnswer::decode(guard.value())
            .map(Some)
            .map_err(|why| corrupt("idempotency entry", why))
    }

    /// Entries of one origin's change log after `after_time`, at most `limit`.
    pub fn log_after(
        &self,
        origin: &str,
        after_time: u64,
        limit: usize,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
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
            let entry = LogEntry::decode(v.value()).map_err(|why| corrupt("log entry", why))?;
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
        let mut state = match self.log.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let seq = state.next_seq;
        let mut txn = self.db.begin_write().map_err(dberr)?;
        txn.set_durability(Durability::None).map_err(dberr)?;
        let outcomes = apply_batch(&txn, items, frontier, seq)?;
        let applied = items
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == ItemOutcome::Applied)
            .map(|(i, _)| i);
        let payload = encode_batch(applied, frontier)?;
        // Not durable, not visible: a failed append drops the transaction.
        state.log.append(seq, &payload)?;
        state.next_seq += 1;
        if let Err(e) = txn.commit() {
            // The batch is durable in the log but not in redb: later batches must not commit on
            // top of a state that lacks it. A restart replays it.
            state.log.refuse_appends();
            return Err(dberr(e));
        }
        if state.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            || state.log.len_bytes() >= CHECKPOINT_LOG_BYTES
        {
            // The batch is durable (log) and visible (redb) already: a failed checkpoint must not
            // turn it into a failed write. The log keeps everything until one succeeds.
            if let Err(e) = self.checkpoint_locked(&mut state) {
                tracing::error!(error = %e, log_bytes = state.log.len_bytes(), "checkpoint failed; the commit log keeps the batches and it is retried");
            }
        }
        Ok(outcomes)
    }

    /// Make redb hold every committed batch durably and empty the commit log.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut state = match self.log.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.checkpoint_locked(&mut state)
    }

    fn checkpoint_locked(&self, state: &mut LogState) -> Result<(), StoreError> {
        state.last_checkpoint = Instant::now();
        if state.log.len_bytes() == 0 {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(dberr)?;
        txn.set_durability(Durability::Immediate).map_err(dberr)?;
        {
            let mut meta = txn.open_table(META).map_err(dberr)?;
            let held = state.next_seq.saturating_sub(1);
            meta.insert(META_LOG_SEQ, &held.to_be_bytes()[..])
                .map_err(dberr)?;
        }
        txn.commit().map_err(dberr)?;
        // If the truncation fails, the entries stay and are skipped at open (their sequence
        // numbers are now durable in redb); appends go on after them.
        if let Err(e) = state.log.clear() {
            tracing::warn!(error = %e, "emptying the commit log after a checkpoint failed; it will be retried");
        }
        Ok(())
    }

    /// The stored frontier: per (origin, class) the newest change held, for remote origins.
    pub fn frontier(&self) -> Result<Frontier, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
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
        let txn = self.db.begin_read().map_err(dberr)?;
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
    ) -> Result<(Vec<String>, [u64; 3]), StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(PENDING).map_err(dberr)?;
        let mut due = Vec::new();
        let mut counts = [0u64; 3];
        for item in table.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let (key, _, hlc) = k.value();
            let reason = v
                .value()
                .first()
                .copied()
                .and_then(PendingReason::from_byte);
            match reason {
                Some(PendingReason::WaitingForDependencies) => counts[0] += 1,
                Some(PendingReason::HeldForDrift) => {
                    counts[1] += 1;
                    if hlc <= horizon_ntp64
                        && due.len() < limit
                        && due.last().is_none_or(|k: &String| k != key)
                    {
                        due.push(key.to_string());
                    }
                }
                Some(PendingReason::Quarantined) | None => counts[2] += 1,
            }
        }
        Ok((due, counts))
    }

    /// How many entries of `origin`'s log lie after `after`, counting at most `cap`.
    pub fn count_after(&self, origin: &str, after: u64, cap: usize) -> Result<usize, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
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
        let txn = self.db.begin_write().map_err(dberr)?;
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
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(RECORDS).map_err(dberr)?;
        table.len().map_err(dberr)
    }
}

fn db_err(e: redb::TransactionError) -> StoreError {
    dberr(e)
}

fn read_u32(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<u32>, StoreError> {
    let Some(guard) = table.get(key).map_err(dberr)? else {
        return Ok(None);
    };
    let bytes: [u8; 4] = guard
        .value()
        .try_into()
        .map_err(|_| corrupt(format!("meta {key}"), "expected 4 bytes"))?;
    Ok(Some(u32::from_be_bytes(bytes)))
}

/// A record as `meridian dump` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DumpRow {
    pub key: String,
    pub home_region: Option<String>,
    pub version: String,
    pub deleted: bool,
}

/// The writes of a batch inside `txn`; returns what became of each item.
fn apply_batch(
    txn: &redb::WriteTransaction,
    items: &[WriteItem],
    frontier: &[FrontierEntry],
    seq: u64,
) -> Result<Vec<ItemOutcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(items.len());
    let mut records = txn.open_table(RECORDS).map_err(dberr)?;
    let mut changes = txn.open_table(CHANGES).map_err(dberr)?;
    let mut idempotency = txn.open_table(IDEMPOTENCY).map_err(dberr)?;
    for item in items {
        if let Some((idem_key, answer)) = &item.idempotency {
            let earlier = idempotency
                .get(idem_key.as_str())
                .map_err(dberr)?
                .map(|g| IdempotentAnswer::decode(g.value()));
            match earlier {
                Some(Ok(first)) if first.fingerprint == answer.fingerprint => {
                    outcomes.push(ItemOutcome::Replayed(first));
                    continue;
                }
                Some(_) => {
                    outcomes.push(ItemOutcome::KeyReused);
                    continue;
                }
                None => {
                    idempotency
                        .insert(idem_key.as_str(), answer.encode().as_slice())
                        .map_err(dberr)?;
                }
            }
        }
        if let Some(record) = &item.record {
            records
                .insert(item.key.as_str(), record.encode().as_slice())
                .map_err(dberr)?;
        }
        for (origin, hlc, change) in &item.log {
            let entry = LogEntry {
                key: item.key.clone(),
                change: change.clone(),
            };
            changes
                .insert((origin.as_str(), *hlc), entry.encode().as_slice())
                .map_err(dberr)?;
        }
        if !item.pending_put.is_empty() || !item.pending_remove.is_empty() {
            let mut pending = txn.open_table(PENDING).map_err(dberr)?;
            for p in &item.pending_put {
                let mut value = Vec::with_capacity(1 + p.change.len());
                value.push(p.reason as u8);
                value.extend_from_slice(&p.change);
                pending
                    .insert(
                        (item.key.as_str(), p.origin.as_str(), p.hlc),
                        value.as_slice(),
                    )
                    .map_err(dberr)?;
            }
            for (origin, hlc) in &item.pending_remove {
                pending
                    .remove((item.key.as_str(), origin.as_str(), *hlc))
                    .map_err(dberr)?;
            }
        }
        outcomes.push(ItemOutcome::Applied);
    }
    if !frontier.is_empty() {
        let mut table = txn.open_table(FRONTIER).map_err(dberr)?;
        for e in frontier {
            let current = table
                .get((e.origin.as_str(), e.class.as_str()))
                .map_err(dberr)?
                .map_or(0, |g| g.value());
            if e.hlc > current {
                table
                    .insert((e.origin.as_str(), e.class.as_str()), e.hlc)
                    .map_err(dberr)?;
            }
        }
    }
    let mut meta = txn.open_table(META).map_err(dberr)?;
    meta.insert(META_LOG_SEQ, &seq.to_be_bytes()[..])
        .map_err(dberr)?;
    Ok(outcomes)
}

fn put_str16(out: &mut Vec<u8>, s: &str) -> Result<(), StoreError> {
    // Keys, node ids and rule names are far below 64 KiB where they enter; never truncate.
    let len = u16::try_from(s.len())
        .map_err(|_| corrupt("commit log batch", format!("a {}-byte string", s.len())))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(b.len())
        .map_err(|_| corrupt("commit log batch", format!("a {}-byte value", b.len())))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

/// A batch as the commit log holds it: the applied items and the frontier raises.
fn encode_batch<'a>(
    items: impl Iterator<Item = &'a WriteItem>,
    frontier: &[FrontierEntry],
) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(1024);
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    let mut count = 0u32;
    for item in items {
        count += 1;
        put_str16(&mut out, &item.key)?;
        match &item.record {
            Some(r) => {
                out.push(1);
                put_bytes32(&mut out, &r.encode())?;
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(item.log.len() as u32).to_be_bytes());
        for (origin, hlc, change) in &item.log {
            put_str16(&mut out, origin)?;
            out.extend_from_slice(&hlc.to_be_bytes());
            put_bytes32(&mut out, change)?;
        }
        match &item.idempotency {
            Some((key, answer)) => {
                out.push(1);
                put_str16(&mut out, key)?;
                put_bytes32(&mut out, &answer.encode())?;
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(item.pending_put.len() as u32).to_be_bytes());
        for p in &item.pending_put {
            put_str16(&mut out, &p.origin)?;
            out.extend_from_slice(&p.hlc.to_be_bytes());
            out.push(p.reason as u8);
            put_bytes32(&mut out, &p.change)?;
        }
        out.extend_from_slice(&(item.pending_remove.len() as u32).to_be_bytes());
        for (origin, hlc) in &item.pending_remove {
            put_str16(&mut out, origin)?;
            out.extend_from_slice(&hlc.to_be_bytes());
        }
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&(frontier.len() as u32).to_be_bytes());
    for e in frontier {
        put_str16(&mut out, &e.origin)?;
        put_str16(&mut out, &e.class)?;
        out.extend_from_slice(&e.hlc.to_be_bytes());
    }
    Ok(out)
}

impl Reader<'_> {
    fn str16(&mut self) -> Result<String, String> {
        let len = self.u16()? as usize;
        std::str::from_utf8(self.take(len)?)
            .map(str::to_string)
            .map_err(|_| "string is not UTF-8".to_string())
    }
    fn bytes32(&mut self) -> Result<&[u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    /// A count of elements that take at least `min_bytes` each: checked against what is left
    /// before anything is allocated for them.
    fn count(&mut self, min_bytes: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        let left = self.bytes.len() - self.at;
        if n.saturating_mul(min_bytes) > left {
            return Err(format!("{n} elements cannot fit in {left} bytes"));
        }
        Ok(n)
    }
}

fn decode_batch(bytes: &[u8]) -> Result<(Vec<WriteItem>, Vec<FrontierEntry>), String> {
    let mut r = Reader { bytes, at: 0 };
    let n = r.count(2 + 1 + 4 + 1 + 4 + 4)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let key = r.str16()?;
        let record = match r.u8()? {
            0 => None,
            _ => Some(StoredRecord::decode(r.bytes32()?)?),
        };
        let logs = r.count(2 + 8 + 4)?;
        let mut log = Vec::with_capacity(logs);
        for _ in 0..logs {
            let origin = r.str16()?;
            let hlc = r.u64()?;
            log.push((origin, hlc, r.bytes32()?.to_vec()));
        }
        let idempotency = match r.u8()? {
            0 => None,
            _ => {
                let key = r.str16()?;
                Some((key, IdempotentAnswer::decode(r.bytes32()?)?))
            }
        };
        let puts = r.count(2 + 8 + 1 + 4)?;
        let mut pending_put = Vec::with_capacity(puts);
        for _ in 0..puts {
            let origin = r.str16()?;
            let hlc = r.u64()?;
            let reason = r.u8()?;
            let reason = PendingReason::from_byte(reason)
                .ok_or_else(|| format!("unknown pending reason {reason}"))?;
            pending_put.push(PendingChange {
                origin,
                hlc,
                reason,
                change: r.bytes32()?.to_vec(),
            });
        }
        let removes = r.count(2 + 8)?;
        let mut pending_remove = Vec::with_capacity(removes);
        for _ in 0..removes {
            let origin = r.str16()?;
            pending_remove.push((origin, r.u64()?));
        }
        items.push(WriteItem {
            key,
            record,
            log,
            idempotency,
            pending_put,
            pending_remove,
        });
    }
    let n = r.count(2 + 2 + 8)?;
    let mut frontier = Vec::with_capacity(n);
    for _ in 0..n {
        let origin = r.str16()?;
        let class = r.str16()?;
        frontier.push(FrontierEntry {
            origin,
            class,
            hlc: r.u64()?,
        });
    }
    if r.at != bytes.len() {
        return Err("trailing bytes".into());
    }
    Ok((items, frontier))
}

/// The sequence number of the newest batch that `db`'s durable state holds.
fn durable_log_seq(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
    match meta.get(META_LOG_SEQ).map_err(dberr)? {
        Some(g) => {
            let bytes: [u8; 8] = g
                .value()
                .try_into()
                .map_err(|_| corrupt("meta log_seq", "expected 8 bytes"))?;
            Ok(u64::from_be_bytes(bytes))
        }
        None => Ok(0),
    }
}

/// The log entries of `dir` that `durable` does not hold yet, checked to follow on from it.
fn entries_after(
    dir: &Path,
    entries: Vec<crate::commit_log::LogEntry>,
    durable: u64,
) -> Result<Vec<crate::commit_log::LogEntry>, StoreError> {
    let newer: Vec<_> = entries.into_iter().filter(|e| e.seq > durable).collect();
    if let Some(first) = newer.first()
        && first.seq != durable + 1
    {
        return Err(StoreError::LogGap {
            path: dir.to_path_buf(),
            first: first.seq,
            durable,
        });
    }
    Ok(newer)
}

/// Open the commit log of `dir` and commit again, non-durably, every batch redb does not hold
/// durably. Returns the log and the sequence number of the newest batch redb now holds.
fn replay_log(db: &Database, dir: &Path) -> Result<(CommitLog, u64), StoreError> {
    let (log, back) = CommitLog::open(dir)?;
    if let Some(reason) = &back.tail_reason {
        tracing::warn!(
            bytes = back.tail_bytes,
            reason = %reason,
            "cut a torn tail off the commit log (a batch whose sync never completed: it was never acknowledged)"
        );
    }
    let durable = {
        let txn = db.begin_read().map_err(dberr)?;
        match txn.open_table(META) {
            Ok(meta) => durable_log_seq(&meta)?,
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(dberr(e)),
        }
    };
    let newer = entries_after(dir, back.entries, durable)?;
    let mut held = durable;
    if !newer.is_empty() {
        tracing::info!(
            batches = newer.len(),
            "committing the commit log's batches that the database does not hold yet"
        );
    }
    for entry in newer {
        let (items, frontier) = decode_batch(&entry.payload)
            .map_err(|why| corrupt(format!("commit log batch {}", entry.seq), why))?;
        let mut txn = db.begin_write().map_err(dberr)?;
        txn.set_durability(Durability::None).map_err(dberr)?;
        apply_batch(&txn, &items, &frontier, entry.seq)?;
        txn.commit().map_err(dberr)?;
        held = entry.seq;
    }
    Ok((log, held))
}

/// The node id and every record physically stored in a data directory, read offline.
pub fn dump(dir: &Path) -> Result<(String, Vec<DumpRow>), StoreError> {
    let path = dir.join(DB_FILE);
    if !path.is_file() {
        return Err(StoreError::Missing(path));
    }
    let db = ReadOnlyDatabase::open(&path).map_err(|source| match source {
        redb::DatabaseError::RepairAborted => StoreError::NotClean { path: path.clone() },
        source => StoreError::Open {
            path: path.clone(),
            source,
        },
    })?;
    let txn = db.begin_read().map_err(db_err_ro)?;
    let meta = txn.open_table(META).map_err(dberr)?;
    let node_id = meta
        .get(META_NODE_ID)
        .map_err(dberr)?
        .map(|g| String::from_utf8_lossy(g.value()).into_owned())
        .unwrap_or_default();
    let table = txn.open_table(RECORDS).map_err(dberr)?;
    let mut stored = std::collections::BTreeMap::new();
    for item in table.iter().map_err(dberr)? {
        let (k, v) = item.map_err(dberr)?;
        let key = k.value().to_string();
        let rec = StoredRecord::decode(v.value())
            .map_err(|why| corrupt(format!("record {key:?}"), why))?;
        stored.insert(key, rec);
    }
    // Batches acknowledged after the last checkpoint are in the commit log only (the node is
    // running, or was killed): they are part of what the directory stores.
    let durable = durable_log_seq(&meta)?;
    let back = CommitLog::read(dir)?;
    for entry in entries_after(dir, back.entries, durable)? {
        let (items, _) = decode_batch(&entry.payload)
            .map_err(|why| corrupt(format!("commit log batch {}", entry.seq), why))?;
        for item in items {
            if let Some(rec) = item.record {
                stored.insert(item.key, rec);
            }
        }
    }
    let rows = stored
        .into_iter()
        .map(|(key, rec)| DumpRow {
            key,
            home_region: rec.home_region,
            version: rec.version.to_string(),
            deleted: !rec.live,
        })
        .collect();
    Ok((node_id, rows))
}

fn db_err_ro(e: redb::TransactionError) -> StoreError {
    dberr(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> StoredRecord {
        StoredRecord {
            live: true,
            version: Version {
                time_ntp64: n,
                node_hlc_id: 9,
            },
            home_region: Some("eu-west".into()),
            view_json: br#"{"value":{}}"#.to_vec(),
            doc: vec![1, 2, 3],
            appended_changes: 1,
        }
    }

    fn item(key: &str, n: u64) -> WriteItem {
        WriteItem::local(key.into(), record(n), "n1", n, vec![n as u8], None)
    }

    #[test]
    fn record_encoding_round_trips_and_rejects_truncation() {
        let r = record(5);
        let bytes = r.encode();
        assert_eq!(StoredRecord::decode(&bytes), Ok(r));
        for cut in 0..bytes.len() {
            assert!(StoredRecord::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let global = StoredRecord {
            home_region: None,
            ..record(1)
        };
        assert_eq!(StoredRecord::decode(&global.encode()), Ok(global));
    }

    #[test]
    fn a_data_directory_remembers_its_node_and_bumps_the_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id1) = Store::open(dir.path(), "n1").unwrap();
        store.commit_batch(&[item("a", 42)], &[]).unwrap();
        drop(store);
        let (_store, id2) = Store::open(dir.path(), "n1").unwrap();
        assert_eq!(id2.incarnation, id1.incarnation + 1);
        assert_eq!(id2.last_hlc.time_ntp64, 42);
        drop(_store);
        let err = Store::open(dir.path(), "n2").err().expect("refused");
        assert!(err.to_string().contains("belongs to node \"n1\""), "{err}");
    }

    #[test]
    fn batches_write_records_and_the_change_log_and_list_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), "n1").unwrap();
        let items: Vec<_> = (1..=5).map(|i| item(&format!("k/{i}"), i)).collect();
        let outcomes = store.commit_batch(&items, &[]).unwrap();
        assert!(outcomes.iter().all(|o| *o == ItemOutcome::Applied));
        assert_eq!(store.record("k/3").unwrap(), Some(record(3)));
        let page = store.list("k/", Some("k/2"), 2).unwrap();
        let keys: Vec<_> = page.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["k/3", "k/4"]);
        let log = store.log_after("n1", 2, 10).unwrap();
        assert_eq!(log.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(log[0].1.key, "k/3");
        let (node, rows) = {
            drop(store);
            dump(dir.path()).unwrap()
        };
        assert_eq!(node, "n1");
        assert_eq!(rows.len(), 5);
    }

    #[test]
    fn frontier_only_rises_and_pending_changes_are_kept_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), "n1").unwrap();
        let fe = |hlc| FrontierEntry {
            origin: "n2".into(),
            class: "".into(),
            hlc,
        };
        let mut remote = WriteItem::local("k".into(), record(1), "n2", 10, vec![1], None);
        remote.pending_put.push(PendingChange {
            origin: "n2".into(),
            hlc: 11,
            reason: PendingReason::HeldForDrift,
            change: vec![9],
        });
        store.commit_batch(&[remote], &[fe(11)]).unwrap();
        store.commit_batch(&[], &[fe(5)]).unwrap();
        assert_eq!(store.frontier().unwrap().get("n2", ""), 11);
        let pending = store.pending_for("k").unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].reason, PendingReason::HeldForDrift);
        let (due, counts) = store.pending_summary(11, 10).unwrap();
        assert_eq!((due, counts), (vec!["k".to_string()], [0, 1, 0]));
        assert_eq!(
            store.pending_summary(10, 10).unwrap().0,
            Vec::<String>::new()
        );
        let mut done = WriteItem::local("k".into(), record(2), "n2", 11, vec![9], None);
        done.pending_remove.push(("n2".into(), 11));
        store.commit_batch(&[done], &[]).unwrap();
        assert!(store.pending_for("k").unwrap().is_empty());
        assert_eq!(store.count_after("n2", 0, 100).unwrap(), 2);
    }

    fn all_parts_item(key: &str, n: u64) -> WriteItem {
        let mut it = item(key, n);
        it.log.push(("n2".into(), n + 1, vec![7; 3]));
        it.idempotency = Some((
            format!("idem-{key}"),
            IdempotentAnswer {
                fingerprint: [n as u8; 32],
                created_unix_ms: 5,
                status: 200,
                body: b"{}".to_vec(),
            },
        ));
        it.pending_put.push(PendingChange {
            origin: "n3".into(),
            hlc: 9,
            reason: PendingReason::WaitingForDependencies,
            change: vec![1, 2],
        });
        it.pending_remove.push(("n3".into(), 8));
        it
    }

    #[test]
    fn batch_encoding_round_trips_and_rejects_truncation() {
        let items = [all_parts_item("a", 1), item("b", 2), {
            let mut none = item("c", 3);
            none.record = None;
            none
        }];
        let frontier = vec![FrontierEntry {
            origin: "n2".into(),
            class: "eu".into(),
            hlc: 4,
        }];
        let bytes = encode_batch(items.iter(), &frontier).unwrap();
        let (back, back_frontier) = decode_batch(&bytes).unwrap();
        assert_eq!(back_frontier, frontier);
        assert_eq!(back.len(), 3);
        for (a, b) in items.iter().zip(&back) {
            assert_eq!(a.key, b.key);
            assert_eq!(a.record, b.record);
            assert_eq!(a.log, b.log);
            assert_eq!(a.idempotency, b.idempotency);
            assert_eq!(a.pending_put, b.pending_put);
            assert_eq!(a.pending_remove, b.pending_remove);
        }
        for cut in 0..bytes.len() {
            assert!(decode_batch(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A string that does not fit its length field is an error, never truncated.
        let long = WriteItem::local("k".into(), record(1), &"n".repeat(70_000), 1, vec![1], None);
        assert!(encode_batch([long].iter(), &[]).is_err());
        // A count that cannot fit is refused before anything is allocated for it.
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_batch(&huge).unwrap_err().contains("cannot fit"));
    }

    #[test]
    fn batches_only_in_the_commit_log_are_committed_again_at_open_and_shown_by_dump() {
        let dir = tempfile::tempdir().unwrap();
        let crash = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), "n1").unwrap();
        store.commit_batch(&[item("a", 1)], &[]).unwrap();
        store.checkpoint().unwrap();
        // A crash image: the database file as durably committed at this point ...
        std::fs::copy(dir.path().join(DB_FILE), crash.path().join(DB_FILE)).unwrap();
        let fe = FrontierEntry {
            origin: "n2".into(),
            class: "".into(),
            hlc: 2,
        };
        store.commit_batch(&[item("b", 2)], &[fe]).unwrap();
        store.commit_batch(&[all_parts_item("c", 3)], &[]).unwrap();
        // ... and the commit log as synced after two more acknowledged batches.
        let log_path = dir.path().join(crate::commit_log::LOG_FILE);
        assert!(std::fs::metadata(&log_path).unwrap().len() > 0);
        std::fs::copy(&log_path, crash.path().join(crate::commit_log::LOG_FILE)).unwrap();
        drop(store);

        // Not shut down cleanly: the offline dump says so instead of guessing.
        match dump(crash.path()) {
            Err(err) => assert!(matches!(err, StoreError::NotClean { .. }), "{err}"),
            Ok(_) => panic!("an unclean database was read"),
        }

        let (store, identity) = Store::open(crash.path(), "n1").unwrap();
        assert_eq!(identity.last_hlc.time_ntp64, 3);
        assert_eq!(store.record("b").unwrap(), Some(record(2)));
        assert_eq!(store.record("c").unwrap(), Some(record(3)));
        let own: Vec<u64> = store
            .log_after("n1", 0, 10)
            .unwrap()
            .iter()
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(own, [1, 2, 3]);
        assert_eq!(store.frontier().unwrap().get("n2", ""), 2);
        assert!(store.idempotent_answer("idem-c").unwrap().is_some());
        assert_eq!(store.pending_for("c").unwrap().len(), 1);
        // The open checkpointed what it replayed: the log is empty, and a second open (after
        // another crash image) replays nothing twice.
        let crash_log = crash.path().join(crate::commit_log::LOG_FILE);
        assert_eq!(std::fs::metadata(&crash_log).unwrap().len(), 0);
        store.commit_batch(&[item("d", 4)], &[]).unwrap();
        drop(store);
        let (store, _) = Store::open(crash.path(), "n1").unwrap();
        assert_eq!(store.log_after("n1", 0, 10).unwrap().len(), 4);
    }

    #[test]
    fn dump_shows_and_open_commits_a_batch_that_only_the_log_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), "n1").unwrap();
        store.commit_batch(&[item("a", 1)], &[]).unwrap();
        drop(store);
        // A cleanly closed database at batch 1 and a log that also holds batch 2.
        let (mut log, back) = CommitLog::open(dir.path()).unwrap();
        assert_eq!(back.entries.last().map(|e| e.seq), Some(1));
        log.append(2, &encode_batch([item("z", 2)].iter(), &[]).unwrap())
            .unwrap();
        drop(log);
        let (_, rows) = dump(dir.path()).unwrap();
        let keys: Vec<_> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["a", "z"]);
        let (store, identity) = Store::open(dir.path(), "n1").unwrap();
        assert_eq!(identity.last_hlc.time_ntp64, 2);
        assert_eq!(store.record("z").unwrap(), Some(record(2)));
    }

    #[test]
    fn a_log_that_does_not_follow_the_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), "n1").unwrap();
        store.commit_batch(&[item("a", 1)], &[]).unwrap();
        drop(store);
        // Batch 10 in the log, the database durable at batch 1: 2..9 are missing.
        let (mut log, _) = CommitLog::open(dir.path()).unwrap();
        log.clear().unwrap();
        log.append(10, &encode_batch([item("x", 10)].iter(), &[]).unwrap())
            .unwrap();
        drop(log);
        let err = Store::open(dir.path(), "n1").err().expect("refused");
        assert!(matches!(err, StoreError::LogGap { first: 10, .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn idempotency_keys_replay_or_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), "n1").unwrap();
        let answer = |fp: u8| IdempotentAnswer {
            fingerprint: [fp; 32],
            created_unix_ms: 1,
            status: 200,
            body: b"first".to_vec(),
        };
        let mut a = item("a", 1);
        a.idempotency = Some(("idem".into(), answer(1)));
        let mut again = item("a", 2);
        again.idempotency = Some(("idem".into(), answer(1)));
        let mut other = item("b", 3);
        other.idempotency = Some(("idem".into(), answer(2)));
        let outcomes = store.commit_batch(&[a, again, other], &[]).unwrap();
        assert_eq!(outcomes[0], ItemOutcome::Applied);
        assert_eq!(outcomes[1], ItemOutcome::Replayed(answer(1)));
        assert_eq!(outcomes[2], ItemOutcome::KeyReused);
        assert_eq!(store.record("a").unwrap().unwrap().version.time_ntp64, 1);
        assert!(store.record("b").unwrap().is_none());
        // A later batch finds the key in the table.
        let mut later = item("a", 4);
        later.idempotency = Some(("idem".into(), answer(1)));
        let mut later_other = item("c", 5);
        later_other.idempotency = Some(("idem".into(), answer(3)));
        let outcomes = store.commit_batch(&[later, later_other], &[]).unwrap();
        assert_eq!(outcomes[0], ItemOutcome::Replayed(answer(1)));
        assert_eq!(outcomes[1], ItemOutcome::KeyReused);
        assert_eq!(store.record("a").unwrap().unwrap().version.time_ntp64, 1);
        assert!(store.record("c").unwrap().is_none());
        assert_eq!(store.prune_idempotency(2, 100).unwrap(), 1);
        assert!(store.idempotent_answer("idem").unwrap().is_none());
    }
}
