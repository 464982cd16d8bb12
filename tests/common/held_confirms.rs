//! An engine that holds every publish confirm until the test lets it go: the embedded engine
//! underneath routes each message at once (its place in the channel's order is fixed at the
//! call), only the answer waits — as it does on an upstream broker or a durable store. Tests
//! use it to see what an adapter does while confirms are outstanding.

use std::sync::Arc;

use amqp_gateway::engine::embedded::{EmbeddedEngine, EmbeddedOptions};
use amqp_gateway::engine::*;
use async_trait::async_trait;
use tokio::sync::{Semaphore, watch};

pub struct HeldConfirms {
    inner: EmbeddedEngine,
    /// One permit answers one publish.
    release: Arc<Semaphore>,
    /// Publishes routed so far.
    published: watch::Sender<usize>,
}

impl HeldConfirms {
    pub fn new() -> Arc<HeldConfirms> {
        Arc::new(HeldConfirms {
            inner: EmbeddedEngine::new(EmbeddedOptions::default()),
            release: Arc::new(Semaphore::new(0)),
            published: watch::Sender::new(0),
        })
    }

    /// Lets `n` more confirms through, in the order they wait.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }

    /// Publishes the adapters handed over so far.
    pub fn published(&self) -> watch::Receiver<usize> {
        self.published.subscribe()
    }
}

#[async_trait]
impl Engine for HeldConfirms {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn sessions(&self) -> Arc<dyn sessions::SessionRegistry> {
        self.inner.sessions()
    }
    fn retained(&self) -> Arc<dyn retained::RetainedStore> {
        self.inner.retained()
    }
    async fn open_channel(
        &self,
        owner: &Owner,
        label: &str,
    ) -> Result<Arc<dyn Channel>, EngineError> {
        Ok(Arc::new(HeldChannel {
            inner: self.inner.open_channel(owner, label).await?,
            release: self.release.clone(),
            published: self.published.clone(),
        }))
    }
    fn health(&self) -> Health {
        self.inner.health()
    }
    fn record_metrics(&self) {
        self.inner.record_metrics()
    }
    fn publish_blocked(&self) -> bool {
        self.inner.publish_blocked()
    }
    fn watch_publish_blocked(&self) -> watch::Receiver<bool> {
        self.inner.watch_publish_blocked()
    }
    async fn shutdown(&self) {
        self.release.close();
        self.inner.shutdown().await
    }
}

struct HeldChannel {
    inner: Arc<dyn Channel>,
    release: Arc<Semaphore>,
    published: watch::Sender<usize>,
}

#[async_trait]
impl Channel for HeldChannel {
    fn id(&self) -> u64 {
        self.inner.id()
    }
    async fn declare_exchange(&self, n: &str, s: &ExchangeSpec) -> Result<Declared, EngineError> {
        self.inner.declare_exchange(n, s).await
    }
    async fn delete_exchange(&self, n: &str, if_unused: bool) -> Result<(), EngineError> {
        self.inner.delete_exchange(n, if_unused).await
    }
    async fn exchange_info(&self, n: &str) -> Result<ExchangeInfo, EngineError> {
        self.inner.exchange_info(n).await
    }
    async fn list_exchanges(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ExchangeInfo>, EngineError> {
        self.inner.list_exchanges(after, limit).await
    }
    async fn declare_queue(&self, n: &str, s: &QueueSpec) -> Result<QueueDeclared, EngineError> {
        self.inner.declare_queue(n, s).await
    }
    async fn delete_queue(&self, n: &str, o: DeleteQueueOptions) -> Result<u64, EngineError> {
        self.inner.delete_queue(n, o).await
    }
    async fn purge_queue(&self, n: &str) -> Result<u64, EngineError> {
        self.inner.purge_queue(n).await
    }
    async fn set_queue_expiry(
        &self,
        n: &str,
        expires: Option<std::time::Duration>,
    ) -> Result<(), EngineError> {
        self.inner.set_queue_expiry(n, expires).await
    }
    async fn queue_info(&self, n: &str) -> Result<QueueInfo, EngineError> {
        self.inner.queue_info(n).await
    }
    async fn declare_queue_passive(&self, n: &str) -> Result<QueueDeclared, EngineError> {
        self.inner.declare_queue_passive(n).await
    }
    async fn list_queues(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<QueueInfo>, EngineError> {
        self.inner.list_queues(after, limit).await
    }
    async fn bind_queue(
        &self,
        q: &str,
        e: &str,
        k: &str,
        a: &FieldTable,
    ) -> Result<(), EngineError> {
        self.inner.bind_queue(q, e, k, a).await
    }
    async fn unbind_queue(
        &self,
        q: &str,
        e: &str,
        k: &str,
        a: &FieldTable,
    ) -> Result<(), EngineError> {
        self.inner.unbind_queue(q, e, k, a).await
    }
    async fn list_bindings(&self, q: &str) -> Result<Vec<BindingInfo>, EngineError> {
        self.inner.list_bindings(q).await
    }
    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> PublishConfirm {
        let confirm = self.inner.publish(exchange, routing_key, message, options);
        self.published.send_modify(|n| *n += 1);
        let release = self.release.clone();
        PublishConfirm::pending(async move {
            match release.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return Err(EngineError::ChannelClosed),
            }
            confirm.await
        })
    }
    async fn consume(&self, q: &str, o: ConsumeOptions) -> Result<Consumer, EngineError> {
        self.inner.consume(q, o).await
    }
    async fn cancel(&self, tag: &str, on_cancel: OnCancel) -> Result<(), EngineError> {
        self.inner.cancel(tag, on_cancel).await
    }
    async fn get(&self, q: &str, no_ack: bool) -> Result<Option<Delivery>, EngineError> {
        self.inner.get(q, no_ack).await
    }
    fn ack(&self, tag: u64, multiple: bool) -> Settled {
        self.inner.ack(tag, multiple)
    }
    fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Settled {
        self.inner.nack(tag, multiple, requeue)
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
