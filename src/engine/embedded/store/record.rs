//! How durable topology is written: small binary records, every field table in AMQP's own
//! lossless form (`engine::table::wire`). Each record starts with a version byte, so a later
//! format can read this one.

use crate::engine::table::wire;
use crate::engine::{BindingInfo, ExchangeKind, ExchangeSpec, QueueSpec};

use super::StoreError;

const V1: u8 = 1;
const DURABLE: u8 = 1;
const AUTO_DELETE: u8 = 2;
const INTERNAL: u8 = 4;
const EXCLUSIVE: u8 = 8;

fn corrupt(what: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError(format!("a stored {what} cannot be read: {why}"))
}

fn flags(set: &[(bool, u8)]) -> u8 {
    set.iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, bit)| acc | bit)
}

fn flag(flags: u8, bit: u8) -> bool {
    flags & bit != 0
}

fn table(bytes: &[u8], what: &str) -> Result<crate::engine::FieldTable, StoreError> {
    match wire::decode(bytes) {
        Ok((table, [])) => Ok(table),
        Ok(_) => Err(corrupt(what, "bytes after the arguments")),
        Err(e) => Err(corrupt(what, e)),
    }
}

fn encoded(arguments: &crate::engine::FieldTable) -> Result<Vec<u8>, StoreError> {
    wire::encode(arguments).map_err(|e| StoreError(e.to_string()))
}

pub fn exchange(spec: &ExchangeSpec) -> Result<Vec<u8>, StoreError> {
    let kind = match spec.kind {
        ExchangeKind::Direct => 0,
        ExchangeKind::Fanout => 1,
        ExchangeKind::Topic => 2,
        ExchangeKind::Headers => 3,
    };
    let flags = flags(&[
        (spec.durable, DURABLE),
        (spec.auto_delete, AUTO_DELETE),
        (spec.internal, INTERNAL),
    ]);
    let mut out = vec![V1, kind, flags];
    out.extend(encoded(&spec.arguments)?);
    Ok(out)
}

pub fn exchange_from(bytes: &[u8]) -> Result<ExchangeSpec, StoreError> {
    let [V1, kind, flags, arguments @ ..] = bytes else {
        return Err(corrupt("exchange", "unknown record version or too short"));
    };
    let kind = match kind {
        0 => ExchangeKind::Direct,
        1 => ExchangeKind::Fanout,
        2 => ExchangeKind::Topic,
        3 => ExchangeKind::Headers,
        other => return Err(corrupt("exchange", format!("unknown type {other}"))),
    };
    Ok(ExchangeSpec {
        kind,
        durable: flag(*flags, DURABLE),
        auto_delete: flag(*flags, AUTO_DELETE),
        internal: flag(*flags, INTERNAL),
        arguments: table(arguments, "exchange")?,
    })
}

pub fn queue(spec: &QueueSpec) -> Result<Vec<u8>, StoreError> {
    let flags = flags(&[
        (spec.durable, DURABLE),
        (spec.auto_delete, AUTO_DELETE),
        (spec.exclusive, EXCLUSIVE),
    ]);
    let mut out = vec![V1, flags];
    out.extend(encoded(&spec.arguments)?);
    Ok(out)
}

pub fn queue_from(bytes: &[u8]) -> Result<QueueSpec, StoreError> {
    let [V1, flags, arguments @ ..] = bytes else {
        return Err(corrupt("queue", "unknown record version or too short"));
    };
    Ok(QueueSpec {
        durable: flag(*flags, DURABLE),
        exclusive: flag(*flags, EXCLUSIVE),
        auto_delete: flag(*flags, AUTO_DELETE),
        arguments: table(arguments, "queue")?,
    })
}

/// A length-prefixed name (names and routing keys are AMQP short strings: at most 255 bytes).
fn push_short(out: &mut Vec<u8>, s: &str) -> Result<(), StoreError> {
    let len = u8::try_from(s.len()).map_err(|_| StoreError(format!("'{s}' is over 255 bytes")))?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn take_short<'a>(bytes: &'a [u8], what: &str) -> Result<(String, &'a [u8]), StoreError> {
    let (len, rest) = bytes
        .split_first()
        .ok_or_else(|| corrupt(what, "cut short"))?;
    let len = usize::from(*len);
    if rest.len() < len {
        return Err(corrupt(what, "cut short"));
    }
    let (name, rest) = rest.split_at(len);
    let name = std::str::from_utf8(name).map_err(|e| corrupt(what, e))?;
    Ok((name.to_owned(), rest))
}

/// The key prefix of every binding of `queue`.
pub fn bindings_of(queue: &str) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(queue.len() + 1);
    push_short(&mut out, queue)?;
    Ok(out)
}

/// A binding is all key (queue, exchange, routing key, arguments): binding twice is one binding,
/// and a queue's bindings share a prefix.
pub fn binding_key(b: &BindingInfo) -> Result<Vec<u8>, StoreError> {
    let mut out = bindings_of(&b.queue)?;
    push_short(&mut out, &b.exchange)?;
    push_short(&mut out, &b.routing_key)?;
    out.extend(encoded(&b.arguments)?);
    Ok(out)
}

pub fn binding_from(key: &[u8]) -> Result<BindingInfo, StoreError> {
    let (queue, rest) = take_short(key, "binding")?;
    let (exchange, rest) = take_short(rest, "binding")?;
    let (routing_key, rest) = take_short(rest, "binding")?;
    Ok(BindingInfo {
        exchange,
        queue,
        routing_key,
        arguments: table(rest, "binding")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FieldValue;

    #[test]
    fn records_round_trip() {
        let mut arguments = crate::engine::FieldTable::new();
        arguments.insert("x-expires".into(), FieldValue::I64(60_000));
        arguments.insert("x-raw".into(), FieldValue::Bytes(vec![0xff]));
        let ex = ExchangeSpec {
            kind: ExchangeKind::Headers,
            durable: true,
            auto_delete: true,
            internal: true,
            arguments: arguments.clone(),
        };
        assert_eq!(exchange_from(&exchange(&ex).unwrap()).unwrap(), ex);
        let q = QueueSpec {
            durable: true,
            exclusive: false,
            auto_delete: true,
            arguments: arguments.clone(),
        };
        assert_eq!(queue_from(&queue(&q).unwrap()).unwrap(), q);
        let b = BindingInfo {
            exchange: "amq.topic".into(),
            queue: "q".into(),
            routing_key: "a.#".into(),
            arguments,
        };
        let key = binding_key(&b).unwrap();
        assert!(key.starts_with(&bindings_of("q").unwrap()));
        assert!(!key.starts_with(&bindings_of("q2").unwrap()));
        assert_eq!(binding_from(&key).unwrap(), b);
    }

    #[test]
    fn unreadable_records_are_errors() {
        assert!(
            exchange_from(&[2, 0, 0, 0, 0, 0, 0]).is_err(),
            "another version"
        );
        assert!(
            exchange_from(&[V1, 9, 0, 0, 0, 0, 0]).is_err(),
            "unknown type"
        );
        assert!(queue_from(&[V1]).is_err(), "cut short");
        assert!(binding_from(&[5, b'q']).is_err(), "cut short");
    }
}
