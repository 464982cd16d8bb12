//! The `x-…` arguments of a queue the embedded engine honours, parsed and checked once at
//! declare (RabbitMQ's names, limits and errors).

use std::time::Duration;

use crate::engine::{EngineError, FieldTable};
use crate::flow::Bound;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::engine::embedded) enum Overflow {
    DropHead,
    RejectPublish,
    /// As `RejectPublish`, and the refused message is dead-lettered.
    RejectPublishDlx,
}

/// The `x-…` arguments the embedded engine honours, parsed and checked once at declare.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::engine::embedded) struct QueueArgs {
    pub message_ttl: Option<Duration>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// Boxed: most queues have none (an MQTT session's among them), and two strings in place
    /// were 48 bytes of every queue.
    pub dead_letter: Option<Box<DeadLetterTo>>,
}

/// Where a queue's dead letters go (`x-dead-letter-exchange`, `x-dead-letter-routing-key`).
#[derive(Debug, Clone, PartialEq)]
pub(in crate::engine::embedded) struct DeadLetterTo {
    pub exchange: String,
    /// The routing key they are republished with; `None` keeps each message's own.
    pub routing_key: Option<String>,
}

fn non_negative(arguments: &FieldTable, key: &str) -> Result<Option<u64>, EngineError> {
    match arguments.get(key) {
        None => Ok(None),
        Some(v) => match v.as_i128().and_then(|i| u64::try_from(i).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(EngineError::InvalidArgument(format!(
                "{key} must be a non-negative integer"
            ))),
        },
    }
}

fn string(arguments: &FieldTable, key: &str) -> Result<Option<String>, EngineError> {
    match arguments.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| EngineError::InvalidArgument(format!("{key} must be a string"))),
    }
}

impl QueueArgs {
    /// A queue declared with none of them (an MQTT session's, a `/ws` subscription's).
    pub const NONE: QueueArgs = QueueArgs {
        message_ttl: None,
        max_length: None,
        max_length_bytes: None,
        overflow: Overflow::DropHead,
        dead_letter: None,
    };

    /// Whether these are [`QueueArgs::NONE`]: nothing to keep.
    pub fn is_none(&self) -> bool {
        *self == QueueArgs::NONE
    }

    /// The bound of a queue that drops its oldest when full (`x-overflow` drop-head with a
    /// length limit); other queues never drop for being full, so they pace nobody.
    pub fn drop_head_bound(&self) -> Option<Bound> {
        if self.overflow != Overflow::DropHead
            || (self.max_length.is_none() && self.max_length_bytes.is_none())
        {
            return None;
        }
        Some(Bound {
            messages: self.max_length.unwrap_or(u64::MAX),
            bytes: self.max_length_bytes.unwrap_or(u64::MAX),
        })
    }

    pub fn parse(arguments: &FieldTable) -> Result<Self, EngineError> {
        // RabbitMQ caps TTLs at 2^32-1 ms; so do we, so a value means the same on both engines.
        const MAX_MS: u64 = u32::MAX as u64;
        let ttl = non_negative(arguments, "x-message-ttl")?;
        if ttl.is_some_and(|t| t > MAX_MS) {
            return Err(EngineError::InvalidArgument(format!(
                "x-message-ttl must be at most {MAX_MS}"
            )));
        }
        let expires = non_negative(arguments, "x-expires")?;
        if expires.is_some_and(|t| t == 0 || t > MAX_MS) {
            return Err(EngineError::InvalidArgument(format!(
                "x-expires must be between 1 and {MAX_MS}"
            )));
        }
        let overflow = match string(arguments, "x-overflow")?.as_deref() {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(EngineError::InvalidArgument(format!(
                    "x-overflow must be drop-head, reject-publish or reject-publish-dlx, not '{other}'"
                )));
            }
        };
        match string(arguments, "x-queue-type")?.as_deref() {
            None | Some("classic") => {}
            Some(other) => {
                return Err(EngineError::NotSupported(format!(
                    "x-queue-type '{other}' (the embedded engine has classic queues)"
                )));
            }
        }
        Ok(QueueArgs {
            message_ttl: ttl.map(Duration::from_millis),
            max_length: non_negative(arguments, "x-max-length")?,
            max_length_bytes: non_negative(arguments, "x-max-length-bytes")?,
            overflow,
            // Both checked, though a routing key without an exchange is then ignored.
            dead_letter: match (
                string(arguments, "x-dead-letter-exchange")?,
                string(arguments, "x-dead-letter-routing-key")?,
            ) {
                (None, _) => None,
                (Some(exchange), routing_key) => Some(Box::new(DeadLetterTo {
                    exchange,
                    routing_key,
                })),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_without_arguments_keeps_none() {
        let none = QueueArgs::parse(&FieldTable::default()).expect("no arguments parse");
        assert!(none.is_none());
        let mut ttl = FieldTable::default();
        ttl.insert("x-message-ttl", crate::engine::FieldValue::I64(1000));
        assert!(!QueueArgs::parse(&ttl).expect("a TTL parses").is_none());
        // Every MQTT session and `/ws` subscription has a queue: 304 bytes and the `Arc`'s
        // counts fill mimalloc's 320-byte class; 8 more take it to 384 (docs/bench.md).
        let size = std::mem::size_of::<super::super::Queue>();
        assert!(size <= 304, "{size}");
    }
}
