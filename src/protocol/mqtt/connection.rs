//! One MQTT connection over any byte stream (TCP, or WebSocket frames bridged), served by one
//! task: reads and decodes, always — acks and pings are handled whatever the outbound side
//! does —, writes what the session queued as the socket takes it (`writer`, under
//! `limits.write_timeout`), enforces the CONNECT timeout, the keep-alive (× 1.5), the token's
//! expiry and shutdown.

use crate::flow::{Bound, BufferKind, Pressure};
use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use futures_util::future::OptionFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio_util::io::poll_read_buf;

use super::close::CloseReason;
use super::codec::{Codec, Connect, DecodeError, Inbound, Outbound, Version};
use super::session::{Ack, Outcome, Session, reason};
use super::writer::Writer;
use crate::context::{Connection, Context, Registered, Stop};
use crate::engine::{ConsumerEvent, EngineError};
use crate::metrics;
use crate::protocol::clock;

const PROTOCOL: &str = "mqtt";
/// Reads start at `MIN_READ` and double while they fill what was offered, up to `MAX_READ`:
/// a flat-out publisher gets large reads, an idle device keeps no buffer at all — memory per
/// idle connection is what decides how many devices fit on a machine.
const MIN_READ: usize = 256;
const MAX_READ: usize = 16 * 1024;

/// How long a closing connection keeps reading (and discarding) after its last packet went
/// out and its write side was shut down. Closing a socket with unread input makes the kernel
/// send a reset, and a client that is still sending would read that reset instead of the
/// DISCONNECT that says why; a second is plenty on any network that delivered the packet.
pub const LINGER: Duration = Duration::from_secs(1);

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

/// Serves one MQTT connection over `transport` (TCP, TLS or a WebSocket).
///
/// Not an `async fn`: one keeps its arguments twice in its state (as passed, and as the locals
/// its body moves them to), and this state is the task's for the connection's whole life.
///
/// Tokio allocates a task in multiples of 128 bytes, and over TCP this one is 512 with 8 bytes
/// to spare: its future is 392 bytes, of which the loop in `serve_session` is 352, and 400 is
/// the most a 512-byte task holds; 16 bytes more anywhere below make every connection's task
/// 640. `-Zprint-type-sizes` shows it (docs/bench.md).
pub fn run<S>(
    stream: S,
    ctx: Context,
    conn: Arc<Connection>,
    transport: crate::context::Transport,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Two steps, each its own future, so the task's state is the larger of the two, not their
    // sum plus the padding the compiler leaves between what each holds; the handshake's on
    // the heap, given back once it is over (docs/bench.md). Made here, outside the task's
    // future: captured by it, the stream would stay in its state after being moved on (1.2
    // KiB for a TLS stream).
    let handshaking = {
        let (ctx, conn) = (ctx.clone(), conn.clone());
        Box::pin(async move { handshake(stream, &ctx, &conn, transport).await })
    };
    async move {
        metrics::connection_opened(PROTOCOL);
        // The connected session's steps in this one block, each of them only the size of what
        // it awaits: a future of their own kept its arguments and locals beside the loop's for
        // the connection's life (112 bytes, which took the task to 640; docs/bench.md). The
        // handshake's result is taken apart in a statement of its own: a `match` around the
        // loop kept it (16 bytes) beside the loop's state.
        let mut live = match handshaking.await {
            Ok(live) => live,
            Err(why) => return closed(&conn, why),
        };
        let why = serve_session(&ctx, &mut live).await;
        closed(&conn, Box::pin(finish(*live, why)).await);
    }
}

/// Logs and counts why the connection closed.
fn closed(conn: &Connection, why: CloseReason) {
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

/// The socket's read side and its decoding state.
struct Wire<R> {
    reader: R,
    input: Input,
    codec: Codec,
}

impl<R: AsyncRead + Unpin> Wire<R> {
    /// The next packet; `Ok(None)` when the peer closed. Cancel-safe: what was read stays
    /// buffered. A poll function, not an `async fn`: the loop's select holds this future
    /// for the connection's whole life, and an `async fn`'s state kept its arguments twice
    /// beside the read's own (104 bytes, now 8).
    fn read(&mut self) -> impl Future<Output = Result<Option<Inbound>, DecodeError>> + '_ {
        std::future::poll_fn(move |cx| {
            let packet = self.poll_read(cx);
            self.codec.between = matches!(packet, Poll::Ready(Ok(Some(_))));
            packet
        })
    }

    /// The PUBACK the buffer starts with, taken, when it is a plain one (no reason, no
    /// properties). No socket read: the run of PUBACKs one read brought.
    fn next_puback(&mut self) -> Option<u16> {
        self.codec.puback_in(&mut self.input.buf)
    }

    /// Decodes what was read, reading until one packet decodes.
    fn poll_read(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<Option<Inbound>, DecodeError>> {
        let input = &mut self.input;
        loop {
            if let Some(p) = self.codec.decode(&mut input.buf)? {
                return Poll::Ready(Ok(Some(p)));
            }
            if input.buf.is_empty() && input.next == MIN_READ {
                // A quiet connection holds no buffer while it waits: it reads into the stack,
                // and what came is copied into a buffer made for it (a copy of at most
                // `MIN_READ` bytes, for a connection that sends rarely).
                input.buf = BytesMut::new();
                let mut stack = [MaybeUninit::<u8>::uninit(); MIN_READ];
                let mut read = ReadBuf::uninit(&mut stack);
                match ready!(Pin::new(&mut self.reader).poll_read(cx, &mut read)) {
                    Ok(()) if read.filled().is_empty() => return Poll::Ready(Ok(None)),
                    Ok(()) => {
                        self.codec.heard = true;
                        if read.remaining() == 0 {
                            input.next *= 2;
                        }
                        input.buf.extend_from_slice(read.filled());
                    }
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
                continue;
            }
            if input.buf.is_empty() && input.buf.capacity() > 2 * input.next {
                // Quiet again after a burst: give the large buffer back.
                input.buf = BytesMut::new();
            }
            // Room for the rest of a packet begun, however large (the codec left it whole).
            input
                .buf
                .reserve(input.next.max(self.codec.missing(&input.buf)));
            let offered = input.buf.capacity() - input.buf.len();
            // A read that ends a packet the last one cut says nothing of how much the client
            // sends at once: shrinking on that tail made a client that writes 8.3 KB at a time
            // read in two (8 KiB, then the tail) every other time.
            let tail = !input.buf.is_empty();
            match ready!(poll_read_buf(
                Pin::new(&mut self.reader),
                cx,
                &mut input.buf
            )) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(n) if n >= offered => input.next = (input.next * 2).min(MAX_READ),
                Ok(n) if n < input.next / 4 && !tail => {
                    input.next = (input.next / 2).max(MIN_READ);
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
            self.codec.heard = true;
        }
    }

    /// A whole packet is read and waiting, so the loop handles it before writing. Told from
    /// the buffered bytes, not decoded ahead: a decoded packet kept here would be 208 bytes
    /// of every connection's state.
    fn has_ready(&self) -> bool {
        self.codec.between && super::codec::whole_packet(&self.input.buf)
    }

    /// Reads and discards until the peer closes, for at most [`LINGER`]. Into the input
    /// buffer the connection already has: one of its own (4 KiB) was taken by every connection
    /// at once when the gateway shut down, 60 MiB at 15,000 connections.
    async fn linger(&mut self) {
        let (reader, buf) = (&mut self.reader, &mut self.input.buf);
        let _ = tokio::time::timeout(LINGER, async {
            loop {
                buf.clear();
                buf.reserve(MIN_READ);
                if !matches!(reader.read_buf(buf).await, Ok(n) if n > 0) {
                    return;
                }
            }
        })
        .await;
    }
}

/// What a connected session holds for its whole life, on the heap once: kept in the task's own
/// state it was laid out beside the handshake's locals.
struct Live<S> {
    session: Session,
    wire: Wire<ReadHalf<S>>,
    writer: Writer<WriteHalf<S>>,
}

/// CONNECT, authentication and CONNACK; the connected session, or why there is none.
async fn handshake<S>(
    stream: S,
    ctx: &Context,
    conn: &Arc<Connection>,
    transport: crate::context::Transport,
) -> Result<Box<Live<S>>, CloseReason>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Until CONNECT is answered this connection holds a place among the unauthenticated ones.
    let waiting = match ctx.flow.admission.unauthenticated() {
        Ok(place) => place,
        Err(full) => {
            tracing::info!(remote = %conn.remote, "closed before CONNECT: {full}");
            metrics::refusal(PROTOCOL, full.as_str());
            return Err(CloseReason::AdmissionFull);
        }
    };
    let (reader, mut write_half) = tokio::io::split(stream);
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
                let _ = write_half.write_all(&bytes).await;
                let _ = write_half.shutdown().await;
            }
            return Err(why);
        }
    };
    let version = connect.version;
    let mut writer = Writer::new(
        write_half,
        version,
        max_packet,
        ctx.config.limits.write_timeout,
    );
    // The QoS 0 outbound buffer's gauge: publishers whose messages land here while it is above
    // its high-water mark are paced (DESIGN.md §7).
    let limits = &ctx.config.limits;
    let qos0_out = Pressure::new(
        Bound {
            messages: limits.outbound_buffer_messages as u64,
            bytes: limits.outbound_buffer_bytes.as_u64(),
        },
        BufferKind::Mqtt,
    );
    // Boxed, as are the rarer steps below: what an await point holds is part of the task's
    // state for the connection's whole life (docs/bench.md, idle connections).
    let connected = Box::pin(Session::connect(
        ctx.clone(),
        conn.clone(),
        *connect,
        qos0_out.clone(),
    ));
    // The session is moved to the heap before anything else is awaited: a result held across
    // the refusal's awaits would be 1.3 KiB of the task's state for the connection's life.
    let refused = match connected.await {
        Ok((mut session, connack)) => {
            drop(waiting);
            writer.encode(connack, None);
            session.after_connack();
            session.registered = Some(ctx.registry.register(
                conn.id,
                crate::context::About {
                    protocol: crate::context::Protocol::Mqtt,
                    transport,
                    remote: conn.remote,
                    subject: session.subject().clone(),
                    client_id: Some(session.client_id().clone()),
                    buffer: Some(qos0_out),
                    stats: conn.stats.clone(),
                },
                session.expires_at(),
            ));
            session.show_subscriptions();
            return Ok(Box::new(Live {
                session,
                wire,
                writer,
            }));
        }
        Err(refused) => refused,
    };
    drop(waiting);
    tracing::info!(remote = %conn.remote, code = refused.code, "CONNECT refused: {}", refused.why);
    metrics::refusal(PROTOCOL, "connect_refused");
    writer.encode(refusal(refused.code, max_packet), None);
    drop(refused);
    if let Ok(Ok(())) = tokio::time::timeout(LINGER, writer.finish(&mut VecDeque::new())).await {
        wire.linger().await;
    }
    Err(CloseReason::ConnectRefused)
}

/// The session's end, once its loop returned `why`: the session ended (state stored or
/// discarded, its place given back) and dropped, then the DISCONNECT (if any) and what was
/// left written, the write side shut down, and the linger. Boxed by the caller, taking the
/// connection whole: it runs once, and its state is on the heap only while it does.
async fn finish<S>(live: Live<S>, why: CloseReason) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Live {
        mut session,
        mut wire,
        mut writer,
    } = live;
    Box::pin(session.end(why.is_graceful())).await;
    if let Some(code) = why.code() {
        session.outbound().push_back(Outbound::Disconnect { code });
    }
    let (out, qos0_out) = session.outbound_and_gauge();
    let mut rest = std::mem::take(out);
    super::writer::leave_gauge(&rest, qos0_out);
    drop(session);
    if let Ok(Ok(())) = tokio::time::timeout(LINGER, writer.finish(&mut rest)).await {
        wire.linger().await;
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
        Ok(Ok(None) | Err(DecodeError::Io(_))) => Err((CloseReason::PeerClosed, None)),
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

/// The deadlines the connection's one timer serves: the keep-alive (× 1.5), the token's
/// expiry, the write clock and parked publishes' retry. Only the keep-alive's and the
/// expiry's are kept here; the others, and what the two are worked out from, are read again
/// from the session and the writer when the timer is set and when it fires (kept across the
/// loop's select, each is 16 bytes more of the task's state for the connection's whole life).
struct Clocks {
    /// The keep-alive is checked lazily: when the timer finds it due, it looks at when the
    /// client was last seen.
    last_seen: Instant,
    keep_alive_due: Option<Instant>,
    expiry: clock::Expiry,
}

/// How long the client may stay silent: its keep-alive × 1.5 (MQTT 3.1.1 §3.1.2.10, 5
/// §3.1.2.10); `None` for a keep-alive of 0.
fn keep_alive(session: &Session) -> Option<Duration> {
    let seconds = session.keep_alive();
    (seconds > 0).then(|| Duration::from_millis(u64::from(seconds) * 1500))
}

impl Clocks {
    fn new(session: &Session) -> Clocks {
        let last_seen = Instant::now();
        Clocks {
            last_seen,
            keep_alive_due: keep_alive(session).map(|k| last_seen + k),
            expiry: clock::Expiry::default(),
        }
    }

    fn soonest<W: AsyncWrite + Unpin>(
        &mut self,
        session: &Session,
        writer: &Writer<W>,
    ) -> Option<Instant> {
        [
            self.keep_alive_due,
            self.expiry.due(session.expires_at(), session.leeway()),
            session.inflow.retry_at(),
            writer.deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The timer fired: what was due, if anything.
    fn fired<W: AsyncWrite + Unpin>(&mut self, session: &Session, writer: &mut Writer<W>) -> Now {
        let now = Instant::now();
        let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        if due(self.expiry.due(session.expires_at(), session.leeway())) {
            Now::Done(Outcome::Close(CloseReason::TokenExpired))
        } else if due(writer.deadline()) {
            metrics::refusal(PROTOCOL, "slow_consumer");
            Now::Done(Outcome::Close(writer.timed_out().into()))
        } else if due(self.keep_alive_due) {
            self.keep_alive_due = keep_alive(session).map(|k| self.last_seen + k);
            Now::Done(if due(self.keep_alive_due) {
                Outcome::Close(CloseReason::KeepAliveTimeout)
            } else {
                Outcome::Continue
            })
        } else if due(session.inflow.retry_at()) {
            Now::Retry
        } else {
            Now::Done(Outcome::Continue)
        }
    }
}

/// The connected session's loop: packets, deliveries, confirms, parked publishes, takeover,
/// writes, and every timer (keep-alive × 1.5, token expiry, write timeout, shutdown). Returns
/// why it ended.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn serve_session<'a, S>(
    ctx: &'a Context,
    live: &'a mut Live<S>,
) -> impl Future<Output = CloseReason> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Not an `async fn`, for the reason `run` is not: the task's state would hold each
    // argument twice. The session, the wire and the writer are reached through `live` each
    // time, not bound to names of their own: each name kept across the select's await is 8
    // bytes of the task's state.
    async move {
        let timer = clock::idle_timer();
        tokio::pin!(timer);
        let mut clocks = Clocks::new(&live.session);
        // Both ways the connection is told to stop (an administrator's close, the gateway's
        // shutdown), through its registry entry: polled every turn, it is a waker registration
        // and an atomic load (each poll of a cancellation token's wait took the token's lock, one
        // that every connection shares). Registered before this loop starts.
        let mut stop = live.session.registered.as_ref().map(Registered::stopped);
        loop {
            // Publishes read and staged go to the engine together once this read's packets
            // are handled (or the run is full): before their answers are written.
            if live.session.flushes(|| live.wire.has_ready())
                && let Outcome::Close(why) = live.session.flush_staged()
            {
                return why;
            }
            let (out, qos0_out) = live.session.outbound_and_gauge();
            live.writer.fill(out, Some(qos0_out));
            let timed =
                clock::set_sooner(timer.as_mut(), clocks.soonest(&live.session, &live.writer));
            let may_read = live.session.takes_packets();
            // Packets already read are handled before what they answer is written: one write
            // carries the answers to a whole read (a PUBACK per PUBLISH otherwise costs a system
            // call each), unless a batch's worth waits already or the writer gave way many turns
            // in a row (a client pipelining thousands of packets gets its answers as it goes).
            // Only while the packet ahead will be read: a connection that may not read (paced, or
            // at its Receive Maximum) must still drain what it owes its client. Deliveries and
            // confirms get the same through `write_soon`: it writes only once the task found
            // nothing else ready.
            let may_write = live.writer.is_busy()
                && !(may_read && live.wire.has_ready() && live.writer.give_way());
            // A connection with nothing to deliver writes only its answers: no turn given
            // away before them (`Writer::set_lone`).
            live.writer.set_lone(live.session.consumers.is_empty());
            let paused = live.session.delivery_paused();
            // The select only says what happened, and the event is turned into the step that
            // handles it in a block of its own that awaits nothing: a handler awaiting inside the
            // select, or anywhere the event's binding is still in scope (moved from or not), keeps
            // the event (208 bytes: it may hold a packet) in the task's state beside the select's
            // own futures, for the connection's whole life (docs/bench.md, idle connections).
            let now = {
                let step = {
                    let event = tokio::select! {
                        Some(why) = OptionFuture::from(stop.as_mut()) => Event::Done(Outcome::Close(match why {
                            Stop::Admin => CloseReason::AdministrativeAction,
                            Stop::Shutdown => CloseReason::ServerShuttingDown,
                        })),
                        _ = &mut timer, if timed => Event::Timer,
                        written = live.writer.write_soon(), if may_write => Event::Done(match written {
                            Ok(()) => Outcome::Continue,
                            Err(e) => Outcome::Close(e.into()),
                        }),
                        packet = live.wire.read(), if may_read => {
                            // The packet came with the socket read that brought its last
                            // bytes: one clock read per socket read, whatever it carried.
                            if std::mem::take(&mut live.wire.codec.heard) {
                                clocks.last_seen = Instant::now();
                            }
                            match packet {
                                Ok(Some(p)) => Event::Packet(p),
                                // A reset or a broken pipe is the client going away, not a malformed
                                // packet: counted and logged as that.
                                Ok(None) | Err(DecodeError::Io(_)) => Event::Done(Outcome::Close(CloseReason::PeerClosed)),
                                Err(DecodeError::MaxSizeExceeded { .. }) => Event::Done(Outcome::Close(CloseReason::PacketTooLarge)),
                                Err(e) => {
                                    tracing::info!(remote = %live.session.remote(), error = %e, "malformed MQTT packet; closing");
                                    Event::Done(Outcome::Close(CloseReason::MalformedPacket))
                                }
                            }
                        }
                        Some((key, event)) = live.session.consumers.next(), if !live.session.consumers.is_empty() && paused.is_none() && !live.session.window_held() => {
                            Event::Delivery(key, event)
                        }
                        // The pacing waits are boxed, made only while they are wanted: inline they
                        // would be 650 bytes of every connection's state.
                        _ = OptionFuture::from(paused.as_ref().map(|p| Box::pin(p.resume(ctx.config.limits.pace_max_wait)))), if paused.is_some() => Event::Done(Outcome::Continue),
                        Some((ack, result)) = live.session.inflow.next_confirmed(), if live.session.inflow.awaiting() => {
                            Event::Confirmed(ack, result)
                        }
                        _ = OptionFuture::from(live.session.stall.as_ref().map(|s| Box::pin(s.released()))), if live.session.stall.is_some() => {
                            Event::Unstall
                        }
                        Some(_) = live.session.takeovers.next() => Event::Done(live.session.taken_over()),
                    };
                    // The steps of almost every message — a PUBLISH not retained, a PUBACK, a confirm
                    // with nothing to take back — run in place, no future made per packet, their
                    // awaits after this block. Every other step takes its event whole, boxed: what it
                    // holds lives on the heap while it runs, not in every connection's state.
                    match event {
                        Event::Done(outcome) => Ok(Now::Done(outcome)),
                        Event::Timer => Ok(clocks.fired(&live.session, &mut live.writer)),
                        Event::Packet(Inbound::Publish(p)) if !p.retain => Ok(Now::Turns(
                            live.session.publish_plain(p, live.wire.has_ready()),
                        )),
                        Event::Packet(Inbound::PubAck(id)) => Ok(Now::PubAck(id)),
                        Event::Confirmed(ack, result) if !Session::undoes(&ack, &result) => {
                            Ok(Now::Done(live.session.settle(ack, result)))
                        }
                        // Made here, awaited once the event's block is over.
                        event => Err(Box::pin(handle_event(&mut live.session, event))),
                    }
                };
                match step {
                    Ok(now) => now,
                    Err(handler) => Now::Done(handler.await),
                }
            };
            let outcome = match now {
                Now::Done(outcome) => outcome,
                Now::Turns(outcome) => take_turns(&live.session, outcome).await,
                Now::PubAck(id) => {
                    let wire = &mut live.wire;
                    let settled = live.session.pubacks(
                        std::iter::once(id).chain(std::iter::from_fn(|| wire.next_puback())),
                    );
                    pubacked(&live.session, settled).await
                }
                Now::Retry => Box::pin(live.session.retry_parked()).await,
            };
            live.session.note_in_flight();
            if let Outcome::Close(why) = outcome {
                // What was read before the reason to close is published, as it would have
                // been unstaged.
                let _ = live.session.flush_staged();
                return why;
            }
        }
    }
}

/// What the connection's loop was woken for.
enum Event {
    /// Handled already, without awaiting.
    Done(Outcome),
    Packet(Inbound),
    Delivery(Arc<str>, ConsumerEvent),
    Confirmed(Ack, Result<(), EngineError>),
    /// The timer fired: the keep-alive, the token's expiry, the write clock or parked
    /// publishes' retry may be due.
    Timer,
    /// The pacing that stalled the connection's publishes is over.
    Unstall,
}

/// What is left to do after the event that woke the loop was taken apart.
enum Now {
    /// Handled.
    Done(Outcome),
    /// A publish handled; it takes its turn with the other connections.
    Turns(Outcome),
    PubAck(u16),
    /// Parked publishes are due again.
    Retry,
}

/// Any event but the common few, handled.
async fn handle_event(session: &mut Session, event: Event) -> Outcome {
    match event {
        Event::Packet(packet) => handle_packet(session, packet).await,
        Event::Delivery(key, event) => session.deliver_batch(key, event).await,
        Event::Confirmed(ack, result) => session.confirmed(ack, result).await,
        Event::Unstall => session.unstall().await,
        // The loop handles these itself; here only so the match is whole.
        Event::Done(outcome) => outcome,
        Event::Timer => Outcome::Continue,
    }
}

/// One packet from the client, handled.
async fn handle_packet(session: &mut Session, packet: Inbound) -> Outcome {
    // Publishes read before this packet reach the engine before it does anything (a
    // SUBSCRIBE after them must not hear them).
    if let outcome @ Outcome::Close(_) = session.flush_staged() {
        return outcome;
    }
    let outcome = session.handle(packet).await;
    take_turns(session, outcome).await
}

/// A run of PUBACKs, settled in place: through `handle`'s boxed future it cost more than the
/// settling. The run takes one turn.
async fn pubacked(session: &Session, settled: Option<crate::engine::Settled>) -> Outcome {
    if let Some(settled) = settled {
        let _ = settled.await;
    }
    take_turns(session, Outcome::Continue).await
}

/// After each packet: packets already buffered decode without touching the socket, so a
/// flat-out publisher would never yield. Tokio's cooperative budget is spent per packet, so
/// it takes turns with the connections it publishes to (50 publishers → 1 subscriber fell
/// from 100k deliveries/s to almost none without this; see docs/mqtt.md).
async fn take_turns(session: &Session, outcome: Outcome) -> Outcome {
    if session.stall.is_some() {
        // Paced: what it reads now only parks, while the consumers it waits for need the CPU
        // to drain — one packet per turn.
        tokio::task::yield_now().await;
    } else {
        tokio::task::consume_budget().await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_live_session_stays_in_its_size_class() {
        // Every MQTT connection has one, boxed: 512 bytes fill mimalloc's 512-byte class; 8
        // more take it to 640 (docs/bench.md).
        let size = std::mem::size_of::<super::Live<tokio::net::TcpStream>>();
        assert!(size <= 512, "{size}");
    }
}
