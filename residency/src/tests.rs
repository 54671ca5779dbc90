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

/// A case table: a policy of `(name, keys, home)` rules (no replicas, forwarding), and the
/// home region each key must get from it.
fn assert_homes(rules: &[(&str, &str, &str)], cases: &[(&str, Option<&str>)]) {
    let p = policy(
        rules
            .iter()
            .map(|&(name, keys, home)| spec(name, keys, home, &[], Foreign::Forward))
            .collect(),
    );
    for &(key, home) in cases {
        assert_eq!(p.home_region(key), home, "key {key:?}");
    }
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
    assert_homes(
        &[
            ("q", "a/?/x", "eu-west"),
            ("class", "b/[0-9]", "us-east"),
            ("neg", "c/[!0-9]", "us-east"),
            ("alt", "d/{x,y}/*", "ap-south"),
            ("esc", "e/\\*", "ap-south"),
            ("rec", "f/**/z", "ap-south"),
        ],
        &[
            ("a/1/x", Some("eu-west")),
            ("a/12/x", None),
            // `?` matches a slash too
            ("a///x", Some("eu-west")),
            // `?` is one character, also when it takes several bytes in UTF-8.
            ("a/é/x", Some("eu-west")),
            ("a/日/x", Some("eu-west")),
            ("a/😀/x", Some("eu-west")),
            ("b/7", Some("us-east")),
            ("b/x", None),
            ("c/x", Some("us-east")),
            ("c/7", None),
            ("d/x/1", Some("ap-south")),
            ("d/z/1", None),
            ("e/*", Some("ap-south")),
            ("e/x", None),
            ("f/z", Some("ap-south")),
            ("f/a/b/z", Some("ap-south")),
            ("user/é/1", None),
        ],
    );
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
    assert_homes(
        &[
            ("a", "a/[]x]", "eu-west"),
            ("b", "b/\\[é]", "eu-west"),
            ("c", "c/[!]]é", "eu-west"),
            ("d", "d/[!!]é", "eu-west"),
            ("e", "e/[\\]\\-]", "eu-west"),
            ("f", "f/[a-]", "eu-west"),
        ],
        &[
            ("a/]", Some("eu-west")),
            ("a/x", Some("eu-west")),
            ("a/y", None),
            ("b/[é]", Some("eu-west")),
            ("b/é", None),
            ("c/xé", Some("eu-west")),
            ("c/]é", None),
            ("d/xé", Some("eu-west")),
            ("d/!é", None),
            ("e/]", Some("eu-west")),
            ("e/-", Some("eu-west")),
            ("e/\\", None),
            ("f/a", Some("eu-west")),
            ("f/-", Some("eu-west")),
            ("f/b", None),
        ],
    );
}

#[test]
fn non_ascii_question_marks_classes_and_negation() {
    assert_homes(
        &[
            ("q", "users/?/x", "eu-west"),
            ("set", "set/[àé]", "eu-west"),
            ("range", "greek/[α-ω]", "us-east"),
            ("neg", "neg/[!é]", "us-east"),
            ("caret", "caret/[^a-z]", "us-east"),
            ("two", "two/??", "ap-south"),
        ],
        &[
            ("users/é/x", Some("eu-west")),
            ("users/e/x", Some("eu-west")),
            ("users/éé/x", None),
            ("users//x", None),
            ("set/é", Some("eu-west")),
            ("set/à", Some("eu-west")),
            ("set/e", None),
            ("greek/λ", Some("us-east")),
            ("greek/Λ", None),
            ("neg/e", Some("us-east")),
            ("neg/ü", Some("us-east")),
            ("neg/é", None),
            // a negated class needs a character
            ("neg/", None),
            ("caret/É", Some("us-east")),
            ("caret/e", None),
            ("two/日本", Some("ap-south")),
            ("two/日", None),
            // A decomposed `é` (e + combining accent) is two characters.
            ("users/e\u{301}/x", None),
            ("two/e\u{301}", Some("ap-south")),
        ],
    );
}

#[test]
fn escapes_are_literal() {
    assert_homes(
        &[
            ("star", "a/\\*", "eu-west"),
            ("q", "b/\\?", "eu-west"),
            ("brackets", "c/\\[x\\]", "eu-west"),
            ("braces", "d/\\{x,y\\}", "eu-west"),
            ("backslash", "e/\\\\", "eu-west"),
            ("letter", "f/\\é", "eu-west"),
        ],
        &[
            ("a/*", Some("eu-west")),
            ("a/x", None),
            ("b/?", Some("eu-west")),
            ("b/x", None),
            ("c/[x]", Some("eu-west")),
            ("c/x", None),
            ("d/{x,y}", Some("eu-west")),
            ("d/x", None),
            ("e/\\", Some("eu-west")),
            ("f/é", Some("eu-west")),
        ],
    );
}

#[test]
fn groups_and_recursive_stars() {
    assert_homes(
        &[
            ("empty-alt", "x{,s}/1", "eu-west"),
            ("nested", "n/{a{1,2},b}", "eu-west"),
            ("comma", "c,d", "eu-west"),
            ("prefix", "**/z", "us-east"),
            ("suffix", "s/**", "us-east"),
            ("inner-q", "q/**/?", "us-east"),
        ],
        &[
            ("x/1", Some("eu-west")),
            ("xs/1", Some("eu-west")),
            ("xy/1", None),
            ("n/a1", Some("eu-west")),
            ("n/a2", Some("eu-west")),
            ("n/b", Some("eu-west")),
            ("n/a", None),
            ("c,d", Some("eu-west")),
            ("z", Some("us-east")),
            ("/z", Some("us-east")),
            ("a/b/z", Some("us-east")),
            ("az", None),
            ("s/", Some("us-east")),
            ("s/a/b", Some("us-east")),
            ("s", None),
            ("q/é", Some("us-east")),
            ("q/a/é", Some("us-east")),
        ],
    );
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
    proptest::collection::vec(prop_oneof!["a", "b", "/", "\\*", "\\?"], 1..6).prop_map(|parts| {
        let mut glob = String::new();
        for p in parts {
            if !(p == "*" && glob.ends_with('*')) {
                glob.push_str(&p);
            }
        }
        glob
    })
}

fn key() -> impl Strategy<Value = String> {
    "[ab/]{0,7}"
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
}

#[test]
fn classes_name_the_pinning_rule_and_who_may_hold_them() {
    let p = policy(vec![
        spec(
            "eu",
            "users/eu/*",
            "eu-west",
            &["us-east"],
            Foreign::Forward,
        ),
        spec("ap", "users/ap/*", "ap-south", &[], Foreign::Reject),
    ]);
    assert_eq!(p.class_of("orders/1"), "");
    assert_eq!(p.class_of("users/eu/1"), "eu");
    assert_eq!(p.class_of("users/ap/1"), "ap");
    for region in regions() {
        assert!(p.class_holdable("", &region));
        assert!(!p.class_holdable("no-such-rule", &region));
    }
    assert!(p.class_holdable("eu", "us-east"));
    assert!(!p.class_holdable("eu", "ap-south"));
    assert_eq!(p.shared_classes("eu-west", "us-east"), vec!["", "eu"]);
    assert_eq!(p.shared_classes("eu-west", "ap-south"), vec![""]);
    assert_eq!(p.shared_classes("ap-south", "ap-south"), vec!["", "ap"]);
}
