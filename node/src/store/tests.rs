use super::batch::{decode_batch, encode_batch};
use super::commit_log::{CommitLogError, LOG_FILE, OpenMode};
use super::*;
use std::path::Path;

/// A record whose version and contents follow from `n` (shared by the store's test modules).
pub(super) fn record(n: u64) -> StoredRecord {
    StoredRecord {
        live: true,
        version: Version {
            time_ntp64: n,
            node_hlc_id: 9,
        },
        home_region: Some("eu-west".into()),
        view_json: br#"{"value":{}}"#.to_vec(),
        doc: vec![1, 2, 3],
        appended_changes: 1,
    }
}

fn item(key: &str, n: u64) -> WriteItem {
    WriteItem::local(key.into(), record(n), "n1", n, vec![n as u8], None)
}

/// A store in a fresh directory whose first batch wrote record "a".
fn store_holding_a() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "n1").unwrap();
    store.commit_batch(&[item("a", 1)], &[]).unwrap();
    (dir, store)
}

#[test]
fn record_encoding_round_trips_and_rejects_truncation() {
    let r = record(5);
    let bytes = r.encode();
    assert_eq!(StoredRecord::decode(&bytes), Ok(r));
    for cut in 0..bytes.len() {
        assert!(StoredRecord::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let global = StoredRecord {
        home_region: None,
        ..record(1)
    };
    assert_eq!(StoredRecord::decode(&global.encode()), Ok(global));
}

#[test]
fn a_data_directory_remembers_its_node_and_bumps_the_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let (store, id1) = Store::open(dir.path(), "n1").unwrap();
    store.commit_batch(&[item("a", 42)], &[]).unwrap();
    drop(store);
    let (_store, id2) = Store::open(dir.path(), "n1").unwrap();
    assert_eq!(id2.incarnation, id1.incarnation + 1);
    assert_eq!(id2.last_hlc.time_ntp64, 42);
    drop(_store);
    let err = Store::open(dir.path(), "n2").err().expect("refused");
    assert!(err.to_string().contains("belongs to node \"n1\""), "{err}");
}

#[test]
fn batches_write_records_and_the_change_log_and_list_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "n1").unwrap();
    let items: Vec<_> = (1..=5).map(|i| item(&format!("k/{i}"), i)).collect();
    let outcomes = store.commit_batch(&items, &[]).unwrap();
    assert!(outcomes.iter().all(|o| *o == ItemOutcome::Applied));
    assert_eq!(store.record("k/3").unwrap(), Some(record(3)));
    let page = store.list("k/", Some("k/2"), 2).unwrap();
    let keys: Vec<_> = page.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["k/3", "k/4"]);
    let log = store.log_after("n1", 2, 10).unwrap();
    assert_eq!(log.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(log[0].1.key, "k/3");
    let (node, rows) = {
        drop(store);
        dump(dir.path()).unwrap()
    };
    assert_eq!(node, "n1");
    assert_eq!(rows.len(), 5);
}

#[test]
fn frontier_only_rises_and_pending_changes_are_kept_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "n1").unwrap();
    let fe = |hlc| FrontierEntry {
        origin: "n2".into(),
        class: "".into(),
        hlc,
    };
    let mut remote = WriteItem::local("k".into(), record(1), "n2", 10, vec![1], None);
    remote.pending_put.push(PendingChange {
        origin: "n2".into(),
        hlc: 11,
        reason: PendingReason::HeldForDrift,
        change: vec![9],
    });
    store.commit_batch(&[remote], &[fe(11)]).unwrap();
    store.commit_batch(&[], &[fe(5)]).unwrap();
    assert_eq!(store.frontier().unwrap().get("n2", ""), 11);
    let pending = store.pending_for("k").unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].reason, PendingReason::HeldForDrift);
    let summary = store.pending_summary(11, 10).unwrap();
    assert_eq!(
        summary,
        PendingSummary {
            due: vec!["k".to_string()],
            counts: PendingCounts {
                waiting_for_dependencies: 0,
                held_for_drift: 1,
                quarantined: 0
            }
        }
    );
    assert_eq!(
        store.pending_summary(10, 10).unwrap().due,
        Vec::<String>::new()
    );
    let mut done = WriteItem::local("k".into(), record(2), "n2", 11, vec![9], None);
    done.pending_remove.push(("n2".into(), 11));
    store.commit_batch(&[done], &[]).unwrap();
    assert!(store.pending_for("k").unwrap().is_empty());
    assert_eq!(store.count_after("n2", 0, 100).unwrap(), 2);
}

fn all_parts_item(key: &str, n: u64) -> WriteItem {
    let mut it = item(key, n);
    it.log.push(("n2".into(), n + 1, vec![7; 3]));
    it.idempotency = Some((
        format!("idem-{key}"),
        IdempotentAnswer {
            fingerprint: [n as u8; 32],
            created_unix_ms: 5,
            status: 200,
            body: b"{}".to_vec(),
        },
    ));
    it.pending_put.push(PendingChange {
        origin: "n3".into(),
        hlc: 9,
        reason: PendingReason::WaitingForDependencies,
        change: vec![1, 2],
    });
    it.pending_remove.push(("n3".into(), 8));
    it
}

#[test]
fn batch_encoding_round_trips_and_rejects_truncation() {
    let items = [all_parts_item("a", 1), item("b", 2), {
        let mut none = item("c", 3);
        none.record = None;
        none
    }];
    let frontier = vec![FrontierEntry {
        origin: "n2".into(),
        class: "eu".into(),
        hlc: 4,
    }];
    let bytes = encode_batch(items.iter(), &frontier).unwrap();
    let (back, back_frontier) = decode_batch(&bytes).unwrap();
    assert_eq!(back_frontier, frontier);
    assert_eq!(back.len(), 3);
    for (a, b) in items.iter().zip(&back) {
        assert_eq!(a.key, b.key);
        assert_eq!(a.record, b.record);
        assert_eq!(a.log, b.log);
        assert_eq!(a.idempotency, b.idempotency);
        assert_eq!(a.pending_put, b.pending_put);
        assert_eq!(a.pending_remove, b.pending_remove);
    }
    for cut in 0..bytes.len() {
        assert!(decode_batch(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // A string that does not fit its length field is an error, never truncated.
    let long = WriteItem::local("k".into(), record(1), &"n".repeat(70_000), 1, vec![1], None);
    assert!(encode_batch([long].iter(), &[]).is_err());
    // A count that cannot fit is refused before anything is allocated for it.
    let mut huge = bytes.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(decode_batch(&huge).unwrap_err().contains("cannot fit"));
}

#[test]
fn batches_only_in_the_commit_log_are_committed_again_at_open_and_shown_by_dump() {
    let dir = tempfile::tempdir().unwrap();
    let crash = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "n1").unwrap();
    store.commit_batch(&[item("a", 1)], &[]).unwrap();
    store.checkpoint().unwrap();
    // A crash image: the database file as durably committed at this point ...
    std::fs::copy(dir.path().join(DB_FILE), crash.path().join(DB_FILE)).unwrap();
    let fe = FrontierEntry {
        origin: "n2".into(),
        class: "".into(),
        hlc: 2,
    };
    store.commit_batch(&[item("b", 2)], &[fe]).unwrap();
    store.commit_batch(&[all_parts_item("c", 3)], &[]).unwrap();
    // ... and the commit log as synced after two more acknowledged batches.
    let log_path = dir.path().join(crate::store::commit_log::LOG_FILE);
    assert!(std::fs::metadata(&log_path).unwrap().len() > 0);
    std::fs::copy(
        &log_path,
        crash.path().join(crate::store::commit_log::LOG_FILE),
    )
    .unwrap();
    drop(store);

    // Not shut down cleanly: the offline dump repairs a copy and leaves the directory as it was.
    let image_before = std::fs::read(crash.path().join(DB_FILE)).unwrap();
    let (node, rows) = dump(crash.path()).expect("dump of an unclean directory");
    assert_eq!(node, "n1");
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert_eq!(
        std::fs::read(crash.path().join(DB_FILE)).unwrap(),
        image_before,
        "the dump wrote to the data directory"
    );

    let (store, identity) = Store::open(crash.path(), "n1").unwrap();
    assert_eq!(identity.last_hlc.time_ntp64, 3);
    assert_eq!(store.record("b").unwrap(), Some(record(2)));
    assert_eq!(store.record("c").unwrap(), Some(record(3)));
    let own: Vec<u64> = store
        .log_after("n1", 0, 10)
        .unwrap()
        .iter()
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(own, [1, 2, 3]);
    assert_eq!(store.frontier().unwrap().get("n2", ""), 2);
    assert!(store.idempotent_answer("idem-c").unwrap().is_some());
    assert_eq!(store.pending_for("c").unwrap().len(), 1);
    // The open checkpointed what it replayed: the log holds only the marker of batch 3, and
    // a second open (after another crash image) replays nothing twice.
    let marker_only: Vec<u64> = CommitLog::read(crash.path())
        .unwrap()
        .entries
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(marker_only, [3]);
    store.commit_batch(&[item("d", 4)], &[]).unwrap();
    drop(store);
    let (store, _) = Store::open(crash.path(), "n1").unwrap();
    assert_eq!(store.log_after("n1", 0, 10).unwrap().len(), 4);
}

#[test]
fn dump_shows_and_open_commits_a_batch_that_only_the_log_holds() {
    let (dir, store) = store_holding_a();
    drop(store);
    // A cleanly closed database at batch 1 and a log that also holds batch 2.
    let (mut log, back) = CommitLog::open(dir.path(), 0, OpenMode::Strict).unwrap();
    assert_eq!(back.entries.last().map(|e| e.seq), Some(1));
    log.append(2, &encode_batch([item("z", 2)].iter(), &[]).unwrap())
        .unwrap();
    drop(log);
    let (_, rows) = dump(dir.path()).unwrap();
    let keys: Vec<_> = rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["a", "z"]);
    let (store, identity) = Store::open(dir.path(), "n1").unwrap();
    assert_eq!(identity.last_hlc.time_ntp64, 2);
    assert_eq!(store.record("z").unwrap(), Some(record(2)));
}

#[test]
fn a_log_that_does_not_follow_the_database_is_refused() {
    let (dir, store) = store_holding_a();
    drop(store);
    // Batch 10 in the log, the database durable at batch 1: 2..9 are missing.
    std::fs::write(dir.path().join(LOG_FILE), b"").unwrap();
    let (mut log, _) = CommitLog::open(dir.path(), 1, OpenMode::Strict).unwrap();
    log.append(10, &encode_batch([item("x", 10)].iter(), &[]).unwrap())
        .unwrap();
    drop(log);
    let err = Store::open(dir.path(), "n1").err().expect("refused");
    assert!(matches!(err, StoreError::LogGap { first: 10, .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn idempotency_keys_replay_or_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), "n1").unwrap();
    let answer = |fp: u8| IdempotentAnswer {
        fingerprint: [fp; 32],
        created_unix_ms: 1,
        status: 200,
        body: b"first".to_vec(),
    };
    let mut a = item("a", 1);
    a.idempotency = Some(("idem".into(), answer(1)));
    let mut again = item("a", 2);
    again.idempotency = Some(("idem".into(), answer(1)));
    let mut other = item("b", 3);
    other.idempotency = Some(("idem".into(), answer(2)));
    let outcomes = store.commit_batch(&[a, again, other], &[]).unwrap();
    assert_eq!(outcomes[0], ItemOutcome::Applied);
    assert_eq!(outcomes[1], ItemOutcome::Replayed(answer(1)));
    assert_eq!(outcomes[2], ItemOutcome::KeyReused);
    assert_eq!(store.record("a").unwrap().unwrap().version.time_ntp64, 1);
    assert!(store.record("b").unwrap().is_none());
    // A later batch finds the key in the table.
    let mut later = item("a", 4);
    later.idempotency = Some(("idem".into(), answer(1)));
    let mut later_other = item("c", 5);
    later_other.idempotency = Some(("idem".into(), answer(3)));
    let outcomes = store.commit_batch(&[later, later_other], &[]).unwrap();
    assert_eq!(outcomes[0], ItemOutcome::Replayed(answer(1)));
    assert_eq!(outcomes[1], ItemOutcome::KeyReused);
    assert_eq!(store.record("a").unwrap().unwrap().version.time_ntp64, 1);
    assert!(store.record("c").unwrap().is_none());
    assert_eq!(store.prune_idempotency(2, 100).unwrap(), 1);
    assert!(store.idempotent_answer("idem").unwrap().is_none());
}

/// A crash image of `dir` taken now: the database as durably committed and the log as synced.
fn crash_image(dir: &Path) -> tempfile::TempDir {
    let crash = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join(DB_FILE), crash.path().join(DB_FILE)).unwrap();
    std::fs::copy(dir.join(LOG_FILE), crash.path().join(LOG_FILE)).unwrap();
    crash
}

/// A store durable at batch 1 (checkpointed) with batches 2..=6 acknowledged in the log only,
/// as a crash image.
fn store_with_log_only_batches() -> (tempfile::TempDir, tempfile::TempDir) {
    let (dir, store) = store_holding_a();
    store.checkpoint().unwrap();
    let image_db = dir.path().join("db.image");
    std::fs::copy(dir.path().join(DB_FILE), &image_db).unwrap();
    for (n, key) in ["b", "c", "d", "e", "f"].iter().enumerate() {
        store.commit_batch(&[item(key, n as u64 + 2)], &[]).unwrap();
    }
    let crash = crash_image(dir.path());
    std::fs::copy(&image_db, crash.path().join(DB_FILE)).unwrap();
    drop(store);
    (dir, crash)
}

/// Offsets of the log entries of `dir`'s commit log, in order.
fn entry_offsets(dir: &Path) -> Vec<(u64, usize)> {
    let back = CommitLog::read(dir).unwrap();
    let mut at = 0;
    back.entries
        .iter()
        .map(|e| {
            let here = at;
            at += 16 + e.payload.len();
            (e.seq, here)
        })
        .collect()
}

#[test]
fn a_damaged_commit_log_is_refused_and_recover_keeps_every_intact_batch() {
    let (_dir, crash) = store_with_log_only_batches();
    let offsets = entry_offsets(crash.path());
    let seqs: Vec<u64> = offsets.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5, 6],
        "marker of batch 1, then batches 2..=6"
    );
    // A flipped byte in the payload of batch 3: batches 4..=6 follow intact.
    let log = crash.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&log).unwrap();
    let (_, at) = offsets[2];
    bytes[at + 20] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();

    let err = Store::open(crash.path(), "n1").err().expect("refused");
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::Log(CommitLogError::Damaged { .. })),
        "{text}"
    );
    assert!(text.contains(&log.display().to_string()), "{text}");
    assert!(text.contains(&format!("at byte {at}")), "{text}");
    assert!(text.contains("3 intact entries follow"), "{text}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "nothing was cut");

    let options = StoreOptions {
        recover_log: true,
        lost_before_ntp64: 1_000,
    };
    let (store, _) = Store::open_with(crash.path(), "n1", options).unwrap();
    for (key, n) in [("a", 1), ("b", 2), ("d", 4), ("e", 5), ("f", 6)] {
        assert_eq!(store.record(key).unwrap(), Some(record(n)), "{key}");
    }
    assert_eq!(
        store.record("c").unwrap(),
        None,
        "batch 3 was in the damaged bytes"
    );
    // The own log is known complete up to what the database held before the replay.
    assert_eq!(
        store.own_recovery().unwrap(),
        Some(OwnRecovery {
            complete_to: 1,
            lost_before: 1_000
        })
    );
    drop(store);
    // Recovered: the next open is a normal one, and the recovery stays until peers vouch.
    let (store, _) = Store::open(crash.path(), "n1").unwrap();
    assert_eq!(store.record("f").unwrap(), Some(record(6)));
    assert!(store.own_recovery().unwrap().is_some());
    store.finish_own_recovery().unwrap();
    assert_eq!(store.own_recovery().unwrap(), None);
}

#[test]
fn an_empty_log_after_a_marker_was_checkpointed_is_refused() {
    let (dir, store) = store_holding_a();
    store.checkpoint().unwrap();
    store.commit_batch(&[item("b", 2)], &[]).unwrap();
    drop(store);
    std::fs::write(dir.path().join(LOG_FILE), b"").unwrap();
    let err = Store::open(dir.path(), "n1").err().expect("refused");
    assert!(matches!(err, StoreError::LogMissing { .. }), "{err}");
    assert!(err.to_string().contains("--recover"), "{err}");
    let options = StoreOptions {
        recover_log: true,
        lost_before_ntp64: 1_000,
    };
    let (store, _) = Store::open_with(dir.path(), "n1", options).unwrap();
    assert_eq!(store.record("a").unwrap(), Some(record(1)));
    assert!(store.own_recovery().unwrap().is_some());
}

#[test]
fn a_data_directory_of_an_older_build_with_an_empty_log_opens() {
    // Before checkpoints left a marker, a cleanly stopped node left an empty log.
    let (dir, store) = store_holding_a();
    drop(store);
    std::fs::write(dir.path().join(LOG_FILE), b"").unwrap();
    let (store, _) = Store::open(dir.path(), "n1").unwrap();
    assert_eq!(store.record("a").unwrap(), Some(record(1)));
}
