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
    scan_db(&*store.db()?, store.node_id(), policy, region, MAX_LISTED)
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
    let mut found = |rule: &Rule, kind: Kind, key: &str, what: ViolationKind| {
        tally.add(rule, kind);
        if violations.len() < max_listed {
            violations.push(Violation {
                key: key.to_owned(),
                home_region: Some(rule.home().to_owned()),
                rule: Some(rule.name().to_owned()),
                what,
            });
        }
    };

    scanned.records = visit_rows(open_read(&txn, RECORDS)?, excluding, |k, v| {
        let key = k.value();
        if let Some(rule) = disallowing(policy, region, key) {
            let record = StoredRecord::decode(v.value())
                .map_err(|why| corrupt(format!("record {key:?}"), why))?;
            let deleted = !record.live;
            found(rule, Kind::Record, key, ViolationKind::Record { deleted });
        }
        Ok(())
    })?;
    scanned.log_entries = visit_rows(open_read(&txn, CHANGES)?, excluding, |k, v| {
        let (origin, hlc) = k.value();
        let key = log_entry_key(v.value())
            .map_err(|why| corrupt(format!("log entry {origin}@{hlc:016x}"), why))?;
        if let Some(rule) = disallowing(policy, region, key) {
            let what = ViolationKind::LogEntry {
                origin: origin.to_owned(),
                hlc,
            };
            found(rule, Kind::LogEntry, key, what);
        }
        Ok(())
    })?;
    scanned.pending = visit_rows(open_read(&txn, PENDING)?, excluding, |k, _| {
        let (key, origin, hlc) = k.value();
        let rule = disallowing(policy, region, key);
        if let Some(rule) = rule {
            let what = ViolationKind::Pending {
                origin: origin.to_owned(),
                hlc,
            };
            found(rule, Kind::Pending, key, what);
        }
        Ok(())
    })?;
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

/// Counts the rows of `table` (none when it does not exist). When some rule excludes this
/// region, `visit` sees every row; otherwise nothing can be a violation and the count comes from
/// the table's metadata without reading a row.
fn visit_rows<K: redb::Key + 'static, V: redb::Value + 'static>(
    table: Option<redb::ReadOnlyTable<K, V>>,
    excluding: bool,
    mut visit: impl FnMut(redb::AccessGuard<'_, K>, redb::AccessGuard<'_, V>) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let Some(table) = table else {
        return Ok(0);
    };
    if !excluding {
        return table.len().map_err(dberr);
    }
    let mut rows = 0;
    for item in table.iter().map_err(dberr)? {
        let (k, v) = item.map_err(dberr)?;
        rows += 1;
        visit(k, v)?;
    }
    Ok(rows)
}
