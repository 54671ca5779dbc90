//! The history a run records: one [`Op`] per write a workload invoked, and the [`Shared`]
//! state through which the workloads learn which fault is active.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::HOME_REGION;
use super::nemesis::NEMESES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Put,
    Incr,
    Patch,
    PinnedPut,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Put => "put",
            Kind::Incr => "incr",
            Kind::Patch => "patch",
            Kind::PinnedPut => "pinned_put",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    Fail,
    Unknown,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Op {
    pub(super) process: usize,
    pub(super) kind: Kind,
    pub(super) key: String,
    pub(super) value: i64,
    pub(super) invoke_ms: u64,
    pub(super) complete_ms: u64,
    pub(super) outcome: Outcome,
    pub(super) status: Option<u16>,
    pub(super) version: Option<String>,
    pub(super) served_by_region: Option<String>,
    /// The nemesis active when the operation was invoked ("none" between faults).
    pub(super) nemesis: &'static str,
    /// This process's own node was killed or paused at invoke or completion time.
    pub(super) node_impaired: bool,
    pub(super) error: Option<String>,
    /// Requests sent (retries of an `unknown` answer with the same Idempotency-Key included).
    pub(super) attempts: u32,
}

impl Op {
    pub(super) fn to_json(&self, regions: &[String]) -> Value {
        json!({
            "process": self.process,
            "region": regions[self.process],
            "op": self.kind.name(),
            "key": self.key,
            "value": self.value,
            "invoke_ms": self.invoke_ms,
            "complete_ms": self.complete_ms,
            "outcome": self.outcome.name(),
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
    pub(super) fn is_local(&self) -> bool {
        self.kind != Kind::PinnedPut || self.process == HOME_REGION
    }
}

/// What the workloads and the nemesis share during a run.
pub(super) struct Shared {
    start: Instant,
    stop: AtomicBool,
    /// Index into [`NEMESES`] of the active fault (0: none).
    nemesis: AtomicUsize,
    /// Per node: killed or paused right now.
    impaired: Vec<AtomicBool>,
    history: Mutex<Vec<Op>>,
}

impl Shared {
    pub(super) fn new(nodes: usize) -> Shared {
        Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            nemesis: AtomicUsize::new(0),
            impaired: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
            history: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Since the run (and its history) started.
    pub(super) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Tells every workload to finish its current operation and stop.
    pub(super) fn stop_workloads(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(super) fn set_nemesis(&self, which: usize) {
        self.nemesis.store(which, Ordering::SeqCst);
    }

    pub(super) fn nemesis_name(&self) -> &'static str {
        NEMESES[self.nemesis.load(Ordering::SeqCst)]
    }

    pub(super) fn set_impaired(&self, node: usize, impaired: bool) {
        self.impaired[node].store(impaired, Ordering::SeqCst);
    }

    pub(super) fn impaired(&self, node: usize) -> bool {
        self.impaired[node].load(Ordering::SeqCst)
    }

    pub(super) fn record(&self, op: Op) {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op);
    }

    /// A copy of the history so far.
    pub(super) fn history(&self) -> Vec<Op> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
