//! Free loopback ports. A port is released as soon as it is picked, so the OS may offer it
//! again: the invariant is that no port is handed out twice in one process, whichever kind
//! (TCP or UDP) asked for it.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Mutex;

/// Every port handed out so far in this process.
static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

const TRIES: usize = 1000;

fn unused_port(pick: impl Fn() -> std::io::Result<u16>) -> u16 {
    for _ in 0..TRIES {
        let port = pick().expect("bind a free loopback port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no unused loopback port after {TRIES} tries");
}

/// A loopback TCP port that was free a moment ago (for a node's HTTP API).
pub fn free_tcp_port() -> u16 {
    unused_port(|| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    })
}

/// A loopback UDP port that was free a moment ago (for a peer address or a link's `via`).
pub fn free_udp_port() -> u16 {
    unused_port(|| {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
    })
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
