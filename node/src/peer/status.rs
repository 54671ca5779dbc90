//! What the replication links report about each peer, for `/v1/status`.
//!
//! Architecture invariant: only the link driver writes this table; readers take a snapshot.
//! A link's connected state (and its `meridian_peer_up` gauge) belongs to the newest link of
//! that peer and direction: the teardown of an older one never overwrites it (F11).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;

use crate::config::Topology;
use crate::sync::lock;

/// Which of a peer's two links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// We receive the peer's changes (we dialled it).
    Inbound,
    /// We send ours (it dialled us).
    Outbound,
}

/// The incarnation of one link of a peer, handed out when it comes up: only the newest one
/// may mark the link down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the link must be marked down with its generation"]
pub struct LinkGeneration(u64);

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
    /// The generation of the newest link per direction.
    #[serde(skip)]
    inbound_generation: u64,
    #[serde(skip)]
    outbound_generation: u64,
}

impl PeerStatus {
    fn generation_mut(&mut self, direction: Direction) -> &mut u64 {
        match direction {
            Direction::Inbound => &mut self.inbound_generation,
            Direction::Outbound => &mut self.outbound_generation,
        }
    }

    fn set_connected(&mut self, direction: Direction, since_unix_ms: Option<u64>) {
        let (connected, since) = match direction {
            Direction::Inbound => (&mut self.inbound_connected, &mut self.inbound_since_unix_ms),
            Direction::Outbound => (
                &mut self.outbound_connected,
                &mut self.outbound_since_unix_ms,
            ),
        };
        *connected = since_unix_ms.is_some();
        *since = since_unix_ms;
    }
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

    /// A new link of `peer` in `direction` is established at `now_unix_ms`: it is connected,
    /// `up` reads 1, and this link is the newest.
    pub fn link_up(
        &self,
        peer: &str,
        direction: Direction,
        now_unix_ms: u64,
        up: &Gauge,
    ) -> LinkGeneration {
        let mut peers = lock(&self.peers);
        let Some(status) = peers.get_mut(peer) else {
            return LinkGeneration(0);
        };
        let generation = status.generation_mut(direction);
        *generation += 1;
        let current = LinkGeneration(*generation);
        status.set_connected(direction, Some(now_unix_ms));
        // Under the table's lock, so a concurrent teardown cannot interleave.
        up.set(1);
        current
    }

    /// The link `generation` of `peer` in `direction` ended: disconnected, `up` 0, unless a
    /// newer link came up meanwhile. Whether it was the newest.
    pub fn link_down(
        &self,
        peer: &str,
        direction: Direction,
        generation: LinkGeneration,
        up: &Gauge,
    ) -> bool {
        let mut peers = lock(&self.peers);
        let Some(status) = peers.get_mut(peer) else {
            return false;
        };
        if *status.generation_mut(direction) != generation.0 {
            return false;
        }
        status.set_connected(direction, None);
        up.set(0);
        true
    }

    /// [`PeerTable::link_up`], marked down when the returned guard is dropped: however the
    /// link's task ends, early returns included.
    pub fn link_up_until_dropped(
        self: &Arc<Self>,
        peer: &str,
        direction: Direction,
        now_unix_ms: u64,
        up: Gauge,
    ) -> LinkUp {
        let generation = self.link_up(peer, direction, now_unix_ms, &up);
        LinkUp {
            table: self.clone(),
            peer: peer.to_string(),
            direction,
            generation,
            up,
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

/// One established link; marks it down when dropped (see [`PeerTable::link_down`]).
pub struct LinkUp {
    table: Arc<PeerTable>,
    peer: String,
    direction: Direction,
    generation: LinkGeneration,
    up: Gauge,
}

impl Drop for LinkUp {
    fn drop(&mut self) {
        self.table
            .link_down(&self.peer, self.direction, self.generation, &self.up);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::tls::tests::topology_in;

    #[test]
    fn the_teardown_of_a_stale_link_leaves_the_newer_one_connected() {
        let dir = tempfile::tempdir().unwrap();
        let topology = topology_in(dir.path(), "certs/ca.pem");
        let table = PeerTable::new(&topology, "eu-west-1");
        let up = Gauge::default();
        let old = table.link_up("us-east-1", Direction::Outbound, 1_000, &up);
        let new = table.link_up("us-east-1", Direction::Outbound, 2_000, &up);
        // The old link (to a process that died) ends after the new one came up.
        assert!(!table.link_down("us-east-1", Direction::Outbound, old, &up));
        let status = &table.snapshot()["us-east-1"];
        assert!(status.outbound_connected);
        assert_eq!(status.outbound_since_unix_ms, Some(2_000));
        assert_eq!(up.get(), 1);
        // The other direction is its own.
        assert!(!status.inbound_connected);
        // The newest link's own teardown does mark it down.
        assert!(table.link_down("us-east-1", Direction::Outbound, new, &up));
        let status = &table.snapshot()["us-east-1"];
        assert!(!status.outbound_connected);
        assert_eq!(status.outbound_since_unix_ms, None);
        assert_eq!(up.get(), 0);
        // A node that is not a peer changes nothing.
        let stranger = table.link_up("nowhere-1", Direction::Inbound, 3_000, &up);
        assert!(!table.link_down("nowhere-1", Direction::Inbound, stranger, &up));
        assert_eq!(up.get(), 0);
    }
}
