//! One AMQP connection's socket and timers: the handshake within `amqp.handshake_timeout`,
//! then frames in, deliveries and confirms out, heartbeats both ways (none received for two
//! intervals closes it), token expiry, the memory watermark's `connection.blocked`, an
//! administrator's close and shutdown — and the closing handshake.

use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::ShortString;
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::PROTOCOL;
use super::error::{CONNECTION_FORCED, Fault, Reply};
use super::frame::{self, Frame, ReadError, Wire};
use super::handshake::{self, FRAME_MAX, Refused};
use super::session::{Session, Step};
use crate::context::{Connection, Context};
use crate::metrics;
use crate::protocol::clock;

/// How long the gateway waits for `close-ok` after its own `connection.close`.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Deliveries pause while this much is waiting to be written: a slow reader's backlog stays
/// in its queue (bounded by credit or the engine's no-ack window), not in the gateway.
const OUT_HIGH: usize = 256 * 1024;

/// Why a connection ended (the `reason` label of `gateway_connections_closed_total`).
#[derive(Debug)]
enum Ending {
    AdmissionFull,
    Handshake(Refused),
    HandshakeTimeout,
    ClientClosed,
    PeerClosed,
    MissedHeartbeats,
    SlowConsumer,
    /// The gateway sent `connection.close` with this reply.
    Closed(&'static str, Reply),
}

impl Ending {
    fn as_str(&self) -> &'static str {
        match self {
            Ending::AdmissionFull => "admission_full",
            Ending::Handshake(Refused::Fault(_)) => "handshake_refused",
            Ending::Handshake(_) => "bad_handshake",
            Ending::HandshakeTimeout => "handshake_timeout",
            Ending::ClientClosed => "client_closed",
            Ending::PeerClosed => "peer_closed",
            Ending::MissedHeartbeats => "missed_heartbeats",
            Ending::SlowConsumer => "slow_consumer",
            Ending::Closed(why, _) => why,
        }
    }
}

/// Serves one AMQP connection, given its socket's two halves, over `transport` (`tcp` or
/// `tls`).
pub async fn run<R, W>(
    reader: R,
    writer: W,
    ctx: Context,
    conn: Arc<Connection>,
    transport: crate::context::Transport,
) where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin,
{
    metrics::connection_opened(PROTOCOL);
    let ending = serve(reader, writer, &ctx, &conn, transport).await;
    tracing::debug!(remote = %conn.remote, reason = ending.as_str(), "AMQP connection ended");
    metrics::connection_closed(PROTOCOL, ending.as_str());
}

async fn serve<R, W>(
    reader: R,
    mut writer: W,
    ctx: &Context,
    conn: &Arc<Connection>,
    transport: crate::context::Transport,
) -> Ending
where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin,
{
    let Ok(waiting) = ctx.flow.admission.unauthenticated() else {
        return Ending::AdmissionFull;
    };
    let mut wire = Wire::new(reader, FRAME_MAX as usize);
    let negotiated = tokio::time::timeout(
        ctx.config.amqp.handshake_timeout,
        Box::pin(handshake::negotiate(ctx, &mut wire, &mut writer)),
    )
    .await;
    drop(waiting);
    let negotiated = match negotiated {
        Ok(Ok(n)) => n,
        Ok(Err(refused)) => {
            if let Refused::Fault(f) = &refused {
                tracing::info!(remote = %conn.remote, "AMQP handshake refused: {}", f.reply().text);
                metrics::refusal(PROTOCOL, "login_refused");
            }
            let _ = writer.shutdown().await;
            return Ending::Handshake(refused);
        }
        Err(_) => return Ending::HandshakeTimeout,
    };
    let heartbeat = Duration::from_secs(u64::from(negotiated.heartbeat));
    let mut session = Session::new(ctx.clone(), conn.clone(), negotiated, transport);
    let mut out = BytesMut::new();
    let ending = serve_session(
        ctx,
        &mut session,
        &mut wire,
        &mut writer,
        &mut out,
        heartbeat,
    )
    .await;
    Box::pin(session.end()).await;
    out.extend_from_slice(&session.out);
    match &ending {
        Ending::Closed(_, reply) => {
            close_frame(&mut out, reply);
            let flushed = tokio::time::timeout(CLOSE_WAIT, writer.write_all(&out)).await;
            if matches!(flushed, Ok(Ok(()))) {
                await_close_ok(&mut wire).await;
            }
        }
        Ending::ClientClosed => {
            let _ = tokio::time::timeout(CLOSE_WAIT, writer.write_all(&out)).await;
        }
        _ => {}
    }
    let _ = writer.shutdown().await;
    ending
}

/// Reads until the client's `close-ok` (or its own `close`), for at most [`CLOSE_WAIT`].
async fn await_close_ok<R: AsyncRead + Unpin>(wire: &mut Wire<R>) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Ok(Some(frame)) = wire.next().await {
            if let Frame::Method(0, class) = frame
                && matches!(
                    *class,
                    AMQPClass::Connection(
                        connection::AMQPMethod::CloseOk(_) | connection::AMQPMethod::Close(_)
                    )
                )
            {
                return;
            }
        }
    })
    .await;
}

fn close_frame(out: &mut BytesMut, reply: &Reply) {
    frame::method(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: reply.code,
            reply_text: ShortString::from(reply.text.as_str()),
            class_id: reply.class_id,
            method_id: reply.method_id,
        })),
    );
}

fn forced(why: &'static str, text: &str) -> Ending {
    Ending::Closed(
        why,
        Fault::connection(CONNECTION_FORCED, text, (0, 0))
            .reply()
            .clone(),
    )
}

/// The timers of a connection, behind one kept timer ([`clock`]): a connection's loop turns
/// once per frame, and arming a timer per turn costs more than the frame.
struct Timers {
    heartbeat: Duration,
    last_read: Instant,
    last_write: Instant,
    expiry: clock::Expiry,
}

/// What a deadline that passed means.
enum Due {
    Expired,
    MissedHeartbeats,
    Beat,
    WriteStalled,
    Retry,
}

impl Timers {
    /// The soonest deadline and what it means, or `None` when nothing has one.
    fn soonest(
        &mut self,
        ctx: &Context,
        session: &Session,
        writing: bool,
    ) -> Option<(Instant, Due)> {
        let mut next: Option<(Instant, Due)> = None;
        let mut at = |when: Instant, due: Due| {
            if next.as_ref().is_none_or(|(soonest, _)| when < *soonest) {
                next = Some((when, due));
            }
        };
        if let Some(expires) = self
            .expiry
            .due(session.expires_at(), ctx.config.auth.leeway)
        {
            at(Instant::from_std(expires), Due::Expired);
        }
        if !self.heartbeat.is_zero() {
            at(self.last_read + self.heartbeat * 2, Due::MissedHeartbeats);
            if !writing {
                at(self.last_write + self.heartbeat / 2, Due::Beat);
            }
        }
        if writing {
            at(
                self.last_write + ctx.config.limits.write_timeout,
                Due::WriteStalled,
            );
        }
        if let Some(retry) = session.retry_at {
            at(retry, Due::Retry);
        }
        next
    }

    /// What is due now that the timer fired: the timer is left on a deadline that moved later
    /// (the keep-alive moves with every frame), so it may find nothing.
    fn fired(&mut self, ctx: &Context, session: &Session, writing: bool) -> Option<Due> {
        self.soonest(ctx, session, writing)
            .filter(|(at, _)| *at <= Instant::now())
            .map(|(_, due)| due)
    }
}

/// Output waiting past this stops the reading of more frames (and deliveries stop at
/// [`OUT_HIGH`]): a client that does not read what it asked for cannot grow the gateway's
/// memory; it is closed after `limits.write_timeout`.
const OUT_MAX: usize = 4 * 1024 * 1024;

async fn serve_session<R, W>(
    ctx: &Context,
    session: &mut Session,
    wire: &mut Wire<R>,
    writer: &mut W,
    out: &mut BytesMut,
    heartbeat: Duration,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut timers = Timers {
        heartbeat,
        last_read: Instant::now(),
        last_write: Instant::now(),
        expiry: clock::Expiry::default(),
    };
    let timer = clock::idle_timer();
    tokio::pin!(timer);
    let mut blocked = ctx.engine.watch_publish_blocked();
    session.publish_blocked(*blocked.borrow_and_update());
    loop {
        if out.is_empty() {
            std::mem::swap(out, &mut session.out);
        } else if !session.out.is_empty() {
            out.extend_from_slice(&session.out);
            session.out.clear();
        }
        let writing = !out.is_empty();
        let may_read = session.may_read() && out.len() < OUT_MAX;
        let may_deliver = out.len() < OUT_HIGH && !session.consumers.is_empty();
        let soonest = timers
            .soonest(ctx, session, writing)
            .map(|(at, _)| at.into_std());
        let timed = clock::set_sooner(timer.as_mut(), soonest);
        // Biased: frames already read and deliveries ready are handled before their answers
        // are written, so a burst goes out in one write.
        let step = tokio::select! {
            biased;
            why = crate::context::stop_signal(session.registered.as_ref(), &ctx.shutdown) => return match why {
                crate::context::Stop::Shutdown => forced("shutdown", "broker forced connection closure with reason 'shutdown'"),
                crate::context::Stop::Admin => forced("closed_by_admin", "closed by an administrator"),
            },
            frame = wire.next(), if may_read => {
                timers.last_read = Instant::now();
                match frame {
                    Ok(Some(frame)) => {
                        let step = session.handle(frame).await;
                        tokio::task::consume_budget().await;
                        step
                    }
                    Ok(None) => return Ending::PeerClosed,
                    Err(ReadError::Io(_)) => return Ending::PeerClosed,
                    Err(ReadError::Frame(e)) => {
                        metrics::refusal(PROTOCOL, "malformed");
                        Step::Close(Fault::connection(e.reply_code(), e.to_string(), (0, 0)).reply().clone())
                    }
                }
            }
            Some(confirmed) = session.confirms.next(), if !session.confirms.is_empty() => {
                session.confirmed(confirmed);
                Step::Continue
            }
            Some((key, event)) = session.consumers.next(), if may_deliver => {
                session.deliver(key, event).await;
                Step::Continue
            }
            Ok(()) = blocked.changed() => {
                session.publish_blocked(*blocked.borrow_and_update());
                Step::Continue
            }
            written = writer.write_buf(out), if writing => match written {
                Ok(n) if n > 0 => {
                    timers.last_write = Instant::now();
                    if out.is_empty() && out.capacity() > 64 * 1024 {
                        // An idle connection keeps no batch-sized buffer.
                        *out = BytesMut::new();
                    }
                    Step::Continue
                }
                _ => return Ending::PeerClosed,
            },
            () = &mut timer, if timed => match timers.fired(ctx, session, writing) {
                Some(Due::Expired) => return forced("token_expired", "the token has expired (send connection.update-secret before exp)"),
                Some(Due::MissedHeartbeats) => return Ending::MissedHeartbeats,
                Some(Due::WriteStalled) => {
                    metrics::refusal(PROTOCOL, "slow_consumer");
                    return Ending::SlowConsumer;
                }
                Some(Due::Beat) => {
                    frame::heartbeat(out);
                    Step::Continue
                }
                Some(Due::Retry) => session.retry_now().await,
                None => Step::Continue,
            },
        };
        session.note_in_flight();
        match step {
            Step::Continue => {}
            Step::ClientClosed => return Ending::ClientClosed,
            Step::Close(reply) => return Ending::Closed("protocol_error", reply),
        }
    }
}
