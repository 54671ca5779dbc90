//! The workload: random local writes, only where the key's region may hold it.

use super::*;

impl World {
    pub(super) fn random_op(&mut self) -> Result<(), String> {
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
}

pub(super) fn random_object(rng: &mut Rng, allow_null: bool) -> Map<String, Json> {
    let mut m = Map::new();
    for field in ["a", "b", "c", "d"] {
        if rng.chance(550) {
            m.insert(field.to_string(), random_json(rng, allow_null, 0));
        }
    }
    m
}

pub(super) fn random_json(rng: &mut Rng, allow_null: bool, depth: u32) -> Json {
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
