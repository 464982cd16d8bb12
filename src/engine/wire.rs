//! Message properties and field tables in AMQP 0-9-1's own types (amq-protocol, the crate
//! under lapin and the AMQP listener's framing), both ways: what an upstream engine sends to
//! RabbitMQ and what the AMQP listener reads from and writes to its clients.

use amq_protocol::protocol::BasicProperties;
use amq_protocol_types::ShortString;

use crate::engine::table::wire;
use crate::engine::{EngineError, Properties};

/// A client-supplied string as an AMQP short string (255 bytes at most).
pub fn short(what: &str, value: &str) -> Result<ShortString, EngineError> {
    ShortString::try_new(value).map_err(|_| {
        EngineError::InvalidArgument(format!("{what} is {} bytes, the limit is 255", value.len()))
    })
}

pub fn table<const N: usize>(
    table: &crate::engine::FieldTable<N>,
) -> Result<amq_protocol_types::FieldTable, EngineError> {
    wire::to_amqp(table).map_err(|e| EngineError::InvalidArgument(e.to_string()))
}

pub fn properties_to_amqp(p: &Properties) -> Result<BasicProperties, EngineError> {
    let mut out = BasicProperties::default();
    if let Some(v) = &p.content_type {
        out = out.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &p.content_encoding {
        out = out.with_content_encoding(short("content_encoding", v)?);
    }
    if !p.headers.is_empty() {
        out = out.with_headers(table(&p.headers)?);
    }
    if let Some(v) = p.delivery_mode {
        out = out.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        out = out.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        out = out.with_correlation_id(short("correlation_id", v)?);
    }
    if let Some(v) = &p.reply_to {
        out = out.with_reply_to(short("reply_to", v)?);
    }
    if let Some(v) = &p.expiration {
        out = out.with_expiration(short("expiration", v)?);
    }
    if let Some(v) = &p.message_id {
        out = out.with_message_id(short("message_id", v)?);
    }
    if let Some(v) = p.timestamp {
        out = out.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        out = out.with_type(short("type", v)?);
    }
    if let Some(v) = &p.user_id {
        out = out.with_user_id(short("user_id", v)?);
    }
    if let Some(v) = &p.app_id {
        out = out.with_app_id(short("app_id", v)?);
    }
    Ok(out)
}

pub fn properties_from_amqp(p: &BasicProperties) -> Properties {
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    Properties {
        content_type: s(p.content_type()),
        content_encoding: s(p.content_encoding()),
        headers: p
            .headers()
            .as_ref()
            .map(wire::from_amqp)
            .unwrap_or_default(),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: s(p.correlation_id()),
        reply_to: s(p.reply_to()),
        expiration: s(p.expiration()),
        message_id: s(p.message_id()),
        timestamp: *p.timestamp(),
        kind: s(p.kind()),
        user_id: s(p.user_id()),
        app_id: s(p.app_id()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip() {
        let mut p = Properties {
            content_type: Some("text/plain".into()),
            correlation_id: Some("c".into()),
            delivery_mode: Some(2),
            timestamp: Some(7),
            kind: Some("t".into()),
            ..Properties::default()
        };
        p.headers
            .insert("x", crate::engine::FieldValue::Str("y".into()));
        let back = properties_from_amqp(&properties_to_amqp(&p).unwrap());
        assert_eq!(back, p);
        let too_long = Properties {
            reply_to: Some("r".repeat(256)),
            ..Properties::default()
        };
        assert!(matches!(
            properties_to_amqp(&too_long),
            Err(EngineError::InvalidArgument(_))
        ));
    }
}
