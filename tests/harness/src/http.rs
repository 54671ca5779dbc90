//! The node's HTTP API as tests call it: every answer is `(status, JSON body)`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::poll::poll_until;

/// One node's API at `base` (`http://host:port`). Cloning shares the connection pool.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
}

/// A body as JSON: `Null` when empty, the text as a JSON string when it is not JSON.
fn body_value(text: String) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }
}

fn kv(key: &str) -> String {
    format!("/v1/kv/{key}")
}

impl ApiClient {
    /// With a client of its own.
    pub fn new(base: impl Into<String>) -> ApiClient {
        ApiClient::with_http(reqwest::Client::new(), base)
    }

    /// Through `http` (its timeouts and pool).
    pub fn with_http(http: reqwest::Client, base: impl Into<String>) -> ApiClient {
        ApiClient {
            http,
            base: base.into(),
        }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `<base><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method path` with an optional JSON body. Panics if no answer arrives (connection
    /// refused, reset): tests that expect that use [`ApiClient::http`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.answer(req, &method, path).await
    }

    /// `method path` with `body` sent as it is, labelled `application/json`.
    pub async fn raw(&self, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let req = self
            .http
            .request(method.clone(), self.url(path))
            .header("content-type", "application/json")
            .body(body);
        self.answer(req, &method, path).await
    }

    async fn answer(
        &self,
        req: reqwest::RequestBuilder,
        method: &Method,
        path: &str,
    ) -> (StatusCode, Value) {
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: body: {e}"));
        (status, body_value(text))
    }

    /// `PUT /v1/kv/<key>`.
    pub async fn put(&self, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, &kv(key), Some(body)).await
    }

    /// `PATCH /v1/kv/<key>` (a merge patch).
    pub async fn patch(&self, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, &kv(key), Some(body)).await
    }

    /// `POST /v1/kv/<key>/incr`.
    pub async fn incr(&self, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, &format!("{}/incr", kv(key)), Some(body))
            .await
    }

    /// `GET /v1/kv/<key>`.
    pub async fn get(&self, key: &str) -> (StatusCode, Value) {
        self.call(Method::GET, &kv(key), None).await
    }

    /// `DELETE /v1/kv/<key>`.
    pub async fn delete(&self, key: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, &kv(key), None).await
    }

    /// The record at `key`, or `None` on anything but a 200 with JSON, including no answer
    /// at all (for polling).
    pub async fn record(&self, key: &str) -> Option<Value> {
        let r = self.http.get(self.url(&kv(key))).send().await.ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    /// Polls until `key` holds a record, up to `deadline`; whether it did.
    pub async fn wait_for_record(&self, key: &str, deadline: Duration) -> bool {
        poll_until(deadline, || async { self.record(key).await.is_some() }).await
    }

    /// `GET path` parsed as JSON. Panics if there is no answer or it is not JSON.
    pub async fn json(&self, path: &str) -> Value {
        let url = self.url(path);
        let r = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        r.json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: body is not JSON: {e}"))
    }

    /// `GET path` parsed as JSON, or `None` if the request failed or the body is not JSON
    /// (for polling).
    pub async fn try_json(&self, path: &str) -> Option<Value> {
        self.try_get(path).await?.json().await.ok()
    }

    /// `GET path` as text, or `None` if the request failed (for polling).
    pub async fn text(&self, path: &str) -> Option<String> {
        self.try_get(path).await?.text().await.ok()
    }

    async fn try_get(&self, path: &str) -> Option<reqwest::Response> {
        self.http.get(self.url(path)).send().await.ok()
    }
}
