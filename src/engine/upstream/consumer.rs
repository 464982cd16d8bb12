//! Consumers on the upstream broker: one AMQP channel each on the consuming connection, with
//! its own prefetch, so cancelling or dropping one is closing its channel (RabbitMQ requeues
//! what it held) and a refusal elsewhere never touches it (DESIGN.md §1). Delivery tags are the
//! engine channel's own ([`Tags`]). Auto-ack consumers consume with manual acks and a bounded
//! prefetch and are acked as the adapter takes each delivery: RabbitMQ's no-ack mode has no
//! flow control at all.
//!
//! A consumer outlives its connection: when the connection is lost the stream waits (the
//! adapter just sees no delivery) and consumes again, same queue, tag and prefetch, on the
//! next one (DESIGN.md §5). What it held unacked was requeued by the broker and comes again,
//! `redelivered`; acks for the old copies are moot and succeed without effect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::convert::{self, About};
use super::link::{Conns, Link};
use super::tags::{Amqp, Tags};
use crate::engine::{CancelReason, Delivery, DeliveryStream, EngineError};

/// Prefetch of an auto-ack consumer: what may sit between RabbitMQ and the adapter.
pub(super) const AUTO_ACK_WINDOW: u16 = 256;
/// Consume attempts on a new connection before the consumer gives up (one a second: an
/// exclusive consume waits for the broker to notice the old connection is gone).
const RESUME_ATTEMPTS: u32 = 30;

/// What a consumer asked for, to ask again on a new connection.
pub(super) struct Spec {
    pub queue: ShortString,
    pub tag: ShortString,
    pub prefetch: u16,
    pub exclusive: bool,
    pub arguments: FieldTable,
}

/// The AMQP channel and lapin consumer currently serving a consumer.
#[derive(Clone)]
pub(super) struct Live {
    pub amqp: Amqp,
    pub consumer: lapin::Consumer,
}

/// Opens a channel on `conns` and consumes there.
pub(super) async fn start(conns: &Conns, spec: &Spec) -> Result<Live, EngineError> {
    let queue = spec.queue.as_str();
    let ch = conns
        .consuming_channel()
        .await
        .map_err(|e| convert::engine_error(&e, About::Other))?;
    let started = async {
        ch.basic_qos(spec.prefetch, BasicQosOptions::default())
            .await?;
        let consume = BasicConsumeOptions {
            no_local: false,
            no_ack: false,
            exclusive: spec.exclusive,
            nowait: false,
        };
        ch.basic_consume(
            spec.queue.clone(),
            spec.tag.clone(),
            consume,
            spec.arguments.clone(),
        )
        .await
    };
    match started.await {
        Ok(consumer) => Ok(Live {
            amqp: Amqp {
                generation: conns.generation,
                channel: ch,
            },
            consumer,
        }),
        Err(e) => {
            close_later(ch, None, true);
            Err(convert::engine_error(&e, About::Consume(queue)))
        }
    }
}

/// What the owning channel and the stream share about one consumer.
pub(super) struct State {
    /// Cancelled by its own channel: the stream ends without a reason.
    pub cancelled: AtomicBool,
    reason: Mutex<Option<CancelReason>>,
    live: Mutex<Live>,
}

impl State {
    pub(super) fn new(live: Live) -> State {
        State {
            cancelled: AtomicBool::new(false),
            reason: Mutex::default(),
            live: Mutex::new(live),
        }
    }

    pub(super) fn live(&self) -> Live {
        self.live.lock().clone()
    }
}

type Resuming = BoxFuture<'static, Result<Live, CancelReason>>;

pub(super) struct UpstreamConsumer {
    pub live: Live,
    pub link: Arc<Link>,
    pub spec: Arc<Spec>,
    pub tags: Arc<Tags>,
    pub tag: Arc<str>,
    pub state: Arc<State>,
    pub settling: Settling,
    /// Auto-ack: the highest AMQP tag handed over, acked (multiple) by a small task.
    pub taken: Option<watch::Sender<u64>>,
    /// Sync for `DeliveryStream`; only ever polled through `&mut`.
    pub resuming: Option<sync_wrapper::SyncWrapper<Resuming>>,
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
            None => self.tags.track(&self.live.amqp, d.delivery_tag),
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

    /// The stream ended; `None` when that is the connection's loss, to resume from.
    fn ended(&self, error: Option<&lapin::Error>) -> Option<CancelReason> {
        if !self.link.is_live(self.live.amqp.generation) {
            return None;
        }
        Some(match error {
            Some(e) if !convert::is_channel_error(e) => CancelReason::ConnectionLost,
            Some(_) => CancelReason::ChannelClosed,
            // The broker cancelled it: its queue went (consumer_cancel_notify).
            None if self.live.amqp.channel.status().connected() => CancelReason::QueueDeleted,
            None => CancelReason::ChannelClosed,
        })
    }

    fn resume(&mut self) {
        let (link, spec, state) = (self.link.clone(), self.spec.clone(), self.state.clone());
        self.resuming = Some(sync_wrapper::SyncWrapper::new(Box::pin(async move {
            for _ in 0..RESUME_ATTEMPTS {
                let Some(conns) = link.up().await else {
                    return Err(CancelReason::ConnectionLost);
                };
                if state.cancelled.load(Ordering::Acquire) {
                    return Err(CancelReason::ConnectionLost);
                }
                match start(&conns, &spec).await {
                    Ok(live) => return Ok(live),
                    Err(EngineError::NotFound { .. }) => return Err(CancelReason::QueueDeleted),
                    Err(e) => {
                        tracing::debug!(queue = %spec.queue, error = %e, "consumer not resumed yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(CancelReason::ConnectionLost)
        })));
    }

    /// Serves from a resumed consumer; false when its channel was closed meanwhile.
    fn install(&mut self, live: Live) -> bool {
        *self.state.live.lock() = live.clone();
        if self.state.cancelled.load(Ordering::Acquire) {
            // Its channel closed while this one was opening and may have closed the old one.
            close_later(live.amqp.channel, None, true);
            return false;
        }
        if self.taken.is_some() {
            self.taken = Some(Self::auto_acker(live.amqp.channel.clone()));
        }
        tracing::debug!(queue = %self.spec.queue, tag = %self.tag, "consumer resumed upstream");
        self.live = live;
        true
    }
}

impl DeliveryStream for UpstreamConsumer {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            if self.done || self.state.cancelled.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            if let Some(resuming) = &mut self.resuming {
                let resumed = std::task::ready!(resuming.get_mut().poll_unpin(cx));
                self.resuming = None;
                match resumed {
                    Ok(live) => {
                        if !self.install(live) {
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    Err(reason) => return self.end(Some(reason)),
                }
            }
            let ended = match std::pin::Pin::new(&mut self.live.consumer).poll_next(cx) {
                Poll::Ready(Some(Ok(d))) => return Poll::Ready(Some(self.delivery(d))),
                Poll::Ready(Some(Err(e))) => self.ended(Some(&e)),
                Poll::Ready(None) => self.ended(None),
                Poll::Pending => return Poll::Pending,
            };
            match ended {
                Some(reason) => return self.end(Some(reason)),
                None => self.resume(),
            }
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
        self.tags.forget_channel(&self.live.amqp);
        let auto = self.taken.is_some();
        let channel = self.live.amqp.channel.clone();
        close_later(channel, Some(self.settling.clone()), !auto);
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
        if !channel.status().connected() {
            // Its channel is gone and the broker requeued what it held: nothing to settle.
            continue;
        }
        // lapin queues the frame in the first poll, in order with everything else on the
        // channel; the rest of the future only waits for lapin's I/O thread to write it, a
        // round trip that would hold the adapter's packet loop on every ack.
        let sent = if ack {
            channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .now_or_never()
        } else {
            channel
                .basic_nack(tag, BasicNackOptions { multiple, requeue })
                .now_or_never()
        };
        match sent {
            Some(Err(e)) if channel.status().connected() => {
                return Err(convert::engine_error(&e, About::Other));
            }
            _ => {}
        }
    }
    Ok(())
}
