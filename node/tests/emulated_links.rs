//! The link emulator with real `meridian` processes: QUIC replication between two
//! `meridian serve` nodes whose links go through the emulator (started on the topology by
//! `proxy_cmd`), the `meridian proxy` CLI run until SIGTERM, and `meridian proxy set` against a
//! running emulator's control API. The emulator's own tests are in `node/emulator/tests`.
//!
//! Timing assertions are lower bounds only; everything else polls with generous deadlines.

use std::time::{Duration, Instant};

use meridian_emulator::{Emulator, EmulatorOptions, LinkInfo, LinkSpec, SettingsUpdate};
use meridian_harness::{NodeProcess, fixture, wait_ready};
use meridian_node::tools::proxy_cmd;

const DEADLINE: Duration = Duration::from_secs(60);

/// The emulator on one link `a -> b` (to a bound, silent UDP socket) with its control API on
/// a free port; the emulator, the control address, and the socket to keep.
async fn emulator_with_control() -> (Emulator, std::net::SocketAddr, tokio::net::UdpSocket) {
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let emu = Emulator::start_links(
        vec![LinkSpec {
            from: "a".into(),
            to: "b".into(),
            via: "127.0.0.1:0".parse().expect("addr"),
            upstream: upstream.local_addr().expect("upstream addr"),
        }],
        EmulatorOptions::default(),
    )
    .await
    .expect("start emulator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind control");
    let control = listener.local_addr().expect("control addr");
    tokio::spawn(meridian_emulator::serve_control(
        emu.handle(),
        listener,
        std::future::pending(),
    ));
    (emu, control, upstream)
}

/// `meridian proxy set` talks to the control API: one link and one direction, every link,
/// an unknown link (exit 1 with the API's message), an invalid setting (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_set_changes_a_running_emulator_through_its_control_api() {
    let (emu, control, _upstream) = emulator_with_control().await;
    // Forward delayed and lossy, then both directions down.
    emu.set(
        "a",
        "b",
        &SettingsUpdate {
            delay_ms: Some(5),
            jitter_ms: Some(2),
            loss: Some(0.25),
            direction: Some(meridian_emulator::DirectionSel::Forward),
            ..SettingsUpdate::default()
        },
    )
    .expect("valid settings");
    emu.set_all(&SettingsUpdate {
        down: Some(true),
        ..SettingsUpdate::default()
    })
    .expect("valid settings");

    let bin = env!("CARGO_BIN_EXE_meridian");
    let control_s = control.to_string();
    let proxy_set = |args: &[&str]| {
        let mut command = tokio::process::Command::new(bin);
        command
            .args(["proxy", "set", "--control", &control_s])
            .args(args);
        async move { command.output().await.expect("run proxy set") }
    };
    let out = proxy_set(&[
        "--link",
        "a:b",
        "--up",
        "--delay-ms",
        "7",
        "--direction",
        "reverse",
        "--json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<LinkInfo> = serde_json::from_slice(&out.stdout).expect("json output");
    assert_eq!(printed[0].reverse.settings.delay_ms, 7);
    assert!(!printed[0].reverse.settings.down && printed[0].forward.settings.down);

    let out = proxy_set(&["--all", "--up"]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("a → b"));

    let out = proxy_set(&["--link", "a:zz", "--up"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no emulated link a -> zz"));

    let out = proxy_set(&["--all", "--loss", "3"]).await;
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
    let topology = meridian_node::config::Topology::load(&path).expect("valid topology");
    meridian_node::tools::certs::generate_certs(&topology, &dir.path().join("certs"))
        .expect("certs");

    let emu = proxy_cmd::start(&topology, EmulatorOptions::default())
        .await
        .expect("start emulator");
    let spawn = |node: &str| {
        let api = topology.node(node).expect("node in the topology").api;
        let data = dir.path().join(format!("data-{node}"));
        NodeProcess::spawn(&path, node, &data, api, &[])
    };
    let (eu, us) = (spawn("eu-1"), spawn("us-1"));
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
async fn cli_runs_the_emulator_until_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = fixture::two_region_topology("proxy-cli", &[("eu-1", "us-1")]);
    let path = dir.path().join("topology.toml");
    std::fs::write(&path, text).expect("write topology");
    let topology = meridian_node::config::Topology::load(&path).expect("valid topology");
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
