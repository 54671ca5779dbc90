//! What a run depends on: the constants of the model, the configuration derived from the seed,
//! and the residency policy of the simulated cluster.

use super::*;

pub const CLUSTER: &str = "sim";
/// Virtual time starts here (Unix milliseconds), so HLC stamps look like real NTP64 times.
pub(super) const BASE_UNIX_MS: u64 = 1_700_000_000_000;
/// The receiver's maximum tolerated clock drift.
pub const MAX_DRIFT_MS: u64 = 500;
/// A link with unacknowledged batches (or an unanswered `Hello`) and no progress for this
/// long is reset.
pub const IDLE_TIMEOUT_MS: u64 = 2_000;
/// Timeouts and drift-held retries are checked this often.
pub(super) const TICK_MS: u64 = 100;
/// Every sender polls every link this often even without a commit (the node's `IDLE_TICK`).
pub(super) const IDLE_TICK_MS: u64 = 500;
/// One-way message delay: uniform in this range.
pub(super) const DELAY_MS: (u64, u64) = (1, 200);
/// After the workload ends and the faults are healed, the run must be quiescent within this.
pub(super) const SETTLE_LIMIT_MS: u64 = 180_000;

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
