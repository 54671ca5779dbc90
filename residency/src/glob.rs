//! The glob language of residency rules (see the crate docs), matched over
//! Unicode characters.
//!
//! A glob is parsed once into a small set of *alternatives*: `{a,b}` groups
//! and `**/` (zero or more path components) are expanded at parse time, so
//! each alternative is a flat sequence of literals, `?`, classes and `*`.
//! Matching one alternative is the classic two-pointer wildcard algorithm
//! that backtracks only to the most recent `*`: O(tokens × key length) time,
//! no recursion, no allocation.

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
            let is_range =
                self.peek() == Some('-') && self.chars.get(self.at + 1).is_some_and(|&n| n != ']');
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

#[cfg(test)]
mod tests;
