//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use amqp_gateway::engine::{Consumer, Delivery};

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(5);

/// A name no other test (or test run sharing an upstream vhost) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("test-{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// The next delivery, failing the test after [`WAIT`].
pub async fn next(consumer: &mut Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.recv()).await {
        Ok(Some(d)) => d,
        Ok(None) => panic!(
            "consumer {} ended ({:?}) while a delivery was expected",
            consumer.tag(),
            consumer.cancel_reason()
        ),
        Err(_) => panic!("no delivery within {WAIT:?} on {}", consumer.queue()),
    }
}

/// Asserts that nothing arrives within `quiet` (absence can only be observed over a window).
pub async fn nothing_within(consumer: &mut Consumer, quiet: Duration) {
    if let Ok(got) = tokio::time::timeout(quiet, consumer.recv()).await {
        panic!(
            "expected no delivery, got {:?}",
            got.map(|d| String::from_utf8_lossy(d.body()).into_owned())
        );
    }
}

/// Polls `check` until it holds, failing after [`WAIT`]; for conditions with no event to await.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.body()).into_owned()
}
