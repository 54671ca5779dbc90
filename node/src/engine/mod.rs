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

use std::sync::{Arc, Mutex};

use automerge::ActorId;
use lru::LruCache;
use meridian_replication::{RecordDoc, Version};
use meridian_residency::{Foreign, Placement};
use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::clock::NodeClock;
use crate::config::Topology;
use crate::observe::health::Health;
use crate::observe::metrics::{Metrics, OpLabels};
use crate::store::{ItemOutcome, Listed, Store, StoreError, StoredRecord, WriteItem};
use crate::sync::lock;
use meridian_replication::version::ntp64_from_ms;
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

mod error;
mod remote;
mod repair;
mod stamps;
mod write;
mod writer;

pub use error::{Pinned, ReadError, WriteError};
pub use remote::{ApplyStats, PreparedApply};
pub use repair::{RepairError, RepairOutcome};
use stamps::StampBook;
pub use writer::WriterHandle;
use writer::{Job, run_writer};

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

/// One entry of a listing: a record, or the key of a record whose stored bytes are corrupt
/// (being rebuilt; a read of it answers 500 `corrupt_record` until then).
#[derive(Clone, Debug)]
pub enum ListEntry {
    Record(ReadRecord),
    Corrupt(String),
}

impl ListEntry {
    pub fn key(&self) -> &str {
        match self {
            ListEntry::Record(r) => &r.key,
            ListEntry::Corrupt(key) => key,
        }
    }
}

/// Where a request for a key is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// This node's region may hold the record.
    Local,
    /// Carry it to a node of a region that may hold it.
    Forward(ForwardTo),
    /// Answer 421 naming the home region.
    Reject { home: String, rule: String },
}

/// Why a node is not ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    ShuttingDown,
    /// The database failed or the disk is full (see the storage errors).
    StorageUnavailable,
    /// This node's own certificate expired while it ran: peers refuse new links with it.
    CertificateExpired,
}

impl NotReady {
    /// The `reason` of a `/readyz` 503.
    pub fn code(self) -> &'static str {
        match self {
            NotReady::ShuttingDown => "shutting_down",
            NotReady::StorageUnavailable => "storage_unavailable",
            NotReady::CertificateExpired => "certificate_expired",
        }
    }

    pub fn explanation(self) -> &'static str {
        match self {
            NotReady::ShuttingDown => "the node is shutting down",
            NotReady::StorageUnavailable => "storage has failed or the disk is full",
            NotReady::CertificateExpired => {
                "this node's certificate has expired: peers refuse new replication links; restart it with a valid certificate"
            }
        }
    }
}

/// The regions a request for a record pinned elsewhere may be carried to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardTo {
    pub home: String,
    pub rule: String,
    /// Home first, then the rule's replicas.
    pub regions: Vec<String>,
}

struct CachedDoc {
    doc: RecordDoc,
    stored: StoredRecord,
}

/// One key's lock; holds its document while cached.
#[derive(Default)]
struct Slot {
    cached: Option<CachedDoc>,
}

type SlotHandle = Arc<tokio::sync::Mutex<Slot>>;

pub struct Engine {
    pub node_id: String,
    pub region: String,
    pub topology: Arc<Topology>,
    pub clock: NodeClock,
    pub metrics: Metrics,
    /// Certificate validity and clock offset, for readiness and status.
    pub health: Health,
    pub incarnation: u32,
    store: Arc<Store>,
    actor: ActorId,
    cache: Mutex<LruCache<String, SlotHandle>>,
    cache_capacity: usize,
    writer: mpsc::Sender<Job>,
    stamps: Mutex<StampBook>,
    /// Bumped after every commit, so that senders wake up for new log entries.
    committed: tokio::sync::watch::Sender<u64>,
    /// This engine, for the repair tasks it starts.
    self_ref: std::sync::Weak<Engine>,
    /// Keys whose repair is under way (at most [`repair::MAX_REPAIRS_AT_ONCE`]).
    repairs: Mutex<std::collections::HashSet<String>>,
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
        let engine = Arc::new_cyclic(|self_ref| Engine {
            node_id: node_id.to_string(),
            region,
            topology,
            clock,
            metrics,
            health: Health::default(),
            incarnation,
            store,
            actor: crate::clock::actor_of(node_id, incarnation),
            cache: Mutex::new(LruCache::unbounded()),
            cache_capacity: config.cache_capacity.max(1),
            writer: tx,
            stamps: Mutex::new(StampBook::new(last_own_hlc)),
            committed,
            self_ref: self_ref.clone(),
            repairs: Mutex::new(std::collections::HashSet::new()),
        });
        watch_storage(Arc::downgrade(&engine.store))?;
        Ok((engine, WriterHandle(handle)))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Ready while the writer accepts work, storage has not failed and this node's own
    /// certificate has not expired.
    pub fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the node is not ready (`/readyz`, `/v1/status`); `None` when it is.
    pub fn not_ready_reason(&self) -> Option<NotReady> {
        if self.writer.is_closed() {
            Some(NotReady::ShuttingDown)
        } else if !self.store.accepts_writes() {
            Some(NotReady::StorageUnavailable)
        } else if self.health.certificate_expired() {
            Some(NotReady::CertificateExpired)
        } else {
            None
        }
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
                        Admission::Forward(ForwardTo {
                            home: home.to_string(),
                            rule: rule.name().to_string(),
                            regions,
                        })
                    }
                }
            }
            _ => Admission::Local,
        }
    }

    /// Residency admission: may this node's region hold `key`? If not, how the rule handles
    /// requests from elsewhere, and what pins the record.
    fn admit(&self, key: &str) -> Result<(), (Foreign, Pinned)> {
        match self.topology.residency.placement(key) {
            Placement::Pinned { rule, home } if !rule.may_hold(&self.region) => Err((
                rule.foreign(),
                Pinned {
                    key: key.to_string(),
                    home: home.to_string(),
                    rule: rule.name().to_string(),
                    here: self.region.clone(),
                },
            )),
            _ => Ok(()),
        }
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
            Ok(Err(failed)) if failed.storage_full => Err(WriteError::StorageFull(failed.message)),
            Ok(Err(failed)) => Err(WriteError::Storage(failed.message)),
            Err(_) => Err(WriteError::ShuttingDown),
        }
    }

    /// The lock of `key`, evicting idle documents beyond the cache capacity.
    fn slot(&self, key: &str) -> SlotHandle {
        let mut cache = lock(&self.cache);
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

    /// Changes with each commit (local or replicated).
    pub fn subscribe_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// A remote stamp beyond this is held back: now plus the maximum drift, in NTP64 units.
    pub fn drift_horizon_ntp64(&self) -> u64 {
        let drift_ntp64 = ntp64_from_ms(self.topology.clock.max_drift_ms);
        self.clock.now().time_ntp64.saturating_add(drift_ntp64)
    }

    pub fn read(&self, key: &str) -> Result<Option<ReadRecord>, ReadError> {
        let result = self.read_inner(key);
        let outcome = match &result {
            Ok(Some(_)) => "ok",
            Ok(None) => "not_found",
            Err(ReadError::Misdirected(_) | ReadError::NoAllowedRegionReachable(_)) => {
                "misdirected"
            }
            Err(_) => "error",
        };
        self.metrics
            .reads_total
            .get_or_create(&OpLabels { op: "get", outcome })
            .inc();
        result
    }

    fn read_inner(&self, key: &str) -> Result<Option<ReadRecord>, ReadError> {
        if let Err((foreign, pinned)) = self.admit(key) {
            return Err(match foreign {
                Foreign::Reject => ReadError::Misdirected(pinned),
                Foreign::Forward => ReadError::NoAllowedRegionReachable(pinned),
            });
        }
        match self.store.record(key) {
            Ok(Some(rec)) if rec.live => Ok(Some(to_read_record(key, rec)?)),
            Ok(_) => Ok(None),
            Err(StoreError::CorruptRecord { key, why }) => {
                self.corrupt_record_found(&key, &why);
                Err(ReadError::CorruptRecord { key, why })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records stored here, in key order. Never forwarded.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ListEntry>, ReadError> {
        let mut entries = Vec::new();
        for (key, listed) in self.store.list(prefix, after, limit)? {
            entries.push(match listed {
                Listed::Record(rec) => ListEntry::Record(to_read_record(&key, rec)?),
                Listed::Corrupt(why) => {
                    self.corrupt_record_found(&key, &why);
                    ListEntry::Corrupt(key)
                }
            });
        }
        Ok(entries)
    }
}

/// Brings the store back after a full disk without a restart: about every second, while the
/// store does not take writes, asks it to recover (see `store::space`). Ends with the store.
fn watch_storage(store: std::sync::Weak<Store>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("meridian-storage-watch".into())
        .spawn(move || {
            let mut failures_logged = 0u32;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let Some(store) = store.upgrade() else {
                    return;
                };
                if store.accepts_writes() {
                    failures_logged = 0;
                    continue;
                }
                if let Err(e) = store.try_recover() {
                    // Once a minute at most: the disk stays full for a while.
                    if failures_logged.is_multiple_of(60) {
                        tracing::error!(error = %e, "storage has not recovered yet; retrying every second");
                    }
                    failures_logged = failures_logged.wrapping_add(1);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the storage watcher thread: {e}"))
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

#[cfg(test)]
mod tests;
