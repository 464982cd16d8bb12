//! One WebSocket client's session (DESIGN.md §4): its principal, its subscriptions with their
//! per-sub delivery tags, and every op. It never sees the socket: requests come in parsed,
//! deliveries come from its consumers, frames go to the [`SendQueue`] buffer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio_stream::StreamMap;

mod deliver;
mod publish;
mod subscribe;

use super::close::CloseReason;
use super::frames::{self, AckKind, Envelope, OverflowKind, Request};
use crate::auth::Principal;
use crate::codes::Code;
use crate::context::{Connection, Context, PublishRefused};
use crate::engine::names::{DEFAULT_EXCHANGE_ALIAS, validate_key};
use crate::engine::sessions::{Takeover, TakeoverReceiver, TakeoverSender};
use crate::engine::table::FieldTable;
use crate::engine::{
    AckMode, CancelReason, Channel, ConsumeOptions, Consumer, ConsumerEvent, EngineError, Message,
    PublishOptions,
};
use crate::flow::Stall;
use crate::json::{self};
use crate::metrics;
use crate::protocol::outbound::{Frame, Overflow, SendQueue, SlowConsumer};
use crate::protocol::subscription::{Refusal, Spec, Subscriber, Target, message_json};

const PROTOCOL: &str = "ws";
const DEFAULT_PREFETCH: u32 = 10;

/// What a request did to the connection.
pub enum Outcome {
    Continue,
    Close(CloseReason),
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
    /// Credit of a manual subscription.
    prefetch: Option<u32>,
    next_tag: u64,
    /// Sub tag → (engine tag, when delivered), for manual subscriptions.
    unacked: BTreeMap<u64, (u64, Instant)>,
}

/// A failed request: its code, message and, for throttling, when to retry.
struct RequestError {
    code: Code,
    message: String,
    retry_after_ms: Option<u64>,
}

impl RequestError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        RequestError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

impl From<EngineError> for RequestError {
    fn from(e: EngineError) -> Self {
        RequestError::new(Code::from(&e), e.to_string())
    }
}

impl From<Refusal> for RequestError {
    fn from(r: Refusal) -> Self {
        RequestError::new(r.code, r.message)
    }
}

impl From<PublishRefused> for RequestError {
    fn from(r: PublishRefused) -> Self {
        let mut refusal = RequestError::new(Code::from(&r), r.to_string());
        if let PublishRefused::Throttled(t) = r {
            refusal.retry_after_ms = Some((t.retry_after.as_millis() as u64).max(1));
        }
        refusal
    }
}

impl From<json::JsonError> for RequestError {
    fn from(e: json::JsonError) -> Self {
        RequestError::new(Code::from(&e), e.to_string())
    }
}

pub struct WsSession {
    ctx: Context,
    conn: Arc<Connection>,
    channel: Arc<dyn Channel>,
    principal: Principal,
    out: Arc<SendQueue>,
    /// Boxed: a map's first allocation has room for four entries, and an idle browser with
    /// one subscription should not hold three empty `Sub`s (docs/bench.md, idle `/ws`).
    subs: HashMap<Arc<str>, Box<Sub>>,
    /// Polled by the connection loop; keyed like `subs`.
    pub consumers: StreamMap<Arc<str>, Consumer>,
    next_sub: u64,
    takeover_tx: TakeoverSender,
    pub takeovers: TakeoverReceiver,
    /// Set while the connection is paced: its publishes park until it is over (DESIGN.md §7).
    pub stall: Option<Stall>,
    /// Publishes parked while paced, in arrival order, with their frames' sizes.
    parked: VecDeque<(Envelope, usize)>,
    parked_bytes: usize,
    /// Its entry among the connections operators see.
    pub registered: Option<crate::context::Registered>,
}

impl WsSession {
    pub fn new(
        ctx: Context,
        conn: Arc<Connection>,
        channel: Arc<dyn Channel>,
        principal: Principal,
        out: Arc<SendQueue>,
    ) -> Self {
        let (takeover_tx, takeovers) = crate::engine::sessions::takeover_channel();
        WsSession {
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
            stall: None,
            parked: VecDeque::new(),
            parked_bytes: 0,
            registered: None,
        }
    }

    /// Whether the socket may be read: not while parked publishes hold
    /// `limits.max_pending_in` bytes.
    pub fn may_read(&self) -> bool {
        (self.parked_bytes as u64) < self.ctx.config.limits.max_pending_in.as_u64()
    }

    /// Handles one request of `size` bytes: a publish while the connection is paced waits
    /// (acks, pings, `auth` and the rest are answered at once).
    pub async fn request(&mut self, env: Envelope, size: usize) -> Outcome {
        if self.stall.is_some() && matches!(env.request, Request::Publish(_)) {
            self.parked_bytes += size;
            self.parked.push_back((env, size));
            return Outcome::Continue;
        }
        self.handle(env).await
    }

    /// The connection's stall is over: the parked publishes go on, until one paces again.
    pub async fn unstall(&mut self) -> Outcome {
        if let Some(stall) = self.stall.take() {
            metrics::paced(PROTOCOL, stall.elapsed());
        }
        while self.stall.is_none()
            && let Some((env, size)) = self.parked.pop_front()
        {
            self.parked_bytes -= size;
            if let outcome @ Outcome::Close(_) = self.handle(env).await {
                return outcome;
            }
            tokio::task::consume_budget().await;
        }
        Outcome::Continue
    }

    /// The engine channel, for the acks that follow their frame's write.
    pub fn channel(&self) -> &Arc<dyn Channel> {
        &self.channel
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.principal.expires_at()
    }

    /// Registers the connection for operators (`/v1/connections`).
    pub fn register(&mut self) {
        self.registered = Some(self.ctx.registry.register(
            self.conn.id,
            crate::context::About {
                protocol: crate::context::Protocol::Ws,
                transport: crate::context::Transport::WebSocket,
                remote: self.conn.remote,
                subject: self.principal.subject.clone(),
                client_id: None,
                buffer: Some(self.out.pressure().clone()),
                stats: self.conn.stats.clone(),
            },
            self.principal.expires_at(),
        ));
    }

    /// Tells operators how many deliveries await this client's acks, and returns when the
    /// oldest of them times out (`ws.ack_timeout`): one walk over the subscriptions, made each
    /// turn of the connection's loop. Tags are given in delivery order, so a subscription's
    /// first unacked delivery is its oldest.
    pub fn note_in_flight(&self) -> Option<Instant> {
        let (mut n, mut oldest) = (0, None::<Instant>);
        for s in self.subs.values() {
            n += s.unacked.len();
            if let Some((_, (_, at))) = s.unacked.first_key_value() {
                oldest = Some(oldest.map_or(*at, |o| o.min(*at)));
            }
        }
        self.conn.stats.set_in_flight(n);
        oldest.and_then(|at| at.checked_add(self.ctx.config.ws.ack_timeout))
    }

    /// What operators see of the subscriptions.
    fn show_subscriptions(&self) {
        let Some(registered) = &self.registered else {
            return;
        };
        let consumed = crate::protocol::subscription::queue_names(&self.consumers);
        let views = self
            .subs
            .iter()
            .map(|(id, s)| {
                let binding = s.target.binding();
                crate::context::SubscriptionView {
                    queue: match consumed.get(&**id) {
                        Some(name) => name.clone(),
                        None => s.target.queue().into(),
                    },
                    exchange: binding.map(|(e, _)| e.into()),
                    pattern: binding.map(|(_, k)| k.into()),
                    ack: if s.mode == Mode::Manual {
                        "manual"
                    } else {
                        "auto"
                    },
                    prefetch: s.prefetch,
                }
            })
            .collect();
        registered.set_subscriptions(views);
    }

    fn reply(&self, text: String) {
        self.out.push(Frame::control(text));
    }

    fn send_error(&self, id: &Value, op: &str, r: RequestError) {
        metrics::refusal(PROTOCOL, r.code.as_str());
        self.reply(frames::error(
            id,
            &Value::String(op.to_owned()),
            r.code,
            &r.message,
            r.retry_after_ms,
        ));
    }

    /// Handles one request now.
    async fn handle(&mut self, env: Envelope) -> Outcome {
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
                self.send_error(&id, op, r);
                Outcome::Continue
            }
        }
    }

    // ---------- auth refresh ----------

    async fn refresh(&mut self, id: &Value, token: &str) -> Result<Outcome, RequestError> {
        let fresh = self
            .ctx
            .auth
            .authenticate(token)
            .await
            .map_err(|e| RequestError::new(Code::Unauthorized, e.to_string()))?;
        if fresh.subject != self.principal.subject || fresh.issuer != self.principal.issuer {
            return Err(RequestError::new(
                Code::Unauthorized,
                "a refreshed token must keep the subject and issuer of the connection",
            ));
        }
        self.principal = fresh;
        if let Some(r) = &self.registered {
            r.set_expires_at(self.principal.expires_at());
        }
        if !id.is_null() {
            self.reply(frames::auth_ok(
                id,
                &self.principal.subject,
                self.principal.expires_at(),
            ));
        }
        // What the new scopes no longer allow ends now.
        let forbidden: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| !s.target.allowed(&self.principal))
            .map(|(k, _)| k.clone())
            .collect();
        for sub in forbidden {
            self.cancel(&sub, "forbidden").await;
        }
        Ok(Outcome::Continue)
    }

    /// The connection is going: release holds and delete private queues (the channel's close
    /// would too; doing it here keeps the session registry exact).
    pub async fn close(&mut self) {
        // Publishes read while paced go out before the subscriptions end, still paced: the
        // client loses nothing the gateway read.
        while let Some((env, size)) = self.parked.pop_front() {
            self.parked_bytes -= size;
            if let Some(stall) = self.stall.take() {
                stall.released().await;
                metrics::paced(PROTOCOL, stall.elapsed());
            }
            let _ = self.handle(env).await;
        }
        self.stall = None;
        let subs: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        for sub in subs {
            self.end(&sub, false).await;
        }
    }
}
