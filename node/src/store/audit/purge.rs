//! The purge: deleting what a scan reports, in bounded durable transactions.

use std::ops::Bound;

use meridian_residency::{Policy, Rule};
use redb::{Database, Durability, ReadableTable};

use super::{Kind, PURGE_BATCH, PurgeReport, Tally, any_rule_excludes, disallowing, log_entry_key};
use crate::store::{CHANGES, FRONTIER, PENDING, RECORDS, Store, StoreError, corrupt, dberr};

/// Deletes every row [`scan`](super::scan) reports, in durable transactions of at most [`PURGE_BATCH`]
/// rows, and the replication frontier entries of residency classes this region may not hold.
///
/// Run it while nothing else writes to the store (at start, before the engine runs).
pub fn purge(store: &Store, policy: &Policy, region: &str) -> Result<PurgeReport, StoreError> {
    let db = store.db()?;
    purge_db(&db, store.node_id(), policy, region, PURGE_BATCH)
}

pub(super) fn purge_db(
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

pub(super) fn durable_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(dberr)?;
    txn.set_durability(Durability::Immediate).map_err(dberr)?;
    Ok(txn)
}

/// Each pass opens a write transaction, collects up to `batch` doomed rows after the cursor,
/// deletes them, commits, and counts them once committed. Returns the transactions committed.
pub(super) fn purge_records(
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

pub(super) fn purge_log(
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

pub(super) fn purge_pending(
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
pub(super) fn purge_frontier(
    db: &Database,
    policy: &Policy,
    region: &str,
) -> Result<(u64, u64), StoreError> {
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
