//! A throw-away two-node cluster (regions `bench-a` and `bench-b`) for the replication
//! scenarios: topology, certificates from the real `meridian certs`, both nodes, and the
//! wait until replication is connected. Optionally both directed links go through the
//! in-process link emulator, so that a scenario can inject delay or cut them.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meridian_emulator::{
    CounterSnapshot, DirectionSel, Emulator, EmulatorOptions, LinkSpec, SettingsUpdate,
};
use meridian_node::config::Topology;
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

/// Two running nodes. Dropping it stops both (SIGTERM, then SIGKILL after 10 s), and then
/// the link emulator, if any: fields drop in declaration order, and a node whose links vanish
/// while it shuts down would log connection errors that have nothing to do with the run.
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
    /// The relays of both directed links (`emulate_links`); last, see above.
    emulator: Option<Emulator>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairInfo {
    pub topology: PathBuf,
    pub certs_dir: PathBuf,
    pub nodes: Vec<PairNodeInfo>,
    pub logs: Vec<PathBuf>,
    pub ready_secs: f64,
    pub connect_secs: f64,
    /// The emulated links (empty when the nodes dial each other directly).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<PairLinkInfo>,
}

/// One directed link through the emulator: `from` dials `via`, which relays to `upstream`
/// (the peer address of `to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairLinkInfo {
    pub from: String,
    pub to: String,
    pub via: SocketAddr,
    pub upstream: SocketAddr,
}

/// Datagrams through every emulated link, both directions summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkCounters {
    pub forwarded: u64,
    /// Dropped because a direction was down (a partition).
    pub dropped_down: u64,
    /// Dropped because a direction's delay queue was full: this distorts a delay measurement.
    pub dropped_queue_full: u64,
}

impl LinkCounters {
    fn add(&mut self, c: &CounterSnapshot) {
        self.forwarded += c.forwarded;
        self.dropped_down += c.dropped_down;
        self.dropped_queue_full += c.dropped_queue_full;
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &LinkCounters) -> LinkCounters {
        LinkCounters {
            forwarded: self.forwarded.saturating_sub(before.forwarded),
            dropped_down: self.dropped_down.saturating_sub(before.dropped_down),
            dropped_queue_full: self
                .dropped_queue_full
                .saturating_sub(before.dropped_queue_full),
        }
    }
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
    /// Route A→B and B→A through the in-process link emulator (both start with no delay).
    pub emulate_links: bool,
}

/// `[[links]]` entries for a topology: each `from` dials `via` instead of `to`'s peer address.
pub fn links_toml(links: &[PairLinkInfo]) -> String {
    let mut s = String::new();
    for l in links {
        let _ = write!(
            s,
            "\n[[links]]\nfrom = \"{}\"\nto = \"{}\"\nvia = \"{}\"\n",
            l.from, l.to, l.via
        );
    }
    s
}

fn emulated_links(emulator: &Emulator) -> Vec<PairLinkInfo> {
    emulator
        .links()
        .into_iter()
        .map(|l| PairLinkInfo {
            from: l.from,
            to: l.to,
            via: l.via,
            upstream: l.upstream,
        })
        .collect()
}

/// Starts the emulator relays for both directed links of the pair (bound on free loopback
/// ports) and says where each listens.
async fn start_emulator(
    a: &TopologyNode,
    b: &TopologyNode,
) -> Result<(Emulator, Vec<PairLinkInfo>)> {
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let specs = vec![
        LinkSpec {
            from: a.id.clone(),
            to: b.id.clone(),
            via: loopback(0),
            upstream: loopback(b.peer_port),
        },
        LinkSpec {
            from: b.id.clone(),
            to: a.id.clone(),
            via: loopback(0),
            upstream: loopback(a.peer_port),
        },
    ];
    let emulator = Emulator::start_links(specs, EmulatorOptions::default())
        .await
        .map_err(|e| Error::runtime(format!("starting the link emulator: {e}")))?;
    let links = emulated_links(&emulator);
    // The node ports were only reserved, then released: the emulator's port 0 may in
    // principle land on one of them, and the node would then fail to bind.
    if let Some(l) = links
        .iter()
        .find(|l| [a.peer_port, b.peer_port].contains(&l.via.port()))
    {
        return Err(Error::runtime(format!(
            "the link emulator for {} -> {} got port {}, which was reserved for a node's peer \
             endpoint; run again",
            l.from,
            l.to,
            l.via.port()
        )));
    }
    Ok((emulator, links))
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
        let (emulator, links) = if cfg.emulate_links {
            let (e, l) = start_emulator(&a_region, &b_region).await?;
            (Some(e), l)
        } else {
            (None, Vec::new())
        };
        let topology_path = cfg.dir.join("topology.toml");
        let mut text = cluster_toml(&[a_region.clone(), b_region.clone()]);
        text.push_str(&links_toml(&links));
        // The node would refuse a bad file too, but only in its log, after a ready timeout.
        Topology::parse(&text, &topology_path).map_err(|e| {
            Error::runtime(format!(
                "the generated topology {} is invalid: {e}",
                topology_path.display()
            ))
        })?;
        fs::write(&topology_path, text)
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
            emulator,
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

    /// Applies `update` to both directions of both emulated links.
    pub fn set_links(&self, update: &SettingsUpdate) -> Result<()> {
        let emulator = self.emulator.as_ref().ok_or_else(|| {
            Error::runtime(
                "changing the links: this pair was started without the link emulator \
                 (emulate_links)",
            )
        })?;
        let update = SettingsUpdate {
            direction: Some(DirectionSel::Both),
            ..*update
        };
        emulator
            .set_all(&update)
            .map(drop)
            .map_err(|e| Error::runtime(format!("changing the emulated links ({update:?}): {e}")))
    }

    /// One-way delay on every link and direction, without jitter.
    pub fn set_link_delay(&self, delay_ms: u64) -> Result<()> {
        self.set_links(&SettingsUpdate {
            delay_ms: Some(delay_ms),
            jitter_ms: Some(0),
            ..SettingsUpdate::default()
        })
    }

    /// Cuts (`true`) or heals (`false`) every link in both directions: a full partition.
    pub fn set_links_down(&self, down: bool) -> Result<()> {
        self.set_links(&SettingsUpdate {
            down: Some(down),
            ..SettingsUpdate::default()
        })
    }

    /// The emulated links' counters so far (`None` without the emulator).
    pub fn link_counters(&self) -> Option<LinkCounters> {
        let emulator = self.emulator.as_ref()?;
        let mut total = LinkCounters::default();
        for l in emulator.links() {
            total.add(&l.forward.counters);
            total.add(&l.reverse.counters);
        }
        Some(total)
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
            links: self
                .emulator
                .as_ref()
                .map(emulated_links)
                .unwrap_or_default(),
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
    fn links_make_each_node_dial_the_emulator() {
        let nodes = [
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
        ];
        let via_ab: SocketAddr = "127.0.0.1:9001".parse().expect("address");
        let via_ba: SocketAddr = "127.0.0.1:9002".parse().expect("address");
        let links = [
            PairLinkInfo {
                from: NODE_A.into(),
                to: NODE_B.into(),
                via: via_ab,
                upstream: "127.0.0.1:7002".parse().expect("address"),
            },
            PairLinkInfo {
                from: NODE_B.into(),
                to: NODE_A.into(),
                via: via_ba,
                upstream: "127.0.0.1:7001".parse().expect("address"),
            },
        ];
        let extra = links_toml(&links);
        assert!(extra.contains(
            "[[links]]\nfrom = \"bench-a-1\"\nto = \"bench-b-1\"\nvia = \"127.0.0.1:9001\"\n"
        ));
        let text = cluster_toml(&nodes) + &extra;
        // The node's own parser: what `meridian serve` will make of the file.
        let topology =
            Topology::parse(&text, Path::new("/tmp/topology.toml")).expect("valid topology");
        assert_eq!(topology.dial_addr(NODE_A, NODE_B), Some(via_ab));
        assert_eq!(topology.dial_addr(NODE_B, NODE_A), Some(via_ba));
        assert_eq!(links_toml(&[]), "");
        // Without links each node dials the other's peer address.
        let plain = Topology::parse(&cluster_toml(&nodes), Path::new("/tmp/topology.toml"))
            .expect("valid topology");
        assert_eq!(
            plain.dial_addr(NODE_A, NODE_B),
            Some("127.0.0.1:7002".parse().expect("address"))
        );
    }

    #[test]
    fn link_counters_difference() {
        let before = LinkCounters {
            forwarded: 10,
            dropped_down: 1,
            dropped_queue_full: 0,
        };
        let after = LinkCounters {
            forwarded: 25,
            dropped_down: 4,
            dropped_queue_full: 2,
        };
        assert_eq!(
            after.since(&before),
            LinkCounters {
                forwarded: 15,
                dropped_down: 3,
                dropped_queue_full: 2
            }
        );
        assert_eq!(before.since(&after), LinkCounters::default());
    }

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[33m WARN\u{1b}[0m x"), " WARN x");
    }
}
