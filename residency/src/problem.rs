//! What can be wrong with a list of [`RuleSpec`]s, and how it is reported.
//!
//! Every problem names the rule (by position and name) and the field it is about, so that a
//! topology checker can print `residency[INDEX].FIELD: MESSAGE` lines an operator can act on.
//! Messages are part of the CLI's output: their wording is stable.

use std::fmt;

#[cfg(doc)]
use crate::RuleSpec;

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
