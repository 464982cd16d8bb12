//! The client connections this instance serves, as operators see them (`/v1/connections`,
//! DESIGN.md §5): protocol, transport, peer, subject, client id, since when, token expiry,
//! subscriptions and outbound buffer fill — and the way an administrator closes one. Each
//! adapter registers a connection once it is authenticated and keeps its subscriptions up to
//! date; the entry goes when the [`Registered`] guard does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::flow::Pressure;

/// One subscription of a connection: the queue it consumes and what it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub queue: String,
    /// The exchange a private or durable subscription is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// Its binding key, or the MQTT topic filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `auto`, `manual` (WebSocket, SSE) or the MQTT QoS.
    pub ack: String,
    /// Credit for manual acknowledgement (prefetch, MQTT receive maximum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u32>,
}

/// What is fixed about a connection when it registers.
#[derive(Debug, Clone)]
pub struct About {
    /// `mqtt`, `ws`, `sse` or `amqp`.
    pub protocol: &'static str,
    /// `tcp`, `websocket` or `http`.
    pub transport: &'static str,
    pub remote: SocketAddr,
    pub subject: String,
    pub client_id: Option<String>,
    pub expires_at: Option<u64>,
    /// The gauge of its droppable outbound buffer, when it has one.
    pub buffer: Option<Pressure>,
    /// What it publishes and holds, counted as it goes (`Connection::stats`).
    pub stats: Arc<crate::context::ConnStats>,
}

struct Entry {
    about: About,
    since: u64,
    expires_at: Mutex<Option<u64>>,
    subscriptions: Mutex<Vec<SubscriptionView>>,
    close: CancellationToken,
}

/// A connection as `GET /v1/connections` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectionView {
    pub id: u64,
    pub protocol: String,
    pub transport: String,
    pub peer: String,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Seconds since the epoch.
    pub connected_since: u64,
    /// The token's `exp`, seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub subscriptions: Vec<SubscriptionView>,
    /// Messages and bytes in the droppable outbound buffer, and its bounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferView>,
    /// Messages it published that the gateway let through, since it connected (its publish
    /// rate is this over time).
    pub published: u64,
    /// Deliveries sent and not yet acknowledged (MQTT QoS 1/2, manual-ack WebSocket and AMQP).
    pub in_flight: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BufferView {
    pub messages: u64,
    pub bytes: u64,
    pub max_messages: u64,
    pub max_bytes: u64,
    /// Marked slow: it drops rather than paces (DESIGN.md §7).
    pub slow: bool,
    /// Messages dropped because it was full, since the connection opened.
    pub dropped: u64,
}

#[derive(Default)]
pub struct Registry {
    entries: RwLock<BTreeMap<u64, Arc<Entry>>>,
}

/// A connection's place in the registry; dropping it removes the entry.
pub struct Registered {
    registry: Arc<Registry>,
    id: u64,
    entry: Arc<Entry>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Registry {
    pub fn register(self: &Arc<Self>, id: u64, about: About) -> Registered {
        let entry = Arc::new(Entry {
            expires_at: Mutex::new(about.expires_at),
            about,
            since: now_secs(),
            subscriptions: Mutex::default(),
            close: CancellationToken::new(),
        });
        self.entries.write().insert(id, entry.clone());
        Registered {
            registry: self.clone(),
            id,
            entry,
        }
    }

    /// Connections in id order after `after`, those `keep` accepts, at most `limit`.
    pub fn list(
        &self,
        after: Option<u64>,
        limit: usize,
        keep: impl Fn(&ConnectionView) -> bool,
    ) -> Vec<ConnectionView> {
        let from = after.map_or(0, |a| a.saturating_add(1));
        self.entries
            .read()
            .range(from..)
            .map(|(id, e)| view(*id, e))
            .filter(|v| keep(v))
            .take(limit)
            .collect()
    }

    pub fn get(&self, id: u64) -> Option<ConnectionView> {
        self.entries.read().get(&id).map(|e| view(id, e))
    }

    /// Asks connection `id` to close (by an administrator); false when there is none.
    pub fn close(&self, id: u64) -> bool {
        match self.entries.read().get(&id) {
            Some(e) => {
                e.close.cancel();
                true
            }
            None => false,
        }
    }

    /// Open connections per protocol.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for e in self.entries.read().values() {
            *counts.entry(e.about.protocol).or_default() += 1;
        }
        counts
    }
}

fn view(id: u64, e: &Entry) -> ConnectionView {
    ConnectionView {
        id,
        protocol: e.about.protocol.to_owned(),
        transport: e.about.transport.to_owned(),
        peer: e.about.remote.to_string(),
        subject: e.about.subject.clone(),
        client_id: e.about.client_id.clone(),
        connected_since: e.since,
        expires_at: *e.expires_at.lock(),
        subscriptions: e.subscriptions.lock().clone(),
        buffer: e.about.buffer.as_ref().map(|p| {
            let (messages, bytes) = p.fill();
            let bound = p.bound();
            BufferView {
                messages,
                bytes,
                max_messages: bound.messages,
                max_bytes: bound.bytes,
                slow: p.is_slow(),
                dropped: p.dropped(),
            }
        }),
        published: e.about.stats.published.load(Ordering::Relaxed),
        in_flight: e.about.stats.in_flight.load(Ordering::Relaxed),
    }
}

impl Registered {
    /// Resolves when an administrator closes the connection.
    pub fn closed_by_admin(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.entry.close.cancelled()
    }

    /// [`Self::closed_by_admin`] for a future kept across awaits.
    pub fn closed_by_admin_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.entry.close.clone().cancelled_owned()
    }

    pub fn set_subscriptions(&self, mut subscriptions: Vec<SubscriptionView>) {
        // Kept for as long as the connection lasts: a list collected from a map's iterator
        // has room for four (a connection with one subscription would hold 312 bytes more).
        subscriptions.shrink_to_fit();
        *self.entry.subscriptions.lock() = subscriptions;
    }

    /// The token was refreshed.
    pub fn set_expires_at(&self, expires_at: Option<u64>) {
        *self.entry.expires_at.lock() = expires_at;
    }
}

/// Resolves when an administrator closes the connection; never before it registered.
pub async fn closed_by_admin(registered: &Option<Registered>) {
    match registered {
        Some(r) => r.closed_by_admin().await,
        None => std::future::pending().await,
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.entries.write().remove(&self.id);
    }
}
