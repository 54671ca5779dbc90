//! An unauthenticated flood of a node's peer port: genuine QUIC Initials, each with a fresh
//! connection ID, that never complete, as an attacker without a certificate sends them.
//!
//! A quinn client dials a socket that never answers; the first datagram it sends there (its
//! Initial, with a ClientHello) is sent on from one of several sockets of the flood to each
//! target, which then holds a half-open handshake until it gives up. Nothing the targets
//! answer is ever read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Sockets the Initials are sent from (distinct source ports, one IP: 127.0.0.1).
const SOURCE_SOCKETS: usize = 16;
/// The ALPN of peer links, so the Initials look like a node's.
const ALPN: &[u8] = b"meridian-repl/1";

/// A running flood; stops when dropped.
pub struct Flood {
    task: tokio::task::JoinHandle<()>,
    sent: Arc<AtomicU64>,
}

impl Flood {
    /// Sends `per_second` distinct Initials per second to each of `targets`.
    pub async fn start(targets: Vec<SocketAddr>, per_second: u32) -> Flood {
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(flood(targets, per_second, sent.clone()));
        Flood { task, sent }
    }

    /// Initials sent so far (all targets).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn flood(targets: Vec<SocketAddr>, per_second: u32, sent: Arc<AtomicU64>) {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let Ok(sink) = tokio::net::UdpSocket::bind(loopback).await else {
        return;
    };
    let Ok(sink_addr) = sink.local_addr() else {
        return;
    };
    let Ok(client) = quinn::Endpoint::client(loopback) else {
        return;
    };
    let mut sources = Vec::new();
    for _ in 0..SOURCE_SOCKETS {
        match tokio::net::UdpSocket::bind(loopback).await {
            Ok(s) => sources.push(s),
            Err(_) => return,
        }
    }
    let config = client_config();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    let mut buf = vec![0u8; 2048];
    let mut next_source = 0;
    let mut seen = std::collections::HashSet::new();
    loop {
        tick.tick().await;
        let Ok(connecting) = client.connect_with(config.clone(), sink_addr, "flood") else {
            continue;
        };
        // This attempt's Initial: the first datagram with a destination connection ID not
        // seen before (retransmissions and the closes of dropped attempts repeat theirs, and
        // would end the target's half-open handshake).
        let Some(len) = next_new_initial(&sink, &mut buf, &mut seen).await else {
            continue;
        };
        drop(connecting);
        for target in &targets {
            let source = &sources[next_source % sources.len()];
            next_source += 1;
            if source.send_to(&buf[..len], target).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The destination connection ID of a long-header packet.
fn destination_cid(datagram: &[u8]) -> Option<&[u8]> {
    let len = usize::from(*datagram.get(5)?);
    datagram.get(6..6 + len)
}

/// Waits (briefly) for a datagram at `sink` whose connection ID is not in `seen`; its length.
async fn next_new_initial(
    sink: &tokio::net::UdpSocket,
    buf: &mut [u8],
    seen: &mut std::collections::HashSet<Vec<u8>>,
) -> Option<usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let (len, _) = tokio::time::timeout_at(deadline, sink.recv_from(buf))
            .await
            .ok()?
            .ok()?;
        let Some(cid) = destination_cid(&buf[..len]) else {
            continue;
        };
        if seen.len() > 100_000 {
            seen.clear();
        }
        if seen.insert(cid.to_vec()) {
            return Some(len);
        }
    }
}

/// A client with no certificate that would accept any server: it never gets that far.
fn client_config() -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC suites");
    quinn::ClientConfig::new(Arc::new(crypto))
}

#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
