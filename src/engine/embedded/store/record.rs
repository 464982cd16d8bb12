//! How durable state is written: small binary records (topology, binding keys, messages),
//! every field table in AMQP's own lossless form (`engine::table::wire`). Each record starts
//! with a version byte, so a later format can read this one.

use std::ops::BitOr;

use bytes::Bytes;

use crate::engine::table::wire;
use crate::engine::{
    BindingInfo, Envelope, ExchangeKind, ExchangeSpec, Message, Properties, QueueSpec,
};

use super::StoreError;

const V1: u8 = 1;
const DURABLE: u8 = 1;
const AUTO_DELETE: u8 = 2;
const INTERNAL: u8 = 4;
const EXCLUSIVE: u8 = 8;

fn corrupt(what: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError(format!("a stored {what} cannot be read: {why}"))
}

/// The bits of `set` that are on.
fn flags<T: BitOr<Output = T> + Default + Copy>(set: &[(bool, T)]) -> T {
    set.iter()
        .filter(|(on, _)| *on)
        .fold(T::default(), |acc, (_, bit)| acc | *bit)
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

fn encoded<const N: usize>(
    arguments: &crate::engine::FieldTable<N>,
) -> Result<Vec<u8>, StoreError> {
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

/// The key prefix of everything kept per `queue` (its bindings, its message entries).
pub fn queue_prefix(queue: &str) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(queue.len() + 1);
    push_short(&mut out, queue)?;
    Ok(out)
}

/// A binding is all key (queue, exchange, routing key, arguments): binding twice is one binding,
/// and a queue's bindings share a prefix.
pub fn binding_key(b: &BindingInfo) -> Result<Vec<u8>, StoreError> {
    let mut out = queue_prefix(&b.queue)?;
    push_short(&mut out, &b.exchange)?;
    push_short(&mut out, &b.routing_key)?;
    out.extend(encoded(&b.arguments)?);
    Ok(out)
}

pub fn binding_from(key: &[u8]) -> Result<BindingInfo, StoreError> {
    let mut r = Reader::new(key, "binding");
    let queue = r.short()?;
    let exchange = r.short()?;
    let routing_key = r.short()?;
    Ok(BindingInfo {
        exchange,
        queue,
        routing_key,
        arguments: table(r.rest, "binding")?,
    })
}

// ---- queue entries ----

const REDELIVERED: u8 = 1;

/// A message's entry in a queue: (queue, message id). Ids grow with publish order, so a queue's
/// entries read back in the order they were published.
pub fn queued_key(queue: &str, id: u64) -> Result<Vec<u8>, StoreError> {
    let mut out = queue_prefix(queue)?;
    out.extend_from_slice(&id.to_be_bytes());
    Ok(out)
}

pub fn queued_value(redelivered: bool) -> Vec<u8> {
    vec![V1, flags(&[(redelivered, REDELIVERED)])]
}

/// (queue, message id, redelivered) of an entry.
pub fn queued_from(key: &[u8], value: &[u8]) -> Result<(String, u64, bool), StoreError> {
    let mut r = Reader::new(key, "queue entry");
    let queue = r.short()?;
    let id = r.u64()?;
    let mut v = Reader::new(value, "queue entry");
    if v.u8()? != V1 {
        return Err(corrupt("queue entry", "unknown record version"));
    }
    let redelivered = flag(v.u8()?, REDELIVERED);
    if !r.rest.is_empty() || !v.rest.is_empty() {
        return Err(corrupt("queue entry", "trailing bytes"));
    }
    Ok((queue, id, redelivered))
}

pub fn message_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub fn message_id(key: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = key
        .try_into()
        .map_err(|_| corrupt("message", "key is not 8 bytes"))?;
    Ok(u64::from_be_bytes(b))
}

// ---- messages ----

/// Which optional properties a message record carries (AMQP's own order).
const P_CONTENT_TYPE: u16 = 1;
const P_CONTENT_ENCODING: u16 = 1 << 1;
const P_HEADERS: u16 = 1 << 2;
const P_DELIVERY_MODE: u16 = 1 << 3;
const P_PRIORITY: u16 = 1 << 4;
const P_CORRELATION_ID: u16 = 1 << 5;
const P_REPLY_TO: u16 = 1 << 6;
const P_EXPIRATION: u16 = 1 << 7;
const P_MESSAGE_ID: u16 = 1 << 8;
const P_TIMESTAMP: u16 = 1 << 9;
const P_TYPE: u16 = 1 << 10;
const P_USER_ID: u16 = 1 << 11;
const P_APP_ID: u16 = 1 << 12;

/// Strings of any length (properties the gateway sets itself are not bound to 255 bytes).
fn push_long(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(bytes.len()).map_err(|_| StoreError("a field over 4 GiB".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Reads what a record (of kind `what`, for errors) holds, front to back.
struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { rest: bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            return Err(corrupt(self.what, "cut short"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn long(&mut self) -> Result<&'a [u8], StoreError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        self.take(u32::from_be_bytes(b) as usize)
    }

    fn utf8(&self, bytes: &[u8]) -> Result<String, StoreError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| corrupt(self.what, e))
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let bytes = self.long()?;
        self.utf8(bytes)
    }

    /// A [`push_short`] name.
    fn short(&mut self) -> Result<String, StoreError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        self.utf8(bytes)
    }
}

/// A message as stored: where it was published, when (wall clock, milliseconds since the epoch,
/// so a TTL keeps counting across a restart), every property, the body.
pub fn message(envelope: &Envelope, published_at_ms: u64) -> Result<Vec<u8>, StoreError> {
    let p = &envelope.message.properties;
    let body = &envelope.message.body;
    let mut out = Vec::with_capacity(64 + body.len());
    out.push(V1);
    out.extend_from_slice(&published_at_ms.to_be_bytes());
    push_long(&mut out, envelope.exchange.as_bytes())?;
    push_long(&mut out, envelope.routing_key.as_bytes())?;
    let strings = [
        (P_CONTENT_TYPE, &p.content_type),
        (P_CONTENT_ENCODING, &p.content_encoding),
        (P_CORRELATION_ID, &p.correlation_id),
        (P_REPLY_TO, &p.reply_to),
        (P_EXPIRATION, &p.expiration),
        (P_MESSAGE_ID, &p.message_id),
        (P_TYPE, &p.kind),
        (P_USER_ID, &p.user_id),
        (P_APP_ID, &p.app_id),
    ];
    let mut present: Vec<(bool, u16)> = strings.iter().map(|(b, v)| (v.is_some(), *b)).collect();
    present.extend([
        (!p.headers.is_empty(), P_HEADERS),
        (p.delivery_mode.is_some(), P_DELIVERY_MODE),
        (p.priority.is_some(), P_PRIORITY),
        (p.timestamp.is_some(), P_TIMESTAMP),
    ]);
    out.extend_from_slice(&flags(&present).to_be_bytes());
    for (_, value) in strings {
        if let Some(v) = value {
            push_long(&mut out, v.as_bytes())?;
        }
    }
    if !p.headers.is_empty() {
        out.extend(encoded(&p.headers)?);
    }
    out.extend(p.delivery_mode);
    out.extend(p.priority);
    if let Some(t) = p.timestamp {
        out.extend_from_slice(&t.to_be_bytes());
    }
    push_long(&mut out, body)?;
    Ok(out)
}

/// A stored message and its publish time ([`message`] in reverse).
pub fn message_from(bytes: &[u8]) -> Result<(Envelope, u64), StoreError> {
    let mut r = Reader::new(bytes, "message");
    if r.u8()? != V1 {
        return Err(corrupt("message", "unknown record version"));
    }
    let published_at_ms = r.u64()?;
    let exchange = r.string()?;
    let routing_key = r.string()?;
    let present = r.u16()?;
    let mut text = |bit| -> Result<Option<String>, StoreError> {
        (present & bit != 0).then(|| r.string()).transpose()
    };
    let mut p = Properties {
        content_type: text(P_CONTENT_TYPE)?,
        content_encoding: text(P_CONTENT_ENCODING)?,
        correlation_id: text(P_CORRELATION_ID)?,
        reply_to: text(P_REPLY_TO)?,
        expiration: text(P_EXPIRATION)?,
        message_id: text(P_MESSAGE_ID)?,
        kind: text(P_TYPE)?,
        user_id: text(P_USER_ID)?,
        app_id: text(P_APP_ID)?,
        ..Properties::default()
    };
    if present & P_HEADERS != 0 {
        let (headers, rest) = wire::decode(r.rest).map_err(|e| corrupt("message", e))?;
        p.headers = headers;
        r.rest = rest;
    }
    if present & P_DELIVERY_MODE != 0 {
        p.delivery_mode = Some(r.u8()?);
    }
    if present & P_PRIORITY != 0 {
        p.priority = Some(r.u8()?);
    }
    if present & P_TIMESTAMP != 0 {
        p.timestamp = Some(r.u64()?);
    }
    let body = Bytes::copy_from_slice(r.long()?);
    if !r.rest.is_empty() {
        return Err(corrupt("message", "bytes after the body"));
    }
    let envelope = Envelope {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        message: Message {
            properties: p.into(),
            body,
        },
    };
    Ok((envelope, published_at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FieldValue;

    #[test]
    fn records_round_trip() {
        let mut arguments = crate::engine::FieldTable::new();
        arguments.insert("x-expires", FieldValue::I64(60_000));
        arguments.insert("x-raw", FieldValue::Bytes(vec![0xff]));
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
        assert!(key.starts_with(&queue_prefix("q").unwrap()));
        assert!(!key.starts_with(&queue_prefix("q2").unwrap()));
        assert_eq!(binding_from(&key).unwrap(), b);
        let entry = queued_key("q", 7).unwrap();
        assert!(entry.starts_with(&queue_prefix("q").unwrap()));
        assert_eq!(
            queued_from(&entry, &queued_value(true)).unwrap(),
            ("q".to_owned(), 7, true)
        );
        assert!(
            queued_key("q", 7).unwrap() < queued_key("q", 256).unwrap(),
            "id order"
        );
        assert_eq!(message_id(&message_key(42)).unwrap(), 42);
    }

    #[test]
    fn messages_round_trip_exactly() {
        let mut headers = crate::engine::Headers::new();
        headers.insert("x-raw", FieldValue::Bytes(vec![0, 0xff]));
        headers.insert("n", FieldValue::U16(7));
        let full = Properties {
            content_type: Some("text/plain".into()),
            content_encoding: Some("gzip".into()),
            headers,
            delivery_mode: Some(2),
            priority: Some(9),
            correlation_id: Some("c".repeat(300)),
            reply_to: Some("r".into()),
            expiration: Some("60000".into()),
            message_id: Some("m".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("t".into()),
            user_id: Some("u".into()),
            app_id: Some("a".into()),
        };
        for properties in [Properties::default(), full] {
            let envelope = Envelope {
                exchange: "amq.topic".into(),
                routing_key: "a.b".into(),
                message: Message {
                    properties: properties.into(),
                    body: Bytes::from_static(b"\x00body\xff"),
                },
            };
            let bytes = message(&envelope, 1_234).unwrap();
            assert_eq!(message_from(&bytes).unwrap(), (envelope, 1_234));
            assert!(
                message_from(&bytes[..bytes.len() - 1]).is_err(),
                "cut short"
            );
        }
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
