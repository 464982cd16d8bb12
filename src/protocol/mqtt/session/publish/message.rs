//! The AMQP form of an inbound PUBLISH, and the properties one connection's publishes share.

use crate::engine::{Headers, Properties};
use crate::json::SUBJECT_HEADER;

use super::*;

/// The properties of a connection's publishes without MQTT 5 properties, one per QoS and
/// retain flag, made at the first such publish: every one of them carries the same delivery
/// mode and the same headers (subject, session, QoS and flag), so each takes a count on them
/// (see [`Message::properties`]) rather than an allocation of its own.
#[derive(Default)]
pub(in crate::protocol::mqtt::session) struct SharedProperties([Option<Arc<Properties>>; 6]);

impl Session {
    /// The AMQP form of a PUBLISH: MQTT 5 properties mapped (DESIGN.md §3), then the
    /// gateway's own headers, which win over anything the client sent under their names (the
    /// publish gate stamps the subject; shared properties have it already).
    pub(in crate::protocol::mqtt::session) fn message_of(&mut self, p: &PublishIn) -> Message {
        let Some(from) = &p.props else {
            // Nothing to write (no user properties, no header that says so).
            return Message::with(self.shared_properties(p.qos, p.retain), p.payload.clone());
        };
        let mut props = Properties::default();
        properties::to_amqp(from, self.ctx.config.mqtt.topic_mapping, &mut props);
        own_headers(&mut props.headers, &self.life.key, p.qos, p.retain);
        props.delivery_mode = Some(delivery_mode(p.qos));
        Message::with(props, p.payload.clone())
    }

    fn shared_properties(&mut self, qos: u8, retain: bool) -> Arc<Properties> {
        // The codec lets no QoS above 2 through; were one to come, it must not be written
        // into the properties QoS 2 publishes share.
        let qos = qos.min(2);
        let slot = usize::from(qos) * 2 + usize::from(retain);
        let shared = &mut self.inflow.publisher().properties.0[slot];
        shared
            .get_or_insert_with(|| {
                let mut headers = Headers::new();
                let subject = self.principal.subject.clone();
                headers.insert(SUBJECT_HEADER, FieldValue::Str(subject));
                own_headers(&mut headers, &self.life.key, qos, retain);
                Arc::new(Properties {
                    headers,
                    delivery_mode: Some(delivery_mode(qos)),
                    ..Properties::default()
                })
            })
            .clone()
    }
}

/// Transient at QoS 0, persistent above.
fn delivery_mode(qos: u8) -> u8 {
    if qos > 0 { 2 } else { 1 }
}

/// Writes the MQTT adapter's headers of a publish into `table`.
fn own_headers(table: &mut Headers, key: &Arc<str>, qos: u8, retain: bool) {
    // In key order: each is pushed after the last (FieldTable::insert).
    table.insert(ORIGIN_HEADER, FieldValue::Str(key.clone()));
    table.insert(PUBLISH_QOS_HEADER, FieldValue::U8(qos));
    if retain {
        table.insert(RETAIN_HEADER, FieldValue::Bool(true));
    }
}
