//! `meridian dev`: a complete local cluster in one command (SPEC §2).
//!
//! The cluster lives in one folder: `topology.toml`, `certs/`, `data/<node>/` and
//! `logs/<node>.log`. A folder that already holds a topology is reused as it is (same ports,
//! same CA, same data), so a second run picks up where the first stopped; only node
//! certificates are issued afresh. Every node is a child `meridian serve` process in its own
//! process group, so a Ctrl-C in the terminal reaches this supervisor only, and the supervisor
//! stops the nodes in order: SIGTERM, a grace period, then SIGKILL.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, sleep, timeout};

use crate::config::{Topology, TopologyError};
use crate::observe::logging::LogFormat;
use crate::tools::certs::{self, CertsError};

/// Region names, in the order `--regions N` takes them.
pub const REGION_NAMES: [&str; 9] = [
    "eu-west",
    "us-east",
    "ap-south",
    "sa-east",
    "eu-north",
    "us-west",
    "ap-east",
    "af-south",
    "me-central",
];
/// The default of `--regions`.
pub const DEFAULT_REGIONS: usize = 3;
/// How long every node together has to answer `/readyz` with 200.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long a node has to stop after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// One `/readyz` probe; a node that takes longer is just not ready yet.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of a node's log shown when it dies.
const LOG_TAIL_LINES: usize = 30;

/// `meridian dev` arguments.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// `None`: the default, or whatever an existing topology in `dir` declares.
    pub regions: Option<usize>,
    pub dir: PathBuf,
    /// Passed on to every node.
    pub log_format: LogFormat,
    /// Route every inter-region link through the link emulator with this one-way delay.
    pub latency_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("--regions must be between 1 and {max}, not {0}", max = REGION_NAMES.len())]
    RegionCount(usize),
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot pick a free {kind} port on 127.0.0.1: {source}")]
    Port {
        kind: &'static str,
        source: io::Error,
    },
    #[error("the generated topology is invalid (a bug in `meridian dev`): {0}")]
    Generated(TopologyError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("cannot start the link emulator: {0}")]
    Proxy(#[from] crate::tools::proxy_cmd::ProxyCmdError),
    #[error("cannot create the cluster certificates: {0}")]
    Certs(#[from] CertsError),
    #[error("cannot find this executable to start the nodes: {0}")]
    Exe(io::Error),
    #[error("cannot start node {node:?}: {source}")]
    Spawn { node: String, source: io::Error },
    #[error("cannot listen for Ctrl-C and SIGTERM: {0}")]
    Signals(io::Error),
    #[error("node {node:?} exited unexpectedly ({status}); its log is {}", log.display())]
    NodeExited {
        node: String,
        status: String,
        log: PathBuf,
    },
    #[error(
        "node {node:?} did not answer http://{api}/readyz with 200 within {} s; its log is {}",
        READY_DEADLINE.as_secs(),
        log.display()
    )]
    NotReady {
        node: String,
        api: SocketAddr,
        log: PathBuf,
    },
}

impl DevError {
    /// Bad usage or an invalid existing topology (exit 2), as opposed to a runtime failure.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, DevError::RegionCount(_) | DevError::Topology(_))
    }
}

/// The topology `meridian dev` writes for `regions` (names) with `(peer, api)` ports.
pub fn topology_text(regions: &[&str], ports: &[(u16, u16)]) -> String {
    let mut text = String::from(
        "# Written by `meridian dev`. Edit freely: the next `meridian dev --dir` on this folder\n\
         # reuses it as it is.\n\
         cluster = \"dev\"\n\n\
         [tls]\n\
         ca = \"certs/ca.pem\"\n\n\
         [clock]\n\
         max_drift_ms = 500\n",
    );
    for region in regions {
        let _ = write!(text, "\n[[regions]]\nname = \"{region}\"\n");
    }
    for (region, (peer, api)) in regions.iter().zip(ports) {
        let _ = write!(
            text,
            "\n[[nodes]]\n\
             id = \"{region}-1\"\n\
             region = \"{region}\"\n\
             peer = \"127.0.0.1:{peer}\"\n\
             api = \"127.0.0.1:{api}\"\n"
        );
    }
    if regions.contains(&"eu-west") {
        text.push_str(
            "\n[[residency]]\n\
             name = \"eu-personal-data\"\n\
             keys = \"users/eu/*\"\n\
             home = \"eu-west\"\n\
             foreign = \"forward\"\n",
        );
    }
    text
}

/// Writes `dir/topology.toml` for `regions` regions, one node each, on free loopback ports.
pub fn write_topology(dir: &Path, regions: usize) -> Result<PathBuf, DevError> {
    if !(1..=REGION_NAMES.len()).contains(&regions) {
        return Err(DevError::RegionCount(regions));
    }
    let names = &REGION_NAMES[..regions];
    // Every socket stays bound until all ports are picked, so no two nodes get the same one.
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in names {
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|source| DevError::Port {
            kind: "UDP",
            source,
        })?;
        let tcp = TcpListener::bind("127.0.0.1:0").map_err(|source| DevError::Port {
            kind: "TCP",
            source,
        })?;
        let port = |addr: io::Result<SocketAddr>, kind| {
            addr.map(|a| a.port())
                .map_err(|source| DevError::Port { kind, source })
        };
        ports.push((
            port(udp.local_addr(), "UDP")?,
            port(tcp.local_addr(), "TCP")?,
        ));
        held.push((udp, tcp));
    }
    let text = topology_text(names, &ports);
    let path = dir.join("topology.toml");
    Topology::parse(&text, &path).map_err(DevError::Generated)?;
    let tmp = dir.join("topology.toml.tmp");
    fs::write(&tmp, &text)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|source| DevError::Io {
            action: "write the topology",
            path: path.clone(),
            source,
        })?;
    drop(held);
    Ok(path)
}

/// The status code of `GET path` on `addr`.
pub async fn http_status(addr: SocketAddr, path: &str) -> io::Result<u16> {
    // The nodes are local: a proxy from the environment must not see the probe.
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(io::Error::other)?;
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .map_err(io::Error::other)?;
    Ok(response.status().as_u16())
}

fn log_format_arg(format: LogFormat) -> &'static str {
    match format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    }
}

/// Ctrl-C and SIGTERM, registered up front so that neither can kill the supervisor (and orphan
/// the nodes) between two awaits.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
    }
}

struct Node {
    id: String,
    region: String,
    api: SocketAddr,
    peer: SocketAddr,
    log: PathBuf,
    child: tokio::process::Child,
}

/// How supervision ended.
enum Outcome {
    Interrupted,
    Failed(DevError),
}

/// Runs the cluster until Ctrl-C or SIGTERM; then stops every node.
pub async fn run(options: DevOptions) -> Result<(), DevError> {
    if let Some(n) = options.regions
        && !(1..=REGION_NAMES.len()).contains(&n)
    {
        return Err(DevError::RegionCount(n));
    }
    let mut signals = Signals::new().map_err(DevError::Signals)?;
    let dir = create_dir(&options.dir, "create the cluster folder")?;
    let dir = fs::canonicalize(&dir).map_err(|source| DevError::Io {
        action: "resolve the cluster folder",
        path: dir.clone(),
        source,
    })?;

    let topology_path = dir.join("topology.toml");
    if topology_path.exists() {
        println!("reusing the cluster in {}", dir.display());
    } else {
        write_topology(&dir, options.regions.unwrap_or(DEFAULT_REGIONS))?;
        println!("created a cluster in {}", dir.display());
    }
    let topology = Topology::load(&topology_path)?;
    if let Some(n) = options.regions
        && n != topology.regions.len()
    {
        println!(
            "note: {} declares {} regions; --regions {n} applies only to a new folder",
            topology_path.display(),
            topology.regions.len()
        );
    }

    let cert_dir = topology.tls.cert_dir.clone();
    let report = certs::generate_certs(&topology, &cert_dir)?;
    println!(
        "certificates in {} ({})",
        cert_dir.display(),
        if report.ca_reused {
            "existing CA kept, node certificates renewed"
        } else {
            "new CA"
        }
    );
    if topology.tls.ca != cert_dir.join("ca.pem") {
        println!(
            "warning: tls.ca is {}, but the CA was written to {}; nodes will not trust each other",
            topology.tls.ca.display(),
            cert_dir.join("ca.pem").display()
        );
    }

    let logs = create_dir(&dir.join("logs"), "create the log folder")?;
    let data = create_dir(&dir.join("data"), "create the data folder")?;
    let exe = std::env::current_exe().map_err(DevError::Exe)?;
    // With --latency-ms, nodes run with a copy of the topology whose [[links]] send every
    // inter-region dial through an in-process emulator; the reusable topology stays as it is.
    let (node_topology_path, _emulator) = match options.latency_ms {
        Some(ms) => {
            let (path, emulator) = start_emulator(&dir, &topology_path, &topology, ms).await?;
            (path, Some(emulator))
        }
        None => (topology_path.clone(), None),
    };
    let mut nodes = Vec::new();
    for node in &topology.nodes {
        match spawn_node(
            &exe,
            &node_topology_path,
            node,
            &logs,
            &data,
            options.log_format,
        ) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stop_all(&mut nodes).await;
                return Err(e);
            }
        }
    }

    let outcome = match wait_ready(&mut nodes, &mut signals).await {
        Ok(true) => {
            print_cluster(&nodes);
            supervise(&mut nodes, &mut signals).await
        }
        Ok(false) => Outcome::Interrupted,
        Err(e) => Outcome::Failed(e),
    };
    match &outcome {
        Outcome::Interrupted => println!("stopping the cluster"),
        Outcome::Failed(e) => {
            eprintln!("error: {e}");
            if let DevError::NodeExited { log, .. } | DevError::NotReady { log, .. } = e {
                print_log_tail(log);
            }
            eprintln!("stopping the other nodes");
        }
    }
    stop_all(&mut nodes).await;
    match outcome {
        Outcome::Interrupted => {
            println!(
                "cluster stopped; `meridian dev --dir {}` restarts it",
                dir.display()
            );
            Ok(())
        }
        Outcome::Failed(e) => Err(e),
    }
}

fn create_dir(path: &Path, action: &'static str) -> Result<PathBuf, DevError> {
    fs::create_dir_all(path).map_err(|source| DevError::Io {
        action,
        path: path.to_owned(),
        source,
    })?;
    Ok(path.to_owned())
}

fn spawn_node(
    exe: &Path,
    topology_path: &Path,
    node: &crate::config::NodeConfig,
    logs: &Path,
    data: &Path,
    log_format: LogFormat,
) -> Result<Node, DevError> {
    let log_path = logs.join(format!("{}.log", node.id));
    let open_log = || {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
    };
    let log_err = |source| DevError::Io {
        action: "open the node log",
        path: log_path.clone(),
        source,
    };
    let mut log = open_log().map_err(log_err)?;
    // Runs append to one log: a header tells where each one starts.
    writeln!(
        log,
        "--- meridian dev: starting {} (unix time {})",
        node.id,
        crate::clock::unix_ms() / 1000
    )
    .map_err(log_err)?;
    let stdout = log.try_clone().map_err(log_err)?;
    let child = tokio::process::Command::new(exe)
        .arg("--log-format")
        .arg(log_format_arg(log_format))
        .arg("serve")
        .arg("--topology")
        .arg(topology_path)
        .arg("--node")
        .arg(&node.id)
        .arg("--data-dir")
        .arg(data.join(&node.id))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(log))
        // Own process group: the terminal's Ctrl-C reaches the supervisor only, which stops
        // the nodes itself (and notices a node that dies for any other reason).
        .process_group(0)
        // Should the supervisor itself fail, no node outlives it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DevError::Spawn {
            node: node.id.clone(),
            source,
        })?;
    Ok(Node {
        id: node.id.clone(),
        region: node.region.clone(),
        api: node.api,
        peer: node.peer,
        log: log_path,
        child,
    })
}

/// The first node found to have exited, as an error.
fn exited(nodes: &mut [Node]) -> Option<DevError> {
    for node in nodes.iter_mut() {
        let status = match node.child.try_wait() {
            Ok(None) => continue,
            Ok(Some(status)) => describe(status),
            Err(e) => format!("cannot be waited for: {e}"),
        };
        return Some(DevError::NodeExited {
            node: node.id.clone(),
            status,
            log: node.log.clone(),
        });
    }
    None
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Waits until every node answers `/readyz` with 200. `Ok(false)`: interrupted first.
async fn wait_ready(nodes: &mut [Node], signals: &mut Signals) -> Result<bool, DevError> {
    let deadline = Instant::now() + READY_DEADLINE;
    let mut ready = vec![false; nodes.len()];
    loop {
        if let Some(e) = exited(nodes) {
            return Err(e);
        }
        for (node, ready) in nodes.iter().zip(ready.iter_mut()) {
            if !*ready {
                *ready = matches!(
                    timeout(PROBE_TIMEOUT, http_status(node.api, "/readyz")).await,
                    Ok(Ok(200))
                );
            }
        }
        if ready.iter().all(|r| *r) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            let Some(node) = nodes.iter().zip(&ready).find(|(_, r)| !**r).map(|(n, _)| n) else {
                return Ok(true);
            };
            return Err(DevError::NotReady {
                node: node.id.clone(),
                api: node.api,
                log: node.log.clone(),
            });
        }
        tokio::select! {
            biased;
            () = signals.recv() => return Ok(false),
            () = sleep(POLL_INTERVAL) => {}
        }
    }
}

/// Runs until a signal (`Interrupted`) or until a node exits (`Failed`).
async fn supervise(nodes: &mut [Node], signals: &mut Signals) -> Outcome {
    loop {
        tokio::select! {
            biased;
            () = signals.recv() => return Outcome::Interrupted,
            () = sleep(Duration::from_millis(250)) => {
                if let Some(e) = exited(nodes) {
                    return Outcome::Failed(e);
                }
            }
        }
    }
}

fn print_cluster(nodes: &[Node]) {
    let rows: Vec<[String; 5]> = nodes
        .iter()
        .map(|n| {
            [
                n.id.clone(),
                n.region.clone(),
                format!("http://{}", n.api),
                n.peer.to_string(),
                n.log.display().to_string(),
            ]
        })
        .collect();
    let header = ["NODE", "REGION", "API", "PEER (QUIC)", "LOG"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out
    };
    println!();
    println!("{}", line(header));
    for row in &rows {
        println!("{}", line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    if let Some(first) = nodes.first() {
        let other = nodes.get(1).unwrap_or(first);
        println!();
        println!("try:");
        println!(
            "  curl -X PUT http://{}/v1/kv/hello -d '{{\"from\":\"{}\"}}'",
            first.api, first.region
        );
        println!("  curl http://{}/v1/kv/hello", other.api);
    }
    println!();
    println!("all {} nodes ready; Ctrl-C stops the cluster", nodes.len());
}

fn print_log_tail(log: &Path) {
    match fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!("--- last lines of {} ---", log.display());
            for line in &lines[start..] {
                eprintln!("{line}");
            }
            eprintln!("---");
        }
        Err(e) => eprintln!("(cannot read {}: {e})", log.display()),
    }
}

/// SIGTERM to every node still running, then waits; a node still running after
/// [`STOP_GRACE`] is killed.
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        if !matches!(node.child.try_wait(), Ok(None)) {
            continue;
        }
        let Some(pid) = node.child.id() else {
            continue;
        };
        // `kill` keeps this crate free of unsafe code and of a libc binding.
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(sent, Ok(s) if s.success()) {
            eprintln!(
                "cannot send SIGTERM to node {} (pid {pid}); killing it",
                node.id
            );
            let _ = node.child.start_kill();
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for node in nodes.iter_mut() {
        let status = match tokio::time::timeout_at(deadline, node.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                eprintln!(
                    "node {} did not stop within {} s; killing it",
                    node.id,
                    STOP_GRACE.as_secs()
                );
                let _ = node.child.start_kill();
                node.child.wait().await
            }
        };
        match status {
            Ok(status) if status.success() => println!("stopped {}", node.id),
            Ok(status) => println!("stopped {} ({})", node.id, describe(status)),
            Err(e) => eprintln!("cannot wait for node {}: {e}", node.id),
        }
    }
}

/// Write `topology-latency.toml` (the topology plus a `[[links]]` entry through a fresh local
/// port for every directed pair of nodes), start the emulator on it with `latency_ms` one-way
/// delay in both directions, and serve its control API on a free port.
async fn start_emulator(
    dir: &Path,
    topology_path: &Path,
    topology: &Topology,
    latency_ms: u64,
) -> Result<(PathBuf, meridian_emulator::Emulator), DevError> {
    use crate::tools::proxy_cmd::{self, ProxyCmdError};
    use meridian_emulator::{DirectionSel, EmulatorOptions, SettingsUpdate};
    let mut text = fs::read_to_string(topology_path).map_err(|source| DevError::Io {
        action: "read the topology",
        path: topology_path.to_path_buf(),
        source,
    })?;
    text.push_str(
        "\n# Added by `meridian dev --latency-ms`: every dial goes through the link emulator.\n",
    );
    for from in &topology.nodes {
        for to in &topology.nodes {
            if from.id == to.id {
                continue;
            }
            let via = std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .map_err(|source| DevError::Port {
                    kind: "UDP emulator",
                    source,
                })?;
            let _ = write!(
                text,
                "\n[[links]]\nfrom = \"{}\"\nto = \"{}\"\nvia = \"{via}\"\n",
                from.id, to.id
            );
        }
    }
    let path = dir.join("topology-latency.toml");
    fs::write(&path, text).map_err(|source| DevError::Io {
        action: "write the latency topology",
        path: path.clone(),
        source,
    })?;
    let with_links = Topology::load(&path)?;
    let emulator = proxy_cmd::start(&with_links, EmulatorOptions::default()).await?;
    emulator
        .set_all(&SettingsUpdate {
            delay_ms: Some(latency_ms),
            direction: Some(DirectionSel::Both),
            ..SettingsUpdate::default()
        })
        .map_err(ProxyCmdError::from)?;
    let port_error = |source| DevError::Port {
        kind: "TCP emulator control",
        source,
    };
    let control = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(port_error)?;
    let control_addr = control.local_addr().map_err(port_error)?;
    tokio::spawn(meridian_emulator::serve_control(
        emulator.handle(),
        control,
        std::future::pending(),
    ));
    println!(
        "inter-region links carry {latency_ms} ms one-way delay through the link emulator; \
         change it with: meridian proxy set --control {control_addr} --all --delay-ms N (or --down)"
    );
    Ok((path, emulator))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_topologies_are_valid_for_every_region_count() {
        let origin = Path::new("/tmp/dev/topology.toml");
        for n in 1..=REGION_NAMES.len() {
            let ports: Vec<(u16, u16)> = (0..n as u16).map(|i| (7000 + i, 8000 + i)).collect();
            let text = topology_text(&REGION_NAMES[..n], &ports);
            let topology = Topology::parse(&text, origin).unwrap();
            assert_eq!(topology.cluster, "dev");
            assert_eq!(topology.regions.len(), n);
            assert_eq!(topology.nodes.len(), n);
            assert_eq!(topology.nodes[0].id, "eu-west-1");
            assert_eq!(topology.tls.ca, Path::new("/tmp/dev/certs/ca.pem"));
            assert_eq!(topology.tls.cert_dir, Path::new("/tmp/dev/certs"));
            assert_eq!(topology.clock.max_drift_ms, 500);
            assert_eq!(topology.residency.rules().len(), 1);
        }
        let text = topology_text(&["us-east"], &[(1, 2)]);
        let topology = Topology::parse(&text, origin).unwrap();
        assert!(topology.residency.rules().is_empty());
    }

    #[test]
    fn written_topologies_use_distinct_free_ports() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_topology(dir.path(), 9).unwrap();
        let topology = Topology::load(&path).unwrap();
        let mut ports: Vec<u16> = topology
            .nodes
            .iter()
            .flat_map(|n| [n.peer.port(), n.api.port()])
            .collect();
        assert!(topology.nodes.iter().all(|n| n.api.ip().is_loopback()));
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 18);
        assert!(matches!(
            write_topology(dir.path(), 10),
            Err(DevError::RegionCount(10))
        ));
        assert!(matches!(
            write_topology(dir.path(), 0),
            Err(DevError::RegionCount(0))
        ));
    }

    #[tokio::test]
    async fn http_status_reads_a_real_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /readyz HTTP/1.1\r\n"));
            stream
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        assert_eq!(http_status(addr, "/readyz").await.unwrap(), 503);
        server.await.unwrap();
    }
}
