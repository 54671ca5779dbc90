//! Reading one value out of a node's `/metrics` text.

/// The value of an un-labelled or labelled metric line, e.g.
/// `meridian_replication_changes_applied_total{peer_region="us-east"}`: the name and labels
/// must be written exactly as the node prints them.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
