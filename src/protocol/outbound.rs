//! A browser connection's outbound buffer (DESIGN.md §4, §7), shared by the WebSocket and SSE
//! adapters: frames (WebSocket text frames, SSE events) wait here for their connection's writer.
//! Bounded in messages and bytes for the frames that may be dropped — deliveries of auto-ack
//! subscriptions on private queues; when full, `drop_oldest` drops the oldest such frame and
//! remembers how many each subscription lost (the writer sends `lagged` before what follows), and
//! `disconnect` asks for close 4008. Other frames (replies, manual-ack and windowed deliveries)
//! are bounded by the request rate and by credit, never dropped. The droppable part has a
//! [`Pressure`] gauge: publishers whose messages land here above its high-water mark are paced
//! (DESIGN.md §7), so only a consumer they gave up waiting for ever drops.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::{Poll, Waker};

use parking_lot::{Mutex, MutexGuard};

use crate::flow::{Bound, BufferKind, Pressure};
use crate::metrics;

/// Why a buffer closes, as its adapter says it.
pub trait Closing: Copy {
    /// Whether what is queued is dropped (a slow consumer must not wait for its backlog)
    /// instead of drained first.
    fn is_urgent(self) -> bool;
    /// The close code and reason the writer sends last, if any.
    fn frame(self) -> Option<(u16, &'static str)>;
}

/// What a subscription does when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    DropOldest,
    Disconnect,
}

pub struct Frame {
    pub text: String,
    /// Set for droppable deliveries: the subscription they belong to.
    pub droppable: Option<Arc<str>>,
    /// An engine delivery tag to ack once the frame is written (auto-ack on named queues).
    pub ack_after_write: Option<u64>,
    /// A delivery (counted in `gateway_messages_out_total` when written).
    pub message: bool,
}

impl Frame {
    pub fn control(text: String) -> Self {
        Frame {
            text,
            droppable: None,
            ack_after_write: None,
            message: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub messages: usize,
    pub bytes: usize,
}

/// The buffer is full and the subscription asked to be disconnected rather than lose messages.
#[derive(Debug)]
pub struct SlowConsumer;

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    lagged: HashMap<Arc<str>, u64>,
    high_water_bytes: usize,
    closed: bool,
    close_frame: Option<(u16, &'static str)>,
    /// The writer's, while it waits for a frame. A buffer has one writer, so one waker, kept
    /// under the lock every push takes: a `Notify` and its waiter were 32 bytes of every
    /// connection's buffer and 100 of its task's state (docs/bench.md, idle `/ws`).
    writer: Option<Waker>,
}

impl State {
    /// Lets the lock go and wakes the writer, if it waits.
    fn wake(mut this: MutexGuard<'_, State>) {
        let writer = this.writer.take();
        drop(this);
        if let Some(w) = writer {
            w.wake();
        }
    }
}

pub struct SendQueue {
    state: Mutex<State>,
    /// Counts the droppable frames (messages, bytes) against `Limits`; only changed under
    /// `state`'s lock, so its fill is the buffer's. Its kind is the adapter, for metrics.
    pressure: Pressure,
}

/// What the writer takes next.
pub enum Next {
    Frame(Frame),
    /// `lagged` frames to send first: (sub, dropped).
    Lagged(Vec<(Arc<str>, u64)>),
    /// Nothing more: send this close frame, if any, and end.
    Closed(Option<(u16, &'static str)>),
}

impl Limits {
    /// The per-connection outbound buffer bounds of DESIGN.md §7.
    pub fn of(limits: &crate::config::LimitsConfig) -> Limits {
        Limits {
            messages: limits.outbound_buffer_messages,
            bytes: limits.outbound_buffer_bytes.as_u64() as usize,
        }
    }
}

impl SendQueue {
    pub fn new(limits: Limits, kind: BufferKind) -> Self {
        SendQueue {
            state: Mutex::new(State::default()),
            pressure: Pressure::new(
                Bound {
                    messages: limits.messages as u64,
                    bytes: limits.bytes as u64,
                },
                kind,
            ),
        }
    }

    /// The gauge of the droppable part, for the consumers whose deliveries go there.
    pub fn pressure(&self) -> &Pressure {
        &self.pressure
    }

    /// Queues a frame that is never dropped.
    pub fn push(&self, frame: Frame) {
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        st.frames.push_back(frame);
        State::wake(st);
    }

    /// Queues a droppable delivery of `sub`, making room by its policy.
    pub fn push_droppable(
        &self,
        sub: Arc<str>,
        text: String,
        overflow: Overflow,
    ) -> Result<(), SlowConsumer> {
        let mut st = self.state.lock();
        if st.closed {
            return Ok(());
        }
        let len = text.len();
        while self.pressure.is_full(len as u64) {
            if overflow == Overflow::Disconnect {
                // Lost with what the urgent close discards: the client hears how many.
                metrics::delivery_dropped(self.pressure.kind().as_str(), "slow_consumer");
                self.pressure.count_drop();
                *st.lagged.entry(sub).or_default() += 1;
                return Err(SlowConsumer);
            }
            let Some(at) = st.frames.iter().position(|f| f.droppable.is_some()) else {
                break;
            };
            if let Some(old) = st.frames.remove(at) {
                self.pressure.sub(old.text.len() as u64);
                metrics::delivery_dropped(self.pressure.kind().as_str(), "slow_consumer");
                self.pressure.count_drop();
                if let Some(owner) = old.droppable {
                    *st.lagged.entry(owner).or_default() += 1;
                }
            }
        }
        self.pressure.add(len as u64);
        st.high_water_bytes = st.high_water_bytes.max(self.pressure.fill().1 as usize);
        st.frames.push_back(Frame {
            text,
            droppable: Some(sub),
            ack_after_write: None,
            message: true,
        });
        State::wake(st);
        Ok(())
    }

    /// Forgets `sub`'s pending lag count (it was unsubscribed).
    pub fn forget(&self, sub: &str) {
        self.state.lock().lagged.remove(sub);
    }

    /// The most droppable bytes ever held at once.
    #[cfg(test)]
    pub fn high_water_bytes(&self) -> usize {
        self.state.lock().high_water_bytes
    }

    /// Stops accepting frames and closes for `why`: at once, dropping what is queued, when it
    /// is urgent (a slow consumer must not wait for its backlog); otherwise the writer drains
    /// what is queued first. Then it sends `lagged` counts (dropped deliveries included), the
    /// close frame (if `why` has one) and ends.
    pub fn close(&self, why: impl Closing) {
        let mut st = self.state.lock();
        if why.is_urgent() {
            let State { frames, lagged, .. } = &mut *st;
            for f in frames.drain(..) {
                if let Some(owner) = f.droppable {
                    self.pressure.sub(f.text.len() as u64);
                    metrics::delivery_dropped(self.pressure.kind().as_str(), "closed");
                    *lagged.entry(owner).or_default() += 1;
                }
            }
        } else if st.closed {
            return;
        }
        st.closed = true;
        st.close_frame = why.frame();
        State::wake(st);
    }

    /// Waits for the next thing to write. A buffer found empty gives its ring back before
    /// waiting: an idle connection holds none (256 bytes each), and a busy one finds frames
    /// waiting and never gets here between them.
    pub fn next(&self) -> impl Future<Output = Next> + '_ {
        std::future::poll_fn(|cx| {
            let mut st = self.state.lock();
            if let Some(next) = self.take(&mut st) {
                return Poll::Ready(next);
            }
            if st.frames.capacity() > 0 {
                st.frames = VecDeque::new();
            }
            if !st.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.writer = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// What [`SendQueue::next`] would return now, if anything: a writer takes what is queued
    /// behind the first frame without waiting and writes it all in one flush.
    pub fn try_next(&self) -> Option<Next> {
        self.take(&mut self.state.lock())
    }

    fn take(&self, st: &mut State) -> Option<Next> {
        if !st.lagged.is_empty() {
            return Some(Next::Lagged(st.lagged.drain().collect()));
        }
        if let Some(frame) = st.frames.pop_front() {
            if frame.droppable.is_some() {
                self.pressure.sub(frame.text.len() as u64);
            }
            return Some(Next::Frame(frame));
        }
        st.closed.then(|| Next::Closed(st.close_frame.take()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(out: &SendQueue) -> Vec<String> {
        out.state
            .lock()
            .frames
            .iter()
            .map(|f| f.text.clone())
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_the_newest_within_bounds() {
        let out = SendQueue::new(
            Limits {
                messages: 3,
                bytes: 1 << 20,
            },
            BufferKind::Ws,
        );
        let s: Arc<str> = "s1".into();
        out.push(Frame::control("reply".into()));
        for i in 0..6 {
            out.push_droppable(s.clone(), format!("m{i}"), Overflow::DropOldest)
                .unwrap();
        }
        assert_eq!(
            texts(&out),
            ["reply", "m3", "m4", "m5"],
            "control frames are never dropped"
        );
        assert_eq!(out.state.lock().lagged[&s], 3);
    }

    #[test]
    fn bytes_bound_too() {
        let out = SendQueue::new(
            Limits {
                messages: 100,
                bytes: 10,
            },
            BufferKind::Ws,
        );
        let s: Arc<str> = "s".into();
        for _ in 0..5 {
            out.push_droppable(s.clone(), "abcd".into(), Overflow::DropOldest)
                .unwrap();
        }
        assert_eq!(texts(&out).len(), 2);
        assert!(out.high_water_bytes() <= 10);
    }

    #[test]
    fn disconnect_policy_refuses() {
        let out = SendQueue::new(
            Limits {
                messages: 1,
                bytes: 100,
            },
            BufferKind::Ws,
        );
        let s: Arc<str> = "s".into();
        out.push_droppable(s.clone(), "a".into(), Overflow::Disconnect)
            .unwrap();
        assert!(
            out.push_droppable(s, "b".into(), Overflow::Disconnect)
                .is_err()
        );
    }

    /// Counts its wakes.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[derive(Clone, Copy)]
    struct Going;

    impl Closing for Going {
        fn is_urgent(self) -> bool {
            false
        }
        fn frame(self) -> Option<(u16, &'static str)> {
            Some((1001, "going away"))
        }
    }

    #[test]
    fn a_waiting_writer_is_woken_by_a_push_and_by_the_close() {
        let out = SendQueue::new(
            Limits {
                messages: 10,
                bytes: 1 << 20,
            },
            BufferKind::Ws,
        );
        let wakes = Arc::new(Wakes(0.into()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let count = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);

        let mut next = std::pin::pin!(out.next());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        // Polled again while waiting: one waker kept, not one per poll.
        assert!(next.as_mut().poll(&mut cx).is_pending());
        out.push(Frame::control("reply".into()));
        assert_eq!(count(), 1);
        match next.as_mut().poll(&mut cx) {
            Poll::Ready(Next::Frame(f)) => assert_eq!(f.text, "reply"),
            _ => panic!("the pushed frame is next"),
        }

        // A push while nobody waits wakes nobody, and is found by the next wait.
        out.push(Frame::control("second".into()));
        assert_eq!(count(), 1);
        let mut next = std::pin::pin!(out.next());
        assert!(matches!(
            next.as_mut().poll(&mut cx),
            Poll::Ready(Next::Frame(_))
        ));

        let mut next = std::pin::pin!(out.next());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        out.close(Going);
        assert_eq!(count(), 2);
        assert!(matches!(
            next.as_mut().poll(&mut cx),
            Poll::Ready(Next::Closed(Some((1001, _))))
        ));
    }
}
