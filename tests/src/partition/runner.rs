//! The cluster under test as the nemesis and the checkers drive it: restarts, clock skews,
//! link state and snapshots of what each node stores; and the log of what was done to it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meridian_harness::SmallDisk;
use serde_json::{Value, json};

use crate::Cluster;

use super::history::Shared;

pub(super) struct Runner {
    /// Each node's data directory on its own small disk (dropped, so unmounted, before the
    /// cluster's directory is removed), or why the disk nemeses cannot run.
    pub(super) disks: Result<Vec<SmallDisk>, String>,
    pub(super) cluster: Cluster,
    /// The topology whose every link goes through the emulator.
    pub(super) links_topology: PathBuf,
    pub(super) ids: Vec<String>,
    pub(super) regions: Vec<String>,
    pub(super) client: reqwest::Client,
    /// The nemesis log, one line per fault and heal, as printed.
    pub(super) log: Vec<String>,
    /// Every fault applied, by name, in order.
    pub(super) applied: Vec<&'static str>,
    /// A nemesis that could not be applied (a violation: the run did not test what it claims).
    pub(super) problems: Vec<String>,
}

impl Runner {
    pub(super) fn new(
        cluster: Cluster,
        disks: Result<Vec<SmallDisk>, String>,
        links_topology: PathBuf,
        client: reqwest::Client,
    ) -> Runner {
        let ids = cluster.nodes.iter().map(|s| s.id.clone()).collect();
        let regions = cluster.nodes.iter().map(|s| s.region.clone()).collect();
        Runner {
            disks,
            cluster,
            links_topology,
            ids,
            regions,
            client,
            log: Vec::new(),
            applied: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// Prints `text` with the run's clock and keeps it for the summary.
    pub(super) fn note(&mut self, shared: &Shared, text: String) {
        let line = format!("[{:>7} ms] {text}", shared.now_ms());
        println!("{line}");
        self.log.push(line);
    }

    /// Starts node `i` again (clock control on, its wall clock `offset_ms` off) and waits
    /// until it is ready.
    pub(super) async fn restart(&mut self, i: usize, offset_ms: i64) {
        let offset = offset_ms.to_string();
        let mut extra = vec!["--test-clock-control"];
        if offset_ms != 0 {
            extra.extend(["--test-clock-offset-ms", &offset]);
        }
        let topo = self.links_topology.clone();
        self.cluster.start_with(i, &topo, &extra);
        self.cluster.wait_ready(i, &self.client).await;
    }

    /// Skews node `i`'s wall clock through its test-only clock control; false if it refused.
    pub(super) async fn set_clock_offset(&self, i: usize, offset_ms: i64) -> bool {
        self.client
            .put(self.cluster.url(i, "/v1/test/clock-offset"))
            .json(&json!({ "offset_ms": offset_ms }))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Whether node `i` reports every other node connected.
    pub(super) async fn peers_connected(&self, i: usize) -> bool {
        let Ok(r) = self
            .client
            .get(self.cluster.url(i, "/v1/status"))
            .send()
            .await
        else {
            return false;
        };
        let Ok(v) = r.json::<Value>().await else {
            return false;
        };
        v.get("peers").and_then(Value::as_array).is_some_and(|ps| {
            ps.len() + 1 == self.ids.len()
                && ps
                    .iter()
                    .all(|p| p.get("connected").and_then(Value::as_bool) == Some(true))
        })
    }

    /// Every record stored on node `i` (paginated list), key -> (value, version, conflicts).
    pub(super) async fn snapshot(&self, i: usize) -> Option<BTreeMap<String, Value>> {
        let mut out = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = self.cluster.url(i, "/v1/kv?limit=1000");
            if let Some(a) = &after {
                // Keys here use only [a-z0-9/]: no escaping needed.
                url.push_str(&format!("&after={a}"));
            }
            let page: Value = self.client.get(url).send().await.ok()?.json().await.ok()?;
            for item in page.get("items")?.as_array()? {
                let key = item.get("key")?.as_str()?.to_string();
                let rec = json!({
                    "value": item.get("value"),
                    "version": item.get("version"),
                    "conflicts": item.get("conflicts"),
                });
                out.insert(key, rec);
            }
            match page.get("next").and_then(Value::as_str) {
                Some(n) => after = Some(n.to_string()),
                None => return Some(out),
            }
        }
    }

    /// Snapshots of every node, or `None` if one of them did not answer.
    pub(super) async fn snapshots(&self) -> Option<Vec<BTreeMap<String, Value>>> {
        let mut snaps = Vec::new();
        for i in 0..self.ids.len() {
            snaps.push(self.snapshot(i).await?);
        }
        Some(snaps)
    }
}
