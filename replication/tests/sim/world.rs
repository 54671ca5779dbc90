//! The simulated world: replicas with in-memory stores, links running the real protocol core,
//! a lossy network and a fault schedule, all driven by one virtual clock from one seed.
//!
//! See the crate documentation in `tests/sim.rs` for what is modelled and what is not.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::ops::Bound;

use automerge::ActorId;
use meridian_replication::core::{
    ChangeSource, Frontier, Inbound, LogEntry, Outbound, StreamLimits, check_hello, class_of,
    plan_batch,
};
use meridian_replication::version::ntp64_from_ms;
use meridian_replication::wire::{FrontierEntry, Message, PROTOCOL_VERSION, WireChange};
use meridian_replication::{RecordDoc, RecordError, RecordView, Version};
use meridian_residency::{Foreign, Policy, RuleSpec};
use serde_json::{Map, Value as Json, json};

use crate::rng::Rng;

pub const CLUSTER: &str = "sim";
/// Virtual time starts here (Unix milliseconds), so HLC stamps look like real NTP64 times.
const BASE_UNIX_MS: u64 = 1_700_000_000_000;
/// The receiver's maximum tolerated clock drift.
pub const MAX_DRIFT_MS: u64 = 500;
/// A link with unacknowledged batches (or an unanswered `Hello`) and no progress for this
/// long is reset.
pub const IDLE_TIMEOUT_MS: u64 = 2_000;
/// Timeouts and drift-held retries are checked this often.
const TICK_MS: u64 = 100;
/// Every sender polls every link this often even without a commit (the node's `IDLE_TICK`).
const IDLE_TICK_MS: u64 = 500;
/// One-way message delay: uniform in this range.
const DELAY_MS: (u64, u64) = (1, 200);
const BACKOFF_MIN_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 5_000;
/// After the workload ends and the faults are healed, the run must be quiescent within this.
const SETTLE_LIMIT_MS: u64 = 180_000;

pub const REGIONS: [&str; 4] = ["eu", "us", "ap", "sa"];
pub const GLOBAL_KEYS: [&str; 6] = ["g/0", "g/1", "g/2", "g/3", "g/4", "g/5"];
/// Only ever incremented (field "n"), never put, patched or deleted: the expected total is
/// exact.
pub const COUNTER_KEYS: [&str; 3] = ["g/c0", "g/c1", "g/c2"];
/// Pinned by rule "p": home region of replica 0, no replicas.
pub const P_KEYS: [&str; 4] = ["p/0", "p/1", "p/2", "p/3"];
/// Pinned by rule "q": home region of replica 1, replicas: region of replica 2 (and of
/// replica 3 when there are four).
pub const Q_KEYS: [&str; 4] = ["q/0", "q/1", "q/2", "q/3"];
pub const COUNTER_FIELD: &str = "n";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Drift {
    pub replica: usize,
    pub from_ms: u64,
    pub to_ms: u64,
    pub offset_ms: i64,
}

/// Everything a run depends on, derived from the seed.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub replicas: usize,
    /// Local writes attempted during the workload.
    pub ops: usize,
    pub workload_ms: u64,
    /// Per-mille probability that a message is lost / duplicated while faults are on.
    pub loss_pm: u64,
    pub dup_pm: u64,
    /// Per-mille probability that a message may overtake earlier ones on the same link
    /// direction while faults are on (otherwise it is delivered in order).
    pub reorder_pm: u64,
    pub limits: StreamLimits,
    pub partitions: usize,
    pub crashes: usize,
    /// Per-replica clock offsets (within the drift bound).
    pub offsets_ms: Vec<i64>,
    /// One replica's clock jumps beyond the drift bound for a while.
    pub drift: Option<Drift>,
}

impl Config {
    pub fn from_seed(seed: u64) -> Config {
        let mut r = Rng::new(seed ^ 0x6d65_7269_6469_616e);
        let replicas = 3 + r.index(2);
        let ops = r.range(60, 120) as usize;
        let workload_ms = r.range(5_000, 15_000);
        let loss_pm = r.range(0, 100);
        let dup_pm = r.range(0, 40);
        let reorder_pm = [0, 0, 10, 50, 200][r.index(5)];
        let limits = StreamLimits {
            window: r.range(1, 4) as usize,
            batch_changes: r.range(1, 16) as usize,
            batch_bytes: if r.chance(250) {
                r.range(200, 3_000) as usize
            } else {
                4 << 20
            },
        };
        let partitions = r.index(7);
        let crashes = r.index(4);
        let offsets_ms = (0..replicas)
            .map(|_| r.range(0, 200) as i64 - 100)
            .collect();
        let drift = if r.chance(350) {
            let from_ms = r.range(0, workload_ms / 2);
            let to_ms = (from_ms + r.range(2_000, 8_000)).min(workload_ms.saturating_sub(500));
            Some(Drift {
                replica: r.index(replicas),
                from_ms,
                to_ms,
                offset_ms: r.range(1_000, 3_000) as i64,
            })
        } else {
            None
        };
        Config {
            seed,
            replicas,
            ops,
            workload_ms,
            loss_pm,
            dup_pm,
            reorder_pm,
            limits,
            partitions,
            crashes,
            offsets_ms,
            drift,
        }
    }
}

/// The policy of the simulation: `p/*` lives only in replica 0's region; `q/*` lives in
/// replica 1's region with a copy in replica 2's (and replica 3's, when there are four, so
/// that a pinned class is also relayed through a third holder). Everything else is global.
pub fn sim_policy(replicas: usize) -> Policy {
    let regions: Vec<String> = REGIONS[..replicas].iter().map(|s| s.to_string()).collect();
    let mut q_replicas = vec![regions[2].clone()];
    if replicas > 3 {
        q_replicas.push(regions[3].clone());
    }
    let rules = vec![
        RuleSpec {
            name: "p".into(),
            keys: "p/*".into(),
            home: regions[0].clone(),
            replicas: vec![],
            foreign: Foreign::Reject,
        },
        RuleSpec {
            name: "q".into(),
            keys: "q/*".into(),
            home: regions[1].clone(),
            replicas: q_replicas,
            foreign: Foreign::Reject,
        },
    ];
    match Policy::new(rules, &regions) {
        Ok(p) => p,
        Err(problems) => panic!("the simulation's policy is invalid: {problems:?}"),
    }
}

/// Classes a region may hold: `""` and every rule that lets it hold records.
pub fn holdable_classes(policy: &Policy, region: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    out.extend(
        policy
            .rules()
            .iter()
            .filter(|r| r.may_hold(region))
            .map(|r| r.name().to_string()),
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

/// A replica's durable change logs and frontier, as the core's [`ChangeSource`].
///
/// Everything a replica does is one atomic step of the simulation, so its own safe point is
/// simply its newest stamp: its own frontier for every class it may hold is raised with each
/// local write.
#[derive(Default)]
pub struct Store {
    /// Every node of the topology (what the node's `origins()` returns too).
    pub nodes: Vec<String>,
    pub logs: BTreeMap<String, BTreeMap<u64, LogEntry>>,
    pub frontier: Frontier,
}

impl ChangeSource for Store {
    type Error = Infallible;

    fn origins(&self) -> Vec<String> {
        self.nodes.clone()
    }

    fn read_after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, Infallible> {
        Ok(self
            .logs
            .get(origin)
            .map(|log| {
                log.range((Bound::Excluded(after), Bound::Unbounded))
                    .take(limit)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn frontier(&self, origin: &str, class: &str) -> u64 {
        self.frontier.get(origin, class)
    }
}

/// A received change kept aside: waiting for changes it depends on, or held for drift.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Held for drift (else waiting for its dependencies).
    pub held: bool,
    pub origin: String,
    pub hlc: u64,
    pub change: Vec<u8>,
}

pub struct Replica {
    pub idx: usize,
    pub node: String,
    pub region: String,
    /// Bumped at every simulated crash: actor ids are never reused.
    pub incarnation: u8,
    pub base_offset_ms: i64,
    pub offset_ms: i64,
    /// The HLC: the newest stamp issued or observed.
    pub last: u64,
    pub store: Store,
    pub docs: BTreeMap<String, RecordDoc>,
    pub pending: BTreeMap<String, Vec<Pending>>,
}

impl Replica {
    pub fn actor(&self) -> ActorId {
        let mut bytes = vec![0x5a; 16];
        bytes[0] = self.idx as u8;
        bytes[1] = self.incarnation;
        ActorId::from(bytes)
    }

    /// This replica's physical clock, as NTP64.
    pub fn clock(&self, now_ms: u64) -> u64 {
        let ms = (BASE_UNIX_MS + now_ms) as i64 + self.offset_ms;
        ntp64_from_ms(ms as u64)
    }

    fn stamp(&self, now_ms: u64) -> Version {
        Version {
            time_ntp64: self.clock(now_ms).max(self.last + 1),
            node_hlc_id: self.idx as u64 + 1,
        }
    }

    /// Offer a key's kept-aside changes to its document, as the node's engine does: every one
    /// waiting for its dependencies, and every one held for drift that is now within the
    /// horizon. Returns how many (still) wait for their dependencies.
    fn settle(&mut self, key: &str, now_ntp: u64) -> Result<usize, String> {
        let Some(list) = self.pending.remove(key) else {
            return Ok(0);
        };
        let mut waiting = 0;
        let horizon = now_ntp.saturating_add(ntp64_from_ms(MAX_DRIFT_MS));
        let (mut keep, ready): (Vec<Pending>, Vec<Pending>) =
            list.into_iter().partition(|p| p.held && p.hlc > horizon);
        if !ready.is_empty() {
            let actor = self.actor();
            let doc = match self.docs.entry(key.to_string()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(RecordDoc::new(actor).map_err(|e| format!("RecordDoc::new: {e}"))?)
                }
            };
            let offer: Vec<Vec<u8>> = ready.iter().map(|p| p.change.clone()).collect();
            let r = doc
                .apply_tracked(&offer)
                .map_err(|e| format!("{}: apply_tracked({key}) failed: {e}", self.node))?;
            if !r.undecodable.is_empty() {
                return Err(format!(
                    "{}: undecodable changes for {key}: {:?}",
                    self.node, r.undecodable
                ));
            }
            for &i in &r.applied {
                // Observe the remote stamp (uhlc's update_with_timestamp).
                self.last = self.last.max(ready[i].hlc);
            }
            waiting = r.waiting.len();
            for &i in &r.waiting {
                keep.push(Pending {
                    held: false,
                    ..ready[i].clone()
                });
            }
        }
        if !keep.is_empty() {
            self.pending.insert(key.to_string(), keep);
        }
        Ok(waiting)
    }
}

// ---------------------------------------------------------------------------------------------
// Links and events
// ---------------------------------------------------------------------------------------------

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
    failures: u32,
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
                        failures: 0,
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
            .map(|k| (*k, class_of(&policy, k).to_string()))
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

    fn is_cut(&self, from: usize, to: usize) -> bool {
        self.cut.contains_key(&(from, to))
    }

    /// Put a message on the wire (encoded, so the codec is exercised too).
    fn send(&mut self, link: usize, to_sender: bool, msg: &Message) {
        let l = &self.links[link];
        let (from, to) = if to_sender {
            (l.sub, l.snd)
        } else {
            (l.snd, l.sub)
        };
        let epoch = l.epoch;
        self.stats.messages += 1;
        self.trace(|| format!("send {from}→{to} e{epoch} {}", summary(msg)));
        if self.is_cut(from, to) {
            self.stats.cut += 1;
            self.trace(|| "  (cut)".into());
            return;
        }
        if self.faults_on && self.net.chance(self.cfg.loss_pm) {
            self.stats.lost += 1;
            self.trace(|| "  (lost)".into());
            return;
        }
        let copies = if self.faults_on && self.net.chance(self.cfg.dup_pm) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let bytes = msg.encode();
        for _ in 0..copies {
            let mut at = self.now + self.net.range(DELAY_MS.0, DELAY_MS.1);
            let slot = link * 2 + usize::from(to_sender);
            if !(self.faults_on && self.net.chance(self.cfg.reorder_pm)) {
                at = at.max(self.last_delivery[slot]);
            }
            self.last_delivery[slot] = self.last_delivery[slot].max(at);
            self.in_transit += 1;
            self.schedule(
                at,
                Event::Deliver {
                    link,
                    epoch,
                    to_sender,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    fn reset(&mut self, link: usize, reason: &'static str) {
        *self.stats.resets.entry(reason).or_insert(0) += 1;
        self.trace(|| {
            let l = &self.links[link];
            format!("reset link {}→{} e{}: {reason}", l.snd, l.sub, l.epoch)
        });
        let l = &mut self.links[link];
        l.epoch += 1;
        l.state = SubState::Down;
        l.out = None;
        l.inbound = Inbound::default();
        l.failures += 1;
        let epoch = l.epoch;
        let ceiling = (BACKOFF_MIN_MS << l.failures.min(6)).min(BACKOFF_MAX_MS);
        let wait = ceiling / 2 + self.net.range(0, ceiling / 2);
        self.schedule(self.now + wait, Event::Reconnect { link, epoch });
    }

    fn deliver(
        &mut self,
        link: usize,
        epoch: u64,
        to_sender: bool,
        bytes: &[u8],
    ) -> Result<(), String> {
        let l = &self.links[link];
        if l.epoch != epoch {
            self.stats.stale += 1;
            return Ok(());
        }
        let (from, to) = if to_sender {
            (l.sub, l.snd)
        } else {
            (l.snd, l.sub)
        };
        if self.is_cut(from, to) {
            self.stats.cut += 1;
            return Ok(());
        }
        let msg = Message::decode(bytes).map_err(|e| format!("a message failed to decode: {e}"))?;
        self.trace(|| format!("recv {from}→{to} e{epoch} {}", summary(&msg)));
        if to_sender {
            self.at_sender(link, msg);
            Ok(())
        } else {
            self.at_subscriber(link, msg)
        }
    }

    fn at_sender(&mut self, link: usize, msg: Message) {
        let (sub, snd) = (self.links[link].sub, self.links[link].snd);
        match &msg {
            Message::Hello { .. } => {
                if self.links[link].out.is_some() {
                    return self.reset(link, "second hello");
                }
                let stated = match check_hello(&msg, CLUSTER, &self.reps[sub].node) {
                    Ok(f) => f,
                    Err(_) => return self.reset(link, "bad hello"),
                };
                let out = Outbound::new(
                    &self.policy,
                    &self.reps[snd].region,
                    &self.reps[sub].node,
                    &self.reps[sub].region,
                    &stated,
                    self.cfg.limits,
                );
                self.links[link].out = Some(out);
                let me = &self.reps[snd];
                let hello = Message::Hello {
                    protocol: PROTOCOL_VERSION,
                    cluster: CLUSTER.into(),
                    node: me.node.clone(),
                    region: me.region.clone(),
                    frontier: Vec::new(),
                };
                self.send(link, false, &hello);
                self.pump(link);
            }
            Message::Ack { seq } => {
                let Some(out) = self.links[link].out.as_mut() else {
                    return self.reset(link, "ack before hello");
                };
                if out.on_ack(*seq).is_err() {
                    return self.reset(link, "unexpected ack");
                }
                let l = &mut self.links[link];
                l.waiting_since = self.now;
                l.failures = 0;
                self.pump(link);
            }
            // A batch, a close, or anything else: not what a subscriber sends on this stream.
            _ => self.reset(link, "unexpected message"),
        }
    }

    fn at_subscriber(&mut self, link: usize, msg: Message) -> Result<(), String> {
        let (sub, snd) = (self.links[link].sub, self.links[link].snd);
        match msg {
            Message::Hello { .. } => {
                if !matches!(self.links[link].state, SubState::Hello(_)) {
                    self.reset(link, "second hello");
                    return Ok(());
                }
                if check_hello(&msg, CLUSTER, &self.reps[snd].node).is_err() {
                    self.reset(link, "bad hello");
                    return Ok(());
                }
                self.links[link].state = SubState::Up;
            }
            Message::Batch {
                seq,
                changes,
                progress,
            } => {
                if self.links[link].state != SubState::Up {
                    self.reset(link, "batch before hello");
                    return Ok(());
                }
                if self.links[link].inbound.accept(seq).is_err() {
                    self.reset(link, "batch out of order");
                    return Ok(());
                }
                self.stats.batches += 1;
                let context = format!("batch {seq} on link {}→{}", snd, sub);
                self.apply_batch(sub, changes, &progress, &context)?;
                self.send(link, true, &Message::Ack { seq });
                // The subscriber's store changed: its own outbound links may have news.
                self.pump_from(sub);
            }
            // An ack, a close, or anything else: not what a sender sends on this stream.
            _ => self.reset(link, "unexpected message"),
        }
        Ok(())
    }

    /// Fill a link's window: what a sender does after a commit, an ack, or its idle tick.
    /// Returns how many batches were sent.
    fn pump(&mut self, link: usize) -> usize {
        let l = &mut self.links[link];
        let Some(out) = l.out.as_mut() else {
            return 0;
        };
        let source = &self.reps[l.snd].store;
        let mut batches = Vec::new();
        loop {
            let was_idle = out.in_flight() == 0;
            let polled = match out.poll_batch(source, &self.policy) {
                Ok(p) => p,
                Err(never) => match never {},
            };
            match polled {
                Some(batch) => {
                    if was_idle {
                        l.waiting_since = self.now;
                    }
                    batches.push(batch);
                }
                None => break,
            }
        }
        let n = batches.len();
        for b in batches {
            self.send(link, false, &b);
        }
        n
    }

    fn pump_from(&mut self, sender: usize) {
        for link in 0..self.links.len() {
            if self.links[link].snd == sender {
                self.pump(link);
            }
        }
    }

    fn tick(&mut self) -> Result<(), String> {
        for link in 0..self.links.len() {
            let l = &self.links[link];
            match l.state {
                SubState::Hello(since) if self.now - since > IDLE_TIMEOUT_MS => {
                    self.reset(link, "hello timeout");
                    continue;
                }
                _ => {}
            }
            if let Some(out) = &l.out
                && out.in_flight() > 0
                && self.now - l.waiting_since > IDLE_TIMEOUT_MS
            {
                self.reset(link, "ack timeout");
            }
        }
        // Changes held for drift become due as the local clock catches up.
        for r in 0..self.reps.len() {
            let now_ntp = self.reps[r].clock(self.now);
            let horizon = now_ntp + ntp64_from_ms(MAX_DRIFT_MS);
            // Only keys with a change that became due: offering changes that merely wait for
            // their dependencies again would change nothing.
            let due: Vec<String> = self.reps[r]
                .pending
                .iter()
                .filter(|(_, list)| list.iter().any(|p| p.held && p.hlc <= horizon))
                .map(|(k, _)| k.clone())
                .collect();
            for key in due {
                self.reps[r].settle(&key, now_ntp)?;
            }
        }
        Ok(())
    }

    /// Apply a received batch at replica `sub` exactly as a node would: plan, store log
    /// entries, offer changes to documents, keep the rest aside, raise the frontier.
    pub fn apply_batch(
        &mut self,
        sub: usize,
        changes: Vec<WireChange>,
        progress: &[FrontierEntry],
        context: &str,
    ) -> Result<(), String> {
        let now_ntp = self.reps[sub].clock(self.now);
        let plan = {
            let rep = &self.reps[sub];
            let f = &rep.store.frontier;
            plan_batch(
                changes,
                progress,
                &|o, c| f.get(o, c),
                &self.policy,
                &rep.region,
                now_ntp,
                ntp64_from_ms(MAX_DRIFT_MS),
            )
        };
        self.trace(|| {
            format!(
                "  {} plan: accepted {:?} dup {} refused {} frontier {:?}",
                self.reps[sub].node,
                plan.by_key
                    .values()
                    .flatten()
                    .map(|a| format!(
                        "{}@{:x}{}",
                        a.origin,
                        a.hlc,
                        if a.held_for_drift { "(held)" } else { "" }
                    ))
                    .collect::<Vec<_>>(),
                plan.duplicates,
                plan.refused.len(),
                plan.frontier
                    .iter()
                    .map(|e| format!("{}/{:?}={:x}", e.origin, e.class, e.hlc))
                    .collect::<Vec<_>>()
            )
        });
        self.stats.refused += plan.refused.len() as u64;
        self.stats.duplicates += plan.duplicates as u64;
        self.stats.held_for_drift += plan.held_for_drift as u64;
        // Refusals are counted; `check` fails the run if any happened (senders filter).
        let rep = &mut self.reps[sub];
        for (key, accepted) in plan.by_key {
            for a in accepted {
                self.stats.changes_accepted += 1;
                let log = rep.store.logs.entry(a.origin.clone()).or_default();
                if let Some(prev) = log.get(&a.hlc) {
                    self.violations.push(format!(
                        "t={}ms {context}: {} accepted ({}, {:x}) for {key} above its frontier, \
                         but its log already holds {}that entry",
                        self.now,
                        rep.node,
                        a.origin,
                        a.hlc,
                        if prev.change == a.change && prev.key == a.key {
                            ""
                        } else {
                            "a DIFFERENT change under "
                        }
                    ));
                }
                log.insert(
                    a.hlc,
                    LogEntry {
                        hlc: a.hlc,
                        key: key.clone(),
                        change: a.change.clone(),
                    },
                );
                rep.pending.entry(key.clone()).or_default().push(Pending {
                    held: a.held_for_drift,
                    origin: a.origin,
                    hlc: a.hlc,
                    change: a.change,
                });
            }
            self.stats.waiting += rep.settle(&key, now_ntp)? as u64;
        }
        for e in &plan.frontier {
            rep.store.frontier.raise(&e.origin, &e.class, e.hlc);
        }
        for e in &plan.frontier {
            if let Err(v) = self.check_contiguous(sub, &e.origin, &e.class) {
                self.violations
                    .push(format!("t={}ms {context}: {v}", self.now));
            }
        }
        Ok(())
    }

    fn class<'a>(&'a self, key: &str) -> &'a str {
        match self.classes.get(key) {
            Some(c) => c,
            None => class_of(&self.policy, key),
        }
    }

    fn origin_index(&self, origin: &str) -> Option<usize> {
        self.reps.iter().position(|r| r.node == origin)
    }

    /// The contiguity invariant: replica `r`'s frontier for (origin, class) says it holds
    /// every such change up to it — compare with the origin's own log, the ground truth.
    fn check_contiguous(&self, r: usize, origin: &str, class: &str) -> Result<(), String> {
        let Some(o) = self.origin_index(origin) else {
            return Err(format!("frontier entry for unknown origin {origin:?}"));
        };
        let f = self.reps[r].store.frontier.get(origin, class);
        let of = |rep: &Replica| -> BTreeSet<u64> {
            rep.store
                .logs
                .get(origin)
                .map(|log| {
                    log.range(..=f)
                        .filter(|(_, e)| self.class(&e.key) == class)
                        .map(|(h, _)| *h)
                        .collect()
                })
                .unwrap_or_default()
        };
        let want = of(&self.reps[o]);
        let have = of(&self.reps[r]);
        if want != have {
            let missing: Vec<String> = want.difference(&have).map(|h| format!("{h:x}")).collect();
            let extra: Vec<String> = have.difference(&want).map(|h| format!("{h:x}")).collect();
            return Err(format!(
                "contiguity broken: {} has frontier ({origin}, {class:?}) = {f:x} but lacks \
                 {missing:?} of the origin's log (and has {extra:?} the origin lacks)",
                self.reps[r].node
            ));
        }
        Ok(())
    }

    fn crash(&mut self, r: usize) -> Result<(), String> {
        self.stats.crashes += 1;
        self.trace(|| format!("crash n{r}"));
        for link in 0..self.links.len() {
            if self.links[link].sub == r || self.links[link].snd == r {
                self.reset(link, "crash");
            }
        }
        // Restart: documents are reloaded from their saved bytes with a new incarnation's
        // actor; logs, frontier and kept-aside changes are durable and survive as they are.
        let rep = &mut self.reps[r];
        rep.incarnation += 1;
        let actor = rep.actor();
        for (key, doc) in rep.docs.iter_mut() {
            let bytes = doc.save();
            *doc = RecordDoc::load(&bytes, actor.clone())
                .map_err(|e| format!("{} reloading {key} after a crash: {e}", rep.node))?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Workload
    // -----------------------------------------------------------------------------------------

    fn random_op(&mut self) -> Result<(), String> {
        let r = self.work.index(self.reps.len());
        let region = self.reps[r].region.clone();
        let holds = |k: &str| self.policy.may_hold(k, &region);
        let mut menu: Vec<(&[&str], u64)> = vec![(&GLOBAL_KEYS, 40), (&COUNTER_KEYS, 25)];
        if P_KEYS.iter().all(|k| holds(k)) {
            menu.push((&P_KEYS, 15));
        }
        if Q_KEYS.iter().all(|k| holds(k)) {
            menu.push((&Q_KEYS, 20));
        }
        let total: u64 = menu.iter().map(|(_, w)| w).sum();
        let mut pick = self.work.below(total);
        let mut keys: &[&str] = &GLOBAL_KEYS;
        for (ks, w) in &menu {
            if pick < *w {
                keys = ks;
                break;
            }
            pick -= w;
        }
        let key = keys[self.work.index(keys.len())].to_string();
        let op = if COUNTER_KEYS.contains(&key.as_str()) {
            let by = self.work.range(0, 12) as i64 - 3;
            Op::Incr(if by == 0 { 1 } else { by })
        } else {
            match self.work.below(20) {
                0..=7 => Op::Put(random_object(&mut self.work, false)),
                8..=16 => Op::Patch(random_object(&mut self.work, true)),
                _ => Op::Delete,
            }
        };
        self.local_write(r, &key, op)
    }

    /// A local write at replica `r`, as the node's engine does it: stamp, edit, commit the
    /// record and the log entry together, raise the own frontier, notify the senders.
    pub fn local_write(&mut self, r: usize, key: &str, op: Op) -> Result<(), String> {
        let rep = &mut self.reps[r];
        if !self.policy.may_hold(key, &rep.region) {
            return Err(format!(
                "workload bug: {key} written at {}, whose region may not hold it",
                rep.node
            ));
        }
        let stamp = rep.stamp(self.now);
        let actor = rep.actor();
        let doc = match rep.docs.entry(key.to_string()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(RecordDoc::new(actor).map_err(|e| format!("RecordDoc::new: {e}"))?)
            }
        };
        let result = match &op {
            Op::Put(v) => doc.put(v, stamp),
            Op::Patch(v) => doc.patch(v, stamp),
            Op::Incr(by) => doc.incr(COUNTER_FIELD, *by, stamp),
            Op::Delete => doc.delete(stamp),
        };
        let change = match result {
            Ok(c) => c,
            Err(RecordError::NotFound) => {
                self.stats.ops_refused += 1;
                return Ok(());
            }
            Err(e) => {
                return Err(format!(
                    "{}: local {op:?} on {key} failed unexpectedly: {e}",
                    rep.node
                ));
            }
        };
        rep.last = stamp.time_ntp64;
        let node = rep.node.clone();
        rep.store.logs.entry(node.clone()).or_default().insert(
            stamp.time_ntp64,
            LogEntry {
                hlc: stamp.time_ntp64,
                key: key.to_string(),
                change: change.bytes,
            },
        );
        for class in holdable_classes(&self.policy, &rep.region) {
            rep.store.frontier.raise(&node, &class, stamp.time_ntp64);
        }
        if let Op::Incr(by) = op {
            *self.expected_counters.entry(key.to_string()).or_insert(0) += by;
        }
        self.stats.ops_ok += 1;
        self.trace(|| {
            format!(
                "write {} {key} @{:x} {op:?}",
                self.reps[r].node, stamp.time_ntp64
            )
        });
        self.pump_from(r);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Quiescence and checks
    // -----------------------------------------------------------------------------------------

    fn is_quiescent(&self) -> bool {
        self.unquiet_reasons().is_empty()
    }

    fn unquiet_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.in_transit > 0 {
            out.push(format!("{} messages in transit", self.in_transit));
        }
        for l in &self.links {
            match (&l.state, &l.out) {
                (SubState::Up, Some(out_)) if out_.in_flight() == 0 => {}
                (state, out_) => out.push(format!(
                    "link {}→{}: subscriber {:?}, sender {}",
                    l.snd,
                    l.sub,
                    state,
                    match out_ {
                        None => "not streaming".to_string(),
                        Some(o) => format!("{} batches in flight", o.in_flight()),
                    }
                )),
            }
        }
        for rep in &self.reps {
            let n: usize = rep.pending.values().map(Vec::len).sum();
            if n > 0 {
                out.push(format!(
                    "{} keeps {n} changes aside for {:?}",
                    rep.node,
                    rep.pending.keys().collect::<Vec<_>>()
                ));
            }
        }
        out
    }

    fn view_of(&self, r: usize, key: &str) -> Result<Option<RecordView>, String> {
        match self.reps[r].docs.get(key) {
            None => Ok(None),
            Some(d) => d
                .view()
                .map_err(|e| format!("{}: view of {key} failed: {e}", self.reps[r].node)),
        }
    }

    /// The end-of-run checks; every failure is described.
    pub fn check(&mut self) -> Vec<String> {
        let mut f = Vec::new();
        if self.stats.refused > 0 {
            f.push(format!(
                "{} changes were refused for residency: senders must filter them",
                self.stats.refused
            ));
        }
        let mut keys: BTreeSet<String> = BTreeSet::new();
        for rep in &self.reps {
            keys.extend(rep.docs.keys().cloned());
            keys.extend(rep.pending.keys().cloned());
            for log in rep.store.logs.values() {
                keys.extend(log.values().map(|e| e.key.clone()));
            }
        }
        for key in &keys {
            let holders: Vec<usize> = (0..self.reps.len())
                .filter(|&r| self.policy.may_hold(key, &self.reps[r].region))
                .collect();
            // (3) Residency: nothing of the key outside its allowed regions.
            for r in (0..self.reps.len()).filter(|r| !holders.contains(r)) {
                let rep = &self.reps[r];
                if rep.docs.contains_key(key) {
                    f.push(format!(
                        "{} holds a document for {key}: residency",
                        rep.node
                    ));
                }
                if rep.pending.contains_key(key) {
                    f.push(format!(
                        "{} keeps changes of {key} aside: residency",
                        rep.node
                    ));
                }
                for (origin, log) in &rep.store.logs {
                    if log.values().any(|e| &e.key == key) {
                        f.push(format!(
                            "{} has log entries of {origin} for {key}: residency",
                            rep.node
                        ));
                    }
                }
            }
            // (1) Same view (value and conflicts) everywhere it may live; nothing aside.
            let mut first: Option<(usize, Option<RecordView>)> = None;
            for &r in &holders {
                if let Some(p) = self.reps[r].pending.get(key) {
                    f.push(format!(
                        "{} still keeps {} changes of {key} aside: {:?}",
                        self.reps[r].node,
                        p.len(),
                        p.iter()
                            .map(|p| format!("{}@{:x}", p.origin, p.hlc))
                            .collect::<Vec<_>>()
                    ));
                }
                let view = match self.view_of(r, key) {
                    Ok(v) => v,
                    Err(e) => {
                        f.push(e);
                        continue;
                    }
                };
                match &first {
                    None => first = Some((r, view)),
                    Some((r0, v0)) => {
                        if *v0 != view {
                            f.push(format!(
                                "{key} diverged: {} sees {} but {} sees {}",
                                self.reps[*r0].node,
                                render(v0),
                                self.reps[r].node,
                                render(&view)
                            ));
                        }
                    }
                }
            }
            // (2) Counters: the sum of every increment that succeeded.
            if COUNTER_KEYS.contains(&key.as_str()) {
                let want = self.expected_counters.get(key).copied().unwrap_or(0);
                for &r in &holders {
                    let got = match self.view_of(r, key) {
                        Ok(Some(v)) => v.value.get(COUNTER_FIELD).and_then(Json::as_i64),
                        _ => None,
                    };
                    if got != Some(want) {
                        f.push(format!(
                            "counter {key} at {}: {got:?}, expected {want}",
                            self.reps[r].node
                        ));
                    }
                }
            }
            // (5) The same newest version everywhere.
            let versions: Vec<(usize, Version)> = holders
                .iter()
                .map(|&r| {
                    let v = self.reps[r]
                        .docs
                        .get_mut(key)
                        .map_or(Version::ZERO, RecordDoc::max_version);
                    (r, v)
                })
                .collect();
            if versions.windows(2).any(|w| w[0].1 != w[1].1) {
                f.push(format!(
                    "{key}: max_version differs: {:?}",
                    versions
                        .iter()
                        .map(|(r, v)| format!("{}={v}", self.reps[*r].node))
                        .collect::<Vec<_>>()
                ));
            }
        }
        // (4) Logs: for every origin and class a replica may hold, exactly the origin's entries.
        for r in 0..self.reps.len() {
            for o in 0..self.reps.len() {
                if o == r {
                    continue;
                }
                let origin = self.reps[o].node.clone();
                for class in holdable_classes(&self.policy, &self.reps[r].region) {
                    let entries = |rep: &Replica| -> BTreeMap<u64, (String, Vec<u8>)> {
                        rep.store
                            .logs
                            .get(&origin)
                            .map(|log| {
                                log.iter()
                                    .filter(|(_, e)| self.class(&e.key) == class)
                                    .map(|(h, e)| (*h, (e.key.clone(), e.change.clone())))
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    let want = entries(&self.reps[o]);
                    let have = entries(&self.reps[r]);
                    if want != have {
                        let missing: Vec<String> = want
                            .keys()
                            .filter(|h| !have.contains_key(h))
                            .map(|h| format!("{h:x}:{}", want[h].0))
                            .collect();
                        let wrong: Vec<String> = have
                            .iter()
                            .filter(|(h, e)| want.get(h) != Some(e))
                            .map(|(h, e)| format!("{h:x}:{}", e.0))
                            .collect();
                        f.push(format!(
                            "log of {origin} class {class:?} at {}: missing {missing:?}, \
                             wrong or extra {wrong:?}",
                            self.reps[r].node
                        ));
                    }
                    // Frontiers caught up with the origin.
                    let want_f = self.reps[o].store.frontier.get(&origin, &class);
                    let have_f = self.reps[r].store.frontier.get(&origin, &class);
                    if want_f != have_f {
                        f.push(format!(
                            "{} frontier ({origin}, {class:?}) = {have_f:x}, the origin's is \
                             {want_f:x}",
                            self.reps[r].node
                        ));
                    }
                }
            }
        }
        // (6) Liveness: no sender went idle with something left to tell its subscriber.
        for l in &self.links {
            let Some(out) = &l.out else { continue };
            let snd = &self.reps[l.snd];
            let sub_node = &self.reps[l.sub].node;
            for origin in snd.store.origins() {
                if &origin == sub_node {
                    continue;
                }
                for class in out.shared_classes() {
                    let held = snd.store.frontier(&origin, class);
                    let acked = out.acked().get(&origin, class);
                    if acked < held {
                        f.push(format!(
                            "link {}→{}: the sender holds ({origin}, {class:?}) up to {held:x} \
                             but the subscriber acknowledged only {acked:x}, and poll_batch \
                             says there is nothing to send",
                            snd.node, sub_node
                        ));
                    }
                }
            }
        }
        f
    }

    /// Everything observable at the end, as text: equal digests mean equal runs.
    pub fn digest(&self) -> String {
        let mut s = String::new();
        for (r, rep) in self.reps.iter().enumerate() {
            let _ = writeln!(s, "# {} last={:x}", rep.node, rep.last);
            for key in rep.docs.keys() {
                let v = self.view_of(r, key).ok().flatten();
                let _ = writeln!(s, "{key} = {}", render(&v));
            }
            for (origin, log) in &rep.store.logs {
                let _ = writeln!(
                    s,
                    "log {origin}: {} entries, last {:x}",
                    log.len(),
                    log.keys().next_back().copied().unwrap_or(0)
                );
            }
            for e in rep.store.frontier.entries() {
                let _ = writeln!(s, "frontier {} {:?} {:x}", e.origin, e.class, e.hlc);
            }
        }
        let _ = writeln!(s, "{:?}", self.stats);
        s
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn set_now(&mut self, now: u64) {
        self.now = now;
    }
}

fn render(v: &Option<RecordView>) -> String {
    match v {
        None => "(absent)".to_string(),
        Some(v) => serde_json::to_string(v).unwrap_or_else(|e| format!("(unrenderable: {e})")),
    }
}

fn random_object(rng: &mut Rng, allow_null: bool) -> Map<String, Json> {
    let mut m = Map::new();
    for field in ["a", "b", "c", "d"] {
        if rng.chance(550) {
            m.insert(field.to_string(), random_json(rng, allow_null, 0));
        }
    }
    m
}

fn random_json(rng: &mut Rng, allow_null: bool, depth: u32) -> Json {
    let kinds = if depth < 2 { 7 } else { 5 };
    match rng.below(kinds) {
        0 | 4 => json!(rng.below(100)),
        1 => json!(format!("s{}", rng.below(10))),
        2 => json!(rng.chance(500)),
        3 => {
            if allow_null {
                Json::Null
            } else {
                json!(rng.below(5) as i64 - 2)
            }
        }
        5 => {
            let mut m = Map::new();
            for field in ["x", "y"] {
                if rng.chance(600) {
                    m.insert(field.to_string(), random_json(rng, allow_null, depth + 1));
                }
            }
            Json::Object(m)
        }
        _ => Json::Array(
            (0..rng.below(3))
                .map(|_| random_json(rng, false, depth + 1))
                .collect(),
        ),
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

fn summary(m: &Message) -> String {
    let f = |es: &[FrontierEntry]| -> Vec<String> {
        es.iter()
            .map(|e| format!("{}/{:?}={:x}", e.origin, e.class, e.hlc))
            .collect()
    };
    match m {
        Message::Hello { node, frontier, .. } => format!("Hello from {node} {:?}", f(frontier)),
        Message::Batch {
            seq,
            changes,
            progress,
        } => format!(
            "Batch {seq} {:?} progress {:?}",
            changes
                .iter()
                .map(|c| format!("{}@{:x}:{}", c.origin, c.hlc, c.key))
                .collect::<Vec<_>>(),
            f(progress)
        ),
        Message::Ack { seq } => format!("Ack {seq}"),
        Message::Close { reason } => format!("Close {reason:?}"),
        _ => "(another message)".to_string(),
    }
}
