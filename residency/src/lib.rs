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

use std::collections::HashMap;
use std::fmt;

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
    /// shadowed rules go unreported. Each glob is expanded into its
    /// alternatives (`{a,b}` groups, and `**/` as "nothing" or `*/`); rule
    /// `index` is reported as shadowed by earlier rule `by` when every
    /// alternative of the later glob is
    /// - identical to an alternative of the earlier glob (so identical globs,
    ///   `a/{b,c}` after `a/{c,b}`, or `a\b` after `ab`), or
    /// - starts with the literal characters `PREFIX` of an earlier
    ///   alternative that is exactly `PREFIX*` (this covers `*` and `**`).
    ///
    /// The second case is sound because every key that alternative matches
    /// starts with `PREFIX`, and `PREFIX*` matches every key that starts with
    /// `PREFIX` (`*` crosses `/`).
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
}

/// The glob language of residency rules (see the crate docs), matched over
/// Unicode characters.
///
/// A glob is parsed once into a small set of *alternatives*: `{a,b}` groups
/// and `**/` (zero or more path components) are expanded at parse time, so
/// each alternative is a flat sequence of literals, `?`, classes and `*`.
/// Matching one alternative is the classic two-pointer wildcard algorithm
/// that backtracks only to the most recent `*`: O(tokens × key length) time,
/// no recursion, no allocation.
mod glob {
    /// Longest accepted glob text, in bytes. Keys are at most 512 bytes; a
    /// longer glob is almost certainly a mistake.
    pub(crate) const MAX_GLOB_BYTES: usize = 4096;
    /// Most alternatives a glob may expand to (`{..}` groups multiply, each
    /// `**/` doubles).
    pub(crate) const MAX_ALTERNATIVES: usize = 256;
    /// Deepest nesting of `{..}` groups.
    pub(crate) const MAX_NESTING: usize = 8;
    /// Most tokens all alternatives together may hold: matching a key costs
    /// at most this many steps per key character.
    pub(crate) const MAX_EXPANDED_TOKENS: usize = 16_384;

    /// One element of a flat alternative.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Token {
        /// Exactly this character.
        Lit(char),
        /// `?`: exactly one character.
        One,
        /// `*`: any sequence of characters, `/` included.
        Star,
        /// `[...]`: one character in (or, negated, outside) the ranges.
        Class {
            negated: bool,
            ranges: Vec<(char, char)>,
        },
    }

    impl Token {
        /// Whether this single-character token matches `c` (`Star` never
        /// reaches here).
        fn matches_char(&self, c: char) -> bool {
            match self {
                Token::Lit(l) => *l == c,
                Token::One => true,
                Token::Star => false,
                Token::Class { negated, ranges } => {
                    ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
                }
            }
        }
    }

    /// Why a glob text is not a valid glob. Positions are 1-based character
    /// offsets into the glob.
    #[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
    pub(crate) enum GlobError {
        #[error("an empty glob matches no key")]
        Empty,
        #[error("the glob is {len} bytes long; at most {MAX_GLOB_BYTES} are allowed")]
        TooLong { len: usize },
        #[error("unclosed character class: the `[` at character {at} has no closing `]`")]
        UnclosedClass { at: usize },
        #[error(
            "empty character class at character {at}: a class needs at least one member \
             (a `]` right after `[` or `[!` is a member, not the end); write `\\[` for a literal `[`"
        )]
        EmptyClass { at: usize },
        #[error(
            "reversed range {lo:?}-{hi:?} in the character class at character {at}: \
             a range goes from the lower character to the higher"
        )]
        ReversedRange { at: usize, lo: char, hi: char },
        #[error(
            "trailing backslash: `\\` at character {at} escapes nothing; write `\\\\` for a literal backslash"
        )]
        DanglingEscape { at: usize },
        #[error("unclosed group: the `{{` at character {at} has no closing `}}`")]
        UnclosedGroup { at: usize },
        #[error("the `}}` at character {at} closes no group; write `\\}}` for a literal `}}`")]
        UnopenedGroup { at: usize },
        #[error("`{{..}}` groups are nested more than {MAX_NESTING} deep (at character {at})")]
        TooDeep { at: usize },
        #[error(
            "the glob expands to more than {MAX_ALTERNATIVES} alternatives \
             (`{{..}}` groups multiply, each `**/` doubles)"
        )]
        TooManyAlternatives,
        #[error(
            "the glob expands to {tokens} elements (its alternatives together); at most \
             {MAX_EXPANDED_TOKENS} are allowed"
        )]
        TooLarge { tokens: usize },
        #[error("the glob matches only the empty key, and keys are never empty")]
        OnlyEmpty,
    }

    /// A parsed glob: the union of its alternatives.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) struct Glob {
        alternatives: Vec<Vec<Token>>,
    }

    /// A node of the parse tree, before `{..}` and `**/` are expanded.
    #[derive(Debug)]
    enum Node {
        Tok(Token),
        /// `{a,b,..}`.
        Group(Vec<Vec<Node>>),
        /// `**/` at the start of a sequence or after a `/`: nothing, or `*/`.
        AnyDirs,
    }

    impl Glob {
        /// Parses and validates `text`.
        pub(crate) fn parse(text: &str) -> Result<Glob, GlobError> {
            if text.is_empty() {
                return Err(GlobError::Empty);
            }
            if text.len() > MAX_GLOB_BYTES {
                return Err(GlobError::TooLong { len: text.len() });
            }
            let chars: Vec<char> = text.chars().collect();
            let mut parser = Parser { chars, at: 0 };
            let nodes = parser.sequence(0)?;
            // A `,` or `}` left over at the top level: only `}` stops the
            // top-level sequence (`,` is a literal there).
            if parser.at < parser.chars.len() {
                return Err(GlobError::UnopenedGroup { at: parser.at + 1 });
            }
            let alternatives = expand(&nodes)?;
            let tokens = alternatives.iter().map(Vec::len).sum();
            if tokens > MAX_EXPANDED_TOKENS {
                return Err(GlobError::TooLarge { tokens });
            }
            if alternatives.iter().all(Vec::is_empty) {
                return Err(GlobError::OnlyEmpty);
            }
            Ok(Glob { alternatives })
        }

        /// Whether the glob matches `key`.
        pub(crate) fn is_match(&self, key: &str) -> bool {
            self.alternatives.iter().any(|alt| match_tokens(alt, key))
        }

        /// Whether every key `later` matches is certainly matched by `self`
        /// (a sound approximation, see `PolicyProblem::Shadowed`).
        pub(crate) fn covers(&self, later: &Glob) -> bool {
            later
                .alternatives
                .iter()
                .all(|l| self.alternatives.iter().any(|e| alternative_covers(e, l)))
        }
    }

    /// `e ⊇ l` when they are equal, or when `e` is literals followed by one
    /// `*` and `l` starts with the same literals.
    fn alternative_covers(e: &[Token], l: &[Token]) -> bool {
        if e == l {
            return true;
        }
        match e.split_last() {
            Some((Token::Star, prefix)) => {
                prefix.iter().all(|t| matches!(t, Token::Lit(_)))
                    && l.len() >= prefix.len()
                    && prefix.iter().zip(l).all(|(a, b)| a == b)
            }
            _ => false,
        }
    }

    /// Two-pointer wildcard matching over the characters of `key`; on a
    /// mismatch, the most recent `*` absorbs one more character and matching
    /// resumes after it. Earlier stars never need revisiting: whatever the
    /// later star can absorb covers any other split.
    fn match_tokens(tokens: &[Token], key: &str) -> bool {
        let mut t = 0;
        let mut s = 0;
        // (token index after the last star, key offset where its match ends)
        let mut star: Option<(usize, usize)> = None;
        loop {
            match tokens.get(t) {
                Some(Token::Star) => {
                    t += 1;
                    star = Some((t, s));
                    continue;
                }
                Some(tok) => {
                    if let Some(c) = next_char(key, s)
                        && tok.matches_char(c)
                    {
                        t += 1;
                        s += c.len_utf8();
                        continue;
                    }
                }
                None if s == key.len() => return true,
                None => {}
            }
            let Some((after_star, absorbed)) = star else {
                return false;
            };
            let Some(c) = next_char(key, absorbed) else {
                return false;
            };
            let absorbed = absorbed + c.len_utf8();
            star = Some((after_star, absorbed));
            t = after_star;
            s = absorbed;
        }
    }

    fn next_char(key: &str, at: usize) -> Option<char> {
        key.get(at..).and_then(|rest| rest.chars().next())
    }

    struct Parser {
        chars: Vec<char>,
        at: usize,
    }

    impl Parser {
        fn peek(&self) -> Option<char> {
            self.chars.get(self.at).copied()
        }

        /// A sequence up to the end, or (inside a group, `depth > 0`) up to
        /// an unconsumed `,` or `}`. At the top level it stops at a `}`,
        /// which the caller reports.
        fn sequence(&mut self, depth: usize) -> Result<Vec<Node>, GlobError> {
            let mut nodes: Vec<Node> = Vec::new();
            while let Some(c) = self.peek() {
                let at = self.at + 1;
                match c {
                    ',' if depth > 0 => break,
                    '}' => break,
                    '*' => {
                        let mut run = 0;
                        while self.peek() == Some('*') {
                            self.at += 1;
                            run += 1;
                        }
                        let component_start =
                            matches!(nodes.last(), None | Some(Node::Tok(Token::Lit('/'))));
                        if run >= 2 && component_start && self.peek() == Some('/') {
                            self.at += 1;
                            nodes.push(Node::AnyDirs);
                        } else if !matches!(nodes.last(), Some(Node::Tok(Token::Star))) {
                            nodes.push(Node::Tok(Token::Star));
                        }
                    }
                    '?' => {
                        self.at += 1;
                        nodes.push(Node::Tok(Token::One));
                    }
                    '[' => {
                        self.at += 1;
                        nodes.push(Node::Tok(self.class(at)?));
                    }
                    '\\' => {
                        self.at += 1;
                        let c = self.escaped(at)?;
                        nodes.push(Node::Tok(Token::Lit(c)));
                    }
                    '{' => {
                        if depth >= MAX_NESTING {
                            return Err(GlobError::TooDeep { at });
                        }
                        self.at += 1;
                        let mut branches = Vec::new();
                        loop {
                            branches.push(self.sequence(depth + 1)?);
                            match self.peek() {
                                Some(',') => self.at += 1,
                                Some('}') => {
                                    self.at += 1;
                                    break;
                                }
                                _ => return Err(GlobError::UnclosedGroup { at }),
                            }
                        }
                        nodes.push(Node::Group(branches));
                    }
                    c => {
                        self.at += 1;
                        nodes.push(Node::Tok(Token::Lit(c)));
                    }
                }
            }
            Ok(nodes)
        }

        /// The character after a `\` (at 1-based position `at`).
        fn escaped(&mut self, at: usize) -> Result<char, GlobError> {
            let c = self.peek().ok_or(GlobError::DanglingEscape { at })?;
            self.at += 1;
            Ok(c)
        }

        /// A class body after its `[` (at 1-based position `at`).
        fn class(&mut self, at: usize) -> Result<Token, GlobError> {
            let negated = matches!(self.peek(), Some('!' | '^'));
            if negated {
                self.at += 1;
            }
            let mut ranges = Vec::new();
            // Whether the class so far is just a `]` taken as its first member.
            let mut only_bracket = false;
            loop {
                let Some(c) = self.peek() else {
                    // `[]` or `[!]` with no later `]`: the operator meant an
                    // empty class, which cannot match anything.
                    return Err(if only_bracket {
                        GlobError::EmptyClass { at }
                    } else {
                        GlobError::UnclosedClass { at }
                    });
                };
                if c == ']' && !ranges.is_empty() {
                    self.at += 1;
                    break;
                }
                only_bracket = ranges.is_empty() && c == ']';
                let here = self.at + 1;
                self.at += 1;
                let lo = if c == '\\' { self.escaped(here)? } else { c };
                // `a-z` is a range unless the `-` is last (`[a-]`).
                let is_range = self.peek() == Some('-')
                    && self.chars.get(self.at + 1).is_some_and(|&n| n != ']');
                if is_range {
                    self.at += 1;
                    let hi_at = self.at + 1;
                    let raw = self.peek().ok_or(GlobError::UnclosedClass { at })?;
                    self.at += 1;
                    let hi = if raw == '\\' {
                        self.escaped(hi_at)?
                    } else {
                        raw
                    };
                    if hi < lo {
                        return Err(GlobError::ReversedRange { at, lo, hi });
                    }
                    ranges.push((lo, hi));
                } else {
                    ranges.push((lo, lo));
                }
            }
            Ok(Token::Class { negated, ranges })
        }
    }

    /// Expands groups and `**/` into flat alternatives, merging adjacent
    /// stars and dropping duplicates.
    fn expand(nodes: &[Node]) -> Result<Vec<Vec<Token>>, GlobError> {
        let mut out: Vec<Vec<Token>> = vec![Vec::new()];
        for node in nodes {
            let suffixes: Vec<Vec<Token>> = match node {
                Node::Tok(tok) => {
                    for alt in &mut out {
                        push(alt, tok.clone());
                    }
                    continue;
                }
                Node::AnyDirs => vec![Vec::new(), vec![Token::Star, Token::Lit('/')]],
                Node::Group(branches) => {
                    let mut all = Vec::new();
                    for branch in branches {
                        for alt in expand(branch)? {
                            if !all.contains(&alt) {
                                all.push(alt);
                            }
                        }
                        if all.len() > MAX_ALTERNATIVES {
                            return Err(GlobError::TooManyAlternatives);
                        }
                    }
                    all
                }
            };
            if out.len().saturating_mul(suffixes.len()) > MAX_ALTERNATIVES {
                return Err(GlobError::TooManyAlternatives);
            }
            let mut next = Vec::with_capacity(out.len() * suffixes.len());
            for prefix in &out {
                for suffix in &suffixes {
                    let mut alt = prefix.clone();
                    for tok in suffix {
                        push(&mut alt, tok.clone());
                    }
                    if !next.contains(&alt) {
                        next.push(alt);
                    }
                }
            }
            out = next;
        }
        Ok(out)
    }

    fn push(alt: &mut Vec<Token>, tok: Token) {
        if !(tok == Token::Star && alt.last() == Some(&Token::Star)) {
            alt.push(tok);
        }
    }
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
        // Case-sensitive: keys are compared as written.
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
        // `?` is one character, also when it takes several bytes in UTF-8.
        assert_eq!(p.home_region("a/é/x"), Some("eu-west"));
        assert_eq!(p.home_region("a/日/x"), Some("eu-west"));
        assert_eq!(p.home_region("a/😀/x"), Some("eu-west"));
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
            spec("unclosed-group", "a/{b,c", "eu-west", &[], Foreign::Forward),
            spec(
                "backwards-range",
                "a/[z-a]",
                "eu-west",
                &[],
                Foreign::Forward,
            ),
            spec("empty-class", "a/[]", "eu-west", &[], Foreign::Forward),
            spec("stray-brace", "a/b}", "eu-west", &[], Foreign::Forward),
            spec("only-empty", "{}", "eu-west", &[], Foreign::Forward),
        ]);
        let indexes: Vec<usize> = got.iter().map(PolicyProblem::index).collect();
        assert_eq!(indexes, vec![0, 1, 2, 3, 4, 5, 6, 7], "{got:#?}");
        for p in &got {
            assert!(matches!(p, PolicyProblem::InvalidGlob { .. }), "{p:?}");
            assert!(
                p.to_string()
                    .starts_with(&format!("residency[{}].keys: invalid glob", p.index()))
            );
        }
    }

    #[test]
    fn classes_after_escapes_and_literal_brackets() {
        let p = policy(vec![
            spec("a", "a/[]x]", "eu-west", &[], Foreign::Forward),
            spec("b", "b/\\[é]", "eu-west", &[], Foreign::Forward),
            spec("c", "c/[!]]é", "eu-west", &[], Foreign::Forward),
            spec("d", "d/[!!]é", "eu-west", &[], Foreign::Forward),
            spec("e", "e/[\\]\\-]", "eu-west", &[], Foreign::Forward),
            spec("f", "f/[a-]", "eu-west", &[], Foreign::Forward),
        ]);
        assert_eq!(p.home_region("a/]"), Some("eu-west"));
        assert_eq!(p.home_region("a/x"), Some("eu-west"));
        assert_eq!(p.home_region("a/y"), None);
        assert_eq!(p.home_region("b/[é]"), Some("eu-west"));
        assert_eq!(p.home_region("b/é"), None);
        assert_eq!(p.home_region("c/xé"), Some("eu-west"));
        assert_eq!(p.home_region("c/]é"), None);
        assert_eq!(p.home_region("d/xé"), Some("eu-west"));
        assert_eq!(p.home_region("d/!é"), None);
        assert_eq!(p.home_region("e/]"), Some("eu-west"));
        assert_eq!(p.home_region("e/-"), Some("eu-west"));
        assert_eq!(p.home_region("e/\\"), None);
        assert_eq!(p.home_region("f/a"), Some("eu-west"));
        assert_eq!(p.home_region("f/-"), Some("eu-west"));
        assert_eq!(p.home_region("f/b"), None);
    }

    #[test]
    fn non_ascii_question_marks_classes_and_negation() {
        let p = policy(vec![
            spec("q", "users/?/x", "eu-west", &[], Foreign::Forward),
            spec("set", "set/[àé]", "eu-west", &[], Foreign::Forward),
            spec("range", "greek/[α-ω]", "us-east", &[], Foreign::Forward),
            spec("neg", "neg/[!é]", "us-east", &[], Foreign::Forward),
            spec("caret", "caret/[^a-z]", "us-east", &[], Foreign::Forward),
            spec("two", "two/??", "ap-south", &[], Foreign::Forward),
        ]);
        assert_eq!(p.home_region("users/é/x"), Some("eu-west"));
        assert_eq!(p.home_region("users/e/x"), Some("eu-west"));
        assert_eq!(p.home_region("users/éé/x"), None);
        assert_eq!(p.home_region("users//x"), None);
        assert_eq!(p.home_region("set/é"), Some("eu-west"));
        assert_eq!(p.home_region("set/à"), Some("eu-west"));
        assert_eq!(p.home_region("set/e"), None);
        assert_eq!(p.home_region("greek/λ"), Some("us-east"));
        assert_eq!(p.home_region("greek/Λ"), None);
        assert_eq!(p.home_region("neg/e"), Some("us-east"));
        assert_eq!(p.home_region("neg/ü"), Some("us-east"));
        assert_eq!(p.home_region("neg/é"), None);
        assert_eq!(
            p.home_region("neg/"),
            None,
            "a negated class needs a character"
        );
        assert_eq!(p.home_region("caret/É"), Some("us-east"));
        assert_eq!(p.home_region("caret/e"), None);
        assert_eq!(p.home_region("two/日本"), Some("ap-south"));
        assert_eq!(p.home_region("two/日"), None);
        // A decomposed `é` (e + combining accent) is two characters.
        assert_eq!(p.home_region("users/e\u{301}/x"), None);
        assert_eq!(p.home_region("two/e\u{301}"), Some("ap-south"));
    }

    #[test]
    fn escapes_are_literal() {
        let p = policy(vec![
            spec("star", "a/\\*", "eu-west", &[], Foreign::Forward),
            spec("q", "b/\\?", "eu-west", &[], Foreign::Forward),
            spec("brackets", "c/\\[x\\]", "eu-west", &[], Foreign::Forward),
            spec("braces", "d/\\{x,y\\}", "eu-west", &[], Foreign::Forward),
            spec("backslash", "e/\\\\", "eu-west", &[], Foreign::Forward),
            spec("letter", "f/\\é", "eu-west", &[], Foreign::Forward),
        ]);
        assert_eq!(p.home_region("a/*"), Some("eu-west"));
        assert_eq!(p.home_region("a/x"), None);
        assert_eq!(p.home_region("b/?"), Some("eu-west"));
        assert_eq!(p.home_region("b/x"), None);
        assert_eq!(p.home_region("c/[x]"), Some("eu-west"));
        assert_eq!(p.home_region("c/x"), None);
        assert_eq!(p.home_region("d/{x,y}"), Some("eu-west"));
        assert_eq!(p.home_region("d/x"), None);
        assert_eq!(p.home_region("e/\\"), Some("eu-west"));
        assert_eq!(p.home_region("f/é"), Some("eu-west"));
    }

    #[test]
    fn groups_and_recursive_stars() {
        let p = policy(vec![
            spec("empty-alt", "x{,s}/1", "eu-west", &[], Foreign::Forward),
            spec("nested", "n/{a{1,2},b}", "eu-west", &[], Foreign::Forward),
            spec("comma", "c,d", "eu-west", &[], Foreign::Forward),
            spec("prefix", "**/z", "us-east", &[], Foreign::Forward),
            spec("suffix", "s/**", "us-east", &[], Foreign::Forward),
            spec("inner-q", "q/**/?", "us-east", &[], Foreign::Forward),
        ]);
        assert_eq!(p.home_region("x/1"), Some("eu-west"));
        assert_eq!(p.home_region("xs/1"), Some("eu-west"));
        assert_eq!(p.home_region("xy/1"), None);
        assert_eq!(p.home_region("n/a1"), Some("eu-west"));
        assert_eq!(p.home_region("n/a2"), Some("eu-west"));
        assert_eq!(p.home_region("n/b"), Some("eu-west"));
        assert_eq!(p.home_region("n/a"), None);
        assert_eq!(p.home_region("c,d"), Some("eu-west"));
        assert_eq!(p.home_region("z"), Some("us-east"));
        assert_eq!(p.home_region("/z"), Some("us-east"));
        assert_eq!(p.home_region("a/b/z"), Some("us-east"));
        assert_eq!(p.home_region("az"), None);
        assert_eq!(p.home_region("s/"), Some("us-east"));
        assert_eq!(p.home_region("s/a/b"), Some("us-east"));
        assert_eq!(p.home_region("s"), None);
        assert_eq!(p.home_region("q/é"), Some("us-east"));
        assert_eq!(p.home_region("q/a/é"), Some("us-east"));
    }

    #[test]
    fn glob_errors_say_what_and_where() {
        let reason = |glob: &str| match glob::Glob::parse(glob) {
            Ok(g) => panic!("{glob:?} parsed as {g:?}"),
            Err(e) => e.to_string(),
        };
        let cases: &[(&str, &str)] = &[
            ("", "empty glob"),
            ("a/[bc", "the `[` at character 3 has no closing `]`"),
            ("a/[", "the `[` at character 3 has no closing `]`"),
            ("a/[]", "empty character class at character 3"),
            ("a/[!]", "empty character class at character 3"),
            ("a/[^]", "empty character class at character 3"),
            ("ab\\", "trailing backslash: `\\` at character 3"),
            ("a/[b\\", "trailing backslash"),
            (
                "a/[z-a]",
                "reversed range 'z'-'a' in the character class at character 3",
            ),
            ("a/[é-a]", "reversed range 'é'-'a'"),
            ("a/{b,c", "the `{` at character 3 has no closing `}`"),
            ("a/b}", "the `}` at character 4 closes no group"),
            ("{,}", "only the empty key"),
            (
                "{{{{{{{{{a}}}}}}}}}",
                "nested more than 8 deep (at character 9)",
            ),
            (
                "{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}",
                "more than 256 alternatives",
            ),
        ];
        for (glob, expected) in cases {
            let got = reason(glob);
            assert!(got.contains(expected), "{glob:?}: {got}");
        }
        let wide = format!("{}{}", "{a,b}".repeat(8), "x".repeat(100));
        assert!(reason(&wide).contains("at most 16384 are allowed"));
        let long = "a".repeat(glob::MAX_GLOB_BYTES + 1);
        assert!(reason(&long).contains("at most 4096"));
        // Eight levels are fine, as are 256 alternatives.
        assert!(glob::Glob::parse("{{{{{{{{a}}}}}}}}").is_ok());
        assert!(glob::Glob::parse("{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}").is_ok());
        let invalid = problems(vec![spec("r", "a/[]", "eu-west", &[], Foreign::Forward)]);
        assert_eq!(
            invalid[0].to_string(),
            "residency[0].keys: invalid glob \"a/[]\": empty character class at character 3: \
             a class needs at least one member (a `]` right after `[` or `[!` is a member, \
             not the end); write `\\[` for a literal `[`"
        );
    }

    #[test]
    fn matching_is_not_exponential() {
        // A backtracking matcher would try ~C(512, 20) splits here.
        let glob = format!("{}b", "*a".repeat(20));
        let g = glob::Glob::parse(&glob).unwrap();
        let key = "a".repeat(512);
        assert!(!g.is_match(&key));
        let key = format!("{}b", "a".repeat(511));
        assert!(g.is_match(&key));
        let g = glob::Glob::parse(&"*?".repeat(100)).unwrap();
        assert!(!g.is_match(&"é".repeat(99)));
        assert!(g.is_match(&"é".repeat(100)));
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
            // An empty glob is invalid, and only valid globs are compared.
            prop_assume!(!later.is_empty());
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

    fn shadows(earlier: &str, later: &str) -> bool {
        match (glob::Glob::parse(earlier), glob::Glob::parse(later)) {
            (Ok(e), Ok(l)) => e.covers(&l),
            _ => false,
        }
    }

    fn assert_included(earlier: &str, later: &str) -> Result<(), TestCaseError> {
        let (Ok(e), Ok(l)) = (glob::Glob::parse(earlier), glob::Glob::parse(later)) else {
            return Ok(());
        };
        for k in all_keys(5) {
            if l.is_match(&k) {
                prop_assert!(
                    e.is_match(&k),
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

    /// One element of a generated glob, matched by [`reference_match`]
    /// independently of the parser.
    #[derive(Clone, Debug, PartialEq)]
    enum Piece {
        Lit(char),
        One,
        Star,
        Class {
            negated: bool,
            caret: bool,
            members: Vec<(char, char)>,
        },
    }

    /// Characters for literals, class members and keys: ASCII, two-, three-
    /// and four-byte UTF-8, and characters that are special in globs.
    const ALPHABET: &[char] = &[
        'a', 'b', '/', 'é', 'ß', '日', '😀', '*', '?', '-', ']', '{', ',',
    ];

    fn glob_char() -> impl Strategy<Value = char> {
        proptest::sample::select(ALPHABET)
    }

    fn piece() -> impl Strategy<Value = Piece> {
        let member =
            (glob_char(), glob_char()).prop_map(|(a, b)| if a <= b { (a, b) } else { (b, a) });
        let single = glob_char().prop_map(|c| (c, c));
        prop_oneof![
            4 => glob_char().prop_map(Piece::Lit),
            2 => Just(Piece::One),
            3 => Just(Piece::Star),
            2 => (
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(prop_oneof![single, member], 1..4),
            )
                .prop_map(|(negated, caret, members)| Piece::Class { negated, caret, members }),
        ]
    }

    /// Pieces without adjacent stars: `**/` has its own component meaning,
    /// which [`reference_match`] does not model.
    fn pieces() -> impl Strategy<Value = Vec<Piece>> {
        proptest::collection::vec(piece(), 1..7).prop_map(normalize)
    }

    fn normalize(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            if !(p == Piece::Star && out.last() == Some(&Piece::Star)) {
                out.push(p);
            }
        }
        out
    }

    fn render(pieces: &[Piece]) -> String {
        // Escaped when special; plain letters sometimes escaped too, to test
        // that an escaped ordinary character is itself.
        fn lit(out: &mut String, c: char, special: &str) {
            if special.contains(c) || c == 'b' {
                out.push('\\');
            }
            out.push(c);
        }
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Lit(c) => lit(&mut out, *c, "*?[]{},\\"),
                Piece::One => out.push('?'),
                Piece::Star => out.push('*'),
                Piece::Class {
                    negated,
                    caret,
                    members,
                } => {
                    out.push('[');
                    if *negated {
                        out.push(if *caret { '^' } else { '!' });
                    }
                    for (i, &(lo, hi)) in members.iter().enumerate() {
                        // `!`/`^` first would negate, `]` closes, `-` makes ranges.
                        let special = if i == 0 { "]-\\!^" } else { "]-\\" };
                        lit(&mut out, lo, special);
                        if hi != lo {
                            out.push('-');
                            lit(&mut out, hi, "]-\\");
                        }
                    }
                    out.push(']');
                }
            }
        }
        out
    }

    /// The obvious exponential matcher: `*` tries every split.
    fn reference_match(pieces: &[Piece], key: &[char]) -> bool {
        let Some((first, rest)) = pieces.split_first() else {
            return key.is_empty();
        };
        if *first == Piece::Star {
            return (0..=key.len()).any(|i| reference_match(rest, &key[i..]));
        }
        let Some((&c, key_rest)) = key.split_first() else {
            return false;
        };
        let ok = match first {
            Piece::Lit(l) => *l == c,
            Piece::One => true,
            Piece::Star => unreachable!(),
            Piece::Class {
                negated, members, ..
            } => members.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated,
        };
        ok && reference_match(rest, key_rest)
    }

    fn key_chars() -> impl Strategy<Value = Vec<char>> {
        proptest::collection::vec(glob_char(), 0..8)
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_the_reference(
            pieces in pieces(),
            keys in proptest::collection::vec(key_chars(), 1..16),
        ) {
            let text = render(&pieces);
            let glob = glob::Glob::parse(&text)
                .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            for key in &keys {
                let key_text: String = key.iter().collect();
                prop_assert_eq!(
                    glob.is_match(&key_text),
                    reference_match(&pieces, key),
                    "glob {:?} key {:?}", text, key_text
                );
            }
        }

        /// Keys that the glob matches are built from the pieces, so that the
        /// positive case is exercised as often as the negative one.
        #[test]
        fn matcher_accepts_keys_built_from_the_glob(
            pieces in pieces(),
            fill in proptest::collection::vec(key_chars(), 7),
        ) {
            let text = render(&pieces);
            let glob = glob::Glob::parse(&text)
                .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            let mut key = Vec::new();
            for (p, fill) in pieces.iter().zip(&fill) {
                match p {
                    Piece::Lit(c) => key.push(*c),
                    Piece::One => key.push(fill.first().copied().unwrap_or('x')),
                    Piece::Star => key.extend(fill),
                    Piece::Class { negated: false, members, .. } => key.push(members[0].0),
                    Piece::Class { negated: true, members, .. } => {
                        let outside = ['x', 'ü', '🦀', '\u{10FFFF}']
                            .into_iter()
                            .find(|c| !members.iter().any(|&(lo, hi)| lo <= *c && *c <= hi));
                        key.push(outside.unwrap_or('x'));
                    }
                }
            }
            let key_text: String = key.iter().collect();
            prop_assert_eq!(glob.is_match(&key_text), reference_match(&pieces, &key));
        }

        /// `P{A,B}S` matches exactly what `PAS` or `PBS` matches.
        #[test]
        fn groups_are_unions(
            p in pieces(),
            a in pieces(),
            b in pieces(),
            s in pieces(),
            keys in proptest::collection::vec(key_chars(), 1..16),
        ) {
            let text = format!("{}{{{},{}}}{}", render(&p), render(&a), render(&b), render(&s));
            let glob = glob::Glob::parse(&text)
                .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            let joined = |mid: &[Piece]| normalize([&p[..], mid, &s[..]].concat());
            let (pas, pbs) = (joined(&a), joined(&b));
            for key in &keys {
                let key_text: String = key.iter().collect();
                prop_assert_eq!(
                    glob.is_match(&key_text),
                    reference_match(&pas, key) || reference_match(&pbs, key),
                    "glob {:?} key {:?}", text, key_text
                );
            }
        }

        /// Any text either parses or is refused with a reason; nothing panics.
        #[test]
        fn arbitrary_globs_never_panic(
            text in r"[a*?\[\]{}!^\\,/é日-]{0,16}",
            keys in proptest::collection::vec(r"[a/é日\]\[*-]{0,10}", 1..8),
        ) {
            match glob::Glob::parse(&text) {
                Ok(glob) => {
                    for key in &keys {
                        let _ = glob.is_match(key);
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
