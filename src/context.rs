//! What every protocol adapter is given: the engine seam, authentication, flow control, the
//! configuration and shutdown. Adapters depend on this and on nothing of each other.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::engine::{Channel, Engine, EngineError};
use crate::flow::{ConnectionLimits, Flow, Throttled};
use crate::shutdown::Shutdown;

#[derive(Clone)]
pub struct Context {
    pub engine: Arc<dyn Engine>,
    pub auth: Arc<Authenticator>,
    pub flow: Arc<Flow>,
    pub config: Arc<Config>,
    pub shutdown: Shutdown,
}

impl Context {
    /// Whether a client publish of `bytes` body bytes may go to the engine now (DESIGN.md §7):
    /// not while the engine is above its memory watermark (no tokens are taken then), nor over
    /// the connection's or the subject's rate.
    pub fn admit_publish(
        &self,
        conn: &Connection,
        subject: &str,
        bytes: usize,
    ) -> Result<(), Throttled> {
        if self.engine.publish_blocked() {
            return Err(Throttled::memory());
        }
        self.flow.admit_publish(&conn.limits, subject, bytes)
    }
}

/// One client connection (an HTTP connection, later a WebSocket or MQTT one): its id, its
/// publish buckets and its engine channel, opened on first use and closed when the last
/// reference goes.
pub struct Connection {
    pub id: u64,
    pub remote: SocketAddr,
    pub limits: ConnectionLimits,
    /// What the engine knows this connection as: the owner of its exclusive queues.
    owner: crate::engine::Owner,
    channel: tokio::sync::OnceCell<Arc<dyn Channel>>,
}

impl Connection {
    pub fn new(id: u64, remote: SocketAddr, limits: ConnectionLimits) -> Self {
        Connection {
            id,
            remote,
            limits,
            owner: crate::engine::Owner::new(),
            channel: tokio::sync::OnceCell::new(),
        }
    }

    pub async fn channel(&self, engine: &Arc<dyn Engine>) -> Result<Arc<dyn Channel>, EngineError> {
        self.channel
            .get_or_try_init(|| async {
                engine
                    .open_channel(&self.owner, &format!("conn-{}@{}", self.id, self.remote))
                    .await
            })
            .await
            .cloned()
    }
}
