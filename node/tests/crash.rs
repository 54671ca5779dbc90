//! The real `meridian` binary: SIGKILL mid-stream loses no acknowledged write; graceful
//! shutdown on SIGTERM; versions keep growing after the wall clock steps back; a data
//! directory refuses to start as another node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_harness::{ApiClient, DEADLINE, NodeProcess, fixture, free_tcp_port, loopback};
use reqwest::Client;
use serde_json::{Value, json};

struct Setup {
    dir: tempfile::TempDir,
    topology: std::path::PathBuf,
    api: SocketAddr,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_tcp_port();
    let topology = fixture::write_topology(dir.path(), port);
    Setup {
        topology,
        api: loopback(port),
        dir,
    }
}

async fn start(s: &Setup, extra: &[&str]) -> NodeProcess {
    let node = NodeProcess::spawn(
        &s.topology,
        "eu-1",
        &s.dir.path().join("data"),
        s.api,
        extra,
    );
    node.assert_ready(&Client::new(), DEADLINE).await;
    node
}

/// PUT `body` at `key` on `node`; the version the node acknowledged.
async fn put_version(node: &NodeProcess, key: &str, body: Value) -> String {
    let (status, answer) = ApiClient::new(node.url("")).put(key, body).await;
    assert_eq!(status, 200, "PUT {key}: {answer}");
    answer["version"].as_str().expect("version").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_write() {
    let s = setup();
    let mut node = start(&s, &[]).await;
    let client = Client::new();
    // key -> (value written, version acknowledged)
    let acked: Arc<Mutex<HashMap<String, (Value, String)>>> = Arc::default();
    let acked_incr = Arc::new(Mutex::new(0u64));
    let attempted_incr = Arc::new(Mutex::new(0u64));
    let stop_at = Instant::now() + Duration::from_secs(2);
    let mut writers = Vec::new();
    for c in 0..8 {
        let (client, acked, acked_incr, attempted_incr) = (
            client.clone(),
            acked.clone(),
            acked_incr.clone(),
            attempted_incr.clone(),
        );
        let url = node.url("");
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            // Keep writing until the node dies (requests fail) or, if it never does, a bound.
            while i < 1_000_000 {
                i += 1;
                let key = format!("crash/{c}/{i}");
                let value = json!({"client": c, "i": i, "pad": "x".repeat(64)});
                let r = client
                    .put(format!("{url}/v1/kv/{key}"))
                    .json(&value)
                    .send()
                    .await;
                let Ok(r) = r else { break };
                if r.status() != 200 {
                    break;
                }
                let Ok(body) = r.json::<Value>().await else {
                    break;
                };
                let version = body["version"].as_str().unwrap_or_default().to_string();
                acked.lock().expect("lock").insert(key, (value, version));
                if i.is_multiple_of(4) {
                    *attempted_incr.lock().expect("lock") += 1;
                    let r = client
                        .post(format!("{url}/v1/kv/crash/counter/incr"))
                        .json(&json!({"field": "n"}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => *acked_incr.lock().expect("lock") += 1,
                        _ => break,
                    }
                }
                if Instant::now() > stop_at + Duration::from_secs(30) {
                    break;
                }
            }
        }));
    }
    // Let the writers get going, then kill the node without warning.
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.sigkill().expect("SIGKILL");
    for w in writers {
        w.await.expect("writer");
    }
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    assert!(
        acked.len() > 50,
        "too few writes acknowledged before the kill: {}",
        acked.len()
    );

    let node = start(&s, &[]).await;
    let mut lost = Vec::new();
    for (key, (value, version)) in &acked {
        let r = client
            .get(node.url(&format!("/v1/kv/{key}")))
            .send()
            .await
            .expect("get");
        if r.status() != 200 {
            lost.push(key.clone());
            continue;
        }
        let body: Value = r.json().await.expect("json");
        assert_eq!(&body["value"], value, "{key}");
        assert_eq!(body["version"].as_str(), Some(version.as_str()), "{key}");
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let counter = ApiClient::new(node.url(""))
        .record("crash/counter")
        .await
        .expect("the counter survived");
    let n = counter["value"]["n"].as_u64().expect("counter");
    let (acked_n, attempted_n) = (
        *acked_incr.lock().expect("lock"),
        *attempted_incr.lock().expect("lock"),
    );
    assert!(
        acked_n <= n && n <= attempted_n,
        "counter {n} must lie between acknowledged {acked_n} and attempted {attempted_n} increments"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_versions_grow_after_the_clock_steps_back() {
    let s = setup();
    // First run with the wall clock an hour ahead (far beyond the 500 ms max drift).
    let mut node = start(&s, &["--test-clock-offset-ms", "3600000"]).await;
    let v1 = put_version(&node, "clock", json!({"a": 1})).await;
    node.sigterm();
    let status = node
        .wait_exit(Duration::from_secs(30))
        .expect("exits after SIGTERM");
    assert!(
        status.success(),
        "graceful exit, got {status:?}; log:\n{}",
        node.log_text()
    );
    assert!(
        node.log_text().contains("node stopped"),
        "log:\n{}",
        node.log_text()
    );
    drop(node);

    // The clock is back to normal, an hour earlier: versions must still grow.
    let node = start(&s, &[]).await;
    let v2 = put_version(&node, "clock", json!({"a": 2})).await;
    assert!(v2 > v1, "version after restart {v2} must exceed {v1}");
    let v3 = put_version(&node, "other", json!({})).await;
    assert!(v3 > v2, "{v3} must exceed {v2}");
}

#[tokio::test]
async fn a_data_directory_refuses_to_start_as_another_node() {
    let s = setup();
    let mut node = start(&s, &[]).await;
    node.sigterm();
    node.wait_exit(Duration::from_secs(30)).expect("exit");
    drop(node);
    // us-1 is declared in the topology, but the directory belongs to eu-1.
    let mut wrong = NodeProcess::spawn(&s.topology, "us-1", &s.dir.path().join("data"), s.api, &[]);
    let status = wrong
        .wait_exit(Duration::from_secs(30))
        .expect("refused promptly");
    assert_eq!(status.code(), Some(2), "log:\n{}", wrong.log_text());
    let log = wrong.log_text();
    assert!(log.contains("belongs to node \"eu-1\""), "log:\n{log}");
}

/// The version's physical part in milliseconds since the Unix epoch (`{16 hex NTP64}-{node}`).
fn version_time_ms(version: &str) -> u64 {
    let (hex, _) = version.split_once('-').expect("version has a node part");
    let ntp = u64::from_str_radix(hex, 16).expect("hex time");
    // NTP64: seconds in the high 32 bits, fraction in the low 32.
    (ntp >> 32) * 1000 + (((ntp & 0xFFFF_FFFF) * 1000) >> 32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_clock_control_skews_a_running_node_and_versions_still_grow() {
    let s = setup();
    let client = Client::new();
    let node = start(&s, &["--test-clock-control"]).await;
    let put = |key: &'static str| put_version(&node, key, json!({"k": key}));
    let now_ms = meridian_node::clock::unix_ms;
    let set = |offset: Value| {
        client
            .put(node.url("/v1/test/clock-offset"))
            .json(&json!({ "offset_ms": offset }))
            .send()
    };
    let before = put("a").await;
    assert!(version_time_ms(&before) < now_ms() + 60_000, "{before}");

    let r = set(json!(3_600_000)).await.expect("set offset");
    assert_eq!(r.status(), 200);
    let ahead = put("b").await;
    let ahead_ms = version_time_ms(&ahead);
    assert!(
        ahead_ms > now_ms() + 3_500_000,
        "a write after +1 h skew is stamped an hour ahead: {ahead}"
    );
    assert!(ahead > before);

    // Back to the true time: the HLC does not go back.
    assert_eq!(set(json!(0)).await.expect("set").status(), 200);
    let after = put("c").await;
    assert!(after > ahead, "{after} must exceed {ahead}");

    // Bad bodies are refused and change nothing.
    for bad in [json!("soon"), json!(100_000_000_000i64)] {
        let r = set(bad.clone()).await.expect("set");
        assert_eq!(r.status(), 400, "{bad}");
    }
    let last = put("d").await;
    assert!(last > after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_the_test_clock_control_does_not_exist() {
    let s = setup();
    let node = start(&s, &[]).await;
    let r = Client::new()
        .put(node.url("/v1/test/clock-offset"))
        .json(&json!({"offset_ms": 1000}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 404);
}

/// Offsets and sequence numbers of the entries of the commit log in `data_dir`.
fn log_entries(data_dir: &std::path::Path) -> Vec<(u64, usize, usize)> {
    let back = meridian_node::store::commit_log::CommitLog::read(data_dir).expect("read the log");
    let mut at = 0;
    back.entries
        .iter()
        .map(|e| {
            let entry = (e.seq, at, e.payload.len());
            at += 16 + e.payload.len();
            entry
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_commit_log_stops_the_start_and_recover_keeps_every_intact_write() {
    let s = setup();
    let data = s.dir.path().join("data");
    let mut node = start(&s, &[]).await;
    // Sequential writes, one batch each, until the log holds several since its checkpoint;
    // then a crash, so that they are in the log only.
    let mut written = Vec::new();
    for i in 0..20_000 {
        let key = format!("w/{i:05}");
        put_version(&node, &key, json!({"i": i})).await;
        written.push(key);
        if log_entries(&data).len() >= 8 {
            break;
        }
    }
    node.sigkill().expect("kill");
    node.wait_exit(Duration::from_secs(30)).expect("killed");
    drop(node);
    let entries = log_entries(&data);
    assert!(entries.len() >= 8, "the log holds {entries:?}");
    // A flipped byte inside the second batch after the marker: intact batches follow it.
    let (_, at, len) = entries[2];
    assert!(len > 0);
    let log = data.join("commit.log");
    let mut bytes = std::fs::read(&log).expect("read");
    bytes[at + 16 + len / 2] ^= 0x01;
    std::fs::write(&log, &bytes).expect("write");

    let mut refused = NodeProcess::spawn(&s.topology, "eu-1", &data, s.api, &[]);
    let status = refused
        .wait_exit(Duration::from_secs(60))
        .expect("refused promptly");
    let text = refused.log_text();
    assert_eq!(status.code(), Some(1), "log:\n{text}");
    assert!(text.contains(&log.display().to_string()), "log:\n{text}");
    assert!(
        text.contains(&format!("damaged at byte {at}")),
        "log:\n{text}"
    );
    let following = entries.len() - 3;
    assert!(
        text.contains(&format!("{following} intact entries follow")),
        "log:\n{text}"
    );
    assert!(text.contains("--recover"), "log:\n{text}");
    drop(refused);

    let node = start(&s, &["--recover"]).await;
    let api = ApiClient::new(node.url(""));
    let mut missing = Vec::new();
    for key in &written {
        let (status, _) = api.get(key).await;
        if status != 200 {
            missing.push(key.clone());
        }
    }
    assert_eq!(
        missing.len(),
        1,
        "only the damaged batch's write is gone: {missing:?}"
    );
    assert!(
        node.log_text().contains("recovering a damaged commit log"),
        "{}",
        node.log_text()
    );
}
