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

use std::path::{Path, PathBuf};

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
const FORMAT_VERSION: u32 = 1;

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
        let txn = db.begin_write().map_err(db_err)?;
        let identity = {
            let mut meta = txn.open_table(META).map_err(dberr)?;
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
        // The new incarnation must be durable before any change carries it.
        txn.commit().map_err(dberr)?;
        Ok((
            Store {
                db,
                node_id: node_id.to_string(),
                path,
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
    /// is not applied.
    pub fn commit_batch(
        &self,
        items: &[WriteItem],
        frontier: &[FrontierEntry],
    ) -> Result<Vec<ItemOutcome>, StoreError> {
        let mut txn = self.db.begin_write().map_err(dberr)?;
        txn.set_durability(Durability::Immediate).map_err(dberr)?;
        let mut outcomes = Vec::with_capacity(items.len());
        {
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
        }
        txn.commit().map_err(dberr)?;
        Ok(outcomes)
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

/// The node id and every record physically stored in a data directory, read offline.
pub fn dump(dir: &Path) -> Result<(String, Vec<DumpRow>), StoreError> {
    let path = dir.join(DB_FILE);
    if !path.is_file() {
        return Err(StoreError::Missing(path));
    }
    let db = ReadOnlyDatabase::open(&path).map_err(|source| StoreError::Open {
        path: path.clone(),
        source,
    })?;
    let txn = db.begin_read().map_err(db_err_ro)?;
    let meta = txn.open_table(META).map_err(dberr)?;
    let node_id = meta
        .get(META_NODE_ID)
        .map_err(dberr)?
        .map(|g| String::from_utf8_lossy(g.value()).into_owned())
        .unwrap_or_default();
    let table = txn.open_table(RECORDS).map_err(dberr)?;
    let mut rows = Vec::new();
    for item in table.iter().map_err(dberr)? {
        let (k, v) = item.map_err(dberr)?;
        let key = k.value().to_string();
        let rec = StoredRecord::decode(v.value())
            .map_err(|why| corrupt(format!("record {key:?}"), why))?;
        rows.push(DumpRow {
            key,
            home_region: rec.home_region,
            version: rec.version.to_string(),
            deleted: !rec.live,
        });
    }
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
        assert_eq!(store.prune_idempotency(2, 100).unwrap(), 1);
        assert!(store.idempotent_answer("idem").unwrap().is_none());
    }
}
