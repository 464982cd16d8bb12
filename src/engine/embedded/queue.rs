//! One queue: its ready messages, its consumers with their credit, and the rules that drop or
//! dead-letter messages (TTL, length limits). All state sits behind the queue's own mutex, held
//! only for in-memory work — never across an await, never while taking another queue's lock.
//!
//! Operations never route anything themselves: what must happen elsewhere (dead letters to
//! publish, an expiry timer to start, an auto-delete) is returned as [`Effects`] for the broker
//! to apply after the lock is released.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

mod args;
mod effects;
mod enqueue;
mod now;
mod pace;
mod page;
mod restore;
mod slot;
mod stats;
mod wake;

pub(super) use self::args::{Overflow, QueueArgs};
pub(super) use self::effects::{DeadLetter, Effects, More};
pub(super) use self::now::Now;

pub(super) use self::page::{Pages, Ready};
pub(super) use self::restore::{Restored, RestoredBody};
pub(super) use self::slot::{Sink, Slot};
pub(super) use self::wake::LazyNotify;
use super::held::{OnDisk, Stored};
use crate::engine::{CancelReason, EngineError, Envelope, FieldTable, FieldValue, QueueSpec};
use crate::flow::{Bound, BufferKind, Pressure};

/// Why a message left its queue for the dead-letter exchange (the `reason` of `x-death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeadReason {
    Rejected,
    Expired,
    MaxLen,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => "rejected",
            DeadReason::Expired => "expired",
            DeadReason::MaxLen => "maxlen",
        }
    }
}

/// What a queue did with a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Enqueued {
    /// It holds it (or handed it to a consumer).
    Taken,
    /// `reject-publish`: full.
    Refused,
    /// Deleted meanwhile: the message did not reach it.
    Gone,
}

/// One message in a queue. `seq` is its position in arrival order: requeued messages go back to
/// their old place, so one consumer sees queue order except for redeliveries.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub seq: u64,
    pub envelope: Arc<Stored>,
    pub expires_at: Option<Instant>,
    pub redelivered: bool,
    /// Written to the store under this queue: whoever ends the entry tells the store.
    pub on_disk: bool,
}

impl Entry {
    fn size(&self) -> u64 {
        self.envelope.message.body.len() as u64
    }

    /// The stored message, when this entry is on disk.
    pub fn disk(&self) -> Option<&Arc<OnDisk>> {
        if self.on_disk {
            self.envelope.disk.as_ref()
        } else {
            None
        }
    }
}

/// Gauges shared by all queues of one broker.
#[derive(Default)]
pub(super) struct Gauges {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// The bound of a queue's backlog while it has consumers (`limits.outbound_buffer_*`):
    /// publishes landing in one above 3/4 of it pace their publishers, as a consumer's
    /// buffer does (DESIGN.md §7, docs/flow.md). `None`: backlogs pace nobody.
    pub backlog: Option<Bound>,
}

/// One binding of this queue: (exchange, routing key, arguments).
pub(super) type BoundFrom = (Arc<str>, Arc<str>, FieldTable);

struct State {
    ready: VecDeque<Ready>,
    ready_bytes: u64,
    unacked: u64,
    consumers: Vec<Slot>,
    /// Where the round-robin over consumers resumes.
    next: usize,
    exclusive_consumer: bool,
    next_seq: u64,
    last_used: Instant,
    had_consumer: bool,
    deleted: bool,
    /// Since start: messages taken, and handed to consumers or `get` (operators' rates).
    enqueued: u64,
    handed_out: u64,
    /// The gauge of the ready messages, which paces publishers while the queue has consumers
    /// (DESIGN.md §7). A bounded drop-head queue's, of its bound, is made with it: it drops
    /// what its consumers would have taken once full. Any other queue's, of
    /// [`Gauges::backlog`], is made the first time its backlog reaches half of that while it
    /// has consumers (most queues never do; `pace.rs`).
    pressure: Option<Pressure>,
}

pub(super) struct Queue {
    pub name: Arc<str>,
    /// Fixed at declaration except `x-expires`, which [`Queue::set_expires`] may change (an MQTT
    /// session's expiry interval, as RabbitMQ's MQTT plugin updates it in place).
    spec: parking_lot::RwLock<QueueSpec>,
    /// Boxed, and only when there are any ([`Queue::args`]): most queues have none, and in
    /// place they were 56 bytes of every queue, which with the owner's 8 took it past a size
    /// class (384 bytes, where 320 is one).
    args: Option<Box<QueueArgs>>,
    /// Durable and not exclusive (fixed at declaration).
    durable: bool,
    /// Exclusive to the owner (client connection) in `owner` ([`Queue::owner`]): a flag beside
    /// the others here, where an `Option<u64>` was 8 bytes more.
    exclusive: bool,
    owner: u64,
    state: Mutex<State>,
    gauges: Arc<Gauges>,
    /// Wakes the expiry task when the head may have changed.
    pub expiry_wake: LazyNotify,
    /// Wakes the queue's own expiry task (`x-expires`) when the interval changed.
    expires_changed: LazyNotify,
    queue_expiry_started: AtomicBool,
    expiry_started: AtomicBool,
    /// Bindings from exchanges, kept so deleting the queue can remove them.
    pub bindings: Mutex<Vec<BoundFrom>>,
    /// Where paged-out bodies are read back from (durable queues on a store that keeps
    /// messages). Boxed: most queues page nothing (an MQTT session's, a `/ws` subscription's),
    /// and inline it took the queue past a size class (400 bytes, where 384 is one).
    pages: Option<Box<Pages>>,
    /// A read-ahead was asked for and the pager has not done it yet.
    read_ahead_wanted: AtomicBool,
}

impl Queue {
    pub fn new(
        name: Arc<str>,
        spec: QueueSpec,
        args: QueueArgs,
        owner: Option<u64>,
        gauges: Arc<Gauges>,
        pages: Option<Pages>,
    ) -> Self {
        let pressure = args
            .drop_head_bound()
            .map(|b| Pressure::new(b, BufferKind::Queue));
        Queue {
            name,
            durable: spec.durable && !spec.exclusive,
            spec: parking_lot::RwLock::new(spec),
            args: (!args.is_none()).then(|| Box::new(args)),
            exclusive: owner.is_some(),
            owner: owner.unwrap_or_default(),
            state: Mutex::new(State {
                ready: VecDeque::new(),
                ready_bytes: 0,
                unacked: 0,
                consumers: Vec::new(),
                next: 0,
                exclusive_consumer: false,
                next_seq: 0,
                last_used: Instant::now(),
                had_consumer: false,
                deleted: false,
                enqueued: 0,
                handed_out: 0,
                pressure,
            }),
            gauges,
            expiry_wake: LazyNotify::default(),
            expires_changed: LazyNotify::default(),
            queue_expiry_started: AtomicBool::new(false),
            expiry_started: AtomicBool::new(false),
            bindings: Mutex::new(Vec::new()),
            pages: pages.map(Box::new),
            read_ahead_wanted: AtomicBool::new(false),
        }
    }

    pub fn spec(&self) -> QueueSpec {
        self.spec.read().clone()
    }

    /// Its `x-…` arguments as parsed at declaration.
    pub fn args(&self) -> &QueueArgs {
        self.args.as_deref().unwrap_or(&QueueArgs::NONE)
    }

    /// The owner (client connection) an exclusive queue belongs to.
    pub fn owner(&self) -> Option<u64> {
        self.exclusive.then_some(self.owner)
    }

    /// `x-expires`: how long the queue may stay unused before it is deleted.
    pub fn expires(&self) -> Option<Duration> {
        self.spec
            .read()
            .arguments
            .get("x-expires")
            .and_then(FieldValue::as_i128)
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis)
    }

    /// Changes (or removes) `x-expires`; returns the updated spec. The expiry task, if one
    /// runs, is woken to count with the new interval.
    pub fn set_expires(&self, expires: Option<Duration>) -> QueueSpec {
        let spec = {
            let mut spec = self.spec.write();
            match expires {
                Some(after) => {
                    let ms = after.as_millis().clamp(1, u128::from(u32::MAX)) as i64;
                    spec.arguments.insert("x-expires", FieldValue::I64(ms));
                }
                None => {
                    spec.arguments.remove("x-expires");
                }
            }
            spec.clone()
        };
        self.expires_changed.notify_waiters();
        spec
    }

    /// Durable and not exclusive: what the store keeps.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Resolves when `x-expires` changes after this call (even before it is first polled).
    pub fn expires_changed_owned(&self) -> tokio::sync::futures::OwnedNotified {
        self.expires_changed.notified_owned()
    }

    /// Claims the queue's `x-expires` task; false when one already runs.
    pub fn claim_queue_expiry_task(&self) -> bool {
        !self.queue_expiry_started.swap(true, Ordering::AcqRel)
    }

    pub fn release_queue_expiry_task(&self) {
        self.queue_expiry_started.store(false, Ordering::Release);
    }

    /// Whether this queue needs an expiry task and none runs yet; claims it.
    pub fn claim_expiry_task(&self) -> bool {
        !self.expiry_started.swap(true, Ordering::AcqRel)
    }

    pub fn touch(&self) {
        self.state.lock().last_used = Instant::now();
    }

    /// When an `x-expires` queue may be deleted, or `None` while it has consumers.
    pub fn unused_since(&self) -> Option<Instant> {
        let st = self.state.lock();
        st.consumers.is_empty().then_some(st.last_used)
    }

    /// The entry leaves the queue for good.
    fn done(&self, entry: &Entry, fx: &mut Effects) {
        if let Some(disk) = entry.disk() {
            fx.more().dequeued.push((self.name.clone(), disk.clone()));
        }
    }

    fn done_slot(&self, slot: &Ready, fx: &mut Effects) {
        if let Some(disk) = slot.disk() {
            fx.more().dequeued.push((self.name.clone(), disk.clone()));
        }
    }

    /// A ready entry leaves for the dead-letter exchange (read back first if paged out).
    fn dead_letter_slot(&self, slot: Ready, reason: DeadReason, fx: &mut Effects) {
        match slot {
            Ready::In(entry) => self.dead_letter(entry, reason, fx),
            Ready::Out(_) if self.args().dead_letter.is_none() => {
                self.done_slot(&slot, fx);
                metrics::counter!(crate::metrics::DROPPED, "reason" => reason.as_str())
                    .increment(1);
            }
            out => {
                if let Some(entry) = self.page_in(out, fx) {
                    self.dead_letter(entry, reason, fx);
                }
            }
        }
    }

    fn dead_letter(&self, entry: Entry, reason: DeadReason, fx: &mut Effects) {
        self.done(&entry, fx);
        if self.args().dead_letter.is_none() {
            // Gone for good: counted, so a bounded queue's drops are visible.
            metrics::counter!(crate::metrics::DROPPED, "reason" => reason.as_str()).increment(1);
        }
        if let Some(to) = &self.args().dead_letter {
            fx.more().dead.push(DeadLetter {
                envelope: entry.envelope,
                queue: self.name.clone(),
                reason,
                exchange: to.exchange.clone(),
                routing_key: to.routing_key.clone(),
            });
        }
    }

    fn pop_ready(&self, st: &mut State) -> Option<Ready> {
        let entry = st.ready.pop_front()?;
        let size = entry.size();
        st.ready_bytes -= size;
        if let Some(p) = &st.pressure {
            p.sub(size);
        }
        self.gauges.messages.fetch_sub(1, Ordering::Relaxed);
        self.gauges.bytes.fetch_sub(size, Ordering::Relaxed);
        Some(entry)
    }

    fn insert_ready(&self, st: &mut State, entry: Ready) {
        let size = entry.size();
        st.ready_bytes += size;
        if let Some(p) = &st.pressure {
            p.add(size);
        }
        self.gauges.messages.fetch_add(1, Ordering::Relaxed);
        self.gauges.bytes.fetch_add(size, Ordering::Relaxed);
        match st.ready.back() {
            Some(last) if last.seq() > entry.seq() => {
                let at = st.ready.partition_point(|e| e.seq() < entry.seq());
                st.ready.insert(at, entry);
            }
            _ => st.ready.push_back(entry),
        }
    }

    /// Drops expired messages at the head (only the head, as RabbitMQ: a message behind a
    /// longer-lived one waits for it). `inclusive` also drops messages expiring exactly `now`
    /// (TTL 0: delivered only if a consumer took it in the same operation).
    fn expire_head(&self, st: &mut State, now: Instant, inclusive: bool, fx: &mut Effects) {
        while let Some(at) = st.ready.front().and_then(Ready::expires_at) {
            if at > now || (at == now && !inclusive) {
                break;
            }
            if let Some(slot) = self.pop_ready(st) {
                self.dead_letter_slot(slot, DeadReason::Expired, fx);
            }
        }
    }

    /// The head changed (a message left it): if the new head has a deadline, the expiry task
    /// must look at it now — it may be waiting for a notify only a publish would send, and
    /// RabbitMQ expires a message once it is at the head.
    fn head_changed(&self, st: &State) {
        if st.ready.front().is_some_and(|e| e.expires_at().is_some()) {
            self.expiry_wake.notify_one();
        }
    }

    /// Hands ready messages to consumers with credit, round-robin.
    fn dispatch(self: &Arc<Self>, st: &mut State, now: &Now, fx: &mut Effects) {
        let before = st.ready.len();
        self.dispatch_ready(st, now, fx);
        if st.ready.len() != before {
            self.head_changed(st);
        }
    }

    fn dispatch_ready(self: &Arc<Self>, st: &mut State, now: &Now, fx: &mut Effects) {
        while !st.ready.is_empty() {
            let n = st.consumers.len();
            let Some(idx) = (0..n)
                .map(|i| (st.next + i) % n)
                .find(|&i| st.consumers[i].credit > 0)
            else {
                return;
            };
            let Some(slot) = self.pop_ready(st) else {
                return;
            };
            if slot.expires_at().is_some_and(|at| at < now.get()) {
                self.dead_letter_slot(slot, DeadReason::Expired, fx);
                continue;
            }
            if matches!(slot, Ready::Out(_)) && self.want_read_ahead() {
                // Read here, the next ones ahead of time.
                fx.more().read_ahead.push(self.clone());
            }
            let Some(entry) = self.page_in(slot, fx) else {
                continue;
            };
            let left = st.ready.len() + 1;
            let slot = &mut st.consumers[idx];
            let room = (slot.credit as usize).min(left);
            match slot.sink.deliver(self, slot.id, entry, now, room) {
                Ok(()) => {
                    slot.credit -= 1;
                    st.handed_out += 1;
                    if !slot.no_ack {
                        st.unacked += 1;
                    }
                    st.next = idx + 1;
                }
                Err(entry) => {
                    // The consumer's receiver is gone: it is being cancelled. Put the message
                    // back and stop offering to it.
                    st.consumers.remove(idx);
                    self.insert_ready(st, Ready::In(entry));
                }
            }
        }
    }

    fn expiry_of(&self, envelope: &Envelope, now: &Now) -> Option<Instant> {
        self.expiry_for(envelope.message.properties.expiration.as_deref(), now)
    }

    /// The deadline of a message with per-message TTL `expiration`, enqueued `now`.
    fn expiry_for(&self, expiration: Option<&str>, now: &Now) -> Option<Instant> {
        let per_message = expiration
            .and_then(|e| e.parse::<u64>().ok())
            .map(Duration::from_millis);
        // The box, not `Queue::args`: that read here cost fan-out about 17 instructions a
        // delivery under callgrind (2,532 → 2,550; docs/bench.md).
        let queue_ttl = self.args.as_deref().and_then(|a| a.message_ttl);
        let ttl = match (queue_ttl, per_message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(now.get() + ttl)
    }

    /// Expires what is due and says when to look again (the expiry task's step).
    pub fn expire_due(&self, now: Instant, fx: &mut Effects) -> Option<Option<Instant>> {
        let mut st = self.state.lock();
        if st.deleted {
            return None;
        }
        self.expire_head(&mut st, now, true, fx);
        Some(st.ready.front().and_then(Ready::expires_at))
    }

    pub fn add_consumer(
        self: &Arc<Self>,
        slot: Slot,
        exclusive: bool,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        let mut st = self.state.lock();
        if st.deleted {
            return Err(EngineError::queue_not_found(&self.name));
        }
        if st.exclusive_consumer || (exclusive && !st.consumers.is_empty()) {
            return Err(EngineError::InUse(self.name.to_string()));
        }
        st.exclusive_consumer = exclusive;
        st.had_consumer = true;
        let now = Now::default();
        st.last_used = now.get();
        crate::engine::push_snug(&mut st.consumers, slot);
        self.dispatch(&mut st, &now, fx);
        Ok(())
    }

    /// Removes a consumer; the queue auto-deletes when it was the last one.
    pub fn remove_consumer(self: &Arc<Self>, id: u64, fx: &mut Effects) -> Option<Slot> {
        let mut st = self.state.lock();
        let at = st.consumers.iter().position(|s| s.id == id)?;
        let slot = st.consumers.remove(at);
        st.exclusive_consumer = false;
        st.last_used = Instant::now();
        if st.consumers.is_empty() && st.had_consumer && self.spec.read().auto_delete && !st.deleted
        {
            fx.more().auto_delete.push(self.clone());
        }
        Some(slot)
    }

    /// Returns credit to a consumer (acks, or a no-ack consumer taking deliveries out of its
    /// buffer) and offers it more.
    pub fn credit(self: &Arc<Self>, consumer: u64, n: u32, fx: &mut Effects) {
        let mut st = self.state.lock();
        if let Some(slot) = st.consumers.iter_mut().find(|s| s.id == consumer) {
            slot.credit = slot.credit.saturating_add(n);
        }
        self.dispatch(&mut st, &Now::default(), fx);
    }

    /// Settles unacked deliveries (ack, or nack without requeue: `dead` gets them dead-lettered)
    /// and gives the consumer its credit back.
    pub fn settle<E>(
        self: &Arc<Self>,
        consumer: Option<u64>,
        entries: E,
        dead: bool,
        fx: &mut Effects,
    ) where
        E: IntoIterator<Item = Entry, IntoIter: ExactSizeIterator>,
    {
        let entries = entries.into_iter();
        let n = entries.len();
        for entry in entries {
            if dead {
                self.dead_letter(entry, DeadReason::Rejected, fx);
            } else {
                self.done(&entry, fx);
            }
        }
        let mut st = self.state.lock();
        st.unacked = st.unacked.saturating_sub(n as u64);
        if let Some(slot) = consumer.and_then(|c| st.consumers.iter_mut().find(|s| s.id == c)) {
            slot.credit = slot.credit.saturating_add(n as u32);
        }
        self.dispatch(&mut st, &Now::default(), fx);
    }

    /// Puts deliveries back at their old places, each marked as the caller decided (redelivered
    /// only if the client may have seen it). `unacked` says whether they were counted as
    /// unacknowledged (no-ack deliveries still buffered were not).
    pub fn requeue<E>(
        self: &Arc<Self>,
        consumer: Option<u64>,
        entries: E,
        unacked: bool,
        fx: &mut Effects,
    ) where
        E: IntoIterator<Item = Entry, IntoIter: ExactSizeIterator>,
    {
        let entries = entries.into_iter();
        let n = entries.len();
        let mut st = self.state.lock();
        if unacked {
            st.unacked = st.unacked.saturating_sub(n as u64);
            if let Some(slot) = consumer.and_then(|c| st.consumers.iter_mut().find(|s| s.id == c)) {
                slot.credit = slot.credit.saturating_add(n as u32);
            }
        }
        if st.deleted {
            for entry in entries {
                self.done(&entry, fx);
            }
            return;
        }
        for entry in entries {
            self.insert_ready(&mut st, Ready::In(entry));
        }
        self.expiry_wake.notify_one();
        self.dispatch(&mut st, &Now::default(), fx);
        self.enforce_limits(&mut st, fx);
    }

    /// basic.get: the next live message and how many remain.
    pub fn get(&self, no_ack: bool, fx: &mut Effects) -> Option<(Entry, u64)> {
        let now = Instant::now();
        let mut st = self.state.lock();
        st.last_used = now;
        self.expire_head(&mut st, now, false, fx);
        let entry = loop {
            let slot = self.pop_ready(&mut st)?;
            if let Some(entry) = self.page_in(slot, fx) {
                break entry;
            }
        };
        self.head_changed(&st);
        st.handed_out += 1;
        if !no_ack {
            st.unacked += 1;
        }
        Some((entry, st.ready.len() as u64))
    }

    pub fn purge(&self, fx: &mut Effects) -> u64 {
        let mut st = self.state.lock();
        let n = st.ready.len() as u64;
        while let Some(slot) = self.pop_ready(&mut st) {
            self.done_slot(&slot, fx);
        }
        n
    }

    /// Marks the queue deleted, ends its consumers and drops its messages; returns how many
    /// ready messages went with it.
    pub fn delete(&self, fx: &mut Effects) -> u64 {
        let (dropped, consumers) = {
            let mut st = self.state.lock();
            st.deleted = true;
            let dropped = st.ready.len() as u64;
            while let Some(slot) = self.pop_ready(&mut st) {
                self.done_slot(&slot, fx);
            }
            (dropped, std::mem::take(&mut st.consumers))
        };
        for slot in &consumers {
            slot.sink.end(CancelReason::QueueDeleted);
        }
        self.expiry_wake.notify_one();
        dropped
    }

    /// Checks `if_unused` / `if_empty` for a delete.
    pub fn check_delete(&self, if_unused: bool, if_empty: bool) -> Result<(), EngineError> {
        let st = self.state.lock();
        if if_unused && !st.consumers.is_empty() {
            return Err(EngineError::PreconditionFailed(format!(
                "queue '{}' in use",
                self.name
            )));
        }
        if if_empty && !st.ready.is_empty() {
            return Err(EngineError::PreconditionFailed(format!(
                "queue '{}' not empty",
                self.name
            )));
        }
        Ok(())
    }

    /// Ends a consumer's sink because its channel is closing.
    pub fn end_consumer(self: &Arc<Self>, id: u64, reason: CancelReason, fx: &mut Effects) {
        if let Some(slot) = self.remove_consumer(id, fx) {
            slot.sink.end(reason);
        }
    }
}

/// Header value of `x-death` entries etc.; kept here beside the reasons they describe.
pub(super) fn death_entry(
    queue: &str,
    reason: DeadReason,
    exchange: &str,
    routing_key: &str,
    time: u64,
) -> FieldTable {
    let mut t = FieldTable::new();
    t.insert("count", FieldValue::I64(1));
    t.insert("reason", FieldValue::Str(reason.as_str().into()));
    t.insert("queue", FieldValue::Str(queue.into()));
    t.insert("time", FieldValue::Timestamp(time));
    t.insert("exchange", FieldValue::Str(exchange.into()));
    t.insert(
        "routing-keys",
        FieldValue::Array(vec![FieldValue::Str(routing_key.into())]),
    );
    t
}
