//! Machine facts, the plain-text table, and the JSON file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Context, Result};
use crate::setup::{SetupInfo, command_stdout};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: Option<String>,
    pub os: &'static str,
    pub arch: &'static str,
    pub git_commit: Option<String>,
    /// "release" or "debug": how this bench binary was built.
    pub bench_build: &'static str,
    pub command_line: Vec<String>,
    /// 1/5/15-minute load averages when the scenario started: other work on the machine
    /// skews the figures.
    pub loadavg_at_start: Option<String>,
    /// RFC 3339, UTC.
    pub timestamp: String,
}

impl Machine {
    pub fn collect() -> Machine {
        let git_commit = command_stdout(Command::new("git").args(["rev-parse", "--short", "HEAD"]))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .map(|mut c| {
                let dirty = command_stdout(Command::new("git").args([
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                ]))
                .is_some_and(|s| !s.trim().is_empty());
                if dirty {
                    c.push_str("-dirty");
                }
                c
            });
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: command_stdout(Command::new("uname").arg("-r"))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            git_commit,
            bench_build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            command_line: std::env::args().collect(),
            loadavg_at_start: std::fs::read_to_string("/proc/loadavg").ok().map(|s| {
                // The 1, 5 and 15 minute averages; not the run queue and last pid.
                s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
            }),
            timestamp: rfc3339_now(),
        }
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

fn rfc3339(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The context lines printed above a two-node scenario's table.
pub fn pair_header(scenario: &str, m: &Machine, s: &SetupInfo) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let _ = writeln!(text, "meridian-bench {scenario}  ({})", m.timestamp);
    let _ = writeln!(
        text,
        "machine:  {} core(s), kernel {}, {}/{}, commit {}",
        m.nproc,
        m.kernel.as_deref().unwrap_or("?"),
        m.os,
        m.arch,
        m.git_commit.as_deref().unwrap_or("?")
    );
    if let Some(c) = &s.cluster {
        let nodes: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("{} ({}) at {}", n.id, n.region, n.api_url))
            .collect();
        let _ = writeln!(
            text,
            "nodes:    {}{}",
            nodes.join(", "),
            s.meridian_bin
                .as_ref()
                .map(|b| format!(" ({})", b.display()))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        text,
        "data dir: {}{}",
        s.data_dir.display(),
        if s.data_dir_kept {
            ""
        } else {
            " (temporary, removed after the run)"
        }
    );
    let _ = writeln!(text, "disk:     {}", s.data_disk.describe());
    let _ = writeln!(
        text,
        "cores:    both nodes and the bench client share these {} core(s); load average at start {}",
        m.nproc,
        m.loadavg_at_start.as_deref().unwrap_or("?")
    );
    text.push('\n');
    text
}

/// One line of the result table.
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub value: String,
    pub target: String,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, value: String, target: String) -> Row {
        Row {
            scenario: scenario.to_string(),
            metric: metric.to_string(),
            value,
            target,
        }
    }
}

pub fn render_table(rows: &[Row]) -> String {
    let header = Row::new("scenario", "metric", "value".into(), "target".into());
    let all: Vec<&Row> = std::iter::once(&header).chain(rows.iter()).collect();
    let width = |f: fn(&Row) -> &str| all.iter().map(|r| f(r).chars().count()).max().unwrap_or(0);
    let w = [
        width(|r| &r.scenario),
        width(|r| &r.metric),
        width(|r| &r.value),
        width(|r| &r.target),
    ];
    let line = |r: &Row| {
        let cells = [&r.scenario, &r.metric, &r.value, &r.target];
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str(" | ");
            }
            s.push_str(cell);
            if i < 3 {
                let pad = w[i].saturating_sub(cell.chars().count());
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(&header);
    out.push('\n');
    let rule_len = w.iter().sum::<usize>() + 9;
    out.extend(std::iter::repeat_n('-', rule_len));
    for r in rows {
        out.push('\n');
        out.push_str(&line(r));
    }
    out.push('\n');
    out
}

/// `12345.6` → `"12,346"`.
pub fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn write_json(out_dir: &Path, name: &str, value: &impl Serialize) -> Result<PathBuf> {
    let path = out_dir.join(name);
    let text = serde_json::to_string_pretty(value).context("serialising the results")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// How a scenario ends once its report is printed: `Ok`, or an error that counts the failures
/// (each already printed as `FAILED: …`), so that the exit status is non-zero.
pub fn scenario_result(scenario: &str, failures: &[String]) -> crate::error::Result<()> {
    if failures.is_empty() {
        Ok(())
    } else {
        Err(crate::error::Error::runtime(format!(
            "the {scenario} benchmark had {} failure(s); see above",
            failures.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_with_failures_ends_in_an_error_that_counts_them() {
        assert!(scenario_result("lag", &[]).is_ok());
        let e = scenario_result("lag", &["a".into(), "b".into()]).expect_err("failures");
        assert!(
            e.to_string().contains("the lag benchmark had 2 failure(s)"),
            "{e}"
        );
        assert_ne!(e.exit_code(), 0);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(10_000.0), "10,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn table_aligns() {
        let t = render_table(&[Row::new("a", "µs", "1".into(), "≤ 2".into())]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[2].starts_with("a        | µs     | 1     | ≤ 2"));
    }
}
