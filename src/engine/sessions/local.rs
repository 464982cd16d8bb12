//! The in-process session registry (`engine::sessions`): a map from key to the holder's
//! takeover signal, and the pending delayed wills. The embedded engine's whole registry; the
//! upstream engine's local half, which it extends across instances.

use async_trait::async_trait;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::engine::sessions::{SessionRegistry, Takeover, TakeoverSender};

#[derive(Default)]
pub struct LocalSessions {
    holders: DashMap<std::sync::Arc<str>, (u64, TakeoverSender)>,
    /// Delayed wills (MQTT 5), cancelled when their session connects again.
    wills: DashMap<String, CancellationToken>,
    /// Woken on every release; waiters check their own key.
    released: tokio::sync::Notify,
}

#[async_trait]
impl SessionRegistry for LocalSessions {
    fn hold(&self, key: std::sync::Arc<str>, holder: u64, signal: TakeoverSender) {
        self.holders.insert(key, (holder, signal));
    }

    fn release(&self, key: &str, holder: u64) {
        if self
            .holders
            .remove_if(key, |_, (h, _)| *h == holder)
            .is_some()
        {
            self.released.notify_waiters();
        }
    }

    async fn wait_released(&self, key: &str, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a release in between is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.holders.contains_key(key) {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return !self.holders.contains_key(key);
            }
        }
    }

    fn is_held(&self, key: &str) -> bool {
        self.holders.contains_key(key)
    }

    async fn take_over(&self, key: &str) -> bool {
        match self.holders.get(key) {
            Some(entry) => entry
                .1
                .unbounded_send(Takeover {
                    key: key.to_owned(),
                })
                .is_ok(),
            None => false,
        }
    }

    fn delay_will(&self, session: &str) -> CancellationToken {
        let token = CancellationToken::new();
        if let Some(old) = self.wills.insert(session.to_owned(), token.clone()) {
            old.cancel();
        }
        token
    }

    async fn cancel_will(&self, session: &str) {
        if let Some((_, token)) = self.wills.remove(session) {
            token.cancel();
        }
    }

    fn will_done(&self, session: &str) {
        self.wills.remove(session);
    }
}
