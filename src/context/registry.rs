//! The client connections this instance serves, as operators see them (`/v1/connections`,
//! DESIGN.md §5): protocol, transport, peer, subject, client id, since when, token expiry,
//! subscriptions and outbound buffer fill — and the way an administrator closes one. Each
//! adapter registers a connection once it is authenticated and keeps its subscriptions up to
//! date; the entry goes when the [`Registered`] guard does. The entry is also where the
//! connection is told to stop, by an administrator or by the gateway's shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use utoipa::ToSchema;

use crate::flow::Pressure;
use crate::shutdown::Shutdown;

/// One subscription of a connection: the queue it consumes and what it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SubscriptionView {
    // The engine's own name of the queue (its consumer's), shared: every subscriber keeps one
    // view for as long as it is connected. (Not a doc comment: it would be the API's.)
    #[schema(value_type = String)]
    pub queue: Arc<str>,
    // Boxed strings, not `String`s: a view is 72 bytes, in mimalloc's 80-byte class, where two
    // capacities took it to 88 and the 96-byte class (one view per subscription, held while it
    // lasts).
    /// The exchange a private or durable subscription is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub exchange: Option<Box<str>>,
    /// Its binding key, or the MQTT topic filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub pattern: Option<Box<str>>,
    /// `auto`, `manual` (WebSocket, SSE) or the MQTT QoS.
    pub ack: &'static str,
    /// Credit for manual acknowledgement (prefetch, MQTT receive maximum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u32>,
}

/// The protocol a connection speaks, as operators see it. A byte in every entry where a
/// `&'static str` was 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Mqtt,
    Ws,
    Sse,
    Amqp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Ws => "ws",
            Protocol::Sse => "sse",
            Protocol::Amqp => "amqp",
        }
    }
}

/// What a connection is carried over, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    WebSocket,
    Http,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::WebSocket => "websocket",
            Transport::Http => "http",
        }
    }
}

/// What is fixed about a connection when it registers. Names are shared with the session, not
/// copied: every connection has an entry.
#[derive(Debug, Clone)]
pub struct About {
    pub protocol: Protocol,
    pub transport: Transport,
    pub remote: SocketAddr,
    pub subject: Arc<str>,
    pub client_id: Option<Arc<str>>,
    /// The gauge of its droppable outbound buffer, when it has one.
    pub buffer: Option<Pressure>,
    /// What it publishes and holds, counted as it goes (`Connection::stats`).
    pub stats: Arc<crate::context::ConnStats>,
}

/// [`About`]'s fields laid out among the entry's own, so its two one-byte names share a word
/// with `since` and `stop`: 144 bytes, and 160 with the `Arc`'s counts, a size class below
/// the 192 that an `About` of its own (padded to 88) took it to.
struct Entry {
    protocol: Protocol,
    transport: Transport,
    remote: SocketAddr,
    subject: Arc<str>,
    client_id: Option<Arc<str>>,
    buffer: Option<Pressure>,
    stats: Arc<crate::context::ConnStats>,
    /// Seconds since the epoch: 32 bits hold them until 2106.
    since: u32,
    /// The token's `exp` ([`NO_EXPIRY`] for none); a refresh moves it.
    expires_at: AtomicU64,
    subscriptions: Mutex<Box<[SubscriptionView]>>,
    /// Why it was told to stop ([`Stop`] as a number; 0 while it was not), and the task that
    /// waits for it. A waker and a number in place: a cancellation token, and the futures
    /// that wait on it and on the shutdown's, were about 470 bytes of every connection.
    stop: AtomicU8,
    waiter: AtomicWaker,
}

/// Why a connection was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// An administrator closed it (`DELETE /v1/connections/{id}`).
    Admin = 1,
    /// The gateway is shutting down.
    Shutdown = 2,
}

impl Entry {
    /// The first reason given stands.
    fn stop(&self, why: Stop) {
        if self
            .stop
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waiter.wake();
        }
    }

    fn poll_stop(&self, cx: &mut Context<'_>) -> Poll<Stop> {
        // Registered before the reason is read: a stop after the read wakes this task.
        self.waiter.register(cx.waker());
        match self.stop.load(Ordering::Acquire) {
            0 => Poll::Pending,
            1 => Poll::Ready(Stop::Admin),
            _ => Poll::Ready(Stop::Shutdown),
        }
    }
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
    /// Set by [`Registry::stop_all`]: a connection registering later is stopped at once.
    stopping: AtomicBool,
}

/// A connection's place in the registry; dropping it removes the entry.
pub struct Registered {
    registry: Arc<Registry>,
    id: u64,
    entry: Arc<Entry>,
}

/// An entry's `expires_at` when the token has none (no token expires at the end of time).
const NO_EXPIRY: u64 = u64::MAX;

impl Registry {
    /// `expires_at`: the token's `exp`, when it has one.
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        about: About,
        expires_at: Option<u64>,
    ) -> Registered {
        let entry = Arc::new(Entry {
            expires_at: AtomicU64::new(expires_at.unwrap_or(NO_EXPIRY)),
            protocol: about.protocol,
            transport: about.transport,
            remote: about.remote,
            subject: about.subject,
            client_id: about.client_id,
            buffer: about.buffer,
            stats: about.stats,
            since: crate::auth::now_secs().try_into().unwrap_or(u32::MAX),
            subscriptions: Mutex::default(),
            stop: AtomicU8::new(0),
            waiter: AtomicWaker::new(),
        });
        let mut entries = self.entries.write();
        entries.insert(id, entry.clone());
        // Under the lock `stop_all` takes: a connection is either among those it stops or
        // registers after the flag is set.
        if self.stopping.load(Ordering::Acquire) {
            entry.stop(Stop::Shutdown);
        }
        drop(entries);
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
                e.stop(Stop::Admin);
                true
            }
            None => false,
        }
    }

    /// Tells every connection, and every one that registers later, that the gateway is
    /// shutting down.
    pub fn stop_all(&self) {
        let entries = self.entries.write();
        self.stopping.store(true, Ordering::Release);
        for e in entries.values() {
            e.stop(Stop::Shutdown);
        }
    }

    /// Open connections per protocol.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for e in self.entries.read().values() {
            *counts.entry(e.protocol.as_str()).or_default() += 1;
        }
        counts
    }
}

fn view(id: u64, e: &Entry) -> ConnectionView {
    ConnectionView {
        id,
        protocol: e.protocol.as_str().to_owned(),
        transport: e.transport.as_str().to_owned(),
        peer: e.remote.to_string(),
        subject: String::from(&*e.subject),
        client_id: e.client_id.as_deref().map(str::to_owned),
        connected_since: e.since.into(),
        expires_at: Some(e.expires_at.load(Ordering::Relaxed)).filter(|&at| at != NO_EXPIRY),
        subscriptions: e.subscriptions.lock().to_vec(),
        buffer: e.buffer.as_ref().map(|p| {
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
        published: e.stats.published.load(Ordering::Relaxed),
        in_flight: e.stats.in_flight.load(Ordering::Relaxed),
    }
}

impl Registered {
    /// Resolves when the connection is told to stop, with why; kept across awaits (it holds
    /// the entry, not the guard). One task waits, the connection's own: a second would take
    /// the wake-up from it.
    pub fn stopped(&self) -> Stopped {
        Stopped(self.entry.clone())
    }

    pub fn set_subscriptions(&self, subscriptions: Vec<SubscriptionView>) {
        // Kept for as long as the connection lasts, exactly as long as it is: a list
        // collected from an iterator may have room for four.
        *self.entry.subscriptions.lock() = subscriptions.into_boxed_slice();
    }

    /// The token was refreshed.
    pub fn set_expires_at(&self, expires_at: Option<u64>) {
        let at = expires_at.unwrap_or(NO_EXPIRY);
        self.entry.expires_at.store(at, Ordering::Relaxed);
    }
}

/// See [`Registered::stopped`].
pub struct Stopped(Arc<Entry>);

impl Future for Stopped {
    type Output = Stop;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Stop> {
        self.0.poll_stop(cx)
    }
}

/// Resolves when the connection must stop, with why: through its registry entry once it
/// registered, else at the gateway's shutdown. Made afresh each turn of a loop, it costs an
/// atomic load and a waker registration once registered; a wait on the shutdown's token takes
/// a lock every connection shares, and adapters register before their loops start.
pub async fn stop_signal(registered: Option<&Registered>, shutdown: &Shutdown) -> Stop {
    match registered {
        Some(r) => std::future::poll_fn(|cx| r.entry.poll_stop(cx)).await,
        None => {
            shutdown.wait().await;
            Stop::Shutdown
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.entries.write().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn about() -> About {
        About {
            protocol: Protocol::Mqtt,
            transport: Transport::Tcp,
            remote: "127.0.0.1:1".parse().expect("an address"),
            subject: "s".into(),
            client_id: None,
            buffer: None,
            stats: Arc::default(),
        }
    }

    #[test]
    fn an_entry_and_a_subscription_view_stay_in_their_size_classes() {
        // Every connection has one: 144 bytes and the `Arc`'s counts fill mimalloc's 160-byte
        // class; 8 more take it to 192 (docs/bench.md).
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 144, "{size}");
        // One per subscription: 72 bytes fill mimalloc's 80-byte class; 16 more take it to 96.
        let size = std::mem::size_of::<SubscriptionView>();
        assert!(size <= 72, "{size}");
    }

    /// An administrator's close stops that connection only, and says so; the shutdown stops
    /// every one, those that register after it too; the first reason given stands. A
    /// connection not yet registered learns of the shutdown from its token.
    #[tokio::test]
    async fn connections_are_told_why_they_stop() {
        let registry = Arc::new(Registry::default());
        let shutdown = Shutdown::new();
        let (one, two) = (
            registry.register(1, about(), None),
            registry.register(2, about(), None),
        );
        let (mut stop_one, mut stop_two) = (one.stopped(), two.stopped());
        assert!((&mut stop_one).now_or_never().is_none());
        assert!(registry.close(1));
        assert!(!registry.close(3), "no connection 3");
        assert_eq!((&mut stop_one).await, Stop::Admin);
        let signal = |r| stop_signal(Some(r), &shutdown).now_or_never();
        assert_eq!(signal(&one), Some(Stop::Admin));
        assert!((&mut stop_two).now_or_never().is_none());
        assert_eq!(signal(&two), None);

        let waiting = tokio::spawn(stop_two);
        registry.stop_all();
        let two_stopped = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert_eq!(two_stopped.expect("woken").expect("joined"), Stop::Shutdown);
        assert_eq!(
            signal(&two),
            Some(Stop::Shutdown),
            "told through the entry, the token untouched"
        );
        assert_eq!(one.stopped().await, Stop::Admin, "the first reason stands");
        let late = registry.register(3, about(), None);
        assert_eq!(late.stopped().now_or_never(), Some(Stop::Shutdown));

        assert_eq!(stop_signal(None, &shutdown).now_or_never(), None);
        shutdown.trigger();
        assert_eq!(
            stop_signal(None, &shutdown).now_or_never(),
            Some(Stop::Shutdown)
        );
    }
}
