//! The TCP relay (`Emulator::start_tcp_links`): bytes unchanged both ways, per-direction
//! delay, order kept under jitter, bytes held (not lost) while down, one-way down, the
//! connection bound, and dropping the emulator.
//!
//! Timing assertions are lower bounds only; everything else polls with generous deadlines.

mod common;

use std::time::{Duration, Instant};

use common::{
    DEADLINE, TcpUpstream, pattern, read_exactly, set, set_delay_ms, set_down, silent_for,
    tcp_connect, tcp_echo, tcp_emulator_to, via, wait_link,
};
use meridian_emulator::{DirectionSel, EmulatorOptions, SettingsUpdate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

    set_delay_ms(&emu, None, 50);
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
    set_delay_ms(&emu, Some(DirectionSel::Reverse), 0);
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
    set_down(&emu, None, true);
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

    set_down(&emu, None, false);
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

    let info = set_down(&emu, Some(DirectionSel::Forward), true);
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

    set_down(&emu, Some(DirectionSel::Forward), false);
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
