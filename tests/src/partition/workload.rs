//! One workload per region: a seeded mix of PUTs to unique keys, counter increments, PATCHes
//! of shared hot keys and PUTs of records pinned to eu-west, each recorded as an [`Op`].
//!
//! Every write carries an Idempotency-Key, so an `unknown` answer (timeout, 5xx) can be
//! retried safely: a replay returns the first answer if the write had applied.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::history::{Kind, Op, Outcome, Shared};
use super::rng::Rng;
use super::{COUNTERS, HOT_KEYS, PINNED_PREFIX};

/// Retries of a write whose answer was `unknown`, one second apart.
const UNKNOWN_RETRIES: u32 = 3;

/// One answer to a write request.
struct Answer {
    outcome: Outcome,
    status: Option<u16>,
    version: Option<String>,
    served_by_region: Option<String>,
    error: Option<String>,
}

/// The write a workload sends next.
struct Request {
    kind: Kind,
    key: String,
    method: Method,
    /// Below `/v1/kv/`.
    path: String,
    body: Value,
}

/// A workload as it runs: which process (region) it is, and where it writes.
pub(super) struct Workload {
    pub(super) process: usize,
    pub(super) base: String,
    pub(super) region: String,
    pub(super) seed: u64,
}

impl Workload {
    /// Writes until the run stops, recording every operation in `shared`.
    pub(super) async fn run(self, shared: Arc<Shared>, client: reqwest::Client) {
        let mut rng = Rng::new(self.seed);
        let mut n: i64 = 0;
        while !shared.stopped() {
            n += 1;
            let request = self.next_request(n, &mut rng);
            let op = self.perform(&shared, &client, n, request).await;
            shared.record(op);
            // ~40 operations per second per region when the node answers quickly.
            tokio::time::sleep(rng.range_ms(10, 40)).await;
        }
    }

    /// 40 % unique PUTs, 25 % increments, 20 % hot-key PATCHes, 15 % pinned PUTs.
    fn next_request(&self, n: i64, rng: &mut Rng) -> Request {
        let (process, region) = (self.process, &self.region);
        let roll = rng.below(100);
        if roll < 40 {
            let key = format!("u/{process}/{n}");
            let body = json!({"v": n, "by": region});
            Request::at_key(Kind::Put, key, Method::PUT, body)
        } else if roll < 65 {
            let key = format!("c/{}", rng.below(COUNTERS));
            let body = json!({"field": "n", "by": 1});
            Request {
                kind: Kind::Incr,
                path: format!("{key}/incr"),
                key,
                method: Method::POST,
                body,
            }
        } else if roll < 85 {
            let key = format!("h/{}", rng.below(HOT_KEYS));
            let body = json!({format!("f{process}"): n, "shared": format!("{region}-{n}")});
            Request::at_key(Kind::Patch, key, Method::PATCH, body)
        } else {
            let key = format!("{PINNED_PREFIX}{process}/{n}");
            let body = json!({"v": n, "by": region});
            Request::at_key(Kind::PinnedPut, key, Method::PUT, body)
        }
    }

    /// Sends `request`, retrying an `unknown` answer, and records what happened as an [`Op`].
    async fn perform(
        &self,
        shared: &Shared,
        client: &reqwest::Client,
        n: i64,
        request: Request,
    ) -> Op {
        let process = self.process;
        let value = if request.kind == Kind::Incr { 1 } else { n };
        let nemesis = shared.nemesis_name();
        let impaired_before = shared.impaired(process);
        let invoke_ms = shared.now_ms();
        let idempotency_key = format!("ps-{}-{process}-{n}", self.seed);
        let url = format!("{}/v1/kv/{}", self.base, request.path);
        let (answer, attempts) =
            attempt_with_retries(client, &request, &url, &idempotency_key).await;
        let complete_ms = shared.now_ms();
        let impaired = impaired_before || shared.impaired(process);
        Op {
            process,
            kind: request.kind,
            key: request.key,
            value,
            invoke_ms,
            complete_ms,
            outcome: answer.outcome,
            status: answer.status,
            version: answer.version,
            served_by_region: answer.served_by_region,
            nemesis,
            node_impaired: impaired,
            error: answer.error,
            attempts,
        }
    }
}

impl Request {
    /// A request whose path is its key.
    fn at_key(kind: Kind, key: String, method: Method, body: Value) -> Request {
        Request {
            kind,
            path: key.clone(),
            key,
            method,
            body,
        }
    }
}

/// The first answer, or the first success among up to [`UNKNOWN_RETRIES`] retries of an
/// `unknown` one; and how many requests that took.
async fn attempt_with_retries(
    client: &reqwest::Client,
    request: &Request,
    url: &str,
    idempotency_key: &str,
) -> (Answer, u32) {
    let mut attempts = 1;
    let mut answer = attempt(client, request, url, idempotency_key).await;
    while answer.outcome == Outcome::Unknown && attempts <= UNKNOWN_RETRIES {
        tokio::time::sleep(Duration::from_secs(1)).await;
        attempts += 1;
        let again = attempt(client, request, url, idempotency_key).await;
        // Only a success settles it: a refusal now says nothing about the first attempt.
        if again.outcome == Outcome::Ok {
            answer = again;
        } else {
            answer.error = again.error.or(answer.error);
        }
    }
    (answer, attempts)
}

/// One request: its outcome, status, version, serving region and error text.
async fn attempt(
    client: &reqwest::Client,
    request: &Request,
    url: &str,
    idempotency_key: &str,
) -> Answer {
    let answer = client
        .request(request.method.clone(), url)
        .header("Idempotency-Key", idempotency_key)
        .json(&request.body)
        .send()
        .await;
    match answer {
        Ok(r) => answer_of_response(r).await,
        Err(e) => {
            let outcome = if e.is_connect() {
                Outcome::Fail
            } else {
                Outcome::Unknown
            };
            let text = format!("{e} (timeout: {})", e.is_timeout());
            Answer {
                outcome,
                status: None,
                version: None,
                served_by_region: None,
                error: Some(text),
            }
        }
    }
}

async fn answer_of_response(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let served_by_region = r
        .headers()
        .get("meridian-served-by-region")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Option<Value> = r.json().await.ok();
    if (200..300).contains(&status) {
        let version = body
            .as_ref()
            .and_then(|b| b.get("version"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Answer {
            outcome: Outcome::Ok,
            status: Some(status),
            version,
            served_by_region,
            error: None,
        }
    } else {
        // 4xx: refused, nothing applied. 5xx: may or may not have applied
        // (e.g. a forward that timed out after delivery).
        let outcome = if status < 500 {
            Outcome::Fail
        } else {
            Outcome::Unknown
        };
        Answer {
            outcome,
            status: Some(status),
            version: None,
            served_by_region,
            error: body.map(|b| b.to_string()),
        }
    }
}
