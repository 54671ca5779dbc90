//! Harness for whole-system tests: real `meridian serve` processes on loopback, real QUIC with
//! real certificates, real redb files in temporary directories.
//!
//! Ports are picked free at run time (never fixed), and every wait polls with a generous
//! deadline instead of sleeping a fixed time.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous: CI machines are loaded.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The `meridian` binary of this build: `cargo test --workspace` builds it next to the test
/// executables' `deps/` folder; if it is missing, build it.
pub fn meridian_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MERIDIAN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> folder");
    let bin = profile_dir.join("meridian");
    if !bin.is_file() {
        let release = profile_dir.ends_with("release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "meridian-node", "--bin", "meridian"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the meridian binary failed");
    }
    bin
}

/// A port is released as soon as it is picked, so the OS may offer it again: never hand out
/// the same port twice in one test process.
fn unused_port(pick: impl Fn() -> std::io::Result<u16>) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = pick().expect("bind a free loopback port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no unused loopback port after 1000 tries");
}

pub fn free_tcp_port() -> u16 {
    unused_port(|| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    })
}

pub fn free_udp_port() -> u16 {
    unused_port(|| {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
    })
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: String,
    pub region: String,
    pub peer: SocketAddr,
    pub api: SocketAddr,
}

/// A cluster described by a topology file in a temporary folder.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub topology: PathBuf,
    pub nodes: Vec<NodeSpec>,
    pub procs: Vec<Option<NodeProcess>>,
}

/// Region names for generated clusters.
pub const REGIONS: [&str; 5] = ["eu-west", "us-east", "ap-south", "sa-east", "eu-north"];

impl Cluster {
    /// `regions` regions with one node each; `extra` is appended to the topology (rules).
    pub fn new(regions: usize, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes: Vec<NodeSpec> = REGIONS
            .iter()
            .take(regions)
            .map(|r| NodeSpec {
                id: format!("{r}-1"),
                region: r.to_string(),
                peer: SocketAddr::from(([127, 0, 0, 1], free_udp_port())),
                api: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            })
            .collect();
        let topology = dir.path().join("topology.toml");
        std::fs::write(&topology, topology_text(&nodes, extra, "certs")).expect("write topology");
        let parsed = meridian_node::config::Topology::load(&topology).expect("valid topology");
        meridian_node::tools::certs::generate_certs(&parsed, &dir.path().join("certs"))
            .expect("certs");
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

    /// Start node `i` with the cluster's topology (or another topology file).
    pub fn start_with(&mut self, i: usize, topology: &Path, extra: &[&str]) {
        let node = NodeProcess::spawn(
            topology,
            &self.nodes[i].id,
            &self.data_dir(i),
            self.nodes[i].api,
            extra,
        );
        self.procs[i] = Some(node);
    }

    pub fn start(&mut self, i: usize) {
        let topology = self.topology.clone();
        self.start_with(i, &topology, &[]);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{}", self.nodes[i].api, path)
    }

    pub async fn wait_ready(&self, i: usize, client: &reqwest::Client) {
        let url = self.url(i, "/readyz");
        let ok = poll_until(DEADLINE, || async {
            matches!(client.get(&url).send().await, Ok(r) if r.status() == 200)
        })
        .await;
        let log = self.procs[i]
            .as_ref()
            .map(NodeProcess::log_text)
            .unwrap_or_default();
        assert!(ok, "node {} not ready; log:\n{log}", self.nodes[i].id);
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

    pub fn log(&self, i: usize) -> String {
        self.procs[i]
            .as_ref()
            .map(NodeProcess::log_text)
            .unwrap_or_default()
    }
}

pub fn topology_text(nodes: &[NodeSpec], extra: &str, cert_dir: &str) -> String {
    let mut t = format!(
        "cluster = \"test\"\n[tls]\nca = \"{cert_dir}/ca.pem\"\ncert_dir = \"{cert_dir}\"\n[clock]\nmax_drift_ms = 500\n"
    );
    for n in nodes {
        t.push_str(&format!("[[regions]]\nname = \"{}\"\n", n.region));
    }
    for n in nodes {
        t.push_str(&format!(
            "[[nodes]]\nid = \"{}\"\nregion = \"{}\"\npeer = \"{}\"\napi = \"{}\"\n",
            n.id, n.region, n.peer, n.api
        ));
    }
    t.push_str(extra);
    t
}

/// Poll `check` every 100 ms until it holds or `deadline` passes.
pub async fn poll_until<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET a record: `None` on 404.
pub async fn get(client: &reqwest::Client, base: &str, key: &str) -> Option<Value> {
    let r = client
        .get(format!("{base}/v1/kv/{key}"))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json().await.ok()
}

/// The value of an un-labelled or labelled metric line, e.g.
/// `meridian_replication_changes_applied_total{peer_region="us-east"}`.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A `meridian serve` child process; killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn spawn(
        topology: &Path,
        node: &str,
        data_dir: &Path,
        _api: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let log = data_dir.with_extension("log");
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
            .arg(topology)
            .args(["--node", node, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info,meridian_node::replica=debug")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn meridian");
        NodeProcess { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
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

/// Write one length-prefixed replication frame, as a peer would.
pub async fn frame_write(send: &mut quinn::SendStream, msg: &meridian_replication::wire::Message) {
    let bytes = msg.encode();
    send.write_all(&(bytes.len() as u32).to_be_bytes())
        .await
        .expect("write frame length");
    send.write_all(&bytes).await.expect("write frame body");
}

/// Read one length-prefixed replication frame; `None` when the stream ends or is malformed.
pub async fn frame_read(
    recv: &mut quinn::RecvStream,
) -> Option<meridian_replication::wire::Message> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.ok()?;
    let n = u32::from_be_bytes(len) as usize;
    if n > meridian_replication::wire::MAX_FRAME_BYTES {
        return None;
    }
    let mut buf = vec![0u8; n];
    recv.read_exact(&mut buf).await.ok()?;
    meridian_replication::wire::Message::decode(&buf).ok()
}

/// GET `url` and parse its JSON body (tests: any failure is a test failure, with the URL).
pub async fn get_json(client: &reqwest::Client, url: impl AsRef<str>) -> Value {
    let url = url.as_ref();
    let r = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    r.json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body is not JSON: {e}"))
}

/// GET `url` and return its body as text, or `None` if the request failed (for polling).
pub async fn get_text(client: &reqwest::Client, url: impl AsRef<str>) -> Option<String> {
    client
        .get(url.as_ref())
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}
