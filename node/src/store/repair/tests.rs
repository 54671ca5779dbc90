use redb::ReadableTable;

use crate::store::tests::record;
use crate::store::{CHANGES, Listed, RECORDS, Store, StoreError, WriteItem};

/// XORs one byte in the middle of `bytes`, as a flipped bit on disk would.
fn flipped(bytes: &[u8]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    bytes
}

fn damage_record(store: &Store, key: &str) {
    let txn = store.db().unwrap().begin_write().expect("write");
    {
        let mut t = txn.open_table(RECORDS).expect("table");
        let bytes = flipped(t.get(key).expect("get").expect("present").value());
        t.insert(key, bytes.as_slice()).expect("insert");
    }
    txn.commit().expect("commit");
}

fn damage_log_entry(store: &Store, origin: &str, hlc: u64) {
    let txn = store.db().unwrap().begin_write().expect("write");
    {
        let mut t = txn.open_table(CHANGES).expect("table");
        let bytes = flipped(t.get((origin, hlc)).expect("get").expect("present").value());
        t.insert((origin, hlc), bytes.as_slice()).expect("insert");
    }
    txn.commit().expect("commit");
}

#[test]
fn a_corrupt_record_fails_its_own_read_and_is_listed_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "n1").unwrap();
    let items: Vec<_> = (1..=3)
        .map(|i| WriteItem::local(format!("k/{i}"), record(i), "n1", i, vec![i as u8], None))
        .collect();
    store.commit_batch(&items, &[]).unwrap();
    damage_record(&store, "k/2");

    match store.record("k/2") {
        Err(StoreError::CorruptRecord { key, why }) => {
            assert_eq!(key, "k/2");
            assert!(why.contains("checksum mismatch"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.record("k/1").unwrap(), Some(record(1)));
    let page = store.list("k/", None, 10).unwrap();
    let keys: Vec<_> = page.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["k/1", "k/2", "k/3"]);
    assert!(matches!(page[1].1, Listed::Corrupt(_)), "{page:?}");
    assert_eq!(page[2].1, Listed::Record(record(3)));

    // The change log still holds k/2's change; a damaged entry is reported, not skipped.
    let found = store.changes_of_key("k/2").unwrap();
    assert_eq!(found.changes.len(), 1);
    assert_eq!(found.changes[0].change, vec![2]);
    assert!(found.unreadable.is_empty());
    damage_log_entry(&store, "n1", 3);
    let found = store.changes_of_key("k/2").unwrap();
    assert_eq!(found.unreadable, vec![("n1".to_string(), 3)]);
}
