//! The second pass over a topology file: what it means. Every problem is collected, with its
//! position, so that an operator fixes a file in one round.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use meridian_residency::{Policy, RuleField, RuleSpec};
use toml::Spanned;

use super::parse::{Locator, RawClock, RawLink, RawNode, RawRegion, RawRule, RawTls, RawTopology};
use super::{
    ClockConfig, Link, MAX_MAX_DRIFT_MS, NodeConfig, Problem, Region, TlsConfig, Topology,
};

pub(super) struct Validator<'l, 'a> {
    pub(super) locator: &'l Locator<'a>,
    pub(super) problems: Vec<Problem>,
}

impl<'l, 'a> Validator<'l, 'a> {
    pub(super) fn new(locator: &'l Locator<'a>) -> Self {
        Validator {
            locator,
            problems: Vec::new(),
        }
    }

    pub(super) fn report(
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

    pub(super) fn line_of(&self, span: Range<usize>) -> usize {
        self.locator.position(span.start).0
    }

    pub(super) fn check_name(&mut self, field: String, name: &Spanned<String>, what: &str) {
        if let Some(message) = name_problem(name.get_ref(), what) {
            self.report(field, Some(name.span()), message);
        }
    }

    pub(super) fn address(&mut self, field: String, text: &Spanned<String>) -> Option<SocketAddr> {
        match parse_socket_addr(text.get_ref()) {
            Ok(addr) => Some(addr),
            Err(message) => {
                self.report(field, Some(text.span()), message);
                None
            }
        }
    }

    pub(super) fn validate(
        mut self,
        raw: RawTopology,
        base_dir: PathBuf,
    ) -> Result<Topology, Vec<Problem>> {
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

    pub(super) fn tls(&mut self, raw: &RawTls, base_dir: &Path) -> TlsConfig {
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

    pub(super) fn clock(&mut self, raw: Option<&RawClock>) -> ClockConfig {
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

    pub(super) fn regions(&mut self, raw: &[RawRegion]) -> Vec<Region> {
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

    pub(super) fn nodes(&mut self, raw: &[RawNode], regions: &[Region]) -> Vec<NodeConfig> {
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

    pub(super) fn unique_addr<'r>(
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
    pub(super) fn empty_regions(&mut self, raw: &[RawRegion], nodes: &[RawNode]) {
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

    pub(super) fn residency(&mut self, raw: &[RawRule], regions: &[String]) -> Policy {
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
    pub(super) fn links(
        &mut self,
        raw: &[RawLink],
        declared: &[RawNode],
        nodes: &[NodeConfig],
    ) -> Vec<Link> {
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

pub(super) const NAME_RULE: &str = "use only lowercase letters a-z, digits, '-', '.' and '_'";

/// Why `name` cannot be a region name or node id, if it cannot.
pub(super) fn name_problem(name: &str, what: &str) -> Option<String> {
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
pub(super) fn cluster_problem(cluster: &str) -> Option<String> {
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

pub(super) fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')
}

/// Parses `IP:PORT`, explaining precisely what is wrong otherwise.
pub(super) fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
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
