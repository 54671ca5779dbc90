use super::*;

#[test]
fn update_applies_only_given_fields() {
    let base = Impairment {
        delay_ms: 5,
        jitter_ms: 1,
        loss: 0.1,
        duplicate: 0.0,
        reorder: 0.0,
        down: false,
    };
    let u = SettingsUpdate::from_json(br#"{"delay_ms": 50, "down": true}"#).expect("valid");
    let s = u.apply_to(base);
    assert_eq!(s.delay_ms, 50);
    assert!(s.down);
    assert_eq!(s.jitter_ms, 1);
    assert!((s.loss - 0.1).abs() < f64::EPSILON);
    assert_eq!(
        SettingsUpdate::from_json(b"").expect("empty"),
        SettingsUpdate::default()
    );
}

#[test]
fn invalid_updates_are_refused_with_the_field() {
    for (body, field) in [
        (r#"{"loss": 1.5}"#, "loss"),
        (r#"{"duplicate": -0.1}"#, "duplicate"),
        (r#"{"reorder": 2}"#, "reorder"),
        (r#"{"delay_ms": 60001}"#, "delay_ms"),
        (r#"{"jitter_ms": 999999}"#, "jitter_ms"),
    ] {
        match SettingsUpdate::from_json(body.as_bytes()) {
            Err(ProxyError::InvalidSetting { field: f, .. }) => assert_eq!(f, field, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    for body in [
        r#"{"delay_ms": -1}"#,
        r#"{"delay": 1}"#,
        r#"{"direction": "up"}"#,
        r#"{"down": "yes"}"#,
        "[1]",
        "{",
    ] {
        assert!(
            matches!(
                SettingsUpdate::from_json(body.as_bytes()),
                Err(ProxyError::InvalidBody(_))
            ),
            "{body}"
        );
    }
}

#[test]
fn direction_selects_the_directions_touched() {
    let u = SettingsUpdate {
        direction: Some(DirectionSel::Reverse),
        ..SettingsUpdate::default()
    };
    assert!(u.touches(Dir::Reverse) && !u.touches(Dir::Forward));
    assert!(SettingsUpdate::default().touches(Dir::Forward));
    assert_eq!(
        "forward".parse::<DirectionSel>().ok(),
        Some(DirectionSel::Forward)
    );
    assert!("sideways".parse::<DirectionSel>().is_err());
}
