//! A node whose clock is off (finding F15): three real `meridian` processes, one started 10 s
//! ahead or behind (`--test-clock-offset-ms`). From the clock readings in its peers' messages
//! it finds itself off, in `/v1/status`, the metrics and its log; its peers, in sync with each
//! other, see its offset but do not think themselves off.

use std::path::Path;
use std::time::Instant;

use meridian_harness::{
    ApiClient, DEADLINE, NodeProcess, TopologyText, fixture, free_tcp_port, free_udp_port,
    loopback, metric, poll_until,
};
use serde_json::{Value, json};

const SKEW_MS: i64 = 10_000;
/// How far an estimate may be from the skew on a loaded machine (one-way samples include the
/// delay of a message).
const TOLERANCE_MS: i64 = 2_000;
const MAX_DRIFT_MS: u64 = 500;
const NODES: [(&str, &str); 3] = [("a-1", "ra"), ("b-1", "rb"), ("c-1", "rc")];

fn start(topology: &Path, dir: &Path, node: &str, port: u16, extra: &[&str]) -> NodeProcess {
    NodeProcess::spawn(
        topology,
        node,
        &dir.join("data").join(node),
        loopback(port),
        extra,
    )
}

async fn clock_of(api: &ApiClient) -> Value {
    api.try_json("/v1/status")
        .await
        .map(|s| s["clock"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ten_seconds_ahead_says_its_clock_is_off_and_its_peers_do_not() {
    skewed_node_says_its_clock_is_off(SKEW_MS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ten_seconds_behind_says_its_clock_is_off_and_its_peers_do_not() {
    skewed_node_says_its_clock_is_off(-SKEW_MS).await;
}

fn near(value: i64, target: i64) -> bool {
    (value - target).abs() <= TOLERANCE_MS
}

/// Node a-1 runs `skew_ms` off; b-1 and c-1 are in sync.
async fn skewed_node_says_its_clock_is_off(skew_ms: i64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports: Vec<u16> = NODES.iter().map(|_| free_tcp_port()).collect();
    let mut text = TopologyText::cluster("skew").tls("certs/ca.pem");
    for (_, region) in NODES {
        text = text.region(region);
    }
    for ((node, region), port) in NODES.iter().zip(&ports) {
        text = text.node(node, region, loopback(free_udp_port()), loopback(*port));
    }
    let text = text.clock_max_drift_ms(MAX_DRIFT_MS);
    let topology = fixture::write_with_certs(dir.path(), "topology.toml", &text);
    let started = Instant::now();
    let skew = skew_ms.to_string();
    let nodes = [
        start(
            &topology,
            dir.path(),
            NODES[0].0,
            ports[0],
            &["--test-clock-offset-ms", &skew],
        ),
        start(&topology, dir.path(), NODES[1].0, ports[1], &[]),
        start(&topology, dir.path(), NODES[2].0, ports[2], &[]),
    ];
    let client = reqwest::Client::new();
    for node in &nodes {
        node.assert_ready(&client, DEADLINE).await;
    }
    let apis: Vec<ApiClient> = nodes
        .iter()
        .map(|n| ApiClient::with_http(client.clone(), n.url("")))
        .collect();
    let (skewed, in_sync) = (&apis[0], &apis[1]);

    // The skewed node finds both peers about 10 s behind it.
    let off = poll_until(DEADLINE, || async {
        let clock = clock_of(skewed).await;
        clock["off"] == json!(true) && NODES[1..].iter().all(|(p, _)| clock["peers"][p].is_i64())
    })
    .await;
    assert!(
        off,
        "the skewed node never said its clock is off: {}; log:\n{}",
        clock_of(skewed).await,
        nodes[0].log_text()
    );
    let clock = clock_of(skewed).await;
    let estimate = clock["offset_ms_estimate"].as_i64().expect("estimate");
    assert!(near(estimate, skew_ms), "offset {estimate} ms: {clock}");
    assert_eq!(clock["max_drift_ms"], json!(MAX_DRIFT_MS), "{clock}");
    for (peer, _) in &NODES[1..] {
        let offset = clock["peers"][peer].as_i64().unwrap_or(0);
        assert!(near(offset, skew_ms), "{peer}: {offset} ms; {clock}");
    }
    // The gauges follow within the watch's next check.
    let flagged = poll_until(DEADLINE, || async {
        skewed
            .text("/metrics")
            .await
            .is_some_and(|m| metric(&m, "meridian_clock_off") == Some(1.0))
    })
    .await;
    assert!(flagged, "meridian_clock_off never became 1");
    let metrics = skewed.text("/metrics").await.expect("metrics");
    let to_b = metric(&metrics, "meridian_clock_offset_ms{peer=\"b-1\"}").expect("per-peer gauge");
    assert!(near(to_b as i64, skew_ms), "{to_b}");

    // A node in sync sees the skewed one 10 s behind it, the other in sync: one of two peers
    // is not a majority, so its own clock is fine.
    let measured = poll_until(DEADLINE, || async {
        let clock = clock_of(in_sync).await;
        clock["peers"]["a-1"]
            .as_i64()
            .is_some_and(|o| near(o, -skew_ms))
            && clock["peers"]["c-1"].is_i64()
    })
    .await;
    assert!(
        measured,
        "the in-sync node never measured both peers: {}",
        clock_of(in_sync).await
    );
    let clock = clock_of(in_sync).await;
    assert_eq!(clock["off"], json!(false), "{clock}");
    let to_c = clock["peers"]["c-1"].as_i64().expect("c-1");
    assert!(
        to_c.unsigned_abs() <= MAX_DRIFT_MS,
        "in sync with c-1: {to_c}"
    );
    let metrics = in_sync.text("/metrics").await.expect("metrics");
    assert_eq!(
        metric(&metrics, "meridian_clock_off"),
        Some(0.0),
        "{metrics}"
    );

    // The skewed node said so in its log, at most once a minute.
    let log = nodes[0].log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("clock is off from its peers'"))
        .count();
    let minutes = started.elapsed().as_secs() / 60;
    assert!(
        lines >= 1 && lines as u64 <= 1 + minutes,
        "{lines} clock lines in {minutes} min; log:\n{log}"
    );
    assert!(
        !nodes[1].log_text().contains("clock is off from its peers'"),
        "the in-sync node does not warn"
    );
}
