//! The encodings of what the tables hold: records, change-log entries, idempotent answers.
//!
//! Every decoder checks lengths before it reads: a corrupt value is an error naming what is
//! corrupt, never a panic.

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
const RECORD_FORMAT: u8 = 1;

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
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        if r.u8()? != RECORD_MAGIC {
            return Err("bad magic byte".into());
        }
        let format = r.u8()?;
        if format != RECORD_FORMAT {
            return Err(format!("unknown record format {format}"));
        }
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

/// One entry of an origin's change log.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredChange {
    pub key: String,
    pub change: Vec<u8>,
}

impl StoredChange {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.key.len() + self.change.len());
        out.extend_from_slice(&(self.key.len() as u16).to_be_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&self.change);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
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
