//! Waiting without fixed sleeps: every wait polls a condition until a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

/// Generous: CI machines are loaded.
pub const DEADLINE: Duration = Duration::from_secs(60);

const POLL_INTERVAL: Duration = Duration::from_millis(100);
const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Poll `check` every 100 ms until it holds or `deadline` passes; whether it held.
pub async fn poll_until<F, Fut>(deadline: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_every(POLL_INTERVAL, deadline, check).await
}

/// Poll `check` every `interval` until it holds or `deadline` passes; whether it held. The
/// check runs at least once, and once more after the deadline has passed.
pub async fn poll_every<F, Fut>(interval: Duration, deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Poll `url` every 50 ms until it answers 200, for up to `deadline`.
pub async fn wait_ready(client: &reqwest::Client, url: &str, deadline: Duration) -> bool {
    poll_every(READY_POLL_INTERVAL, deadline, || async {
        matches!(client.get(url).send().await, Ok(r) if r.status() == 200)
    })
    .await
}
