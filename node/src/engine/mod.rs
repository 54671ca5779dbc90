//! The local write and read path of a node.
//!
//! A write: residency admission → per-key lock → HLC stamp → automerge change on the record's
//! cached document → one [`WriteItem`] to the group-commit writer → answered after the commit
//! that holds it is durable.
//!
//! Architecture invariants:
//! * Writes to one key are serialized by that key's lock, held until the write's commit
//!   returns, so a document in the cache always equals the committed record (a failed commit
//!   drops the cached document instead of keeping an edit that is not on disk).
//! * Reads go to the committed records in redb, never to the cache: a read never shows a write
//!   that has not been made durable.
//! * The queue to the writer is bounded; a full queue makes writers wait (backpressure), it
//!   never grows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use automerge::ActorId;
use lru::LruCache;
use meridian_replication::{RecordDoc, RecordError, RecordView, Version};
use meridian_residency::{Foreign, Placement};
use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::clock::NodeClock;
use crate::config::Topology;
use crate::observe::metrics::{Metrics, OpLabels, OpOnly};
use crate::store::{
    IdempotentAnswer, ItemOutcome, PendingChange, PendingReason, Store, StoreError, StoredRecord,
    WriteItem,
};
use meridian_replication::core::Plan;
use meridian_replication::record::first_write;
use meridian_replication::wire::FrontierEntry;

/// Writes waiting for the writer thread at most.
pub const WRITE_QUEUE_CAPACITY: usize = 4096;
/// Writes in one durable commit at most.
pub const MAX_BATCH_WRITES: usize = 1024;
/// After this many appended changes a record's document is saved whole again.
const COMPACT_AFTER_CHANGES: u32 = 64;

#[derive(Clone, Debug)]
pub enum WriteOp {
    Put(Map<String, Json>),
    Patch(Map<String, Json>),
    Incr { field: String, by: i64 },
    Delete,
}

impl WriteOp {
    pub fn name(&self) -> &'static str {
        match self {
            WriteOp::Put(_) => "put",
            WriteOp::Patch(_) => "patch",
            WriteOp::Incr { .. } => "incr",
            WriteOp::Delete => "delete",
        }
    }
}

/// `Idempotency-Key` of a write and the fingerprint of its request.
#[derive(Clone, Debug)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: [u8; 32],
}

impl Idempotency {
    pub fn new(idem_key: &str, method: &str, record_key: &str, body: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update([0]);
        h.update(record_key.as_bytes());
        h.update([0]);
        h.update(body);
        Idempotency {
            key: idem_key.to_string(),
            fingerprint: h.finalize().into(),
        }
    }
}

/// The answer to a successful write: status and JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    /// True when this is the stored answer of an earlier request with the same key.
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(
        "record {key:?} is pinned to region {home:?} by rule {rule:?} and may not be stored in region {here:?}"
    )]
    Misdirected {
        key: String,
        home: String,
        rule: String,
        here: String,
    },
    #[error(
        "record {key:?} is pinned to region {home:?} by rule {rule:?}; it must be forwarded there, but no node of an allowed region is reachable from region {here:?}"
    )]
    NoAllowedRegionReachable {
        key: String,
        home: String,
        rule: String,
        here: String,
    },
    #[error("Idempotency-Key {0:?} was already used for a different request")]
    IdempotencyKeyReused(String),
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "record {key:?} is pinned to region {home:?} by rule {rule:?} and is not stored in region {here:?}"
    )]
    Misdirected {
        key: String,
        home: String,
        rule: String,
        here: String,
    },
    #[error(
        "record {key:?} is pinned to region {home:?} by rule {rule:?}; no node of an allowed region is reachable to serve it"
    )]
    NoAllowedRegionReachable {
        key: String,
        home: String,
        rule: String,
    },
    #[error("storage failed: {0}")]
    Storage(#[from] StoreError),
    #[error("stored view of {key:?} is not valid JSON: {why}")]
    CorruptView { key: String, why: String },
}

/// A record as a read shows it.
#[derive(Clone, Debug)]
pub struct ReadRecord {
    pub key: String,
    pub version: Version,
    pub home_region: Option<String>,
    pub view: Map<String, Json>,
}

impl ReadRecord {
    pub fn to_json(&self) -> Json {
        let mut out = Map::new();
        out.insert("key".into(), Json::String(self.key.clone()));
        out.insert(
            "value".into(),
            self.view.get("value").cloned().unwrap_or(json!({})),
        );
        out.insert("version".into(), Json::String(self.version.to_string()));
        out.insert(
            "home_region".into(),
            self.home_region.clone().map_or(Json::Null, Json::String),
        );
        if let Some(c) = self.view.get("conflicts") {
            out.insert("conflicts".into(), c.clone());
        }
        Json::Object(out)
    }
}

/// Where a request for a key is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// This node's region may hold the record.
    Local,
    /// Carry it to a node of one of `regions` (home first, then replicas).
    Forward {
        home: String,
        rule: String,
        regions: Vec<String>,
    },
    /// Answer 421 naming the home region.
    Reject { home: String, rule: String },
}

/// One peer as the replication links see it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PeerStatus {
    pub region: String,
    /// We receive the peer's changes (we dialled it).
    pub inbound_connected: bool,
    pub inbound_since_unix_ms: Option<u64>,
    /// We send our changes to the peer (it dialled us).
    pub outbound_connected: bool,
    pub outbound_since_unix_ms: Option<u64>,
    pub changes_applied: u64,
    pub changes_sent: u64,
    /// Origin HLC of the newest change applied from this link vs when it was applied here.
    pub lag_ms: Option<u64>,
    pub last_applied_unix_ms: Option<u64>,
    /// The peer's acknowledged frontier (what it holds of what we may send it), per origin.
    pub peer_frontier: std::collections::BTreeMap<String, String>,
    pub drift_refusals: u64,
    /// Changes of records our region may not hold that this peer sent: it misbehaves.
    pub residency_violations: u64,
    pub last_error: Option<String>,
}

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
    fn absorb(&mut self, other: ApplyStats) {
        self.applied += other.applied;
        self.waiting += other.waiting;
        self.held_for_drift += other.held_for_drift;
        self.quarantined += other.quarantined;
        self.newest = self.newest.max(other.newest);
    }
}

/// Batches touching at least this many records are merged on several cores.
const PARALLEL_MERGE_MIN_KEYS: usize = 32;

struct CachedDoc {
    doc: RecordDoc,
    stored: StoredRecord,
}

/// Remote changes merged into their records and not yet committed; holds the records' locks.
pub struct PreparedApply {
    items: Vec<WriteItem>,
    held: Vec<(tokio::sync::OwnedMutexGuard<Slot>, Option<CachedDoc>)>,
    stats: ApplyStats,
    frontier: Vec<FrontierEntry>,
}

/// One key's lock; holds its document while cached.
#[derive(Default)]
struct Slot {
    cached: Option<CachedDoc>,
}

type SlotHandle = Arc<tokio::sync::Mutex<Slot>>;

/// Items committed together, atomically, with the frontier raises that come with them.
struct Job {
    items: Vec<WriteItem>,
    frontier: Vec<FrontierEntry>,
    reply: oneshot::Sender<Result<Vec<ItemOutcome>, String>>,
}

/// Stamps issued but not yet committed (or failed), and the newest stamp issued: together they
/// give the point up to which this node's own change log is complete.
#[derive(Default)]
struct StampBook {
    in_flight: std::collections::BTreeSet<u64>,
    newest: u64,
}

/// Releases a stamp from the [`StampBook`] when the write that carries it is done.
struct StampGuard<'a> {
    engine: &'a Engine,
    time_ntp64: u64,
}

impl Drop for StampGuard<'_> {
    fn drop(&mut self) {
        let mut book = match self.engine.stamps.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        book.in_flight.remove(&self.time_ntp64);
    }
}

pub struct Engine {
    pub node_id: String,
    pub region: String,
    pub topology: Arc<Topology>,
    pub clock: NodeClock,
    pub metrics: Metrics,
    pub incarnation: u32,
    store: Arc<Store>,
    actor: ActorId,
    cache: Mutex<LruCache<String, SlotHandle>>,
    cache_capacity: usize,
    writer: mpsc::Sender<Job>,
    healthy: AtomicBool,
    stamps: Mutex<StampBook>,
    /// Carries requests for records pinned elsewhere to a node that may hold them; set once the
    /// replication links run.
    pub forwarder: std::sync::OnceLock<Arc<crate::peer::Forwarder>>,
    /// What the replication links report, for `/v1/status`.
    pub peers: Mutex<std::collections::BTreeMap<String, PeerStatus>>,
    /// Bumped after every commit, so that senders wake up for new log entries.
    committed: tokio::sync::watch::Sender<u64>,
}

/// The writer thread's handle; join it after the engine is dropped.
pub struct WriterHandle(std::thread::JoinHandle<()>);

impl WriterHandle {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("group-commit writer thread panicked");
        }
    }
}

pub struct EngineConfig {
    pub cache_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            // A cached document of a small record takes ~14 KB in memory (automerge's op
            // columns and indexes): 2,000 bound the cache to ~30 MB; 10,000 took ~140 MB.
            cache_capacity: 2_000,
        }
    }
}

impl Engine {
    pub fn start(
        topology: Arc<Topology>,
        node_id: &str,
        store: Store,
        clock: NodeClock,
        identity: &crate::store::Identity,
        config: EngineConfig,
    ) -> Result<(Arc<Engine>, WriterHandle), String> {
        let incarnation = identity.incarnation;
        let topology_for_peers = topology.clone();
        let last_own_hlc = identity.last_hlc.time_ntp64;
        let node = topology
            .node(node_id)
            .ok_or_else(|| format!("node {node_id:?} is not in the topology"))?;
        let region = node.region.clone();
        let store = Arc::new(store);
        let metrics = Metrics::new();
        let (tx, rx) = mpsc::channel::<Job>(WRITE_QUEUE_CAPACITY);
        let (committed, _) = tokio::sync::watch::channel(0u64);
        let writer_committed = committed.clone();
        let writer_store = store.clone();
        let batch_hist = metrics.commit_batch_writes.clone();
        let commit_hist = metrics.commit_duration_seconds.clone();
        let span = tracing::info_span!("node", node = %node_id, region = %region);
        let handle = std::thread::Builder::new()
            .name("meridian-writer".into())
            .spawn(move || {
                let _entered = span.enter();
                run_writer(
                    rx,
                    &writer_store,
                    &batch_hist,
                    &commit_hist,
                    &writer_committed,
                );
            })
            .map_err(|e| format!("cannot start the writer thread: {e}"))?;
        let engine = Arc::new(Engine {
            node_id: node_id.to_string(),
            region,
            topology,
            clock,
            metrics,
            incarnation,
            store,
            actor: crate::clock::actor_of(node_id, incarnation),
            cache: Mutex::new(LruCache::unbounded()),
            cache_capacity: config.cache_capacity.max(1),
            writer: tx,
            healthy: AtomicBool::new(true),
            stamps: Mutex::new(StampBook {
                in_flight: Default::default(),
                newest: last_own_hlc,
            }),
            committed,
            forwarder: std::sync::OnceLock::new(),
            peers: Mutex::new(
                topology_for_peers
                    .peers_of(node_id)
                    .map(|n| {
                        (
                            n.id.clone(),
                            PeerStatus {
                                region: n.region.clone(),
                                ..PeerStatus::default()
                            },
                        )
                    })
                    .collect(),
            ),
        });
        Ok((engine, WriterHandle(handle)))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Ready while the writer accepts work and storage has not failed.
    pub fn ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.writer.is_closed()
    }

    fn home_region(&self, key: &str) -> Option<String> {
        self.topology.residency.home_region(key).map(str::to_string)
    }

    /// Residency admission for a client request.
    pub fn admission(&self, key: &str) -> Admission {
        match self.topology.residency.placement(key) {
            Placement::Pinned { rule, home } if !rule.may_hold(&self.region) => {
                match rule.foreign() {
                    Foreign::Reject => Admission::Reject {
                        home: home.to_string(),
                        rule: rule.name().to_string(),
                    },
                    Foreign::Forward => {
                        let mut regions = vec![home.to_string()];
                        regions.extend(rule.replicas().iter().cloned());
                        Admission::Forward {
                            home: home.to_string(),
                            rule: rule.name().to_string(),
                            regions,
                        }
                    }
                }
            }
            _ => Admission::Local,
        }
    }

    /// Residency admission: may this node's region hold `key`?
    fn admit(&self, key: &str) -> Result<(), (Foreign, String, String)> {
        match self.topology.residency.placement(key) {
            Placement::Global => Ok(()),
            Placement::Pinned { rule, home } => {
                if self.topology.residency.may_hold(key, &self.region) {
                    Ok(())
                } else {
                    Err((rule.foreign(), home.to_string(), rule.name().to_string()))
                }
            }
        }
    }

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
            Err(WriteError::Misdirected { .. })
            | Err(WriteError::NoAllowedRegionReachable { .. }) => "misdirected",
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

    async fn write_inner(
        &self,
        key: &str,
        op: WriteOp,
        idempotency: Option<Idempotency>,
    ) -> Result<WriteAnswer, WriteError> {
        if let Err((foreign, home, rule)) = self.admit(key) {
            let (key, here) = (key.to_string(), self.region.clone());
            return Err(match foreign {
                Foreign::Reject => WriteError::Misdirected {
                    key,
                    home,
                    rule,
                    here,
                },
                Foreign::Forward => WriteError::NoAllowedRegionReachable {
                    key,
                    home,
                    rule,
                    here,
                },
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
    fn load_stored(&self, key: &str) -> Result<Option<CachedDoc>, WriteError> {
        let stored = self
            .store
            .record(key)
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        match stored {
            Some(stored) => {
                let doc = RecordDoc::load(&stored.doc, self.actor.clone())?;
                Ok(Some(CachedDoc { doc, stored }))
            }
            None => Ok(None),
        }
    }

    /// A document for a record that does not exist here yet.
    fn blank_doc(&self, key: &str) -> Result<CachedDoc, WriteError> {
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
    fn first_record(
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
    fn next_record(
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

    async fn commit(
        &self,
        items: Vec<WriteItem>,
        frontier: Vec<FrontierEntry>,
    ) -> Result<Vec<ItemOutcome>, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.metrics.write_queue_depth.inc();
        let sent = self
            .writer
            .send(Job {
                items,
                frontier,
                reply,
            })
            .await;
        self.metrics.write_queue_depth.dec();
        sent.map_err(|_| WriteError::ShuttingDown)?;
        match answer.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => {
                self.healthy.store(false, Ordering::Relaxed);
                Err(WriteError::Storage(e))
            }
            Err(_) => Err(WriteError::ShuttingDown),
        }
    }

    /// The lock of `key`, evicting idle documents beyond the cache capacity.
    fn slot(&self, key: &str) -> SlotHandle {
        let mut cache = match self.cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(s) = cache.get(key) {
            return s.clone();
        }
        // Only a slot nobody holds may go: a held slot evicted and re-created would let two
        // writers edit two copies of one document. A few tries keep this bounded.
        let mut tries = 0;
        let mut evicted = Vec::new();
        while cache.len() >= self.cache_capacity && tries < 8 {
            tries += 1;
            let idle = matches!(cache.peek_lru(), Some((_, s)) if Arc::strong_count(s) == 1);
            if idle {
                evicted.extend(cache.pop_lru());
            } else if let Some((k, _)) = cache.peek_lru() {
                let k = k.clone();
                cache.promote(&k);
            }
        }
        let slot: SlotHandle = Arc::default();
        cache.put(key.to_string(), slot.clone());
        self.metrics.cached_documents.set(cache.len() as i64);
        drop(cache);
        // Freeing an automerge document takes tens of microseconds: not under the cache lock,
        // which every request takes.
        drop(evicted);
        slot
    }

    /// Issue a stamp and register it as in flight until the returned guard drops.
    fn stamp(&self) -> (Version, StampGuard<'_>) {
        let mut book = match self.stamps.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        // Under the lock, so that the in-flight set never misses a stamp smaller than one
        // already issued: the safe point below relies on it.
        let stamp = self.clock.stamp();
        book.in_flight.insert(stamp.time_ntp64);
        book.newest = book.newest.max(stamp.time_ntp64);
        (
            stamp,
            StampGuard {
                engine: self,
                time_ntp64: stamp.time_ntp64,
            },
        )
    }

    /// The HLC up to which this node's own change log is complete: no write still in flight
    /// carries a smaller stamp. Senders stream the node's own changes only up to here.
    pub fn safe_own_hlc(&self) -> u64 {
        let book = match self.stamps.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        match book.in_flight.first() {
            Some(oldest) => oldest.saturating_sub(1),
            None => book.newest,
        }
    }

    /// Changes with each commit (local or replicated).
    pub fn subscribe_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// A remote stamp beyond this is held back: now plus the maximum drift, in NTP64 units.
    pub fn drift_horizon_ntp64(&self) -> u64 {
        let max_drift = self.topology.clock.max_drift_ms;
        let drift_ntp64 = ((max_drift as u128) << 32) / 1000;
        self.clock
            .now()
            .time_ntp64
            .saturating_add(drift_ntp64 as u64)
    }

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
    fn merge_chunk(
        &self,
        chunk: Vec<(
            String,
            tokio::sync::OwnedMutexGuard<Slot>,
            Vec<meridian_replication::core::Accepted>,
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
    fn merge_into(
        &self,
        key: String,
        mut cached: CachedDoc,
        accepted: Vec<meridian_replication::core::Accepted>,
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
        let (due, _) = self
            .store
            .pending_summary(self.drift_horizon_ntp64(), limit)
            .map_err(|e| WriteError::Storage(e.to_string()))?;
        if due.is_empty() {
            return Ok(ApplyStats::default());
        }
        let mut plan = Plan::default();
        for key in due {
            plan.by_key.insert(key, Vec::new());
        }
        self.apply_remote(plan).await
    }

    pub fn read(&self, key: &str) -> Result<Option<ReadRecord>, ReadError> {
        let result = self.read_inner(key);
        let outcome = match &result {
            Ok(Some(_)) => "ok",
            Ok(None) => "not_found",
            Err(ReadError::Misdirected { .. })
            | Err(ReadError::NoAllowedRegionReachable { .. }) => "misdirected",
            Err(_) => "error",
        };
        self.metrics
            .reads_total
            .get_or_create(&OpLabels { op: "get", outcome })
            .inc();
        result
    }

    fn read_inner(&self, key: &str) -> Result<Option<ReadRecord>, ReadError> {
        if let Err((foreign, home, rule)) = self.admit(key) {
            return Err(match foreign {
                Foreign::Reject => ReadError::Misdirected {
                    key: key.to_string(),
                    home,
                    rule,
                    here: self.region.clone(),
                },
                Foreign::Forward => ReadError::NoAllowedRegionReachable {
                    key: key.to_string(),
                    home,
                    rule,
                },
            });
        }
        match self.store.record(key)? {
            Some(rec) if rec.live => Ok(Some(to_read_record(key, rec)?)),
            _ => Ok(None),
        }
    }

    /// Records stored here, in key order. Never forwarded.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ReadRecord>, ReadError> {
        self.store
            .list(prefix, after, limit)?
            .into_iter()
            .map(|(k, rec)| to_read_record(&k, rec))
            .collect()
    }
}

fn to_read_record(key: &str, rec: StoredRecord) -> Result<ReadRecord, ReadError> {
    let view: Map<String, Json> =
        serde_json::from_slice(&rec.view_json).map_err(|e| ReadError::CorruptView {
            key: key.to_string(),
            why: e.to_string(),
        })?;
    Ok(ReadRecord {
        key: key.to_string(),
        version: rec.version,
        home_region: rec.home_region,
        view,
    })
}

fn replay_or_refuse(
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

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The group-commit loop: take every waiting write (up to [`MAX_BATCH_WRITES`]), commit them
/// in one durable transaction, answer each. Runs on its own thread because redb is blocking.
fn run_writer(
    mut rx: mpsc::Receiver<Job>,
    store: &Store,
    batch_hist: &prometheus_client::metrics::histogram::Histogram,
    commit_hist: &prometheus_client::metrics::histogram::Histogram,
    committed: &tokio::sync::watch::Sender<u64>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH_WRITES);
    let mut last_prune = Instant::now();
    let mut commits = 0u64;
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
                tracing::error!(error = %e, writes = items.len(), "durable commit failed; the writes are not acknowledged");
                let message = e.to_string();
                for (_, reply) in shapes {
                    let _ = reply.send(Err(message.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_replication::core::Accepted;
    use std::time::Duration;

    const TOPOLOGY: &str = r#"cluster = "engine-test"
[tls]
ca = "certs/ca.pem"
[[regions]]
name = "eu-west"
[[regions]]
name = "us-east"
[[nodes]]
id = "eu-1"
region = "eu-west"
peer = "127.0.0.1:1"
api = "127.0.0.1:2"
[[nodes]]
id = "us-1"
region = "us-east"
peer = "127.0.0.1:3"
api = "127.0.0.1:4"
"#;

    fn plan_of(key: &str, hlc: u64, change: &[u8]) -> Plan {
        let mut plan = Plan::default();
        plan.by_key.insert(
            key.to_string(),
            vec![Accepted {
                origin: "us-1".into(),
                hlc,
                key: key.to_string(),
                change: change.to_vec(),
                held_for_drift: false,
            }],
        );
        plan
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prepared_batch_holds_its_records_until_committed_and_the_next_merges_on_top() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topology = Arc::new(
            Topology::parse(TOPOLOGY, &dir.path().join("topology.toml")).expect("topology"),
        );
        let (engine, writer) = crate::server::open(
            topology,
            "eu-1",
            &dir.path().join("data"),
            crate::server::NodeOptions::default(),
        )
        .expect("engine");
        // Two changes of one record made in us-east, the second on top of the first.
        let now = engine.clock.now().time_ntp64;
        let stamp = |t: u64| Version {
            time_ntp64: t,
            node_hlc_id: 2,
        };
        let mut remote = RecordDoc::new(automerge::ActorId::from(vec![7u8; 16])).expect("doc");
        let value = |v: Json| v.as_object().cloned().expect("an object");
        let first = remote
            .put(&value(json!({"a": 1})), stamp(now - 2))
            .expect("first");
        let second = remote
            .patch(&value(json!({"b": 2})), stamp(now - 1))
            .expect("second");

        let prepared = engine
            .prepare_remote(plan_of("k", now - 2, &first.bytes))
            .await
            .expect("prepare the first");
        // The next batch touches the same record: it waits for the first's commit.
        let next_engine = Arc::clone(&engine);
        let second_bytes = second.bytes.clone();
        let mut next = tokio::spawn(async move {
            next_engine
                .prepare_remote(plan_of("k", now - 1, &second_bytes))
                .await
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut next)
                .await
                .is_err(),
            "the second batch was merged before the first was committed"
        );
        assert!(
            engine.read("k").expect("read").is_none(),
            "visible before its commit"
        );
        let stats = engine.commit_prepared(prepared).await.expect("commit");
        assert_eq!(stats.applied, 1);
        // A record new here with one plain first change: stored as that change, no document.
        let stored = engine.store().record("k").expect("record").expect("stored");
        assert_eq!(stored.doc, first.bytes);
        let next = tokio::time::timeout(Duration::from_secs(30), next)
            .await
            .expect("the second batch is merged once the first is committed")
            .expect("task")
            .expect("prepare the second");
        let stats = engine.commit_prepared(next).await.expect("commit");
        assert_eq!(stats.applied, 1);
        let read = engine.read("k").expect("read").expect("the record");
        assert_eq!(read.view.get("value"), Some(&json!({"a": 1, "b": 2})));
        assert_eq!(read.version, stamp(now - 1));

        // A prepared batch that is dropped is discarded and releases its records.
        let third = RecordDoc::new(automerge::ActorId::from(vec![8u8; 16]))
            .expect("doc")
            .put(&value(json!({"c": 3})), stamp(now))
            .expect("third");
        let dropped = engine
            .prepare_remote(plan_of("j", now, &third.bytes))
            .await
            .expect("prepare");
        drop(dropped);
        assert!(engine.read("j").expect("read").is_none());
        let again = tokio::time::timeout(
            Duration::from_secs(30),
            engine.prepare_remote(plan_of("j", now, &third.bytes)),
        )
        .await
        .expect("the record was released")
        .expect("prepare again");
        engine.commit_prepared(again).await.expect("commit");
        let read = engine.read("j").expect("read").expect("the record");
        assert_eq!(read.view.get("value"), Some(&json!({"c": 3})));

        drop(engine);
        writer.join();
    }
}
