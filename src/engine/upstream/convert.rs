//! Translation between the engine's types and lapin's: message properties both ways, and
//! lapin's errors into typed [`EngineError`]s. RabbitMQ names what it could not find or lock
//! only in a reply text (`NOT_FOUND - no exchange 'x' in vhost '/'`), so that text is read
//! here and nowhere else.

use amq_protocol_types::ShortString;
use lapin::BasicProperties;
use lapin::protocol::AMQPErrorKind;

use crate::engine::table::wire;
use crate::engine::{EngineError, ObjectKind, Properties};

/// A client-supplied string as an AMQP short string (255 bytes at most).
pub(super) fn short(what: &str, value: &str) -> Result<ShortString, EngineError> {
    ShortString::try_new(value).map_err(|_| {
        EngineError::InvalidArgument(format!("{what} is {} bytes, the limit is 255", value.len()))
    })
}

pub(super) fn table(
    table: &crate::engine::FieldTable,
) -> Result<amq_protocol_types::FieldTable, EngineError> {
    wire::to_amqp(table).map_err(|e| EngineError::InvalidArgument(e.to_string()))
}

pub(super) fn properties_to_amqp(p: &Properties) -> Result<BasicProperties, EngineError> {
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

pub(super) fn properties_from_amqp(p: &BasicProperties) -> Properties {
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

/// A lapin delivery as the engine hands it out, under the engine channel's own tag.
pub(super) fn delivery(
    d: lapin::message::Delivery,
    delivery_tag: u64,
    consumer_tag: Option<std::sync::Arc<str>>,
    message_count: Option<u64>,
) -> crate::engine::Delivery {
    crate::engine::Delivery {
        delivery_tag,
        redelivered: d.redelivered,
        consumer_tag,
        envelope: std::sync::Arc::new(crate::engine::Envelope {
            exchange: d.exchange.as_str().into(),
            routing_key: d.routing_key.as_str().into(),
            message: crate::engine::Message {
                properties: properties_from_amqp(&d.properties),
                body: d.data.into(),
            },
        }),
        expires_in: None,
        message_count,
    }
}

/// What an operation was about, so a bare reply code can name its object.
#[derive(Debug, Clone, Copy)]
pub(super) enum About<'a> {
    Queue(&'a str),
    Exchange(&'a str),
    /// A consume: 403 is another consumer's exclusivity.
    Consume(&'a str),
    Other,
}

/// The broker's reply code and text, when the error is one.
pub(super) fn reply(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => {
            Some((err.get_id(), err.get_message().as_str().to_owned()))
        }
        _ => None,
    }
}

/// Whether the error closed only a channel (the connection lives on).
pub(super) fn is_channel_error(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err) if matches!(err.kind(), AMQPErrorKind::Soft(_)))
}

/// The quoted name after `marker` in a RabbitMQ reply text.
fn quoted_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    let end = rest.find('\'')?;
    Some(rest[..end].to_owned())
}

pub(super) fn engine_error(e: &lapin::Error, about: About<'_>) -> EngineError {
    let Some((code, text)) = reply(e) else {
        return EngineError::Unavailable(format!("upstream: {e}"));
    };
    let named = |kind: ObjectKind, fallback: &str| EngineError::NotFound {
        kind,
        name: fallback.to_owned(),
    };
    match code {
        404 => {
            if let Some(name) = quoted_after(&text, "no exchange '") {
                named(ObjectKind::Exchange, &name)
            } else if let Some(name) = quoted_after(&text, "no queue '") {
                named(ObjectKind::Queue, &name)
            } else {
                match about {
                    About::Exchange(n) => named(ObjectKind::Exchange, n),
                    About::Queue(n) | About::Consume(n) => named(ObjectKind::Queue, n),
                    About::Other => EngineError::NotFound {
                        kind: ObjectKind::Queue,
                        name: text,
                    },
                }
            }
        }
        405 => EngineError::ResourceLocked(
            quoted_after(&text, "queue '").unwrap_or_else(|| subject(about, &text)),
        ),
        403 => match about {
            About::Consume(q) if text.contains("exclusive") => EngineError::InUse(q.to_owned()),
            _ => EngineError::AccessRefused(text),
        },
        406 if text.to_lowercase().contains("invalid")
            || text.contains("unknown exchange type") =>
        {
            EngineError::InvalidArgument(text)
        }
        406 => EngineError::PreconditionFailed(text),
        311 => EngineError::ContentTooLarge { size: 0, limit: 0 },
        320 | 501..=505 => EngineError::Unavailable(format!("upstream closed: {code} {text}")),
        506 => EngineError::StoreFailed(text),
        540 => EngineError::NotSupported(text),
        _ => EngineError::Internal(format!("upstream {code}: {text}")),
    }
}

fn subject(about: About<'_>, text: &str) -> String {
    match about {
        About::Queue(n) | About::Exchange(n) | About::Consume(n) => n.to_owned(),
        About::Other => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_reply_texts() {
        assert_eq!(
            quoted_after(
                "NOT_FOUND - no exchange 'a.b' in vhost '/'",
                "no exchange '"
            ),
            Some("a.b".into())
        );
        assert_eq!(quoted_after("NOT_FOUND - no queue", "no queue '"), None);
    }

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
            .insert("x".into(), crate::engine::FieldValue::Str("y".into()));
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
