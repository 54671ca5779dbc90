//! Where a scenario runs: its data directory (and the disk under it) and the node it talks to.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use tempfile::TempDir;

use crate::CommonArgs;
use crate::cluster::{Pair, PairConfig, PairInfo};
use crate::error::{Context, Error, Result};
use crate::node::{self, NodeConfig, NodeGuard};

/// The filesystem holding a directory, as `df`/`findmnt` tell.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskInfo {
    pub device: Option<String>,
    pub mount_point: Option<String>,
    pub fs_type: Option<String>,
}

impl DiskInfo {
    pub fn of(dir: &Path) -> DiskInfo {
        let mut info = DiskInfo::default();
        if let Some(out) = command_stdout(Command::new("df").arg("-P").arg(dir)) {
            // Filesystem 1024-blocks Used Available Capacity Mounted on
            if let Some(line) = out.lines().nth(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() >= 6 {
                    info.device = Some(fields[0].to_string());
                    info.mount_point = Some(fields[5..].join(" "));
                }
            }
        }
        info.fs_type = command_stdout(
            Command::new("findmnt")
                .args(["-n", "-o", "FSTYPE", "-T"])
                .arg(dir),
        )
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
        info
    }

    pub fn describe(&self) -> String {
        let dev = self.device.as_deref().unwrap_or("unknown device");
        let fs = self.fs_type.as_deref().unwrap_or("unknown fs");
        let mnt = self.mount_point.as_deref().unwrap_or("?");
        format!("{dev} ({fs}) mounted on {mnt}")
    }

    /// Filesystems where fsync costs nothing or does not reach a disk.
    pub fn is_memory_backed(&self) -> bool {
        matches!(self.fs_type.as_deref(), Some("tmpfs" | "ramfs"))
    }
    /// The notes every scenario starts with: figures that would not mean what they say.
    pub fn setup_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.is_memory_backed() {
            notes.push(
                "the data directory is on a memory-backed filesystem: fsync costs nothing there, \
                 and its files count in the machine's memory"
                    .into(),
            );
        }
        if cfg!(debug_assertions) {
            notes.push("meridian-bench is a debug build; use --release for figures".into());
        }
        notes
    }
}

/// Runs a command and gives its stdout if it succeeded.
pub fn command_stdout(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(std::process::Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The environment of one scenario run. Field order matters: the node is dropped
/// (stopped) before the temporary directory holding its data is removed.
pub struct BenchEnv {
    node: Option<NodeGuard>,
    pair: Option<Pair>,
    pub target_url: String,
    pub external: bool,
    pub meridian_bin: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub data_dir_is_temporary: bool,
    pub keep_data: bool,
    pub disk: DiskInfo,
    pub topology: Option<PathBuf>,
    pub node_log: Option<PathBuf>,
    pub out_dir: PathBuf,
    ready_timeout: Duration,
    tempdir: Option<TempDir>,
}

#[derive(Debug, Serialize)]
pub struct SetupInfo {
    /// "spawned" (this run started its own node) or "external" (`--target`).
    pub node: &'static str,
    pub target_url: String,
    pub meridian_bin: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub data_dir_is_temporary: bool,
    pub data_dir_kept: bool,
    pub data_disk: DiskInfo,
    pub topology: Option<PathBuf>,
    pub node_log: Option<PathBuf>,
    pub node_stop: Option<String>,
    /// The two-node cluster of the replication scenarios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<PairInfo>,
    /// True when the node runs on this machine (always for a spawned node).
    pub client_and_server_share_cores: Option<bool>,
}

impl BenchEnv {
    /// Creates the data directory and finds the node binary; starts nothing yet.
    pub fn prepare(common: &CommonArgs, scenario: &str) -> Result<BenchEnv> {
        let external = common.target.is_some();
        let target_url = match &common.target {
            Some(t) => {
                let t = t.trim_end_matches('/');
                if !t.starts_with("http://") {
                    return Err(Error::usage(format!(
                        "--target {t}: expected http://HOST:PORT"
                    )));
                }
                t.to_string()
            }
            None => String::new(),
        };
        let meridian_bin = if external {
            None
        } else {
            Some(node::locate_binary(common.meridian_bin.as_deref())?)
        };

        fs::create_dir_all(&common.out)
            .with_context(|| format!("creating output dir {}", common.out.display()))?;

        let (data_dir, tempdir) = match &common.data_dir {
            Some(dir) => {
                fs::create_dir_all(dir)
                    .with_context(|| format!("creating data dir {}", dir.display()))?;
                (absolute(dir)?, None)
            }
            None => {
                fs::create_dir_all(&common.data_root).with_context(|| {
                    format!("creating data root {}", common.data_root.display())
                })?;
                let tmp = tempfile::Builder::new()
                    .prefix(&format!("{scenario}-"))
                    .tempdir_in(&common.data_root)
                    .with_context(|| {
                        format!("creating a temporary dir in {}", common.data_root.display())
                    })?;
                let data = absolute(&tmp.path().join("data"))?;
                fs::create_dir_all(&data)
                    .with_context(|| format!("creating data dir {}", data.display()))?;
                (data, Some(tmp))
            }
        };
        let disk = DiskInfo::of(&data_dir);
        Ok(BenchEnv {
            node: None,
            pair: None,
            target_url,
            external,
            meridian_bin,
            data_dir_is_temporary: tempdir.is_some(),
            data_dir,
            keep_data: common.keep_data,
            disk,
            topology: None,
            node_log: None,
            out_dir: common.out.clone(),
            ready_timeout: Duration::from_secs(common.ready_timeout_secs),
            tempdir,
        })
    }

    /// Starts the node (or checks that the `--target` one is ready).
    pub async fn start_node(&mut self, http: &reqwest::Client, scenario: &str) -> Result<()> {
        let Some(bin) = self.meridian_bin.clone() else {
            return crate::http::wait_ready(http, &self.target_url, self.ready_timeout).await;
        };
        let log_path = absolute(&self.out_dir.join(format!("node-{scenario}.log")))?;
        self.node_log = Some(log_path.clone());
        let guard = NodeGuard::start(
            NodeConfig {
                binary: &bin,
                data_dir: &self.data_dir,
                log_path,
                ready_timeout: self.ready_timeout,
            },
            http,
        )
        .await?;
        self.target_url = guard.api_url.clone();
        self.topology = Some(guard.topology_path.clone());
        self.node = Some(guard);
        Ok(())
    }

    /// Starts the two-node cluster of the replication scenarios in the data directory
    /// (`topology.toml`, `certs/`, one data directory per node; not with `--target`); with
    /// `emulate_links`, each node dials the other through
    /// the in-process link emulator (see [`Pair::set_link_delay`], [`Pair::set_links_down`]).
    pub async fn start_pair_with(
        &mut self,
        http: &reqwest::Client,
        scenario: &str,
        emulate_links: bool,
    ) -> Result<&mut Pair> {
        let Some(bin) = self.meridian_bin.clone() else {
            return Err(Error::usage(format!(
                "{scenario} starts its own two nodes; it cannot run against --target"
            )));
        };
        let out_dir = absolute(&self.out_dir)?;
        let pair = Pair::start(
            PairConfig {
                binary: &bin,
                dir: &self.data_dir,
                out_dir: &out_dir,
                scenario,
                ready_timeout: self.ready_timeout,
                emulate_links,
            },
            http,
        )
        .await?;
        self.target_url = pair.a.api_url.clone();
        self.topology = Some(pair.topology_path.clone());
        Ok(self.pair.insert(pair))
    }

    pub fn pair_mut(&mut self) -> Option<&mut Pair> {
        self.pair.as_mut()
    }

    /// Stops both nodes of the pair and says how that went.
    pub fn stop_pair(&mut self) -> Option<String> {
        self.pair.as_mut().map(Pair::stop)
    }

    /// The process id of a spawned node.
    pub fn node_pid(&self) -> Option<u32> {
        self.node.as_ref().and_then(NodeGuard::pid)
    }

    /// Fails if the spawned node has died.
    pub fn check_node(&mut self) -> Result<()> {
        match self.node.as_mut() {
            Some(n) => n.check_alive(),
            None => Ok(()),
        }
    }

    /// Stops a spawned node and says how that went.
    pub fn stop_node(&mut self) -> Option<String> {
        let mut node = self.node.take()?;
        Some(node.stop())
    }

    pub fn info(&self, node_stop: Option<String>) -> SetupInfo {
        SetupInfo {
            node: if self.external { "external" } else { "spawned" },
            target_url: self.target_url.clone(),
            meridian_bin: self.meridian_bin.clone(),
            data_dir: self.data_dir.clone(),
            data_dir_is_temporary: self.data_dir_is_temporary,
            data_dir_kept: !self.data_dir_is_temporary || self.keep_data,
            data_disk: self.disk.clone(),
            topology: self.topology.clone(),
            node_log: self.node_log.clone(),
            node_stop,
            cluster: self.pair.as_ref().map(Pair::info),
            client_and_server_share_cores: if self.external {
                is_loopback_url(&self.target_url).then_some(true)
            } else {
                Some(true)
            },
        }
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        // Stop the nodes before their data directory goes away.
        drop(self.node.take());
        drop(self.pair.take());
        if let Some(tmp) = self.tempdir.take()
            && self.keep_data
        {
            let kept = tmp.keep();
            eprintln!("meridian-bench: kept data in {}", kept.display());
        }
    }
}

fn is_loopback_url(url: &str) -> bool {
    let host = url.trim_start_matches("http://");
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}
