//! The real `meridian` binary and residency policy changes: data written while a key was
//! global is found by `meridian residency audit` once a rule pins it elsewhere, a node refuses
//! to start over it, and `serve --purge-disallowed` removes exactly that data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meridian_harness::{
    ApiClient, DEADLINE, NodeProcess, Residency, Serve, TopologyText, assert_contains,
    assert_valid_topology, dumped_keys, fixture, free_tcp_port, loopback,
};
use serde_json::{Value, json};

const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// The summary line of the `us-users` rule when it finds the one record written under it.
const US_RULE_FOUND: &str = concat!(
    "rule \"us-users\" (keys \"users/us/*\", home us-east): ",
    "1 record, 1 log entry, 0 kept-aside changes"
);
const CLEAN: &str = "no record, log entry or kept-aside change outside its allowed regions";

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
    let api_port = free_tcp_port();
    let nodes = fixture::two_region_nodes("residency", api_port);
    let open = fixture::write_with_certs(dir.path(), "open.toml", &nodes);
    let pinned = dir.path().join("pinned.toml");
    nodes
        .residency(&Residency::new("us-users", "users/us/*", "us-east"))
        .write(&pinned);
    assert_valid_topology(&pinned);
    Cluster {
        open,
        data: dir.path().join("data-eu-1"),
        api: loopback(api_port),
        pinned,
        dir,
    }
}

/// `meridian serve` for eu-1, its log in `log_name`, logging at info whatever the environment.
fn spawn(c: &Cluster, topology: &Path, extra: &[&str], log_name: &str) -> NodeProcess {
    Serve::new(topology, "eu-1", &c.data, c.api)
        .args(extra)
        .log(&c.dir.path().join(log_name))
        .env("RUST_LOG", "info")
        .spawn()
}

fn stop(node: &mut NodeProcess) {
    node.sigterm();
    let status = node.wait_exit(EXIT_DEADLINE).expect("exits after SIGTERM");
    assert!(status.success(), "{status}; log:\n{}", node.log_text());
}

fn audit(topology: &Path, data: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let run = meridian_harness::residency_audit(topology, data, extra);
    (run.code, run.stdout, run.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rule_is_audited_refused_at_start_and_purged() {
    let c = cluster();

    // Written while every key is global.
    let mut node = spawn(&c, &c.open, &[], "serve-open.log");
    node.assert_ready(&reqwest::Client::new(), DEADLINE).await;
    for key in ["users/eu/1", "users/us/1", "other/1"] {
        let (status, body) = ApiClient::new(node.url(""))
            .put(key, json!({"name": key}))
            .await;
        assert_eq!(status, 200, "{key}: {body}");
    }
    stop(&mut node);
    drop(node);

    // Under the old policy the directory is clean.
    let (code, stdout, stderr) = audit(&c.open, &c.data, &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_contains(&stdout, &[CLEAN, "every record is global"]);

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
    assert_contains(&stdout, &[US_RULE_FOUND]);

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
    assert_contains(
        &log,
        &[
            US_RULE_FOUND,
            "--purge-disallowed",
            "meridian residency audit",
        ],
    );
    drop(refused);
    // Refusing removed nothing.
    assert!(dumped_keys(&c.data).contains(&"users/us/1".to_owned()));

    // (c) --purge-disallowed starts, and says what it removed.
    let mut node = spawn(&c, &c.pinned, &["--purge-disallowed"], "serve-purge.log");
    let api = ApiClient::new(node.url(""));
    node.assert_ready(api.http(), DEADLINE).await;
    assert_contains(
        &node.log_text(),
        &[
            "removed 1 record, 1 log entry, 0 kept-aside changes",
            "rule \"us-users\"",
        ],
    );
    assert_eq!(api.get("users/eu/1").await.0, 200);
    // A running node's directory cannot be audited.
    let (code, stdout, stderr) = audit(&c.pinned, &c.data, &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert_contains(&stderr, &["in use by a running node"]);
    stop(&mut node);
    drop(node);

    let (code, stdout, stderr) = audit(&c.pinned, &c.data, &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_contains(
        &stdout,
        &[
            CLEAN,
            "rule \"us-users\" (keys \"users/us/*\", home us-east): 0 records, 0 log entries",
        ],
    );
    let mut keys = dumped_keys(&c.data);
    keys.sort();
    assert_eq!(keys, ["other/1", "users/eu/1"]);
}

#[test]
fn audit_refuses_bad_input_with_exit_2() {
    let c = cluster();
    // No data directory.
    let no_dir = audit(&c.pinned, &c.data, &[]);
    // A directory that is not a node's.
    std::fs::create_dir_all(&c.data).expect("mkdir");
    let not_a_node = audit(&c.pinned, &c.data, &[]);
    // An invalid topology.
    let bad = c.dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&c.pinned).expect("read");
    let broken = TopologyText::new().residency(&Residency::new("broken", "a/[", "us-east"));
    std::fs::write(&bad, format!("{text}{broken}")).expect("write");
    let invalid = audit(&bad, &c.data, &[]);
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
    let undeclared = audit(&renamed, &c.data, &[]);
    // --node must name the directory's owner.
    let not_owner = audit(&c.pinned, &c.data, &["--node", "us-1"]);
    for ((code, _, stderr), needle) in [
        (no_dir, "no data directory at"),
        (not_a_node, "not a Meridian data directory"),
        (
            invalid,
            "residency[1].keys: invalid glob \"a/[\": unclosed character class",
        ),
        (
            undeclared,
            "belongs to node \"eu-1\", which the topology does not declare",
        ),
        (not_owner, "belongs to node \"eu-1\", not \"us-1\""),
    ] {
        assert_eq!(code, Some(2), "{stderr}");
        assert_contains(&stderr, &[needle]);
    }
    // And an empty directory of a declared node is clean.
    let (code, stdout, _) = audit(&c.pinned, &c.data, &["--node", "eu-1"]);
    assert_eq!(code, Some(0), "{stdout}");
}
