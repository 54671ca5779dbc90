//! The control API: reading links, changing settings (one link, every link, one direction),
//! refusing invalid settings without changing anything; and the control client
//! ([`meridian_emulator::set_remote`]) against it.

mod common;

use common::{Echo, emulator_to};
use std::net::SocketAddr;

use meridian_emulator::{
    DirectionSel, Emulator, LinkInfo, ProxyError, SetTarget, SettingsUpdate, serve_control,
    set_remote,
};

/// Serves `emu`'s control API on a free port until the test ends; its address.
async fn serve(emu: &Emulator) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind control");
    let control = listener.local_addr().expect("control addr");
    tokio::spawn(serve_control(
        emu.handle(),
        listener,
        std::future::pending(),
    ));
    control
}

async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str) -> T {
    let answer = http.get(url).send().await.expect("GET");
    answer.json().await.expect("a JSON answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_reads_changes_and_validates() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let control = serve(&emu).await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let url = |p: &str| format!("http://{control}{p}");

    let r = http.get(url("/healthz")).send().await.expect("healthz");
    assert_eq!(r.status(), 200);

    let links: Vec<LinkInfo> = get_json(&http, &url("/links")).await;
    assert_eq!(links.len(), 1);
    assert_eq!((links[0].from.as_str(), links[0].to.as_str()), ("a", "b"));
    let raw: serde_json::Value = get_json(&http, &url("/links/a/b")).await;
    for dir in ["forward", "reverse"] {
        assert!(
            raw[dir]["counters"]["bytes_forwarded"].is_u64(),
            "{dir} counters lack bytes_forwarded: {raw}"
        );
    }
    assert_eq!(links[0].upstream, echo.addr);

    let r = http
        .put(url("/links/a/b"))
        .body(r#"{"delay_ms": 5, "jitter_ms": 2, "loss": 0.25, "direction": "forward"}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    let link: LinkInfo = r.json().await.expect("json");
    assert_eq!(link.forward.settings.delay_ms, 5);
    assert_eq!(link.forward.settings.jitter_ms, 2);
    assert!((link.forward.settings.loss - 0.25).abs() < 1e-9);
    assert_eq!(link.reverse.settings.delay_ms, 0);

    // Omitted fields stay; PUT /links applies to all.
    let r = http
        .put(url("/links"))
        .body(r#"{"down": true}"#)
        .send()
        .await
        .expect("put all");
    assert_eq!(r.status(), 200);
    let all: Vec<LinkInfo> = r.json().await.expect("json");
    assert!(all[0].forward.settings.down && all[0].reverse.settings.down);
    assert_eq!(all[0].forward.settings.delay_ms, 5);
    let got: LinkInfo = get_json(&http, &url("/links/a/b")).await;
    assert_eq!(got.forward.settings, all[0].forward.settings);

    for body in [
        r#"{"loss": 1.5}"#,
        r#"{"duplicate": -1}"#,
        r#"{"delay_ms": -5}"#,
        r#"{"delay_ms": 99999999}"#,
        r#"{"direction": "sideways"}"#,
        r#"{"speed": 1}"#,
        r#"not json"#,
        r#"[]"#,
    ] {
        let r = http
            .put(url("/links/a/b"))
            .body(body)
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 400, "{body}");
        let e: serde_json::Value = r.json().await.expect("json error");
        assert!(e["error"].is_string() && e["message"].is_string(), "{e}");
    }
    // Nothing changed by refused requests.
    assert_eq!(
        emu.link("a", "b").expect("link").forward.settings,
        got.forward.settings
    );
    let r = http
        .put(url("/links/a/zz"))
        .body("{}")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_remote_changes_one_link_or_all_and_reports_what_the_api_refused() {
    let echo = Echo::start().await;
    let emu = emulator_to(echo.addr).await;
    let control = serve(&emu).await.to_string();

    let one = SetTarget::parse_link("a:b").expect("valid target");
    let links = set_remote(
        &control,
        &one,
        &SettingsUpdate {
            delay_ms: Some(7),
            direction: Some(DirectionSel::Reverse),
            ..SettingsUpdate::default()
        },
    )
    .await
    .expect("set one link");
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].reverse.settings.delay_ms, 7);
    assert_eq!(links[0].forward.settings.delay_ms, 0);
    assert_eq!(
        emu.link("a", "b").expect("link").reverse.settings,
        links[0].reverse.settings
    );

    // `http://host:port/` names the same API.
    let all = set_remote(
        &format!("http://{control}/"),
        &SetTarget::All,
        &SettingsUpdate {
            down: Some(true),
            ..SettingsUpdate::default()
        },
    )
    .await
    .expect("set every link");
    assert!(all[0].forward.settings.down && all[0].reverse.settings.down);
    assert_eq!(all[0].reverse.settings.delay_ms, 7);

    let missing = SetTarget::Link {
        from: "a".into(),
        to: "zz".into(),
    };
    match set_remote(&control, &missing, &SettingsUpdate::default()).await {
        Err(ProxyError::ControlStatus { status, message }) => {
            assert_eq!(status, 404);
            assert_eq!(message, "no emulated link a -> zz");
        }
        other => panic!("{other:?}"),
    }

    // Refused before anything is sent.
    let invalid = SettingsUpdate {
        loss: Some(3.0),
        ..SettingsUpdate::default()
    };
    match set_remote(&control, &SetTarget::All, &invalid).await {
        Err(ProxyError::InvalidSetting { field, .. }) => assert_eq!(field, "loss"),
        other => panic!("{other:?}"),
    }
    assert_eq!(emu.link("a", "b").expect("link").forward.settings.loss, 0.0);
}
