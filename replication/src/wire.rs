//! The replication protocol's messages and their binary encoding.
//!
//! A link carries length-prefixed frames ([`frame`]) on one QUIC stream. Every count and length is checked
//! against a limit before anything is allocated, so a hostile or broken peer cannot make a node
//! allocate without bound or panic.

pub mod frame;

use crate::codec::{Reader, Truncated};

/// Bumped on any incompatible change; both sides must agree. 2: changes edit the flat record
/// layout (record format 2), which a format-1 document cannot merge with. 3: `Hello` and `Ack`
/// carry the sender's clock reading.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest frame accepted (a batch of changes).
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Changes in one batch at most.
pub const MAX_BATCH_CHANGES: usize = 2048;
/// Frontier entries in one message at most.
pub const MAX_FRONTIER_ENTRIES: usize = 4096;
/// Longest name (node, region, cluster, class) or key on the wire.
pub const MAX_NAME_BYTES: usize = 512;
/// Largest single automerge change accepted.
pub const MAX_CHANGE_BYTES: usize = 4 << 20;
/// Longest close reason.
pub const MAX_REASON_BYTES: usize = 1024;

/// For one origin node and one residency class, the newest change (HLC time) held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontierEntry {
    pub origin: String,
    /// Residency class: `""` for global records, else the name of the rule that pins them.
    pub class: String,
    pub hlc: u64,
}

/// One change as it travels between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireChange {
    pub origin: String,
    pub hlc: u64,
    pub key: String,
    pub change: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message each way: who we are and, from the subscriber, what it holds.
    Hello {
        protocol: u16,
        cluster: String,
        node: String,
        region: String,
        frontier: Vec<FrontierEntry>,
        /// The sender's physical clock when it sent this (see [`Message::Ack`]).
        clock_ntp64: u64,
    },
    /// Changes after the subscriber's frontier, and how far the sender vouches that the
    /// subscriber is complete once it has applied them.
    Batch {
        seq: u64,
        changes: Vec<WireChange>,
        progress: Vec<FrontierEntry>,
    },
    /// The subscriber applied batch `seq` durably.
    Ack {
        seq: u64,
        /// The sender's physical clock (NTP64, the wall clock its HLC reads, not a stamp) when
        /// it sent this, so that each end can estimate how far its clock is from its peers';
        /// 0 when unknown, which says nothing.
        clock_ntp64: u64,
    },
    /// The sender of this message closes the link, and says why.
    Close { reason: String },
    /// A client request for a record this node's region may not hold, carried to a node of a
    /// region that may (residency `foreign = "forward"`). Sent on its own stream.
    Forward {
        method: ForwardMethod,
        key: String,
        /// Empty when the client sent no `Idempotency-Key`.
        idempotency_key: String,
        body: Vec<u8>,
    },
    /// The answer to a `Forward`, from the node that served it.
    Forwarded {
        status: u16,
        region: String,
        node: String,
        body: Vec<u8>,
    },
}

/// The client operation a `Forward` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMethod {
    Get,
    Put,
    Patch,
    Incr,
    Delete,
}

impl ForwardMethod {
    fn code(self) -> u8 {
        match self {
            ForwardMethod::Get => 0,
            ForwardMethod::Put => 1,
            ForwardMethod::Patch => 2,
            ForwardMethod::Incr => 3,
            ForwardMethod::Delete => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => ForwardMethod::Get,
            1 => ForwardMethod::Put,
            2 => ForwardMethod::Patch,
            3 => ForwardMethod::Incr,
            4 => ForwardMethod::Delete,
            _ => return None,
        })
    }
}

/// Largest forwarded request or answer body (the API's body limit, plus room for the answer).
pub const MAX_FORWARD_BODY_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message truncated: wanted {wanted} bytes at offset {at}")]
    Truncated { wanted: usize, at: usize },
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("{what} is {len}, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

const T_HELLO: u8 = 1;
const T_BATCH: u8 = 2;
const T_ACK: u8 = 3;
const T_CLOSE: u8 = 4;
const T_FORWARD: u8 = 5;
const T_FORWARDED: u8 = 6;

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64);
        self.encode_into(&mut w);
        w
    }

    /// Appends the encoding to `w` (a frame encodes its header and body into one buffer).
    pub fn encode_into(&self, w: &mut Vec<u8>) {
        match self {
            Message::Hello {
                protocol,
                cluster,
                node,
                region,
                frontier,
                clock_ntp64,
            } => {
                w.push(T_HELLO);
                w.extend_from_slice(&protocol.to_be_bytes());
                put_str(w, cluster);
                put_str(w, node);
                put_str(w, region);
                put_frontier(w, frontier);
                w.extend_from_slice(&clock_ntp64.to_be_bytes());
            }
            Message::Batch {
                seq,
                changes,
                progress,
            } => {
                w.push(T_BATCH);
                w.extend_from_slice(&seq.to_be_bytes());
                w.extend_from_slice(&(changes.len() as u32).to_be_bytes());
                for c in changes {
                    put_str(w, &c.origin);
                    w.extend_from_slice(&c.hlc.to_be_bytes());
                    put_str(w, &c.key);
                    w.extend_from_slice(&(c.change.len() as u32).to_be_bytes());
                    w.extend_from_slice(&c.change);
                }
                put_frontier(w, progress);
            }
            Message::Ack { seq, clock_ntp64 } => {
                w.push(T_ACK);
                w.extend_from_slice(&seq.to_be_bytes());
                w.extend_from_slice(&clock_ntp64.to_be_bytes());
            }
            Message::Close { reason } => {
                w.push(T_CLOSE);
                let cut: String = reason.chars().take(MAX_REASON_BYTES / 4).collect();
                put_str(w, &cut);
            }
            Message::Forward {
                method,
                key,
                idempotency_key,
                body,
            } => {
                w.push(T_FORWARD);
                w.push(method.code());
                put_str(w, key);
                put_str(w, idempotency_key);
                w.extend_from_slice(&(body.len() as u32).to_be_bytes());
                w.extend_from_slice(body);
            }
            Message::Forwarded {
                status,
                region,
                node,
                body,
            } => {
                w.push(T_FORWARDED);
                w.extend_from_slice(&status.to_be_bytes());
                put_str(w, region);
                put_str(w, node);
                w.extend_from_slice(&(body.len() as u32).to_be_bytes());
                w.extend_from_slice(body);
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(WireError::TooLarge {
                what: "frame",
                len: bytes.len(),
                limit: MAX_FRAME_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let msg = match r.u8()? {
            T_HELLO => Message::Hello {
                protocol: r.u16_be()?,
                cluster: get_str(&mut r, "cluster", MAX_NAME_BYTES)?,
                node: get_str(&mut r, "node", MAX_NAME_BYTES)?,
                region: get_str(&mut r, "region", MAX_NAME_BYTES)?,
                frontier: get_frontier(&mut r)?,
                clock_ntp64: r.u64_be()?,
            },
            T_BATCH => {
                let seq = r.u64_be()?;
                let count = get_len32(&mut r, "batch change count", MAX_BATCH_CHANGES)?;
                let mut changes = Vec::with_capacity(count);
                for _ in 0..count {
                    let origin = get_str(&mut r, "origin", MAX_NAME_BYTES)?;
                    let hlc = r.u64_be()?;
                    let key = get_str(&mut r, "key", MAX_NAME_BYTES)?;
                    let len = get_len32(&mut r, "change", MAX_CHANGE_BYTES)?;
                    let change = r.take(len)?.to_vec();
                    changes.push(WireChange {
                        origin,
                        hlc,
                        key,
                        change,
                    });
                }
                Message::Batch {
                    seq,
                    changes,
                    progress: get_frontier(&mut r)?,
                }
            }
            T_ACK => Message::Ack {
                seq: r.u64_be()?,
                clock_ntp64: r.u64_be()?,
            },
            T_CLOSE => Message::Close {
                reason: get_str(&mut r, "close reason", MAX_REASON_BYTES)?,
            },
            T_FORWARD => {
                let code = r.u8()?;
                let method = ForwardMethod::from_code(code).ok_or(WireError::UnknownType(code))?;
                Message::Forward {
                    method,
                    key: get_str(&mut r, "key", MAX_NAME_BYTES)?,
                    idempotency_key: get_str(&mut r, "idempotency key", MAX_NAME_BYTES)?,
                    body: get_body(&mut r)?,
                }
            }
            T_FORWARDED => Message::Forwarded {
                status: r.u16_be()?,
                region: get_str(&mut r, "region", MAX_NAME_BYTES)?,
                node: get_str(&mut r, "node", MAX_NAME_BYTES)?,
                body: get_body(&mut r)?,
            },
            other => return Err(WireError::UnknownType(other)),
        };
        if !r.is_at_end() {
            return Err(WireError::Trailing(r.remaining()));
        }
        Ok(msg)
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    // Names and keys are validated to be short long before they reach the wire; cutting here
    // only guards the length prefix.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    w.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    w.extend_from_slice(bytes);
}

fn put_frontier(w: &mut Vec<u8>, entries: &[FrontierEntry]) {
    w.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        put_str(w, &e.origin);
        put_str(w, &e.class);
        w.extend_from_slice(&e.hlc.to_be_bytes());
    }
}

impl From<Truncated> for WireError {
    fn from(e: Truncated) -> Self {
        WireError::Truncated {
            wanted: e.wanted,
            at: e.at,
        }
    }
}

/// A name or key: a `u16` length checked against `limit` before the bytes are read.
fn get_str(r: &mut Reader<'_>, what: &'static str, limit: usize) -> Result<String, WireError> {
    let len = usize::from(r.u16_be()?);
    if len > limit {
        return Err(WireError::TooLarge { what, len, limit });
    }
    std::str::from_utf8(r.take(len)?)
        .map(str::to_string)
        .map_err(|_| WireError::NotUtf8(what))
}

/// A `u32` count or length, refused above `limit` before anything is allocated for it.
fn get_len32(r: &mut Reader<'_>, what: &'static str, limit: usize) -> Result<usize, WireError> {
    let len = r.u32_be()? as usize;
    if len > limit {
        return Err(WireError::TooLarge { what, len, limit });
    }
    Ok(len)
}

fn get_body(r: &mut Reader<'_>) -> Result<Vec<u8>, WireError> {
    let len = get_len32(r, "forwarded body", MAX_FORWARD_BODY_BYTES)?;
    Ok(r.take(len)?.to_vec())
}

fn get_frontier(r: &mut Reader<'_>) -> Result<Vec<FrontierEntry>, WireError> {
    let count = get_len32(r, "frontier entry count", MAX_FRONTIER_ENTRIES)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(FrontierEntry {
            origin: get_str(r, "origin", MAX_NAME_BYTES)?,
            class: get_str(r, "class", MAX_NAME_BYTES)?,
            hlc: r.u64_be()?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        let f = FrontierEntry {
            origin: "eu-1".into(),
            class: "".into(),
            hlc: 7,
        };
        vec![
            Message::Hello {
                protocol: PROTOCOL_VERSION,
                cluster: "demo".into(),
                node: "eu-1".into(),
                region: "eu-west".into(),
                frontier: vec![f.clone()],
                clock_ntp64: 1 << 40,
            },
            Message::Batch {
                seq: 3,
                changes: vec![WireChange {
                    origin: "us-1".into(),
                    hlc: 99,
                    key: "users/1".into(),
                    change: vec![1, 2, 3],
                }],
                progress: vec![f],
            },
            Message::Ack {
                seq: 3,
                clock_ntp64: 5,
            },
            Message::Close {
                reason: "cluster mismatch".into(),
            },
            Message::Forward {
                method: ForwardMethod::Patch,
                key: "users/eu/1".into(),
                idempotency_key: "k-1".into(),
                body: b"{\"a\":1}".to_vec(),
            },
            Message::Forwarded {
                status: 200,
                region: "eu-west".into(),
                node: "eu-1".into(),
                body: b"{}".to_vec(),
            },
        ]
    }

    #[test]
    fn messages_round_trip() {
        for m in samples() {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                assert!(Message::decode(&bytes[..cut]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Message::decode(&longer), Err(WireError::Trailing(1)));
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut bytes = vec![T_BATCH];
        bytes.extend_from_slice(&1u64.to_be_bytes());
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Message::decode(&bytes),
            Err(WireError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
        }
    }
}
