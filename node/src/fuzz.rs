//! Fuzz targets for what a node parses from operators and clients: the topology file, record
//! keys (percent-decoded as the HTTP layer does) and request bodies.
//!
//! Under `cargo test` each runs its corpus (`__fuzz__/<target>/corpus`) and random inputs for
//! `BOLERO_RANDOM_TEST_TIME_MS` (1 s by default; CI sets more); `cargo bolero test
//! fuzz::<target> -p meridian-node` runs it coverage-guided. Nothing may panic.

use std::path::Path;

use meridian_replication::record::{MAX_DEPTH, json_depth};

use crate::config::Topology;
use crate::engine::WriteOp;
use crate::ops::{MAX_KEY_BYTES, Op, parse_write, validate_key};

#[test]
fn topology_file() {
    bolero::check!().for_each(|bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        // Valid or a list of problems with positions; a valid one names its own nodes.
        if let Ok(topology) = Topology::parse(&text, Path::new("fuzz/topology.toml")) {
            for node in &topology.nodes {
                assert!(topology.node(&node.id).is_some());
            }
        }
    });
}

#[test]
fn record_key() {
    bolero::check!().for_each(|bytes: &[u8]| {
        let raw = String::from_utf8_lossy(bytes);
        let Ok(decoded) = percent_encoding::percent_decode_str(&raw).decode_utf8() else {
            return;
        };
        if validate_key(&decoded).is_ok() {
            assert!(!decoded.is_empty() && decoded.len() <= MAX_KEY_BYTES);
            assert!(!decoded.chars().any(char::is_control));
        }
    });
}

#[test]
fn request_body() {
    bolero::check!().for_each(|bytes: &[u8]| {
        for op in [Op::Put, Op::Patch, Op::Incr, Op::Delete] {
            match parse_write(op, bytes) {
                Ok(WriteOp::Put(value) | WriteOp::Patch(value)) => {
                    let depth = json_depth(&serde_json::Value::Object(value));
                    assert!(depth <= MAX_DEPTH, "accepted a value {depth} deep");
                }
                Ok(_) => {}
                Err(e) => assert_eq!(e.status, 400, "{}", e.message),
            }
        }
    });
}
