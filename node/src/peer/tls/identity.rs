//! Node identity: the SPIFFE URI a node certificate carries, compared exactly with the one the
//! topology gives the node.
//!
//! Architecture invariant: the exact string comparison with the topology decides; parsing the
//! URI only explains a refusal.

use std::fmt;

use crate::config::Topology;

/// Why a certificate does not identify a node of the topology.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the certificate is not trusted by the cluster CA: {0}")]
    Untrusted(String),
    #[error(
        "the certificate has {0} URI subject alternative names; a node certificate has exactly one"
    )]
    UriCount(usize),
    #[error("URI {0:?} is not a node identity spiffe://<cluster>/region/<region>/node/<node-id>")]
    NotNodeIdentity(String),
    #[error("URI {uri:?} belongs to trust domain {found:?}, not to cluster {expected:?}")]
    WrongCluster {
        uri: String,
        found: String,
        expected: String,
    },
    #[error("URI {uri:?} names node {node:?}, which the topology does not declare")]
    UnknownNode { uri: String, node: String },
    #[error(
        "URI {uri:?} places node {node:?} in region {claimed:?}, but the topology puts it in {actual:?}"
    )]
    WrongRegion {
        uri: String,
        node: String,
        claimed: String,
        actual: String,
    },
    #[error("the peer is {found:?}, but node {expected:?} was dialled")]
    UnexpectedPeer { expected: String, found: String },
    #[error("the dialled node is not declared in the topology")]
    UndeclaredPeer,
}

/// Who is at the other end of an authenticated link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node_id: String,
    pub region: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (region {})", self.node_id, self.region)
    }
}

/// The node of `topology` that the certificate `der` identifies, checked exactly.
pub fn identity_of(der: &[u8], topology: &Topology) -> Result<PeerIdentity, IdentityError> {
    let uri = single_uri_san(der)?;
    // The exact comparison below is what decides; the parse only explains a refusal.
    if let Some(node) = topology.node_by_spiffe_id(&uri) {
        return Ok(PeerIdentity {
            node_id: node.id.clone(),
            region: node.region.clone(),
        });
    }
    let Some((cluster, region, node_id)) = parse_spiffe(&uri) else {
        return Err(IdentityError::NotNodeIdentity(uri));
    };
    if cluster != topology.cluster {
        return Err(IdentityError::WrongCluster {
            found: cluster.to_string(),
            expected: topology.cluster.clone(),
            uri,
        });
    }
    match topology.node(node_id) {
        None => Err(IdentityError::UnknownNode {
            node: node_id.to_string(),
            uri,
        }),
        Some(node) if node.region != region => Err(IdentityError::WrongRegion {
            node: node_id.to_string(),
            claimed: region.to_string(),
            actual: node.region.clone(),
            uri,
        }),
        // Same parts but not the same string: e.g. an encoding the parse glossed over.
        Some(_) => Err(IdentityError::NotNodeIdentity(uri)),
    }
}

pub(crate) fn single_uri_san(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    // A duplicated SAN extension is an error here, not a second chance to match.
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => Ok((*uri).to_string()),
        _ => Err(IdentityError::UriCount(uris.len())),
    }
}

fn parse_spiffe(uri: &str) -> Option<(&str, &str, &str)> {
    let rest = uri.strip_prefix("spiffe://")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [cluster, "region", region, "node", node] => Some((cluster, region, node)),
        _ => None,
    }
}

/// A failed chain check as the reason of a refusal (webpki's bare "UnknownIssuer" does not
/// say which check failed).
pub(super) fn untrusted_reason(err: rustls::Error) -> IdentityError {
    match err {
        rustls::Error::InvalidCertificate(e) => IdentityError::Untrusted(e.to_string()),
        other => IdentityError::Untrusted(other.to_string()),
    }
}
