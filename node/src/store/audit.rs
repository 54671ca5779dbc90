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
use std::ops::Bound;
use std::path::{Path, PathBuf};

use meridian_residency::{Placement, Policy, Rule};
use redb::{
    Database, Durability, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError,
};
use serde::Serialize;

use crate::config::Topology;
use crate::store::{
    CHANGES, DB_FILE, FRONTIER, META, PENDING, RECORDS, Store, StoreError, StoredRecord, corrupt,
    dberr,
};

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
    let len_bytes: [u8; 2] = bytes
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "truncated: no key length".to_owned())?;
    let len = usize::from(u16::from_be_bytes(len_bytes));
    let key = bytes
        .get(2..2 + len)
        .ok_or_else(|| format!("truncated: key of {len} bytes announced"))?;
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

/// Every violation in a data directory: see [`scan`].
pub fn scan(store: &Store, policy: &Policy, region: &str) -> Result<AuditReport, StoreError> {
    scan_db(&store.db, store.node_id(), policy, region, MAX_LISTED)
}

fn scan_db(
    db: &impl ReadableDatabase,
    node: &str,
    policy: &Policy,
    region: &str,
    max_listed: usize,
) -> Result<AuditReport, StoreError> {
    let txn = db.begin_read().map_err(dberr)?;
    let mut tally = Tally::new(policy, region);
    let mut scanned = KindCounts::default();
    let mut violations = Vec::new();
    let excluding = any_rule_excludes(policy, region);
    let mut found = |rule: &Rule, key: &str, what: ViolationKind| {
        if violations.len() < max_listed {
            violations.push(Violation {
                key: key.to_owned(),
                home_region: Some(rule.home().to_owned()),
                rule: Some(rule.name().to_owned()),
                what,
            });
        }
    };

    if let Some(table) = open_read(&txn, RECORDS)? {
        if !excluding {
            scanned.records = table.len().map_err(dberr)?;
        } else {
            for item in table.iter().map_err(dberr)? {
                let (k, v) = item.map_err(dberr)?;
                scanned.records += 1;
                let key = k.value();
                if let Some(rule) = disallowing(policy, region, key) {
                    let record = StoredRecord::decode(v.value())
                        .map_err(|why| corrupt(format!("record {key:?}"), why))?;
                    tally.add(rule, Kind::Record);
                    found(
                        rule,
                        key,
                        ViolationKind::Record {
                            deleted: !record.live,
                        },
                    );
                }
            }
        }
    }
    if let Some(table) = open_read(&txn, CHANGES)? {
        if !excluding {
            scanned.log_entries = table.len().map_err(dberr)?;
        } else {
            for item in table.iter().map_err(dberr)? {
                let (k, v) = item.map_err(dberr)?;
                scanned.log_entries += 1;
                let (origin, hlc) = k.value();
                let key = log_entry_key(v.value())
                    .map_err(|why| corrupt(format!("log entry {origin}@{hlc:016x}"), why))?;
                if let Some(rule) = disallowing(policy, region, key) {
                    tally.add(rule, Kind::LogEntry);
                    let origin = origin.to_owned();
                    found(rule, key, ViolationKind::LogEntry { origin, hlc });
                }
            }
        }
    }
    if let Some(table) = open_read(&txn, PENDING)? {
        if !excluding {
            scanned.pending = table.len().map_err(dberr)?;
        } else {
            for item in table.iter().map_err(dberr)? {
                let (k, _) = item.map_err(dberr)?;
                scanned.pending += 1;
                let (key, origin, hlc) = k.value();
                if let Some(rule) = disallowing(policy, region, key) {
                    tally.add(rule, Kind::Pending);
                    let origin = origin.to_owned();
                    found(rule, key, ViolationKind::Pending { origin, hlc });
                }
            }
        }
    }
    let total = tally.total();
    Ok(AuditReport {
        node: node.to_owned(),
        region: region.to_owned(),
        scanned,
        rules: tally.rules(),
        truncated: (violations.len() as u64) < total.total(),
        total,
        violations,
    })
}

/// Deletes every row [`scan`] reports, in durable transactions of at most [`PURGE_BATCH`]
/// rows, and the replication frontier entries of residency classes this region may not hold.
///
/// Run it while nothing else writes to the store (at start, before the engine runs).
pub fn purge(store: &Store, policy: &Policy, region: &str) -> Result<PurgeReport, StoreError> {
    purge_db(&store.db, store.node_id(), policy, region, PURGE_BATCH)
}

fn purge_db(
    db: &Database,
    node: &str,
    policy: &Policy,
    region: &str,
    batch: usize,
) -> Result<PurgeReport, StoreError> {
    let batch = batch.max(1);
    let mut tally = Tally::new(policy, region);
    let mut transactions = 0;
    let mut frontier_entries = 0;
    if any_rule_excludes(policy, region) {
        transactions += purge_records(db, policy, region, batch, &mut tally)?;
        transactions += purge_log(db, policy, region, batch, &mut tally)?;
        transactions += purge_pending(db, policy, region, batch, &mut tally)?;
        let (removed, txns) = purge_frontier(db, policy, region)?;
        frontier_entries = removed;
        transactions += txns;
    }
    Ok(PurgeReport {
        node: node.to_owned(),
        region: region.to_owned(),
        rules: tally.rules(),
        total: tally.total(),
        frontier_entries,
        transactions,
    })
}

fn durable_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(dberr)?;
    txn.set_durability(Durability::Immediate).map_err(dberr)?;
    Ok(txn)
}

/// Each pass opens a write transaction, collects up to `batch` doomed rows after the cursor,
/// deletes them, commits, and counts them once committed. Returns the transactions committed.
fn purge_records(
    db: &Database,
    policy: &Policy,
    region: &str,
    batch: usize,
    tally: &mut Tally<'_>,
) -> Result<u64, StoreError> {
    let mut after: Option<String> = None;
    let mut txns = 0;
    loop {
        let txn = durable_write(db)?;
        let mut doomed: Vec<(String, &Rule)> = Vec::new();
        {
            let mut table = txn.open_table(RECORDS).map_err(dberr)?;
            {
                let lower = match &after {
                    Some(a) => Bound::Excluded(a.as_str()),
                    None => Bound::Unbounded,
                };
                for item in table
                    .range::<&str>((lower, Bound::Unbounded))
                    .map_err(dberr)?
                {
                    let (k, _) = item.map_err(dberr)?;
                    let key = k.value();
                    if let Some(rule) = disallowing(policy, region, key) {
                        doomed.push((key.to_owned(), rule));
                        if doomed.len() >= batch {
                            break;
                        }
                    }
                }
            }
            for (key, _) in &doomed {
                table.remove(key.as_str()).map_err(dberr)?;
            }
        }
        if doomed.is_empty() {
            txn.abort().map_err(dberr)?;
            return Ok(txns);
        }
        txn.commit().map_err(dberr)?;
        txns += 1;
        for (_, rule) in &doomed {
            tally.add(rule, Kind::Record);
        }
        if doomed.len() < batch {
            return Ok(txns);
        }
        after = doomed.pop().map(|(k, _)| k);
    }
}

fn purge_log(
    db: &Database,
    policy: &Policy,
    region: &str,
    batch: usize,
    tally: &mut Tally<'_>,
) -> Result<u64, StoreError> {
    let mut after: Option<(String, u64)> = None;
    let mut txns = 0;
    loop {
        let txn = durable_write(db)?;
        let mut doomed: Vec<(String, u64, &Rule)> = Vec::new();
        {
            let mut table = txn.open_table(CHANGES).map_err(dberr)?;
            {
                let lower = match &after {
                    Some((origin, hlc)) => Bound::Excluded((origin.as_str(), *hlc)),
                    None => Bound::Unbounded,
                };
                for item in table
                    .range::<(&str, u64)>((lower, Bound::Unbounded))
                    .map_err(dberr)?
                {
                    let (k, v) = item.map_err(dberr)?;
                    let (origin, hlc) = k.value();
                    let key = log_entry_key(v.value())
                        .map_err(|why| corrupt(format!("log entry {origin}@{hlc:016x}"), why))?;
                    if let Some(rule) = disallowing(policy, region, key) {
                        doomed.push((origin.to_owned(), hlc, rule));
                        if doomed.len() >= batch {
                            break;
                        }
                    }
                }
            }
            for (origin, hlc, _) in &doomed {
                table.remove((origin.as_str(), *hlc)).map_err(dberr)?;
            }
        }
        if doomed.is_empty() {
            txn.abort().map_err(dberr)?;
            return Ok(txns);
        }
        txn.commit().map_err(dberr)?;
        txns += 1;
        for (_, _, rule) in &doomed {
            tally.add(rule, Kind::LogEntry);
        }
        if doomed.len() < batch {
            return Ok(txns);
        }
        after = doomed.pop().map(|(o, h, _)| (o, h));
    }
}

fn purge_pending(
    db: &Database,
    policy: &Policy,
    region: &str,
    batch: usize,
    tally: &mut Tally<'_>,
) -> Result<u64, StoreError> {
    let mut after: Option<(String, String, u64)> = None;
    let mut txns = 0;
    loop {
        let txn = durable_write(db)?;
        let mut doomed: Vec<(String, String, u64, &Rule)> = Vec::new();
        {
            let mut table = txn.open_table(PENDING).map_err(dberr)?;
            {
                let lower = match &after {
                    Some((key, origin, hlc)) => {
                        Bound::Excluded((key.as_str(), origin.as_str(), *hlc))
                    }
                    None => Bound::Unbounded,
                };
                for item in table
                    .range::<(&str, &str, u64)>((lower, Bound::Unbounded))
                    .map_err(dberr)?
                {
                    let (k, _) = item.map_err(dberr)?;
                    let (key, origin, hlc) = k.value();
                    if let Some(rule) = disallowing(policy, region, key) {
                        doomed.push((key.to_owned(), origin.to_owned(), hlc, rule));
                        if doomed.len() >= batch {
                            break;
                        }
                    }
                }
            }
            for (key, origin, hlc, _) in &doomed {
                table
                    .remove((key.as_str(), origin.as_str(), *hlc))
                    .map_err(dberr)?;
            }
        }
        if doomed.is_empty() {
            txn.abort().map_err(dberr)?;
            return Ok(txns);
        }
        txn.commit().map_err(dberr)?;
        txns += 1;
        for (_, _, _, rule) in &doomed {
            tally.add(rule, Kind::Pending);
        }
        if doomed.len() < batch {
            return Ok(txns);
        }
        after = doomed.pop().map(|(k, o, h, _)| (k, o, h));
    }
}

/// Removes frontier entries of classes (rule names) whose rule excludes `region`: the log no
/// longer holds their changes, so the frontier must not vouch for them. The table holds one
/// row per (origin, class), so one transaction suffices.
fn purge_frontier(db: &Database, policy: &Policy, region: &str) -> Result<(u64, u64), StoreError> {
    let excluded: Vec<&str> = policy
        .rules()
        .iter()
        .filter(|r| !r.may_hold(region))
        .map(Rule::name)
        .collect();
    let txn = durable_write(db)?;
    let mut doomed: Vec<(String, String)> = Vec::new();
    {
        let mut table = txn.open_table(FRONTIER).map_err(dberr)?;
        for item in table.iter().map_err(dberr)? {
            let (k, _) = item.map_err(dberr)?;
            let (origin, class) = k.value();
            if excluded.contains(&class) {
                doomed.push((origin.to_owned(), class.to_owned()));
            }
        }
        for (origin, class) in &doomed {
            table
                .remove((origin.as_str(), class.as_str()))
                .map_err(dberr)?;
        }
    }
    if doomed.is_empty() {
        txn.abort().map_err(dberr)?;
        return Ok((0, 0));
    }
    txn.commit().map_err(dberr)?;
    Ok((doomed.len() as u64, 1))
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
    let report = scan_db(&store.db, store.node_id(), policy, region, 0)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PendingChange, PendingReason, WriteItem};
    use meridian_replication::Version;
    use meridian_replication::wire::FrontierEntry;
    use meridian_residency::{Foreign, RuleSpec};

    fn regions() -> Vec<String> {
        vec!["eu-west".into(), "us-east".into(), "ap-south".into()]
    }

    fn rule(name: &str, keys: &str, home: &str, replicas: &[&str]) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            keys: keys.into(),
            home: home.into(),
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
            foreign: Foreign::Forward,
        }
    }

    fn policy(rules: Vec<RuleSpec>) -> Policy {
        Policy::new(rules, &regions()).expect("valid policy")
    }

    fn pinned() -> Policy {
        policy(vec![
            rule("us-users", "users/us/*", "us-east", &[]),
            rule("eu-users", "users/eu/*", "eu-west", &["ap-south"]),
            rule("ap-only", "ap/*", "ap-south", &[]),
        ])
    }

    fn record(live: bool) -> StoredRecord {
        StoredRecord {
            live,
            version: Version {
                time_ntp64: 1,
                node_hlc_id: 1,
            },
            home_region: None,
            view_json: b"{}".to_vec(),
            doc: vec![1],
            appended_changes: 0,
        }
    }

    /// A store of node `n1` holding `keys` as records with one log entry each (origin `n1`,
    /// HLC 1, 2, ...), plus one kept-aside change of `n2` per key.
    fn store_with(keys: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path(), "n1").expect("open");
        let items: Vec<WriteItem> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let mut item = WriteItem::local(
                    (*key).to_owned(),
                    record(i % 2 == 0),
                    "n1",
                    i as u64 + 1,
                    vec![7],
                    None,
                );
                item.pending_put.push(PendingChange {
                    origin: "n2".into(),
                    hlc: 100 + i as u64,
                    reason: PendingReason::WaitingForDependencies,
                    change: vec![8],
                });
                item
            })
            .collect();
        store.commit_batch(&items, &[]).expect("commit");
        (dir, store)
    }

    fn keys_of(report: &AuditReport, kind: fn(&ViolationKind) -> bool) -> Vec<&str> {
        report
            .violations
            .iter()
            .filter(|v| kind(&v.what))
            .map(|v| v.key.as_str())
            .collect()
    }

    #[test]
    fn scan_lists_records_log_entries_and_pending_changes_outside_the_region() {
        let (_dir, store) = store_with(&["users/us/1", "users/eu/1", "other/1", "ap/x"]);
        let report = scan(&store, &pinned(), "eu-west").expect("scan");
        assert_eq!(report.node, "n1");
        assert_eq!(report.region, "eu-west");
        assert_eq!(
            report.scanned,
            KindCounts {
                records: 4,
                log_entries: 4,
                pending: 4
            }
        );
        let is_record = |k: &ViolationKind| matches!(k, ViolationKind::Record { .. });
        let is_log = |k: &ViolationKind| matches!(k, ViolationKind::LogEntry { .. });
        let is_pending = |k: &ViolationKind| matches!(k, ViolationKind::Pending { .. });
        assert_eq!(keys_of(&report, is_record), ["ap/x", "users/us/1"]);
        assert_eq!(keys_of(&report, is_log), ["users/us/1", "ap/x"]);
        assert_eq!(keys_of(&report, is_pending), ["ap/x", "users/us/1"]);
        let first = &report.violations[0];
        assert_eq!(first.home_region.as_deref(), Some("ap-south"));
        assert_eq!(first.rule.as_deref(), Some("ap-only"));
        assert_eq!(first.what, ViolationKind::Record { deleted: true });
        assert!(report.violations.contains(&Violation {
            key: "users/us/1".into(),
            home_region: Some("us-east".into()),
            rule: Some("us-users".into()),
            what: ViolationKind::LogEntry {
                origin: "n1".into(),
                hlc: 1
            },
        }));
        assert_eq!(
            report.total,
            KindCounts {
                records: 2,
                log_entries: 2,
                pending: 2
            }
        );
        // Rules that exclude eu-west, in policy order, zero counts included.
        let names: Vec<(&str, u64)> = report
            .rules
            .iter()
            .map(|r| (r.rule.as_str(), r.counts.total()))
            .collect();
        assert_eq!(names, [("us-users", 3), ("ap-only", 3)]);
        assert!(!report.truncated);
        assert!(!report.is_clean());

        // ap-south may hold eu-users (replica) and ap-only; users/us/1 is still foreign.
        let ap = scan(&store, &pinned(), "ap-south").expect("scan");
        assert_eq!(ap.total.total(), 3);
        assert!(ap.violations.iter().all(|v| v.key == "users/us/1"));
        // Without rules, nothing is a violation, and the counts come from the tables.
        let global = scan(&store, &Policy::global(), "eu-west").expect("scan");
        assert!(global.is_clean());
        assert!(global.rules.is_empty());
        assert_eq!(global.scanned.records, 4);
    }

    #[test]
    fn listing_is_bounded_but_everything_is_counted() {
        let keys: Vec<String> = (0..30).map(|i| format!("users/us/{i:02}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (_dir, store) = store_with(&refs);
        let report = scan_db(&store.db, "n1", &pinned(), "eu-west", 10).expect("scan");
        assert_eq!(report.violations.len(), 10);
        assert_eq!(report.total.total(), 90);
        assert!(report.truncated);
    }

    #[test]
    fn purge_removes_exactly_the_violations_in_bounded_transactions() {
        let mut keys: Vec<String> = (0..25).map(|i| format!("users/us/{i:02}")).collect();
        keys.extend(["users/eu/1", "other/1", "ap/1"].map(String::from));
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (_dir, store) = store_with(&refs);
        // Frontier entries: the excluded class goes, the others stay.
        let fe = |class: &str| FrontierEntry {
            origin: "n2".into(),
            class: class.into(),
            hlc: 5,
        };
        store
            .commit_batch(&[], &[fe("us-users"), fe(""), fe("eu-users")])
            .expect("frontier");

        let report = purge_db(&store.db, "n1", &pinned(), "eu-west", 7).expect("purge");
        assert_eq!(
            report.total,
            KindCounts {
                records: 26,
                log_entries: 26,
                pending: 26
            }
        );
        let per_rule: Vec<(&str, KindCounts)> = report
            .rules
            .iter()
            .map(|r| (r.rule.as_str(), r.counts))
            .collect();
        assert_eq!(per_rule[0].0, "us-users");
        assert_eq!(per_rule[0].1.records, 25);
        assert_eq!(per_rule[1].0, "ap-only");
        assert_eq!(per_rule[1].1.pending, 1);
        assert_eq!(report.frontier_entries, 1);
        // 26 rows per table in batches of 7: 4 transactions each, plus the frontier.
        assert_eq!(report.transactions, 4 * 3 + 1);
        let text = report.to_string();
        assert!(text.contains("removed 26 records, 26 log entries, 26 kept-aside changes"));
        assert!(text.contains("rule \"us-users\" (keys \"users/us/*\", home us-east)"));

        let after = scan(&store, &pinned(), "eu-west").expect("scan");
        assert!(after.is_clean(), "{after:#?}");
        assert_eq!(
            after.scanned,
            KindCounts {
                records: 2,
                log_entries: 2,
                pending: 2
            }
        );
        assert!(store.record("users/eu/1").expect("read").is_some());
        assert!(store.record("other/1").expect("read").is_some());
        assert!(store.record("users/us/03").expect("read").is_none());
        assert!(store.pending_for("users/us/03").expect("read").is_empty());
        assert_eq!(store.pending_for("other/1").expect("read").len(), 1);
        let frontier = store.frontier().expect("frontier");
        assert_eq!(frontier.get("n2", "us-users"), 0);
        assert_eq!(frontier.get("n2", ""), 5);
        assert_eq!(frontier.get("n2", "eu-users"), 5);
        let log: Vec<String> = store
            .log_after("n1", 0, 100)
            .expect("log")
            .into_iter()
            .map(|(_, e)| e.key)
            .collect();
        assert_eq!(log, ["users/eu/1", "other/1"]);

        // A second purge finds nothing and commits nothing.
        let again = purge(&store, &pinned(), "eu-west").expect("purge");
        assert_eq!(again.total.total(), 0);
        assert_eq!(again.transactions, 0);
        assert!(again.to_string().contains("nothing to remove"));
    }

    #[test]
    fn start_is_refused_naming_rules_and_counts_unless_purging() {
        let (dir, store) = store_with(&["users/us/1", "users/eu/1", "other/1"]);
        let err = check_at_start(&store, &pinned(), "eu-west", false).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("refusing to start node n1"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(
            text.contains(
                "rule \"us-users\" (keys \"users/us/*\", home us-east): 1 record, 1 log entry, \
                 1 kept-aside change"
            ),
            "{text}"
        );
        assert!(
            !text.contains("ap-only"),
            "rules without violations are left out: {text}"
        );
        assert!(text.contains("--purge-disallowed"), "{text}");
        assert!(text.contains("meridian residency audit"), "{text}");
        // Nothing was removed by the refusal.
        assert!(store.record("users/us/1").expect("read").is_some());
        // A region that may hold everything here, and a policy without rules, start.
        let us_only = policy(vec![rule("us-users", "users/us/*", "us-east", &[])]);
        assert!(matches!(
            check_at_start(&store, &us_only, "us-east", false),
            Ok(None)
        ));
        assert!(check_at_start(&store, &pinned(), "us-east", false).is_err());
        assert!(matches!(
            check_at_start(&store, &Policy::global(), "eu-west", false),
            Ok(None)
        ));

        let report = check_at_start(&store, &pinned(), "eu-west", true)
            .expect("purged")
            .expect("a report");
        assert_eq!(report.total.total(), 3);
        assert!(store.record("users/us/1").expect("read").is_none());
        assert!(matches!(
            check_at_start(&store, &pinned(), "eu-west", false),
            Ok(None)
        ));
    }

    fn topology(dir: &Path, rules: &str) -> Topology {
        let text = format!(
            r#"
cluster = "t"
[tls]
ca = "ca.pem"
[[regions]]
name = "eu-west"
[[regions]]
name = "us-east"
[[nodes]]
id = "n1"
region = "eu-west"
peer = "127.0.0.1:7101"
api = "127.0.0.1:8101"
[[nodes]]
id = "n2"
region = "us-east"
peer = "127.0.0.1:7201"
api = "127.0.0.1:8201"
{rules}
"#
        );
        Topology::parse(&text, &dir.join("topology.toml")).expect("valid topology")
    }

    const US_RULE: &str = r#"
[[residency]]
name = "us-users"
keys = "users/us/*"
home = "us-east"
"#;

    #[test]
    fn audit_dir_reads_offline_and_refuses_a_directory_in_use() {
        let (dir, store) = store_with(&["users/us/1", "users/eu/1"]);
        let topo = topology(dir.path(), US_RULE);
        let err = audit_dir(dir.path(), &topo, None).expect_err("in use");
        assert!(matches!(err, AuditError::InUse(_)), "{err}");
        assert!(
            err.to_string().contains("in use by a running node"),
            "{err}"
        );
        drop(store);

        let report = audit_dir(dir.path(), &topo, None).expect("audit");
        assert_eq!(report.node, "n1");
        assert_eq!(report.region, "eu-west");
        assert_eq!(report.total.total(), 3);
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["violations"][0]["kind"], "record");
        assert_eq!(json["violations"][0]["key"], "users/us/1");
        assert_eq!(json["violations"][1]["kind"], "log_entry");
        assert_eq!(json["violations"][1]["origin"], "n1");
        assert_eq!(json["violations"][1]["hlc"], "0000000000000001");
        assert_eq!(json["rules"][0]["rule"], "us-users");
        assert_eq!(json["rules"][0]["records"], 1);

        assert!(audit_dir(dir.path(), &topo, Some("n1")).is_ok());
        let err = audit_dir(dir.path(), &topo, Some("n2")).expect_err("wrong node");
        assert!(
            err.to_string()
                .contains("belongs to node \"n1\", not \"n2\""),
            "{err}"
        );
        assert!(err.is_invalid_input());

        // The same directory under a topology without its node.
        let other = Topology::parse(
            r#"
cluster = "t"
[tls]
ca = "ca.pem"
[[regions]]
name = "eu-west"
[[nodes]]
id = "m1"
region = "eu-west"
peer = "127.0.0.1:7101"
api = "127.0.0.1:8101"
"#,
            &dir.path().join("t.toml"),
        )
        .expect("valid");
        let err = audit_dir(dir.path(), &other, None).expect_err("unknown node");
        assert!(
            err.to_string().contains(
                "belongs to node \"n1\", which the topology does not declare (declared nodes: m1)"
            ),
            "{err}"
        );

        let missing = dir.path().join("nope");
        let err = audit_dir(&missing, &topo, None).expect_err("missing");
        assert!(matches!(err, AuditError::MissingDir(_)));
        let empty = tempfile::tempdir().expect("tempdir");
        let err = audit_dir(empty.path(), &topo, None).expect_err("no db");
        assert!(
            err.to_string().contains("not a Meridian data directory"),
            "{err}"
        );
    }

    #[test]
    fn log_entry_keys_are_read_with_bounds_checks() {
        let entry = crate::store::StoredChange {
            key: "users/é".into(),
            change: vec![1, 2, 3],
        };
        let bytes = entry.encode();
        assert_eq!(log_entry_key(&bytes), Ok("users/é"));
        for cut in 0..2 + "users/é".len() {
            assert!(log_entry_key(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(log_entry_key(&[0, 1, 0xff]).is_err());
    }
}
