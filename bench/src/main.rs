//! `meridian-bench`: benchmarks for Meridian. Each scenario is a subcommand;
//! `all` runs every scenario in turn.

mod cpu;
mod error;
mod fsync;
mod http;
mod node;
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
    /// Every scenario in turn (currently: write)
    All {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        write: write::WriteOpts,
    },
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
        Cmd::All { common, write } => {
            let mut failed = Vec::new();
            // Later scenarios go here; each one starts its own node.
            if let Err(e) = write::run_and_publish(&common, &write).await {
                eprintln!("meridian-bench: write: {e}");
                failed.push(("write", e));
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
