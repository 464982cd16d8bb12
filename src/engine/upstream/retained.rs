//! Retained messages upstream (DESIGN.md §3): every `set` is appended to the RabbitMQ stream
//! `amqp-gateway.retained` (confirmed before it counts), and every instance replays that stream
//! from its first offset into the same in-memory map, so `matching` answers locally and all
//! instances converge on the last message per key. A replayed copy of this instance's own
//! `set` never overwrites a newer local one — a local clear included: it stays in the map as a
//! tombstone until its own replay arrives, or the replay of an older set of the same key would
//! bring the cleared message back. The stream's retention bounds it (compaction of superseded
//! keys is later work: `docs/engine.md`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol_types::{AMQPValue, LongString, ShortString};
use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use parking_lot::RwLock;
use tokio::sync::Notify;

use super::convert;
use super::link::{Conns, Link};
use super::publisher::{Publisher, Request};
use crate::engine::retained::{RetainedMessage, RetainedStore, RetainedUndo};
use crate::engine::topic::pattern_matches;
use crate::engine::{EngineError, FieldValue, Message};

pub(super) const STREAM: &str = "amqp-gateway.retained";
const KEY: &str = "x-gateway-retained-key";
const AT: &str = "x-gateway-retained-at";
const ORIGIN: &str = "x-gateway-retained-origin";
const SEQ: &str = "x-gateway-retained-seq";

#[derive(Clone)]
struct Entry {
    message: Message,
    at_ms: u64,
    origin: Arc<str>,
    seq: u64,
}

impl Entry {
    /// A clear this instance made whose replay has not arrived yet (see the module docs).
    fn is_tombstone(&self) -> bool {
        self.message.body.is_empty()
    }

    fn expires_in(&self, now: u64) -> Option<Option<Duration>> {
        let Some(ttl) = self.message.properties.expiration.as_deref() else {
            return Some(None);
        };
        let ttl: u64 = ttl.parse().ok()?;
        let left = (self.at_ms + ttl).checked_sub(now)?;
        (left > 0).then_some(Some(Duration::from_millis(left)))
    }
}

struct Undo {
    previous: Option<Entry>,
    seq: u64,
}

pub(super) struct StreamRetained {
    map: RwLock<BTreeMap<String, Entry>>,
    publisher: Publisher,
    origin: Arc<str>,
    seq: std::sync::atomic::AtomicU64,
    caught_up: Notify,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl StreamRetained {
    /// Declares the stream, replays it and keeps following it; returns once the replay reached
    /// what was in the stream at the call (or after `catch_up` with a warning).
    pub(super) async fn start(
        shared: &super::Shared,
        origin: &str,
        max_bytes: u64,
        catch_up: Duration,
    ) -> Result<Arc<StreamRetained>, EngineError> {
        let (ch, consumer) = subscribe(shared.link.current()?, max_bytes, None).await?;
        let store = Arc::new(StreamRetained {
            map: RwLock::default(),
            publisher: Publisher::spawn(shared.link.clone()),
            origin: origin.into(),
            seq: Default::default(),
            caught_up: Notify::new(),
        });
        let link = shared.link.clone();
        tokio::spawn(follow(
            Arc::downgrade(&store),
            link,
            max_bytes,
            ch,
            consumer,
        ));
        // A marker appended now: once it is replayed, so is everything before it.
        let marker = store.next_seq();
        let waited = store.caught_up.notified();
        store.append("", Message::new(""), marker, 0).await?;
        if tokio::time::timeout(catch_up, waited).await.is_err() {
            tracing::warn!("retained messages still replaying; serving what has arrived");
        }
        Ok(store)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    async fn append(
        &self,
        key: &str,
        mut message: Message,
        seq: u64,
        at_ms: u64,
    ) -> Result<(), EngineError> {
        let h = &mut message.properties_mut().headers;
        h.insert(KEY, FieldValue::Str(key.into()));
        h.insert(AT, FieldValue::I64(at_ms as i64));
        h.insert(ORIGIN, FieldValue::Str(self.origin.as_ref().into()));
        h.insert(SEQ, FieldValue::I64(seq as i64));
        let (request, confirm) = Request::new(
            ShortString::from(""),
            ShortString::from(STREAM),
            message.body.clone(),
            convert::properties_to_amqp(&message.properties)?,
        );
        self.publisher.send(request);
        confirm.await.map(drop)
    }

    fn apply(&self, delivery: lapin::message::Delivery) {
        let mut message = Message {
            properties: convert::properties_from_amqp(&delivery.properties).into(),
            body: delivery.data.into(),
        };
        let h = &mut message.properties_mut().headers;
        let key = h.remove(KEY).and_then(|v| v.as_str().map(str::to_owned));
        let at_ms = h.remove(AT).and_then(|v| v.as_i128()).unwrap_or(0) as u64;
        let origin: Arc<str> = h
            .remove(ORIGIN)
            .and_then(|v| v.as_str().map(Into::into))
            .unwrap_or_else(|| "".into());
        let seq = h.remove(SEQ).and_then(|v| v.as_i128()).unwrap_or(0) as u64;
        // Added by the stream on delivery, not part of the message.
        h.remove("x-stream-offset");
        let Some(key) = key else { return };
        if key.is_empty() {
            if origin == self.origin {
                self.caught_up.notify_waiters();
            }
            return;
        }
        let mut map = self.map.write();
        if origin == self.origin
            && map
                .get(&key)
                .is_some_and(|e| e.origin == self.origin && e.seq > seq)
        {
            return;
        }
        if message.body.is_empty() {
            map.remove(&key);
        } else {
            map.insert(
                key,
                Entry {
                    message,
                    at_ms,
                    origin,
                    seq,
                },
            );
        }
    }
}

/// Declares the stream and consumes it from `after + 1`, or from its first offset.
async fn subscribe(
    conns: Arc<Conns>,
    max_bytes: u64,
    after: Option<i64>,
) -> Result<(lapin::Channel, lapin::Consumer), EngineError> {
    let about = convert::About::Queue(STREAM);
    let err = |e: lapin::Error| convert::engine_error(&e, about);
    let ch = conns.consuming_channel().await.map_err(err)?;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(max_bytes as i64),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(STREAM.into(), durable, args)
        .await
        .map_err(err)?;
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .map_err(err)?;
    let mut from = lapin::types::FieldTable::default();
    let offset = match after {
        Some(offset) => AMQPValue::LongLongInt(offset + 1),
        None => AMQPValue::LongString(LongString::from("first")),
    };
    from.insert("x-stream-offset".into(), offset);
    let consumer = ch
        .basic_consume(
            STREAM.into(),
            "".into(),
            BasicConsumeOptions::default(),
            from,
        )
        .await
        .map_err(err)?;
    Ok((ch, consumer))
}

/// Applies the stream for as long as the store lives, resuming after the last offset applied
/// when the connection comes back: what other instances retained meanwhile arrives then.
async fn follow(
    store: std::sync::Weak<StreamRetained>,
    link: Arc<Link>,
    max_bytes: u64,
    mut ch: lapin::Channel,
    mut consumer: lapin::Consumer,
) {
    let mut last: Option<i64> = None;
    loop {
        while let Some(Ok(delivery)) = consumer.next().await {
            let Some(store) = store.upgrade() else { return };
            let tag = delivery.delivery_tag;
            if let Some(offset) = stream_offset(&delivery) {
                last = Some(offset);
            }
            store.apply(delivery);
            if ch
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = ch.close(200, "OK".into()).await;
        let wanted = || store.strong_count() > 0;
        let resubscribe = |conns| subscribe(conns, max_bytes, last);
        let Some((c, k)) = link.retry(wanted, resubscribe).await else {
            return;
        };
        (ch, consumer) = (c, k);
    }
}

fn stream_offset(delivery: &lapin::message::Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        _ => None,
    }
}

#[async_trait]
impl RetainedStore for StreamRetained {
    async fn set(&self, routing_key: &str, message: Message) -> Result<RetainedUndo, EngineError> {
        let seq = self.next_seq();
        let at_ms = now_ms();
        let entry = Entry {
            message: message.clone(),
            at_ms,
            origin: self.origin.clone(),
            seq,
        };
        let previous = self
            .map
            .write()
            .insert(routing_key.to_owned(), entry)
            .filter(|e| !e.is_tombstone());
        self.append(routing_key, message, seq, at_ms).await?;
        Ok(RetainedUndo::new(Undo { previous, seq }))
    }

    async fn undo(&self, routing_key: &str, undo: RetainedUndo) {
        let Some(undo) = undo.into_inner::<Undo>() else {
            return;
        };
        let current_seq = self
            .map
            .read()
            .get(routing_key)
            .map(|e| (e.origin.clone(), e.seq));
        let ours = match &current_seq {
            Some((origin, seq)) => *origin == self.origin && *seq == undo.seq,
            None => true,
        };
        if !ours {
            return;
        }
        let (message, at_ms) = match &undo.previous {
            Some(e) => (e.message.clone(), e.at_ms),
            None => (Message::new(""), now_ms()),
        };
        let seq = self.next_seq();
        let restored = Entry {
            message: message.clone(),
            at_ms,
            origin: self.origin.clone(),
            seq,
        };
        self.map.write().insert(routing_key.to_owned(), restored);
        if let Err(e) = self.append(routing_key, message, seq, at_ms).await {
            tracing::warn!(error = %e, "retained undo not appended upstream");
        }
    }

    fn matching(&self, pattern: &str) -> Vec<RetainedMessage> {
        let now = now_ms();
        self.map
            .read()
            .iter()
            .filter(|(key, e)| !e.is_tombstone() && pattern_matches(pattern, key))
            .filter_map(|(key, e)| {
                Some(RetainedMessage {
                    routing_key: key.clone(),
                    message: e.message.clone(),
                    expires_in: e.expires_in(now)?,
                })
            })
            .collect()
    }
}
