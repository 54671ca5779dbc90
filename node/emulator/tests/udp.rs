//! The UDP relay: one stable upstream socket per client, one-way delay, partitions (both
//! ways and one way), loss, duplication, reordering, and the bound on clients.
//!
//! Timing assertions are lower bounds only; everything else polls with generous deadlines.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    DEADLINE, Echo, client, emulator_to, recv_within, round_trip_eventually, set, set_delay_ms,
    set_down, udp_rig, via,
};
use meridian_emulator::{DirectionSel, Emulator, EmulatorOptions, LinkSpec, SettingsUpdate};

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
    // Warm: the client's upstream socket exists before anything is measured.
    let (_echo, emu, via, c) = udp_rig(b"warm").await;
    set_delay_ms(&emu, None, 50);
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
    set_delay_ms(&emu, Some(DirectionSel::Reverse), 0);
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
    let (echo, emu, via, c) = udp_rig(b"before").await;

    // Forward down: nothing reaches the server, nothing comes back.
    set_down(&emu, Some(DirectionSel::Forward), true);
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
    set_down(&emu, Some(DirectionSel::Forward), false);
    set_down(&emu, Some(DirectionSel::Reverse), true);
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
    set_down(&emu, None, false);
    assert_eq!(round_trip_eventually(&c, via, b"after").await, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_loss_drops_everything_and_duplication_delivers_twice() {
    let (echo, emu, via, c) = udp_rig(b"warm").await;

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
    let (echo, emu, via, c) = udp_rig(b"warm").await;
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

#[tokio::test]
async fn an_empty_list_of_links_is_refused_for_udp_and_tcp() {
    let udp = Emulator::start_links(Vec::new(), EmulatorOptions::default()).await;
    assert!(
        matches!(udp, Err(meridian_emulator::ProxyError::NoLinks)),
        "udp"
    );
    let tcp = Emulator::start_tcp_links(Vec::new(), EmulatorOptions::default()).await;
    assert!(
        matches!(tcp, Err(meridian_emulator::ProxyError::NoLinks)),
        "tcp"
    );
}
