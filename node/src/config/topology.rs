//! The topology file (SPEC §3): parsing, validation and look-ups.
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meridian_residency::{Foreign, Policy, RuleField, RuleSpec};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

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

// ---------------------------------------------------------------------------
// First pass: TOML into raw structs.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    cluster: Spanned<String>,
    tls: RawTls,
    #[serde(default)]
    clock: Option<RawClock>,
    // Missing lists are reported by validation, together with everything else.
    #[serde(default)]
    regions: Vec<RawRegion>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    residency: Vec<RawRule>,
    #[serde(default)]
    links: Vec<RawLink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Spanned<String>,
    #[serde(default)]
    cert_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClock {
    #[serde(default)]
    max_drift_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<String>,
    region: Spanned<String>,
    // Strings, parsed by validation, so that a bad address is reported with
    // its field instead of as a generic deserialisation error.
    peer: Spanned<String>,
    api: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    keys: Spanned<String>,
    home: Spanned<String>,
    #[serde(default)]
    replicas: Vec<Spanned<String>>,
    #[serde(default)]
    foreign: Foreign,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    from: Spanned<String>,
    to: Spanned<String>,
    via: Spanned<String>,
}

fn parse_raw(text: &str, locator: &Locator<'_>) -> Result<RawTopology, Problem> {
    // Parsing the document separately from deserialising it keeps the
    // spanned tree, which turns the byte span of a shape error back into a
    // field path.
    let document =
        DeTable::parse(text).map_err(|e| toml_problem(&e, e.span(), String::new(), locator))?;
    let deserializer = toml::de::Deserializer::from(document.clone());
    RawTopology::deserialize(deserializer).map_err(|e| {
        // An empty span stands for the whole document (e.g. a missing
        // top-level table): no field to name, no place to point at.
        let span = e.span().filter(|span| !span.is_empty());
        let mut field = span
            .clone()
            .map(|span| field_at(document.get_ref(), span.start))
            .unwrap_or_default();
        if let Some(missing) = missing_field(e.message()) {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(missing);
        }
        toml_problem(&e, span, field, locator)
    })
}

fn toml_problem(
    error: &toml::de::Error,
    span: Option<Range<usize>>,
    field: String,
    locator: &Locator<'_>,
) -> Problem {
    let (line, column) = match span {
        Some(span) => {
            let (line, column) = locator.position(span.start);
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    Problem {
        field,
        line,
        column,
        // One problem, one line.
        message: error.message().trim().replace('\n', "; "),
    }
}

/// serde's wording for a missing field, e.g. "missing field `api`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(name, _)| name)
}

/// The path of the innermost key or value around byte `pos`, e.g.
/// `nodes[1].peer`. A table's span covers only its header (`[[nodes]]`), not
/// its body, so the whole tree is searched rather than only the branches
/// whose span contains `pos`.
fn field_at(table: &DeTable<'_>, pos: usize) -> String {
    find_in_table(table, pos, "").unwrap_or_default()
}

fn find_in_table(table: &DeTable<'_>, pos: usize, prefix: &str) -> Option<String> {
    table.iter().find_map(|(key, value)| {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if key.span().contains(&pos) {
            return Some(path);
        }
        find_in_value(value, pos, path)
    })
}

fn find_in_value(value: &Spanned<DeValue<'_>>, pos: usize, path: String) -> Option<String> {
    let inner = match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, pos, &path),
        DeValue::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_in_value(item, pos, format!("{path}[{i}]"))),
        _ => None,
    };
    inner.or_else(|| value.span().contains(&pos).then_some(path))
}

/// Byte offsets to 1-based line and column (in characters).
struct Locator<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Locator { text, line_starts }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self
            .line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        let column = match self.text.get(start..offset) {
            Some(prefix) => prefix.chars().count() + 1,
            // Not on a character boundary: count bytes rather than fail.
            None => offset - start + 1,
        };
        (line.max(1), column)
    }

    fn at(&self, span: Range<usize>) -> (Option<usize>, Option<usize>) {
        let (line, column) = self.position(span.start);
        (Some(line), Some(column))
    }
}

// ---------------------------------------------------------------------------
// Second pass: meaning.

struct Validator<'l, 'a> {
    locator: &'l Locator<'a>,
    problems: Vec<Problem>,
}

impl<'l, 'a> Validator<'l, 'a> {
    fn new(locator: &'l Locator<'a>) -> Self {
        Validator {
            locator,
            problems: Vec::new(),
        }
    }

    fn report(
        &mut self,
        field: impl Into<String>,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) {
        let (line, column) = match span {
            Some(span) => self.locator.at(span),
            None => (None, None),
        };
        self.problems.push(Problem {
            field: field.into(),
            line,
            column,
            message: message.into(),
        });
    }

    fn line_of(&self, span: Range<usize>) -> usize {
        self.locator.position(span.start).0
    }

    fn check_name(&mut self, field: String, name: &Spanned<String>, what: &str) {
        if let Some(message) = name_problem(name.get_ref(), what) {
            self.report(field, Some(name.span()), message);
        }
    }

    fn address(&mut self, field: String, text: &Spanned<String>) -> Option<SocketAddr> {
        match parse_socket_addr(text.get_ref()) {
            Ok(addr) => Some(addr),
            Err(message) => {
                self.report(field, Some(text.span()), message);
                None
            }
        }
    }

    fn validate(mut self, raw: RawTopology, base_dir: PathBuf) -> Result<Topology, Vec<Problem>> {
        let cluster = raw.cluster.get_ref().clone();
        if let Some(message) = cluster_problem(&cluster) {
            self.report("cluster", Some(raw.cluster.span()), message);
        }

        let tls = self.tls(&raw.tls, &base_dir);
        let clock = self.clock(raw.clock.as_ref());
        let regions = self.regions(&raw.regions);
        let nodes = self.nodes(&raw.nodes, &regions);
        self.empty_regions(&raw.regions, &raw.nodes);
        let region_names: Vec<String> = regions.iter().map(|r| r.name.clone()).collect();
        let residency = self.residency(&raw.residency, &region_names);
        let links = self.links(&raw.links, &raw.nodes, &nodes);

        if self.problems.is_empty() {
            Ok(Topology {
                cluster,
                tls,
                clock,
                regions,
                nodes,
                residency,
                links,
                base_dir,
            })
        } else {
            let mut problems = self.problems;
            // File order reads best; problems without a place go last.
            problems.sort_by_key(|p| (p.line.unwrap_or(usize::MAX), p.column.unwrap_or(0)));
            Err(problems)
        }
    }

    fn tls(&mut self, raw: &RawTls, base_dir: &Path) -> TlsConfig {
        if raw.ca.get_ref().is_empty() {
            self.report(
                "tls.ca",
                Some(raw.ca.span()),
                "must name the cluster CA certificate file",
            );
        }
        let cert_dir = match &raw.cert_dir {
            Some(dir) => {
                if dir.get_ref().is_empty() {
                    self.report(
                        "tls.cert_dir",
                        Some(dir.span()),
                        "must not be empty (leave it out for the default, \"certs\")",
                    );
                }
                base_dir.join(dir.get_ref())
            }
            None => base_dir.join("certs"),
        };
        TlsConfig {
            ca: base_dir.join(raw.ca.get_ref()),
            cert_dir,
        }
    }

    fn clock(&mut self, raw: Option<&RawClock>) -> ClockConfig {
        let Some(drift) = raw.and_then(|c| c.max_drift_ms.as_ref()) else {
            return ClockConfig::default();
        };
        let max_drift_ms = *drift.get_ref();
        if !(1..=MAX_MAX_DRIFT_MS).contains(&max_drift_ms) {
            self.report(
                "clock.max_drift_ms",
                Some(drift.span()),
                format!(
                    "{max_drift_ms} is out of range: must be 1 to {MAX_MAX_DRIFT_MS} (one hour)"
                ),
            );
        }
        ClockConfig { max_drift_ms }
    }

    fn regions(&mut self, raw: &[RawRegion]) -> Vec<Region> {
        if raw.is_empty() {
            self.report(
                "regions",
                None,
                "at least one [[regions]] entry is required",
            );
        }
        let mut first_line: HashMap<&str, usize> = HashMap::new();
        let mut regions = Vec::with_capacity(raw.len());
        for (i, region) in raw.iter().enumerate() {
            let field = format!("regions[{i}].name");
            self.check_name(field.clone(), &region.name, "region name");
            let name = region.name.get_ref();
            if let Some(line) = first_line.get(name.as_str()) {
                self.report(
                    field,
                    Some(region.name.span()),
                    format!("duplicate region name {name:?} (first defined on line {line})"),
                );
            } else {
                first_line.insert(name, self.line_of(region.name.span()));
                regions.push(Region { name: name.clone() });
            }
        }
        regions
    }

    fn nodes(&mut self, raw: &[RawNode], regions: &[Region]) -> Vec<NodeConfig> {
        if raw.is_empty() {
            self.report("nodes", None, "at least one [[nodes]] entry is required");
        }
        let mut first_id: HashMap<&str, usize> = HashMap::new();
        let mut peers: HashMap<SocketAddr, (&str, usize)> = HashMap::new();
        let mut apis: HashMap<SocketAddr, (&str, usize)> = HashMap::new();
        let mut nodes = Vec::with_capacity(raw.len());
        for (i, node) in raw.iter().enumerate() {
            let id = node.id.get_ref();
            self.check_name(format!("nodes[{i}].id"), &node.id, "node id");
            let duplicate = first_id.get(id.as_str()).copied();
            if let Some(line) = duplicate {
                self.report(
                    format!("nodes[{i}].id"),
                    Some(node.id.span()),
                    format!("duplicate node id {id:?} (first defined on line {line})"),
                );
            } else {
                first_id.insert(id, self.line_of(node.id.span()));
            }

            let region = node.region.get_ref();
            if !regions.iter().any(|r| &r.name == region) {
                let known: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
                self.report(
                    format!("nodes[{i}].region"),
                    Some(node.region.span()),
                    format!("unknown region {region:?} (regions: {})", known.join(", ")),
                );
            }

            let peer = self.address(format!("nodes[{i}].peer"), &node.peer);
            if let Some(addr) = peer {
                if addr.ip().is_unspecified() {
                    self.report(
                        format!("nodes[{i}].peer"),
                        Some(node.peer.span()),
                        format!("{addr} cannot be dialled: other nodes connect to this address, so give a concrete IP"),
                    );
                }
                self.unique_addr(&mut peers, addr, "peer", i, &node.peer, id);
            }
            let api = self.address(format!("nodes[{i}].api"), &node.api);
            if let Some(addr) = api {
                self.unique_addr(&mut apis, addr, "api", i, &node.api, id);
            }

            if let (None, Some(peer), Some(api)) = (duplicate, peer, api) {
                nodes.push(NodeConfig {
                    id: id.clone(),
                    region: region.clone(),
                    peer,
                    api,
                });
            }
        }
        nodes
    }

    fn unique_addr<'r>(
        &mut self,
        seen: &mut HashMap<SocketAddr, (&'r str, usize)>,
        addr: SocketAddr,
        kind: &str,
        index: usize,
        text: &Spanned<String>,
        id: &'r str,
    ) {
        if let Some((other, line)) = seen.get(&addr) {
            self.report(
                format!("nodes[{index}].{kind}"),
                Some(text.span()),
                format!("{kind} address {addr} is already used by node {other:?} (line {line})"),
            );
        } else {
            seen.insert(addr, (id, self.line_of(text.span())));
        }
    }

    /// Checks against the nodes as declared, even invalid ones, so that one
    /// mistake in a node does not also make its region look empty.
    fn empty_regions(&mut self, raw: &[RawRegion], nodes: &[RawNode]) {
        let mut reported = HashSet::new();
        for (i, region) in raw.iter().enumerate() {
            let name = region.name.get_ref();
            if !nodes.iter().any(|n| n.region.get_ref() == name) && reported.insert(name) {
                self.report(
                    format!("regions[{i}].name"),
                    Some(region.name.span()),
                    format!("region {name:?} has no node; every region needs at least one"),
                );
            }
        }
    }

    fn residency(&mut self, raw: &[RawRule], regions: &[String]) -> Policy {
        let specs = raw
            .iter()
            .map(|r| RuleSpec {
                name: r.name.get_ref().clone(),
                keys: r.keys.get_ref().clone(),
                home: r.home.get_ref().clone(),
                replicas: r.replicas.iter().map(|s| s.get_ref().clone()).collect(),
                foreign: r.foreign,
            })
            .collect();
        match Policy::new(specs, regions) {
            Ok(policy) => policy,
            Err(problems) => {
                for problem in problems {
                    let span = raw
                        .get(problem.index())
                        .and_then(|rule| match problem.field() {
                            RuleField::Name => Some(rule.name.span()),
                            RuleField::Keys => Some(rule.keys.span()),
                            RuleField::Home => Some(rule.home.span()),
                            RuleField::Replica(i) => rule.replicas.get(i).map(Spanned::span),
                        });
                    self.report(problem.path(), span, problem.message());
                }
                Policy::global()
            }
        }
    }

    /// `declared` are the nodes as written, used for name look-ups so that a
    /// node with, say, a bad address is not also reported as unknown here;
    /// `nodes` are the valid ones, used for address clashes.
    fn links(&mut self, raw: &[RawLink], declared: &[RawNode], nodes: &[NodeConfig]) -> Vec<Link> {
        let mut first: HashMap<(&str, &str), usize> = HashMap::new();
        let mut links = Vec::with_capacity(raw.len());
        for (i, link) in raw.iter().enumerate() {
            let (from, to) = (link.from.get_ref(), link.to.get_ref());
            let mut ok = true;
            for (end, name) in [("from", &link.from), ("to", &link.to)] {
                if !declared.iter().any(|n| n.id.get_ref() == name.get_ref()) {
                    ok = false;
                    self.report(
                        format!("links[{i}].{end}"),
                        Some(name.span()),
                        format!("unknown node {:?}", name.get_ref()),
                    );
                }
            }
            if from == to {
                ok = false;
                self.report(
                    format!("links[{i}].to"),
                    Some(link.to.span()),
                    format!("a link joins two different nodes, but from and to are both {to:?}"),
                );
            }
            if let Some(line) = first.get(&(from.as_str(), to.as_str())) {
                ok = false;
                self.report(
                    format!("links[{i}]"),
                    Some(link.from.span()),
                    format!(
                        "duplicate link from {from:?} to {to:?} (first defined on line {line})"
                    ),
                );
            } else {
                first.insert((from, to), self.line_of(link.from.span()));
            }
            let via = self.address(format!("links[{i}].via"), &link.via);
            let clash = via.and_then(|via| nodes.iter().find(|n| n.peer == via));
            if let (Some(via), Some(node)) = (via, clash) {
                ok = false;
                self.report(
                    format!("links[{i}].via"),
                    Some(link.via.span()),
                    format!(
                        "{via} is the peer address of node {:?}; the link emulator needs an address of its own",
                        node.id
                    ),
                );
            }
            if let (true, Some(via)) = (ok, via) {
                links.push(Link {
                    from: from.clone(),
                    to: to.clone(),
                    via,
                });
            }
        }
        links
    }
}

const NAME_RULE: &str = "use only lowercase letters a-z, digits, '-', '.' and '_'";

/// Why `name` cannot be a region name or node id, if it cannot.
fn name_problem(name: &str, what: &str) -> Option<String> {
    if name.is_empty() {
        return Some(format!("{what} must not be empty"));
    }
    if let Some(c) = name.chars().find(|c| !is_name_char(*c)) {
        return Some(format!(
            "{what} {name:?} contains {c:?}: {NAME_RULE} (it is part of node identities and file names)"
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("{what} must not be {name:?}"));
    }
    None
}

/// Why `cluster` cannot be a SPIFFE trust domain, if it cannot.
fn cluster_problem(cluster: &str) -> Option<String> {
    if cluster.is_empty() {
        return Some("cluster name must not be empty".to_owned());
    }
    if let Some(c) = cluster.chars().find(|c| !is_name_char(*c)) {
        return Some(format!(
            "cluster name {cluster:?} contains {c:?}: {NAME_RULE} (it is the trust domain in spiffe://<cluster>/region/<region>/node/<node-id>)"
        ));
    }
    None
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')
}

/// Parses `IP:PORT`, explaining precisely what is wrong otherwise.
fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    const FORM: &str = "expected IP:PORT, e.g. \"127.0.0.1:7101\" or \"[::1]:7101\"";
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "port 0 in {text:?} is not allowed: the port must be fixed so that others can reach it"
            ));
        }
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port: {FORM}"));
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?}: port {port:?} is not a number: {FORM}"));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{text:?}: port {port} is out of range (1 to 65535)"
        ));
    }
    if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) {
        return Err(format!(
            "{text:?}: an IPv6 address needs brackets, e.g. \"[{host}]:{port}\""
        ));
    }
    Err(format!(
        "{text:?}: {host:?} is not an IP address (host names are not resolved): {FORM}"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const VALID: &str = r#"
cluster = "demo"

[tls]
ca = "certs/ca.pem"

[clock]
max_drift_ms = 250

[[regions]]
name = "eu-west"

[[regions]]
name = "us-east"

[[nodes]]
id = "eu-west-1"
region = "eu-west"
peer = "127.0.0.1:7101"
api = "127.0.0.1:8101"

[[nodes]]
id = "us-east-1"
region = "us-east"
peer = "127.0.0.1:7301"
api = "127.0.0.1:8301"

[[nodes]]
id = "us-east-2"
region = "us-east"
peer = "[::1]:7302"
api = "127.0.0.1:8302"

[[residency]]
name = "eu-personal-data"
keys = "users/eu/*"
home = "eu-west"
replicas = []
foreign = "forward"

[[residency]]
name = "us-billing"
keys = "billing/us/*"
home = "us-east"
replicas = ["eu-west"]
foreign = "reject"

[[links]]
from = "eu-west-1"
to = "us-east-1"
via = "127.0.0.1:9001"
"#;

    fn parse(text: &str) -> Result<Topology, TopologyError> {
        Topology::parse(text, Path::new("conf/topology.toml"))
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Ok(t) => panic!("expected problems, got {t:#?}"),
            Err(TopologyError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    fn fields(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.field).collect()
    }

    /// The problem for `field`, failing if there is not exactly one.
    fn only(text: &str, field: &str) -> Problem {
        let all = problems(text);
        let matching: Vec<&Problem> = all.iter().filter(|p| p.field == field).collect();
        assert_eq!(
            matching.len(),
            1,
            "expected one problem for {field}, got {all:#?}"
        );
        matching[0].clone()
    }

    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn valid_file_parses() {
        let t = parse(VALID).unwrap();
        assert_eq!(t.cluster, "demo");
        assert_eq!(t.base_dir, PathBuf::from("conf"));
        assert_eq!(t.tls.ca, PathBuf::from("conf/certs/ca.pem"));
        assert_eq!(
            t.tls.node_cert("eu-west-1"),
            PathBuf::from("conf/certs/eu-west-1.pem")
        );
        assert_eq!(
            t.tls.node_key("eu-west-1"),
            PathBuf::from("conf/certs/eu-west-1.key")
        );
        assert_eq!(t.clock.max_drift_ms, 250);
        assert_eq!(t.clock.max_drift(), Duration::from_millis(250));
        let regions: Vec<&str> = t.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(regions, ["eu-west", "us-east"]);
        assert_eq!(t.nodes.len(), 3);
        assert_eq!(
            t.node("us-east-2"),
            Some(&NodeConfig {
                id: "us-east-2".into(),
                region: "us-east".into(),
                peer: "[::1]:7302".parse().unwrap(),
                api: "127.0.0.1:8302".parse().unwrap(),
            })
        );
        assert_eq!(t.region_of("eu-west-1"), Some("eu-west"));
        assert_eq!(t.region_of("mars-1"), None);
        let peers: Vec<&str> = t.peers_of("us-east-1").map(|n| n.id.as_str()).collect();
        assert_eq!(peers, ["eu-west-1", "us-east-2"]);
        let in_us: Vec<&str> = t.nodes_in("us-east").map(|n| n.id.as_str()).collect();
        assert_eq!(in_us, ["us-east-1", "us-east-2"]);
        assert_eq!(t.residency.rules().len(), 2);
        assert_eq!(t.residency.home_region("users/eu/1"), Some("eu-west"));
        assert!(t.residency.may_hold("billing/us/1", "eu-west"));
        assert_eq!(
            t.residency.rules()[1].foreign(),
            meridian_residency::Foreign::Reject
        );
        assert_eq!(t.links.len(), 1);
        assert_eq!(
            t.dial_addr("eu-west-1", "us-east-1"),
            Some("127.0.0.1:9001".parse().unwrap())
        );
        assert_eq!(
            t.dial_addr("us-east-1", "eu-west-1"),
            Some("127.0.0.1:7101".parse().unwrap())
        );
        assert_eq!(
            t.spiffe_id("us-east-2").as_deref(),
            Some("spiffe://demo/region/us-east/node/us-east-2")
        );
        assert_eq!(
            t.node_by_spiffe_id("spiffe://demo/region/us-east/node/us-east-2")
                .map(|n| n.id.as_str()),
            Some("us-east-2")
        );
        // Exact match only: wrong region, trailing slash, case.
        assert!(
            t.node_by_spiffe_id("spiffe://demo/region/eu-west/node/us-east-2")
                .is_none()
        );
        assert!(
            t.node_by_spiffe_id("spiffe://demo/region/us-east/node/us-east-2/")
                .is_none()
        );
        assert!(
            t.node_by_spiffe_id("spiffe://DEMO/region/us-east/node/us-east-2")
                .is_none()
        );
        assert_eq!(
            t.summary(),
            "cluster \"demo\": 2 regions, 3 nodes, 2 residency rules, 1 link"
        );
    }

    #[test]
    fn defaults_and_extensions() {
        let text = VALID.replace("[clock]\nmax_drift_ms = 250\n", "").replace(
            "ca = \"certs/ca.pem\"",
            "ca = \"/etc/meridian/ca.pem\"\ncert_dir = \"pki\"",
        );
        let t = Topology::parse(&text, Path::new("topology.toml")).unwrap();
        assert_eq!(t.clock, ClockConfig { max_drift_ms: 500 });
        assert_eq!(t.base_dir, PathBuf::from("."));
        assert_eq!(t.tls.ca, PathBuf::from("/etc/meridian/ca.pem"));
        assert_eq!(t.tls.node_cert("n1"), PathBuf::from("./pki/n1.pem"));

        let text = VALID.replace("max_drift_ms = 250\n", "");
        assert_eq!(
            parse(&text).unwrap().clock.max_drift_ms,
            DEFAULT_MAX_DRIFT_MS
        );
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let text = "cluster = \"demo\"\n[tls]\nca = \"x\n";
        let p = problems(text);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, Some(3));
        assert!(p[0].column.is_some());
        assert_eq!(p[0].field, "");
    }

    #[test]
    fn unknown_fields_are_named() {
        let text = VALID.replace(
            "api = \"127.0.0.1:8301\"",
            "api = \"127.0.0.1:8301\"\ncolour = \"blue\"",
        );
        let p = only(&text, "nodes[1].colour");
        assert_eq!(p.line, Some(line_of(&text, "colour")));
        assert_eq!(p.column, Some(1));
        assert!(
            p.message.contains("unknown field `colour`"),
            "{}",
            p.message
        );

        let text = VALID.replace("[clock]\n", "[clock]\nskew = 3\n");
        only(&text, "clock.skew");
        let text = VALID.replace("cluster = \"demo\"\n", "cluster = \"demo\"\nversion = 2\n");
        only(&text, "version");
        let text = VALID.replace(
            "foreign = \"reject\"",
            "foreign = \"reject\"\nowner = \"me\"",
        );
        only(&text, "residency[1].owner");
    }

    #[test]
    fn shape_errors_are_named() {
        let text = VALID.replace("peer = \"127.0.0.1:7301\"", "peer = 7301");
        let p = only(&text, "nodes[1].peer");
        assert_eq!(p.line, Some(line_of(&text, "peer = 7301")));

        let text = VALID.replace("foreign = \"reject\"", "foreign = \"drop\"");
        only(&text, "residency[1].foreign");

        let text = VALID.replace("max_drift_ms = 250", "max_drift_ms = -1");
        only(&text, "clock.max_drift_ms");

        let text = VALID.replace("api = \"127.0.0.1:8301\"\n", "");
        let p = only(&text, "nodes[1].api");
        assert!(p.message.contains("missing field `api`"), "{}", p.message);

        let text = VALID.replace("[tls]\nca = \"certs/ca.pem\"\n", "");
        let p = only(&text, "tls");
        assert_eq!((p.line, p.column), (None, None));
    }

    #[test]
    fn names_are_checked() {
        let text = VALID
            .replace("cluster = \"demo\"", "cluster = \"my demo/x\"")
            .replace("name = \"us-east\"", "name = \"US-East\"")
            .replace("id = \"eu-west-1\"", "id = \"\"");
        let p = problems(&text);
        let f: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert!(f.contains(&"cluster"), "{p:#?}");
        assert!(f.contains(&"regions[1].name"), "{p:#?}");
        assert!(f.contains(&"nodes[0].id"), "{p:#?}");
        let region = p.iter().find(|p| p.field == "regions[1].name").unwrap();
        assert!(
            region.message.contains("lowercase letters"),
            "{}",
            region.message
        );

        let text = VALID.replace("cluster = \"demo\"", "cluster = \"\"");
        assert!(only(&text, "cluster").message.contains("must not be empty"));
        let text = VALID.replace("id = \"us-east-2\"", "id = \"..\"");
        only(&text, "nodes[2].id");
    }

    #[test]
    fn duplicates_are_reported_with_first_line() {
        let text = VALID.replace("name = \"us-east\"", "name = \"eu-west\"");
        let p = problems(&text);
        let dup = p.iter().find(|p| p.field == "regions[1].name").unwrap();
        assert!(
            dup.message.contains("duplicate region name \"eu-west\""),
            "{}",
            dup.message
        );
        assert!(
            dup.message
                .contains(&format!("line {}", line_of(&text, "name = \"eu-west\"")))
        );

        let text = VALID.replace("id = \"us-east-2\"", "id = \"us-east-1\"");
        let p = only(&text, "nodes[2].id");
        assert!(p.message.contains("duplicate node id"), "{}", p.message);
    }

    #[test]
    fn node_in_unknown_region_and_region_without_node() {
        let text = VALID.replace("region = \"eu-west\"", "region = \"mars\"");
        let p = problems(&text);
        let f: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(f, ["regions[0].name", "nodes[0].region"], "{p:#?}");
        assert!(p[1].message.contains("unknown region \"mars\""));
        assert!(p[0].message.contains("has no node"));
        assert_eq!(p[1].line, Some(line_of(&text, "region = \"mars\"")));
        assert_eq!(p[1].column, Some(10));
    }

    #[test]
    fn addresses_are_checked() {
        let text = VALID.replace("127.0.0.1:7301", "127.0.0.1:70000");
        let p = only(&text, "nodes[1].peer");
        assert!(p.message.contains("out of range"), "{}", p.message);
        assert_eq!(p.line, Some(line_of(&text, "70000")));

        let text = VALID.replace("127.0.0.1:8301", "127.0.0.1:0");
        assert!(only(&text, "nodes[1].api").message.contains("port 0"));

        let text = VALID.replace("127.0.0.1:8301", "localhost:8301");
        assert!(
            only(&text, "nodes[1].api")
                .message
                .contains("not an IP address")
        );

        let text = VALID.replace("[::1]:7302", "::1:7302");
        assert!(only(&text, "nodes[2].peer").message.contains("brackets"));

        let text = VALID.replace("127.0.0.1:8301", "127.0.0.1");
        assert!(only(&text, "nodes[1].api").message.contains("no port"));

        let text = VALID.replace("127.0.0.1:7101", "0.0.0.0:7101");
        assert!(
            only(&text, "nodes[0].peer")
                .message
                .contains("cannot be dialled")
        );
    }

    #[test]
    fn duplicate_addresses_across_nodes() {
        let text = VALID
            .replace("127.0.0.1:7301", "127.0.0.1:7101")
            .replace("127.0.0.1:8302", "127.0.0.1:8101");
        let p = problems(&text);
        let f: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(f, ["nodes[1].peer", "nodes[2].api"], "{p:#?}");
        assert!(
            p[0].message.contains("already used by node \"eu-west-1\""),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn clock_range() {
        for bad in ["0", "3600001"] {
            let text = VALID.replace("max_drift_ms = 250", &format!("max_drift_ms = {bad}"));
            assert!(
                only(&text, "clock.max_drift_ms")
                    .message
                    .contains("out of range")
            );
        }
        let text = VALID.replace("max_drift_ms = 250", "max_drift_ms = 3600000");
        assert_eq!(parse(&text).unwrap().clock.max_drift_ms, 3_600_000);
    }

    #[test]
    fn residency_problems_are_mapped_to_fields() {
        let text = VALID
            .replace("home = \"eu-west\"", "home = \"mars\"")
            .replace(
                "replicas = [\"eu-west\"]",
                "replicas = [\"us-east\", \"venus\"]",
            )
            .replace("keys = \"billing/us/*\"", "keys = \"users/eu/x\"");
        let p = problems(&text);
        let f: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            f,
            [
                "residency[0].home",
                "residency[1].keys",
                "residency[1].replicas[0]",
                "residency[1].replicas[1]"
            ],
            "{p:#?}"
        );
        assert_eq!(p[0].message, "unknown region \"mars\"");
        assert_eq!(p[0].line, Some(line_of(&text, "home = \"mars\"")));
        assert!(p[1].message.contains("never match"));
        assert!(p[2].message.contains("home region"));
        assert_eq!(p[3].message, "unknown region \"venus\"");
    }

    #[test]
    fn links_are_checked() {
        let extra = "\n[[links]]\nfrom = \"eu-west-1\"\nto = \"us-east-1\"\nvia = \"127.0.0.1:9002\"\n\
                     \n[[links]]\nfrom = \"nobody\"\nto = \"nobody\"\nvia = \"127.0.0.1:7301\"\n";
        let text = format!("{VALID}{extra}");
        let f = fields(&text);
        assert_eq!(
            f,
            [
                "links[1]",
                "links[2].from",
                "links[2].to",
                "links[2].to",
                "links[2].via"
            ],
            "{:#?}",
            problems(&text)
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = VALID
            .replace("cluster = \"demo\"", "cluster = \"a b\"")
            .replace("max_drift_ms = 250", "max_drift_ms = 0")
            .replace("region = \"eu-west\"", "region = \"eu-wset\"")
            .replace("127.0.0.1:8301", "127.0.0.1:99999")
            .replace("home = \"us-east\"", "home = \"us-west\"")
            .replace("to = \"us-east-1\"", "to = \"us-east-9\"");
        let f = fields(&text);
        assert_eq!(
            f,
            [
                "cluster",
                "clock.max_drift_ms",
                "regions[0].name",
                "nodes[0].region",
                "nodes[1].api",
                "residency[1].home",
                "links[0].to",
            ],
            "{:#?}",
            problems(&text)
        );
    }

    #[test]
    fn missing_sections_are_reported() {
        let text = "cluster = \"demo\"\n[tls]\nca = \"ca.pem\"\n";
        let p = problems(text);
        let f: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(f, ["regions", "nodes"]);
        assert_eq!(p[0].line, None);
    }

    #[test]
    fn error_display_is_one_line_per_problem() {
        let text = VALID
            .replace("region = \"eu-west\"", "region = \"mars\"")
            .replace("127.0.0.1:8301", "127.0.0.1:70000");
        let err = parse(&text).unwrap_err();
        let rendered = err.to_string();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3, "{rendered}");
        let mars = line_of(&text, "\"mars\"");
        assert_eq!(
            lines[1],
            format!(
                "conf/topology.toml:{mars}:10: nodes[0].region: unknown region \"mars\" (regions: eu-west, us-east)"
            )
        );
        assert!(lines[2].starts_with("conf/topology.toml:"));
        assert!(lines[2].contains(": nodes[1].api: "));
        assert_eq!(err.problems().len(), 3);

        let no_place = Problem {
            field: "nodes".into(),
            line: None,
            column: None,
            message: "m".into(),
        };
        let err = TopologyError::Invalid {
            file: "t.toml".into(),
            problems: vec![no_place],
        };
        assert_eq!(err.to_string(), "t.toml: nodes: m");
    }

    #[test]
    fn locator_counts_characters() {
        let text = "a\nbé = 1\n\nx";
        let l = Locator::new(text);
        assert_eq!(l.position(0), (1, 1));
        assert_eq!(l.position(2), (2, 1));
        assert_eq!(l.position(text.find('=').unwrap()), (2, 4));
        assert_eq!(l.position(text.find('x').unwrap()), (4, 1));
        assert_eq!(l.position(text.len() + 10), (4, 2));
    }

    #[test]
    fn check_report_success_and_failure() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, VALID).unwrap();
        let (text, ok) = check_report(&good);
        assert!(ok);
        assert_eq!(
            text,
            format!(
                "{}: ok: cluster \"demo\": 2 regions, 3 nodes, 2 residency rules, 1 link",
                good.display()
            )
        );

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            VALID.replace("region = \"eu-west\"", "region = \"mars\""),
        )
        .unwrap();
        let (text, ok) = check_report(&bad);
        assert!(!ok);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.lines()
                .all(|l| l.starts_with(&format!("{}:", bad.display()))),
            "{text}"
        );

        let (text, ok) = check_report(&dir.path().join("missing.toml"));
        assert!(!ok);
        assert!(text.contains("cannot read topology file"), "{text}");
    }
}
