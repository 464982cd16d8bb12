//! The AMQP form of an inbound PUBLISH, and the headers one connection's publishes share.

use crate::engine::{HeaderTable, Headers};
use crate::json::SUBJECT_HEADER;

use super::*;

/// The gateway's headers of a connection's publishes without MQTT 5 properties, one table per
/// QoS and retain flag, made at the first such publish: every one of them carries the same
/// subject, session, QoS and flag, so each takes a count on the table (see
/// [`crate::engine::Headers`]). Empty: not made yet.
#[derive(Default)]
pub(in crate::protocol::mqtt::session) struct HeaderTemplates([Headers; 6]);

impl Session {
    /// The AMQP form of a PUBLISH: MQTT 5 properties mapped (DESIGN.md §3), then the
    /// gateway's own headers, which win over anything the client sent under their names (the
    /// publish gate stamps the subject; a shared table has it already).
    pub(in crate::protocol::mqtt::session) fn message_of(&mut self, p: &PublishIn) -> Message {
        let mut m = Message::new(p.payload.clone());
        match &p.props {
            // Nothing to write (no user properties, no header that says so): the connection's
            // shared table for this QoS and flag.
            None => m.properties.headers = self.shared_headers(p.qos, p.retain),
            Some(from) => {
                let props = &mut m.properties;
                properties::to_amqp(from, self.ctx.config.mqtt.topic_mapping, props);
                own_headers(props.headers.make_mut(), &self.life.key, p.qos, p.retain);
            }
        }
        m.properties.delivery_mode = Some(if p.qos > 0 { 2 } else { 1 });
        m
    }

    fn shared_headers(&mut self, qos: u8, retain: bool) -> Headers {
        let slot = usize::from(qos.min(2)) * 2 + usize::from(retain);
        let shared = &mut self.inflow.publisher().headers.0[slot];
        if shared.is_empty() {
            let mut table = HeaderTable::new();
            let subject = self.principal.subject.clone();
            table.insert(SUBJECT_HEADER, FieldValue::Str(subject));
            own_headers(&mut table, &self.life.key, qos, retain);
            *shared = table.into();
        }
        shared.clone()
    }
}

/// Writes the MQTT adapter's headers of a publish into `table`.
fn own_headers(table: &mut HeaderTable, key: &Arc<str>, qos: u8, retain: bool) {
    // In key order: each is pushed after the last (FieldTable::insert).
    table.insert(ORIGIN_HEADER, FieldValue::Str(key.clone()));
    table.insert(PUBLISH_QOS_HEADER, FieldValue::U8(qos));
    if retain {
        table.insert(RETAIN_HEADER, FieldValue::Bool(true));
    }
}
