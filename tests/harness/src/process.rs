//! One `meridian serve` child process.
//!
//! Invariant: a [`NodeProcess`] never outlives its handle: dropping it kills the process and
//! reaps it, so a failing test leaves no node behind.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::binary::meridian_bin;
use crate::poll::wait_ready;

const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The signals tests send, besides SIGKILL (which [`NodeProcess::sigkill`] sends through
/// the standard library).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Stop,
    Cont,
}

impl Signal {
    fn flag(self) -> &'static str {
        match self {
            Signal::Term => "-TERM",
            Signal::Stop => "-STOP",
            Signal::Cont => "-CONT",
        }
    }
}

/// `kill -<signal> <pid>`: the workspace forbids `unsafe`, so no direct libc call.
pub fn send_signal(pid: u32, signal: Signal) -> std::io::Result<ExitStatus> {
    Command::new("kill")
        .args([signal.flag(), &pid.to_string()])
        .status()
}

/// How to start `meridian serve`: the topology, the node, its data directory and API address
/// are required; arguments, the log file and environment are optional.
#[derive(Clone, Debug)]
pub struct Serve {
    topology: PathBuf,
    node: String,
    data_dir: PathBuf,
    api: SocketAddr,
    args: Vec<OsString>,
    log: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Serve {
    pub fn new(topology: &Path, node: &str, data_dir: &Path, api: SocketAddr) -> Serve {
        Serve {
            topology: topology.to_owned(),
            node: node.to_owned(),
            data_dir: data_dir.to_owned(),
            api,
            args: Vec::new(),
            log: None,
            env: Vec::new(),
        }
    }

    /// Arguments after `--data-dir`.
    pub fn args<I, S>(mut self, args: I) -> Serve
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Where stderr (the node's log) goes; by default `<data_dir>.log`. The file is appended
    /// to, so the log of a restarted node keeps the earlier runs.
    pub fn log(mut self, path: &Path) -> Serve {
        self.log = Some(path.to_owned());
        self
    }

    /// An environment variable for the node (e.g. `RUST_LOG`); the rest is inherited.
    pub fn env(mut self, key: &str, value: &str) -> Serve {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Start it. Panics if the log file cannot be created or the binary cannot be started.
    pub fn spawn(self) -> NodeProcess {
        let log = self
            .log
            .unwrap_or_else(|| self.data_dir.with_extension("log"));
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent).expect("log folder");
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(meridian_bin())
            .args(["serve", "--topology"])
            .arg(&self.topology)
            .args(["--node", &self.node, "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.args)
            .envs(self.env)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn meridian");
        NodeProcess {
            child,
            api: self.api,
            log,
        }
    }
}

/// A `meridian serve` child process; killed when dropped.
pub struct NodeProcess {
    child: Child,
    api: SocketAddr,
    log: PathBuf,
}

impl NodeProcess {
    /// `meridian serve` with `extra` arguments, the default log file and the inherited
    /// environment: [`Serve`] for anything else.
    pub fn spawn(
        topology: &Path,
        node: &str,
        data_dir: &Path,
        api: SocketAddr,
        extra: &[&str],
    ) -> NodeProcess {
        Serve::new(topology, node, data_dir, api)
            .args(extra)
            .spawn()
    }

    pub fn api(&self) -> SocketAddr {
        self.api
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://<api><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far (empty if it cannot be read).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether `/readyz` answered 200 within `deadline`.
    pub async fn wait_ready(&self, client: &reqwest::Client, deadline: Duration) -> bool {
        wait_ready(client, &self.url("/readyz"), deadline).await
    }

    /// Waits for `/readyz`; panics with the log if it never answers within `deadline`.
    pub async fn assert_ready(&self, client: &reqwest::Client, deadline: Duration) {
        assert!(
            self.wait_ready(client, deadline).await,
            "node at {} did not become ready; log:\n{}",
            self.api,
            self.log_text()
        );
    }

    /// SIGKILL, then reap the process.
    pub fn sigkill(&mut self) -> std::io::Result<()> {
        self.child.kill()?;
        let _ = self.child.wait();
        Ok(())
    }

    /// SIGTERM: a graceful stop; [`NodeProcess::wait_exit`] waits for it.
    pub fn sigterm(&self) {
        let _ = send_signal(self.pid(), Signal::Term);
    }

    /// SIGSTOP: the process freezes until [`NodeProcess::sigcont`].
    pub fn sigstop(&self) {
        let _ = send_signal(self.pid(), Signal::Stop);
    }

    pub fn sigcont(&self) {
        let _ = send_signal(self.pid(), Signal::Cont);
    }

    /// Wait for exit up to `deadline`; the exit status if it exited.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(EXIT_POLL_INTERVAL);
        }
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
