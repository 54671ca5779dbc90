use super::{Engine, EngineConfig, WriterHandle};
use crate::clock::NodeClock;
use crate::config::Topology;
use crate::store::Store;
use crate::testing;
use meridian_replication::protocol::{Accepted, Plan};
use meridian_replication::{RecordDoc, Version};
use serde_json::{Value as Json, json};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn plan_of(key: &str, hlc: u64, change: &[u8]) -> Plan {
    let mut plan = Plan::default();
    plan.by_key.insert(
        key.to_string(),
        vec![Accepted {
            origin: "us-1".into(),
            hlc,
            key: key.to_string(),
            change: change.to_vec(),
            held_for_drift: false,
        }],
    );
    plan
}

/// An engine over a fresh data directory, as the server starts one.
fn start(topology: Arc<Topology>, node_id: &str, data_dir: &Path) -> (Arc<Engine>, WriterHandle) {
    let (store, identity) = Store::open(data_dir, node_id).expect("store");
    let clock =
        NodeClock::new(node_id, topology.clock.max_drift_ms, identity.last_hlc).expect("clock");
    Engine::start(
        topology,
        node_id,
        store,
        clock,
        &identity,
        EngineConfig::default(),
    )
    .expect("engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_batch_holds_its_records_until_committed_and_the_next_merges_on_top() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = testing::topology_text(
        "engine-test",
        "certs/ca.pem",
        &[("eu-1", "eu-west"), ("us-1", "us-east")],
    );
    let topology = Arc::new(testing::parse(&text, dir.path()));
    let (engine, writer) = start(topology, "eu-1", &dir.path().join("data"));
    // Two changes of one record made in us-east, the second on top of the first.
    let now = engine.clock.now().time_ntp64;
    let stamp = |t: u64| Version {
        time_ntp64: t,
        node_hlc_id: 2,
    };
    let mut remote = RecordDoc::new(automerge::ActorId::from(vec![7u8; 16])).expect("doc");
    let value = |v: Json| v.as_object().cloned().expect("an object");
    let first = remote
        .put(&value(json!({"a": 1})), stamp(now - 2))
        .expect("first");
    let second = remote
        .patch(&value(json!({"b": 2})), stamp(now - 1))
        .expect("second");

    let prepared = engine
        .prepare_remote(plan_of("k", now - 2, &first.bytes))
        .await
        .expect("prepare the first");
    // The next batch touches the same record: it waits for the first's commit.
    let next_engine = Arc::clone(&engine);
    let second_bytes = second.bytes.clone();
    let mut next = tokio::spawn(async move {
        next_engine
            .prepare_remote(plan_of("k", now - 1, &second_bytes))
            .await
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut next)
            .await
            .is_err(),
        "the second batch was merged before the first was committed"
    );
    assert!(
        engine.read("k").expect("read").is_none(),
        "visible before its commit"
    );
    let stats = engine.commit_prepared(prepared).await.expect("commit");
    assert_eq!(stats.applied, 1);
    // A record new here with one plain first change: stored as that change, no document.
    let stored = engine.store().record("k").expect("record").expect("stored");
    assert_eq!(stored.doc, first.bytes);
    let next = tokio::time::timeout(Duration::from_secs(30), next)
        .await
        .expect("the second batch is merged once the first is committed")
        .expect("task")
        .expect("prepare the second");
    let stats = engine.commit_prepared(next).await.expect("commit");
    assert_eq!(stats.applied, 1);
    let read = engine.read("k").expect("read").expect("the record");
    assert_eq!(read.view.get("value"), Some(&json!({"a": 1, "b": 2})));
    assert_eq!(read.version, stamp(now - 1));

    // A prepared batch that is dropped is discarded and releases its records.
    let third = RecordDoc::new(automerge::ActorId::from(vec![8u8; 16]))
        .expect("doc")
        .put(&value(json!({"c": 3})), stamp(now))
        .expect("third");
    let dropped = engine
        .prepare_remote(plan_of("j", now, &third.bytes))
        .await
        .expect("prepare");
    drop(dropped);
    assert!(engine.read("j").expect("read").is_none());
    let again = tokio::time::timeout(
        Duration::from_secs(30),
        engine.prepare_remote(plan_of("j", now, &third.bytes)),
    )
    .await
    .expect("the record was released")
    .expect("prepare again");
    engine.commit_prepared(again).await.expect("commit");
    let read = engine.read("j").expect("read").expect("the record");
    assert_eq!(read.view.get("value"), Some(&json!({"c": 3})));

    drop(engine);
    writer.join();
}
