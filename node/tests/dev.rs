//! `meridian dev` with the real binary: a two-region cluster starts, answers, stops cleanly on
//! SIGTERM leaving no node behind, and a second run on the same folder reuses the topology
//! (same ports) and the data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use meridian_harness::{Signal, meridian_bin, send_signal};
use meridian_node::config::Topology;
use reqwest::Client;
use serde_json::{Value, json};

const READY_DEADLINE: Duration = Duration::from_secs(90);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// A `meridian dev` process; stopped (SIGTERM, then SIGKILL) if a test fails midway.
struct Dev {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Dev {
    fn start(dir: &Path, run: &str) -> Dev {
        Dev::start_with(dir, run, &[])
    }

    fn start_with(dir: &Path, run: &str, extra: &[&str]) -> Dev {
        let stdout = dir.with_extension(format!("{run}.out"));
        let stderr = dir.with_extension(format!("{run}.err"));
        let child = Command::new(meridian_bin())
            .args(["dev", "--regions", "2", "--dir"])
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("create stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("create stderr file"))
            .spawn()
            .expect("spawn meridian dev");
        Dev {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    fn sigterm(&self) {
        let status = send_signal(self.child.id(), Signal::Term).expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGTERM first, so that the supervisor stops its nodes.
            let _ = send_signal(self.child.id(), Signal::Term);
            let start = Instant::now();
            while start.elapsed() < EXIT_DEADLINE {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for the topology the dev process writes, then for every node's `/readyz`.
async fn wait_cluster(dev: &mut Dev, dir: &Path, client: &Client) -> Topology {
    let start = Instant::now();
    let path = dir.join("topology.toml");
    let topology = loop {
        if let Ok(t) = Topology::load(&path) {
            break t;
        }
        if let Some(status) = dev.child.try_wait().expect("try_wait") {
            panic!("meridian dev exited ({status}) early:\n{}", dev.output());
        }
        assert!(
            start.elapsed() < READY_DEADLINE,
            "no topology written:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for node in &topology.nodes {
        loop {
            let url = format!("http://{}/readyz", node.api);
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                break;
            }
            if let Some(status) = dev.child.try_wait().expect("try_wait") {
                panic!("meridian dev exited ({status}) early:\n{}", dev.output());
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "{} not ready:\n{}",
                node.id,
                dev.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The supervisor's own readiness check may finish a moment after ours.
    while !dev.output().contains("Ctrl-C stops the cluster") {
        assert!(
            start.elapsed() < READY_DEADLINE,
            "meridian dev never reported the cluster ready:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    topology
}

/// Processes whose command line mentions `dir` (the nodes are started with paths inside it).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(" serve ") && cmdline.contains(&needle) {
            found.push(cmdline);
        }
    }
    found
}

async fn stop(mut dev: Dev, dir: &Path, topology: &Topology, client: &Client) {
    dev.sigterm();
    let status = dev
        .wait_exit(EXIT_DEADLINE)
        .await
        .unwrap_or_else(|| panic!("meridian dev did not exit:\n{}", dev.output()));
    assert!(status.success(), "{status}:\n{}", dev.output());
    assert!(dev.output().contains("cluster stopped"), "{}", dev.output());
    assert_eq!(processes_using(dir), Vec::<String>::new());
    for node in &topology.nodes {
        let url = format!("http://{}/readyz", node.api);
        assert!(
            client.get(&url).send().await.is_err(),
            "{} still answers after the cluster stopped",
            node.id
        );
    }
}

/// No pooled connection may outlive the cluster run that accepted it.
fn unpooled_client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_a_cluster_stops_cleanly_and_restarts_on_the_same_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let client = unpooled_client();

    // First run: a new cluster.
    let mut dev = Dev::start(&dir, "first");
    let topology = wait_cluster(&mut dev, &dir, &client).await;
    assert_eq!(topology.regions.len(), 2);
    assert_eq!(topology.nodes.len(), 2);
    for file in ["ca.pem", "ca.key"] {
        assert!(dir.join("certs").join(file).is_file(), "{file} missing");
    }
    for node in &topology.nodes {
        assert!(topology.tls.node_cert(&node.id).is_file());
        assert!(topology.tls.node_key(&node.id).is_file());
        assert!(dir.join("logs").join(format!("{}.log", node.id)).is_file());
    }
    let output = dev.output();
    assert!(output.contains("created a cluster"), "{output}");
    for node in &topology.nodes {
        assert!(output.contains(&format!("http://{}", node.api)), "{output}");
    }
    let first_api: SocketAddr = topology.nodes[0].api;
    let put = client
        .put(format!("http://{first_api}/v1/kv/dev-test"))
        .json(&json!({"run": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    let ca_before = std::fs::read(dir.join("certs/ca.pem")).unwrap();
    stop(dev, &dir, &topology, &client).await;

    // Second run: the same topology (same ports), CA and data.
    let mut dev = Dev::start(&dir, "second");
    let again = wait_cluster(&mut dev, &dir, &client).await;
    assert_eq!(again, topology);
    assert!(dev.output().contains("reusing"), "{}", dev.output());
    assert_eq!(std::fs::read(dir.join("certs/ca.pem")).unwrap(), ca_before);
    let got = client
        .get(format!("http://{first_api}/v1/kv/dev-test"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let body: Value = got.json().await.unwrap();
    assert_eq!(body["value"], json!({"run": 1}));
    stop(dev, &dir, &topology, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_latency_puts_the_link_emulator_between_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let client = unpooled_client();
    let mut dev = Dev::start_with(&dir, "latency", &["--latency-ms", "150"]);
    let topology = wait_cluster(&mut dev, &dir, &client).await;
    assert!(
        dev.output().contains("150 ms one-way delay"),
        "{}",
        dev.output()
    );
    let with_links = Topology::load(&dir.join("topology-latency.toml")).expect("latency topology");
    assert_eq!(with_links.links.len(), 2, "one emulated link per direction");
    let (a, b) = (topology.nodes[0].api, topology.nodes[1].api);
    // Wait until the regions replicate at all (links up), then time one write across.
    put_ok(&client, a, "warm", json!({"x": 0})).await;
    let deadline = Instant::now() + READY_DEADLINE;
    while client
        .get(format!("http://{b}/v1/kv/warm"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(
            Instant::now() < deadline,
            "no replication through the emulator:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    put_ok(&client, a, "timed", json!({"x": 1})).await;
    loop {
        let r = client.get(format!("http://{b}/v1/kv/timed")).send().await;
        if matches!(r, Ok(ref r) if r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write never crossed:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Only a lower bound: the change crosses at least one emulated 150 ms hop.
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "crossed in {:?}, faster than the injected delay",
        start.elapsed()
    );
    stop(dev, &dir, &topology, &client).await;
}

async fn put_ok(client: &reqwest::Client, api: std::net::SocketAddr, key: &str, value: Value) {
    let answer = client
        .put(format!("http://{api}/v1/kv/{key}"))
        .json(&value)
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {key} on {api}: {e}"));
    assert_eq!(answer.status(), 200, "PUT {key} on {api}");
}
