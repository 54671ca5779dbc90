//! A flipped bit in a stored record (F13): the real binary over a real redb file in which a
//! byte of one record's stored view was changed while the node was stopped. The damaged
//! record answers 500 `corrupt_record` (never a wrong value), a list page holding it still
//! answers with the others, and the record is rebuilt from the change log.

use std::time::Duration;

use meridian_harness::{
    ApiClient, DEADLINE, NodeProcess, fixture, flip_every, free_tcp_port, loopback, metric,
    poll_until,
};
use reqwest::Client;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_answers_corrupt_record_alone_and_is_rebuilt_from_the_change_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_tcp_port();
    let topology = fixture::write_topology(dir.path(), port);
    let data = dir.path().join("data");
    let client = Client::new();
    let start = || NodeProcess::spawn(&topology, "eu-1", &data, loopback(port), &[]);

    let mut node = start();
    node.assert_ready(&client, DEADLINE).await;
    let api = ApiClient::new(node.url(""));
    let mut written = Vec::new();
    for i in 1..=4 {
        let key = format!("c/{i}");
        let (status, answer) = api.put(&key, json!({"m": format!("MARK-{i}")})).await;
        assert_eq!(status, 200, "{answer}");
        written.push(key);
    }
    // c/2 gets a second change, so the rebuild must merge more than a first write.
    let (status, answer) = api.patch("c/2", json!({"n": 7})).await;
    assert_eq!(status, 200, "{answer}");
    let mut before = Vec::new();
    for key in &written {
        let (status, body) = api.get(key).await;
        assert_eq!(status, 200, "{body}");
        before.push(body);
    }
    node.sigterm();
    node.wait_exit(Duration::from_secs(30))
        .expect("exits after SIGTERM");
    drop(node);

    // The stored view of c/2 and c/4 is JSON; the change-log entries hold the strings in
    // automerge's encoding, never in this form, so only the records are damaged.
    let db = data.join("meridian.redb");
    assert!(
        flip_every(&db, br#""m":"MARK-2""#).expect("flip") >= 1,
        "c/2's view found"
    );
    assert!(
        flip_every(&db, br#""m":"MARK-4""#).expect("flip") >= 1,
        "c/4's view found"
    );

    let node = start();
    node.assert_ready(&client, DEADLINE).await;
    let api = ApiClient::new(node.url(""));

    // First touch of c/4: a GET. Never the damaged value, always the error.
    let (status, body) = api.get("c/4").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "corrupt_record", "{body}");
    // First touch of c/2: the list. The page answers with the others and names c/2 apart.
    let page = api.json("/v1/kv?prefix=c/").await;
    let listed: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|item| item["key"].as_str())
        .collect();
    for key in ["c/1", "c/3"] {
        assert!(listed.contains(&key), "{key} missing from {page}");
    }
    assert!(
        page["corrupt"]
            .as_array()
            .is_some_and(|keys| keys.contains(&Value::from("c/2"))),
        "c/2 not named as corrupt: {page}"
    );

    // Both are rebuilt from the change log to exactly what they were.
    for (key, expected) in written.iter().zip(&before) {
        let rebuilt = poll_until(DEADLINE, || async {
            let (status, body) = api.get(key).await;
            status == 200 && body == *expected
        })
        .await;
        let (status, body) = api.get(key).await;
        assert!(
            rebuilt,
            "{key}: {status} {body}, expected {expected}; log:\n{}",
            node.log_text()
        );
    }
    let metrics = api.text("/metrics").await.expect("metrics");
    assert!(
        metric(&metrics, "meridian_corrupt_records_total").is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "meridian_record_repairs_total{reason=\"rebuilt\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
    let log = node.log_text();
    assert!(
        log.contains("stored record is corrupt") && log.contains("c/4"),
        "the damage is logged with the key:\n{log}"
    );
    // A write on top of the rebuilt record works and keeps the rebuilt fields.
    let (status, answer) = api.patch("c/2", json!({"o": 1})).await;
    assert_eq!(status, 200, "{answer}");
    let (_, body) = api.get("c/2").await;
    assert_eq!(
        body["value"],
        json!({"m": "MARK-2", "n": 7, "o": 1}),
        "{body}"
    );
}
