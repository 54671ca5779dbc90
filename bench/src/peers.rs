//! The `peers` scenario (issue 6): baselines measured in the same run, on the same machine and
//! disk, with the same payload as `write`:
//!
//! - Redis with `appendfsync always`, the local durable-write floor;
//! - a 3-node etcd cluster, the consensus peer, whose peer links go through the in-process link
//!   emulator (TCP relaying) at the one-way delays Meridian is measured with.
//!
//! Both are Debian's packages (`redis-server` 7.0, `etcd-server` 3.4), installed with apt-get
//! when missing, started on free loopback ports with data under the bench data root, and stopped
//! at the end (SIGTERM, then SIGKILL after 10 s), on errors too.
//!
//! etcd peer wiring. Every member advertises one peer URL, which must be the same string for all
//! members (member ids are hashes of the advertised URLs, and `--initial-cluster` must agree with
//! them), so the URL cannot say who is dialling. It points at a "front door" of the bench; the
//! front door reads the request head of each new connection, finds the sender in the
//! `X-PeerURLs` header etcd puts on its raft requests (pipeline and stream), and hands the
//! connection to the emulator link `sender -> member`, whose upstream is the member's real peer
//! listener. Connections without that header (version probes) take the link from the first
//! other member. A list of advertised URLs per member does not help: etcd sorts them and every
//! peer dials the first one that answers.
//!
//! On a link `X -> Y` (X dialled Y) the forward direction carries X's requests and the reverse
//! direction what Y streams back: etcd delivers raft messages from Y to X on the stream X opened
//! to Y. Delays are set on both directions, so every message crosses exactly one delay.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use meridian_emulator::{DirectionSel, Emulator, EmulatorOptions, LinkSpec, SettingsUpdate};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::CommonArgs;
use crate::cpu::CpuMeter;
use crate::error::{Context, Error, Result};
use crate::fsync::{self, FsyncMode, FsyncStats};
use crate::http::{self, error_chain, make_body};
use crate::node::log_tail;
use crate::report::{self, Machine, Row, thousands};
use crate::setup::{DiskInfo, command_stdout};
use crate::stats::{KvWriter, LatencyMs, MergedClients, closed_loop, merge_clients};

/// The members of the etcd cluster, in the order their ports are picked.
pub const ETCD_MEMBERS: [&str; 3] = ["etcd-a", "etcd-b", "etcd-c"];
/// Concurrent clients of the etcd throughput runs.
const ETCD_TPUT_CLIENTS: u64 = 64;
/// One-way delays at which etcd throughput is measured (when they are in `--delays-ms`).
const ETCD_TPUT_DELAYS_MS: [u64; 2] = [0, 40];
/// One-way delay of the single figure taken at a follower.
const FOLLOWER_DELAY_MS: u64 = 40;
/// etcd's default heartbeat; the election timeout is derived from the delays.
const ETCD_HEARTBEAT_MS: u64 = 100;
/// etcd's default election timeout, and the upper bound etcd accepts.
const ETCD_ELECTION_MIN_MS: u64 = 1000;
const ETCD_ELECTION_MAX_MS: u64 = 50_000;
/// fdatasync samples of the fsync floor printed next to the Redis figures.
const FSYNC_SAMPLES: u64 = 200;
/// Every request gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A client gives up after this many failed requests.
/// Largest Redis reply line read; SET and PING answer a few bytes.
const MAX_REPLY_BYTES: usize = 4096;
/// Largest request head a front door reads before choosing a link.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a front door waits for a request head before using the default link.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections a front door relays at once; further ones wait to be accepted.
const MAX_FRONT_CONNECTIONS: usize = 256;
/// How long a process gets to exit on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Between stopping the etcd followers and stopping the leader.
const LEADER_STOP_PAUSE: Duration = Duration::from_secs(1);

#[derive(Args, Clone, Debug, PartialEq, Serialize)]
#[command(next_help_heading = "Peers scenario")]
pub struct PeersOpts {
    /// Concurrent Redis clients; a list runs each level in turn
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', default_value = "1,16,64,256", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub clients: Vec<u64>,

    /// One-way delays (ms) set on every etcd peer link, one run each
    #[arg(long, value_name = "MS[,MS...]", value_delimiter = ',', default_value = "0,10,40,75,150", value_parser = clap::value_parser!(u64).range(0..=2000))]
    pub delays_ms: Vec<u64>,

    /// Measured seconds per Redis level
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration_secs: u64,

    /// Unmeasured seconds of load before each Redis level and each etcd run
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub warmup_secs: u64,

    /// Measured seconds per etcd run (each delay, each throughput level)
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub etcd_duration_secs: u64,

    /// Size of each written value, in bytes (approximately; the JSON object of `write`)
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    pub value_bytes: usize,
}

impl Default for PeersOpts {
    fn default() -> Self {
        PeersOpts {
            clients: vec![1, 16, 64, 256],
            delays_ms: vec![0, 10, 40, 75, 150],
            duration_secs: 10,
            warmup_secs: 2,
            etcd_duration_secs: 5,
            value_bytes: 200,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Serialize)]
pub struct PeersReport {
    pub scenario: &'static str,
    pub machine: Machine,
    pub config: PeersOpts,
    pub install: InstallInfo,
    pub versions: Versions,
    pub data_dir: PathBuf,
    pub data_dir_kept: bool,
    pub data_disk: DiskInfo,
    /// Raw 4 KiB fdatasync in the data directory, before anything runs: what one durable
    /// write costs at least.
    pub fsync_floor: Option<FsyncStats>,
    pub redis: Option<RedisReport>,
    pub etcd: Option<EtcdReport>,
    /// Failures; non-empty means a non-zero exit.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    /// First line of `etcd --version`.
    pub etcd: Option<String>,
    /// `redis-server --version`.
    pub redis: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RedisReport {
    pub durability: &'static str,
    pub address: String,
    pub command_line: Vec<String>,
    pub log: PathBuf,
    pub levels: Vec<LevelStats>,
    pub stop: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EtcdReport {
    pub durability: &'static str,
    /// How the peer links go through the emulator.
    pub wiring: &'static str,
    pub election: String,
    pub members: Vec<EtcdMemberInfo>,
    /// Where the latency and throughput runs sent their puts.
    pub measured_at: String,
    pub leader: String,
    /// The leader after the last run (a change means an election happened during the runs).
    pub leader_at_end: Option<String>,
    /// One client, sequential puts at the leader, per one-way delay.
    pub delays: Vec<EtcdLatency>,
    /// `ETCD_TPUT_CLIENTS` concurrent clients at the leader.
    pub throughput: Vec<EtcdThroughput>,
    /// One client, sequential puts at a follower, at `FOLLOWER_DELAY_MS`.
    pub follower: Option<EtcdLatency>,
    /// Bytes each emulator link carried over the whole run: every link must have carried some.
    pub links: Vec<LinkTraffic>,
    pub front_doors: Vec<FrontDoorStats>,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EtcdMemberInfo {
    pub name: String,
    pub member_id: Option<String>,
    pub client_url: String,
    pub peer_listen_url: String,
    pub advertised_peer_url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct EtcdLatency {
    pub delay_ms: u64,
    pub member: String,
    pub role: &'static str,
    /// The least a put can take at the leader: one round trip to a follower.
    pub round_trip_ms: u64,
    #[serde(flatten)]
    pub stats: LevelStats,
}

#[derive(Debug, Serialize)]
pub struct EtcdThroughput {
    pub delay_ms: u64,
    pub member: String,
    #[serde(flatten)]
    pub stats: LevelStats,
}

#[derive(Debug, Serialize)]
pub struct LinkTraffic {
    pub link: String,
    pub via: String,
    pub upstream: String,
    /// From the dialler to the member it dialled.
    pub bytes_forward: u64,
    pub bytes_reverse: u64,
    /// Connections open through the link at the end.
    pub open_connections: u64,
    /// Connections the link closed at once because it had too many open.
    pub connections_refused: u64,
}

#[derive(Debug, Serialize)]
pub struct FrontDoorStats {
    pub member: String,
    pub advertised_peer_url: String,
    /// Connections handed to the link `source -> member`, by source: etcd's raft streams and
    /// pipeline requests.
    pub connections_by_source: BTreeMap<String, u64>,
    /// Connections without an `X-PeerURLs` header naming a member, sent on the default link:
    /// etcd's `/version` probes, a new connection every few seconds.
    pub unidentified: u64,
    pub relay_connect_failures: u64,
    pub accept_errors: u64,
}

/// Load at one concurrency level (Redis) or one etcd run.
#[derive(Debug, Serialize)]
pub struct LevelStats {
    pub clients: u64,
    pub warmup_secs: u64,
    /// Seconds from the end of the warm-up to the last measured answer.
    pub measured_secs: f64,
    pub writes: u64,
    pub writes_per_sec: f64,
    /// Failed requests, warm-up included.
    pub errors: u64,
    pub clients_gave_up: u64,
    pub first_errors: Vec<String>,
    /// CPU of the server process(es) over the level, in cores.
    pub server_cpu_cores: Option<f64>,
    /// CPU of this bench process (clients, and for etcd the emulator and front doors), in cores.
    pub client_cpu_cores: Option<f64>,
    #[serde(flatten)]
    pub latency: LatencyMs,
}

const REDIS_DURABILITY: &str = "appendonly yes, appendfsync always: every write is appended to \
    the AOF and fsync'd before its reply is sent (commands that arrive in the same event-loop \
    pass share one fsync); RDB snapshots off (save \"\"); automatic AOF rewrite off \
    (auto-aof-rewrite-percentage 0) so that no background rewrite runs during the measurement";

const ETCD_DURABILITY: &str = "etcd defaults (no --unsafe-no-fsync): every member fsyncs its WAL \
    before it acknowledges raft entries, so a put is answered once it is in the fsync'd WAL of the \
    leader and of at least one follower (a majority of 3) and applied on the member asked; the \
    bbolt backend is committed in batches (--backend-batch-interval 100 ms) and recovered from \
    the WAL";

const ETCD_WIRING: &str = "each member advertises one peer URL: a front door in the bench that \
    reads the X-PeerURLs header of each new peer connection and hands it to the emulator link \
    'sender -> member' (TCP relay to the member's real peer listener); delays are set on both \
    directions of all 6 links, so every raft message crosses one delay and a put at the leader \
    takes at least 2 x delay";

impl PeersReport {
    pub fn table(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let ms = |v: f64| format!("{v:.3} ms");
        if let Some(f) = &self.fsync_floor {
            rows.extend(f.rows());
        }
        if let Some(r) = &self.redis {
            for l in &r.levels {
                let name = format!("redis SET ({} client{})", l.clients, plural(l.clients));
                rows.push(Row::new(
                    &name,
                    "writes/s",
                    thousands(l.writes_per_sec),
                    String::new(),
                ));
                for (metric, v) in [
                    ("p50", l.latency.p50_ms),
                    ("p99", l.latency.p99_ms),
                    ("p999", l.latency.p999_ms),
                ] {
                    rows.push(Row::new(&name, metric, ms(v), String::new()));
                }
                rows.push(Row::new(
                    &name,
                    "writes",
                    format!("{} in {:.2} s", l.writes, l.measured_secs),
                    String::new(),
                ));
                rows.push(Row::new(&name, "errors", l.errors.to_string(), "0".into()));
            }
        }
        if let Some(e) = &self.etcd {
            for l in e.delays.iter().chain(e.follower.iter()) {
                let name = format!(
                    "etcd put at {} ({}), 1 client, delay {} ms",
                    l.role, l.member, l.delay_ms
                );
                let bound = if l.round_trip_ms > 0 {
                    format!("≥ {} ms (2 × delay)", l.round_trip_ms)
                } else {
                    String::new()
                };
                rows.push(Row::new(&name, "p50", ms(l.stats.latency.p50_ms), bound));
                rows.push(Row::new(
                    &name,
                    "p99",
                    ms(l.stats.latency.p99_ms),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    "p999",
                    ms(l.stats.latency.p999_ms),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    "writes",
                    format!("{} in {:.2} s", l.stats.writes, l.stats.measured_secs),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    "errors",
                    l.stats.errors.to_string(),
                    "0".into(),
                ));
            }
            for t in &e.throughput {
                let name = format!(
                    "etcd put at leader ({}), {} clients, delay {} ms",
                    t.member, t.stats.clients, t.delay_ms
                );
                rows.push(Row::new(
                    &name,
                    "writes/s",
                    thousands(t.stats.writes_per_sec),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    "p50",
                    ms(t.stats.latency.p50_ms),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    "p99",
                    ms(t.stats.latency.p99_ms),
                    String::new(),
                ));
                rows.push(Row::new(
                    &name,
                    "errors",
                    t.stats.errors.to_string(),
                    "0".into(),
                ));
            }
        }
        rows
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------------------------
// Installation

#[derive(Debug, Clone, Serialize)]
pub struct InstallInfo {
    pub etcd_bin: PathBuf,
    pub redis_bin: PathBuf,
    /// Packages this run installed with apt-get; empty when both binaries were there.
    pub installed_now: Vec<String>,
    pub apt_log: Option<PathBuf>,
    pub notes: Vec<String>,
}

/// The Debian packages and the binaries they provide.
const PACKAGES: [(&str, &str); 2] = [("etcd-server", "etcd"), ("redis-server", "redis-server")];

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Finds `etcd` and `redis-server`; installs the missing packages with apt-get first. The
/// packages' init/systemd services are kept from starting (a temporary `policy-rc.d` when none
/// exists) and, when this run installed them, disabled: the bench runs its own instances on free
/// ports. Blocking.
pub fn ensure_installed(log_dir: &Path) -> Result<InstallInfo> {
    let mut notes = Vec::new();
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| find_in_path(bin).is_none())
        .map(|(pkg, _)| *pkg)
        .collect();
    let mut apt_log = None;
    if !missing.is_empty() {
        eprintln!(
            "meridian-bench: installing {} with apt-get",
            missing.join(" ")
        );
        let log_path = log_dir.join("peers-apt.log");
        let mut log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        apt_log = Some(log_path.clone());
        let blocker = ServiceStartBlocker::install();
        if let Some(n) = blocker.note() {
            notes.push(n);
        }
        let mut install_args = vec![
            "install",
            "-y",
            "--no-install-recommends",
            // Another apt run (unattended upgrades) holds the lock for a while at most.
            "-o",
            "DPkg::Lock::Timeout=120",
        ];
        install_args.extend(&missing);
        let mut out = apt_get(&install_args, &mut log)?;
        if !out.0.success() && lacks_package_lists(&out.1) {
            eprintln!(
                "meridian-bench: apt-get install found no package lists; running apt-get update"
            );
            let update = apt_get(&["update"], &mut log)?;
            if !update.0.success() {
                return Err(Error::runtime(format!(
                    "`apt-get update` failed ({}) while installing {}; see {}:\n{}",
                    update.0,
                    missing.join(" "),
                    log_path.display(),
                    tail_lines(&update.1, 15)
                )));
            }
            out = apt_get(&install_args, &mut log)?;
        }
        drop(blocker);
        if !out.0.success() {
            return Err(Error::runtime(format!(
                "`apt-get install -y --no-install-recommends {}` failed ({}); the peers scenario \
                 needs etcd and redis-server (run as root, or install them beforehand); see {}:\n{}",
                missing.join(" "),
                out.0,
                log_path.display(),
                tail_lines(&out.1, 15)
            )));
        }
        notes.extend(disable_services(&missing));
    }
    let find = |bin: &str| {
        find_in_path(bin).ok_or_else(|| {
            Error::runtime(format!(
                "`{bin}` is not on PATH{}",
                if missing.is_empty() {
                    String::new()
                } else {
                    format!(" even after installing {}", missing.join(" "))
                }
            ))
        })
    };
    let etcd_bin = find("etcd")?;
    let redis_bin = find("redis-server")?;
    for name in ["etcd", "redis-server"] {
        if let Some(pids) = command_stdout(Command::new("pgrep").args(["-x", name])) {
            let pids: Vec<&str> = pids.split_whitespace().collect();
            if !pids.is_empty() {
                notes.push(format!(
                    "a {name} not started by the bench is running (pid {}); the bench's own \
                     instances use other ports and data directories, but it shares the machine",
                    pids.join(", ")
                ));
            }
        }
    }
    Ok(InstallInfo {
        etcd_bin,
        redis_bin,
        installed_now: missing.iter().map(|s| s.to_string()).collect(),
        apt_log,
        notes,
    })
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// Runs apt-get non-interactively, its output appended to `log`; gives the exit status and the
/// output.
fn apt_get(args: &[&str], log: &mut fs::File) -> Result<(ExitStatus, String)> {
    let output = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running apt-get {}", args.join(" ")))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let _ = writeln!(
        log,
        "$ apt-get {}\n{text}\n[{}]\n",
        args.join(" "),
        output.status
    );
    Ok((output.status, text))
}

/// Whether apt-get failed because it has no (current) package lists.
fn lacks_package_lists(output: &str) -> bool {
    output.contains("Unable to locate package")
        || output.contains("has no installation candidate")
        || output.contains("run apt-get update")
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Keeps the packages' maintainer scripts from starting their services: `invoke-rc.d` and
/// `deb-systemd-invoke` ask `policy-rc.d`, and 101 means "not allowed". Written only when none
/// exists (containers usually have one already), and removed again on drop.
struct ServiceStartBlocker {
    written: bool,
    existed: bool,
    error: Option<String>,
}

impl ServiceStartBlocker {
    fn install() -> ServiceStartBlocker {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return ServiceStartBlocker {
                written: false,
                existed: true,
                error: None,
            };
        }
        let result = (|| -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            fs::write(
                path,
                "#!/bin/sh\n# Written by meridian-bench for one apt-get install; removed after it.\nexit 101\n",
            )?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        })();
        match result {
            Ok(()) => ServiceStartBlocker {
                written: true,
                existed: false,
                error: None,
            },
            Err(e) => ServiceStartBlocker {
                written: false,
                existed: false,
                error: Some(e.to_string()),
            },
        }
    }

    fn note(&self) -> Option<String> {
        if self.existed {
            Some(format!(
                "{POLICY_RC_D} existed already; the packages' services were started only if it allowed"
            ))
        } else if self.written {
            Some(format!(
                "a temporary {POLICY_RC_D} (exit 101) kept the packages' services from starting during the install"
            ))
        } else {
            self.error.as_ref().map(|e| {
                format!(
                    "could not write {POLICY_RC_D} ({e}); the packages' services may have started"
                )
            })
        }
    }
}

impl Drop for ServiceStartBlocker {
    fn drop(&mut self) {
        if self.written
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("meridian-bench: warning: cannot remove the temporary {POLICY_RC_D}: {e}");
        }
    }
}

/// Disables the services of freshly installed packages, so that they do not start at the next
/// boot and sit on the machine's cores and default ports. Best effort: answers what happened.
fn disable_services(installed: &[&str]) -> Vec<String> {
    if find_in_path("systemctl").is_none() {
        return Vec::new();
    }
    let units: Vec<&str> = installed
        .iter()
        .filter_map(|p| match *p {
            "etcd-server" => Some("etcd.service"),
            "redis-server" => Some("redis-server.service"),
            _ => None,
        })
        .collect();
    if units.is_empty() {
        return Vec::new();
    }
    let out = Command::new("systemctl")
        .arg("disable")
        .args(&units)
        .stdin(Stdio::null())
        .output();
    vec![match out {
        Ok(o) if o.status.success() => format!(
            "disabled {} (installed by this run) so that they do not start at boot",
            units.join(", ")
        ),
        Ok(o) => format!(
            "`systemctl disable {}` failed ({}): {}",
            units.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("cannot run systemctl disable: {e}"),
    }]
}

fn versions(install: &InstallInfo) -> Versions {
    let first_line = |s: String| s.lines().next().map(|l| l.trim().to_string());
    Versions {
        etcd: command_stdout(Command::new(&install.etcd_bin).arg("--version")).and_then(first_line),
        redis: command_stdout(Command::new(&install.redis_bin).arg("--version"))
            .and_then(first_line),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A server process with its output in a log file. Dropping it stops the process: SIGTERM, up
/// to 10 s, then SIGKILL.
struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl ChildGuard {
    fn spawn(name: &str, cmd: &mut Command, log_path: &Path) -> Result<ChildGuard> {
        let log = fs::File::create(log_path)
            .with_context(|| format!("creating {name} log {}", log_path.display()))?;
        let log_out = log
            .try_clone()
            .with_context(|| format!("duplicating the {name} log handle"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {name} ({})", cmd.get_program().display()))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
            log_path: log_path.to_path_buf(),
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails with the log tail if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        let status = match self.child.as_mut() {
            Some(c) => c
                .try_wait()
                .with_context(|| format!("checking the {} process", self.name))?,
            None => return Err(Error::runtime(format!("{} was stopped", self.name))),
        };
        match status {
            None => Ok(()),
            Some(status) => Err(Error::runtime(format!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log_path.display(),
                log_tail(&self.log_path, 30)
            ))),
        }
    }

    /// Sends SIGTERM; false if the process had exited or the signal could not be sent.
    fn terminate(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        matches!(term, Ok(s) if s.success())
    }

    /// Waits until `deadline` for the process to exit, then kills it; says how it went.
    fn wait_or_kill(&mut self, deadline: Instant) -> String {
        let Some(mut child) = self.child.take() else {
            return format!("{}: already stopped", self.name);
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return format!("{}: stopped ({status})", self.name),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
        let _ = child.kill();
        match child.wait() {
            Ok(status) => format!(
                "{}: did not stop on SIGTERM within {} s; killed ({status})",
                self.name,
                STOP_GRACE.as_secs()
            ),
            Err(e) => format!("{}: did not stop on SIGTERM; kill failed: {e}", self.name),
        }
    }

    fn stop(&mut self) -> String {
        self.terminate();
        self.wait_or_kill(Instant::now() + STOP_GRACE)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            let outcome = self.stop();
            eprintln!("meridian-bench: {outcome}");
        }
    }
}

/// `n` distinct free TCP ports on loopback: all are held until every one is picked, then closed
/// before the servers bind them; the window is small.
fn free_tcp_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        let l = StdTcpListener::bind("127.0.0.1:0").context("binding a TCP socket on 127.0.0.1")?;
        ports.push(l.local_addr().context("reading the TCP port")?.port());
        held.push(l);
    }
    drop(held);
    Ok(ports)
}

// ---------------------------------------------------------------------------------------------
// Closed-loop load, shared by Redis and etcd

/// Runs every writer as its own client for `warmup` (not recorded) and then `duration`.
async fn run_level<W: KvWriter>(
    writers: Vec<W>,
    warmup: Duration,
    duration: Duration,
    server_pids: &[u32],
) -> LevelStats {
    let clients = writers.len() as u64;
    let client_cpu = CpuMeter::start(None);
    let server_cpu: Vec<CpuMeter> = server_pids
        .iter()
        .map(|&p| CpuMeter::start(Some(p)))
        .collect();
    let measure_from = Instant::now() + warmup;
    let until = measure_from + duration;
    let tasks: Vec<_> = writers
        .into_iter()
        .map(|w| tokio::spawn(closed_loop(w, measure_from, until)))
        .collect();
    let MergedClients {
        hist,
        errors,
        gave_up,
        first_errors,
        measured_secs,
    } = merge_clients(tasks, measure_from).await;
    let writes = hist.len();
    let server_cpu_cores = server_cpu
        .iter()
        .map(CpuMeter::cores)
        .sum::<Option<f64>>()
        .map(|c| (c * 100.0).round() / 100.0);
    LevelStats {
        clients,
        warmup_secs: warmup.as_secs(),
        measured_secs,
        writes,
        writes_per_sec: if measured_secs > 0.0 {
            writes as f64 / measured_secs
        } else {
            0.0
        },
        errors,
        clients_gave_up: gave_up,
        first_errors,
        server_cpu_cores: if server_pids.is_empty() {
            None
        } else {
            server_cpu_cores
        },
        client_cpu_cores: client_cpu.cores(),
        latency: LatencyMs::from_histogram(&hist),
    }
}

fn level_failure(what: &str, l: &LevelStats) -> Option<String> {
    (l.errors > 0).then(|| {
        format!(
            "{what}: {} write(s) failed; first: {}",
            l.errors,
            l.first_errors.join(" | ")
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Redis: a minimal RESP client

/// A reply line of the kinds `SET` and `PING` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// `+OK`, `+PONG`.
    Simple(String),
    /// `-ERR …`.
    Error(String),
    /// `:N`.
    Integer(i64),
}

/// Parses one reply at the start of `buf`: `Ok(None)` while it is incomplete, else the reply and
/// the bytes it took. Bulk strings and arrays are not expected from SET/PING and are errors.
fn parse_reply(buf: &[u8]) -> std::result::Result<Option<(Reply, usize)>, String> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    if !matches!(kind, b'+' | b'-' | b':') {
        return Err(format!(
            "unexpected reply starting with {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        ));
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= MAX_REPLY_BYTES {
            return Err(format!(
                "reply line longer than {MAX_REPLY_BYTES} bytes without an end"
            ));
        }
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&buf[1..end]).into_owned();
    let reply = match kind {
        b'+' => Reply::Simple(line),
        b'-' => Reply::Error(line),
        _ => Reply::Integer(
            line.parse()
                .map_err(|e| format!("integer reply {line:?}: {e}"))?,
        ),
    };
    Ok(Some((reply, end + 2)))
}

/// Appends a command as a RESP array of bulk strings.
fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

struct RespConn {
    stream: TcpStream,
    buf: Vec<u8>,
    cmd: Vec<u8>,
}

impl RespConn {
    async fn connect(addr: SocketAddr) -> std::result::Result<RespConn, String> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to redis at {addr}: no answer within 5 s"))?
            .map_err(|e| format!("connecting to redis at {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("setting TCP_NODELAY towards redis: {e}"))?;
        Ok(RespConn {
            stream,
            buf: Vec::with_capacity(MAX_REPLY_BYTES),
            cmd: Vec::with_capacity(512),
        })
    }

    async fn request(&mut self, args: &[&[u8]]) -> std::result::Result<Reply, String> {
        self.cmd.clear();
        encode_command(&mut self.cmd, args);
        self.stream
            .write_all(&self.cmd)
            .await
            .map_err(|e| format!("sending to redis: {e}"))?;
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 1024];
            let room = (MAX_REPLY_BYTES - self.buf.len()).min(chunk.len());
            let n = self
                .stream
                .read(&mut chunk[..room])
                .await
                .map_err(|e| format!("reading redis' reply: {e}"))?;
            if n == 0 {
                return Err("redis closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

struct RedisWriter {
    addr: SocketAddr,
    conn: Option<RespConn>,
    key_prefix: String,
    key: Vec<u8>,
    value: Arc<[u8]>,
}

impl KvWriter for RedisWriter {
    async fn write(&mut self, i: u64) -> std::result::Result<(), String> {
        let conn = match &mut self.conn {
            Some(c) => c,
            // The previous connection broke: its state is unknown, so start a new one.
            None => self.conn.insert(RespConn::connect(self.addr).await?),
        };
        self.key.clear();
        let _ = write!(self.key, "{}:{i}", self.key_prefix);
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            conn.request(&[b"SET", &self.key, &self.value]),
        )
        .await;
        match answer {
            Ok(Ok(Reply::Simple(s))) if s == "OK" => Ok(()),
            Ok(Ok(other)) => Err(format!("SET answered {other:?}")),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(format!(
                    "SET: no answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ))
            }
        }
    }
}

struct RedisServer {
    guard: ChildGuard,
    addr: SocketAddr,
    command_line: Vec<String>,
}

/// The `redis-server` arguments: foreground, loopback only, durable AOF.
fn redis_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--daemonize",
        "no",
        "--supervised",
        "no",
        // Log to stdout, which goes to the log file.
        "--logfile",
        "",
        "--dir",
        &dir.display().to_string(),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--auto-aof-rewrite-percentage",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl RedisServer {
    async fn start(bin: &Path, dir: &Path, log: &Path, ready_timeout: Duration) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = free_tcp_ports(1)?[0];
        let args = redis_args(port, dir);
        let mut guard = ChildGuard::spawn("redis-server", Command::new(bin).args(&args), log)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + ready_timeout;
        loop {
            guard.check_alive()?;
            let last = match RespConn::connect(addr).await {
                Ok(mut c) => match c.request(&[b"PING"]).await {
                    Ok(Reply::Simple(s)) if s == "PONG" => break,
                    Ok(other) => format!("PING answered {other:?}"),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(Error::runtime(format!(
                    "redis-server at {addr} did not answer PING within {} s ({last}); last lines of {}:\n{}",
                    ready_timeout.as_secs(),
                    log.display(),
                    log_tail(log, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut command_line = vec![bin.display().to_string()];
        command_line.extend(args.iter().map(|a| {
            if a.is_empty() {
                "\"\"".to_string()
            } else {
                a.clone()
            }
        }));
        Ok(RedisServer {
            guard,
            addr,
            command_line,
        })
    }
}

async fn redis_part(
    install: &InstallInfo,
    root: &Path,
    out_dir: &Path,
    opts: &PeersOpts,
    ready_timeout: Duration,
    failures: &mut Vec<String>,
) -> Result<RedisReport> {
    let log = out_dir.join("peers-redis.log");
    eprintln!("meridian-bench: starting redis-server (appendfsync always)");
    let mut server =
        RedisServer::start(&install.redis_bin, &root.join("redis"), &log, ready_timeout).await?;
    eprintln!("meridian-bench: redis-server ready at {}", server.addr);
    let pids: Vec<u32> = server.guard.pid().into_iter().collect();
    let mut levels = Vec::new();
    for &clients in &opts.clients {
        eprintln!(
            "meridian-bench: redis: {clients} clients, {} s warm-up + {} s measured",
            opts.warmup_secs, opts.duration_secs
        );
        let mut writers = Vec::with_capacity(clients as usize);
        for c in 0..clients {
            let conn = match RespConn::connect(server.addr).await {
                Ok(conn) => conn,
                Err(e) => {
                    failures.push(format!("redis at {clients} clients: {e}"));
                    break;
                }
            };
            writers.push(RedisWriter {
                addr: server.addr,
                conn: Some(conn),
                key_prefix: format!("bench:{clients}:{c}"),
                key: Vec::with_capacity(64),
                value: Arc::from(make_body(c, opts.value_bytes)),
            });
        }
        if writers.len() as u64 != clients {
            break;
        }
        let stats = run_level(
            writers,
            Duration::from_secs(opts.warmup_secs),
            Duration::from_secs(opts.duration_secs),
            &pids,
        )
        .await;
        let failed = level_failure(&format!("redis at {clients} clients"), &stats);
        levels.push(stats);
        if let Err(e) = server.guard.check_alive() {
            failures.push(e.to_string());
            break;
        }
        if let Some(f) = failed {
            failures.push(f);
            break;
        }
    }
    let stop = server.guard.stop();
    eprintln!("meridian-bench: {stop}");
    Ok(RedisReport {
        durability: REDIS_DURABILITY,
        address: server.addr.to_string(),
        command_line: std::mem::take(&mut server.command_line),
        log,
        levels,
        stop: Some(stop),
    })
}

// ---------------------------------------------------------------------------------------------
// etcd: wiring

/// The ports of one member: etcd's own client and peer listeners, and the bench's front door
/// that it advertises as its peer URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdPorts {
    pub client: u16,
    pub peer: u16,
    pub front: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberPlan {
    pub name: String,
    pub client_url: String,
    pub peer_listen_url: String,
    pub advertised_peer_url: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
}

/// One emulator link: `from` reaches `to` through it; it relays to `to`'s real peer listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayPlan {
    pub from: String,
    pub to: String,
    pub upstream_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdPlan {
    pub members: Vec<MemberPlan>,
    pub relays: Vec<RelayPlan>,
}

fn loopback_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The flags of every member and the links between them. Every member gets the same
/// `--initial-cluster`, made of the advertised (front door) URLs, so all compute the same member
/// and cluster ids; each listens for peers on its own port, which only the links dial.
pub fn etcd_plan(
    members: &[(&str, EtcdPorts)],
    data_root: &Path,
    token: &str,
    election_timeout_ms: u64,
) -> EtcdPlan {
    let initial_cluster = members
        .iter()
        .map(|(name, p)| format!("{name}={}", loopback_url(p.front)))
        .collect::<Vec<_>>()
        .join(",");
    let plans = members
        .iter()
        .map(|(name, p)| {
            let data_dir = data_root.join(name);
            let client_url = loopback_url(p.client);
            let peer_listen_url = loopback_url(p.peer);
            let advertised_peer_url = loopback_url(p.front);
            let args = [
                ("--name", name.to_string()),
                ("--data-dir", data_dir.display().to_string()),
                ("--listen-client-urls", client_url.clone()),
                ("--advertise-client-urls", client_url.clone()),
                ("--listen-peer-urls", peer_listen_url.clone()),
                ("--initial-advertise-peer-urls", advertised_peer_url.clone()),
                ("--initial-cluster", initial_cluster.clone()),
                ("--initial-cluster-token", token.to_string()),
                ("--initial-cluster-state", "new".to_string()),
                ("--heartbeat-interval", ETCD_HEARTBEAT_MS.to_string()),
                ("--election-timeout", election_timeout_ms.to_string()),
                // 3.4's default logger (capnslog) is deprecated and says so at every start.
                ("--logger", "zap".to_string()),
                ("--log-outputs", "stderr".to_string()),
            ]
            .into_iter()
            .flat_map(|(k, v)| [k.to_string(), v])
            .collect();
            MemberPlan {
                name: name.to_string(),
                client_url,
                peer_listen_url,
                advertised_peer_url,
                data_dir,
                args,
            }
        })
        .collect();
    let relays = members
        .iter()
        .flat_map(|(from, _)| {
            members
                .iter()
                .filter(move |(to, _)| to != from)
                .map(move |(to, p)| RelayPlan {
                    from: from.to_string(),
                    to: to.to_string(),
                    upstream_port: p.peer,
                })
        })
        .collect();
    EtcdPlan {
        members: plans,
        relays,
    }
}

/// Ten round trips at the largest delay, within etcd's bounds: so that the delays alone never
/// cause an election.
fn election_timeout_ms(max_delay_ms: u64) -> u64 {
    (20 * max_delay_ms).clamp(ETCD_ELECTION_MIN_MS, ETCD_ELECTION_MAX_MS)
}

/// The member whose advertised URL appears in the `X-PeerURLs` header of an HTTP request head.
fn sender_of(head: &[u8], advertised: &[String]) -> Option<usize> {
    let text = String::from_utf8_lossy(head);
    let headers = text.split("\r\n\r\n").next()?;
    headers.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("x-peerurls") {
            return None;
        }
        value
            .split(',')
            .map(str::trim)
            .find_map(|url| advertised.iter().position(|a| a == url))
    })
}

#[derive(Default)]
struct DoorCounters {
    by_source: Vec<AtomicU64>,
    unidentified: AtomicU64,
    relay_connect_failures: AtomicU64,
    accept_errors: AtomicU64,
}

/// The advertised peer address of member `member`: hands each connection to the link
/// `sender -> member`.
struct FrontDoor {
    member: usize,
    advertised: Arc<Vec<String>>,
    /// The `via` of the link `source -> member`, by source (None for the member itself).
    routes: Vec<Option<SocketAddr>>,
    default_route: SocketAddr,
    counters: DoorCounters,
}

impl FrontDoor {
    async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = Arc::new(Semaphore::new(MAX_FRONT_CONNECTIONS));
        // Dropping the set (when this task is aborted) aborts every relayed connection.
        let mut conns = JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let door = Arc::clone(&self);
                    conns.spawn(async move {
                        door.relay(stream).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    self.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                    // Out of descriptors, most likely: give connections time to close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn relay(&self, mut inbound: TcpStream) {
        let mut head = Vec::with_capacity(1024);
        let _ = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut inbound, &mut head)).await;
        if head.is_empty() {
            return;
        }
        let via = match sender_of(&head, &self.advertised)
            .and_then(|s| Some((s, self.routes.get(s).copied().flatten()?)))
        {
            Some((source, via)) => {
                self.counters.by_source[source].fetch_add(1, Ordering::Relaxed);
                via
            }
            None => {
                self.counters.unidentified.fetch_add(1, Ordering::Relaxed);
                self.default_route
            }
        };
        let Ok(mut outbound) = TcpStream::connect(via).await else {
            self.counters
                .relay_connect_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        if outbound.write_all(&head).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    }

    fn stats(&self, names: &[String]) -> FrontDoorStats {
        FrontDoorStats {
            member: names[self.member].clone(),
            advertised_peer_url: self.advertised[self.member].clone(),
            connections_by_source: names
                .iter()
                .zip(&self.counters.by_source)
                .enumerate()
                .filter(|(i, _)| *i != self.member)
                .map(|(_, (n, c))| (n.clone(), c.load(Ordering::Relaxed)))
                .collect(),
            unidentified: self.counters.unidentified.load(Ordering::Relaxed),
            relay_connect_failures: self.counters.relay_connect_failures.load(Ordering::Relaxed),
            accept_errors: self.counters.accept_errors.load(Ordering::Relaxed),
        }
    }
}

/// Reads until the end of the request head, `MAX_HEAD_BYTES`, or the end of the stream.
async fn read_head(stream: &mut TcpStream, head: &mut Vec<u8>) {
    let mut chunk = [0u8; 2048];
    while head.len() < MAX_HEAD_BYTES {
        let room = (MAX_HEAD_BYTES - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // Look for the blank line only where it can newly appear.
                let from = head.len().saturating_sub(3);
                head.extend_from_slice(&chunk[..n]);
                if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// etcd: the cluster

/// A running 3-member cluster. Dropping it stops the members (all at once: SIGTERM, up to 10 s,
/// SIGKILL) before the front doors and the emulator go away.
struct EtcdCluster {
    members: Vec<ChildGuard>,
    plan: EtcdPlan,
    logs: Vec<PathBuf>,
    doors: Vec<Arc<FrontDoor>>,
    door_tasks: JoinSet<()>,
    emulator: Emulator,
    /// The member last seen leading: stopped last.
    leader: Option<usize>,
}

impl EtcdCluster {
    async fn start(bin: &Path, root: &Path, out_dir: &Path, election_ms: u64) -> Result<Self> {
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let n = ETCD_MEMBERS.len();
        let mut listeners = Vec::with_capacity(n);
        for name in ETCD_MEMBERS {
            listeners.push(
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .with_context(|| format!("binding the peer front door of {name}"))?,
            );
        }
        let own = free_tcp_ports(2 * n)?;
        let mut members = Vec::with_capacity(n);
        for (i, name) in ETCD_MEMBERS.iter().enumerate() {
            let front = listeners[i]
                .local_addr()
                .context("reading a front door's port")?
                .port();
            members.push((
                *name,
                EtcdPorts {
                    client: own[2 * i],
                    peer: own[2 * i + 1],
                    front,
                },
            ));
        }
        let token = format!(
            "meridian-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        let plan = etcd_plan(&members, root, &token, election_ms);

        let specs = plan
            .relays
            .iter()
            .map(|r| LinkSpec {
                from: r.from.clone(),
                to: r.to.clone(),
                via: SocketAddr::from(([127, 0, 0, 1], 0)),
                upstream: SocketAddr::from(([127, 0, 0, 1], r.upstream_port)),
            })
            .collect();
        let emulator = Emulator::start_tcp_links(specs, EmulatorOptions::default())
            .await
            .map_err(|e| {
                Error::runtime(format!(
                    "starting the TCP link emulator for the etcd peer links: {e}"
                ))
            })?;
        let links = emulator.links();
        let advertised: Arc<Vec<String>> = Arc::new(
            plan.members
                .iter()
                .map(|m| m.advertised_peer_url.clone())
                .collect(),
        );
        let mut doors = Vec::with_capacity(n);
        let mut door_tasks = JoinSet::new();
        for (to, listener) in listeners.into_iter().enumerate() {
            let routes: Vec<Option<SocketAddr>> = ETCD_MEMBERS
                .iter()
                .map(|from| {
                    links
                        .iter()
                        .find(|l| l.from == *from && l.to == ETCD_MEMBERS[to])
                        .map(|l| l.via)
                })
                .collect();
            let default_route = routes.iter().flatten().copied().next().ok_or_else(|| {
                Error::runtime(format!(
                    "the emulator has no link towards {}",
                    ETCD_MEMBERS[to]
                ))
            })?;
            let door = Arc::new(FrontDoor {
                member: to,
                advertised: Arc::clone(&advertised),
                routes,
                default_route,
                counters: DoorCounters {
                    by_source: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    ..DoorCounters::default()
                },
            });
            door_tasks.spawn(Arc::clone(&door).serve(listener));
            doors.push(door);
        }

        let mut guards = Vec::with_capacity(n);
        let mut logs = Vec::with_capacity(n);
        for m in &plan.members {
            let log = out_dir.join(format!("peers-{}.log", m.name));
            let mut cmd = Command::new(bin);
            cmd.args(&m.args);
            // etcd also reads its flags from ETCD_* variables and refuses both at once.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
            guards.push(ChildGuard::spawn(&m.name, &mut cmd, &log)?);
            logs.push(log);
        }
        Ok(EtcdCluster {
            members: guards,
            plan,
            logs,
            doors,
            door_tasks,
            emulator,
            leader: None,
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        self.members
            .iter_mut()
            .try_for_each(ChildGuard::check_alive)
    }

    fn pids(&self) -> Vec<u32> {
        self.members.iter().filter_map(ChildGuard::pid).collect()
    }

    /// Polls every member's status until all name the same leader.
    async fn wait_ready(&mut self, http: &reqwest::Client, timeout: Duration) -> Result<Statuses> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = match self.statuses(http).await {
                Ok(s) if s.agreed_leader().is_some() => return Ok(s),
                Ok(s) => format!("no agreed leader yet: {:?}", s.leaders),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let tails: Vec<String> = self
                    .logs
                    .iter()
                    .map(|l| format!("{}:\n{}", l.display(), log_tail(l, 10)))
                    .collect();
                return Err(Error::runtime(format!(
                    "the etcd cluster did not elect a leader within {} s ({last}); last lines of the logs:\n{}",
                    timeout.as_secs(),
                    tails.join("\n")
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn statuses(&self, http: &reqwest::Client) -> std::result::Result<Statuses, String> {
        let mut s = Statuses::default();
        for m in &self.plan.members {
            let (id, leader) = etcd_status(http, &m.client_url).await?;
            s.ids.push(id);
            s.leaders.push(leader);
        }
        Ok(s)
    }

    /// Bytes per link so far.
    fn traffic(&self) -> Vec<LinkTraffic> {
        self.emulator
            .links()
            .iter()
            .map(|l| LinkTraffic {
                link: format!("{}->{}", l.from, l.to),
                via: l.via.to_string(),
                upstream: l.upstream.to_string(),
                bytes_forward: l.forward.counters.bytes_forwarded,
                bytes_reverse: l.reverse.counters.bytes_forwarded,
                open_connections: l.clients,
                connections_refused: l.clients_evicted,
            })
            .collect()
    }

    fn door_stats(&self) -> Vec<FrontDoorStats> {
        let names: Vec<String> = ETCD_MEMBERS.iter().map(|s| s.to_string()).collect();
        self.doors.iter().map(|d| d.stats(&names)).collect()
    }

    /// Stops the followers, then the leader. A leader that gets SIGTERM hands its leadership
    /// to a connected follower first, and when that follower is stopping too it waits for the
    /// hand-over longer than the 10 s grace; once its followers are gone it finds none to hand
    /// over to and exits at once. Without a known leader, all stop at once.
    fn stop(&mut self) -> Vec<String> {
        let phases: Vec<Vec<usize>> = match self.leader {
            Some(l) => vec![
                (0..self.members.len()).filter(|&i| i != l).collect(),
                vec![l],
            ],
            None => vec![(0..self.members.len()).collect()],
        };
        let mut outcomes = Vec::with_capacity(self.members.len());
        for (n, phase) in phases.into_iter().enumerate() {
            if n > 0 {
                // The leader must have seen its peers' connections close: until then it still
                // picks one of them to hand over to.
                std::thread::sleep(LEADER_STOP_PAUSE);
            }
            for &i in &phase {
                self.members[i].terminate();
            }
            let deadline = Instant::now() + STOP_GRACE;
            for &i in &phase {
                outcomes.push(self.members[i].wait_or_kill(deadline));
            }
        }
        self.door_tasks.abort_all();
        outcomes
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if self.members.iter().any(|m| m.child.is_some()) {
            for outcome in self.stop() {
                eprintln!("meridian-bench: {outcome}");
            }
        }
    }
}

#[derive(Debug, Default)]
struct Statuses {
    ids: Vec<String>,
    leaders: Vec<String>,
}

impl Statuses {
    /// The index of the leader, when every member names the same one and it is a member.
    fn agreed_leader(&self) -> Option<usize> {
        let first = self.leaders.first()?;
        if first == "0" || self.leaders.iter().any(|l| l != first) {
            return None;
        }
        self.ids.iter().position(|id| id == first)
    }
}

/// A JSON id: grpc-gateway writes 64-bit integers as strings.
fn json_id(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `POST /v3/maintenance/status`: the member's id and the leader it knows ("0" for none).
async fn etcd_status(
    http: &reqwest::Client,
    client_url: &str,
) -> std::result::Result<(String, String), String> {
    let url = format!("{client_url}/v3/maintenance/status");
    let v = post_json(http, &url, "{}".to_string(), Duration::from_secs(5)).await?;
    let id = json_id(&v["header"]["member_id"])
        .ok_or_else(|| format!("POST {url}: no header.member_id in the answer: {v}"))?;
    let leader = json_id(&v["leader"]).unwrap_or_else(|| "0".into());
    Ok((id, leader))
}

/// POSTs a JSON body; Ok with the answer for a 200 with a JSON body.
async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: String,
    timeout: Duration,
) -> std::result::Result<serde_json::Value, String> {
    let resp = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(timeout)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {}", error_chain(&e)))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("POST {url}: reading the answer: {}", error_chain(&e)))?;
    if status != reqwest::StatusCode::OK {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        return Err(format!("POST {url}: answered {status}: {text}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        format!("POST {url}: not JSON ({e}): {text}")
    })
}

/// Standard base64 with padding (RFC 4648), as etcd's JSON gateway wants for bytes fields.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The body of `POST /v3/kv/put`. Base64 needs no JSON escaping.
fn put_body(key: &[u8], value: &[u8]) -> String {
    format!(r#"{{"key":"{}","value":"{}"}}"#, base64(key), base64(value))
}

struct EtcdWriter {
    http: reqwest::Client,
    put_url: Arc<str>,
    key_prefix: String,
    value: Arc<[u8]>,
}

impl KvWriter for EtcdWriter {
    async fn write(&mut self, i: u64) -> std::result::Result<(), String> {
        let key = format!("{}/{i}", self.key_prefix);
        let v = post_json(
            &self.http,
            &self.put_url,
            put_body(key.as_bytes(), &self.value),
            REQUEST_TIMEOUT,
        )
        .await?;
        // A put answers its header with the new revision; anything else is not a write.
        if v["header"]["revision"].is_null() {
            return Err(format!(
                "POST {}: 200 without header.revision: {v}",
                self.put_url
            ));
        }
        Ok(())
    }
}

fn etcd_writers(
    http: &reqwest::Client,
    client_url: &str,
    label: &str,
    clients: u64,
    value_bytes: usize,
) -> Vec<EtcdWriter> {
    let put_url: Arc<str> = Arc::from(format!("{client_url}/v3/kv/put").as_str());
    (0..clients)
        .map(|c| EtcdWriter {
            http: http.clone(),
            put_url: Arc::clone(&put_url),
            key_prefix: format!("bench/etcd/{label}/{c}"),
            value: Arc::from(make_body(c, value_bytes)),
        })
        .collect()
}

fn set_delay(cluster: &EtcdCluster, delay_ms: u64) -> Result<()> {
    cluster
        .emulator
        .set_all(&SettingsUpdate {
            delay_ms: Some(delay_ms),
            direction: Some(DirectionSel::Both),
            ..Default::default()
        })
        .map(drop)
        .map_err(|e| {
            Error::runtime(format!(
                "setting {delay_ms} ms one-way delay on the etcd links: {e}"
            ))
        })
}

async fn etcd_part(
    install: &InstallInfo,
    root: &Path,
    out_dir: &Path,
    opts: &PeersOpts,
    ready_timeout: Duration,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<EtcdReport> {
    let max_delay = opts
        .delays_ms
        .iter()
        .copied()
        .chain([FOLLOWER_DELAY_MS])
        .max()
        .unwrap_or(FOLLOWER_DELAY_MS);
    let election_ms = election_timeout_ms(max_delay);
    eprintln!("meridian-bench: starting a 3-member etcd cluster behind the link emulator");
    let mut cluster =
        EtcdCluster::start(&install.etcd_bin, &root.join("etcd"), out_dir, election_ms).await?;
    let http = http::client(ETCD_TPUT_CLIENTS as usize)?;
    let statuses = cluster.wait_ready(&http, ready_timeout).await?;
    let leader_idx = statuses.agreed_leader().ok_or_else(|| {
        Error::runtime("the etcd cluster lost its leader right after electing it")
    })?;
    cluster.leader = Some(leader_idx);
    let follower_idx = (0..ETCD_MEMBERS.len())
        .find(|&i| i != leader_idx)
        .unwrap_or(0);
    let leader = ETCD_MEMBERS[leader_idx].to_string();
    let follower = ETCD_MEMBERS[follower_idx].to_string();
    let leader_url = cluster.plan.members[leader_idx].client_url.clone();
    let follower_url = cluster.plan.members[follower_idx].client_url.clone();
    eprintln!("meridian-bench: etcd ready; leader {leader} at {leader_url}");
    let pids = cluster.pids();
    let warmup = Duration::from_secs(opts.warmup_secs);
    let duration = Duration::from_secs(opts.etcd_duration_secs);

    let mut delays = Vec::new();
    let mut throughput = Vec::new();
    for &delay in &opts.delays_ms {
        set_delay(&cluster, delay)?;
        eprintln!(
            "meridian-bench: etcd: delay {delay} ms, 1 client at {leader}, {} s warm-up + {} s measured",
            opts.warmup_secs, opts.etcd_duration_secs
        );
        let writers = etcd_writers(
            &http,
            &leader_url,
            &format!("d{delay}"),
            1,
            opts.value_bytes,
        );
        let stats = run_level(writers, warmup, duration, &pids).await;
        let what = format!("etcd at {leader}, delay {delay} ms");
        if let Some(f) = level_failure(&what, &stats) {
            failures.push(f);
        }
        // The proof that the links are in the path: a put needs a round trip to a follower.
        let round_trip = 2 * delay;
        if delay > 0 && stats.writes > 0 && stats.latency.p50_ms < round_trip as f64 {
            failures.push(format!(
                "{what}: p50 {:.3} ms is below the {round_trip} ms round trip: the peer links \
                 do not all go through the emulator",
                stats.latency.p50_ms
            ));
        }
        delays.push(EtcdLatency {
            delay_ms: delay,
            member: leader.clone(),
            role: "leader",
            round_trip_ms: round_trip,
            stats,
        });
        cluster.check_alive()?;

        if ETCD_TPUT_DELAYS_MS.contains(&delay) {
            eprintln!(
                "meridian-bench: etcd: delay {delay} ms, {ETCD_TPUT_CLIENTS} clients at {leader}"
            );
            let writers = etcd_writers(
                &http,
                &leader_url,
                &format!("d{delay}-tput"),
                ETCD_TPUT_CLIENTS,
                opts.value_bytes,
            );
            let stats = run_level(writers, warmup, duration, &pids).await;
            if let Some(f) = level_failure(
                &format!("etcd at {leader}, {ETCD_TPUT_CLIENTS} clients, delay {delay} ms"),
                &stats,
            ) {
                failures.push(f);
            }
            throughput.push(EtcdThroughput {
                delay_ms: delay,
                member: leader.clone(),
                stats,
            });
            cluster.check_alive()?;
        }
    }

    set_delay(&cluster, FOLLOWER_DELAY_MS)?;
    eprintln!(
        "meridian-bench: etcd: delay {FOLLOWER_DELAY_MS} ms, 1 client at {follower} (a follower)"
    );
    let writers = etcd_writers(
        &http,
        &follower_url,
        &format!("d{FOLLOWER_DELAY_MS}-follower"),
        1,
        opts.value_bytes,
    );
    let stats = run_level(writers, warmup, duration, &pids).await;
    if let Some(f) = level_failure(&format!("etcd at follower {follower}"), &stats) {
        failures.push(f);
    }
    let follower_stats = EtcdLatency {
        delay_ms: FOLLOWER_DELAY_MS,
        member: follower.clone(),
        role: "follower",
        round_trip_ms: 2 * FOLLOWER_DELAY_MS,
        stats,
    };
    set_delay(&cluster, 0)?;

    let leader_at_end = match cluster.statuses(&http).await {
        Ok(s) => s.agreed_leader().map(|i| {
            cluster.leader = Some(i);
            ETCD_MEMBERS[i].to_string()
        }),
        Err(e) => {
            notes.push(format!(
                "could not read the etcd leader after the runs: {e}"
            ));
            None
        }
    };
    if leader_at_end.as_deref().is_some_and(|l| l != leader) {
        notes.push(format!(
            "the etcd leader changed during the runs ({leader} -> {}); puts to the old leader were \
             forwarded to the new one",
            leader_at_end.as_deref().unwrap_or("?")
        ));
    }
    let links = cluster.traffic();
    for l in &links {
        if l.bytes_forward == 0 && l.bytes_reverse == 0 {
            notes.push(format!("emulator link {} carried no bytes", l.link));
        }
    }
    let front_doors = cluster.door_stats();
    let members = cluster
        .plan
        .members
        .iter()
        .zip(&cluster.logs)
        .enumerate()
        .map(|(i, (m, log))| EtcdMemberInfo {
            name: m.name.clone(),
            member_id: statuses.ids.get(i).cloned(),
            client_url: m.client_url.clone(),
            peer_listen_url: m.peer_listen_url.clone(),
            advertised_peer_url: m.advertised_peer_url.clone(),
            data_dir: m.data_dir.clone(),
            log: log.clone(),
            args: m.args.clone(),
        })
        .collect();
    let stop = cluster.stop();
    for s in &stop {
        eprintln!("meridian-bench: {s}");
    }
    Ok(EtcdReport {
        durability: ETCD_DURABILITY,
        wiring: ETCD_WIRING,
        election: format!(
            "--heartbeat-interval {ETCD_HEARTBEAT_MS} ms, --election-timeout {election_ms} ms \
             (10 round trips at the largest delay, {max_delay} ms, at least etcd's default \
             {ETCD_ELECTION_MIN_MS} ms)"
        ),
        members,
        measured_at: format!(
            "the leader ({leader}, {leader_url}); one figure at a follower ({follower}) at \
             {FOLLOWER_DELAY_MS} ms"
        ),
        leader,
        leader_at_end,
        delays,
        throughput,
        follower: Some(follower_stats),
        links,
        front_doors,
        stop,
    })
}

// ---------------------------------------------------------------------------------------------
// The scenario

/// The data directory: `--data-dir`, or a fresh temporary one under `--data-root`.
struct DataDir {
    path: PathBuf,
    tempdir: Option<tempfile::TempDir>,
    keep: bool,
}

impl DataDir {
    fn prepare(common: &CommonArgs) -> Result<DataDir> {
        match &common.data_dir {
            Some(dir) => {
                for sub in ["redis", "etcd"] {
                    if dir.join(sub).exists() {
                        return Err(Error::usage(format!(
                            "--data-dir {}: {sub}/ exists from an earlier run; remove it or choose \
                             another directory (etcd cannot bootstrap a new cluster over old data)",
                            dir.display()
                        )));
                    }
                }
                fs::create_dir_all(dir)
                    .with_context(|| format!("creating data dir {}", dir.display()))?;
                Ok(DataDir {
                    path: absolute(dir)?,
                    tempdir: None,
                    keep: true,
                })
            }
            None => {
                fs::create_dir_all(&common.data_root).with_context(|| {
                    format!("creating data root {}", common.data_root.display())
                })?;
                let tmp = tempfile::Builder::new()
                    .prefix("peers-")
                    .tempdir_in(&common.data_root)
                    .with_context(|| {
                        format!("creating a temporary dir in {}", common.data_root.display())
                    })?;
                Ok(DataDir {
                    path: absolute(tmp.path())?,
                    tempdir: Some(tmp),
                    keep: common.keep_data,
                })
            }
        }
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if let Some(tmp) = self.tempdir.take()
            && self.keep
        {
            let kept = tmp.keep();
            eprintln!("meridian-bench: kept data in {}", kept.display());
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Runs the scenario. `Err` only for what stops everything (bad usage, no binaries); a part that
/// fails to start or a failed write lands in `PeersReport::failures`.
pub async fn run(common: &CommonArgs, opts: &PeersOpts) -> Result<PeersReport> {
    if common.target.is_some() {
        return Err(Error::usage(
            "peers starts its own redis-server and etcd cluster; --target does not apply",
        ));
    }
    if opts.clients.is_empty() || opts.delays_ms.is_empty() {
        return Err(Error::usage(
            "--clients and --delays-ms need at least one value",
        ));
    }
    let machine = Machine::collect();
    fs::create_dir_all(&common.out)
        .with_context(|| format!("creating output dir {}", common.out.display()))?;
    let out_dir = absolute(&common.out)?;
    let install = {
        let dir = out_dir.clone();
        tokio::task::spawn_blocking(move || ensure_installed(&dir))
            .await
            .context("the installation thread failed")??
    };
    let versions = versions(&install);
    eprintln!(
        "meridian-bench: {} / {}",
        versions.etcd.as_deref().unwrap_or("etcd ?"),
        versions.redis.as_deref().unwrap_or("redis ?")
    );

    let data = DataDir::prepare(common)?;
    let disk = DiskInfo::of(&data.path);
    let mut notes = install.notes.clone();
    let mut failures = Vec::new();
    notes.extend(disk.setup_notes());
    if common.meridian_bin.is_some() {
        notes.push("--meridian-bin is not used by peers".into());
    }
    notes.push(format!(
        "redis, etcd, the emulator and this client share the machine's {} core(s) and the disk; \
         the etcd link emulator runs inside this process",
        machine.nproc
    ));

    eprintln!(
        "meridian-bench: fsync floor: {FSYNC_SAMPLES} × 4 KiB fdatasync in {}",
        data.path.display()
    );
    let fsync_floor = {
        let dir = data.path.clone();
        match tokio::task::spawn_blocking(move || {
            fsync::measure(&dir, FSYNC_SAMPLES, FsyncMode::Append)
        })
        .await
        {
            Ok(Ok(f)) => Some(f),
            Ok(Err(e)) => {
                notes.push(format!("fsync floor not measured: {e}"));
                None
            }
            Err(e) => {
                notes.push(format!(
                    "fsync floor not measured: the probe thread failed: {e}"
                ));
                None
            }
        }
    };

    let ready_timeout = Duration::from_secs(common.ready_timeout_secs);
    let redis = match redis_part(
        &install,
        &data.path,
        &out_dir,
        opts,
        ready_timeout,
        &mut failures,
    )
    .await
    {
        Ok(r) => Some(r),
        Err(e) => {
            failures.push(format!("redis: {e}"));
            None
        }
    };
    let etcd = match etcd_part(
        &install,
        &data.path,
        &out_dir,
        opts,
        ready_timeout,
        &mut failures,
        &mut notes,
    )
    .await
    {
        Ok(r) => Some(r),
        Err(e) => {
            failures.push(format!("etcd: {e}"));
            None
        }
    };

    Ok(PeersReport {
        scenario: "peers",
        machine,
        config: opts.clone(),
        install,
        versions,
        data_dir: data.path.clone(),
        data_dir_kept: data.keep,
        data_disk: disk,
        fsync_floor,
        redis,
        etcd,
        failures,
        notes,
    })
}

/// Prints the context and the table, writes `peers.json`; returns the failures.
pub fn publish(report: &PeersReport, out_dir: &Path) -> Result<Vec<String>> {
    let m = &report.machine;
    let mut text = String::new();
    let _ = writeln!(text, "meridian-bench peers  ({})", m.timestamp);
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
        "versions: {} | {}",
        report.versions.etcd.as_deref().unwrap_or("etcd ?"),
        report.versions.redis.as_deref().unwrap_or("redis ?")
    );
    let _ = writeln!(
        text,
        "data dir: {}{}",
        report.data_dir.display(),
        if report.data_dir_kept {
            ""
        } else {
            " (temporary, removed after the run)"
        }
    );
    let _ = writeln!(text, "disk:     {}", report.data_disk.describe());
    if let Some(r) = &report.redis {
        let _ = writeln!(text, "redis:    {}", r.durability);
    }
    if let Some(e) = &report.etcd {
        let _ = writeln!(text, "etcd:     {}", e.durability);
        let _ = writeln!(text, "          {}", e.election);
        let _ = writeln!(text, "links:    {}", e.wiring);
        let _ = writeln!(text, "measured: at {}", e.measured_at);
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
    let path = report::write_json(out_dir, "peers.json", report)?;
    println!("results: {}", path.display());
    Ok(report.failures.clone())
}

/// Runs `peers` and publishes it; Err on any failure.
pub async fn run_and_publish(common: &CommonArgs, opts: &PeersOpts) -> Result<()> {
    let report = run(common, opts).await?;
    let failures = publish(&report, &common.out)?;
    report::scenario_result("peers", &failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_command_line() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            peers: PeersOpts,
        }
        let cli = Cli::try_parse_from(["peers"]).expect("no options is valid");
        assert_eq!(cli.peers, PeersOpts::default());
        let cli = Cli::try_parse_from(["peers", "--clients", "2,4", "--delays-ms", "0,5"])
            .expect("lists are valid");
        assert_eq!(cli.peers.clients, [2, 4]);
        assert_eq!(cli.peers.delays_ms, [0, 5]);
        assert!(Cli::try_parse_from(["peers", "--clients", "0"]).is_err());
    }

    #[test]
    fn resp_replies() {
        assert_eq!(
            parse_reply(b"+OK\r\n"),
            Ok(Some((Reply::Simple("OK".into()), 5)))
        );
        assert_eq!(
            parse_reply(b"+PONG\r\n+OK\r\n"),
            Ok(Some((Reply::Simple("PONG".into()), 7)))
        );
        assert_eq!(
            parse_reply(b"-ERR wrong number of arguments\r\n"),
            Ok(Some((
                Reply::Error("ERR wrong number of arguments".into()),
                32
            )))
        );
        assert_eq!(parse_reply(b":42\r\n"), Ok(Some((Reply::Integer(42), 5))));
        // Incomplete: wait for more.
        for partial in [&b""[..], b"+", b"+O", b"+OK", b"+OK\r"] {
            assert_eq!(parse_reply(partial), Ok(None), "{partial:?}");
        }
        // Not a reply SET or PING gives, or not RESP at all.
        assert!(parse_reply(b"$2\r\nOK\r\n").is_err());
        assert!(parse_reply(b"*1\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 400\r\n").is_err());
        assert!(parse_reply(b":x\r\n").is_err());
        // A line that never ends is bounded.
        let mut long = vec![b'+'];
        long.resize(MAX_REPLY_BYTES, b'a');
        assert!(parse_reply(&long).is_err());
        assert_eq!(parse_reply(&long[..MAX_REPLY_BYTES - 1]), Ok(None));
    }

    #[test]
    fn resp_commands() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k:1", b"v\r\n"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$3\r\nk:1\r\n$3\r\nv\r\n\r\n");
        out.clear();
        encode_command(&mut out, &[b"PING"]);
        assert_eq!(out, b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn base64_vectors() {
        // RFC 4648, section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn put_body_is_json_with_base64_fields() {
        let value = make_body(7, 200);
        let body = put_body(b"bench/etcd/d0/0/1", &value);
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(v["key"], "YmVuY2gvZXRjZC9kMC8wLzE=");
        let encoded = v["value"].as_str().expect("value is a string");
        assert_eq!(encoded.len(), value.len().div_ceil(3) * 4);
        assert_eq!(encoded, base64(&value));
        assert_eq!(v.as_object().map(|o| o.len()), Some(2));
    }

    fn three() -> Vec<(&'static str, EtcdPorts)> {
        vec![
            (
                "etcd-a",
                EtcdPorts {
                    client: 1001,
                    peer: 1002,
                    front: 1003,
                },
            ),
            (
                "etcd-b",
                EtcdPorts {
                    client: 2001,
                    peer: 2002,
                    front: 2003,
                },
            ),
            (
                "etcd-c",
                EtcdPorts {
                    client: 3001,
                    peer: 3002,
                    front: 3003,
                },
            ),
        ]
    }

    fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
        let i = args
            .iter()
            .position(|a| a == name)
            .unwrap_or_else(|| panic!("{name} missing from {args:?}"));
        &args[i + 1]
    }

    #[test]
    fn etcd_wiring() {
        let plan = etcd_plan(&three(), Path::new("/data/etcd"), "tok", 3000);
        assert_eq!(plan.members.len(), 3);
        let cluster = "etcd-a=http://127.0.0.1:1003,etcd-b=http://127.0.0.1:2003,etcd-c=http://127.0.0.1:3003";
        for (m, base) in plan.members.iter().zip([1000u16, 2000, 3000]) {
            let a = &m.args;
            // Everyone agrees on the cluster, made of the front doors, so ids match.
            assert_eq!(flag(a, "--initial-cluster"), cluster);
            assert_eq!(flag(a, "--name"), m.name);
            assert_eq!(flag(a, "--listen-peer-urls"), loopback_url(base + 2));
            assert_eq!(
                flag(a, "--initial-advertise-peer-urls"),
                loopback_url(base + 3)
            );
            assert_eq!(flag(a, "--listen-client-urls"), loopback_url(base + 1));
            assert_eq!(flag(a, "--advertise-client-urls"), loopback_url(base + 1));
            assert_eq!(flag(a, "--initial-cluster-token"), "tok");
            assert_eq!(flag(a, "--initial-cluster-state"), "new");
            assert_eq!(flag(a, "--election-timeout"), "3000");
            assert_eq!(
                Path::new(flag(a, "--data-dir")),
                Path::new("/data/etcd").join(&m.name)
            );
            assert_eq!(a.len() % 2, 0, "flags come in pairs: {a:?}");
        }
        // One link per ordered pair, to the destination's real peer listener.
        assert_eq!(plan.relays.len(), 6);
        for (from, to, port) in [
            ("etcd-a", "etcd-b", 2002),
            ("etcd-a", "etcd-c", 3002),
            ("etcd-b", "etcd-a", 1002),
            ("etcd-b", "etcd-c", 3002),
            ("etcd-c", "etcd-a", 1002),
            ("etcd-c", "etcd-b", 2002),
        ] {
            assert!(
                plan.relays.contains(&RelayPlan {
                    from: from.into(),
                    to: to.into(),
                    upstream_port: port
                }),
                "{from}->{to} missing: {:?}",
                plan.relays
            );
        }
    }

    #[test]
    fn election_timeout_follows_the_largest_delay() {
        assert_eq!(election_timeout_ms(0), 1000);
        assert_eq!(election_timeout_ms(40), 1000);
        assert_eq!(election_timeout_ms(150), 3000);
        assert_eq!(election_timeout_ms(10_000), 50_000);
    }

    #[test]
    fn front_door_finds_the_sender() {
        let advertised: Vec<String> = [1003u16, 2003, 3003].map(loopback_url).to_vec();
        // What etcd's stream reader sends (Go canonicalises the header name).
        let stream = b"GET /raft/stream/msgappv2/8e9e05c52164694d HTTP/1.1\r\n\
            Host: 127.0.0.1:1003\r\nUser-Agent: Go-http-client/1.1\r\n\
            X-Peerurls: http://127.0.0.1:2003\r\nX-Server-From: 8e9e05c52164694d\r\n\r\n";
        assert_eq!(sender_of(stream, &advertised), Some(1));
        let post = b"POST /raft HTTP/1.1\r\nx-peerurls: http://10.0.0.1:1, http://127.0.0.1:3003\r\n\r\nbody";
        assert_eq!(sender_of(post, &advertised), Some(2));
        let probe = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1:1003\r\n\r\n";
        assert_eq!(sender_of(probe, &advertised), None);
        let stranger = b"GET / HTTP/1.1\r\nX-PeerURLs: http://127.0.0.1:9\r\n\r\n";
        assert_eq!(sender_of(stranger, &advertised), None);
        // A header in the body does not count.
        let in_body = b"POST /raft HTTP/1.1\r\n\r\nX-PeerURLs: http://127.0.0.1:2003\r\n";
        assert_eq!(sender_of(in_body, &advertised), None);
    }

    #[test]
    fn leader_agreement() {
        let s = Statuses {
            ids: vec!["a1".into(), "b2".into(), "c3".into()],
            leaders: vec!["b2".into(), "b2".into(), "b2".into()],
        };
        assert_eq!(s.agreed_leader(), Some(1));
        let split = Statuses {
            ids: s.ids.clone(),
            leaders: vec!["b2".into(), "0".into(), "b2".into()],
        };
        assert_eq!(split.agreed_leader(), None);
        let none = Statuses {
            ids: s.ids.clone(),
            leaders: vec!["0".into(); 3],
        };
        assert_eq!(none.agreed_leader(), None);
    }

    #[test]
    fn apt_errors_that_an_update_fixes() {
        assert!(lacks_package_lists(
            "E: Unable to locate package etcd-server"
        ));
        assert!(lacks_package_lists(
            "E: Package 'redis-server' has no installation candidate"
        ));
        assert!(!lacks_package_lists(
            "E: Could not open lock file /var/lib/dpkg/lock-frontend - open (13: Permission denied)"
        ));
    }
}
