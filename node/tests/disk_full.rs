//! A full disk (F7), on a real file system that really fills up: a small tmpfs mounted for the
//! test (it needs root; elsewhere it says why it did not run). Writes answer 503
//! `storage_full` while the disk is full and never 2xx for a write that was not stored; once
//! space is freed the node serves writes again by itself; after a SIGKILL `meridian dump`
//! reads the directory without writing to it; and a restart with little free space succeeds.

use std::time::Duration;

use meridian_harness::{
    ApiClient, DEADLINE, Serve, SmallDisk, dumped_keys, fixture, free_tcp_port, loopback,
    poll_until,
};
use reqwest::Client;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_storage_full_and_the_node_recovers_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = match SmallDisk::mount(&dir.path().join("small"), 32) {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("SKIPPED: mounting a small tmpfs needs root here: {why}");
            return;
        }
    };
    disk.fill(8 << 20);
    let port = free_tcp_port();
    let topology = fixture::write_topology(dir.path(), port);
    let data = disk.path().join("data");
    let client = Client::new();
    // The log is on the small disk too, as an operator's often is: a line that cannot be written
    // must not take the node down.
    let log = disk.path().join("eu-1.log");
    let start = || {
        Serve::new(&topology, "eu-1", &data, loopback(port))
            .log(&log)
            .spawn()
    };
    let mut node = start();
    node.assert_ready(&client, DEADLINE).await;
    let api = ApiClient::new(node.url(""));

    // Write 10 KB values until the disk is full.
    let pad = "p".repeat(10_000);
    let mut acknowledged = Vec::new();
    let mut full_answers = 0;
    let mut other_errors = Vec::new();
    for i in 0..20_000 {
        let key = format!("fill/{i:06}");
        let (status, body) = api.put(&key, json!({"i": i, "pad": pad})).await;
        match status.as_u16() {
            200 => acknowledged.push((key, body["version"].clone())),
            503 if body["error"] == "storage_full" => full_answers += 1,
            _ => other_errors.push(format!("{status} {body}")),
        }
        if full_answers >= 20 || other_errors.len() >= 5 {
            break;
        }
    }
    assert!(
        full_answers >= 20,
        "the disk never filled: {other_errors:?}"
    );
    assert!(!acknowledged.is_empty());
    assert!(
        other_errors.is_empty(),
        "errors other than storage_full: {other_errors:?}; log:\n{}",
        node.log_text()
    );
    let not_ready = poll_until(DEADLINE, || async {
        matches!(client.get(node.url("/readyz")).send().await, Ok(r) if r.status() == 503)
    })
    .await;
    assert!(not_ready, "a node that cannot write stays ready");

    // Space comes back: the node serves writes again, without a restart.
    disk.unfill();
    let writes_again = poll_until(DEADLINE, || async {
        api.put("after/space", json!({"ok": true})).await.0 == 200
    })
    .await;
    assert!(
        writes_again,
        "no write succeeded after space was freed; log:\n{}",
        node.log_text()
    );
    node.assert_ready(&client, DEADLINE).await;
    for (key, version) in &acknowledged {
        let (status, body) = api.get(key).await;
        assert_eq!(status, 200, "{key}: {body}");
        assert_eq!(&body["version"], version, "{key}");
    }

    // Unclean stop: the offline dump still reads the directory.
    let more: Vec<String> = (0..20).map(|i| format!("late/{i}")).collect();
    for key in &more {
        assert_eq!(api.put(key, json!({"pad": pad})).await.0, 200, "{key}");
    }
    node.sigkill().expect("SIGKILL");
    node.wait_exit(Duration::from_secs(30)).expect("killed");
    drop(node);
    let dumped = dumped_keys(&data);
    for key in acknowledged.iter().map(|(k, _)| k).chain(&more) {
        assert!(dumped.contains(key), "{key} not in the dump");
    }

    // A restart with little room: the replay needs about what the log holds, not more.
    let log_bytes = std::fs::metadata(data.join("commit.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    let leave = 2 * log_bytes + (3 << 20);
    disk.fill(disk.free_bytes().saturating_sub(leave));
    let node = start();
    node.assert_ready(&client, DEADLINE).await;
    let api = ApiClient::new(node.url(""));
    for key in acknowledged.iter().map(|(k, _)| k).chain(&more) {
        assert_eq!(api.get(key).await.0, 200, "{key} after the restart");
    }
}
