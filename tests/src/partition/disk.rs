//! The disk nemeses: a data directory's disk that fills up while the node runs
//! (`disk-full`), and a flipped byte in a stopped node's database (`damage-record`).
//!
//! Invariant: both are judged by the same checkers as every other fault (nothing
//! acknowledged lost, convergence, residency); on top, each checks what the node must do by
//! itself — serve again without a restart once space is back, and answer a damaged record
//! with its true value once repaired, never with the damaged one.

use std::time::Duration;

use meridian_harness::{ApiClient, DEADLINE, SmallDisk, flip_every, metric, poll_until};
use serde_json::json;

use super::history::Shared;
use super::rng::Rng;
use super::runner::Runner;

/// Each node's data directory on its own tmpfs of this size: far more than a run writes, and
/// filled within a second when the nemesis wants it full.
const DATA_DISK_MIB: u32 = 512;

/// One tmpfs per node's data directory, or why there are none (mounting needs root).
pub(super) fn mount_data_disks(cluster: &crate::Cluster) -> Result<Vec<SmallDisk>, String> {
    (0..cluster.nodes.len())
        .map(|i| SmallDisk::mount(&cluster.data_dir(i), DATA_DISK_MIB))
        .collect()
}

impl Runner {
    /// Fills node `r`'s disk for `hold`, then frees it; the node must serve writes again
    /// without a restart.
    pub(super) async fn disk_full(
        &mut self,
        shared: &Shared,
        which: usize,
        hold: Duration,
        rng: &mut Rng,
    ) {
        let r = rng.below(self.ids.len());
        let Ok(disks) = &self.disks else {
            return;
        };
        shared.set_impaired(r, true);
        shared.set_nemesis(which);
        let taken = disks[r].fill(u64::MAX);
        self.note(
            shared,
            format!(
                "nemesis disk full on {} ({} MiB taken) for {hold:?}",
                self.regions[r],
                taken >> 20
            ),
        );
        tokio::time::sleep(hold).await;
        if let Ok(disks) = &self.disks {
            disks[r].unfill();
        }
        let api = ApiClient::with_http(self.client.clone(), self.cluster.url(r, ""));
        let key = format!("diskfull/{r}/{}", shared.now_ms());
        let writes_again = poll_until(DEADLINE, || async {
            api.put(&key, json!({"after": "disk full"})).await.0 == 200
        })
        .await;
        if !writes_again {
            self.problems.push(format!(
                "{} took no write within {DEADLINE:?} after its disk had room again",
                self.regions[r]
            ));
        }
        shared.set_impaired(r, false);
        shared.set_nemesis(0);
        self.note(
            shared,
            format!("heal: disk of {} has room again", self.regions[r]),
        );
    }

    /// Writes a record with a unique marker to node `r`, stops the node, flips a byte of the
    /// record's stored view in its database, and starts it again: the record must come back
    /// with its true value (rebuilt), never the damaged one.
    pub(super) async fn damage_record(
        &mut self,
        shared: &Shared,
        which: usize,
        hold: Duration,
        rng: &mut Rng,
    ) {
        let r = rng.below(self.ids.len());
        let marker = format!("MARK-{}-{}", rng.next(), shared.now_ms());
        let key = format!("damaged/{r}/{marker}");
        let api = ApiClient::with_http(self.client.clone(), self.cluster.url(r, ""));
        let written = poll_until(DEADLINE, || async {
            api.put(&key, json!({"m": marker})).await.0 == 200
        })
        .await;
        if !written {
            self.problems
                .push(format!("damage-record: {} took no write", self.regions[r]));
            return;
        }
        shared.set_impaired(r, true);
        shared.set_nemesis(which);
        self.cluster.stop(r);
        let db = self.cluster.data_dir(r).join("meridian.redb");
        let needle = format!(r#""m":"{marker}""#);
        let flipped = flip_every(&db, needle.as_bytes());
        self.note(
            shared,
            format!(
                "nemesis damaged {key} in {}'s stopped database ({flipped:?} places), down for {hold:?}",
                self.regions[r]
            ),
        );
        match flipped {
            Ok(n) if n > 0 => {}
            other => self.problems.push(format!(
                "damage-record: the stored view of {key} was not found in {}: {other:?}",
                db.display()
            )),
        }
        tokio::time::sleep(hold).await;
        self.restart(r, 0).await;
        let mut answers = Vec::new();
        let mut repaired = false;
        let until = std::time::Instant::now() + DEADLINE;
        while !repaired && std::time::Instant::now() < until {
            let (status, body) = api.get(&key).await;
            repaired = status == 200 && body["value"]["m"] == marker.as_str();
            if status == 200 && !repaired {
                answers.push(format!("200 with a wrong value: {body}"));
            }
            if !repaired {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if !repaired || !answers.is_empty() {
            self.problems.push(format!(
                "damage-record: {key} on {} repaired: {repaired}; wrong answers: {answers:?}",
                self.regions[r]
            ));
        }
        let metrics = api.text("/metrics").await.unwrap_or_default();
        let rebuilt = metric(
            &metrics,
            "meridian_record_repairs_total{reason=\"rebuilt\"}",
        );
        if !rebuilt.is_some_and(|n| n >= 1.0) {
            self.problems.push(format!(
                "damage-record: {} counts no rebuilt record ({rebuilt:?})",
                self.regions[r]
            ));
        }
        shared.set_impaired(r, false);
        shared.set_nemesis(0);
        self.note(
            shared,
            format!("heal: {key} repaired on {}", self.regions[r]),
        );
    }
}
