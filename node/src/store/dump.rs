//! The offline `meridian dump`: every record a data directory stores, read while no node runs
//! on it, including batches that only the commit log holds.

use std::path::Path;

use redb::{ReadOnlyDatabase, ReadableDatabase, ReadableTable};

use super::batch::{decode_batch, durable_log_seq, entries_after};
use super::codec::StoredRecord;
use super::commit_log::CommitLog;
use super::{DB_FILE, META, META_NODE_ID, RECORDS, StoreError, corrupt, dberr};

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
    // A database that was not shut down cleanly needs redb's repair, which writes: it is
    // repaired in a copy, so that the dump never writes to the data directory (a node may be
    // running on it, or it may be evidence).
    let opened: Box<dyn ReadableDatabase> = match ReadOnlyDatabase::open(&path) {
        Ok(db) => Box::new(db),
        Err(redb::DatabaseError::RepairAborted) => Box::new(repaired_copy(&path)?),
        Err(source) => {
            return Err(StoreError::Open {
                path: path.clone(),
                source,
            });
        }
    };
    let txn = opened.begin_read().map_err(db_err_ro)?;
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
    for entry in entries_after(dir, back.entries, durable, back.damage.is_some())? {
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

/// A database repaired in a copy: the copy's directory goes when it is dropped.
struct RepairedCopy {
    db: redb::Database,
    _dir: tempfile::TempDir,
}

impl ReadableDatabase for RepairedCopy {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        self.db.begin_read()
    }

    fn cache_stats(&self) -> redb::CacheStats {
        self.db.cache_stats()
    }
}

/// A copy of the database at `path` in a temporary directory, opened (so repaired) there.
fn repaired_copy(path: &Path) -> Result<RepairedCopy, StoreError> {
    let scratch = std::env::temp_dir();
    let not_clean = |source| StoreError::NotClean {
        path: path.to_path_buf(),
        scratch: scratch.clone(),
        source,
    };
    let dir = tempfile::Builder::new()
        .prefix("meridian-dump-")
        .tempdir_in(&scratch)
        .map_err(not_clean)?;
    let copied = dir.path().join(DB_FILE);
    std::fs::copy(path, &copied).map_err(not_clean)?;
    let db = super::space::open_database(&copied)?;
    Ok(RepairedCopy { db, _dir: dir })
}

fn db_err_ro(e: redb::TransactionError) -> StoreError {
    dberr(e)
}
