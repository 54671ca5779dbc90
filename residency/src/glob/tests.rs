#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

#[test]
fn matching_is_not_exponential() {
    // A backtracking matcher would try ~C(512, 20) splits here.
    let glob = format!("{}b", "*a".repeat(20));
    let g = Glob::parse(&glob).unwrap();
    let key = "a".repeat(512);
    assert!(!g.is_match(&key));
    let key = format!("{}b", "a".repeat(511));
    assert!(g.is_match(&key));
    let g = Glob::parse(&"*?".repeat(100)).unwrap();
    assert!(!g.is_match(&"é".repeat(99)));
    assert!(g.is_match(&"é".repeat(100)));
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
    match (Glob::parse(earlier), Glob::parse(later)) {
        (Ok(e), Ok(l)) => e.covers(&l),
        _ => false,
    }
}

fn assert_included(earlier: &str, later: &str) -> Result<(), TestCaseError> {
    let (Ok(e), Ok(l)) = (Glob::parse(earlier), Glob::parse(later)) else {
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
    let member = (glob_char(), glob_char()).prop_map(|(a, b)| if a <= b { (a, b) } else { (b, a) });
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
        let glob = Glob::parse(&text)
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
        let glob = Glob::parse(&text)
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
        let glob = Glob::parse(&text)
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
        match Glob::parse(&text) {
            Ok(glob) => {
                for key in &keys {
                    let _ = glob.is_match(key);
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
