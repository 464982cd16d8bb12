//! MQTT 5 publish properties ↔ AMQP properties (DESIGN.md §3), both ways, pure functions.
//!
//! Fidelity is the rule: what one MQTT client sent reaches another exactly — user properties
//! unaltered and in order, duplicates included ([MQTT-3.3.2-17], [MQTT-3.3.2-18]), content
//! type, payload format indicator, response topic, correlation data, message expiry counted
//! down. AMQP consumers see the same properties in AMQP form. The gateway's own headers
//! (`x-gateway-sub`, `x-mqtt-*`) never become user properties, unless the operator names one
//! for the subject stamp (`mqtt.sender_property`).

use std::time::Duration;

use bytes::Bytes;

use super::codec::PublishProps;
use super::topic::{key_to_topic, topic_to_key};
use crate::config::TopicMapping;
use crate::engine::Properties;
use crate::engine::table::{FieldValue, Headers};
use crate::json::SUBJECT_HEADER;

/// MQTT 5 correlation data that is not a UTF-8 short string (AMQP correlation_id is one).
pub const CORRELATION_HEADER: &str = "x-mqtt-correlation-data";
/// Payload Format Indicator 1 (UTF-8), both ways.
pub const PAYLOAD_FORMAT_HEADER: &str = "x-mqtt-payload-format";
/// The user properties exactly as sent, `[[name, value], …]`: written only when the headers
/// alone cannot give them back (AMQP tables are keyed and sorted, so duplicate names, their
/// order, names over 255 bytes or names the gateway reserves need it).
pub const USER_PROPERTIES_HEADER: &str = "x-mqtt-user-properties";
/// A Response Topic that has no routing-key form (a `*` level, over 255 bytes mapped).
pub const RESPONSE_TOPIC_HEADER: &str = "x-mqtt-response-topic";

/// Headers the gateway owns: never shown to MQTT clients as user properties, never taken from
/// a client's user properties.
pub fn is_gateway_header(name: &str) -> bool {
    name == SUBJECT_HEADER || name.starts_with("x-mqtt-")
}

/// A header value as an MQTT user property value: strings as they are, numbers and booleans
/// in their usual text; tables, arrays, bytes and void have no faithful string form.
fn as_property_value(v: &FieldValue) -> Option<String> {
    match v {
        FieldValue::Str(s) => Some(s.to_string()),
        FieldValue::Bool(b) => Some(b.to_string()),
        FieldValue::F32(f) => Some(f.to_string()),
        FieldValue::F64(f) => Some(f.to_string()),
        FieldValue::Bytes(_)
        | FieldValue::Array(_)
        | FieldValue::Table(_)
        | FieldValue::Void
        | FieldValue::Decimal { .. } => None,
        int => int.as_i128().map(|i| i.to_string()),
    }
}

/// The user properties the headers stand for, when no exact list travels with them.
fn from_headers(headers: &Headers) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !is_gateway_header(k))
        .filter_map(|(k, v)| as_property_value(v).map(|v| (k.to_owned(), v)))
        .collect()
}

/// The exact list, when one travels in [`USER_PROPERTIES_HEADER`] and is well formed.
fn exact_list(headers: &Headers) -> Option<Vec<(String, String)>> {
    let FieldValue::Array(items) = headers.get(USER_PROPERTIES_HEADER)? else {
        return None;
    };
    items
        .iter()
        .map(|pair| match pair {
            FieldValue::Array(kv) => match kv.as_slice() {
                [k, v] => Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Writes a PUBLISH's properties into `out` (the message's AMQP properties).
pub fn to_amqp(props: &PublishProps, mapping: TopicMapping, out: &mut Properties) {
    let headers = &mut out.headers;
    for (k, v) in &props.user_properties {
        // A table key is an AMQP short string; the gateway's names are its own.
        if k.len() <= 255 && !is_gateway_header(k) {
            headers.insert(k.clone(), FieldValue::Str(v.as_str().into()));
        }
    }
    if from_headers(headers) != props.user_properties {
        let list = props
            .user_properties
            .iter()
            .map(|(k, v)| {
                FieldValue::Array(vec![
                    FieldValue::Str(k.as_str().into()),
                    FieldValue::Str(v.as_str().into()),
                ])
            })
            .collect();
        headers.insert(USER_PROPERTIES_HEADER, FieldValue::Array(list));
    }
    if props.payload_utf8 {
        headers.insert(PAYLOAD_FORMAT_HEADER, FieldValue::U8(1));
    }
    if let Some(data) = &props.correlation_data {
        match std::str::from_utf8(data) {
            Ok(s) if s.len() <= 255 => out.correlation_id = Some(s.to_owned()),
            _ => {
                headers.insert(CORRELATION_HEADER, FieldValue::Bytes(data.to_vec()));
            }
        }
    }
    if let Some(topic) = &props.response_topic {
        match topic_to_key(topic, mapping) {
            Ok(key) => out.reply_to = Some(key),
            Err(_) => {
                headers.insert(
                    RESPONSE_TOPIC_HEADER,
                    FieldValue::Str(topic.as_str().into()),
                );
            }
        }
    }
    out.content_type = props.content_type.clone();
    out.expiration = props
        .message_expiry
        .map(|secs| (u64::from(secs) * 1000).to_string());
}

/// The MQTT 5 properties of a message from the engine. `expires_in` is the time it has left
/// (the Message Expiry Interval counts down); `sender_property` names the user property that
/// carries the publisher's subject, if the operator asked for one.
pub fn from_amqp(
    p: &Properties,
    expires_in: Option<Duration>,
    mapping: TopicMapping,
    sender_property: Option<&str>,
) -> PublishProps {
    let headers = &p.headers;
    let mut user_properties = exact_list(headers).unwrap_or_else(|| from_headers(headers));
    if let (Some(name), Some(subject)) = (
        sender_property,
        headers.get(SUBJECT_HEADER).and_then(FieldValue::as_str),
    ) {
        user_properties.push((name.to_owned(), subject.to_owned()));
    }
    let correlation_data = match headers.get(CORRELATION_HEADER) {
        Some(FieldValue::Bytes(b)) => Some(Bytes::from(b.clone())),
        _ => p.correlation_id.clone().map(Bytes::from),
    };
    let response_topic = match headers
        .get(RESPONSE_TOPIC_HEADER)
        .and_then(FieldValue::as_str)
    {
        Some(topic) => Some(topic.to_owned()),
        None => p.reply_to.as_deref().and_then(|k| key_to_topic(k, mapping)),
    };
    let payload_utf8 = match headers.get(PAYLOAD_FORMAT_HEADER) {
        Some(FieldValue::Bool(b)) => *b,
        Some(v) => v.as_i128() == Some(1) || v.as_str() == Some("1"),
        None => false,
    };
    PublishProps {
        content_type: p.content_type.clone(),
        correlation_data,
        response_topic,
        // Rounded up so a live message never reads 0 (0 would mean "no expiry" to nobody).
        message_expiry: expires_in.map(|left| left.as_secs_f64().ceil().max(1.0) as u32),
        user_properties,
        topic_alias: None,
        payload_utf8,
        subscription_ids: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(props: &PublishProps) -> PublishProps {
        let mut amqp = Properties::default();
        to_amqp(props, TopicMapping::Swap, &mut amqp);
        amqp.headers
            .insert(SUBJECT_HEADER, FieldValue::Str("alice".into()));
        let expires_in = props.message_expiry.map(|s| Duration::from_secs(s.into()));
        from_amqp(&amqp, expires_in, TopicMapping::Swap, None)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_property_comes_back_exactly() {
        let sent = PublishProps {
            content_type: Some("application/json".into()),
            correlation_data: Some(Bytes::from_static(&[0, 159, 1])),
            response_topic: Some("replies/*/x".into()),
            message_expiry: Some(30),
            user_properties: pairs(&[
                ("z", "1"),
                ("a", "2"),
                ("z", "3"),
                ("x-gateway-sub", "mallory"),
                ("x-mqtt-publish-qos", "2"),
            ]),
            payload_utf8: true,
            ..PublishProps::default()
        };
        assert_eq!(round_trip(&sent), sent);
    }

    #[test]
    fn plain_properties_travel_as_headers_only() {
        let sent = PublishProps {
            user_properties: pairs(&[("a", "1"), ("b", "2")]),
            correlation_data: Some(Bytes::from_static(b"req-1")),
            response_topic: Some("rpc/reply".into()),
            ..PublishProps::default()
        };
        let mut amqp = Properties::default();
        to_amqp(&sent, TopicMapping::Swap, &mut amqp);
        assert!(!amqp.headers.contains_key(USER_PROPERTIES_HEADER));
        assert_eq!(amqp.headers["a"], FieldValue::Str("1".into()));
        assert_eq!(amqp.correlation_id.as_deref(), Some("req-1"));
        assert_eq!(amqp.reply_to.as_deref(), Some("rpc.reply"));
        assert_eq!(round_trip(&sent), sent);
    }

    #[test]
    fn amqp_headers_become_user_properties_but_gateway_ones_do_not() {
        let mut amqp = Properties::default();
        amqp.headers
            .insert(SUBJECT_HEADER, FieldValue::Str("bob".into()));
        amqp.headers.insert("x-mqtt-publish-qos", FieldValue::U8(1));
        amqp.headers.insert("count", FieldValue::I64(7));
        amqp.headers.insert("ok", FieldValue::Bool(true));
        amqp.headers
            .insert("nested", FieldValue::Table(Box::default()));
        amqp.headers
            .insert(PAYLOAD_FORMAT_HEADER, FieldValue::I32(1));
        let props = from_amqp(&amqp, None, TopicMapping::Swap, None);
        assert_eq!(
            props.user_properties,
            pairs(&[("count", "7"), ("ok", "true")])
        );
        assert!(props.payload_utf8);
        let named = from_amqp(&amqp, None, TopicMapping::Swap, Some("sender"));
        assert_eq!(
            named.user_properties.last(),
            Some(&("sender".into(), "bob".into()))
        );
    }
}
