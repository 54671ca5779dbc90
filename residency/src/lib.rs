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
//! Globs are compiled with [`globset`] using `literal_separator(false)`,
//! `backslash_escape(true)` and case-sensitive matching:
//!
//! - `*` matches any sequence of characters, **including `/`**. So
//!   `users/eu/*` pins `users/eu/42` and also `users/eu/42/avatar`. Keys are
//!   not file paths; for a residency rule, pinning more keys than intended is
//!   the safe mistake and pinning fewer is the dangerous one.
//! - `**` also matches any sequence. As a whole path component it may match
//!   zero components: `a/**/b` matches `a/b` as well as `a/x/y/b`.
//! - `?` matches exactly one **byte**, and `[...]` / `[!...]` classes match one
//!   byte from (or outside) an ASCII set. globset matches bytes, not characters,
//!   so `?` does not match a non-ASCII character such as `é` (two bytes in
//!   UTF-8): use `*` where keys may contain non-ASCII text. Classes containing
//!   non-ASCII characters are rejected, because globset would silently turn
//!   them into byte sets that match fragments of characters.
//! - `{a,b}` matches either alternative.
//! - `\` escapes the next character (`\*` matches a literal `*`).
//!
//! Matching is done on the key's bytes. On Unix they are matched as they are;
//! globset on other platforms treats `\` in a key as `/`. Meridian nodes are
//! expected to run on Unix so that every node agrees on placement.
//!
//! # Validation
//!
//! [`Policy::new`] reports every problem it finds, not just the first, as a
//! list of [`PolicyProblem`]s. Among them it detects rules that can never match
//! because an earlier rule matches every key they match (see
//! [`PolicyProblem::Shadowed`] for the exact approximation).

use std::collections::HashMap;
use std::fmt;

use globset::{Candidate, GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

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
    matcher: GlobMatcher,
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
        self.matches_candidate(&Candidate::from_bytes(key.as_bytes()))
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

    fn matches_candidate(&self, candidate: &Candidate<'_>) -> bool {
        self.matcher.is_match_candidate(candidate)
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

/// The field of a rule that a [`PolicyProblem`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleField {
    /// `name`
    Name,
    /// `keys`
    Keys,
    /// `home`
    Home,
    /// `replicas[i]`
    Replica(usize),
}

impl fmt::Display for RuleField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleField::Name => f.write_str("name"),
            RuleField::Keys => f.write_str("keys"),
            RuleField::Home => f.write_str("home"),
            RuleField::Replica(i) => write!(f, "replicas[{i}]"),
        }
    }
}

/// One reason a list of [`RuleSpec`]s is not a valid policy.
///
/// `index` is the rule's 0-based position; `name` is its name as written.
/// [`Display`](fmt::Display) renders `residency[INDEX].FIELD: MESSAGE`, the
/// form a topology file checker prints.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    /// The rule has an empty name.
    #[error("{}: {}", self.path(), self.message())]
    EmptyName { index: usize, name: String },
    /// An earlier rule has the same name.
    #[error("{}: {}", self.path(), self.message())]
    DuplicateName {
        index: usize,
        name: String,
        /// Index of the earlier rule with this name.
        first: usize,
    },
    /// The glob does not compile, or can never match a key.
    #[error("{}: {}", self.path(), self.message())]
    InvalidGlob {
        index: usize,
        name: String,
        glob: String,
        reason: String,
    },
    /// `home` is not a region of the cluster.
    #[error("{}: {}", self.path(), self.message())]
    UnknownHome {
        index: usize,
        name: String,
        region: String,
    },
    /// `replicas[replica]` is not a region of the cluster.
    #[error("{}: {}", self.path(), self.message())]
    UnknownReplica {
        index: usize,
        name: String,
        replica: usize,
        region: String,
    },
    /// `replicas[replica]` repeats the home region.
    #[error("{}: {}", self.path(), self.message())]
    HomeInReplicas {
        index: usize,
        name: String,
        replica: usize,
        region: String,
    },
    /// `replicas[replica]` repeats an earlier entry of the same list.
    #[error("{}: {}", self.path(), self.message())]
    DuplicateReplica {
        index: usize,
        name: String,
        replica: usize,
        region: String,
    },
    /// The rule can never match because an earlier rule matches every key it
    /// matches, and the first match wins.
    ///
    /// Deciding glob inclusion in general is expensive, so this is a sound
    /// approximation: it is reported only when inclusion is certain, and some
    /// shadowed rules go unreported. Rule `index` is reported as shadowed by
    /// earlier rule `by` when
    /// - both globs are the same text, or
    /// - the earlier glob is a literal `PREFIX` followed only by `*`s (this
    ///   covers `*` and `**`), and the literal text of the later glob before
    ///   its first special character (`*?[]{}\`) starts with `PREFIX`.
    ///
    /// The second case is sound because every key the later glob matches
    /// starts with that literal text, and `PREFIX*` matches every key that
    /// starts with `PREFIX` (`*` crosses `/`).
    #[error("{}: {}", self.path(), self.message())]
    Shadowed {
        index: usize,
        name: String,
        /// Index of the earlier rule that matches every key this one matches.
        by: usize,
        by_name: String,
        by_keys: String,
    },
}

impl PolicyProblem {
    /// 0-based index of the rule concerned.
    pub fn index(&self) -> usize {
        match self {
            PolicyProblem::EmptyName { index, .. }
            | PolicyProblem::DuplicateName { index, .. }
            | PolicyProblem::InvalidGlob { index, .. }
            | PolicyProblem::UnknownHome { index, .. }
            | PolicyProblem::UnknownReplica { index, .. }
            | PolicyProblem::HomeInReplicas { index, .. }
            | PolicyProblem::DuplicateReplica { index, .. }
            | PolicyProblem::Shadowed { index, .. } => *index,
        }
    }

    /// Name of the rule concerned, as written.
    pub fn rule_name(&self) -> &str {
        match self {
            PolicyProblem::EmptyName { name, .. }
            | PolicyProblem::DuplicateName { name, .. }
            | PolicyProblem::InvalidGlob { name, .. }
            | PolicyProblem::UnknownHome { name, .. }
            | PolicyProblem::UnknownReplica { name, .. }
            | PolicyProblem::HomeInReplicas { name, .. }
            | PolicyProblem::DuplicateReplica { name, .. }
            | PolicyProblem::Shadowed { name, .. } => name,
        }
    }

    /// The field of the rule that is wrong.
    pub fn field(&self) -> RuleField {
        match self {
            PolicyProblem::EmptyName { .. } | PolicyProblem::DuplicateName { .. } => {
                RuleField::Name
            }
            PolicyProblem::InvalidGlob { .. } | PolicyProblem::Shadowed { .. } => RuleField::Keys,
            PolicyProblem::UnknownHome { .. } => RuleField::Home,
            PolicyProblem::UnknownReplica { replica, .. }
            | PolicyProblem::HomeInReplicas { replica, .. }
            | PolicyProblem::DuplicateReplica { replica, .. } => RuleField::Replica(*replica),
        }
    }

    /// The field's path in a topology file, e.g. `residency[1].home`.
    pub fn path(&self) -> String {
        format!("residency[{}].{}", self.index(), self.field())
    }

    /// What is wrong, without the field path, e.g. `unknown region "mars"`.
    pub fn message(&self) -> String {
        match self {
            PolicyProblem::EmptyName { .. } => "rule name must not be empty".to_owned(),
            PolicyProblem::DuplicateName { name, first, .. } => {
                format!("duplicate rule name {name:?} (first used by residency[{first}])")
            }
            PolicyProblem::InvalidGlob { glob, reason, .. } => {
                format!("invalid glob {glob:?}: {reason}")
            }
            PolicyProblem::UnknownHome { region, .. }
            | PolicyProblem::UnknownReplica { region, .. } => {
                format!("unknown region {region:?}")
            }
            PolicyProblem::HomeInReplicas { region, .. } => {
                format!("{region:?} is the rule's home region; replicas lists only other regions")
            }
            PolicyProblem::DuplicateReplica { region, .. } => {
                format!("region {region:?} is listed more than once")
            }
            PolicyProblem::Shadowed {
                by,
                by_name,
                by_keys,
                ..
            } => format!(
                "rule can never match: every key it matches is already matched by \
                 residency[{by}] ({by_name:?}, keys {by_keys:?}), and the first match wins"
            ),
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
        let mut valid_globs: Vec<(usize, &str, &str)> = Vec::new();

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

            let matcher = match compile_glob(&spec.keys) {
                Ok(matcher) => {
                    if let Some(&(by, by_name, by_keys)) = valid_globs
                        .iter()
                        .find(|(_, _, earlier)| shadows(earlier, &spec.keys))
                    {
                        problems.push(PolicyProblem::Shadowed {
                            index,
                            name: name(),
                            by,
                            by_name: by_name.to_owned(),
                            by_keys: by_keys.to_owned(),
                        });
                    }
                    valid_globs.push((index, &spec.name, &spec.keys));
                    Some(matcher)
                }
                Err(reason) => {
                    problems.push(PolicyProblem::InvalidGlob {
                        index,
                        name: name(),
                        glob: spec.keys.clone(),
                        reason,
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
        let candidate = Candidate::from_bytes(key.as_bytes());
        match self
            .rules
            .iter()
            .find(|rule| rule.matches_candidate(&candidate))
        {
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
}

fn compile_glob(glob: &str) -> Result<GlobMatcher, String> {
    if glob.is_empty() {
        return Err("an empty glob matches no key".to_owned());
    }
    if let Some(c) = non_ascii_in_class(glob) {
        return Err(format!(
            "character class contains the non-ASCII character {c:?}; classes match single \
             bytes, so use `*` or alternatives `{{..,..}}` instead"
        ));
    }
    GlobBuilder::new(glob)
        .literal_separator(false)
        // Explicit so that escaping does not depend on the platform default.
        .backslash_escape(true)
        .case_insensitive(false)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| e.kind().to_string())
}

/// Finds a non-ASCII character inside a `[...]` class, following globset's
/// class syntax (no escapes inside a class; `]` right after `[`, `[!` or `[^`
/// is a member, not the end).
fn non_ascii_in_class(glob: &str) -> Option<char> {
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' => {
                if matches!(chars.peek(), Some('!' | '^')) {
                    chars.next();
                }
                let mut first = true;
                for c in chars.by_ref() {
                    if c == ']' && !first {
                        break;
                    }
                    if !c.is_ascii() {
                        return Some(c);
                    }
                    first = false;
                }
            }
            _ => {}
        }
    }
    None
}

/// Characters that are not literal somewhere in globset's syntax.
const SPECIAL: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

/// Whether every key matched by `later` is certainly matched by `earlier`
/// (see [`PolicyProblem::Shadowed`]).
fn shadows(earlier: &str, later: &str) -> bool {
    if earlier == later {
        return true;
    }
    let prefix = earlier.trim_end_matches('*');
    if prefix.len() == earlier.len() || prefix.contains(SPECIAL) {
        return false;
    }
    let literal = later.split(SPECIAL).next().unwrap_or("");
    literal.starts_with(prefix)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn regions() -> Vec<String> {
        ["eu-west", "us-east", "ap-south"]
            .map(String::from)
            .to_vec()
    }

    fn spec(name: &str, keys: &str, home: &str, replicas: &[&str], foreign: Foreign) -> RuleSpec {
        RuleSpec {
            name: name.to_owned(),
            keys: keys.to_owned(),
            home: home.to_owned(),
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
            foreign,
        }
    }

    fn policy(rules: Vec<RuleSpec>) -> Policy {
        match Policy::new(rules, &regions()) {
            Ok(p) => p,
            Err(problems) => panic!("unexpected problems: {problems:#?}"),
        }
    }

    fn problems(rules: Vec<RuleSpec>) -> Vec<PolicyProblem> {
        match Policy::new(rules, &regions()) {
            Ok(p) => panic!("expected problems, got {p:?}"),
            Err(problems) => problems,
        }
    }

    fn rendered(rules: Vec<RuleSpec>) -> Vec<String> {
        problems(rules).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn foreign_serde_is_lowercase_and_defaults_to_forward() {
        use serde::de::IntoDeserializer;
        use serde::de::value::{Error, MapDeserializer, StrDeserializer};

        let parse = |s: &str| {
            let de: StrDeserializer<'_, Error> = s.into_deserializer();
            Foreign::deserialize(de).map_err(|e| e.to_string())
        };
        assert_eq!(parse("forward"), Ok(Foreign::Forward));
        assert_eq!(parse("reject"), Ok(Foreign::Reject));
        assert!(parse("Reject").is_err());
        assert!(parse("drop").is_err());
        assert_eq!(Foreign::default(), Foreign::Forward);
        assert_eq!(Foreign::Reject.to_string(), "reject");

        // A rule without `replicas` or `foreign` gets the documented defaults.
        let fields: Vec<(&str, &str)> = vec![("name", "n"), ("keys", "k/*"), ("home", "eu-west")];
        let de: MapDeserializer<'_, _, Error> = MapDeserializer::new(fields.into_iter());
        let rule = RuleSpec::deserialize(de).unwrap();
        assert_eq!(rule.foreign, Foreign::Forward);
        assert!(rule.replicas.is_empty());
    }

    #[test]
    fn unmatched_keys_are_global() {
        let p = policy(vec![spec(
            "eu",
            "users/eu/*",
            "eu-west",
            &[],
            Foreign::Forward,
        )]);
        assert_eq!(p.placement("orders/1"), Placement::Global);
        assert_eq!(p.home_region("orders/1"), None);
        for region in regions() {
            assert!(p.may_hold("orders/1", &region));
        }
        assert!(Policy::global().placement("users/eu/1") == Placement::Global);
    }

    #[test]
    fn pinned_keys_report_rule_and_home() {
        let p = policy(vec![
            spec(
                "eu",
                "users/eu/*",
                "eu-west",
                &["us-east"],
                Foreign::Forward,
            ),
            spec("us", "billing/us/*", "us-east", &[], Foreign::Reject),
        ]);
        let placement = p.placement("users/eu/42");
        let rule = placement.rule().unwrap();
        assert_eq!(rule.name(), "eu");
        assert_eq!(rule.keys(), "users/eu/*");
        assert_eq!(rule.index(), 0);
        assert_eq!(placement.home(), Some("eu-west"));
        assert!(placement.is_pinned());
        assert!(p.may_hold("users/eu/42", "eu-west"));
        assert!(p.may_hold("users/eu/42", "us-east"));
        assert!(!p.may_hold("users/eu/42", "ap-south"));

        let placement = p.placement("billing/us/7");
        assert_eq!(placement.home(), Some("us-east"));
        assert_eq!(placement.rule().unwrap().foreign(), Foreign::Reject);
        assert!(!p.may_hold("billing/us/7", "eu-west"));
        assert_eq!(p.home_region("billing/us/7"), Some("us-east"));
        assert_eq!(p.rules().len(), 2);
        assert_eq!(
            p.rules()[1].to_spec(),
            spec("us", "billing/us/*", "us-east", &[], Foreign::Reject)
        );
    }

    #[test]
    fn star_crosses_slashes() {
        let p = policy(vec![spec(
            "eu",
            "users/eu/*",
            "eu-west",
            &[],
            Foreign::Forward,
        )]);
        assert_eq!(p.home_region("users/eu/a/b/c"), Some("eu-west"));
        assert_eq!(p.home_region("users/eu/"), Some("eu-west"));
        assert_eq!(p.home_region("users/eu"), None);
        assert_eq!(p.home_region("users/euro/1"), None);
        // Case-sensitive: keys are opaque bytes.
        assert_eq!(p.home_region("USERS/eu/1"), None);
    }

    #[test]
    fn other_glob_syntax() {
        let p = policy(vec![
            spec("q", "a/?/x", "eu-west", &[], Foreign::Forward),
            spec("class", "b/[0-9]", "us-east", &[], Foreign::Forward),
            spec("neg", "c/[!0-9]", "us-east", &[], Foreign::Forward),
            spec("alt", "d/{x,y}/*", "ap-south", &[], Foreign::Forward),
            spec("esc", "e/\\*", "ap-south", &[], Foreign::Forward),
            spec("rec", "f/**/z", "ap-south", &[], Foreign::Forward),
        ]);
        assert_eq!(p.home_region("a/1/x"), Some("eu-west"));
        assert_eq!(p.home_region("a/12/x"), None);
        assert_eq!(
            p.home_region("a///x"),
            Some("eu-west"),
            "? matches a slash too"
        );
        // Documented limitation: `?` is one byte, `é` is two.
        assert_eq!(p.home_region("a/é/x"), None);
        assert_eq!(p.home_region("b/7"), Some("us-east"));
        assert_eq!(p.home_region("b/x"), None);
        assert_eq!(p.home_region("c/x"), Some("us-east"));
        assert_eq!(p.home_region("c/7"), None);
        assert_eq!(p.home_region("d/x/1"), Some("ap-south"));
        assert_eq!(p.home_region("d/z/1"), None);
        assert_eq!(p.home_region("e/*"), Some("ap-south"));
        assert_eq!(p.home_region("e/x"), None);
        assert_eq!(p.home_region("f/z"), Some("ap-south"));
        assert_eq!(p.home_region("f/a/b/z"), Some("ap-south"));
        assert_eq!(p.home_region("user/é/1"), None);
    }

    #[test]
    fn non_ascii_literals_match() {
        let p = policy(vec![spec(
            "fr",
            "utilisateurs/été/*",
            "eu-west",
            &[],
            Foreign::Forward,
        )]);
        assert_eq!(p.home_region("utilisateurs/été/1"), Some("eu-west"));
        assert_eq!(p.home_region("utilisateurs/ete/1"), None);
    }

    #[test]
    fn first_match_wins() {
        let p = policy(vec![
            spec(
                "eu-billing",
                "billing/eu/*",
                "eu-west",
                &[],
                Foreign::Reject,
            ),
            spec("billing", "billing/*", "us-east", &[], Foreign::Forward),
        ]);
        assert_eq!(p.home_region("billing/eu/1"), Some("eu-west"));
        assert_eq!(p.home_region("billing/us/1"), Some("us-east"));
    }

    #[test]
    fn unknown_regions_are_reported_with_field() {
        let got = rendered(vec![
            spec("ok", "a/*", "eu-west", &[], Foreign::Forward),
            spec(
                "mars",
                "b/*",
                "mars",
                &["us-east", "venus"],
                Foreign::Forward,
            ),
        ]);
        assert_eq!(
            got,
            vec![
                "residency[1].home: unknown region \"mars\"".to_owned(),
                "residency[1].replicas[1]: unknown region \"venus\"".to_owned(),
            ]
        );
    }

    #[test]
    fn home_in_replicas_and_duplicate_replicas() {
        let got = problems(vec![spec(
            "r",
            "a/*",
            "eu-west",
            &["us-east", "eu-west", "us-east"],
            Foreign::Forward,
        )]);
        assert_eq!(got.len(), 2);
        assert!(matches!(
            &got[0],
            PolicyProblem::HomeInReplicas { index: 0, replica: 1, region, .. } if region == "eu-west"
        ));
        assert!(matches!(
            &got[1],
            PolicyProblem::DuplicateReplica { replica: 2, .. }
        ));
        assert_eq!(got[0].path(), "residency[0].replicas[1]");
        assert_eq!(got[0].field(), RuleField::Replica(1));
        assert_eq!(got[0].rule_name(), "r");
    }

    #[test]
    fn duplicate_and_empty_names() {
        let got = problems(vec![
            spec("a", "a/*", "eu-west", &[], Foreign::Forward),
            spec("a", "b/*", "eu-west", &[], Foreign::Forward),
            spec("", "c/*", "eu-west", &[], Foreign::Forward),
        ]);
        assert_eq!(
            got,
            vec![
                PolicyProblem::DuplicateName {
                    index: 1,
                    name: "a".into(),
                    first: 0
                },
                PolicyProblem::EmptyName {
                    index: 2,
                    name: String::new()
                },
            ]
        );
        assert_eq!(
            got[0].to_string(),
            "residency[1].name: duplicate rule name \"a\" (first used by residency[0])"
        );
    }

    #[test]
    fn invalid_globs() {
        let got = problems(vec![
            spec("unclosed", "a/[b", "eu-west", &[], Foreign::Forward),
            spec("empty", "", "eu-west", &[], Foreign::Forward),
            spec("dangling", "a\\", "eu-west", &[], Foreign::Forward),
            spec("unicode-class", "a/[é]", "eu-west", &[], Foreign::Forward),
            spec(
                "backwards-range",
                "a/[z-a]",
                "eu-west",
                &[],
                Foreign::Forward,
            ),
        ]);
        let indexes: Vec<usize> = got.iter().map(PolicyProblem::index).collect();
        assert_eq!(indexes, vec![0, 1, 2, 3, 4], "{got:#?}");
        for p in &got {
            assert!(matches!(p, PolicyProblem::InvalidGlob { .. }), "{p:?}");
            assert!(
                p.to_string()
                    .starts_with(&format!("residency[{}].keys: invalid glob", p.index()))
            );
        }
    }

    #[test]
    fn ascii_classes_are_fine_after_escapes_and_literal_brackets() {
        policy(vec![
            spec("a", "a/[]x]", "eu-west", &[], Foreign::Forward),
            spec("b", "b/\\[é]", "eu-west", &[], Foreign::Forward),
            spec("c", "c/[!]]é", "eu-west", &[], Foreign::Forward),
            spec("d", "d/[!!]é", "eu-west", &[], Foreign::Forward),
        ]);
        assert_eq!(non_ascii_in_class("c/[!]é]"), Some('é'));
        assert_eq!(non_ascii_in_class("c/[^aé]"), Some('é'));
    }

    #[test]
    fn shadowed_rules_are_reported() {
        let cases: &[(&str, &str)] = &[
            ("users/*", "users/*"),
            ("*", "anything/at/all"),
            ("**", "x/?/[ab]"),
            ("users/*", "users/eu/*"),
            ("users/*", "users/"),
            ("users/**", "users/eu/[0-9]*"),
            ("use*", "users/{a,b}"),
            ("a/{b,c}", "a/{b,c}"),
        ];
        for (earlier, later) in cases {
            let got = problems(vec![
                spec("first", earlier, "eu-west", &[], Foreign::Forward),
                spec("second", later, "us-east", &[], Foreign::Forward),
            ]);
            assert_eq!(
                got,
                vec![PolicyProblem::Shadowed {
                    index: 1,
                    name: "second".into(),
                    by: 0,
                    by_name: "first".into(),
                    by_keys: (*earlier).into(),
                }],
                "{earlier} / {later}"
            );
            assert!(
                got[0]
                    .to_string()
                    .starts_with("residency[1].keys: rule can never match")
            );
        }
    }

    #[test]
    fn narrower_earlier_rules_do_not_shadow() {
        let cases: &[(&str, &str)] = &[
            ("users/eu/*", "users/*"),
            ("users/*/x", "users/a"),
            ("users/?*", "users/a"),
            ("a/**", "a"),
            ("users/*", "user*"),
            ("users/[ab]*", "users/a"),
            ("users/\\**", "users/*"),
        ];
        for (earlier, later) in cases {
            policy(vec![
                spec("first", earlier, "eu-west", &[], Foreign::Forward),
                spec("second", later, "us-east", &[], Foreign::Forward),
            ]);
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let got = problems(vec![
            spec("a", "*", "mars", &["eu-west", "venus"], Foreign::Forward),
            spec("a", "[", "eu-west", &["eu-west"], Foreign::Forward),
            spec("c", "x/*", "eu-west", &[], Foreign::Forward),
        ]);
        let paths: Vec<String> = got.iter().map(PolicyProblem::path).collect();
        assert_eq!(
            paths,
            vec![
                "residency[0].home",
                "residency[0].replicas[1]",
                "residency[1].name",
                "residency[1].keys",
                "residency[1].replicas[0]",
                "residency[2].keys",
            ]
        );
    }

    /// Reference matcher for globs made only of literals, `*` and `?`, with
    /// the documented semantics: `*` matches any sequence including `/`.
    fn naive_match(glob: &[u8], key: &[u8]) -> bool {
        match glob.split_first() {
            None => key.is_empty(),
            Some((b'*', rest)) => (0..=key.len()).any(|i| naive_match(rest, &key[i..])),
            Some((b'?', rest)) => !key.is_empty() && naive_match(rest, &key[1..]),
            Some((c, rest)) => key.first() == Some(c) && naive_match(rest, &key[1..]),
        }
    }

    /// Globs over a tiny alphabet so that random keys often match. No `**`,
    /// whose component semantics the naive matcher does not model.
    fn simple_glob() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof!["a", "b", "/", "\\*", "\\?"], 1..6).prop_map(
            |parts| {
                let mut glob = String::new();
                for p in parts {
                    if !(p == "*" && glob.ends_with('*')) {
                        glob.push_str(&p);
                    }
                }
                glob
            },
        )
    }

    fn key() -> impl Strategy<Value = String> {
        "[ab/]{0,7}"
    }

    fn all_keys(max_len: usize) -> Vec<String> {
        let mut keys = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..max_len {
            let mut next = Vec::new();
            for k in &frontier {
                for c in ['a', 'b', '/'] {
                    next.push(format!("{k}{c}"));
                }
            }
            keys.extend(next.iter().cloned());
            frontier = next;
        }
        keys
    }

    proptest! {
        #[test]
        fn first_match_equals_linear_scan(
            rules in proptest::collection::vec((simple_glob(), 0usize..3), 0..6),
            keys in proptest::collection::vec(key(), 1..20),
        ) {
            let names = regions();
            let specs: Vec<RuleSpec> = rules
                .iter()
                .enumerate()
                .map(|(i, (glob, home))| spec(&format!("r{i}"), glob, &names[*home], &[], Foreign::Forward))
                .collect();
            // Random rule lists are often (rightly) rejected as shadowed; the
            // property is about lists that are accepted.
            if let Ok(p) = Policy::new(specs.clone(), &names) {
                for key in &keys {
                    let expected = specs
                        .iter()
                        .position(|s| naive_match(s.keys.as_bytes(), key.as_bytes()));
                    let got = p.placement(key).rule().map(Rule::index);
                    prop_assert_eq!(got, expected, "key {:?}", key);
                    match expected {
                        None => prop_assert_eq!(p.home_region(key), None),
                        Some(i) => prop_assert_eq!(p.home_region(key), Some(specs[i].home.as_str())),
                    }
                }
            }
        }

        #[test]
        fn pinned_keys_may_live_at_home_only_with_replicas(
            rules in proptest::collection::vec((simple_glob(), 0usize..3, proptest::bits::u8::between(0, 3)), 0..6),
            keys in proptest::collection::vec(key(), 1..20),
        ) {
            let names = regions();
            let specs: Vec<RuleSpec> = rules
                .iter()
                .enumerate()
                .map(|(i, (glob, home, mask))| {
                    let replicas: Vec<&str> = (0..3)
                        .filter(|r| r != home && mask & (1 << r) != 0)
                        .map(|r| names[r].as_str())
                        .collect();
                    spec(&format!("r{i}"), glob, &names[*home], &replicas, Foreign::Reject)
                })
                .collect();
            if let Ok(p) = Policy::new(specs, &names) {
                for key in &keys {
                    match p.placement(key) {
                        Placement::Global => {
                            for r in &names {
                                prop_assert!(p.may_hold(key, r));
                            }
                        }
                        Placement::Pinned { rule, home } => {
                            prop_assert_eq!(home, rule.home());
                            prop_assert!(p.may_hold(key, home));
                            for r in &names {
                                let allowed = r == home || rule.replicas().contains(r);
                                prop_assert_eq!(p.may_hold(key, r), allowed);
                            }
                        }
                    }
                }
            }
        }

        /// The prefix case is detected, and is sound: every short key the later
        /// glob matches is matched by the earlier one.
        #[test]
        fn prefix_shadowing_is_detected_and_sound(
            prefix in "[ab/]{0,3}",
            stars in 1usize..4,
            extension in "[ab/]{0,2}",
            rest in "[ab/*?]{0,4}",
        ) {
            let earlier = format!("{prefix}{}", "*".repeat(stars));
            let later = format!("{prefix}{extension}{rest}");
            prop_assert!(shadows(&earlier, &later));
            assert_included(&earlier, &later)?;
        }

        /// Whatever pair `shadows` accepts, inclusion really holds.
        #[test]
        fn shadow_detection_is_sound(
            earlier in "[ab/*?]{1,5}",
            later in "[ab/*?]{1,5}",
        ) {
            if shadows(&earlier, &later) {
                assert_included(&earlier, &later)?;
            }
        }
    }

    fn assert_included(earlier: &str, later: &str) -> Result<(), TestCaseError> {
        let (Ok(e), Ok(l)) = (compile_glob(earlier), compile_glob(later)) else {
            return Ok(());
        };
        for k in all_keys(5) {
            let candidate = Candidate::from_bytes(k.as_bytes());
            if l.is_match_candidate(&candidate) {
                prop_assert!(
                    e.is_match_candidate(&candidate),
                    "{:?} matches {:?} but {:?} does not",
                    later,
                    k,
                    earlier
                );
            }
        }
        Ok(())
    }

    #[test]
    fn shadow_detection_finds_prefix_cases() {
        assert!(shadows("*", "x"));
        assert!(shadows("**", "x"));
        assert!(shadows("ab*", "abc?"));
        assert!(shadows("ab**", "ab"));
        assert!(!shadows("ab", "ab*"));
        assert!(!shadows("a?*", "ab"));
        assert!(!shadows("ab*", "a*"));
    }
}
