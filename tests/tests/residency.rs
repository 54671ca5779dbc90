//! Residency at the replication boundary, against real nodes.

use std::time::{SystemTime, UNIX_EPOCH};

use meridian_harness::{
    ApiClient, DEADLINE, Residency, TopologyText, dumped_keys, frame, free_udp_port, hello,
    loopback, metric, poll_until, residency_audit,
};
use meridian_replication::wire::{Message, WireChange};
use meridian_replication::{RecordDoc, Version};
use meridian_tests::Cluster;
use serde_json::{Value, json};

fn now_ntp64() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    meridian_replication::version::ntp64_from_duration(d)
}

fn change(key_value: Value, time_ntp64: u64) -> Vec<u8> {
    let mut doc = RecordDoc::new(automerge::ActorId::from(vec![42u8; 16])).expect("doc");
    let stamp = Version {
        time_ntp64,
        node_hlc_id: 42,
    };
    let map = key_value.as_object().cloned().expect("object");
    doc.put(&map, stamp).expect("put").bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_change_from_a_misbehaving_sender_is_refused_counted_and_flagged() {
    let rules = TopologyText::new()
        .residency(&Residency::new("us-only", "users/us/*", "us-east").foreign("reject"));
    let mut cluster = Cluster::with_extra(3, &rules);
    cluster.start(0);
    let client = reqwest::Client::new();
    cluster.wait_ready(0, &client).await;

    // The test plays ap-south-1 with its genuine certificate, at its peer address.
    let ap = cluster.impersonate("ap-south-1", 2);
    // eu-west-1 dials us and subscribes.
    let incoming = tokio::time::timeout(DEADLINE, ap.endpoint.accept())
        .await
        .expect("eu-west-1 dials")
        .expect("incoming");
    let conn = incoming.await.expect("handshake");
    let (mut send, mut recv) = conn.accept_bi().await.expect("subscription stream");
    assert!(matches!(
        frame::read(&mut recv).await,
        Some(Message::Hello { .. })
    ));
    frame::write(&mut send, &hello("test", "ap-south-1", "ap-south")).await;
    // A batch mixing a pinned record eu-west may not hold with an ordinary global one.
    let t = now_ntp64();
    frame::write(
        &mut send,
        &Message::Batch {
            seq: 1,
            changes: vec![
                WireChange {
                    origin: "ap-south-1".into(),
                    hlc: t,
                    key: "users/us/1".into(),
                    change: change(json!({"ssn": "123"}), t),
                },
                WireChange {
                    origin: "ap-south-1".into(),
                    hlc: t + 16,
                    key: "global/1".into(),
                    change: change(json!({"ok": true}), t + 16),
                },
            ],
            progress: vec![],
        },
    )
    .await;
    assert!(
        matches!(
            frame::read(&mut recv).await,
            Some(Message::Ack { seq: 1, .. })
        ),
        "the batch is acknowledged"
    );

    let eu = cluster.api(0, &client);
    // The global record flowed; the pinned one did not.
    assert!(eu.wait_for_record("global/1", DEADLINE).await);
    assert_eq!(
        eu.get("users/us/1").await.0,
        421,
        "eu-west answers for its policy, it does not hold the record"
    );
    let list = eu.json("/v1/kv?prefix=users/").await;
    assert_eq!(list["items"], json!([]));
    let metrics = eu.text("/metrics").await.unwrap_or_default();
    assert_eq!(
        metric(
            &metrics,
            "meridian_residency_refused_total{peer_region=\"ap-south\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let status = eu.json("/v1/status").await;
    let peer = status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == "ap-south-1")
        .cloned()
        .expect("peer");
    assert_eq!(peer["misbehaving"], json!(true), "{peer}");
    assert_eq!(
        peer["receiving"]["residency_violations"],
        json!(1),
        "{peer}"
    );
    assert!(
        cluster.log(0).contains("ap-south-1") && cluster.log(0).contains("may not hold"),
        "the refusal is logged with the sender's identity:\n{}",
        cluster.log(0)
    );
    conn.close(0u32.into(), b"done");
    ap.endpoint.close(0u32.into(), b"done");
    // Offline proof: nothing of the record is in eu-west's data directory.
    cluster.stop(0);
    assert_eq!(dumped_keys(&cluster.data_dir(0)), ["global/1"]);
}

/// Rules of both kinds: `users/eu/*` lives in eu-west with a replica in ap-south and is
/// forwarded from elsewhere; `billing/us/*` lives only in us-east and is refused elsewhere.
fn both_kinds() -> TopologyText {
    TopologyText::new()
        .residency(
            &Residency::new("eu-personal", "users/eu/*", "eu-west")
                .replicas(&["ap-south"])
                .foreign("forward"),
        )
        .residency(&Residency::new("us-billing", "billing/us/*", "us-east").foreign("reject"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_records_rest_only_in_allowed_regions_through_a_partition_and_heal() {
    // During the partition the direct eu-west <-> ap-south links are cut, so the only path
    // between the two regions allowed to hold users/eu/* runs through us-east, which may not.
    let cut = TopologyText::new()
        .link("eu-west-1", "ap-south-1", loopback(free_udp_port()))
        .link("ap-south-1", "eu-west-1", loopback(free_udp_port()));
    let mut cluster = Cluster::with_extra(3, &both_kinds());
    let healed = cluster.topology.clone();
    let partitioned = cluster.dir.path().join("partitioned.toml");
    let text = std::fs::read_to_string(&healed).expect("topology");
    std::fs::write(&partitioned, format!("{text}{cut}")).expect("write");
    for i in 0..3 {
        cluster.start_with(i, &partitioned, &[]);
    }
    let client = reqwest::Client::new();
    cluster.wait_all_ready(&client).await;
    let nodes: Vec<ApiClient> = (0..3).map(|i| cluster.api(i, &client)).collect();
    // us-east forwards over the links it dials: wait until one to an allowed region is up.
    let linked = poll_until(DEADLINE, || {
        let us = nodes[1].clone();
        async move {
            let Some(status) = us.try_json("/v1/status").await else {
                return false;
            };
            status["peers"].as_array().into_iter().flatten().any(|p| {
                (p["node"] == "eu-west-1" || p["node"] == "ap-south-1")
                    && p["receiving"]["connected"] == json!(true)
            })
        }
    })
    .await;
    assert!(
        linked,
        "us-east never connected to an allowed region:\n{}",
        cluster.log(1)
    );
    // Writes from every region. users/eu/* from us-east is forwarded; billing/us/* is refused
    // outside us-east.
    for (i, node) in nodes.iter().enumerate() {
        let billing_status = if i == 1 { 200 } else { 421 };
        for n in 0..5 {
            for (key, body, status) in [
                (format!("users/eu/{i}-{n}"), json!({"n": n, "from": i}), 200),
                (format!("global/{i}-{n}"), json!({"n": n}), 200),
                (
                    format!("billing/us/{i}-{n}"),
                    json!({"n": n}),
                    billing_status,
                ),
            ] {
                let (got, answer) = node.put(&key, body).await;
                assert_eq!(got, status, "{key} from region {i}: {answer}");
            }
        }
        let r = client
            .post(node.url("/v1/kv/users/eu/shared/incr"))
            .json(&json!({"field": "n"}))
            .send()
            .await
            .expect("incr");
        assert_eq!(r.status(), 200);
        if i == 1 {
            // us-east may not hold users/eu/*: the write was served by an allowed region.
            let served = r
                .headers()
                .get("meridian-served-by-region")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            assert!(
                matches!(served.as_deref(), Some("eu-west") | Some("ap-south")),
                "{served:?}"
            );
            let read = client
                .get(node.url("/v1/kv/users/eu/1-0"))
                .send()
                .await
                .expect("get");
            assert_eq!(read.status(), 200, "a forwarded read");
            assert!(read.headers().get("meridian-served-by-region").is_some());
        }
    }
    // Global records cross the partition through us-east.
    let all_global = poll_until(DEADLINE, || {
        let nodes = nodes.clone();
        async move {
            for node in &nodes {
                for i in 0..3 {
                    if node.record(&format!("global/{i}-4")).await.is_none() {
                        return false;
                    }
                }
            }
            true
        }
    })
    .await;
    assert!(all_global, "global records did not relay through us-east");

    // Heal: restart eu-west and ap-south without the cut links.
    cluster.stop(0);
    cluster.stop(2);
    cluster.start_with(0, &healed, &[]);
    cluster.start_with(2, &healed, &[]);
    cluster.wait_ready(0, &client).await;
    cluster.wait_ready(2, &client).await;
    // The two allowed regions converge on every pinned record.
    let mut pinned: Vec<String> = (0..3)
        .flat_map(|i| (0..5).map(move |n| format!("users/eu/{i}-{n}")))
        .collect();
    pinned.push("users/eu/shared".into());
    let converged = poll_until(DEADLINE, || {
        let (eu, ap, keys) = (nodes[0].clone(), nodes[2].clone(), pinned.clone());
        async move {
            for key in &keys {
                match (eu.record(key).await, ap.record(key).await) {
                    (Some(x), Some(y))
                        if x["value"] == y["value"] && x["version"] == y["version"] => {}
                    _ => return false,
                }
            }
            matches!(eu.record("users/eu/shared").await, Some(v) if v["value"]["n"] == json!(3))
        }
    })
    .await;
    assert!(
        converged,
        "eu-west and ap-south did not converge on users/eu/*"
    );
    // Let the last acknowledgements settle, then scan every data directory offline.
    for i in 0..3 {
        cluster.stop(i);
    }
    for i in 0..3 {
        let audit = residency_audit(&healed, &cluster.data_dir(i), &[]);
        assert_eq!(
            audit.code,
            Some(0),
            "node {i} holds something the policy forbids:\n{}",
            audit.output()
        );
        let keys = dumped_keys(&cluster.data_dir(i));
        let has_eu = keys.iter().any(|k| k.starts_with("users/eu/"));
        let has_billing = keys.iter().any(|k| k.starts_with("billing/us/"));
        assert_eq!(has_eu, i != 1, "users/eu/* on node {i}: {keys:?}");
        assert_eq!(has_billing, i == 1, "billing/us/* on node {i}: {keys:?}");
        assert!(
            keys.iter().filter(|k| k.starts_with("global/")).count() == 15,
            "node {i}: {keys:?}"
        );
    }
}
