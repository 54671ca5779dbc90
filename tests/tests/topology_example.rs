//! Keeps `topology.example.toml` (the documented example) from going stale:
//! it must parse, say what the docs say it says, and its commented-out
//! `[[links]]` example must be valid once uncommented.

use std::path::{Path, PathBuf};

use meridian_node::config::Topology;
use meridian_residency::{Foreign, Placement};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.example.toml")
}

fn load_example() -> Topology {
    match Topology::load(&example_path()) {
        Ok(t) => t,
        Err(e) => panic!("the example topology is invalid:\n{e}"),
    }
}

#[test]
fn example_topology_is_valid_and_as_documented() {
    let t = load_example();
    assert_eq!(t.cluster, "demo");
    assert_eq!(t.clock.max_drift_ms, 500);
    assert!(t.tls.ca.ends_with("certs/ca.pem"));
    assert_eq!(t.tls.ca, t.base_dir.join("certs/ca.pem"));
    assert_eq!(
        t.tls.node_cert("eu-west-1"),
        t.base_dir.join("certs/eu-west-1.pem")
    );
    assert_eq!(
        t.tls.node_key("eu-west-1"),
        t.base_dir.join("certs/eu-west-1.key")
    );

    let regions: Vec<&str> = t.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(regions, ["eu-west", "us-east", "ap-south"]);

    let nodes: Vec<(&str, &str, String, String)> = t
        .nodes
        .iter()
        .map(|n| {
            (
                n.id.as_str(),
                n.region.as_str(),
                n.peer.to_string(),
                n.api.to_string(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            (
                "eu-west-1",
                "eu-west",
                "127.0.0.1:7101".into(),
                "127.0.0.1:8101".into()
            ),
            (
                "us-east-1",
                "us-east",
                "127.0.0.1:7201".into(),
                "127.0.0.1:8201".into()
            ),
            (
                "ap-south-1",
                "ap-south",
                "127.0.0.1:7301".into(),
                "127.0.0.1:8301".into()
            ),
        ]
    );

    let rules = t.residency.rules();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0].keys(), "users/eu/*");
    assert_eq!(rules[0].home(), "eu-west");
    assert_eq!(rules[0].foreign(), Foreign::Forward);
    assert_eq!(rules[1].keys(), "billing/us/*");
    assert_eq!(rules[1].home(), "us-east");
    assert!(rules[1].replicas().is_empty());
    assert_eq!(rules[1].foreign(), Foreign::Reject);

    match t.residency.placement("users/eu/42") {
        Placement::Pinned { home, rule } => {
            assert_eq!(home, "eu-west");
            assert_eq!(rule.name(), "eu-personal-data");
        }
        Placement::Global => panic!("users/eu/42 must be pinned to eu-west"),
    }
    assert!(!t.residency.may_hold("users/eu/42", "us-east"));
    assert_eq!(t.residency.placement("orders/1"), Placement::Global);
    assert!(t.residency.may_hold("orders/1", "ap-south"));

    assert!(t.links.is_empty());
}

#[test]
fn example_links_section_is_valid_when_uncommented() {
    let path = example_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    };
    let mut in_links = false;
    let mut uncommented = Vec::new();
    for line in text.lines() {
        if line.starts_with("# [[links]]") {
            in_links = true;
        }
        let line = match line.strip_prefix("# ") {
            Some(rest) if in_links => rest,
            _ => line,
        };
        uncommented.push(line);
    }
    assert!(
        in_links,
        "the example lost its commented-out [[links]] section"
    );
    let text = uncommented.join("\n");

    let t = match Topology::parse(&text, &path) {
        Ok(t) => t,
        Err(e) => panic!("the uncommented [[links]] example is invalid:\n{e}"),
    };
    assert_eq!(t.links.len(), 1);
    let link = &t.links[0];
    assert_eq!(
        (link.from.as_str(), link.to.as_str()),
        ("eu-west-1", "us-east-1")
    );
    assert_eq!(link.via.to_string(), "127.0.0.1:9001");
    assert_eq!(t.dial_addr("eu-west-1", "us-east-1"), Some(link.via));
}
