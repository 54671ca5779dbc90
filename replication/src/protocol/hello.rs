//! The handshake: the first message on a link, checked by both ends.

use super::ProtocolError;
use crate::wire::{FrontierEntry, Message};

/// Check the peer's `Hello` against who we are and who the peer authenticated as.
pub fn check_hello(
    msg: &Message,
    our_cluster: &str,
    authenticated_node: &str,
) -> Result<Vec<FrontierEntry>, ProtocolError> {
    match msg {
        Message::Hello {
            protocol,
            cluster,
            node,
            frontier,
            ..
        } => {
            if *protocol != crate::wire::PROTOCOL_VERSION {
                return Err(ProtocolError::Version {
                    got: *protocol,
                    ours: crate::wire::PROTOCOL_VERSION,
                });
            }
            if cluster != our_cluster {
                return Err(ProtocolError::Cluster {
                    got: cluster.clone(),
                    ours: our_cluster.to_string(),
                });
            }
            if node != authenticated_node {
                return Err(ProtocolError::Identity {
                    claimed: node.clone(),
                    authenticated: authenticated_node.to_string(),
                });
            }
            Ok(frontier.clone())
        }
        Message::Batch { .. } => Err(ProtocolError::UnexpectedMessage("batch")),
        Message::Ack { .. } => Err(ProtocolError::UnexpectedMessage("ack")),
        Message::Close { .. } => Err(ProtocolError::UnexpectedMessage("close")),
        Message::Forward { .. } | Message::Forwarded { .. } => {
            Err(ProtocolError::UnexpectedMessage("forward"))
        }
    }
}
