//! What rebuilding a corrupt record needs from the store: every change of one key that the
//! change logs hold.

use redb::{ReadableDatabase, ReadableTable};

use super::codec::StoredChange;
use super::{CHANGES, Store, StoreError, dberr};

/// One change of a record, as a change log holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyChange {
    pub origin: String,
    pub hlc: u64,
    pub change: Vec<u8>,
}

/// The changes of one key in every origin's log, and the log entries that could not be read
/// (any of them might have been a change of that key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyChanges {
    pub changes: Vec<KeyChange>,
    pub unreadable: Vec<(String, u64)>,
}

impl Store {
    /// Every change of `key` in the change logs. The logs are keyed by (origin, stamp), not by
    /// record, so this reads all of them: it is for repairs, which are rare, never for the
    /// write or read path.
    pub fn changes_of_key(&self, key: &str) -> Result<KeyChanges, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(dberr)?;
        let table = match txn.open_table(CHANGES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(KeyChanges::default()),
            Err(e) => return Err(dberr(e)),
        };
        let mut found = KeyChanges::default();
        for item in table.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            let (origin, hlc) = k.value();
            match StoredChange::decode(v.value()) {
                Ok(entry) if entry.key == key => found.changes.push(KeyChange {
                    origin: origin.to_owned(),
                    hlc,
                    change: entry.change,
                }),
                Ok(_) => {}
                Err(_) => found.unreadable.push((origin.to_owned(), hlc)),
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests;
