use super::*;

fn record() -> StoredRecord {
    StoredRecord {
        live: true,
        version: Version {
            time_ntp64: 77,
            node_hlc_id: 3,
        },
        home_region: Some("eu-west".into()),
        view_json: br#"{"value":{"m":"x"}}"#.to_vec(),
        doc: vec![9; 40],
        appended_changes: 2,
    }
}

#[test]
fn a_flipped_bit_anywhere_in_a_record_is_found() {
    let bytes = record().encode();
    assert_eq!(StoredRecord::decode(&bytes), Ok(record()));
    for at in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut damaged = bytes.clone();
            damaged[at] ^= bit;
            assert!(
                StoredRecord::decode(&damaged).is_err(),
                "bit {bit:#04x} of byte {at} flipped, not found"
            );
        }
    }
    let mut damaged = bytes.clone();
    let view_at = bytes.windows(3).position(|w| w == b"\"x\"").expect("view");
    damaged[view_at + 1] = b'y';
    let err = StoredRecord::decode(&damaged).expect_err("damaged view");
    assert!(err.contains("checksum mismatch"), "{err}");
}

#[test]
fn records_written_before_checksums_are_still_read() {
    let mut legacy = record().encode();
    legacy.truncate(legacy.len() - CHECKSUM_BYTES);
    legacy[1] = RECORD_FORMAT_UNCHECKED;
    assert_eq!(StoredRecord::decode(&legacy), Ok(record()));
    assert_eq!(
        StoredRecord::decode(&[RECORD_MAGIC, 9, 0]),
        Err("unknown record format 9".into())
    );
}

#[test]
fn a_flipped_bit_anywhere_in_a_log_entry_is_found_and_old_entries_are_read() {
    let entry = StoredChange {
        key: "users/é".into(),
        change: vec![1, 2, 3, 4],
    };
    let bytes = entry.encode();
    assert_eq!(StoredChange::decode(&bytes), Ok(entry.clone()));
    for at in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x01;
        assert!(
            StoredChange::decode(&damaged).is_err(),
            "byte {at} flipped, not found"
        );
    }
    // Before checksums: key length, key, change; its first byte is never the marker.
    let mut legacy = Vec::new();
    legacy.extend_from_slice(&(entry.key.len() as u16).to_be_bytes());
    legacy.extend_from_slice(entry.key.as_bytes());
    legacy.extend_from_slice(&entry.change);
    assert_eq!(StoredChange::decode(&legacy), Ok(entry));
    let longest_key = (512u16).to_be_bytes();
    assert!(longest_key[0] < LOG_ENTRY_MARKER);
}
