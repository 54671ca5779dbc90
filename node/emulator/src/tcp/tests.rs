use super::*;
use crate::{LinkSpec, SettingsUpdate};

#[test]
fn tcp_chunks_are_never_delivered_before_the_previous_one() {
    let now = Instant::now();
    let ms = Duration::from_millis;
    assert_eq!(tcp_delivery_time(now, ms(5), None), now + ms(5));
    // Jitter drew a shorter hold than the chunk before got: it waits for that one.
    assert_eq!(
        tcp_delivery_time(now, ms(5), Some(now + ms(20))),
        now + ms(20)
    );
    assert_eq!(
        tcp_delivery_time(now, ms(30), Some(now + ms(20))),
        now + ms(30)
    );
}

fn test_link() -> Arc<LinkState> {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    Arc::new(LinkState::new(
        LinkSpec {
            from: "a".into(),
            to: "b".into(),
            via: addr,
            upstream: addr,
        },
        addr,
    ))
}

/// A downed direction stops reading at the byte bound (the sender is held back, the relay
/// does not grow), then delivers every byte in order once it is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_direction_holds_a_bounded_amount_while_down_and_loses_nothing() {
    const TOTAL_BYTES: usize = 16 * 1024 * 1024;
    const PIPE_BYTES: usize = 64 * 1024;
    const WRITE_BYTES: usize = 16 * 1024;
    let deadline = Duration::from_secs(60);
    let link = test_link();
    link.apply(&SettingsUpdate {
        down: Some(true),
        ..SettingsUpdate::default()
    });
    let (mut source_w, source_r) = tokio::io::duplex(PIPE_BYTES);
    let (dest_w, mut dest_r) = tokio::io::duplex(PIPE_BYTES);
    let payload: Vec<u8> = (0..TOTAL_BYTES).map(|i| (i % 251) as u8).collect();
    let written_bytes = Arc::new(AtomicU64::new(0));
    let sender = {
        let payload = payload.clone();
        let written_bytes = Arc::clone(&written_bytes);
        tokio::spawn(async move {
            for piece in payload.chunks(WRITE_BYTES) {
                source_w.write_all(piece).await.expect("write the source");
                written_bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            source_w.shutdown().await.expect("shut the source down");
        })
    };
    let relay = {
        let link = Arc::clone(&link);
        tokio::spawn(async move {
            tcp_direction(&link, Dir::Forward, source_r, dest_w, Rng::new(3)).await
        })
    };
    // The relay fills its budget (less at most one read's worth) plus the pipe.
    let start = std::time::Instant::now();
    let floor = (TCP_MAX_HELD_BYTES - TCP_READ_BYTES - WRITE_BYTES) as u64;
    while written_bytes.load(Ordering::Relaxed) < floor {
        assert!(
            start.elapsed() < deadline,
            "the relay stopped reading too early"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = written_bytes.load(Ordering::Relaxed);
    assert!(
        written <= (TCP_MAX_HELD_BYTES + PIPE_BYTES) as u64,
        "{written} bytes accepted while down: the bound is not applied"
    );
    let mut first = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), dest_r.read(&mut first))
            .await
            .is_err(),
        "a byte crossed a downed direction"
    );
    assert!(link.forward.counters.snapshot().queued > 0);

    link.apply(&SettingsUpdate {
        down: Some(false),
        ..SettingsUpdate::default()
    });
    let mut received = Vec::with_capacity(TOTAL_BYTES);
    tokio::time::timeout(deadline, dest_r.read_to_end(&mut received))
        .await
        .expect("everything arrives after the direction is up")
        .expect("read the destination");
    assert!(
        received == payload,
        "the bytes arrived changed or out of order"
    );
    sender.await.expect("sender task");
    let end = relay.await.expect("relay task");
    assert!(matches!(end, TcpDirEnd::Closed), "{end}");
    let c = link.forward.counters.snapshot();
    assert_eq!(c.bytes_forwarded, TOTAL_BYTES as u64);
    assert_eq!((c.packets_in, c.queued, c.dropped), (c.forwarded, 0, 0));
}
