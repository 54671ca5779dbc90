//! Prints the CPU cost of the record operations on the write path, for profiling:
//! `cargo run --release -p meridian-replication --example record_costs`.
use std::time::Instant;

use automerge::ActorId;
use meridian_replication::{RecordDoc, Version};
use serde_json::json;

/// The example's clock. It measures wall time on purpose; the crate's code never reads one.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn main() {
    let value = json!({"name": "user-00042", "email": "user42@example.org", "n": 42,
                       "tags": ["a", "b"], "active": true, "pad": "x".repeat(60)});
    let map = value.as_object().cloned().unwrap_or_default();
    let n = 2000u64;
    let actor = ActorId::from(vec![7u8; 16]);
    let stamp = |i: u64| Version {
        time_ntp64: 1 << 40 | i << 4,
        node_hlc_id: 1,
    };

    let t = now();
    let mut docs: Vec<RecordDoc> = (0..n)
        .map(|_| RecordDoc::new(actor.clone()).expect("new"))
        .collect();
    let new_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    let mut changes = Vec::new();
    for (i, d) in docs.iter_mut().enumerate() {
        changes.push(d.put(&map, stamp(i as u64)).expect("put"));
    }
    let put_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    for d in &docs {
        let _ = d.view().expect("view");
    }
    let view_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    let saved: Vec<Vec<u8>> = docs.iter_mut().map(|d| d.save()).collect();
    let save_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    for (i, d) in docs.iter_mut().enumerate() {
        let mut m = map.clone();
        m.insert("n".into(), json!(i));
        d.put(&m, stamp(n + i as u64)).expect("put");
    }
    let update_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    for s in &saved {
        let _ = RecordDoc::load(s, actor.clone()).expect("load");
    }
    let load_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    let mut fresh: Vec<RecordDoc> = (0..n)
        .map(|_| RecordDoc::new(ActorId::from(vec![9u8; 16])).expect("new"))
        .collect();
    for (d, c) in fresh.iter_mut().zip(&changes) {
        d.apply_remote([c.bytes.as_slice()]).expect("apply");
    }
    let apply_us = t.elapsed().as_secs_f64() * 1e6 / n as f64 - new_us;

    let t = now();
    let mut tracked: Vec<RecordDoc> = (0..n)
        .map(|_| RecordDoc::new(ActorId::from(vec![9u8; 16])).expect("new"))
        .collect();
    for (d, c) in tracked.iter_mut().zip(&changes) {
        d.apply_tracked(std::slice::from_ref(&c.bytes))
            .expect("apply");
    }
    let tracked_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    let loaded: Vec<RecordDoc> = changes
        .iter()
        .map(|c| RecordDoc::load(&c.bytes, ActorId::from(vec![9u8; 16])).expect("load"))
        .collect();
    let load_change_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = now();
    let expanded: Vec<automerge::ExpandedChange> = changes
        .iter()
        .map(|c| {
            automerge::Change::try_from(c.bytes.as_slice())
                .expect("decode")
                .decode()
        })
        .collect();
    let expand_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = now();
    let mut total = 0;
    for e in expanded {
        let mut c = automerge::Change::from(e);
        total += c.bytes().len();
    }
    let encode_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "change: parse+expand {expand_us:.1} µs  encode from expanded {encode_us:.1} µs ({total} B)"
    );

    let t = now();
    drop(tracked);
    drop(loaded);
    let drop_us = t.elapsed().as_secs_f64() * 1e6 / (2 * n) as f64;

    println!(
        "new record from a remote change, µs: new+apply_tracked {tracked_us:.1}  load change as document {load_change_us:.1}  drop {drop_us:.1}"
    );
    println!(
        "per record, µs: new {new_us:.1}  first put {put_us:.1}  view {view_us:.1}  save {save_us:.1}  update put {update_us:.1}  load {load_us:.1}  apply remote {apply_us:.1}  (saved {} B, change {} B)",
        saved[0].len(),
        changes[0].bytes.len()
    );
}
