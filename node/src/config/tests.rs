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
