//! Node identity and the peer transport (SPEC §4): certificates for a topology, and QUIC with
//! mutual TLS 1.3 between nodes.
//!
//! Identity is the certificate's single URI SAN, `spiffe://<cluster>/region/<region>/node/<id>`,
//! compared exactly with the one the topology gives the node: no case folding, no trailing
//! slash, no second URI. Chain checks are delegated to webpki (through rustls); webpki knows
//! nothing of URI names, so the identity checks are ours, in [`identity_of`].
//!
//! Certificates are only checked at the handshake, so session resumption and 0-RTT are off on
//! both sides (a resumed session would keep an identity without re-checking it), and the link
//! driver closes connections older than [`MAX_CONNECTION_AGE`] so that rotated certificates
//! take effect.
//!
//! Only rustls' ring provider is compiled (see `shared/PITFALLS.md`); every config is built with
//! it explicitly, so nothing here depends on the process-wide default.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn};
use rustls::{RootCertStore, SignatureScheme};

use crate::config::Topology;
use crate::observe::health::Certificates;

pub mod expiry;
mod identity;
mod keys;
mod refusals;

pub(crate) use identity::single_uri_san;
use identity::untrusted_reason;
pub use identity::{IdentityError, PeerIdentity, identity_of};
use keys::EndpointKeys;
pub use refusals::CertRefusals;

/// The ALPN protocol of peer links; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"meridian-repl/1";

/// The link driver closes (and redials) connections older than this, so that a rotated or
/// revoked certificate stops being trusted within this bound.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);

/// A link silent this long is closed. Shorter than quinn's 30 s default so that a partition is
/// noticed (and redials start) quickly; keep-alives keep a healthy idle link open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval: several per idle timeout, so one lost packet does not close a link.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// A dial whose handshake has not completed by then is abandoned (and retried with backoff).
/// A dial begun during a partition retransmits its first packet with a doubling timeout
/// (RFC 9002), so without this bound the first packet after the heal could come seconds
/// late, up to the idle timeout; a fresh dial sends at once. Several round trips of the
/// longest links (a handshake is 1–2) plus loss.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);
/// Flow-control window of a whole connection: bounds what a peer may have in flight to us.
pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Flow-control window of one stream.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// How many streams of each direction a peer may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 8;
/// Connection attempts quinn holds for the accept loop before refusing new ones by itself. The
/// loop decides on each at once (see `peer::admission`), so few ever wait.
pub const MAX_INCOMING: usize = 256;
/// Bytes quinn buffers per connection attempt not yet decided on, and for all of them: an
/// Initial flight is a few kilobytes.
pub const INCOMING_BUFFER_BYTES: u64 = 16 * 1024;
pub const INCOMING_BUFFER_TOTAL_BYTES: u64 = 1024 * 1024;

/// Installs ring as the process-wide rustls provider. Idempotent: a provider already installed
/// (by an earlier call, or by a test) is kept.
pub fn install_crypto_provider() {
    // The only error is "a provider is already installed", which is the state we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why certificates could not be generated or loaded, or a peer link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{}: {what} not found; create the cluster certificates with `meridian certs --topology FILE --out DIR`",
        path.display()
    )]
    Missing { what: &'static str, path: PathBuf },
    #[error("{}: cannot read {what}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: {what} is not valid PEM: {message}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("node {0:?} is not declared in the topology")]
    UnknownNode(String),
    #[error("{}: not a usable certificate for node {node:?}: {source}", path.display())]
    OwnIdentity {
        node: String,
        path: PathBuf,
        source: Box<IdentityError>,
    },
    #[error(
        "{}: this node's certificate is not signed by the cluster CA {}: {source}; regenerate it with `meridian certs`",
        cert.display(),
        ca.display()
    )]
    OwnChain {
        cert: PathBuf,
        ca: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration of node {node:?}: {source}")]
    Config { node: String, source: rustls::Error },
    #[error("cannot build the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the crypto provider lacks the cipher suite QUIC needs: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("cannot bind the peer endpoint {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot dial peer {peer:?} at {addr}: {source}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("handshake with peer {peer:?} at {addr} failed: {source}")]
    Handshake {
        peer: String,
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("handshake with peer {peer:?} at {addr} did not complete within {after:?}")]
    HandshakeTimeout {
        peer: String,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("peer {peer:?} at {addr} refused at the handshake: {reason}")]
    PeerRefused {
        peer: String,
        addr: SocketAddr,
        reason: Box<IdentityError>,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer's certificate names no node of the topology: {0}")]
    PeerIdentity(Box<IdentityError>),
}

fn io_read_error(path: &Path, what: &'static str, source: io::Error) -> TlsError {
    if source.kind() == io::ErrorKind::NotFound {
        TlsError::Missing {
            what,
            path: path.to_owned(),
        }
    } else {
        TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------
// Peer TLS.

/// The TLS material of one node and the QUIC configurations built from it.
pub struct PeerTls {
    topology: Arc<Topology>,
    identity: PeerIdentity,
    /// Validity of this node's certificate and of its CA, as loaded.
    certificates: Certificates,
    server: quinn::ServerConfig,
    /// One client configuration per node of the topology, each accepting only that node.
    clients: HashMap<String, quinn::ClientConfig>,
    /// For a dial to a node the topology does not declare: refuses every certificate.
    stranger: quinn::ClientConfig,
    /// Per client configuration (same keys; "" for `stranger`): why its verifier refused the
    /// last server certificate. The server is told only "access denied".
    server_refusals: HashMap<String, RefusalSlot>,
    /// Derived from the node's key: the same after a restart.
    keys: EndpointKeys,
    refusals: Arc<CertRefusals>,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads the cluster CA (`tls.ca`) and the certificate and key of `node_id` (`tls.cert_dir`),
    /// and refuses a certificate that does not carry `node_id`'s identity or does not chain to
    /// the CA: a node must not start under a name its peers would not accept.
    pub fn load(topology: Arc<Topology>, node_id: &str) -> Result<PeerTls, TlsError> {
        let ca = topology.tls.ca.clone();
        let cert = topology.tls.node_cert(node_id);
        let key = topology.tls.node_key(node_id);
        PeerTls::from_files(topology, node_id, &ca, &cert, &key, true)
    }

    fn from_files(
        topology: Arc<Topology>,
        node_id: &str,
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
        check_own_identity: bool,
    ) -> Result<PeerTls, TlsError> {
        let Some(region) = topology.region_of(node_id) else {
            return Err(TlsError::UnknownNode(node_id.to_string()));
        };
        let identity = PeerIdentity {
            node_id: node_id.to_string(),
            region: region.to_string(),
        };
        let provider = provider();
        let ca_certs = load_certs(ca_path, "CA certificate")?;
        let roots = Arc::new(roots_of(&ca_certs, ca_path)?);
        let chain = load_certs(cert_path, "node certificate")?;
        let key = load_key(key_path)?;
        let keys = EndpointKeys::derive(key.secret_der());
        let refusals = Arc::new(CertRefusals::default());

        if check_own_identity {
            check_own_cert(
                &topology, node_id, &chain, &roots, &provider, ca_path, cert_path,
            )?;
        }
        let certificates =
            certificates_of(&chain, &ca_certs).map_err(|e| TlsError::OwnIdentity {
                node: node_id.to_string(),
                path: cert_path.to_owned(),
                source: Box::new(e),
            })?;

        let config_err = |source| TlsError::Config {
            node: node_id.to_string(),
            source,
        };
        let transport = Arc::new(transport_config());

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(Arc::new(PeerClientVerifier {
                chain: client_verifier,
                topology: topology.clone(),
                refusals: refusals.clone(),
            }))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        server_tls.session_storage = Arc::new(NoServerSessionStorage {});
        server_tls.send_tls13_tickets = 0;
        server_tls.max_early_data_size = 0;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
        server
            .transport_config(transport.clone())
            .max_incoming(MAX_INCOMING)
            .incoming_buffer_size(INCOMING_BUFFER_BYTES)
            .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL_BYTES);

        let algorithms = provider.signature_verification_algorithms;
        let mut server_refusals = HashMap::new();
        let mut client_for = |expected_node: &str,
                              expected_uri: Option<String>|
         -> Result<quinn::ClientConfig, TlsError> {
            let refused = RefusalSlot::default();
            server_refusals.insert(expected_node.to_string(), refused.clone());
            let verifier = PeerServerVerifier {
                roots: roots.clone(),
                algorithms,
                expected_node: expected_node.to_string(),
                expected_uri,
                refused,
            };
            let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(config_err)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(config_err)?;
            tls.alpn_protocols = vec![ALPN.to_vec()];
            tls.resumption = Resumption::disabled();
            tls.enable_early_data = false;
            let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
            client.transport_config(transport.clone());
            Ok(client)
        };
        let mut clients = HashMap::new();
        for node in &topology.nodes {
            let Some(uri) = topology.spiffe_id(&node.id) else {
                return Err(TlsError::UnknownNode(node.id.clone()));
            };
            clients.insert(node.id.clone(), client_for(&node.id, Some(uri))?);
        }
        let stranger = client_for("", None)?;

        Ok(PeerTls {
            topology,
            identity,
            certificates,
            server,
            clients,
            stranger,
            server_refusals,
            keys,
            refusals,
        })
    }

    /// The client certificates this node refused, with the latest reason.
    pub fn certificate_refusals(&self) -> &CertRefusals {
        &self.refusals
    }

    /// This node.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// Validity of this node's certificate and of the CA that issued it.
    pub fn certificates(&self) -> Certificates {
        self.certificates
    }

    /// Accepts clients whose certificate chains to the CA and names a node of the topology in
    /// its topology region. TLS 1.3 only, no resumption, no 0-RTT.
    pub fn server_config(&self) -> quinn::ServerConfig {
        self.server.clone()
    }

    /// Dials `expected_peer` and accepts only a server certificate that chains to the CA and
    /// carries exactly `expected_peer`'s identity. A peer the topology does not declare is
    /// refused at the handshake.
    pub fn client_config(&self, expected_peer: &str) -> quinn::ClientConfig {
        self.clients
            .get(expected_peer)
            .unwrap_or(&self.stranger)
            .clone()
    }
}

#[cfg(test)]
pub(crate) fn load_roots(ca_path: &Path) -> Result<RootCertStore, TlsError> {
    roots_of(&load_certs(ca_path, "CA certificate")?, ca_path)
}

fn roots_of(
    ca_certs: &[CertificateDer<'static>],
    ca_path: &Path,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca_certs {
        roots.add(cert.clone()).map_err(|e| TlsError::Pem {
            what: "CA certificate",
            path: ca_path.to_owned(),
            message: format!("not a usable trust anchor: {e}"),
        })?;
    }
    Ok(roots)
}

fn certificates_of(
    chain: &[CertificateDer<'static>],
    ca_certs: &[CertificateDer<'static>],
) -> Result<Certificates, IdentityError> {
    let leaf = chain
        .first()
        .ok_or_else(|| IdentityError::Unparsable("empty chain".into()))?;
    Ok(Certificates {
        node: expiry::validity_of(leaf)?,
        ca: expiry::issuer_validity(leaf, ca_certs)?,
    })
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |e: rustls::pki_types::pem::Error| match e {
        rustls::pki_types::pem::Error::Io(source) => io_read_error(path, what, source),
        other => TlsError::Pem {
            what,
            path: path.to_owned(),
            message: other.to_string(),
        },
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            message: "no CERTIFICATE section found".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(source) => io_read_error(path, "node key", source),
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Pem {
            what: "node key",
            path: path.to_owned(),
            message: "no PRIVATE KEY section found".into(),
        },
        other => TlsError::Pem {
            what: "node key",
            path: path.to_owned(),
            message: other.to_string(),
        },
    })
}

fn check_own_cert(
    topology: &Topology,
    node_id: &str,
    chain: &[CertificateDer<'static>],
    roots: &RootCertStore,
    provider: &CryptoProvider,
    ca_path: &Path,
    cert_path: &Path,
) -> Result<(), TlsError> {
    let own_err = |source| TlsError::OwnIdentity {
        node: node_id.to_string(),
        path: cert_path.to_owned(),
        source: Box::new(source),
    };
    let Some(leaf) = chain.first() else {
        return Err(own_err(IdentityError::Unparsable("empty chain".into())));
    };
    let found = identity_of(leaf, topology).map_err(own_err)?;
    if found.node_id != node_id {
        return Err(own_err(IdentityError::UnexpectedPeer {
            expected: node_id.to_string(),
            found: found.node_id,
        }));
    }
    let chain_err = |source| TlsError::OwnChain {
        cert: cert_path.to_owned(),
        ca: ca_path.to_owned(),
        source,
    };
    let parsed = ParsedCertificate::try_from(leaf).map_err(chain_err)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &chain[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(chain_err)
}

fn transport_config() -> TransportConfig {
    let mut transport = TransportConfig::default();
    // Both constants are far below VarInt's bound, so the conversion is exact.
    transport
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS));
    transport
}

/// Server side: webpki checks the chain, then the identity must name a node of the topology in
/// its topology region. A refused client learns nothing but "access denied" (F16); the reason
/// goes to `refusals`.
#[derive(Debug)]
struct PeerClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    topology: Arc<Topology>,
    refusals: Arc<CertRefusals>,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let checked = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(untrusted_reason)
            .and_then(|verified| identity_of(end_entity, &self.topology).map(|_| verified));
        checked.map_err(|reason| {
            self.refusals.record(reason);
            refusals::access_denied()
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Client side: the chain is checked against the CA (the DNS server name is ignored: node
/// certificates carry no DNS name), then the identity must be exactly the dialled node's.
#[derive(Debug)]
struct PeerServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected_node: String,
    /// `None` for a node the topology does not declare: every certificate is refused.
    expected_uri: Option<String>,
    refused: RefusalSlot,
}

/// Why a verifier refused the latest certificate, for the dialler's own error.
type RefusalSlot = Arc<std::sync::Mutex<Option<IdentityError>>>;

impl PeerServerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), IdentityError> {
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(untrusted_reason)?;
        let uri = single_uri_san(end_entity)?;
        match &self.expected_uri {
            Some(expected) if *expected == uri => Ok(()),
            Some(_) => Err(IdentityError::UnexpectedPeer {
                expected: self.expected_node.clone(),
                found: uri,
            }),
            None => Err(IdentityError::UndeclaredPeer),
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server, not authenticated, is told only "access denied"; the dialler's error
        // says why (see `dial`).
        match self.check(end_entity, intermediates, now) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(reason) => {
                *crate::sync::lock(&self.refused) = Some(reason);
                Err(refusals::access_denied())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The authenticated identity of the peer of an established connection.
pub fn peer_identity(
    conn: &quinn::Connection,
    topology: &Topology,
) -> Result<PeerIdentity, TlsError> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TlsError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
    identity_of(leaf, topology).map_err(|e| TlsError::PeerIdentity(Box::new(e)))
}

/// A QUIC endpoint bound to `bind` that accepts peers (with [`PeerTls::server_config`]) and
/// dials them (with [`dial`]).
/// Its stateless-reset and connection-ID keys derive from the node's key, so after a restart
/// the new process resets the peers' connections to the old one at their next packet.
pub fn endpoint(bind: SocketAddr, tls: &PeerTls) -> Result<quinn::Endpoint, TlsError> {
    let bind_err = |source| TlsError::Bind { addr: bind, source };
    let socket = std::net::UdpSocket::bind(bind).map_err(bind_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(io::Error::other("no async runtime to drive the endpoint")))?;
    quinn::Endpoint::new(
        tls.keys.endpoint_config(),
        Some(tls.server_config()),
        socket,
        runtime,
    )
    .map_err(bind_err)
}

/// Dials `peer_id` at `addr` (its peer address, or a link emulator routing to it) and completes
/// the handshake. Only `peer_id`'s certificate is accepted. With TLS 1.3 the server checks our
/// certificate after we finish, so a server that refuses us shows as a connection that closes,
/// not as an error here.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    tls: &PeerTls,
    peer_id: &str,
    addr: SocketAddr,
) -> Result<quinn::Connection, TlsError> {
    let connecting = endpoint
        .connect_with(tls.client_config(peer_id), addr, server_name(peer_id))
        .map_err(|source| TlsError::Connect {
            peer: peer_id.to_string(),
            addr,
            source,
        })?;
    let refused = tls
        .server_refusals
        .get(peer_id)
        .or_else(|| tls.server_refusals.get(""));
    if let Some(slot) = refused {
        crate::sync::lock(slot).take();
    }
    let result = dial_within(connecting, HANDSHAKE_TIMEOUT, peer_id, addr).await;
    match (result, refused) {
        (Err(TlsError::Handshake { .. }), Some(slot)) if crate::sync::lock(slot).is_some() => {
            let reason = crate::sync::lock(slot).take();
            Err(TlsError::PeerRefused {
                peer: peer_id.to_string(),
                addr,
                reason: Box::new(reason.unwrap_or(IdentityError::UndeclaredPeer)),
            })
        }
        (result, _) => result,
    }
}

async fn dial_within(
    connecting: quinn::Connecting,
    limit: Duration,
    peer_id: &str,
    addr: SocketAddr,
) -> Result<quinn::Connection, TlsError> {
    // Dropping `connecting` on the timeout abandons the attempt.
    match tokio::time::timeout(limit, connecting).await {
        Ok(done) => done.map_err(|source| TlsError::Handshake {
            peer: peer_id.to_string(),
            addr,
            source,
        }),
        Err(_) => Err(TlsError::HandshakeTimeout {
            peer: peer_id.to_string(),
            addr,
            after: limit,
        }),
    }
}

/// The TLS server name sent when dialling `peer_id`. The verifier ignores it (identity is the
/// URI SAN), but rustls requires a syntactically valid name, which not every node id is.
fn server_name(peer_id: &str) -> &str {
    if ServerName::try_from(peer_id).is_ok() {
        peer_id
    } else {
        "meridian-peer"
    }
}

#[cfg(test)]
pub(crate) mod tests;
