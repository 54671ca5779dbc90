//! Active-active replication between real `meridian` processes over QUIC with mutual TLS.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meridian_tests::{
    Cluster, DEADLINE, frame_read, frame_write, get, get_json, get_text, metric, poll_until,
    topology_text,
};
use serde_json::{Value, json};

/// The part of a read that must be identical in every region.
fn converged_part(v: &Value) -> Value {
    json!({"value": v["value"], "conflicts": v.get("conflicts").cloned().unwrap_or(json!({})), "version": v["version"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_converge_under_concurrent_writes() {
    let mut cluster = Cluster::new(3, "");
    cluster.start_all();
    let client = reqwest::Client::new();
    for i in 0..3 {
        cluster.wait_ready(i, &client).await;
    }
    let increments = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for node in 0..3 {
        for w in 0..3 {
            let base = cluster.url(node, "");
            let client = client.clone();
            let increments = increments.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..25 {
                    // Unique keys, keys written by every region at once, and a shared counter.
                    let unique = json!({"node": node, "w": w, "i": i});
                    let r = client
                        .put(format!("{base}/v1/kv/u/{node}/{w}/{i}"))
                        .json(&unique)
                        .send()
                        .await;
                    assert_eq!(r.map(|r| r.status().as_u16()).ok(), Some(200));
                    let hot = json!({"by": format!("{node}-{w}"), "i": i});
                    let r = client
                        .patch(format!("{base}/v1/kv/hot/{}", i % 5))
                        .json(&hot)
                        .send()
                        .await;
                    assert_eq!(r.map(|r| r.status().as_u16()).ok(), Some(200));
                    let r = client
                        .post(format!("{base}/v1/kv/counter/incr"))
                        .json(&json!({"field": "n", "by": 1}))
                        .send()
                        .await;
                    if matches!(r, Ok(ref r) if r.status() == 200) {
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
        let client = client.clone();
        let keys = keys.clone();
        let bases: Vec<String> = (0..3).map(|i| cluster.url(i, "")).collect();
        async move {
            for key in &keys {
                let mut seen = Vec::new();
                for base in &bases {
                    match get(&client, base, key).await {
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
        for base in (0..3).map(|i| cluster.url(i, "")) {
            report.insert(base.clone(), get(&client, &base, "counter").await);
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
    let status: Value = get_json(&client, cluster.url(0, "/v1/status")).await;
    let peers = status["peers"].as_array().expect("peers");
    for peer in peers {
        assert_eq!(peer["connected"], json!(true), "{peer}");
    }
    assert!(
        peers.iter().any(|p| p["lag_ms"].as_u64().is_some()),
        "{status}"
    );
    let metrics = get_text(&client, cluster.url(0, "/metrics"))
        .await
        .unwrap_or_default();
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
    let mut cluster = Cluster::new(3, "");
    // Node 2 gets certificates from a CA of its own, and a topology copy that trusts that CA.
    let foreign_topology = cluster.dir.path().join("foreign.toml");
    std::fs::write(
        &foreign_topology,
        topology_text(&cluster.nodes, "", "foreign-certs"),
    )
    .expect("write");
    let parsed = meridian_node::config::Topology::load(&foreign_topology).expect("topology");
    meridian_node::tools::certs::generate_certs(&parsed, &cluster.dir.path().join("foreign-certs"))
        .expect("certs");
    cluster.start(0);
    cluster.start(1);
    cluster.start_with(2, &foreign_topology, &[]);
    let client = reqwest::Client::new();
    for i in 0..3 {
        cluster.wait_ready(i, &client).await;
    }
    let put = |i: usize, key: &'static str| {
        let url = cluster.url(i, &format!("/v1/kv/{key}"));
        let client = client.clone();
        async move {
            client
                .put(url)
                .json(&json!({"from": i}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    assert_eq!(put(0, "from-a").await, Some(200));
    assert_eq!(put(2, "from-foreign").await, Some(200));
    // Positive control: the trusted pair replicates.
    let b = cluster.url(1, "");
    assert!(
        poll_until(DEADLINE, || {
            let c = client.clone();
            let b = b.clone();
            async move { get(&c, &b, "from-a").await.is_some() }
        })
        .await,
        "trusted nodes did not replicate; logs:\n{}\n{}",
        cluster.log(0),
        cluster.log(1)
    );
    // Give the foreign node as long again, then check that nothing crossed in either direction.
    let a = cluster.url(0, "");
    let foreign = cluster.url(2, "");
    let leaked = poll_until(std::time::Duration::from_secs(5), || {
        let (c, a, b, f) = (client.clone(), a.clone(), b.clone(), foreign.clone());
        async move {
            get(&c, &f, "from-a").await.is_some()
                || get(&c, &a, "from-foreign").await.is_some()
                || get(&c, &b, "from-foreign").await.is_some()
        }
    })
    .await;
    assert!(
        !leaked,
        "data crossed between trusted nodes and the foreign node"
    );
    let status: Value = get_json(&client, cluster.url(0, "/v1/status")).await;
    let peer = status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == "ap-south-1")
        .cloned()
        .expect("peer");
    assert_eq!(peer["connected"], json!(false), "{peer}");
    assert!(
        peer["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "the refusal is visible: {peer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_without_a_full_resend() {
    let mut cluster = Cluster::new(2, "");
    cluster.start_all();
    let client = reqwest::Client::new();
    for i in 0..2 {
        cluster.wait_ready(i, &client).await;
    }
    let a = cluster.url(0, "");
    let b = cluster.url(1, "");
    for i in 0..200 {
        let r = client
            .put(format!("{a}/v1/kv/k/{i}"))
            .json(&json!({"i": i}))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 200);
    }
    let has = |n: usize| {
        let (c, b) = (client.clone(), b.clone());
        async move {
            match c
                .get(format!("{b}/v1/kv?prefix=k/&limit=1000"))
                .send()
                .await
            {
                Ok(r) => {
                    r.json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["items"].as_array().map(Vec::len))
                        == Some(n)
                }
                Err(_) => false,
            }
        }
    };
    assert!(
        poll_until(DEADLINE, || has(200)).await,
        "first 200 did not replicate"
    );
    // Wait until the sender has its acknowledgements, so that what follows is all new.
    assert!(
        poll_until(DEADLINE, || {
            let (c, a) = (client.clone(), a.clone());
            async move {
                let text = get_text(&c, format!("{a}/metrics"))
                    .await
                    .unwrap_or_default();
                metric(
                    &text,
                    "meridian_replication_changes_sent_total{peer_region=\"us-east\"}",
                ) == Some(200.0)
            }
        })
        .await,
        "sender did not count 200 acknowledged changes"
    );
    cluster.stop(1);
    for i in 200..250 {
        let r = client
            .put(format!("{a}/v1/kv/k/{i}"))
            .json(&json!({"i": i}))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 200, "writes continue while the peer is down");
    }
    cluster.start(1);
    cluster.wait_ready(1, &client).await;
    assert!(
        poll_until(DEADLINE, || has(250)).await,
        "backlog did not replicate after restart; log:\n{}",
        cluster.log(1)
    );
    let metrics_b = get_text(&client, format!("{b}/metrics"))
        .await
        .unwrap_or_default();
    assert_eq!(
        metric(
            &metrics_b,
            "meridian_replication_changes_applied_total{peer_region=\"eu-west\"}"
        ),
        Some(50.0),
        "the restarted node applied only the 50 changes it lacked"
    );
    let metrics_a = get_text(&client, format!("{a}/metrics"))
        .await
        .unwrap_or_default();
    assert!(
        poll_until(DEADLINE, || {
            let (c, a) = (client.clone(), a.clone());
            async move {
                let text = get_text(&c, format!("{a}/metrics"))
                    .await
                    .unwrap_or_default();
                metric(
                    &text,
                    "meridian_replication_changes_sent_total{peer_region=\"us-east\"}",
                ) == Some(250.0)
            }
        })
        .await,
        "the sender resent more than the 50 new changes: {metrics_a}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_of_another_node_is_refused() {
    use meridian_replication::wire::{Message, PROTOCOL_VERSION};
    let mut cluster = Cluster::new(3, "");
    cluster.start(0);
    cluster.start(1);
    let client = reqwest::Client::new();
    cluster.wait_ready(0, &client).await;
    cluster.wait_ready(1, &client).await;
    let put = client
        .put(cluster.url(0, "/v1/kv/secret"))
        .json(&json!({"x": 1}))
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200);

    // The impostor holds us-east-1's genuine certificate and key, and sits at ap-south-1's
    // peer address.
    meridian_node::peer::tls::install_crypto_provider();
    let topology =
        Arc::new(meridian_node::config::Topology::load(&cluster.topology).expect("topology"));
    let stolen = meridian_node::peer::tls::PeerTls::load(topology.clone(), "us-east-1")
        .expect("us-east-1 identity");
    let endpoint = meridian_node::peer::tls::endpoint(cluster.nodes[2].peer, &stolen)
        .expect("impostor endpoint");

    // 1. eu-west-1 dials "ap-south-1" and is answered with us-east-1's certificate: refused.
    let a = cluster.url(0, "/v1/status");
    let refused = poll_until(DEADLINE, || {
        let (c, a) = (client.clone(), a.clone());
        async move {
            let Ok(r) = c.get(a).send().await else {
                return false;
            };
            let Ok(status) = r.json::<Value>().await else {
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
    let conn =
        meridian_node::peer::tls::dial(&endpoint, &stolen, "eu-west-1", cluster.nodes[0].peer)
            .await
            .expect("TLS succeeds: the certificate itself is genuine");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    frame_write(
        &mut send,
        &Message::Hello {
            protocol: PROTOCOL_VERSION,
            cluster: "test".into(),
            node: "ap-south-1".into(),
            region: "ap-south".into(),
            frontier: vec![],
        },
    )
    .await;
    match frame_read(&mut recv).await {
        Some(Message::Close { reason }) => assert!(reason.contains("authenticated as"), "{reason}"),
        other => panic!("expected a Close naming the identity mismatch, got {other:?}"),
    }
    assert!(
        frame_read(&mut recv).await.is_none(),
        "nothing follows the refusal"
    );
    // The connection's close reason says the same.
    let closed = conn.closed().await;
    assert!(closed.to_string().contains("authenticated as"), "{closed}");
    endpoint.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_relayed_when_the_direct_link_is_cut() {
    // eu-west <-> ap-south is routed to a port where nothing listens: the direct link is cut
    // in both directions, and everything must flow through us-east.
    let dead_a = meridian_tests::free_udp_port();
    let dead_b = meridian_tests::free_udp_port();
    let links = format!(
        "[[links]]\nfrom = \"eu-west-1\"\nto = \"ap-south-1\"\nvia = \"127.0.0.1:{dead_a}\"\n\
         [[links]]\nfrom = \"ap-south-1\"\nto = \"eu-west-1\"\nvia = \"127.0.0.1:{dead_b}\"\n"
    );
    let mut cluster = Cluster::new(3, &links);
    cluster.start_all();
    let client = reqwest::Client::new();
    for i in 0..3 {
        cluster.wait_ready(i, &client).await;
    }
    let (eu, ap) = (cluster.url(0, ""), cluster.url(2, ""));
    for i in 0..20 {
        let r = client
            .put(format!("{eu}/v1/kv/relay/eu/{i}"))
            .json(&json!({"i": i}))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 200);
        let r = client
            .post(format!("{ap}/v1/kv/relay/ctr/incr"))
            .json(&json!({"field": "n"}))
            .send()
            .await
            .expect("incr");
        assert_eq!(r.status(), 200);
    }
    let ok = poll_until(DEADLINE, || {
        let (c, eu, ap) = (client.clone(), eu.clone(), ap.clone());
        async move {
            for i in 0..20 {
                if get(&c, &ap, &format!("relay/eu/{i}")).await.is_none() {
                    return false;
                }
            }
            matches!(get(&c, &eu, "relay/ctr").await, Some(v) if v["value"]["n"] == json!(20))
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
    let status: Value = get_json(&client, format!("{eu}/v1/status")).await;
    let ap_peer = status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == "ap-south-1")
        .cloned()
        .expect("peer");
    assert_eq!(ap_peer["receiving"]["connected"], json!(false), "{ap_peer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stamped_beyond_the_drift_are_held_then_applied_and_others_keep_flowing() {
    let mut cluster = Cluster::new(3, "");
    // eu-west-1's clock runs 4 s fast: far beyond the 500 ms max drift.
    let topology = cluster.topology.clone();
    cluster.start_with(0, &topology, &["--test-clock-offset-ms", "4000"]);
    cluster.start(1);
    cluster.start(2);
    let client = reqwest::Client::new();
    for i in 0..3 {
        cluster.wait_ready(i, &client).await;
    }
    let (eu, us, ap) = (cluster.url(0, ""), cluster.url(1, ""), cluster.url(2, ""));
    let r = client
        .put(format!("{eu}/v1/kv/skewed"))
        .json(&json!({"from": "eu"}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    let r = client
        .put(format!("{ap}/v1/kv/normal"))
        .json(&json!({"from": "ap"}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    // The stream keeps flowing for everything else: ap's write reaches us-east.
    assert!(
        poll_until(DEADLINE, || {
            let (c, us) = (client.clone(), us.clone());
            async move { get(&c, &us, "normal").await.is_some() }
        })
        .await
    );
    // eu's change is held, counted and visible, not applied (yet).
    let held = poll_until(DEADLINE, || {
        let (c, us) = (client.clone(), us.clone());
        async move {
            let Ok(r) = c.get(format!("{us}/metrics")).send().await else {
                return false;
            };
            let text = r.text().await.unwrap_or_default();
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
    let status: Value = get_json(&client, format!("{us}/v1/status")).await;
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
        poll_until(DEADLINE, || {
            let (c, us) = (client.clone(), us.clone());
            async move { get(&c, &us, "skewed").await.is_some() }
        })
        .await,
        "the held change was never applied; log:\n{}",
        cluster.log(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_never_saw_each_other_show_identical_conflicts() {
    let mut cluster = Cluster::new(2, "");
    let client = reqwest::Client::new();
    // Each region writes while the other is down: the writes are truly concurrent.
    cluster.start(0);
    cluster.wait_ready(0, &client).await;
    let a = cluster.url(0, "");
    let b = cluster.url(1, "");
    let r = client
        .put(format!("{a}/v1/kv/doc"))
        .json(&json!({"color": "red", "a": 1}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    cluster.stop(0);
    cluster.start(1);
    cluster.wait_ready(1, &client).await;
    let r = client
        .put(format!("{b}/v1/kv/doc"))
        .json(&json!({"color": "blue", "b": 2}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    cluster.start(0);
    cluster.wait_ready(0, &client).await;
    let converged = poll_until(DEADLINE, || {
        let (c, a, b) = (client.clone(), a.clone(), b.clone());
        async move {
            match (get(&c, &a, "doc").await, get(&c, &b, "doc").await) {
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
    let doc = get(&client, &a, "doc").await.expect("doc");
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
