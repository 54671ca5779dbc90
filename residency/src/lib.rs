//! Residency policy: which regions may hold a record, and where its home is.
//!
//! A [`Policy`] is an ordered list of rules. Each rule names a glob over record
//! keys, a home region, the other regions allowed to hold copies, and what a
//! region that may not hold the record does with a request for it
//! ([`Foreign`]). The first rule whose glob matches a key decides the key's
//! [`Placement`]; a key that no rule matches is global and every region may
//! store it.
//!
//! This crate is pure: no I/O, no clock. Every node evaluates the same policy
//! on the same key and must reach the same answer, so nothing here may depend
//! on local state.
//!
//! ```
//! use meridian_residency::{Foreign, Policy, RuleSpec};
//!
//! let regions = vec!["eu-west".to_owned(), "us-east".to_owned()];
//! let rules = vec![RuleSpec {
//!     name: "eu-personal-data".into(),
//!     keys: "users/eu/*".into(),
//!     home: "eu-west".into(),
//!     replicas: vec![],
//!     foreign: Foreign::Forward,
//! }];
//! let policy = Policy::new(rules, &regions).expect("valid policy");
//! assert_eq!(policy.home_region("users/eu/42/avatar"), Some("eu-west"));
//! assert!(!policy.may_hold("users/eu/42", "us-east"));
//! assert!(policy.may_hold("orders/1", "us-east")); // global
//! ```
//!
//! # Glob syntax
//!
//! Globs are matched against the key's Unicode characters (never its bytes),
//! case-sensitively, without Unicode normalisation (a precomposed `é` is one
//! character, `e` followed by a combining accent two), identically on every
//! platform:
//!
//! - `*` matches any sequence of characters, **including `/`**. So
//!   `users/eu/*` pins `users/eu/42` and also `users/eu/42/avatar`. Keys are
//!   not file paths; for a residency rule, pinning more keys than intended is
//!   the safe mistake and pinning fewer is the dangerous one.
//! - `**` also matches any sequence. As a whole path component followed by
//!   `/` it may match zero components: `a/**/b` matches `a/b` as well as
//!   `a/x/y/b`, and `**/b` matches `b`.
//! - `?` matches exactly one character, ASCII or not: `users/?/x` matches
//!   `users/é/x`.
//! - `[abc]`, `[a-z]` match one character of the set; `[!...]` and `[^...]`
//!   one character outside it. Members may be any Unicode characters
//!   (`[àé]`, `[α-ω]`). A `]` right after `[`, `[!` or `[^` is a member
//!   (`[]x]`), a `-` first or last is a literal, and `\` escapes inside a
//!   class too (`[\]\-]`).
//! - `{a,b}` matches either alternative; alternatives may be empty (`x{,s}`
//!   matches `x` and `xs`) and groups may nest.
//! - `\` escapes the next character (`\*` matches a literal `*`).
//!
//! A glob is validated when the policy is built: an unclosed `[` or `{`, an
//! empty class (`[]`), a reversed range (`[z-a]`), a trailing `\`, a stray
//! `}`, an empty glob, or one that only matches the empty key are errors.
//! Groups and `**/` are expanded at parse time (at most 256 alternatives,
//! groups nested at most 8 deep, globs at most 4096 bytes, 16,384 tokens
//! over all alternatives), and each
//! alternative is matched by a two-pointer algorithm that backtracks only to
//! the last `*`: time linear in the key for each token, never exponential.
//!
//! # Validation
//!
//! [`Policy::new`] reports every problem it finds, not just the first, as a
//! list of [`PolicyProblem`]s. Among them it detects rules that can never match
//! because an earlier rule matches every key they match (see
//! [`PolicyProblem::Shadowed`] for the exact approximation).

mod glob;
mod problem;

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use problem::{PolicyProblem, RuleField};

/// What a region that may not hold a pinned record does with a request for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Foreign {
    /// Forward the request to the record's home region and relay its answer.
    #[default]
    Forward,
    /// Refuse the request (HTTP 421) and name the home region.
    Reject,
}

impl Foreign {
    /// The spelling used in topology files: `"forward"` or `"reject"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Foreign::Forward => "forward",
            Foreign::Reject => "reject",
        }
    }
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One residency rule as written by an operator, before validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name, used in messages and metrics.
    pub name: String,
    /// Glob over record keys (see the crate docs for its syntax).
    pub keys: String,
    /// The region where matching records live.
    pub home: String,
    /// Other regions allowed to hold copies.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// What a region that may not hold the record does with a request for it.
    #[serde(default)]
    pub foreign: Foreign,
}

/// A validated residency rule.
#[derive(Clone, Debug)]
pub struct Rule {
    index: usize,
    name: String,
    keys: String,
    home: String,
    replicas: Vec<String>,
    foreign: Foreign,
    matcher: glob::Glob,
}

impl Rule {
    /// Position of the rule in the policy (0-based), which is also its priority.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The glob text as written.
    pub fn keys(&self) -> &str {
        &self.keys
    }

    /// The home region of matching records.
    pub fn home(&self) -> &str {
        &self.home
    }

    /// Other regions allowed to hold copies (never contains the home region).
    pub fn replicas(&self) -> &[String] {
        &self.replicas
    }

    /// What a region that may not hold a matching record does with a request.
    pub fn foreign(&self) -> Foreign {
        self.foreign
    }

    /// Whether the rule's glob matches `key`. This ignores rule order: use
    /// [`Policy::placement`] to decide where a key lives.
    pub fn matches(&self, key: &str) -> bool {
        self.matcher.is_match(key)
    }

    /// Whether `region` may hold records placed by this rule.
    pub fn may_hold(&self, region: &str) -> bool {
        self.home == region || self.replicas.iter().any(|r| r == region)
    }

    /// The rule as plain data, e.g. to print or re-serialise it.
    pub fn to_spec(&self) -> RuleSpec {
        RuleSpec {
            name: self.name.clone(),
            keys: self.keys.clone(),
            home: self.home.clone(),
            replicas: self.replicas.clone(),
            foreign: self.foreign,
        }
    }
}

// Compared by what the operator wrote: the compiled matcher is derived from
// `keys` and carries no extra meaning.
impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
            && self.name == other.name
            && self.keys == other.keys
            && self.home == other.home
            && self.replicas == other.replicas
            && self.foreign == other.foreign
    }
}

impl Eq for Rule {}

/// Where a key lives under a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement<'a> {
    /// No rule matches: every region stores the record.
    Global,
    /// The first matching rule pins the record to `home` (and its replicas).
    Pinned {
        /// The rule that decided the placement.
        rule: &'a Rule,
        /// The record's home region (same as `rule.home()`).
        home: &'a str,
    },
}

impl<'a> Placement<'a> {
    /// The home region, or `None` for a global record.
    pub fn home(&self) -> Option<&'a str> {
        match *self {
            Placement::Global => None,
            Placement::Pinned { home, .. } => Some(home),
        }
    }

    /// The deciding rule, or `None` for a global record.
    pub fn rule(&self) -> Option<&'a Rule> {
        match *self {
            Placement::Global => None,
            Placement::Pinned { rule, .. } => Some(rule),
        }
    }

    /// Whether a rule pins the record.
    pub fn is_pinned(&self) -> bool {
        matches!(self, Placement::Pinned { .. })
    }

    /// Whether `region` may store the record.
    pub fn may_hold(&self, region: &str) -> bool {
        match self {
            Placement::Global => true,
            Placement::Pinned { rule, .. } => rule.may_hold(region),
        }
    }
}

/// A validated, ordered list of residency rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Validates `rules` against the cluster's regions and compiles them.
    ///
    /// Returns every problem found, in rule order, if any.
    pub fn new(
        rules: Vec<RuleSpec>,
        known_regions: &[String],
    ) -> Result<Policy, Vec<PolicyProblem>> {
        let mut problems = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        let mut first_by_name: HashMap<&str, usize> = HashMap::new();
        // Only valid globs take part in shadow detection: a broken glob is
        // already reported and says nothing about which keys it would match.
        let mut valid_globs: Vec<(usize, &str, &str, glob::Glob)> = Vec::new();

        for (index, spec) in rules.iter().enumerate() {
            let name = || spec.name.clone();

            if spec.name.is_empty() {
                problems.push(PolicyProblem::EmptyName {
                    index,
                    name: name(),
                });
            } else if let Some(&first) = first_by_name.get(spec.name.as_str()) {
                problems.push(PolicyProblem::DuplicateName {
                    index,
                    name: name(),
                    first,
                });
            } else {
                first_by_name.insert(&spec.name, index);
            }

            let matcher = match glob::Glob::parse(&spec.keys) {
                Ok(matcher) => {
                    if let Some(&(by, by_name, by_keys, _)) = valid_globs
                        .iter()
                        .find(|(_, _, _, earlier)| earlier.covers(&matcher))
                    {
                        problems.push(PolicyProblem::Shadowed {
                            index,
                            name: name(),
                            by,
                            by_name: by_name.to_owned(),
                            by_keys: by_keys.to_owned(),
                        });
                    }
                    valid_globs.push((index, &spec.name, &spec.keys, matcher.clone()));
                    Some(matcher)
                }
                Err(reason) => {
                    problems.push(PolicyProblem::InvalidGlob {
                        index,
                        name: name(),
                        glob: spec.keys.clone(),
                        reason: reason.to_string(),
                    });
                    None
                }
            };

            if !known_regions.contains(&spec.home) {
                problems.push(PolicyProblem::UnknownHome {
                    index,
                    name: name(),
                    region: spec.home.clone(),
                });
            }
            for (replica, region) in spec.replicas.iter().enumerate() {
                if *region == spec.home {
                    problems.push(PolicyProblem::HomeInReplicas {
                        index,
                        name: name(),
                        replica,
                        region: region.clone(),
                    });
                } else if spec.replicas[..replica].contains(region) {
                    problems.push(PolicyProblem::DuplicateReplica {
                        index,
                        name: name(),
                        replica,
                        region: region.clone(),
                    });
                } else if !known_regions.contains(region) {
                    problems.push(PolicyProblem::UnknownReplica {
                        index,
                        name: name(),
                        replica,
                        region: region.clone(),
                    });
                }
            }

            if let Some(matcher) = matcher {
                compiled.push(Rule {
                    index,
                    name: spec.name.clone(),
                    keys: spec.keys.clone(),
                    home: spec.home.clone(),
                    replicas: spec.replicas.clone(),
                    foreign: spec.foreign,
                    matcher,
                });
            }
        }

        if problems.is_empty() {
            Ok(Policy { rules: compiled })
        } else {
            Err(problems)
        }
    }

    /// A policy without rules: every record is global.
    pub fn global() -> Policy {
        Policy::default()
    }

    /// The rules, in priority order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Where `key` lives: decided by the first matching rule, global if none.
    pub fn placement(&self, key: &str) -> Placement<'_> {
        match self.rules.iter().find(|rule| rule.matches(key)) {
            Some(rule) => Placement::Pinned {
                rule,
                home: &rule.home,
            },
            None => Placement::Global,
        }
    }

    /// Whether `region` may store the record `key`.
    pub fn may_hold(&self, key: &str, region: &str) -> bool {
        self.placement(key).may_hold(region)
    }

    /// The home region of `key`, or `None` if the record is global.
    pub fn home_region(&self, key: &str) -> Option<&str> {
        self.placement(key).home()
    }

    /// The residency class of `key`: `""` for a global record, else the name of the rule
    /// that pins it. Replication keeps its change logs and frontiers per class.
    pub fn class_of(&self, key: &str) -> &str {
        match self.placement(key) {
            Placement::Global => "",
            Placement::Pinned { rule, .. } => rule.name(),
        }
    }

    /// Whether `region` may hold records of `class` (a name [`Policy::class_of`] returns). A
    /// class no rule is named after is held nowhere, except `""`, which every region holds.
    pub fn class_holdable(&self, class: &str, region: &str) -> bool {
        if class.is_empty() {
            return true;
        }
        self.rules
            .iter()
            .find(|r| r.name() == class)
            .is_some_and(|r| r.may_hold(region))
    }

    /// The classes regions `a` and `b` may both hold, `""` first, then in rule order: what
    /// may flow on a link between them.
    pub fn shared_classes(&self, a: &str, b: &str) -> Vec<String> {
        let mut out = vec![String::new()];
        for rule in &self.rules {
            if rule.may_hold(a) && rule.may_hold(b) {
                out.push(rule.name().to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
