//! The embedded broker: the registries of exchanges and queues, topology changes, routing of
//! publishes, and dead-lettering.
//!
//! Data path: `publish` reads the exchange registry (a sharded map), takes the exchange's read
//! lock to route, and each destination queue's own lock to enqueue — no lock shared by all
//! publishes. Control path: declares, deletes and binds are serialised by `topology`, a lock the
//! data path never takes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::flow::Pace;

mod dead_letter;
mod disk_alarm;
mod effects;
mod equivalence;
mod expiry;
mod pager;
mod persist;
mod publish;

pub(super) use self::publish::{LastRoute, Published};

use self::equivalence::{
    EXCHANGE_EQUIVALENCE_KEYS, QUEUE_EQUIVALENCE_KEYS, equivalent_arguments, must_match,
};
use super::exchange::{Exchange, Targets};
use super::held::{Held, Stored};
use super::queue::{
    DeadLetter, Effects, Enqueued, Gauges, More, Now, Queue, QueueArgs, death_entry,
};
use super::store::{Snapshot, Store, StoreWrite};
use crate::engine::names::{self, canonical_exchange};
use crate::engine::{
    BindingInfo, Declared, EngineError, Envelope, ExchangeInfo, ExchangeKind, ExchangeSpec,
    FieldTable, FieldValue, Headers, Message, PublishOutcome, QueueDeclared, QueueInfo, QueueSpec,
};

pub(super) struct Broker {
    // foldhash, not SipHash: every publish looks its exchange up, every delivery its queue.
    exchanges: DashMap<Arc<str>, Arc<Exchange>, foldhash::fast::RandomState>,
    queues: DashMap<Arc<str>, Arc<Queue>, foldhash::fast::RandomState>,
    topology: Mutex<()>,
    store: Arc<dyn Store>,
    gauges: Arc<Gauges>,
    /// Bytes of every message held (see `held::Charge`).
    held: Arc<Held>,
    max_message_bytes: usize,
    next_id: AtomicU64,
    /// The id of the next message written to the store.
    next_message: AtomicU64,
    default_exchange: Arc<str>,
    me: Weak<Broker>,
    /// Open channels, so a shutdown can close them.
    channels: Mutex<HashMap<u64, Weak<dyn Closable>>>,
    /// Per owner (client connection): its open channels and its exclusive queues, deleted when
    /// the last of those channels closes.
    owners: Mutex<HashMap<u64, Owned>>,
    /// Cancelled at shutdown: the expiry tasks stop.
    stop: CancellationToken,
    /// Set while [`Broker::restore`] replays the store.
    restoring: AtomicBool,
    /// Wakes the paging task (`pager.rs`).
    pager_wake: Arc<tokio::sync::Notify>,
    /// Queues the pager reads ahead for.
    reading_ahead: Mutex<Vec<Weak<Queue>>>,
    /// The tasks that work on the store (disk alarm, pager), awaited at shutdown.
    maintenance: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Broker {
    pub fn new(
        store: Arc<dyn Store>,
        max_message_bytes: usize,
        memory_high_watermark: u64,
        backlog: Option<crate::flow::Bound>,
    ) -> Arc<Self> {
        let broker = Arc::new_cyclic(|me| Broker {
            exchanges: DashMap::default(),
            queues: DashMap::default(),
            topology: Mutex::new(()),
            store,
            gauges: Arc::new(Gauges {
                backlog,
                ..Gauges::default()
            }),
            held: Arc::new(Held::new(memory_high_watermark)),
            max_message_bytes,
            next_id: AtomicU64::new(1),
            next_message: AtomicU64::new(1),
            default_exchange: Arc::from(""),
            me: me.clone(),
            channels: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            restoring: AtomicBool::new(false),
            pager_wake: Arc::default(),
            reading_ahead: Mutex::new(Vec::new()),
            maintenance: Mutex::new(Vec::new()),
        });
        for (name, kind) in [
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            let name: Arc<str> = name.into();
            broker.exchanges.insert(
                name.clone(),
                Arc::new(Exchange::new(name, ExchangeSpec::new(kind))),
            );
        }
        broker
    }

    /// Group commits the store made (each one fsync).
    pub fn store_commits(&self) -> u64 {
        self.store.commits()
    }

    /// Where durable topology is written; `None` while [`Broker::restore`] replays it.
    fn store(&self) -> Option<&dyn Store> {
        (!self.restoring.load(Ordering::Acquire)).then_some(&*self.store)
    }

    /// Declares and binds again what the store holds (without writing it back). Called once,
    /// before any channel opens. Bindings to objects that did not come back are skipped.
    pub fn restore(&self, snapshot: Snapshot) -> Result<(), EngineError> {
        self.restoring.store(true, Ordering::Release);
        let restored = self.replay(&snapshot);
        self.restoring.store(false, Ordering::Release);
        restored
    }

    fn replay(&self, snapshot: &Snapshot) -> Result<(), EngineError> {
        for (name, spec) in &snapshot.exchanges {
            self.declare_exchange(name, spec, &mut Writes::default())?;
        }
        for (name, spec) in &snapshot.queues {
            self.declare_queue(0, name, spec, &mut Writes::default())?;
        }
        for b in &snapshot.bindings {
            let bound = self.bind(
                0,
                &b.queue,
                &b.exchange,
                &b.routing_key,
                &b.arguments,
                &mut Writes::default(),
            );
            if let Err(e) = bound {
                tracing::warn!(queue = %b.queue, exchange = %b.exchange, error = %e, "stored binding not restored");
            }
        }
        Ok(())
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Refused once the broker is shutting down.
    pub fn register_channel(
        &self,
        id: u64,
        owner: u64,
        channel: Weak<dyn Closable>,
    ) -> Result<(), EngineError> {
        let mut channels = self.channels.lock();
        if self.stop.is_cancelled() {
            return Err(EngineError::Unavailable("engine is shutting down".into()));
        }
        channels.insert(id, channel);
        self.owners.lock().entry(owner).or_default().0 += 1;
        Ok(())
    }

    /// A channel closed; the last one of its owner takes the owner's exclusive queues along.
    pub fn unregister_channel(&self, id: u64, owner: u64) {
        self.channels.lock().remove(&id);
        let gone = {
            let mut owners = self.owners.lock();
            match owners.get_mut(&owner) {
                Some((open, _)) if *open > 1 => {
                    *open -= 1;
                    None
                }
                Some(_) => owners.remove(&owner).map(|(_, queues)| queues),
                None => None,
            }
        };
        for queue in gone.into_iter().flatten() {
            self.remove_queue(&queue);
        }
    }

    /// Records an exclusive queue of `owner`. `Err` when the owner has no open channel any
    /// more (its last one closed meanwhile): the queue is deleted at once.
    pub fn own_exclusive(&self, owner: u64, queue: Arc<Queue>) -> Result<(), EngineError> {
        {
            let mut owners = self.owners.lock();
            if let Some((_, queues)) = owners.get_mut(&owner) {
                queues.push(queue);
                return Ok(());
            }
        }
        self.remove_queue(&queue);
        Err(EngineError::ChannelClosed)
    }

    /// Closes every open channel (consumers end, unacked deliveries return, exclusive queues
    /// go) and stops the expiry tasks. Queues and their messages stay.
    pub fn shutdown(&self) {
        let channels: Vec<Weak<dyn Closable>> = {
            let mut channels = self.channels.lock();
            self.stop.cancel();
            channels.drain().map(|(_, c)| c).collect()
        };
        for channel in channels.iter().filter_map(Weak::upgrade) {
            channel.close();
        }
    }

    /// Runs `task` (given the broker, weakly, and the shutdown token) as one of the store's
    /// maintenance tasks, awaited at shutdown. Outside a runtime it does not run.
    fn spawn_maintenance<F, Fut>(&self, task: F)
    where
        F: FnOnce(Weak<Broker>, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let handle = rt.spawn(task(self.me.clone(), self.stop.clone()));
        self.maintenance.lock().push(handle);
    }

    /// Waits for the store's maintenance tasks, which end once `shutdown` stopped them, then
    /// closes the store: the data directory is free for another gateway even while something
    /// (a task not yet polled since the shutdown, a client's handle on the engine) still holds
    /// the broker.
    pub async fn close_store(&self) {
        let tasks = std::mem::take(&mut *self.maintenance.lock());
        for task in tasks {
            let _ = task.await;
        }
        self.store.close().await;
    }

    pub fn held(&self) -> &Held {
        &self.held
    }

    pub fn gauges(&self) -> (u64, u64, u64, u64) {
        (
            self.gauges.messages.load(Ordering::Relaxed),
            self.gauges.bytes.load(Ordering::Relaxed),
            self.queues.len() as u64,
            self.exchanges.len() as u64 + 1,
        )
    }

    fn exchange(&self, name: &str) -> Result<Arc<Exchange>, EngineError> {
        self.exchanges
            .get(name)
            .map(|e| e.value().clone())
            .ok_or_else(|| EngineError::exchange_not_found(name))
    }

    fn queue(&self, name: &str) -> Result<Arc<Queue>, EngineError> {
        self.queues
            .get(name)
            .map(|q| q.value().clone())
            .ok_or_else(|| EngineError::queue_not_found(name))
    }

    /// A queue the given owner (client connection) may use: exclusive queues only by theirs.
    pub fn queue_for(&self, owner: u64, name: &str) -> Result<Arc<Queue>, EngineError> {
        let queue = self.queue(name)?;
        match queue.owner() {
            Some(theirs) if theirs != owner => Err(EngineError::ResourceLocked(name.to_owned())),
            _ => Ok(queue),
        }
    }

    fn default_exchange_info(&self) -> ExchangeInfo {
        ExchangeInfo {
            name: String::new(),
            spec: ExchangeSpec::new(ExchangeKind::Direct),
        }
    }

    // ---- exchanges ----

    /// Its store write (a durable exchange) goes into `writes`, awaited by the caller once the
    /// topology lock is released; likewise for the other declares and binds below.
    pub fn declare_exchange(
        &self,
        name: &str,
        spec: &ExchangeSpec,
        writes: &mut Writes,
    ) -> Result<Declared, EngineError> {
        let name = canonical_exchange(name);
        if name.is_empty() {
            return Err(EngineError::AccessRefused(
                "the default exchange cannot be declared".into(),
            ));
        }
        names::validate_name("exchange", name)?;
        let _topology = self.topology.lock();
        if let Some(existing) = self.exchanges.get(name).map(|e| e.value().clone()) {
            let cur = &existing.spec;
            must_match(
                "exchange",
                name,
                [
                    (
                        "type",
                        format!("{:?}", spec.kind.as_str()),
                        format!("{:?}", cur.kind.as_str()),
                    ),
                    ("durable", spec.durable.to_string(), cur.durable.to_string()),
                    (
                        "auto_delete",
                        spec.auto_delete.to_string(),
                        cur.auto_delete.to_string(),
                    ),
                    (
                        "internal",
                        spec.internal.to_string(),
                        cur.internal.to_string(),
                    ),
                ],
            )?;
            equivalent_arguments(
                "exchange",
                name,
                EXCHANGE_EQUIVALENCE_KEYS,
                &spec.arguments,
                &cur.arguments,
            )?;
            return Ok(Declared::Existed);
        }
        if names::is_reserved(name) {
            return Err(EngineError::AccessRefused(format!(
                "exchange name '{name}' uses the reserved prefix 'amq.'"
            )));
        }
        if spec.durable
            && let Some(store) = self.store()
        {
            writes.push(store.put_exchange(name, spec));
        }
        let name: Arc<str> = name.into();
        self.exchanges
            .insert(name.clone(), Arc::new(Exchange::new(name, spec.clone())));
        Ok(Declared::Created)
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), EngineError> {
        let name = canonical_exchange(name);
        if name.is_empty() || names::is_reserved(name) {
            return Err(EngineError::AccessRefused(format!(
                "exchange '{}' belongs to the broker and cannot be deleted",
                if name.is_empty() {
                    names::DEFAULT_EXCHANGE_ALIAS
                } else {
                    name
                }
            )));
        }
        let _topology = self.topology.lock();
        let exchange = self.exchange(name)?;
        if if_unused && exchange.binding_count() > 0 {
            return Err(EngineError::PreconditionFailed(format!(
                "exchange '{name}' in use"
            )));
        }
        self.drop_exchange(&exchange);
        Ok(())
    }

    /// Removes an exchange and its bindings. Caller holds `topology`.
    fn drop_exchange(&self, exchange: &Arc<Exchange>) {
        self.exchanges.remove(&*exchange.name);
        exchange.mark_deleted();
        for binding in exchange.bindings() {
            if let Ok(queue) = self.queue(&binding.queue) {
                queue.bindings.lock().retain(|(e, k, a)| {
                    !(e == &exchange.name && **k == *binding.routing_key && *a == binding.arguments)
                });
            }
        }
        if exchange.spec.durable
            && let Some(store) = self.store()
        {
            // Not awaited: a failure is logged by the store (the exchange would come back at
            // the next start).
            drop(store.delete_exchange(&exchange.name));
        }
    }

    pub fn exchange_info(&self, name: &str) -> Result<ExchangeInfo, EngineError> {
        let name = canonical_exchange(name);
        if name.is_empty() {
            return Ok(self.default_exchange_info());
        }
        let ex = self.exchange(name)?;
        Ok(ExchangeInfo {
            name: ex.name.to_string(),
            spec: ex.spec.clone(),
        })
    }

    pub fn list_exchanges(&self, after: Option<&str>, limit: usize) -> Vec<ExchangeInfo> {
        let mut all: Vec<ExchangeInfo> = self
            .exchanges
            .iter()
            .map(|e| ExchangeInfo {
                name: e.name.to_string(),
                spec: e.spec.clone(),
            })
            .collect();
        all.push(self.default_exchange_info());
        page(all, |e| &e.name, after, limit)
    }

    // ---- queues ----

    pub fn declare_queue(
        &self,
        owner: u64,
        name: &str,
        spec: &QueueSpec,
        writes: &mut Writes,
    ) -> Result<(QueueDeclared, Option<Arc<Queue>>), EngineError> {
        let args = QueueArgs::parse(&spec.arguments)?;
        let _topology = self.topology.lock();
        let name = if name.is_empty() {
            names::generate(names::SERVER_NAMED_PREFIX)
        } else {
            names::validate_name("queue", name)?;
            if let Some(existing) = self.queues.get(name).map(|q| q.value().clone()) {
                if existing.owner().is_some_and(|o| o != owner) {
                    return Err(EngineError::ResourceLocked(name.to_owned()));
                }
                let cur = &existing.spec();
                must_match(
                    "queue",
                    name,
                    [
                        ("durable", spec.durable.to_string(), cur.durable.to_string()),
                        (
                            "exclusive",
                            spec.exclusive.to_string(),
                            cur.exclusive.to_string(),
                        ),
                        (
                            "auto_delete",
                            spec.auto_delete.to_string(),
                            cur.auto_delete.to_string(),
                        ),
                    ],
                )?;
                equivalent_arguments(
                    "queue",
                    name,
                    QUEUE_EQUIVALENCE_KEYS,
                    &spec.arguments,
                    &cur.arguments,
                )?;
                existing.touch();
                let (messages, _, consumers) = existing.counts();
                return Ok((
                    QueueDeclared {
                        name: name.to_owned(),
                        declared: Declared::Existed,
                        messages,
                        consumers,
                    },
                    None,
                ));
            }
            // A stored server-named queue (`amq.gen-…`) comes back under its own name.
            if names::is_reserved(name) && !self.restoring.load(Ordering::Acquire) {
                return Err(EngineError::AccessRefused(format!(
                    "queue name '{name}' uses the reserved prefix 'amq.'"
                )));
            }
            name.to_owned()
        };
        if spec.durable
            && !spec.exclusive
            && let Some(store) = self.store()
        {
            writes.push(store.put_queue(&name, spec));
        }
        let name: Arc<str> = name.into();
        let exclusive_to = spec.exclusive.then_some(owner);
        let queue = Arc::new(Queue::new(
            name.clone(),
            spec.clone(),
            args,
            exclusive_to,
            self.gauges.clone(),
            self.pages_for(spec),
        ));
        self.queues.insert(name.clone(), queue.clone());
        if queue.expires().is_some() && queue.claim_queue_expiry_task() {
            self.spawn_queue_expiry(&queue);
        }
        if queue.args().message_ttl.is_some() && queue.claim_expiry_task() {
            self.spawn_message_expiry(&queue);
        }
        Ok((
            QueueDeclared {
                name: name.to_string(),
                declared: Declared::Created,
                messages: 0,
                consumers: 0,
            },
            exclusive_to.map(|_| queue),
        ))
    }

    pub fn delete_queue(
        &self,
        owner: u64,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, EngineError> {
        let queue = self.queue_for(owner, name)?;
        queue.check_delete(if_unused, if_empty)?;
        Ok(self.remove_queue(&queue))
    }

    /// Removes a queue, its bindings (auto-deleting exchanges left without any) and its
    /// messages; ends its consumers. Returns how many ready messages it held. Idempotent.
    pub fn remove_queue(&self, queue: &Arc<Queue>) -> u64 {
        let _topology = self.topology.lock();
        let current = self
            .queues
            .remove_if(&*queue.name, |_, q| Arc::ptr_eq(q, queue));
        if current.is_none() {
            return 0;
        }
        let bindings = std::mem::take(&mut *queue.bindings.lock());
        for (exchange, _, _) in &bindings {
            if let Ok(ex) = self.exchange(exchange) {
                ex.unbind_queue(queue);
                if ex.spec.auto_delete && ex.binding_count() == 0 {
                    self.drop_exchange(&ex);
                }
            }
        }
        if queue.is_durable()
            && let Some(store) = self.store()
        {
            // Not awaited, as for exchanges.
            drop(store.delete_queue(&queue.name));
        }
        let mut fx = Effects::default();
        let dropped = queue.delete(&mut fx);
        self.forget(fx.take_dequeued());
        dropped
    }

    /// Drops a queue's ready messages; returns how many.
    pub fn purge(&self, queue: &Queue) -> u64 {
        let mut fx = Effects::default();
        let n = queue.purge(&mut fx);
        self.forget(fx.take_dequeued());
        n
    }

    /// An inspection: every queue, whoever owns it.
    pub fn queue_info(&self, name: &str) -> Result<QueueInfo, EngineError> {
        Ok(info(&*self.queue(name)?))
    }

    pub fn list_queues(&self, after: Option<&str>, limit: usize) -> Vec<QueueInfo> {
        let all: Vec<Arc<Queue>> = self.queues.iter().map(|q| q.value().clone()).collect();
        let mut names: Vec<Arc<Queue>> = all;
        names.sort_by(|a, b| a.name.cmp(&b.name));
        names
            .into_iter()
            .filter(|q| after.is_none_or(|a| &*q.name > a))
            .take(limit)
            .map(|q| info(&q))
            .collect()
    }

    // ---- bindings ----

    pub fn bind(
        &self,
        owner: u64,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
        writes: &mut Writes,
    ) -> Result<(), EngineError> {
        names::validate_key(key)?;
        let exchange = canonical_exchange(exchange);
        if exchange.is_empty() {
            return Err(EngineError::AccessRefused(
                "queues cannot be bound to the default exchange".into(),
            ));
        }
        let _topology = self.topology.lock();
        let q = self.queue_for(owner, queue)?;
        let ex = self.exchange(exchange)?;
        ex.validate_binding(arguments)?;
        let shared: Arc<str> = key.into();
        if ex.bind(&q, &shared, arguments)? {
            crate::engine::push_snug(
                &mut q.bindings.lock(),
                (ex.name.clone(), shared, arguments.clone()),
            );
            if ex.spec.durable
                && q.is_durable()
                && let Some(store) = self.store()
            {
                writes.push(store.put_binding(&binding_info(&ex.name, &q.name, key, arguments)));
            }
        }
        Ok(())
    }

    pub fn unbind(
        &self,
        owner: u64,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<(), EngineError> {
        let exchange = canonical_exchange(exchange);
        if exchange.is_empty() {
            return Err(EngineError::AccessRefused(
                "queues cannot be unbound from the default exchange".into(),
            ));
        }
        let _topology = self.topology.lock();
        let q = self.queue_for(owner, queue)?;
        let ex = self.exchange(exchange)?;
        if ex.unbind(&q, key, arguments) {
            q.bindings
                .lock()
                .retain(|(e, k, a)| !(e == &ex.name && &**k == key && a == arguments));
            if ex.spec.durable
                && q.is_durable()
                && let Some(store) = self.store()
            {
                drop(store.delete_binding(&binding_info(&ex.name, &q.name, key, arguments)));
            }
            if ex.spec.auto_delete && ex.binding_count() == 0 {
                self.drop_exchange(&ex);
            }
        }
        Ok(())
    }

    pub fn list_bindings(&self, queue: &str) -> Result<Vec<BindingInfo>, EngineError> {
        let q = self.queue(queue)?;
        let mut out = vec![binding_info("", &q.name, &q.name, &FieldTable::new())];
        out.extend(
            q.bindings
                .lock()
                .iter()
                .map(|(e, k, a)| binding_info(e, &q.name, k, a)),
        );
        Ok(out)
    }
}

/// The store writes of a topology change, issued under the topology lock (their place in the
/// store's order taken there) and awaited after it is released: no disk wait under the lock.
#[derive(Default)]
pub(super) struct Writes(Vec<StoreWrite>);

impl Writes {
    fn push(&mut self, write: StoreWrite) {
        self.0.push(write);
    }

    /// Resolves once every write is durable; a failure refuses the change to the client
    /// (made in memory, not stored: it would not survive a restart).
    pub async fn durable(self) -> Result<(), EngineError> {
        for write in self.0 {
            write.await?;
        }
        Ok(())
    }
}

/// An owner's open channels and exclusive queues.
type Owned = (usize, Vec<Arc<Queue>>);

/// What a shutdown closes: implemented by channels, so the broker never depends on them.
pub(super) trait Closable: Send + Sync {
    fn close(&self);
}

fn dedup(targets: &mut Targets) {
    if targets.len() > 1 {
        targets.sort_unstable_by_key(|q| Arc::as_ptr(q) as usize);
        targets.dedup_by(|a, b| Arc::ptr_eq(a, b));
    }
}

fn info(q: &Queue) -> QueueInfo {
    let (messages, unacked, consumers) = q.counts();
    QueueInfo {
        name: q.name.to_string(),
        spec: Some(q.spec()),
        messages,
        messages_unacknowledged: Some(unacked),
        consumers,
        totals: Some(q.totals()),
    }
}

fn binding_info(exchange: &str, queue: &str, key: &str, arguments: &FieldTable) -> BindingInfo {
    BindingInfo {
        exchange: exchange.to_owned(),
        queue: queue.to_owned(),
        routing_key: key.to_owned(),
        arguments: arguments.clone(),
    }
}

fn page<T>(
    mut items: Vec<T>,
    name: impl Fn(&T) -> &String,
    after: Option<&str>,
    limit: usize,
) -> Vec<T> {
    items.sort_by(|a, b| name(a).cmp(name(b)));
    items
        .into_iter()
        .filter(|i| after.is_none_or(|a| name(i).as_str() > a))
        .take(limit)
        .collect()
}
