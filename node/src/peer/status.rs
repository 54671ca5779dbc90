//! What the replication links report about each peer, for `/v1/status`.
//!
//! Architecture invariant: only the link driver writes this table; readers take a snapshot.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::config::Topology;
use crate::sync::lock;

/// One peer as the replication links see it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PeerStatus {
    pub region: String,
    /// We receive the peer's changes (we dialled it).
    pub inbound_connected: bool,
    pub inbound_since_unix_ms: Option<u64>,
    /// We send our changes to the peer (it dialled us).
    pub outbound_connected: bool,
    pub outbound_since_unix_ms: Option<u64>,
    pub changes_applied: u64,
    pub changes_sent: u64,
    /// Origin HLC of the newest change applied from this link vs when it was applied here.
    pub lag_ms: Option<u64>,
    pub last_applied_unix_ms: Option<u64>,
    /// The peer's acknowledged frontier (what it holds of what we may send it), per origin.
    pub peer_frontier: std::collections::BTreeMap<String, String>,
    pub drift_refusals: u64,
    /// Changes of records our region may not hold that this peer sent: it misbehaves.
    pub residency_violations: u64,
    pub last_error: Option<String>,
}

/// Every peer of a node and its [`PeerStatus`].
pub struct PeerTable {
    peers: Mutex<BTreeMap<String, PeerStatus>>,
}

impl PeerTable {
    /// One entry per peer of `node_id` in `topology`, all disconnected.
    pub fn new(topology: &Topology, node_id: &str) -> Self {
        let peers = topology
            .peers_of(node_id)
            .map(|n| {
                let status = PeerStatus {
                    region: n.region.clone(),
                    ..PeerStatus::default()
                };
                (n.id.clone(), status)
            })
            .collect();
        PeerTable {
            peers: Mutex::new(peers),
        }
    }

    /// Changes what is known of `peer`; a node that is not a peer is ignored.
    pub fn update(&self, peer: &str, f: impl FnOnce(&mut PeerStatus)) {
        if let Some(status) = lock(&self.peers).get_mut(peer) {
            f(status);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, PeerStatus> {
        lock(&self.peers).clone()
    }

    /// The peers with a link up in either direction.
    pub fn connected(&self) -> Vec<String> {
        lock(&self.peers)
            .iter()
            .filter(|(_, s)| s.inbound_connected || s.outbound_connected)
            .map(|(node, _)| node.clone())
            .collect()
    }
}
