//! What peers report of a node's links, and how long a write on a restarted node takes to be
//! visible elsewhere: shared by the peer-port tests and `restart-visibility`.

use std::time::{Duration, Instant};

use meridian_harness::{ApiClient, metric};
use serde_json::{Value, json};

/// One peer's links as a node reports them: `/v1/status` and `meridian_peer_up`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkReport {
    pub connected: bool,
    pub receiving: bool,
    pub sending: bool,
    pub up_inbound: Option<f64>,
    pub up_outbound: Option<f64>,
    pub receiving_since_unix_ms: Option<u64>,
    pub sending_since_unix_ms: Option<u64>,
}

impl LinkReport {
    /// Both links up, in status and in metrics.
    pub fn all_up(&self) -> bool {
        self.connected
            && self.receiving
            && self.sending
            && self.up_inbound == Some(1.0)
            && self.up_outbound == Some(1.0)
    }

    /// [`LinkReport::all_up`], both links established at or after `unix_ms`.
    pub fn all_up_since(&self, unix_ms: u64) -> bool {
        self.all_up()
            && self.receiving_since_unix_ms.is_some_and(|t| t >= unix_ms)
            && self.sending_since_unix_ms.is_some_and(|t| t >= unix_ms)
    }
}

/// What `api`'s node reports of peer `peer` (of region `peer_region`); `None` while it does
/// not answer.
pub async fn link_report(api: &ApiClient, peer: &str, peer_region: &str) -> Option<LinkReport> {
    let status = api.try_json("/v1/status").await?;
    let entry = status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node"] == peer)?
        .clone();
    let metrics = api.text("/metrics").await?;
    let up = |direction: &str| {
        metric(
            &metrics,
            &format!(
                "meridian_peer_up{{peer=\"{peer}\",peer_region=\"{peer_region}\",direction=\"{direction}\"}}"
            ),
        )
    };
    Some(LinkReport {
        connected: entry["connected"] == json!(true),
        receiving: entry["receiving"]["connected"] == json!(true),
        sending: entry["sending"]["connected"] == json!(true),
        up_inbound: up("inbound"),
        up_outbound: up("outbound"),
        receiving_since_unix_ms: entry["receiving"]["since_unix_ms"].as_u64(),
        sending_since_unix_ms: entry["sending"]["since_unix_ms"].as_u64(),
    })
}

/// PUT `body` at `key` until it is acknowledged (a node that just started may refuse
/// connections for a moment), for up to `deadline`; when it was acknowledged.
pub async fn put_until_acknowledged(
    api: &ApiClient,
    key: &str,
    body: &Value,
    deadline: Duration,
) -> Option<Instant> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        let answer = api
            .http()
            .put(api.url(&format!("/v1/kv/{key}")))
            .json(body)
            .send()
            .await;
        if matches!(answer, Ok(r) if r.status() == 200) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// How long after `since` the record `key` is readable on every node of `others`, polling
/// every 10 ms for up to `deadline`.
pub async fn visible_everywhere_after(
    others: &[ApiClient],
    key: &str,
    since: Instant,
    deadline: Duration,
) -> Option<Duration> {
    let mut pending: Vec<&ApiClient> = others.iter().collect();
    while since.elapsed() < deadline {
        let mut still = Vec::new();
        for api in pending {
            if api.record(key).await.is_none() {
                still.push(api);
            }
        }
        pending = still;
        if pending.is_empty() {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The wall clock in Unix milliseconds, to compare with the `since_unix_ms` nodes report.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
