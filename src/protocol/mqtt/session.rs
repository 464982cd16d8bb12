//! One MQTT client's session (DESIGN.md §3), mapped onto the engine: its queues
//! (`…qos0`, `…qos1`), subscriptions, in-flight QoS 1 deliveries and parked publishes. It
//! never sees the socket: packets come in as [`Inbound`], answers go out as [`Outbound`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamMap};

use super::codec::{
    Connect, Filter, Inbound, Outbound, PublishIn, PublishProps, TOPIC_ALIAS_MAX, Version, Will,
};
use super::retained::Retained;
use super::topic::{self, filter_to_binding, key_to_topic, session_queue, topic_to_key};
use crate::auth::Principal;
use crate::context::{Connection, Context};
use crate::control::Takeover;
use crate::engine::table::{FieldTable, FieldValue};
use crate::engine::{
    AckMode, Channel, ConsumeOptions, Consumer, Declared, Delivery, EngineError, Message,
    PublishOptions, QueueSpec,
};
use crate::json::SUBJECT_HEADER;
use crate::metrics;

const PROTOCOL: &str = "mqtt";
/// The publish QoS travels with the message so deliveries never exceed it (DESIGN.md §3).
pub const PUBLISH_QOS_HEADER: &str = "x-mqtt-publish-qos";
/// The MQTT 5 Authentication Method that carries a JWT and allows refreshing it with AUTH.
pub const AUTH_METHOD: &str = "amqp-gateway.jwt";
/// MQTT 5 correlation data that is not UTF-8 (AMQP correlation_id is a short string).
pub const CORRELATION_HEADER: &str = "x-mqtt-correlation-data";
/// The session (subject, client id) a message was published by, for no-local.
pub const ORIGIN_HEADER: &str = "x-mqtt-origin";
/// Set when the message was published with RETAIN, for retain-as-published.
pub const RETAIN_HEADER: &str = "x-mqtt-retain";

/// MQTT 5 reason codes used here (3.1.1 answers are derived from them in the codec).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_CREDENTIALS: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_NOT_SUPPORTED: u8 = 0x9E;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const TOKEN_EXPIRED: u8 = 0xA0;
}

/// What handling a packet did to the connection.
pub enum Outcome {
    Continue,
    /// Close; for MQTT 5 send DISCONNECT with this reason first.
    Close(Option<u8>),
    /// The client sent DISCONNECT: close without the will.
    Disconnected,
}

/// A consumer as a stream that reports its end once.
pub struct Deliveries(Consumer, bool);

impl Stream for Deliveries {
    type Item = Option<Delivery>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.1 {
            return Poll::Ready(None);
        }
        match this.0.poll_recv(cx) {
            Poll::Ready(Some(d)) => Poll::Ready(Some(Some(d))),
            Poll::Ready(None) => {
                this.1 = true;
                Poll::Ready(Some(None))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

pub struct Session {
    ctx: Context,
    conn: Arc<Connection>,
    channel: Arc<dyn Channel>,
    principal: Principal,
    pub version: Version,
    client_id: String,
    clean: bool,
    session_expiry: Duration,
    will: Option<Will>,
    out: mpsc::UnboundedSender<Outbound>,
    /// QoS 0 publishes queued for the writer: bounded by `limits.outbound_buffer_messages`.
    qos0_queued: Arc<AtomicUsize>,
    /// Filter → granted QoS.
    subs: HashMap<String, SubOpts>,
    /// Keyed by the queue's level (0 or 1).
    /// Keyed "0" and "1" for the session's queues, or by a shared subscription's filter.
    pub consumers: StreamMap<String, Deliveries>,
    /// Outbound QoS 1/2 deliveries by packet id.
    inflight: HashMap<u16, Inflight>,
    /// Inbound QoS 2 packet ids published and awaiting PUBREL: a resend is not published again.
    inbound_qos2: HashSet<u16>,
    /// 2 on the embedded engine; 1 upstream (DESIGN.md §3).
    max_qos: u8,
    retained: Arc<Retained>,
    next_packet_id: u16,
    inflight_max: u16,
    /// MQTT 5 inbound topic aliases.
    aliases: HashMap<u16, String>,
    /// QoS 1 publishes over the rate limit wait here (their PUBACK withheld).
    parked: VecDeque<PublishIn>,
    pub retry_at: Option<Instant>,
    takeover_key: String,
    pub takeovers: mpsc::UnboundedReceiver<Takeover>,
    /// Set when the client authenticated with [`AUTH_METHOD`]: it may refresh with AUTH.
    auth_method: Option<String>,
}

/// A subscription's options (MQTT 5; defaults for 3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SubOpts {
    granted: u8,
    no_local: bool,
    retain_as_published: bool,
    id: Option<u32>,
}

/// An outbound delivery awaiting its acknowledgement. The engine tag is `None` for retained
/// messages, which no queue holds.
#[derive(Debug, Clone, Copy)]
enum Inflight {
    /// QoS 1: settled by PUBACK.
    AtLeastOnce(Option<u64>),
    /// QoS 2 sent: PUBREC settles it with the engine, then PUBREL goes out.
    Sent(Option<u64>),
    /// QoS 2 released: the packet id is free again at PUBCOMP.
    Released,
}

/// The QoS a message was published with: header `x-mqtt-publish-qos`, else persistent → 1.
fn publish_qos_of(d: &Delivery) -> u8 {
    match d
        .properties()
        .headers
        .get(PUBLISH_QOS_HEADER)
        .and_then(FieldValue::as_i128)
    {
        Some(q) => q.clamp(0, 2) as u8,
        None if d.message().is_persistent() => 1,
        None => 0,
    }
}

/// The session key the control registry holds: (subject, client id).
fn takeover_key(subject: &str, client_id: &str) -> String {
    session_queue(subject, client_id, "")
}

/// A refused CONNECT: the CONNACK reason and why (for the log line).
pub struct Refused {
    pub code: u8,
    pub why: String,
}

impl Session {
    /// Handles CONNECT: authenticates, takes the session over if it is live, opens its queues.
    /// Returns the session and its CONNACK.
    pub async fn connect(
        ctx: Context,
        conn: Arc<Connection>,
        connect: Connect,
        out: mpsc::UnboundedSender<Outbound>,
        retained: Arc<Retained>,
        qos0_queued: Arc<AtomicUsize>,
    ) -> Result<(Session, Outbound), Refused> {
        // MQTT 5 enhanced authentication carries the token in Authentication Data; only our
        // method is known ([MQTT-4.12.0-1]: otherwise 0x8C).
        let token_bytes = match connect.auth_method.as_deref() {
            Some(AUTH_METHOD) => connect.auth_data.as_ref(),
            Some(_) => {
                return Err(Refused {
                    code: reason::BAD_AUTHENTICATION_METHOD,
                    why: "unknown authentication method".into(),
                });
            }
            None => connect.password.as_ref(),
        };
        let principal = match token_bytes.filter(|p| !p.is_empty()) {
            None => ctx.auth.anonymous().map_err(|e| Refused {
                code: reason::BAD_CREDENTIALS,
                why: e.to_string(),
            })?,
            Some(pw) => {
                let token = std::str::from_utf8(pw).map_err(|_| Refused {
                    code: reason::BAD_CREDENTIALS,
                    why: "password is not a token".into(),
                })?;
                ctx.auth.authenticate(token).await.map_err(|e| Refused {
                    code: reason::BAD_CREDENTIALS,
                    why: e.to_string(),
                })?
            }
        };
        if principal.permissions.is_empty() {
            return Err(Refused {
                code: reason::NOT_AUTHORIZED,
                why: "the token's scopes allow nothing".into(),
            });
        }
        let mut client_id = connect.client_id.clone();
        let mut assigned = None;
        if client_id.is_empty() {
            // [MQTT-3.1.3-8]: 3.1.1 allows an empty id only with a clean session.
            if connect.version == Version::V3 && !connect.clean_start {
                return Err(Refused {
                    code: reason::CLIENT_ID_NOT_VALID,
                    why: "empty client id without clean session".into(),
                });
            }
            client_id = crate::engine::names::generate("auto-");
            assigned = (connect.version == Version::V5).then(|| client_id.clone());
        }
        let channel = conn.channel(&ctx.engine).await.map_err(|e| Refused {
            code: reason::SERVER_UNAVAILABLE,
            why: e.to_string(),
        })?;
        let subject = principal.shared_subject().to_owned();
        let key = takeover_key(&subject, &client_id);
        // Client-id takeover, only within one subject (the key includes it).
        if ctx.control.take_over(&key) {
            let deadline = Instant::now() + ctx.config.mqtt.takeover_timeout;
            while ctx.control.is_held(&key) {
                if Instant::now() > deadline {
                    return Err(Refused {
                        code: reason::SERVER_UNAVAILABLE,
                        why: "the live session did not let go".into(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let (takeover_tx, takeovers) = mpsc::unbounded_channel();
        ctx.control.hold(&key, conn.id, takeover_tx);
        // A delayed will of this session's last connection is not published: it is back.
        ctx.control.cancel_will(&key);
        let granted = if connect.version == Version::V5 {
            u64::from(connect.session_expiry)
        } else {
            u64::MAX
        };
        let max = ctx.config.mqtt.max_session_expiry;
        let session_expiry = if connect.clean_start
            && (connect.version == Version::V3 || connect.session_expiry == 0)
        {
            Duration::ZERO
        } else {
            Duration::from_secs(granted.min(max.as_secs()))
        };
        let ctx_is_embedded = ctx.engine.kind() == crate::engine::EngineKind::Embedded;
        let inflight_max = connect
            .receive_max
            .unwrap_or(u16::MAX)
            .min(ctx.config.mqtt.max_inflight)
            .max(1);
        let mut session = Session {
            ctx,
            conn,
            channel,
            principal,
            version: connect.version,
            client_id,
            clean: session_expiry.is_zero(),
            session_expiry,
            will: connect.will,
            out,
            qos0_queued,
            subs: HashMap::new(),
            consumers: StreamMap::new(),
            inflight: HashMap::new(),
            inbound_qos2: HashSet::new(),
            max_qos: if ctx_is_embedded { 2 } else { 1 },
            retained,
            next_packet_id: 1,
            inflight_max,
            aliases: HashMap::new(),
            parked: VecDeque::new(),
            retry_at: None,
            takeover_key: key,
            takeovers,
            auth_method: connect.auth_method.clone(),
        };
        if connect.clean_start {
            session.discard_stored().await;
        }
        let mut present = false;
        if !session.clean {
            for level in [0u8, 1] {
                let queue = session.queue_name(level);
                if session.channel.queue_info(&queue).await.is_ok() {
                    present = true;
                    session.resume_subscriptions(level).await;
                    session.open_queue(level).await.map_err(|e| Refused {
                        code: reason::SERVER_UNAVAILABLE,
                        why: e.to_string(),
                    })?;
                }
            }
        }
        let max_packet = session.max_packet_size();
        let connack = Outbound::ConnAck {
            code: reason::SUCCESS,
            session_present: present,
            receive_max: session.ctx.config.mqtt.receive_maximum,
            max_packet_size: max_packet,
            assigned_client_id: assigned,
            max_qos: session.max_qos,
            auth_method: session.auth_method.clone(),
        };
        Ok((session, connack))
    }

    pub fn max_packet_size(&self) -> u32 {
        (self.ctx.config.limits.max_message_bytes.as_u64() + 64 * 1024).min(u64::from(u32::MAX))
            as u32
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.principal.expires_at
    }

    fn send(&self, p: Outbound) {
        let _ = self.out.send(p);
    }

    fn queue_name(&self, level: u8) -> String {
        session_queue(
            self.principal.shared_subject(),
            &self.client_id,
            if level == 0 { "qos0" } else { "qos1" },
        )
    }

    /// A resumed session reads its subscriptions back from its queue's bindings and checks each
    /// against the current read scopes: what they no longer allow is unbound (DESIGN.md §3).
    /// QoS 2 grants come back as 1 (the binding does not say which).
    async fn resume_subscriptions(&mut self, level: u8) {
        let queue = self.queue_name(level);
        let exchange = self.ctx.config.mqtt.exchange.clone();
        let mapping = self.ctx.config.mqtt.topic_mapping;
        let Ok(bindings) = self.channel.list_bindings(&queue).await else {
            return;
        };
        for b in bindings.into_iter().filter(|b| b.exchange == exchange) {
            if self
                .principal
                .permissions
                .can_read(&exchange, &b.routing_key)
            {
                let filter = topic::binding_to_filter(&b.routing_key, mapping);
                let opts = SubOpts {
                    granted: level,
                    no_local: false,
                    retain_as_published: false,
                    id: None,
                };
                self.subs.insert(filter, opts);
            } else {
                tracing::info!(client = %self.client_id, binding = %b.routing_key, "stored subscription no longer allowed; removed");
                metrics::refusal(PROTOCOL, "forbidden");
                let _ = self
                    .channel
                    .unbind_queue(&queue, &exchange, &b.routing_key, &b.arguments)
                    .await;
            }
        }
    }

    /// Clean start: whatever a previous session left goes.
    async fn discard_stored(&self) {
        for level in [0u8, 1] {
            let _ = self
                .channel
                .delete_queue(&self.queue_name(level), Default::default())
                .await;
        }
    }

    /// Declares (if needed) and consumes the queue of `level`.
    async fn open_queue(&mut self, level: u8) -> Result<Declared, EngineError> {
        let queue = self.queue_name(level);
        let spec = if self.clean {
            QueueSpec {
                durable: false,
                exclusive: true,
                auto_delete: false,
                arguments: FieldTable::new(),
            }
        } else {
            let mut args = FieldTable::new();
            let ms = self
                .session_expiry
                .as_millis()
                .clamp(1, u128::from(u32::MAX)) as i64;
            args.insert("x-expires".into(), FieldValue::I64(ms));
            QueueSpec {
                durable: true,
                exclusive: false,
                auto_delete: false,
                arguments: args,
            }
        };
        let declared = self.channel.declare_queue(&queue, &spec).await?.declared;
        if !self.consumers.contains_key(&level.to_string()) {
            let ack = if level == 0 {
                AckMode::Auto
            } else {
                AckMode::Manual {
                    prefetch: self.inflight_max,
                }
            };
            let options = ConsumeOptions {
                consumer_tag: String::new(),
                ack,
                exclusive: true,
                arguments: FieldTable::new(),
            };
            let consumer = self.channel.consume(&queue, options).await?;
            self.consumers
                .insert(level.to_string(), Deliveries(consumer, false));
        }
        Ok(declared)
    }

    /// Handles one packet after CONNECT.
    pub async fn handle(&mut self, packet: Inbound) -> Outcome {
        match packet {
            Inbound::Publish(p) => self.publish(p).await,
            Inbound::PubAck(id) => {
                if let Some(Inflight::AtLeastOnce(Some(tag))) = self.inflight.remove(&id) {
                    let _ = self.channel.ack(tag, false).await;
                }
                Outcome::Continue
            }
            // Outbound QoS 2: the client has it; the engine may forget it, then PUBREL.
            Inbound::PubRec(id) => {
                if let Some(Inflight::Sent(tag)) = self.inflight.get(&id).copied() {
                    if let Some(tag) = tag {
                        let _ = self.channel.ack(tag, false).await;
                    }
                    self.inflight.insert(id, Inflight::Released);
                    self.send(Outbound::PubRel { packet_id: id });
                }
                Outcome::Continue
            }
            Inbound::PubComp(id) => {
                if let Some(Inflight::Released) = self.inflight.get(&id) {
                    self.inflight.remove(&id);
                }
                Outcome::Continue
            }
            // Inbound QoS 2: the packet id is free again; the message was published once.
            Inbound::PubRel(id) => {
                self.inbound_qos2.remove(&id);
                self.send(Outbound::PubComp { packet_id: id });
                Outcome::Continue
            }
            Inbound::Subscribe { packet_id, filters } => {
                // Retain Handling: 0 always, 1 only for a subscription that is new, 2 never.
                let wanted: Vec<(String, bool)> = filters
                    .iter()
                    .map(|f| {
                        let new = !self.subs.contains_key(&f.filter);
                        let send = match f.retain_handling {
                            0 => true,
                            1 => new,
                            _ => false,
                        };
                        (f.filter.clone(), send)
                    })
                    .collect();
                let codes = self.subscribe(filters).await;
                if codes.contains(&reason::PROTOCOL_ERROR) {
                    return Outcome::Close(Some(reason::PROTOCOL_ERROR));
                }
                self.send(Outbound::SubAck {
                    packet_id,
                    codes: codes.clone(),
                });
                // Binding made, SUBACK sent: now the retained messages, then queued deliveries.
                for ((filter, send), code) in wanted.iter().zip(codes) {
                    // Shared subscriptions get no retained messages ([MQTT-4.8.2-5]).
                    if code <= 2 && *send && !filter.starts_with("$share/") {
                        self.send_retained(filter, code);
                    }
                }
                Outcome::Continue
            }
            Inbound::Unsubscribe { packet_id, filters } => {
                let count = filters.len();
                for f in filters {
                    self.unsubscribe(&f).await;
                }
                self.send(Outbound::UnsubAck { packet_id, count });
                Outcome::Continue
            }
            Inbound::PingReq => {
                self.send(Outbound::PingResp);
                Outcome::Continue
            }
            Inbound::Disconnect => Outcome::Disconnected,
            Inbound::Auth {
                reason: r,
                method,
                data,
            } => self.reauthenticate(r, method, data).await,
            Inbound::Connect(_) => {
                tracing::info!(client = %self.client_id, "second CONNECT: protocol error");
                Outcome::Close(Some(reason::PROTOCOL_ERROR))
            }
            Inbound::Unexpected(what) => {
                tracing::info!(client = %self.client_id, "unexpected packet: {what}");
                Outcome::Close(Some(reason::PROTOCOL_ERROR))
            }
        }
    }

    // ---------- re-authentication ----------

    /// MQTT 5 AUTH 0x19 with a fresh token (DESIGN.md §6): same subject and issuer, a later
    /// expiry; every subscription is checked again against the new scopes.
    async fn reauthenticate(
        &mut self,
        r: u8,
        method: Option<String>,
        data: Option<bytes::Bytes>,
    ) -> Outcome {
        if self.auth_method.is_none() || method != self.auth_method || r != 0x19 {
            return Outcome::Close(Some(reason::PROTOCOL_ERROR));
        }
        let token = data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or("");
        let fresh = match self.ctx.auth.authenticate(token).await {
            Ok(p) if p.subject == self.principal.subject && p.issuer == self.principal.issuer => p,
            Ok(_) => {
                tracing::info!(client = %self.client_id, "re-authentication with another subject or issuer");
                return Outcome::Close(Some(reason::NOT_AUTHORIZED));
            }
            Err(e) => {
                tracing::info!(client = %self.client_id, "re-authentication refused: {e}");
                return Outcome::Close(Some(reason::NOT_AUTHORIZED));
            }
        };
        let exchange = self.ctx.config.mqtt.exchange.clone();
        let mapping = self.ctx.config.mqtt.topic_mapping;
        let still_allowed = self.subs.keys().all(|filter| {
            let inner = filter
                .strip_prefix("$share/")
                .and_then(|rest| rest.split_once('/').map(|(_, f)| f))
                .unwrap_or(filter);
            filter_to_binding(inner, mapping)
                .is_ok_and(|b| fresh.permissions.can_read(&exchange, &b))
        });
        if !still_allowed {
            return Outcome::Close(Some(reason::NOT_AUTHORIZED));
        }
        self.principal = fresh;
        if let Some(method) = self.auth_method.clone() {
            self.send(Outbound::Auth { reason: 0, method });
        }
        Outcome::Continue
    }

    // ---------- inbound publish ----------

    async fn publish(&mut self, mut p: PublishIn) -> Outcome {
        if let Some(alias) = p.props.topic_alias {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Outcome::Close(Some(reason::TOPIC_ALIAS_INVALID));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(topic) => p.topic = topic.clone(),
                    None => return Outcome::Close(Some(reason::PROTOCOL_ERROR)),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if p.qos == 2 && self.max_qos < 2 && self.version == Version::V5 {
            // CONNACK said Maximum QoS 1.
            return Outcome::Close(Some(reason::QOS_NOT_SUPPORTED));
        }
        if p.qos == 2
            && let Some(id) = p.packet_id
            && self.inbound_qos2.contains(&id)
        {
            // A resend before PUBREL: already published once, acknowledge again only.
            self.send(Outbound::PubRec {
                packet_id: id,
                code: reason::SUCCESS,
            });
            return Outcome::Continue;
        }
        if p.qos > 0
            && self.parked.len() + self.inbound_qos2.len()
                >= usize::from(self.ctx.config.mqtt.receive_maximum)
        {
            // More unacknowledged QoS 1/2 publishes than the Receive Maximum we advertised.
            metrics::refusal(PROTOCOL, "receive_maximum_exceeded");
            return Outcome::Close(Some(reason::RECEIVE_MAXIMUM_EXCEEDED));
        }
        if !self.parked.is_empty() && p.qos > 0 {
            // Keep order: later publishes wait behind parked ones.
            self.parked.push_back(p);
            return Outcome::Continue;
        }
        self.publish_now(p, true).await
    }

    fn ack_publish(&self, p: &PublishIn, code: u8) {
        if let Some(id) = p.packet_id {
            match p.qos {
                1 => self.send(Outbound::PubAck {
                    packet_id: id,
                    code,
                }),
                2 => self.send(Outbound::PubRec {
                    packet_id: id,
                    code,
                }),
                _ => {}
            }
        }
    }

    async fn publish_now(&mut self, p: PublishIn, may_park: bool) -> Outcome {
        let exchange = self.ctx.config.mqtt.exchange.clone();
        let key = match topic_to_key(&p.topic, self.ctx.config.mqtt.topic_mapping) {
            Ok(k) => k,
            // [MQTT-3.3.2-2]: no wildcards in a topic name; an empty one is malformed too.
            Err(e @ (topic::TopicError::Wildcard | topic::TopicError::Empty)) => {
                tracing::info!(client = %self.client_id, topic = %p.topic, "invalid topic name: {e}");
                metrics::refusal(PROTOCOL, "topic_invalid");
                return Outcome::Close(Some(reason::TOPIC_NAME_INVALID));
            }
            // Valid MQTT that has no AMQP form: refused, the connection stays (v5 only can say so).
            Err(e) => {
                tracing::info!(client = %self.client_id, topic = %p.topic, "refused topic: {e}");
                metrics::refusal(PROTOCOL, "topic_invalid");
                if self.version == Version::V5 {
                    self.ack_publish(&p, reason::TOPIC_NAME_INVALID);
                    return Outcome::Continue;
                }
                return Outcome::Close(Some(reason::TOPIC_NAME_INVALID));
            }
        };
        if !self.principal.permissions.can_write(&exchange, &key) {
            metrics::refusal(PROTOCOL, "forbidden");
            // 3.1.1 has no way to say no: the publish is acknowledged and dropped.
            let code = if self.version == Version::V5 {
                reason::NOT_AUTHORIZED
            } else {
                reason::SUCCESS
            };
            self.ack_publish(&p, code);
            return Outcome::Continue;
        }
        if let Err(t) = self.ctx.flow.admit_publish(
            &self.conn.limits,
            self.principal.shared_subject(),
            p.payload.len(),
        ) {
            metrics::refusal(PROTOCOL, t.reason.as_str());
            if p.qos == 0 {
                return Outcome::Continue; // dropped and counted
            }
            if may_park {
                self.parked.push_back(p);
            } else {
                self.parked.push_front(p);
            }
            self.retry_at = Some(Instant::now() + t.retry_after);
            return Outcome::Continue;
        }
        let message = self.message_of(&p);
        let started = Instant::now();
        match self
            .channel
            .publish(&exchange, &key, message, PublishOptions::default())
            .await
        {
            Ok(_) => {
                metrics::message_in(PROTOCOL, started.elapsed());
                let code = if p.retain
                    && self
                        .retained
                        .set(&p.topic, p.payload.clone(), p.qos)
                        .is_err()
                {
                    metrics::refusal(PROTOCOL, "retained_full");
                    if self.version == Version::V5 {
                        reason::QUOTA_EXCEEDED
                    } else {
                        reason::SUCCESS
                    }
                } else {
                    reason::SUCCESS
                };
                if p.qos == 2
                    && self.max_qos == 2
                    && let Some(id) = p.packet_id
                {
                    self.inbound_qos2.insert(id);
                }
                self.ack_publish(&p, code);
                Outcome::Continue
            }
            Err(EngineError::Rejected(_)) if self.version == Version::V5 => {
                self.ack_publish(&p, reason::QUOTA_EXCEEDED);
                Outcome::Continue
            }
            Err(e) => {
                tracing::warn!(client = %self.client_id, error = %e, "publish not accepted; closing so the client resends");
                if self.version == Version::V5 && p.qos > 0 {
                    self.ack_publish(&p, reason::UNSPECIFIED);
                    return Outcome::Continue;
                }
                Outcome::Close(Some(reason::UNSPECIFIED))
            }
        }
    }

    /// The AMQP form of a PUBLISH: MQTT 5 properties mapped (DESIGN.md §3).
    fn message_of(&self, p: &PublishIn) -> Message {
        let mut m = Message::new(p.payload.clone());
        let props = &mut m.properties;
        props.delivery_mode = Some(if p.qos > 0 { 2 } else { 1 });
        for (k, v) in &p.props.user_properties {
            props.headers.insert(k.clone(), FieldValue::Str(v.clone()));
        }
        props
            .headers
            .insert(PUBLISH_QOS_HEADER.into(), FieldValue::U8(p.qos));
        props.headers.insert(
            ORIGIN_HEADER.into(),
            FieldValue::Str(self.takeover_key.clone()),
        );
        if p.retain {
            props
                .headers
                .insert(RETAIN_HEADER.into(), FieldValue::Bool(true));
        }
        props.headers.insert(
            SUBJECT_HEADER.into(),
            FieldValue::Str(self.principal.subject.to_string()),
        );
        props.content_type = p.props.content_type.clone();
        if let Some(data) = &p.props.correlation_data {
            match std::str::from_utf8(data) {
                Ok(s) if s.len() <= 255 => props.correlation_id = Some(s.to_owned()),
                _ => {
                    props
                        .headers
                        .insert(CORRELATION_HEADER.into(), FieldValue::Bytes(data.to_vec()));
                }
            }
        }
        props.reply_to = p
            .props
            .response_topic
            .as_deref()
            .and_then(|t| topic_to_key(t, self.ctx.config.mqtt.topic_mapping).ok());
        props.expiration = p
            .props
            .message_expiry
            .map(|secs| (u64::from(secs) * 1000).to_string());
        m
    }

    /// The MQTT 5 properties of a delivery.
    fn props_of(&self, d: &Delivery) -> PublishProps {
        if self.version != Version::V5 {
            return PublishProps::default();
        }
        let p = d.properties();
        let correlation_data = match p.headers.get(CORRELATION_HEADER) {
            Some(FieldValue::Bytes(b)) => Some(bytes::Bytes::from(b.clone())),
            _ => p.correlation_id.clone().map(bytes::Bytes::from),
        };
        PublishProps {
            content_type: p.content_type.clone(),
            correlation_data,
            response_topic: p
                .reply_to
                .as_deref()
                .and_then(|k| key_to_topic(k, self.ctx.config.mqtt.topic_mapping)),
            // Remaining expiry, rounded up so a live message never reads 0.
            message_expiry: d
                .expires_in
                .map(|left| left.as_secs_f64().ceil().max(1.0) as u32),
            user_properties: p
                .headers
                .iter()
                .filter(|(k, _)| !k.starts_with("x-mqtt-"))
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect(),
            topic_alias: None,
            payload_utf8: false,
            subscription_ids: Vec::new(),
        }
    }

    /// Tries the parked publishes again (their PUBACKs were withheld).
    pub async fn retry_parked(&mut self) -> Outcome {
        self.retry_at = None;
        while let Some(p) = self.parked.pop_front() {
            if let outcome @ (Outcome::Close(_) | Outcome::Disconnected) =
                self.publish_now(p, false).await
            {
                return outcome;
            }
            if self.retry_at.is_some() {
                break; // throttled again: it went back to the front
            }
        }
        Outcome::Continue
    }

    // ---------- subscribe ----------

    async fn subscribe(&mut self, filters: Vec<Filter>) -> Vec<u8> {
        let v5 = self.version == Version::V5;
        let fail = |code: u8| if v5 { code } else { 0x80 };
        let mut codes = Vec::with_capacity(filters.len());
        for f in filters {
            if let Some(rest) = f.filter.strip_prefix("$share/") {
                let code = self.subscribe_shared(&f, rest).await;
                codes.push(if code <= 2 { code } else { fail(code) });
                continue;
            }
            let binding = match filter_to_binding(&f.filter, self.ctx.config.mqtt.topic_mapping) {
                Ok(b) => b,
                Err(_) => {
                    codes.push(fail(reason::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            let exchange = self.ctx.config.mqtt.exchange.clone();
            if !self.principal.permissions.can_read(&exchange, &binding) {
                metrics::refusal(PROTOCOL, "forbidden");
                codes.push(fail(reason::NOT_AUTHORIZED));
                continue;
            }
            let granted = f.qos.min(self.max_qos);
            let level = granted.min(1);
            if let Some(old) = self.subs.get(&f.filter).map(|o| o.granted.min(1))
                && old != level
            {
                let _ = self
                    .channel
                    .unbind_queue(
                        &self.queue_name(old),
                        &exchange,
                        &binding,
                        &FieldTable::new(),
                    )
                    .await;
            }
            let bound = match self.open_queue(level).await {
                Ok(_) => {
                    self.channel
                        .bind_queue(
                            &self.queue_name(level),
                            &exchange,
                            &binding,
                            &FieldTable::new(),
                        )
                        .await
                }
                Err(e) => Err(e),
            };
            match bound {
                Ok(()) => {
                    let opts = SubOpts {
                        granted,
                        no_local: f.no_local,
                        retain_as_published: f.retain_as_published,
                        id: f.subscription_id,
                    };
                    self.subs.insert(f.filter, opts);
                    codes.push(granted);
                }
                Err(e) => {
                    tracing::warn!(client = %self.client_id, error = %e, "subscribe failed");
                    codes.push(fail(reason::IMPLEMENTATION_SPECIFIC));
                }
            }
        }
        codes
    }

    /// `$share/{group}/{filter}`: a durable queue per (group, filter) that every member
    /// consumes, competing (DESIGN.md §3). Returns the granted QoS or a v5 reason code.
    async fn subscribe_shared(&mut self, f: &Filter, rest: &str) -> u8 {
        if f.no_local {
            // [MQTT-3.8.3-4]: no-local on a shared subscription is a protocol error.
            return reason::PROTOCOL_ERROR;
        }
        let Some((group, inner)) = rest.split_once('/') else {
            return reason::TOPIC_FILTER_INVALID;
        };
        if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
            return reason::TOPIC_FILTER_INVALID;
        }
        let Ok(binding) = filter_to_binding(inner, self.ctx.config.mqtt.topic_mapping) else {
            return reason::TOPIC_FILTER_INVALID;
        };
        let exchange = self.ctx.config.mqtt.exchange.clone();
        if !self.principal.permissions.can_read(&exchange, &binding) {
            metrics::refusal(PROTOCOL, "forbidden");
            return reason::NOT_AUTHORIZED;
        }
        let queue = topic::shared_queue(group, inner);
        let mut args = FieldTable::new();
        let ms = self
            .ctx
            .config
            .mqtt
            .max_session_expiry
            .as_millis()
            .clamp(1, u128::from(u32::MAX)) as i64;
        args.insert("x-expires".into(), FieldValue::I64(ms));
        let spec = QueueSpec {
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: args,
        };
        let granted = f.qos.min(self.max_qos);
        let result = async {
            self.channel.declare_queue(&queue, &spec).await?;
            self.channel
                .bind_queue(&queue, &exchange, &binding, &FieldTable::new())
                .await?;
            if self.consumers.contains_key(&f.filter) {
                return Ok(());
            }
            let options = ConsumeOptions {
                consumer_tag: String::new(),
                ack: AckMode::Manual {
                    prefetch: self.inflight_max,
                },
                exclusive: false,
                arguments: FieldTable::new(),
            };
            let consumer = self.channel.consume(&queue, options).await?;
            self.consumers
                .insert(f.filter.clone(), Deliveries(consumer, false));
            Ok::<(), EngineError>(())
        }
        .await;
        match result {
            Ok(()) => {
                let opts = SubOpts {
                    granted,
                    no_local: false,
                    retain_as_published: false,
                    id: f.subscription_id,
                };
                self.subs.insert(f.filter.clone(), opts);
                granted
            }
            Err(e) => {
                tracing::warn!(client = %self.client_id, error = %e, "shared subscribe failed");
                reason::IMPLEMENTATION_SPECIFIC
            }
        }
    }

    async fn unsubscribe(&mut self, filter: &str) {
        if filter.starts_with("$share/") {
            // The group's queue stays for the other members; our unacked deliveries go back.
            self.consumers.remove(filter);
            self.subs.remove(filter);
            return;
        }
        let Ok(binding) = filter_to_binding(filter, self.ctx.config.mqtt.topic_mapping) else {
            return;
        };
        let exchange = self.ctx.config.mqtt.exchange.clone();
        self.subs.remove(filter);
        // A resumed session does not know the level: unbinding what is not bound is harmless.
        for level in [0u8, 1] {
            let _ = self
                .channel
                .unbind_queue(
                    &self.queue_name(level),
                    &exchange,
                    &binding,
                    &FieldTable::new(),
                )
                .await;
        }
    }

    // ---------- deliveries ----------

    fn next_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    /// A packet id for an outbound QoS 1/2 delivery, remembered until its acknowledgement.
    fn track(&mut self, qos: u8, tag: Option<u64>) -> u16 {
        let id = self.next_packet_id();
        let state = if qos == 2 {
            Inflight::Sent(tag)
        } else {
            Inflight::AtLeastOnce(tag)
        };
        self.inflight.insert(id, state);
        id
    }

    /// A delivery from the queue of `level`; `None` when the consumer ended.
    pub async fn deliver(&mut self, key: String, d: Option<Delivery>) -> Outcome {
        let Some(d) = d else {
            tracing::info!(client = %self.client_id, queue = %key, "a session queue went away");
            return Outcome::Close(Some(reason::IMPLEMENTATION_SPECIFIC));
        };
        let level = match key.as_str() {
            "0" => 0,
            "1" => 1,
            shared => return self.deliver_shared(shared, d).await,
        };
        let topic = key_to_topic(d.routing_key(), self.ctx.config.mqtt.topic_mapping);
        let visible = topic.as_deref().is_some_and(|t| {
            // `$`-topics reach only filters that do not start with a wildcard; a resumed session
            // that does not know its filters lets them through.
            !t.starts_with('$')
                || self.subs.is_empty()
                || self.subs.keys().any(|f| topic::filter_matches(f, t))
        });
        let publish_qos = publish_qos_of(&d);
        let (Some(topic), true) = (topic, visible) else {
            metrics::refusal(PROTOCOL, "unmappable_topic");
            if level == 1 {
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        };
        // The subscriptions this queue serves that the message matched (none known for a
        // resumed session: the queue's level and no options then).
        let matched: Vec<SubOpts> = self
            .subs
            .iter()
            .filter(|(f, o)| (o.granted.min(1) == level) && topic::filter_matches(f, &topic))
            .map(|(_, o)| *o)
            .collect();
        let headers = &d.properties().headers;
        let own = headers.get(ORIGIN_HEADER).and_then(FieldValue::as_str)
            == Some(self.takeover_key.as_str());
        // No-local suppresses the copy only when every matching subscription asked for it.
        if own && !matched.is_empty() && matched.iter().all(|o| o.no_local) {
            if level == 1 {
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        }
        let retain = matches!(headers.get(RETAIN_HEADER), Some(FieldValue::Bool(true)))
            && matched.iter().any(|o| o.retain_as_published);
        let subscription_ids: Vec<u32> = matched.iter().filter_map(|o| o.id).collect();
        // Per copy: min(publish QoS, the highest QoS granted to a matching subscription).
        let cap = if level == 0 {
            0
        } else {
            matched.iter().map(|o| o.granted).max().unwrap_or(1)
        };
        let qos = publish_qos.min(cap);
        let packet_id = if qos >= 1 {
            Some(self.track(qos, Some(d.delivery_tag)))
        } else {
            if level == 1 {
                // A QoS 0 copy from the QoS 1 queue: settled as it is sent.
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            None
        };
        if qos == 0 {
            // A slow client's QoS 0 backlog is bounded: over it, deliveries are dropped and
            // counted (QoS 1/2 are bounded by credit instead).
            let limit = self.ctx.config.limits.outbound_buffer_messages;
            if self.qos0_queued.load(Ordering::Relaxed) >= limit {
                metrics::refusal(PROTOCOL, "qos0_dropped");
                return Outcome::Continue;
            }
            self.qos0_queued.fetch_add(1, Ordering::Relaxed);
        }
        let mut props = self.props_of(&d);
        if self.version == Version::V5 {
            props.subscription_ids = subscription_ids;
        }
        self.send(Outbound::Publish {
            topic,
            qos,
            retain,
            dup: false,
            packet_id,
            payload: d.body().clone(),
            props,
        });
        metrics::messages_out(PROTOCOL, 1);
        Outcome::Continue
    }

    /// A delivery from a shared subscription's queue: at most the granted QoS, no retained
    /// flag, its own subscription identifier.
    async fn deliver_shared(&mut self, filter: &str, d: Delivery) -> Outcome {
        let Some(opts) = self.subs.get(filter).copied() else {
            let _ = self.channel.nack(d.delivery_tag, false, true).await;
            return Outcome::Continue;
        };
        let Some(topic) = key_to_topic(d.routing_key(), self.ctx.config.mqtt.topic_mapping) else {
            metrics::refusal(PROTOCOL, "unmappable_topic");
            let _ = self.channel.ack(d.delivery_tag, false).await;
            return Outcome::Continue;
        };
        let publish_qos = publish_qos_of(&d);
        let qos = publish_qos.min(opts.granted);
        let packet_id = if qos >= 1 {
            Some(self.track(qos, Some(d.delivery_tag)))
        } else {
            let _ = self.channel.ack(d.delivery_tag, false).await;
            None
        };
        let mut props = self.props_of(&d);
        if self.version == Version::V5 {
            props.subscription_ids = opts.id.into_iter().collect();
        }
        self.send(Outbound::Publish {
            topic,
            qos,
            retain: false,
            dup: false,
            packet_id,
            payload: d.body().clone(),
            props,
        });
        metrics::messages_out(PROTOCOL, 1);
        Outcome::Continue
    }

    /// Sends the retained messages matching a new subscription, RETAIN=1, at most `granted`.
    fn send_retained(&mut self, filter: &str, granted: u8) {
        for (topic, m) in self.retained.matching(filter) {
            let qos = m.qos.min(granted);
            let packet_id = (qos >= 1).then(|| self.track(qos, None));
            self.send(Outbound::Publish {
                topic,
                qos,
                retain: true,
                dup: false,
                packet_id,
                payload: m.payload,
                props: PublishProps::default(),
            });
            metrics::messages_out(PROTOCOL, 1);
        }
    }

    /// Another connection of the same subject and client id took the session over.
    pub fn taken_over(&mut self) -> Outcome {
        self.will = None;
        Outcome::Close(Some(reason::SESSION_TAKEN_OVER))
    }

    /// The connection ended: publish the will unless the client said DISCONNECT, release the
    /// session. Queues of a clean session go with the channel.
    pub async fn end(&mut self, graceful: bool) {
        if !graceful && let Some(will) = self.will.take() {
            self.publish_will(will).await;
        }
        self.consumers = StreamMap::new();
        self.ctx.control.release(&self.takeover_key, self.conn.id);
        if self.clean {
            self.discard_stored().await;
        }
    }

    /// The will goes out now, or (MQTT 5) after min(will delay, session expiry) unless the
    /// session connects again first (DESIGN.md §3). Checked against the scopes like a publish.
    async fn publish_will(&mut self, will: Will) {
        let exchange = self.ctx.config.mqtt.exchange.clone();
        let Ok(key) = topic_to_key(&will.topic, self.ctx.config.mqtt.topic_mapping) else {
            return;
        };
        if !self.principal.permissions.can_write(&exchange, &key) {
            metrics::refusal(PROTOCOL, "forbidden");
            return;
        }
        let p = PublishIn {
            topic: will.topic.clone(),
            qos: will.qos,
            retain: will.retain,
            packet_id: None,
            payload: will.payload.clone(),
            props: PublishProps::default(),
        };
        let message = self.message_of(&p);
        let delay = Duration::from_secs(u64::from(will.delay)).min(self.session_expiry);
        let engine = self.ctx.engine.clone();
        let retained = self.retained.clone();
        let publish = async move {
            let Ok(channel) = engine.open_channel("mqtt-will").await else {
                return;
            };
            if channel
                .publish(&exchange, &key, message, PublishOptions::default())
                .await
                .is_ok()
                && will.retain
            {
                let _ = retained.set(&will.topic, will.payload, will.qos);
            }
        };
        if delay.is_zero() || self.version == Version::V3 {
            publish.await;
            return;
        }
        let control = self.ctx.control.clone();
        let session = self.takeover_key.clone();
        let cancelled = control.delay_will(&session);
        tokio::spawn(async move {
            tokio::select! {
                _ = cancelled.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    control.will_done(&session);
                    publish.await;
                }
            }
        });
    }
}
