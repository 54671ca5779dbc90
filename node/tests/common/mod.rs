//! Helpers shared by the node's integration tests.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback TCP port that was free a moment ago.
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

/// Regions eu-west and us-east with nodes `eu-1` (API on `eu_api_port`) and `us-1`, the other
/// ports free loopback ports, the CA in `certs/`: the start of every two-region test topology.
pub fn two_region_nodes(cluster: &str, eu_api_port: u16) -> String {
    format!(
        r#"cluster = "{cluster}"
[tls]
ca = "certs/ca.pem"
[[regions]]
name = "eu-west"
[[regions]]
name = "us-east"
[[nodes]]
id = "eu-1"
region = "eu-west"
peer = "127.0.0.1:{eu_peer}"
api = "127.0.0.1:{eu_api_port}"
[[nodes]]
id = "us-1"
region = "us-east"
peer = "127.0.0.1:{us_peer}"
api = "127.0.0.1:{us_api}"
"#,
        eu_peer = free_udp_port(),
        us_peer = free_udp_port(),
        us_api = free_tcp_port(),
    )
}

/// [`two_region_nodes`] with one `[[links]]` entry per `(from, to)`, each through a free `via`
/// port.
pub fn two_region_topology(cluster: &str, links: &[(&str, &str)]) -> String {
    let mut text = two_region_nodes(cluster, free_tcp_port());
    for (from, to) in links {
        text.push_str(&format!(
            "[[links]]\nfrom = \"{from}\"\nto = \"{to}\"\nvia = \"127.0.0.1:{}\"\n",
            free_udp_port()
        ));
    }
    text
}

/// A two-region topology file in `dir` with certificates: `eu-1` in eu-west (the node under
/// test) and `us-1` in us-east. `users/us/*` is pinned to us-east with foreign = reject;
/// `users/ap/*` to us-east with foreign = forward.
pub fn write_topology(dir: &Path, eu_api_port: u16) -> PathBuf {
    let text = format!(
        r#"{nodes}[clock]
max_drift_ms = 500
[[residency]]
name = "us-only"
keys = "users/us/*"
home = "us-east"
foreign = "reject"
[[residency]]
name = "us-forward"
keys = "users/ap/*"
home = "us-east"
foreign = "forward"
"#,
        nodes = two_region_nodes("test", eu_api_port),
    );
    let path = dir.join("topology.toml");
    std::fs::write(&path, text).expect("write topology");
    let topology = meridian_node::config::Topology::load(&path).expect("valid topology");
    meridian_node::tools::certs::generate_certs(&topology, &dir.join("certs"))
        .expect("certificates");
    path
}

/// Poll `url` until it answers 200, for up to `deadline`.
pub async fn wait_ready(client: &reqwest::Client, url: &str, deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A `meridian serve` child process; killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub api: SocketAddr,
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn spawn(
        topology: &Path,
        node: &str,
        data_dir: &Path,
        api: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let log = data_dir.with_extension(format!("{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["serve", "--topology"])
            .arg(topology)
            .args(["--node", node, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn meridian");
        NodeProcess { child, api, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Wait for exit up to `deadline`; returns the exit code if it exited.
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
