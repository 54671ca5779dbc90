//! Configuration: the topology file (SPEC §3): parsing, validation and look-ups.
//!
//! Architecture invariant: a [`Topology`] value is always valid: every node, region, link and
//! residency rule in it has been checked, so the rest of the node never re-validates it.
//!
//! [`Topology::parse`] works in two passes. The first deserialises the TOML
//! into raw structs (every table denies unknown fields); a syntax or shape
//! error there stops parsing and is reported with its line, column and field
//! path. The second validates the meaning of the whole file and collects
//! *every* problem, so that an operator fixes a file in one round.
//!
//! Extensions to SPEC §3, documented in the project README:
//! - `[tls] cert_dir = "DIR"`: where node certificates and keys live
//!   (`DIR/<node>.pem`, `DIR/<node>.key`); default `certs` next to the file.
//! - `[clock]` may be omitted (`max_drift_ms` defaults to 500).
//!
//! Names of the cluster, regions and nodes are restricted to `[a-z0-9._-]`
//! because they become parts of node identities
//! (`spiffe://<cluster>/region/<region>/node/<node-id>`) and of file names,
//! and identities are compared exactly: a case or a character that URI
//! handling might normalise would make a node unrecognisable to its peers.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meridian_residency::Policy;

/// Default for `[clock] max_drift_ms` (matches uhlc's own default).
pub const DEFAULT_MAX_DRIFT_MS: u64 = 500;
/// Largest accepted `max_drift_ms`: beyond an hour, a "drift" is a broken clock.
pub const MAX_MAX_DRIFT_MS: u64 = 3_600_000;

/// A validated topology file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The trust domain of every node identity.
    pub cluster: String,
    pub tls: TlsConfig,
    pub clock: ClockConfig,
    pub regions: Vec<Region>,
    pub nodes: Vec<NodeConfig>,
    pub residency: Policy,
    pub links: Vec<Link>,
    /// The folder of the topology file, against which relative paths resolve.
    pub base_dir: PathBuf,
}

/// `[tls]`, with paths resolved against the topology file's folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// Folder holding `<node>.pem` and `<node>.key`.
    pub cert_dir: PathBuf,
}

impl TlsConfig {
    /// The certificate chain (PEM) of `node_id`.
    pub fn node_cert(&self, node_id: &str) -> PathBuf {
        self.cert_dir.join(format!("{node_id}.pem"))
    }

    /// The private key (PEM) of `node_id`.
    pub fn node_key(&self, node_id: &str) -> PathBuf {
        self.cert_dir.join(format!("{node_id}.key"))
    }
}

/// `[clock]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockConfig {
    /// A remote HLC timestamp further ahead of the local clock is refused.
    pub max_drift_ms: u64,
}

impl ClockConfig {
    pub fn max_drift(&self) -> Duration {
        Duration::from_millis(self.max_drift_ms)
    }
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
        }
    }
}

/// `[[regions]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub name: String,
}

/// `[[nodes]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: String,
    pub region: String,
    /// QUIC (UDP) replication endpoint: bound by the node, dialled by peers.
    pub peer: SocketAddr,
    /// HTTP client API.
    pub api: SocketAddr,
}

/// `[[links]]`: one directed link routed through a link emulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub from: String,
    pub to: String,
    /// `from` dials this address instead of `to`'s peer address.
    pub via: SocketAddr,
}

impl Topology {
    /// Reads and validates the topology file at `path`.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Topology::parse(&text, path)
    }

    /// Validates topology text. `origin` is the file it came from: it names
    /// the file in messages and its folder anchors relative paths.
    pub fn parse(text: &str, origin: &Path) -> Result<Topology, TopologyError> {
        let invalid = |problems: Vec<Problem>| TopologyError::Invalid {
            file: origin.to_owned(),
            problems,
        };
        let locator = Locator::new(text);
        let raw = parse_raw(text, &locator).map_err(|p| invalid(vec![p]))?;
        let base_dir = match origin.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        Validator::new(&locator)
            .validate(raw, base_dir)
            .map_err(invalid)
    }

    /// The node called `id`.
    pub fn node(&self, id: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The region called `name`.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The region of node `node_id`.
    pub fn region_of(&self, node_id: &str) -> Option<&str> {
        self.node(node_id).map(|n| n.region.as_str())
    }

    /// Every node other than `node_id`, in file order.
    pub fn peers_of<'a>(&'a self, node_id: &'a str) -> impl Iterator<Item = &'a NodeConfig> + 'a {
        self.nodes.iter().filter(move |n| n.id != node_id)
    }

    /// The nodes of region `region`, in file order.
    pub fn nodes_in<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a NodeConfig> + 'a {
        self.nodes.iter().filter(move |n| n.region == region)
    }

    /// The emulated link from `from` to `to`, if the file routes one.
    pub fn link(&self, from: &str, to: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.from == from && l.to == to)
    }

    /// The address `from` dials to reach `to`: the link's `via` if the file
    /// routes that link through an emulator, else `to`'s peer address.
    pub fn dial_addr(&self, from: &str, to: &str) -> Option<SocketAddr> {
        match self.link(from, to) {
            Some(link) => Some(link.via),
            None => self.node(to).map(|n| n.peer),
        }
    }

    /// The identity `spiffe://<cluster>/region/<region>/node/<node-id>` that
    /// `node_id`'s certificate must carry.
    pub fn spiffe_id(&self, node_id: &str) -> Option<String> {
        self.node(node_id)
            .map(|n| spiffe_id(&self.cluster, &n.region, &n.id))
    }

    /// The node whose identity is exactly `uri` (no normalisation of any
    /// kind: a near miss is a stranger).
    pub fn node_by_spiffe_id(&self, uri: &str) -> Option<&NodeConfig> {
        self.nodes
            .iter()
            .find(|n| spiffe_id(&self.cluster, &n.region, &n.id) == uri)
    }

    /// One line describing the topology, e.g. for `meridian topology check`.
    pub fn summary(&self) -> String {
        format!(
            "cluster {:?}: {}, {}, {}, {}",
            self.cluster,
            counted(self.regions.len(), "region", "regions"),
            counted(self.nodes.len(), "node", "nodes"),
            counted(
                self.residency.rules().len(),
                "residency rule",
                "residency rules"
            ),
            counted(self.links.len(), "link", "links"),
        )
    }
}

fn spiffe_id(cluster: &str, region: &str, node: &str) -> String {
    format!("spiffe://{cluster}/region/{region}/node/{node}")
}

fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// What `meridian topology check FILE` prints, and whether the file is valid.
pub fn check_report(path: &Path) -> (String, bool) {
    match Topology::load(path) {
        Ok(topology) => (
            format!("{}: ok: {}", path.display(), topology.summary()),
            true,
        ),
        Err(err) => (err.to_string(), false),
    }
}

/// Why a topology could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read. The message repeats the cause because
    /// command-line callers usually print only the top-level message.
    #[error("{}: cannot read topology file: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file was read but is not a valid topology. Displays one problem
    /// per line, as `FILE:LINE:COL: FIELD: MESSAGE`.
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

impl TopologyError {
    /// The problems found, empty for an I/O error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            TopologyError::Io { .. } => &[],
            TopologyError::Invalid { problems, .. } => problems,
        }
    }
}

fn render_problems(file: &Path, problems: &[Problem]) -> String {
    if problems.is_empty() {
        return format!("{}: invalid topology", file.display());
    }
    problems
        .iter()
        .map(|p| match p.line {
            Some(_) => format!("{}:{p}", file.display()),
            None => format!("{}: {p}", file.display()),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One thing wrong with a topology file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending field, e.g. `nodes[2].region` (0-based indexes).
    /// Empty for a TOML syntax error, which belongs to no field.
    pub field: String,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column, in characters.
    pub column: Option<usize>,
    pub message: String,
}

/// `LINE:COL: FIELD: MESSAGE`, leaving out what is unknown. [`TopologyError`]
/// prefixes the file, giving the `FILE:LINE:COL:` form that editors and CI
/// jump to.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "{line}:{column}: ")?,
            (Some(line), None) => write!(f, "{line}: ")?,
            _ => {}
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

mod parse;
mod validate;

use parse::{Locator, parse_raw};
use validate::Validator;

#[cfg(test)]
mod tests;
