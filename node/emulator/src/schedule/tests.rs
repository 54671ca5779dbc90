use super::*;

#[test]
fn hold_time_respects_delay_and_jitter_bounds() {
    let mut rng = Rng::new(7);
    let s = Impairment {
        delay_ms: 20,
        jitter_ms: 5,
        ..Impairment::default()
    };
    let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
    for _ in 0..10_000 {
        let d = hold_time(&s, &mut rng);
        assert!(
            d >= Duration::from_millis(15) && d <= Duration::from_millis(25),
            "{d:?}"
        );
        lo = lo.min(d);
        hi = hi.max(d);
    }
    assert!(lo < Duration::from_millis(16) && hi > Duration::from_millis(24));
    // Jitter larger than the delay never goes below zero.
    let s = Impairment {
        delay_ms: 1,
        jitter_ms: 10,
        ..Impairment::default()
    };
    for _ in 0..1000 {
        assert!(hold_time(&s, &mut rng) <= Duration::from_millis(11));
    }
    // Reordering adds between 1 ms and max(delay, 10) ms.
    let s = Impairment {
        delay_ms: 0,
        reorder: 1.0,
        ..Impairment::default()
    };
    for _ in 0..1000 {
        let d = hold_time(&s, &mut rng);
        assert!(
            d >= Duration::from_millis(1) && d <= Duration::from_millis(10),
            "{d:?}"
        );
    }
}

#[test]
fn chance_is_exact_at_the_ends_and_roughly_right_between() {
    let mut rng = Rng::new(1);
    assert!((0..1000).all(|_| rng.chance(1.0)));
    assert!((0..1000).all(|_| !rng.chance(0.0)));
    let hits = (0..100_000).filter(|_| rng.chance(0.3)).count();
    assert!((27_000..33_000).contains(&hits), "{hits}");
}

#[tokio::test]
async fn heap_entries_leave_in_deadline_then_arrival_order() {
    let now = Instant::now();
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("socket"));
    let dest: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let mut heap = BinaryHeap::new();
    for (seq, ms) in [(1u64, 30u64), (2, 10), (3, 10), (4, 20)] {
        heap.push(Reverse(HeapEntry {
            at: now + Duration::from_millis(ms),
            seq,
            item: Scheduled {
                at: now + Duration::from_millis(ms),
                data: vec![],
                socket: Arc::clone(&sock),
                dest,
            },
        }));
    }
    let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|e| e.0.seq)).collect();
    assert_eq!(order, vec![2, 3, 4, 1]);
}
