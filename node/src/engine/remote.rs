//! The apply of received changes, in two halves so that a link merges its next batch while the
//! previous one commits: `prepare_remote` locks the records and merges (on several cores),
//! `commit_prepared` commits and releases. Kept-aside changes (waiting for dependencies, held
//! for clock drift) are offered again with each record's next changes.
//!
//! Architecture invariant: a prepared batch holds its records' locks until it is committed or
//! dropped, so nothing can edit a record between its merge and its commit.

use std::sync::Arc;

use meridian_replication::Version;
use meridian_replication::protocol::Plan;
use meridian_replication::record::first_write;
use meridian_replication::wire::FrontierEntry;

use super::{COMPACT_AFTER_CHANGES, CachedDoc, Engine, Slot, WriteError};
use crate::store::{PendingChange, PendingReason, StoredRecord, WriteItem};

/// What one received batch did.
#[derive(Clone, Debug, Default)]
pub struct ApplyStats {
    pub applied: usize,
    pub waiting: usize,
    pub held_for_drift: usize,
    pub quarantined: usize,
    /// The greatest version among the changes applied.
    pub newest: Option<Version>,
}

impl ApplyStats {
    pub(super) fn absorb(&mut self, other: ApplyStats) {
        self.applied += other.applied;
        self.waiting += other.waiting;
        self.held_for_drift += other.held_for_drift;
        self.quarantined += other.quarantined;
        self.newest = self.newest.max(other.newest);
    }
}

/// Batches touching at least this many records are merged on several cores.
const PARALLEL_MERGE_MIN_KEYS: usize = 32;

/// Remote changes merged into their records and not yet committed; holds the records' locks.
pub struct PreparedApply {
    items: Vec<WriteItem>,
    held: Vec<(tokio::sync::OwnedMutexGuard<Slot>, Option<CachedDoc>)>,
    stats: ApplyStats,
    frontier: Vec<FrontierEntry>,
}

impl Engine {
    /// Store and apply a planned batch of received changes: documents, log entries, kept-aside
    /// changes and the new frontier in one durable transaction.
    pub async fn apply_remote(self: &Arc<Self>, plan: Plan) -> Result<ApplyStats, WriteError> {
        let prepared = self.prepare_remote(plan).await?;
        self.commit_prepared(prepared).await
    }

    /// The first half of [`Engine::apply_remote`]: lock the records of `plan` and merge its
    /// changes into them, without committing. The locks are held by the returned value until
    /// [`Engine::commit_prepared`] has committed it (or it is dropped, which discards it). A
    /// link prepares its next batch while the previous one commits, so that merging (CPU on
    /// both cores) and committing (the writer thread and the disk) overlap.
    pub async fn prepare_remote(self: &Arc<Self>, plan: Plan) -> Result<PreparedApply, WriteError> {
        let horizon = self.drift_horizon_ntp64();
        let keys = plan.by_key.len();
        // Locks are taken in key order (BTreeMap), so two batches can never deadlock.
        let mut work = Vec::with_capacity(keys);
        for (key, accepted) in plan.by_key {
            let slot = self.slot(&key);
            let guard = slot.lock_owned().await;
            work.push((key, guard, accepted));
        }
        // Merging is CPU work (automerge): spread the records over the cores, each part on a
        // blocking thread so the runtime keeps serving requests meanwhile.
        let parts = if keys >= PARALLEL_MERGE_MIN_KEYS {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 8)
        } else {
            1
        };
        let chunk = keys.div_ceil(parts).max(1);
        let mut chunks = Vec::with_capacity(parts);
        while !work.is_empty() {
            let rest = work.split_off(work.len().min(chunk));
            chunks.push(std::mem::replace(&mut work, rest));
        }
        let mut tasks = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let engine = self.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                engine.merge_chunk(chunk, horizon)
            }));
        }
        let mut stats = ApplyStats::default();
        let mut items = Vec::with_capacity(keys);
        let mut held = Vec::with_capacity(keys);
        let mut failure = None;
        for task in tasks {
            match task.await {
                Ok(Ok((part_items, part_held, part_stats))) => {
                    items.extend(part_items);
                    held.extend(part_held);
                    stats.absorb(part_stats);
                }
                Ok(Err(e)) => failure = Some(e),
                Err(e) => failure = Some(WriteError::Storage(format!("merge task failed: {e}"))),
            }
        }
        if let Some(e) = failure {
            // Nothing is committed; documents of the failed batch were dropped with their guards
            // or are left untouched.
            return Err(e);
        }
        Ok(PreparedApply {
            items,
            held,
            stats,
            frontier: plan.frontier,
        })
    }

    /// The second half of [`Engine::apply_remote`]: commit a prepared batch, then hand its
    /// merged documents to the cache and release its records.
    pub async fn commit_prepared(
        self: &Arc<Self>,
        prepared: PreparedApply,
    ) -> Result<ApplyStats, WriteError> {
        let PreparedApply {
            items,
            held,
            stats,
            frontier,
        } = prepared;
        let outcome = self.commit(items, frontier).await;
        let committed = outcome.is_ok();
        for (mut guard, cached) in held {
            // On failure the documents hold changes that are not on disk: drop them.
            if committed {
                guard.cached = cached;
            }
        }
        outcome?;
        if let Some(newest) = stats.newest {
            // Within the drift by construction: later local stamps exceed what we hold.
            let _ = self.clock.observe(newest);
        }
        Ok(stats)
    }

    /// Load and merge one part of a batch (runs on a blocking thread).
    #[allow(clippy::type_complexity)]
    pub(super) fn merge_chunk(
        &self,
        chunk: Vec<(
            String,
            tokio::sync::OwnedMutexGuard<Slot>,
            Vec<meridian_replication::protocol::Accepted>,
        )>,
        horizon: u64,
    ) -> Result<
        (
            Vec<WriteItem>,
            Vec<(tokio::sync::OwnedMutexGuard<Slot>, Option<CachedDoc>)>,
            ApplyStats,
        ),
        WriteError,
    > {
        let mut stats = ApplyStats::default();
        let mut items = Vec::with_capacity(chunk.len());
        let mut held = Vec::with_capacity(chunk.len());
        for (key, mut guard, accepted) in chunk {
            let loaded = match guard.cached.take() {
                Some(c) => Some(c),
                None => self.load_stored(&key)?,
            };
            let stored_pending = self
                .store
                .pending_for(&key)
                .map_err(|e| WriteError::Storage(e.to_string()))?;
            // A record new here whose one change is a plain first write: its view is read from
            // the change, and no document is built until the record is next edited or merged.
            if loaded.is_none()
                && stored_pending.is_empty()
                && let [only] = accepted.as_slice()
                && !only.held_for_drift
                && let Some(first) = first_write::view_of(&only.change)
            {
                let view_json = serde_json::to_vec(&first.view)
                    .map_err(|e| WriteError::Storage(e.to_string()))?;
                stats.applied += 1;
                stats.newest = stats.newest.max(first.version);
                let record = StoredRecord {
                    live: true,
                    version: first.version.unwrap_or(Version::ZERO),
                    home_region: self.home_region(&key),
                    view_json,
                    doc: only.change.clone(),
                    appended_changes: 1,
                };
                let log = accepted
                    .into_iter()
                    .map(|a| (a.origin, a.hlc, a.change))
                    .collect();
                items.push(WriteItem {
                    key,
                    record: Some(record),
                    log,
                    idempotency: None,
                    pending_put: Vec::new(),
                    pending_remove: Vec::new(),
                });
                held.push((guard, None));
                continue;
            }
            let cached = match loaded {
                Some(c) => c,
                None => self.blank_doc(&key)?,
            };
            let (item, cached) =
                self.merge_into(key, cached, accepted, stored_pending, horizon, &mut stats);
            items.push(item);
            held.push((guard, cached));
        }
        Ok((items, held, stats))
    }

    /// Offer a record's received and kept-aside changes to its document; build what to store.
    pub(super) fn merge_into(
        &self,
        key: String,
        mut cached: CachedDoc,
        accepted: Vec<meridian_replication::protocol::Accepted>,
        stored_pending: Vec<PendingChange>,
        horizon: u64,
        stats: &mut ApplyStats,
    ) -> (WriteItem, Option<CachedDoc>) {
        let mut item = WriteItem {
            key: key.clone(),
            record: None,
            log: Vec::new(),
            idempotency: None,
            pending_put: Vec::new(),
            pending_remove: Vec::new(),
        };
        // (origin, hlc, came from the pending table, its stored reason)
        let mut offered: Vec<(String, u64, Option<PendingReason>)> = Vec::new();
        let mut offer: Vec<Vec<u8>> = Vec::new();
        for a in accepted {
            item.log.push((a.origin.clone(), a.hlc, a.change.clone()));
            if a.held_for_drift {
                stats.held_for_drift += 1;
                item.pending_put.push(PendingChange {
                    origin: a.origin,
                    hlc: a.hlc,
                    reason: PendingReason::HeldForDrift,
                    change: a.change,
                });
            } else {
                offered.push((a.origin, a.hlc, None));
                offer.push(a.change);
            }
        }
        for p in stored_pending {
            let due = match p.reason {
                PendingReason::WaitingForDependencies => true,
                PendingReason::HeldForDrift => p.hlc <= horizon,
                PendingReason::Quarantined => false,
            };
            if due {
                offered.push((p.origin, p.hlc, Some(p.reason)));
                offer.push(p.change);
            }
        }
        if offer.is_empty() {
            return (item, Some(cached));
        }
        let result = cached.doc.apply_tracked(&offer);
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                // The document may be inconsistent after a failed apply: quarantine what was
                // offered, drop the document, keep the stream flowing.
                tracing::error!(key = %key, error = %e, changes = offer.len(), "applying received changes failed; they are quarantined");
                for ((origin, hlc, _), change) in offered.into_iter().zip(offer) {
                    stats.quarantined += 1;
                    item.pending_put.push(PendingChange {
                        origin,
                        hlc,
                        reason: PendingReason::Quarantined,
                        change,
                    });
                }
                return (item, None);
            }
        };
        let mut settled = vec![false; offer.len()];
        let mut applied_bytes: Vec<&[u8]> = Vec::new();
        for &i in &r.applied {
            settled[i] = true;
            applied_bytes.push(&offer[i]);
            stats.applied += 1;
        }
        for &i in &r.waiting {
            settled[i] = true;
            let (origin, hlc, from) = &offered[i];
            if *from != Some(PendingReason::WaitingForDependencies) {
                stats.waiting += 1;
                item.pending_put.push(PendingChange {
                    origin: origin.clone(),
                    hlc: *hlc,
                    reason: PendingReason::WaitingForDependencies,
                    change: offer[i].clone(),
                });
            }
        }
        for (i, why) in &r.undecodable {
            settled[*i] = true;
            let (origin, hlc, _) = &offered[*i];
            tracing::error!(key = %key, origin = %origin, hlc, error = %why, "received change cannot be decoded; it is quarantined");
            stats.quarantined += 1;
            item.pending_put.push(PendingChange {
                origin: origin.clone(),
                hlc: *hlc,
                reason: PendingReason::Quarantined,
                change: offer[*i].clone(),
            });
        }
        for (i, (origin, hlc, from)) in offered.iter().enumerate() {
            // Applied now, or already in the document: no longer kept aside.
            let resolved = r.applied.contains(&i) || !settled[i];
            if from.is_some() && resolved {
                item.pending_remove.push((origin.clone(), *hlc));
            }
        }
        if !applied_bytes.is_empty() {
            let view = match cached.doc.view() {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "rendering a merged record failed");
                    return (item, None);
                }
            };
            let prev = &cached.stored;
            let (doc, appended_changes) = if prev.doc.is_empty() && applied_bytes.len() == 1 {
                // A record new here with one change: its document is that change's bytes.
                (applied_bytes[0].to_vec(), 1)
            } else if prev.doc.is_empty()
                || prev.appended_changes as usize + applied_bytes.len()
                    > COMPACT_AFTER_CHANGES as usize
            {
                (cached.doc.save(), 0)
            } else {
                let mut bytes = prev.doc.clone();
                for b in &applied_bytes {
                    bytes.extend_from_slice(b);
                }
                (bytes, prev.appended_changes + applied_bytes.len() as u32)
            };
            let view_json = match view.as_ref().map(serde_json::to_vec).transpose() {
                Ok(v) => v.unwrap_or_default(),
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "encoding a merged view failed");
                    return (item, None);
                }
            };
            let version = r.newest.map_or(prev.version, |v| prev.version.max(v));
            stats.newest = stats.newest.max(r.newest);
            let record = StoredRecord {
                live: view.is_some(),
                version,
                home_region: prev.home_region.clone(),
                view_json,
                doc,
                appended_changes,
            };
            cached.stored = record.clone();
            item.record = Some(record);
        }
        (item, Some(cached))
    }

    /// Apply kept-aside changes whose time has come (held for drift), at most `limit` records.
    pub async fn retry_due_pending(
        self: &Arc<Self>,
        limit: usize,
    ) -> Result<ApplyStats, WriteError> {
        let due = self
            .store
            .pending_summary(self.drift_horizon_ntp64(), limit)
            .map_err(|e| WriteError::Storage(e.to_string()))?
            .due;
        if due.is_empty() {
            return Ok(ApplyStats::default());
        }
        let mut plan = Plan::default();
        for key in due {
            plan.by_key.insert(key, Vec::new());
        }
        self.apply_remote(plan).await
    }
}
