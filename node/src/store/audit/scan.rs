//! The scan: every row of a data directory whose key its region may not hold.

use meridian_residency::{Policy, Rule};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{
    AuditReport, Kind, KindCounts, MAX_LISTED, Tally, Violation, ViolationKind, any_rule_excludes,
    disallowing, log_entry_key, open_read,
};
use crate::store::{CHANGES, PENDING, RECORDS, Store, StoreError, StoredRecord, corrupt, dberr};

/// Every violation in a data directory: see [`scan`].
pub fn scan(store: &Store, policy: &Policy, region: &str) -> Result<AuditReport, StoreError> {
    scan_db(&store.db, store.node_id(), policy, region, MAX_LISTED)
}

pub(super) fn scan_db(
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
