//! The effects of queue operations, carried out once the queues' locks are released: store
//! entries to forget, pages to read ahead, expiry timers to start, queues to auto-delete, and
//! dead letters to publish (whose own effects are the next round's).

use super::*;

/// Dead letters can chain (a DLX queue with its own DLX); cycles are cut, and this bounds what
/// one operation may trigger in any case.
const MAX_EFFECT_ROUNDS: usize = 64;

impl Broker {
    /// Carries out what queue operations asked for once their locks are released.
    pub fn apply(&self, mut fx: Effects) {
        for _ in 0..MAX_EFFECT_ROUNDS {
            let Some(more) = fx.take_more() else {
                return;
            };
            let More {
                dead,
                dequeued,
                start_expiry,
                auto_delete,
                read_ahead,
            } = *more;
            if !dequeued.is_empty() {
                self.forget(dequeued);
            }
            if !read_ahead.is_empty() {
                self.read_ahead(read_ahead);
            }
            for queue in start_expiry {
                if queue.claim_expiry_task() {
                    self.spawn_message_expiry(&queue);
                }
            }
            for queue in auto_delete {
                self.remove_queue(&queue);
            }
            // Dead letters are published again, and what that asks for is the next round's.
            for dead in dead {
                self.dead_letter(dead, &mut fx);
            }
        }
        if let Some(more) = fx.take_more()
            && !more.dead.is_empty()
        {
            tracing::warn!(
                dropped = more.dead.len(),
                "dead-letter chain too long; messages dropped"
            );
        }
    }
}
