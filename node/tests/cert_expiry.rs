//! Certificate expiry while running (finding F14): real `meridian` processes, one started with
//! a certificate that expires seconds later (rcgen, signed by the cluster CA). Its expiry is a
//! metric and a status field; once expired it is not ready; its peer, dialling it again and
//! again, logs the failure once, not once per retry.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_harness::{
    ApiClient, DEADLINE, NodeProcess, TopologyText, fixture, free_tcp_port, free_udp_port,
    loopback, metric, poll_until,
};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};

/// How long the short-lived certificate is valid after it is made: long enough for the node
/// to start on a loaded machine, short enough for a test.
const LIFETIME_S: i64 = 20;

#[allow(clippy::disallowed_methods)]
fn unix_now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// Replaces `node`'s certificate in `certs` by one signed by the CA there, valid from an hour
/// ago until `not_after_unix_s`. Returns nothing: the files are where the topology looks.
fn short_lived_certificate(certs: &Path, node: &str, uri: &str, not_after_unix_s: i64) {
    let ca_pem = std::fs::read_to_string(certs.join("ca.pem")).expect("ca.pem");
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).expect("ca.key"))
        .expect("CA key");
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA issuer");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("URI"))];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before =
        time::OffsetDateTime::from_unix_timestamp(unix_now_s() - 3600).expect("time");
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after_unix_s).expect("time");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(certs.join(format!("{node}.pem")), cert.pem()).expect("write cert");
    std::fs::write(certs.join(format!("{node}.key")), key.serialize_pem()).expect("write key");
}

async fn readyz(client: &reqwest::Client, node: &NodeProcess) -> Option<(u16, Value)> {
    let r = client.get(node.url("/readyz")).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

/// Lines of `log` (from byte `from` on) that say the link from `peer` failed.
fn link_failure_lines(log: &str, from: usize, peer: &str) -> Vec<String> {
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("replication link from peer failed") && l.contains(peer))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_certificate_expires_while_running_becomes_not_ready_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (eu_port, us_port) = (free_tcp_port(), free_tcp_port());
    let text = TopologyText::cluster("test")
        .tls("certs/ca.pem")
        .region("eu-west")
        .region("us-east")
        .node(
            "eu-1",
            "eu-west",
            loopback(free_udp_port()),
            loopback(eu_port),
        )
        .node(
            "us-1",
            "us-east",
            loopback(free_udp_port()),
            loopback(us_port),
        )
        .clock_max_drift_ms(500);
    let topology = fixture::write_with_certs(dir.path(), "topology.toml", &text);
    let not_after = unix_now_s() + LIFETIME_S;
    short_lived_certificate(
        &dir.path().join("certs"),
        "eu-1",
        "spiffe://test/region/eu-west/node/eu-1",
        not_after,
    );
    let us_api = loopback(us_port);
    let eu = NodeProcess::spawn(
        &topology,
        "eu-1",
        &dir.path().join("data/eu-1"),
        loopback(eu_port),
        &[],
    );
    let mut us = NodeProcess::spawn(
        &topology,
        "us-1",
        &dir.path().join("data/us-1"),
        us_api,
        &[],
    );
    let client = reqwest::Client::new();
    eu.assert_ready(&client, Duration::from_secs(LIFETIME_S as u64))
        .await;
    us.assert_ready(&client, DEADLINE).await;
    let api = ApiClient::new(eu.url(""));

    // While valid: the metrics count down, status shows notAfter, the start warned.
    let metrics = api.text("/metrics").await.expect("metrics");
    let node_left = metric(&metrics, "meridian_cert_expiry_seconds{cert=\"node\"}")
        .unwrap_or_else(|| panic!("no node certificate expiry metric:\n{metrics}"));
    assert!(
        node_left > -5.0 && node_left <= LIFETIME_S as f64,
        "seconds left {node_left}"
    );
    let ca_left =
        metric(&metrics, "meridian_cert_expiry_seconds{cert=\"ca\"}").expect("CA expiry metric");
    assert!(
        ca_left > 300.0 * 86_400.0,
        "the dev CA lasts years: {ca_left}"
    );
    let status = api.json("/v1/status").await;
    assert_eq!(
        status["certificate"]["not_after_unix_s"],
        json!(not_after),
        "{status}"
    );
    assert!(
        eu.log_text().contains("certificate expires soon"),
        "no warning at start; log:\n{}",
        eu.log_text()
    );

    // Once expired: not ready, with the reason; the metric is negative.
    let expired = poll_until(DEADLINE, || async {
        matches!(readyz(&client, &eu).await,
            Some((503, body)) if body["reason"] == json!("certificate_expired"))
    })
    .await;
    assert!(
        expired,
        "readyz never said certificate_expired: {:?}; log:\n{}",
        readyz(&client, &eu).await,
        eu.log_text()
    );
    let status = api.json("/v1/status").await;
    assert_eq!(status["ready"], json!(false), "{status}");
    assert_eq!(
        status["not_ready_reason"],
        json!("certificate_expired"),
        "{status}"
    );
    assert_eq!(status["certificate"]["expired"], json!(true), "{status}");
    let metrics = api.text("/metrics").await.expect("metrics");
    let node_left =
        metric(&metrics, "meridian_cert_expiry_seconds{cert=\"node\"}").expect("metric");
    assert!(node_left < 0.0, "negative once expired: {node_left}");
    // Readiness does not come back by itself (only a restart with a valid certificate).
    assert!(matches!(readyz(&client, &eu).await, Some((503, _))));

    // The peer restarts, so it must dial the expired node anew: every handshake fails, but
    // it says so once (per minute), not once per retry.
    us.sigterm();
    assert!(us.wait_exit(DEADLINE).is_some(), "us-1 did not stop");
    let log_from = us.log_text().len();
    let us = NodeProcess::spawn(
        &topology,
        "us-1",
        &dir.path().join("data/us-1"),
        us_api,
        &[],
    );
    us.assert_ready(&client, DEADLINE).await;
    let us_api_client = ApiClient::new(us.url(""));
    let retried = poll_until(DEADLINE, || async {
        us_api_client.text("/metrics").await.is_some_and(|m| {
            metric(
                &m,
                "meridian_replication_link_errors_total{peer_region=\"eu-west\"}",
            )
            .is_some_and(|n| n >= 5.0)
        })
    })
    .await;
    assert!(
        retried,
        "us-1 did not retry the link to eu-1 five times; log:\n{}",
        us.log_text()
    );
    let lines = link_failure_lines(&us.log_text(), log_from, "eu-1");
    assert_eq!(
        lines.len(),
        1,
        "one line for five failures within a minute, got:\n{}",
        lines.join("\n")
    );
    assert!(
        lines[0].contains("expired"),
        "the line says why: {}",
        lines[0]
    );
}
