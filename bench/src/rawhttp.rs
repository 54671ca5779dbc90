//! A minimal HTTP/1.1 keep-alive client for the write load generator.
//!
//! The node and the bench share a small machine, so every microsecond of CPU the load
//! generator spends is taken from the node. Like `wrk` or `redis-benchmark`, this client
//! does only what the write scenario needs: one `PUT` at a time on one keep-alive TCP
//! connection (TCP_NODELAY), the request written with one write from a reused buffer, and
//! answers read into a reused buffer. Only `Content-Length` bodies are accepted (chunked
//! answers are refused), the head is bounded to [`MAX_HEAD_BYTES`] and the body to
//! [`MAX_BODY_BYTES`]. Bytes read past one answer are kept for the next one.
//!
//! After any error (I/O, malformed or refused answer, timeout) the connection is dropped,
//! since its state is unknown; so is it after an answer carrying `Connection: close`. The
//! next request then opens a new connection (one attempt per request).

use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most an answer's status line and headers may take.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The largest answer body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Headers parsed per answer at most.
const MAX_HEADERS: usize = 64;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From sending a request to having its whole answer (as reqwest's client timeout was).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where requests go: the address to connect to and the `Host` header to send.
#[derive(Clone, Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    host: Arc<str>,
}

impl Endpoint {
    /// Resolves a base URL `http://HOST[:PORT]` (an optional trailing `/`, no path).
    pub async fn resolve(base: &str) -> Result<Self, String> {
        let bad = || format!("{base}: expected http://HOST:PORT");
        let rest = base.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        // A port is there when the last ':' comes after any IPv6 bracket.
        let has_port = authority
            .rfind(':')
            .is_some_and(|i| !authority[i..].contains(']'));
        let lookup = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(lookup.as_str())
            .await
            .map_err(|e| format!("{base}: resolving {lookup}: {e}"))?
            .next()
            .ok_or_else(|| format!("{base}: {lookup} resolves to no address"))?;
        Ok(Endpoint {
            addr,
            host: Arc::from(authority),
        })
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            host: Arc::from(addr.to_string().as_str()),
        }
    }
}

/// One answer; `body` lives in the connection's buffer until the next request.
#[derive(Debug)]
pub struct Answer<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

/// One keep-alive HTTP/1.1 connection, (re)opened on demand by the request that needs it.
pub struct RawHttpConn {
    endpoint: Endpoint,
    stream: Option<TcpStream>,
    /// Bytes read and not consumed yet; the first `consumed` of them are the last answer.
    buf: Vec<u8>,
    consumed: usize,
    /// The request being sent (head and body), reused.
    req: Vec<u8>,
}

impl RawHttpConn {
    /// A connection to `endpoint`; it is opened by the first request, not here.
    pub fn new(endpoint: Endpoint) -> Self {
        RawHttpConn {
            endpoint,
            stream: None,
            buf: Vec::with_capacity(READ_CHUNK),
            consumed: 0,
            req: Vec::with_capacity(1024),
        }
    }

    /// `PUT path` with a JSON body; gives the answer whatever its status. `Err` for
    /// anything that is not a complete, well-formed answer; the connection is then
    /// dropped and the next request opens a new one.
    pub async fn put(&mut self, path: &str, body: &[u8]) -> Result<Answer<'_>, String> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(path, body)).await {
            Ok(Ok((status, range))) => Ok(Answer {
                status,
                body: &self.buf[range],
            }),
            Ok(Err(e)) => {
                self.disconnect();
                Err(e)
            }
            Err(_) => {
                self.disconnect();
                Err(format!(
                    "no complete answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ))
            }
        }
    }

    /// [`put`](Self::put) checked like a durable write: `Ok` only for a 200 whose body
    /// carries a `"version"`. The error is a short description naming the path.
    pub async fn put_checked(&mut self, path: &str, body: &[u8]) -> Result<(), String> {
        let answer = self
            .put(path, body)
            .await
            .map_err(|e| format!("PUT {path}: {e}"))?;
        let text = || String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)]);
        if answer.status != 200 {
            return Err(format!(
                "PUT {path}: answered {}: {}",
                answer.status,
                text()
            ));
        }
        if !contains(answer.body, b"\"version\"") {
            return Err(format!(
                "PUT {path}: 200 but not a write answer with \"version\": {}",
                text()
            ));
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        self.stream = None;
        self.buf.clear();
        self.consumed = 0;
    }

    /// Sends one request and reads its answer; gives the status and where the body lies
    /// in `buf`. On `Err` the caller drops the connection.
    async fn exchange(&mut self, path: &str, body: &[u8]) -> Result<(u16, Range<usize>), String> {
        if !path.starts_with('/') {
            return Err(format!("the path {path:?} does not start with '/'"));
        }
        // The previous answer is done with; what came after it stays.
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                // Bytes left from a connection that is gone belong to no request of ours.
                self.buf.clear();
                self.stream.insert(open(&self.endpoint).await?)
            }
        };

        let req = &mut self.req;
        req.clear();
        req.extend_from_slice(b"PUT ");
        push_path(req, path);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        req.extend_from_slice(self.endpoint.host.as_bytes());
        req.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
        // Writing into a Vec cannot fail.
        let _ = write!(req, "{}", body.len());
        req.extend_from_slice(b"\r\n\r\n");
        req.extend_from_slice(body);
        stream
            .write_all(req)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;

        // The head.
        let (head_len, head) = loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES => {
                        break (n, Head::read(&resp)?);
                    }
                    Ok(httparse::Status::Complete(_)) => return Err(head_too_large()),
                    Ok(httparse::Status::Partial) if self.buf.len() >= MAX_HEAD_BYTES => {
                        return Err(head_too_large());
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(format!("malformed answer head: {e}")),
                }
            }
            if read_more(stream, &mut self.buf, READ_CHUNK).await? == 0 {
                return Err(if self.buf.is_empty() {
                    "the server closed the connection without answering".into()
                } else {
                    format!(
                        "the server closed the connection in the middle of the answer's head \
                         ({} bytes)",
                        self.buf.len()
                    )
                });
            }
        };

        // The body: exactly Content-Length bytes; anything after them is the next answer's.
        let end = head_len + head.content_length;
        while self.buf.len() < end {
            let missing = end - self.buf.len();
            if read_more(stream, &mut self.buf, missing).await? == 0 {
                return Err(format!(
                    "the server closed the connection in the middle of the answer's body \
                     ({} of {} bytes)",
                    self.buf.len() - head_len,
                    head.content_length
                ));
            }
        }
        self.consumed = end;
        if head.close {
            // The answer stays readable in `buf`; the next request reconnects.
            self.stream = None;
        }
        Ok((head.status, head_len..end))
    }
}

/// What is needed from an answer's head.
struct Head {
    status: u16,
    content_length: usize,
    close: bool,
}

impl Head {
    fn read(resp: &httparse::Response<'_, '_>) -> Result<Head, String> {
        let status = resp.code.ok_or("answer without a status code")?;
        // HTTP/1.0 closes unless told otherwise; HTTP/1.1 keeps the connection unless told.
        let mut close = resp.version == Some(0);
        let mut content_length: Option<usize> = None;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .ok_or_else(|| {
                        format!("bad Content-Length {:?}", String::from_utf8_lossy(h.value))
                    })?;
                if content_length.is_some_and(|m| m != n) {
                    return Err("conflicting Content-Length headers".into());
                }
                content_length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let te = String::from_utf8_lossy(h.value);
                return Err(if te.to_ascii_lowercase().contains("chunked") {
                    format!(
                        "chunked transfer encoding is not supported (Transfer-Encoding: {te}); \
                         this client needs a Content-Length"
                    )
                } else {
                    format!("Transfer-Encoding {te:?} is not supported")
                });
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
        }
        let content_length = content_length
            .ok_or_else(|| format!("answer {status} without a Content-Length header"))?;
        if content_length > MAX_BODY_BYTES {
            return Err(format!(
                "answer body of {content_length} bytes refused: more than 1 MiB"
            ));
        }
        Ok(Head {
            status,
            content_length,
            close,
        })
    }
}

fn head_too_large() -> String {
    format!(
        "answer head refused: larger than {} KiB",
        MAX_HEAD_BYTES / 1024
    )
}

async fn open(endpoint: &Endpoint) -> Result<TcpStream, String> {
    let addr = endpoint.addr;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            format!(
                "connecting to {addr}: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("setting TCP_NODELAY towards {addr}: {e}"))?;
    Ok(stream)
}

/// Reads once into `buf`'s spare room, making room for at least `want` bytes (at least
/// [`READ_CHUNK`]); gives the number of bytes read, 0 at end of stream.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    want: usize,
) -> Result<usize, String> {
    buf.reserve(want.max(READ_CHUNK));
    stream
        .read_buf(buf)
        .await
        .map_err(|e| format!("reading the answer: {e}"))
}

/// Appends `path`, percent-encoding bytes that cannot appear in a request line as they
/// are (spaces, controls, non-ASCII), as a URL parser would.
fn push_path(out: &mut Vec<u8>, path: &str) {
    if path.bytes().all(|b| b.is_ascii_graphic()) {
        out.extend_from_slice(path.as_bytes());
        return;
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in path.bytes() {
        if b.is_ascii_graphic() {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::net::TcpListener;

    use super::*;

    const ACK: &str = r#"{"key":"k","version":"0000000000000001-0000-bench-1"}"#;

    /// Every step of a test must finish quickly: a hang is a failure, not a stuck test.
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("the test step did not finish within 5 s")
    }

    async fn listen() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback listener");
        let addr = l.local_addr().expect("the listener's address");
        (l, addr)
    }

    async fn accept(l: &TcpListener) -> TcpStream {
        let (s, _) = l.accept().await.expect("accepting the client");
        s.set_nodelay(true).expect("TCP_NODELAY on the test server");
        s
    }

    /// A request as the test server saw it.
    #[derive(Debug)]
    struct Req {
        head: String,
        path: String,
        body: Vec<u8>,
    }

    /// Reads one request (head and Content-Length body) from the client.
    async fn read_request(s: &mut TcpStream) -> Req {
        let mut buf = Vec::new();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = req
                .parse(&buf)
                .expect("the client sends a well-formed request")
            {
                let len: usize = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .expect("ASCII Content-Length")
                            .parse()
                            .expect("numeric Content-Length")
                    })
                    .expect("the client sends a Content-Length");
                let path = req.path.expect("a request path").to_string();
                let head = String::from_utf8(buf[..n].to_vec()).expect("ASCII head");
                while buf.len() < n + len {
                    let got = s.read_buf(&mut buf).await.expect("reading the body");
                    assert_ne!(got, 0, "the client closed in the middle of its request");
                }
                assert_eq!(buf.len(), n + len, "the client sent one request at a time");
                return Req {
                    head,
                    path,
                    body: buf[n..].to_vec(),
                };
            }
            let got = s.read_buf(&mut buf).await.expect("reading the request");
            assert_ne!(got, 0, "the client closed before sending a whole request");
        }
    }

    /// Waits until the client closes its end: end of stream, or a reset when the client
    /// closed with answer bytes still unread.
    async fn expect_client_close(s: &mut TcpStream) {
        let mut b = [0u8; 64];
        match s.read(&mut b).await {
            Ok(0) => {}
            Ok(n) => panic!("expected the client to close the connection, got {n} bytes"),
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "expected the client to close the connection: {e}"
            ),
        }
    }

    fn answer(status: &str, extra_headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn answers_on_one_keep_alive_connection() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            // One connection only: a reconnect would never be answered and time out.
            let mut s = accept(&l).await;
            let r1 = read_request(&mut s).await;
            s.write_all(answer("200 OK", "", ACK).as_bytes())
                .await
                .expect("answering");
            let r2 = read_request(&mut s).await;
            s.write_all(answer("404 Not Found", "", r#"{"error":"nope"}"#).as_bytes())
                .await
                .expect("answering");
            let r3 = read_request(&mut s).await;
            s.write_all(answer("200 OK", "", r#"{"key":"k"}"#).as_bytes())
                .await
                .expect("answering");
            let r4 = read_request(&mut s).await;
            s.write_all(answer("500 Internal Server Error", "", "{}").as_bytes())
                .await
                .expect("answering");
            (r1, r2, r3, r4)
        });

        let mut c = RawHttpConn::new(Endpoint::from(addr));
        within(c.put_checked("/v1/kv/a/1", br#"{"a":1}"#))
            .await
            .expect("a 200 with a version is a good write");
        let a = within(c.put("/v1/kv/a b", b"{}")).await.expect("an answer");
        assert_eq!(a.status, 404);
        assert_eq!(a.body, br#"{"error":"nope"}"#);
        let e = within(c.put_checked("/v1/kv/a/3", b"{}"))
            .await
            .expect_err("a 200 without a version is not a write answer");
        assert!(e.contains("\"version\""), "{e}");
        let e = within(c.put_checked("/v1/kv/a/4", b"{}"))
            .await
            .expect_err("a 500 is an error");
        assert!(e.contains("answered 500"), "{e}");

        let (r1, r2, r3, r4) = within(server).await.expect("the server task");
        assert_eq!(
            r1.head,
            format!(
                "PUT /v1/kv/a/1 HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: 7\r\n\r\n"
            )
        );
        assert_eq!(r1.body, br#"{"a":1}"#);
        assert_eq!(r2.path, "/v1/kv/a%20b");
        assert_eq!(r3.path, "/v1/kv/a/3");
        assert_eq!(r4.path, "/v1/kv/a/4");
    }

    #[tokio::test]
    async fn two_answers_in_one_read_are_split_across_calls() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut s = accept(&l).await;
            let r1 = read_request(&mut s).await;
            // Both answers in one write, before the second request was even sent.
            let both = format!(
                "{}{}",
                answer("200 OK", "", r#"{"first":1,"version":"a"}"#),
                answer("201 Created", "", r#"{"second":2,"version":"b"}"#)
            );
            s.write_all(both.as_bytes()).await.expect("answering");
            let r2 = read_request(&mut s).await;
            expect_client_close(&mut s).await;
            (r1.path, r2.path)
        });

        let mut c = RawHttpConn::new(Endpoint::from(addr));
        let a = within(c.put("/1", b"x")).await.expect("the first answer");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, br#"{"first":1,"version":"a"}"#);
        let b = within(c.put("/2", b"y")).await.expect("the second answer");
        assert_eq!(b.status, 201);
        assert_eq!(b.body, br#"{"second":2,"version":"b"}"#);
        drop(c);
        let (p1, p2) = within(server).await.expect("the server task");
        assert_eq!((p1.as_str(), p2.as_str()), ("/1", "/2"));
    }

    #[tokio::test]
    async fn answer_split_across_several_writes() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut s = accept(&l).await;
            read_request(&mut s).await;
            let whole = answer("200 OK", "x-extra: 1\r\n", ACK);
            // Cuts inside the status line, a header name, the blank line and the body.
            for piece in [
                &whole[..10],
                &whole[10..30],
                &whole[30..whole.len() - ACK.len() - 1],
                &whole[whole.len() - ACK.len() - 1..whole.len() - 20],
                &whole[whole.len() - 20..],
            ] {
                s.write_all(piece.as_bytes()).await.expect("answering");
                s.flush().await.expect("flushing");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The connection is still good for the next request.
            read_request(&mut s).await;
            s.write_all(answer("200 OK", "", ACK).as_bytes())
                .await
                .expect("answering");
        });

        let mut c = RawHttpConn::new(Endpoint::from(addr));
        let a = within(c.put("/v1/kv/split", b"{}"))
            .await
            .expect("the answer");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, ACK.as_bytes());
        within(c.put_checked("/v1/kv/after", b"{}"))
            .await
            .expect("the next answer on the same connection");
        within(server).await.expect("the server task");
    }

    #[tokio::test]
    async fn connection_close_then_reconnect() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut s1 = accept(&l).await;
            read_request(&mut s1).await;
            s1.write_all(answer("200 OK", "Connection: close\r\n", ACK).as_bytes())
                .await
                .expect("answering");
            // The server keeps its end open: the client must close on its own.
            expect_client_close(&mut s1).await;
            let mut s2 = accept(&l).await;
            let r = read_request(&mut s2).await;
            s2.write_all(answer("200 OK", "", ACK).as_bytes())
                .await
                .expect("answering");
            r.path
        });

        let mut c = RawHttpConn::new(Endpoint::from(addr));
        within(c.put_checked("/one", b"{}"))
            .await
            .expect("the answer that closes");
        within(c.put_checked("/two", b"{}"))
            .await
            .expect("the answer on a new connection");
        assert_eq!(within(server).await.expect("the server task"), "/two");
    }

    /// The server answers one request with `answer` and then waits for the client to close;
    /// the client's request must fail with an error containing `why`.
    async fn refused_answer(answer: String, why: &str) {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut s = accept(&l).await;
            read_request(&mut s).await;
            s.write_all(answer.as_bytes()).await.expect("answering");
            expect_client_close(&mut s).await;
        });
        let mut c = RawHttpConn::new(Endpoint::from(addr));
        let e = within(c.put("/big", b"{}"))
            .await
            .expect_err("the answer is refused");
        assert!(e.contains(why), "{e}");
        within(server).await.expect("the server task");
    }

    #[tokio::test]
    async fn oversized_head_is_refused() {
        // No end of the head, and the connection stays open: only the size can stop it.
        let mut head = String::from("HTTP/1.1 200 OK\r\nx-filler: ");
        head.push_str(&"a".repeat(MAX_HEAD_BYTES + 4096));
        refused_answer(head, "larger than 16 KiB").await;
    }

    #[tokio::test]
    async fn oversized_body_is_refused() {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        refused_answer(head, "more than 1 MiB").await;
    }

    #[tokio::test]
    async fn chunked_and_length_less_answers_are_refused() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut s1 = accept(&l).await;
            read_request(&mut s1).await;
            s1.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            )
            .await
            .expect("answering");
            expect_client_close(&mut s1).await;
            let mut s2 = accept(&l).await;
            read_request(&mut s2).await;
            s2.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{}")
                .await
                .expect("answering");
            expect_client_close(&mut s2).await;
        });

        let mut c = RawHttpConn::new(Endpoint::from(addr));
        let e = within(c.put("/chunked", b"{}"))
            .await
            .expect_err("chunked is refused");
        assert!(
            e.contains("chunked transfer encoding is not supported"),
            "{e}"
        );
        let e = within(c.put("/no-length", b"{}"))
            .await
            .expect_err("no Content-Length is refused");
        assert!(e.contains("without a Content-Length"), "{e}");
        within(server).await.expect("the server task");
    }

    #[tokio::test]
    async fn eof_mid_body_is_an_error_and_the_next_request_reconnects() {
        let (l, addr) = listen().await;
        let server = tokio::spawn(async move {
            let mut s1 = accept(&l).await;
            read_request(&mut s1).await;
            s1.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"version\"")
                .await
                .expect("answering");
            drop(s1);
            let mut s2 = accept(&l).await;
            let r = read_request(&mut s2).await;
            s2.write_all(answer("200 OK", "", ACK).as_bytes())
                .await
                .expect("answering");
            r.path
        });

        let mut c = RawHttpConn::new(Endpoint::from(addr));
        let e = within(c.put_checked("/cut", b"{}"))
            .await
            .expect_err("a body cut short is an error");
        assert!(
            e.contains("middle of the answer's body (10 of 100 bytes)"),
            "{e}"
        );
        within(c.put_checked("/again", b"{}"))
            .await
            .expect("the next request opens a new connection");
        assert_eq!(within(server).await.expect("the server task"), "/again");
    }

    #[tokio::test]
    async fn refused_connection_is_an_error_each_request() {
        let (l, addr) = listen().await;
        drop(l);
        let mut c = RawHttpConn::new(Endpoint::from(addr));
        for _ in 0..2 {
            let e = within(c.put("/x", b"{}"))
                .await
                .expect_err("nothing listens there");
            assert!(e.contains(&format!("connecting to {addr}")), "{e}");
        }
    }

    #[tokio::test]
    async fn endpoint_from_base_url() {
        let e = Endpoint::resolve("http://127.0.0.1:8123/")
            .await
            .expect("a valid base URL");
        assert_eq!(e.addr, "127.0.0.1:8123".parse().expect("an address"));
        assert_eq!(&*e.host, "127.0.0.1:8123");
        let e = Endpoint::resolve("http://[::1]:9")
            .await
            .expect("a valid IPv6 base URL");
        assert_eq!(e.addr, "[::1]:9".parse().expect("an address"));
        let e = Endpoint::resolve("http://127.0.0.1")
            .await
            .expect("port 80 by default");
        assert_eq!(e.addr.port(), 80);
        for bad in [
            "https://127.0.0.1:1",
            "127.0.0.1:1",
            "http://127.0.0.1:1/v1",
            "http://",
        ] {
            assert!(
                Endpoint::resolve(bad).await.is_err(),
                "{bad} must be refused"
            );
        }
    }
}
