//! Inbound PUBLISH: topic aliases, QoS 2 state, scope and rate checks, the AMQP form of the
//! message, parked publishes whose acks are withheld.

use std::time::Instant;

use crate::flow::ThrottleReason;

use super::*;

impl Session {
    // ---------- inbound publish ----------

    pub(super) async fn publish(&mut self, mut p: PublishIn) -> Outcome {
        if let Some(alias) = p.props.topic_alias {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Outcome::Close(Some(reason::TOPIC_ALIAS_INVALID));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(topic) => p.topic = topic.clone(),
                    None => return Outcome::Close(Some(reason::PROTOCOL_ERROR)),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if p.qos == 2 && self.max_qos < 2 && self.version == Version::V5 {
            // CONNACK said Maximum QoS 1.
            return Outcome::Close(Some(reason::QOS_NOT_SUPPORTED));
        }
        if p.qos == 2
            && let Some(id) = p.packet_id
            && self.inbound_qos2.contains(&id)
        {
            // A resend before PUBREL: already published once, acknowledge again only.
            self.send(Outbound::PubRec {
                packet_id: id,
                code: reason::SUCCESS,
            });
            return Outcome::Continue;
        }
        if p.qos > 0
            && self.parked.len() + self.inbound_qos2.len()
                >= usize::from(self.ctx.config.mqtt.receive_maximum)
        {
            // More unacknowledged QoS 1/2 publishes than the Receive Maximum we advertised.
            metrics::refusal(PROTOCOL, "receive_maximum_exceeded");
            return Outcome::Close(Some(reason::RECEIVE_MAXIMUM_EXCEEDED));
        }
        if !self.parked.is_empty() && p.qos > 0 {
            // Keep order: later publishes wait behind parked ones.
            self.parked.push_back(p);
            return Outcome::Continue;
        }
        self.publish_now(p, true).await
    }

    pub(super) fn ack_publish(&self, p: &PublishIn, code: u8) {
        if let Some(id) = p.packet_id {
            match p.qos {
                1 => self.send(Outbound::PubAck {
                    packet_id: id,
                    code,
                }),
                2 => self.send(Outbound::PubRec {
                    packet_id: id,
                    code,
                }),
                _ => {}
            }
        }
    }

    pub(super) async fn publish_now(&mut self, p: PublishIn, may_park: bool) -> Outcome {
        let exchange = self.ctx.config.mqtt.exchange.clone();
        let key = match topic_to_key(&p.topic, self.ctx.config.mqtt.topic_mapping) {
            Ok(k) => k,
            // [MQTT-3.3.2-2]: no wildcards in a topic name; an empty one is malformed too.
            Err(e @ (topic::TopicError::Wildcard | topic::TopicError::Empty)) => {
                tracing::info!(client = %self.client_id, topic = %p.topic, "invalid topic name: {e}");
                metrics::refusal(PROTOCOL, "topic_invalid");
                return Outcome::Close(Some(reason::TOPIC_NAME_INVALID));
            }
            // Valid MQTT that has no AMQP form: refused, the connection stays (v5 only can say so).
            Err(e) => {
                tracing::info!(client = %self.client_id, topic = %p.topic, "refused topic: {e}");
                metrics::refusal(PROTOCOL, "topic_invalid");
                if self.version == Version::V5 {
                    self.ack_publish(&p, reason::TOPIC_NAME_INVALID);
                    return Outcome::Continue;
                }
                return Outcome::Close(Some(reason::TOPIC_NAME_INVALID));
            }
        };
        if !self.principal.permissions.can_write(&exchange, &key) {
            metrics::refusal(PROTOCOL, "forbidden");
            // 3.1.1 has no way to say no: the publish is acknowledged and dropped.
            let code = if self.version == Version::V5 {
                reason::NOT_AUTHORIZED
            } else {
                reason::SUCCESS
            };
            self.ack_publish(&p, code);
            return Outcome::Continue;
        }
        if let Err(t) =
            self.ctx
                .admit_publish(&self.conn, self.principal.shared_subject(), p.payload.len())
        {
            metrics::refusal(PROTOCOL, t.reason.as_str());
            if p.qos == 0 && t.reason == ThrottleReason::MemoryWatermark {
                // Dropped and counted; not the client's overrun, so no 0x96 for it.
                return Outcome::Continue;
            }
            if p.qos == 0 {
                // Dropped and counted; a v5 client that keeps overrunning for
                // `limits.overrun_grace` is told so and disconnected (0x96).
                let since = *self.overrun_since.get_or_insert_with(Instant::now);
                if self.version == Version::V5
                    && since.elapsed() >= self.ctx.config.limits.overrun_grace
                {
                    return Outcome::Close(Some(reason::MESSAGE_RATE_TOO_HIGH));
                }
                return Outcome::Continue;
            }
            if may_park {
                self.parked.push_back(p);
            } else {
                self.parked.push_front(p);
            }
            self.retry_at = Some(Instant::now() + t.retry_after);
            return Outcome::Continue;
        }
        let message = self.message_of(&p);
        // Retained before the publish (see `RetainedStore::set`), taken back if it is refused.
        let retained = match p.retain {
            true => Some(self.retained.set(&key, message.clone()).await),
            false => None,
        };
        let started = Instant::now();
        match self
            .channel
            .publish(&exchange, &key, message, PublishOptions::default())
            .await
        {
            Ok(_) => {
                metrics::message_in(PROTOCOL, started.elapsed());
                self.overrun_since = None;
                let code = if let Some(Err(_)) = retained {
                    metrics::refusal(PROTOCOL, "retained_full");
                    if self.version == Version::V5 {
                        reason::QUOTA_EXCEEDED
                    } else {
                        reason::SUCCESS
                    }
                } else {
                    reason::SUCCESS
                };
                if p.qos == 2
                    && self.max_qos == 2
                    && let Some(id) = p.packet_id
                {
                    self.inbound_qos2.insert(id);
                }
                self.ack_publish(&p, code);
                Outcome::Continue
            }
            Err(e) => {
                if let Some(Ok(undo)) = retained {
                    self.retained.undo(&key, undo).await;
                }
                self.refused(&p, e)
            }
        }
    }

    /// A publish the engine did not accept (DESIGN.md §5's failure table).
    fn refused(&mut self, p: &PublishIn, e: EngineError) -> Outcome {
        match e {
            EngineError::Rejected(_) if self.version == Version::V5 => {
                self.ack_publish(p, reason::QUOTA_EXCEEDED);
                Outcome::Continue
            }
            e => {
                tracing::warn!(client = %self.client_id, error = %e, "publish not accepted; closing so the client resends");
                if self.version == Version::V5 && p.qos > 0 {
                    self.ack_publish(p, reason::UNSPECIFIED);
                    return Outcome::Continue;
                }
                Outcome::Close(Some(reason::UNSPECIFIED))
            }
        }
    }

    /// The AMQP form of a PUBLISH: MQTT 5 properties mapped (DESIGN.md §3), then the
    /// gateway's own headers, which win over anything the client sent under their names.
    pub(super) fn message_of(&self, p: &PublishIn) -> Message {
        let mut m = Message::new(p.payload.clone());
        let props = &mut m.properties;
        properties::to_amqp(&p.props, self.ctx.config.mqtt.topic_mapping, props);
        props.delivery_mode = Some(if p.qos > 0 { 2 } else { 1 });
        props
            .headers
            .insert(PUBLISH_QOS_HEADER.into(), FieldValue::U8(p.qos));
        props.headers.insert(
            ORIGIN_HEADER.into(),
            FieldValue::Str(self.takeover_key.clone()),
        );
        if p.retain {
            props
                .headers
                .insert(RETAIN_HEADER.into(), FieldValue::Bool(true));
        }
        props.headers.insert(
            SUBJECT_HEADER.into(),
            FieldValue::Str(self.principal.subject.to_string()),
        );
        m
    }

    /// The MQTT 5 properties of a message from the engine with `expires_in` left to live.
    pub(super) fn props_of(
        &self,
        p: &crate::engine::Properties,
        expires_in: Option<std::time::Duration>,
    ) -> PublishProps {
        if self.version != Version::V5 {
            return PublishProps::default();
        }
        let mqtt = &self.ctx.config.mqtt;
        properties::from_amqp(
            p,
            expires_in,
            mqtt.topic_mapping,
            mqtt.sender_property.as_deref(),
        )
    }

    /// Tries the parked publishes again (their PUBACKs were withheld).
    pub async fn retry_parked(&mut self) -> Outcome {
        self.retry_at = None;
        while let Some(p) = self.parked.pop_front() {
            if let outcome @ (Outcome::Close(_) | Outcome::Disconnected) =
                self.publish_now(p, false).await
            {
                return outcome;
            }
            if self.retry_at.is_some() {
                break; // throttled again: it went back to the front
            }
        }
        Outcome::Continue
    }
}
