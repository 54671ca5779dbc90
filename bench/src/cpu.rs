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

/// Per thread of a process: (thread id, thread name, user + system CPU seconds so far).
pub fn thread_cpu_secs(pid: u32) -> Vec<(u32, String, f64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
            out.push((tid, name, (u + s) as f64 / clock_ticks()));
        }
    }
    out
}

/// The busiest threads of a process between two readings.
pub struct ThreadMeter {
    pid: u32,
    start: Vec<(u32, String, f64)>,
    at: std::time::Instant,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ThreadUse {
    pub thread: String,
    pub tid: u32,
    /// CPU seconds per wall second over the interval.
    pub cores: f64,
}

impl ThreadMeter {
    pub fn start(pid: u32) -> ThreadMeter {
        ThreadMeter {
            pid,
            start: thread_cpu_secs(pid),
            at: std::time::Instant::now(),
        }
    }

    /// The `n` threads that used the most CPU since `start` (threads that ended in between
    /// are missing; threads born in between count from zero).
    pub fn top(&self, n: usize) -> Vec<ThreadUse> {
        let wall = self.at.elapsed().as_secs_f64();
        if wall <= 0.0 {
            return Vec::new();
        }
        let mut used: Vec<ThreadUse> = thread_cpu_secs(self.pid)
            .into_iter()
            .map(|(tid, name, secs)| {
                let before = self
                    .start
                    .iter()
                    .find(|(t, _, _)| *t == tid)
                    .map_or(0.0, |s| s.2);
                ThreadUse {
                    thread: name,
                    tid,
                    cores: ((secs - before) / wall * 100.0).round() / 100.0,
                }
            })
            .collect();
        used.sort_by(|a, b| b.cores.total_cmp(&a.cores));
        used.truncate(n);
        used
    }
}

/// Summed over a process's threads, from `/proc/<pid>/task/*/schedstat`: seconds spent
/// running and seconds spent runnable but waiting for a CPU.
pub fn sched_secs(pid: u32) -> Option<(f64, f64)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let (mut run, mut wait) = (0u64, 0u64);
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        if let (Some(Some(r)), Some(Some(w))) = (fields.next(), fields.next()) {
            run += r;
            wait += w;
        }
    }
    Some((run as f64 / 1e9, wait as f64 / 1e9))
}

/// How long a process's threads waited for a CPU while runnable, per wall second: above
/// zero means other work on the machine held it back (threads that ended in between are
/// not counted).
pub struct WaitMeter {
    pid: u32,
    start: Option<(f64, f64)>,
    at: std::time::Instant,
}

impl WaitMeter {
    pub fn start(pid: u32) -> WaitMeter {
        WaitMeter {
            pid,
            start: sched_secs(pid),
            at: std::time::Instant::now(),
        }
    }

    /// Runnable-but-waiting seconds per wall second (in "cores").
    pub fn waiting_cores(&self) -> Option<f64> {
        let (_, w0) = self.start?;
        let (_, w1) = sched_secs(self.pid)?;
        let wall = self.at.elapsed().as_secs_f64();
        (wall > 0.0).then(|| ((w1 - w0).max(0.0) / wall * 100.0).round() / 100.0)
    }
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
            let me = std::process::id();
            assert!(!super::thread_cpu_secs(me).is_empty());
            assert!(super::sched_secs(me).is_some_and(|(r, w)| r >= 0.0 && w >= 0.0));
        }
    }
}
