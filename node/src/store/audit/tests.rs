use super::purge::purge_db;
use super::*;
use crate::store::{PendingChange, PendingReason, Store, StoredRecord, WriteItem};
use crate::testing;
use meridian_harness::Residency;
use meridian_replication::Version;
use meridian_replication::wire::FrontierEntry;
use meridian_residency::{Foreign, RuleSpec};

fn regions() -> Vec<String> {
    vec!["eu-west".into(), "us-east".into(), "ap-south".into()]
}

fn rule(name: &str, keys: &str, home: &str, replicas: &[&str]) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        keys: keys.into(),
        home: home.into(),
        replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
        foreign: Foreign::Forward,
    }
}

fn policy(rules: Vec<RuleSpec>) -> Policy {
    Policy::new(rules, &regions()).expect("valid policy")
}

fn pinned() -> Policy {
    policy(vec![
        rule("us-users", "users/us/*", "us-east", &[]),
        rule("eu-users", "users/eu/*", "eu-west", &["ap-south"]),
        rule("ap-only", "ap/*", "ap-south", &[]),
    ])
}

fn record(live: bool) -> StoredRecord {
    StoredRecord {
        live,
        version: Version {
            time_ntp64: 1,
            node_hlc_id: 1,
        },
        home_region: None,
        view_json: b"{}".to_vec(),
        doc: vec![1],
        appended_changes: 0,
    }
}

/// A store of node `n1` holding `keys` as records with one log entry each (origin `n1`,
/// HLC 1, 2, ...), plus one kept-aside change of `n2` per key.
fn store_with(keys: &[&str]) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(dir.path(), "n1").expect("open");
    let items: Vec<WriteItem> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let mut item = WriteItem::local(
                (*key).to_owned(),
                record(i % 2 == 0),
                "n1",
                i as u64 + 1,
                vec![7],
                None,
            );
            item.pending_put.push(PendingChange {
                origin: "n2".into(),
                hlc: 100 + i as u64,
                reason: PendingReason::WaitingForDependencies,
                change: vec![8],
            });
            item
        })
        .collect();
    store.commit_batch(&items, &[]).expect("commit");
    (dir, store)
}

fn keys_of(report: &AuditReport, kind: fn(&ViolationKind) -> bool) -> Vec<&str> {
    report
        .violations
        .iter()
        .filter(|v| kind(&v.what))
        .map(|v| v.key.as_str())
        .collect()
}

#[test]
fn scan_lists_records_log_entries_and_pending_changes_outside_the_region() {
    let (_dir, store) = store_with(&["users/us/1", "users/eu/1", "other/1", "ap/x"]);
    let report = scan(&store, &pinned(), "eu-west").expect("scan");
    assert_eq!(report.node, "n1");
    assert_eq!(report.region, "eu-west");
    assert_eq!(
        report.scanned,
        KindCounts {
            records: 4,
            log_entries: 4,
            pending: 4
        }
    );
    let is_record = |k: &ViolationKind| matches!(k, ViolationKind::Record { .. });
    let is_log = |k: &ViolationKind| matches!(k, ViolationKind::LogEntry { .. });
    let is_pending = |k: &ViolationKind| matches!(k, ViolationKind::Pending { .. });
    assert_eq!(keys_of(&report, is_record), ["ap/x", "users/us/1"]);
    assert_eq!(keys_of(&report, is_log), ["users/us/1", "ap/x"]);
    assert_eq!(keys_of(&report, is_pending), ["ap/x", "users/us/1"]);
    let first = &report.violations[0];
    assert_eq!(first.home_region.as_deref(), Some("ap-south"));
    assert_eq!(first.rule.as_deref(), Some("ap-only"));
    assert_eq!(first.what, ViolationKind::Record { deleted: true });
    assert!(report.violations.contains(&Violation {
        key: "users/us/1".into(),
        home_region: Some("us-east".into()),
        rule: Some("us-users".into()),
        what: ViolationKind::LogEntry {
            origin: "n1".into(),
            hlc: 1
        },
    }));
    assert_eq!(
        report.total,
        KindCounts {
            records: 2,
            log_entries: 2,
            pending: 2
        }
    );
    // Rules that exclude eu-west, in policy order, zero counts included.
    let names: Vec<(&str, u64)> = report
        .rules
        .iter()
        .map(|r| (r.rule.as_str(), r.counts.total()))
        .collect();
    assert_eq!(names, [("us-users", 3), ("ap-only", 3)]);
    assert!(!report.truncated);
    assert!(!report.is_clean());

    // ap-south may hold eu-users (replica) and ap-only; users/us/1 is still foreign.
    let ap = scan(&store, &pinned(), "ap-south").expect("scan");
    assert_eq!(ap.total.total(), 3);
    assert!(ap.violations.iter().all(|v| v.key == "users/us/1"));
    // Without rules, nothing is a violation, and the counts come from the tables.
    let global = scan(&store, &Policy::global(), "eu-west").expect("scan");
    assert!(global.is_clean());
    assert!(global.rules.is_empty());
    assert_eq!(global.scanned.records, 4);
}

#[test]
fn listing_is_bounded_but_everything_is_counted() {
    let keys: Vec<String> = (0..30).map(|i| format!("users/us/{i:02}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (_dir, store) = store_with(&refs);
    let report = scan_db(&*store.db().unwrap(), "n1", &pinned(), "eu-west", 10).expect("scan");
    assert_eq!(report.violations.len(), 10);
    assert_eq!(report.total.total(), 90);
    assert!(report.truncated);
}

#[test]
fn purge_removes_exactly_the_violations_in_bounded_transactions() {
    let mut keys: Vec<String> = (0..25).map(|i| format!("users/us/{i:02}")).collect();
    keys.extend(["users/eu/1", "other/1", "ap/1"].map(String::from));
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (_dir, store) = store_with(&refs);
    // Frontier entries: the excluded class goes, the others stay.
    let fe = |class: &str| FrontierEntry {
        origin: "n2".into(),
        class: class.into(),
        hlc: 5,
    };
    store
        .commit_batch(&[], &[fe("us-users"), fe(""), fe("eu-users")])
        .expect("frontier");

    let report = purge_db(&store.db().unwrap(), "n1", &pinned(), "eu-west", 7).expect("purge");
    assert_eq!(
        report.total,
        KindCounts {
            records: 26,
            log_entries: 26,
            pending: 26
        }
    );
    let per_rule: Vec<(&str, KindCounts)> = report
        .rules
        .iter()
        .map(|r| (r.rule.as_str(), r.counts))
        .collect();
    assert_eq!(per_rule[0].0, "us-users");
    assert_eq!(per_rule[0].1.records, 25);
    assert_eq!(per_rule[1].0, "ap-only");
    assert_eq!(per_rule[1].1.pending, 1);
    assert_eq!(report.frontier_entries, 1);
    // 26 rows per table in batches of 7: 4 transactions each, plus the frontier.
    assert_eq!(report.transactions, 4 * 3 + 1);
    let text = report.to_string();
    assert!(text.contains("removed 26 records, 26 log entries, 26 kept-aside changes"));
    assert!(text.contains("rule \"us-users\" (keys \"users/us/*\", home us-east)"));

    let after = scan(&store, &pinned(), "eu-west").expect("scan");
    assert!(after.is_clean(), "{after:#?}");
    assert_eq!(
        after.scanned,
        KindCounts {
            records: 2,
            log_entries: 2,
            pending: 2
        }
    );
    assert!(store.record("users/eu/1").expect("read").is_some());
    assert!(store.record("other/1").expect("read").is_some());
    assert!(store.record("users/us/03").expect("read").is_none());
    assert!(store.pending_for("users/us/03").expect("read").is_empty());
    assert_eq!(store.pending_for("other/1").expect("read").len(), 1);
    let frontier = store.frontier().expect("frontier");
    assert_eq!(frontier.get("n2", "us-users"), 0);
    assert_eq!(frontier.get("n2", ""), 5);
    assert_eq!(frontier.get("n2", "eu-users"), 5);
    let log: Vec<String> = store
        .log_after("n1", 0, 100)
        .expect("log")
        .into_iter()
        .map(|(_, e)| e.key)
        .collect();
    assert_eq!(log, ["users/eu/1", "other/1"]);

    // A second purge finds nothing and commits nothing.
    let again = purge(&store, &pinned(), "eu-west").expect("purge");
    assert_eq!(again.total.total(), 0);
    assert_eq!(again.transactions, 0);
    assert!(again.to_string().contains("nothing to remove"));
}

#[test]
fn start_is_refused_naming_rules_and_counts_unless_purging() {
    let (dir, store) = store_with(&["users/us/1", "users/eu/1", "other/1"]);
    let err = check_at_start(&store, &pinned(), "eu-west", false).expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("refusing to start node n1"), "{text}");
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(
        text.contains(
            "rule \"us-users\" (keys \"users/us/*\", home us-east): 1 record, 1 log entry, \
             1 kept-aside change"
        ),
        "{text}"
    );
    assert!(
        !text.contains("ap-only"),
        "rules without violations are left out: {text}"
    );
    assert!(text.contains("--purge-disallowed"), "{text}");
    assert!(text.contains("meridian residency audit"), "{text}");
    // Nothing was removed by the refusal.
    assert!(store.record("users/us/1").expect("read").is_some());
    // A region that may hold everything here, and a policy without rules, start.
    let us_only = policy(vec![rule("us-users", "users/us/*", "us-east", &[])]);
    assert!(matches!(
        check_at_start(&store, &us_only, "us-east", false),
        Ok(None)
    ));
    assert!(check_at_start(&store, &pinned(), "us-east", false).is_err());
    assert!(matches!(
        check_at_start(&store, &Policy::global(), "eu-west", false),
        Ok(None)
    ));

    let report = check_at_start(&store, &pinned(), "eu-west", true)
        .expect("purged")
        .expect("a report");
    assert_eq!(report.total.total(), 3);
    assert!(store.record("users/us/1").expect("read").is_none());
    assert!(matches!(
        check_at_start(&store, &pinned(), "eu-west", false),
        Ok(None)
    ));
}

/// Nodes n1 (eu-west) and n2 (us-east), `users/us/*` pinned to us-east.
fn topology(dir: &Path) -> Topology {
    let text = testing::topology_text("t", "ca.pem", &[("n1", "eu-west"), ("n2", "us-east")])
        .residency(&Residency::new("us-users", "users/us/*", "us-east"));
    testing::parse(&text, dir)
}

#[test]
fn audit_dir_reads_offline_and_refuses_a_directory_in_use() {
    let (dir, store) = store_with(&["users/us/1", "users/eu/1"]);
    let topo = topology(dir.path());
    let err = audit_dir(dir.path(), &topo, None).expect_err("in use");
    assert!(matches!(err, AuditError::InUse(_)), "{err}");
    assert!(
        err.to_string().contains("in use by a running node"),
        "{err}"
    );
    drop(store);

    let report = audit_dir(dir.path(), &topo, None).expect("audit");
    assert_eq!(report.node, "n1");
    assert_eq!(report.region, "eu-west");
    assert_eq!(report.total.total(), 3);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["violations"][0]["kind"], "record");
    assert_eq!(json["violations"][0]["key"], "users/us/1");
    assert_eq!(json["violations"][1]["kind"], "log_entry");
    assert_eq!(json["violations"][1]["origin"], "n1");
    assert_eq!(json["violations"][1]["hlc"], "0000000000000001");
    assert_eq!(json["rules"][0]["rule"], "us-users");
    assert_eq!(json["rules"][0]["records"], 1);

    assert!(audit_dir(dir.path(), &topo, Some("n1")).is_ok());
    let err = audit_dir(dir.path(), &topo, Some("n2")).expect_err("wrong node");
    assert!(
        err.to_string()
            .contains("belongs to node \"n1\", not \"n2\""),
        "{err}"
    );
    assert!(err.is_invalid_input());

    // The same directory under a topology without its node.
    let other = testing::parse(
        &testing::topology_text("t", "ca.pem", &[("m1", "eu-west")]),
        dir.path(),
    );
    let err = audit_dir(dir.path(), &other, None).expect_err("unknown node");
    assert!(
        err.to_string().contains(
            "belongs to node \"n1\", which the topology does not declare (declared nodes: m1)"
        ),
        "{err}"
    );

    let missing = dir.path().join("nope");
    let err = audit_dir(&missing, &topo, None).expect_err("missing");
    assert!(matches!(err, AuditError::MissingDir(_)));
    let empty = tempfile::tempdir().expect("tempdir");
    let err = audit_dir(empty.path(), &topo, None).expect_err("no db");
    assert!(
        err.to_string().contains("not a Meridian data directory"),
        "{err}"
    );
}

#[test]
fn log_entry_keys_are_read_with_bounds_checks() {
    let entry = crate::store::StoredChange {
        key: "users/é".into(),
        change: vec![1, 2, 3],
    };
    let bytes = entry.encode();
    assert_eq!(log_entry_key(&bytes), Ok("users/é"));
    for cut in 0..2 + "users/é".len() {
        assert!(log_entry_key(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    assert!(log_entry_key(&[0, 1, 0xff]).is_err());
}
