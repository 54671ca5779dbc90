//! The `lag` scenario: replication lag between two nodes on loopback at a steady write rate.
//!
//! Writes go to node A on an open-loop schedule; the lag figures are node B's own
//! per-change histogram `meridian_replication_apply_lag_seconds{peer_region="bench-a"}`
//! (origin HLC stamp at A to durable application at B; both nodes read the same clock),
//! taken as the difference of two scrapes around the measured phase.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::CommonArgs;
use crate::cluster::{self, LogProblems, REGION_A};
use crate::cpu::{CpuMeter, WaitMeter};
use crate::error::{Context, Error, Result};
use crate::fsync::{self, FsyncMode, FsyncStats};
use crate::http::{self, make_body};
use crate::prom::{self, Buckets, Quantile};
use crate::report::{self, Machine, Row, thousands};
use crate::setup::{BenchEnv, SetupInfo};
use crate::stats::{LatencyMs, micros, new_histogram};

/// Target: replication lag p99 on loopback.
const LAG_P99_TARGET_MS: f64 = 10.0;
/// How long to wait, after the last write, for B to have applied every change.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// A send more than this after its scheduled time counts as late (tokio's timer alone
/// adds up to about 1 ms).
const LATE_AFTER: Duration = Duration::from_millis(5);
/// A worker gives up after this many failed requests.
const MAX_ERRORS_PER_WORKER: u64 = 100;
const KEEP_ERRORS: usize = 3;

pub const LAG_HISTOGRAM: &str = "meridian_replication_apply_lag_seconds";
pub const APPLIED_COUNTER: &str = "meridian_replication_changes_applied_total";

#[derive(Args, Debug, Clone, Serialize)]
#[command(next_help_heading = "Lag scenario")]
pub struct LagOpts {
    /// Writes per second sent to node A (open loop: on a fixed schedule)
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,

    /// Measured seconds
    #[arg(long, value_name = "SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration_secs: u64,

    /// Unmeasured seconds at the same rate before the measured phase
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub warmup_secs: u64,

    /// Requests in flight at most: workers that take the next scheduled send time
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub workers: u64,

    /// Size of each written JSON object, in bytes (approximately)
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    pub value_bytes: usize,

    /// fdatasync samples for the disk's fsync floor (0: skip)
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub fsync_samples: u64,
}

impl Default for LagOpts {
    fn default() -> Self {
        LagOpts {
            rate: 1000,
            duration_secs: 20,
            warmup_secs: 2,
            workers: 64,
            value_bytes: 200,
            fsync_samples: 200,
        }
    }
}

/// The load sent to node A.
#[derive(Debug, Serialize)]
pub struct LoadStats {
    pub target_rate: u64,
    pub workers: u64,
    /// Writes scheduled in the measured phase.
    pub scheduled: u64,
    /// Successful writes scheduled in the measured phase.
    pub writes: u64,
    /// Successful writes over the whole run (warm-up included): what B must apply.
    pub writes_total: u64,
    /// Failed requests over the whole run.
    pub errors: u64,
    pub workers_gave_up: u64,
    /// From the first measured scheduled send to the last measured send, plus one interval.
    pub measured_secs: f64,
    pub achieved_rate: f64,
    /// Client-side latency at A, from sending a request to its durable answer (measured phase).
    pub write_latency: LatencyMs,
    /// From the scheduled send time to the answer: includes any wait for a free worker.
    pub write_latency_from_schedule: LatencyMs,
    /// Sends more than 5 ms behind their scheduled time (all workers were busy).
    pub late_sends: u64,
    /// From the scheduled send time to the actual send.
    pub send_delay: LatencyMs,
    /// CPU over the measured phase, in cores.
    pub client_cpu_cores: Option<f64>,
    pub node_a_cpu_cores: Option<f64>,
    pub node_b_cpu_cores: Option<f64>,
    /// Time the node's threads were runnable but waited for a CPU, per wall second: other
    /// processes (or the other node) held them back.
    pub node_a_cpu_wait_cores: Option<f64>,
    pub node_b_cpu_wait_cores: Option<f64>,
    /// Each node's group commits over the measured phase, from its metrics.
    pub node_a_commits: Option<prom::CommitStats>,
    pub node_b_commits: Option<prom::CommitStats>,
}

/// The lag at B, from its histogram's difference between the two scrapes.
#[derive(Debug, Serialize)]
pub struct LagStats {
    /// Observations between the scrapes (the measured writes, plus warm-up changes that were
    /// still in flight at the first scrape).
    pub samples: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// Bucket bounds around each quantile, in seconds.
    pub p50_bucket: Option<Quantile>,
    pub p99_bucket: Option<Quantile>,
    pub p999_bucket: Option<Quantile>,
    /// Upper bound of the highest non-empty bucket.
    pub max_bucket_ms: Option<f64>,
    /// Fraction of changes with a lag up to 10 ms (interpolated within its bucket).
    pub fraction_within_target: Option<f64>,
    /// Ratio between consecutive bucket bounds (1.25: each bucket is 25 % wider).
    pub bucket_growth: Option<f64>,
    pub method: &'static str,
    /// B's applied counter (peer_region bench-a) at the two scrapes.
    pub applied_before: f64,
    pub applied_after: f64,
    /// From the last write's answer to B having applied every successful write.
    pub drain_secs: Option<f64>,
    /// The buckets (upper bound in seconds, changes in that bucket) with any changes.
    pub buckets: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct TargetResult {
    pub name: String,
    pub bound: String,
    pub value: String,
    pub status: &'static str,
}

#[derive(Debug, Serialize)]
pub struct LagReport {
    pub scenario: &'static str,
    pub machine: Machine,
    pub setup: SetupInfo,
    pub config: LagOpts,
    pub fsync_floor: Option<FsyncStats>,
    pub load: Option<LoadStats>,
    pub lag: Option<LagStats>,
    pub targets: Vec<TargetResult>,
    pub node_logs: Vec<LogProblems>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.3} ms"))
}

impl LagReport {
    pub fn table(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(f) = &self.fsync_floor {
            let name = "fsync floor (append, 4 KiB)";
            rows.push(Row::new(
                name,
                "p50",
                format!("{} µs", f.p50_us),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "p99",
                format!("{} µs", f.p99_us),
                String::new(),
            ));
        }
        if let Some(l) = &self.load {
            let name = format!("writes at A ({}/s target)", thousands(l.target_rate as f64));
            let name = name.as_str();
            rows.push(Row::new(
                name,
                "achieved",
                format!("{} writes/s", thousands(l.achieved_rate)),
                format!("{} writes/s", thousands(l.target_rate as f64)),
            ));
            rows.push(Row::new(
                name,
                "writes",
                format!(
                    "{} of {} in {:.2} s",
                    l.writes, l.scheduled, l.measured_secs
                ),
                String::new(),
            ));
            rows.push(Row::new(name, "errors", l.errors.to_string(), "0".into()));
            rows.push(Row::new(
                name,
                "latency p50",
                format!("{:.3} ms", l.write_latency.p50_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "latency p99",
                format!("{:.3} ms", l.write_latency.p99_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "latency max",
                format!("{:.3} ms", l.write_latency.max_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "p99 from schedule",
                format!("{:.3} ms", l.write_latency_from_schedule.p99_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "send delay p99 / max",
                format!(
                    "{:.3} / {:.3} ms ({} sends > 5 ms late)",
                    l.send_delay.p99_ms, l.send_delay.max_ms, l.late_sends
                ),
                String::new(),
            ));
            let cores = |c: Option<f64>| c.map_or_else(|| "?".into(), |c| format!("{c:.2}"));
            rows.push(Row::new(
                name,
                "cpu (cores)",
                format!(
                    "A {}, B {}, client {}",
                    cores(l.node_a_cpu_cores),
                    cores(l.node_b_cpu_cores),
                    cores(l.client_cpu_cores)
                ),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "waiting for a cpu (cores)",
                format!(
                    "A {}, B {}",
                    cores(l.node_a_cpu_wait_cores),
                    cores(l.node_b_cpu_wait_cores)
                ),
                String::new(),
            ));
            for (node, c) in [("A", &l.node_a_commits), ("B", &l.node_b_commits)] {
                if let Some(c) = c {
                    rows.push(Row::new(
                        name,
                        &format!("commits at {node}"),
                        c.describe(),
                        String::new(),
                    ));
                }
            }
        }
        if let Some(g) = &self.lag {
            let name = "replication lag A→B";
            let status = match g.p99_ms {
                Some(p) if p <= LAG_P99_TARGET_MS => "PASS",
                Some(_) => "MISS",
                None => "n/a",
            };
            rows.push(Row::new(name, "p50", fmt_ms(g.p50_ms), String::new()));
            rows.push(Row::new(
                name,
                "p99",
                fmt_ms(g.p99_ms),
                format!("≤ {LAG_P99_TARGET_MS} ms: {status}"),
            ));
            rows.push(Row::new(name, "p999", fmt_ms(g.p999_ms), String::new()));
            rows.push(Row::new(name, "mean", fmt_ms(g.mean_ms), String::new()));
            rows.push(Row::new(
                name,
                "max bucket",
                g.max_bucket_ms
                    .map_or_else(|| "n/a".into(), |m| format!("≤ {m:.3} ms")),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "within 10 ms",
                g.fraction_within_target
                    .map_or_else(|| "n/a".into(), |f| format!("{:.2} %", f * 100.0)),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "samples",
                g.samples.to_string(),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "resolution",
                match g.bucket_growth {
                    Some(r) => format!("buckets +{:.0} % each, interpolated", (r - 1.0) * 100.0),
                    None => "?".into(),
                },
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "drain after last write",
                g.drain_secs
                    .map_or_else(|| "not drained".into(), |d| format!("{:.3} s", d)),
                String::new(),
            ));
        }
        rows
    }
}

/// One worker's results.
struct WorkerResult {
    hist: Histogram<u64>,
    from_schedule: Histogram<u64>,
    send_delay: Histogram<u64>,
    late: u64,
    ok_measured: u64,
    ok_total: u64,
    errors: u64,
    first_errors: Vec<String>,
    gave_up: bool,
    last_measured_send: Option<Instant>,
    last_answer: Option<Instant>,
}

struct Schedule {
    t0: Instant,
    rate: u64,
    warmup_slots: u64,
    total_slots: u64,
    next: AtomicU64,
}

impl Schedule {
    fn at(&self, slot: u64) -> Instant {
        // Nanoseconds since t0 without drift: slot * 1e9 / rate in u128.
        let ns = u128::from(slot) * 1_000_000_000 / u128::from(self.rate);
        self.t0 + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

async fn worker(
    http: reqwest::Client,
    base: Arc<str>,
    sched: Arc<Schedule>,
    value_bytes: usize,
) -> WorkerResult {
    let mut r = WorkerResult {
        hist: new_histogram(),
        from_schedule: new_histogram(),
        send_delay: new_histogram(),
        late: 0,
        ok_measured: 0,
        ok_total: 0,
        errors: 0,
        first_errors: Vec::new(),
        gave_up: false,
        last_measured_send: None,
        last_answer: None,
    };
    let mut url = String::with_capacity(base.len() + 32);
    loop {
        let slot = sched.next.fetch_add(1, Ordering::Relaxed);
        if slot >= sched.total_slots {
            break;
        }
        let at = sched.at(slot);
        tokio::time::sleep_until(at.into()).await;
        url.clear();
        let _ = write!(url, "{base}/v1/kv/lag/{slot}");
        let body = make_body(slot, value_bytes);
        let sent = Instant::now();
        let res = http::put(&http, &url, body).await;
        let answered = Instant::now();
        let measured = slot >= sched.warmup_slots;
        match res {
            Ok(()) => {
                r.ok_total += 1;
                r.last_answer = Some(answered);
                if measured {
                    r.ok_measured += 1;
                    r.hist.saturating_record(micros(answered - sent));
                    r.from_schedule.saturating_record(micros(answered - at));
                    let delay = sent.saturating_duration_since(at);
                    r.send_delay.saturating_record(micros(delay));
                    if delay > LATE_AFTER {
                        r.late += 1;
                    }
                    r.last_measured_send = Some(r.last_measured_send.map_or(sent, |t| t.max(sent)));
                }
            }
            Err(e) => {
                r.errors += 1;
                if r.first_errors.len() < KEEP_ERRORS {
                    r.first_errors.push(e);
                }
                if r.errors >= MAX_ERRORS_PER_WORKER {
                    r.gave_up = true;
                    break;
                }
            }
        }
    }
    r
}

/// B's applied counter for changes from region A (0 before the first batch).
fn applied(s: &prom::Scrape) -> f64 {
    s.value(APPLIED_COUNTER, &[("peer_region", REGION_A)])
        .unwrap_or(0.0)
}

pub async fn run(common: &CommonArgs, opts: &LagOpts) -> Result<LagReport> {
    let machine = Machine::collect();
    if common.target.is_some() {
        return Err(Error::usage(
            "lag starts its own two nodes; it cannot run against --target",
        ));
    }
    let mut env = BenchEnv::prepare(common, "lag")?;
    let http = http::client(opts.workers as usize + 4)?;
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    eprintln!(
        "meridian-bench: lag: cluster dir {} on {}",
        env.data_dir.display(),
        env.disk.describe()
    );
    if env.disk.is_memory_backed() {
        notes.push(
            "the data directory is on a memory-backed filesystem: fsync costs nothing there".into(),
        );
    }
    if cfg!(debug_assertions) {
        notes.push("meridian-bench is a debug build; use --release for figures".into());
    }

    let fsync_floor = if opts.fsync_samples > 0 {
        eprintln!(
            "meridian-bench: fsync floor: {} × 4 KiB fdatasync in {}",
            opts.fsync_samples,
            env.data_dir.display()
        );
        let dir = env.data_dir.clone();
        let samples = opts.fsync_samples;
        Some(
            tokio::task::spawn_blocking(move || fsync::measure(&dir, samples, FsyncMode::Append))
                .await
                .context("the fsync probe thread failed")??,
        )
    } else {
        None
    };

    eprintln!(
        "meridian-bench: lag: starting {} and {}",
        cluster::NODE_A,
        cluster::NODE_B
    );
    let pair = env.start_pair(&http, "lag").await?;
    eprintln!(
        "meridian-bench: lag: both nodes ready after {:.2} s, replication connected {:.2} s later",
        pair.ready_secs, pair.connect_secs
    );
    let base_a: Arc<str> = Arc::from(pair.a.api_url.as_str());
    let base_b = pair.b.api_url.clone();
    let pid_a = pair.a.pid();
    let pid_b = pair.b.pid();

    // The schedule: warm-up slots, then measured slots, all at `rate`.
    let warmup_slots = opts.rate * opts.warmup_secs;
    let measured_slots = opts.rate * opts.duration_secs;
    let sched = Arc::new(Schedule {
        t0: Instant::now() + Duration::from_millis(50),
        rate: opts.rate,
        warmup_slots,
        total_slots: warmup_slots + measured_slots,
        next: AtomicU64::new(0),
    });
    let measure_from = sched.at(warmup_slots);
    let measure_until = sched.at(warmup_slots + measured_slots);
    eprintln!(
        "meridian-bench: lag: {} writes/s at {} with {} workers: {} s warm-up + {} s measured",
        opts.rate, base_a, opts.workers, opts.warmup_secs, opts.duration_secs
    );
    let tasks: Vec<_> = (0..opts.workers)
        .map(|_| {
            tokio::spawn(worker(
                http.clone(),
                Arc::clone(&base_a),
                Arc::clone(&sched),
                opts.value_bytes,
            ))
        })
        .collect();

    // The first scrape at the start of the measured phase.
    tokio::time::sleep_until(measure_from.into()).await;
    let before = prom::scrape(&http, &base_b).await;
    let before_a = prom::scrape(&http, &base_a).await.ok();
    let phase_start = Instant::now();
    let client_cpu = CpuMeter::start(None);
    let cpu_a = pid_a.map(|p| CpuMeter::start(Some(p)));
    let cpu_b = pid_b.map(|p| CpuMeter::start(Some(p)));
    let wait_a = pid_a.map(WaitMeter::start);
    let wait_b = pid_b.map(WaitMeter::start);
    tokio::time::sleep_until(measure_until.into()).await;
    let client_cpu_cores = client_cpu.cores();
    let node_a_cpu_cores = cpu_a.and_then(|m| m.cores());
    let node_b_cpu_cores = cpu_b.and_then(|m| m.cores());
    let node_a_cpu_wait_cores = wait_a.and_then(|m| m.waiting_cores());
    let node_b_cpu_wait_cores = wait_b.and_then(|m| m.waiting_cores());
    let end_a = prom::scrape(&http, &base_a).await.ok();
    let end_b = prom::scrape(&http, &base_b).await.ok();
    let phase_secs = phase_start.elapsed().as_secs_f64();
    let commits = |before: Option<&prom::Scrape>, after: Option<&prom::Scrape>| {
        after.and_then(|a| prom::CommitStats::between(before, a, phase_secs))
    };
    let node_a_commits = commits(before_a.as_ref(), end_a.as_ref());
    let node_b_commits = commits(before.as_ref().ok(), end_b.as_ref());

    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => all.push(r),
            Err(e) => failures.push(format!("a write worker failed: {e}")),
        }
    }
    let mut hist = new_histogram();
    let mut from_schedule = new_histogram();
    let mut first_errors = Vec::new();
    let mut send_delay = new_histogram();
    let (mut ok_measured, mut ok_total, mut errors, mut gave_up, mut late) = (0, 0, 0, 0, 0);
    let mut last_send = None::<Instant>;
    let mut last_answer = None::<Instant>;
    for r in all {
        let _ = hist.add(&r.hist);
        let _ = from_schedule.add(&r.from_schedule);
        ok_measured += r.ok_measured;
        ok_total += r.ok_total;
        errors += r.errors;
        gave_up += u64::from(r.gave_up);
        late += r.late;
        let _ = send_delay.add(&r.send_delay);
        last_send = last_send.max(r.last_measured_send);
        last_answer = last_answer.max(r.last_answer);
        for e in r.first_errors {
            if first_errors.len() < KEEP_ERRORS {
                first_errors.push(e);
            }
        }
    }
    if errors > 0 {
        failures.push(format!(
            "{errors} writes to A failed; first: {}",
            first_errors.join(" | ")
        ));
    }
    let measured_secs = last_send.map_or(0.0, |t| {
        t.saturating_duration_since(measure_from).as_secs_f64() + 1.0 / opts.rate as f64
    });
    let load = LoadStats {
        target_rate: opts.rate,
        workers: opts.workers,
        scheduled: measured_slots,
        writes: ok_measured,
        writes_total: ok_total,
        errors,
        workers_gave_up: gave_up,
        measured_secs,
        achieved_rate: if measured_secs > 0.0 {
            ok_measured as f64 / measured_secs
        } else {
            0.0
        },
        write_latency: LatencyMs::from_histogram(&hist),
        write_latency_from_schedule: LatencyMs::from_histogram(&from_schedule),
        late_sends: late,
        send_delay: LatencyMs::from_histogram(&send_delay),
        client_cpu_cores,
        node_a_cpu_cores,
        node_b_cpu_cores,
        node_a_cpu_wait_cores,
        node_b_cpu_wait_cores,
        node_a_commits,
        node_b_commits,
    };
    eprintln!(
        "meridian-bench: lag: {} measured writes ({} in total), {} errors; waiting for {} to apply them",
        ok_measured,
        ok_total,
        errors,
        cluster::NODE_B
    );

    // Wait until B has applied every successful write, then the second scrape.
    let pair = env
        .pair_mut()
        .ok_or_else(|| Error::runtime("the cluster is gone"))?;
    if let Err(e) = pair.check_alive() {
        failures.push(e.to_string());
    }
    let drain_from = last_answer.unwrap_or_else(Instant::now);
    let deadline = Instant::now() + DRAIN_DEADLINE;
    let mut drain_secs = None;
    let mut last_applied = 0.0;
    let mut last_problem = None;
    loop {
        if let Err(e) = pair.check_alive() {
            failures.push(e.to_string());
            break;
        }
        match prom::scrape(&http, &base_b).await {
            Ok(s) => {
                last_applied = applied(&s);
                if last_applied >= ok_total as f64 {
                    drain_secs = Some(drain_from.elapsed().as_secs_f64());
                    break;
                }
            }
            Err(e) => last_problem = Some(e.to_string()),
        }
        if Instant::now() >= deadline {
            failures.push(format!(
                "{} applied {last_applied} of the {ok_total} changes written at {} within {} s{}",
                cluster::NODE_B,
                cluster::NODE_A,
                DRAIN_DEADLINE.as_secs(),
                last_problem
                    .map(|p| format!(" (last scrape problem: {p})"))
                    .unwrap_or_default()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = prom::scrape(&http, &base_b).await;

    let lag = match (before, after) {
        (Ok(before), Ok(after)) => lag_stats(&before, &after, drain_secs, &mut failures),
        (Err(e), _) | (_, Err(e)) => {
            failures.push(format!("scraping {}'s metrics: {e}", cluster::NODE_B));
            None
        }
    };

    let targets = vec![TargetResult {
        name: format!("replication lag p99 ≤ {LAG_P99_TARGET_MS} ms on loopback"),
        bound: format!("{LAG_P99_TARGET_MS} ms"),
        value: fmt_ms(lag.as_ref().and_then(|l| l.p99_ms)),
        status: match lag.as_ref().and_then(|l| l.p99_ms) {
            Some(p) if p <= LAG_P99_TARGET_MS => "PASS",
            Some(_) => "MISS",
            None => "n/a",
        },
    }];
    if load.achieved_rate < 0.95 * opts.rate as f64 {
        notes.push(format!(
            "the achieved rate ({} writes/s) is below 95 % of the target rate: A could not keep up \
             with {} requests in flight",
            thousands(load.achieved_rate),
            opts.workers
        ));
    }
    notes.push(
        "lag = per change, from its HLC stamp at A (before A's durable commit) to its durable \
         application at B: it includes A's commit, the transfer and B's commit; both nodes \
         read the same clock; the two scrapes also count warm-up changes still in flight at the \
         first one"
            .into(),
    );
    notes.push(format!(
        "both nodes and this client share the machine's {} core(s)",
        machine.nproc
    ));

    let log_sizes = env.pair_mut().map(|p| p.log_sizes()).unwrap_or_default();
    let node_stop = env.stop_pair();
    if let Some(s) = &node_stop {
        eprintln!("meridian-bench: lag: nodes {s}");
    }
    let setup = env.info(node_stop);
    let node_logs = scan_logs(&setup, &log_sizes);
    Ok(LagReport {
        scenario: "lag",
        machine,
        setup,
        config: opts.clone(),
        fsync_floor,
        load: Some(load),
        lag,
        targets,
        node_logs,
        failures,
        notes,
    })
}

/// Warnings and errors in the node logs of a pair scenario; `sizes` are the logs' sizes
/// just before the final stop.
pub fn scan_logs(setup: &SetupInfo, sizes: &[(std::path::PathBuf, u64)]) -> Vec<LogProblems> {
    setup
        .cluster
        .iter()
        .flat_map(|c| c.logs.iter())
        .map(|log| {
            let offset = sizes.iter().find(|(p, _)| p == log).map(|(_, n)| *n);
            cluster::log_problems(log, offset, 5)
        })
        .collect()
}

/// The lines about node logs printed under a pair scenario's table.
pub fn log_notes(logs: &[LogProblems]) -> String {
    let mut text = String::new();
    for l in logs {
        if l.warn_or_error_lines > 0 {
            let _ = writeln!(
                text,
                "note: {} has {} WARN/ERROR line(s) before the final stop; first: {}",
                l.log.display(),
                l.warn_or_error_lines,
                l.first.first().map_or("", String::as_str)
            );
        }
        if l.at_final_stop > 0 {
            let _ = writeln!(
                text,
                "note: {} has {} WARN/ERROR line(s) while the nodes were stopped at the end; first: {}",
                l.log.display(),
                l.at_final_stop,
                l.first_at_final_stop.first().map_or("", String::as_str)
            );
        }
    }
    text
}

fn lag_stats(
    before: &prom::Scrape,
    after: &prom::Scrape,
    drain_secs: Option<f64>,
    failures: &mut Vec<String>,
) -> Option<LagStats> {
    let filter = [("peer_region", REGION_A)];
    let Some(after_h) = after.histogram(LAG_HISTOGRAM, &filter) else {
        failures.push(format!(
            "{}'s /metrics has no {LAG_HISTOGRAM}{{peer_region=\"{REGION_A}\"}}: is the node \
             binary older than that histogram?",
            cluster::NODE_B
        ));
        return None;
    };
    let before_h = before.histogram(LAG_HISTOGRAM, &filter);
    let d: Buckets = match after_h.since(before_h.as_ref()) {
        Ok(d) => d,
        Err(e) => {
            failures.push(e.to_string());
            return None;
        }
    };
    let q = |p: f64| d.quantile(p);
    let ms = |q: Option<Quantile>| q.map(|q| q.value * 1000.0);
    let (p50, p99, p999) = (q(0.50), q(0.99), q(0.999));
    let total = d.total();
    let mut per_bucket = Vec::new();
    let mut prev = 0.0;
    for &(le, cum) in &d.buckets {
        if cum > prev {
            per_bucket.push((le, cum - prev));
        }
        prev = cum;
    }
    Some(LagStats {
        samples: total as u64,
        p50_ms: ms(p50),
        p99_ms: ms(p99),
        p999_ms: ms(p999),
        mean_ms: (d.count > 0.0).then(|| d.sum / d.count * 1000.0),
        p50_bucket: p50,
        p99_bucket: p99,
        p999_bucket: p999,
        max_bucket_ms: d.max_bucket_bound().map(|b| b * 1000.0),
        fraction_within_target: d.fraction_le(LAG_P99_TARGET_MS / 1000.0),
        bucket_growth: d.growth(),
        method: "difference of two scrapes of B's histogram; quantiles linearly interpolated \
                 within a bucket (bucket bounds grow by 25 %, from 100 µs)",
        applied_before: applied(before),
        applied_after: applied(after),
        drain_secs,
        buckets: per_bucket,
    })
}

/// Prints the table and the context, writes `lag.json`; returns the failures.
pub fn publish(report: &LagReport, out_dir: &std::path::Path) -> Result<Vec<String>> {
    let mut text = report::pair_header("lag", &report.machine, &report.setup);
    text.push_str(&report::render_table(&report.table()));
    for n in &report.notes {
        let _ = writeln!(text, "note: {n}");
    }
    text.push_str(&log_notes(&report.node_logs));
    for f in &report.failures {
        let _ = writeln!(text, "FAILED: {f}");
    }
    print!("{text}");
    let path = report::write_json(out_dir, "lag.json", report)?;
    println!("results: {}", path.display());
    for l in &report.node_logs {
        println!("node log: {}", l.log.display());
    }
    Ok(report.failures.clone())
}

pub async fn run_and_publish(common: &CommonArgs, opts: &LagOpts) -> Result<()> {
    let report = run(common, opts).await?;
    let failures = publish(&report, &common.out)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::runtime(format!(
            "the lag benchmark had {} failure(s); see above",
            failures.len()
        )))
    }
}
