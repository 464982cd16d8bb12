//! A client connection's channel on the embedded engine: its delivery tags, its unacked
//! deliveries, its consumers and its exclusive queues.
//!
//! Lock order: a queue's lock may be held while taking this channel's `unacked` lock (a queue
//! delivering registers the delivery); never the reverse — ack paths take records out of
//! `unacked`, release it, then call into queues.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use parking_lot::Mutex;
use smallvec::SmallVec;

use super::broker::{Broker, Closable};
use super::handoff::{Handoff, Receiver};
use super::queue::{Effects, Entry, Now, Queue, Sink};
use crate::engine::{CancelReason, Delivery, DeliveryStream, EngineError, OnCancel};

mod unacked;

use self::unacked::ByTag;

/// How far a no-ack consumer may run ahead of what it has taken out of its buffer; credit comes
/// back in halves of this.
pub(super) const NO_ACK_WINDOW: u32 = 256;

struct Unacked {
    queue: Arc<Queue>,
    consumer: Option<u64>,
    entry: Entry,
    /// Taken out of the consumer's buffer (or returned by `get`): the client may have seen it,
    /// so it comes back marked redelivered. One still buffered never left the gateway.
    seen: bool,
}

impl Unacked {
    /// The entry as it goes back to its queue.
    fn returned(self) -> Entry {
        self.into_parts().2
    }

    /// Its queue, consumer and the entry as it goes back.
    fn into_parts(self) -> (Arc<Queue>, Option<u64>, Entry) {
        let mut entry = self.entry;
        entry.redelivered |= self.seen;
        (self.queue, self.consumer, entry)
    }
}

struct ConsumerReg {
    queue: Arc<Queue>,
    id: u64,
    /// Its hand-off, whose `cancelled` an explicit cancel sets.
    sink: Arc<ConsumerSink>,
}

/// A channel's consumers by tag: a list, one inline. Looked up only at consume and cancel,
/// and almost every channel has one or two (an MQTT session's, a `/ws` subscription's),
/// which a `HashMap` kept in a 180-byte table of every idle subscriber.
type Consumers = SmallVec<[(Arc<str>, ConsumerReg); 1]>;

fn position(consumers: &Consumers, tag: &str) -> Option<usize> {
    consumers.iter().position(|(t, _)| &**t == tag)
}

/// What travels to a consumer: the delivery, and for no-ack consumers the entry, so a
/// delivery still buffered when the consumer goes can return to the queue.
struct Pending {
    delivery: Delivery,
    entry: Option<Entry>,
}

pub(super) struct ChannelShared {
    pub id: u64,
    /// The client connection this channel belongs to: the owner of exclusive queues.
    pub owner: u64,
    pub broker: Arc<Broker>,
    next_tag: AtomicU64,
    unacked: Mutex<ByTag<Unacked>>,
    consumers: Mutex<Consumers>,
    closed: AtomicBool,
}

/// What a consumer's two ends share beside its deliveries, in the hand-off's own allocation
/// (one where the sink, the hand-off, the cancel flag and the reason were four, in every
/// subscriber).
pub(super) struct ConsumerSide {
    channel: Arc<ChannelShared>,
    tag: Arc<str>,
    no_ack: bool,
    /// Set by an explicit cancel: the stream yields nothing more.
    cancelled: AtomicBool,
    reason: Mutex<Option<CancelReason>>,
}

/// The queue's handle on a consumer: delivering registers the delivery with the channel and
/// pushes it to the consumer's receiver. Credit bounds how many are in flight.
type ConsumerSink = Handoff<Pending, ConsumerSide>;

impl Sink for ConsumerSink {
    fn deliver(
        &self,
        queue: &Arc<Queue>,
        consumer: u64,
        entry: Entry,
        now: &Now,
        room: usize,
    ) -> Result<(), Entry> {
        let side = &self.side;
        let tag = side.channel.next_tag();
        let delivery = Delivery {
            delivery_tag: tag,
            redelivered: entry.redelivered,
            consumer_tag: Some(side.tag.clone()),
            envelope: entry.envelope.clone(),
            expires_in: entry
                .expires_at
                .map(|at| at.saturating_duration_since(now.get())),
            message_count: None,
        };
        if side.no_ack {
            return self
                .send(
                    Pending {
                        delivery,
                        entry: Some(entry),
                    },
                    room,
                )
                .map_err(|p| p.entry.expect("no-ack pending carries its entry"));
        }
        // Registered before it is sent, so an ack racing the receive always finds it.
        side.channel.unacked.lock().insert(
            tag,
            Unacked {
                queue: queue.clone(),
                consumer: Some(consumer),
                entry,
                seen: false,
            },
        );
        if self
            .send(
                Pending {
                    delivery,
                    entry: None,
                },
                room,
            )
            .is_err()
        {
            let back = side.channel.unacked.lock().remove(tag);
            return Err(back.expect("registered above").entry);
        }
        Ok(())
    }

    fn end(&self, reason: CancelReason) {
        self.side.reason.lock().get_or_insert(reason);
    }

    fn detach(&self) {
        self.sender_gone();
    }
}

/// The consumer side handed to the adapter inside a [`crate::engine::Consumer`].
pub(super) struct Stream {
    rx: Receiver<Pending, ConsumerSide>,
    queue: Arc<Queue>,
    consumer: u64,
    taken: u32,
}

impl DeliveryStream for Stream {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            if self.rx.shared().side.cancelled.load(Ordering::Acquire) {
                // What is still buffered goes back when the stream drops (no-ack) or went back
                // at the cancel (manual).
                return Poll::Ready(None);
            }
            let p = match self.rx.poll_recv(cx) {
                Poll::Ready(Some(p)) => p,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            let side = &self.rx.shared().side;
            if side.no_ack {
                self.taken += 1;
                if self.taken >= NO_ACK_WINDOW / 2 {
                    let mut fx = Effects::default();
                    self.queue.credit(self.consumer, self.taken, &mut fx);
                    side.channel.broker.apply(fx);
                    self.taken = 0;
                }
                if let Some(entry) = &p.entry {
                    side.channel.broker.delivered(&self.queue.name, entry);
                }
                return Poll::Ready(Some(p.delivery));
            }
            // From here on the client may see it. A record already gone was given back to the
            // queue (the consumer was cancelled or the channel closed meanwhile): not ours.
            if let Some(u) = side.channel.unacked.lock().get_mut(p.delivery.delivery_tag) {
                if !u.seen {
                    // Under the `unacked` lock, so this write is ordered before its ack's.
                    side.channel.broker.mark_seen(&u.queue.name, &u.entry);
                }
                u.seen = true;
                return Poll::Ready(Some(p.delivery));
            }
        }
    }

    fn cancel_reason(&self) -> Option<CancelReason> {
        self.rx.shared().side.reason.lock().clone()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let side = &self.rx.shared().side;
        side.channel
            .cancel_consumer(&side.tag, Some(self.consumer), OnCancel::Requeue);
        // No-ack deliveries still buffered were never seen by the client: give them back.
        self.rx.close();
        let mut back = Vec::new();
        while let Some(p) = self.rx.try_recv() {
            back.extend(p.entry);
        }
        if !back.is_empty() {
            let mut fx = Effects::default();
            self.queue.requeue(None, back, false, &mut fx);
            self.rx.shared().side.channel.broker.apply(fx);
        }
    }
}

impl ChannelShared {
    pub fn new(id: u64, owner: u64, broker: Arc<Broker>) -> Self {
        ChannelShared {
            id,
            owner,
            broker,
            next_tag: AtomicU64::new(1),
            unacked: Mutex::new(ByTag::default()),
            consumers: Mutex::default(),
            closed: AtomicBool::new(false),
        }
    }

    fn next_tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn check_open(&self) -> Result<(), EngineError> {
        if self.is_closed() {
            Err(EngineError::ChannelClosed)
        } else {
            Ok(())
        }
    }

    /// Gives an exclusive queue this channel declared to its owner. `Err` when the owner's
    /// last channel closed meanwhile: the queue is deleted at once, or it would outlive its
    /// owner and lock its name.
    pub fn own_exclusive(&self, queue: Arc<Queue>) -> Result<(), EngineError> {
        self.broker.own_exclusive(self.owner, queue)
    }

    /// Registers a consumer on `queue` and returns its stream.
    pub fn consume(
        self: &Arc<Self>,
        queue: Arc<Queue>,
        tag: Arc<str>,
        credit: u32,
        no_ack: bool,
        exclusive: bool,
        pressure: Option<crate::flow::Pressure>,
    ) -> Result<Stream, EngineError> {
        let id = self.broker.next_id();
        let (sink, rx) = Handoff::new(ConsumerSide {
            channel: self.clone(),
            tag: tag.clone(),
            no_ack,
            cancelled: AtomicBool::new(false),
            reason: Mutex::new(None),
        });
        {
            let mut consumers = self.consumers.lock();
            if position(&consumers, &tag).is_some() {
                return Err(EngineError::PreconditionFailed(format!(
                    "consumer tag '{tag}' is already in use on this channel"
                )));
            }
            consumers.push((
                tag.clone(),
                ConsumerReg {
                    queue: queue.clone(),
                    id,
                    sink: sink.clone(),
                },
            ));
        }
        let slot = super::queue::Slot {
            id,
            credit,
            no_ack,
            sink,
            // Credit bounds what a manual-ack consumer holds: only no-ack ones pace.
            pressure: pressure.filter(|_| no_ack),
        };
        let mut fx = Effects::default();
        let added = queue.add_consumer(slot, exclusive, &mut fx);
        self.broker.apply(fx);
        if let Err(e) = added {
            self.forget(&tag);
            return Err(e);
        }
        if self.is_closed() {
            // Closed while this consumer was being added: `close` may have missed it and what
            // it was already given.
            self.forget(&tag);
            let mut fx = Effects::default();
            queue.end_consumer(id, CancelReason::ChannelClosed, &mut fx);
            self.give_back(&queue, id, false, &mut fx);
            self.broker.apply(fx);
            return Err(EngineError::ChannelClosed);
        }
        Ok(Stream {
            rx,
            queue,
            consumer: id,
            taken: 0,
        })
    }

    fn forget(&self, tag: &str) {
        let mut consumers = self.consumers.lock();
        if let Some(i) = position(&consumers, tag) {
            consumers.swap_remove(i);
        }
    }

    /// Cancels a consumer (by tag, and by id when called from its stream so a reused tag is not
    /// hit). Deliveries the client never took return to the queue unmarked; those it took are
    /// requeued or kept as `on_cancel` says. Returns whether it existed.
    pub fn cancel_consumer(&self, tag: &str, id: Option<u64>, on_cancel: OnCancel) -> bool {
        let reg = {
            let mut consumers = self.consumers.lock();
            match position(&consumers, tag) {
                Some(i) if id.is_none_or(|id| id == consumers[i].1.id) => {
                    Some(consumers.swap_remove(i).1)
                }
                _ => None,
            }
        };
        let Some(reg) = reg else {
            return false;
        };
        // An explicit cancel (not the stream's own drop): the stream ends now.
        let explicit = id.is_none();
        if explicit {
            reg.sink.side.cancelled.store(true, Ordering::Release);
        }
        let mut fx = Effects::default();
        if let Some(slot) = reg.queue.remove_consumer(reg.id, &mut fx)
            && explicit
        {
            slot.sink.end(CancelReason::Cancelled);
        }
        self.give_back(
            &reg.queue,
            reg.id,
            on_cancel == OnCancel::KeepUnacked,
            &mut fx,
        );
        self.broker.apply(fx);
        true
    }

    /// Returns a removed consumer's unacked deliveries to its queue; with `keep_seen`, those the
    /// client took stay on the channel to be acked.
    fn give_back(&self, queue: &Arc<Queue>, consumer: u64, keep_seen: bool, fx: &mut Effects) {
        let entries: Vec<Entry> = self
            .unacked
            .lock()
            .take_where::<Vec<Unacked>>(|u| u.consumer == Some(consumer) && !(keep_seen && u.seen))
            .into_iter()
            .map(Unacked::returned)
            .collect();
        if !entries.is_empty() {
            queue.requeue(None, entries, true, fx);
        }
    }

    fn take_unacked(&self, tag: u64, multiple: bool) -> Result<Taken, EngineError> {
        let mut map = self.unacked.lock();
        let taken: Taken = if multiple {
            // AMQP: multiple with tag 0 means "everything outstanding" — outstanding with the
            // client: deliveries still in a consumer's buffer have not reached it, whatever
            // their tag, and stay.
            let upto = if tag == 0 { u64::MAX } else { tag };
            map.take_upto(upto, |u| u.seen)
        } else {
            // Its room is given back once it is settled (`settle_taken`).
            map.remove_keeping_room(tag).into_iter().collect()
        };
        if taken.is_empty() {
            return Err(EngineError::PreconditionFailed(format!(
                "unknown delivery tag {tag}"
            )));
        }
        Ok(taken)
    }

    /// Settles (`requeue: None`), requeues (`Some(true)`) or dead-letters (`Some(false)`) the
    /// deliveries up to `tag`.
    pub fn settle(
        &self,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), EngineError> {
        let taken = self.take_unacked(tag, multiple)?;
        self.settle_taken(taken, requeue);
        Ok(())
    }

    /// Acks each of `tags` on its own: one lock of the channel's map, and one of each queue
    /// the deliveries came from, for all of them (an MQTT client's PUBACKs read together).
    pub fn ack_each(&self, tags: &[u64]) -> Result<(), EngineError> {
        let mut unknown = None;
        let taken: Taken = {
            let mut map = self.unacked.lock();
            // Sized at once: collected from a filter, it grew one record at a time, a
            // reallocation at every doubling (with the groups' entries in `group`, about 90
            // instructions a QoS 1 message under callgrind).
            let mut taken = Taken::with_capacity(tags.len());
            taken.extend(tags.iter().filter_map(|&tag| {
                let found = map.remove_keeping_room(tag);
                if found.is_none() {
                    unknown.get_or_insert(tag);
                }
                found
            }));
            taken
        };
        self.settle_taken(taken, None);
        match unknown {
            Some(tag) => Err(EngineError::PreconditionFailed(format!(
                "unknown delivery tag {tag}"
            ))),
            None => Ok(()),
        }
    }

    /// Settles, requeues or dead-letters (as [`settle`](Self::settle)) what was taken, then
    /// gives the ring's room back if nothing is left in it: what was taken was taken keeping
    /// it, for what the settling delivers on the credit it frees.
    fn settle_taken(&self, mut taken: Taken, requeue: Option<bool>) {
        if requeue.is_none() {
            crate::metrics::acked(taken.len() as u64);
        }
        // The client named them: it has seen them.
        for u in &mut taken {
            u.seen = true;
        }
        let mut fx = Effects::default();
        let mut one = |queue: Arc<Queue>, consumer, entries| match requeue {
            Some(true) => queue.requeue(consumer, entries, true, &mut fx),
            Some(false) => queue.settle(consumer, entries, true, &mut fx),
            None => queue.settle(consumer, entries, false, &mut fx),
        };
        if taken.len() == 1
            && let Some(u) = taken.pop()
        {
            // One delivery (every MQTT PUBACK): nothing to group.
            let (queue, consumer, entry) = u.into_parts();
            one(queue, consumer, smallvec::smallvec![entry]);
        } else {
            for (queue, consumer, entries) in group(taken) {
                one(queue, consumer, entries);
            }
        }
        self.broker.apply(fx);
        self.unacked.lock().give_room_back();
    }

    /// basic.get on `queue`.
    pub fn get(&self, queue: &Arc<Queue>, no_ack: bool) -> Option<Delivery> {
        let mut fx = Effects::default();
        let got = queue.get(no_ack, &mut fx);
        self.broker.apply(fx);
        let (entry, remaining) = got?;
        if no_ack {
            self.broker.delivered(&queue.name, &entry);
        }
        let mut unacked = (!no_ack).then(|| self.unacked.lock());
        if unacked.is_some() && self.is_closed() {
            // The channel closed while the message was taken: `close` has already given back
            // what it held, so this one goes back here (never seen: not redelivered).
            drop(unacked);
            let mut fx = Effects::default();
            queue.requeue(None, [entry], true, &mut fx);
            self.broker.apply(fx);
            return None;
        }
        let tag = self.next_tag();
        let delivery = Delivery {
            delivery_tag: tag,
            redelivered: entry.redelivered,
            consumer_tag: None,
            envelope: entry.envelope.clone(),
            expires_in: entry
                .expires_at
                .map(|at| at.saturating_duration_since(Instant::now())),
            message_count: Some(remaining),
        };
        if let Some(unacked) = &mut unacked {
            self.broker.mark_seen(&queue.name, &entry);
            unacked.insert(
                tag,
                Unacked {
                    queue: queue.clone(),
                    consumer: None,
                    entry,
                    seen: true,
                },
            );
        }
        Some(delivery)
    }

    /// Ends consumers, requeues unacked deliveries; the owner's last channel takes its
    /// exclusive queues along. Idempotent.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut fx = Effects::default();
        let consumers = std::mem::take(&mut *self.consumers.lock());
        for (_, reg) in consumers {
            reg.queue
                .end_consumer(reg.id, CancelReason::ChannelClosed, &mut fx);
        }
        let unacked: Vec<Unacked> = self.unacked.lock().take_all().collect();
        for (queue, _, entries) in group(unacked) {
            queue.requeue(None, entries, true, &mut fx);
        }
        self.broker.apply(fx);
        self.broker.unregister_channel(self.id, self.owner);
    }
}

impl Closable for ChannelShared {
    fn close(&self) {
        ChannelShared::close(self);
    }
}

/// Deliveries taken out of the unacked map: most acks name one (an MQTT PUBACK, a `/ws` ack
/// without `multiple`), which takes no allocation.
type Taken = SmallVec<[Unacked; 1]>;

/// One queue's and consumer's share of [`Taken`].
type Group = (Arc<Queue>, Option<u64>, SmallVec<[Entry; 1]>);

/// Groups records by (queue, consumer), keeping tag order inside each group.
fn group<R>(records: R) -> SmallVec<[Group; 1]>
where
    R: IntoIterator<Item = Unacked, IntoIter: ExactSizeIterator>,
{
    let records = records.into_iter();
    let mut left = records.len();
    let mut groups: SmallVec<[Group; 1]> = SmallVec::new();
    for r in records {
        let (queue, consumer, entry) = r.into_parts();
        match groups
            .iter_mut()
            .find(|(q, c, _)| Arc::ptr_eq(q, &queue) && *c == consumer)
        {
            Some((_, _, entries)) => entries.push(entry),
            None => {
                // Room for every record left: a run of PUBACKs is almost always one
                // consumer's, and grown one entry at a time it was reallocated at each
                // doubling.
                let mut entries = SmallVec::with_capacity(left);
                entries.push(entry);
                // The record's own queue handle, not a clone of it.
                groups.push((queue, consumer, entries));
            }
        }
        left -= 1;
    }
    groups
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_consumer_hand_off_stays_in_its_size_class() {
        // Every subscription has one: 96 bytes and the `Arc`'s counts fill mimalloc's 112-byte
        // class; 8 more take it to 128 (docs/bench.md).
        let size = std::mem::size_of::<super::ConsumerSink>();
        assert!(size <= 96, "{size}");
    }
}
