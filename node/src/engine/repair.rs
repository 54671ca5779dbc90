//! Rebuilding a record whose stored bytes are corrupt (they fail their checksum or do not
//! decode) from the changes the change logs hold of it.
//!
//! A record's document is exactly the set of its changes, and every change applied here is in
//! a change log (under its origin: own writes, received and relayed changes alike), so the
//! document rebuilt from them equals the one that was damaged. The rebuild refuses when a log
//! entry cannot be read, since that entry might be one of the record's changes: a rebuild
//! without it would silently lose a write. Repairs run one task per key, at most
//! [`MAX_REPAIRS_AT_ONCE`] at a time; a read that finds the record still corrupt asks again.

use meridian_replication::{RecordDoc, RecordError};

use super::{Engine, WriteError};
use crate::observe::metrics::Reason;
use crate::store::{StoreError, StoredRecord, WriteItem};
use crate::sync::lock;

/// Repairs under way at once at most; a corrupt record found while as many run is repaired
/// when it is next read.
pub const MAX_REPAIRS_AT_ONCE: usize = 16;

/// What a repair did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepairOutcome {
    /// The record was rebuilt from this many changes and stored again.
    Rebuilt { changes: usize },
    /// The stored record read back intact by the time the repair held the key's lock (it was
    /// repaired or rewritten meanwhile).
    Intact,
}

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("reading the change logs failed: {0}")]
    Store(#[from] StoreError),
    #[error(
        "{} change-log entries cannot be read (the first: origin {:?}, stamp {:016x}); one of them may be a change of this record, so it is not rebuilt without them",
        .0.len(), .0[0].0, .0[0].1
    )]
    LogDamaged(Vec<(String, u64)>),
    #[error("the change logs hold no change of this record")]
    NoChanges,
    #[error("the record's changes do not make a document: {0}")]
    Record(#[from] RecordError),
    #[error("storing the rebuilt record failed: {0}")]
    Commit(#[from] WriteError),
    #[error("the repair task failed: {0}")]
    Task(String),
}

impl Engine {
    /// Counts and logs a corrupt record found by a read, a write or a received change, and
    /// starts its repair.
    pub(super) fn corrupt_record_found(&self, key: &str, why: &str) {
        self.metrics.corrupt_records_total.inc();
        tracing::error!(
            key,
            why,
            "stored record is corrupt; rebuilding it from the change logs"
        );
        self.start_repair(key);
    }

    fn start_repair(&self, key: &str) {
        let (Some(engine), Ok(runtime)) = (
            self.self_ref.upgrade(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        {
            let mut under_way = lock(&self.repairs);
            if under_way.len() >= MAX_REPAIRS_AT_ONCE || !under_way.insert(key.to_owned()) {
                return;
            }
        }
        let key = key.to_owned();
        runtime.spawn(async move {
            let outcome = engine.repair_record(&key).await;
            lock(&engine.repairs).remove(&key);
            let reason = match &outcome {
                Ok(RepairOutcome::Rebuilt { changes }) => {
                    tracing::warn!(key, changes, "corrupt record rebuilt from the change logs");
                    "rebuilt"
                }
                Ok(RepairOutcome::Intact) => "intact",
                Err(e) => {
                    tracing::error!(key, error = %e, "corrupt record not repaired");
                    "failed"
                }
            };
            engine
                .metrics
                .record_repairs_total
                .get_or_create(&Reason { reason })
                .inc();
        });
    }

    /// Rebuilds `key`'s record from the change logs and stores it, holding the key's lock so
    /// that no write or received change edits the record meanwhile.
    pub async fn repair_record(&self, key: &str) -> Result<RepairOutcome, RepairError> {
        let slot = self.slot(key);
        let mut guard = slot.lock().await;
        match self.store.record(key) {
            Ok(_) => return Ok(RepairOutcome::Intact),
            Err(StoreError::CorruptRecord { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // A cached document was loaded before the damage; rebuilding from the logs gives the
        // same document, and one path is simpler to trust than two.
        guard.cached = None;
        let store = self.store.clone();
        let owned_key = key.to_owned();
        let found = tokio::task::spawn_blocking(move || store.changes_of_key(&owned_key))
            .await
            .map_err(|e| RepairError::Task(e.to_string()))??;
        if !found.unreadable.is_empty() {
            return Err(RepairError::LogDamaged(found.unreadable));
        }
        if found.changes.is_empty() {
            return Err(RepairError::NoChanges);
        }
        let changes: Vec<Vec<u8>> = found.changes.into_iter().map(|c| c.change).collect();
        let mut doc = RecordDoc::new(self.actor.clone())?;
        doc.apply_tracked(&changes)?;
        let view = doc.view()?;
        let view_json = match &view {
            Some(v) => serde_json::to_vec(v).map_err(|e| WriteError::Storage(e.to_string()))?,
            None => Vec::new(),
        };
        let record = StoredRecord {
            live: view.is_some(),
            version: doc.max_version(),
            home_region: self.home_region(key),
            view_json,
            doc: doc.save(),
            appended_changes: 0,
        };
        let item = WriteItem {
            key: key.to_owned(),
            record: Some(record),
            log: Vec::new(),
            idempotency: None,
            pending_put: Vec::new(),
            pending_remove: Vec::new(),
        };
        self.commit(vec![item], Vec::new()).await?;
        Ok(RepairOutcome::Rebuilt {
            changes: changes.len(),
        })
    }
}
