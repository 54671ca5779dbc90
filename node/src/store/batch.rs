//! A group commit's writes, applied inside one redb transaction, and their encoding in the
//! commit log; the replay of logged batches at open.
//!
//! Architecture invariant: a batch applied at replay is the same batch, item for item, that
//! was applied before the crash: `encode_batch` writes exactly the applied items, and
//! `decode_batch` rejects anything that does not decode whole.

use std::path::Path;

use meridian_replication::wire::FrontierEntry;
use redb::{Database, Durability, ReadableDatabase, ReadableTable};

use meridian_replication::codec::Reader;

use super::codec::{IdempotentAnswer, StoredChange, StoredRecord};
use super::commit_log::{CommitLog, LoggedBatch, OpenMode};
use super::{
    CHANGES, FRONTIER, IDEMPOTENCY, META, META_LOG_MARKED, META_LOG_SEQ, PENDING, RECORDS,
    StoreError, corrupt, dberr,
};

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
    pub(super) fn from_byte(b: u8) -> Option<Self> {
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
/// The writes of a batch inside `txn`; returns what became of each item.
pub(super) fn apply_batch(
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
            let entry = StoredChange {
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

pub(super) fn put_str16(out: &mut Vec<u8>, s: &str) -> Result<(), StoreError> {
    // Keys, node ids and rule names are far below 64 KiB where they enter; never truncate.
    let len = u16::try_from(s.len())
        .map_err(|_| corrupt("commit log batch", format!("a {}-byte string", s.len())))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

pub(super) fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(b.len())
        .map_err(|_| corrupt("commit log batch", format!("a {}-byte value", b.len())))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

/// A batch as the commit log holds it: the applied items and the frontier raises.
pub(super) fn encode_batch<'a>(
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
pub(super) fn decode_batch(bytes: &[u8]) -> Result<(Vec<WriteItem>, Vec<FrontierEntry>), String> {
    let mut r = Reader::new(bytes);
    let n = r.count(2 + 1 + 4 + 1 + 4 + 4)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let key = r.str16()?.to_string();
        let record = match r.u8()? {
            0 => None,
            _ => Some(StoredRecord::decode(r.bytes32()?)?),
        };
        let logs = r.count(2 + 8 + 4)?;
        let mut log = Vec::with_capacity(logs);
        for _ in 0..logs {
            let origin = r.str16()?.to_string();
            let hlc = r.u64_be()?;
            log.push((origin, hlc, r.bytes32()?.to_vec()));
        }
        let idempotency = match r.u8()? {
            0 => None,
            _ => {
                let key = r.str16()?.to_string();
                Some((key, IdempotentAnswer::decode(r.bytes32()?)?))
            }
        };
        let puts = r.count(2 + 8 + 1 + 4)?;
        let mut pending_put = Vec::with_capacity(puts);
        for _ in 0..puts {
            let origin = r.str16()?.to_string();
            let hlc = r.u64_be()?;
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
            let origin = r.str16()?.to_string();
            pending_remove.push((origin, r.u64_be()?));
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
        let origin = r.str16()?.to_string();
        let class = r.str16()?.to_string();
        frontier.push(FrontierEntry {
            origin,
            class,
            hlc: r.u64_be()?,
        });
    }
    if !r.is_at_end() {
        return Err("trailing bytes".into());
    }
    Ok((items, frontier))
}

/// The sequence number of the newest batch that `db`'s durable state holds.
pub(super) fn durable_log_seq(
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

/// The log entries of `dir` that `durable` does not hold yet, checked to follow on from it
/// unless `gaps_allowed` (a damaged log being recovered).
pub(super) fn entries_after(
    dir: &Path,
    entries: Vec<LoggedBatch>,
    durable: u64,
    gaps_allowed: bool,
) -> Result<Vec<LoggedBatch>, StoreError> {
    let newer: Vec<_> = entries.into_iter().filter(|e| e.seq > durable).collect();
    if let Some(first) = newer.first()
        && first.seq != durable + 1
        && !gaps_allowed
    {
        return Err(StoreError::LogGap {
            path: dir.to_path_buf(),
            first: first.seq,
            durable,
        });
    }
    Ok(newer)
}

/// What the database says about its commit log: the newest batch it holds durably, and
/// whether the log has carried a checkpoint marker (so an empty log means a lost one).
pub(super) fn durable_state(db: &Database) -> Result<(u64, bool), StoreError> {
    let txn = db.begin_read().map_err(dberr)?;
    match txn.open_table(META) {
        Ok(meta) => Ok((
            durable_log_seq(&meta)?,
            meta.get(META_LOG_MARKED).map_err(dberr)?.is_some(),
        )),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok((0, false)),
        Err(e) => Err(dberr(e)),
    }
}

/// What [`replay_log`] did.
pub(super) struct Replayed {
    pub(super) log: CommitLog,
    /// The newest batch the database now holds.
    pub(super) held: u64,
    /// Acknowledged batches may have been lost (a damaged or missing log was recovered).
    pub(super) lost: bool,
}

/// Open the commit log of `dir` and commit again, non-durably, every batch redb does not hold
/// durably.
pub(super) fn replay_log(
    db: &Database,
    dir: &Path,
    mode: OpenMode,
) -> Result<Replayed, StoreError> {
    let (durable, marked) = durable_state(db)?;
    let (log, back) = CommitLog::open(dir, durable, mode)?;
    if let Some(reason) = &back.tail_reason {
        tracing::warn!(
            bytes = back.tail_bytes,
            reason = %reason,
            "cut a torn tail off the commit log (a batch whose sync never completed: it was never acknowledged)"
        );
    }
    let missing_log = marked && back.entries.is_empty();
    let lost = missing_log || back.damage.is_some();
    if missing_log {
        if mode == OpenMode::Strict {
            return Err(StoreError::LogMissing {
                path: log.path().to_path_buf(),
                durable,
            });
        }
        tracing::error!(path = %log.path().display(), durable, "the commit log has no entry, not even its checkpoint marker; recovering: batches acknowledged after batch {durable} are lost here unless peers send them back");
    }
    if let Some(damage) = &back.damage {
        // Only batches the database does not hold are lost.
        let missing: Vec<(u64, u64)> = damage
            .missing
            .iter()
            .filter(|(_, last)| *last > durable)
            .map(|&(first, last)| (first.max(durable + 1), last))
            .collect();
        tracing::error!(
            path = %log.path().display(),
            offset = damage.offset,
            reason = %damage.reason,
            damaged_bytes = damage.bad_bytes,
            kept_after_damage = damage.following,
            missing_batches = ?missing,
            "recovering a damaged commit log: every intact entry is kept, the damaged bytes are dropped; the missing batches are lost here unless peers send their changes back"
        );
    }
    let gaps_allowed = back.damage.is_some();
    let newer = entries_after(dir, back.entries, durable, gaps_allowed)?;
    let mut held = durable;
    if !newer.is_empty() {
        tracing::info!(
            batches = newer.len(),
            "committing the commit log's batches that the database does not hold yet"
        );
    }
    // One transaction for them all: redb frees the pages a commit replaces only at a durable
    // commit, so one non-durable transaction per batch would need room for every version of
    // every page they touch, and a restart on a nearly full disk failed that way. One
    // transaction needs room for the final pages only.
    if !newer.is_empty() {
        let mut txn = db.begin_write().map_err(dberr)?;
        txn.set_durability(Durability::None).map_err(dberr)?;
        for entry in newer {
            let (items, frontier) = decode_batch(&entry.payload)
                .map_err(|why| corrupt(format!("commit log batch {}", entry.seq), why))?;
            apply_batch(&txn, &items, &frontier, entry.seq)?;
            held = entry.seq;
        }
        txn.commit().map_err(dberr)?;
    }
    Ok(Replayed { log, held, lost })
}
