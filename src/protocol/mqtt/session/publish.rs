//! Inbound PUBLISH: topic aliases, QoS 2 state, the publish gate, the AMQP form of the
//! message, and the acknowledgements — pipelined: a publish goes to the engine at once and
//! the connection reads on while its confirm is outstanding; PUBACK/PUBREC go out in the
//! order the publishes arrived, as the confirms come in. Publishes over the rate limit are
//! parked (their acks withheld) and tried again; so are all publishes, QoS 0 included, while
//! the connection is paced (DESIGN.md §7). The publishes one socket read brings go to the
//! engine together (`run`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use sync_wrapper::SyncWrapper;

use crate::context::{Cleared, PublishRefused, Publishing, Run};
use crate::engine::retained::RetainedUndo;
use crate::flow::Stall;

use super::*;

mod message;
mod run;

use self::message::SharedProperties;
use self::run::{Staged, Unstaged};

/// The inbound side of one connection.
#[derive(Default)]
pub struct Inflow {
    /// MQTT 5 inbound topic aliases, made at the first: most clients use none.
    aliases: Sparse<HashMap<u16, String>>,
    /// QoS 2 packet ids published (or being published) and not yet released by PUBREL: a
    /// resend is acknowledged again, never published twice. Made at the first.
    pub(super) qos2: Sparse<HashSet<u16>>,
    /// What a connection that publishes keeps, made at its first publish: a device that only
    /// subscribes would carry 300 bytes for nothing. (Wrapped: an engine's confirm future
    /// need not be `Sync`, the session must be.)
    publisher: SyncWrapper<Sparse<Publisher>>,
    /// How many are in the publisher's `confirms` (at most Receive Maximum and one: 32 bits,
    /// beside `owed` in one word).
    waiting: u32,
    /// QoS 1 publishes in the publisher's `confirms` or its staged run whose PUBACK is owed.
    owed: u32,
    /// What the rate limit and pacing hold back, made at the first publish held: most
    /// connections never meet either (inline it was 80 bytes of every session).
    held: Sparse<Held>,
}

#[derive(Default)]
struct Publisher {
    /// Publishes handed to the engine, and answers queued behind them, in arrival order.
    confirms: FuturesOrdered<Awaiting>,
    /// The topic last published to and its routing key. A client publishes to the same few
    /// topics over and over, and the mapping (three checks, a pass, a UTF-8 check and an
    /// allocation, then the engine's copy of the key) was 5 % of a QoS 0 message's
    /// instructions; the engine keeps this key shared instead (`Channel::publish_shared`).
    last_key: Option<(String, Arc<str>)>,
    /// Publishes read, cleared and not yet handed to the engine: the rest of what one socket
    /// read brought goes with them ([`Session::flush_staged`]).
    run: Run<Staged>,
    /// The properties its publishes share.
    properties: SharedProperties,
}

#[derive(Default)]
struct Held {
    /// Publishes waiting in arrival order: QoS 1/2 ones over the rate limit (their acks
    /// withheld), and any while the connection is paced.
    parked: Parked,
    /// When the rate limit lets the parked publishes try again.
    retry_at: Option<Instant>,
    /// Since when QoS 0 publishes have been dropped for the rate limit without one admitted.
    overrun_since: Option<Instant>,
}

impl Held {
    fn is_idle(&self) -> bool {
        self.parked.is_empty() && self.retry_at.is_none() && self.overrun_since.is_none()
    }
}

impl Inflow {
    /// QoS 1/2 publishes the client has not had an answer to (what Receive Maximum bounds).
    fn unanswered(&self) -> usize {
        self.owed as usize
            + self.qos2.as_ref().map_or(0, |q| q.len())
            + self.held.as_ref().map_or(0, |h| h.parked.owed)
    }

    fn held(&mut self) -> &mut Held {
        self.held.get_or_insert_default()
    }

    /// Lets go of [`Held`] once it holds nothing.
    fn tidy(&mut self) {
        if self.held.as_ref().is_some_and(|h| h.is_idle()) {
            self.held = None;
        }
    }

    fn park(&mut self, p: PublishIn, back: bool) {
        self.held().parked.push(p, back);
    }

    fn pop_parked(&mut self) -> Option<PublishIn> {
        let p = self.held.as_mut()?.parked.pop();
        self.tidy();
        p
    }

    fn has_parked(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.parked.is_empty())
    }

    /// When the parked publishes are due again (the rate limit's retry).
    pub fn retry_at(&self) -> Option<Instant> {
        self.held.as_ref().and_then(|h| h.retry_at)
    }

    /// Takes the retry time: whether one was set.
    fn take_retry(&mut self) -> bool {
        let taken = self.held.as_mut().and_then(|h| h.retry_at.take()).is_some();
        self.tidy();
        taken
    }

    /// A publish was admitted: the overrun of dropped QoS 0 publishes, if any, is over.
    fn admitted(&mut self) {
        if let Some(h) = &mut self.held {
            h.overrun_since = None;
            self.tidy();
        }
    }

    /// Whether the connection may read another packet: not while more publishes than the
    /// Receive Maximum await their confirms (or are staged), so a client flooding QoS 0
    /// (which Receive Maximum does not bound) meets TCP backpressure instead of growing this
    /// queue. An MQTT 5 client was told the maximum: one more is read, so one that overruns
    /// it is told (0x93). A 3.1.1 client never was (its in-flight window is its own: 20 for
    /// Mosquitto's and paho's clients, 100 for rumqttc's), so it only meets the backpressure.
    /// Nor while the parked publishes hold `limits.max_pending_in` bytes.
    pub fn may_read(&mut self, receive_maximum: u16, advertised: bool, max_parked: u64) -> bool {
        if self.held.as_ref().map_or(0, |h| h.parked.bytes) >= max_parked {
            return false;
        }
        let limit = u32::from(receive_maximum);
        // At most `RUN_MAX`.
        let waiting = self.waiting + self.staged() as u32;
        if advertised {
            waiting <= limit
        } else {
            waiting < limit
        }
    }

    /// Whether an answer is awaited; then [`Inflow::next_confirmed`] has something to give.
    pub fn awaiting(&self) -> bool {
        self.waiting > 0
    }

    /// The next answer, in arrival order. A poll function, not an `async fn`: the
    /// connection's select holds this future for the connection's whole life, and an `async
    /// fn`'s state was 32 bytes where this is 8.
    pub fn next_confirmed(
        &mut self,
    ) -> impl Future<Output = Option<(Ack, Result<(), EngineError>)>> + '_ {
        std::future::poll_fn(move |cx| {
            let next = match self.publisher.get_mut() {
                Some(p) => std::task::ready!(p.confirms.poll_next_unpin(cx)),
                None => None,
            };
            if next.is_some() {
                self.waiting -= 1;
            }
            Poll::Ready(next)
        })
    }

    fn push(&mut self, awaiting: Awaiting) {
        self.waiting += 1;
        self.publisher().confirms.push_back(awaiting);
    }

    #[inline]
    fn publisher(&mut self) -> &mut Publisher {
        self.publisher.get_mut().get_or_insert_default()
    }
}

/// Publishes parked in arrival order, with what they hold.
#[derive(Default)]
struct Parked {
    publishes: VecDeque<PublishIn>,
    /// Payload bytes parked: at `limits.max_pending_in` the socket is not read.
    bytes: u64,
    /// QoS 1/2 ones: unanswered, so they count towards Receive Maximum.
    owed: usize,
}

impl Parked {
    fn push(&mut self, p: PublishIn, back: bool) {
        self.bytes += p.payload.len() as u64;
        self.owed += usize::from(p.qos > 0);
        if back {
            self.publishes.push_back(p);
        } else {
            self.publishes.push_front(p);
        }
    }

    fn pop(&mut self) -> Option<PublishIn> {
        let p = self.publishes.pop_front()?;
        self.bytes -= p.payload.len() as u64;
        self.owed -= usize::from(p.qos > 0);
        Some(p)
    }

    fn is_empty(&self) -> bool {
        self.publishes.is_empty()
    }
}

/// The acknowledgement a publish is owed once the engine answered.
pub struct Ack {
    packet_id: Option<u16>,
    qos: u8,
    /// The reason code if the engine takes the message.
    code: u8,
    /// The retained message this publish replaced, to put back if the engine refuses it.
    retained: Option<(String, RetainedUndo)>,
    /// Counted in [`Inflow::owed`] while it waits in [`Publisher::confirms`].
    owed: bool,
}

/// One entry of [`Publisher::confirms`]: an engine confirm, or an answer already known that
/// waits for its turn.
pub struct Awaiting {
    ack: Option<Ack>,
    confirm: Option<Publishing>,
}

impl Future for Awaiting {
    type Output = (Ack, Result<(), EngineError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let result = match &mut self.confirm {
            Some(confirm) => std::task::ready!(Pin::new(confirm).poll(cx)).map(|_| ()),
            None => Ok(()),
        };
        match self.ack.take() {
            Some(ack) => Poll::Ready((ack, result)),
            // Polled again after it answered: FuturesOrdered never does.
            None => Poll::Pending,
        }
    }
}

impl Session {
    /// Whether the connection reads its next packet: [`Inflow::may_read`] under this
    /// gateway's limits.
    pub fn takes_packets(&mut self) -> bool {
        self.inflow.may_read(
            self.ctx.config.mqtt.receive_maximum,
            self.receive_maximum_advertised(),
            self.ctx.config.limits.max_pending_in.as_u64(),
        )
    }

    pub(super) async fn publish(&mut self, p: PublishIn) -> Outcome {
        match self.admit(p) {
            Ok(p) => self.publish_now(p, true).await,
            Err(outcome) => outcome,
        }
    }

    /// [`Self::publish`] of a PUBLISH that is not retained (almost every one), without
    /// awaiting: the connection makes no future for it. Through [`Session::handle`] each
    /// PUBLISH was a boxed future of 2.6 KB, allocated and copied into place per packet — the
    /// packet (208 bytes) held twice at each of four nested steps (docs/bench.md, 2026-12-03
    /// "third round").
    ///
    /// While more packets are buffered (`more_buffered`, or publishes are staged already),
    /// one that [`admit`](Self::admit) would let through unchanged, to the topic published to
    /// last, within the size limit and cleared by the gate, is staged: handed to the engine
    /// with the publishes read after it ([`Self::flush_staged`]). Any other is published
    /// after the staged ones, so the engine and the client see everything in arrival order.
    pub fn publish_plain(&mut self, p: PublishIn, more_buffered: bool) -> Outcome {
        debug_assert!(!p.retain);
        if !more_buffered && self.inflow.staged() == 0 {
            // Alone in its read: published at once, as ever.
            return match self.admit(p) {
                Ok(p) => self.publish_now_plain(p, true),
                Err(outcome) => outcome,
            };
        }
        let Some(unstaged) = self.stage(p) else {
            return Outcome::Continue;
        };
        if let outcome @ Outcome::Close(_) = self.flush_staged() {
            return outcome;
        }
        match unstaged {
            Unstaged::Refused(p, refused) => self.refused_at_gate(p, refused, true),
            Unstaged::Other(p) => match self.admit(p) {
                Ok(p) => self.publish_now_plain(p, true),
                Err(outcome) => outcome,
            },
        }
    }

    /// What a PUBLISH must pass before it is published: its topic alias resolved, its QoS
    /// allowed, the Receive Maximum kept, parked publishes ahead of it. `Err` when it was
    /// answered, parked or refused here.
    fn admit(&mut self, mut p: PublishIn) -> Result<PublishIn, Outcome> {
        if let Some(alias) = p.props.as_ref().and_then(|props| props.topic_alias) {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Err(Outcome::Close(CloseReason::TopicAliasInvalid));
            }
            if p.topic.is_empty() {
                match self.inflow.aliases.as_ref().and_then(|a| a.get(&alias)) {
                    Some(topic) => p.topic = topic.clone().into(),
                    None => return Err(Outcome::Close(CloseReason::ProtocolError)),
                }
            } else {
                self.inflow
                    .aliases
                    .get_or_insert_default()
                    .insert(alias, String::from(&*p.topic));
            }
        }
        if p.qos == 2 && self.max_qos() < 2 && self.client.version == Version::V5 {
            // CONNACK said Maximum QoS 1.
            return Err(Outcome::Close(CloseReason::QosNotSupported));
        }
        if p.qos == 2
            && let Some(id) = p.packet_id
            && self.inflow.qos2.as_ref().is_some_and(|q| q.contains(&id))
        {
            // A resend before PUBREL: already published once, acknowledge again only.
            self.answer(&p, reason::SUCCESS);
            return Err(Outcome::Continue);
        }
        if p.qos > 0
            && self.client.version == Version::V5
            && self.inflow.unanswered() >= usize::from(self.ctx.config.mqtt.receive_maximum)
        {
            // More unacknowledged QoS 1/2 publishes than the Receive Maximum we advertised.
            metrics::refusal(PROTOCOL, "receive_maximum_exceeded");
            return Err(Outcome::Close(CloseReason::ReceiveMaximumExceeded));
        }
        if self.stall.is_some() || (self.inflow.has_parked() && p.qos > 0) {
            // Paced: everything waits. Else keep order: later QoS 1/2 publishes wait behind
            // parked ones.
            self.inflow.park(p, true);
            return Err(Outcome::Continue);
        }
        Ok(p)
    }

    /// Sends the acknowledgement of a QoS 1/2 publish now, or after the answers still owed to
    /// earlier publishes (acks go out in the order the publishes came).
    fn answer(&mut self, p: &PublishIn, code: u8) {
        if p.qos == 0 {
            return;
        }
        let ack = Ack {
            packet_id: p.packet_id,
            qos: p.qos,
            code,
            retained: None,
            owed: false,
        };
        if !self.inflow.awaiting() {
            self.send_ack(&ack, code);
        } else {
            self.queue(Awaiting {
                ack: Some(ack),
                confirm: None,
            });
        }
    }

    /// Queues behind the answers still owed; a QoS 1 ack counts towards Receive Maximum there.
    fn queue(&mut self, mut awaiting: Awaiting) {
        if let Some(ack) = &mut awaiting.ack
            && ack.qos == 1
        {
            ack.owed = true;
            self.inflow.owed += 1;
        }
        self.inflow.push(awaiting);
    }

    fn send_ack(&mut self, ack: &Ack, code: u8) {
        if let Some(packet_id) = ack.packet_id {
            match ack.qos {
                1 => self.send(Outbound::PubAck { packet_id, code }),
                2 => self.send(Outbound::PubRec { packet_id, code }),
                _ => {}
            }
        }
    }

    pub(super) async fn publish_now(&mut self, p: PublishIn, may_park: bool) -> Outcome {
        if !p.retain {
            return self.publish_now_plain(p, may_park);
        }
        let key = match self.key_of(&p) {
            Ok(key) => key,
            Err(outcome) => return outcome,
        };
        let message = self.message_of(&p);
        let cleared = match self.clear(&key, p.payload.len()) {
            Ok(cleared) => cleared,
            Err(refused) => return self.refused_at_gate(p, refused, may_park),
        };
        // Retained before the publish (see `RetainedStore::set`), taken back if it is refused.
        let (code, retained) = match self.retained().set(&key, message.clone()).await {
            Ok(undo) => (reason::SUCCESS, Some((key.to_string(), undo))),
            Err(_) => {
                metrics::refusal(PROTOCOL, "retained_full");
                match self.client.version {
                    Version::V5 => (reason::QUOTA_EXCEEDED, None),
                    Version::V3 => (reason::SUCCESS, None),
                }
            }
        };
        let confirm = cleared.publish(&**self.channel(), message, PublishOptions::default());
        match self.hand_over(p.qos, p.packet_id, confirm, code, retained) {
            Some((ack, result)) => Box::pin(self.confirmed(ack, result)).await,
            None => Outcome::Continue,
        }
    }

    /// [`Self::publish_now`] of a publish that is not retained: nothing to await.
    fn publish_now_plain(&mut self, p: PublishIn, may_park: bool) -> Outcome {
        let key = match self.key_of(&p) {
            Ok(key) => key,
            Err(outcome) => return outcome,
        };
        let message = self.message_of(&p);
        let cleared = match self.clear(&key, p.payload.len()) {
            Ok(cleared) => cleared,
            Err(refused) => return self.refused_at_gate(p, refused, may_park),
        };
        let confirm = cleared.publish_shared(
            &**self.channel(),
            key.clone(),
            message,
            PublishOptions::default(),
        );
        match self.hand_over(p.qos, p.packet_id, confirm, reason::SUCCESS, None) {
            // Nothing retained to take back.
            Some((ack, result)) => self.settle(ack, result),
            None => Outcome::Continue,
        }
    }

    /// The routing key of a publish's topic; `Err` when it has none or the payload is over
    /// the limit (answered or refused here).
    fn key_of(&mut self, p: &PublishIn) -> Result<Arc<str>, Outcome> {
        let key = match self.inflow.publisher().last_key.as_ref() {
            Some((topic, key)) if **topic == *p.topic => key.clone(),
            _ => self.map_topic(p)?,
        };
        if p.payload.len() as u64 > self.ctx.config.limits.max_message_bytes.as_u64() {
            return Err(self.too_large(p));
        }
        Ok(key)
    }

    /// [`Self::key_of`] of a topic other than the last one.
    fn map_topic(&mut self, p: &PublishIn) -> Result<Arc<str>, Outcome> {
        let key: Arc<str> = match topic_to_key(&p.topic, self.ctx.config.mqtt.topic_mapping) {
            Ok(k) => k.into(),
            // [MQTT-3.3.2-2]: no wildcards in a topic name; an empty one is malformed too.
            Err(e @ (topic::TopicError::Wildcard | topic::TopicError::Empty)) => {
                tracing::info!(client = %self.client.id, topic = %p.topic, "invalid topic name: {e}");
                metrics::refusal(PROTOCOL, "topic_invalid");
                return Err(Outcome::Close(CloseReason::TopicNameInvalid));
            }
            // Valid MQTT that has no AMQP form: refused, the connection stays (v5 only can say so).
            Err(e) => {
                tracing::info!(client = %self.client.id, topic = %p.topic, "refused topic: {e}");
                metrics::refusal(PROTOCOL, "topic_invalid");
                if self.client.version == Version::V5 {
                    self.answer(p, reason::TOPIC_NAME_INVALID);
                    return Err(Outcome::Continue);
                }
                return Err(Outcome::Close(CloseReason::TopicNameInvalid));
            }
        };
        // A copy: the topic shares its read buffer, which this would keep for good.
        self.inflow.publisher().last_key = Some((String::from(&*p.topic), key.clone()));
        Ok(key)
    }

    /// The publish gate (DESIGN.md §7), for `bytes` of body to `key` on the MQTT exchange.
    fn clear<'a>(&'a self, key: &'a str, bytes: usize) -> Result<Cleared<'a>, PublishRefused> {
        self.ctx.clear_publish(
            PROTOCOL,
            &self.conn,
            &self.principal,
            &self.ctx.config.mqtt.exchange,
            key,
            bytes,
        )
    }

    /// A publish the engine took: its ack queued behind the answers still owed, or, when the
    /// engine answered at once and nothing is owed, that answer given back to be settled.
    fn hand_over(
        &mut self,
        qos: u8,
        packet_id: Option<u16>,
        mut confirm: Publishing,
        code: u8,
        retained: Option<(String, RetainedUndo)>,
    ) -> Option<(Ack, Result<(), EngineError>)> {
        Stall::begin(
            &mut self.stall,
            confirm.take_pace(),
            self.ctx.config.limits.pace_max_wait,
        );
        self.inflow.admitted();
        if qos == 2
            && self.max_qos() == 2
            && let Some(id) = packet_id
        {
            self.inflow.qos2.get_or_insert_default().insert(id);
        }
        let mut awaiting = Awaiting {
            ack: Some(Ack {
                packet_id,
                qos,
                code,
                retained,
                owed: false,
            }),
            confirm: Some(confirm),
        };
        // The embedded engine mostly answers at once: then there is nothing to queue, unless
        // earlier answers are still owed.
        let answered = match self.inflow.awaiting() {
            false => Pin::new(&mut awaiting).poll(&mut TaskContext::from_waker(Waker::noop())),
            true => Poll::Pending,
        };
        match answered {
            Poll::Ready(answer) => Some(answer),
            Poll::Pending => {
                self.queue(awaiting);
                None
            }
        }
    }

    /// A publish the gate refused: forbidden ones are answered (and dropped), throttled QoS 0
    /// ones dropped and counted, throttled QoS 1/2 ones parked.
    fn refused_at_gate(
        &mut self,
        p: PublishIn,
        refused: PublishRefused,
        may_park: bool,
    ) -> Outcome {
        metrics::refusal(PROTOCOL, refused.as_str());
        let t = match refused {
            PublishRefused::Forbidden { .. } => {
                // 3.1.1 has no way to say no: the publish is acknowledged and dropped.
                let code = if self.client.version == Version::V5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::SUCCESS
                };
                self.answer(&p, code);
                return Outcome::Continue;
            }
            PublishRefused::Throttled(t) => t,
        };
        if p.qos == 0 && t.is_engine_alarm() {
            // Dropped and counted; not the client's overrun, so no 0x96 for it.
            return Outcome::Continue;
        }
        if p.qos == 0 {
            // Dropped and counted; a v5 client that keeps overrunning for
            // `limits.overrun_grace` is told so and disconnected (0x96).
            let since = *self
                .inflow
                .held()
                .overrun_since
                .get_or_insert_with(Instant::now);
            if self.client.version == Version::V5
                && since.elapsed() >= self.ctx.config.limits.overrun_grace
            {
                return Outcome::Close(CloseReason::MessageRateTooHigh);
            }
            return Outcome::Continue;
        }
        self.inflow.park(p, may_park);
        self.inflow.held().retry_at = Some(Instant::now() + t.retry_after);
        Outcome::Continue
    }

    /// The engine answered a publish (or an answer queued behind one came up): acknowledge it,
    /// after taking back the retained message a refused publish set. Only that awaits: the
    /// callers [`settle`](Self::settle) every other answer without making this future (a
    /// future per confirm, and room for this one in every publish's).
    pub async fn confirmed(&mut self, mut ack: Ack, result: Result<(), EngineError>) -> Outcome {
        if result.is_err()
            && let Some((key, undo)) = ack.retained.take()
        {
            self.retained().undo(&key, undo).await;
        }
        self.settle(ack, result)
    }

    /// Whether an answer has a retained message to take back first (then it goes through
    /// [`confirmed`](Self::confirmed)).
    pub fn undoes(ack: &Ack, result: &Result<(), EngineError>) -> bool {
        result.is_err() && ack.retained.is_some()
    }

    /// [`confirmed`](Self::confirmed) once nothing retained is left to take back.
    pub fn settle(&mut self, ack: Ack, result: Result<(), EngineError>) -> Outcome {
        if ack.owed {
            self.inflow.owed -= 1;
        }
        match result {
            Ok(()) => {
                self.send_ack(&ack, ack.code);
                Outcome::Continue
            }
            Err(e) => {
                if ack.qos == 2
                    && let Some(id) = ack.packet_id
                    && let Some(q) = &mut self.inflow.qos2
                {
                    q.remove(&id);
                }
                self.refused(&ack, e)
            }
        }
    }

    /// A payload over `limits.max_message_bytes` (within the Maximum Packet Size, which leaves
    /// room for topic and properties): not published, and the QoS flow completed as Mosquitto
    /// does for its message size limit — MQTT 5 hears 0x97, 3.1.1 cannot be told. Closing
    /// instead would make the client resend the same message on every reconnect.
    fn too_large(&mut self, p: &PublishIn) -> Outcome {
        metrics::refusal(PROTOCOL, "too_large");
        tracing::debug!(client = %self.client.id, bytes = p.payload.len(), "publish over limits.max_message_bytes dropped");
        let code = match self.client.version {
            Version::V5 => reason::QUOTA_EXCEEDED,
            _ => reason::SUCCESS,
        };
        self.answer(p, code);
        Outcome::Continue
    }

    /// A publish the engine did not accept (DESIGN.md §5's failure table).
    fn refused(&mut self, ack: &Ack, e: EngineError) -> Outcome {
        match e {
            EngineError::Rejected(_) | EngineError::StoreFailed(_)
                if self.client.version == Version::V5 =>
            {
                self.send_ack(ack, reason::QUOTA_EXCEEDED);
                Outcome::Continue
            }
            e => {
                tracing::warn!(client = %self.client.id, error = %e, "publish not accepted; closing so the client resends");
                if self.client.version == Version::V5 && ack.qos > 0 {
                    self.send_ack(ack, reason::UNSPECIFIED);
                    return Outcome::Continue;
                }
                Outcome::Close(CloseReason::EngineRefused)
            }
        }
    }

    /// The MQTT 5 properties of a message from the engine with `expires_in` left to live.
    pub(super) fn props_of(
        &self,
        p: &crate::engine::Properties,
        expires_in: Option<std::time::Duration>,
    ) -> Option<Box<PublishProps>> {
        if self.client.version != Version::V5 {
            return None;
        }
        let mqtt = &self.ctx.config.mqtt;
        properties::from_amqp(
            p,
            expires_in,
            mqtt.topic_mapping,
            mqtt.sender_property.as_deref(),
        )
        .boxed()
    }

    /// Tries the staged publishes a pace held back, then the parked ones (their acks were
    /// withheld).
    pub async fn retry_parked(&mut self) -> Outcome {
        self.inflow.take_retry();
        if let outcome @ Outcome::Close(_) = self.flush_staged() {
            return outcome;
        }
        while self.stall.is_none()
            && let Some(p) = self.inflow.pop_parked()
        {
            if let outcome @ Outcome::Close(_) = self.publish_now(p, false).await {
                return outcome;
            }
            if self.inflow.retry_at().is_some() {
                break; // throttled again: it went back to the front
            }
            // As for packets read (connection.rs): many publishers released at once take
            // turns with the consumers they publish to.
            tokio::task::consume_budget().await;
        }
        Outcome::Continue
    }

    /// The connection ended: publishes it read and parked are published now, still paced (a
    /// client that published and disconnected loses nothing the gateway read, and the
    /// consumers they go to are not flooded by a backlog released at once). Ones the rate
    /// limit still refuses are dropped, as they would have been.
    pub async fn flush_parked(&mut self) {
        self.inflow.take_retry();
        loop {
            let staged = self.inflow.staged();
            if staged == 0 {
                break;
            }
            if let Some(stall) = self.stall.take() {
                stall.released().await;
                metrics::paced(PROTOCOL, stall.elapsed());
            }
            let _ = self.flush_staged();
            if self.inflow.staged() == staged {
                break; // the channel is gone: nothing more will be taken
            }
        }
        while let Some(p) = self.inflow.pop_parked() {
            if let Some(stall) = self.stall.take() {
                stall.released().await;
                metrics::paced(PROTOCOL, stall.elapsed());
            }
            let _ = self.publish_now(p, false).await;
            if self.inflow.take_retry() {
                // Throttled: it went back to the front; nobody will retry it.
                let _ = self.inflow.pop_parked();
            }
        }
        self.stall = None;
    }

    /// The connection's stall is over (its buffers drained, or it waited `pace_max_wait`):
    /// the parked publishes go on, until one paces again.
    pub async fn unstall(&mut self) -> Outcome {
        if let Some(stall) = self.stall.take() {
            metrics::paced(PROTOCOL, stall.elapsed());
        }
        if self.inflow.retry_at().is_some() {
            // Rate-limited as well: the retry timer resumes them.
            return Outcome::Continue;
        }
        self.retry_parked().await
    }
}
