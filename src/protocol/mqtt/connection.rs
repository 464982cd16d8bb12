//! One MQTT connection over any byte stream (TCP, or WebSocket frames bridged): reads and
//! decodes, always — acks and pings are handled whatever the outbound side does —, writes
//! through a writer task under `limits.write_timeout`, enforces the CONNECT timeout, the
//! keep-alive (× 1.5), the token's expiry and shutdown.

use crate::flow::{Bound, Pressure, stall_over};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::{Fuse, FusedFuture};
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::close::CloseReason;
use super::codec::{Codec, Connect, DecodeError, Inbound, Outbound, Version};
use super::outbox::{self, outbox};
use super::session::{Outcome, Session, reason};
use crate::auth::now_secs;
use crate::context::{Connection, Context};
use crate::metrics;

const PROTOCOL: &str = "mqtt";
/// Reads start at `MIN_READ` and double while they fill what was offered, up to `MAX_READ`:
/// a flat-out publisher gets large reads, an idle device keeps about a kilobyte — memory per
/// idle connection is what decides how many devices fit on a machine.
const MIN_READ: usize = 1024;
const MAX_READ: usize = 16 * 1024;

/// How long a closing connection keeps reading (and discarding) after its last packet went
/// out and its write side was shut down. Closing a socket with unread input makes the kernel
/// send a reset, and a client that is still sending would read that reset instead of the
/// DISCONNECT that says why; a second is plenty on any network that delivered the packet.
pub const LINGER: Duration = Duration::from_secs(1);

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// The bytes read and not yet decoded, and how much the next read offers.
struct Input {
    buf: BytesMut,
    next: usize,
}

impl Input {
    fn new() -> Input {
        Input {
            buf: BytesMut::new(),
            next: MIN_READ,
        }
    }
}

/// Reads until one packet decodes; `Ok(None)` when the peer closed.
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut Input,
    codec: &mut Codec,
) -> Result<Option<Inbound>, DecodeError> {
    loop {
        if let Some(p) = codec.decode(&mut input.buf)? {
            return Ok(Some(p));
        }
        if input.buf.is_empty() && input.buf.capacity() > 2 * input.next {
            // Quiet again after a burst: give the large buffer back.
            input.buf = BytesMut::new();
        }
        input.buf.reserve(input.next);
        let offered = input.buf.capacity() - input.buf.len();
        match reader.read_buf(&mut input.buf).await {
            Ok(0) => return Ok(None),
            Ok(n) if n >= offered => input.next = (input.next * 2).min(MAX_READ),
            Ok(n) if n < input.next / 4 => input.next = (input.next / 2).max(MIN_READ),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Serves one MQTT connection over `transport` (`tcp` or `websocket`).
pub async fn run<S>(stream: S, ctx: Context, conn: Arc<Connection>, transport: &'static str)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    metrics::connection_opened(PROTOCOL);
    let why = serve(stream, &ctx, &conn, transport).await;
    if why.is_notable() {
        tracing::info!(remote = %conn.remote, reason = why.as_str(), "MQTT connection closed");
    } else {
        tracing::debug!(remote = %conn.remote, reason = why.as_str(), "MQTT connection closed");
    }
    metrics::connection_closed(PROTOCOL, why.as_str());
}

/// A CONNACK that refuses with `code` (an MQTT 5 reason code; the codec gives 3.1.1 its
/// return code).
fn refusal(code: u8, max_packet: u32) -> Outbound {
    Outbound::ConnAck {
        code,
        session_present: false,
        session_expiry: None,
        receive_max: 1,
        max_packet_size: max_packet,
        assigned_client_id: None,
        max_qos: 1,
        auth_method: None,
        server_keep_alive: None,
    }
}

/// The socket's two halves and the decoding state of its read side.
struct Wire<R> {
    reader: R,
    input: Input,
    codec: Codec,
}

impl<R: AsyncRead + Unpin> Wire<R> {
    async fn read(&mut self) -> Result<Option<Inbound>, DecodeError> {
        read_packet(&mut self.reader, &mut self.input, &mut self.codec).await
    }
}

async fn serve<S>(
    stream: S,
    ctx: &Context,
    conn: &Arc<Connection>,
    transport: &'static str,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Until CONNECT is answered this connection holds a place among the unauthenticated ones.
    let waiting = match ctx.flow.admission.unauthenticated() {
        Ok(place) => place,
        Err(full) => {
            tracing::info!(remote = %conn.remote, "closed before CONNECT: {full}");
            metrics::refusal(PROTOCOL, full.as_str());
            return CloseReason::AdmissionFull;
        }
    };
    let (reader, mut writer) = tokio::io::split(stream);
    let max_packet = (ctx.config.limits.max_message_bytes.as_u64() + 64 * 1024) as u32;
    let mut wire = Wire {
        reader,
        input: Input::new(),
        codec: Codec::new(max_packet),
    };
    let connect = match read_connect(ctx, conn, &mut wire, max_packet).await {
        Ok(connect) => connect,
        Err((why, answer)) => {
            if let Some(bytes) = answer {
                let _ = writer.write_all(&bytes).await;
                let _ = writer.shutdown().await;
            }
            return why;
        }
    };
    let version = connect.version;
    let (tx, rx) = outbox();
    // The QoS 0 outbound buffer's gauge: publishers whose messages land here while it is above
    // its high-water mark are paced (DESIGN.md §7).
    let limits = &ctx.config.limits;
    let qos0_out = Pressure::new(
        Bound {
            messages: limits.outbound_buffer_messages as u64,
            bytes: limits.outbound_buffer_bytes.as_u64(),
        },
        PROTOCOL,
    );
    // Fused: the loop may see it end, and a finished task is not awaited again.
    let mut writer_task = tokio::spawn(write_loop(
        writer,
        rx,
        version,
        max_packet,
        ctx.config.limits.write_timeout,
        qos0_out.clone(),
    ))
    .fuse();
    // Boxed, as are the rarer steps below: what an await point holds is part of the task's
    // state for the connection's whole life (docs/bench.md, idle connections).
    let connected = Box::pin(Session::connect(
        ctx.clone(),
        conn.clone(),
        *connect,
        tx.clone(),
        qos0_out.clone(),
    ));
    let mut session = match connected.await {
        Ok((mut session, connack)) => {
            drop(waiting);
            let _ = tx.send(connack);
            session.after_connack();
            session.registered = Some(ctx.registry.register(
                conn.id,
                crate::context::About {
                    protocol: PROTOCOL,
                    transport,
                    remote: conn.remote,
                    subject: session.subject().to_owned(),
                    client_id: Some(session.client_id().to_owned()),
                    expires_at: session.expires_at(),
                    buffer: Some(qos0_out),
                    stats: conn.stats.clone(),
                },
            ));
            session.show_subscriptions();
            session
        }
        Err(refused) => {
            drop(waiting);
            tracing::info!(remote = %conn.remote, code = refused.code, "CONNECT refused: {}", refused.why);
            metrics::refusal(PROTOCOL, "connect_refused");
            let _ = tx.send(refusal(refused.code, max_packet));
            drop(tx);
            if let Ok(Ok(_)) = tokio::time::timeout(LINGER, writer_task).await {
                linger(&mut wire.reader).await;
            }
            return CloseReason::ConnectRefused;
        }
    };
    let why = serve_session(ctx, &mut session, &mut wire, &mut writer_task).await;
    Box::pin(session.end(why.is_graceful())).await;
    if let (Some(code), Version::V5) = (why.code(), version) {
        let _ = tx.send(Outbound::Disconnect { code });
    }
    drop(tx);
    drop(session);
    // The DISCONNECT (if any) is written and the write side shut down before the linger.
    if !writer_task.is_terminated()
        && let Ok(Ok(_)) = tokio::time::timeout(LINGER, writer_task).await
    {
        linger(&mut wire.reader).await;
    }
    why
}

/// CONNECT first, within `mqtt.connect_timeout`. A CONNECT the gateway cannot take is answered
/// (with the bytes returned) where MQTT has an answer for it.
async fn read_connect<R: AsyncRead + Unpin>(
    ctx: &Context,
    conn: &Connection,
    wire: &mut Wire<R>,
    max_packet: u32,
) -> Result<Box<Connect>, (CloseReason, Option<BytesMut>)> {
    let first = tokio::time::timeout(ctx.config.mqtt.connect_timeout, wire.read()).await;
    match first {
        Ok(Ok(Some(Inbound::Connect(c)))) => Ok(c),
        Ok(Ok(Some(_))) => {
            tracing::info!(remote = %conn.remote, "MQTT packet before CONNECT; closing");
            Err((CloseReason::BadConnect, None))
        }
        Ok(Ok(None)) => Err((CloseReason::PeerClosed, None)),
        Ok(Err(e)) => {
            tracing::info!(remote = %conn.remote, error = %e, "bad CONNECT; closing");
            metrics::refusal(PROTOCOL, "malformed");
            // A CONNECT naming MQTT with a level we do not speak: 3.1.1's CONNACK return code 1
            // (0x01 "unacceptable protocol version") is understood by every version.
            // [MQTT-3.1.3-9]: a client id the server rejects gets CONNACK 0x02 (3.1.1) / 0x85.
            let answer = match e {
                DecodeError::InvalidProtocol | DecodeError::UnsupportedProtocolLevel
                    if wire.input.buf.get(4..8) == Some(b"MQTT") =>
                {
                    Some((Version::V3, reason::UNSUPPORTED_PROTOCOL_VERSION))
                }
                DecodeError::InvalidClientId => Some((
                    wire.codec.version().unwrap_or(Version::V3),
                    reason::CLIENT_ID_NOT_VALID,
                )),
                _ => None,
            };
            let bytes = answer.and_then(|(version, code)| {
                let mut buf = BytesMut::new();
                let mut codec = Codec::for_version(version, max_packet);
                codec.encode(refusal(code, max_packet), &mut buf).ok()?;
                Some(buf)
            });
            Err((CloseReason::BadConnect, bytes))
        }
        Err(_) => {
            tracing::info!(remote = %conn.remote, "no CONNECT within mqtt.connect_timeout; closing");
            Err((CloseReason::ConnectTimeout, None))
        }
    }
}

/// The connected session's loop: packets, deliveries, confirms, parked publishes, takeover,
/// and every timer (keep-alive × 1.5, token expiry, shutdown). Returns why it ended.
async fn serve_session<R: AsyncRead + Unpin>(
    ctx: &Context,
    session: &mut Session,
    wire: &mut Wire<R>,
    writer_task: &mut Fuse<JoinHandle<CloseReason>>,
) -> CloseReason {
    let keep_alive = session.keep_alive();
    let keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let mut last_seen = Instant::now();
    loop {
        // Recomputed each time round: an MQTT 5 AUTH refresh moves it.
        let expiry_at = session.expires_at().map(|exp| {
            tokio::time::Instant::now()
                + Duration::from_secs(
                    (exp + ctx.config.auth.leeway.as_secs()).saturating_sub(now_secs()),
                )
        });
        let keep_alive_at =
            keep_alive.map_or_else(far, |k| tokio::time::Instant::from_std(last_seen + k));
        let retry_at = session
            .inflow
            .retry_at
            .map_or_else(far, tokio::time::Instant::from_std);
        let may_read = session.inflow.may_read(
            ctx.config.mqtt.receive_maximum,
            session.receive_maximum_advertised(),
            ctx.config.limits.max_pending_in.as_u64(),
        );
        let paused = session.delivery_paused();
        let outcome = tokio::select! {
            _ = ctx.shutdown.wait() => Outcome::Close(CloseReason::ServerShuttingDown),
            _ = tokio::time::sleep_until(expiry_at.unwrap_or_else(far)) => Outcome::Close(CloseReason::TokenExpired),
            _ = tokio::time::sleep_until(keep_alive_at) => Outcome::Close(CloseReason::KeepAliveTimeout),
            ended = &mut *writer_task => Outcome::Close(ended.unwrap_or(CloseReason::PeerClosed)),
            packet = wire.read(), if may_read => {
                last_seen = Instant::now();
                match packet {
                    Ok(Some(p)) => {
                        let outcome = Box::pin(session.handle(p)).await;
                        // Packets already buffered decode without touching the socket, so a
                        // flat-out publisher would never yield: spend tokio's cooperative
                        // budget per packet, so it takes turns with the connections it
                        // publishes to (50 publishers → 1 subscriber fell from 100k
                        // deliveries/s to almost none without this; see docs/mqtt.md).
                        if session.stall.is_some() {
                            // Paced: what it reads now only parks, while the consumers it
                            // waits for need the CPU to drain — one packet per turn.
                            tokio::task::yield_now().await;
                        } else {
                            tokio::task::consume_budget().await;
                        }
                        outcome
                    }
                    Ok(None) => Outcome::Close(CloseReason::PeerClosed),
                    Err(DecodeError::MaxSizeExceeded { .. }) => Outcome::Close(CloseReason::PacketTooLarge),
                    Err(e) => {
                        tracing::info!(remote = %session.remote(), error = %e, "malformed MQTT packet; closing");
                        Outcome::Close(CloseReason::MalformedPacket)
                    }
                }
            }
            Some((key, event)) = session.consumers.next(), if !session.consumers.is_empty() && paused.is_none() => {
                session.deliver_batch(key, event).await
            }
            _ = resume(&paused, ctx.config.limits.pace_max_wait), if paused.is_some() => Outcome::Continue,
            Some((ack, result)) = session.inflow.next_confirmed(), if session.inflow.awaiting() => {
                session.confirmed(ack, result).await
            }
            _ = tokio::time::sleep_until(retry_at) => Box::pin(session.retry_parked()).await,
            _ = stall_over(&session.stall) => Box::pin(session.unstall()).await,
            Some(_) = session.takeovers.recv() => session.taken_over(),
            _ = crate::context::closed_by_admin(&session.registered) => Outcome::Close(CloseReason::AdministrativeAction),
        };
        session.note_in_flight();
        if let Outcome::Close(why) = outcome {
            return why;
        }
    }
}

async fn resume(paused: &Option<Pressure>, max_wait: Duration) {
    if let Some(p) = paused {
        p.resume(max_wait).await;
    }
}

/// Reads and discards until the peer closes, for at most [`LINGER`].
async fn linger<R: AsyncRead + Unpin>(reader: &mut R) {
    // On the heap: a 4 KiB array would be part of the connection task's state for its whole
    // life, lingering or not (an async fn's state is the largest of its await points').
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: outbox::Receiver,
    version: Version,
    max_packet: u32,
    write_timeout: Duration,
    qos0_out: Pressure,
) -> CloseReason {
    let mut codec = Codec::for_version(version, max_packet);
    // Grows to the largest batch written; given back when the writer goes idle.
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        // Batch what is already queued into one write.
        let mut next = Some(first);
        while let Some(p) = next {
            // 3.1.1 has no server DISCONNECT: closing is the answer.
            if matches!(p, Outbound::Disconnect { .. }) && version == Version::V3 {
                next = rx.try_recv();
                continue;
            }
            let qos0 = match &p {
                Outbound::Publish {
                    qos: 0, payload, ..
                } => Some(payload.len() as u64),
                _ => None,
            };
            if let Err(e) = codec.encode(p, &mut buf) {
                tracing::warn!(error = %e, "cannot encode an MQTT packet");
            }
            if let Some(bytes) = qos0 {
                qos0_out.sub(bytes);
            }
            next = if buf.len() < 64 * 1024 {
                rx.try_recv()
            } else {
                None
            };
        }
        match tokio::time::timeout(write_timeout, writer.write_all(&buf)).await {
            // Nothing more queued: an idle connection keeps no batch-sized buffer.
            Ok(Ok(())) if rx.is_empty() && buf.capacity() > MIN_READ => buf = BytesMut::new(),
            Ok(Ok(())) => {}
            Ok(Err(_)) => return CloseReason::PeerClosed,
            Err(_) => {
                metrics::refusal(PROTOCOL, "slow_consumer");
                return CloseReason::SlowConsumer;
            }
        }
    }
    let _ = writer.shutdown().await;
    // Every sender is gone: the connection closed first and knows why.
    CloseReason::PeerClosed
}
