//! The broker's timers: per-queue message expiry (TTL at the head) and queue expiry
//! (`x-expires`, changeable in place), both stopped at shutdown.

use super::*;

impl Broker {
    pub(super) fn spawn_message_expiry(&self, queue: &Arc<Queue>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.me.clone();
        let queue = Arc::downgrade(queue);
        let stop = self.stop.clone();
        rt.spawn(async move {
            loop {
                let Some(q) = queue.upgrade() else { return };
                // Owned, so the queue is not held while waiting: a durable queue's pages hold
                // the store, whose directory lock must go with the engine at shutdown, not
                // when this task next runs.
                let notified = q.expiry_wake.notified_owned();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let mut fx = Effects::default();
                let next = q.expire_due(Instant::now(), &mut fx);
                drop(q);
                let Some(next) = next else {
                    return;
                };
                match broker.upgrade() {
                    Some(b) => b.apply(fx),
                    None => return,
                }
                let at = next.map_or_else(far_future, tokio::time::Instant::from_std);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut notified => {}
                }
            }
        });
    }

    /// Changes a queue's `x-expires` in place (persisted for a durable queue); `None` removes
    /// it. The queue keeps its messages, consumers and bindings.
    pub fn set_queue_expiry(
        &self,
        owner: u64,
        name: &str,
        expires: Option<Duration>,
        writes: &mut Writes,
    ) -> Result<(), EngineError> {
        let _topology = self.topology.lock();
        let queue = self.queue_for(owner, name)?;
        let spec = queue.set_expires(expires);
        if queue.is_durable() {
            writes.push(self.store.put_queue(name, &spec));
        }
        if expires.is_some() && queue.claim_queue_expiry_task() {
            self.spawn_queue_expiry(&queue);
        }
        Ok(())
    }

    /// Deletes the queue once it has been unused for its `x-expires`, read afresh each time
    /// round so a changed interval counts at once.
    pub(super) fn spawn_queue_expiry(&self, queue: &Arc<Queue>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.me.clone();
        let queue = Arc::downgrade(queue);
        let stop = self.stop.clone();
        rt.spawn(async move {
            loop {
                let (wake, changed) = {
                    let Some(q) = queue.upgrade() else { return };
                    if q.is_deleted() {
                        return;
                    }
                    // Registered before reading the interval: a change after the read wakes us.
                    let changed = q.expires_changed_owned();
                    let Some(after) = q.expires() else {
                        q.release_queue_expiry_task();
                        // A concurrent set_queue_expiry may have lost the claim to this task.
                        if q.expires().is_none() || !q.claim_queue_expiry_task() {
                            return;
                        }
                        continue;
                    };
                    let wake = match q.unused_since() {
                        Some(since) if since.elapsed() >= after => {
                            if let Some(b) = broker.upgrade() {
                                b.remove_queue(&q);
                            }
                            return;
                        }
                        Some(since) => since + after,
                        None => Instant::now() + after,
                    };
                    (wake, changed)
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = changed => {}
                }
            }
        });
    }
}

/// A deadline that never comes (a year is as good as never for a timer).
pub(super) fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}
