//! Residency at the replication boundary, against real nodes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_replication::wire::{Message, PROTOCOL_VERSION, WireChange};
use meridian_replication::{RecordDoc, Version};
use meridian_tests::{Cluster, DEADLINE, get, metric, poll_until};
use serde_json::{Value, json};

const RULES: &str = "[[residency]]\nname = \"us-only\"\nkeys = \"users/us/*\"\nhome = \"us-east\"\nforeign = \"reject\"\n";

async fn frame_write(send: &mut quinn::SendStream, msg: &Message) {
    let bytes = msg.encode();
    send.write_all(&(bytes.len() as u32).to_be_bytes())
        .await
        .expect("write len");
    send.write_all(&bytes).await.expect("write body");
}

async fn frame_read(recv: &mut quinn::RecvStream) -> Option<Message> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    recv.read_exact(&mut buf).await.ok()?;
    Message::decode(&buf).ok()
}

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
    meridian_node::tls::install_crypto_provider();
    let topology =
        Arc::new(meridian_node::topology::Topology::load(&cluster.topology).expect("topology"));
    let ap = meridian_node::tls::PeerTls::load(topology, "ap-south-1").expect("identity");
    let endpoint = meridian_node::tls::endpoint(cluster.nodes[2].peer, &ap).expect("endpoint");
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
    let list: Value = client
        .get(format!("{eu}/v1/kv?prefix=users/"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["items"], json!([]));
    let metrics = client
        .get(format!("{eu}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert_eq!(
        metric(
            &metrics,
            "meridian_residency_refused_total{peer_region=\"ap-south\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let status: Value = client
        .get(format!("{eu}/v1/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
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
