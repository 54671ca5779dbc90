//! The nemesis: a seeded shuffle of every kind of fault, each held for a few seconds and then
//! healed, with quiet periods in between. Faults on links go through the link emulator;
//! faults on nodes are signals (SIGKILL, SIGSTOP/SIGCONT), the test-only clock control and
//! the [disk nemeses](super::disk) (a full disk, a damaged record).
//!
//! Invariant: the random draws happen in a fixed order per fault (hold time first, then the
//! fault's own choices), so one seed always yields one schedule.

use std::time::{Duration, Instant};

use meridian_emulator::{DirectionSel, EmulatorHandle, SettingsUpdate};
use meridian_harness::NodeProcess;

use super::MAX_DRIFT_MS;
use super::history::Shared;
use super::rng::Rng;
use super::runner::Runner;

pub(super) const NEMESES: [&str; 13] = [
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
    "disk-full",
    "damage-record",
];

/// Runs faults until `faulty` has passed since the run started, and at least one full cycle
/// of every kind whatever the duration.
pub(super) async fn run_schedule(
    runner: &mut Runner,
    em: &EmulatorHandle,
    shared: &Shared,
    rng: &mut Rng,
    faulty: Duration,
) {
    let mut order: Vec<usize> = Vec::new();
    let mut first_cycle_left = NEMESES.len() - 1;
    while first_cycle_left > 0 || shared.elapsed() + Duration::from_secs(4) < faulty {
        first_cycle_left = first_cycle_left.saturating_sub(1);
        if order.is_empty() {
            order = (1..NEMESES.len()).collect();
            rng.shuffle(&mut order);
        }
        let which = order.pop().unwrap_or(1);
        runner.fault(em, shared, which, rng).await;
        tokio::time::sleep(rng.range_ms(1000, 2000)).await;
    }
}

fn down(update_down: bool, direction: DirectionSel) -> SettingsUpdate {
    SettingsUpdate {
        down: Some(update_down),
        direction: Some(direction),
        ..SettingsUpdate::default()
    }
}

/// Every link back to no delay, no loss, up in both directions.
pub(super) fn heal(em: &EmulatorHandle) {
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

impl Runner {
    /// Runs fault `NEMESES[which]` for a seeded hold time, then heals it.
    pub(super) async fn fault(
        &mut self,
        em: &EmulatorHandle,
        shared: &Shared,
        which: usize,
        rng: &mut Rng,
    ) {
        let hold = rng.range_ms(2500, 4000);
        let name = NEMESES[which];
        if let ("disk-full", Err(why)) = (name, &self.disks) {
            let why = why.clone();
            self.note(shared, format!("nemesis disk-full skipped: {why}"));
            return;
        }
        self.applied.push(name);
        match name {
            "flapping" => self.flap(em, shared, which, hold, rng).await,
            "kill-restart" => self.kill_restart(shared, which, hold, rng).await,
            "pause" => self.pause(shared, which, hold, rng).await,
            "skew-within" | "skew-beyond" => self.skew(shared, which, hold, rng).await,
            "disk-full" => self.disk_full(shared, which, hold, rng).await,
            "damage-record" => self.damage_record(shared, which, hold, rng).await,
            _ => {
                let Some(what) = self.degrade_links(em, name, rng) else {
                    return;
                };
                shared.set_nemesis(which);
                self.note(shared, format!("nemesis {what} for {hold:?}"));
                tokio::time::sleep(hold).await;
                heal(em);
                shared.set_nemesis(0);
                self.note(shared, "heal".to_string());
            }
        }
    }

    /// Applies a link fault that lasts until [`heal`]: what it did, or `None` if `name` is
    /// not one.
    fn degrade_links(&self, em: &EmulatorHandle, name: &str, rng: &mut Rng) -> Option<String> {
        let n = self.ids.len();
        let ids = &self.ids;
        let what = match name {
            "isolate" => {
                let r = rng.below(n);
                isolate(em, ids, r);
                format!("isolate {}", self.regions[r])
            }
            "halves" => {
                let mut order: Vec<usize> = (0..n).collect();
                rng.shuffle(&mut order);
                let (left, right) = order.split_at(n / 2);
                for &a in left {
                    for &b in right {
                        cut_pair(em, ids, a, b);
                    }
                }
                format!("halves {left:?} | {right:?}")
            }
            "bridge" => {
                let (a, c) = rng.pair(n);
                cut_pair(em, ids, a, c);
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
            _ => return None,
        };
        Some(what)
    }

    /// One region's links cut and healed in turn, every 300-800 ms, for `hold`.
    async fn flap(
        &mut self,
        em: &EmulatorHandle,
        shared: &Shared,
        which: usize,
        hold: Duration,
        rng: &mut Rng,
    ) {
        let r = rng.below(self.ids.len());
        self.note(
            shared,
            format!("nemesis flapping {} for {hold:?}", self.regions[r]),
        );
        shared.set_nemesis(which);
        let until = Instant::now() + hold;
        let mut cut = true;
        while Instant::now() < until {
            if cut {
                isolate(em, &self.ids, r);
            } else {
                heal(em);
            }
            cut = !cut;
            tokio::time::sleep(rng.range_ms(300, 800)).await;
        }
        heal(em);
        shared.set_nemesis(0);
        self.note(shared, "heal".to_string());
    }

    /// SIGKILL one node; after `hold`, restart it with its clock up to 300 ms off.
    async fn kill_restart(&mut self, shared: &Shared, which: usize, hold: Duration, rng: &mut Rng) {
        let r = rng.below(self.ids.len());
        let offset = [0i64, -300, 300][rng.below(3)];
        shared.set_impaired(r, true);
        shared.set_nemesis(which);
        self.cluster.kill(r);
        self.note(
            shared,
            format!(
                "nemesis SIGKILL {} (restart after {hold:?}, clock offset {offset} ms)",
                self.regions[r]
            ),
        );
        tokio::time::sleep(hold).await;
        self.restart(r, offset).await;
        shared.set_impaired(r, false);
        shared.set_nemesis(0);
        self.note(
            shared,
            format!("heal: {} restarted and ready", self.regions[r]),
        );
    }

    /// SIGSTOP one node for `hold`, then SIGCONT.
    async fn pause(&mut self, shared: &Shared, which: usize, hold: Duration, rng: &mut Rng) {
        let r = rng.below(self.ids.len());
        let Some(pid) = self.cluster.process(r).map(NodeProcess::pid) else {
            return;
        };
        shared.set_impaired(r, true);
        shared.set_nemesis(which);
        let _ = meridian_harness::send_signal(pid, meridian_harness::Signal::Stop);
        self.note(
            shared,
            format!("nemesis SIGSTOP {} for {hold:?}", self.regions[r]),
        );
        tokio::time::sleep(hold).await;
        let _ = meridian_harness::send_signal(pid, meridian_harness::Signal::Cont);
        // Requests stuck in the paused process finish after SIGCONT.
        tokio::time::sleep(Duration::from_millis(500)).await;
        shared.set_impaired(r, false);
        shared.set_nemesis(0);
        self.note(shared, format!("heal: SIGCONT {}", self.regions[r]));
    }

    /// One node's wall clock skewed for `hold`: within the max drift (`skew-within`) or far
    /// beyond it (`skew-beyond`), ahead or behind.
    async fn skew(&mut self, shared: &Shared, which: usize, hold: Duration, rng: &mut Rng) {
        let r = rng.below(self.ids.len());
        let magnitude = if NEMESES[which] == "skew-within" {
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
        shared.set_nemesis(which);
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
        shared.set_nemesis(0);
        self.note(
            shared,
            format!("heal: clock of {} back to true time", self.regions[r]),
        );
    }
}
