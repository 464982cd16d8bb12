//! Redeclare equivalence, as RabbitMQ checks it: flags must match, and the arguments it knows
//! must be equal by value and type class.

use super::*;

/// Exchange arguments compared on redeclare (RabbitMQ: `rabbit_exchange:declare_args/0`).
pub(super) const EXCHANGE_EQUIVALENCE_KEYS: &[&str] = &["alternate-exchange"];

/// Queue arguments compared on redeclare: the ones RabbitMQ compares
/// (`rabbit_amqqueue:declare_args/0`). Others are not, as there, so a client that adds an
/// argument of its own (or one another broker version knows) still meets an existing queue.
pub(super) const QUEUE_EQUIVALENCE_KEYS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    "x-queue-type",
    "x-queue-leader-locator",
    "x-initial-cluster-size",
    "x-delivery-limit",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
];

/// Redeclare equivalence of arguments, as RabbitMQ's: each key of `keys` must be absent from
/// both or present in both with the same value of the same type class — an integer equals the
/// same integer at any width (REST sends 64-bit, pika 32-bit), a string the same string.
pub(super) fn equivalent_arguments(
    what: &str,
    name: &str,
    keys: &[&str],
    asked: &FieldTable,
    current: &FieldTable,
) -> Result<(), EngineError> {
    for key in keys {
        let same = match (asked.get(key), current.get(key)) {
            (None, None) => true,
            (Some(a), Some(c)) => a.loosely_equals(c),
            _ => false,
        };
        if !same {
            let show =
                |v: Option<&FieldValue>| v.map_or("none".to_owned(), |v| v.to_json().to_string());
            return Err(EngineError::PreconditionFailed(format!(
                "inequivalent arg '{key}' for {what} '{name}': received {} but current is {}",
                show(asked.get(key)),
                show(current.get(key))
            )));
        }
    }
    Ok(())
}

/// A redeclare must match the existing object; the first field that differs is named as
/// RabbitMQ names it (406 PRECONDITION_FAILED).
pub(super) fn must_match<const N: usize>(
    what: &str,
    name: &str,
    fields: [(&str, String, String); N],
) -> Result<(), EngineError> {
    match fields.iter().find(|(_, asked, current)| asked != current) {
        None => Ok(()),
        Some((field, asked, current)) => Err(EngineError::PreconditionFailed(format!(
            "inequivalent arg '{field}' for {what} '{name}': received {asked} but current is {current}"
        ))),
    }
}
