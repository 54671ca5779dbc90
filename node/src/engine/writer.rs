//! The group-commit writer: one thread that takes every waiting write (up to
//! [`MAX_BATCH_WRITES`]) and commits them in one durable transaction.
//!
//! Architecture invariant: a [`Job`] is never split: its items and frontier raises commit
//! together or not at all, and each job's sender gets the outcome of exactly its items.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use meridian_replication::wire::FrontierEntry;

use super::MAX_BATCH_WRITES;
use crate::clock::unix_ms;
use crate::store::{ItemOutcome, Store, StoreError, WriteItem};

/// How often a full disk is logged while it stays full.
const FULL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Items committed together, atomically, with the frontier raises that come with them.
pub(super) struct Job {
    pub(super) items: Vec<WriteItem>,
    pub(super) frontier: Vec<FrontierEntry>,
    pub(super) reply: oneshot::Sender<Result<Vec<ItemOutcome>, CommitFailed>>,
}

/// Why a job's commit failed, as each of its senders learns it.
#[derive(Clone, Debug)]
pub(super) struct CommitFailed {
    pub(super) message: String,
    /// The disk is full: 503 `storage_full` rather than `storage_failed`.
    pub(super) storage_full: bool,
}

/// The writer thread's handle; join it after the engine is dropped.
pub struct WriterHandle(pub(super) std::thread::JoinHandle<()>);

impl WriterHandle {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("group-commit writer thread panicked");
        }
    }
}

/// The group-commit loop: take every waiting write (up to [`MAX_BATCH_WRITES`]), commit them
/// in one durable transaction, answer each. Runs on its own thread because redb is blocking.
pub(super) fn run_writer(
    mut rx: mpsc::Receiver<Job>,
    store: &Store,
    batch_hist: &prometheus_client::metrics::histogram::Histogram,
    commit_hist: &prometheus_client::metrics::histogram::Histogram,
    committed: &tokio::sync::watch::Sender<u64>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH_WRITES);
    let mut last_prune = Instant::now();
    let mut commits = 0u64;
    let mut last_full_logged: Option<Instant> = None;
    let mut refused_quietly = 0usize;
    while let Some(first) = rx.blocking_recv() {
        let mut writes = first.items.len();
        jobs.push(first);
        // A job is never split: its items and frontier commit together.
        while writes < MAX_BATCH_WRITES {
            match rx.try_recv() {
                Ok(job) => {
                    writes += job.items.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut items = Vec::with_capacity(writes);
        let mut frontier = Vec::new();
        let mut shapes = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            shapes.push((job.items.len(), job.reply));
            items.extend(job.items);
            frontier.extend(job.frontier);
        }
        let started = Instant::now();
        let result = store.commit_batch(&items, &frontier);
        commit_hist.observe(started.elapsed().as_secs_f64());
        batch_hist.observe(items.len() as f64);
        match result {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for (n, reply) in shapes {
                    let mine: Vec<ItemOutcome> = outcomes.by_ref().take(n).collect();
                    // A client that went away no longer waits for its answer.
                    let _ = reply.send(Ok(mine));
                }
                commits += 1;
                committed.send_replace(commits);
            }
            Err(e) => {
                let storage_full = matches!(e, StoreError::StorageFull { .. });
                // A full disk refuses every write until it has room: one line per 10 s, with
                // how many were refused meanwhile, instead of one per write.
                let now = Instant::now();
                if !storage_full
                    || last_full_logged.is_none_or(|at| now.duration_since(at) >= FULL_LOG_EVERY)
                {
                    tracing::error!(error = %e, writes = items.len(), refused_since_last_line = refused_quietly, "durable commit failed; the writes are not acknowledged");
                    refused_quietly = 0;
                    if storage_full {
                        last_full_logged = Some(now);
                    }
                } else {
                    refused_quietly += items.len();
                }
                let failed = CommitFailed {
                    message: e.to_string(),
                    storage_full,
                };
                for (_, reply) in shapes {
                    let _ = reply.send(Err(failed.clone()));
                }
            }
        }
        // Idempotency answers are kept for a day; prune a bounded number now and then.
        if last_prune.elapsed().as_secs() >= 60 {
            last_prune = Instant::now();
            let cutoff = unix_ms().saturating_sub(24 * 3600 * 1000);
            if let Err(e) = store.prune_idempotency(cutoff, 10_000) {
                tracing::warn!(error = %e, "pruning idempotency keys failed; will retry");
            }
        }
    }
}
