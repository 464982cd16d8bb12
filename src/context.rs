//! What every protocol adapter is given: the engine seam, authentication, flow control, the
//! configuration and shutdown — and the publish gate every adapter's publishes go through
//! ([`Context::clear_publish`]). Adapters depend on this and on nothing of each other.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::engine::{Channel, Engine, EngineError};
use crate::flow::{ConnectionLimits, Flow};
use crate::shutdown::Shutdown;

mod publish;

pub use self::publish::{Cleared, PublishRefused, Publishing, stamp_subject};

#[derive(Clone)]
pub struct Context {
    pub engine: Arc<dyn Engine>,
    pub auth: Arc<Authenticator>,
    pub flow: Arc<Flow>,
    pub config: Arc<Config>,
    pub shutdown: Shutdown,
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
