//! The checkers: what must hold of a run's history and of the nodes' final state.
//!
//! - convergence: every node holds the same global records, and every acknowledged write;
//! - counters: each lies between its acknowledged and its possibly-applied increments;
//! - hot keys: a process's last acknowledged PATCH of its own field survives;
//! - versions: one node's versions grow for writes that did not overlap;
//! - availability: local writes succeed while their own node is up.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};

use super::history::{Kind, Op, Outcome};
use super::{COUNTERS, HOME_REGION, PINNED_PREFIX};

/// Local write availability below this is a violation.
const AVAILABILITY_MIN: f64 = 0.99;

/// Violations beyond this many are counted and kept, not printed.
const PRINTED_VIOLATIONS_MAX: usize = 200;

#[derive(Default)]
pub(super) struct Report {
    pub(super) violations: Vec<String>,
}

impl Report {
    pub(super) fn violation(&mut self, text: String) {
        if self.violations.len() < PRINTED_VIOLATIONS_MAX {
            eprintln!("VIOLATION: {text}");
        }
        self.violations.push(text);
    }
}

/// Does the snapshot of every allowed region agree, and hold every acknowledged write?
/// Returns the list of problems (empty when converged).
pub(super) fn convergence_problems(
    snaps: &[BTreeMap<String, Value>],
    history: &[Op],
) -> Vec<String> {
    let mut problems = Vec::new();
    let n = snaps.len();
    // Global records: identical on every node.
    let global = |k: &str| !k.starts_with(PINNED_PREFIX);
    let keys: BTreeSet<&String> = snaps
        .iter()
        .flat_map(|s| s.keys())
        .filter(|k| global(k))
        .collect();
    for k in keys {
        let first = snaps[0].get(k);
        for (i, s) in snaps.iter().enumerate().skip(1) {
            if s.get(k) != first {
                problems.push(format!(
                    "{k}: node 0 has {}, node {i} has {}",
                    first.map_or("nothing".into(), Value::to_string),
                    s.get(k).map_or("nothing".into(), Value::to_string)
                ));
            }
        }
    }
    // Acknowledged writes of unique keys are present with their value.
    for op in history.iter().filter(|o| o.outcome == Outcome::Ok) {
        let holders: Vec<usize> = match op.kind {
            Kind::Put => (0..n).collect(),
            Kind::PinnedPut => vec![HOME_REGION],
            _ => continue,
        };
        for i in holders {
            let v = snaps[i]
                .get(&op.key)
                .and_then(|r| r.get("value"))
                .and_then(|v| v.get("v"))
                .and_then(Value::as_i64);
            if v != Some(op.value) {
                problems.push(format!(
                    "acknowledged {} {} (v={}) missing on node {i} (found {v:?})",
                    op.kind.name(),
                    op.key,
                    op.value
                ));
            }
        }
    }
    problems
}

pub(super) fn check_counters(
    snap: &BTreeMap<String, Value>,
    history: &[Op],
    report: &mut Report,
) -> Value {
    let mut out = serde_json::Map::new();
    for c in 0..COUNTERS {
        let key = format!("c/{c}");
        let ops = history
            .iter()
            .filter(|o| o.kind == Kind::Incr && o.key == key);
        let (mut ok, mut unknown) = (0i64, 0i64);
        for o in ops {
            match o.outcome {
                Outcome::Ok => ok += 1,
                Outcome::Unknown => unknown += 1,
                Outcome::Fail => {}
            }
        }
        let got = snap
            .get(&key)
            .and_then(|r| r.get("value"))
            .and_then(|v| v.get("n"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if got < ok || got > ok + unknown {
            report.violation(format!(
                "counter {key} = {got}, expected within [{ok}, {}]",
                ok + unknown
            ));
        }
        out.insert(key, json!({"value": got, "acked": ok, "unknown": unknown}));
    }
    Value::Object(out)
}

/// The last acknowledged PATCH of each process to each hot key must be the final value of the
/// field that only that process writes, unless a later unacknowledged PATCH may have applied.
pub(super) fn check_hot_keys(snap: &BTreeMap<String, Value>, history: &[Op], report: &mut Report) {
    let mut by: HashMap<(usize, &str), Vec<&Op>> = HashMap::new();
    for o in history.iter().filter(|o| o.kind == Kind::Patch) {
        by.entry((o.process, o.key.as_str())).or_default().push(o);
    }
    for ((p, key), mut ops) in by {
        ops.sort_by_key(|o| o.invoke_ms);
        let Some(last_ok) = ops.iter().rposition(|o| o.outcome == Outcome::Ok) else {
            continue;
        };
        let allowed: BTreeSet<i64> = ops[last_ok..]
            .iter()
            .filter(|o| o.outcome != Outcome::Fail)
            .map(|o| o.value)
            .collect();
        let got = snap
            .get(key)
            .and_then(|r| r.get("value"))
            .and_then(|v| v.get(format!("f{p}")))
            .and_then(Value::as_i64);
        if !got.is_some_and(|g| allowed.contains(&g)) {
            report.violation(format!(
                "hot key {key} field f{p} = {got:?}, the last acknowledged PATCH wrote {} (allowed {allowed:?})",
                ops[last_ok].value
            ));
        }
    }
}

/// The node part of the versions node `node_id` stamps (`{time}-{node}`).
pub(super) fn version_node_part(node_id: &str) -> String {
    format!("{:016x}", meridian_node::clock::hlc_id_of(node_id))
}

/// Versions issued by one node strictly increase: a write acknowledged before another write to
/// the same node was invoked has a smaller version.
///
/// A write's answer carries the record's version, the greatest of its changes: when the serving
/// node's clock is behind a change it already holds from another node (a skew beyond the max
/// drift), that is the other node's version, not this write's stamp. Only answers stamped by the
/// node that served them (`served_node_part(op)`) say something about that node's clock.
pub(super) fn check_versions(
    history: &[Op],
    served_node_part: &dyn Fn(&Op) -> Option<String>,
    report: &mut Report,
) -> usize {
    let mut per: HashMap<&str, Vec<&Op>> = HashMap::new();
    for o in history.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let Some(v) = &o.version
            && let Some((_, node)) = v.split_once('-')
            && served_node_part(o).as_deref() == Some(node)
        {
            per.entry(node).or_default().push(o);
        }
    }
    let mut checked = 0;
    for (node, mut ops) in per {
        let mut by_complete = ops.clone();
        by_complete.sort_by_key(|o| o.complete_ms);
        ops.sort_by_key(|o| o.invoke_ms);
        let mut j = 0;
        let mut max_before: Option<&Op> = None;
        for b in ops {
            while j < by_complete.len() && by_complete[j].complete_ms < b.invoke_ms {
                let a = by_complete[j];
                if max_before.is_none_or(|m| a.version > m.version) {
                    max_before = Some(a);
                }
                j += 1;
            }
            checked += 1;
            if let Some(a) = max_before
                && a.version >= b.version
            {
                report.violation(format!(
                    "node {node}: {} {} acknowledged at {} ms with version {:?}, but {} {} invoked at {} ms later got {:?}",
                    a.kind.name(), a.key, a.complete_ms, a.version, b.kind.name(), b.key, b.invoke_ms, b.version
                ));
            }
        }
    }
    checked
}

/// Acknowledged writes missing or wrong in the final snapshots (all of them when there are
/// no complete snapshots).
pub(super) fn lost_writes(
    snaps: &[BTreeMap<String, Value>],
    nodes: usize,
    history: &[Op],
) -> usize {
    if snaps.len() == nodes {
        convergence_problems(snaps, history)
            .iter()
            .filter(|p| p.starts_with("acknowledged"))
            .count()
    } else {
        history.iter().filter(|o| o.outcome == Outcome::Ok).count()
    }
}

/// Pinned records seen live outside eu-west.
pub(super) fn check_pinned_stay_home(
    snaps: &[BTreeMap<String, Value>],
    regions: &[String],
    report: &mut Report,
) {
    for (i, s) in snaps.iter().enumerate() {
        if i != HOME_REGION {
            let stray = s.keys().filter(|k| k.starts_with(PINNED_PREFIX)).count();
            if stray > 0 {
                report.violation(format!(
                    "{} lists {stray} records pinned to eu-west",
                    regions[i]
                ));
            }
        }
    }
}

/// The share of local writes that succeeded, over all of them and over those invoked during
/// a fault; writes to a node that was killed or paused do not count.
pub(super) struct Availability {
    pub(super) all: f64,
    pub(super) during_faults: f64,
    pub(super) local_writes: usize,
    pub(super) local_writes_during_faults: usize,
}

pub(super) fn check_availability(
    history: &[Op],
    regions: &[String],
    report: &mut Report,
) -> Availability {
    let local: Vec<&Op> = history
        .iter()
        .filter(|o| o.is_local() && !o.node_impaired)
        .collect();
    let share = |ops: &[&Op]| {
        if ops.is_empty() {
            1.0
        } else {
            ops.iter().filter(|o| o.outcome == Outcome::Ok).count() as f64 / ops.len() as f64
        }
    };
    let availability = share(&local);
    let during: Vec<&Op> = local
        .iter()
        .copied()
        .filter(|o| o.nemesis != "none")
        .collect();
    let availability_faults = share(&during);
    if availability < AVAILABILITY_MIN {
        report.violation(format!(
            "local write availability {:.2}% < 99%",
            availability * 100.0
        ));
    }
    for o in local.iter().filter(|o| o.outcome != Outcome::Ok).take(5) {
        println!("  unavailable local write: {}", o.to_json(regions));
    }
    Availability {
        all: availability,
        during_faults: availability_faults,
        local_writes: local.len(),
        local_writes_during_faults: during.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        process: usize,
        kind: Kind,
        key: &str,
        value: i64,
        t: (u64, u64),
        outcome: Outcome,
    ) -> Op {
        Op {
            process,
            kind,
            key: key.to_string(),
            value,
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome,
            status: None,
            version: None,
            served_by_region: None,
            nemesis: "none",
            node_impaired: false,
            error: None,
            attempts: 1,
        }
    }

    #[test]
    fn versions_must_grow_per_node_for_non_overlapping_writes() {
        let mut a = op(0, Kind::Put, "u/0/1", 1, (0, 10), Outcome::Ok);
        a.version = Some("0000000000000005-aa".into());
        let mut b = op(0, Kind::Put, "u/0/2", 2, (20, 30), Outcome::Ok);
        b.version = Some("0000000000000004-aa".into());
        let mut report = Report::default();
        check_versions(&[a.clone(), b.clone()], &|_| Some("aa".into()), &mut report);
        assert_eq!(report.violations.len(), 1);
        // Overlapping operations may finish in any order.
        b.invoke_ms = 5;
        let mut report = Report::default();
        check_versions(&[a.clone(), b.clone()], &|_| Some("aa".into()), &mut report);
        assert!(report.violations.is_empty());
        // An answer carrying another node's version (the record's, not this write's stamp) is
        // not evidence about the serving node's clock.
        b.invoke_ms = 20;
        let mut report = Report::default();
        let other = |o: &Op| Some(if o.key == "u/0/2" { "bb" } else { "aa" }.to_string());
        check_versions(&[a, b], &other, &mut report);
        assert!(report.violations.is_empty());
    }

    #[test]
    fn counters_must_lie_between_acked_and_acked_plus_unknown() {
        let h = vec![
            op(0, Kind::Incr, "c/0", 1, (0, 1), Outcome::Ok),
            op(1, Kind::Incr, "c/0", 1, (0, 1), Outcome::Unknown),
            op(1, Kind::Incr, "c/0", 1, (0, 1), Outcome::Fail),
        ];
        for (got, bad) in [(0, true), (1, false), (2, false), (3, true)] {
            let snap = BTreeMap::from([("c/0".to_string(), json!({"value": {"n": got}}))]);
            let mut report = Report::default();
            check_counters(&snap, &h, &mut report);
            assert_eq!(!report.violations.is_empty(), bad, "counter value {got}");
        }
    }

    #[test]
    fn lost_and_diverging_records_are_problems() {
        let h = vec![op(0, Kind::Put, "u/0/1", 1, (0, 1), Outcome::Ok)];
        let rec = json!({"value": {"v": 1}, "version": "x", "conflicts": null});
        let full = BTreeMap::from([("u/0/1".to_string(), rec)]);
        assert!(convergence_problems(&[full.clone(), full.clone()], &h).is_empty());
        let problems = convergence_problems(&[full, BTreeMap::new()], &h);
        assert!(problems.iter().any(|p| p.starts_with("acknowledged")));
        assert!(problems.iter().any(|p| p.starts_with("u/0/1: node 0")));
    }
}
