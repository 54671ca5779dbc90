//! The run's report: reads the scenarios' JSON files from the output folder and writes
//! `report.md` and PNG plots beside them. Every section is drawn only from figures measured
//! in this run (a scenario that did not run is named as missing, never filled in).
//!
//! `meridian-bench report --out DIR` re-renders an earlier run; `all` calls it at the end.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Context, Result};
use crate::plot::{self, Chart, Scale, Series, SeriesStyle};

/// The scenario files a full run writes, in report order.
pub const SCENARIOS: [&str; 5] = ["write", "lag", "catchup", "peers", "scale"];

/// The plots of a report (file name, what it shows).
pub const PLOTS: [(&str, &str); 6] = [
    (
        "latency-vs-clients.png",
        "durable write latency against concurrent clients",
    ),
    (
        "throughput-vs-clients.png",
        "durable writes/s against concurrent clients",
    ),
    (
        "lag-vs-delay.png",
        "replication lag against injected one-way delay",
    ),
    (
        "meridian-vs-etcd.png",
        "write latency against one-way delay: Meridian vs etcd",
    ),
    ("catchup-curve.png", "changes applied while catching up"),
    (
        "write-p50-at-40ms.png",
        "write latency p50 at 40 ms one-way delay, every system",
    ),
];

fn load(dir: &Path, scenario: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(format!("{scenario}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

fn num(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) if v >= 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.2} ms"),
        None => "–".into(),
    }
}

fn thousands(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), crate::report::thousands)
}

/// Points `(x, y)` from an array of objects, skipping entries without both numbers.
fn points(items: Option<&Vec<Value>>, x: &str, y: &str) -> Vec<(f64, f64)> {
    items
        .map(|items| {
            items
                .iter()
                .filter_map(|i| Some((num(i, x)?, num(i, y)?)))
                .collect()
        })
        .unwrap_or_default()
}

fn series(name: &str, style: SeriesStyle, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.into(),
        points,
        style,
    }
}

/// A horizontal dashed line at `y` across `xs`.
fn floor(name: &str, y: Option<f64>, xs: &[f64]) -> Option<Series> {
    let y = y?;
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo.is_finite() && hi.is_finite())
        .then(|| series(name, SeriesStyle::Dashed, vec![(lo, y), (hi, y)]))
}

/// What a report produced.
pub struct Written {
    pub markdown: PathBuf,
    pub plots: Vec<PathBuf>,
    /// Plots that could not be drawn, with the reason.
    pub plot_errors: Vec<String>,
}

/// Writes `report.md` and the plots into `dir` from the JSON files found there.
pub fn write(dir: &Path) -> Result<Written> {
    let data: Vec<(&str, Option<Value>)> = SCENARIOS.iter().map(|s| (*s, load(dir, s))).collect();
    let get = |name: &str| {
        data.iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_ref())
    };
    let (write, lag, catchup, peers, scale) = (
        get("write"),
        get("lag"),
        get("catchup"),
        get("peers"),
        get("scale"),
    );
    let mut plots = Vec::new();
    let mut plot_errors = Vec::new();
    let mut draw = |name: &str, result: Result<()>| match result {
        Ok(()) => plots.push(dir.join(name)),
        Err(e) => plot_errors.push(format!("{name}: {e}")),
    };

    let mut md = String::from("# Meridian benchmark report\n\n");
    let machine = data.iter().find_map(|(_, v)| v.as_ref()?.get("machine"));
    if let Some(m) = machine {
        let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let _ = writeln!(
            md,
            "Run at {} on commit `{}`: {} cores, Linux {} {}, load average at start {}. \
             Command: `{}`.\n",
            s("timestamp"),
            s("git_commit"),
            m.get("nproc").and_then(Value::as_u64).unwrap_or(0),
            s("kernel"),
            s("arch"),
            s("loadavg_at_start"),
            m.get("command_line")
                .and_then(Value::as_array)
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default()
        );
    }
    let missing: Vec<&str> = data
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(
            md,
            "Not in this run (no JSON file in the output folder): {}.\n",
            missing.join(", ")
        );
    }

    // Targets of every scenario, in one table.
    md.push_str("## Targets\n\n| scenario | target | value | status |\n|---|---|---|---|\n");
    for (name, v) in &data {
        for t in v
            .as_ref()
            .and_then(|v| v.get("targets"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let f = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("");
            let value = match (t.get("value").and_then(Value::as_str), num(t, "/value_ms")) {
                (Some(v), _) => v.to_string(),
                (None, Some(v)) => format!("{} (bound {})", ms(Some(v)), ms(num(t, "/bound_ms"))),
                (None, None) => "–".into(),
            };
            let status = match f("status") {
                "MISS" => "**MISS**",
                s => s,
            };
            let _ = writeln!(md, "| {name} | {} | {value} | {status} |", f("name"));
        }
    }
    // Meridian against etcd at 40 ms, at the same concurrency (one client, sequential).
    let etcd_40_p50 = peers
        .and_then(|p| p.pointer("/etcd/delays"))
        .and_then(Value::as_array)
        .and_then(|d| d.iter().find(|e| num(e, "/delay_ms") == Some(40.0)))
        .and_then(|e| num(e, "/p50_ms"));
    let meridian_1_p50 = write.and_then(|w| num(w, "/latency_1_client/p50_ms"));
    if let (Some(e), Some(m)) = (etcd_40_p50, meridian_1_p50)
        && m > 0.0
    {
        let ratio = e / m;
        let _ = writeln!(
            md,
            "| peers | write latency ≥ 50× lower than etcd at 40 ms one-way (p50, 1 client each) | \
             {ratio:.0}× (etcd {} / Meridian {}) | {} |",
            ms(Some(e)),
            ms(Some(m)),
            if ratio >= 50.0 { "PASS" } else { "**MISS**" }
        );
    }
    md.push('\n');

    md.push_str(
        "## Durability of each system\n\n\
         * **Meridian**: a write is answered after the batch holding it is appended to the commit \
         log and `fdatasync`'d and its redb transaction is committed (group commit: concurrent \
         writes share one append and one sync; redb is synced by a checkpoint every 200 ms).\n\
         * **Redis** (floor for a local durable write): `appendonly yes`, `appendfsync always` \
         (the AOF is fsynced before each reply; concurrent clients share fsyncs), no RDB snapshots.\n\
         * **etcd** (consensus peer): 3 members, default durability (the leader and a quorum \
         fsync their WAL before a put is acknowledged); peer links through the link emulator's \
         TCP relays with the same injected delays.\n\n",
    );
    if let Some(p) = peers {
        let f = |ptr: &str| p.pointer(ptr).and_then(Value::as_str).unwrap_or("?");
        let _ = writeln!(
            md,
            "As run: {} — {}.\n\n{} — {}; {}.\n",
            f("/versions/redis"),
            f("/redis/durability"),
            f("/versions/etcd"),
            f("/etcd/durability"),
            f("/etcd/election"),
        );
    }

    // Local durable writes.
    md.push_str("## Local durable writes\n\n");
    let fsync_p50_ms = write
        .and_then(|w| num(w, "/fsync_floor/p50_us"))
        .map(|u| u / 1000.0);
    let fsync_p99_ms = write
        .and_then(|w| num(w, "/fsync_floor/p99_us"))
        .map(|u| u / 1000.0);
    let _ = writeln!(
        md,
        "Raw fsync of the data disk (4 KiB append + fdatasync): p50 {}, p99 {}.\n",
        ms(fsync_p50_ms),
        ms(fsync_p99_ms)
    );
    let meridian_levels = write
        .and_then(|w| w.get("throughput"))
        .and_then(Value::as_array);
    let redis_levels = peers
        .and_then(|p| p.pointer("/redis/levels"))
        .and_then(Value::as_array);
    md.push_str(
        "| clients | Meridian writes/s | p50 | p99 | p999 | Redis (fsync always) writes/s | p50 | p99 | p999 |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let mut levels: Vec<u64> = meridian_levels
        .into_iter()
        .chain(redis_levels)
        .flatten()
        .filter_map(|l| l.get("clients").and_then(Value::as_u64))
        .collect();
    levels.sort_unstable();
    levels.dedup();
    let at = |items: Option<&Vec<Value>>, c: u64| {
        items.and_then(|i| {
            i.iter()
                .find(|l| l.get("clients").and_then(Value::as_u64) == Some(c))
                .cloned()
        })
    };
    for c in &levels {
        let m = at(meridian_levels, *c);
        let r = at(redis_levels, *c);
        let f = |v: &Option<Value>, k: &str| v.as_ref().and_then(|v| num(v, k));
        let _ = writeln!(
            md,
            "| {c} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(f(&m, "/writes_per_sec")),
            ms(f(&m, "/p50_ms")),
            ms(f(&m, "/p99_ms")),
            ms(f(&m, "/p999_ms")),
            thousands(f(&r, "/writes_per_sec")),
            ms(f(&r, "/p50_ms")),
            ms(f(&r, "/p99_ms")),
            ms(f(&r, "/p999_ms")),
        );
    }
    if let Some(l) = write.and_then(|w| w.get("latency_1_client")) {
        let _ = writeln!(
            md,
            "\nSequential writes at 1 client (the latency target's measurement): p50 {}, p99 {}, \
             p999 {}.",
            ms(num(l, "/p50_ms")),
            ms(num(l, "/p99_ms")),
            ms(num(l, "/p999_ms"))
        );
    }
    let xs: Vec<f64> = levels.iter().map(|c| *c as f64).collect();
    let mut lat = vec![
        series(
            "Meridian p50",
            SeriesStyle::LinePoints,
            points(meridian_levels, "/clients", "/p50_ms"),
        ),
        series(
            "Meridian p99",
            SeriesStyle::LinePoints,
            points(meridian_levels, "/clients", "/p99_ms"),
        ),
    ];
    if redis_levels.is_some() {
        lat.push(series(
            "Redis fsync-always p50",
            SeriesStyle::LinePoints,
            points(redis_levels, "/clients", "/p50_ms"),
        ));
        lat.push(series(
            "Redis fsync-always p99",
            SeriesStyle::LinePoints,
            points(redis_levels, "/clients", "/p99_ms"),
        ));
    }
    lat.extend(floor("raw fsync p50 (floor)", fsync_p50_ms, &xs));
    draw(
        PLOTS[0].0,
        plot::line_chart(
            &dir.join(PLOTS[0].0),
            &Chart {
                title: "Durable write latency vs concurrent clients",
                x_label: "concurrent clients",
                y_label: "latency (ms)",
                x_scale: Scale::Log,
                y_scale: Scale::Log,
                series: &lat,
            },
        ),
    );
    let mut tput = vec![series(
        "Meridian",
        SeriesStyle::LinePoints,
        points(meridian_levels, "/clients", "/writes_per_sec"),
    )];
    if redis_levels.is_some() {
        tput.push(series(
            "Redis fsync-always",
            SeriesStyle::LinePoints,
            points(redis_levels, "/clients", "/writes_per_sec"),
        ));
    }
    tput.extend(floor("target at 64 clients: 20,000/s", Some(20_000.0), &xs));
    draw(
        PLOTS[1].0,
        plot::line_chart(
            &dir.join(PLOTS[1].0),
            &Chart {
                title: "Durable writes per second vs concurrent clients",
                x_label: "concurrent clients",
                y_label: "writes/s",
                x_scale: Scale::Log,
                y_scale: Scale::Log,
                series: &tput,
            },
        ),
    );
    let _ = writeln!(md, "\n![]({})\n\n![]({})\n", PLOTS[0].0, PLOTS[1].0);

    // Replication lag against delay.
    md.push_str("## Replication lag against injected one-way delay\n\n");
    let phases = lag.and_then(|l| l.get("phases")).and_then(Value::as_array);
    if let Some(phases) = phases {
        md.push_str(
            "| one-way delay (floor) | lag p50 | lag p99 | lag p999 | write at A p50 | p99 | p999 | achieved writes/s |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for p in phases {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                ms(num(p, "/delay_ms")),
                ms(num(p, "/lag/p50_ms")),
                ms(num(p, "/lag/p99_ms")),
                ms(num(p, "/lag/p999_ms")),
                ms(num(p, "/write_latency/p50_ms")),
                ms(num(p, "/write_latency/p99_ms")),
                ms(num(p, "/write_latency/p999_ms")),
                thousands(num(p, "/achieved_rate")),
            );
        }
        if let Some(part) = lag.and_then(|l| l.get("partition")) {
            let _ = writeln!(
                md,
                "\nDuring a partition (both directions cut): writes at A p50 {}, p99 {}, p999 {}, \
                 errors {}; after the heal the other region caught up with the backlog of {} \
                 changes in {} s.",
                ms(num(part, "/write_latency/p50_ms")),
                ms(num(part, "/write_latency/p99_ms")),
                ms(num(part, "/write_latency/p999_ms")),
                part.get("errors").map_or("?".into(), Value::to_string),
                part.get("backlog").map_or("?".into(), Value::to_string),
                num(part, "/catchup_secs").map_or("–".into(), |s| format!("{s:.2}")),
            );
        }
        let delays: Vec<f64> = points(Some(phases), "/delay_ms", "/delay_ms")
            .iter()
            .map(|p| p.0)
            .collect();
        let lag_series = vec![
            series(
                "lag p50",
                SeriesStyle::LinePoints,
                points(Some(phases), "/delay_ms", "/lag/p50_ms"),
            ),
            series(
                "lag p99",
                SeriesStyle::LinePoints,
                points(Some(phases), "/delay_ms", "/lag/p99_ms"),
            ),
            series(
                "floor: the injected one-way delay",
                SeriesStyle::Dashed,
                delays.iter().map(|d| (*d, *d)).collect(),
            ),
            series(
                "target p99: delay + 20 ms",
                SeriesStyle::Dashed,
                delays.iter().map(|d| (*d, d + 20.0)).collect(),
            ),
        ];
        draw(
            PLOTS[2].0,
            plot::line_chart(
                &dir.join(PLOTS[2].0),
                &Chart {
                    title: "Replication lag at 1,000 writes/s vs one-way delay",
                    x_label: "injected one-way delay (ms)",
                    y_label: "lag (ms)",
                    x_scale: Scale::Linear,
                    y_scale: Scale::Linear,
                    series: &lag_series,
                },
            ),
        );
        let _ = writeln!(md, "\n![]({})\n", PLOTS[2].0);
    } else {
        md.push_str("Not measured in this run.\n\n");
    }

    // Meridian against etcd.
    md.push_str("## Write latency against one-way delay: Meridian vs etcd\n\n");
    let etcd = peers
        .and_then(|p| p.pointer("/etcd/delays"))
        .and_then(Value::as_array);
    if let (Some(etcd), Some(phases)) = (etcd, phases) {
        md.push_str(
            "| one-way delay | Meridian p50 | Meridian p99 | etcd p50 | etcd p99 | etcd p50 / Meridian p50 |\n\
             |---|---|---|---|---|---|\n",
        );
        for e in etcd {
            let d = num(e, "/delay_ms");
            let m = phases
                .iter()
                .find(|p| num(p, "/delay_ms") == d && d.is_some());
            let mp50 = m.and_then(|m| num(m, "/write_latency/p50_ms"));
            let ep50 = num(e, "/p50_ms");
            let ratio = match (ep50, mp50) {
                (Some(e), Some(m)) if m > 0.0 => format!("{:.0}×", e / m),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {ratio} |",
                ms(d),
                ms(mp50),
                ms(m.and_then(|m| num(m, "/write_latency/p99_ms"))),
                ms(ep50),
                ms(num(e, "/p99_ms")),
            );
        }
        md.push_str(
            "\nMeridian's figures are A's write latency in the lag scenario's phase with the same \
             delay (1,000 writes/s, open loop); etcd's are sequential puts at the leader from one \
             client, through the same emulator.\n",
        );
        let cmp = vec![
            series(
                "Meridian p50",
                SeriesStyle::LinePoints,
                points(Some(phases), "/delay_ms", "/write_latency/p50_ms"),
            ),
            series(
                "Meridian p99",
                SeriesStyle::LinePoints,
                points(Some(phases), "/delay_ms", "/write_latency/p99_ms"),
            ),
            series(
                "etcd p50",
                SeriesStyle::LinePoints,
                points(Some(etcd), "/delay_ms", "/p50_ms"),
            ),
            series(
                "etcd p99",
                SeriesStyle::LinePoints,
                points(Some(etcd), "/delay_ms", "/p99_ms"),
            ),
        ];
        draw(
            PLOTS[3].0,
            plot::line_chart(
                &dir.join(PLOTS[3].0),
                &Chart {
                    title: "Write latency vs one-way delay: Meridian (local) vs etcd (consensus)",
                    x_label: "injected one-way delay (ms)",
                    y_label: "write latency (ms)",
                    x_scale: Scale::Linear,
                    y_scale: Scale::Log,
                    series: &cmp,
                },
            ),
        );
        // One bar per system at 40 ms: the headline comparison.
        let at40 = |items: &[Value], key: &str| {
            items
                .iter()
                .find(|p| num(p, "/delay_ms") == Some(40.0))
                .and_then(|p| num(p, key))
        };
        let mut bars = Vec::new();
        if let Some(v) = at40(phases, "/write_latency/p50_ms") {
            bars.push(("Meridian (local write, 40 ms links)".to_string(), v));
        }
        if let Some(v) = at40(etcd, "/p50_ms") {
            bars.push(("etcd (consensus, 40 ms links)".to_string(), v));
        }
        if let Some(v) = at(redis_levels, 1).and_then(|r| num(&r, "/p50_ms")) {
            bars.push(("Redis appendfsync always (1 client)".to_string(), v));
        }
        if let Some(v) = fsync_p50_ms {
            bars.push(("raw fsync of the disk (floor)".to_string(), v));
        }
        draw(
            PLOTS[5].0,
            plot::bar_chart(
                &dir.join(PLOTS[5].0),
                "Write latency p50 at 40 ms one-way delay",
                "p50 latency (ms)",
                Scale::Log,
                &bars,
            ),
        );
        let _ = writeln!(md, "\n![]({})\n\n![]({})\n", PLOTS[3].0, PLOTS[5].0);
    } else {
        md.push_str("Needs both `lag` and `peers` (run with `--with-peers`).\n\n");
    }

    // Catch-up.
    md.push_str("## Catch-up after a backlog\n\n");
    if let Some(c) = catchup.and_then(|c| c.get("catchup")) {
        let _ = writeln!(
            md,
            "{} changes applied in {} s from the heal of the partition (from the node's start \
             with `catchup --mode restart`): {} changes/s; {} changes/s while streaming.\n",
            thousands(num(c, "/changes")),
            num(c, "/secs_from_start").map_or("–".into(), |s| format!("{s:.2}")),
            thousands(num(c, "/changes_per_sec_from_start")),
            thousands(num(c, "/changes_per_sec_streaming")),
        );
        let curve: Vec<(f64, f64)> = c
            .get("curve")
            .and_then(Value::as_array)
            .map(|pts| {
                pts.iter()
                    .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let xs: Vec<f64> = curve.iter().map(|p| p.0).collect();
        let mut s = vec![series("changes applied", SeriesStyle::Line, curve)];
        s.extend(floor("backlog", num(c, "/changes"), &xs));
        draw(
            PLOTS[4].0,
            plot::line_chart(
                &dir.join(PLOTS[4].0),
                &Chart {
                    title: "Catch-up: changes applied since the node came back",
                    x_label: "seconds since the node started",
                    y_label: "changes applied",
                    x_scale: Scale::Linear,
                    y_scale: Scale::Linear,
                    series: &s,
                },
            ),
        );
        let _ = writeln!(md, "![]({})\n", PLOTS[4].0);
    } else {
        md.push_str("Not measured in this run.\n\n");
    }

    // Scale.
    md.push_str("## Scale\n\n");
    match scale {
        Some(sc) => {
            let cps = sc
                .pointer("/keyspace/checkpoints")
                .and_then(Value::as_array);
            md.push_str(
                "| records | load rate (64 clients) | insert p50 / p99 (1 client) | update p50 / p99 | writes/s (64 clients) | RSS | RSS per record | disk allocated per record |\n\
                 |---|---|---|---|---|---|---|---|\n",
            );
            for c in cps.into_iter().flatten() {
                let _ = writeln!(
                    md,
                    "| {} | {}/s | {} / {} | {} / {} | {} | {:.1} MiB | {} B | {} B |",
                    thousands(num(c, "/records")),
                    thousands(num(c, "/load/writes_per_sec")),
                    ms(num(c, "/insert_1_client/p50_ms")),
                    ms(num(c, "/insert_1_client/p99_ms")),
                    ms(num(c, "/update_1_client/p50_ms")),
                    ms(num(c, "/update_1_client/p99_ms")),
                    thousands(num(c, "/throughput/writes_per_sec")),
                    num(c, "/memory/rss_bytes").unwrap_or(0.0) / 1_048_576.0,
                    thousands(num(c, "/rss_bytes_per_record")),
                    thousands(num(c, "/disk_allocated_bytes_per_record")),
                );
            }
            md.push_str(
                "\n| regions | write p50 / p99 at node 0 (1 client) | writes/s at node 0 (64 clients) | last write visible on the last node |\n\
                 |---|---|---|---|\n",
            );
            for r in sc
                .get("regions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let _ = writeln!(
                    md,
                    "| {} | {} / {} | {} | {} |",
                    r.get("regions").map_or("?".into(), Value::to_string),
                    ms(num(r, "/latency_1_client/p50_ms")),
                    ms(num(r, "/latency_1_client/p99_ms")),
                    thousands(num(r, "/throughput/writes_per_sec")),
                    ms(num(r, "/last_write_visible_ms_on_last_node")),
                );
            }
            if let Some(w) = sc.get("wire") {
                let _ = writeln!(
                    md,
                    "\nBytes on the wire per replicated write ({} B of key and value): {} B A→B and \
                     {} B B→A (idle baseline subtracted; QUIC and TLS included), {:.2} datagrams \
                     A→B per write.\n",
                    num(w, "/payload_bytes_per_write").unwrap_or(0.0),
                    thousands(num(w, "/a_to_b/net_bytes_per_write")),
                    thousands(num(w, "/b_to_a/net_bytes_per_write")),
                    num(w, "/a_to_b/net_packets_per_write").unwrap_or(0.0),
                );
            }
        }
        None => md.push_str("Not measured in this run.\n\n"),
    }

    // Failures and notes of every scenario.
    let mut notes = String::new();
    for (name, v) in &data {
        for (kind, key) in [("FAILED", "failures"), ("note", "notes")] {
            for n in v
                .as_ref()
                .and_then(|v| v.get(key))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let _ = writeln!(notes, "* {name}: {kind}: {n}");
            }
        }
    }
    if !notes.is_empty() {
        md.push_str("## Notes and failures\n\n");
        md.push_str(&notes);
    }
    if !plot_errors.is_empty() {
        md.push_str("\n## Plots that could not be drawn\n\n");
        for e in &plot_errors {
            let _ = writeln!(md, "* {e}");
        }
    }
    let markdown = dir.join("report.md");
    std::fs::write(&markdown, md).with_context(|| format!("writing {}", markdown.display()))?;
    Ok(Written {
        markdown,
        plots,
        plot_errors,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn put(dir: &Path, name: &str, v: &Value) {
        std::fs::write(dir.join(format!("{name}.json")), v.to_string()).expect("write json");
    }

    fn lat(p50: f64) -> Value {
        json!({"p50_ms": p50, "p99_ms": p50 * 2.0, "p999_ms": p50 * 3.0})
    }

    /// A run folder with every scenario, shaped like the scenarios' real JSON.
    fn full_run(dir: &Path) {
        let level = |c: u64, wps: f64, p50: f64| {
            let mut l = lat(p50);
            l["clients"] = json!(c);
            l["writes_per_sec"] = json!(wps);
            l
        };
        put(
            dir,
            "write",
            &json!({
                "machine": {"timestamp": "T", "git_commit": "abc1234", "nproc": 2, "kernel": "k",
                            "arch": "x86_64", "loadavg_at_start": "1 1 1",
                            "command_line": ["meridian-bench", "all"]},
                "fsync_floor": {"p50_us": 200, "p99_us": 300},
                "latency_1_client": lat(1.0),
                "throughput": [level(1, 900.0, 1.1), level(64, 3500.0, 18.0)],
                "targets": [{"name": "p50 at 1 client", "value": "1.000 ms", "status": "MISS"}],
                "failures": [], "notes": ["a write note"]
            }),
        );
        let phase = |d: f64| {
            json!({"delay_ms": d, "lag": lat(d + 5.0), "write_latency": lat(1.5),
                                    "achieved_rate": 1000.0})
        };
        put(
            dir,
            "lag",
            &json!({
                "phases": [phase(0.0), phase(40.0), phase(150.0)],
                "partition": {"write_latency": lat(1.2), "errors": 0, "backlog": 10000,
                              "catchup_secs": 1.5},
                "targets": [{"name": "lag p99 at 40 ms", "value_ms": 50.0, "bound_ms": 60.0,
                             "status": "PASS"}]
            }),
        );
        put(
            dir,
            "catchup",
            &json!({"catchup": {"changes": 1000, "secs_from_start": 0.5,
                                "changes_per_sec_from_start": 2000.0,
                                "changes_per_sec_streaming": 2100.0,
                                "curve": [[0.0, 0.0], [0.25, 500.0], [0.5, 1000.0]]}}),
        );
        let etcd = |d: f64, p50: f64| {
            let mut l = lat(p50);
            l["delay_ms"] = json!(d);
            l
        };
        put(
            dir,
            "peers",
            &json!({
                "versions": {"redis": "Redis 7", "etcd": "etcd 3.4"},
                "redis": {"durability": "fsync always", "levels": [level(1, 4000.0, 0.25),
                                                                   level(64, 50000.0, 1.2)]},
                "etcd": {"durability": "WAL fsync", "election": "3 s",
                         "delays": [etcd(0.0, 1.2), etcd(40.0, 84.0), etcd(150.0, 304.0)]}
            }),
        );
        put(
            dir,
            "scale",
            &json!({
                "keyspace": {"checkpoints": [{"records": 1000000,
                    "load": {"writes_per_sec": 3500.0}, "insert_1_client": lat(1.3),
                    "update_1_client": lat(1.4), "throughput": {"writes_per_sec": 3300.0},
                    "memory": {"rss_bytes": 120_000_000u64}, "rss_bytes_per_record": 120.0,
                    "disk_allocated_bytes_per_record": 1785.0}]},
                "regions": [{"regions": 2, "latency_1_client": lat(1.5),
                             "throughput": {"writes_per_sec": 2600.0},
                             "last_write_visible_ms_on_last_node": 7.0}],
                "wire": {"payload_bytes_per_write": 215.0,
                         "a_to_b": {"net_bytes_per_write": 459.0, "net_packets_per_write": 0.36},
                         "b_to_a": {"net_bytes_per_write": 4.0}},
                "targets": [{"name": "RSS ≤ 200 MiB", "value": "115 MiB", "status": "PASS"}]
            }),
        );
    }

    #[test]
    fn a_full_run_gives_every_section_target_and_plot() {
        let dir = tempfile::tempdir().expect("tempdir");
        full_run(dir.path());
        let written = write(dir.path()).expect("report");
        assert!(written.plot_errors.is_empty(), "{:?}", written.plot_errors);
        for (name, _) in PLOTS {
            let png = std::fs::read(dir.path().join(name)).expect(name);
            assert!(png.starts_with(b"\x89PNG"), "{name} is a PNG");
        }
        let md = std::fs::read_to_string(&written.markdown).expect("report.md");
        assert!(!md.contains("Not in this run"), "{md}");
        // Targets of every scenario, MISS emphasised, floats of the lag targets rendered.
        assert!(
            md.contains("| write | p50 at 1 client | 1.000 ms | **MISS** |"),
            "{md}"
        );
        assert!(md.contains("| lag | lag p99 at 40 ms | 50.0 ms (bound 60.0 ms) | PASS |"));
        // Meridian 1-client p50 1.0 ms vs etcd 84 ms at 40 ms: 84×.
        assert!(
            md.contains("84× (etcd 84.0 ms / Meridian 1.00 ms) | PASS |"),
            "{md}"
        );
        // Both systems side by side per client level.
        assert!(md.contains("| 64 | 3,500 | 18.0 ms |"), "{md}");
        assert!(md.contains("50,000 | 1.20 ms"), "{md}");
        assert!(md.contains("| 150 ms | 155 ms |"), "{md}");
        assert!(md.contains("| 1,000,000 | 3,500/s |"), "{md}");
        assert!(md.contains("459 B A→B"), "{md}");
        assert!(md.contains("write: note: a write note"), "{md}");
        assert!(md.contains("As run: Redis 7 — fsync always."), "{md}");
    }

    #[test]
    fn missing_scenarios_are_named_and_nothing_is_invented() {
        let dir = tempfile::tempdir().expect("tempdir");
        full_run(dir.path());
        for gone in ["peers", "lag", "scale"] {
            std::fs::remove_file(dir.path().join(format!("{gone}.json"))).expect("remove");
        }
        let written = write(dir.path()).expect("report");
        let md = std::fs::read_to_string(&written.markdown).expect("report.md");
        assert!(
            md.contains("Not in this run (no JSON file in the output folder): lag, peers, scale."),
            "{md}"
        );
        assert!(
            !md.contains("etcd 8"),
            "no etcd figure without peers.json: {md}"
        );
        assert!(md.contains("Needs both `lag` and `peers`"));
        // Plots that need the missing scenarios are not drawn; the others are.
        assert!(dir.path().join("latency-vs-clients.png").exists());
        assert!(!dir.path().join("meridian-vs-etcd.png").exists());
        assert!(!dir.path().join("lag-vs-delay.png").exists());
    }
}
