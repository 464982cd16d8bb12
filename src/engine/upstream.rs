//! The upstream engine: the [`Engine`] seam served by a RabbitMQ broker through lapin
//! (DESIGN.md §1, §2), so AMQP applications on that broker meet the gateway's web and MQTT
//! clients on the same exchanges and queues.
//!
//! Two AMQP connections, because a `connection.blocked` alarm stops RabbitMQ reading a whole
//! socket, acks included: one publishes (a confirm-mode channel per engine channel, see
//! [`publisher`]); the other consumes (a channel per consumer, see [`consumer`]) and carries
//! the short-lived channels of [`pool`] for everything a refusal may close. What AMQP cannot
//! say (listings, a queue's flags) comes from the management HTTP API ([`management`]) when it
//! is configured. Exclusive queues are this engine's bookkeeping ([`owners`]): upstream they
//! are shared, auto-expiring queues with one exclusive consumer, so they outlive neither their
//! client nor a crashed gateway for long.

mod channel;
mod consumer;
mod control;
mod convert;
mod link;
mod management;
mod owners;
mod pool;
mod publisher;
mod retained;
mod returns;
mod tags;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lapin::uri::AMQPUri;
use tokio::sync::watch;

use crate::engine::{
    Capabilities, Channel, Engine, EngineError, EngineKind, Health, Owner, sessions,
};

/// How the upstream engine reaches its broker.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// `amqp://user:pass@host:port/vhost`; the vhost is the one this gateway serves.
    pub url: String,
    /// RabbitMQ's HTTP API (`http://user:pass@host:15672`), for listings and queue flags.
    pub management_url: Option<String>,
    /// AMQP heartbeat asked of the broker (unless the URL names one).
    pub heartbeat: Duration,
    /// Names the connections in RabbitMQ's management UI: `amqp-gateway <instance> …`.
    pub instance: String,
    /// Bodies above this are refused with `ContentTooLarge` before they reach the broker.
    pub max_message_bytes: usize,
    /// `x-max-length-bytes` of the retained stream (`mqtt.retained_stream_bytes`).
    pub retained_bytes: u64,
    /// PEM certificates trusted for `amqps://` besides the system's (`engine.upstream.tls_ca`).
    pub tls_ca: Option<String>,
}

impl UpstreamOptions {
    pub fn new(url: impl Into<String>) -> Self {
        UpstreamOptions {
            url: url.into(),
            management_url: None,
            heartbeat: Duration::from_secs(30),
            instance: default_instance(),
            max_message_bytes: 1024 * 1024,
            retained_bytes: 1 << 30,
            tls_ca: None,
        }
    }
}

/// `host:pid`: unique among the gateways sharing a broker, readable in its UI.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "gateway".into());
    format!("{host}:{}", std::process::id())
}

/// What every channel of the engine shares.
pub(super) struct Shared {
    link: Arc<link::Link>,
    pool: pool::Pool,
    owners: owners::Owners,
    management: Option<management::Management>,
    max_message_bytes: usize,
    shut: AtomicBool,
    /// Channels still open, closed by shutdown.
    channels: parking_lot::Mutex<Vec<std::sync::Weak<channel::UpstreamChannel>>>,
}

pub struct UpstreamEngine {
    shared: Arc<Shared>,
    sessions: Arc<control::ControlSessions>,
    retained: Arc<dyn crate::engine::retained::RetainedStore>,
    blocked: watch::Receiver<bool>,
}

impl UpstreamEngine {
    /// Connects to the broker; fails with `Unavailable` saying why when it cannot.
    pub async fn connect(options: UpstreamOptions) -> Result<Self, EngineError> {
        let mut uri: AMQPUri = options.url.parse().map_err(|e: String| {
            EngineError::InvalidArgument(format!("engine.upstream.url: {e}"))
        })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat =
                Some(options.heartbeat.as_secs().clamp(1, u16::MAX.into()) as u16);
        }
        let vhost = uri.vhost.clone();
        let management = options
            .management_url
            .as_deref()
            .map(|url| management::Management::new(url, &vhost, &uri))
            .transpose()?;
        let link = link::Link::connect(link::Target {
            uri,
            instance: options.instance.clone(),
            tls_ca: options.tls_ca.clone(),
        })
        .await?;
        let blocked = link.blocked();
        let shared = Arc::new(Shared {
            pool: pool::Pool::new(link.clone()),
            link: link.clone(),
            owners: owners::Owners::default(),
            management,
            max_message_bytes: options.max_message_bytes,
            shut: AtomicBool::new(false),
            channels: parking_lot::Mutex::default(),
        });
        // Unique even for two engines in one process (tests): announcements skip their origin.
        let origin = crate::engine::names::generate(&format!("{}/", options.instance));
        let retained = retained::StreamRetained::start(
            &shared,
            &origin,
            options.retained_bytes,
            Duration::from_secs(10),
        )
        .await?;
        let sessions = control::ControlSessions::start(&shared, &origin).await?;
        let owned = Arc::downgrade(&shared);
        link.set_restore(Box::new(move |conns| {
            let owned = owned.clone();
            Box::pin(async move {
                match owned.upgrade() {
                    Some(shared) => shared.owners.restore(&conns).await,
                    None => Ok(()),
                }
            })
        }));
        tracing::info!(vhost = %vhost, instance = %options.instance, "connected to the upstream broker");
        Ok(UpstreamEngine {
            retained,
            shared,
            sessions,
            blocked,
        })
    }
}

#[async_trait]
impl Engine for UpstreamEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Upstream
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_mqtt_qos: 1,
            listing: self.shared.management.is_some(),
            expiry_countdown: false,
            queue_expiry_update: false,
            amqp_listener: false,
        }
    }

    fn sessions(&self) -> Arc<dyn sessions::SessionRegistry> {
        self.sessions.clone()
    }

    fn retained(&self) -> Arc<dyn crate::engine::retained::RetainedStore> {
        self.retained.clone()
    }

    async fn open_channel(
        &self,
        owner: &Owner,
        label: &str,
    ) -> Result<Arc<dyn Channel>, EngineError> {
        if self.shared.shut.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("engine is shutting down".into()));
        }
        if let Health::NotReady(why) = self.health() {
            return Err(EngineError::Unavailable(why));
        }
        let channel = channel::UpstreamChannel::open(self.shared.clone(), owner.clone());
        tracing::trace!(channel = channel.id(), client = label, "channel opened");
        let mut channels = self.shared.channels.lock();
        channels.retain(|c| c.strong_count() > 0);
        channels.push(Arc::downgrade(&channel));
        Ok(channel)
    }

    fn health(&self) -> Health {
        if self.shared.shut.load(Ordering::Acquire) {
            Health::NotReady("shutting down".into())
        } else if let Some(why) = self.shared.link.not_ready() {
            Health::NotReady(why)
        } else {
            Health::Ready
        }
    }

    fn record_metrics(&self) {
        use crate::metrics::PUBLISH_BLOCKED;
        metrics::gauge!(PUBLISH_BLOCKED).set(if self.publish_blocked() { 1.0 } else { 0.0 });
        metrics::gauge!(crate::metrics::UPSTREAM_CHANNELS)
            .set(self.shared.link.channels_in_use() as f64);
    }

    fn publish_blocked(&self) -> bool {
        *self.blocked.borrow()
    }

    fn upstream_alarm(&self) -> bool {
        self.publish_blocked()
    }

    fn watch_publish_blocked(&self) -> watch::Receiver<bool> {
        self.blocked.clone()
    }

    async fn shutdown(&self) {
        if self.shared.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let open: Vec<_> = self
            .shared
            .channels
            .lock()
            .drain(..)
            .filter_map(|c| c.upgrade())
            .collect();
        for channel in open {
            channel.close().await;
        }
        self.shared.pool.clear();
        self.shared.link.shutdown().await;
    }
}
