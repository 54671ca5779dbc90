//! Fuzz targets for what the replication core decodes from the network: frames and messages.
//!
//! Under `cargo test` each runs its corpus (`__fuzz__/<target>/corpus`) and random inputs for
//! `BOLERO_RANDOM_TEST_TIME_MS` (1 s by default; CI sets more); `cargo bolero test
//! fuzz::<target> -p meridian-replication` runs it coverage-guided. Nothing may panic, and
//! what decodes must encode to itself.

use crate::wire::{Message, frame};

#[test]
fn wire_message() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok(msg) = Message::decode(bytes) {
            let again = Message::decode(&msg.encode());
            assert_eq!(
                again.as_ref(),
                Ok(&msg),
                "a decoded message re-encodes to itself"
            );
        }
    });
}

#[test]
fn wire_frame() {
    bolero::check!().for_each(|bytes: &[u8]| {
        let Some(header) = bytes.first_chunk::<{ frame::HEADER_BYTES }>() else {
            return;
        };
        let body = &bytes[frame::HEADER_BYTES..];
        if let Ok(len) = frame::body_len(*header)
            && len <= body.len()
            && let Ok(msg) = Message::decode(&body[..len])
        {
            let framed = frame::encode(&msg);
            assert_eq!(framed[frame::HEADER_BYTES..], msg.encode()[..]);
        }
    });
}

/// A message of each kind built from the input, which must round-trip; then its encoding
/// damaged (one byte changed, or cut short), which must decode to a message or an error.
#[test]
fn wire_message_damaged() {
    bolero::check!()
        .with_type::<(u8, String, String, u64, Vec<u8>, u16, u8)>()
        .for_each(|(kind, a, b, n, bytes, at, xor)| {
            let entry = crate::wire::FrontierEntry {
                origin: a.clone(),
                class: b.clone(),
                hlc: *n,
            };
            let msg = match kind % 6 {
                0 => Message::Hello {
                    protocol: *at,
                    cluster: a.clone(),
                    node: b.clone(),
                    region: a.clone(),
                    frontier: vec![entry.clone(); usize::from(*xor % 4)],
                    clock_ntp64: *n,
                },
                1 => Message::Batch {
                    seq: *n,
                    changes: vec![crate::wire::WireChange {
                        origin: a.clone(),
                        hlc: *n,
                        key: b.clone(),
                        change: bytes.clone(),
                    }],
                    progress: vec![entry],
                },
                2 => Message::Ack {
                    seq: *n,
                    clock_ntp64: *n,
                },
                3 => Message::Close { reason: a.clone() },
                4 => Message::Forward {
                    method: crate::wire::ForwardMethod::Patch,
                    key: a.clone(),
                    idempotency_key: b.clone(),
                    body: bytes.clone(),
                },
                _ => Message::Forwarded {
                    status: *at,
                    region: a.clone(),
                    node: b.clone(),
                    body: bytes.clone(),
                },
            };
            let encoded = msg.encode();
            if let Ok(decoded) = Message::decode(&encoded) {
                assert_eq!(decoded, msg);
            }
            let mut damaged = encoded.clone();
            let i = usize::from(*at) % damaged.len().max(1);
            if let Some(byte) = damaged.get_mut(i) {
                *byte ^= xor | 1;
            }
            let _ = Message::decode(&damaged);
            let _ = Message::decode(&encoded[..i]);
        });
}
