//! What the offline commands print: the residency audit as text and the dump as a table.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::Topology;
use crate::store::DumpRow;
use crate::store::audit::AuditReport;

/// `meridian dump` without `--json`: a header line, then one row per record.
pub fn dump_table(node_id: &str, rows: &[DumpRow]) -> String {
    let key_width = rows.iter().map(|r| r.key.len()).max().unwrap_or(3).max(3);
    let mut out = String::new();
    let _ = writeln!(out, "# node {node_id}: {} records", rows.len());
    let _ = writeln!(
        out,
        "{:<key_width$}  {:<16}  {:<33}  STATE",
        "KEY", "HOME", "VERSION"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<key_width$}  {:<16}  {:<33}  {}",
            r.key,
            r.home_region.as_deref().unwrap_or("(global)"),
            r.version,
            if r.deleted { "deleted" } else { "live" }
        );
    }
    out
}

/// `meridian residency audit` without `--json`.
pub fn audit_text(
    report: &AuditReport,
    topology_path: &Path,
    data_dir: &Path,
    topology: &Topology,
) -> String {
    let rules = topology.residency.rules().len();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "data directory {} belongs to node {} in region {}; residency policy: {} ({} {})",
        data_dir.display(),
        report.node,
        report.region,
        topology_path.display(),
        rules,
        if rules == 1 { "rule" } else { "rules" }
    );
    let scanned = format!("scanned {}", report.scanned);
    if report.is_clean() {
        let _ = writeln!(
            out,
            "no record, log entry or kept-aside change outside its allowed regions ({scanned})"
        );
    } else {
        let width = report
            .violations
            .iter()
            .map(|v| v.key.chars().count())
            .max()
            .unwrap_or(3)
            .clamp(3, 64);
        let what: Vec<String> = report
            .violations
            .iter()
            .map(|v| v.what.to_string())
            .collect();
        let what_width = what.iter().map(String::len).max().unwrap_or(4).max(4);
        let rule_width = report
            .violations
            .iter()
            .map(|v| v.rule.as_deref().map_or(1, str::len))
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            out,
            "{:<width$}  {:<what_width$}  {:<rule_width$}  HOME",
            "KEY", "WHAT", "RULE"
        );
        for (v, what) in report.violations.iter().zip(&what) {
            let _ = writeln!(
                out,
                "{:<width$}  {what:<what_width$}  {:<rule_width$}  {}",
                v.key,
                v.rule.as_deref().unwrap_or("-"),
                v.home_region.as_deref().unwrap_or("-"),
            );
        }
        if report.truncated {
            let _ = writeln!(
                out,
                "(only the first {} are listed; the counts below are complete)",
                report.violations.len()
            );
        }
        let _ = writeln!(
            out,
            "{} {} held outside their allowed regions: {} ({scanned})",
            report.total.total(),
            if report.total.total() == 1 {
                "row"
            } else {
                "rows"
            },
            report.total
        );
    }
    if rules == 0 {
        let _ = writeln!(
            out,
            "the policy has no residency rules: every record is global"
        );
    } else if report.rules.is_empty() {
        let _ = writeln!(out, "every residency rule allows region {}", report.region);
    } else {
        let _ = writeln!(
            out,
            "per rule that does not allow region {}:",
            report.region
        );
        for rule in &report.rules {
            let _ = writeln!(out, "  {rule}");
        }
    }
    out
}
