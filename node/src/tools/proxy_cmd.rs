//! `meridian proxy`: the link emulator ([`meridian_emulator`]) on a topology file's
//! `[[links]]`. The emulator knows no topology; this module is the one place that turns a
//! [`Topology`] into [`LinkSpec`]s, each `[[links]]` entry relayed to its `to` node's peer
//! address.

use std::future::Future;
use std::net::SocketAddr;

use meridian_emulator::{Emulator, EmulatorOptions, LinkSpec, ProxyError};

use crate::config::Topology;

/// Typed errors of running the emulator on a topology.
#[derive(Debug, thiserror::Error)]
pub enum ProxyCmdError {
    #[error("the topology routes no link through an emulator (no [[links]] entry)")]
    NoLinks,
    #[error("link {from} -> {to}: node {node:?} is not declared in the topology")]
    UnknownNode {
        from: String,
        to: String,
        node: String,
    },
    #[error(transparent)]
    Emulator(#[from] ProxyError),
}

impl ProxyCmdError {
    /// Whether the topology itself is at fault (exit 2) rather than the machine (exit 1).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            ProxyCmdError::NoLinks
                | ProxyCmdError::UnknownNode { .. }
                | ProxyCmdError::Emulator(ProxyError::NoLinks)
        )
    }
}

/// The links of a topology: each `[[links]]` entry, relayed to its `to` node's peer address.
pub fn link_specs(topology: &Topology) -> Result<Vec<LinkSpec>, ProxyCmdError> {
    if topology.links.is_empty() {
        return Err(ProxyCmdError::NoLinks);
    }
    topology
        .links
        .iter()
        .map(|l| {
            for node in [&l.from, &l.to] {
                if topology.node(node).is_none() {
                    return Err(ProxyCmdError::UnknownNode {
                        from: l.from.clone(),
                        to: l.to.clone(),
                        node: node.clone(),
                    });
                }
            }
            let upstream =
                topology
                    .node(&l.to)
                    .map(|n| n.peer)
                    .ok_or_else(|| ProxyCmdError::UnknownNode {
                        from: l.from.clone(),
                        to: l.to.clone(),
                        node: l.to.clone(),
                    })?;
            Ok(LinkSpec {
                from: l.from.clone(),
                to: l.to.clone(),
                via: l.via,
                upstream,
            })
        })
        .collect()
}

/// Starts a UDP relay for every `[[links]]` entry of `topology`.
pub async fn start(
    topology: &Topology,
    options: EmulatorOptions,
) -> Result<Emulator, ProxyCmdError> {
    Ok(Emulator::start_links(link_specs(topology)?, options).await?)
}

/// `meridian proxy --topology F --control ADDR`: the emulator on `topology`'s links and its
/// control API on `control`, until `shutdown` (see [`meridian_emulator::run`]).
pub async fn run(
    topology: &Topology,
    control: SocketAddr,
    options: EmulatorOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyCmdError> {
    let links = link_specs(topology)?;
    Ok(meridian_emulator::run(links, control, options, shutdown).await?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Link;
    use crate::testing;

    fn topology() -> Topology {
        let text = testing::topology_text(
            "demo",
            "certs/ca.pem",
            &[("eu-1", "eu-west"), ("us-1", "us-east")],
        )
        .link("eu-1", "us-1", testing::addr(9001));
        testing::parse(&text, Path::new("."))
    }

    #[test]
    fn each_link_is_relayed_to_its_to_nodes_peer_address() {
        let specs = link_specs(&topology()).expect("links");
        assert_eq!(
            specs,
            vec![LinkSpec {
                from: "eu-1".into(),
                to: "us-1".into(),
                via: "127.0.0.1:9001".parse().expect("addr"),
                upstream: "127.0.0.1:7201".parse().expect("addr"),
            }]
        );
    }

    #[test]
    fn no_links_and_unknown_nodes_are_invalid_input_with_todays_messages() {
        let mut plain = topology();
        plain.links.clear();
        let e = link_specs(&plain).expect_err("no links");
        assert!(e.is_invalid_input());
        assert_eq!(
            e.to_string(),
            "the topology routes no link through an emulator (no [[links]] entry)"
        );

        let mut stray = topology();
        stray.links.push(Link {
            from: "eu-1".into(),
            to: "ap-1".into(),
            via: "127.0.0.1:9002".parse().expect("addr"),
        });
        let e = link_specs(&stray).expect_err("unknown node");
        assert!(e.is_invalid_input());
        assert_eq!(
            e.to_string(),
            r#"link eu-1 -> ap-1: node "ap-1" is not declared in the topology"#
        );
    }
}
