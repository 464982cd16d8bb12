//! Translation between the engine's types and lapin's: message properties both ways, and
//! lapin's errors into typed [`EngineError`]s. RabbitMQ names what it could not find or lock
//! only in a reply text (`NOT_FOUND - no exchange 'x' in vhost '/'`), so that text is read
//! here and nowhere else.

use lapin::protocol::AMQPErrorKind;

pub(super) use crate::engine::wire::{properties_from_amqp, properties_to_amqp, short, table};
use crate::engine::{EngineError, ObjectKind};

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
                properties: properties_from_amqp(&d.properties).into(),
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
}
