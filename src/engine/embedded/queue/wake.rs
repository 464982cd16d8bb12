//! How a queue wakes its expiry tasks.

use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

/// A `Notify` made when its task first waits on it. Most queues never have an expiry task
/// (no TTL, no `x-expires`), and two made up front were 96 bytes of every MQTT session's
/// queue. A notification before the task's first wait is not lost: the task reads the queue
/// after it starts waiting.
#[derive(Default)]
pub(in crate::engine::embedded) struct LazyNotify(OnceLock<Arc<Notify>>);

impl LazyNotify {
    pub fn notify_one(&self) {
        if let Some(n) = self.0.get() {
            n.notify_one();
        }
    }

    pub fn notify_waiters(&self) {
        if let Some(n) = self.0.get() {
            n.notify_waiters();
        }
    }

    /// `Notify::notified_owned` on the one `Notify`, made at the first call.
    pub fn notified_owned(&self) -> tokio::sync::futures::OwnedNotified {
        Arc::clone(self.0.get_or_init(Arc::default)).notified_owned()
    }
}
