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
use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn};
use rustls::{OtherError, RootCertStore, SignatureScheme};

use crate::topology::Topology;

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

/// Validity of a node certificate.
const NODE_CERT_DAYS: i64 = 365;
/// Validity of the development CA.
const CA_DAYS: i64 = 3650;
/// Certificates start this long in the past, so that a peer whose clock is a little behind
/// does not see them as not yet valid.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// Installs ring as the process-wide rustls provider. Idempotent: a provider already installed
/// (by an earlier call, or by a test) is kept.
pub fn install_crypto_provider() {
    // The only error is "a provider is already installed", which is the state we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
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
    #[error("{}: cannot write {what}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("{}: the CA certificate does not belong to the CA key {}", cert.display(), key.display())]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
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
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer's certificate names no node of the topology: {0}")]
    PeerIdentity(Box<IdentityError>),
}

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

fn single_uri_san(der: &[u8]) -> Result<String, IdentityError> {
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

/// A refusal as a rustls error. `Error::Other` rather than `InvalidCertificate(Other)`: the
/// latter displays as a Debug dump, and the close reason of the refused connection is usually
/// all an operator sees. The price is a generic handshake_failure alert to the peer.
fn rustls_refusal(err: IdentityError) -> rustls::Error {
    rustls::Error::Other(OtherError(Arc::new(err)))
}

/// webpki's bare reasons ("BadSignature", "UnknownIssuer") do not say which check failed.
fn untrusted(err: rustls::Error) -> rustls::Error {
    match err {
        rustls::Error::InvalidCertificate(e) => {
            rustls_refusal(IdentityError::Untrusted(e.to_string()))
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------
// Certificate generation.

/// What [`generate_certs`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertsReport {
    /// True if an existing `ca.pem`/`ca.key` pair was kept (and signed the new node
    /// certificates), false if a new CA was created.
    pub ca_reused: bool,
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
}

/// Writes a development CA (`ca.pem`, `ca.key`) and one certificate and key per node
/// (`<node>.pem`, `<node>.key`) into `out_dir`. An existing CA pair in `out_dir` is reused, so
/// that regenerating node certificates keeps the certificates of other runs valid.
pub fn generate_certs(topology: &Topology, out_dir: &Path) -> Result<CertsReport, TlsError> {
    fs::create_dir_all(out_dir).map_err(|source| TlsError::Write {
        what: "certificate folder",
        path: out_dir.to_owned(),
        source,
    })?;
    let ca_cert_path = out_dir.join("ca.pem");
    let ca_key_path = out_dir.join("ca.key");
    let mut written = Vec::new();
    let now = time::OffsetDateTime::now_utc();

    let ca_reused = ca_cert_path.exists() && ca_key_path.exists();
    let issuer = if ca_reused {
        load_issuer(&ca_cert_path, &ca_key_path)?
    } else {
        let key = KeyPair::generate().map_err(|source| TlsError::Generate {
            what: "the CA key".into(),
            source,
        })?;
        let params = ca_params(&topology.cluster, now);
        let cert = params
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                what: "the CA certificate".into(),
                source,
            })?;
        write_file(
            &ca_key_path,
            "CA key",
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        written.push(ca_key_path.clone());
        write_file(
            &ca_cert_path,
            "CA certificate",
            cert.pem().as_bytes(),
            0o644,
        )?;
        written.push(ca_cert_path.clone());
        Issuer::new(params, key)
    };

    for node in &topology.nodes {
        let Some(uri) = topology.spiffe_id(&node.id) else {
            return Err(TlsError::UnknownNode(node.id.clone()));
        };
        let key = KeyPair::generate().map_err(|source| TlsError::Generate {
            what: format!("the key of node {:?}", node.id),
            source,
        })?;
        let params = node_params(&node.id, &uri, now).map_err(|source| TlsError::Generate {
            what: format!("the certificate of node {:?}", node.id),
            source,
        })?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| TlsError::Generate {
                what: format!("the certificate of node {:?}", node.id),
                source,
            })?;
        let key_path = out_dir.join(format!("{}.key", node.id));
        let cert_path = out_dir.join(format!("{}.pem", node.id));
        write_file(&key_path, "node key", key.serialize_pem().as_bytes(), 0o600)?;
        written.push(key_path);
        write_file(&cert_path, "node certificate", cert.pem().as_bytes(), 0o644)?;
        written.push(cert_path);
    }
    Ok(CertsReport { ca_reused, written })
}

fn ca_params(cluster: &str, now: time::OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Meridian dev CA {cluster}"));
    params.distinguished_name = dn;
    // Path length 0: this CA signs node certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(CA_DAYS);
    params
}

fn node_params(
    node_id: &str,
    uri: &str,
    now: time::OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(NODE_CERT_DAYS);
    Ok(params)
}

fn load_issuer(cert_path: &Path, key_path: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let cert_pem = read_text(cert_path, "CA certificate")?;
    let key_pem = read_text(key_path, "CA key")?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
        what: "CA key",
        path: key_path.to_owned(),
        message: e.to_string(),
    })?;
    let cert_der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "CA certificate",
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    // Certificates signed by a key that is not the CA's would chain to nothing: refuse early.
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&cert_der).map_err(|e| TlsError::Pem {
            what: "CA certificate",
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(TlsError::CaKeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| TlsError::Generate {
        what: format!("an issuer from {}", cert_path.display()),
        source,
    })
}

fn read_text(path: &Path, what: &'static str) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| io_read_error(path, what, source))
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

/// Writes through a fresh temporary file created with `mode` and renamed into place, so that a
/// key is never readable by others, not even for a moment or when it replaces an older file
/// with looser permissions, and a crash leaves the old file or the new one, never half of one.
fn write_file(path: &Path, what: &'static str, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        what,
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    let result = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Peer TLS.

/// The TLS material of one node and the QUIC configurations built from it.
pub struct PeerTls {
    topology: Arc<Topology>,
    identity: PeerIdentity,
    server: quinn::ServerConfig,
    /// One client configuration per node of the topology, each accepting only that node.
    clients: HashMap<String, quinn::ClientConfig>,
    /// For a dial to a node the topology does not declare: refuses every certificate.
    stranger: quinn::ClientConfig,
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
        let roots = Arc::new(load_roots(ca_path)?);
        let chain = load_certs(cert_path, "node certificate")?;
        let key = load_key(key_path)?;

        if check_own_identity {
            check_own_cert(
                &topology, node_id, &chain, &roots, &provider, ca_path, cert_path,
            )?;
        }

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
            }))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        server_tls.session_storage = Arc::new(NoServerSessionStorage {});
        server_tls.send_tls13_tickets = 0;
        server_tls.max_early_data_size = 0;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
        server.transport_config(transport.clone());

        let algorithms = provider.signature_verification_algorithms;
        let client_for = |expected_node: &str,
                          expected_uri: Option<String>|
         -> Result<quinn::ClientConfig, TlsError> {
            let verifier = PeerServerVerifier {
                roots: roots.clone(),
                algorithms,
                expected_node: expected_node.to_string(),
                expected_uri,
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
            server,
            clients,
            stranger,
        })
    }

    /// This node.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
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

fn load_roots(ca_path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_path, "CA certificate")? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: "CA certificate",
            path: ca_path.to_owned(),
            message: format!("not a usable trust anchor: {e}"),
        })?;
    }
    Ok(roots)
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
/// its topology region.
#[derive(Debug)]
struct PeerClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    topology: Arc<Topology>,
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
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(untrusted)?;
        identity_of(end_entity, &self.topology).map_err(rustls_refusal)?;
        Ok(verified)
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
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(untrusted)?;
        let uri = single_uri_san(end_entity).map_err(rustls_refusal)?;
        match &self.expected_uri {
            Some(expected) if *expected == uri => Ok(ServerCertVerified::assertion()),
            Some(_) => Err(rustls_refusal(IdentityError::UnexpectedPeer {
                expected: self.expected_node.clone(),
                found: uri,
            })),
            None => Err(rustls_refusal(IdentityError::UndeclaredPeer)),
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
pub fn endpoint(bind: SocketAddr, tls: &PeerTls) -> Result<quinn::Endpoint, TlsError> {
    quinn::Endpoint::server(tls.server_config(), bind)
        .map_err(|source| TlsError::Bind { addr: bind, source })
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
    dial_within(connecting, HANDSHAKE_TIMEOUT, peer_id, addr).await
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
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::time::timeout;

    const DEADLINE: Duration = Duration::from_secs(20);

    fn topology_in(dir: &Path, ca: &str) -> Arc<Topology> {
        let text = format!(
            r#"
cluster = "test"

[tls]
ca = "{ca}"

[[regions]]
name = "eu-west"

[[regions]]
name = "us-east"

[[regions]]
name = "ap-south"

[[nodes]]
id = "eu-west-1"
region = "eu-west"
peer = "127.0.0.1:7101"
api = "127.0.0.1:8101"

[[nodes]]
id = "us-east-1"
region = "us-east"
peer = "127.0.0.1:7201"
api = "127.0.0.1:8201"

[[nodes]]
id = "ap-south-1"
region = "ap-south"
peer = "127.0.0.1:7301"
api = "127.0.0.1:8301"
"#
        );
        Arc::new(Topology::parse(&text, &dir.join("topology.toml")).unwrap())
    }

    /// A topology in `dir` with its certificates generated.
    fn cluster(dir: &Path) -> Arc<Topology> {
        install_crypto_provider();
        let topology = topology_in(dir, "certs/ca.pem");
        generate_certs(&topology, &dir.join("certs")).unwrap();
        topology
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    /// Signs a certificate with arbitrary URI SANs by the CA in `certs`; writes `name.pem`/`.key`.
    fn forge(certs: &Path, name: &str, uris: &[&str]) -> (PathBuf, PathBuf) {
        let issuer = load_issuer(&certs.join("ca.pem"), &certs.join("ca.key")).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = node_params(name, uris[0], time::OffsetDateTime::now_utc()).unwrap();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = certs.join(format!("{name}.pem"));
        let key_path = certs.join(format!("{name}.key"));
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// What the accepting side saw of one incoming connection.
    enum Accepted {
        Refused(quinn::ConnectionError),
        Peer(PeerIdentity, Vec<u8>),
    }

    /// Accepts one connection, then one bi stream; echoes "pong" to "ping".
    async fn accept_one(endpoint: quinn::Endpoint, topology: Arc<Topology>) -> Accepted {
        let incoming = endpoint.accept().await.unwrap();
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => return Accepted::Refused(e),
        };
        let who = peer_identity(&conn, &topology).unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let got = recv.read_to_end(1024).await.unwrap();
        send.write_all(b"pong").await.unwrap();
        send.finish().unwrap();
        // Wait for the dialer to read the answer and close.
        let _ = conn.closed().await;
        Accepted::Peer(who, got)
    }

    /// Sends "ping" on a new bi stream and returns the answer.
    async fn ping(conn: &quinn::Connection) -> Result<Vec<u8>, String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"ping").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1024).await.map_err(|e| e.to_string())
    }

    /// Dials `server` with `client`, expecting `expect` at the other end, and asserts that the
    /// link is refused: by the dialer's handshake or by the server, and no data flows.
    async fn assert_refused(
        client: &PeerTls,
        server: &PeerTls,
        expect: &str,
    ) -> (String, Option<quinn::ConnectionError>) {
        let server_ep = endpoint(localhost(), server).unwrap();
        let addr = server_ep.local_addr().unwrap();
        let accepting = tokio::spawn(accept_one(server_ep.clone(), server.topology().clone()));
        let client_ep = endpoint(localhost(), client).unwrap();
        let client_side = match timeout(DEADLINE, dial(&client_ep, client, expect, addr))
            .await
            .unwrap()
        {
            Err(e) => e.to_string(),
            Ok(conn) => {
                let answer = timeout(DEADLINE, ping(&conn)).await.unwrap();
                match answer {
                    Ok(data) => panic!("refused link carried data: {data:?}"),
                    Err(e) => e,
                }
            }
        };
        let server_side = match timeout(DEADLINE, accepting).await.unwrap().unwrap() {
            Accepted::Refused(e) => Some(e),
            Accepted::Peer(who, data) => panic!("server accepted {who} and got {data:?}"),
        };
        client_ep.close(0u32.into(), b"done");
        server_ep.close(0u32.into(), b"done");
        (client_side, server_side)
    }

    #[test]
    fn generated_certs_carry_one_exact_identity_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let certs = dir.path().join("certs");
        for file in ["ca.pem", "ca.key"] {
            assert!(certs.join(file).is_file(), "{file} missing");
        }
        for node in &topology.nodes {
            let cert = topology.tls.node_cert(&node.id);
            let key = topology.tls.node_key(&node.id);
            assert!(cert.starts_with(&certs));
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
            let der = cert_der(&cert);
            assert_eq!(
                single_uri_san(&der).unwrap(),
                format!("spiffe://test/region/{}/node/{}", node.region, node.id)
            );
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
            let sans = parsed.subject_alternative_name().unwrap().unwrap();
            assert_eq!(sans.value.general_names.len(), 1);
            let cn = parsed.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), node.id);
            assert_eq!(
                identity_of(&der, &topology).unwrap(),
                PeerIdentity {
                    node_id: node.id.clone(),
                    region: node.region.clone()
                }
            );
        }
        let ca_key_mode = fs::metadata(certs.join("ca.key")).unwrap().permissions();
        assert_eq!(ca_key_mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn a_second_run_reuses_the_ca_and_old_certificates_stay_valid() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let certs = dir.path().join("certs");
        let ca_before = fs::read(certs.join("ca.pem")).unwrap();
        let old_leaf = cert_der(&topology.tls.node_cert("eu-west-1"));
        let report = generate_certs(&topology, &certs).unwrap();
        assert!(report.ca_reused);
        assert!(!report.written.contains(&certs.join("ca.pem")));
        assert_eq!(report.written.len(), 2 * topology.nodes.len());
        assert_eq!(fs::read(certs.join("ca.pem")).unwrap(), ca_before);
        // The old certificate still chains to the (same) CA: a running node keeps working.
        let roots = load_roots(&certs.join("ca.pem")).unwrap();
        let parsed = ParsedCertificate::try_from(&old_leaf).unwrap();
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .unwrap();
        PeerTls::load(topology, "eu-west-1").unwrap();
    }

    #[test]
    fn identities_are_compared_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let certs = dir.path().join("certs");
        type Expect = fn(&IdentityError) -> bool;
        let cases: &[(&[&str], Expect)] = &[
            (&["spiffe://test/region/eu-west/node/eu-west-1/"], |e| {
                matches!(e, IdentityError::NotNodeIdentity(_))
            }),
            (&["spiffe://test/region/eu-west/node/EU-WEST-1"], |e| {
                matches!(e, IdentityError::UnknownNode { .. })
            }),
            (&["spiffe://TEST/region/eu-west/node/eu-west-1"], |e| {
                matches!(e, IdentityError::WrongCluster { .. })
            }),
            (&["spiffe://test/region/us-east/node/eu-west-1"], |e| {
                matches!(e, IdentityError::WrongRegion { .. })
            }),
            (
                &[
                    "spiffe://test/region/eu-west/node/eu-west-1",
                    "spiffe://test/region/us-east/node/us-east-1",
                ],
                |e| matches!(e, IdentityError::UriCount(2)),
            ),
        ];
        for (i, (uris, expected)) in cases.iter().enumerate() {
            let (cert, _) = forge(&certs, &format!("case{i}"), uris);
            let err = identity_of(&cert_der(&cert), &topology).unwrap_err();
            assert!(expected(&err), "{uris:?}: {err}");
        }
    }

    #[test]
    fn load_explains_missing_files_and_refuses_a_foreign_identity() {
        let dir = tempfile::tempdir().unwrap();
        install_crypto_provider();
        let topology = topology_in(dir.path(), "certs/ca.pem");
        let err = PeerTls::load(topology.clone(), "eu-west-1").unwrap_err();
        assert!(matches!(err, TlsError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("meridian certs"), "{err}");

        generate_certs(&topology, &dir.path().join("certs")).unwrap();
        // eu-west-1's files replaced by us-east-1's: a valid certificate of the wrong node.
        fs::copy(
            topology.tls.node_cert("us-east-1"),
            topology.tls.node_cert("eu-west-1"),
        )
        .unwrap();
        fs::copy(
            topology.tls.node_key("us-east-1"),
            topology.tls.node_key("eu-west-1"),
        )
        .unwrap();
        let err = PeerTls::load(topology.clone(), "eu-west-1").unwrap_err();
        let TlsError::OwnIdentity { source, .. } = &err else {
            panic!("{err}");
        };
        assert!(
            matches!(**source, IdentityError::UnexpectedPeer { .. }),
            "{err}"
        );

        // A certificate from another CA is refused at load too.
        let other = tempfile::tempdir().unwrap();
        let other_topology = topology_in(other.path(), "certs/ca.pem");
        generate_certs(&other_topology, &other.path().join("certs")).unwrap();
        let err = PeerTls::from_files(
            topology.clone(),
            "eu-west-1",
            &topology.tls.ca,
            &other_topology.tls.node_cert("eu-west-1"),
            &other_topology.tls.node_key("eu-west-1"),
            true,
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::OwnChain { .. }), "{err}");
        assert!(matches!(
            PeerTls::load(topology, "nowhere-1").unwrap_err(),
            TlsError::UnknownNode(_)
        ));
    }

    #[tokio::test]
    async fn a_dial_to_a_peer_that_never_answers_gives_up_at_the_handshake_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let a = PeerTls::load(topology.clone(), "eu-west-1").unwrap();
        let a_ep = endpoint(localhost(), &a).unwrap();
        // A bound UDP socket that reads nothing: the dial's packets vanish, as in a partition.
        let black_hole = std::net::UdpSocket::bind(localhost()).unwrap();
        let addr = black_hole.local_addr().unwrap();
        let connecting = a_ep
            .connect_with(a.client_config("us-east-1"), addr, server_name("us-east-1"))
            .unwrap();
        let limit = Duration::from_millis(300);
        let result = timeout(DEADLINE, dial_within(connecting, limit, "us-east-1", addr))
            .await
            .expect("the dial ends by itself");
        match result {
            Err(e @ TlsError::HandshakeTimeout { .. }) => {
                assert!(e.to_string().contains("did not complete"), "{e}");
            }
            other => panic!("expected a handshake timeout, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn peers_authenticate_each_other_and_exchange_data() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let a = PeerTls::load(topology.clone(), "eu-west-1").unwrap();
        let b = PeerTls::load(topology.clone(), "us-east-1").unwrap();
        let b_ep = endpoint(localhost(), &b).unwrap();
        let b_addr = b_ep.local_addr().unwrap();
        let accepting = tokio::spawn(accept_one(b_ep.clone(), topology.clone()));

        let a_ep = endpoint(localhost(), &a).unwrap();
        let conn = timeout(DEADLINE, dial(&a_ep, &a, "us-east-1", b_addr))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            peer_identity(&conn, &topology).unwrap(),
            PeerIdentity {
                node_id: "us-east-1".into(),
                region: "us-east".into()
            }
        );
        let alpn = conn
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol;
        assert_eq!(alpn.as_deref(), Some(ALPN));
        let answer = timeout(DEADLINE, ping(&conn)).await.unwrap().unwrap();
        assert_eq!(answer, b"pong");
        conn.close(0u32.into(), b"done");

        match timeout(DEADLINE, accepting).await.unwrap().unwrap() {
            Accepted::Peer(who, data) => {
                assert_eq!(
                    who,
                    PeerIdentity {
                        node_id: "eu-west-1".into(),
                        region: "eu-west".into()
                    }
                );
                assert_eq!(data, b"ping");
            }
            Accepted::Refused(e) => panic!("refused: {e}"),
        }
        a_ep.wait_idle().await;
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let other = tempfile::tempdir().unwrap();
        let other_topology = topology_in(other.path(), "certs/ca.pem");
        generate_certs(&other_topology, &other.path().join("certs")).unwrap();

        // Trusts our CA (so it would accept our server) but presents the other CA's certificate.
        let rogue = PeerTls::from_files(
            topology.clone(),
            "eu-west-1",
            &topology.tls.ca,
            &other_topology.tls.node_cert("eu-west-1"),
            &other_topology.tls.node_key("eu-west-1"),
            false,
        )
        .unwrap();
        let b = PeerTls::load(topology.clone(), "us-east-1").unwrap();
        let (client_side, server_side) = assert_refused(&rogue, &b, "us-east-1").await;
        let server_side = server_side.unwrap().to_string();
        assert!(
            server_side.contains("not trusted by the cluster CA"),
            "server: {server_side}; client: {client_side}"
        );

        // And our node dialling a server with the other CA's certificate refuses it itself.
        let rogue_server = PeerTls::load(other_topology, "us-east-1").unwrap();
        let a = PeerTls::load(topology, "eu-west-1").unwrap();
        let (client_side, _) = assert_refused(&a, &rogue_server, "us-east-1").await;
        assert!(
            client_side.contains("not trusted by the cluster CA"),
            "client: {client_side}"
        );
    }

    #[tokio::test]
    async fn a_valid_certificate_of_another_node_is_refused_by_the_dialer() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        // Claims to be eu-west-1 but holds us-east-1's (valid) certificate and key.
        let impostor = PeerTls::from_files(
            topology.clone(),
            "eu-west-1",
            &topology.tls.ca,
            &topology.tls.node_cert("us-east-1"),
            &topology.tls.node_key("us-east-1"),
            false,
        )
        .unwrap();
        let c = PeerTls::load(topology.clone(), "ap-south-1").unwrap();
        let (client_side, _) = assert_refused(&c, &impostor, "eu-west-1").await;
        assert!(
            client_side.contains("us-east-1") && client_side.contains("eu-west-1"),
            "client: {client_side}"
        );

        // As a client, the impostor is known by its certificate, not by its claim.
        let c_ep = endpoint(localhost(), &c).unwrap();
        let c_addr = c_ep.local_addr().unwrap();
        let accepting = tokio::spawn(accept_one(c_ep.clone(), topology.clone()));
        let imp_ep = endpoint(localhost(), &impostor).unwrap();
        let conn = timeout(DEADLINE, dial(&imp_ep, &impostor, "ap-south-1", c_addr))
            .await
            .unwrap()
            .unwrap();
        timeout(DEADLINE, ping(&conn)).await.unwrap().unwrap();
        conn.close(0u32.into(), b"done");
        match timeout(DEADLINE, accepting).await.unwrap().unwrap() {
            Accepted::Peer(who, _) => assert_eq!(who.node_id, "us-east-1"),
            Accepted::Refused(e) => panic!("refused: {e}"),
        }

        // Dialling a name the topology does not declare never succeeds.
        let b = PeerTls::load(topology, "us-east-1").unwrap();
        let (client_side, _) = assert_refused(&c, &b, "nowhere-1").await;
        assert!(
            client_side.contains("nowhere-1") && client_side.contains("not declared"),
            "client: {client_side}"
        );
    }

    #[tokio::test]
    async fn a_certificate_placing_a_node_in_the_wrong_region_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let topology = cluster(dir.path());
        let certs = dir.path().join("certs");
        let (cert, key) = forge(
            &certs,
            "misplaced",
            &["spiffe://test/region/us-east/node/eu-west-1"],
        );
        let misplaced = PeerTls::from_files(
            topology.clone(),
            "eu-west-1",
            &topology.tls.ca,
            &cert,
            &key,
            false,
        )
        .unwrap();
        let c = PeerTls::load(topology, "ap-south-1").unwrap();
        let (client_side, server_side) = assert_refused(&misplaced, &c, "ap-south-1").await;
        let server_side = server_side.unwrap().to_string();
        assert!(
            server_side.contains("region"),
            "server: {server_side}; client: {client_side}"
        );
    }

    #[test]
    fn every_node_id_gives_a_usable_server_name() {
        for id in ["eu-west-1", "a", "n.1", "1.2.3.4", "_x", "-a-"] {
            assert!(ServerName::try_from(server_name(id)).is_ok(), "{id}");
        }
        assert_eq!(server_name("eu-west-1"), "eu-west-1");
    }
}
