//! The session registry behind the engine (DESIGN.md §1, §3): who holds an exclusive
//! consumer that another connection of the same owner may take over (MQTT sessions, durable
//! WebSocket subscriptions), and delayed MQTT wills cancelled when their session returns
//! first. State every instance must share, so it lives behind the engine, never in an adapter:
//! the embedded engine keeps it in-process; an upstream engine announces on the fanout
//! exchange `amqp-gateway.control` so a holder on another instance lets go too.

pub mod local;
mod signal;

pub use self::signal::{Closed, TakeoverReceiver, TakeoverSender, takeover_channel};

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::EngineError;

/// The takeover fence (DESIGN.md §3, §4), for every adapter: `attempt` is retried while another
/// connection still holds what it needs — an exclusive consumer (`InUse`) or an exclusive
/// queue (`ResourceLocked`) — 10 ms apart, for at most `timeout`. `on_held` runs at each such
/// refusal before the wait (an adapter may ask the holder to let go there). Enforced by the
/// engine, so it holds across gateway instances, where a registry's `is_held` knows only its
/// own.
pub async fn fenced<T, A, AF, H, HF>(
    timeout: Duration,
    mut attempt: A,
    mut on_held: H,
) -> Result<T, EngineError>
where
    A: FnMut() -> AF,
    AF: Future<Output = Result<T, EngineError>>,
    H: FnMut() -> HF,
    HF: Future<Output = ()>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match attempt().await {
            Err(EngineError::InUse(_) | EngineError::ResourceLocked(_))
                if tokio::time::Instant::now() < deadline =>
            {
                on_held().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// A holder is told to let go of what it holds under `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub key: String,
}

#[async_trait]
pub trait SessionRegistry: Send + Sync {
    /// Registers `holder` (a connection id) under `key`; `signal` receives a [`Takeover`] when
    /// another connection asks for it.
    /// The key is shared: a session keeps its own for as long as it holds it.
    fn hold(&self, key: std::sync::Arc<str>, holder: u64, signal: TakeoverSender);

    /// Forgets `holder`'s hold on `key` (and nobody else's).
    fn release(&self, key: &str, holder: u64);

    /// Whether anybody holds `key`.
    fn is_held(&self, key: &str) -> bool;

    /// Asks the current holder of `key` to let go; false when nobody holds it.
    async fn take_over(&self, key: &str) -> bool;

    /// Waits until nobody holds `key` (the holder released it, after storing what it had to),
    /// at most `timeout`; false when it is still held then. Woken by the release, not polled.
    async fn wait_released(&self, key: &str, timeout: std::time::Duration) -> bool;

    /// Registers a delayed will for `session`; the token is cancelled if the session connects
    /// again first (on any instance).
    fn delay_will(&self, session: &str) -> CancellationToken;

    /// A CONNECT for `session` arrived: its pending will is not published.
    async fn cancel_will(&self, session: &str);

    /// The delayed will of `session` fired; forget it.
    fn will_done(&self, session: &str);
}
