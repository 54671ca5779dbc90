//! The one test harness of Meridian's process-level tests: node tests (`node/tests`), the
//! whole-system suites (`tests/`) and, later, the benchmarks drive real `meridian` processes
//! through it.
//!
//! Invariant: the harness never links the node. It starts the `meridian` binary, writes
//! topology files as text and talks HTTP or replication frames to what it started, so a test
//! sees the node exactly as an operator or a peer does.
//!
//! # Layout
//! - ports: free loopback TCP and UDP ports, never handed out twice in one process;
//! - binary: where the `meridian` binary is, running its commands (`certs`, `dump`, `residency
//!   audit`);
//! - process: [`NodeProcess`], one `meridian serve` child, and [`Serve`] to configure it;
//! - poll: [`poll_until`] and readiness waits, always with a deadline;
//! - topology: [`TopologyText`], the topology file written section by section;
//! - [`fixture`]: the two-region topologies the node tests share;
//! - http: [`ApiClient`], the node's HTTP API answered as `(status, JSON)`;
//! - metrics: [`metric`], one value out of Prometheus text;
//! - [`frame`] and peer: replication frames and the Hello a fake peer sends;
//! - disk: [`SmallDisk`] (a tmpfs that really fills up) and [`flip_every`] (a damaged file);
//! - text: [`assert_contains`].

mod binary;
mod disk;
pub mod fixture;
pub mod frame;
mod http;
mod metrics;
mod peer;
mod poll;
mod ports;
mod process;
mod text;
mod topology;

pub use binary::{
    BuildError, CliRun, assert_valid_topology, dumped_keys, meridian_bin, meridian_bin_in,
    residency_audit, run_meridian, write_certs,
};
pub use disk::{SmallDisk, flip_every};
pub use http::ApiClient;
pub use metrics::metric;
pub use peer::hello;
pub use poll::{DEADLINE, poll_every, poll_until, wait_ready};
pub use ports::{free_tcp_port, free_udp_port, loopback};
pub use process::{NodeProcess, Serve, Signal, send_signal};
pub use text::assert_contains;
pub use topology::{Residency, TopologyText};
