//! The `write` scenario: fsync floor, durable write latency at one client,
//! throughput at N concurrent clients.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::CommonArgs;
use crate::cpu::CpuMeter;
use crate::error::{Context, Result};
use crate::fsync::{self, FsyncMode, FsyncStats};
use crate::http::{self, make_body};
use crate::rawhttp::{Endpoint, RawHttpConn};
use crate::report::{self, Machine, Row, thousands};
use crate::setup::{BenchEnv, SetupInfo};
use crate::stats::{
    KvWriter, LatencyMs, MergedClients, closed_loop, merge_clients, micros, new_histogram,
};

/// Target: p50 at one client within this much of the fsync p50.
const P50_MARGIN_MS: f64 = 0.5;
/// Target: durable writes per second at `TPUT_TARGET_CLIENTS` clients.
const TPUT_TARGET: f64 = 20_000.0;
const TPUT_TARGET_CLIENTS: usize = 64;
/// A throughput client gives up after this many failed requests.
/// The latency run gives up after this many failed requests.
const MAX_LATENCY_ERRORS: u64 = 100;
/// Error messages kept for the report.
const KEEP_ERRORS: usize = 3;

#[derive(Args, Debug, Clone, Serialize)]
#[command(next_help_heading = "Write scenario")]
pub struct WriteOpts {
    /// fdatasync samples for the raw fsync floor
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub fsync_samples: u64,

    /// How the fsync probe writes its 4 KiB block: append a new block each time
    /// (the file grows, like a log) or rewrite the same one
    #[arg(long, value_name = "MODE", value_enum, default_value_t = FsyncMode::Append)]
    pub fsync_mode: FsyncMode,

    /// Measured sequential writes at one client
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub latency_writes: u64,

    /// Unmeasured writes before the latency run
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub warmup: u64,

    /// Concurrent clients for the throughput run; a list runs each level in turn
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', default_value = "1,16,64,256", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub clients: Vec<u64>,

    /// Measured seconds per throughput level
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration_secs: u64,

    /// Unmeasured seconds of load before each throughput level
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub warmup_secs: u64,

    /// Size of each written JSON object, in bytes (approximately)
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    pub value_bytes: usize,

    /// First key segment: keys are PREFIX/lat/{i} and PREFIX/tput/{clients}/{client}/{i}
    #[arg(long, value_name = "PREFIX", default_value = "bench")]
    pub key_prefix: String,
}

#[derive(Debug, Serialize)]
pub struct LatencyStats {
    pub clients: u64,
    pub warmup_writes: u64,
    pub writes: u64,
    pub errors: u64,
    #[serde(flatten)]
    pub latency: LatencyMs,
}

#[derive(Debug, Serialize)]
pub struct ThroughputStats {
    pub clients: u64,
    pub warmup_secs: u64,
    /// Seconds from the end of the warm-up to the last measured answer.
    pub measured_secs: f64,
    pub writes: u64,
    pub writes_per_sec: f64,
    /// Failed requests, warm-up included.
    pub errors: u64,
    pub clients_gave_up: u64,
    /// CPU used by this bench process over the level (warm-up included), in cores.
    pub client_cpu_cores: Option<f64>,
    /// CPU used by the spawned node over the level, in cores (None for --target).
    pub node_cpu_cores: Option<f64>,
    #[serde(flatten)]
    pub latency: LatencyMs,
}

#[derive(Debug, Serialize)]
pub struct TargetResult {
    pub name: String,
    pub bound: String,
    pub value: String,
    /// "PASS", "MISS", or "n/a" (not measured in this run).
    pub status: &'static str,
}

#[derive(Debug, Serialize)]
pub struct WriteReport {
    pub scenario: &'static str,
    pub machine: Machine,
    pub setup: SetupInfo,
    pub config: WriteOpts,
    pub fsync_floor: FsyncStats,
    pub latency_1_client: Option<LatencyStats>,
    pub throughput: Vec<ThroughputStats>,
    pub targets: Vec<TargetResult>,
    /// HTTP errors and other failures; non-empty means a non-zero exit.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

impl WriteReport {
    pub fn table(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        rows.extend(self.fsync_floor.rows());

        if let Some(l) = &self.latency_1_client {
            let name = "write latency (1 client)";
            let bound = self.fsync_floor.p50_us as f64 / 1000.0 + P50_MARGIN_MS;
            let pass = if l.latency.p50_ms <= bound {
                "PASS"
            } else {
                "MISS"
            };
            rows.push(Row::new(
                name,
                "p50",
                format!("{:.3} ms", l.latency.p50_ms),
                format!("≤ {bound:.3} ms (fsync p50 + {P50_MARGIN_MS} ms): {pass}"),
            ));
            rows.push(Row::new(
                name,
                "p99",
                format!("{:.3} ms", l.latency.p99_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "p999",
                format!("{:.3} ms", l.latency.p999_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "max",
                format!("{:.3} ms", l.latency.max_ms),
                String::new(),
            ));
            rows.push(Row::new(
                name,
                "writes",
                l.writes.to_string(),
                String::new(),
            ));
            rows.push(Row::new(name, "errors", l.errors.to_string(), "0".into()));
        }

        for t in &self.throughput {
            let name = format!(
                "write throughput ({} client{})",
                t.clients,
                if t.clients == 1 { "" } else { "s" }
            );
            let target = if t.clients as usize == TPUT_TARGET_CLIENTS {
                let pass = if t.writes_per_sec >= TPUT_TARGET {
                    "PASS"
                } else {
                    "MISS"
                };
                format!("≥ {} writes/s: {pass}", thousands(TPUT_TARGET))
            } else {
                String::new()
            };
            rows.push(Row::new(
                &name,
                "writes/s",
                thousands(t.writes_per_sec),
                target,
            ));
            rows.push(Row::new(
                &name,
                "p50",
                format!("{:.3} ms", t.latency.p50_ms),
                String::new(),
            ));
            rows.push(Row::new(
                &name,
                "p99",
                format!("{:.3} ms", t.latency.p99_ms),
                String::new(),
            ));
            rows.push(Row::new(
                &name,
                "p999",
                format!("{:.3} ms", t.latency.p999_ms),
                String::new(),
            ));
            rows.push(Row::new(
                &name,
                "max",
                format!("{:.3} ms", t.latency.max_ms),
                String::new(),
            ));
            rows.push(Row::new(
                &name,
                "writes",
                format!("{} in {:.2} s", t.writes, t.measured_secs),
                String::new(),
            ));
            rows.push(Row::new(&name, "errors", t.errors.to_string(), "0".into()));
            let cores = |c: Option<f64>| c.map_or_else(|| "?".into(), |c| format!("{c:.2} cores"));
            if t.client_cpu_cores.is_some() || t.node_cpu_cores.is_some() {
                rows.push(Row::new(
                    &name,
                    "cpu",
                    format!(
                        "node {}, client {}",
                        cores(t.node_cpu_cores),
                        cores(t.client_cpu_cores)
                    ),
                    String::new(),
                ));
            }
        }
        rows
    }
}

fn targets(
    fsync: &FsyncStats,
    lat: Option<&LatencyStats>,
    tput: &[ThroughputStats],
) -> Vec<TargetResult> {
    let bound = fsync.p50_us as f64 / 1000.0 + P50_MARGIN_MS;
    let mut out = vec![match lat {
        Some(l) => TargetResult {
            name: "p50 at 1 client ≤ fsync p50 + 0.5 ms".into(),
            bound: format!("{bound:.3} ms"),
            value: format!("{:.3} ms", l.latency.p50_ms),
            status: if l.latency.p50_ms <= bound {
                "PASS"
            } else {
                "MISS"
            },
        },
        None => TargetResult {
            name: "p50 at 1 client ≤ fsync p50 + 0.5 ms".into(),
            bound: format!("{bound:.3} ms"),
            value: "not measured".into(),
            status: "n/a",
        },
    }];
    let name = format!(
        "≥ {} durable writes/s at {TPUT_TARGET_CLIENTS} clients",
        thousands(TPUT_TARGET)
    );
    out.push(
        match tput
            .iter()
            .find(|t| t.clients as usize == TPUT_TARGET_CLIENTS)
        {
            Some(t) => TargetResult {
                name,
                bound: format!("{} writes/s", thousands(TPUT_TARGET)),
                value: format!("{} writes/s", thousands(t.writes_per_sec)),
                status: if t.writes_per_sec >= TPUT_TARGET {
                    "PASS"
                } else {
                    "MISS"
                },
            },
            None => TargetResult {
                name,
                bound: format!("{} writes/s", thousands(TPUT_TARGET)),
                value: "not measured".into(),
                status: "n/a",
            },
        },
    );
    out
}

/// Runs the scenario. `Err` only for failures to set up; HTTP errors during the
/// measurements land in `WriteReport::failures`.
pub async fn run(common: &CommonArgs, opts: &WriteOpts) -> Result<WriteReport> {
    let machine = Machine::collect();
    let mut env = BenchEnv::prepare(common, "write")?;
    let max_clients = opts.clients.iter().copied().max().unwrap_or(1) as usize;
    let http = http::client(max_clients)?;

    let mut notes = Vec::new();
    if env.external {
        eprintln!(
            "meridian-bench: benchmarking the running node at {}",
            env.target_url
        );
        notes.push(format!(
            "benchmarked an already running node at {}; the fsync floor was measured in {}, \
             which need not be on that node's disk",
            env.target_url,
            env.data_dir.display()
        ));
    }
    eprintln!(
        "meridian-bench: data dir {} on {}",
        env.data_dir.display(),
        env.disk.describe()
    );
    notes.extend(env.disk.setup_notes());
    if let Some(bin) = &env.meridian_bin
        && bin
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "debug")
    {
        notes.push(format!(
            "{} looks like a debug build; figures are not representative",
            bin.display()
        ));
    }

    // An external node must be up before anything is measured.
    if env.external {
        env.start_node(&http, "write").await?;
    }

    // 1. The fsync floor, before the node runs, so nothing competes for the disk.
    eprintln!(
        "meridian-bench: fsync floor: {} × 4 KiB fdatasync in {}",
        opts.fsync_samples,
        env.data_dir.display()
    );
    let fsync_stats = {
        let dir = env.data_dir.clone();
        let (samples, mode) = (opts.fsync_samples, opts.fsync_mode);
        tokio::task::spawn_blocking(move || fsync::measure(&dir, samples, mode))
            .await
            .context("the fsync probe thread failed")??
    };

    // 2. The node.
    if !env.external {
        eprintln!(
            "meridian-bench: starting {}",
            display_opt(&env.meridian_bin)
        );
    }
    env.start_node(&http, "write").await?;
    eprintln!("meridian-bench: node ready at {}", env.target_url);
    // The write load goes through the bench's own lean HTTP/1.1 client (see rawhttp.rs).
    let endpoint = Endpoint::resolve(&env.target_url)
        .await
        .context("the node's address")?;

    let mut failures = Vec::new();

    // 3. Latency at one client.
    eprintln!(
        "meridian-bench: latency: {} warm-up + {} sequential writes",
        opts.warmup, opts.latency_writes
    );
    let (lat, lat_errors) = latency_run(&endpoint, opts).await;
    if lat.errors > 0 {
        failures.push(format!(
            "{} of {} latency writes failed; first: {}",
            lat.errors,
            opts.warmup + opts.latency_writes,
            lat_errors.join(" | ")
        ));
    }
    if let Err(e) = env.check_node() {
        failures.push(e.to_string());
    }

    // 4. Throughput, one level at a time; skipped once something failed.
    let mut tput = Vec::new();
    if failures.is_empty() {
        for &clients in &opts.clients {
            eprintln!(
                "meridian-bench: throughput: {clients} clients, {} s warm-up + {} s measured",
                opts.warmup_secs, opts.duration_secs
            );
            let client_cpu = CpuMeter::start(None);
            let node_pid = env.node_pid();
            let node_cpu = node_pid.map(|p| CpuMeter::start(Some(p)));
            let (mut stats, errors) = throughput_run(&endpoint, opts, clients).await;
            stats.client_cpu_cores = client_cpu.cores();
            stats.node_cpu_cores = node_cpu.and_then(|m| m.cores());
            if stats.errors > 0 {
                failures.push(format!(
                    "{} writes failed at {clients} clients; first: {}",
                    stats.errors,
                    errors.join(" | ")
                ));
            }
            tput.push(stats);
            if let Err(e) = env.check_node() {
                failures.push(e.to_string());
            }
            if !failures.is_empty() {
                break;
            }
        }
    } else {
        notes.push("throughput was not measured because the latency run failed".into());
    }

    // 5. Stop the node now, so the report can say how it went.
    let node_stop = env.stop_node();
    if let Some(s) = &node_stop {
        eprintln!("meridian-bench: node {s}");
    }
    if env.info(None).client_and_server_share_cores == Some(true) {
        notes.push(format!(
            "the node and this client share the machine's {} core(s): client CPU time is taken from the node",
            machine.nproc
        ));
    }

    let latency_1_client = Some(lat);
    Ok(WriteReport {
        scenario: "write",
        targets: targets(&fsync_stats, latency_1_client.as_ref(), &tput),
        machine,
        setup: env.info(node_stop),
        config: opts.clone(),
        fsync_floor: fsync_stats,
        latency_1_client,
        throughput: tput,
        failures,
        notes,
    })
}

fn display_opt(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "?".into(), |p| p.display().to_string())
}

async fn latency_run(endpoint: &Endpoint, opts: &WriteOpts) -> (LatencyStats, Vec<String>) {
    let mut hist = new_histogram();
    let mut errors = 0u64;
    let mut first_errors = Vec::new();
    // One keep-alive connection for the whole run.
    let mut conn = RawHttpConn::new(endpoint.clone());
    let mut path = String::with_capacity(opts.key_prefix.len() + 40);
    let total = opts.warmup + opts.latency_writes;
    for i in 0..total {
        path.clear();
        let _ = write!(path, "/v1/kv/{}/lat/{i}", opts.key_prefix);
        let body = make_body(i, opts.value_bytes);
        let start = Instant::now();
        let res = conn.put_checked(&path, &body).await;
        let elapsed = start.elapsed();
        match res {
            Ok(()) => {
                if i >= opts.warmup {
                    hist.saturating_record(micros(elapsed));
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
    let stats = LatencyStats {
        clients: 1,
        warmup_writes: opts.warmup,
        writes: hist.len(),
        errors,
        latency: LatencyMs::from_histogram(&hist),
    };
    (stats, first_errors)
}

async fn throughput_run(
    endpoint: &Endpoint,
    opts: &WriteOpts,
    clients: u64,
) -> (ThroughputStats, Vec<String>) {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(opts.warmup_secs);
    let until = measure_from + Duration::from_secs(opts.duration_secs);
    let prefix: Arc<str> = Arc::from(format!("{}/tput/{clients}", opts.key_prefix).as_str());

    let mut tasks = Vec::with_capacity(clients as usize);
    for c in 0..clients {
        // One body per client, built once and shared by all its requests.
        let body: &'static [u8] = make_body(c, opts.value_bytes).leak();
        let writer = MeridianWriter {
            conn: RawHttpConn::new(endpoint.clone()),
            prefix: Arc::clone(&prefix),
            client: c,
            body,
            path: String::with_capacity(prefix.len() + 48),
        };
        tasks.push(tokio::spawn(closed_loop(writer, measure_from, until)));
    }

    let MergedClients {
        hist,
        errors,
        gave_up,
        first_errors,
        measured_secs,
    } = merge_clients(tasks, measure_from).await;
    let writes = hist.len();
    let stats = ThroughputStats {
        clients,
        warmup_secs: opts.warmup_secs,
        measured_secs,
        writes,
        writes_per_sec: if measured_secs > 0.0 {
            writes as f64 / measured_secs
        } else {
            0.0
        },
        errors,
        clients_gave_up: gave_up,
        client_cpu_cores: None,
        node_cpu_cores: None,
        latency: LatencyMs::from_histogram(&hist),
    };
    (stats, first_errors)
}

/// One client on its own keep-alive connection, writing unique keys `PREFIX/{client}/{i}`.
struct MeridianWriter {
    conn: RawHttpConn,
    prefix: Arc<str>,
    client: u64,
    body: &'static [u8],
    path: String,
}

impl KvWriter for MeridianWriter {
    async fn write(&mut self, i: u64) -> std::result::Result<(), String> {
        self.path.clear();
        let _ = write!(self.path, "/v1/kv/{}/{}/{i}", self.prefix, self.client);
        self.conn.put_checked(&self.path, self.body).await
    }
}

/// Prints the table and the context, writes `write.json`; returns the failures.
pub fn publish(report: &WriteReport, out_dir: &std::path::Path) -> Result<Vec<String>> {
    let s = &report.setup;
    let m = &report.machine;
    let mut text = String::new();
    let _ = writeln!(text, "meridian-bench write  ({})", m.timestamp);
    let _ = writeln!(
        text,
        "machine:  {} core(s), kernel {}, {}/{}, commit {}",
        m.nproc,
        m.kernel.as_deref().unwrap_or("?"),
        m.os,
        m.arch,
        m.git_commit.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        text,
        "node:     {} at {}{}",
        s.node,
        s.target_url,
        s.meridian_bin
            .as_ref()
            .map(|b| format!(" ({})", b.display()))
            .unwrap_or_default()
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
    match s.client_and_server_share_cores {
        Some(true) => {
            let _ = writeln!(
                text,
                "cores:    the node and the bench client share these {} core(s)",
                m.nproc
            );
        }
        _ => {
            let _ = writeln!(
                text,
                "cores:    the node may run elsewhere; the client uses {} core(s)",
                m.nproc
            );
        }
    }
    text.push('\n');
    text.push_str(&report::render_table(&report.table()));
    for n in &report.notes {
        let _ = writeln!(text, "note: {n}");
    }
    for f in &report.failures {
        let _ = writeln!(text, "FAILED: {f}");
    }
    print!("{text}");

    let path = report::write_json(out_dir, "write.json", report)?;
    println!("results: {}", path.display());
    if let Some(log) = &s.node_log {
        println!("node log: {}", log.display());
    }
    Ok(report.failures.clone())
}

/// Runs `write` and publishes it; Err on any failure.
pub async fn run_and_publish(common: &CommonArgs, opts: &WriteOpts) -> Result<()> {
    let report = run(common, opts).await?;
    let failures = publish(&report, &common.out)?;
    report::scenario_result("write", &failures)
}
