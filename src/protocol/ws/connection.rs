//! One WebSocket connection: the reader loop that always reads (requests, acks and pings are
//! handled whatever the outbound side does), the writer task that drains the outbound buffer
//! under `limits.write_timeout`, the auth phase, the token's expiry and shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;

use super::frames::{self, Request, close};
use super::outbound::{Limits, Next, Outbound};
use super::session::{Outcome, Session};
use crate::auth::{Principal, now_secs};
use crate::codes::Code;
use crate::context::{Connection, Context};
use crate::engine::Channel;
use crate::metrics;

const PROTOCOL: &str = "ws";
const ACK_TIMEOUT_CHECK: Duration = Duration::from_secs(1);

/// Why the writer stopped.
enum WriterEnd {
    Done,
    SlowConsumer,
    Gone,
}

pub async fn run(
    socket: WebSocket,
    ctx: Context,
    conn: Arc<Connection>,
    principal: Option<Principal>,
) {
    metrics::connection_opened(PROTOCOL);
    serve(socket, &ctx, conn, principal).await;
    metrics::connection_closed(PROTOCOL);
}

async fn serve(
    socket: WebSocket,
    ctx: &Context,
    conn: Arc<Connection>,
    principal: Option<Principal>,
) {
    let (sink, mut stream) = socket.split();
    let limits = &ctx.config.limits;
    let out = Arc::new(Outbound::new(Limits {
        messages: limits.outbound_buffer_messages,
        bytes: limits.outbound_buffer_bytes.as_u64() as usize,
    }));
    let channel = match conn.channel(&ctx.engine).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no engine channel for a WebSocket client");
            out.close_now(1011, "engine unavailable");
            let _ = writer(sink, out, None, limits.write_timeout).await;
            return;
        }
    };
    let mut writer_task = tokio::spawn(writer(
        sink,
        out.clone(),
        Some(channel.clone()),
        limits.write_timeout,
    ));

    let refuse = |full: crate::flow::Full| {
        tracing::info!("WebSocket client closed: {full}");
        metrics::refusal(PROTOCOL, full.as_str());
        out.close_now(close::TRY_AGAIN_LATER, full.as_str());
    };
    let (principal, replay) = match principal {
        Some(p) => (p, None),
        None => {
            let found = match ctx.flow.admission.unauthenticated() {
                Ok(_waiting) => first_frame(ctx, &mut stream, &out).await,
                Err(full) => {
                    refuse(full);
                    None
                }
            };
            match found {
                Some(found) => found,
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer_task).await;
                    return;
                }
            }
        }
    };
    // Held while the connection lives: its place under the connection limits.
    let _admitted = match ctx.flow.admission.admit(principal.shared_subject()) {
        Ok(admitted) => admitted,
        Err(full) => {
            refuse(full);
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer_task).await;
            return;
        }
    };
    let mut session = Session::new(ctx.clone(), conn, channel, principal, out.clone());
    // An anonymous client's first frame was a request: answer it like any other.
    if let Some(text) = replay {
        match frames::parse(&text) {
            Ok(env) => {
                session.handle(env).await;
            }
            Err(m) => out.push(super::outbound::Frame::control(frames::error(
                &m.id,
                &m.op,
                Code::BadRequest,
                &m.message,
                None,
            ))),
        }
    }
    let mut tick = tokio::time::interval(ACK_TIMEOUT_CHECK);
    let end = loop {
        let expiry = expiry_sleep(session.expires_at(), ctx.config.auth.leeway);
        tokio::select! {
            _ = ctx.shutdown.wait() => break Some((close::SHUTDOWN, "gateway shutting down")),
            _ = expiry => break Some((close::UNAUTHENTICATED, "token expired")),
            ended = &mut writer_task => {
                if let Ok(WriterEnd::SlowConsumer) = ended {
                    metrics::refusal(PROTOCOL, "slow_consumer");
                    tracing::info!("WebSocket client closed: accepted nothing for limits.write_timeout");
                }
                break None;
            }
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => match frames::parse(&text) {
                    Ok(env) => {
                        if let Outcome::Close(code, why) = session.handle(env).await {
                            break Some((code, why));
                        }
                        // Frames already buffered parse without touching the socket: take
                        // turns with other connections as the MQTT reader does (docs/mqtt.md).
                        tokio::task::consume_budget().await;
                    }
                    Err(m) => {
                        metrics::refusal(PROTOCOL, Code::BadRequest.as_str());
                        out.push(super::outbound::Frame::control(frames::error(&m.id, &m.op, Code::BadRequest, &m.message, None)));
                    }
                },
                Some(Ok(Message::Binary(_))) => {
                    metrics::refusal(PROTOCOL, Code::BadRequest.as_str());
                    out.push(super::outbound::Frame::control(frames::error(
                        &Value::Null, &Value::Null, Code::BadRequest,
                        "this protocol uses JSON text frames, not binary ones", None,
                    )));
                }
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(read_error(&e)),
            },
            Some((sub, event)) = session.consumers.next(), if !session.consumers.is_empty() => {
                if let Outcome::Close(code, why) = session.event(sub, event).await {
                    break Some((code, why));
                }
            }
            Some(t) = session.takeovers.recv() => session.taken_over(t).await,
            _ = tick.tick() => session.check_ack_timeouts().await,
        }
    };
    session.close().await;
    match end {
        Some((close::SLOW_CONSUMER, why)) => out.close_now(close::SLOW_CONSUMER, why),
        Some((code, why)) => out.close_after(code, why),
        None => out.close_now(1000, ""),
    }
    let _ = tokio::time::timeout(ctx.config.limits.write_timeout, writer_task).await;
}

/// A read error: an oversized frame is 1009, anything else ends the connection.
fn read_error(e: &axum::Error) -> (u16, &'static str) {
    let text = e.to_string();
    if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
        (close::TOO_BIG, "frame larger than the frame limit")
    } else {
        (1002, "protocol error")
    }
}

fn expiry_sleep(expires_at: Option<u64>, leeway: Duration) -> tokio::time::Sleep {
    let after = match expires_at {
        Some(exp) => Duration::from_secs((exp + leeway.as_secs()).saturating_sub(now_secs())),
        // Anonymous: no expiry; a year is as good as never and keeps the select uniform.
        None => Duration::from_secs(365 * 24 * 3600),
    };
    tokio::time::sleep(after)
}

/// Without an `Authorization` header the first frame must be `auth` within `ws.auth_timeout`;
/// a first frame that is something else makes the client anonymous when that is allowed, and
/// comes back to be handled as the session's first request.
async fn first_frame(
    ctx: &Context,
    stream: &mut SplitStream<WebSocket>,
    out: &Outbound,
) -> Option<(Principal, Option<String>)> {
    let unauthenticated = |why: &'static str| {
        out.close_after(close::UNAUTHENTICATED, why);
        None
    };
    let frame = match tokio::time::timeout(ctx.config.ws.auth_timeout, stream.next()).await {
        Err(_) => return unauthenticated("no auth frame within ws.auth_timeout"),
        Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
        Ok(_) => return unauthenticated("expected an auth frame"),
    };
    let parsed = frames::parse(&frame);
    if let Ok(env) = &parsed
        && let Request::Auth(a) = &env.request
    {
        return match ctx.auth.authenticate(&a.token).await {
            Ok(p) => {
                out.push(super::outbound::Frame::control(frames::auth_ok(
                    &env.id,
                    &p.subject,
                    p.expires_at,
                )));
                Some((p, None))
            }
            Err(e) => {
                out.push(super::outbound::Frame::control(frames::error(
                    &env.id,
                    &Value::String("auth".into()),
                    Code::Unauthorized,
                    &e.to_string(),
                    None,
                )));
                unauthenticated("invalid token")
            }
        };
    }
    if ctx.auth.allows_anonymous() {
        let p = ctx.auth.anonymous().ok()?;
        return Some((p, Some(frame)));
    }
    unauthenticated("the first frame must be auth")
}

async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    out: Arc<Outbound>,
    channel: Option<Arc<dyn Channel>>,
    write_timeout: Duration,
) -> WriterEnd {
    loop {
        let (texts, ack, message) = match out.next().await {
            Next::Lagged(lagged) => (
                lagged.iter().map(|(s, n)| frames::lagged(s, *n)).collect(),
                None,
                false,
            ),
            Next::Frame(f) => (vec![f.text], f.ack_after_write, f.message),
            Next::Closed(close) => {
                if let Some((code, reason)) = close {
                    let frame = Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    }));
                    let _ = tokio::time::timeout(write_timeout, sink.send(frame)).await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                return WriterEnd::Done;
            }
        };
        for text in texts {
            match tokio::time::timeout(write_timeout, sink.send(Message::Text(text.into()))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return WriterEnd::Gone,
                Err(_) => return WriterEnd::SlowConsumer,
            }
        }
        if message {
            metrics::messages_out(PROTOCOL, 1);
        }
        if let (Some(tag), Some(ch)) = (ack, &channel) {
            let _ = ch.ack(tag, false).await;
        }
    }
}
