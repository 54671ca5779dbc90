//! What a fake peer says: tests that play a node towards a real one.

use meridian_replication::wire::{Message, PROTOCOL_VERSION};

/// The Hello a node `node` of `region` in `cluster` opens a link with, at this build's
/// protocol version and with an empty frontier (it has seen nothing yet).
pub fn hello(cluster: &str, node: &str, region: &str) -> Message {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        cluster: cluster.into(),
        node: node.into(),
        region: region.into(),
        frontier: vec![],
    }
}
