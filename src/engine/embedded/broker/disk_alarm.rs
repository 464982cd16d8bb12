//! The disk alarm (RabbitMQ's `disk_free_limit`): a timer that reads the free space of the data
//! directory's file system and blocks publishes below `engine.disk_free_limit`, the way the
//! memory watermark does, so the store never fills the disk with writes it must then fail.
//! The same tick asks the store to give back space that drained queues no longer need (at once
//! while the alarm is up); the alarm clears once free space is back above the limit.

use std::path::PathBuf;

use super::*;
use crate::engine::embedded::store::free_bytes;

/// How often free space is read: often near the limit, rarely far from it.
const NEAR: Duration = Duration::from_millis(100);
const FAR: Duration = Duration::from_secs(1);

impl Broker {
    /// Starts the alarm's timer for `dir`; it stops at shutdown.
    pub fn spawn_disk_alarm(&self, dir: PathBuf, limit: u64) {
        self.spawn_maintenance(move |broker, stop| async move {
            loop {
                let Some(b) = broker.upgrade() else { return };
                let wait = match free_bytes(&dir) {
                    Ok(free) => b.disk_free(free, limit).await,
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot read free disk space");
                        FAR
                    }
                };
                drop(b);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    /// Acts on a reading; returns when to read again.
    async fn disk_free(&self, free: u64, limit: u64) -> Duration {
        metrics::gauge!(crate::metrics::DISK_FREE).set(free as f64);
        let low = free < limit;
        if self.held.set_disk_low(low) {
            let (free_h, limit_h) = (bytesize::ByteSize::b(free), bytesize::ByteSize::b(limit));
            if low {
                tracing::warn!(free = %free_h, limit = %limit_h, "disk alarm: free space below engine.disk_free_limit, publishes refused");
            } else {
                tracing::info!(free = %free_h, limit = %limit_h, "disk alarm cleared, publishes accepted");
            }
        }
        // Space held by what drained queues no longer need is given back by compaction; the
        // storage engine would do it only as writes come, so ask — at once while the alarm is
        // up (publishes are refused: no writes will come), else once a queue drained.
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.reclaim(low)).await;
        if free < limit.saturating_mul(2) {
            NEAR
        } else {
            FAR
        }
    }
}
