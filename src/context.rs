//! What every protocol adapter is given: the engine seam, authentication, flow control, the
//! configuration and shutdown — and the publish gate every adapter's publishes go through
//! ([`Context::clear_publish`]). Adapters depend on this and on nothing of each other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::auth::Authenticator;
use crate::config::Config;
use crate::engine::{Channel, Engine, EngineError};
use crate::flow::{ConnectionLimits, Flow};
use crate::shutdown::Shutdown;
use tokio_util::task::TaskTracker;

mod publish;
pub mod registry;

pub use self::publish::{Cleared, PublishRefused, Publishing, Run, Stamped, stamp_subject};
pub use self::registry::{
    About, Protocol, Registered, Registry, Stop, Stopped, SubscriptionView, Transport, stop_signal,
};

/// One pointer to what everything shares: each connection keeps a clone (its task, its
/// session), and eight pointers there were 72 bytes more of every idle connection
/// (docs/bench.md, idle connections).
#[derive(Clone)]
pub struct Context(Arc<Shared>);

impl Context {
    pub fn new(shared: Shared) -> Context {
        Context(Arc::new(shared))
    }
}

impl std::ops::Deref for Context {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What the gateway's parts share, reached through a [`Context`].
pub struct Shared {
    pub engine: Arc<dyn Engine>,
    pub auth: Arc<Authenticator>,
    pub flow: Arc<Flow>,
    pub config: Arc<Config>,
    pub shutdown: Shutdown,
    /// Every client connection's task: the gateway waits for them (within `shutdown_timeout`)
    /// before it stops the engine, so no connection finds its engine gone mid-close.
    pub connections: TaskTracker,
    /// Who is connected, for operators; how an administrator closes one.
    pub registry: Arc<Registry>,
    /// When the gateway started (the overview's uptime).
    pub started: std::time::Instant,
}

/// One client connection (HTTP — WebSocket ones included — or MQTT over TCP): its id, its
/// publish buckets and its engine channel, opened on first use and closed when the last
/// reference goes.
pub struct Connection {
    pub id: u64,
    pub remote: SocketAddr,
    pub limits: ConnectionLimits,
    /// What operators see counted for it (`/v1/connections`).
    pub stats: Arc<ConnStats>,
    /// A `OnceLock`, not tokio's `OnceCell`, whose semaphore was 40 more bytes of every
    /// connection; see [`Connection::channel`] for the race that costs.
    channel: std::sync::OnceLock<Arc<dyn Channel>>,
}

/// A connection's counts as operators see them: updated by the publish gate and by each
/// adapter's loop, read by the registry.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Publishes the gate let through.
    pub published: AtomicU64,
    /// Deliveries awaiting the client's acknowledgement (set by the adapter).
    pub in_flight: AtomicU64,
}

impl ConnStats {
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
    }
}

/// The next connection id: one sequence for every listener, and for the streams an HTTP
/// connection may carry (SSE), so operators never see two connections with one id.
pub fn next_id() -> u64 {
    // The engines' owner sequence: a connection is the owner of its exclusive queues by its
    // id ([`Connection::owner`]), and no other owner has that id.
    crate::engine::Owner::new().id()
}

impl Connection {
    /// A connection just accepted, with the next id (one sequence for every listener).
    pub fn accepted(remote: SocketAddr, limits: ConnectionLimits) -> Self {
        Connection {
            id: next_id(),
            remote,
            limits,
            stats: Arc::default(),
            channel: std::sync::OnceLock::new(),
        }
    }

    /// What the engine knows this connection as: the owner of its exclusive queues.
    fn owner(&self) -> crate::engine::Owner {
        crate::engine::Owner::connection(self.id)
    }

    /// Another engine channel of this connection, with the same owner (an AMQP client's
    /// channels share its exclusive queues); `number` names it in logs.
    pub async fn open_channel(
        &self,
        engine: &Arc<dyn Engine>,
        number: u16,
    ) -> Result<Arc<dyn Channel>, EngineError> {
        engine
            .open_channel(
                &self.owner(),
                &format!("conn-{}@{}/{number}", self.id, self.remote),
            )
            .await
    }

    /// The connection's own engine channel, once [`Connection::channel`] opened it.
    pub fn opened_channel(&self) -> Option<&Arc<dyn Channel>> {
        self.channel.get()
    }

    /// The connection's own engine channel, opened at the first call. Two first calls at once
    /// (two streams of one HTTP/2 connection) may both open one: the first stored is the
    /// connection's, the other closes as it drops, unused.
    pub async fn channel(&self, engine: &Arc<dyn Engine>) -> Result<Arc<dyn Channel>, EngineError> {
        if let Some(channel) = self.channel.get() {
            return Ok(channel.clone());
        }
        let opened = engine
            .open_channel(&self.owner(), &format!("conn-{}@{}", self.id, self.remote))
            .await?;
        Ok(self.channel.get_or_init(|| opened).clone())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connection_stays_in_its_size_class() {
        // Every client connection has one: 80 bytes and the `Arc`'s counts fill mimalloc's
        // 96-byte class; 8 more take it to 112 (docs/bench.md).
        let size = std::mem::size_of::<super::Connection>();
        assert!(size <= 80, "{size}");
    }
}
