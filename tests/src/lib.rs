//! Whole-system test clusters: real `meridian serve` processes on loopback, real QUIC with
//! real certificates, real redb files in temporary directories, one node per region.
//!
//! Ports, processes, topology text and HTTP come from `meridian-harness`; this crate adds what
//! needs the whole system: the [`Cluster`], a fake peer holding a genuine node identity, and
//! the Jepsen-style [`partition`] suite.

pub mod flood;
pub mod partition;
pub mod restart;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meridian_harness::{
    ApiClient, DEADLINE, NodeProcess, Serve, TopologyText, free_tcp_port, free_udp_port, loopback,
    poll_until, write_certs,
};
use meridian_node::config::Topology;
use meridian_node::peer::tls::PeerTls;

/// The `[clock] max_drift_ms` of every generated cluster.
pub const MAX_DRIFT_MS: u64 = 500;

/// Region names for generated clusters.
pub const REGIONS: [&str; 5] = ["eu-west", "us-east", "ap-south", "sa-east", "eu-north"];

/// The log filter of cluster nodes: link events in detail.
const NODE_LOG_FILTER: &str = "info,meridian_node::replica=debug";

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: String,
    pub region: String,
    pub peer: std::net::SocketAddr,
    pub api: std::net::SocketAddr,
}

/// The topology of `nodes` (cluster `test`, a [`MAX_DRIFT_MS`] max drift), trusting the CA
/// in `cert_dir` and taking node certificates from there.
pub fn topology_text(nodes: &[NodeSpec], cert_dir: &str) -> TopologyText {
    let text = TopologyText::cluster("test")
        .tls_in(cert_dir)
        .clock_max_drift_ms(MAX_DRIFT_MS);
    let text = nodes.iter().fold(text, |t, n| t.region(&n.region));
    nodes
        .iter()
        .fold(text, |t, n| t.node(&n.id, &n.region, n.peer, n.api))
}

/// A cluster described by a topology file in a temporary folder; node `i` is the only node
/// of region `REGIONS[i]`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub topology: PathBuf,
    pub nodes: Vec<NodeSpec>,
    procs: Vec<Option<NodeProcess>>,
}

/// The test holding a node's genuine certificate and key, at an address of its choosing.
pub struct FakePeer {
    pub endpoint: quinn::Endpoint,
    pub tls: PeerTls,
}

impl Cluster {
    /// `regions` regions with one node each.
    pub fn new(regions: usize) -> Cluster {
        Cluster::with_extra(regions, &TopologyText::new())
    }

    /// [`Cluster::new`] with `extra` (rules, links) after the nodes.
    pub fn with_extra(regions: usize, extra: &TopologyText) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes: Vec<NodeSpec> = REGIONS
            .iter()
            .take(regions)
            .map(|r| NodeSpec {
                id: format!("{r}-1"),
                region: r.to_string(),
                peer: loopback(free_udp_port()),
                api: loopback(free_tcp_port()),
            })
            .collect();
        let topology = dir.path().join("topology.toml");
        topology_text(&nodes, "certs")
            .append(extra)
            .write(&topology);
        write_certs(&topology, &dir.path().join("certs"));
        let procs = nodes.iter().map(|_| None).collect();
        Cluster {
            dir,
            topology,
            nodes,
            procs,
        }
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join("data").join(&self.nodes[i].id)
    }

    /// Start node `i` with another topology file (the same nodes, other links or rules).
    pub fn start_with(&mut self, i: usize, topology: &Path, extra: &[&str]) {
        let node = Serve::new(
            topology,
            &self.nodes[i].id,
            &self.data_dir(i),
            self.nodes[i].api,
        )
        .args(extra)
        .env("RUST_LOG", NODE_LOG_FILTER)
        .spawn();
        self.procs[i] = Some(node);
    }

    pub fn start(&mut self, i: usize) {
        let topology = self.topology.clone();
        self.start_with(i, &topology, &[]);
    }

    /// A cluster of `regions` regions, every node started and ready, and a client for it.
    pub async fn running(regions: usize) -> (Cluster, reqwest::Client) {
        let mut cluster = Cluster::new(regions);
        cluster.start_all();
        let client = reqwest::Client::new();
        cluster.wait_all_ready(&client).await;
        (cluster, client)
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// The running process of node `i`, if it is started.
    pub fn process(&self, i: usize) -> Option<&NodeProcess> {
        self.procs[i].as_ref()
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{}", self.nodes[i].api, path)
    }

    /// Node `i`'s API through `http`.
    pub fn api(&self, i: usize, http: &reqwest::Client) -> ApiClient {
        ApiClient::with_http(http.clone(), self.url(i, ""))
    }

    /// Waits for node `i`'s `/readyz`; panics with its log if it never answers.
    pub async fn wait_ready(&self, i: usize, client: &reqwest::Client) {
        let url = self.url(i, "/readyz");
        let ok = poll_until(DEADLINE, || async {
            matches!(client.get(&url).send().await, Ok(r) if r.status() == 200)
        })
        .await;
        assert!(
            ok,
            "node {} not ready; log:\n{}",
            self.nodes[i].id,
            self.log(i)
        );
    }

    /// [`Cluster::wait_ready`] for every node.
    pub async fn wait_all_ready(&self, client: &reqwest::Client) {
        for i in 0..self.nodes.len() {
            self.wait_ready(i, client).await;
        }
    }

    /// Stop node `i` with SIGTERM and wait for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.sigterm();
            let status = p.wait_exit(DEADLINE);
            assert!(
                status.is_some(),
                "node {} did not stop; log:\n{}",
                self.nodes[i].id,
                p.log_text()
            );
        }
    }

    /// Stop node `i` with SIGKILL, without warning.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.sigkill();
            // Gone before anything restarts on its data directory.
            let _ = p.wait_exit(DEADLINE);
        }
    }

    /// SIGSTOP node `i` (it keeps its files as they are until killed or continued).
    pub fn freeze(&self, i: usize) {
        if let Some(p) = &self.procs[i] {
            p.sigstop();
        }
    }

    /// Node `i`'s log file: appended to across restarts.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.data_dir(i).with_extension("log")
    }

    /// Node `i`'s log while it runs; empty once it is stopped.
    pub fn log(&self, i: usize) -> String {
        self.procs[i]
            .as_ref()
            .map(NodeProcess::log_text)
            .unwrap_or_default()
    }

    /// A QUIC endpoint at node `at`'s peer address holding `identity`'s genuine certificate
    /// (node `at` itself must not be running).
    pub fn impersonate(&self, identity: &str, at: usize) -> FakePeer {
        meridian_node::peer::tls::install_crypto_provider();
        let topology = Arc::new(Topology::load(&self.topology).expect("topology"));
        let tls = PeerTls::load(topology, identity).expect("identity");
        let endpoint =
            meridian_node::peer::tls::endpoint(self.nodes[at].peer, &tls).expect("endpoint");
        FakePeer { endpoint, tls }
    }
}
