//! Field tables in AMQP 0-9-1's own binary form (amq-protocol-types, the crate under lapin and
//! the AMQP listener's framing): the lossless encoding the JSON mapping is not. The embedded
//! engine's store keeps arguments and headers this way; an upstream engine converts to and
//! from lapin's tables with the same two functions.

use amq_protocol_types::{AMQPValue, ByteArray, DecimalValue, LongString, ShortString};

use super::{FieldTable, FieldValue, MAX_DEPTH, TableError};

/// The table as amq-protocol-types has it (for the wire, for lapin).
pub fn to_amqp<const N: usize>(
    table: &FieldTable<N>,
) -> Result<amq_protocol_types::FieldTable, TableError> {
    table_to_amqp(table, 0)
}

fn table_to_amqp<const N: usize>(
    table: &FieldTable<N>,
    depth: usize,
) -> Result<amq_protocol_types::FieldTable, TableError> {
    if depth > MAX_DEPTH {
        return Err(TableError::TooDeep);
    }
    let mut out = amq_protocol_types::FieldTable::default();
    for (key, value) in table {
        let name = ShortString::try_new(key)
            .map_err(|_| TableError::KeyTooLong(key.chars().take(32).collect()))?;
        out.insert(name, value_to_amqp(value, depth)?);
    }
    Ok(out)
}

fn value_to_amqp(value: &FieldValue, depth: usize) -> Result<AMQPValue, TableError> {
    Ok(match value {
        FieldValue::Bool(b) => AMQPValue::Boolean(*b),
        FieldValue::I8(n) => AMQPValue::ShortShortInt(*n),
        FieldValue::U8(n) => AMQPValue::ShortShortUInt(*n),
        FieldValue::I16(n) => AMQPValue::ShortInt(*n),
        FieldValue::U16(n) => AMQPValue::ShortUInt(*n),
        FieldValue::I32(n) => AMQPValue::LongInt(*n),
        FieldValue::U32(n) => AMQPValue::LongUInt(*n),
        FieldValue::I64(n) => AMQPValue::LongLongInt(*n),
        FieldValue::F32(f) => AMQPValue::Float(*f),
        FieldValue::F64(f) => AMQPValue::Double(*f),
        FieldValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        FieldValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        FieldValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.as_slice())),
        FieldValue::Array(items) => {
            if depth >= MAX_DEPTH {
                return Err(TableError::TooDeep);
            }
            let items: Result<Vec<_>, _> =
                items.iter().map(|v| value_to_amqp(v, depth + 1)).collect();
            AMQPValue::FieldArray(items?.into())
        }
        FieldValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        FieldValue::Table(t) => AMQPValue::FieldTable(table_to_amqp(t, depth + 1)?),
        FieldValue::Void => AMQPValue::Void,
    })
}

/// The table from amq-protocol-types' form. A long string that is not UTF-8 becomes bytes;
/// nothing else changes.
pub fn from_amqp<const N: usize>(table: &amq_protocol_types::FieldTable) -> FieldTable<N> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_from_amqp(v)))
        .collect()
}

fn value_from_amqp(value: &AMQPValue) -> FieldValue {
    match value {
        AMQPValue::Boolean(b) => FieldValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => FieldValue::I8(*n),
        AMQPValue::ShortShortUInt(n) => FieldValue::U8(*n),
        AMQPValue::ShortInt(n) => FieldValue::I16(*n),
        AMQPValue::ShortUInt(n) => FieldValue::U16(*n),
        AMQPValue::LongInt(n) => FieldValue::I32(*n),
        AMQPValue::LongUInt(n) => FieldValue::U32(*n),
        AMQPValue::LongLongInt(n) => FieldValue::I64(*n),
        AMQPValue::Float(f) => FieldValue::F32(*f),
        AMQPValue::Double(f) => FieldValue::F64(*f),
        AMQPValue::DecimalValue(d) => FieldValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => FieldValue::Str(s.as_str().into()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => FieldValue::Str(text.into()),
            Err(_) => FieldValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => FieldValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::FieldArray(items) => {
            FieldValue::Array(items.as_slice().iter().map(value_from_amqp).collect())
        }
        AMQPValue::Timestamp(t) => FieldValue::Timestamp(*t),
        AMQPValue::FieldTable(t) => FieldValue::Table(Box::new(from_amqp(t))),
        AMQPValue::Void => FieldValue::Void,
    }
}

/// Why bytes are not a field table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("cannot encode the table: {0}")]
    Encode(String),
    #[error("not an AMQP field table: {0}")]
    Decode(String),
}

/// The table as AMQP 0-9-1 puts it on the wire: a 4-byte length, then the entries.
pub fn encode<const N: usize>(table: &FieldTable<N>) -> Result<Vec<u8>, WireError> {
    let amqp = to_amqp(table)?;
    cookie_factory::gen_simple(
        amq_protocol_types::generation::gen_field_table(&amqp),
        Vec::new(),
    )
    .map_err(|e| WireError::Encode(e.to_string()))
}

/// A table [`encode`]d, and the bytes after it.
pub fn decode<const N: usize>(bytes: &[u8]) -> Result<(FieldTable<N>, &[u8]), WireError> {
    let (rest, table) = amq_protocol_types::parsing::parse_field_table(bytes)
        .map_err(|e| WireError::Decode(e.to_string()))?;
    Ok((from_amqp(&table), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::table::Headers;

    fn sample() -> FieldTable {
        let mut inner = FieldTable::new();
        inner.insert("deep", FieldValue::Array(vec![FieldValue::I8(-1)]));
        [
            ("b", FieldValue::Bool(true)),
            ("i8", FieldValue::I8(-8)),
            ("u8", FieldValue::U8(8)),
            ("i16", FieldValue::I16(-16)),
            ("u16", FieldValue::U16(16)),
            ("i32", FieldValue::I32(-32)),
            ("u32", FieldValue::U32(32)),
            ("i64", FieldValue::I64(i64::MIN)),
            ("f32", FieldValue::F32(1.5)),
            ("f64", FieldValue::F64(-0.1)),
            (
                "dec",
                FieldValue::Decimal {
                    scale: 2,
                    value: 12345,
                },
            ),
            ("s", FieldValue::Str("héllo".into())),
            ("x", FieldValue::Bytes(vec![0, 0xff, 0xfe])),
            (
                "a",
                FieldValue::Array(vec![FieldValue::Void, FieldValue::Str("".into())]),
            ),
            ("ts", FieldValue::Timestamp(1_700_000_000)),
            ("t", FieldValue::Table(Box::new(inner))),
            ("v", FieldValue::Void),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    #[test]
    fn every_type_round_trips_exactly() {
        let table = sample();
        let bytes = encode(&table).unwrap();
        let (back, rest) = decode::<0>(&bytes).unwrap();
        assert_eq!(back, table);
        assert!(rest.is_empty());
        // As a message's headers: past the four held in line.
        let (headers, _) = decode::<4>(&bytes).unwrap();
        assert_eq!(headers, table);
    }

    #[test]
    fn nan_and_what_follows_survive() {
        let mut table = Headers::new();
        table.insert("nan", FieldValue::F64(f64::NAN));
        let mut bytes = encode(&table).unwrap();
        bytes.extend_from_slice(b"tail");
        let (back, rest) = decode::<4>(&bytes).unwrap();
        assert!(matches!(back["nan"], FieldValue::F64(f) if f.is_nan()));
        assert_eq!(rest, b"tail");
    }

    #[test]
    fn bad_input_is_an_error() {
        let long = "k".repeat(256);
        let mut table: FieldTable = FieldTable::new();
        table.insert(long, FieldValue::Void);
        assert!(matches!(
            encode(&table),
            Err(WireError::Table(TableError::KeyTooLong(_)))
        ));
        assert!(decode::<0>(&[0, 0, 0, 9, 1]).is_err(), "truncated");
        assert!(
            decode::<0>(&[0, 0, 0, 2, 1, b'k']).is_err(),
            "an entry cut short"
        );
    }
}
