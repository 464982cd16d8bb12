//! One WebSocket connection: the loop that always reads (requests, acks and pings are handled
//! whatever the outbound side does) while it writes what the outbound buffer holds
//! ([`writer`](super::writer)), the auth phase, the token's expiry and shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use futures_util::future::{Either, OptionFuture};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;

use super::close::CloseReason;
use super::frames::{self, Request};
use super::session::{Outcome, WsSession};
use super::writer::{Writer, WriterEnd};
use crate::auth::Principal;
use crate::codes::Code;
use crate::context::{Connection, Context, Registered, Stop};
use crate::flow::{Admitted, BufferKind, Full};
use crate::metrics;
use crate::protocol::clock;
use crate::protocol::outbound::{Frame, Limits, SendQueue};

const PROTOCOL: &str = "ws";

/// Serves one WebSocket connection.
///
/// What the task holds for the connection's whole life is its future's state, so that state is
/// kept to what waiting needs (docs/bench.md, idle `/ws`). No `async fn` or block spans the
/// whole life: either would keep its arguments (the socket's halves, the principal) as state
/// after handing them on. Starting is boxed and gone once the session runs; the steps that only
/// run for a moment — a request, unstalling, closing — are boxed while they run.
pub fn run(
    socket: WebSocket,
    ctx: Context,
    conn: Arc<Connection>,
    principal: Option<Principal>,
) -> impl Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    let remote = conn.remote;
    metrics::connection_opened(PROTOCOL);
    Box::pin(start(sink, stream, ctx, conn, principal))
        .then(|started| match started {
            Ok(live) => Either::Left(live.serve()),
            Err(why) => Either::Right(std::future::ready(why)),
        })
        .map(move |why| {
            if why.is_notable() {
                tracing::info!(%remote, reason = why.as_str(), "WebSocket connection closed");
            } else {
                tracing::debug!(%remote, reason = why.as_str(), "WebSocket connection closed");
            }
            metrics::connection_closed(PROTOCOL, why.as_str());
        })
}

/// A connection past its start: what its session loop and its close need.
struct Live {
    ctx: Context,
    session: WsSession,
    stream: SplitStream<WebSocket>,
    out: Arc<SendQueue>,
    writer: Writer,
    /// Its place under the connection limits, held while it lives.
    place: Admitted,
}

/// The client admitted, the session registered (and an anonymous client's first request
/// answered); or why the connection ended before that, its close frame written.
async fn start(
    sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
    ctx: Context,
    conn: Arc<Connection>,
    principal: Option<Principal>,
) -> Result<Live, CloseReason> {
    let limits = &ctx.config.limits;
    let out = Arc::new(SendQueue::new(Limits::of(limits), BufferKind::Ws));
    let channel = match conn.channel(&ctx.engine).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no engine channel for a WebSocket client");
            out.close(CloseReason::EngineUnavailable);
            let finish = Writer::Idle(sink).finish(&out, None, limits.write_timeout);
            let _ = tokio::time::timeout(limits.write_timeout, finish).await;
            return Err(CloseReason::EngineUnavailable);
        }
    };
    let writer = Writer::Idle(sink);
    let (principal, replay, place) = match admit(&ctx, &mut stream, &out, principal).await {
        Ok(admitted) => admitted,
        Err(why) => {
            out.close(why);
            let finish = writer.finish(&out, Some(&channel), limits.write_timeout);
            let _ = tokio::time::timeout(Duration::from_secs(1), finish).await;
            return Err(why);
        }
    };
    let mut session = WsSession::new(ctx.clone(), conn, channel, principal, out.clone());
    session.register();
    // An anonymous client's first frame was a request: answer it like any other.
    if let Some(text) = replay {
        on_text(&mut session, &out, &text).await;
    }
    Ok(Live {
        ctx,
        session,
        stream,
        out,
        writer,
        place,
    })
}

impl Live {
    /// The session until it ends, then its close; returns why it ended.
    ///
    /// Not an `async fn`: one keeps its arguments twice in its state (as it took them, and
    /// where its body uses them), and `self` is 376 bytes of every connection's task.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice"
    )]
    fn serve(mut self) -> impl Future<Output = CloseReason> + Send {
        async move {
            let why = serve_session(
                &self.ctx,
                &mut self.session,
                &mut self.stream,
                &self.out,
                &mut self.writer,
            )
            .await;
            Box::pin(self.session.close()).await;
            self.out.close(why);
            let write_timeout = self.ctx.config.limits.write_timeout;
            let finish = self
                .writer
                .finish(&self.out, Some(self.session.channel()), write_timeout);
            let _ = tokio::time::timeout(write_timeout, Box::pin(finish)).await;
            // Named here so that the block holds it: a block captures only the fields it
            // uses, and the connection's place must last as long as the connection.
            drop(self.place);
            why
        }
    }
}

/// The principal (from the upgrade request, or from the first frame), the first frame to
/// replay when it was a request of an anonymous client, and the connection's place under the
/// connection limits, held while it lives.
async fn admit(
    ctx: &Context,
    stream: &mut SplitStream<WebSocket>,
    out: &SendQueue,
    principal: Option<Principal>,
) -> Result<(Principal, Option<String>, Admitted), CloseReason> {
    let refused = |full: Full| {
        metrics::refusal(PROTOCOL, full.as_str());
        CloseReason::Full(full)
    };
    let (principal, replay) = match principal {
        Some(p) => (p, None),
        None => {
            let _waiting = ctx.flow.admission.unauthenticated().map_err(refused)?;
            first_frame(ctx, stream, out).await?
        }
    };
    let admitted = ctx
        .flow
        .admission
        .admit(principal.shared_subject())
        .map_err(refused)?;
    Ok((principal, replay, admitted))
}

/// The session's loop: requests, deliveries, takeovers, ack timeouts, the token's expiry and
/// shutdown. Returns why it ended.
async fn serve_session(
    ctx: &Context,
    session: &mut WsSession,
    stream: &mut SplitStream<WebSocket>,
    out: &Arc<SendQueue>,
    writer: &mut Writer,
) -> CloseReason {
    let write_timeout = ctx.config.limits.write_timeout;
    // One timer for both clocks, the token's expiry and unacked deliveries' timeout; set only
    // while something is due, so an idle browser's connection is not woken every second.
    let timer = clock::idle_timer();
    tokio::pin!(timer);
    let mut expiry = clock::Expiry::default();
    let mut acks_due = None;
    // An administrator's close and the gateway's shutdown, through the registry entry
    // (`Registered::stopped`: a waker registration, kept across turns).
    let mut stop = session.registered.as_ref().map(Registered::stopped);
    loop {
        let expires = expiry.due(session.expires_at(), ctx.config.auth.leeway);
        let timed = clock::set_sooner(timer.as_mut(), expires.into_iter().chain(acks_due).min());
        // While the droppable part of the buffer paces publishers, deliveries wait in the
        // engine's queues instead of overflowing it (DESIGN.md §7).
        let paused = out.pressure().paces();
        // The two pacing branches' futures (600 bytes between them) are boxed and made only
        // while they are enabled, as the MQTT loop's are: every branch's future is part of
        // an idle connection's state, enabled or not.
        let outcome = tokio::select! {
            Some(why) = OptionFuture::from(stop.as_mut()) => Outcome::Close(match why {
                Stop::Admin => CloseReason::ClosedByAdmin,
                Stop::Shutdown => CloseReason::Shutdown,
            }),
            _ = &mut timer, if timed => {
                if expires.is_some_and(|at| at <= Instant::now()) {
                    Outcome::Close(CloseReason::TokenExpired)
                } else {
                    Box::pin(session.check_ack_timeouts()).await;
                    Outcome::Continue
                }
            }
            // Written one batch at a time, each batch a future that lives only while it writes.
            next = out.next(), if writer.is_idle() => {
                writer.start(next, out, Some(session.channel()), write_timeout);
                Outcome::Continue
            }
            Some(wrote) = OptionFuture::from(writer.batch()), if writer.is_writing() => {
                match writer.wrote(wrote) {
                    None => Outcome::Continue,
                    Some(ended) => {
                        if let WriterEnd::SlowConsumer = ended {
                            metrics::refusal(PROTOCOL, "slow_consumer");
                        }
                        Outcome::Close(CloseReason::WriteStalled)
                    }
                }
            }
            _ = OptionFuture::from(session.stall.as_ref().map(|s| Box::pin(s.released()))), if session.stall.is_some() => {
                Box::pin(session.unstall()).await
            }
            frame = stream.next(), if session.may_read() => {
                Box::pin(frames_read(session, stream, out, frame)).await
            }
            Some((sub, event)) = session.consumers.next(), if !session.consumers.is_empty() && !paused => {
                // Boxed: a batch of deliveries is a step that runs for a moment.
                Box::pin(deliveries(session, out, sub, event)).await
            }
            _ = OptionFuture::from(paused.then(|| Box::pin(out.pressure().resume(ctx.config.limits.pace_max_wait)))), if paused => Outcome::Continue,
            Some(t) = session.takeovers.next() => {
                Box::pin(session.taken_over(t)).await;
                Outcome::Continue
            }
        };
        if let Outcome::Close(why) = outcome {
            return why;
        }
        acks_due = session.note_in_flight();
    }
}

/// Handles `frame`, then the frames already read, up to a write batch in one turn: their
/// replies go out in one write (the session writes what it answers, so a batch started after
/// each request would flush one reply at a time). Then it takes turns with other connections,
/// as the MQTT reader does (docs/mqtt.md): buffered frames parse without touching the socket.
async fn frames_read(
    session: &mut WsSession,
    stream: &mut SplitStream<WebSocket>,
    out: &SendQueue,
    frame: Option<Result<Message, axum::Error>>,
) -> Outcome {
    let mut outcome = on_frame(session, out, frame).await;
    for _ in 1..super::writer::WRITE_BATCH {
        if !matches!(outcome, Outcome::Continue) || !session.may_read() || session.stall.is_some() {
            break;
        }
        let Some(frame) = stream.next().now_or_never() else {
            break;
        };
        outcome = on_frame(session, out, frame).await;
    }
    if session.stall.is_some() {
        // Paced: one frame per turn, as the MQTT reader does.
        tokio::task::yield_now().await;
    } else {
        tokio::task::consume_budget().await;
    }
    outcome
}

/// One frame read (`None`: the socket ended).
async fn on_frame(
    session: &mut WsSession,
    out: &SendQueue,
    frame: Option<Result<Message, axum::Error>>,
) -> Outcome {
    match frame {
        Some(Ok(Message::Text(text))) => on_text(session, out, &text).await,
        Some(Ok(Message::Binary(_))) => {
            metrics::refusal(PROTOCOL, Code::BadRequest.as_str());
            out.push(Frame::control(frames::error(
                &Value::Null,
                &Value::Null,
                Code::BadRequest,
                "this protocol uses JSON text frames, not binary ones",
                None,
            )));
            Outcome::Continue
        }
        Some(Ok(Message::Close(_))) | None => Outcome::Close(CloseReason::ClientClosed),
        Some(Ok(_)) => Outcome::Continue,
        Some(Err(e)) => Outcome::Close(read_error(&e)),
    }
}

/// Handles a delivery, then those already waiting, up to a write batch in one turn: the
/// session both makes the frames and writes them, so a batch started after each delivery
/// would write one frame per flush (a third of the `/ws` fan-out's rate), where the frames
/// ready now go out in one.
async fn deliveries(
    session: &mut WsSession,
    out: &SendQueue,
    sub: Arc<str>,
    event: crate::engine::ConsumerEvent,
) -> Outcome {
    let mut outcome = session.event(sub, event).await;
    for _ in 1..super::writer::WRITE_BATCH {
        if !matches!(outcome, Outcome::Continue) || out.pressure().paces() {
            break;
        }
        let waiting = tokio::task::unconstrained(session.consumers.next()).now_or_never();
        let Some(Some((sub, event))) = waiting else {
            break;
        };
        outcome = session.event(sub, event).await;
    }
    outcome
}

/// One text frame: a request handled, or an error frame for one that does not parse.
async fn on_text(session: &mut WsSession, out: &SendQueue, text: &str) -> Outcome {
    match frames::parse(text) {
        Ok(env) => session.request(env, text.len()).await,
        Err(m) => {
            metrics::refusal(PROTOCOL, Code::BadRequest.as_str());
            out.push(Frame::control(frames::error(
                &m.id,
                &m.op,
                Code::BadRequest,
                &m.message,
                None,
            )));
            Outcome::Continue
        }
    }
}

/// A read error: an oversized frame is 1009, anything else ends the connection.
fn read_error(e: &axum::Error) -> CloseReason {
    let text = e.to_string();
    if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
        CloseReason::TooBig
    } else {
        CloseReason::ProtocolError
    }
}

/// Without an `Authorization` header the first frame must be `auth` within `ws.auth_timeout`;
/// a first frame that is something else makes the client anonymous when that is allowed, and
/// comes back to be handled as the session's first request.
async fn first_frame(
    ctx: &Context,
    stream: &mut SplitStream<WebSocket>,
    out: &SendQueue,
) -> Result<(Principal, Option<String>), CloseReason> {
    let frame = match tokio::time::timeout(ctx.config.ws.auth_timeout, stream.next()).await {
        Err(_) => return Err(CloseReason::AuthTimeout),
        Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
        Ok(Some(Ok(Message::Close(_))) | None) => return Err(CloseReason::ClientClosed),
        Ok(_) => return Err(CloseReason::AuthExpected),
    };
    let parsed = frames::parse(&frame);
    if let Ok(env) = &parsed
        && let Request::Auth(a) = &env.request
    {
        return match ctx.auth.authenticate(&a.token).await {
            Ok(p) => {
                out.push(Frame::control(frames::auth_ok(
                    &env.id,
                    &p.subject,
                    p.expires_at(),
                )));
                Ok((p, None))
            }
            Err(e) => {
                out.push(Frame::control(frames::error(
                    &env.id,
                    &Value::String("auth".into()),
                    Code::Unauthorized,
                    &e.to_string(),
                    None,
                )));
                Err(CloseReason::AuthFailed)
            }
        };
    }
    if ctx.auth.allows_anonymous()
        && let Ok(p) = ctx.auth.anonymous()
    {
        return Ok((p, Some(frame)));
    }
    Err(CloseReason::AuthExpected)
}
