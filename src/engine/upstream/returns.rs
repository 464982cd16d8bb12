//! Which publish a `basic.return` belongs to. AMQP gives a return no delivery tag: RabbitMQ
//! sends it before the ack of its publish, and one ack often settles many publishes
//! (`multiple`). lapin gives each return it holds to the next confirm it completes, and it
//! completes a `multiple` ack's confirms in a hash map's order, so a return reached the wrong
//! publish: a routed one was answered "unroutable" and the unroutable one "routed" (the
//! engine contract's publish-runs case caught it).
//!
//! [`Confirms`] keeps the confirms in publish order. When the first settles, the ones behind
//! it that settled with it (the rest of its ack) are polled too, every return any of them
//! carries goes to a pool, and each publish takes the first return in the pool that matches
//! its exchange, routing key and body: the correlation RabbitMQ's documentation offers for
//! returns. Returns come in publish order, so among equal messages the earliest takes it.

use std::collections::VecDeque;
use std::future::Future;
use std::task::{Context, Poll};

use lapin::Confirmation;
use lapin::message::BasicReturnMessage;

use super::publisher::{InFlight, Request, Settled};

/// Publishes awaiting their confirm, in publish order.
#[derive(Default)]
pub(super) struct Confirms {
    slots: VecDeque<Slot>,
    /// Returns taken from the confirms lapin gave them to, until their publish settles.
    returns: Vec<BasicReturnMessage>,
}

enum Slot {
    Waiting(InFlight),
    /// Boxed: a settlement (a request and a confirm that may carry a return) is 870 bytes,
    /// and the window holds a thousand slots.
    Settled(Box<Settled>),
}

impl Slot {
    /// Polls a waiting confirm; whether it has settled.
    fn settle(&mut self, cx: &mut Context<'_>) -> bool {
        if let Slot::Waiting(confirm) = self
            && let Poll::Ready(settled) = confirm.as_mut().poll(cx)
        {
            *self = Slot::Settled(Box::new(settled));
        }
        matches!(self, Slot::Settled(_))
    }
}

impl Confirms {
    pub fn push_back(&mut self, confirm: InFlight) {
        self.slots.push_back(Slot::Waiting(confirm));
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The first publish's settlement, with its own return, if any; `None` when none waits.
    pub fn next(&mut self) -> impl Future<Output = Option<Settled>> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Settled>> {
        let Some(first) = self.slots.front_mut() else {
            return Poll::Ready(None);
        };
        if !first.settle(cx) {
            return Poll::Pending;
        }
        // The rest of the ack that settled the first: lapin completed them together.
        for slot in self.slots.iter_mut().skip(1) {
            if !slot.settle(cx) {
                break;
            }
        }
        for slot in &mut self.slots {
            match slot {
                Slot::Settled(settled) => {
                    if let (_, _, Ok(Confirmation::Ack(r) | Confirmation::Nack(r))) = &mut **settled
                    {
                        self.returns.extend(r.take());
                    }
                }
                Slot::Waiting(_) => break,
            }
        }
        let Some(Slot::Settled(settled)) = self.slots.pop_front() else {
            return Poll::Pending;
        };
        let (request, generation, mut result) = *settled;
        if let Ok(Confirmation::Ack(r) | Confirmation::Nack(r)) = &mut result
            && let Some(at) = self.returns.iter().position(|m| returns(m, &request))
        {
            *r = Some(self.returns.remove(at));
        }
        if self.slots.is_empty() {
            // No publish is left to own one.
            self.returns.clear();
        }
        Poll::Ready(Some((request, generation, result)))
    }
}

/// Whether `message` is `request` returned.
fn returns(message: &BasicReturnMessage, request: &Request) -> bool {
    let delivery = &message.delivery;
    delivery.exchange == request.exchange
        && delivery.routing_key == request.routing_key
        && delivery.data[..] == request.body[..]
}
