//! A local write: the Idempotency-Key pre-check, the key's lock, the HLC stamp, the automerge
//! change (or a first write without a document), the stored record, the group commit.

use std::time::Instant;

use meridian_replication::record::first_write;
use meridian_replication::{RecordDoc, RecordView, Version};
use meridian_residency::Foreign;
use serde_json::json;

use super::{
    COMPACT_AFTER_CHANGES, CachedDoc, Engine, Idempotency, WriteAnswer, WriteError, WriteOp,
};
use crate::clock::unix_ms;
use crate::observe::metrics::{OpLabels, OpOnly};
use crate::store::{IdempotentAnswer, ItemOutcome, StoreError, StoredRecord, WriteItem};

impl Engine {
    pub async fn write(
        &self,
        key: &str,
        op: WriteOp,
        idempotency: Option<Idempotency>,
    ) -> Result<WriteAnswer, WriteError> {
        let started = Instant::now();
        let op_name = op.name();
        let result = self.write_inner(key, op, idempotency).await;
        let outcome = match &result {
            Ok(a) if a.replayed => "replayed",
            Ok(_) => "ok",
            Err(WriteError::Record(_)) | Err(WriteError::IdempotencyKeyReused(_)) => "refused",
            Err(WriteError::Misdirected(_) | WriteError::NoAllowedRegionReachable(_)) => {
                "misdirected"
            }
            Err(_) => "error",
        };
        self.metrics
            .writes_total
            .get_or_create(&OpLabels {
                op: op_name,
                outcome,
            })
            .inc();
        self.metrics
            .write_duration_seconds
            .get_or_create(&OpOnly { op: op_name })
            .observe(started.elapsed().as_secs_f64());
        result
    }

    pub(super) async fn write_inner(
        &self,
        key: &str,
        op: WriteOp,
        idempotency: Option<Idempotency>,
    ) -> Result<WriteAnswer, WriteError> {
        if let Err((foreign, pinned)) = self.admit(key) {
            return Err(match foreign {
                Foreign::Reject => WriteError::Misdirected(pinned),
                Foreign::Forward => WriteError::NoAllowedRegionReachable(pinned),
            });
        }
        if let Some(idem) = &idempotency
            && let Some(first) = self
                .store
                .idempotent_answer(&idem.key)
                .map_err(|e| WriteError::Storage(e.to_string()))?
        {
            return replay_or_refuse(first, idem);
        }

        let slot = self.slot(key);
        let mut guard = slot.lock().await;
        let loaded = match guard.cached.take() {
            Some(c) => Some(c),
            None => self.load_stored(key)?,
        };
        let (stamp, _stamp_guard) = self.stamp();
        // `None` after a first write: the record's document is made from its stored change
        // when it is next edited (see `first_write`).
        let (record, change, mut cached) = match (loaded, &op) {
            (None, WriteOp::Put(v)) => {
                let (change, view) = first_write::encode(&self.actor, v, stamp)?;
                (self.first_record(key, &view, &change)?, change, None)
            }
            (None, WriteOp::Patch(p)) => {
                let (change, view) = first_write::encode_patch(&self.actor, p, stamp)?;
                (self.first_record(key, &view, &change)?, change, None)
            }
            (loaded, op) => {
                let mut cached = match loaded {
                    Some(c) => c,
                    None => self.blank_doc(key)?,
                };
                let change = match op {
                    WriteOp::Put(v) => cached.doc.put(v, stamp),
                    WriteOp::Patch(p) => cached.doc.patch(p, stamp),
                    WriteOp::Incr { field, by } => cached.doc.incr(field, *by, stamp),
                    WriteOp::Delete => cached.doc.delete(stamp),
                };
                let change = match change {
                    Ok(c) => c,
                    Err(e) => {
                        // RecordDoc rolled the failed edit back: the document still equals
                        // the disk.
                        guard.cached = Some(cached);
                        return Err(e.into());
                    }
                };
                let view = cached.doc.view()?;
                let record = self.next_record(&mut cached, view.as_ref(), &change)?;
                (record, change, Some(cached))
            }
        };
        let home_region = record.home_region.clone();
        let body = serde_json::to_vec(&json!({
            "key": key,
            "version": record.version.to_string(),
            "home_region": home_region,
            "region": self.region,
        }))
        .map_err(|e| WriteError::Storage(e.to_string()))?;
        let item = WriteItem::local(
            key.to_string(),
            record.clone(),
            &self.node_id,
            change.version.time_ntp64,
            change.bytes,
            idempotency.as_ref().map(|i| {
                (
                    i.key.clone(),
                    IdempotentAnswer {
                        fingerprint: i.fingerprint,
                        created_unix_ms: unix_ms(),
                        status: 200,
                        body: body.clone(),
                    },
                )
            }),
        );
        let outcome = self
            .commit(vec![item], Vec::new())
            .await
            .map(|mut o| o.pop().unwrap_or(ItemOutcome::KeyReused));
        match outcome {
            Ok(ItemOutcome::Applied) => {
                if let Some(c) = cached.as_mut() {
                    c.stored = record;
                }
                guard.cached = cached;
                Ok(WriteAnswer {
                    status: 200,
                    body,
                    replayed: false,
                })
            }
            // Not applied: the cached document holds an edit that is not on disk; drop it.
            Ok(ItemOutcome::Replayed(first)) => match &idempotency {
                Some(idem) => replay_or_refuse(first, idem),
                None => Err(WriteError::Storage("unexpected idempotent replay".into())),
            },
            Ok(ItemOutcome::KeyReused) => Err(WriteError::IdempotencyKeyReused(
                idempotency.map(|i| i.key).unwrap_or_default(),
            )),
            Err(e) => Err(e),
        }
    }

    /// The stored record and its document; `None` when the record does not exist here.
    pub(super) fn load_stored(&self, key: &str) -> Result<Option<CachedDoc>, WriteError> {
        let stored = match self.store.record(key) {
            Ok(stored) => stored,
            Err(StoreError::CorruptRecord { key, why }) => {
                self.corrupt_record_found(&key, &why);
                return Err(WriteError::CorruptRecord { key, why });
            }
            Err(e) => return Err(WriteError::Storage(e.to_string())),
        };
        match stored {
            Some(stored) => {
                let doc = RecordDoc::load(&stored.doc, self.actor.clone())?;
                Ok(Some(CachedDoc { doc, stored }))
            }
            None => Ok(None),
        }
    }

    /// A document for a record that does not exist here yet.
    pub(super) fn blank_doc(&self, key: &str) -> Result<CachedDoc, WriteError> {
        Ok(CachedDoc {
            doc: RecordDoc::new(self.actor.clone())?,
            stored: StoredRecord {
                live: false,
                version: Version::ZERO,
                home_region: self.home_region(key),
                view_json: Vec::new(),
                doc: Vec::new(),
                appended_changes: 0,
            },
        })
    }

    /// The record made by a first write: its document is the change's bytes.
    pub(super) fn first_record(
        &self,
        key: &str,
        view: &RecordView,
        change: &meridian_replication::LocalChange,
    ) -> Result<StoredRecord, WriteError> {
        Ok(StoredRecord {
            live: true,
            version: change.version,
            home_region: self.home_region(key),
            view_json: serde_json::to_vec(view).map_err(|e| WriteError::Storage(e.to_string()))?,
            doc: change.bytes.clone(),
            appended_changes: 1,
        })
    }

    /// The record to store after `change`: the previous bytes with the change appended, or a
    /// fresh save every [`COMPACT_AFTER_CHANGES`] changes (saving is the costly part).
    pub(super) fn next_record(
        &self,
        cached: &mut CachedDoc,
        view: Option<&RecordView>,
        change: &meridian_replication::LocalChange,
    ) -> Result<StoredRecord, WriteError> {
        let prev = &cached.stored;
        let (doc, appended_changes) = if prev.doc.is_empty() {
            // A document of one change is that change's bytes: no save needed.
            (change.bytes.clone(), 1)
        } else if prev.appended_changes >= COMPACT_AFTER_CHANGES {
            (cached.doc.save(), 0)
        } else {
            let mut bytes = Vec::with_capacity(prev.doc.len() + change.bytes.len());
            bytes.extend_from_slice(&prev.doc);
            bytes.extend_from_slice(&change.bytes);
            (bytes, prev.appended_changes + 1)
        };
        let view_json = match view {
            Some(v) => serde_json::to_vec(v).map_err(|e| WriteError::Storage(e.to_string()))?,
            None => Vec::new(),
        };
        Ok(StoredRecord {
            live: view.is_some(),
            version: prev.version.max(change.version),
            home_region: prev.home_region.clone(),
            view_json,
            doc,
            appended_changes,
        })
    }
}

pub(super) fn replay_or_refuse(
    first: IdempotentAnswer,
    idem: &Idempotency,
) -> Result<WriteAnswer, WriteError> {
    if first.fingerprint == idem.fingerprint {
        Ok(WriteAnswer {
            status: first.status,
            body: first.body,
            replayed: true,
        })
    } else {
        Err(WriteError::IdempotencyKeyReused(idem.key.clone()))
    }
}
