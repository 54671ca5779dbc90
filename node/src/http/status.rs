//! `GET /v1/status`: this node, its frontier and every peer link.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::AppState;

pub(super) async fn status(State(state): State<AppState>) -> Response {
    let engine = &state.engine;
    let peers_snapshot = state.peers.snapshot();
    let mut peers = Vec::new();
    for (node, s) in &peers_snapshot {
        // Changes the peer lacks of what we hold (global records; an estimate capped at 100,000).
        let changes_behind: usize = engine
            .topology
            .nodes
            .iter()
            .filter(|n| n.id != *node)
            .map(|origin| {
                let after = s
                    .peer_frontier
                    .get(&origin.id)
                    .and_then(|v| v.parse::<meridian_replication::Version>().ok())
                    .map_or(0, |v| v.time_ntp64);
                engine
                    .store()
                    .count_after(&origin.id, after, 100_000)
                    .unwrap_or(0)
            })
            .sum();
        peers.push(json!({
            "node": node,
            "region": s.region,
            "connected": s.inbound_connected && s.outbound_connected,
            "receiving": {"connected": s.inbound_connected, "since_unix_ms": s.inbound_since_unix_ms,
                          "changes_applied": s.changes_applied, "lag_ms": s.lag_ms,
                          "last_applied_unix_ms": s.last_applied_unix_ms,
                          "drift_refusals": s.drift_refusals,
                          "residency_violations": s.residency_violations},
            "sending": {"connected": s.outbound_connected, "since_unix_ms": s.outbound_since_unix_ms,
                        "changes_sent": s.changes_sent, "changes_behind": changes_behind,
                        "peer_frontier": s.peer_frontier},
            "lag_ms": s.lag_ms,
            "changes_behind": changes_behind,
            "misbehaving": s.residency_violations > 0,
            "last_error": s.last_error,
        }));
    }
    let frontier: serde_json::Map<String, Json> = engine
        .store()
        .frontier()
        .map(|f| {
            f.iter()
                .filter(|(_, c, _)| c.is_empty())
                .map(|(o, _, h)| {
                    (
                        o.to_string(),
                        Json::String(
                            meridian_replication::Version {
                                time_ntp64: h,
                                node_hlc_id: 0,
                            }
                            .to_string(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let records = engine.store().record_count().ok();
    let now_unix_s = (crate::clock::unix_ms() / 1000) as i64;
    let certificate = engine.health.certificates().map(|c| {
        json!({
            "not_before_unix_s": c.node.not_before_unix_s,
            "not_after_unix_s": c.node.not_after_unix_s,
            "expires_in_s": c.node.seconds_left(now_unix_s),
            "expired": engine.health.certificate_expired(),
            "ca_not_after_unix_s": c.ca.not_after_unix_s,
        })
    });
    let max_drift_ms = engine.topology.clock.max_drift_ms;
    let verdict = engine.health.clock.verdict(
        std::time::Instant::now(),
        crate::observe::clock_offset::SAMPLE_MAX_AGE,
        &state.peers.connected(),
        max_drift_ms,
    );
    let clock = json!({
        "offset_ms_estimate": verdict.offset_ms_estimate,
        "off": engine.health.clock_off(),
        "max_drift_ms": max_drift_ms,
        "peers": verdict.peers,
    });
    axum::Json(json!({
        "cluster": engine.topology.cluster,
        "node": engine.node_id,
        "region": engine.region,
        "incarnation": engine.incarnation,
        "hlc": engine.clock.now().to_string(),
        "ready": engine.ready(),
        "not_ready_reason": engine.not_ready_reason().map(|r| r.code()),
        "certificate": certificate,
        "clock": clock,
        "records_stored": records,
        "frontier": frontier,
        "peers": peers,
    }))
    .into_response()
}
