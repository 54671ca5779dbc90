//! The peer port under abuse and restarts, between real `meridian` processes: an
//! unauthenticated flood does not keep real links from forming (F3), a refused client learns
//! nothing of the topology (F16), and a SIGKILL-restarted node is back at its peers at once,
//! in data and in what they report (F11, F12).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_harness::{
    ApiClient, DEADLINE, frame, free_tcp_port, free_udp_port, hello, loopback, metric, poll_until,
    write_certs,
};
use meridian_node::config::Topology;
use meridian_node::peer::tls::{self, PeerTls};
use meridian_tests::flood::Flood;
use meridian_tests::restart::{
    link_report, put_until_acknowledged, unix_ms_now, visible_everywhere_after,
};
use meridian_tests::{Cluster, NodeSpec, topology_text};
use serde_json::json;

/// Polls until `api`'s node reports both links to `peer` up, in status and metrics, and
/// established at or after `since_unix_ms`.
async fn wait_links_up(api: &ApiClient, peer: &NodeSpec, since_unix_ms: u64) -> bool {
    poll_until(DEADLINE, || async {
        link_report(api, &peer.id, &peer.region)
            .await
            .is_some_and(|r| r.all_up_since(since_unix_ms))
    })
    .await
}

/// Lines of `log` that contain `text`.
fn lines_with(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_initials_does_not_keep_a_restarted_peer_out() {
    let (mut cluster, client) = Cluster::running(2).await;
    let (eu, us) = (cluster.api(0, &client), cluster.api(1, &client));
    let (eu_spec, us_spec) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    assert!(wait_links_up(&eu, &us_spec, 0).await, "{}", cluster.log(0));
    let started = Instant::now();
    // Fresh Initials without a certificate, never completed, at both peer ports.
    let flood = Flood::start(vec![eu_spec.peer, us_spec.peer], 100).await;
    assert!(
        poll_until(DEADLINE, || async { flood.sent() >= 200 }).await,
        "the flood did not get going"
    );
    // A real peer restarts into the flood: every one of its links needs a new handshake.
    cluster.kill(1);
    let restarted = unix_ms_now();
    cluster.start(1);
    cluster.wait_ready(1, &client).await;
    let sent_before = flood.sent();
    assert!(
        wait_links_up(&eu, &us_spec, restarted).await
            && wait_links_up(&us, &eu_spec, restarted).await,
        "the links did not form during the flood; logs:\n{}\n{}",
        cluster.log(0),
        cluster.log(1)
    );
    put_until_acknowledged(&us, "flood/from-us", &json!({"n": 1}), DEADLINE)
        .await
        .expect("the restarted node takes writes");
    put_until_acknowledged(&eu, "flood/from-eu", &json!({"n": 2}), DEADLINE)
        .await
        .expect("eu-west takes writes");
    assert!(eu.wait_for_record("flood/from-us", DEADLINE).await);
    assert!(us.wait_for_record("flood/from-eu", DEADLINE).await);
    assert!(
        flood.sent() > sent_before,
        "the flood went on while the links formed"
    );
    // Past the handshake deadline of the attempts the flood got in: the links stay up.
    let sent_at_links = flood.sent();
    assert!(
        poll_until(DEADLINE, || async { flood.sent() >= sent_at_links + 1_500 }).await,
        "the flood stalled"
    );
    for (api, peer) in [(&eu, &us_spec), (&us, &eu_spec)] {
        let report = link_report(api, &peer.id, &peer.region).await;
        assert!(
            report.as_ref().is_some_and(|r| r.all_up_since(restarted)),
            "{report:?}"
        );
    }
    // The flood was turned away, counted, and logged at a bounded rate.
    let metrics = eu.text("/metrics").await.unwrap_or_default();
    let retries = metric(&metrics, "meridian_peer_handshake_retries_total").unwrap_or(0.0);
    assert!(retries >= 10.0, "{metrics}");
    let sent = flood.sent();
    drop(flood);
    let log = cluster.log(0);
    let lines = lines_with(&log, "refused a connection attempt on the peer port")
        + lines_with(&log, "peer handshake failed");
    let windows = started.elapsed().as_secs() as usize / 10 + 2;
    eprintln!(
        "{sent} Initials in {:?}: {retries} Retries, {lines} log lines on eu-west-1",
        started.elapsed()
    );
    assert!(
        lines <= 2 * 5 * windows,
        "{lines} log lines for {sent} Initials: not rate-limited\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_with_a_ca_signed_certificate_learns_nothing_of_the_topology() {
    let mut cluster = Cluster::new(2);
    // eu-west-9 is not in the topology, but its certificate is signed by the cluster CA.
    let rogue_certs = cluster.dir.path().join("rogue-certs");
    std::fs::create_dir_all(&rogue_certs).expect("dir");
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(
            cluster.dir.path().join("certs").join(file),
            rogue_certs.join(file),
        )
        .expect("copy CA");
    }
    let rogue_peer = loopback(free_udp_port());
    let rogue_topology = cluster.dir.path().join("rogue.toml");
    topology_text(&cluster.nodes, "rogue-certs")
        .node(
            "eu-west-9",
            "eu-west",
            rogue_peer,
            loopback(free_tcp_port()),
        )
        .write(&rogue_topology);
    write_certs(&rogue_topology, &rogue_certs);
    cluster.start(0);
    let client = reqwest::Client::new();
    cluster.wait_ready(0, &client).await;

    tls::install_crypto_provider();
    let topology = Arc::new(Topology::load(&rogue_topology).expect("rogue topology"));
    let rogue = PeerTls::load(topology, "eu-west-9").expect("rogue identity");
    let endpoint = tls::endpoint(rogue_peer, &rogue).expect("endpoint");
    // TLS 1.3: the client is done before the server checks its certificate, so the dial
    // succeeds and the refusal arrives as the connection's close.
    let conn = tls::dial(&endpoint, &rogue, "eu-west-1", cluster.nodes[0].peer)
        .await
        .expect("the server's certificate is genuine");
    if let Ok((mut send, _recv)) = conn.open_bi().await {
        frame::write(&mut send, &hello("test", "eu-west-9", "eu-west")).await;
    }
    let closed = tokio::time::timeout(DEADLINE, conn.closed())
        .await
        .expect("the server closes the connection");
    let told = closed.to_string();
    for word in [
        "eu-west", "us-east", "region", "topology", "declare", "spiffe", "test/",
    ] {
        assert!(
            !told.contains(word),
            "the refused client was told {word:?}: {told}"
        );
    }
    match &closed {
        quinn::ConnectionError::ConnectionClosed(close) => {
            // access_denied (TLS alert 49) as a QUIC crypto error.
            assert_eq!(u64::from(close.error_code), 0x100 + 49, "{told}");
        }
        other => panic!("expected a refusal from the server, got {other}"),
    }
    endpoint.close(0u32.into(), b"done");
    // The node itself says why.
    let logged = poll_until(DEADLINE, || async {
        cluster.log(0).contains("eu-west-9") && cluster.log(0).contains("does not declare")
    })
    .await;
    assert!(
        logged,
        "the node did not log the reason:\n{}",
        cluster.log(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_restarted_node_is_back_at_its_peers_and_reported_connected() {
    let (mut cluster, client) = Cluster::running(3).await;
    let apis: Vec<ApiClient> = (0..3).map(|i| cluster.api(i, &client)).collect();
    let eu = cluster.nodes[0].clone();
    for api in &apis[1..] {
        assert!(wait_links_up(api, &eu, 0).await, "links never came up");
    }
    cluster.kill(0);
    let restarted = unix_ms_now();
    cluster.start(0);
    cluster.wait_ready(0, &client).await;
    let written = put_until_acknowledged(&apis[0], "restart/after", &json!({"n": 1}), DEADLINE)
        .await
        .expect("the restarted node takes writes");
    assert!(
        visible_everywhere_after(&apis[1..], "restart/after", written, DEADLINE)
            .await
            .is_some(),
        "the write on the restarted node never reached its peers; logs:\n{}\n{}",
        cluster.log(1),
        cluster.log(2)
    );
    for api in &apis[1..] {
        assert!(
            wait_links_up(api, &eu, restarted).await,
            "a peer does not report the restarted node connected; log:\n{}",
            cluster.log(1)
        );
    }
    // And it stays so: the stale links to the dead process end (by now, or at the latest at
    // the idle timeout) without overwriting what the links to the new process report.
    let watch_until = Instant::now() + tls::IDLE_TIMEOUT + Duration::from_secs(5);
    while Instant::now() < watch_until {
        for (i, api) in apis.iter().enumerate().skip(1) {
            if let Some(report) = link_report(api, &eu.id, &eu.region).await {
                assert!(
                    report.all_up(),
                    "node {i} reports the restarted node {report:?}; logs:\n{}\n{}",
                    cluster.log(i),
                    cluster.log(0)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
