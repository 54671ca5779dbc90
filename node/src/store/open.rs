//! Opening a data directory: the commit log's replay, the node's identity (node id, format,
//! incarnation) and the HLC floor, in one durable transaction.
//!
//! Architecture invariant: the new incarnation and the HLC floor are durable before any change
//! carries them, so versions keep growing across restarts.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use meridian_replication::Version;
use meridian_replication::codec::Reader;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::batch::{self, replay_log};
use super::commit_log::OpenMode;
use super::{
    CHANGES, DB_FILE, FORMAT_VERSION, FRONTIER, IDEMPOTENCY, Identity, LogState, META, META_FORMAT,
    META_HLC_FLOOR, META_INCARNATION, META_LOG_SEQ, META_NODE_ID, META_OWN_RECOVERY, OwnRecovery,
    PENDING, RECORDS, Store, StoreError, StoreOptions, corrupt, db_err, dberr, space,
};

impl Store {
    /// [`Store::open`] with options.
    pub fn open_with(
        dir: &Path,
        node_id: &str,
        options: StoreOptions,
    ) -> Result<(Store, Identity), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let db = space::open_database(&path)?;
        let mode = if options.recover_log {
            OpenMode::Recover
        } else {
            OpenMode::Strict
        };
        let own_before = last_own_hlc(&db, node_id)?;
        let replayed = replay_log(&db, dir, mode)?;
        let (log, replayed_to) = (replayed.log, replayed.held);
        let (_, marked) = batch::durable_state(&db)?;
        let txn = db.begin_write().map_err(db_err)?;
        let identity = {
            let mut meta = txn.open_table(META).map_err(dberr)?;
            meta.insert(META_LOG_SEQ, &replayed_to.to_be_bytes()[..])
                .map_err(dberr)?;
            if replayed.lost {
                // Own changes above what the database held before the replay may be gone; an
                // earlier recovery that is not done yet widens the range.
                let earlier = own_recovery(&meta)?;
                let recovery = OwnRecovery {
                    complete_to: earlier.map_or(own_before, |e| e.complete_to.min(own_before)),
                    lost_before: earlier.map_or(options.lost_before_ntp64, |e| {
                        e.lost_before.max(options.lost_before_ntp64)
                    }),
                };
                let mut value = recovery.complete_to.to_be_bytes().to_vec();
                value.extend_from_slice(&recovery.lost_before.to_be_bytes());
                meta.insert(META_OWN_RECOVERY, value.as_slice())
                    .map_err(dberr)?;
            }
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
            let last_time = newest_stamp_of(&changes, node_id)?;
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
        log.clear(replayed_to)?;
        Ok((
            Store {
                db: space::DbHandle::new(db),
                health: space::StorageHealth::default(),
                node_id: node_id.to_string(),
                path,
                log: Mutex::new(LogState {
                    log,
                    next_seq: replayed_to + 1,
                    last_checkpoint: Instant::now(),
                    marked,
                }),
            },
            identity,
        ))
    }
}

/// The newest HLC of `node_id`'s own change log in `db`'s committed state.
pub(super) fn last_own_hlc(db: &Database, node_id: &str) -> Result<u64, StoreError> {
    let txn = db.begin_read().map_err(dberr)?;
    let changes = match txn.open_table(CHANGES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(dberr(e)),
    };
    newest_stamp_of(&changes, node_id)
}

/// The newest HLC in `origin`'s part of a change log; 0 when it has none.
pub(super) fn newest_stamp_of(
    changes: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
) -> Result<u64, StoreError> {
    let newest = changes
        .range((origin, 0)..=(origin, u64::MAX))
        .map_err(dberr)?
        .next_back()
        .transpose()
        .map_err(dberr)?;
    Ok(newest.map_or(0, |(k, _)| k.value().1))
}

pub(super) fn own_recovery(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<OwnRecovery>, StoreError> {
    let Some(guard) = meta.get(META_OWN_RECOVERY).map_err(dberr)? else {
        return Ok(None);
    };
    let mut r = Reader::new(guard.value());
    let (Ok(complete_to), Ok(lost_before), true) = (r.u64_be(), r.u64_be(), r.remaining() == 0)
    else {
        return Err(corrupt("meta own_recovery", "expected 16 bytes"));
    };
    Ok(Some(OwnRecovery {
        complete_to,
        lost_before,
    }))
}

pub(super) fn read_u32(
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
