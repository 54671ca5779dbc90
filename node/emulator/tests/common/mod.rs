//! Helpers shared by the emulator's integration tests: UDP and TCP servers behind an
//! emulated link `a -> b`, and polling with a generous deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_emulator::{
    DirectionSel, Emulator, EmulatorOptions, LinkInfo, LinkSpec, SettingsUpdate,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

pub const DEADLINE: Duration = Duration::from_secs(60);

/// What the echo server saw: source address and payload of each datagram.
pub type SeenLog = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP echo server that records, per received datagram, its source address and payload.
pub struct Echo {
    pub addr: SocketAddr,
    seen: SeenLog,
    _task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Echo {
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

    pub fn count(&self) -> usize {
        self.seen.lock().expect("echo log").len()
    }

    pub fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.lock().expect("echo log").clone()
    }

    /// Polls until the server has seen at least `n` datagrams.
    pub async fn wait_count(&self, n: usize) -> bool {
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

pub async fn emulator_to(upstream: SocketAddr) -> Emulator {
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

pub fn via(emu: &Emulator) -> SocketAddr {
    emu.link("a", "b").expect("link a -> b").via
}

pub async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind client")
}

pub async fn recv_within(socket: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Sends `payload` until an answer comes back (deadline 60 s); the answer.
pub async fn round_trip_eventually(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        socket.send_to(payload, to).await.expect("send");
        if let Some(answer) = recv_within(socket, Duration::from_millis(200)).await {
            return answer;
        }
    }
    panic!("no answer through the emulator within {DEADLINE:?}");
}

pub fn set(emu: &Emulator, update: SettingsUpdate) -> LinkInfo {
    emu.set("a", "b", &update).expect("valid settings")
}

/// Takes the link a -> b down or up, in one direction or (`None`) both.
pub fn set_down(emu: &Emulator, direction: Option<DirectionSel>, down: bool) -> LinkInfo {
    set(
        emu,
        SettingsUpdate {
            down: Some(down),
            direction,
            ..SettingsUpdate::default()
        },
    )
}

/// Sets the one-way delay of the link a -> b, in one direction or (`None`) both.
pub fn set_delay_ms(emu: &Emulator, direction: Option<DirectionSel>, delay_ms: u64) -> LinkInfo {
    set(
        emu,
        SettingsUpdate {
            delay_ms: Some(delay_ms),
            direction,
            ..SettingsUpdate::default()
        },
    )
}

/// A UDP echo server behind the emulated link a -> b, the emulator, the link's address and
/// one client whose upstream socket already exists (one round trip made with `payload`), so
/// that measurements start warm.
pub async fn udp_rig(payload: &[u8]) -> (Echo, Emulator, SocketAddr, UdpSocket) {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let via = via(&emu);
    let client = client().await;
    round_trip_eventually(&client, via, payload).await;
    (echo, emu, via, client)
}

pub async fn tcp_emulator_to(upstream: SocketAddr, options: EmulatorOptions) -> Emulator {
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
pub async fn tcp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
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
pub struct TcpUpstream {
    pub addr: SocketAddr,
    accepted: tokio::sync::mpsc::Receiver<TcpStream>,
    _task: tokio::task::JoinHandle<()>,
}

impl TcpUpstream {
    pub async fn start() -> TcpUpstream {
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

    pub async fn next(&mut self) -> TcpStream {
        tokio::time::timeout(DEADLINE, self.accepted.recv())
            .await
            .expect("the relay connects upstream")
            .expect("upstream listener running")
    }
}

pub async fn tcp_connect(to: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(to).await.expect("connect to the relay");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

pub async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("bytes arrive within the deadline")
        .expect("read");
    buf
}

/// True when nothing at all can be read from `stream` for `wait`.
pub async fn silent_for(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(wait, stream.read(&mut buf))
        .await
        .is_err()
}

/// Polls `check` on the link a -> b until it holds (deadline 60 s).
pub async fn wait_link(emu: &Emulator, what: &str, check: impl Fn(&LinkInfo) -> bool) -> LinkInfo {
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
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
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
