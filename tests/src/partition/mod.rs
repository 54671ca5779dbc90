//! `partition-suite`: a Jepsen-style run against real `meridian serve` processes. Every
//! inter-node link goes through the in-process link emulator; workloads record a history, a
//! seeded nemesis injects partitions, latency/loss, SIGKILL (with clock skew on restart),
//! SIGSTOP pauses, a full disk and a damaged record; after the final heal the checkers run
//! and a summary is printed. Exit status 1 on any violation, with the seed that reproduces
//! the schedule.
//!
//! A run: [`workload`]s write while the [`nemesis`] faults, both recording into the
//! [`history`]; then every fault is healed, the [`checkers`] judge the history against what
//! the nodes finally hold, and the [`summary`] is written.

mod checkers;
mod disk;
mod history;
mod nemesis;
mod rng;
mod runner;
mod summary;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use meridian_emulator::{Emulator, EmulatorOptions};
use meridian_harness::{
    DEADLINE, Residency, TopologyText, free_udp_port, loopback, meridian_bin, meridian_bin_in,
    poll_until,
};
use meridian_node::config::Topology;
use serde_json::{Value, json};

use crate::{Cluster, REGIONS};
use checkers::Report;
use history::{Op, Shared};
use rng::Rng;
use runner::Runner;
use summary::Findings;
use workload::Workload;

const PINNED_PREFIX: &str = "users/eu/";
const HOME_REGION: usize = 0; // eu-west is REGIONS[0]
const COUNTERS: usize = 3;
const HOT_KEYS: usize = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(120);
const CONVERGENCE_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The topology's `[clock] max_drift_ms`.
const MAX_DRIFT_MS: i64 = crate::MAX_DRIFT_MS as i64;
/// Workloads run alone this long before the first fault.
const WARM_UP: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(about = "Jepsen-style partition suite against real meridian processes")]
pub struct Args {
    /// Number of regions (one node each).
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// Length of the faulty phase (workloads + nemesis).
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Seed of every random choice (default: from the clock; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where to write history.jsonl, summary.json and node logs (default: a temp folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The whole command: 0 when the run found no violation, 1 when it did, 2 on bad arguments.
pub fn main(args: Args) -> ExitCode {
    if let Some(code) = reexec_with_meridian_bin() {
        return code;
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("partition-suite seed: {seed}");
    if !(2..=REGIONS.len()).contains(&args.regions) {
        eprintln!("--regions must be between 2 and {}", REGIONS.len());
        return ExitCode::from(2);
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("meridian-partition-suite-{seed}")));
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("cannot create {}: {e}", out.display());
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let ok = rt.block_on(run(&args, seed, &out));
    println!("output: {}", out.display());
    if ok {
        println!("PASS (seed {seed})");
        ExitCode::SUCCESS
    } else {
        println!(
            "FAIL: violations found; reproduce with --seed {seed} --regions {} --duration-secs {}",
            args.regions, args.duration_secs
        );
        ExitCode::from(1)
    }
}

/// `meridian_harness::meridian_bin()` looks for `meridian` one folder above the running
/// executable (right for test executables in `deps/`); this binary sits beside it. Point
/// `MERIDIAN_BIN` at the sibling (building it if missing) and re-run ourselves with it set.
fn reexec_with_meridian_bin() -> Option<ExitCode> {
    if std::env::var_os("MERIDIAN_BIN").is_some() {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let bin = match meridian_bin_in(dir) {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("{e}");
            return Some(ExitCode::from(1));
        }
    };
    let status = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env("MERIDIAN_BIN", &bin)
        .status();
    Some(match status.ok().and_then(|s| s.code()) {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}

/// One run; whether it found no violation.
async fn run(args: &Args, seed: u64, out: &Path) -> bool {
    let Some((mut runner, emulator)) = start_cluster(args.regions, seed).await else {
        return false;
    };
    let em = emulator.handle();
    let shared = Arc::new(Shared::new(args.regions));
    let mut rng = Rng::new(seed);
    let workers = spawn_workloads(&runner, &shared, &mut rng);

    tokio::time::sleep(WARM_UP).await;
    let faulty = Duration::from_secs(args.duration_secs);
    nemesis::run_schedule(&mut runner, &em, &shared, &mut rng, faulty).await;
    nemesis::heal(&em);
    shared.stop_workloads();
    for w in workers {
        let _ = w.await;
    }
    let heal_at = restart_stopped(&mut runner, &shared).await;

    let history = shared.history();
    let mut report = Report::default();
    for p in std::mem::take(&mut runner.problems) {
        report.violation(p);
    }
    let findings = check(&mut runner, &history, heal_at, out, &mut report).await;
    summary::publish(
        &summary::Run {
            seed,
            regions: &runner.regions,
            duration_secs: args.duration_secs,
            history: &history,
            applied: &runner.applied,
            nemesis_log: &runner.log,
            violations: &report.violations,
        },
        &findings,
        out,
    );
    drop(emulator);
    report.violations.is_empty()
}

/// `n` nodes, every dial between them through the emulator, all peers connected; `None`
/// (after saying why) if they never connect.
async fn start_cluster(n: usize, seed: u64) -> Option<(Runner, Emulator)> {
    let rule = TopologyText::new().residency(
        &Residency::new("eu-personal-data", &format!("{PINNED_PREFIX}*"), "eu-west")
            .foreign("forward"),
    );
    let mut cluster = Cluster::with_extra(n, &rule);
    let disks = disk::mount_data_disks(&cluster);
    if let Err(why) = &disks {
        println!("the disk-full nemesis will be skipped: {why}");
    }
    let links_topology = write_links_topology(&cluster);
    let topo = Topology::load(&links_topology).expect("valid links topology");
    let emulator = meridian_node::tools::proxy_cmd::start(
        &topo,
        EmulatorOptions {
            seed: Some(seed),
            ..EmulatorOptions::default()
        },
    )
    .await
    .expect("start the link emulator");
    for i in 0..n {
        cluster.start_with(i, &links_topology, &["--test-clock-control"]);
    }
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("http client");
    let runner = Runner::new(cluster, disks, links_topology, client);
    for i in 0..n {
        runner.cluster.wait_ready(i, &runner.client).await;
    }
    let mut all_connected = true;
    for i in 0..n {
        all_connected &= poll_until(DEADLINE, || runner.peers_connected(i)).await;
    }
    if !all_connected {
        eprintln!("peers did not all connect through the emulator within 60 s");
        return None;
    }
    println!(
        "{n} nodes ready, every link through the emulator ({} links)",
        emulator.handle().links().len()
    );
    Some((runner, emulator))
}

/// The cluster's topology plus one `[[links]]` entry per ordered pair of nodes, each through
/// its own emulator port.
fn write_links_topology(cluster: &Cluster) -> PathBuf {
    let text = std::fs::read_to_string(&cluster.topology).expect("read topology");
    let mut links = TopologyText::new()
        .comment("Added by partition-suite: every dial goes through the link emulator.");
    for from in &cluster.nodes {
        for to in &cluster.nodes {
            if from.id != to.id {
                links = links.link(&from.id, &to.id, loopback(free_udp_port()));
            }
        }
    }
    let path = cluster.dir.path().join("topology-links.toml");
    std::fs::write(&path, format!("{text}{links}")).expect("write links topology");
    path
}

/// One workload per region, each seeded from `rng` in region order.
fn spawn_workloads(
    runner: &Runner,
    shared: &Arc<Shared>,
    rng: &mut Rng,
) -> Vec<tokio::task::JoinHandle<()>> {
    runner
        .regions
        .iter()
        .enumerate()
        .map(|(i, region)| {
            let workload = Workload {
                process: i,
                base: runner.cluster.url(i, ""),
                region: region.clone(),
                seed: rng.next(),
            };
            tokio::spawn(workload.run(Arc::clone(shared), runner.client.clone()))
        })
        .collect()
}

/// Every node running again (a restart might have been cut short by the deadline: none
/// are); when the final heal is complete.
async fn restart_stopped(runner: &mut Runner, shared: &Shared) -> Instant {
    for i in 0..runner.ids.len() {
        if runner.cluster.process(i).is_none() {
            runner.restart(i, 0).await;
        }
    }
    let heal_at = Instant::now();
    runner.note(
        shared,
        "final heal; workloads stopped; waiting for convergence".into(),
    );
    heal_at
}

/// Every checker over the history and the healed cluster; stops the nodes to audit them.
async fn check(
    runner: &mut Runner,
    history: &[Op],
    heal_at: Instant,
    out: &Path,
    report: &mut Report,
) -> Findings {
    let n = runner.ids.len();
    let (converged_after, snaps) = wait_for_convergence(runner, history, heal_at, report).await;
    let lost = checkers::lost_writes(&snaps, n, history);
    if lost > 0 {
        report.violation(format!("{lost} acknowledged writes lost or wrong"));
    }
    checkers::check_pinned_stay_home(&snaps, &runner.regions, report);
    let counters = if let Some(s0) = snaps.first() {
        checkers::check_hot_keys(s0, history, report);
        checkers::check_counters(s0, history, report)
    } else {
        Value::Null
    };
    let versions_checked = check_versions(runner, history, report);
    let availability = checkers::check_availability(history, &runner.regions, report);
    let audits = audit_residency(runner, report);
    let panics = count_panics(runner, out, report);
    Findings {
        converged_after,
        lost,
        counters,
        versions_checked,
        availability,
        audits,
        panics,
    }
}

/// Polls every node's snapshot until they agree and hold every acknowledged write, up to
/// [`CONVERGENCE_DEADLINE`]: how long that took, and the last complete snapshots.
async fn wait_for_convergence(
    runner: &Runner,
    history: &[Op],
    heal_at: Instant,
    report: &mut Report,
) -> (Option<Duration>, Vec<BTreeMap<String, Value>>) {
    let mut converged_after: Option<Duration> = None;
    let mut last_problems = Vec::new();
    let mut snaps: Vec<BTreeMap<String, Value>> = Vec::new();
    while heal_at.elapsed() < CONVERGENCE_DEADLINE {
        if let Some(s) = runner.snapshots().await {
            let problems = checkers::convergence_problems(&s, history);
            snaps = s;
            if problems.is_empty() {
                converged_after = Some(heal_at.elapsed());
                break;
            }
            last_problems = problems;
        }
        tokio::time::sleep(CONVERGENCE_POLL_INTERVAL).await;
    }
    if converged_after.is_none() {
        report.violation(format!(
            "no convergence within {CONVERGENCE_DEADLINE:?} after the final heal; {} problems, e.g. {:?}",
            last_problems.len(),
            last_problems.iter().take(5).collect::<Vec<_>>()
        ));
    }
    (converged_after, snaps)
}

/// [`checkers::check_versions`], judging each write by the node that served it: its own
/// region's, or the region that answered a forward.
fn check_versions(runner: &Runner, history: &[Op], report: &mut Report) -> usize {
    let regions = &runner.regions;
    let node_parts: HashMap<&str, String> = regions
        .iter()
        .zip(&runner.ids)
        .map(|(r, id)| (r.as_str(), checkers::version_node_part(id)))
        .collect();
    let served = |o: &Op| {
        let region = o.served_by_region.as_deref().unwrap_or(&regions[o.process]);
        node_parts.get(region).cloned()
    };
    checkers::check_versions(history, &served, report)
}

/// Residency: stops every node and audits its data directory offline.
fn audit_residency(runner: &mut Runner, report: &mut Report) -> Vec<Value> {
    let mut audits = Vec::new();
    for i in 0..runner.ids.len() {
        runner.cluster.stop(i);
        let id = &runner.ids[i];
        let res = Command::new(meridian_bin())
            .args(["residency", "audit", "--topology"])
            .arg(&runner.cluster.topology)
            .arg("--data-dir")
            .arg(runner.cluster.data_dir(i))
            .output();
        match res {
            Ok(o) if o.status.success() => audits.push(json!({"node": id, "clean": true})),
            Ok(o) => {
                report.violation(format!(
                    "residency audit of {id} exit {:?}: {}{}",
                    o.status.code(),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
                audits.push(json!({"node": id, "clean": false}));
            }
            Err(e) => report.violation(format!("cannot run the residency audit: {e}")),
        }
    }
    audits
}

/// Panics in node logs (logs are appended across restarts); copies every log into `out`.
fn count_panics(runner: &Runner, out: &Path, report: &mut Report) -> usize {
    let mut panics = 0;
    for (i, id) in runner.ids.iter().enumerate() {
        let log_path = runner.cluster.log_path(i);
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::copy(&log_path, out.join(format!("{id}.log")));
        let count = text.matches("panicked").count();
        if count > 0 {
            panics += count;
            report.violation(format!("{id} log has {count} 'panicked' lines"));
        }
    }
    panics
}
