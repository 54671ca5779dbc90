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
mod prom;
mod report;
mod setup;
mod stats;
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
    /// Replication lag between two nodes on loopback at a steady write rate
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
    /// Every scenario in turn: write, lag, catchup
    All {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        write: write::WriteOpts,
        #[command(flatten)]
        pair: AllPairArgs,
    },
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
        Cmd::All {
            common,
            write,
            pair,
        } => {
            let mut failed = Vec::new();
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
        assert_eq!(pair.lag(200).duration_secs, 20);
        assert_eq!(pair.catchup(200).backlog, 10);
    }
}
