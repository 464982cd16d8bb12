//! Persistent messages (delivery mode 2) in durable queues, as DESIGN.md §2 promises them: a
//! publish writes the message once under a new id and one entry per durable queue that takes
//! it, and is confirmed once that write is durable; whatever ends an entry (ack, expiry,
//! dead-lettering, length limits, purge, delete, a no-ack delivery) removes it, and the last
//! entry of a message removes the message. Every write is issued after the queue locks are
//! released and before the message can reach a consumer, so an entry's removal is always
//! ordered after its write. At start, [`Broker::recover`] puts the entries back.

use std::collections::HashMap;

use super::*;
use crate::engine::embedded::held::OnDisk;
use crate::engine::embedded::now_ms;
use crate::engine::embedded::queue::{Entry, Pages, Restored, RestoredBody};
use crate::engine::embedded::store::{MessageWrite, StoreWrite, StoredMessages};

/// What [`Broker::recover`] put back.
#[derive(Debug, Default)]
pub struct Recovered {
    pub messages: usize,
    pub entries: usize,
    /// Entries and messages nothing could use (their queue is gone, or a torn write): removed.
    pub discarded: usize,
}

impl Broker {
    /// How many of `targets` keep `message` on disk (persistent message, durable queues, a store
    /// that keeps messages), and the id it gets if any does.
    pub(super) fn disk_for(&self, message: &Message, targets: &Targets) -> Option<Arc<OnDisk>> {
        if !message.is_persistent() || !self.store.keeps_messages() {
            return None;
        }
        let refs = targets.iter().filter(|q| q.is_durable()).count() as u64;
        (refs > 0).then(|| {
            OnDisk::new(
                self.next_message.fetch_add(1, Ordering::Relaxed),
                refs,
                false,
            )
        })
    }

    /// Writes `stored` and its entry in each durable target; resolves once durable.
    pub(super) fn write_enqueued(&self, stored: &Stored, targets: &Targets) -> Option<StoreWrite> {
        let disk = stored.disk.clone()?;
        let id = disk.id;
        let mut writes = Vec::with_capacity(targets.len() + 1);
        writes.push(MessageWrite::Message {
            id,
            envelope: stored,
            published_at_ms: now_ms(),
        });
        writes.extend(
            targets
                .iter()
                .filter(|q| q.is_durable())
                .map(|q| MessageWrite::Enqueue {
                    queue: &q.name,
                    id,
                    redelivered: false,
                }),
        );
        let write = self.store.write_messages(&writes);
        Some(Box::pin(async move {
            write.await?;
            // Durable: from now on the body may be paged out and read back.
            disk.mark_written();
            Ok(())
        }))
    }

    /// Where a new queue reads paged-out bodies from: durable ones on a store that keeps
    /// messages.
    pub(super) fn pages_for(&self, spec: &QueueSpec) -> Option<Pages> {
        (spec.durable && !spec.exclusive && self.store.keeps_messages()).then(|| Pages {
            store: self.store.clone(),
            held: self.held.clone(),
        })
    }

    /// A no-ack delivery left `queue` for good as it was handed out.
    pub fn delivered(&self, queue: &Arc<str>, entry: &Entry) {
        if let Some(disk) = entry.disk() {
            self.forget(vec![(queue.clone(), disk.clone())]);
        }
    }

    /// Removes ended entries, and the messages whose last entry they were.
    pub(in crate::engine::embedded) fn forget(&self, dequeued: Vec<(Arc<str>, Arc<OnDisk>)>) {
        let mut writes = Vec::with_capacity(dequeued.len() * 2);
        for (queue, disk) in &dequeued {
            writes.push(MessageWrite::Dequeue { queue, id: disk.id });
            if disk.release() {
                writes.push(MessageWrite::Forget { id: disk.id });
            }
        }
        if !writes.is_empty() {
            self.store.write_messages_detached(&writes);
        }
    }

    /// A client may have seen this entry of `queue`: after a crash it comes back redelivered.
    /// Entries already marked redelivered are not written again.
    pub fn mark_seen(&self, queue: &str, entry: &Entry) {
        if entry.redelivered {
            return;
        }
        if let Some(disk) = entry.disk() {
            self.store.write_messages_detached(&[MessageWrite::Enqueue {
                queue,
                id: disk.id,
                redelivered: true,
            }]);
        }
    }

    /// Puts the stored entries back into their (restored) queues, in order, before any client
    /// connects; removes what nothing can use. New ids continue after the highest stored one.
    pub fn recover(&self, stored: StoredMessages) -> Recovered {
        let StoredMessages {
            mut messages,
            queued,
            unreadable,
        } = stored;
        // After every id still named anywhere: a stale entry's removal must not meet a new
        // message under its id.
        let highest = messages
            .keys()
            .chain(queued.iter().map(|(_, id, _)| id))
            .max();
        let next = highest.map_or(1, |id| id + 1);
        self.next_message.store(next, Ordering::Relaxed);
        let mut stale = Vec::new();
        let mut kept: Vec<(Arc<Queue>, u64, bool)> = Vec::new();
        let mut refs: HashMap<u64, u64> = HashMap::new();
        for (queue, id, redelivered) in queued {
            match self.queues.get(queue.as_str()) {
                Some(q) if q.is_durable() && messages.contains_key(&id) => {
                    *refs.entry(id).or_default() += 1;
                    kept.push((q.value().clone(), id, redelivered));
                }
                _ => stale.push((queue, id)),
            }
        }
        let unused: Vec<u64> = messages
            .keys()
            .filter(|id| !refs.contains_key(id))
            .copied()
            .collect();
        let recovered = Recovered {
            messages: refs.len(),
            entries: kept.len(),
            discarded: stale.len() + unused.len() + unreadable,
        };
        let mut writes: Vec<MessageWrite<'_>> = stale
            .iter()
            .map(|(queue, id)| MessageWrite::Dequeue { queue, id: *id })
            .collect();
        writes.extend(unused.iter().map(|&id| MessageWrite::Forget { id }));
        if !writes.is_empty() {
            self.store.write_messages_detached(&writes);
        }
        let now = Instant::now();
        let wall = now_ms();
        // One `Stored` (or one stored id) per message, shared by its queues as at publish.
        let mut shared: HashMap<u64, (RestoredBody, Duration)> = HashMap::new();
        let mut per_queue: Vec<(Arc<Queue>, Vec<Restored>)> = Vec::new();
        for (queue, id, redelivered) in kept {
            let (body, age) = match shared.get(&id) {
                Some(found) => found.clone(),
                None => {
                    let Some(loaded) = messages.remove(&id) else {
                        continue;
                    };
                    let disk = OnDisk::new(id, refs[&id], true);
                    let body = match loaded.envelope {
                        Some(envelope) => RestoredBody::In(Arc::new(Stored::new(
                            envelope,
                            &self.held,
                            Some(disk),
                        ))),
                        // Beyond the load's memory budget: it stays on disk, paged out.
                        None => RestoredBody::Out {
                            disk,
                            size: loaded.size,
                            expiration: loaded.expiration,
                        },
                    };
                    let age = Duration::from_millis(wall.saturating_sub(loaded.published_at_ms));
                    shared.insert(id, (body.clone(), age));
                    (body, age)
                }
            };
            match per_queue.last_mut() {
                Some((q, entries)) if Arc::ptr_eq(q, &queue) => {
                    entries.push((body, age, redelivered));
                }
                _ => per_queue.push((queue, vec![(body, age, redelivered)])),
            }
        }
        let mut fx = Effects::default();
        for (queue, entries) in per_queue {
            queue.restore(entries, now, &mut fx);
        }
        self.apply(fx);
        // Queues larger than the paging threshold give their tails back at once.
        self.maybe_page();
        recovered
    }
}
