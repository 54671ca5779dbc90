//! What a subscriber does with one received batch: refuse what its region may not hold, skip
//! what it already has, hold back what is stamped too far ahead, and raise its frontier.
//!
//! Invariant: pure: `now` and the drift bound come from the caller, and nothing is stored here.

use std::collections::{BTreeMap, BTreeSet};

use meridian_residency::Policy;

use super::Frontier;
use crate::wire::{FrontierEntry, WireChange};

/// A change accepted for storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub origin: String,
    pub hlc: u64,
    pub key: String,
    pub change: Vec<u8>,
    /// Stamped further ahead of this node's clock than the maximum drift: stored and relayed,
    /// but applied to the record only once the clock has caught up.
    pub held_for_drift: bool,
}

/// What to do with one received batch.
#[derive(Debug, Default)]
pub struct Plan {
    /// Changes to store (log) and apply, grouped by record key, each group in arrival order.
    pub by_key: BTreeMap<String, Vec<Accepted>>,
    /// The frontier after the batch is stored.
    pub frontier: Vec<FrontierEntry>,
    /// Changes of records this region may not hold: refused and counted.
    pub refused: Vec<WireChange>,
    /// Changes already held (at or below the frontier).
    pub duplicates: usize,
    /// Changes held back because of clock drift.
    pub held_for_drift: usize,
}

impl Plan {
    pub fn accepted(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }
}

/// Decide what to store from a batch, given the current frontier.
///
/// `now_ntp64` and `max_drift_ntp64` come from the caller: the core reads no clock.
pub fn plan_batch(
    changes: Vec<WireChange>,
    progress: &[FrontierEntry],
    current: &dyn Fn(&str, &str) -> u64,
    policy: &Policy,
    local_region: &str,
    now_ntp64: u64,
    max_drift_ntp64: u64,
) -> Plan {
    let mut plan = Plan::default();
    let mut frontier = Frontier::default();
    let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
    let horizon = now_ntp64.saturating_add(max_drift_ntp64);
    for change in changes {
        if !policy.may_hold(&change.key, local_region) {
            plan.refused.push(change);
            continue;
        }
        let class = policy.class_of(&change.key).to_string();
        let held = frontier
            .get(&change.origin, &class)
            .max(current(&change.origin, &class));
        if change.hlc <= held {
            plan.duplicates += 1;
            continue;
        }
        frontier.raise(&change.origin, &class, change.hlc);
        touched.insert((change.origin.clone(), class));
        let held_for_drift = change.hlc > horizon;
        if held_for_drift {
            plan.held_for_drift += 1;
        }
        plan.by_key
            .entry(change.key.clone())
            .or_default()
            .push(Accepted {
                origin: change.origin,
                hlc: change.hlc,
                key: change.key,
                change: change.change,
                held_for_drift,
            });
    }
    for p in progress {
        if !policy.class_holdable(&p.class, local_region) {
            continue;
        }
        if p.hlc > current(&p.origin, &p.class).max(frontier.get(&p.origin, &p.class)) {
            frontier.raise(&p.origin, &p.class, p.hlc);
            touched.insert((p.origin.clone(), p.class.clone()));
        }
    }
    plan.frontier = touched
        .into_iter()
        .map(|(origin, class)| FrontierEntry {
            hlc: frontier.get(&origin, &class),
            origin,
            class,
        })
        .collect();
    plan
}
