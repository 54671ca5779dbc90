//! Residency at the replication boundary, against real nodes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_replication::wire::{Message, PROTOCOL_VERSION, WireChange};
use meridian_replication::{RecordDoc, Version};
use meridian_tests::{
    Cluster, DEADLINE, frame_read, frame_write, get, get_json, get_text, metric, poll_until,
};
use serde_json::{Value, json};

const RULES: &str = "[[residency]]\nname = \"us-only\"\nkeys = \"users/us/*\"\nhome = \"us-east\"\nforeign = \"reject\"\n";

fn now_ntp64() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    (d.as_secs() << 32) | ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
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
    let mut cluster = Cluster::new(3, RULES);
    cluster.start(0);
    let client = reqwest::Client::new();
    cluster.wait_ready(0, &client).await;

    // The test plays ap-south-1 with its genuine certificate, at its peer address.
    meridian_node::peer::tls::install_crypto_provider();
    let topology =
        Arc::new(meridian_node::config::Topology::load(&cluster.topology).expect("topology"));
    let ap = meridian_node::peer::tls::PeerTls::load(topology, "ap-south-1").expect("identity");
    let endpoint =
        meridian_node::peer::tls::endpoint(cluster.nodes[2].peer, &ap).expect("endpoint");
    // eu-west-1 dials us and subscribes.
    let incoming = tokio::time::timeout(DEADLINE, endpoint.accept())
        .await
        .expect("eu-west-1 dials")
        .expect("incoming");
    let conn = incoming.await.expect("handshake");
    let (mut send, mut recv) = conn.accept_bi().await.expect("subscription stream");
    assert!(matches!(
        frame_read(&mut recv).await,
        Some(Message::Hello { .. })
    ));
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
    // A batch mixing a pinned record eu-west may not hold with an ordinary global one.
    let t = now_ntp64();
    frame_write(
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
        matches!(frame_read(&mut recv).await, Some(Message::Ack { seq: 1 })),
        "the batch is acknowledged"
    );

    let eu = cluster.url(0, "");
    // The global record flowed; the pinned one did not.
    assert!(
        poll_until(DEADLINE, || {
            let (c, eu) = (client.clone(), eu.clone());
            async move { get(&c, &eu, "global/1").await.is_some() }
        })
        .await
    );
    let r = client
        .get(format!("{eu}/v1/kv/users/us/1"))
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        421,
        "eu-west answers for its policy, it does not hold the record"
    );
    let list: Value = get_json(&client, format!("{eu}/v1/kv?prefix=users/")).await;
    assert_eq!(list["items"], json!([]));
    let metrics = get_text(&client, format!("{eu}/metrics"))
        .await
        .unwrap_or_default();
    assert_eq!(
        metric(
            &metrics,
            "meridian_residency_refused_total{peer_region=\"ap-south\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let status: Value = get_json(&client, format!("{eu}/v1/status")).await;
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
    endpoint.close(0u32.into(), b"done");
    // Offline proof: nothing of the record is in eu-west's data directory.
    cluster.stop(0);
    let out = std::process::Command::new(meridian_tests::meridian_bin())
        .args(["dump", "--json", "--data-dir"])
        .arg(cluster.data_dir(0))
        .output()
        .expect("dump");
    let dump: Value = serde_json::from_slice(&out.stdout).expect("dump json");
    let keys: Vec<&str> = dump["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["key"].as_str())
        .collect();
    assert_eq!(keys, ["global/1"], "{dump}");
}

/// Rules of both kinds: `users/eu/*` lives in eu-west with a replica in ap-south and is
/// forwarded from elsewhere; `billing/us/*` lives only in us-east and is refused elsewhere.
const BOTH_KINDS: &str = "[[residency]]\nname = \"eu-personal\"\nkeys = \"users/eu/*\"\nhome = \"eu-west\"\nreplicas = [\"ap-south\"]\nforeign = \"forward\"\n\
[[residency]]\nname = \"us-billing\"\nkeys = \"billing/us/*\"\nhome = \"us-east\"\nforeign = \"reject\"\n";

fn audit(cluster: &Cluster, i: usize, topology: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(meridian_tests::meridian_bin())
        .args(["residency", "audit", "--topology"])
        .arg(topology)
        .arg("--data-dir")
        .arg(cluster.data_dir(i))
        .output()
        .expect("audit");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn dumped_keys(cluster: &Cluster, i: usize) -> Vec<String> {
    let out = std::process::Command::new(meridian_tests::meridian_bin())
        .args(["dump", "--json", "--data-dir"])
        .arg(cluster.data_dir(i))
        .output()
        .expect("dump");
    let dump: Value = serde_json::from_slice(&out.stdout).expect("dump json");
    dump["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["key"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_records_rest_only_in_allowed_regions_through_a_partition_and_heal() {
    // During the partition the direct eu-west <-> ap-south links are cut, so the only path
    // between the two regions allowed to hold users/eu/* runs through us-east, which may not.
    let dead = (
        meridian_tests::free_udp_port(),
        meridian_tests::free_udp_port(),
    );
    let cut = format!(
        "[[links]]\nfrom = \"eu-west-1\"\nto = \"ap-south-1\"\nvia = \"127.0.0.1:{}\"\n[[links]]\nfrom = \"ap-south-1\"\nto = \"eu-west-1\"\nvia = \"127.0.0.1:{}\"\n",
        dead.0, dead.1
    );
    let mut cluster = Cluster::new(3, BOTH_KINDS);
    let healed = cluster.topology.clone();
    let partitioned = cluster.dir.path().join("partitioned.toml");
    let text = std::fs::read_to_string(&healed).expect("topology");
    std::fs::write(&partitioned, format!("{text}{cut}")).expect("write");
    for i in 0..3 {
        cluster.start_with(i, &partitioned, &[]);
    }
    let client = reqwest::Client::new();
    for i in 0..3 {
        cluster.wait_ready(i, &client).await;
    }
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i, "")).collect();
    // us-east forwards over the links it dials: wait until one to an allowed region is up.
    let linked = poll_until(DEADLINE, || {
        let (c, us) = (client.clone(), urls[1].clone());
        async move {
            let Ok(r) = c.get(format!("{us}/v1/status")).send().await else {
                return false;
            };
            let Ok(status) = r.json::<Value>().await else {
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
    for (i, base) in urls.iter().enumerate() {
        for n in 0..5 {
            let r = client
                .put(format!("{base}/v1/kv/users/eu/{i}-{n}"))
                .json(&json!({"n": n, "from": i}))
                .send()
                .await
                .expect("put");
            assert_eq!(r.status(), 200, "users/eu from region {i}");
            let r = client
                .put(format!("{base}/v1/kv/global/{i}-{n}"))
                .json(&json!({"n": n}))
                .send()
                .await
                .expect("put");
            assert_eq!(r.status(), 200);
            let r = client
                .put(format!("{base}/v1/kv/billing/us/{i}-{n}"))
                .json(&json!({"n": n}))
                .send()
                .await
                .expect("put");
            assert_eq!(
                r.status(),
                if i == 1 { 200 } else { 421 },
                "billing/us from region {i}"
            );
        }
        let r = client
            .post(format!("{base}/v1/kv/users/eu/shared/incr"))
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
                .get(format!("{base}/v1/kv/users/eu/1-0"))
                .send()
                .await
                .expect("get");
            assert_eq!(read.status(), 200, "a forwarded read");
            assert!(read.headers().get("meridian-served-by-region").is_some());
        }
    }
    // Global records cross the partition through us-east.
    let all_global = poll_until(DEADLINE, || {
        let (c, urls) = (client.clone(), urls.clone());
        async move {
            for base in &urls {
                for i in 0..3 {
                    if get(&c, base, &format!("global/{i}-4")).await.is_none() {
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
        let (c, eu, ap, keys) = (
            client.clone(),
            urls[0].clone(),
            urls[2].clone(),
            pinned.clone(),
        );
        async move {
            for key in &keys {
                match (get(&c, &eu, key).await, get(&c, &ap, key).await) {
                    (Some(x), Some(y))
                        if x["value"] == y["value"] && x["version"] == y["version"] => {}
                    _ => return false,
                }
            }
            matches!(get(&c, &eu, "users/eu/shared").await, Some(v) if v["value"]["n"] == json!(3))
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
        let (code, report) = audit(&cluster, i, &healed);
        assert_eq!(
            code, 0,
            "node {i} holds something the policy forbids:\n{report}"
        );
        let keys = dumped_keys(&cluster, i);
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
