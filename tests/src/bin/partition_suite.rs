//! `partition-suite`: a Jepsen-style run against real `meridian serve` processes (issue 5,
//! first cut). Every inter-node link goes through the in-process link emulator; workloads record
//! a history, a seeded nemesis injects partitions, latency/loss, SIGKILL (with clock skew on
//! restart) and SIGSTOP pauses; after the final heal the checkers run and a summary is printed.
//! Exit status 1 on any violation, with the seed that reproduces the schedule.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use meridian_emulator::{DirectionSel, EmulatorHandle, EmulatorOptions, SettingsUpdate};
use meridian_node::config::Topology;
use meridian_tests::{Cluster, free_udp_port, meridian_bin, poll_until};
use serde_json::{Value, json};

const PINNED_PREFIX: &str = "users/eu/";
const HOME_REGION: usize = 0; // eu-west is REGIONS[0]
const COUNTERS: usize = 3;
const HOT_KEYS: usize = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(about = "Jepsen-style partition suite against real meridian processes")]
struct Args {
    /// Number of regions (one node each).
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// Length of the faulty phase (workloads + nemesis).
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Seed of every random choice (default: from the clock; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where to write history.jsonl, summary.json and node logs (default: a temp folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Randomness: splitmix64, seeded, reproducible.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn range_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
    /// Two distinct indices below `n` (n ≥ 2).
    fn pair(&mut self, n: usize) -> (usize, usize) {
        let a = self.below(n);
        let b = (a + 1 + self.below(n - 1)) % n;
        (a, b)
    }
}

// ---------------------------------------------------------------------------------------------
// History

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Put,
    Incr,
    Patch,
    PinnedPut,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Put => "put",
            Kind::Incr => "incr",
            Kind::Patch => "patch",
            Kind::PinnedPut => "pinned_put",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Fail,
    Unknown,
}

#[derive(Clone, Debug)]
struct Op {
    process: usize,
    kind: Kind,
    key: String,
    value: i64,
    invoke_ms: u64,
    complete_ms: u64,
    outcome: Outcome,
    status: Option<u16>,
    version: Option<String>,
    served_by_region: Option<String>,
    /// The nemesis active when the operation was invoked ("none" between faults).
    nemesis: &'static str,
    /// This process's own node was killed or paused at invoke or completion time.
    node_impaired: bool,
    error: Option<String>,
    /// Requests sent (retries of an `unknown` answer with the same Idempotency-Key included).
    attempts: u32,
}

impl Op {
    fn to_json(&self, regions: &[String]) -> Value {
        json!({
            "process": self.process,
            "region": regions[self.process],
            "op": self.kind.name(),
            "key": self.key,
            "value": self.value,
            "invoke_ms": self.invoke_ms,
            "complete_ms": self.complete_ms,
            "outcome": match self.outcome { Outcome::Ok => "ok", Outcome::Fail => "fail", Outcome::Unknown => "unknown" },
            "status": self.status,
            "version": self.version,
            "served_by_region": self.served_by_region,
            "nemesis": self.nemesis,
            "node_impaired": self.node_impaired,
            "error": self.error,
            "attempts": self.attempts,
        })
    }

    /// A write served by the process's own region (not forwarded, not pinned elsewhere).
    fn is_local(&self) -> bool {
        self.kind != Kind::PinnedPut || self.process == HOME_REGION
    }
}

const NEMESES: [&str; 11] = [
    "none",
    "isolate",
    "halves",
    "bridge",
    "one-way",
    "flapping",
    "latency-loss",
    "kill-restart",
    "pause",
    "skew-within",
    "skew-beyond",
];

/// The topology's `[clock] max_drift_ms` (tests/src/lib.rs writes 500).
const MAX_DRIFT_MS: i64 = 500;

struct Shared {
    start: Instant,
    stop: AtomicBool,
    nemesis: AtomicUsize,
    impaired: Vec<AtomicBool>,
    history: Mutex<Vec<Op>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Workload

/// Retries of a write whose answer was `unknown`, one second apart.
const UNKNOWN_RETRIES: u32 = 3;

type Answer = (
    Outcome,
    Option<u16>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// One request: its outcome, status, version, serving region and error text.
async fn attempt(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: &Value,
    idempotency_key: &str,
) -> Answer {
    let answer = client
        .request(method, url)
        .header("Idempotency-Key", idempotency_key)
        .json(body)
        .send()
        .await;
    match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            let served = r
                .headers()
                .get("meridian-served-by-region")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body: Option<Value> = r.json().await.ok();
            if (200..300).contains(&status) {
                let version = body
                    .as_ref()
                    .and_then(|b| b.get("version"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                (Outcome::Ok, Some(status), version, served, None)
            } else {
                // 4xx: refused, nothing applied. 5xx: may or may not have applied
                // (e.g. a forward that timed out after delivery).
                let outcome = if status < 500 {
                    Outcome::Fail
                } else {
                    Outcome::Unknown
                };
                (
                    outcome,
                    Some(status),
                    None,
                    served,
                    body.map(|b| b.to_string()),
                )
            }
        }
        Err(e) => {
            let outcome = if e.is_connect() {
                Outcome::Fail
            } else {
                Outcome::Unknown
            };
            let text = format!("{e} (timeout: {})", e.is_timeout());
            (outcome, None, None, None, Some(text))
        }
    }
}

async fn workload(
    process: usize,
    base: String,
    region: String,
    seed: u64,
    shared: Arc<Shared>,
    client: reqwest::Client,
) {
    let mut rng = Rng::new(seed);
    let mut n: i64 = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        n += 1;
        let roll = rng.below(100);
        let (kind, key, method, path, body) = if roll < 40 {
            let key = format!("u/{process}/{n}");
            let body = json!({"v": n, "by": region});
            (Kind::Put, key.clone(), reqwest::Method::PUT, key, body)
        } else if roll < 65 {
            let key = format!("c/{}", rng.below(COUNTERS));
            let body = json!({"field": "n", "by": 1});
            (
                Kind::Incr,
                key.clone(),
                reqwest::Method::POST,
                format!("{key}/incr"),
                body,
            )
        } else if roll < 85 {
            let key = format!("h/{}", rng.below(HOT_KEYS));
            let body = json!({format!("f{process}"): n, "shared": format!("{region}-{n}")});
            (Kind::Patch, key.clone(), reqwest::Method::PATCH, key, body)
        } else {
            let key = format!("{PINNED_PREFIX}{process}/{n}");
            let body = json!({"v": n, "by": region});
            (
                Kind::PinnedPut,
                key.clone(),
                reqwest::Method::PUT,
                key,
                body,
            )
        };
        let value = if kind == Kind::Incr { 1 } else { n };
        let nemesis = NEMESES[shared.nemesis.load(Ordering::SeqCst)];
        let impaired_before = shared.impaired[process].load(Ordering::SeqCst);
        let invoke_ms = shared.now_ms();
        // Every write carries an Idempotency-Key, so an `unknown` answer (timeout, 5xx) can be
        // retried safely: a replay returns the first answer if the write had applied.
        let idempotency_key = format!("ps-{seed}-{process}-{n}");
        let url = format!("{base}/v1/kv/{path}");
        let mut attempts = 1;
        let (mut outcome, mut status, mut version, mut served_by_region, mut error) =
            attempt(&client, method.clone(), &url, &body, &idempotency_key).await;
        while outcome == Outcome::Unknown && attempts <= UNKNOWN_RETRIES {
            tokio::time::sleep(Duration::from_secs(1)).await;
            attempts += 1;
            let again = attempt(&client, method.clone(), &url, &body, &idempotency_key).await;
            // Only a success settles it: a refusal now says nothing about the first attempt.
            if again.0 == Outcome::Ok {
                (outcome, status, version, served_by_region, error) = again;
            } else {
                error = again.4.or(error);
            }
        }
        let complete_ms = shared.now_ms();
        let impaired = impaired_before || shared.impaired[process].load(Ordering::SeqCst);
        let op = Op {
            process,
            kind,
            key,
            value,
            invoke_ms,
            complete_ms,
            outcome,
            status,
            version,
            served_by_region,
            nemesis,
            node_impaired: impaired,
            error,
            attempts,
        };
        shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op);
        // ~40 operations per second per region when the node answers quickly.
        tokio::time::sleep(rng.range_ms(10, 40)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Nemesis

fn down(update_down: bool, direction: DirectionSel) -> SettingsUpdate {
    SettingsUpdate {
        down: Some(update_down),
        direction: Some(direction),
        ..SettingsUpdate::default()
    }
}

fn heal(em: &EmulatorHandle) {
    let _ = em.set_all(&SettingsUpdate {
        delay_ms: Some(0),
        jitter_ms: Some(0),
        loss: Some(0.0),
        duplicate: Some(0.0),
        reorder: Some(0.0),
        down: Some(false),
        direction: Some(DirectionSel::Both),
    });
}

/// Cut both dial paths between nodes `a` and `b`, both directions.
fn cut_pair(em: &EmulatorHandle, ids: &[String], a: usize, b: usize) {
    let _ = em.set(&ids[a], &ids[b], &down(true, DirectionSel::Both));
    let _ = em.set(&ids[b], &ids[a], &down(true, DirectionSel::Both));
}

fn isolate(em: &EmulatorHandle, ids: &[String], r: usize) {
    for o in 0..ids.len() {
        if o != r {
            cut_pair(em, ids, r, o);
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

struct Runner {
    cluster: Cluster,
    links_topology: PathBuf,
    ids: Vec<String>,
    regions: Vec<String>,
    client: reqwest::Client,
    log: Vec<String>,
    /// Every fault applied, by name, in order.
    applied: Vec<&'static str>,
    /// A nemesis that could not be applied (a violation: the run did not test what it claims).
    problems: Vec<String>,
}

impl Runner {
    fn note(&mut self, shared: &Shared, text: String) {
        let line = format!("[{:>7} ms] {text}", shared.now_ms());
        println!("{line}");
        self.log.push(line);
    }

    async fn restart(&mut self, i: usize, offset_ms: i64) {
        let offset = offset_ms.to_string();
        let mut extra = vec!["--test-clock-control"];
        if offset_ms != 0 {
            extra.extend(["--test-clock-offset-ms", &offset]);
        }
        let topo = self.links_topology.clone();
        self.cluster.start_with(i, &topo, &extra);
        self.cluster.wait_ready(i, &self.client).await;
    }

    /// Runs one fault for `hold`, then heals it.
    async fn fault(&mut self, em: &EmulatorHandle, shared: &Shared, which: usize, rng: &mut Rng) {
        let n = self.ids.len();
        let hold = rng.range_ms(2500, 4000);
        let name = NEMESES[which];
        self.applied.push(name);
        let ids = self.ids.clone();
        let what = match name {
            "isolate" => {
                let r = rng.below(n);
                isolate(em, &ids, r);
                format!("isolate {}", self.regions[r])
            }
            "halves" => {
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                let (left, right) = order.split_at(n / 2);
                for &a in left {
                    for &b in right {
                        cut_pair(em, &ids, a, b);
                    }
                }
                format!("halves {left:?} | {right:?}")
            }
            "bridge" => {
                let (a, c) = rng.pair(n);
                cut_pair(em, &ids, a, c);
                format!("bridge: {} -/- {}", self.regions[a], self.regions[c])
            }
            "one-way" => {
                // Nothing from a reaches b: a's dial packets to b, and a's answers on b's dial.
                let (a, b) = rng.pair(n);
                let _ = em.set(&ids[a], &ids[b], &down(true, DirectionSel::Forward));
                let _ = em.set(&ids[b], &ids[a], &down(true, DirectionSel::Reverse));
                format!(
                    "one-way: {} -> {} dropped",
                    self.regions[a], self.regions[b]
                )
            }
            "flapping" => {
                let r = rng.below(n);
                self.note(
                    shared,
                    format!("nemesis flapping {} for {hold:?}", self.regions[r]),
                );
                shared.nemesis.store(which, Ordering::SeqCst);
                let until = Instant::now() + hold;
                let mut cut = true;
                while Instant::now() < until {
                    if cut {
                        isolate(em, &ids, r);
                    } else {
                        heal(em);
                    }
                    cut = !cut;
                    tokio::time::sleep(rng.range_ms(300, 800)).await;
                }
                heal(em);
                shared.nemesis.store(0, Ordering::SeqCst);
                self.note(shared, "heal".to_string());
                return;
            }
            "latency-loss" => {
                let _ = em.set_all(&SettingsUpdate {
                    delay_ms: Some(100),
                    jitter_ms: Some(20),
                    loss: Some(0.05),
                    direction: Some(DirectionSel::Both),
                    ..SettingsUpdate::default()
                });
                "latency 100±20 ms, loss 5% on every link".to_string()
            }
            "kill-restart" => {
                let r = rng.below(n);
                let offset = [0i64, -300, 300][rng.below(3)];
                shared.impaired[r].store(true, Ordering::SeqCst);
                shared.nemesis.store(which, Ordering::SeqCst);
                if let Some(p) = self.cluster.procs[r].as_mut() {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                }
                self.cluster.procs[r] = None;
                self.note(
                    shared,
                    format!(
                        "nemesis SIGKILL {} (restart after {hold:?}, clock offset {offset} ms)",
                        self.regions[r]
                    ),
                );
                tokio::time::sleep(hold).await;
                self.restart(r, offset).await;
                shared.impaired[r].store(false, Ordering::SeqCst);
                shared.nemesis.store(0, Ordering::SeqCst);
                self.note(
                    shared,
                    format!("heal: {} restarted and ready", self.regions[r]),
                );
                return;
            }
            "pause" => {
                let r = rng.below(n);
                let Some(pid) = self.cluster.procs[r].as_ref().map(|p| p.child.id()) else {
                    return;
                };
                shared.impaired[r].store(true, Ordering::SeqCst);
                shared.nemesis.store(which, Ordering::SeqCst);
                signal(pid, "-STOP");
                self.note(
                    shared,
                    format!("nemesis SIGSTOP {} for {hold:?}", self.regions[r]),
                );
                tokio::time::sleep(hold).await;
                signal(pid, "-CONT");
                // Requests stuck in the paused process finish after SIGCONT.
                tokio::time::sleep(Duration::from_millis(500)).await;
                shared.impaired[r].store(false, Ordering::SeqCst);
                shared.nemesis.store(0, Ordering::SeqCst);
                self.note(shared, format!("heal: SIGCONT {}", self.regions[r]));
                return;
            }
            "skew-within" | "skew-beyond" => {
                let r = rng.below(n);
                let magnitude = if name == "skew-within" {
                    100 + rng.below(300) as i64
                } else {
                    3 * MAX_DRIFT_MS + rng.below(2000) as i64
                };
                let offset = if rng.below(2) == 0 {
                    magnitude
                } else {
                    -magnitude
                };
                if !self.set_clock_offset(r, offset).await {
                    self.problems.push(format!(
                        "the clock of {} could not be skewed",
                        self.regions[r]
                    ));
                }
                shared.nemesis.store(which, Ordering::SeqCst);
                self.note(
                    shared,
                    format!(
                        "nemesis clock skew {offset:+} ms on {} (max drift {MAX_DRIFT_MS} ms) for {hold:?}",
                        self.regions[r]
                    ),
                );
                tokio::time::sleep(hold).await;
                if !self.set_clock_offset(r, 0).await {
                    self.problems.push(format!(
                        "the clock of {} could not be set back",
                        self.regions[r]
                    ));
                }
                shared.nemesis.store(0, Ordering::SeqCst);
                self.note(
                    shared,
                    format!("heal: clock of {} back to true time", self.regions[r]),
                );
                return;
            }
            _ => return,
        };
        shared.nemesis.store(which, Ordering::SeqCst);
        self.note(shared, format!("nemesis {what} for {hold:?}"));
        tokio::time::sleep(hold).await;
        heal(em);
        shared.nemesis.store(0, Ordering::SeqCst);
        self.note(shared, "heal".to_string());
    }

    /// Skews node `i`'s wall clock through its test-only clock control; false if it refused.
    async fn set_clock_offset(&self, i: usize, offset_ms: i64) -> bool {
        self.client
            .put(self.cluster.url(i, "/v1/test/clock-offset"))
            .json(&json!({ "offset_ms": offset_ms }))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    async fn peers_connected(&self, i: usize) -> bool {
        let Ok(r) = self
            .client
            .get(self.cluster.url(i, "/v1/status"))
            .send()
            .await
        else {
            return false;
        };
        let Ok(v) = r.json::<Value>().await else {
            return false;
        };
        v.get("peers").and_then(Value::as_array).is_some_and(|ps| {
            ps.len() + 1 == self.ids.len()
                && ps
                    .iter()
                    .all(|p| p.get("connected").and_then(Value::as_bool) == Some(true))
        })
    }

    /// Every record stored on node `i` (paginated list), key -> (value, version, conflicts).
    async fn snapshot(&self, i: usize) -> Option<BTreeMap<String, Value>> {
        let mut out = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = self.cluster.url(i, "/v1/kv?limit=1000");
            if let Some(a) = &after {
                // Keys here use only [a-z0-9/]: no escaping needed.
                url.push_str(&format!("&after={a}"));
            }
            let page: Value = self.client.get(url).send().await.ok()?.json().await.ok()?;
            for item in page.get("items")?.as_array()? {
                let key = item.get("key")?.as_str()?.to_string();
                let rec = json!({
                    "value": item.get("value"),
                    "version": item.get("version"),
                    "conflicts": item.get("conflicts"),
                });
                out.insert(key, rec);
            }
            match page.get("next").and_then(Value::as_str) {
                Some(n) => after = Some(n.to_string()),
                None => return Some(out),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkers

#[derive(Default)]
struct Report {
    violations: Vec<String>,
}

impl Report {
    fn violation(&mut self, text: String) {
        if self.violations.len() < 200 {
            eprintln!("VIOLATION: {text}");
        }
        self.violations.push(text);
    }
}

/// Does the snapshot of every allowed region agree, and hold every acknowledged write?
/// Returns the list of problems (empty when converged).
fn convergence_problems(snaps: &[BTreeMap<String, Value>], history: &[Op]) -> Vec<String> {
    let mut problems = Vec::new();
    let n = snaps.len();
    // Global records: identical on every node.
    let global = |k: &str| !k.starts_with(PINNED_PREFIX);
    let keys: BTreeSet<&String> = snaps
        .iter()
        .flat_map(|s| s.keys())
        .filter(|k| global(k))
        .collect();
    for k in keys {
        let first = snaps[0].get(k);
        for (i, s) in snaps.iter().enumerate().skip(1) {
            if s.get(k) != first {
                problems.push(format!(
                    "{k}: node 0 has {}, node {i} has {}",
                    first.map_or("nothing".into(), Value::to_string),
                    s.get(k).map_or("nothing".into(), Value::to_string)
                ));
            }
        }
    }
    // Acknowledged writes of unique keys are present with their value.
    for op in history.iter().filter(|o| o.outcome == Outcome::Ok) {
        let holders: Vec<usize> = match op.kind {
            Kind::Put => (0..n).collect(),
            Kind::PinnedPut => vec![HOME_REGION],
            _ => continue,
        };
        for i in holders {
            let v = snaps[i]
                .get(&op.key)
                .and_then(|r| r.get("value"))
                .and_then(|v| v.get("v"))
                .and_then(Value::as_i64);
            if v != Some(op.value) {
                problems.push(format!(
                    "acknowledged {} {} (v={}) missing on node {i} (found {v:?})",
                    op.kind.name(),
                    op.key,
                    op.value
                ));
            }
        }
    }
    problems
}

fn check_counters(snap: &BTreeMap<String, Value>, history: &[Op], report: &mut Report) -> Value {
    let mut out = serde_json::Map::new();
    for c in 0..COUNTERS {
        let key = format!("c/{c}");
        let ops = history
            .iter()
            .filter(|o| o.kind == Kind::Incr && o.key == key);
        let (mut ok, mut unknown) = (0i64, 0i64);
        for o in ops {
            match o.outcome {
                Outcome::Ok => ok += 1,
                Outcome::Unknown => unknown += 1,
                Outcome::Fail => {}
            }
        }
        let got = snap
            .get(&key)
            .and_then(|r| r.get("value"))
            .and_then(|v| v.get("n"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if got < ok || got > ok + unknown {
            report.violation(format!(
                "counter {key} = {got}, expected within [{ok}, {}]",
                ok + unknown
            ));
        }
        out.insert(key, json!({"value": got, "acked": ok, "unknown": unknown}));
    }
    Value::Object(out)
}

/// The last acknowledged PATCH of each process to each hot key must be the final value of the
/// field that only that process writes, unless a later unacknowledged PATCH may have applied.
fn check_hot_keys(snap: &BTreeMap<String, Value>, history: &[Op], report: &mut Report) {
    let mut by: HashMap<(usize, &str), Vec<&Op>> = HashMap::new();
    for o in history.iter().filter(|o| o.kind == Kind::Patch) {
        by.entry((o.process, o.key.as_str())).or_default().push(o);
    }
    for ((p, key), mut ops) in by {
        ops.sort_by_key(|o| o.invoke_ms);
        let Some(last_ok) = ops.iter().rposition(|o| o.outcome == Outcome::Ok) else {
            continue;
        };
        let allowed: BTreeSet<i64> = ops[last_ok..]
            .iter()
            .filter(|o| o.outcome != Outcome::Fail)
            .map(|o| o.value)
            .collect();
        let got = snap
            .get(key)
            .and_then(|r| r.get("value"))
            .and_then(|v| v.get(format!("f{p}")))
            .and_then(Value::as_i64);
        if !got.is_some_and(|g| allowed.contains(&g)) {
            report.violation(format!(
                "hot key {key} field f{p} = {got:?}, the last acknowledged PATCH wrote {} (allowed {allowed:?})",
                ops[last_ok].value
            ));
        }
    }
}

/// The node part of the versions node `node_id` stamps (`{time}-{node}`).
fn version_node_part(node_id: &str) -> String {
    format!("{:016x}", meridian_node::clock::hlc_id_of(node_id))
}

/// Versions issued by one node strictly increase: a write acknowledged before another write to
/// the same node was invoked has a smaller version.
///
/// A write's answer carries the record's version, the greatest of its changes: when the serving
/// node's clock is behind a change it already holds from another node (a skew beyond the max
/// drift), that is the other node's version, not this write's stamp. Only answers stamped by the
/// node that served them (`served_node_part(op)`) say something about that node's clock.
fn check_versions(
    history: &[Op],
    served_node_part: &dyn Fn(&Op) -> Option<String>,
    report: &mut Report,
) -> usize {
    let mut per: HashMap<&str, Vec<&Op>> = HashMap::new();
    for o in history.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let Some(v) = &o.version
            && let Some((_, node)) = v.split_once('-')
            && served_node_part(o).as_deref() == Some(node)
        {
            per.entry(node).or_default().push(o);
        }
    }
    let mut checked = 0;
    for (node, mut ops) in per {
        let mut by_complete = ops.clone();
        by_complete.sort_by_key(|o| o.complete_ms);
        ops.sort_by_key(|o| o.invoke_ms);
        let mut j = 0;
        let mut max_before: Option<&Op> = None;
        for b in ops {
            while j < by_complete.len() && by_complete[j].complete_ms < b.invoke_ms {
                let a = by_complete[j];
                if max_before.is_none_or(|m| a.version > m.version) {
                    max_before = Some(a);
                }
                j += 1;
            }
            checked += 1;
            if let Some(a) = max_before
                && a.version >= b.version
            {
                report.violation(format!(
                    "node {node}: {} {} acknowledged at {} ms with version {:?}, but {} {} invoked at {} ms later got {:?}",
                    a.kind.name(), a.key, a.complete_ms, a.version, b.kind.name(), b.key, b.invoke_ms, b.version
                ));
            }
        }
    }
    checked
}

// ---------------------------------------------------------------------------------------------
// Main

/// `meridian_tests::meridian_bin()` looks for `meridian` one folder above the running
/// executable (right for test executables in `deps/`); this binary sits beside it. Point
/// `MERIDIAN_BIN` at the sibling (building it if missing) and re-run ourselves with it set.
fn reexec_with_meridian_bin() -> Option<ExitCode> {
    if std::env::var_os("MERIDIAN_BIN").is_some() {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let bin = dir.join("meridian");
    if !bin.is_file() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "meridian-node", "--bin", "meridian"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        if !cmd.status().is_ok_and(|s| s.success()) {
            eprintln!("building the meridian binary failed");
            return Some(ExitCode::from(1));
        }
    }
    let status = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env("MERIDIAN_BIN", &bin)
        .status();
    Some(match status.ok().and_then(|s| s.code()) {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = reexec_with_meridian_bin() {
        return code;
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("partition-suite seed: {seed}");
    if !(2..=meridian_tests::REGIONS.len()).contains(&args.regions) {
        eprintln!(
            "--regions must be between 2 and {}",
            meridian_tests::REGIONS.len()
        );
        return ExitCode::from(2);
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("meridian-partition-suite-{seed}")));
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("cannot create {}: {e}", out.display());
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let ok = rt.block_on(run(&args, seed, &out));
    println!("output: {}", out.display());
    if ok {
        println!("PASS (seed {seed})");
        ExitCode::SUCCESS
    } else {
        println!(
            "FAIL: violations found; reproduce with --seed {seed} --regions {} --duration-secs {}",
            args.regions, args.duration_secs
        );
        ExitCode::from(1)
    }
}

fn write_links_topology(cluster: &Cluster) -> PathBuf {
    let mut text = std::fs::read_to_string(&cluster.topology).expect("read topology");
    text.push_str("\n# Added by partition-suite: every dial goes through the link emulator.\n");
    for from in &cluster.nodes {
        for to in &cluster.nodes {
            if from.id != to.id {
                text.push_str(&format!(
                    "\n[[links]]\nfrom = \"{}\"\nto = \"{}\"\nvia = \"127.0.0.1:{}\"\n",
                    from.id,
                    to.id,
                    free_udp_port()
                ));
            }
        }
    }
    let path = cluster.dir.path().join("topology-links.toml");
    std::fs::write(&path, text).expect("write links topology");
    path
}

async fn run(args: &Args, seed: u64, out: &Path) -> bool {
    let n = args.regions;
    let rule = format!(
        "[[residency]]\nname = \"eu-personal-data\"\nkeys = \"{PINNED_PREFIX}*\"\nhome = \"eu-west\"\nforeign = \"forward\"\n"
    );
    let mut cluster = Cluster::new(n, &rule);
    let links_topology = write_links_topology(&cluster);
    let topo = Topology::load(&links_topology).expect("valid links topology");
    let emulator = meridian_node::tools::proxy_cmd::start(
        &topo,
        EmulatorOptions {
            seed: Some(seed),
            ..EmulatorOptions::default()
        },
    )
    .await
    .expect("start the link emulator");
    let em = emulator.handle();
    for i in 0..n {
        cluster.start_with(i, &links_topology, &["--test-clock-control"]);
    }
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("http client");
    let ids: Vec<String> = cluster.nodes.iter().map(|s| s.id.clone()).collect();
    let regions: Vec<String> = cluster.nodes.iter().map(|s| s.region.clone()).collect();
    let mut runner = Runner {
        cluster,
        links_topology,
        ids,
        regions: regions.clone(),
        client: client.clone(),
        log: Vec::new(),
        applied: Vec::new(),
        problems: Vec::new(),
    };
    for i in 0..n {
        runner.cluster.wait_ready(i, &client).await;
    }
    let mut all_connected = true;
    for i in 0..n {
        all_connected &= poll_until(meridian_tests::DEADLINE, || runner.peers_connected(i)).await;
    }
    if !all_connected {
        eprintln!("peers did not all connect through the emulator within 60 s");
        return false;
    }
    println!(
        "{n} nodes ready, every link through the emulator ({} links)",
        em.links().len()
    );

    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        nemesis: AtomicUsize::new(0),
        impaired: (0..n).map(|_| AtomicBool::new(false)).collect(),
        history: Mutex::new(Vec::new()),
    });
    let mut rng = Rng::new(seed);
    let mut workers = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        workers.push(tokio::spawn(workload(
            i,
            runner.cluster.url(i, ""),
            region.clone(),
            rng.next(),
            Arc::clone(&shared),
            client.clone(),
        )));
    }

    // Nemesis: a seeded shuffle of every fault, repeated, with quiet periods in between.
    let faulty = Duration::from_secs(args.duration_secs);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut order: Vec<usize> = Vec::new();
    // The first full cycle always runs, whatever the duration: every kind of fault is
    // exercised at least once in every run.
    let mut first_cycle_left = NEMESES.len() - 1;
    while first_cycle_left > 0 || shared.start.elapsed() + Duration::from_secs(4) < faulty {
        first_cycle_left = first_cycle_left.saturating_sub(1);
        if order.is_empty() {
            order = (1..NEMESES.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        let which = order.pop().unwrap_or(1);
        runner.fault(&em, &shared, which, &mut rng).await;
        tokio::time::sleep(rng.range_ms(1000, 2000)).await;
    }
    heal(&em);
    shared.stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.await;
    }
    // Every node running (a restart might have been cut short by the deadline: none are).
    for i in 0..n {
        if runner.cluster.procs[i].is_none() {
            runner.restart(i, 0).await;
        }
    }
    let heal_at = Instant::now();
    runner.note(
        &shared,
        "final heal; workloads stopped; waiting for convergence".into(),
    );

    let history: Vec<Op> = shared
        .history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();

    // Convergence.
    let mut report = Report::default();
    for p in std::mem::take(&mut runner.problems) {
        report.violation(p);
    }
    let mut converged_after: Option<Duration> = None;
    let mut last_problems = Vec::new();
    let mut snaps: Vec<BTreeMap<String, Value>> = Vec::new();
    while heal_at.elapsed() < CONVERGENCE_DEADLINE {
        let mut s = Vec::new();
        for i in 0..n {
            match runner.snapshot(i).await {
                Some(x) => s.push(x),
                None => break,
            }
        }
        if s.len() == n {
            let problems = convergence_problems(&s, &history);
            snaps = s;
            if problems.is_empty() {
                converged_after = Some(heal_at.elapsed());
                break;
            }
            last_problems = problems;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if converged_after.is_none() {
        report.violation(format!(
            "no convergence within {CONVERGENCE_DEADLINE:?} after the final heal; {} problems, e.g. {:?}",
            last_problems.len(),
            last_problems.iter().take(5).collect::<Vec<_>>()
        ));
    }
    // Lost acknowledged writes (judged on the final snapshots).
    let lost = if snaps.len() == n {
        convergence_problems(&snaps, &history)
            .iter()
            .filter(|p| p.starts_with("acknowledged"))
            .count()
    } else {
        history.iter().filter(|o| o.outcome == Outcome::Ok).count()
    };
    if lost > 0 {
        report.violation(format!("{lost} acknowledged writes lost or wrong"));
    }
    // Pinned records seen live outside eu-west.
    for (i, s) in snaps.iter().enumerate() {
        if i != HOME_REGION {
            let stray = s.keys().filter(|k| k.starts_with(PINNED_PREFIX)).count();
            if stray > 0 {
                report.violation(format!(
                    "{} lists {stray} records pinned to eu-west",
                    regions[i]
                ));
            }
        }
    }
    let counters = if let Some(s0) = snaps.first() {
        check_hot_keys(s0, &history, &mut report);
        check_counters(s0, &history, &mut report)
    } else {
        Value::Null
    };
    // Which node served each write: its own region's, or the region that answered a forward.
    let node_parts: HashMap<&str, String> = regions
        .iter()
        .zip(&runner.ids)
        .map(|(r, id)| (r.as_str(), version_node_part(id)))
        .collect();
    let served = |o: &Op| {
        let region = o.served_by_region.as_deref().unwrap_or(&regions[o.process]);
        node_parts.get(region).cloned()
    };
    let versions_checked = check_versions(&history, &served, &mut report);

    // Availability of local writes, excluding writes to a node that was killed or paused.
    let local: Vec<&Op> = history
        .iter()
        .filter(|o| o.is_local() && !o.node_impaired)
        .collect();
    let share = |ops: &[&Op]| {
        if ops.is_empty() {
            1.0
        } else {
            ops.iter().filter(|o| o.outcome == Outcome::Ok).count() as f64 / ops.len() as f64
        }
    };
    let availability = share(&local);
    let during: Vec<&Op> = local
        .iter()
        .copied()
        .filter(|o| o.nemesis != "none")
        .collect();
    let availability_faults = share(&during);
    if availability < 0.99 {
        report.violation(format!(
            "local write availability {:.2}% < 99%",
            availability * 100.0
        ));
    }
    for o in local.iter().filter(|o| o.outcome != Outcome::Ok).take(5) {
        println!("  unavailable local write: {}", o.to_json(&regions));
    }

    // Residency: stop every node and audit its data directory offline.
    let mut audits = Vec::new();
    for i in 0..n {
        runner.cluster.stop(i);
        let data = runner.cluster.data_dir(i);
        let res = Command::new(meridian_bin())
            .args(["residency", "audit", "--topology"])
            .arg(&runner.cluster.topology)
            .arg("--data-dir")
            .arg(&data)
            .output();
        match res {
            Ok(o) if o.status.success() => {
                audits.push(json!({"node": ids_of(&runner)[i], "clean": true}))
            }
            Ok(o) => {
                report.violation(format!(
                    "residency audit of {} exit {:?}: {}{}",
                    ids_of(&runner)[i],
                    o.status.code(),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
                audits.push(json!({"node": ids_of(&runner)[i], "clean": false}));
            }
            Err(e) => report.violation(format!("cannot run the residency audit: {e}")),
        }
    }
    // Panics in node logs (logs are appended across restarts).
    let mut panics = 0;
    for i in 0..n {
        let log_path = runner.cluster.data_dir(i).with_extension("log");
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::copy(&log_path, out.join(format!("{}.log", ids_of(&runner)[i])));
        let count = text.matches("panicked").count();
        if count > 0 {
            panics += count;
            report.violation(format!(
                "{} log has {count} 'panicked' lines",
                ids_of(&runner)[i]
            ));
        }
    }

    // Output.
    let count = |o: Outcome| history.iter().filter(|x| x.outcome == o).count();
    let retried = history.iter().filter(|o| o.attempts > 1).count();
    let retried_ok = history
        .iter()
        .filter(|o| o.attempts > 1 && o.outcome == Outcome::Ok)
        .count();
    let (oks, fails, unknowns) = (
        count(Outcome::Ok),
        count(Outcome::Fail),
        count(Outcome::Unknown),
    );
    if let Ok(f) = std::fs::File::create(out.join("history.jsonl")) {
        let mut w = std::io::BufWriter::new(f);
        for o in &history {
            let _ = writeln!(w, "{}", o.to_json(&regions));
        }
    }
    let summary = json!({
        "seed": seed,
        "regions": regions,
        "duration_secs": args.duration_secs,
        "operations": history.len(),
        "ok": oks,
        "fail": fails,
        "unknown": unknowns,
        "lost": lost,
        "retried": retried,
        "retried_resolved": retried_ok,
        "convergence_ms": converged_after.map(|d| d.as_millis() as u64),
        "availability_local": availability,
        "availability_local_during_faults": availability_faults,
        "local_writes": local.len(),
        "local_writes_during_faults": during.len(),
        "versions_checked": versions_checked,
        "counters": counters,
        "residency_audits": audits,
        "panics": panics,
        "faults": fault_counts(&runner.applied),
        "nemesis_log": runner.log,
        "violations": report.violations,
    });
    let _ = std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap_or_default(),
    );
    let row = |k: &str, v: String| println!("| {k:<36} | {v:>22} |");
    println!("\n+--------------------------------------+------------------------+");
    row("seed", seed.to_string());
    row(
        "operations (ok / fail / unknown)",
        format!("{} ({oks}/{fails}/{unknowns})", history.len()),
    );
    row("faults (partitions/kill/pause/skew)", {
        let c = fault_counts(&runner.applied);
        format!(
            "{}/{}/{}/{}",
            c["partitions"], c["kill-restart"], c["pause"], c["skew"]
        )
    });
    row(
        "unknown answers retried (settled ok)",
        format!("{retried} ({retried_ok})"),
    );
    row("acknowledged writes lost", lost.to_string());
    row(
        "convergence after final heal",
        converged_after.map_or("NOT CONVERGED".into(), |d| format!("{} ms", d.as_millis())),
    );
    row(
        "local availability (all)",
        format!("{:.2}% of {}", availability * 100.0, local.len()),
    );
    row(
        "local availability (during faults)",
        format!("{:.2}% of {}", availability_faults * 100.0, during.len()),
    );
    row("acked writes version-checked", versions_checked.to_string());
    row(
        "residency audits clean",
        format!(
            "{}/{n}",
            audits.iter().filter(|a| a["clean"] == true).count()
        ),
    );
    row("panics in node logs", panics.to_string());
    row("violations", report.violations.len().to_string());
    println!("+--------------------------------------+------------------------+");
    drop(emulator);
    report.violations.is_empty()
}

/// How many faults of each family ran (partitions count every kind of link cut).
fn fault_counts(applied: &[&str]) -> Value {
    let count = |f: &dyn Fn(&str) -> bool| applied.iter().filter(|a| f(a)).count();
    json!({
        "partitions": count(&|a| matches!(a, "isolate" | "halves" | "bridge" | "one-way" | "flapping")),
        "latency-loss": count(&|a| a == "latency-loss"),
        "kill-restart": count(&|a| a == "kill-restart"),
        "pause": count(&|a| a == "pause"),
        "skew": count(&|a| a.starts_with("skew")),
        "skew-beyond-drift": count(&|a| a == "skew-beyond"),
        "all": applied,
    })
}

fn ids_of(r: &Runner) -> &[String] {
    &r.ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        process: usize,
        kind: Kind,
        key: &str,
        value: i64,
        t: (u64, u64),
        outcome: Outcome,
    ) -> Op {
        Op {
            process,
            kind,
            key: key.to_string(),
            value,
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome,
            status: None,
            version: None,
            served_by_region: None,
            nemesis: "none",
            node_impaired: false,
            error: None,
            attempts: 1,
        }
    }

    #[test]
    fn versions_must_grow_per_node_for_non_overlapping_writes() {
        let mut a = op(0, Kind::Put, "u/0/1", 1, (0, 10), Outcome::Ok);
        a.version = Some("0000000000000005-aa".into());
        let mut b = op(0, Kind::Put, "u/0/2", 2, (20, 30), Outcome::Ok);
        b.version = Some("0000000000000004-aa".into());
        let mut report = Report::default();
        check_versions(&[a.clone(), b.clone()], &|_| Some("aa".into()), &mut report);
        assert_eq!(report.violations.len(), 1);
        // Overlapping operations may finish in any order.
        b.invoke_ms = 5;
        let mut report = Report::default();
        check_versions(&[a.clone(), b.clone()], &|_| Some("aa".into()), &mut report);
        assert!(report.violations.is_empty());
        // An answer carrying another node's version (the record's, not this write's stamp) is
        // not evidence about the serving node's clock.
        b.invoke_ms = 20;
        let mut report = Report::default();
        let other = |o: &Op| Some(if o.key == "u/0/2" { "bb" } else { "aa" }.to_string());
        check_versions(&[a, b], &other, &mut report);
        assert!(report.violations.is_empty());
    }

    #[test]
    fn counters_must_lie_between_acked_and_acked_plus_unknown() {
        let h = vec![
            op(0, Kind::Incr, "c/0", 1, (0, 1), Outcome::Ok),
            op(1, Kind::Incr, "c/0", 1, (0, 1), Outcome::Unknown),
            op(1, Kind::Incr, "c/0", 1, (0, 1), Outcome::Fail),
        ];
        for (got, bad) in [(0, true), (1, false), (2, false), (3, true)] {
            let snap = BTreeMap::from([("c/0".to_string(), json!({"value": {"n": got}}))]);
            let mut report = Report::default();
            check_counters(&snap, &h, &mut report);
            assert_eq!(!report.violations.is_empty(), bad, "counter value {got}");
        }
    }

    #[test]
    fn lost_and_diverging_records_are_problems() {
        let h = vec![op(0, Kind::Put, "u/0/1", 1, (0, 1), Outcome::Ok)];
        let rec = json!({"value": {"v": 1}, "version": "x", "conflicts": null});
        let full = BTreeMap::from([("u/0/1".to_string(), rec)]);
        assert!(convergence_problems(&[full.clone(), full.clone()], &h).is_empty());
        let problems = convergence_problems(&[full, BTreeMap::new()], &h);
        assert!(problems.iter().any(|p| p.starts_with("acknowledged")));
        assert!(problems.iter().any(|p| p.starts_with("u/0/1: node 0")));
    }
}
