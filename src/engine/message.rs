//! Messages as the engine carries them: one immutable [`Envelope`] per publish, shared by every
//! queue it was routed to (fan-out copies a pointer, never a body).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::table::Headers;

/// AMQP 0-9-1 basic properties.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Empty when the message has none.
    pub headers: Headers,
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
    /// Behind a pointer: a message is handed on by value from adapter to queue (eight moves
    /// or so on the way in), and inline the properties made each move a 300-byte `memcpy`, 6 %
    /// of a QoS 0 message's instructions. Shared, copy-on-write ([`Message::properties_mut`]):
    /// an MQTT connection's publishes without MQTT 5 properties all carry one of a few
    /// (its QoS, its retain flag), and take a count on it rather than an allocation each.
    pub properties: Arc<Properties>,
    pub body: Bytes,
}

impl Message {
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            properties: Arc::default(),
            body: body.into(),
        }
    }

    /// A message of `properties` and `body`.
    pub fn with(properties: impl Into<Arc<Properties>>, body: impl Into<Bytes>) -> Self {
        Message {
            properties: properties.into(),
            body: body.into(),
        }
    }

    /// This message's own properties to write to, copied first if another message shares
    /// them.
    pub fn properties_mut(&mut self) -> &mut Properties {
        Arc::make_mut(&mut self.properties)
    }

    pub fn persistent(mut self) -> Self {
        self.properties_mut().delivery_mode = Some(2);
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
}

/// Read access to an envelope however an engine keeps it: the embedded engine keeps its
/// memory accounting beside the envelope, in the same allocation, and hands that out; an
/// engine with nothing to add hands out the envelope itself.
pub trait EnvelopeRef: Send + Sync + std::fmt::Debug {
    fn envelope(&self) -> &Envelope;

    /// Where adapters may keep their renderings of this message, made by the first delivery
    /// that needs one and reused by every other delivery of the same message (fan-out to a
    /// thousand browsers renders the body and properties once, not a thousand times).
    /// `None` where an engine's deliveries do not share an envelope.
    fn rendering(&self) -> Option<&Rendering> {
        None
    }
}

/// Renderings of one message, opaque to the engine; they live as long as the message does.
#[derive(Debug, Default)]
pub struct Rendering {
    /// The JSON a WebSocket or SSE delivery shares (exchange, routing key, body, properties).
    pub json: std::sync::OnceLock<Box<str>>,
    /// The MQTT 3.1.1 QoS 0 PUBLISH every 3.1.1 subscriber is sent, as it goes on the wire
    /// (its topic made by the gateway's one topic mapping).
    pub mqtt: std::sync::OnceLock<Bytes>,
    /// A first 3.1.1 QoS 0 copy went out, written straight into its connection's buffer:
    /// `mqtt` is made by the second, so a message with one subscriber (1→1, fan-in) is not
    /// encoded into a buffer of its own and copied again.
    pub mqtt_sent: std::sync::atomic::AtomicBool,
}

impl Rendering {
    pub const fn new() -> Self {
        Rendering {
            json: std::sync::OnceLock::new(),
            mqtt: std::sync::OnceLock::new(),
            mqtt_sent: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl EnvelopeRef for Envelope {
    fn envelope(&self) -> &Envelope {
        self
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
    pub envelope: Arc<dyn EnvelopeRef>,
    /// Time left before the message would have expired in its queue (MQTT 5 decrements the
    /// Message Expiry Interval with it).
    pub expires_in: Option<Duration>,
    /// For `get`: ready messages left in the queue.
    pub message_count: Option<u64>,
}

impl Delivery {
    pub fn exchange(&self) -> &str {
        &self.envelope.envelope().exchange
    }
    pub fn routing_key(&self) -> &str {
        &self.envelope.envelope().routing_key
    }
    pub fn message(&self) -> &Message {
        &self.envelope.envelope().message
    }
    pub fn body(&self) -> &Bytes {
        &self.envelope.envelope().message.body
    }
    pub fn properties(&self) -> &Properties {
        &self.envelope.envelope().message.properties
    }
}
