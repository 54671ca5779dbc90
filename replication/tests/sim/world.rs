//! The simulated world: replicas with in-memory stores, links running the real protocol core,
//! a lossy network and a fault schedule, all driven by one virtual clock from one seed.
//!
//! See the crate documentation in `tests/sim.rs` for what is modelled and what is not.
//!
//! This file holds the world's state and its event loop; the rest is split by concern:
//! `config` (constants, the seed's configuration, the policy), `replica` (a replica's store,
//! documents and clock), `links` (network, resets, both ends of the protocol), `apply` (a
//! received batch, crashes), `workload` (local writes) and `check` (quiescence, final checks,
//! digest).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::ops::Bound;

use automerge::ActorId;
use meridian_replication::backoff::Backoff;
use meridian_replication::protocol::{
    ChangeSource, Frontier, Inbound, LogEntry, Outbound, StreamLimits, check_hello, plan_batch,
};
use meridian_replication::version::ntp64_from_ms;
use meridian_replication::wire::{FrontierEntry, Message, PROTOCOL_VERSION, WireChange};
use meridian_replication::{RecordDoc, RecordError, RecordView, Version};
use meridian_residency::{Foreign, Policy, RuleSpec};
use serde_json::{Map, Value as Json, json};

use crate::rng::Rng;

#[path = "world/apply.rs"]
mod apply;
#[path = "world/check.rs"]
mod check;
#[path = "world/config.rs"]
mod config;
#[path = "world/links.rs"]
mod links;
#[path = "world/replica.rs"]
mod replica;
#[path = "world/workload.rs"]
mod workload;

pub use config::*;
pub use replica::{Pending, Replica, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubState {
    /// Not connected; a reconnect is scheduled.
    Down,
    /// `Hello` sent at this time, the sender's `Hello` not yet received.
    Hello(u64),
    Up,
}

/// One connection from subscriber `sub` to sender `snd`. Both ends share one epoch: a reset
/// by either end closes the connection for both, and anything still on the wire from an older
/// epoch is dropped on arrival (a closed QUIC connection delivers nothing more).
pub struct Link {
    pub sub: usize,
    pub snd: usize,
    epoch: u64,
    state: SubState,
    inbound: Inbound,
    out: Option<Outbound>,
    /// Since when the oldest unacknowledged batch has been waiting (or the last ack).
    waiting_since: u64,
    /// When the subscriber last dialled: how long the attempt lasted when the link resets.
    dialled_at: u64,
    backoff: Backoff,
}

enum Event {
    Deliver {
        link: usize,
        epoch: u64,
        to_sender: bool,
        bytes: Vec<u8>,
    },
    Op,
    Tick,
    IdleTick,
    Reconnect {
        link: usize,
        epoch: u64,
    },
    PartitionStart {
        cut: Vec<(usize, usize)>,
        duration_ms: u64,
    },
    PartitionEnd {
        cut: Vec<(usize, usize)>,
    },
    Crash(usize),
    DriftStart,
    DriftEnd,
    EndWorkload,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub ops_ok: u64,
    pub ops_refused: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub cut: u64,
    pub stale: u64,
    pub batches: u64,
    pub changes_accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub held_for_drift: u64,
    pub waiting: u64,
    pub resets: BTreeMap<&'static str, u64>,
    pub crashes: u64,
    pub partitions: u64,
    pub settle_ms: u64,
}

/// What one run produced.
pub struct Outcome {
    pub seed: u64,
    pub config: Config,
    pub stats: Stats,
    pub digest: String,
    pub failures: Vec<String>,
}

/// A local operation of the workload.
#[derive(Clone, Debug)]
pub enum Op {
    Put(Map<String, Json>),
    Patch(Map<String, Json>),
    Incr(i64),
    Delete,
}

pub struct World {
    pub cfg: Config,
    pub policy: Policy,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    in_transit: usize,
    net: Rng,
    work: Rng,
    fault: Rng,
    pub reps: Vec<Replica>,
    pub links: Vec<Link>,
    /// Directed pairs (from, to) currently cut by partitions, with a count of partitions.
    cut: BTreeMap<(usize, usize), u32>,
    /// Latest scheduled delivery per (link, direction), to keep in-order messages in order.
    last_delivery: Vec<u64>,
    faults_on: bool,
    workload_on: bool,
    pub expected_counters: BTreeMap<String, i64>,
    pub stats: Stats,
    pub violations: Vec<String>,
    /// `SIM_TRACE=1`: print every step (use with `SIM_SEED`).
    trace: bool,
    /// `class_of` for the workload's keys, computed once (glob matching is the slow part of
    /// the per-batch contiguity check).
    classes: BTreeMap<&'static str, String>,
}

impl World {
    pub fn new(cfg: Config) -> World {
        let policy = sim_policy(cfg.replicas);
        let mut root = Rng::new(cfg.seed);
        let nodes: Vec<String> = (0..cfg.replicas).map(|i| format!("n{i}")).collect();
        let reps = (0..cfg.replicas)
            .map(|i| Replica {
                idx: i,
                node: nodes[i].clone(),
                region: REGIONS[i].to_string(),
                incarnation: 0,
                base_offset_ms: cfg.offsets_ms[i],
                offset_ms: cfg.offsets_ms[i],
                last: 0,
                store: Store {
                    nodes: nodes.clone(),
                    ..Store::default()
                },
                docs: BTreeMap::new(),
                pending: BTreeMap::new(),
            })
            .collect();
        let mut links = Vec::new();
        for sub in 0..cfg.replicas {
            for snd in 0..cfg.replicas {
                if sub != snd {
                    links.push(Link {
                        sub,
                        snd,
                        epoch: 0,
                        state: SubState::Down,
                        inbound: Inbound::default(),
                        out: None,
                        waiting_since: 0,
                        dialled_at: 0,
                        backoff: Backoff::new(),
                    });
                }
            }
        }
        let n_links = links.len();
        let classes = GLOBAL_KEYS
            .iter()
            .chain(&COUNTER_KEYS)
            .chain(&P_KEYS)
            .chain(&Q_KEYS)
            .map(|k| (*k, policy.class_of(k).to_string()))
            .collect();
        World {
            classes,
            policy,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            in_transit: 0,
            net: root.fork(),
            work: root.fork(),
            fault: root.fork(),
            reps,
            links,
            cut: BTreeMap::new(),
            last_delivery: vec![0; n_links * 2],
            faults_on: true,
            workload_on: true,
            expected_counters: BTreeMap::new(),
            stats: Stats::default(),
            violations: Vec::new(),
            trace: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
            cfg,
        }
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!("{:>7} {}", self.now, what());
        }
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    /// Run the whole scenario: workload with faults, then heal and settle, then check.
    pub fn run(mut self) -> Outcome {
        self.schedule_scenario();
        let deadline = self.cfg.workload_ms + SETTLE_LIMIT_MS;
        let mut quiescent = false;
        while let Some(((at, _), ev)) = self.queue.pop_first() {
            self.now = at;
            if self.now > deadline {
                break;
            }
            let idle = matches!(ev, Event::IdleTick);
            if let Err(e) = self.handle(ev) {
                self.violations.push(format!("t={}ms: {e}", self.now));
                break;
            }
            if idle && !self.workload_on && self.is_quiescent() {
                quiescent = true;
                break;
            }
        }
        self.stats.settle_ms = self.now.saturating_sub(self.cfg.workload_ms);
        let mut failures = std::mem::take(&mut self.violations);
        if !quiescent && failures.is_empty() {
            failures.push(format!(
                "not quiescent {SETTLE_LIMIT_MS} ms after the workload ended: {}",
                self.unquiet_reasons().join("; ")
            ));
        }
        failures.extend(self.check());
        Outcome {
            seed: self.cfg.seed,
            digest: self.digest(),
            stats: self.stats.clone(),
            config: self.cfg.clone(),
            failures,
        }
    }

    fn schedule_scenario(&mut self) {
        let w = self.cfg.workload_ms;
        for _ in 0..self.cfg.ops {
            let at = self.work.range(0, w - 1);
            self.schedule(at, Event::Op);
        }
        for link in 0..self.links.len() {
            let at = self.net.range(0, 50);
            self.schedule(at, Event::Reconnect { link, epoch: 0 });
        }
        self.schedule(0, Event::Tick);
        self.schedule(0, Event::IdleTick);
        let n = self.cfg.replicas;
        for _ in 0..self.cfg.partitions {
            let at = self.fault.range(0, w - 1);
            let duration_ms = match self.fault.below(3) {
                0 => self.fault.range(100, 1_500),
                // Longer than the idle timeout: in-flight batches time out and links reset.
                1 => self.fault.range(IDLE_TIMEOUT_MS, 5_000),
                _ => self.fault.range(5_000, 12_000),
            };
            let mut cut = Vec::new();
            match self.fault.below(4) {
                0 => {
                    // Isolate one replica, both directions.
                    let r = self.fault.index(n);
                    for o in (0..n).filter(|&o| o != r) {
                        cut.push((r, o));
                        cut.push((o, r));
                    }
                }
                1 => {
                    // Split into two groups.
                    let mask = self.fault.range(1, (1 << n) - 2);
                    for a in 0..n {
                        for b in 0..n {
                            if (mask >> a) & 1 != (mask >> b) & 1 {
                                cut.push((a, b));
                            }
                        }
                    }
                }
                2 => {
                    // One direction of one pair.
                    let a = self.fault.index(n);
                    let b = (a + 1 + self.fault.index(n - 1)) % n;
                    cut.push((a, b));
                }
                _ => {
                    // A replica that can send but not receive.
                    let r = self.fault.index(n);
                    for o in (0..n).filter(|&o| o != r) {
                        cut.push((o, r));
                    }
                }
            }
            self.schedule(at, Event::PartitionStart { cut, duration_ms });
        }
        for _ in 0..self.cfg.crashes {
            let at = self.fault.range(0, w - 1);
            let r = self.fault.index(n);
            self.schedule(at, Event::Crash(r));
        }
        if let Some(d) = &self.cfg.drift {
            let (from, to) = (d.from_ms, d.to_ms);
            self.schedule(from, Event::DriftStart);
            self.schedule(to, Event::DriftEnd);
        }
        self.schedule(w, Event::EndWorkload);
    }

    fn handle(&mut self, ev: Event) -> Result<(), String> {
        match ev {
            Event::Deliver {
                link,
                epoch,
                to_sender,
                bytes,
            } => {
                self.in_transit -= 1;
                self.deliver(link, epoch, to_sender, &bytes)?;
            }
            Event::Op => {
                if self.workload_on {
                    self.random_op()?;
                }
            }
            Event::Tick => {
                self.tick()?;
                self.schedule(self.now + TICK_MS, Event::Tick);
            }
            Event::IdleTick => {
                for link in 0..self.links.len() {
                    self.pump(link);
                }
                self.schedule(self.now + IDLE_TICK_MS, Event::IdleTick);
            }
            Event::Reconnect { link, epoch } => {
                let l = &mut self.links[link];
                if l.epoch == epoch && l.state == SubState::Down {
                    l.state = SubState::Hello(self.now);
                    l.dialled_at = self.now;
                    let (sub, snd) = (l.sub, l.snd);
                    self.trace(|| format!("dial {snd}→{sub} e{epoch}"));
                    let l = &mut self.links[link];
                    l.inbound = Inbound::default();
                    let sub = &self.reps[l.sub];
                    let hello = Message::Hello {
                        protocol: PROTOCOL_VERSION,
                        cluster: CLUSTER.into(),
                        node: sub.node.clone(),
                        region: sub.region.clone(),
                        frontier: sub.store.frontier.entries(),
                        clock_ntp64: sub.clock(self.now),
                    };
                    self.send(link, true, &hello);
                }
            }
            Event::PartitionStart { cut, duration_ms } => {
                if self.faults_on {
                    self.trace(|| format!("partition {cut:?} for {duration_ms}ms"));
                    self.stats.partitions += 1;
                    for p in &cut {
                        *self.cut.entry(*p).or_insert(0) += 1;
                    }
                    self.schedule(self.now + duration_ms, Event::PartitionEnd { cut });
                }
            }
            Event::PartitionEnd { cut } => {
                self.trace(|| format!("partition {cut:?} ends"));
                for p in &cut {
                    if let Some(n) = self.cut.get_mut(p) {
                        *n -= 1;
                        if *n == 0 {
                            self.cut.remove(p);
                        }
                    }
                }
            }
            Event::Crash(r) => {
                if self.faults_on {
                    self.crash(r)?;
                }
            }
            Event::DriftStart => {
                if let Some(d) = &self.cfg.drift {
                    self.reps[d.replica].offset_ms = d.offset_ms;
                }
            }
            Event::DriftEnd => {
                if let Some(d) = &self.cfg.drift {
                    let r = &mut self.reps[d.replica];
                    r.offset_ms = r.base_offset_ms;
                }
            }
            Event::EndWorkload => {
                // Stop writing, heal every partition, stop loss, duplication and reordering.
                // (Delays stay.)
                self.workload_on = false;
                self.faults_on = false;
                self.cut.clear();
                if let Some(d) = &self.cfg.drift {
                    let r = &mut self.reps[d.replica];
                    r.offset_ms = r.base_offset_ms;
                }
            }
        }
        Ok(())
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn set_now(&mut self, now: u64) {
        self.now = now;
    }
}

/// Run one seed; panics inside the run are turned into failures that name the seed.
pub fn run_seed(seed: u64) -> Outcome {
    let cfg = Config::from_seed(seed);
    let cfg2 = cfg.clone();
    match std::panic::catch_unwind(move || World::new(cfg).run()) {
        Ok(o) => o,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".to_string());
            Outcome {
                seed,
                config: cfg2,
                stats: Stats::default(),
                digest: String::new(),
                failures: vec![format!("panicked: {msg}")],
            }
        }
    }
}
