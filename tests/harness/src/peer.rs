//! What a fake peer says: tests that play a node towards a real one.

use std::time::{SystemTime, UNIX_EPOCH};

use meridian_replication::version::ntp64_from_ms;
use meridian_replication::wire::{Message, PROTOCOL_VERSION};

/// The Hello a node `node` of `region` in `cluster` opens a link with, at this build's
/// protocol version, with an empty frontier (it has seen nothing yet) and this machine's
/// clock (so the real node does not take the fake peer for one whose clock is off).
pub fn hello(cluster: &str, node: &str, region: &str) -> Message {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        cluster: cluster.into(),
        node: node.into(),
        region: region.into(),
        frontier: vec![],
        clock_ntp64: ntp64_from_ms(unix_ms_now()),
    }
}

/// Milliseconds since the Unix epoch by this machine's wall clock.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
