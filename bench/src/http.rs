//! The HTTP client side: one pooled client and a checked `PUT`.

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;

use crate::error::{Context, Result};

pub fn client(max_connections: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_connections.max(1) * 2)
        .tcp_nodelay(true)
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// What a successful write answers; only `version` is read.
#[derive(Deserialize)]
struct WriteAck {
    version: String,
}

/// `PUT url` with a JSON body; Ok only for a 200 whose JSON body has a `version`.
/// The error is a short description, for counting and showing the first few.
pub async fn put(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> std::result::Result<(), String> {
    put_version(http, url, body).await.map(drop)
}

/// Like [`put`], and gives the answer's `version`.
pub async fn put_version(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> std::result::Result<String, String> {
    let resp = http
        .put(url)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(body)
        .send()
        .await
        .map_err(|e| format!("PUT {url}: {}", error_chain(&e)))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("PUT {url}: reading the answer: {}", error_chain(&e)))?;
    if status != reqwest::StatusCode::OK {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        return Err(format!("PUT {url}: answered {status}: {text}"));
    }
    let ack = serde_json::from_slice::<WriteAck>(&bytes).map_err(|e| {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        format!("PUT {url}: 200 but not a write answer with \"version\" ({e}): {text}")
    })?;
    Ok(ack.version)
}

/// `GET url` answering 200 with a JSON body.
pub async fn get_json(
    http: &reqwest::Client,
    url: &str,
) -> std::result::Result<serde_json::Value, String> {
    let resp = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: reading the answer: {}", error_chain(&e)))?;
    if status != reqwest::StatusCode::OK {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        return Err(format!("GET {url}: answered {status}: {text}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("GET {url}: not JSON: {e}"))
}

/// reqwest's Display hides the cause ("error sending request"); show the whole chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A JSON object of about `target_len` bytes:
/// `{"name":..,"email":..,"n":N,"tags":["a","b"],"active":true,"pad":"xxx"}`.
pub fn make_body(n: u64, target_len: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"name":"Ada Lovelace","email":"ada.lovelace@example.com","n":{n},"tags":["a","b"],"active":true,"pad":""#
    );
    let tail = r#""}"#;
    let pad = target_len.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(head.len() + pad + tail.len());
    body.extend_from_slice(head.as_bytes());
    body.resize(body.len() + pad, b'x');
    body.extend_from_slice(tail.as_bytes());
    body
}

/// Polls `GET {base}/readyz` until it answers 200 (for an external `--target`).
pub async fn wait_ready(http: &reqwest::Client, base: &str, timeout: Duration) -> Result<()> {
    let url = format!("{base}/readyz");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = match http.get(&url).timeout(Duration::from_secs(2)).send().await {
            Ok(resp) if resp.status() == reqwest::StatusCode::OK => return Ok(()),
            Ok(resp) => format!("answered {}", resp.status()),
            Err(e) => error_chain(&e),
        };
        if std::time::Instant::now() >= deadline {
            return Err(crate::error::Error::runtime(format!(
                "GET {url} did not answer 200 within {} s (last: {last})",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_a_json_object_of_the_asked_size() {
        for n in [0u64, 7, 123_456_789] {
            let body = make_body(n, 200);
            assert_eq!(body.len(), 200);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            assert_eq!(v["n"], n);
        }
        // Too small a target still gives valid JSON.
        let v: serde_json::Value = serde_json::from_slice(&make_body(1, 10)).expect("valid JSON");
        assert!(v.is_object());
    }

    #[test]
    fn ack_needs_version() {
        let ack = serde_json::from_slice::<WriteAck>(br#"{"key":"k","version":"x"}"#).unwrap();
        assert_eq!(ack.version, "x");
        assert!(serde_json::from_slice::<WriteAck>(br#"{"key":"k"}"#).is_err());
        assert!(serde_json::from_slice::<WriteAck>(b"not json").is_err());
    }
}
