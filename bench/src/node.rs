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
    let udp = UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket on 127.0.0.1")?;
    let tcp = TcpListener::bind("127.0.0.1:0").context("binding a TCP socket on 127.0.0.1")?;
    let peer = udp.local_addr().context("reading the UDP port")?.port();
    let api = tcp.local_addr().context("reading the TCP port")?.port();
    Ok((peer, api))
}

pub fn topology_toml(peer_port: u16, api_port: u16) -> String {
    format!(
        r#"cluster = "bench"

[tls]
ca = "certs/ca.pem"

[clock]
max_drift_ms = 500

[[regions]]
name = "bench"

[[nodes]]
id = "{NODE_ID}"
region = "bench"
peer = "127.0.0.1:{peer_port}"
api = "127.0.0.1:{api_port}"
"#
    )
}

/// A running `meridian serve`. Dropping it stops the node: SIGTERM, up to 10 s
/// for it to exit, then SIGKILL.
pub struct NodeGuard {
    child: Option<Child>,
    pub log_path: PathBuf,
    pub api_url: String,
    pub topology_path: PathBuf,
}

pub struct NodeConfig<'a> {
    pub binary: &'a Path,
    pub data_dir: &'a Path,
    pub log_path: PathBuf,
    pub ready_timeout: Duration,
}

impl NodeGuard {
    /// Writes the topology next to the data directory, generates certificates if the
    /// topology's CA is missing, spawns the node and waits for `GET /readyz` to answer 200.
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

        let log = File::create(&cfg.log_path)
            .with_context(|| format!("creating node log {}", cfg.log_path.display()))?;
        let log_out = log.try_clone().context("duplicating the node log handle")?;
        let child = Command::new(cfg.binary)
            .arg("serve")
            .arg("--topology")
            .arg(&topology_path)
            .arg("--node")
            .arg(NODE_ID)
            .arg("--data-dir")
            .arg(cfg.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {} serve", cfg.binary.display()))?;

        let mut guard = NodeGuard {
            child: Some(child),
            log_path: cfg.log_path,
            api_url: format!("http://127.0.0.1:{api_port}"),
            topology_path,
        };
        match guard.wait_ready(http, cfg.ready_timeout).await {
            Ok(()) => Ok(guard),
            Err(e) => match certs_problem {
                Some(c) => Err(Error::runtime(format!("{e}\n(also, before that: {c})"))),
                None => Err(e),
            },
        }
    }

    async fn wait_ready(&mut self, http: &reqwest::Client, timeout: Duration) -> Result<()> {
        let url = format!("{}/readyz", self.api_url);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Err(Error::runtime(format!(
                    "the node exited before becoming ready ({status}); last lines of {}:\n{}",
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
                    "the node at {} did not become ready within {} s ({last}); last lines of {}:\n{}",
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
                "the node exited during the benchmark ({status}); last lines of {}:\n{}",
                self.log_path.display(),
                log_tail(&self.log_path, 30)
            ))),
        }
    }

    /// Stops the node and tells how it went.
    pub fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "already stopped".into();
        };
        if let Ok(Some(status)) = child.try_wait() {
            return format!("had already exited ({status})");
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
                    Ok(Some(status)) => return format!("stopped by SIGTERM ({status})"),
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                    Err(_) => break,
                }
            }
        }
        let _ = child.kill();
        match child.wait() {
            Ok(status) => format!("did not stop on SIGTERM within 10 s; killed ({status})"),
            Err(e) => format!("did not stop on SIGTERM; kill failed: {e}"),
        }
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            let outcome = self.stop();
            eprintln!("meridian-bench: node {outcome}");
        }
    }
}

fn generate_certs(binary: &Path, topology: &Path, out: &Path, log_path: &Path) -> Result<()> {
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
