//! The embedded engine: an in-process AMQP 0-9-1 broker (exchanges, queues, consumers) behind
//! the [`Engine`] seam. Layout: `broker` (registries, routing, dead-lettering), `exchange` and
//! `topic` (routing tables), `queue` (messages, credit, TTL, limits), `channel` (delivery tags,
//! acks, consumers), `store` (durable state behind a trait).

mod broker;
mod channel;
mod exchange;
mod handoff;
mod held;
pub use held::held_size;
pub mod memory;
mod queue;
mod retained;

pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use self::broker::{Broker, Writes};
use self::channel::{ChannelShared, NO_ACK_WINDOW};
use crate::engine::names::{self, CONSUMER_TAG_PREFIX};
use crate::engine::{
    AckMode, BindingInfo, Capabilities, Channel, ConsumeOptions, Consumer, Declared,
    DeleteQueueOptions, Delivery, Engine, EngineError, EngineKind, ExchangeInfo, ExchangeSpec,
    FieldTable, Health, Message, OnCancel, Owner, PublishConfirm, PublishOptions, QueueDeclared,
    QueueInfo, QueueSpec, Settled,
};

/// Wall-clock milliseconds since the epoch: what stored records carry, so deadlines keep
/// counting across restarts.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the embedded engine is built with.
#[derive(Clone)]
pub struct EmbeddedOptions {
    /// Bodies above this are refused with `ContentTooLarge`.
    pub max_message_bytes: usize,
    pub store: Arc<dyn store::Store>,
    /// Above this many body bytes held, [`Engine::publish_blocked`] says so; `None`: never.
    pub memory_high_watermark: Option<u64>,
    /// Bytes the retained messages may take (`mqtt.retained_stream_bytes`).
    pub retained_bytes: usize,
    /// The data directory and `engine.disk_free_limit`: below it publishes are refused.
    pub disk_alarm: Option<(std::path::PathBuf, u64)>,
    /// A queue's backlog while it has consumers paces its publishers above 3/4 of this
    /// (`limits.outbound_buffer_*`, as a consumer's buffer); `None`: it never does.
    pub backlog: Option<crate::flow::Bound>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            max_message_bytes: 1024 * 1024,
            store: Arc::new(store::MemoryStore),
            memory_high_watermark: None,
            retained_bytes: 1 << 30,
            disk_alarm: None,
            backlog: None,
        }
    }
}

pub struct EmbeddedEngine {
    broker: Arc<Broker>,
    retained: Arc<retained::Retained>,
    sessions: Arc<crate::engine::sessions::local::LocalSessions>,
    shut: AtomicBool,
}

/// The embedded engine's gauges, as `/metrics` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ready messages held in queues.
    pub queued_messages: u64,
    /// Body bytes of those messages.
    pub queued_bytes: u64,
    /// Bytes the engine holds in memory, each message's [`held_size`] (ready and
    /// unacknowledged; a message routed to many queues counts once): what
    /// `engine.memory_high_watermark` limits.
    pub held_bytes: u64,
    pub queues: u64,
    pub exchanges: u64,
}

impl EmbeddedEngine {
    /// What it holds now.
    pub fn stats(&self) -> Stats {
        let (queued_messages, queued_bytes, queues, exchanges) = self.broker.gauges();
        Stats {
            queued_messages,
            queued_bytes,
            held_bytes: self.broker.held().bytes(),
            queues,
            exchanges,
        }
    }

    /// The engine with the durable state its store holds taken back: topology (exchanges,
    /// queues, bindings) declared again, retained messages, and the persistent messages of
    /// durable queues in their order (those a client may have seen marked redelivered).
    /// Inside a tokio runtime.
    pub fn open(options: EmbeddedOptions) -> Result<Self, EngineError> {
        let snapshot = options.store.load()?;
        let retained = options.store.load_retained()?;
        let kept = retained.len();
        let (exchanges, queues, bindings) = (
            snapshot.exchanges.len(),
            snapshot.queues.len(),
            snapshot.bindings.len(),
        );
        let started = std::time::Instant::now();
        // Bodies beyond the paging threshold stay on disk: a store larger than memory starts.
        let keep = options.memory_high_watermark.map_or(u64::MAX, |w| w / 2);
        let messages = options.store.load_messages(keep)?;
        let disk_alarm = options.disk_alarm.clone();
        let engine = EmbeddedEngine::new(options);
        if let Some((dir, limit)) = disk_alarm {
            engine.broker.spawn_disk_alarm(dir, limit);
        }
        engine.broker.spawn_pager();
        engine.broker.restore(snapshot)?;
        engine.retained.restore(retained);
        let recovered = engine.broker.recover(messages);
        if exchanges + queues + bindings + kept + recovered.entries + recovered.discarded > 0 {
            tracing::info!(
                exchanges,
                queues,
                bindings,
                retained = kept,
                messages = recovered.messages,
                queued = recovered.entries,
                discarded = recovered.discarded,
                took_ms = started.elapsed().as_millis() as u64,
                "durable state restored"
            );
        }
        Ok(engine)
    }

    /// Must be called inside a tokio runtime (TTL and expiry timers run on it).
    pub fn new(options: EmbeddedOptions) -> Self {
        EmbeddedEngine {
            retained: Arc::new(retained::Retained::new(
                options.retained_bytes,
                options.store.clone(),
            )),
            broker: Broker::new(
                options.store,
                options.max_message_bytes,
                options.memory_high_watermark.unwrap_or(u64::MAX),
                options.backlog,
            ),
            sessions: Arc::default(),
            shut: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl Engine for EmbeddedEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Embedded
    }

    fn sessions(&self) -> Arc<dyn crate::engine::sessions::SessionRegistry> {
        self.sessions.clone()
    }

    fn retained(&self) -> Arc<dyn crate::engine::retained::RetainedStore> {
        self.retained.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_mqtt_qos: 2,
            listing: true,
            expiry_countdown: true,
            queue_expiry_update: true,
            amqp_listener: true,
        }
    }

    async fn open_channel(
        &self,
        owner: &Owner,
        label: &str,
    ) -> Result<Arc<dyn Channel>, EngineError> {
        if self.shut.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("engine is shutting down".into()));
        }
        let id = self.broker.next_id();
        let shared = Arc::new(ChannelShared::new(id, owner.id(), self.broker.clone()));
        let closable: Arc<dyn broker::Closable> = shared.clone();
        let closable = Arc::downgrade(&closable);
        self.broker.register_channel(id, owner.id(), closable)?;
        tracing::trace!(channel = id, client = label, "channel opened");
        Ok(Arc::new(EmbeddedChannel {
            shared,
            last_route: parking_lot::Mutex::new(None),
        }))
    }

    fn health(&self) -> Health {
        if self.shut.load(Ordering::Acquire) {
            Health::NotReady("shutting down".into())
        } else {
            Health::Ready
        }
    }

    fn record_metrics(&self) {
        use crate::metrics::{HELD_BYTES, PUBLISH_BLOCKED, QUEUED_BYTES, QUEUED_MESSAGES, QUEUES};
        let stats = self.stats();
        metrics::gauge!(QUEUED_MESSAGES).set(stats.queued_messages as f64);
        metrics::gauge!(QUEUED_BYTES).set(stats.queued_bytes as f64);
        metrics::gauge!(QUEUES).set(stats.queues as f64);
        metrics::gauge!(HELD_BYTES).set(stats.held_bytes as f64);
        metrics::gauge!(PUBLISH_BLOCKED).set(if self.publish_blocked() { 1.0 } else { 0.0 });
        metrics::counter!(crate::metrics::STORE_COMMITS).absolute(self.broker.store_commits());
    }

    fn publish_blocked(&self) -> bool {
        self.broker.held().blocked()
    }

    fn disk_alarm(&self) -> bool {
        self.broker.held().disk_low()
    }

    fn watch_publish_blocked(&self) -> tokio::sync::watch::Receiver<bool> {
        self.broker.held().watch()
    }

    /// Closes every open channel and stops the expiry tasks; new channels are refused.
    async fn shutdown(&self) {
        self.shut.store(true, Ordering::Release);
        self.broker.shutdown();
        // The store's maintenance (disk alarm, pager) may be mid-write: the store closes once
        // it ends, so the data directory is free when this returns.
        self.broker.close_store().await;
    }
}

/// A channel handle; dropping it closes the channel.
pub struct EmbeddedChannel {
    shared: Arc<ChannelShared>,
    /// Where this channel's last shared-key publish went ([`broker::LastRoute`]). Tried, not
    /// waited for: publishes of one channel at once (streams of one HTTP/2 connection) route
    /// as if it were empty.
    last_route: parking_lot::Mutex<Option<Box<broker::LastRoute>>>,
}

impl Drop for EmbeddedChannel {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl EmbeddedChannel {
    /// A publish that remembers no route: a borrowed key is made an `Arc` only if the
    /// message is routed.
    fn publish_with<K>(&self, exchange: &str, routing_key: K, message: Message) -> PublishConfirm
    where
        K: AsRef<str> + Into<Arc<str>>,
    {
        // Routed synchronously inside the call: the channel's order is the call order.
        let result = self
            .shared
            .check_open()
            .and_then(|()| self.shared.broker.publish(exchange, routing_key, message));
        confirm(result)
    }
}

/// The confirm of a publish routed and enqueued in the call.
fn confirm(result: Result<broker::Published, EngineError>) -> PublishConfirm {
    match result {
        Ok((outcome, None, pace)) => PublishConfirm::ready(Ok(outcome)).with_pace(pace),
        // Persistent in a durable queue: confirmed once its group commit is durable.
        Ok((outcome, Some(write), pace)) => PublishConfirm::pending(async move {
            write.await?;
            Ok(outcome)
        })
        .with_pace(pace),
        Err(e) => PublishConfirm::ready(Err(e)),
    }
}

#[async_trait]
impl Channel for EmbeddedChannel {
    fn id(&self) -> u64 {
        self.shared.id
    }

    async fn declare_exchange(
        &self,
        name: &str,
        spec: &ExchangeSpec,
    ) -> Result<Declared, EngineError> {
        self.shared.check_open()?;
        let mut writes = Writes::default();
        let declared = self
            .shared
            .broker
            .declare_exchange(name, spec, &mut writes)?;
        writes.durable().await?;
        Ok(declared)
    }

    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), EngineError> {
        self.shared.check_open()?;
        self.shared.broker.delete_exchange(name, if_unused)
    }

    async fn exchange_info(&self, name: &str) -> Result<ExchangeInfo, EngineError> {
        self.shared.check_open()?;
        self.shared.broker.exchange_info(name)
    }

    async fn list_exchanges(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ExchangeInfo>, EngineError> {
        self.shared.check_open()?;
        Ok(self.shared.broker.list_exchanges(after, limit))
    }

    async fn declare_queue(
        &self,
        name: &str,
        spec: &QueueSpec,
    ) -> Result<QueueDeclared, EngineError> {
        self.shared.check_open()?;
        let mut writes = Writes::default();
        let (declared, owned) =
            self.shared
                .broker
                .declare_queue(self.shared.owner, name, spec, &mut writes)?;
        if let Some(queue) = owned {
            self.shared.own_exclusive(queue)?;
        }
        writes.durable().await?;
        Ok(declared)
    }

    async fn delete_queue(
        &self,
        name: &str,
        options: DeleteQueueOptions,
    ) -> Result<u64, EngineError> {
        self.shared.check_open()?;
        self.shared.broker.delete_queue(
            self.shared.owner,
            name,
            options.if_unused,
            options.if_empty,
        )
    }

    async fn purge_queue(&self, name: &str) -> Result<u64, EngineError> {
        self.shared.check_open()?;
        let queue = self.shared.broker.queue_for(self.shared.owner, name)?;
        Ok(self.shared.broker.purge(&queue))
    }

    async fn set_queue_expiry(
        &self,
        name: &str,
        expires: Option<std::time::Duration>,
    ) -> Result<(), EngineError> {
        self.shared.check_open()?;
        let mut writes = Writes::default();
        self.shared
            .broker
            .set_queue_expiry(self.shared.owner, name, expires, &mut writes)?;
        writes.durable().await
    }

    async fn queue_info(&self, name: &str) -> Result<QueueInfo, EngineError> {
        self.shared.check_open()?;
        self.shared.broker.queue_info(name)
    }

    async fn declare_queue_passive(&self, name: &str) -> Result<QueueDeclared, EngineError> {
        self.shared.check_open()?;
        let queue = self.shared.broker.queue_for(self.shared.owner, name)?;
        queue.touch();
        let (messages, _, consumers) = queue.counts();
        Ok(QueueDeclared {
            name: name.to_owned(),
            declared: Declared::Existed,
            messages,
            consumers,
        })
    }

    async fn list_queues(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<QueueInfo>, EngineError> {
        self.shared.check_open()?;
        Ok(self.shared.broker.list_queues(after, limit))
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError> {
        self.shared.check_open()?;
        let mut writes = Writes::default();
        let owner = self.shared.owner;
        self.shared
            .broker
            .bind(owner, queue, exchange, routing_key, arguments, &mut writes)?;
        writes.durable().await
    }

    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError> {
        self.shared.check_open()?;
        self.shared
            .broker
            .unbind(self.shared.owner, queue, exchange, routing_key, arguments)
    }

    async fn list_bindings(&self, queue: &str) -> Result<Vec<BindingInfo>, EngineError> {
        self.shared.check_open()?;
        self.shared.broker.list_bindings(queue)
    }

    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        _options: PublishOptions,
    ) -> PublishConfirm {
        self.publish_with(exchange, routing_key, message)
    }

    fn publish_shared(
        &self,
        exchange: &str,
        routing_key: Arc<str>,
        message: Message,
        _options: PublishOptions,
    ) -> PublishConfirm {
        let Some(mut last) = self.last_route.try_lock() else {
            return self.publish_with(exchange, routing_key, message);
        };
        // Routed synchronously inside the call: the channel's order is the call order.
        let result = self.shared.check_open().and_then(|()| {
            self.shared
                .broker
                .publish_remembered(exchange, routing_key, message, &mut last)
        });
        confirm(result)
    }

    fn publish_run(
        &self,
        exchange: &str,
        run: &mut Vec<(Arc<str>, Message)>,
        _options: PublishOptions,
        confirms: &mut Vec<PublishConfirm>,
    ) {
        let last = self.last_route.try_lock();
        let (Some(mut last), Ok(())) = (last, self.shared.check_open()) else {
            // Closed (each publish hears so), or another publish of this channel routes now.
            return crate::engine::publish_one_by_one(run, confirms, |routing_key, message| {
                self.publish_with(exchange, routing_key, message)
            });
        };
        self.shared
            .broker
            .publish_run(exchange, run, &mut last, |result| {
                confirms.push(confirm(result))
            });
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer, EngineError> {
        self.shared.check_open()?;
        let q = self.shared.broker.queue_for(self.shared.owner, queue)?;
        let (credit, no_ack) = match options.ack {
            AckMode::Manual { prefetch: 0 } => {
                return Err(EngineError::InvalidArgument(
                    "prefetch must be between 1 and 65535".into(),
                ));
            }
            AckMode::Manual { prefetch } => (u32::from(prefetch), false),
            AckMode::Auto => (NO_ACK_WINDOW, true),
        };
        let tag: Arc<str> = if options.consumer_tag.is_empty() {
            names::generate(CONSUMER_TAG_PREFIX).into()
        } else {
            options.consumer_tag.as_str().into()
        };
        let stream = self.shared.consume(
            q.clone(),
            tag.clone(),
            credit,
            no_ack,
            options.exclusive,
            options.pressure,
        )?;
        Ok(Consumer::new(tag, q.name.clone(), Box::new(stream)))
    }

    async fn cancel(&self, consumer_tag: &str, on_cancel: OnCancel) -> Result<(), EngineError> {
        self.shared.check_open()?;
        if self.shared.cancel_consumer(consumer_tag, None, on_cancel) {
            Ok(())
        } else {
            Err(EngineError::PreconditionFailed(format!(
                "unknown consumer tag '{consumer_tag}'"
            )))
        }
    }

    async fn get(&self, queue: &str, no_ack: bool) -> Result<Option<Delivery>, EngineError> {
        self.shared.check_open()?;
        let q = self.shared.broker.queue_for(self.shared.owner, queue)?;
        Ok(self.shared.get(&q, no_ack))
    }

    fn ack(&self, delivery_tag: u64, multiple: bool) -> Settled {
        Settled::ready(
            self.shared
                .check_open()
                .and_then(|()| self.shared.settle(delivery_tag, multiple, None)),
        )
    }

    fn ack_each(&self, tags: &[u64]) -> Settled {
        Settled::ready(
            self.shared
                .check_open()
                .and_then(|()| self.shared.ack_each(tags)),
        )
    }

    fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Settled {
        Settled::ready(
            self.shared
                .check_open()
                .and_then(|()| self.shared.settle(delivery_tag, multiple, Some(requeue))),
        )
    }

    async fn close(&self) {
        self.shared.close();
    }
}
