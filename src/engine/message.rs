//! Messages as the engine carries them: one immutable [`Envelope`] per publish, shared by every
//! queue it was routed to (fan-out copies a pointer, never a body).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::table::FieldTable;

/// AMQP 0-9-1 basic properties.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Empty when the message has none.
    pub headers: FieldTable,
    /// 1 transient, 2 persistent.
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a decimal string (AMQP).
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    /// Set only on messages that arrive from AMQP peers; gateway clients may not set it.
    pub user_id: Option<String>,
    pub app_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub properties: Properties,
    pub body: Bytes,
}

impl Message {
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            properties: Properties::default(),
            body: body.into(),
        }
    }

    pub fn persistent(mut self) -> Self {
        self.properties.delivery_mode = Some(2);
        self
    }

    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode == Some(2)
    }
}

/// A published message with where it was published; immutable once routed.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    pub message: Message,
    /// What the engine counts against its memory watermark while it holds this envelope.
    pub charge: Charge,
}

/// The body bytes an engine holds, against its memory high watermark: crossing it either way
/// flips a `watch`, so adapters (and an AMQP listener's `connection.blocked`) follow the state
/// without polling. Only crossings touch the watch; every other change is one atomic add.
pub struct Held {
    bytes: AtomicU64,
    watermark: u64,
    blocked: tokio::sync::watch::Sender<bool>,
}

impl Held {
    /// `watermark` of `u64::MAX`: never blocked.
    pub fn new(watermark: u64) -> Held {
        Held {
            bytes: AtomicU64::new(0),
            watermark,
            blocked: tokio::sync::watch::Sender::new(false),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn blocked(&self) -> bool {
        *self.blocked.borrow()
    }

    pub fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.blocked.subscribe()
    }

    fn add(&self, n: u64) {
        let before = self.bytes.fetch_add(n, Ordering::Relaxed);
        if before < self.watermark && before.saturating_add(n) >= self.watermark {
            self.recheck();
        }
    }

    fn sub(&self, n: u64) {
        let before = self.bytes.fetch_sub(n, Ordering::Relaxed);
        if before >= self.watermark && before - n < self.watermark {
            self.recheck();
        }
    }

    /// Sets the state from the current count, under the watch's lock: whichever crossing
    /// rechecks last sees the latest count, so concurrent crossings cannot leave it stale.
    fn recheck(&self) {
        self.blocked.send_if_modified(|blocked| {
            let now = self.bytes.load(Ordering::Relaxed) >= self.watermark;
            let changed = *blocked != now;
            *blocked = now;
            changed
        });
    }
}

/// Body bytes added to [`Held`] while the value holding this lives, taken off when it drops:
/// an envelope shared by many queues (one `Arc`) is counted once, for as long as any queue or
/// unsettled delivery holds it. A clone is not counted (only the engine's own copy is).
#[derive(Default)]
pub struct Charge(Option<(Arc<Held>, u64)>);

impl Charge {
    pub fn new(held: &Arc<Held>, bytes: u64) -> Charge {
        held.add(bytes);
        Charge(Some((held.clone(), bytes)))
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((held, bytes)) = &self.0 {
            held.sub(*bytes);
        }
    }
}

impl Clone for Charge {
    fn clone(&self) -> Self {
        Charge(None)
    }
}

/// Accounting, not content: two envelopes compare by what they carry.
impl PartialEq for Charge {
    fn eq(&self, _: &Charge) -> bool {
        true
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((_, bytes)) => write!(f, "Charge({bytes})"),
            None => f.write_str("Charge(-)"),
        }
    }
}

/// One message handed to a consumer or returned by `get`.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Per channel, from 1.
    pub delivery_tag: u64,
    pub redelivered: bool,
    /// `None` for `get`.
    pub consumer_tag: Option<Arc<str>>,
    pub envelope: Arc<Envelope>,
    /// Time left before the message would have expired in its queue (MQTT 5 decrements the
    /// Message Expiry Interval with it).
    pub expires_in: Option<Duration>,
    /// For `get`: ready messages left in the queue.
    pub message_count: Option<u64>,
}

impl Delivery {
    pub fn exchange(&self) -> &str {
        &self.envelope.exchange
    }
    pub fn routing_key(&self) -> &str {
        &self.envelope.routing_key
    }
    pub fn message(&self) -> &Message {
        &self.envelope.message
    }
    pub fn body(&self) -> &Bytes {
        &self.envelope.message.body
    }
    pub fn properties(&self) -> &Properties {
        &self.envelope.message.properties
    }
}
