//! A published message entering the queue: the overflow check, its place among the ready
//! ones, dispatch, the drop-head limits and pacing; one at a time or a run under one lock.

use std::sync::Arc;
use std::time::Instant;

use super::*;

impl Queue {
    /// Adds a published message; `on_disk` when the caller wrote its entry to the store.
    pub fn enqueue(
        self: &Arc<Self>,
        envelope: &Arc<Stored>,
        now: &Now,
        on_disk: bool,
        fx: &mut Effects,
    ) -> Enqueued {
        let expires_at = self.expiry_of(envelope, now);
        let mut st = self.state.lock();
        self.enqueue_locked(&mut st, envelope, expires_at, now, on_disk, fx)
    }

    /// [`Self::enqueue`] of a run of messages, in order, under one taking of the queue's lock;
    /// `each` hears what became of each. With `stop_when_paced`, the run stops after the
    /// first message that paces (`fx.paced` is set): the rest are not taken from `run`.
    /// Publishers on other workers took the lock (and the state's cache lines) over from each
    /// other once per message; a 50→1 fan-in spent most of its enqueue there (docs/bench.md,
    /// 2026-12-06).
    pub fn enqueue_run<E: std::borrow::Borrow<Arc<Stored>>>(
        self: &Arc<Self>,
        run: impl IntoIterator<Item = (E, bool)>,
        stop_when_paced: bool,
        now: &Now,
        fx: &mut Effects,
        mut each: impl FnMut(Enqueued),
    ) {
        let mut st = self.state.lock();
        for (envelope, on_disk) in run {
            let envelope = envelope.borrow();
            let expires_at = self.expiry_of(envelope, now);
            each(self.enqueue_locked(&mut st, envelope, expires_at, now, on_disk, fx));
            if stop_when_paced && !fx.paced.is_empty() {
                return;
            }
        }
    }

    fn enqueue_locked(
        self: &Arc<Self>,
        st: &mut State,
        envelope: &Arc<Stored>,
        expires_at: Option<Instant>,
        now: &Now,
        on_disk: bool,
        fx: &mut Effects,
    ) -> Enqueued {
        if st.deleted {
            // Routed to before a concurrent delete took it away: the message is not here.
            return Enqueued::Gone;
        }
        let size = envelope.message.body.len() as u64;
        if let Some(args) = self.args.as_deref()
            && args.overflow != Overflow::DropHead
        {
            let full_len = args
                .max_length
                .is_some_and(|max| st.ready.len() as u64 >= max);
            let full_bytes = args
                .max_length_bytes
                .is_some_and(|max| st.ready_bytes + size > max);
            if full_len || full_bytes {
                if args.overflow == Overflow::RejectPublishDlx {
                    let entry = Entry {
                        seq: 0,
                        envelope: envelope.clone(),
                        expires_at: None,
                        redelivered: false,
                        on_disk: false,
                    };
                    self.dead_letter(entry, DeadReason::Rejected, fx);
                }
                return Enqueued::Refused;
            }
        }
        let was_empty = st.ready.is_empty();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.enqueued += 1;
        self.insert_ready(
            st,
            Ready::In(Entry {
                seq,
                envelope: envelope.clone(),
                expires_at,
                redelivered: false,
                on_disk,
            }),
        );
        self.dispatch(st, now, fx);
        self.enforce_limits(st, fx);
        self.pacing(st, fx);
        if expires_at.is_some() {
            self.expire_head(st, now.get(), true, fx);
            if was_empty {
                self.expiry_wake.notify_one();
            }
            if !self.expiry_started.load(Ordering::Acquire) {
                fx.more().start_expiry.push(self.clone());
            }
        }
        Enqueued::Taken
    }

    /// `drop-head`: the oldest messages make room (dead-lettered as `maxlen`).
    pub(super) fn enforce_limits(&self, st: &mut State, fx: &mut Effects) {
        // Most queues have no arguments: nothing to enforce, and nothing to look up per message.
        let Some(args) = self.args.as_deref() else {
            return;
        };
        if args.overflow != Overflow::DropHead {
            return;
        }
        loop {
            let over_len = args
                .max_length
                .is_some_and(|max| st.ready.len() as u64 > max);
            let over_bytes = args
                .max_length_bytes
                .is_some_and(|max| st.ready_bytes > max);
            if !(over_len || over_bytes) {
                return;
            }
            match self.pop_ready(st) {
                Some(slot) => self.dead_letter_slot(slot, DeadReason::MaxLen, fx),
                None => return,
            }
            self.head_changed(st);
        }
    }
}
