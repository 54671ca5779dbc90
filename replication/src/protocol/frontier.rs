//! Frontiers: per (origin, class), the HLC up to which a node holds every change.
//!
//! Invariant: an entry only ever rises ([`Frontier::raise`] never lowers one).

use std::collections::BTreeMap;

use crate::wire::FrontierEntry;

/// Per (origin, class): the newest HLC held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier(BTreeMap<(String, String), u64>);

impl Frontier {
    pub fn get(&self, origin: &str, class: &str) -> u64 {
        self.0
            .get(&(origin.to_string(), class.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Raise an entry; never lowers it.
    pub fn raise(&mut self, origin: &str, class: &str, hlc: u64) {
        let slot = self
            .0
            .entry((origin.to_string(), class.to_string()))
            .or_insert(0);
        *slot = (*slot).max(hlc);
    }

    pub fn entries(&self) -> Vec<FrontierEntry> {
        self.0
            .iter()
            .map(|((origin, class), hlc)| FrontierEntry {
                origin: origin.clone(),
                class: class.clone(),
                hlc: *hlc,
            })
            .collect()
    }

    pub fn from_entries(entries: &[FrontierEntry]) -> Self {
        let mut f = Frontier::default();
        for e in entries {
            f.raise(&e.origin, &e.class, e.hlc);
        }
        f
    }

    /// Only the entries of the given classes.
    pub fn restricted_to(&self, classes: &[String]) -> Frontier {
        Frontier(
            self.0
                .iter()
                .filter(|((_, c), _)| classes.contains(c))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.0
            .iter()
            .map(|((o, c), h)| (o.as_str(), c.as_str(), *h))
    }
}
