//! The `lag` scenario: replication lag between two nodes whose links go through the link
//! emulator, at a steady write rate, for a series of injected one-way delays; then a
//! partition, and the catch-up after it heals.
//!
//! Writes go to node A on an open-loop schedule; the lag figures are node B's own
//! per-change histogram `meridian_replication_apply_lag_seconds{peer_region="bench-a"}`
//! (origin HLC stamp at A to durable application at B; both nodes read the same clock),
//! taken as the difference of two scrapes around each measured phase. Both directed links
//! (A dials B, B dials A) go through the emulator inside this process, and every phase sets
//! the same one-way delay on both directions of both, so a change crosses one delayed hop and
//! its acknowledgement another.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::CommonArgs;
use crate::cluster::{self, LinkCounters, LogProblems, NODE_A, NODE_B, Pair, REGION_A};
use crate::cpu::{CpuMeter, WaitMeter};
use crate::error::{Context, Error, Result};
use crate::fsync::{self, FsyncMode, FsyncStats};
use crate::http::{self, make_body};
use crate::prom::{self, Buckets};
use crate::report::{self, Machine, Row, thousands};
use crate::setup::{BenchEnv, SetupInfo};
use crate::stats::{LatencyMs, micros, new_histogram};

/// The delays of the lag figures, one-way, in milliseconds.
pub const DEFAULT_DELAYS_MS: [u64; 5] = [0, 10, 40, 75, 150];
/// Targets: lag p50 ≤ delay + 3 ms and p99 ≤ delay + 20 ms at every delay.
const LAG_P50_MARGIN_MS: f64 = 3.0;
const LAG_P99_MARGIN_MS: f64 = 20.0;
/// Target: A's local write p99 with WAN delay (and, reported against the same bound, during a
/// partition) at most this many times its p99 without delay.
const WRITE_P99_RATIO_BOUND: f64 = 1.2;
/// The delay the local-write target names ("with 150 ms links").
const WAN_DELAY_MS: u64 = 150;
/// How long to wait, after a phase's last write, for B to have applied every change.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// How long a phase waits, after its delay is set, for B to finish the previous phase.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// How long B may take, after the partition heals, to apply what was written meanwhile.
const CATCHUP_DEADLINE: Duration = Duration::from_secs(120);
/// Polling interval of B's applied counter; the drain and catch-up times are to this.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
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

    /// Measured seconds per delay phase
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration_secs: u64,

    /// Unmeasured seconds at the same rate before each measured delay phase
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

    /// One-way delays injected on both links (through the link emulator), one measured phase
    /// each, in this order
    #[arg(
        long,
        value_name = "MS[,MS...]",
        value_delimiter = ',',
        default_values_t = DEFAULT_DELAYS_MS,
        value_parser = clap::value_parser!(u64).range(0..=60_000)
    )]
    pub delays_ms: Vec<u64>,

    /// Seconds of writes at A with both links cut, after the delay phases; then the links
    /// heal and B's catch-up is timed (0: skip)
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub partition_secs: u64,
}

impl Default for LagOpts {
    fn default() -> Self {
        LagOpts {
            rate: 1000,
            duration_secs: 10,
            warmup_secs: 2,
            workers: 64,
            value_bytes: 200,
            fsync_samples: 200,
            delays_ms: DEFAULT_DELAYS_MS.to_vec(),
            partition_secs: 10,
        }
    }
}

/// The load sent to node A during one phase.
#[derive(Debug, Serialize)]
pub struct LoadStats {
    pub target_rate: u64,
    pub workers: u64,
    /// Writes scheduled in the measured part.
    pub scheduled: u64,
    /// Successful writes scheduled in the measured part.
    pub writes: u64,
    /// Successful writes over the whole phase (warm-up included): what B must apply.
    pub writes_total: u64,
    /// Failed requests over the whole phase.
    pub errors: u64,
    /// The first few failures, as the client saw them.
    pub first_errors: Vec<String>,
    pub workers_gave_up: u64,
    /// From the first measured scheduled send to the last measured send, plus one interval.
    pub measured_secs: f64,
    pub achieved_rate: f64,
    /// Client-side latency at A, from sending a request to its durable answer (measured part).
    pub write_latency: LatencyMs,
    /// From the scheduled send time to the answer: includes any wait for a free worker.
    pub write_latency_from_schedule: LatencyMs,
    /// Sends more than 5 ms behind their scheduled time (all workers were busy).
    pub late_sends: u64,
    /// From the scheduled send time to the actual send.
    pub send_delay: LatencyMs,
    /// CPU over the measured part, in cores. The client's includes the link emulator, which
    /// runs in this process.
    pub client_cpu_cores: Option<f64>,
    pub node_a_cpu_cores: Option<f64>,
    pub node_b_cpu_cores: Option<f64>,
    /// Time the node's threads were runnable but waited for a CPU, per wall second: other
    /// processes (or the other node) held them back.
    pub node_a_cpu_wait_cores: Option<f64>,
    pub node_b_cpu_wait_cores: Option<f64>,
    /// Each node's group commits over the measured part, from its metrics.
    pub node_a_commits: Option<prom::CommitStats>,
    pub node_b_commits: Option<prom::CommitStats>,
}

/// A lag quantile read from B's histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LagQuantile {
    /// Linearly interpolated inside the bucket, between `low_ms` and `high_ms`.
    pub value_ms: f64,
    /// Where the observations of the quantile's bucket can lie: the bucket's lower bound, or
    /// the floor (the injected delay) when that is higher, up to its upper bound (`null`:
    /// above the histogram's last bound).
    pub low_ms: f64,
    pub high_ms: f64,
    pub above_last_bound: bool,
}

/// The lag at B over one phase, from its histogram's difference between two scrapes.
#[derive(Debug, Serialize)]
pub struct LagStats {
    /// Observations between the scrapes (the measured writes, plus warm-up changes that were
    /// still in flight at the first scrape).
    pub samples: u64,
    /// No change can reach B sooner than the injected one-way delay.
    pub floor_ms: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// Exact (from the histogram's sum and count).
    pub mean_ms: Option<f64>,
    pub p50: Option<LagQuantile>,
    pub p99: Option<LagQuantile>,
    pub p999: Option<LagQuantile>,
    /// Upper bound of the highest non-empty bucket.
    pub max_bucket_ms: Option<f64>,
    /// The delay + 20 ms of the p99 target, and the fraction of changes within it
    /// (interpolated within its bucket).
    pub within_ms: f64,
    pub fraction_within: Option<f64>,
    /// Ratio between consecutive bucket bounds (1.25: each bucket is 25 % wider).
    pub bucket_growth: Option<f64>,
    pub method: &'static str,
    /// B's applied counter (peer_region bench-a) at the two scrapes.
    pub applied_before: f64,
    pub applied_after: f64,
    /// The buckets (upper bound in seconds, changes in that bucket) with any changes.
    pub buckets: Vec<(f64, f64)>,
}

/// One measured phase at a given one-way delay.
#[derive(Debug, Serialize)]
pub struct DelayPhase {
    pub delay_ms: u64,
    /// From setting the delay to B having applied everything of the previous phase.
    pub settle_secs: Option<f64>,
    /// B's applied counter when the phase's first write was due.
    pub applied_at_start: f64,
    pub lag: Option<LagStats>,
    /// From the phase's last answered write to B having applied all of the phase's writes.
    pub drain_secs: Option<f64>,
    /// The emulator's datagrams over the phase (both links, both directions).
    pub links: Option<LinkCounters>,
    #[serde(flatten)]
    pub load: LoadStats,
}

/// Writes at A with both links cut, then the heal and B's catch-up.
#[derive(Debug, Serialize)]
pub struct PartitionPhase {
    pub partition_secs: u64,
    /// From setting the delay back to 0 to B having applied everything before.
    pub settle_secs: Option<f64>,
    pub applied_at_start: f64,
    /// How far B's applied counter moved while the links were down (0 when the cut holds).
    pub applied_while_cut: Option<f64>,
    /// Successful writes at A while the links were down: what B must catch up on.
    pub backlog: u64,
    /// From the heal to B having applied the whole backlog (to the 50 ms poll).
    pub catchup_secs: Option<f64>,
    /// From the heal to the first poll that saw any of the backlog applied at B: mostly B
    /// redialling A (its link timed out during the cut and it retries with backoff).
    pub first_applied_secs: Option<f64>,
    pub catchup_changes_per_sec: Option<f64>,
    pub catchup_deadline_secs: u64,
    /// The emulator's datagrams while cut (`dropped_down` shows the cut at work).
    pub links_while_cut: Option<LinkCounters>,
    #[serde(flatten)]
    pub load: LoadStats,
}

/// A's client-side write latency in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct WriteLatencyPoint {
    pub phase: String,
    /// The one-way link delay (`None`: the partition).
    pub delay_ms: Option<u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub errors: u64,
}

/// A's local write latency must not depend on the links: no delay against WAN delay and
/// against a partition.
#[derive(Debug, Serialize)]
pub struct LocalWriteComparison {
    pub no_delay: Option<WriteLatencyPoint>,
    pub wan: Option<WriteLatencyPoint>,
    pub partition: Option<WriteLatencyPoint>,
    /// p99 over the no-delay p99 must be at most this.
    pub bound_ratio: f64,
    pub wan_p99_ratio: Option<f64>,
    pub wan_status: &'static str,
    pub partition_p99_ratio: Option<f64>,
    pub partition_status: &'static str,
}

/// One target and its verdict, in one shape for every kind.
#[derive(Debug, Clone, Serialize)]
pub struct LagTarget {
    pub name: String,
    /// `lag_p50`, `lag_p99`, `write_p99_wan` or `write_p99_partition`.
    pub metric: &'static str,
    pub delay_ms: Option<u64>,
    pub bound_ms: Option<f64>,
    pub value_ms: Option<f64>,
    /// `PASS`, `MISS` or `n/a`.
    pub status: &'static str,
    /// For a lag quantile: where its bucket's observations can lie (`low_ms`, `high_ms`).
    pub bucket_ms: Option<(f64, f64)>,
    /// False when the bound lies inside that range: the verdict then rests on the
    /// interpolation within the bucket, not on the observations alone.
    pub verdict_exact: bool,
}

/// A target of another scenario (`catchup`, `scale`): name, bound, value, verdict.
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
    pub phases: Vec<DelayPhase>,
    pub partition: Option<PartitionPhase>,
    pub local_write_comparison: LocalWriteComparison,
    pub targets: Vec<LagTarget>,
    /// Wall time of the whole scenario, set-up and stop included.
    pub wall_secs: f64,
    pub node_logs: Vec<LogProblems>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Pure parts: quantiles above a floor, verdicts, drain arithmetic

/// The `q` quantile of `d`, linearly interpolated inside its bucket, where the bucket's lower
/// bound is raised to `floor_s`: no change reaches B sooner than the injected delay, so that
/// part of the bucket is empty, and spreading its observations over it would put the quantile
/// below what is physically possible (the buckets are 25 % wide: 126–158 ms around 150 ms).
/// A bucket wholly at or below the floor (it should not hold anything) keeps its bounds.
pub fn quantile_with_floor(d: &Buckets, q: f64, floor_s: f64) -> Option<LagQuantile> {
    let total = d.total();
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = 0.0_f64;
    let mut below = 0.0;
    for &(le, cum) in &d.buckets {
        if cum >= rank && cum > below {
            let low = if le > floor_s {
                lower.max(floor_s)
            } else {
                lower
            };
            if le.is_infinite() {
                return Some(LagQuantile {
                    value_ms: low * 1000.0,
                    low_ms: low * 1000.0,
                    high_ms: f64::INFINITY,
                    above_last_bound: true,
                });
            }
            let frac = (rank - below) / (cum - below);
            return Some(LagQuantile {
                value_ms: (low + (le - low) * frac) * 1000.0,
                low_ms: low * 1000.0,
                high_ms: le * 1000.0,
                above_last_bound: false,
            });
        }
        lower = le;
        below = cum;
    }
    None
}

/// The fraction of observations at or below `x_s`, interpolated like
/// [`quantile_with_floor`]. `None` without observations.
pub fn fraction_within_with_floor(d: &Buckets, x_s: f64, floor_s: f64) -> Option<f64> {
    if floor_s <= 0.0 {
        return d.fraction_le(x_s);
    }
    let total = d.total();
    if total <= 0.0 {
        return None;
    }
    let mut lower = 0.0_f64;
    let mut below = 0.0;
    for &(le, cum) in &d.buckets {
        if x_s <= le {
            if le.is_infinite() {
                return Some(below / total);
            }
            let low = if le > floor_s {
                lower.max(floor_s)
            } else {
                lower
            };
            let frac = if le > low {
                ((x_s - low) / (le - low)).clamp(0.0, 1.0)
            } else {
                1.0
            };
            return Some((below + (cum - below) * frac) / total);
        }
        lower = le;
        below = cum;
    }
    Some(1.0)
}

/// The verdict on "quantile ≤ bound": `(status, exact)`. Exact when the whole range its
/// bucket's observations can lie in is on one side of the bound.
pub fn judge_quantile(q: Option<&LagQuantile>, bound_ms: f64) -> (&'static str, bool) {
    match q {
        None => ("n/a", true),
        Some(q) if q.above_last_bound => ("MISS", true),
        Some(q) if q.high_ms <= bound_ms => ("PASS", true),
        // Observations in a bucket are above its lower bound.
        Some(q) if q.low_ms >= bound_ms => ("MISS", true),
        Some(q) if q.value_ms <= bound_ms => ("PASS", false),
        Some(_) => ("MISS", false),
    }
}

/// The lag targets of one delay phase: p50 ≤ delay + 3 ms, p99 ≤ delay + 20 ms.
pub fn lag_targets(delay_ms: u64, lag: Option<&LagStats>) -> Vec<LagTarget> {
    let d = delay_ms as f64;
    [
        ("lag_p50", "p50", LAG_P50_MARGIN_MS, lag.and_then(|l| l.p50)),
        ("lag_p99", "p99", LAG_P99_MARGIN_MS, lag.and_then(|l| l.p99)),
    ]
    .into_iter()
    .map(|(metric, label, margin, q)| {
        let bound = d + margin;
        let (status, exact) = judge_quantile(q.as_ref(), bound);
        LagTarget {
            name: format!("replication lag {label} at {delay_ms} ms one-way ≤ delay + {margin} ms"),
            metric,
            delay_ms: Some(delay_ms),
            bound_ms: Some(bound),
            value_ms: q.map(|q| q.value_ms),
            status,
            bucket_ms: q.map(|q| (q.low_ms, q.high_ms)),
            verdict_exact: exact,
        }
    })
    .collect()
}

/// `p99 / base_p99` and whether it is within `bound_ratio`.
pub fn p99_ratio(base_p99_ms: f64, p99_ms: f64, bound_ratio: f64) -> (Option<f64>, &'static str) {
    if base_p99_ms <= 0.0 || p99_ms <= 0.0 {
        return (None, "n/a");
    }
    let ratio = p99_ms / base_p99_ms;
    (
        Some(ratio),
        if ratio <= bound_ratio { "PASS" } else { "MISS" },
    )
}

/// Picks the phases to compare: the first without delay, and the first at 150 ms (else the
/// longest delay there is), and the partition.
pub fn compare_local_writes(
    phases: &[(u64, WriteLatencyPoint)],
    partition: Option<WriteLatencyPoint>,
) -> LocalWriteComparison {
    let no_delay = phases.iter().find(|(d, _)| *d == 0).map(|(_, p)| p.clone());
    let wan = phases
        .iter()
        .find(|(d, _)| *d == WAN_DELAY_MS)
        .or_else(|| {
            phases
                .iter()
                .filter(|(d, _)| *d > 0)
                .max_by_key(|(d, _)| *d)
        })
        .map(|(_, p)| p.clone());
    let ratio = |other: &Option<WriteLatencyPoint>| match (&no_delay, other) {
        (Some(base), Some(o)) => p99_ratio(base.p99_ms, o.p99_ms, WRITE_P99_RATIO_BOUND),
        _ => (None, "n/a"),
    };
    let (wan_p99_ratio, wan_status) = ratio(&wan);
    let (partition_p99_ratio, partition_status) = ratio(&partition);
    LocalWriteComparison {
        no_delay,
        wan,
        partition,
        bound_ratio: WRITE_P99_RATIO_BOUND,
        wan_p99_ratio,
        wan_status,
        partition_p99_ratio,
        partition_status,
    }
}

/// The local-write targets, in the shape of the lag targets.
fn write_targets(c: &LocalWriteComparison) -> Vec<LagTarget> {
    let base = c.no_delay.as_ref().map(|b| b.p99_ms);
    let mut out = Vec::new();
    for (metric, point, status, label) in [
        ("write_p99_wan", &c.wan, c.wan_status, "links"),
        (
            "write_p99_partition",
            &c.partition,
            c.partition_status,
            "partition",
        ),
    ] {
        let name = match point.as_ref().and_then(|p| p.delay_ms) {
            Some(d) => format!(
                "A's write p99 with {d} ms {label} ≤ {WRITE_P99_RATIO_BOUND} × without delay"
            ),
            None => format!(
                "A's write p99 during the {label} ≤ {WRITE_P99_RATIO_BOUND} × without delay"
            ),
        };
        out.push(LagTarget {
            name,
            metric,
            delay_ms: point.as_ref().and_then(|p| p.delay_ms),
            bound_ms: base.map(|b| b * WRITE_P99_RATIO_BOUND),
            value_ms: point.as_ref().map(|p| p.p99_ms),
            status,
            bucket_ms: None,
            verdict_exact: true,
        });
    }
    out
}

/// What B must have applied for a phase to be complete: its counter at the phase start plus
/// every successful write of the phase. Relative, so that a phase does not depend on the
/// counter's history (earlier phases, warm-ups).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrainGoal {
    pub applied_at_start: f64,
    pub writes: u64,
}

impl DrainGoal {
    pub fn target(&self) -> f64 {
        self.applied_at_start + self.writes as f64
    }

    pub fn reached(&self, applied_now: f64) -> bool {
        applied_now >= self.target()
    }

    /// Changes of the phase B still lacks.
    pub fn remaining(&self, applied_now: f64) -> f64 {
        (self.target() - applied_now).max(0.0)
    }

    /// Changes of the phase B has applied.
    pub fn applied_in_phase(&self, applied_now: f64) -> f64 {
        (applied_now - self.applied_at_start).max(0.0)
    }

    /// The counter counts since B's process start: lower than at the phase start means B
    /// restarted, and the goal means nothing any more.
    pub fn went_back(&self, applied_now: f64) -> bool {
        applied_now < self.applied_at_start
    }
}

/// A plain text grid: a header, a rule, and left-aligned columns.
fn render_grid(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = width.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                s.push_str(" | ");
            }
            s.push_str(c);
            let pad = width
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(c.chars().count());
            s.extend(std::iter::repeat_n(' ', pad));
        }
        s.trim_end().to_string()
    };
    let mut out = line(&mut header.iter().copied());
    out.push('\n');
    out.extend(std::iter::repeat_n(
        '-',
        width.iter().sum::<usize>() + 3 * width.len().saturating_sub(1),
    ));
    out.push('\n');
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.3} ms"))
}

fn fmt_secs(v: Option<f64>, missing: &str) -> String {
    v.map_or_else(|| missing.into(), |v| format!("{v:.3} s"))
}

fn fmt_cores(c: Option<f64>) -> String {
    c.map_or_else(|| "?".into(), |c| format!("{c:.2}"))
}

// ---------------------------------------------------------------------------------------------
// The load

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
    /// Keys are `lag/{key_prefix}/{slot}`: unique across phases, so every write is one change.
    key_prefix: String,
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
    let mut url = String::with_capacity(base.len() + 48);
    loop {
        let slot = sched.next.fetch_add(1, Ordering::Relaxed);
        if slot >= sched.total_slots {
            break;
        }
        let at = sched.at(slot);
        tokio::time::sleep_until(at.into()).await;
        url.clear();
        let _ = write!(url, "{base}/v1/kv/lag/{}/{slot}", sched.key_prefix);
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

/// What every phase needs: the client, the options, both nodes' addresses and processes.
struct Ctx<'a> {
    http: &'a reqwest::Client,
    opts: &'a LagOpts,
    base_a: Arc<str>,
    base_b: String,
    pid_a: Option<u32>,
    pid_b: Option<u32>,
}

/// One run of the open-loop load at A.
struct LoadRun {
    stats: LoadStats,
    /// B's metrics when the measured part began.
    b_at_measure_start: Result<prom::Scrape>,
    /// When the last successful write was answered.
    last_answer: Option<Instant>,
    /// Write tasks that panicked or were cancelled.
    task_failures: Vec<String>,
}

/// Writes `lag/{key_prefix}/{i}` at A at `--rate` with `--workers`: `warmup_secs` unmeasured,
/// then `measure_secs` measured (latency, CPU and commits over that part only).
async fn run_load(ctx: &Ctx<'_>, key_prefix: &str, warmup_secs: u64, measure_secs: u64) -> LoadRun {
    let opts = ctx.opts;
    let warmup_slots = opts.rate * warmup_secs;
    let measured_slots = opts.rate * measure_secs;
    let sched = Arc::new(Schedule {
        t0: Instant::now() + Duration::from_millis(50),
        rate: opts.rate,
        warmup_slots,
        total_slots: warmup_slots + measured_slots,
        next: AtomicU64::new(0),
        key_prefix: key_prefix.to_string(),
    });
    let measure_from = sched.at(warmup_slots);
    let measure_until = sched.at(warmup_slots + measured_slots);
    let tasks: Vec<_> = (0..opts.workers)
        .map(|_| {
            tokio::spawn(worker(
                ctx.http.clone(),
                Arc::clone(&ctx.base_a),
                Arc::clone(&sched),
                opts.value_bytes,
            ))
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let b_at_measure_start = prom::scrape(ctx.http, &ctx.base_b).await;
    let before_a = prom::scrape(ctx.http, &ctx.base_a).await.ok();
    let measure_start = Instant::now();
    let client_cpu = CpuMeter::start(None);
    let cpu_a = ctx.pid_a.map(|p| CpuMeter::start(Some(p)));
    let cpu_b = ctx.pid_b.map(|p| CpuMeter::start(Some(p)));
    let wait_a = ctx.pid_a.map(WaitMeter::start);
    let wait_b = ctx.pid_b.map(WaitMeter::start);
    tokio::time::sleep_until(measure_until.into()).await;
    let client_cpu_cores = client_cpu.cores();
    let node_a_cpu_cores = cpu_a.and_then(|m| m.cores());
    let node_b_cpu_cores = cpu_b.and_then(|m| m.cores());
    let node_a_cpu_wait_cores = wait_a.and_then(|m| m.waiting_cores());
    let node_b_cpu_wait_cores = wait_b.and_then(|m| m.waiting_cores());
    let end_a = prom::scrape(ctx.http, &ctx.base_a).await.ok();
    let end_b = prom::scrape(ctx.http, &ctx.base_b).await.ok();
    let measured_wall_secs = measure_start.elapsed().as_secs_f64();
    let commits = |before: Option<&prom::Scrape>, after: Option<&prom::Scrape>| {
        after.and_then(|a| prom::CommitStats::between(before, a, measured_wall_secs))
    };
    let node_a_commits = commits(before_a.as_ref(), end_a.as_ref());
    let node_b_commits = commits(b_at_measure_start.as_ref().ok(), end_b.as_ref());

    let mut task_failures = Vec::new();
    let mut hist = new_histogram();
    let mut from_schedule = new_histogram();
    let mut send_delay = new_histogram();
    let mut first_errors = Vec::new();
    let (mut ok_measured, mut ok_total, mut errors, mut gave_up, mut late) = (0, 0, 0, 0, 0);
    let mut last_send = None::<Instant>;
    let mut last_answer = None::<Instant>;
    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => {
                task_failures.push(format!("a write worker failed: {e}"));
                continue;
            }
        };
        let _ = hist.add(&r.hist);
        let _ = from_schedule.add(&r.from_schedule);
        let _ = send_delay.add(&r.send_delay);
        ok_measured += r.ok_measured;
        ok_total += r.ok_total;
        errors += r.errors;
        gave_up += u64::from(r.gave_up);
        late += r.late;
        last_send = last_send.max(r.last_measured_send);
        last_answer = last_answer.max(r.last_answer);
        for e in r.first_errors {
            if first_errors.len() < KEEP_ERRORS {
                first_errors.push(e);
            }
        }
    }
    let measured_secs = last_send.map_or(0.0, |t| {
        t.saturating_duration_since(measure_from).as_secs_f64() + 1.0 / opts.rate as f64
    });
    LoadRun {
        stats: LoadStats {
            target_rate: opts.rate,
            workers: opts.workers,
            scheduled: measured_slots,
            writes: ok_measured,
            writes_total: ok_total,
            errors,
            first_errors,
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
        },
        b_at_measure_start,
        last_answer,
        task_failures,
    }
}

/// Polls B's applied counter every 50 ms until `goal` is reached: answers when that was seen,
/// or what went wrong (`what` names the writes, for the message). `first_progress` gets the
/// first poll that saw any change of the phase applied, unless it already holds one.
async fn wait_applied(
    ctx: &Ctx<'_>,
    pair: &mut Pair,
    goal: DrainGoal,
    deadline: Duration,
    what: &str,
    first_progress: &mut Option<Instant>,
) -> std::result::Result<Instant, String> {
    let until = Instant::now() + deadline;
    let mut last_applied = None;
    let mut last_problem = None;
    loop {
        pair.check_alive().map_err(|e| e.to_string())?;
        match prom::scrape(ctx.http, &ctx.base_b).await {
            Ok(s) => {
                let now = applied(&s);
                if goal.went_back(now) {
                    return Err(format!(
                        "{NODE_B}'s {APPLIED_COUNTER} went back from {} to {now} while waiting for \
                         {what}: did {NODE_B} restart?",
                        goal.applied_at_start
                    ));
                }
                let seen = Instant::now();
                if first_progress.is_none() && goal.applied_in_phase(now) > 0.0 {
                    *first_progress = Some(seen);
                }
                if goal.reached(now) {
                    return Ok(seen);
                }
                last_applied = Some(now);
            }
            Err(e) => last_problem = Some(e.to_string()),
        }
        if Instant::now() >= until {
            return Err(format!(
                "{NODE_B} applied {} of the {} changes of {what} within {} s ({} still missing){}",
                last_applied.map_or_else(|| "?".into(), |a| goal.applied_in_phase(a).to_string()),
                goal.writes,
                deadline.as_secs(),
                last_applied.map_or_else(|| "?".into(), |a| goal.remaining(a).to_string()),
                last_problem
                    .map(|p| format!("; last scrape problem: {p}"))
                    .unwrap_or_default()
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Sets the links back to `delay_ms` and waits until B has applied everything of `previous`;
/// then reads B's counter, where the next phase starts.
async fn settle(
    ctx: &Ctx<'_>,
    pair: &mut Pair,
    delay_ms: u64,
    previous: Option<(DrainGoal, String)>,
    failures: &mut Vec<String>,
) -> Result<(Option<f64>, f64)> {
    pair.set_link_delay(delay_ms)?;
    let started = Instant::now();
    let mut settle_secs = Some(0.0);
    if let Some((goal, what)) = previous {
        match wait_applied(ctx, pair, goal, SETTLE_DEADLINE, &what, &mut None).await {
            Ok(at) => settle_secs = Some(at.duration_since(started).as_secs_f64()),
            Err(e) => {
                // The next phase's relative goal starts from whatever B has: it may then be
                // reached early by the previous phase's late changes.
                failures.push(format!("before the {delay_ms} ms phase: {e}"));
                settle_secs = None;
            }
        }
    }
    let at_start = prom::scrape(ctx.http, &ctx.base_b)
        .await
        .map_err(|e| Error::runtime(format!("reading {NODE_B}'s applied counter: {e}")))?;
    Ok((settle_secs, applied(&at_start)))
}

/// One delay phase: set the delay, settle, warm up, measure, drain; the lag from the
/// difference of B's histogram between the measured part's start and the drain.
async fn delay_phase(
    ctx: &Ctx<'_>,
    pair: &mut Pair,
    delay_ms: u64,
    previous: Option<(DrainGoal, String)>,
    failures: &mut Vec<String>,
) -> Result<(DelayPhase, DrainGoal)> {
    let opts = ctx.opts;
    let (settle_secs, applied_at_start) = settle(ctx, pair, delay_ms, previous, failures).await?;
    let links_before = pair.link_counters();
    eprintln!(
        "meridian-bench: lag: {delay_ms} ms one-way: {} writes/s with {} workers, {} s warm-up + \
         {} s measured",
        opts.rate, opts.workers, opts.warmup_secs, opts.duration_secs
    );
    let run = run_load(
        ctx,
        &format!("d{delay_ms}"),
        opts.warmup_secs,
        opts.duration_secs,
    )
    .await;
    failures.extend(run.task_failures.iter().cloned());
    let l = &run.stats;
    if l.errors > 0 {
        failures.push(format!(
            "{delay_ms} ms phase: {} writes to {NODE_A} failed; first: {}",
            l.errors,
            l.first_errors.join(" | ")
        ));
    }
    let goal = DrainGoal {
        applied_at_start,
        writes: l.writes_total,
    };
    let what = format!("the {delay_ms} ms phase");
    let drain_from = run.last_answer.unwrap_or_else(Instant::now);
    let drain_secs = match wait_applied(ctx, pair, goal, DRAIN_DEADLINE, &what, &mut None).await {
        Ok(at) => Some(at.saturating_duration_since(drain_from).as_secs_f64()),
        Err(e) => {
            failures.push(e);
            None
        }
    };
    let after = prom::scrape(ctx.http, &ctx.base_b).await;
    let lag = match (&run.b_at_measure_start, &after) {
        (Ok(before), Ok(after)) => lag_stats(before, after, delay_ms, failures),
        (Err(e), _) | (_, Err(e)) => {
            failures.push(format!(
                "{delay_ms} ms phase: scraping {NODE_B}'s metrics: {e}"
            ));
            None
        }
    };
    let links = match (pair.link_counters(), links_before) {
        (Some(after), Some(before)) => Some(after.since(&before)),
        _ => None,
    };
    if links.is_some_and(|c| c.dropped_queue_full > 0) {
        failures.push(format!(
            "{delay_ms} ms phase: the link emulator dropped datagrams because a delay queue was \
             full: the lag figures include retransmissions"
        ));
    }
    eprintln!(
        "meridian-bench: lag: {delay_ms} ms one-way: lag p50 {} p99 {}, A's write p99 {:.3} ms, \
         {} errors, drained in {}",
        fmt_ms(lag.as_ref().and_then(|g| g.p50_ms)),
        fmt_ms(lag.as_ref().and_then(|g| g.p99_ms)),
        run.stats.write_latency.p99_ms,
        run.stats.errors,
        fmt_secs(drain_secs, "(not drained)")
    );
    Ok((
        DelayPhase {
            delay_ms,
            settle_secs,
            applied_at_start,
            lag,
            drain_secs,
            links,
            load: run.stats,
        },
        goal,
    ))
}

/// The partition: delay back to 0, cut both links, the same load at A for `--partition-secs`
/// (every write must succeed: A commits locally), heal, and time B's catch-up.
async fn partition_phase(
    ctx: &Ctx<'_>,
    pair: &mut Pair,
    previous: Option<(DrainGoal, String)>,
    failures: &mut Vec<String>,
) -> Result<PartitionPhase> {
    let secs = ctx.opts.partition_secs;
    let (settle_secs, applied_at_start) = settle(ctx, pair, 0, previous, failures).await?;
    let links_before = pair.link_counters();
    eprintln!(
        "meridian-bench: lag: partition: both links cut; {} writes/s at {NODE_A} for {secs} s",
        ctx.opts.rate
    );
    pair.set_links_down(true)?;
    let run = run_load(ctx, "partition", 0, secs).await;
    let at_heal = prom::scrape(ctx.http, &ctx.base_b).await;
    let links_while_cut = match (pair.link_counters(), links_before) {
        (Some(after), Some(before)) => Some(after.since(&before)),
        _ => None,
    };
    pair.set_links_down(false)?;
    let healed = Instant::now();
    failures.extend(run.task_failures.iter().cloned());
    let l = &run.stats;
    if l.errors > 0 {
        failures.push(format!(
            "partition: {} writes to {NODE_A} failed while the links were cut (local writes must \
             not depend on the peer); first: {}",
            l.errors,
            l.first_errors.join(" | ")
        ));
    }
    let goal = DrainGoal {
        applied_at_start,
        writes: l.writes_total,
    };
    let applied_while_cut = match &at_heal {
        Ok(s) => Some(goal.applied_in_phase(applied(s))),
        Err(e) => {
            failures.push(format!(
                "partition: scraping {NODE_B}'s metrics at the heal: {e}"
            ));
            None
        }
    };
    if let Some(n) = applied_while_cut.filter(|n| *n > 0.0) {
        failures.push(format!(
            "partition: {NODE_B} applied {n} changes while both links were down: the cut did not \
             hold"
        ));
    }
    eprintln!(
        "meridian-bench: lag: partition healed; waiting for {NODE_B} to apply the {} writes made \
         meanwhile",
        l.writes_total
    );
    let mut first_progress = None;
    let catchup_secs = match wait_applied(
        ctx,
        pair,
        goal,
        CATCHUP_DEADLINE,
        "the partition (after the heal)",
        &mut first_progress,
    )
    .await
    {
        Ok(at) => Some(at.saturating_duration_since(healed).as_secs_f64()),
        Err(e) => {
            failures.push(e);
            None
        }
    };
    Ok(PartitionPhase {
        partition_secs: secs,
        settle_secs,
        applied_at_start,
        applied_while_cut,
        backlog: l.writes_total,
        catchup_secs,
        first_applied_secs: first_progress
            .map(|t| t.saturating_duration_since(healed).as_secs_f64()),
        catchup_changes_per_sec: catchup_secs
            .filter(|s| *s > 0.0)
            .map(|s| l.writes_total as f64 / s),
        catchup_deadline_secs: CATCHUP_DEADLINE.as_secs(),
        links_while_cut,
        load: run.stats,
    })
}

fn latency_point(phase: String, delay_ms: Option<u64>, l: &LoadStats) -> WriteLatencyPoint {
    WriteLatencyPoint {
        phase,
        delay_ms,
        p50_ms: l.write_latency.p50_ms,
        p99_ms: l.write_latency.p99_ms,
        p999_ms: l.write_latency.p999_ms,
        errors: l.errors,
    }
}

pub async fn run(common: &CommonArgs, opts: &LagOpts) -> Result<LagReport> {
    let started = Instant::now();
    let machine = Machine::collect();
    if common.target.is_some() {
        return Err(Error::usage(
            "lag starts its own two nodes; it cannot run against --target",
        ));
    }
    if opts.delays_ms.is_empty() && opts.partition_secs == 0 {
        return Err(Error::usage(
            "lag: nothing to run: --delays-ms is empty and --partition-secs is 0",
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
    notes.extend(env.disk.setup_notes());

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

    eprintln!("meridian-bench: lag: starting {NODE_A} and {NODE_B}, linked through the emulator");
    let pair = env.start_pair_with(&http, "lag", true).await?;
    eprintln!(
        "meridian-bench: lag: both nodes ready after {:.2} s, replication connected {:.2} s later",
        pair.ready_secs, pair.connect_secs
    );
    let ctx = Ctx {
        http: &http,
        opts,
        base_a: Arc::from(pair.a.api_url.as_str()),
        base_b: pair.b.api_url.clone(),
        pid_a: pair.a.pid(),
        pid_b: pair.b.pid(),
    };

    let mut phases = Vec::new();
    let mut previous: Option<(DrainGoal, String)> = None;
    let mut stopped = false;
    for &delay_ms in &opts.delays_ms {
        match delay_phase(&ctx, pair, delay_ms, previous.take(), &mut failures).await {
            Ok((phase, goal)) => {
                previous = Some((goal, format!("the {delay_ms} ms phase")));
                phases.push(phase);
            }
            Err(e) => {
                failures.push(format!("the {delay_ms} ms phase stopped: {e}"));
                stopped = true;
                break;
            }
        }
    }
    let partition = if opts.partition_secs > 0 && !stopped {
        match partition_phase(&ctx, pair, previous.take(), &mut failures).await {
            Ok(p) => Some(p),
            Err(e) => {
                failures.push(format!("the partition phase stopped: {e}"));
                // Whatever happened, the nodes must not stay cut for the rest of the run.
                if let Err(e) = pair.set_links_down(false) {
                    failures.push(format!("healing the links: {e}"));
                }
                None
            }
        }
    } else {
        None
    };
    if let Err(e) = pair.check_alive() {
        failures.push(e.to_string());
    }

    let points: Vec<(u64, WriteLatencyPoint)> = phases
        .iter()
        .map(|p| {
            (
                p.delay_ms,
                latency_point(
                    format!("{} ms links", p.delay_ms),
                    Some(p.delay_ms),
                    &p.load,
                ),
            )
        })
        .collect();
    let local_write_comparison = compare_local_writes(
        &points,
        partition
            .as_ref()
            .map(|p| latency_point(format!("{} s cut", p.partition_secs), None, &p.load)),
    );
    let mut targets: Vec<LagTarget> = phases
        .iter()
        .flat_map(|p| lag_targets(p.delay_ms, p.lag.as_ref()))
        .collect();
    targets.extend(write_targets(&local_write_comparison));

    for p in &phases {
        if p.load.achieved_rate < 0.95 * opts.rate as f64 {
            notes.push(format!(
                "{} ms phase: the achieved rate ({} writes/s) is below 95 % of the target rate: A \
                 could not keep up with {} requests in flight",
                p.delay_ms,
                thousands(p.load.achieved_rate),
                opts.workers
            ));
        }
    }
    if targets.iter().any(|t| !t.verdict_exact) {
        notes.push(
            "a verdict marked \"within bucket\" rests on linear interpolation inside one \
             histogram bucket (the bound lies inside the range that bucket's changes can \
             lie in): the node's lag buckets are 25 % wide, e.g. 150–158 ms above a 150 ms floor"
                .into(),
        );
    }
    notes.push(
        "lag = per change, from its HLC stamp at A (before A's durable commit) to its durable \
         application at B: A's commit, the delayed transfer and B's commit; both nodes read the \
         same clock. Quantiles are interpolated within the node's histogram buckets, whose lower \
         bound is raised to the floor (the injected delay): no change arrives sooner. The two \
         scrapes also count warm-up changes still in flight at the first one"
            .into(),
    );
    notes.push(format!(
        "both nodes, this client and the link emulator (in this process) share the machine's {} \
         core(s)",
        machine.nproc
    ));
    if partition.is_some() {
        notes.push(
            "a cut longer than the nodes' 10 s QUIC idle timeout ends their links: WARN lines \
             about a lost connection or a failed redial in the node logs are expected then"
                .into(),
        );
    }

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
        phases,
        partition,
        local_write_comparison,
        targets,
        wall_secs: started.elapsed().as_secs_f64(),
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
    delay_ms: u64,
    failures: &mut Vec<String>,
) -> Option<LagStats> {
    let filter = [("peer_region", REGION_A)];
    let Some(after_h) = after.histogram(LAG_HISTOGRAM, &filter) else {
        failures.push(format!(
            "{NODE_B}'s /metrics has no {LAG_HISTOGRAM}{{peer_region=\"{REGION_A}\"}}: is the node \
             binary older than that histogram?"
        ));
        return None;
    };
    let before_h = before.histogram(LAG_HISTOGRAM, &filter);
    let d: Buckets = match after_h.since(before_h.as_ref()) {
        Ok(d) => d,
        Err(e) => {
            failures.push(format!("{delay_ms} ms phase: {e}"));
            return None;
        }
    };
    let floor_s = delay_ms as f64 / 1000.0;
    let q = |p: f64| quantile_with_floor(&d, p, floor_s);
    let (p50, p99, p999) = (q(0.50), q(0.99), q(0.999));
    let within_ms = delay_ms as f64 + LAG_P99_MARGIN_MS;
    let mut per_bucket = Vec::new();
    let mut prev = 0.0;
    for &(le, cum) in &d.buckets {
        if cum > prev {
            per_bucket.push((le, cum - prev));
        }
        prev = cum;
    }
    Some(LagStats {
        samples: d.total() as u64,
        floor_ms: delay_ms as f64,
        p50_ms: p50.map(|q| q.value_ms),
        p99_ms: p99.map(|q| q.value_ms),
        p999_ms: p999.map(|q| q.value_ms),
        mean_ms: (d.count > 0.0).then(|| d.sum / d.count * 1000.0),
        p50,
        p99,
        p999,
        max_bucket_ms: d.max_bucket_bound().map(|b| b * 1000.0),
        within_ms,
        fraction_within: fraction_within_with_floor(&d, within_ms / 1000.0, floor_s),
        bucket_growth: d.growth(),
        method: "difference of two scrapes of B's histogram; quantiles linearly interpolated \
                 within a bucket (bounds grow by 25 %, from 100 µs), its lower bound raised to \
                 the injected delay",
        applied_before: applied(before),
        applied_after: applied(after),
        buckets: per_bucket,
    })
}

// ---------------------------------------------------------------------------------------------
// The report

fn verdict(status: &str, exact: bool) -> String {
    if exact || status == "n/a" {
        status.to_string()
    } else {
        format!("{status} (within bucket)")
    }
}

impl LagReport {
    /// One line per delay: the lag against its floor and targets.
    pub fn lag_grid(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .phases
            .iter()
            .map(|p| {
                let find = |metric: &str| {
                    self.targets
                        .iter()
                        .find(|t| t.metric == metric && t.delay_ms == Some(p.delay_ms))
                        .map_or_else(|| "n/a".into(), |t| verdict(t.status, t.verdict_exact))
                };
                let g = p.lag.as_ref();
                let q = |q: Option<LagQuantile>| {
                    q.map_or_else(
                        || "n/a".into(),
                        |q| {
                            if q.above_last_bound {
                                format!("> {:.1}", q.low_ms)
                            } else {
                                format!("{:.1} ({:.1}–{:.1})", q.value_ms, q.low_ms, q.high_ms)
                            }
                        },
                    )
                };
                vec![
                    format!("{} ms", p.delay_ms),
                    q(g.and_then(|g| g.p50)),
                    q(g.and_then(|g| g.p99)),
                    q(g.and_then(|g| g.p999)),
                    g.and_then(|g| g.mean_ms)
                        .map_or_else(|| "n/a".into(), |m| format!("{m:.1}")),
                    g.and_then(|g| g.fraction_within)
                        .map_or_else(|| "n/a".into(), |f| format!("{:.2} %", f * 100.0)),
                    format!(
                        "≤ {:.0}: {}",
                        p.delay_ms as f64 + LAG_P50_MARGIN_MS,
                        find("lag_p50")
                    ),
                    format!(
                        "≤ {:.0}: {}",
                        p.delay_ms as f64 + LAG_P99_MARGIN_MS,
                        find("lag_p99")
                    ),
                    g.map_or_else(|| "n/a".into(), |g| g.samples.to_string()),
                    fmt_secs(p.drain_secs, "not drained"),
                ]
            })
            .collect();
        render_grid(
            &[
                "one-way delay (= floor)",
                "lag p50 ms (bucket)",
                "lag p99 ms (bucket)",
                "lag p999 ms (bucket)",
                "mean ms",
                "≤ delay+20 ms",
                "p50 target ms",
                "p99 target ms",
                "changes",
                "drain",
            ],
            &rows,
        )
    }

    /// One line per phase: the load at A.
    pub fn write_grid(&self) -> String {
        let row = |name: String, l: &LoadStats| {
            vec![
                name,
                format!("{:.3}", l.write_latency.p50_ms),
                format!("{:.3}", l.write_latency.p99_ms),
                format!("{:.3}", l.write_latency.p999_ms),
                format!("{:.3}", l.write_latency.max_ms),
                format!(
                    "{} / {}",
                    thousands(l.achieved_rate),
                    thousands(l.target_rate as f64)
                ),
                format!("{} of {}", l.writes, l.scheduled),
                l.errors.to_string(),
                format!(
                    "{} / {} / {}",
                    fmt_cores(l.node_a_cpu_cores),
                    fmt_cores(l.node_b_cpu_cores),
                    fmt_cores(l.client_cpu_cores)
                ),
            ]
        };
        let mut rows: Vec<Vec<String>> = self
            .phases
            .iter()
            .map(|p| row(format!("{} ms links", p.delay_ms), &p.load))
            .collect();
        if let Some(p) = &self.partition {
            rows.push(row("partition".into(), &p.load));
        }
        render_grid(
            &[
                "A's writes",
                "p50 ms",
                "p99 ms",
                "p999 ms",
                "max ms",
                "writes/s achieved / target",
                "measured writes",
                "errors",
                "cpu A / B / client",
            ],
            &rows,
        )
    }

    /// A's local write latency: no delay, WAN delay, partition.
    pub fn comparison_grid(&self) -> String {
        let c = &self.local_write_comparison;
        let row = |name: &str, p: &Option<WriteLatencyPoint>, ratio: Option<f64>, status: &str| {
            let ratio_text = ratio.map_or_else(|| "n/a".into(), |r| format!("{r:.2}"));
            match p {
                Some(p) => vec![
                    format!("{name} ({})", p.phase),
                    format!("{:.3}", p.p50_ms),
                    format!("{:.3}", p.p99_ms),
                    ratio_text,
                    if status.is_empty() {
                        String::new()
                    } else {
                        format!("≤ {WRITE_P99_RATIO_BOUND}: {status}")
                    },
                ],
                None => vec![
                    name.to_string(),
                    "n/a".into(),
                    "n/a".into(),
                    "n/a".into(),
                    String::new(),
                ],
            }
        };
        let rows = vec![
            row(
                "no delay",
                &c.no_delay,
                c.no_delay.as_ref().map(|_| 1.0),
                "",
            ),
            row("WAN delay", &c.wan, c.wan_p99_ratio, c.wan_status),
            row(
                "during partition",
                &c.partition,
                c.partition_p99_ratio,
                c.partition_status,
            ),
        ];
        render_grid(
            &[
                "A's write latency",
                "p50 ms",
                "p99 ms",
                "p99 / no-delay p99",
                "target",
            ],
            &rows,
        )
    }

    /// Everything else, one row per figure.
    pub fn table(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(f) = &self.fsync_floor {
            rows.extend(f.rows());
        }
        for p in &self.phases {
            let name = format!("{} ms links", p.delay_ms);
            let name = name.as_str();
            rows.push(Row::new(
                name,
                "settle",
                fmt_secs(p.settle_secs, "did not settle"),
                String::new(),
            ));
            load_rows(&mut rows, name, &p.load);
            if let Some(g) = &p.lag {
                rows.push(Row::new(
                    name,
                    "lag max bucket",
                    g.max_bucket_ms
                        .map_or_else(|| "n/a".into(), |m| format!("≤ {m:.3} ms")),
                    String::new(),
                ));
            }
            if let Some(c) = &p.links {
                rows.push(Row::new(
                    name,
                    "emulator datagrams",
                    format!(
                        "{} forwarded, {} dropped (queue full)",
                        c.forwarded, c.dropped_queue_full
                    ),
                    "0 dropped".into(),
                ));
            }
        }
        if let Some(p) = &self.partition {
            let name = format!("partition ({} s)", p.partition_secs);
            let name = name.as_str();
            load_rows(&mut rows, name, &p.load);
            rows.push(Row::new(
                name,
                "applied at B while cut",
                p.applied_while_cut
                    .map_or_else(|| "?".into(), |n| format!("{n}")),
                "0".into(),
            ));
            if let Some(c) = &p.links_while_cut {
                rows.push(Row::new(
                    name,
                    "emulator datagrams while cut",
                    format!(
                        "{} dropped (down), {} forwarded",
                        c.dropped_down, c.forwarded
                    ),
                    String::new(),
                ));
            }
            rows.push(Row::new(
                name,
                "backlog at the heal",
                format!("{} changes", p.backlog),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "first change applied after the heal",
                fmt_secs(p.first_applied_secs, "never"),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "catch-up after the heal",
                match (p.catchup_secs, p.catchup_changes_per_sec) {
                    (Some(s), Some(r)) => {
                        format!("{s:.3} s ({} changes/s)", thousands(r))
                    }
                    (Some(s), None) => format!("{s:.3} s"),
                    _ => format!("not within {} s", p.catchup_deadline_secs),
                },
                format!("≤ {} s", p.catchup_deadline_secs),
            ));
        }
        rows
    }
}

/// The per-phase details of the load at A that the grids leave out.
fn load_rows(rows: &mut Vec<Row>, name: &str, l: &LoadStats) {
    rows.push(Row::new(
        name,
        "A's write latency p99 from schedule",
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
    rows.push(Row::new(
        name,
        "waiting for a cpu (cores)",
        format!(
            "A {}, B {}",
            fmt_cores(l.node_a_cpu_wait_cores),
            fmt_cores(l.node_b_cpu_wait_cores)
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

/// Prints the tables and the context, writes `lag.json`; returns the failures.
pub fn publish(report: &LagReport, out_dir: &std::path::Path) -> Result<Vec<String>> {
    let mut text = report::pair_header("lag", &report.machine, &report.setup);
    if !report.phases.is_empty() {
        let _ = writeln!(
            text,
            "Replication lag A→B at {} writes/s (B's histogram; ms; floor = the injected one-way delay):",
            thousands(report.config.rate as f64)
        );
        text.push_str(&report.lag_grid());
        text.push('\n');
    }
    text.push_str(&report.write_grid());
    text.push('\n');
    text.push_str(&report.comparison_grid());
    text.push('\n');
    text.push_str(&report::render_table(&report.table()));
    for t in &report.targets {
        let _ = writeln!(
            text,
            "target: {}: {} (value {}, bound {})",
            t.name,
            verdict(t.status, t.verdict_exact),
            fmt_ms(t.value_ms),
            fmt_ms(t.bound_ms)
        );
    }
    for n in &report.notes {
        let _ = writeln!(text, "note: {n}");
    }
    text.push_str(&log_notes(&report.node_logs));
    for f in &report.failures {
        let _ = writeln!(text, "FAILED: {f}");
    }
    let _ = writeln!(text, "wall time: {:.1} s", report.wall_secs);
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
    report::scenario_result("lag", &failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets 0.1 ms × 1.25^n like the node's, with `counts[i]` changes in bucket `i`.
    fn node_buckets(counts: &[(usize, f64)]) -> Buckets {
        let mut buckets = Vec::new();
        let mut cum = 0.0;
        let mut sum = 0.0;
        for n in 0..61 {
            let le = 0.000_1 * 1.25_f64.powi(n as i32);
            if let Some((_, c)) = counts.iter().find(|(i, _)| *i == n) {
                cum += c;
                sum += c * le;
            }
            buckets.push((le, cum));
        }
        buckets.push((f64::INFINITY, cum));
        Buckets {
            buckets,
            sum,
            count: cum,
        }
    }

    #[test]
    fn quantiles_never_fall_below_the_floor() {
        // All 100 changes in bucket 33: (126.2, 157.8] ms, with a 150 ms floor.
        let d = node_buckets(&[(33, 100.0)]);
        let plain = d.quantile(0.5).expect("observations").value * 1000.0;
        assert!(plain < 150.0, "plain interpolation gives {plain}");
        let q = quantile_with_floor(&d, 0.5, 0.150).expect("observations");
        assert!((q.low_ms - 150.0).abs() < 1e-9);
        assert!((q.high_ms - 157.772).abs() < 1e-2, "{q:?}");
        assert!((q.value_ms - (150.0 + (q.high_ms - 150.0) / 2.0)).abs() < 1e-9);
        // Without delay the floor changes nothing.
        let q0 = quantile_with_floor(&d, 0.5, 0.0).expect("observations");
        assert!((q0.value_ms - plain).abs() < 1e-9);
        // A bucket wholly below the floor keeps its own bounds.
        let low = node_buckets(&[(10, 1.0)]);
        let q = quantile_with_floor(&low, 0.5, 0.150).expect("observations");
        assert!(q.high_ms < 150.0 && q.value_ms < q.high_ms);
        // Above the last bound.
        let mut inf = node_buckets(&[]);
        if let Some(last) = inf.buckets.last_mut() {
            last.1 = 3.0;
        }
        let q = quantile_with_floor(&inf, 0.99, 0.0).expect("observations");
        assert!(q.above_last_bound);
        assert!(quantile_with_floor(&node_buckets(&[]), 0.5, 0.0).is_none());
    }

    #[test]
    fn fraction_within_respects_the_floor() {
        let d = node_buckets(&[(33, 50.0), (34, 50.0)]);
        // 170 ms: all of bucket 33 and part of bucket 34 (157.8, 197.2].
        let f = fraction_within_with_floor(&d, 0.170, 0.150).expect("observations");
        let part = (170.0 - 157.772) / (197.215 - 157.772);
        assert!((f - (0.5 + 0.5 * part)).abs() < 1e-3, "{f}");
        // Below the floor nothing can lie.
        assert_eq!(fraction_within_with_floor(&d, 0.149, 0.150), Some(0.0));
        assert_eq!(fraction_within_with_floor(&d, 10.0, 0.150), Some(1.0));
        assert_eq!(
            fraction_within_with_floor(&node_buckets(&[]), 0.1, 0.0),
            None
        );
    }

    fn quantile(value_ms: f64, low_ms: f64, high_ms: f64) -> LagQuantile {
        LagQuantile {
            value_ms,
            low_ms,
            high_ms,
            above_last_bound: false,
        }
    }

    #[test]
    fn verdicts_per_delay() {
        assert_eq!(
            judge_quantile(Some(&quantile(11.0, 10.8, 13.5)), 13.0),
            ("PASS", false)
        );
        assert_eq!(
            judge_quantile(Some(&quantile(12.0, 10.0, 12.9)), 13.0),
            ("PASS", true)
        );
        assert_eq!(
            judge_quantile(Some(&quantile(154.0, 150.0, 157.8)), 153.0),
            ("MISS", false)
        );
        assert_eq!(
            judge_quantile(Some(&quantile(60.0, 51.7, 64.6)), 43.0),
            ("MISS", true)
        );
        assert_eq!(judge_quantile(None, 3.0), ("n/a", true));
        let inf = LagQuantile {
            value_ms: 70_000.0,
            low_ms: 70_000.0,
            high_ms: f64::INFINITY,
            above_last_bound: true,
        };
        assert_eq!(judge_quantile(Some(&inf), 1e9), ("MISS", true));

        let d = node_buckets(&[(22, 90.0), (24, 10.0)]);
        let lag = LagStats {
            samples: 100,
            floor_ms: 10.0,
            p50_ms: None,
            p99_ms: None,
            p999_ms: None,
            mean_ms: None,
            p50: quantile_with_floor(&d, 0.5, 0.010),
            p99: quantile_with_floor(&d, 0.99, 0.010),
            p999: None,
            max_bucket_ms: None,
            within_ms: 30.0,
            fraction_within: None,
            bucket_growth: None,
            method: "",
            applied_before: 0.0,
            applied_after: 0.0,
            buckets: Vec::new(),
        };
        let t = lag_targets(10, Some(&lag));
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].metric, "lag_p50");
        assert_eq!(t[0].bound_ms, Some(13.0));
        // p50 in (10.84, 13.55]: interpolated to about 12.3.
        assert_eq!(t[0].status, "PASS");
        assert!(!t[0].verdict_exact);
        assert_eq!(t[1].bound_ms, Some(30.0));
        // p99 in (16.9, 21.2]: wholly below 30.
        assert_eq!((t[1].status, t[1].verdict_exact), ("PASS", true));
        let none = lag_targets(40, None);
        assert!(
            none.iter()
                .all(|t| t.status == "n/a" && t.value_ms.is_none())
        );
        assert_eq!(none[1].bound_ms, Some(60.0));
    }

    fn point(delay_ms: Option<u64>, p99_ms: f64) -> WriteLatencyPoint {
        WriteLatencyPoint {
            phase: String::new(),
            delay_ms,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            p999_ms: p99_ms * 2.0,
            errors: 0,
        }
    }

    #[test]
    fn local_write_comparison() {
        assert_eq!(p99_ratio(2.0, 2.4, 1.2).1, "PASS");
        assert_eq!(p99_ratio(2.0, 2.5, 1.2), (Some(1.25), "MISS"));
        assert_eq!(p99_ratio(0.0, 2.5, 1.2), (None, "n/a"));
        let phases = vec![
            (0, point(Some(0), 2.0)),
            (40, point(Some(40), 2.1)),
            (150, point(Some(150), 2.6)),
            (75, point(Some(75), 9.0)),
        ];
        let c = compare_local_writes(&phases, Some(point(None, 2.2)));
        assert_eq!(c.wan.as_ref().and_then(|p| p.delay_ms), Some(150));
        assert_eq!(c.wan_status, "MISS");
        assert!((c.wan_p99_ratio.expect("ratio") - 1.3).abs() < 1e-9);
        assert_eq!(c.partition_status, "PASS");
        let t = write_targets(&c);
        assert_eq!(t[0].metric, "write_p99_wan");
        assert!((t[0].bound_ms.expect("bound") - 2.4).abs() < 1e-9);
        assert_eq!(t[1].status, "PASS");
        // Without 150 ms the longest delay stands in; without 0 there is no baseline.
        let c = compare_local_writes(&phases[1..2], None);
        assert_eq!(c.wan.as_ref().and_then(|p| p.delay_ms), Some(40));
        assert_eq!((c.wan_status, c.partition_status), ("n/a", "n/a"));
        let c = compare_local_writes(
            &[(0, point(Some(0), 2.0)), (75, point(Some(75), 2.0))],
            None,
        );
        assert_eq!(c.wan.as_ref().and_then(|p| p.delay_ms), Some(75));
        assert_eq!(c.wan_status, "PASS");
    }

    #[test]
    fn drain_is_relative_to_the_phase_start() {
        // B had applied 12,000 changes of earlier phases when this phase began.
        let g = DrainGoal {
            applied_at_start: 12_000.0,
            writes: 12_000,
        };
        assert_eq!(g.target(), 24_000.0);
        assert!(!g.reached(23_999.0));
        assert!(g.reached(24_000.0));
        assert_eq!(g.remaining(20_000.0), 4_000.0);
        assert_eq!(g.remaining(25_000.0), 0.0);
        assert_eq!(g.applied_in_phase(20_000.0), 8_000.0);
        assert!(g.went_back(11_999.0));
        assert!(!g.went_back(12_000.0));
        // A phase with no successful writes is drained at once.
        let empty = DrainGoal {
            applied_at_start: 5.0,
            writes: 0,
        };
        assert!(empty.reached(5.0));
    }

    #[test]
    fn grid_aligns_columns() {
        let g = render_grid(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        let lines: Vec<&str> = g.lines().collect();
        assert_eq!(lines, ["a   | bb", "--------", "xxx | y"]);
    }

    #[test]
    fn options_parse_delays() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            lag: LagOpts,
        }
        let d = Cli::try_parse_from(["x"]).expect("defaults");
        assert_eq!(d.lag.delays_ms, DEFAULT_DELAYS_MS);
        assert_eq!(d.lag.duration_secs, LagOpts::default().duration_secs);
        assert_eq!(d.lag.partition_secs, LagOpts::default().partition_secs);
        let c = Cli::try_parse_from(["x", "--delays-ms", "5,20", "--partition-secs", "0"])
            .expect("valid");
        assert_eq!(c.lag.delays_ms, [5, 20]);
        assert_eq!(c.lag.partition_secs, 0);
        assert!(Cli::try_parse_from(["x", "--delays-ms", "70000"]).is_err());
    }
}
