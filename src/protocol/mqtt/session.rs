//! One MQTT client's session (DESIGN.md §3), mapped onto the engine: its queues
//! (`…qos0`, `…qos1`), subscriptions, in-flight QoS 1 deliveries and parked publishes. It
//! never sees the socket: packets come in as [`Inbound`], answers go out as [`Outbound`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamMap;

mod deliver;
mod ending;
mod publish;
mod stored;
mod subscribe;

use super::close::CloseReason;
use super::codec::{
    Connect, Filter, Inbound, Outbound, PublishIn, PublishProps, TOPIC_ALIAS_MAX, Version, Will,
};
use super::properties;
use super::topic::{self, filter_to_binding, key_to_topic, session_queue, topic_to_key};
use crate::auth::Principal;
use crate::context::{Connection, Context};
use crate::engine::control::Takeover;
use crate::engine::retained::RetainedStore;
use crate::engine::table::{FieldTable, FieldValue};
use crate::engine::{
    AckMode, Channel, ConsumeOptions, Consumer, ConsumerEvent, Declared, Delivery, EngineError,
    Message, PublishOptions, QueueSpec,
};
use crate::metrics;

const PROTOCOL: &str = "mqtt";
/// The publish QoS travels with the message so deliveries never exceed it (DESIGN.md §3).
pub const PUBLISH_QOS_HEADER: &str = "x-mqtt-publish-qos";
/// The MQTT 5 Authentication Method that carries a JWT and allows refreshing it with AUTH.
pub const AUTH_METHOD: &str = "amqp-gateway.jwt";
/// The session (subject, client id) a message was published by, for no-local.
pub const ORIGIN_HEADER: &str = "x-mqtt-origin";
/// Set when the message was published with RETAIN, for retain-as-published.
pub const RETAIN_HEADER: &str = "x-mqtt-retain";

/// MQTT 5 reason codes used here (3.1.1 answers are derived from them in the codec).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_CREDENTIALS: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
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
    /// Close (an MQTT 5 client is told why first, when the gateway is the one closing).
    Close(CloseReason),
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
    pub consumers: StreamMap<String, Consumer>,
    /// Outbound QoS 1/2 deliveries by packet id.
    inflight: HashMap<u16, Inflight>,
    /// The engine's `max_mqtt_qos` capability (DESIGN.md §3).
    max_qos: u8,
    retained: Arc<dyn RetainedStore>,
    next_packet_id: u16,
    inflight_max: u16,
    /// Inbound publishes: aliases, QoS 2 ids, confirms awaited, parked publishes.
    pub inflow: publish::Inflow,
    takeover_key: String,
    pub takeovers: mpsc::UnboundedReceiver<Takeover>,
    /// Set when the client authenticated with [`AUTH_METHOD`]: it may refresh with AUTH.
    auth_method: Option<String>,
    /// MQTT 5 Maximum Packet Size of the client: larger deliveries are dropped and counted.
    client_max_packet: Option<u32>,
    /// The keep-alive this connection is held to (× 1.5): the client's, or the Server Keep
    /// Alive the CONNACK told it.
    keep_alive: u16,
    /// The client's MQTT 5 Topic Alias Maximum: how many outbound aliases it accepts.
    alias_max: u16,
    /// Outbound topic aliases of this connection: topic → alias, 1..=`alias_max`.
    out_aliases: HashMap<String, u16>,
    /// The Session Expiry Interval the CONNECT asked for (MQTT 5; 0 for 3.1.1).
    requested_expiry: u32,
    /// This connection's place under `limits.max_connections(_per_subject)`; given back in
    /// [`Session::end`], before the session is released to a connection taking it over.
    admitted: Option<crate::flow::Admitted>,
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
fn publish_qos_of(m: &Message) -> u8 {
    match m
        .properties
        .headers
        .get(PUBLISH_QOS_HEADER)
        .and_then(FieldValue::as_i128)
    {
        Some(q) => q.clamp(0, 2) as u8,
        None if m.is_persistent() => 1,
        None => 0,
    }
}

/// A durable queue that outlives its connection by `expiry` (`x-expires`; at least 1 ms, at
/// most what the AMQP argument holds), with `arguments` besides.
fn durable_expiring(mut arguments: FieldTable, expiry: Duration) -> QueueSpec {
    let ms = expiry.as_millis().clamp(1, u128::from(u32::MAX)) as i64;
    arguments.insert("x-expires".into(), FieldValue::I64(ms));
    QueueSpec {
        durable: true,
        exclusive: false,
        auto_delete: false,
        arguments,
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
        // The old connection stores the session's state, then releases it: wait for that
        // (woken by the release); the session queues are the fence besides (`fenced`).
        let control = ctx.engine.control();
        if control.take_over(&key).await
            && !control
                .wait_released(&key, ctx.config.mqtt.takeover_timeout)
                .await
        {
            return Err(Refused {
                code: reason::SERVER_UNAVAILABLE,
                why: "the live session did not let go".into(),
            });
        }
        // After a takeover: the connection taken over gave its place back first.
        let admitted = ctx.flow.admission.admit(&subject).map_err(|full| Refused {
            code: reason::QUOTA_EXCEEDED,
            why: full.to_string(),
        })?;
        let (takeover_tx, takeovers) = mpsc::unbounded_channel();
        ctx.engine.control().hold(&key, conn.id, takeover_tx);
        // A delayed will of this session's last connection is not published: it is back.
        ctx.engine.control().cancel_will(&key).await;
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
        let capabilities = ctx.engine.capabilities();
        let retained = ctx.engine.retained();
        // Server Keep Alive ([MQTT-3.2.2-21]): a v5 client asking for more than the cap, or for
        // none while there is one, is told the cap and held to it. 3.1.1 cannot be told.
        let cap = u16::try_from(ctx.config.mqtt.max_keep_alive.as_secs()).unwrap_or(u16::MAX);
        let server_keep_alive = (connect.version == Version::V5
            && cap > 0
            && (connect.keep_alive == 0 || connect.keep_alive > cap))
            .then_some(cap);
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
            max_qos: capabilities.max_mqtt_qos.min(2),
            retained,
            next_packet_id: 1,
            inflight_max,
            inflow: publish::Inflow::default(),
            takeover_key: key,
            takeovers,
            auth_method: connect.auth_method.clone(),
            client_max_packet: connect.max_packet_size,
            keep_alive: server_keep_alive.unwrap_or(connect.keep_alive),
            alias_max: connect.topic_alias_max,
            out_aliases: HashMap::new(),
            requested_expiry: connect.session_expiry,
            admitted: Some(admitted),
        };
        let present = if connect.clean_start {
            session.discard_stored().await;
            false
        } else {
            session.resume().await.map_err(|e| Refused {
                code: reason::SERVER_UNAVAILABLE,
                why: e.to_string(),
            })?
        };
        // Written now so that a session without subscriptions is present next time too.
        session.save_stored().await;
        let max_packet = session.max_packet_size();
        // MQTT 5: said only when it differs from what the client asked for.
        let granted_expiry = u32::try_from(session.session_expiry.as_secs()).unwrap_or(u32::MAX);
        let session_expiry = (connect.version == Version::V5
            && granted_expiry != connect.session_expiry)
            .then_some(granted_expiry);
        let connack = Outbound::ConnAck {
            code: reason::SUCCESS,
            session_present: present,
            session_expiry,
            receive_max: session.ctx.config.mqtt.receive_maximum,
            max_packet_size: max_packet,
            assigned_client_id: assigned,
            max_qos: session.max_qos,
            auth_method: session.auth_method.clone(),
            server_keep_alive,
        };
        Ok((session, connack))
    }

    pub fn max_packet_size(&self) -> u32 {
        (self.ctx.config.limits.max_message_bytes.as_u64() + 64 * 1024).min(u64::from(u32::MAX))
            as u32
    }

    /// Seconds of silence after which (× 1.5) the connection is closed; 0 = never.
    pub fn keep_alive(&self) -> u16 {
        self.keep_alive
    }

    pub fn remote(&self) -> std::net::SocketAddr {
        self.conn.remote
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

    /// Clean Start 0: takes up the session stored under (subject, client id), if there is one,
    /// and returns Session Present. Its subscriptions are checked again against the current
    /// read scopes; what they no longer allow is unbound and counted (DESIGN.md §3).
    async fn resume(&mut self) -> Result<bool, EngineError> {
        let mut queues = Vec::new();
        for level in [0u8, 1] {
            if let Ok(info) = self.channel.queue_info(&self.queue_name(level)).await {
                queues.push((level, info));
            }
        }
        let stored = self.load_stored().await;
        if stored.is_none() && queues.is_empty() && !self.stored_exists().await {
            return Ok(false);
        }
        // A resumed session keeps its interval: its queues' `x-expires` cannot change.
        let kept = match &stored {
            Some(s) => Some(s.expiry_secs.saturating_mul(1000)),
            None => queues.iter().find_map(|(_, info)| {
                info.spec
                    .arguments
                    .get("x-expires")
                    .and_then(FieldValue::as_i128)
                    .and_then(|ms| u64::try_from(ms).ok())
            }),
        };
        if let Some(ms) = kept.filter(|ms| *ms > 0) {
            self.session_expiry = Duration::from_millis(ms);
            self.clean = false;
        }
        if self.clean {
            // Only a state queue of an unknown format was left: start afresh.
            self.discard_stored().await;
            return Ok(false);
        }
        match stored {
            Some(stored) => {
                self.inflow.qos2 = stored.inbound_qos2.into_iter().collect();
                for id in stored.released {
                    self.inflight.insert(id, Inflight::Released);
                }
                for sub in stored.subscriptions {
                    self.resume_subscription(sub).await;
                }
            }
            // The state was lost (a gateway that died before writing it): the bindings say
            // which filters there were, at their queue's level and without options.
            None => {
                for (level, _) in &queues {
                    self.resume_from_bindings(*level).await;
                }
            }
        }
        // Consumed again even when no subscription uses a queue any more: what it holds for
        // filters the session no longer has is acked and counted at delivery, not left behind.
        for (level, _) in queues {
            self.open_queue(level).await?;
        }
        Ok(true)
    }

    /// Whether `permissions` let this session read what `filter` (possibly shared) selects.
    fn may_read(&self, permissions: &crate::auth::Permissions, filter: &str) -> bool {
        let inner = filter
            .strip_prefix("$share/")
            .and_then(|rest| rest.split_once('/').map(|(_, f)| f))
            .unwrap_or(filter);
        filter_to_binding(inner, self.ctx.config.mqtt.topic_mapping)
            .is_ok_and(|b| permissions.can_read(&self.ctx.config.mqtt.exchange, &b))
    }

    /// One stored subscription taken up again (bound and consumed as at SUBSCRIBE, which is
    /// idempotent), or unbound when the scopes no longer allow it.
    async fn resume_subscription(&mut self, sub: stored::StoredSub) {
        if !self.may_read(&self.principal.permissions, &sub.filter) {
            tracing::info!(client = %self.client_id, filter = %sub.filter, "stored subscription no longer allowed; removed");
            metrics::refusal(PROTOCOL, "forbidden");
            if !sub.filter.starts_with("$share/")
                && let Ok(binding) =
                    filter_to_binding(&sub.filter, self.ctx.config.mqtt.topic_mapping)
            {
                let _ = self
                    .channel
                    .unbind_queue(
                        &self.queue_name(sub.qos.min(1)),
                        &self.ctx.config.mqtt.exchange,
                        &binding,
                        &FieldTable::new(),
                    )
                    .await;
            }
            return;
        }
        let code = self.subscribe(vec![sub.to_filter()]).await;
        if code.first().is_none_or(|c| *c > 2) {
            tracing::warn!(client = %self.client_id, filter = %sub.filter, "stored subscription could not be resumed");
        }
    }

    /// Sent right after CONNACK: PUBREL again for outbound QoS 2 messages released before the
    /// last connection ended ([MQTT-4.4.0-1]).
    pub fn after_connack(&self) {
        let mut released = self.released_ids();
        released.sort_unstable();
        for packet_id in released {
            self.send(Outbound::PubRel { packet_id });
        }
    }

    /// Outbound QoS 2 packet ids whose PUBREL was sent and whose PUBCOMP has not come.
    fn released_ids(&self) -> Vec<u16> {
        self.inflight
            .iter()
            .filter(|(_, s)| matches!(s, Inflight::Released))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The fallback when no stored state exists: filters read back from a queue's bindings,
    /// at that queue's level, without options. What the scopes no longer allow is unbound.
    async fn resume_from_bindings(&mut self, level: u8) {
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
        self.discard_state().await;
    }

    /// Declares (if needed) and consumes the queue of `level`.
    async fn open_queue(&mut self, level: u8) -> Result<Declared, EngineError> {
        let queue = self.queue_name(level);
        let mut arguments = FieldTable::new();
        if level == 0 {
            // QoS 0 may be dropped: its queue is bounded like the outbound buffer, oldest first,
            // so a subscriber that falls behind (or is away) never grows the engine's memory.
            let limits = &self.ctx.config.limits;
            let max = |n: u64| FieldValue::I64(n.min(i64::MAX as u64) as i64);
            arguments.insert(
                "x-max-length".into(),
                max(limits.outbound_buffer_messages as u64),
            );
            arguments.insert(
                "x-max-length-bytes".into(),
                max(limits.outbound_buffer_bytes.as_u64()),
            );
        }
        let spec = if self.clean {
            QueueSpec {
                durable: false,
                exclusive: true,
                auto_delete: false,
                arguments,
            }
        } else {
            durable_expiring(arguments, self.session_expiry)
        };
        let declared = self
            .fenced(|| self.channel.declare_queue(&queue, &spec))
            .await?
            .declared;
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
            let consumer = self
                .fenced(|| self.channel.consume(&queue, options.clone()))
                .await?;
            self.consumers.insert(level.to_string(), consumer);
        }
        Ok(declared)
    }

    /// A session queue still held by the connection being taken over (its exclusive consumer,
    /// or a clean session's exclusive queue) is waited for, within `mqtt.takeover_timeout`
    /// (the engine's takeover fence; the holder was already asked to let go at CONNECT).
    async fn fenced<T, F, Fut>(&self, attempt: F) -> Result<T, EngineError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, EngineError>>,
    {
        crate::engine::control::fenced(self.ctx.config.mqtt.takeover_timeout, attempt, || async {})
            .await
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
                self.inflow.qos2.remove(&id);
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
                self.save_stored().await;
                if codes.contains(&reason::PROTOCOL_ERROR) {
                    return Outcome::Close(CloseReason::ProtocolError);
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
                self.save_stored().await;
                self.send(Outbound::UnsubAck { packet_id, count });
                Outcome::Continue
            }
            Inbound::PingReq => {
                self.send(Outbound::PingResp);
                Outcome::Continue
            }
            Inbound::Disconnect {
                reason: r,
                session_expiry,
            } => self.disconnect(r, session_expiry).await,
            Inbound::Auth {
                reason: r,
                method,
                data,
            } => self.reauthenticate(r, method, data).await,
            Inbound::Connect(_) => {
                tracing::info!(client = %self.client_id, "second CONNECT: protocol error");
                Outcome::Close(CloseReason::ProtocolError)
            }
            Inbound::Unexpected(what) => {
                tracing::info!(client = %self.client_id, "unexpected packet: {what}");
                Outcome::Close(CloseReason::ProtocolError)
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
            return Outcome::Close(CloseReason::ProtocolError);
        }
        let token = data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or("");
        let fresh = match self.ctx.auth.authenticate(token).await {
            Ok(p) if p.subject == self.principal.subject && p.issuer == self.principal.issuer => p,
            Ok(_) => {
                tracing::info!(client = %self.client_id, "re-authentication with another subject or issuer");
                return Outcome::Close(CloseReason::NotAuthorized);
            }
            Err(e) => {
                tracing::info!(client = %self.client_id, "re-authentication refused: {e}");
                return Outcome::Close(CloseReason::NotAuthorized);
            }
        };
        let still_allowed = self
            .subs
            .keys()
            .all(|filter| self.may_read(&fresh.permissions, filter));
        if !still_allowed {
            return Outcome::Close(CloseReason::NotAuthorized);
        }
        self.principal = fresh;
        if let Some(method) = self.auth_method.clone() {
            self.send(Outbound::Auth { reason: 0, method });
        }
        Outcome::Continue
    }
}
