//! An engine channel on the upstream broker (DESIGN.md §1): an ordered confirm-mode publish
//! channel ([`Publisher`]), one AMQP channel per consumer, one for `get`s that must be acked,
//! and pooled short-lived channels for everything else, so a refusal never closes the AMQP
//! channel that holds a client's consumers, unacked deliveries or unconfirmed publishes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use futures_util::FutureExt;
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicGetOptions, BasicRejectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use parking_lot::Mutex;

mod topology;

use self::topology::{is_not_found, lapin_kind, page};
use super::Shared;
use super::consumer::{self, AUTO_ACK_WINDOW, Spec, State, UpstreamConsumer};
use super::convert::{self, About, short};
use super::owners::Binding;
use super::publisher::{Publisher, Request};
use super::tags::{Amqp, Tags};
use crate::engine::names::{self, CONSUMER_TAG_PREFIX};
use crate::engine::{
    AckMode, BindingInfo, Channel, ConsumeOptions, Consumer, Declared, DeleteQueueOptions,
    Delivery, EngineError, ExchangeInfo, ExchangeSpec, FieldTable, Message, OnCancel, Owner,
    PublishConfirm, PublishOptions, QueueDeclared, QueueInfo, QueueSpec, Settled,
};

struct Held {
    /// Auto-ack: its acker may have an ack in flight, so no requeue-all before the close.
    auto: bool,
    /// Its current AMQP channel and lapin consumer, which a reconnect replaces.
    state: Arc<State>,
}

pub(super) struct Inner {
    id: u64,
    owner: Owner,
    shared: Arc<Shared>,
    publisher: Mutex<Option<Publisher>>,
    tags: Arc<Tags>,
    consumers: Mutex<HashMap<String, Held>>,
    settling: consumer::Settling,
    /// AMQP channels of consumers cancelled with `KeepUnacked`, closed with the channel.
    kept: Mutex<Vec<lapin::Channel>>,
    getter: tokio::sync::Mutex<Option<Amqp>>,
    closed: AtomicBool,
}

/// The handle adapters hold; dropping the last one closes the channel.
pub(super) struct UpstreamChannel {
    inner: Arc<Inner>,
}

impl Drop for UpstreamChannel {
    fn drop(&mut self) {
        if self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        let inner = self.inner.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { inner.close().await });
        }
    }
}

impl UpstreamChannel {
    pub(super) fn open(shared: Arc<Shared>, owner: Owner) -> Arc<UpstreamChannel> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        shared.owners.opened(owner.id());
        let publisher = Publisher::spawn(shared.link.clone());
        Arc::new(UpstreamChannel {
            inner: Arc::new(Inner {
                id: NEXT.fetch_add(1, Ordering::Relaxed),
                owner,
                shared,
                publisher: Mutex::new(Some(publisher)),
                tags: Arc::default(),
                consumers: Mutex::default(),
                settling: consumer::Settling::default(),
                kept: Mutex::default(),
                getter: tokio::sync::Mutex::default(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    pub(super) fn id(&self) -> u64 {
        self.inner.id
    }

    pub(super) async fn close(&self) {
        self.inner.close().await;
    }
}

impl Inner {
    /// The management API, which listings need (without it: `NotSupported`, REST 501).
    fn management(&self) -> Result<&super::management::Management, EngineError> {
        self.check_open()?;
        self.shared.management.as_ref().ok_or_else(|| {
            EngineError::NotSupported("listing needs engine.upstream.management_url".into())
        })
    }

    fn check_open(&self) -> Result<(), EngineError> {
        if self.closed.load(Ordering::Acquire) {
            Err(EngineError::ChannelClosed)
        } else {
            Ok(())
        }
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Acks under way finish first; later ones see the channel closed.
        let _settled = self.settling.write().await;
        let held: Vec<Held> = self.consumers.lock().drain().map(|(_, h)| h).collect();
        let mut channels: Vec<(lapin::Channel, bool)> = held
            .into_iter()
            .map(|h| {
                h.state.cancelled.store(true, Ordering::Release);
                (h.state.live().amqp.channel, !h.auto)
            })
            .collect();
        channels.extend(self.kept.lock().drain(..).map(|ch| (ch, true)));
        if let Some(getter) = self.getter.lock().await.take() {
            channels.push((getter.channel, true));
        }
        self.tags.clear();
        for (ch, requeue) in channels {
            consumer::requeue_and_close(&ch, requeue).await;
        }
        // Its task settles what is in flight, then closes its AMQP channel.
        drop(self.publisher.lock().take());
        let owned = self.shared.owners.closed(self.owner.id());
        self.delete_owned(owned).await;
    }

    async fn get_acked(&self, queue: &str) -> Result<Option<Delivery>, EngineError> {
        let mut getter = self.getter.lock().await;
        if let Some(amqp) = getter.as_ref()
            && amqp.channel.status().connected()
            && self.tags.holds_on(amqp)
        {
            // A refusal would close the channel that holds unacked gets: ask a pooled one first.
            self.queue_counts(queue).await?;
        }
        let amqp = match getter.as_ref() {
            Some(amqp) if amqp.channel.status().connected() => amqp.clone(),
            _ => {
                let conns = self.shared.link.current()?;
                let channel = conns
                    .consuming_channel()
                    .await
                    .map_err(|e| convert::engine_error(&e, About::Other))?;
                let amqp = Amqp {
                    generation: conns.generation,
                    channel,
                };
                *getter = Some(amqp.clone());
                amqp
            }
        };
        let ch = &amqp.channel;
        match ch
            .basic_get(short("queue", queue)?, BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(m)) => {
                if self.closed.load(Ordering::Acquire) {
                    // close() already took the getter: closing it requeues this one.
                    *getter = None;
                    consumer::requeue_and_close(ch, true).await;
                    return Err(EngineError::ChannelClosed);
                }
                let tag = self.tags.track(&amqp, m.delivery.delivery_tag);
                Ok(Some(convert::delivery(
                    m.delivery,
                    tag,
                    None,
                    Some(m.message_count.into()),
                )))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.tags.forget_channel(&amqp);
                *getter = None;
                Err(convert::engine_error(&e, About::Queue(queue)))
            }
        }
    }
}

#[async_trait]
impl Channel for UpstreamChannel {
    fn id(&self) -> u64 {
        self.inner.id
    }

    async fn declare_exchange(
        &self,
        name: &str,
        spec: &ExchangeSpec,
    ) -> Result<Declared, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        names::validate_name("exchange", name)?;
        let existed = this.exchange_exists(name).await?;
        let ch = this.shared.pool.take().await?;
        let options = ExchangeDeclareOptions {
            passive: false,
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
            nowait: false,
        };
        ch.exchange_declare(
            short("exchange", name)?,
            lapin_kind(spec.kind),
            options,
            convert::table(&spec.arguments)?,
        )
        .await
        .map_err(|e| convert::engine_error(&e, About::Exchange(name)))?;
        Ok(if existed {
            Declared::Existed
        } else {
            Declared::Created
        })
    }

    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), EngineError> {
        let this = &self.inner;
        this.check_open()?;
        let name = names::canonical_exchange(name);
        if name.is_empty() || names::is_reserved(name) {
            return Err(EngineError::AccessRefused(format!(
                "exchange '{name}' cannot be deleted"
            )));
        }
        if !this.exchange_exists(name).await? {
            return Err(EngineError::exchange_not_found(name));
        }
        let ch = this.shared.pool.take().await?;
        ch.exchange_delete(
            short("exchange", name)?,
            ExchangeDeleteOptions {
                if_unused,
                nowait: false,
            },
        )
        .await
        .map_err(|e| convert::engine_error(&e, About::Exchange(name)))
    }

    async fn exchange_info(&self, name: &str) -> Result<ExchangeInfo, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        let name = names::canonical_exchange(name);
        let Some(management) = &this.shared.management else {
            if !name.is_empty() && !this.exchange_exists(name).await? {
                return Err(EngineError::exchange_not_found(name));
            }
            return Err(EngineError::NotSupported(
                "an exchange's flags need engine.upstream.management_url".into(),
            ));
        };
        management
            .exchange(name)
            .await?
            .ok_or_else(|| EngineError::exchange_not_found(name))
    }

    async fn list_exchanges(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ExchangeInfo>, EngineError> {
        let management = self.inner.management()?;
        let all = management.exchanges().await?;
        Ok(page(all, after, limit, |e| &e.name))
    }

    async fn declare_queue(
        &self,
        name: &str,
        spec: &QueueSpec,
    ) -> Result<QueueDeclared, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        if !name.is_empty() {
            names::validate_name("queue", name)?;
            this.shared.owners.check(name, this.owner.id())?;
        }
        let existed = if name.is_empty() {
            false
        } else {
            match this.queue_counts(name).await {
                Ok(_) => true,
                Err(e) if is_not_found(&e) => false,
                Err(e) => return Err(e),
            }
        };
        if existed && spec.exclusive && !this.shared.owners.owns(name, this.owner.id()) {
            // Shared upstream, but some other client (or gateway) holds it.
            return Err(EngineError::ResourceLocked(name.to_owned()));
        }
        let (options, arguments) = Inner::upstream_queue_spec(spec);
        let arguments = convert::table(&arguments)?;
        let ch = this.shared.pool.take().await?;
        let q = ch
            .queue_declare(short("queue", name)?, options, arguments.clone())
            .await
            .map_err(|e| convert::engine_error(&e, About::Queue(name)))?;
        let declared_name = q.name().as_str().to_owned();
        if spec.exclusive {
            let owner = this.owner.id();
            this.shared
                .owners
                .claim(&declared_name, owner, options, arguments);
            if this.closed.load(Ordering::Acquire) {
                // Its owner's channel closed meanwhile: nobody would ever delete it.
                this.shared.owners.forget(&declared_name);
                this.delete_owned(vec![declared_name]).await;
                return Err(EngineError::ChannelClosed);
            }
        }
        Ok(QueueDeclared {
            name: declared_name,
            declared: if existed {
                Declared::Existed
            } else {
                Declared::Created
            },
            messages: q.message_count().into(),
            consumers: q.consumer_count(),
        })
    }

    async fn delete_queue(
        &self,
        name: &str,
        options: DeleteQueueOptions,
    ) -> Result<u64, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        this.shared.owners.check(name, this.owner.id())?;
        this.queue_counts(name).await?;
        let ch = this.shared.pool.take().await?;
        let options = QueueDeleteOptions {
            if_unused: options.if_unused,
            if_empty: options.if_empty,
            nowait: false,
        };
        let dropped = ch
            .queue_delete(short("queue", name)?, options)
            .await
            .map_err(|e| convert::engine_error(&e, About::Queue(name)))?;
        this.shared.owners.forget(name);
        Ok(dropped.into())
    }

    async fn purge_queue(&self, name: &str) -> Result<u64, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        this.shared.owners.check(name, this.owner.id())?;
        let ch = this.shared.pool.take().await?;
        ch.queue_purge(short("queue", name)?, QueuePurgeOptions::default())
            .await
            .map(u64::from)
            .map_err(|e| convert::engine_error(&e, About::Queue(name)))
    }

    async fn set_queue_expiry(
        &self,
        _: &str,
        _: Option<std::time::Duration>,
    ) -> Result<(), EngineError> {
        self.inner.check_open()?;
        Err(EngineError::NotSupported(
            "AMQP cannot change a queue's x-expires in place".into(),
        ))
    }

    async fn queue_info(&self, name: &str) -> Result<QueueInfo, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        let Some(management) = &this.shared.management else {
            let (messages, consumers) = this.queue_counts(name).await?;
            return Ok(QueueInfo {
                name: name.to_owned(),
                spec: None,
                messages,
                messages_unacknowledged: None,
                consumers,
                totals: None,
            });
        };
        let mut info = management
            .queue(name)
            .await?
            .ok_or_else(|| EngineError::queue_not_found(name))?;
        // A passive declare's counts are exact where the API's are sampled, but RabbitMQ takes
        // it as use: an inspection must not renew an `x-expires` lease.
        let expiring = info
            .spec
            .as_ref()
            .is_some_and(|s| s.arguments.contains_key("x-expires"));
        if !expiring {
            match this.queue_counts(name).await {
                Ok((messages, consumers)) => {
                    info.messages = messages;
                    info.consumers = consumers;
                }
                Err(EngineError::NotFound { .. }) => {
                    return Err(EngineError::queue_not_found(name));
                }
                Err(_) => {}
            }
        }
        // Exclusive to a client here, a shared queue to the broker.
        if let Some(spec) = &mut info.spec {
            spec.exclusive |= this.shared.owners.is_owned(name);
        }
        Ok(info)
    }

    async fn declare_queue_passive(&self, name: &str) -> Result<QueueDeclared, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        this.shared.owners.check(name, this.owner.id())?;
        let (messages, consumers) = this.queue_counts(name).await?;
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
        let management = self.inner.management()?;
        let all = management.queues().await?;
        Ok(page(all, after, limit, |q| &q.name))
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError> {
        let this = &self.inner;
        this.check_open()?;
        names::validate_key(routing_key)?;
        this.shared.owners.check(queue, this.owner.id())?;
        let binding = binding(exchange, routing_key, arguments)?;
        let ch = this.shared.pool.take().await?;
        ch.queue_bind(
            short("queue", queue)?,
            binding.exchange.clone(),
            binding.routing_key.clone(),
            QueueBindOptions::default(),
            binding.arguments.clone(),
        )
        .await
        .map_err(|e| convert::engine_error(&e, About::Queue(queue)))?;
        this.shared.owners.bound(queue, binding);
        Ok(())
    }

    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError> {
        let this = &self.inner;
        this.check_open()?;
        this.shared.owners.check(queue, this.owner.id())?;
        let binding = binding(exchange, routing_key, arguments)?;
        let ch = this.shared.pool.take().await?;
        ch.queue_unbind(
            short("queue", queue)?,
            binding.exchange.clone(),
            binding.routing_key.clone(),
            binding.arguments.clone(),
        )
        .await
        .map_err(|e| convert::engine_error(&e, About::Queue(queue)))?;
        this.shared.owners.unbound(queue, &binding);
        Ok(())
    }

    async fn list_bindings(&self, queue: &str) -> Result<Vec<BindingInfo>, EngineError> {
        let management = self.inner.management()?;
        management
            .bindings(queue)
            .await?
            .ok_or_else(|| EngineError::queue_not_found(queue))
    }

    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        _: PublishOptions,
    ) -> PublishConfirm {
        let this = &self.inner;
        let request = (|| {
            this.check_open()?;
            let limit = this.shared.max_message_bytes;
            if message.body.len() > limit {
                return Err(EngineError::ContentTooLarge {
                    size: message.body.len(),
                    limit,
                });
            }
            names::validate_key(routing_key)?;
            if let Some(ttl) = &message.properties.expiration
                && ttl.parse::<u32>().is_err()
            {
                // RabbitMQ would close the publish channel over it.
                return Err(EngineError::InvalidArgument(format!(
                    "expiration '{ttl}' is not a number of milliseconds"
                )));
            }
            let exchange = names::canonical_exchange(exchange);
            Ok(Request::new(
                short("exchange", exchange)?,
                short("routing key", routing_key)?,
                message.body.clone(),
                convert::properties_to_amqp(&message.properties)?,
            ))
        })();
        match request {
            Ok((request, confirm)) => {
                match this.publisher.lock().as_ref() {
                    Some(publisher) => publisher.send(request),
                    None => return PublishConfirm::ready(Err(EngineError::ChannelClosed)),
                }
                confirm
            }
            Err(e) => PublishConfirm::ready(Err(e)),
        }
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        this.shared.owners.check(queue, this.owner.id())?;
        let tag = if options.consumer_tag.is_empty() {
            names::generate(CONSUMER_TAG_PREFIX)
        } else {
            options.consumer_tag.clone()
        };
        if this.consumers.lock().contains_key(&tag) {
            return Err(EngineError::PreconditionFailed(format!(
                "consumer tag '{tag}' is in use on this channel"
            )));
        }
        let prefetch = match options.ack {
            AckMode::Manual { prefetch: 0 } => {
                return Err(EngineError::InvalidArgument(
                    "prefetch must be 1..=65535".into(),
                ));
            }
            AckMode::Manual { prefetch } => prefetch,
            AckMode::Auto => AUTO_ACK_WINDOW,
        };
        // Client strings checked before any channel exists: a bad one is the client's error.
        let spec = Arc::new(Spec {
            queue: short("queue", queue)?,
            tag: short("consumer tag", &tag)?,
            prefetch,
            exclusive: options.exclusive,
            arguments: convert::table(&options.arguments)?,
        });
        let live = consumer::start(&*this.shared.link.current()?, &spec).await?;
        let state = Arc::new(State::new(live.clone()));
        let taken = matches!(options.ack, AckMode::Auto)
            .then(|| UpstreamConsumer::auto_acker(live.amqp.channel.clone()));
        let held = Held {
            auto: taken.is_some(),
            state: state.clone(),
        };
        this.consumers.lock().insert(tag.clone(), held);
        if this.closed.load(Ordering::Acquire) {
            // Closed while the consume was under way: close() did not see this one.
            this.consumers.lock().remove(tag.as_str());
            consumer::requeue_and_close(&live.amqp.channel, true).await;
            return Err(EngineError::ChannelClosed);
        }
        let tag: Arc<str> = tag.into();
        let stream = UpstreamConsumer {
            live,
            link: this.shared.link.clone(),
            spec,
            tags: this.tags.clone(),
            tag: tag.clone(),
            state,
            settling: this.settling.clone(),
            taken,
            resuming: None,
            done: false,
        };
        Ok(Consumer::new(tag, queue.into(), Box::new(stream)))
    }

    async fn cancel(&self, consumer_tag: &str, on_cancel: OnCancel) -> Result<(), EngineError> {
        let this = &self.inner;
        this.check_open()?;
        let held = this.consumers.lock().remove(consumer_tag).ok_or_else(|| {
            EngineError::PreconditionFailed(format!("unknown consumer tag '{consumer_tag}'"))
        })?;
        held.state.cancelled.store(true, Ordering::Release);
        let live = held.state.live();
        match on_cancel {
            OnCancel::Requeue => {
                let _settled = this.settling.write().await;
                this.tags.forget_channel(&live.amqp);
                consumer::requeue_and_close(&live.amqp.channel, !held.auto).await;
            }
            OnCancel::KeepUnacked => {
                let channel = &live.amqp.channel;
                let _ = channel
                    .basic_cancel(
                        short("consumer tag", consumer_tag)?,
                        BasicCancelOptions::default(),
                    )
                    .await;
                // What the client never took goes back now; what it took waits for its ack.
                let mut untaken = live.consumer;
                while let Some(Some(Ok(d))) = untaken.next().now_or_never() {
                    let _ = channel
                        .basic_reject(d.delivery_tag, BasicRejectOptions { requeue: true })
                        .await;
                }
                this.kept.lock().push(live.amqp.channel);
            }
        }
        Ok(())
    }

    async fn get(&self, queue: &str, no_ack: bool) -> Result<Option<Delivery>, EngineError> {
        let this = &self.inner;
        this.check_open()?;
        this.shared.owners.check(queue, this.owner.id())?;
        if !no_ack {
            return this.get_acked(queue).await;
        }
        let ch = this.shared.pool.take().await?;
        match ch
            .basic_get(short("queue", queue)?, BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(m)) => Ok(Some(convert::delivery(
                m.delivery,
                this.tags.next(),
                None,
                Some(m.message_count.into()),
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(convert::engine_error(&e, About::Queue(queue))),
        }
    }

    fn ack(&self, delivery_tag: u64, multiple: bool) -> Settled {
        let this = self.inner.clone();
        Settled::pending(async move {
            let _settling = this.settling.read().await;
            this.check_open()?;
            let (batches, count) = this.tags.take(delivery_tag, multiple)?;
            consumer::settle(batches, true, false).await?;
            crate::metrics::acked(count as u64);
            Ok(())
        })
    }

    fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Settled {
        let this = self.inner.clone();
        Settled::pending(async move {
            let _settling = this.settling.read().await;
            this.check_open()?;
            let (batches, _) = this.tags.take(delivery_tag, multiple)?;
            consumer::settle(batches, false, requeue).await
        })
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

fn binding(
    exchange: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> Result<Binding, EngineError> {
    Ok(Binding {
        exchange: short("exchange", names::canonical_exchange(exchange))?,
        routing_key: short("routing key", routing_key)?,
        arguments: convert::table(arguments)?,
    })
}
