//! What a replica does with a received batch, as the node does it, checked against the
//! origin's log after every batch; and what a crash does to a replica.

use super::*;

impl World {
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

    pub(super) fn class<'a>(&'a self, key: &str) -> &'a str {
        match self.classes.get(key) {
            Some(c) => c,
            None => self.policy.class_of(key),
        }
    }

    pub(super) fn origin_index(&self, origin: &str) -> Option<usize> {
        self.reps.iter().position(|r| r.node == origin)
    }

    /// The contiguity invariant: replica `r`'s frontier for (origin, class) says it holds
    /// every such change up to it — compare with the origin's own log, the ground truth.
    pub(super) fn check_contiguous(
        &self,
        r: usize,
        origin: &str,
        class: &str,
    ) -> Result<(), String> {
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

    pub(super) fn crash(&mut self, r: usize) -> Result<(), String> {
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
}
