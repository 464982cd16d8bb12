//! The hand-off from a queue to one consumer's stream: unbounded (credit bounds it), one
//! sender, and nothing held while idle. A tokio mpsc channel allocates a block of 32 slots up
//! front — 4 KiB per consumer of 128-byte deliveries, held by every idle subscription.
//! What the two ends share besides (for a consumer: its channel, tag, cancel flag and reason)
//! lives in the same allocation, and the sending end is that allocation itself.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use parking_lot::{Mutex, MutexGuard};
use std::sync::Arc;

/// An emptied buffer larger than this is given back rather than kept for the next burst (a
/// few slots are kept: a consumer taking deliveries one at a time allocates nothing).
const KEEP_BYTES: usize = 1024;

fn too_big<T>(q: &VecDeque<T>) -> bool {
    q.capacity() * std::mem::size_of::<T>() > KEEP_BYTES
}

/// The hand-off itself, shared by the queue's end and the consumer's stream, with what the two
/// ends share besides (`side`: the consumer's own state), so one allocation holds both.
pub(super) struct Handoff<T, X> {
    state: Mutex<State<T>>,
    pub side: X,
}

struct State<T> {
    items: VecDeque<T>,
    /// The receiver's, while it waits. Under the lock both ends take anyway, not in an
    /// `AtomicWaker` beside it: that was 24 bytes more of every consumer, and took the
    /// hand-off past a size class (128 bytes with the `Arc`'s counts, where 112 is one).
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_closed: bool,
}

/// The consumer's end: what it took from the shared queue in one go and hands out one by one.
/// Dropping it refuses further items.
pub(super) struct Receiver<T, X> {
    shared: Arc<Handoff<T, X>>,
    taken: VecDeque<T>,
}

impl<T, X> Handoff<T, X> {
    /// A hand-off and its receiving end. The sending end is the returned `Arc` (or any clone
    /// of it); whoever holds it calls [`sender_gone`](Self::sender_gone) when it lets go.
    pub fn new(side: X) -> (Arc<Self>, Receiver<T, X>) {
        let shared = Arc::new(Handoff {
            state: Mutex::new(State {
                items: VecDeque::new(),
                waker: None,
                sender_gone: false,
                receiver_closed: false,
            }),
            side,
        });
        let rx = Receiver {
            shared: shared.clone(),
            taken: VecDeque::new(),
        };
        (shared, rx)
    }

    /// Hands `v` over; gives it back when the receiver is closed or gone. `room`: how many
    /// the sender expects to send before the receiver next takes them, `v` included. The
    /// buffer is given back whenever the receiver finds it empty, so a burst grew it from
    /// nothing by doubling each time (five copies of everything for 128 deliveries: a
    /// twentieth of a fan-in message's instructions under callgrind); it now grows once.
    pub fn send(&self, v: T, room: usize) -> Result<(), T> {
        let mut st = self.state.lock();
        if st.receiver_closed {
            return Err(v);
        }
        if st.items.len() == st.items.capacity() {
            st.items.reserve(room.max(1));
        }
        st.items.push_back(v);
        wake(st);
        Ok(())
    }

    /// The sender let go: once what it handed over is taken, the receiver gets `None`.
    pub fn sender_gone(&self) {
        let mut st = self.state.lock();
        st.sender_gone = true;
        wake(st);
    }
}

/// Wakes the receiver, if it waits, once the lock is let go.
fn wake<T>(mut st: MutexGuard<'_, State<T>>) {
    let waker = st.waker.take();
    drop(st);
    if let Some(w) = waker {
        w.wake();
    }
}

impl<T, X> Receiver<T, X> {
    pub fn shared(&self) -> &Arc<Handoff<T, X>> {
        &self.shared
    }

    /// The next item; `None` once the sender is gone and everything was taken.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(v) = self.try_recv() {
            return Poll::Ready(Some(v));
        }
        let mut st = self.shared.state.lock();
        if let Some(v) = st.items.pop_front() {
            return Poll::Ready(Some(v));
        }
        if st.sender_gone {
            return Poll::Ready(None);
        }
        // Under the lock a send takes: one after this look finds the waker.
        match &mut st.waker {
            Some(w) => w.clone_from(cx.waker()),
            none => *none = Some(cx.waker().clone()),
        }
        if too_big(&st.items) {
            st.items = VecDeque::new();
        }
        drop(st);
        if too_big(&self.taken) {
            self.taken = VecDeque::new();
        }
        Poll::Pending
    }

    /// The next item already handed over, if any.
    pub fn try_recv(&mut self) -> Option<T> {
        if self.taken.is_empty() {
            let mut st = self.shared.state.lock();
            std::mem::swap(&mut st.items, &mut self.taken);
        }
        self.taken.pop_front()
    }

    /// Refuses further items; those already handed over can still be taken.
    pub fn close(&mut self) {
        self.shared.state.lock().receiver_closed = true;
    }
}

impl<T, X> Drop for Receiver<T, X> {
    fn drop(&mut self) {
        self.shared.state.lock().receiver_closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_order_then_none_when_the_sender_goes() {
        let (tx, mut rx) = Handoff::new(());
        tx.send(1, 1).unwrap();
        tx.send(2, 1).unwrap();
        assert_eq!(std::future::poll_fn(|cx| rx.poll_recv(cx)).await, Some(1));
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(std::future::poll_fn(|cx| rx.poll_recv(cx)).await);
            }
            (got[0], got[1], got[2])
        });
        tokio::task::yield_now().await;
        tx.send(3, 1).unwrap();
        tx.sender_gone();
        assert_eq!(waiting.await.unwrap(), (Some(2), Some(3), None));
    }

    #[test]
    fn a_burst_grows_the_buffer_once() {
        let (tx, mut rx) = Handoff::new(());
        tx.send(0, 128).unwrap();
        let room = tx.state.lock().items.capacity();
        assert!(
            room >= 128,
            "room for the burst at its first send, got {room}"
        );
        for i in 1..128 {
            tx.send(i, 128 - i).unwrap();
        }
        assert_eq!(tx.state.lock().items.capacity(), room);
        assert_eq!(rx.try_recv(), Some(0));
    }

    #[test]
    fn a_closed_receiver_gives_items_back_but_keeps_what_it_has() {
        let (tx, mut rx) = Handoff::new(());
        tx.send(1, 1).unwrap();
        rx.close();
        assert_eq!(tx.send(2, 1), Err(2));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.try_recv(), None);
    }
}
