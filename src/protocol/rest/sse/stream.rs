//! One event stream: the task that takes its consumer's deliveries into the outbound buffer
//! (paced and bounded as a WebSocket connection's), the response body that writes the buffer
//! out as events, and a durable stream's resume from `Last-Event-ID`.
//!
//! A durable stream holds what it sent unacknowledged — an event written is not an event
//! received, and the client cannot ack over SSE. Its event ids are `{n}-{fingerprint}`: the
//! n-th delivery from the queue's head, and a hash of that message. The browser's reconnect
//! sends the last id it received; the new stream takes that many redeliveries from the head,
//! acknowledges up to the one with that fingerprint (looking further back when the head moved
//! meanwhile, e.g. a stale id after an earlier resume or a WebSocket consumer acking), and
//! delivers the rest. After `sse.durable_window` unacknowledged events the stream ends so the
//! browser reconnects and acknowledges them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{PROTOCOL, SUB};
use crate::auth::{Principal, expiry_sleep};
use crate::context::Context;
use crate::engine::sessions::{TakeoverReceiver, TakeoverSender};
use crate::engine::table::FieldTable;
use crate::engine::{
    AckMode, CancelReason, Channel, ConsumeOptions, Consumer, ConsumerEvent, Delivery, Owner,
};
use crate::flow::Admitted;
use crate::metrics;
use crate::protocol::fingerprint::Fingerprint;
use crate::protocol::outbound::{Closing, Frame, Next, Overflow, SendQueue};
use crate::protocol::subscription::{Subscriber, Target, message_json};

/// How long a resume waits for the next redelivery before it takes what came as the head.
const RESUME_QUIET: Duration = Duration::from_millis(300);
/// How often the stream checks that its client still takes what is written.
const WRITE_CHECK: Duration = Duration::from_secs(1);

/// Whether the connection takes the body's chunks: since when a chunk handed over waits for
/// the connection to ask for the next (hyper asks once it wrote the last), if one does.
#[derive(Default)]
pub struct Writing {
    base: std::sync::OnceLock<tokio::time::Instant>,
    /// Milliseconds after `base` (+1) since the last chunk was handed over; 0 while the body
    /// waits for frames.
    handed_at: std::sync::atomic::AtomicU64,
}

impl Writing {
    fn now(&self) -> u64 {
        let base = *self.base.get_or_init(tokio::time::Instant::now);
        base.elapsed().as_millis() as u64 + 1
    }

    fn handed(&self) {
        let now = self.now();
        self.handed_at
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn asked(&self) {
        self.handed_at
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a chunk has waited longer than `limit` for the connection to take it.
    fn stalled(&self, limit: Duration) -> bool {
        let at = self.handed_at.load(std::sync::atomic::Ordering::Relaxed);
        at != 0 && self.now().saturating_sub(at) > limit.as_millis() as u64
    }
}

/// How deliveries are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A private queue, consumed no-ack into the droppable part of the buffer.
    NoAck(Overflow),
    /// A named queue: acked once written, credit `ws.auto_ack_window`.
    Window,
    /// A durable subscription: held until a reconnect's `Last-Event-ID` names them.
    Held,
}

impl Mode {
    pub fn of(target: &Target, overflow: Option<Overflow>) -> Mode {
        match target {
            Target::Private { .. } => Mode::NoAck(overflow.unwrap_or(Overflow::DropOldest)),
            Target::Named { .. } => Mode::Window,
            Target::Durable { .. } => Mode::Held,
        }
    }

    pub fn consume_options(
        self,
        ctx: &Context,
        target: &Target,
        out: &SendQueue,
    ) -> ConsumeOptions {
        let ack = match self {
            Mode::NoAck(_) => AckMode::Auto,
            Mode::Window => AckMode::Manual {
                prefetch: ctx.config.ws.auto_ack_window,
            },
            Mode::Held => AckMode::Manual {
                prefetch: ctx.config.sse.durable_window,
            },
        };
        ConsumeOptions {
            consumer_tag: String::new(),
            ack,
            exclusive: target.exclusive(),
            arguments: FieldTable::new(),
            // Only no-ack deliveries wait in the droppable part of the buffer.
            pressure: matches!(self, Mode::NoAck(_)).then(|| out.pressure().clone()),
        }
    }
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client went away (the body was dropped).
    Gone,
    /// The client took nothing for `limits.write_timeout`.
    WriteStalled,
    SlowConsumer,
    TokenExpired,
    Shutdown,
    /// A durable stream holds its window: the browser reconnects to acknowledge it.
    WindowFull,
    /// Taken over by another stream or WebSocket, or its queue was deleted (`cancelled` sent).
    Cancelled,
    /// Closed by an administrator (`DELETE /v1/connections/{id}`).
    ClosedByAdmin,
    /// The engine ended the consumer without a reason (connection to the broker lost).
    EngineGone,
}

impl Closing for End {
    fn is_urgent(self) -> bool {
        matches!(self, End::Gone | End::SlowConsumer | End::WriteStalled)
    }

    fn frame(self) -> Option<(u16, &'static str)> {
        match self {
            End::SlowConsumer => Some((4008, "slow consumer: outbound buffer full")),
            End::TokenExpired => Some((4001, "token expired")),
            End::Shutdown => Some((1001, "gateway shutting down")),
            End::EngineGone => Some((1011, "engine unavailable")),
            End::ClosedByAdmin => Some((4010, "closed by an administrator")),
            End::Gone | End::WriteStalled | End::WindowFull | End::Cancelled => None,
        }
    }
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Gone => "client_closed",
            End::WriteStalled => "write_stalled",
            End::SlowConsumer => "slow_consumer",
            End::TokenExpired => "token_expired",
            End::Shutdown => "server_shutting_down",
            End::WindowFull => "window_full",
            End::Cancelled => "cancelled",
            End::EngineGone => "engine_unavailable",
            End::ClosedByAdmin => "closed_by_admin",
        }
    }
}

pub struct Stream {
    pub ctx: Context,
    pub conn: u64,
    pub channel: Arc<dyn Channel>,
    /// Owns the private queue; kept as long as the channel.
    pub _owner: Owner,
    pub principal: Principal,
    pub target: Target,
    pub mode: Mode,
    pub consumer: Consumer,
    pub out: Arc<SendQueue>,
    pub takeovers: TakeoverReceiver,
    /// The sender the session registry holds for a durable subscription.
    pub _takeover_tx: TakeoverSender,
    /// The stream's place under the connection limits.
    pub _admitted: Admitted,
    /// Cancelled when the response body is dropped: the client is gone.
    pub gone: CancellationToken,
    pub writing: Arc<Writing>,
    /// Its entry among the connections operators see.
    pub registered: crate::context::Registered,
    pub next_id: u64,
    /// Deliveries a durable stream sent and holds unacknowledged.
    pub held: u64,
}

/// The first thing a stream says: the reconnection delay, and that the subscription exists —
/// every message published after it arrives.
pub fn preamble(retry: Duration, queue: &str) -> String {
    let data = json!({"op": "subscribed", "sub": SUB, "queue": queue});
    format!(
        "retry: {}\nevent: subscribed\ndata: {data}\n\n",
        retry.as_millis()
    )
}

/// A message's fingerprint in a durable stream's event ids: the same in every build, so a
/// browser resumes with an id from the gateway before an upgrade.
fn fingerprint(d: &Delivery) -> u32 {
    let p = d.properties();
    let stamp = p.timestamp.map(u64::to_le_bytes);
    let f = Fingerprint::of_message(d)
        .with_opt(p.message_id.as_deref().map(str::as_bytes))
        .with_opt(p.correlation_id.as_deref().map(str::as_bytes))
        .with_opt(stamp.as_ref().map(|t| t.as_slice()));
    f.get() as u32
}

/// `{n}-{fingerprint}` as a durable stream writes it.
fn parse_durable_id(id: &str) -> Option<(u64, u32)> {
    let (n, fp) = id.trim().split_once('-')?;
    Some((n.parse().ok()?, u32::from_str_radix(fp, 16).ok()?))
}

impl Stream {
    pub async fn run(mut self, last_event_id: Option<String>) {
        metrics::connection_opened(PROTOCOL);
        let end = self.serve(last_event_id).await;
        metrics::connection_closed(PROTOCOL, end.as_str());
        tracing::debug!(reason = end.as_str(), "SSE stream ended");
        self.out.close(end);
        let subscriber = Subscriber {
            ctx: &self.ctx,
            channel: self.channel.as_ref(),
            principal: &self.principal,
            conn: self.conn,
        };
        // Unacknowledged (held) deliveries go back to the queue before anyone is told.
        subscriber.cancel(self.consumer).await;
        subscriber.end(&self.target, false).await;
    }

    async fn serve(&mut self, last_event_id: Option<String>) -> End {
        if self.mode == Mode::Held
            && let Some(id) = last_event_id.as_deref().and_then(parse_durable_id)
        {
            match self.resume(id).await {
                Ok(rest) => {
                    for d in rest {
                        if let Some(end) = self.deliver(d) {
                            return end;
                        }
                    }
                }
                Err(end) => return end,
            }
        }
        let mut keepalive = tokio::time::interval(self.ctx.config.sse.keepalive);
        keepalive.tick().await;
        let mut write_check = tokio::time::interval(WRITE_CHECK);
        let expiry = expiry_sleep(self.principal.expires_at(), self.ctx.config.auth.leeway);
        tokio::pin!(expiry);
        loop {
            // While the buffer paces publishers, deliveries wait in the engine's queue
            // (DESIGN.md §7), as on a WebSocket.
            let paused = self.out.pressure().paces();
            let end = tokio::select! {
                _ = self.gone.cancelled() => Some(End::Gone),
                why = crate::context::stop_signal(Some(&self.registered), &self.ctx.shutdown) => Some(match why {
                    crate::context::Stop::Shutdown => End::Shutdown,
                    crate::context::Stop::Admin => End::ClosedByAdmin,
                }),
                _ = &mut expiry => Some(End::TokenExpired),
                event = self.consumer.next(), if !paused => self.event(event),
                _ = self.out.pressure().resume(self.ctx.config.limits.pace_max_wait), if paused => None,
                Some(_) = self.takeovers.next() => Some(self.cancelled("taken_over")),
                _ = write_check.tick() => self
                    .writing
                    .stalled(self.ctx.config.limits.write_timeout)
                    .then_some(End::WriteStalled),
                _ = keepalive.tick() => {
                    self.out.push(Frame::control(": keepalive\n\n".into()));
                    None
                }
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    fn cancelled(&self, reason: &str) -> End {
        let data = json!({"op": "cancelled", "sub": SUB, "reason": reason});
        self.out.push(Frame::control(format!(
            "event: cancelled\ndata: {data}\n\n"
        )));
        End::Cancelled
    }

    fn event(&mut self, event: Option<ConsumerEvent>) -> Option<End> {
        match event {
            Some(ConsumerEvent::Delivery(d)) => self.deliver(d),
            Some(ConsumerEvent::Ended(Some(CancelReason::QueueDeleted))) => {
                Some(self.cancelled("deleted"))
            }
            Some(ConsumerEvent::Ended(_)) | None => Some(End::EngineGone),
        }
    }

    /// One delivery into the buffer as a `message` event.
    fn deliver(&mut self, d: Delivery) -> Option<End> {
        let seq = self.next_id;
        self.next_id += 1;
        let data = match message_json(SUB, seq, &d) {
            Ok(data) => data,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a delivery");
                return None;
            }
        };
        let id = match self.mode {
            Mode::Held => format!("{seq}-{:08x}", fingerprint(&d)),
            _ => seq.to_string(),
        };
        let text = format!("id: {id}\nevent: message\ndata: {data}\n\n");
        match self.mode {
            Mode::NoAck(overflow) => {
                if self.out.push_droppable(SUB.into(), text, overflow).is_err() {
                    metrics::refusal(PROTOCOL, "slow_consumer");
                    return Some(End::SlowConsumer);
                }
            }
            Mode::Window => self.out.push(Frame {
                text,
                droppable: None,
                ack_after_write: Some(d.delivery_tag),
                message: true,
            }),
            Mode::Held => {
                self.out.push(Frame {
                    text,
                    droppable: None,
                    ack_after_write: None,
                    message: true,
                });
                self.held += 1;
                if self.held >= u64::from(self.ctx.config.sse.durable_window) {
                    self.out.push(Frame::control(
                        ": window full: reconnect with Last-Event-ID to acknowledge\n\n".into(),
                    ));
                    return Some(End::WindowFull);
                }
            }
        }
        None
    }

    /// Takes the first `n` redeliveries, acknowledges those the browser received (up to the one
    /// whose fingerprint its id names) and returns the rest, to be delivered first.
    async fn resume(&mut self, (n, fp): (u64, u32)) -> Result<Vec<Delivery>, End> {
        let mut head = Vec::new();
        while (head.len() as u64) < n {
            match tokio::time::timeout(RESUME_QUIET, self.consumer.next()).await {
                Err(_) => break,
                Ok(Some(ConsumerEvent::Delivery(d))) => head.push(d),
                Ok(other) => return Err(self.event(other).unwrap_or(End::EngineGone)),
            }
        }
        let at = (n as usize).min(head.len());
        let received = head[..at]
            .iter()
            .rposition(|d| fingerprint(d) == fp)
            .map_or(0, |i| i + 1);
        if received > 0 {
            let last = head[received - 1].delivery_tag;
            if let Err(e) = self.channel.ack(last, true).await {
                tracing::warn!(error = %e, "SSE resume: acknowledging what the browser received failed");
                return Err(End::EngineGone);
            }
        }
        Ok(head.split_off(received))
    }
}

/// The response body: the buffer's frames as they come, `lagged` counts, a last `close`
/// event; a windowed delivery is acked once the next chunk is asked for (the previous one was
/// handed to the connection).
pub fn body(
    out: Arc<SendQueue>,
    channel: Arc<dyn Channel>,
    gone: CancellationToken,
    writing: Arc<Writing>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    struct State {
        out: Arc<SendQueue>,
        channel: Arc<dyn Channel>,
        _gone: tokio_util::sync::DropGuard,
        writing: Arc<Writing>,
        written_ack: Option<u64>,
    }
    let state = State {
        out,
        channel,
        _gone: gone.drop_guard(),
        writing,
        written_ack: None,
    };
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        st.writing.asked();
        if let Some(tag) = st.written_ack.take() {
            let _ = st.channel.ack(tag, false).await;
        }
        let chunk = match st.out.next().await {
            Next::Frame(f) => {
                if f.message {
                    metrics::messages_out(PROTOCOL, 1);
                }
                st.written_ack = f.ack_after_write;
                f.text
            }
            Next::Lagged(lagged) => lagged
                .iter()
                .map(|(sub, n)| {
                    let data = json!({"op": "lagged", "sub": sub.as_ref(), "dropped": n});
                    format!("event: lagged\ndata: {data}\n\n")
                })
                .collect(),
            Next::Closed(Some((code, reason))) => {
                let data = json!({"op": "close", "code": code, "reason": reason});
                return Some((
                    Ok(Bytes::from(format!("event: close\ndata: {data}\n\n"))),
                    None,
                ));
            }
            Next::Closed(None) => return None,
        };
        st.writing.handed();
        Some((Ok(Bytes::from(chunk)), Some(st)))
    })
}
