//! `meridian`: the command line of SPEC §2.
//!
//! Exit status: 0 on success, 2 on bad usage or invalid input, 1 on a runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use meridian_node::config::{self as topology, Topology};
use meridian_node::observe::logging::{self, LogFormat};
use meridian_node::peer::tls;
use meridian_node::store::{self as storage, audit};
use meridian_node::tools::{dev, reports};
use meridian_node::{clock, server};

/// automerge's documents are many small allocations; mimalloc makes them and their frees
/// cheaper than glibc's allocator (BENCHMARKS.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: an active-active multi-region data store"
)]
struct Cli {
    /// Log format: readable text, or JSON lines.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one node as declared in the topology.
    Serve {
        #[arg(long)]
        topology: PathBuf,
        #[arg(long)]
        node: String,
        /// Default: data/<node> beside the topology file.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// TEST ONLY: offset this node's wall clock by this many milliseconds (may be
        /// negative), to inject clock skew in partition tests.
        #[arg(long, allow_hyphen_values = true, default_value_t = 0)]
        test_clock_offset_ms: i64,
        /// TEST ONLY: serve `PUT /v1/test/clock-offset` (body `{"offset_ms": N}`), which changes
        /// the wall-clock offset of the running node (the partition suite's skew nemesis).
        #[arg(long)]
        test_clock_control: bool,
        /// Delete at start every record, log entry and kept-aside change that the topology's
        /// residency rules do not allow in this node's region (the report goes to stderr).
        /// Without it, a node holding such data refuses to start.
        #[arg(long)]
        purge_disallowed: bool,
        /// Start even though the commit log is damaged or missing: keep every intact entry,
        /// drop the damaged bytes and log which batches are missing (peers that hold this
        /// node's changes send them back). Without it, such a node refuses to start (exit 1).
        #[arg(long)]
        recover: bool,
    },
    /// Residency tools.
    Residency {
        #[command(subcommand)]
        command: ResidencyCommand,
    },
    /// Topology file tools.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Offline: list every record physically stored in a data directory.
    Dump {
        #[arg(long)]
        data_dir: PathBuf,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate a development CA and a certificate/key pair per node of the topology.
    Certs {
        #[arg(long)]
        topology: PathBuf,
        /// Folder for ca.pem, ca.key, <node>.pem and <node>.key (an existing CA pair there is
        /// reused).
        #[arg(long)]
        out: PathBuf,
    },
    /// Start a complete local cluster (one node per region) and run until Ctrl-C.
    Dev {
        /// Number of regions, one node each (default 3; ignored when DIR already holds a
        /// topology).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=9))]
        regions: Option<u8>,
        /// The cluster's folder: topology, certificates, data and logs. Reused if it exists.
        #[arg(long, default_value = "meridian-dev")]
        dir: PathBuf,
        /// One-way delay, in milliseconds, on every link between regions (through the link
        /// emulator).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=60_000))]
        latency_ms: Option<u64>,
    },
    /// The link emulator: relay the topology's [[links]] through a UDP proxy that injects
    /// delay, jitter, loss, duplication, reordering and partitions (changeable while it runs).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Proxy {
        /// The topology whose [[links]] entries to emulate.
        #[arg(long, required = true)]
        topology: Option<PathBuf>,
        /// Address of the HTTP control API (port 0 picks a free port; printed at start).
        #[arg(long, default_value = "127.0.0.1:0")]
        control: std::net::SocketAddr,
        #[command(subcommand)]
        command: Option<ProxyCommand>,
    },
}

#[derive(Subcommand, Debug)]
enum ProxyCommand {
    /// Change the settings of one link (or all) of a running emulator and print the result.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["link", "all"])))]
    Set {
        /// The emulator's control address (as printed by `meridian proxy`).
        #[arg(long)]
        control: String,
        /// The link FROM:TO (node ids).
        #[arg(long)]
        link: Option<String>,
        /// Every link.
        #[arg(long)]
        all: bool,
        /// One-way delay, milliseconds.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// Uniform jitter ± milliseconds.
        #[arg(long)]
        jitter_ms: Option<u64>,
        /// Loss probability 0..1.
        #[arg(long)]
        loss: Option<f64>,
        /// Duplication probability 0..1.
        #[arg(long)]
        duplicate: Option<f64>,
        /// Reordering probability 0..1.
        #[arg(long)]
        reorder: Option<f64>,
        /// Drop everything (partition).
        #[arg(long, conflicts_with = "up")]
        down: bool,
        /// Carry traffic again.
        #[arg(long)]
        up: bool,
        /// Which direction: both, forward (FROM to TO) or reverse.
        #[arg(long, default_value = "both")]
        direction: meridian_emulator::DirectionSel,
        /// Print the resulting state as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ResidencyCommand {
    /// Offline: list every record, log entry and kept-aside change in a data directory that
    /// the topology's residency rules do not allow in its node's region. Exit 0 if none, 1 if
    /// any, 2 if the audit could not be made. The node must be stopped.
    Audit {
        #[arg(long)]
        topology: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Also check that the directory belongs to this node.
        #[arg(long)]
        node: Option<String>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TopologyCommand {
    /// Validate a topology file; print every problem; exit 0 only if valid.
    Check { file: PathBuf },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Topology {
            command: TopologyCommand::Check { file },
        } => {
            let (report, ok) = topology::check_report(&file);
            if ok {
                println!("{report}");
                ExitCode::SUCCESS
            } else {
                eprintln!("{report}");
                ExitCode::from(EXIT_INVALID)
            }
        }
        Command::Dump { data_dir, json } => dump(&data_dir, json),
        Command::Residency {
            command:
                ResidencyCommand::Audit {
                    topology,
                    data_dir,
                    node,
                    json,
                },
        } => residency_audit(&topology, &data_dir, node.as_deref(), json),
        Command::Certs { topology, out } => certs(&topology, &out),
        Command::Dev {
            regions,
            dir,
            latency_ms,
        } => dev(regions, dir, latency_ms, cli.log_format),
        Command::Proxy {
            topology,
            control,
            command,
        } => proxy(topology, control, command),
        Command::Serve {
            topology,
            node,
            data_dir,
            test_clock_offset_ms,
            test_clock_control,
            purge_disallowed,
            recover,
        } => serve(
            &topology,
            &node,
            data_dir,
            TestClock {
                offset_ms: test_clock_offset_ms,
                control: test_clock_control,
            },
            StartOptions {
                purge_disallowed,
                recover,
            },
        ),
    }
}

/// What `serve` does with a data directory it would otherwise refuse.
struct StartOptions {
    purge_disallowed: bool,
    recover: bool,
}

/// The test-only clock options of `serve`.
struct TestClock {
    offset_ms: i64,
    control: bool,
}

/// A topology that cannot be read or is invalid is bad input (exit 2), whatever the cause.
fn load_topology(path: &std::path::Path) -> Result<Topology, ExitCode> {
    Topology::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_INVALID)
    })
}

/// Prints `value` as pretty JSON; if it cannot be rendered, says so and exits with `code`.
fn print_json(value: &impl serde::Serialize, code: u8) -> Result<(), ExitCode> {
    match serde_json::to_string_pretty(value) {
        Ok(s) => {
            println!("{s}");
            Ok(())
        }
        Err(e) => {
            eprintln!("error: cannot render JSON: {e}");
            Err(ExitCode::from(code))
        }
    }
}

/// The multi-threaded runtime every async command runs on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_RUNTIME)
        })
}

fn serve(
    topology_path: &std::path::Path,
    node_id: &str,
    data_dir: Option<PathBuf>,
    test_clock: TestClock,
    start: StartOptions,
) -> ExitCode {
    let test_clock_offset_ms = test_clock.offset_ms;
    let topology = match load_topology(topology_path) {
        Ok(t) => Arc::new(t),
        Err(code) => return code,
    };
    let Some(node) = topology.node(node_id) else {
        let known: Vec<&str> = topology.nodes.iter().map(|n| n.id.as_str()).collect();
        eprintln!(
            "error: node {node_id:?} is not declared in {}; declared nodes: {}",
            topology_path.display(),
            known.join(", ")
        );
        return ExitCode::from(EXIT_INVALID);
    };
    if test_clock_offset_ms != 0 {
        tracing::warn!(
            offset_ms = test_clock_offset_ms,
            "TEST ONLY: this node's wall clock is skewed"
        );
        clock::set_test_clock_offset_ms(test_clock_offset_ms);
    }
    let api_addr = node.api;
    let data_dir = data_dir.unwrap_or_else(|| server::default_data_dir(&topology, node_id));
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let node_id = node_id.to_string();
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(api_addr)
            .await
            .map_err(|source| server::ServeError::Bind {
                addr: api_addr,
                source,
            })?;
        server::run(
            topology,
            &node_id,
            &data_dir,
            listener,
            server::NodeOptions {
                purge_disallowed: start.purge_disallowed,
                recover_log: start.recover,
                test_clock_control: test_clock.control,
                ..server::NodeOptions::default()
            },
            server::shutdown_signal(),
        )
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node failed");
            eprintln!("error: {e}");
            match e {
                server::ServeError::UnknownNode(_) => ExitCode::from(EXIT_INVALID),
                server::ServeError::Store(storage::StoreError::WrongNode { .. }) => {
                    ExitCode::from(EXIT_INVALID)
                }
                // The data directory holds what the topology does not allow here.
                server::ServeError::Residency(audit::StartRefused::Disallowed { .. }) => {
                    ExitCode::from(EXIT_INVALID)
                }
                _ => ExitCode::from(EXIT_RUNTIME),
            }
        }
    }
}

fn dump(data_dir: &std::path::Path, json: bool) -> ExitCode {
    let (node_id, rows) = match storage::dump(data_dir) {
        Ok(r) => r,
        Err(e @ storage::StoreError::Missing(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    if json {
        let doc = serde_json::json!({"node": node_id, "records": rows});
        if let Err(code) = print_json(&doc, EXIT_RUNTIME) {
            return code;
        }
    } else {
        print!("{}", reports::dump_table(&node_id, &rows));
    }
    ExitCode::SUCCESS
}

/// `meridian residency audit`: 0 clean, 1 violations found, 2 the audit could not be made.
fn residency_audit(
    topology_path: &std::path::Path,
    data_dir: &std::path::Path,
    node: Option<&str>,
    json: bool,
) -> ExitCode {
    let topology = match load_topology(topology_path) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let report = match audit::audit_dir(data_dir, &topology, node) {
        Ok(r) => r,
        Err(e) => {
            // Also a failure while reading is exit 2: exit 1 means "violations found".
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    if json {
        let mut doc = match serde_json::to_value(&report) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: cannot render JSON: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        };
        if let Some(map) = doc.as_object_mut() {
            map.insert(
                "topology".into(),
                topology_path.display().to_string().into(),
            );
            map.insert("data_dir".into(), data_dir.display().to_string().into());
            map.insert("clean".into(), report.is_clean().into());
        }
        if let Err(code) = print_json(&doc, EXIT_INVALID) {
            return code;
        }
    } else {
        print!(
            "{}",
            reports::audit_text(&report, topology_path, data_dir, &topology)
        );
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_RUNTIME)
    }
}

fn certs(topology_path: &std::path::Path, out: &std::path::Path) -> ExitCode {
    let topology = match load_topology(topology_path) {
        Ok(t) => t,
        Err(code) => return code,
    };
    tls::install_crypto_provider();
    match meridian_node::tools::certs::generate_certs(&topology, out) {
        Ok(report) => {
            if report.ca_reused {
                println!("kept the existing CA in {}", out.display());
            }
            for path in &report.written {
                println!("wrote {}", path.display());
            }
            // Compared after writing, when both folders exist and canonicalize can resolve them.
            let same = |a: &std::path::Path, b: &std::path::Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
            if !same(out, &topology.tls.cert_dir) {
                println!(
                    "note: {} expects node certificates in {}",
                    topology_path.display(),
                    topology.tls.cert_dir.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn dev(
    regions: Option<u8>,
    dir: PathBuf,
    latency_ms: Option<u64>,
    log_format: LogFormat,
) -> ExitCode {
    tls::install_crypto_provider();
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let options = dev::DevOptions {
        regions: regions.map(usize::from),
        dir,
        log_format,
        latency_ms,
    };
    match runtime.block_on(dev::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Failures while running were reported (with the node's log) where they happened.
            if !matches!(
                e,
                dev::DevError::NodeExited { .. } | dev::DevError::NotReady { .. }
            ) {
                eprintln!("error: {e}");
            }
            if e.is_invalid_input() {
                ExitCode::from(EXIT_INVALID)
            } else {
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    }
}

/// `meridian proxy`: run the link emulator, or (`proxy set`) change a running one.
fn proxy(
    topology_path: Option<PathBuf>,
    control: std::net::SocketAddr,
    command: Option<ProxyCommand>,
) -> ExitCode {
    use meridian_emulator::{EmulatorOptions, SetTarget, SettingsUpdate, set_remote};
    use meridian_node::tools::proxy_cmd;
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match command {
        None => {
            let Some(path) = topology_path else {
                eprintln!("error: --topology is required");
                return ExitCode::from(EXIT_INVALID);
            };
            let topology = match load_topology(&path) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let result = runtime.block_on(proxy_cmd::run(
                &topology,
                control,
                EmulatorOptions::default(),
                server::shutdown_signal(),
            ));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}: {e}", path.display());
                    if e.is_invalid_input() {
                        ExitCode::from(EXIT_INVALID)
                    } else {
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            }
        }
        Some(ProxyCommand::Set {
            control,
            link,
            all,
            delay_ms,
            jitter_ms,
            loss,
            duplicate,
            reorder,
            down,
            up,
            direction,
            json,
        }) => {
            let target = match (link, all) {
                (Some(link), false) => match SetTarget::parse_link(&link) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_INVALID);
                    }
                },
                _ => SetTarget::All,
            };
            let update = SettingsUpdate {
                delay_ms,
                jitter_ms,
                loss,
                duplicate,
                reorder,
                down: if down {
                    Some(true)
                } else if up {
                    Some(false)
                } else {
                    None
                },
                direction: Some(direction),
            };
            if let Err(e) = update.validate() {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
            match runtime.block_on(set_remote(&control, &target, &update)) {
                Ok(links) => {
                    if json {
                        if let Err(code) = print_json(&links, EXIT_RUNTIME) {
                            return code;
                        }
                    } else {
                        for l in &links {
                            println!("{}", l.render());
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}
