//! The takeover signal: how a holder of the session registry hears that another connection
//! asked for what it holds. One small allocation, shared by the holder and the registry.
//!
//! Hand-written rather than a channel from a crate: every MQTT and `/ws` connection holds one
//! for its whole life and almost none is ever told anything. futures' unbounded channel took
//! two blocks (its state, 72 bytes, and the queue's stub node, 32); tokio's a block of 32
//! slots up front. This is one block of 56 bytes, a lock and the waker under it, and the keys
//! boxed only once one is sent (docs/bench.md).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use parking_lot::Mutex;

use super::Takeover;

/// A new signal: the registry keeps the sender, the holder polls the receiver.
pub fn takeover_channel() -> (TakeoverSender, TakeoverReceiver) {
    let shared = Arc::new(Mutex::new(State::default()));
    (TakeoverSender(shared.clone()), TakeoverReceiver(shared))
}

#[derive(Debug, Default)]
struct State {
    /// The holder's task, once it polled.
    waker: Option<Waker>,
    /// Keys told and not yet heard, oldest first.
    #[allow(
        clippy::box_collection,
        reason = "8 bytes where a Vec is 24: the signal's one block stays at 56"
    )]
    keys: Option<Box<Vec<String>>>,
    /// The holder is gone: nothing sent is heard.
    closed: bool,
}

/// The registry's end; clones tell the same holder.
#[derive(Debug, Clone)]
pub struct TakeoverSender(Arc<Mutex<State>>);

/// The holder is gone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the holder is gone")]
pub struct Closed;

impl TakeoverSender {
    /// Tells the holder to let go of `takeover.key`; `Err` when it is gone.
    pub fn unbounded_send(&self, takeover: Takeover) -> Result<(), Closed> {
        let mut state = self.0.lock();
        if state.closed {
            return Err(Closed);
        }
        state.keys.get_or_insert_default().push(takeover.key);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

/// The holder's end: a stream of the takeovers asked for, in order. It never ends (the
/// registry may drop its sender on release while the holder still runs).
#[derive(Debug)]
pub struct TakeoverReceiver(Arc<Mutex<State>>);

impl Stream for TakeoverReceiver {
    type Item = Takeover;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Takeover>> {
        let mut state = self.0.lock();
        if let Some(keys) = state.keys.as_mut().filter(|k| !k.is_empty()) {
            let key = keys.remove(0);
            if keys.is_empty() {
                state.keys = None;
            }
            return Poll::Ready(Some(Takeover { key }));
        }
        match &mut state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for TakeoverReceiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.closed = true;
        state.waker = None;
        state.keys = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};

    fn takeover(key: &str) -> Takeover {
        Takeover {
            key: key.to_owned(),
        }
    }

    #[test]
    fn a_signal_stays_in_its_size_class() {
        // Every MQTT and `/ws` connection holds one: 40 bytes and the `Arc`'s counts fill
        // mimalloc's 56-byte class.
        let size = std::mem::size_of::<Mutex<State>>();
        assert!(size <= 40, "{size}");
    }

    #[tokio::test]
    async fn takeovers_are_heard_in_order_and_wake_the_holder() {
        let (tx, mut rx) = takeover_channel();
        assert_eq!(rx.next().now_or_never(), None, "nothing told yet");
        let waiting = tokio::spawn(async move {
            let first = rx.next().await;
            let second = rx.next().await;
            (first, second, rx)
        });
        tokio::task::yield_now().await;
        tx.clone().unbounded_send(takeover("a")).expect("held");
        tx.unbounded_send(takeover("b")).expect("held");
        let (first, second, rx) = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(first, Some(takeover("a")));
        assert_eq!(second, Some(takeover("b")));
        drop(rx);
        assert_eq!(
            tx.unbounded_send(takeover("c")),
            Err(Closed),
            "the holder is gone"
        );
    }
}
