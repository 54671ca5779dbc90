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
//! the sequence number and the payload. After a checkpoint the log holds one *marker*: an
//! entry with an empty payload whose sequence number is the batch the checkpoint made durable;
//! a log is never empty once its data directory has been checkpointed.
//!
//! Invariants:
//! * Sequence numbers grow by one from entry to entry.
//! * An entry is acknowledged only after its append was synced, and appends are sequential:
//!   only the **last** entry can be torn. A bad entry with nothing intact after it is that torn
//!   append and is cut off at open. A bad entry (or a missing sequence number) followed by
//!   intact entries is *damage*: acknowledged batches may be in it, so the log is never cut
//!   there; opening it fails unless the caller asks to recover ([`OpenMode::Recover`]), which
//!   keeps every intact entry and reports what was dropped.
//! * A failed append is undone (the file is cut back to its previous length) before the next
//!   one; if that fails too, the log refuses further appends until the node restarts.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use meridian_replication::codec::Reader;

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
    #[error(
        "commit log {path} is damaged at byte {offset} ({reason}), and {following} intact entries follow it: acknowledged batches may be in the damaged part. The node does not start on it; `meridian serve --recover` keeps every intact entry, drops the damaged bytes and says which batches are missing (peers that hold this node's changes send them back)"
    )]
    Damaged {
        path: PathBuf,
        offset: u64,
        reason: String,
        following: usize,
    },
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
    /// The intact entries, in file order: the intact prefix, then (when the log is damaged)
    /// the intact entries after the damage.
    pub entries: Vec<LoggedBatch>,
    /// Length of the intact prefix.
    pub intact_bytes: u64,
    /// Bytes after the intact prefix when nothing intact follows them (a torn tail), with why
    /// the prefix ended there.
    pub tail_bytes: u64,
    pub tail_reason: Option<String>,
    /// Where intact entries follow a bad one.
    pub damage: Option<Damage>,
}

/// A bad region of a log with intact entries after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Where the first bad region starts.
    pub offset: u64,
    pub reason: String,
    /// Bytes in bad regions, all of them.
    pub bad_bytes: u64,
    /// Intact entries after the first bad region.
    pub following: usize,
    /// Sequence numbers that the intact entries skip over (the batches lost with the damage),
    /// as inclusive ranges; a range starts at 0 when the damage is at the start of the log,
    /// where the first lost number is unknown.
    pub missing: Vec<(u64, u64)>,
}

impl ReadBack {
    /// Entries after the intact prefix (those past the damage).
    pub fn after_damage(&self) -> &[LoggedBatch] {
        let following = self.damage.as_ref().map_or(0, |d| d.following);
        &self.entries[self.entries.len() - following..]
    }
}

/// How [`CommitLog::open`] treats a damaged log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// Refuse a log with damage that acknowledged batches may be in.
    #[default]
    Strict,
    /// Keep every intact entry, before and after the damage.
    Recover,
}

#[derive(Debug)]
pub struct CommitLog {
    file: File,
    path: PathBuf,
    len: u64,
    /// Bytes of the marker at the start (0 before the first [`CommitLog::clear`]).
    marker_len: u64,
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
    ///
    /// `durable` is the newest batch the database holds durably: damage with nothing newer
    /// than that after it loses nothing (it can be a marker written over older entries) and is
    /// cut like a tail. Other damage fails in [`OpenMode::Strict`]; in [`OpenMode::Recover`] the
    /// file is left as it is and every intact entry is returned, for the caller to replay and
    /// then [`clear`](CommitLog::clear).
    pub fn open(
        dir: &Path,
        durable: u64,
        mode: OpenMode,
    ) -> Result<(CommitLog, ReadBack), CommitLogError> {
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
        let mut back = parse(&bytes);
        let mut keep = back.intact_bytes;
        if let Some(damage) = back.damage.clone() {
            let harmful = back.after_damage().iter().any(|e| e.seq > durable);
            if !harmful {
                // Everything after the damage is in the database already.
                back.entries.truncate(back.entries.len() - damage.following);
                back.tail_bytes = bytes.len() as u64 - back.intact_bytes;
                back.tail_reason = Some(damage.reason);
                back.damage = None;
            } else if mode == OpenMode::Strict {
                return Err(CommitLogError::Damaged {
                    path,
                    offset: damage.offset,
                    reason: damage.reason,
                    following: damage.following,
                });
            } else {
                keep = bytes.len() as u64;
            }
        }
        if keep < bytes.len() as u64 {
            file.set_len(keep).map_err(io(&path, "cut the torn tail"))?;
            file.sync_all().map_err(io(&path, "sync after the cut"))?;
        }
        file.seek(SeekFrom::Start(keep))
            .map_err(io(&path, "seek"))?;
        let marker_len = back
            .entries
            .first()
            .filter(|e| e.payload.is_empty())
            .map_or(0, |_| HEADER_BYTES as u64);
        let log = CommitLog {
            file,
            path,
            len: keep,
            marker_len,
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
        encode_entry(&mut self.scratch, len, seq, payload);
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

    /// Empty the log: everything in it up to batch `durable` is durable elsewhere now. What
    /// remains is the marker of `durable`, written over the start of the file before the rest
    /// is cut off, each step synced, so that a crash leaves either the old entries (behind a
    /// possibly half-written marker: damage with nothing newer than `durable` after it) or
    /// the marker, and never an empty file.
    pub fn clear(&mut self, durable: u64) -> Result<(), CommitLogError> {
        let marker = entry(durable, &[]);
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io(&self.path, "seek"))?;
        self.file
            .write_all(&marker)
            .map_err(io(&self.path, "write the marker"))?;
        self.file
            .sync_data()
            .map_err(io(&self.path, "sync the marker"))?;
        self.file
            .set_len(marker.len() as u64)
            .map_err(io(&self.path, "truncate"))?;
        self.file
            .sync_all()
            .map_err(io(&self.path, "sync after truncate"))?;
        self.len = marker.len() as u64;
        self.marker_len = self.len;
        Ok(())
    }

    /// Whether batches were appended since the last [`clear`](CommitLog::clear).
    pub fn has_batches(&self) -> bool {
        self.len > self.marker_len
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

fn encode_entry(out: &mut Vec<u8>, len: u32, seq: u64, payload: &[u8]) {
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc(seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// One encoded entry (the payload is small: markers).
fn entry(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    encode_entry(&mut out, len, seq, payload);
    out
}

/// The entry at the start of `rest`, if it is intact: `Err` says why not.
fn entry_at(rest: &[u8]) -> Result<LoggedBatch, String> {
    if rest.len() < HEADER_BYTES {
        return Err(format!(
            "{} bytes, shorter than an entry header",
            rest.len()
        ));
    }
    let mut header = Reader::new(&rest[..HEADER_BYTES]);
    let (Ok(len), Ok(sum), Ok(seq)) = (header.u32_le(), header.u32_le(), header.u64_le()) else {
        return Err("unreadable entry header".into());
    };
    let len = len as usize;
    // The length is checked against what is there before anything is copied.
    if len > rest.len() - HEADER_BYTES {
        return Err(format!(
            "entry {seq} claims {len} bytes, {} remain",
            rest.len() - HEADER_BYTES
        ));
    }
    let payload = &rest[HEADER_BYTES..HEADER_BYTES + len];
    if crc(seq, payload) != sum {
        return Err("fails its checksum".into());
    }
    Ok(LoggedBatch {
        seq,
        payload: payload.to_vec(),
    })
}

/// The offset of the next intact entry at or after `from` whose sequence number is after
/// `after`, if any. Scans byte by byte: only after damage, and the checks before the checksum
/// (the length fits, the sequence number is plausible) reject almost every offset at once.
fn resync(bytes: &[u8], from: usize, after: Option<u64>) -> Option<usize> {
    (from..bytes.len().saturating_sub(HEADER_BYTES - 1)).find(|&at| {
        let rest = &bytes[at..];
        let seq = u64::from_le_bytes(rest[8..16].try_into().unwrap_or([0; 8]));
        let plausible = after.is_none_or(|p| seq > p && seq - p <= MAX_RESYNC_SEQ_STEP);
        plausible && entry_at(rest).is_ok()
    })
}

/// An intact entry found after damage is taken for one of this log only if its sequence
/// number is at most this far past the last one before the damage.
const MAX_RESYNC_SEQ_STEP: u64 = 1 << 32;

/// The intact entries of `bytes`: the intact prefix, and any intact entries after a bad one.
fn parse(bytes: &[u8]) -> ReadBack {
    let mut back = ReadBack::default();
    let mut at = 0usize;
    let mut previous: Option<u64> = None;
    let mut damage: Option<Damage> = None;
    while at < bytes.len() {
        let problem = match entry_at(&bytes[at..]) {
            Ok(e) if previous.is_none_or(|p| Some(e.seq) == p.checked_add(1)) => {
                at += HEADER_BYTES + e.payload.len();
                previous = Some(e.seq);
                back.entries.push(e);
                if let Some(d) = damage.as_mut() {
                    d.following += 1;
                } else {
                    back.intact_bytes = at as u64;
                }
                continue;
            }
            Ok(e) => {
                // Intact, but batches are missing before it.
                let p = previous.unwrap_or(0);
                let missing = (p + 1, e.seq.saturating_sub(1));
                let reason = format!("entry {} follows entry {p}", e.seq);
                let d = damage.get_or_insert_with(|| Damage {
                    offset: at as u64,
                    reason,
                    bad_bytes: 0,
                    following: 0,
                    missing: Vec::new(),
                });
                if e.seq > p {
                    d.missing.push(missing);
                }
                previous = Some(e.seq.max(p));
                at += HEADER_BYTES + e.payload.len();
                d.following += 1;
                back.entries.push(e);
                continue;
            }
            Err(why) => why,
        };
        let Some(next) = resync(bytes, at + 1, previous) else {
            if damage.is_none() {
                back.tail_bytes = (bytes.len() - at) as u64;
                back.tail_reason = Some(if problem.starts_with("fails") {
                    format!("entry at byte {at} {problem}")
                } else {
                    problem
                });
            } else if let Some(d) = damage.as_mut() {
                // A torn last append after damage: bad bytes too, nothing to keep.
                d.bad_bytes += (bytes.len() - at) as u64;
            }
            break;
        };
        let d = damage.get_or_insert_with(|| Damage {
            offset: at as u64,
            reason: if problem.starts_with("fails") {
                format!("entry at byte {at} {problem}")
            } else {
                problem
            },
            bad_bytes: 0,
            following: 0,
            missing: Vec::new(),
        });
        d.bad_bytes += (next - at) as u64;
        // The sequence numbers between the last entry before and the one after are lost.
        let next_seq = u64::from_le_bytes(bytes[next + 8..next + 16].try_into().unwrap_or([0; 8]));
        // Damage at the very start of the log hides where it began: 0 then.
        let from = previous.map_or(0, |p| p + 1);
        if next_seq > from {
            d.missing.push((from, next_seq - 1));
        }
        previous = next_seq.checked_sub(1);
        at = next;
    }
    back.damage = damage;
    back
}

#[cfg(test)]
mod tests;
