//! Consumers on the upstream broker: one AMQP channel each on the consuming connection, with
//! its own prefetch, so cancelling or dropping one is closing its channel (RabbitMQ requeues
//! what it held) and a refusal elsewhere never touches it (DESIGN.md §1). Delivery tags are the
//! engine channel's own, mapped here to (AMQP channel, AMQP tag). Auto-ack consumers consume
//! with manual acks and a bounded prefetch and are acked as the adapter takes each delivery:
//! RabbitMQ's no-ack mode has no flow control at all.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::Stream;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::convert;
use crate::engine::{CancelReason, Delivery, DeliveryStream, EngineError};

/// Prefetch of an auto-ack consumer: what may sit between RabbitMQ and the adapter.
pub(super) const AUTO_ACK_WINDOW: u16 = 256;

/// The engine channel's delivery tags.
#[derive(Default)]
pub(super) struct Tags {
    next: AtomicU64,
    unacked: Mutex<BTreeMap<u64, (lapin::Channel, u64)>>,
}

impl Tags {
    pub(super) fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(super) fn track(&self, channel: &lapin::Channel, amqp_tag: u64) -> u64 {
        let tag = self.next();
        self.unacked.lock().insert(tag, (channel.clone(), amqp_tag));
        tag
    }

    /// Forgets every tag of one AMQP channel (it closed: the broker requeued them).
    pub(super) fn forget_channel(&self, channel: &lapin::Channel) {
        let id = channel.id();
        self.unacked.lock().retain(|_, (ch, _)| ch.id() != id);
    }

    pub(super) fn holds_on(&self, channel: &lapin::Channel) -> bool {
        let id = channel.id();
        self.unacked.lock().values().any(|(ch, _)| ch.id() == id)
    }

    pub(super) fn clear(&self) {
        self.unacked.lock().clear();
    }

    /// Takes the tags an ack or nack settles, as one (channel, highest AMQP tag, multiple)
    /// per AMQP channel; an unknown tag is refused and changes nothing.
    pub(super) fn take(
        &self,
        tag: u64,
        multiple: bool,
    ) -> Result<Vec<(lapin::Channel, u64, bool)>, EngineError> {
        let mut unacked = self.unacked.lock();
        if !multiple {
            let (ch, amqp) = unacked.remove(&tag).ok_or_else(|| unknown(tag))?;
            return Ok(vec![(ch, amqp, false)]);
        }
        // AMQP: multiple with tag 0 means every outstanding delivery.
        let upto = if tag == 0 { u64::MAX } else { tag };
        let settled: Vec<u64> = unacked.range(..=upto).map(|(t, _)| *t).collect();
        if settled.is_empty() {
            return Err(unknown(tag));
        }
        let mut per_channel: BTreeMap<u16, (lapin::Channel, u64)> = BTreeMap::new();
        for t in settled {
            if let Some((ch, amqp)) = unacked.remove(&t) {
                let entry = per_channel.entry(ch.id()).or_insert((ch, amqp));
                entry.1 = entry.1.max(amqp);
            }
        }
        Ok(per_channel
            .into_values()
            .map(|(ch, amqp)| (ch, amqp, true))
            .collect())
    }
}

fn unknown(tag: u64) -> EngineError {
    EngineError::PreconditionFailed(format!("unknown delivery tag {tag}"))
}

/// What the owning channel and the stream share about one consumer.
#[derive(Default)]
pub(super) struct State {
    /// Cancelled by its own channel: the stream ends without a reason.
    pub cancelled: AtomicBool,
    reason: Mutex<Option<CancelReason>>,
}

pub(super) struct UpstreamConsumer {
    pub inner: lapin::Consumer,
    pub channel: lapin::Channel,
    pub tags: Arc<Tags>,
    pub tag: Arc<str>,
    pub state: Arc<State>,
    pub settling: Settling,
    /// Auto-ack: the highest AMQP tag handed over, acked (multiple) by a small task.
    pub taken: Option<watch::Sender<u64>>,
    pub done: bool,
}

impl UpstreamConsumer {
    /// Starts the acker of an auto-ack consumer.
    pub(super) fn auto_acker(channel: lapin::Channel) -> watch::Sender<u64> {
        let (tx, mut rx) = watch::channel(0u64);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let tag = *rx.borrow_and_update();
                let options = BasicAckOptions { multiple: true };
                if channel.basic_ack(tag, options).await.is_err() {
                    break;
                }
            }
        });
        tx
    }

    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        let delivery_tag = match &self.taken {
            Some(taken) => {
                taken.send_replace(d.delivery_tag);
                self.tags.next()
            }
            None => self.tags.track(&self.channel, d.delivery_tag),
        };
        convert::delivery(d, delivery_tag, Some(self.tag.clone()), None)
    }

    fn end(&mut self, reason: Option<CancelReason>) -> Poll<Option<Delivery>> {
        self.done = true;
        if !self.state.cancelled.load(Ordering::Acquire) {
            *self.state.reason.lock() = reason;
        }
        Poll::Ready(None)
    }
}

impl DeliveryStream for UpstreamConsumer {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        if self.done || self.state.cancelled.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(d))) => Poll::Ready(Some(self.delivery(d))),
            Poll::Ready(Some(Err(e))) => {
                let reason = if convert::is_channel_error(&e) {
                    CancelReason::ChannelClosed
                } else {
                    CancelReason::ConnectionLost
                };
                self.end(Some(reason))
            }
            Poll::Ready(None) => {
                let reason = if self.channel.status().connected() {
                    // The broker cancelled it: its queue went (consumer_cancel_notify).
                    CancelReason::QueueDeleted
                } else {
                    CancelReason::ChannelClosed
                };
                self.end(Some(reason))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn cancel_reason(&self) -> Option<CancelReason> {
        self.state.reason.lock().clone()
    }
}

impl Drop for UpstreamConsumer {
    fn drop(&mut self) {
        if self.state.cancelled.swap(true, Ordering::AcqRel) {
            return;
        }
        // Dropped by its adapter: a cancel that requeues, i.e. closing its AMQP channel.
        self.tags.forget_channel(&self.channel);
        let auto = self.taken.is_some();
        close_later(self.channel.clone(), Some(self.settling.clone()), !auto);
    }
}

/// Acks and nacks of one engine channel (read) against the closes of its AMQP channels
/// (write): an ack still on its way when a close has nacked everything names a tag the broker
/// no longer knows, and RabbitMQ answers that by closing the channel mid-close.
pub(super) type Settling = Arc<tokio::sync::RwLock<()>>;

/// Closes an AMQP channel from sync code (drops); what it held goes back to its queues.
pub(super) fn close_later(channel: lapin::Channel, settling: Option<Settling>, requeue: bool) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _settled = match &settling {
                Some(s) => Some(s.write().await),
                None => None,
            };
            requeue_and_close(&channel, requeue).await
        });
    }
}

/// Closes the channel, requeueing everything it holds first when `requeue`. RabbitMQ requeues
/// on close too, but only once the queue learns of the channel's end, after the close-ok: an
/// explicit nack reaches the queue first, so whoever asks after `close` returns finds the
/// messages back. Not for auto-ack consumers, whose acker may have an ack in flight.
pub(super) async fn requeue_and_close(channel: &lapin::Channel, requeue: bool) {
    if !channel.status().connected() {
        return;
    }
    if requeue {
        let all = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        let _ = channel.basic_nack(0, all).await;
    }
    let _ = channel.close(200, "OK".into()).await;
}

/// Settles tags taken from [`Tags::take`].
pub(super) async fn settle(
    batches: Vec<(lapin::Channel, u64, bool)>,
    ack: bool,
    requeue: bool,
) -> Result<(), EngineError> {
    for (channel, tag, multiple) in batches {
        let sent = if ack {
            channel.basic_ack(tag, BasicAckOptions { multiple }).await
        } else {
            channel
                .basic_nack(tag, BasicNackOptions { multiple, requeue })
                .await
        };
        sent.map_err(|e| convert::engine_error(&e, convert::About::Other))?;
    }
    Ok(())
}
