//! Recovery's side of a queue: the entries the store held at start put back in order, in
//! memory or paged out, with their deadlines counted from the original publish.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::page::Paged;
use super::{Effects, Entry, Now, Queue, Ready};
use crate::engine::embedded::held::{OnDisk, Stored};

/// A stored entry as recovery hands it back: the message (in memory, or only its stored id,
/// size and per-message TTL), its age, whether it was seen.
pub(in crate::engine::embedded) type Restored = (RestoredBody, Duration, bool);

#[derive(Clone)]
pub(in crate::engine::embedded) enum RestoredBody {
    In(Arc<Stored>),
    Out {
        disk: Arc<OnDisk>,
        size: u64,
        expiration: Option<String>,
    },
}

impl Queue {
    /// Puts back what the store held at start (`(message, age, redelivered)`, in queue order),
    /// ahead of anything published since. A TTL counts from the original publish.
    pub fn restore(self: &Arc<Self>, entries: Vec<Restored>, now: Instant, fx: &mut Effects) {
        let at = Now::at(now);
        let mut st = self.state.lock();
        let mut any_ttl = false;
        for (message, age, redelivered) in entries {
            let expiration = match &message {
                RestoredBody::In(stored) => stored.message.properties.expiration.as_deref(),
                RestoredBody::Out { expiration, .. } => expiration.as_deref(),
            };
            let expires_at = self
                .expiry_for(expiration, &at)
                .map(|at| at.checked_sub(age).unwrap_or(now));
            any_ttl |= expires_at.is_some();
            let seq = st.next_seq;
            st.next_seq += 1;
            let slot = match message {
                RestoredBody::In(envelope) => Ready::In(Entry {
                    seq,
                    envelope,
                    expires_at,
                    redelivered,
                    on_disk: true,
                }),
                RestoredBody::Out { disk, size, .. } => Ready::Out(Paged {
                    seq,
                    disk,
                    size,
                    expires_at,
                    redelivered,
                }),
            };
            self.insert_ready(&mut st, slot);
        }
        self.enforce_limits(&mut st, fx);
        if any_ttl {
            self.expire_head(&mut st, now, false, fx);
            if !self.expiry_started.load(Ordering::Acquire) {
                fx.more().start_expiry.push(self.clone());
            }
        }
    }
}
