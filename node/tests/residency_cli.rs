//! The real `meridian` binary and residency policy changes: data written while a key was
//! global is found by `meridian residency audit` once a rule pins it elsewhere, a node refuses
//! to start over it, and `serve --purge-disallowed` removes exactly that data.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::NodeProcess;
use reqwest::Client;
use serde_json::{Value, json};

const READY_DEADLINE: Duration = Duration::from_secs(60);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

const US_RULE: &str = r#"
[[residency]]
name = "us-users"
keys = "users/us/*"
home = "us-east"
"#;

struct Cluster {
    dir: tempfile::TempDir,
    /// No residency rules: every key is global.
    open: PathBuf,
    /// `users/us/*` pinned to us-east.
    pinned: PathBuf,
    data: PathBuf,
    api: SocketAddr,
}

/// eu-1 (eu-west, the node under test) and us-1 (us-east, never started), the same nodes and
/// ports in both topology files; one set of certificates serves both.
fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let api_port = common::free_tcp_port();
    let nodes = common::two_region_nodes("residency", api_port);
    let open = dir.path().join("open.toml");
    let pinned = dir.path().join("pinned.toml");
    std::fs::write(&open, &nodes).expect("write topology");
    std::fs::write(&pinned, format!("{nodes}{US_RULE}")).expect("write topology");
    let topology = meridian_node::config::Topology::load(&open).expect("valid topology");
    meridian_node::config::Topology::load(&pinned).expect("valid pinned topology");
    meridian_node::tools::certs::generate_certs(&topology, &dir.path().join("certs"))
        .expect("certs");
    Cluster {
        data: dir.path().join("data-eu-1"),
        api: SocketAddr::from(([127, 0, 0, 1], api_port)),
        open,
        pinned,
        dir,
    }
}

/// `meridian serve` for eu-1, stderr to a log file, logging at info whatever the environment.
fn spawn(c: &Cluster, topology: &Path, extra: &[&str], log_name: &str) -> NodeProcess {
    let log = c.dir.path().join(log_name);
    let log_file = std::fs::File::create(&log).expect("create log file");
    let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["serve", "--topology"])
        .arg(topology)
        .args(["--node", "eu-1", "--data-dir"])
        .arg(&c.data)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn meridian");
    NodeProcess {
        child,
        api: c.api,
        log,
    }
}

async fn ready(node: &NodeProcess) {
    let client = Client::new();
    assert!(
        common::wait_ready(&client, &node.url("/readyz"), READY_DEADLINE).await,
        "node did not become ready; log:\n{}",
        node.log_text()
    );
}

fn stop(node: &mut NodeProcess) {
    node.sigterm();
    let status = node.wait_exit(EXIT_DEADLINE).expect("exits after SIGTERM");
    assert!(status.success(), "{status}; log:\n{}", node.log_text());
}

fn meridian(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
    cmd.args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    cmd.output().expect("run meridian")
}

fn audit(topology: &Path, data: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec!["residency", "audit"];
    args.extend_from_slice(extra);
    let out = meridian(&args, &[("--topology", topology), ("--data-dir", data)]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dumped_keys(data: &Path) -> Vec<String> {
    let out = meridian(&["dump", "--json"], &[("--data-dir", data)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("dump JSON");
    doc["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["key"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rule_is_audited_refused_at_start_and_purged() {
    let c = cluster();

    // Written while every key is global.
    let mut node = spawn(&c, &c.open, &[], "serve-open.log");
    ready(&node).await;
    let client = Client::new();
    for key in ["users/eu/1", "users/us/1", "other/1"] {
        let r = client
            .put(node.url(&format!("/v1/kv/{key}")))
            .json(&json!({"name": key}))
            .send()
            .await
            .expect("put");
        assert_eq!(
            r.status(),
            200,
            "{key}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    stop(&mut node);
    drop(node);

    // Under the old policy the directory is clean.
    let (code, stdout, stderr) = audit(&c.open, &c.data, &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("no record, log entry or kept-aside change outside its allowed regions"),
        "{stdout}"
    );
    assert!(stdout.contains("every record is global"), "{stdout}");

    // (a) The pinning rule makes users/us/1 (record and its log entry) a violation.
    let (code, stdout, stderr) = audit(&c.pinned, &c.data, &[]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.contains("node eu-1 in region eu-west")
            && first.contains(&c.pinned.display().to_string()),
        "{stdout}"
    );
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("users/") || l.starts_with("other/"))
        .collect();
    assert_eq!(listed.len(), 2, "{stdout}");
    assert!(
        listed.iter().all(|l| l.starts_with("users/us/1")),
        "{stdout}"
    );
    assert!(listed.iter().any(|l| l.contains(" record ")), "{stdout}");
    assert!(
        listed.iter().any(|l| l.contains(" log entry eu-1@")),
        "{stdout}"
    );
    assert!(
        listed
            .iter()
            .all(|l| l.contains("us-users") && l.ends_with("us-east")),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "rule \"us-users\" (keys \"users/us/*\", home us-east): 1 record, 1 log entry, \
             0 kept-aside changes"
        ),
        "{stdout}"
    );

    let (code, stdout, stderr) = audit(&c.pinned, &c.data, &["--json"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let doc: Value = serde_json::from_str(&stdout).expect("audit JSON");
    assert_eq!(doc["node"], "eu-1");
    assert_eq!(doc["region"], "eu-west");
    assert_eq!(doc["clean"], false);
    assert_eq!(
        doc["total"],
        json!({"records": 1, "log_entries": 1, "pending": 0})
    );
    let kinds: Vec<(&str, &str)> = doc["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .map(|v| {
            assert_eq!(v["rule"], "us-users");
            assert_eq!(v["home_region"], "us-east");
            (
                v["key"].as_str().unwrap_or_default(),
                v["kind"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("users/us/1", "record"), ("users/us/1", "log_entry")]
    );
    assert_eq!(doc["rules"][0]["rule"], "us-users");
    assert_eq!(doc["rules"][0]["records"], 1);

    // (b) A node over that data refuses to start, naming the rule and the counts.
    let mut refused = spawn(&c, &c.pinned, &[], "serve-refused.log");
    let status = refused.wait_exit(EXIT_DEADLINE).expect("exits at start");
    let log = refused.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(
            "rule \"us-users\" (keys \"users/us/*\", home us-east): 1 record, 1 log entry, \
             0 kept-aside changes"
        ),
        "{log}"
    );
    assert!(log.contains("--purge-disallowed"), "{log}");
    assert!(log.contains("meridian residency audit"), "{log}");
    drop(refused);
    // Refusing removed nothing.
    assert!(dumped_keys(&c.data).contains(&"users/us/1".to_owned()));

    // (c) --purge-disallowed starts, and says what it removed.
    let mut node = spawn(&c, &c.pinned, &["--purge-disallowed"], "serve-purge.log");
    ready(&node).await;
    let log = node.log_text();
    assert!(
        log.contains("removed 1 record, 1 log entry, 0 kept-aside changes"),
        "{log}"
    );
    assert!(log.contains("rule \"us-users\""), "{log}");
    let r = client
        .get(node.url("/v1/kv/users/eu/1"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    // A running node's directory cannot be audited.
    let (code, stdout, stderr) = audit(&c.pinned, &c.data, &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("in use by a running node"), "{stderr}");
    stop(&mut node);
    drop(node);

    let (code, stdout, stderr) = audit(&c.pinned, &c.data, &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("no record, log entry or kept-aside change outside its allowed regions"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "rule \"us-users\" (keys \"users/us/*\", home us-east): 0 records, 0 log entries"
        ),
        "{stdout}"
    );
    let mut keys = dumped_keys(&c.data);
    keys.sort();
    assert_eq!(keys, ["other/1", "users/eu/1"]);
}

#[test]
fn audit_refuses_bad_input_with_exit_2() {
    let c = cluster();
    // No data directory.
    let (code, _, stderr) = audit(&c.pinned, &c.data, &[]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no data directory at"), "{stderr}");

    // A directory that is not a node's.
    std::fs::create_dir_all(&c.data).expect("mkdir");
    let (code, _, stderr) = audit(&c.pinned, &c.data, &[]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("not a Meridian data directory"), "{stderr}");

    // An invalid topology.
    let bad = c.dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&c.pinned).expect("read");
    let text =
        format!("{text}[[residency]]\nname = \"broken\"\nkeys = \"a/[\"\nhome = \"us-east\"\n");
    std::fs::write(&bad, text).expect("write");
    let (code, _, stderr) = audit(&bad, &c.data, &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("residency[1].keys: invalid glob \"a/[\": unclosed character class"),
        "{stderr}"
    );

    // A node that the topology does not declare: the directory of eu-1 under a topology
    // where the eu-west node is called eu-2.
    let (store, _) =
        meridian_node::store::Store::open(&c.data, "eu-1").expect("create the directory");
    drop(store);
    let renamed = c.dir.path().join("renamed.toml");
    let text = std::fs::read_to_string(&c.pinned)
        .expect("read")
        .replace("\"eu-1\"", "\"eu-2\"");
    std::fs::write(&renamed, text).expect("write");
    let (code, _, stderr) = audit(&renamed, &c.data, &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("belongs to node \"eu-1\", which the topology does not declare"),
        "{stderr}"
    );
    // --node must name the directory's owner.
    let (code, _, stderr) = audit(&c.pinned, &c.data, &["--node", "us-1"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("belongs to node \"eu-1\", not \"us-1\""),
        "{stderr}"
    );
    // And an empty directory of a declared node is clean.
    let (code, stdout, _) = audit(&c.pinned, &c.data, &["--node", "eu-1"]);
    assert_eq!(code, Some(0), "{stdout}");
}
