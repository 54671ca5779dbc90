//! Keys of the QUIC endpoint that must outlive the process (F12): the stateless-reset key and
//! the connection-ID key, both derived from the node's private key.
//!
//! When a node restarts, its peers still hold connections to the dead process. The new process
//! answers their packets with a stateless reset, which a peer accepts only if it carries the
//! token the old process announced for that connection ID: HMAC(reset key, connection ID). And
//! quinn sends a reset only for a connection ID its generator recognises as its own. With both
//! keys derived from the node's key, a restart ends the stale connections at the peers' next
//! packet instead of at their idle timeout.
//!
//! Architecture invariant: derived one way (HMAC-SHA256, keyed by the private key, a distinct
//! label per use), so neither key says anything of the private key or of the other.

use std::sync::Arc;

use ring::hmac;

const RESET_KEY_LABEL: &[u8] = b"meridian peer endpoint: stateless reset key v1";
const CID_KEY_LABEL: &[u8] = b"meridian peer endpoint: connection id key v1";
/// At most one stateless reset per this interval.
const MIN_RESET_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

/// The endpoint keys of one node.
#[derive(Clone)]
pub(crate) struct EndpointKeys {
    reset: [u8; 32],
    cid: u64,
}

impl EndpointKeys {
    /// From the DER bytes of the node's private key.
    pub(crate) fn derive(private_key_der: &[u8]) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, private_key_der);
        let mut reset = [0u8; 32];
        reset.copy_from_slice(hmac::sign(&root, RESET_KEY_LABEL).as_ref());
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&hmac::sign(&root, CID_KEY_LABEL).as_ref()[..8]);
        EndpointKeys {
            reset,
            cid: u64::from_le_bytes(cid),
        }
    }

    /// The endpoint configuration: stable reset key and connection-ID generator.
    pub(crate) fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut config =
            quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &self.reset)));
        // Peers restarting or probing together get a reset each (quinn's default is one per
        // 20 ms per endpoint). Resets stay smaller than the packet that caused them, and the
        // keyed generator answers only connection IDs this node issued, which is what
        // quinn's documentation names as the mitigation for a short interval.
        config.min_reset_interval(MIN_RESET_INTERVAL);
        let cid_key = self.cid;
        config.cid_generator(move || -> Box<dyn quinn::ConnectionIdGenerator> {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        config
    }
}

impl std::fmt::Debug for EndpointKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndpointKeys(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator;

    #[test]
    fn keys_are_stable_per_private_key_and_differ_between_keys_and_uses() {
        let a = EndpointKeys::derive(b"node key a");
        let again = EndpointKeys::derive(b"node key a");
        let b = EndpointKeys::derive(b"node key b");
        assert_eq!(a.reset, again.reset);
        assert_eq!(a.cid, again.cid);
        assert_ne!(a.reset, b.reset);
        assert_ne!(a.cid, b.cid);
        assert_ne!(&a.reset[..8], &a.cid.to_le_bytes()[..]);
        // A connection ID issued before a restart is recognised after it, so the new process
        // answers it with a reset; another node's generator does not recognise it.
        let mut before = quinn_proto::HashedConnectionIdGenerator::from_key(a.cid);
        let after = quinn_proto::HashedConnectionIdGenerator::from_key(again.cid);
        let other = quinn_proto::HashedConnectionIdGenerator::from_key(b.cid);
        let cid = before.generate_cid();
        assert!(after.validate(&cid).is_ok());
        assert!(other.validate(&cid).is_err());
    }
}
