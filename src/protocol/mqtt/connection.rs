//! One MQTT connection over any byte stream (TCP now; WebSocket frames later): reads and
//! decodes, always — acks and pings are handled whatever the outbound side does —, writes
//! through a writer task under `limits.write_timeout`, enforces the CONNECT timeout, the
//! keep-alive (× 1.5), the token's expiry and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::codec::{Codec, DecodeError, Inbound, Outbound, Version};
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

pub async fn run<S>(stream: S, ctx: Context, conn: Arc<Connection>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    metrics::connection_opened(PROTOCOL);
    serve(stream, &ctx, conn).await;
    metrics::connection_closed(PROTOCOL);
}

async fn serve<S>(stream: S, ctx: &Context, conn: Arc<Connection>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Until CONNECT is answered this connection holds a place among the unauthenticated ones.
    let waiting = match ctx.flow.admission.unauthenticated() {
        Ok(place) => place,
        Err(full) => {
            tracing::info!(remote = %conn.remote, "closed before CONNECT: {full}");
            metrics::refusal(PROTOCOL, full.as_str());
            return;
        }
    };
    let (mut reader, writer) = tokio::io::split(stream);
    let max_packet = (ctx.config.limits.max_message_bytes.as_u64() + 64 * 1024) as u32;
    let mut codec = Codec::new(max_packet);
    let mut input = Input::new();

    // CONNECT first, within mqtt.connect_timeout.
    let first = tokio::time::timeout(
        ctx.config.mqtt.connect_timeout,
        read_packet(&mut reader, &mut input, &mut codec),
    )
    .await;
    let connect = match first {
        Ok(Ok(Some(Inbound::Connect(c)))) => c,
        Ok(Ok(Some(_))) => {
            tracing::info!(remote = %conn.remote, "MQTT packet before CONNECT; closing");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(remote = %conn.remote, error = %e, "bad CONNECT; closing");
            metrics::refusal(PROTOCOL, "malformed");
            // A CONNECT naming MQTT with a level we do not speak: 3.1.1's CONNACK return code 1
            // (0x01 "unacceptable protocol version") is understood by every version.
            // [MQTT-3.1.3-9]: a client id the server rejects gets CONNACK 0x02 (3.1.1) / 0x85.
            let answer: &[u8] = match e {
                DecodeError::InvalidProtocol | DecodeError::UnsupportedProtocolLevel
                    if input.buf.get(4..8) == Some(b"MQTT") =>
                {
                    &[0x20, 0x02, 0x00, 0x01]
                }
                DecodeError::InvalidClientId if codec.version() == Some(Version::V5) => {
                    &[0x20, 0x03, 0x00, 0x85, 0x00]
                }
                DecodeError::InvalidClientId => &[0x20, 0x02, 0x00, 0x02],
                _ => &[],
            };
            if !answer.is_empty() {
                let mut writer = writer;
                let _ = writer.write_all(answer).await;
                let _ = writer.shutdown().await;
            }
            return;
        }
        Err(_) => {
            tracing::info!(remote = %conn.remote, "no CONNECT within mqtt.connect_timeout; closing");
            return;
        }
    };
    let version = connect.version;
    let (tx, rx) = mpsc::unbounded_channel();
    let qos0_queued = Arc::new(AtomicUsize::new(0));
    let mut writer_task = tokio::spawn(write_loop(
        writer,
        rx,
        version,
        max_packet,
        ctx.config.limits.write_timeout,
        qos0_queued.clone(),
    ));
    let mut session = match Session::connect(
        ctx.clone(),
        conn.clone(),
        *connect,
        tx.clone(),
        qos0_queued,
    )
    .await
    {
        Ok((session, connack)) => {
            drop(waiting);
            let _ = tx.send(connack);
            session.after_connack();
            session
        }
        Err(refused) => {
            drop(waiting);
            tracing::info!(remote = %conn.remote, code = refused.code, "CONNECT refused: {}", refused.why);
            metrics::refusal(PROTOCOL, "connect_refused");
            let _ = tx.send(Outbound::ConnAck {
                code: refused.code,
                session_present: false,
                session_expiry: None,
                receive_max: 1,
                max_packet_size: max_packet,
                assigned_client_id: None,
                max_qos: 1,
                auth_method: None,
                server_keep_alive: None,
            });
            drop(tx);
            if let Ok(Ok(())) = tokio::time::timeout(LINGER, writer_task).await {
                linger(&mut reader).await;
            }
            return;
        }
    };

    let keep_alive = session.keep_alive();
    let keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let mut last_seen = Instant::now();
    let mut writer_ended = false;
    let (close, graceful) = loop {
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
        let may_read = session.inflow.may_read(ctx.config.mqtt.receive_maximum);
        tokio::select! {
            _ = ctx.shutdown.wait() => break (Some(reason::SERVER_SHUTTING_DOWN), false),
            _ = tokio::time::sleep_until(expiry_at.unwrap_or_else(far)) => break (Some(reason::TOKEN_EXPIRED), false),
            _ = tokio::time::sleep_until(keep_alive_at) => break (Some(reason::KEEP_ALIVE_TIMEOUT), false),
            _ = &mut writer_task => {
                writer_ended = true;
                break (None, false);
            }
            packet = read_packet(&mut reader, &mut input, &mut codec), if may_read => {
                last_seen = Instant::now();
                match packet {
                    Ok(Some(p)) => match session.handle(p).await {
                        // Packets already buffered decode without touching the socket, so a
                        // flat-out publisher would never yield: spend tokio's cooperative
                        // budget per packet, so it takes turns with the connections it
                        // publishes to (50 publishers → 1 subscriber fell from 100k
                        // deliveries/s to almost none without this; see docs/mqtt.md).
                        Outcome::Continue => tokio::task::consume_budget().await,
                        Outcome::Disconnected => break (None, true),
                        Outcome::Close(code) => break (code, false),
                    },
                    Ok(None) => break (None, false),
                    Err(DecodeError::MaxSizeExceeded { .. }) => break (Some(0x95), false),
                    Err(e) => {
                        tracing::info!(remote = %conn.remote, error = %e, "malformed MQTT packet; closing");
                        break (Some(0x81), false);
                    }
                }
            }
            Some((key, d)) = session.consumers.next(), if !session.consumers.is_empty() => {
                if let Outcome::Close(code) = session.deliver_batch(key, d).await {
                    break (code, false);
                }
            }
            Some((ack, result)) = session.inflow.next_confirmed(), if session.inflow.awaiting() => {
                if let Outcome::Close(code) = session.confirmed(ack, result).await {
                    break (code, false);
                }
            }
            _ = tokio::time::sleep_until(retry_at) => {
                if let Outcome::Close(code) = session.retry_parked().await {
                    break (code, false);
                }
            }
            Some(_) = session.takeovers.recv() => {
                if let Outcome::Close(code) = session.taken_over() {
                    break (code, false);
                }
            }
        }
    };
    session.end(graceful).await;
    if let (Some(code), Version::V5) = (close, version) {
        let _ = tx.send(Outbound::Disconnect { code });
    }
    drop(tx);
    drop(session);
    // The DISCONNECT (if any) is written and the write side shut down before the linger.
    if !writer_ended && let Ok(Ok(())) = tokio::time::timeout(LINGER, writer_task).await {
        linger(&mut reader).await;
    }
}

/// Reads and discards until the peer closes, for at most [`LINGER`].
async fn linger<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut sink = [0u8; 4096];
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
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    version: Version,
    max_packet: u32,
    write_timeout: Duration,
    qos0_queued: Arc<AtomicUsize>,
) {
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
                next = rx.try_recv().ok();
                continue;
            }
            let qos0 = matches!(p, Outbound::Publish { qos: 0, .. });
            if let Err(e) = codec.encode(p, &mut buf) {
                tracing::warn!(error = %e, "cannot encode an MQTT packet");
            }
            if qos0 {
                qos0_queued.fetch_sub(1, Ordering::Relaxed);
            }
            next = if buf.len() < 64 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        match tokio::time::timeout(write_timeout, writer.write_all(&buf)).await {
            // Nothing more queued: an idle connection keeps no batch-sized buffer.
            Ok(Ok(())) if rx.is_empty() && buf.capacity() > MIN_READ => buf = BytesMut::new(),
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                metrics::refusal(PROTOCOL, "slow_consumer");
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}
