//! Active-active replication between real `meridian` processes over QUIC with mutual TLS.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meridian_harness::{
    ApiClient, DEADLINE, TopologyText, frame, free_udp_port, hello, loopback, metric, poll_until,
    write_certs,
};
use meridian_replication::wire::Message;
use meridian_tests::{Cluster, topology_text};
use serde_json::{Value, json};

/// Every node's API through `client`.
fn apis(cluster: &Cluster, client: &reqwest::Client) -> Vec<ApiClient> {
    (0..cluster.nodes.len())
        .map(|i| cluster.api(i, client))
        .collect()
}

/// PUT `body` at `key`; panics unless it is acknowledged.
async fn put_ok(api: &ApiClient, key: &str, body: Value) {
    let (status, answer) = api.put(key, body).await;
    assert_eq!(status, 200, "PUT {key}: {answer}");
}

/// A metric of `api`'s node, `None` while it does not answer or lacks the metric.
async fn metric_of(api: &ApiClient, name_and_labels: &str) -> Option<f64> {
    metric(&api.text("/metrics").await?, name_and_labels)
}

/// The peer entry for `node` in a `/v1/status` document.
fn peer_in<'a>(status: &'a Value, node: &str) -> &'a Value {
    status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == node)
        .unwrap_or_else(|| panic!("no peer {node} in {status}"))
}

/// The part of a read that must be identical in every region.
fn converged_part(v: &Value) -> Value {
    json!({"value": v["value"], "conflicts": v.get("conflicts").cloned().unwrap_or(json!({})), "version": v["version"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_converge_under_concurrent_writes() {
    let (cluster, client) = Cluster::running(3).await;
    let nodes = apis(&cluster, &client);
    let increments = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for (node, node_api) in nodes.iter().enumerate() {
        for w in 0..3 {
            let api = node_api.clone();
            let increments = increments.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..25 {
                    // Unique keys, keys written by every region at once, and a shared counter.
                    let unique = json!({"node": node, "w": w, "i": i});
                    put_ok(&api, &format!("u/{node}/{w}/{i}"), unique).await;
                    let hot = json!({"by": format!("{node}-{w}"), "i": i});
                    assert_eq!(api.patch(&format!("hot/{}", i % 5), hot).await.0, 200);
                    let (status, _) = api.incr("counter", json!({"field": "n", "by": 1})).await;
                    if status == 200 {
                        increments.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for w in writers {
        w.await.expect("writer");
    }
    let mut keys: Vec<String> = (0..5).map(|i| format!("hot/{i}")).collect();
    keys.push("counter".into());
    for node in 0..3 {
        for w in 0..3 {
            for i in 0..25 {
                keys.push(format!("u/{node}/{w}/{i}"));
            }
        }
    }
    let expected = increments.load(Ordering::Relaxed);
    assert_eq!(expected, 225, "every increment was acknowledged");
    let converged = poll_until(DEADLINE, || {
        let (keys, nodes) = (keys.clone(), nodes.clone());
        async move {
            for key in &keys {
                let mut seen = Vec::new();
                for node in &nodes {
                    match node.record(key).await {
                        Some(v) => seen.push(converged_part(&v)),
                        None => return false,
                    }
                }
                if seen.iter().any(|v| *v != seen[0]) {
                    return false;
                }
                if key == "counter" && seen[0]["value"]["n"] != json!(expected) {
                    return false;
                }
            }
            true
        }
    })
    .await;
    if !converged {
        let mut report = BTreeMap::new();
        for node in &nodes {
            report.insert(node.url(""), node.record("counter").await);
        }
        panic!(
            "regions did not converge within {DEADLINE:?}: counter per region {report:?}\nlogs:\n{}\n{}\n{}",
            cluster.log(0),
            cluster.log(1),
            cluster.log(2)
        );
    }
    // Status shows every peer connected; lag figures exist for the links that delivered changes
    // first (a change may arrive directly or relayed by the third region, whichever is sooner).
    let status = nodes[0].json("/v1/status").await;
    let peers = status["peers"].as_array().expect("peers");
    for peer in peers {
        assert_eq!(peer["connected"], json!(true), "{peer}");
    }
    assert!(
        peers.iter().any(|p| p["lag_ms"].as_u64().is_some()),
        "{status}"
    );
    let metrics = nodes[0].text("/metrics").await.unwrap_or_default();
    assert!(
        ["us-east", "ap-south"].iter().any(|r| metric(
            &metrics,
            &format!("meridian_replication_lag_seconds{{peer_region=\"{r}\"}}")
        )
        .is_some()),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "meridian_peer_up{peer=\"us-east-1\",peer_region=\"us-east\",direction=\"inbound\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_gets_nothing() {
    let mut cluster = Cluster::new(3);
    // Node 2 gets certificates from a CA of its own, and a topology copy that trusts that CA.
    let foreign_topology = cluster.dir.path().join("foreign.toml");
    topology_text(&cluster.nodes, "foreign-certs").write(&foreign_topology);
    write_certs(&foreign_topology, &cluster.dir.path().join("foreign-certs"));
    cluster.start(0);
    cluster.start(1);
    cluster.start_with(2, &foreign_topology, &[]);
    let client = reqwest::Client::new();
    cluster.wait_all_ready(&client).await;
    let nodes = apis(&cluster, &client);
    put_ok(&nodes[0], "from-a", json!({"from": 0})).await;
    put_ok(&nodes[2], "from-foreign", json!({"from": 2})).await;
    // Positive control: the trusted pair replicates.
    assert!(
        nodes[1].wait_for_record("from-a", DEADLINE).await,
        "trusted nodes did not replicate; logs:\n{}\n{}",
        cluster.log(0),
        cluster.log(1)
    );
    // Give the foreign node as long again, then check that nothing crossed in either direction.
    let leaked = poll_until(std::time::Duration::from_secs(5), || {
        let (a, b, f) = (nodes[0].clone(), nodes[1].clone(), nodes[2].clone());
        async move {
            f.record("from-a").await.is_some()
                || a.record("from-foreign").await.is_some()
                || b.record("from-foreign").await.is_some()
        }
    })
    .await;
    assert!(
        !leaked,
        "data crossed between trusted nodes and the foreign node"
    );
    let status = nodes[0].json("/v1/status").await;
    let peer = peer_in(&status, "ap-south-1");
    assert_eq!(peer["connected"], json!(false), "{peer}");
    assert!(
        peer["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "the refusal is visible: {peer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_without_a_full_resend() {
    const SENT_TO_US: &str = "meridian_replication_changes_sent_total{peer_region=\"us-east\"}";
    let (mut cluster, client) = Cluster::running(2).await;
    let (a, b) = (cluster.api(0, &client), cluster.api(1, &client));
    for i in 0..200 {
        put_ok(&a, &format!("k/{i}"), json!({"i": i})).await;
    }
    let has = |n: usize| {
        let b = b.clone();
        async move {
            b.try_json("/v1/kv?prefix=k/&limit=1000")
                .await
                .and_then(|v| v["items"].as_array().map(Vec::len))
                == Some(n)
        }
    };
    let sent_to_us = |n: f64| {
        let a = a.clone();
        async move { metric_of(&a, SENT_TO_US).await == Some(n) }
    };
    assert!(
        poll_until(DEADLINE, || has(200)).await,
        "first 200 did not replicate"
    );
    // Wait until the sender has its acknowledgements, so that what follows is all new.
    assert!(
        poll_until(DEADLINE, || sent_to_us(200.0)).await,
        "sender did not count 200 acknowledged changes"
    );
    cluster.stop(1);
    for i in 200..250 {
        let (status, _) = a.put(&format!("k/{i}"), json!({"i": i})).await;
        assert_eq!(status, 200, "writes continue while the peer is down");
    }
    cluster.start(1);
    cluster.wait_ready(1, &client).await;
    assert!(
        poll_until(DEADLINE, || has(250)).await,
        "backlog did not replicate after restart; log:\n{}",
        cluster.log(1)
    );
    assert_eq!(
        metric_of(
            &b,
            "meridian_replication_changes_applied_total{peer_region=\"eu-west\"}"
        )
        .await,
        Some(50.0),
        "the restarted node applied only the 50 changes it lacked"
    );
    let metrics_a = a.text("/metrics").await.unwrap_or_default();
    assert!(
        poll_until(DEADLINE, || sent_to_us(250.0)).await,
        "the sender resent more than the 50 new changes: {metrics_a}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_of_another_node_is_refused() {
    let mut cluster = Cluster::new(3);
    cluster.start(0);
    cluster.start(1);
    let client = reqwest::Client::new();
    cluster.wait_ready(0, &client).await;
    cluster.wait_ready(1, &client).await;
    let eu = cluster.api(0, &client);
    put_ok(&eu, "secret", json!({"x": 1})).await;

    // The impostor holds us-east-1's genuine certificate and key, and sits at ap-south-1's
    // peer address.
    let impostor = cluster.impersonate("us-east-1", 2);

    // 1. eu-west-1 dials "ap-south-1" and is answered with us-east-1's certificate: refused.
    let refused = poll_until(DEADLINE, || {
        let eu = eu.clone();
        async move {
            let Some(status) = eu.try_json("/v1/status").await else {
                return false;
            };
            status["peers"].as_array().into_iter().flatten().any(|p| {
                p["node"] == "ap-south-1"
                    && p["connected"] == json!(false)
                    && p["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("us-east-1") || e.contains("ap-south-1"))
            })
        }
    })
    .await;
    assert!(
        refused,
        "eu-west-1 did not refuse the impostor; log:\n{}",
        cluster.log(0)
    );

    // 2. The impostor dials eu-west-1 presenting us-east-1's certificate but claims to be
    // ap-south-1 in its Hello: the link is closed, with the reason, and carries no data.
    let conn = meridian_node::peer::tls::dial(
        &impostor.endpoint,
        &impostor.tls,
        "eu-west-1",
        cluster.nodes[0].peer,
    )
    .await
    .expect("TLS succeeds: the certificate itself is genuine");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    frame::write(&mut send, &hello("test", "ap-south-1", "ap-south")).await;
    match frame::read(&mut recv).await {
        Some(Message::Close { reason }) => assert!(reason.contains("authenticated as"), "{reason}"),
        other => panic!("expected a Close naming the identity mismatch, got {other:?}"),
    }
    assert!(
        frame::read(&mut recv).await.is_none(),
        "nothing follows the refusal"
    );
    // The connection's close reason says the same.
    let closed = conn.closed().await;
    assert!(closed.to_string().contains("authenticated as"), "{closed}");
    impostor.endpoint.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_relayed_when_the_direct_link_is_cut() {
    // eu-west <-> ap-south is routed to a port where nothing listens: the direct link is cut
    // in both directions, and everything must flow through us-east.
    let links = TopologyText::new()
        .link("eu-west-1", "ap-south-1", loopback(free_udp_port()))
        .link("ap-south-1", "eu-west-1", loopback(free_udp_port()));
    let mut cluster = Cluster::with_extra(3, &links);
    cluster.start_all();
    let client = reqwest::Client::new();
    cluster.wait_all_ready(&client).await;
    let (eu, ap) = (cluster.api(0, &client), cluster.api(2, &client));
    for i in 0..20 {
        put_ok(&eu, &format!("relay/eu/{i}"), json!({"i": i})).await;
        let (status, body) = ap.incr("relay/ctr", json!({"field": "n"})).await;
        assert_eq!(status, 200, "{body}");
    }
    let ok = poll_until(DEADLINE, || {
        let (eu, ap) = (eu.clone(), ap.clone());
        async move {
            for i in 0..20 {
                if ap.record(&format!("relay/eu/{i}")).await.is_none() {
                    return false;
                }
            }
            matches!(eu.record("relay/ctr").await, Some(v) if v["value"]["n"] == json!(20))
        }
    })
    .await;
    assert!(
        ok,
        "changes did not travel eu-west -> us-east -> ap-south and back; logs:\n{}\n{}\n{}",
        cluster.log(0),
        cluster.log(1),
        cluster.log(2)
    );
    // The direct links really are down.
    let status = eu.json("/v1/status").await;
    let ap_peer = peer_in(&status, "ap-south-1");
    assert_eq!(ap_peer["receiving"]["connected"], json!(false), "{ap_peer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stamped_beyond_the_drift_are_held_then_applied_and_others_keep_flowing() {
    let mut cluster = Cluster::new(3);
    // eu-west-1's clock runs 4 s fast: far beyond the 500 ms max drift.
    let topology = cluster.topology.clone();
    cluster.start_with(0, &topology, &["--test-clock-offset-ms", "4000"]);
    cluster.start(1);
    cluster.start(2);
    let client = reqwest::Client::new();
    cluster.wait_all_ready(&client).await;
    let nodes = apis(&cluster, &client);
    let (eu, us, ap) = (&nodes[0], &nodes[1], &nodes[2]);
    put_ok(eu, "skewed", json!({"from": "eu"})).await;
    put_ok(ap, "normal", json!({"from": "ap"})).await;
    // The stream keeps flowing for everything else: ap's write reaches us-east.
    assert!(us.wait_for_record("normal", DEADLINE).await);
    // eu's change is held, counted and visible, not applied (yet).
    let held = poll_until(DEADLINE, || {
        let us = us.clone();
        async move {
            let Some(text) = us.text("/metrics").await else {
                return false;
            };
            // The skewed change may arrive directly or relayed through ap-south: count both.
            ["eu-west", "ap-south"]
                .iter()
                .filter_map(|region| {
                    metric(
                        &text,
                        &format!(
                            "meridian_replication_drift_refusals_total{{peer_region=\"{region}\"}}"
                        ),
                    )
                })
                .sum::<f64>()
                >= 1.0
        }
    })
    .await;
    assert!(held, "no drift refusal counted; log:\n{}", cluster.log(1));
    let status = us.json("/v1/status").await;
    let refusals: u64 = status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["receiving"]["drift_refusals"].as_u64())
        .sum();
    assert!(
        refusals >= 1,
        "drift refusals visible per peer in status: {status}"
    );
    // Once real time passes the stamp, the held change is applied: nothing was lost.
    assert!(
        us.wait_for_record("skewed", DEADLINE).await,
        "the held change was never applied; log:\n{}",
        cluster.log(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_never_saw_each_other_show_identical_conflicts() {
    let mut cluster = Cluster::new(2);
    let client = reqwest::Client::new();
    let (a, b) = (cluster.api(0, &client), cluster.api(1, &client));
    // Each region writes while the other is down: the writes are truly concurrent.
    cluster.start(0);
    cluster.wait_ready(0, &client).await;
    put_ok(&a, "doc", json!({"color": "red", "a": 1})).await;
    cluster.stop(0);
    cluster.start(1);
    cluster.wait_ready(1, &client).await;
    put_ok(&b, "doc", json!({"color": "blue", "b": 2})).await;
    cluster.start(0);
    cluster.wait_ready(0, &client).await;
    let converged = poll_until(DEADLINE, || {
        let (a, b) = (a.clone(), b.clone());
        async move {
            match (a.record("doc").await, b.record("doc").await) {
                (Some(x), Some(y)) => {
                    converged_part(&x) == converged_part(&y) && x.get("conflicts").is_some()
                }
                _ => false,
            }
        }
    })
    .await;
    assert!(
        converged,
        "no identical conflicts; logs:\n{}\n{}",
        cluster.log(0),
        cluster.log(1)
    );
    let doc = a.record("doc").await.expect("doc");
    // Fields written on one side only merge; the field written on both shows one value and
    // the other as its conflict.
    assert_eq!(doc["value"]["a"], json!(1));
    assert_eq!(doc["value"]["b"], json!(2));
    let winner = doc["value"]["color"].clone();
    let losers = doc["conflicts"]["/color"]
        .as_array()
        .cloned()
        .expect("conflict on /color");
    let mut all = vec![winner];
    all.extend(losers);
    all.sort_by_key(|v| v.to_string());
    assert_eq!(all, vec![json!("blue"), json!("red")], "{doc}");
}

/// The commit log of `data_dir`: each entry's sequence number, offset, payload length and keys.
fn logged_batches(data_dir: &std::path::Path) -> Vec<(u64, usize, usize, Vec<String>)> {
    let back = meridian_node::store::commit_log::CommitLog::read(data_dir).expect("read log");
    let mut at = 0;
    back.entries
        .iter()
        .map(|e| {
            let keys = if e.payload.is_empty() {
                Vec::new()
            } else {
                meridian_node::store::batch_keys(e).expect("a batch")
            };
            let entry = (e.seq, at, e.payload.len(), keys);
            at += 16 + e.payload.len();
            entry
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_acknowledged_writes_gets_them_back_from_its_peers() {
    let (mut cluster, client) = Cluster::running(2).await;
    let [eu, us] = [cluster.api(0, &client), cluster.api(1, &client)];
    let data = cluster.data_dir(0);
    // Writes on eu-west, one batch each, until its log holds several since its checkpoint;
    // then eu-west is frozen so that the log stays as it is.
    let mut written = Vec::new();
    for i in 0..20_000 {
        let key = format!("lost/{i:05}");
        put_ok(&eu, &key, json!({"i": i})).await;
        written.push(key);
        if logged_batches(&data).len() >= 8 {
            break;
        }
    }
    cluster.freeze(0);
    let batches = logged_batches(&data);
    // The batch to damage: one us-east holds, with intact batches after it.
    let mut victim = None;
    for (seq, at, len, keys) in &batches[1..batches.len() - 1] {
        let [key] = keys.as_slice() else { continue };
        let held = poll_until(std::time::Duration::from_secs(10), || async {
            us.get(key).await.0 == 200
        })
        .await;
        if held {
            victim = Some((*seq, *at, *len, key.clone()));
            break;
        }
    }
    let (seq, at, len, lost_key) = victim.expect("us-east holds one of the logged writes");
    cluster.kill(0);
    let log = data.join("commit.log");
    let mut bytes = std::fs::read(&log).expect("read");
    bytes[at + 16 + len / 2] ^= 0x01;
    std::fs::write(&log, &bytes).expect("write");

    let topology = cluster.topology.clone();
    cluster.start_with(0, &topology, &["--recover"]);
    cluster.wait_ready(0, &client).await;
    let back = poll_until(DEADLINE, || async { eu.get(&lost_key).await.0 == 200 }).await;
    assert!(
        back,
        "batch {seq} ({lost_key}) was not sent back; log:\n{}",
        cluster.log(0)
    );
    // Everything else eu-west acknowledged is there too, and new writes still flow.
    for key in &written {
        if *key != lost_key {
            assert_eq!(eu.get(key).await.0, 200, "{key}");
        }
    }
    put_ok(&eu, "after/recovery", json!({"ok": true})).await;
    let flowed = poll_until(DEADLINE, || async {
        us.get("after/recovery").await.0 == 200
    })
    .await;
    assert!(flowed, "a write after the recovery did not replicate");
}
