//! The first pass over a topology file: TOML into raw structs that deny unknown fields, and
//! byte positions turned into lines, columns and field paths for every problem.

use std::ops::Range;

use meridian_residency::Foreign;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Problem;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTopology {
    pub(super) cluster: Spanned<String>,
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) clock: Option<RawClock>,
    // Missing lists are reported by validation, together with everything else.
    #[serde(default)]
    pub(super) regions: Vec<RawRegion>,
    #[serde(default)]
    pub(super) nodes: Vec<RawNode>,
    #[serde(default)]
    pub(super) residency: Vec<RawRule>,
    #[serde(default)]
    pub(super) links: Vec<RawLink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca: Spanned<String>,
    #[serde(default)]
    pub(super) cert_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClock {
    #[serde(default)]
    pub(super) max_drift_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    pub(super) name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) id: Spanned<String>,
    pub(super) region: Spanned<String>,
    // Strings, parsed by validation, so that a bad address is reported with
    // its field instead of as a generic deserialisation error.
    pub(super) peer: Spanned<String>,
    pub(super) api: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: Spanned<String>,
    pub(super) keys: Spanned<String>,
    pub(super) home: Spanned<String>,
    #[serde(default)]
    pub(super) replicas: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) foreign: Foreign,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLink {
    pub(super) from: Spanned<String>,
    pub(super) to: Spanned<String>,
    pub(super) via: Spanned<String>,
}

pub(super) fn parse_raw(text: &str, locator: &Locator<'_>) -> Result<RawTopology, Problem> {
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

pub(super) fn toml_problem(
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
pub(super) fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(name, _)| name)
}

/// The path of the innermost key or value around byte `pos`, e.g.
/// `nodes[1].peer`. A table's span covers only its header (`[[nodes]]`), not
/// its body, so the whole tree is searched rather than only the branches
/// whose span contains `pos`.
pub(super) fn field_at(table: &DeTable<'_>, pos: usize) -> String {
    find_in_table(table, pos, "").unwrap_or_default()
}

pub(super) fn find_in_table(table: &DeTable<'_>, pos: usize, prefix: &str) -> Option<String> {
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

pub(super) fn find_in_value(
    value: &Spanned<DeValue<'_>>,
    pos: usize,
    path: String,
) -> Option<String> {
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
pub(super) struct Locator<'a> {
    pub(super) text: &'a str,
    pub(super) line_starts: Vec<usize>,
}

impl<'a> Locator<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Locator { text, line_starts }
    }

    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
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

    pub(super) fn at(&self, span: Range<usize>) -> (Option<usize>, Option<usize>) {
        let (line, column) = self.position(span.start);
        (Some(line), Some(column))
    }
}
