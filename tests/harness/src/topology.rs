//! Topology files written as text, section by section.
//!
//! Invariant: sections come out in the order they are added, each in the one layout the
//! tests have always used (`[[nodes]]` then one `key = value` per line, no blank lines), so a
//! builder call sequence names exactly one file. Nothing is validated here: tests also write
//! broken topologies on purpose, and `meridian` is the judge.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

/// A topology file's text. Start with [`TopologyText::cluster`] for a whole file, or
/// [`TopologyText::new`] for a fragment to append to another (links, rules).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopologyText {
    text: String,
}

/// One `[[residency]]` rule; `replicas` and `foreign` are left out unless set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Residency {
    name: String,
    keys: String,
    home: String,
    replicas: Vec<String>,
    foreign: Option<String>,
}

impl Residency {
    pub fn new(name: &str, keys: &str, home: &str) -> Residency {
        Residency {
            name: name.to_owned(),
            keys: keys.to_owned(),
            home: home.to_owned(),
            replicas: Vec::new(),
            foreign: None,
        }
    }

    pub fn replicas(mut self, regions: &[&str]) -> Residency {
        self.replicas = regions.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    /// `"reject"` or `"forward"`.
    pub fn foreign(mut self, foreign: &str) -> Residency {
        self.foreign = Some(foreign.to_owned());
        self
    }
}

/// A TOML basic string.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

impl TopologyText {
    /// Empty: a fragment.
    pub fn new() -> TopologyText {
        TopologyText::default()
    }

    /// `cluster = "<name>"`: the first line of a whole file.
    pub fn cluster(name: &str) -> TopologyText {
        TopologyText::new().line("cluster", &quoted(name))
    }

    fn line(mut self, key: &str, value: &str) -> TopologyText {
        self.text.push_str(key);
        self.text.push_str(" = ");
        self.text.push_str(value);
        self.text.push('\n');
        self
    }

    fn header(mut self, header: &str) -> TopologyText {
        self.text.push_str(header);
        self.text.push('\n');
        self
    }

    /// `[tls]` with only the CA (node certificates then sit beside it).
    pub fn tls(self, ca: &str) -> TopologyText {
        self.header("[tls]").line("ca", &quoted(ca))
    }

    /// `[tls]` with the CA and the node certificates in `cert_dir`.
    pub fn tls_in(self, cert_dir: &str) -> TopologyText {
        self.header("[tls]")
            .line("ca", &quoted(&format!("{cert_dir}/ca.pem")))
            .line("cert_dir", &quoted(cert_dir))
    }

    /// `[clock]` with `max_drift_ms`.
    pub fn clock_max_drift_ms(self, max_drift_ms: u64) -> TopologyText {
        self.header("[clock]")
            .line("max_drift_ms", &max_drift_ms.to_string())
    }

    pub fn region(self, name: &str) -> TopologyText {
        self.header("[[regions]]").line("name", &quoted(name))
    }

    pub fn node(self, id: &str, region: &str, peer: SocketAddr, api: SocketAddr) -> TopologyText {
        self.header("[[nodes]]")
            .line("id", &quoted(id))
            .line("region", &quoted(region))
            .line("peer", &quoted(&peer.to_string()))
            .line("api", &quoted(&api.to_string()))
    }

    /// `[[links]]`: `from` dials `to` through `via`.
    pub fn link(self, from: &str, to: &str, via: SocketAddr) -> TopologyText {
        self.header("[[links]]")
            .line("from", &quoted(from))
            .line("to", &quoted(to))
            .line("via", &quoted(&via.to_string()))
    }

    pub fn residency(self, rule: &Residency) -> TopologyText {
        let mut text = self
            .header("[[residency]]")
            .line("name", &quoted(&rule.name))
            .line("keys", &quoted(&rule.keys))
            .line("home", &quoted(&rule.home));
        if !rule.replicas.is_empty() {
            let list: Vec<String> = rule.replicas.iter().map(|r| quoted(r)).collect();
            text = text.line("replicas", &format!("[{}]", list.join(", ")));
        }
        match &rule.foreign {
            Some(foreign) => text.line("foreign", &quoted(foreign)),
            None => text,
        }
    }

    /// A `# comment` line.
    pub fn comment(mut self, comment: &str) -> TopologyText {
        self.text.push_str("# ");
        self.text.push_str(comment);
        self.text.push('\n');
        self
    }

    /// `fragment`'s sections after these.
    pub fn append(mut self, fragment: &TopologyText) -> TopologyText {
        self.text.push_str(&fragment.text);
        self
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Write the file. Panics if it cannot be written.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.text)
            .unwrap_or_else(|e| panic!("write topology {}: {e}", path.display()));
    }
}

impl fmt::Display for TopologyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<TopologyText> for String {
    fn from(text: TopologyText) -> String {
        text.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::loopback;

    #[test]
    fn sections_come_out_in_call_order_in_the_usual_layout() {
        let text = TopologyText::cluster("demo")
            .tls("certs/ca.pem")
            .region("eu-west")
            .node("n1", "eu-west", loopback(7101), loopback(8101))
            .link("n1", "n2", loopback(7201))
            .residency(&Residency::new("r", "users/*", "eu-west"))
            .residency(
                &Residency::new("p", "users/eu/*", "eu-west")
                    .replicas(&["ap-south", "us-east"])
                    .foreign("forward"),
            )
            .clock_max_drift_ms(500);
        assert_eq!(
            text.as_str(),
            "cluster = \"demo\"\n[tls]\nca = \"certs/ca.pem\"\n[[regions]]\nname = \"eu-west\"\n\
             [[nodes]]\nid = \"n1\"\nregion = \"eu-west\"\npeer = \"127.0.0.1:7101\"\n\
             api = \"127.0.0.1:8101\"\n[[links]]\nfrom = \"n1\"\nto = \"n2\"\n\
             via = \"127.0.0.1:7201\"\n[[residency]]\nname = \"r\"\nkeys = \"users/*\"\n\
             home = \"eu-west\"\n[[residency]]\nname = \"p\"\nkeys = \"users/eu/*\"\n\
             home = \"eu-west\"\nreplicas = [\"ap-south\", \"us-east\"]\nforeign = \"forward\"\n\
             [clock]\nmax_drift_ms = 500\n"
        );
    }

    #[test]
    fn tls_in_names_the_ca_and_the_certificate_folder() {
        assert_eq!(
            TopologyText::new().tls_in("foreign-certs").as_str(),
            "[tls]\nca = \"foreign-certs/ca.pem\"\ncert_dir = \"foreign-certs\"\n"
        );
    }

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
