//! The `scale` scenario (issue 6): what a write costs as the key space and the number of
//! regions grow, what a record costs in memory and on disk, and what a replicated write costs
//! on the wire.
//!
//! Three phases, each with its own node(s) in its own subdirectory of the data directory:
//! 1. `keyspace`: one node is loaded with unique records up to each checkpoint (10k, 100k,
//!    1M); at each, its RSS and bytes on disk per record, the 1-client latency of inserts and
//!    of updates, and the throughput at N clients.
//! 2. `regions`: a cluster of 2..=`--regions-max` nodes, one per region, all connected; write
//!    latency and throughput at node 0, its CPU, and when the last write shows on every node.
//! 3. `wire`: two nodes whose peer links both go through the in-process link emulator; the
//!    UDP bytes and datagrams per replicated write, minus an idle baseline.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use meridian_emulator::{CounterSnapshot, Emulator, EmulatorOptions, LinkInfo, LinkSpec};
use serde::Serialize;

use crate::CommonArgs;
use crate::cluster::{CONNECT_DEADLINE, LogProblems, log_problems};
use crate::cpu::{CpuMeter, WaitMeter};
use crate::error::{Context, Error, Result};
use crate::http::{self, make_body};
use crate::lag::{APPLIED_COUNTER, TargetResult};
use crate::node::{
    self, NodeConfig, NodeGuard, NodeSpec, TopologyNode, cluster_toml, free_port_pairs, log_tail,
};
use crate::prom;
use crate::report::{self, Machine, Row, thousands};
use crate::setup::{BenchEnv, DiskInfo};
use crate::stats::{LatencyMs, MAX_ERRORS_PER_CLIENT, micros, new_histogram};

/// Target: resident memory of one node holding this many records of ~200 bytes.
const RSS_TARGET_BYTES: u64 = 200 * 1024 * 1024;
const RSS_TARGET_RECORDS: u64 = 1_000_000;
/// Unmeasured writes before each 1-client latency run (connection set-up, first pages).
const LATENCY_WARMUP: u64 = 20;
/// How often the node's RSS is sampled while loading.
const RSS_SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How long replication may take to bring a write to every node.
const VISIBLE_DEADLINE: Duration = Duration::from_secs(120);
const VISIBLE_POLL: Duration = Duration::from_millis(5);
/// After the last write has been applied at B, time for B's acknowledgements to flow back.
const ACK_SETTLE: Duration = Duration::from_secs(1);
/// After the wire cluster connects, time for the handshakes and first exchanges to finish.
const WIRE_SETTLE: Duration = Duration::from_secs(2);
const MAX_LATENCY_ERRORS: u64 = 100;
const KEEP_ERRORS: usize = 3;
const KEY_PREFIX: &str = "scale";
const MIB: f64 = 1024.0 * 1024.0;

/// A phase of the scenario.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// One node, growing record count
    Keyspace,
    /// 2..=N nodes, one per region
    Regions,
    /// Bytes on the wire per replicated write
    Wire,
}

#[derive(Args, Clone, Debug, Serialize)]
#[command(next_help_heading = "Scale scenario")]
pub struct ScaleOpts {
    /// Record counts at which the single node is measured, ascending
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', default_value = "10000,100000,1000000", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoints: Vec<u64>,

    /// Concurrent clients loading records (and writing the wire phase's records)
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub load_clients: u64,

    /// Measured sequential writes at one client, per kind (inserts, updates)
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub latency_writes: u64,

    /// Most seconds spent loading records, all checkpoints together; a checkpoint not reached
    /// by then is measured where the load stopped, and the later ones are skipped
    #[arg(long, value_name = "SECS", default_value_t = 360, value_parser = clap::value_parser!(u64).range(1..))]
    pub load_budget_secs: u64,

    /// Concurrent clients of each throughput run
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub tput_clients: u64,

    /// Seconds of each throughput run (new keys; no warm-up)
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub tput_secs: u64,

    /// Largest cluster of the regions phase: 2, 3, … up to this many nodes, one per region
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..=26))]
    pub regions_max: u64,

    /// Records written at A in the wire phase
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub wire_writes: u64,

    /// Size of each written JSON object, in bytes (approximately)
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    pub value_bytes: usize,

    /// Phases to run
    #[arg(
        long,
        value_name = "PHASE[,PHASE...]",
        value_enum,
        value_delimiter = ',',
        default_value = "keyspace,regions,wire"
    )]
    pub phases: Vec<Phase>,
}

impl Default for ScaleOpts {
    fn default() -> Self {
        ScaleOpts {
            checkpoints: vec![10_000, 100_000, 1_000_000],
            load_clients: 64,
            load_budget_secs: 360,
            latency_writes: 1000,
            tput_clients: 64,
            tput_secs: 5,
            regions_max: 5,
            wire_writes: 10_000,
            value_bytes: 200,
            phases: vec![Phase::Keyspace, Phase::Regions, Phase::Wire],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

/// Sequential writes at one client.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRun {
    /// "insert" (new keys) or "update" (PUT of a random existing key).
    pub kind: &'static str,
    pub warmup_writes: u64,
    pub writes: u64,
    pub errors: u64,
    #[serde(flatten)]
    pub latency: LatencyMs,
}

/// Concurrent writes of new keys.
#[derive(Debug, Clone, Serialize)]
pub struct WriteRun {
    pub clients: u64,
    pub writes: u64,
    pub errors: u64,
    pub clients_gave_up: u64,
    pub secs: f64,
    pub writes_per_sec: f64,
    /// CPU of the node written to, in cores (1.00 = one core busy).
    pub node_cpu_cores: Option<f64>,
    /// Time the node's threads were runnable but waited for a CPU, per wall second.
    pub node_cpu_wait_cores: Option<f64>,
    pub client_cpu_cores: Option<f64>,
    #[serde(flatten)]
    pub latency: LatencyMs,
}

/// From `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryStats {
    pub rss_bytes: u64,
    /// Peak RSS so far.
    pub hwm_bytes: Option<u64>,
    pub rss_anon_bytes: Option<u64>,
    /// File-backed pages mapped (memory-mapped files count here).
    pub rss_file_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DiskUsage {
    pub files: u64,
    /// Sum of file sizes (what `ls` shows).
    pub file_bytes: u64,
    /// Blocks allocated (what `du` shows): `blocks() * 512`.
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RssPoint {
    pub secs: f64,
    pub records_written: u64,
    pub rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Checkpoint {
    /// The configured checkpoint.
    pub checkpoint: u64,
    /// Records the node holds (its `/v1/status` `records_stored`; else the successful writes).
    pub records: u64,
    pub records_stored_by_node: Option<u64>,
    /// False when the load budget ran out first: `records` is then below `checkpoint`.
    pub reached: bool,
    /// The node's `meridian_cached_documents` gauge: record documents held in memory.
    pub cached_documents: Option<f64>,
    /// Loading from the previous checkpoint's end to this one (None when nothing was needed).
    pub load_from_records: u64,
    pub load: Option<WriteRun>,
    pub memory: Option<MemoryStats>,
    pub rss_bytes_per_record: Option<f64>,
    /// (RSS − RSS of the empty node) / records.
    pub rss_marginal_bytes_per_record: Option<f64>,
    pub hwm_bytes_per_record: Option<f64>,
    pub disk: Option<DiskUsage>,
    pub disk_file_bytes_per_record: Option<f64>,
    pub disk_allocated_bytes_per_record: Option<f64>,
    pub insert_1_client: LatencyRun,
    pub update_1_client: LatencyRun,
    pub throughput: WriteRun,
    /// Records written after the throughput run (it writes new keys).
    pub records_written_after: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyspaceStats {
    pub data_dir: PathBuf,
    pub node_log: PathBuf,
    pub baseline_memory: Option<MemoryStats>,
    pub checkpoints: Vec<Checkpoint>,
    /// RSS while loading, every 5 s.
    pub rss_curve: Vec<RssPoint>,
    /// When the largest checkpoint is below 1M: RSS at 1M records by a straight line through
    /// the RSS curve's last point and the one at 80 % of its records (never decreasing).
    pub rss_bytes_projected_at_1m: Option<f64>,
    /// When RSS stopped growing while records kept coming (the last 20 % or more of the
    /// records within 1 % of the final RSS): from which record count, and at what RSS.
    pub rss_plateau_from_records: Option<u64>,
    pub rss_plateau_bytes: Option<u64>,
    pub node_stop: Option<String>,
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionStats {
    pub regions: u64,
    pub nodes: Vec<String>,
    /// From spawning the nodes to all answering `/readyz`.
    pub ready_secs: f64,
    /// From all ready to every node listing every peer as connected.
    pub connect_secs: f64,
    pub latency_1_client: LatencyRun,
    /// At node 0; `node_cpu_cores` is node 0's.
    pub throughput: WriteRun,
    /// CPU of each other node over the throughput run, in cores.
    pub other_nodes_cpu_cores: Vec<Option<f64>>,
    /// From the answer to a write at node 0 (after the throughput run) to a GET of it
    /// answering 200 on each other node, in order; polled every 5 ms, nodes one after another.
    pub visible_ms: Vec<Option<f64>>,
    /// The same for the last node.
    pub last_write_visible_ms_on_last_node: Option<f64>,
    pub node_stop: String,
    pub secs: f64,
}

/// Counts of one link direction over a window.
#[derive(Debug, Clone, Serialize)]
pub struct LinkDirDelta {
    pub link: String,
    /// "forward" (dialler → accepter) or "reverse".
    pub direction: &'static str,
    /// Which node sent these datagrams → which received them.
    pub carries: String,
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub idle_packets: u64,
    pub idle_bytes: u64,
}

/// One direction of traffic between the two nodes (both links summed).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WireFigures {
    pub bytes: u64,
    pub packets: u64,
    pub idle_bytes: u64,
    pub idle_packets: u64,
    /// Bytes minus the idle baseline (never below zero).
    pub net_bytes: u64,
    pub net_packets: u64,
    pub bytes_per_write: f64,
    pub net_bytes_per_write: f64,
    pub packets_per_write: f64,
    pub net_packets_per_write: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WireStats {
    pub writes: u64,
    pub errors: u64,
    pub write: WriteRun,
    /// From the first write to the end of the measured window (applied at B + 1 s).
    pub window_secs: f64,
    /// From the first write until B had applied them all.
    pub apply_secs: f64,
    pub idle_window_secs: f64,
    /// Key + JSON value of one write, for comparison.
    pub payload_bytes_per_write: u64,
    pub a_to_b: WireFigures,
    pub b_to_a: WireFigures,
    pub total: WireFigures,
    pub links: Vec<LinkDirDelta>,
    pub node_stop: String,
}

#[derive(Debug, Serialize)]
pub struct ScaleSetup {
    pub meridian_bin: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub data_dir_is_temporary: bool,
    pub data_dir_kept: bool,
    pub data_disk: DiskInfo,
    pub out_dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub scenario: &'static str,
    pub machine: Machine,
    pub setup: ScaleSetup,
    pub config: ScaleOpts,
    pub keyspace: Option<KeyspaceStats>,
    pub regions: Vec<RegionStats>,
    pub wire: Option<WireStats>,
    pub targets: Vec<TargetResult>,
    /// WARN/ERROR lines in the node logs (only logs that have any).
    pub node_logs: Vec<LogProblems>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub total_secs: f64,
}

fn fmt_mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / MIB)
}

fn fmt_opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "n/a".into(), f)
}

fn fmt_cores(v: Option<f64>) -> String {
    fmt_opt(v, |c| format!("{c:.2}"))
}

fn fmt_lat(l: &LatencyRun) -> String {
    format!(
        "{:.3} / {:.3} ms ({} writes{})",
        l.latency.p50_ms,
        l.latency.p99_ms,
        l.writes,
        if l.errors > 0 {
            format!(", {} errors", l.errors)
        } else {
            String::new()
        }
    )
}

fn fmt_run(r: &WriteRun) -> String {
    format!(
        "{} writes/s, p50 {:.1} / p99 {:.1} ms, node CPU {} cores (waited {}){}",
        thousands(r.writes_per_sec),
        r.latency.p50_ms,
        r.latency.p99_ms,
        fmt_cores(r.node_cpu_cores),
        fmt_cores(r.node_cpu_wait_cores),
        if r.errors > 0 {
            format!(", {} errors", r.errors)
        } else {
            String::new()
        }
    )
}

impl ScaleReport {
    pub fn table(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        if let Some(k) = &self.keyspace {
            if let Some(m) = &k.baseline_memory {
                rows.push(Row::new(
                    "keyspace",
                    "RSS of the empty node",
                    fmt_mib(m.rss_bytes as f64),
                    String::new(),
                ));
            }
            for c in &k.checkpoints {
                let name = format!("keyspace @ {}", thousands(c.records as f64));
                if let Some(l) = &c.load {
                    rows.push(Row::new(
                        &name,
                        &format!(
                            "load from {} ({} clients)",
                            thousands(c.load_from_records as f64),
                            l.clients
                        ),
                        format!(
                            "{} records/s ({:.1} s), node CPU {} cores (waited {})",
                            thousands(l.writes_per_sec),
                            l.secs,
                            fmt_cores(l.node_cpu_cores),
                            fmt_cores(l.node_cpu_wait_cores)
                        ),
                        String::new(),
                    ));
                }
                rows.push(Row::new(
                    &name,
                    "insert p50 / p99 (1 client)",
                    fmt_lat(&c.insert_1_client),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    "update p50 / p99 (1 client)",
                    fmt_lat(&c.update_1_client),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    &format!(
                        "throughput ({} clients, {:.0} s)",
                        c.throughput.clients, c.throughput.secs
                    ),
                    fmt_run(&c.throughput),
                    String::new(),
                ));
                if let Some(m) = &c.memory {
                    let target = if c.records >= RSS_TARGET_RECORDS {
                        format!(
                            "≤ {} at {}: {}",
                            fmt_mib(RSS_TARGET_BYTES as f64),
                            thousands(RSS_TARGET_RECORDS as f64),
                            if m.rss_bytes <= RSS_TARGET_BYTES {
                                "PASS"
                            } else {
                                "MISS"
                            }
                        )
                    } else {
                        String::new()
                    };
                    rows.push(Row::new(
                        &name,
                        "RSS / peak (VmRSS / VmHWM)",
                        format!(
                            "{} / {}",
                            fmt_mib(m.rss_bytes as f64),
                            fmt_opt(m.hwm_bytes, |b| fmt_mib(b as f64))
                        ),
                        target,
                    ));
                    rows.push(Row::new(
                        &name,
                        "documents cached by the node",
                        fmt_opt(c.cached_documents, thousands),
                        String::new(),
                    ));
                    rows.push(Row::new(
                        &name,
                        "RSS per record (all / above empty)",
                        format!(
                            "{} / {} bytes",
                            fmt_opt(c.rss_bytes_per_record, |b| format!("{b:.0}")),
                            fmt_opt(c.rss_marginal_bytes_per_record, |b| format!("{b:.0}"))
                        ),
                        String::new(),
                    ));
                }
                if let Some(d) = &c.disk {
                    rows.push(Row::new(
                        &name,
                        "disk (file sizes / allocated)",
                        format!(
                            "{} / {}",
                            fmt_mib(d.file_bytes as f64),
                            fmt_mib(d.allocated_bytes as f64)
                        ),
                        String::new(),
                    ));
                    rows.push(Row::new(
                        &name,
                        "disk per record (file sizes / allocated)",
                        format!(
                            "{} / {} bytes",
                            fmt_opt(c.disk_file_bytes_per_record, |b| format!("{b:.0}")),
                            fmt_opt(c.disk_allocated_bytes_per_record, |b| format!("{b:.0}"))
                        ),
                        String::new(),
                    ));
                }
            }
            if let Some(p) = k.rss_bytes_projected_at_1m {
                rows.push(Row::new(
                    "keyspace",
                    "RSS at 1,000,000 (linear projection)",
                    fmt_mib(p),
                    format!("≤ {}", fmt_mib(RSS_TARGET_BYTES as f64)),
                ));
            }
        }
        for r in &self.regions {
            let name = format!("regions = {}", r.regions);
            rows.push(Row::new(
                &name,
                "write p50 / p99 at node 0 (1 client)",
                fmt_lat(&r.latency_1_client),
                String::new(),
            ));
            rows.push(Row::new(
                &name,
                &format!(
                    "throughput at node 0 ({} clients, {:.0} s)",
                    r.throughput.clients, r.throughput.secs
                ),
                fmt_run(&r.throughput),
                String::new(),
            ));
            let others: Vec<String> = r
                .other_nodes_cpu_cores
                .iter()
                .map(|c| fmt_cores(*c))
                .collect();
            rows.push(Row::new(
                &name,
                "CPU of the other nodes meanwhile",
                format!("{} cores", others.join(" / ")),
                String::new(),
            ));
            rows.push(Row::new(
                &name,
                "last write visible on the last node",
                fmt_opt(r.last_write_visible_ms_on_last_node, |v| {
                    format!("{v:.0} ms after its answer")
                }),
                String::new(),
            ));
        }
        if let Some(w) = &self.wire {
            let name = "wire (2 nodes)";
            let dir = |label: &str, f: &WireFigures| {
                Row::new(
                    name,
                    &format!("{label} bytes per write (net / gross)"),
                    format!(
                        "{:.0} / {:.0} bytes, {:.2} / {:.2} datagrams",
                        f.net_bytes_per_write,
                        f.bytes_per_write,
                        f.net_packets_per_write,
                        f.packets_per_write
                    ),
                    String::new(),
                )
            };
            rows.push(Row::new(
                name,
                "writes at A",
                format!(
                    "{} ({} writes/s), payload {} bytes each",
                    thousands(w.writes as f64),
                    thousands(w.write.writes_per_sec),
                    w.payload_bytes_per_write
                ),
                String::new(),
            ));
            rows.push(dir("A→B", &w.a_to_b));
            rows.push(dir("B→A", &w.b_to_a));
            rows.push(dir("total", &w.total));
            rows.push(Row::new(
                name,
                "idle baseline (both directions)",
                format!(
                    "{} bytes, {} datagrams in {:.1} s",
                    thousands(w.total.idle_bytes as f64),
                    thousands(w.total.idle_packets as f64),
                    w.idle_window_secs
                ),
                String::new(),
            ));
        }
        rows
    }
}

// ---------------------------------------------------------------------------------------------
// Pure helpers

/// A byte count from a `/proc/<pid>/status` line such as `VmRSS:  123456 kB`.
pub fn status_field_bytes(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") => n.checked_mul(1024),
            None => Some(n),
            Some(_) => None,
        }
    })
}

pub fn memory_from_status(status: &str) -> Option<MemoryStats> {
    Some(MemoryStats {
        rss_bytes: status_field_bytes(status, "VmRSS")?,
        hwm_bytes: status_field_bytes(status, "VmHWM"),
        rss_anon_bytes: status_field_bytes(status, "RssAnon"),
        rss_file_bytes: status_field_bytes(status, "RssFile"),
    })
}

fn read_memory(pid: u32) -> Option<MemoryStats> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .as_deref()
        .and_then(memory_from_status)
}

/// `bytes / records`, None for no records.
pub fn per_record(bytes: u64, records: u64) -> Option<f64> {
    (records > 0).then(|| bytes as f64 / records as f64)
}

/// What each record added above a baseline: `(bytes − baseline) / records` (0 when below).
pub fn marginal_per_record(bytes: u64, baseline: u64, records: u64) -> Option<f64> {
    per_record(bytes.saturating_sub(baseline), records)
}

/// The value at `at` on the straight line through the last `(records, bytes)` point and the
/// last one at or below 80 % of its records (the recent trend, not the start-up cost); a
/// falling line counts as flat.
pub fn project(points: &[(u64, u64)], at: u64) -> Option<f64> {
    let &(x1, y1) = points.last()?;
    let &(x0, y0) = points
        .iter()
        .rev()
        .find(|(x, _)| (*x as f64) <= x1 as f64 * 0.8)?;
    if x1 <= x0 {
        return None;
    }
    let slope = ((y1 as f64 - y0 as f64) / (x1 - x0) as f64).max(0.0);
    Some(y1 as f64 + slope * (at as f64 - x1 as f64))
}

/// Where `(records, bytes)` points stopped growing: the first of the final run of points
/// within 1 % of the last one, if that run spans at least 20 % of the records and 3 points.
pub fn plateau(points: &[(u64, u64)]) -> Option<(u64, u64)> {
    let &(x1, y1) = points.last()?;
    let near = |y: u64| (y as f64 - y1 as f64).abs() <= y1 as f64 * 0.01;
    let start = points
        .iter()
        .rposition(|(_, y)| !near(*y))
        .map_or(0, |i| i + 1);
    let (x0, _) = points[start];
    let span = points.len() - start;
    (span >= 3 && (x1 - x0) as f64 >= x1 as f64 * 0.2).then_some((x0, y1))
}

/// Sizes of every regular file under `dir`, recursively (symlinks are not followed).
pub fn dir_usage(dir: &Path) -> Result<DiskUsage> {
    let mut usage = DiskUsage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", d.display()))?;
            let meta = entry
                .metadata()
                .with_context(|| format!("reading metadata of {}", entry.path().display()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                usage.files += 1;
                usage.file_bytes += meta.len();
                usage.allocated_bytes += meta.blocks() * 512;
            }
        }
    }
    Ok(usage)
}

/// `[[links]]` entries: each `from` node dials `via` instead of the `to` node's peer address.
pub fn links_toml(links: &[(String, String, SocketAddr)]) -> String {
    let mut s = String::new();
    for (from, to, via) in links {
        let _ = write!(
            s,
            "\n[[links]]\nfrom = \"{from}\"\nto = \"{to}\"\nvia = \"{via}\"\n"
        );
    }
    s
}

/// Nodes `bench-a-1`, `bench-b-1`, … in regions `bench-a`, `bench-b`, … on the given ports.
pub fn region_nodes(ports: &[(u16, u16)]) -> Vec<TopologyNode> {
    ports
        .iter()
        .enumerate()
        .map(|(i, &(peer_port, api_port))| {
            let letter = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
            let region = format!("bench-{letter}");
            TopologyNode {
                id: format!("{region}-1"),
                region,
                peer_port,
                api_port,
            }
        })
        .collect()
}

/// Whether a `/v1/status` answer lists at least `expected` peers, all connected.
pub fn all_peers_connected(
    status: &serde_json::Value,
    expected: usize,
) -> std::result::Result<bool, String> {
    let peers = status
        .get("peers")
        .and_then(serde_json::Value::as_array)
        .ok_or("no peers array in the answer")?;
    if peers.len() < expected {
        return Ok(false);
    }
    for p in peers {
        match p.get("connected") {
            Some(serde_json::Value::Bool(true)) => {}
            Some(serde_json::Value::Bool(false)) => return Ok(false),
            other => return Err(format!("a peer without a boolean connected: {other:?}")),
        }
    }
    Ok(true)
}

pub fn wire_figures(
    bytes: u64,
    packets: u64,
    idle_bytes: u64,
    idle_packets: u64,
    writes: u64,
) -> WireFigures {
    let net_bytes = bytes.saturating_sub(idle_bytes);
    let net_packets = packets.saturating_sub(idle_packets);
    let per = |v: u64| per_record(v, writes).unwrap_or(0.0);
    WireFigures {
        bytes,
        packets,
        idle_bytes,
        idle_packets,
        net_bytes,
        net_packets,
        bytes_per_write: per(bytes),
        net_bytes_per_write: per(net_bytes),
        packets_per_write: per(packets),
        net_packets_per_write: per(net_packets),
    }
}

fn validate(opts: &ScaleOpts) -> Result<()> {
    if opts.phases.is_empty() {
        return Err(Error::usage("--phases: name at least one phase"));
    }
    if opts.phases.contains(&Phase::Keyspace) {
        if opts.checkpoints.is_empty() {
            return Err(Error::usage(
                "--checkpoints: give at least one record count",
            ));
        }
        if opts.checkpoints.windows(2).any(|w| w[1] <= w[0]) {
            return Err(Error::usage(format!(
                "--checkpoints {:?}: the counts must be ascending",
                opts.checkpoints
            )));
        }
    }
    Ok(())
}

/// A small deterministic generator (SplitMix64) for picking keys to update.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Load generation

/// When the concurrent clients stop: whichever comes first.
#[derive(Clone, Copy)]
struct Stop {
    /// Once every index below this has been taken.
    below: Option<u64>,
    /// At this instant (a request in flight finishes).
    at: Option<Instant>,
}

impl Stop {
    fn below(limit: u64) -> Stop {
        Stop {
            below: Some(limit),
            at: None,
        }
    }

    fn at(t: Instant) -> Stop {
        Stop {
            below: None,
            at: Some(t),
        }
    }
}

struct ClientResult {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_errors: Vec<String>,
    gave_up: bool,
}

/// Takes the next index, unless the stop condition says otherwise.
fn take_index(next: &AtomicU64, stop: Stop) -> Option<u64> {
    if stop.at.is_some_and(|t| Instant::now() >= t) {
        return None;
    }
    match stop.below {
        // Never past the limit, so the next phase starts right after the last key written.
        Some(limit) => next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v < limit).then_some(v + 1)
            })
            .ok(),
        None => Some(next.fetch_add(1, Ordering::Relaxed)),
    }
}

async fn write_client(
    http: reqwest::Client,
    base: Arc<str>,
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    stop: Stop,
    value_bytes: usize,
) -> ClientResult {
    let mut r = ClientResult {
        hist: new_histogram(),
        ok: 0,
        errors: 0,
        first_errors: Vec::new(),
        gave_up: false,
    };
    let mut url = String::with_capacity(base.len() + prefix.len() + 32);
    while let Some(i) = take_index(&next, stop) {
        url.clear();
        let _ = write!(url, "{base}/v1/kv/{prefix}/{i}");
        let sent = Instant::now();
        match http::put(&http, &url, make_body(i, value_bytes)).await {
            Ok(()) => {
                r.hist.saturating_record(micros(sent.elapsed()));
                r.ok += 1;
                written.fetch_add(1, Ordering::Relaxed);
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

/// Where a burst writes: `PUT {base}/v1/kv/{prefix}/{i}` for fresh indexes `i` from `next`.
struct Target<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    prefix: &'a str,
    next: &'a Arc<AtomicU64>,
    /// Successful writes, counted as they happen (for sampling while loading).
    written: &'a Arc<AtomicU64>,
    value_bytes: usize,
}

/// Runs `clients` concurrent writers of new keys until `stop`; calls `tick` every
/// `RSS_SAMPLE_EVERY` meanwhile. Gives the run and the first errors.
async fn burst(
    t: &Target<'_>,
    clients: u64,
    stop: Stop,
    node_pid: Option<u32>,
    mut tick: impl FnMut(),
) -> (WriteRun, Vec<String>) {
    let node_cpu = node_pid.map(|p| CpuMeter::start(Some(p)));
    let node_wait = node_pid.map(WaitMeter::start);
    let client_cpu = CpuMeter::start(None);
    let start = Instant::now();
    let base: Arc<str> = Arc::from(t.base);
    let prefix: Arc<str> = Arc::from(t.prefix);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(write_client(
            t.http.clone(),
            Arc::clone(&base),
            Arc::clone(&prefix),
            Arc::clone(t.next),
            Arc::clone(t.written),
            stop,
            t.value_bytes,
        ));
    }
    let mut hist = new_histogram();
    let (mut ok, mut errors, mut gave_up) = (0u64, 0u64, 0u64);
    let mut first_errors = Vec::new();
    let mut ticker = tokio::time::interval(RSS_SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                let Some(joined) = joined else { break };
                match joined {
                    Ok(r) => {
                        // Same bounds everywhere, so adding cannot fail.
                        let _ = hist.add(&r.hist);
                        ok += r.ok;
                        errors += r.errors;
                        gave_up += u64::from(r.gave_up);
                        for e in r.first_errors {
                            if first_errors.len() < KEEP_ERRORS {
                                first_errors.push(e);
                            }
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        gave_up += 1;
                        if first_errors.len() < KEEP_ERRORS {
                            first_errors.push(format!("client task failed: {e}"));
                        }
                    }
                }
            }
            _ = ticker.tick() => tick(),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let run = WriteRun {
        clients,
        writes: ok,
        errors,
        clients_gave_up: gave_up,
        secs,
        writes_per_sec: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        node_cpu_cores: node_cpu.and_then(|m| m.cores()),
        node_cpu_wait_cores: node_wait.and_then(|m| m.waiting_cores()),
        client_cpu_cores: client_cpu.cores(),
        latency: LatencyMs::from_histogram(&hist),
    };
    (run, first_errors)
}

/// Which keys a 1-client latency run writes.
enum KeyPick<'a> {
    /// Fresh indexes from the shared counter.
    New(&'a AtomicU64),
    /// Random indexes below this (records that exist, barring failed writes).
    Existing(u64, SplitMix64),
}

async fn latency_run(
    t: &Target<'_>,
    mut pick: KeyPick<'_>,
    writes: u64,
) -> (LatencyRun, Vec<String>) {
    let kind = match pick {
        KeyPick::New(_) => "insert",
        KeyPick::Existing(..) => "update",
    };
    let mut hist = new_histogram();
    let mut errors = 0u64;
    let mut first_errors = Vec::new();
    let mut url = String::new();
    for n in 0..LATENCY_WARMUP + writes {
        let i = match &mut pick {
            KeyPick::New(next) => next.fetch_add(1, Ordering::Relaxed),
            KeyPick::Existing(below, rng) => rng.below(*below),
        };
        url.clear();
        let _ = write!(url, "{}/v1/kv/{}/{i}", t.base, t.prefix);
        // Updates get a different body than the record holds, so they change something.
        let body = make_body(i.wrapping_add(n + 1), t.value_bytes);
        let sent = Instant::now();
        match http::put(t.http, &url, body).await {
            Ok(()) => {
                if n >= LATENCY_WARMUP {
                    hist.saturating_record(micros(sent.elapsed()));
                }
                if matches!(pick, KeyPick::New(_)) {
                    t.written.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                errors += 1;
                if first_errors.len() < KEEP_ERRORS {
                    first_errors.push(e);
                }
                if errors >= MAX_LATENCY_ERRORS {
                    first_errors.push(format!("gave up after {errors} errors"));
                    break;
                }
            }
        }
    }
    let run = LatencyRun {
        kind,
        warmup_writes: LATENCY_WARMUP,
        writes: hist.len(),
        errors,
        latency: LatencyMs::from_histogram(&hist),
    };
    (run, first_errors)
}

fn note_errors(failures: &mut Vec<String>, what: &str, errors: u64, first: &[String]) {
    if errors > 0 {
        failures.push(format!(
            "{what}: {errors} write(s) failed; first: {}",
            first.join(" | ")
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters of N nodes

/// N running nodes, one per region. Dropping it stops them all.
struct Cluster {
    nodes: Vec<NodeGuard>,
    topo: Vec<TopologyNode>,
    logs: Vec<PathBuf>,
    ready_secs: f64,
    connect_secs: f64,
}

struct Ctx<'a> {
    http: &'a reqwest::Client,
    binary: PathBuf,
    data_dir: PathBuf,
    out_dir: PathBuf,
    ready_timeout: Duration,
}

impl Cluster {
    /// Writes the topology (plus `extra_toml`), runs `meridian certs`, starts every node,
    /// waits for every `/readyz` and for every node to list all its peers as connected.
    async fn start(
        ctx: &Ctx<'_>,
        dir: &Path,
        label: &str,
        topo: Vec<TopologyNode>,
        extra_toml: &str,
    ) -> Result<Cluster> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating cluster dir {}", dir.display()))?;
        let topology_path = dir.join("topology.toml");
        let text = cluster_toml(&topo) + extra_toml;
        std::fs::write(&topology_path, text)
            .with_context(|| format!("writing {}", topology_path.display()))?;
        let logs: Vec<PathBuf> = (0..topo.len())
            .map(|i| ctx.out_dir.join(format!("node-scale-{label}-{i}.log")))
            .collect();
        let certs_dir = dir.join("certs");
        node::generate_certs(&ctx.binary, &topology_path, &certs_dir, &logs[0])?;

        let started = Instant::now();
        let mut nodes = Vec::with_capacity(topo.len());
        for (n, log) in topo.iter().zip(&logs) {
            let spec = NodeSpec {
                binary: ctx.binary.clone(),
                topology_path: topology_path.clone(),
                node_id: n.id.clone(),
                data_dir: dir.join(&n.id),
                api_url: n.api_url(),
                ready_timeout: ctx.ready_timeout,
            };
            nodes.push(NodeGuard::spawn(spec, log.clone())?);
        }
        let mut cluster = Cluster {
            nodes,
            topo,
            logs,
            ready_secs: 0.0,
            connect_secs: 0.0,
        };
        for n in &mut cluster.nodes {
            n.wait_ready(ctx.http).await?;
        }
        cluster.ready_secs = started.elapsed().as_secs_f64();
        let connecting = Instant::now();
        cluster.wait_connected(ctx.http, CONNECT_DEADLINE).await?;
        cluster.connect_secs = connecting.elapsed().as_secs_f64();
        Ok(cluster)
    }

    async fn wait_connected(&mut self, http: &reqwest::Client, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        let expected = self.topo.len() - 1;
        for i in 0..self.nodes.len() {
            let url = format!("{}/v1/status", self.topo[i].api_url());
            loop {
                self.check_alive()?;
                let last = match http::get_json(http, &url).await {
                    Ok(v) => match all_peers_connected(&v, expected) {
                        Ok(true) => break,
                        Ok(false) => format!(
                            "not every one of {expected} peer(s) is connected: {}",
                            v.get("peers").map_or_else(String::new, |p| p.to_string())
                        ),
                        Err(e) => e,
                    },
                    Err(e) => e,
                };
                if Instant::now() >= until {
                    return Err(Error::runtime(format!(
                        "the {}-node cluster did not connect within {} s (GET {url}: {last}); \
                         last lines of {}:\n{}",
                        self.nodes.len(),
                        deadline.as_secs(),
                        self.logs[i].display(),
                        log_tail(&self.logs[i], 20)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        self.nodes.iter_mut().try_for_each(NodeGuard::check_alive)
    }

    /// Stops every node (last first), then reads the WARN/ERROR lines of their logs, telling
    /// apart those written while stopping.
    fn stop(&mut self) -> (String, Vec<LogProblems>) {
        let sizes: Vec<u64> = self
            .logs
            .iter()
            .map(|l| std::fs::metadata(l).map_or(0, |m| m.len()))
            .collect();
        let mut outcomes = Vec::new();
        for (n, t) in self.nodes.iter_mut().zip(&self.topo).rev() {
            outcomes.push(format!("{}: {}", t.id, n.stop()));
        }
        outcomes.reverse();
        let problems = self
            .logs
            .iter()
            .zip(sizes)
            .map(|(l, s)| log_problems(l, Some(s), 5))
            .collect();
        (outcomes.join("; "), problems)
    }
}

/// Polls `GET {base}/v1/kv/{key}` until it answers 200; the time since `from` in ms.
async fn wait_visible(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    from: Instant,
    deadline: Instant,
) -> std::result::Result<f64, String> {
    let url = format!("{base}/v1/kv/{key}");
    loop {
        let last = match http.get(&url).timeout(Duration::from_secs(2)).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                return Ok(from.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => http::error_chain(&e),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "GET {url} did not answer 200 within {} s of the write (last: {last})",
                VISIBLE_DEADLINE.as_secs()
            ));
        }
        tokio::time::sleep(VISIBLE_POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Phases

async fn keyspace_phase(
    ctx: &Ctx<'_>,
    opts: &ScaleOpts,
    out: &mut KeyspaceStats,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let started = Instant::now();
    let mut guard = NodeGuard::start(
        NodeConfig {
            binary: &ctx.binary,
            data_dir: &out.data_dir,
            log_path: out.node_log.clone(),
            ready_timeout: ctx.ready_timeout,
        },
        ctx.http,
    )
    .await?;
    let pid = guard.pid();
    let base = guard.api_url.clone();
    let baseline = pid.and_then(read_memory);
    out.baseline_memory = baseline;
    let next = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let target = Target {
        http: ctx.http,
        base: &base,
        prefix: KEY_PREFIX,
        next: &next,
        written: &written,
        value_bytes: opts.value_bytes,
    };
    let mut rng = SplitMix64(0x5CA1E);
    let budget = Duration::from_secs(opts.load_budget_secs);
    let mut loading = Duration::ZERO;

    for &cp in &opts.checkpoints {
        let from = next.load(Ordering::Relaxed);
        let load_started = Instant::now();
        let stop = Stop {
            below: Some(cp),
            at: Some(load_started + budget.saturating_sub(loading)),
        };
        let load = if cp > from {
            eprintln!(
                "meridian-bench: scale: loading records {from}..{cp} with {} clients",
                opts.load_clients
            );
            let curve = &mut out.rss_curve;
            let (run, errs) = burst(&target, opts.load_clients, stop, pid, || {
                if let Some(m) = pid.and_then(read_memory) {
                    curve.push(RssPoint {
                        secs: started.elapsed().as_secs_f64(),
                        records_written: written.load(Ordering::Relaxed),
                        rss_bytes: m.rss_bytes,
                    });
                }
            })
            .await;
            note_errors(failures, &format!("loading to {cp}"), run.errors, &errs);
            Some(run)
        } else {
            None
        };
        loading += load_started.elapsed();
        let reached = next.load(Ordering::Relaxed) >= cp;
        if !reached {
            eprintln!(
                "meridian-bench: scale: the load budget of {} s ran out at {} records; \
                 measuring there",
                opts.load_budget_secs,
                thousands(next.load(Ordering::Relaxed) as f64)
            );
        }
        guard.check_alive()?;

        let stored = http::get_json(ctx.http, &format!("{base}/v1/status"))
            .await
            .ok()
            .and_then(|v| v.get("records_stored").and_then(serde_json::Value::as_u64));
        let records = stored.unwrap_or_else(|| written.load(Ordering::Relaxed));
        let cached_documents = prom::scrape(ctx.http, &base)
            .await
            .ok()
            .and_then(|s| s.value("meridian_cached_documents", &[]));
        let memory = pid.and_then(read_memory);
        if let Some(m) = &memory {
            out.rss_curve.push(RssPoint {
                secs: started.elapsed().as_secs_f64(),
                records_written: written.load(Ordering::Relaxed),
                rss_bytes: m.rss_bytes,
            });
        }
        let disk = match dir_usage(&out.data_dir) {
            Ok(d) => Some(d),
            Err(e) => {
                failures.push(format!("measuring the data directory at {cp}: {e}"));
                None
            }
        };
        eprintln!(
            "meridian-bench: scale: at {} records: RSS {}, disk {}",
            thousands(records as f64),
            fmt_opt(memory.map(|m| m.rss_bytes), |b| fmt_mib(b as f64)),
            fmt_opt(disk.map(|d| d.allocated_bytes), |b| fmt_mib(b as f64)),
        );

        eprintln!(
            "meridian-bench: scale: 1-client latency, {} inserts and {} updates",
            opts.latency_writes, opts.latency_writes
        );
        let (insert, errs) = latency_run(&target, KeyPick::New(&next), opts.latency_writes).await;
        note_errors(failures, &format!("inserts at {cp}"), insert.errors, &errs);
        let existing = next.load(Ordering::Relaxed);
        let rng_here = SplitMix64(rng.next_u64());
        let (update, errs) = latency_run(
            &target,
            KeyPick::Existing(existing, rng_here),
            opts.latency_writes,
        )
        .await;
        note_errors(failures, &format!("updates at {cp}"), update.errors, &errs);

        eprintln!(
            "meridian-bench: scale: throughput, {} clients for {} s",
            opts.tput_clients, opts.tput_secs
        );
        let until = Instant::now() + Duration::from_secs(opts.tput_secs);
        let (tput, errs) = burst(&target, opts.tput_clients, Stop::at(until), pid, || {}).await;
        note_errors(failures, &format!("throughput at {cp}"), tput.errors, &errs);
        guard.check_alive()?;

        let baseline_rss = baseline.map(|b| b.rss_bytes);
        out.checkpoints.push(Checkpoint {
            checkpoint: cp,
            records,
            records_stored_by_node: stored,
            reached,
            cached_documents,
            load_from_records: from,
            load,
            rss_bytes_per_record: memory.and_then(|m| per_record(m.rss_bytes, records)),
            rss_marginal_bytes_per_record: memory
                .zip(baseline_rss)
                .and_then(|(m, b)| marginal_per_record(m.rss_bytes, b, records)),
            hwm_bytes_per_record: memory
                .and_then(|m| m.hwm_bytes)
                .and_then(|h| per_record(h, records)),
            memory,
            disk_file_bytes_per_record: disk.and_then(|d| per_record(d.file_bytes, records)),
            disk_allocated_bytes_per_record: disk
                .and_then(|d| per_record(d.allocated_bytes, records)),
            disk,
            insert_1_client: insert,
            update_1_client: update,
            throughput: tput,
            records_written_after: written.load(Ordering::Relaxed),
        });
        if !reached {
            // Not a failure: on a busy machine the budget keeps the suite within its time.
            notes.push(format!(
                "keyspace: the load budget (--load-budget-secs {}) ran out before {cp} records; \
                 measured at {records}{}",
                opts.load_budget_secs,
                match opts.checkpoints.iter().filter(|c| **c > cp).count() {
                    0 => String::new(),
                    n => format!(", {n} later checkpoint(s) skipped"),
                }
            ));
            break;
        }
    }
    let points: Vec<(u64, u64)> = out
        .rss_curve
        .iter()
        .map(|p| (p.records_written, p.rss_bytes))
        .collect();
    if points.last().is_some_and(|p| p.0 < RSS_TARGET_RECORDS) {
        out.rss_bytes_projected_at_1m = project(&points, RSS_TARGET_RECORDS);
    }
    if let Some((from, bytes)) = plateau(&points) {
        out.rss_plateau_from_records = Some(from);
        out.rss_plateau_bytes = Some(bytes);
        notes.push(format!(
            "keyspace: the node's RSS stopped growing at {} from about {} records on, while \
             records kept coming: something in it (a cache?) reached its size limit",
            fmt_mib(bytes as f64),
            thousands(from as f64)
        ));
    }
    out.node_stop = Some(guard.stop());
    out.secs = started.elapsed().as_secs_f64();
    Ok(())
}

async fn regions_phase(
    ctx: &Ctx<'_>,
    opts: &ScaleOpts,
    n: u64,
    logs: &mut Vec<LogProblems>,
    failures: &mut Vec<String>,
) -> Result<RegionStats> {
    let started = Instant::now();
    let count = usize::try_from(n).context("--regions-max")?;
    let topo = region_nodes(&free_port_pairs(count)?);
    let names: Vec<String> = topo.iter().map(|t| t.id.clone()).collect();
    let dir = ctx.data_dir.join(format!("regions-{n}"));
    eprintln!("meridian-bench: scale: starting {n} nodes, one per region");
    let mut cluster = Cluster::start(ctx, &dir, &format!("regions{n}"), topo, "").await?;
    let base = cluster.topo[0].api_url();
    let pid0 = cluster.nodes[0].pid();
    let next = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let prefix = format!("{KEY_PREFIX}/r{n}");
    let target = Target {
        http: ctx.http,
        base: &base,
        prefix: &prefix,
        next: &next,
        written: &written,
        value_bytes: opts.value_bytes,
    };

    let (lat, errs) = latency_run(&target, KeyPick::New(&next), opts.latency_writes).await;
    note_errors(
        failures,
        &format!("{n} regions: latency"),
        lat.errors,
        &errs,
    );

    let others: Vec<Option<CpuMeter>> = cluster.nodes[1..]
        .iter()
        .map(|g| g.pid().map(|p| CpuMeter::start(Some(p))))
        .collect();
    let until = Instant::now() + Duration::from_secs(opts.tput_secs);
    let (tput, errs) = burst(&target, opts.tput_clients, Stop::at(until), pid0, || {}).await;
    note_errors(
        failures,
        &format!("{n} regions: throughput"),
        tput.errors,
        &errs,
    );
    let other_cpu: Vec<Option<f64>> = others
        .iter()
        .map(|m| m.as_ref().and_then(CpuMeter::cores))
        .collect();
    cluster.check_alive()?;

    // The last write: its answer means it is durable at node 0; every other node must get it
    // (after the throughput run's backlog).
    let key = format!("{prefix}/last");
    let url = format!("{base}/v1/kv/{key}");
    http::put(ctx.http, &url, make_body(u64::MAX, opts.value_bytes))
        .await
        .map_err(|e| Error::runtime(format!("{n} regions: the last write failed: {e}")))?;
    let answered = Instant::now();
    let deadline = answered + VISIBLE_DEADLINE;
    let mut visible = Vec::new();
    for t in &cluster.topo[1..] {
        match wait_visible(ctx.http, &t.api_url(), &key, answered, deadline).await {
            Ok(ms) => visible.push(Some(ms)),
            Err(e) => {
                failures.push(format!(
                    "{n} regions: {} never showed the last write: {e}",
                    t.id
                ));
                visible.push(None);
            }
        }
    }
    let last = visible.last().copied().flatten();
    let (node_stop, problems) = cluster.stop();
    logs.extend(problems);
    Ok(RegionStats {
        regions: n,
        nodes: names,
        ready_secs: cluster.ready_secs,
        connect_secs: cluster.connect_secs,
        latency_1_client: lat,
        throughput: tput,
        other_nodes_cpu_cores: other_cpu,
        visible_ms: visible,
        last_write_visible_ms_on_last_node: last,
        node_stop,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// `(packets, bytes)` forwarded in one direction so far.
fn dir_counts(c: &CounterSnapshot) -> (u64, u64) {
    (c.forwarded, c.bytes_forwarded)
}

/// For each link and direction: (link name, direction, carries, packets, bytes, dropped).
type DirKey = (String, &'static str, String);

fn deltas(before: &[LinkInfo], after: &[LinkInfo]) -> Vec<(DirKey, u64, u64, u64)> {
    let mut out = Vec::new();
    for a in after {
        let Some(b) = before.iter().find(|b| b.from == a.from && b.to == a.to) else {
            continue;
        };
        let name = format!("{} -> {}", a.from, a.to);
        for (dir, x, y, carries) in [
            (
                "forward",
                &a.forward.counters,
                &b.forward.counters,
                format!("{} → {}", a.from, a.to),
            ),
            (
                "reverse",
                &a.reverse.counters,
                &b.reverse.counters,
                format!("{} → {}", a.to, a.from),
            ),
        ] {
            let (p1, b1) = dir_counts(x);
            let (p0, b0) = dir_counts(y);
            out.push((
                (name.clone(), dir, carries),
                p1.saturating_sub(p0),
                b1.saturating_sub(b0),
                x.dropped.saturating_sub(y.dropped),
            ));
        }
    }
    out
}

async fn wire_phase(
    ctx: &Ctx<'_>,
    opts: &ScaleOpts,
    logs: &mut Vec<LogProblems>,
    failures: &mut Vec<String>,
) -> Result<WireStats> {
    // Two node port pairs, and two more UDP ports for the relays' listening sockets.
    let ports = free_port_pairs(4)?;
    let topo = region_nodes(&ports[..2]);
    let (a, b) = (topo[0].clone(), topo[1].clone());
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let links = vec![
        (a.id.clone(), b.id.clone(), loopback(ports[2].0)),
        (b.id.clone(), a.id.clone(), loopback(ports[3].0)),
    ];
    let specs: Vec<LinkSpec> = links
        .iter()
        .map(|(from, to, via)| LinkSpec {
            from: from.clone(),
            to: to.clone(),
            via: *via,
            upstream: loopback(if *to == a.id {
                a.peer_port
            } else {
                b.peer_port
            }),
        })
        .collect();
    let emulator = Emulator::start_links(specs, EmulatorOptions::default())
        .await
        .map_err(|e| Error::runtime(format!("starting the link emulator: {e}")))?;
    eprintln!("meridian-bench: scale: starting 2 nodes whose peer links go through the emulator");
    let dir = ctx.data_dir.join("wire");
    let mut cluster = Cluster::start(ctx, &dir, "wire", topo, &links_toml(&links)).await?;
    tokio::time::sleep(WIRE_SETTLE).await;
    cluster.check_alive()?;

    let next = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let prefix = format!("{KEY_PREFIX}/wire");
    let base_a = a.api_url();
    let base_b = b.api_url();
    let target = Target {
        http: ctx.http,
        base: &base_a,
        prefix: &prefix,
        next: &next,
        written: &written,
        value_bytes: opts.value_bytes,
    };

    eprintln!(
        "meridian-bench: scale: wire: {} writes at {} with {} clients",
        opts.wire_writes, a.id, opts.load_clients
    );
    let before = emulator.links();
    let t0 = Instant::now();
    let pid_a = cluster.nodes[0].pid();
    let (run, errs) = burst(
        &target,
        opts.load_clients,
        Stop::below(opts.wire_writes),
        pid_a,
        || {},
    )
    .await;
    note_errors(failures, "wire writes", run.errors, &errs);
    let ok = run.writes;

    // Every successful write must reach B; B's counter is since its start and nothing else
    // was written at A.
    let until = Instant::now() + VISIBLE_DEADLINE;
    let applied_filter = [("peer_region", a.region.as_str())];
    let applied = loop {
        cluster.check_alive()?;
        let last = match prom::scrape(ctx.http, &base_b).await {
            Ok(s) => {
                let applied = s.value(APPLIED_COUNTER, &applied_filter).unwrap_or(0.0);
                if applied >= ok as f64 {
                    break applied;
                }
                format!("{applied} of {ok} applied")
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= until {
            return Err(Error::runtime(format!(
                "wire: {} did not apply the {ok} writes of {} within {} s ({last})",
                b.id,
                a.id,
                VISIBLE_DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let apply_secs = t0.elapsed().as_secs_f64();
    let last_key = format!("{prefix}/{}", opts.wire_writes - 1);
    if let Err(e) = wait_visible(
        ctx.http,
        &base_b,
        &last_key,
        t0,
        Instant::now() + Duration::from_secs(5),
    )
    .await
    {
        failures.push(format!(
            "wire: {} applied {applied} changes but the last key is not readable there: {e}",
            b.id
        ));
    }
    tokio::time::sleep(ACK_SETTLE).await;
    let after = emulator.links();
    let window = t0.elapsed();

    // The idle baseline over a window of the same length: keepalives, acknowledgements.
    eprintln!(
        "meridian-bench: scale: wire: idle baseline for {:.1} s",
        window.as_secs_f64()
    );
    let idle_before = emulator.links();
    let idle_t0 = Instant::now();
    tokio::time::sleep(window).await;
    let idle_after = emulator.links();
    let idle_secs = idle_t0.elapsed().as_secs_f64();
    cluster.check_alive()?;
    let (node_stop, problems) = cluster.stop();
    logs.extend(problems);
    drop(emulator);

    let busy = deltas(&before, &after);
    let idle = deltas(&idle_before, &idle_after);
    let mut links_out = Vec::new();
    let (mut ab, mut ba) = ([0u64; 4], [0u64; 4]);
    for (key, packets, bytes, dropped) in busy {
        let (ip, ib) = idle
            .iter()
            .find(|(k, ..)| *k == key)
            .map_or((0, 0), |(_, p, b, _)| (*p, *b));
        let (name, direction, carries) = key;
        // Datagrams sent by A: A's dial forward, B's dial reverse.
        let from_a = carries.starts_with(&format!("{} ", a.id));
        let sum = if from_a { &mut ab } else { &mut ba };
        sum[0] += bytes;
        sum[1] += packets;
        sum[2] += ib;
        sum[3] += ip;
        links_out.push(LinkDirDelta {
            link: name,
            direction,
            carries,
            packets,
            bytes,
            dropped,
            idle_packets: ip,
            idle_bytes: ib,
        });
        if dropped > 0 {
            failures.push(format!(
                "wire: the emulator dropped {dropped} datagram(s); it should pass everything"
            ));
        }
    }
    let fig = |s: [u64; 4]| wire_figures(s[0], s[1], s[2], s[3], ok);
    let total = [ab[0] + ba[0], ab[1] + ba[1], ab[2] + ba[2], ab[3] + ba[3]];
    let key_len = format!("{prefix}/{}", opts.wire_writes / 2).len() as u64;
    Ok(WireStats {
        writes: ok,
        errors: run.errors,
        payload_bytes_per_write: key_len + opts.value_bytes as u64,
        write: run,
        window_secs: window.as_secs_f64(),
        apply_secs,
        idle_window_secs: idle_secs,
        a_to_b: fig(ab),
        b_to_a: fig(ba),
        total: fig(total),
        links: links_out,
        node_stop,
    })
}

// ---------------------------------------------------------------------------------------------
// The scenario

fn rss_target(k: Option<&KeyspaceStats>) -> TargetResult {
    let name = format!(
        "RSS ≤ {} at {} records of ~200 bytes",
        fmt_mib(RSS_TARGET_BYTES as f64),
        thousands(RSS_TARGET_RECORDS as f64)
    );
    let bound = fmt_mib(RSS_TARGET_BYTES as f64);
    let measured = k.and_then(|k| {
        k.checkpoints
            .iter()
            .find(|c| c.records >= RSS_TARGET_RECORDS)
            .and_then(|c| c.memory.map(|m| (c.records, m.rss_bytes)))
    });
    match (measured, k.and_then(|k| k.rss_bytes_projected_at_1m)) {
        (Some((records, rss)), _) => TargetResult {
            name,
            bound,
            value: format!(
                "{} at {} records",
                fmt_mib(rss as f64),
                thousands(records as f64)
            ),
            status: if rss <= RSS_TARGET_BYTES {
                "PASS"
            } else {
                "MISS"
            },
        },
        (None, Some(p)) => TargetResult {
            name,
            bound,
            value: format!("not measured; {} by linear projection", fmt_mib(p)),
            status: "n/a",
        },
        (None, None) => TargetResult {
            name,
            bound,
            value: "not measured".into(),
            status: "n/a",
        },
    }
}

/// Runs the scenario. `Err` only for bad usage or failures to set up; failures inside a
/// phase land in `ScaleReport::failures`, and the other phases still run.
pub async fn run(common: &CommonArgs, opts: &ScaleOpts) -> Result<ScaleReport> {
    let machine = Machine::collect();
    if common.target.is_some() {
        return Err(Error::usage(
            "scale starts its own nodes (and reads their memory); it cannot run against --target",
        ));
    }
    validate(opts)?;
    let started = Instant::now();
    let env = BenchEnv::prepare(common, "scale")?;
    let Some(binary) = env.meridian_bin.clone() else {
        return Err(Error::usage("scale needs the meridian binary"));
    };
    let http = http::client(opts.load_clients.max(opts.tput_clients) as usize + 4)?;
    let out_dir = std::path::absolute(&env.out_dir)
        .with_context(|| format!("resolving {}", env.out_dir.display()))?;
    let ctx = Ctx {
        http: &http,
        binary,
        data_dir: env.data_dir.clone(),
        out_dir: out_dir.clone(),
        ready_timeout: Duration::from_secs(common.ready_timeout_secs),
    };
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    let mut node_logs = Vec::new();
    eprintln!(
        "meridian-bench: scale: data dir {} on {}",
        env.data_dir.display(),
        env.disk.describe()
    );
    notes.extend(env.disk.setup_notes());

    let mut keyspace = None;
    if opts.phases.contains(&Phase::Keyspace) {
        let dir = ctx.data_dir.join("keyspace");
        let mut k = KeyspaceStats {
            data_dir: dir.join("data"),
            node_log: out_dir.join("node-scale-keyspace.log"),
            baseline_memory: None,
            checkpoints: Vec::new(),
            rss_curve: Vec::new(),
            rss_bytes_projected_at_1m: None,
            rss_plateau_from_records: None,
            rss_plateau_bytes: None,
            node_stop: None,
            secs: 0.0,
        };
        if let Err(e) = keyspace_phase(&ctx, opts, &mut k, &mut failures, &mut notes).await {
            failures.push(format!("keyspace: {e}"));
        }
        node_logs.push(log_problems(&k.node_log, None, 5));
        keyspace = Some(k);
    }

    let mut regions = Vec::new();
    if opts.phases.contains(&Phase::Regions) {
        for n in 2..=opts.regions_max {
            match regions_phase(&ctx, opts, n, &mut node_logs, &mut failures).await {
                Ok(r) => regions.push(r),
                Err(e) => failures.push(format!("regions = {n}: {e}")),
            }
        }
    }

    let mut wire = None;
    if opts.phases.contains(&Phase::Wire) {
        match wire_phase(&ctx, opts, &mut node_logs, &mut failures).await {
            Ok(w) => wire = Some(w),
            Err(e) => failures.push(format!("wire: {e}")),
        }
    }

    node_logs.retain(|l| l.warn_or_error_lines > 0 || l.at_final_stop > 0);
    notes.push(format!(
        "the nodes and this client share the machine's {} core(s); other work on the machine \
         (load average at start {}) moves every figure",
        machine.nproc,
        machine.loadavg_at_start.as_deref().unwrap_or("?")
    ));
    if keyspace.is_some() {
        notes.push(
            "keyspace: the load and throughput runs write new keys; the 1-client updates PUT \
             random existing keys with a different body"
                .into(),
        );
    }
    if wire.is_some() {
        notes.push(
            "wire: bytes are UDP payloads through the emulator (QUIC and TLS overhead, \
             acknowledgements and keepalives included; IP/UDP headers not); net = minus the \
             idle baseline over a window of the same length"
                .into(),
        );
    }
    let targets = vec![rss_target(keyspace.as_ref())];
    let setup = ScaleSetup {
        meridian_bin: env.meridian_bin.clone(),
        data_dir: env.data_dir.clone(),
        data_dir_is_temporary: env.data_dir_is_temporary,
        data_dir_kept: !env.data_dir_is_temporary || env.keep_data,
        data_disk: env.disk.clone(),
        out_dir,
    };
    Ok(ScaleReport {
        scenario: "scale",
        machine,
        setup,
        config: opts.clone(),
        keyspace,
        regions,
        wire,
        targets,
        node_logs,
        failures,
        notes,
        total_secs: started.elapsed().as_secs_f64(),
    })
}

/// Prints the table and the context, writes `scale.json`; returns the failures.
pub fn publish(report: &ScaleReport, out_dir: &Path) -> Result<Vec<String>> {
    let m = &report.machine;
    let s = &report.setup;
    let mut text = String::new();
    let _ = writeln!(text, "meridian-bench scale  ({})", m.timestamp);
    let _ = writeln!(
        text,
        "machine:  {} core(s), kernel {}, {}/{}, commit {}, load average at start {}",
        m.nproc,
        m.kernel.as_deref().unwrap_or("?"),
        m.os,
        m.arch,
        m.git_commit.as_deref().unwrap_or("?"),
        m.loadavg_at_start.as_deref().unwrap_or("?")
    );
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
    let _ = writeln!(text, "took:     {:.0} s", report.total_secs);
    text.push('\n');
    text.push_str(&report::render_table(&report.table()));
    for t in &report.targets {
        let _ = writeln!(text, "target: {}: {} ({})", t.name, t.value, t.status);
    }
    for n in &report.notes {
        let _ = writeln!(text, "note: {n}");
    }
    text.push_str(&crate::lag::log_notes(&report.node_logs));
    for f in &report.failures {
        let _ = writeln!(text, "FAILED: {f}");
    }
    print!("{text}");
    let path = report::write_json(out_dir, "scale.json", report)?;
    println!("results: {}", path.display());
    Ok(report.failures.clone())
}

/// Runs `scale` and publishes it; Err on any failure.
pub async fn run_and_publish(common: &CommonArgs, opts: &ScaleOpts) -> Result<()> {
    let report = run(common, opts).await?;
    let failures = publish(&report, &common.out)?;
    report::scenario_result("scale", &failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_status_lines() {
        let status = "Name:\tmeridian\nVmPeak:\t  900000 kB\nVmHWM:\t  204800 kB\n\
                      VmRSS:\t  102400 kB\nRssAnon:\t   81920 kB\nRssFile:\t   20480 kB\n";
        assert_eq!(status_field_bytes(status, "VmRSS"), Some(100 * 1024 * 1024));
        assert_eq!(status_field_bytes(status, "VmHWM"), Some(200 * 1024 * 1024));
        // A prefix of another field's name is not that field.
        assert_eq!(status_field_bytes(status, "Vm"), None);
        assert_eq!(status_field_bytes(status, "VmSwap"), None);
        assert_eq!(status_field_bytes("VmRSS:\tlots kB\n", "VmRSS"), None);
        assert_eq!(status_field_bytes("VmRSS:\t12 MB\n", "VmRSS"), None);
        let m = memory_from_status(status).expect("VmRSS is there");
        assert_eq!(m.rss_anon_bytes, Some(80 * 1024 * 1024));
        assert_eq!(m.rss_file_bytes, Some(20 * 1024 * 1024));
        assert!(memory_from_status("Name:\tx\n").is_none());
        if cfg!(target_os = "linux") {
            assert!(read_memory(std::process::id()).is_some_and(|m| m.rss_bytes > 0));
        }
    }

    #[test]
    fn per_record_arithmetic() {
        assert_eq!(per_record(200_000_000, 1_000_000), Some(200.0));
        assert_eq!(per_record(5, 0), None);
        assert_eq!(marginal_per_record(150, 50, 10), Some(10.0));
        // Below the baseline (the allocator gave memory back) is zero, not negative.
        assert_eq!(marginal_per_record(40, 50, 10), Some(0.0));
        assert_eq!(
            project(&[(10_000, 20), (100_000, 110)], 1_000_000),
            Some(1010.0)
        );
        // The trend of the last 20 %, not the start-up: 80k → 100k adds 1 per 1,000.
        assert_eq!(
            project(&[(10_000, 20), (80_000, 90), (100_000, 110)], 1_000_000),
            Some(1010.0)
        );
        let p = project(&[(0, 5), (90_000, 100), (100_000, 110)], 1_000_000).unwrap();
        assert!((p - (110.0 + 945.0)).abs() < 1e-6, "{p}");
        assert_eq!(project(&[(1, 1)], 10), None);
        assert_eq!(project(&[(5, 1), (5, 2)], 10), None);
        // Memory given back does not project below the last reading.
        assert_eq!(project(&[(100, 50), (200, 40)], 1000), Some(40.0));
        // Flat for the last 40 % of the records.
        let pts = [
            (100, 10),
            (300, 50),
            (600, 100),
            (800, 100),
            (900, 100),
            (1000, 100),
        ];
        assert_eq!(plateau(&pts), Some((600, 100)));
        assert_eq!(project(&pts, 2000), Some(100.0));
        // Still growing: no plateau.
        assert_eq!(plateau(&[(100, 10), (200, 20), (300, 30), (400, 40)]), None);
        // Too short a flat stretch.
        assert_eq!(plateau(&[(100, 10), (900, 90), (1000, 90)]), None);
        assert_eq!(plateau(&[]), None);
        let f = wire_figures(10_500, 120, 500, 20, 100);
        assert_eq!(f.net_bytes, 10_000);
        assert_eq!(f.net_bytes_per_write, 100.0);
        assert_eq!(f.bytes_per_write, 105.0);
        assert_eq!(f.net_packets_per_write, 1.0);
        // More idle traffic than busy traffic clamps at zero.
        assert_eq!(wire_figures(10, 1, 20, 2, 1).net_bytes, 0);
        assert_eq!(wire_figures(10, 1, 0, 0, 0).bytes_per_write, 0.0);
    }

    #[test]
    fn topology_with_links_parses_and_routes_through_via() {
        let topo = region_nodes(&[(7001, 8001), (7002, 8002)]);
        assert_eq!(topo[0].id, "bench-a-1");
        assert_eq!(topo[1].region, "bench-b");
        let via_ab: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let via_ba: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let links = vec![
            (topo[0].id.clone(), topo[1].id.clone(), via_ab),
            (topo[1].id.clone(), topo[0].id.clone(), via_ba),
        ];
        let text = cluster_toml(&topo) + &links_toml(&links);
        assert!(text.contains(
            "[[links]]\nfrom = \"bench-a-1\"\nto = \"bench-b-1\"\nvia = \"127.0.0.1:9001\"\n"
        ));
        // The node's own parser reads it the same way.
        let parsed = meridian_node::config::Topology::parse(&text, Path::new("/tmp"))
            .expect("the generated topology parses");
        assert_eq!(parsed.dial_addr("bench-a-1", "bench-b-1"), Some(via_ab));
        assert_eq!(parsed.dial_addr("bench-b-1", "bench-a-1"), Some(via_ba));
        let specs = meridian_node::tools::proxy_cmd::link_specs(&parsed).expect("links");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].upstream, "127.0.0.1:7002".parse().unwrap());
    }

    #[test]
    fn five_regions_get_distinct_names() {
        let ports: Vec<(u16, u16)> = (0..5).map(|i| (7000 + i, 8000 + i)).collect();
        let topo = region_nodes(&ports);
        let text = cluster_toml(&topo);
        let parsed = meridian_node::config::Topology::parse(&text, Path::new("/tmp"))
            .expect("the generated topology parses");
        assert_eq!(parsed.nodes.len(), 5);
        assert_eq!(topo[4].id, "bench-e-1");
    }

    #[test]
    fn peers_connected_from_status() {
        let v = serde_json::json!({"peers": [{"connected": true}, {"connected": true}]});
        assert_eq!(all_peers_connected(&v, 2), Ok(true));
        assert_eq!(all_peers_connected(&v, 3), Ok(false));
        let v = serde_json::json!({"peers": [{"connected": true}, {"connected": false}]});
        assert_eq!(all_peers_connected(&v, 2), Ok(false));
        let v = serde_json::json!({"peers": [{"connected": "yes"}]});
        assert!(all_peers_connected(&v, 1).is_err());
        assert!(all_peers_connected(&serde_json::json!({}), 1).is_err());
    }

    #[test]
    fn takes_indexes_up_to_the_limit_only() {
        let next = AtomicU64::new(8);
        assert_eq!(take_index(&next, Stop::below(10)), Some(8));
        assert_eq!(take_index(&next, Stop::below(10)), Some(9));
        assert_eq!(take_index(&next, Stop::below(10)), None);
        assert_eq!(next.load(Ordering::Relaxed), 10);
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(take_index(&next, Stop::at(past)), None);
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(take_index(&next, Stop::at(later)), Some(10));
        let both = Stop {
            below: Some(100),
            at: Some(past),
        };
        assert_eq!(take_index(&next, both), None);
        assert_eq!(next.load(Ordering::Relaxed), 11);
        let mut rng = SplitMix64(1);
        assert!((0..1000).all(|_| rng.below(7) < 7));
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn validates_checkpoints() {
        assert!(validate(&ScaleOpts::default()).is_ok());
        let bad = ScaleOpts {
            checkpoints: vec![100, 10],
            ..ScaleOpts::default()
        };
        assert!(matches!(validate(&bad), Err(Error::Usage(_))));
        let none = ScaleOpts {
            phases: Vec::new(),
            ..ScaleOpts::default()
        };
        assert!(validate(&none).is_err());
    }

    #[test]
    fn defaults_match_the_command_line() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            scale: ScaleOpts,
        }
        let parsed = Wrap::try_parse_from(["x"]).expect("defaults parse").scale;
        let def = ScaleOpts::default();
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::to_value(&def).unwrap()
        );
    }

    #[test]
    fn measures_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 5000]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), b"xyz").unwrap();
        let u = dir_usage(dir.path()).unwrap();
        assert_eq!(u.files, 2);
        assert_eq!(u.file_bytes, 5003);
        assert!(u.allocated_bytes >= 4096 || u.allocated_bytes == 0);
    }
}
