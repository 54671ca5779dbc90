//! `meridian-bench`: benchmarks for Meridian. Each scenario is a subcommand;
//! `all` runs every scenario in turn.

mod catchup;
mod cluster;
mod cpu;
mod error;
mod fsync;
mod http;
mod lag;
mod node;
mod peers;
mod plot;
mod prom;
mod rawhttp;
mod report;
mod scale;
mod setup;
mod stats;
mod summary;
mod write;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::error::{Context, Error, Result};

#[derive(Parser, Debug)]
#[command(name = "meridian-bench", version, about = "Benchmarks for Meridian")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Durable writes: raw fsync floor, latency at 1 client, throughput at N clients
    Write {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        write: write::WriteOpts,
    },
    /// Replication lag between two nodes at a steady write rate, for a series of one-way
    /// delays injected by the link emulator; then a partition and the catch-up after it
    Lag {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        lag: lag::LagOpts,
    },
    /// Catch-up rate of a node that comes back to a backlog of changes
    Catchup {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        catchup: catchup::CatchupOpts,
    },
    /// Scale: write cost as the key space and the regions grow, RSS and disk per record,
    /// bytes on the wire per replicated write
    Scale {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        scale: scale::ScaleOpts,
    },
    /// Baselines in the same run: Redis with appendfsync always, and a 3-node etcd cluster
    /// whose peer links go through the link emulator
    Peers {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        peers: peers::PeersOpts,
    },
    /// Writes report.md and the PNG plots from the scenario JSON files in --out
    Report {
        /// The output folder of an earlier run
        #[arg(long, value_name = "DIR", default_value = "bench-out")]
        out: PathBuf,
    },
    /// Every scenario in turn (write, lag, catchup, scale; peers with --with-peers), then
    /// report.md and the plots
    All {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        write: write::WriteOpts,
        #[command(flatten)]
        pair: AllPairArgs,
        #[command(flatten)]
        extra: AllExtraArgs,
    },
}

/// What `all` runs beyond the Meridian-only scenarios.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Peers and scale (under `all`)")]
struct AllExtraArgs {
    /// Also measure the baselines: install (apt) and start Redis and a 3-node etcd cluster,
    /// stop them after
    #[arg(long)]
    with_peers: bool,
    /// Leave out the scale scenario (the longest: it loads up to a million records)
    #[arg(long)]
    skip_scale: bool,
    /// `scale --checkpoints`
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',')]
    scale_checkpoints: Option<Vec<u64>>,
}

/// The options of `lag` and `catchup` under `all`, prefixed so that they do not clash with
/// those of `write`; the others keep their defaults (`--value-bytes` is shared).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Lag and catch-up scenarios (under `all`)")]
struct AllPairArgs {
    /// `lag --rate`
    #[arg(long, value_name = "N", default_value_t = lag::LagOpts::default().rate, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    lag_rate: u64,
    /// `lag --duration-secs`
    #[arg(long, value_name = "SECS", default_value_t = lag::LagOpts::default().duration_secs, value_parser = clap::value_parser!(u64).range(1..))]
    lag_duration_secs: u64,
    /// `lag --warmup-secs`
    #[arg(long, value_name = "SECS", default_value_t = lag::LagOpts::default().warmup_secs)]
    lag_warmup_secs: u64,
    /// `lag --workers`
    #[arg(long, value_name = "N", default_value_t = lag::LagOpts::default().workers, value_parser = clap::value_parser!(u64).range(1..=4096))]
    lag_workers: u64,
    /// `lag --delays-ms`
    #[arg(long, value_name = "MS[,MS...]", value_delimiter = ',', default_values_t = lag::DEFAULT_DELAYS_MS, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    lag_delays_ms: Vec<u64>,
    /// `lag --partition-secs`
    #[arg(long, value_name = "SECS", default_value_t = lag::LagOpts::default().partition_secs)]
    lag_partition_secs: u64,
    /// `catchup --backlog`
    #[arg(long, value_name = "N", default_value_t = catchup::CatchupOpts::default().backlog, value_parser = clap::value_parser!(u64).range(1..))]
    catchup_backlog: u64,
    /// `catchup --clients`
    #[arg(long, value_name = "N", default_value_t = catchup::CatchupOpts::default().clients, value_parser = clap::value_parser!(u64).range(1..=4096))]
    catchup_clients: u64,
    /// `catchup --deadline-secs`
    #[arg(long, value_name = "SECS", default_value_t = catchup::CatchupOpts::default().deadline_secs, value_parser = clap::value_parser!(u64).range(1..))]
    catchup_deadline_secs: u64,
}

impl AllPairArgs {
    fn lag(&self, value_bytes: usize) -> lag::LagOpts {
        lag::LagOpts {
            rate: self.lag_rate,
            duration_secs: self.lag_duration_secs,
            warmup_secs: self.lag_warmup_secs,
            workers: self.lag_workers,
            delays_ms: self.lag_delays_ms.clone(),
            partition_secs: self.lag_partition_secs,
            value_bytes,
            ..lag::LagOpts::default()
        }
    }

    fn catchup(&self, value_bytes: usize) -> catchup::CatchupOpts {
        catchup::CatchupOpts {
            backlog: self.catchup_backlog,
            clients: self.catchup_clients,
            deadline_secs: self.catchup_deadline_secs,
            value_bytes,
            ..catchup::CatchupOpts::default()
        }
    }
}

/// Options every scenario shares: which node, where its data lives, where results go.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Benchmark an already running node (http://HOST:PORT) instead of starting one
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,

    /// The `meridian` binary to start [default: `meridian` next to this executable]
    #[arg(long, value_name = "PATH", conflicts_with = "target")]
    pub meridian_bin: Option<PathBuf>,

    /// The node's data directory (kept after the run; the topology file and certs/
    /// go into its parent) [default: a fresh temporary directory under --data-root]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Where temporary data directories are created; put it on the disk to measure
    #[arg(long, value_name = "DIR", default_value = "target/bench-data")]
    pub data_root: PathBuf,

    /// Keep the temporary data directory after the run
    #[arg(long)]
    pub keep_data: bool,

    /// Directory for results (<scenario>.json) and node logs
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,

    /// How long to wait for GET /readyz to answer 200
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub ready_timeout_secs: u64,
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Write { common, write } => write::run_and_publish(&common, &write).await,
        Cmd::Lag { common, lag } => lag::run_and_publish(&common, &lag).await,
        Cmd::Catchup { common, catchup } => catchup::run_and_publish(&common, &catchup).await,
        Cmd::Peers { common, peers } => peers::run_and_publish(&common, &peers).await,
        Cmd::Scale { common, scale } => scale::run_and_publish(&common, &scale).await,
        Cmd::Report { out } => publish_report(&out),
        Cmd::All {
            common,
            write,
            pair,
            extra,
        } => {
            let mut failed = Vec::new();
            // A report must not mix runs: results of an earlier run are removed first.
            for name in summary::SCENARIOS {
                let old = common.out.join(format!("{name}.json"));
                if old.exists() {
                    std::fs::remove_file(&old)
                        .with_context(|| format!("removing {} of an earlier run", old.display()))?;
                }
            }
            // Each scenario starts its own node(s) in its own data directory.
            if let Err(e) = write::run_and_publish(&common, &write).await {
                eprintln!("meridian-bench: write: {e}");
                failed.push(("write", e));
            }
            if common.target.is_some() {
                eprintln!(
                    "meridian-bench: lag and catchup skipped: they start their own two nodes \
                     and cannot use --target"
                );
            } else {
                // The two-node scenarios need their own data directories: with --data-dir,
                // each gets a subdirectory.
                let sub = |name: &str| {
                    let mut c = common.clone();
                    if let Some(d) = &common.data_dir {
                        c.data_dir = Some(d.join(name));
                    }
                    c
                };
                println!();
                if let Err(e) =
                    lag::run_and_publish(&sub("lag"), &pair.lag(write.value_bytes)).await
                {
                    eprintln!("meridian-bench: lag: {e}");
                    failed.push(("lag", e));
                }
                println!();
                if let Err(e) =
                    catchup::run_and_publish(&sub("catchup"), &pair.catchup(write.value_bytes))
                        .await
                {
                    eprintln!("meridian-bench: catchup: {e}");
                    failed.push(("catchup", e));
                }
                if !extra.skip_scale {
                    println!();
                    let mut opts = scale::ScaleOpts {
                        value_bytes: write.value_bytes,
                        ..scale::ScaleOpts::default()
                    };
                    if let Some(c) = &extra.scale_checkpoints {
                        opts.checkpoints = c.clone();
                    }
                    if let Err(e) = scale::run_and_publish(&sub("scale"), &opts).await {
                        eprintln!("meridian-bench: scale: {e}");
                        failed.push(("scale", e));
                    }
                }
                if extra.with_peers {
                    println!();
                    let opts = peers::PeersOpts {
                        value_bytes: write.value_bytes,
                        clients: write.clients.clone(),
                        ..peers::PeersOpts::default()
                    };
                    if let Err(e) = peers::run_and_publish(&sub("peers"), &opts).await {
                        eprintln!("meridian-bench: peers: {e}");
                        failed.push(("peers", e));
                    }
                }
            }
            println!();
            if let Err(e) = publish_report(&common.out) {
                eprintln!("meridian-bench: report: {e}");
                failed.push(("report", e));
            }
            match failed.len() {
                0 => Ok(()),
                1 if matches!(failed[0].1, Error::Usage(_)) => Err(failed.remove(0).1),
                _ => Err(Error::runtime(format!(
                    "failed scenarios: {}",
                    failed
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
    }
}

/// Writes the Markdown report and plots of the run in `out` and says where they are.
fn publish_report(out: &std::path::Path) -> Result<()> {
    let written = summary::write(out)?;
    println!("report: {}", written.markdown.display());
    for p in &written.plots {
        println!("plot: {}", p.display());
    }
    for e in &written.plot_errors {
        eprintln!("meridian-bench: plot not drawn: {e}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| {
            rt.block_on(async {
                tokio::select! {
                    r = run(cli) => r,
                    _ = tokio::signal::ctrl_c() => Err(Error::runtime("interrupted")),
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian-bench: error: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        // Catches clashing option names between the scenarios flattened into `all`.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn all_takes_prefixed_pair_options() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "meridian-bench",
            "all",
            "--lag-rate",
            "500",
            "--catchup-backlog",
            "10",
            "--duration-secs",
            "3",
        ])
        .expect("valid command line");
        let super::Cmd::All { write, pair, .. } = cli.command else {
            panic!("expected all");
        };
        assert_eq!(write.duration_secs, 3);
        assert_eq!(pair.lag(200).rate, 500);
        assert_eq!(
            pair.lag(200).duration_secs,
            super::lag::LagOpts::default().duration_secs
        );
        assert_eq!(pair.lag(200).delays_ms, super::lag::DEFAULT_DELAYS_MS);
        assert_eq!(pair.lag(200).partition_secs, 10);
        assert_eq!(pair.catchup(200).backlog, 10);
    }
}
