//! A throw-away two-node cluster (regions `bench-a` and `bench-b`) for the replication
//! scenarios: topology, certificates from the real `meridian certs`, both nodes, and the
//! wait until replication is connected.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::node::{
    self, NodeGuard, NodeSpec, TopologyNode, cluster_toml, free_port_pairs, log_tail,
};

pub const REGION_A: &str = "bench-a";
pub const REGION_B: &str = "bench-b";
pub const NODE_A: &str = "bench-a-1";
pub const NODE_B: &str = "bench-b-1";

/// How long to wait for `/v1/status` on A to list its peer as connected.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// Two running nodes. Dropping it stops both (SIGTERM, then SIGKILL after 10 s).
pub struct Pair {
    pub a: NodeGuard,
    pub b: NodeGuard,
    pub a_region: TopologyNode,
    pub b_region: TopologyNode,
    pub topology_path: PathBuf,
    pub certs_dir: PathBuf,
    /// Every log file the nodes wrote, in order (a restarted node gets a new one).
    pub logs: Vec<PathBuf>,
    /// From spawning the nodes to both answering `/readyz`.
    pub ready_secs: f64,
    /// From both being ready to A listing B as connected.
    pub connect_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairInfo {
    pub topology: PathBuf,
    pub certs_dir: PathBuf,
    pub nodes: Vec<PairNodeInfo>,
    pub logs: Vec<PathBuf>,
    pub ready_secs: f64,
    pub connect_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairNodeInfo {
    pub id: String,
    pub region: String,
    pub api_url: String,
    pub peer_addr: String,
    pub data_dir: PathBuf,
}

pub struct PairConfig<'a> {
    pub binary: &'a Path,
    /// Holds `topology.toml`, `certs/`, and one data directory per node.
    pub dir: &'a Path,
    pub out_dir: &'a Path,
    pub scenario: &'a str,
    pub ready_timeout: Duration,
}

impl Pair {
    /// Writes the topology, runs `meridian certs` (a failure is fatal), starts both nodes,
    /// waits for both `/readyz` and for A to list B as connected.
    pub async fn start(cfg: PairConfig<'_>, http: &reqwest::Client) -> Result<Pair> {
        fs::create_dir_all(cfg.dir)
            .with_context(|| format!("creating cluster dir {}", cfg.dir.display()))?;
        let ports = free_port_pairs(2)?;
        let a_region = TopologyNode {
            region: REGION_A.into(),
            id: NODE_A.into(),
            peer_port: ports[0].0,
            api_port: ports[0].1,
        };
        let b_region = TopologyNode {
            region: REGION_B.into(),
            id: NODE_B.into(),
            peer_port: ports[1].0,
            api_port: ports[1].1,
        };
        let topology_path = cfg.dir.join("topology.toml");
        fs::write(
            &topology_path,
            cluster_toml(&[a_region.clone(), b_region.clone()]),
        )
        .with_context(|| format!("writing {}", topology_path.display()))?;

        let certs_dir = cfg.dir.join("certs");
        let log_a = cfg.out_dir.join(format!("node-{}-a.log", cfg.scenario));
        let log_b = cfg.out_dir.join(format!("node-{}-b.log", cfg.scenario));
        node::generate_certs(cfg.binary, &topology_path, &certs_dir, &log_a)?;

        let spec = |n: &TopologyNode| NodeSpec {
            binary: cfg.binary.to_path_buf(),
            topology_path: topology_path.clone(),
            node_id: n.id.clone(),
            data_dir: cfg.dir.join(&n.id),
            api_url: n.api_url(),
            ready_timeout: cfg.ready_timeout,
        };
        let started = Instant::now();
        let mut a = NodeGuard::spawn(spec(&a_region), log_a.clone())?;
        let mut b = NodeGuard::spawn(spec(&b_region), log_b.clone())?;
        a.wait_ready(http).await?;
        b.wait_ready(http).await?;
        let ready_secs = started.elapsed().as_secs_f64();
        let mut pair = Pair {
            a,
            b,
            a_region,
            b_region,
            topology_path,
            certs_dir,
            logs: vec![log_a, log_b],
            ready_secs,
            connect_secs: 0.0,
        };
        let connected = Instant::now();
        pair.wait_connected(http, CONNECT_DEADLINE).await?;
        pair.connect_secs = connected.elapsed().as_secs_f64();
        Ok(pair)
    }

    /// Polls `GET /v1/status` on A until `peers[0].connected` is true.
    pub async fn wait_connected(
        &mut self,
        http: &reqwest::Client,
        deadline: Duration,
    ) -> Result<()> {
        let url = format!("{}/v1/status", self.a.api_url);
        let until = Instant::now() + deadline;
        loop {
            self.a.check_alive()?;
            self.b.check_alive()?;
            let last = match status_peer_connected(http, &url).await {
                Ok(true) => return Ok(()),
                Ok(false) => "peers[0].connected is false".to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= until {
                return Err(Error::runtime(format!(
                    "replication between {NODE_A} and {NODE_B} did not connect within {} s \
                     (GET {url}: {last}); last lines of {}:\n{}\nlast lines of {}:\n{}",
                    deadline.as_secs(),
                    self.a.log_path.display(),
                    log_tail(&self.a.log_path, 20),
                    self.b.log_path.display(),
                    log_tail(&self.b.log_path, 20),
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.a.check_alive()?;
        self.b.check_alive()
    }

    pub fn info(&self) -> PairInfo {
        let node = |n: &TopologyNode| PairNodeInfo {
            id: n.id.clone(),
            region: n.region.clone(),
            api_url: n.api_url(),
            peer_addr: format!("127.0.0.1:{}", n.peer_port),
            data_dir: self
                .topology_path
                .parent()
                .map_or_else(|| PathBuf::from(&n.id), |d| d.join(&n.id)),
        };
        PairInfo {
            topology: self.topology_path.clone(),
            certs_dir: self.certs_dir.clone(),
            nodes: vec![node(&self.a_region), node(&self.b_region)],
            logs: self.logs.clone(),
            ready_secs: self.ready_secs,
            connect_secs: self.connect_secs,
        }
    }

    /// The current size of every node log, to tell later lines apart.
    pub fn log_sizes(&self) -> Vec<(PathBuf, u64)> {
        self.logs
            .iter()
            .map(|l| (l.clone(), fs::metadata(l).map_or(0, |m| m.len())))
            .collect()
    }

    /// Stops both nodes (B first) and says how that went.
    pub fn stop(&mut self) -> String {
        let b = self.b.stop();
        let a = self.a.stop();
        format!("{NODE_A}: {a}; {NODE_B}: {b}")
    }
}

async fn status_peer_connected(http: &reqwest::Client, url: &str) -> Result<bool> {
    let resp = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| Error::runtime(crate::http::error_chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(Error::runtime(format!("answered {status}")));
    }
    let v: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| Error::runtime(format!("not JSON: {}", crate::http::error_chain(&e))))?;
    match v.pointer("/peers/0/connected") {
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        other => Err(Error::runtime(format!(
            "no boolean peers[0].connected in the answer (found {other:?})"
        ))),
    }
}

/// WARN/ERROR lines of a node log, split at a byte offset (where the bench began stopping
/// the nodes), so shutdown noise is told apart from problems while measuring.
#[derive(Debug, Clone, Serialize)]
pub struct LogProblems {
    pub log: PathBuf,
    pub warn_or_error_lines: usize,
    /// The first few of those, before the nodes were stopped.
    pub first: Vec<String>,
    /// WARN/ERROR lines written while the bench stopped the nodes at the end.
    pub at_final_stop: usize,
    pub first_at_final_stop: Vec<String>,
}

pub fn log_problems(path: &Path, stop_offset: Option<u64>, max: usize) -> LogProblems {
    let mut out = LogProblems {
        log: path.to_path_buf(),
        warn_or_error_lines: 0,
        first: Vec::new(),
        at_final_stop: 0,
        first_at_final_stop: Vec::new(),
    };
    let Ok(bytes) = fs::read(path) else {
        return out;
    };
    let split = stop_offset.map_or(bytes.len(), |o| {
        usize::try_from(o).unwrap_or(usize::MAX).min(bytes.len())
    });
    for (part, text) in [(0, &bytes[..split]), (1, &bytes[split..])] {
        for line in String::from_utf8_lossy(text).lines() {
            let plain = strip_ansi(line);
            let bad = plain.contains(" WARN ")
                || plain.contains(" ERROR ")
                || plain.contains("\"level\":\"WARN\"")
                || plain.contains("\"level\":\"ERROR\"")
                || plain.contains("panicked");
            if !bad {
                continue;
            }
            let (n, kept) = if part == 0 {
                (&mut out.warn_or_error_lines, &mut out.first)
            } else {
                (&mut out.at_final_stop, &mut out.first_at_final_stop)
            };
            *n += 1;
            if kept.len() < max {
                kept.push(plain.chars().take(400).collect());
            }
        }
    }
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_node_topology_names_both_regions() {
        let text = cluster_toml(&[
            TopologyNode {
                region: REGION_A.into(),
                id: NODE_A.into(),
                peer_port: 7001,
                api_port: 8001,
            },
            TopologyNode {
                region: REGION_B.into(),
                id: NODE_B.into(),
                peer_port: 7002,
                api_port: 8002,
            },
        ]);
        assert!(text.contains("ca = \"certs/ca.pem\""));
        assert!(text.contains("name = \"bench-a\""));
        assert!(text.contains("name = \"bench-b\""));
        assert!(text.contains("id = \"bench-b-1\"\nregion = \"bench-b\"\npeer = \"127.0.0.1:7002\"\napi = \"127.0.0.1:8002\""));
    }

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[33m WARN\u{1b}[0m x"), " WARN x");
    }
}
