//! The HTTP API of SPEC §5 against a real server on a port-0 listener, with a real redb file.

use std::sync::Arc;
use std::time::Duration;

use meridian_harness::{ApiClient, fixture, metric, wait_ready};
use meridian_node::config::Topology;
use meridian_node::server;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

struct TestNode {
    api: ApiClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), server::ServeError>>>,
    _dir: tempfile::TempDir,
}

impl TestNode {
    async fn start() -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let topo_path = fixture::write_topology(dir.path(), addr.port());
        let topology = Arc::new(Topology::load(&topo_path).expect("topology"));
        let data = dir.path().join("data");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(
                topology,
                "eu-1",
                &data,
                listener,
                server::NodeOptions::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
        let node = TestNode {
            api: ApiClient::new(format!("http://{addr}")),
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        };
        assert!(
            wait_ready(
                node.api.http(),
                &node.api.url("/readyz"),
                Duration::from_secs(30)
            )
            .await,
            "node did not become ready"
        );
        node
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("node ran cleanly");
        }
    }
}

fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_kind: &str) {
    assert_eq!(status.as_u16(), want_status, "body: {body}");
    assert_eq!(body["error"], json!(want_kind), "body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {body}"
    );
}

#[tokio::test]
async fn put_get_patch_incr_delete() {
    let node = TestNode::start().await;
    let (s, put) = node
        .api
        .put(
            "users/eu/42",
            json!({"name": "Ada", "tags": ["x"], "n": 1.5}),
        )
        .await;
    assert_eq!(s, 200, "{put}");
    assert_eq!(put["key"], "users/eu/42");
    assert_eq!(put["region"], "eu-west");
    assert_eq!(
        put["home_region"],
        Value::Null,
        "no rule matches: the record is global"
    );
    let v1 = put["version"].as_str().expect("version").to_string();

    let (s, got) = node.api.get("users/eu/42").await;
    assert_eq!(s, 200);
    assert_eq!(
        got["value"],
        json!({"name": "Ada", "tags": ["x"], "n": 1.5})
    );
    assert_eq!(got["version"], json!(v1));
    assert!(
        got.get("conflicts").is_none(),
        "no conflicts on a single writer: {got}"
    );

    // PUT replaces: fields left out are removed.
    let (_, put2) = node.api.put("users/eu/42", json!({"name": "Ada L."})).await;
    let v2 = put2["version"].as_str().expect("version").to_string();
    assert!(v2 > v1, "versions from one node grow: {v1} then {v2}");
    assert_eq!(
        node.api.get("users/eu/42").await.1["value"],
        json!({"name": "Ada L."})
    );

    // PATCH is a merge patch.
    let (s, _) = node
        .api
        .patch("users/eu/42", json!({"email": "a@b", "name": null}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        node.api.get("users/eu/42").await.1["value"],
        json!({"email": "a@b"})
    );

    // Counters.
    for by in [1, 2, 3] {
        let (s, b) = node
            .api
            .incr("users/eu/42", json!({"field": "visits", "by": by}))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, _) = node
        .api
        .incr("users/eu/42", json!({"field": "visits"}))
        .await;
    assert_eq!(s, 200, "by defaults to 1");
    assert_eq!(
        node.api.get("users/eu/42").await.1["value"]["visits"],
        json!(7)
    );
    let (s, b) = node
        .api
        .incr("users/eu/42", json!({"field": "email", "by": 1}))
        .await;
    assert_error(s, &b, 409, "not_a_counter");
    let (s, b) = node
        .api
        .incr("users/eu/42", json!({"field": "visits", "by": "x"}))
        .await;
    assert_error(s, &b, 400, "invalid_request");

    // DELETE.
    let (s, del) = node.api.delete("users/eu/42").await;
    assert_eq!(s, 200, "{del}");
    assert!(del["version"].as_str().is_some());
    let (s, b) = node.api.get("users/eu/42").await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = node.api.delete("users/eu/42").await;
    assert_error(s, &b, 404, "not_found");
    node.stop().await;
}

#[tokio::test]
async fn keys_are_percent_decoded_and_validated() {
    let node = TestNode::start().await;
    let (s, b) = node.api.put("a%20b/c%2Fd", json!({"x": 1})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["key"], "a b/c/d");
    assert_eq!(node.api.get("a%20b/c/d").await.0, 200);

    let max = "k".repeat(512);
    assert_eq!(node.api.put(&max, json!({})).await.0, 200);
    let (s, b) = node.api.put(&"k".repeat(513), json!({})).await;
    assert_error(s, &b, 400, "invalid_key");
    let (s, b) = node.api.put("bad%01key", json!({})).await;
    assert_error(s, &b, 400, "invalid_key");
    let (s, b) = node.api.put("bad%FFutf8", json!({})).await;
    assert_error(s, &b, 400, "invalid_key");
    let (s, b) = node.api.get("bad%0A").await;
    assert_error(s, &b, 400, "invalid_key");
    node.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_leaves_data_untouched() {
    let node = TestNode::start().await;
    node.api.put("doc", json!({"keep": true})).await;
    let before = node.api.get("doc").await.1;

    // Each refused with 400 and the error kind named.
    let doc = "/v1/kv/doc";
    let incr = "/v1/kv/doc/incr";
    let cases: [(Method, &str, &[u8], &str); 8] = [
        (Method::PUT, doc, b"{not json", "invalid_json"),
        (Method::PUT, doc, b"[1,2]", "not_an_object"),
        (Method::PUT, doc, b"\"str\"", "not_an_object"),
        (Method::PATCH, doc, b"null", "not_an_object"),
        (Method::PUT, doc, b"{\"\xff\xfe\":1}", "invalid_json"),
        (Method::PUT, doc, b"", "invalid_json"),
        (
            Method::POST,
            incr,
            br#"{"field": "n", "extra": 1}"#,
            "invalid_request",
        ),
        (
            Method::POST,
            incr,
            br#"{"field": "n", "by": 1e40}"#,
            "invalid_request",
        ),
    ];
    for (method, path, body, kind) in cases {
        let (s, b) = node.api.raw(method.clone(), path, body.to_vec()).await;
        assert_eq!(
            s.as_u16(),
            400,
            "{method} {path} {:?}: {b}",
            String::from_utf8_lossy(body)
        );
        assert_error(s, &b, 400, kind);
    }

    // 33 levels: one too deep. 32 is accepted.
    let nest = |levels: usize| {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({"a": v});
        }
        v
    };
    let (s, b) = node.api.put("doc", nest(33)).await;
    assert_error(s, &b, 400, "too_deep");
    // Far deeper than serde_json's own recursion limit must still be a clean 400.
    let hostile = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let (s, b) = node
        .api
        .raw(Method::PUT, "/v1/kv/doc", hostile.into_bytes())
        .await;
    assert_eq!(s, 400, "{b}");

    // Over 1 MiB.
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat((1 << 20) + 10));
    let (s, b) = node
        .api
        .raw(Method::PUT, "/v1/kv/doc", big.into_bytes())
        .await;
    assert_error(s, &b, 413, "body_too_large");

    assert_eq!(
        node.api.get("doc").await.1,
        before,
        "refused writes changed nothing"
    );
    assert_eq!(node.api.put("deep-ok", nest(32)).await.0, 200);

    // Unknown paths and wrong methods.
    let (s, b) = node.api.call(Method::GET, "/v2/nothing", None).await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = node
        .api
        .call(Method::POST, "/v1/kv/doc", Some(json!({})))
        .await;
    assert_error(s, &b, 405, "method_not_allowed");
    let (s, b) = node.api.call(Method::DELETE, "/healthz", None).await;
    assert_error(s, &b, 405, "method_not_allowed");
    let (s, b) = node.api.call(Method::GET, "/v1/kv?limit=0", None).await;
    assert_error(s, &b, 400, "invalid_query");
    let (s, b) = node.api.call(Method::GET, "/v1/kv?bogus=1", None).await;
    assert_error(s, &b, 400, "invalid_query");

    // The node is still healthy after all of it.
    assert_eq!(node.api.call(Method::GET, "/healthz", None).await.0, 200);
    node.stop().await;
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer_and_refuses_reuse() {
    let node = TestNode::start().await;
    let send = |key: &'static str, body: Value| {
        let req = node
            .api
            .http()
            .post(node.api.url("/v1/kv/ctr/incr"))
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let r = req.send().await.expect("send");
            let status = r.status();
            let replayed = r.headers().get("idempotent-replayed").is_some();
            (status, replayed, r.json::<Value>().await.expect("json"))
        }
    };
    let (s1, r1, first) = send("abc-1", json!({"field": "n", "by": 5})).await;
    assert_eq!((s1.as_u16(), r1), (200, false));
    let (s2, r2, second) = send("abc-1", json!({"field": "n", "by": 5})).await;
    assert_eq!((s2.as_u16(), r2), (200, true));
    assert_eq!(first, second, "a retry returns the first answer");
    assert_eq!(
        node.api.get("ctr").await.1["value"]["n"],
        json!(5),
        "applied once"
    );
    let (s3, _, b3) = send("abc-1", json!({"field": "n", "by": 6})).await;
    assert_error(s3, &b3, 422, "idempotency_key_reused");
    assert_eq!(node.api.get("ctr").await.1["value"]["n"], json!(5));
    node.stop().await;
}

#[tokio::test]
async fn list_pages_in_key_order_and_skips_deleted() {
    let node = TestNode::start().await;
    for i in 0..7 {
        node.api.put(&format!("p/{i}"), json!({"i": i})).await;
    }
    node.api.put("q/other", json!({})).await;
    node.api.delete("p/3").await;
    let (s, page1) = node
        .api
        .call(Method::GET, "/v1/kv?prefix=p/&limit=4", None)
        .await;
    assert_eq!(s, 200);
    let keys = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["key"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(keys(&page1), ["p/0", "p/1", "p/2", "p/4"]);
    assert_eq!(page1["next"], "p/4");
    assert_eq!(page1["items"][0]["value"], json!({"i": 0}));
    let (_, page2) = node
        .api
        .call(Method::GET, "/v1/kv?prefix=p/&limit=4&after=p/4", None)
        .await;
    assert_eq!(keys(&page2), ["p/5", "p/6"]);
    assert_eq!(page2["next"], Value::Null);
    let (_, all) = node.api.call(Method::GET, "/v1/kv", None).await;
    assert_eq!(keys(&all).len(), 7);
    node.stop().await;
}

#[tokio::test]
async fn residency_rules_refuse_records_of_other_regions() {
    let node = TestNode::start().await;
    let (s, b) = node.api.put("users/us/1", json!({"a": 1})).await;
    assert_error(s, &b, 421, "misdirected");
    assert_eq!(b["home_region"], "us-east");
    let (s, b) = node.api.get("users/us/1").await;
    assert_error(s, &b, 421, "misdirected");
    // Forwarding needs a reachable node of the home region; none is.
    let (s, b) = node.api.put("users/ap/1", json!({"a": 1})).await;
    assert_error(s, &b, 503, "home_region_unreachable");
    let (_, all) = node.api.call(Method::GET, "/v1/kv", None).await;
    assert_eq!(all["items"], json!([]), "nothing was stored");
    node.stop().await;
}

#[tokio::test]
async fn status_health_and_metrics() {
    let node = TestNode::start().await;
    node.api.put("m", json!({"a": 1})).await;
    let (s, status) = node.api.call(Method::GET, "/v1/status", None).await;
    assert_eq!(s, 200);
    assert_eq!(status["node"], "eu-1");
    assert_eq!(status["region"], "eu-west");
    assert_eq!(status["cluster"], "test");
    assert!(status["hlc"].as_str().is_some());
    assert_eq!(status["peers"][0]["node"], "us-1");
    assert_eq!(node.api.call(Method::GET, "/healthz", None).await.0, 200);
    assert_eq!(node.api.call(Method::GET, "/readyz", None).await.0, 200);
    let text = node.api.text("/metrics").await.expect("metrics");
    assert!(
        text.contains("meridian_writes_total{op=\"put\",outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("meridian_write_duration_seconds_bucket"),
        "{text}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_commits_and_lose_nothing() {
    let node = Arc::new(TestNode::start().await);
    let mut tasks = Vec::new();
    for c in 0..32 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let (s, _) = node
                    .api
                    .put(&format!("gc/{c}/{i}"), json!({"c": c, "i": i}))
                    .await;
                assert_eq!(s, 200);
                let (s, _) = node.api.incr("hot", json!({"field": "n"})).await;
                assert_eq!(s, 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    assert_eq!(
        node.api.get("hot").await.1["value"]["n"],
        json!(320),
        "every increment counted"
    );
    let (_, all) = node
        .api
        .call(Method::GET, "/v1/kv?prefix=gc/&limit=1000", None)
        .await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(320));
    let text = node.api.text("/metrics").await.expect("metrics");
    let commits = metric(&text, "meridian_commit_batch_writes_count").expect("commit count metric");
    assert!(
        commits < 640.0,
        "640 writes from 32 clients took {commits} commits: no group commit"
    );
    match Arc::try_unwrap(node) {
        Ok(n) => n.stop().await,
        Err(_) => panic!("node still shared"),
    }
}
