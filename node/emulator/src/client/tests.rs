use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// A server that answers every request with `raw` and closes: the control client must read
/// whatever framing an HTTP/1 answer uses and refuse what is not one.
async fn answering(raw: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            // The whole request head first, so the client is never reset while it sends.
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(raw).await;
            let _ = stream.shutdown().await;
        }
    });
    addr.to_string()
}

async fn get(raw: &'static [u8]) -> Result<HttpAnswer, ProxyError> {
    control_request(&answering(raw).await, "GET", "/links", None).await
}

#[tokio::test]
async fn http_responses_parse() {
    let a = get(
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await
    .expect("parse");
    assert_eq!(
        a,
        HttpAnswer {
            status: 400,
            body: b"{}".to_vec()
        }
    );
    let a = get(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
    )
    .await
    .expect("chunked");
    assert_eq!(a.body, b"abcde");
    let a = get(b"HTTP/1.0 204 No Content\r\n\r\n")
        .await
        .expect("no length");
    assert_eq!(a.status, 204);
    for raw in [
        &b"HTTP/1.1 200 OK\r\n"[..],
        b"SSH-2.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc",
        b"HTTP/1.1 abc OK\r\n\r\n",
    ] {
        let got = get(raw).await;
        assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(raw));
        // A malformed answer, as opposed to an unreachable API.
        assert!(
            matches!(got, Err(ProxyError::ControlProtocol { .. })),
            "{:?}: {got:?}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[tokio::test]
async fn an_unreachable_control_api_is_a_connect_error_naming_it() {
    // Bound, then closed: nothing listens there any more.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    match control_request(&format!("http://{addr}/"), "GET", "/links", None).await {
        Err(e @ ProxyError::ControlConnect { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("control API at {addr}: cannot connect: ")),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn set_targets_parse_and_encode() {
    assert_eq!(
        SetTarget::parse_link("eu-1:us-1").expect("valid").path(),
        "/links/eu-1/us-1"
    );
    assert_eq!(SetTarget::All.path(), "/links");
    for bad in ["eu-1", ":us-1", "eu-1:", "a:b:c"] {
        assert!(SetTarget::parse_link(bad).is_err(), "{bad}");
    }
    assert_eq!(control_authority("http://127.0.0.1:80/"), "127.0.0.1:80");
}
