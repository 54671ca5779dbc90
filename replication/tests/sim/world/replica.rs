//! A replica: its durable store (change logs and frontier, read by the real core through
//! [`ChangeSource`]), its documents, the changes it keeps aside, and its clock.

use super::*;

/// A replica's durable change logs and frontier, as the core's [`ChangeSource`].
///
/// Everything a replica does is one atomic step of the simulation, so its own safe point is
/// simply its newest stamp: its own frontier for every class it may hold is raised with each
/// local write.
#[derive(Default)]
pub struct Store {
    /// Every node of the topology (what the node's `origins()` returns too).
    pub nodes: Vec<String>,
    pub logs: BTreeMap<String, BTreeMap<u64, LogEntry>>,
    pub frontier: Frontier,
}

impl ChangeSource for Store {
    type Error = Infallible;

    fn origins(&self) -> Vec<String> {
        self.nodes.clone()
    }

    fn read_after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, Infallible> {
        Ok(self
            .logs
            .get(origin)
            .map(|log| {
                log.range((Bound::Excluded(after), Bound::Unbounded))
                    .take(limit)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn frontier(&self, origin: &str, class: &str) -> u64 {
        self.frontier.get(origin, class)
    }
}

/// A received change kept aside: waiting for changes it depends on, or held for drift.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Held for drift (else waiting for its dependencies).
    pub held: bool,
    pub origin: String,
    pub hlc: u64,
    pub change: Vec<u8>,
}

pub struct Replica {
    pub idx: usize,
    pub node: String,
    pub region: String,
    /// Bumped at every simulated crash: actor ids are never reused.
    pub incarnation: u8,
    pub base_offset_ms: i64,
    pub offset_ms: i64,
    /// The HLC: the newest stamp issued or observed.
    pub last: u64,
    pub store: Store,
    pub docs: BTreeMap<String, RecordDoc>,
    pub pending: BTreeMap<String, Vec<Pending>>,
}

impl Replica {
    pub fn actor(&self) -> ActorId {
        let mut bytes = vec![0x5a; 16];
        bytes[0] = self.idx as u8;
        bytes[1] = self.incarnation;
        ActorId::from(bytes)
    }

    /// This replica's physical clock, as NTP64.
    pub fn clock(&self, now_ms: u64) -> u64 {
        let ms = (BASE_UNIX_MS + now_ms) as i64 + self.offset_ms;
        ntp64_from_ms(ms as u64)
    }

    pub(super) fn stamp(&self, now_ms: u64) -> Version {
        Version {
            time_ntp64: self.clock(now_ms).max(self.last + 1),
            node_hlc_id: self.idx as u64 + 1,
        }
    }

    /// Offer a key's kept-aside changes to its document, as the node's engine does: every one
    /// waiting for its dependencies, and every one held for drift that is now within the
    /// horizon. Returns how many (still) wait for their dependencies.
    pub(super) fn settle(&mut self, key: &str, now_ntp: u64) -> Result<usize, String> {
        let Some(list) = self.pending.remove(key) else {
            return Ok(0);
        };
        let mut waiting = 0;
        let horizon = now_ntp.saturating_add(ntp64_from_ms(MAX_DRIFT_MS));
        let (mut keep, ready): (Vec<Pending>, Vec<Pending>) =
            list.into_iter().partition(|p| p.held && p.hlc > horizon);
        if !ready.is_empty() {
            let actor = self.actor();
            let doc = match self.docs.entry(key.to_string()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(RecordDoc::new(actor).map_err(|e| format!("RecordDoc::new: {e}"))?)
                }
            };
            let offer: Vec<Vec<u8>> = ready.iter().map(|p| p.change.clone()).collect();
            let r = doc
                .apply_tracked(&offer)
                .map_err(|e| format!("{}: apply_tracked({key}) failed: {e}", self.node))?;
            if !r.undecodable.is_empty() {
                return Err(format!(
                    "{}: undecodable changes for {key}: {:?}",
                    self.node, r.undecodable
                ));
            }
            for &i in &r.applied {
                // Observe the remote stamp (uhlc's update_with_timestamp).
                self.last = self.last.max(ready[i].hlc);
            }
            waiting = r.waiting.len();
            for &i in &r.waiting {
                keep.push(Pending {
                    held: false,
                    ..ready[i].clone()
                });
            }
        }
        if !keep.is_empty() {
            self.pending.insert(key.to_string(), keep);
        }
        Ok(waiting)
    }
}
