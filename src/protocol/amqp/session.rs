//! One AMQP connection's protocol state after the handshake: its channels, consumers,
//! confirms and parked publishes, and the frames it answers with (appended to `out`; the
//! connection loop writes them). Never sees a socket. Method families live beside it:
//! `topology` (exchange, queue), `publish` (content, the publish gate, confirms), `consume`
//! (consumers, deliveries, acks, get).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, access, channel, confirm, connection};
use amq_protocol::types::ShortString;
use bytes::BytesMut;
use futures_util::stream::FuturesOrdered;
use tokio_stream::StreamMap;

use super::consume::{Mode, Unacked};
use super::error::{
    CHANNEL_ERROR, COMMAND_INVALID, Fault, NOT_ALLOWED, NOT_IMPLEMENTED, Reply, UNEXPECTED_FRAME,
    ids,
};
use super::frame::{self, Frame};
use super::handshake::{Capabilities, Negotiated};
use super::publish::{Confirming, Content, Parked};
use crate::auth::Principal;
use crate::context::{Connection, Context, Registered};
use crate::engine::{Channel, Consumer};
use crate::flow::Admitted;

/// What the connection loop does after a frame or an event.
#[derive(Debug)]
pub enum Step {
    Continue,
    /// The client sent `connection.close`: answered, the connection ends.
    ClientClosed,
    /// A connection error: `connection.close` is sent, then close-ok awaited briefly.
    Close(Reply),
}

/// An open channel.
pub(super) struct Chan {
    pub engine: Arc<dyn Channel>,
    /// The last delivery tag handed out on the wire (deliveries and gets share it).
    pub last_tag: u64,
    /// Deliveries the client must still ack, in wire-tag order.
    pub unacked: VecDeque<Unacked>,
    /// `basic.qos` with `global = false`: the prefetch of consumers started after it.
    pub prefetch: u16,
    /// `basic.qos` with `global = true`: unacked deliveries shared by the channel's consumers.
    pub global_prefetch: u16,
    /// Its consumers and how each acknowledges.
    pub consumers: HashMap<Arc<str>, Mode>,
    /// In confirm mode: the sequence number of the next publish.
    pub next_confirm: Option<u64>,
    /// A `basic.publish` whose content is arriving.
    pub content: Option<Content>,
    /// The queue this channel declared last (AMQP's "current queue" for an empty name).
    pub last_queue: Option<String>,
}

pub struct Session {
    pub(super) ctx: Context,
    pub(super) conn: Arc<Connection>,
    pub(super) principal: Principal,
    pub(super) frame_max: usize,
    channel_max: u16,
    pub(super) caps: Capabilities,
    pub(super) channels: HashMap<u16, Chan>,
    /// Channels the gateway closed, waiting for close-ok: their other frames are dropped.
    closing: HashSet<u16>,
    pub consumers: StreamMap<(u16, Arc<str>), Consumer>,
    /// Consumers of channels at their global prefetch: not polled until acks come.
    pub(super) held: Vec<((u16, Arc<str>), Consumer)>,
    pub confirms: FuturesOrdered<Confirming>,
    /// Publishes waiting out a rate limit or the memory watermark, in arrival order.
    pub(super) parked: VecDeque<Parked>,
    pub(super) parked_bytes: u64,
    pub retry_at: Option<tokio::time::Instant>,
    /// Server-named and exclusive queues this connection declared: its own to bind, consume
    /// and delete (DESIGN.md §6).
    pub(super) owned: HashSet<String>,
    /// Frames to write.
    pub out: BytesMut,
    /// `connection.blocked` sent and not yet lifted.
    blocked: bool,
    pub registered: Option<Registered>,
    _admitted: Admitted,
}

impl Session {
    pub fn new(
        ctx: Context,
        conn: Arc<Connection>,
        n: Negotiated,
        transport: crate::context::Transport,
    ) -> Session {
        let registered = ctx.registry.register(
            conn.id,
            crate::context::About {
                protocol: crate::context::Protocol::Amqp,
                transport,
                remote: conn.remote,
                subject: n.principal.subject.clone(),
                client_id: n.name.map(Arc::from),
                buffer: None,
                stats: conn.stats.clone(),
            },
            n.principal.expires_at(),
        );
        Session {
            ctx,
            conn,
            principal: n.principal,
            frame_max: n.frame_max as usize,
            channel_max: n.channel_max,
            caps: n.capabilities,
            channels: HashMap::new(),
            closing: HashSet::new(),
            consumers: StreamMap::new(),
            held: Vec::new(),
            confirms: FuturesOrdered::new(),
            parked: VecDeque::new(),
            parked_bytes: 0,
            retry_at: None,
            owned: HashSet::new(),
            out: BytesMut::new(),
            blocked: false,
            registered: Some(registered),
            _admitted: n.admitted,
        }
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.principal.expires_at()
    }

    /// Whether the socket may be read: not while parked publishes fill `limits.max_pending_in`.
    pub fn may_read(&self) -> bool {
        self.parked_bytes < self.ctx.config.limits.max_pending_in.as_u64()
    }

    pub async fn handle(&mut self, frame: Frame) -> Step {
        let channel = match &frame {
            Frame::Heartbeat => return Step::Continue,
            Frame::Method(c, _) | Frame::Header(c, _) | Frame::Body(c, _) => *c,
        };
        if self.closing.contains(&channel) {
            self.while_closing(channel, frame);
            return Step::Continue;
        }
        let result = match frame {
            Frame::Method(0, class) => return self.connection_method(*class).await,
            Frame::Method(c, class) => self.method(c, *class).await,
            Frame::Header(c, header) => self.content_header(c, *header),
            Frame::Body(c, body) => self.content_body(c, body),
            Frame::Heartbeat => Ok(()),
        };
        self.apply(channel, result).await
    }

    /// A fault as AMQP answers it: a channel error closes channel `c`, a connection error
    /// the connection.
    async fn apply(&mut self, c: u16, result: Result<(), Fault>) -> Step {
        match result {
            Ok(()) => Step::Continue,
            Err(Fault::Channel(reply)) => {
                self.close_channel(c, reply).await;
                Step::Continue
            }
            Err(Fault::Connection(reply)) => Step::Close(reply),
        }
    }

    /// Parked publishes are due: retried in order.
    pub async fn retry_now(&mut self) -> Step {
        match self.retry_parked() {
            Ok(()) => Step::Continue,
            Err((c, fault)) => self.apply(c, Err(fault)).await,
        }
    }

    /// A method on channel 0.
    async fn connection_method(&mut self, class: AMQPClass) -> Step {
        let method = ids(&class);
        match class {
            AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                self.method_frame(
                    0,
                    connection_ok(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Step::ClientClosed
            }
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(u)) => {
                match self.update_secret(&u.new_secret).await {
                    Ok(()) => {
                        self.method_frame(
                            0,
                            connection_ok(connection::AMQPMethod::UpdateSecretOk(
                                connection::UpdateSecretOk {},
                            )),
                        );
                        Step::Continue
                    }
                    Err(why) => Step::Close(
                        Fault::connection(super::error::ACCESS_REFUSED, why, method)
                            .reply()
                            .clone(),
                    ),
                }
            }
            // Replies to what the gateway never sends, and everything else on channel 0.
            _ => Step::Close(
                Fault::connection(COMMAND_INVALID, "unexpected method on channel 0", method)
                    .reply()
                    .clone(),
            ),
        }
    }

    /// RabbitMQ's OAuth 2 refresh: a new token for the same subject and issuer replaces the
    /// old one (new expiry, new scopes).
    async fn update_secret(
        &mut self,
        secret: &amq_protocol::types::LongString,
    ) -> Result<(), String> {
        let token = std::str::from_utf8(secret.as_bytes()).map_err(|_| "the token is not UTF-8")?;
        let fresh = self
            .ctx
            .auth
            .authenticate(token)
            .await
            .map_err(|e| format!("update-secret refused: {e}"))?;
        if fresh.subject != self.principal.subject || fresh.issuer != self.principal.issuer {
            return Err(
                "update-secret refused: the new token names another subject or issuer".into(),
            );
        }
        if let Some(r) = &self.registered {
            r.set_expires_at(fresh.expires_at());
        }
        self.principal = fresh;
        Ok(())
    }

    async fn method(&mut self, c: u16, class: AMQPClass) -> Result<(), Fault> {
        let method = ids(&class);
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = class {
            return self.open_channel(c, method).await;
        }
        let Some(chan) = self.channels.get(&c) else {
            return Err(Fault::connection(
                CHANNEL_ERROR,
                format!("channel {c} is not open"),
                method,
            ));
        };
        if chan.content.is_some() {
            return Err(Fault::connection(
                UNEXPECTED_FRAME,
                format!("a method on channel {c} while its publish's content was expected"),
                method,
            ));
        }
        match class {
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                self.drop_channel(c).await;
                self.method_frame(
                    c,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) if f.active => {
                self.method_frame(
                    c,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: true,
                    })),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::Flow(_)) => Err(Fault::connection(
                NOT_IMPLEMENTED,
                "channel.flow active=false (the gateway paces by credit: use basic.qos)",
                method,
            )),
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.method_frame(
                    c,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(m) => self.exchange_method(c, m, method).await,
            AMQPClass::Queue(m) => self.queue_method(c, m, method).await,
            AMQPClass::Basic(m) => self.basic_method(c, m, method).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let chan = self.channels.get_mut(&c).expect("checked above");
                chan.next_confirm.get_or_insert(1);
                if !s.nowait {
                    self.method_frame(
                        c,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(_) => Err(Fault::connection(
                NOT_IMPLEMENTED,
                "transactions (tx.*) are not supported: use publisher confirms",
                method,
            )),
            _ => Err(Fault::connection(
                COMMAND_INVALID,
                "a method the server does not accept from clients",
                method,
            )),
        }
    }

    async fn open_channel(&mut self, c: u16, method: (u16, u16)) -> Result<(), Fault> {
        if c > self.channel_max {
            return Err(Fault::connection(
                NOT_ALLOWED,
                format!(
                    "channel {c} above the negotiated channel-max {}",
                    self.channel_max
                ),
                method,
            ));
        }
        if self.channels.contains_key(&c) {
            return Err(Fault::connection(
                CHANNEL_ERROR,
                format!("channel {c} is already open"),
                method,
            ));
        }
        let engine = self
            .conn
            .open_channel(&self.ctx.engine, c)
            .await
            .map_err(|e| Fault::engine(&e, method))?;
        self.channels.insert(
            c,
            Chan {
                engine,
                last_tag: 0,
                unacked: VecDeque::new(),
                prefetch: 0,
                global_prefetch: 0,
                consumers: HashMap::new(),
                next_confirm: None,
                content: None,
                last_queue: None,
            },
        );
        self.method_frame(
            c,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        );
        Ok(())
    }

    /// A channel error: the channel closes, its unacked deliveries go back to their queues,
    /// and the client is told with `channel.close`.
    async fn close_channel(&mut self, c: u16, reply: Reply) {
        tracing::debug!(remote = %self.conn.remote, channel = c, code = reply.code, "{}", reply.text);
        crate::metrics::refusal(super::PROTOCOL, "channel_error");
        self.drop_channel(c).await;
        self.closing.insert(c);
        self.method_frame(
            c,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: reply.code,
                reply_text: ShortString::from(reply.text.as_str()),
                class_id: reply.class_id,
                method_id: reply.method_id,
            })),
        );
    }

    /// Forgets channel `c`: its consumers stop and the engine channel closes (requeueing what
    /// it delivered and was not acked, deleting exclusive queues only the connection's close
    /// deletes).
    async fn drop_channel(&mut self, c: u16) {
        let Some(chan) = self.channels.remove(&c) else {
            return;
        };
        for tag in chan.consumers.keys() {
            self.consumers.remove(&(c, tag.clone()));
        }
        self.held.retain(|((ch, _), _)| *ch != c);
        self.parked.retain(|p| p.channel != c);
        self.parked_bytes = self.parked.iter().map(|p| p.bytes).sum();
        chan.engine.close().await;
        self.show_subscriptions();
    }

    /// Frames on a channel the gateway closed, before the client's close-ok.
    fn while_closing(&mut self, c: u16, frame: Frame) {
        let Frame::Method(_, class) = frame else {
            return;
        };
        match *class {
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                self.closing.remove(&c);
            }
            // Both sides closed at once: each answers the other.
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                self.closing.remove(&c);
                self.method_frame(
                    c,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
            }
            _ => {}
        }
    }

    /// Closes every channel (the connection is ending): unacked deliveries are requeued,
    /// exclusive queues deleted.
    pub async fn end(&mut self) {
        let open: Vec<u16> = self.channels.keys().copied().collect();
        for c in open {
            self.drop_channel(c).await;
        }
    }

    /// The engine's memory watermark changed: clients that asked are told (`connection.blocked`)
    /// and parked publishes are retried once it clears.
    pub fn publish_blocked(&mut self, blocked: bool) {
        if blocked == self.blocked {
            return;
        }
        self.blocked = blocked;
        if self.caps.connection_blocked {
            let method = if blocked {
                connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: ShortString::from("low on memory"),
                })
            } else {
                connection::AMQPMethod::Unblocked(connection::Unblocked {})
            };
            self.method_frame(0, connection_ok(method));
        }
        if !blocked && !self.parked.is_empty() {
            self.retry_at = Some(tokio::time::Instant::now());
        }
    }

    /// Tells operators how many deliveries await this client's acks.
    pub fn note_in_flight(&self) {
        let n = self.channels.values().map(|c| c.unacked.len()).sum();
        self.conn.stats.set_in_flight(n);
    }

    pub(super) fn method_frame(&mut self, c: u16, class: AMQPClass) {
        frame::method(&mut self.out, c, class);
    }

    pub(super) fn show_subscriptions(&self) {
        let Some(registered) = &self.registered else {
            return;
        };
        let all = self.consumers.iter().chain(self.held.iter());
        let views = all
            .filter_map(|((c, tag), consumer)| {
                let mode = self.channels.get(c)?.consumers.get(tag)?;
                Some(crate::context::SubscriptionView {
                    queue: consumer.queue_name(),
                    exchange: None,
                    pattern: None,
                    ack: if mode.no_ack { "auto" } else { "manual" },
                    // Zero is AMQP's "unlimited".
                    prefetch: (!mode.no_ack).then_some(u32::from(mode.prefetch)),
                })
            })
            .collect();
        registered.set_subscriptions(views);
    }
}

fn connection_ok(method: connection::AMQPMethod) -> AMQPClass {
    AMQPClass::Connection(method)
}
