//! What a run leaves behind: `history.jsonl` (one operation a line), `summary.json`, and the
//! table printed at the end.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::checkers::Availability;
use super::history::{Op, Outcome};

/// What the checks found, besides the violations.
pub(super) struct Findings {
    pub(super) converged_after: Option<Duration>,
    pub(super) lost: usize,
    pub(super) counters: Value,
    pub(super) versions_checked: usize,
    pub(super) availability: Availability,
    pub(super) audits: Vec<Value>,
    pub(super) panics: usize,
}

/// The run as a whole, for the summary.
pub(super) struct Run<'a> {
    pub(super) seed: u64,
    pub(super) regions: &'a [String],
    pub(super) duration_secs: u64,
    pub(super) history: &'a [Op],
    /// Every fault applied, by name, in order.
    pub(super) applied: &'a [&'static str],
    pub(super) nemesis_log: &'a [String],
    pub(super) violations: &'a [String],
}

/// How many operations had each outcome, and how many `unknown` answers were retried.
struct Counts {
    ok: usize,
    fail: usize,
    unknown: usize,
    retried: usize,
    retried_ok: usize,
}

impl Counts {
    fn of(history: &[Op]) -> Counts {
        let count = |o: Outcome| history.iter().filter(|x| x.outcome == o).count();
        Counts {
            ok: count(Outcome::Ok),
            fail: count(Outcome::Fail),
            unknown: count(Outcome::Unknown),
            retried: history.iter().filter(|o| o.attempts > 1).count(),
            retried_ok: history
                .iter()
                .filter(|o| o.attempts > 1 && o.outcome == Outcome::Ok)
                .count(),
        }
    }
}

/// Writes `history.jsonl` and `summary.json` into `out` and prints the table. Files that
/// cannot be written are skipped: the printed table and exit status still report the run.
pub(super) fn publish(run: &Run, findings: &Findings, out: &Path) {
    let counts = Counts::of(run.history);
    write_history(run, out);
    let summary = summary_json(run, findings, &counts);
    let _ = std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap_or_default(),
    );
    print_table(run, findings, &counts);
}

fn write_history(run: &Run, out: &Path) {
    if let Ok(f) = std::fs::File::create(out.join("history.jsonl")) {
        let mut w = std::io::BufWriter::new(f);
        for o in run.history {
            let _ = writeln!(w, "{}", o.to_json(run.regions));
        }
    }
}

fn summary_json(run: &Run, findings: &Findings, counts: &Counts) -> Value {
    json!({
        "seed": run.seed,
        "regions": run.regions,
        "duration_secs": run.duration_secs,
        "operations": run.history.len(),
        "ok": counts.ok,
        "fail": counts.fail,
        "unknown": counts.unknown,
        "lost": findings.lost,
        "retried": counts.retried,
        "retried_resolved": counts.retried_ok,
        "convergence_ms": findings.converged_after.map(|d| d.as_millis() as u64),
        "availability_local": findings.availability.all,
        "availability_local_during_faults": findings.availability.during_faults,
        "local_writes": findings.availability.local_writes,
        "local_writes_during_faults": findings.availability.local_writes_during_faults,
        "versions_checked": findings.versions_checked,
        "counters": findings.counters,
        "residency_audits": findings.audits,
        "panics": findings.panics,
        "faults": fault_counts(run.applied),
        "nemesis_log": run.nemesis_log,
        "violations": run.violations,
    })
}

fn print_table(run: &Run, findings: &Findings, counts: &Counts) {
    let availability = &findings.availability;
    let row = |k: &str, v: String| println!("| {k:<36} | {v:>22} |");
    println!("\n+--------------------------------------+------------------------+");
    row("seed", run.seed.to_string());
    row(
        "operations (ok / fail / unknown)",
        format!(
            "{} ({}/{}/{})",
            run.history.len(),
            counts.ok,
            counts.fail,
            counts.unknown
        ),
    );
    row("faults (partitions/kill/pause/skew)", {
        let c = fault_counts(run.applied);
        format!(
            "{}/{}/{}/{}",
            c["partitions"], c["kill-restart"], c["pause"], c["skew"]
        )
    });
    row(
        "unknown answers retried (settled ok)",
        format!("{} ({})", counts.retried, counts.retried_ok),
    );
    row("acknowledged writes lost", findings.lost.to_string());
    row(
        "convergence after final heal",
        findings
            .converged_after
            .map_or("NOT CONVERGED".into(), |d| format!("{} ms", d.as_millis())),
    );
    row(
        "local availability (all)",
        format!(
            "{:.2}% of {}",
            availability.all * 100.0,
            availability.local_writes
        ),
    );
    row(
        "local availability (during faults)",
        format!(
            "{:.2}% of {}",
            availability.during_faults * 100.0,
            availability.local_writes_during_faults
        ),
    );
    row(
        "acked writes version-checked",
        findings.versions_checked.to_string(),
    );
    row(
        "residency audits clean",
        format!(
            "{}/{}",
            findings
                .audits
                .iter()
                .filter(|a| a["clean"] == true)
                .count(),
            run.regions.len()
        ),
    );
    row("panics in node logs", findings.panics.to_string());
    row("violations", run.violations.len().to_string());
    println!("+--------------------------------------+------------------------+");
}

/// How many faults of each family ran (partitions count every kind of link cut).
fn fault_counts(applied: &[&str]) -> Value {
    let count = |f: &dyn Fn(&str) -> bool| applied.iter().filter(|a| f(a)).count();
    json!({
        "partitions": count(&|a| matches!(a, "isolate" | "halves" | "bridge" | "one-way" | "flapping")),
        "latency-loss": count(&|a| a == "latency-loss"),
        "kill-restart": count(&|a| a == "kill-restart"),
        "pause": count(&|a| a == "pause"),
        "skew": count(&|a| a.starts_with("skew")),
        "skew-beyond-drift": count(&|a| a == "skew-beyond"),
        "disk-full": count(&|a| a == "disk-full"),
        "damage-record": count(&|a| a == "damage-record"),
        "all": applied,
    })
}
