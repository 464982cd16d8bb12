//! Paging (queues larger than memory): when the message bodies held pass half the memory high
//! watermark (RabbitMQ's default paging ratio), a task pages the tails of durable queues out —
//! bodies of persistent messages whose writes are durable leave memory — until the bytes held
//! are back under 40 % of it. When a consumer meets a paged-out head, the same task reads the
//! next ones back (consumer credit + 64 ahead), off the queue's lock. So a
//! durable queue can hold more than the watermark, and only transient messages (or persistent
//! ones not yet written) make the publish gate refuse.

use super::*;

/// A pass that frees nothing (writes still in flight) is retried this often, this many times,
/// before the task waits for the next publish to wake it.
const RETRY: Duration = Duration::from_millis(10);
const RETRIES: u32 = 50;

impl Broker {
    /// Hands queues whose heads are paged out to the pager, which reads them back ahead of
    /// their consumers.
    pub(super) fn read_ahead(&self, queues: Vec<Arc<Queue>>) {
        self.reading_ahead
            .lock()
            .extend(queues.iter().map(Arc::downgrade));
        self.pager_wake.notify_one();
    }

    /// Reads back the heads asked for since the last call, off the runtime's workers.
    async fn reads_ahead(&self) {
        let ahead = std::mem::take(&mut *self.reading_ahead.lock());
        if ahead.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for q in ahead.iter().filter_map(Weak::upgrade) {
                q.read_ahead();
            }
        })
        .await;
    }

    /// After a publish: above the paging threshold, wake the pager.
    pub(super) fn maybe_page(&self) {
        if self.held.bytes() > self.held.paging_threshold() {
            self.pager_wake.notify_one();
        }
    }

    /// Starts the paging task; it stops at shutdown.
    pub fn spawn_pager(&self) {
        self.spawn_maintenance(|broker, stop| async move {
            loop {
                let Some(b) = broker.upgrade() else { return };
                let wake = b.pager_wake.clone();
                drop(b);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wake.notified() => {}
                }
                for _ in 0..RETRIES {
                    let Some(b) = broker.upgrade() else { return };
                    // Consumers waiting on paged-out heads come first.
                    b.reads_ahead().await;
                    let target = b.held.paging_target();
                    if b.held.bytes() <= target
                        || b.page_out_to(target) > 0 && b.held.bytes() <= target
                    {
                        break;
                    }
                    drop(b);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        });
    }

    /// One pass over the durable queues, largest first; returns the bytes freed.
    fn page_out_to(&self, target: u64) -> u64 {
        let mut queues: Vec<(u64, Arc<Queue>)> = self
            .queues
            .iter()
            .filter(|q| q.is_durable())
            .map(|q| (q.ready_bytes(), q.value().clone()))
            .collect();
        queues.sort_unstable_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
        let mut freed = 0;
        for (_, q) in queues {
            let over = self.held.bytes().saturating_sub(target);
            if over == 0 {
                break;
            }
            freed += q.page_out(over);
        }
        freed
    }
}
