//! One MQTT client's session (DESIGN.md §3), mapped onto the engine: its queues
//! (`…qos0`, `…qos1`), subscriptions, in-flight QoS 1 deliveries and parked publishes. It
//! never sees the socket: packets come in as [`Inbound`], answers go out as [`Outbound`].

use crate::flow::Pressure;
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamMap;

mod connect;
mod deliver;
mod ending;
mod inflight;
mod publish;
mod resume;
mod stored;
mod subscribe;
mod subscriptions;
use inflight::{Inflight, InflightMap};
use subscriptions::{LastVerdict, Verdict};

pub use publish::Ack;

use super::close::CloseReason;
use super::codec::{
    Connect, Filter, Inbound, Outbound, PublishIn, PublishProps, TOPIC_ALIAS_MAX, Version, Will,
    encode_shared_publish,
};
use super::properties;
use super::topic::{self, TopicName, filter_to_binding, session_queue, topic_to_key};
use crate::auth::Principal;
use crate::context::{Connection, Context};
use crate::engine::retained::RetainedStore;
use crate::engine::sessions::TakeoverReceiver;
use crate::engine::table::{FieldTable, FieldValue};
use crate::engine::{
    AckMode, Channel, ConsumeOptions, Consumer, ConsumerEvent, Declared, Delivery, EngineError,
    Message, PublishOptions, QueueSpec, Settled,
};
use crate::metrics;

/// What most sessions never use, made at its first entry: an empty map inline is 40 to 56
/// bytes of every idle connection's session.
type Sparse<T> = Option<Box<T>>;

const PROTOCOL: &str = "mqtt";
/// The publish QoS travels with the message so deliveries never exceed it (DESIGN.md §3).
pub const PUBLISH_QOS_HEADER: &str = "x-mqtt-publish-qos";
/// The MQTT 5 Authentication Method that carries a JWT and allows refreshing it with AUTH.
pub const AUTH_METHOD: &str = "amqp-gateway.jwt";
/// The session (subject, client id) a message was published by, for no-local.
pub const ORIGIN_HEADER: &str = "x-mqtt-origin";
/// Set when the message was published with RETAIN, for retain-as-published.
pub const RETAIN_HEADER: &str = "x-mqtt-retain";
/// On a retained message queued for a new subscription (`Session::send_retained`): that
/// subscription's filter, and the routing key the message was retained under (the queue's own
/// name is the copy's routing key).
pub const RETAINED_FOR_HEADER: &str = "x-mqtt-retained-for";
pub const RETAINED_KEY_HEADER: &str = "x-mqtt-retained-key";

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
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
}

/// What handling a packet did to the connection.
pub enum Outcome {
    Continue,
    /// Close (an MQTT 5 client is told why first, when the gateway is the one closing).
    Close(CloseReason),
}

pub struct Session {
    ctx: Context,
    /// Its engine channel is the connection's own (`Connection::channel`), read from there:
    /// a second `Arc` of it here was 16 bytes of every session.
    conn: Arc<Connection>,
    principal: Principal,
    client: Client,
    life: Lifetime,
    /// Packets for the connection's writer, taken each time round its loop.
    out: VecDeque<Outbound>,
    subs: subscriptions::Subscriptions,
    /// Keyed `0`, `1` (the session queues' levels) or a shared filter; `Arc<str>` because the
    /// map hands out a clone of the key with every delivery.
    pub consumers: StreamMap<Arc<str>, Consumer>,
    outflow: Outflow,
    /// Inbound publishes: aliases, QoS 2 ids, confirms awaited, parked publishes.
    pub inflow: publish::Inflow,
    /// Set while the connection is paced: its publishes park until it is over (DESIGN.md §7).
    pub stall: Option<crate::flow::Stall>,
    pub takeovers: TakeoverReceiver,
    /// Its entry among the connections operators see (set once connected).
    pub registered: Option<crate::context::Registered>,
}

/// What the client's CONNECT said, as the gateway granted it; fixed for the connection except
/// the version's being read everywhere.
struct Client {
    version: Version,
    /// Shared with the connection's registry entry.
    id: Arc<str>,
    /// The keep-alive this connection is held to (× 1.5): the client's, or the Server Keep
    /// Alive the CONNACK told it.
    keep_alive: u16,
    /// The client authenticated with [`AUTH_METHOD`] (the only method a CONNECT may name):
    /// it may refresh with AUTH.
    enhanced_auth: bool,
    /// MQTT 5 Maximum Packet Size of the client: larger deliveries are dropped and counted.
    /// Never 0 (a protocol error the codec refuses), so the option is 4 bytes.
    max_packet: Option<NonZeroU32>,
    /// The client's MQTT 5 Topic Alias Maximum: how many outbound aliases it accepts.
    alias_max: u16,
    /// The Session Expiry Interval the CONNECT asked for (MQTT 5; 0 for 3.1.1).
    requested_expiry: u32,
    /// The session ends with the connection: its queues are exclusive, nothing is stored.
    /// (Here, in the bytes the fields above leave, not in [`Lifetime`], which it took past a
    /// word: 8 bytes of every session.)
    clean: bool,
}

/// How the session outlives (or not) this connection.
struct Lifetime {
    /// The session expiry in milliseconds (a stored session's `x-expires` is in them):
    /// a `Duration` is twice the size, in every session.
    expiry_ms: u64,
    /// Boxed: most clients have none, and inline it is 208 bytes of every session.
    will: Option<Box<Will>>,
    /// (subject, client id): what the takeover registry and the stored state are keyed by;
    /// shared with the takeover registry's entry.
    key: Arc<str>,
    /// This connection's place under `limits.max_connections(_per_subject)`; given back in
    /// [`Session::end`], before the session is released to a connection taking it over.
    admitted: Option<crate::flow::Admitted>,
}

impl Lifetime {
    fn expiry(&self) -> Duration {
        Duration::from_millis(self.expiry_ms)
    }

    fn set_expiry(&mut self, expiry: Duration) {
        self.expiry_ms = millis(expiry);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The consumer key of a session queue's level (`deliver` tells them apart by it), made once
/// and shared by every session: a key of its own was an allocation of every connection.
fn level_key(level: u8) -> &'static Arc<str> {
    static KEYS: std::sync::LazyLock<[Arc<str>; 2]> =
        std::sync::LazyLock::new(|| [Arc::from("0"), Arc::from("1")]);
    &KEYS[usize::from(level.min(1))]
}

/// Outbound deliveries in flight and what the writer holds.
struct Outflow {
    inflight: InflightMap,
    next_packet_id: u16,
    /// How many QoS 1/2 deliveries may be unacknowledged (the client's Receive Maximum, capped).
    inflight_max: u16,
    /// Outbound topic aliases of this connection: topic → alias, 1..=`Client::alias_max`;
    /// made at the first.
    aliases: Sparse<HashMap<String, u16>>,
    /// QoS 0 publishes queued for the writer: bounded by `limits.outbound_buffer_messages`
    /// and `_bytes`; the gauge publishers are paced by (DESIGN.md §7).
    qos0_out: Pressure,
}

/// A subscription's options (MQTT 5; defaults for 3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SubOpts {
    granted: u8,
    no_local: bool,
    retain_as_published: bool,
    /// Never 0 (a protocol error), so the option is 4 bytes: the options are 8, and a
    /// subscription (its filter beside them) 24, where 32 took every session 8 bytes more.
    id: Option<NonZeroU32>,
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
    arguments.insert("x-expires", FieldValue::I64(ms));
    QueueSpec {
        durable: true,
        exclusive: false,
        auto_delete: false,
        arguments,
    }
}

impl Session {
    /// The connection's engine channel, opened before the session was made
    /// ([`Session::connect`]); a `OnceLock` read, never cleared.
    fn channel(&self) -> &Arc<dyn Channel> {
        self.conn
            .opened_channel()
            .expect("a session's channel is opened before the session is made")
    }

    pub fn max_packet_size(&self) -> u32 {
        (self.ctx.config.limits.max_message_bytes.as_u64() + 64 * 1024).min(u64::from(u32::MAX))
            as u32
    }

    /// Seconds of silence after which (× 1.5) the connection is closed; 0 = never.
    pub fn keep_alive(&self) -> u16 {
        self.client.keep_alive
    }

    /// Whether the client was told the Receive Maximum (MQTT 5's CONNACK; 3.1.1 has none).
    pub fn receive_maximum_advertised(&self) -> bool {
        self.client.version == Version::V5
    }

    pub fn remote(&self) -> std::net::SocketAddr {
        self.conn.remote
    }

    /// The highest QoS the engine delivers with (its `max_mqtt_qos` capability, DESIGN.md
    /// §3): asked where a QoS 2 packet or a SUBSCRIBE needs it.
    fn max_qos(&self) -> u8 {
        self.ctx.engine.capabilities().max_mqtt_qos.min(2)
    }

    /// The engine's retained messages: asked of the engine where used (a subscribe, a
    /// retained publish, a will), not kept in every session.
    fn retained(&self) -> Arc<dyn RetainedStore> {
        self.ctx.engine.retained()
    }

    pub fn subject(&self) -> &Arc<str> {
        &self.principal.subject
    }

    pub fn client_id(&self) -> &Arc<str> {
        &self.client.id
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.principal.expires_at()
    }

    /// How long after the token's `exp` the connection may last.
    pub fn leeway(&self) -> Duration {
        self.ctx.config.auth.leeway
    }

    fn send(&mut self, p: Outbound) {
        self.out.push_back(p);
    }

    /// What the session queued for the client, in order.
    pub fn outbound(&mut self) -> &mut VecDeque<Outbound> {
        &mut self.out
    }

    /// What the session queued, with the gauge its QoS 0 PUBLISHes count in.
    pub fn outbound_and_gauge(&mut self) -> (&mut VecDeque<Outbound>, &Pressure) {
        (&mut self.out, &self.outflow.qos0_out)
    }

    fn queue_name(&self, level: u8) -> String {
        session_queue(
            self.principal.shared_subject(),
            &self.client.id,
            if level == 0 { "qos0" } else { "qos1" },
        )
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
            arguments.insert("x-max-length", max(limits.outbound_buffer_messages as u64));
            arguments.insert(
                "x-max-length-bytes",
                max(limits.outbound_buffer_bytes.as_u64()),
            );
        }
        let spec = if self.client.clean {
            QueueSpec {
                durable: false,
                exclusive: true,
                auto_delete: false,
                arguments,
            }
        } else {
            durable_expiring(arguments, self.life.expiry())
        };
        let declared = self
            .fenced(|| self.channel().declare_queue(&queue, &spec))
            .await?
            .declared;
        if !self.consumers.contains_key(&*level.to_string()) {
            let ack = if level == 0 {
                AckMode::Auto
            } else {
                AckMode::Manual {
                    prefetch: self.outflow.inflight_max,
                }
            };
            let options = ConsumeOptions {
                consumer_tag: String::new(),
                ack,
                exclusive: true,
                arguments: FieldTable::new(),
                pressure: (level == 0).then(|| self.outflow.qos0_out.clone()),
            };
            let consumer = self
                .fenced(|| self.channel().consume(&queue, options.clone()))
                .await?;
            self.consumers.insert(level_key(level).clone(), consumer);
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
        crate::engine::sessions::fenced(self.ctx.config.mqtt.takeover_timeout, attempt, || async {})
            .await
    }

    /// Handles one packet after CONNECT.
    pub async fn handle(&mut self, packet: Inbound) -> Outcome {
        match packet {
            // Boxed: inline, a retained publish's steps would be most of this future, which
            // is made for every PUBACK (a PUBLISH not retained takes `publish_plain`).
            Inbound::Publish(p) => Box::pin(self.publish(p)).await,
            // The connection settles PUBACKs itself, a run at a time; one that comes here
            // is settled alone.
            Inbound::PubAck(id) => {
                if let Some(settled) = self.pubacks([id]) {
                    let _ = settled.await;
                }
                Outcome::Continue
            }
            // Outbound QoS 2: the client has it; the engine may forget it, then PUBREL.
            Inbound::PubRec(id) => {
                if let Some(Inflight::Sent(tag)) = self.outflow.inflight.get(&id).copied() {
                    if let Some(tag) = tag {
                        let _ = self.channel().ack(tag, false).await;
                    }
                    self.outflow.inflight.insert(id, Inflight::Released);
                    self.send(Outbound::PubRel { packet_id: id });
                }
                Outcome::Continue
            }
            Inbound::PubComp(id) => {
                if let Some(Inflight::Released) = self.outflow.inflight.get(&id) {
                    self.outflow.inflight.remove(&id);
                }
                Outcome::Continue
            }
            // Inbound QoS 2: the packet id is free again; the message was published once.
            Inbound::PubRel(id) => {
                if let Some(q) = &mut self.inflow.qos2 {
                    q.remove(&id);
                }
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
                self.show_subscriptions();
                if codes.contains(&reason::PROTOCOL_ERROR) {
                    return Outcome::Close(CloseReason::ProtocolError);
                }
                self.send(Outbound::SubAck {
                    packet_id,
                    codes: codes.clone(),
                });
                // Binding made, SUBACK sent: now the retained messages.
                for ((filter, send), code) in wanted.iter().zip(codes) {
                    // Shared subscriptions get no retained messages ([MQTT-4.8.2-5]).
                    if code <= 2 && *send && !filter.starts_with("$share/") {
                        self.send_retained(filter, code).await;
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
                self.show_subscriptions();
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
                tracing::info!(client = %self.client.id, "second CONNECT: protocol error");
                Outcome::Close(CloseReason::ProtocolError)
            }
            Inbound::Unexpected(what) => {
                tracing::info!(client = %self.client.id, "unexpected packet: {what}");
                Outcome::Close(CloseReason::ProtocolError)
            }
        }
    }

    /// PUBACKs for `ids`, read together: their deliveries acked in one call, which the
    /// embedded engine settles under one lock of the queue, handing the credit they free on
    /// as one batch. Settled one by one, each PUBACK locked the queue and handed its one freed
    /// delivery over alone (docs/bench.md). The connection awaits the answer in place (see
    /// `connection::pubacked`). `None`: nothing to settle (ids not in flight, or deliveries
    /// that had no tag).
    pub fn pubacks(&mut self, ids: impl IntoIterator<Item = u16>) -> Option<Settled> {
        let tags: smallvec::SmallVec<[u64; 16]> = ids
            .into_iter()
            .filter_map(|id| self.outflow.inflight.take_acked(id).flatten())
            .collect();
        match tags.as_slice() {
            [] => None,
            [tag] => Some(self.channel().ack(*tag, false)),
            tags => Some(self.channel().ack_each(tags)),
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
        if !self.client.enhanced_auth || method.as_deref() != Some(AUTH_METHOD) || r != 0x19 {
            return Outcome::Close(CloseReason::ProtocolError);
        }
        let token = data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or("");
        let fresh = match self.ctx.auth.authenticate(token).await {
            Ok(p) if p.subject == self.principal.subject && p.issuer == self.principal.issuer => p,
            Ok(_) => {
                tracing::info!(client = %self.client.id, "re-authentication with another subject or issuer");
                return Outcome::Close(CloseReason::NotAuthorized);
            }
            Err(e) => {
                tracing::info!(client = %self.client.id, "re-authentication refused: {e}");
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
        if let Some(r) = &self.registered {
            r.set_expires_at(self.principal.expires_at());
        }
        if self.client.enhanced_auth {
            self.send(Outbound::Auth {
                reason: 0,
                method: AUTH_METHOD.to_owned(),
            });
        }
        Outcome::Continue
    }
}
