//! THE seam between protocol adapters and an AMQP 0-9-1 exchange/queue engine.
//!
//! Adapters (`rest`, `ws`, `mqtt`) import this module and nothing below it: they hold an
//! `Arc<dyn Engine>`, open one [`Channel`] per client connection, and speak only in the types
//! defined here. [`embedded`] (in-process, the default) implements it; `upstream` (RabbitMQ
//! through lapin) is to implement it the same way, and every engine runs the same conformance
//! suite (`tests/engine_contract.rs`).
//!
//! The shape follows AMQP 0-9-1 (DESIGN.md §2) with three deliberate choices, written down in
//! `docs/engine.md`:
//! - [`Channel::publish`] is a plain fn that fixes the message's place in the channel's order at
//!   the call and returns a future for the confirm, so adapters may pipeline publishes and still
//!   keep per-connection order;
//! - delivery tags are per channel (as AMQP), acks go through the channel;
//! - cancelling a consumer (or dropping its [`Consumer`]) returns its unacked deliveries to the
//!   queue, marked redelivered (DESIGN.md §4: "unsubscribe and cancel requeue").

pub mod embedded;
mod error;
mod message;
pub mod names;
pub mod retained;
pub mod sessions;
pub mod table;
pub mod topic;
pub mod upstream;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;

use crate::flow::{Pace, Pressure};

pub use error::{EngineError, ObjectKind};
pub use message::{Delivery, Envelope, EnvelopeRef, Message, Properties, Rendering};
pub use table::{FieldTable, FieldValue, Headers};

/// Pushes onto a list that most often holds one entry (a queue's bindings and consumers, the
/// values under one topic pattern): the first push makes room for that one only, where `Vec`
/// makes room for four — held for as long as an idle subscriber stays connected.
pub(crate) fn push_snug<T>(list: &mut Vec<T>, value: T) {
    if list.capacity() == 0 {
        list.reserve_exact(1);
    }
    list.push(value);
}

/// [`Channel::publish_run`] one publish at a time through `publish`: each confirm goes to
/// `confirms`, and the run stops after the first that paces, the rest left in `run`.
pub fn publish_one_by_one(
    run: &mut Vec<(Arc<str>, Message)>,
    confirms: &mut Vec<PublishConfirm>,
    mut publish: impl FnMut(Arc<str>, Message) -> PublishConfirm,
) {
    // Drained, not taken apart: the caller's vector keeps its room for the next run.
    let mut all = std::mem::take(run);
    let mut rest = all.drain(..);
    for (routing_key, message) in rest.by_ref() {
        let confirm = publish(routing_key, message);
        let paced = confirm.paces();
        confirms.push(confirm);
        if paced {
            break;
        }
    }
    let untaken: Vec<_> = rest.collect();
    all.extend(untaken);
    *run = all;
}

/// Which implementation serves the seam; adapters only use it for capability questions
/// (for example: upstream grants MQTT QoS 2 as 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Embedded,
    Upstream,
}

/// The four AMQP 0-9-1 exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl std::str::FromStr for ExchangeKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(EngineError::InvalidArgument(format!(
                "unknown exchange type '{other}' (expected direct, fanout, topic or headers)"
            ))),
        }
    }
}

impl std::fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flags and arguments of an exchange declaration. Two declarations are equivalent when all
/// fields are equal; a non-equivalent redeclare is `PreconditionFailed` (406).
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

impl ExchangeSpec {
    pub fn new(kind: ExchangeKind) -> Self {
        ExchangeSpec {
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new(),
        }
    }
}

/// Flags and arguments of a queue declaration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueSpec {
    pub durable: bool,
    /// Owned by the declaring channel: other channels get `ResourceLocked` (405), and the queue
    /// is deleted when its channel closes.
    pub exclusive: bool,
    /// Deleted when its last consumer goes (only once it has had one).
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

/// What a declaration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    Created,
    Existed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueDeclared {
    /// The queue's name: the server-generated one when the declaration asked for `""`.
    pub name: String,
    pub declared: Declared,
    pub messages: u64,
    pub consumers: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeInfo {
    pub name: String,
    pub spec: ExchangeSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    /// `None` when the engine cannot tell: an upstream broker without its management API
    /// (AMQP's passive declare gives counts only).
    pub spec: Option<QueueSpec>,
    /// Ready messages (not counting unacknowledged ones).
    pub messages: u64,
    /// `None` when the engine cannot tell (as for `spec`).
    pub messages_unacknowledged: Option<u64>,
    pub consumers: u32,
    /// Messages the queue took and messages it handed out (to consumers or `get`), counted
    /// since the engine started (upstream: RabbitMQ's own statistics, with the management
    /// API). Their change over time is the queue's in and out rate. `None` when the engine
    /// cannot tell.
    pub totals: Option<QueueTotals>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueTotals {
    pub published: u64,
    pub delivered: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BindingInfo {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteQueueOptions {
    pub if_unused: bool,
    pub if_empty: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// AMQP `mandatory`. Whether a message was routed is always reported; the flag only matters
    /// to engines that must ask for it on the wire (upstream always sets it, DESIGN.md §2).
    pub mandatory: bool,
}

/// The engine's answer once it took responsibility for a message (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// At least one queue received the message.
    pub routed: bool,
}

/// How a consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// At most `prefetch` unacknowledged deliveries (1..=65535) at a time.
    Manual { prefetch: u16 },
    /// No-ack: a message is settled when the engine hands it over. The engine still never pushes
    /// more than a bounded window ahead of what the consumer has taken out of its [`Consumer`].
    Auto,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsumeOptions {
    /// Empty: the engine picks one (`amq.ctag-…`).
    pub consumer_tag: String,
    pub ack: AckMode,
    /// The only consumer of the queue while it lives; a second one gets `InUse`.
    pub exclusive: bool,
    pub arguments: FieldTable,
    /// The gauge of the adapter's buffer an auto-ack consumer's deliveries go to: a publish
    /// routed to this consumer while it is above its high-water mark comes back with a
    /// [`Pace`] (DESIGN.md §7). Engines that cannot see where a publish lands (upstream)
    /// ignore it.
    pub pressure: Option<Pressure>,
}

impl ConsumeOptions {
    pub fn manual(prefetch: u16) -> Self {
        ConsumeOptions {
            consumer_tag: String::new(),
            ack: AckMode::Manual { prefetch },
            exclusive: false,
            arguments: FieldTable::new(),
            pressure: None,
        }
    }
    pub fn auto() -> Self {
        ConsumeOptions {
            ack: AckMode::Auto,
            ..ConsumeOptions::manual(1)
        }
    }
}

/// Why a consumer stopped receiving without having been cancelled by its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelReason {
    /// The queue was deleted.
    QueueDeleted,
    /// The channel closed (or the engine shut down).
    ChannelClosed,
    /// The engine lost its connection (upstream).
    ConnectionLost,
    /// [`Channel::cancel`] on this channel.
    Cancelled,
}

/// What [`Channel::cancel`] does with the consumer's unacknowledged deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCancel {
    /// Back to the queue, marked redelivered (what unsubscribing means to WebSocket clients).
    Requeue,
    /// AMQP `basic.cancel`: they stay on the channel for the client to ack or nack.
    KeepUnacked,
}

/// The receiving end of a consumer. Dropping it cancels the consumer; unacked deliveries go
/// back to the queue.
pub struct Consumer {
    tag: Arc<str>,
    queue: Arc<str>,
    stream: Box<dyn DeliveryStream>,
    /// Its end was reported as a [`ConsumerEvent::Ended`].
    ended: bool,
}

/// What a [`Consumer`] yields as a [`futures_util::Stream`] (an adapter polls many in one
/// `StreamMap`): its deliveries, then once why it ended.
#[derive(Debug)]
pub enum ConsumerEvent {
    Delivery(Delivery),
    /// `None`: cancelled by its own channel (or the channel closed).
    Ended(Option<CancelReason>),
}

impl Consumer {
    /// For engine implementations.
    pub fn new(tag: Arc<str>, queue: Arc<str>, stream: Box<dyn DeliveryStream>) -> Self {
        Consumer {
            tag,
            queue,
            stream,
            ended: false,
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The queue's name as the engine keeps it, shared rather than copied.
    pub fn queue_name(&self) -> Arc<str> {
        self.queue.clone()
    }

    /// The next delivery, or `None` once the consumer ended (see [`Consumer::cancel_reason`]).
    /// Cancel-safe: a delivery is taken only in the poll that returns it.
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.stream.poll_recv(cx)).await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.stream.poll_recv(cx)
    }

    /// Set once `recv` returned `None` for a reason other than the owner's cancel.
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.stream.cancel_reason()
    }
}

impl futures_util::Stream for Consumer {
    type Item = ConsumerEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ConsumerEvent>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match this.stream.poll_recv(cx) {
            Poll::Ready(Some(d)) => Poll::Ready(Some(ConsumerEvent::Delivery(d))),
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(Some(ConsumerEvent::Ended(this.stream.cancel_reason())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("tag", &self.tag)
            .field("queue", &self.queue)
            .finish()
    }
}

/// Implemented by each engine's consumer; adapters use [`Consumer`].
pub trait DeliveryStream: Send + Sync {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>>;
    fn cancel_reason(&self) -> Option<CancelReason>;
}

/// An engine's answer that is usually known at the call (embedded) and sometimes awaits the
/// broker (upstream): only the latter is boxed, so the common case allocates nothing, where an
/// `async fn` in the object-safe trait would box every call.
pub struct Answer<T>(AnswerInner<T>);

type Boxed<T> = Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send>>;

enum AnswerInner<T> {
    Ready(Option<Result<T, EngineError>>),
    Pending(Boxed<T>),
}

impl<T> Answer<T> {
    pub fn ready(result: Result<T, EngineError>) -> Self {
        Answer(AnswerInner::Ready(Some(result)))
    }

    pub fn pending(fut: impl Future<Output = Result<T, EngineError>> + Send + 'static) -> Self {
        Answer(AnswerInner::Pending(Box::pin(fut)))
    }
}

// Neither variant is pinned structurally: the ready value is moved out, the pending future
// is pinned in its box.
impl<T> Unpin for Answer<T> {}

impl<T> Future for Answer<T> {
    type Output = Result<T, EngineError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            AnswerInner::Ready(result) => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(EngineError::Internal("answer polled twice".into()))),
            ),
            AnswerInner::Pending(fut) => fut.as_mut().poll(cx),
        }
    }
}

/// The answer to an ack or a nack.
pub type Settled = Answer<()>;

/// The confirm of one publish. Resolves once the engine took responsibility for the message
/// (embedded: enqueued, and written durably when persistent in a durable queue; upstream:
/// publisher confirm). Dropping it does not withdraw the message.
pub struct PublishConfirm {
    inner: Answer<PublishOutcome>,
    /// Known at the call: the buffers the message landed in above their high-water mark.
    pace: Pace,
}

impl PublishConfirm {
    /// An answer known at the call: the common embedded case, no allocation.
    pub fn ready(result: Result<PublishOutcome, EngineError>) -> Self {
        PublishConfirm {
            inner: Answer::ready(result),
            pace: Pace::default(),
        }
    }

    pub fn pending(
        fut: impl Future<Output = Result<PublishOutcome, EngineError>> + Send + 'static,
    ) -> Self {
        PublishConfirm {
            inner: Answer::pending(fut),
            pace: Pace::default(),
        }
    }

    /// The message landed in buffers above their high-water mark: the publisher is to wait.
    pub fn with_pace(mut self, pace: Pace) -> Self {
        self.pace = pace;
        self
    }

    /// Whether the publisher is to wait before its next publish.
    pub fn paces(&self) -> bool {
        !self.pace.is_empty()
    }

    /// What the publisher's connection waits for before its next publish (usually nothing).
    pub fn take_pace(&mut self) -> Pace {
        std::mem::take(&mut self.pace)
    }

    /// The answer was known at the call (not yet taken).
    pub fn is_known(&self) -> bool {
        matches!(self.inner.0, AnswerInner::Ready(Some(_)))
    }
}

impl Future for PublishConfirm {
    type Output = Result<PublishOutcome, EngineError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// Is the engine able to serve? `/readyz` answers from this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    NotReady(String),
}

/// A client connection as engines see it: the owner of its exclusive queues, shared by every
/// channel it opens (one for most adapters; one per AMQP channel for the AMQP listener).
/// Another owner gets `ResourceLocked` (405) for them, a passive declare included; they are
/// deleted when the owner's last channel closes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(u64);

impl Owner {
    /// A new owner, unique in this process.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Owner {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Owner(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// The owner a client connection is: connection ids are drawn from [`Owner::new`]'s
    /// sequence (`context::next_id`), so a connection owns its exclusive queues under its
    /// own id, where an owner kept beside it was 8 bytes more of every connection.
    pub fn connection(id: u64) -> Owner {
        Owner(id)
    }

    pub fn id(&self) -> u64 {
        self.0
    }
}

/// What an engine can do where engines differ (DESIGN.md §1). Adapters ask this, never
/// [`Engine::kind`], so a third engine needs no adapter change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The highest MQTT QoS served end to end: 2 needs exactly-once state kept with the
    /// session and settled with the engine on PUBREC (embedded); upstream serves 1.
    pub max_mqtt_qos: u8,
    /// `list_exchanges`, `list_queues` and `list_bindings` answer (upstream: only with the
    /// management API).
    pub listing: bool,
    /// Deliveries carry the time left before their per-message expiry
    /// ([`Delivery::expires_in`]), so MQTT 5 can count the Message Expiry Interval down.
    pub expiry_countdown: bool,
    /// [`Channel::set_queue_expiry`] works.
    pub queue_expiry_update: bool,
    /// The gateway accepts AMQP 0-9-1 clients itself (its AMQP listener runs); an engine on a
    /// broker with an AMQP port of its own (upstream) leaves them to the broker.
    pub amqp_listener: bool,
}

/// An AMQP engine. One instance serves the whole gateway.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// For logs and `/readyz`; adapters ask [`Engine::capabilities`] instead.
    fn kind(&self) -> EngineKind;

    fn capabilities(&self) -> Capabilities;

    /// Takeover and delayed wills across connections and instances (DESIGN.md §3).
    fn sessions(&self) -> Arc<dyn sessions::SessionRegistry>;

    /// The retained messages every instance shares (MQTT retain; DESIGN.md §3).
    fn retained(&self) -> Arc<dyn retained::RetainedStore>;

    /// A channel of the client connection `owner`: it holds its consumers, its delivery tags
    /// and the order of its publishes; exclusive queues belong to the owner, across its
    /// channels. `label` names the client in logs (never a token).
    async fn open_channel(
        &self,
        owner: &Owner,
        label: &str,
    ) -> Result<Arc<dyn Channel>, EngineError>;

    fn health(&self) -> Health;

    /// Sets the engine's own gauges (queued messages and bytes, queues, held bytes, …) just
    /// before `/metrics` renders: what an engine measures is its business, not the trait's.
    fn record_metrics(&self);

    /// Publishes should be throttled now: the embedded engine is above its memory high
    /// watermark (an upstream broker says so with `connection.blocked`). Adapters answer as
    /// for a rate limit (DESIGN.md §7); the engine itself still accepts what is published.
    fn publish_blocked(&self) -> bool;

    /// Whether [`Engine::publish_blocked`] is (also) because of the disk alarm: free space on
    /// the engine's own disk below its limit (embedded only).
    fn disk_alarm(&self) -> bool {
        false
    }

    /// Whether [`Engine::publish_blocked`] is the upstream broker's doing (`connection.blocked`:
    /// its own memory or disk alarm), which the gateway can only wait out.
    fn upstream_alarm(&self) -> bool {
        false
    }

    /// [`Engine::publish_blocked`] as it changes, for whoever must react at once (an AMQP
    /// `connection.blocked`, parked publishes, a gauge) instead of asking per publish.
    fn watch_publish_blocked(&self) -> tokio::sync::watch::Receiver<bool>;

    /// Stop accepting work and release resources; open channels close.
    async fn shutdown(&self);
}

/// A client connection's view of the engine. Every method fails with `ChannelClosed` after
/// [`Channel::close`]. Dropping the last `Arc` closes the channel.
#[async_trait]
pub trait Channel: Send + Sync {
    fn id(&self) -> u64;

    async fn declare_exchange(
        &self,
        name: &str,
        spec: &ExchangeSpec,
    ) -> Result<Declared, EngineError>;
    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), EngineError>;
    /// Passive declare: `NotFound` when absent.
    async fn exchange_info(&self, name: &str) -> Result<ExchangeInfo, EngineError>;
    /// Exchanges sorted by name, the first `limit` after `after`.
    async fn list_exchanges(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ExchangeInfo>, EngineError>;

    /// `name` empty: a server-named queue (`amq.gen-…`).
    async fn declare_queue(
        &self,
        name: &str,
        spec: &QueueSpec,
    ) -> Result<QueueDeclared, EngineError>;
    /// Returns how many ready messages were dropped with it.
    async fn delete_queue(
        &self,
        name: &str,
        options: DeleteQueueOptions,
    ) -> Result<u64, EngineError>;
    /// Drops the ready messages; returns how many.
    async fn purge_queue(&self, name: &str) -> Result<u64, EngineError>;
    /// Changes a queue's `x-expires` in place (`None` removes it), keeping its messages,
    /// consumers and bindings; a later declaration must then name the new value. No AMQP
    /// method does this: it is what RabbitMQ's MQTT plugin does inside the broker when a
    /// session's expiry interval changes. Engines that cannot answer `NotSupported`.
    async fn set_queue_expiry(
        &self,
        name: &str,
        expires: Option<std::time::Duration>,
    ) -> Result<(), EngineError>;
    /// An inspection, as a management API gives it: it answers for every queue, another
    /// owner's exclusive ones included (REST `GET /v1/queues/{name}`).
    async fn queue_info(&self, name: &str) -> Result<QueueInfo, EngineError>;
    /// AMQP `queue.declare` with `passive`: the queue's counts if it exists and this channel's
    /// owner may use it — another owner's exclusive queue is `ResourceLocked` (405).
    async fn declare_queue_passive(&self, name: &str) -> Result<QueueDeclared, EngineError>;
    async fn list_queues(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<QueueInfo>, EngineError>;

    /// Idempotent: binding twice is one binding.
    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError>;
    /// Unbinding a binding that does not exist succeeds (as AMQP).
    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError>;
    /// The queue's bindings, including the implicit one of the default exchange.
    async fn list_bindings(&self, queue: &str) -> Result<Vec<BindingInfo>, EngineError>;

    /// Routes `message`. Its place in this channel's order is fixed by the call itself, before
    /// the returned confirm is polled.
    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> PublishConfirm;

    /// [`Self::publish`] with a routing key the caller keeps shared (an MQTT publisher's
    /// topic, mapped once for its many publishes): an engine that keeps the key with the
    /// message takes this one instead of copying it into an allocation of its own.
    fn publish_shared(
        &self,
        exchange: &str,
        routing_key: Arc<str>,
        message: Message,
        options: PublishOptions,
    ) -> PublishConfirm {
        self.publish(exchange, &routing_key, message, options)
    }

    /// [`Self::publish_shared`] of a run of messages to one exchange, in order, as that many
    /// calls would: `confirms` gets one confirm per message taken. The run is taken up to and
    /// including the first message whose confirm carries a pace (the publisher is to wait);
    /// the ones after it stay in `run`, for the caller to publish once it has waited. An
    /// engine may take the run as one step (the embedded engine enqueues it under one taking
    /// of each queue's lock).
    fn publish_run(
        &self,
        exchange: &str,
        run: &mut Vec<(Arc<str>, Message)>,
        options: PublishOptions,
        confirms: &mut Vec<PublishConfirm>,
    ) {
        publish_one_by_one(run, confirms, |routing_key, message| {
            self.publish_shared(exchange, routing_key, message, options)
        });
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer, EngineError>;
    /// Cancels a consumer of this channel. Its stream yields nothing more; deliveries it held
    /// that the client never took return to the queue unmarked; those the client took are
    /// requeued or kept on the channel as `on_cancel` says. (Dropping a consumer or closing
    /// the channel always requeues.)
    async fn cancel(&self, consumer_tag: &str, on_cancel: OnCancel) -> Result<(), EngineError>;
    /// basic.get: the next ready message, if any. Unless `no_ack`, it must be acked on this
    /// channel like a consumer's delivery.
    async fn get(&self, queue: &str, no_ack: bool) -> Result<Option<Delivery>, EngineError>;

    /// `multiple`: every unacked tag up to and including `delivery_tag`. An unknown tag is
    /// `PreconditionFailed` and changes nothing. Not an `async fn`: one is settled per QoS 1
    /// message, and the embedded engine answers at the call without a boxed future.
    fn ack(&self, delivery_tag: u64, multiple: bool) -> Settled;
    /// Acks each of `tags` on its own (not `multiple`): an MQTT client's PUBACKs read in one
    /// go. The embedded engine settles them under one lock of each queue, which hands the
    /// freed credit on as one batch; this default acks them one by one. Every known tag is
    /// settled; an unknown one is `PreconditionFailed` after that.
    fn ack_each(&self, tags: &[u64]) -> Settled {
        let acks: Vec<Settled> = tags.iter().map(|&tag| self.ack(tag, false)).collect();
        Settled::pending(async move {
            let mut result = Ok(());
            for ack in acks {
                let settled = ack.await;
                if result.is_ok() {
                    result = settled;
                }
            }
            result
        })
    }
    /// `requeue = false` dead-letters (reason `rejected`) or drops.
    fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Settled;

    /// Requeues unacked deliveries, cancels consumers, deletes exclusive queues. Idempotent.
    async fn close(&self);
}
