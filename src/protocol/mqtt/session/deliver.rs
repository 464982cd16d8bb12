//! Outbound deliveries: per-copy QoS, no-local, retain-as-published, subscription identifiers,
//! MQTT 5 properties, outbound topic aliases, packet-id tracking, retained messages on
//! subscribe.

use super::*;
use crate::engine::names::DEFAULT_EXCHANGE;

/// Deliveries handled per turn of the connection's task, at most.
const DRAIN_BATCH: usize = 512;

/// The topic name of a delivery's routing key (one [`topic::key_is_mappable`] said yes to),
/// mapped as it is written.
fn topic_of(d: &Delivery, mapping: crate::config::TopicMapping) -> TopicName {
    TopicName::of_key(d.envelope.envelope().routing_key.clone(), mapping)
}

/// The publish QoS of the batch's last message, told by its properties: a publisher's
/// messages share theirs ([`Message::properties`]), so the QoS found once is given again while
/// they are the same. Looking it up among the headers was about 90 instructions a delivery,
/// every copy of a fanned-out message included (callgrind). The properties are held, not only
/// their address, which a freed one's successor could take; only shared ones are kept (one no
/// other message holds will not come again).
#[derive(Default)]
struct LastQos(Option<(Arc<crate::engine::Properties>, u8)>);

impl LastQos {
    fn of(&mut self, m: &crate::engine::Message) -> u8 {
        if let Some((properties, qos)) = &self.0
            && Arc::ptr_eq(properties, &m.properties)
        {
            return *qos;
        }
        let qos = publish_qos_of(m);
        if Arc::strong_count(&m.properties) > 1 {
            self.0 = Some((m.properties.clone(), qos));
        }
        qos
    }
}

impl Session {
    // ---------- deliveries ----------

    /// The packet id for the next QoS 1/2 PUBLISH: the one after the last handed out, past
    /// those still in flight. `None` (counted, the copy not sent) only with all 65,535 in
    /// flight, which the window (at most 65,535, [`Self::window_held`]) should never let
    /// happen: bounded all the same, since this once looked for a free id forever (retained
    /// messages were sent past the window), holding its worker thread.
    fn next_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.outflow.next_packet_id;
            self.outflow.next_packet_id = id.checked_add(1).unwrap_or(1);
            if !self.outflow.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        metrics::refusal(PROTOCOL, "no_packet_id");
        None
    }

    /// The packet id a redelivered QoS 2 copy went with before the session's last connection
    /// ended, if the client may hold it under that id ([`inflight`]).
    fn resent_id(&mut self, qos: u8, from: Option<&Delivery>) -> Option<u16> {
        let d = from.filter(|d| qos == 2 && d.redelivered)?;
        if !self.outflow.inflight.reserving() {
            return None;
        }
        self.outflow
            .inflight
            .take_reserved(inflight::fingerprint(d))
    }

    /// Remembers an outbound QoS 1/2 delivery under `packet_id` until its acknowledgement; a
    /// QoS 2 one with its message's fingerprint, should the connection end before PUBREC.
    fn track(&mut self, packet_id: u16, qos: u8, from: Option<&Delivery>) {
        let tag = from.map(|d| d.delivery_tag);
        match from {
            Some(d) if qos == 2 => {
                let print = inflight::fingerprint(d);
                self.outflow.inflight.sent(packet_id, tag, print);
            }
            _ if qos == 2 => self.outflow.inflight.insert(packet_id, Inflight::Sent(tag)),
            _ => self
                .outflow
                .inflight
                .insert(packet_id, Inflight::AtLeastOnce(tag)),
        }
    }

    /// The outbound topic alias for `topic` (MQTT 5, within the client's Topic Alias Maximum):
    /// the one it already has, or a new one while fewer than the maximum are in use (`true`:
    /// this packet sets it up). `None`: the topic goes in full.
    fn alias_for(&self, topic: &str) -> Option<(u16, bool)> {
        if self.client.version != Version::V5 || self.client.alias_max == 0 {
            return None;
        }
        let aliases = self.outflow.aliases.as_deref();
        if let Some(alias) = aliases.and_then(|a| a.get(topic)) {
            return Some((*alias, false));
        }
        let used = u16::try_from(aliases.map_or(0, HashMap::len)).unwrap_or(u16::MAX);
        (used < self.client.alias_max).then_some((used + 1, true))
    }

    /// Handles `d`, then the deliveries already waiting, up to `DRAIN_BATCH` in one turn and
    /// outside tokio's cooperative budget. Draining frees the engine's memory while publishing
    /// adds to it, so a subscriber must not be held to one connection's share of the scheduler:
    /// with 50 publishers flat out to one subscriber it would get 1/51 of the turns and its
    /// queue would only grow.
    pub async fn deliver_batch(&mut self, key: Arc<str>, event: ConsumerEvent) -> Outcome {
        use futures_util::FutureExt;
        use tokio_stream::StreamExt;
        let (mut last, mut qos) = (LastVerdict::default(), LastQos::default());
        let mut outcome = self.deliver(key, event, &mut last, &mut qos).await;
        for _ in 1..DRAIN_BATCH {
            if !matches!(outcome, Outcome::Continue)
                || self.outflow.qos0_out.paces()
                || self.window_held()
            {
                break;
            }
            let waiting = tokio::task::unconstrained(self.consumers.next()).now_or_never();
            let Some(Some((key, event))) = waiting else {
                break;
            };
            outcome = self.deliver(key, event, &mut last, &mut qos).await;
        }
        outcome
    }

    /// The QoS 0 buffer's gauge while it paces publishers: the session takes no deliveries
    /// until it stops (below its low-water mark, or marked slow), so what its publishers sent
    /// before they were paced waits in the engine's queue instead of overflowing the buffer
    /// (DESIGN.md §7).
    pub fn delivery_paused(&self) -> Option<Pressure> {
        let gauge = &self.outflow.qos0_out;
        gauge.paces().then(|| gauge.clone())
    }

    /// Whether the client's window is full with QoS 2 deliveries awaiting PUBCOMP among them.
    /// The engine's credit stops deliveries at the window, but counts a QoS 2 one only until
    /// PUBREC, where it is settled; the client's Receive Maximum counts it until PUBCOMP
    /// ([MQTT-4.9.0-2]). So while this holds the session takes no deliveries (QoS 0 ones
    /// wait too, in the engine's queue), and a client that keeps its PUBCOMPs gets no more.
    pub fn window_held(&self) -> bool {
        let inflight = &self.outflow.inflight;
        inflight.len() >= usize::from(self.outflow.inflight_max) && inflight.released() > 0
    }

    /// A delivery from the queue of `level`, or the end of its consumer.
    /// `last`: the verdict on the batch's last routing key ([`LastVerdict`]); `last_qos`: its
    /// last message's publish QoS ([`LastQos`]).
    async fn deliver(
        &mut self,
        key: Arc<str>,
        event: ConsumerEvent,
        last: &mut LastVerdict,
        last_qos: &mut LastQos,
    ) -> Outcome {
        let ConsumerEvent::Delivery(d) = event else {
            tracing::info!(client = %self.client.id, queue = %key, "a session queue went away");
            return Outcome::Close(CloseReason::SessionQueueGone);
        };
        let level = match &*key {
            "0" => 0,
            "1" => 1,
            shared => return self.deliver_shared(shared, d).await,
        };
        // The session queue gives back what the last connection left unacknowledged first:
        // a message that was not delivered before means no id kept for one is asked for.
        if level == 1 && !d.redelivered {
            self.outflow.inflight.free_reserved();
        }
        // A retained message queued for a new subscription: its routing key is the queue's
        // name, which only the default exchange routes by.
        if level == 1
            && d.routing_key().starts_with(topic::SESSION_QUEUE_PREFIX)
            && d.properties().headers.get(RETAINED_FOR_HEADER).is_some()
        {
            return self.deliver_retained(d).await;
        }
        // Filters are matched against the routing key as the topic name it maps to; the name
        // itself is made only for a copy that is encoded (a fanned-out message's other copies
        // share the first one's bytes).
        let mapping = self.ctx.config.mqtt.topic_mapping;
        let verdict = self
            .subs
            .verdict(&d.envelope.envelope().routing_key, level, mapping, last);
        let publish_qos = last_qos.of(d.message());
        let matched = match verdict {
            Verdict::Matched(matched) => Ok(matched),
            Verdict::Invisible => Err("unmappable_topic"),
            // Not for this client any more (unsubscribed, or refused on resume).
            Verdict::Unsubscribed => Err("unsubscribed"),
        };
        let matched = match matched {
            Ok(matched) => matched,
            Err(reason) => {
                metrics::refusal(PROTOCOL, reason);
                if level == 1 {
                    let _ = self.channel().ack(d.delivery_tag, false).await;
                }
                return Outcome::Continue;
            }
        };
        // Each header is looked up only when a subscription's option asks about it: a lookup
        // is a binary search comparing strings, and most subscriptions ask about neither.
        let headers = &d.properties().headers;
        // No-local suppresses the copy only when every matching subscription asked for it.
        if !matched.is_empty()
            && matched.iter().all(|o| o.no_local)
            && headers.get(ORIGIN_HEADER).and_then(FieldValue::as_str) == Some(&*self.life.key)
        {
            if level == 1 {
                let _ = self.channel().ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        }
        let retain = matched.iter().any(|o| o.retain_as_published)
            && matches!(headers.get(RETAIN_HEADER), Some(FieldValue::Bool(true)));
        let subscription_ids: Vec<u32> = matched
            .iter()
            .filter_map(|o| o.id)
            .map(NonZeroU32::get)
            .collect();
        // Per copy: min(publish QoS, the highest QoS granted to a matching subscription).
        let cap = if level == 0 {
            0
        } else {
            matched.iter().map(|o| o.granted).max().unwrap_or(1)
        };
        let qos = publish_qos.min(cap);
        if qos == 0
            && !retain
            && self.client.version == Version::V3
            && self.client.max_packet.is_none()
            && let Some(shared) = d.envelope.rendering()
            // The first copy takes the path below; from the second on, one encoding is shared.
            && shared
                .mqtt_sent
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            let frame = shared
                .mqtt
                .get_or_init(|| encode_shared_publish(topic_of(&d, mapping), d.body().clone()));
            self.emit_encoded(frame.clone(), d.body().len());
            if level == 1 {
                let _ = self.channel().ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        }
        let mut props = self.props_of(d.properties(), d.expires_in);
        self.identify(&mut props, subscription_ids);
        let topic = topic_of(&d, mapping);
        self.send_copy(&d, topic, qos, retain, props, level == 1)
            .await
    }

    /// Gives an MQTT 5 copy the identifiers of the subscriptions it matched.
    fn identify(&self, props: &mut Option<Box<PublishProps>>, ids: Vec<u32>) {
        if self.client.version == Version::V5 && !ids.is_empty() {
            props.get_or_insert_default().subscription_ids = ids;
        }
    }

    /// Whether a QoS 0 copy of `payload` bytes would overflow the client's QoS 0 bound: it is
    /// then dropped and counted. Only a consumer its publishers gave up waiting for gets here
    /// (DESIGN.md §7).
    fn qos0_overflows(&mut self, payload: u64) -> bool {
        if !self.outflow.qos0_out.is_full(payload) {
            return false;
        }
        metrics::delivery_dropped(PROTOCOL, "slow_consumer");
        self.outflow.qos0_out.count_drop();
        true
    }

    /// [`Self::emit`] for a 3.1.1 QoS 0 PUBLISH encoded once for every subscriber: 3.1.1 has
    /// no topic aliases and no Maximum Packet Size, so only the QoS 0 bound applies.
    fn emit_encoded(&mut self, frame: bytes::Bytes, payload: usize) {
        let payload = payload as u64;
        if self.qos0_overflows(payload) {
            return;
        }
        self.outflow.qos0_out.add(payload);
        self.send(Outbound::Encoded { frame, payload });
        metrics::messages_out(PROTOCOL, 1);
    }

    /// A delivery from a shared subscription's queue: at most the granted QoS, no retained
    /// flag, its own subscription identifier.
    pub(super) async fn deliver_shared(&mut self, filter: &str, d: Delivery) -> Outcome {
        let Some(opts) = self.subs.get(filter).copied() else {
            let _ = self.channel().nack(d.delivery_tag, false, true).await;
            return Outcome::Continue;
        };
        if !topic::key_is_mappable(d.routing_key()) {
            metrics::refusal(PROTOCOL, "unmappable_topic");
            let _ = self.channel().ack(d.delivery_tag, false).await;
            return Outcome::Continue;
        }
        let topic = topic_of(&d, self.ctx.config.mqtt.topic_mapping);
        let publish_qos = publish_qos_of(d.message());
        let qos = publish_qos.min(opts.granted);
        let mut props = self.props_of(d.properties(), d.expires_in);
        self.identify(
            &mut props,
            opts.id.map(NonZeroU32::get).into_iter().collect(),
        );
        self.send_copy(&d, topic, qos, false, props, true).await
    }

    /// Sends one copy of a delivery. `settle` says the engine awaits an ack for it (every queue
    /// but the QoS 0 one): a QoS 0 copy is settled as it is sent, a QoS 1/2 one when the client
    /// acknowledges, and one that is not sent (over the client's Maximum Packet Size, or over
    /// the QoS 0 bound) is acked, dropped and counted (DESIGN.md §3).
    async fn send_copy(
        &mut self,
        d: &Delivery,
        topic: TopicName,
        qos: u8,
        retain: bool,
        props: Option<Box<PublishProps>>,
        settle: bool,
    ) -> Outcome {
        let sent = self.emit(topic, qos, retain, d.body().clone(), props, Some(d));
        // A QoS 1/2 copy sent is settled at its acknowledgement.
        if settle && !(sent && qos >= 1) {
            let _ = self.channel().ack(d.delivery_tag, false).await;
        }
        Outcome::Continue
    }

    /// Queues a PUBLISH for the writer; false when it was dropped (and counted). Every outbound
    /// PUBLISH goes through here:
    /// - a QoS 1/2 one takes the next packet id, and is tracked under it with the tag of the
    ///   engine's delivery `from` until the client acknowledges it (one that is not sent leaves
    ///   its id unused); one the engine delivered before (the client went without
    ///   acknowledging it) goes with DUP=1 ([MQTT-3.3.1-1]);
    /// - the writer counts each QoS 0 one it takes off `qos0_queued`, so a slow client's QoS 0
    ///   backlog is bounded by `limits.outbound_buffer_messages` (QoS 1/2 by credit);
    /// - outbound topic aliases are set up here, and only for packets that go out, so the
    ///   client never sees an alias it was not given;
    /// - the client's Maximum Packet Size is checked against the exact encoded size, so a
    ///   packet that fits to the byte is delivered ([MQTT-3.1.2-24]).
    fn emit(
        &mut self,
        topic: TopicName,
        qos: u8,
        retain: bool,
        payload: bytes::Bytes,
        mut props: Option<Box<PublishProps>>,
        from: Option<&Delivery>,
    ) -> bool {
        let packet_id = match qos {
            0 => None,
            _ => match self.resent_id(qos, from).or_else(|| self.next_packet_id()) {
                Some(id) => Some(id),
                None => return false,
            },
        };
        if qos == 0 && self.qos0_overflows(payload.len() as u64) {
            return false;
        }
        // Aliases are kept by name: only a client that takes them has the name made whole.
        let (topic, alias) = if self.client.version == Version::V5 && self.client.alias_max > 0 {
            let name = topic.into_string();
            let alias = self.alias_for(&name);
            (TopicName::Made(name), alias)
        } else {
            (topic, None)
        };
        // `props_of` never sets an alias: only this one goes out.
        if let Some((a, _)) = alias {
            props.get_or_insert_default().topic_alias = Some(a);
        }
        let wire_topic = match alias {
            Some((_, false)) => TopicName::Made(String::new()),
            _ => topic,
        };
        if let Some(max) = self.client.max_packet {
            let size = super::super::codec::publish_size(
                self.client.version,
                &wire_topic,
                qos,
                payload.len(),
                props.as_deref(),
            );
            if size > max.get() as usize {
                metrics::refusal(PROTOCOL, "packet_too_large");
                return false;
            }
        }
        if let Some((a, true)) = alias {
            self.outflow
                .aliases
                .get_or_insert_default()
                .insert(wire_topic.clone().into_string(), a);
        }
        if qos == 0 {
            self.outflow.qos0_out.add(payload.len() as u64);
        }
        self.send(Outbound::Publish {
            topic: wire_topic,
            qos,
            retain,
            dup: packet_id.is_some() && from.is_some_and(|d| d.redelivered),
            packet_id,
            payload,
            props,
        });
        metrics::messages_out(PROTOCOL, 1);
        if let Some(id) = packet_id {
            self.track(id, qos, from);
        }
        true
    }

    /// Sends the retained messages matching a new subscription, RETAIN=1, at most `granted` and
    /// at most the QoS each was published with, each with the properties it was published with
    /// (expiry counted down) and the subscription's identifier.
    ///
    /// A QoS 0 copy goes out at once while the QoS 0 buffer has room. Every other copy (QoS 1/2,
    /// or QoS 0 past that room) is queued on the session's QoS 1 queue, made for it if the
    /// session had none, like any other delivery: a QoS 1/2 one waits for the client's Receive
    /// Maximum there ([MQTT-4.9.0-2]), is redelivered if the client goes before acknowledging
    /// it, and stays with a persistent session; a QoS 0 one goes out as the buffer drains.
    /// Sent at once, a large match went past the window (and past every packet id at 65,535),
    /// and QoS 0 copies past `limits.outbound_buffer_messages` were dropped, where Mosquitto
    /// sends every one.
    pub(super) async fn send_retained(&mut self, filter: &str, granted: u8) {
        let mapping = self.ctx.config.mqtt.topic_mapping;
        let Ok(pattern) = filter_to_binding(filter, mapping) else {
            return;
        };
        let id = self.subs.get(filter).and_then(|o| o.id);
        let queue = self.queue_name(1);
        let mut queued = Vec::new();
        // Whether the QoS 1 queue is there: a subscription of QoS 1/2 made it; `None` until a
        // QoS 0 session's first queued copy tries to make it.
        let mut queue_open = (granted > 0).then_some(true);
        for m in self.retained().matching(&pattern) {
            let Some(topic) = retained_topic(filter, &m.routing_key, mapping) else {
                continue;
            };
            let qos = publish_qos_of(&m.message).min(granted);
            if qos == 0 && !self.outflow.qos0_out.is_full(m.message.body.len() as u64) {
                let mut props = self.props_of(&m.message.properties, m.expires_in);
                self.identify(&mut props, id.map(NonZeroU32::get).into_iter().collect());
                // No queue holds it: nothing to settle, no tag.
                self.emit(topic.into(), 0, true, m.message.body.clone(), props, None);
                continue;
            }
            let open = match queue_open {
                Some(open) => open,
                None => {
                    let made = self.open_queue(1).await;
                    if let Err(e) = &made {
                        tracing::warn!(client = %self.client.id, error = %e, "no queue for retained messages");
                    }
                    *queue_open.insert(made.is_ok())
                }
            };
            if !open {
                metrics::refusal(PROTOCOL, "retained_not_queued");
                continue;
            }
            let copy = queued_retained(m, filter);
            let options = PublishOptions { mandatory: true };
            queued.push(
                self.channel()
                    .publish(DEFAULT_EXCHANGE, &queue, copy, options),
            );
        }
        // Their places in the queue are fixed: the confirms only tell which were refused.
        for confirm in queued {
            if !matches!(confirm.await, Ok(o) if o.routed) {
                metrics::refusal(PROTOCOL, "retained_not_queued");
            }
        }
    }

    /// A retained message [`Self::send_retained`] queued: sent under the topic it was retained
    /// under, with RETAIN, at most its subscription's granted QoS and with its identifier, if
    /// that subscription still stands and matches the topic. The headers say which: one that
    /// does not (the subscription went, or a publisher with access to the default exchange
    /// wrote them) is acked and counted, so nothing reaches the client that none of its
    /// subscriptions asked for.
    async fn deliver_retained(&mut self, d: Delivery) -> Outcome {
        let mapping = self.ctx.config.mqtt.topic_mapping;
        let headers = &d.properties().headers;
        let text = |name| headers.get(name).and_then(FieldValue::as_str);
        let found = text(RETAINED_FOR_HEADER)
            .zip(text(RETAINED_KEY_HEADER))
            .and_then(|(filter, key)| {
                let opts = *self.subs.get(filter)?;
                Some((opts, retained_topic(filter, key, mapping)?))
            });
        let Some((opts, topic)) = found else {
            metrics::refusal(PROTOCOL, "unsubscribed");
            let _ = self.channel().ack(d.delivery_tag, false).await;
            return Outcome::Continue;
        };
        let qos = publish_qos_of(d.message()).min(opts.granted);
        let mut props = self.props_of(d.properties(), d.expires_in);
        self.identify(
            &mut props,
            opts.id.map(NonZeroU32::get).into_iter().collect(),
        );
        self.send_copy(&d, topic.into(), qos, true, props, true)
            .await
    }
}

/// The topic name of a retained message's routing key, if `filter` matches it: `$` topics do
/// not match filters that start with a wildcard ([MQTT-4.7.2-1]).
fn retained_topic(filter: &str, key: &str, mapping: crate::config::TopicMapping) -> Option<String> {
    let topic = topic::key_to_topic(key, mapping)?;
    let hidden = topic.starts_with('$') && topic::wildcard_first(filter);
    (!hidden && topic::key_matches(filter, key, mapping)).then_some(topic)
}

/// A retained message as its copy for `filter`'s session queue: headers saying what it is
/// ([`RETAINED_FOR_HEADER`], [`RETAINED_KEY_HEADER`]), and its time left as the copy's own
/// expiration, so the queue expires it when the retained message would have, and the client
/// is told the interval counted down. At most 2^32 − 1 ms (49 days), the most RabbitMQ takes.
fn queued_retained(m: crate::engine::retained::RetainedMessage, filter: &str) -> Message {
    let mut message = m.message;
    let p = message.properties_mut();
    p.headers
        .insert(RETAINED_FOR_HEADER, FieldValue::Str(filter.into()));
    p.headers
        .insert(RETAINED_KEY_HEADER, FieldValue::Str(m.routing_key.into()));
    p.expiration = m
        .expires_in
        .map(|left| millis(left).min(u64::from(u32::MAX)).to_string());
    message
}
