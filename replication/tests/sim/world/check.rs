//! Quiescence and the final checks: identical views and logs wherever a key may live, exact
//! counters, residency, contiguity; and the run's digest.

use super::*;

impl World {
    pub(super) fn is_quiescent(&self) -> bool {
        self.unquiet_reasons().is_empty()
    }

    pub(super) fn unquiet_reasons(&self) -> Vec<String> {
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

    pub(super) fn view_of(&self, r: usize, key: &str) -> Result<Option<RecordView>, String> {
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
}

pub(super) fn render(v: &Option<RecordView>) -> String {
    match v {
        None => "(absent)".to_string(),
        Some(v) => serde_json::to_string(v).unwrap_or_else(|e| format!("(unrenderable: {e})")),
    }
}
