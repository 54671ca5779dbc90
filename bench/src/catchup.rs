//! The `catchup` scenario: how fast a peer that comes back applies the backlog it missed.
//!
//! Two nodes; B is cut off by a partition (`--mode partition`, the default: both links down in
//! the in-process link emulator) or stopped (`--mode restart`), A takes `--backlog` writes as fast
//! as `--clients` clients can send them, then the links heal (or B starts again) and the bench
//! polls B's `meridian_replication_changes_applied_total{peer_region="bench-a"}` (relative to its
//! value at the heal) until it has grown by the number of writes.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::CommonArgs;
use crate::cluster::LogProblems;
use crate::cluster::{NODE_A, NODE_B, REGION_A};
use crate::cpu::{CpuMeter, ThreadMeter, ThreadUse, WaitMeter};
use crate::error::{Error, Result};
use crate::http::{self, make_body};
use crate::lag::{APPLIED_COUNTER, TargetResult, scan_logs};
use crate::prom;
use crate::report::{self, Machine, Row, thousands};
use crate::setup::{BenchEnv, SetupInfo};
use crate::stats::{LatencyMs, MAX_ERRORS_PER_CLIENT, micros, new_histogram};

/// Target: changes applied per second while catching up.
const CATCHUP_TARGET: f64 = 30_000.0;
const POLL: Duration = Duration::from_millis(50);
const CURVE_EVERY: Duration = Duration::from_millis(250);
const KEEP_ERRORS: usize = 3;

#[derive(Args, Debug, Clone, Serialize)]
#[command(next_help_heading = "Catch-up scenario")]
pub struct CatchupOpts {
    /// How B misses the backlog: cut off by a partition (both links down in the link
    /// emulator, B keeps running) or stopped and started again
    #[arg(long, value_enum, default_value_t = CatchupMode::Partition)]
    pub mode: CatchupMode,

    /// Records written at A while B is cut off or down
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub backlog: u64,

    /// Concurrent clients writing the backlog
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub clients: u64,

    /// How long B may take to apply the backlog after it starts again
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline_secs: u64,

    /// Size of each written JSON object, in bytes (approximately)
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    pub value_bytes: usize,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchupMode {
    /// Both directions cut in the emulator while the backlog is written; catch-up runs from the
    /// heal (it includes the redial after the QUIC idle timeout ended the links).
    Partition,
    /// B stopped (SIGTERM) while the backlog is written; catch-up runs from its new process.
    Restart,
}

impl Default for CatchupOpts {
    fn default() -> Self {
        CatchupOpts {
            mode: CatchupMode::Partition,
            backlog: 100_000,
            clients: 64,
            deadline_secs: 600,
            value_bytes: 200,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BacklogStats {
    pub clients: u64,
    pub writes: u64,
    pub errors: u64,
    pub clients_gave_up: u64,
    pub secs: f64,
    pub writes_per_sec: f64,
    #[serde(flatten)]
    pub latency: LatencyMs,
    /// The greatest `version` A answered.
    pub newest_version: Option<String>,
    pub node_a_cpu_cores: Option<f64>,
    pub client_cpu_cores: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct CatchupStats {
    /// Changes B had to apply: the successful backlog writes.
    pub changes: u64,
    /// How stopping B went.
    pub b_stop: String,
    /// From spawning B again to its first 200 on /readyz (to the 50 ms poll).
    pub ready_secs: Option<f64>,
    /// From spawning B to its applied counter reaching `changes`.
    pub secs_from_start: Option<f64>,
    /// From B's /readyz to the same.
    pub secs_from_ready: Option<f64>,
    pub changes_per_sec_from_start: Option<f64>,
    pub changes_per_sec_from_ready: Option<f64>,
    /// From the first poll that saw a change applied to the end: the streaming rate.
    pub changes_per_sec_streaming: Option<f64>,
    pub applied_at_end: f64,
    /// B's CPU from its spawn to the end of the catch-up, in cores; and its busiest threads.
    pub node_b_cpu_cores: Option<f64>,
    pub node_b_top_threads: Vec<ThreadUse>,
    /// Time B's threads were runnable but waited for a CPU, per wall second: above zero,
    /// other processes held B back.
    pub node_b_cpu_wait_cores: Option<f64>,
    /// A's CPU over the same interval (A reads and sends the backlog).
    pub node_a_cpu_cores: Option<f64>,
    pub node_a_top_threads: Vec<ThreadUse>,
    /// Group commits over the catch-up, from each node's metrics (B: since its start).
    pub node_b_commits: Option<prom::CommitStats>,
    pub node_a_commits: Option<prom::CommitStats>,
    /// `(seconds since B's spawn, changes applied)` every 250 ms.
    pub curve: Vec<(f64, f64)>,
    /// B's /v1/status frontier for A afterwards, and whether it reached the newest version A
    /// answered.
    pub b_frontier_for_a: Option<String>,
    pub b_frontier_reached_newest: Option<bool>,
    pub b_records_stored: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct CatchupReport {
    pub scenario: &'static str,
    pub machine: Machine,
    pub setup: SetupInfo,
    pub config: CatchupOpts,
    pub backlog: Option<BacklogStats>,
    pub catchup: Option<CatchupStats>,
    pub targets: Vec<TargetResult>,
    pub node_logs: Vec<LogProblems>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.3} s"))
}

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{} changes/s", thousands(v)))
}

fn threads(t: &[ThreadUse]) -> String {
    t.iter()
        .take(3)
        .map(|t| format!("{} {:.2}", t.thread, t.cores))
        .collect::<Vec<_>>()
        .join(", ")
}

impl CatchupReport {
    pub fn table(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(b) = &self.backlog {
            let name = format!("backlog writes at A ({} clients)", b.clients);
            let name = name.as_str();
            rows.push(Row::new(
                name,
                "writes/s",
                thousands(b.writes_per_sec),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "writes",
                format!("{} in {:.2} s", b.writes, b.secs),
                String::new(),
            ));
            rows.push(Row::new(name, "errors", b.errors.to_string(), "0".into()));
            rows.push(Row::new(
                name,
                "p50 / p99",
                format!("{:.3} / {:.3} ms", b.latency.p50_ms, b.latency.p99_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "cpu (cores)",
                format!(
                    "A {}, client {}",
                    b.node_a_cpu_cores.map_or("?".into(), |c| format!("{c:.2}")),
                    b.client_cpu_cores.map_or("?".into(), |c| format!("{c:.2}"))
                ),
                String::new(),
            ));
        }
        if let Some(c) = &self.catchup {
            let name = format!("catch-up of {NODE_B}");
            let name = name.as_str();
            let status = match c.changes_per_sec_from_start {
                Some(r) if r >= CATCHUP_TARGET => "PASS",
                Some(_) => "MISS",
                None => "n/a",
            };
            rows.push(Row::new(
                name,
                "rate from heal / process start",
                rate(c.changes_per_sec_from_start),
                format!("≥ {} changes/s: {status}", thousands(CATCHUP_TARGET)),
            ));
            rows.push(Row::new(
                name,
                "rate from /readyz",
                rate(c.changes_per_sec_from_ready),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "rate while streaming",
                rate(c.changes_per_sec_streaming),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "changes",
                format!("{} (applied {})", c.changes, c.applied_at_end),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "time from heal / process start",
                secs(c.secs_from_start),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "time from /readyz",
                secs(c.secs_from_ready),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "ready after",
                secs(c.ready_secs),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "cpu B (cores)",
                c.node_b_cpu_cores
                    .map_or_else(|| "?".into(), |v| format!("{v:.2}")),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "B waiting for a cpu (cores)",
                c.node_b_cpu_wait_cores
                    .map_or_else(|| "?".into(), |v| format!("{v:.2}")),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "busiest threads B",
                threads(&c.node_b_top_threads),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "cpu A (cores)",
                c.node_a_cpu_cores
                    .map_or_else(|| "?".into(), |v| format!("{v:.2}")),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "busiest threads A",
                threads(&c.node_a_top_threads),
                String::new(),
            ));
            if let Some(b) = &c.node_b_commits {
                rows.push(Row::new(name, "commits at B", b.describe(), String::new()));
            }
            rows.push(Row::new(
                name,
                "B frontier reached A's newest",
                match c.b_frontier_reached_newest {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "?".into(),
                },
                String::new(),
            ));
        }
        rows
    }
}

struct ClientResult {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_errors: Vec<String>,
    gave_up: bool,
    newest: Option<String>,
}

async fn backlog_client(
    http: reqwest::Client,
    base: Arc<str>,
    next: Arc<AtomicU64>,
    backlog: u64,
    value_bytes: usize,
) -> ClientResult {
    let mut r = ClientResult {
        hist: new_histogram(),
        ok: 0,
        errors: 0,
        first_errors: Vec::new(),
        gave_up: false,
        newest: None,
    };
    let mut url = String::with_capacity(base.len() + 32);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= backlog {
            break;
        }
        url.clear();
        let _ = write!(url, "{base}/v1/kv/catchup/{i}");
        let sent = Instant::now();
        match http::put_version(&http, &url, make_body(i, value_bytes)).await {
            Ok(v) => {
                r.hist.saturating_record(micros(sent.elapsed()));
                r.ok += 1;
                // Versions render so that string order is version order.
                if r.newest.as_ref().is_none_or(|n| v > *n) {
                    r.newest = Some(v);
                }
            }
            Err(e) => {
                r.errors += 1;
                if r.first_errors.len() < KEEP_ERRORS {
                    r.first_errors.push(e);
                }
                if r.errors >= MAX_ERRORS_PER_CLIENT {
                    r.gave_up = true;
                    break;
                }
            }
        }
    }
    r
}

/// The first 16 hex digits of a version (its HLC time), for comparing with a frontier.
fn version_time(v: &str) -> Option<u64> {
    u64::from_str_radix(v.get(..16)?, 16).ok()
}

pub async fn run(common: &CommonArgs, opts: &CatchupOpts) -> Result<CatchupReport> {
    let machine = Machine::collect();
    if common.target.is_some() {
        return Err(Error::usage(
            "catchup starts and stops its own two nodes; it cannot run against --target",
        ));
    }
    let mut env = BenchEnv::prepare(common, "catchup")?;
    let http = http::client(opts.clients as usize + 4)?;
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    eprintln!(
        "meridian-bench: catchup: cluster dir {} on {}",
        env.data_dir.display(),
        env.disk.describe()
    );
    notes.extend(env.disk.setup_notes());
    let out_dir = std::path::absolute(&common.out)
        .map_err(|e| Error::runtime(format!("resolving {}: {e}", common.out.display())))?;

    eprintln!("meridian-bench: catchup: starting {NODE_A} and {NODE_B}");
    let partition = opts.mode == CatchupMode::Partition;
    let pair = env.start_pair_with(&http, "catchup", partition).await?;
    eprintln!(
        "meridian-bench: catchup: both nodes ready after {:.2} s, replication connected {:.2} s later",
        pair.ready_secs, pair.connect_secs
    );
    let base_a: Arc<str> = Arc::from(pair.a.api_url.as_str());
    let base_b = pair.b.api_url.clone();
    let pid_a = pair.a.pid();

    // 1. Cut B off (partition) or stop it.
    let b_stop = if partition {
        pair.set_links_down(true)?;
        "cut off: both links down in the emulator, B still running".to_string()
    } else {
        let stop_started = Instant::now();
        let (clean, b_stop) = pair.b.stop_checked();
        let b_stop = format!(
            "{b_stop} after {:.2} s",
            stop_started.elapsed().as_secs_f64()
        );
        if !clean {
            failures.push(format!("{NODE_B} {b_stop}"));
        }
        b_stop
    };
    eprintln!("meridian-bench: catchup: {NODE_B} {b_stop}");

    // 2. The backlog at A.
    eprintln!(
        "meridian-bench: catchup: writing {} records at {NODE_A} with {} clients",
        opts.backlog, opts.clients
    );
    let client_cpu = CpuMeter::start(None);
    let cpu_a = pid_a.map(|p| CpuMeter::start(Some(p)));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..opts.clients)
        .map(|_| {
            tokio::spawn(backlog_client(
                http.clone(),
                Arc::clone(&base_a),
                Arc::clone(&next),
                opts.backlog,
                opts.value_bytes,
            ))
        })
        .collect();
    let mut hist = new_histogram();
    let (mut ok, mut errors, mut gave_up) = (0u64, 0u64, 0u64);
    let mut first_errors = Vec::new();
    let mut newest: Option<String> = None;
    for t in tasks {
        match t.await {
            Ok(r) => {
                let _ = hist.add(&r.hist);
                ok += r.ok;
                errors += r.errors;
                gave_up += u64::from(r.gave_up);
                for e in r.first_errors {
                    if first_errors.len() < KEEP_ERRORS {
                        first_errors.push(e);
                    }
                }
                if let Some(v) = r.newest
                    && newest.as_ref().is_none_or(|n| v > *n)
                {
                    newest = Some(v);
                }
            }
            Err(e) => {
                errors += 1;
                first_errors.push(format!("client task failed: {e}"));
            }
        }
    }
    let write_secs = started.elapsed().as_secs_f64();
    let backlog = BacklogStats {
        clients: opts.clients,
        writes: ok,
        errors,
        clients_gave_up: gave_up,
        secs: write_secs,
        writes_per_sec: ok as f64 / write_secs.max(1e-9),
        latency: LatencyMs::from_histogram(&hist),
        newest_version: newest.clone(),
        node_a_cpu_cores: cpu_a.and_then(|m| m.cores()),
        client_cpu_cores: client_cpu.cores(),
    };
    eprintln!(
        "meridian-bench: catchup: {ok} writes in {write_secs:.2} s ({} writes/s), {errors} errors",
        thousands(backlog.writes_per_sec)
    );
    if errors > 0 {
        failures.push(format!(
            "{errors} backlog writes to A failed; first: {}",
            first_errors.join(" | ")
        ));
    }

    let pair = env
        .pair_mut()
        .ok_or_else(|| Error::runtime("the cluster is gone"))?;
    if let Err(e) = pair.a.check_alive() {
        failures.push(e.to_string());
    }

    // 3. B again: time until it has applied every change.
    let mut catchup = None;
    if failures.is_empty() {
        // In partition mode B's counter already holds what it applied before the cut.
        let b_before = if partition {
            prom::scrape(&http, &base_b).await.ok()
        } else {
            None
        };
        let base_applied = b_before
            .as_ref()
            .and_then(|s| s.value(APPLIED_COUNTER, &[("peer_region", REGION_A)]))
            .unwrap_or(0.0);
        let spawned = if partition {
            pair.set_links_down(false)?;
            Instant::now()
        } else {
            let log = out_dir.join("node-catchup-b-restart.log");
            pair.b.respawn(log.clone())?;
            pair.logs.push(log);
            pair.b.spawned_at
        };
        let cpu_b = pair.b.pid().map(|p| CpuMeter::start(Some(p)));
        let threads_b = pair.b.pid().map(ThreadMeter::start);
        let wait_b = pair.b.pid().map(WaitMeter::start);
        let cpu_a = pid_a.map(|p| CpuMeter::start(Some(p)));
        let threads_a = pid_a.map(ThreadMeter::start);
        let a_before = prom::scrape(&http, &base_a).await.ok();
        eprintln!(
            "meridian-bench: catchup: {NODE_B} {}; waiting for it to apply {ok} changes",
            if partition {
                "reconnected (links healed)"
            } else {
                "started again"
            }
        );
        let target = ok as f64;
        let deadline = spawned + Duration::from_secs(opts.deadline_secs);
        let ready_url = format!("{base_b}/readyz");
        let mut ready_at: Option<Instant> = None;
        let mut done_at: Option<Instant> = None;
        let mut first_applied: Option<(Instant, f64)> = None;
        let mut applied = 0.0;
        let mut curve = vec![(0.0, 0.0)];
        let mut next_sample = CURVE_EVERY;
        let mut ticker = tokio::time::interval(POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_problem = None;
        let mut last_scrape: Option<prom::Scrape> = None;
        // The threads are read just before the end, while B still runs.
        let mut top_b = Vec::new();
        let mut top_a = Vec::new();
        let mut node_b_cpu_wait_cores = None;
        loop {
            ticker.tick().await;
            if let Err(e) = pair.b.check_alive() {
                failures.push(e.to_string());
                break;
            }
            if ready_at.is_none()
                && let Ok(resp) = http
                    .get(&ready_url)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                && resp.status() == reqwest::StatusCode::OK
            {
                ready_at = Some(Instant::now());
            }
            match prom::scrape(&http, &base_b).await {
                Ok(s) => {
                    applied = s
                        .value(APPLIED_COUNTER, &[("peer_region", REGION_A)])
                        .unwrap_or(0.0)
                        - base_applied;
                    last_scrape = Some(s);
                }
                Err(e) => last_problem = Some(e.to_string()),
            }
            let now = Instant::now();
            if applied > 0.0 && first_applied.is_none() {
                first_applied = Some((now, applied));
            }
            let elapsed = now - spawned;
            if applied >= target {
                top_b = threads_b.as_ref().map(|t| t.top(5)).unwrap_or_default();
                top_a = threads_a.as_ref().map(|t| t.top(5)).unwrap_or_default();
                node_b_cpu_wait_cores = wait_b.as_ref().and_then(WaitMeter::waiting_cores);
                done_at = Some(now);
                curve.push((elapsed.as_secs_f64(), applied));
                break;
            }
            if elapsed >= next_sample {
                curve.push((elapsed.as_secs_f64(), applied));
                while next_sample <= elapsed {
                    next_sample += CURVE_EVERY;
                }
            }
            if now >= deadline {
                failures.push(format!(
                    "{NODE_B} applied {applied} of {ok} changes within {} s{}",
                    opts.deadline_secs,
                    last_problem
                        .as_ref()
                        .map(|p| format!(" (last scrape problem: {p})"))
                        .unwrap_or_default()
                ));
                top_b = threads_b.as_ref().map(|t| t.top(5)).unwrap_or_default();
                top_a = threads_a.as_ref().map(|t| t.top(5)).unwrap_or_default();
                node_b_cpu_wait_cores = wait_b.as_ref().and_then(WaitMeter::waiting_cores);
                break;
            }
        }
        let node_b_cpu_cores = cpu_b.and_then(|m| m.cores());
        let node_a_cpu_cores = cpu_a.and_then(|m| m.cores());
        let a_after = prom::scrape(&http, &base_a).await.ok();
        let interval = done_at
            .map_or_else(|| spawned.elapsed(), |d| d - spawned)
            .as_secs_f64();
        let node_b_commits = last_scrape
            .as_ref()
            .and_then(|s| prom::CommitStats::between(b_before.as_ref(), s, interval));
        let node_a_commits = a_after
            .as_ref()
            .and_then(|s| prom::CommitStats::between(a_before.as_ref(), s, interval));
        let secs_from_start = done_at.map(|d| (d - spawned).as_secs_f64());
        let secs_from_ready = done_at.zip(ready_at).map(|(d, r)| (d - r).as_secs_f64());
        let per_sec = |s: Option<f64>| s.filter(|s| *s > 0.0).map(|s| target / s);
        let streaming = match (done_at, first_applied) {
            (Some(d), Some((t, a))) if d > t => Some((target - a) / (d - t).as_secs_f64()),
            _ => None,
        };

        // B's own view afterwards.
        let status = http::get_json(&http, &format!("{base_b}/v1/status")).await;
        let (frontier, records) = match &status {
            Ok(v) => (
                v.pointer(&format!("/frontier/{NODE_A}"))
                    .and_then(|f| f.as_str())
                    .map(str::to_string),
                v.get("records_stored").and_then(serde_json::Value::as_u64),
            ),
            Err(e) => {
                notes.push(format!("reading {NODE_B}'s status afterwards: {e}"));
                (None, None)
            }
        };
        let reached = match (
            frontier.as_deref().and_then(version_time),
            newest.as_deref().and_then(version_time),
        ) {
            (Some(f), Some(n)) => Some(f >= n),
            _ => None,
        };
        if reached == Some(false) {
            failures.push(format!(
                "{NODE_B}'s frontier for {NODE_A} ({}) is behind the newest version A answered ({})",
                frontier.as_deref().unwrap_or("?"),
                newest.as_deref().unwrap_or("?")
            ));
        }
        catchup = Some(CatchupStats {
            changes: ok,
            b_stop: b_stop.clone(),
            ready_secs: ready_at.map(|r| (r - spawned).as_secs_f64()),
            secs_from_start,
            secs_from_ready,
            changes_per_sec_from_start: per_sec(secs_from_start),
            changes_per_sec_from_ready: per_sec(secs_from_ready),
            changes_per_sec_streaming: streaming,
            applied_at_end: applied,
            node_b_cpu_cores,
            node_b_top_threads: top_b,
            node_b_cpu_wait_cores,
            node_a_cpu_cores,
            node_a_top_threads: top_a,
            node_b_commits,
            node_a_commits,
            curve,
            b_frontier_for_a: frontier,
            b_frontier_reached_newest: reached,
            b_records_stored: records,
        });
        if let Some(c) = &catchup {
            eprintln!(
                "meridian-bench: catchup: {} changes applied in {} from the heal or process start ({})",
                ok,
                secs(c.secs_from_start),
                rate(c.changes_per_sec_from_start)
            );
        }
    } else {
        notes.push("B was not started again because the backlog phase failed".into());
    }

    let targets = vec![TargetResult {
        name: format!("catch-up ≥ {} changes/s", thousands(CATCHUP_TARGET)),
        bound: format!("{} changes/s", thousands(CATCHUP_TARGET)),
        value: rate(catchup.as_ref().and_then(|c| c.changes_per_sec_from_start)),
        status: match catchup.as_ref().and_then(|c| c.changes_per_sec_from_start) {
            Some(r) if r >= CATCHUP_TARGET => "PASS",
            Some(_) => "MISS",
            None => "n/a",
        },
    }];
    notes.push(format!(
        "catch-up time runs from {} to the first {} ms poll of B's \
         {APPLIED_COUNTER}{{peer_region=\"{REGION_A}\"}} that has grown by the backlog",
        if partition {
            "the heal of both links (it includes B and A redialling: a cut longer than the 10 s \
             QUIC idle timeout ends the links)"
        } else {
            "spawning B (and separately from its first 200 on /readyz)"
        },
        POLL.as_millis()
    ));
    notes.push(format!(
        "both nodes and this client share the machine's {} core(s); 1.00 core = one core busy",
        machine.nproc
    ));

    let log_sizes = env.pair_mut().map(|p| p.log_sizes()).unwrap_or_default();
    let node_stop = env.stop_pair();
    if let Some(s) = &node_stop {
        eprintln!("meridian-bench: catchup: nodes {s}");
    }
    let setup = env.info(node_stop);
    let node_logs = scan_logs(&setup, &log_sizes);
    Ok(CatchupReport {
        scenario: "catchup",
        machine,
        setup,
        config: opts.clone(),
        backlog: Some(backlog),
        catchup,
        targets,
        node_logs,
        failures,
        notes,
    })
}

/// Prints the table and the context, writes `catchup.json`; returns the failures.
pub fn publish(report: &CatchupReport, out_dir: &std::path::Path) -> Result<Vec<String>> {
    let mut text = report::pair_header("catchup", &report.machine, &report.setup);
    text.push_str(&report::render_table(&report.table()));
    for n in &report.notes {
        let _ = writeln!(text, "note: {n}");
    }
    text.push_str(&crate::lag::log_notes(&report.node_logs));
    for f in &report.failures {
        let _ = writeln!(text, "FAILED: {f}");
    }
    print!("{text}");
    let path = report::write_json(out_dir, "catchup.json", report)?;
    println!("results: {}", path.display());
    for l in &report.node_logs {
        println!("node log: {}", l.log.display());
    }
    Ok(report.failures.clone())
}

pub async fn run_and_publish(common: &CommonArgs, opts: &CatchupOpts) -> Result<()> {
    let report = run(common, opts).await?;
    let failures = publish(&report, &common.out)?;
    report::scenario_result("catchup", &failures)
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_time_reads_the_hlc_part() {
        assert_eq!(
            super::version_time("00000000000000ff-a8dd000000000000"),
            Some(255)
        );
        assert_eq!(super::version_time("short"), None);
    }
}
