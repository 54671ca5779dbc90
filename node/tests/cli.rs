//! The command line: `topology check`, `dump`, usage errors and exit codes.

use meridian_harness::{
    ApiClient, DEADLINE, NodeProcess, Residency, TopologyText, assert_contains, fixture,
    free_tcp_port, loopback, run_meridian,
};

fn meridian(args: &[&str]) -> (i32, String, String) {
    let run = run_meridian(args);
    (run.code.unwrap_or(-1), run.stdout, run.stderr)
}

#[test]
fn topology_check_accepts_the_example_and_names_every_broken_field() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../topology.example.toml");
    let (code, out, err) = meridian(&["topology", "check", example]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 regions"), "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    // Two regions of one name, a node in an undeclared region, a rule homed in an
    // undeclared region.
    TopologyText::cluster("demo")
        .tls("certs/ca.pem")
        .region("eu-west")
        .region("eu-west")
        .node("n1", "mars", loopback(7101), loopback(8101))
        .residency(&Residency::new("r", "users/*", "venus"))
        .write(&bad);
    let (code, _out, err) = meridian(&["topology", "check", bad.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert_contains(
        &err,
        &["regions[1].name", "nodes[0].region", "residency[0].home"],
    );
    assert!(
        err.contains("bad.toml:"),
        "problems carry the file and line: {err}"
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "cluster = \"demo\"\ncolour = 1\n").expect("write");
    let (code, _, err) = meridian(&["topology", "check", unknown.to_str().expect("utf8")]);
    assert_eq!(code, 2);
    assert!(err.contains("colour"), "{err}");

    let (code, _, err) = meridian(&["topology", "check", "/nonexistent/topology.toml"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(meridian(&["serve"]).0, 2);
    assert_eq!(meridian(&["frobnicate"]).0, 2);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../topology.example.toml");
    let (code, _, err) = meridian(&["serve", "--topology", example, "--node", "nobody"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nobody"), "{err}");
    let (code, _, err) = meridian(&["dump", "--data-dir", "/nonexistent/dir"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn dump_lists_what_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_tcp_port();
    let topology = fixture::write_topology(dir.path(), port);
    let data = dir.path().join("data");
    let mut node = NodeProcess::spawn(
        &topology,
        "eu-1",
        &data,
        loopback(port),
        &["--log-format", "json"],
    );
    let api = ApiClient::new(node.url(""));
    node.assert_ready(api.http(), DEADLINE).await;
    for key in ["a/1", "a/2", "b"] {
        assert_eq!(api.put(key, serde_json::json!({"k": key})).await.0, 200);
    }
    api.delete("b").await;
    node.sigterm();
    node.wait_exit(std::time::Duration::from_secs(30))
        .expect("exit");
    // JSON log lines carry node and region.
    let log = node.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("node serving"))
        .expect("serving line");
    let parsed: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(parsed["span"]["node"], "eu-1", "{line}");
    assert_eq!(parsed["span"]["region"], "eu-west", "{line}");

    let data_s = data.to_str().expect("utf8");
    let (code, out, err) = meridian(&["dump", "--data-dir", data_s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("a/1") && out.contains("a/2"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("b ") && l.contains("deleted")),
        "{out}"
    );
    let (code, out, _) = meridian(&["dump", "--data-dir", data_s, "--json"]);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(doc["node"], "eu-1");
    assert_eq!(doc["records"].as_array().map(Vec::len), Some(3));
    assert_eq!(doc["records"][0]["key"], "a/1");
    assert!(doc["records"][0]["version"].as_str().is_some());
}
