//! The `basic` class but publish: consumers (`qos`, `consume`, `cancel`), deliveries, `get`,
//! and acknowledgements. Delivery tags on the wire are the channel's own sequence in the order
//! the client receives deliveries, across all its consumers and gets, mapped to the engine's
//! tags — so `ack(n, multiple)` never settles a delivery the client has not seen.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::ShortString;

use super::error::{Fault, NOT_ALLOWED, NOT_FOUND, NOT_IMPLEMENTED, PRECONDITION_FAILED};
use super::frame;
use super::session::Session;
use crate::engine::wire::properties_to_amqp;
use crate::engine::{AckMode, CancelReason, ConsumeOptions, ConsumerEvent, Delivery, OnCancel};

/// How a consumer acknowledges.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub no_ack: bool,
    /// Its `basic.qos` prefetch (0: unlimited).
    pub prefetch: u16,
}

/// A delivery the client must ack: its tag on the wire and in the engine.
#[derive(Debug, Clone, Copy)]
pub struct Unacked {
    pub wire: u64,
    pub engine: u64,
}

impl Session {
    pub(super) async fn basic_method(
        &mut self,
        c: u16,
        m: basic::AMQPMethod,
        method: (u16, u16),
    ) -> Result<(), Fault> {
        match m {
            basic::AMQPMethod::Publish(p) => self.start_publish(c, p),
            basic::AMQPMethod::Qos(q) => {
                let chan = self.chan(c)?;
                if q.global {
                    chan.global_prefetch = q.prefetch_count;
                } else {
                    chan.prefetch = q.prefetch_count;
                }
                self.release_held(c);
                self.method_frame(
                    c,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Consume(consume) => self.consume(c, consume, method).await,
            basic::AMQPMethod::Cancel(cancel) => {
                let tag: Arc<str> = cancel.consumer_tag.as_str().into();
                if self.chan(c)?.consumers.remove(&tag).is_some() {
                    let engine = self.chan(c)?.engine.clone();
                    // Deliveries it sent stay on the channel to be acked (AMQP basic.cancel).
                    engine
                        .cancel(&tag, OnCancel::KeepUnacked)
                        .await
                        .map_err(|e| Fault::engine(&e, method))?;
                    self.consumers.remove(&(c, tag.clone()));
                    self.held.retain(|(k, _)| *k != (c, tag.clone()));
                    self.show_subscriptions();
                }
                if !cancel.nowait {
                    self.method_frame(
                        c,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: cancel.consumer_tag,
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(get) => self.get(c, get, method).await,
            basic::AMQPMethod::Ack(a) => {
                self.settle(c, a.delivery_tag, a.multiple, None, method)
                    .await
            }
            basic::AMQPMethod::Nack(n) => {
                self.settle(c, n.delivery_tag, n.multiple, Some(n.requeue), method)
                    .await
            }
            basic::AMQPMethod::Reject(r) => {
                self.settle(c, r.delivery_tag, false, Some(r.requeue), method)
                    .await
            }
            basic::AMQPMethod::Recover(r) => {
                self.recover(c, r.requeue, method).await?;
                self.method_frame(
                    c,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(r) => self.recover(c, r.requeue, method).await,
            _ => Err(Fault::connection(
                super::error::COMMAND_INVALID,
                "a basic method the server does not accept from clients",
                method,
            )),
        }
    }

    pub(super) fn chan(&mut self, c: u16) -> Result<&mut super::session::Chan, Fault> {
        self.channels.get_mut(&c).ok_or_else(|| {
            Fault::connection(
                super::error::CHANNEL_ERROR,
                format!("channel {c} is not open"),
                (0, 0),
            )
        })
    }

    /// The queue a method names: AMQP's empty name is the channel's last declared queue.
    pub(super) fn queue_name(
        &mut self,
        c: u16,
        name: &str,
        method: (u16, u16),
    ) -> Result<String, Fault> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        self.chan(c)?.last_queue.clone().ok_or_else(|| {
            Fault::channel(
                NOT_FOUND,
                "no queue named and none declared on this channel",
                method,
            )
        })
    }

    pub(super) fn may_use_queue(&self, queue: &str) -> bool {
        self.owned.contains(queue) || self.principal.permissions.can_consume(queue)
    }

    async fn consume(
        &mut self,
        c: u16,
        consume: basic::Consume,
        method: (u16, u16),
    ) -> Result<(), Fault> {
        let queue = self.queue_name(c, consume.queue.as_str(), method)?;
        if !self.may_use_queue(&queue) {
            return Err(Fault::forbidden(
                format!("consume from queue '{queue}'"),
                method,
            ));
        }
        let chan = self.chan(c)?;
        let tag = consume.consumer_tag.as_str();
        if !tag.is_empty() && chan.consumers.contains_key(tag) {
            return Err(Fault::connection(
                NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
                method,
            ));
        }
        let mode = Mode {
            no_ack: consume.no_ack,
            prefetch: chan.prefetch,
        };
        let ack = if consume.no_ack {
            AckMode::Auto
        } else {
            // Zero is unlimited: the engine's largest credit, bounded in practice by the
            // connection's write buffer (DESIGN.md §2).
            AckMode::Manual {
                prefetch: if mode.prefetch == 0 {
                    u16::MAX
                } else {
                    mode.prefetch
                },
            }
        };
        let options = ConsumeOptions {
            consumer_tag: tag.to_owned(),
            ack,
            exclusive: consume.exclusive,
            arguments: crate::engine::table::wire::from_amqp(&consume.arguments),
            pressure: None,
        };
        let consumer = chan
            .engine
            .consume(&queue, options)
            .await
            .map_err(|e| Fault::engine(&e, method))?;
        let tag: Arc<str> = consumer.tag().into();
        chan.consumers.insert(tag.clone(), mode);
        if !consume.nowait {
            self.method_frame(
                c,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: ShortString::from(&*tag),
                })),
            );
        }
        self.consumers.insert((c, tag), consumer);
        self.hold_if_full(c);
        self.show_subscriptions();
        Ok(())
    }

    /// One event of a consumer: a delivery written out, or its end told to the client.
    pub async fn deliver(&mut self, key: (u16, Arc<str>), event: ConsumerEvent) {
        let (c, tag) = key;
        match event {
            ConsumerEvent::Delivery(d) => {
                let Some(chan) = self.channels.get_mut(&c) else {
                    return;
                };
                let no_ack = chan.consumers.get(&tag).is_none_or(|m| m.no_ack);
                let Some((exchange, routing_key)) = self.representable(c, &d, no_ack).await else {
                    return;
                };
                let wire = self.next_tag(c, &d, no_ack);
                let class = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: ShortString::from(&*tag),
                    delivery_tag: wire,
                    redelivered: d.redelivered,
                    exchange,
                    routing_key,
                }));
                self.method_frame(c, class);
                self.write_content(c, &d);
                crate::metrics::messages_out(super::PROTOCOL, 1);
                self.hold_if_full(c);
            }
            ConsumerEvent::Ended(reason) => {
                self.consumers.remove(&(c, tag.clone()));
                let Some(chan) = self.channels.get_mut(&c) else {
                    return;
                };
                chan.consumers.remove(&tag);
                if !matches!(reason, None | Some(CancelReason::Cancelled))
                    && self.caps.consumer_cancel_notify
                {
                    self.method_frame(
                        c,
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: ShortString::from(&*tag),
                            nowait: true,
                        })),
                    );
                }
                self.show_subscriptions();
            }
        }
    }

    /// The exchange and routing key as AMQP short strings. Other protocols allow longer routing
    /// keys (an MQTT topic, a REST key) than AMQP can carry: such a message cannot reach an
    /// AMQP client, so it is settled as rejected (dead-lettered where the queue says so) and
    /// counted, never left to be redelivered forever.
    async fn representable(
        &mut self,
        c: u16,
        d: &Delivery,
        no_ack: bool,
    ) -> Option<(ShortString, ShortString)> {
        if let (Ok(exchange), Ok(key)) = (
            ShortString::try_new(d.exchange()),
            ShortString::try_new(d.routing_key()),
        ) {
            return Some((exchange, key));
        }
        tracing::warn!(
            remote = %self.conn.remote,
            bytes = d.routing_key().len(),
            "a routing key over AMQP's 255 bytes cannot be delivered to an AMQP client; rejected"
        );
        crate::metrics::delivery_dropped(super::PROTOCOL, "unrepresentable");
        if !no_ack && let Some(chan) = self.channels.get(&c) {
            let _ = chan.engine.nack(d.delivery_tag, false, false).await;
        }
        None
    }

    /// The next wire tag of channel `c`, remembered against the engine's unless no-ack.
    fn next_tag(&mut self, c: u16, d: &Delivery, no_ack: bool) -> u64 {
        let Some(chan) = self.channels.get_mut(&c) else {
            return 0;
        };
        chan.last_tag += 1;
        if !no_ack {
            chan.unacked.push_back(Unacked {
                wire: chan.last_tag,
                engine: d.delivery_tag,
            });
        }
        chan.last_tag
    }

    fn write_content(&mut self, c: u16, d: &Delivery) {
        let properties = properties_to_amqp(d.properties()).unwrap_or_else(|e| {
            // Another protocol's message with a property AMQP cannot carry (a short string
            // over 255 bytes): the body still goes out.
            tracing::debug!(error = %e, "message properties not representable in AMQP");
            Default::default()
        });
        frame::content(&mut self.out, c, properties, d.body(), self.frame_max);
    }

    async fn get(&mut self, c: u16, get: basic::Get, method: (u16, u16)) -> Result<(), Fault> {
        let queue = self.queue_name(c, get.queue.as_str(), method)?;
        if !self.may_use_queue(&queue) {
            return Err(Fault::forbidden(
                format!("get from queue '{queue}'"),
                method,
            ));
        }
        let engine = self.chan(c)?.engine.clone();
        let (d, exchange, routing_key) = loop {
            let got = engine
                .get(&queue, get.no_ack)
                .await
                .map_err(|e| Fault::engine(&e, method))?;
            let Some(d) = got else {
                self.method_frame(
                    c,
                    AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                );
                return Ok(());
            };
            if let Some((exchange, key)) = self.representable(c, &d, get.no_ack).await {
                break (d, exchange, key);
            }
        };
        let wire = self.next_tag(c, &d, get.no_ack);
        let class = AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: wire,
            redelivered: d.redelivered,
            exchange,
            routing_key,
            message_count: d.message_count.unwrap_or(0).min(u64::from(u32::MAX)) as u32,
        }));
        self.method_frame(c, class);
        self.write_content(c, &d);
        crate::metrics::messages_out(super::PROTOCOL, 1);
        Ok(())
    }

    /// ack (`requeue` None), nack or reject. Tag 0 with `multiple` means every unacked one.
    async fn settle(
        &mut self,
        c: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
        method: (u16, u16),
    ) -> Result<(), Fault> {
        let chan = self.chan(c)?;
        let settled: Vec<Unacked> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            let n = chan.unacked.partition_point(|u| u.wire <= upto);
            if n == 0 && tag != 0 {
                return Err(unknown_tag(tag, method));
            }
            chan.unacked.drain(..n).collect()
        } else {
            match chan.unacked.binary_search_by_key(&tag, |u| u.wire) {
                Ok(i) => chan.unacked.remove(i).into_iter().collect(),
                Err(_) => return Err(unknown_tag(tag, method)),
            }
        };
        let engine = chan.engine.clone();
        for u in settled {
            let result = match requeue {
                None => engine.ack(u.engine, false).await,
                Some(requeue) => engine.nack(u.engine, false, requeue).await,
            };
            result.map_err(|e| Fault::engine(&e, method))?;
        }
        self.release_held(c);
        Ok(())
    }

    /// `basic.recover`: every unacked delivery of the channel back to its queue. Redelivering
    /// to the same consumer (`requeue = false`) is not supported, as in RabbitMQ.
    async fn recover(&mut self, c: u16, requeue: bool, method: (u16, u16)) -> Result<(), Fault> {
        if !requeue {
            return Err(Fault::connection(
                NOT_IMPLEMENTED,
                "basic.recover requeue=false",
                method,
            ));
        }
        let chan = self.chan(c)?;
        let all: Vec<Unacked> = chan.unacked.drain(..).collect();
        let engine = chan.engine.clone();
        for u in all {
            engine
                .nack(u.engine, false, true)
                .await
                .map_err(|e| Fault::engine(&e, method))?;
        }
        self.release_held(c);
        Ok(())
    }

    /// A channel at its global prefetch stops being polled (its consumers are held aside).
    fn hold_if_full(&mut self, c: u16) {
        let Some(chan) = self.channels.get(&c) else {
            return;
        };
        if chan.global_prefetch == 0 || chan.unacked.len() < usize::from(chan.global_prefetch) {
            return;
        }
        let manual: Vec<Arc<str>> = chan
            .consumers
            .iter()
            .filter(|(_, m)| !m.no_ack)
            .map(|(t, _)| t.clone())
            .collect();
        for tag in manual {
            let key = (c, tag);
            if let Some(consumer) = self.consumers.remove(&key) {
                self.held.push((key, consumer));
            }
        }
    }

    /// Acks made room (or the prefetch changed): held consumers are polled again.
    fn release_held(&mut self, c: u16) {
        let Some(chan) = self.channels.get(&c) else {
            return;
        };
        if chan.global_prefetch != 0 && chan.unacked.len() >= usize::from(chan.global_prefetch) {
            return;
        }
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0.0 == c {
                let (key, consumer) = self.held.swap_remove(i);
                self.consumers.insert(key, consumer);
            } else {
                i += 1;
            }
        }
    }
}

fn unknown_tag(tag: u64, method: (u16, u16)) -> Fault {
    Fault::channel(
        PRECONDITION_FAILED,
        format!("unknown delivery tag {tag}"),
        method,
    )
}
