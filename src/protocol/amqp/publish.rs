//! `basic.publish`: its content (header and body frames) assembled per channel, the publish
//! gate (permission, watermark, rate buckets — DESIGN.md §7: a throttled publish is parked,
//! never dropped, and the socket is read on until the parked bytes reach
//! `limits.max_pending_in`), and what the engine's confirm becomes on the wire: `basic.return`
//! for an unroutable mandatory publish, then `basic.ack` / `basic.nack` in confirm mode.

use std::future::Future;
use std::pin::Pin;

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::ShortString;
use bytes::{Bytes, BytesMut};

use super::error::{
    CONTENT_TOO_LARGE, FRAME_ERROR, Fault, NO_ROUTE, NOT_IMPLEMENTED, PRECONDITION_FAILED,
    UNEXPECTED_FRAME,
};
use super::frame;
use super::session::Session;
use crate::context::PublishRefused;
use crate::engine::wire::{properties_from_amqp, properties_to_amqp};
use crate::engine::{EngineError, Message, PublishOptions, PublishOutcome};

const PUBLISH: (u16, u16) = (60, 40);

/// A publish whose content is arriving.
pub(super) struct Content {
    publish: basic::Publish,
    header: Option<(u64, basic::AMQPProperties)>,
    body: Body,
}

enum Body {
    Empty,
    /// The common case: one body frame, kept without a copy.
    One(Bytes),
    Many(BytesMut),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::One(b) => b.len() as u64,
            Body::Many(b) => b.len() as u64,
        }
    }

    fn push(&mut self, part: Bytes) {
        *self = match std::mem::replace(self, Body::Empty) {
            Body::Empty => Body::One(part),
            Body::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + part.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&part);
                Body::Many(all)
            }
            Body::Many(mut all) => {
                all.extend_from_slice(&part);
                Body::Many(all)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Body::Empty => Bytes::new(),
            Body::One(b) => b,
            Body::Many(b) => b.freeze(),
        }
    }
}

/// A whole publish, waiting for the gate or on its way through it.
pub(super) struct Parked {
    pub channel: u16,
    pub bytes: u64,
    exchange: String,
    routing_key: String,
    message: Message,
    mandatory: bool,
    /// Its confirm sequence number, when the channel is in confirm mode.
    seq: Option<u64>,
}

/// What a publish's confirm says, and what the client is to hear of it.
pub struct Confirmed {
    channel: u16,
    seq: Option<u64>,
    /// A mandatory publish keeps what `basic.return` would send back.
    returned: Option<(String, String, Message)>,
    result: Result<PublishOutcome, EngineError>,
}

pub type Confirming = Pin<Box<dyn Future<Output = Confirmed> + Send>>;

impl Session {
    pub(super) fn start_publish(&mut self, c: u16, p: basic::Publish) -> Result<(), Fault> {
        if p.immediate {
            // As RabbitMQ 3.0 and later.
            return Err(Fault::connection(
                NOT_IMPLEMENTED,
                "immediate=true",
                PUBLISH,
            ));
        }
        if let Some(chan) = self.channels.get_mut(&c) {
            chan.content = Some(Content {
                publish: p,
                header: None,
                body: Body::Empty,
            });
        }
        Ok(())
    }

    pub(super) fn content_header(&mut self, c: u16, h: AMQPContentHeader) -> Result<(), Fault> {
        let limit = self.ctx.config.limits.max_message_bytes.as_u64();
        let Some(content) = self.channels.get_mut(&c).and_then(|ch| ch.content.as_mut()) else {
            return Err(unexpected(c, "a content header"));
        };
        if content.header.is_some() || h.class_id != 60 {
            return Err(unexpected(c, "a second content header"));
        }
        if h.body_size > limit {
            // The channel closes now; its body frames are dropped with it.
            return Err(Fault::channel(
                CONTENT_TOO_LARGE,
                format!(
                    "message body of {} bytes exceeds limits.max_message_bytes ({limit})",
                    h.body_size
                ),
                PUBLISH,
            ));
        }
        content.header = Some((h.body_size, h.properties));
        if h.body_size == 0 {
            return self.content_complete(c);
        }
        Ok(())
    }

    pub(super) fn content_body(&mut self, c: u16, part: Bytes) -> Result<(), Fault> {
        let Some(content) = self.channels.get_mut(&c).and_then(|ch| ch.content.as_mut()) else {
            return Err(unexpected(c, "a content body"));
        };
        let Some((size, _)) = &content.header else {
            return Err(unexpected(c, "a content body before its header"));
        };
        let size = *size;
        content.body.push(part);
        match content.body.len() {
            n if n > size => Err(Fault::connection(
                FRAME_ERROR,
                format!(
                    "content body of {n} bytes on channel {c} exceeds the {size} its header announced"
                ),
                PUBLISH,
            )),
            n if n == size => self.content_complete(c),
            _ => Ok(()),
        }
    }

    fn content_complete(&mut self, c: u16) -> Result<(), Fault> {
        let Some(chan) = self.channels.get_mut(&c) else {
            return Ok(());
        };
        let Some(Content {
            publish,
            header: Some((_, properties)),
            body,
        }) = chan.content.take()
        else {
            return Ok(());
        };
        let seq = chan.next_confirm;
        if let Some(n) = seq {
            chan.next_confirm = Some(n + 1);
        }
        let properties = properties_from_amqp(&properties);
        if let Some(user) = &properties.user_id
            && **user != *self.principal.subject
        {
            // RabbitMQ's validated user-id: only the authenticated subject may be named.
            return Err(Fault::channel(
                PRECONDITION_FAILED,
                format!(
                    "user_id property set to '{user}' but the authenticated subject is '{}'",
                    self.principal.subject
                ),
                PUBLISH,
            ));
        }
        let body = body.into_bytes();
        let parked = Parked {
            channel: c,
            bytes: body.len() as u64,
            exchange: publish.exchange.to_string(),
            routing_key: publish.routing_key.to_string(),
            message: Message::with(properties, body),
            mandatory: publish.mandatory,
            seq,
        };
        if !self.parked.is_empty() {
            self.park(parked);
            return Ok(());
        }
        if let Some(back) = self.try_publish(parked)? {
            self.park(back);
        }
        Ok(())
    }

    fn park(&mut self, p: Parked) {
        self.parked_bytes += p.bytes;
        self.parked.push_back(p);
    }

    /// Through the gate to the engine; the publish back when it is throttled (and `retry_at`
    /// set for it).
    fn try_publish(&mut self, p: Parked) -> Result<Option<Parked>, Fault> {
        let Some(chan) = self.channels.get(&p.channel) else {
            return Ok(None);
        };
        let cleared = match self.ctx.clear_publish(
            super::PROTOCOL,
            &self.conn,
            &self.principal,
            &p.exchange,
            &p.routing_key,
            p.bytes as usize,
        ) {
            Ok(cleared) => cleared,
            Err(PublishRefused::Throttled(t)) => {
                crate::metrics::refusal(super::PROTOCOL, t.reason.as_str());
                self.retry_at = Some(tokio::time::Instant::now() + t.retry_after);
                return Ok(Some(p));
            }
            Err(refused) => {
                crate::metrics::refusal(super::PROTOCOL, refused.as_str());
                return Err(Fault::refused(&refused, PUBLISH));
            }
        };
        let returned = p
            .mandatory
            .then(|| (p.exchange.clone(), p.routing_key.clone(), p.message.clone()));
        let mut publishing = cleared.publish(
            chan.engine.as_ref(),
            p.message,
            PublishOptions {
                mandatory: p.mandatory,
            },
        );
        let (channel, seq) = (p.channel, p.seq);
        if returned.is_none() && seq.is_none() {
            // Nobody hears of this confirm; the engine keeps the message whether it is polled
            // or not, but the metrics count it when it resolves.
            let waker = std::task::Waker::noop();
            if self.confirms.is_empty()
                && let std::task::Poll::Ready(result) =
                    Pin::new(&mut publishing).poll(&mut std::task::Context::from_waker(waker))
            {
                self.confirmed(Confirmed {
                    channel,
                    seq,
                    returned,
                    result,
                });
                return Ok(None);
            }
        }
        self.confirms.push_back(Box::pin(async move {
            Confirmed {
                channel,
                seq,
                returned,
                result: publishing.await,
            }
        }));
        Ok(None)
    }

    /// Retries parked publishes in order until one is throttled again.
    pub(super) fn retry_parked(&mut self) -> Result<(), (u16, Fault)> {
        self.retry_at = None;
        while let Some(p) = self.parked.pop_front() {
            self.parked_bytes -= p.bytes;
            let c = p.channel;
            if let Some(back) = self.try_publish(p).map_err(|f| (c, f))? {
                self.parked_bytes += back.bytes;
                self.parked.push_front(back);
                break;
            }
        }
        Ok(())
    }

    /// The engine took (or refused) a publish: `basic.return` if it was mandatory and routed
    /// nowhere, then the confirm.
    pub fn confirmed(&mut self, c: Confirmed) {
        if !self.channels.contains_key(&c.channel) {
            return;
        }
        if let (Ok(PublishOutcome { routed: false }), Some((exchange, routing_key, message))) =
            (&c.result, c.returned)
        {
            self.method_frame(
                c.channel,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: NO_ROUTE,
                    reply_text: ShortString::from("NO_ROUTE"),
                    exchange: ShortString::from(exchange),
                    routing_key: ShortString::from(routing_key),
                })),
            );
            let properties = properties_to_amqp(&message.properties).unwrap_or_default();
            frame::content(
                &mut self.out,
                c.channel,
                properties,
                &message.body,
                self.frame_max,
            );
        }
        if let Err(e) = &c.result {
            tracing::debug!(remote = %self.conn.remote, error = %e, "publish not taken by the engine");
        }
        if let Some(seq) = c.seq {
            let method = match c.result {
                Ok(_) => basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: seq,
                    multiple: false,
                }),
                Err(_) => basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: seq,
                    multiple: false,
                    requeue: false,
                }),
            };
            self.method_frame(c.channel, AMQPClass::Basic(method));
        }
    }
}

fn unexpected(c: u16, what: &str) -> Fault {
    Fault::connection(
        UNEXPECTED_FRAME,
        format!("{what} on channel {c} without a basic.publish awaiting it"),
        (0, 0),
    )
}
