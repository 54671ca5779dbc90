//! Fuzz targets for what the store decodes from disk: records, change-log entries,
//! idempotent answers, commit-log batches and whole commit-log files.
//!
//! Under `cargo test` each runs its corpus (`__fuzz__/<target>/corpus`) and random inputs for
//! `BOLERO_RANDOM_TEST_TIME_MS` (1 s by default; CI sets more); `cargo bolero test
//! store::fuzz::<target> -p meridian-node` runs it coverage-guided. Nothing may panic, and
//! what decodes must encode to itself.

use super::batch::{decode_batch, encode_batch};
use super::codec::{IdempotentAnswer, StoredChange, StoredRecord};
use super::commit_log::{CommitLog, LOG_FILE};

#[test]
fn stored_record() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok(record) = StoredRecord::decode(bytes) {
            assert_eq!(StoredRecord::decode(&record.encode()), Ok(record));
        }
    });
}

#[test]
fn log_entry() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok(entry) = StoredChange::decode(bytes) {
            assert_eq!(StoredChange::decode(&entry.encode()), Ok(entry));
        }
    });
}

#[test]
fn idempotent_answer() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok(answer) = IdempotentAnswer::decode(bytes) {
            assert_eq!(IdempotentAnswer::decode(&answer.encode()), Ok(answer));
        }
    });
}

#[test]
fn commit_log_batch() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok((items, frontier)) = decode_batch(bytes) {
            let again = encode_batch(items.iter(), &frontier).expect("a decoded batch encodes");
            let (items_again, frontier_again) = decode_batch(&again).expect("and decodes");
            assert_eq!(items_again.len(), items.len());
            assert_eq!(frontier_again, frontier);
        }
    });
}

#[test]
fn commit_log_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(LOG_FILE);
    bolero::check!().for_each(|bytes: &[u8]| {
        std::fs::write(&path, bytes).expect("write the log");
        // Reading any file answers: entries, damage or a torn tail, never a panic; every
        // entry it keeps lies within the file.
        if let Ok(back) = CommitLog::read(dir.path()) {
            let kept: usize = back.entries.iter().map(|e| e.payload.len()).sum();
            assert!(kept <= bytes.len());
        }
    });
}
