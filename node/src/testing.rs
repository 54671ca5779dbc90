//! Topologies for unit tests: written with the harness's builder and parsed, never served
//! (their addresses are placeholders on loopback that nothing binds).

use std::net::SocketAddr;
use std::path::Path;

use meridian_harness::TopologyText;

use crate::config::Topology;

/// 127.0.0.1:`port`.
pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Node `id` of `region`, peer port `7n01` and API port `8n01` for the n-th node.
pub fn with_nodes(text: TopologyText, nodes: &[(&str, &str)]) -> TopologyText {
    let mut regions: Vec<&str> = Vec::new();
    for (_, region) in nodes {
        if !regions.contains(region) {
            regions.push(region);
        }
    }
    let text = regions.iter().fold(text, |t, r| t.region(r));
    nodes.iter().zip(1u16..).fold(text, |t, ((id, region), n)| {
        t.node(id, region, addr(7001 + 100 * n), addr(8001 + 100 * n))
    })
}

/// Cluster `cluster` with the CA at `ca` and `nodes` as [`with_nodes`] places them.
pub fn topology_text(cluster: &str, ca: &str, nodes: &[(&str, &str)]) -> TopologyText {
    with_nodes(TopologyText::cluster(cluster).tls(ca), nodes)
}

/// `text` parsed as if it were `dir/topology.toml`.
pub fn parse(text: &TopologyText, dir: &Path) -> Topology {
    Topology::parse(text.as_str(), &dir.join("topology.toml")).expect("valid topology")
}
