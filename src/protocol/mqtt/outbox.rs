//! A connection's packets on their way to its writer task. Not a tokio mpsc channel: that
//! allocates a block of 32 slots up front (32 × 208-byte `Outbound` = 6.5 KiB per connection,
//! a quarter of an idle connection's memory), while this queue holds nothing while idle and
//! hands the writer everything queued under one lock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::codec::Outbound;

/// An emptied buffer of more slots than this is given back rather than kept (4 × 208 bytes).
const KEEP: usize = 4;

struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
    senders: AtomicUsize,
}

#[derive(Default)]
struct Queue {
    packets: VecDeque<Outbound>,
    /// The writer is gone: nothing more is taken.
    closed: bool,
}

/// The sending side; the writer sees the end once every clone is dropped.
pub struct Sender(Arc<Shared>);

/// The writer's side.
pub struct Receiver {
    shared: Arc<Shared>,
    /// Taken from the shared queue in one go, handed out one by one.
    taken: VecDeque<Outbound>,
}

pub fn outbox() -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    let receiver = Receiver {
        shared: shared.clone(),
        taken: VecDeque::new(),
    };
    (Sender(shared), receiver)
}

impl Sender {
    /// Queues `p` for the writer; false (and `p` dropped) when the writer is gone.
    pub fn send(&self, p: Outbound) -> bool {
        let mut q = self.0.queue.lock();
        if q.closed {
            return false;
        }
        q.packets.push_back(p);
        drop(q);
        self.0.ready.notify_one();
        true
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::AcqRel);
        Sender(self.0.clone())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.notify_one();
        }
    }
}

impl Receiver {
    /// The next packet; `None` once every sender is gone and everything was taken.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            if let Some(p) = self.try_recv() {
                return Some(p);
            }
            // Idle: give back what a burst grew.
            if self.taken.capacity() > KEEP {
                self.taken = VecDeque::new();
            }
            let notified = self.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = self.shared.queue.lock();
                if !q.packets.is_empty() {
                    continue;
                }
                if q.packets.capacity() > KEEP {
                    q.packets = VecDeque::new();
                }
                if self.shared.senders.load(Ordering::Acquire) == 0 {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// The next packet already queued, if any.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        if self.taken.is_empty() {
            let mut q = self.shared.queue.lock();
            std::mem::swap(&mut q.packets, &mut self.taken);
        }
        self.taken.pop_front()
    }

    /// Nothing queued now.
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty() && self.shared.queue.lock().packets.is_empty()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut q = self.shared.queue.lock();
        q.closed = true;
        q.packets = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping() -> Outbound {
        Outbound::PingResp
    }

    #[tokio::test]
    async fn in_order_then_the_end_when_every_sender_is_gone() {
        let (tx, mut rx) = outbox();
        let tx2 = tx.clone();
        assert!(tx.send(ping()));
        assert!(tx2.send(Outbound::PubAck {
            packet_id: 7,
            code: 0,
        }));
        assert!(matches!(rx.recv().await, Some(Outbound::PingResp)));
        assert!(matches!(
            rx.try_recv(),
            Some(Outbound::PubAck { packet_id: 7, .. })
        ));
        assert!(rx.is_empty());
        drop(tx);
        let waiting = tokio::spawn(async move { rx.recv().await.is_none() });
        tokio::task::yield_now().await;
        drop(tx2);
        assert!(waiting.await.unwrap(), "ends once the last sender is gone");
    }

    #[tokio::test]
    async fn a_gone_writer_gives_packets_back() {
        let (tx, rx) = outbox();
        drop(rx);
        assert!(!tx.send(ping()));
    }
}
