//! Residency audits: what a data directory holds that the residency policy does not allow in
//! its node's region, and removing it.
//!
//! * [`scan`] lists every record, change-log entry and kept-aside (pending) change whose key
//!   the node's region may not hold, with counts per rule. Memory is bounded: at most
//!   [`MAX_LISTED`] violations are kept as examples, all are counted.
//! * [`purge`] deletes exactly those rows, in durable transactions of at most
//!   [`PURGE_BATCH`] rows each.
//! * [`audit_dir`] is the offline entry point of `meridian residency audit`: it opens the
//!   database read-only (refused while a node runs on it), finds the node's region in the
//!   topology, and scans.
//! * [`check_at_start`] is what `meridian serve` runs right after opening its store: a node
//!   refuses to start over data its region may not hold, unless told to purge it
//!   (`--purge-disallowed`).
//!
//! A row is judged by its record key alone, with [`Policy::may_hold`]: a key that no rule pins
//! is global and never a violation.

use std::fmt;
use std::path::{Path, PathBuf};

use meridian_replication::codec::Reader;
use meridian_residency::{Placement, Policy, Rule};
use redb::{ReadOnlyDatabase, ReadTransaction, ReadableDatabase, TableDefinition, TableError};
use serde::Serialize;

use crate::config::Topology;
use crate::store::{DB_FILE, META, Store, StoreError, corrupt, dberr};

/// Most violations an [`AuditReport`] lists; beyond it they are only counted.
pub const MAX_LISTED: usize = 10_000;
/// Most rows one purge transaction deletes.
pub const PURGE_BATCH: usize = 10_000;

/// The `meta` entry naming the node that owns a data directory.
const META_NODE_ID: &str = "node_id";

/// What kind of row holds a key the region may not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ViolationKind {
    /// A stored record (a tombstone when `deleted`).
    Record { deleted: bool },
    /// An entry of `origin`'s change log, stamped `hlc` (NTP64 time).
    LogEntry {
        origin: String,
        #[serde(serialize_with = "hex16")]
        hlc: u64,
    },
    /// A received change kept aside (waiting for dependencies, held for drift, quarantined).
    Pending {
        origin: String,
        #[serde(serialize_with = "hex16")]
        hlc: u64,
    },
}

/// HLC times in JSON as 16 hex digits, the time part of a version string: as a number they
/// exceed what JSON readers that use doubles can hold exactly.
fn hex16<S: serde::Serializer>(hlc: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{hlc:016x}"))
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ViolationKind::Record { deleted: false } => f.write_str("record"),
            ViolationKind::Record { deleted: true } => f.write_str("record (deleted)"),
            ViolationKind::LogEntry { origin, hlc } => {
                write!(f, "log entry {origin}@{hlc:016x}")
            }
            ViolationKind::Pending { origin, hlc } => {
                write!(f, "kept-aside change {origin}@{hlc:016x}")
            }
        }
    }
}

/// One row holding a key that this region may not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub key: String,
    /// The key's home region under the policy.
    pub home_region: Option<String>,
    /// The rule that pins the key.
    pub rule: Option<String>,
    #[serde(flatten)]
    pub what: ViolationKind,
}

/// Rows counted by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindCounts {
    pub records: u64,
    pub log_entries: u64,
    pub pending: u64,
}

impl KindCounts {
    pub fn total(&self) -> u64 {
        self.records + self.log_entries + self.pending
    }

    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Record => self.records += 1,
            Kind::LogEntry => self.log_entries += 1,
            Kind::Pending => self.pending += 1,
        }
    }

    fn plus(self, other: KindCounts) -> KindCounts {
        KindCounts {
            records: self.records + other.records,
            log_entries: self.log_entries + other.log_entries,
            pending: self.pending + other.pending,
        }
    }
}

/// `1 record, 2 log entries, 0 kept-aside changes`.
impl fmt::Display for KindCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural =
            |n: u64, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        write!(
            f,
            "{} {}, {} {}, {} {}",
            self.records,
            plural(self.records, "record", "records"),
            self.log_entries,
            plural(self.log_entries, "log entry", "log entries"),
            self.pending,
            plural(self.pending, "kept-aside change", "kept-aside changes"),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Record,
    LogEntry,
    Pending,
}

/// Counts for one rule that does not allow the region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleCounts {
    /// The rule's name.
    pub rule: String,
    /// Its glob.
    pub keys: String,
    /// Its home region.
    pub home: String,
    /// The other regions it allows.
    pub replicas: Vec<String>,
    #[serde(flatten)]
    pub counts: KindCounts,
}

impl fmt::Display for RuleCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule {:?} (keys {:?}, home {}",
            self.rule, self.keys, self.home
        )?;
        if !self.replicas.is_empty() {
            write!(f, ", replicas {}", self.replicas.join(", "))?;
        }
        write!(f, "): {}", self.counts)
    }
}

/// What [`scan`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// The node that owns the data directory.
    pub node: String,
    /// Its region, whose allowance the rows were checked against.
    pub region: String,
    /// Rows examined, by kind.
    pub scanned: KindCounts,
    /// Every rule that does not allow this region, in policy order, with its violations
    /// (zero counts included: they are the proof that nothing of the rule is here).
    pub rules: Vec<RuleCounts>,
    /// All violations, counted.
    pub total: KindCounts,
    /// The first [`MAX_LISTED`] violations, in table order (records, log, kept-aside).
    pub violations: Vec<Violation>,
    /// True when `violations` lists fewer than `total` counts.
    pub truncated: bool,
}

impl AuditReport {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.total.total() == 0
    }
}

/// What [`purge`] removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    pub node: String,
    pub region: String,
    /// Every rule that does not allow this region, in policy order, with the rows removed.
    pub rules: Vec<RuleCounts>,
    /// All rows removed.
    pub total: KindCounts,
    /// Replication frontier entries removed for residency classes this region may not hold
    /// (so that, should the policy allow them again, they are fetched afresh).
    pub frontier_entries: u64,
    /// Durable transactions committed.
    pub transactions: u64,
}

impl fmt::Display for PurgeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total.total() == 0 {
            return write!(
                f,
                "residency purge on node {} (region {}): nothing to remove; no record, log \
                 entry or kept-aside change outside its allowed regions",
                self.node, self.region
            );
        }
        write!(
            f,
            "residency purge on node {} (region {}) removed {} that the residency policy does \
             not allow in {}:",
            self.node, self.region, self.total, self.region
        )?;
        for rule in self.rules.iter().filter(|r| r.counts.total() > 0) {
            write!(f, "\n  {rule}")?;
        }
        write!(
            f,
            "\n  ({} durable transactions, {} replication frontier entries reset)",
            self.transactions, self.frontier_entries
        )
    }
}

/// Why a node refuses to start over its data directory.
#[derive(Debug, thiserror::Error)]
pub enum StartRefused {
    /// The directory holds rows the region may not hold.
    #[error("{}", render_refusal(node, region, data_dir, rules, total))]
    Disallowed {
        node: String,
        region: String,
        data_dir: PathBuf,
        /// Rules with violations, in policy order.
        rules: Vec<RuleCounts>,
        total: KindCounts,
    },
    /// The check itself failed.
    #[error("cannot check the data directory against the residency policy: {0}")]
    Store(#[from] StoreError),
}

fn render_refusal(
    node: &str,
    region: &str,
    data_dir: &Path,
    rules: &[RuleCounts],
    total: &KindCounts,
) -> String {
    let mut out = format!(
        "refusing to start node {node}: its data directory {} holds {total} that the \
         topology's residency rules do not allow in region {region}:",
        data_dir.display()
    );
    for rule in rules {
        out.push_str(&format!("\n  {rule}"));
    }
    out.push_str(&format!(
        "\nTo proceed, either delete them by starting with \
         `meridian serve --topology <file> --node {node} --purge-disallowed`, \
         or fix the topology if a rule is wrong. \
         `meridian residency audit --topology <file> --data-dir {}` lists them.",
        data_dir.display()
    ));
    out
}

/// Why an offline audit could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no data directory at {0}")]
    MissingDir(PathBuf),
    #[error("{0} is not a Meridian data directory: it has no {DB_FILE}")]
    NoDatabase(PathBuf),
    #[error(
        "{0} is in use by a running node (the database is locked); stop the node first, or \
         audit a copy of the directory"
    )]
    InUse(PathBuf),
    #[error(
        "{0} was not shut down cleanly (the node crashed or was killed) and cannot be read \
         without a repair; start the node once and stop it cleanly, then audit again"
    )]
    NeedsRepair(PathBuf),
    #[error("cannot open {path} read-only: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("{0} records no node id: not a Meridian data directory")]
    NoNodeId(PathBuf),
    #[error("data directory {path} belongs to node {stored:?}, not {requested:?}")]
    WrongNode {
        path: PathBuf,
        stored: String,
        requested: String,
    },
    #[error(
        "data directory {path} belongs to node {node:?}, which the topology does not declare \
         (declared nodes: {known})"
    )]
    NodeNotInTopology {
        path: PathBuf,
        node: String,
        known: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AuditError {
    /// Whether the input (directory, node, topology) is wrong, as opposed to a failure while
    /// reading a valid directory.
    pub fn is_invalid_input(&self) -> bool {
        !matches!(self, AuditError::Store(_) | AuditError::Open { .. })
    }
}

/// The rule that keeps `region` from holding `key`, if any.
fn disallowing<'p>(policy: &'p Policy, region: &str, key: &str) -> Option<&'p Rule> {
    match policy.placement(key) {
        Placement::Pinned { rule, .. } if !rule.may_hold(region) => Some(rule),
        _ => None,
    }
}

/// Whether some rule keeps `region` from holding its keys: if none does, nothing can violate.
fn any_rule_excludes(policy: &Policy, region: &str) -> bool {
    policy.rules().iter().any(|r| !r.may_hold(region))
}

/// Per-rule counts, indexed by rule position.
struct Tally<'p> {
    policy: &'p Policy,
    region: &'p str,
    per_rule: Vec<KindCounts>,
}

impl<'p> Tally<'p> {
    fn new(policy: &'p Policy, region: &'p str) -> Self {
        Tally {
            policy,
            region,
            per_rule: vec![KindCounts::default(); policy.rules().len()],
        }
    }

    fn add(&mut self, rule: &Rule, kind: Kind) {
        if let Some(c) = self.per_rule.get_mut(rule.index()) {
            c.add(kind);
        }
    }

    fn total(&self) -> KindCounts {
        self.per_rule
            .iter()
            .fold(KindCounts::default(), |a, b| a.plus(*b))
    }

    /// Every rule that excludes the region, with its counts.
    fn rules(&self) -> Vec<RuleCounts> {
        self.policy
            .rules()
            .iter()
            .filter(|r| !r.may_hold(self.region))
            .map(|r| RuleCounts {
                rule: r.name().to_owned(),
                keys: r.keys().to_owned(),
                home: r.home().to_owned(),
                replicas: r.replicas().to_vec(),
                counts: self.per_rule.get(r.index()).copied().unwrap_or_default(),
            })
            .collect()
    }
}

/// The key of an encoded change-log entry, without copying the change.
fn log_entry_key(bytes: &[u8]) -> Result<&str, String> {
    let mut r = Reader::new(crate::store::codec::log_entry_body(bytes)?);
    let len = usize::from(
        r.u16_be()
            .map_err(|_| "truncated: no key length".to_owned())?,
    );
    let key = r
        .take(len)
        .map_err(|_| format!("truncated: key of {len} bytes announced"))?;
    std::str::from_utf8(key).map_err(|_| "log entry key is not UTF-8".to_owned())
}

/// Opens `table` in a read transaction; a table that was never created reads as absent.
fn open_read<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(dberr(e)),
    }
}

/// The residency check a node runs at start, right after opening its store.
///
/// If the store holds anything `region` may not hold: with `purge` false the start is refused
/// ([`StartRefused::Disallowed`] says which rules and how many rows); with `purge` true the
/// rows are deleted and the report returned for the caller to log. `Ok(None)` when there was
/// nothing to do.
pub fn check_at_start(
    store: &Store,
    policy: &Policy,
    region: &str,
    purge: bool,
) -> Result<Option<PurgeReport>, StartRefused> {
    if !any_rule_excludes(policy, region) {
        return Ok(None);
    }
    // Only counts matter here: no examples are kept.
    let report = scan_db(&*store.db()?, store.node_id(), policy, region, 0)?;
    if report.is_clean() {
        return Ok(None);
    }
    if !purge {
        return Err(StartRefused::Disallowed {
            node: report.node,
            region: report.region,
            data_dir: store
                .path()
                .parent()
                .map_or_else(|| store.path().to_path_buf(), Path::to_path_buf),
            rules: report
                .rules
                .into_iter()
                .filter(|r| r.counts.total() > 0)
                .collect(),
            total: report.total,
        });
    }
    Ok(Some(self::purge(store, policy, region)?))
}

/// [`check_at_start`] for `node_id` of `topology`, logging what a purge removed. This is the
/// call `server::open` makes.
pub fn enforce_at_start(
    store: &Store,
    topology: &Topology,
    node_id: &str,
    purge: bool,
) -> Result<(), StartRefused> {
    let Some(region) = topology.region_of(node_id) else {
        // `open` checks the node first; a node outside the topology holds nothing to check.
        return Ok(());
    };
    if let Some(report) = check_at_start(store, &topology.residency, region, purge)? {
        if report.total.total() > 0 {
            tracing::warn!(
                node = node_id,
                region,
                records = report.total.records,
                log_entries = report.total.log_entries,
                pending = report.total.pending,
                "{report}"
            );
        } else {
            tracing::info!(node = node_id, region, "{report}");
        }
    }
    Ok(())
}

/// The offline audit of `meridian residency audit`: opens `data_dir` read-only (refused while
/// a node runs on it), reads the owning node from the directory, finds its region in
/// `topology` and scans against the topology's policy. With `node_id`, the directory must
/// belong to that node.
pub fn audit_dir(
    data_dir: &Path,
    topology: &Topology,
    node_id: Option<&str>,
) -> Result<AuditReport, AuditError> {
    if !data_dir.is_dir() {
        return Err(AuditError::MissingDir(data_dir.to_path_buf()));
    }
    let path = data_dir.join(DB_FILE);
    if !path.is_file() {
        return Err(AuditError::NoDatabase(data_dir.to_path_buf()));
    }
    let db = ReadOnlyDatabase::open(&path).map_err(|source| match source {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            AuditError::InUse(data_dir.to_path_buf())
        }
        redb::DatabaseError::RepairAborted => AuditError::NeedsRepair(data_dir.to_path_buf()),
        source => AuditError::Open {
            path: path.clone(),
            source,
        },
    })?;
    let stored = {
        let txn = db.begin_read().map_err(dberr)?;
        let meta = open_read(&txn, META)?.ok_or_else(|| AuditError::NoNodeId(path.clone()))?;
        let value = meta
            .get(META_NODE_ID)
            .map_err(dberr)?
            .ok_or_else(|| AuditError::NoNodeId(path.clone()))?;
        std::str::from_utf8(value.value())
            .map_err(|_| corrupt("meta node_id", "not UTF-8"))?
            .to_owned()
    };
    if let Some(requested) = node_id
        && requested != stored
    {
        return Err(AuditError::WrongNode {
            path: data_dir.to_path_buf(),
            stored,
            requested: requested.to_owned(),
        });
    }
    let Some(region) = topology.region_of(&stored) else {
        let known: Vec<&str> = topology.nodes.iter().map(|n| n.id.as_str()).collect();
        return Err(AuditError::NodeNotInTopology {
            path: data_dir.to_path_buf(),
            node: stored,
            known: known.join(", "),
        });
    };
    Ok(scan_db(
        &db,
        &stored,
        &topology.residency,
        region,
        MAX_LISTED,
    )?)
}

mod purge;
mod scan;

pub use purge::purge;
pub use scan::scan;
use scan::scan_db;

#[cfg(test)]
mod tests;
