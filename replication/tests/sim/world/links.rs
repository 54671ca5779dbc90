//! The links and the network: sending over a lossy, delaying, reordering wire, resets and
//! reconnects, both ends of the protocol, and the periodic tick.

use std::time::Duration;

use super::*;

impl World {
    pub(super) fn is_cut(&self, from: usize, to: usize) -> bool {
        self.cut.contains_key(&(from, to))
    }

    /// Put a message on the wire (encoded, so the codec is exercised too).
    pub(super) fn send(&mut self, link: usize, to_sender: bool, msg: &Message) {
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

    pub(super) fn reset(&mut self, link: usize, reason: &'static str) {
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
        // The subscriber's dialler backs off as the node's does.
        l.backoff
            .failed_after(Duration::from_millis(self.now - l.dialled_at));
        let wait = l.backoff.next_wait(self.net.next_u64());
        let epoch = l.epoch;
        self.schedule(
            self.now + wait.as_millis() as u64,
            Event::Reconnect { link, epoch },
        );
    }

    pub(super) fn deliver(
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

    pub(super) fn at_sender(&mut self, link: usize, msg: Message) {
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
                    clock_ntp64: me.clock(self.now),
                };
                self.send(link, false, &hello);
                self.pump(link);
            }
            Message::Ack { seq, .. } => {
                let Some(out) = self.links[link].out.as_mut() else {
                    return self.reset(link, "ack before hello");
                };
                if out.on_ack(*seq).is_err() {
                    return self.reset(link, "unexpected ack");
                }
                let l = &mut self.links[link];
                l.waiting_since = self.now;
                self.pump(link);
            }
            // A batch, a close, or anything else: not what a subscriber sends on this stream.
            _ => self.reset(link, "unexpected message"),
        }
    }

    pub(super) fn at_subscriber(&mut self, link: usize, msg: Message) -> Result<(), String> {
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
                let clock_ntp64 = self.reps[sub].clock(self.now);
                self.send(link, true, &Message::Ack { seq, clock_ntp64 });
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
    pub(super) fn pump(&mut self, link: usize) -> usize {
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

    pub(super) fn pump_from(&mut self, sender: usize) {
        for link in 0..self.links.len() {
            if self.links[link].snd == sender {
                self.pump(link);
            }
        }
    }

    pub(super) fn tick(&mut self) -> Result<(), String> {
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
}

pub(super) fn summary(m: &Message) -> String {
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
        Message::Ack { seq, .. } => format!("Ack {seq}"),
        Message::Close { reason } => format!("Close {reason:?}"),
        _ => "(another message)".to_string(),
    }
}
