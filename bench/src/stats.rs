//! Histogram helpers. All histograms hold microseconds.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// 1 µs .. 10 min, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

/// What one closed-loop client measured.
pub struct ClientResult {
    pub hist: Histogram<u64>,
    pub errors: u64,
    /// The first few error messages (see [`KEEP_ERRORS`]).
    pub first_errors: Vec<String>,
    pub gave_up: bool,
    pub last_answer: Option<Instant>,
}

/// Error messages kept per client and per merged run.
pub const KEEP_ERRORS: usize = 3;

impl ClientResult {
    pub fn new() -> Self {
        ClientResult {
            hist: new_histogram(),
            errors: 0,
            first_errors: Vec::new(),
            gave_up: false,
            last_answer: None,
        }
    }

    /// Counts a failed request and keeps its message if there is room.
    pub fn error(&mut self, message: String) {
        self.errors += 1;
        if self.first_errors.len() < KEEP_ERRORS {
            self.first_errors.push(message);
        }
    }
}

/// The clients of one level, together; `measured_secs` runs from `measure_from` to the last
/// answer.
pub struct MergedClients {
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub gave_up: u64,
    pub first_errors: Vec<String>,
    pub measured_secs: f64,
}

/// Waits for every client task and merges what they measured; a task that failed counts as an
/// error and a client that gave up.
pub async fn merge_clients(
    tasks: Vec<tokio::task::JoinHandle<ClientResult>>,
    measure_from: Instant,
) -> MergedClients {
    let mut all = ClientResult::new();
    let mut gave_up = 0;
    let mut last_answer = measure_from;
    for t in tasks {
        match t.await {
            Ok(r) => {
                // Same bounds everywhere, so adding cannot fail.
                let _ = all.hist.add(&r.hist);
                all.errors += r.errors;
                gave_up += u64::from(r.gave_up);
                for e in r.first_errors {
                    if all.first_errors.len() < KEEP_ERRORS {
                        all.first_errors.push(e);
                    }
                }
                if let Some(t) = r.last_answer {
                    last_answer = last_answer.max(t);
                }
            }
            Err(e) => {
                gave_up += 1;
                all.error(format!("client task failed: {e}"));
            }
        }
    }
    MergedClients {
        hist: all.hist,
        errors: all.errors,
        gave_up,
        first_errors: all.first_errors,
        measured_secs: last_answer
            .saturating_duration_since(measure_from)
            .as_secs_f64(),
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LatencyMs {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencyMs {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencyMs {
                p50_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                max_ms: 0.0,
                mean_ms: 0.0,
            };
        }
        LatencyMs {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// A client gives up after this many failed requests.
pub const MAX_ERRORS_PER_CLIENT: u64 = 100;

/// One client's connection: writes the value under a unique key numbered `i`.
pub trait KvWriter: Send + 'static {
    fn write(
        &mut self,
        i: u64,
    ) -> impl std::future::Future<Output = std::result::Result<(), String>> + Send;
}

/// Sequential writes until `until`; only those sent at or after `measure_from` are recorded.
pub async fn closed_loop<W: KvWriter>(
    mut w: W,
    measure_from: Instant,
    until: Instant,
) -> ClientResult {
    let mut r = ClientResult::new();
    let mut i = 0u64;
    loop {
        let sent = Instant::now();
        if sent >= until {
            break;
        }
        let res = w.write(i).await;
        i += 1;
        let answered = Instant::now();
        match res {
            Ok(()) => {
                if sent >= measure_from {
                    r.hist.saturating_record(micros(answered - sent));
                    r.last_answer = Some(answered);
                }
            }
            Err(e) => {
                r.errors += 1;
                if r.first_errors.is_empty() {
                    r.first_errors.push(e);
                }
                if r.errors >= MAX_ERRORS_PER_CLIENT {
                    r.gave_up = true;
                    break;
                }
            }
        }
    }
    r
}
