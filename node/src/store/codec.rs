//! The encodings of what the tables hold: records, change-log entries, idempotent answers.
//!
//! Every decoder checks lengths before it reads: a corrupt value is an error naming what is
//! corrupt, never a panic. Records and change-log entries end in a CRC-32 of everything before
//! it, verified on every read, so that a flipped bit in redb's file is found at the record it
//! damaged (redb checksums its pages only under `Durability::Paranoid`, which we do not use).
//! The formats written before checksums existed (record format 1, log entries without a
//! marker) are still read.

use meridian_replication::Version;
use meridian_replication::codec::Reader;

/// A record as stored: everything a read needs without loading the automerge document.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    /// False once deleted: the document is kept as a tombstone so that later changes merge.
    pub live: bool,
    pub version: Version,
    /// `None` for a global record (no residency rule matched).
    pub home_region: Option<String>,
    /// The rendered [`meridian_replication::RecordView`] as JSON (empty when not live).
    pub view_json: Vec<u8>,
    /// A saved automerge document followed by `appended_changes` change chunks.
    pub doc: Vec<u8>,
    pub appended_changes: u32,
}

const RECORD_MAGIC: u8 = 0xA7;
/// 1: no checksum (read only); 2: a CRC-32 trailer.
const RECORD_FORMAT: u8 = 2;
const RECORD_FORMAT_UNCHECKED: u8 = 1;
const CHECKSUM_BYTES: usize = 4;

/// Appends the checksum of everything in `out` so far.
fn seal(out: &mut Vec<u8>) {
    let sum = crc32(out);
    out.extend_from_slice(&sum.to_be_bytes());
}

/// `bytes` without its checksum trailer, once the trailer matches.
fn unseal(bytes: &[u8]) -> Result<&[u8], String> {
    let Some(body_len) = bytes.len().checked_sub(CHECKSUM_BYTES) else {
        return Err("too short for its checksum".into());
    };
    let (body, trailer) = bytes.split_at(body_len);
    let mut stored = [0u8; CHECKSUM_BYTES];
    stored.copy_from_slice(trailer);
    let stored = u32::from_be_bytes(stored);
    let computed = crc32(body);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    Ok(body)
}

fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

impl StoredRecord {
    pub fn encode(&self) -> Vec<u8> {
        let home = self.home_region.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(32 + home.len() + self.view_json.len() + self.doc.len());
        out.push(RECORD_MAGIC);
        out.push(RECORD_FORMAT);
        out.push(u8::from(self.live));
        out.extend_from_slice(&self.version.time_ntp64.to_be_bytes());
        out.extend_from_slice(&self.version.node_hlc_id.to_be_bytes());
        out.extend_from_slice(&(home.len() as u16).to_be_bytes());
        out.extend_from_slice(home.as_bytes());
        out.extend_from_slice(&self.appended_changes.to_be_bytes());
        out.extend_from_slice(&(self.view_json.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.view_json);
        out.extend_from_slice(&(self.doc.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.doc);
        seal(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let body = match bytes {
            [RECORD_MAGIC, RECORD_FORMAT, ..] => unseal(bytes)?,
            [RECORD_MAGIC, RECORD_FORMAT_UNCHECKED, ..] => bytes,
            [RECORD_MAGIC, format, ..] => return Err(format!("unknown record format {format}")),
            [_, ..] => return Err("bad magic byte".into()),
            [] => return Err("empty".into()),
        };
        let mut r = Reader::new(body);
        r.take(2)?;
        let live = r.u8()? != 0;
        let version = Version {
            time_ntp64: r.u64_be()?,
            node_hlc_id: r.u64_be()?,
        };
        let home_len = r.u16_be()? as usize;
        let home = std::str::from_utf8(r.take(home_len)?)
            .map_err(|_| "home region is not UTF-8".to_string())?;
        let appended_changes = r.u32_be()?;
        let view_len = r.u32_be()? as usize;
        let view_json = r.take(view_len)?.to_vec();
        let doc_len = r.u32_be()? as usize;
        let doc = r.take(doc_len)?.to_vec();
        if !r.is_at_end() {
            return Err("trailing bytes".into());
        }
        Ok(StoredRecord {
            live,
            version,
            home_region: (!home.is_empty()).then(|| home.to_string()),
            view_json,
            doc,
            appended_changes,
        })
    }
}

/// Marks a checksummed log entry. An entry without it starts with its key's length, whose
/// first byte is at most 0x02 (keys are at most 512 bytes), so the two cannot be confused.
const LOG_ENTRY_MARKER: u8 = 0xC5;

/// One entry of an origin's change log.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredChange {
    pub key: String,
    pub change: Vec<u8>,
}

impl StoredChange {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.key.len() + self.change.len() + CHECKSUM_BYTES);
        out.push(LOG_ENTRY_MARKER);
        out.extend_from_slice(&(self.key.len() as u16).to_be_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&self.change);
        seal(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(log_entry_body(bytes)?);
        let len = r.u16_be()? as usize;
        let key = std::str::from_utf8(r.take(len)?)
            .map_err(|_| "log entry key is not UTF-8".to_string())?
            .to_string();
        Ok(StoredChange {
            key,
            change: r.rest().to_vec(),
        })
    }
}

/// A log entry's key length, key and change, its checksum verified (for a checksummed entry).
pub(super) fn log_entry_body(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes {
        [LOG_ENTRY_MARKER, ..] => Ok(&unseal(bytes)?[1..]),
        _ => Ok(bytes),
    }
}

/// The stored answer to a write carrying an `Idempotency-Key`.
#[derive(Clone, Debug, PartialEq)]
pub struct IdempotentAnswer {
    /// SHA-256 over method, record key and body: a retry must match it.
    pub fingerprint: [u8; 32],
    pub created_unix_ms: u64,
    pub status: u16,
    pub body: Vec<u8>,
}

impl IdempotentAnswer {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(42 + self.body.len());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.created_unix_ms.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(r.take(32)?);
        let created_unix_ms = r.u64_be()?;
        let status = r.u16_be()?;
        Ok(IdempotentAnswer {
            fingerprint,
            created_unix_ms,
            status,
            body: r.rest().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests;
