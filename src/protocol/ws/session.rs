//! One WebSocket client's session (DESIGN.md §4): its principal, its subscriptions with their
//! per-sub delivery tags, and every op. It never sees the socket: requests come in parsed,
//! deliveries come from its consumers, frames go to the [`Outbound`] buffer.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamMap};

use super::frames::{self, AckKind, Envelope, OverflowKind, Request};
use super::outbound::{Frame, Outbound, Overflow, SlowConsumer};
use crate::auth::Principal;
use crate::auth::scopes::encode_subject;
use crate::codes::Code;
use crate::context::{Connection, Context, PublishRefused};
use crate::engine::control::Takeover;
use crate::engine::names::{DEFAULT_EXCHANGE_ALIAS, canonical_exchange, validate_key};
use crate::engine::table::{FieldTable, FieldValue, table_from_json};
use crate::engine::{
    AckMode, CancelReason, Channel, ConsumeOptions, Consumer, DeleteQueueOptions, Delivery,
    EngineError, Message, PublishOptions, QueueSpec,
};
use crate::json::{self, Encoding, PropertiesJson};
use crate::metrics;

const PROTOCOL: &str = "ws";
const DEFAULT_PREFETCH: u32 = 10;
/// How long a durable subscribe keeps trying to take the consumer over from its holder.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Records a durable subscription's definition in its queue's arguments; a resume compares it
/// (`precondition_failed` when it differs). Engines compare only the arguments they know on
/// redeclare, as RabbitMQ does, so the adapter checks this one itself.
const DURABLE_DEFINITION: &str = "x-gateway-ws-subscription";

/// What a request did to the connection.
pub enum Outcome {
    Continue,
    Close(u16, &'static str),
}

/// What a subscription consumes.
#[derive(Debug, Clone)]
enum Target {
    /// A server-named queue of this connection, bound to an exchange.
    Private {
        queue: String,
        exchange: String,
        binding_key: String,
    },
    /// A named queue.
    Named { queue: String },
    /// `ws-{sub}.{name}`, bound to an exchange, resumable.
    Durable {
        queue: String,
        exchange: String,
        binding_key: String,
    },
}

impl Target {
    fn queue(&self) -> &str {
        match self {
            Target::Private { queue, .. }
            | Target::Named { queue }
            | Target::Durable { queue, .. } => queue,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The client acks; bounded by prefetch.
    Manual,
    /// Auto-ack on a shared queue: acked to the engine once written; bounded by the window.
    Window,
    /// Auto-ack on a private queue: no-ack into the droppable buffer.
    NoAck(Overflow),
}

struct Sub {
    target: Target,
    mode: Mode,
    next_tag: u64,
    /// Sub tag → (engine tag, when delivered), for manual subscriptions.
    unacked: BTreeMap<u64, (u64, Instant)>,
}

/// What a subscription's consumer produces for the session's loop.
pub enum Event {
    Delivery(Delivery),
    Ended(Option<CancelReason>),
}

/// A consumer as a stream that reports its end once.
pub struct Deliveries {
    consumer: Consumer,
    ended: bool,
}

impl Stream for Deliveries {
    type Item = Event;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Event>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match this.consumer.poll_recv(cx) {
            Poll::Ready(Some(d)) => Poll::Ready(Some(Event::Delivery(d))),
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(Some(Event::Ended(this.consumer.cancel_reason())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[derive(Serialize)]
struct MessageFrame<'a> {
    op: &'static str,
    sub: &'a str,
    delivery_tag: u64,
    exchange: &'a str,
    routing_key: &'a str,
    redelivered: bool,
    body: Value,
    encoding: Encoding,
    properties: PropertiesJson,
}

/// A failed request: its code, message and, for throttling, when to retry.
struct Refusal {
    code: Code,
    message: String,
    retry_after_ms: Option<u64>,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        Refusal::new(Code::from(&e), e.to_string())
    }
}

impl From<PublishRefused> for Refusal {
    fn from(r: PublishRefused) -> Self {
        let mut refusal = Refusal::new(Code::from(&r), r.to_string());
        if let PublishRefused::Throttled(t) = r {
            refusal.retry_after_ms = Some((t.retry_after.as_millis() as u64).max(1));
        }
        refusal
    }
}

impl From<json::JsonError> for Refusal {
    fn from(e: json::JsonError) -> Self {
        Refusal::new(Code::from(&e), e.to_string())
    }
}

pub struct Session {
    ctx: Context,
    conn: Arc<Connection>,
    channel: Arc<dyn Channel>,
    principal: Principal,
    out: Arc<Outbound>,
    subs: HashMap<Arc<str>, Sub>,
    /// Polled by the connection loop; keyed like `subs`.
    pub consumers: StreamMap<Arc<str>, Deliveries>,
    next_sub: u64,
    takeover_tx: mpsc::UnboundedSender<Takeover>,
    pub takeovers: mpsc::UnboundedReceiver<Takeover>,
}

fn valid_durable_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Session {
    pub fn new(
        ctx: Context,
        conn: Arc<Connection>,
        channel: Arc<dyn Channel>,
        principal: Principal,
        out: Arc<Outbound>,
    ) -> Self {
        let (takeover_tx, takeovers) = mpsc::unbounded_channel();
        Session {
            ctx,
            conn,
            channel,
            principal,
            out,
            subs: HashMap::new(),
            consumers: StreamMap::new(),
            next_sub: 1,
            takeover_tx,
            takeovers,
        }
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.principal.expires_at
    }

    fn reply(&self, text: String) {
        self.out.push(Frame::control(text));
    }

    fn refuse(&self, id: &Value, op: &str, r: Refusal) {
        metrics::refusal(PROTOCOL, r.code.as_str());
        self.reply(frames::error(
            id,
            &Value::String(op.to_owned()),
            r.code,
            &r.message,
            r.retry_after_ms,
        ));
    }

    /// Handles one request.
    pub async fn handle(&mut self, env: Envelope) -> Outcome {
        let Envelope { id, op, request } = env;
        let result = match request {
            Request::Auth(a) => self.refresh(&id, &a.token).await,
            Request::Subscribe(s) => self.subscribe(&id, *s).await,
            Request::Unsubscribe(u) => self.unsubscribe(&id, &u.sub, u.delete).await,
            Request::Publish(p) => self.publish(&id, *p).await,
            Request::Ack(s) => {
                self.settle(&id, &s.sub, s.delivery_tag, s.multiple, None)
                    .await
            }
            Request::Nack(s) => {
                self.settle(&id, &s.sub, s.delivery_tag, s.multiple, Some(s.requeue))
                    .await
            }
            Request::Ping => {
                self.reply(frames::pong(&id));
                Ok(Outcome::Continue)
            }
        };
        match result {
            Ok(outcome) => outcome,
            Err(r) => {
                self.refuse(&id, op, r);
                Outcome::Continue
            }
        }
    }

    // ---------- auth refresh ----------

    async fn refresh(&mut self, id: &Value, token: &str) -> Result<Outcome, Refusal> {
        let fresh = self
            .ctx
            .auth
            .authenticate(token)
            .await
            .map_err(|e| Refusal::new(Code::Unauthorized, e.to_string()))?;
        if fresh.subject != self.principal.subject || fresh.issuer != self.principal.issuer {
            return Err(Refusal::new(
                Code::Unauthorized,
                "a refreshed token must keep the subject and issuer of the connection",
            ));
        }
        self.principal = fresh;
        if !id.is_null() {
            self.reply(frames::auth_ok(
                id,
                &self.principal.subject,
                self.principal.expires_at,
            ));
        }
        // What the new scopes no longer allow ends now.
        let forbidden: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| !self.allowed(&s.target))
            .map(|(k, _)| k.clone())
            .collect();
        for sub in forbidden {
            self.cancel(&sub, "forbidden").await;
        }
        Ok(Outcome::Continue)
    }

    fn allowed(&self, target: &Target) -> bool {
        let p = &self.principal.permissions;
        match target {
            Target::Private {
                exchange,
                binding_key,
                ..
            }
            | Target::Durable {
                exchange,
                binding_key,
                ..
            } => p.can_read(exchange, binding_key),
            Target::Named { queue } => p.can_consume(queue),
        }
    }

    // ---------- subscribe ----------

    async fn subscribe(&mut self, id: &Value, s: frames::Subscribe) -> Result<Outcome, Refusal> {
        let limits = &self.ctx.config.limits;
        if self.subs.len() >= limits.max_subscriptions {
            return Err(Refusal::new(
                Code::PreconditionFailed,
                format!(
                    "at most {} subscriptions per connection (limits.max_subscriptions)",
                    limits.max_subscriptions
                ),
            ));
        }
        let max_prefetch = u32::from(self.ctx.config.ws.max_prefetch);
        let prefetch = s.prefetch.unwrap_or(DEFAULT_PREFETCH);
        if !(1..=max_prefetch).contains(&prefetch) {
            return Err(Refusal::new(
                Code::BadRequest,
                format!("prefetch must be between 1 and {max_prefetch}"),
            ));
        }
        let ack = s.ack.unwrap_or(AckKind::Auto);
        let overflow = match s.overflow.unwrap_or(OverflowKind::DropOldest) {
            OverflowKind::DropOldest => Overflow::DropOldest,
            OverflowKind::Disconnect => Overflow::Disconnect,
        };
        let arguments = match &s.arguments {
            None => FieldTable::new(),
            Some(map) => table_from_json(&Value::Object(map.clone()))
                .map_err(|e| Refusal::new(Code::BadRequest, format!("arguments: {e}")))?,
        };
        let (target, mode, exclusive) = match (&s.exchange, &s.queue, &s.durable) {
            (Some(_), Some(_), _) => {
                return Err(Refusal::new(
                    Code::BadRequest,
                    "give an exchange (with binding_key) or a queue, not both",
                ));
            }
            (None, Some(queue), None) => {
                if !self.principal.permissions.can_consume(queue) {
                    return Err(Refusal::new(
                        Code::Forbidden,
                        format!("no consume permission on queue '{queue}'"),
                    ));
                }
                let mode = if ack == AckKind::Manual {
                    Mode::Manual
                } else {
                    Mode::Window
                };
                (
                    Target::Named {
                        queue: queue.clone(),
                    },
                    mode,
                    false,
                )
            }
            (None, _, _) => {
                return Err(Refusal::new(
                    Code::BadRequest,
                    "subscribe needs an exchange (with binding_key) or a queue",
                ));
            }
            (Some(exchange), None, durable) => {
                let binding_key = s.binding_key.clone().unwrap_or_default();
                validate_key(&binding_key)?;
                let exchange = canonical_exchange(exchange).to_owned();
                if exchange.is_empty() {
                    return Err(Refusal::new(
                        Code::BadRequest,
                        "the default exchange routes by queue name: subscribe to the queue instead",
                    ));
                }
                if !self.principal.permissions.can_read(&exchange, &binding_key) {
                    return Err(Refusal::new(
                        Code::Forbidden,
                        format!(
                            "no read permission on '{exchange}' with binding key '{binding_key}'"
                        ),
                    ));
                }
                match durable {
                    None => {
                        let queue = self
                            .private_queue(&exchange, &binding_key, &arguments)
                            .await?;
                        let mode = if ack == AckKind::Manual {
                            Mode::Manual
                        } else {
                            Mode::NoAck(overflow)
                        };
                        (
                            Target::Private {
                                queue,
                                exchange,
                                binding_key,
                            },
                            mode,
                            true,
                        )
                    }
                    Some(name) => {
                        let queue = self
                            .durable_queue(name, &exchange, &binding_key, &arguments)
                            .await?;
                        let mode = if ack == AckKind::Manual {
                            Mode::Manual
                        } else {
                            Mode::Window
                        };
                        (
                            Target::Durable {
                                queue,
                                exchange,
                                binding_key,
                            },
                            mode,
                            true,
                        )
                    }
                }
            }
        };
        let engine_ack = match mode {
            Mode::Manual => AckMode::Manual {
                prefetch: prefetch.min(65_535) as u16,
            },
            Mode::Window => AckMode::Manual {
                prefetch: self.ctx.config.ws.auto_ack_window,
            },
            Mode::NoAck(_) => AckMode::Auto,
        };
        let options = ConsumeOptions {
            consumer_tag: String::new(),
            ack: engine_ack,
            exclusive,
            arguments: FieldTable::new(),
        };
        let consumer = match self.consume(&target, options).await {
            Ok(c) => c,
            Err(e) => {
                if let Target::Private { queue, .. } = &target {
                    let _ = self
                        .channel
                        .delete_queue(queue, DeleteQueueOptions::default())
                        .await;
                }
                return Err(e.into());
            }
        };
        let sub: Arc<str> = format!("s{}", self.next_sub).into();
        self.next_sub += 1;
        if let Target::Durable { queue, .. } = &target {
            self.ctx
                .engine
                .control()
                .hold(queue, self.conn.id, self.takeover_tx.clone());
        }
        // `subscribed` is queued before the consumer is polled: it precedes every message.
        self.reply(frames::subscribed(id, &sub, target.queue()));
        self.subs.insert(
            sub.clone(),
            Sub {
                target,
                mode,
                next_tag: 1,
                unacked: BTreeMap::new(),
            },
        );
        self.consumers.insert(
            sub,
            Deliveries {
                consumer,
                ended: false,
            },
        );
        Ok(Outcome::Continue)
    }

    async fn private_queue(
        &self,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<String, Refusal> {
        let spec = QueueSpec {
            durable: false,
            exclusive: true,
            auto_delete: false,
            arguments: FieldTable::new(),
        };
        let queue = self.channel.declare_queue("", &spec).await?.name;
        if let Err(e) = self
            .channel
            .bind_queue(&queue, exchange, key, arguments)
            .await
        {
            let _ = self
                .channel
                .delete_queue(&queue, DeleteQueueOptions::default())
                .await;
            return Err(e.into());
        }
        Ok(queue)
    }

    async fn durable_queue(
        &self,
        name: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<String, Refusal> {
        if self.principal.anonymous {
            return Err(Refusal::new(
                Code::Forbidden,
                "durable subscriptions need a token",
            ));
        }
        if !valid_durable_name(name) {
            return Err(Refusal::new(
                Code::BadRequest,
                "durable must be 1–64 characters of [A-Za-z0-9_-]",
            ));
        }
        let queue = format!("ws-{}.{name}", encode_subject(&self.principal.subject));
        if queue.len() > 255 {
            return Err(Refusal::new(
                Code::BadRequest,
                "the subject is too long for a durable subscription name",
            ));
        }
        let mut definition = FieldTable::new();
        definition.insert("exchange".into(), FieldValue::Str(exchange.into()));
        definition.insert("binding_key".into(), FieldValue::Str(key.into()));
        definition.insert("arguments".into(), FieldValue::Table(arguments.clone()));
        let definition = FieldValue::Table(definition);
        let mut args = FieldTable::new();
        args.insert(DURABLE_DEFINITION.into(), definition.clone());
        let expiry_ms = self
            .ctx
            .config
            .ws
            .durable_expiry
            .as_millis()
            .min(u128::from(u32::MAX)) as i64;
        args.insert("x-expires".into(), FieldValue::I64(expiry_ms.max(1)));
        let spec = QueueSpec {
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: args,
        };
        let other = || {
            Refusal::new(
                Code::PreconditionFailed,
                format!(
                    "durable subscription '{name}' exists with another exchange, binding key or arguments"
                ),
            )
        };
        match self.channel.declare_queue(&queue, &spec).await {
            Ok(d) if d.declared == crate::engine::Declared::Created => {}
            // Redeclare equivalence compares only the arguments a broker knows (as RabbitMQ),
            // so the definition is compared here.
            Ok(_) => {
                let info = self.channel.queue_info(&queue).await?;
                if info.spec.arguments.get(DURABLE_DEFINITION) != Some(&definition) {
                    return Err(other());
                }
            }
            Err(EngineError::PreconditionFailed(_)) => return Err(other()),
            Err(e) => return Err(e.into()),
        }
        self.channel
            .bind_queue(&queue, exchange, key, arguments)
            .await?;
        Ok(queue)
    }

    /// Consumes; a durable subscription held elsewhere is taken over.
    async fn consume(
        &self,
        target: &Target,
        options: ConsumeOptions,
    ) -> Result<Consumer, EngineError> {
        let Target::Durable { queue, .. } = target else {
            return self.channel.consume(target.queue(), options).await;
        };
        // The holder is asked to let go until one answers to it.
        let asked = &std::sync::atomic::AtomicBool::new(false);
        let control = &self.ctx.engine.control();
        crate::engine::control::fenced(
            TAKEOVER_TIMEOUT,
            || self.channel.consume(queue, options.clone()),
            || async move {
                use std::sync::atomic::Ordering::Relaxed;
                if !asked.load(Relaxed) {
                    asked.store(control.take_over(queue).await, Relaxed);
                }
            },
        )
        .await
    }

    // ---------- unsubscribe, cancel ----------

    async fn unsubscribe(
        &mut self,
        id: &Value,
        sub: &str,
        delete: bool,
    ) -> Result<Outcome, Refusal> {
        let Some((key, _)) = self.subs.get_key_value(sub) else {
            return Err(Refusal::new(
                Code::PreconditionFailed,
                format!("no subscription '{sub}'"),
            ));
        };
        let key = key.clone();
        self.end(&key, delete).await;
        if !id.is_null() {
            self.reply(frames::ok(id));
        }
        Ok(Outcome::Continue)
    }

    /// Ends a subscription: its consumer goes (unacked deliveries return to the queue), a
    /// private queue is deleted, a durable one only when asked.
    async fn end(&mut self, sub: &Arc<str>, delete_durable: bool) {
        self.consumers.remove(sub);
        self.out.forget(sub);
        let Some(s) = self.subs.remove(sub) else {
            return;
        };
        match &s.target {
            Target::Private { queue, .. } => {
                let _ = self
                    .channel
                    .delete_queue(queue, DeleteQueueOptions::default())
                    .await;
            }
            Target::Durable { queue, .. } => {
                self.ctx.engine.control().release(queue, self.conn.id);
                if delete_durable {
                    let _ = self
                        .channel
                        .delete_queue(queue, DeleteQueueOptions::default())
                        .await;
                }
            }
            Target::Named { .. } => {}
        }
    }

    async fn cancel(&mut self, sub: &Arc<str>, reason: &str) {
        self.end(sub, false).await;
        self.reply(frames::cancelled(sub, reason));
    }

    /// Another connection took a durable subscription over.
    pub async fn taken_over(&mut self, t: Takeover) {
        let subs: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| matches!(&s.target, Target::Durable { queue, .. } if *queue == t.key))
            .map(|(k, _)| k.clone())
            .collect();
        for sub in subs {
            self.cancel(&sub, "taken_over").await;
        }
    }

    /// Cancels manual subscriptions with a delivery unacked for longer than `ws.ack_timeout`.
    pub async fn check_ack_timeouts(&mut self) {
        let limit = self.ctx.config.ws.ack_timeout;
        let late: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| s.unacked.values().any(|(_, at)| at.elapsed() >= limit))
            .map(|(k, _)| k.clone())
            .collect();
        for sub in late {
            self.cancel(&sub, "ack_timeout").await;
        }
    }

    // ---------- publish ----------

    async fn publish(&mut self, id: &Value, p: frames::Publish) -> Result<Outcome, Refusal> {
        let exchange = if p.exchange.is_empty() {
            DEFAULT_EXCHANGE_ALIAS.to_owned()
        } else {
            p.exchange.clone()
        };
        crate::engine::names::validate_name("exchange", &exchange)?;
        validate_key(&p.routing_key)?;
        let (body, is_json) = json::body_in(&p.body, p.encoding)?;
        let max = self.ctx.config.limits.max_message_bytes.as_u64() as usize;
        if body.len() > max {
            return Err(Refusal::new(
                Code::TooLarge,
                format!(
                    "the message body is {} bytes, the limit is {max}",
                    body.len()
                ),
            ));
        }
        let properties = json::properties_in(p.properties, is_json)?;
        let cleared = self.ctx.clear_publish(
            PROTOCOL,
            &self.conn,
            &self.principal,
            &exchange,
            &p.routing_key,
            body.len(),
        )?;
        let options = PublishOptions {
            mandatory: p.mandatory,
        };
        let outcome = cleared
            .publish(&*self.channel, Message { properties, body }, options)
            .await
            .map_err(|e| {
                let mut r = Refusal::from(e);
                if matches!(r.code, Code::Overloaded | Code::Unavailable) {
                    r.retry_after_ms = Some(1000);
                }
                r
            })?;
        if p.mandatory && !outcome.routed {
            return Err(Refusal::new(
                Code::Unroutable,
                "no queue is bound to receive this message",
            ));
        }
        if !id.is_null() {
            self.reply(frames::published(id, outcome.routed));
        }
        Ok(Outcome::Continue)
    }

    // ---------- ack / nack ----------

    async fn settle(
        &mut self,
        id: &Value,
        sub: &str,
        tag: u64,
        multiple: bool,
        nack: Option<bool>,
    ) -> Result<Outcome, Refusal> {
        let Some(s) = self.subs.get_mut(sub) else {
            return Err(Refusal::new(
                Code::PreconditionFailed,
                format!("no subscription '{sub}'"),
            ));
        };
        if s.mode != Mode::Manual {
            return Err(Refusal::new(
                Code::PreconditionFailed,
                format!("subscription '{sub}' acknowledges automatically"),
            ));
        }
        let tags: Vec<u64> = if multiple {
            s.unacked.range(..=tag).map(|(t, _)| *t).collect()
        } else if s.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            Vec::new()
        };
        if tags.is_empty() {
            return Err(Refusal::new(
                Code::PreconditionFailed,
                format!("unknown delivery tag {tag} on '{sub}'"),
            ));
        }
        let engine_tags: Vec<u64> = tags
            .iter()
            .filter_map(|t| s.unacked.remove(t))
            .map(|(e, _)| e)
            .collect();
        for engine_tag in engine_tags {
            match nack {
                None => self.channel.ack(engine_tag, false).await?,
                Some(requeue) => self.channel.nack(engine_tag, false, requeue).await?,
            }
        }
        if !id.is_null() {
            self.reply(frames::ok(id));
        }
        Ok(Outcome::Continue)
    }

    // ---------- deliveries ----------

    /// A consumer produced something for `sub`.
    pub async fn event(&mut self, sub: Arc<str>, event: Event) -> Outcome {
        let d = match event {
            Event::Delivery(d) => d,
            Event::Ended(reason) => {
                if self.subs.contains_key(&sub) {
                    let why = match reason {
                        Some(CancelReason::QueueDeleted) => "deleted",
                        _ => "deleted",
                    };
                    self.cancel(&sub, why).await;
                }
                return Outcome::Continue;
            }
        };
        let Some(s) = self.subs.get_mut(&sub) else {
            return Outcome::Continue;
        };
        let tag = s.next_tag;
        s.next_tag += 1;
        let (body, encoding) = json::body_out(d.message());
        let exchange = if d.exchange().is_empty() {
            DEFAULT_EXCHANGE_ALIAS
        } else {
            d.exchange()
        };
        let frame = MessageFrame {
            op: "message",
            sub: &sub,
            delivery_tag: tag,
            exchange,
            routing_key: d.routing_key(),
            redelivered: d.redelivered,
            body,
            encoding,
            properties: json::properties_out(d.properties()),
        };
        let text = match serde_json::to_string(&frame) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a delivery");
                return Outcome::Continue;
            }
        };
        match s.mode {
            Mode::Manual => {
                s.unacked.insert(tag, (d.delivery_tag, Instant::now()));
                self.out.push(Frame {
                    text,
                    droppable: None,
                    ack_after_write: None,
                    message: true,
                });
            }
            Mode::Window => {
                self.out.push(Frame {
                    text,
                    droppable: None,
                    ack_after_write: Some(d.delivery_tag),
                    message: true,
                });
            }
            Mode::NoAck(overflow) => {
                if let Err(SlowConsumer) = self.out.push_droppable(sub, text, overflow) {
                    metrics::refusal(PROTOCOL, "slow_consumer");
                    return Outcome::Close(
                        frames::close::SLOW_CONSUMER,
                        "slow consumer: outbound buffer full",
                    );
                }
            }
        }
        Outcome::Continue
    }

    /// The connection is going: release holds and delete private queues (the channel's close
    /// would too; doing it here keeps the control registry exact).
    pub async fn close(&mut self) {
        let subs: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        for sub in subs {
            self.end(&sub, false).await;
        }
    }
}
