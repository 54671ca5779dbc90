//! The two-region topologies of the node tests: regions eu-west and us-east with one node
//! each, `eu-1` (usually the node under test) and `us-1`, the CA in `certs/`.

use std::path::{Path, PathBuf};

use crate::binary::write_certs;
use crate::ports::{free_tcp_port, free_udp_port, loopback};
use crate::topology::{Residency, TopologyText};

/// eu-west and us-east with nodes `eu-1` (API on `eu_api_port`) and `us-1`, the other ports
/// free loopback ports, the CA in `certs/`: the start of every two-region test topology.
pub fn two_region_nodes(cluster: &str, eu_api_port: u16) -> TopologyText {
    TopologyText::cluster(cluster)
        .tls("certs/ca.pem")
        .region("eu-west")
        .region("us-east")
        .node(
            "eu-1",
            "eu-west",
            loopback(free_udp_port()),
            loopback(eu_api_port),
        )
        .node(
            "us-1",
            "us-east",
            loopback(free_udp_port()),
            loopback(free_tcp_port()),
        )
}

/// [`two_region_nodes`] with one `[[links]]` entry per `(from, to)`, each through a free `via`
/// port.
pub fn two_region_topology(cluster: &str, links: &[(&str, &str)]) -> String {
    links
        .iter()
        .fold(
            two_region_nodes(cluster, free_tcp_port()),
            |text, (from, to)| text.link(from, to, loopback(free_udp_port())),
        )
        .into()
}

/// `text` written to `dir/<file_name>`, with certificates for its nodes in `dir/certs`.
pub fn write_with_certs(dir: &Path, file_name: &str, text: &TopologyText) -> PathBuf {
    let path = dir.join(file_name);
    text.write(&path);
    write_certs(&path, &dir.join("certs"));
    path
}

/// `dir/topology.toml` with certificates: [`two_region_nodes`] of cluster `test`, a 500 ms
/// max drift, `users/us/*` pinned to us-east with foreign = reject and `users/ap/*` to
/// us-east with foreign = forward.
pub fn write_topology(dir: &Path, eu_api_port: u16) -> PathBuf {
    let text = two_region_nodes("test", eu_api_port)
        .clock_max_drift_ms(500)
        .residency(&Residency::new("us-only", "users/us/*", "us-east").foreign("reject"))
        .residency(&Residency::new("us-forward", "users/ap/*", "us-east").foreign("forward"));
    write_with_certs(dir, "topology.toml", &text)
}
