//! The publish gate (DESIGN.md §5, §7): the one way a client's message reaches the engine,
//! whichever protocol carried it. In order: the write permission, the engine's memory
//! watermark, the connection's and the subject's rate buckets, then the subject stamp, the
//! engine publish and its metrics. A refusal changes nothing; each adapter maps
//! [`PublishRefused`] to its protocol's answer once.
//!
//! The gate has two steps because MQTT does one thing between them (the retained message is
//! stored once the publish is allowed and before it is published): [`Context::clear_publish`]
//! checks, [`Cleared::publish`] hands over. Nothing else can make a [`Cleared`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use super::{Connection, Context};
use crate::auth::Principal;
use crate::codes::Code;
use crate::engine::table::FieldValue;
use crate::engine::{
    Channel, EngineError, Message, PublishConfirm, PublishOptions, PublishOutcome,
};
use crate::flow::{Pace, Throttled};
use crate::json::SUBJECT_HEADER;
use crate::metrics;

/// Why the gate did not let a publish through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefused {
    #[error("no permission to publish to '{exchange}' with routing key '{routing_key}'")]
    Forbidden {
        exchange: String,
        routing_key: String,
    },
    /// Over a rate bucket, or the engine is above its memory watermark: try again later.
    #[error("{0}")]
    Throttled(Throttled),
}

impl PublishRefused {
    /// The `reason` label of the refusal metric.
    pub fn as_str(&self) -> &'static str {
        match self {
            PublishRefused::Forbidden { .. } => "forbidden",
            PublishRefused::Throttled(t) => t.reason.as_str(),
        }
    }
}

impl From<&PublishRefused> for Code {
    fn from(r: &PublishRefused) -> Self {
        match r {
            PublishRefused::Forbidden { .. } => Code::Forbidden,
            PublishRefused::Throttled(t) => Code::from(t),
        }
    }
}

/// A publish the gate let through; [`Cleared::publish`] hands it to the engine.
#[must_use = "a cleared publish took tokens from the rate buckets"]
pub struct Cleared<'a> {
    protocol: &'static str,
    principal: &'a Principal,
    exchange: &'a str,
    routing_key: &'a str,
}

impl Context {
    /// Checks one client publish of `body_bytes` body bytes to `exchange` with `routing_key`:
    /// write permission, then (taking no tokens while it is over) the engine's memory
    /// watermark, then the connection's and the subject's buckets.
    pub fn clear_publish<'a>(
        &self,
        protocol: &'static str,
        conn: &Connection,
        principal: &'a Principal,
        exchange: &'a str,
        routing_key: &'a str,
        body_bytes: usize,
    ) -> Result<Cleared<'a>, PublishRefused> {
        if !principal.permissions.can_write(exchange, routing_key) {
            return Err(PublishRefused::Forbidden {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        if self.engine.publish_blocked() {
            let alarm = if self.engine.disk_alarm() {
                Throttled::disk()
            } else if self.engine.upstream_alarm() {
                Throttled::upstream()
            } else {
                Throttled::memory()
            };
            return Err(PublishRefused::Throttled(alarm));
        }
        self.flow
            .admit_publish(&conn.limits, principal.shared_subject_key(), body_bytes)
            .map_err(PublishRefused::Throttled)?;
        conn.stats
            .published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Cleared {
            protocol,
            principal,
            exchange,
            routing_key,
        })
    }
}

impl Cleared<'_> {
    /// Stamps the publisher's subject (`x-gateway-sub`, over anything the client sent under
    /// that name) and hands the message to `channel`. Its place in the channel's order is
    /// taken now; the returned future is the engine's confirm.
    pub fn publish(
        self,
        channel: &dyn Channel,
        message: Message,
        options: PublishOptions,
    ) -> Publishing {
        let routing_key = self.routing_key;
        self.hand_over(message, |exchange, message| {
            channel.publish(exchange, routing_key, message, options)
        })
    }

    /// [`Self::publish`] with the routing key it cleared, held shared by the caller
    /// ([`Channel::publish_shared`]).
    pub fn publish_shared(
        self,
        channel: &dyn Channel,
        routing_key: Arc<str>,
        message: Message,
        options: PublishOptions,
    ) -> Publishing {
        debug_assert_eq!(&*routing_key, self.routing_key);
        self.hand_over(message, |exchange, message| {
            channel.publish_shared(exchange, routing_key, message, options)
        })
    }

    /// [`Self::publish_shared`] later: the message, stamped, to join a [`Run`] that hands it
    /// to the engine with the publishes after it.
    pub fn stamp(self, mut message: Message) -> Stamped {
        stamp_subject(&mut message, self.principal);
        Stamped(message)
    }

    fn hand_over(
        self,
        mut message: Message,
        publish: impl FnOnce(&str, Message) -> PublishConfirm,
    ) -> Publishing {
        stamp_subject(&mut message, self.principal);
        Publishing::of(self.protocol, publish(self.exchange, message))
    }
}

/// A message a [`Cleared`] let through, stamped, waiting in a [`Run`].
pub struct Stamped(Message);

/// Cleared publishes to one exchange, staged in order to be handed to the engine as one run
/// ([`Channel::publish_run`]): a connection that read many publishes at once hands them over
/// together. Each carries a tag of the caller's (what it owes the client for it).
pub struct Run<T> {
    messages: Vec<(Arc<str>, Message)>,
    tags: Vec<T>,
    confirms: Vec<PublishConfirm>,
}

impl<T> Default for Run<T> {
    fn default() -> Self {
        Run {
            messages: Vec::new(),
            tags: Vec::new(),
            confirms: Vec::new(),
        }
    }
}

impl<T> Run<T> {
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// How many publishes the run has room for.
    pub fn capacity(&self) -> usize {
        self.tags.capacity()
    }

    /// Makes room for `more` publishes.
    pub fn reserve(&mut self, more: usize) {
        self.messages.reserve_exact(more);
        self.tags.reserve_exact(more);
        self.confirms.reserve_exact(more);
    }

    /// Stages a message cleared for `routing_key` (and the run's exchange); `tag` is what
    /// the caller wants back with its confirm.
    pub fn push(&mut self, routing_key: Arc<str>, message: Stamped, tag: T) {
        self.messages.push((routing_key, message.0));
        self.tags.push(tag);
    }

    /// Hands the staged publishes to `channel` (all cleared for `exchange`, the one exchange
    /// a run goes to) and gives back each taken one's tag with its confirm, in order. Those
    /// after one that paces stay staged ([`Channel::publish_run`]), to be handed over once
    /// the publisher has waited.
    pub fn publish(
        &mut self,
        channel: &dyn Channel,
        exchange: &str,
        protocol: &'static str,
    ) -> impl Iterator<Item = (T, Publishing)> + use<'_, T> {
        channel.publish_run(
            exchange,
            &mut self.messages,
            PublishOptions::default(),
            &mut self.confirms,
        );
        debug_assert_eq!(self.confirms.len() + self.messages.len(), self.tags.len());
        let taken = self.confirms.len();
        self.tags
            .drain(..taken)
            .zip(self.confirms.drain(..))
            .map(move |(tag, confirm)| (tag, Publishing::of(protocol, confirm)))
    }
}

/// Says who published `message` (header `x-gateway-sub`), over anything a client sent under
/// that name. A message already stamped with the subject is left as it is: its properties may
/// be shared by its connection's publishes ([`Message::properties`]), and the stamp would copy
/// them for nothing.
pub fn stamp_subject(message: &mut Message, principal: &Principal) {
    if let Some(FieldValue::Str(subject)) = message.properties.headers.get(SUBJECT_HEADER)
        && (Arc::ptr_eq(subject, &principal.subject) || **subject == *principal.subject)
    {
        return;
    }
    message
        .properties_mut()
        .headers
        .insert(SUBJECT_HEADER, FieldValue::Str(principal.subject.clone()));
}

/// The engine's confirm of a cleared publish; counts the message and its latency when the
/// engine took it.
#[must_use = "a publish is confirmed only when this is awaited"]
pub struct Publishing {
    /// `None`: the confirm was known at the call.
    started: Option<Instant>,
    protocol: &'static str,
    confirm: PublishConfirm,
}

impl Publishing {
    fn of(protocol: &'static str, confirm: PublishConfirm) -> Publishing {
        Publishing {
            // A confirm known at the call took the message within it: its latency is the
            // call's, far inside the histogram's first bucket (50 µs), and is counted as 0
            // rather than timed with two clock reads (3 % of a message's CPU in `perf`). One
            // still pending (a disk write, RabbitMQ's confirm) is timed from here.
            started: (!confirm.is_known()).then(Instant::now),
            protocol,
            confirm,
        }
    }

    /// The buffers the message landed in above their high-water mark: the publisher's
    /// connection waits for them before its next publish (DESIGN.md §7).
    pub fn take_pace(&mut self) -> Pace {
        self.confirm.take_pace()
    }
}

impl Future for Publishing {
    type Output = Result<PublishOutcome, EngineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let result = std::task::ready!(Pin::new(&mut self.confirm).poll(cx));
        if result.is_ok() {
            let latency = self.started.map_or(Duration::ZERO, |at| at.elapsed());
            metrics::message_in(self.protocol, latency);
        }
        Poll::Ready(result)
    }
}
