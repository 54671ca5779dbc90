//! The command line: `topology check`, `dump`, usage errors and exit codes.

mod common;

use std::process::Command;
use std::time::Duration;

fn meridian(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .output()
        .expect("run meridian");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn topology_check_accepts_the_example_and_names_every_broken_field() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../topology.example.toml");
    let (code, out, err) = meridian(&["topology", "check", example]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 regions"), "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"cluster = "demo"
[tls]
ca = "certs/ca.pem"
[[regions]]
name = "eu-west"
[[regions]]
name = "eu-west"
[[nodes]]
id = "n1"
region = "mars"
peer = "127.0.0.1:7101"
api = "127.0.0.1:8101"
[[residency]]
name = "r"
keys = "users/*"
home = "venus"
"#,
    )
    .expect("write");
    let (code, _out, err) = meridian(&["topology", "check", bad.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    for needle in ["regions[1].name", "nodes[0].region", "residency[0].home"] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
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
    let port = common::free_tcp_port();
    let topology = common::write_topology(dir.path(), port);
    let data = dir.path().join("data");
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut node =
        common::NodeProcess::spawn(&topology, "eu-1", &data, api, &["--log-format", "json"]);
    let client = reqwest::Client::new();
    assert!(
        common::wait_ready(&client, &node.url("/readyz"), Duration::from_secs(60)).await,
        "{}",
        node.log_text()
    );
    for key in ["a/1", "a/2", "b"] {
        let r = client
            .put(node.url(&format!("/v1/kv/{key}")))
            .json(&serde_json::json!({"k": key}))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 200);
    }
    client
        .delete(node.url("/v1/kv/b"))
        .send()
        .await
        .expect("delete");
    node.sigterm();
    node.wait_exit(Duration::from_secs(30)).expect("exit");
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
