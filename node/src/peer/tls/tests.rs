use super::*;
use crate::testing;
use crate::tools::certs::{generate_certs, load_issuer, node_params};
use rcgen::{KeyPair, SanType};
use std::fs;
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(20);

pub(crate) fn topology_in(dir: &Path, ca: &str) -> Arc<Topology> {
    let text = testing::topology_text(
        "test",
        ca,
        &[
            ("eu-west-1", "eu-west"),
            ("us-east-1", "us-east"),
            ("ap-south-1", "ap-south"),
        ],
    );
    Arc::new(testing::parse(&text, dir))
}

/// A topology in `dir` with its certificates generated.
pub(crate) fn cluster(dir: &Path) -> Arc<Topology> {
    install_crypto_provider();
    let topology = topology_in(dir, "certs/ca.pem");
    generate_certs(&topology, &dir.join("certs")).unwrap();
    topology
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub(crate) fn cert_der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

/// Signs a certificate with arbitrary URI SANs by the CA in `certs`; writes `name.pem`/`.key`.
fn forge(certs: &Path, name: &str, uris: &[&str]) -> (PathBuf, PathBuf) {
    let issuer = load_issuer(&certs.join("ca.pem"), &certs.join("ca.key")).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = node_params(
        name,
        uris[0],
        time::OffsetDateTime::from(crate::clock::wall_clock()),
    )
    .unwrap();
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
                // With the server's close reason, which is all a refused client learns.
                Err(e) => format!("{e}; {}", conn.closed().await),
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
    let (client_side, _) = assert_refused(&rogue, &b, "us-east-1").await;
    // The server knows why; the client is told only "access denied".
    let reason = b.certificate_refusals().last().unwrap();
    assert!(
        reason.to_string().contains("not trusted by the cluster CA"),
        "{reason}"
    );
    assert_tells_nothing(&client_side);

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
    let (client_side, server_side) = assert_refused(&c, &impostor, "eu-west-1").await;
    assert!(
        client_side.contains("us-east-1") && client_side.contains("eu-west-1"),
        "client: {client_side}"
    );
    // The impostor, not authenticated, learns nothing of what the dialler expected.
    assert_tells_nothing(&server_side.unwrap().to_string());

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
    let (client_side, _) = assert_refused(&misplaced, &c, "ap-south-1").await;
    let reason = c.certificate_refusals().last().unwrap();
    assert!(
        matches!(reason, IdentityError::WrongRegion { .. }),
        "{reason}"
    );
    assert_tells_nothing(&client_side);
}

/// What a refused client read names no node, region, cluster, check or clock of the server.
fn assert_tells_nothing(client_side: &str) {
    for word in [
        "eu-west", "us-east", "ap-south", "region", "topology", "declare", "spiffe", "trusted",
        "CA", "Issuer", "expired",
    ] {
        assert!(
            !client_side.contains(word),
            "the refused client was told {word:?}: {client_side}"
        );
    }
    assert!(
        client_side.contains("ApplicationVerificationFailure") || client_side.contains("access"),
        "{client_side}"
    );
}

#[tokio::test]
async fn a_client_certificate_of_an_undeclared_node_is_refused_without_naming_the_topology() {
    let dir = tempfile::tempdir().unwrap();
    let topology = cluster(dir.path());
    let certs = dir.path().join("certs");
    let (cert, key) = forge(
        &certs,
        "undeclared",
        &["spiffe://test/region/eu-west/node/eu-west-9"],
    );
    let stranger = PeerTls::from_files(
        topology.clone(),
        "eu-west-1",
        &topology.tls.ca,
        &cert,
        &key,
        false,
    )
    .unwrap();
    let b = PeerTls::load(topology, "us-east-1").unwrap();
    let (client_side, server_side) = assert_refused(&stranger, &b, "us-east-1").await;
    assert_tells_nothing(&client_side);
    // The access_denied alert (49) as a QUIC crypto error (0x100 + alert).
    match server_side {
        Some(quinn::ConnectionError::TransportError(e)) => {
            assert_eq!(u64::from(e.code), 0x100 + 49, "{e}");
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
    let reason = b.certificate_refusals().last().unwrap();
    assert!(reason.to_string().contains("eu-west-9"), "{reason}");
    assert_eq!(b.certificate_refusals().count(), 1);
}

#[test]
fn every_node_id_gives_a_usable_server_name() {
    for id in ["eu-west-1", "a", "n.1", "1.2.3.4", "_x", "-a-"] {
        assert!(ServerName::try_from(server_name(id)).is_ok(), "{id}");
    }
    assert_eq!(server_name("eu-west-1"), "eu-west-1");
}

/// A UDP relay for one client: `at` forwards to `to`, answers go back; until aborted.
async fn relay(at: tokio::net::UdpSocket, to: SocketAddr) {
    let upstream = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
    let mut client = None;
    let (mut down, mut up) = ([0u8; 2048], [0u8; 2048]);
    loop {
        tokio::select! {
            Ok((n, from)) = at.recv_from(&mut down) => {
                client = Some(from);
                let _ = upstream.send_to(&down[..n], to).await;
            }
            Ok((n, _)) = upstream.recv_from(&mut up) => {
                if let Some(c) = client {
                    let _ = at.send_to(&up[..n], c).await;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_restarted_node_resets_the_connections_of_its_previous_process_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let topology = cluster(dir.path());
    let a = PeerTls::load(topology.clone(), "eu-west-1").unwrap();
    let b = PeerTls::load(topology.clone(), "us-east-1").unwrap();
    let b_ep = endpoint(localhost(), &b).unwrap();
    // us-east-1 is reached at `b_addr`, through a relay that stands for its process.
    let relay_socket = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
    let b_addr = relay_socket.local_addr().unwrap();
    let relaying = tokio::spawn(relay(relay_socket, b_ep.local_addr().unwrap()));
    let accepting = tokio::spawn({
        let b_ep = b_ep.clone();
        async move { b_ep.accept().await.unwrap().await.unwrap() }
    });
    let a_ep = endpoint(localhost(), &a).unwrap();
    let conn = timeout(DEADLINE, dial(&a_ep, &a, "us-east-1", b_addr))
        .await
        .unwrap()
        .unwrap();
    let _b_side = timeout(DEADLINE, accepting).await.unwrap().unwrap();
    // us-east-1 "dies" without a word (nothing answers at its address any more), and a new
    // process with the same key files binds that address.
    relaying.abort();
    let _ = relaying.await;
    let b_again = PeerTls::load(topology, "us-east-1").unwrap();
    let b2_ep = endpoint(b_addr, &b_again).unwrap();
    // The next packet on the old connection is answered by a reset the dialer can verify,
    // long before the idle timeout.
    let started = std::time::Instant::now();
    conn.send_datagram(bytes::Bytes::from_static(b"?")).unwrap();
    let closed = timeout(DEADLINE, conn.closed()).await.unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::Reset),
        "expected a stateless reset, got {closed} after {:?}",
        started.elapsed()
    );
    b_ep.close(0u32.into(), b"done");
    b2_ep.close(0u32.into(), b"done");
    a_ep.close(0u32.into(), b"done");
}
