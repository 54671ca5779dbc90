//! Starting a throw-away one-node cluster for a benchmark, and stopping it again.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// The node id written into the bench topology.
pub const NODE_ID: &str = "bench-1";

/// Finds the `meridian` binary: an explicit path, else next to this executable.
pub fn locate_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        return Err(Error::usage(format!(
            "--meridian-bin {}: no such file",
            p.display()
        )));
    }
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let candidate = exe
        .parent()
        .map(|dir| dir.join(format!("meridian{}", std::env::consts::EXE_SUFFIX)));
    match candidate {
        Some(c) if c.is_file() => Ok(c),
        _ => Err(Error::runtime(format!(
            "the `meridian` binary was not found next to {}; build it with \
             `cargo build --release -p meridian-node` (and run target/release/meridian-bench), \
             pass --meridian-bin PATH, or benchmark a running node with --target http://HOST:PORT",
            exe.display()
        ))),
    }
}

/// Picks a free UDP port (peer) and a free TCP port (api) on loopback.
/// The sockets are closed again before the node binds them; the window is small.
pub fn free_ports() -> Result<(u16, u16)> {
    let ports = free_port_pairs(1)?;
    Ok(ports[0])
}

/// `n` pairs of (UDP peer port, TCP api port) on loopback, all distinct: every socket is held
/// open until all are picked, then closed before the nodes bind them.
pub fn free_port_pairs(n: usize) -> Result<Vec<(u16, u16)>> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        let udp = UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket on 127.0.0.1")?;
        let tcp = TcpListener::bind("127.0.0.1:0").context("binding a TCP socket on 127.0.0.1")?;
        let peer = udp.local_addr().context("reading the UDP port")?.port();
        let api = tcp.local_addr().context("reading the TCP port")?.port();
        ports.push((peer, api));
        held.push((udp, tcp));
    }
    drop(held);
    Ok(ports)
}

/// One node of a generated bench topology: its own region, loopback ports.
#[derive(Debug, Clone)]
pub struct TopologyNode {
    pub region: String,
    pub id: String,
    pub peer_port: u16,
    pub api_port: u16,
}

impl TopologyNode {
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }
}

/// The one-node topology of the `write` scenario.
pub fn topology_toml(peer_port: u16, api_port: u16) -> String {
    cluster_toml(&[TopologyNode {
        region: "bench".into(),
        id: NODE_ID.into(),
        peer_port,
        api_port,
    }])
}

/// A topology of cluster `bench`: one region per node, `[tls] ca = "certs/ca.pem"`.
pub fn cluster_toml(nodes: &[TopologyNode]) -> String {
    let mut s = String::from(
        "cluster = \"bench\"\n\n[tls]\nca = \"certs/ca.pem\"\n\n[clock]\nmax_drift_ms = 500\n",
    );
    for n in nodes {
        s.push_str(&format!("\n[[regions]]\nname = \"{}\"\n", n.region));
    }
    for n in nodes {
        s.push_str(&format!(
            "\n[[nodes]]\nid = \"{}\"\nregion = \"{}\"\npeer = \"127.0.0.1:{}\"\napi = \"127.0.0.1:{}\"\n",
            n.id, n.region, n.peer_port, n.api_port
        ));
    }
    s
}

/// How to run one node: `meridian serve --topology … --node … --data-dir …`.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub binary: PathBuf,
    pub topology_path: PathBuf,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub api_url: String,
    pub ready_timeout: Duration,
}

/// A running `meridian serve`. Dropping it stops the node: SIGTERM, up to 10 s
/// for it to exit, then SIGKILL.
pub struct NodeGuard {
    child: Option<Child>,
    spec: NodeSpec,
    pub log_path: PathBuf,
    pub api_url: String,
    pub topology_path: PathBuf,
    /// When the current process was spawned.
    pub spawned_at: Instant,
}

pub struct NodeConfig<'a> {
    pub binary: &'a Path,
    pub data_dir: &'a Path,
    pub log_path: PathBuf,
    pub ready_timeout: Duration,
}

impl NodeGuard {
    /// The one-node set-up of `write`: writes the topology next to the data directory,
    /// generates certificates if the topology's CA is missing, spawns the node and waits
    /// for `GET /readyz` to answer 200.
    pub async fn start(cfg: NodeConfig<'_>, http: &reqwest::Client) -> Result<NodeGuard> {
        let parent = cfg.data_dir.parent().ok_or_else(|| {
            Error::usage(format!(
                "data dir {} has no parent directory for the topology file",
                cfg.data_dir.display()
            ))
        })?;
        fs::create_dir_all(cfg.data_dir)
            .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
        let (peer_port, api_port) = free_ports()?;
        let topology_path = parent.join("topology.toml");
        fs::write(&topology_path, topology_toml(peer_port, api_port))
            .with_context(|| format!("writing {}", topology_path.display()))?;

        // The topology names certs/ca.pem; `serve` presumably needs the node's pair too.
        // A failure here is not fatal on its own: if `serve` can do without, fine.
        let certs_dir = parent.join("certs");
        let mut certs_problem = None;
        if !certs_dir.join("ca.pem").is_file()
            && let Err(e) = generate_certs(cfg.binary, &topology_path, &certs_dir, &cfg.log_path)
        {
            eprintln!("meridian-bench: warning: {e}");
            certs_problem = Some(e.to_string());
        }

        let spec = NodeSpec {
            binary: cfg.binary.to_path_buf(),
            topology_path,
            node_id: NODE_ID.into(),
            data_dir: cfg.data_dir.to_path_buf(),
            api_url: format!("http://127.0.0.1:{api_port}"),
            ready_timeout: cfg.ready_timeout,
        };
        let mut guard = NodeGuard::spawn(spec, cfg.log_path)?;
        match guard.wait_ready(http).await {
            Ok(()) => Ok(guard),
            Err(e) => match certs_problem {
                Some(c) => Err(Error::runtime(format!("{e}\n(also, before that: {c})"))),
                None => Err(e),
            },
        }
    }

    /// Spawns `meridian serve` with its output in `log_path`; does not wait for readiness.
    pub fn spawn(spec: NodeSpec, log_path: PathBuf) -> Result<NodeGuard> {
        fs::create_dir_all(&spec.data_dir)
            .with_context(|| format!("creating data dir {}", spec.data_dir.display()))?;
        let mut guard = NodeGuard {
            child: None,
            log_path: log_path.clone(),
            api_url: spec.api_url.clone(),
            topology_path: spec.topology_path.clone(),
            spawned_at: Instant::now(),
            spec,
        };
        guard.respawn(log_path)?;
        Ok(guard)
    }

    /// Starts the node process again (after `stop`), with its output in `log_path`.
    pub fn respawn(&mut self, log_path: PathBuf) -> Result<()> {
        if self.child.is_some() {
            return Err(Error::runtime(format!(
                "node {} is still running; stop it before starting it again",
                self.spec.node_id
            )));
        }
        let spec = &self.spec;
        let log = File::create(&log_path)
            .with_context(|| format!("creating node log {}", log_path.display()))?;
        let log_out = log.try_clone().context("duplicating the node log handle")?;
        let spawned_at = Instant::now();
        let child = Command::new(&spec.binary)
            .arg("serve")
            .arg("--topology")
            .arg(&spec.topology_path)
            .arg("--node")
            .arg(&spec.node_id)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {} serve", spec.binary.display()))?;
        self.child = Some(child);
        self.spawned_at = spawned_at;
        self.log_path = log_path;
        Ok(())
    }

    /// Polls `GET /readyz` until it answers 200, for up to the spec's ready timeout.
    pub async fn wait_ready(&mut self, http: &reqwest::Client) -> Result<()> {
        let timeout = self.spec.ready_timeout;
        let url = format!("{}/readyz", self.api_url);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Err(Error::runtime(format!(
                    "node {} exited before becoming ready ({status}); last lines of {}:\n{}",
                    self.spec.node_id,
                    self.log_path.display(),
                    log_tail(&self.log_path, 30)
                )));
            }
            let last = match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                Ok(resp) if resp.status() == reqwest::StatusCode::OK => return Ok(()),
                Ok(resp) => format!("GET /readyz answered {}", resp.status()),
                Err(e) => format!("GET /readyz failed: {}", crate::http::error_chain(&e)),
            };
            if Instant::now() >= deadline {
                return Err(Error::runtime(format!(
                    "node {} at {} did not become ready within {} s ({last}); last lines of {}:\n{}",
                    self.spec.node_id,
                    self.api_url,
                    timeout.as_secs(),
                    self.log_path.display(),
                    log_tail(&self.log_path, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` if the node process has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().context("checking the node process"),
            None => Ok(None),
        }
    }

    /// Fails with the log tail if the node died.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.exited()? {
            None => Ok(()),
            Some(status) => Err(Error::runtime(format!(
                "node {} exited during the benchmark ({status}); last lines of {}:\n{}",
                self.spec.node_id,
                self.log_path.display(),
                log_tail(&self.log_path, 30)
            ))),
        }
    }

    /// Stops the node and tells how it went.
    pub fn stop(&mut self) -> String {
        self.stop_checked().1
    }

    /// Stops the node: `(true, …)` when it exited on SIGTERM within 10 s (or had exited
    /// already), `(false, …)` when it had to be killed.
    pub fn stop_checked(&mut self) -> (bool, String) {
        let Some(mut child) = self.child.take() else {
            return (true, "already stopped".into());
        };
        if let Ok(Some(status)) = child.try_wait() {
            return (true, format!("had already exited ({status})"));
        }
        let pid = child.id().to_string();
        let term = Command::new("kill")
            .args(["-TERM", &pid])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if matches!(term, Ok(s) if s.success()) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(status)) => return (true, format!("stopped by SIGTERM ({status})")),
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
        }
        let _ = child.kill();
        match child.wait() {
            Ok(status) => (
                false,
                format!("did not stop on SIGTERM within 10 s; killed ({status})"),
            ),
            Err(e) => (false, format!("did not stop on SIGTERM; kill failed: {e}")),
        }
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            let outcome = self.stop();
            eprintln!("meridian-bench: node {} {outcome}", self.spec.node_id);
        }
    }
}

/// Runs `meridian certs --topology TOPOLOGY --out OUT`; on failure the output is kept in
/// `log_path` with the extension `certs.log`.
pub fn generate_certs(binary: &Path, topology: &Path, out: &Path, log_path: &Path) -> Result<()> {
    let output = Command::new(binary)
        .arg("certs")
        .arg("--topology")
        .arg(topology)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} certs", binary.display()))?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        if text.trim().is_empty() {
            text = "(no output)".into();
        }
        // Keep the evidence next to the node log.
        let _ = fs::write(log_path.with_extension("certs.log"), &text);
        return Err(Error::runtime(format!(
            "`meridian certs --topology {} --out {}` failed ({}):\n{}",
            topology.display(),
            out.display(),
            output.status,
            text.trim_end()
        )));
    }
    Ok(())
}

/// The last `lines` lines of a log file (at most the last 64 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut buf = Vec::new();
    let read = File::open(path).and_then(|mut f| {
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        f.read_to_end(&mut buf)
    });
    if let Err(e) = read {
        return format!("(cannot read {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return "(log is empty)".into();
    }
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
