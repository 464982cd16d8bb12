//! The write side of one MQTT connection, driven by the connection's own task beside its
//! reads: packets the session queued are encoded into one buffer and written as the socket
//! takes them. No writer task and no channel to it: a message delivered costs no wake-up of a
//! second task, and an idle connection holds one task's state instead of two (docs/bench.md).
//!
//! Writes are bounded by `limits.write_timeout`: the bytes pending when the clock starts must
//! all be written within it, or the client is a slow consumer and is closed. Packets stay
//! queued (unencoded, counted by the session's buffers) while more than [`BATCH`] bytes wait.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::close::CloseReason;
use super::codec::{Outbound, Version, encode_as};
use crate::flow::Pressure;
use crate::protocol::clock;

/// Encoded bytes waiting for the socket beyond which queued packets are left unencoded.
const BATCH: usize = 64 * 1024;
/// An emptied buffer larger than this is given back: an idle connection keeps none.
const KEEP: usize = 1024;
/// How many times in a row [`Writer::write_soon`] gives its turn away before it writes: what a
/// client that never stops sending is owed still goes out every this many packets.
const PASS_OVER: u8 = 64;
/// `passed_over`'s top bit: nothing but answers to the client's own packets can come to this
/// connection (it has no consumers), so [`Writer::write_soon`] gives no turn away.
const LONE: u8 = 0x80;

pub struct Writer<W> {
    io: W,
    version: Version,
    /// The largest packet it encodes: the writer keeps no encoder (`codec::encode_as`), one
    /// beside the reader's decoder was 40 bytes of every connection.
    max_packet: u32,
    /// Encoded, not yet written.
    buf: BytesMut,
    /// Written but maybe held by a layer below (TLS): flushed before the writer is idle.
    unflushed: bool,
    /// Until when the bytes `owed` must be written, in [`clock::since_epoch`]'s milliseconds
    /// (an `Option<Instant>` is 16 bytes of every connection, this 8).
    deadline: Option<NonZeroU64>,
    /// A buffer's worth at most ([`BATCH`] and one packet), so 32 bits.
    owed: u32,
    /// `limits.write_timeout` in milliseconds: a `Duration` is 8 bytes more of every
    /// connection.
    write_timeout_ms: u32,
    /// A write failed or timed out: nothing more is written.
    failed: bool,
    /// Turns given away since the last write (`write_soon`), below [`LONE`], the flag
    /// [`set_lone`](Self::set_lone) keeps in the top bit (a field of its own took every
    /// connection's state a size class up).
    passed_over: u8,
}

/// The body bytes a QoS 0 PUBLISH counts in its gauge; `None` for any other packet.
fn qos0_bytes(p: &Outbound) -> Option<u64> {
    match p {
        Outbound::Publish {
            qos: 0, payload, ..
        } => Some(payload.len() as u64),
        Outbound::Encoded { payload, .. } => Some(*payload),
        _ => None,
    }
}

/// Takes the QoS 0 PUBLISHes in `queue` out of `gauge` at once: the session's last packets,
/// written by [`Writer::finish`] after the session (and its gauge) let go, and whose
/// publishers pacing on the gauge must not wait for that write.
pub fn leave_gauge(queue: &VecDeque<Outbound>, gauge: &Pressure) {
    for bytes in queue.iter().filter_map(qos0_bytes) {
        gauge.sub(bytes);
    }
}

/// What a step of writing ran into.
pub enum WriteError {
    PeerClosed,
    SlowConsumer,
}

impl From<WriteError> for CloseReason {
    fn from(e: WriteError) -> CloseReason {
        match e {
            WriteError::PeerClosed => CloseReason::PeerClosed,
            WriteError::SlowConsumer => CloseReason::SlowConsumer,
        }
    }
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W, version: Version, max_packet: u32, write_timeout: Duration) -> Self {
        Writer {
            io,
            version,
            max_packet,
            buf: BytesMut::new(),
            unflushed: false,
            deadline: None,
            owed: 0,
            write_timeout_ms: u32::try_from(write_timeout.as_millis()).unwrap_or(u32::MAX),
            failed: false,
            passed_over: 0,
        }
    }

    /// Encodes `p` behind what is pending; a QoS 0 PUBLISH leaves `qos0_out` (the session's
    /// QoS 0 outbound gauge, passed in: kept here as well, it was 8 bytes of every
    /// connection).
    pub fn encode(&mut self, p: Outbound, qos0_out: Option<&Pressure>) {
        // 3.1.1 has no server DISCONNECT: closing is the answer.
        if matches!(p, Outbound::Disconnect { .. }) && self.version == Version::V3 {
            return;
        }
        let qos0 = qos0_bytes(&p);
        if let Err(e) = encode_as(self.version, self.max_packet, p, &mut self.buf) {
            tracing::warn!(error = %e, "cannot encode an MQTT packet");
        }
        if let (Some(bytes), Some(gauge)) = (qos0, qos0_out) {
            gauge.sub(bytes);
        }
    }

    /// Encodes queued packets while fewer than [`BATCH`] bytes wait, and starts the write
    /// clock for what waits if it is not running.
    pub fn fill(&mut self, queue: &mut VecDeque<Outbound>, qos0_out: Option<&Pressure>) {
        if !queue.is_empty() && self.buf.len() < BATCH {
            // Room for what this call encodes, made once rather than grown by doubling with
            // every byte copied again at each step.
            let mut want = 0;
            for p in queue.iter() {
                want += p.size_hint();
                if self.buf.len() + want >= BATCH {
                    break;
                }
            }
            if !self.buf.try_reclaim(want) {
                // Whatever the socket has not taken yet moves to a buffer sized for it and
                // the batch: growing this one in place copied the bytes already written as
                // well (about 75 instructions a delivered QoS 0 message in 1→1 under
                // callgrind, where the subscriber's socket took its batches part by part).
                let mut grown = BytesMut::with_capacity(self.buf.len() + want);
                grown.extend_from_slice(&self.buf);
                self.buf = grown;
            }
        }
        while self.buf.len() < BATCH
            && let Some(p) = queue.pop_front()
        {
            self.encode(p, qos0_out);
        }
        if queue.capacity() > 0 && queue.is_empty() && !self.is_busy() {
            // Everything is out: an idle connection holds no packet slots (four of them, the
            // least a queue allocates, are 800 bytes). Given back once per batch written.
            *queue = VecDeque::new();
        }
        if self.deadline.is_none() && !self.buf.is_empty() {
            let due = clock::since_epoch(Instant::now()) + u64::from(self.write_timeout_ms);
            self.deadline = Some(NonZeroU64::new(due).unwrap_or(NonZeroU64::MIN));
            self.owed = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        }
    }

    /// Something to write or flush.
    pub fn is_busy(&self) -> bool {
        !self.failed && (!self.buf.is_empty() || self.unflushed)
    }

    /// A batch's worth waits: written before more is read.
    fn is_full(&self) -> bool {
        self.buf.len() >= BATCH
    }

    /// When the client counts as a slow consumer unless the socket takes what is owed.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
            .filter(|_| !self.failed)
            .map(|ms| clock::from_epoch(ms.get()))
    }

    /// The write clock ran out (the connection counts the refusal).
    pub fn timed_out(&mut self) -> WriteError {
        self.failed = true;
        WriteError::SlowConsumer
    }

    /// [`write_some`](Self::write_some), but only after the task has had one turn with
    /// nothing else to do, unless a batch's worth waits already. In the connection's `select!`
    /// the first poll of this yields, so every event already ready (a read, a delivery, an
    /// engine confirm) is handled first and its answer joins the same write; the turn given to
    /// the scheduler lets the tasks that feed this connection (its publishers, the engine)
    /// run and add theirs. Writing as soon as one packet waited cost a system call per
    /// packet at QoS 1: one PUBACK or one credited PUBLISH per write. At most [`PASS_OVER`]
    /// turns in a row: a client pipelining thousands of packets gets its answers as it goes,
    /// not after the last one.
    pub async fn write_soon(&mut self) -> Result<(), WriteError> {
        if self.passed_over & LONE == 0 && self.give_way() {
            tokio::task::yield_now().await;
        }
        self.write_some().await
    }

    /// Says whether the connection has no consumers. Then a turn given away before writing
    /// gathers nothing: what it writes answers its own packets, and those of one read are
    /// answered together already. The turn only delayed them behind whatever else the worker
    /// ran (a subscriber's batch of deliveries), and a client that waits for its PUBACKs to
    /// send more (a window of QoS 1 publishes in flight) waited that long each round trip:
    /// 1→1 QoS 1 with the pipelining client delivered 8–20 % more without it (docs/bench.md).
    pub fn set_lone(&mut self, lone: bool) {
        if lone {
            self.passed_over |= LONE;
        } else {
            self.passed_over &= !LONE;
        }
    }

    /// Whether the writer gives this turn away, to a packet already read or whatever else is
    /// ready: not once a batch's worth waits, nor after [`PASS_OVER`] turns in a row (each
    /// call that says yes counts one).
    pub fn give_way(&mut self) -> bool {
        if self.is_full() || (self.passed_over & !LONE) >= PASS_OVER {
            return false;
        }
        self.passed_over += 1;
        true
    }

    /// Writes once, and flushes once everything is written. Cancel-safe: a write that did
    /// not complete wrote nothing, and a flush not completed is tried again. A poll function,
    /// not an `async fn`: the connection's select holds this future for the connection's
    /// whole life, and an `async fn`'s state is several times the size.
    pub fn write_some(&mut self) -> impl Future<Output = Result<(), WriteError>> + '_ {
        std::future::poll_fn(move |cx| self.poll_write_some(cx))
    }

    fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        if !self.buf.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf)) {
                Ok(0) | Err(_) => return Poll::Ready(Err(self.fail())),
                Ok(n) => {
                    self.passed_over &= LONE;
                    self.buf.advance(n);
                    self.unflushed = true;
                    self.owed = self
                        .owed
                        .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
                    if self.owed == 0 {
                        // What was owed is out: the clock restarts for what waits now.
                        self.deadline = None;
                    }
                }
            }
            if !self.buf.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if self.buf.capacity() > KEEP {
                self.buf = BytesMut::new();
            }
        }
        // A TLS stream may hold what it took until flushed; TCP's flush does nothing.
        match ready!(Pin::new(&mut self.io).poll_flush(cx)) {
            Ok(()) => {
                self.unflushed = false;
                Poll::Ready(Ok(()))
            }
            Err(_) => Poll::Ready(Err(self.fail())),
        }
    }

    fn fail(&mut self) -> WriteError {
        self.failed = true;
        WriteError::PeerClosed
    }

    /// Writes everything queued and pending, then shuts the write side down. Ok when all of
    /// it went out. What `queue` holds has left its gauge already ([`leave_gauge`]).
    pub async fn finish(&mut self, queue: &mut VecDeque<Outbound>) -> Result<(), WriteError> {
        if self.failed {
            return Err(WriteError::PeerClosed);
        }
        loop {
            self.fill(queue, None);
            if !self.is_busy() {
                break;
            }
            self.write_some().await?;
        }
        self.io.shutdown().await.map_err(|_| self.fail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_in_order_drops_a_3_1_1_disconnect_and_shuts_down() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut writer = Writer::new(ours, Version::V3, 1 << 20, Duration::from_secs(5));
        let mut queue = VecDeque::from([
            Outbound::PingResp,
            Outbound::PubAck {
                packet_id: 7,
                code: 0,
            },
            Outbound::Disconnect { code: 0x8B },
        ]);
        writer.fill(&mut queue, None);
        assert!(queue.is_empty() && writer.is_busy());
        assert!(
            writer.deadline().is_some(),
            "the write clock runs while bytes wait"
        );
        while writer.is_busy() {
            assert!(writer.write_some().await.is_ok());
        }
        assert!(writer.deadline().is_none(), "everything owed was written");
        assert!(writer.finish(&mut queue).await.is_ok());
        let mut bytes = Vec::new();
        theirs.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(bytes, [0xD0, 0x00, 0x40, 0x02, 0x00, 0x07]);
    }

    #[tokio::test]
    async fn a_few_packets_wait_one_turn_a_batch_does_not() {
        use futures_util::FutureExt;
        let (ours, mut theirs) = tokio::io::duplex(4 * BATCH);
        let mut writer = Writer::new(ours, Version::V5, 1 << 20, Duration::from_secs(5));
        writer.fill(&mut VecDeque::from([Outbound::PingResp]), None);
        let mut soon = Box::pin(writer.write_soon());
        assert!(
            (&mut soon).now_or_never().is_none(),
            "first poll: the turn is given away, nothing written"
        );
        assert!(soon.await.is_ok());
        let mut bytes = [0u8; 2];
        theirs.read_exact(&mut bytes).await.unwrap();
        assert_eq!(bytes, [0xD0, 0x00]);

        // Passed over again and again (other events won each turn): it stops giving way.
        writer.fill(&mut VecDeque::from([Outbound::PingResp]), None);
        for _ in 0..PASS_OVER {
            assert!(writer.write_soon().now_or_never().is_none());
        }
        assert!(matches!(writer.write_soon().now_or_never(), Some(Ok(()))));
        theirs.read_exact(&mut bytes).await.unwrap();

        let mut queue: VecDeque<_> = (0..=BATCH / 4)
            .map(|_| Outbound::PubAck {
                packet_id: 1,
                code: 0,
            })
            .collect();
        writer.fill(&mut queue, None);
        assert!(writer.is_full());
        let written = writer.write_soon().now_or_never();
        assert!(
            matches!(written, Some(Ok(()))),
            "a full batch is written at the first poll"
        );
    }

    #[tokio::test]
    async fn a_lone_connections_answers_wait_no_turn_and_its_count_is_kept() {
        use futures_util::FutureExt;
        let (ours, mut theirs) = tokio::io::duplex(4 * BATCH);
        let mut writer = Writer::new(ours, Version::V3, 1 << 20, Duration::from_secs(5));
        writer.set_lone(true);
        writer.fill(
            &mut VecDeque::from([Outbound::PubAck {
                packet_id: 7,
                code: 0,
            }]),
            None,
        );
        assert!(
            matches!(writer.write_soon().now_or_never(), Some(Ok(()))),
            "written at the first poll"
        );
        let mut bytes = [0u8; 4];
        theirs.read_exact(&mut bytes).await.unwrap();
        assert_eq!(bytes, [0x40, 0x02, 0x00, 0x07]);

        // The flag does not count as turns passed over, and a write keeps it.
        assert!(writer.give_way(), "packets read first still go first");
        writer.fill(&mut VecDeque::from([Outbound::PingResp]), None);
        assert!(matches!(writer.write_soon().now_or_never(), Some(Ok(()))));
        theirs.read_exact(&mut bytes[..2]).await.unwrap();
        writer.fill(&mut VecDeque::from([Outbound::PingResp]), None);
        assert!(matches!(writer.write_soon().now_or_never(), Some(Ok(()))));
        theirs.read_exact(&mut bytes[..2]).await.unwrap();

        // Given consumers, it waits its turn again.
        writer.set_lone(false);
        writer.fill(&mut VecDeque::from([Outbound::PingResp]), None);
        assert!(writer.write_soon().now_or_never().is_none());
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_is_past_its_deadline() {
        let (ours, _theirs) = tokio::io::duplex(16);
        let mut writer = Writer::new(ours, Version::V5, 1 << 20, Duration::from_millis(20));
        let mut queue: VecDeque<_> = (1..=20)
            .map(|packet_id| Outbound::PubAck { packet_id, code: 0 })
            .collect();
        writer.fill(&mut queue, None);
        let deadline = writer.deadline().expect("bytes wait");
        let stalled = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), async {
            while writer.write_some().await.is_ok() {}
        })
        .await;
        assert!(stalled.is_err(), "the pipe is full: the writer waits");
        assert!(writer.is_busy());
        assert!(matches!(writer.timed_out(), WriteError::SlowConsumer));
        assert!(
            !writer.is_busy(),
            "a writer that timed out writes nothing more"
        );
    }
}
