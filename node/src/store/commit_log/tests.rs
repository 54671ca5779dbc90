use super::*;

fn payloads(back: &ReadBack) -> Vec<(u64, Vec<u8>)> {
    back.entries
        .iter()
        .map(|e| (e.seq, e.payload.clone()))
        .collect()
}

fn open(dir: &Path) -> (CommitLog, ReadBack) {
    CommitLog::open(dir, 0, OpenMode::Strict).expect("open")
}

/// An open log holding entries 1 ("one") and 2 ("two").
fn log_of_one_and_two(dir: &Path) -> CommitLog {
    let (mut log, _) = open(dir);
    log.append(1, b"one").expect("append");
    log.append(2, b"two").expect("append");
    log
}

/// A log of entries 1..=n with payloads "e<seq>", closed.
fn log_of(dir: &Path, n: u64) -> Vec<u8> {
    let (mut log, _) = open(dir);
    for seq in 1..=n {
        log.append(seq, format!("e{seq}").as_bytes())
            .expect("append");
    }
    drop(log);
    std::fs::read(dir.join(LOG_FILE)).expect("read")
}

/// Offset of entry `seq` in a [`log_of`] file (payloads "e1".."e9" are 2 bytes).
fn offset_of(seq: u64) -> usize {
    (seq as usize - 1) * (HEADER_BYTES + 2)
}

#[test]
fn entries_survive_a_reopen_and_clear_leaves_only_the_marker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, back) = open(dir.path());
    assert!(back.entries.is_empty());
    log.append(7, b"first").expect("append");
    log.append(8, b"").expect("append empty");
    log.append(9, &[0xAB; 5000]).expect("append big");
    drop(log);
    let (mut log, back) = open(dir.path());
    assert_eq!(
        payloads(&back),
        vec![
            (7, b"first".to_vec()),
            (8, Vec::new()),
            (9, vec![0xAB; 5000])
        ]
    );
    assert_eq!(back.tail_bytes, 0);
    assert!(back.damage.is_none());
    log.clear(9).expect("clear");
    assert!(!log.has_batches());
    log.append(10, b"after").expect("append after clear");
    assert!(log.has_batches());
    drop(log);
    let back = CommitLog::read(dir.path()).expect("read");
    assert_eq!(
        payloads(&back),
        vec![(9, Vec::new()), (10, b"after".to_vec())],
        "the marker of batch 9, then the new entry"
    );
}

#[test]
fn a_torn_tail_is_cut_off_and_appends_continue_after_the_intact_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = log_of_one_and_two(dir.path());
    let intact = log.len_bytes();
    drop(log);
    // A crash in the middle of the third append: its header and part of its payload.
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).expect("read");
    let mut third = Vec::new();
    third.extend_from_slice(&100u32.to_le_bytes());
    third.extend_from_slice(&0u32.to_le_bytes());
    third.extend_from_slice(&3u64.to_le_bytes());
    third.extend_from_slice(b"partial");
    bytes.extend_from_slice(&third);
    std::fs::write(&path, &bytes).expect("write");

    let back = CommitLog::read(dir.path()).expect("read");
    assert_eq!(back.entries.len(), 2);
    assert_eq!(back.tail_bytes, third.len() as u64);
    assert!(back.tail_reason.as_deref().unwrap_or("").contains("claims"));
    assert!(
        back.damage.is_none(),
        "nothing intact follows: a torn append"
    );
    // read() leaves the file alone; open() cuts it.
    assert_eq!(
        std::fs::metadata(&path).expect("meta").len(),
        bytes.len() as u64
    );
    let (mut log, back) = open(dir.path());
    assert_eq!(back.entries.len(), 2);
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), intact);
    log.append(3, b"three").expect("append");
    drop(log);
    let back = CommitLog::read(dir.path()).expect("read");
    assert_eq!(
        payloads(&back),
        vec![
            (1, b"one".to_vec()),
            (2, b"two".to_vec()),
            (3, b"three".to_vec())
        ]
    );
}

#[test]
fn a_flipped_byte_of_the_last_entry_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = log_of(dir.path(), 3);
    bytes[offset_of(3) + HEADER_BYTES] ^= 0xFF;
    std::fs::write(dir.path().join(LOG_FILE), &bytes).expect("write");
    let back = CommitLog::read(dir.path()).expect("read");
    assert_eq!(back.entries.len(), 2);
    assert!(back.damage.is_none());
    assert!(
        back.tail_reason
            .as_deref()
            .unwrap_or("")
            .contains("checksum")
    );
}

#[test]
fn a_bad_entry_followed_by_intact_ones_is_damage_and_the_node_refuses_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = log_of(dir.path(), 9);
    let path = dir.path().join(LOG_FILE);
    // A flipped payload byte in entry 3, and (another image) a flipped length field.
    for (name, at) in [
        ("payload", offset_of(3) + HEADER_BYTES),
        ("length", offset_of(3) + 1),
        ("sequence", offset_of(1) + 9),
    ] {
        let original = bytes.clone();
        bytes[at] ^= 0x5A;
        std::fs::write(&path, &bytes).expect("write");
        let back = CommitLog::read(dir.path()).expect("read");
        let damage = back.damage.clone().expect(name);
        let first_bad = if name == "sequence" { 1 } else { 3 };
        assert_eq!(damage.offset, offset_of(first_bad) as u64, "{name}");
        assert_eq!(damage.following, 9 - first_bad as usize, "{name}");
        let lost_from = if first_bad == 1 { 0 } else { first_bad };
        assert_eq!(
            damage.missing,
            vec![(lost_from, first_bad)],
            "{name}: only entry {first_bad} is lost"
        );
        assert_eq!(back.entries.len(), 8, "{name}: every other entry is intact");
        let err = CommitLog::open(dir.path(), 0, OpenMode::Strict).expect_err(name);
        let text = err.to_string();
        assert!(matches!(err, CommitLogError::Damaged { .. }), "{text}");
        assert!(
            text.contains(&format!("at byte {}", damage.offset)),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} intact entries follow", 9 - first_bad)),
            "{text}"
        );
        assert!(text.contains("--recover"), "{text}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "{name}: a refused log is left as it is"
        );
        // Recovery keeps every intact entry and leaves the file for the replay.
        let (_, back) = CommitLog::open(dir.path(), 0, OpenMode::Recover).expect(name);
        assert_eq!(back.entries.len(), 8, "{name}");
        assert!(back.entries.iter().all(|e| e.seq != first_bad));
        bytes = original;
    }
}

#[test]
fn damage_with_nothing_newer_than_the_database_loses_nothing_and_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = log_of(dir.path(), 5);
    bytes[offset_of(2) + HEADER_BYTES] ^= 0xFF;
    std::fs::write(dir.path().join(LOG_FILE), &bytes).expect("write");
    // The database holds batches up to 5 durably: the damage costs nothing.
    let (log, back) = CommitLog::open(dir.path(), 5, OpenMode::Strict).expect("open");
    assert!(back.damage.is_none());
    assert_eq!(payloads(&back), vec![(1, b"e1".to_vec())]);
    assert_eq!(log.len_bytes(), offset_of(2) as u64);
}

#[test]
fn a_missing_sequence_number_between_intact_entries_is_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = log_of_one_and_two(dir.path());
    log.append(4, b"four").expect("append");
    drop(log);
    let back = CommitLog::read(dir.path()).expect("read");
    let damage = back.damage.expect("damage");
    assert!(damage.reason.contains("follows"), "{}", damage.reason);
    assert_eq!(damage.missing, vec![(3, 3)]);
    assert_eq!(back.entries.len(), 3);
}

#[test]
fn a_marker_half_written_over_old_entries_is_cut_like_a_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = log_of(dir.path(), 4);
    // A crash inside clear(4): the marker is over the start of entry 1, the rest is old.
    let marker = entry(4, &[]);
    bytes[..marker.len()].copy_from_slice(&marker);
    std::fs::write(dir.path().join(LOG_FILE), &bytes).expect("write");
    let (log, back) = CommitLog::open(dir.path(), 4, OpenMode::Strict).expect("open");
    assert_eq!(payloads(&back), vec![(4, Vec::new())]);
    assert!(back.damage.is_none());
    assert!(!log.has_batches());
}

#[test]
fn a_missing_log_reads_as_empty_and_short_garbage_is_a_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let back = CommitLog::read(dir.path()).expect("read");
    assert!(back.entries.is_empty() && back.tail_bytes == 0);
    std::fs::write(dir.path().join(LOG_FILE), [1, 2, 3]).expect("write");
    let back = CommitLog::read(dir.path()).expect("read");
    assert!(back.entries.is_empty());
    assert_eq!(back.tail_bytes, 3);
}
