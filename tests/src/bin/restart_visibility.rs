//! `restart-visibility [RUNS]`: SIGKILL and restart one node of a 3-region cluster RUNS times
//! (default 10); per run, how long until the restarted node answers a write, until that write
//! is visible on both other regions, and until both report the restarted node connected (both
//! links established after the restart, `meridian_peer_up` 1). Prints each run, then the
//! median and max.

use std::time::{Duration, Instant};

use meridian_harness::DEADLINE;
use meridian_tests::Cluster;
use meridian_tests::restart::{
    link_report, put_until_acknowledged, unix_ms_now, visible_everywhere_after,
};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 10,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: restart-visibility [RUNS]  (RUNS a positive number, default 10)");
            std::process::exit(2);
        }
    };
    let (mut cluster, client) = Cluster::running(3).await;
    let apis: Vec<_> = (0..3).map(|i| cluster.api(i, &client)).collect();
    let restarted_node = cluster.nodes[0].clone();
    let mut visible = Vec::new();
    let mut connected = Vec::new();
    println!(
        "run  restart->write answered  write->visible on both peers  restart->peers report it connected"
    );
    for run in 0..runs {
        // Start each run from a settled cluster: both peers report node 0 connected.
        let settled = all_report_connected(&apis[1..], &restarted_node, 0, DEADLINE).await;
        assert!(
            settled.is_some(),
            "the cluster did not settle before run {run}"
        );
        cluster.kill(0);
        let restart = Instant::now();
        let restart_unix_ms = unix_ms_now();
        cluster.start(0);
        cluster.wait_ready(0, &client).await;
        let key = format!("restart-visibility/{run}");
        let Some(written) =
            put_until_acknowledged(&apis[0], &key, &json!({"run": run}), DEADLINE).await
        else {
            panic!(
                "run {run}: the restarted node took no write; log:\n{}",
                cluster.log(0)
            );
        };
        let Some(latency) = visible_everywhere_after(&apis[1..], &key, written, DEADLINE).await
        else {
            panic!("run {run}: the write never became visible on the peers");
        };
        let up = all_report_connected(&apis[1..], &restarted_node, restart_unix_ms, DEADLINE)
            .await
            .map(|at| at.saturating_duration_since(restart));
        let up_text = up.map_or(format!("never (in {DEADLINE:?})"), |d| {
            format!("{:.3} s", d.as_secs_f64())
        });
        println!(
            "{run:>3}  {:>22.3} s  {:>27.3} s  {up_text:>35}",
            written.duration_since(restart).as_secs_f64(),
            latency.as_secs_f64(),
        );
        if std::env::var_os("RESTART_VISIBILITY_LOGS").is_some()
            && up.is_none_or(|d| d > Duration::from_secs(1))
        {
            for i in 0..3 {
                eprintln!("--- log of node {i}:\n{}", cluster.log(i));
            }
        }
        visible.push(latency);
        match up {
            Some(up) => connected.push(up),
            // Reported wrong for good (F11): later runs would measure nothing more.
            None => break,
        }
    }
    let (median, max) = summary(&mut visible);
    println!(
        "write->visible elsewhere after a SIGKILL restart, {} runs: median {:.3} s, max {:.3} s",
        visible.len(),
        median.as_secs_f64(),
        max.as_secs_f64()
    );
    if connected.len() < visible.len() {
        println!(
            "restart->peers report it connected: never, in run {}",
            connected.len()
        );
        std::process::exit(1);
    }
    let (median, max) = summary(&mut connected);
    println!(
        "restart->peers report it connected: median {:.3} s, max {:.3} s",
        median.as_secs_f64(),
        max.as_secs_f64()
    );
}

/// When every node of `apis` reported both links to `node` up and established at or after
/// `since_unix_ms`, polling every 10 ms for up to `deadline`.
async fn all_report_connected(
    apis: &[meridian_harness::ApiClient],
    node: &meridian_tests::NodeSpec,
    since_unix_ms: u64,
    deadline: Duration,
) -> Option<Instant> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        let mut all = true;
        for api in apis {
            let up = link_report(api, &node.id, &node.region)
                .await
                .is_some_and(|r| r.all_up_since(since_unix_ms));
            all &= up;
        }
        if all {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The median and the max of `samples` (not empty).
fn summary(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    (median, max)
}
