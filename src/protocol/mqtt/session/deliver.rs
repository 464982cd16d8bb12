//! Outbound deliveries: per-copy QoS, no-local, retain-as-published, subscription identifiers,
//! MQTT 5 properties, packet-id tracking, retained messages on subscribe.

use std::sync::atomic::Ordering;

use super::*;

/// Deliveries handled per turn of the connection's task, at most.
const DRAIN_BATCH: usize = 512;

impl Session {
    // ---------- deliveries ----------

    pub(super) fn next_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether a PUBLISH of `topic` with this payload and properties fits the client's MQTT 5
    /// Maximum Packet Size. An upper bound of the encoded size: fixed header 5, topic length 2,
    /// packet id 2, properties as their bytes plus 4 per field.
    pub(super) fn fits(&self, topic: &str, payload: usize, props: &PublishProps) -> bool {
        let Some(max) = self.client_max_packet else {
            return true;
        };
        let props_len = props.content_type.as_ref().map_or(0, |v| v.len() + 4)
            + props.correlation_data.as_ref().map_or(0, |v| v.len() + 4)
            + props.response_topic.as_ref().map_or(0, |v| v.len() + 4)
            + props
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>()
            + props.subscription_ids.len() * 5
            + 16;
        5 + 2 + topic.len() + 2 + props_len + payload <= max as usize
    }

    /// A packet id for an outbound QoS 1/2 delivery, remembered until its acknowledgement.
    pub(super) fn track(&mut self, qos: u8, tag: Option<u64>) -> u16 {
        let id = self.next_packet_id();
        let state = if qos == 2 {
            Inflight::Sent(tag)
        } else {
            Inflight::AtLeastOnce(tag)
        };
        self.inflight.insert(id, state);
        id
    }

    /// Handles `d`, then the deliveries already waiting, up to [`DRAIN_BATCH`] in one turn and
    /// outside tokio's cooperative budget. Draining frees the engine's memory while publishing
    /// adds to it, so a subscriber must not be held to one connection's share of the scheduler:
    /// with 50 publishers flat out to one subscriber it would get 1/51 of the turns and its
    /// queue would only grow.
    pub async fn deliver_batch(&mut self, key: String, d: Option<Delivery>) -> Outcome {
        use futures_util::FutureExt;
        use tokio_stream::StreamExt;
        let mut outcome = self.deliver(key, d).await;
        for _ in 1..DRAIN_BATCH {
            if !matches!(outcome, Outcome::Continue) {
                break;
            }
            let waiting = tokio::task::unconstrained(self.consumers.next()).now_or_never();
            let Some(Some((key, d))) = waiting else {
                break;
            };
            outcome = self.deliver(key, d).await;
        }
        outcome
    }

    /// A delivery from the queue of `level`; `None` when the consumer ended.
    pub async fn deliver(&mut self, key: String, d: Option<Delivery>) -> Outcome {
        let Some(d) = d else {
            tracing::info!(client = %self.client_id, queue = %key, "a session queue went away");
            return Outcome::Close(Some(reason::IMPLEMENTATION_SPECIFIC));
        };
        let level = match key.as_str() {
            "0" => 0,
            "1" => 1,
            shared => return self.deliver_shared(shared, d).await,
        };
        let topic = key_to_topic(d.routing_key(), self.ctx.config.mqtt.topic_mapping);
        let visible = topic.as_deref().is_some_and(|t| {
            // `$`-topics reach only filters that do not start with a wildcard; a resumed session
            // that does not know its filters lets them through.
            !t.starts_with('$')
                || self.subs.is_empty()
                || self.subs.keys().any(|f| topic::filter_matches(f, t))
        });
        let publish_qos = publish_qos_of(&d);
        let (Some(topic), true) = (topic, visible) else {
            metrics::refusal(PROTOCOL, "unmappable_topic");
            if level == 1 {
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        };
        // The subscriptions this queue serves that the message matched (none known for a
        // resumed session: the queue's level and no options then).
        let matched: Vec<SubOpts> = self
            .subs
            .iter()
            .filter(|(f, o)| (o.granted.min(1) == level) && topic::filter_matches(f, &topic))
            .map(|(_, o)| *o)
            .collect();
        // Queued for a subscription that is gone (unsubscribed, or refused on resume): not for
        // this client any more. A session that knows no filters at all delivers what it has.
        // Only when nothing at this level matched is there a second look (at any level).
        if matched.is_empty()
            && !self.subs.is_empty()
            && !self.subs.keys().any(|f| topic::filter_matches(f, &topic))
        {
            metrics::refusal(PROTOCOL, "unsubscribed");
            if level == 1 {
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        }
        let headers = &d.properties().headers;
        let own = headers.get(ORIGIN_HEADER).and_then(FieldValue::as_str)
            == Some(self.takeover_key.as_str());
        // No-local suppresses the copy only when every matching subscription asked for it.
        if own && !matched.is_empty() && matched.iter().all(|o| o.no_local) {
            if level == 1 {
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        }
        let retain = matches!(headers.get(RETAIN_HEADER), Some(FieldValue::Bool(true)))
            && matched.iter().any(|o| o.retain_as_published);
        let subscription_ids: Vec<u32> = matched.iter().filter_map(|o| o.id).collect();
        // Per copy: min(publish QoS, the highest QoS granted to a matching subscription).
        let cap = if level == 0 {
            0
        } else {
            matched.iter().map(|o| o.granted).max().unwrap_or(1)
        };
        let qos = publish_qos.min(cap);
        let mut props = self.props_of(&d);
        if self.version == Version::V5 {
            props.subscription_ids = subscription_ids;
        }
        self.send_copy(&d, topic, qos, retain, props, level == 1)
            .await
    }

    /// A delivery from a shared subscription's queue: at most the granted QoS, no retained
    /// flag, its own subscription identifier.
    pub(super) async fn deliver_shared(&mut self, filter: &str, d: Delivery) -> Outcome {
        let Some(opts) = self.subs.get(filter).copied() else {
            let _ = self.channel.nack(d.delivery_tag, false, true).await;
            return Outcome::Continue;
        };
        let Some(topic) = key_to_topic(d.routing_key(), self.ctx.config.mqtt.topic_mapping) else {
            metrics::refusal(PROTOCOL, "unmappable_topic");
            let _ = self.channel.ack(d.delivery_tag, false).await;
            return Outcome::Continue;
        };
        let publish_qos = publish_qos_of(&d);
        let qos = publish_qos.min(opts.granted);
        let mut props = self.props_of(&d);
        if self.version == Version::V5 {
            props.subscription_ids = opts.id.into_iter().collect();
        }
        self.send_copy(&d, topic, qos, false, props, true).await
    }

    /// Sends one copy of a delivery. `settle` says the engine awaits an ack for it (every queue
    /// but the QoS 0 one): a QoS 0 copy is settled as it is sent, a QoS 1/2 one when the client
    /// acknowledges, and one over the client's Maximum Packet Size is acked, dropped and counted
    /// (DESIGN.md §3).
    async fn send_copy(
        &mut self,
        d: &Delivery,
        topic: String,
        qos: u8,
        retain: bool,
        props: PublishProps,
        settle: bool,
    ) -> Outcome {
        if !self.fits(&topic, d.body().len(), &props) {
            metrics::refusal(PROTOCOL, "packet_too_large");
            if settle {
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            return Outcome::Continue;
        }
        let packet_id = if qos >= 1 {
            Some(self.track(qos, Some(d.delivery_tag)))
        } else {
            if settle {
                let _ = self.channel.ack(d.delivery_tag, false).await;
            }
            None
        };
        self.emit(topic, qos, retain, packet_id, d.body().clone(), props);
        Outcome::Continue
    }

    /// Queues a PUBLISH for the writer. Every outbound PUBLISH goes through here, because the
    /// writer counts each QoS 0 one it takes off `qos0_queued`: a slow client's QoS 0 backlog
    /// is bounded by `limits.outbound_buffer_messages`, over it copies are dropped and counted
    /// (QoS 1/2 are bounded by credit instead).
    fn emit(
        &mut self,
        topic: String,
        qos: u8,
        retain: bool,
        packet_id: Option<u16>,
        payload: bytes::Bytes,
        props: PublishProps,
    ) {
        if qos == 0 {
            let limit = self.ctx.config.limits.outbound_buffer_messages;
            if self.qos0_queued.load(Ordering::Relaxed) >= limit {
                metrics::refusal(PROTOCOL, "qos0_dropped");
                return;
            }
            self.qos0_queued.fetch_add(1, Ordering::Relaxed);
        }
        self.send(Outbound::Publish {
            topic,
            qos,
            retain,
            dup: false,
            packet_id,
            payload,
            props,
        });
        metrics::messages_out(PROTOCOL, 1);
    }

    /// Sends the retained messages matching a new subscription, RETAIN=1, at most `granted`.
    pub(super) fn send_retained(&mut self, filter: &str, granted: u8) {
        for (topic, m) in self.retained.matching(filter) {
            let qos = m.qos.min(granted);
            let packet_id = (qos >= 1).then(|| self.track(qos, None));
            self.emit(
                topic,
                qos,
                true,
                packet_id,
                m.payload,
                PublishProps::default(),
            );
        }
    }
}
