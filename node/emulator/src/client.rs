//! The control client behind `meridian proxy set`: one HTTP request to a running emulator's
//! control API. Invariant: every failure is a typed [`ProxyError`] that names the control
//! address, and at most [`MAX_CONTROL_RESPONSE_BYTES`] of an answer are read.

use std::error::Error as _;
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE};

use crate::{LinkInfo, ProxyError, SettingsUpdate};

/// Largest HTTP answer the control client reads.
const MAX_CONTROL_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Timeout of one control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP answer: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `ADDR`, `host:port` or `http://host:port[/]`, as `host:port`.
pub fn control_authority(addr: &str) -> &str {
    let a = addr.strip_prefix("http://").unwrap_or(addr);
    a.trim_end_matches('/')
}

/// Sends one request to the control API at `addr` and reads the whole answer, whatever its
/// status.
pub async fn control_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<HttpAnswer, ProxyError> {
    let authority = control_authority(addr).to_string();
    let connect_err = |message: String| ProxyError::ControlConnect {
        addr: authority.clone(),
        message,
    };
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|e| connect_err(format!("cannot send the request: {e}")))?;
    // Straight to the emulator: a proxy from the environment has no business between a CLI
    // and a control API on this machine or the next.
    let client = reqwest::Client::builder()
        .no_proxy()
        .user_agent("meridian-proxy")
        .build()
        .map_err(|e| connect_err(format!("cannot connect: {}", innermost(&e))))?;
    let request = client
        .request(method, format!("http://{authority}{path}"))
        .header(ACCEPT, "application/json")
        .header(CONTENT_TYPE, "application/json")
        .body(body.unwrap_or_default().to_vec());
    let exchange = async {
        let mut response = request
            .send()
            .await
            .map_err(|e| failure(&authority, "cannot send the request", &e))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| failure(&authority, "cannot read the answer", &e))?
        {
            if body.len() + chunk.len() > MAX_CONTROL_RESPONSE_BYTES {
                return Err(ProxyError::ControlProtocol {
                    addr: authority.clone(),
                    message: format!(
                        "the answer is longer than {MAX_CONTROL_RESPONSE_BYTES} bytes"
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpAnswer { status, body })
    };
    match tokio::time::timeout(CONTROL_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(connect_err(format!(
            "no answer within {} s",
            CONTROL_TIMEOUT.as_secs()
        ))),
    }
}

/// The typed error of a failed exchange: the connection (unreachable, or an I/O failure while
/// `doing` what failed) or the answer (not HTTP/1, or cut short).
fn failure(authority: &str, doing: &str, error: &reqwest::Error) -> ProxyError {
    let addr = authority.to_string();
    let detail = innermost(error);
    if error.is_connect() || error.is_builder() {
        return ProxyError::ControlConnect {
            addr,
            message: format!("cannot connect: {detail}"),
        };
    }
    match io_cause(error) {
        Some(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => ProxyError::ControlConnect {
            addr,
            message: format!("{doing}: {detail}"),
        },
        _ => ProxyError::ControlProtocol {
            addr,
            message: detail,
        },
    }
}

/// The deepest cause of `error`: the operating system's or the parser's own words, without
/// the layers of "error sending request for url".
fn innermost(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The I/O error somewhere under `error`, if the failure came from the socket.
fn io_cause(error: &reqwest::Error) -> Option<&std::io::Error> {
    let mut cause = error.source();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cause = c.source();
    }
    None
}

/// What `meridian proxy set` changes.
#[derive(Clone, Debug, PartialEq)]
pub enum SetTarget {
    /// One link, `FROM:TO`.
    Link { from: String, to: String },
    /// Every link.
    All,
}

impl SetTarget {
    /// Parses `FROM:TO`.
    pub fn parse_link(text: &str) -> Result<SetTarget, ProxyError> {
        match text.split_once(':') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() && !to.contains(':') => {
                Ok(SetTarget::Link {
                    from: from.to_string(),
                    to: to.to_string(),
                })
            }
            _ => Err(ProxyError::InvalidSetting {
                field: "--link",
                message: format!("{text:?} is not FROM:TO (two node ids)"),
            }),
        }
    }

    fn path(&self) -> String {
        use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
        const SEGMENT: &AsciiSet = &CONTROLS
            .add(b' ')
            .add(b'"')
            .add(b'#')
            .add(b'%')
            .add(b'/')
            .add(b'?')
            .add(b'<')
            .add(b'>')
            .add(b'`')
            .add(b'{')
            .add(b'}');
        match self {
            SetTarget::All => "/links".into(),
            SetTarget::Link { from, to } => format!(
                "/links/{}/{}",
                utf8_percent_encode(from, SEGMENT),
                utf8_percent_encode(to, SEGMENT)
            ),
        }
    }
}

/// `meridian proxy set`: sends `update` to the control API at `control` and answers the
/// resulting state of the links it touched.
pub async fn set_remote(
    control: &str,
    target: &SetTarget,
    update: &SettingsUpdate,
) -> Result<Vec<LinkInfo>, ProxyError> {
    update.validate()?;
    let body = serde_json::to_vec(update).map_err(|e| ProxyError::InvalidBody(e.to_string()))?;
    let answer = control_request(control, "PUT", &target.path(), Some(&body)).await?;
    let protocol = |message: String| ProxyError::ControlProtocol {
        addr: control_authority(control).to_string(),
        message,
    };
    if !(200..300).contains(&answer.status) {
        let message = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).into_owned());
        return Err(ProxyError::ControlStatus {
            status: answer.status,
            message,
        });
    }
    match target {
        SetTarget::All => serde_json::from_slice::<Vec<LinkInfo>>(&answer.body)
            .map_err(|e| protocol(e.to_string())),
        SetTarget::Link { .. } => serde_json::from_slice::<LinkInfo>(&answer.body)
            .map(|l| vec![l])
            .map_err(|e| protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests;
