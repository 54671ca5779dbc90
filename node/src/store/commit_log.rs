//! The commit log: an append-only file that makes a batch of writes durable with one
//! sequential write and one `fdatasync`, ahead of the redb commit that holds the same batch.
//!
//! Why: a durable redb commit writes every B-tree page the batch dirtied (tens to hundreds of
//! scattered pages for a batch of unrelated keys) and syncs them; on the benchmark disk that
//! took 3–12 ms for 32–64 writes and bounded a node to ~4,000 writes/s. Appending the batch
//! here costs one sequential write and one sync; redb then commits without syncing, and a
//! periodic checkpoint (a durable redb commit) writes the accumulated pages once.
//!
//! Entry layout: `len u32 LE | crc32 u32 LE | seq u64 LE | payload (len bytes)`, the CRC over
//! the sequence number and the payload.
//!
//! Invariants:
//! * Sequence numbers grow by one from entry to entry.
//! * An entry is acknowledged only after its append was synced; a torn or corrupt tail can
//!   only be an append that was never acknowledged, and is cut off at open.
//! * A failed append is undone (the file is cut back to its previous length) before the next
//!   one; if that fails too, the log refuses further appends until the node restarts.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const LOG_FILE: &str = "commit.log";
const HEADER_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CommitLogError {
    #[error("commit log {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "commit log {path} could not be cut back after a failed append; it takes no more writes until the node restarts"
    )]
    Broken { path: PathBuf },
    #[error("commit log {path}: a batch of {bytes} bytes is larger than an entry can hold")]
    TooLarge { path: PathBuf, bytes: usize },
}

/// One intact entry read back.
#[derive(Debug, PartialEq)]
pub struct LoggedBatch {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What reading a log found.
#[derive(Debug, Default)]
pub struct ReadBack {
    pub entries: Vec<LoggedBatch>,
    /// Length of the intact prefix.
    pub intact_bytes: u64,
    /// Bytes after the intact prefix (a torn or corrupt tail), with why it ended there.
    pub tail_bytes: u64,
    pub tail_reason: Option<String>,
}

pub struct CommitLog {
    file: File,
    path: PathBuf,
    len: u64,
    broken: bool,
    scratch: Vec<u8>,
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CommitLogError + 'a {
    move |source| CommitLogError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl CommitLog {
    /// Open (or create) the log in `dir`, read its intact entries and cut off a torn tail.
    pub fn open(dir: &Path) -> Result<(CommitLog, ReadBack), CommitLogError> {
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path, "open"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io(&path, "read"))?;
        let back = parse(&bytes);
        if back.tail_bytes > 0 {
            file.set_len(back.intact_bytes)
                .map_err(io(&path, "cut the torn tail"))?;
            file.sync_all().map_err(io(&path, "sync after the cut"))?;
        }
        file.seek(SeekFrom::Start(back.intact_bytes))
            .map_err(io(&path, "seek"))?;
        let log = CommitLog {
            file,
            path,
            len: back.intact_bytes,
            broken: false,
            scratch: Vec::new(),
        };
        Ok((log, back))
    }

    /// Read the log of `dir` without changing it (for offline tools); no file reads as empty.
    pub fn read(dir: &Path) -> Result<ReadBack, CommitLogError> {
        let path = dir.join(LOG_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(parse(&bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ReadBack::default()),
            Err(e) => Err(io(&path, "read")(e)),
        }
    }

    /// Append one entry and sync it to the disk.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<(), CommitLogError> {
        if self.broken {
            return Err(CommitLogError::Broken {
                path: self.path.clone(),
            });
        }
        let len = u32::try_from(payload.len()).map_err(|_| CommitLogError::TooLarge {
            path: self.path.clone(),
            bytes: payload.len(),
        })?;
        self.scratch.clear();
        self.scratch.reserve(HEADER_BYTES + payload.len());
        self.scratch.extend_from_slice(&len.to_le_bytes());
        self.scratch
            .extend_from_slice(&crc(seq, payload).to_le_bytes());
        self.scratch.extend_from_slice(&seq.to_le_bytes());
        self.scratch.extend_from_slice(payload);
        let written = self
            .file
            .write_all(&self.scratch)
            .map_err(io(&self.path, "append"))
            .and_then(|()| self.file.sync_data().map_err(io(&self.path, "sync")));
        match written {
            Ok(()) => {
                self.len += self.scratch.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the entry may be in the file; the next entry must not follow it.
                let undone = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
                if undone.is_err() {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }

    /// Empty the log: everything in it is durable elsewhere now.
    pub fn clear(&mut self) -> Result<(), CommitLogError> {
        self.file.set_len(0).map_err(io(&self.path, "truncate"))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io(&self.path, "seek"))?;
        self.len = 0;
        self.file
            .sync_all()
            .map_err(io(&self.path, "sync after truncate"))
    }

    /// Take no more appends until the node restarts (the database failed after an append, so
    /// log and database disagree until the log is replayed).
    pub fn refuse_appends(&mut self) {
        self.broken = true;
    }

    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The intact entries at the start of `bytes`, stopping at the first torn, corrupt or
/// out-of-sequence one.
fn parse(bytes: &[u8]) -> ReadBack {
    let mut back = ReadBack::default();
    let mut at = 0usize;
    let mut previous: Option<u64> = None;
    let reason = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < HEADER_BYTES {
            break Some(format!(
                "{} bytes, shorter than an entry header",
                rest.len()
            ));
        }
        let field = |from: usize, to: usize| -> &[u8] { &rest[from..to] };
        let len = u32::from_le_bytes(field(0, 4).try_into().unwrap_or([0; 4])) as usize;
        let sum = u32::from_le_bytes(field(4, 8).try_into().unwrap_or([0; 4]));
        let seq = u64::from_le_bytes(field(8, 16).try_into().unwrap_or([0; 8]));
        // The length is checked against what is there before anything is copied.
        if len > rest.len() - HEADER_BYTES {
            break Some(format!(
                "entry {seq} claims {len} bytes, {} remain",
                rest.len() - HEADER_BYTES
            ));
        }
        let payload = &rest[HEADER_BYTES..HEADER_BYTES + len];
        if crc(seq, payload) != sum {
            break Some(format!("entry at byte {at} fails its checksum"));
        }
        if let Some(p) = previous
            && Some(seq) != p.checked_add(1)
        {
            break Some(format!("entry {seq} follows entry {p}"));
        }
        previous = Some(seq);
        back.entries.push(LoggedBatch {
            seq,
            payload: payload.to_vec(),
        });
        at += HEADER_BYTES + len;
    };
    back.intact_bytes = at as u64;
    back.tail_bytes = (bytes.len() - at) as u64;
    back.tail_reason = reason;
    back
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(back: &ReadBack) -> Vec<(u64, Vec<u8>)> {
        back.entries
            .iter()
            .map(|e| (e.seq, e.payload.clone()))
            .collect()
    }

    #[test]
    fn entries_survive_a_reopen_and_clear_empties_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, back) = CommitLog::open(dir.path()).expect("open");
        assert!(back.entries.is_empty());
        log.append(7, b"first").expect("append");
        log.append(8, b"").expect("append empty");
        log.append(9, &[0xAB; 5000]).expect("append big");
        drop(log);
        let (mut log, back) = CommitLog::open(dir.path()).expect("reopen");
        assert_eq!(
            payloads(&back),
            vec![
                (7, b"first".to_vec()),
                (8, Vec::new()),
                (9, vec![0xAB; 5000])
            ]
        );
        assert_eq!(back.tail_bytes, 0);
        log.clear().expect("clear");
        log.append(10, b"after").expect("append after clear");
        drop(log);
        let back = CommitLog::read(dir.path()).expect("read");
        assert_eq!(payloads(&back), vec![(10, b"after".to_vec())]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appends_continue_after_the_intact_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = CommitLog::open(dir.path()).expect("open");
        log.append(1, b"one").expect("append");
        log.append(2, b"two").expect("append");
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
        // read() leaves the file alone; open() cuts it.
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            bytes.len() as u64
        );
        let (mut log, back) = CommitLog::open(dir.path()).expect("open");
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
    fn a_flipped_byte_or_a_sequence_gap_ends_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = CommitLog::open(dir.path()).expect("open");
        log.append(1, b"one").expect("append");
        log.append(2, b"two").expect("append");
        log.append(4, b"four").expect("append");
        drop(log);
        let back = CommitLog::read(dir.path()).expect("read");
        assert_eq!(back.entries.len(), 2, "entry 4 does not follow entry 2");
        assert!(
            back.tail_reason
                .as_deref()
                .unwrap_or("")
                .contains("follows")
        );

        let path = dir.path().join(LOG_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        // Flip a payload byte of the second entry: it and everything after it are dropped.
        let second_payload = HEADER_BYTES + 3 + HEADER_BYTES;
        bytes[second_payload] ^= 0xFF;
        std::fs::write(&path, &bytes).expect("write");
        let back = CommitLog::read(dir.path()).expect("read");
        assert_eq!(payloads(&back), vec![(1, b"one".to_vec())]);
        assert!(
            back.tail_reason
                .as_deref()
                .unwrap_or("")
                .contains("checksum")
        );
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
}
