//! Running out of disk space, and coming back from it without a restart.
//!
//! A full disk shows up as a failed commit-log append (undone: the next write may succeed) or
//! as a failed redb commit or checkpoint. After the latter redb refuses everything ("previous
//! I/O error") until the database is closed and opened again, so the store reopens it itself,
//! once the file system has room again: under the log lock (no batch commits meanwhile) it
//! closes the database, opens it (redb repairs what the failed commit left), commits again
//! the commit log's batches that the database does not hold durably, and checkpoints. Every
//! acknowledged batch is in the synced log, so nothing acknowledged is lost by the reopen.
//! Readers wait for the reopen (it holds the database's write lock); should the open itself
//! fail, they get [`StoreError::Reopening`] until a later attempt succeeds.

use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use redb::{Database, Durability};

use super::batch::replay_log;
use super::commit_log::{CommitLogError, OpenMode};
use super::{LogState, META, META_LOG_SEQ, REDB_CACHE_BYTES, Store, StoreError, dberr};
use crate::sync::lock;

/// Free space a reopen wants beyond the commit log's size: redb's repair and the replayed
/// batches' pages.
pub const REOPEN_HEADROOM_BYTES: u64 = 2 << 20;
/// Reopen attempts at most this often, however many writes ask.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// The database, behind a lock that only a reopen takes for writing.
pub(super) struct DbHandle(RwLock<Option<Database>>);

/// A read lock on an open database.
pub(super) struct DbRef<'a>(RwLockReadGuard<'a, Option<Database>>);

impl Deref for DbRef<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        // `DbHandle::get` hands out a `DbRef` only for `Some`, and nothing can change it while
        // the read lock is held.
        self.0.as_ref().expect("checked when the lock was taken")
    }
}

impl DbHandle {
    pub(super) fn new(db: Database) -> DbHandle {
        DbHandle(RwLock::new(Some(db)))
    }

    fn get(&self) -> Result<DbRef<'_>, StoreError> {
        let guard = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_none() {
            return Err(StoreError::Reopening);
        }
        Ok(DbRef(guard))
    }
}

/// What the store knows of its disk.
#[derive(Default)]
pub(super) struct StorageHealth {
    /// redb failed a commit: it takes nothing more until reopened.
    needs_reopen: AtomicBool,
    /// The last failure was a full disk, and no write has succeeded since.
    full: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
}

impl StorageHealth {
    /// `err`, as [`StoreError::StorageFull`] when the disk is full (remembered until a write
    /// succeeds).
    pub(super) fn observe(&self, err: StoreError) -> StoreError {
        if is_out_of_space(&err) || (self.needs_reopen() && is_previous_io(&err)) {
            self.full.store(true, Ordering::Relaxed);
            return StoreError::StorageFull {
                why: err.to_string(),
            };
        }
        err
    }

    pub(super) fn database_failed(&self) {
        self.needs_reopen.store(true, Ordering::Relaxed);
    }

    pub(super) fn write_succeeded(&self) {
        self.full.store(false, Ordering::Relaxed);
    }

    pub(super) fn needs_reopen(&self) -> bool {
        self.needs_reopen.load(Ordering::Relaxed)
    }

    fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Whether a reopen may be tried now (at most every [`REOPEN_EVERY`]).
    fn reopen_due(&self) -> bool {
        let mut last = lock(&self.last_reopen);
        if last.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

fn is_out_of_space(err: &StoreError) -> bool {
    let io = match err {
        StoreError::Db(redb::Error::Io(e)) => e,
        StoreError::Log(CommitLogError::Io { source, .. }) => source,
        StoreError::StorageFull { .. } => return true,
        _ => return false,
    };
    io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28)
}

fn is_previous_io(err: &StoreError) -> bool {
    matches!(err, StoreError::Db(redb::Error::PreviousIo))
}

/// Bytes an unprivileged writer may still use on the file system of `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

pub(super) fn open_database(path: &Path) -> Result<Database, StoreError> {
    redb::Builder::new()
        .set_cache_size(REDB_CACHE_BYTES)
        .create(path)
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })
}

impl Store {
    /// The open database; [`StoreError::Reopening`] while a failed reopen left it closed.
    pub(super) fn db(&self) -> Result<DbRef<'_>, StoreError> {
        self.db.get()
    }

    /// Whether the store takes writes: its database has not failed, and the disk had room at
    /// the last write (or has since).
    pub fn accepts_writes(&self) -> bool {
        !self.health.needs_reopen() && !self.health.is_full()
    }

    /// Brings a failed store back once the disk has room again: reopens the database if a
    /// commit failed, or forgets a full disk that has room now. Called about every second by
    /// the engine's storage watcher, and by a write that finds the database failed. `Ok(true)`
    /// when the store takes writes again.
    pub fn try_recover(&self) -> Result<bool, StoreError> {
        if self.health.needs_reopen() {
            let mut state = lock(&self.log);
            return self.reopen_locked(&mut state);
        }
        if self.health.is_full()
            && free_bytes(self.dir()).is_some_and(|free| free >= REOPEN_HEADROOM_BYTES)
        {
            self.health.write_succeeded();
            return Ok(true);
        }
        Ok(!self.health.is_full())
    }

    /// The data directory.
    pub(super) fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// With the log lock held: reopen the failed database if the disk has room and an attempt
    /// is due. `Ok(false)` when it is not tried now.
    pub(super) fn reopen_locked(&self, state: &mut LogState) -> Result<bool, StoreError> {
        if !self.health.needs_reopen() {
            return Ok(true);
        }
        let wanted = state.log.len_bytes().saturating_add(REOPEN_HEADROOM_BYTES);
        let room = free_bytes(self.dir()).is_some_and(|free| free >= wanted);
        if !room || !self.health.reopen_due() {
            return Ok(false);
        }
        let replayed = {
            let mut slot = self.db.0.write().unwrap_or_else(|p| p.into_inner());
            // Closed before it is opened again: redb locks its file.
            *slot = None;
            let db = open_database(&self.path)?;
            let replayed = replay_log(&db, self.dir(), OpenMode::Strict)?;
            *slot = Some(db);
            replayed
        };
        let expected = state.next_seq.saturating_sub(1);
        if replayed.held != expected {
            return Err(StoreError::Corrupt {
                what: "commit log".into(),
                why: format!(
                    "after a reopen the database holds batches up to {}, but {expected} were committed",
                    replayed.held
                ),
            });
        }
        state.log = replayed.log;
        // Durable now, so that the log can be emptied.
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(dberr)?;
        txn.set_durability(Durability::Immediate).map_err(dberr)?;
        txn.open_table(META)
            .map_err(dberr)?
            .insert(META_LOG_SEQ, &expected.to_be_bytes()[..])
            .map_err(dberr)?;
        txn.commit().map_err(dberr)?;
        state.log.clear(expected)?;
        self.health.needs_reopen.store(false, Ordering::Relaxed);
        self.health.write_succeeded();
        tracing::info!(
            batches = expected,
            "storage recovered: the database was reopened and the commit log's batches committed again"
        );
        Ok(true)
    }
}
