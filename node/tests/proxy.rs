//! The link emulator (`meridian proxy`, issue 5 item 1): UDP relaying through one stable
//! upstream socket per client, delay, partitions (both and one-way), loss, duplication,
//! reordering, the control API and CLI, and a real QUIC replication check between two
//! `meridian serve` nodes whose links go through the emulator. Then TCP relaying
//! (`Emulator::start_tcp_links`): bytes unchanged both ways, per-direction delay, order kept
//! under jitter, bytes held (not lost) while down, one-way down, the connection bound.
//!
//! Timing assertions are lower bounds only; everything else polls with generous deadlines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_harness::{NodeProcess, fixture, wait_ready};
use meridian_node::proxy::{
    DirectionSel, Emulator, EmulatorOptions, LinkInfo, LinkSpec, SettingsUpdate,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const DEADLINE: Duration = Duration::from_secs(60);

/// What the echo server saw: source address and payload of each datagram.
type SeenLog = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP echo server that records, per received datagram, its source address and payload.
struct Echo {
    addr: SocketAddr,
    seen: SeenLog,
    _task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = socket.local_addr().expect("echo addr");
        let seen: SeenLog = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                log.lock()
                    .expect("echo log")
                    .push((from, buf[..n].to_vec()));
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        Echo {
            addr,
            seen,
            _task: task,
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("echo log").len()
    }

    fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.lock().expect("echo log").clone()
    }

    /// Polls until the server has seen at least `n` datagrams.
    async fn wait_count(&self, n: usize) -> bool {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if self.count() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

async fn emulator_to(upstream: SocketAddr) -> Emulator {
    Emulator::start_links(
        vec![LinkSpec {
            from: "a".into(),
            to: "b".into(),
            via: "127.0.0.1:0".parse().expect("addr"),
            upstream,
        }],
        EmulatorOptions::default(),
    )
    .await
    .expect("start emulator")
}

fn via(emu: &Emulator) -> SocketAddr {
    emu.link("a", "b").expect("link a -> b").via
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind client")
}

async fn recv_within(socket: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Sends `payload` until an answer comes back (deadline 60 s); the answer.
async fn round_trip_eventually(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        socket.send_to(payload, to).await.expect("send");
        if let Some(answer) = recv_within(socket, Duration::from_millis(200)).await {
            return answer;
        }
    }
    panic!("no answer through the emulator within {DEADLINE:?}");
}

fn set(emu: &Emulator, update: SettingsUpdate) -> LinkInfo {
    emu.set("a", "b", &update).expect("valid settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_both_ways_through_one_stable_upstream_socket_per_client() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let via = via(&emu);
    let (c1, c2) = (client().await, client().await);
    for i in 0..20u32 {
        for (name, c) in [("one", &c1), ("two", &c2)] {
            let msg = format!("{name}-{i}");
            c.send_to(msg.as_bytes(), via).await.expect("send");
            let answer = recv_within(c, DEADLINE).await.expect("echo answer");
            assert_eq!(answer, msg.as_bytes());
        }
    }
    let seen = echo.seen();
    assert_eq!(seen.len(), 40);
    let mut sources: HashMap<String, std::collections::HashSet<SocketAddr>> = HashMap::new();
    for (from, payload) in &seen {
        let text = String::from_utf8_lossy(payload).to_string();
        let client = text.split('-').next().unwrap_or_default().to_string();
        sources.entry(client).or_default().insert(*from);
    }
    assert_eq!(sources.len(), 2);
    for (client, addrs) in &sources {
        assert_eq!(
            addrs.len(),
            1,
            "client {client} reached the server from {addrs:?}"
        );
    }
    assert_ne!(
        sources["one"], sources["two"],
        "each client has its own upstream socket"
    );
    let info = emu.link("a", "b").expect("link");
    assert_eq!(info.clients, 2);
    assert_eq!(info.forward.counters.packets_in, 40);
    assert_eq!(info.forward.counters.forwarded, 40);
    assert_eq!(info.reverse.counters.forwarded, 40);
    assert_eq!(info.forward.counters.dropped, 0);
    // Bytes on the wire, both ways (the reverse count moves just after the answer left).
    let sent_bytes: u64 = (0..20u32)
        .flat_map(|i| [format!("one-{i}"), format!("two-{i}")])
        .map(|m| m.len() as u64)
        .sum();
    let start = Instant::now();
    loop {
        let info = emu.link("a", "b").expect("link");
        let (f, r) = (info.forward.counters, info.reverse.counters);
        if f.bytes_forwarded == sent_bytes && r.bytes_forwarded == sent_bytes {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "bytes forwarded {} / {}, expected {sent_bytes} each way",
            f.bytes_forwarded,
            r.bytes_forwarded
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        emu.link("a", "b")
            .expect("link")
            .render()
            .contains(&format!("({sent_bytes} bytes)")),
        "the rendered link shows the bytes forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_delay_applies_in_each_direction() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let via = via(&emu);
    let c = client().await;
    // Warm up: the client's upstream socket exists before we measure.
    round_trip_eventually(&c, via, b"warm").await;
    set(
        &emu,
        SettingsUpdate {
            delay_ms: Some(50),
            ..SettingsUpdate::default()
        },
    );
    for i in 0..3 {
        let start = Instant::now();
        c.send_to(format!("slow-{i}").as_bytes(), via)
            .await
            .expect("send");
        let answer = recv_within(&c, DEADLINE).await.expect("answer");
        let rtt = start.elapsed();
        assert_eq!(answer, format!("slow-{i}").as_bytes());
        assert!(
            rtt >= Duration::from_millis(100),
            "round trip {rtt:?} < 2 × 50 ms"
        );
    }
    // Only one direction delayed: at least 50 ms.
    set(
        &emu,
        SettingsUpdate {
            delay_ms: Some(0),
            direction: Some(DirectionSel::Reverse),
            ..SettingsUpdate::default()
        },
    );
    let start = Instant::now();
    c.send_to(b"half", via).await.expect("send");
    recv_within(&c, DEADLINE).await.expect("answer");
    assert!(start.elapsed() >= Duration::from_millis(50));
    let info = emu.link("a", "b").expect("link");
    assert_eq!(info.forward.settings.delay_ms, 50);
    assert_eq!(info.reverse.settings.delay_ms, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_both_ways_and_one_way_then_heal() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let via = via(&emu);
    let c = client().await;
    round_trip_eventually(&c, via, b"before").await;

    // Forward down: nothing reaches the server, nothing comes back.
    set(
        &emu,
        SettingsUpdate {
            down: Some(true),
            direction: Some(DirectionSel::Forward),
            ..SettingsUpdate::default()
        },
    );
    let before = echo.count();
    for _ in 0..5 {
        c.send_to(b"cut", via).await.expect("send");
        assert_eq!(recv_within(&c, Duration::from_millis(200)).await, None);
    }
    assert_eq!(
        echo.count(),
        before,
        "a datagram crossed a forward partition"
    );
    let info = emu.link("a", "b").expect("link");
    assert_eq!(info.forward.counters.dropped_down, 5);

    // Reverse only down: requests arrive at the server, answers do not come back.
    set(
        &emu,
        SettingsUpdate {
            down: Some(false),
            direction: Some(DirectionSel::Forward),
            ..SettingsUpdate::default()
        },
    );
    set(
        &emu,
        SettingsUpdate {
            down: Some(true),
            direction: Some(DirectionSel::Reverse),
            ..SettingsUpdate::default()
        },
    );
    let before = echo.count();
    for _ in 0..5 {
        c.send_to(b"one-way", via).await.expect("send");
    }
    assert!(
        echo.wait_count(before + 5).await,
        "requests must reach the server"
    );
    assert_eq!(recv_within(&c, Duration::from_millis(500)).await, None);
    let info = emu.link("a", "b").expect("link");
    assert!(info.reverse.counters.dropped_down >= 5);
    assert!(info.reverse.settings.down && !info.forward.settings.down);

    // Healed: flows again.
    set(
        &emu,
        SettingsUpdate {
            down: Some(false),
            ..SettingsUpdate::default()
        },
    );
    assert_eq!(round_trip_eventually(&c, via, b"after").await, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_loss_drops_everything_and_duplication_delivers_twice() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let via = via(&emu);
    let c = client().await;
    round_trip_eventually(&c, via, b"warm").await;

    set(
        &emu,
        SettingsUpdate {
            loss: Some(1.0),
            ..SettingsUpdate::default()
        },
    );
    let before = echo.count();
    for _ in 0..50 {
        c.send_to(b"lost", via).await.expect("send");
    }
    assert_eq!(recv_within(&c, Duration::from_millis(500)).await, None);
    assert_eq!(echo.count(), before);
    assert_eq!(
        emu.link("a", "b")
            .expect("link")
            .forward
            .counters
            .dropped_loss,
        50
    );

    set(
        &emu,
        SettingsUpdate {
            loss: Some(0.0),
            duplicate: Some(1.0),
            direction: Some(DirectionSel::Forward),
            ..SettingsUpdate::default()
        },
    );
    let before = echo.count();
    for i in 0..20 {
        c.send_to(format!("dup-{i}").as_bytes(), via)
            .await
            .expect("send");
    }
    assert!(echo.wait_count(before + 40).await, "each datagram twice");
    let seen = echo.seen();
    for i in 0..20 {
        let copies = seen
            .iter()
            .filter(|(_, p)| p == format!("dup-{i}").as_bytes())
            .count();
        assert_eq!(copies, 2, "dup-{i}");
    }
    let info = emu.link("a", "b").expect("link");
    assert_eq!(info.forward.counters.duplicated, 20);
    assert_eq!(info.reverse.counters.duplicated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_delivers_everything_out_of_order() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let via = via(&emu);
    let c = client().await;
    round_trip_eventually(&c, via, b"warm").await;
    set(
        &emu,
        SettingsUpdate {
            reorder: Some(0.5),
            direction: Some(DirectionSel::Forward),
            ..SettingsUpdate::default()
        },
    );
    let before = echo.count();
    for i in 0..200u32 {
        c.send_to(&i.to_be_bytes(), via).await.expect("send");
    }
    assert!(echo.wait_count(before + 200).await, "all 200 arrive");
    let order: Vec<u32> = echo.seen()[before..]
        .iter()
        .filter_map(|(_, p)| <[u8; 4]>::try_from(p.as_slice()).ok())
        .map(u32::from_be_bytes)
        .collect();
    assert_eq!(order.len(), 200);
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "nothing was reordered"
    );
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_reads_changes_and_validates() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind control");
    let control = listener.local_addr().expect("control addr");
    tokio::spawn(meridian_node::proxy::serve_control(
        emu.handle(),
        listener,
        std::future::pending(),
    ));
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let url = |p: &str| format!("http://{control}{p}");

    let r = http.get(url("/healthz")).send().await.expect("healthz");
    assert_eq!(r.status(), 200);

    let links: Vec<LinkInfo> = http
        .get(url("/links"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(links.len(), 1);
    assert_eq!((links[0].from.as_str(), links[0].to.as_str()), ("a", "b"));
    let raw: serde_json::Value = http
        .get(url("/links/a/b"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    for dir in ["forward", "reverse"] {
        assert!(
            raw[dir]["counters"]["bytes_forwarded"].is_u64(),
            "{dir} counters lack bytes_forwarded: {raw}"
        );
    }
    assert_eq!(links[0].upstream, echo.addr);

    let r = http
        .put(url("/links/a/b"))
        .body(r#"{"delay_ms": 5, "jitter_ms": 2, "loss": 0.25, "direction": "forward"}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    let link: LinkInfo = r.json().await.expect("json");
    assert_eq!(link.forward.settings.delay_ms, 5);
    assert_eq!(link.forward.settings.jitter_ms, 2);
    assert!((link.forward.settings.loss - 0.25).abs() < 1e-9);
    assert_eq!(link.reverse.settings.delay_ms, 0);

    // Omitted fields stay; PUT /links applies to all.
    let r = http
        .put(url("/links"))
        .body(r#"{"down": true}"#)
        .send()
        .await
        .expect("put all");
    assert_eq!(r.status(), 200);
    let all: Vec<LinkInfo> = r.json().await.expect("json");
    assert!(all[0].forward.settings.down && all[0].reverse.settings.down);
    assert_eq!(all[0].forward.settings.delay_ms, 5);
    let got: LinkInfo = http
        .get(url("/links/a/b"))
        .send()
        .await
        .expect("get one")
        .json()
        .await
        .expect("json");
    assert_eq!(got.forward.settings, all[0].forward.settings);

    for body in [
        r#"{"loss": 1.5}"#,
        r#"{"duplicate": -1}"#,
        r#"{"delay_ms": -5}"#,
        r#"{"delay_ms": 99999999}"#,
        r#"{"direction": "sideways"}"#,
        r#"{"speed": 1}"#,
        r#"not json"#,
        r#"[]"#,
    ] {
        let r = http
            .put(url("/links/a/b"))
            .body(body)
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 400, "{body}");
        let e: serde_json::Value = r.json().await.expect("json error");
        assert!(e["error"].is_string() && e["message"].is_string(), "{e}");
    }
    // Nothing changed by refused requests.
    assert_eq!(
        emu.link("a", "b").expect("link").forward.settings,
        got.forward.settings
    );
    let r = http
        .put(url("/links/a/zz"))
        .body("{}")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 404);

    // The CLI talks to the same API.
    let bin = env!("CARGO_BIN_EXE_meridian");
    let control_s = control.to_string();
    let out = tokio::process::Command::new(bin)
        .args(["proxy", "set", "--control", &control_s, "--link", "a:b"])
        .args([
            "--up",
            "--delay-ms",
            "7",
            "--direction",
            "reverse",
            "--json",
        ])
        .output()
        .await
        .expect("run proxy set");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<LinkInfo> = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(printed[0].reverse.settings.delay_ms, 7);
    assert!(!printed[0].reverse.settings.down && printed[0].forward.settings.down);

    let out = tokio::process::Command::new(bin)
        .args(["proxy", "set", "--control", &control_s, "--all", "--up"])
        .output()
        .await
        .expect("run proxy set");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("a → b"));

    let out = tokio::process::Command::new(bin)
        .args([
            "proxy",
            "set",
            "--control",
            &control_s,
            "--link",
            "a:zz",
            "--up",
        ])
        .output()
        .await
        .expect("run proxy set");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no emulated link a -> zz"));

    let out = tokio::process::Command::new(bin)
        .args([
            "proxy",
            "set",
            "--control",
            &control_s,
            "--all",
            "--loss",
            "3",
        ])
        .output()
        .await
        .expect("run proxy set");
    assert_eq!(out.status.code(), Some(2));
}

/// Two real nodes whose replication links both go through the emulator: a write crosses,
/// a partition stops the next one, healing lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_replication_crosses_the_emulator_and_stops_at_a_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = fixture::two_region_topology("proxy-test", &[("eu-1", "us-1"), ("us-1", "eu-1")]);
    let path = dir.path().join("topology.toml");
    std::fs::write(&path, text).expect("write topology");
    let topology = meridian_node::topology::Topology::load(&path).expect("valid topology");
    meridian_node::tls::generate_certs(&topology, &dir.path().join("certs")).expect("certs");

    let emu = Emulator::start(&topology, EmulatorOptions::default())
        .await
        .expect("start emulator");
    let eu = NodeProcess::spawn(
        &path,
        "eu-1",
        &dir.path().join("data-eu"),
        topology.node("eu-1").expect("eu").api,
        &[],
    );
    let us = NodeProcess::spawn(
        &path,
        "us-1",
        &dir.path().join("data-us"),
        topology.node("us-1").expect("us").api,
        &[],
    );
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    for node in [&eu, &us] {
        assert!(
            wait_ready(&http, &node.url("/readyz"), DEADLINE).await,
            "node not ready; log:\n{}",
            node.log_text()
        );
    }

    let write = |key: &'static str, n: u32| {
        let http = http.clone();
        let url = eu.url(&format!("/v1/kv/{key}"));
        async move {
            let r = http
                .put(url)
                .body(format!(r#"{{"n": {n}}}"#))
                .send()
                .await
                .expect("write");
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        }
    };
    let readable_at_us = |key: &'static str| {
        let http = http.clone();
        let url = us.url(&format!("/v1/kv/{key}"));
        async move { matches!(http.get(url).send().await, Ok(r) if r.status() == 200) }
    };
    let wait_at_us = |key: &'static str| async move {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if readable_at_us(key).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };

    write("proxy/one", 1).await;
    assert!(
        wait_at_us("proxy/one").await,
        "the write did not replicate through the emulator; eu log:\n{}\nus log:\n{}",
        eu.log_text(),
        us.log_text()
    );
    // It really went through the emulator: both dial paths carry traffic both ways once each
    // node's subscription is up (the second may still be backing off when the first delivers).
    assert_eq!(emu.links().len(), 2);
    let start = Instant::now();
    loop {
        let links = emu.links();
        let both_ways = links
            .iter()
            .all(|l| l.forward.counters.forwarded > 0 && l.reverse.counters.forwarded > 0);
        if both_ways {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{links:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Partition both links, both directions.
    emu.set_all(&SettingsUpdate {
        down: Some(true),
        ..SettingsUpdate::default()
    })
    .expect("down");
    write("proxy/two", 2).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        assert!(
            !readable_at_us("proxy/two").await,
            "a write crossed a full partition"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        emu.links()
            .iter()
            .any(|l| l.forward.counters.dropped_down > 0 || l.reverse.counters.dropped_down > 0),
        "the partition dropped nothing"
    );

    // Heal.
    emu.set_all(&SettingsUpdate {
        down: Some(false),
        ..SettingsUpdate::default()
    })
    .expect("up");
    assert!(
        wait_at_us("proxy/two").await,
        "the write did not arrive after healing; eu log:\n{}\nus log:\n{}",
        eu.log_text(),
        us.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_bounded_and_idle_ones_evicted() {
    let echo = Echo::start().await;
    let emu = Emulator::start_links(
        vec![LinkSpec {
            from: "a".into(),
            to: "b".into(),
            via: "127.0.0.1:0".parse().expect("addr"),
            upstream: echo.addr,
        }],
        EmulatorOptions {
            max_clients_per_link: 2,
            client_idle: Duration::from_secs(2),
            ..EmulatorOptions::default()
        },
    )
    .await
    .expect("start emulator");
    let via = via(&emu);
    let clients = [client().await, client().await, client().await];
    for c in &clients {
        round_trip_eventually(c, via, b"hello").await;
    }
    let info = emu.link("a", "b").expect("link");
    assert_eq!(info.clients, 2, "at most two clients per link");
    assert_eq!(info.clients_evicted, 1);
    // Idle clients go.
    let start = Instant::now();
    while emu.link("a", "b").expect("link").clients > 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "idle clients were never evicted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And a client that comes back gets a fresh upstream socket.
    assert_eq!(
        round_trip_eventually(&clients[0], via, b"again").await,
        b"again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_runs_the_emulator_until_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = fixture::two_region_topology("proxy-cli", &[("eu-1", "us-1")]);
    let path = dir.path().join("topology.toml");
    std::fs::write(&path, text).expect("write topology");
    let topology = meridian_node::topology::Topology::load(&path).expect("valid topology");
    let via = topology.links[0].via.port();
    let us_peer = topology.node("us-1").expect("us-1").peer.port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["proxy", "--topology"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn meridian proxy");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let control = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            printed.push(line.clone());
            if let Some(addr) = line.strip_prefix("control http://") {
                return Some(addr.to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("the control address is printed");
    assert!(
        printed.iter().any(|l| l.contains("eu-1 → us-1")
            && l.contains(&format!("127.0.0.1:{via}"))
            && l.contains(&format!("127.0.0.1:{us_peer}"))),
        "{printed:?}"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["proxy", "set", "--control", &control, "--link", "eu-1:us-1"])
        .args(["--down", "--direction", "forward"])
        .output()
        .await
        .expect("run proxy set");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("forward DOWN"), "{shown}");

    let pid = child.id().expect("pid").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");

    // A topology without links is invalid input for the emulator: exit 2.
    let plain = dir.path().join("plain.toml");
    let text = std::fs::read_to_string(&path).expect("read");
    let cut = text.find("[[links]]").expect("links");
    std::fs::write(&plain, &text[..cut]).expect("write");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["proxy", "--topology"])
        .arg(&plain)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// TCP links

async fn tcp_emulator_to(upstream: SocketAddr, options: EmulatorOptions) -> Emulator {
    Emulator::start_tcp_links(
        vec![LinkSpec {
            from: "a".into(),
            to: "b".into(),
            via: "127.0.0.1:0".parse().expect("addr"),
            upstream,
        }],
        options,
    )
    .await
    .expect("start the TCP emulator")
}

/// A TCP echo server: echoes every connection until the client closes, then closes.
async fn tcp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A TCP server whose connections the test drives itself.
struct TcpUpstream {
    addr: SocketAddr,
    accepted: tokio::sync::mpsc::Receiver<TcpStream>,
    _task: tokio::task::JoinHandle<()>,
}

impl TcpUpstream {
    async fn start() -> TcpUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let (tx, accepted) = tokio::sync::mpsc::channel(16);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if tx.send(stream).await.is_err() {
                    break;
                }
            }
        });
        TcpUpstream {
            addr,
            accepted,
            _task: task,
        }
    }

    async fn next(&mut self) -> TcpStream {
        tokio::time::timeout(DEADLINE, self.accepted.recv())
            .await
            .expect("the relay connects upstream")
            .expect("upstream listener running")
    }
}

async fn tcp_connect(to: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(to).await.expect("connect to the relay");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("bytes arrive within the deadline")
        .expect("read");
    buf
}

/// True when nothing at all can be read from `stream` for `wait`.
async fn silent_for(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(wait, stream.read(&mut buf))
        .await
        .is_err()
}

/// Polls `check` on the link a -> b until it holds (deadline 60 s).
async fn wait_link(emu: &Emulator, what: &str, check: impl Fn(&LinkInfo) -> bool) -> LinkInfo {
    let start = Instant::now();
    loop {
        let info = emu.link("a", "b").expect("link a -> b");
        if check(&info) {
            return info;
        }
        assert!(start.elapsed() < DEADLINE, "{what}: {info:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deterministic, non-repeating-looking bytes, so a shifted or reordered stream cannot match.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relays_bytes_both_ways_unchanged_and_counts_them() {
    const LEN_BYTES: usize = 1024 * 1024;
    let (echo, _echo_task) = tcp_echo().await;
    let emu = tcp_emulator_to(echo, EmulatorOptions::default()).await;
    let via = via(&emu);
    assert_ne!(via.port(), 0, "LinkInfo::via is the bound address");
    let payload = pattern(LEN_BYTES, 42);
    let (mut r, mut w) = tcp_connect(via).await.into_split();
    let sender = {
        let payload = payload.clone();
        tokio::spawn(async move {
            w.write_all(&payload).await.expect("send");
            // Half-close: the echo's close must come back through the relay.
            w.shutdown().await.expect("shutdown");
        })
    };
    let mut received = Vec::with_capacity(LEN_BYTES);
    tokio::time::timeout(DEADLINE, r.read_to_end(&mut received))
        .await
        .expect("the echo and its close come back")
        .expect("read");
    sender.await.expect("sender");
    assert_eq!(received.len(), LEN_BYTES);
    assert!(received == payload, "the bytes came back changed");

    let info = wait_link(&emu, "the connection ends and every byte is counted", |l| {
        l.clients == 0
            && l.forward.counters.bytes_forwarded == LEN_BYTES as u64
            && l.reverse.counters.bytes_forwarded == LEN_BYTES as u64
    })
    .await;
    for c in [info.forward.counters, info.reverse.counters] {
        assert!(c.packets_in >= 1, "{c:?}");
        assert_eq!(c.packets_in, c.forwarded, "{c:?}");
        assert_eq!((c.queued, c.dropped, c.send_errors), (0, 0, 0), "{c:?}");
    }
    assert!(
        info.render().contains(&format!("({LEN_BYTES} bytes)")),
        "{}",
        info.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_delay_applies_per_direction_and_jitter_keeps_the_order() {
    let (echo, _echo_task) = tcp_echo().await;
    let emu = tcp_emulator_to(echo, EmulatorOptions::default()).await;
    let via = via(&emu);
    let mut c = tcp_connect(via).await;
    c.write_all(b"warm").await.expect("send");
    assert_eq!(read_exactly(&mut c, 4).await, b"warm");

    set(
        &emu,
        SettingsUpdate {
            delay_ms: Some(50),
            ..SettingsUpdate::default()
        },
    );
    for i in 0..3u8 {
        let start = Instant::now();
        c.write_all(&[i]).await.expect("send");
        assert_eq!(read_exactly(&mut c, 1).await, [i]);
        let rtt = start.elapsed();
        assert!(
            rtt >= Duration::from_millis(100),
            "round trip {rtt:?} < 2 × 50 ms"
        );
    }
    // Only forward delayed: at least 50 ms.
    set(
        &emu,
        SettingsUpdate {
            delay_ms: Some(0),
            direction: Some(DirectionSel::Reverse),
            ..SettingsUpdate::default()
        },
    );
    let start = Instant::now();
    c.write_all(b"h").await.expect("send");
    assert_eq!(read_exactly(&mut c, 1).await, b"h");
    assert!(start.elapsed() >= Duration::from_millis(50));

    // Jitter as large as the delay: a datagram link would reorder, a byte stream must not.
    let info = set(
        &emu,
        SettingsUpdate {
            delay_ms: Some(20),
            jitter_ms: Some(20),
            ..SettingsUpdate::default()
        },
    );
    let chunks_before = info.forward.counters.packets_in;
    const COUNT: u32 = 300;
    let (mut r, mut w) = c.into_split();
    let sender = tokio::spawn(async move {
        for i in 0..COUNT {
            w.write_all(&i.to_be_bytes()).await.expect("send");
            // Separate segments, so the relay reads (and jitters) many chunks.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w
    });
    let mut back = vec![0u8; COUNT as usize * 4];
    tokio::time::timeout(DEADLINE, r.read_exact(&mut back))
        .await
        .expect("every numbered chunk comes back")
        .expect("read");
    let order: Vec<u32> = back
        .chunks_exact(4)
        .filter_map(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .collect();
    assert_eq!(
        order,
        (0..COUNT).collect::<Vec<_>>(),
        "the stream was reordered"
    );
    let _w = sender.await.expect("sender");
    let info = emu.link("a", "b").expect("link");
    assert!(
        info.forward.counters.packets_in >= chunks_before + 2,
        "the relay read the numbers as one chunk, so jitter was not exercised: {info:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_down_holds_bytes_and_delivers_them_when_cleared() {
    const LEN_BYTES: usize = 256 * 1024;
    let mut upstream = TcpUpstream::start().await;
    let emu = tcp_emulator_to(upstream.addr, EmulatorOptions::default()).await;
    let via = via(&emu);
    set(
        &emu,
        SettingsUpdate {
            down: Some(true),
            ..SettingsUpdate::default()
        },
    );
    // A connection made while down is still accepted; its bytes wait.
    let mut c = tcp_connect(via).await;
    let mut server = upstream.next().await;
    let payload = pattern(LEN_BYTES, 7);
    c.write_all(&payload).await.expect("send");
    server.write_all(b"answer").await.expect("answer");
    wait_link(&emu, "both directions hold what they read", |l| {
        l.forward.counters.queued > 0 && l.reverse.counters.queued > 0
    })
    .await;
    assert!(
        silent_for(&mut server, Duration::from_millis(500)).await,
        "a byte crossed the forward partition"
    );
    assert!(
        silent_for(&mut c, Duration::from_millis(200)).await,
        "a byte crossed the reverse partition"
    );
    let info = emu.link("a", "b").expect("link");
    assert_eq!(info.clients, 1);
    assert_eq!(info.forward.counters.bytes_forwarded, 0);
    assert_eq!(info.reverse.counters.bytes_forwarded, 0);

    set(
        &emu,
        SettingsUpdate {
            down: Some(false),
            ..SettingsUpdate::default()
        },
    );
    assert!(
        read_exactly(&mut server, LEN_BYTES).await == payload,
        "the held bytes arrived changed"
    );
    assert_eq!(read_exactly(&mut c, 6).await, b"answer");
    let info = wait_link(&emu, "everything delivered", |l| {
        l.forward.counters.bytes_forwarded == LEN_BYTES as u64
            && l.reverse.counters.bytes_forwarded == 6
    })
    .await;
    assert_eq!(info.forward.counters.queued, 0);
    assert_eq!(
        info.forward.counters.dropped + info.reverse.counters.dropped,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_one_way_down_holds_forward_while_reverse_flows() {
    let mut upstream = TcpUpstream::start().await;
    let emu = tcp_emulator_to(upstream.addr, EmulatorOptions::default()).await;
    let via = via(&emu);
    let mut c = tcp_connect(via).await;
    let mut server = upstream.next().await;
    c.write_all(b"hi").await.expect("send");
    assert_eq!(read_exactly(&mut server, 2).await, b"hi");

    let info = set(
        &emu,
        SettingsUpdate {
            down: Some(true),
            direction: Some(DirectionSel::Forward),
            ..SettingsUpdate::default()
        },
    );
    assert!(info.forward.settings.down && !info.reverse.settings.down);
    c.write_all(b"request").await.expect("send");
    for i in 0..5 {
        let push = format!("push-{i}");
        server.write_all(push.as_bytes()).await.expect("push");
        assert_eq!(read_exactly(&mut c, push.len()).await, push.as_bytes());
    }
    assert!(
        silent_for(&mut server, Duration::from_millis(500)).await,
        "a byte crossed the forward partition"
    );

    set(
        &emu,
        SettingsUpdate {
            down: Some(false),
            direction: Some(DirectionSel::Forward),
            ..SettingsUpdate::default()
        },
    );
    assert_eq!(read_exactly(&mut server, 7).await, b"request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_bounded_and_dropping_the_emulator_closes_them() {
    let (echo, _echo_task) = tcp_echo().await;
    let emu = tcp_emulator_to(
        echo,
        EmulatorOptions {
            max_clients_per_link: 2,
            ..EmulatorOptions::default()
        },
    )
    .await;
    let via = via(&emu);
    let mut open = Vec::new();
    for i in 0..2u8 {
        let mut c = tcp_connect(via).await;
        c.write_all(&[i]).await.expect("send");
        assert_eq!(read_exactly(&mut c, 1).await, [i]);
        open.push(c);
    }
    // The third is closed at once, without a byte.
    let mut third = tcp_connect(via).await;
    let mut buf = [0u8; 1];
    let got = tokio::time::timeout(DEADLINE, third.read(&mut buf))
        .await
        .expect("the extra connection is closed");
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    let info = wait_link(&emu, "the extra connection is counted", |l| {
        l.clients_evicted == 1
    })
    .await;
    assert_eq!(info.clients, 2);

    // Closing one makes room.
    drop(open.pop());
    wait_link(&emu, "the closed connection is released", |l| {
        l.clients == 1
    })
    .await;
    let mut again = tcp_connect(via).await;
    again.write_all(b"x").await.expect("send");
    assert_eq!(read_exactly(&mut again, 1).await, b"x");

    drop(emu);
    let got = tokio::time::timeout(DEADLINE, again.read(&mut buf))
        .await
        .expect("relayed connections end with the emulator");
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    let start = Instant::now();
    while TcpStream::connect(via).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "still listening after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
