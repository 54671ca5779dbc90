//! CPU time of this process and of the node, from /proc (Linux only; None elsewhere).

use std::process::Command;
use std::sync::OnceLock;

use crate::setup::command_stdout;

/// User + system CPU seconds used so far by a process (`None` = this process).
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        command_stdout(Command::new("getconf").arg("CLK_TCK"))
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU use between two readings, in cores (CPU seconds per wall second).
pub struct CpuMeter {
    pid: Option<u32>,
    start: Option<f64>,
    at: std::time::Instant,
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            pid,
            start: cpu_secs(pid),
            at: std::time::Instant::now(),
        }
    }

    pub fn cores(&self) -> Option<f64> {
        let used = cpu_secs(self.pid)? - self.start?;
        let wall = self.at.elapsed().as_secs_f64();
        (wall > 0.0).then(|| (used / wall * 100.0).round() / 100.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_cpu_time() {
        if cfg!(target_os = "linux") {
            assert!(super::cpu_secs(None).is_some_and(|s| s >= 0.0));
        }
    }
}
